//! The kernel/user ABI of vmsniff: map names, map layouts and the values they hold.
//!
//! Compiled twice from this one definition: for `bpfel-unknown-none` into the tc programs, and
//! for the host into `vmsniff-user` (with the `user` feature, which adds `aya::Pod`). Every type
//! is `#[repr(C)]` with explicit padding fields, so both sides agree byte for byte; the size
//! assertions at the bottom fail the build when a change breaks that.
#![no_std]

pub mod filter;

/// Bumped whenever a layout or a meaning below changes. Userspace records it beside the maps
/// it creates ([`map_name::ABI`]) and refuses pinned maps of another version instead of
/// misreading them, except those of [`ABI_VERSIONS_UPGRADABLE`].
pub const ABI_VERSION: u32 = 4;

/// The versions whose maps this one uses and upgrades in place:
/// - 3 gave a reserved word of [`TapSessions`] a meaning ([`TapSessions::directions`]) that 2
///   leaves at 0, which the programs read as "not known";
/// - 4 added the [`TAP_INDEX`](map_name::TAP_INDEX) map in front of `TAPS`, which the first
///   change creates and fills from `TAPS` (programs of 2 and 3 read `TAPS` alone).
///
/// The first change this release makes to such maps raises their record to 4, so that an older
/// vmsniff, which would leave the summary or the index stale, refuses them from then on.
pub const ABI_VERSIONS_UPGRADABLE: [u32; 2] = [2, 3];

/// The version of maps pinned before the record existed (no [`map_name::ABI`] pin): those
/// releases had this ABI, so their maps count as this version when their value sizes match.
pub const ABI_VERSION_UNRECORDED: u32 = 2;

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
    pub const FILTERS: &str = "VMSNIFF_FILTERS";
    pub const RATE: &str = "VMSNIFF_RATE";
    /// Per-CPU scratch of the filter interpreter; not pinned (nothing in it outlives a frame).
    pub const SCRATCH: &str = "VMSNIFF_SCRATCH";
    /// Per-CPU: the copy being cloned right now, for the copy program on the target.
    pub const IN_FLIGHT: &str = "VMSNIFF_IN_FLIGHT";
    /// The taps' entries direct-mapped by ifindex, in front of `TAPS` (see [`TapIndexEntry`]).
    /// Made from `TAPS` by userspace, which keeps it in step; pinned, but not part of the
    /// state the record is judged by ([`PINNED`]): maps of version 2 and 3 lack it.
    pub const TAP_INDEX: &str = "VMSNIFF_TAP_INDEX";
    /// A one-entry u32 array, pinned beside the maps: the [`ABI_VERSION`](crate::ABI_VERSION)
    /// of the vmsniff that created them. Userspace's alone (no program reads it), and its name
    /// and layout never change, so that every version can read every other's.
    pub const ABI: &str = "VMSNIFF_ABI";
    /// The maps that hold state and are pinned.
    /// IN_FLIGHT too: the tap programs of one attach and the copy program of another must
    /// share it.
    pub const PINNED: [&str; 6] = [SESSIONS, TAPS, COUNTERS, FILTERS, RATE, IN_FLIGHT];
}

