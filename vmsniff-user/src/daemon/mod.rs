//! `vmsniff daemon`: keeps the mirrors of a declarative config, re-attaching them when VMs
//! come and go. One task owns the state and waits on signals, link events and timers; every
//! wake-up runs the same idempotent reconcile (config, taps as they are now, kernel state →
//! actions), so a missed or repeated event costs nothing but a later pass.
pub mod config;
mod links;
pub mod reconcile;
mod stall_point;
pub mod state;
mod systemd;

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    fs::{self, File, OpenOptions},
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::Context as _;
use nix::fcntl::{Flock, FlockArg};
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::watch,
    time::{Instant, sleep_until},
};

use self::{
    config::DaemonConfig,
    links::{LinkChange, LinkEvents},
    reconcile::{
        Action, OvsAction, OvsPort, Placement, daemon_ovs_sessions, daemon_sessions, plan_ovs_reconcile,
        plan_reconcile,
    },
    state::{DaemonSession, DaemonState, FleetPass, STATE_VERSION, SessionState},
};
use crate::{
    fleet::{
        node::{Agent, Declared, NodeSettings, Origin, Report, SESSION_PREFIX},
        store::{Count, FleetState, ReportCounters},
    },
    model::{
        cancel::Cancel,
        error::chain,
        mirror::{Mode, Tap},
        observed::Observed,
        sources::Sources,
    },
    service::{
        Keeper, MirrorSpec, Resolved, Service, current_netns, describe, lock_holder,
        ovs::{OvsEvents, OvsPortError, OvsSession},
    },
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
    /// Every state the daemon records, also for the metrics endpoint (which reads the sessions'
    /// counters from the kernel itself).
    pub published: watch::Sender<DaemonState>,
}

