//! A node's side of the fleet, run by `vmsniff daemon` with a `[fleet]` table. One task owns
//! the etcd connection: it registers the node under a lease, watches the declared mirrors (the
//! daemon reads them from a watch channel), caches them in the run directory, and writes the
//! daemon's reports of its fleet mirrors under the lease. When etcd cannot be reached the last
//! declared set stays in force (never detach because etcd could not be read); the task
//! reconnects with backoff and reads the whole set again.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fs,
    future::Future,
    path::{Path, PathBuf},
    pin::Pin,
    sync::{Arc, Mutex},
    time::Duration,
};

use etcd_client::{EventType, WatchOptions};
use serde::{Deserialize, Serialize};
use tokio::{
    sync::{oneshot, watch},
    time::Instant,
};

use super::{
    etcd::{EtcdError, EtcdSettings, call},
    store::{
        FleetState, MAX_MIRRORS, MirrorRecord, NodeRecord, PlacedRecord, RECORD_VERSION, ReportCounters,
        ReportRecord, Store, StoreError, decode, now,
    },
};
use crate::{
    model::error::chain,
    service::{MirrorSpec, local::selector_key},
};

/// The daemon's session names of fleet mirrors: `fleet/NAME`, apart from the file's sessions
/// (whose names cannot hold a '/').
pub const SESSION_PREFIX: &str = "fleet/";

/// The first pause after etcd failed, doubled up to the longest.
const BACKOFF_FIRST: Duration = Duration::from_millis(500);
const BACKOFF_LONGEST: Duration = Duration::from_secs(10);
/// How long a clean stop waits to revoke the lease (its keys go at once rather than at expiry).
const REVOKE_WITHIN: Duration = Duration::from_secs(2);

/// `[fleet]`: how the node reaches etcd and who it is there.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeSettings {
    pub etcd: EtcdSettings,
    pub node: String,
    /// The lease's time to live: a dead daemon's node and reports vanish this long after.
    pub lease: Duration,
    /// Reports (with counters) are written again this often, besides on every change.
    pub report_every: Duration,
}

/// A declared mirror, as this node would apply it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FleetMirror {
    pub record: MirrorRecord,
    pub spec: MirrorSpec,
}

/// Where the declared set a node holds came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    Etcd,
    /// The run directory's cache, written when etcd was last read: etcd has not answered since
    /// this daemon started.
    Cache,
}

/// The fleet's mirrors as last read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Declared {
    pub mirrors: BTreeMap<String, FleetMirror>,
    pub origin: Origin,
    /// The mirrors' names by [`selector_key`] of their VM selector, built once per change so
    /// that a node's pass looks up its own VMs rather than scanning the fleet.
    pub by_selector: HashMap<String, Vec<String>>,
}

impl Declared {
    fn new(mirrors: BTreeMap<String, FleetMirror>, origin: Origin) -> Self {
        let mut by_selector: HashMap<String, Vec<String>> = HashMap::new();
        for (name, mirror) in &mirrors {
            if let Some(selector) = mirror.spec.nic.selector() {
                by_selector.entry(selector_key(selector)).or_default().push(name.clone());
            }
        }
        Declared { mirrors, origin, by_selector }
    }

    /// The mirrors whose selector is one of `keys` (each once, in name order).
    pub fn matching<'a>(
        &'a self,
        keys: impl Iterator<Item = &'a String>,
    ) -> BTreeMap<&'a String, &'a FleetMirror> {
        keys.filter_map(|k| self.by_selector.get(k))
            .flatten()
            .filter_map(|name| Some((name, self.mirrors.get(name)?)))
            .collect()
    }
}

/// What the daemon says of one fleet mirror whose VM is on this node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Report {
    pub state: FleetState,
    pub reason: Option<String>,
    pub session: Option<u32>,
    pub tap: Option<String>,
    pub counters: Option<ReportCounters>,
}

