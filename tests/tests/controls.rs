//! Mirror controls in the kernel, through `--to-dev` on this kernel: each of `--filter`,
//! `--snaplen`, `--sample` and `--rate-limit` changes exactly what is copied and is counted,
//! `update` switches a live session without losing a frame, and bad input changes nothing.
// Test code throughout: helpers outside `#[test]` functions fail the test by panicking too.
#![expect(clippy::expect_used, reason = "a failed step fails the test")]

use std::{
    sync::atomic::{AtomicBool, Ordering},
    thread,
    time::{Duration, Instant},
};

use vmsniff_tests::{
    frames::{self, L4, PEER_MAC, VM_MAC, is_marked},
    netns::Netns,
    packet::PacketSocket,
    privileged_on_every_kernel, privileged_on_host, run,
    topology::{Hypervisor, MIRROR_DEV, TAP, assert_frames_eq},
    vmsniff,
};

const QUIET: Duration = Duration::from_millis(500);
const WAIT: Duration = Duration::from_secs(10);

fn counter(ns: &Netns, id: u32, direction: &str, name: &str) -> u64 {
    vmsniff::session(ns, id)["counters"][direction][name]
        .as_u64()
        .unwrap_or_else(|| panic!("session {id} has no counter {direction}.{name}"))
}

