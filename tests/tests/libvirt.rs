//! VMs named the way operators name them, through the real binary: libvirt's test driver reads
//! the Nova-shaped node fixture, a real ovsdb-server holds br-int, and the fixture VM
//! c-private's first NIC is a real tap in a hybrid plug (tap in qbr, veth qvb/qvo) in the test's
//! namespace.
// Test code throughout: helpers outside `#[test]` functions fail the test by panicking too.
#![expect(clippy::expect_used, reason = "a failed step fails the test")]

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use serde_json::Value;
use vmsniff_tests::{
    frames::{self, PEER_MAC, VM_MAC, is_marked},
    netns::Netns,
    ovsdb::OvsdbServer,
    packet::PacketSocket,
    privileged_on_host, skip,
    tap::Vm,
    topology::{MIRROR_CAPTURE, MIRROR_DEV, assert_frames_eq},
    vmsniff,
};

const PORT_ID: &str = "f7eae624-3412-4b6c-9e3a-0d1c2b3a4f55";
const TAP: &str = "tapf7eae624-34";
const QBR: &str = "qbrf7eae624-34";
const QVB: &str = "qvbf7eae624-34";
const QVO: &str = "qvof7eae624-34";

fn fixture_uri() -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../vmsniff-user/tests/fixtures/libvirt/nova-node.xml");
    format!("test://{}", path.canonicalize().expect("the libvirt node fixture").display())
}

/// Nova's hybrid plug of c-private's NIC 0, with the network beyond played by a socket on qvo.
struct HybridPlug {
    ns: Netns,
    vm: Vm,
    network: PacketSocket,
    mirror: PacketSocket,
}

impl HybridPlug {
    fn new() -> HybridPlug {
        let ns = Netns::new("lv");
        let vm = Vm::create(&ns, TAP);
        ns.sh(&format!(
            "ip link add {QBR} type bridge stp_state 0 forward_delay 0 mcast_snooping 0
             ip link set {QBR} up
             ip link set {TAP} master {QBR}
             ip link add {QVB} type veth peer name {QVO}
             ip link set {QVB} master {QBR}
             ip link set {QVB} up
             ip link set {QVO} up
             ip link add {MIRROR_DEV} type veth peer name {MIRROR_CAPTURE}
             ip link set {MIRROR_DEV} up
             ip link set {MIRROR_CAPTURE} up"
        ));
        let network = PacketSocket::open(&ns, QVO);
        let mirror = PacketSocket::open(&ns, MIRROR_CAPTURE);
        let mut plug = HybridPlug { ns, vm, network, mirror };
        plug.wait_until_forwarding();
        plug
    }

    fn wait_until_forwarding(&mut self) {
        for attempt in 0..100u32 {
            self.vm.send(&frames::frame(VM_MAC, PEER_MAC, 0xffff_0000 + attempt, 60));
            if !self.network.capture(1, Duration::from_millis(100), is_marked).is_empty() {
                self.network.drain(Duration::from_millis(200), is_marked);
                return;
            }
        }
        panic!("the hybrid plug's bridge never forwarded from the tap to qvo");
    }
}

/// vmsniff's arguments with the fixture's libvirt and, if given, the test's OVSDB.
fn with_sources<'a>(ovsdb: Option<&'a str>, uri: &'a str, args: &[&'a str]) -> Vec<&'a str> {
    let mut all = vec!["--connect", uri];
    if let Some(ovsdb) = ovsdb {
        all.extend(["--ovsdb", ovsdb]);
    }
    all.extend_from_slice(args);
    all
}

/// The hybrid plug's sockets once its namespace is borrowed apart.
struct Plugged {
    vm: Vm,
    network: PacketSocket,
    mirror: PacketSocket,
}

