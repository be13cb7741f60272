//! eBPF mode's operations: tc programs on the tap, copies through vmsniff's devices.
use std::collections::{BTreeMap, BTreeSet};

use anyhow::Context as _;
use vmsniff_ebpf::{Direction, TcHook, daemon_tag};

use super::{Attached, Destination, Keeper, MirrorSpec, Service, mirrored, now};
use crate::{
    apply::{
        executor::{apply_reattach, apply_rehome, apply_update},
        tc::missing_tap_programs,
    },
    model::{
        mirror::{Mode, Owner, Tap, Target},
        observed::Observed,
        wire::Encap,
    },
    plan::{
        detach::ifname,
        rehome::{plan_reattach, plan_rehome},
        request::AttachRequest,
        update::{ControlChange, CopyProgramChange, plan_update},
    },
    resolve::{interface::ethernet_interface, vm::Resolved},
    service::namespace::tcx_supported,
};

/// Each eBPF session with the tap recorded at attach.
pub(super) fn recorded_taps(observed: &Observed) -> BTreeMap<u32, String> {
    observed
        .taps
        .values()
        .flat_map(|t| {
            let name = ifname(&t.ifname);
            t.ids.iter().filter(|&&id| id != 0).map(move |&id| (u32::from(id), name.clone()))
        })
        .collect()
}

impl Service {
    pub(super) async fn attach_ebpf(
        &self,
        spec: &MirrorSpec,
        resolved: &Resolved,
        keeper: &Keeper,
    ) -> anyhow::Result<Attached> {
        let netlink = &self.namespace.kernel.netlink;
        let target = match &spec.destination {
            Destination::Collector { remote, ttl, tos, encap } => {
                Target::Tunnel { remote: *remote, ttl: *ttl, tos: *tos, encap: *encap }
            }
            Destination::Device { name } => {
                let link = ethernet_interface(netlink, "--to-dev", name).await?;
                Target::LocalDev { name: link.name, ifindex: link.ifindex }
            }
        };
        let owner = match keeper {
            Keeper::Command => Owner::Persistent,
            Keeper::Foreground => Owner::Foreground { pid: std::process::id() },
            Keeper::Daemon { name } => Owner::Daemon { tag: daemon_tag(name) },
        };
        let request = AttachRequest {
            tap: Tap { ifindex: resolved.tap().ifindex, name: resolved.tap().name.clone() },
            target,
            key: spec.key,
            directions: spec.direction,
            controls: spec.controls.clone(),
            mode: spec.attach_mode.unwrap_or_default(),
            tcx_supported: tcx_supported(),
            owner,
            now: now(),
        };
        let _lock = self.namespace.lock().await?;
        self.namespace.clean_orphans().await?;
        let reserved = self.ovs_reserved_ids().await;
        let (id, key) = self.namespace.attach(&request, reserved).await?;
        let wire = match request.target {
            Target::Tunnel { encap: Encap::Gre, .. } => {
                format!(", GRE key {key} (wire keys {} out, {} in)", key * 2, key * 2 + 1)
            }
            Target::Tunnel { encap: Encap::Vxlan { .. }, .. } => {
                format!(", key {key} (VNIs {} out, {} in)", key * 2, key * 2 + 1)
            }
            Target::Tunnel { encap: Encap::ErspanIII { .. } | Encap::ErspanII, .. } => {
                format!(", ERSPAN session id {key}")
            }
            Target::LocalDev { .. } => String::new(),
        };
        let what = format!("{} to {}{wire}", mirrored(request.directions, resolved), request.target);
        Ok(Attached { id, mode: Mode::Ebpf, what })
    }

    /// Moves session `id` to its VM's new tap, keeping id and counters; `false` when it is on
    /// that tap already.
    pub async fn rehome(&self, id: u32, tap: &Tap, spec: &MirrorSpec) -> anyhow::Result<bool> {
        let _lock = self.namespace.lock().await?;
        self.namespace.still_there(&tap.name, tap.ifindex).await?;
        let observed = self.namespace.observe()?;
        let mode = spec.attach_mode.unwrap_or_default();
        let Some(plan) = plan_rehome(id, tap, mode, tcx_supported(), &observed)? else { return Ok(false) };
        apply_rehome(&self.namespace.kernel, &plan).await?;
        Ok(true)
    }

