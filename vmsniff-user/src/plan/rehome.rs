//! Planning a re-home: a session moves to its VM's new tap. A hard reboot or a migration back
//! deletes the tap and creates it again under the same name and a new ifindex; the session
//! keeps its id, devices, controls and counters, so the collector sees one session go on.
use vmsniff_ebpf::TcHook;

use crate::{
    model::{
        mirror::{AttachMode, AttachModeChoice, Tap},
        observed::Observed,
    },
    plan::{
        attach::{AttachPlanError, AttachStep, choose_mode},
        detach::{DetachStep, release_tap},
    },
};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RehomePlan {
    pub id: u32,
    /// Forget the old tap (its programs went with it; a tap still there keeps other sessions).
    pub release: Vec<DetachStep>,
    /// Attach to the new tap, list the session there, then record the new tap in the session.
    pub attach: Vec<AttachStep>,
}

/// Steps that attach the tap programs of `hooks` to `tap` again, where someone removed them
/// (`tc qdisc del dev TAP clsact`): its sessions, counters and entry stay as they are.
pub fn plan_reattach(tap: &Tap, hooks: &[TcHook]) -> Vec<AttachStep> {
    let mut steps = vec![AttachStep::EnsureClsact { tap: tap.clone() }];
    steps.extend(hooks.iter().map(|&hook| AttachStep::AttachProgram {
        tap: tap.clone(),
        hook,
        mode: AttachMode::Netlink,
    }));
    steps
}

/// Steps that move session `id` to `tap`. `None` when it is mirrored there already.
pub fn plan_rehome(
    id: u32,
    tap: &Tap,
    mode: AttachModeChoice,
    tcx_supported: bool,
    observed: &Observed,
) -> Result<Option<RehomePlan>, AttachPlanError> {
    let old = observed.tap_of(id);
    if old.is_some_and(|(ifindex, _)| ifindex == tap.ifindex) {
        return Ok(None);
    }
    let mut release = Vec::new();
    if let Some((tap_ifindex, entry)) = old {
        if entry.session_count() > 1 {
            release.push(DetachStep::RemoveFromTap { tap_ifindex, ids: vec![id] });
        } else {
            release = release_tap(tap_ifindex, entry);
        }
    }
    let existing = observed.taps.get(&tap.ifindex);
    if existing.is_some_and(|t| t.session_count() >= vmsniff_ebpf::MAX_SESSIONS_PER_TAP) {
        return Err(AttachPlanError::TapFull { tap: tap.name.clone() });
    }
    let mut attach = Vec::new();
    if existing.is_none() {
        let mode = choose_mode(&tap.name, mode, tcx_supported, None)?;
        attach.push(AttachStep::RegisterTap { tap: tap.clone(), mode });
        if mode == AttachMode::Netlink {
            attach.push(AttachStep::EnsureClsact { tap: tap.clone() });
        }
        for hook in TcHook::ALL {
            attach.push(AttachStep::AttachProgram { tap: tap.clone(), hook, mode });
        }
    }
    attach.push(AttachStep::AddToTap { tap: tap.clone(), id });
    attach.push(AttachStep::MoveSession { id, tap_ifindex: tap.ifindex });
    Ok(Some(RehomePlan { id, release, attach }))
}

#[cfg(test)]
mod tests {
    use vmsniff_ebpf::{
        ATTACH_NETLINK, ATTACH_TCX, SESSION_ACTIVE, SessionConfig, TAP_CREATED_CLSACT, TapSessions,
    };

    use super::*;

    fn name(s: &str) -> [u8; 16] {
        let mut raw = [0; 16];
        raw[..s.len()].copy_from_slice(s.as_bytes());
        raw
    }

    fn observed(old_ids: [u16; 8], mode: u32) -> Observed {
        let mut observed = Observed::default();
        for id in old_ids.iter().filter(|&&id| id != 0) {
            observed.sessions.insert(
                u32::from(*id),
                SessionConfig { state: SESSION_ACTIVE, tap_ifindex: 7, ..SessionConfig::EMPTY },
            );
        }
        observed.taps.insert(
            7,
            TapSessions {
                ids: old_ids,
                attach_mode: mode,
                flags: if mode == ATTACH_NETLINK { TAP_CREATED_CLSACT } else { 0 },
                nl_priority: [1, 1],
                nl_handle: [5, 6],
                ifname: name("tapvm"),
                ..TapSessions::EMPTY
            },
        );
        observed
    }

