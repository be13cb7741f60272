//! The mirror's data path on this kernel, through `--to-dev` (no GRE needed): every frame of
//! each selected direction arrives at the target byte-identical and in order, the VM's frames
//! are never touched, counters match, and detach leaves nothing behind.
// Test code throughout: helpers outside `#[test]` functions fail the test by panicking too.
#![expect(clippy::unwrap_used, clippy::expect_used, reason = "a failed step fails the test")]

use std::time::Duration;

use aya::maps::{Array, Map, MapData};
use vmsniff_ebpf::{TAP_INDEX_SHARED, TAP_INDEX_SLOTS, TapIndexEntry, map_name, tap_index_slot};
use vmsniff_tests::{
    frames::{self, is_marked},
    netns::Netns,
    privileged_on_every_kernel, privileged_on_host, run,
    topology::{Hypervisor, MIRROR_DEV, TAP, assert_frames_eq, total_bytes},
    vmsniff,
};

const QUIET: Duration = Duration::from_millis(500);

/// What a clean namespace looks like after detach, checked through the kernel itself.
fn assert_nothing_left(ns: &Netns, links_before: &[String]) {
    assert!(!ns.pin_dir().exists(), "pins left at {}", ns.pin_dir().display());
    for hook in ["ingress", "egress"] {
        let filters = run("tc", &["-n", &ns.name, "filter", "show", "dev", TAP, hook]);
        assert!(!filters.contains("vmsniff"), "a vmsniff filter is left on {hook}: {filters}");
    }
    let tcx = ns.tcx_programs(TAP);
    assert!(tcx.is_empty(), "TCX programs left on the tap: {tcx:?}");
    assert_eq!(ns.link_names(), links_before, "detach changed the namespace's interfaces");
}

fn counters(ns: &Netns, id: u32, direction: &str) -> (u64, u64, u64) {
    let s = vmsniff::session(ns, id);
    let c = &s["counters"][direction];
    (c["frames"].as_u64().unwrap(), c["bytes"].as_u64().unwrap(), c["clone-errors"].as_u64().unwrap())
}

#[test]
fn both_directions_arrive_byte_identical_in_order_with_matching_counters() {
    if !privileged_on_every_kernel(
        "both_directions_arrive_byte_identical_in_order_with_matching_counters",
        "each kernel's verifier loads every program, and the clsact (from 6.6 also TCX) attach path \
         and bpf_clone_redirect from both hooks are the kernel's",
    ) {
        return;
    }
    for mode in vmsniff::attach_modes() {
        vmsniff::report_mode(mode);
        let mut hv = Hypervisor::new();
        let mirror = hv.mirror_port();
        let before = hv.ns.link_names();
        let id = vmsniff::attach(&hv.ns, &["--tap", TAP, "--to-dev", MIRROR_DEV, "--attach-mode", mode]);
        assert_eq!(vmsniff::session(&hv.ns, id)["attach-mode"], mode);

        let (out, into) = frames::both_ways(40);
        hv.vm_sends(&out);
        let copies = mirror.capture(out.len(), Duration::from_secs(10), is_marked);
        assert_frames_eq(&format!("[{mode}] copies of frames the VM sent"), &out, &copies);

        hv.vm_receives(&into);
        let copies = mirror.capture(into.len(), Duration::from_secs(10), is_marked);
        assert_frames_eq(&format!("[{mode}] copies of frames the VM received"), &into, &copies);
        assert!(mirror.drain(QUIET, is_marked).is_empty(), "[{mode}] extra copies arrived");

        assert_eq!(counters(&hv.ns, id, "out"), (out.len() as u64, total_bytes(&out), 0));
        assert_eq!(counters(&hv.ns, id, "in"), (into.len() as u64, total_bytes(&into), 0));

        vmsniff::ok(&hv.ns, &["detach", &id.to_string()]);
        assert_nothing_left(&hv.ns, &before);
        // Traffic goes on, unmirrored.
        hv.vm_sends(&out[..4]);
        hv.vm_receives(&into[..4]);
        assert!(mirror.drain(QUIET, is_marked).is_empty(), "[{mode}] copies after detach");
    }
}

