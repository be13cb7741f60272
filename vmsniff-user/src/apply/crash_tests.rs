//! Crash windows: a SIGKILL between any two kernel changes of attach, detach, update and
//! re-home must leave only what the next command recognises and removes. Each test runs an
//! operation against the fake killed after k changes, for every k from 0 to the operation's
//! count (a kill runs no undo), then the cleanup every state-changing command starts with
//! (`plan_cleanup`), then `detach --all`, and checks that nothing vmsniff made is left: no
//! pins, device, filter, TCX link or clsact qdisc.
use std::{collections::BTreeSet, net::Ipv4Addr};

use vmsniff_ebpf::{Direction, SESSION_ACTIVE, SESSION_BUSY, SessionConfig};

use crate::{
    apply::{
        executor::{apply_attach, apply_detach, apply_rehome, apply_update},
        fake::{Fake, Held},
    },
    model::{
        mirror::{AttachModeChoice, Directions, Owner, Tap, Target},
        observed::Observed,
        wire::Encap,
    },
    plan::{
        attach::{AttachPlan, plan_attach},
        controls::{Controls, parse_rate_limit},
        detach::{plan_cleanup, plan_detach},
        filter::compile,
        rehome::plan_rehome,
        request::AttachRequest,
        update::{ControlChange, plan_update},
    },
};

fn run<T>(future: impl Future<Output = T>) -> T {
    futures::executor::block_on(future)
}

fn tap0() -> Tap {
    Tap { ifindex: 7, name: "tap0".into() }
}

fn gre() -> Target {
    Target::Tunnel { remote: Ipv4Addr::new(192, 0, 2, 10).into(), ttl: 64, tos: 0, encap: Encap::Gre }
}

/// `--to-dev` into ifindex 30, which is not vmsniff's: it stays, and has no clsact at first.
fn local_dev() -> Target {
    Target::LocalDev { name: "mon0".into(), ifindex: 30 }
}

fn attach_plan(observed: &Observed, target: Target, mode: AttachModeChoice, owner: Owner) -> AttachPlan {
    let request = AttachRequest {
        tap: tap0(),
        target,
        key: None,
        directions: Directions::Both,
        controls: Controls { filter: Some(compile("tcp").unwrap()), ..Controls::default() },
        mode,
        tcx_supported: mode == AttachModeChoice::Tcx,
        owner,
        now: 1_700_000_000,
    };
    plan_attach(&request, observed).unwrap()
}

/// The cleanup a command in a new process starts with, as `Namespace::clean_orphans` runs it.
fn clean_up_after_kill(fake: &Fake) {
    fake.revive();
    if !fake.held().pinned {
        return;
    }
    if let Some(steps) = plan_cleanup(&fake.observed_after_kill()) {
        let failures = run(apply_detach(fake, &steps));
        assert!(failures.is_empty(), "{failures:?}");
    }
}

fn detach_all(fake: &Fake) {
    let observed = fake.observed();
    let ids: BTreeSet<u32> = observed.sessions.keys().copied().collect();
    if !ids.is_empty() {
        let failures = run(apply_detach(fake, &plan_detach(&ids, &observed)));
        assert!(failures.is_empty(), "{failures:?}");
    }
}

/// Nothing vmsniff made is left in `fake`, besides the clsact qdiscs in `theirs`.
fn assert_nothing_left(fake: &Fake, theirs: &[u32], what: &str) {
    let held = fake.held();
    let clsact: BTreeSet<u32> = held.clsact.difference(&theirs.iter().copied().collect()).copied().collect();
    assert_eq!(Held { clsact, ..held }, Held::default(), "{what}");
    let observed = fake.observed();
    assert!(observed.sessions.is_empty() && observed.taps.is_empty(), "{what}: {observed:?}");
}

/// The number of kernel changes `operation` makes on a fresh copy of the state `setup` builds.
fn changes_of(setup: &dyn Fn() -> Fake, operation: &dyn Fn(&Fake) -> bool) -> usize {
    let fake = setup();
    let before = fake.changes();
    assert!(operation(&fake), "the operation succeeds without a kill");
    fake.changes() - before
}

