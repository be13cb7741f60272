//! The fleet in etcd: the key layout (an API: documented in the README, versioned records whose
//! fields are added, never renamed), the records, and the operations on them. Every change is
//! one transaction guarded by compares, so a refused or raced change writes nothing.
use std::collections::{BTreeMap, BTreeSet};

use etcd_client::{Client, Compare, CompareOp, DeleteOptions, GetOptions, PutOptions, Txn, TxnOp};
use serde::{Deserialize, Serialize};
use thiserror::Error;
use vmsniff_ebpf::MAX_GRE_USER_KEY;

use super::etcd::{EtcdError, call};
use crate::{
    model::wire::{Encap, MAX_ERSPAN_KEY, MAX_VXLAN_KEY},
    service::{ControlChange, Controls, Destination, MirrorSpec, spec::SpecError},
};

/// The version of every record below; a reader refuses a record of a later one.
pub const RECORD_VERSION: u32 = 1;
/// At most this many fleet mirrors: what a node holds in memory and caches is bounded.
pub const MAX_MIRRORS: usize = 65_536;
/// Optimistic transactions are retried this often when another writer raced them.
const ATTEMPTS: usize = 8;

/// Where each record lives under the prefix.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    pub prefix: String,
}

impl Layout {
    pub fn new(prefix: &str) -> Self {
        Layout { prefix: prefix.to_owned() }
    }
    pub fn mirrors(&self) -> String {
        format!("{}/mirrors/", self.prefix)
    }
    pub fn mirror(&self, name: &str) -> String {
        format!("{}/mirrors/{name}", self.prefix)
    }
    pub fn keys(&self) -> String {
        format!("{}/keys/", self.prefix)
    }
    pub fn key(&self, key: u32) -> String {
        format!("{}/keys/{key}", self.prefix)
    }
    pub fn nodes(&self) -> String {
        format!("{}/nodes/", self.prefix)
    }
    pub fn node(&self, node: &str) -> String {
        format!("{}/nodes/{node}", self.prefix)
    }
    pub fn reports(&self) -> String {
        format!("{}/status/", self.prefix)
    }
    pub fn reports_of(&self, name: &str) -> String {
        format!("{}/status/{name}/", self.prefix)
    }
    pub fn report(&self, name: &str, node: &str) -> String {
        format!("{}/status/{name}/{node}", self.prefix)
    }
    pub fn placements(&self) -> String {
        format!("{}/placed/", self.prefix)
    }
    pub fn placement(&self, name: &str) -> String {
        format!("{}/placed/{name}", self.prefix)
    }
}

/// `<prefix>/mirrors/NAME`: one declared mirror.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct MirrorRecord {
    pub version: u32,
    pub name: String,
    /// `attach`'s arguments ([`MirrorSpec::to_args`]), the VM selector first; `--key` only when
    /// the operator gave it.
    pub args: Vec<String>,
    /// The fleet-unique key K (GRE key K*2+d, ERSPAN session K), also held by `<prefix>/keys/K`.
    pub key: u32,
    pub created: u64,
    pub updated: u64,
}

impl MirrorRecord {
    /// The spec a node applies: the record's flags with the fleet's key.
    pub fn spec(&self) -> Result<MirrorSpec, SpecError> {
        let mut spec = MirrorSpec::from_args(&self.args)?;
        // `--to-dev` copies carry no key: the key stays the fleet's name for the stream.
        if matches!(spec.destination, Destination::Collector { .. }) {
            spec.key = Some(self.key);
        }
        Ok(spec)
    }
}

/// `<prefix>/nodes/NODE`, under the node's lease: a live node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct NodeRecord {
    pub version: u32,
    pub node: String,
    pub vmsniff: String,
    pub kernel: String,
    pub started: u64,
}

/// A fleet mirror's state on one node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FleetState {
    /// Its VM is here and its session runs.
    Active,
    /// Its VM is defined here but not running, or its tap is not there yet: no session.
    WaitingForVm,
    /// Something the operator must fix (the reason says what), or a failed try.
    Error,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Count {
    pub frames: u64,
    pub bytes: u64,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReportCounters {
    #[serde(rename = "in")]
    pub into_vm: Count,
    #[serde(rename = "out")]
    pub out_of_vm: Count,
    pub lost: u64,
}

/// `<prefix>/status/NAME/NODE`, under the node's lease: the mirror as that node runs it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct ReportRecord {
    pub version: u32,
    pub node: String,
    pub state: FleetState,
    pub reason: Option<String>,
    pub session: Option<u32>,
    pub tap: Option<String>,
    pub counters: Option<ReportCounters>,
    pub updated: u64,
}

