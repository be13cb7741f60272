//! `status`: every session of both modes with its counters, read from the kernel (eBPF mode's
//! record) and OVSDB (OVS mode's).
use std::collections::BTreeSet;

use anyhow::Context as _;
use serde_json::Value;

use super::{Service, select::status_taps};
pub use crate::observe::status::SessionStatus;
use crate::{
    model::{error::chain, mirror::NicChoice},
    observe::{status::Status, vm_names},
    ovs::status::{OvsSessionStatus, session_status},
    plan::detach::ifname,
    sys::{lock, maps::PinnedMaps},
};

/// Both modes' sessions.
pub struct StatusReport {
    pub ebpf: Status,
    pub ovs: Vec<OvsSessionStatus>,
}

impl StatusReport {
    /// The OVS sessions' table, printed under the eBPF one.
    pub fn ovs_table(&self) -> String {
        crate::ovs::status::render_table(&self.ovs)
    }

    /// `status --json`'s document: eBPF's sessions, then OVS's.
    pub fn to_json(&self) -> anyhow::Result<Value> {
        let mut status = serde_json::to_value(&self.ebpf)?;
        let sessions = status["sessions"].as_array_mut().context("status has a sessions array")?;
        for s in &self.ovs {
            sessions.push(serde_json::to_value(s)?);
        }
        Ok(status)
    }
}

impl Service {
    /// One eBPF session's status, without libvirt or OVSDB (a live counters line); `None` once
    /// it is gone.
    pub async fn session_status(&self, id: u32) -> anyhow::Result<Option<SessionStatus>> {
        let kernel = &self.namespace.kernel;
        let Some(maps) = PinnedMaps::open(&kernel.paths)? else { return Ok(None) };
        let observed = maps.observe()?;
        if !observed.sessions.contains_key(&id) {
            return Ok(None);
        }
        let unhooked = self.unhooked_taps(&observed).await?;
        let status = crate::observe::status::read(&kernel.netlink, Some(&maps), &observed, &unhooked).await?;
        Ok(status.sessions.into_iter().find(|s| s.session == id))
    }

    /// Every session, or those of one VM (`vm`: its selector and NIC choice).
    pub async fn status(&self, vm: Option<(&str, NicChoice)>) -> anyhow::Result<StatusReport> {
        let kernel = &self.namespace.kernel;
        let lock = lock::read_lock().await?;
        let maps = PinnedMaps::open(&kernel.paths)?;
        let observed = self.namespace.observe()?;
        let unhooked = self.unhooked_taps(&observed).await?;
        let mut ebpf =
            crate::observe::status::read(&kernel.netlink, maps.as_ref(), &observed, &unhooked).await?;
        drop(lock);
        vm_names::fill(&mut ebpf, &self.sources).await;
        // An OVSDB that is named but cannot be read is a warning: the eBPF sessions are still
        // worth showing.
        let mut ovs: Vec<OvsSessionStatus> = match self.ovs_sessions().await {
            Ok(sessions) => sessions.values().map(session_status).collect(),
            Err(e) => {
                log::warn!("OVS sessions not shown: {}", chain(e.as_ref()));
                Vec::new()
            }
        };
        if let Some((name, nic)) = vm {
            let recorded: BTreeSet<String> = observed
                .taps
                .values()
                .map(|t| ifname(&t.ifname))
                .chain(ovs.iter().filter_map(|s| s.tap.clone()))
                .collect();
            let taps = status_taps(name, nic, &recorded, &self.sources).await?;
            ebpf.sessions.retain(|s| taps.contains(&s.tap));
            ovs.retain(|s| s.tap.as_ref().is_some_and(|t| taps.contains(t)));
        }
        Ok(StatusReport { ebpf, ovs })
    }
}
