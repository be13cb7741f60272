//! Planning the daemon's reconcile: the config's sessions (desired), where each VM's tap is now
//! (placements), what the daemon last applied (records) and vmsniff's kernel state (observed)
//! → actions. Level-triggered: the same inputs give the same actions however often it runs, and
//! a world that already matches gives none.
use std::collections::{BTreeMap, BTreeSet};

use vmsniff_ebpf::daemon_tag;

use super::{Observed, request::Tap};
use crate::daemon::config::{LIVE_KEYS, SessionSpec};

/// Where a config session's VM NIC is now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Placement {
    /// Its tap exists in this namespace.
    Tap(Tap),
    /// Not here now (VM stopped, migrated away, not defined yet): the session waits for it.
    Waiting(String),
    /// Cannot be resolved in a way waiting fixes (ambiguous name, unmirrorable NIC, libvirt
    /// unreachable): the operator has to act.
    Error(String),
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

pub fn plan_reconcile(
    desired: &BTreeMap<String, SessionSpec>,
    placements: &BTreeMap<String, Placement>,
    records: &BTreeMap<String, SessionSpec>,
    observed: &Observed,
) -> Vec<Action> {
    let mut actions = Vec::new();
    let owned = daemon_sessions(desired.keys(), observed);
    let orphans: BTreeSet<u32> = owned.get(&None).into_iter().flatten().copied().collect();
    actions.extend(orphans.into_iter().map(|id| Action::Detach { name: None, id }));
    for (name, spec) in desired {
        let ids = owned.get(&Some(name.clone())).cloned().unwrap_or_default();
        // One session per config name: a second one (never made by the daemon itself) goes.
        let mut kept = ids.first().copied();
        for &id in ids.iter().skip(1) {
            actions.push(Action::Detach { name: Some(name.clone()), id });
        }
        if let Some(id) = kept {
            match records.get(name).map(|applied| applied.changed_keys(spec)) {
                Some(changed) if changed.is_empty() => {}
                Some(changed) if changed.iter().all(|k| LIVE_KEYS.contains(&k.as_str())) => {
                    actions.push(Action::Update { name: name.clone(), id });
                }
                // Changed otherwise, or applied by a daemon whose record is lost: only a new
                // session is sure to be what the config says.
                _ => {
                    actions.push(Action::Detach { name: Some(name.clone()), id });
                    kept = None;
                }
            }
        }
        let Some(Placement::Tap(tap)) = placements.get(name) else { continue };
        match kept {
            None => actions.push(Action::Attach { name: name.clone(), tap: tap.clone() }),
            Some(id) if observed.tap_of(id).map(|(ifindex, _)| ifindex) != Some(tap.ifindex) => {
                actions.push(Action::Rehome { name: name.clone(), id, tap: tap.clone() });
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

    fn config(text: &str) -> BTreeMap<String, SessionSpec> {
        parse("m.toml", text).unwrap().sessions
    }

    const ONE: &str = "[session.ids]\nvm = \"c-private\"\nto = \"192.0.2.2\"\n";

    fn tap(ifindex: u32) -> Tap {
        Tap { ifindex, name: "tapvm".into() }
    }

    fn placed(ifindex: u32) -> BTreeMap<String, Placement> {
        BTreeMap::from([("ids".to_owned(), Placement::Tap(tap(ifindex)))])
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
}
