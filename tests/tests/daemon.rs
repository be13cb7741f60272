//! `vmsniff daemon` on this kernel, through `--to-dev`: a VM's tap deleted and created again is
//! mirrored again as the same session with its counters going on; reloads add, update and
//! remove sessions and refuse a bad config; kill -9 then start adopts the running mirrors
//! without duplicating them; a stop removes everything the daemon made.
// Test code throughout: helpers outside `#[test]` functions fail the test by panicking too.
#![expect(clippy::unwrap_used, clippy::expect_used, reason = "a failed step fails the test")]

use std::time::Duration;

use nix::sys::signal::Signal;
use vmsniff_tests::{
    daemon::{Daemon, session_state},
    frames::{self, PEER_MAC, VM_MAC, is_marked},
    netns::Netns,
    privileged_on_every_kernel, privileged_on_host, run,
    topology::{Hypervisor, MIRROR_DEV, TAP, assert_frames_eq},
    vmsniff,
};

const QUIET: Duration = Duration::from_millis(500);

fn counters(status: &serde_json::Value, id: u64) -> (u64, u64) {
    let s = status["sessions"].as_array().unwrap().iter().find(|s| s["session"] == id).expect("the session");
    (s["counters"]["out"]["frames"].as_u64().unwrap(), s["counters"]["in"]["frames"].as_u64().unwrap())
}

/// The VM sends and receives `n` frames each way; asserts the copies arrive, in order.
fn mirrored(hv: &mut Hypervisor, mirror: &vmsniff_tests::packet::PacketSocket, n: usize, what: &str) {
    let (out, into) = frames::both_ways(n);
    hv.vm_sends(&out);
    assert_frames_eq(
        &format!("{what}: copies out"),
        &out,
        &mirror.capture(out.len(), Duration::from_secs(10), is_marked),
    );
    hv.vm_receives(&into);
    assert_frames_eq(
        &format!("{what}: copies in"),
        &into,
        &mirror.capture(into.len(), Duration::from_secs(10), is_marked),
    );
}

/// Nothing of vmsniff's is left in the namespace: no pins, no filter, no TCX program.
fn assert_nothing_left(ns: &Netns) {
    assert!(!ns.pin_dir().exists(), "pins left at {}", ns.pin_dir().display());
    for hook in ["ingress", "egress"] {
        let filters = run("tc", &["-n", &ns.name, "filter", "show", "dev", TAP, hook]);
        assert!(!filters.contains("vmsniff"), "a vmsniff filter is left on {hook}: {filters}");
    }
    assert_eq!(tap_programs(ns), 0, "vmsniff programs left on the tap");
}

/// vmsniff's programs on the tap, both hooks, whichever way they are attached.
fn tap_programs(ns: &Netns) -> usize {
    let mut count = 0;
    for hook in ["ingress", "egress"] {
        count += run("tc", &["-n", &ns.name, "filter", "show", "dev", TAP, hook])
            .lines()
            .filter(|l| l.contains("vmsniff_tap"))
            .count();
    }
    count
        + ns.enter(|| {
            use aya::programs::{SchedClassifier, TcAttachType};
            [TcAttachType::Ingress, TcAttachType::Egress]
                .into_iter()
                .filter_map(|hook| SchedClassifier::query_tcx(TAP, hook).ok())
                .map(|(_, programs)| {
                    programs
                        .iter()
                        .filter(|p| p.name_as_str().is_some_and(|n| n.starts_with("vmsniff")))
                        .count()
                })
                .sum::<usize>()
        })
}

fn config(mode: &str) -> String {
    format!("[session.vm0]\ntap = \"{TAP}\"\nto-dev = \"{MIRROR_DEV}\"\nattach-mode = \"{mode}\"\n")
}

fn reload(ns: &Netns, daemon: &Daemon) -> std::process::Output {
    vmsniff::run(ns, &["reload", "--run-dir", &daemon.run_dir()])
}

fn active(status: &serde_json::Value, name: &str) -> bool {
    session_state(status, name).0 == "active"
}