impl Report {
    /// Whether `other` says something else than counters do.
    fn same_but_counters(&self, other: &Report) -> bool {
        (self.state, &self.reason, self.session, &self.tap)
            == (other.state, &other.reason, other.session, &other.tap)
    }
}

/// The running agent, held by the daemon.
pub struct Agent {
    pub declared: watch::Receiver<Option<Arc<Declared>>>,
    reports: watch::Sender<BTreeMap<String, Report>>,
    stop: watch::Sender<bool>,
    /// Resolves (or fails) when the agent's task has ended.
    ended: oneshot::Receiver<()>,
}

impl Agent {
    /// Starts the agent; the cache, if any, is the declared set until etcd answers.
    pub fn start(settings: NodeSettings, run_dir: &Path) -> Agent {
        let cache = cache_path(run_dir);
        let cached = read_cache(&cache);
        if let Some(d) = &cached {
            log::info!(
                "fleet: {} declared mirror(s) from {} until etcd answers",
                d.mirrors.len(),
                cache.display()
            );
        }
        let (declared_tx, declared) = watch::channel(cached.map(Arc::new));
        let (reports, reports_rx) = watch::channel(BTreeMap::new());
        let (stop, stop_rx) = watch::channel(false);
        let (ended_tx, ended) = oneshot::channel();
        let task = Box::pin(async move {
            run(settings, cache, declared_tx, reports_rx, stop_rx).await;
            let _ = ended_tx.send(());
        });
        spawn_apart(task);
        Agent { declared, reports, stop, ended }
    }

    /// The daemon's reports now: written to etcd when they differ from the last (counters
    /// aside), and with counters every `report_every`.
    pub fn report(&self, reports: BTreeMap<String, Report>) {
        self.reports.send_if_modified(|old| {
            let changed = *old != reports;
            *old = reports;
            changed
        });
    }

    /// Stops the agent, revoking the node's lease when etcd answers.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        if tokio::time::timeout(REVOKE_WITHIN + Duration::from_secs(1), self.ended).await.is_err() {
            log::debug!("fleet: the etcd task did not end in time");
        }
    }
}

type Task = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Runs the agent's task on a thread of its own, with its own runtime (timers and sockets
/// included), apart from the daemon's thread. A pass loads and attaches eBPF programs on the
/// daemon's thread, synchronously: that takes seconds on a slow or loaded machine (1.3 to
/// 2.5 s at a time in the VM harness's 6.1 guest), and on that thread the lease's keep-alives
/// would wait meanwhile (a lease shorter than the pause expires: the node shows as lost and
/// its reports vanish) and requests in flight would find their timeouts expired. Should the
/// thread not start, the task runs on the daemon's runtime as a task, with that risk.
fn spawn_apart(task: Task) {
    // The thread takes the task from here; if it cannot start, the task is still here.
    let slot = Arc::new(Mutex::new(Some(task)));
    let theirs = Arc::clone(&slot);
    let started = tokio::runtime::Builder::new_current_thread().enable_all().build().and_then(|runtime| {
        std::thread::Builder::new().name("vmsniff-fleet".into()).spawn(move || {
            let task = theirs.lock().ok().and_then(|mut t| t.take());
            if let Some(task) = task {
                runtime.block_on(task);
            }
        })
    });
    if let Err(e) = started {
        log::warn!(
            "fleet: cannot start the etcd thread ({e}); the daemon's thread serves etcd, and a long pass \
             can let the node's lease expire"
        );
        if let Some(task) = slot.lock().ok().and_then(|mut t| t.take()) {
            tokio::spawn(task);
        }
    }
}

pub fn cache_path(run_dir: &Path) -> PathBuf {
    run_dir.join("fleet.json")
}

/// `<run dir>/fleet.json`: the declared set as last read from etcd.
#[derive(Serialize, Deserialize)]
struct Cache {
    version: u32,
    mirrors: BTreeMap<String, MirrorRecord>,
}

