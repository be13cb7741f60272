//! vmsniff's eBPF-mode state, as read from its pinned maps: the input of every plan.
use std::collections::{BTreeMap, BTreeSet};

use vmsniff_ebpf::{SessionConfig, TapSessions};

/// vmsniff's state in the caller's network namespace, as read from its pinned maps.
#[derive(Clone, Debug, Default)]
pub struct Observed {
    /// Every slot that is not free, by session id.
    pub sessions: BTreeMap<u32, SessionConfig>,
    /// Every tap entry, by ifindex.
    pub taps: BTreeMap<u32, TapSessions>,
    /// Sessions whose `owner_pid` is set and no longer runs: the remains of a crashed attach or
    /// detach, or of a `mirror` killed without a chance to clean up.
    pub orphaned: BTreeSet<u32>,
    /// Ids held by OVS mode's sessions in OVSDB: eBPF sessions share their id space.
    pub reserved: BTreeSet<u32>,
}

impl Observed {
    /// The tap entry that lists `session_id`, if any.
    pub fn tap_of(&self, session_id: u32) -> Option<(u32, &TapSessions)> {
        self.taps
            .iter()
            .find(|(_, tap)| tap.ids.contains(&(session_id as u16)))
            .map(|(ifindex, tap)| (*ifindex, tap))
    }
}
