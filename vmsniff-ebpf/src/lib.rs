//! The kernel/user ABI of vmsniff: map names, map layouts and the values they hold.
//!
//! Compiled twice from this one definition: for `bpfel-unknown-none` into the tc programs, and
//! for the host into `vmsniff-user` (with the `user` feature, which adds `aya::Pod`). Every type
//! is `#[repr(C)]` with explicit padding fields, so both sides agree byte for byte; the size
//! assertions at the bottom fail the build when a change breaks that.
#![no_std]

/// Bumped whenever a layout below changes. Pinned maps of another version are refused by
/// userspace instead of being misread.
pub const ABI_VERSION: u32 = 1;

/// Session ids are 1..=1023: they must fit ERSPAN's 10-bit session id. Slot 0 is never used.
pub const MAX_SESSION_ID: u32 = 1023;
/// Entries of the `SESSIONS` array (indexed by session id).
pub const SESSION_SLOTS: u32 = MAX_SESSION_ID + 1;
/// Sessions one tap can carry at once, each with its own collector and controls.
pub const MAX_SESSIONS_PER_TAP: usize = 8;
/// Entries of the `TAPS` hash map: one per mirrored tap.
pub const MAX_TAPS: u32 = 1024;

/// Map names, as the eBPF object defines them and as they are pinned.
pub mod map_name {
    pub const SESSIONS: &str = "VMSNIFF_SESSIONS";
    pub const TAPS: &str = "VMSNIFF_TAPS";
    pub const COUNTERS: &str = "VMSNIFF_COUNTERS";
}

/// Program names, as the eBPF object defines them.
pub mod program_name {
    /// Runs on the tap's tc ingress hook: frames the VM sends (`out`).
    pub const TAP_INGRESS: &str = "vmsniff_tap_ingress";
    /// Runs on the tap's tc egress hook: frames going into the VM (`in`).
    pub const TAP_EGRESS: &str = "vmsniff_tap_egress";
}

/// Direction as the operator sees it, relative to the VM.
///
/// The tap is the host's end of the VM's NIC, so the tc hooks are mirrored: what the VM sends
/// arrives on the tap's **ingress**, what the VM receives leaves through the tap's **egress**.
/// The discriminant is the `d` of the GRE key `K * 2 + d` and the counter slot.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Direction {
    /// VM → network: tc ingress on the tap, OVS select_src_port, ERSPAN D bit 0, pcapng outbound.
    Out = 0,
    /// Network → VM: tc egress on the tap, OVS select_dst_port, ERSPAN D bit 1, pcapng inbound.
    In = 1,
}

impl Direction {
    pub const ALL: [Direction; 2] = [Direction::Out, Direction::In];

    /// Bit in [`SessionConfig::directions`].
    pub const fn bit(self) -> u32 {
        1 << (self as u32)
    }

    /// Index into per-direction arrays such as [`SessionConfig::target_ifindex`].
    pub const fn index(self) -> usize {
        self as usize
    }

    /// The tc hook on the tap that sees this direction.
    pub const fn tc_hook(self) -> TcHook {
        match self {
            Direction::Out => TcHook::Ingress,
            Direction::In => TcHook::Egress,
        }
    }

    /// The word used on the command line, in status and in configuration files.
    pub const fn as_str(self) -> &'static str {
        match self {
            Direction::Out => "out",
            Direction::In => "in",
        }
    }
}

/// The two tc hooks of an interface.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TcHook {
    Ingress = 0,
    Egress = 1,
}

impl TcHook {
    pub const ALL: [TcHook; 2] = [TcHook::Ingress, TcHook::Egress];

    /// Index into per-hook arrays such as [`TapSessions::nl_priority`].
    pub const fn index(self) -> usize {
        self as usize
    }

    /// The direction this hook sees on a tap.
    pub const fn direction(self) -> Direction {
        match self {
            TcHook::Ingress => Direction::Out,
            TcHook::Egress => Direction::In,
        }
    }

    pub const fn as_str(self) -> &'static str {
        match self {
            TcHook::Ingress => "ingress",
            TcHook::Egress => "egress",
        }
    }
}

/// The GRE key on the wire for a session's key `K` and a direction: `K * 2 + d`, so tcpdump's
/// `key=` tells sessions and directions apart. `K` must be at most [`MAX_GRE_USER_KEY`].
pub const fn gre_wire_key(user_key: u32, direction: Direction) -> u32 {
    user_key.wrapping_mul(2) | direction as u32
}

