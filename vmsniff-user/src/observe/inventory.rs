//! The VM NICs of this host, one row each, as `list` and `show` print them: what libvirt says,
//! where OVS has the NIC, and which mirror sessions run on its tap.
use std::collections::BTreeMap;

use serde::Serialize;

use crate::{
    model::{mac::Mac, observed::Observed},
    ovsdb::vswitch::{FoundBy, OvsAttachment},
    plan::detach::ifname,
    resolve::{
        domain::{Nic, Plug},
        libvirt::{Vm, VmState},
        vm::{OvsView, port_id},
    },
};

/// Bumped only when a field is renamed or removed; fields are added freely.
pub const LIST_VERSION: u32 = 1;

#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct NicRow {
    pub nova_name: Option<String>,
    pub domain: String,
    pub uuid: String,
    pub state: VmState,
    pub nic: usize,
    pub mac: Option<Mac>,
    pub tap: Option<String>,
    /// hybrid, ovs, bridge, ethernet; or the libvirt interface type that cannot be mirrored.
    pub plug: String,
    /// The `<source bridge>` of the NIC: qbrXXXX, br-int, a Linux bridge.
    pub bridge: Option<String>,
    /// The Neutron port id, when the XML or Nova's metadata tells it.
    pub port_id: Option<String>,
    pub ovs_port: Option<OvsAttachment>,
    /// Mirror sessions on the tap; `None` when vmsniff's state could not be read.
    pub sessions: Option<Vec<u32>>,
    /// Why this NIC cannot be mirrored, if it cannot.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cannot_mirror: Option<&'static str>,
}

/// Tap name → its mirror sessions, from vmsniff's pinned state.
pub fn sessions_by_tap(observed: &Observed) -> BTreeMap<String, Vec<u32>> {
    let mut by_tap: BTreeMap<String, Vec<u32>> = BTreeMap::new();
    for tap in observed.taps.values() {
        let ids = tap.ids.iter().filter(|&&id| id != 0).map(|&id| u32::from(id));
        by_tap.entry(ifname(&tap.ifname)).or_default().extend(ids);
    }
    by_tap
}

pub fn nic_row(vm: &Vm, nic: &Nic, ovs: &OvsView, sessions: Option<&BTreeMap<String, Vec<u32>>>) -> NicRow {
    NicRow {
        nova_name: vm.nova_name().map(str::to_owned),
        domain: vm.xml.name.clone(),
        uuid: vm.xml.uuid.clone(),
        state: vm.state,
        nic: nic.index,
        mac: nic.mac,
        tap: nic.target_dev.clone(),
        plug: nic.plug.kind(nic),
        bridge: nic.source_bridge.clone(),
        port_id: port_id(vm, nic),
        ovs_port: ovs.attachment(vm, nic),
        sessions: sessions.map(|by_tap| {
            nic.target_dev.as_ref().and_then(|tap| by_tap.get(tap)).cloned().unwrap_or_default()
        }),
        cannot_mirror: match nic.plug {
            Plug::Unmirrorable { why } => Some(why),
            _ => None,
        },
    }
}

pub fn rows(vms: &[Vm], ovs: &OvsView, sessions: Option<&BTreeMap<String, Vec<u32>>>) -> Vec<NicRow> {
    vms.iter().flat_map(|vm| vm.xml.nics.iter().map(move |nic| nic_row(vm, nic, ovs, sessions))).collect()
}

/// The OVS port column: its name, `*` when only named by convention.
pub fn ovs_port_cell(row: &NicRow) -> String {
    match &row.ovs_port {
        Some(a) if a.found_by == FoundBy::NamingConvention => format!("{}*", a.interface),
        Some(a) => match &a.bridge {
            Some(bridge) => format!("{}@{bridge}", a.interface),
            None => a.interface.clone(),
        },
        None => "-".into(),
    }
}

impl NicRow {
    /// The sessions column: ids, `-` for none, `?` when vmsniff's state could not be read.
    pub fn sessions_cell(&self) -> String {
        match &self.sessions {
            None => "?".into(),
            Some(ids) if ids.is_empty() => "-".into(),
            Some(ids) => ids.iter().map(u32::to_string).collect::<Vec<_>>().join(","),
        }
    }
}

/// The table `vmsniff list` prints.
pub fn render_table(rows: &[NicRow]) -> String {
    if rows.is_empty() {
        return "no VM NICs on this host\n".into();
    }
    let cells: Vec<[String; 10]> = rows
        .iter()
        .map(|r| {
            [
                r.nova_name.clone().unwrap_or_else(|| "-".into()),
                r.domain.clone(),
                r.uuid.clone(),
                r.state.as_str().into(),
                r.nic.to_string(),
                r.mac.map_or("-".into(), |m| m.to_string()),
                r.tap.clone().unwrap_or_else(|| "-".into()),
                r.plug.clone(),
                ovs_port_cell(r),
                r.sessions_cell(),
            ]
        })
        .collect();
    let header = ["NAME", "DOMAIN", "UUID", "STATE", "NIC", "MAC", "TAP", "PLUG", "OVS PORT", "SESSIONS"];
    let mut widths = header.map(str::len);
    for row in &cells {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: &[&str]| {
        let mut out = String::new();
        for (i, (cell, w)) in cells.iter().zip(widths).enumerate() {
            if i + 1 == cells.len() {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:<w$}  "));
            }
        }
        out.push('\n');
        out
    };
    let mut out = line(&header);
    for row in &cells {
        out.push_str(&line(&row.iter().map(String::as_str).collect::<Vec<_>>()));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ovsdb::OvsdbError, resolve::libvirt::tests::fixture_vms};

    #[test]
    fn one_row_per_nic_with_sessions_and_guessed_ports_marked() {
        let vms = fixture_vms();
        let ovs = OvsView::Unreachable(OvsdbError::NoSocket);
        let sessions = BTreeMap::from([("tapf7eae624-34".to_string(), vec![3, 4])]);
        let rows = rows(&vms, &ovs, Some(&sessions));
        assert_eq!(rows.len(), vms.iter().map(|v| v.xml.nics.len()).sum::<usize>());
        let table = render_table(&rows);
        let private0 = table.lines().find(|l| l.contains("tapf7eae624-34")).unwrap();
        for cell in [
            "c-private",
            "instance-00000003",
            "running",
            "fa:16:3e:11:22:33",
            "hybrid",
            "qvof7eae624-34*",
            "3,4",
        ] {
            assert!(private0.contains(cell), "{cell} missing from {private0}");
        }
        let dpdk = rows.iter().find(|r| r.nova_name.as_deref() == Some("c-dpdk")).unwrap();
        assert_eq!(dpdk.plug, "vhostuser");
        assert!(dpdk.cannot_mirror.is_some());
        let json =
            serde_json::to_value(rows.iter().find(|r| r.tap.as_deref() == Some("tapf7eae624-34")).unwrap())
                .unwrap();
        for key in
            ["nova-name", "domain", "uuid", "state", "nic", "mac", "tap", "plug", "ovs-port", "sessions"]
        {
            assert!(json.get(key).is_some(), "{key} missing from {json}");
        }
        assert_eq!(json["ovs-port"]["found-by"], "naming-convention");
        assert_eq!(json["state"], "running");
        assert_eq!(json["sessions"], serde_json::json!([3, 4]));
        // Unknown session state reads as "?", not as "none".
        assert_eq!(nic_row(&vms[0], &vms[0].xml.nics[0], &ovs, None).sessions_cell(), "?");
    }
}
