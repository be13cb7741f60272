//! GRE end to end: copies reach a collector namespace as GRE (TEB) with the documented key,
//! byte-identical inside. Needs ip_gre: runs in the VM harness's Debian kernels, and skips
//! (saying so) on kernels without it.
// Test code throughout: helpers outside `#[test]` functions fail the test by panicking too.
#![expect(clippy::unwrap_used, clippy::expect_used, reason = "a failed step fails the test")]

use std::time::Duration;

use vmsniff_tests::{
    frames::{self, L4, PEER_MAC, VM_MAC, is_marked},
    netns::Netns,
    packet::{PacketSocket, decap_gre, is_ipv4_fragment, reassemble_ipv4},
    privileged_on_every_kernel, privileged_on_host_and_one_guest, run, skip,
    topology::{Hypervisor, TAP, assert_frames_eq, total_bytes},
    vmsniff,
};

const COLLECTOR: &str = "10.231.0.2";

struct Site {
    hv: Hypervisor,
    collector: Collector,
    capture: PacketSocket,
}

/// A collector namespace behind its own uplink veth from the hypervisor.
struct Collector {
    ns: Netns,
    ip: String,
}

/// True where this kernel has ip_gre; says so and skips otherwise.
fn gre_available() -> bool {
    let probe = Netns::new("greprobe");
    if !probe.try_sh("ip link add g0 type gretap remote 192.0.2.1").0 {
        skip("this kernel has no ip_gre; GRE end to end runs in `cargo xtask vm-test`");
        return false;
    }
    true
}

/// Collector `index` (1, 2, ...) at 10.(230+index).0.2 behind uplink up`index`.
fn add_collector(hv: &Hypervisor, index: u8, uplink_mtu: u32) -> (Collector, PacketSocket) {
    let ns = Netns::new("col");
    let net = 230 + index;
    hv.ns.sh(&format!(
        "ip link add up{index} type veth peer name down{index} netns {col}
         ip addr add 10.{net}.0.1/24 dev up{index}
         ip link set up{index} mtu {uplink_mtu} up",
        col = ns.name
    ));
    let ip = format!("10.{net}.0.2");
    ns.sh(&format!("ip addr add {ip}/24 dev down{index}; ip link set down{index} mtu {uplink_mtu} up"));
    let capture = PacketSocket::open(&ns, &format!("down{index}"));
    (Collector { ns, ip }, capture)
}

/// The hypervisor (VM side at `vm_mtu`) with one collector; `None` without GRE support.
fn site(vm_mtu: u32, uplink_mtu: u32) -> Option<Site> {
    if !gre_available() {
        return None;
    }
    let hv = Hypervisor::with_mtu(vm_mtu);
    let (collector, capture) = add_collector(&hv, 1, uplink_mtu);
    assert_eq!(collector.ip, COLLECTOR);
    Some(Site { hv, collector, capture })
}

fn gre_copies(capture: &PacketSocket, count: usize) -> Vec<vmsniff_tests::packet::Gre> {
    capture
        .capture(count, Duration::from_secs(15), |f| decap_gre(f).is_some_and(|g| is_marked(&g.inner)))
        .iter()
        .filter_map(|f| decap_gre(f))
        .collect()
}

/// Copies that may arrive as IPv4 fragments, reassembled, until `count` arrived or 15 s passed.
/// Also returns whether any came fragmented.
fn reassembled_copies(capture: &PacketSocket, count: usize) -> (Vec<vmsniff_tests::packet::Gre>, bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let (mut raw, mut copies) = (Vec::new(), Vec::new());
    while copies.len() < count && std::time::Instant::now() < deadline {
        raw.extend(capture.capture(1, Duration::from_millis(500), |f| f.len() > 34 && f[23] == 47));
        copies = reassemble_ipv4(&raw)
            .iter()
            .filter_map(|p| decap_gre(p))
            .filter(|g| is_marked(&g.inner))
            .collect();
    }
    (copies, raw.iter().any(|f| is_ipv4_fragment(f)))
}

