//! The programs on the VM's tap: copy each frame of a mirrored direction into each session's
//! target device, and let the frame itself go on untouched.

use aya_ebpf::{
    bindings::TC_ACT_UNSPEC,
    helpers::{bpf_get_prandom_u32, bpf_ktime_get_ns},
    macros::{classifier, map},
    maps::{Array, HashMap, PerCpuArray},
    programs::TcContext,
};
use vmsniff_ebpf::{
    COUNTER_SLOTS, Direction, DirectionCounters, FILTER_NONE, FILTER_SLOT_BASE, MAX_SESSIONS_PER_TAP,
    MAX_TAPS, RATE_BITS, RATE_NONE, SESSION_ACTIVE, SESSION_SLOTS, SessionConfig, TapSessions, TokenBucket,
    counter_index,
    filter::{self, Filter, Machine, filter_index},
    take_tokens,
};

#[map]
static VMSNIFF_SESSIONS: Array<SessionConfig> = Array::with_max_entries(SESSION_SLOTS, 0);

#[map]
static VMSNIFF_TAPS: HashMap<u32, TapSessions> = HashMap::with_max_entries(MAX_TAPS, 0);

#[map]
static VMSNIFF_COUNTERS: PerCpuArray<DirectionCounters> = PerCpuArray::with_max_entries(COUNTER_SLOTS, 0);

#[map]
static VMSNIFF_FILTERS: Array<Filter> = Array::with_max_entries(SESSION_SLOTS * 2, 0);

#[map]
static VMSNIFF_RATE: Array<TokenBucket> = Array::with_max_entries(SESSION_SLOTS, 0);

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

#[inline(always)]
fn mirror(ctx: &TcContext, direction: Direction) {
    // SAFETY: the context pointer is valid for the whole program run.
    let skb = unsafe { &*ctx.skb.skb };
    let ifindex = skb.ifindex;
    // SAFETY: the value is copied out at once; userspace replaces whole entries, never edits
    // them in place.
    let Some(tap) = (unsafe { VMSNIFF_TAPS.get(&ifindex) }) else {
        return;
    };
    let ids = tap.ids;
    let len = u64::from(ctx.len());
    let frame = WireFrame::new(ctx, skb);
    for id in ids.iter().take(MAX_SESSIONS_PER_TAP) {
        let id = u32::from(*id);
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
        if !selected(session, id, &frame) {
            counters.filtered += 1;
            continue;
        }
        // Random, not every Nth: a periodic pattern in the traffic (a request and its reply)
        // would otherwise always land on the same side of the sample.
        if session.sample_every > 1 && unsafe { bpf_get_prandom_u32() } % session.sample_every != 0 {
            counters.sampled_out += 1;
            continue;
        }
        if session.rate_unit != RATE_NONE && !within_rate(session, id, len) {
            counters.rate_limited += 1;
            continue;
        }
        let target = session.target_ifindex[direction.index()];
        // Flags 0: the copy leaves through the target's egress (into the tunnel). The clone is
        // what is redirected; `ctx`'s frame continues on its way whatever the result.
        match ctx.clone_redirect(target, 0) {
            Ok(()) => {
                counters.frames += 1;
                counters.bytes += len;
            }
            Err(_) => counters.clone_errors += 1,
        }
    }
}

/// Whether the session's filter (if it has one) accepts the frame.
#[inline(always)]
fn selected(session: &SessionConfig, id: u32, frame: &WireFrame) -> bool {
    if session.filter == FILTER_NONE {
        return true;
    }
    let slot = session.filter.wrapping_sub(FILTER_SLOT_BASE);
    let (Some(program), Some(scratch)) =
        (VMSNIFF_FILTERS.get(filter_index(id, slot)), VMSNIFF_SCRATCH.get_ptr_mut(0))
    else {
        // A session pointing at a missing filter copies nothing rather than everything.
        return false;
    };
    // SAFETY: the per-CPU machine is used by this program run only, and only inside this call
    // (nothing in it outlives a frame).
    filter::matches(program, frame, unsafe { &mut *scratch })
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
    len: u32,
    /// TPID and TCI as they appear on the wire, big-endian in a u32.
    tag: Option<u32>,
}

impl<'a> WireFrame<'a> {
    #[inline(always)]
    fn new(ctx: &'a TcContext, skb: &aya_ebpf::bindings::__sk_buff) -> Self {
        if skb.vlan_present == 0 {
            return WireFrame { ctx, len: skb.len, tag: None };
        }
        // vlan_proto is in network byte order, vlan_tci in host order.
        let proto = u32::from(u16::from_be(skb.vlan_proto as u16));
        let tag = (proto << 16) | (skb.vlan_tci & 0xffff);
        WireFrame { ctx, len: skb.len + 4, tag: Some(tag) }
    }

    /// One byte of the view. Shifts rather than an indexed array: the verifier cannot bound a
    /// stack array indexed by a packet-derived offset.
    #[inline(always)]
    fn byte(&self, offset: u32, tag: u32) -> Option<u8> {
        match offset {
            0..12 => self.ctx.load::<u8>(offset as usize).ok(),
            12..16 => Some((tag >> ((15 - offset) * 8)) as u8),
            _ => self.ctx.load::<u8>(offset as usize - 4).ok(),
        }
    }
}

impl filter::Frame for WireFrame<'_> {
    fn len(&self) -> u32 {
        self.len
    }

    #[inline(always)]
    fn load<const N: usize>(&self, offset: u32) -> Option<[u8; N]> {
        let Some(tag) = self.tag else {
            return self.ctx.load::<[u8; N]>(offset as usize).ok();
        };
        let end = offset.checked_add(N as u32)?;
        if end <= 12 {
            return self.ctx.load::<[u8; N]>(offset as usize).ok();
        }
        if offset >= 16 {
            return self.ctx.load::<[u8; N]>(offset as usize - 4).ok();
        }
        let mut out = [0u8; N];
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = self.byte(offset + i as u32, tag)?;
        }
        Some(out)
    }
}
