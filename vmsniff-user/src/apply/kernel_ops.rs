//! The kernel operations the executor performs, behind two traits, so that its undo paths can
//! be unit-tested without root against a recording fake (`fake.rs`). The real
//! implementations: `Kernel` and `PinnedMaps`.
use std::path::PathBuf;

use aya::programs::SchedClassifier;
use aya::{maps::PerCpuValues, util::nr_cpus};
use vmsniff_ebpf::{
    Direction, DirectionCounters, SessionConfig, TapSessions, TcHook, TokenBucket, counter_index,
    filter::{Filter, filter_index},
};

use crate::{
    apply::{executor::Kernel, gre, tc},
    model::error::chain,
    sys::{
        KernelError, kill_point,
        maps::{self, PinnedMaps},
    },
};
use crate::{model::mirror::AttachMode, plan::attach::TunnelDevice, sys::paths::PinPaths};

/// What the executor asks of the kernel in one network namespace.
pub trait KernelOps {
    /// The namespace's pinned maps, opened for one apply.
    type Maps: MapOps;
    /// vmsniff's tc programs, made ready for one apply.
    type Programs;

    /// Where the maps are pinned, for messages.
    fn maps_dir(&self) -> PathBuf;
    /// Opens the namespace's pinned maps; `None` when vmsniff has no state here.
    fn open_maps(&self) -> Result<Option<Self::Maps>, KernelError>;
    /// Makes the programs ready to attach; creates and pins the maps when there are none yet.
    fn load_programs(&self) -> Result<Self::Programs, KernelError>;
    /// Removes the namespace's pins (maps, programs, TCX links).
    fn remove_pins(&self) -> Result<(), KernelError>;
    /// Creates and raises a GRE device; returns its ifindex.
    async fn create_gre_device(&self, device: &TunnelDevice) -> Result<u32, KernelError>;
    /// Deletes the GRE device at `ifindex` if it still is vmsniff's.
    async fn delete_gre_device(&self, ifindex: u32, name: &str, alias: &str) -> Result<(), KernelError>;
    /// Deletes the device named `name` if it is vmsniff's: marked with `alias`, or not marked
    /// yet (down, of a GRE kind, no alias: what a run killed between creating and marking it
    /// left). For the devices of a crashed attach that never recorded their ifindex.
    async fn delete_unrecorded_gre_device(&self, name: &str, alias: &str) -> Result<(), KernelError>;
    /// Whether the interface has a clsact qdisc.
    async fn has_clsact(&self, name: &str, ifindex: u32) -> Result<bool, KernelError>;
    /// Adds a clsact qdisc to an interface; returns whether it added one (false: one was there).
    async fn ensure_clsact(&self, name: &str, ifindex: u32) -> Result<bool, KernelError>;
    /// Removes the clsact qdisc vmsniff added, unless anybody else's filter is in it.
    async fn remove_clsact_if_unused(&self, name: &str, ifindex: u32) -> Result<(), KernelError>;
    /// The netlink priority that puts a filter before every filter already on the hook.
    async fn first_priority(&self, name: &str, ifindex: u32, hook: TcHook) -> Result<u16, KernelError>;
    /// Attaches the program `filter` names.
    fn attach_program(
        &self,
        programs: &mut Self::Programs,
        filter: tc::Filter<'_>,
        mode: AttachMode,
        nl_priority: u16,
    ) -> Result<tc::Attached, KernelError>;
    /// Detaches vmsniff's program from one hook; one that is gone already is fine.
    async fn detach_program(
        &self,
        filter: tc::Filter<'_>,
        mode: AttachMode,
        nl_priority: u16,
        nl_handle: u32,
    ) -> Result<(), KernelError>;
}

/// The executor's reads and writes of the namespace's pinned maps.
pub trait MapOps {
    fn session(&self, id: u32) -> Result<SessionConfig, KernelError>;
    fn set_session(&mut self, id: u32, config: &SessionConfig) -> Result<(), KernelError>;
    /// A tap's entry; `None` when it has none.
    fn tap(&self, ifindex: u32) -> Result<Option<TapSessions>, KernelError>;
    fn set_tap(&mut self, ifindex: u32, tap: &TapSessions) -> Result<(), KernelError>;
    /// Deletes a tap's entry; one that is gone already is fine.
    fn remove_tap(&mut self, ifindex: u32) -> Result<(), KernelError>;
    /// Writes one of a session's two filter slots.
    fn set_filter(&mut self, id: u32, slot: u32, filter: &Filter) -> Result<(), KernelError>;
    /// Zeroes a session's per-CPU counters.
    fn reset_counters(&mut self, id: u32) -> Result<(), KernelError>;
    /// Empties a session's token bucket record: the next copy starts with a full bucket.
    fn reset_rate(&mut self, id: u32) -> Result<(), KernelError>;
}

