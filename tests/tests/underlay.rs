//! Any underlay: VXLAN over IPv4 and IPv6 (this host's kernel has vxlan), GRE and ERSPAN over
//! IPv6 (ip6_gre: the VM harness's Debian kernels), end to end through the real binary and
//! `vmsniff collect`, and the underlay's bad input refused.
// Test code throughout: helpers outside `#[test]` functions fail the test by panicking too.
#![expect(clippy::unwrap_used, clippy::expect_used, reason = "a failed step fails the test")]

use std::{collections::BTreeSet, path::PathBuf, time::Duration};

use vmsniff_tests::{
    collect::{CapturedPacket, Collector, Row, read_pcapng_file, summary},
    frames::{self, L4, PEER_MAC, VM_MAC, is_marked},
    netns::Netns,
    packet::{PacketSocket, Tunneled, decap_tunnel, is_ipv4_fragment, reassemble_ipv4},
    privileged_on_every_kernel, privileged_on_host, privileged_on_host_and_one_guest, skip,
    topology::{Hypervisor, TAP, assert_frames_eq},
    vmsniff,
};

const HV4: &str = "10.231.0.1";
const COLLECTOR4: &str = "10.231.0.2";
const HV6: &str = "fd00:231::1";
const COLLECTOR6: &str = "fd00:231::2";
/// pcapng epb_flags direction bits.
const INBOUND: u32 = 1;
const OUTBOUND: u32 = 2;

/// A scratch directory inside the test's own view of the file system, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("vmsniff-underlay-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("scratch directory");
        Scratch(dir)
    }

    fn path(&self, file: &str) -> String {
        self.0.join(file).to_str().unwrap().to_owned()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A collector namespace behind uplink up1, with an IPv4 and an IPv6 address (no duplicate
/// address detection: the address works at once), and a capture on its end. IPv6 is on for
/// the uplink only (the test namespaces keep it off elsewhere, to stay quiet).
fn add_collector(hv: &Hypervisor) -> (Netns, PacketSocket) {
    let ns = Netns::new("col");
    hv.ns.sh(&format!(
        "ip link add up1 type veth peer name down1 netns {col}
         sysctl -qw net.ipv6.conf.up1.disable_ipv6=0
         ip addr add {HV4}/24 dev up1
         ip addr add {HV6}/64 dev up1 nodad
         ip link set up1 up",
        col = ns.name
    ));
    ns.sh(&format!(
        "sysctl -qw net.ipv6.conf.down1.disable_ipv6=0
         ip addr add {COLLECTOR4}/24 dev down1
         ip addr add {COLLECTOR6}/64 dev down1 nodad
         ip link set down1 up"
    ));
    let capture = PacketSocket::open(&ns, "down1");
    (ns, capture)
}

/// True where this kernel can make `kind` devices; says so and skips otherwise.
fn available(kind: &str, probe: &str) -> bool {
    let ns = Netns::new("probe");
    if !ns.try_sh(probe).0 {
        skip(&format!("this kernel cannot make {kind} devices; they are tested where it can"));
        return false;
    }
    true
}

/// `count` copies whose inner frame is the test's, decapsulated.
fn copies(capture: &PacketSocket, port: u16, count: usize) -> Vec<Tunneled> {
    raw_copies(capture, port, count).iter().filter_map(|f| decap_tunnel(f, port)).collect()
}

/// The same as Ethernet frames, IPv4 fragments reassembled (copies of full-size frames do not
/// fit the 1500-byte uplink: DF is clear, so the hypervisor fragments them).
fn raw_copies(capture: &PacketSocket, port: u16, count: usize) -> Vec<Vec<u8>> {
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let (mut raw, mut copies) = (Vec::new(), Vec::new());
    let wanted = |f: &[u8]| decap_tunnel(f, port).is_some_and(|t| is_marked(&t.inner));
    while copies.len() < count && std::time::Instant::now() < deadline {
        raw.extend(capture.capture(1, Duration::from_millis(500), |f| wanted(f) || is_ipv4_fragment(f)));
        // reassemble_ipv4 keeps IPv4 only; an IPv6 underlay's copies pass as they came.
        let v6: Vec<Vec<u8>> =
            raw.iter().filter(|f| f.get(12..14) == Some(&[0x86, 0xdd][..])).cloned().collect();
        let whole = if v6.is_empty() { reassemble_ipv4(&raw) } else { v6 };
        copies = whole.into_iter().filter(|f| wanted(f)).collect();
    }
    copies
}

fn inners(copies: &[Tunneled]) -> Vec<Vec<u8>> {
    copies.iter().map(|t| t.inner.clone()).collect()
}

fn row<'a>(rows: &'a [Row], encap: &str, session: u32, direction: &str) -> &'a Row {
    rows.iter()
        .find(|r| r.encap == encap && r.session == session && r.direction == direction)
        .unwrap_or_else(|| panic!("no summary row {encap} {session} {direction} in {rows:#?}"))
}

