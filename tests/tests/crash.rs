//! Crash windows with the real binary: a debug build of vmsniff SIGKILLs itself right after
//! its Nth kernel change when VMSNIFF_TEST_KILL_AT=N (`sys/kill_point.rs`). For every N of an
//! attach and of a detach, the kill leaves only what the next command recognises: `status`
//! reads it, `detach --all` removes it exactly (no pins, no filter or TCX link, no clsact
//! qdisc vmsniff added), and the VM's frames pass unchanged throughout. The unit tests
//! (`apply/crash_tests.rs`) kill every operation at every change against the executor's fake;
//! this checks that the real kernel and pins agree.
// Test code throughout: helpers outside `#[test]` functions fail the test by panicking too.
#![expect(clippy::unwrap_used, reason = "a failed step fails the test")]

use std::{os::unix::process::ExitStatusExt as _, process::Output};

use vmsniff_tests::{
    frames,
    netns::Netns,
    privileged_on_host,
    topology::{Hypervisor, MIRROR_DEV, TAP},
    vmsniff,
};

/// Runs vmsniff in `ns`, killed after its `kill_at`th kernel change.
fn run_killed_at(ns: &Netns, kill_at: usize, args: &[&str]) -> Output {
    let bin = vmsniff::binary();
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    ns.enter(move || {
        std::process::Command::new(bin)
            .args(&args)
            .env("VMSNIFF_TEST_KILL_AT", kill_at.to_string())
            .output()
            .unwrap()
    })
}

/// Whether the run was killed (true) or completed (false).
fn killed(out: &Output, what: &str) -> bool {
    match out.status.signal() {
        Some(9) => true,
        None if out.status.success() => false,
        _ => panic!("{what}: {} {}", out.status, String::from_utf8_lossy(&out.stderr)),
    }
}

/// Nothing of vmsniff's is left in `ns`.
fn nothing_left(ns: &Netns, what: &str) {
    assert!(!ns.pin_dir().exists(), "{what}: pins left at {}", ns.pin_dir().display());
    for (dev, hooks) in [(TAP, &["ingress", "egress"][..]), (MIRROR_DEV, &["egress"][..])] {
        for hook in hooks {
            let (_, filters, _) = ns.try_sh(&format!("tc filter show dev {dev} {hook}"));
            assert!(!filters.contains("vmsniff"), "{what}: a vmsniff filter on {dev} {hook}: {filters}");
        }
        assert!(ns.tcx_programs(dev).is_empty(), "{what}: TCX programs on {dev}");
        let qdiscs = ns.sh(&format!("tc qdisc show dev {dev}"));
        assert!(!qdiscs.contains("clsact"), "{what}: a clsact qdisc left on {dev}: {qdiscs}");
    }
}

/// After a kill: `status` reads what is left, the VM's frames pass, `detach --all` removes it.
fn next_command_cleans(hv: &mut Hypervisor, what: &str) {
    vmsniff::ok(&hv.ns, &["status", "--json"]);
    let (out, back) = frames::both_ways(2);
    hv.vm_sends(&out);
    hv.vm_receives(&back);
    vmsniff::ok(&hv.ns, &["detach", "--all"]);
    nothing_left(&hv.ns, what);
}

#[test]
fn a_kill_at_every_change_of_attach_and_detach_leaves_only_what_detach_removes() {
    if !privileged_on_host(
        "a_kill_at_every_change_of_attach_and_detach_leaves_only_what_detach_removes",
        "what a kill leaves is vmsniff's order of changes; the attach paths run in every guest elsewhere",
    ) {
        return;
    }
    let mut hv = Hypervisor::new();
    let _mirror = hv.mirror_port();
    nothing_left(&hv.ns, "before");
    for mode in vmsniff::attach_modes() {
        let attach =
            ["attach", "--tap", TAP, "--to-dev", MIRROR_DEV, "--filter", "ip", "--attach-mode", mode];
        let mut kills = 0;
        for n in 1.. {
            let what = format!("attach ({mode}) killed after {n} changes");
            if !killed(&run_killed_at(&hv.ns, n, &attach), &what) {
                vmsniff::ok(&hv.ns, &["detach", "--all"]);
                nothing_left(&hv.ns, &what);
                break;
            }
            kills += 1;
            next_command_cleans(&mut hv, &what);
        }
        assert!(kills >= 8, "attach ({mode}): only {kills} kill points");
        for n in 1.. {
            let what = format!("detach ({mode}) killed after {n} changes");
            vmsniff::attach(&hv.ns, &attach[1..]);
            if !killed(&run_killed_at(&hv.ns, n, &["detach", "--all"]), &what) {
                nothing_left(&hv.ns, &what);
                break;
            }
            next_command_cleans(&mut hv, &what);
        }
        eprintln!("attach ({mode}): {kills} kill points, each cleaned by detach --all");
    }
}
