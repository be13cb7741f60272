//! `vmsniff update`: change a running session's filter, snaplen, sample and rate limit through
//! its maps: no detach, no gap in the mirror.
use clap::Args;

use super::sessions::SessionArgs;
use crate::{
    model::sources::Sources,
    service::{Service, UpdateError, flags::ChangeArgs},
};

#[derive(Args, Debug)]
pub struct UpdateArgs {
    #[command(flatten)]
    pub sessions: SessionArgs,

    #[command(flatten)]
    pub change: ChangeArgs,
}

pub async fn run(sources: &Sources, args: UpdateArgs) -> anyhow::Result<()> {
    let change = args.change.change()?;
    if change.is_empty() {
        return Err(UpdateError::Nothing.into());
    }
    let selection = args.sessions.selection("update")?;
    let service = Service::open(sources.clone())?;
    for id in service.update(&selection, &change).await? {
        log::info!("session {id} updated");
    }
    Ok(())
}
