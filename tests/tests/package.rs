//! The Debian package of `cargo xtask deb` on this machine: lintian finds nothing unexplained,
//! `dpkg -i` puts every file in place and enables the service, an upgrade over itself under a
//! running daemon keeps its mirror flowing and the restarted daemon adopts it (same session),
//! and `dpkg --purge` leaves nothing behind, the conffile included. Where this machine's PID 1
//! is not systemd, a second test boots a real systemd in a throwaway container (systemd-nspawn
//! over an overlay of /) to start, restart by upgrade and stop the packaged service there.
// Test code throughout: helpers outside `#[test]` functions fail the test by panicking too.
#![expect(clippy::unwrap_used, reason = "a failed step fails the test")]

use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::Mutex,
    time::{Duration, Instant},
};

use nix::sys::signal::Signal;
use vmsniff_tests::{
    daemon::{Daemon, session_state},
    frames::{self, is_marked},
    nspawn::Container,
    packet::PacketSocket,
    privileged_on_host, skip,
    topology::{Hypervisor, MIRROR_DEV, TAP, assert_frames_eq},
    vmsniff,
};

/// Every file the package installs, and the man pages of two of its commands.
const FILES: &[&str] = &[
    "/usr/sbin/vmsniff",
    "/usr/lib/systemd/system/vmsniff.service",
    "/etc/vmsniff/mirrors.toml",
    "/usr/share/man/man8/vmsniff.8.gz",
    "/usr/share/vmsniff/grafana/vmsniff.json",
    "/usr/share/man/man8/vmsniff-attach.8.gz",
    "/usr/share/man/man8/vmsniff-daemon.8.gz",
    "/usr/share/bash-completion/completions/vmsniff",
    "/usr/share/zsh/vendor-completions/_vmsniff",
    "/usr/share/fish/vendor_completions.d/vmsniff.fish",
    "/usr/share/doc/vmsniff/copyright",
];
/// Where deb-systemd-helper enables the unit, with or without a running systemd.
const ENABLED: &str = "/etc/systemd/system/multi-user.target.wants/vmsniff.service";

/// The container's root is an overlay of the live /: an install on the host meanwhile would
/// change it under the container's feet.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// The package under test: `VMSNIFF_DEB` (the VM harness builds it), else the newest one
/// `cargo xtask deb` left in this target directory's `debian/`.
fn package() -> PathBuf {
    if let Some(deb) = std::env::var_os("VMSNIFF_DEB") {
        return PathBuf::from(deb);
    }
    let exe = std::env::current_exe().unwrap();
    let dir = exe.ancestors().nth(3).unwrap().join("debian");
    let newest = std::fs::read_dir(&dir).ok().and_then(|entries| {
        entries
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("vmsniff_")))
            .max_by_key(|p| p.metadata().and_then(|m| m.modified()).ok())
    });
    newest.unwrap_or_else(|| {
        panic!("no package in {}: build it with `cargo xtask deb`, or set VMSNIFF_DEB", dir.display())
    })
}