#[test]
fn each_direction_selects_only_its_side() {
    if !privileged_on_host(
        "each_direction_selects_only_its_side",
        "which hooks a direction uses is vmsniff's plan and the programs' own logic; both hooks \
         mirror on every kernel in both_directions_arrive_byte_identical_in_order_with_matching_counters",
    ) {
        return;
    }
    for mode in vmsniff::attach_modes() {
        vmsniff::report_mode(mode);
        for (direction, expect_out, expect_in) in [("out", true, false), ("in", false, true)] {
            each_direction_case(mode, direction, expect_out, expect_in);
        }
    }
}

fn each_direction_case(mode: &str, direction: &str, expect_out: bool, expect_in: bool) {
    let mut hv = Hypervisor::new();
    let mirror = hv.mirror_port();
    let id = vmsniff::attach(
        &hv.ns,
        &["--tap", TAP, "--to-dev", MIRROR_DEV, "--direction", direction, "--attach-mode", mode],
    );
    assert_eq!(vmsniff::session(&hv.ns, id)["direction"], direction);
    let (out, into) = frames::both_ways(10);
    hv.vm_sends(&out);
    hv.vm_receives(&into);
    let copies = mirror.drain(QUIET * 2, is_marked);
    let mut expected = Vec::new();
    if expect_out {
        expected.extend(out.iter().cloned());
    }
    if expect_in {
        expected.extend(into.iter().cloned());
    }
    assert_frames_eq(&format!("[{mode}] --direction {direction}"), &expected, &copies);
    let (out_frames, _, _) = counters(&hv.ns, id, "out");
    let (in_frames, _, _) = counters(&hv.ns, id, "in");
    assert_eq!((out_frames, in_frames), (if expect_out { 10 } else { 0 }, if expect_in { 10 } else { 0 }));
    vmsniff::ok(&hv.ns, &["detach", "--tap", TAP]);
}

#[test]
fn the_vm_is_undisturbed_when_the_target_is_down_or_deleted_or_the_session_is_emptied() {
    if !privileged_on_every_kernel(
        "the_vm_is_undisturbed_when_the_target_is_down_or_deleted_or_the_session_is_emptied",
        "bpf_clone_redirect's failures toward a down or deleted device, which the programs count, \
         are the kernel's",
    ) {
        return;
    }
    for mode in vmsniff::attach_modes() {
        vmsniff::report_mode(mode);
        let mut hv = Hypervisor::new();
        let mirror = hv.mirror_port();
        let id = vmsniff::attach(&hv.ns, &["--tap", TAP, "--to-dev", MIRROR_DEV, "--attach-mode", mode]);
        let (out, into) = frames::both_ways(16);

        // Session emptied in the kernel: the programs find a free slot and mirror nothing.
        let sessions_pin = hv.ns.pin_dir().join("maps").join(vmsniff_ebpf::map_name::SESSIONS);
        let saved = set_session(&sessions_pin, id, vmsniff_ebpf::SessionConfig::EMPTY);
        hv.vm_sends(&out);
        hv.vm_receives(&into);
        assert!(mirror.drain(QUIET, is_marked).is_empty(), "[{mode}] an emptied session still mirrored");
        set_session(&sessions_pin, id, saved);

        // Target down: each copy is refused (ENETDOWN) and counted; frames pass.
        hv.ns.sh(&format!("ip link set {MIRROR_DEV} down"));
        hv.vm_sends(&out);
        hv.vm_receives(&into);
        let errors = |hv: &Hypervisor| (counters(&hv.ns, id, "out").2, counters(&hv.ns, id, "in").2);
        assert_eq!(errors(&hv), (16, 16), "[{mode}] copies toward a down target are counted as lost");
        hv.ns.sh(&format!("ip link set {MIRROR_DEV} up"));

        // Target deleted: every clone fails (counted), frames pass.
        hv.ns.sh(&format!("ip link del {MIRROR_DEV}"));
        hv.vm_sends(&out);
        hv.vm_receives(&into);
        assert_eq!(errors(&hv), (32, 32), "[{mode}] clone failures toward a deleted target are counted");

        vmsniff::ok(&hv.ns, &["detach", "--all"]);
        assert!(!hv.ns.pin_dir().exists());
        drop(mirror);
    }
}

