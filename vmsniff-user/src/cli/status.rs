//! `vmsniff status`: every session with its counters, as a table or versioned JSON.
use clap::Args;

use crate::{apply::maps::PinnedMaps, observe::status, session::Namespace};

#[derive(Args, Debug)]
pub struct StatusArgs {
    /// Print `{"version": 1, "sessions": [...]}` instead of a table.
    #[arg(long)]
    pub json: bool,
}

pub async fn run(args: StatusArgs) -> anyhow::Result<()> {
    let namespace = Namespace::open_for_reading()?;
    let maps = PinnedMaps::open(&namespace.kernel.paths)?;
    let observed = namespace.observe()?;
    let status = status::read(&namespace.kernel.netlink, maps.as_ref(), &observed).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&status)?);
    } else {
        print!("{}", status::render_table(&status));
    }
    Ok(())
}
