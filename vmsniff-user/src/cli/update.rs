//! `vmsniff update`: change a running session's filter, snaplen, sample and rate limit through
//! its maps: no detach, no gap in the mirror.
use clap::Args;

use super::sessions::SessionArgs;
use crate::{
    model::sources::Sources,
    service::{Service, UpdateError, flags::ControlArgs},
};

#[derive(Args, Debug)]
pub struct UpdateArgs {
    #[command(flatten)]
    pub sessions: SessionArgs,

    #[command(flatten)]
    pub controls: ControlArgs,

    /// Drop the filter: mirror every frame again.
    #[arg(long, conflicts_with = "filter")]
    pub no_filter: bool,

    /// Send whole frames again.
    #[arg(long, conflicts_with = "snaplen")]
    pub no_snaplen: bool,

    /// Drop the rate limit.
    #[arg(long, conflicts_with = "rate_limit")]
    pub no_rate_limit: bool,
}

pub async fn run(sources: &Sources, args: UpdateArgs) -> anyhow::Result<()> {
    let change = args.controls.change(args.no_filter, args.no_snaplen, args.no_rate_limit)?;
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
