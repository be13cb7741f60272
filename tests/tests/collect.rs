//! `vmsniff collect`: hand-made GRE and ERSPAN from a sender namespace (any kernel: a raw socket
//! needs no ip_gre), and end to end from `vmsniff attach --encap gre|erspan|erspan1` (needs
//! ip_gre: runs in the VM harness's Debian kernels, and skips saying so elsewhere).
// Test code throughout: helpers outside `#[test]` functions fail the test by panicking too.
#![expect(clippy::unwrap_used, clippy::expect_used, reason = "a failed step fails the test")]

use std::{path::PathBuf, time::Duration};

use nix::sys::signal::Signal;
use vmsniff_tests::{
    collect::{
        CapturedPacket, Collector, GreSender, Row, closing_count, erspan2, erspan3, gre, read_pcapng,
        read_pcapng_file, summary, tools_count,
    },
    frames::{self, PEER_MAC, VM_MAC, is_marked},
    netns::Netns,
    packet::{PacketSocket, decap_gre},
    privileged_on_every_kernel, privileged_on_host, skip,
    topology::{Hypervisor, TAP},
    vmsniff,
};

const TEB: u16 = 0x6558;
const ERSPAN_II: u16 = 0x88be;
const ERSPAN_III: u16 = 0x22eb;
/// pcapng epb_flags direction bits.
const INBOUND: u32 = 1;
const OUTBOUND: u32 = 2;

/// A scratch directory inside the test's own view of the file system (a guest's /tmp is its
/// own tmpfs), removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("vmsniff-collect-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("scratch directory");
        Scratch(dir)
    }

    fn path(&self, file: &str) -> PathBuf {
        self.0.join(file)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A sender namespace with `senders` (in 10.240.0.0/24) on a veth to a collector namespace at
/// 10.240.0.2.
fn sender_and_collector(senders: &[&str]) -> (Netns, Netns) {
    let sender_ns = Netns::new("snd");
    let collector_ns = Netns::new("col");
    sender_ns.sh(&format!("ip link add snd0 type veth peer name col0 netns {}", collector_ns.name));
    for sender in senders {
        sender_ns.sh(&format!("ip addr add {sender}/24 dev snd0"));
    }
    sender_ns.sh("ip link set snd0 up");
    collector_ns.sh("ip addr add 10.240.0.2/24 dev col0; ip link set col0 up");
    // The collector's link address, known from the start: the first copies would otherwise
    // wait for ARP while copies sent from another CPU overtake them.
    let mac = collector_ns.sh("cat /sys/class/net/col0/address");
    sender_ns.sh(&format!("ip neigh replace 10.240.0.2 lladdr {} dev snd0 nud permanent", mac.trim()));
    (sender_ns, collector_ns)
}

/// `count` senders from 10.240.0.10 on, each with its GRE socket, and both namespaces.
fn senders_and_collector(count: u8) -> (Vec<String>, Vec<GreSender>, Netns, Netns) {
    let senders: Vec<[u8; 4]> = (10..10 + count).map(|i| [10, 240, 0, i]).collect();
    let names: Vec<String> = senders.iter().map(|s| std::net::Ipv4Addr::from(*s).to_string()).collect();
    let (sender_ns, collector_ns) =
        sender_and_collector(&names.iter().map(String::as_str).collect::<Vec<_>>());
    let sockets = senders.iter().map(|s| GreSender::open(&sender_ns, *s)).collect();
    (names, sockets, sender_ns, collector_ns)
}

fn row<'a>(rows: &'a [Row], encap: &str, session: u32, direction: &str) -> &'a Row {
    rows.iter()
        .find(|r| r.encap == encap && r.session == session && r.direction == direction)
        .unwrap_or_else(|| panic!("no summary row {encap} {session} {direction} in {rows:#?}"))
}

/// Keeps the calling thread on one CPU (`cpu` modulo the CPUs there are). Copies sent from one
/// CPU arrive in the order sent; a thread that moves to another CPU mid-burst leaves some in
/// the first CPU's backlog, and the stack delivers the two backlogs out of order.
fn pin_to_cpu(cpu: usize) {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut set = nix::sched::CpuSet::new();
    set.set(cpu % cpus).unwrap();
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set).unwrap();
}

