//! The one executor: runs a plan's steps against the kernel. An attach that fails half-way is
//! undone step by step in reverse, so a failed command leaves the system as it found it; a
//! detach goes on past a failing step and reports every failure at the end.
use vmsniff_ebpf::{
    SESSION_ACTIVE, SESSION_BUSY, SessionConfig, TAP_CREATED_CLSACT, TARGET_CREATED_CLSACT, TapSessions,
    TcHook, program_name,
};

use super::{
    KernelError,
    kernel_ops::{KernelOps, MapOps},
    tc,
};
use crate::{
    netlink::Netlink,
    paths::{PinPaths, gre_device_alias},
    plan::{
        attach::{AttachPlan, AttachStep},
        detach::DetachStep,
        rehome::RehomePlan,
        request::AttachMode,
        update::UpdatePlan,
    },
};

/// What the executor works on: the caller's network namespace.
pub struct Kernel {
    pub netlink: Netlink,
    pub paths: PinPaths,
}

/// Applies an attach plan; on failure undoes what it did and returns the first error.
pub async fn apply_attach<K: KernelOps>(kernel: &K, plan: &AttachPlan) -> Result<(), KernelError> {
    let had_state = kernel.open_maps()?.is_some();
    let result = apply_attach_steps(kernel, &plan.steps).await;
    if result.is_err() && !had_state {
        // This attach made the namespace's pins (maps, maybe link pins): with its steps undone,
        // nothing else uses them.
        if let Err(e) = kernel.remove_pins() {
            log::error!("could not remove the pins of the failed attach: {}", chain(&e));
        }
    }
    result
}

/// Applies a re-home: forgets the old tap (best effort: it is gone, and what is left of it
/// only costs a map entry), then attaches to the new one, undone on failure.
pub async fn apply_rehome<K: KernelOps>(kernel: &K, plan: &RehomePlan) -> Result<(), KernelError> {
    for (step, error) in apply_detach(kernel, &plan.release).await {
        log::warn!("session {}: could not clean up its old tap ({step:?}): {}", plan.id, chain(&error));
    }
    apply_attach_steps(kernel, &plan.attach).await
}

async fn apply_attach_steps<K: KernelOps>(kernel: &K, steps: &[AttachStep]) -> Result<(), KernelError> {
    let mut programs = kernel.load_programs()?;
    let mut maps =
        kernel.open_maps()?.ok_or_else(|| KernelError::MapsVanished { path: kernel.maps_dir() })?;
    let mut undo: Vec<DetachStep> = Vec::new();
    let mut session = SessionConfig::EMPTY;
    for step in steps {
        let result = apply_attach_step(kernel, &mut programs, &mut maps, step, &mut session, &mut undo).await;
        if let Err(error) = result {
            log::debug!("attach failed at {step:?}: undoing {} steps", undo.len());
            for step in undo.iter().rev() {
                if let Err(undo_error) = apply_detach_step(kernel, &mut maps, step).await {
                    log::error!(
                        "could not undo a step of the failed attach ({step:?}): {}",
                        chain(&undo_error)
                    );
                }
            }
            return Err(error);
        }
    }
    Ok(())
}