#[test]
fn a_recreated_tap_is_mirrored_again_as_the_same_session() {
    if !privileged_on_every_kernel(
        "a_recreated_tap_is_mirrored_again_as_the_same_session",
        "re-attaching after a tap is re-created goes through each kernel's clsact or TCX attach path",
    ) {
        return;
    }
    for mode in vmsniff::attach_modes() {
        vmsniff::report_mode(mode);
        let mut hv = Hypervisor::new();
        let mirror = hv.mirror_port();
        let mut daemon = Daemon::start(&hv.ns, &config(mode));
        let status = daemon.wait_for(&hv.ns, "session vm0 active", |s| active(s, "vm0"));
        let id = session_state(&status, "vm0").1.expect("a kernel session");
        mirrored(&mut hv, &mirror, 10, &format!("[{mode}] before the reboot"));

        // The VM sends a probe every few milliseconds from the moment its new tap exists: the
        // first copy says when the mirror is back (the figure the issue asks about).
        hv.port.vm.recreate(&hv.ns);
        let appeared = hv.port.vm.created;
        let mut copies = Vec::new();
        for probe in 0u32.. {
            hv.port.vm.send(&frames::frame(VM_MAC, PEER_MAC, 0xfffe_0000 + probe, 60));
            copies = mirror.capture(1, Duration::from_millis(5), is_marked);
            if !copies.is_empty() {
                break;
            }
            assert!(
                appeared.elapsed() < Duration::from_secs(60),
                "[{mode}] no copy within 60 s:\n{}",
                daemon.log()
            );
        }
        println!("[{mode}] mirrored again {} ms after the new tap appeared", appeared.elapsed().as_millis());
        hv.ns.sh(&format!("ip link set {TAP} master br0"));
        hv.port.wait_until_forwarding();
        // Every probe the session saw was copied: they count beside the test's own frames.
        copies.extend(mirror.drain(QUIET, is_marked));
        let probes_out = copies.iter().filter(|c| c[6..12] == VM_MAC).count() as u64;
        let probes_in = copies.len() as u64 - probes_out;

        let ifindex = u64::from(hv.ns.ifindex(TAP));
        let status = daemon.wait_for(&hv.ns, "the session on the new tap", |s| {
            s["sessions"]
                .as_array()
                .unwrap()
                .iter()
                .any(|x| x["session"] == id && x["tap-ifindex"] == ifindex)
                && active(s, "vm0")
        });
        assert_eq!(session_state(&status, "vm0").1, Some(id), "[{mode}] the same session");
        assert_eq!(status["sessions"].as_array().unwrap().len(), 1, "[{mode}] one session: {status:#}");
        mirrored(&mut hv, &mirror, 10, &format!("[{mode}] after the reboot"));
        assert_eq!(
            counters(&daemon.status(&hv.ns), id),
            (20 + probes_out, 20 + probes_in),
            "[{mode}] counters go on across the reboot"
        );
        assert!(daemon.log().contains(&format!("re-attached session {id}")), "{}", daemon.log());

        assert!(daemon.stop_with(Signal::SIGTERM), "the daemon's stop failed:\n{}", daemon.log());
        assert_nothing_left(&hv.ns);
        assert!(mirror.drain(QUIET, is_marked).is_empty());
        hv.vm_sends(&frames::both_ways(4).0);
        assert!(mirror.drain(QUIET, is_marked).is_empty(), "[{mode}] copies after the daemon stopped");
    }
}

#[test]
fn kill_9_then_start_adopts_the_mirror_without_a_gap_or_a_duplicate() {
    if !privileged_on_host(
        "kill_9_then_start_adopts_the_mirror_without_a_gap_or_a_duplicate",
        "adoption reads pins, which look the same on every kernel; both attach paths run on the host",
    ) {
        return;
    }
    for mode in vmsniff::attach_modes() {
        kill_9_then_start(mode);
    }
}

