//! The one executor: runs a plan's steps against the kernel. An attach that fails half-way is
//! undone step by step in reverse, so a failed command leaves the system as it found it; a
//! detach goes on past a failing step and reports every failure at the end.
use aya::programs::SchedClassifier;
use vmsniff_ebpf::{
    SESSION_ACTIVE, SESSION_BUSY, SessionConfig, TAP_CREATED_CLSACT, TARGET_CREATED_CLSACT, TapSessions,
    TcHook, program_name,
};

use super::{
    KernelError, gre,
    maps::{self, PinnedMaps},
    tc,
};
use crate::{
    netlink::Netlink,
    paths::{PinPaths, gre_device_alias, gre_device_session},
    plan::{
        attach::{AttachPlan, AttachStep},
        detach::DetachStep,
        rehome::RehomePlan,
        request::AttachMode,
        update::UpdatePlan,
    },
};

/// What the executor works on: the caller's network namespace.
pub struct Kernel {
    pub netlink: Netlink,
    pub paths: PinPaths,
}

/// Applies an attach plan; on failure undoes what it did and returns the first error.
pub async fn apply_attach(kernel: &Kernel, plan: &AttachPlan) -> Result<(), KernelError> {
    let had_state = PinnedMaps::open(&kernel.paths)?.is_some();
    let result = apply_attach_steps(kernel, &plan.steps).await;
    if result.is_err() && !had_state {
        // This attach made the namespace's pins (maps, maybe link pins): with its steps undone,
        // nothing else uses them.
        if let Err(e) = maps::remove_pins(&kernel.paths) {
            log::error!("could not remove the pins of the failed attach: {}", chain(&e));
        }
    }
    result
}

/// Applies a re-home: forgets the old tap (best effort: it is gone, and what is left of it
/// only costs a map entry), then attaches to the new one, undone on failure.
pub async fn apply_rehome(kernel: &Kernel, plan: &RehomePlan) -> Result<(), KernelError> {
    for (step, error) in apply_detach(kernel, &plan.release).await {
        log::warn!("session {}: could not clean up its old tap ({step:?}): {}", plan.id, chain(&error));
    }
    apply_attach_steps(kernel, &plan.attach).await
}

async fn apply_attach_steps(kernel: &Kernel, steps: &[AttachStep]) -> Result<(), KernelError> {
    let mut ebpf = Programs::new(&kernel.paths)?;
    let mut maps = PinnedMaps::open(&kernel.paths)?.ok_or_else(|| KernelError::Io {
        op: format!(
            "vmsniff's maps are not pinned under {} after loading",
            kernel.paths.maps_dir().display()
        ),
        source: std::io::Error::from_raw_os_error(libc::ENOENT),
    })?;
    let mut undo: Vec<DetachStep> = Vec::new();
    let mut session = SessionConfig::EMPTY;
    for step in steps {
        let result = apply_attach_step(kernel, &mut ebpf, &mut maps, step, &mut session, &mut undo).await;
        if let Err(error) = result {
            log::debug!("attach failed at {step:?}: undoing {} steps", undo.len());
            for step in undo.iter().rev() {
                if let Err(undo_error) = apply_detach_step(kernel, &mut maps, step).await {
                    log::error!(
                        "could not undo a step of the failed attach ({step:?}): {}",
                        chain(&undo_error)
                    );
                }
            }
            return Err(error);
        }
    }
    Ok(())
}

