//! The daemon's state file, `<run dir>/daemon.json`: what `vmsniff status` shows of the daemon's
//! sessions (waiting and failing ones have no kernel state to show), what `vmsniff reload`
//! waits on, and the specs the daemon last applied, which a restarted daemon compares with its
//! config. Written whole to a temporary file and renamed, so a reader never sees half of it.
use std::{
    collections::BTreeMap,
    fs, io,
    path::{Path, PathBuf},
};

use crate::service::{files::create_safely, lock_holder};
use serde::{Deserialize, Serialize};

use crate::model::mirror::Mode;

pub const STATE_VERSION: u32 = 1;

/// Where the daemon keeps its runtime files unless `--run-dir` or VMSNIFF_RUN_DIR say otherwise.
pub const DEFAULT_RUN_DIR: &str = "/run/vmsniff";

pub fn state_path(run_dir: &Path) -> PathBuf {
    run_dir.join("daemon.json")
}

pub fn lock_path(run_dir: &Path) -> PathBuf {
    run_dir.join("daemon.lock")
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct DaemonState {
    pub version: u32,
    pub pid: u32,
    /// The network namespace it works in (its inode): status elsewhere ignores it.
    pub netns: u64,
    pub config: String,
    /// Counts finished reloads (SIGHUP, `vmsniff reload`); `reload` waits for it to move.
    pub reloads: u64,
    /// The last reload's error, if it was refused (the previous config stays in force).
    pub reload_error: Option<String>,
    pub sessions: BTreeMap<String, DaemonSession>,
    /// How long the last pass took, in microseconds (what `cargo xtask bench --fleet` reads).
    #[serde(default)]
    pub last_pass_micros: u64,
    /// With `[fleet]`: what the last pass saw of the fleet.
    #[serde(default)]
    pub fleet: Option<FleetPass>,
}

/// The fleet as a daemon's pass saw it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct FleetPass {
    /// Declared mirrors (`None`: not known yet, etcd has not answered and there is no cache).
    pub declared: Option<usize>,
    /// Whether they come from the run directory's cache (etcd not read since the start).
    pub from_cache: bool,
    /// Of them, those whose VM is on this node (with or without a session).
    pub here: usize,
}

/// A config session's state, as the state file and `status` spell it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SessionState {
    /// Its session runs.
    Active,
    /// Its VM is not here now (stopped, migrated away, not plugged yet): it attaches when it is.
    WaitingForVm,
    /// Something only the operator can fix, or a failed attempt (tried again later).
    Error,
}

impl SessionState {
    /// Every state, for the metrics' one-gauge-per-state encoding.
    pub const ALL: [SessionState; 3] =
        [SessionState::Active, SessionState::WaitingForVm, SessionState::Error];

