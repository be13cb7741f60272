//! `vmsniff status`: every session with its counters, as a table or versioned JSON; with a VM,
//! only that VM's sessions.
use clap::Args;

use super::target::NicArgs;
use crate::{
    daemon::state::DaemonState,
    observe::status,
    plan::detach::ifname,
    resolve::vm::{Sources, vm_taps},
    service::namespace::Namespace,
    sys::maps::PinnedMaps,
};

#[derive(Args, Debug)]
pub struct StatusArgs {
    /// Only the sessions of this VM (Nova name, UUID, libvirt domain, MAC or tap).
    #[arg(value_name = "VM")]
    pub vm: Option<String>,

    #[command(flatten)]
    pub nic: NicArgs,

    /// Print `{"version": 1, "sessions": [...]}` instead of a table.
    #[arg(long)]
    pub json: bool,

    #[command(flatten)]
    pub run_dir: super::daemon::RunDirArg,
}

pub async fn run(sources: &Sources, args: StatusArgs) -> anyhow::Result<()> {
    let namespace = Namespace::open_for_reading()?;
    let lock = crate::sys::bpffs::read_lock()?;
    let maps = PinnedMaps::open(&namespace.kernel.paths)?;
    let observed = namespace.observe()?;
    let mut status = status::read(&namespace.kernel.netlink, maps.as_ref(), &observed).await?;
    drop(lock);
    crate::observe::vm_names::fill(&mut status, sources);
    let mut ovs = crate::service::ovs::status(sources);
    if let Some(vm) = &args.vm {
        let recorded = |name: &str| {
            observed.taps.values().any(|t| ifname(&t.ifname) == name)
                || ovs.iter().any(|s| s.tap.as_deref() == Some(name))
        };
        // A tap's own name needs no libvirt; the VM may be gone and its sessions still here.
        let taps = if args.nic.choice() == crate::resolve::select::NicChoice::Unspecified && recorded(vm) {
            vec![vm.clone()]
        } else {
            vm_taps(sources, vm, args.nic.choice())?
        };
        status.sessions.retain(|s| taps.contains(&s.tap));
        ovs.retain(|s| s.tap.as_ref().is_some_and(|t| taps.contains(t)));
    } else if args.nic.nic.is_some() || args.nic.mac.is_some() {
        anyhow::bail!(
            "--nic and --mac choose among a VM's NICs: name the VM too (vmsniff status VM --nic N)"
        );
    }
    let daemon = daemon_state(&args.run_dir.run_dir);
    if args.json {
        let mut merged = crate::service::ovs::merge_json(serde_json::to_value(&status)?, &ovs)?;
        merged["daemon"] = serde_json::to_value(&daemon)?;
        println!("{}", serde_json::to_string_pretty(&merged)?);
        return Ok(());
    }
    if ovs.is_empty() && daemon.is_none() {
        print!("{}", status::render_table(&status));
        return Ok(());
    }
    if !status.sessions.is_empty() || ovs.is_empty() {
        println!("{}", status::render_table(&status));
    }
    if !ovs.is_empty() {
        print!("{}", crate::ovs::status::render_table(&ovs));
    }
    if let Some(daemon) = daemon {
        if !ovs.is_empty() {
            println!();
        }
        print!("{}", daemon.render_table());
    }
    Ok(())
}

/// The state of a daemon of this network namespace, if one runs or left mirrors to adopt.
fn daemon_state(run_dir: &std::path::Path) -> Option<DaemonState> {
    let netns = crate::sys::netns::current_inode().ok()?;
    match DaemonState::read(run_dir) {
        Ok(state) => state.filter(|s| s.netns == netns),
        Err(e) => {
            log::warn!(
                "the daemon's sessions are not shown: reading its state in {}: {e}",
                run_dir.display()
            );
            None
        }
    }
}