/// Program names, as the eBPF object defines them. `detach --all` of any version finds tc
/// filters by them in state it cannot read, so they keep their names across versions.
pub mod program_name {
    /// Runs on the tap's tc ingress hook: frames the VM sends (`out`).
    pub const TAP_INGRESS: &str = "vmsniff_tap_ingress";
    /// Runs on the tap's tc egress hook: frames going into the VM (`in`).
    pub const TAP_EGRESS: &str = "vmsniff_tap_egress";
    /// Runs on the egress hook of each target device: cuts copies to the session's snaplen.
    pub const COPY_EGRESS: &str = "vmsniff_copy_egress";
    pub const ALL: [&str; 3] = [TAP_INGRESS, TAP_EGRESS, COPY_EGRESS];
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

/// [`SessionConfig::target_kind`]: copies go into vmsniff's own tunnel devices toward `remote`,
/// one per direction, named after the session: gretap, erspan or vxlan (or ip6gretap, ip6erspan
/// toward an IPv6 collector). Which kind is read back from the devices, not recorded here.
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
    /// Copies are cut to this many bytes; 0 = whole frame.
    pub snaplen: u32,
    /// Mirror 1 frame in N, chosen at random; 0 or 1 = every frame.
    pub sample_every: u32,
    /// Which of the session's two `FILTERS` slots holds its filter: `FILTER_NONE`, or
    /// `FILTER_SLOT_BASE + slot`.
    pub filter: u32,
    /// `RATE_NONE`, `RATE_BITS` or `RATE_PACKETS`: the unit of `rate` and `burst`.
    pub rate_unit: u32,
    /// Copies per second allowed through, in `rate_unit` (bits or packets) per second.
    pub rate: u64,
    /// The token bucket's depth, in `rate_unit`.
    pub burst: u64,
    /// The copy program's cls_bpf filter on each direction's target device (egress hook),
    /// as (priority, handle), indexed by [`Direction::index`]; 0 = none. Where both directions
    /// share one device, the filter is recorded once, at the first direction.
    pub target_nl_priority: [u16; 2],
    pub target_nl_handle: [u32; 2],
    /// `TARGET_CREATED_CLSACT << direction`: vmsniff added that target's clsact qdisc.
    pub target_flags: u32,
    /// Non-zero for a session `vmsniff daemon` keeps: [`daemon_tag`] of its config name. The
    /// kernel is the daemon's record of what it owns, so a restarted daemon adopts its sessions
    /// (and only those) from the pins. The programs never read it.
    pub daemon_tag: u32,
    /// Room for later controls without a layout change.
    pub _reserved: [u32; 3],
}

/// The tag of a daemon session named `name` in the config: FNV-1a 32, never 0 (0 = not the
/// daemon's). Running sessions carry it: it never changes.
pub fn daemon_tag(name: &str) -> u32 {
    let hash = fnv1a::hash32(name.as_bytes());
    if hash == 0 { 1 } else { hash }
}

/// FNV-1a, the one hash both sides use for names that must be stable across builds and
/// releases (daemon tags, the eBPF object's build tag).
pub mod fnv1a {
    pub fn hash32(bytes: &[u8]) -> u32 {
        bytes.iter().fold(0x811c_9dc5, |h, &b| (h ^ u32::from(b)).wrapping_mul(0x0100_0193))
    }

    pub fn hash64(bytes: &[u8]) -> u64 {
        bytes
            .iter()
            .fold(0xcbf2_9ce4_8422_2325, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3))
    }
}

/// [`SessionConfig::target_flags`], shifted by [`Direction::index`].
pub const TARGET_CREATED_CLSACT: u32 = 1;

/// [`SessionConfig::filter`]: every frame matches.
pub const FILTER_NONE: u32 = 0;
/// [`SessionConfig::filter`]: `FILTER_SLOT_BASE + slot` names the live slot.
pub const FILTER_SLOT_BASE: u32 = 1;
/// [`SessionConfig::rate_unit`]: no rate limit.
pub const RATE_NONE: u32 = 0;
/// [`SessionConfig::rate_unit`]: `rate` in bits per second of copies (whole frames).
pub const RATE_BITS: u32 = 1;
/// [`SessionConfig::rate_unit`]: `rate` in copies per second.
pub const RATE_PACKETS: u32 = 2;

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
        filter: FILTER_NONE,
        rate_unit: RATE_NONE,
        rate: 0,
        burst: 0,
        target_nl_priority: [0; 2],
        target_nl_handle: [0; 2],
        target_flags: 0,
        daemon_tag: 0,
        _reserved: [0; 3],
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
    /// [`TAP_DIRECTIONS_KNOWN`] and the [`Direction::bit`]s of the listed sessions, so that a
    /// frame of a direction none of them mirrors costs the tap lookup alone; 0 (an entry
    /// written by ABI version 2) = not known, each session is looked at. Written with `ids`,
    /// from the sessions' entries, whose directions never change.
    pub directions: u32,
    pub _reserved: [u32; 2],
}

