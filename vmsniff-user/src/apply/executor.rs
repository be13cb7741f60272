//! The one executor: runs a plan's steps against the kernel. An attach that fails half-way is
//! undone step by step in reverse, so a failed command leaves the system as it found it; a
//! detach goes on past a failing step and reports every failure at the end.
use vmsniff_ebpf::{
    Direction, SESSION_ACTIVE, SESSION_BUSY, SessionConfig, TAP_CREATED_CLSACT, TARGET_CREATED_CLSACT,
    TapSessions, TcHook, program_name,
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
        attach::{AttachPlan, AttachStep, GreDevice},
        detach::DetachStep,
        rehome::RehomePlan,
        request::{AttachMode, Tap},
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
    let programs = kernel.load_programs()?;
    let maps = kernel.open_maps()?.ok_or_else(|| KernelError::MapsVanished { path: kernel.maps_dir() })?;
    let mut attach = Attach { kernel, programs, maps, session: SessionConfig::EMPTY, undo: Vec::new() };
    for step in steps {
        if let Err(error) = attach.apply(step).await {
            log::debug!("attach failed at {step:?}: undoing {} steps", attach.undo.len());
            attach.undo().await;
            return Err(error);
        }
    }
    Ok(())
}

/// An attach under way: one function per step kind, each recording how to undo what it did
/// as soon as it has done it, so that a failure half-way through a step is undone too.
struct Attach<'k, K: KernelOps> {
    kernel: &'k K,
    programs: K::Programs,
    maps: K::Maps,
    /// The session's entry as the steps learn it (target ifindexes, filters, flags), written
    /// whole on activation.
    session: SessionConfig,
    /// What undoes each change made so far, in the order made.
    undo: Vec<DetachStep>,
}