fn packets_in(packets: &[CapturedPacket], direction: u32) -> Vec<Vec<u8>> {
    packets.iter().filter(|p| p.direction == direction).map(|p| p.data.clone()).collect()
}

/// vmsniff's devices left in the hypervisor's namespace.
fn vmsniff_devices(hv: &Hypervisor) -> Vec<String> {
    hv.ns.link_names().into_iter().filter(|n| n.starts_with("vms") && n.contains('-')).collect()
}

#[test]
fn vxlan_copies_reach_ipv4_and_ipv6_collectors_byte_identical_with_their_vnis() {
    if !privileged_on_host_and_one_guest(
        "vxlan_copies_reach_ipv4_and_ipv6_collectors_byte_identical_with_their_vnis",
        "the kernel's vxlan device builds VNI, ports and outer header; one older kernel beside the host's",
    ) || !available("vxlan", "ip link add v0 type vxlan id 1 remote 192.0.2.1 dstport 4789")
    {
        return;
    }
    let mut hv = Hypervisor::new();
    let (col, capture) = add_collector(&hv);
    for (to, from, port, family) in [(COLLECTOR4, HV4, 4789u16, "ipv4"), (COLLECTOR6, HV6, 8472, "ipv6")] {
        let scratch = Scratch::new(family);
        let file = scratch.path("cap.pcapng");
        let port_text = port.to_string();
        let collector = Collector::start(&col, &["-w", &file, "--vxlan-port", &port_text, "--from", from]);
        let mut args =
            vec!["--tap", TAP, "--to", to, "--encap", "vxlan", "--key", "7", "--ttl", "9", "--tos", "32"];
        if port != 4789 {
            args.extend(["--port", &port_text]);
        }
        let id = vmsniff::attach(&hv.ns, &args);
        let s = vmsniff::session(&hv.ns, id);
        assert_eq!(
            (&s["encap"], &s["family"], &s["port"], &s["to"], &s["key"]),
            (&"vxlan".into(), &family.into(), &port.into(), &to.into(), &7.into()),
            "{s}"
        );

        let (mut out, mut into) = frames::both_ways(16);
        if family == "ipv6" {
            // IPv6 has no DF to clear: the kernel refuses to fragment a copy larger than the
            // uplink's MTU (checked below), so these frames fit it.
            out.retain(|f| f.len() <= 1400);
            into.retain(|f| f.len() <= 1400);
        }
        // Eight flows of UDP: the kernel picks each one's source port from its hash.
        let flows: Vec<Vec<u8>> = (0..8u16)
            .map(|i| {
                frames::ipv4(
                    VM_MAC,
                    PEER_MAC,
                    [10, 0, 0, 2],
                    [10, 0, 0, 1],
                    L4::Udp(40000 + i, 53),
                    500 + u32::from(i),
                    120,
                )
            })
            .collect();
        hv.vm_sends(&out);
        let sent = copies(&capture, port, out.len());
        assert_frames_eq(&format!("[{family}] VXLAN copies of frames the VM sent"), &out, &inners(&sent));
        for t in &sent {
            assert_eq!((t.vni, t.udp.map(|u| u.1)), (Some(14), Some(port)), "VNI 7 * 2 + 0 (out)");
            assert_eq!((t.outer_src.to_string(), t.outer_dst.to_string()), (from.to_owned(), to.to_owned()));
            assert_eq!(
                (t.ttl, t.tos, t.dont_fragment),
                (9, 32, false),
                "TTL/hop limit, TOS/traffic class, DF clear"
            );
            assert!(t.udp.is_some_and(|u| u.0 >= 49152), "source port in 49152..65535: {:?}", t.udp);
        }
        hv.vm_receives(&into);
        let received = copies(&capture, port, into.len());
        assert_frames_eq(
            &format!("[{family}] VXLAN copies of frames the VM received"),
            &into,
            &inners(&received),
        );
        assert!(received.iter().all(|t| t.vni == Some(15)), "VNI 7 * 2 + 1 (in)");
        hv.vm_sends(&flows);
        let spread = copies(&capture, port, flows.len());
        assert_frames_eq(&format!("[{family}] copies of 8 flows"), &flows, &inners(&spread));
        let ports: BTreeSet<u16> = spread.iter().filter_map(|t| t.udp.map(|u| u.0)).collect();
        eprintln!("[{family}] 8 flows left from {} UDP source ports: {ports:?}", ports.len());
        assert!(ports.len() >= 4, "[{family}] source ports vary per flow: {ports:?}");

        std::thread::sleep(Duration::from_millis(500));
        let stopped = collector.stop();
        assert!(stopped.status.success(), "[{family}] collect: {}", stopped.stderr);
        eprintln!("[{family}] vmsniff collect's stderr:\n{}", stopped.stderr);
        let (rows, _) = summary(&stopped.stderr);
        let r = row(&rows, "vxlan", 7, "out");
        assert_eq!(
            (r.packets, r.lost, &r.sender[..]),
            (out.len() as u64 + 8, None, from),
            "[{family}] {r:?}"
        );
        assert_eq!(
            (row(&rows, "vxlan", 7, "in").packets, rows.len()),
            (into.len() as u64, 2),
            "[{family}] {rows:#?}"
        );
        assert!(stopped.stderr.contains("VXLAN carries no sequence numbers"), "{}", stopped.stderr);
        let packets = read_pcapng_file(std::path::Path::new(&file));
        let mut sent_all = out.clone();
        sent_all.extend(flows.iter().cloned());
        assert_eq!(packets_in(&packets, OUTBOUND), sent_all, "[{family}] outbound, byte-identical");
        assert_eq!(packets_in(&packets, INBOUND), into, "[{family}] inbound, byte-identical");
        let name = format!("{from} session 7");
        assert!(packets.iter().all(|p| p.interface == name), "[{family}] one interface, {name}");

        if family == "ipv6" {
            // A full-size frame passes; its copy does not fit the uplink and is counted as lost.
            let big = frames::frame(VM_MAC, PEER_MAC, 99, 1514);
            hv.vm_sends(std::slice::from_ref(&big));
            std::thread::sleep(Duration::from_millis(300));
            let s = vmsniff::session(&hv.ns, id);
            assert_eq!(s["devices"]["out"]["tx-errors"], 1, "[ipv6] the copy's drop is counted: {s}");
        }
        vmsniff::ok(&hv.ns, &["detach", &id.to_string()]);
        assert!(vmsniff_devices(&hv).is_empty(), "left: {:?}", vmsniff_devices(&hv));
        assert!(!hv.ns.pin_dir().exists());
    }
}

