//! `vmsniff attach`: start a persistent mirror, print its session id.
use anyhow::bail;
use clap::Args;

use crate::{
    model::{mirror::Mode, sources::Sources},
    service::{Keeper, Service, flags::MirrorFlags},
};

#[derive(Args, Debug)]
pub struct AttachArgs {
    #[command(flatten)]
    pub flags: MirrorFlags,

    /// With --mode ovs: print the OVSDB transaction and the equivalent ovs-vsctl command, and
    /// change nothing.
    #[arg(long)]
    pub dry_run: bool,
}

impl AttachArgs {
    /// Refuses `--mode ovs` and `--dry-run` where only eBPF mode applies.
    pub fn require_ebpf(&self, command: &str) -> anyhow::Result<()> {
        if self.flags.mode == Mode::Ovs {
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
    if args.flags.mode == Mode::Ebpf {
        args.require_ebpf("attach")?;
    }
    let spec = args.flags.spec()?;
    if args.dry_run {
        let service = Service::open_for_reading(sources.clone())?;
        let dry = service.ovs_dry_run(&spec).await?;
        println!("{}", dry.transaction);
        println!("\n# The same change with ovs-vsctl:\n{}", dry.vsctl);
        log::info!("dry run: session {} would mirror {}; nothing was changed", dry.id, dry.what);
        return Ok(());
    }
    let service = Service::open(sources.clone())?;
    let attached = service.attach(&spec, &Keeper::Command).await?;
    log::info!("session {}: mirroring {}", attached.id, attached.what);
    // The id alone on stdout, so that `S=$(vmsniff attach ...)` works.
    println!("{}", attached.id);
    Ok(())
}
