//! Planning a detach: stop mirroring first, then remove exactly what vmsniff created.
use std::collections::BTreeSet;

use vmsniff_ebpf::{
    Direction, SessionConfig, TAP_CREATED_CLSACT, TARGET_CREATED_CLSACT, TARGET_GRE, TARGET_LOCAL_DEV,
    TapSessions, TcHook,
};

use crate::model::{mirror::AttachMode, observed::Observed};
use crate::sys::paths::gre_device_name;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DetachStep {
    /// Mark the session busy: the programs skip it from the next frame on.
    DeactivateSession { id: u32 },
    /// Take sessions out of a tap's list that keeps others.
    RemoveFromTap { tap_ifindex: u32, ids: Vec<u32> },
    /// Detach one tap program (the tap may be gone already: nothing to do then).
    DetachProgram {
        tap_ifindex: u32,
        tap_name: String,
        hook: TcHook,
        mode: AttachMode,
        nl_priority: u16,
        nl_handle: u32,
    },
    /// Detach a session's copy program from its target device's egress hook (the device may
    /// be gone already: nothing to do then).
    DetachCopyProgram { id: u32, ifindex: u32, nl_priority: u16, nl_handle: u32 },
    /// Remove the clsact qdisc vmsniff added, if no filter of anybody else's is left in it.
    RemoveClsactIfUnused { tap_ifindex: u32, tap_name: String },
    /// Delete the tap's entry.
    ForgetTap { tap_ifindex: u32 },
    /// Delete one of the session's GRE devices, if it still is the one vmsniff created.
    DeleteGreDevice { id: u32, direction: Direction, ifindex: u32, name: String },
    /// Delete the session's GRE device by its name, if it is vmsniff's (marked, or not marked
    /// yet): a crashed attach may have created it without recording its ifindex.
    DeleteUnrecordedGreDevice { id: u32, direction: Direction, name: String },
    /// Free the session slot.
    FreeSession { id: u32 },
    /// Nothing is left: remove the namespace's pinned programs and maps.
    RemovePins,
}

/// Steps that remove `ids`, and any tap entry left without sessions by a crashed run. Unknown
/// ids are ignored (the caller reports them).
pub fn plan_detach(ids: &BTreeSet<u32>, observed: &Observed) -> Vec<DetachStep> {
    let ids: BTreeSet<u32> = ids.iter().copied().filter(|id| observed.sessions.contains_key(id)).collect();
    let mut steps: Vec<DetachStep> = ids.iter().map(|&id| DetachStep::DeactivateSession { id }).collect();

    let mut taps_left = 0;
    for (&tap_ifindex, tap) in &observed.taps {
        let listed: Vec<u32> = tap.ids.iter().filter(|&&id| id != 0).map(|&id| u32::from(id)).collect();
        let removed: Vec<u32> = listed.iter().copied().filter(|id| ids.contains(id)).collect();
        let remaining = listed.len() - removed.len();
        if remaining > 0 {
            taps_left += 1;
            if !removed.is_empty() {
                steps.push(DetachStep::RemoveFromTap { tap_ifindex, ids: removed });
            }
            continue;
        }
        steps.extend(release_tap(tap_ifindex, tap));
    }

    for &id in &ids {
        let session = &observed.sessions[&id];
        // A GRE device takes its filter with it; a local device outlives the session.
        if session.target_kind == TARGET_LOCAL_DEV {
            steps.extend(copy_program_release(id, session));
        }
        if session.target_kind == TARGET_GRE {
            for direction in Direction::ALL {
                let ifindex = session.target_ifindex[direction.index()];
                let name = gre_device_name(id, direction);
                if ifindex != 0 {
                    steps.push(DetachStep::DeleteGreDevice { id, direction, ifindex, name });
                } else if observed.orphaned.contains(&id) {
                    steps.push(DetachStep::DeleteUnrecordedGreDevice { id, direction, name });
                }
            }
        }
        steps.push(DetachStep::FreeSession { id });
    }

    let sessions_left = observed.sessions.keys().filter(|id| !ids.contains(id)).count();
    if sessions_left == 0 && taps_left == 0 {
        steps.push(DetachStep::RemovePins);
    }
    steps
}

/// What the next state-changing command removes first, under the lock: sessions whose owner
/// died (a crashed or killed attach, detach or `mirror`), tap entries without sessions, and
/// pins that hold nothing (a first attach killed before it claimed its session, or a detach
/// killed before it removed them). `None`: nothing is left over.
pub fn plan_cleanup(observed: &Observed) -> Option<Vec<DetachStep>> {
    let empty_taps = observed.taps.values().any(|t| t.session_count() == 0);
    let nothing_held = observed.sessions.is_empty() && observed.taps.is_empty();
    (!observed.orphaned.is_empty() || empty_taps || nothing_held)
        .then(|| plan_detach(&observed.orphaned, observed))
}