pub async fn run(sources: Sources, options: Options) -> anyhow::Result<()> {
    // First, so that a stop during start-up is a clean stop.
    let mut hangup = signal(SignalKind::hangup())?;
    let stop = Cancel::default();
    let mut stopped = stop_on_signals(stop.clone())?;
    let config = config::load(&options.config)?;
    let service = Service::open(sources.clone())?;
    fs::create_dir_all(&options.run_dir)
        .with_context(|| format!("creating the run directory {}", options.run_dir.display()))?;
    let _lock = lock_run_dir(&options.run_dir)?;
    let netns = current_netns().context("identifying this network namespace")?;
    let previous = DaemonState::read(&options.run_dir)
        .with_context(|| format!("reading {}", state::state_path(&options.run_dir).display()))?
        .filter(|s| s.netns == netns);
    let mut links = LinkEvents::subscribe().context("subscribing to link events (rtnetlink)")?;
    let mut ovs_changes = OvsEvents::watch(&sources).context("starting the OVSDB monitor thread")?;
    links.know(service.links().await?);
    let fleet = config.fleet.clone().map(|settings| Agent::start(settings, &options.run_dir));
    let mut declared_changes = fleet.as_ref().map(|agent| agent.declared.clone());
    // Counters go to etcd this often (state changes at once, after each pass).
    let mut report_tick = report_interval(&config);
    let mut daemon = Daemon {
        records: previous.map(records_of).unwrap_or_default(),
        desired: BTreeMap::new(),
        fleet,
        fleet_waiting: BTreeMap::new(),
        state: DaemonState {
            version: STATE_VERSION,
            pid: std::process::id(),
            netns,
            config: options.config.display().to_string(),
            ..Default::default()
        },
        service,
        config,
        options,
        backoff: BTreeMap::new(),
        stop,
    };
    log::info!("daemon: started with {} ({})", daemon.options.config.display(), daemon.config);
    daemon.reconcile().await;
    systemd::notify("READY=1");
    let mut resync_at = Instant::now() + daemon.config.resync;
    let mut pass_at: Option<Instant> = None;
    let mut retry_until = Instant::now();
    while !daemon.stop.is_cancelled() {
        let next_pass = pass_at.unwrap_or(resync_at).min(resync_at);
        tokio::select! {
            _ = hangup.recv() => {
                systemd::notify("RELOADING=1");
                if daemon.reload().await {
                    // A new `[fleet]` table: a new agent, whose changes and report pace to follow.
                    declared_changes = daemon.fleet.as_ref().map(|agent| agent.declared.clone());
                    report_tick = report_interval(&daemon.config);
                }
                systemd::notify("READY=1");
            }
            _ = stopped.changed() => break,
            () = changed(&mut declared_changes) => {
                pass_at = Some(Instant::now() + SETTLE);
                retry_until = Instant::now() + RETRY_FOR;
            }
            _ = report_tick.tick(), if daemon.fleet.is_some() => daemon.report_fleet().await,
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

/// Counters go to etcd this often (state changes at once, after each pass).
fn report_interval(config: &DaemonConfig) -> tokio::time::Interval {
    tokio::time::interval(config.fleet.as_ref().map_or(Duration::from_secs(3600), |f| f.report_every))
}

/// Returns when the fleet's declared set changes; never without a fleet (or once its agent is
/// gone).
async fn changed(declared: &mut Option<watch::Receiver<Option<std::sync::Arc<Declared>>>>) {
    let alive = match declared {
        Some(receiver) => receiver.changed().await.is_ok(),
        None => false,
    };
    if !alive {
        std::future::pending::<()>().await;
    }
}

/// What a reload refuses in a `[fleet]` table beyond its syntax: settings the etcd client
/// could never use (unreadable TLS files, a bad prefix, a user without a password).
fn check_fleet(config: &DaemonConfig) -> anyhow::Result<()> {
    match &config.fleet {
        Some(fleet) => fleet.etcd.check().context("[fleet]"),
        None => Ok(()),
    }
}

/// SIGTERM and SIGINT, heard by a task of their own: a pass that waits (for ovs-vswitchd, say)
/// sees the stop through `stop` and ends early, and the loop through the returned receiver.
fn stop_on_signals(stop: Cancel) -> std::io::Result<watch::Receiver<bool>> {
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let (tell, stopped) = watch::channel(false);
    tokio::spawn(async move {
        let which = tokio::select! {
            _ = terminate.recv() => "SIGTERM",
            _ = interrupt.recv() => "SIGINT",
        };
        log::debug!("daemon: {which}: stopping");
        stop.cancel();
        // The receiver is gone only when the daemon has ended already.
        let _ = tell.send(true);
    });
    Ok(stopped)
}

/// One daemon per run directory (and so per node): a second would fight the first.
fn lock_run_dir(run_dir: &Path) -> anyhow::Result<Flock<File>> {
    let path = state::lock_path(run_dir);
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&path)
        .with_context(|| {
            format!("opening {} (vmsniff does not open it through a symlink)", path.display())
        })?;
    Flock::lock(file, FlockArg::LockExclusiveNonblock).map_err(|(_, errno)| {
        // The lock's holder, from the kernel: the state file may not be written yet.
        let holder = lock_holder(&path)
            .or_else(|| DaemonState::read(run_dir).ok().flatten().map(|s| s.pid))
            .map(|pid| format!(" (pid {pid})"))
            .unwrap_or_default();
        anyhow::anyhow!(
            "another vmsniff daemon{holder} runs with run directory {}: stop it first (`systemctl stop vmsniff`), \
             or give this one another --run-dir ({errno})",
            run_dir.display()
        )
    })
}

/// The specs a previous daemon applied, by session name. One that no longer parses is no
/// record: its session is made again.
fn records_of(state: DaemonState) -> BTreeMap<String, MirrorSpec> {
    state
        .sessions
        .into_iter()
        .filter_map(|(name, s)| Some((name, MirrorSpec::from_args(&s.applied?).ok()?)))
        .collect()
}

struct Daemon {
    service: Service,
    config: DaemonConfig,
    options: Options,
    /// What was last applied to each config session's kernel session.
    records: BTreeMap<String, MirrorSpec>,
    /// This pass's sessions: the config's, and `fleet/NAME` for each fleet mirror whose VM is
    /// on this node and running (or kept while libvirt or etcd cannot be read).
    desired: BTreeMap<String, MirrorSpec>,
    /// `[fleet]`: the task that talks to etcd.
    fleet: Option<Agent>,
    /// Fleet mirrors whose VM is defined here but not running or not plugged: no kernel
    /// session (for the fleet, waiting means "not on this node"), with the reason.
    fleet_waiting: BTreeMap<String, (MirrorSpec, String)>,
    state: DaemonState,
    /// Config sessions whose last attach, re-attach or update failed: not tried again before
    /// `until`. A failed attempt makes and removes devices or rows, which are events of their
    /// own: without a pause it would be retried at once, forever.
    backoff: BTreeMap<String, Backoff>,
    /// Set by SIGTERM or SIGINT: passes end early, waits are cut short.
    stop: Cancel,
}

/// Why a config session's last action did not succeed.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Failure {
    /// It failed now.
    Failed(String),
    /// It failed before and waits out its pause.
    HeldBack { reason: String, delay: Duration },
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Failed(reason) => f.write_str(reason),
            // The pause, not the time left: the state (and so the log) changes only with a new try.
            Failure::HeldBack { reason, delay } => {
                write!(f, "{reason} (tried again {} s after the failure)", delay.as_secs())
            }
        }
    }
}