/// [`TapSessions::directions`]: the direction bits beside it are the listed sessions'.
pub const TAP_DIRECTIONS_KNOWN: u32 = 1 << 31;

impl TapSessions {
    pub const EMPTY: TapSessions = TapSessions {
        ids: [0; MAX_SESSIONS_PER_TAP],
        attach_mode: 0,
        flags: 0,
        nl_priority: [0; 2],
        nl_handle: [0; 2],
        ifname: [0; 16],
        directions: TAP_DIRECTIONS_KNOWN,
        _reserved: [0; 2],
    };

    /// Whether the programs can skip a frame of `direction` without looking at a session.
    pub const fn skips(&self, direction: Direction) -> bool {
        directions_skip(self.directions, direction)
    }

    pub fn session_count(&self) -> usize {
        self.ids.iter().filter(|&&id| id != 0).count()
    }
}

/// Whether a tap whose `directions` word (of [`TapSessions`] or [`TapIndexEntry`]) is this has
/// no session for `direction`.
pub const fn directions_skip(directions: u32, direction: Direction) -> bool {
    directions & TAP_DIRECTIONS_KNOWN != 0 && directions & direction.bit() == 0
}

/// Slots of the `TAP_INDEX` array: a power of two, four times [`MAX_TAPS`], so that mirrored taps
/// rarely share one (a node hands out ifindexes mostly in sequence).
pub const TAP_INDEX_SLOTS: u32 = 4096;

/// The `TAP_INDEX` slot of the tap with this ifindex.
pub const fn tap_index_slot(ifindex: u32) -> u32 {
    ifindex & (TAP_INDEX_SLOTS - 1)
}

/// Value of the `TAP_INDEX` array at [`tap_index_slot`]: what the programs need of the mirrored
/// tap in that slot, found by an array read (which the verifier inlines) instead of the `TAPS`
/// hash lookup (a call and a jhash: about a third of a filtered-out frame's program time).
///
/// Derived from `TAPS`, the record, by [`TapIndexEntry::for_slot`]: userspace rewrites a slot
/// after each write of a tap's entry in it, and rebuilds the whole index before a command's
/// first change (what a crash between the two writes left is mended there).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TapIndexEntry {
    /// The tap's session ids, as its `TAPS` entry lists them.
    pub ids: [u16; MAX_SESSIONS_PER_TAP],
    /// Its `TAPS` entry's [`TapSessions::directions`].
    pub directions: u32,
    /// The tap described here; 0 = none (ifindex 0 is never a device's).
    pub ifindex: u32,
    /// [`TAP_INDEX_SHARED`] or 0.
    pub flags: u32,
    pub _reserved: u32,
}

/// [`TapIndexEntry::flags`]: other mirrored taps fall in this slot too; a frame of any tap but
/// the entry's own looks its tap up in `TAPS`.
pub const TAP_INDEX_SHARED: u32 = 1;

impl TapIndexEntry {
    /// The entry of a slot whose mirrored taps are `taps` (ifindex and `TAPS` entry, each
    /// falling in that slot): the lowest ifindex is described here, and any other makes the
    /// slot shared.
    pub fn for_slot<'a>(taps: impl IntoIterator<Item = (u32, &'a TapSessions)>) -> TapIndexEntry {
        let mut entry = TapIndexEntry::default();
        for (ifindex, tap) in taps {
            if entry.ifindex != 0 {
                entry.flags = TAP_INDEX_SHARED;
            }
            if entry.ifindex == 0 || ifindex < entry.ifindex {
                entry = TapIndexEntry { ids: tap.ids, directions: tap.directions, ifindex, ..entry };
            }
        }
        entry
    }
}

