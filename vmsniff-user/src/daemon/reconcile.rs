//! Planning the daemon's reconcile: the config's sessions (desired), where each VM's tap is now
//! (placements), what the daemon last applied (records) and vmsniff's kernel state (observed)
//! → actions. Level-triggered: the same inputs give the same actions however often it runs, and
//! a world that already matches gives none.
use std::collections::{BTreeMap, BTreeSet};

use vmsniff_ebpf::daemon_tag;

use crate::{
    model::{mirror::Tap, observed::Observed},
    service::{MirrorSpec, ovs::OvsSession, spec::LIVE_KEYS},
};

/// Where a config session's VM NIC is now: its tap (eBPF sessions) or its OVS port (OVS
/// sessions).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Placement<T = Tap> {
    Here(T),
    /// Not here now (VM stopped, migrated away, not defined or not plugged yet): the session
    /// waits for it.
    Waiting(String),
    /// Cannot be resolved in a way waiting fixes (ambiguous name, unmirrorable NIC, libvirt
    /// unreachable): the operator has to act.
    Error(String),
}

/// The OVS port a NIC's frames cross, for an OVS session.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OvsPort {
    pub bridge: String,
    pub port: String,
    pub tap: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Create the session on `tap`.
    Attach { name: String, tap: Tap },
    /// Move session `id` to its VM's new tap, keeping id and counters.
    Rehome { name: String, id: u32, tap: Tap },
    /// Write the session's new filter, snaplen, sample and rate limit in place.
    Update { name: String, id: u32 },
    /// Remove session `id`: its config session is gone, or changed in a way only a new
    /// session can carry (`name` is then the config session it belonged to).
    Detach { name: Option<String>, id: u32 },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OvsAction {
    /// Create the session on its VM's OVS port.
    Attach { name: String, port: OvsPort },
    /// Point session `id`'s Mirror at its VM's port again (the port was deleted and added back),
    /// keeping id, GRE port and statistics.
    Reselect { name: String, id: u32, port: OvsPort },
    /// Remove session `id`'s rows, as for [`Action::Detach`].
    Detach { name: Option<String>, id: u32 },
}

impl Action {
    /// The config session it is for (`None`: a session of no config session).
    pub fn name(&self) -> Option<&str> {
        match self {
            Action::Attach { name, .. } | Action::Rehome { name, .. } | Action::Update { name, .. } => {
                Some(name)
            }
            Action::Detach { name, .. } => name.as_deref(),
        }
    }

    /// Whether a failure is tried again later (a detach is planned anew by every pass).
    pub fn retried(&self) -> bool {
        !matches!(self, Action::Detach { .. })
    }
}

impl OvsAction {
    pub fn name(&self) -> Option<&str> {
        match self {
            OvsAction::Attach { name, .. } | OvsAction::Reselect { name, .. } => Some(name),
            OvsAction::Detach { name, .. } => name.as_deref(),
        }
    }

    pub fn retried(&self) -> bool {
        !matches!(self, OvsAction::Detach { .. })
    }
}

/// The daemon's sessions in the kernel, by config name; tags no config session has are under
/// `None`.
pub fn daemon_sessions<'a>(
    names: impl IntoIterator<Item = &'a String>,
    observed: &Observed,
) -> BTreeMap<Option<String>, Vec<u32>> {
    let by_tag: BTreeMap<u32, &String> = names.into_iter().map(|n| (daemon_tag(n), n)).collect();
    let mut out: BTreeMap<Option<String>, Vec<u32>> = BTreeMap::new();
    for (&id, session) in &observed.sessions {
        if session.daemon_tag != 0 {
            out.entry(by_tag.get(&session.daemon_tag).map(|n| (*n).clone())).or_default().push(id);
        }
    }
    out
}

