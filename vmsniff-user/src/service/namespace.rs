//! The operations commands are made of: prepare the namespace, attach, detach, observe. Each
//! state-changing one holds vmsniff's lock and first cleans the remains of crashed runs.
use std::collections::BTreeSet;

use aya::util::KernelVersion;
use thiserror::Error;

use crate::{
    apply::executor::{self, Kernel},
    model::{error::chain, mirror::Target, observed::Observed},
    observe::route::{RouteError, check_collector_route},
    plan::{
        attach::{AttachPlanError, plan_attach},
        detach::{DetachStep, plan_cleanup, plan_detach},
        request::AttachRequest,
    },
    sys::{
        KernelError, bpffs,
        lock::{self, StateLock},
        maps::{self, PinnedMaps},
        netlink::Netlink,
        netns,
        paths::PinPaths,
        privilege::{self, PrivilegeError},
    },
};

#[derive(Debug, Error)]
pub enum SessionError {
    #[error(transparent)]
    Privilege(#[from] PrivilegeError),
    #[error(transparent)]
    Plan(#[from] AttachPlanError),
    #[error(transparent)]
    Kernel(#[from] KernelError),
    #[error(transparent)]
    Route(#[from] RouteError),
    #[error("cannot identify this process's network namespace (/proc/thread-self/ns/net)")]
    Netns(#[source] std::io::Error),
    #[error("opening a netlink socket failed")]
    NetlinkSocket(#[source] std::io::Error),
    #[error("{} step(s) of the detach failed: {}", failures.len(), failures.join("; "))]
    DetachIncomplete { failures: Vec<String> },
}

/// The caller's namespace, ready to read or change: privileges checked, bpffs mounted.
pub struct Namespace {
    pub kernel: Kernel,
}

impl Namespace {
    /// Checks privileges, finds the host's bpffs (mounting it if needed) and opens the
    /// namespace, for commands that change state. Must run inside a tokio runtime.
    pub fn open() -> Result<Self, SessionError> {
        privilege::require_admin()?;
        let bpffs = bpffs::locate_for_writing()?;
        Self::open_at(&bpffs)
    }

    /// Like `open`, but changes nothing: without bpffs there simply is no state to read.
    pub fn open_for_reading() -> Result<Self, SessionError> {
        privilege::require_admin()?;
        Self::open_at(&bpffs::locate_for_reading())
    }

    fn open_at(bpffs: &std::path::Path) -> Result<Self, SessionError> {
        let inode = netns::current_inode().map_err(SessionError::Netns)?;
        let netlink = Netlink::open().map_err(SessionError::NetlinkSocket)?;
        Ok(Self { kernel: Kernel { netlink, paths: PinPaths::for_netns(bpffs, inode) } })
    }

    pub async fn lock(&self) -> Result<StateLock, SessionError> {
        Ok(lock::lock().await?)
    }

    /// vmsniff's state here; empty when it has none.
    pub fn observe(&self) -> Result<Observed, SessionError> {
        Ok(match PinnedMaps::open(&self.kernel.paths)? {
            Some(maps) => maps.observe()?,
            None => Observed::default(),
        })
    }

    /// Removes what crashed runs left (see [`plan_cleanup`]).
    /// First records the ABI version of maps made before version records, so that the first
    /// change by this release (the daemon's adoption after an upgrade) writes it. Refuses maps
    /// of another version. Call with the lock held.
    pub async fn clean_orphans(&self) -> Result<(), SessionError> {
        maps::remove_pins_of_deleted_netns(&self.kernel.paths)?;
        PinnedMaps::record_version(&self.kernel.paths)?;
        PinnedMaps::sync_tap_index(&self.kernel.paths)?;
        let Some(maps) = PinnedMaps::open(&self.kernel.paths)? else { return Ok(()) };
        let observed = maps.observe()?;
        drop(maps);
        let Some(steps) = plan_cleanup(&observed) else { return Ok(()) };
        for id in &observed.orphaned {
            log::warn!(
                "session {id} belonged to process {} which is gone (a crashed or killed vmsniff): removing it",
                observed.sessions[id].owner_pid
            );
        }
        self.apply_steps(&steps).await
    }

    /// Plans and applies an attach, leaving the `reserved` ids (OVS sessions') free; returns the
    /// session id and its key.
    pub async fn attach(
        &self,
        request: &AttachRequest,
        reserved: BTreeSet<u32>,
    ) -> Result<(u32, u32), SessionError> {
        self.still_there(&request.tap.name, request.tap.ifindex).await?;
        if let Target::LocalDev { name, ifindex } = &request.target {
            self.still_there(name, *ifindex).await?;
        }
        let observed = Observed { reserved, ..self.observe()? };
        let mut plan = plan_attach(request, &observed)?;
        if let Target::Tunnel { remote, .. } = &request.target {
            let source =
                check_collector_route(&self.kernel.netlink, *remote, &request.tap, &observed).await?;
            plan.set_tunnel_source(source);
        }
        log::debug!("attach plan: {plan:#?}");
        executor::apply_attach(&self.kernel, &plan).await?;
        Ok((plan.session_id, plan.key))
    }

    /// Checks, under the lock, that the interface resolved before it is still `name` at
    /// `ifindex`: a tap deleted and created again meanwhile has another ifindex, and the
    /// programs (attached by name) would land on the new one while the maps name the old.
    pub async fn still_there(&self, name: &str, ifindex: u32) -> Result<(), SessionError> {
        let link = self
            .kernel
            .netlink
            .link_by_index(ifindex)
            .await
            .map_err(KernelError::netlink(format!("looking up {name}")))?;
        match link {
            Some(link) if link.name == name => Ok(()),
            other => {
                let now = match other {
                    Some(link) => format!("ifindex {ifindex} is {} now", link.name),
                    None => format!("ifindex {ifindex} is gone"),
                };
                Err(KernelError::InterfaceChanged { name: name.to_owned(), ifindex, now }.into())
            }
        }
    }

    /// For `detach --all`: when this vmsniff cannot read the namespace's maps (another ABI
    /// version's, or incomplete), removes that state by name, see [`executor::remove_by_name`].
    /// Readable or absent state is left to the ordinary detach. Call with the lock held.
    pub async fn remove_unreadable_state(&self) -> Result<(), SessionError> {
        let reason = match PinnedMaps::open(&self.kernel.paths) {
            Ok(_) => return Ok(()),
            Err(KernelError::AbiVersion { found, ours, .. }) => {
                format!("made by ABI version {found}, this vmsniff is of ABI version {ours}")
            }
            Err(KernelError::AbiMismatch { detail, .. }) => detail,
            Err(e) => return Err(e.into()),
        };
        let root = self.kernel.paths.root().display();
        log::warn!("vmsniff's state at {root} is not this vmsniff's to read ({reason}): removing it by name");
        let (removed, failures) = crate::apply::cleanup::remove_by_name(&self.kernel).await;
        if !failures.is_empty() {
            return Err(SessionError::DetachIncomplete {
                failures: failures.iter().map(|e| chain(e)).collect(),
            });
        }
        log::info!(
            "removed vmsniff's {} tc filter(s), {} GRE device(s) and pins at {root}; clsact qdiscs \
             stay (the maps said which were vmsniff's; an empty one changes nothing)",
            removed.filters,
            removed.devices,
        );
        Ok(())
    }

    /// Plans and applies the removal of `ids`. Call with the lock held.
    pub async fn detach(&self, ids: &BTreeSet<u32>) -> Result<(), SessionError> {
        let observed = self.observe()?;
        self.apply_detach(ids, &observed).await
    }

    async fn apply_detach(&self, ids: &BTreeSet<u32>, observed: &Observed) -> Result<(), SessionError> {
        self.apply_steps(&plan_detach(ids, observed)).await
    }

    async fn apply_steps(&self, steps: &[DetachStep]) -> Result<(), SessionError> {
        log::debug!("detach plan: {steps:#?}");
        let failures = executor::apply_detach(&self.kernel, steps).await;
        if failures.is_empty() {
            Ok(())
        } else {
            Err(SessionError::DetachIncomplete {
                failures: failures.iter().map(|(step, e)| format!("{step:?}: {}", chain(e))).collect(),
            })
        }
    }
}

/// TCX links exist from Linux 6.6 on.
pub fn tcx_supported() -> bool {
    KernelVersion::current().map(|v| v >= KernelVersion::new(6, 6, 0)).unwrap_or(false)
}