/// The hypervisor's IPv4 fragments created so far (`IpFragCreates` in nstat).
fn fragments_created(ns: &Netns) -> u64 {
    let snmp = ns.sh("cat /proc/net/snmp");
    let mut ip = snmp.lines().filter(|l| l.starts_with("Ip:"));
    let (names, values) = (ip.next().unwrap(), ip.next().unwrap());
    let at =
        names.split_whitespace().position(|n| n == "FragCreates").expect("FragCreates in /proc/net/snmp");
    values.split_whitespace().nth(at).unwrap().parse().unwrap()
}

fn inners(copies: &[vmsniff_tests::packet::Gre]) -> Vec<Vec<u8>> {
    copies.iter().map(|g| g.inner.clone()).collect()
}

#[test]
fn copies_reach_the_collector_as_keyed_gre_both_ways() {
    if !privileged_on_every_kernel(
        "copies_reach_the_collector_as_keyed_gre_both_ways",
        "each kernel's ip_gre carries the clones, on each kernel's attach path (TCX too from 6.6)",
    ) {
        return;
    }
    let Some(mut site) = site(1500, 9000) else {
        return;
    };
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
    drop(site.collector.ns);
}

#[test]
fn an_unreachable_collector_costs_copies_never_frames() {
    if !privileged_on_every_kernel(
        "an_unreachable_collector_costs_copies_never_frames",
        "the GRE device's error and drop counters, which status reports as lost copies, are the kernel's",
    ) {
        return;
    }
    let Some(mut site) = site(1500, 1500) else {
        return;
    };
    let id = vmsniff::attach(&site.hv.ns, &["--tap", TAP, "--to", COLLECTOR]);
    site.hv.ns.sh("ip link set up1 down");
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
    if !privileged_on_host_and_one_guest(
        "copies_larger_than_the_uplink_mtu_arrive_fragmented_and_whole",
        "every kernel fragments GRE copies in jumbo_frames_pass_untouched_and_their_copies_arrive_fragmented \
         and sends them without DF in copies_reach_the_collector_as_keyed_gre_both_ways",
    ) {
        return;
    }
    let Some(mut site) = site(1500, 1500) else {
        return;
    };
    vmsniff::attach(&site.hv.ns, &["--tap", TAP, "--to", COLLECTOR, "--key", "3"]);
    // 1514 bytes inside GRE is 1552 on the wire: more than the 1500-byte uplink carries.
    let out: Vec<Vec<u8>> =
        (0..6).map(|i| frames::frame(frames::VM_MAC, frames::PEER_MAC, i, 1400 + 20 * i as usize)).collect();
    site.hv.vm_sends(&out);
    let (copies, fragmented) = reassembled_copies(&site.capture, out.len());
    assert!(fragmented, "the large copies were not fragmented");
    assert_frames_eq("copies reassembled at the collector", &out, &inners(&copies));
    assert!(copies.iter().all(|g| g.key == Some(6) && !g.dont_fragment));
    vmsniff::ok(&site.hv.ns, &["detach", "--all"]);
}

