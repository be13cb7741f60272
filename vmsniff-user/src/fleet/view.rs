//! What `fleet status` and `fleet nodes` say, from the records: pure, so that the rules (which
//! node runs a mirror, when a lost node is named) are unit-tested.
use serde::Serialize;
use serde_json::{Value, json};

use super::store::{FleetState, ReportCounters, Snapshot};

pub const STATUS_VERSION: u32 = 1;

/// A fleet mirror's state across the fleet.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum MirrorState {
    /// A live node runs its session.
    Active,
    /// Its VM is on no live node, or not running where it is.
    WaitingForVm,
    /// A node reports an error, or its record cannot be read.
    Error,
    /// The node that last ran it stopped reporting (its lease expired): it may still run there.
    NodeLost,
}

impl MirrorState {
    pub fn as_str(self) -> &'static str {
        match self {
            MirrorState::Active => "active",
            MirrorState::WaitingForVm => "waiting-for-vm",
            MirrorState::Error => "error",
            MirrorState::NodeLost => "node-lost",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct MirrorView {
    pub name: String,
    pub vm: Option<String>,
    pub args: Vec<String>,
    pub key: Option<u32>,
    pub state: MirrorState,
    /// The nodes that run it now (two during a migration's handover).
    pub nodes: Vec<String>,
    pub reason: Option<String>,
    pub session: Option<u32>,
    pub tap: Option<String>,
    pub counters: Option<ReportCounters>,
    /// The node that last made its session, and when (seconds since the epoch).
    pub placed_on: Option<String>,
    pub moved: Option<u64>,
}

/// Every declared mirror (or `only`), as the fleet runs it.
pub fn mirrors(snapshot: &Snapshot, only: Option<&str>) -> Vec<MirrorView> {
    let mut out = Vec::new();
    for (name, record) in &snapshot.mirrors {
        if only.is_some_and(|o| o != name) {
            continue;
        }
        let placed = snapshot.placed.get(name);
        let mut view = MirrorView {
            name: name.clone(),
            vm: None,
            args: Vec::new(),
            key: None,
            state: MirrorState::WaitingForVm,
            nodes: Vec::new(),
            reason: None,
            session: None,
            tap: None,
            counters: None,
            placed_on: placed.map(|p| p.node.clone()),
            moved: placed.map(|p| p.since),
        };
        let record = match record {
            Ok(record) => record,
            Err(why) => {
                view.state = MirrorState::Error;
                view.reason = Some(format!("its record cannot be read: {why}"));
                out.push(view);
                continue;
            }
        };
        view.vm = record.args.first().filter(|a| !a.starts_with("--")).cloned();
        view.args = record.args.clone();
        view.key = Some(record.key);
        let reports = snapshot.reports.get(name);
        let with = |state: FleetState| {
            reports.into_iter().flatten().filter(move |(_, r)| r.state == state).collect::<Vec<_>>()
        };
        let (active, errors, waiting) =
            (with(FleetState::Active), with(FleetState::Error), with(FleetState::WaitingForVm));
        if let Some((_, first)) = active.first() {
            view.state = MirrorState::Active;
            view.nodes = active.iter().map(|(n, _)| (*n).clone()).collect();
            view.session = first.session;
            view.tap = first.tap.clone();
            view.counters = first.counters;
        } else if let Some((node, report)) = errors.first() {
            view.state = MirrorState::Error;
            view.nodes = vec![(*node).clone()];
            view.reason = report.reason.as_ref().map(|r| format!("on {node}: {r}"));
            view.session = report.session;
        } else if let Some(p) = placed.filter(|p| !snapshot.nodes.contains_key(&p.node)) {
            view.state = MirrorState::NodeLost;
            view.reason = Some(format!(
                "node {}, which ran it, stopped reporting (its daemon's etcd lease expired): the \
                 mirror may still run there; it moves when its VM shows up on a live node",
                p.node
            ));
        } else if let Some((node, report)) = waiting.first() {
            view.nodes = vec![(*node).clone()];
            view.reason = report.reason.as_ref().map(|r| format!("on {node}: {r}"));
        } else {
            view.reason = Some("its VM is on no live node".into());
        }
        out.push(view);
    }
    out
}

pub fn status_json(views: &[MirrorView]) -> Value {
    json!({"version": STATUS_VERSION, "mirrors": views})
}

pub fn status_table(views: &[MirrorView]) -> String {
    let mut out = format!(
        "{:<16} {:<16} {:>6} {:<15} {:<14} {:>7} {:>12} {:>12}  {}\n",
        "NAME", "VM", "KEY", "NODE", "STATE", "SESSION", "OUT FRAMES", "IN FRAMES", "REASON"
    );
    for v in views {
        let dash = || "-".to_owned();
        out.push_str(&format!(
            "{:<16} {:<16} {:>6} {:<15} {:<14} {:>7} {:>12} {:>12}  {}\n",
            v.name,
            v.vm.clone().unwrap_or_else(dash),
            v.key.map_or_else(dash, |k| k.to_string()),
            if v.nodes.is_empty() { dash() } else { v.nodes.join(",") },
            v.state.as_str(),
            v.session.map_or_else(dash, |s| s.to_string()),
            v.counters.map_or_else(dash, |c| c.out_of_vm.frames.to_string()),
            v.counters.map_or_else(dash, |c| c.into_vm.frames.to_string()),
            v.reason.clone().unwrap_or_default(),
        ));
    }
    out
}

pub fn nodes_table(snapshot: &Snapshot) -> String {
    let mut out = format!("{:<20} {:<10} {:<24} {:>7}\n", "NODE", "VMSNIFF", "KERNEL", "ACTIVE");
    for (node, record) in &snapshot.nodes {
        let active = snapshot
            .reports
            .values()
            .filter(|by_node| by_node.get(node).is_some_and(|r| r.state == FleetState::Active))
            .count();
        out.push_str(&format!("{:<20} {:<10} {:<24} {:>7}\n", node, record.vmsniff, record.kernel, active));
    }
    out
}

pub fn nodes_json(snapshot: &Snapshot) -> Value {
    json!({"version": STATUS_VERSION, "nodes": snapshot.nodes.values().collect::<Vec<_>>()})
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::store::{MirrorRecord, NodeRecord, PlacedRecord, RECORD_VERSION, ReportRecord};

    fn snapshot() -> Snapshot {
        let mut s = Snapshot::default();
        s.mirrors.insert(
            "web".into(),
            Ok(MirrorRecord {
                version: RECORD_VERSION,
                name: "web".into(),
                args: vec!["c-web".into(), "--to".into(), "192.0.2.2".into()],
                key: 3,
                created: 0,
                updated: 0,
            }),
        );
        s
    }

    fn report(node: &str, state: FleetState) -> ReportRecord {
        ReportRecord {
            version: RECORD_VERSION,
            node: node.into(),
            state,
            reason: Some("why".into()),
            session: Some(1),
            tap: None,
            counters: None,
            updated: 0,
        }
    }

    fn node(name: &str) -> NodeRecord {
        NodeRecord {
            version: RECORD_VERSION,
            node: name.into(),
            vmsniff: "0".into(),
            kernel: "k".into(),
            started: 0,
        }
    }

    #[test]
    fn the_active_node_wins_and_a_lost_node_is_named() {
        let mut s = snapshot();
        assert_eq!(mirrors(&s, None)[0].state, MirrorState::WaitingForVm);
        s.placed.insert("web".into(), PlacedRecord { version: RECORD_VERSION, node: "cn1".into(), since: 5 });
        let lost = &mirrors(&s, None)[0];
        assert_eq!(lost.state, MirrorState::NodeLost);
        assert!(lost.reason.as_ref().unwrap().contains("cn1"));
        s.nodes.insert("cn2".into(), node("cn2"));
        let by_node = s.reports.entry("web".into()).or_default();
        by_node.insert("cn2".into(), report("cn2", FleetState::WaitingForVm));
        by_node.insert("cn3".into(), report("cn3", FleetState::Active));
        let v = &mirrors(&s, Some("web"))[0];
        assert_eq!((v.state, v.nodes.clone(), v.key), (MirrorState::Active, vec!["cn3".to_owned()], Some(3)));
        assert!(mirrors(&s, Some("other")).is_empty());
    }
}
