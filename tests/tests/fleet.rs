//! The fleet: mirrors declared in a real etcd (Debian's etcd-server on 127.0.0.1, its own data
//! directory and ports) and kept by nodes' daemons, each node a network namespace with its own
//! run directory, tap and libvirt test-driver XML.
// Test code throughout: helpers outside `#[test]` functions fail the test by panicking too.
#![expect(clippy::expect_used, reason = "a failed step fails the test")]

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use nix::sys::signal::Signal;
use serde_json::Value;
use vmsniff_tests::{
    collect::{Collector, GreSender, gre, read_pcapng_file, summary},
    daemon::Daemon,
    etcd::Etcd,
    frames::{self, is_marked},
    metrics::scrape,
    netns::Netns,
    ovs::Ovs,
    packet::PacketSocket,
    privileged_on_host,
    tap::Vm,
    topology::Hypervisor,
    vmsniff,
};

const HOST_ONLY: &str = "the fleet's control plane (etcd, libvirt, the daemon's loop) is user space";

/// `vmsniff fleet ARGS` against `etcd`, run in `ns`.
fn fleet_args<'a>(etcd: &'a str, args: &[&'a str]) -> Vec<&'a str> {
    let mut all = vec!["fleet", "--endpoints", etcd];
    all.extend_from_slice(args);
    all
}

fn status(ns: &Netns, etcd: &str) -> Value {
    status_in(ns, etcd, "/vmsniff")
}

/// `fleet status --json` of the fleet under `prefix`.
fn status_in(ns: &Netns, etcd: &str, prefix: &str) -> Value {
    let out = vmsniff::ok(ns, &fleet_args(etcd, &["--prefix", prefix, "status", "--json"]));
    serde_json::from_str(&out).expect("fleet status --json is JSON")
}

#[test]
fn cli_declares_with_unique_keys_and_refuses_bad_input_writing_nothing() {
    if !privileged_on_host("cli_declares_with_unique_keys_and_refuses_bad_input_writing_nothing", HOST_ONLY) {
        return;
    }
    let Some(etcd) = Etcd::start() else { return };
    let ctl = Netns::new("ctl");
    etcd.reach_from(&ctl);
    let ep = etcd.endpoint();
    let ep = ep.as_str();
    // Keys: the lowest free one, a given one, gaps filled again after a removal.
    assert_eq!(
        vmsniff::ok(&ctl, &fleet_args(ep, &["mirror", "web", "c-private", "--to", "192.0.2.2"])).trim(),
        "1"
    );
    assert_eq!(
        vmsniff::ok(&ctl, &fleet_args(ep, &["mirror", "db", "c-web", "--to", "192.0.2.2", "--key", "5"]))
            .trim(),
        "5"
    );
    assert_eq!(
        vmsniff::ok(&ctl, &fleet_args(ep, &["mirror", "app", "c-dup", "--to", "192.0.2.2"])).trim(),
        "2"
    );
    vmsniff::ok(&ctl, &fleet_args(ep, &["rm", "web"]));
    assert_eq!(
        vmsniff::ok(
            &ctl,
            &fleet_args(ep, &["mirror", "web2", "c-private", "--to", "192.0.2.2", "--encap", "erspan"])
        )
        .trim(),
        "1"
    );
    vmsniff::ok(&ctl, &fleet_args(ep, &["update", "db", "--filter", "tcp port 443", "--snaplen", "96"]));
    let s = status(&ctl, ep);
    let db = s["mirrors"].as_array().unwrap().iter().find(|m| m["name"] == "db").unwrap();
    assert_eq!(db["key"], 5);
    assert!(db["args"].to_string().contains("tcp port 443"), "{db}");
    assert_eq!(db["state"], "waiting-for-vm", "no node runs it: {db}");

    // Every refusal names the problem and the fix and leaves etcd's revision where it was.
    let before = etcd.revision();
    let bad = "127.0.0.1:1";
    let cacert = etcd.dir.join("not-a-ca.pem");
    std::fs::write(&cacert, "not a certificate").unwrap();
    let cacert = cacert.to_string_lossy().into_owned();
    for (args, expected) in [
        (
            fleet_args(ep, &["mirror", "x", "c-x", "--to", "192.0.2.2", "--key", "5"]),
            "key 5 is held by fleet mirror db",
        ),
        (fleet_args(ep, &["mirror", "db", "c-x", "--to", "192.0.2.2"]), "fleet mirror db exists already"),
        (
            fleet_args(ep, &["mirror", "x", "c-x", "--to", "192.0.2.2", "--encap", "erspan", "--key", "600"]),
            "K is at most 511",
        ),
        (fleet_args(ep, &["mirror", "x", "tapf7eae624-34", "--to", "192.0.2.2"]), "taps are per node"),
        (fleet_args(ep, &["mirror", "x", "--tap", "tap0", "--to", "192.0.2.2"]), "taps are per node"),
        (fleet_args(ep, &["mirror", "a/b", "c-x", "--to", "192.0.2.2"]), "use 1 to 64 letters"),
        (
            fleet_args(ep, &["mirror", "x", "c-x", "--to", "192.0.2.2", "--filter", "tcp port"]),
            "can't parse filter",
        ),
        (fleet_args(ep, &["mirror", "x", "c-x", "--to", "192.0.2.2", "--direction", "sideways"]), "sideways"),
        (fleet_args(ep, &["update", "db"]), "nothing to change"),
        (fleet_args(ep, &["update", "nope", "--filter", "tcp"]), "no fleet mirror nope"),
        (fleet_args(ep, &["rm", "nope"]), "no fleet mirror nope"),
        (fleet_args(bad, &["mirror", "x", "c-x", "--to", "192.0.2.2"]), "cannot reach etcd at 127.0.0.1:1"),
        (fleet_args(ep, &["--cacert", "/nonexistent/ca.pem", "status"]), "cannot read the CA certificate"),
        (fleet_args(ep, &["--cacert", &cacert, "mirror", "x", "c-x", "--to", "192.0.2.2"]), "--cacert"),
        (fleet_args(ep, &["--prefix", "vmsniff/", "status"]), "key prefix"),
    ] {
        let err = vmsniff::fails(&ctl, &args);
        assert!(err.contains(expected), "vmsniff {}: expected {expected:?} in:\n{err}", args.join(" "));
    }
    assert_eq!(etcd.revision(), before, "a refused command wrote to etcd");
    // ETCDCTL_* is read as etcdctl reads it.
    let out = ctl.sh(&format!("ETCDCTL_ENDPOINTS={ep} {} fleet status", vmsniff::binary().display()));
    assert!(out.contains("db") && out.contains("web2"), "{out}");

    // With etcd's authentication on: a user and password as etcdctl takes them.
    etcd.enable_auth("s3cret");
    let err = vmsniff::fails(&ctl, &fleet_args(ep, &["--user", "root:wrong", "status"]));
    assert!(err.contains("refused the user or password"), "{err}");
    let err = vmsniff::fails(&ctl, &fleet_args(ep, &["--user", "root", "status"]));
    assert!(err.contains("has no password"), "{err}");
    let out = vmsniff::ok(&ctl, &fleet_args(ep, &["--user", "root", "--password", "s3cret", "status"]));
    assert!(out.contains("web2"), "{out}");
    let out = ctl.sh(&format!(
        "ETCDCTL_ENDPOINTS={ep} ETCDCTL_USER=root:s3cret {} fleet mirror app2 c-app --to 192.0.2.2",
        vmsniff::binary().display()
    ));
    assert_eq!(out.trim(), "3", "the lowest free key");
}

/// A Nova-shaped domain whose NIC 0 is `TAP` in br0, as libvirt's test driver reads it.
const DOMAIN: &str = r#"<domain type='test'>
  <name>instance-00000042</name>
  <uuid>4242a9c1-7b4d-4e8f-9a6b-1c2d3e4f5a42</uuid>
  <metadata>
    <nova:instance xmlns:nova="http://openstack.org/xmlns/libvirt/nova/1.1">
      <nova:name>c-mig</nova:name>
    </nova:instance>
  </metadata>
  <memory unit='KiB'>1048576</memory>
  <os><type arch='x86_64'>hvm</type></os>
  <devices>
    <interface type='bridge'>
      <mac address='52:54:00:aa:00:01'/>
      <source bridge='br0'/>
      <target dev='tapvm0'/>
      <model type='virtio'/>
    </interface>
  </devices>
</domain>"#;

/// One compute node: a namespace with the VM's tap (when the VM is here), its libvirt XML and
/// its daemon.
struct Node {
    hv: Hypervisor,
    mirror: PacketSocket,
    xml: PathBuf,
    daemon: Daemon,
}

impl Node {
    fn new(name: &'static str, etcd: &Etcd, vm_here: bool) -> Node {
        Node::with(name, etcd, vm_here, "", &[])
    }

    /// As [`Node::new`], with `extra` lines in the daemon's `[fleet]` and `env` in its
    /// environment.
    fn with(name: &'static str, etcd: &Etcd, vm_here: bool, extra: &str, env: &[(&str, &str)]) -> Node {
        let mut hv = Hypervisor::new();
        let mirror = hv.mirror_port();
        etcd.reach_from(&hv.ns);
        let xml = std::env::temp_dir().join(format!("vmsniff-fleet-{}-{name}.xml", std::process::id()));
        if !vm_here {
            hv.port.vm.unplug(&hv.ns);
        }
        write_node(&xml, vm_here);
        let uri = format!("test://{}", xml.display());
        let daemon =
            Daemon::start_with_env(&hv.ns, &node_config(etcd, name, extra), &["--connect", &uri], env);
        Node { hv, mirror, xml, daemon }
    }

    /// The VM arrives: libvirt defines the domain, then creates and plugs its tap.
    fn vm_arrives(&mut self) {
        write_node(&self.xml, true);
        self.hv.recreate_tap();
    }

    /// The VM leaves: the domain goes, and its tap with it.
    fn vm_leaves(&mut self) {
        write_node(&self.xml, false);
        self.hv.port.vm.unplug(&self.hv.ns);
    }

    /// The kernel sessions in this node's namespace (`vmsniff status --json`).
    fn sessions(&self) -> Vec<Value> {
        let out = vmsniff::ok(&self.hv.ns, &["status", "--json"]);
        let status: Value = serde_json::from_str(&out).expect("status --json is JSON");
        status["sessions"].as_array().cloned().unwrap_or_default()
    }

    /// The VM sends marked frames; returns how many copies reached this node's `--to-dev`.
    fn copies(&mut self, n: usize) -> usize {
        self.mirror.drain(Duration::from_millis(100), is_marked);
        let sent: Vec<Vec<u8>> =
            (0..n).map(|i| frames::frame(frames::VM_MAC, frames::PEER_MAC, 0x4000 + i as u32, 100)).collect();
        self.hv.vm_sends(&sent);
        self.mirror.capture(n, Duration::from_secs(5), is_marked).len()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.xml);
    }
}