/// The daemon's OVS sessions, by config name; those of no config session under `None`.
pub fn daemon_ovs_sessions<'a>(
    names: impl IntoIterator<Item = &'a String>,
    sessions: &BTreeMap<u32, OvsSession>,
) -> BTreeMap<Option<String>, Vec<u32>> {
    let names: BTreeSet<&String> = names.into_iter().collect();
    let mut out: BTreeMap<Option<String>, Vec<u32>> = BTreeMap::new();
    for (&id, session) in sessions {
        if let Some(daemon) = session.daemon() {
            let name = names.contains(&daemon.to_owned()).then(|| daemon.to_owned());
            out.entry(name).or_default().push(id);
        }
    }
    out
}

/// What becomes of the session a config session has now.
enum Keep {
    /// None, or none worth keeping: a new one is made once the VM is here.
    New,
    /// It matches the config.
    Same(u32),
    /// Only keys in `live` changed: changed in place.
    Update(u32),
}

/// A session that goes, with the config session it belonged to (`None`: none in the config).
type Dropped = (Option<String>, u32);

/// For each config session, which of its sessions stays; the rest, orphans (tags or names of
/// no config session), duplicates and sessions changed in a way `live` keys cannot carry go.
fn keep_or_drop(
    desired: &BTreeMap<String, MirrorSpec>,
    records: &BTreeMap<String, MirrorSpec>,
    owned: &BTreeMap<Option<String>, Vec<u32>>,
    live: &[&str],
) -> (Vec<Dropped>, BTreeMap<String, Keep>) {
    let mut drop: Vec<Dropped> = owned.get(&None).into_iter().flatten().map(|&id| (None, id)).collect();
    let mut keep = BTreeMap::new();
    for (name, spec) in desired {
        let ids = owned.get(&Some(name.clone())).cloned().unwrap_or_default();
        // One session per config name: a second one (never made by the daemon itself) goes.
        drop.extend(ids.iter().skip(1).map(|&id| (Some(name.clone()), id)));
        let decision = match (ids.first(), records.get(name).map(|applied| applied.changed_keys(spec))) {
            (None, _) => Keep::New,
            (Some(&id), Some(changed)) if changed.is_empty() => Keep::Same(id),
            (Some(&id), Some(changed)) if changed.iter().all(|k| live.contains(&k.as_str())) => {
                Keep::Update(id)
            }
            // Changed otherwise, or applied by a daemon whose record is lost: only a new
            // session is sure to be what the config says.
            (Some(&id), _) => {
                drop.push((Some(name.clone()), id));
                Keep::New
            }
        };
        keep.insert(name.clone(), decision);
    }
    (drop, keep)
}

/// eBPF sessions: `desired` holds the config's eBPF sessions only.
pub fn plan_reconcile(
    desired: &BTreeMap<String, MirrorSpec>,
    placements: &BTreeMap<String, Placement>,
    records: &BTreeMap<String, MirrorSpec>,
    observed: &Observed,
) -> Vec<Action> {
    let owned = daemon_sessions(desired.keys(), observed);
    let (drop, keep) = keep_or_drop(desired, records, &owned, &LIVE_KEYS);
    let mut actions: Vec<Action> = drop.into_iter().map(|(name, id)| Action::Detach { name, id }).collect();
    for (name, decision) in keep {
        let kept = match decision {
            Keep::New => None,
            Keep::Same(id) => Some(id),
            Keep::Update(id) => {
                actions.push(Action::Update { name: name.clone(), id });
                Some(id)
            }
        };
        let Some(Placement::Here(tap)) = placements.get(&name) else { continue };
        match kept {
            None => actions.push(Action::Attach { name, tap: tap.clone() }),
            Some(id) if observed.tap_of(id).map(|(ifindex, _)| ifindex) != Some(tap.ifindex) => {
                actions.push(Action::Rehome { name, id, tap: tap.clone() });
            }
            Some(_) => {}
        }
    }
    actions
}

