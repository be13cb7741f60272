//! The programs on the VM's tap: copy each frame of a mirrored direction into each session's
//! target device, and let the frame itself go on untouched.

use aya_ebpf::{
    bindings::TC_ACT_UNSPEC,
    macros::{classifier, map},
    maps::{Array, HashMap, PerCpuArray},
    programs::TcContext,
};
use vmsniff_ebpf::{
    COUNTER_SLOTS, Direction, DirectionCounters, MAX_SESSIONS_PER_TAP, MAX_TAPS, SESSION_ACTIVE,
    SESSION_SLOTS, SessionConfig, TapSessions, counter_index,
};

#[map]
static VMSNIFF_SESSIONS: Array<SessionConfig> = Array::with_max_entries(SESSION_SLOTS, 0);

#[map]
static VMSNIFF_TAPS: HashMap<u32, TapSessions> = HashMap::with_max_entries(MAX_TAPS, 0);

#[map]
static VMSNIFF_COUNTERS: PerCpuArray<DirectionCounters> = PerCpuArray::with_max_entries(COUNTER_SLOTS, 0);

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
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // SAFETY: the value is copied out at once; userspace replaces whole entries, never edits
    // them in place.
    let Some(tap) = (unsafe { VMSNIFF_TAPS.get(&ifindex) }) else {
        return;
    };
    let ids = tap.ids;
    let len = u64::from(ctx.len());
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
        let target = session.target_ifindex[direction.index()];
        let Some(counters) = VMSNIFF_COUNTERS.get_ptr_mut(counter_index(id, direction)) else {
            continue;
        };
        // Flags 0: the copy leaves through the target's egress (into the tunnel). The clone is
        // what is redirected; `ctx`'s frame continues on its way whatever the result.
        let result = ctx.clone_redirect(target, 0);
        // SAFETY: a per-CPU slot, written only by this CPU while this program runs.
        let counters = unsafe { &mut *counters };
        match result {
            Ok(()) => {
                counters.frames += 1;
                counters.bytes += len;
            }
            Err(_) => counters.clone_errors += 1,
        }
    }
}