#[test]
fn ip6gre_and_ip6erspan_copies_reach_an_ipv6_collector_and_collect() {
    if !privileged_on_every_kernel(
        "ip6gre_and_ip6erspan_copies_reach_an_ipv6_collector_and_collect",
        "each kernel's ip6_gre builds the IPv6 GRE and ERSPAN headers, hop limit and traffic class",
    ) || !available("ip6gretap", "ip link add g0 type ip6gretap remote 2001:db8::1")
    {
        return;
    }
    let mut hv = Hypervisor::new();
    let (col, capture) = add_collector(&hv);
    // IPv6 has no DF to clear and the kernel does not fragment these copies: an underlay MTU
    // with room for a full-size frame's copy, as the README advises.
    hv.ns.sh("ip link set up1 mtu 1600");
    col.sh("ip link set down1 mtu 1600");
    for encap in ["gre", "erspan", "erspan1"] {
        let scratch = Scratch::new(encap);
        let file = scratch.path("cap.pcapng");
        let collector = Collector::start(&col, &["-w", &file, "--from", "fd00:231::/64"]);
        let id = vmsniff::attach(
            &hv.ns,
            &["--tap", TAP, "--to", COLLECTOR6, "--encap", encap, "--key", "5", "--ttl", "9", "--tos", "32"],
        );
        let s = vmsniff::session(&hv.ns, id);
        assert_eq!((&s["encap"], &s["family"]), (&encap.into(), &"ipv6".into()), "{s}");
        let (out, into) = frames::both_ways(12);
        hv.vm_sends(&out);
        hv.vm_receives(&into);
        let raw = raw_copies(&capture, 0, out.len() + into.len());
        let wire: Vec<Tunneled> = raw.iter().filter_map(|f| decap_tunnel(f, 0)).collect();
        assert_eq!(wire.len(), 24, "[{encap}] every copy arrives");
        for t in &wire {
            assert_eq!(
                (t.outer_src.to_string(), t.outer_dst.to_string()),
                (HV6.to_owned(), COLLECTOR6.to_owned())
            );
            assert_eq!(t.ttl, 9, "[{encap}] the hop limit is --ttl");
            assert!(t.sequence.is_some(), "[{encap}] GRE sequence numbers");
        }
        // These test frames are neither IPv4 nor IPv6: ip6erspan gives their copies no traffic
        // class (the kernel's choice), nor does ip6gretap before Linux 6.1 (5.10's
        // ip6gre_xmit_other sends dsfield 0); copies of IPv4 frames carry it, below.
        let classes: BTreeSet<u8> = wire.iter().map(|t| t.tos).collect();
        eprintln!("[{encap}] traffic classes on the wire: {classes:?}");
        if encap == "gre" {
            let expected = if kernel_at_least(6, 1) { 32 } else { 0 };
            assert_eq!(classes, [expected].into(), "[gre] the traffic class of non-IP frames' copies");
        }
        let keys: BTreeSet<Option<u32>> = wire.iter().map(|t| t.key).collect();
        match encap {
            "gre" => assert_eq!(keys, [Some(10), Some(11)].into(), "key 5 * 2 + d"),
            _ => assert_eq!(keys, [None].into(), "ERSPAN carries no GRE key"),
        }
        std::thread::sleep(Duration::from_millis(500));
        let stopped = collector.stop();
        assert!(stopped.status.success(), "[{encap}] collect: {}", stopped.stderr);
        let (rows, _) = summary(&stopped.stderr);
        let r = row(&rows, encap, 5, "out");
        assert_eq!((r.packets, r.lost, &r.sender[..]), (12, Some(0), HV6), "[{encap}] {r:?}");
        let packets = read_pcapng_file(std::path::Path::new(&file));
        assert_eq!(packets_in(&packets, OUTBOUND), out, "[{encap}] outbound, byte-identical");
        assert_eq!(packets_in(&packets, INBOUND), into, "[{encap}] inbound, byte-identical");
        if let Some(fields) = tshark(
            &pcap_file_of(&scratch, &raw),
            &["ipv6.src", "ipv6.hlim", "erspan.spanid", "erspan.direction"],
        ) {
            for (cells, t) in fields.iter().zip(&wire) {
                assert_eq!((cells[0].as_str(), cells[1].as_str()), (HV6, "9"), "[{encap}] {cells:?}");
                if encap != "gre" {
                    assert_eq!(cells[2], "5", "[{encap}] span id = --key: {cells:?}");
                }
                if encap == "erspan" {
                    let d = u32::from(frames_number(&t.inner) >= 1000);
                    assert_eq!(flag(&cells[3]), d == 1, "[{encap}] D bit: {cells:?}");
                }
            }
        }
        // Copies of IPv4 frames carry --tos as their traffic class on every kernel and kind.
        let ip: Vec<Vec<u8>> = (0..3)
            .map(|i| {
                frames::ipv4(VM_MAC, PEER_MAC, [10, 0, 0, 2], [10, 0, 0, 1], L4::Udp(1, 2), 500 + i, 100)
            })
            .collect();
        hv.vm_sends(&ip);
        let classes: BTreeSet<u8> = raw_copies(&capture, 0, ip.len())
            .iter()
            .filter_map(|f| decap_tunnel(f, 0))
            .map(|t| t.tos)
            .collect();
        assert_eq!(classes, [32].into(), "[{encap}] IPv4 frames' copies: the traffic class is --tos");
        vmsniff::ok(&hv.ns, &["detach", &id.to_string()]);
        assert!(vmsniff_devices(&hv).is_empty(), "left: {:?}", vmsniff_devices(&hv));
    }
}