fn read_cache(path: &Path) -> Option<Declared> {
    let bytes = fs::read(path).ok()?;
    match decode::<Cache>(&bytes) {
        Ok(cache) => Some(Declared::new(applicable(cache.mirrors), Origin::Cache)),
        Err(why) => {
            log::warn!("fleet: ignoring {}: {why}", path.display());
            None
        }
    }
}

fn write_cache(path: &Path, mirrors: &BTreeMap<String, FleetMirror>) {
    let cache = Cache {
        version: RECORD_VERSION,
        mirrors: mirrors.iter().map(|(n, m)| (n.clone(), m.record.clone())).collect(),
    };
    let tmp = path.with_extension("json.tmp");
    let written = serde_json::to_vec(&cache)
        .map_err(std::io::Error::other)
        .and_then(|bytes| fs::write(&tmp, bytes))
        .and_then(|()| fs::rename(&tmp, path));
    if let Err(e) = written {
        log::error!(
            "fleet: cannot write {}: {e}; a restart during an etcd outage would not know the fleet",
            path.display()
        );
    }
}

/// The records a node can apply, by name; one whose flags no longer parse is logged and left.
fn applicable(records: BTreeMap<String, MirrorRecord>) -> BTreeMap<String, FleetMirror> {
    records
        .into_iter()
        .take(MAX_MIRRORS)
        .filter_map(|(name, record)| match record.spec() {
            Ok(spec) => Some((name, FleetMirror { record, spec })),
            Err(e) => {
                log::error!("fleet mirror {name}: {}; it is not applied", chain(&e));
                None
            }
        })
        .collect()
}

async fn run(
    settings: NodeSettings,
    cache: PathBuf,
    declared: watch::Sender<Option<Arc<Declared>>>,
    mut reports: watch::Receiver<BTreeMap<String, Report>>,
    mut stop: watch::Receiver<bool>,
) {
    let mut backoff = BACKOFF_FIRST;
    let mut last_error = String::new();
    let mut placed = BTreeSet::new();
    loop {
        let started = Instant::now();
        let mut link = Link { settings: &settings, cache: &cache, declared: &declared, placed: &mut placed };
        match link.session(&mut reports, &mut stop).await {
            Ok(()) => return,
            Err(e) => {
                let text = chain(&e);
                if text != last_error {
                    log::warn!(
                        "fleet: etcd: {text}; the fleet's mirrors stay as last declared; trying again"
                    );
                    last_error = text;
                }
            }
        }
        if started.elapsed() > BACKOFF_LONGEST {
            backoff = BACKOFF_FIRST;
        }
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            _ = stop.changed() => return,
        }
        backoff = (backoff * 2).min(BACKOFF_LONGEST);
    }
}

struct Link<'a> {
    settings: &'a NodeSettings,
    cache: &'a Path,
    declared: &'a watch::Sender<Option<Arc<Declared>>>,
    /// The mirrors this node wrote `placed/NAME` for while they stay active here: written once
    /// per move, not per report.
    placed: &'a mut BTreeSet<String>,
}