    fn new_tap() -> Tap {
        Tap { ifindex: 12, name: "tapvm".into() }
    }

    #[test]
    fn a_recreated_tap_gets_the_programs_and_the_old_entry_goes() {
        let plan = plan_rehome(
            3,
            &new_tap(),
            AttachModeChoice::Auto,
            true,
            &observed([3, 0, 0, 0, 0, 0, 0, 0], ATTACH_TCX),
        )
        .unwrap()
        .unwrap();
        assert_eq!(plan.release.len(), 3, "{:?}", plan.release);
        assert!(matches!(
            plan.release[0],
            DetachStep::DetachProgram { tap_ifindex: 7, mode: AttachMode::Tcx, .. }
        ));
        assert_eq!(plan.release[2], DetachStep::ForgetTap { tap_ifindex: 7 });
        assert_eq!(
            plan.attach,
            [
                AttachStep::RegisterTap { tap: new_tap(), mode: AttachMode::Tcx },
                AttachStep::AttachProgram { tap: new_tap(), hook: TcHook::Ingress, mode: AttachMode::Tcx },
                AttachStep::AttachProgram { tap: new_tap(), hook: TcHook::Egress, mode: AttachMode::Tcx },
                AttachStep::AddToTap { tap: new_tap(), id: 3 },
                AttachStep::MoveSession { id: 3, tap_ifindex: 12 },
            ]
        );
    }

    #[test]
    fn netlink_taps_get_a_clsact_and_lose_the_one_vmsniff_made() {
        let plan = plan_rehome(
            3,
            &new_tap(),
            AttachModeChoice::Netlink,
            true,
            &observed([3, 0, 0, 0, 0, 0, 0, 0], ATTACH_NETLINK),
        )
        .unwrap()
        .unwrap();
        assert!(
            plan.release
                .contains(&DetachStep::RemoveClsactIfUnused { tap_ifindex: 7, tap_name: "tapvm".into() })
        );
        assert!(plan.attach.contains(&AttachStep::EnsureClsact { tap: new_tap() }));
    }

    #[test]
    fn a_tap_shared_with_other_sessions_only_loses_this_one() {
        let plan = plan_rehome(
            3,
            &new_tap(),
            AttachModeChoice::Auto,
            false,
            &observed([2, 3, 0, 0, 0, 0, 0, 0], ATTACH_NETLINK),
        )
        .unwrap()
        .unwrap();
        assert_eq!(plan.release, [DetachStep::RemoveFromTap { tap_ifindex: 7, ids: vec![3] }]);
    }

    #[test]
    fn a_new_tap_with_programs_already_only_lists_the_session() {
        let mut observed = observed([3, 0, 0, 0, 0, 0, 0, 0], ATTACH_TCX);
        observed.taps.insert(
            12,
            TapSessions { ids: [4, 0, 0, 0, 0, 0, 0, 0], attach_mode: ATTACH_TCX, ..TapSessions::EMPTY },
        );
        let plan = plan_rehome(3, &new_tap(), AttachModeChoice::Auto, true, &observed).unwrap().unwrap();
        assert_eq!(
            plan.attach,
            [
                AttachStep::AddToTap { tap: new_tap(), id: 3 },
                AttachStep::MoveSession { id: 3, tap_ifindex: 12 }
            ]
        );
    }

    #[test]
    fn a_session_already_on_the_tap_needs_nothing() {
        let observed = observed([3, 0, 0, 0, 0, 0, 0, 0], ATTACH_TCX);
        let same = Tap { ifindex: 7, name: "tapvm".into() };
        assert_eq!(plan_rehome(3, &same, AttachModeChoice::Auto, true, &observed).unwrap(), None);
    }

    #[test]
    fn tcx_refused_where_the_kernel_lacks_it() {
        let observed = observed([3, 0, 0, 0, 0, 0, 0, 0], ATTACH_TCX);
        assert_eq!(
            plan_rehome(3, &new_tap(), AttachModeChoice::Tcx, false, &observed).unwrap_err(),
            AttachPlanError::TcxUnsupported
        );
    }
}
