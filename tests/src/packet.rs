//! AF_PACKET sockets: capture what reaches an interface and send raw frames out of one.
use std::{
    mem,
    os::fd::{AsFd as _, AsRawFd as _, FromRawFd as _, OwnedFd},
    time::{Duration, Instant},
};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

use crate::netns::Netns;

const PACKET_OUTGOING: u8 = 4;

/// A raw socket bound to one interface.
pub struct PacketSocket {
    fd: OwnedFd,
    ifindex: i32,
}

impl PacketSocket {
    /// Opens the socket inside `ns`, bound to `ifname`.
    pub fn open(ns: &Netns, ifname: &str) -> PacketSocket {
        let ifindex = ns.ifindex(ifname) as i32;
        let fd = ns.enter(move || {
            // SAFETY: plain socket(2); the result is checked.
            let raw = unsafe {
                libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from((libc::ETH_P_ALL as u16).to_be()))
            };
            assert!(raw >= 0, "socket(AF_PACKET): {}", std::io::Error::last_os_error());
            // SAFETY: `raw` is a fresh descriptor we own.
            let fd = unsafe { OwnedFd::from_raw_fd(raw) };
            // SAFETY: an all-zero sockaddr_ll is valid; the fields set below bind it.
            let mut addr: libc::sockaddr_ll = unsafe { mem::zeroed() };
            addr.sll_family = libc::AF_PACKET as u16;
            addr.sll_protocol = (libc::ETH_P_ALL as u16).to_be();
            addr.sll_ifindex = ifindex;
            // SAFETY: addr is a valid sockaddr_ll of the given size.
            let rc = unsafe {
                libc::bind(
                    fd.as_raw_fd(),
                    (&raw const addr).cast::<libc::sockaddr>(),
                    mem::size_of::<libc::sockaddr_ll>() as u32,
                )
            };
            assert_eq!(rc, 0, "bind: {}", std::io::Error::last_os_error());
            // Room for thousands of frames, so that a test may send a flood before it reads:
            // the default buffer holds about 250 small frames and drops the rest.
            let size: libc::c_int = 64 << 20;
            // SAFETY: a valid int option of the given size.
            let rc = unsafe {
                libc::setsockopt(
                    fd.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_RCVBUFFORCE,
                    (&raw const size).cast::<libc::c_void>(),
                    mem::size_of::<libc::c_int>() as u32,
                )
            };
            assert_eq!(rc, 0, "SO_RCVBUFFORCE: {}", std::io::Error::last_os_error());
            fd
        });
        PacketSocket { fd, ifindex }
    }

    /// Sends a frame out of the interface (through its qdisc and tc egress).
    pub fn send(&self, frame: &[u8]) {
        // SAFETY: an all-zero sockaddr_ll is valid; the fields set below address the interface.
        let mut addr: libc::sockaddr_ll = unsafe { mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_ifindex = self.ifindex;
        addr.sll_halen = 6;
        addr.sll_addr[..6].copy_from_slice(&frame[..6]);
        // SAFETY: buffer and address are valid for the given lengths.
        let n = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&raw const addr).cast::<libc::sockaddr>(),
                mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        assert_eq!(n, frame.len() as isize, "sendto: {}", std::io::Error::last_os_error());
    }

    /// Frames arriving on the interface (not those it sends) for which `keep` holds, until
    /// `count` are in or `timeout` passes.
    pub fn capture(&self, count: usize, timeout: Duration, keep: impl Fn(&[u8]) -> bool) -> Vec<Vec<u8>> {
        let deadline = Instant::now() + timeout;
        let mut frames = Vec::new();
        while frames.len() < count {
            match self.recv(deadline.saturating_duration_since(Instant::now())) {
                Some(frame) if keep(&frame) => frames.push(frame),
                Some(_) => {}
                None => break,
            }
        }
        frames
    }

    /// Keeps reading for `quiet` and returns what arrived: to show that nothing else came.
    pub fn drain(&self, quiet: Duration, keep: impl Fn(&[u8]) -> bool) -> Vec<Vec<u8>> {
        self.capture(usize::MAX, quiet, keep)
    }

    fn recv(&self, timeout: Duration) -> Option<Vec<u8>> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            let mut fds = [PollFd::new(self.fd.as_fd(), PollFlags::POLLIN)];
            let ms = PollTimeout::try_from(left.as_millis().min(60_000) as i32).unwrap_or(PollTimeout::MAX);
            if poll(&mut fds, ms).expect("poll") == 0 {
                continue;
            }
            let mut buf = vec![0u8; 65536];
            // SAFETY: zeroed sockaddr_ll is valid output storage.
            let mut from: libc::sockaddr_ll = unsafe { mem::zeroed() };
            let mut len = mem::size_of::<libc::sockaddr_ll>() as u32;
            // SAFETY: buffers valid for the lengths given.
            let n = unsafe {
                libc::recvfrom(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    0,
                    (&raw mut from).cast::<libc::sockaddr>(),
                    &raw mut len,
                )
            };
            assert!(n >= 0, "recvfrom: {}", std::io::Error::last_os_error());
            if from.sll_pkttype == PACKET_OUTGOING {
                continue;
            }
            buf.truncate(n as usize);
            return Some(buf);
        }
    }
}