async fn apply_attach_step(
    kernel: &Kernel,
    ebpf: &mut Programs<'_>,
    maps: &mut PinnedMaps,
    step: &AttachStep,
    session: &mut SessionConfig,
    undo: &mut Vec<DetachStep>,
) -> Result<(), KernelError> {
    match step {
        AttachStep::ClaimSession { id, config } => {
            *session = *config;
            let claimed = SessionConfig { state: SESSION_BUSY, owner_pid: std::process::id(), ..*config };
            maps.set_session(*id, &claimed)?;
            undo.push(DetachStep::FreeSession { id: *id });
        }
        AttachStep::ResetCounters { id } => {
            maps.reset_counters(*id)?;
            maps.reset_rate(*id)?;
        }
        AttachStep::WriteFilter { id, filter } => maps.set_filter(*id, 0, filter)?,
        AttachStep::CreateGreDevice { id, direction, device } => {
            let ifindex = gre::create(&kernel.netlink, device).await?;
            session.target_ifindex[direction.index()] = ifindex;
            undo.push(DetachStep::DeleteGreDevice {
                id: *id,
                direction: *direction,
                ifindex,
                name: device.name.clone(),
            });
            // Record the device at once, so that a crash from here on leaves it findable.
            let mut claimed = maps.session(*id)?;
            claimed.target_ifindex[direction.index()] = ifindex;
            maps.set_session(*id, &claimed)?;
        }
        AttachStep::AttachCopyProgram { id, direction, device } => {
            let d = direction.index();
            let ifindex = session.target_ifindex[d];
            if tc::ensure_clsact(&kernel.netlink, device, ifindex).await? {
                session.target_flags |= TARGET_CREATED_CLSACT << d;
                undo.push(DetachStep::RemoveClsactIfUnused {
                    tap_ifindex: ifindex,
                    tap_name: device.clone(),
                });
            }
            let priority = tc::first_priority(&kernel.netlink, device, ifindex, TcHook::Egress).await?;
            let program = ebpf.get(program_name::COPY_EGRESS)?;
            let attached = tc::attach(
                program,
                &kernel.paths,
                device,
                ifindex,
                TcHook::Egress,
                AttachMode::Netlink,
                priority,
            )?;
            undo.push(DetachStep::DetachCopyProgram {
                id: *id,
                ifindex,
                nl_priority: attached.nl_priority,
                nl_handle: attached.nl_handle,
            });
            session.target_nl_priority[d] = attached.nl_priority;
            session.target_nl_handle[d] = attached.nl_handle;
            // Record the filter at once, so that a crash from here on leaves it findable.
            let mut claimed = maps.session(*id)?;
            claimed.target_nl_priority = session.target_nl_priority;
            claimed.target_nl_handle = session.target_nl_handle;
            claimed.target_flags = session.target_flags;
            maps.set_session(*id, &claimed)?;
        }
        AttachStep::RegisterTap { tap, mode } => {
            let mut entry = TapSessions { attach_mode: mode.abi(), ..TapSessions::EMPTY };
            let name = tap.name.as_bytes();
            entry.ifname[..name.len()].copy_from_slice(name);
            maps.set_tap(tap.ifindex, &entry)?;
            undo.push(DetachStep::ForgetTap { tap_ifindex: tap.ifindex });
        }
        AttachStep::EnsureClsact { tap } => {
            if tc::ensure_clsact(&kernel.netlink, &tap.name, tap.ifindex).await? {
                update_tap(maps, tap.ifindex, |entry| entry.flags |= TAP_CREATED_CLSACT)?;
                undo.push(DetachStep::RemoveClsactIfUnused {
                    tap_ifindex: tap.ifindex,
                    tap_name: tap.name.clone(),
                });
            }
        }
        AttachStep::AttachProgram { tap, hook, mode } => {
            let priority = match mode {
                AttachMode::Netlink => {
                    tc::first_priority(&kernel.netlink, &tap.name, tap.ifindex, *hook).await?
                }
                AttachMode::Tcx => 0,
            };
            let program = ebpf.get(tc::tap_program_name(*hook))?;
            let attached =
                tc::attach(program, &kernel.paths, &tap.name, tap.ifindex, *hook, *mode, priority)?;
            undo.push(DetachStep::DetachProgram {
                tap_ifindex: tap.ifindex,
                tap_name: tap.name.clone(),
                hook: *hook,
                mode: *mode,
                nl_priority: attached.nl_priority,
                nl_handle: attached.nl_handle,
            });
            update_tap(maps, tap.ifindex, |entry| {
                entry.nl_priority[hook.index()] = attached.nl_priority;
                entry.nl_handle[hook.index()] = attached.nl_handle;
            })?;
        }
        AttachStep::ActivateSession { id } => {
            let active = SessionConfig { state: SESSION_ACTIVE, ..*session };
            maps.set_session(*id, &active)?;
            undo.push(DetachStep::DeactivateSession { id: *id });
        }
        AttachStep::AddToTap { tap, id } => {
            let mut full = false;
            update_tap(maps, tap.ifindex, |entry| match entry.ids.iter().position(|&slot| slot == 0) {
                Some(slot) => entry.ids[slot] = *id as u16,
                None => full = true,
            })?;
            if full {
                return Err(KernelError::Io {
                    op: format!("tap {} has no free session slot", tap.name),
                    source: std::io::Error::from_raw_os_error(libc::ENOSPC),
                });
            }
            undo.push(DetachStep::RemoveFromTap { tap_ifindex: tap.ifindex, ids: vec![*id] });
        }
        AttachStep::MoveSession { id, tap_ifindex } => {
            let moved = SessionConfig { tap_ifindex: *tap_ifindex, ..maps.session(*id)? };
            maps.set_session(*id, &moved)?;
        }
    }
    Ok(())
}