/// Value of the `COUNTERS` per-CPU array, at [`counter_index`]. Userspace sums the CPUs.
///
/// Every frame of a mirrored direction lands in exactly one of `frames`, `filtered`,
/// `sampled_out`, `rate_limited` and `clone_errors`, in that order of the checks: filter,
/// sample, rate limit, clone.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DirectionCounters {
    /// Copies handed to the target device.
    pub frames: u64,
    /// Their length on the tap, Ethernet header included (before any truncation).
    pub bytes: u64,
    /// `bpf_clone_redirect` failures (target device gone, out of memory): the copy was lost,
    /// the VM's frame was not touched.
    pub clone_errors: u64,
    /// Frames the session's filter did not match.
    pub filtered: u64,
    /// Frames that matched but were not drawn by `--sample`.
    pub sampled_out: u64,
    /// Frames over the session's `--rate-limit`: no copy sent.
    pub rate_limited: u64,
    /// Copies cut to `--snaplen`.
    pub truncated: u64,
    /// Copies dropped because the kernel would not cut them to `--snaplen` (it keeps at least
    /// the headers up to the transport header, or the checksum an offload still has to fill):
    /// never sent whole. Was reserved (always 0) before: the layout is unchanged.
    pub snaplen_refused: u64,
}

impl DirectionCounters {
    pub fn add(&mut self, other: &DirectionCounters) {
        self.frames += other.frames;
        self.bytes += other.bytes;
        self.clone_errors += other.clone_errors;
        self.filtered += other.filtered;
        self.sampled_out += other.sampled_out;
        self.rate_limited += other.rate_limited;
        self.truncated += other.truncated;
        self.snaplen_refused += other.snaplen_refused;
    }
}

/// Value of the `IN_FLIGHT` per-CPU array: set by a tap program just before it clones a frame,
/// put back as it was just after (a copy into a mirrored tap nests a second copy inside the
/// first). The clone passes the target device's egress hook inside that call, on
/// this CPU, so the copy program there knows the copy (and no other frame) as a copy, and
/// whose. A per-CPU flag rather than the skb's mark: the mark is the VM's (and Open vSwitch's)
/// and the clone carries it on.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InFlight {
    /// [`IN_FLIGHT_ARMED`] while a clone is in flight; the copy program sets it to 0 once it
    /// has dealt with the copy (so that a second copy program on the same device does not count
    /// it again), or to [`IN_FLIGHT_REFUSED`] when it dropped the copy for its snaplen: the
    /// tap program then counts the failed redirect as that, not as a clone error.
    pub armed: u32,
    pub session_id: u32,
    /// [`Direction`] as u32.
    pub direction: u32,
    /// The session's snaplen, 0 = whole frames.
    pub snaplen: u32,
}

/// [`InFlight::armed`]: a copy is on its way to the target.
pub const IN_FLIGHT_ARMED: u32 = 1;
/// [`InFlight::armed`]: the copy program dropped the copy, which the kernel would not cut to
/// its snaplen (counted in `snaplen_refused`).
pub const IN_FLIGHT_REFUSED: u32 = 2;

/// Largest `--snaplen`, as tcpdump's.
pub const MAX_SNAPLEN: u32 = 65535;

/// Value of the `RATE` array, indexed by session id: the session's token bucket, shared by its
/// two directions and written by the programs on every CPU when they admit a copy.
///
/// Updated without a lock (5.10 has no atomic compare-and-exchange for BPF): two CPUs that
/// refill at the same instant may both spend the same tokens, so under contention the limit
/// can be exceeded by at most one frame per CPU per refill.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TokenBucket {
    /// Credit in unit-nanoseconds: one unit of `rate_unit` (a bit, a packet) costs
    /// [`NS_PER_SECOND`]; each elapsed nanosecond adds `rate`. Integer-exact from a few bits per
    /// second up to 100 Gbit/s.
    pub tokens: u64,
    /// `bpf_ktime_get_ns()` of the last admitted copy (its refill); 0 = never (the bucket starts full).
    pub refilled_ns: u64,
}