/// OVS sessions: `desired` holds the config's OVS sessions only; `sessions` are vmsniff's
/// sessions in OVSDB. Every change of an OVS session's keys makes a new one (OVS has no
/// controls to change in place); a session that lost its Mirror or GRE port to someone's hand,
/// or whose VM is now on another bridge, is made again.
pub fn plan_ovs_reconcile(
    desired: &BTreeMap<String, MirrorSpec>,
    placements: &BTreeMap<String, Placement<OvsPort>>,
    records: &BTreeMap<String, MirrorSpec>,
    sessions: &BTreeMap<u32, OvsSession>,
) -> Vec<OvsAction> {
    let owned = daemon_ovs_sessions(desired.keys(), sessions);
    let (drop, keep) = keep_or_drop(desired, records, &owned, &[]);
    let mut actions: Vec<OvsAction> =
        drop.into_iter().map(|(name, id)| OvsAction::Detach { name, id }).collect();
    for (name, decision) in keep {
        let Some(Placement::Here(port)) = placements.get(&name) else { continue };
        let kept = match decision {
            Keep::Same(id) | Keep::Update(id) => sessions.get(&id),
            Keep::New => None,
        };
        match kept {
            None => actions.push(OvsAction::Attach { name, port: port.clone() }),
            Some(session)
                if session.mirror.is_none()
                    || session.gre_port.is_none()
                    || session.bridges.iter().all(|b| b.row.name != port.bridge) =>
            {
                actions.push(OvsAction::Detach { name: Some(name.clone()), id: session.id });
                actions.push(OvsAction::Attach { name, port: port.clone() });
            }
            Some(session) if session.vm_port.as_deref() != Some(port.port.as_str()) => {
                actions.push(OvsAction::Reselect { name, id: session.id, port: port.clone() });
            }
            Some(_) => {}
        }
    }
    actions
}

#[cfg(test)]
mod tests {
    use vmsniff_ebpf::{SESSION_ACTIVE, SessionConfig, TapSessions};

    use super::*;
    use crate::daemon::config::parse;

    fn config(text: &str) -> BTreeMap<String, MirrorSpec> {
        parse("m.toml", text).unwrap().sessions.into_iter().map(|(name, s)| (name, s.spec)).collect()
    }

    const ONE: &str = "[session.ids]\nvm = \"c-private\"\nto = \"192.0.2.2\"\n";

    fn tap(ifindex: u32) -> Tap {
        Tap { ifindex, name: "tapvm".into() }
    }

    fn placed(ifindex: u32) -> BTreeMap<String, Placement> {
        BTreeMap::from([("ids".to_owned(), Placement::Here(tap(ifindex)))])
    }

    /// The kernel with session `id` of config session `name` on tap `ifindex`.
    fn kernel(sessions: &[(u32, &str, u32)]) -> Observed {
        let mut observed = Observed::default();
        for &(id, name, ifindex) in sessions {
            observed.sessions.insert(
                id,
                SessionConfig {
                    state: SESSION_ACTIVE,
                    tap_ifindex: ifindex,
                    daemon_tag: daemon_tag(name),
                    ..SessionConfig::EMPTY
                },
            );
            let entry = observed.taps.entry(ifindex).or_insert(TapSessions::EMPTY);
            let slot = entry.ids.iter().position(|&i| i == 0).unwrap();
            entry.ids[slot] = id as u16;
        }
        observed
    }

    #[test]
    fn a_new_session_attaches_once_its_tap_is_there() {
        let desired = config(ONE);
        let none = BTreeMap::new();
        assert_eq!(
            plan_reconcile(&desired, &placed(7), &none, &Observed::default()),
            [Action::Attach { name: "ids".into(), tap: tap(7) }]
        );
        let waiting =
            BTreeMap::from([("ids".to_owned(), Placement::Waiting("VM c-private is shut off".into()))]);
        assert!(plan_reconcile(&desired, &waiting, &none, &Observed::default()).is_empty());
    }

    #[test]
    fn an_adopted_session_that_matches_needs_nothing() {
        let desired = config(ONE);
        assert!(plan_reconcile(&desired, &placed(7), &desired, &kernel(&[(3, "ids", 7)])).is_empty());
    }

    #[test]
    fn a_recreated_tap_rehomes_the_same_session() {
        let desired = config(ONE);
        assert_eq!(
            plan_reconcile(&desired, &placed(12), &desired, &kernel(&[(3, "ids", 7)])),
            [Action::Rehome { name: "ids".into(), id: 3, tap: tap(12) }]
        );
    }

