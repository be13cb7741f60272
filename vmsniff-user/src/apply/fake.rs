//! A recording fake of `KernelOps` and `MapOps`, for unit tests of the executor without root:
//! the maps live in memory, every change asked for is recorded as a `Call`, and the calls a
//! test chooses fail. (aya tests its syscall paths the same way, in `sys/fake.rs`.)
//!
//! It also keeps what the kernel would hold outside the maps (GRE devices, tc filters and
//! links, clsact qdiscs), and can be killed after any number of kernel changes: from then on
//! nothing changes, as after a SIGKILL, which runs no undo. A test then revives it and runs the
//! next command's cleanup on what is left.
use std::{
    cell::RefCell,
    collections::{BTreeMap, BTreeSet},
    io,
    path::PathBuf,
    rc::Rc,
};

use vmsniff_ebpf::{SESSION_FREE, SessionConfig, TapSessions, TcHook, filter::Filter};

use crate::{
    apply::{
        kernel_ops::{KernelOps, MapOps},
        tc,
    },
    sys::KernelError,
};
use crate::{
    model::{mirror::AttachMode, observed::Observed},
    plan::attach::TunnelDevice,
};

/// The priority the fake hands out for netlink filters, as tc does on an empty hook.
const PRIORITY: u16 = 49152;
/// The handle of every netlink filter the fake attaches.
const HANDLE: u32 = 1;
/// The ifindex of the first GRE device the fake creates; the next ones count up from it.
const FIRST_GRE_IFINDEX: u32 = 100;

/// A change asked of the kernel. Reads (a session, a tap entry, a filter priority) change
/// nothing and are not recorded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Call {
    LoadPrograms,
    RemovePins,
    SetSession {
        id: u32,
        state: u32,
    },
    ResetCounters {
        id: u32,
    },
    ResetRate {
        id: u32,
    },
    SetFilter {
        id: u32,
        slot: u32,
    },
    /// `ids`: the sessions the entry lists.
    SetTap {
        ifindex: u32,
        ids: Vec<u16>,
    },
    RemoveTap {
        ifindex: u32,
    },
    CreateGreDevice {
        name: String,
    },
    DeleteGreDevice {
        ifindex: u32,
        name: String,
    },
    EnsureClsact {
        ifindex: u32,
    },
    DeleteUnrecordedGreDevice {
        name: String,
    },
    RemoveClsactIfUnused {
        ifindex: u32,
    },
    AttachProgram {
        program: String,
        ifindex: u32,
        hook: TcHook,
    },
    DetachProgram {
        program: String,
        ifindex: u32,
        hook: TcHook,
    },
}

/// One fake namespace; clones share it, as the maps handle the executor opens from it must.
#[derive(Clone)]
pub struct Fake(Rc<RefCell<State>>);

/// A GRE device as the kernel holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Device {
    pub name: String,
    /// vmsniff's mark, set by a second request after the one that creates the device.
    pub alias: Option<String>,
    pub up: bool,
}

/// A program attached to a hook: a netlink filter (priority, handle) or a pinned TCX link.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hooked {
    pub ifindex: u32,
    pub hook: TcHook,
    pub program: String,
    pub nl_priority: u16,
    pub nl_handle: u32,
}

/// What the fake namespace holds besides the maps.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Held {
    pub pinned: bool,
    pub devices: BTreeMap<u32, Device>,
    pub hooked: Vec<Hooked>,
    pub clsact: BTreeSet<u32>,
}

struct State {
    held: Held,
    sessions: BTreeMap<u32, SessionConfig>,
    taps: BTreeMap<u32, TapSessions>,
    next_ifindex: u32,
    calls: Vec<Call>,
    /// Where in `calls` the first failure is.
    first_failure: Option<usize>,
    fails: Box<dyn Fn(&Call) -> bool>,
    /// Kernel changes made so far (creating a GRE device counts two: create, then mark).
    changes: usize,
    /// The process dies before the change with this number: that and every later change fail
    /// and change nothing.
    killed_at: Option<usize>,
}

