//! `vmsniff detach`: remove sessions and everything vmsniff created for them, eBPF and OVS.
use clap::Args;

use super::sessions::SessionArgs;
use crate::{resolve::vm::Sources, session::Namespace};

#[derive(Args, Debug)]
pub struct DetachArgs {
    #[command(flatten)]
    pub sessions: SessionArgs,
}

pub async fn run(sources: &Sources, args: DetachArgs) -> anyhow::Result<()> {
    args.sessions.check()?;
    let namespace = Namespace::open()?;
    let _lock = namespace.lock()?;
    // Only --all can remove state this vmsniff cannot read: it needs no record of which session
    // is which. What is left afterwards (OVS sessions) is detached as usual.
    if args.sessions.all {
        namespace.remove_unreadable_state().await?;
    }
    namespace.clean_orphans().await?;
    let observed = namespace.observe()?;
    let ovs = super::ovs::select(sources, &args.sessions)?.filter(|(_, ids)| !ids.is_empty());
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
        super::ovs::detach(&mut client, &ids)?;
        for id in &ids {
            log::info!("session {id} (OVS mirror) detached");
        }
    }
    Ok(())
}