    #[test]
    fn a_vm_away_keeps_its_session_and_counters() {
        let desired = config(ONE);
        let waiting = BTreeMap::from([("ids".to_owned(), Placement::Waiting("gone".into()))]);
        assert!(plan_reconcile(&desired, &waiting, &desired, &kernel(&[(3, "ids", 7)])).is_empty());
    }

    #[test]
    fn controls_change_in_place_and_anything_else_replaces() {
        let applied = config(ONE);
        let filtered = config(&format!("{ONE}filter = \"icmp\"\nsnaplen = 96\n"));
        assert_eq!(
            plan_reconcile(&filtered, &placed(7), &applied, &kernel(&[(3, "ids", 7)])),
            [Action::Update { name: "ids".into(), id: 3 }]
        );
        let moved = config("[session.ids]\nvm = \"c-private\"\nto = \"192.0.2.9\"\n");
        assert_eq!(
            plan_reconcile(&moved, &placed(7), &applied, &kernel(&[(3, "ids", 7)])),
            [
                Action::Detach { name: Some("ids".into()), id: 3 },
                Action::Attach { name: "ids".into(), tap: tap(7) }
            ]
        );
    }

    #[test]
    fn sessions_no_longer_in_the_config_go_and_others_are_left_alone() {
        let desired = config(ONE);
        let mut observed = kernel(&[(3, "ids", 7), (4, "old", 7)]);
        // A session someone made with `vmsniff attach`: not the daemon's.
        observed
            .sessions
            .insert(5, SessionConfig { state: SESSION_ACTIVE, tap_ifindex: 7, ..SessionConfig::EMPTY });
        assert_eq!(
            plan_reconcile(&desired, &placed(7), &desired, &observed),
            [Action::Detach { name: None, id: 4 }]
        );
    }

    #[test]
    fn a_session_without_a_record_is_replaced_and_duplicates_go() {
        let desired = config(ONE);
        let none = BTreeMap::new();
        assert_eq!(
            plan_reconcile(&desired, &placed(7), &none, &kernel(&[(3, "ids", 7), (6, "ids", 7)])),
            [
                Action::Detach { name: Some("ids".into()), id: 6 },
                Action::Detach { name: Some("ids".into()), id: 3 },
                Action::Attach { name: "ids".into(), tap: tap(7) }
            ]
        );
    }

    const OVS: &str = "[session.ids]\nvm = \"c-private\"\nmode = \"ovs\"\nto = \"192.0.2.2\"\n";

    fn port(name: &str, bridge: &str) -> OvsPort {
        OvsPort { bridge: bridge.into(), port: name.into(), tap: "tapvm".into() }
    }

    fn on_port(name: &str, bridge: &str) -> BTreeMap<String, Placement<OvsPort>> {
        BTreeMap::from([("ids".to_owned(), Placement::Here(port(name, bridge)))])
    }

    /// OVSDB with OVS session `id` of daemon session `daemon`, on br-int, mirroring `vm_port`
    /// (`None`: its port was deleted).
    fn ovsdb(sessions: &[(u32, Option<&str>, Option<&str>)]) -> BTreeMap<u32, OvsSession> {
        use crate::ovs::session::{BridgeRow, DAEMON_KEY, MirrorRow, PortRow, Row};
        sessions
            .iter()
            .map(|&(id, daemon, vm_port)| {
                let external_ids =
                    daemon.map(|d| (DAEMON_KEY.to_owned(), d.to_owned())).into_iter().collect();
                let row = |name: String| Row {
                    uuid: name.clone(),
                    name,
                    external_ids: Clone::clone(&external_ids),
                };
                let session = OvsSession {
                    id,
                    mirror: Some(MirrorRow { row: row(format!("vmsniff-{id}")), ..Default::default() }),
                    gre_port: Some(PortRow { row: row(format!("vms{id}-ovs")), interfaces: Vec::new() }),
                    gre_interface: None,
                    bridges: vec![BridgeRow {
                        row: Row { uuid: "b".into(), name: "br-int".into(), ..Default::default() },
                        ..Default::default()
                    }],
                    vm_port: vm_port.map(str::to_owned),
                    directions: None,
                };
                (id, session)
            })
            .collect()
    }

