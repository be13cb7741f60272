//! Namespaces and interfaces that come and go, and two vmsniffs at once: a tap deleted and
//! created again while an attach waits for vmsniff's lock is refused, not mirrored half; a
//! second daemon on a run directory names the first's pid; a daemon and a CLI attaching at
//! once are serialised by the lock (one filter per hook, both sessions recorded); a namespace
//! that reuses a deleted one's inode inherits none of its sessions. Each fails without its fix.
// Test code throughout: helpers outside `#[test]` functions fail the test by panicking too.
#![expect(clippy::unwrap_used, reason = "a failed step fails the test")]

use std::{
    fs::OpenOptions,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use nix::fcntl::{Flock, FlockArg};
use vmsniff_tests::{
    daemon::{Daemon, session_state},
    frames,
    netns::Netns,
    privileged_on_host, run,
    topology::{Hypervisor, MIRROR_DEV, TAP},
    vmsniff,
};

/// vmsniff's host-wide lock, held by the test: every state-changing vmsniff waits for it.
fn hold_vmsniff_lock() -> Flock<std::fs::File> {
    let file =
        OpenOptions::new().create(true).truncate(false).write(true).open("/run/lock/vmsniff.lock").unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut file = file;
    loop {
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => return lock,
            Err((back, _)) => {
                assert!(Instant::now() < deadline, "vmsniff's lock stayed taken for 60 s");
                file = back;
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

/// vmsniff's cls_bpf filters on the tap, both hooks.
fn tap_filters(ns: &Netns) -> usize {
    ["ingress", "egress"]
        .iter()
        .map(|hook| {
            run("tc", &["-n", &ns.name, "filter", "show", "dev", TAP, hook])
                .lines()
                .filter(|l| l.contains("vmsniff_tap"))
                .count()
        })
        .sum()
}

#[test]
fn a_tap_created_again_while_attach_waits_for_the_lock_is_refused() {
    if !privileged_on_host(
        "a_tap_created_again_while_attach_waits_for_the_lock_is_refused",
        "the order of resolve and lock, the same on every kernel",
    ) {
        return;
    }
    let mut hv = Hypervisor::new();
    let _mirror = hv.mirror_port();
    let old = hv.ns.ifindex(TAP);
    let lock = hold_vmsniff_lock();
    let bin = vmsniff::binary();
    let attach = hv.ns.enter(move || {
        Command::new(bin)
            .args(["attach", "--tap", TAP, "--to-dev", MIRROR_DEV, "--attach-mode", "netlink"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    });
    // It resolves the tap (milliseconds), then waits for the lock.
    std::thread::sleep(Duration::from_secs(2));
    hv.recreate_tap();
    assert_ne!(hv.ns.ifindex(TAP), old);
    drop(lock);
    let out = attach.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "attach mirrored a tap that changed under it: {err}");
    assert!(
        err.contains(&format!("{TAP} is no longer ifindex {old}")) && err.contains("run the command again"),
        "{err}"
    );
    // Nothing made, nothing attached to the new tap; its frames pass.
    assert!(!hv.ns.pin_dir().exists(), "pins left at {}", hv.ns.pin_dir().display());
    assert_eq!(tap_filters(&hv.ns), 0);
    let (out, back) = frames::both_ways(2);
    hv.vm_sends(&out);
    hv.vm_receives(&back);
    // Run again, it mirrors the tap that is there.
    vmsniff::attach(&hv.ns, &["--tap", TAP, "--to-dev", MIRROR_DEV, "--attach-mode", "netlink"]);
    assert_eq!(tap_filters(&hv.ns), 2);
    vmsniff::ok(&hv.ns, &["detach", "--all"]);
}

#[test]
fn a_second_daemon_on_a_run_directory_names_the_first_ones_pid() {
    if !privileged_on_host(
        "a_second_daemon_on_a_run_directory_names_the_first_ones_pid",
        "the run directory's lock, the same on every kernel",
    ) {
        return;
    }
    let hv = Hypervisor::new();
    hv.mirror_port();
    let daemon = Daemon::start(
        &hv.ns,
        &format!("[session.vm0]\ntap = \"{TAP}\"\nto-dev = \"{MIRROR_DEV}\"\nattach-mode = \"netlink\"\n"),
    );
    daemon.wait_for(&hv.ns, "vm0 active", |s| session_state(s, "vm0").0 == "active");
    // As while the first is starting, before it wrote its state file, or after someone
    // removed it: the pid must come from the lock itself.
    std::fs::remove_file(std::path::Path::new(&daemon.run_dir()).join("daemon.json")).unwrap();
    let config = daemon.config();
    let run_dir = daemon.run_dir();
    let err =
        vmsniff::fails(&hv.ns, &["daemon", "--config", config.to_str().unwrap(), "--run-dir", &run_dir]);
    assert!(
        err.contains(&format!("another vmsniff daemon (pid {}) runs", daemon.pid())),
        "the second daemon does not name the first: {err}"
    );
    // The first goes on, undisturbed.
    assert_eq!(tap_filters(&hv.ns), 2);
}

#[test]
fn a_daemon_and_a_cli_attaching_at_once_are_serialised() {
    if !privileged_on_host(
        "a_daemon_and_a_cli_attaching_at_once_are_serialised",
        "vmsniff's lock, the same on every kernel",
    ) {
        return;
    }
    let hv = Hypervisor::new();
    hv.mirror_port();
    // The CLI's copies go elsewhere: two sessions may not send the same copies to one place.
    hv.ns.sh("ip link add mir2 type veth peer name mir3; ip link set mir2 up; ip link set mir3 up");
    // Both start while the test holds the lock, so both are waiting when it is released.
    let lock = hold_vmsniff_lock();
    let daemon = Daemon::start(
        &hv.ns,
        &format!("[session.vm0]\ntap = \"{TAP}\"\nto-dev = \"{MIRROR_DEV}\"\nattach-mode = \"netlink\"\n"),
    );
    let bin = vmsniff::binary();
    let cli = hv.ns.enter(move || {
        Command::new(bin)
            .args(["attach", "--tap", TAP, "--to-dev", "mir2", "--attach-mode", "netlink"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    });
    std::thread::sleep(Duration::from_secs(2));
    drop(lock);
    let out = cli.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let status = daemon.wait_for(&hv.ns, "vm0 active", |s| session_state(s, "vm0").0 == "active");
    let sessions = status["sessions"].as_array().unwrap();
    assert_eq!(sessions.len(), 2, "both sessions recorded: {status:#}");
    assert_eq!(tap_filters(&hv.ns), 2, "one vmsniff filter per hook, whoever attached first");
    drop(daemon);
    vmsniff::ok(&hv.ns, &["detach", "--all"]);
}

/// `vmsniff status --json`'s sessions in `ns`, and what it said on stderr.
fn sessions_and_warnings(ns: &Netns) -> (Vec<serde_json::Value>, String) {
    let out = vmsniff::run(ns, &["status", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    (status["sessions"].as_array().unwrap().clone(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn a_namespace_that_gets_a_deleted_ones_inode_inherits_none_of_its_sessions() {
    if !privileged_on_host(
        "a_namespace_that_gets_a_deleted_ones_inode_inherits_none_of_its_sessions",
        "namespace cookies exist from Linux 5.14; the 5.10 guest has none to tell namespaces apart",
    ) {
        return;
    }
    let veth = "ip link add v0 type veth peer name v1; ip link set v0 up; ip link set v1 up";
    let gone = Netns::new("gone");
    gone.sh(veth);
    vmsniff::attach(&gone, &["--tap", "v0", "--to-dev", "v1"]);
    let (inode, pins) = (gone.inode(), gone.pin_dir());
    // Deleted with its session in it: the devices and filters go, the pins stay.
    run("ip", &["netns", "del", &gone.name]);
    assert!(pins.exists());
    // The kernel hands the lowest free inode number to the next namespace: hold new ones until
    // one gets the deleted one's.
    let mut held = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    let reused = loop {
        let ns = Netns::new("reuse");
        if ns.inode() == inode {
            break ns;
        }
        held.push(ns);
        assert!(Instant::now() < deadline && held.len() < 200, "no new namespace got inode {inode}");
        std::thread::sleep(Duration::from_millis(20));
    };
    drop(held);
    assert!(pins.exists(), "the deleted namespace's pins are still there for the new one to find");
    let (sessions, warnings) = sessions_and_warnings(&reused);
    assert!(sessions.is_empty(), "the new namespace inherited the deleted one's sessions: {sessions:#?}");
    assert!(warnings.contains("deleted network namespace"), "status does not say so: {warnings}");
    // Its first attach removes them and starts afresh, as session 1.
    reused.sh(veth);
    assert_eq!(vmsniff::attach(&reused, &["--tap", "v0", "--to-dev", "v1"]), 1);
    let (sessions, warnings) = sessions_and_warnings(&reused);
    assert_eq!(sessions.len(), 1, "{sessions:#?}");
    assert!(!warnings.contains("deleted network namespace"), "{warnings}");
    vmsniff::ok(&reused, &["detach", "--all"]);
    assert!(!reused.pin_dir().exists());
}