/// Config sessions whose action failed or waits, by name.
type Failures = BTreeMap<String, Failure>;

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
            // A tap that appears may also be a fleet mirror's VM migrating here.
            LinkChange::Appeared { .. } => {
                self.waiting()
                    || self.state.sessions.len() < self.config.sessions.len()
                    || self.fleet.is_some()
            }
            LinkChange::Gone { name, .. } | LinkChange::TcRemoved { name, .. } => {
                self.state.sessions.values().any(|s| s.tap.as_deref() == Some(name.as_str()))
            }
        }
    }

    /// Whether OVSDB changes matter: the config has OVS sessions. (Those of an earlier config
    /// go in the pass its reload runs.)
    fn has_ovs_sessions(&self) -> bool {
        self.desired.values().any(MirrorSpec::is_ovs)
    }

    /// Why session `name` is not tried now, if it failed recently.
    fn backing_off(&self, name: &str) -> Option<Failure> {
        let backoff = self.backoff.get(name).filter(|b| b.until > Instant::now())?;
        Some(Failure::HeldBack { reason: backoff.reason.clone(), delay: backoff.delay })
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
    fn held_back(&self, name: Option<&str>, retried: bool, failures: &mut Failures) -> bool {
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
        failures: &mut Failures,
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
                failures.insert(name, Failure::Failed(reason));
            }
            return;
        }
        self.outcome(&name, &result);
        if let Err(reason) = result {
            let failure = self.backing_off(&name).unwrap_or(Failure::Failed(reason));
            failures.insert(name, failure);
        }
    }

    /// When the next session's pause ends.
    fn next_retry(&self) -> Option<Instant> {
        self.backoff.values().map(|b| b.until).filter(|&t| t > Instant::now()).min()
    }

    fn waiting(&self) -> bool {
        self.state.sessions.values().any(|s| s.state != SessionState::Active)
    }

    /// Returns whether the fleet's agent was replaced (a changed `[fleet]` table).
    async fn reload(&mut self) -> bool {
        let mut fleet_changed = false;
        match config::load(&self.options.config)
            .map_err(anyhow::Error::from)
            .and_then(|c| check_fleet(&c).map(|()| c))
        {
            Ok(config) => {
                if config.metrics != self.config.metrics {
                    log::warn!(
                        "daemon: the metrics address changed in {}: it takes effect when the daemon \
                         starts again (`systemctl restart vmsniff`; the mirrors stay)",
                        self.options.config.display()
                    );
                }
                let (old, new): (BTreeSet<&String>, BTreeSet<&String>) =
                    (self.config.sessions.keys().collect(), config.sessions.keys().collect());
                log::info!(
                    "daemon: reloaded {} ({config}): {} added, {} removed",
                    self.options.config.display(),
                    new.difference(&old).count(),
                    old.difference(&new).count()
                );
                if config.fleet != self.config.fleet {
                    self.replace_fleet(config.fleet.clone()).await;
                    fleet_changed = true;
                }
                self.config = config;
                self.state.reload_error = None;
                // A new config deserves a fresh try.
                self.backoff.clear();
            }
            Err(e) => {
                log::error!("daemon: reload refused, the previous config stays in force: {e:#}");
                self.state.reload_error = Some(format!("{e:#}"));
            }
        }
        self.state.reloads += 1;
        self.reconcile().await;
        fleet_changed
    }

    /// Stops the agent of the old `[fleet]` table (its lease and reports go) and starts one
    /// for the new. The new agent starts from the run directory's cache, so the fleet's
    /// mirrors running here stay until the new etcd has answered.
    async fn replace_fleet(&mut self, settings: Option<NodeSettings>) {
        if let Some(old) = self.fleet.take() {
            old.stop().await;
        }
        match &settings {
            Some(s) => log::info!(
                "daemon: [fleet] changed: reconnecting to etcd at {} as node {} (prefix {})",
                s.etcd.endpoints.join(","),
                s.node,
                s.etcd.prefix
            ),
            None => log::info!("daemon: [fleet] removed: this node leaves the fleet"),
        }
        self.fleet = settings.map(|s| Agent::start(s, &self.options.run_dir));
    }

    /// Brings the kernel and OVSDB in line with the config; records every session's state.
    async fn reconcile(&mut self) {
        let started = std::time::Instant::now();
        stall_point::pass_started();
        let mut resolved_taps = BTreeMap::new();
        let mut placements: BTreeMap<String, Placement<Tap>> = BTreeMap::new();
        for (name, session) in &self.config.sessions {
            let placement = match self.service.resolve(&session.spec).await {
                Ok(resolved) => {
                    let tap = Tap { ifindex: resolved.tap().ifindex, name: resolved.tap().name.clone() };
                    resolved_taps.insert(name.clone(), resolved);
                    Placement::Here(tap)
                }
                Err(e) if e.waits() => Placement::Waiting(chain(&e)),
                Err(e) => Placement::Error(chain(&e)),
            };
            placements.insert(name.clone(), placement);
        }
        let mut desired: BTreeMap<String, MirrorSpec> =
            self.config.sessions.iter().map(|(n, s)| (n.clone(), s.spec.clone())).collect();
        self.fleet_waiting = self.place_fleet(&mut desired, &mut placements, &mut resolved_taps).await;
        self.desired = desired;
        let (ovs_specs, ebpf_specs): (BTreeMap<String, MirrorSpec>, BTreeMap<String, MirrorSpec>) =
            self.desired.iter().map(|(n, s)| (n.clone(), s.clone())).partition(|(_, s)| s.is_ovs());
        let mut failures = Failures::new();
        // Another tool removed vmsniff's filters from a tap (`tc qdisc del dev TAP clsact`):
        // put them back before anything else, for every mirror of this namespace.
        match self.service.reattach_removed_programs().await {
            Ok(repaired) => {
                for (tap, hooks) in repaired {
                    log::warn!(
                        "daemon: vmsniff's tc programs on {tap} ({}) were removed by another tool \
                         (`tc qdisc del`?): attached again",
                        hooks.iter().map(|h| h.direction().as_str()).collect::<Vec<_>>().join(", ")
                    );
                }
            }
            Err(e) => {
                log::error!("daemon: cannot check or restore vmsniff's tc programs: {}", chain(e.as_ref()))
            }
        }
        let ebpf_actions = match self.service.clean_and_observe().await {
            Ok(observed) => {
                let ebpf_placements: BTreeMap<String, Placement<Tap>> = placements
                    .iter()
                    .filter(|(n, _)| ebpf_specs.contains_key(*n))
                    .map(|(n, p)| (n.clone(), p.clone()))
                    .collect();
                plan_reconcile(&ebpf_specs, &ebpf_placements, &self.records, &observed)
            }
            // OVS sessions need no BPF: they are still looked after.
            Err(e) => {
                let reason = format!("cannot read vmsniff's kernel state: {}", chain(&e));
                for name in ebpf_specs.keys() {
                    failures.insert(name.clone(), Failure::Failed(reason.clone()));
                }
                Vec::new()
            }
        };
        for action in ebpf_actions {
            if self.stop.is_cancelled() {
                return;
            }
            let (name, retried) = (action.name().map(str::to_owned), action.retried());
            if self.held_back(name.as_deref(), retried, &mut failures) {
                continue;
            }
            let result = self.apply(&action, &resolved_taps).await;
            self.settle(name, retried, &action, result, &mut failures);
        }
        let ovs_sessions =
            self.reconcile_ovs(&ovs_specs, &mut placements, &resolved_taps, &mut failures).await;
        if self.stop.is_cancelled() {
            return;
        }
        let observed = self.service.observe().unwrap_or_default();
        self.state.last_pass_micros = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
        self.state.fleet = self.fleet.as_ref().map(|agent| {
            let declared = agent.declared.borrow();
            FleetPass {
                declared: declared.as_ref().map(|d| d.mirrors.len()),
                from_cache: declared.as_ref().is_some_and(|d| d.origin == Origin::Cache),
                here: self.desired.keys().filter(|n| n.starts_with(SESSION_PREFIX)).count()
                    + self.fleet_waiting.len(),
            }
        });
        self.record_states(&placements, &observed, &ovs_sessions, &failures);
        self.report_fleet().await;
    }

    /// Adds the fleet's mirrors whose VMs are on this node to `desired`, with their placements:
    /// libvirt is read once, and a mirror is resolved only when its selector names one of this
    /// node's domains, so a pass grows with this node's VMs, not with the fleet. Returns the
    /// fleet mirrors that wait here (no session). Nothing that runs is dropped because etcd or
    /// libvirt could not be read: such mirrors stay desired, placed in error.
    async fn place_fleet(
        &self,
        desired: &mut BTreeMap<String, MirrorSpec>,
        placements: &mut BTreeMap<String, Placement<Tap>>,
        resolved: &mut BTreeMap<String, Resolved>,
    ) -> BTreeMap<String, (MirrorSpec, String)> {
        let mut waiting = BTreeMap::new();
        let Some(agent) = &self.fleet else { return waiting };
        let declared = agent.declared.borrow().clone();
        let keep_running = |desired: &mut BTreeMap<String, MirrorSpec>,
                            placements: &mut BTreeMap<String, Placement<Tap>>,
                            names: &mut dyn Iterator<Item = (String, MirrorSpec)>,
                            why: &str| {
            for (name, spec) in names {
                if self.records.contains_key(&name) {
                    placements.insert(name.clone(), Placement::Error(why.to_owned()));
                    desired.insert(name, spec);
                }
            }
        };
        let Some(declared) = declared else {
            let mut applied = self
                .records
                .iter()
                .filter(|(n, _)| n.starts_with(SESSION_PREFIX))
                .map(|(n, s)| (n.clone(), s.clone()));
            keep_running(
                desired,
                placements,
                &mut applied,
                "etcd has not answered since the daemon started and there is no cache: its session is kept as it runs",
            );
            return waiting;
        };
        let local = match self.service.local_vms().await {
            Ok(local) => local,
            Err(e) => {
                let why = format!("{}: its session is kept as it runs", chain(&e));
                let mut all =
                    declared.mirrors.iter().map(|(n, m)| (format!("{SESSION_PREFIX}{n}"), m.spec.clone()));
                keep_running(desired, placements, &mut all, &why);
                return waiting;
            }
        };
        // By this node's VMs' names, not by the fleet's mirrors: O(local VMs).
        for (name, mirror) in declared.matching(local.keys()) {
            let session = format!("{SESSION_PREFIX}{name}");
            match self.service.resolve_in(&mirror.spec, &local).await {
                Ok(found) => {
                    let tap = Tap { ifindex: found.tap().ifindex, name: found.tap().name.clone() };
                    placements.insert(session.clone(), Placement::Here(tap));
                    resolved.insert(session.clone(), found);
                    desired.insert(session, mirror.spec.clone());
                }
                Err(e) if e.waits() => {
                    waiting.insert(session, (mirror.spec.clone(), chain(&e)));
                }
                Err(e) => {
                    placements.insert(session.clone(), Placement::Error(chain(&e)));
                    desired.insert(session, mirror.spec.clone());
                }
            }
        }
        log::debug!(
            "fleet: {} declared, {} of them here and running, {} waiting, among {} local domains",
            declared.mirrors.len(),
            desired.keys().filter(|n| n.starts_with(SESSION_PREFIX)).count(),
            waiting.len(),
            local.domains()
        );
        waiting
    }

    /// Tells the fleet each of its mirrors this node has: state, reason, session, counters.
    async fn report_fleet(&self) {
        let Some(agent) = &self.fleet else { return };
        let mut reports = BTreeMap::new();
        for (name, s) in &self.state.sessions {
            let Some(mirror) = name.strip_prefix(SESSION_PREFIX) else { continue };
            let mut counters = None;
            if let Some(id) = s.session.filter(|_| s.mode == Mode::Ebpf)
                && let Ok(Some(status)) = self.service.session_status(id).await
            {
                let (i, o) = (&status.counters.into_vm, &status.counters.out_of_vm);
                counters = Some(ReportCounters {
                    into_vm: Count { frames: i.frames, bytes: i.bytes },
                    out_of_vm: Count { frames: o.frames, bytes: o.bytes },
                    lost: status.lost(),
                });
            }
            let state = match s.state {
                SessionState::Active => FleetState::Active,
                SessionState::WaitingForVm => FleetState::WaitingForVm,
                SessionState::Error => FleetState::Error,
            };
            reports.insert(
                mirror.to_owned(),
                Report { state, reason: s.reason.clone(), session: s.session, tap: s.tap.clone(), counters },
            );
        }
        agent.report(reports);
    }

    /// The OVS half of a pass: each OVS session's VM port in OVSDB, then the plan. Returns the
    /// OVS sessions as they are afterwards. Without OVSDB, OVS sessions fail with the reason
    /// (and the daemon's OVS sessions, if any, stay as they are).
    async fn reconcile_ovs(
        &mut self,
        specs: &BTreeMap<String, MirrorSpec>,
        placements: &mut BTreeMap<String, Placement<Tap>>,
        resolved: &BTreeMap<String, Resolved>,
        failures: &mut Failures,
    ) -> BTreeMap<u32, OvsSession> {
        if specs.is_empty() && !self.service.ovsdb_reachable().await {
            log::debug!("no OVSDB, so no OVS sessions of the daemon to look after");
            return BTreeMap::new();
        }
        let snapshot = match self.service.ovs_snapshot().await {
            Ok(snapshot) => snapshot,
            Err(e) => {
                let reason = format!(
                    "{}; is Open vSwitch running (`systemctl status openvswitch-switch`)?",
                    chain(e.as_ref())
                );
                for name in specs.keys() {
                    failures.insert(name.clone(), Failure::Failed(reason.clone()));
                }
                return BTreeMap::new();
            }
        };
        let mut ports: BTreeMap<String, Placement<OvsPort>> = BTreeMap::new();
        for name in specs.keys() {
            let port = match (&placements[name], resolved.get(name)) {
                (Placement::Here(tap), Some(resolved)) => {
                    match self.service.ovs_port(resolved, &snapshot).await {
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
            if let (Some(name), Some(args)) = (session.daemon(), session.daemon_args())
                && let Ok(spec) = MirrorSpec::from_args(&args)
            {
                self.records.insert(name.to_owned(), spec);
            }
        }
        for action in plan_ovs_reconcile(specs, &ports, &self.records, &sessions) {
            if self.stop.is_cancelled() {
                break;
            }
            let (name, retried) = (action.name().map(str::to_owned), action.retried());
            if self.held_back(name.as_deref(), retried, failures) {
                continue;
            }
            let result = self.apply_ovs(&action, resolved).await;
            self.settle(name, retried, &action, result, failures);
        }
        match self.service.ovs_snapshot().await {
            Ok(snapshot) => snapshot.sessions(),
            Err(_) => BTreeMap::new(),
        }
    }

    async fn apply_ovs(
        &mut self,
        action: &OvsAction,
        resolved: &BTreeMap<String, Resolved>,
    ) -> anyhow::Result<()> {
        match action {
            OvsAction::Attach { name, .. } => {
                let spec = self.desired[name].clone();
                let keeper = Keeper::Daemon { name: name.clone() };
                let attached =
                    self.service.attach_resolved(&spec, &resolved[name], &keeper, &self.stop).await?;
                log::info!("session {name}: attached as OVS session {}: {}", attached.id, attached.what);
                self.records.insert(name.clone(), spec);
            }
            OvsAction::Reselect { name, id, port } => {
                let spec = &self.desired[name];
                self.service.reselect_ovs(*id, &port.port, &port.tap, spec, &self.stop).await?;
                log::info!(
                    "session {name}: OVS session {id} mirrors {} again, port {} on {}; its GRE port and key stay",
                    describe(&resolved[name]),
                    port.port,
                    port.bridge
                );
            }
            OvsAction::Detach { name, id } => {
                self.service.detach_ovs(&BTreeSet::from([*id])).await?;
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

    async fn apply(&mut self, action: &Action, resolved: &BTreeMap<String, Resolved>) -> anyhow::Result<()> {
        match action {
            Action::Attach { name, .. } => {
                let spec = self.desired[name].clone();
                let keeper = Keeper::Daemon { name: name.clone() };
                let attached =
                    self.service.attach_resolved(&spec, &resolved[name], &keeper, &self.stop).await?;
                log::info!("session {}: mirroring {}", attached.id, attached.what);
                log::info!(
                    "session {name}: attached as session {} to {}",
                    attached.id,
                    describe(&resolved[name])
                );
                self.records.insert(name.clone(), spec);
            }
            Action::Rehome { name, id, tap } => {
                if self.service.rehome(*id, tap, &self.desired[name]).await? {
                    log::info!(
                        "session {name}: re-attached session {id} to {} (ifindex {}); its counters go on",
                        describe(&resolved[name]),
                        tap.ifindex
                    );
                }
            }
            Action::Update { name, id } => {
                let spec = self.desired[name].clone();
                self.service.update_to(*id, &spec).await?;
                log::info!(
                    "session {name}: session {id} updated in place (filter, snaplen, sample, rate limit)"
                );
                self.records.insert(name.clone(), spec);
            }
            Action::Detach { name, id } => {
                self.service.detach_ebpf(&BTreeSet::from([*id])).await?;
                match name {
                    Some(name) => {
                        log::info!(
                            "session {name}: detached session {id} (its config changed, or it was a duplicate)"
                        )
                    }
                    None => log::info!(
                        "daemon: detached session {id}: its config session is gone, or it was a fleet \
                         mirror whose VM is no longer on this node (or that was removed)"
                    ),
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
        observed: &Observed,
        ovs_sessions: &BTreeMap<u32, OvsSession>,
        failures: &Failures,
    ) {
        let owned = daemon_sessions(self.desired.keys(), observed);
        let owned_ovs = daemon_ovs_sessions(self.desired.keys(), ovs_sessions);
        let mut entries = Vec::new();
        for (name, spec) in &self.desired {
            let owner = if spec.is_ovs() { &owned_ovs } else { &owned };
            let id = owner.get(&Some(name.clone())).and_then(|ids| ids.first().copied());
            // ovs-vswitchd's word on the GRE port of an OVS session: active in OVSDB is not enough.
            let gre_error = id
                .filter(|_| spec.is_ovs())
                .and_then(|id| ovs_sessions.get(&id)?.gre_interface.as_ref()?.error.clone())
                .map(|e| format!("ovs-vswitchd cannot use its GRE port: {e}"));
            let failure = failures.get(name).map(Failure::to_string).or(gre_error);
            let (state, reason) = session_state(failure, &placements[name], id.is_some());
            let tap = match &placements[name] {
                Placement::Here(tap) => Some(tap.name.clone()),
                _ => spec.nic.tap().map(str::to_owned),
            };
            let entry = DaemonSession {
                state,
                mode: spec.mode,
                reason,
                session: id,
                vm: spec.nic.selector().map(str::to_owned),
                tap,
                applied: id.and_then(|_| self.records.get(name)).map(MirrorSpec::to_args),
            };
            entries.push((name.clone(), entry));
        }
        for (name, (spec, reason)) in &self.fleet_waiting {
            let entry = DaemonSession {
                state: SessionState::WaitingForVm,
                mode: spec.mode,
                reason: Some(reason.clone()),
                session: None,
                vm: spec.nic.selector().map(str::to_owned),
                tap: None,
                applied: None,
            };
            entries.push((name.clone(), entry));
        }
        let mut sessions = BTreeMap::new();
        for (name, entry) in entries {
            let before = self.state.sessions.get(&name);
            if before.map(|b| (b.state, &b.reason)) != Some((entry.state, &entry.reason))
                && entry.state != SessionState::Active
            {
                let what = entry.reason.as_deref().unwrap_or_default();
                if entry.state == SessionState::Error {
                    log::error!("session {name}: {what}");
                } else {
                    log::info!("session {name}: waiting for its VM: {what}");
                }
            }
            sessions.insert(name, entry);
        }
        self.records.retain(|name, _| sessions.contains_key(name));
        self.state.sessions = sessions;
        self.options.published.send_replace(self.state.clone());
        if let Err(e) = self.state.write(&self.options.run_dir) {
            log::error!(
                "daemon: cannot write {}: {e}; `vmsniff status` will not show the daemon's sessions",
                state::state_path(&self.options.run_dir).display()
            );
        }
    }

    /// Removes the daemon's OVS sessions; how many there were.
    async fn stop_ovs(&self) -> anyhow::Result<usize> {
        let any_ovs = self.desired.values().any(MirrorSpec::is_ovs);
        if !any_ovs && !self.service.ovsdb_reachable().await {
            log::debug!("no OVSDB, so no OVS sessions to remove");
            return Ok(0);
        }
        let sessions =
            self.service.ovs_snapshot().await.context("removing the daemon's OVS sessions")?.sessions();
        let ids: BTreeSet<u32> =
            daemon_ovs_sessions(self.desired.keys(), &sessions).into_values().flatten().collect();
        self.service.detach_ovs(&ids).await.context("removing the daemon's OVS sessions")?;
        Ok(ids.len())
    }

    /// SIGTERM or SIGINT: detach what the daemon owns, unless the config keeps mirrors on stop
    /// or systemd is restarting the service (the next start adopts them with no gap).
    async fn stop(mut self) -> anyhow::Result<()> {
        let fleet = self.fleet.take();
        let result = self.stop_sessions().await;
        // After the sessions: the node's lease (and so its reports) goes once they are gone.
        if let Some(agent) = fleet {
            agent.stop().await;
        }
        result
    }

    async fn stop_sessions(self) -> anyhow::Result<()> {
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
        let ovs = self.stop_ovs().await;
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
        let observed = self.service.observe()?;
        let ids: BTreeSet<u32> =
            daemon_sessions(self.desired.keys(), &observed).into_values().flatten().collect();
        self.service.detach_ebpf(&ids).await.context("detaching the daemon's sessions")?;
        Ok(ids.len())
    }
}

/// A config session's state from what the pass found: its failure, where its VM is, and
/// whether it has a session.
fn session_state(
    failure: Option<String>,
    placement: &Placement,
    has_session: bool,
) -> (SessionState, Option<String>) {
    match (failure, placement) {
        (Some(reason), _) => (SessionState::Error, Some(reason)),
        (None, Placement::Here(_)) if has_session => (SessionState::Active, None),
        (None, Placement::Here(_)) => (SessionState::Error, Some("attached, but its session is gone".into())),
        (None, Placement::Waiting(reason)) => (SessionState::WaitingForVm, Some(reason.clone())),
        (None, Placement::Error(reason)) => (SessionState::Error, Some(reason.clone())),
    }
}
