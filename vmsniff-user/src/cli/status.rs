//! `vmsniff status`: every session with its counters, as a table or versioned JSON; with a VM,
//! only that VM's sessions.
use clap::Args;

use crate::{
    daemon::state::DaemonState,
    model::{mirror::NicChoice, sources::Sources},
    service::{Service, current_netns, flags::NicArgs},
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
    if args.vm.is_none() && args.nic.choice() != NicChoice::Unspecified {
        anyhow::bail!(
            "--nic and --mac choose among a VM's NICs: name the VM too (vmsniff status VM --nic N)"
        );
    }
    let service = Service::open_for_reading(sources.clone())?;
    let report = service.status(args.vm.as_deref().map(|vm| (vm, args.nic.choice()))).await?;
    let daemon = daemon_state(&args.run_dir.run_dir);
    if args.json {
        let mut merged = report.to_json()?;
        merged["daemon"] = serde_json::to_value(&daemon)?;
        println!("{}", serde_json::to_string_pretty(&merged)?);
        return Ok(());
    }
    let (status, ovs) = (&report.ebpf, &report.ovs);
    if ovs.is_empty() && daemon.is_none() {
        print!("{}", status.render_table());
        return Ok(());
    }
    if !status.sessions.is_empty() || ovs.is_empty() {
        println!("{}", status.render_table());
    }
    if !ovs.is_empty() {
        print!("{}", report.ovs_table());
    }
    if let Some(daemon) = daemon {
        if !ovs.is_empty() {
            println!();
        }
        print!("{}", daemon.render_table(&args.run_dir.run_dir));
    }
    Ok(())
}

/// The state of a daemon of this network namespace, if one runs or left mirrors to adopt.
fn daemon_state(run_dir: &std::path::Path) -> Option<DaemonState> {
    let netns = current_netns().ok()?;
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
