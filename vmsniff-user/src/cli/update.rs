//! `vmsniff update`: change a running session's filter, snaplen, sample and rate limit through
//! its maps: no detach, no gap in the mirror.
use anyhow::{Context, bail};
use clap::Args;

use super::{controls::ControlArgs, sessions::SessionArgs};
use crate::{
    apply::executor::apply_update,
    plan::{
        filter::compile,
        update::{ControlChange, plan_update},
    },
    resolve::vm::Sources,
    service::namespace::Namespace,
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
        let change = ControlChange {
            filter,
            snaplen: c.snaplen.or(self.no_snaplen.then_some(0)),
            sample_every: c.sample,
            rate_limit: match (c.rate_limit, self.no_rate_limit) {
                (Some(limit), _) => Some(Some(limit)),
                (None, true) => Some(None),
                (None, false) => None,
            },
        };
        if change.is_empty() {
            bail!(
                "nothing to change: give --filter, --snaplen, --sample or --rate-limit (or --no-filter, \
                 --no-snaplen, --no-rate-limit)"
            );
        }
        Ok(change)
    }
}

pub async fn run(sources: &Sources, args: UpdateArgs) -> anyhow::Result<()> {
    let change = args.change()?;
    args.sessions.check()?;
    let namespace = Namespace::open()?;
    let _lock = namespace.lock()?;
    namespace.clean_orphans().await?;
    let observed = namespace.observe()?;
    let ids = args.sessions.select("update", sources, &observed)?;
    // Plan every session first: one that cannot change stops the command before any has.
    let plans = ids
        .iter()
        .map(|&id| plan_update(id, &observed.sessions[&id], &change))
        .collect::<Result<Vec<_>, _>>()?;
    for plan in &plans {
        apply_update(&namespace.kernel, plan).with_context(|| format!("updating session {}", plan.id))?;
        log::info!("session {} updated", plan.id);
    }
    Ok(())
}
