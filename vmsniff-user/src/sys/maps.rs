//! vmsniff's pinned maps in one network namespace: the record of every session.
use std::{collections::BTreeMap, fs, io, path::Path};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, Map, MapData, PerCpuArray},
};
use vmsniff_ebpf::{
    ABI_VERSION, ABI_VERSION_UNRECORDED, ABI_VERSIONS_UPGRADABLE, Direction, DirectionCounters, SESSION_FREE,
    SessionConfig, TAP_INDEX_SLOTS, TapIndexEntry, TapSessions, TokenBucket, counter_index,
    filter::{Filter, filter_index},
    map_name, tap_index_slot,
};

use crate::sys::KernelError;
use crate::{
    model::observed::Observed,
    sys::{netns, paths::PinPaths},
};

/// The eBPF object built by build.rs.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/vmsniff-ebpf"));

/// A name for this build of the object: FNV-1a 64 of its bytes, in hex.
pub fn object_tag() -> String {
    let hash = EBPF_OBJECT
        .iter()
        .fold(0xcbf2_9ce4_8422_2325_u64, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3));
    format!("{hash:016x}")
}

pub struct PinnedMaps {
    pub sessions: Array<MapData, SessionConfig>,
    pub taps: HashMap<MapData, u32, TapSessions>,
    pub counters: PerCpuArray<MapData, DirectionCounters>,
    pub filters: Array<MapData, Filter>,
    pub rate: Array<MapData, TokenBucket>,
    /// `None` in the state of a version before 4 until its first change makes it
    /// ([`PinnedMaps::sync_tap_index`]).
    pub tap_index: Option<Array<MapData, TapIndexEntry>>,
}

impl PinnedMaps {
    /// Opens the namespace's pinned maps; `None` when vmsniff has no state here. Maps of another
    /// ABI version are refused (see [`judge_abi`]).
    pub fn open(paths: &PinPaths) -> Result<Option<Self>, KernelError> {
        if left_by_deleted_netns(paths) {
            log::warn!(
                "{} holds the pins of a deleted network namespace whose inode this one got: \
                 ignored, and removed by the next attach or detach here",
                paths.root().display()
            );
            return Ok(None);
        }
        let names = map_name::PINNED;
        // A version record without maps describes nothing (see `load_object`).
        let present = names.iter().filter(|n| paths.map(n).exists()).count();
        if present == 0 {
            return Ok(None);
        }
        if present < names.len() {
            return Err(KernelError::AbiMismatch {
                path: paths.maps_dir(),
                detail: "some of vmsniff's maps are missing".into(),
            });
        }
        let recorded = read_abi_record(paths)?;
        let open = |name: &str| {
            MapData::from_pin(paths.map(name))
                .map_err(KernelError::map(format!("opening pinned map {}", paths.map(name).display())))
        };
        let (sessions, taps, counters, filters, rate) = (
            open(map_name::SESSIONS)?,
            open(map_name::TAPS)?,
            open(map_name::COUNTERS)?,
            open(map_name::FILTERS)?,
            open(map_name::RATE)?,
        );
        let tap_index =
            paths.map(map_name::TAP_INDEX).exists().then(|| open(map_name::TAP_INDEX)).transpose()?;
        // Typing a map checks its key and value sizes; nothing is read from it.
        let typed = (|| {
            Ok::<_, aya::maps::MapError>(Self {
                sessions: Array::try_from(Map::Array(sessions))?,
                taps: HashMap::try_from(Map::HashMap(taps))?,
                counters: PerCpuArray::try_from(Map::PerCpuArray(counters))?,
                filters: Array::try_from(Map::Array(filters))?,
                rate: Array::try_from(Map::Array(rate))?,
                tap_index: tap_index.map(|index| Array::try_from(Map::Array(index))).transpose()?,
            })
        })();
        judge_abi(paths, recorded, typed.map_err(|e| e.to_string()), ABI_VERSION).map(Some)
    }