#[test]
fn collect_decodes_each_encapsulation_and_counts_garbage_and_strangers() {
    if !privileged_on_host(
        "collect_decodes_each_encapsulation_and_counts_garbage_and_strangers",
        "collect decodes what a raw socket receives, in user space",
    ) {
        return;
    }
    let (sender_ns, collector_ns) = sender_and_collector(&["10.240.0.1", "10.240.0.3"]);
    let scratch = Scratch::new("handmade");
    let file = scratch.path("cap.pcapng");
    let collector = Collector::start(
        &collector_ns,
        &["-w", file.to_str().unwrap(), "--from", "10.240.0.1/32", "--plain-gre"],
    );
    // A second collector at once, to stdout, stopping by itself after 4 copies.
    let mut piped = Collector::start(&collector_ns, &["-w", "-", "-c", "4"]);

    let to = [10, 240, 0, 2];
    let listed = GreSender::open(&sender_ns, [10, 240, 0, 1]);
    let stranger = GreSender::open(&sender_ns, [10, 240, 0, 3]);
    let frame = |seq: u32, len| frames::frame(VM_MAC, PEER_MAC, seq, len);
    let mut expected: Vec<(String, Vec<u8>, u32)> = Vec::new();
    // vmsniff GRE, key 4: out numbered 10..=15 without 13 (one lost copy), in 100..=102.
    for (i, seq) in [10, 11, 12, 14, 15].into_iter().enumerate() {
        let f = frame(i as u32, 60 + i * 100);
        listed.send(to, &gre(Some(4 * 2), Some(seq), TEB, &f));
        expected.push(("10.240.0.1 session 4".into(), f, OUTBOUND));
    }
    for seq in 100..=102 {
        let f = frame(1000 + seq, 1514);
        listed.send(to, &gre(Some(4 * 2 + 1), Some(seq), TEB, &f));
        expected.push(("10.240.0.1 session 4".into(), f, INBOUND));
    }
    // ERSPAN III span 9, egress (in); ERSPAN II span 10, index 0 (out); a plain GRE mirror
    // (recorded: --plain-gre).
    for seq in 1..=2 {
        let f = frame(2000 + seq, 200);
        let mut payload = erspan3(9, 1, 5);
        payload.extend_from_slice(&f);
        listed.send(to, &gre(None, Some(seq), ERSPAN_III, &payload));
        expected.push(("10.240.0.1 session 9".into(), f, INBOUND));
    }
    for seq in 1..=2 {
        let f = frame(3000 + seq, 300);
        let mut payload = erspan2(10, 0);
        payload.extend_from_slice(&f);
        listed.send(to, &gre(None, Some(seq), ERSPAN_II, &payload));
        expected.push(("10.240.0.1 session 10".into(), f, OUTBOUND));
    }
    let f = frame(4000, 100);
    listed.send(to, &gre(Some(77), None, TEB, &f));
    expected.push(("10.240.0.1 gre key 77".into(), f.clone(), 0));

    // Malformed: truncated GRE, an unknown protocol, ERSPAN with a bad version, and garbage.
    listed.send(to, &[0x30, 0x00, 0x65]);
    listed.send(to, &gre(Some(8), Some(1), 0x0800, &f));
    let mut bad = erspan3(9, 0, 0);
    bad[0] = 0x70;
    bad.extend_from_slice(&f);
    listed.send(to, &gre(None, Some(3), ERSPAN_III, &bad));
    let mut x: u32 = 0x9e37_79b9;
    for _ in 0..300 {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        let mut junk: Vec<u8> = (0..4 + x % 200).map(|i| (x.rotate_left(i)) as u8).collect();
        // Protocol 0: garbage whatever its flags say.
        junk[2] = 0;
        junk[3] = 0;
        listed.send(to, &junk);
    }
    // A flood of well-formed copies from a sender outside --from.
    for seq in 0..300 {
        stranger.send(to, &gre(Some(4 * 2), Some(seq), TEB, &frame(5000 + seq, 60)));
    }

    let piped_out = piped.wait(Duration::from_secs(30));
    assert!(piped_out.status.success(), "collect -w - -c 4: {}", piped_out.stderr);
    let streamed = read_pcapng(&piped_out.stdout);
    assert_eq!(streamed.len(), 4, "-c 4 stops after 4 copies, each a whole block on the pipe");
    assert_eq!(streamed[0].data, expected[0].1);

    // The ERSPAN and GRE numbers arrive over one socket in order; give the collector a moment.
    std::thread::sleep(Duration::from_millis(500));
    let usr1 = collector.signal(Signal::SIGUSR1, Duration::from_millis(1500));
    assert!(usr1.iter().any(|l| l.starts_with("SENDER")), "SIGUSR1 prints the summary: {usr1:?}");
    let stopped = collector.stop();
    assert!(stopped.status.success(), "collect: {}", stopped.stderr);
    let (rows, closing) = summary(&stopped.stderr);
    let out = row(&rows, "gre", 4, "out");
    assert_eq!((out.packets, out.lost, out.reordered), (5, Some(1), Some(0)), "{out:?}");
    assert_eq!(out.name, "10.240.0.1 session 4");
    let into = row(&rows, "gre", 4, "in");
    assert_eq!((into.packets, into.bytes, into.lost), (3, 3 * 1514, Some(0)));
    assert_eq!(row(&rows, "erspan", 9, "in").packets, 2);
    assert_eq!(row(&rows, "erspan1", 10, "out").packets, 2);
    let plain = row(&rows, "plain-gre", 77, "-");
    assert_eq!((plain.packets, plain.lost), (1, None), "no sequence numbers, no loss count");
    assert_eq!(closing_count(&closing, "undecodable "), 303, "{closing}");
    for reason in ["truncated GRE header", "unknown GRE protocol", "bad ERSPAN version 1"] {
        assert!(closing.contains(reason), "{reason:?} in {closing}");
    }
    assert_eq!(closing_count(&closing, "(not --from) "), 300, "{closing}");

    let packets = read_pcapng_file(&file);
    let got: Vec<(String, Vec<u8>, u32)> =
        packets.iter().map(|p| (p.interface.clone(), p.data.clone(), p.direction)).collect();
    assert_eq!(got.len(), expected.len());
    for (i, (g, e)) in got.iter().zip(&expected).enumerate() {
        assert!(
            g == e,
            "packet {i}: got {} on {:?} flags {}, expected {:?} flags {}",
            g.1.len(),
            g.0,
            g.2,
            e.0,
            e.2
        );
    }
    if let Some((tshark, tcpdump)) = tools_count(&file) {
        assert_eq!(
            (tshark, tcpdump),
            (expected.len(), expected.len()),
            "tshark and tcpdump read every packet"
        );
    }
}