impl Fake {
    /// A namespace holding `observed` (pinned maps when it holds anything), where every call
    /// `fails` picks fails (before it changes anything).
    pub fn new(observed: &Observed, fails: impl Fn(&Call) -> bool + 'static) -> Fake {
        Fake(Rc::new(RefCell::new(State {
            held: Held {
                pinned: !observed.sessions.is_empty() || !observed.taps.is_empty(),
                ..Held::default()
            },
            sessions: observed.sessions.clone(),
            taps: observed.taps.clone(),
            next_ifindex: FIRST_GRE_IFINDEX,
            calls: Vec::new(),
            first_failure: None,
            fails: Box::new(fails),
            changes: 0,
            killed_at: None,
        })))
    }

    /// Gives an interface a clsact qdisc that is not vmsniff's.
    pub fn add_clsact(&self, ifindex: u32) {
        self.0.borrow_mut().held.clsact.insert(ifindex);
    }

    /// Kills the process after `more` further kernel changes.
    pub fn kill_after(&self, more: usize) {
        let mut state = self.0.borrow_mut();
        state.killed_at = Some(state.changes + more);
    }

    /// The next command, in a new process: changes work again.
    pub fn revive(&self) {
        self.0.borrow_mut().killed_at = None;
    }

    /// Kernel changes made so far.
    pub fn changes(&self) -> usize {
        self.0.borrow().changes
    }

    /// What the namespace holds besides the maps.
    pub fn held(&self) -> Held {
        self.0.borrow().held.clone()
    }

    /// Makes one kernel change, unless the process is dead.
    fn change(&self) -> Result<(), KernelError> {
        let mut state = self.0.borrow_mut();
        if state.killed_at.is_some_and(|at| state.changes >= at) {
            return Err(KernelError::Io {
                op: "a change after the kill".into(),
                source: io::Error::from_raw_os_error(libc::ESRCH),
            });
        }
        state.changes += 1;
        Ok(())
    }

    pub fn calls(&self) -> Vec<Call> {
        self.0.borrow().calls.clone()
    }

    /// The calls before the first failure, the failed call, and the calls after it.
    pub fn split_at_failure(&self) -> (Vec<Call>, Call, Vec<Call>) {
        let state = self.0.borrow();
        let at = state.first_failure.expect("no call failed");
        (state.calls[..at].to_vec(), state.calls[at].clone(), state.calls[at + 1..].to_vec())
    }

    /// The namespace's state, as `PinnedMaps::observe` reads it.
    pub fn observed(&self) -> Observed {
        let state = self.0.borrow();
        Observed {
            sessions: state
                .sessions
                .iter()
                .filter(|(_, s)| s.state != SESSION_FREE)
                .map(|(&id, &s)| (id, s))
                .collect(),
            taps: state.taps.clone(),
            ..Observed::default()
        }
    }

    /// The state as the next command reads it, the killed process's sessions orphaned (every
    /// owner the maps name is this test's process, and taken for dead).
    pub fn observed_after_kill(&self) -> Observed {
        let mut observed = self.observed();
        if !self.0.borrow().held.pinned {
            return Observed::default();
        }
        observed.orphaned =
            observed.sessions.iter().filter(|(_, s)| s.owner_pid != 0).map(|(&id, _)| id).collect();
        observed
    }

    /// Records `call`, then fails it if the test said so or the process is dead.
    fn record(&self, call: Call) -> Result<(), KernelError> {
        self.change()?;
        let mut state = self.0.borrow_mut();
        let fails = (state.fails)(&call);
        state.calls.push(call.clone());
        if !fails {
            return Ok(());
        }
        if state.first_failure.is_none() {
            state.first_failure = Some(state.calls.len() - 1);
        }
        Err(injected(&call))
    }
}

