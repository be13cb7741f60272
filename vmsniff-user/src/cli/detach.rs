//! `vmsniff detach`: remove sessions and everything vmsniff created for them, eBPF and OVS.
use clap::Args;

use super::sessions::SessionArgs;
use crate::{resolve::vm::Sources, service::namespace::Namespace};

#[derive(Args, Debug)]
pub struct DetachArgs {
    #[command(flatten)]
    pub sessions: SessionArgs,
}

pub async fn run(sources: &Sources, args: DetachArgs) -> anyhow::Result<()> {
    args.sessions.check()?;
    let namespace = Namespace::open()?;
    let _lock = namespace.lock()?;
    namespace.clean_orphans().await?;
    let observed = namespace.observe()?;
    let ovs = crate::service::ovs::select(sources, &args.sessions)?.filter(|(_, ids)| !ids.is_empty());
    let ids = match args.sessions.select("detach", sources, &observed) {
        Ok(ids) => ids,
        // What named OVS sessions only matches no eBPF session.
        Err(_) if ovs.is_some() => Default::default(),
        Err(e) => return Err(e),
    };
    if !ids.is_empty() {
        namespace.detach(&ids).await?;
    }
    for id in &ids {
        log::info!("session {id} detached");
    }
    if let Some((mut client, ids)) = ovs {
        crate::service::ovs::detach(&mut client, &ids)?;
        for id in &ids {
            log::info!("session {id} (OVS mirror) detached");
        }
    }
    Ok(())
}
