//! `vmsniff fleet ...`: mirrors declared once in etcd, kept by every compute node's daemon.
//! Everything is checked (flags, name, key) before etcd is written, and each change is one
//! transaction.
use anyhow::Context as _;
use clap::{Args, Subcommand};

use crate::{
    fleet::{
        etcd::EtcdArgs,
        store::{Store, StoreError},
        view,
    },
    service::flags::{ChangeArgs, MirrorFlags},
};

#[derive(Args, Debug)]
pub struct FleetArgs {
    #[command(flatten)]
    pub etcd: EtcdArgs,

    #[command(subcommand)]
    pub command: FleetCommand,
}

#[derive(Subcommand, Debug)]
pub enum FleetCommand {
    /// Declare a mirror of a VM for the whole fleet: the node that runs the VM mirrors it, and
    /// the mirror follows the VM when it migrates. Prints the mirror's fleet-unique key K.
    Mirror(FleetMirrorArgs),
    /// Change a fleet mirror's --filter, --snaplen, --sample or --rate-limit, in place on
    /// whichever node runs it.
    Update(FleetUpdateArgs),
    /// Remove a fleet mirror: the node running it detaches it.
    Rm(NameArg),
    /// Every fleet mirror (or one): its VM, key, the node that runs it now, state, counters.
    Status(StatusArgs),
    /// The nodes whose daemons are alive, with their vmsniff version and kernel.
    Nodes(JsonArg),
}

#[derive(Args, Debug)]
pub struct FleetMirrorArgs {
    /// The mirror's name in the fleet (letters, digits, '-', '_', '.').
    #[arg(value_name = "NAME")]
    pub name: String,

    #[command(flatten)]
    pub flags: MirrorFlags,
}

#[derive(Args, Debug)]
pub struct FleetUpdateArgs {
    #[arg(value_name = "NAME")]
    pub name: String,

    #[command(flatten)]
    pub change: ChangeArgs,
}

#[derive(Args, Debug)]
pub struct NameArg {
    #[arg(value_name = "NAME")]
    pub name: String,
}

#[derive(Args, Debug)]
pub struct StatusArgs {
    #[arg(value_name = "NAME")]
    pub name: Option<String>,

    #[command(flatten)]
    pub json: JsonArg,
}

#[derive(Args, Debug)]
pub struct JsonArg {
    /// Print JSON (versioned; fields are added, never renamed).
    #[arg(long)]
    pub json: bool,
}

/// A Nova tap name (tap + the port id's first 11 characters) or libvirt's vnetN: per node.
fn looks_like_a_tap(selector: &str) -> bool {
    let hexish = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-');
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    selector.strip_prefix("tap").is_some_and(|rest| rest.len() == 11 && hexish(rest))
        || selector.strip_prefix("vnet").is_some_and(digits)
}

pub async fn run(args: FleetArgs) -> anyhow::Result<()> {
    let settings = args.etcd.settings();
    // Checked before etcd is reached: bad input fails the same with etcd up or down.
    match &args.command {
        FleetCommand::Mirror(m) => {
            let spec = m.flags.spec()?;
            crate::fleet::store::check_declaration(&m.name, &spec)?;
            if let Some(selector) = spec.nic.selector().filter(|s| looks_like_a_tap(s)) {
                return Err(StoreError::TapSelector(selector.to_owned()).into());
            }
        }
        FleetCommand::Update(u) => crate::fleet::store::check_name(&u.name)?,
        FleetCommand::Rm(n) => crate::fleet::store::check_name(&n.name)?,
        FleetCommand::Status(_) | FleetCommand::Nodes(_) => {}
    }
    let change = match &args.command {
        FleetCommand::Update(u) => {
            let change = u.change.change()?;
            if change.is_empty() {
                return Err(crate::service::UpdateError::Nothing.into());
            }
            Some(change)
        }
        _ => None,
    };
    let client = settings.connect().await?;
    let mut store = Store::new(client, &settings.prefix);
    match args.command {
        FleetCommand::Mirror(m) => {
            let spec = m.flags.spec()?;
            let record = store.declare(&m.name, &spec).await?;
            log::info!(
                "fleet mirror {} declared: {}, key {}; the node running the VM mirrors it",
                record.name,
                record.args.join(" "),
                record.key
            );
            print_out(&format!("{}\n", record.key))?;
        }
        FleetCommand::Update(u) => {
            let Some(change) = change else { return Ok(()) };
            let record = store.update(&u.name, &change).await?;
            log::info!("fleet mirror {} updated: {}", record.name, record.args.join(" "));
        }
        FleetCommand::Rm(n) => {
            let record = store.remove(&n.name).await?;
            log::info!("fleet mirror {} removed; key {} is free", record.name, record.key);
        }
        FleetCommand::Status(s) => {
            let snapshot = store.snapshot().await?;
            if let Some(name) = &s.name
                && !snapshot.mirrors.contains_key(name)
            {
                return Err(StoreError::Unknown(name.clone()).into());
            }
            let views = view::mirrors(&snapshot, s.name.as_deref());
            if s.json.json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&view::status_json(&views)).context("printing JSON")?
                );
            } else {
                print!("{}", view::status_table(&views));
            }
        }
        FleetCommand::Nodes(j) => {
            let snapshot = store.snapshot().await?;
            if j.json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&view::nodes_json(&snapshot)).context("printing JSON")?
                );
            } else {
                print!("{}", view::nodes_table(&snapshot));
            }
        }
    }
    Ok(())
}

/// Stdout, where a reader that went away (`| head`) ends the output quietly: SIGPIPE is
/// ignored for etcd's sake (see main.rs).
fn print_out(text: &str) -> anyhow::Result<()> {
    use std::io::Write as _;
    match std::io::stdout().lock().write_all(text.as_bytes()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => other.context("writing to stdout"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tap_names_are_recognised() {
        assert!(looks_like_a_tap("tapf7eae624-34"));
        assert!(looks_like_a_tap("vnet12"));
        assert!(!looks_like_a_tap("c-private"));
        assert!(!looks_like_a_tap("tapestry"));
    }
}