/// A GRE packet as a collector sees it (Ethernet, IPv4, GRE with TEB).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gre {
    pub outer_src: [u8; 4],
    pub outer_dst: [u8; 4],
    pub ttl: u8,
    pub tos: u8,
    pub dont_fragment: bool,
    pub checksum: bool,
    pub key: Option<u32>,
    pub sequence: Option<u32>,
    pub protocol: u16,
    pub inner: Vec<u8>,
}

/// Decapsulates an Ethernet frame carrying a whole IPv4 GRE packet; `None` for anything else,
/// fragments included (see [`reassemble_ipv4`]). Handles the C, K and S bits (RFC 2890) in
/// their order on the wire.
pub fn decap_gre(frame: &[u8]) -> Option<Gre> {
    if frame.len() < 14 + 20 + 4 || frame[12..14] != [0x08, 0x00] || is_ipv4_fragment(frame) {
        return None;
    }
    let ip = &frame[14..];
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    if ip[0] >> 4 != 4 || ip[9] != 47 || ip.len() < ihl + 4 {
        return None;
    }
    let total = usize::from(u16::from_be_bytes([ip[2], ip[3]])).min(ip.len());
    let gre = &ip[ihl..total];
    let flags = u16::from_be_bytes([gre[0], gre[1]]);
    let (c, k, s) = (flags & 0x8000 != 0, flags & 0x2000 != 0, flags & 0x1000 != 0);
    let protocol = u16::from_be_bytes([gre[2], gre[3]]);
    let mut at = 4;
    let mut word = |present: bool| -> Option<Option<u32>> {
        if !present {
            return Some(None);
        }
        let v = u32::from_be_bytes(gre.get(at..at + 4)?.try_into().ok()?);
        at += 4;
        Some(Some(v))
    };
    word(c)?;
    let key = word(k)?;
    let sequence = word(s)?;
    Some(Gre {
        outer_src: ip[12..16].try_into().ok()?,
        outer_dst: ip[16..20].try_into().ok()?,
        ttl: ip[8],
        tos: ip[1],
        dont_fragment: ip[6] & 0x40 != 0,
        checksum: c,
        key,
        sequence,
        protocol,
        inner: gre[at..].to_vec(),
    })
}

/// Whether an Ethernet frame is an IPv4 fragment that is not the whole packet (MF set or an
/// offset).
pub fn is_ipv4_fragment(frame: &[u8]) -> bool {
    frame.len() >= 34
        && frame[12..14] == [0x08, 0x00]
        && u16::from_be_bytes([frame[20], frame[21]]) & 0x3fff != 0
}

