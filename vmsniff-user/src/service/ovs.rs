//! OVS mode's operations: the classic Open vSwitch mirror (a Mirror on the VM's port with a GRE
//! output port), made by one OVSDB transaction and removed by another that touches only its own
//! rows. The OVSDB client blocks: every exchange runs on the blocking pool.
use std::collections::{BTreeMap, BTreeSet};

use anyhow::Context as _;
use serde_json::json;

use super::{Attached, Destination, Keeper, MirrorSpec, Service, mirrored, now, select::Candidates};
pub use crate::ovs::{events::OvsEvents, port::OvsPortError, session::OvsSession};
use crate::{
    model::{cancel::Cancel, error::chain, mirror::Mode, sources::Sources},
    ovs::{
        apply::{apply_attach, apply_reselect, remove},
        plan::{
            DaemonOwner, OvsAttachPlan, OvsAttachRequest, OvsReselectRequest, plan_ovs_attach,
            plan_ovs_reselect,
        },
        port::{VmPort, check_route, vm_port},
        session::Snapshot,
    },
    ovsdb::{Client, Operation, vswitch::DATABASE},
    resolve::vm::Resolved,
    sys::blocking::off_thread,
};

/// What `attach --mode ovs --dry-run` shows: the transaction, and the same as ovs-vsctl.
pub struct OvsDryRun {
    pub id: u32,
    pub what: String,
    pub transaction: String,
    pub vsctl: String,
}

/// Runs `f` with a connection to OVSDB, on the blocking pool.
async fn with_ovsdb<T: Send + 'static>(
    sources: &Sources,
    f: impl FnOnce(&mut Client) -> anyhow::Result<T> + Send + 'static,
) -> anyhow::Result<T> {
    let sources = sources.clone();
    off_thread(move || f(&mut Client::open(sources.ovsdb.as_deref())?)).await
}

/// Reads vmsniff's view of OVSDB; `None` when there is no OVSDB (a host without Open vSwitch)
/// unless `--ovsdb` named one.
async fn snapshot_if_present(sources: &Sources) -> anyhow::Result<Option<Snapshot>> {
    let named = sources.ovsdb.is_some();
    let sources = sources.clone();
    off_thread(move || match Client::open(sources.ovsdb.as_deref()) {
        Ok(mut client) => Ok(Some(Snapshot::read(&mut client)?)),
        Err(e) if !named => {
            log::debug!("no OVS sessions: {e}");
            Ok(None)
        }
        Err(e) => Err(e.into()),
    })
    .await
}

/// The JSON-RPC request, one operation a line: valid JSON, and readable.
fn transaction_text(operations: &[Operation]) -> String {
    let mut lines = vec![json!(DATABASE).to_string()];
    lines.extend(operations.iter().map(|o| o.to_json().to_string()));
    format!("{{\"method\": \"transact\", \"id\": 0, \"params\": [\n  {}\n]}}", lines.join(",\n  "))
}

impl Service {
    /// vmsniff's rows in OVSDB now.
    pub async fn ovs_snapshot(&self) -> anyhow::Result<Snapshot> {
        with_ovsdb(&self.sources, |client| Ok(Snapshot::read(client)?)).await
    }

    /// vmsniff's OVS sessions; none without OVSDB.
    pub async fn ovs_sessions(&self) -> anyhow::Result<BTreeMap<u32, OvsSession>> {
        Ok(snapshot_if_present(&self.sources).await?.map(|s| s.sessions()).unwrap_or_default())
    }

    /// The ids OVS sessions hold, for an eBPF attach to leave free; none without OVSDB.
    pub(super) async fn ovs_reserved_ids(&self) -> BTreeSet<u32> {
        match self.ovs_snapshot().await {
            Ok(snapshot) => snapshot.sessions().into_keys().collect(),
            Err(e) => {
                log::debug!("no OVS session ids to avoid: {}", chain(e.as_ref()));
                BTreeSet::new()
            }
        }
    }

    /// OVS sessions with their recorded taps, for a selection; `None` without OVSDB.
    pub(super) async fn ovs_candidates(&self) -> anyhow::Result<Option<Candidates>> {
        let Some(snapshot) = snapshot_if_present(&self.sources).await? else { return Ok(None) };
        let taps =
            snapshot.sessions().into_values().filter_map(|s| Some((s.id, s.tap()?.to_owned()))).collect();
        Ok(Some(Candidates { taps }))
    }

    /// The OVS port a resolved NIC's frames cross.
    pub async fn ovs_port(&self, resolved: &Resolved, snapshot: &Snapshot) -> Result<VmPort, OvsPortError> {
        vm_port(&self.namespace.kernel.netlink, resolved, snapshot).await
    }

