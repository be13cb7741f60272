//! A real Open vSwitch for tests: the test's own ovsdb-server (see [`crate::ovsdb`]) and an
//! ovs-vswitchd in the test's network namespace, with their own database and run directory,
//! stopped on drop (also when the test fails).
//!
//! With the openvswitch kernel module (the VM harness's kernels) bridges use the kernel datapath
//! and forward; without it (this project's build hosts) they use the userspace `netdev` datapath,
//! which needs no module and is enough for OVSDB's rows, not for GRE forwarding.
use std::{
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use crate::{netns::Netns, ovsdb::OvsdbServer};

/// ovsdb-server and ovs-vswitchd. Field order matters: ovs-vswitchd stops before the database.
pub struct Ovs {
    vswitchd: Child,
    pub server: OvsdbServer,
    /// `system` (kernel datapath) or `netdev` (userspace).
    pub datapath: &'static str,
}

/// Whether this kernel has the openvswitch module loaded (the harness loads it at boot).
pub fn kernel_datapath() -> bool {
    Path::new("/sys/module/openvswitch").exists()
}

/// Open vSwitch 3.1 (Debian 12) caches the CPU count behind a 10-second refresh that starts at
/// CLOCK_MONOTONIC 0 (`count_cpu_cores` in lib/ovs-thread.c): an ovs-vswitchd started in the
/// first 10 s after boot sizes the per-CPU upcall dispatch (kernels from 5.14) for 0 CPUs, starts
/// no handler threads ("Overriding n-handler-threads to 0"), and never forwards until something
/// reconfigures it later. A guest of the VM harness starts its first test a few seconds after
/// boot, so wait until that window has passed.
fn wait_for_cpu_count() {
    const REFRESH: Duration = Duration::from_millis(10_500);
    let since_boot = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(Duration::from)
        .expect("CLOCK_MONOTONIC");
    if let Some(left) = REFRESH.checked_sub(since_boot) {
        eprintln!(
            "waiting {left:.1?} before starting ovs-vswitchd: OVS 3.1 counts 0 CPUs in the first 10 s after boot"
        );
        std::thread::sleep(left);
    }
}

impl Ovs {
    /// Starts both in `ns`; `None` (with the reason printed) without OVS's tools.
    pub fn start(ns: &Netns) -> Option<Ovs> {
        let server = OvsdbServer::start()?;
        let dir = &server.dir;
        if kernel_datapath() {
            wait_for_cpu_count();
        }
        let vswitchd = Command::new("ip")
            .args(["netns", "exec", &ns.name, "ovs-vswitchd"])
            .arg(format!("unix:{}", server.socket.display()))
            .arg(format!("--pidfile={}", dir.join("ovs-vswitchd.pid").display()))
            .arg(format!("--unixctl={}", dir.join("ovs-vswitchd.ctl").display()))
            .arg(format!("--log-file={}", dir.join("ovs-vswitchd.log").display()))
            .arg("--no-chdir")
            .env("OVS_RUNDIR", dir)
            .env("OVS_LOGDIR", dir)
            .env("OVS_DBDIR", dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start ovs-vswitchd");
        let datapath = if kernel_datapath() { "system" } else { "netdev" };
        let ovs = Ovs { vswitchd, server, datapath };
        // Upcalls are lost until ovs-vswitchd answers: wait for it (about 5 s under QEMU).
        let deadline = Instant::now() + Duration::from_secs(60);
        while !ovs.appctl(&["version"]) {
            assert!(Instant::now() < deadline, "ovs-vswitchd did not start: {}", ovs.log());
            std::thread::sleep(Duration::from_millis(200));
        }
        Some(ovs)
    }

    fn appctl(&self, args: &[&str]) -> bool {
        Command::new("ovs-appctl")
            .arg("-t")
            .arg(self.server.dir.join("ovs-vswitchd.ctl"))
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    /// `ovs-vsctl --timeout=60 ARGS`: returns once ovs-vswitchd applied the change.
    pub fn vsctl(&self, args: &[&str]) -> String {
        let out = Command::new("ovs-vsctl")
            .arg(format!("--db=unix:{}", self.server.socket.display()))
            .arg("--timeout=60")
            .args(args)
            .output()
            .expect("ovs-vsctl");
        assert!(out.status.success(), "ovs-vsctl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// A learning-switch bridge (fail_mode standalone: no controller needed) on this datapath.
    pub fn add_bridge(&self, name: &str) {
        self.vsctl(&[
            "add-br",
            name,
            "--",
            "set",
            "Bridge",
            name,
            &format!("datapath_type={}", self.datapath),
            "fail_mode=standalone",
        ]);
    }

    /// The names of the rows of `table`, sorted.
    pub fn names(&self, table: &str) -> Vec<String> {
        let out = self.vsctl(&["--bare", "--columns=name", "list", table]);
        let mut names: Vec<String> = out.lines().filter(|l| !l.is_empty()).map(str::to_owned).collect();
        names.sort();
        names
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.server.dir.join("ovs-vswitchd.log")).unwrap_or_default()
    }

    pub fn address(&self) -> String {
        self.server.address()
    }
}

impl Drop for Ovs {
    fn drop(&mut self) {
        // --cleanup removes the kernel datapath: a plain kill would leave it behind, and the
        // next test's upcalls would be lost.
        let exited = self.appctl(&["exit", "--cleanup"]);
        let deadline = Instant::now() + Duration::from_secs(20);
        while exited && Instant::now() < deadline {
            if matches!(self.vswitchd.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        // It did not exit by itself; what matters is that it is not left running.
        let _ = self.vswitchd.kill();
        let _ = self.vswitchd.wait();
    }
}
