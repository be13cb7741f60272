//! The programs on the VM's tap: copy each frame of a mirrored direction into each session's
//! target device, and let the frame itself go on untouched.

use aya_ebpf::{
    bindings::{__sk_buff, TC_ACT_SHOT, TC_ACT_UNSPEC},
    cty::c_void,
    helpers::{bpf_get_prandom_u32, bpf_ktime_get_ns, bpf_skb_change_tail, bpf_skb_load_bytes},
    macros::{classifier, map},
    maps::{Array, HashMap, PerCpuArray},
    programs::TcContext,
};
use vmsniff_ebpf::{
    COUNTER_SLOTS, Direction, DirectionCounters, FILTER_NONE, FILTER_SLOT_BASE, IN_FLIGHT_ARMED,
    IN_FLIGHT_REFUSED, InFlight, MAX_SESSIONS_PER_TAP, MAX_TAPS, RATE_BITS, RATE_NONE, SESSION_ACTIVE,
    SESSION_SLOTS, SessionConfig, TAP_INDEX_SHARED, TAP_INDEX_SLOTS, TapIndexEntry, TapSessions, TokenBucket,
    counter_index, directions_skip,
    filter::{self, Filter, HEAD_BYTES, Machine, filter_index, get, set},
    take_tokens, tap_index_slot,
};

#[map]
static VMSNIFF_SESSIONS: Array<SessionConfig> = Array::with_max_entries(SESSION_SLOTS, 0);

#[map]
static VMSNIFF_TAPS: HashMap<u32, TapSessions> = HashMap::with_max_entries(MAX_TAPS, 0);

#[map]
static VMSNIFF_TAP_INDEX: Array<TapIndexEntry> = Array::with_max_entries(TAP_INDEX_SLOTS, 0);

#[map]
static VMSNIFF_COUNTERS: PerCpuArray<DirectionCounters> = PerCpuArray::with_max_entries(COUNTER_SLOTS, 0);

#[map]
static VMSNIFF_FILTERS: Array<Filter> = Array::with_max_entries(SESSION_SLOTS * 2, 0);

#[map]
static VMSNIFF_RATE: Array<TokenBucket> = Array::with_max_entries(SESSION_SLOTS, 0);

#[map]
static VMSNIFF_IN_FLIGHT: PerCpuArray<InFlight> = PerCpuArray::with_max_entries(1, 0);

/// The filter interpreter's registers and `M[]` (see [`Machine`] for why a map).
#[map]
static VMSNIFF_SCRATCH: PerCpuArray<Machine> = PerCpuArray::with_max_entries(1, 0);

/// Frames the VM sends arrive on the tap's ingress hook.
#[classifier]
pub fn vmsniff_tap_ingress(ctx: TcContext) -> i32 {
    mirror(&ctx, Direction::Out);
    CONTINUE
}

/// Frames going into the VM leave through the tap's egress hook.
#[classifier]
pub fn vmsniff_tap_egress(ctx: TcContext) -> i32 {
    mirror(&ctx, Direction::In);
    CONTINUE
}

/// TC_ACT_UNSPEC is the one verdict that decides nothing: under TCX it is TCX_NEXT (run the next
/// program, then any clsact filters), under cls_bpf direct-action it continues with the next
/// filter, and with no other program the frame passes. TC_ACT_OK would end the chain and skip
/// whatever else the operator runs on the tap.
const CONTINUE: i32 = TC_ACT_UNSPEC;

/// One pass over the tap's sessions: each is looked up once (session, counters), decided and,
/// if chosen, cloned before the next is looked at. Nothing is zeroed or copied onto the stack
/// and no subprogram is called on the way of a frame that no session copies, except a
/// session's own filter; a direction that no session mirrors costs the tap lookup alone (one
/// array read per session on an entry written by ABI version 2, which has no summary). The tap
/// is found in the index (an array read) unless its slot is shared (then in `TAPS`).
///
/// Deciding the next session after a clone is safe: the clone may run other programs on this
/// CPU (a target that is itself a mirrored tap) which reuse the filter's scratch, but each
/// filter run starts from a fresh machine and none outlives its call.
#[inline(always)]
fn mirror(ctx: &TcContext, direction: Direction) {
    // SAFETY: the context pointer is valid for the whole program run.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    let Some((ids, directions)) = tap_sessions(ifindex) else {
        return;
    };
    if directions_skip(directions, direction) {
        return;
    }
    let len = ctx.len();
    for slot in 0..MAX_SESSIONS_PER_TAP {
        // Little-endian halves: ids[2k] is the low one of word k.
        let id = (ids[slot / 2] >> (16 * (slot % 2))) & 0xffff;
        if id == 0 {
            // Slots are compacted on removal: the first empty one ends the list.
            break;
        }
        let Some(session) = VMSNIFF_SESSIONS.get(id) else {
            continue;
        };
        if session.state != SESSION_ACTIVE || !session.mirrors(direction) {
            continue;
        }
        let Some(counters) = VMSNIFF_COUNTERS.get_ptr_mut(counter_index(id, direction)) else {
            continue;
        };
        // SAFETY: a per-CPU slot, written only by this CPU while this program runs.
        let counters = unsafe { &mut *counters };
        if !selected(ctx, session, id) {
            counters.filtered += 1;
            continue;
        }
        // Random, not every Nth: a periodic pattern in the traffic (a request and its reply)
        // would otherwise always land on the same side of the sample.
        if session.sample_every > 1 && unsafe { bpf_get_prandom_u32() } % session.sample_every != 0 {
            counters.sampled_out += 1;
            continue;
        }
        if session.rate_unit != RATE_NONE && !within_rate(session, id, u64::from(len)) {
            counters.rate_limited += 1;
            continue;
        }
        copy(ctx, session, id, direction, counters, len);
    }
}