/// The error a failing call returns: its own description, so that a test can tell which
/// failure an apply reported.
pub fn injected(call: &Call) -> KernelError {
    KernelError::Io { op: format!("{call:?}"), source: io::Error::from_raw_os_error(libc::EIO) }
}

impl KernelOps for Fake {
    type Maps = Fake;
    type Programs = ();

    fn maps_dir(&self) -> PathBuf {
        PathBuf::from("/sys/fs/bpf/vmsniff/fake/maps")
    }

    fn open_maps(&self) -> Result<Option<Fake>, KernelError> {
        Ok(self.0.borrow().held.pinned.then(|| self.clone()))
    }

    fn load_programs(&self) -> Result<(), KernelError> {
        self.record(Call::LoadPrograms)?;
        self.0.borrow_mut().held.pinned = true;
        Ok(())
    }

    fn remove_pins(&self) -> Result<(), KernelError> {
        self.record(Call::RemovePins)?;
        let mut state = self.0.borrow_mut();
        state.held.pinned = false;
        state.sessions.clear();
        state.taps.clear();
        // TCX links live by their pins.
        state.held.hooked.retain(|h| h.nl_priority != 0);
        Ok(())
    }

    async fn create_gre_device(&self, device: &TunnelDevice) -> Result<u32, KernelError> {
        self.record(Call::CreateGreDevice { name: device.name.clone() })?;
        let ifindex = {
            let mut state = self.0.borrow_mut();
            let ifindex = state.next_ifindex;
            state.next_ifindex += 1;
            state.held.devices.insert(ifindex, Device { name: device.name.clone(), alias: None, up: false });
            ifindex
        };
        // The second request, as `gre::create` makes it: the alias, and up.
        self.change()?;
        if let Some(created) = self.0.borrow_mut().held.devices.get_mut(&ifindex) {
            created.alias = Some(device.alias.clone());
            created.up = true;
        }
        Ok(ifindex)
    }

    async fn delete_gre_device(&self, ifindex: u32, name: &str, alias: &str) -> Result<(), KernelError> {
        self.record(Call::DeleteGreDevice { ifindex, name: name.to_owned() })?;
        let mut state = self.0.borrow_mut();
        if state
            .held
            .devices
            .get(&ifindex)
            .is_some_and(|d| d.name == name && d.alias.as_deref() == Some(alias))
        {
            state.remove_device(ifindex);
        }
        Ok(())
    }

    async fn delete_unrecorded_gre_device(&self, name: &str, alias: &str) -> Result<(), KernelError> {
        self.record(Call::DeleteUnrecordedGreDevice { name: name.to_owned() })?;
        let mut state = self.0.borrow_mut();
        let found = state.held.devices.iter().find(|(_, d)| {
            d.name == name && (d.alias.as_deref() == Some(alias) || (d.alias.is_none() && !d.up))
        });
        if let Some((&ifindex, _)) = found {
            state.remove_device(ifindex);
        }
        Ok(())
    }

    async fn has_clsact(&self, _name: &str, ifindex: u32) -> Result<bool, KernelError> {
        Ok(self.0.borrow().held.clsact.contains(&ifindex))
    }

    async fn ensure_clsact(&self, _name: &str, ifindex: u32) -> Result<bool, KernelError> {
        self.record(Call::EnsureClsact { ifindex })?;
        Ok(self.0.borrow_mut().held.clsact.insert(ifindex))
    }

    async fn remove_clsact_if_unused(&self, _name: &str, ifindex: u32) -> Result<(), KernelError> {
        self.record(Call::RemoveClsactIfUnused { ifindex })?;
        let mut state = self.0.borrow_mut();
        if !state.held.hooked.iter().any(|h| h.ifindex == ifindex && h.nl_priority != 0) {
            state.held.clsact.remove(&ifindex);
        }
        Ok(())
    }

    async fn first_priority(&self, _name: &str, _ifindex: u32, _hook: TcHook) -> Result<u16, KernelError> {
        Ok(PRIORITY)
    }