/// vmsniff's tc programs for one apply. Loading one runs the kernel's verifier, which takes a
/// second or more for the tap programs on a busy host (many more under an emulated CPU): too
/// slow for the daemon's re-attach after a VM reboots. So the first load in a namespace pins
/// the programs beside its maps (they go with them when the last session does), and later
/// attaches take them from there. The pins are per build of the object, so a new vmsniff never
/// attaches an older build's programs. Nor one of another ABI: a build's programs are bound
/// to the maps `PinnedMaps::open` accepted, so they need no version check of their own.
struct Programs<'a> {
    paths: &'a PinPaths,
    /// The embedded object, loaded (with the namespace's pinned maps) only when a program is
    /// not pinned yet, or when there are no maps to pin to yet.
    ebpf: Option<aya::Ebpf>,
    tag: String,
    pinned: std::collections::BTreeMap<String, SchedClassifier>,
}

impl<'a> Programs<'a> {
    fn new(paths: &'a PinPaths) -> Result<Self, KernelError> {
        let ebpf = match PinnedMaps::open(paths)? {
            Some(_) => None,
            None => {
                // New maps: programs pinned beside maps that someone removed would still use
                // the old ones.
                match std::fs::remove_dir_all(paths.programs_root()) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                        return Err(
                            KernelError::io(format!("removing {}", paths.programs_root().display()))(e),
                        );
                    }
                    _ => {}
                }
                Some(PinnedMaps::load_object(paths)?)
            }
        };
        Ok(Programs { paths, ebpf, tag: maps::object_tag(), pinned: Default::default() })
    }

    fn get(&mut self, name: &str) -> Result<&mut SchedClassifier, KernelError> {
        let path = self.paths.programs_dir(&self.tag).join(name);
        if !self.pinned.contains_key(name) && path.exists() {
            match SchedClassifier::from_pin(&path) {
                Ok(program) => {
                    self.pinned.insert(name.to_owned(), program);
                }
                Err(e) => {
                    log::debug!("loading {name} anew: its pin {} is unusable: {e}", path.display());
                    // Out of the way, or the fresh program could not be pinned there.
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
        if self.pinned.contains_key(name) {
            return Ok(self.pinned.get_mut(name).expect("checked just above"));
        }
        let ebpf = match &mut self.ebpf {
            Some(ebpf) => ebpf,
            ebpf @ None => ebpf.insert(PinnedMaps::load_object(self.paths)?),
        };
        let program = load_program(ebpf, name)?;
        if let Err(e) = pin_program(self.paths, &self.tag, program, &path) {
            // Only the next attach's speed depends on it.
            log::debug!("not pinning {name} at {}: {e}", path.display());
        }
        Ok(program)
    }
}

/// Pins a freshly loaded program under its build's directory, and removes the pins of other
/// builds (unpinning never detaches: filters and links hold their programs).
fn pin_program(
    paths: &PinPaths,
    tag: &str,
    program: &mut SchedClassifier,
    path: &std::path::Path,
) -> std::io::Result<()> {
    let dir = paths.programs_dir(tag);
    std::fs::create_dir_all(&dir)?;
    if let Some(parent) = dir.parent() {
        for entry in std::fs::read_dir(parent)?.flatten() {
            if entry.file_name() != std::ffi::OsStr::new(tag) {
                std::fs::remove_dir_all(entry.path())?;
            }
        }
    }
    program.pin(path).map_err(std::io::Error::other)
}

fn load_program<'a>(ebpf: &'a mut aya::Ebpf, name: &str) -> Result<&'a mut SchedClassifier, KernelError> {
    let program: &mut SchedClassifier = ebpf
        .program_mut(name)
        .ok_or_else(|| KernelError::Io {
            op: format!("the embedded eBPF object has no program {name}"),
            source: std::io::Error::from_raw_os_error(libc::ENOENT),
        })?
        .try_into()
        .map_err(KernelError::program(format!("{name} is not a tc classifier")))?;
    if program.fd().is_err() {
        program
            .load()
            .map_err(KernelError::program(format!("loading {name} (the kernel's verifier refused it)")))?;
    }
    Ok(program)
}