fn kill_9_then_start(mode: &str) {
    vmsniff::report_mode(mode);
    let mut hv = Hypervisor::new();
    let mirror = hv.mirror_port();
    let mut daemon = Daemon::start(&hv.ns, &config(mode));
    let status = daemon.wait_for(&hv.ns, "session vm0 active", |s| active(s, "vm0"));
    let id = session_state(&status, "vm0").1.unwrap();
    mirrored(&mut hv, &mirror, 5, "before kill -9");
    assert!(!daemon.stop_with(Signal::SIGKILL));
    mirrored(&mut hv, &mirror, 5, "while the daemon is dead");

    daemon.spawn(&hv.ns);
    let pid = u64::from(daemon.pid());
    let status = daemon.wait_for(&hv.ns, "adopted", |s| active(s, "vm0") && s["daemon"]["pid"] == pid);
    assert_eq!(session_state(&status, "vm0").1, Some(id), "adopted, not attached again");
    assert_eq!(status["sessions"].as_array().unwrap().len(), 1, "no duplicate session: {status:#}");
    assert_eq!(tap_programs(&hv.ns), 2, "one program per hook, not two");
    mirrored(&mut hv, &mirror, 5, "after the restart");
    assert_eq!(counters(&daemon.status(&hv.ns), id), (15, 15), "counters go on");
    assert_eq!(
        daemon.log().matches("attached as session").count(),
        1,
        "attached once, by the first start:\n{}",
        daemon.log()
    );

    assert!(daemon.stop_with(Signal::SIGTERM));
    assert_nothing_left(&hv.ns);
}

#[test]
fn reload_adds_updates_and_removes_sessions_and_refuses_a_bad_config() {
    if !privileged_on_host(
        "reload_adds_updates_and_removes_sessions_and_refuses_a_bad_config",
        "reload bookkeeping: config parsing and session planning, the same on every kernel",
    ) {
        return;
    }
    let mut hv = Hypervisor::new();
    let mirror = hv.mirror_port();
    let mut second = hv.add_vm("tapvm1", 1);
    let one = format!("[session.vm0]\ntap = \"{TAP}\"\nto-dev = \"{MIRROR_DEV}\"\n");
    let mut daemon = Daemon::start(&hv.ns, &one);
    let status = daemon.wait_for(&hv.ns, "vm0 active", |s| active(s, "vm0"));
    let id0 = session_state(&status, "vm0").1.unwrap();

    // Add a session.
    daemon.write_config(&format!("{one}\n[session.vm1]\ntap = \"tapvm1\"\nto-dev = \"{MIRROR_DEV}\"\n"));
    let out = reload(&hv.ns, &daemon);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let status = daemon.status(&hv.ns);
    assert!(active(&status, "vm0") && active(&status, "vm1"), "{status:#}");
    assert_eq!(session_state(&status, "vm0").1, Some(id0), "vm0 untouched");
    let (out_frames, _) = frames::both_ways(6);
    second.vm_sends(&out_frames);
    assert_frames_eq("vm1's copies", &out_frames, &mirror.capture(6, Duration::from_secs(10), is_marked));

    // Change vm0's filter in place: same session.
    daemon.write_config(&format!(
        "[session.vm0]\ntap = \"{TAP}\"\nto-dev = \"{MIRROR_DEV}\"\nfilter = \"arp\"\n\n[session.vm1]\ntap = \"tapvm1\"\nto-dev = \"{MIRROR_DEV}\"\n"
    ));
    assert!(reload(&hv.ns, &daemon).status.success());
    let status = daemon.status(&hv.ns);
    assert_eq!(session_state(&status, "vm0").1, Some(id0), "a filter change keeps the session");
    let s0 = status["sessions"].as_array().unwrap().iter().find(|s| s["session"] == id0).unwrap().clone();
    assert_eq!(s0["filter"], "arp");
    hv.vm_sends(&frames::both_ways(4).0);
    assert!(mirror.drain(QUIET, is_marked).is_empty(), "the filter holds back non-ARP frames");

    // Remove vm1, and a bad config is refused with its line, changing nothing.
    daemon.write_config(&one);
    assert!(reload(&hv.ns, &daemon).status.success());
    let status = daemon.status(&hv.ns);
    assert_eq!(status["sessions"].as_array().unwrap().len(), 1, "{status:#}");
    assert!(status["daemon"]["sessions"]["vm1"].is_null());
    let filters = run("tc", &["-n", &hv.ns.name, "filter", "show", "dev", "tapvm1", "ingress"]);
    assert!(!filters.contains("vmsniff"), "{filters}");

    daemon.write_config(&format!("{one}snaplen = 0\n"));
    let out = reload(&hv.ns, &daemon);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("mirrors.toml:4:") && stderr.contains("snaplen"), "{stderr}");
    let after = daemon.status(&hv.ns);
    assert_eq!(session_state(&after, "vm0").1, Some(id0));
    assert!(after["daemon"]["reload-error"].as_str().is_some_and(|e| e.contains("snaplen")));
    mirrored(&mut hv, &mirror, 3, "after the refused reload");

    // A session whose tap is not there waits, and says so.
    daemon.write_config(&format!("{one}\n[session.later]\ntap = \"tapnone\"\nto-dev = \"{MIRROR_DEV}\"\n"));
    assert!(reload(&hv.ns, &daemon).status.success());
    let status = daemon.status(&hv.ns);
    assert_eq!(session_state(&status, "later").0, "waiting-for-vm");
    let table = vmsniff::ok(&hv.ns, &["status", "--run-dir", &daemon.run_dir()]);
    assert!(table.contains("waiting-for-vm") && table.contains("tapnone"), "{table}");

    assert!(daemon.stop_with(Signal::SIGTERM));
    assert_nothing_left(&hv.ns);
}

