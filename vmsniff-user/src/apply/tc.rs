//! Attaching vmsniff's programs to a tap's tc hooks, and detaching exactly them.
//!
//! TCX (Linux >= 6.6): a link per hook, placed first so that no other program's verdict hides
//! a frame from the mirror, and pinned so it outlives the command. Netlink (below 6.6, or when
//! asked): a cls_bpf filter in the clsact qdisc; the filter itself keeps the program attached,
//! and its (priority, handle) are recorded in the tap's entry so detach removes that filter and
//! no other.
use std::{fs, io};

use aya::programs::{
    LinkOrder, SchedClassifier, TcAttachType,
    links::{FdLink, PinnedLink},
    tc::{self, NlOptions, SchedClassifierLink, TcAttachOptions, TcError, TcHandle},
};
use futures::TryStreamExt as _;
use netlink_packet_route::tc::{TcAttribute, TcHandle as NlTcHandle, TcMessage};
use vmsniff_ebpf::{TapSessions, TcHook, program_name};

use crate::sys::KernelError;
use crate::{
    model::mirror::AttachMode,
    sys::{netlink::Netlink, paths::PinPaths},
};

fn attach_type(hook: TcHook) -> TcAttachType {
    match hook {
        TcHook::Ingress => TcAttachType::Ingress,
        TcHook::Egress => TcAttachType::Egress,
    }
}

/// Where a program ended up, for the tap's entry.
pub struct Attached {
    pub nl_priority: u16,
    pub nl_handle: u32,
}

/// Whether the interface has a clsact qdisc; a legacy ingress qdisc, which excludes one, is an
/// error.
pub async fn has_clsact(netlink: &Netlink, tap_name: &str, tap_ifindex: u32) -> Result<bool, KernelError> {
    let qdiscs: Vec<TcMessage> = netlink
        .handle
        .qdisc()
        .get()
        .index(tap_ifindex as i32)
        .execute()
        .try_collect()
        .await
        .map_err(KernelError::netlink(format!("listing {tap_name}'s qdiscs")))?;
    for qdisc in qdiscs.iter().filter(|q| q.header.index == tap_ifindex as i32) {
        let kind = qdisc.attributes.iter().find_map(|a| match a {
            TcAttribute::Kind(kind) => Some(kind.as_str()),
            _ => None,
        });
        match kind {
            Some("clsact") => return Ok(true),
            Some("ingress") => return Err(KernelError::LegacyIngressQdisc { name: tap_name.to_owned() }),
            _ => {}
        }
    }
    Ok(false)
}

/// Adds a clsact qdisc to the tap. Returns whether vmsniff created it (false: one was there).
pub async fn ensure_clsact(netlink: &Netlink, tap_name: &str, tap_ifindex: u32) -> Result<bool, KernelError> {
    if has_clsact(netlink, tap_name, tap_ifindex).await? {
        return Ok(false);
    }
    match tc::qdisc_add_clsact(tap_name) {
        Ok(()) => Ok(true),
        // EEXIST: another process added one since the listing; it serves everyone, keep it.
        Err(TcError::NetlinkError(e)) if e.raw_os_error() == Some(libc::EEXIST) => Ok(false),
        Err(source) => Err(KernelError::Program {
            op: format!("adding a clsact qdisc to {tap_name}"),
            source: Box::new(source.into()),
        }),
    }
}

/// The priority that puts vmsniff's filter before every filter already on the hook, so that no
/// other filter's verdict hides a frame from the mirror. tc's own default when the hook is empty.
pub async fn first_priority(
    netlink: &Netlink,
    tap_name: &str,
    ifindex: u32,
    hook: TcHook,
) -> Result<u16, KernelError> {
    const TC_DEFAULT_PRIORITY: u16 = 49152;
    let priorities: Vec<u16> =
        filter_messages(netlink, ifindex, hook).await?.iter().map(|m| (m.header.info >> 16) as u16).collect();
    Ok(match (priorities.iter().min(), priorities.iter().max()) {
        (None, _) => TC_DEFAULT_PRIORITY,
        (Some(&min), _) if min > 1 => min - 1,
        (_, Some(&max)) => {
            log::warn!(
                "{tap_name}'s {} hook has a filter at priority 1: vmsniff's filter goes after every \
                 filter there and sees only frames they let through",
                hook.as_str()
            );
            max.saturating_add(1)
        }
        (Some(_), None) => unreachable!("a minimum implies a maximum"),
    })
}