    /// Loads the eBPF object with its maps bound to the namespace's pins (created when absent,
    /// reused when present: every tap program of the namespace shares them).
    pub fn load_object(paths: &PinPaths) -> Result<Ebpf, KernelError> {
        if Self::open(paths)?.is_none() {
            remove_pins_of_deleted_netns(paths)?;
            fs::create_dir_all(paths.maps_dir())
                .map_err(KernelError::io(format!("creating {}", paths.maps_dir().display())))?;
            mark_netns(paths)?;
            let record = paths.map(map_name::ABI);
            // A record without maps is what a run that died between pinning the two left.
            match fs::remove_file(&record) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => {
                    return Err(KernelError::io(format!("removing {}", record.display()))(e));
                }
                _ => {}
            }
            // The record before the maps it describes, so that no version ever sees them
            // unrecorded. On a first attach this is inside its undo: a failure removes the whole
            // pin directory.
            write_abi_record(&record)?;
        }
        let mut loader = EbpfLoader::new();
        for name in map_name::PINNED.into_iter().chain([map_name::TAP_INDEX]) {
            loader.map_pin_path(name, paths.map(name));
        }
        loader.load(EBPF_OBJECT).map_err(|source| KernelError::Ebpf {
            op: "loading vmsniff's eBPF object".into(),
            source: Box::new(source),
        })
    }

    /// Gives maps of the release before version records (which `open` judged ours) their
    /// record, and raises the record of maps of [`ABI_VERSIONS_UPGRADABLE`] to this version, so
    /// that a vmsniff of that version refuses them from now on (see the constant). For commands
    /// that change state, under the lock, before their first change: `status` changes nothing.
    pub fn record_version(paths: &PinPaths) -> Result<(), KernelError> {
        let record = paths.map(map_name::ABI);
        if Self::open(paths)?.is_none() {
            return Ok(());
        }
        match read_abi_record(paths)? {
            None => write_abi_record(&record),
            Some(ABI_VERSION) => Ok(()),
            Some(older) => {
                log::info!(
                    "raising the ABI version record of {} from {older} to {ABI_VERSION}: a vmsniff of \
                     version {older} can no longer change this state",
                    paths.root().display()
                );
                raise_abi_record(&record)
            }
        }
    }

    /// Makes the tap index say what `TAPS` says: creates it in the state of a version before 4
    /// (pinned from the object's own definition, with nothing yet reading it), and rewrites
    /// every slot that differs, such as one a crash between a tap's two writes left stale. For
    /// commands that change state, under the lock, before their first change.
    pub fn sync_tap_index(paths: &PinPaths) -> Result<(), KernelError> {
        let Some(mut maps) = Self::open(paths)? else {
            return Ok(());
        };
        if maps.tap_index.is_none() {
            log::info!("adding the tap index to the state in {}", paths.root().display());
            // Programs pinned beside the state were loaded without this index: the next attach
            // loads them anew, with it.
            match fs::remove_dir_all(paths.programs_root()) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => {
                    return Err(KernelError::io(format!("removing {}", paths.programs_root().display()))(e));
                }
                _ => {}
            }
            drop(Self::load_object(paths)?);
            maps = Self::open(paths)?.ok_or_else(|| KernelError::MapsVanished { path: paths.maps_dir() })?;
        }
        let taps = maps.observe_taps()?;
        let mut by_slot: BTreeMap<u32, Vec<(u32, &TapSessions)>> = BTreeMap::new();
        for (&ifindex, tap) in &taps {
            by_slot.entry(tap_index_slot(ifindex)).or_default().push((ifindex, tap));
        }
        let Some(index) = &mut maps.tap_index else {
            return Err(KernelError::MapsVanished { path: paths.map(map_name::TAP_INDEX) });
        };
        let mut stale = 0;
        for slot in 0..TAP_INDEX_SLOTS {
            let want = TapIndexEntry::for_slot(by_slot.get(&slot).into_iter().flatten().copied());
            let have = index.get(&slot, 0).map_err(KernelError::map("reading the tap index"))?;
            if have != want {
                index.set(slot, want, 0).map_err(KernelError::map("writing the tap index"))?;
                stale += 1;
            }
        }
        if stale > 0 {
            log::info!("rewrote {stale} slot(s) of the tap index from the taps map");
        }
        Ok(())
    }

    /// Rewrites the tap index slot of `ifindex` from `TAPS`, after a write of its entry there.
    pub fn refresh_index_slot(&mut self, ifindex: u32) -> Result<(), KernelError> {
        let slot = tap_index_slot(ifindex);
        let taps = self.observe_taps()?;
        let sharing = taps.iter().filter(|&(&other, _)| tap_index_slot(other) == slot);
        let entry = TapIndexEntry::for_slot(sharing.map(|(&other, tap)| (other, tap)));
        let Some(index) = &mut self.tap_index else {
            // Only state that no command has synced yet lacks it; the sync builds it whole.
            return Ok(());
        };
        index.set(slot, entry, 0).map_err(KernelError::map(format!("writing tap {ifindex}'s index slot")))
    }

    fn observe_taps(&self) -> Result<BTreeMap<u32, TapSessions>, KernelError> {
        self.taps.iter().map(|entry| entry.map_err(KernelError::map("reading the taps map"))).collect()
    }

    /// The state the planner works from.
    pub fn observe(&self) -> Result<Observed, KernelError> {
        let mut observed = Observed::default();
        for (id, session) in self.sessions.iter().enumerate() {
            let session = session.map_err(KernelError::map("reading the sessions map"))?;
            if session.state != SESSION_FREE {
                let id = id as u32;
                if session.owner_pid != 0 && !process_alive(session.owner_pid) {
                    observed.orphaned.insert(id);
                }
                observed.sessions.insert(id, session);
            }
        }
        observed.taps = self.observe_taps()?;
        Ok(observed)
    }

    /// A session's counters for one direction, summed over the CPUs.
    pub fn counters(&self, id: u32, direction: Direction) -> Result<DirectionCounters, KernelError> {
        let per_cpu = self
            .counters
            .get(&counter_index(id, direction), 0)
            .map_err(KernelError::map(format!("reading session {id}'s counters")))?;
        let mut total = DirectionCounters::default();
        for cpu in per_cpu.iter() {
            total.add(cpu);
        }
        Ok(total)
    }

    pub fn filter(&self, id: u32, slot: u32) -> Result<Filter, KernelError> {
        self.filters
            .get(&filter_index(id, slot), 0)
            .map_err(KernelError::map(format!("reading session {id}'s filter")))
    }
}