fn json(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

#[test]
fn attach_by_nova_name_mirrors_the_vms_tap_and_list_show_status_detach_follow_it() {
    if !privileged_on_host(
        "attach_by_nova_name_mirrors_the_vms_tap_and_list_show_status_detach_follow_it",
        "resolving a VM through libvirt and OVSDB is user space; what it attaches mirrors in every \
         guest in datapath/both_directions_arrive_byte_identical_in_order_with_matching_counters",
    ) {
        return;
    }
    for mode in vmsniff::attach_modes() {
        vmsniff::report_mode(mode);
        let Some(ovsdb) = OvsdbServer::start() else { return };
        ovsdb.vsctl(&[
            "add-br",
            "br-int",
            "--",
            "add-port",
            "br-int",
            QVO,
            "--",
            "set",
            "Interface",
            QVO,
            &format!("external_ids:iface-id={PORT_ID}"),
            "external_ids:attached-mac=fa:16:3e:11:22:33",
        ]);
        let address = ovsdb.address();
        let uri = fixture_uri();
        let HybridPlug { ns, vm, network, mirror } = HybridPlug::new();
        let mut plug = Plugged { vm, network, mirror };
        let ns_links = ns.link_names();
        let with = |args: &[&'static str]| -> Vec<String> {
            with_sources(Some(&address), &uri, args).into_iter().map(str::to_owned).collect()
        };
        let run_ok =
            |args: Vec<String>| vmsniff::ok(&ns, &args.iter().map(String::as_str).collect::<Vec<_>>());

        // --connect after the command works as well as before it.
        let out = vmsniff::ok(
            &ns,
            &[
                "attach",
                "c-private",
                "--nic",
                "0",
                "--to-dev",
                MIRROR_DEV,
                "--connect",
                &uri,
                "--attach-mode",
                mode,
            ],
        );
        let id: u32 = out.trim().parse().expect("attach prints the session id");
        assert_eq!(vmsniff::session(&ns, id)["tap"], TAP);

        let (out, into) = frames::both_ways(12);
        for frame in &out {
            plug.vm.send(frame);
        }
        assert_frames_eq(
            "frames c-private sent, at qvo",
            &out,
            &plug.network.capture(out.len(), Duration::from_secs(10), is_marked),
        );
        for frame in &into {
            plug.network.send(frame);
        }
        assert_frames_eq(
            "frames sent to c-private, at its tap",
            &into,
            &plug.vm.recv_marked(into.len(), Duration::from_secs(10)),
        );
        let expected: Vec<Vec<u8>> = out.iter().chain(&into).cloned().collect();
        assert_frames_eq(
            "copies of c-private's NIC 0",
            &expected,
            &plug.mirror.capture(24, Duration::from_secs(10), is_marked),
        );

        // list: the row of c-private's NIC 0 has the OVS port from OVSDB and the session.
        let list = json(&run_ok(with(&["list", "--json"])));
        assert_eq!(list["version"], 1);
        let rows = list["nics"].as_array().expect("nics");
        let row = rows.iter().find(|r| r["tap"] == TAP).expect("c-private NIC 0 listed");
        assert_eq!(row["nova-name"], "c-private");
        assert_eq!(row["domain"], "instance-00000003");
        assert_eq!(row["plug"], "hybrid");
        assert_eq!(row["port-id"], PORT_ID);
        assert_eq!(row["ovs-port"]["interface"], QVO);
        assert_eq!(row["ovs-port"]["bridge"], "br-int");
        assert_eq!(row["ovs-port"]["found-by"], "iface-id");
        assert_eq!(row["sessions"], serde_json::json!([id]));
        let other = rows.iter().find(|r| r["tap"] == "tap8e3c1a52-07").expect("c-private NIC 1 listed");
        assert_eq!(
            (other["ovs-port"].clone(), other["sessions"].clone()),
            (Value::Null, serde_json::json!([]))
        );
        let table = run_ok(with(&["list"]));
        let line = table.lines().find(|l| l.contains(TAP)).expect("table row");
        assert!(
            line.contains("qvof7eae624-34@br-int") && line.trim_end().ends_with(&id.to_string()),
            "{line}"
        );

        // show: every hop of the hybrid plug, checked in the kernel and OVSDB.
        let show = json(&run_ok(with(&["show", "c-private", "--nic", "0", "--json"])));
        let hops: Vec<(String, String)> = show["nics"][0]["path"]
            .as_array()
            .expect("path")
            .iter()
            .map(|h| (h["name"].as_str().unwrap().to_owned(), h["state"].as_str().unwrap().to_owned()))
            .collect();
        let present = |name: &str| (name.to_owned(), "present".to_owned());
        assert_eq!(
            hops,
            [present(TAP), present(QBR), present(QVB), present(QVO), present("br-int")],
            "{show}"
        );
        let text = run_ok(with(&["show", "fa:16:3e:11:22:33"]));
        assert!(
            text.contains("VM c-private (domain instance-00000003")
                && text.contains("veth peer of qvbf7eae624-34"),
            "{text}"
        );

        // The VM's NIC 1 has no tap here; its path says so.
        let show = json(&run_ok(with(&["show", "c-private", "--nic", "1", "--json"])));
        assert_eq!(show["nics"][0]["path"][0]["state"], "missing");

        // status and detach take the VM too.
        let status = json(&run_ok(with(&["status", "c-private", "--json"])));
        assert_eq!(status["sessions"].as_array().unwrap().len(), 1);
        let session = &status["sessions"][0];
        assert_eq!(
            (&session["vm"], &session["nic"]),
            (&serde_json::json!("c-private"), &serde_json::json!(0))
        );
        let status = json(&run_ok(with(&["status", "c-web", "--json"])));
        assert_eq!(status["sessions"], serde_json::json!([]));
        let stderr = String::from_utf8_lossy(
            &vmsniff::run(
                &ns,
                &with(&["detach", "--vm", "c-private"]).iter().map(String::as_str).collect::<Vec<_>>(),
            )
            .stderr,
        )
        .into_owned();
        assert!(stderr.contains(&format!("session {id} detached")), "{stderr}");
        assert!(!ns.pin_dir().exists(), "pins left after detaching by VM");
        assert_eq!(ns.link_names(), ns_links);
        for frame in &out[..3] {
            plug.vm.send(frame);
        }
        assert!(plug.mirror.drain(Duration::from_millis(500), is_marked).is_empty(), "copies after detach");
    }
}

#[test]
fn selector_errors_name_the_fix_and_change_nothing() {
    if !privileged_on_host(
        "selector_errors_name_the_fix_and_change_nothing",
        "resolving a VM through libvirt is user space, and refused before any kernel object is touched",
    ) {
        return;
    }
    let uri = fixture_uri();
    let plug = HybridPlug::new();
    let before = plug.ns.link_names();
    let fails = |args: &[&str]| vmsniff::fails(&plug.ns, &with_sources(None, &uri, args));
    for (args, needles) in [
        (
            vec!["attach", "c-private", "--to-dev", MIRROR_DEV],
            vec!["2 NICs", "--nic 0  fa:16:3e:11:22:33  tapf7eae624-34  hybrid", "--nic 1"],
        ),
        (vec!["attach", "c-private", "--nic", "2", "--to-dev", MIRROR_DEV], vec!["no NIC 2", "has 2"]),
        (
            vec!["attach", "c-dup", "--to-dev", MIRROR_DEV],
            vec![
                "names 2 VMs",
                "0e1d2c3b-4a59-4687-9a6b-5c4d3e2f1a0b",
                "6a7b8c9d-0e1f-4a2b-8c3d-4e5f6a7b8c9d",
            ],
        ),
        (vec!["attach", "c-privat", "--to-dev", MIRROR_DEV], vec!["did you mean c-private?"]),
        (vec!["attach", "c-stopped", "--to-dev", MIRROR_DEV], vec!["shut-off", "start"]),
        (
            vec!["attach", "c-web", "--to-dev", MIRROR_DEV],
            vec!["tap2b9d4c61-5a", "not in this network namespace"],
        ),
        (
            vec!["attach", "c-dpdk", "--to-dev", MIRROR_DEV],
            vec!["cannot mirror NIC 0 of VM c-dpdk (type vhostuser) because", "never cross"],
        ),
        (vec!["attach", "c-sriov", "--nic", "1", "--to-dev", MIRROR_DEV], vec!["macvtap"]),
        (vec!["capture", "c-sriov", "--nic", "0"], vec!["SR-IOV"]),
        (vec!["attach", "--tap", TAP, "--nic", "0", "--to-dev", MIRROR_DEV], vec!["drop them"]),
        (vec!["detach", "c-private"], vec!["not mirrored here"]),
        (vec!["show", "nothing-like-it"], vec!["no VM matches", "vmsniff list"]),
    ] {
        let err = fails(&args);
        for needle in needles {
            assert!(err.contains(needle), "{args:?}: {needle:?} missing from {err}");
        }
    }
    let err = vmsniff::fails(&plug.ns, &["--connect", "test:///nonexistent/node.xml", "list"]);
    assert!(
        err.contains("cannot reach libvirt at test:///nonexistent/node.xml (--connect)")
            && err.contains("virtqemud"),
        "{err}"
    );
    assert!(!plug.ns.pin_dir().exists(), "a failed command left pins");
    assert_eq!(plug.ns.link_names(), before, "a failed command changed the interfaces");
}

#[test]
fn a_tap_name_works_without_libvirt_and_ovs_ports_fall_back_to_the_naming_convention() {
    if !privileged_on_host(
        "a_tap_name_works_without_libvirt_and_ovs_ports_fall_back_to_the_naming_convention",
        "falling back to names is user space",
    ) {
        return;
    }
    let plug = HybridPlug::new();
    let out = vmsniff::run(
        &plug.ns,
        &["--connect", "test:///nonexistent/node.xml", "attach", TAP, "--to-dev", MIRROR_DEV],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("libvirt is unreachable: using the interface named tapf7eae624-34"), "{stderr}");
    vmsniff::ok(&plug.ns, &["detach", TAP]);

    let uri = fixture_uri();
    let out = vmsniff::run(
        &plug.ns,
        &["--connect", &uri, "--ovsdb", "unix:/nonexistent/db.sock", "list", "--json"],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && stderr.contains("naming convention"), "{stderr}");
    let list = json(&String::from_utf8_lossy(&out.stdout));
    let row = list["nics"].as_array().unwrap().iter().find(|r| r["tap"] == TAP).unwrap().clone();
    assert_eq!(
        (row["ovs-port"]["interface"].clone(), row["ovs-port"]["found-by"].clone()),
        (QVO.into(), "naming-convention".into())
    );
    assert!(!plug.ns.pin_dir().exists());
}

#[test]
fn capture_writes_a_pcap_of_both_directions_of_the_vms_tap() {
    if !privileged_on_host(
        "capture_writes_a_pcap_of_both_directions_of_the_vms_tap",
        "capture resolves the VM and runs tcpdump on its tap: no vmsniff program is loaded",
    ) {
        return;
    }
    if std::process::Command::new("tcpdump").arg("--version").output().is_err() {
        skip("capture needs tcpdump (apt-get install tcpdump)");
        return;
    }
    let uri = fixture_uri();
    let mut plug = HybridPlug::new();
    let file = std::env::temp_dir().join(format!("vmsniff-capture-{}.pcap", std::process::id()));
    let args: Vec<String> = ["--connect", &uri, "capture", "c-private", "--nic", "0", "-c", "4", "-w"]
        .into_iter()
        .map(str::to_owned)
        .chain([file.display().to_string(), "ether".into(), "proto".into(), "0x88b5".into()])
        .collect();
    let bin = vmsniff::binary();
    let mut child = plug.ns.enter(move || {
        std::process::Command::new(bin)
            .args(&args)
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("start vmsniff capture")
    });
    // tcpdump needs a moment to open the tap: keep traffic flowing both ways until it has 4.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut seq = 0;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for capture") {
            break status;
        }
        assert!(Instant::now() < deadline, "capture did not stop after -c 4");
        plug.vm.send(&frames::frame(VM_MAC, PEER_MAC, seq, 100));
        plug.network.send(&frames::frame(PEER_MAC, VM_MAC, 5000 + seq, 100));
        seq += 1;
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(status.success(), "capture failed: {stderr}");
    assert!(stderr.contains("capturing VM c-private NIC 0 (tapf7eae624-34)"), "{stderr}");
    let read = std::process::Command::new("tcpdump").args(["-n", "-e", "-r"]).arg(&file).output().unwrap();
    let _ = std::fs::remove_file(&file);
    let decoded = String::from_utf8_lossy(&read.stdout);
    assert!(read.status.success(), "tcpdump cannot read the pcap: {}", String::from_utf8_lossy(&read.stderr));
    // One line per frame; tcpdump adds indented hex lines for the unknown test ethertype.
    assert_eq!(decoded.lines().filter(|l| !l.starts_with(char::is_whitespace)).count(), 4, "{decoded}");
    assert!(decoded.contains("52:54:00:aa:00:01 > 52:54:00:bb:00:02"), "no frame the VM sent: {decoded}");
    assert!(decoded.contains("52:54:00:bb:00:02 > 52:54:00:aa:00:01"), "no frame sent to the VM: {decoded}");
}
