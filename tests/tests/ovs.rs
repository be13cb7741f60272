//! OVS mode against a real Open vSwitch: the test's own ovsdb-server and ovs-vswitchd in the
//! test's namespace. OVSDB's rows are checked everywhere (on a kernel without the openvswitch
//! module, such as this project's build hosts, on the userspace `netdev` datapath); frames
//! through the mirror's GRE port need the kernel datapath and ip_gre, so those tests run in the
//! VM harness and skip, saying so, elsewhere.
// Test code throughout: helpers outside `#[test]` functions fail the test by panicking too.
#![expect(clippy::unwrap_used, clippy::expect_used, reason = "a failed step fails the test")]

use std::{
    process::Output,
    time::{Duration, Instant},
};

use serde_json::Value;
use vmsniff_tests::{
    daemon::{Daemon, session_state},
    frames::{self, PEER_MAC, VM_MAC, is_marked},
    netns::Netns,
    ovs::{Ovs, kernel_datapath},
    ovsdb::OvsdbServer,
    packet::{PacketSocket, Tunneled, decap_gre, decap_tunnel, reassemble_ipv4},
    privileged_on_every_kernel, privileged_on_host, privileged_on_host_and_one_guest, skip,
    tap::Vm,
    topology::assert_frames_eq,
    vmsniff,
};

const TAP: &str = "tapovs0";
const QBR: &str = "qbrovs0";
const QVB: &str = "qvbovs0";
const QVO: &str = "qvoovs0";
/// The VM's peer: a veth on br-int whose other end the test sends and captures on. Behind
/// br-int, so that both directions cross the mirrored port.
const PEER_PORT: &str = "pvo0";
const PEER: &str = "pvi0";
const COLLECTOR: &str = "10.231.0.2";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Plug {
    /// tap → qbr → qvb/qvo → br-int (Nova's hybrid plug).
    Hybrid,
    /// The tap itself on br-int.
    Native,
}

impl Plug {
    /// The port OVS mirrors.
    fn port(self) -> &'static str {
        match self {
            Plug::Hybrid => QVO,
            Plug::Native => TAP,
        }
    }
}

/// A compute node: Open vSwitch with br-int, a VM plugged into it, its peer behind br-int, and a
/// collector namespace behind the uplink up1.
struct Node {
    // Drop order: the switch stops before the namespaces go.
    ovs: Ovs,
    vm: Vm,
    peer: PacketSocket,
    collector: PacketSocket,
    _collector_ns: Netns,
    ns: Netns,
}

fn node(plug: Plug) -> Option<Node> {
    let ns = Netns::new("ovs");
    let ovs = Ovs::start(&ns)?;
    ovs.add_bridge("br-int");
    let vm = Vm::create(&ns, TAP);
    match plug {
        Plug::Hybrid => {
            ns.sh(&format!(
                "ip link add {QBR} type bridge stp_state 0 forward_delay 0 mcast_snooping 0
                 ip link set {QBR} up
                 ip link set {TAP} master {QBR}
                 ip link add {QVB} type veth peer name {QVO}
                 ip link set {QVB} master {QBR}
                 ip link set {QVB} up
                 ip link set {QVO} up"
            ));
            ovs.vsctl(&["add-port", "br-int", QVO]);
        }
        Plug::Native => {
            ovs.vsctl(&["add-port", "br-int", TAP]);
        }
    }
    ns.sh(&format!(
        "ip link add {PEER_PORT} type veth peer name {PEER}
         ip link set {PEER_PORT} up
         ip link set {PEER} up"
    ));
    ovs.vsctl(&["add-port", "br-int", PEER_PORT]);
    let peer = PacketSocket::open(&ns, PEER);
    let collector_ns = Netns::new("col");
    ns.sh(&format!(
        "ip link add up1 type veth peer name down1 netns {col}
         ip addr add 10.231.0.1/24 dev up1
         ip link set up1 up",
        col = collector_ns.name
    ));
    collector_ns.sh(&format!("ip addr add {COLLECTOR}/24 dev down1; ip link set down1 up"));
    let collector = PacketSocket::open(&collector_ns, "down1");
    Some(Node { ovs, vm, peer, collector, _collector_ns: collector_ns, ns })
}