/// `<prefix>/placed/NAME` (no lease): the node that last made the mirror's session, and when.
/// It outlives that node, so that status can say a node holding a mirror was lost.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct PlacedRecord {
    pub version: u32,
    pub node: String,
    pub since: u64,
}

#[derive(Debug, Error)]
pub enum StoreError {
    #[error(transparent)]
    Etcd(#[from] EtcdError),
    #[error("fleet mirror name {0:?}: use 1 to 64 letters, digits, '-', '_' or '.'")]
    BadName(String),
    #[error(
        "{0:?} is a tap: taps are per node, and a fleet mirror follows its VM across nodes. Name the VM \
         (Nova name, UUID, libvirt domain or MAC), with --nic or --mac for one of several NICs"
    )]
    TapSelector(String),
    #[error("fleet mirror {0} exists already: `vmsniff fleet rm {0}` first, or choose another name")]
    Exists(String),
    #[error("no fleet mirror {0}: `vmsniff fleet status` lists them")]
    Unknown(String),
    #[error(
        "key {key} is held by fleet mirror {holder}: give another --key, or leave it out for the lowest free one"
    )]
    KeyTaken { key: u32, holder: String },
    #[error(
        "--key {key} does not fit ERSPAN: its 10-bit session id holds K*2+d, so K is at most {limit}; give \
         a smaller --key, or leave it out"
    )]
    KeyTooLarge { key: u32, limit: u32 },
    #[error("every key 1..={limit} is held by a fleet mirror: remove one (`vmsniff fleet rm NAME`)")]
    KeysExhausted { limit: u32 },
    #[error("the fleet has {MAX_MIRRORS} mirrors, its limit: remove some first")]
    TooMany,
    #[error(
        "fleet mirror {name}'s record in etcd is not one this vmsniff reads ({why}): upgrade vmsniff, or `fleet rm {name}`"
    )]
    BadRecord { name: String, why: String },
    #[error("{0}")]
    Spec(#[from] SpecError),
    #[error("etcd changed under {what} {ATTEMPTS} times in a row: try again")]
    Raced { what: String },
}

/// Checks a fleet mirror's name: it becomes an etcd key segment and the daemon's `fleet/NAME`.
pub fn check_name(name: &str) -> Result<(), StoreError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && name != "."
        && name != "..";
    if ok { Ok(()) } else { Err(StoreError::BadName(name.to_owned())) }
}

/// What a declaration needs beyond the flags' own checks: a name, a VM rather than a tap, a
/// `--key` its encapsulation carries. No etcd needed: checked before it is reached.
pub fn check_declaration(name: &str, spec: &MirrorSpec) -> Result<(), StoreError> {
    check_name(name)?;
    if let Some(tap) = spec.nic.tap() {
        return Err(StoreError::TapSelector(tap.to_owned()));
    }
    let limit = key_limit(spec);
    if let Some(key) = spec.key.filter(|&k| k > limit) {
        return Err(StoreError::KeyTooLarge { key, limit });
    }
    Ok(())
}

/// The largest key K a spec's encapsulation carries.
pub fn key_limit(spec: &MirrorSpec) -> u32 {
    match spec.destination {
        Destination::Collector { encap: Encap::ErspanIII { .. } | Encap::ErspanII, .. } => MAX_ERSPAN_KEY,
        Destination::Collector { encap: Encap::Vxlan { .. }, .. } => MAX_VXLAN_KEY,
        Destination::Collector { encap: Encap::Gre, .. } | Destination::Device { .. } => MAX_GRE_USER_KEY,
    }
}

/// The lowest key in 1..=limit that `held` lacks.
pub fn lowest_free(held: &BTreeSet<u32>, limit: u32) -> Option<u32> {
    let mut want = 1;
    for &k in held.range(1..) {
        if k > want {
            break;
        }
        if k == want {
            want += 1;
        }
    }
    (want <= limit).then_some(want)
}

/// A change of live controls applied to a spec's controls.
pub fn apply_change(controls: &mut Controls, change: &ControlChange) {
    if let Some(filter) = &change.filter {
        controls.filter = filter.clone();
    }
    if let Some(snaplen) = change.snaplen {
        controls.snaplen = snaplen;
    }
    if let Some(sample) = change.sample_every {
        controls.sample_every = sample;
    }
    if let Some(limit) = change.rate_limit {
        controls.rate_limit = limit;
    }
}