/// Steps that take a tap with no session left out of vmsniff's hands: its programs, the
/// clsact qdisc vmsniff added, its entry.
pub fn release_tap(tap_ifindex: u32, tap: &TapSessions) -> Vec<DetachStep> {
    let tap_name = ifname(&tap.ifname);
    let mode = AttachMode::from_abi(tap.attach_mode).unwrap_or(AttachMode::Netlink);
    let mut steps: Vec<DetachStep> = TcHook::ALL
        .into_iter()
        .map(|hook| DetachStep::DetachProgram {
            tap_ifindex,
            tap_name: tap_name.clone(),
            hook,
            mode,
            nl_priority: tap.nl_priority[hook.index()],
            nl_handle: tap.nl_handle[hook.index()],
        })
        .collect();
    if mode == AttachMode::Netlink && tap.flags & TAP_CREATED_CLSACT != 0 {
        steps.push(DetachStep::RemoveClsactIfUnused { tap_ifindex, tap_name });
    }
    steps.push(DetachStep::ForgetTap { tap_ifindex });
    steps
}

/// A NUL-padded interface name from the ABI.
pub fn ifname(raw: &[u8; 16]) -> String {
    let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
    String::from_utf8_lossy(&raw[..end]).into_owned()
}

/// Removes the session's copy programs from its target devices (and a clsact qdisc vmsniff
/// added there, once unused): at detach for a device that outlives the session, and at
/// `update` when the last snaplen goes.
pub fn copy_program_release(id: u32, session: &SessionConfig) -> Vec<DetachStep> {
    let mut steps = Vec::new();
    for direction in Direction::ALL {
        let (ifindex, nl_priority) =
            (session.target_ifindex[direction.index()], session.target_nl_priority[direction.index()]);
        if ifindex == 0 {
            continue;
        }
        // Each is recorded before it is made: a crashed attach may have recorded the clsact
        // qdisc and not yet the filter.
        if nl_priority != 0 {
            let nl_handle = session.target_nl_handle[direction.index()];
            steps.push(DetachStep::DetachCopyProgram { id, ifindex, nl_priority, nl_handle });
        }
        if session.target_flags & (TARGET_CREATED_CLSACT << direction.index()) != 0 {
            steps.push(DetachStep::RemoveClsactIfUnused {
                tap_ifindex: ifindex,
                tap_name: format!("ifindex {ifindex}"),
            });
        }
    }
    steps
}

#[cfg(test)]
mod tests {
    use vmsniff_ebpf::{ATTACH_NETLINK, ATTACH_TCX, SESSION_ACTIVE, SessionConfig, TapSessions};

    use super::*;

    fn name(s: &str) -> [u8; 16] {
        let mut raw = [0; 16];
        raw[..s.len()].copy_from_slice(s.as_bytes());
        raw
    }

    fn observed() -> Observed {
        let mut observed = Observed::default();
        for (id, targets) in [(1, [11, 12]), (2, [21, 0]), (3, [31, 32])] {
            observed.sessions.insert(
                id,
                SessionConfig {
                    state: SESSION_ACTIVE,
                    target_kind: TARGET_GRE,
                    target_ifindex: targets,
                    ..SessionConfig::EMPTY
                },
            );
        }
        observed.taps.insert(
            5,
            TapSessions {
                ids: [1, 2, 0, 0, 0, 0, 0, 0],
                attach_mode: ATTACH_TCX,
                ifname: name("tap5"),
                ..TapSessions::EMPTY
            },
        );
        observed.taps.insert(
            6,
            TapSessions {
                ids: [3, 0, 0, 0, 0, 0, 0, 0],
                attach_mode: ATTACH_NETLINK,
                flags: TAP_CREATED_CLSACT,
                nl_priority: [49152, 49152],
                nl_handle: [1, 1],
                ifname: name("tap6"),
                ..TapSessions::EMPTY
            },
        );
        observed
    }

    #[test]
    fn cleanup_removes_orphans_and_pins_that_hold_nothing_and_leaves_live_sessions() {
        assert_eq!(plan_cleanup(&observed()), None);
        assert_eq!(plan_cleanup(&Observed::default()), Some(vec![DetachStep::RemovePins]));
        let mut crashed = observed();
        crashed.sessions.get_mut(&2).unwrap().target_ifindex = [0, 0];
        crashed.orphaned.insert(2);
        let steps = plan_cleanup(&crashed).unwrap();
        assert!(steps.contains(&DetachStep::DeleteUnrecordedGreDevice {
            id: 2,
            direction: Direction::Out,
            name: "vms2-out".into()
        }));
        assert!(!steps.iter().any(|s| matches!(s, DetachStep::DeactivateSession { id: 1 | 3 })));
    }

