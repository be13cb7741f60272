//! `vmsniff list`: every VM NIC of this host, with its tap, plug, OVS port and mirror sessions.
use clap::Args;

use crate::{model::sources::Sources, service::inventory};

#[derive(Args, Debug)]
pub struct ListArgs {
    /// Print `{"version": 1, "nics": [...]}` instead of a table.
    #[arg(long)]
    pub json: bool,
}

pub async fn run(sources: &Sources, args: ListArgs) -> anyhow::Result<()> {
    let inventory = inventory::list(sources).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&inventory.to_json())?);
    } else {
        print!("{}", inventory.render_table());
    }
    Ok(())
}
