//! vmsniff's pinned maps in one network namespace: the record of every session.
use std::{fs, io, path::Path};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, PerCpuArray},
};
use vmsniff_ebpf::{
    Direction, DirectionCounters, SESSION_FREE, SessionConfig, TapSessions, TokenBucket, counter_index,
    filter::{Filter, filter_index},
    map_name,
};

use crate::sys::KernelError;
use crate::{model::observed::Observed, sys::paths::PinPaths};

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
}

impl PinnedMaps {
    /// Opens the namespace's pinned maps; `None` when vmsniff has no state here.
    pub fn open(paths: &PinPaths) -> Result<Option<Self>, KernelError> {
        let names = map_name::PINNED;
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
        let open = |name: &str| {
            MapData::from_pin(paths.map(name))
                .map_err(KernelError::map(format!("opening pinned map {}", paths.map(name).display())))
        };
        let mismatch = |e: aya::maps::MapError| KernelError::AbiMismatch {
            path: paths.maps_dir(),
            detail: e.to_string(),
        };
        Ok(Some(Self {
            sessions: Array::try_from(aya::maps::Map::Array(open(map_name::SESSIONS)?)).map_err(mismatch)?,
            taps: HashMap::try_from(aya::maps::Map::HashMap(open(map_name::TAPS)?)).map_err(mismatch)?,
            counters: PerCpuArray::try_from(aya::maps::Map::PerCpuArray(open(map_name::COUNTERS)?))
                .map_err(mismatch)?,
            filters: Array::try_from(aya::maps::Map::Array(open(map_name::FILTERS)?)).map_err(mismatch)?,
            rate: Array::try_from(aya::maps::Map::Array(open(map_name::RATE)?)).map_err(mismatch)?,
        }))
    }

    /// Loads the eBPF object with its maps bound to the namespace's pins (created when absent,
    /// reused when present: every tap program of the namespace shares them).
    pub fn load_object(paths: &PinPaths) -> Result<Ebpf, KernelError> {
        if Self::open(paths)?.is_none() {
            fs::create_dir_all(paths.maps_dir())
                .map_err(KernelError::io(format!("creating {}", paths.maps_dir().display())))?;
        }
        let mut loader = EbpfLoader::new();
        for name in map_name::PINNED {
            loader.map_pin_path(name, paths.map(name));
        }
        loader.load(EBPF_OBJECT).map_err(|source| KernelError::Ebpf {
            op: "loading vmsniff's eBPF object".into(),
            source: Box::new(source),
        })
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
        for entry in self.taps.iter() {
            let (ifindex, tap) = entry.map_err(KernelError::map("reading the taps map"))?;
            observed.taps.insert(ifindex, tap);
        }
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

fn process_alive(pid: u32) -> bool {
    Path::new("/proc").join(pid.to_string()).exists()
}