fn update_tap(
    maps: &mut PinnedMaps,
    ifindex: u32,
    change: impl FnOnce(&mut TapSessions),
) -> Result<(), KernelError> {
    let mut entry = maps.tap(ifindex)?.unwrap_or(TapSessions::EMPTY);
    change(&mut entry);
    maps.set_tap(ifindex, &entry)
}

/// Applies an update plan: the idle filter slot, then the session's entry in one write (the
/// switch), then the token bucket. A failure before the switch changes nothing the programs
/// read; the switch is one map write, so it happens entirely or not at all.
pub fn apply_update(kernel: &Kernel, plan: &UpdatePlan) -> Result<(), KernelError> {
    let mut maps = PinnedMaps::open(&kernel.paths)?.ok_or_else(|| KernelError::Io {
        op: format!("vmsniff has no pinned maps under {}", kernel.paths.maps_dir().display()),
        source: std::io::Error::from_raw_os_error(libc::ENOENT),
    })?;
    if let Some((slot, filter)) = &plan.filter {
        maps.set_filter(plan.id, *slot, filter)?;
    }
    maps.set_session(plan.id, &plan.config)?;
    if plan.reset_rate {
        maps.reset_rate(plan.id)?;
    }
    Ok(())
}

/// Applies detach steps, all of them: returns the failures, each with the step it came from.
pub async fn apply_detach(kernel: &Kernel, steps: &[DetachStep]) -> Vec<(DetachStep, KernelError)> {
    let mut failures = Vec::new();
    let mut maps = match PinnedMaps::open(&kernel.paths) {
        Ok(Some(maps)) => maps,
        Ok(None) => return failures,
        Err(error) => {
            failures.push((DetachStep::RemovePins, error));
            return failures;
        }
    };
    for step in steps {
        if let Err(error) = apply_detach_step(kernel, &mut maps, step).await {
            failures.push((step.clone(), error));
        }
    }
    failures
}

