//! What runs on this host, read only: every VM NIC (`list`), one VM's NICs with the path their
//! frames take (`show`), and the tap of a VM to capture on (`capture`). No privilege is needed
//! beyond what libvirt and netlink ask: vmsniff's sessions are shown when they can be read.
use std::collections::BTreeMap;

use anyhow::Context as _;
use serde::Serialize;
use serde_json::{Value, json};

pub use crate::observe::{inventory::NicRow, path::Hop};
use crate::{
    model::{error::chain, mirror::NicChoice, sources::Sources},
    observe::{
        inventory::{LIST_VERSION, nic_row, rows, sessions_by_tap},
        path::frame_path,
    },
    resolve::{
        domain::Plug,
        libvirt::Vm,
        select::{chosen_nics, find_vm},
        vm::{OvsView, ResolveError, Resolved, read_vms, resolve_tap},
    },
    service::namespace::Namespace,
    sys::{blocking::off_thread, netlink::Netlink},
};

/// Every VM NIC of this host, one row each.
pub struct Inventory {
    pub rows: Vec<NicRow>,
}

/// One NIC of `show`, with its frames' path checked now.
#[derive(Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct ShownNic {
    #[serde(flatten)]
    pub row: NicRow,
    pub path: Vec<Hop>,
}

/// A VM as `show` prints it.
pub struct Shown {
    pub vm: Vm,
    pub nics: Vec<ShownNic>,
}

impl Inventory {
    pub fn to_json(&self) -> Value {
        json!({"version": LIST_VERSION, "nics": self.rows})
    }

    /// The table `vmsniff list` prints.
    pub fn render_table(&self) -> String {
        crate::observe::inventory::render_table(&self.rows)
    }
}

impl Shown {
    pub fn to_json(&self) -> Value {
        let vm = &self.vm;
        json!({
            "version": LIST_VERSION,
            "vm": {"nova-name": vm.nova_name(), "domain": vm.xml.name, "uuid": vm.xml.uuid, "state": vm.state},
            "nics": self.nics,
        })
    }
}

/// `list`: every domain's NICs.
pub async fn list(sources: &Sources) -> anyhow::Result<Inventory> {
    let vms = read_vms(sources).await?;
    let ovs = read_ovs(sources, &vms).await;
    let sessions = read_sessions();
    Ok(Inventory { rows: rows(&vms, &ovs, sessions.as_ref()) })
}

/// `show`: one VM's NICs (or the one chosen), each with its path.
pub async fn show(sources: &Sources, selector: &str, choice: NicChoice) -> anyhow::Result<Shown> {
    let vms = read_vms(sources).await?;
    let found = find_vm(&vms, selector)?;
    let nics = chosen_nics(selector, &found, choice)?;
    let vm = found.vm;
    let ovs = read_ovs(sources, std::slice::from_ref(vm)).await;
    let sessions = read_sessions();
    let netlink = Netlink::open().context("opening a netlink socket")?;
    let mut shown = Vec::new();
    for nic in nics {
        let row = nic_row(vm, nic, &ovs, sessions.as_ref());
        let path = if vm.state.has_taps() {
            frame_path(&netlink, nic, &ovs, row.ovs_port.as_ref()).await.context("reading the interfaces")?
        } else {
            Vec::new()
        };
        shown.push(ShownNic { row, path });
    }
    Ok(Shown { vm: vm.clone(), nics: shown })
}

/// `capture`: the tap of a VM, or an interface named directly.
pub async fn capture_tap(
    sources: &Sources,
    selector: Option<&str>,
    tap: Option<&str>,
    choice: NicChoice,
) -> anyhow::Result<Resolved> {
    let netlink = Netlink::open().context("opening a netlink socket")?;
    let resolved: Result<Resolved, ResolveError> =
        resolve_tap(sources, &netlink, selector, tap, choice).await;
    Ok(resolved?)
}

/// OVSDB, read only when some NIC can be on OVS; says on stderr when it cannot be read.
async fn read_ovs(sources: &Sources, vms: &[Vm]) -> OvsView {
    let on_ovs = vms
        .iter()
        .flat_map(|vm| &vm.xml.nics)
        .any(|n| matches!(n.plug, Plug::Hybrid { .. } | Plug::Ovs { .. } | Plug::Ethernet));
    let sources = sources.clone();
    let ovs = off_thread(move || OvsView::read(&sources)).await;
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
fn read_sessions() -> Option<BTreeMap<String, Vec<u32>>> {
    let observed = Namespace::open_for_reading().and_then(|namespace| namespace.observe());
    match observed {
        Ok(observed) => Some(sessions_by_tap(&observed)),
        Err(e) => {
            log::warn!("mirror sessions are not shown: {}", chain(&e));
            None
        }
    }
}
