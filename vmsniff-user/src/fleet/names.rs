//! `collect --fleet`: the fleet's mirrors by wire key, "NAME (VM nic N)", read at start and
//! then followed through an etcd watch, so that a mirror declared while `collect` runs is named
//! too. When etcd fails, the names stay as last read and the watch starts again with backoff
//! (a full read, then the watch from its revision).
use std::{collections::BTreeMap, time::Duration};

use etcd_client::{EventType, WatchOptions};
use tokio::sync::watch;

use super::{
    etcd::{EtcdError, EtcdSettings, call},
    store::{MAX_MIRRORS, MirrorRecord, Store, StoreError, decode},
};
use crate::model::{error::chain, mirror::NicChoice, wire::FleetLabel};

/// Interface names (and whether the copies are plain GRE) by the mirrors' keys.
pub type KeyNames = BTreeMap<u32, FleetLabel>;
type Records = BTreeMap<String, MirrorRecord>;

const BACKOFF_FIRST: Duration = Duration::from_millis(500);
const BACKOFF_LONGEST: Duration = Duration::from_secs(10);

/// Reads the fleet's mirrors (an unreachable etcd fails here, before anything is written) and
/// follows them until every receiver is gone.
pub async fn follow(settings: EtcdSettings) -> Result<watch::Receiver<KeyNames>, StoreError> {
    let (store, records, revision) = read(&settings).await?;
    let (names, receiver) = watch::channel(key_names(&records));
    log::info!("--fleet: {} fleet mirror(s) named by key; following the fleet", records.len());
    tokio::spawn(run(settings, store, records, revision, names));
    Ok(receiver)
}

/// "NAME (VM nic N)": the mirror and its VM.
pub fn label(name: &str, record: &MirrorRecord) -> String {
    let what = match record.spec() {
        Ok(spec) => {
            let vm = spec.nic.selector().unwrap_or("?").to_owned();
            match spec.nic.choice() {
                NicChoice::Index(i) => format!("{vm} nic {i}"),
                NicChoice::Mac(mac) => format!("{vm} mac {mac}"),
                NicChoice::Unspecified => vm,
            }
        }
        Err(_) => "?".to_owned(),
    };
    format!("{name} ({what})")
}

fn key_names(records: &Records) -> KeyNames {
    records
        .iter()
        .map(|(name, record)| {
            // An OVS-mode mirror's GRE port sends plain GRE with key K (OVS mode has no other
            // encapsulation).
            let plain_gre = record.spec().is_ok_and(|spec| spec.is_ovs());
            (record.key, FleetLabel { name: label(name, record), plain_gre })
        })
        .collect()
}

async fn read(settings: &EtcdSettings) -> Result<(Store, Records, i64), StoreError> {
    let mut store = Store::new(settings.connect().await?, &settings.prefix);
    let (mirrors, revision) = store.mirrors().await?;
    let records = mirrors.into_iter().filter_map(|(name, r)| Some((name, r.ok()?))).collect();
    Ok((store, records, revision))
}

async fn run(
    settings: EtcdSettings,
    mut store: Store,
    mut records: Records,
    mut revision: i64,
    names: watch::Sender<KeyNames>,
) {
    let mut backoff = BACKOFF_FIRST;
    loop {
        let error = tokio::select! {
            error = watch_from(&mut store, &mut records, revision, &names) => error,
            () = names.closed() => return,
        };
        log::warn!("--fleet: etcd: {}; the fleet's names stay as last read; trying again", chain(&error));
        loop {
            tokio::select! {
                () = tokio::time::sleep(backoff) => {}
                () = names.closed() => return,
            }
            backoff = (backoff * 2).min(BACKOFF_LONGEST);
            match read(&settings).await {
                Ok((s, r, rev)) => {
                    (store, records, revision) = (s, r, rev);
                    names.send_replace(key_names(&records));
                    backoff = BACKOFF_FIRST;
                    log::info!("--fleet: etcd answers again; {} fleet mirror(s) named by key", records.len());
                    break;
                }
                Err(e) => log::debug!("--fleet: etcd: {}", chain(&e)),
            }
        }
    }
}

/// Follows the mirrors from `revision` on, publishing every change; returns why it stopped.
async fn watch_from(
    store: &mut Store,
    records: &mut Records,
    revision: i64,
    names: &watch::Sender<KeyNames>,
) -> StoreError {
    const WHAT: &str = "watching the fleet's mirrors";
    let dir = store.layout.mirrors();
    let options = WatchOptions::new().with_prefix().with_start_revision(revision + 1);
    let mut watch = match store.client.watch(dir.clone(), Some(options)).await {
        Ok(watch) => watch,
        Err(e) => return call(WHAT)(e).into(),
    };
    loop {
        let response = match watch.message().await {
            Ok(Some(response)) => response,
            Ok(None) => {
                return EtcdError::Call { what: WHAT.into(), reason: "the watch ended".into() }.into();
            }
            Err(e) => return call(WHAT)(e).into(),
        };
        if response.canceled() {
            let reason = format!("etcd cancelled the watch ({})", response.cancel_reason());
            return EtcdError::Call { what: WHAT.into(), reason }.into();
        }
        for event in response.events() {
            let Some(kv) = event.kv() else { continue };
            let Some(name) = std::str::from_utf8(kv.key()).ok().and_then(|k| k.strip_prefix(&dir)) else {
                continue;
            };
            match event.event_type() {
                EventType::Delete => {
                    records.remove(name);
                }
                EventType::Put => match decode::<MirrorRecord>(kv.value()) {
                    Ok(r) if records.len() < MAX_MIRRORS || records.contains_key(name) => {
                        records.insert(name.to_owned(), r);
                    }
                    Ok(_) => {
                        log::warn!("--fleet: fleet mirror {name}: past {MAX_MIRRORS} mirrors; not named")
                    }
                    Err(why) => log::warn!("--fleet: fleet mirror {name}: its record cannot be read ({why})"),
                },
            }
        }
        names.send_replace(key_names(records));
    }
}
