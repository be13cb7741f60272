//! The one executor: runs a plan's steps against the kernel. An attach that fails half-way is
//! undone step by step in reverse, so a failed command leaves the system as it found it; a
//! detach goes on past a failing step and reports every failure at the end.
use vmsniff_ebpf::{
    Direction, SESSION_ACTIVE, SESSION_BUSY, SessionConfig, TAP_CREATED_CLSACT, TAP_DIRECTIONS_KNOWN,
    TARGET_CREATED_CLSACT, TapSessions, TcHook, program_name,
};

use crate::model::error::chain;
use crate::{
    apply::{
        kernel_ops::{KernelOps, MapOps},
        tc,
    },
    sys::KernelError,
};
use crate::{
    model::mirror::{AttachMode, Tap},
    plan::{
        attach::{AttachPlan, AttachStep, TunnelDevice},
        detach::DetachStep,
        rehome::RehomePlan,
        update::{CopyProgramChange, UpdatePlan},
    },
    sys::{
        netlink::Netlink,
        paths::{PinPaths, gre_device_alias},
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

/// Attaches a tap's programs again (`plan_reattach`); on failure undoes what it did.
pub async fn apply_reattach<K: KernelOps>(kernel: &K, steps: &[AttachStep]) -> Result<(), KernelError> {
    apply_attach_steps(kernel, steps).await
}

async fn apply_attach_steps<K: KernelOps>(kernel: &K, steps: &[AttachStep]) -> Result<(), KernelError> {
    let programs = kernel.load_programs()?;
    let maps = kernel.open_maps()?.ok_or_else(|| KernelError::MapsVanished { path: kernel.maps_dir() })?;
    let mut attach =
        Attach { kernel, programs, maps, session: SessionConfig::EMPTY, claimed: false, undo: Vec::new() };
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
    /// Whether this apply claimed the session (an attach; a re-home moves an existing one).
    claimed: bool,
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
        self.claimed = true;
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
        device: &TunnelDevice,
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
        // Each change is recorded before it is made, so that a kill between the two leaves it
        // findable: the next command's cleanup removes what the record names, if it is there.
        if !self.kernel.has_clsact(device, ifindex).await? {
            self.session.target_flags |= TARGET_CREATED_CLSACT << d;
            self.record_targets(id)?;
            self.undo
                .push(DetachStep::RemoveClsactIfUnused { tap_ifindex: ifindex, tap_name: device.to_owned() });
            let created = self.kernel.ensure_clsact(device, ifindex).await;
            if !matches!(created, Ok(true)) {
                // Failed, or somebody else's appeared meanwhile (it stays): not vmsniff's.
                self.undo.pop();
                self.session.target_flags &= !(TARGET_CREATED_CLSACT << d);
                created?;
                self.record_targets(id)?;
            }
        }
        let priority = self.kernel.first_priority(device, ifindex, TcHook::Egress).await?;
        // The priority alone (handle 0) says "a filter running vmsniff's copy program there".
        self.session.target_nl_priority[d] = priority;
        self.record_targets(id)?;
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
        self.record_targets(id)
    }

    /// Writes what the steps learnt of the session's targets (filters, flags) into its claimed
    /// entry, which stays busy until activation.
    fn record_targets(&mut self, id: u32) -> Result<(), KernelError> {
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
        // Recorded before it is made (see `attach_copy_program`).
        if self.kernel.has_clsact(&tap.name, tap.ifindex).await? {
            return Ok(());
        }
        update_tap(&mut self.maps, tap.ifindex, |entry| entry.flags |= TAP_CREATED_CLSACT)?;
        self.undo
            .push(DetachStep::RemoveClsactIfUnused { tap_ifindex: tap.ifindex, tap_name: tap.name.clone() });
        let created = self.kernel.ensure_clsact(&tap.name, tap.ifindex).await;
        if !matches!(created, Ok(true)) {
            // Failed, or somebody else's appeared meanwhile (it stays): not vmsniff's.
            self.undo.pop();
            created?;
            update_tap(&mut self.maps, tap.ifindex, |entry| entry.flags &= !TAP_CREATED_CLSACT)?;
        }
        Ok(())
    }

    async fn attach_program(&mut self, tap: &Tap, hook: TcHook, mode: AttachMode) -> Result<(), KernelError> {
        let priority = match mode {
            AttachMode::Netlink => {
                let priority = self.kernel.first_priority(&tap.name, tap.ifindex, hook).await?;
                // Recorded before the filter is made, with handle 0: "vmsniff's program at this
                // priority", which the next command's cleanup finds if a kill comes between.
                update_tap(&mut self.maps, tap.ifindex, |entry| {
                    entry.nl_priority[hook.index()] = priority;
                    entry.nl_handle[hook.index()] = 0;
                })?;
                priority
            }
            // A TCX link not yet pinned goes with the killed process's file descriptors.
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
        // Still this process's until it is on the tap's list (`add_to_tap`): killed in between,
        // the session is an orphan the next command removes.
        let active = SessionConfig { state: SESSION_ACTIVE, owner_pid: std::process::id(), ..self.session };
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
        if self.claimed {
            // Complete: the session passes to its owner (none for a persistent one).
            self.maps.set_session(id, &SessionConfig { state: SESSION_ACTIVE, ..self.session })?;
        }
        Ok(())
    }

    fn move_session(&mut self, id: u32, tap_ifindex: u32) -> Result<(), KernelError> {
        let moved = SessionConfig { tap_ifindex, ..self.maps.session(id)? };
        self.maps.set_session(id, &moved)
    }
}

/// Changes the tap's entry in one write, its direction summary recomputed from the sessions it
/// then lists (an entry of ABI version 2 gets one here on its first change).
fn update_tap(
    maps: &mut impl MapOps,
    ifindex: u32,
    change: impl FnOnce(&mut TapSessions),
) -> Result<(), KernelError> {
    let mut entry = maps.tap(ifindex)?.unwrap_or(TapSessions::EMPTY);
    change(&mut entry);
    entry.directions = TAP_DIRECTIONS_KNOWN;
    for id in entry.ids.into_iter().filter(|&id| id != 0) {
        entry.directions |= maps.session(u32::from(id))?.directions;
    }
    maps.set_tap(ifindex, &entry)
}

/// Applies an update plan: a copy program the new snaplen needs (on `targets`, the devices of
/// the plan's directions, by name), the idle filter slot, then the session's entry in one write
/// (the switch), then the token bucket, then the removal of a copy program no longer needed. A
/// failure before the switch undoes the attach and changes nothing the programs read; the
/// switch is one map write, so it happens entirely or not at all.
pub async fn apply_update<K: KernelOps>(
    kernel: &K,
    plan: &UpdatePlan,
    targets: &[(Direction, String)],
) -> Result<(), KernelError> {
    let mut maps =
        kernel.open_maps()?.ok_or_else(|| KernelError::NoPinnedMaps { path: kernel.maps_dir() })?;
    let mut config = plan.config;
    let mut attach = None;
    if let CopyProgramChange::Attach(_) = &plan.copy_program {
        let before = maps.session(plan.id)?;
        let programs = kernel.load_programs()?;
        let own_maps =
            kernel.open_maps()?.ok_or_else(|| KernelError::MapsVanished { path: kernel.maps_dir() })?;
        let mut adding = Attach {
            kernel,
            programs,
            maps: own_maps,
            session: plan.config,
            claimed: false,
            undo: Vec::new(),
        };
        for (direction, device) in targets {
            if let Err(error) = adding.attach_copy_program(plan.id, *direction, device).await {
                adding.undo().await;
                restore_session(&mut maps, plan.id, &before);
                return Err(error);
            }
        }
        config.target_nl_priority = adding.session.target_nl_priority;
        config.target_nl_handle = adding.session.target_nl_handle;
        config.target_flags = adding.session.target_flags;
        attach = Some((adding, before));
    }
    if let Err(error) = write_update(&mut maps, plan, &config) {
        if let Some((adding, before)) = attach {
            adding.undo().await;
            restore_session(&mut maps, plan.id, &before);
        }
        return Err(error);
    }
    if let CopyProgramChange::Detach { steps, then } = &plan.copy_program {
        // The entry written above still names the filters: one that cannot be removed now
        // stays findable by detach.
        for step in steps {
            apply_detach_step(kernel, &mut maps, step).await?;
        }
        maps.set_session(plan.id, then)?;
    }
    Ok(())
}

fn write_update(
    maps: &mut impl MapOps,
    plan: &UpdatePlan,
    config: &SessionConfig,
) -> Result<(), KernelError> {
    if let Some((slot, filter)) = &plan.filter {
        maps.set_filter(plan.id, *slot, filter)?;
    }
    maps.set_session(plan.id, config)?;
    if plan.reset_rate {
        maps.reset_rate(plan.id)?;
    }
    Ok(())
}

/// Puts back the session's entry after an undone attach of its copy program (which recorded
/// the filters in it as it went).
fn restore_session(maps: &mut impl MapOps, id: u32, before: &SessionConfig) {
    if let Err(error) = maps.set_session(id, before) {
        log::error!("could not restore session {id}'s entry after a failed update: {}", chain(&error));
    }
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
        DetachStep::DeleteUnrecordedGreDevice { id, direction, name } => {
            kernel.delete_unrecorded_gre_device(name, &gre_device_alias(*id, *direction)).await
        }
        DetachStep::FreeSession { id } => maps.set_session(*id, &SessionConfig::EMPTY),
        DetachStep::RemovePins => kernel.remove_pins(),
    }
}

#[cfg(test)]
mod tests {
    use std::{collections::BTreeSet, net::Ipv4Addr};

    use vmsniff_ebpf::{
        ATTACH_NETLINK, SESSION_FREE,
        program_name::{COPY_EGRESS, TAP_EGRESS, TAP_INGRESS},
    };

    use super::*;
    use crate::{
        apply::fake::{Call, Fake},
        model::{
            mirror::{AttachModeChoice, Directions, Owner, Target},
            observed::Observed,
            wire::Encap,
        },
        plan::{
            attach::plan_attach,
            controls::{Controls, parse_rate_limit},
            detach::plan_detach,
            filter::compile,
            rehome::plan_rehome,
            request::AttachRequest,
            update::{ControlChange, plan_update},
        },
    };

    fn run<T>(future: impl Future<Output = T>) -> T {
        futures::executor::block_on(future)
    }

    fn set_session(id: u32, state: u32) -> Call {
        Call::SetSession { id, state }
    }

    fn set_tap(ifindex: u32, ids: &[u16]) -> Call {
        Call::SetTap { ifindex, ids: ids.to_vec() }
    }

    fn create_gre(name: &str) -> Call {
        Call::CreateGreDevice { name: name.into() }
    }

    fn delete_gre(ifindex: u32, name: &str) -> Call {
        Call::DeleteGreDevice { ifindex, name: name.into() }
    }

    fn attach(program: &str, ifindex: u32, hook: TcHook) -> Call {
        Call::AttachProgram { program: program.into(), ifindex, hook }
    }

    fn detach(program: &str, ifindex: u32, hook: TcHook) -> Call {
        Call::DetachProgram { program: program.into(), ifindex, hook }
    }

    fn clsact(ifindex: u32) -> Call {
        Call::EnsureClsact { ifindex }
    }

    fn remove_clsact(ifindex: u32) -> Call {
        Call::RemoveClsactIfUnused { ifindex }
    }

    fn remove_tap(ifindex: u32) -> Call {
        Call::RemoveTap { ifindex }
    }

    // Attach: session 1 on tap0 (ifindex 7) to a GRE collector, both directions, a filter,
    // netlink: every step kind but MoveSession. The fake gives the GRE devices ifindexes 100
    // (vms1-out) and 101 (vms1-in).

    fn gre_attach(observed: &Observed) -> AttachPlan {
        let request = AttachRequest {
            tap: Tap { ifindex: 7, name: "tap0".into() },
            target: Target::Tunnel {
                remote: Ipv4Addr::new(192, 0, 2, 10).into(),
                ttl: 64,
                tos: 0,
                encap: Encap::Gre,
            },
            key: None,
            directions: Directions::Both,
            // A snaplen, so that the devices get copy programs too.
            controls: Controls { filter: Some(compile("tcp").unwrap()), snaplen: 96, ..Controls::default() },
            mode: AttachModeChoice::Netlink,
            tcx_supported: false,
            owner: Owner::Persistent,
            now: 1_700_000_000,
        };
        plan_attach(&request, observed).unwrap()
    }

    /// Attaches in a new namespace whose kernel fails the calls `fails` picks; checks that the
    /// first failure is the error returned, and returns the calls made after it.
    fn undone_after_failed_attach(fails: impl Fn(&Call) -> bool + 'static) -> Vec<Call> {
        let fake = Fake::new(&Observed::default(), fails);
        let error = run(apply_attach(&fake, &gre_attach(&Observed::default()))).unwrap_err();
        let (_, failed, undone) = fake.split_at_failure();
        assert_eq!(error.to_string(), format!("{failed:?}"), "the first failure is the one returned");
        undone
    }

    /// What undoes the session's claim and its two GRE devices with their copy programs.
    fn session_undone() -> Vec<Call> {
        vec![
            detach(COPY_EGRESS, 101, TcHook::Egress),
            remove_clsact(101),
            detach(COPY_EGRESS, 100, TcHook::Egress),
            remove_clsact(100),
            delete_gre(101, "vms1-in"),
            delete_gre(100, "vms1-out"),
            set_session(1, SESSION_FREE),
        ]
    }

    #[test]
    fn the_tap_entry_sums_up_the_directions_of_the_sessions_it_lists() {
        // Each to a device of its own: a second session to the same one is refused.
        let one_way = |directions, observed: &Observed| {
            let ifindex = 30 + observed.sessions.len() as u32;
            let request = AttachRequest {
                tap: Tap { ifindex: 7, name: "tap0".into() },
                target: Target::LocalDev { name: format!("mir{ifindex}"), ifindex },
                key: None,
                directions,
                controls: Controls::default(),
                mode: AttachModeChoice::Netlink,
                tcx_supported: false,
                owner: Owner::Persistent,
                now: 1_700_000_000,
            };
            plan_attach(&request, observed).unwrap()
        };
        let summary = |fake: &Fake| fake.observed().taps[&7].directions;
        let fake = Fake::new(&Observed::default(), |_| false);
        run(apply_attach(&fake, &one_way(Directions::In, &Observed::default()))).unwrap();
        assert_eq!(summary(&fake), TAP_DIRECTIONS_KNOWN | Direction::In.bit());
        assert!(fake.observed().taps[&7].skips(Direction::Out));
        run(apply_attach(&fake, &one_way(Directions::Out, &fake.observed()))).unwrap();
        assert_eq!(summary(&fake), TAP_DIRECTIONS_KNOWN | Direction::In.bit() | Direction::Out.bit());
        let first = BTreeSet::from([1]);
        assert!(run(apply_detach(&fake, &plan_detach(&first, &fake.observed()))).is_empty());
        assert_eq!(summary(&fake), TAP_DIRECTIONS_KNOWN | Direction::Out.bit());
        assert!(!fake.observed().taps[&7].skips(Direction::Out));
        assert!(fake.observed().taps[&7].skips(Direction::In));
    }

    #[test]
    fn an_entry_without_a_summary_skips_nothing_and_gets_one_on_its_first_change() {
        let mut observed = Observed::default();
        observed.sessions.insert(
            4,
            SessionConfig {
                state: SESSION_ACTIVE,
                tap_ifindex: 7,
                directions: Direction::In.bit(),
                ..SessionConfig::EMPTY
            },
        );
        // As ABI version 2 wrote it: the word was reserved, 0.
        let mut tap = TapSessions { attach_mode: ATTACH_NETLINK, directions: 0, ..TapSessions::EMPTY };
        tap.ids[0] = 4;
        assert!(!tap.skips(Direction::In) && !tap.skips(Direction::Out));
        observed.taps.insert(7, tap);
        let fake = Fake::new(&observed, |_| false);
        run(apply_attach(&fake, &gre_attach(&observed))).unwrap();
        assert_eq!(
            fake.observed().taps[&7].directions,
            TAP_DIRECTIONS_KNOWN | Direction::In.bit() | Direction::Out.bit()
        );
    }

    #[test]
    fn attach_failing_to_load_the_programs_removes_the_new_pins() {
        assert_eq!(undone_after_failed_attach(|c| *c == Call::LoadPrograms), [Call::RemovePins]);
    }

    #[test]
    fn attach_failing_at_claim_session_undoes_nothing_but_the_pins() {
        assert_eq!(undone_after_failed_attach(|c| *c == set_session(1, SESSION_BUSY)), [Call::RemovePins]);
    }

    #[test]
    fn attach_failing_at_reset_counters_frees_the_session() {
        assert_eq!(
            undone_after_failed_attach(|c| *c == Call::ResetCounters { id: 1 }),
            [set_session(1, SESSION_FREE), Call::RemovePins]
        );
    }

    #[test]
    fn attach_failing_at_write_filter_frees_the_session() {
        assert_eq!(
            undone_after_failed_attach(|c| *c == Call::SetFilter { id: 1, slot: 0 }),
            [set_session(1, SESSION_FREE), Call::RemovePins]
        );
    }

    #[test]
    fn attach_failing_at_create_gre_device_out_frees_the_session() {
        assert_eq!(
            undone_after_failed_attach(|c| *c == create_gre("vms1-out")),
            [set_session(1, SESSION_FREE), Call::RemovePins]
        );
    }

    #[test]
    fn attach_failing_at_create_gre_device_in_deletes_the_out_device() {
        assert_eq!(
            undone_after_failed_attach(|c| *c == create_gre("vms1-in")),
            [delete_gre(100, "vms1-out"), set_session(1, SESSION_FREE), Call::RemovePins]
        );
    }

    #[test]
    fn attach_failing_at_attach_copy_program_removes_the_clsact_it_added_there() {
        assert_eq!(
            undone_after_failed_attach(|c| *c == attach(COPY_EGRESS, 101, TcHook::Egress)),
            [
                remove_clsact(101),
                detach(COPY_EGRESS, 100, TcHook::Egress),
                remove_clsact(100),
                delete_gre(101, "vms1-in"),
                delete_gre(100, "vms1-out"),
                set_session(1, SESSION_FREE),
                Call::RemovePins,
            ]
        );
    }

    #[test]
    fn attach_failing_at_register_tap_undoes_the_targets() {
        assert_eq!(
            undone_after_failed_attach(|c| *c == set_tap(7, &[])),
            [session_undone(), vec![Call::RemovePins]].concat()
        );
    }

    #[test]
    fn attach_failing_at_ensure_clsact_forgets_the_tap() {
        assert_eq!(
            undone_after_failed_attach(|c| *c == clsact(7)),
            [vec![remove_tap(7)], session_undone(), vec![Call::RemovePins]].concat()
        );
    }

    #[test]
    fn attach_failing_at_attach_tap_program_ingress_removes_the_tap_clsact() {
        assert_eq!(
            undone_after_failed_attach(|c| *c == attach(TAP_INGRESS, 7, TcHook::Ingress)),
            [vec![remove_clsact(7), remove_tap(7)], session_undone(), vec![Call::RemovePins]].concat()
        );
    }

    #[test]
    fn attach_failing_at_attach_tap_program_egress_detaches_the_ingress_one() {
        assert_eq!(
            undone_after_failed_attach(|c| *c == attach(TAP_EGRESS, 7, TcHook::Egress)),
            [
                vec![detach(TAP_INGRESS, 7, TcHook::Ingress), remove_clsact(7), remove_tap(7)],
                session_undone(),
                vec![Call::RemovePins],
            ]
            .concat()
        );
    }

    #[test]
    fn attach_failing_at_activate_session_detaches_both_tap_programs() {
        assert_eq!(
            undone_after_failed_attach(|c| *c == set_session(1, SESSION_ACTIVE)),
            [
                vec![
                    detach(TAP_EGRESS, 7, TcHook::Egress),
                    detach(TAP_INGRESS, 7, TcHook::Ingress),
                    remove_clsact(7),
                    remove_tap(7),
                ],
                session_undone(),
                vec![Call::RemovePins],
            ]
            .concat()
        );
    }

    #[test]
    fn attach_failing_at_add_to_tap_deactivates_the_session_first() {
        assert_eq!(
            undone_after_failed_attach(|c| *c == set_tap(7, &[1])),
            [
                vec![
                    set_session(1, SESSION_BUSY),
                    detach(TAP_EGRESS, 7, TcHook::Egress),
                    detach(TAP_INGRESS, 7, TcHook::Ingress),
                    remove_clsact(7),
                    remove_tap(7),
                ],
                session_undone(),
                vec![Call::RemovePins],
            ]
            .concat()
        );
    }

    #[test]
    fn attach_returns_its_first_error_and_undoes_the_rest_when_an_undo_step_fails() {
        let failing = [attach(TAP_EGRESS, 7, TcHook::Egress), detach(TAP_INGRESS, 7, TcHook::Ingress)];
        assert_eq!(
            undone_after_failed_attach(move |c| failing.contains(c)),
            [
                vec![detach(TAP_INGRESS, 7, TcHook::Ingress), remove_clsact(7), remove_tap(7)],
                session_undone(),
                vec![Call::RemovePins],
            ]
            .concat()
        );
    }

    #[test]
    fn attach_to_a_tap_whose_slots_were_taken_meanwhile_is_undone_and_keeps_the_pins() {
        let on_tap = |ids: std::ops::RangeInclusive<u16>| {
            let mut observed = Observed::default();
            let mut tap = TapSessions { attach_mode: ATTACH_NETLINK, ..TapSessions::EMPTY };
            for (slot, id) in ids.enumerate() {
                tap.ids[slot] = id;
                let session = SessionConfig { state: SESSION_ACTIVE, tap_ifindex: 7, ..SessionConfig::EMPTY };
                observed.sessions.insert(u32::from(id), session);
            }
            observed.taps.insert(7, tap);
            observed
        };
        // Planned with one slot free; another process took it before the apply.
        let plan = gre_attach(&on_tap(2..=8));
        let fake = Fake::new(&on_tap(2..=9), |_| false);
        let error = run(apply_attach(&fake, &plan)).unwrap_err();
        assert!(matches!(&error, KernelError::TapSlotsTaken { tap } if tap == "tap0"), "{error:?}");
        let calls = fake.calls();
        let full = calls.iter().position(|c| *c == set_tap(7, &[2, 3, 4, 5, 6, 7, 8, 9])).unwrap();
        assert_eq!(calls[full + 1..], [vec![set_session(1, SESSION_BUSY)], session_undone()].concat());
    }

    // Rehome: session 3 moves from tap 7 (netlink, with the clsact vmsniff added) to the
    // recreated tap, ifindex 12: every step kind a rehome has.

    fn on_old_tap() -> Observed {
        let mut observed = Observed::default();
        observed
            .sessions
            .insert(3, SessionConfig { state: SESSION_ACTIVE, tap_ifindex: 7, ..SessionConfig::EMPTY });
        let mut tap =
            TapSessions { attach_mode: ATTACH_NETLINK, flags: TAP_CREATED_CLSACT, ..TapSessions::EMPTY };
        tap.ids[0] = 3;
        tap.ifname[..5].copy_from_slice(b"tapvm");
        observed.taps.insert(7, tap);
        observed
    }

    fn rehome(fails: impl Fn(&Call) -> bool + 'static) -> (Fake, Result<(), KernelError>) {
        let observed = on_old_tap();
        let tap = Tap { ifindex: 12, name: "tapvm".into() };
        let plan = plan_rehome(3, &tap, AttachModeChoice::Netlink, false, &observed).unwrap().unwrap();
        let fake = Fake::new(&observed, fails);
        let result = run(apply_rehome(&fake, &plan));
        (fake, result)
    }

    /// Rehomes with the calls `fails` picks failing; checks that the first failure is the
    /// error returned, and returns the calls made after it.
    fn undone_after_failed_rehome(fails: impl Fn(&Call) -> bool + 'static) -> Vec<Call> {
        let (fake, result) = rehome(fails);
        let (_, failed, undone) = fake.split_at_failure();
        assert_eq!(
            result.unwrap_err().to_string(),
            format!("{failed:?}"),
            "the first failure is the one returned"
        );
        undone
    }

    #[test]
    fn rehome_releases_the_old_tap_then_attaches_to_the_new_one() {
        let (fake, result) = rehome(|_| false);
        result.unwrap();
        assert_eq!(
            fake.calls(),
            [
                detach(TAP_INGRESS, 7, TcHook::Ingress),
                detach(TAP_EGRESS, 7, TcHook::Egress),
                remove_clsact(7),
                remove_tap(7),
                Call::LoadPrograms,
                set_tap(12, &[]),
                // The clsact and each filter are recorded before they are made.
                set_tap(12, &[]),
                clsact(12),
                set_tap(12, &[]),
                attach(TAP_INGRESS, 12, TcHook::Ingress),
                set_tap(12, &[]),
                set_tap(12, &[]),
                attach(TAP_EGRESS, 12, TcHook::Egress),
                set_tap(12, &[]),
                set_tap(12, &[3]),
                set_session(3, SESSION_ACTIVE),
            ]
        );
    }

    #[test]
    fn rehome_goes_on_past_a_failing_release_of_the_old_tap() {
        let (fake, result) = rehome(|c| *c == detach(TAP_INGRESS, 7, TcHook::Ingress));
        result.unwrap();
        let (_, _, after) = fake.split_at_failure();
        assert_eq!(after[..3], [detach(TAP_EGRESS, 7, TcHook::Egress), remove_clsact(7), remove_tap(7)]);
        assert_eq!(after.last(), Some(&set_session(3, SESSION_ACTIVE)));
    }

    #[test]
    fn rehome_failing_at_register_tap_undoes_nothing() {
        assert_eq!(undone_after_failed_rehome(|c| *c == set_tap(12, &[])), []);
    }

    #[test]
    fn rehome_failing_at_ensure_clsact_forgets_the_new_tap() {
        assert_eq!(undone_after_failed_rehome(|c| *c == clsact(12)), [remove_tap(12)]);
    }

    #[test]
    fn rehome_failing_at_attach_tap_program_ingress_removes_the_clsact() {
        assert_eq!(
            undone_after_failed_rehome(|c| *c == attach(TAP_INGRESS, 12, TcHook::Ingress)),
            [remove_clsact(12), remove_tap(12)]
        );
    }

    #[test]
    fn rehome_failing_at_attach_tap_program_egress_detaches_the_ingress_one() {
        assert_eq!(
            undone_after_failed_rehome(|c| *c == attach(TAP_EGRESS, 12, TcHook::Egress)),
            [detach(TAP_INGRESS, 12, TcHook::Ingress), remove_clsact(12), remove_tap(12)]
        );
    }

    #[test]
    fn rehome_failing_at_add_to_tap_detaches_both_programs() {
        assert_eq!(
            undone_after_failed_rehome(|c| *c == set_tap(12, &[3])),
            [
                detach(TAP_EGRESS, 12, TcHook::Egress),
                detach(TAP_INGRESS, 12, TcHook::Ingress),
                remove_clsact(12),
                remove_tap(12),
            ]
        );
    }

    #[test]
    fn rehome_failing_at_move_session_takes_the_session_off_the_new_tap() {
        assert_eq!(
            undone_after_failed_rehome(|c| *c == set_session(3, SESSION_ACTIVE)),
            [
                set_tap(12, &[]),
                detach(TAP_EGRESS, 12, TcHook::Egress),
                detach(TAP_INGRESS, 12, TcHook::Ingress),
                remove_clsact(12),
                remove_tap(12),
            ]
        );
    }

    // Update: session 3 gets a filter and a rate limit: a filter slot, the switch, the bucket.
    // Nothing is undone: before the switch the programs read nothing that changed.

    /// Updates with the calls `fails` picks failing; checks that the first failure is the
    /// error returned, and returns every call made.
    fn calls_of_failed_update(fails: impl Fn(&Call) -> bool + 'static) -> Vec<Call> {
        let current = SessionConfig { state: SESSION_ACTIVE, sample_every: 1, ..SessionConfig::EMPTY };
        let change = ControlChange {
            filter: Some(Some(compile("tcp").unwrap())),
            rate_limit: Some(Some(parse_rate_limit("100pps").unwrap())),
            ..ControlChange::default()
        };
        let plan = plan_update(3, &current, &change).unwrap();
        let mut observed = Observed::default();
        observed.sessions.insert(3, current);
        let fake = Fake::new(&observed, fails);
        let error = run(apply_update(&fake, &plan, &[])).unwrap_err();
        let (_, failed, _) = fake.split_at_failure();
        assert_eq!(error.to_string(), format!("{failed:?}"), "the first failure is the one returned");
        fake.calls()
    }

    #[test]
    fn update_failing_at_the_filter_write_never_switches() {
        let fails = |c: &Call| *c == Call::SetFilter { id: 3, slot: 0 };
        assert_eq!(calls_of_failed_update(fails), [Call::SetFilter { id: 3, slot: 0 }]);
    }

    #[test]
    fn update_failing_at_the_switch_leaves_the_bucket() {
        assert_eq!(
            calls_of_failed_update(|c| *c == set_session(3, SESSION_ACTIVE)),
            [Call::SetFilter { id: 3, slot: 0 }, set_session(3, SESSION_ACTIVE)]
        );
    }

    #[test]
    fn update_failing_at_the_rate_reset_keeps_the_switch() {
        assert_eq!(
            calls_of_failed_update(|c| *c == Call::ResetRate { id: 3 }),
            [Call::SetFilter { id: 3, slot: 0 }, set_session(3, SESSION_ACTIVE), Call::ResetRate { id: 3 }]
        );
    }

    #[test]
    fn update_without_pinned_maps_says_so() {
        let plan = plan_update(
            3,
            &SessionConfig { state: SESSION_ACTIVE, ..SessionConfig::EMPTY },
            &ControlChange::default(),
        )
        .unwrap();
        let fake = Fake::new(&Observed::default(), |_| false);
        let error = run(apply_update(&fake, &plan, &[])).unwrap_err();
        assert!(matches!(error, KernelError::NoPinnedMaps { .. }), "{error:?}");
        assert_eq!(fake.calls(), []);
    }

    /// Session 1 of `gre_attach` without its snaplen and copy programs, as an attach of today
    /// leaves a whole-frame session, and the observed state around it.
    fn whole_frame_gre_session() -> (Observed, SessionConfig) {
        let attached = Fake::new(&Observed::default(), |_| false);
        run(apply_attach(&attached, &gre_attach(&Observed::default()))).unwrap();
        let mut observed = attached.observed();
        let session = observed.sessions.get_mut(&1).unwrap();
        session.snaplen = 0;
        session.target_nl_priority = [0; 2];
        session.target_nl_handle = [0; 2];
        session.target_flags = 0;
        let session = *session;
        (observed, session)
    }

    #[test]
    fn update_adding_a_snaplen_attaches_the_copy_programs_first_and_undoes_them_on_failure() {
        let (observed, session) = whole_frame_gre_session();
        let plan =
            plan_update(1, &session, &ControlChange { snaplen: Some(64), ..Default::default() }).unwrap();
        let targets = [(Direction::Out, "vms1-out".to_owned()), (Direction::In, "vms1-in".to_owned())];
        let fake = Fake::new(&observed, |_| false);
        run(apply_update(&fake, &plan, &targets)).unwrap();
        let after = fake.observed().sessions[&1];
        assert_eq!(after.snaplen, 64);
        assert!(after.target_nl_priority.iter().all(|&p| p != 0), "{after:?}");
        let calls = fake.calls();
        let switch = calls.iter().rposition(|c| *c == set_session(1, SESSION_ACTIVE)).unwrap();
        let second = calls.iter().position(|c| *c == attach(COPY_EGRESS, 101, TcHook::Egress)).unwrap();
        assert!(second < switch, "the programs come before the snaplen: {calls:?}");

        // The second device's attach fails: the first is detached, the entry put back.
        let fake = Fake::new(&observed, |c| *c == attach(COPY_EGRESS, 101, TcHook::Egress));
        run(apply_update(&fake, &plan, &targets)).unwrap_err();
        let (_, _, undone) = fake.split_at_failure();
        assert!(undone.contains(&detach(COPY_EGRESS, 100, TcHook::Egress)), "{undone:?}");
        assert_eq!(undone.last(), Some(&set_session(1, SESSION_ACTIVE)));
        assert_eq!(fake.observed().sessions[&1], session, "the entry is as it was");
    }

    #[test]
    fn update_dropping_the_snaplen_removes_the_copy_programs_after_the_switch() {
        let attached = Fake::new(&Observed::default(), |_| false);
        run(apply_attach(&attached, &gre_attach(&Observed::default()))).unwrap();
        let observed = attached.observed();
        let session = observed.sessions[&1];
        let plan =
            plan_update(1, &session, &ControlChange { snaplen: Some(0), ..Default::default() }).unwrap();
        let fake = Fake::new(&observed, |_| false);
        run(apply_update(&fake, &plan, &[])).unwrap();
        let calls = fake.calls();
        let first_detach = calls.iter().position(|c| matches!(c, Call::DetachProgram { .. })).unwrap();
        assert_eq!(calls[first_detach - 1], set_session(1, SESSION_ACTIVE), "the switch first: {calls:?}");
        let after = fake.observed().sessions[&1];
        assert_eq!((after.snaplen, after.target_nl_priority, after.target_flags), (0, [0, 0], 0));
    }

    // Detach.

    #[test]
    fn detach_goes_on_past_failing_steps_and_reports_each() {
        let attached = Fake::new(&Observed::default(), |_| false);
        run(apply_attach(&attached, &gre_attach(&Observed::default()))).unwrap();
        let observed = attached.observed();
        let steps = plan_detach(&BTreeSet::from([1]), &observed);
        let failing = [detach(TAP_INGRESS, 7, TcHook::Ingress), delete_gre(100, "vms1-out")];
        let fake = Fake::new(&observed, move |c| failing.contains(c));

        let failures = run(apply_detach(&fake, &steps));

        assert_eq!(
            fake.calls(),
            [
                set_session(1, SESSION_BUSY),
                detach(TAP_INGRESS, 7, TcHook::Ingress),
                detach(TAP_EGRESS, 7, TcHook::Egress),
                remove_clsact(7),
                remove_tap(7),
                delete_gre(100, "vms1-out"),
                delete_gre(101, "vms1-in"),
                set_session(1, SESSION_FREE),
                Call::RemovePins,
            ]
        );
        let reported: Vec<(DetachStep, String)> =
            failures.iter().map(|(step, error)| (step.clone(), error.to_string())).collect();
        assert_eq!(
            reported,
            [
                (
                    DetachStep::DetachProgram {
                        tap_ifindex: 7,
                        tap_name: "tap0".into(),
                        hook: TcHook::Ingress,
                        mode: AttachMode::Netlink,
                        nl_priority: 49152,
                        nl_handle: 1,
                    },
                    format!("{:?}", detach(TAP_INGRESS, 7, TcHook::Ingress)),
                ),
                (
                    DetachStep::DeleteGreDevice {
                        id: 1,
                        direction: Direction::Out,
                        ifindex: 100,
                        name: "vms1-out".into(),
                    },
                    format!("{:?}", delete_gre(100, "vms1-out")),
                ),
            ]
        );
    }

    #[test]
    fn detach_without_pinned_maps_does_nothing() {
        let steps = [DetachStep::FreeSession { id: 1 }, DetachStep::RemovePins];
        let fake = Fake::new(&Observed::default(), |_| false);
        assert!(run(apply_detach(&fake, &steps)).is_empty());
        assert_eq!(fake.calls(), []);
    }
}