/// Attaches `program` (the one `filter` names) to `filter`'s hook.
pub fn attach(
    program: &mut SchedClassifier,
    paths: &PinPaths,
    filter: Filter<'_>,
    mode: AttachMode,
    nl_priority: u16,
) -> Result<Attached, KernelError> {
    let Filter { name: tap_name, ifindex: tap_ifindex, hook, program: _ } = filter;
    let op =
        || format!("attaching vmsniff's program to {tap_name}'s {} hook ({})", hook.as_str(), mode.as_str());
    match mode {
        AttachMode::Tcx => {
            let id = program
                .attach_with_options(
                    tap_name,
                    attach_type(hook),
                    TcAttachOptions::TcxOrder(LinkOrder::first()),
                )
                .map_err(KernelError::program(op()))?;
            let link = program.take_link(id).map_err(KernelError::program(op()))?;
            let link = FdLink::try_from(link).map_err(KernelError::link(op()))?;
            fs::create_dir_all(paths.links_dir())
                .map_err(KernelError::io(format!("creating {}", paths.links_dir().display())))?;
            let path = paths.link(tap_ifindex, hook);
            // Dropping the unpinned link on error detaches it: nothing is left behind.
            link.pin(&path).map_err(|e| KernelError::Pin { path, source: Box::new(e) })?;
            Ok(Attached { nl_priority: 0, nl_handle: 0 })
        }
        AttachMode::Netlink => {
            let id = program
                .attach_with_options(
                    tap_name,
                    attach_type(hook),
                    TcAttachOptions::Netlink(NlOptions { priority: nl_priority, ..NlOptions::default() }),
                )
                .map_err(KernelError::program(op()))?;
            let link = program.take_link(id).map_err(KernelError::program(op()))?;
            let attached = Attached {
                nl_priority: link.priority().map_err(KernelError::program(op()))?,
                nl_handle: link.handle().map_err(KernelError::program(op()))?.into(),
            };
            // The filter keeps the program attached; dropping the link object would remove it.
            std::mem::forget(link);
            Ok(attached)
        }
    }
}

/// Which of vmsniff's programs to attach or detach, where.
pub struct Filter<'a> {
    /// The interface's name (when detaching: its name when attached, for messages; it may have
    /// been renamed since).
    pub name: &'a str,
    pub ifindex: u32,
    pub hook: TcHook,
    /// The program attached there (when detaching: the one the filter must run to be
    /// vmsniff's).
    pub program: &'a str,
}

/// Detaches vmsniff's program from one hook. A tap that no longer exists took its programs
/// with it: that is success.
pub async fn detach(
    netlink: &Netlink,
    paths: &PinPaths,
    filter: Filter<'_>,
    mode: AttachMode,
    nl_priority: u16,
    nl_handle: u32,
) -> Result<(), KernelError> {
    let Filter { name: tap_name, ifindex: tap_ifindex, hook, program } = filter;
    match mode {
        AttachMode::Tcx => {
            let path = paths.link(tap_ifindex, hook);
            match PinnedLink::from_pin(&path) {
                // Unpinning and closing the last fd releases the link, which detaches it.
                Ok(link) => {
                    link.unpin().map(drop).map_err(KernelError::io(format!("unpinning {}", path.display())))
                }
                Err(aya::programs::links::LinkError::SyscallError(e))
                    if e.io_error.kind() == io::ErrorKind::NotFound =>
                {
                    Ok(())
                }
                Err(e) => Err(KernelError::link(format!("opening {}", path.display()))(e)),
            }
        }
        AttachMode::Netlink => {
            // No priority recorded: a run killed before it attached anything there.
            if nl_priority == 0 {
                return Ok(());
            }
            let Some(tap_name) = current_name(netlink, tap_ifindex, tap_name).await? else {
                return Ok(());
            };
            let tap_name = tap_name.as_str();
            let handles: Vec<u32> = bpf_filters(netlink, tap_ifindex, hook)
                .await?
                .into_iter()
                .filter(|(p, h, name)| is_recorded(nl_priority, nl_handle, program, (*p, *h, name)))
                .map(|(_, handle, _)| handle)
                .collect();
            if handles.is_empty() {
                log::warn!(
                    "{tap_name}'s {} hook has no vmsniff filter at priority {nl_priority} handle {nl_handle:#x}: nothing to detach there",
                    hook.as_str()
                );
            }
            for handle in handles {
                let link = SchedClassifierLink::attached(
                    tap_name,
                    attach_type(hook),
                    nl_priority,
                    TcHandle::from(handle),
                    None,
                )
                .map_err(KernelError::io(format!("looking up {tap_name}")))?;
                aya::programs::links::Link::detach(link).map_err(KernelError::program(format!(
                    "removing vmsniff's filter from {tap_name}'s {} hook",
                    hook.as_str()
                )))?;
            }
            Ok(())
        }
    }
}