#[test]
fn two_taps_mirror_to_two_collectors_without_crossing() {
    if !privileged_on_host_and_one_guest(
        "two_taps_mirror_to_two_collectors_without_crossing",
        "keeping sessions apart (own device, own key, own counters) is vmsniff's bookkeeping; GRE \
         itself runs on every kernel in copies_reach_the_collector_as_keyed_gre_both_ways",
    ) || !gre_available()
    {
        return;
    }
    let mut hv = Hypervisor::new();
    let mut second = hv.add_vm("tapvm1", 1);
    // Uplinks with room for every copy: fragmentation has its own tests.
    let (first_collector, first_capture) = add_collector(&hv, 1, 9000);
    let (second_collector, second_capture) = add_collector(&hv, 2, 9000);
    let first = vmsniff::attach(&hv.ns, &["--tap", TAP, "--to", &first_collector.ip, "--key", "5"]);
    let second_id = vmsniff::attach(&hv.ns, &["--tap", "tapvm1", "--to", &second_collector.ip]);
    assert_ne!(first, second_id);

    let (out, into) = frames::both_ways(16);
    let second_out: Vec<Vec<u8>> = frames::sizes(16)
        .enumerate()
        .map(|(i, len)| frames::frame(frames::VM_MAC, frames::PEER_MAC, 5000 + i as u32, len))
        .collect();
    let second_into: Vec<Vec<u8>> = frames::sizes(16)
        .enumerate()
        .map(|(i, len)| frames::frame(frames::PEER_MAC, frames::VM_MAC, 6000 + i as u32, len))
        .collect();
    hv.vm_sends(&out);
    second.vm_sends(&second_out);
    hv.vm_receives(&into);
    second.vm_receives(&second_into);

    let quiet = Duration::from_secs(1);
    let keep = |f: &[u8]| decap_gre(f).is_some_and(|g| is_marked(&g.inner));
    for (what, capture, key, sent, received) in [
        ("first collector", &first_capture, 5, &out, &into),
        ("second collector", &second_capture, second_id, &second_out, &second_into),
    ] {
        let copies: Vec<_> = capture.drain(quiet, keep).iter().filter_map(|f| decap_gre(f)).collect();
        let with_key = |k: u32| -> Vec<Vec<u8>> {
            copies.iter().filter(|g| g.key == Some(k)).map(|g| g.inner.clone()).collect()
        };
        assert_frames_eq(&format!("{what}: copies of frames its VM sent"), sent, &with_key(key * 2));
        assert_frames_eq(
            &format!("{what}: copies of frames its VM received"),
            received,
            &with_key(key * 2 + 1),
        );
        assert_eq!(copies.len(), sent.len() + received.len(), "{what}: copies with a foreign key arrived");
    }
    for (id, n) in [(first, 16u64), (second_id, 16)] {
        let s = vmsniff::session(&hv.ns, id);
        assert_eq!(
            (s["counters"]["out"]["frames"].as_u64(), s["counters"]["in"]["frames"].as_u64()),
            (Some(n), Some(n))
        );
    }
    vmsniff::ok(&hv.ns, &["detach", "--all"]);
    drop((first_collector.ns, second_collector.ns));
}

#[test]
fn jumbo_frames_pass_untouched_and_their_copies_arrive_fragmented() {
    if !privileged_on_every_kernel(
        "jumbo_frames_pass_untouched_and_their_copies_arrive_fragmented",
        "clones of 9000-byte frames and the IP fragmentation of their GRE copies are the kernel's",
    ) {
        return;
    }
    let Some(mut site) = site(9000, 1500) else { return };
    let id = vmsniff::attach(&site.hv.ns, &["--tap", TAP, "--to", COLLECTOR, "--key", "9"]);
    let sizes = [60, 1514, 4000, 9014];
    let out: Vec<Vec<u8>> = sizes
        .iter()
        .enumerate()
        .map(|(i, &len)| frames::frame(frames::VM_MAC, frames::PEER_MAC, i as u32, len))
        .collect();
    let into: Vec<Vec<u8>> = sizes
        .iter()
        .enumerate()
        .map(|(i, &len)| frames::frame(frames::PEER_MAC, frames::VM_MAC, 100 + i as u32, len))
        .collect();
    let fragments_before = fragments_created(&site.hv.ns);

    site.hv.vm_sends(&out);
    let (copies, fragmented) = reassembled_copies(&site.capture, out.len());
    assert!(fragmented, "copies of jumbo frames over a 1500-byte uplink were not fragmented");
    assert_frames_eq("copies of jumbo frames the VM sent", &out, &inners(&copies));
    assert!(copies.iter().all(|g| g.key == Some(18)));
    site.hv.vm_receives(&into);
    let (copies, _) = reassembled_copies(&site.capture, into.len());
    assert_frames_eq("copies of jumbo frames the VM received", &into, &inners(&copies));
    assert!(copies.iter().all(|g| g.key == Some(19)));

    let s = vmsniff::session(&site.hv.ns, id);
    assert_eq!(s["counters"]["out"]["bytes"], total_bytes(&out));
    assert_eq!(s["counters"]["in"]["bytes"], total_bytes(&into));
    assert_eq!(
        s["devices"]["out"]["tx-packets"],
        out.len() as u64,
        "one copy per frame, before fragmentation"
    );
    // 4000 B copies split in 3, 9014 B copies in 7 (1480 B of payload per fragment); the 1514 B
    // copy (1552 B on the wire) in 2: 12 per direction.
    let fragments = fragments_created(&site.hv.ns) - fragments_before;
    assert_eq!(fragments, 24, "IpFragCreates counts the fragments of the large copies");
    vmsniff::ok(&site.hv.ns, &["detach", "--all"]);
}

