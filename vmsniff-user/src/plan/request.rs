//! The session an operator asks for, in checked, typed form.
use super::controls::Controls;
use crate::model::mirror::{AttachModeChoice, Directions, Owner, Tap, Target};

/// One session, as asked for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AttachRequest {
    pub tap: Tap,
    pub target: Target,
    /// `--key`; the session id when absent.
    pub key: Option<u32>,
    pub directions: Directions,
    /// What of the tap's frames is copied.
    pub controls: Controls,
    pub mode: AttachModeChoice,
    /// Kernel >= 6.6: TCX is available.
    pub tcx_supported: bool,
    /// Who keeps the session.
    pub owner: Owner,
    /// Seconds since the epoch, stamped into the session.
    pub now: u64,
}
