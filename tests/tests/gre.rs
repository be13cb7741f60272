//! GRE end to end: copies reach a collector namespace as GRE (TEB) with the documented key,
//! byte-identical inside. Needs ip_gre: runs in the VM harness's Debian kernels, and skips
//! (saying so) on kernels without it.
use std::time::Duration;

use vmsniff_tests::{
    frames::{self, is_marked},
    netns::Netns,
    packet::{PacketSocket, decap_gre, is_ipv4_fragment, reassemble_ipv4},
    privileged, run, skip,
    topology::{Hypervisor, TAP, assert_frames_eq, total_bytes},
    vmsniff,
};

const COLLECTOR: &str = "10.231.0.2";

struct Site {
    hv: Hypervisor,
    collector: Netns,
    capture: PacketSocket,
}

/// The hypervisor with an uplink veth to a collector namespace; `None` without GRE support.
fn site(test: &str, uplink_mtu: u32) -> Option<Site> {
    if !privileged(test) {
        return None;
    }
    let probe = Netns::new("greprobe");
    if !probe.try_sh("ip link add g0 type gretap remote 192.0.2.1").0 {
        skip("this kernel has no ip_gre; GRE end to end runs in `cargo xtask vm-test`");
        return None;
    }
    let hv = Hypervisor::new();
    let collector = Netns::new("col");
    hv.ns.sh(&format!(
        "ip link add up0 type veth peer name up1 netns {col}
         ip addr add 10.231.0.1/24 dev up0
         ip link set up0 mtu {uplink_mtu} up",
        col = collector.name
    ));
    collector.sh(&format!("ip addr add {COLLECTOR}/24 dev up1; ip link set up1 mtu {uplink_mtu} up"));
    let capture = PacketSocket::open(&collector, "up1");
    Some(Site { hv, collector, capture })
}

fn gre_copies(capture: &PacketSocket, count: usize) -> Vec<vmsniff_tests::packet::Gre> {
    capture
        .capture(count, Duration::from_secs(15), |f| decap_gre(f).is_some_and(|g| is_marked(&g.inner)))
        .iter()
        .filter_map(|f| decap_gre(f))
        .collect()
}

fn inners(copies: &[vmsniff_tests::packet::Gre]) -> Vec<Vec<u8>> {
    copies.iter().map(|g| g.inner.clone()).collect()
}

#[test]
fn copies_reach_the_collector_as_keyed_gre_both_ways() {
    let Some(mut site) = site("copies_reach_the_collector_as_keyed_gre_both_ways", 9000) else { return };
    for mode in vmsniff::attach_modes() {
        vmsniff::report_mode(mode);
        let id = vmsniff::attach(
            &site.hv.ns,
            &["--tap", TAP, "--to", COLLECTOR, "--key", "7", "--attach-mode", mode],
        );
        let (out, into) = frames::both_ways(40);

        site.hv.vm_sends(&out);
        let copies = gre_copies(&site.capture, out.len());
        assert_frames_eq(&format!("[{mode}] GRE copies of frames the VM sent"), &out, &inners(&copies));
        for g in &copies {
            assert_eq!(g.protocol, 0x6558, "transparent Ethernet bridging");
            assert_eq!(g.key, Some(14), "key 7, out: 7 * 2 + 0");
            assert_eq!(g.outer_dst, [10, 231, 0, 2]);
            assert_eq!((g.ttl, g.tos, g.checksum, g.dont_fragment), (64, 0, false, false));
        }

        site.hv.vm_receives(&into);
        let copies = gre_copies(&site.capture, into.len());
        assert_frames_eq(&format!("[{mode}] GRE copies of frames the VM received"), &into, &inners(&copies));
        assert!(copies.iter().all(|g| g.key == Some(15)), "key 7, in: 7 * 2 + 1");

        let s = vmsniff::session(&site.hv.ns, id);
        assert_eq!(s["counters"]["out"]["frames"], out.len() as u64);
        assert_eq!(s["counters"]["out"]["bytes"], total_bytes(&out));
        assert_eq!(s["counters"]["in"]["frames"], into.len() as u64);
        assert_eq!(s["devices"]["out"]["tx-packets"], out.len() as u64);
        assert_eq!(s["devices"]["in"]["tx-packets"], into.len() as u64);

        vmsniff::ok(&site.hv.ns, &["detach", &id.to_string()]);
        let names = run("ip", &["-n", &site.hv.ns.name, "-o", "link", "show"]);
        let left: Vec<&str> = names
            .lines()
            .filter_map(|l| l.split(':').nth(1).map(str::trim))
            .filter(|name| name.starts_with("vms") && name.contains('-'))
            .collect();
        assert!(left.is_empty(), "GRE devices left: {left:?}");
        assert!(!site.hv.ns.pin_dir().exists());
    }
    drop(site.collector);
}

#[test]
fn an_unreachable_collector_costs_copies_never_frames() {
    let Some(mut site) = site("an_unreachable_collector_costs_copies_never_frames", 1500) else { return };
    let id = vmsniff::attach(&site.hv.ns, &["--tap", TAP, "--to", COLLECTOR]);
    site.hv.ns.sh("ip link set up0 down");
    let (out, into) = frames::both_ways(10);
    site.hv.vm_sends(&out);
    site.hv.vm_receives(&into);
    let s = vmsniff::session(&site.hv.ns, id);
    let lost: u64 = ["in", "out"]
        .iter()
        .map(|d| {
            s["devices"][d]["tx-errors"].as_u64().unwrap() + s["devices"][d]["tx-dropped"].as_u64().unwrap()
        })
        .sum();
    assert_eq!(lost, 20, "every copy toward the unreachable collector is counted as lost: {s}");
    let table = vmsniff::ok(&site.hv.ns, &["status"]);
    assert!(table.contains(" 20\n"), "status shows the loss: {table}");
    vmsniff::ok(&site.hv.ns, &["detach", "--all"]);
}

#[test]
fn copies_larger_than_the_uplink_mtu_arrive_fragmented_and_whole() {
    let Some(mut site) = site("copies_larger_than_the_uplink_mtu_arrive_fragmented_and_whole", 1500) else {
        return;
    };
    vmsniff::attach(&site.hv.ns, &["--tap", TAP, "--to", COLLECTOR, "--key", "3"]);
    // 1514 bytes inside GRE is 1552 on the wire: more than the 1500-byte uplink carries.
    let out: Vec<Vec<u8>> =
        (0..6).map(|i| frames::frame(frames::VM_MAC, frames::PEER_MAC, i, 1400 + 20 * i as usize)).collect();
    site.hv.vm_sends(&out);
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let (mut raw, mut copies) = (Vec::new(), Vec::new());
    while copies.len() < out.len() && std::time::Instant::now() < deadline {
        raw.extend(site.capture.capture(1, Duration::from_millis(500), |f| f.len() > 34 && f[23] == 47));
        copies = reassemble_ipv4(&raw)
            .iter()
            .filter_map(|p| decap_gre(p))
            .filter(|g| is_marked(&g.inner))
            .collect();
    }
    assert!(raw.iter().any(|f| is_ipv4_fragment(f)), "the large copies were not fragmented");
    assert_frames_eq("copies reassembled at the collector", &out, &inners(&copies));
    assert!(copies.iter().all(|g| g.key == Some(6) && !g.dont_fragment));
    vmsniff::ok(&site.hv.ns, &["detach", "--all"]);
}