/// Whether the running kernel is at least `major.minor`.
fn kernel_at_least(major: u32, minor: u32) -> bool {
    let release = nix::sys::utsname::uname().unwrap().release().to_string_lossy().into_owned();
    let mut parts = release.split(|c: char| !c.is_ascii_digit()).filter_map(|p| p.parse::<u32>().ok());
    (parts.next().unwrap_or(0), parts.next().unwrap_or(0)) >= (major, minor)
}

/// The test frame's number (after its 14-byte Ethernet header and 8-byte marker), past any
/// ERSPAN header: found after the marker.
fn frames_number(inner: &[u8]) -> u32 {
    let at = inner.windows(8).position(|w| w == b"vmsniffT").unwrap() + 8;
    u32::from_be_bytes(inner[at..at + 4].try_into().unwrap())
}

/// tshark prints a boolean field as 1/0 or True/False, depending on its version.
fn flag(cell: &str) -> bool {
    matches!(cell, "1" | "True" | "true")
}

/// A pcap file of `frames`, for tshark.
fn pcap_file_of(scratch: &Scratch, frames: &[Vec<u8>]) -> String {
    let path = scratch.path("wire.pcap");
    let mut writer = pcap_file::pcap::PcapWriter::new(std::fs::File::create(&path).unwrap()).unwrap();
    for frame in frames {
        writer
            .write_packet(&pcap_file::pcap::PcapPacket::new(Duration::ZERO, frame.len() as u32, frame))
            .unwrap();
    }
    path
}

