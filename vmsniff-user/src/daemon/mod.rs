//! `vmsniff daemon`: keeps the mirrors of a declarative config, re-attaching them when VMs
//! come and go. One task owns the state and waits on signals, link events and timers; every
//! wake-up runs the same idempotent reconcile (config, taps as they are now, kernel state →
//! actions), so a missed or repeated event costs nothing but a later pass.
pub mod config;
mod links;
pub mod reconcile;
pub mod state;
mod systemd;

use crate::ovs::events::OvsEvents;
use std::{
    collections::{BTreeMap, BTreeSet},
    fs::{self, File, OpenOptions},
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::Context as _;
use nix::fcntl::{Flock, FlockArg};
use tokio::{
    signal::unix::{SignalKind, signal},
    time::{Instant, sleep_until},
};
use vmsniff_ebpf::daemon_tag;

use self::{
    config::{DaemonConfig, SessionSpec},
    links::{LinkChange, LinkEvents},
    state::{DaemonSession, DaemonState, STATE_VERSION},
};
use crate::{
    apply::executor::{apply_rehome, apply_update},
    cli::attach::{attach_resolved, describe},
    daemon::reconcile::{
        Action, OvsAction, OvsPort, Placement, daemon_ovs_sessions, daemon_sessions, plan_ovs_reconcile,
        plan_reconcile,
    },
    model::{
        error::chain,
        mirror::{Owner, Tap},
    },
    ovs::{
        apply::{apply_attach as apply_ovs_attach, apply_reselect as apply_ovs_reselect},
        plan::{DaemonOwner, OvsReselectRequest, plan_ovs_reselect},
        port::{OvsPortError, vm_port},
        session::{OvsSession, Snapshot},
    },
    ovsdb,
    plan::{
        rehome::plan_rehome,
        update::{ControlChange, plan_update},
    },
    resolve::{
        interface::InterfaceError,
        select::SelectError,
        vm::{ResolveError, Resolved, Sources},
    },
    service::namespace::{Namespace, tcx_supported},
    sys::netns,
};

/// After a tap appears, libvirt may need a moment before its domain XML names it: waiting
/// sessions are retried this often, for this long after the last link event.
const RETRY_EVERY: Duration = Duration::from_millis(250);
const RETRY_FOR: Duration = Duration::from_secs(15);
/// Link events come in bursts (a VM start makes a tap, a bridge port, a veth pair): one pass
/// after the burst.
const SETTLE: Duration = Duration::from_millis(50);

pub struct Options {
    pub config: PathBuf,
    pub run_dir: PathBuf,
}

pub async fn run(sources: Sources, options: Options) -> anyhow::Result<()> {
    // First, so that a stop during start-up is a clean stop.
    let mut hangup = signal(SignalKind::hangup())?;
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let config = config::load(&options.config)?;
    let namespace = Namespace::open()?;
    fs::create_dir_all(&options.run_dir)
        .with_context(|| format!("creating the run directory {}", options.run_dir.display()))?;
    let _lock = lock_run_dir(&options.run_dir)?;
    let netns = netns::current_inode().context("identifying this network namespace")?;
    let previous = DaemonState::read(&options.run_dir)
        .with_context(|| format!("reading {}", state::state_path(&options.run_dir).display()))?
        .filter(|s| s.netns == netns);
    let mut links = LinkEvents::subscribe().context("subscribing to link events (rtnetlink)")?;
    let mut ovs_changes = OvsEvents::watch(&sources).context("starting the OVSDB monitor thread")?;
    links.know(namespace.kernel.netlink.links().await?.into_iter().map(|l| (l.ifindex, l.name)));
    let mut daemon = Daemon {
        records: previous.map(records_of).unwrap_or_default(),
        state: DaemonState {
            version: STATE_VERSION,
            pid: std::process::id(),
            netns,
            config: options.config.display().to_string(),
            ..Default::default()
        },
        namespace,
        sources,
        config,
        options,
        backoff: BTreeMap::new(),
    };
    log::info!("daemon: started with {} ({})", daemon.options.config.display(), daemon.config);
    daemon.reconcile().await;
    systemd::notify("READY=1");
    let mut resync_at = Instant::now() + daemon.config.resync;
    let mut pass_at: Option<Instant> = None;
    let mut retry_until = Instant::now();
    loop {
        let next_pass = pass_at.unwrap_or(resync_at).min(resync_at);
        tokio::select! {
            _ = hangup.recv() => {
                systemd::notify("RELOADING=1");
                daemon.reload().await;
                systemd::notify("READY=1");
            }
            _ = terminate.recv() => break,
            _ = interrupt.recv() => break,
            change = links.next() => {
                let Some(change) = change else {
                    anyhow::bail!("the link event socket closed; restart the daemon (its mirrors are adopted)");
                };
                log::debug!("{change:?}");
                if daemon.cares_about(&change) {
                    pass_at = Some(Instant::now() + SETTLE);
                    retry_until = Instant::now() + RETRY_FOR;
                }
            }
            () = ovs_changes.next() => {
                if daemon.has_ovs_sessions() {
                    pass_at = Some(Instant::now() + SETTLE);
                    retry_until = Instant::now() + RETRY_FOR;
                }
            }
            _ = sleep_until(next_pass) => {
                if next_pass >= resync_at {
                    resync_at = Instant::now() + daemon.config.resync;
                }
                daemon.reconcile().await;
                pass_at = (daemon.waiting() && Instant::now() < retry_until).then(|| Instant::now() + RETRY_EVERY);
                if let Some(at) = daemon.next_retry() {
                    pass_at = Some(pass_at.map_or(at, |p| p.min(at)));
                }
            }
        }
    }
    systemd::notify("STOPPING=1");
    daemon.stop().await
}

/// One daemon per run directory (and so per node): a second would fight the first.
fn lock_run_dir(run_dir: &Path) -> anyhow::Result<Flock<File>> {
    let path = state::lock_path(run_dir);
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    Flock::lock(file, FlockArg::LockExclusiveNonblock).map_err(|(_, errno)| {
        let holder = DaemonState::read(run_dir).ok().flatten().map(|s| format!(" (pid {})", s.pid)).unwrap_or_default();
        anyhow::anyhow!(
            "another vmsniff daemon{holder} runs with run directory {}: stop it first (`systemctl stop vmsniff`), \
             or give this one another --run-dir ({errno})",
            run_dir.display()
        )
    })
}

/// The specs a previous daemon applied, by session name.
fn records_of(state: DaemonState) -> BTreeMap<String, SessionSpec> {
    state
        .sessions
        .into_iter()
        .filter_map(|(name, s)| Some((name, SessionSpec { line: 0, argv: s.applied? })))
        .collect()
}

struct Daemon {
    namespace: Namespace,
    sources: Sources,
    config: DaemonConfig,
    options: Options,
    /// What was last applied to each config session's kernel session.
    records: BTreeMap<String, SessionSpec>,
    state: DaemonState,
    /// Config sessions whose last attach, re-attach or update failed: not tried again before
    /// `until`. A failed attempt makes and removes devices or rows, which are events of their
    /// own: without a pause it would be retried at once, forever.
    backoff: BTreeMap<String, Backoff>,
}

struct Backoff {
    until: Instant,
    delay: Duration,
    reason: String,
}

/// The first pause after a failure, doubled after each further one up to the longest.
const BACKOFF_FIRST: Duration = Duration::from_secs(2);
const BACKOFF_LONGEST: Duration = Duration::from_secs(300);

impl Daemon {
    /// A tap that appears may be a waiting VM's; one that goes may be a mirrored one.
    fn cares_about(&self, change: &LinkChange) -> bool {
        match change {
            LinkChange::Appeared { .. } => {
                self.waiting() || self.state.sessions.len() < self.config.sessions.len()
            }
            LinkChange::Gone { name, .. } => {
                self.state.sessions.values().any(|s| s.tap.as_deref() == Some(name.as_str()))
            }
        }
    }

    /// Whether OVSDB changes matter: the config has OVS sessions. (Those of an earlier config
    /// go in the pass its reload runs.)
    fn has_ovs_sessions(&self) -> bool {
        self.config.sessions.values().any(SessionSpec::is_ovs)
    }

    /// Why session `name` is not tried now, if it failed recently.
    fn backing_off(&self, name: &str) -> Option<String> {
        let backoff = self.backoff.get(name).filter(|b| b.until > Instant::now())?;
        // The pause, not the time left: the state (and so the log) changes only with a new try.
        Some(format!("{} (tried again {} s after the failure)", backoff.reason, backoff.delay.as_secs()))
    }

    /// Records how an action of session `name` went.
    fn outcome(&mut self, name: &str, result: &Result<(), String>) {
        match result {
            Ok(()) => {
                self.backoff.remove(name);
            }
            Err(reason) => {
                let delay =
                    self.backoff.get(name).map_or(BACKOFF_FIRST, |b| (b.delay * 2).min(BACKOFF_LONGEST));
                let until = Instant::now() + delay;
                self.backoff.insert(name.to_owned(), Backoff { until, delay, reason: reason.clone() });
            }
        }
    }

    /// Whether an action of session `name` waits out its pause (then `failures` says why).
    fn held_back(&self, name: Option<&str>, retried: bool, failures: &mut BTreeMap<String, String>) -> bool {
        let Some(why) = name.filter(|_| retried).and_then(|n| self.backing_off(n)) else { return false };
        failures.insert(name.unwrap_or_default().to_owned(), why);
        true
    }

    /// Records an action's outcome: the session's pause, and its failure for the state.
    fn settle(
        &mut self,
        name: Option<String>,
        retried: bool,
        action: &dyn std::fmt::Debug,
        result: anyhow::Result<()>,
        failures: &mut BTreeMap<String, String>,
    ) {
        let result = result.map_err(|e| chain(e.as_ref()));
        let Some(name) = name else {
            if let Err(reason) = result {
                log::error!("daemon: {action:?} failed: {reason}");
            }
            return;
        };
        if !retried {
            if let Err(reason) = result {
                failures.insert(name, reason);
            }
            return;
        }
        self.outcome(&name, &result);
        if let Err(reason) = result {
            let reason = self.backing_off(&name).unwrap_or(reason);
            failures.insert(name, reason);
        }
    }

    /// When the next session's pause ends.
    fn next_retry(&self) -> Option<Instant> {
        self.backoff.values().map(|b| b.until).filter(|&t| t > Instant::now()).min()
    }

    fn waiting(&self) -> bool {
        self.state.sessions.values().any(|s| s.state != "active")
    }

    async fn reload(&mut self) {
        match config::load(&self.options.config) {
            Ok(config) => {
                let (old, new): (BTreeSet<&String>, BTreeSet<&String>) =
                    (self.config.sessions.keys().collect(), config.sessions.keys().collect());
                log::info!(
                    "daemon: reloaded {} ({config}): {} added, {} removed",
                    self.options.config.display(),
                    new.difference(&old).count(),
                    old.difference(&new).count()
                );
                self.config = config;
                self.state.reload_error = None;
                // A new config deserves a fresh try.
                self.backoff.clear();
            }
            Err(e) => {
                log::error!("daemon: reload refused, the previous config stays in force: {e}");
                self.state.reload_error = Some(e.to_string());
            }
        }
        self.state.reloads += 1;
        self.reconcile().await;
    }

    /// Brings the kernel and OVSDB in line with the config; records every session's state.
    async fn reconcile(&mut self) {
        let (ovs_specs, ebpf_specs): (BTreeMap<String, SessionSpec>, BTreeMap<String, SessionSpec>) =
            self.config.sessions.clone().into_iter().partition(|(_, spec)| spec.is_ovs());
        let mut resolved_taps = BTreeMap::new();
        let mut placements: BTreeMap<String, Placement<Tap>> = BTreeMap::new();
        for (name, spec) in &self.config.sessions {
            let placement =
                match spec.args().mirror.resolve(&self.sources, &self.namespace.kernel.netlink).await {
                    Ok(resolved) => {
                        let tap = Tap { ifindex: resolved.tap().ifindex, name: resolved.tap().name.clone() };
                        resolved_taps.insert(name.clone(), resolved);
                        Placement::Here(tap)
                    }
                    Err(e) if waits(&e) => Placement::Waiting(chain(&e)),
                    Err(e) => Placement::Error(chain(&e)),
                };
            placements.insert(name.clone(), placement);
        }
        let mut failures: BTreeMap<String, String> = BTreeMap::new();
        let ebpf_actions = match self.clean_and_observe().await {
            Ok(observed) => {
                let ebpf_placements = placements.iter().filter(|(n, _)| ebpf_specs.contains_key(*n));
                let ebpf_placements: BTreeMap<String, Placement<Tap>> =
                    ebpf_placements.map(|(n, p)| (n.clone(), p.clone())).collect();
                plan_reconcile(&ebpf_specs, &ebpf_placements, &self.records, &observed)
            }
            // OVS sessions need no BPF: they are still looked after.
            Err(e) => {
                let reason = format!("cannot read vmsniff's kernel state: {}", chain(e.as_ref()));
                for name in ebpf_specs.keys() {
                    failures.insert(name.clone(), reason.clone());
                }
                Vec::new()
            }
        };
        for action in ebpf_actions {
            let (name, retried) = (action.name().map(str::to_owned), action.retried());
            if self.held_back(name.as_deref(), retried, &mut failures) {
                continue;
            }
            let result = self.apply(&action, &resolved_taps).await;
            self.settle(name, retried, &action, result, &mut failures);
        }
        let ovs_sessions =
            self.reconcile_ovs(&ovs_specs, &mut placements, &resolved_taps, &mut failures).await;
        let observed = self.namespace.observe().unwrap_or_default();
        self.record_states(&placements, &observed, &ovs_sessions, failures);
    }

    /// The OVS half of a pass: each OVS session's VM port in OVSDB, then the plan. Returns the
    /// OVS sessions as they are afterwards. Without OVSDB, OVS sessions fail with the reason
    /// (and the daemon's OVS sessions, if any, stay as they are).
    async fn reconcile_ovs(
        &mut self,
        specs: &BTreeMap<String, SessionSpec>,
        placements: &mut BTreeMap<String, Placement<Tap>>,
        resolved: &BTreeMap<String, Resolved>,
        failures: &mut BTreeMap<String, String>,
    ) -> BTreeMap<u32, OvsSession> {
        let mut client = match crate::service::ovs::connect(&self.sources) {
            Ok(client) => client,
            Err(e) if specs.is_empty() => {
                log::debug!("no OVSDB, so no OVS sessions of the daemon to look after: {e}");
                return BTreeMap::new();
            }
            Err(e) => {
                let reason = format!(
                    "{}; is Open vSwitch running (`systemctl status openvswitch-switch`)?",
                    chain(&e)
                );
                for name in specs.keys() {
                    failures.insert(name.clone(), reason.clone());
                }
                return BTreeMap::new();
            }
        };
        let snapshot = match Snapshot::read(&mut client) {
            Ok(snapshot) => snapshot,
            Err(e) => {
                for name in specs.keys() {
                    failures.insert(name.clone(), format!("reading OVSDB: {}", chain(&e)));
                }
                return BTreeMap::new();
            }
        };
        let mut ports: BTreeMap<String, Placement<OvsPort>> = BTreeMap::new();
        for name in specs.keys() {
            let port = match (&placements[name], resolved.get(name)) {
                (Placement::Here(tap), Some(resolved)) => {
                    match vm_port(&self.namespace.kernel.netlink, resolved, &snapshot).await {
                        Ok(port) => Placement::Here(OvsPort {
                            bridge: port.bridge,
                            port: port.port,
                            tap: tap.name.clone(),
                        }),
                        // On a Linux bridge with no way into OVS: only the operator can change that.
                        Err(e @ OvsPortError::LinuxBridge { .. }) => Placement::Error(chain(&e)),
                        // The tap is there before its OVS port is (Nova plugs, libvirt adds the
                        // tap to its bridge): wait, saying what is missing.
                        Err(e) => {
                            Placement::Waiting(format!("its OVS port is not there (yet): {}", chain(&e)))
                        }
                    }
                }
                (Placement::Waiting(why), _) => Placement::Waiting(why.clone()),
                (Placement::Error(why), _) => Placement::Error(why.clone()),
                (Placement::Here(_), None) => continue,
            };
            // What the session's state says: its tap may be here and its port not.
            match &port {
                Placement::Waiting(why) => placements.insert(name.clone(), Placement::Waiting(why.clone())),
                Placement::Error(why) => placements.insert(name.clone(), Placement::Error(why.clone())),
                Placement::Here(_) => None,
            };
            ports.insert(name.clone(), port);
        }
        let sessions = snapshot.sessions();
        // OVS sessions outlive /run (a host reboot): what they were made from is in their rows.
        for session in sessions.values() {
            if let (Some(name), Some(argv)) = (session.daemon(), session.daemon_args()) {
                self.records.insert(name.to_owned(), SessionSpec { line: 0, argv });
            }
        }
        for action in plan_ovs_reconcile(specs, &ports, &self.records, &sessions) {
            let (name, retried) = (action.name().map(str::to_owned), action.retried());
            if self.held_back(name.as_deref(), retried, failures) {
                continue;
            }
            let result = self.apply_ovs(&mut client, &action, resolved).await;
            self.settle(name, retried, &action, result, failures);
        }
        Snapshot::read(&mut client).map(|s| s.sessions()).unwrap_or_default()
    }

    async fn apply_ovs(
        &mut self,
        client: &mut ovsdb::Client,
        action: &OvsAction,
        resolved: &BTreeMap<String, Resolved>,
    ) -> anyhow::Result<()> {
        match action {
            OvsAction::Attach { name, .. } => {
                let spec = self.config.sessions[name].clone();
                let args = spec.args();
                let _lock = self.namespace.lock()?;
                let owner = DaemonOwner { name: name.clone(), argv: spec.argv.clone() };
                let planned = crate::service::ovs::plan_attach(
                    &self.namespace,
                    client,
                    &args.mirror,
                    &resolved[name],
                    Some(owner),
                )
                .await?;
                apply_ovs_attach(client, &planned.plan)?;
                log::info!("session {name}: attached as OVS session {}: {}", planned.plan.id, planned.what);
                self.records.insert(name.clone(), spec);
            }
            OvsAction::Reselect { name, id, port } => {
                let args = self.config.sessions[name].args();
                let snapshot = Snapshot::read(client)?;
                let sessions = snapshot.sessions();
                let session = sessions.get(id).with_context(|| format!("OVS session {id} is gone"))?;
                let request = OvsReselectRequest {
                    vm_port: port.port.clone(),
                    directions: args.mirror.direction,
                    tap: port.tap.clone(),
                };
                apply_ovs_reselect(client, &plan_ovs_reselect(session, &request, &snapshot)?)?;
                log::info!(
                    "session {name}: OVS session {id} mirrors {} again, port {} on {}; its GRE port and key stay",
                    describe(&resolved[name]),
                    port.port,
                    port.bridge
                );
            }
            OvsAction::Detach { name, id } => {
                crate::service::ovs::detach(client, &BTreeSet::from([*id]))?;
                match name {
                    Some(name) => {
                        log::info!("session {name}: detached OVS session {id} (its config changed)")
                    }
                    None => log::info!("daemon: detached OVS session {id}: its config session is gone"),
                }
                if let Some(name) = name {
                    self.records.remove(name);
                }
            }
        }
        Ok(())
    }

    async fn clean_and_observe(&self) -> anyhow::Result<crate::model::observed::Observed> {
        let _lock = self.namespace.lock()?;
        self.namespace.clean_orphans().await?;
        Ok(self.namespace.observe()?)
    }

    async fn apply(&mut self, action: &Action, resolved: &BTreeMap<String, Resolved>) -> anyhow::Result<()> {
        match action {
            Action::Attach { name, .. } => {
                let spec = self.config.sessions[name].clone();
                let args = spec.args();
                let (id, _) = attach_resolved(
                    &self.namespace,
                    &self.sources,
                    &args.mirror,
                    &args.controls,
                    &resolved[name],
                    Owner::Daemon { tag: daemon_tag(name) },
                )
                .await?;
                log::info!("session {name}: attached as session {id} to {}", describe(&resolved[name]));
                self.records.insert(name.clone(), spec);
            }
            Action::Rehome { name, id, tap } => {
                let args = self.config.sessions[name].args();
                let _lock = self.namespace.lock()?;
                let observed = self.namespace.observe()?;
                if let Some(plan) = plan_rehome(
                    *id,
                    tap,
                    args.mirror.attach_mode.unwrap_or_default(),
                    tcx_supported(),
                    &observed,
                )? {
                    apply_rehome(&self.namespace.kernel, &plan).await?;
                    log::info!(
                        "session {name}: re-attached session {id} to {} (ifindex {}); its counters go on",
                        describe(&resolved[name]),
                        tap.ifindex
                    );
                }
            }
            Action::Update { name, id } => {
                let spec = self.config.sessions[name].clone();
                let controls = spec.args().controls.controls()?;
                let change = ControlChange {
                    filter: Some(controls.filter),
                    snaplen: Some(controls.snaplen),
                    sample_every: Some(controls.sample_every),
                    rate_limit: Some(controls.rate_limit),
                };
                let _lock = self.namespace.lock()?;
                let observed = self.namespace.observe()?;
                let current = observed.sessions.get(id).with_context(|| format!("session {id} is gone"))?;
                apply_update(&self.namespace.kernel, &plan_update(*id, current, &change)?)?;
                log::info!(
                    "session {name}: session {id} updated in place (filter, snaplen, sample, rate limit)"
                );
                self.records.insert(name.clone(), spec);
            }
            Action::Detach { name, id } => {
                let _lock = self.namespace.lock()?;
                self.namespace.detach(&BTreeSet::from([*id])).await?;
                match name {
                    Some(name) => {
                        log::info!(
                            "session {name}: detached session {id} (its config changed, or it was a duplicate)"
                        )
                    }
                    None => log::info!("daemon: detached session {id}: its config session is gone"),
                }
                if let Some(name) = name {
                    self.records.remove(name);
                }
            }
        }
        Ok(())
    }

    /// Every config session's state, logged when it changes, and the state file.
    fn record_states(
        &mut self,
        placements: &BTreeMap<String, Placement>,
        observed: &crate::model::observed::Observed,
        ovs_sessions: &BTreeMap<u32, OvsSession>,
        failures: BTreeMap<String, String>,
    ) {
        let owned = daemon_sessions(self.config.sessions.keys(), observed);
        let owned_ovs = daemon_ovs_sessions(self.config.sessions.keys(), ovs_sessions);
        let mut sessions = BTreeMap::new();
        for (name, spec) in &self.config.sessions {
            let owner = if spec.is_ovs() { &owned_ovs } else { &owned };
            let id = owner.get(&Some(name.clone())).and_then(|ids| ids.first().copied());
            let args = spec.args();
            // ovs-vswitchd's word on the GRE port of an OVS session: active in OVSDB is not enough.
            let gre_error = id
                .filter(|_| spec.is_ovs())
                .and_then(|id| ovs_sessions.get(&id)?.gre_interface.as_ref()?.error.clone())
                .map(|e| format!("ovs-vswitchd cannot use its GRE port: {e}"));
            let (state, reason) = match (failures.get(name).or(gre_error.as_ref()), &placements[name]) {
                (Some(reason), _) => ("error", Some(reason.clone())),
                (None, Placement::Here(_)) if id.is_some() => ("active", None),
                (None, Placement::Here(_)) => ("error", Some("attached, but its session is gone".into())),
                (None, Placement::Waiting(reason)) => ("waiting-for-vm", Some(reason.clone())),
                (None, Placement::Error(reason)) => ("error", Some(reason.clone())),
            };
            let tap = match &placements[name] {
                Placement::Here(tap) => Some(tap.name.clone()),
                _ => args.mirror.tap.clone(),
            };
            let entry = DaemonSession {
                state: state.to_owned(),
                mode: if spec.is_ovs() { "ovs" } else { "ebpf" }.to_owned(),
                reason,
                session: id,
                vm: args.mirror.vm.clone(),
                tap,
                applied: id.and_then(|_| self.records.get(name)).map(|s| s.argv.clone()),
            };
            let before = self.state.sessions.get(name);
            if before.map(|b| (&b.state, &b.reason)) != Some((&entry.state, &entry.reason))
                && entry.state != "active"
            {
                let what = entry.reason.as_deref().unwrap_or_default();
                if entry.state == "error" {
                    log::error!("session {name}: {what}");
                } else {
                    log::info!("session {name}: waiting for its VM: {what}");
                }
            }
            sessions.insert(name.clone(), entry);
        }
        self.records.retain(|name, _| sessions.contains_key(name));
        self.state.sessions = sessions;
        if let Err(e) = self.state.write(&self.options.run_dir) {
            log::error!(
                "daemon: cannot write {}: {e}; `vmsniff status` will not show the daemon's sessions",
                state::state_path(&self.options.run_dir).display()
            );
        }
    }

    /// Removes the daemon's OVS sessions; how many there were.
    fn stop_ovs(&self) -> anyhow::Result<usize> {
        let mut client = match crate::service::ovs::connect(&self.sources) {
            Ok(client) => client,
            Err(e) if !self.config.sessions.values().any(SessionSpec::is_ovs) => {
                log::debug!("no OVSDB, so no OVS sessions to remove: {e}");
                return Ok(0);
            }
            Err(e) => return Err(e).context("removing the daemon's OVS sessions"),
        };
        let sessions = Snapshot::read(&mut client)?.sessions();
        let ids: BTreeSet<u32> =
            daemon_ovs_sessions(self.config.sessions.keys(), &sessions).into_values().flatten().collect();
        crate::service::ovs::detach(&mut client, &ids).context("removing the daemon's OVS sessions")?;
        Ok(ids.len())
    }

    /// SIGTERM or SIGINT: detach what the daemon owns, unless the config keeps mirrors on stop
    /// or systemd is restarting the service (the next start adopts them with no gap).
    async fn stop(self) -> anyhow::Result<()> {
        let keep = if self.config.keep_on_stop {
            Some("keep-on-stop is set")
        } else if systemd::restart_queued() {
            Some("systemd is restarting the service")
        } else {
            None
        };
        if let Some(why) = keep {
            log::info!("daemon: stopping; the mirrors stay ({why}) for the next start to adopt");
            return Ok(());
        }
        // Both kinds, whatever happens to the other: an unreachable OVSDB must not leave the
        // eBPF mirrors running.
        let ebpf = self.stop_ebpf().await;
        let ovs = self.stop_ovs();
        let (ebpf, ovs) = match (ebpf, ovs) {
            (Ok(ebpf), Ok(ovs)) => (ebpf, ovs),
            (Err(e), Ok(_)) | (Ok(_), Err(e)) => return Err(e),
            (Err(ebpf), Err(ovs)) => {
                log::error!("daemon: {}", chain(ovs.as_ref()));
                return Err(ebpf);
            }
        };
        DaemonState::remove(&self.options.run_dir)?;
        log::info!("daemon: stopped; detached its {} session(s)", ebpf + ovs);
        Ok(())
    }

    /// Detaches the daemon's eBPF sessions; how many there were.
    async fn stop_ebpf(&self) -> anyhow::Result<usize> {
        let _lock = self.namespace.lock()?;
        let observed = self.namespace.observe()?;
        let ids: BTreeSet<u32> =
            daemon_sessions(self.config.sessions.keys(), &observed).into_values().flatten().collect();
        self.namespace.detach(&ids).await.context("detaching the daemon's sessions")?;
        Ok(ids.len())
    }
}

/// Errors that go away by themselves when the VM comes (back): stopped, not defined on this
/// host (migrated away), its tap not there yet.
fn waits(error: &ResolveError) -> bool {
    matches!(
        error,
        ResolveError::Select(SelectError::NotRunning { .. } | SelectError::UnknownVm { .. })
            | ResolveError::TapMissing { .. }
            | ResolveError::Interface(InterfaceError::NotFound { .. })
    )
}