/// Joins IPv4 fragments back into whole packets, as a collector's kernel would. Each packet is
/// returned as an Ethernet frame with its first fragment's headers, in the order packets
/// complete; whole packets pass through.
pub fn reassemble_ipv4(frames: &[Vec<u8>]) -> Vec<Vec<u8>> {
    use std::collections::BTreeMap;
    /// One packet being put together: its first fragment's headers, the payload pieces by
    /// offset, and the payload's length once the last fragment is in.
    #[derive(Default)]
    struct Partial {
        header: Vec<u8>,
        pieces: BTreeMap<usize, Vec<u8>>,
        end: Option<usize>,
    }
    let mut partial: BTreeMap<u16, Partial> = BTreeMap::new();
    let mut whole = Vec::new();
    for frame in frames.iter().filter(|f| f.len() >= 34 && f[12..14] == [0x08, 0x00]) {
        let ihl = usize::from(frame[14] & 0x0f) * 4;
        let total = usize::from(u16::from_be_bytes([frame[16], frame[17]]));
        let id = u16::from_be_bytes([frame[18], frame[19]]);
        let flags = u16::from_be_bytes([frame[20], frame[21]]);
        let (more, offset) = (flags & 0x2000 != 0, usize::from(flags & 0x1fff) * 8);
        if !more && offset == 0 {
            whole.push(frame.clone());
            continue;
        }
        let payload = frame[14 + ihl..(14 + total).min(frame.len())].to_vec();
        let entry = partial.entry(id).or_default();
        if offset == 0 {
            entry.header = frame[..14 + ihl].to_vec();
        }
        if !more {
            entry.end = Some(offset + payload.len());
        }
        entry.pieces.insert(offset, payload);
        let Partial { header, pieces, end } = entry;
        let mut joined = Vec::new();
        for (at, piece) in pieces.iter() {
            if *at != joined.len() {
                break;
            }
            joined.extend_from_slice(piece);
        }
        if header.is_empty() || *end != Some(joined.len()) {
            continue;
        }
        let mut packet = header.clone();
        let ip_len = (packet.len() - 14 + joined.len()) as u16;
        packet[16..18].copy_from_slice(&ip_len.to_be_bytes());
        packet[20..22].copy_from_slice(&[0, 0]);
        packet.extend_from_slice(&joined);
        whole.push(packet);
        partial.remove(&id);
    }
    whole
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decapsulates_key_and_sequence_after_a_checksum() {
        let inner = crate::frames::frame(crate::frames::VM_MAC, crate::frames::PEER_MAC, 1, 60);
        let mut f = vec![0u8; 12];
        f.extend_from_slice(&[0x08, 0x00]);
        let gre_len = 4 + 12 + inner.len();
        let total = 20 + gre_len;
        f.extend_from_slice(&[
            0x45,
            0,
            (total >> 8) as u8,
            total as u8,
            0,
            0,
            0x40,
            0,
            64,
            47,
            0,
            0,
            10,
            0,
            0,
            1,
            10,
            0,
            0,
            2,
        ]);
        f.extend_from_slice(&[0xb0, 0x00, 0x65, 0x58, 0xde, 0xad, 0, 0, 0, 0, 0, 7, 0, 0, 0, 9]);
        f.extend_from_slice(&inner);
        let gre = decap_gre(&f).unwrap();
        assert!(gre.checksum && gre.dont_fragment);
        assert_eq!((gre.key, gre.sequence, gre.protocol), (Some(7), Some(9), 0x6558));
        assert_eq!(gre.inner, inner);
        assert!(decap_gre(&f[..40]).is_none());

        // The same packet cut into two fragments at byte 48 of its payload comes back whole.
        let (head, body) = f.split_at(14 + 20);
        let fragment = |offset: usize, piece: &[u8], more: bool| {
            let mut g = head.to_vec();
            let len = (20 + piece.len()) as u16;
            g[16..18].copy_from_slice(&len.to_be_bytes());
            let flags = (offset / 8) as u16 | if more { 0x2000 } else { 0 };
            g[20..22].copy_from_slice(&flags.to_be_bytes());
            g.extend_from_slice(piece);
            g
        };
        let first = fragment(0, &body[..48], true);
        let second = fragment(48, &body[48..], false);
        assert!(is_ipv4_fragment(&first) && is_ipv4_fragment(&second) && !is_ipv4_fragment(&f));
        assert!(decap_gre(&first).is_none(), "a first fragment is not a whole GRE packet");
        let whole = reassemble_ipv4(&[second, first]);
        assert_eq!(whole.len(), 1);
        assert_eq!(decap_gre(&whole[0]).unwrap().inner, inner);
    }
}

