//! `vmsniff detach`: remove sessions and everything vmsniff created for them, eBPF and OVS.
use clap::Args;

use super::sessions::SessionArgs;
use crate::{model::sources::Sources, service::Service};

#[derive(Args, Debug)]
pub struct DetachArgs {
    #[command(flatten)]
    pub sessions: SessionArgs,
}

pub async fn run(sources: &Sources, args: DetachArgs) -> anyhow::Result<()> {
    let selection = args.sessions.selection("detach")?;
    let service = Service::open(sources.clone())?;
    let detached = service.detach(&selection).await?;
    for id in &detached.ebpf {
        log::info!("session {id} detached");
    }
    for id in &detached.ovs {
        log::info!("session {id} (OVS mirror) detached");
    }
    Ok(())
}