impl KernelOps for Kernel {
    type Maps = PinnedMaps;
    type Programs = Programs;

    fn maps_dir(&self) -> PathBuf {
        self.paths.maps_dir()
    }

    fn open_maps(&self) -> Result<Option<PinnedMaps>, KernelError> {
        PinnedMaps::open(&self.paths)
    }

    fn load_programs(&self) -> Result<Programs, KernelError> {
        changed(Programs::new(&self.paths))
    }

    fn remove_pins(&self) -> Result<(), KernelError> {
        changed(maps::remove_pins(&self.paths))
    }

    async fn create_gre_device(&self, device: &TunnelDevice) -> Result<u32, KernelError> {
        changed(gre::create(&self.netlink, device).await)
    }

    async fn delete_gre_device(&self, ifindex: u32, name: &str, alias: &str) -> Result<(), KernelError> {
        changed(gre::delete(&self.netlink, ifindex, name, alias).await)
    }

    async fn delete_unrecorded_gre_device(&self, name: &str, alias: &str) -> Result<(), KernelError> {
        changed(gre::delete_unrecorded(&self.netlink, name, alias).await)
    }

    async fn has_clsact(&self, name: &str, ifindex: u32) -> Result<bool, KernelError> {
        tc::has_clsact(&self.netlink, name, ifindex).await
    }

    async fn ensure_clsact(&self, name: &str, ifindex: u32) -> Result<bool, KernelError> {
        changed(tc::ensure_clsact(&self.netlink, name, ifindex).await)
    }

    async fn remove_clsact_if_unused(&self, name: &str, ifindex: u32) -> Result<(), KernelError> {
        changed(tc::remove_clsact_if_unused(&self.netlink, name, ifindex).await)
    }

    async fn first_priority(&self, name: &str, ifindex: u32, hook: TcHook) -> Result<u16, KernelError> {
        tc::first_priority(&self.netlink, name, ifindex, hook).await
    }

    fn attach_program(
        &self,
        programs: &mut Programs,
        filter: tc::Filter<'_>,
        mode: AttachMode,
        nl_priority: u16,
    ) -> Result<tc::Attached, KernelError> {
        let program = programs.get(&self.paths, filter.program)?;
        changed(tc::attach(program, &self.paths, filter, mode, nl_priority))
    }

    async fn detach_program(
        &self,
        filter: tc::Filter<'_>,
        mode: AttachMode,
        nl_priority: u16,
        nl_handle: u32,
    ) -> Result<(), KernelError> {
        changed(tc::detach(&self.netlink, &self.paths, filter, mode, nl_priority, nl_handle).await)
    }
}

/// Passes a kernel change's result on, after the test seam that can kill vmsniff there.
fn changed<T>(result: Result<T, KernelError>) -> Result<T, KernelError> {
    kill_point::change_made();
    result
}

/// vmsniff's tc programs for one apply. Loading one runs the kernel's verifier, which takes a
/// second or more for the tap programs on a busy host (many more under an emulated CPU): too
/// slow for the daemon's re-attach after a VM reboots. So the first load in a namespace pins
/// the programs beside its maps (they go with them when the last session does), and later
/// attaches take them from there. The pins are per build of the object, so a new vmsniff never
/// attaches an older build's programs.
pub struct Programs {
    /// The embedded object, loaded (with the namespace's pinned maps) only when a program is
    /// not pinned yet, or when there are no maps to pin to yet.
    ebpf: Option<aya::Ebpf>,
    tag: String,
    pinned: std::collections::BTreeMap<String, SchedClassifier>,
}