/// Whether this vmsniff, of ABI `ours`, may use a namespace's maps: `recorded` is their version
/// record (`None`: there is none), `maps` the maps typed with this vmsniff's layouts, or why
/// they do not fit. A recorded version decides alone, since a layout change need not change a
/// size. Without a record the maps are the release before records' if they fit its layouts.
pub fn judge_abi<T>(
    paths: &PinPaths,
    recorded: Option<u32>,
    maps: Result<T, String>,
    ours: u32,
) -> Result<T, KernelError> {
    let refuse =
        |found, recorded| KernelError::AbiVersion { path: paths.root().into(), found, recorded, ours };
    let usable =
        |version| version == ours || ABI_VERSIONS_UPGRADABLE.contains(&version) && ours == ABI_VERSION;
    match (recorded, maps) {
        (Some(found), _) if !usable(found) => Err(refuse(found, true)),
        (None, Ok(_)) if !usable(ABI_VERSION_UNRECORDED) => Err(refuse(ABI_VERSION_UNRECORDED, false)),
        (_, Ok(maps)) => Ok(maps),
        (_, Err(detail)) => Err(KernelError::AbiMismatch { path: paths.maps_dir(), detail }),
    }
}

/// The ABI version the namespace's record holds; `None` when it has none.
fn read_abi_record(paths: &PinPaths) -> Result<Option<u32>, KernelError> {
    let path = paths.map(map_name::ABI);
    if !path.exists() {
        return Ok(None);
    }
    let data = MapData::from_pin(&path).map_err(KernelError::map(format!("opening {}", path.display())))?;
    let record: Array<MapData, u32> = Array::try_from(Map::Array(data)).map_err(|e| {
        KernelError::AbiMismatch { path: paths.maps_dir(), detail: format!("the version record: {e}") }
    })?;
    record.get(&0, 0).map(Some).map_err(KernelError::map(format!("reading {}", path.display())))
}

