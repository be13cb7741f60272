//! The benchmark's scene: a VM, the hypervisor that switches its frames to a peer, and a
//! collector behind an uplink that receives the mirror's copies. Four network namespaces, all
//! removed on drop (also when the benchmark fails or is interrupted).
//!
//! The VM is a network namespace whose `eth0` is one end of a veth; the other end, `tapvm0` in
//! the hypervisor, stands in for the VM's tap: its ingress hook sees what the VM sends, its
//! egress what the VM receives, as a tap's would. A veth (rather than a tap driven through its
//! file descriptor) lets Debian's generators (trafgen, iperf3) run as the VM's own stack, at
//! the speed of the kernel rather than of a userspace tap reader.
use std::fmt;

use anyhow::{Context as _, bail};
use vmsniff_tests::{
    frames::{PEER_MAC, VM_MAC},
    netns::Netns,
    ovs::Ovs,
};

pub const TAP: &str = "tapvm0";
pub const VM_IP: &str = "10.0.0.2";
pub const PEER_IP: &str = "10.0.0.1";
pub const COLLECTOR_IP: &str = "192.0.2.2";
/// The mirror's tunnel device for tc mirred and the AF_PACKET relay (vmsniff uses it too on the
/// host with `--to-dev`; in the guest it makes its own GRE devices with `--to`).
pub const TUNNEL_DEV: &str = "mirtun";
/// Jumbo frames on the uplink: a full-size frame plus GRE or VXLAN headers must not be
/// fragmented or dropped on the way to the collector, or the delivery ratio would measure MTU
/// trouble instead of the mirror.
const UPLINK_MTU: u32 = 9000;

/// What switches the VM's frames in the hypervisor.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Switch {
    /// A Linux bridge (this host: no openvswitch module).
    Bridge,
    /// Open vSwitch's kernel datapath, bridge br-int in standalone mode (the guest): every
    /// configuration crosses it, so that (a) is the OVS node's own cost.
    Ovs,
}

/// The encapsulation toward the collector.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Tunnel {
    /// VXLAN: this host's kernel has no ip_gre; an L2-in-UDP tunnel costs about what gretap does.
    Vxlan,
    Gre,
}

impl fmt::Display for Tunnel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Tunnel::Vxlan => "VXLAN",
            Tunnel::Gre => "GRE",
        })
    }
}

/// Field order is drop order: Open vSwitch stops (removing its datapath) before the
/// namespaces go.
pub struct Scene {
    pub ovs: Option<Ovs>,
    pub vm: Netns,
    pub hv: Netns,
    pub net: Netns,
    pub col: Netns,
    pub tunnel: Tunnel,
}