impl Programs {
    fn new(paths: &PinPaths) -> Result<Self, KernelError> {
        let ebpf = match PinnedMaps::open(paths)? {
            Some(_) => None,
            None => {
                // New maps: programs pinned beside maps that someone removed would still use
                // the old ones.
                match std::fs::remove_dir_all(paths.programs_root()) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                        return Err(
                            KernelError::io(format!("removing {}", paths.programs_root().display()))(e),
                        );
                    }
                    _ => {}
                }
                Some(PinnedMaps::load_object(paths)?)
            }
        };
        Ok(Programs { ebpf, tag: maps::object_tag(), pinned: Default::default() })
    }

    fn get(&mut self, paths: &PinPaths, name: &str) -> Result<&mut SchedClassifier, KernelError> {
        let path = paths.programs_dir(&self.tag).join(name);
        if !self.pinned.contains_key(name) && path.exists() {
            match SchedClassifier::from_pin(&path) {
                Ok(program) => {
                    self.pinned.insert(name.to_owned(), program);
                }
                Err(e) => {
                    log::debug!("loading {name} anew: its pin {} is unusable: {e}", path.display());
                    // Out of the way, or the fresh program could not be pinned there.
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
        if self.pinned.contains_key(name) {
            // Present, as checked: the error is never built. (Returning from an `if let` on
            // `get_mut` does not pass today's borrow checker, hence the second lookup.)
            return self
                .pinned
                .get_mut(name)
                .ok_or_else(|| KernelError::ProgramMissing { name: name.to_owned() });
        }
        let ebpf = match &mut self.ebpf {
            Some(ebpf) => ebpf,
            ebpf @ None => ebpf.insert(PinnedMaps::load_object(paths)?),
        };
        let program = load_program(ebpf, name)?;
        if let Err(e) = pin_program(paths, &self.tag, program, &path) {
            // Only the next attach's speed depends on it.
            log::debug!("not pinning {name}: {}", chain(&e));
        }
        Ok(program)
    }
}

/// Pins a freshly loaded program under its build's directory, and removes the pins of other
/// builds (unpinning never detaches: filters and links hold their programs).
fn pin_program(
    paths: &PinPaths,
    tag: &str,
    program: &mut SchedClassifier,
    path: &std::path::Path,
) -> Result<(), KernelError> {
    let dir = paths.programs_dir(tag);
    std::fs::create_dir_all(&dir).map_err(KernelError::io(format!("creating {}", dir.display())))?;
    if let Some(parent) = dir.parent() {
        let entries =
            std::fs::read_dir(parent).map_err(KernelError::io(format!("reading {}", parent.display())))?;
        for entry in entries.flatten() {
            if entry.file_name() != std::ffi::OsStr::new(tag) {
                std::fs::remove_dir_all(entry.path())
                    .map_err(KernelError::io(format!("removing {}", entry.path().display())))?;
            }
        }
    }
    program.pin(path).map_err(|e| KernelError::Pin { path: path.to_owned(), source: Box::new(e) })
}

fn load_program<'a>(ebpf: &'a mut aya::Ebpf, name: &str) -> Result<&'a mut SchedClassifier, KernelError> {
    let program: &mut SchedClassifier = ebpf
        .program_mut(name)
        .ok_or_else(|| KernelError::ProgramMissing { name: name.to_owned() })?
        .try_into()
        .map_err(KernelError::program(format!("{name} is not a tc classifier")))?;
    if program.fd().is_err() {
        program
            .load()
            .map_err(KernelError::program(format!("loading {name} (the kernel's verifier refused it)")))?;
    }
    Ok(program)
}

impl MapOps for PinnedMaps {
    fn set_session(&mut self, id: u32, config: &SessionConfig) -> Result<(), KernelError> {
        changed(self.sessions.set(id, config, 0).map_err(KernelError::map(format!("writing session {id}"))))
    }

    fn session(&self, id: u32) -> Result<SessionConfig, KernelError> {
        self.sessions.get(&id, 0).map_err(KernelError::map(format!("reading session {id}")))
    }

    fn tap(&self, ifindex: u32) -> Result<Option<TapSessions>, KernelError> {
        match self.taps.get(&ifindex, 0) {
            Ok(tap) => Ok(Some(tap)),
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(KernelError::map(format!("reading tap {ifindex}"))(e)),
        }
    }

    /// The record first, then the index the programs read (see `PinnedMaps::sync_tap_index`
    /// for a crash between the two).
    fn set_tap(&mut self, ifindex: u32, tap: &TapSessions) -> Result<(), KernelError> {
        changed(
            self.taps.insert(ifindex, tap, 0).map_err(KernelError::map(format!("writing tap {ifindex}"))),
        )?;
        changed(self.refresh_index_slot(ifindex))
    }

    fn remove_tap(&mut self, ifindex: u32) -> Result<(), KernelError> {
        kill_point::change_made();
        match self.taps.remove(&ifindex) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
            Err(e) => return Err(KernelError::map(format!("removing tap {ifindex}"))(e)),
        }
        changed(self.refresh_index_slot(ifindex))
    }

    fn set_filter(&mut self, id: u32, slot: u32, filter: &Filter) -> Result<(), KernelError> {
        changed(
            self.filters
                .set(filter_index(id, slot), filter, 0)
                .map_err(KernelError::map(format!("writing session {id}'s filter"))),
        )
    }

    fn reset_rate(&mut self, id: u32) -> Result<(), KernelError> {
        changed(
            self.rate
                .set(id, TokenBucket::default(), 0)
                .map_err(KernelError::map(format!("resetting session {id}'s rate limit"))),
        )
    }

    fn reset_counters(&mut self, id: u32) -> Result<(), KernelError> {
        let cpus = nr_cpus().map_err(|(what, e)| KernelError::io(format!("counting CPUs ({what})"))(e))?;
        for direction in Direction::ALL {
            let zero = PerCpuValues::try_from(vec![DirectionCounters::default(); cpus])
                .map_err(KernelError::io("building zeroed counters"))?;
            self.counters
                .set(counter_index(id, direction), zero, 0)
                .map_err(KernelError::map(format!("resetting session {id}'s counters")))?;
        }
        changed(Ok(()))
    }
}