async fn apply_attach_step<K: KernelOps>(
    kernel: &K,
    programs: &mut K::Programs,
    maps: &mut K::Maps,
    step: &AttachStep,
    session: &mut SessionConfig,
    undo: &mut Vec<DetachStep>,
) -> Result<(), KernelError> {
    match step {
        AttachStep::ClaimSession { id, config } => {
            *session = *config;
            let claimed = SessionConfig { state: SESSION_BUSY, owner_pid: std::process::id(), ..*config };
            maps.set_session(*id, &claimed)?;
            undo.push(DetachStep::FreeSession { id: *id });
        }
        AttachStep::ResetCounters { id } => {
            maps.reset_counters(*id)?;
            maps.reset_rate(*id)?;
        }
        AttachStep::WriteFilter { id, filter } => maps.set_filter(*id, 0, filter)?,
        AttachStep::CreateGreDevice { id, direction, device } => {
            let ifindex = kernel.create_gre_device(device).await?;
            session.target_ifindex[direction.index()] = ifindex;
            undo.push(DetachStep::DeleteGreDevice {
                id: *id,
                direction: *direction,
                ifindex,
                name: device.name.clone(),
            });
            // Record the device at once, so that a crash from here on leaves it findable.
            let mut claimed = maps.session(*id)?;
            claimed.target_ifindex[direction.index()] = ifindex;
            maps.set_session(*id, &claimed)?;
        }
        AttachStep::AttachCopyProgram { id, direction, device } => {
            let d = direction.index();
            let ifindex = session.target_ifindex[d];
            if kernel.ensure_clsact(device, ifindex).await? {
                session.target_flags |= TARGET_CREATED_CLSACT << d;
                undo.push(DetachStep::RemoveClsactIfUnused {
                    tap_ifindex: ifindex,
                    tap_name: device.clone(),
                });
            }
            let priority = kernel.first_priority(device, ifindex, TcHook::Egress).await?;
            let filter = tc::Filter {
                name: device,
                ifindex,
                hook: TcHook::Egress,
                program: program_name::COPY_EGRESS,
            };
            let attached = kernel.attach_program(programs, filter, AttachMode::Netlink, priority)?;
            undo.push(DetachStep::DetachCopyProgram {
                id: *id,
                ifindex,
                nl_priority: attached.nl_priority,
                nl_handle: attached.nl_handle,
            });
            session.target_nl_priority[d] = attached.nl_priority;
            session.target_nl_handle[d] = attached.nl_handle;
            // Record the filter at once, so that a crash from here on leaves it findable.
            let mut claimed = maps.session(*id)?;
            claimed.target_nl_priority = session.target_nl_priority;
            claimed.target_nl_handle = session.target_nl_handle;
            claimed.target_flags = session.target_flags;
            maps.set_session(*id, &claimed)?;
        }
        AttachStep::RegisterTap { tap, mode } => {
            let mut entry = TapSessions { attach_mode: mode.abi(), ..TapSessions::EMPTY };
            let name = tap.name.as_bytes();
            entry.ifname[..name.len()].copy_from_slice(name);
            maps.set_tap(tap.ifindex, &entry)?;
            undo.push(DetachStep::ForgetTap { tap_ifindex: tap.ifindex });
        }
        AttachStep::EnsureClsact { tap } => {
            if kernel.ensure_clsact(&tap.name, tap.ifindex).await? {
                update_tap(maps, tap.ifindex, |entry| entry.flags |= TAP_CREATED_CLSACT)?;
                undo.push(DetachStep::RemoveClsactIfUnused {
                    tap_ifindex: tap.ifindex,
                    tap_name: tap.name.clone(),
                });
            }
        }
        AttachStep::AttachProgram { tap, hook, mode } => {
            let priority = match mode {
                AttachMode::Netlink => kernel.first_priority(&tap.name, tap.ifindex, *hook).await?,
                AttachMode::Tcx => 0,
            };
            let filter = tc::Filter {
                name: &tap.name,
                ifindex: tap.ifindex,
                hook: *hook,
                program: tc::tap_program_name(*hook),
            };
            let attached = kernel.attach_program(programs, filter, *mode, priority)?;
            undo.push(DetachStep::DetachProgram {
                tap_ifindex: tap.ifindex,
                tap_name: tap.name.clone(),
                hook: *hook,
                mode: *mode,
                nl_priority: attached.nl_priority,
                nl_handle: attached.nl_handle,
            });
            update_tap(maps, tap.ifindex, |entry| {
                entry.nl_priority[hook.index()] = attached.nl_priority;
                entry.nl_handle[hook.index()] = attached.nl_handle;
            })?;
        }
        AttachStep::ActivateSession { id } => {
            let active = SessionConfig { state: SESSION_ACTIVE, ..*session };
            maps.set_session(*id, &active)?;
            undo.push(DetachStep::DeactivateSession { id: *id });
        }
        AttachStep::AddToTap { tap, id } => {
            let mut full = false;
            update_tap(maps, tap.ifindex, |entry| match entry.ids.iter().position(|&slot| slot == 0) {
                Some(slot) => entry.ids[slot] = *id as u16,
                None => full = true,
            })?;
            if full {
                return Err(KernelError::TapSlotsTaken { tap: tap.name.clone() });
            }
            undo.push(DetachStep::RemoveFromTap { tap_ifindex: tap.ifindex, ids: vec![*id] });
        }
        AttachStep::MoveSession { id, tap_ifindex } => {
            let moved = SessionConfig { tap_ifindex: *tap_ifindex, ..maps.session(*id)? };
            maps.set_session(*id, &moved)?;
        }
    }
    Ok(())
}