    /// Plans an OVS session on `resolved`'s OVS port: finds the port, checks the collector's
    /// route and takes an id free on both sides. Call with vmsniff's lock held (ids are shared
    /// with eBPF mode).
    async fn plan_ovs(
        &self,
        spec: &MirrorSpec,
        resolved: &Resolved,
        keeper: &Keeper,
    ) -> anyhow::Result<(OvsAttachPlan, String)> {
        let Destination::Collector { remote, ttl, tos, .. } = spec.destination else {
            anyhow::bail!("--mode ovs sends copies to a GRE collector: give --to IP");
        };
        let netlink = &self.namespace.kernel.netlink;
        let snapshot = self.ovs_snapshot().await?;
        let port = vm_port(netlink, resolved, &snapshot).await?;
        check_route(netlink, remote, &port, &snapshot).await?;
        let taken: BTreeSet<u32> = self.namespace.observe()?.sessions.keys().copied().collect();
        let (vm, nic) = match resolved {
            Resolved::Nic { vm, nic, .. } => (Some(vm.display_name().to_owned()), Some(nic.index)),
            Resolved::Interface { .. } => (None, None),
        };
        let daemon = match keeper {
            Keeper::Daemon { name } => Some(DaemonOwner { name: name.clone(), argv: spec.to_args() }),
            Keeper::Command | Keeper::Foreground => None,
        };
        let request = OvsAttachRequest {
            bridge: port.bridge.clone(),
            vm_port: port.port.clone(),
            remote,
            key: spec.key,
            ttl,
            tos,
            directions: spec.direction,
            tap: resolved.tap().name.clone(),
            vm,
            nic,
            daemon,
            now: now(),
        };
        let plan = plan_ovs_attach(&request, &snapshot, &taken)?;
        let what = format!(
            "{} at OVS port {} on {} to {remote} (GRE port {}, key {}; mirror {})",
            mirrored(spec.direction, resolved),
            port.port,
            port.bridge,
            plan.gre_port,
            plan.key,
            plan.mirror
        );
        Ok((plan, what))
    }

    pub(super) async fn attach_ovs(
        &self,
        spec: &MirrorSpec,
        resolved: &Resolved,
        keeper: &Keeper,
        cancel: &Cancel,
    ) -> anyhow::Result<Attached> {
        // Session ids are shared with eBPF mode: hold the same lock while choosing one.
        let _lock = self.namespace.lock().await?;
        self.namespace.clean_orphans().await?;
        let (plan, what) = self.plan_ovs(spec, resolved, keeper).await?;
        let (cancel, id) = (cancel.clone(), plan.id);
        with_ovsdb(&self.sources, move |client| Ok(apply_attach(client, &plan, &cancel)?)).await?;
        Ok(Attached { id, mode: Mode::Ovs, what })
    }

    /// What an OVS attach would send, changing nothing.
    pub async fn ovs_dry_run(&self, spec: &MirrorSpec) -> anyhow::Result<OvsDryRun> {
        let resolved = self.resolve(spec).await?;
        let (plan, what) = self.plan_ovs(spec, &resolved, &Keeper::Command).await?;
        Ok(OvsDryRun {
            id: plan.id,
            what,
            transaction: transaction_text(&plan.operations),
            vsctl: plan.vsctl,
        })
    }

    /// Removes OVS sessions `ids` in one transaction, once ovs-vswitchd has applied it.
    pub async fn detach_ovs(&self, ids: &BTreeSet<u32>) -> anyhow::Result<()> {
        let ids: Vec<u32> = ids.iter().copied().collect();
        with_ovsdb(&self.sources, move |client| Ok(remove(client, &ids, true)?))
            .await
            .context("removing OVS mirror sessions")
    }

    /// Points OVS session `id`'s Mirror at its VM's port again (the port was deleted and added
    /// back), keeping id, GRE port, key and statistics.
    pub async fn reselect_ovs(
        &self,
        id: u32,
        vm_port: &str,
        tap: &str,
        spec: &MirrorSpec,
        cancel: &Cancel,
    ) -> anyhow::Result<()> {
        let request = OvsReselectRequest {
            vm_port: vm_port.to_owned(),
            directions: spec.direction,
            tap: tap.to_owned(),
        };
        let cancel = cancel.clone();
        with_ovsdb(&self.sources, move |client| {
            let snapshot = Snapshot::read(client)?;
            let sessions = snapshot.sessions();
            let session = sessions.get(&id).with_context(|| format!("OVS session {id} is gone"))?;
            apply_reselect(client, &plan_ovs_reselect(session, &request, &snapshot)?, &cancel)?;
            Ok(())
        })
        .await
    }

    /// Whether OVSDB can be reached at all (a daemon without OVS sessions needs none).
    pub async fn ovsdb_reachable(&self) -> bool {
        let sources = self.sources.clone();
        off_thread(move || Client::open(sources.ovsdb.as_deref()).is_ok()).await
    }
}