pub const NS_PER_SECOND: u64 = 1_000_000_000;

/// Largest burst, and largest single cost, in units (8e9 bits = 1 GB): in unit-nanoseconds
/// it still fits a u64, so the bucket's arithmetic needs no 128-bit helper (which BPF lacks).
pub const MAX_TOKEN_UNITS: u64 = 8_000_000_000;

/// The token bucket's decision for a copy of `units` (bits or 1 packet) at `now_ns`: refills
/// `bucket` for the time since its last refill, then spends the cost if the credit covers it.
/// `rate` (> 0) and `burst` are the session's. Shared by the tap programs and the host's unit
/// tests.
///
/// A refusal leaves the bucket as it was: over the limit, the CPUs feeding a multi-queue tap
/// then only read its cache line instead of passing it back and forth on every frame. The
/// credit is the same: refilling later from the older timestamp adds what the skipped refill
/// would have (the refill is linear up to the capacity, and capped alike).
#[inline(always)]
pub fn take_tokens(bucket: &mut TokenBucket, rate: u64, burst: u64, units: u64, now_ns: u64) -> bool {
    let capacity = burst.min(MAX_TOKEN_UNITS) * NS_PER_SECOND;
    let tokens = if bucket.refilled_ns == 0 {
        capacity
    } else {
        // Bound the elapsed time first, so that elapsed * rate stays below capacity + rate.
        // Saturating: another CPU may have refilled at a later instant than this CPU's clock
        // read, and that is no time elapsed (wrapping, it would be a whole burst).
        let elapsed = now_ns.saturating_sub(bucket.refilled_ns).min(capacity / rate + 1);
        (bucket.tokens + elapsed * rate).min(capacity)
    };
    let cost = units.min(MAX_TOKEN_UNITS) * NS_PER_SECOND;
    if tokens < cost {
        return false;
    }
    bucket.tokens = tokens - cost;
    bucket.refilled_ns = now_ns;
    true
}

const _: () = assert!(core::mem::size_of::<SessionConfig>() == 128);
const _: () = assert!(core::mem::size_of::<TokenBucket>() == 16);
const _: () = assert!(core::mem::size_of::<InFlight>() == 16);
const _: () = assert!(
    core::mem::size_of::<filter::Filter>()
        == 8 + 8 * filter::MAX_FILTER_INSNS + filter::FILTER_EXPRESSION_BYTES
);
const _: () = assert!(core::mem::size_of::<TapSessions>() == 64);
const _: () = assert!(core::mem::size_of::<TapIndexEntry>() == 32);
const _: () = assert!(core::mem::size_of::<DirectionCounters>() == 64);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain `#[repr(C)]` data of integers and integer arrays, with explicit
    // padding fields (the size assertions above hold the layout): no implicit padding, and
    // every bit pattern is a valid value.
    unsafe impl aya::Pod for super::SessionConfig {}
    // SAFETY: as for SessionConfig.
    unsafe impl aya::Pod for super::TapSessions {}
    // SAFETY: as for SessionConfig.
    unsafe impl aya::Pod for super::DirectionCounters {}
    // SAFETY: as for SessionConfig.
    unsafe impl aya::Pod for super::TokenBucket {}
    // SAFETY: as for SessionConfig.
    unsafe impl aya::Pod for super::TapIndexEntry {}
    // SAFETY: as for SessionConfig (`FilterInsn` is four integers without padding).
    unsafe impl aya::Pod for super::filter::Filter {}
}

