//! A recording fake of `KernelOps` and `MapOps`, for unit tests of the executor without root:
//! the maps live in memory, every change asked for is recorded as a `Call`, and the calls a
//! test chooses fail. (aya tests its syscall paths the same way, in `sys/fake.rs`.)
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

struct State {
    pinned: bool,
    sessions: BTreeMap<u32, SessionConfig>,
    taps: BTreeMap<u32, TapSessions>,
    clsact: BTreeSet<u32>,
    next_ifindex: u32,
    calls: Vec<Call>,
    /// Where in `calls` the first failure is.
    first_failure: Option<usize>,
    fails: Box<dyn Fn(&Call) -> bool>,
}

impl Fake {
    /// A namespace holding `observed` (pinned maps when it holds anything), where every call
    /// `fails` picks fails (before it changes anything).
    pub fn new(observed: &Observed, fails: impl Fn(&Call) -> bool + 'static) -> Fake {
        Fake(Rc::new(RefCell::new(State {
            pinned: !observed.sessions.is_empty() || !observed.taps.is_empty(),
            sessions: observed.sessions.clone(),
            taps: observed.taps.clone(),
            clsact: BTreeSet::new(),
            next_ifindex: FIRST_GRE_IFINDEX,
            calls: Vec::new(),
            first_failure: None,
            fails: Box::new(fails),
        })))
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

    /// Records `call`, then fails it if the test said so.
    fn record(&self, call: Call) -> Result<(), KernelError> {
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
        Ok(self.0.borrow().pinned.then(|| self.clone()))
    }

    fn load_programs(&self) -> Result<(), KernelError> {
        self.record(Call::LoadPrograms)?;
        self.0.borrow_mut().pinned = true;
        Ok(())
    }

    fn remove_pins(&self) -> Result<(), KernelError> {
        self.record(Call::RemovePins)?;
        let mut state = self.0.borrow_mut();
        state.pinned = false;
        state.sessions.clear();
        state.taps.clear();
        Ok(())
    }

    async fn create_gre_device(&self, device: &TunnelDevice) -> Result<u32, KernelError> {
        self.record(Call::CreateGreDevice { name: device.name.clone() })?;
        let mut state = self.0.borrow_mut();
        state.next_ifindex += 1;
        Ok(state.next_ifindex - 1)
    }

    async fn delete_gre_device(&self, ifindex: u32, name: &str, _alias: &str) -> Result<(), KernelError> {
        self.record(Call::DeleteGreDevice { ifindex, name: name.to_owned() })
    }

    async fn ensure_clsact(&self, _name: &str, ifindex: u32) -> Result<bool, KernelError> {
        self.record(Call::EnsureClsact { ifindex })?;
        Ok(self.0.borrow_mut().clsact.insert(ifindex))
    }

    async fn remove_clsact_if_unused(&self, _name: &str, ifindex: u32) -> Result<(), KernelError> {
        self.record(Call::RemoveClsactIfUnused { ifindex })?;
        self.0.borrow_mut().clsact.remove(&ifindex);
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
        Ok(match mode {
            AttachMode::Netlink => tc::Attached { nl_priority, nl_handle: HANDLE },
            AttachMode::Tcx => tc::Attached { nl_priority: 0, nl_handle: 0 },
        })
    }

    async fn detach_program(
        &self,
        filter: tc::Filter<'_>,
        _mode: AttachMode,
        _nl_priority: u16,
        _nl_handle: u32,
    ) -> Result<(), KernelError> {
        self.record(Call::DetachProgram {
            program: filter.program.to_owned(),
            ifindex: filter.ifindex,
            hook: filter.hook,
        })
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