/// The tap's session ids (as four words of two) and directions summary; `None` when vmsniff
/// mirrors no tap of this ifindex.
///
/// Words, not a pointer into the entry: the verifier then follows one path from here on,
/// whichever map the values came from. Userspace replaces whole entries; an id read from an
/// entry being replaced is still bounded by the SESSIONS array and checked there, and a
/// session's own `state` says whether it still mirrors.
#[inline(always)]
fn tap_sessions(ifindex: u32) -> Option<([u32; 4], u32)> {
    let entry = VMSNIFF_TAP_INDEX.get(tap_index_slot(ifindex))?;
    if entry.ifindex == ifindex {
        return Some((id_words(&entry.ids), entry.directions));
    }
    if entry.flags & TAP_INDEX_SHARED == 0 {
        return None;
    }
    // SAFETY: read in place, as above.
    let tap = unsafe { VMSNIFF_TAPS.get(&ifindex) }?;
    Some((id_words(&tap.ids), tap.directions))
}

#[inline(always)]
fn id_words(ids: &[u16; MAX_SESSIONS_PER_TAP]) -> [u32; 4] {
    // SAFETY: both entries holding ids are `repr(C)` with the ids first, at an offset aligned
    // for u32 (the entries hold u32 fields), and 16 bytes long.
    let words = ids.as_ptr() as *const u32;
    unsafe { [*words, *words.add(1), *words.add(2), *words.add(3)] }
}

/// Clones the frame into the session's target for `direction`, with the in-flight slot armed
/// for the copy program there (if the session has one, for its snaplen).
///
/// The slot is put back as it was after the clone, not cleared: when the target is itself a
/// mirrored tap, its tap program may run before its copy program (whichever attached later
/// runs first), and that tap program's own copy, nested inside this one, must not disarm the
/// slot before the copy program has cut this copy.
#[inline(always)]
fn copy(
    ctx: &TcContext,
    session: &SessionConfig,
    id: u32,
    direction: Direction,
    counters: &mut DirectionCounters,
    len: u32,
) {
    let Some(slot) = VMSNIFF_IN_FLIGHT.get_ptr_mut(0) else {
        return;
    };
    let target = session.target_ifindex[direction.index()];
    // Field by field: a struct store becomes a memset or a stack copy. SAFETY: a per-CPU slot;
    // see `InFlight` for who reads it.
    let outer = unsafe { ((*slot).armed, (*slot).session_id, (*slot).direction, (*slot).snaplen) };
    unsafe {
        (*slot).session_id = id;
        (*slot).direction = direction as u32;
        (*slot).snaplen = session.snaplen;
        (*slot).armed = IN_FLIGHT_ARMED;
    }
    // Flags 0: the copy leaves through the target's egress (into the tunnel). The clone is
    // what is redirected; `ctx`'s frame continues on its way whatever the result.
    let cloned = ctx.clone_redirect(target, 0);
    // SAFETY: as above; the clone has returned, so nothing reads the slot for this copy now.
    let refused = unsafe {
        let refused = (*slot).armed == IN_FLIGHT_REFUSED;
        ((*slot).armed, (*slot).session_id, (*slot).direction, (*slot).snaplen) = outer;
        refused
    };
    match cloned {
        Ok(()) => {
            counters.frames += 1;
            counters.bytes += u64::from(len);
        }
        // Dropped by the copy program for its snaplen, and counted there.
        Err(_) if refused => {}
        Err(_) => counters.clone_errors += 1,
    }
}