    pub fn as_str(self) -> &'static str {
        match self {
            SessionState::Active => "active",
            SessionState::WaitingForVm => "waiting-for-vm",
            SessionState::Error => "error",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct DaemonSession {
    pub state: SessionState,
    /// Absent in files of daemons from before OVS sessions: eBPF.
    #[serde(default)]
    pub mode: Mode,
    /// Why it waits or fails.
    pub reason: Option<String>,
    /// Its kernel session, when it has one (a waiting session keeps it, with its counters).
    pub session: Option<u32>,
    /// Its config key `vm` or `tap`, and `nic` when given.
    pub vm: Option<String>,
    pub tap: Option<String>,
    /// The attach arguments last applied to its kernel session; `None` before the first attach.
    pub applied: Option<Vec<String>>,
}

impl DaemonState {
    /// Reads the state file; `None` when there is none.
    pub fn read(run_dir: &Path) -> io::Result<Option<Self>> {
        match fs::read(state_path(run_dir)) {
            Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(io::Error::other),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    pub fn write(&self, run_dir: &Path) -> io::Result<()> {
        let path = state_path(run_dir);
        let tmp = path.with_extension("json.tmp");
        // `status` runs as root too; the run directory may be one an operator chose.
        let mut file = create_safely(&tmp, 0o600)?;
        io::Write::write_all(&mut file, &serde_json::to_vec_pretty(self).map_err(io::Error::other)?)?;
        fs::rename(&tmp, &path)
    }

    pub fn remove(run_dir: &Path) -> io::Result<()> {
        match fs::remove_file(state_path(run_dir)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// The daemon's sessions as `vmsniff status` prints them, under the eBPF table.
    pub fn render_table(&self, run_dir: &Path) -> String {
        let mut out = format!(
            "daemon (pid {}{}, {}):\n",
            self.pid,
            if self.daemon_running(run_dir) {
                ""
            } else {
                ", not running: its mirrors stay until it starts again"
            },
            self.config
        );
        if let Some(error) = &self.reload_error {
            out.push_str(&format!("  last reload refused, previous config in force: {error}\n"));
        }
        if self.sessions.is_empty() {
            out.push_str("  no sessions in its config\n");
            return out;
        }
        let width = self.sessions.keys().map(String::len).max().unwrap_or(0).max(4);
        out.push_str(&format!(
            "  {:<width$} {:<4} {:<14} {:>7}  {:<15} REASON\n",
            "NAME", "MODE", "STATE", "SESSION", "VM/TAP"
        ));
        for (name, s) in &self.sessions {
            out.push_str(&format!(
                "  {:<width$} {:<4} {:<14} {:>7}  {:<15} {}\n",
                name,
                s.mode.as_str(),
                s.state.as_str(),
                s.session.map_or("-".into(), |id| id.to_string()),
                s.vm.as_deref().or(s.tap.as_deref()).unwrap_or("-"),
                s.reason.as_deref().unwrap_or("")
            ));
        }
        out
    }

    /// Whether its daemon process still runs: the process that holds the run directory's lock
    /// is the one this state names. A pid alone may have been reused by any process since.
    pub fn daemon_running(&self, run_dir: &Path) -> bool {
        lock_holder(&lock_path(run_dir)) == Some(self.pid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_state_file_round_trips_and_is_replaced_whole() {
        let dir = std::env::temp_dir().join(format!("vmsniff-state-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        assert_eq!(DaemonState::read(&dir).unwrap(), None);
        let mut state = DaemonState { version: STATE_VERSION, pid: std::process::id(), ..Default::default() };
        state.sessions.insert(
            "ids".into(),
            DaemonSession {
                state: SessionState::WaitingForVm,
                mode: Mode::Ebpf,
                reason: Some("VM c-private is shut off".into()),
                session: Some(3),
                vm: Some("c-private".into()),
                tap: None,
                applied: Some(vec!["c-private".into(), "--to".into(), "192.0.2.2".into()]),
            },
        );
        state.write(&dir).unwrap();
        assert_eq!(DaemonState::read(&dir).unwrap(), Some(state.clone()));
        // Running means holding the run directory's lock, not merely a pid that exists.
        assert!(!state.daemon_running(&dir));
        let lock = nix::fcntl::Flock::lock(
            std::fs::File::create(lock_path(&dir)).unwrap(),
            nix::fcntl::FlockArg::LockExclusive,
        )
        .unwrap();
        assert!(state.daemon_running(&dir));
        drop(lock);
        assert!(!dir.join("daemon.json.tmp").exists());
        // The words on disk are those earlier releases wrote and `status --json` shows.
        let json: serde_json::Value = serde_json::from_slice(&fs::read(state_path(&dir)).unwrap()).unwrap();
        assert_eq!(
            (json["sessions"]["ids"]["state"].as_str(), json["sessions"]["ids"]["mode"].as_str()),
            (Some("waiting-for-vm"), Some("ebpf"))
        );
        let old = r#"{"version":1,"pid":1,"netns":2,"config":"c","reloads":0,"reload-error":null,"sessions":{"a":{"state":"active","reason":null,"session":3,"vm":"x","tap":null,"applied":null}}}"#;
        let old: DaemonState = serde_json::from_str(old).unwrap();
        assert_eq!((old.sessions["a"].state, old.sessions["a"].mode), (SessionState::Active, Mode::Ebpf));
        DaemonState::remove(&dir).unwrap();
        DaemonState::remove(&dir).unwrap();
        fs::remove_dir_all(&dir).unwrap();
    }
}