pub fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// A record read back, or why it is no record (a later version, broken JSON).
pub fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
    let value: serde_json::Value = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    match value.get("version").and_then(serde_json::Value::as_u64) {
        Some(v) if v == u64::from(RECORD_VERSION) => serde_json::from_value(value).map_err(|e| e.to_string()),
        Some(v) => Err(format!("record version {v}, this vmsniff reads {RECORD_VERSION}")),
        None => Err("no version".into()),
    }
}

fn encode<T: Serialize>(record: &T) -> String {
    // Records are plain data: serialising them cannot fail.
    serde_json::to_string(record).unwrap_or_default()
}

/// The last segment of a key under `dir`.
fn name_under<'a>(key: &'a [u8], dir: &str) -> Option<&'a str> {
    std::str::from_utf8(key).ok()?.strip_prefix(dir)
}

/// The fleet's store.
pub struct Store {
    pub client: Client,
    pub layout: Layout,
}

/// Everything `fleet status` shows.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub mirrors: BTreeMap<String, Result<MirrorRecord, String>>,
    pub nodes: BTreeMap<String, NodeRecord>,
    /// By mirror, then node.
    pub reports: BTreeMap<String, BTreeMap<String, ReportRecord>>,
    pub placed: BTreeMap<String, PlacedRecord>,
}

impl Store {
    pub fn new(client: Client, prefix: &str) -> Self {
        Store { client, layout: Layout::new(prefix) }
    }

    /// Declares a mirror: its record and its key, in one transaction that requires both to be
    /// free. The key is `spec.key` or the lowest free one.
    pub async fn declare(&mut self, name: &str, spec: &MirrorSpec) -> Result<MirrorRecord, StoreError> {
        check_declaration(name, spec)?;
        let limit = key_limit(spec);
        for _ in 0..ATTEMPTS {
            let held = self.held_keys().await?;
            if held.len() >= MAX_MIRRORS {
                return Err(StoreError::TooMany);
            }
            let key = match spec.key {
                Some(key) => {
                    if let Some(holder) = held.get(&key) {
                        return Err(StoreError::KeyTaken { key, holder: holder.clone() });
                    }
                    key
                }
                None => {
                    let keys: BTreeSet<u32> = held.keys().copied().collect();
                    lowest_free(&keys, limit).ok_or(StoreError::KeysExhausted { limit })?
                }
            };
            let t = now();
            let record = MirrorRecord {
                version: RECORD_VERSION,
                name: name.to_owned(),
                args: spec.to_args(),
                key,
                created: t,
                updated: t,
            };
            let (mirror_key, key_key) = (self.layout.mirror(name), self.layout.key(key));
            let txn = Txn::new()
                .when([
                    Compare::create_revision(mirror_key.clone(), CompareOp::Equal, 0),
                    Compare::create_revision(key_key.clone(), CompareOp::Equal, 0),
                ])
                .and_then([
                    TxnOp::put(mirror_key.clone(), encode(&record), None),
                    TxnOp::put(key_key, name, None),
                ])
                .or_else([TxnOp::get(mirror_key, None)]);
            let response = self.client.txn(txn).await.map_err(call("declaring the mirror"))?;
            if response.succeeded() {
                return Ok(record);
            }
            if self.get(&self.layout.mirror(name)).await?.is_some() {
                return Err(StoreError::Exists(name.to_owned()));
            }
            // Another writer took the key between the read and the transaction: read again.
        }
        Err(StoreError::Raced { what: format!("the keys of mirror {name}") })
    }

    /// Changes a mirror's live controls (filter, snaplen, sample, rate limit), guarded by the
    /// record's revision.
    pub async fn update(&mut self, name: &str, change: &ControlChange) -> Result<MirrorRecord, StoreError> {
        check_name(name)?;
        for _ in 0..ATTEMPTS {
            let (mut record, revision) = self.mirror(name).await?;
            let mut spec = MirrorSpec::from_args(&record.args)?;
            apply_change(&mut spec.controls, change);
            if spec.is_ovs() {
                // OVS mode has no controls: the same check as `attach --mode ovs --filter`.
                let args = spec.to_args();
                MirrorSpec::from_args(&args)?;
            }
            record.args = spec.to_args();
            record.updated = now();
            let key = self.layout.mirror(name);
            let txn = Txn::new()
                .when([Compare::mod_revision(key.clone(), CompareOp::Equal, revision)])
                .and_then([TxnOp::put(key, encode(&record), None)]);
            if self.client.txn(txn).await.map_err(call("updating the mirror"))?.succeeded() {
                return Ok(record);
            }
        }
        Err(StoreError::Raced { what: format!("mirror {name}") })
    }