/// Runs on the egress hook of a session's target device (its GRE device, or the `--to-dev`
/// interface). Leaves every frame that is not a copy in flight untouched; cuts a copy to its
/// session's snaplen.
#[classifier]
pub fn vmsniff_copy_egress(ctx: TcContext) -> i32 {
    if cut_copy(&ctx) { CONTINUE } else { DROP_COPY }
}

/// Dropping is for copies only: `cut_copy` says false only for the copy it armed for.
const DROP_COPY: i32 = TC_ACT_SHOT;

/// Cuts the copy in flight to its session's snaplen; false when the kernel refuses the cut
/// (below the headers it must keep), so that the copy is dropped rather than sent whole.
#[inline(always)]
fn cut_copy(ctx: &TcContext) -> bool {
    let Some(slot) = VMSNIFF_IN_FLIGHT.get_ptr_mut(0) else {
        return true;
    };
    // SAFETY: a per-CPU slot, see `InFlight`.
    let flight = unsafe { &mut *slot };
    if flight.armed != IN_FLIGHT_ARMED {
        return true;
    }
    flight.armed = 0;
    let snaplen = flight.snaplen;
    if snaplen == 0 || ctx.len() <= snaplen {
        return true;
    }
    let direction = if flight.direction == Direction::In as u32 { Direction::In } else { Direction::Out };
    // SAFETY: the context pointer is valid for the whole program run.
    let cut = unsafe { bpf_skb_change_tail(ctx.skb.skb, snaplen, 0) } == 0;
    if let Some(counters) = VMSNIFF_COUNTERS.get_ptr_mut(counter_index(flight.session_id, direction)) {
        // SAFETY: a per-CPU slot, written only by this CPU while this program runs.
        unsafe {
            if cut {
                (*counters).truncated += 1;
            } else {
                (*counters).snaplen_refused += 1;
            }
        }
    }
    if !cut {
        flight.armed = IN_FLIGHT_REFUSED;
    }
    cut
}

/// Whether the session's filter (if it has one) accepts the frame.
#[inline(always)]
fn selected(ctx: &TcContext, session: &SessionConfig, id: u32) -> bool {
    if session.filter == FILTER_NONE {
        return true;
    }
    let slot = session.filter.wrapping_sub(FILTER_SLOT_BASE);
    vmsniff_filter_matches(ctx.skb.skb, filter_index(id, slot)) != 0
}

/// Runs the filter at `index` of the `FILTERS` array on the frame: 1 when it matches, 0 when
/// not or when the slot is empty (a session pointing at a missing filter copies nothing rather
/// than everything).
///
/// A global function, neither inlined nor static: the verifier checks it once, on its own and
/// for any arguments, instead of once per session slot of the caller; the interpreter's
/// 128-step loop eight times over exceeds its budget.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn vmsniff_filter_matches(skb: *mut __sk_buff, index: u32) -> u32 {
    let ctx = TcContext::new(skb);
    let (Some(program), Some(scratch)) = (VMSNIFF_FILTERS.get(index), VMSNIFF_SCRATCH.get_ptr_mut(0)) else {
        return 0;
    };
    // SAFETY: the per-CPU machine is used by this call only: the caller clones (which may run
    // other programs on this CPU) only after its last filter call.
    let m = unsafe { &mut *scratch };
    // SAFETY: the context pointer is valid for the whole program run.
    let frame = WireFrame::new(&ctx, unsafe { &*skb }, m);
    u32::from(filter::matches(program, &frame, m))
}

#[inline(always)]
fn within_rate(session: &SessionConfig, id: u32, len: u64) -> bool {
    let Some(bucket) = VMSNIFF_RATE.get_ptr_mut(id) else {
        return false;
    };
    if session.rate == 0 {
        return false;
    }
    let units = if session.rate_unit == RATE_BITS { len * 8 } else { 1 };
    // SAFETY: a plain array slot; concurrent CPUs may race on it, which the ABI documents
    // (at most one extra copy per CPU per refill).
    let bucket = unsafe { &mut *bucket };
    take_tokens(bucket, session.rate, session.burst, units, unsafe { bpf_ktime_get_ns() })
}

/// The frame as it was on the wire, for the filter: where the kernel has taken the VLAN tag out
/// of the data (into the skb's metadata, as it does before tc ingress), the tag is put back in
/// the view at bytes 12..16, so that tcpdump's `vlan 100` means the same here as on a capture.
struct WireFrame<'a> {
    ctx: &'a TcContext,
    /// Length of the view.
    len: u32,
    /// Whether the tag is out of the data: then the view's first [`HEAD_BYTES`] are in the
    /// machine's `head`, and byte `o` of the view after them is byte `o - 4` of the data.
    tagged: bool,
    /// The linear part's bounds, read once: nothing the filter calls moves the data.
    data: usize,
    data_end: usize,
}

