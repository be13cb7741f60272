//! The hypervisor a test builds: the VM's tap in a bridge with the "network" (a veth whose far
//! end the test uses to send and capture), and a veth pair for `--to-dev` copies.
use std::time::Duration;

use crate::{
    frames::{self, PEER_MAC, VM_MAC, is_marked},
    netns::Netns,
    packet::PacketSocket,
    tap::Vm,
};

pub const TAP: &str = "tapvm0";
/// `--to-dev` target; the test captures the copies on its peer, [`MIRROR_CAPTURE`].
pub const MIRROR_DEV: &str = "mir0";
pub const MIRROR_CAPTURE: &str = "mir1";

pub struct Hypervisor {
    pub ns: Netns,
    /// The VM on [`TAP`], in bridge br0.
    pub port: VmPort,
}

/// One VM's tap in its own bridge with the "network" beyond it: a veth whose far end the test
/// uses to send and capture.
pub struct VmPort {
    pub vm: Vm,
    /// Frames the VM sends arrive here; frames sent here go to the VM.
    pub peer: PacketSocket,
}

impl Hypervisor {
    /// Builds the hypervisor and waits until the bridge forwards both ways.
    pub fn new() -> Hypervisor {
        Self::with_mtu(1500)
    }

    /// The same with every interface on the VM's side (tap, bridge, network) at `mtu`.
    pub fn with_mtu(mtu: u32) -> Hypervisor {
        let ns = Netns::new("hv");
        let port = VmPort::plug(&ns, TAP, 0, mtu, None);
        Hypervisor { ns, port }
    }

    /// Another VM on its own tap `tap`, in bridge br`index` (index > 0) with peer veths
    /// net`index`a/b.
    pub fn add_vm(&self, tap: &str, index: u32) -> VmPort {
        self.add_vm_at(tap, index, None)
    }

    /// The same with the tap at a chosen ifindex.
    pub fn add_vm_at(&self, tap: &str, index: u32, ifindex: Option<u32>) -> VmPort {
        assert!(index > 0, "index 0 is the first VM's");
        VmPort::plug(&self.ns, tap, index, 1500, ifindex)
    }

    /// Adds the `--to-dev` veth pair and returns a capture on its far end.
    pub fn mirror_port(&self) -> PacketSocket {
        self.mirror_device();
        PacketSocket::open(&self.ns, MIRROR_CAPTURE)
    }

    /// Adds the `--to-dev` veth pair alone: the stack on its far end drops the copies.
    pub fn mirror_device(&self) {
        self.ns.sh(&format!(
            "ip link add {MIRROR_DEV} type veth peer name {MIRROR_CAPTURE}
             ip link set {MIRROR_DEV} up
             ip link set {MIRROR_CAPTURE} up"
        ));
    }

    pub fn vm_sends(&mut self, frames: &[Vec<u8>]) {
        self.port.vm_sends(frames);
    }

    /// The VM's tap deleted and created again in br0 (a hard reboot, a migration back);
    /// returns once the bridge forwards again.
    pub fn recreate_tap(&mut self) {
        self.port.vm.recreate(&self.ns);
        self.ns.sh(&format!("ip link set {TAP} master br0"));
        self.port.wait_until_forwarding();
    }

    pub fn vm_receives(&mut self, frames: &[Vec<u8>]) {
        self.port.vm_receives(frames);
    }
}

impl VmPort {
    fn plug(ns: &Netns, tap: &str, index: u32, mtu: u32, ifindex: Option<u32>) -> VmPort {
        let vm = Vm::create_at(ns, tap, ifindex);
        // The first VM keeps the names earlier tests and the README's examples use.
        let (bridge, near, far) = match index {
            0 => ("br0".to_owned(), "peer0".to_owned(), "peer1".to_owned()),
            i => (format!("br{i}"), format!("net{i}a"), format!("net{i}b")),
        };
        ns.sh(&format!(
            "ip link add {bridge} mtu {mtu} type bridge stp_state 0 forward_delay 0 mcast_snooping 0
             ip link add {near} mtu {mtu} type veth peer name {far} mtu {mtu}
             ip link set {tap} mtu {mtu} master {bridge}
             ip link set {near} master {bridge}
             ip link set {bridge} up
             ip link set {near} up
             ip link set {far} up"
        ));
        let peer = PacketSocket::open(ns, &far);
        let mut port = VmPort { vm, peer };
        port.wait_until_forwarding();
        port
    }

    /// Returns once the bridge forwards both ways (a probe each way).
    pub fn wait_until_forwarding(&mut self) {
        for attempt in 0..100u32 {
            let probe = frames::frame(VM_MAC, PEER_MAC, 0xffff_0000 + attempt, 60);
            self.vm.send(&probe);
            if !self.peer.capture(1, Duration::from_millis(100), is_marked).is_empty() {
                let back = frames::frame(PEER_MAC, VM_MAC, 0xffff_8000 + attempt, 60);
                self.peer.send(&back);
                if !self.vm.recv_marked(1, Duration::from_secs(2)).is_empty() {
                    // Drain stragglers of earlier attempts.
                    self.peer.drain(Duration::from_millis(200), is_marked);
                    self.vm.recv_marked(usize::MAX, Duration::from_millis(200));
                    return;
                }
            }
        }
        panic!("the test bridge never forwarded between the tap and the peer");
    }

    /// The VM sends `frames`; asserts they all cross the bridge unchanged and in order.
    pub fn vm_sends(&mut self, frames: &[Vec<u8>]) {
        for frame in frames {
            self.vm.send(frame);
        }
        let got = self.peer.capture(frames.len(), Duration::from_secs(10), is_marked);
        assert_frames_eq("frames the VM sent, at the peer", frames, &got);
    }

    /// The peer sends `frames` to the VM; asserts the VM receives them unchanged and in order.
    pub fn vm_receives(&mut self, frames: &[Vec<u8>]) {
        for frame in frames {
            self.peer.send(frame);
        }
        let got = self.vm.recv_marked(frames.len(), Duration::from_secs(10));
        assert_frames_eq("frames sent to the VM, at the VM", frames, &got);
    }
}

impl Default for Hypervisor {
    fn default() -> Self {
        Self::new()
    }
}

/// Compares frame lists with a readable failure.
pub fn assert_frames_eq(what: &str, expected: &[Vec<u8>], got: &[Vec<u8>]) {
    assert_eq!(got.len(), expected.len(), "{what}: expected {} frames, got {}", expected.len(), got.len());
    for (i, (e, g)) in expected.iter().zip(got).enumerate() {
        assert!(
            e == g,
            "{what}: frame {i} differs: expected {} bytes {:02x?}..., got {} bytes {:02x?}...",
            e.len(),
            &e[..e.len().min(32)],
            g.len(),
            &g[..g.len().min(32)]
        );
    }
}

pub fn total_bytes(frames: &[Vec<u8>]) -> u64 {
    frames.iter().map(|f| f.len() as u64).sum()
}