/// Kills `operation` after each number of changes, then cleans up; `operation` returns whether
/// it succeeded. Returns how many kill points there were.
fn kill_everywhere(setup: &dyn Fn() -> Fake, operation: &dyn Fn(&Fake) -> bool, what: &str) -> usize {
    let total = changes_of(setup, operation);
    for k in 0..=total {
        let fake = setup();
        fake.kill_after(k);
        let succeeded = operation(&fake);
        assert_eq!(succeeded, k == total, "{what}: killed after {k} of {total} changes");
        clean_up_after_kill(&fake);
        detach_all(&fake);
        assert_nothing_left(&fake, &[], &format!("{what}, killed after {k} of {total} changes"));
    }
    total
}

fn attach(fake: &Fake, target: Target, mode: AttachModeChoice, owner: Owner) -> bool {
    let plan = attach_plan(&fake.observed(), target, mode, owner);
    run(apply_attach(fake, &plan)).is_ok()
}

#[test]
fn a_killed_attach_leaves_only_what_the_next_command_removes() {
    let owners = [Owner::Persistent, Owner::Foreground { pid: std::process::id() }];
    for (target, mode, owner) in [
        (gre(), AttachModeChoice::Netlink, owners[0]),
        (gre(), AttachModeChoice::Tcx, owners[0]),
        (local_dev(), AttachModeChoice::Netlink, owners[0]),
        (gre(), AttachModeChoice::Netlink, owners[1]),
    ] {
        let what = format!("attach to {target} ({mode:?}, {owner:?})");
        let total = kill_everywhere(
            &|| Fake::new(&Observed::default(), |_| false),
            &|fake| attach(fake, target.clone(), mode, owner),
            &what,
        );
        assert!(total >= 10, "{what}: {total} changes");
    }
}

#[test]
fn a_killed_attach_beside_a_session_leaves_that_session_alone() {
    let setup = || {
        let fake = Fake::new(&Observed::default(), |_| false);
        assert!(attach(&fake, gre(), AttachModeChoice::Netlink, Owner::Persistent));
        fake
    };
    let total = changes_of(&setup, &|fake| attach(fake, gre(), AttachModeChoice::Netlink, Owner::Persistent));
    for k in 0..total {
        let fake = setup();
        fake.kill_after(k);
        assert!(!attach(&fake, gre(), AttachModeChoice::Netlink, Owner::Persistent));
        clean_up_after_kill(&fake);
        let observed = fake.observed();
        assert_eq!(observed.sessions.keys().copied().collect::<Vec<_>>(), [1], "killed after {k}");
        assert_eq!(observed.sessions[&1].state, SESSION_ACTIVE);
        assert_eq!(observed.tap_of(1).map(|(ifindex, _)| ifindex), Some(7));
        assert_eq!(fake.held().devices.len(), 2, "session 1's devices only, killed after {k}");
        detach_all(&fake);
        assert_nothing_left(&fake, &[], &format!("killed after {k}"));
    }
}

/// A namespace with one complete session on tap0, made by `target` and `mode`.
fn with_session(target: Target, mode: AttachModeChoice) -> Fake {
    let fake = Fake::new(&Observed::default(), |_| false);
    assert!(attach(&fake, target, mode, Owner::Persistent));
    fake
}

#[test]
fn a_killed_detach_leaves_only_what_the_next_command_removes() {
    for (target, mode) in [
        (gre(), AttachModeChoice::Netlink),
        (gre(), AttachModeChoice::Tcx),
        (local_dev(), AttachModeChoice::Netlink),
    ] {
        let what = format!("detach of a session to {target} ({mode:?})");
        kill_everywhere(
            &|| with_session(target.clone(), mode),
            &|fake| {
                let observed = fake.observed();
                run(apply_detach(fake, &plan_detach(&BTreeSet::from([1]), &observed))).is_empty()
            },
            &what,
        );
    }
}