    #[test]
    fn an_ovs_session_attaches_and_then_needs_nothing() {
        let desired = config(OVS);
        let none = BTreeMap::new();
        assert_eq!(
            plan_ovs_reconcile(&desired, &on_port("qvo1", "br-int"), &none, &BTreeMap::new()),
            [OvsAction::Attach { name: "ids".into(), port: port("qvo1", "br-int") }]
        );
        let made = ovsdb(&[(5, Some("ids"), Some("qvo1"))]);
        assert!(plan_ovs_reconcile(&desired, &on_port("qvo1", "br-int"), &desired, &made).is_empty());
        let waiting = BTreeMap::from([("ids".to_owned(), Placement::Waiting("no qvo yet".into()))]);
        assert!(
            plan_ovs_reconcile(&desired, &waiting, &desired, &ovsdb(&[(5, Some("ids"), None)])).is_empty()
        );
    }

    #[test]
    fn a_replugged_vm_port_is_selected_again_by_the_same_session() {
        let desired = config(OVS);
        assert_eq!(
            plan_ovs_reconcile(
                &desired,
                &on_port("qvo1", "br-int"),
                &desired,
                &ovsdb(&[(5, Some("ids"), None)])
            ),
            [OvsAction::Reselect { name: "ids".into(), id: 5, port: port("qvo1", "br-int") }]
        );
        // Moved to another bridge: the Mirror and GRE port belong to the old one.
        assert_eq!(
            plan_ovs_reconcile(
                &desired,
                &on_port("qvo1", "br-ex"),
                &desired,
                &ovsdb(&[(5, Some("ids"), None)])
            ),
            [
                OvsAction::Detach { name: Some("ids".into()), id: 5 },
                OvsAction::Attach { name: "ids".into(), port: port("qvo1", "br-ex") }
            ]
        );
    }

    #[test]
    fn ovs_sessions_changed_lost_or_unknown_go_and_others_stay() {
        let desired = config(OVS);
        let keyed = config(&format!("{OVS}key = 9\n"));
        let at = on_port("qvo1", "br-int");
        // Any change makes a new session.
        assert_eq!(
            plan_ovs_reconcile(&keyed, &at, &desired, &ovsdb(&[(5, Some("ids"), Some("qvo1"))])),
            [
                OvsAction::Detach { name: Some("ids".into()), id: 5 },
                OvsAction::Attach { name: "ids".into(), port: port("qvo1", "br-int") }
            ]
        );
        // Someone removed its Mirror: made again.
        let mut cleared = ovsdb(&[(5, Some("ids"), Some("qvo1"))]);
        cleared.get_mut(&5).unwrap().mirror = None;
        assert_eq!(plan_ovs_reconcile(&desired, &at, &desired, &cleared).len(), 2);
        // A config session that is gone, and `vmsniff attach`'s own session, left alone.
        let sessions =
            ovsdb(&[(5, Some("ids"), Some("qvo1")), (6, Some("old"), Some("qvo2")), (7, None, Some("qvo1"))]);
        assert_eq!(
            plan_ovs_reconcile(&desired, &at, &desired, &sessions),
            [OvsAction::Detach { name: None, id: 6 }]
        );
    }

    #[test]
    fn each_planner_keeps_only_its_own_mode() {
        // A config session that became an OVS session: its eBPF session is an orphan to the
        // eBPF planner (which is given the eBPF sessions only).
        let none = BTreeMap::new();
        assert_eq!(
            plan_reconcile(&none, &BTreeMap::new(), &config(ONE), &kernel(&[(3, "ids", 7)])),
            [Action::Detach { name: None, id: 3 }]
        );
        assert_eq!(
            plan_ovs_reconcile(
                &none,
                &BTreeMap::new(),
                &config(OVS),
                &ovsdb(&[(5, Some("ids"), Some("qvo1"))])
            ),
            [OvsAction::Detach { name: None, id: 5 }]
        );
    }
}