/// ip_gre is there (GRE and ERSPAN devices can be created); says so and skips otherwise.
fn gre_available() -> bool {
    let probe = Netns::new("greprobe");
    if !probe.try_sh("ip link add g0 type gretap remote 192.0.2.1").0 {
        skip("this kernel has no ip_gre; collect end to end runs in `cargo xtask vm-test`");
        return false;
    }
    true
}

/// The collector namespace behind uplink up1 (10.231.0.1) from the hypervisor, at 10.231.0.2;
/// its uplink carries jumbo copies whole.
fn add_collector(hv: &Hypervisor) -> (Netns, PacketSocket) {
    let ns = Netns::new("col");
    hv.ns.sh(&format!(
        "ip link add up1 type veth peer name down1 netns {col}
         ip addr add 10.231.0.1/24 dev up1
         ip link set up1 mtu 9000 up",
        col = ns.name
    ));
    ns.sh("ip addr add 10.231.0.2/24 dev down1; ip link set down1 mtu 9000 up");
    let capture = PacketSocket::open(&ns, "down1");
    (ns, capture)
}

/// The ERSPAN header between the GRE header and the VM's frame.
fn erspan_len(encap: &str) -> usize {
    match encap {
        "gre" => 0,
        "erspan" => 12,
        "erspan1" => 8,
        other => panic!("{other}"),
    }
}

/// Where the VM's frame starts inside the IP packet: IPv4 20, then GRE with key and sequence
/// (12), or GRE with a sequence (8) and the ERSPAN header.
fn inner_offset(encap: &str) -> usize {
    20 + if encap == "gre" { 12 } else { 8 } + erspan_len(encap)
}

/// The VM's frame inside a copy, if it is one of the test's.
fn mirrored(frame: &[u8], encap: &str) -> Option<Vec<u8>> {
    let g = decap_gre(frame)?;
    let inner = g.inner.get(erspan_len(encap)..)?;
    is_marked(inner).then(|| inner.to_vec())
}

/// Drops, on the hypervisor's uplink, the copies of the test frames numbered `numbers`.
fn drop_copies(hv: &Hypervisor, encap: &str, numbers: &[u32]) {
    // The test frame's number follows its Ethernet header and 8-byte marker; it is only 16-bit
    // aligned, so u32 matches it in halves.
    let at = inner_offset(encap) + 22;
    hv.ns.sh("tc qdisc replace dev up1 clsact; tc filter del dev up1 egress 2>/dev/null || true");
    for n in numbers {
        hv.ns.sh(&format!(
            "tc filter add dev up1 egress protocol ip prio 1 u32 match ip protocol 47 0xff \
             match u16 {high} 0xffff at {at} match u16 {low} 0xffff at {low_at} action drop",
            high = n >> 16,
            low = n & 0xffff,
            low_at = at + 2
        ));
    }
}