/// Writes a session slot straight into the pinned map (what a corrupted or emptied map looks
/// like to the programs); returns the old value.
fn set_session(
    pin: &std::path::Path,
    id: u32,
    value: vmsniff_ebpf::SessionConfig,
) -> vmsniff_ebpf::SessionConfig {
    let data = aya::maps::MapData::from_pin(pin).expect("open pinned sessions map");
    let mut map: aya::maps::Array<_, vmsniff_ebpf::SessionConfig> =
        aya::maps::Array::try_from(aya::maps::Map::Array(data)).expect("sessions map type");
    let old = map.get(&id, 0).expect("read session");
    map.set(id, value, 0).expect("write session");
    old
}

#[test]
fn other_tc_filters_on_the_tap_keep_running_and_stay() {
    if !privileged_on_host(
        "other_tc_filters_on_the_tap_keep_running_and_stay",
        "which filters vmsniff leaves alone is its own logic over tc's netlink API, the same on every \
         kernel; the clsact path itself mirrors in every guest",
    ) {
        return;
    }
    vmsniff::report_mode("netlink");
    let mut hv = Hypervisor::new();
    let mirror = hv.mirror_port();
    let ns = hv.ns.name.clone();
    // The operator's own filter: u32 + mirred, copying every frame of both hooks to oth0.
    hv.ns.sh("ip link add oth0 type veth peer name oth1; ip link set oth0 up; ip link set oth1 up");
    let theirs = vmsniff_tests::packet::PacketSocket::open(&hv.ns, "oth1");
    run("tc", &["-n", &ns, "qdisc", "add", "dev", TAP, "clsact"]);
    for hook in ["ingress", "egress"] {
        run(
            "tc",
            &[
                "-n", &ns, "filter", "add", "dev", TAP, hook, "prio", "100", "protocol", "all", "u32",
                "match", "u32", "0", "0", "action", "mirred", "egress", "mirror", "dev", "oth0",
            ],
        );
    }

    let id = vmsniff::attach(&hv.ns, &["--tap", TAP, "--to-dev", MIRROR_DEV, "--attach-mode", "netlink"]);
    let (out, into) = frames::both_ways(12);
    hv.vm_sends(&out);
    hv.vm_receives(&into);
    let expected: Vec<Vec<u8>> = out.iter().chain(&into).cloned().collect();
    assert_frames_eq(
        "vmsniff's copies beside the other filter",
        &expected,
        &mirror.capture(24, Duration::from_secs(10), is_marked),
    );
    assert_frames_eq(
        "the other filter's copies while vmsniff runs",
        &expected,
        &theirs.capture(24, Duration::from_secs(10), is_marked),
    );

    vmsniff::ok(&hv.ns, &["detach", &id.to_string()]);
    for hook in ["ingress", "egress"] {
        let filters = run("tc", &["-n", &ns, "filter", "show", "dev", TAP, hook]);
        assert!(filters.contains("u32"), "the other {hook} filter was removed: {filters}");
        assert!(!filters.contains("vmsniff"), "vmsniff's {hook} filter was left: {filters}");
    }
    assert!(
        run("tc", &["-n", &ns, "qdisc", "show", "dev", TAP]).contains("clsact"),
        "the clsact qdisc vmsniff did not create was removed"
    );
    hv.vm_sends(&out[..3]);
    hv.vm_receives(&into[..3]);
    let expected: Vec<Vec<u8>> = out[..3].iter().chain(&into[..3]).cloned().collect();
    assert_frames_eq(
        "the other filter's copies after detach",
        &expected,
        &theirs.capture(6, Duration::from_secs(10), is_marked),
    );
    assert!(mirror.drain(QUIET, is_marked).is_empty(), "vmsniff copies after detach");
}

#[test]
fn a_vanished_tap_shows_as_gone_and_detach_still_cleans_by_its_name() {
    if !privileged_on_host(
        "a_vanished_tap_shows_as_gone_and_detach_still_cleans_by_its_name",
        "the state shown and the cleanup by name are vmsniff's own bookkeeping",
    ) {
        return;
    }
    for mode in vmsniff::attach_modes() {
        vmsniff::report_mode(mode);
        let hv = Hypervisor::new();
        hv.mirror_port();
        let id = vmsniff::attach(&hv.ns, &["--tap", TAP, "--to-dev", MIRROR_DEV, "--attach-mode", mode]);
        assert_eq!(vmsniff::session(&hv.ns, id)["state"], "active");
        // The VM stops: its tap goes with the fd, taking vmsniff's filters or links with it.
        drop(hv.port.vm);
        assert!(!hv.ns.link_names().iter().any(|n| n == TAP));
        assert_eq!(vmsniff::session(&hv.ns, id)["state"], "tap-gone");
        vmsniff::ok(&hv.ns, &["detach", "--tap", TAP]);
        assert!(!hv.ns.pin_dir().exists(), "[{mode}] pins left after detaching a vanished tap");
    }
}

