//! `vmsniff detach`: remove sessions and everything vmsniff created for them.
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
    namespace.clean_orphans().await?;
    let observed = namespace.observe()?;
    let ids = args.sessions.select("detach", sources, &observed)?;
    namespace.detach(&ids).await?;
    for id in &ids {
        log::info!("session {id} detached");
    }
    Ok(())
}
