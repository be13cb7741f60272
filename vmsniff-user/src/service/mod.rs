//! The service layer: the operations every front end (the command line, the daemon, later the
//! fleet and metrics) is made of, for eBPF mode and OVS mode. Each takes typed specs and returns
//! typed results; below it are resolve → plan → apply → observe, and `ovs` for OVS mode. Every
//! state-changing operation holds vmsniff's lock and first cleans the remains of crashed runs.
mod ebpf;
pub mod flags;
pub mod inventory;
pub mod local;
pub mod namespace;
pub mod ovs;
pub mod select;
pub mod spec;
pub mod status;

use std::collections::BTreeSet;

use anyhow::Context as _;
use thiserror::Error;

pub use self::{
    namespace::{Namespace, SessionError},
    select::Selection,
    spec::{Destination, MirrorSpec},
};
use crate::{
    model::{
        cancel::Cancel,
        mirror::{Directions, Mode},
        observed::Observed,
        sources::Sources,
    },
    resolve::vm::resolve_tap,
};
pub use crate::{
    plan::{controls::Controls, update::ControlChange},
    resolve::vm::{ResolveError, Resolved},
    sys::{files, lock::flock_holder as lock_holder},
};

/// Who keeps a session, and so who removes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Keeper {
    /// `vmsniff attach`: it persists until `vmsniff detach`.
    Command,
    /// `vmsniff mirror`: this process; when it dies the session is an orphan (eBPF mode only).
    Foreground,
    /// `vmsniff daemon`'s config session of this name: it persists, so that a restarted daemon
    /// adopts it.
    Daemon { name: String },
}

/// A session made.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attached {
    pub id: u32,
    pub mode: Mode,
    /// What it mirrors, to where, in words for the log.
    pub what: String,
}

/// Sessions removed, by mode.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Detached {
    pub ebpf: BTreeSet<u32>,
    pub ovs: BTreeSet<u32>,
}

#[derive(Debug, Error)]
pub enum UpdateError {
    #[error(
        "nothing to change: give --filter, --snaplen, --sample or --rate-limit (or --no-filter, \
         --no-snaplen, --no-rate-limit)"
    )]
    Nothing,
}

/// vmsniff on this node, in the caller's network namespace: the kernel state, libvirt and
/// OVSDB as `sources` name them.
pub struct Service {
    namespace: Namespace,
    sources: Sources,
}

impl Service {
    /// For operations that change state: privileges checked, bpffs mounted.
    pub fn open(sources: Sources) -> Result<Self, SessionError> {
        Ok(Self { namespace: Namespace::open()?, sources })
    }

    /// For operations that only read (status, dry runs).
    pub fn open_for_reading(sources: Sources) -> Result<Self, SessionError> {
        Ok(Self { namespace: Namespace::open_for_reading()?, sources })
    }

    /// The VM NIC a spec names, as it is now (libvirt is read off the runtime thread).
    pub async fn resolve(&self, spec: &MirrorSpec) -> Result<Resolved, ResolveError> {
        resolve_tap(
            &self.sources,
            &self.namespace.kernel.netlink,
            spec.nic.selector(),
            spec.nic.tap(),
            spec.nic.choice(),
        )
        .await
    }

    /// Resolves the spec's NIC and makes its session, in its mode.
    pub async fn attach(&self, spec: &MirrorSpec, keeper: &Keeper) -> anyhow::Result<Attached> {
        let resolved = self.resolve(spec).await?;
        self.attach_resolved(spec, &resolved, keeper, &Cancel::never()).await
    }

    /// Makes the session of a NIC resolved already. `cancel` cuts short the wait for
    /// ovs-vswitchd (OVS mode), undoing the attach.
    pub async fn attach_resolved(
        &self,
        spec: &MirrorSpec,
        resolved: &Resolved,
        keeper: &Keeper,
        cancel: &Cancel,
    ) -> anyhow::Result<Attached> {
        match spec.mode {
            Mode::Ebpf => self.attach_ebpf(spec, resolved, keeper).await,
            Mode::Ovs => self.attach_ovs(spec, resolved, keeper, cancel).await,
        }
    }