/// Pins a version record holding this vmsniff's ABI version at `path`. A map of its own rather
/// than an entry in another: every version can read it whatever the other maps' layouts.
/// Written before it is pinned, so that nobody sees it empty.
fn write_abi_record(path: &Path) -> Result<(), KernelError> {
    let op = || format!("recording vmsniff's ABI version in {}", path.display());
    let mut record = Array::<MapData, u32>::create(1, 0).map_err(KernelError::map(op()))?;
    record.set(0, ABI_VERSION, 0).map_err(KernelError::map(op()))?;
    record.pin(path).map_err(|e| KernelError::Io { op: op(), source: io::Error::other(e) })
}

/// Rewrites the pinned record at `path` with this vmsniff's ABI version, in place: one map
/// write, so that every reader sees the old version or the new one.
fn raise_abi_record(path: &Path) -> Result<(), KernelError> {
    let op = || format!("raising vmsniff's ABI version record in {}", path.display());
    let data = MapData::from_pin(path).map_err(KernelError::map(op()))?;
    let mut record: Array<MapData, u32> = Array::try_from(Map::Array(data)).map_err(|e| {
        KernelError::AbiMismatch { path: path.into(), detail: format!("the version record: {e}") }
    })?;
    record.set(0, ABI_VERSION, 0).map_err(KernelError::map(op()))
}

/// Removes the namespace's pin directory (maps and TCX link pins), and vmsniff's directory on
/// bpffs when no other namespace has pins there. Only called, with the lock held, once no
/// session and no tap entry is left.
pub fn remove_pins(paths: &PinPaths) -> Result<(), KernelError> {
    match fs::remove_dir_all(paths.root()) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(KernelError::io(format!("removing {}", paths.root().display()))(e)),
    }
    if let Some(parent) = paths.root().parent() {
        // ENOTEMPTY: other namespaces have sessions; ENOENT: gone already. Both leave it as is.
        match fs::remove_dir(parent) {
            Err(e) if e.raw_os_error() != Some(libc::ENOTEMPTY) && e.kind() != io::ErrorKind::NotFound => {
                return Err(KernelError::io(format!("removing {}", parent.display()))(e));
            }
            _ => {}
        }
    }
    Ok(())
}

/// Whether the pin directory holds a deleted namespace's state (see [`netns::pin_owner`]).
pub fn left_by_deleted_netns(paths: &PinPaths) -> bool {
    let Ok(entries) = fs::read_dir(paths.root()) else { return false };
    let names: Vec<String> =
        entries.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    netns::pin_owner(names.iter().map(String::as_str), netns::current_cookie())
        == netns::PinOwner::DeletedNamespace
}

/// Removes the pins a deleted namespace left at this namespace's inode: everything else of its
/// sessions (devices, filters, links' attachments) went with it. Call with the lock held.
pub fn remove_pins_of_deleted_netns(paths: &PinPaths) -> Result<(), KernelError> {
    if !left_by_deleted_netns(paths) {
        return Ok(());
    }
    log::warn!(
        "removing {}: the pins of a deleted network namespace whose inode this one got",
        paths.root().display()
    );
    fs::remove_dir_all(paths.root()).map_err(KernelError::io(format!("removing {}", paths.root().display())))
}