fn update_tap(
    maps: &mut impl MapOps,
    ifindex: u32,
    change: impl FnOnce(&mut TapSessions),
) -> Result<(), KernelError> {
    let mut entry = maps.tap(ifindex)?.unwrap_or(TapSessions::EMPTY);
    change(&mut entry);
    maps.set_tap(ifindex, &entry)
}

/// Applies an update plan: the idle filter slot, then the session's entry in one write (the
/// switch), then the token bucket. A failure before the switch changes nothing the programs
/// read; the switch is one map write, so it happens entirely or not at all.
pub fn apply_update<K: KernelOps>(kernel: &K, plan: &UpdatePlan) -> Result<(), KernelError> {
    let mut maps =
        kernel.open_maps()?.ok_or_else(|| KernelError::NoPinnedMaps { path: kernel.maps_dir() })?;
    if let Some((slot, filter)) = &plan.filter {
        maps.set_filter(plan.id, *slot, filter)?;
    }
    maps.set_session(plan.id, &plan.config)?;
    if plan.reset_rate {
        maps.reset_rate(plan.id)?;
    }
    Ok(())
}

/// Applies detach steps, all of them: returns the failures, each with the step it came from.
pub async fn apply_detach<K: KernelOps>(kernel: &K, steps: &[DetachStep]) -> Vec<(DetachStep, KernelError)> {
    let mut failures = Vec::new();
    let mut maps = match kernel.open_maps() {
        Ok(Some(maps)) => maps,
        Ok(None) => return failures,
        Err(error) => {
            failures.push((DetachStep::RemovePins, error));
            return failures;
        }
    };
    for step in steps {
        if let Err(error) = apply_detach_step(kernel, &mut maps, step).await {
            failures.push((step.clone(), error));
        }
    }
    failures
}

async fn apply_detach_step<K: KernelOps>(
    kernel: &K,
    maps: &mut K::Maps,
    step: &DetachStep,
) -> Result<(), KernelError> {
    match step {
        DetachStep::DeactivateSession { id } => {
            let session = maps.session(*id)?;
            maps.set_session(
                *id,
                &SessionConfig { state: SESSION_BUSY, owner_pid: std::process::id(), ..session },
            )
        }
        DetachStep::RemoveFromTap { tap_ifindex, ids } => {
            if maps.tap(*tap_ifindex)?.is_none() {
                return Ok(());
            }
            update_tap(maps, *tap_ifindex, |entry| {
                let kept: Vec<u16> = entry
                    .ids
                    .iter()
                    .copied()
                    .filter(|&id| id != 0 && !ids.contains(&u32::from(id)))
                    .collect();
                entry.ids = [0; vmsniff_ebpf::MAX_SESSIONS_PER_TAP];
                entry.ids[..kept.len()].copy_from_slice(&kept);
            })
        }
        DetachStep::DetachProgram { tap_ifindex, tap_name, hook, mode, nl_priority, nl_handle } => {
            kernel
                .detach_program(
                    tc::Filter {
                        name: tap_name,
                        ifindex: *tap_ifindex,
                        hook: *hook,
                        program: tc::tap_program_name(*hook),
                    },
                    *mode,
                    *nl_priority,
                    *nl_handle,
                )
                .await
        }
        DetachStep::DetachCopyProgram { id, ifindex, nl_priority, nl_handle } => {
            kernel
                .detach_program(
                    tc::Filter {
                        name: &format!("session {id}'s target"),
                        ifindex: *ifindex,
                        hook: TcHook::Egress,
                        program: program_name::COPY_EGRESS,
                    },
                    AttachMode::Netlink,
                    *nl_priority,
                    *nl_handle,
                )
                .await
        }
        DetachStep::RemoveClsactIfUnused { tap_ifindex, tap_name } => {
            kernel.remove_clsact_if_unused(tap_name, *tap_ifindex).await
        }
        DetachStep::ForgetTap { tap_ifindex } => maps.remove_tap(*tap_ifindex),
        DetachStep::DeleteGreDevice { id, direction, ifindex, name } => {
            kernel.delete_gre_device(*ifindex, name, &gre_device_alias(*id, *direction)).await
        }
        DetachStep::FreeSession { id } => maps.set_session(*id, &SessionConfig::EMPTY),
        DetachStep::RemovePins => kernel.remove_pins(),
    }
}

/// An error and its causes on one line.
pub fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