impl Link<'_> {
    /// One connection: register, read the whole set, then follow the watch until something
    /// fails (an error) or the daemon stops (`Ok`).
    async fn session(
        &mut self,
        reports: &mut watch::Receiver<BTreeMap<String, Report>>,
        stop: &mut watch::Receiver<bool>,
    ) -> Result<(), StoreError> {
        let s = self.settings;
        let client = s.etcd.connect().await?;
        let mut store = Store::new(client, &s.etcd.prefix);
        let ttl = i64::try_from(s.lease.as_secs()).unwrap_or(i64::MAX);
        let lease =
            store.client.lease_grant(ttl, None).await.map_err(call("granting the node's lease"))?.id();
        let (mut keeper, mut alive) =
            store.client.lease_keep_alive(lease).await.map_err(call("keeping the node's lease alive"))?;
        let node = NodeRecord {
            version: RECORD_VERSION,
            node: s.node.clone(),
            vmsniff: env!("CARGO_PKG_VERSION").to_owned(),
            kernel: kernel_release(),
            started: now(),
        };
        store.put_leased(store.layout.node(&s.node), &node, lease).await?;
        let (records, revision) = store.mirrors().await?;
        let mut records: BTreeMap<String, MirrorRecord> = records
            .into_iter()
            .filter_map(|(name, r)| match r {
                Ok(r) => Some((name, r)),
                Err(why) => {
                    log::error!("fleet mirror {name}: its record cannot be read ({why}); it is not applied");
                    None
                }
            })
            .collect();
        self.publish(&records);
        let options = WatchOptions::new().with_prefix().with_start_revision(revision + 1);
        let mut watch = store
            .client
            .watch(store.layout.mirrors(), Some(options))
            .await
            .map_err(call("watching the fleet's mirrors"))?;
        log::info!("fleet: node {} registered in etcd; {} mirror(s) declared", s.node, records.len());
        let mut written: BTreeMap<String, Report> = BTreeMap::new();
        let current = reports.borrow_and_update().clone();
        self.write_reports(&mut store, lease, &current, &mut written, true).await?;
        let mut keep = tokio::time::interval((s.lease / 3).max(Duration::from_millis(300)));
        let mut refresh = tokio::time::interval(s.report_every);
        let dir = store.layout.mirrors();
        loop {
            tokio::select! {
                _ = stop.changed() => {
                    let _ = tokio::time::timeout(REVOKE_WITHIN, store.client.lease_revoke(lease)).await;
                    return Ok(());
                }
                _ = keep.tick() => keeper.keep_alive().await.map_err(call("keeping the node's lease alive"))?,
                answer = alive.message() => match answer.map_err(call("keeping the node's lease alive"))? {
                    Some(a) if a.ttl() > 0 => {}
                    _ => return Err(EtcdError::Call {
                        what: "keeping the node's lease alive".into(),
                        reason: "the lease expired".into(),
                    }.into()),
                },
                message = watch.message() => {
                    let Some(response) = message.map_err(call("watching the fleet's mirrors"))? else {
                        return Err(EtcdError::Call { what: "watching".into(), reason: "the watch ended".into() }.into());
                    };
                    if response.canceled() {
                        return Err(EtcdError::Call {
                            what: "watching".into(),
                            reason: format!("etcd cancelled the watch ({})", response.cancel_reason()),
                        }.into());
                    }
                    for event in response.events() {
                        let Some(kv) = event.kv() else { continue };
                        let Some(name) = std::str::from_utf8(kv.key()).ok().and_then(|k| k.strip_prefix(&dir)) else { continue };
                        match event.event_type() {
                            EventType::Delete => { records.remove(name); }
                            EventType::Put => match decode::<MirrorRecord>(kv.value()) {
                                Ok(r) if records.len() < MAX_MIRRORS || records.contains_key(name) => {
                                    records.insert(name.to_owned(), r);
                                }
                                Ok(_) => log::error!("fleet mirror {name}: past the fleet's {MAX_MIRRORS} mirrors; not applied"),
                                // The last version this node could read stays in force.
                                Err(why) => log::error!("fleet mirror {name}: its new record cannot be read ({why}); the previous stays"),
                            },
                        }
                    }
                    self.publish(&records);
                }
                changed = reports.changed() => {
                    if changed.is_err() {
                        let _ = tokio::time::timeout(REVOKE_WITHIN, store.client.lease_revoke(lease)).await;
                        return Ok(());
                    }
                    let current = reports.borrow_and_update().clone();
                    self.write_reports(&mut store, lease, &current, &mut written, false).await?;
                }
                _ = refresh.tick() => {
                    let current = reports.borrow().clone();
                    self.write_reports(&mut store, lease, &current, &mut written, true).await?;
                }
            }
        }
    }

    fn publish(&self, records: &BTreeMap<String, MirrorRecord>) {
        let mirrors = applicable(records.clone());
        write_cache(self.cache, &mirrors);
        self.declared.send_if_modified(|old| {
            let new = Declared::new(mirrors, Origin::Etcd);
            let changed = old.as_deref() != Some(&new);
            *old = Some(Arc::new(new));
            changed
        });
    }

    /// Writes the reports that changed (all with `force`), deletes those of mirrors no longer
    /// here, and records a mirror's move to this node in `placed/NAME`.
    async fn write_reports(
        &mut self,
        store: &mut Store,
        lease: i64,
        reports: &BTreeMap<String, Report>,
        written: &mut BTreeMap<String, Report>,
        force: bool,
    ) -> Result<(), StoreError> {
        let node = self.settings.node.clone();
        for (name, report) in reports {
            if !force && written.get(name).is_some_and(|w| w.same_but_counters(report)) {
                continue;
            }
            let record = ReportRecord {
                version: RECORD_VERSION,
                node: node.clone(),
                state: report.state,
                reason: report.reason.clone(),
                session: report.session,
                tap: report.tap.clone(),
                counters: report.counters,
                updated: now(),
            };
            // The placement before the report: whoever reads "active here" reads where it was
            // placed too (the two are separate keys; `fleet status` showed one without the other).
            if report.state == FleetState::Active && !self.placed.contains(name) {
                let placed = PlacedRecord { version: RECORD_VERSION, node: node.clone(), since: now() };
                store.put(store.layout.placement(name), &placed).await?;
                self.placed.insert(name.clone());
            }
            store.put_leased(store.layout.report(name, &node), &record, lease).await?;
            if report.state != FleetState::Active {
                self.placed.remove(name);
            }
            written.insert(name.clone(), report.clone());
        }
        let gone: Vec<String> = written.keys().filter(|n| !reports.contains_key(*n)).cloned().collect();
        for name in gone {
            store.delete(store.layout.report(&name, &node)).await?;
            written.remove(&name);
            self.placed.remove(&name);
        }
        Ok(())
    }
}