    fn attach_program(
        &self,
        _programs: &mut (),
        filter: tc::Filter<'_>,
        mode: AttachMode,
        nl_priority: u16,
    ) -> Result<tc::Attached, KernelError> {
        self.record(Call::AttachProgram {
            program: filter.program.to_owned(),
            ifindex: filter.ifindex,
            hook: filter.hook,
        })?;
        let attached = match mode {
            AttachMode::Netlink => tc::Attached { nl_priority, nl_handle: HANDLE },
            AttachMode::Tcx => tc::Attached { nl_priority: 0, nl_handle: 0 },
        };
        self.0.borrow_mut().held.hooked.push(Hooked {
            ifindex: filter.ifindex,
            hook: filter.hook,
            program: filter.program.to_owned(),
            nl_priority: attached.nl_priority,
            nl_handle: attached.nl_handle,
        });
        Ok(attached)
    }

    async fn detach_program(
        &self,
        filter: tc::Filter<'_>,
        mode: AttachMode,
        nl_priority: u16,
        nl_handle: u32,
    ) -> Result<(), KernelError> {
        self.record(Call::DetachProgram {
            program: filter.program.to_owned(),
            ifindex: filter.ifindex,
            hook: filter.hook,
        })?;
        // As `tc::detach`: the recorded filter, or (handle 0: attached, handle not yet
        // recorded) every filter running the program at the recorded priority.
        self.0.borrow_mut().held.hooked.retain(|h| {
            let here = h.ifindex == filter.ifindex && h.hook == filter.hook && h.program == filter.program;
            let recorded = match mode {
                AttachMode::Tcx => h.nl_priority == 0,
                AttachMode::Netlink => {
                    nl_priority != 0
                        && h.nl_priority == nl_priority
                        && (nl_handle == 0 || h.nl_handle == nl_handle)
                }
            };
            !(here && recorded)
        });
        Ok(())
    }
}

impl State {
    /// A device goes with its qdiscs and filters.
    fn remove_device(&mut self, ifindex: u32) {
        self.held.devices.remove(&ifindex);
        self.held.clsact.remove(&ifindex);
        self.held.hooked.retain(|h| h.ifindex != ifindex);
    }
}

impl MapOps for Fake {
    fn session(&self, id: u32) -> Result<SessionConfig, KernelError> {
        Ok(self.0.borrow().sessions.get(&id).copied().unwrap_or(SessionConfig::EMPTY))
    }

    fn set_session(&mut self, id: u32, config: &SessionConfig) -> Result<(), KernelError> {
        self.record(Call::SetSession { id, state: config.state })?;
        self.0.borrow_mut().sessions.insert(id, *config);
        Ok(())
    }

    fn tap(&self, ifindex: u32) -> Result<Option<TapSessions>, KernelError> {
        Ok(self.0.borrow().taps.get(&ifindex).copied())
    }

    fn set_tap(&mut self, ifindex: u32, tap: &TapSessions) -> Result<(), KernelError> {
        let ids = tap.ids.iter().copied().filter(|&id| id != 0).collect();
        self.record(Call::SetTap { ifindex, ids })?;
        self.0.borrow_mut().taps.insert(ifindex, *tap);
        Ok(())
    }

    fn remove_tap(&mut self, ifindex: u32) -> Result<(), KernelError> {
        self.record(Call::RemoveTap { ifindex })?;
        self.0.borrow_mut().taps.remove(&ifindex);
        Ok(())
    }

    fn set_filter(&mut self, id: u32, slot: u32, _filter: &Filter) -> Result<(), KernelError> {
        self.record(Call::SetFilter { id, slot })
    }

    fn reset_counters(&mut self, id: u32) -> Result<(), KernelError> {
        self.record(Call::ResetCounters { id })
    }

    fn reset_rate(&mut self, id: u32) -> Result<(), KernelError> {
        self.record(Call::ResetRate { id })
    }
}