    /// Removes a mirror, its key and what nodes said of it, in one transaction.
    pub async fn remove(&mut self, name: &str) -> Result<MirrorRecord, StoreError> {
        check_name(name)?;
        for _ in 0..ATTEMPTS {
            let (record, revision) = self.mirror(name).await?;
            let key = self.layout.mirror(name);
            let key_key = self.layout.key(record.key);
            let txn =
                Txn::new().when([Compare::mod_revision(key.clone(), CompareOp::Equal, revision)]).and_then([
                    TxnOp::delete(key, None),
                    TxnOp::delete(key_key, None),
                    TxnOp::delete(self.layout.placement(name), None),
                    TxnOp::delete(self.layout.reports_of(name), Some(DeleteOptions::new().with_prefix())),
                ]);
            if self.client.txn(txn).await.map_err(call("removing the mirror"))?.succeeded() {
                return Ok(record);
            }
        }
        Err(StoreError::Raced { what: format!("mirror {name}") })
    }

    /// One mirror's record and its revision.
    pub async fn mirror(&mut self, name: &str) -> Result<(MirrorRecord, i64), StoreError> {
        let response = self
            .client
            .get(self.layout.mirror(name), None)
            .await
            .map_err(call(format!("reading mirror {name}")))?;
        let kv = response.kvs().first().ok_or_else(|| StoreError::Unknown(name.to_owned()))?;
        let record =
            decode(kv.value()).map_err(|why| StoreError::BadRecord { name: name.to_owned(), why })?;
        Ok((record, kv.mod_revision()))
    }

    async fn get(&mut self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let response = self.client.get(key, None).await.map_err(call(format!("reading {key}")))?;
        Ok(response.kvs().first().map(|kv| kv.value().to_vec()))
    }

    /// The keys held, with their mirrors.
    async fn held_keys(&mut self) -> Result<BTreeMap<u32, String>, StoreError> {
        let dir = self.layout.keys();
        let response = self
            .client
            .get(dir.clone(), Some(GetOptions::new().with_prefix()))
            .await
            .map_err(call("reading the fleet's keys"))?;
        Ok(response
            .kvs()
            .iter()
            .filter_map(|kv| {
                let key = name_under(kv.key(), &dir)?.parse().ok()?;
                Some((key, String::from_utf8_lossy(kv.value()).into_owned()))
            })
            .collect())
    }

    /// Every declared mirror, and the revision they were read at.
    pub async fn mirrors(
        &mut self,
    ) -> Result<(BTreeMap<String, Result<MirrorRecord, String>>, i64), StoreError> {
        let dir = self.layout.mirrors();
        let response = self
            .client
            .get(dir.clone(), Some(GetOptions::new().with_prefix().with_limit(MAX_MIRRORS as i64)))
            .await
            .map_err(call("reading the fleet's mirrors"))?;
        let revision = response.header().map_or(0, |h| h.revision());
        let mirrors = response
            .kvs()
            .iter()
            .filter_map(|kv| Some((name_under(kv.key(), &dir)?.to_owned(), decode(kv.value()))))
            .collect();
        Ok((mirrors, revision))
    }

    /// Everything `fleet status` and `fleet nodes` show.
    pub async fn snapshot(&mut self) -> Result<Snapshot, StoreError> {
        let (mirrors, _) = self.mirrors().await?;
        let mut snapshot = Snapshot { mirrors, ..Default::default() };
        for (node, record) in self.records::<NodeRecord>(&self.layout.nodes()).await? {
            snapshot.nodes.insert(node, record);
        }
        for (path, record) in self.records::<ReportRecord>(&self.layout.reports()).await? {
            if let Some((mirror, node)) = path.split_once('/') {
                snapshot.reports.entry(mirror.to_owned()).or_default().insert(node.to_owned(), record);
            }
        }
        for (name, record) in self.records::<PlacedRecord>(&self.layout.placements()).await? {
            snapshot.placed.insert(name, record);
        }
        Ok(snapshot)
    }