fn kernel_release() -> String {
    fs::read_to_string("/proc/sys/kernel/osrelease").map(|s| s.trim().to_owned()).unwrap_or_default()
}

/// This host's name, the default node name.
pub fn hostname() -> String {
    fs::read_to_string("/proc/sys/kernel/hostname").map(|s| s.trim().to_owned()).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::store::MirrorRecord;

    fn mirror(name: &str, selector: &str, key: u32) -> (String, FleetMirror) {
        let record = MirrorRecord {
            version: RECORD_VERSION,
            name: name.into(),
            args: vec![selector.into(), "--to".into(), "192.0.2.2".into()],
            key,
            created: 0,
            updated: 0,
        };
        let spec = record.spec().unwrap();
        (name.into(), FleetMirror { record, spec })
    }

    #[test]
    fn a_node_finds_its_mirrors_by_its_own_vms_names_in_any_spelling() {
        let declared = Declared::new(
            BTreeMap::from([
                mirror("by-name", "c-private", 1),
                mirror("by-mac", "FA-16-3E-11-22-33", 2),
                mirror("by-uuid", "3F2A9C1E-7B4D-4E8F-9A6B-1C2D3E4F5A6B", 3),
                mirror("elsewhere", "c-other", 4),
            ]),
            Origin::Etcd,
        );
        // What LocalVms::keys gives for c-private: its names, UUID and MACs, normalised.
        let local: Vec<String> =
            ["c-private", "instance-00000003", "3f2a9c1e-7b4d-4e8f-9a6b-1c2d3e4f5a6b", "fa:16:3e:11:22:33"]
                .iter()
                .map(|s| selector_key(s))
                .collect();
        let found: Vec<&String> = declared.matching(local.iter()).into_keys().collect();
        assert_eq!(found, ["by-mac", "by-name", "by-uuid"]);
        assert_eq!(declared.mirrors["by-name"].spec.key, Some(1), "the fleet's key is applied");
    }
}
