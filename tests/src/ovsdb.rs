//! A real ovsdb-server for tests (vmsniff-user's unit tests use it too): an empty Open_vSwitch database in a private directory,
//! stopped and removed on drop (also when a test fails).
use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

const SCHEMA: &str = "/usr/share/openvswitch/vswitch.ovsschema";
static NEXT: AtomicU32 = AtomicU32::new(0);

pub struct OvsdbServer {
    pub dir: PathBuf,
    pub socket: PathBuf,
    child: Child,
}

impl OvsdbServer {
    /// Starts one, or prints why it cannot and returns `None` (OVS's tools are not installed).
    pub fn start() -> Option<OvsdbServer> {
        let missing: Vec<&str> = ["ovsdb-tool", "ovsdb-server", "ovs-vsctl"]
            .into_iter()
            .filter(|tool| {
                !Command::new(tool).arg("--version").stdout(Stdio::null()).status().is_ok_and(|s| s.success())
            })
            .collect();
        if !missing.is_empty() || !Path::new(SCHEMA).exists() {
            println!(
                "vmsniff-test: skip: OVSDB tests need {} and {SCHEMA} (apt-get install openvswitch-switch, or cargo xtask setup)",
                missing.join(", ")
            );
            return None;
        }
        let dir = std::env::temp_dir().join(format!(
            "vmsniff-ovsdb-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("create the OVSDB test directory");
        let db = dir.join("conf.db");
        let socket = dir.join("db.sock");
        let status =
            Command::new("ovsdb-tool").arg("create").arg(&db).arg(SCHEMA).status().expect("ovsdb-tool");
        assert!(status.success(), "ovsdb-tool create failed");
        let child = Command::new("ovsdb-server")
            .arg(format!("--remote=punix:{}", socket.display()))
            .arg(format!("--pidfile={}", dir.join("ovsdb-server.pid").display()))
            .arg(format!("--unixctl={}", dir.join("ovsdb-server.ctl").display()))
            .arg(format!("--log-file={}", dir.join("ovsdb-server.log").display()))
            .arg("--no-chdir")
            .arg(&db)
            .env("OVS_RUNDIR", &dir)
            .env("OVS_LOGDIR", &dir)
            .env("OVS_DBDIR", &dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start ovsdb-server");
        let server = OvsdbServer { dir, socket, child };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !server.socket.exists() {
            assert!(Instant::now() < deadline, "ovsdb-server did not create {}", server.socket.display());
            std::thread::sleep(Duration::from_millis(20));
        }
        server.vsctl(&["init"]);
        Some(server)
    }

    /// `ovs-vsctl --no-wait ARGS` against this server (no ovs-vswitchd runs to wait for).
    pub fn vsctl(&self, args: &[&str]) {
        let out = Command::new("ovs-vsctl")
            .arg(format!("--db=unix:{}", self.socket.display()))
            .arg("--no-wait")
            .args(args)
            .env("OVS_RUNDIR", &self.dir)
            .output()
            .expect("ovs-vsctl");
        assert!(out.status.success(), "ovs-vsctl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }

    pub fn address(&self) -> String {
        format!("unix:{}", self.socket.display())
    }
}

impl Drop for OvsdbServer {
    fn drop(&mut self) {
        // The server may already be gone; what matters is that it is not left running.
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