    #[test]
    fn one_of_two_sessions_leaves_the_programs() {
        let steps = plan_detach(&BTreeSet::from([2]), &observed());
        assert_eq!(
            steps,
            [
                DetachStep::DeactivateSession { id: 2 },
                DetachStep::RemoveFromTap { tap_ifindex: 5, ids: vec![2] },
                DetachStep::DeleteGreDevice {
                    id: 2,
                    direction: Direction::Out,
                    ifindex: 21,
                    name: "vms2-out".into()
                },
                DetachStep::FreeSession { id: 2 },
            ]
        );
    }

    #[test]
    fn the_last_session_of_a_tap_takes_its_programs_and_qdisc() {
        let steps = plan_detach(&BTreeSet::from([3]), &observed());
        assert!(steps.contains(&DetachStep::DetachProgram {
            tap_ifindex: 6,
            tap_name: "tap6".into(),
            hook: TcHook::Egress,
            mode: AttachMode::Netlink,
            nl_priority: 49152,
            nl_handle: 1
        }));
        assert!(
            steps.contains(&DetachStep::RemoveClsactIfUnused { tap_ifindex: 6, tap_name: "tap6".into() })
        );
        assert!(steps.contains(&DetachStep::ForgetTap { tap_ifindex: 6 }));
        assert!(!steps.contains(&DetachStep::RemovePins));
        assert_eq!(
            steps[0],
            DetachStep::DeactivateSession { id: 3 },
            "mirroring stops before anything is removed"
        );
    }

    #[test]
    fn everything_removes_the_pins_last() {
        let steps = plan_detach(&BTreeSet::from([1, 2, 3]), &observed());
        assert_eq!(steps.last(), Some(&DetachStep::RemovePins));
        assert_eq!(steps.iter().filter(|s| matches!(s, DetachStep::DeleteGreDevice { .. })).count(), 5);
    }

    #[test]
    fn a_clsact_that_was_there_before_stays() {
        let mut observed = observed();
        observed.taps.get_mut(&6).unwrap().flags = 0;
        let steps = plan_detach(&BTreeSet::from([3]), &observed);
        assert!(!steps.iter().any(|s| matches!(s, DetachStep::RemoveClsactIfUnused { .. })));
    }

    #[test]
    fn a_tap_left_without_sessions_by_a_crash_is_cleaned() {
        let mut observed = observed();
        observed
            .taps
            .insert(8, TapSessions { attach_mode: ATTACH_TCX, ifname: name("tap8"), ..TapSessions::EMPTY });
        let steps = plan_detach(&BTreeSet::new(), &observed);
        assert!(steps.contains(&DetachStep::ForgetTap { tap_ifindex: 8 }));
        assert!(!steps.iter().any(|s| matches!(s, DetachStep::ForgetTap { tap_ifindex: 5 | 6 })));
    }

    #[test]
    fn unknown_ids_change_nothing() {
        assert!(plan_detach(&BTreeSet::from([99]), &observed()).is_empty());
    }

    #[test]
    fn a_local_target_loses_exactly_the_copy_filter_and_qdisc_vmsniff_added() {
        let mut observed = observed();
        observed.sessions.insert(
            4,
            SessionConfig {
                state: SESSION_ACTIVE,
                target_kind: TARGET_LOCAL_DEV,
                target_ifindex: [40, 40],
                target_nl_priority: [49151, 0],
                target_nl_handle: [2, 0],
                target_flags: TARGET_CREATED_CLSACT,
                ..SessionConfig::EMPTY
            },
        );
        let steps = plan_detach(&BTreeSet::from([4]), &observed);
        let copy_steps: Vec<&DetachStep> = steps
            .iter()
            .filter(|s| {
                matches!(s, DetachStep::DetachCopyProgram { .. } | DetachStep::RemoveClsactIfUnused { .. })
            })
            .collect();
        assert_eq!(
            copy_steps,
            [
                &DetachStep::DetachCopyProgram { id: 4, ifindex: 40, nl_priority: 49151, nl_handle: 2 },
                &DetachStep::RemoveClsactIfUnused { tap_ifindex: 40, tap_name: "ifindex 40".into() },
            ]
        );
        assert!(!steps.iter().any(|s| matches!(s, DetachStep::DeleteGreDevice { .. })));
    }
}
