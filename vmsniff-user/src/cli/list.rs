//! `vmsniff list`: every VM NIC of this host, with its tap, plug, OVS port and mirror sessions.
use std::collections::BTreeMap;

use clap::Args;
use serde_json::json;

use crate::{
    model::error::chain,
    observe::inventory::{self, LIST_VERSION},
    resolve::{
        domain::Plug,
        libvirt::{Libvirt, Vm},
        vm::{OvsView, Sources},
    },
    service::namespace::Namespace,
};

#[derive(Args, Debug)]
pub struct ListArgs {
    /// Print `{"version": 1, "nics": [...]}` instead of a table.
    #[arg(long)]
    pub json: bool,
}

pub async fn run(sources: &Sources, args: ListArgs) -> anyhow::Result<()> {
    let vms = Libvirt::open(sources.libvirt.clone())?.vms()?;
    let ovs = read_ovs(sources, &vms);
    let sessions = read_sessions();
    let rows = inventory::rows(&vms, &ovs, sessions.as_ref());
    if args.json {
        println!("{}", serde_json::to_string_pretty(&json!({"version": LIST_VERSION, "nics": rows}))?);
    } else {
        print!("{}", inventory::render_table(&rows));
    }
    Ok(())
}

/// OVSDB, read only when some NIC can be on OVS; says on stderr when it cannot be read.
pub fn read_ovs(sources: &Sources, vms: &[Vm]) -> OvsView {
    let ovs = OvsView::read(sources);
    let on_ovs = vms
        .iter()
        .flat_map(|vm| &vm.xml.nics)
        .any(|n| matches!(n.plug, Plug::Hybrid { .. } | Plug::Ovs { .. } | Plug::Ethernet));
    if let OvsView::Unreachable(e) = &ovs
        && on_ovs
    {
        log::warn!(
            "{}: OVS ports follow Nova's naming convention (tapXXXX -> qvoXXXX), unchecked (marked *)",
            chain(e)
        );
    }
    ovs
}

/// Mirror sessions by tap, if this process may read vmsniff's state.
pub fn read_sessions() -> Option<BTreeMap<String, Vec<u32>>> {
    let observed = Namespace::open_for_reading().and_then(|namespace| namespace.observe());
    match observed {
        Ok(observed) => Some(inventory::sessions_by_tap(&observed)),
        Err(e) => {
            log::warn!("mirror sessions are not shown: {}", chain(&e));
            None
        }
    }
}