/// The tap index slot `ifindex` falls in, as the kernel holds it.
fn index_slot(ns: &Netns, ifindex: u32) -> TapIndexEntry {
    let pin = ns.pin_dir().join("maps").join(map_name::TAP_INDEX);
    let index: Array<MapData, TapIndexEntry> =
        Array::try_from(Map::Array(MapData::from_pin(pin).unwrap())).expect("the tap index's layout");
    index.get(&tap_index_slot(ifindex), 0).unwrap()
}

#[test]
fn taps_that_share_a_tap_index_slot_are_each_mirrored_into_their_own_session() {
    if !privileged_on_host(
        "taps_that_share_a_tap_index_slot_are_each_mirrored_into_their_own_session",
        "which tap a slot describes is vmsniff's bookkeeping, and the programs read the index alike \
         on every kernel: every data path test in the guests goes through it",
    ) {
        return;
    }
    let mut hv = Hypervisor::new();
    let mirror = hv.mirror_port();
    let first = hv.ns.ifindex(TAP);
    // Ifindexes a whole index apart: the same slot.
    let second_ifindex = first + TAP_INDEX_SLOTS;
    let mut second = hv.add_vm_at("tapvm1", 1, Some(second_ifindex));
    assert_eq!(hv.ns.ifindex("tapvm1"), second_ifindex);
    let a = vmsniff::attach(&hv.ns, &["--tap", TAP, "--to-dev", MIRROR_DEV]);
    assert_eq!(index_slot(&hv.ns, first).ifindex, first);
    assert_eq!(index_slot(&hv.ns, first).flags, 0);
    let b = vmsniff::attach(&hv.ns, &["--tap", "tapvm1", "--to-dev", MIRROR_DEV]);
    let shared = index_slot(&hv.ns, first);
    assert_eq!((shared.ifindex, shared.flags), (first, TAP_INDEX_SHARED), "the lower ifindex, shared");
    assert_eq!(u32::from(shared.ids[0]), a);

    let from_vm = |first_id: u32| -> Vec<Vec<u8>> {
        (0..6)
            .map(|i| frames::frame(frames::VM_MAC, frames::PEER_MAC, first_id + i, 60 + 100 * i as usize))
            .collect()
    };
    let (out_a, out_b) = (from_vm(100), from_vm(200));
    // The slot's own tap (from the index), then the other one (from the taps map).
    hv.vm_sends(&out_a);
    second.vm_sends(&out_b);
    let copies = mirror.capture(out_a.len() + out_b.len(), Duration::from_secs(10), is_marked);
    assert_frames_eq("copies of both taps' frames", &[out_a.clone(), out_b.clone()].concat(), &copies);
    assert_eq!(counters(&hv.ns, a, "out"), (6, total_bytes(&out_a), 0));
    assert_eq!(counters(&hv.ns, b, "out"), (6, total_bytes(&out_b), 0));

    // The first session gone, the slot describes the second tap alone.
    vmsniff::ok(&hv.ns, &["detach", &a.to_string()]);
    let alone = index_slot(&hv.ns, first);
    assert_eq!((alone.ifindex, alone.flags, u32::from(alone.ids[0])), (second_ifindex, 0, b));
    hv.vm_sends(&out_a);
    second.vm_sends(&out_b);
    let copies = mirror.capture(out_b.len(), Duration::from_secs(10), is_marked);
    assert_frames_eq("copies once the first tap is detached", &out_b, &copies);
    assert!(mirror.drain(QUIET, is_marked).is_empty(), "the detached tap's frames were copied");
    assert_eq!(counters(&hv.ns, b, "out").0, 12);
    vmsniff::ok(&hv.ns, &["detach", "--all"]);
}
