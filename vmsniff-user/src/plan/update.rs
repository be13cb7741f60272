//! Planning `vmsniff update`: a running session's new controls, written through its maps with
//! no detach. The filter goes to the slot the programs are not reading, then one write of the
//! session's entry switches everything at once, so the next frame sees the new settings and no
//! frame sees half of them.
use thiserror::Error;
use vmsniff_ebpf::{
    Direction, FILTER_NONE, FILTER_SLOT_BASE, SESSION_ACTIVE, SESSION_BUSY, SessionConfig,
    TARGET_CREATED_CLSACT, TARGET_GRE, filter::Filter,
};

use super::{
    controls::{RateLimit, set_rate_limit},
    detach::{DetachStep, copy_program_release},
    filter::CompiledFilter,
};

/// What the operator asked to change; `None` = keep.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ControlChange {
    /// `Some(None)`: drop the filter (`--no-filter`).
    pub filter: Option<Option<CompiledFilter>>,
    /// 0 = whole frames (`--no-snaplen`).
    pub snaplen: Option<u32>,
    pub sample_every: Option<u32>,
    /// `Some(None)`: no limit (`--no-rate-limit`).
    pub rate_limit: Option<Option<RateLimit>>,
}

impl ControlChange {
    pub fn is_empty(&self) -> bool {
        *self == ControlChange::default()
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UpdatePlan {
    pub id: u32,
    /// Written first: the idle filter slot and its new program.
    pub filter: Option<(u32, Box<Filter>)>,
    /// Written second, whole: the session's new entry.
    pub config: SessionConfig,
    /// Refill the token bucket (its credit was counted in the old rate or unit).
    pub reset_rate: bool,
    /// The copy program follows the snaplen.
    pub copy_program: CopyProgramChange,
}

/// The copy program (it cuts copies to the snaplen) runs on a session's target devices only
/// while the session has a snaplen: every copy passes through it, so whole-frame sessions do
/// without.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CopyProgramChange {
    Keep,
    /// Attach it to these directions' target devices before the new entry is written: until
    /// then the copies carry no snaplen and it lets them pass whole.
    Attach(Vec<Direction>),
    /// Remove it with these steps once the new entry (no snaplen) is written, then write
    /// `then`: the entry without the filters' record.
    Detach {
        steps: Vec<DetachStep>,
        then: Box<SessionConfig>,
    },
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum UpdatePlanError {
    #[error(
        "session {id} is being created or removed by process {owner} right now; try again when \
         that command has finished"
    )]
    Busy { id: u32, owner: u32 },
    #[error("session {id} is not active; `vmsniff status` shows its state")]
    NotActive { id: u32 },
}

pub fn plan_update(
    id: u32,
    current: &SessionConfig,
    change: &ControlChange,
) -> Result<UpdatePlan, UpdatePlanError> {
    match current.state {
        SESSION_ACTIVE => {}
        SESSION_BUSY => return Err(UpdatePlanError::Busy { id, owner: current.owner_pid }),
        _ => return Err(UpdatePlanError::NotActive { id }),
    }
    let mut config = *current;
    let mut filter = None;
    match &change.filter {
        Some(Some(compiled)) => {
            // The slot the programs do not read now; slot 0 when there is no filter yet.
            let idle = if current.filter == FILTER_SLOT_BASE { 1 } else { 0 };
            filter = Some((idle, Box::new(compiled.to_map_value())));
            config.filter = FILTER_SLOT_BASE + idle;
        }
        Some(None) => config.filter = FILTER_NONE,
        None => {}
    }
    if let Some(snaplen) = change.snaplen {
        config.snaplen = snaplen;
    }
    if let Some(sample_every) = change.sample_every {
        config.sample_every = sample_every.max(1);
    }
    if let Some(rate_limit) = &change.rate_limit {
        set_rate_limit(&mut config, rate_limit.as_ref());
    }
    let reset_rate =
        (config.rate_unit, config.rate, config.burst) != (current.rate_unit, current.rate, current.burst);
    let has_program = current.target_nl_priority.iter().any(|&p| p != 0);
    let copy_program = match (config.snaplen != 0, has_program) {
        (true, false) => CopyProgramChange::Attach(copy_program_directions(current)),
        (false, true) => {
            let mut then = config;
            then.target_nl_priority = [0; 2];
            then.target_nl_handle = [0; 2];
            then.target_flags &= !(TARGET_CREATED_CLSACT | TARGET_CREATED_CLSACT << 1);
            CopyProgramChange::Detach { steps: copy_program_release(id, current), then: Box::new(then) }
        }
        _ => CopyProgramChange::Keep,
    };
    Ok(UpdatePlan { id, filter, config, reset_rate, copy_program })
}

/// The directions whose target device takes a copy program, as attach places them: each GRE
/// device, or the one local device both directions share, recorded at the first.
fn copy_program_directions(session: &SessionConfig) -> Vec<Direction> {
    let directions = Direction::ALL.into_iter().filter(|d| session.target_ifindex[d.index()] != 0);
    if session.target_kind == TARGET_GRE { directions.collect() } else { directions.take(1).collect() }
}

#[cfg(test)]
mod tests {
    use vmsniff_ebpf::{RATE_NONE, RATE_PACKETS, SESSION_FREE};

    use super::*;
    use crate::plan::{controls::parse_rate_limit, filter::compile};

    fn active() -> SessionConfig {
        SessionConfig { state: SESSION_ACTIVE, sample_every: 1, ..SessionConfig::EMPTY }
    }