/// Marks a new pin directory with the namespace's cookie, so that a later namespace that gets
/// its inode tells the state is not its own. Nothing to mark with on kernels before 5.14.
fn mark_netns(paths: &PinPaths) -> Result<(), KernelError> {
    let Some(cookie) = netns::current_cookie() else { return Ok(()) };
    let mark = paths.root().join(netns::cookie_mark(cookie));
    match fs::create_dir(&mark) {
        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => {
            Err(KernelError::io(format!("creating {}", mark.display()))(e))
        }
        _ => Ok(()),
    }
}

fn process_alive(pid: u32) -> bool {
    Path::new("/proc").join(pid.to_string()).exists()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn paths() -> PinPaths {
        PinPaths::for_netns(Path::new(crate::sys::paths::BPFFS), 4026532000)
    }

    fn judge(recorded: Option<u32>, maps: Result<(), &str>, ours: u32) -> Result<(), String> {
        judge_abi(&paths(), recorded, maps.map_err(String::from), ours).map_err(|e| e.to_string())
    }

    #[test]
    fn maps_of_this_version_are_used() {
        assert_eq!(judge(Some(ABI_VERSION), Ok(()), ABI_VERSION), Ok(()));
    }

    #[test]
    fn maps_of_the_release_before_records_are_used_when_their_layouts_fit() {
        assert_eq!(ABI_VERSION_UNRECORDED, 2);
        assert_eq!(judge(None, Ok(()), 2), Ok(()));
        let err = judge(None, Err("invalid value size 120, expected 128"), 2).unwrap_err();
        assert!(err.contains("value size 120") && err.contains("detach --all"), "{err}");
    }

    #[test]
    fn another_recorded_version_is_refused_naming_both_versions_and_the_fix() {
        for (found, ours) in [(3, 2), (1, 2), (1, 3), (4, 3), (1, 4), (5, 4), (2, 5)] {
            let err = judge(Some(found), Ok(()), ours).unwrap_err();
            assert!(err.contains(&format!("ABI version {found},")), "{err}");
            assert!(err.contains(&format!("this vmsniff is of ABI version {ours}")), "{err}");
            assert!(err.contains("/sys/fs/bpf/vmsniff/4026532000"), "{err}");
            assert!(err.contains("changed nothing"), "{err}");
            assert!(err.contains("with the vmsniff that made them"), "{err}");
            assert!(err.contains("`vmsniff detach --all`"), "{err}");
            assert!(!err.contains("before versions were recorded"), "{err}");
        }
    }

    #[test]
    fn a_recorded_version_decides_before_the_layouts() {
        let err = judge(Some(3), Err("invalid value size 120, expected 128"), 2).unwrap_err();
        assert!(err.contains("ABI version 3") && !err.contains("value size"), "{err}");
    }

    #[test]
    fn a_later_version_refuses_unrecorded_maps_as_the_release_before_records() {
        let err = judge(None, Ok(()), 5).unwrap_err();
        assert!(err.contains("ABI version 2 (made before versions were recorded)"), "{err}");
        assert!(err.contains("this vmsniff is of ABI version 5"), "{err}");
        assert_eq!(judge(Some(5), Ok(()), 5), Ok(()));
    }

    #[test]
    fn this_version_uses_the_maps_of_the_versions_it_upgrades() {
        assert_eq!((ABI_VERSION, ABI_VERSIONS_UPGRADABLE), (4, [2, 3]));
        assert_eq!(judge(Some(2), Ok(()), 4), Ok(()));
        assert_eq!(judge(Some(3), Ok(()), 4), Ok(()));
        assert_eq!(judge(None, Ok(()), 4), Ok(()));
        let err = judge(Some(3), Err("invalid value size 120, expected 64"), 4).unwrap_err();
        assert!(err.contains("do not match this vmsniff"), "{err}");
    }

    #[test]
    fn this_version_with_layouts_that_do_not_fit_is_a_layout_mismatch() {
        let err = judge(Some(2), Err("invalid value size 120, expected 128"), 2).unwrap_err();
        assert!(err.contains("do not match this vmsniff (invalid value size 120"), "{err}");
    }
}