/// tshark's view of the raw copies: (GRE key, sequence, ERSPAN version, span id, direction,
/// hardware id, index) per packet; `None` where tshark is not installed.
fn tshark_fields(raw: &[Vec<u8>], scratch: &Scratch) -> Option<Vec<Vec<String>>> {
    let path = scratch.path("raw.pcap");
    let mut writer = pcap_file::pcap::PcapWriter::new(std::fs::File::create(&path).unwrap()).unwrap();
    for frame in raw {
        writer
            .write_packet(&pcap_file::pcap::PcapPacket::new(Duration::ZERO, frame.len() as u32, frame))
            .unwrap();
    }
    drop(writer);
    let fields = [
        "gre.key",
        "gre.sequence_number",
        "erspan.version",
        "erspan.spanid",
        "erspan.direction",
        "erspan.hw",
        "erspan.index",
    ];
    let mut cmd = std::process::Command::new("tshark");
    cmd.arg("-r").arg(&path).args(["-T", "fields"]);
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

/// A decimal or 0x-hex number as tshark prints it.
fn num(cell: &str) -> u64 {
    match cell.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => cell.parse(),
    }
    .unwrap_or_else(|_| panic!("{cell:?} is not a number"))
}

/// tshark prints a boolean field as 1/0 or True/False, depending on its version.
fn flag(cell: &str) -> bool {
    matches!(cell, "1" | "True" | "true")
}

