//! Running `vmsniff daemon` in a test's namespace: its config and run directory in a private
//! temporary directory, killed and removed on drop.
use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use crate::{netns::Netns, vmsniff};

pub struct Daemon {
    pub dir: PathBuf,
    child: Option<Child>,
    ns_name: String,
    /// vmsniff's global options for the daemon and `status` (`--ovsdb ...`).
    global: Vec<String>,
    /// The vmsniff that runs as the daemon.
    bin: PathBuf,
    /// Variables for the daemon's environment besides RUST_LOG (test seams such as
    /// `VMSNIFF_TEST_PASS_STALL_MS`).
    env: Vec<(String, String)>,
}

impl Daemon {
    /// Writes `config` and starts the daemon in `ns`.
    pub fn start(ns: &Netns, config: &str) -> Daemon {
        Daemon::start_with(ns, config, &[])
    }

    /// As [`Daemon::start`], with vmsniff's global options `global` (for the daemon and for
    /// `status`).
    pub fn start_with(ns: &Netns, config: &str, global: &[&str]) -> Daemon {
        Daemon::start_binary(ns, config, global, &vmsniff::binary())
    }

    /// As [`Daemon::start_with`], with `env` in the daemon's environment.
    pub fn start_with_env(ns: &Netns, config: &str, global: &[&str], env: &[(&str, &str)]) -> Daemon {
        Daemon::start_full(ns, config, global, &vmsniff::binary(), env)
    }

    /// As [`Daemon::start_with`], running `bin` as the daemon (an installed package's binary).
    pub fn start_binary(ns: &Netns, config: &str, global: &[&str], bin: &Path) -> Daemon {
        Daemon::start_full(ns, config, global, bin, &[])
    }

    fn start_full(ns: &Netns, config: &str, global: &[&str], bin: &Path, env: &[(&str, &str)]) -> Daemon {
        // Under /tmp: the VM harness's guests have their own tmpfs there.
        let dir = std::env::temp_dir().join(format!("vmsniff-daemon-{}-{}", std::process::id(), ns.name));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create the daemon's test directory");
        let global = global.iter().map(|s| s.to_string()).collect();
        let env = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let mut daemon =
            Daemon { dir, child: None, ns_name: ns.name.clone(), global, bin: bin.to_owned(), env };
        daemon.write_config(config);
        daemon.spawn(ns);
        daemon
    }

    pub fn config(&self) -> PathBuf {
        self.dir.join("mirrors.toml")
    }

    pub fn run_dir(&self) -> String {
        self.dir.join("run").to_string_lossy().into_owned()
    }

    pub fn write_config(&self, config: &str) {
        std::fs::write(self.config(), config).expect("write the daemon's config");
    }

    /// Starts the daemon (again); its stderr goes to `daemon.log` in the test directory.
    pub fn spawn(&mut self, ns: &Netns) {
        assert!(self.child.is_none(), "the daemon runs already");
        let bin = self.bin.clone();
        let (config, run_dir, global, env) =
            (self.config(), self.run_dir(), self.global.clone(), self.env.clone());
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("daemon.log"))
            .expect("open the daemon's log");
        self.child = Some(ns.enter(move || {
            Command::new(bin)
                .args(&global)
                .args(["daemon", "--config"])
                .arg(config)
                .args(["--run-dir", &run_dir])
                .env("RUST_LOG", "info")
                .envs(env)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .expect("start vmsniff daemon")
        }));
    }

    /// The running daemon's pid.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("the daemon runs").id()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("daemon.log")).unwrap_or_default()
    }

    /// Sends `signal` and waits for the daemon to exit; returns whether it exited with 0.
    pub fn stop_with(&mut self, signal: nix::sys::signal::Signal) -> bool {
        let mut child = self.child.take().expect("the daemon runs");
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), signal)
            .expect("signal the daemon");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = child.try_wait().expect("wait for the daemon") {
                return status.success();
            }
            assert!(Instant::now() < deadline, "the daemon did not exit after {signal}:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `vmsniff status --json`'s daemon object, once `ready` holds for it (within 60 s: the
    /// emulated CPUs of the VM harness are slow).
    pub fn wait_for(
        &self,
        ns: &Netns,
        what: &str,
        ready: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let status = self.status(ns);
            if ready(&status) {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: not seen within 60 s; status: {status:#}\nlog:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `vmsniff status --json` with this daemon's run directory.
    pub fn status(&self, ns: &Netns) -> serde_json::Value {
        let run_dir = self.run_dir();
        let mut args: Vec<&str> = self.global.iter().map(String::as_str).collect();
        args.extend(["status", "--json", "--run-dir", &run_dir]);
        let out = vmsniff::ok(ns, &args);
        serde_json::from_str(&out).expect("status --json is JSON")
    }
}

/// The state of config session `name` in a status object, and its kernel session.
pub fn session_state(status: &serde_json::Value, name: &str) -> (String, Option<u64>) {
    let s = &status["daemon"]["sessions"][name];
    (s["state"].as_str().unwrap_or("absent").to_owned(), s["session"].as_u64())
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!("daemon log ({}):\n{}", self.ns_name, self.log());
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
