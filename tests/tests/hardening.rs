//! Unprivileged users on the node: files vmsniff writes as root in shared places are never
//! written through a link someone planted, its lock cannot be taken over, and `reload` never
//! signals a process that is not the daemon. Each test fails without its fix.
// Test code throughout: helpers outside `#[test]` functions fail the test by panicking too.
#![expect(clippy::unwrap_used, reason = "a failed step fails the test")]

use std::{
    os::unix::fs::{MetadataExt as _, PermissionsExt as _},
    path::PathBuf,
    process::{Command, Stdio},
};

use vmsniff_tests::{
    netns::Netns,
    privileged_on_host,
    topology::{Hypervisor, TAP},
    vmsniff,
};

/// A directory like /tmp: anyone may create files in it (here, the attacker's links).
struct Shared(PathBuf);

impl Shared {
    fn new(name: &str) -> Shared {
        let dir = std::env::temp_dir().join(format!("vmsniff-hardening-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o1777)).unwrap();
        Shared(dir)
    }

    /// A file root cares about, and a link to it where the operator will write.
    fn planted_link(&self, link: &str) -> (PathBuf, PathBuf) {
        let precious = self.0.join("precious");
        std::fs::write(&precious, "root's data").unwrap();
        let link = self.0.join(link);
        std::os::unix::fs::symlink(&precious, &link).unwrap();
        (precious, link)
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn captures_are_never_written_through_a_planted_link() {
    if !privileged_on_host(
        "captures_are_never_written_through_a_planted_link",
        "how files are opened, the same on every kernel",
    ) {
        return;
    }
    let hv = Hypervisor::new();
    let shared = Shared::new("captures");
    let (precious, link) = shared.planted_link("cap.pcapng");
    let link_arg = link.to_str().unwrap();
    let err = vmsniff::fails(&hv.ns, &["collect", "-w", link_arg, "-c", "1"]);
    assert!(err.contains("symbolic link"), "{err}");
    let err = vmsniff::fails(&hv.ns, &["capture", "--tap", TAP, "-w", link_arg, "-c", "1"]);
    assert!(err.contains("symbolic link"), "{err}");
    assert_eq!(std::fs::read_to_string(&precious).unwrap(), "root's data");
    // A capture in a real file is root's alone: it holds the tenants' frames.
    let out = shared.0.join("real.pcapng");
    let collect = vmsniff::binary();
    let out_arg = out.clone();
    let mut child = hv.ns.enter(move || {
        Command::new(collect).arg("collect").arg("-w").arg(&out_arg).stderr(Stdio::null()).spawn().unwrap()
    });
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !out.exists() {
        assert!(std::time::Instant::now() < deadline, "collect made no file");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::SIGINT);
    child.wait().unwrap();
    assert_eq!(std::fs::metadata(&out).unwrap().permissions().mode() & 0o777, 0o600);
}

#[test]
fn a_lock_file_another_user_made_is_refused_by_name() {
    if !privileged_on_host(
        "a_lock_file_another_user_made_is_refused_by_name",
        "the host-wide lock file, the same on every kernel",
    ) {
        return;
    }
    let hv = Hypervisor::new();
    hv.mirror_port();
    let lock = std::path::Path::new("/run/lock/vmsniff.lock");
    let _ = std::fs::remove_file(lock);
    // An unprivileged user (nobody) gets there first, and could hold it for ever.
    let made = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "touch", "/run/lock/vmsniff.lock"])
        .status()
        .unwrap();
    assert!(made.success());
    assert_eq!(std::fs::metadata(lock).unwrap().uid(), 65534);
    let err =
        vmsniff::fails(&hv.ns, &["attach", "--tap", TAP, "--to-dev", vmsniff_tests::topology::MIRROR_DEV]);
    assert!(err.contains("belongs to uid 65534") && err.contains("rm /run/lock/vmsniff.lock"), "{err}");
    std::fs::remove_file(lock).unwrap();
    // Root's own, as vmsniff makes it: no one else may open it.
    vmsniff::ok(&hv.ns, &["status"]);
    vmsniff::ok(&hv.ns, &["detach", "--all"]);
    let mode = std::fs::metadata(lock).unwrap();
    assert_eq!((mode.uid(), mode.permissions().mode() & 0o777), (0, 0o600));
}

#[test]
fn reload_never_signals_a_process_that_is_not_the_daemon() {
    if !privileged_on_host(
        "reload_never_signals_a_process_that_is_not_the_daemon",
        "the daemon's state file and signals, the same on every kernel",
    ) {
        return;
    }
    let ns = Netns::new("reload");
    let shared = Shared::new("reload");
    // A daemon left its state file and is gone; its pid now belongs to someone else's
    // process, which SIGHUP would end.
    let mut bystander = Command::new("sleep").arg("60").spawn().unwrap();
    let state = format!(
        r#"{{"version":1,"pid":{},"netns":0,"config":"/etc/vmsniff/mirrors.toml","reloads":0,"reload-error":null,"sessions":{{}}}}"#,
        bystander.id()
    );
    std::fs::write(shared.0.join("daemon.json"), state).unwrap();
    let run_dir = shared.0.to_str().unwrap();
    let err = vmsniff::fails(&ns, &["reload", "--run-dir", run_dir, "--timeout", "2"]);
    assert!(err.contains("is not running"), "{err}");
    assert!(bystander.try_wait().unwrap().is_none(), "reload signalled a process that is not the daemon");
    let _ = bystander.kill();
    let _ = bystander.wait();
}