impl Scene {
    pub fn build(switch: Switch, tunnel: Tunnel) -> anyhow::Result<Scene> {
        let mut scene = Scene {
            ovs: None,
            vm: Netns::new("vm"),
            hv: Netns::new("hv"),
            net: Netns::new("net"),
            col: Netns::new("col"),
            tunnel,
        };
        let mac = |m: [u8; 6]| m.map(|b| format!("{b:02x}")).join(":");
        let (vm_mac, peer_mac) = (mac(VM_MAC), mac(PEER_MAC));
        scene.hv.sh(&format!(
            "ip link add {TAP} type veth peer name eth0 netns {vm}
             ip link add peer0 type veth peer name eth0 netns {net}
             ip link add uplink0 mtu {UPLINK_MTU} type veth peer name eth0 netns {col}
             ip addr add 192.0.2.1/24 dev uplink0
             ip link set {TAP} up
             ip link set peer0 up
             ip link set uplink0 up",
            vm = scene.vm.name,
            net = scene.net.name,
            col = scene.col.name,
        ));
        scene.vm.sh(&format!(
            "ip link set eth0 address {vm_mac} gso_max_segs 1
             ip addr add {VM_IP}/24 dev eth0
             ip link set eth0 up
             ip neigh add {PEER_IP} lladdr {peer_mac} dev eth0 nud permanent"
        ));
        scene.net.sh(&format!(
            "ip link set eth0 address {peer_mac}
             ip addr add {PEER_IP}/24 dev eth0
             ip link set eth0 up
             ip neigh add {VM_IP} lladdr {vm_mac} dev eth0 nud permanent"
        ));
        // Static neighbours on the uplink: no ARP frame ever reaches the collector's count.
        let uplink_mac = scene.hv.sh("cat /sys/class/net/uplink0/address").trim().to_owned();
        scene.col.sh(&format!(
            "ip link set eth0 mtu {UPLINK_MTU}
             ip addr add {COLLECTOR_IP}/24 dev eth0
             ip link set eth0 up
             ip neigh add 192.0.2.1 lladdr {uplink_mac} dev eth0 nud permanent"
        ));
        let col_mac = scene.col.sh("cat /sys/class/net/eth0/address").trim().to_owned();
        scene.hv.sh(&format!("ip neigh add {COLLECTOR_IP} lladdr {col_mac} dev uplink0 nud permanent"));
        scene.tunnel_devices()?;
        match switch {
            Switch::Bridge => {
                scene.hv.sh(&format!(
                    "ip link add br0 type bridge stp_state 0 forward_delay 0 mcast_snooping 0
                     ip link set {TAP} master br0
                     ip link set peer0 master br0
                     ip link set br0 up"
                ));
            }
            Switch::Ovs => {
                let ovs = Ovs::start(&scene.hv).context("Open vSwitch's tools are missing")?;
                if ovs.datapath != "system" {
                    bail!("no openvswitch kernel module: the OVS scene needs the VM harness's kernel");
                }
                ovs.add_bridge("br-int");
                ovs.vsctl(&["add-port", "br-int", TAP, "--", "add-port", "br-int", "peer0"]);
                scene.ovs = Some(ovs);
            }
        }
        Ok(scene)
    }

    /// The mirror's tunnel device in the hypervisor, and a receiving end at the collector so
    /// that copies are taken in there instead of answered with ICMP errors.
    fn tunnel_devices(&self) -> anyhow::Result<()> {
        let (hv, col) = match self.tunnel {
            Tunnel::Vxlan => (
                format!(
                    "ip link add {TUNNEL_DEV} type vxlan id 42 local 192.0.2.1 remote {COLLECTOR_IP} dstport 4789 dev uplink0"
                ),
                format!(
                    "ip link add vx0 type vxlan id 42 local {COLLECTOR_IP} remote 192.0.2.1 dstport 4789 dev eth0"
                ),
            ),
            // The collector's device is collect_md: it takes every key (vmsniff's, OVS's, ours).
            Tunnel::Gre => (
                format!("ip link add {TUNNEL_DEV} type gretap local 192.0.2.1 remote {COLLECTOR_IP} key 100"),
                "ip link add vx0 type gretap external".to_owned(),
            ),
        };
        let (ok, _, err) = self.hv.try_sh(&format!("{hv} && ip link set {TUNNEL_DEV} mtu 1500 up"));
        if !ok {
            bail!("creating the {} tunnel device: {err}", self.tunnel);
        }
        self.col.sh(&format!("{col}\nip link set vx0 up"));
        Ok(())
    }

    /// Copies that reached the collector: packets on its uplink (nothing else arrives there).
    pub fn copies_received(&self) -> anyhow::Result<u64> {
        counter(&self.col, "eth0", "rx_packets")
    }

    /// Frames the VM sent.
    pub fn vm_sent(&self) -> anyhow::Result<u64> {
        counter(&self.vm, "eth0", "tx_packets")
    }

    /// Frames that reached the VM's peer across the hypervisor.
    pub fn peer_received(&self) -> anyhow::Result<u64> {
        counter(&self.net, "eth0", "rx_packets")
    }
}

/// An interface counter, read in its namespace.
fn counter(ns: &Netns, dev: &str, name: &str) -> anyhow::Result<u64> {
    let text = ns.sh(&format!("cat /sys/class/net/{dev}/statistics/{name}"));
    text.trim().parse().with_context(|| format!("{dev}'s {name} in {}: {text:?}", ns.name))
}
