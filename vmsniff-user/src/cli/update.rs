//! `vmsniff update`: change a running session's filter, snaplen, sample and rate limit through
//! its maps: no detach, no gap in the mirror.
use clap::Args;

use super::sessions::SessionArgs;
use crate::{
    plan::{filter::compile, update::ControlChange},
    resolve::vm::Sources,
    service::{Service, flags::ControlArgs},
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

impl UpdateArgs {
    /// Checks and compiles everything, before any session is read or changed.
    fn change(&self) -> anyhow::Result<ControlChange> {
        let c = &self.controls;
        let filter = match (&c.filter, self.no_filter) {
            (Some(expression), _) => Some(Some(compile(expression)?)),
            (None, true) => Some(None),
            (None, false) => None,
        };
        Ok(ControlChange {
            filter,
            snaplen: c.snaplen.or(self.no_snaplen.then_some(0)),
            sample_every: c.sample,
            rate_limit: match (c.rate_limit, self.no_rate_limit) {
                (Some(limit), _) => Some(Some(limit)),
                (None, true) => Some(None),
                (None, false) => None,
            },
        })
    }
}

pub async fn run(sources: &Sources, args: UpdateArgs) -> anyhow::Result<()> {
    let change = args.change()?;
    if change.is_empty() {
        return Err(crate::service::UpdateError::Nothing.into());
    }
    let selection = args.sessions.selection("update")?;
    let service = Service::open(sources.clone())?;
    for id in service.update(&selection, &change).await? {
        log::info!("session {id} updated");
    }
    Ok(())
}