#[cfg(test)]
mod tests {
    #[test]
    fn fnv1a_is_the_published_hash() {
        // Test vectors of the FNV reference (http://www.isthe.com/chongo/tech/comp/fnv/).
        assert_eq!(super::fnv1a::hash32(b""), 0x811c_9dc5);
        assert_eq!(super::fnv1a::hash32(b"a"), 0xe40c_292c);
        assert_eq!(super::fnv1a::hash64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(super::daemon_tag(""), 0x811c_9dc5);
    }

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
    fn the_token_bucket_starts_full_and_refills_at_the_rate() {
        let mut bucket = TokenBucket::default();
        // 10 packets per second, burst 3.
        let t0 = 5 * NS_PER_SECOND;
        assert!((0..3).all(|_| take_tokens(&mut bucket, 10, 3, 1, t0)));
        assert!(!take_tokens(&mut bucket, 10, 3, 1, t0));
        let emptied = bucket;
        assert!(!take_tokens(&mut bucket, 10, 3, 1, t0 + 99_000_000));
        assert_eq!(bucket, emptied, "a refusal writes nothing (no cache line passed between CPUs)");
        // ...and loses no credit: the token due at t0 + 100 ms is there.
        assert!(take_tokens(&mut bucket, 10, 3, 1, t0 + 100_000_000));
        assert!(!take_tokens(&mut bucket, 10, 3, 1, t0 + 100_000_000 + 99_000_000));
        assert!(take_tokens(&mut bucket, 10, 3, 1, t0 + 200_000_000));
        // A long pause refills only up to the burst.
        let later = t0 + 3600 * NS_PER_SECOND;
        assert_eq!((0..10).filter(|_| take_tokens(&mut bucket, 10, 3, 1, later)).count(), 3);
        // 100 Gbit/s with a 1 Gbit burst does not overflow.
        let mut fast = TokenBucket::default();
        assert!(take_tokens(&mut fast, 100_000_000_000, 1_000_000_000, 72_000, 1));
        assert!(take_tokens(&mut fast, 100_000_000_000, 1_000_000_000, 72_000, u64::MAX / 2));
        assert!(!take_tokens(&mut fast, 1, MAX_TOKEN_UNITS, MAX_TOKEN_UNITS, u64::MAX / 2 + 1));
    }

    #[test]
    fn a_clock_read_before_another_cpus_refill_adds_no_credit() {
        let mut bucket = TokenBucket::default();
        let t0 = 5 * NS_PER_SECOND;
        assert!((0..3).all(|_| take_tokens(&mut bucket, 10, 3, 1, t0)));
        // This CPU read its clock 1 ns before the refill another CPU wrote.
        assert!(!take_tokens(&mut bucket, 10, 3, 1, t0 - 1));
        assert!(take_tokens(&mut bucket, 10, 3, 1, t0 + 100_000_000));
    }

    #[test]
    fn a_tap_index_slot_describes_its_lowest_tap_and_says_when_others_share_it() {
        let tap = |id: u16, directions: u32| {
            let mut entry = TapSessions { directions, ..TapSessions::EMPTY };
            entry.ids[0] = id;
            entry
        };
        let (a, b, c) = (tap(3, TAP_DIRECTIONS_KNOWN | 1), tap(4, TAP_DIRECTIONS_KNOWN | 2), tap(5, 0));
        assert_eq!(TapIndexEntry::for_slot([]), TapIndexEntry::default());
        let alone = TapIndexEntry::for_slot([(4097, &b)]);
        assert_eq!((alone.ifindex, alone.ids[0], alone.directions, alone.flags), (4097, 4, b.directions, 0));
        for order in [[(4097, &b), (1, &a), (8193, &c)], [(8193, &c), (4097, &b), (1, &a)]] {
            let shared = TapIndexEntry::for_slot(order);
            assert_eq!((shared.ifindex, shared.ids[0], shared.directions), (1, 3, a.directions));
            assert_eq!(shared.flags, TAP_INDEX_SHARED);
        }
        assert_eq!(tap_index_slot(1), tap_index_slot(4097));
        assert_ne!(tap_index_slot(1), tap_index_slot(2));
        assert!(directions_skip(TAP_DIRECTIONS_KNOWN | Direction::In.bit(), Direction::Out));
        assert!(!directions_skip(TAP_DIRECTIONS_KNOWN | Direction::In.bit(), Direction::In));
        assert!(!directions_skip(0, Direction::Out), "0: not known (ABI 2), every session is looked at");
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
