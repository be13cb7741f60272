//! A throwaway container that boots a real systemd (PID 1) over an overlay of this machine's
//! root, for tests of the package's service where the host's PID 1 is not systemd.
//!
//! The container shares a test's network namespace (so the test's taps and captures see what
//! the service does), the host's bpffs (pins are keyed by namespace inode), and may call bpf
//! (nspawn's own seccomp filter refuses it otherwise); everything it writes lands in a tmpfs.
use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use crate::{netns::Netns, run};

pub struct Container {
    dir: PathBuf,
    nspawn: Child,
    /// PID of the container's systemd, as this machine sees it.
    init: u32,
}

impl Container {
    /// Boots the container in `ns`; Err(reason) when systemd-nspawn is missing.
    pub fn boot(ns: &Netns) -> Result<Container, String> {
        if !Path::new("/usr/bin/systemd-nspawn").is_file() {
            return Err(
                "systemd-nspawn is not installed (`cargo xtask setup` installs systemd-container)".into()
            );
        }
        let dir = PathBuf::from(format!("/var/tmp/vmsniff-nspawn-{}", std::process::id()));
        let root = dir.join("root");
        std::fs::create_dir_all(&dir).expect("container directory");
        run("mount", &["-t", "tmpfs", "-o", "size=2g", "tmpfs", dir.to_str().expect("utf-8")]);
        for sub in ["upper", "work", "root"] {
            std::fs::create_dir_all(dir.join(sub)).expect("overlay directories");
        }
        let opts = format!("lowerdir=/,upperdir={0}/upper,workdir={0}/work", dir.display());
        run("mount", &["-t", "overlay", "-o", &opts, "overlay", root.to_str().expect("utf-8")]);
        // Images built for containers forbid service starts in dpkg's scripts; a host does not.
        let policy = root.join("usr/sbin/policy-rc.d");
        if policy.exists() {
            std::fs::remove_file(&policy).expect("removing policy-rc.d in the overlay");
        }
        let nspawn = Command::new("systemd-nspawn")
            .arg("--directory")
            .arg(&root)
            .arg(format!("--network-namespace-path={}", ns.path().display()))
            .args([
                "--boot",
                "--register=no",
                "--keep-unit",
                "--capability=all",
                "--system-call-filter=bpf perf_event_open",
                "--bind=/sys/fs/bpf",
                "--console=pipe",
                "--quiet",
                "--",
                // Only what a service needs: the machine's other services stay down.
                "--unit=basic.target",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("nspawn.log")).expect("nspawn's log"))
            .spawn()
            .expect("starting systemd-nspawn");
        let mut container = Container { dir, nspawn, init: 0 };
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(60) {
            // The container's PID 1 once it runs systemd: nspawn's grandchild (or its child, once
            // the intermediate process has exited); nspawn's short-lived helpers are not it.
            let nspawn = container.nspawn.id();
            let mut candidates = children(nspawn);
            candidates.extend(children(nspawn).into_iter().flat_map(children));
            if let Some(init) = candidates.into_iter().find(|pid| {
                std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "systemd")
            }) {
                container.init = init;
                let (ok, out) = container.try_sh("systemctl is-system-running --wait");
                if ok || out.contains("degraded") {
                    return Ok(container);
                }
            }
            if let Ok(Some(exit)) = container.nspawn.try_wait() {
                panic!("systemd-nspawn exited ({exit}):\n{}", container.log());
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!("the container's systemd did not come up within 60 s:\n{}", container.log());
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("nspawn.log")).unwrap_or_default()
    }

    /// Where the host sees a path of the container.
    pub fn path(&self, inside: &str) -> PathBuf {
        self.dir.join("root").join(inside.trim_start_matches('/'))
    }

    /// Runs a shell line inside every namespace of the container's systemd.
    pub fn try_sh(&self, line: &str) -> (bool, String) {
        let out = Command::new("nsenter")
            .args(["-t", &self.init.to_string(), "-a", "sh", "-c", line])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .output()
            .expect("nsenter");
        let text =
            format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        (out.status.success(), text)
    }

    pub fn sh(&self, line: &str) -> String {
        let (ok, out) = self.try_sh(line);
        if !ok && !Path::new(&format!("/proc/{}", self.init)).exists() {
            panic!(
                "in the container: {line}: its systemd is gone:\n{out}\nsystemd-nspawn's log:\n{}",
                self.log()
            );
        }
        assert!(ok, "in the container: {line}:\n{out}");
        out
    }
}

fn children(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

impl Drop for Container {
    fn drop(&mut self) {
        // The container's init takes everything in its PID namespace with it.
        if self.init != 0 {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(i32::try_from(self.init).unwrap_or(i32::MAX)),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let _ = self.nspawn.kill();
        let _ = self.nspawn.wait();
        let _ = Command::new("umount").arg("--lazy").arg(self.dir.join("root")).status();
        let _ = Command::new("umount").arg("--lazy").arg(&self.dir).status();
        let _ = std::fs::remove_dir(&self.dir);
    }
}