/// The inverse of [`gre_wire_key`].
pub const fn split_gre_wire_key(wire_key: u32) -> (u32, Direction) {
    let direction = if wire_key & 1 == 0 { Direction::Out } else { Direction::In };
    (wire_key >> 1, direction)
}

/// The largest `--key`: `K * 2 + 1` must fit the 32-bit GRE key.
pub const MAX_GRE_USER_KEY: u32 = (u32::MAX - 1) / 2;

/// Index of a session's counters for one direction in the `COUNTERS` per-CPU array.
pub const fn counter_index(session_id: u32, direction: Direction) -> u32 {
    session_id * 2 + direction as u32
}

/// Entries of the `COUNTERS` per-CPU array.
pub const COUNTER_SLOTS: u32 = SESSION_SLOTS * 2;

/// [`SessionConfig::state`]: slot unused.
pub const SESSION_FREE: u32 = 0;
/// [`SessionConfig::state`]: being created or removed by a vmsniff process (`owner_pid`); the
/// program skips it. Found with a dead owner, it is the remains of a crashed run.
pub const SESSION_BUSY: u32 = 1;
/// [`SessionConfig::state`]: mirrored by the tap programs.
pub const SESSION_ACTIVE: u32 = 2;

/// [`SessionConfig::target_kind`]: copies go into vmsniff's own GRE (gretap) devices, one per
/// direction, named after the session.
pub const TARGET_GRE: u32 = 1;
/// [`SessionConfig::target_kind`]: copies go out of an existing local interface (`--to-dev`).
pub const TARGET_LOCAL_DEV: u32 = 2;

/// [`TapSessions::attach_mode`]: TCX links (kernel >= 6.6), pinned.
pub const ATTACH_TCX: u32 = 1;
/// [`TapSessions::attach_mode`]: cls_bpf filters under a clsact qdisc, through netlink.
pub const ATTACH_NETLINK: u32 = 2;

/// [`TapSessions::flags`]: vmsniff added the clsact qdisc (and may remove it when it holds no
/// other filter).
pub const TAP_CREATED_CLSACT: u32 = 1;

/// Value of the `SESSIONS` array, indexed by session id.
///
/// The tap programs read only `state`, `directions` and `target_ifindex`; the rest describes
/// the session for `status` and `detach`, so that the kernel's pinned state is the one record
/// of what vmsniff created (nothing on disk can disagree with it).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SessionConfig {
    /// `SESSION_FREE`, `SESSION_BUSY` or `SESSION_ACTIVE`.
    pub state: u32,
    /// Bit set of [`Direction::bit`].
    pub directions: u32,
    /// Where each direction's copies go, indexed by [`Direction::index`]; 0 = none.
    pub target_ifindex: [u32; 2],
    /// The mirrored interface.
    pub tap_ifindex: u32,
    /// Process that holds the session: a `mirror` running in the foreground, or the process
    /// creating or removing it (state BUSY). 0 when the session is persistent.
    pub owner_pid: u32,
    /// `TARGET_GRE` or `TARGET_LOCAL_DEV`.
    pub target_kind: u32,
    /// The operator's `--key` (the wire key is [`gre_wire_key`]).
    pub key: u32,
    /// Seconds since the Unix epoch when the session was created.
    pub created_at: u64,
    /// Collector address: 4 for IPv4 (in the first 4 bytes of `remote`), 6 for IPv6.
    pub remote_family: u8,
    /// Outer IP TTL and TOS.
    pub ttl: u8,
    pub tos: u8,
    pub _pad0: u8,
    pub remote: [u8; 16],
    /// Copies are cut to this many bytes; 0 = whole frame. (Mirror controls.)
    pub snaplen: u32,
    /// Mirror 1 frame in N; 0 or 1 = every frame. (Mirror controls.)
    pub sample_every: u32,
    /// Room for later controls (filter, rate limit, encapsulation) without a layout change.
    pub _reserved: [u32; 7],
}

impl SessionConfig {
    pub const EMPTY: SessionConfig = SessionConfig {
        state: SESSION_FREE,
        directions: 0,
        target_ifindex: [0; 2],
        tap_ifindex: 0,
        owner_pid: 0,
        target_kind: 0,
        key: 0,
        created_at: 0,
        remote_family: 0,
        ttl: 0,
        tos: 0,
        _pad0: 0,
        remote: [0; 16],
        snaplen: 0,
        sample_every: 0,
        _reserved: [0; 7],
    };