impl<'a> WireFrame<'a> {
    #[inline(always)]
    fn new(ctx: &'a TcContext, skb: &aya_ebpf::bindings::__sk_buff, m: &mut Machine) -> Self {
        let (data, data_end) = (ctx.data(), ctx.data_end());
        let untagged = WireFrame { ctx, len: skb.len, tagged: false, data, data_end };
        if skb.vlan_present == 0 {
            return untagged;
        }
        // Destination and source MAC, then the tag, then up to 4 bytes after it (a runt has
        // fewer; the view's length stops every load before the bytes it lacks).
        // Constants per case: a computed size loses its bounds on the way to the helper.
        let after = match skb.len {
            0..14 => 0,
            14 => 2,
            15 => 3,
            _ => 4,
        };
        if untagged.load_into(0, m.head.as_mut_ptr(), 12).is_none()
            || (after > 0 && untagged.load_into(12, m.head[16..].as_mut_ptr(), after).is_none())
        {
            return WireFrame { len: 0, tagged: true, ..untagged };
        }
        // vlan_proto is in network byte order, vlan_tci in host order.
        let tag = (u32::from(u16::from_be(skb.vlan_proto as u16)) << 16) | (skb.vlan_tci & 0xffff);
        for (i, byte) in tag.to_be_bytes().into_iter().enumerate() {
            set(&mut m.head[12 + i], byte);
        }
        WireFrame { len: skb.len + 4, tagged: true, ..untagged }
    }

    /// Copies `size` (1..=7) bytes of the data at `offset` to `to`.
    #[inline(always)]
    fn load_into(&self, offset: u32, to: *mut u8, size: u32) -> Option<()> {
        // Bounded for the verifier; every destination has room for 8.
        let size = size & 7;
        if size == 0 {
            return None;
        }
        // SAFETY: `to` points into the machine, valid for `size` bytes; the helper checks the
        // frame's bounds.
        let ret =
            unsafe { bpf_skb_load_bytes(self.ctx.skb.skb as *const c_void, offset, to as *mut c_void, size) };
        (ret == 0).then_some(())
    }

    /// `size` bytes of the data (not the view) at `offset`, big-endian.
    #[inline(always)]
    fn load_data(&self, m: &mut Machine, offset: u32, size: u32) -> Option<u32> {
        // Straight from the packet when the 4 bytes at `offset` are in its linear part (a
        // helper call costs several times more); the helper otherwise (paged data, the end).
        // The mask bounds the very register the verifier checks the access with, below its
        // 64 KiB limit on packet offsets (a larger bound makes it ignore the check).
        let at = (offset & 0x7fff) as usize;
        if at as u32 == offset && self.data + at + 4 <= self.data_end {
            let at = (self.data + at) as *const u8;
            // SAFETY: the 4 bytes at `at` lie between data and data_end, checked just above.
            // Only the bytes asked for are read: assembling four for a 1-byte load (most of a
            // filter's) costs more than the branch.
            return Some(unsafe {
                match size {
                    1 => u32::from(*at),
                    2 => u32::from(u16::from_be(core::ptr::read_unaligned(at as *const u16))),
                    _ => u32::from_be(core::ptr::read_unaligned(at as *const u32)),
                }
            });
        }
        self.load_into(offset, m.buf.as_mut_ptr(), size)?;
        let buf = get(&m.buf);
        Some(filter::big_endian([buf[0], buf[1], buf[2], buf[3]], size))
    }
}

impl filter::Frame for WireFrame<'_> {
    fn wire_len(&self) -> u32 {
        self.len
    }

    fn untagged(&self) -> bool {
        !self.tagged
    }

    #[inline(always)]
    fn load(&self, m: &mut Machine, offset: u32, size: u32) -> Option<u32> {
        if !self.tagged {
            return self.load_data(m, offset, size);
        }
        let end = offset.checked_add(size)?;
        if end > self.len {
            return None;
        }
        if end > HEAD_BYTES {
            // Loads are at most 4 bytes, so this one starts after the tag.
            return self.load_data(m, offset - 4, size);
        }
        // A mask, not a comparison: it bounds the very register that indexes (`end` checked
        // above already keeps `offset` below HEAD_BYTES).
        let at = (offset & 31) as usize;
        let bytes = [get(&m.head[at]), get(&m.head[at + 1]), get(&m.head[at + 2]), get(&m.head[at + 3])];
        Some(filter::big_endian(bytes, size))
    }
}