#[test]
fn collect_receives_attached_sessions_exactly_with_direction_and_loss() {
    if !privileged_on_every_kernel(
        "collect_receives_attached_sessions_exactly_with_direction_and_loss",
        "each kernel's ip_gre builds the GRE and ERSPAN headers and sequence numbers on the wire \
         (5.10 takes only the short tunnel key)",
    ) || !gre_available()
    {
        return;
    }
    let mut hv = Hypervisor::new();
    let (collector_ns, capture) = add_collector(&hv);
    // The namespace's one collect_md gretap and erspan, as Open vSwitch creates them for its GRE
    // and ERSPAN ports: vmsniff's classic devices work beside them.
    hv.ns.sh("ip link add gre_sys type gretap external; ip link set gre_sys up
         ip link add erspan_sys type erspan external; ip link set erspan_sys up");
    for encap in ["gre", "erspan", "erspan1"] {
        let scratch = Scratch::new(encap);
        let mut args = vec!["--tap", TAP, "--to", "10.231.0.2", "--encap", encap];
        // GRE with an operator's key, ERSPAN with the session id as span id.
        let key = match encap {
            "gre" => {
                args.extend(["--key", "5"]);
                5
            }
            "erspan" => {
                args.extend(["--erspan-hwid", "7"]);
                0
            }
            _ => 0,
        };
        let id = vmsniff::attach(&hv.ns, &args);
        let key = if key == 0 { id } else { key };
        let session = vmsniff::session(&hv.ns, id);
        assert_eq!(session["encap"], encap, "status shows the encapsulation: {session}");
        let names = scratch.path("status.json");
        std::fs::write(&names, vmsniff::ok(&hv.ns, &["status", "--json"])).unwrap();
        let file = scratch.path("cap.pcapng");
        let collector = Collector::start(
            &collector_ns,
            &["-w", file.to_str().unwrap(), "--from", "10.231.0.1", "--names", names.to_str().unwrap()],
        );
        // Frames 0..16 out and 1000..1016 in; the uplink drops the copies of 3, 7 and 1005.
        let (out, into) = frames::both_ways(16);
        drop_copies(&hv, encap, &[3, 7, 1005]);
        hv.vm_sends(&out);
        hv.vm_receives(&into);
        let raw = capture.capture(29, Duration::from_secs(15), |f| mirrored(f, encap).is_some());
        assert_eq!(raw.len(), 29, "[{encap}] 32 copies less the 3 dropped reach the collector");
        std::thread::sleep(Duration::from_millis(500));
        let stopped = collector.stop();
        assert!(stopped.status.success(), "[{encap}] collect: {}", stopped.stderr);

        eprintln!("[{encap}] vmsniff collect's stderr:\n{}", stopped.stderr);
        let (rows, closing) = summary(&stopped.stderr);
        let name = format!("{TAP} session {id}");
        let sent = row(&rows, encap, key, "out");
        assert_eq!((sent.packets, sent.lost, sent.reordered), (14, Some(2), Some(0)), "[{encap}] {sent:?}");
        assert_eq!(sent.name, name, "[{encap}] named after the tap with --names");
        let received = row(&rows, encap, key, "in");
        assert_eq!(
            (received.packets, received.lost, received.reordered),
            (15, Some(1), Some(0)),
            "[{encap}] {received:?}"
        );
        assert_eq!(rows.len(), 2, "[{encap}] nothing else arrived: {rows:#?}");
        assert_eq!(closing_count(&closing, "undecodable "), 0, "[{encap}] {closing}");

        let packets = read_pcapng_file(&file);
        let pick = |direction: u32| -> Vec<Vec<u8>> {
            packets
                .iter()
                .filter(|p: &&CapturedPacket| p.direction == direction)
                .map(|p| p.data.clone())
                .collect()
        };
        let kept = |frames: &[Vec<u8>], dropped: &[u32]| -> Vec<Vec<u8>> {
            frames
                .iter()
                .filter(|f| !dropped.contains(&u32::from_be_bytes(f[22..26].try_into().unwrap())))
                .cloned()
                .collect()
        };
        assert_eq!(
            pick(OUTBOUND),
            kept(&out, &[3, 7]),
            "[{encap}] frames the VM sent, outbound, byte-identical"
        );
        assert_eq!(
            pick(INBOUND),
            kept(&into, &[1005]),
            "[{encap}] frames the VM received, inbound, byte-identical"
        );
        assert!(packets.iter().all(|p| p.interface == name && p.original_len as usize == p.data.len()));
        if let Some((tshark, tcpdump)) = tools_count(&file) {
            assert_eq!((tshark, tcpdump), (29, 29), "[{encap}] tshark and tcpdump read the capture");
        }

        // What is on the wire, as Wireshark's dissectors read it, per copy.
        if let Some(rows) = tshark_fields(&raw, &scratch) {
            assert_eq!(rows.len(), raw.len());
            for (cells, frame) in rows.iter().zip(&raw) {
                let inner = mirrored(frame, encap).unwrap();
                let number = u32::from_be_bytes(inner[22..26].try_into().unwrap());
                let d = u64::from(number >= 1000);
                assert!(!cells[1].is_empty(), "[{encap}] every copy has a GRE sequence number: {cells:?}");
                match encap {
                    "gre" => assert_eq!(num(&cells[0]), u64::from(key) * 2 + d, "[{encap}] key K*2+d"),
                    "erspan" => {
                        assert_eq!(
                            (num(&cells[2]), num(&cells[3]), num(&cells[5])),
                            (2, u64::from(key), 7),
                            "{cells:?}"
                        );
                        assert_eq!(flag(&cells[4]), d == 1, "[{encap}] D bit of frame {number}: {cells:?}");
                    }
                    _ => {
                        assert_eq!((num(&cells[2]), num(&cells[3])), (1, u64::from(key)), "{cells:?}");
                        assert_eq!(num(&cells[6]), d, "[{encap}] index of frame {number}: {cells:?}");
                    }
                }
            }
        }
        hv.ns.sh("tc qdisc del dev up1 clsact");
        vmsniff::ok(&hv.ns, &["detach", &id.to_string()]);
    }
}

#[test]
fn bad_encapsulations_and_collect_arguments_are_refused_and_change_nothing() {
    if !privileged_on_host(
        "bad_encapsulations_and_collect_arguments_are_refused_and_change_nothing",
        "argument checks and messages, made before any device is created",
    ) {
        return;
    }
    let hv = Hypervisor::new();
    let before = hv.ns.link_names();
    let scratch = Scratch::new("refused");
    let file = scratch.path("never.pcapng");
    let file = file.to_str().unwrap();
    let attach = |more: &[&'static str]| -> Vec<&'static str> {
        let mut args = vec!["attach", "--tap", TAP, "--to", "192.0.2.9"];
        args.extend_from_slice(more);
        args
    };
    for (args, needle) in [
        (attach(&["--erspan-hwid", "3"]), "it needs --encap erspan (it was --encap gre)"),
        (attach(&["--encap", "erspan1", "--erspan-hwid", "3"]), "(it was --encap erspan1)"),
        (attach(&["--encap", "erspan", "--erspan-hwid", "64"]), "64"),
        (attach(&["--encap", "erspan", "--key", "600"]), "must be at most 511"),
        (attach(&["--encap", "vxlan", "--port", "0"]), "port 0 is no destination"),
        (attach(&["--port", "4789"]), "it needs --encap vxlan (it was --encap gre)"),
        (vec!["attach", "--tap", TAP, "--to-dev", "peer0", "--encap", "erspan"], "--encap"),
        (vec!["collect", "-w", "-", "--rotate", "1M"], "--rotate starts new files: it needs -w FILE"),
        (vec!["collect", "-w", file, "--rotate", "10x"], "give a size such as 100M"),
        (vec!["collect", "-w", file, "--from", "2001:db8::/129"], "2001:db8::/129"),
        (vec!["collect", "-w", file, "--vxlan-port", "0"], "0"),
        (vec!["collect", "-w", file, "--from", "10.0.0.0/40"], "10.0.0.0/40"),
        (vec!["collect", "-w", file, "--names", "/nonexistent/status.json"], "/nonexistent/status.json"),
        (vec!["collect", "-w", file, "-c", "0"], "0"),
        (vec!["collect", "-w", file, "--threads", "0"], "--threads"),
        (vec!["collect", "-w", file, "--threads", "65"], "1..=64"),
    ] {
        let err = vmsniff::fails(&hv.ns, &args);
        assert!(err.contains(needle), "{args:?}: {needle:?} not in {err}");
    }
    assert_eq!(hv.ns.link_names(), before, "no device was created");
    assert!(!hv.ns.pin_dir().exists(), "no pins were made");
    assert!(!scratch.path("never.pcapng").exists(), "no capture file was created");
}

/// Issue 19, class 1: what a sender the collector does not know can make it keep. A spray of
/// distinct keys fills the stream table to `--max-streams` and no further (refusals counted,
/// real copies still written); a tenant's VM name full of terminal escapes reaches neither the
/// terminal nor Wireshark as such; plain GRE (a GRE tenant network) is left out by default.
#[test]
fn a_spray_of_keys_hostile_names_and_plain_gre_stay_bounded() {
    if !privileged_on_host(
        "a_spray_of_keys_hostile_names_and_plain_gre_stay_bounded",
        "collect decodes what a raw socket receives, in user space",
    ) {
        return;
    }
    let (sender_ns, collector_ns) = sender_and_collector(&["10.240.0.1"]);
    let scratch = Scratch::new("spray");
    let file = scratch.path("cap.pcapng");
    let names = scratch.path("status.json");
    let evil = format!("\u{1b}[2J\u{1b}]0;owned\u{7}{}", "v".repeat(300));
    let status = serde_json::json!({"version": 1, "sessions": [
        {"session": 3, "tap": "tap3", "key": 3, "encap": "gre", "vm": evil, "nic": 0},
    ]});
    std::fs::write(&names, status.to_string()).unwrap();
    let collector = Collector::start(
        &collector_ns,
        &["-w", file.to_str().unwrap(), "--max-streams", "50", "--names", names.to_str().unwrap()],
    );
    let to = [10, 240, 0, 2];
    let sender = GreSender::open(&sender_ns, [10, 240, 0, 1]);
    let frame = |seq: u32| frames::frame(VM_MAC, PEER_MAC, seq, 60);
    // The named session first, then 2000 keys nobody uses, then the named session again.
    sender.send(to, &gre(Some(3 * 2), Some(1), TEB, &frame(1)));
    for key in 100..2100 {
        sender.send(to, &gre(Some(key * 2), Some(0), TEB, &frame(key)));
    }
    // Plain GRE: a tenant network's packets, key 5, no sequence numbers.
    for seq in 0..10 {
        sender.send(to, &gre(Some(5), None, TEB, &frame(seq)));
    }
    sender.send(to, &gre(Some(3 * 2), Some(2), TEB, &frame(2)));
    std::thread::sleep(Duration::from_millis(500));
    let stopped = collector.stop();
    assert!(stopped.status.success(), "collect: {}", stopped.stderr);
    let (rows, closing) = summary(&stopped.stderr);
    assert_eq!(rows.len(), 50, "the stream table stops at --max-streams");
    assert_eq!(closing_count(&closing, "--max-streams) "), 2000 - 49, "{closing}");
    assert_eq!(closing_count(&closing, "--plain-gre records it) "), 10, "{closing}");
    assert!(!stopped.stderr.contains('\u{1b}'), "no terminal escape reaches stderr");
    let packets = read_pcapng_file(&file);
    let named: Vec<&CapturedPacket> =
        packets.iter().filter(|p| p.interface.ends_with("nic 0 session 3")).collect();
    assert_eq!(named.len(), 2, "the real copies are written: {:?}", packets.len());
    let name = &named[0].interface;
    assert!(!name.chars().any(char::is_control), "{name:?}");
    assert!(name.chars().count() < 100, "{name:?}");
    let interfaces: std::collections::BTreeSet<&str> = packets.iter().map(|p| p.interface.as_str()).collect();
    assert_eq!(interfaces.len(), 50, "one interface per counted stream, no more");
    assert_eq!(packets.len(), 51);
}

/// Issue 20: the collector reads a packet socket's ring, which sees packets before the IP
/// stack. GRE routed through the collector host (its link address, another host's IP) is
/// counted, not recorded; and the collector's kernel does not answer copies with ICMP
/// "protocol unreachable" (raw GRE sockets stay open beside the ring, taking nothing).
#[test]
fn the_ring_records_only_copies_addressed_here_and_the_host_stays_quiet() {
    if !privileged_on_host(
        "the_ring_records_only_copies_addressed_here_and_the_host_stays_quiet",
        "collect's packet socket and the IP stack of this kernel; no tunnel device",
    ) {
        return;
    }
    let (sender_ns, collector_ns) = sender_and_collector(&["10.240.0.1"]);
    // Another network behind the collector host, as if it routed.
    sender_ns.sh("ip route add 10.99.0.0/24 via 10.240.0.2");
    let scratch = Scratch::new("ring");
    let file = scratch.path("cap.pcapng");
    let collector = Collector::start(&collector_ns, &["-w", file.to_str().unwrap()]);
    let unreachable = || {
        let out = collector_ns.sh("nstat -az IcmpOutDestUnreachs");
        out.lines()
            .find_map(|l| l.strip_prefix("IcmpOutDestUnreachs"))
            .and_then(|rest| rest.split_whitespace().next()?.parse::<u64>().ok())
            .unwrap()
    };
    let before = unreachable();
    let sender = GreSender::open(&sender_ns, [10, 240, 0, 1]);
    let frame = |seq: u32| frames::frame(VM_MAC, PEER_MAC, seq, 60);
    for seq in 1..=3 {
        sender.send([10, 240, 0, 2], &gre(Some(6 * 2), Some(seq), TEB, &frame(seq)));
    }
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(unreachable(), before, "the collector's kernel answered a copy with ICMP unreachable");
    for seq in 1..=4 {
        sender.send([10, 99, 0, 9], &gre(Some(8 * 2), Some(seq), TEB, &frame(seq)));
    }
    std::thread::sleep(Duration::from_millis(300));
    let stopped = collector.stop();
    assert!(stopped.status.success(), "collect: {}", stopped.stderr);
    let (rows, closing) = summary(&stopped.stderr);
    assert_eq!(rows.len(), 1, "only the copies addressed here: {rows:#?}");
    assert_eq!((rows[0].session, rows[0].packets), (6, 3));
    assert_eq!(closing_count(&closing, "addressed to another host "), 4, "{closing}");
    assert_eq!(read_pcapng_file(&file).len(), 3);
}

/// A collector whose address is on a bridge (as on `br-ex`): its packet socket sees each copy
/// on the port and again on the bridge. Each copy is written once, a fragmented one too, and
/// none counts as a duplicate. (Bonds and VLANs repeat packets the same way; this kernel has
/// neither.)
#[test]
fn a_collector_on_a_bridge_writes_each_copy_once() {
    if !privileged_on_host(
        "a_collector_on_a_bridge_writes_each_copy_once",
        "collect's packet socket and this kernel's bridge",
    ) {
        return;
    }
    let (sender_ns, collector_ns) = sender_and_collector(&["10.240.0.1"]);
    collector_ns.sh("ip addr flush dev col0; ip link add br0 type bridge; ip link set col0 master br0; \
         ip addr add 10.240.0.2/24 dev br0; ip link set br0 up");
    let scratch = Scratch::new("bridge");
    let file = scratch.path("cap.pcapng");
    let collector = Collector::start(&collector_ns, &["-w", file.to_str().unwrap()]);
    let sender = GreSender::open(&sender_ns, [10, 240, 0, 1]);
    // A 1514-byte frame's copy is fragmented over the 1500-byte link.
    let sizes = [60, 1514, 200];
    for (seq, len) in (1u32..).zip(sizes) {
        let frame = frames::frame(VM_MAC, PEER_MAC, seq, len);
        sender.send([10, 240, 0, 2], &gre(Some(5 * 2), Some(seq), TEB, &frame));
    }
    std::thread::sleep(Duration::from_millis(300));
    let stopped = collector.stop();
    assert!(stopped.status.success(), "collect: {}", stopped.stderr);
    let (rows, closing) = summary(&stopped.stderr);
    assert_eq!(rows.len(), 1, "{rows:#?}");
    assert_eq!((rows[0].packets, rows[0].lost), (3, Some(0)), "{rows:#?}\n{closing}");
    assert!(!stopped.stderr.contains("duplicated sequence numbers"), "{}", stopped.stderr);
    let lens: Vec<usize> = read_pcapng_file(&file).iter().map(|p| p.data.len()).collect();
    assert_eq!(lens, sizes, "each copy once, whole");
}

/// `--threads`: copies from many senders spread over reading threads, one ring each in a
/// PACKET_FANOUT group. Each copy is written once (a ring outside the group would write it
/// again), each sender's in order with its fragments made whole (one sender, one thread), and
/// two such collectors at once both get every copy (each group is its own).
#[test]
fn reading_threads_write_each_senders_copies_once_and_in_order() {
    if !privileged_on_host(
        "reading_threads_write_each_senders_copies_once_and_in_order",
        "collect's packet sockets and this kernel's PACKET_FANOUT",
    ) {
        return;
    }
    let (names, sockets, _sender_ns, collector_ns) = senders_and_collector(8);
    let scratch = Scratch::new("threads");
    let files = [scratch.path("three.pcapng"), scratch.path("two.pcapng")];
    let collectors: Vec<Collector> = [("3", &files[0]), ("2", &files[1])]
        .into_iter()
        .map(|(threads, file)| {
            Collector::start(&collector_ns, &["-w", file.to_str().unwrap(), "--threads", threads])
        })
        .collect();
    let threads = |pid: u32| -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/task"))
            .unwrap()
            .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
            .map(|c| c.trim().to_owned())
            .filter(|c| c.starts_with("collect-"))
            .collect();
        names.sort();
        names
    };
    // A thread names itself once it runs: a moment after collect says it is collecting.
    let named = |pid: u32, expected: &[&str]| {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while threads(pid) != expected && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(threads(pid), expected);
    };
    named(collectors[0].pid(), &["collect-0", "collect-1", "collect-2"]);
    named(collectors[1].pid(), &["collect-0", "collect-1"]);

    const COPIES: u32 = 200;
    pin_to_cpu(0);
    // Small and fragmented (a 1514-byte frame over a 1500-byte link) copies, the senders in
    // turn, so that every ring has work at once.
    let frame = |sender: usize, seq: u32| {
        let len = if seq.is_multiple_of(3) { 1514 } else { 60 + sender * 10 };
        frames::frame(VM_MAC, PEER_MAC, seq + 1000 * sender as u32, len)
    };
    for seq in 1..=COPIES {
        for (i, socket) in sockets.iter().enumerate() {
            socket.send([10, 240, 0, 2], &gre(Some(3 * 2), Some(seq), TEB, &frame(i, seq)));
        }
        if seq % 10 == 0 {
            // Within the veth's backlog.
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    std::thread::sleep(Duration::from_millis(500));
    for (collector, file) in collectors.into_iter().zip(&files) {
        let stopped = collector.stop();
        assert!(stopped.status.success(), "collect: {}", stopped.stderr);
        let (rows, closing) = summary(&stopped.stderr);
        assert_eq!(rows.len(), sockets.len(), "{rows:#?}\n{closing}");
        for row in &rows {
            assert_eq!(
                (row.packets, row.lost, row.reordered),
                (u64::from(COPIES), Some(0), Some(0)),
                "{row:?}\n{closing}"
            );
        }
        let packets = read_pcapng_file(file);
        assert_eq!(packets.len(), sockets.len() * COPIES as usize, "each copy once");
        for (i, name) in names.iter().enumerate() {
            let got: Vec<&[u8]> = packets
                .iter()
                .filter(|p| p.interface == format!("{name} session 3"))
                .map(|p| p.data.as_slice())
                .collect();
            let expected: Vec<Vec<u8>> = (1..=COPIES).map(|seq| frame(i, seq)).collect();
            assert!(
                got.iter().copied().eq(expected.iter().map(Vec::as_slice)),
                "{name}'s copies, whole and in order"
            );
        }
    }
}

/// A collector busy elsewhere (stopped) while copies queue up in its ring writes every one of
/// them, in order, once it reads again: the full blocks, and the last, partly filled one the
/// kernel hands over on its timer.
#[test]
fn copies_queued_while_the_collector_is_busy_are_all_written() {
    if !privileged_on_host(
        "copies_queued_while_the_collector_is_busy_are_all_written",
        "collect's ring on this kernel",
    ) {
        return;
    }
    let (_names, sockets, _sender_ns, collector_ns) = senders_and_collector(4);
    let scratch = Scratch::new("busy");
    const COPIES: u32 = 5000;
    for threads in ["1", "2"] {
        let file = scratch.path(&format!("{threads}.pcapng"));
        let total = (COPIES as usize * sockets.len()).to_string();
        let mut collector = Collector::start(
            &collector_ns,
            &["-w", file.to_str().unwrap(), "-c", &total, "--threads", threads],
        );
        let pid = nix::unistd::Pid::from_raw(collector.pid() as i32);
        nix::sys::signal::kill(pid, Signal::SIGSTOP).unwrap();
        // Two sending threads: the kernel fills the ring from two CPUs at once, as from a NIC's
        // several queues.
        std::thread::scope(|scope| {
            for (cpu, half) in sockets.chunks(2).enumerate() {
                scope.spawn(move || {
                    pin_to_cpu(cpu);
                    for seq in 1..=COPIES {
                        for socket in half {
                            let frame = frames::frame(VM_MAC, PEER_MAC, seq, 60);
                            socket.send([10, 240, 0, 2], &gre(Some(3 * 2), Some(seq), TEB, &frame));
                        }
                        if seq % 40 == 0 {
                            std::thread::sleep(Duration::from_micros(200));
                        }
                    }
                });
            }
        });
        std::thread::sleep(Duration::from_millis(100));
        nix::sys::signal::kill(pid, Signal::SIGCONT).unwrap();
        let stopped = collector.wait(Duration::from_secs(10));
        assert!(stopped.status.success(), "{}", stopped.stderr);
        let (rows, closing) = summary(&stopped.stderr);
        for row in &rows {
            assert_eq!(
                (row.packets, row.lost, row.reordered),
                (u64::from(COPIES), Some(0), Some(0)),
                "{row:?}\n{closing}"
            );
        }
        assert_eq!(read_pcapng_file(&file).len(), COPIES as usize * sockets.len());
    }
}