fn installed() -> bool {
    let out = Command::new("dpkg-query").args(["-W", "-f=${Status}", "vmsniff"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).contains("installed")
}

fn dpkg(args: &[&str]) {
    let out = Command::new("dpkg").args(args).env("DEBIAN_FRONTEND", "noninteractive").output().unwrap();
    assert!(
        out.status.success(),
        "dpkg {} failed ({}):\n{}{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Purges the package on drop, also when the test fails half-way.
struct Purge;

impl Drop for Purge {
    fn drop(&mut self) {
        if installed() {
            let _ = Command::new("dpkg").args(["--purge", "vmsniff"]).status();
        }
    }
}

/// The VM sends frames; each must come out of the mirror device, in order.
fn mirrored(hv: &mut Hypervisor, mirror: &PacketSocket, what: &str) {
    let (out, _) = frames::both_ways(4);
    hv.vm_sends(&out);
    assert_frames_eq(what, &out, &mirror.capture(out.len(), Duration::from_secs(10), is_marked));
}

fn active(status: &serde_json::Value) -> bool {
    session_state(status, "vm0").0 == "active"
}

#[test]
fn the_package_installs_upgrades_under_a_running_daemon_and_purges_clean() {
    if !privileged_on_host(
        "the_package_installs_upgrades_under_a_running_daemon_and_purges_clean",
        "dpkg, lintian and files; the adoption it checks runs on the host's attach paths",
    ) {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    if installed() {
        skip("a vmsniff package is installed on this machine and this test would replace it: purge it first");
        return;
    }
    let deb = package();
    let deb = deb.to_str().unwrap();
    let lintian = Command::new("lintian").args(["--fail-on", "error,warning", deb]).output().unwrap();
    assert!(lintian.status.success(), "lintian:\n{}", String::from_utf8_lossy(&lintian.stdout));

    let _purge = Purge;
    dpkg(&["-i", deb]);
    for file in FILES {
        assert!(Path::new(file).is_file(), "the package did not install {file}");
    }
    let unit = std::fs::read_to_string("/usr/lib/systemd/system/vmsniff.service").unwrap();
    assert!(unit.contains("ExecStart=/usr/sbin/vmsniff daemon --config /etc/vmsniff/mirrors.toml"), "{unit}");
    let page = std::fs::read("/usr/share/man/man8/vmsniff-attach.8.gz").unwrap();
    assert_eq!(page[..2], [0x1f, 0x8b], "man pages are gzipped");
    let conffiles = String::from_utf8(
        Command::new("dpkg-query").args(["-W", "-f=${Conffiles}", "vmsniff"]).output().unwrap().stdout,
    )
    .unwrap();
    assert!(conffiles.contains("/etc/vmsniff/mirrors.toml"), "not a conffile: {conffiles:?}");
    assert!(Path::new(ENABLED).is_symlink(), "the service is not enabled ({ENABLED})");
    let systemd = Path::new("/run/systemd/system").is_dir();
    if systemd {
        let active = Command::new("systemctl").args(["is-active", "--quiet", "vmsniff"]).status().unwrap();
        assert!(active.success(), "the service did not start on install");
    } else {
        let init = std::fs::read_to_string("/proc/1/comm").unwrap_or_default();
        eprintln!(
            "!!! skipped: the service's start and its restart after the upgrade by systemd: systemd is \
             not running here (PID 1 is {}); the maintainer scripts ran with systemd offline, which \
             must not fail the install, and enabled the unit. The daemon's restart is played below \
             by a stop that keeps its mirrors and a start of the new binary; the service itself runs \
             under a real systemd in the_packaged_service_starts_restarts_on_upgrade_with_its_mirrors_and_stops_under_systemd",
            init.trim()
        );
    }

    // Upgrade over itself while the installed daemon mirrors a VM. keep-on-stop makes its SIGTERM
    // leave the mirror, as the restart job of the package's postinst does (daemon/systemd.rs).
    let mut hv = Hypervisor::new();
    let mirror = hv.mirror_port();
    let config = format!(
        "[daemon]\nkeep-on-stop = true\n\n[session.vm0]\ntap = \"{TAP}\"\nto-dev = \"{MIRROR_DEV}\"\n"
    );
    let mut daemon = Daemon::start_binary(&hv.ns, &config, &[], Path::new("/usr/sbin/vmsniff"));
    let status = daemon.wait_for(&hv.ns, "session vm0 active", active);
    let id = session_state(&status, "vm0").1.unwrap();
    mirrored(&mut hv, &mirror, "before the upgrade");
    dpkg(&["-i", deb]);
    mirrored(&mut hv, &mirror, "after the upgrade, the old daemon still running");
    assert!(daemon.stop_with(Signal::SIGTERM), "the daemon's stop failed:\n{}", daemon.log());
    mirrored(&mut hv, &mirror, "between the old daemon and the new");
    daemon.spawn(&hv.ns);
    let pid = u64::from(daemon.pid());
    let status =
        daemon.wait_for(&hv.ns, "adopted by the new daemon", |s| active(s) && s["daemon"]["pid"] == pid);
    assert_eq!(session_state(&status, "vm0").1, Some(id), "adopted, not attached again");
    assert_eq!(status["sessions"].as_array().unwrap().len(), 1, "no second session: {status:#}");
    mirrored(&mut hv, &mirror, "after the new daemon adopted the mirror");
    assert!(daemon.stop_with(Signal::SIGTERM));
    vmsniff::ok(&hv.ns, &["detach", "--all"]);

    dpkg(&["--purge", "vmsniff"]);
    assert!(!installed(), "dpkg still lists vmsniff after the purge");
    for file in FILES {
        assert!(!Path::new(file).exists(), "{file} is left after the purge");
    }
    assert!(!Path::new("/etc/vmsniff").exists(), "/etc/vmsniff is left after the purge");
    assert!(!Path::new(ENABLED).is_symlink(), "{ENABLED} is left after the purge");
}

/// `vmsniff status --json` inside the container, once `until` holds (30 s at most).
fn container_status(
    c: &Container,
    what: &str,
    until: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let start = Instant::now();
    loop {
        let (ok, out) = c.try_sh("/usr/sbin/vmsniff status --json");
        let status: serde_json::Value = serde_json::from_str(&out).unwrap_or(serde_json::Value::Null);
        if ok && until(&status) {
            return status;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "{what}: not within 30 s; last status:\n{out}\njournal:\n{}",
            c.try_sh("journalctl -u vmsniff --no-pager").1
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn the_packaged_service_starts_restarts_on_upgrade_with_its_mirrors_and_stops_under_systemd() {
    if !privileged_on_host(
        "the_packaged_service_starts_restarts_on_upgrade_with_its_mirrors_and_stops_under_systemd",
        "systemd-nspawn boots this machine's root, which guests share read-only",
    ) {
        return;
    }
    if Path::new("/run/systemd/system").is_dir() {
        skip("systemd runs this machine: the package test checks the service on the host itself");
        return;
    }
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let mut hv = Hypervisor::new();
    let mirror = hv.mirror_port();
    let c = match Container::boot(&hv.ns) {
        Ok(c) => c,
        Err(why) => {
            skip(&format!("the service under a real systemd: {why}"));
            return;
        }
    };
    // A real systemd is PID 1 in there, not a stand-in.
    assert_eq!(c.sh("cat /proc/1/comm").trim(), "systemd");
    // /run is the container's own tmpfs: looked at from inside.
    assert!(c.try_sh("test -d /run/systemd/system").0, "no /run/systemd/system in the container");

    std::fs::copy(package(), c.path("/var/tmp/vmsniff.deb")).unwrap();
    c.sh("dpkg -i /var/tmp/vmsniff.deb");
    // The postinst started the service: Type=notify, so active means the daemon said ready.
    c.sh("systemctl is-active vmsniff");
    std::fs::write(
        c.path("/etc/vmsniff/mirrors.toml"),
        format!("[session.vm0]\ntap = \"{TAP}\"\nto-dev = \"{MIRROR_DEV}\"\n"),
    )
    .unwrap();
    c.sh("systemctl reload vmsniff");
    let status = container_status(&c, "session vm0 active under the unit's hardening", active);
    let (id, pid) = (session_state(&status, "vm0").1.unwrap(), status["daemon"]["pid"].clone());
    mirrored(&mut hv, &mirror, "under systemd, before the upgrade");

    // The upgrade's postinst restarts the service: the old daemon leaves its mirror (a restart
    // job, not a stop) and the new one adopts it.
    c.sh("dpkg -i /var/tmp/vmsniff.deb");
    mirrored(&mut hv, &mirror, "under systemd, right after the upgrade");
    let status =
        container_status(&c, "adopted by the restarted daemon", |s| active(s) && s["daemon"]["pid"] != pid);
    assert_eq!(session_state(&status, "vm0").1, Some(id), "adopted, not attached again: {status:#}");
    assert_eq!(status["sessions"].as_array().unwrap().len(), 1, "no second session: {status:#}");
    let journal = c.sh("journalctl -u vmsniff --no-pager");
    assert!(journal.contains("systemd is restarting the service"), "not told as a restart:\n{journal}");
    mirrored(&mut hv, &mirror, "under systemd, after the new daemon adopted the mirror");

    // A stop is not a restart: the daemon detaches what it owns.
    c.sh("systemctl stop vmsniff");
    assert!(!c.try_sh("systemctl is-active --quiet vmsniff").0, "the service still runs after its stop");
    let status: serde_json::Value = serde_json::from_str(&c.sh("/usr/sbin/vmsniff status --json")).unwrap();
    assert_eq!(status["sessions"], serde_json::json!([]), "the stop left sessions: {status:#}");
    assert!(!hv.ns.pin_dir().exists(), "the stop left pins in {}", hv.ns.pin_dir().display());
    c.sh("dpkg --purge vmsniff");
}