#[test]
fn a_killed_update_leaves_the_session_as_it_was_or_as_asked() {
    let filter_and_rate = ControlChange {
        filter: Some(Some(compile("udp").unwrap())),
        rate_limit: Some(Some(parse_rate_limit("100pps").unwrap())),
        ..ControlChange::default()
    };
    // A snaplen brings the copy program onto each GRE device: more kernel changes to kill at.
    let snaplen = ControlChange { snaplen: Some(100), ..ControlChange::default() };
    let targets = [(Direction::Out, "vms1-out".to_owned()), (Direction::In, "vms1-in".to_owned())];
    // What the programs act on: the old session's or the new one's, nothing in between.
    let controls =
        |s: &SessionConfig| (s.state, s.filter, s.snaplen, s.sample_every, s.rate_unit, s.rate, s.burst);
    for (what, change) in [("filter and rate", filter_and_rate), ("snaplen", snaplen)] {
        let setup = || with_session(gre(), AttachModeChoice::Netlink);
        let before = setup().observed().sessions[&1];
        let plan = plan_update(1, &before, &change).unwrap();
        let update = |fake: &Fake| run(apply_update(fake, &plan, &targets)).is_ok();
        let total = changes_of(&setup, &update);
        for k in 0..=total {
            let fake = setup();
            fake.kill_after(k);
            assert_eq!(update(&fake), k == total, "{what}");
            clean_up_after_kill(&fake);
            // One map write switches: the session is active, with the old controls or the new,
            // and the programs read a complete filter slot either way.
            let session = fake.observed().sessions[&1];
            assert!(
                controls(&session) == controls(&before) || controls(&session) == controls(&plan.config),
                "{what}: killed after {k}: {session:?}"
            );
            detach_all(&fake);
            assert_nothing_left(&fake, &[], &format!("{what}: update killed after {k}"));
        }
    }
}

#[test]
fn a_killed_rehome_leaves_only_what_the_next_command_removes() {
    for mode in [AttachModeChoice::Netlink, AttachModeChoice::Tcx] {
        let recreated = Tap { ifindex: 12, name: "tap0".into() };
        let rehome = |fake: &Fake| {
            let observed = fake.observed();
            let plan =
                plan_rehome(1, &recreated, mode, mode == AttachModeChoice::Tcx, &observed).unwrap().unwrap();
            run(apply_rehome(fake, &plan)).is_ok()
        };
        let setup = || with_session(gre(), mode);
        let total = changes_of(&setup, &rehome);
        for k in 0..=total {
            let fake = setup();
            fake.kill_after(k);
            assert_eq!(rehome(&fake), k == total);
            clean_up_after_kill(&fake);
            // The session stays, active, on its old tap (which the daemon re-homes again) or
            // on the new one; no busy remains.
            let observed = fake.observed();
            assert_eq!(observed.sessions[&1].state, SESSION_ACTIVE, "{mode:?}, killed after {k}");
            assert!(observed.sessions.values().all(|s| s.state != SESSION_BUSY));
            detach_all(&fake);
            assert_nothing_left(&fake, &[], &format!("rehome ({mode:?}) killed after {k}"));
        }
    }
}

#[test]
fn a_killed_attach_never_removes_a_clsact_that_was_there() {
    let setup = || {
        let fake = Fake::new(&Observed::default(), |_| false);
        fake.add_clsact(7);
        fake.add_clsact(30);
        fake
    };
    let attach_local = |fake: &Fake| attach(fake, local_dev(), AttachModeChoice::Netlink, Owner::Persistent);
    let total = changes_of(&setup, &attach_local);
    for k in 0..=total {
        let fake = setup();
        fake.kill_after(k);
        attach_local(&fake);
        clean_up_after_kill(&fake);
        detach_all(&fake);
        assert_eq!(fake.held().clsact, BTreeSet::from([7, 30]), "killed after {k}");
        assert_nothing_left(&fake, &[7, 30], &format!("killed after {k}"));
    }
}

#[test]
fn without_the_records_made_first_a_kill_would_leave_state_behind() {
    // The device left between its two requests: the name is vmsniff's, the alias not yet.
    let fake = Fake::new(&Observed::default(), |_| false);
    let plan = attach_plan(&Observed::default(), gre(), AttachModeChoice::Netlink, Owner::Persistent);
    // LoadPrograms, ClaimSession, ResetCounters x2, WriteFilter, CreateGreDevice (1 of 2).
    fake.kill_after(6);
    assert!(run(apply_attach(&fake, &plan)).is_err());
    let held = fake.held();
    assert_eq!(held.devices.len(), 1);
    assert_eq!(held.devices.values().next().unwrap().alias, None, "created, not yet marked");
    assert_eq!(fake.observed().sessions[&1].target_ifindex, [0, 0], "not recorded");
    // Which the cleanup finds by the session it was created for: the orphan's device name.
    clean_up_after_kill(&fake);
    assert_nothing_left(&fake, &[], "the unmarked device is removed");
}