impl Node {
    fn vmsniff(&self, args: &[&str]) -> Output {
        let mut all: Vec<&str> = args.to_vec();
        let address = self.ovs.address();
        all.extend(["--ovsdb", &address]);
        vmsniff::run(&self.ns, &all)
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.vmsniff(args);
        assert!(
            out.status.success(),
            "vmsniff {} failed ({}):\n{}{}\n--- ovs-vswitchd log:\n{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.ovs.log()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn fails(&self, args: &[&str]) -> String {
        let out = self.vmsniff(args);
        assert!(
            !out.status.success(),
            "vmsniff {} should have failed:\n{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    fn attach(&self, args: &[&str]) -> u32 {
        let mut all = vec!["attach"];
        all.extend_from_slice(args);
        let out = self.ok(&all);
        out.trim().parse().unwrap_or_else(|_| panic!("attach printed {out:?}, not a session id"))
    }

    fn status(&self) -> Value {
        let value: Value =
            serde_json::from_str(&self.ok(&["status", "--json"])).expect("status --json is JSON");
        assert_eq!(value["version"], 1);
        value
    }

    fn session(&self, id: u32) -> Value {
        self.status()["sessions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["session"] == id)
            .cloned()
            .unwrap_or_else(|| panic!("session {id} missing from status"))
    }

    /// Every row of the tables OVS mode touches, as ovs-vsctl prints them.
    fn rows(&self) -> String {
        [
            ("Bridge", "_uuid,name,ports,mirrors"),
            ("Port", "_uuid,name,interfaces,external_ids"),
            ("Interface", "_uuid,name,type,options,external_ids"),
            ("Mirror", "_uuid,name,select_src_port,select_dst_port,output_port,external_ids"),
        ]
        .iter()
        .map(|(table, columns)| self.ovs.vsctl(&[&format!("--columns={columns}"), "list", table]))
        .collect::<Vec<_>>()
        .join("\n")
    }

    /// Frames cross br-int both ways (the learning switch forwards, ovs-vswitchd answers upcalls).
    fn wait_until_forwarding(&mut self) {
        for attempt in 0..100u32 {
            self.vm.send(&frames::frame(VM_MAC, PEER_MAC, 0xffff_0000 + attempt, 60));
            if !self.peer.capture(1, Duration::from_millis(200), is_marked).is_empty() {
                self.peer.send(&frames::frame(PEER_MAC, VM_MAC, 0xffff_8000 + attempt, 60));
                if !self.vm.recv_marked(1, Duration::from_secs(2)).is_empty() {
                    self.peer.drain(Duration::from_millis(300), is_marked);
                    self.vm.recv_marked(usize::MAX, Duration::from_millis(300));
                    return;
                }
            }
        }
        panic!("br-int never forwarded between the VM and its peer:\n{}", self.ovs.log());
    }

    fn vm_sends(&mut self, frames: &[Vec<u8>]) {
        for f in frames {
            self.vm.send(f);
        }
        let got = self.peer.capture(frames.len(), Duration::from_secs(10), is_marked);
        assert_frames_eq("frames the VM sent, at the peer", frames, &got);
    }

    fn vm_receives(&mut self, frames: &[Vec<u8>]) {
        for f in frames {
            self.peer.send(f);
        }
        let got = self.vm.recv_marked(frames.len(), Duration::from_secs(10));
        assert_frames_eq("frames sent to the VM, at the VM", frames, &got);
    }

    /// GRE copies at the collector, reassembled when the host fragmented them, until `count`
    /// arrived or `wait` passed; each with its GRE key.
    fn copies(&self, count: usize, wait: Duration) -> Vec<(Option<u32>, Vec<u8>)> {
        let deadline = Instant::now() + wait;
        let (mut raw, mut copies) = (Vec::new(), Vec::new());
        while copies.len() < count && Instant::now() < deadline {
            raw.extend(
                self.collector.capture(1, Duration::from_millis(300), |f| f.len() > 34 && f[23] == 47),
            );
            copies = reassemble_ipv4(&raw)
                .iter()
                .filter_map(|p| decap_gre(p))
                .filter(|g| is_marked(&g.inner))
                .map(|g| (g.key, g.inner))
                .collect();
        }
        copies
    }

    /// A hard reboot of a hybrid-plugged VM as Nova does it: the tap goes, os-vif unplugs (qvo
    /// leaves br-int, qvb/qvo and qbr go) and plugs again, and a new tap joins the new qbr.
    fn hard_reboot_hybrid(&mut self) {
        self.ovs.vsctl(&["del-port", "br-int", QVO]);
        self.vm.recreate(&self.ns);
        self.ns.sh(&format!("ip link del {QVB}; ip link del {QBR}"));
        self.ns.sh(&format!(
            "ip link add {QBR} type bridge stp_state 0 forward_delay 0 mcast_snooping 0
             ip link set {QBR} up
             ip link add {QVB} type veth peer name {QVO}
             ip link set {QVB} master {QBR}
             ip link set {QVB} up
             ip link set {QVO} up"
        ));
        self.ovs.vsctl(&["add-port", "br-int", QVO]);
        self.ns.sh(&format!("ip link set {TAP} master {QBR}"));
    }

    /// vmsniff's rows: Mirror names and GRE port names.
    fn vmsniff_rows(&self) -> Vec<String> {
        let mut rows = self.ovs.names("Mirror");
        rows.extend(self.ovs.names("Port").into_iter().filter(|p| p.starts_with("vms")));
        rows
    }

    /// The UUID of the Port row the Mirror of session `id` selects (`[]` when none).
    fn mirror_selects(&self, id: u64) -> (String, String) {
        let mirror = format!("vmsniff-{id}");
        (
            self.ovs.vsctl(&["get", "Mirror", &mirror, "select_src_port"]),
            self.ovs.vsctl(&["get", "Mirror", &mirror, "select_dst_port"]),
        )
    }

    /// Moves the VM from the hybrid plug to the native one: qvo leaves br-int, qvb/qvo and qbr
    /// go (the tap with them leaves qbr), and the tap itself joins br-int.
    fn replug_native(&mut self) {
        self.ovs.vsctl(&["del-port", "br-int", QVO]);
        self.ns.sh(&format!("ip link del {QVB}; ip link del {QBR}"));
        self.ovs.vsctl(&["add-port", "br-int", TAP]);
    }
}

/// Where frames through the kernel datapath can be tested.
fn forwarding() -> bool {
    if !kernel_datapath() {
        skip("no openvswitch kernel module here: OVS forwarding runs in `cargo xtask vm-test`");
        return false;
    }
    true
}

/// One OVS session mirroring `plug`'s port both ways, then detached.
fn mirror_frames_both_ways(node: &mut Node, plug: Plug) {
    node.wait_until_forwarding();
    let id = node.attach(&["--tap", TAP, "--mode", "ovs", "--to", COLLECTOR, "--key", "7"]);
    let (out, into) = frames::both_ways(24);

    node.vm_sends(&out);
    let copies = node.copies(out.len(), Duration::from_secs(15));
    let inner: Vec<Vec<u8>> = copies.iter().map(|(_, f)| f.clone()).collect();
    assert_frames_eq(&format!("[{plug:?}] copies of frames the VM sent"), &out, &inner);
    assert!(copies.iter().all(|(key, _)| *key == Some(7)), "OVS sessions send --key itself: {copies:?}");

    node.vm_receives(&into);
    let copies = node.copies(into.len(), Duration::from_secs(15));
    let inner: Vec<Vec<u8>> = copies.iter().map(|(_, f)| f.clone()).collect();
    assert_frames_eq(&format!("[{plug:?}] copies of frames the VM received"), &into, &inner);

    // The Mirror's statistics lag by seconds.
    let total = (out.len() + into.len()) as u64;
    let deadline = Instant::now() + Duration::from_secs(30);
    let session = loop {
        let s = node.session(id);
        if s["ovs"]["tx-packets"].as_u64() >= Some(total) || Instant::now() > deadline {
            break s;
        }
        std::thread::sleep(Duration::from_secs(1));
    };
    assert_eq!(session["mode"], "ovs");
    assert_eq!(session["state"], "active");
    assert_eq!(session["ovs"]["port"], plug.port());
    assert_eq!(session["ovs"]["tx-packets"], total, "{session}");

    node.ok(&["detach", &id.to_string()]);
    node.vm_sends(&out[..4]);
    node.vm_receives(&into[..4]);
    assert!(node.copies(1, Duration::from_secs(3)).is_empty(), "copies after detach");
}

/// One Open vSwitch for every case: starting ovsdb-server and ovs-vswitchd and adding ports
/// takes tens of seconds on an emulated CPU, and the cases differ only in the plug and the
/// session's direction.
#[test]
fn frames_reach_the_collector_through_the_ovs_mirror_for_each_plug_and_direction() {
    if !privileged_on_every_kernel(
        "frames_reach_the_collector_through_the_ovs_mirror_for_each_plug_and_direction",
        "the openvswitch module's datapath and its GRE vport carry the mirror's copies",
    ) || !forwarding()
    {
        return;
    }
    let Some(mut node) = node(Plug::Hybrid) else { return };
    mirror_frames_both_ways(&mut node, Plug::Hybrid);
    node.replug_native();
    mirror_frames_both_ways(&mut node, Plug::Native);
    one_direction_selects_one_side_of_the_port(&mut node);
    an_ipv6_collector_receives_the_copies(&mut node);
}

/// An IPv6 collector, on the native plug: the mirror's ip6gre port carries the copies.
fn an_ipv6_collector_receives_the_copies(node: &mut Node) {
    node.ns.sh("sysctl -qw net.ipv6.conf.up1.disable_ipv6=0; ip addr add fd00:231::1/64 dev up1 nodad");
    node._collector_ns
        .sh("sysctl -qw net.ipv6.conf.down1.disable_ipv6=0; ip addr add fd00:231::2/64 dev down1 nodad");
    node.wait_until_forwarding();
    let id = node.attach(&["--tap", TAP, "--mode", "ovs", "--to", "fd00:231::2", "--key", "9"]);
    // IPv6 copies are never fragmented: frames whose copies fit the 1500-byte uplink.
    let (mut out, mut into) = frames::both_ways(8);
    out.retain(|f| f.len() <= 1400);
    into.retain(|f| f.len() <= 1400);
    node.vm_sends(&out);
    node.vm_receives(&into);
    let copies: Vec<Tunneled> = node
        .collector
        .capture(out.len() + into.len(), Duration::from_secs(15), |f| {
            decap_tunnel(f, 0).is_some_and(|t| is_marked(&t.inner))
        })
        .iter()
        .filter_map(|f| decap_tunnel(f, 0))
        .collect();
    let inner: Vec<Vec<u8>> = copies.iter().map(|t| t.inner.clone()).collect();
    let mut both = out.clone();
    both.extend(into.iter().cloned());
    assert_frames_eq("copies over IPv6 through the ip6gre port", &both, &inner);
    for t in &copies {
        assert_eq!(
            (t.outer_dst.to_string(), t.key, t.protocol),
            ("fd00:231::2".to_owned(), Some(9), Some(0x6558))
        );
    }
    node.ok(&["detach", &id.to_string()]);
}

/// `--direction out` on the native plug: only the frames the VM sent are copied.
fn one_direction_selects_one_side_of_the_port(node: &mut Node) {
    node.wait_until_forwarding();
    let id = node.attach(&["--tap", TAP, "--mode", "ovs", "--to", COLLECTOR, "--direction", "out"]);
    let (out, into) = frames::both_ways(8);
    node.vm_receives(&into);
    node.vm_sends(&out);
    let copies = node.copies(out.len() + 1, Duration::from_secs(8));
    let inner: Vec<Vec<u8>> = copies.iter().map(|(_, f)| f.clone()).collect();
    assert_frames_eq("--direction out: only the frames the VM sent", &out, &inner);
    assert!(copies.iter().all(|(key, _)| *key == Some(id)), "key defaults to the session id");
    node.ok(&["detach", "--tap", TAP]);
}

#[test]
fn attach_and_detach_leave_other_mirrors_and_ports_alone() {
    if !privileged_on_host(
        "attach_and_detach_leave_other_mirrors_and_ports_alone",
        "OVSDB rows and messages, which ovs-vswitchd on the userspace datapath applies as well",
    ) {
        return;
    }
    let Some(node) = node(Plug::Hybrid) else { return };
    // Someone's own mirror of the peer's port, with its own output, and an ordinary port.
    node.ns.sh("ip link add spo0 type veth peer name spo1; ip link set spo0 up; ip link add other0 type veth peer name other1; ip link set other0 up");
    node.ovs.vsctl(&["add-port", "br-int", "spo0", "--", "add-port", "br-int", "other0"]);
    node.ovs.vsctl(&[
        "--",
        "--id=@p",
        "get",
        "Port",
        PEER_PORT,
        "--",
        "--id=@o",
        "get",
        "Port",
        "spo0",
        "--",
        "--id=@m",
        "create",
        "Mirror",
        "name=span0",
        "select-src-port=@p",
        "output-port=@o",
        "--",
        "add",
        "Bridge",
        "br-int",
        "mirrors",
        "@m",
    ]);
    let before = node.rows();

    // --dry-run prints the transaction and the ovs-vsctl command, and changes nothing.
    let dry = node.ok(&["attach", "--tap", TAP, "--mode", "ovs", "--to", COLLECTOR, "--dry-run"]);
    let (json, vsctl) = dry.split_once("\n# The same change with ovs-vsctl:\n").expect("both parts");
    let transaction: Value = serde_json::from_str(json).expect("the transaction is JSON");
    assert_eq!(transaction["method"], "transact");
    assert_eq!(transaction["params"][0], "Open_vSwitch");
    assert!(vsctl.starts_with("ovs-vsctl "), "{vsctl}");
    assert_eq!(node.rows(), before, "--dry-run changed OVSDB");

    // A session id is shared with eBPF mode: an eBPF session takes 1, OVS mode gets 2.
    node.ns.sh("ip link add mir0 type veth peer name mir1; ip link set mir0 up; ip link set mir1 up");
    let ebpf = node.attach(&["--tap", TAP, "--to-dev", "mir0"]);
    assert_eq!(ebpf, 1);
    let id = node.attach(&["--tap", TAP, "--mode", "ovs", "--to", COLLECTOR]);
    assert_eq!(id, 2);
    assert_eq!(node.ovs.names("Mirror"), ["span0", "vmsniff-2"]);
    let ports = node.ovs.names("Port");
    for port in ["br-int", "other0", PEER_PORT, QVO, "spo0", "vms2-ovs"] {
        assert!(ports.iter().any(|p| p == port), "{port} missing from {ports:?}");
    }
    // ovs-vsctl quotes a string only when it needs to.
    let get = |table: &str, row: &str, column: &str| {
        node.ovs.vsctl(&["get", table, row, column]).trim_matches('"').to_owned()
    };
    assert_eq!(get("Interface", "vms2-ovs", "type"), "gre");
    assert_eq!(get("Interface", "vms2-ovs", "options:remote_ip"), COLLECTOR);
    assert_eq!(get("Interface", "vms2-ovs", "options:key"), "2");
    assert_eq!(get("Interface", "vms2-ovs", "options:df_default"), "false");
    assert_eq!(get("Mirror", "vmsniff-2", "external_ids:vmsniff-session"), "2");
    assert_eq!(get("Mirror", "vmsniff-2", "external_ids:vmsniff-tap"), TAP);
    let qvo = get("Port", QVO, "_uuid");
    assert_eq!(get("Mirror", "vmsniff-2", "select_src_port"), format!("[{qvo}]"));
    assert_eq!(get("Mirror", "vmsniff-2", "select_dst_port"), format!("[{qvo}]"));
    assert_eq!(get("Mirror", "vmsniff-2", "output_port"), get("Port", "vms2-ovs", "_uuid"));

    let status = node.status();
    let sessions = status["sessions"].as_array().unwrap();
    assert_eq!(sessions.len(), 2);
    assert_eq!((sessions[0]["session"].as_u64(), sessions[0]["mode"].as_str()), (Some(1), Some("ebpf")));
    let ovs = &sessions[1];
    assert_eq!((ovs["session"].as_u64(), ovs["mode"].as_str()), (Some(2), Some("ovs")));
    assert_eq!(ovs["tap"], TAP);
    assert_eq!(ovs["to"], COLLECTOR);
    assert_eq!((ovs["key"].as_u64(), ovs["direction"].as_str()), (Some(2), Some("both")));
    assert_eq!(ovs["ovs"]["bridge"], "br-int");
    assert_eq!(ovs["ovs"]["port"], QVO);
    assert_eq!(ovs["ovs"]["mirror"], "vmsniff-2");
    assert_eq!(ovs["ovs"]["gre-port"], "vms2-ovs");
    let table = node.ok(&["status"]);
    assert!(table.contains("vms2-ovs") && table.contains("TX PACKETS"), "{table}");

    // The same collector and key twice would be two identical tunnels.
    let err = node.fails(&["attach", "--tap", TAP, "--mode", "ovs", "--to", COLLECTOR, "--key", "2"]);
    assert!(err.contains("choose another --key"), "{err}");

    node.ok(&["detach", "2"]);
    node.ok(&["detach", "1"]);
    assert_eq!(node.rows(), before, "detach left or took rows");
}

#[test]
fn an_ipv6_collector_gets_an_ip6gre_port_and_detach_takes_exactly_its_rows() {
    if !privileged_on_host(
        "an_ipv6_collector_gets_an_ip6gre_port_and_detach_takes_exactly_its_rows",
        "OVSDB rows and messages, which ovs-vswitchd on the userspace datapath applies as well",
    ) {
        return;
    }
    let Some(node) = node(Plug::Native) else { return };
    node.ns.sh("sysctl -qw net.ipv6.conf.up1.disable_ipv6=0; ip addr add fd00:231::1/64 dev up1 nodad");
    let before = node.rows();
    let dry = node.ok(&["attach", "--tap", TAP, "--mode", "ovs", "--to", "fd00:231::2", "--dry-run"]);
    assert!(dry.contains("type=ip6gre options:remote_ip=fd00:231::2"), "{dry}");
    assert_eq!(node.rows(), before, "--dry-run changed OVSDB");
    let id =
        node.attach(&["--tap", TAP, "--mode", "ovs", "--to", "fd00:231::2", "--ttl", "9", "--tos", "32"]);
    let get =
        |column: &str| node.ovs.vsctl(&["get", "Interface", "vms1-ovs", column]).trim_matches('"').to_owned();
    assert_eq!(get("type"), "ip6gre");
    assert_eq!(get("options:remote_ip"), "fd00:231::2");
    assert_eq!((get("options:ttl"), get("options:tos")), ("9".to_owned(), "32".to_owned()));
    let session = node.session(id);
    assert_eq!((&session["to"], &session["family"]), (&"fd00:231::2".into(), &"ipv6".into()), "{session}");
    let err = node.fails(&["attach", "--tap", TAP, "--mode", "ovs", "--to", "fd00:231:0::2", "--key", "1"]);
    assert!(err.contains("choose another --key"), "the same tunnel, spelled otherwise: {err}");
    for (to, needle) in
        [("fd00:231::1", "an address of this host"), ("2001:db8::9", "no route to 2001:db8::9")]
    {
        let err = node.fails(&["attach", "--tap", TAP, "--mode", "ovs", "--to", to]);
        assert!(err.contains(needle), "{to}: {err}");
    }
    node.ok(&["detach", &id.to_string()]);
    assert_eq!(node.rows(), before, "detach left or took rows");
}

#[test]
fn a_cleared_mirror_leaves_a_port_that_detach_still_removes() {
    if !privileged_on_host(
        "a_cleared_mirror_leaves_a_port_that_detach_still_removes",
        "OVSDB rows and messages, which ovs-vswitchd on the userspace datapath applies as well",
    ) {
        return;
    }
    let Some(node) = node(Plug::Native) else { return };
    let before = node.rows();
    let id = node.attach(&["--tap", TAP, "--mode", "ovs", "--to", COLLECTOR]);
    // The classic cleanup, which takes every mirror of the bridge.
    node.ovs.vsctl(&["clear", "Bridge", "br-int", "mirrors"]);
    let session = node.session(id);
    assert_eq!(session["state"], "mirror-gone", "{session}");
    node.ok(&["detach", TAP]);
    assert_eq!(node.rows(), before);
}

#[test]
fn ovs_mode_refuses_bad_input_and_changes_nothing() {
    if !privileged_on_host(
        "ovs_mode_refuses_bad_input_and_changes_nothing",
        "argument checks, messages and OVSDB rows",
    ) {
        return;
    }
    let Some(node) = node(Plug::Hybrid) else { return };
    node.ns.sh(&format!(
        "ip link add lb0 type bridge; ip link set lb0 up
         ip tuntap add taplb0 mode tap; ip link set taplb0 master lb0; ip link set taplb0 up
         ip addr add 10.77.0.1/24 dev {QBR}"
    ));
    let before = node.rows();
    let attach = |extra: &[&str]| {
        let mut args = vec!["attach", "--mode", "ovs"];
        args.extend_from_slice(extra);
        node.fails(&args)
    };
    let cases: &[(&[&str], &[&str])] = &[
        (&["--tap", "taplb0", "--to", COLLECTOR], &["Linux bridge lb0", "drop --mode ovs"]),
        (
            &["--tap", TAP, "--to", COLLECTOR, "--filter", "icmp", "--snaplen", "100"],
            &["--filter, --snaplen are eBPF mode's"],
        ),
        (&["--tap", TAP, "--to", COLLECTOR, "--attach-mode", "tcx"], &["--attach-mode is eBPF mode's"]),
        (&["--tap", TAP, "--to", "300.1.2.3"], &["not an IP address"]),
        (&["--tap", TAP, "--to", "10.77.0.2"], &["mirrored into themselves", QBR]),
        (&["--tap", TAP, "--to", "10.231.0.1"], &["an address of this host"]),
        (&["--tap", TAP, "--to", "203.0.113.9"], &["no route to 203.0.113.9"]),
    ];
    for (args, expected) in cases {
        let err = attach(args);
        for e in *expected {
            assert!(err.contains(e), "{args:?}: {e:?} not in {err}");
        }
    }
    let err = vmsniff::fails(
        &node.ns,
        &["attach", "--tap", TAP, "--mode", "ovs", "--to", COLLECTOR, "--ovsdb", "unix:/nonexistent/db.sock"],
    );
    assert!(err.contains("--ovsdb unix:PATH"), "{err}");
    let err = node.fails(&["mirror", "--tap", TAP, "--mode", "ovs", "--to", COLLECTOR]);
    assert!(err.contains("vmsniff attach --mode ovs"), "{err}");
    assert_eq!(node.rows(), before, "a refused attach changed OVSDB");
}

#[test]
fn an_attach_that_ovs_vswitchd_never_applies_leaves_no_row() {
    if !privileged_on_host(
        "an_attach_that_ovs_vswitchd_never_applies_leaves_no_row",
        "OVSDB rows, with no ovs-vswitchd at all",
    ) {
        return;
    }
    let ns = Netns::new("ovsdb");
    let Some(server) = OvsdbServer::start() else { return };
    let _vm = Vm::create(&ns, TAP);
    ns.sh("ip link add up1 type veth peer name down1; ip addr add 10.231.0.1/24 dev up1; ip link set up1 up; ip link set down1 up");
    // Only the database: no ovs-vswitchd to apply anything.
    server.vsctl(&["add-br", "br-int", "--", "add-port", "br-int", TAP]);
    let list = |table: &str| {
        let out = std::process::Command::new("ovs-vsctl")
            .args([&format!("--db={}", server.address()), "--no-wait", "list", table])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let before: Vec<String> = ["Port", "Interface", "Mirror", "Bridge"].iter().map(|t| list(t)).collect();
    let bin = vmsniff::binary();
    let address = server.address();
    let out = ns.enter(move || {
        std::process::Command::new(bin)
            .args(["attach", "--tap", TAP, "--mode", "ovs", "--to", COLLECTOR, "--ovsdb", &address])
            .env("VMSNIFF_OVS_TIMEOUT", "3")
            .output()
            .unwrap()
    });
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("is it running"), "{err}");
    let after: Vec<String> = ["Port", "Interface", "Mirror", "Bridge"].iter().map(|t| list(t)).collect();
    // The bridge keeps its ports and mirrors (only next_cfg of the Open_vSwitch row moved).
    assert_eq!(after[..3], before[..3], "rows left behind");
    let bridge_columns = |text: &str| {
        text.lines()
            .filter(|l| l.starts_with("ports") || l.starts_with("mirrors"))
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert_eq!(bridge_columns(&after[3]), bridge_columns(&before[3]));
    let status = vmsniff::ok(&ns, &["status", "--json", "--ovsdb", &server.address()]);
    assert!(!status.contains("\"ovs\""), "{status}");
}

/// The daemon keeps an OVS session (`mode = "ovs"`): made once the VM's port is there, pointed
/// at the new port after a hard reboot as the same session, adopted after kill -9, and removed
/// with everything it made when the daemon stops. Frames are checked where the kernel datapath
/// forwards; the rows everywhere.
#[test]
fn a_stop_is_heard_while_an_ovs_attach_waits_for_ovs_vswitchd() {
    if !privileged_on_host(
        "a_stop_is_heard_while_an_ovs_attach_waits_for_ovs_vswitchd",
        "the daemon's event loop and OVSDB rows, with no ovs-vswitchd at all",
    ) {
        return;
    }
    let ns = Netns::new("ovsstop");
    let Some(server) = OvsdbServer::start() else { return };
    let _vm = Vm::create(&ns, TAP);
    ns.sh("ip link add up1 type veth peer name down1; ip addr add 10.231.0.1/24 dev up1; ip link set up1 up; ip link set down1 up");
    // Only the database: the attach waits for an ovs-vswitchd that never comes (30 s).
    server.vsctl(&["add-br", "br-int", "--", "add-port", "br-int", TAP]);
    let address = server.address();
    let mirrors = || {
        let out = std::process::Command::new("ovs-vsctl")
            .args([&format!("--db={address}"), "--no-wait", "--bare", "--columns=name", "list", "Mirror"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    let config = format!("[session.ids]\ntap = \"{TAP}\"\nmode = \"ovs\"\nto = \"{COLLECTOR}\"\n");
    let mut daemon = Daemon::start_with(&ns, &config, &["--ovsdb", &address]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while mirrors().is_empty() {
        assert!(Instant::now() < deadline, "the daemon never sent its attach:\n{}", daemon.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    // The attach's rows are in OVSDB and it now waits for ovs-vswitchd to apply them.
    let stopped = Instant::now();
    assert!(daemon.stop_with(nix::sys::signal::Signal::SIGTERM), "{}", daemon.log());
    let took = stopped.elapsed();
    println!("stop while an OVS attach waited: {took:.2?}");
    // Generous for a loaded machine, and far below the 30 s the wait would otherwise last.
    assert!(took < Duration::from_secs(10), "SIGTERM took {took:?}:\n{}", daemon.log());
    assert_eq!(mirrors(), "", "the cut-short attach left its Mirror");
    let status = vmsniff::ok(&ns, &["status", "--json", "--ovsdb", &address]);
    assert!(!status.contains("\"ovs\""), "{status}");
}

#[test]
fn the_daemon_keeps_an_ovs_session_across_a_hard_reboot_and_a_restart() {
    if !privileged_on_host_and_one_guest(
        "the_daemon_keeps_an_ovs_session_across_a_hard_reboot_and_a_restart",
        "the daemon's OVS rows are its own logic; frames through the OVS mirror are checked on every kernel by frames_reach_the_collector_through_the_ovs_mirror_for_each_plug_and_direction",
    ) {
        return;
    }
    let Some(mut node) = node(Plug::Hybrid) else { return };
    let frames = kernel_datapath();
    if frames {
        node.wait_until_forwarding();
    }
    let before = names(&node);
    let address = node.ovs.address();
    // A second VM on a plain Linux bridge: an OVS session cannot mirror it, and waiting would
    // not change that.
    let lb_vm = Vm::create(&node.ns, "taplb0");
    node.ns.sh("ip link add brlb0 type bridge; ip link set brlb0 up; ip link set taplb0 master brlb0");
    // No resync within the test: events alone must do it.
    let config = format!(
        "[daemon]\nresync-seconds = 3600\n[session.ids]\ntap = \"{TAP}\"\nmode = \"ovs\"\nto = \"{COLLECTOR}\"\nkey = 7\n\
         [session.lb]\ntap = \"taplb0\"\nmode = \"ovs\"\nto = \"{COLLECTOR}\"\n"
    );
    let mut daemon = Daemon::start_with(&node.ns, &config, &["--ovsdb", &address]);
    let active = |status: &Value| session_state(status, "ids").0 == "active";
    let status = daemon.wait_for(&node.ns, "the OVS session active", active);
    let id = session_state(&status, "ids").1.expect("a session id");
    assert_eq!(status["daemon"]["sessions"]["ids"]["mode"], "ovs");
    let lb = &status["daemon"]["sessions"]["lb"];
    assert_eq!(lb["state"], "error", "{lb}");
    assert!(lb["reason"].as_str().unwrap().contains("Linux bridge brlb0"), "{lb}");
    let qvo = node.ovs.vsctl(&["get", "Port", QVO, "_uuid"]);
    assert_eq!(node.mirror_selects(id), (format!("[{qvo}]"), format!("[{qvo}]")));
    assert_eq!(
        node.ovs.vsctl(&["get", "Mirror", &format!("vmsniff-{id}"), "external_ids:vmsniff-daemon-session"]),
        "ids"
    );
    let mirrored = |node: &mut Node, what: &str| {
        if !frames {
            return;
        }
        let (out, into) = frames::both_ways(6);
        node.vm_sends(&out);
        node.vm_receives(&into);
        let copies = node.copies(out.len() + into.len(), Duration::from_secs(15));
        let inner: Vec<Vec<u8>> = copies.iter().map(|(_, f)| f.clone()).collect();
        assert_frames_eq(what, &[out, into].concat(), &inner);
        assert!(copies.iter().all(|(key, _)| *key == Some(7)), "{what}: the GRE key: {copies:?}");
    };
    mirrored(&mut node, "copies from the daemon's OVS session");

    let selects_again = |node: &Node, old: &str, what: &str| {
        let new = node.ovs.vsctl(&["get", "Port", QVO, "_uuid"]);
        assert_ne!(old, new, "{what} made a new Port row");
        let deadline = Instant::now() + Duration::from_secs(60);
        while node.mirror_selects(id) != (format!("[{new}]"), format!("[{new}]")) {
            assert!(
                Instant::now() < deadline,
                "after {what} the Mirror never selected the new port:\n{}",
                daemon.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        new
    };
    node.hard_reboot_hybrid();
    let qvo = selects_again(&node, &qvo, "a hard reboot");
    // The port alone deleted and added again (os-vif replugging, or by hand): no link event,
    // OVSDB's own.
    node.ovs.vsctl(&["del-port", "br-int", QVO, "--", "add-port", "br-int", QVO]);
    selects_again(&node, &qvo, "an OVSDB-only replug");
    let status = daemon.wait_for(&node.ns, "active again", active);
    assert_eq!(session_state(&status, "ids").1, Some(id), "the same session after the reboot");
    if frames {
        node.wait_until_forwarding();
        // The probes were mirrored too: leave them out of the count.
        node.copies(usize::MAX, Duration::from_secs(3));
    }
    mirrored(&mut node, "copies after the hard reboot");

    // kill -9, then start with /run lost as after a host reboot (the rows are in OVSDB, on
    // disk): the rows are adopted from what they record, not made twice.
    assert!(!daemon.stop_with(nix::sys::signal::Signal::SIGKILL));
    std::fs::remove_dir_all(daemon.run_dir()).expect("remove the daemon's run directory");
    daemon.spawn(&node.ns);
    let status = daemon.wait_for(&node.ns, "adopted", active);
    assert_eq!(session_state(&status, "ids").1, Some(id), "the same session after kill -9");
    assert_eq!(node.vmsniff_rows(), [format!("vmsniff-{id}"), format!("vms{id}-ovs")]);
    let log = daemon.log();
    assert_eq!(log.matches("attached as OVS session").count(), 1, "{log}");
    assert!(log.contains(&format!("OVS session {id} mirrors")), "the reselect is logged:\n{log}");

    assert!(
        daemon.stop_with(nix::sys::signal::Signal::SIGTERM),
        "the daemon's stop failed:\n{}",
        daemon.log()
    );
    assert!(node.vmsniff_rows().is_empty(), "rows left: {:?}", node.vmsniff_rows());
    assert_eq!(names(&node), before, "OVSDB's rows after the daemon stopped");
    drop(lb_vm);
}

/// The names in every table OVS mode touches.
fn names(node: &Node) -> Vec<Vec<String>> {
    ["Bridge", "Port", "Interface", "Mirror"].iter().map(|t| node.ovs.names(t)).collect()
}