#[test]
fn filter_and_snaplen_shape_the_gre_copies_and_the_original_length_stays_readable() {
    if !privileged_on_every_kernel(
        "filter_and_snaplen_shape_the_gre_copies_and_the_original_length_stays_readable",
        "bpf_skb_change_tail cuts copies on the GRE device's egress, a helper each kernel implements",
    ) {
        return;
    }
    let Some(mut site) = site(1500, 9000) else {
        return;
    };
    let id = vmsniff::attach(
        &site.hv.ns,
        &["--tap", TAP, "--to", COLLECTOR, "--filter", "udp", "--snaplen", "100"],
    );
    let make = |src, dst, base: u32| -> Vec<Vec<u8>> {
        frames::sizes(16)
            .enumerate()
            .map(|(i, len)| {
                let l4 = if i % 2 == 0 { L4::Udp(5000, 5001) } else { L4::Tcp(5000, 5001) };
                frames::ipv4(src, dst, [10, 0, 0, 2], [10, 0, 0, 1], l4, base + i as u32, len.max(80))
            })
            .collect()
    };
    let out = make(VM_MAC, PEER_MAC, 0);
    let into = make(PEER_MAC, VM_MAC, 100);
    site.hv.vm_sends(&out);
    site.hv.vm_receives(&into);
    let udp: Vec<&Vec<u8>> = out.iter().chain(&into).filter(|f| f[23] == 17).collect();
    let copies = gre_copies(&site.capture, udp.len());
    let expected: Vec<Vec<u8>> = udp.iter().map(|f| f[..f.len().min(100)].to_vec()).collect();
    assert_frames_eq("GRE copies of the UDP frames, cut to 100 bytes", &expected, &inners(&copies));
    for (copy, frame) in copies.iter().zip(&udp) {
        // The README's promise: Ethernet header + the inner IPv4 total length = the frame's length.
        let total = u16::from_be_bytes([copy.inner[16], copy.inner[17]]) as usize;
        assert_eq!(14 + total, frame.len(), "the original length from the cut copy's IP header");
    }
    assert!(
        site.capture
            .drain(Duration::from_millis(500), |f| decap_gre(f).is_some_and(|g| is_marked(&g.inner)))
            .is_empty()
    );
    let s = vmsniff::session(&site.hv.ns, id);
    for direction in ["out", "in"] {
        let c = &s["counters"][direction];
        assert_eq!((c["frames"].as_u64(), c["filtered"].as_u64()), (Some(8), Some(8)), "{direction}");
        assert_eq!(c["truncated"].as_u64(), Some(4), "{direction}: the UDP frames over 100 bytes");
    }
    // Live: every frame, whole.
    vmsniff::ok(&site.hv.ns, &["update", &id.to_string(), "--no-filter", "--no-snaplen"]);
    site.hv.vm_sends(&out);
    let copies = gre_copies(&site.capture, out.len());
    assert_frames_eq("GRE copies after update --no-filter --no-snaplen", &out, &inners(&copies));
    vmsniff::ok(&site.hv.ns, &["detach", &id.to_string()]);
}