/// A copy as a collector sees it over any underlay: the outer IP header's fields, the UDP ports
/// of VXLAN, and GRE's fields or VXLAN's VNI, around the mirrored frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tunneled {
    pub outer_src: std::net::IpAddr,
    pub outer_dst: std::net::IpAddr,
    /// TTL or hop limit.
    pub ttl: u8,
    /// TOS or traffic class.
    pub tos: u8,
    /// IPv4's DF bit (false for IPv6, which has none).
    pub dont_fragment: bool,
    /// VXLAN: UDP source and destination port, and the VNI.
    pub udp: Option<(u16, u16)>,
    pub vni: Option<u32>,
    /// GRE: key, sequence number, protocol.
    pub key: Option<u32>,
    pub sequence: Option<u32>,
    pub protocol: Option<u16>,
    /// What follows GRE or VXLAN: the frame (for ERSPAN, its header first).
    pub inner: Vec<u8>,
}

/// Decapsulates an Ethernet frame carrying IPv4 or IPv6 (no extension headers), then GRE or UDP
/// with VXLAN on `vxlan_port`; `None` for anything else, fragments included.
pub fn decap_tunnel(frame: &[u8], vxlan_port: u16) -> Option<Tunneled> {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
    let ethertype = u16::from_be_bytes(frame.get(12..14)?.try_into().ok()?);
    let ip = &frame[14..];
    let (src, dst, ttl, tos, df, proto, payload) = match ethertype {
        0x0800 if !is_ipv4_fragment(frame) && ip.len() >= 20 => {
            let ihl = usize::from(ip[0] & 0x0f) * 4;
            let total = usize::from(u16::from_be_bytes([ip[2], ip[3]])).min(ip.len());
            let src: [u8; 4] = ip[12..16].try_into().ok()?;
            let dst: [u8; 4] = ip[16..20].try_into().ok()?;
            (
                IpAddr::from(Ipv4Addr::from(src)),
                IpAddr::from(Ipv4Addr::from(dst)),
                ip[8],
                ip[1],
                ip[6] & 0x40 != 0,
                ip[9],
                ip.get(ihl..total)?,
            )
        }
        0x86dd if ip.len() >= 40 => {
            let len = usize::from(u16::from_be_bytes([ip[4], ip[5]]));
            let src: [u8; 16] = ip[8..24].try_into().ok()?;
            let dst: [u8; 16] = ip[24..40].try_into().ok()?;
            let tclass = ((u16::from_be_bytes([ip[0], ip[1]]) >> 4) & 0xff) as u8;
            let mut payload = ip.get(40..40 + len)?;
            let mut next = ip[6];
            // A destination options header (a tunnel encapsulation limit) before GRE.
            if next == 60 {
                let skip = (usize::from(*payload.get(1)?) + 1) * 8;
                next = payload[0];
                payload = payload.get(skip..)?;
            }
            (
                IpAddr::from(Ipv6Addr::from(src)),
                IpAddr::from(Ipv6Addr::from(dst)),
                ip[7],
                tclass,
                false,
                next,
                payload,
            )
        }
        _ => return None,
    };
    let mut t = Tunneled {
        outer_src: src,
        outer_dst: dst,
        ttl,
        tos,
        dont_fragment: df,
        udp: None,
        vni: None,
        key: None,
        sequence: None,
        protocol: None,
        inner: Vec::new(),
    };
    match proto {
        17 if payload.len() >= 16 => {
            let (sport, dport) =
                (u16::from_be_bytes([payload[0], payload[1]]), u16::from_be_bytes([payload[2], payload[3]]));
            if dport != vxlan_port || payload[8] & 0x08 == 0 {
                return None;
            }
            t.udp = Some((sport, dport));
            t.vni = Some(u32::from_be_bytes([0, payload[12], payload[13], payload[14]]));
            t.inner = payload[16..].to_vec();
        }
        47 if payload.len() >= 4 => {
            let flags = u16::from_be_bytes([payload[0], payload[1]]);
            let mut at = 4;
            let mut word = |present: bool| -> Option<Option<u32>> {
                if !present {
                    return Some(None);
                }
                let v = u32::from_be_bytes(payload.get(at..at + 4)?.try_into().ok()?);
                at += 4;
                Some(Some(v))
            };
            word(flags & 0x8000 != 0)?;
            t.key = word(flags & 0x2000 != 0)?;
            t.sequence = word(flags & 0x1000 != 0)?;
            t.protocol = Some(u16::from_be_bytes([payload[2], payload[3]]));
            t.inner = payload[at..].to_vec();
        }
        _ => return None,
    }
    Some(t)
}