/// The tap's name now (it may have been renamed since attach), or `None` when it is gone, which
/// took its filters and qdiscs with it.
async fn current_name(
    netlink: &Netlink,
    ifindex: u32,
    recorded: &str,
) -> Result<Option<String>, KernelError> {
    Ok(netlink
        .link_by_index(ifindex)
        .await
        .map_err(KernelError::netlink(format!("looking up {recorded}")))?
        .map(|link| link.name))
}

/// The cls_bpf filters on one hook of an interface: (priority, handle, program name).
async fn bpf_filters(
    netlink: &Netlink,
    ifindex: u32,
    hook: TcHook,
) -> Result<Vec<(u16, u32, String)>, KernelError> {
    Ok(filter_messages(netlink, ifindex, hook)
        .await?
        .into_iter()
        .map(|m| {
            let priority = (m.header.info >> 16) as u16;
            let handle = u32::from(m.header.handle);
            let name = m
                .attributes
                .iter()
                .find_map(|a| match a {
                    TcAttribute::Options(options) => options.iter().find_map(|o| match o {
                        netlink_packet_route::tc::TcOption::Bpf(
                            netlink_packet_route::tc::TcFilterBpfOption::ProgName(n),
                        ) => Some(n.clone()),
                        _ => None,
                    }),
                    _ => None,
                })
                .unwrap_or_default();
            (priority, handle, name)
        })
        .collect())
}

/// vmsniff's cls_bpf filters on one hook of an interface, known by their programs' names alone:
/// (priority, handle, program). For state whose records this vmsniff cannot read.
pub async fn filters_by_program_name(
    netlink: &Netlink,
    ifindex: u32,
    hook: TcHook,
) -> Result<Vec<(u16, u32, &'static str)>, KernelError> {
    Ok(bpf_filters(netlink, ifindex, hook)
        .await?
        .into_iter()
        .filter_map(|(priority, handle, name)| {
            let program = program_name::ALL.into_iter().find(|program| runs_program(&name, program))?;
            Some((priority, handle, program))
        })
        .collect())
}

/// The hooks of a netlink-attached tap whose recorded vmsniff filter is gone (someone ran
/// `tc qdisc del dev TAP clsact`, or deleted the filter): the mirror is silently off there.
/// TCX links cannot be removed that way: a TCX tap has none.
pub async fn missing_tap_programs(
    netlink: &Netlink,
    tap_ifindex: u32,
    entry: &TapSessions,
) -> Result<Vec<TcHook>, KernelError> {
    if AttachMode::from_abi(entry.attach_mode) != Some(AttachMode::Netlink) {
        return Ok(Vec::new());
    }
    let mut missing = Vec::new();
    for hook in TcHook::ALL {
        let (priority, handle) = (entry.nl_priority[hook.index()], entry.nl_handle[hook.index()]);
        if !is_our_filter(netlink, tap_ifindex, hook, tap_program_name(hook), priority, handle).await? {
            missing.push(hook);
        }
    }
    Ok(missing)
}

/// The tap program that runs on `hook`.
pub fn tap_program_name(hook: TcHook) -> &'static str {
    match hook {
        TcHook::Ingress => vmsniff_ebpf::program_name::TAP_INGRESS,
        TcHook::Egress => vmsniff_ebpf::program_name::TAP_EGRESS,
    }
}

async fn is_our_filter(
    netlink: &Netlink,
    ifindex: u32,
    hook: TcHook,
    expected: &str,
    priority: u16,
    handle: u32,
) -> Result<bool, KernelError> {
    Ok(bpf_filters(netlink, ifindex, hook)
        .await?
        .iter()
        .any(|(p, h, name)| is_recorded(priority, handle, expected, (*p, *h, name))))
}