    #[test]
    fn a_new_filter_goes_to_the_slot_the_programs_are_not_reading() {
        let change = ControlChange { filter: Some(Some(compile("tcp").unwrap())), ..Default::default() };
        let first = plan_update(3, &active(), &change).unwrap();
        assert_eq!(first.filter.as_ref().map(|(slot, _)| *slot), Some(0));
        assert_eq!(first.config.filter, FILTER_SLOT_BASE);
        let second = plan_update(3, &first.config, &change).unwrap();
        assert_eq!(second.filter.as_ref().map(|(slot, _)| *slot), Some(1));
        assert_eq!(second.config.filter, FILTER_SLOT_BASE + 1);
        let third = plan_update(3, &second.config, &change).unwrap();
        assert_eq!(third.filter.as_ref().map(|(slot, _)| *slot), Some(0));
        assert!(!third.reset_rate);
    }

    #[test]
    fn only_what_is_given_changes() {
        let mut current = active();
        current.snaplen = 128;
        current.sample_every = 10;
        current.filter = FILTER_SLOT_BASE + 1;
        let plan =
            plan_update(1, &current, &ControlChange { sample_every: Some(2), ..Default::default() }).unwrap();
        assert_eq!(plan.config, SessionConfig { sample_every: 2, ..current });
        assert_eq!(plan.filter, None);

        let plan = plan_update(
            1,
            &current,
            &ControlChange { filter: Some(None), snaplen: Some(0), ..Default::default() },
        )
        .unwrap();
        assert_eq!(plan.config.filter, FILTER_NONE);
        assert_eq!(plan.config.snaplen, 0);
        assert_eq!(plan.config.sample_every, 10);
    }

    #[test]
    fn the_copy_program_comes_with_the_first_snaplen_and_goes_with_the_last() {
        let mut local = active();
        local.target_kind = vmsniff_ebpf::TARGET_LOCAL_DEV;
        local.target_ifindex = [4, 4];
        let add = ControlChange { snaplen: Some(96), ..Default::default() };
        let plan = plan_update(2, &local, &add).unwrap();
        assert_eq!(plan.copy_program, CopyProgramChange::Attach(vec![Direction::Out]));
        let mut gre = SessionConfig { target_kind: TARGET_GRE, target_ifindex: [0, 7], ..local };
        assert_eq!(
            plan_update(2, &gre, &add).unwrap().copy_program,
            CopyProgramChange::Attach(vec![Direction::In])
        );
        gre.target_ifindex = [6, 7];
        assert_eq!(
            plan_update(2, &gre, &add).unwrap().copy_program,
            CopyProgramChange::Attach(vec![Direction::Out, Direction::In])
        );

        // With the program there: a new snaplen keeps it, none removes it.
        let mut cutting = SessionConfig { snaplen: 96, target_nl_priority: [49152, 0], ..local };
        cutting.target_nl_handle = [1, 0];
        cutting.target_flags = TARGET_CREATED_CLSACT;
        let plan =
            plan_update(2, &cutting, &ControlChange { snaplen: Some(200), ..Default::default() }).unwrap();
        assert_eq!(plan.copy_program, CopyProgramChange::Keep);
        let plan =
            plan_update(2, &cutting, &ControlChange { snaplen: Some(0), ..Default::default() }).unwrap();
        let CopyProgramChange::Detach { steps, then } = plan.copy_program else { panic!("{plan:?}") };
        assert_eq!(
            steps[0],
            DetachStep::DetachCopyProgram { id: 2, ifindex: 4, nl_priority: 49152, nl_handle: 1 }
        );
        assert!(matches!(steps[1], DetachStep::RemoveClsactIfUnused { tap_ifindex: 4, .. }));
        // The entry written first still names the filter, so that a failed removal stays findable.
        assert_eq!(plan.config.target_nl_priority, [49152, 0]);
        assert_eq!((then.snaplen, then.target_nl_priority, then.target_flags), (0, [0, 0], 0));
        // No snaplen and no program: nothing to do.
        let plan =
            plan_update(2, &local, &ControlChange { sample_every: Some(3), ..Default::default() }).unwrap();
        assert_eq!(plan.copy_program, CopyProgramChange::Keep);
    }

    #[test]
    fn a_new_rate_limit_refills_the_bucket() {
        let limit = parse_rate_limit("100pps").unwrap();
        let change = ControlChange { rate_limit: Some(Some(limit)), ..Default::default() };
        let plan = plan_update(1, &active(), &change).unwrap();
        assert_eq!((plan.config.rate_unit, plan.config.rate), (RATE_PACKETS, 100));
        assert!(plan.reset_rate);
        assert!(!plan_update(1, &plan.config, &change).unwrap().reset_rate);
        let off =
            plan_update(1, &plan.config, &ControlChange { rate_limit: Some(None), ..Default::default() })
                .unwrap();
        assert_eq!(off.config.rate_unit, RATE_NONE);
        assert!(off.reset_rate);
    }

    #[test]
    fn busy_and_free_sessions_are_refused() {
        let busy = SessionConfig { state: SESSION_BUSY, owner_pid: 42, ..active() };
        assert_eq!(
            plan_update(5, &busy, &ControlChange::default()),
            Err(UpdatePlanError::Busy { id: 5, owner: 42 })
        );
        let free = SessionConfig { state: SESSION_FREE, ..active() };
        assert_eq!(
            plan_update(5, &free, &ControlChange::default()),
            Err(UpdatePlanError::NotActive { id: 5 })
        );
    }
}