    /// The taps whose programs someone removed (by ifindex), and from which hooks.
    pub(super) async fn unhooked_taps(
        &self,
        observed: &Observed,
    ) -> anyhow::Result<BTreeMap<u32, Vec<TcHook>>> {
        let mut unhooked = BTreeMap::new();
        for (&ifindex, entry) in &observed.taps {
            let missing = missing_tap_programs(&self.namespace.kernel.netlink, ifindex, entry).await?;
            if !missing.is_empty() {
                unhooked.insert(ifindex, missing);
            }
        }
        Ok(unhooked)
    }

    /// Attaches again the tap programs someone removed (`tc qdisc del dev TAP clsact` is a
    /// common operator and agent habit), on every tap that is still there; each tap repaired,
    /// with its hooks. The sessions, their counters and the entries stay as they are.
    pub async fn reattach_removed_programs(&self) -> anyhow::Result<Vec<(String, Vec<TcHook>)>> {
        // A look without the lock first: every daemon pass asks, and nearly always nothing is
        // missing. What it sees may be an attach half-way; the locked look below decides.
        if self.unhooked_taps(&self.namespace.observe()?).await?.is_empty() {
            return Ok(Vec::new());
        }
        let _lock = self.namespace.lock().await?;
        let observed = self.namespace.observe()?;
        let mut repaired = Vec::new();
        for (ifindex, hooks) in self.unhooked_taps(&observed).await? {
            let Some(link) = self
                .namespace
                .kernel
                .netlink
                .link_by_index(ifindex)
                .await
                .with_context(|| format!("looking up ifindex {ifindex}"))?
            else {
                continue;
            };
            let tap = Tap { ifindex, name: link.name };
            apply_reattach(&self.namespace.kernel, &plan_reattach(&tap, &hooks))
                .await
                .with_context(|| format!("attaching vmsniff's programs to {} again", tap.name))?;
            repaired.push((tap.name, hooks));
        }
        Ok(repaired)
    }

    /// Plans every session first, so that one that cannot change stops the operation before any
    /// has; then applies.
    pub(super) async fn update_sessions(
        &self,
        ids: &BTreeSet<u32>,
        change: &ControlChange,
        observed: &Observed,
    ) -> anyhow::Result<Vec<u32>> {
        let plans = ids
            .iter()
            .map(|&id| {
                let current = observed.sessions.get(&id).with_context(|| format!("session {id} is gone"))?;
                Ok((plan_update(id, current, change)?, current.target_ifindex))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        for (plan, target_ifindex) in &plans {
            let targets = match &plan.copy_program {
                CopyProgramChange::Attach(directions) => {
                    self.copy_program_targets(plan.id, directions, target_ifindex).await?
                }
                _ => Vec::new(),
            };
            apply_update(&self.namespace.kernel, plan, &targets)
                .await
                .with_context(|| format!("updating session {}", plan.id))?;
        }
        Ok(plans.iter().map(|(p, _)| p.id).collect())
    }

    /// The names of the devices a new snaplen's copy programs go on (aya attaches by name).
    async fn copy_program_targets(
        &self,
        id: u32,
        directions: &[Direction],
        target_ifindex: &[u32; 2],
    ) -> anyhow::Result<Vec<(Direction, String)>> {
        let mut targets = Vec::new();
        for &direction in directions {
            let ifindex = target_ifindex[direction.index()];
            let link = self
                .namespace
                .kernel
                .netlink
                .link_by_index(ifindex)
                .await
                .with_context(|| format!("looking up ifindex {ifindex}"))?
                .with_context(|| {
                    format!(
                        "session {id}'s target device (ifindex {ifindex}) is gone, so no snaplen can be \
                         applied there; detach the session and attach it again"
                    )
                })?;
            targets.push((direction, link.name));
        }
        Ok(targets)
    }
}
