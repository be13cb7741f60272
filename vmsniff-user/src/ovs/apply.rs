//! Carrying OVS mode's transactions out: one `transact` per attach or detach, then waiting until
//! ovs-vswitchd has applied it, as `ovs-vsctl` does. An attach that ovs-vswitchd cannot apply
//! (it is not running, or the GRE port fails) is removed again in one more transaction, so a
//! failed attach leaves no row behind.
use std::time::{Duration, Instant};

use thiserror::Error;

use crate::{
    model::cancel::Cancel,
    ovs::{
        plan::{OvsAttachPlan, next_cfg, plan_ovs_detach},
        session::{Snapshot, cur_cfg},
    },
    ovsdb::{Client, Operation, OvsdbError, vswitch::DATABASE},
};

/// How long ovs-vswitchd may take to apply a change: milliseconds on a server, 1–3 s per port
/// under QEMU's emulation, more on a loaded host. VMSNIFF_OVS_TIMEOUT (seconds) changes it.
const APPLY_TIMEOUT: Duration = Duration::from_secs(30);

fn apply_timeout() -> Duration {
    std::env::var("VMSNIFF_OVS_TIMEOUT")
        .ok()
        .and_then(|s| s.parse().ok())
        .map_or(APPLY_TIMEOUT, Duration::from_secs)
}

#[derive(Debug, Error)]
pub enum OvsApplyError {
    #[error(transparent)]
    Ovsdb(#[from] OvsdbError),
    #[error(
        "ovs-vswitchd did not apply the change within {} s: is it running (`systemctl status \
         openvswitch-switch`, `ovs-appctl -t ovs-vswitchd version`)? {undone} (VMSNIFF_OVS_TIMEOUT \
         sets the wait in seconds)",
        timeout.as_secs()
    )]
    NotApplied { undone: &'static str, timeout: Duration },
    #[error("stopped while waiting for ovs-vswitchd to apply the change. {undone}")]
    Cancelled { undone: &'static str },
    #[error(
        "ovs-vswitchd could not create GRE port {port}: {error} (does the kernel have the \
         openvswitch module with GRE, vport_gre?) The session was removed again"
    )]
    GrePort { port: String, error: String },
    #[error(
        "the attach failed and removing its rows failed too: remove session {id} with `vmsniff detach {id}`"
    )]
    UndoFailed {
        id: u32,
        #[source]
        source: Box<OvsApplyError>,
    },
}

/// Sends an attach plan; returns once ovs-vswitchd mirrors with it.
/// `cancel` cuts the wait short; the session is then removed again.
pub fn apply_attach(client: &mut Client, plan: &OvsAttachPlan, cancel: &Cancel) -> Result<(), OvsApplyError> {
    let results = client.transact(DATABASE, &plan.operations)?;
    let outcome = wait_applied(client, next_cfg(&results), "The session was removed again.", cancel)
        .and_then(|()| {
            let snapshot = Snapshot::read(client)?;
            let error =
                snapshot.sessions().get(&plan.id).and_then(|s| s.gre_interface.as_ref()).and_then(|i| {
                    i.error.clone().or_else(|| (i.ofport == Some(-1)).then(|| "no OpenFlow port".into()))
                });
            match error {
                Some(error) => Err(OvsApplyError::GrePort { port: plan.gre_port.clone(), error }),
                None => Ok(()),
            }
        });
    if let Err(error) = outcome {
        log::debug!("attach of OVS session {} failed ({error}): removing its rows", plan.id);
        // No waiting here: ovs-vswitchd may be the very thing that is missing.
        return Err(match remove(client, &[plan.id], false) {
            Ok(()) => error,
            Err(undo) => OvsApplyError::UndoFailed { id: plan.id, source: Box::new(undo) },
        });
    }
    Ok(())
}

/// Sends a reselect plan (`plan::ovs::plan_ovs_reselect`); returns once ovs-vswitchd mirrors
/// the port again.
pub fn apply_reselect(
    client: &mut Client,
    operations: &[Operation],
    cancel: &Cancel,
) -> Result<(), OvsApplyError> {
    let results = client.transact(DATABASE, operations)?;
    let undone = "The Mirror selects the port in OVSDB; it mirrors once it runs.";
    wait_applied(client, next_cfg(&results), undone, cancel)
}

/// Removes sessions `ids` (those that exist) in one transaction; with `wait`, returns once
/// ovs-vswitchd has stopped mirroring with them.
pub fn remove(client: &mut Client, ids: &[u32], wait: bool) -> Result<(), OvsApplyError> {
    let snapshot = Snapshot::read(client)?;
    let sessions = snapshot.sessions();
    let chosen: Vec<_> = ids.iter().filter_map(|id| sessions.get(id)).collect();
    if chosen.is_empty() {
        return Ok(());
    }
    let results = client.transact(DATABASE, &plan_ovs_detach(&chosen))?;
    if !wait {
        return Ok(());
    }
    let undone = "The rows are gone from OVSDB; it stops mirroring once it runs.";
    // A removal is what a stop does: it is not cut short.
    wait_applied(client, next_cfg(&results), undone, &Cancel::never())
}

/// Polls ovs-vswitchd's `cur_cfg`, as `ovs-vsctl` does. Runs on a blocking thread (see
/// `sys::blocking`), so its sleeps hold up no event loop.
fn wait_applied(
    client: &mut Client,
    next: Option<i64>,
    undone: &'static str,
    cancel: &Cancel,
) -> Result<(), OvsApplyError> {
    let Some(next) = next else {
        return Err(OvsdbError::Malformed { what: "next_cfg", found: "no Open_vSwitch row".into() }.into());
    };
    let timeout = apply_timeout();
    let deadline = Instant::now() + timeout;
    loop {
        if cur_cfg(client)? >= next {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(OvsApplyError::NotApplied { undone, timeout });
        }
        if cancel.is_cancelled() {
            return Err(OvsApplyError::Cancelled { undone });
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