impl<K: KernelOps> Attach<'_, K> {
    async fn apply(&mut self, step: &AttachStep) -> Result<(), KernelError> {
        match step {
            AttachStep::ClaimSession { id, config } => self.claim_session(*id, config),
            AttachStep::ResetCounters { id } => self.reset_counters(*id),
            AttachStep::WriteFilter { id, filter } => self.maps.set_filter(*id, 0, filter),
            AttachStep::CreateGreDevice { id, direction, device } => {
                self.create_gre_device(*id, *direction, device).await
            }
            AttachStep::AttachCopyProgram { id, direction, device } => {
                self.attach_copy_program(*id, *direction, device).await
            }
            AttachStep::RegisterTap { tap, mode } => self.register_tap(tap, *mode),
            AttachStep::EnsureClsact { tap } => self.ensure_clsact(tap).await,
            AttachStep::AttachProgram { tap, hook, mode } => self.attach_program(tap, *hook, *mode).await,
            AttachStep::ActivateSession { id } => self.activate_session(*id),
            AttachStep::AddToTap { tap, id } => self.add_to_tap(tap, *id),
            AttachStep::MoveSession { id, tap_ifindex } => self.move_session(*id, *tap_ifindex),
        }
    }

    /// Undoes every change, last first. The caller reports the error that stopped the attach,
    /// so a failure here is logged and the rest is undone still.
    async fn undo(mut self) {
        for step in self.undo.iter().rev() {
            if let Err(error) = apply_detach_step(self.kernel, &mut self.maps, step).await {
                log::error!("could not undo a step of the failed attach ({step:?}): {}", chain(&error));
            }
        }
    }

    fn claim_session(&mut self, id: u32, config: &SessionConfig) -> Result<(), KernelError> {
        self.session = *config;
        let claimed = SessionConfig { state: SESSION_BUSY, owner_pid: std::process::id(), ..*config };
        self.maps.set_session(id, &claimed)?;
        self.undo.push(DetachStep::FreeSession { id });
        Ok(())
    }

    fn reset_counters(&mut self, id: u32) -> Result<(), KernelError> {
        self.maps.reset_counters(id)?;
        self.maps.reset_rate(id)
    }

    async fn create_gre_device(
        &mut self,
        id: u32,
        direction: Direction,
        device: &GreDevice,
    ) -> Result<(), KernelError> {
        let ifindex = self.kernel.create_gre_device(device).await?;
        self.session.target_ifindex[direction.index()] = ifindex;
        self.undo.push(DetachStep::DeleteGreDevice { id, direction, ifindex, name: device.name.clone() });
        // Record the device at once, so that a crash from here on leaves it findable.
        let mut claimed = self.maps.session(id)?;
        claimed.target_ifindex[direction.index()] = ifindex;
        self.maps.set_session(id, &claimed)
    }

    async fn attach_copy_program(
        &mut self,
        id: u32,
        direction: Direction,
        device: &str,
    ) -> Result<(), KernelError> {
        let d = direction.index();
        let ifindex = self.session.target_ifindex[d];
        if self.kernel.ensure_clsact(device, ifindex).await? {
            self.session.target_flags |= TARGET_CREATED_CLSACT << d;
            self.undo
                .push(DetachStep::RemoveClsactIfUnused { tap_ifindex: ifindex, tap_name: device.to_owned() });
        }
        let priority = self.kernel.first_priority(device, ifindex, TcHook::Egress).await?;
        let filter =
            tc::Filter { name: device, ifindex, hook: TcHook::Egress, program: program_name::COPY_EGRESS };
        let attached =
            self.kernel.attach_program(&mut self.programs, filter, AttachMode::Netlink, priority)?;
        self.undo.push(DetachStep::DetachCopyProgram {
            id,
            ifindex,
            nl_priority: attached.nl_priority,
            nl_handle: attached.nl_handle,
        });
        self.session.target_nl_priority[d] = attached.nl_priority;
        self.session.target_nl_handle[d] = attached.nl_handle;
        // Record the filter at once, so that a crash from here on leaves it findable.
        let mut claimed = self.maps.session(id)?;
        claimed.target_nl_priority = self.session.target_nl_priority;
        claimed.target_nl_handle = self.session.target_nl_handle;
        claimed.target_flags = self.session.target_flags;
        self.maps.set_session(id, &claimed)
    }

    fn register_tap(&mut self, tap: &Tap, mode: AttachMode) -> Result<(), KernelError> {
        let mut entry = TapSessions { attach_mode: mode.abi(), ..TapSessions::EMPTY };
        let name = tap.name.as_bytes();
        entry.ifname[..name.len()].copy_from_slice(name);
        self.maps.set_tap(tap.ifindex, &entry)?;
        self.undo.push(DetachStep::ForgetTap { tap_ifindex: tap.ifindex });
        Ok(())
    }

    async fn ensure_clsact(&mut self, tap: &Tap) -> Result<(), KernelError> {
        if self.kernel.ensure_clsact(&tap.name, tap.ifindex).await? {
            update_tap(&mut self.maps, tap.ifindex, |entry| entry.flags |= TAP_CREATED_CLSACT)?;
            self.undo.push(DetachStep::RemoveClsactIfUnused {
                tap_ifindex: tap.ifindex,
                tap_name: tap.name.clone(),
            });
        }
        Ok(())
    }

    async fn attach_program(&mut self, tap: &Tap, hook: TcHook, mode: AttachMode) -> Result<(), KernelError> {
        let priority = match mode {
            AttachMode::Netlink => self.kernel.first_priority(&tap.name, tap.ifindex, hook).await?,
            AttachMode::Tcx => 0,
        };
        let filter =
            tc::Filter { name: &tap.name, ifindex: tap.ifindex, hook, program: tc::tap_program_name(hook) };
        let attached = self.kernel.attach_program(&mut self.programs, filter, mode, priority)?;
        self.undo.push(DetachStep::DetachProgram {
            tap_ifindex: tap.ifindex,
            tap_name: tap.name.clone(),
            hook,
            mode,
            nl_priority: attached.nl_priority,
            nl_handle: attached.nl_handle,
        });
        update_tap(&mut self.maps, tap.ifindex, |entry| {
            entry.nl_priority[hook.index()] = attached.nl_priority;
            entry.nl_handle[hook.index()] = attached.nl_handle;
        })
    }

    fn activate_session(&mut self, id: u32) -> Result<(), KernelError> {
        let active = SessionConfig { state: SESSION_ACTIVE, ..self.session };
        self.maps.set_session(id, &active)?;
        self.undo.push(DetachStep::DeactivateSession { id });
        Ok(())
    }

    fn add_to_tap(&mut self, tap: &Tap, id: u32) -> Result<(), KernelError> {
        let mut full = false;
        update_tap(&mut self.maps, tap.ifindex, |entry| {
            match entry.ids.iter().position(|&slot| slot == 0) {
                Some(slot) => entry.ids[slot] = id as u16,
                None => full = true,
            }
        })?;
        if full {
            return Err(KernelError::TapSlotsTaken { tap: tap.name.clone() });
        }
        self.undo.push(DetachStep::RemoveFromTap { tap_ifindex: tap.ifindex, ids: vec![id] });
        Ok(())
    }

    fn move_session(&mut self, id: u32, tap_ifindex: u32) -> Result<(), KernelError> {
        let moved = SessionConfig { tap_ifindex, ..self.maps.session(id)? };
        self.maps.set_session(id, &moved)
    }
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