#[test]
fn a_bad_config_stops_the_start_with_its_line() {
    if !privileged_on_host("a_bad_config_stops_the_start_with_its_line", "config checks and messages") {
        return;
    }
    let ns = Netns::new("dcfg");
    let dir = std::env::temp_dir().join(format!("vmsniff-badcfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("m.toml");
    std::fs::write(&config, "[session.a]\ntap = \"x\"\nto = \"192.0.2.2\"\ncolour = \"red\"\n").unwrap();
    let run_dir = dir.join("run");
    let config = config.to_string_lossy().into_owned();
    let stderr =
        vmsniff::fails(&ns, &["daemon", "--config", &config, "--run-dir", &run_dir.to_string_lossy()]);
    assert!(stderr.contains("m.toml:4:") && stderr.contains("unknown key \"colour\""), "{stderr}");
    assert!(!ns.pin_dir().exists());
    let stderr = vmsniff::fails(&ns, &["daemon", "--check", "--config", &config]);
    assert!(stderr.contains("m.toml:4:"), "{stderr}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn the_systemd_unit_verifies_and_install_uninstall_are_exact() {
    if !privileged_on_host(
        "the_systemd_unit_verifies_and_install_uninstall_are_exact",
        "files and systemd-analyze, no kernel involved",
    ) {
        return;
    }
    let root = std::env::temp_dir().join(format!("vmsniff-install-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let ns = Netns::new("inst");
    let bin_dir = format!("{}/sbin", root.display());
    // The unit names the binary where it was installed, inside the root: verify checks it.
    vmsniff::ok(&ns, &["install", "--bin-dir", &bin_dir, "--root", &root.to_string_lossy()]);
    let unit = root.join("etc/systemd/system/vmsniff.service");
    let config = root.join("etc/vmsniff/mirrors.toml");
    assert!(config.exists() && unit.exists());
    let text = std::fs::read_to_string(&unit).unwrap();
    assert!(text.contains(&format!("ExecStart={bin_dir}/vmsniff daemon")), "{text}");
    let installed = root.join(bin_dir.trim_start_matches('/')).join("vmsniff");
    assert!(installed.exists(), "{}", installed.display());
    let share = root.join("usr/local/share");
    for file in [
        "man/man8/vmsniff.8",
        "man/man8/vmsniff-attach.8",
        "man/man8/vmsniff-completions.8",
        "bash-completion/completions/vmsniff",
        "zsh/site-functions/_vmsniff",
        "fish/vendor_completions.d/vmsniff.fish",
    ] {
        assert!(share.join(file).is_file(), "install did not put {file}");
    }
    let bash = std::fs::read(share.join("bash-completion/completions/vmsniff")).unwrap();
    assert_eq!(bash, vmsniff::ok(&ns, &["completions", "bash"]).into_bytes(), "one script, two ways");
    match std::process::Command::new("systemd-analyze").arg("--version").output() {
        Ok(_) => {
            // The unit's ExecStart points at the copy inside the root; verify needs it there.
            std::fs::create_dir_all(&bin_dir).unwrap();
            std::fs::copy(&installed, format!("{bin_dir}/vmsniff")).unwrap();
            // verify runs `man` on the unit's Documentation= pages: find them where install put them.
            let out = std::process::Command::new("systemd-analyze")
                .arg("verify")
                .arg(&unit)
                .env("MANPATH", share.join("man"))
                .output()
                .unwrap();
            assert!(
                out.status.success() && out.stderr.is_empty(),
                "systemd-analyze verify: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Err(e) => vmsniff_tests::skip(&format!("systemd-analyze verify not run: {e}")),
    }
    let out = std::process::Command::new(&installed)
        .args(["daemon", "--check", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(out.status.success(), "the example config checks: {}", String::from_utf8_lossy(&out.stderr));

    // A changed config stays; everything else goes.
    std::fs::write(&config, "[daemon]\nkeep-on-stop = true\n").unwrap();
    vmsniff::ok(&ns, &["uninstall", "--bin-dir", &bin_dir, "--root", &root.to_string_lossy()]);
    assert!(!unit.exists() && !installed.exists());
    assert!(config.exists(), "the operator's config is kept");
    // Beside the kept config, only the copy made above for systemd-analyze may stay.
    let verify_copy = std::path::PathBuf::from(format!("{bin_dir}/vmsniff"));
    let left: Vec<_> = files_under(&root).into_iter().filter(|f| *f != config && *f != verify_copy).collect();
    assert!(left.is_empty(), "uninstall left {left:?}");
    std::fs::remove_dir_all(&root).unwrap();
}

/// Every file below `dir`, recursively.
fn files_under(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(files_under(&path));
        } else {
            files.push(path);
        }
    }
    files
}

#[test]
fn filters_another_tool_removes_show_in_status_and_the_daemon_puts_them_back() {
    if !privileged_on_host(
        "filters_another_tool_removes_show_in_status_and_the_daemon_puts_them_back",
        "deleting a clsact qdisc and vmsniff's repair are the same on every kernel",
    ) {
        return;
    }
    let mut hv = Hypervisor::new();
    let mirror = hv.mirror_port();
    // By hand: `tc qdisc del` is common (libvirt, Neutron QoS, operators); status says so.
    let id = vmsniff::attach(&hv.ns, &["--tap", TAP, "--to-dev", MIRROR_DEV, "--attach-mode", "netlink"]);
    hv.ns.sh(&format!("tc qdisc del dev {TAP} clsact"));
    assert_eq!(vmsniff::session(&hv.ns, id)["state"], "programs-gone");
    vmsniff::ok(&hv.ns, &["detach", &id.to_string()]);
    // The daemon puts them back on the event itself: no resync happens within the test.
    let config = format!(
        "[daemon]\nresync-seconds = 3600\n[session.ids]\ntap = \"{TAP}\"\nto-dev = \"{MIRROR_DEV}\"\nattach-mode = \"netlink\"\n"
    );
    let mut daemon = Daemon::start(&hv.ns, &config);
    let status = daemon.wait_for(&hv.ns, "the session active", |s| session_state(s, "ids").0 == "active");
    let id = session_state(&status, "ids").1.expect("a session");
    mirrored(&mut hv, &mirror, 4, "before the qdisc is deleted");
    hv.ns.sh(&format!("tc qdisc del dev {TAP} clsact"));
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !daemon.log().contains("were removed by another tool") {
        assert!(
            std::time::Instant::now() < deadline,
            "the daemon did not restore the filters:\n{}",
            daemon.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let session = vmsniff::session(&hv.ns, u32::try_from(id).unwrap());
    assert_eq!(session["state"], "active", "{session}");
    mirrored(&mut hv, &mirror, 4, "after the daemon put the filters back");
    assert!(daemon.stop_with(Signal::SIGTERM));
    assert_nothing_left(&hv.ns);
}
