//! Test frames: Ethernet with the local experimental ethertype 0x88b5 and a marker, so that
//! captures can ignore whatever else the kernel sends.
pub const ETHERTYPE_TEST: u16 = 0x88b5;
const MARKER: &[u8; 8] = b"vmsniffT";

pub const VM_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0xaa, 0x00, 0x01];
pub const PEER_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0xbb, 0x00, 0x02];

/// A frame of exactly `len` bytes (at least 60) from `src` to `dst`, numbered `seq`.
pub fn frame(src: [u8; 6], dst: [u8; 6], seq: u32, len: usize) -> Vec<u8> {
    assert!(len >= 60);
    let mut f = Vec::with_capacity(len);
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ETHERTYPE_TEST.to_be_bytes());
    f.extend_from_slice(MARKER);
    f.extend_from_slice(&seq.to_be_bytes());
    let mut x = seq.wrapping_mul(2654435761);
    while f.len() < len {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        f.push(x as u8);
    }
    f
}

/// Whether the frame is one of the test's (of any kind: the marker is in every payload), not
/// something the kernel sent on its own.
pub fn is_marked(frame: &[u8]) -> bool {
    frame.windows(MARKER.len()).any(|w| w == MARKER)
}

/// The transport of an IP test frame, with its ports.
#[derive(Clone, Copy, Debug)]
pub enum L4 {
    Tcp(u16, u16),
    Udp(u16, u16),
    /// An echo request (ICMPv6 for IPv6).
    Icmp,
}

/// An IPv4 frame of exactly `len` bytes (at least 60) with the marker and `seq` after the
/// transport header. The transport checksum is left zero: nothing on the test's path checks it.
pub fn ipv4(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: [u8; 4],
    dst: [u8; 4],
    l4: L4,
    seq: u32,
    len: usize,
) -> Vec<u8> {
    let mut f = ethernet(src_mac, dst_mac, 0x0800);
    let total = (len - 14) as u16;
    let proto = match l4 {
        L4::Tcp(..) => 6,
        L4::Udp(..) => 17,
        L4::Icmp => 1,
    };
    f.extend_from_slice(&[0x45, 0]);
    f.extend_from_slice(&total.to_be_bytes());
    f.extend_from_slice(&[0, 0, 0x40, 0, 64, proto, 0, 0]);
    f.extend_from_slice(&src);
    f.extend_from_slice(&dst);
    // A bridge with br_netfilter drops IPv4 whose header checksum is wrong.
    let sum = f[14..34].chunks(2).fold(0u32, |sum, w| sum + u32::from(u16::from_be_bytes([w[0], w[1]])));
    let folded = (sum & 0xffff) + (sum >> 16);
    let checksum = !(((folded & 0xffff) + (folded >> 16)) as u16);
    f[24..26].copy_from_slice(&checksum.to_be_bytes());
    transport(&mut f, l4, total - 20, false);
    payload(f, seq, len)
}

/// The IPv6 counterpart of [`ipv4`].
pub fn ipv6(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: [u8; 16],
    dst: [u8; 16],
    l4: L4,
    seq: u32,
    len: usize,
) -> Vec<u8> {
    let mut f = ethernet(src_mac, dst_mac, 0x86dd);
    let payload_len = (len - 14 - 40) as u16;
    let next = match l4 {
        L4::Tcp(..) => 6,
        L4::Udp(..) => 17,
        L4::Icmp => 58,
    };
    f.extend_from_slice(&[0x60, 0, 0, 0]);
    f.extend_from_slice(&payload_len.to_be_bytes());
    f.extend_from_slice(&[next, 64]);
    f.extend_from_slice(&src);
    f.extend_from_slice(&dst);
    transport(&mut f, l4, payload_len, true);
    payload(f, seq, len)
}

/// A broadcast ARP request for 10.0.0.1 from `src_mac` (10.0.0.2), padded to 60 bytes with
/// the marker.
pub fn arp(src_mac: [u8; 6], seq: u32) -> Vec<u8> {
    let mut f = ethernet(src_mac, [0xff; 6], 0x0806);
    f.extend_from_slice(&[0, 1, 0x08, 0, 6, 4, 0, 1]);
    f.extend_from_slice(&src_mac);
    f.extend_from_slice(&[10, 0, 0, 2]);
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&[10, 0, 0, 1]);
    payload(f, seq, 60)
}

/// `frame` with an 802.1Q tag (VLAN `vid`) after its MAC addresses.
pub fn vlan(vid: u16, frame: &[u8]) -> Vec<u8> {
    let mut f = frame[..12].to_vec();
    f.extend_from_slice(&[0x81, 0x00]);
    f.extend_from_slice(&(vid & 0x0fff).to_be_bytes());
    f.extend_from_slice(&frame[12..]);
    f
}

/// `frame` without its 802.1Q tag: what a packet socket reads where the kernel holds the tag
/// in the skb's metadata.
pub fn untag(frame: &[u8]) -> Vec<u8> {
    if frame.len() >= 18 && frame[12..14] == [0x81, 0x00] {
        [&frame[..12], &frame[16..]].concat()
    } else {
        frame.to_vec()
    }
}

fn ethernet(src_mac: [u8; 6], dst_mac: [u8; 6], ethertype: u16) -> Vec<u8> {
    let mut f = Vec::with_capacity(1514);
    f.extend_from_slice(&dst_mac);
    f.extend_from_slice(&src_mac);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f
}

fn transport(f: &mut Vec<u8>, l4: L4, length: u16, v6: bool) {
    match l4 {
        L4::Tcp(sport, dport) => {
            f.extend_from_slice(&sport.to_be_bytes());
            f.extend_from_slice(&dport.to_be_bytes());
            // seq, ack, data offset 5, SYN, window, checksum, urgent.
            f.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x02, 0xff, 0xff, 0, 0, 0, 0]);
        }
        L4::Udp(sport, dport) => {
            f.extend_from_slice(&sport.to_be_bytes());
            f.extend_from_slice(&dport.to_be_bytes());
            f.extend_from_slice(&length.to_be_bytes());
            f.extend_from_slice(&[0, 0]);
        }
        L4::Icmp => f.extend_from_slice(&[if v6 { 128 } else { 8 }, 0, 0, 0, 0, 1, 0, 1]),
    }
}

fn payload(mut f: Vec<u8>, seq: u32, len: usize) -> Vec<u8> {
    assert!(len >= 60 && f.len() + MARKER.len() + 4 <= len, "a {len}-byte frame has no room for the marker");
    f.extend_from_slice(MARKER);
    f.extend_from_slice(&seq.to_be_bytes());
    f.resize(len, 0xa5);
    f
}

/// Frame sizes that cover the minimum, odd sizes and a full 1514-byte frame.
pub fn sizes(count: usize) -> impl Iterator<Item = usize> {
    const SIZES: [usize; 8] = [60, 64, 100, 333, 512, 1000, 1500, 1514];
    (0..count).map(|i| SIZES[i % SIZES.len()])
}

/// `count` frames the VM sends and `count` it receives.
pub fn both_ways(count: usize) -> (Vec<Vec<u8>>, Vec<Vec<u8>>) {
    let out = sizes(count).enumerate().map(|(i, len)| frame(VM_MAC, PEER_MAC, i as u32, len)).collect();
    let into =
        sizes(count).enumerate().map(|(i, len)| frame(PEER_MAC, VM_MAC, 1000 + i as u32, len)).collect();
    (out, into)
}