async fn apply_detach_step(
    kernel: &Kernel,
    maps: &mut PinnedMaps,
    step: &DetachStep,
) -> Result<(), KernelError> {
    match step {
        DetachStep::DeactivateSession { id } => {
            let session = maps.session(*id)?;
            maps.set_session(
                *id,
                &SessionConfig { state: SESSION_BUSY, owner_pid: std::process::id(), ..session },
            )
        }
        DetachStep::RemoveFromTap { tap_ifindex, ids } => {
            if maps.tap(*tap_ifindex)?.is_none() {
                return Ok(());
            }
            update_tap(maps, *tap_ifindex, |entry| {
                let kept: Vec<u16> = entry
                    .ids
                    .iter()
                    .copied()
                    .filter(|&id| id != 0 && !ids.contains(&u32::from(id)))
                    .collect();
                entry.ids = [0; vmsniff_ebpf::MAX_SESSIONS_PER_TAP];
                entry.ids[..kept.len()].copy_from_slice(&kept);
            })
        }
        DetachStep::DetachProgram { tap_ifindex, tap_name, hook, mode, nl_priority, nl_handle } => {
            tc::detach(
                &kernel.netlink,
                &kernel.paths,
                tc::Filter {
                    name: tap_name,
                    ifindex: *tap_ifindex,
                    hook: *hook,
                    program: tc::tap_program_name(*hook),
                },
                *mode,
                *nl_priority,
                *nl_handle,
            )
            .await
        }
        DetachStep::DetachCopyProgram { id, ifindex, nl_priority, nl_handle } => {
            tc::detach(
                &kernel.netlink,
                &kernel.paths,
                tc::Filter {
                    name: &format!("session {id}'s target"),
                    ifindex: *ifindex,
                    hook: TcHook::Egress,
                    program: program_name::COPY_EGRESS,
                },
                AttachMode::Netlink,
                *nl_priority,
                *nl_handle,
            )
            .await
        }
        DetachStep::RemoveClsactIfUnused { tap_ifindex, tap_name } => {
            tc::remove_clsact_if_unused(&kernel.netlink, tap_name, *tap_ifindex).await
        }
        DetachStep::ForgetTap { tap_ifindex } => maps.remove_tap(*tap_ifindex),
        DetachStep::DeleteGreDevice { id, direction, ifindex, name } => {
            gre::delete(&kernel.netlink, *ifindex, name, &gre_device_alias(*id, *direction)).await
        }
        DetachStep::FreeSession { id } => maps.set_session(*id, &SessionConfig::EMPTY),
        DetachStep::RemovePins => maps::remove_pins(&kernel.paths),
    }
}

/// What [`remove_by_name`] removed.
#[derive(Debug, Default)]
pub struct RemovedByName {
    pub filters: usize,
    pub devices: usize,
}

/// Removes vmsniff's state in the namespace without reading its maps (another ABI version's, or
/// incomplete), by what every version names alike: cls_bpf filters running vmsniff's programs,
/// on any interface; devices with a vmsniff GRE device's name and alias; then the pin
/// directory, whose TCX link pins are the TCX attachments. The pins go only when everything
/// else did: while they stay, the next `detach --all` finds the rest again. clsact qdiscs stay,
/// since whether vmsniff added one is recorded in the maps, and an empty one changes nothing.
/// Goes on past a failing interface and returns the failures.
pub async fn remove_by_name(kernel: &Kernel) -> (RemovedByName, Vec<KernelError>) {
    let mut removed = RemovedByName::default();
    let mut failures = Vec::new();
    let links = match kernel.netlink.links().await {
        Ok(links) => links,
        Err(e) => return (removed, vec![KernelError::netlink("listing the interfaces")(e)]),
    };
    for link in &links {
        for hook in TcHook::ALL {
            let filters = match tc::filters_by_program_name(&kernel.netlink, link.ifindex, hook).await {
                Ok(filters) => filters,
                Err(e) => {
                    failures.push(e);
                    continue;
                }
            };
            for (priority, handle, program) in filters {
                let filter = tc::Filter { name: &link.name, ifindex: link.ifindex, hook, program };
                match tc::detach(
                    &kernel.netlink,
                    &kernel.paths,
                    filter,
                    AttachMode::Netlink,
                    priority,
                    handle,
                )
                .await
                {
                    Ok(()) => removed.filters += 1,
                    Err(e) => failures.push(e),
                }
            }
        }
    }
    for link in &links {
        if let Some((id, direction)) = gre_device_session(&link.name, link.alias.as_deref()) {
            match gre::delete(&kernel.netlink, link.ifindex, &link.name, &gre_device_alias(id, direction))
                .await
            {
                Ok(()) => removed.devices += 1,
                Err(e) => failures.push(e),
            }
        }
    }
    if failures.is_empty()
        && let Err(e) = maps::remove_pins(&kernel.paths)
    {
        failures.push(e);
    }
    (removed, failures)
}

/// An error and its causes on one line.
pub fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