/// A node's daemon config: the fleet at `etcd` as node `name`, with `extra` lines in `[fleet]`.
fn node_config(etcd: &Etcd, name: &str, extra: &str) -> String {
    format!(
        "[daemon]\nresync-seconds = 1\n\n[fleet]\nendpoints = [\"{}\"]\nnode = \"{name}\"\nlease-seconds = 2\nreport-seconds = 1\n{extra}",
        etcd.endpoint()
    )
}

fn write_node(xml: &Path, vm_here: bool) {
    write_domain(xml, if vm_here { DOMAIN } else { "" });
}

fn write_domain(xml: &Path, domain: &str) {
    std::fs::write(xml, format!("<node>\n{domain}\n</node>\n")).expect("write the node's libvirt XML");
}

/// `fleet status --json`'s mirror `name` once `ready` holds for it (within 60 s: an attach in
/// the VM harness's emulated CPUs takes tens of seconds on a loaded machine).
fn wait_mirror(ctl: &Netns, ep: &str, name: &str, what: &str, ready: impl Fn(&Value) -> bool) -> Value {
    wait_mirror_in(ctl, ep, "/vmsniff", name, what, ready)
}

/// [`wait_mirror`] in the fleet under `prefix`.
fn wait_mirror_in(
    ctl: &Netns,
    ep: &str,
    prefix: &str,
    name: &str,
    what: &str,
    ready: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let status = status_in(ctl, ep, prefix);
        let mirror = status["mirrors"].as_array().and_then(|m| m.iter().find(|m| m["name"] == name)).cloned();
        if let Some(m) = mirror.filter(|m| ready(m)) {
            return m;
        }
        assert!(Instant::now() < deadline, "{what}: not within 60 s: {status:#}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn wait_until(what: &str, ready: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !ready() {
        assert!(Instant::now() < deadline, "{what}: not within 30 s");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn active_on(m: &Value, node: &str) -> bool {
    m["state"] == "active" && m["nodes"] == serde_json::json!([node])
}

#[test]
fn a_fleet_mirror_follows_its_vm_and_outlives_etcd_outages_and_node_loss() {
    if !privileged_on_host("a_fleet_mirror_follows_its_vm_and_outlives_etcd_outages_and_node_loss", HOST_ONLY)
    {
        return;
    }
    let Some(mut etcd) = Etcd::start() else { return };
    let ctl = Netns::new("ctl");
    etcd.reach_from(&ctl);
    let ep = etcd.endpoint();
    let ep = ep.as_str();
    let mut a = Node::new("a", &etcd, true);
    let mut b = Node::new("b", &etcd, false);
    wait_until("both nodes registered", || {
        let out = vmsniff::ok(&ctl, &fleet_args(ep, &["nodes", "--json"]));
        out.contains("\"a\"") && out.contains("\"b\"")
    });

    // Declared once, run by the node that has the VM (named by its UUID, upper case).
    let key = vmsniff::ok(
        &ctl,
        &fleet_args(ep, &["mirror", "web", "4242A9C1-7B4D-4E8F-9A6B-1C2D3E4F5A42", "--to-dev", "mir0"]),
    );
    let m = wait_mirror(&ctl, ep, "web", "active on a", |m| active_on(m, "a"));
    assert_eq!(m["key"].to_string(), key.trim());
    assert_eq!(a.copies(5), 5, "copies on a");
    assert!(b.sessions().is_empty(), "b mirrors a VM it does not have");

    // Live migration: the domain and its tap appear on b (both nodes mirror during the
    // handover), a's tap goes (a waits, and a waiting fleet mirror holds no session: the VM is
    // not on a), then a's domain.
    let started = Instant::now();
    b.vm_arrives();
    wait_mirror(&ctl, ep, "web", "the handover", |m| m["nodes"] == serde_json::json!(["a", "b"]));
    a.hv.port.vm.unplug(&a.hv.ns);
    wait_until("a detaches once its tap is gone", || a.sessions().is_empty());
    write_node(&a.xml, false);
    let m = wait_mirror(&ctl, ep, "web", "active on b", |m| active_on(m, "b"));
    eprintln!("fleet: the mirror followed the VM to b in {:.1} s", started.elapsed().as_secs_f64());
    assert_eq!(m["key"].to_string(), key.trim(), "the key follows the mirror");
    assert_eq!(m["placed-on"], "b");
    assert!(a.sessions().is_empty(), "a mirrors again");
    assert_eq!(b.copies(5), 5, "copies on b");

    // etcd down: nothing detaches, and a daemon restarted meanwhile knows the fleet from its
    // cache.
    let id = b.sessions()[0]["session"].clone();
    etcd.pause();
    b.daemon.stop_with(Signal::SIGKILL);
    b.daemon.spawn(&b.hv.ns);
    std::thread::sleep(Duration::from_secs(3));
    let sessions = b.sessions();
    assert_eq!(sessions.len(), 1, "b's mirror during the outage: {sessions:#?}\n{}", b.daemon.log());
    assert_eq!(sessions[0]["session"], id, "b's mirror was made again during the outage");
    assert_eq!(b.copies(3), 3, "copies on b during the outage");
    etcd.resume();
    // Back: the nodes register again, and a change converges (in place: same session).
    wait_mirror(&ctl, ep, "web", "active on b after the outage", |m| active_on(m, "b"));
    vmsniff::ok(&ctl, &fleet_args(ep, &["update", "web", "--snaplen", "64"]));
    wait_until("b applies the update", || b.sessions().first().is_some_and(|s| s["snaplen"] == 64));
    assert_eq!(b.sessions()[0]["session"], id, "an update keeps the session");

    // Node lost: its lease expires, status names it, and its mirror runs on in the kernel.
    b.daemon.stop_with(Signal::SIGKILL);
    let m = wait_mirror(&ctl, ep, "web", "node-lost", |m| m["state"] == "node-lost");
    assert!(m["reason"].as_str().unwrap().contains("node b"), "{m:#}");
    let out = vmsniff::ok(&ctl, &fleet_args(ep, &["nodes", "--json"]));
    assert!(!out.contains("\"b\""), "b is still listed: {out}");
    assert_eq!(b.sessions().len(), 1, "b's mirror went with its daemon");
    assert_eq!(b.copies(3), 3, "copies on b after its daemon died");

    // Removed: the node that runs it (a, once the VM is back there) detaches.
    b.daemon.spawn(&b.hv.ns);
    b.vm_leaves();
    a.vm_arrives();
    wait_mirror(&ctl, ep, "web", "back on a", |m| active_on(m, "a"));
    wait_until("b detaches", || b.sessions().is_empty());
    vmsniff::ok(&ctl, &fleet_args(ep, &["rm", "web"]));
    wait_until("a detaches after rm", || a.sessions().is_empty());
}

#[test]
fn a_fleet_mirror_runs_on_exactly_one_of_three_nodes_as_its_vm_moves_from_a_to_b_to_c() {
    if !privileged_on_host(
        "a_fleet_mirror_runs_on_exactly_one_of_three_nodes_as_its_vm_moves_from_a_to_b_to_c",
        HOST_ONLY,
    ) {
        return;
    }
    let Some(etcd) = Etcd::start() else { return };
    let ctl = Netns::new("ctl");
    etcd.reach_from(&ctl);
    let ep = etcd.endpoint();
    let ep = ep.as_str();
    let names = ["a", "b", "c"];
    let mut nodes = [Node::new("a", &etcd, true), Node::new("b", &etcd, false), Node::new("c", &etcd, false)];
    wait_until("three nodes registered", || {
        let out = vmsniff::ok(&ctl, &fleet_args(ep, &["nodes", "--json"]));
        names.iter().all(|n| out.contains(&format!("\"{n}\"")))
    });
    // Named by its Nova name this time.
    let key = vmsniff::ok(&ctl, &fleet_args(ep, &["mirror", "web", "c-mig", "--to-dev", "mir0"]));
    let key = key.trim();
    // Exactly one node holds a kernel session, `at`, and `fleet status` names it alone.
    let only_on = |nodes: &mut [Node; 3], at: usize| {
        let m = wait_mirror(&ctl, ep, "web", names[at], |m| active_on(m, names[at]));
        assert_eq!(m["key"].to_string(), key, "the key follows the mirror");
        assert_eq!(m["placed-on"], names[at]);
        for (i, node) in nodes.iter().enumerate() {
            let sessions = node.sessions();
            assert_eq!(sessions.len(), usize::from(i == at), "node {}: {sessions:#?}", names[i]);
        }
        let text = vmsniff::ok(&ctl, &fleet_args(ep, &["status", "web"]));
        let row: Vec<&str> =
            text.lines().find(|l| l.starts_with("web ")).expect("a row for web").split_whitespace().collect();
        assert_eq!(row[2..5], [key, names[at], "active"], "KEY NODE STATE:\n{text}");
        assert_eq!(nodes[at].copies(4), 4, "copies on {}", names[at]);
    };
    only_on(&mut nodes, 0);
    for (from, to) in [(0, 1), (1, 2)] {
        let started = Instant::now();
        nodes[to].vm_arrives();
        wait_mirror(&ctl, ep, "web", "the handover", |m| {
            m["nodes"] == serde_json::json!([names[from], names[to]])
        });
        let bystander = 3 - from - to;
        assert!(nodes[bystander].sessions().is_empty(), "{} mirrors during the handover", names[bystander]);
        nodes[from].hv.port.vm.unplug(&nodes[from].hv.ns);
        wait_until("the source detaches once its tap is gone", || nodes[from].sessions().is_empty());
        write_node(&nodes[from].xml, false);
        only_on(&mut nodes, to);
        eprintln!("fleet: {} -> {} in {:.1} s", names[from], names[to], started.elapsed().as_secs_f64());
    }
    vmsniff::ok(&ctl, &fleet_args(ep, &["rm", "web"]));
    wait_until("c detaches after rm", || nodes[2].sessions().is_empty());
    assert!(nodes.iter().all(|n| n.sessions().is_empty()));
}

/// A Nova-shaped domain plugged natively into br-int (os-vif's OVS plug), NIC 0 `tapfo0`.
const OVS_DOMAIN: &str = r#"<domain type='test'>
  <name>instance-00000077</name>
  <uuid>7777a9c1-7b4d-4e8f-9a6b-1c2d3e4f5a77</uuid>
  <metadata>
    <nova:instance xmlns:nova="http://openstack.org/xmlns/libvirt/nova/1.1">
      <nova:name>c-ovs</nova:name>
    </nova:instance>
  </metadata>
  <memory unit='KiB'>1048576</memory>
  <os><type arch='x86_64'>hvm</type></os>
  <devices>
    <interface type='bridge'>
      <mac address='52:54:00:aa:00:77'/>
      <source bridge='br-int'/>
      <virtualport type='openvswitch'/>
      <target dev='tapfo0'/>
      <model type='virtio'/>
    </interface>
  </devices>
</domain>"#;

#[test]
fn an_ovs_mode_fleet_mirror_is_a_mirror_row_on_the_node_holding_the_vm_and_leaves_others_alone() {
    if !privileged_on_host(
        "an_ovs_mode_fleet_mirror_is_a_mirror_row_on_the_node_holding_the_vm_and_leaves_others_alone",
        "OVSDB's rows are the daemon's logic; frames through OVS mirrors are checked in tests/ovs.rs",
    ) {
        return;
    }
    let Some(etcd) = Etcd::start() else { return };
    let ctl = Netns::new("ctl");
    etcd.reach_from(&ctl);
    let ep = etcd.endpoint();
    let ep = ep.as_str();
    let ns = Netns::new("fovs");
    etcd.reach_from(&ns);
    let Some(ovs) = Ovs::start(&ns) else { return };
    ovs.add_bridge("br-int");
    let mut vm = Vm::create(&ns, "tapfo0");
    ovs.vsctl(&["add-port", "br-int", "tapfo0"]);
    // Someone else's mirror on the same bridge, which must stay as it is; a route to the
    // collector.
    ns.sh("ip link add oth0 type veth peer name oth1
         ip link set oth0 up; ip link set oth1 up
         ip link add up1 type veth peer name up2; ip addr add 10.231.0.1/24 dev up1
         ip link set up1 up; ip link set up2 up");
    ovs.vsctl(&["add-port", "br-int", "oth0", "--", "add-port", "br-int", "oth1"]);
    ovs.vsctl(&[
        "--",
        "--id=@s",
        "get",
        "Port",
        "oth0",
        "--",
        "--id=@o",
        "get",
        "Port",
        "oth1",
        "--",
        "--id=@m",
        "create",
        "Mirror",
        "name=theirs",
        "select_src_port=@s",
        "output_port=@o",
        "--",
        "add",
        "Bridge",
        "br-int",
        "mirrors",
        "@m",
    ]);
    let theirs = ovs.vsctl(&["--columns=_uuid,name,select_src_port,output_port", "list", "Mirror", "theirs"]);
    let mirrors_before = ovs.names("Mirror");
    let xml = std::env::temp_dir().join(format!("vmsniff-fleet-{}-ovs.xml", std::process::id()));
    write_domain(&xml, OVS_DOMAIN);
    let uri = format!("test://{}", xml.display());
    let address = ovs.address();
    let daemon =
        Daemon::start_with(&ns, &node_config(&etcd, "o", ""), &["--connect", &uri, "--ovsdb", &address]);
    wait_until("o registered", || nodes_in(&ctl, ep, "/vmsniff").contains("\"o\""));

    let key = vmsniff::ok(
        &ctl,
        &fleet_args(ep, &["mirror", "web", "c-ovs", "--to", "10.231.0.2", "--mode", "ovs"]),
    );
    // OVS mode has no controls, in the fleet as for attach: refused, nothing written.
    // (The node writes its reports meanwhile: etcd's revision moves; the mirrors do not.)
    let records = || {
        let status = status(&ctl, ep);
        let mirrors = status["mirrors"].as_array().cloned().unwrap_or_default();
        mirrors.iter().map(|m| (m["name"].clone(), m["args"].clone(), m["key"].clone())).collect::<Vec<_>>()
    };
    let declared = records();
    for args in [
        &["mirror", "x", "c-ovs", "--to", "10.231.0.2", "--mode", "ovs", "--filter", "tcp"][..],
        &["update", "web", "--snaplen", "64"][..],
    ] {
        let err = vmsniff::fails(&ctl, &fleet_args(ep, args));
        assert!(err.contains("is eBPF mode's") && err.contains("--mode ovs"), "{args:?}: {err}");
    }
    assert_eq!(records(), declared, "a refused OVS declaration changed the fleet");
    let m = wait_mirror(&ctl, ep, "web", "active on o", |m| active_on(m, "o"));
    assert_eq!(m["key"].to_string(), key.trim());
    let id = m["session"].as_u64().expect("a session id");
    let row = format!("vmsniff-{id}");
    assert_eq!(ovs.names("Mirror"), ["theirs", row.as_str()], "{}", daemon.log());
    assert_eq!(ovs.vsctl(&["get", "Mirror", &row, "external_ids:vmsniff-daemon-session"]), "\"fleet/web\"");
    let tap = ovs.vsctl(&["get", "Port", "tapfo0", "_uuid"]);
    assert_eq!(ovs.vsctl(&["get", "Mirror", &row, "select_src_port"]), format!("[{tap}]"));

    // The VM leaves (os-vif unplugs its port, libvirt's domain goes): the row goes.
    ovs.vsctl(&["del-port", "br-int", "tapfo0"]);
    vm.unplug(&ns);
    write_domain(&xml, "");
    wait_until("the Mirror row goes with the VM", || ovs.names("Mirror") == mirrors_before);
    wait_mirror(&ctl, ep, "web", "waiting for its VM", |m| m["state"] == "waiting-for-vm");
    // It comes back: a row again; then the fleet mirror is removed: the row goes.
    write_domain(&xml, OVS_DOMAIN);
    vm.recreate(&ns);
    ovs.vsctl(&["add-port", "br-int", "tapfo0"]);
    let m = wait_mirror(&ctl, ep, "web", "active on o again", |m| active_on(m, "o"));
    let row = format!("vmsniff-{}", m["session"]);
    wait_until("a Mirror row again", || ovs.names("Mirror").contains(&row));
    vmsniff::ok(&ctl, &fleet_args(ep, &["rm", "web"]));
    wait_until("the Mirror row goes with the fleet mirror", || ovs.names("Mirror") == mirrors_before);
    assert_eq!(
        ovs.vsctl(&["--columns=_uuid,name,select_src_port,output_port", "list", "Mirror", "theirs"]),
        theirs,
        "the other mirror changed"
    );
    let _ = std::fs::remove_file(&xml);
}

#[test]
fn a_nodes_lease_and_watch_outlive_passes_that_hold_the_daemons_thread() {
    if !privileged_on_host("a_nodes_lease_and_watch_outlive_passes_that_hold_the_daemons_thread", HOST_ONLY) {
        return;
    }
    let Some(etcd) = Etcd::start() else { return };
    let ctl = Netns::new("ctl");
    etcd.reach_from(&ctl);
    let ep = etcd.endpoint();
    let ep = ep.as_str();
    // Every pass holds the daemon's thread for 3 s, longer than the node's 2-s lease, as eBPF
    // loads did in the 6.1 guest (1.3 to 2.5 s at a time). The etcd client's per-request
    // timeout is 1 s, shorter than the quiet spells of the watch.
    let mut a =
        Node::with("a", &etcd, true, "dial-timeout-seconds = 1\n", &[("VMSNIFF_TEST_PASS_STALL_MS", "3000")]);
    wait_until("a registered", || nodes_in(&ctl, ep, "/vmsniff").contains("\"a\""));
    // Quiet for 3 s (three request timeouts, several stalled passes): the node stays listed.
    let quiet = Instant::now() + Duration::from_secs(3);
    while Instant::now() < quiet {
        let nodes = nodes_in(&ctl, ep, "/vmsniff");
        assert!(nodes.contains("\"a\""), "a's lease lapsed: {nodes}\n{}", a.daemon.log());
        std::thread::sleep(Duration::from_millis(200));
    }
    // A mirror declared now reaches a through the watch it opened at the start.
    vmsniff::ok(&ctl, &fleet_args(ep, &["mirror", "web", "c-mig", "--to-dev", "mir0"]));
    wait_mirror(&ctl, ep, "web", "active on a", |m| active_on(m, "a"));
    assert_eq!(a.copies(3), 3, "copies on a");
    let log = a.daemon.log();
    assert!(!log.contains("trying again"), "a's etcd connection broke:\n{log}");
    assert_eq!(log.matches("registered in etcd").count(), 1, "a registered again:\n{log}");
}

/// Whether this kernel has ip_gre (a fleet mirror `--to IP` sends through it); skips otherwise.
fn gre_available() -> bool {
    let probe = Netns::new("greprobe");
    if !probe.try_sh("ip link add g0 type gretap remote 192.0.2.1").0 {
        vmsniff_tests::skip(
            "this kernel has no ip_gre; a fleet mirror's GRE copies are checked in `cargo xtask vm-test`",
        );
        return false;
    }
    true
}

#[test]
fn a_fleet_mirrors_gre_copies_reach_collect_from_whichever_node_holds_the_vm() {
    if !vmsniff_tests::privileged_on_host_and_one_guest(
        "a_fleet_mirrors_gre_copies_reach_collect_from_whichever_node_holds_the_vm",
        "GRE through ip_gre is checked on every kernel by tests/gre.rs; here the fleet's part",
    ) || !gre_available()
    {
        return;
    }
    let Some(etcd) = Etcd::start() else { return };
    let col = Netns::new("col");
    etcd.reach_from(&col);
    let ep = etcd.endpoint();
    let ep = ep.as_str();
    let mut a = Node::new("a", &etcd, true);
    let mut b = Node::new("b", &etcd, false);
    // Each node reaches the collector's 10.245.0.2 through its own uplink.
    col.sh("ip addr add 10.245.0.2/32 dev lo; ip link set lo up");
    for (node, net) in [(&a, 243), (&b, 244)] {
        node.hv.ns.sh(&format!(
            "ip link add up9 type veth peer name dn{net} netns {col}
             ip addr add 10.{net}.0.1/24 dev up9
             ip link set up9 up
             ip route add 10.245.0.2/32 via 10.{net}.0.2",
            col = col.name
        ));
        col.sh(&format!("ip addr add 10.{net}.0.2/24 dev dn{net}; ip link set dn{net} up"));
    }
    let key = vmsniff::ok(&col, &fleet_args(ep, &["mirror", "web", "c-mig", "--to", "10.245.0.2"]));
    let file = etcd.dir.join("gre.pcapng");
    // The collector's metrics say when a node's copies have arrived: no waiting on a guess.
    const METRICS: u16 = 9470;
    let listen = format!("127.0.0.1:{METRICS}");
    let collector = Collector::start(
        &col,
        &["-w", file.to_str().unwrap(), "--fleet", "--endpoints", ep, "--metrics", &listen],
    );
    let received_from = |sender: &str| -> f64 {
        scrape(&col, METRICS)
            .iter()
            .filter(|s| {
                s.name == "vmsniff_collect_packets_total"
                    && s.labels.get("sender").is_some_and(|v| v == sender)
            })
            .map(|s| s.value)
            .sum()
    };
    let send = |node: &mut Node, base: u32| {
        let sent: Vec<Vec<u8>> =
            (0..5).map(|i| frames::frame(frames::VM_MAC, frames::PEER_MAC, base + i, 100)).collect();
        node.hv.vm_sends(&sent);
    };
    let started = Instant::now();
    wait_mirror(&col, ep, "web", "active on a", |m| active_on(m, "a"));
    eprintln!("fleet GRE: active on a {:.1} s after collect started", started.elapsed().as_secs_f64());
    send(&mut a, 0x5000);
    wait_until("a's copies at the collector", || received_from("10.243.0.1") >= 5.0);
    b.vm_arrives();
    a.vm_leaves();
    let moved = Instant::now();
    let m = wait_mirror(&col, ep, "web", "active on b", |m| active_on(m, "b"));
    eprintln!("fleet GRE: active on b {:.1} s after the VM moved", moved.elapsed().as_secs_f64());
    assert_eq!(m["key"].to_string(), key.trim());
    send(&mut b, 0x6000);
    wait_until("b's copies at the collector", || received_from("10.244.0.1") >= 5.0);
    let stopped = collector.stop();
    let marked: Vec<_> = read_pcapng_file(&file).into_iter().filter(|p| is_marked(&p.data)).collect();
    assert_eq!(marked.len(), 10, "copies from a then b: {}", stopped.stderr);
    assert!(
        marked.iter().all(|p| p.interface == "web (c-mig)"),
        "one interface for the mirror on both nodes: {:?}\n{}",
        marked.iter().map(|p| &p.interface).collect::<Vec<_>>(),
        stopped.stderr
    );
    assert!(stopped.stderr.contains("web (c-mig): moved"), "{}", stopped.stderr);
}

/// The nodes registered in the fleet under `prefix` (`fleet nodes --json`).
fn nodes_in(ctl: &Netns, ep: &str, prefix: &str) -> String {
    vmsniff::ok(ctl, &fleet_args(ep, &["--prefix", prefix, "nodes", "--json"]))
}

#[test]
fn reload_reconnects_to_a_changed_fleet_and_refuses_bad_fleet_settings_keeping_the_old() {
    if !privileged_on_host(
        "reload_reconnects_to_a_changed_fleet_and_refuses_bad_fleet_settings_keeping_the_old",
        HOST_ONLY,
    ) {
        return;
    }
    let Some(etcd) = Etcd::start() else { return };
    let ctl = Netns::new("ctl");
    etcd.reach_from(&ctl);
    let ep = etcd.endpoint();
    let ep = ep.as_str();
    let mut a = Node::new("a", &etcd, true);
    let reload = |a: &Node| vmsniff::run(&a.hv.ns, &["reload", "--run-dir", &a.daemon.run_dir()]);
    // A mirror of a's VM, declared in another fleet (prefix) than the one a's daemon follows.
    vmsniff::ok(
        &ctl,
        &fleet_args(ep, &["--prefix", "/other", "mirror", "web", "instance-00000042", "--to-dev", "mir0"]),
    );
    wait_until("a registered under /vmsniff", || nodes_in(&ctl, ep, "/vmsniff").contains("\"a\""));
    std::thread::sleep(Duration::from_secs(1));
    assert!(a.sessions().is_empty(), "a runs a mirror of a fleet it does not follow");

    // The new prefix and node name, with no restart: the node moves to the other fleet.
    let pid = a.daemon.pid();
    a.daemon.write_config(&node_config(&etcd, "a2", "prefix = \"/other\"\n"));
    let out = reload(&a);
    assert!(out.status.success(), "reload: {}", String::from_utf8_lossy(&out.stderr));
    let m = wait_mirror_in(&ctl, ep, "/other", "web", "active on a2", |m| active_on(m, "a2"));
    assert_eq!(m["placed-on"], "a2");
    wait_until("a's old registration goes", || !nodes_in(&ctl, ep, "/vmsniff").contains("\"a\""));
    assert_eq!(a.daemon.pid(), pid, "the daemon restarted");
    assert!(a.daemon.log().contains("[fleet] changed: reconnecting"), "{}", a.daemon.log());
    assert_eq!(a.copies(5), 5, "copies after the reload");
    let id = a.sessions()[0]["session"].clone();

    // Settings the etcd client cannot use: refused, with the previous fleet kept running.
    for (extra, expected) in [
        ("prefix = \"/other\"\ncacert = \"/nonexistent/ca.pem\"\n", "cannot read the CA certificate"),
        ("prefix = \"other/\"\n", "key prefix"),
        ("prefix = \"/other\"\nuser = \"root\"\n", "has no password"),
        ("prefix = \"/other\"\ndial-timeout-seconds = 0\n", "dial-timeout-seconds must be 1 to 300"),
    ] {
        a.daemon.write_config(&node_config(&etcd, "a2", extra));
        let out = reload(&a);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains("refused the new config") && err.contains(expected),
            "{extra}: expected {expected:?} in:\n{err}"
        );
    }
    assert!(a.daemon.log().contains("reload refused, the previous config stays in force"));
    std::thread::sleep(Duration::from_secs(3));
    assert!(nodes_in(&ctl, ep, "/other").contains("\"a2\""), "a2 left its fleet");
    wait_mirror_in(&ctl, ep, "/other", "web", "still active on a2", |m| active_on(m, "a2"));
    let sessions = a.sessions();
    assert_eq!(sessions.len(), 1, "{sessions:#?}");
    assert_eq!(sessions[0]["session"], id, "a refused reload touched the mirror");
    assert_eq!(a.copies(3), 3, "copies after the refused reloads");

    // Back to the first fleet, which declares nothing for a's VM: the mirror goes.
    a.daemon.write_config(&node_config(&etcd, "a", ""));
    let out = reload(&a);
    assert!(out.status.success(), "reload: {}", String::from_utf8_lossy(&out.stderr));
    wait_until("a detaches the other fleet's mirror", || a.sessions().is_empty());
    wait_until("a registered under /vmsniff again", || nodes_in(&ctl, ep, "/vmsniff").contains("\"a\""));
    wait_until("a2's registration goes", || !nodes_in(&ctl, ep, "/other").contains("\"a2\""));
}

#[test]
fn collect_names_a_fleet_mirror_and_counts_its_moves_apart_from_losses() {
    if !privileged_on_host(
        "collect_names_a_fleet_mirror_and_counts_its_moves_apart_from_losses",
        "collect decodes what a raw socket receives, in user space",
    ) {
        return;
    }
    let Some(etcd) = Etcd::start() else { return };
    let senders = Netns::new("snd");
    let col = Netns::new("col");
    etcd.reach_from(&col);
    let ep = etcd.endpoint();
    senders.sh(&format!(
        "ip link add snd0 type veth peer name col0 netns {col}
         ip addr add 10.241.0.1/24 dev snd0
         ip addr add 10.241.0.3/24 dev snd0
         ip link set snd0 up",
        col = col.name
    ));
    col.sh("ip addr add 10.241.0.2/24 dev col0; ip link set col0 up");
    let key: u32 = vmsniff::ok(
        &col,
        &fleet_args(&ep, &["mirror", "web", "c-private", "--nic", "0", "--to", "10.241.0.2"]),
    )
    .trim()
    .parse()
    .unwrap();
    let file = etcd.dir.join("fleet.pcapng");
    let collector = Collector::start(&col, &["-w", file.to_str().unwrap(), "--fleet", "--endpoints", &ep]);
    let (a, b) = (GreSender::open(&senders, [10, 241, 0, 1]), GreSender::open(&senders, [10, 241, 0, 3]));
    let to = [10, 241, 0, 2];
    let send = |node: &GreSender, seqs: std::ops::Range<u32>| {
        for seq in seqs {
            let frame = frames::frame(frames::VM_MAC, frames::PEER_MAC, seq, 80);
            node.send(to, &gre(Some(key * 2), Some(seq), 0x6558, &frame));
            std::thread::sleep(Duration::from_millis(2));
        }
    };
    // On a, then on b (a new sequence from another sender), then back on a (a new session).
    send(&a, 0..5);
    send(&b, 0..4);
    send(&a, 0..3);
    // Declared while collect runs: named as well (collect follows the fleet, not one read).
    let db: u32 = vmsniff::ok(&col, &fleet_args(&ep, &["mirror", "db", "c-db", "--to", "10.241.0.2"]))
        .trim()
        .parse()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    for seq in 0..3 {
        let frame = frames::frame(frames::VM_MAC, frames::PEER_MAC, seq, 80);
        b.send(to, &gre(Some(db * 2), Some(seq), 0x6558, &frame));
    }
    std::thread::sleep(Duration::from_millis(300));
    let stopped = collector.stop();
    let packets = read_pcapng_file(&file);
    assert_eq!(packets.len(), 15, "{}", stopped.stderr);
    let interfaces: Vec<&str> = packets.iter().map(|p| p.interface.as_str()).collect();
    assert_eq!(
        interfaces,
        [["web (c-private nic 0)"; 12].as_slice(), &["db (c-db)"; 3]].concat(),
        "one interface per mirror, the later one named too"
    );
    assert!(stopped.stderr.contains("web (c-private nic 0): moved 2 time(s)"), "{}", stopped.stderr);
    let (rows, _) = summary(&stopped.stderr);
    assert!(rows.iter().all(|r| r.lost == Some(0)), "a move is no loss: {}", stopped.stderr);
}

#[test]
fn collect_follows_the_fleet_again_after_its_etcd_connection_dies_without_a_word() {
    if !privileged_on_host(
        "collect_follows_the_fleet_again_after_its_etcd_connection_dies_without_a_word",
        "collect's etcd client is user space",
    ) {
        return;
    }
    let Some(etcd) = Etcd::start() else { return };
    let senders = Netns::new("snd");
    let col = Netns::new("col");
    etcd.reach_from(&col);
    let ep = etcd.endpoint();
    senders.sh(&format!(
        "ip link add snd0 type veth peer name col0 netns {col}
         ip addr add 10.242.0.1/24 dev snd0
         ip link set snd0 up",
        col = col.name
    ));
    col.sh("ip addr add 10.242.0.2/24 dev col0; ip link set col0 up");
    let file = etcd.dir.join("cut.pcapng");
    let mut collector = Collector::start(
        &col,
        &["-w", file.to_str().unwrap(), "--fleet", "--endpoints", &ep, "--dial-timeout", "1", "-c", "3"],
    );
    // collect's connection to etcd goes silent both ways without closing (etcd's host lost, a
    // firewall forgetting it); nothing is sent on a quiet watch, so only HTTP/2 pings find it
    // dead. A mirror declared meanwhile (over a new connection) must be named all the same.
    wait_until("collect's watch made", || etcd.watchers() >= 1);
    let started = Instant::now();
    etcd.cut_connections();
    let key: u32 = vmsniff::ok(
        &col,
        &fleet_args(&ep, &["mirror", "web", "c-private", "--nic", "0", "--to", "10.242.0.2"]),
    )
    .trim()
    .parse()
    .unwrap();
    collector.wait_for_line("etcd answers again", Duration::from_secs(40));
    eprintln!(
        "fleet: collect found its dead etcd connection and read the fleet again in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let sender = GreSender::open(&senders, [10, 242, 0, 1]);
    for seq in 0..3 {
        let frame = frames::frame(frames::VM_MAC, frames::PEER_MAC, seq, 80);
        sender.send([10, 242, 0, 2], &gre(Some(key * 2), Some(seq), 0x6558, &frame));
    }
    let stopped = collector.wait(Duration::from_secs(30));
    let interfaces: Vec<String> = read_pcapng_file(&file).into_iter().map(|p| p.interface).collect();
    assert_eq!(interfaces, ["web (c-private nic 0)"; 3], "{}", stopped.stderr);
}

#[test]
fn fleet_commands_reach_etcd_over_tls_with_a_client_certificate_and_name_a_wrong_one() {
    if !privileged_on_host(
        "fleet_commands_reach_etcd_over_tls_with_a_client_certificate_and_name_a_wrong_one",
        HOST_ONLY,
    ) {
        return;
    }
    let Some(etcd) = Etcd::start_tls() else { return };
    let tls = etcd.tls.clone().unwrap();
    let ctl = Netns::new("tls");
    etcd.reach_from(&ctl);
    let ep = etcd.endpoint();
    let (ca, cert, key) = (
        tls.ca.to_string_lossy().into_owned(),
        tls.client_cert.to_string_lossy().into_owned(),
        tls.client_key.to_string_lossy().into_owned(),
    );
    let declared = vmsniff::ok(
        &ctl,
        &[
            "fleet",
            "--endpoints",
            &ep,
            "--cacert",
            &ca,
            "--cert",
            &cert,
            "--etcd-key",
            &key,
            "mirror",
            "web",
            "c-private",
            "--to",
            "192.0.2.2",
        ],
    );
    assert_eq!(declared.trim(), "1");
    // The same through etcdctl's environment.
    let out = ctl.sh(&format!(
        "ETCDCTL_ENDPOINTS={ep} ETCDCTL_CACERT={ca} ETCDCTL_CERT={cert} ETCDCTL_KEY={key} {} fleet status",
        vmsniff::binary().display()
    ));
    assert!(out.contains("web"), "{out}");
    // No client certificate: etcd refuses the handshake; a CA that did not sign etcd's: we do.
    let out = vmsniff::run(&ctl, &["fleet", "--endpoints", &ep, "--cacert", &ca, "status"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("the TLS connection to etcd") && err.contains("--cert"),
        "{}: {err}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout)
    );
    let err = vmsniff::fails(
        &ctl,
        &["fleet", "--endpoints", &ep, "--cacert", &cert, "--cert", &cert, "--etcd-key", &key, "status"],
    );
    assert!(err.contains("the TLS connection to etcd") && err.contains("--cacert"), "{err}");
    let err = vmsniff::fails(&ctl, &["fleet", "--endpoints", &ep, "--cert", &cert, "status"]);
    assert!(err.contains("--etcd-key"), "{err}");
}