    /// The sessions a selection names, in both modes, removed; an error when it names nothing.
    pub async fn detach(&self, selection: &Selection) -> anyhow::Result<Detached> {
        let _lock = self.namespace.lock().await?;
        // Only `--all` can remove state this vmsniff cannot read (another ABI version's): it
        // needs no record of which session is which.
        if *selection == Selection::All {
            self.namespace.remove_unreadable_state().await?;
        }
        self.namespace.clean_orphans().await?;
        let observed = self.namespace.observe()?;
        let ovs = self.ovs_candidates().await?;
        let mut candidates = select::Candidates { taps: ebpf::recorded_taps(&observed) };
        candidates.taps.extend(ovs.as_ref().map(|c| c.taps.clone()).unwrap_or_default());
        let ids = select::select(selection, &candidates, &self.sources).await?;
        let ovs_ids: BTreeSet<u32> = match &ovs {
            Some(c) => ids.iter().copied().filter(|id| c.taps.contains_key(id)).collect(),
            None => BTreeSet::new(),
        };
        let ebpf_ids: BTreeSet<u32> = ids.difference(&ovs_ids).copied().collect();
        if !ebpf_ids.is_empty() {
            self.namespace.detach(&ebpf_ids).await?;
        }
        if !ovs_ids.is_empty() {
            self.detach_ovs(&ovs_ids).await?;
        }
        Ok(Detached { ebpf: ebpf_ids, ovs: ovs_ids })
    }

    /// Removes eBPF sessions `ids` (a daemon's own).
    pub async fn detach_ebpf(&self, ids: &BTreeSet<u32>) -> Result<(), SessionError> {
        let _lock = self.namespace.lock().await?;
        self.namespace.detach(ids).await
    }

    /// Changes the controls of the eBPF sessions a selection names, all or none; their ids.
    pub async fn update(&self, selection: &Selection, change: &ControlChange) -> anyhow::Result<Vec<u32>> {
        if change.is_empty() {
            return Err(UpdateError::Nothing.into());
        }
        let _lock = self.namespace.lock().await?;
        self.namespace.clean_orphans().await?;
        let observed = self.namespace.observe()?;
        let candidates = select::Candidates { taps: ebpf::recorded_taps(&observed) };
        let ids = select::select(selection, &candidates, &self.sources).await?;
        self.update_sessions(&ids, change, &observed).await
    }

    /// Changes one session's controls to what `spec` says (a daemon reload).
    pub async fn update_to(&self, id: u32, spec: &MirrorSpec) -> anyhow::Result<()> {
        let c = &spec.controls;
        let change = ControlChange {
            filter: Some(c.filter.clone()),
            snaplen: Some(c.snaplen),
            sample_every: Some(c.sample_every),
            rate_limit: Some(c.rate_limit),
        };
        let _lock = self.namespace.lock().await?;
        let observed = self.namespace.observe()?;
        self.update_sessions(&BTreeSet::from([id]), &change, &observed).await?;
        Ok(())
    }

    /// Removes what crashed runs left, then reads vmsniff's eBPF state.
    pub async fn clean_and_observe(&self) -> Result<Observed, SessionError> {
        let _lock = self.namespace.lock().await?;
        self.namespace.clean_orphans().await?;
        self.namespace.observe()
    }

    /// The interfaces of this namespace now, by ifindex (the daemon's link events start from
    /// them).
    pub async fn links(&self) -> anyhow::Result<Vec<(u32, String)>> {
        let links = self.namespace.kernel.netlink.links().await.context("listing interfaces (rtnetlink)")?;
        Ok(links.into_iter().map(|l| (l.ifindex, l.name)).collect())
    }

    /// vmsniff's eBPF state now.
    pub fn observe(&self) -> Result<Observed, SessionError> {
        self.namespace.observe()
    }
}

/// "tapX", or "VM c-private NIC 0 (tapX)".
pub fn describe(resolved: &Resolved) -> String {
    match resolved {
        Resolved::Nic { vm, nic, tap } => {
            format!("VM {} NIC {} ({})", vm.display_name(), nic.index, tap.name)
        }
        Resolved::Interface { tap } => tap.name.clone(),
    }
}

/// "both (frames the VM sends and receives) of VM c-private NIC 0 (tapX)": the start of every
/// attach's log line.
fn mirrored(directions: Directions, resolved: &Resolved) -> String {
    format!("{} ({}) of {}", directions.as_str(), direction_words(directions), describe(resolved))
}

pub fn direction_words(directions: Directions) -> &'static str {
    match directions {
        Directions::In => "frames going into the VM",
        Directions::Out => "frames the VM sends",
        Directions::Both => "frames the VM sends and receives",
    }
}

/// The inode of this process's network namespace: vmsniff's state is kept per namespace.
pub fn current_netns() -> std::io::Result<u64> {
    crate::sys::netns::current_inode()
}

/// Seconds since the epoch, stamped into sessions when they are made.
fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}
