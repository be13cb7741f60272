//! `vmsniff attach`: start a persistent mirror, print its session id.
use anyhow::bail;
use clap::Args;

use super::{controls::ControlArgs, target::MirrorArgs};
use crate::{
    model::mirror::{Owner, Tap},
    plan::request::AttachRequest,
    resolve::vm::{Resolved, Sources},
    service::namespace::{Namespace, tcx_supported},
};

#[derive(Args, Debug)]
pub struct AttachArgs {
    #[command(flatten)]
    pub mirror: MirrorArgs,

    #[command(flatten)]
    pub controls: ControlArgs,

    /// `ebpf`: tc programs on the tap clone the frames (every plug, all controls). `ovs`: an Open
    /// vSwitch Mirror on the VM's OVS port with a GRE output port, as `ovs-vsctl create mirror`
    /// makes it (OVS plugs only).
    #[arg(long, value_enum, default_value_t = crate::model::mirror::Mode::Ebpf)]
    pub mode: crate::model::mirror::Mode,

    /// With --mode ovs: print the OVSDB transaction and the equivalent ovs-vsctl command, and
    /// change nothing.
    #[arg(long)]
    pub dry_run: bool,
}

impl AttachArgs {
    /// Refuses `--mode ovs` and `--dry-run` where only eBPF mode applies.
    pub fn require_ebpf(&self, command: &str) -> anyhow::Result<()> {
        if self.mode == crate::model::mirror::Mode::Ovs {
            bail!(
                "`vmsniff {command}` runs eBPF mode only: an OVS mirror persists by itself; use `vmsniff attach --mode ovs`"
            );
        }
        if self.dry_run {
            bail!("--dry-run prints the OVSDB transaction of --mode ovs; eBPF mode has none to print");
        }
        Ok(())
    }
}

pub async fn run(sources: &Sources, args: AttachArgs) -> anyhow::Result<()> {
    if args.mode == crate::model::mirror::Mode::Ovs {
        return crate::service::ovs::attach(sources, args).await;
    }
    args.require_ebpf("attach")?;
    let namespace = Namespace::open()?;
    let (id, _) = attach(&namespace, sources, &args.mirror, &args.controls, Owner::Persistent).await?;
    // The id alone on stdout, so that `S=$(vmsniff attach ...)` works.
    println!("{id}");
    Ok(())
}

/// Resolves the arguments and attaches, holding the lock; `owner` says who keeps the session.
pub async fn attach(
    namespace: &Namespace,
    sources: &Sources,
    args: &MirrorArgs,
    controls: &ControlArgs,
    owner: Owner,
) -> anyhow::Result<(u32, AttachRequest)> {
    let resolved = args.resolve(sources, &namespace.kernel.netlink).await?;
    attach_resolved(namespace, sources, args, controls, &resolved, owner).await
}

/// Attaches to a tap resolved already, holding the lock.
pub async fn attach_resolved(
    namespace: &Namespace,
    sources: &Sources,
    args: &MirrorArgs,
    controls: &ControlArgs,
    resolved: &Resolved,
    owner: Owner,
) -> anyhow::Result<(u32, AttachRequest)> {
    let controls = controls.controls()?;
    let netlink = &namespace.kernel.netlink;
    let tap = Tap { ifindex: resolved.tap().ifindex, name: resolved.tap().name.clone() };
    let target = args.target(netlink, args.encap()?).await?;
    let request = AttachRequest {
        tap,
        target,
        key: args.key,
        directions: args.direction,
        controls,
        mode: args.attach_mode.unwrap_or_default(),
        tcx_supported: tcx_supported(),
        owner,
        now: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
    };
    let _lock = namespace.lock()?;
    namespace.clean_orphans().await?;
    let (id, key) = namespace.attach(&request, crate::service::ovs::reserved_ids(sources)).await?;
    log::info!(
        "session {id}: mirroring {} ({}) of {} to {}{}",
        request.directions.as_str(),
        direction_words(request.directions),
        describe(resolved),
        request.target,
        match request.target {
            crate::model::mirror::Target::Gre { encap: crate::model::wire::Encap::Gre, .. } =>
                format!(", GRE key {key} (wire keys {} out, {} in)", key * 2, key * 2 + 1),
            crate::model::mirror::Target::Gre { .. } => format!(", ERSPAN session id {key}"),
            crate::model::mirror::Target::LocalDev { .. } => String::new(),
        }
    );
    Ok((id, request))
}

pub fn direction_words(directions: crate::model::mirror::Directions) -> &'static str {
    use crate::model::mirror::Directions;
    match directions {
        Directions::In => "frames going into the VM",
        Directions::Out => "frames the VM sends",
        Directions::Both => "frames the VM sends and receives",
    }
}

/// "tapX", or "VM c-private NIC 0 (tapX)".
pub fn describe(resolved: &Resolved) -> String {
    match resolved {
        Resolved::Nic { vm, nic, tap } => {
            format!("VM {} NIC {} ({})", vm.display_name(), nic.index, tap.name)
        }
        Resolved::Interface { tap } => tap.name.clone(),
    }
}