/// A second `--to-dev` target for a second session on the same tap.
fn second_mirror_port(ns: &Netns) -> PacketSocket {
    ns.sh("ip link add mir2 type veth peer name mir3
           ip link set mir2 up
           ip link set mir3 up");
    PacketSocket::open(ns, "mir3")
}

/// Frames from `src_mac` to `dst_mac` of every kind the filter tests tell apart, numbered from
/// `base`: (name, frame).
fn kinds(src_mac: [u8; 6], dst_mac: [u8; 6], base: u32) -> Vec<(&'static str, Vec<u8>)> {
    let v6 = |last: u8| {
        let mut a = [0u8; 16];
        a[..2].copy_from_slice(&[0x20, 0x01]);
        a[15] = last;
        a
    };
    let in_10 = frames::ipv4(src_mac, dst_mac, [10, 1, 2, 3], [10, 9, 9, 9], L4::Tcp(40000, 443), base, 200);
    vec![
        ("tcp 10/8 port 443", in_10.clone()),
        (
            "tcp 10/8 port 80",
            frames::ipv4(src_mac, dst_mac, [10, 1, 2, 3], [10, 9, 9, 9], L4::Tcp(40000, 80), base + 1, 300),
        ),
        (
            "tcp 192.168/16 port 443",
            frames::ipv4(
                src_mac,
                dst_mac,
                [192, 168, 1, 1],
                [192, 168, 1, 2],
                L4::Tcp(40000, 443),
                base + 2,
                120,
            ),
        ),
        (
            "ip6 tcp port 443",
            frames::ipv6(src_mac, dst_mac, v6(1), v6(2), L4::Tcp(40000, 443), base + 3, 200),
        ),
        (
            "udp port 5050",
            frames::ipv4(src_mac, dst_mac, [10, 1, 2, 3], [10, 9, 9, 9], L4::Udp(5050, 5050), base + 4, 90),
        ),
        ("icmp", frames::ipv4(src_mac, dst_mac, [10, 1, 2, 3], [10, 9, 9, 9], L4::Icmp, base + 5, 98)),
        ("arp", frames::arp(src_mac, base + 6)),
        (
            "vlan 100 tcp 10/8 port 443",
            frames::vlan(
                100,
                &frames::ipv4(
                    src_mac,
                    dst_mac,
                    [10, 1, 2, 3],
                    [10, 9, 9, 9],
                    L4::Tcp(40000, 443),
                    base + 7,
                    200,
                ),
            ),
        ),
        (
            "vlan 200 host 172.19.1.3",
            frames::vlan(
                200,
                &frames::ipv4(src_mac, dst_mac, [172, 19, 1, 3], [10, 9, 9, 9], L4::Udp(1, 2), base + 8, 200),
            ),
        ),
        (
            "vlan 100 host 172.19.1.3",
            frames::vlan(
                100,
                &frames::ipv4(src_mac, dst_mac, [172, 19, 1, 3], [10, 9, 9, 9], L4::Udp(1, 2), base + 9, 200),
            ),
        ),
    ]
}

/// The filter as tcpdump compiles it, to judge frames as it would (on the wire, tags included).
fn libpcap_filter(expression: &str) -> pcap::BpfProgram {
    let capture = pcap::Capture::dead(pcap::Linktype::ETHERNET).expect("libpcap");
    capture.compile(expression, true).expect("libpcap compiles the test's filter")
}

/// Sends each frame from the VM, then each to the VM, and checks that every one arrives
/// untouched (a tagged frame arrives with its tag in the skb, which a packet socket does not
/// show, so it is compared untagged there).
fn exchange(hv: &mut Hypervisor, out: &[Vec<u8>], into: &[Vec<u8>]) {
    for frame in out {
        hv.port.vm.send(frame);
    }
    let got = hv.port.peer.capture(out.len(), WAIT, is_marked);
    let expected: Vec<Vec<u8>> = out.iter().map(|f| frames::untag(f)).collect();
    assert_frames_eq("frames the VM sent, at the peer", &expected, &got);
    for frame in into {
        hv.port.peer.send(frame);
    }
    let got = hv.port.vm.recv_marked(into.len(), WAIT);
    assert_frames_eq("frames sent to the VM, at the VM", into, &got);
}

#[test]
fn filters_select_exactly_the_frames_tcpdump_would_both_ways() {
    if !privileged_on_every_kernel(
        "filters_select_exactly_the_frames_tcpdump_would_both_ways",
        "the filter interpreter must pass each kernel's verifier, and reads the packet directly and \
         the VLAN tag from the skb's metadata, which kernels lay out differently",
    ) {
        return;
    }
    for mode in vmsniff::attach_modes() {
        vmsniff::report_mode(mode);
        let mut hv = Hypervisor::new();
        let first = hv.mirror_port();
        let second = second_mirror_port(&hv.ns);
        // libpcap's `vlan` shifts every test after it, across `or`: it comes last here, as an
        // operator who knows tcpdump writes it.
        let sessions = [
            ("tcp port 443 and net 10.0.0.0/8", &first, MIRROR_DEV),
            ("icmp or udp portrange 5000-5100 or arp or (vlan 100 and host 172.19.1.3)", &second, "mir2"),
        ];
        let ids: Vec<u32> = sessions
            .iter()
            .map(|(filter, _, dev)| {
                vmsniff::attach(
                    &hv.ns,
                    &["--tap", TAP, "--to-dev", dev, "--attach-mode", mode, "--filter", filter],
                )
            })
            .collect();
        // What the expressions mean, checked below against libpcap's own verdicts.
        let selected =
            [vec!["tcp 10/8 port 443"], vec!["udp port 5050", "icmp", "arp", "vlan 100 host 172.19.1.3"]];
        let out = kinds(VM_MAC, PEER_MAC, 0);
        let into = kinds(PEER_MAC, VM_MAC, 100);
        let frames_of = |list: &[(&str, Vec<u8>)]| list.iter().map(|(_, f)| f.clone()).collect::<Vec<_>>();
        exchange(&mut hv, &frames_of(&out), &frames_of(&into));

        for (((filter, port, _), id), wanted) in sessions.iter().zip(&ids).zip(&selected) {
            let libpcap = libpcap_filter(filter);
            for (name, frame) in out.iter().chain(&into) {
                assert_eq!(
                    libpcap.filter(frame),
                    wanted.contains(name),
                    "libpcap's verdict on {name} for {filter:?}"
                );
            }
            let pick = |list: &[(&str, Vec<u8>)]| -> Vec<Vec<u8>> {
                list.iter().filter(|(name, _)| wanted.contains(name)).map(|(_, f)| frames::untag(f)).collect()
            };
            let mut expected = pick(&out);
            expected.extend(pick(&into));
            let copies = port.drain(QUIET * 2, is_marked);
            assert_frames_eq(&format!("[{mode}] copies for --filter {filter:?}"), &expected, &copies);
            for direction in ["out", "in"] {
                let (frames, filtered) =
                    (counter(&hv.ns, *id, direction, "frames"), counter(&hv.ns, *id, direction, "filtered"));
                assert_eq!(
                    (frames, filtered),
                    (wanted.len() as u64, (out.len() - wanted.len()) as u64),
                    "[{mode}] session {id} ({filter:?}) {direction}: frames and filtered"
                );
            }
            assert_eq!(vmsniff::session(&hv.ns, *id)["filter"], *filter);
        }
        vmsniff::ok(&hv.ns, &["detach", "--all"]);
    }
}

#[test]
fn a_snaplen_the_kernel_will_not_cut_to_drops_the_copy_never_sends_it_whole() {
    if !privileged_on_host(
        "a_snaplen_the_kernel_will_not_cut_to_drops_the_copy_never_sends_it_whole",
        "bpf_skb_change_tail's floor (the transport header) is the same on every kernel vmsniff supports",
    ) {
        return;
    }
    let mut hv = Hypervisor::new();
    let mirror = hv.mirror_port();
    // 20 bytes: within an IPv4 UDP frame's headers, which the kernel keeps whole.
    let id = vmsniff::attach(&hv.ns, &["--tap", TAP, "--to-dev", MIRROR_DEV, "--snaplen", "20"]);
    let udp = |src: [u8; 6], dst: [u8; 6], seq: u32| {
        frames::ipv4(src, dst, [10, 1, 2, 3], [10, 9, 9, 9], L4::Udp(4000, 5000), seq, 300)
    };
    let out: Vec<Vec<u8>> = (0..8).map(|i| udp(VM_MAC, PEER_MAC, i)).collect();
    let into: Vec<Vec<u8>> = (0..8).map(|i| udp(PEER_MAC, VM_MAC, 100 + i)).collect();
    hv.vm_sends(&out);
    hv.vm_receives(&into);
    // Cut copies lose the marker: any frame of the VM's addresses on the mirror is a copy.
    let ours = |f: &[u8]| f.len() >= 12 && (f[6..12] == VM_MAC || f[6..12] == PEER_MAC);
    let copies = mirror.drain(QUIET, ours);
    assert!(
        copies.is_empty(),
        "copies left uncut or cut: {:?}",
        copies.iter().map(Vec::len).collect::<Vec<_>>()
    );
    let refused =
        counter(&hv.ns, id, "out", "snaplen-refused") + counter(&hv.ns, id, "in", "snaplen-refused");
    assert_eq!(refused, 16, "every copy is counted as refused");
    let clone_errors = counter(&hv.ns, id, "out", "clone-errors") + counter(&hv.ns, id, "in", "clone-errors");
    assert_eq!(clone_errors, 0, "a refused copy is counted once, as refused, not as a clone error too");
    // Frames whose headers fit the snaplen are still cut and sent.
    let short: Vec<Vec<u8>> = (0..4).map(|i| frames::frame(VM_MAC, PEER_MAC, 500 + i, 200)).collect();
    hv.vm_sends(&short);
    let expected: Vec<Vec<u8>> = short.iter().map(|f| f[..20].to_vec()).collect();
    assert_frames_eq("cut copies", &expected, &mirror.capture(4, WAIT, ours));
    vmsniff::ok(&hv.ns, &["detach", &id.to_string()]);
}

#[test]
fn a_copy_into_a_mirrored_device_keeps_its_snaplen_whichever_program_runs_there_first() {
    if !privileged_on_host(
        "a_copy_into_a_mirrored_device_keeps_its_snaplen_whichever_program_runs_there_first",
        "the order of programs on a hook and the per-CPU slot that names the copy in flight are \
         the same on every kernel",
    ) {
        return;
    }
    for mode in vmsniff::attach_modes() {
        vmsniff::report_mode(mode);
        let mut hv = Hypervisor::new();
        let mirror = hv.mirror_port();
        let second = second_mirror_port(&hv.ns);
        // Session A cuts its copies of the VM's frames to 100 bytes on their way out of mir0 ...
        let a = vmsniff::attach(
            &hv.ns,
            &["--tap", TAP, "--to-dev", MIRROR_DEV, "--snaplen", "100", "--attach-mode", mode],
        );
        // ... and session B, attached after A, mirrors mir0 itself (a monitoring VM's tap that
        // is mirrored too): its program runs on mir0's egress before A's copy program, and
        // copies each of A's copies (whole) into mir2 before A's program has cut it.
        let b = vmsniff::attach(
            &hv.ns,
            &["--tap", MIRROR_DEV, "--to-dev", "mir2", "--direction", "in", "--attach-mode", mode],
        );
        let out: Vec<Vec<u8>> = (0..8).map(|i| frames::frame(VM_MAC, PEER_MAC, i, 300)).collect();
        hv.vm_sends(&out);
        let cut: Vec<Vec<u8>> = out.iter().map(|f| f[..100].to_vec()).collect();
        assert_frames_eq("A's copies, cut by A's snaplen", &cut, &mirror.capture(out.len(), WAIT, is_marked));
        assert!(mirror.drain(QUIET, is_marked).is_empty(), "extra copies of A's");
        let b_copies = second.capture(out.len(), WAIT, is_marked);
        assert_eq!(b_copies.len(), out.len(), "B copies each of A's copies once");
        assert_eq!(counter(&hv.ns, a, "out", "truncated"), 8, "A's copies are counted as cut");
        assert_eq!(counter(&hv.ns, b, "in", "truncated"), 0, "B has no snaplen: none of its copies is cut");
        vmsniff::ok(&hv.ns, &["detach", "--all"]);
    }
}

/// Whether vmsniff's copy program is on the target's egress hook, and whether a clsact qdisc is.
fn copy_program_on_target(ns: &Netns) -> (bool, bool) {
    let filters = run("tc", &["-n", &ns.name, "filter", "show", "dev", MIRROR_DEV, "egress"]);
    let qdiscs = run("tc", &["-n", &ns.name, "qdisc", "show", "dev", MIRROR_DEV]);
    // The kernel's name for a program loaded from its pin is cut to 15 bytes.
    (filters.contains("vmsniff_copy_eg"), qdiscs.contains("clsact"))
}

#[test]
fn snaplen_cuts_the_copies_never_the_vm_frames_and_update_changes_it_live() {
    if !privileged_on_host(
        "snaplen_cuts_the_copies_never_the_vm_frames_and_update_changes_it_live",
        "the counts and the update are vmsniff's; the kernel's bpf_skb_change_tail cuts copies in \
         every guest in gre/filter_and_snaplen_shape_the_gre_copies_and_the_original_length_stays_readable",
    ) {
        return;
    }
    for mode in vmsniff::attach_modes() {
        vmsniff::report_mode(mode);
        let mut hv = Hypervisor::new();
        let mirror = hv.mirror_port();
        // No snaplen at first: nothing of vmsniff's on the copies' way out of the target.
        let id = vmsniff::attach(&hv.ns, &["--tap", TAP, "--to-dev", MIRROR_DEV, "--attach-mode", mode]);
        let id_text = id.to_string();
        for (round, snaplen) in [None, Some(100usize), Some(200), None].into_iter().enumerate() {
            match (round, snaplen) {
                (0, _) => {}
                (_, Some(n)) => {
                    vmsniff::ok(&hv.ns, &["update", &id_text, "--snaplen", &n.to_string()]);
                }
                (_, None) => {
                    vmsniff::ok(&hv.ns, &["update", &id_text, "--no-snaplen"]);
                }
            }
            let truncated_before =
                counter(&hv.ns, id, "out", "truncated") + counter(&hv.ns, id, "in", "truncated");
            let base = 1000 * round as u32;
            let out: Vec<Vec<u8>> = frames::sizes(16)
                .enumerate()
                .map(|(i, len)| frames::frame(VM_MAC, PEER_MAC, base + i as u32, len))
                .collect();
            let into: Vec<Vec<u8>> = frames::sizes(16)
                .enumerate()
                .map(|(i, len)| frames::frame(PEER_MAC, VM_MAC, base + 500 + i as u32, len))
                .collect();
            // The VM's frames arrive whole: vm_sends and vm_receives compare them byte for byte.
            hv.vm_sends(&out);
            hv.vm_receives(&into);
            let cut = |f: &Vec<u8>| f[..snaplen.map_or(f.len(), |n| n.min(f.len()))].to_vec();
            let expected: Vec<Vec<u8>> = out.iter().chain(&into).map(cut).collect();
            let copies = mirror.capture(expected.len(), WAIT, is_marked);
            assert_frames_eq(&format!("copies with snaplen {snaplen:?}"), &expected, &copies);
            assert!(mirror.drain(QUIET, is_marked).is_empty(), "extra copies with snaplen {snaplen:?}");
            let longer =
                out.iter().chain(&into).filter(|f| snaplen.is_some_and(|n| f.len() > n)).count() as u64;
            let truncated = counter(&hv.ns, id, "out", "truncated") + counter(&hv.ns, id, "in", "truncated");
            assert_eq!(truncated - truncated_before, longer, "truncated count with snaplen {snaplen:?}");
            let expected_snaplen = snaplen.map_or(serde_json::Value::Null, |n| n.into());
            assert_eq!(vmsniff::session(&hv.ns, id)["snaplen"], expected_snaplen);
            // The copy program (and the clsact qdisc vmsniff adds for it) is there exactly
            // while a snaplen asks for it.
            assert_eq!(
                copy_program_on_target(&hv.ns),
                (snaplen.is_some(), snaplen.is_some()),
                "(copy program, clsact) on {MIRROR_DEV} with snaplen {snaplen:?}"
            );
        }
        vmsniff::ok(&hv.ns, &["update", &id_text, "--snaplen", "100"]);
        assert_eq!(copy_program_on_target(&hv.ns), (true, true), "after a second --snaplen");
        // The copy program's filter on the target goes with the session, and so does the clsact
        // qdisc vmsniff added there.
        vmsniff::ok(&hv.ns, &["detach", &id_text]);
        let qdiscs = run("tc", &["-n", &hv.ns.name, "qdisc", "show", "dev", MIRROR_DEV]);
        assert!(!qdiscs.contains("clsact"), "the target's clsact qdisc is left: {qdiscs}");
    }
}

#[test]
fn update_switches_the_filter_without_losing_a_vm_frame_or_a_matching_copy() {
    if !privileged_on_host(
        "update_switches_the_filter_without_losing_a_vm_frame_or_a_matching_copy",
        "an update is one write of a map the programs read, the same on every kernel",
    ) {
        return;
    }
    for mode in vmsniff::attach_modes() {
        vmsniff::report_mode(mode);
        let mut hv = Hypervisor::new();
        let mirror = hv.mirror_port();
        let id = vmsniff::attach(
            &hv.ns,
            &["--tap", TAP, "--to-dev", MIRROR_DEV, "--filter", "udp port 1000", "--attach-mode", mode],
        );
        // Even frames go to port 1000 (the old filter's), odd ones to port 2000 (the new one's).
        let port = |seq: u32| if seq.is_multiple_of(2) { 1000 } else { 2000 };
        let frame = |seq: u32| {
            frames::ipv4(
                VM_MAC,
                PEER_MAC,
                [10, 0, 0, 2],
                [10, 0, 0, 1],
                L4::Udp(port(seq), port(seq)),
                seq,
                80,
            )
        };
        // The VM sends from before the update until well after it, however long the update takes
        // (seconds on an emulated CPU).
        let updated = AtomicBool::new(false);
        let mut sent: Vec<Vec<u8>> = Vec::new();
        let Hypervisor { ns, port: vm_port } = &mut hv;
        thread::scope(|scope| {
            scope.spawn(|| {
                thread::sleep(Duration::from_millis(100));
                vmsniff::ok(ns, &["update", &id.to_string(), "--filter", "udp port 2000"]);
                updated.store(true, Ordering::SeqCst);
            });
            let (mut after, started) = (0, Instant::now());
            while after < 500 {
                // The peer's socket buffer holds about 60000 of these frames.
                assert!(
                    sent.len() < 50_000 && started.elapsed() < Duration::from_secs(120),
                    "the update did not finish while the VM sent {} frames in {:?}",
                    sent.len(),
                    started.elapsed()
                );
                if updated.load(Ordering::SeqCst) {
                    after += 1;
                }
                let next = frame(sent.len() as u32);
                vm_port.vm.send(&next);
                sent.push(next);
                if sent.len().is_multiple_of(20) {
                    thread::sleep(Duration::from_millis(5));
                }
            }
        });
        let arrived = hv.port.peer.capture(sent.len(), WAIT, is_marked);
        assert_frames_eq("frames the VM sent, at the peer", &sent, &arrived);
        let copies = mirror.drain(QUIET * 2, is_marked);
        // The copies must be the old filter's matches up to some frame k, then the new filter's:
        // 0, 2, 4, ..., then every odd frame from k on to the last.
        let seqs: Vec<usize> = copies
            .iter()
            .map(|c| {
                let seq = u32::from_be_bytes(c[50..54].try_into().unwrap()) as usize;
                assert_eq!(c, &sent[seq], "copy of frame {seq} differs from the frame");
                seq
            })
            .collect();
        let evens = seqs.iter().take_while(|s| *s % 2 == 0).count();
        let odds = &seqs[evens..];
        assert!(
            seqs[..evens].iter().enumerate().all(|(i, s)| *s == 2 * i),
            "a copy before the switch is missing"
        );
        let first_odd = *odds.first().expect("no copy after the switch");
        assert!(
            first_odd <= 2 * evens + 1,
            "copies of frames {}..{first_odd} are missing at the switch",
            2 * evens
        );
        assert!(
            odds.iter().enumerate().all(|(i, s)| *s == first_odd + 2 * i),
            "a copy after the switch is missing"
        );
        let last_odd = if sent.len().is_multiple_of(2) { sent.len() - 1 } else { sent.len() - 2 };
        assert_eq!(*odds.last().unwrap(), last_odd, "copies of the last frames are missing");
        assert!(evens > 0, "no copy before the switch: the update landed before the stream");
        eprintln!(
            "controls: filter switched between frames {} and {first_odd} of {}",
            2 * (evens - 1),
            sent.len()
        );
        assert_eq!(vmsniff::session(&hv.ns, id)["filter"], "udp port 2000");
        assert_eq!(counter(&hv.ns, id, "out", "frames"), copies.len() as u64);
        assert_eq!(counter(&hv.ns, id, "out", "filtered"), (sent.len() - copies.len()) as u64);
    }
}

#[test]
fn sampling_copies_about_one_in_n_and_counts_the_rest() {
    if !privileged_on_host(
        "sampling_copies_about_one_in_n_and_counts_the_rest",
        "the sampling decision and its counters are the programs' own logic",
    ) {
        return;
    }
    for mode in vmsniff::attach_modes() {
        vmsniff::report_mode(mode);
        let mut hv = Hypervisor::new();
        let mirror = hv.mirror_port();
        let id = vmsniff::attach(
            &hv.ns,
            &[
                "--tap",
                TAP,
                "--to-dev",
                MIRROR_DEV,
                "--direction",
                "out",
                "--sample",
                "4",
                "--attach-mode",
                mode,
            ],
        );
        let sent: Vec<Vec<u8>> = (0..800u32).map(|i| frames::frame(VM_MAC, PEER_MAC, i, 60)).collect();
        hv.vm_sends(&sent);
        let copies = mirror.drain(QUIET * 2, is_marked);
        // Binomial(800, 1/4): mean 200, standard deviation about 12; 120..280 is over 6 of them.
        assert!((120..=280).contains(&copies.len()), "{} copies of 800 frames at --sample 4", copies.len());
        let mut rest = sent.iter();
        assert!(
            copies.iter().all(|c| rest.any(|s| s == c)),
            "the copies are not a subsequence of the frames, in order"
        );
        let (frames, sampled_out) =
            (counter(&hv.ns, id, "out", "frames"), counter(&hv.ns, id, "out", "sampled-out"));
        assert_eq!((frames, frames + sampled_out), (copies.len() as u64, 800));
        eprintln!("controls: --sample 4 copied {} of 800", copies.len());
    }
}

#[test]
fn a_rate_limit_caps_the_copies_of_a_flood_and_never_the_vm() {
    if !privileged_on_host(
        "a_rate_limit_caps_the_copies_of_a_flood_and_never_the_vm",
        "the token bucket is the programs' own arithmetic",
    ) {
        return;
    }
    for mode in vmsniff::attach_modes() {
        vmsniff::report_mode(mode);
        let mut hv = Hypervisor::new();
        let mirror = hv.mirror_port();
        // 200 copies per second; the burst is 100 ms of that, at least 8: 20.
        let id = vmsniff::attach(
            &hv.ns,
            &[
                "--tap",
                TAP,
                "--to-dev",
                MIRROR_DEV,
                "--direction",
                "out",
                "--rate-limit",
                "200pps",
                "--attach-mode",
                mode,
            ],
        );
        let sent: Vec<Vec<u8>> = (0..3000u32).map(|i| frames::frame(VM_MAC, PEER_MAC, i, 200)).collect();
        let started = Instant::now();
        hv.vm_sends(&sent);
        let elapsed = started.elapsed();
        let copies = mirror.drain(QUIET * 2, is_marked);
        // Tolerance: the burst, the rate over the flood's duration, and one refill race per CPU.
        let cpus = thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        let allowed = (20.0 + 200.0 * elapsed.as_secs_f64() + 2.0 * cpus).ceil() as usize;
        assert!(
            copies.len() <= allowed && !copies.is_empty(),
            "{} copies of a {}-frame flood over {elapsed:?} at 200pps (at most {allowed})",
            copies.len(),
            sent.len()
        );
        let (frames, limited) =
            (counter(&hv.ns, id, "out", "frames"), counter(&hv.ns, id, "out", "rate-limited"));
        assert_eq!((frames, frames + limited), (copies.len() as u64, sent.len() as u64));
        eprintln!(
            "controls: --rate-limit 200pps let {} of {} copies through in {elapsed:?} (limit {allowed})",
            copies.len(),
            sent.len()
        );
        // Lifting the limit lets every copy through again.
        vmsniff::ok(&hv.ns, &["update", &id.to_string(), "--no-rate-limit"]);
        hv.vm_sends(&sent[..200]);
        assert_eq!(mirror.drain(QUIET * 2, is_marked).len(), 200, "copies after --no-rate-limit");
    }
}

#[test]
fn bad_controls_are_refused_and_change_nothing() {
    if !privileged_on_host(
        "bad_controls_are_refused_and_change_nothing",
        "argument checks and messages, made before the session's map entry is written",
    ) {
        return;
    }
    for mode in vmsniff::attach_modes() {
        vmsniff::report_mode(mode);
        let hv = Hypervisor::new();
        hv.mirror_port();
        let before = hv.ns.link_names();
        let attach = |extra: &[&str]| {
            let mut args = vec!["attach", "--tap", TAP, "--to-dev", MIRROR_DEV, "--attach-mode", mode];
            args.extend_from_slice(extra);
            vmsniff::fails(&hv.ns, &args)
        };
        let too_long = vec!["tcp port 1"; 200].join(" or ");
        for (extra, wanted) in [
            (vec!["--filter", "tcp port"], "--filter"),
            (vec!["--filter", "ether proto \\ip and"], "--filter"),
            (vec!["--filter", &too_long], "--filter"),
            (vec!["--snaplen", "0"], "--snaplen"),
            (vec!["--snaplen", "65536"], "65535"),
            (vec!["--sample", "0"], "--sample"),
            (vec!["--rate-limit", "10mbits"], "--rate-limit"),
            (vec!["--rate-limit", "0pps"], "--rate-limit"),
        ] {
            let error = attach(&extra);
            assert!(error.contains(wanted), "{extra:?}: the error does not name {wanted}: {error}");
            assert!(!hv.ns.pin_dir().exists(), "{extra:?} left pins");
            for dev in [TAP, MIRROR_DEV] {
                let qdiscs = run("tc", &["-n", &hv.ns.name, "qdisc", "show", "dev", dev]);
                assert!(!qdiscs.contains("clsact"), "{extra:?} left a clsact qdisc on {dev}: {qdiscs}");
            }
            assert_eq!(hv.ns.link_names(), before, "{extra:?} changed the interfaces");
        }

        // A bad update leaves the session as it was.
        let id = vmsniff::attach(
            &hv.ns,
            &[
                "--tap",
                TAP,
                "--to-dev",
                MIRROR_DEV,
                "--filter",
                "udp",
                "--snaplen",
                "64",
                "--attach-mode",
                mode,
            ],
        );
        let id_text = id.to_string();
        let session_before = vmsniff::session(&hv.ns, id);
        for (extra, wanted) in [
            (vec!["--filter", "udp port"], "--filter"),
            (vec!["--snaplen", "0"], "--snaplen"),
            (vec!["--sample", "0"], "--sample"),
            (vec![], "nothing to change"),
            (vec!["--filter", "tcp", "--no-filter"], "--no-filter"),
        ] {
            let mut args = vec!["update", id_text.as_str()];
            args.extend_from_slice(&extra);
            let error = vmsniff::fails(&hv.ns, &args);
            assert!(error.contains(wanted), "update {extra:?}: the error does not name {wanted}: {error}");
            let session = vmsniff::session(&hv.ns, id);
            for field in ["filter", "snaplen", "sample", "rate-limit", "state"] {
                assert_eq!(session[field], session_before[field], "update {extra:?} changed {field}");
            }
        }
        let error = vmsniff::fails(&hv.ns, &["update", "77", "--sample", "2"]);
        assert!(error.contains("no session 77"), "update of a missing session: {error}");
        vmsniff::ok(&hv.ns, &["detach", &id_text]);
    }
}