    pub const fn mirrors(&self, direction: Direction) -> bool {
        self.directions & direction.bit() != 0
    }
}

/// Value of the `TAPS` hash map, keyed by the tap's ifindex: which sessions it feeds and how its
/// programs are attached.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TapSessions {
    /// Session ids, 0 = empty slot. Slots are filled from the front and compacted on removal.
    pub ids: [u16; MAX_SESSIONS_PER_TAP],
    /// `ATTACH_TCX` or `ATTACH_NETLINK`.
    pub attach_mode: u32,
    /// `TAP_CREATED_CLSACT`.
    pub flags: u32,
    /// Netlink attach: each hook's filter (priority, handle), indexed by [`TcHook::index`], so
    /// that detach removes exactly vmsniff's filter and no other.
    pub nl_priority: [u16; 2],
    pub nl_handle: [u32; 2],
    /// The tap's name when it was attached, NUL-padded: an ifindex alone cannot tell a tap
    /// that was deleted and replaced from the one vmsniff attached to.
    pub ifname: [u8; 16],
    pub _reserved: [u32; 3],
}

impl TapSessions {
    pub const EMPTY: TapSessions = TapSessions {
        ids: [0; MAX_SESSIONS_PER_TAP],
        attach_mode: 0,
        flags: 0,
        nl_priority: [0; 2],
        nl_handle: [0; 2],
        ifname: [0; 16],
        _reserved: [0; 3],
    };

    pub fn session_count(&self) -> usize {
        self.ids.iter().filter(|&&id| id != 0).count()
    }
}

/// Value of the `COUNTERS` per-CPU array, at [`counter_index`]. Userspace sums the CPUs.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DirectionCounters {
    /// Copies handed to the target device.
    pub frames: u64,
    /// Their length, Ethernet header included.
    pub bytes: u64,
    /// `bpf_clone_redirect` failures (target device gone, out of memory): the copy was lost,
    /// the VM's frame was not touched.
    pub clone_errors: u64,
    /// Room for the mirror controls' counters (filtered, sampled out, rate limited, truncated).
    pub _reserved: [u64; 5],
}

impl DirectionCounters {
    pub fn add(&mut self, other: &DirectionCounters) {
        self.frames += other.frames;
        self.bytes += other.bytes;
        self.clone_errors += other.clone_errors;
    }
}

const _: () = assert!(core::mem::size_of::<SessionConfig>() == 96);
const _: () = assert!(core::mem::size_of::<TapSessions>() == 64);
const _: () = assert!(core::mem::size_of::<DirectionCounters>() == 64);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain `#[repr(C)]` data with explicit padding fields and no invalid bit patterns.
    unsafe impl aya::Pod for super::SessionConfig {}
    unsafe impl aya::Pod for super::TapSessions {}
    unsafe impl aya::Pod for super::DirectionCounters {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn direction_maps_to_tc_hook_as_the_conventions_say() {
        assert_eq!(Direction::Out.tc_hook(), TcHook::Ingress);
        assert_eq!(Direction::In.tc_hook(), TcHook::Egress);
        for hook in TcHook::ALL {
            assert_eq!(hook.direction().tc_hook(), hook);
        }
    }

    #[test]
    fn gre_wire_key_carries_key_and_direction() {
        assert_eq!(gre_wire_key(7, Direction::Out), 14);
        assert_eq!(gre_wire_key(7, Direction::In), 15);
        assert_eq!(split_gre_wire_key(15), (7, Direction::In));
        assert_eq!(
            split_gre_wire_key(gre_wire_key(MAX_GRE_USER_KEY, Direction::In)),
            (MAX_GRE_USER_KEY, Direction::In)
        );
        assert_eq!(gre_wire_key(MAX_GRE_USER_KEY, Direction::In), u32::MAX);
    }

    #[test]
    fn counter_slots_cover_every_session_and_direction() {
        assert_eq!(counter_index(MAX_SESSION_ID, Direction::In), COUNTER_SLOTS - 1);
        assert_eq!(counter_index(1, Direction::Out), 2);
    }

    #[test]
    fn the_tap_list_has_room_for_eight_sessions() {
        assert_eq!(MAX_SESSIONS_PER_TAP, 8);
        let mut tap = TapSessions::EMPTY;
        tap.ids[0] = 3;
        tap.ids[5] = 9;
        assert_eq!(tap.session_count(), 2);
    }
}