/// tshark's fields of each packet in `path`; `None` (saying so) where tshark is missing.
fn tshark(path: &str, fields: &[&str]) -> Option<Vec<Vec<String>>> {
    let mut cmd = std::process::Command::new("tshark");
    cmd.args(["-r", path, "-T", "fields"]);
    for f in fields {
        cmd.args(["-e", f]);
    }
    let out = match cmd.output() {
        Ok(out) => out,
        Err(e) => {
            eprintln!("!!! tshark is not installed ({e}): the wire format was not checked by it");
            return None;
        }
    };
    assert!(out.status.success(), "tshark: {}", String::from_utf8_lossy(&out.stderr));
    Some(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| l.split('\t').map(|c| c.trim().to_owned()).collect())
            .collect(),
    )
}

#[test]
fn bad_underlay_input_is_refused_and_leaves_nothing() {
    if !privileged_on_host(
        "bad_underlay_input_is_refused_and_leaves_nothing",
        "argument checks and route lookups, made before any device is created",
    ) {
        return;
    }
    let hv = Hypervisor::new();
    let (_col, _capture) = add_collector(&hv);
    // The VM's bridge carries an address: a collector behind it would see copies of copies.
    hv.ns.sh("sysctl -qw net.ipv6.conf.br0.disable_ipv6=0
         ip addr add 10.77.0.1/24 dev br0
         ip addr add fd00:77::1/64 dev br0 nodad");
    let before = hv.ns.link_names();
    let attach = |more: &[&'static str]| -> Vec<&'static str> {
        let mut args = vec!["attach", "--tap", TAP];
        args.extend_from_slice(more);
        args
    };
    for (args, needles) in [
        (attach(&["--to", "fe80::1"]), &["fe80::1 is a link-local address", "global or unique-local"][..]),
        (attach(&["--to", "ff05::2", "--encap", "vxlan"]), &["cannot be a collector", "unicast"]),
        (
            attach(&["--to", COLLECTOR4, "--encap", "vxlan", "--port", "0"]),
            &["port 0 is no destination", "4789"],
        ),
        (attach(&["--to", COLLECTOR6, "--port", "4789"]), &["it needs --encap vxlan"]),
        (attach(&["--to", "2001:db8::99", "--encap", "vxlan"]), &["no route to 2001:db8::99", "add a route"]),
        (attach(&["--to", "203.0.113.9", "--encap", "vxlan"]), &["no route to 203.0.113.9"]),
        (attach(&["--to", HV6, "--encap", "vxlan"]), &["fd00:231::1 is an address of this host"]),
        (
            attach(&["--to", "fd00:77::2", "--encap", "vxlan"]),
            &["leaves through br0", "mirrored into themselves"],
        ),
        (
            attach(&["--to", "10.77.0.2", "--encap", "vxlan"]),
            &["leaves through br0", "bridge of the mirrored tap"],
        ),
        (attach(&["--to", COLLECTOR6, "--encap", "vxlan", "--key", "8388608"]), &["too large for VXLAN"]),
        (
            attach(&["--to", COLLECTOR6, "--mode", "ovs", "--encap", "vxlan"]),
            &["--encap vxlan is eBPF mode's"],
        ),
    ] {
        let err = vmsniff::fails(&hv.ns, &args);
        for needle in needles {
            assert!(err.contains(needle), "{args:?}: {needle:?} not in {err}");
        }
        assert_eq!(hv.ns.link_names(), before, "{args:?} left a device");
        assert!(!hv.ns.pin_dir().exists(), "{args:?} left pins");
    }
}

/// Issue 19, class 7: copies routed through vmsniff's own tunnel device, or through a tap that
/// another session mirrors, would be copied again: refused like a route through the VM's
/// bridge, leaving nothing.
#[test]
fn a_collector_behind_a_vmsniff_device_or_another_mirrored_tap_is_refused() {
    if !privileged_on_host(
        "a_collector_behind_a_vmsniff_device_or_another_mirrored_tap_is_refused",
        "route lookups made before any device is created",
    ) {
        return;
    }
    let hv = Hypervisor::new();
    let (_col, _capture) = add_collector(&hv);
    let first = vmsniff::ok(&hv.ns, &["attach", "--tap", TAP, "--to", COLLECTOR4, "--encap", "vxlan"]);
    let first = first.trim();
    // A second VM's tap, mirrored by its own session.
    hv.ns.sh("ip link add tapx type veth peer name tapx-vm; ip link set tapx up; ip link set tapx-vm up");
    vmsniff::ok(&hv.ns, &["attach", "--tap", "tapx", "--to", COLLECTOR4, "--encap", "vxlan", "--key", "40"]);
    hv.ns.sh(&format!(
        "ip route add 198.51.100.9/32 dev vms{first}-out
         ip route add 198.51.100.10/32 dev tapx"
    ));
    let before = hv.ns.link_names();
    let status = vmsniff::ok(&hv.ns, &["status", "--json"]);
    for (to, needles) in [
        (
            "198.51.100.9",
            [format!("leaves through vms{first}-out"), format!("tunnel device of session {first}")],
        ),
        ("198.51.100.10", ["leaves through tapx".to_owned(), "is a tap mirrored by session".to_owned()]),
    ] {
        let err =
            vmsniff::fails(&hv.ns, &["attach", "--tap", TAP, "--to", to, "--encap", "vxlan", "--key", "50"]);
        for needle in &needles {
            assert!(err.contains(needle.as_str()), "--to {to}: {needle:?} not in {err}");
        }
        assert_eq!(hv.ns.link_names(), before, "--to {to} left a device");
        assert_eq!(vmsniff::ok(&hv.ns, &["status", "--json"]), status, "--to {to} changed a session");
    }
    vmsniff::ok(&hv.ns, &["detach", "--all"]);
}