/// Whether a cls_bpf filter (priority, handle, name) is the one a record names. Handle 0: the
/// priority was recorded before the filter was made and the run was killed before its handle
/// was, so any filter there running the program is it (`detach` finds it the same way).
fn is_recorded(priority: u16, handle: u32, program: &str, (p, h, name): (u16, u32, &str)) -> bool {
    priority != 0 && p == priority && (handle == 0 || h == handle) && runs_program(name, program)
}

/// Whether a cls_bpf filter named `filter_name` runs `program`. tc names a filter after its
/// program: the full name when the program was loaded from the object, the kernel's name
/// (BPF_OBJ_NAME_LEN: 15 characters) when it was taken from its pin.
fn runs_program(filter_name: &str, program: &str) -> bool {
    const KERNEL_NAME_LEN: usize = 15;
    filter_name.starts_with(program)
        || (filter_name.len() == KERNEL_NAME_LEN.min(program.len()) && program.starts_with(filter_name))
}

/// Removes the clsact qdisc vmsniff added, unless anybody else's filter is in it now.
pub async fn remove_clsact_if_unused(
    netlink: &Netlink,
    tap_name: &str,
    tap_ifindex: u32,
) -> Result<(), KernelError> {
    if current_name(netlink, tap_ifindex, tap_name).await?.is_none() {
        return Ok(());
    }
    for hook in TcHook::ALL {
        if !filter_messages(netlink, tap_ifindex, hook).await?.is_empty() {
            log::info!("keeping {tap_name}'s clsact qdisc: it holds other filters");
            return Ok(());
        }
    }
    let mut request = netlink.handle.qdisc().del(tap_ifindex as i32);
    request.message_mut().header.parent = NlTcHandle::from(0xFFFF_FFF1u32);
    request.message_mut().header.handle = NlTcHandle::from(0xFFFF_0000u32);
    match request.execute().await {
        Ok(()) => Ok(()),
        // ENOENT/EINVAL: the qdisc is gone already.
        Err(e) if matches!(crate::sys::netlink::errno(&e), Some(libc::ENOENT) | Some(libc::EINVAL)) => Ok(()),
        Err(e) => {
            Err(KernelError::netlink(format!("removing the clsact qdisc vmsniff added to {tap_name}"))(e))
        }
    }
}

/// Every filter on one hook, of any kind (bpf, u32, flower, ...): one message per filter
/// instance (the per-priority chain headers, with handle 0, are left out).
async fn filter_messages(
    netlink: &Netlink,
    ifindex: u32,
    hook: TcHook,
) -> Result<Vec<TcMessage>, KernelError> {
    let mut request = netlink.handle.traffic_filter(ifindex as i32).get();
    request = match hook {
        TcHook::Ingress => request.ingress(),
        TcHook::Egress => request.egress(),
    };
    match request.execute().try_collect::<Vec<TcMessage>>().await {
        Ok(messages) => {
            Ok(messages.into_iter().filter(|m| m.header.handle != NlTcHandle::from(0u32)).collect())
        }
        // EINVAL: no clsact qdisc, so no filter on that hook.
        Err(e) if crate::sys::netlink::errno(&e) == Some(libc::EINVAL) => Ok(Vec::new()),
        Err(e) => Err(KernelError::netlink(format!("listing tc filters of ifindex {ifindex}"))(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_names_its_filter_or_without_handle_any_of_the_program_at_its_priority() {
        let program = vmsniff_ebpf::program_name::TAP_INGRESS;
        let filter = (49152, 7, "vmsniff_tap_ing");
        assert!(is_recorded(49152, 7, program, filter));
        assert!(!is_recorded(49152, 8, program, filter));
        assert!(!is_recorded(49151, 7, program, filter));
        // Recorded before it was made: the handle is not known.
        assert!(is_recorded(49152, 0, program, filter));
        assert!(!is_recorded(49152, 0, program, (49152, 7, "other_prog")));
        // Nothing recorded: nothing is vmsniff's.
        assert!(!is_recorded(0, 0, program, (0, 7, "vmsniff_tap_ing")));
    }

    #[test]
    fn filters_are_ours_by_the_full_or_the_kernel_name() {
        let program = vmsniff_ebpf::program_name::TAP_INGRESS;
        assert!(runs_program("vmsniff_tap_ingress", program));
        assert!(runs_program("vmsniff_tap_ingress:[503]", program));
        assert!(runs_program("vmsniff_tap_ing", program));
        assert!(!runs_program("vmsniff_tap", program));
        assert!(!runs_program("vmsniff_tap_egr", program));
        assert!(!runs_program("", program));
    }
}