    /// The readable records under `dir`, by the rest of their key.
    async fn records<T: serde::de::DeserializeOwned>(
        &mut self,
        dir: &str,
    ) -> Result<Vec<(String, T)>, StoreError> {
        let response = self
            .client
            .get(dir, Some(GetOptions::new().with_prefix()))
            .await
            .map_err(call(format!("reading {dir}")))?;
        Ok(response
            .kvs()
            .iter()
            .filter_map(|kv| {
                let rest = name_under(kv.key(), dir)?.to_owned();
                match decode::<T>(kv.value()) {
                    Ok(record) => Some((rest, record)),
                    Err(why) => {
                        log::warn!("ignoring {dir}{rest}: {why}");
                        None
                    }
                }
            })
            .collect())
    }

    /// Writes `record` at `key` under `lease`.
    pub async fn put_leased<T: Serialize>(
        &mut self,
        key: String,
        record: &T,
        lease: i64,
    ) -> Result<(), EtcdError> {
        self.client
            .put(key.clone(), encode(record), Some(PutOptions::new().with_lease(lease)))
            .await
            .map_err(call(format!("writing {key}")))?;
        Ok(())
    }

    pub async fn put<T: Serialize>(&mut self, key: String, record: &T) -> Result<(), EtcdError> {
        self.client.put(key.clone(), encode(record), None).await.map_err(call(format!("writing {key}")))?;
        Ok(())
    }

    pub async fn delete(&mut self, key: String) -> Result<(), EtcdError> {
        self.client.delete(key.clone(), None).await.map_err(call(format!("deleting {key}")))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service::spec::FlagsCli;

    fn spec(args: &[&str]) -> MirrorSpec {
        let args: Vec<String> = args.iter().map(|s| (*s).to_owned()).collect();
        FlagsCli::parse_args(&args).unwrap().spec().unwrap()
    }

    #[test]
    fn the_lowest_free_key_fills_gaps_and_respects_the_limit() {
        let held = |k: &[u32]| k.iter().copied().collect::<BTreeSet<u32>>();
        assert_eq!(lowest_free(&held(&[]), 10), Some(1));
        assert_eq!(lowest_free(&held(&[0, 1, 2, 4]), 10), Some(3));
        assert_eq!(lowest_free(&held(&[1, 2, 3]), 3), None);
        assert_eq!(lowest_free(&held(&[2, 3]), 3), Some(1));
    }

    #[test]
    fn erspan_keys_stay_within_its_ten_bits() {
        assert_eq!(key_limit(&spec(&["vm", "--to", "192.0.2.2", "--encap", "erspan"])), MAX_ERSPAN_KEY);
        assert_eq!(key_limit(&spec(&["vm", "--to", "192.0.2.2", "--encap", "vxlan"])), MAX_VXLAN_KEY);
        assert_eq!(key_limit(&spec(&["vm", "--to", "192.0.2.2"])), MAX_GRE_USER_KEY);
    }

    #[test]
    fn records_round_trip_and_a_later_version_is_refused() {
        let record = MirrorRecord {
            version: RECORD_VERSION,
            name: "web".into(),
            args: spec(&["c-private", "--nic", "0", "--to", "192.0.2.2"]).to_args(),
            key: 7,
            created: 1,
            updated: 2,
        };
        let text = encode(&record);
        assert_eq!(decode::<MirrorRecord>(text.as_bytes()).unwrap(), record);
        assert_eq!(record.spec().unwrap().key, Some(7));
        let later = text.replace("\"version\":1", "\"version\":2");
        assert!(decode::<MirrorRecord>(later.as_bytes()).unwrap_err().contains("version 2"));
        // A `--to-dev` copy has no key on the wire.
        let local = MirrorRecord { args: spec(&["vm", "--to-dev", "mir0"]).to_args(), ..record };
        assert_eq!(local.spec().unwrap().key, None);
    }

    #[test]
    fn names_are_key_segments() {
        assert!(check_name("web-1.a_b").is_ok());
        for bad in ["", "a/b", "..", "a b", &"x".repeat(65)] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_layout_is_the_documented_one() {
        let l = Layout::new("/vmsniff");
        assert_eq!(l.mirror("web"), "/vmsniff/mirrors/web");
        assert_eq!(l.key(3), "/vmsniff/keys/3");
        assert_eq!(l.node("cn1"), "/vmsniff/nodes/cn1");
        assert_eq!(l.report("web", "cn1"), "/vmsniff/status/web/cn1");
        assert_eq!(l.placement("web"), "/vmsniff/placed/web");
    }
}
