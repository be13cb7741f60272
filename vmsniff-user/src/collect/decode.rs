//! Decoding what the collector's sockets receive into the mirrored frame, its session and its
//! direction: GRE from a raw IPv4 socket (IPv4 header first) or a raw IPv6 socket (GRE first),
//! VXLAN from a UDP socket. Pure: any input, however hostile, is either a [`Copy`] or an
//! [`Undecodable`].
//!
//! Recognized, by GRE protocol (RFC 2784/2890 headers, with or without checksum, key, sequence):
//! - 0x6558 (TEB) with key and sequence number: vmsniff's GRE; session `key >> 1`, direction
//!   `key & 1`.
//! - 0x6558 without both: a plain GRE mirror (an Open vSwitch GRE port); session = the key (0
//!   without one), direction unknown.
//! - 0x88BE with a sequence number: ERSPAN type II (version 1); session = span id, direction
//!   from the port index when vmsniff sent it (0 out, 1 in). Without: ERSPAN type I (no header).
//! - 0x22EB: ERSPAN type III (version 2); session = span id, direction = the D bit.
//!
//! VXLAN (RFC 7348, the I flag set): session `VNI >> 1`, direction `VNI & 1`, as vmsniff sends
//! it; no sequence number.
use std::net::{IpAddr, Ipv4Addr};

use thiserror::Error;
use vmsniff_ebpf::{Direction, split_gre_wire_key};

use crate::model::wire::{
    MAX_ERSPAN_SESSION, PROTO_ERSPAN_II, PROTO_ERSPAN_III, PROTO_TEB, direction_of_d_bit,
    direction_of_erspan_ii_index,
};

const ETHER_HEADER: usize = 14;
const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_IPV6: u16 = 0x86dd;
const ETHERTYPE_VLAN: [u16; 3] = [0x8100, 0x88a8, 0x9100];
const IPPROTO_GRE: u8 = 47;

/// Which kind of mirror sent a copy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    /// vmsniff's GRE (`--encap gre`).
    VmsniffGre,
    /// A GRE mirror that is not vmsniff's, such as an Open vSwitch GRE port's.
    PlainGre,
    ErspanI,
    ErspanII,
    ErspanIII,
    /// vmsniff's VXLAN (`--encap vxlan`).
    Vxlan,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::VmsniffGre => "gre",
            Kind::PlainGre => "plain-gre",
            Kind::ErspanI => "erspan-i",
            Kind::ErspanII => "erspan1",
            Kind::ErspanIII => "erspan",
            Kind::Vxlan => "vxlan",
        }
    }

    /// ERSPAN of any type: sessions are span ids, apart from GRE keys of the same number.
    pub fn is_erspan(self) -> bool {
        matches!(self, Kind::ErspanI | Kind::ErspanII | Kind::ErspanIII)
    }
}

/// One mirrored frame, as decoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Copy<'a> {
    pub sender: IpAddr,
    pub kind: Kind,
    /// vmsniff's key K (the session id unless `--key` was given), ERSPAN's span id, or a plain
    /// GRE mirror's key.
    pub session: u32,
    /// Relative to the VM; `None` where the encapsulation does not tell.
    pub direction: Option<Direction>,
    /// The GRE sequence number, when present (never for VXLAN).
    pub sequence: Option<u32>,
    /// The Ethernet frame as mirrored.
    pub frame: &'a [u8],
    /// The frame's length before any truncation: from its IP header when the copy is shorter.
    pub original_len: usize,
}

/// Why a packet is not a mirrored frame; counted per reason, never fatal.
#[derive(Clone, Copy, Debug, Error, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Undecodable {
    #[error("truncated IPv4 header")]
    TruncatedIp,
    #[error("not IPv4")]
    NotIpv4,
    #[error("not GRE")]
    NotGre,
    #[error("truncated GRE header")]
    TruncatedGre,
    #[error("GRE version or routing not supported")]
    GreVersion,
    #[error("unknown GRE protocol")]
    UnknownProtocol,
    #[error("truncated ERSPAN header")]
    TruncatedErspan,
    #[error("bad ERSPAN version")]
    ErspanVersion,
    #[error("ERSPAN frame type not Ethernet")]
    ErspanFrameType,
    #[error("no Ethernet frame inside")]
    TruncatedFrame,
    #[error("truncated VXLAN header")]
    TruncatedVxlan,
    #[error("VXLAN without a VNI (I flag clear)")]
    VxlanFlags,
    #[error("addressed to another host")]
    NotForThisHost,
    #[error("IPv6 fragment (not reassembled)")]
    Ipv6Fragment,
    #[error("overlapping or oversized IPv4 fragments")]
    BadFragment,
    #[error("IPv4 fragments never completed")]
    FragmentsIncomplete,
}

/// Decodes one packet as a raw IPv4 socket returns it: the IPv4 header, then GRE.
pub fn decode_ipv4(packet: &[u8]) -> Result<Copy<'_>, Undecodable> {
    let sender = ipv4_source(packet)?;
    let header_len = usize::from(packet[0] & 0x0f) * 4;
    if header_len < 20 || packet.len() < header_len {
        return Err(Undecodable::TruncatedIp);
    }
    if packet[9] != IPPROTO_GRE {
        return Err(Undecodable::NotGre);
    }
    let total = usize::from(u16::from_be_bytes([packet[2], packet[3]]));
    // The kernel hands over whole (reassembled) packets; trust the shorter of the two lengths.
    let end = if total >= header_len { total.min(packet.len()) } else { packet.len() };
    decode_gre(IpAddr::V4(sender), &packet[header_len..end])
}

/// The source address of an IPv4 packet: what `--from` filters on.
pub fn ipv4_source(packet: &[u8]) -> Result<Ipv4Addr, Undecodable> {
    if packet.len() < 20 {
        return Err(Undecodable::TruncatedIp);
    }
    if packet[0] >> 4 != 4 {
        return Err(Undecodable::NotIpv4);
    }
    Ok(Ipv4Addr::new(packet[12], packet[13], packet[14], packet[15]))
}

/// Decodes a GRE packet (its header and payload) from `sender`.
pub fn decode_gre(sender: IpAddr, gre: &[u8]) -> Result<Copy<'_>, Undecodable> {
    let header = gre.get(..4).ok_or(Undecodable::TruncatedGre)?;
    let flags = u16::from_be_bytes([header[0], header[1]]);
    let protocol = u16::from_be_bytes([header[2], header[3]]);
    // Version 1 is PPTP's enhanced GRE; routing (RFC 1701) has a variable header nobody sends.
    if flags & 0x0007 != 0 || flags & 0x4000 != 0 {
        return Err(Undecodable::GreVersion);
    }
    let (checksum, key, sequence) = (flags & 0x8000 != 0, flags & 0x2000 != 0, flags & 0x1000 != 0);
    let mut at = 4;
    let mut word = |present: bool| -> Result<Option<u32>, Undecodable> {
        if !present {
            return Ok(None);
        }
        let bytes = gre.get(at..at + 4).ok_or(Undecodable::TruncatedGre)?;
        at += 4;
        Ok(Some(u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]])))
    };
    word(checksum)?;
    let key = word(key)?;
    let sequence = word(sequence)?;
    let payload = &gre[at..];
    let copy = |kind, session, direction, frame, truncated| {
        inner_frame(Copy { sender, kind, session, direction, sequence, frame, original_len: 0 }, truncated)
    };
    match protocol {
        PROTO_TEB => match (key, sequence) {
            (Some(wire_key), Some(_)) => {
                let (session, direction) = split_gre_wire_key(wire_key);
                copy(Kind::VmsniffGre, session, Some(direction), payload, false)
            }
            (key, _) => copy(Kind::PlainGre, key.unwrap_or(0), None, payload, false),
        },
        PROTO_ERSPAN_II if sequence.is_none() => copy(Kind::ErspanI, 0, None, payload, false),
        PROTO_ERSPAN_II => {
            let h = payload.get(..8).ok_or(Undecodable::TruncatedErspan)?;
            if h[0] >> 4 != 1 {
                return Err(Undecodable::ErspanVersion);
            }
            let (session, truncated) = erspan_session(h);
            let index = u32::from_be_bytes([h[4], h[5], h[6], h[7]]) & 0x000f_ffff;
            copy(Kind::ErspanII, session, direction_of_erspan_ii_index(index), &payload[8..], truncated)
        }
        PROTO_ERSPAN_III => {
            let h = payload.get(..12).ok_or(Undecodable::TruncatedErspan)?;
            if h[0] >> 4 != 2 {
                return Err(Undecodable::ErspanVersion);
            }
            let (session, truncated) = erspan_session(h);
            let word = u16::from_be_bytes([h[10], h[11]]);
            if (word >> 10) & 0x1f != 0 {
                return Err(Undecodable::ErspanFrameType);
            }
            let direction = direction_of_d_bit(((word >> 3) & 1) as u8);
            // The O bit announces an 8-byte platform-specific subheader.
            let header_len = if word & 1 != 0 { 20 } else { 12 };
            let frame = payload.get(header_len..).ok_or(Undecodable::TruncatedErspan)?;
            copy(Kind::ErspanIII, session, Some(direction), frame, truncated)
        }
        _ => Err(Undecodable::UnknownProtocol),
    }
}

/// Decodes a UDP datagram's payload as VXLAN from `sender`: an 8-byte header (flags with the I
/// bit, 24-bit VNI), then the frame.
pub fn decode_vxlan(sender: IpAddr, datagram: &[u8]) -> Result<Copy<'_>, Undecodable> {
    let header = datagram.get(..8).ok_or(Undecodable::TruncatedVxlan)?;
    if header[0] & 0x08 == 0 {
        return Err(Undecodable::VxlanFlags);
    }
    let vni = u32::from_be_bytes([0, header[4], header[5], header[6]]);
    let (session, direction) = split_gre_wire_key(vni);
    let copy = Copy {
        sender,
        kind: Kind::Vxlan,
        session,
        direction: Some(direction),
        sequence: None,
        frame: &datagram[8..],
        original_len: 0,
    };
    inner_frame(copy, false)
}

/// Checks the frame a copy holds and fills in its original length.
fn inner_frame(copy: Copy<'_>, truncated: bool) -> Result<Copy<'_>, Undecodable> {
    if copy.frame.len() < ETHER_HEADER {
        return Err(Undecodable::TruncatedFrame);
    }
    Ok(Copy { original_len: original_length(copy.frame, truncated), ..copy })
}

/// ERSPAN II and III share their second 16-bit word: COS, encapsulation, T (truncated), span id.
fn erspan_session(header: &[u8]) -> (u32, bool) {
    let word = u16::from_be_bytes([header[2], header[3]]);
    (u32::from(word) & MAX_ERSPAN_SESSION, word & 0x0400 != 0)
}

/// The length of `frame` before it was cut: where its IPv4 or IPv6 header says more bytes
/// followed than the copy holds, the Ethernet header plus that length. Padding of short frames
/// makes the IP length smaller than the frame, never larger.
pub fn original_length(frame: &[u8], truncated: bool) -> usize {
    let mut at = 12;
    let mut ethertype = 0;
    while let Some(bytes) = frame.get(at..at + 2) {
        ethertype = u16::from_be_bytes([bytes[0], bytes[1]]);
        at += 2;
        if !ETHERTYPE_VLAN.contains(&ethertype) {
            break;
        }
        at += 2;
    }
    let ip = frame.get(at..).unwrap_or_default();
    let ip_len = match ethertype {
        ETHERTYPE_IPV4 if ip.len() >= 4 && ip[0] >> 4 == 4 => usize::from(u16::from_be_bytes([ip[2], ip[3]])),
        ETHERTYPE_IPV6 if ip.len() >= 6 && ip[0] >> 4 == 6 => {
            40 + usize::from(u16::from_be_bytes([ip[4], ip[5]]))
        }
        _ => 0,
    };
    let claimed = at + ip_len;
    if claimed > frame.len() && (truncated || ip_len > 0) { claimed } else { frame.len() }
}

#[cfg(test)]
pub mod tests {
    use super::*;

    pub const SENDER: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);

    /// An Ethernet frame carrying IPv4 with `ip_total` in its header, `len` bytes long.
    pub fn ipv4_frame(len: usize, ip_total: u16) -> Vec<u8> {
        let mut f = vec![0x52, 0x54, 0, 0, 0, 2, 0x52, 0x54, 0, 0, 0, 1, 0x08, 0x00];
        f.extend_from_slice(&[0x45, 0, (ip_total >> 8) as u8, ip_total as u8]);
        f.extend((f.len()..len).map(|i| i as u8));
        f.truncate(len);
        f
    }

    /// GRE with the given flags' optional words, protocol and payload.
    pub fn gre(checksum: bool, key: Option<u32>, seq: Option<u32>, protocol: u16, payload: &[u8]) -> Vec<u8> {
        let flags: u16 = if checksum { 0x8000 } else { 0 }
            | if key.is_some() { 0x2000 } else { 0 }
            | if seq.is_some() { 0x1000 } else { 0 };
        let mut g = flags.to_be_bytes().to_vec();
        g.extend_from_slice(&protocol.to_be_bytes());
        if checksum {
            g.extend_from_slice(&[0xab, 0xcd, 0, 0]);
        }
        for word in [key, seq].into_iter().flatten() {
            g.extend_from_slice(&word.to_be_bytes());
        }
        g.extend_from_slice(payload);
        g
    }

    /// An ERSPAN III header: span id, D bit, hardware id, truncated bit, O bit.
    pub fn erspan3(session: u16, d: u8, hwid: u8, truncated: bool, platform: bool) -> Vec<u8> {
        let mut h = vec![0x20, 0x00];
        h.extend_from_slice(&(session | if truncated { 0x0400 } else { 0 }).to_be_bytes());
        h.extend_from_slice(&[0x11, 0x22, 0x33, 0x44, 0, 0]);
        let word = (u16::from(hwid) << 4) | (u16::from(d) << 3) | u16::from(platform);
        h.extend_from_slice(&word.to_be_bytes());
        if platform {
            h.extend_from_slice(&[0; 8]);
        }
        h
    }

    pub fn erspan2(session: u16, index: u32) -> Vec<u8> {
        let mut h = vec![0x10, 0x00];
        h.extend_from_slice(&session.to_be_bytes());
        h.extend_from_slice(&index.to_be_bytes());
        h
    }

    /// A whole IPv4 packet around `payload`, as a raw socket returns it.
    pub fn ipv4(protocol: u8, payload: &[u8]) -> Vec<u8> {
        let total = (20 + payload.len()) as u16;
        let mut p = vec![0x45, 0, (total >> 8) as u8, total as u8, 0, 0, 0, 0, 64, protocol, 0, 0];
        p.extend_from_slice(&SENDER.octets());
        p.extend_from_slice(&[192, 0, 2, 2]);
        p.extend_from_slice(payload);
        p
    }

    /// A VXLAN header with the I flag and `vni`, then `frame`.
    pub fn vxlan(vni: u32, frame: &[u8]) -> Vec<u8> {
        let mut v = vec![0x08, 0, 0, 0];
        v.extend_from_slice(&(vni << 8).to_be_bytes());
        v.extend_from_slice(frame);
        v
    }

    #[test]
    fn vxlan_gives_session_and_direction_from_the_vni_and_no_sequence() {
        let frame = ipv4_frame(100, 86);
        let sender: IpAddr = "2001:db8::1".parse().unwrap();
        let packet = vxlan(7 * 2, &frame);
        let copy = decode_vxlan(sender, &packet).unwrap();
        assert_eq!((copy.kind, copy.session, copy.direction), (Kind::Vxlan, 7, Some(Direction::Out)));
        assert_eq!((copy.sequence, copy.frame, copy.sender), (None, &frame[..], sender));
        let packet = vxlan((1 << 24) - 1, &frame);
        let copy = decode_vxlan(sender, &packet).unwrap();
        assert_eq!((copy.session, copy.direction), ((1 << 23) - 1, Some(Direction::In)));
        assert_eq!(decode_vxlan(sender, &[0x08, 0, 0]), Err(Undecodable::TruncatedVxlan));
        let mut no_vni = vxlan(2, &frame);
        no_vni[0] = 0;
        assert_eq!(decode_vxlan(sender, &no_vni), Err(Undecodable::VxlanFlags));
        assert_eq!(decode_vxlan(sender, &vxlan(2, &frame[..10])), Err(Undecodable::TruncatedFrame));
    }

    #[test]
    fn vmsniff_gre_gives_session_and_direction_from_the_key() {
        let frame = ipv4_frame(100, 86);
        for checksum in [false, true] {
            let packet = ipv4(47, &gre(checksum, Some(7 * 2 + 1), Some(42), PROTO_TEB, &frame));
            let copy = decode_ipv4(&packet).unwrap();
            assert_eq!(copy.kind, Kind::VmsniffGre);
            assert_eq!((copy.session, copy.direction, copy.sequence), (7, Some(Direction::In), Some(42)));
            assert_eq!((copy.frame, copy.original_len, copy.sender), (&frame[..], 100, SENDER.into()));
        }
        let packet = gre(false, Some(14), Some(0), PROTO_TEB, &frame);
        let copy = decode_gre(SENDER.into(), &packet).unwrap();
        assert_eq!((copy.session, copy.direction), (7, Some(Direction::Out)));
    }

    #[test]
    fn plain_gre_mirrors_have_a_key_and_no_direction() {
        let frame = ipv4_frame(60, 46);
        let packet = gre(false, Some(5), None, PROTO_TEB, &frame);
        let copy = decode_gre(SENDER.into(), &packet).unwrap();
        assert_eq!((copy.kind, copy.session, copy.direction, copy.sequence), (Kind::PlainGre, 5, None, None));
        let packet = gre(true, None, None, PROTO_TEB, &frame);
        let copy = decode_gre(SENDER.into(), &packet).unwrap();
        assert_eq!((copy.kind, copy.session), (Kind::PlainGre, 0));
        assert_eq!(copy.original_len, 60, "padding is no truncation");
    }

    #[test]
    fn erspan_iii_gives_span_id_and_the_d_bit() {
        let frame = ipv4_frame(80, 66);
        for (d, direction) in [(0, Direction::Out), (1, Direction::In)] {
            for platform in [false, true] {
                let mut payload = erspan3(1023, d, 63, false, platform);
                payload.extend_from_slice(&frame);
                let packet = gre(false, None, Some(9), PROTO_ERSPAN_III, &payload);
                let copy = decode_gre(SENDER.into(), &packet).unwrap();
                assert_eq!(copy.kind, Kind::ErspanIII);
                assert_eq!((copy.session, copy.direction, copy.sequence), (1023, Some(direction), Some(9)));
                assert_eq!(copy.frame, &frame[..]);
            }
        }
    }

    #[test]
    fn erspan_ii_gives_span_id_and_the_direction_vmsniff_puts_in_the_index() {
        let frame = ipv4_frame(80, 66);
        for (index, direction) in [(0, Some(Direction::Out)), (1, Some(Direction::In)), (77, None)] {
            let mut payload = erspan2(12, index);
            payload.extend_from_slice(&frame);
            let packet = gre(false, None, Some(1), PROTO_ERSPAN_II, &payload);
            let copy = decode_gre(SENDER.into(), &packet).unwrap();
            assert_eq!((copy.kind, copy.session, copy.direction), (Kind::ErspanII, 12, direction));
        }
        let packet = gre(false, None, None, PROTO_ERSPAN_II, &frame);
        let copy = decode_gre(SENDER.into(), &packet).unwrap();
        assert_eq!((copy.kind, copy.frame), (Kind::ErspanI, &frame[..]));
    }

    #[test]
    fn truncated_copies_get_their_original_length_from_the_ip_header() {
        let frame = ipv4_frame(64, 1486);
        let packet = gre(false, Some(2), Some(1), PROTO_TEB, &frame);
        let copy = decode_gre(SENDER.into(), &packet).unwrap();
        assert_eq!((copy.frame.len(), copy.original_len), (64, 1500));

        let mut payload = erspan3(3, 0, 0, true, false);
        payload.extend_from_slice(&frame);
        let packet = gre(false, None, Some(1), PROTO_ERSPAN_III, &payload);
        let copy = decode_gre(SENDER.into(), &packet).unwrap();
        assert_eq!(copy.original_len, 1500);

        let mut vlan = frame[..12].to_vec();
        vlan.extend_from_slice(&[0x81, 0x00, 0x00, 0x05]);
        vlan.extend_from_slice(&frame[12..]);
        assert_eq!(original_length(&vlan, false), 1504);
        let mut v6 = frame[..12].to_vec();
        v6.extend_from_slice(&[0x86, 0xdd, 0x60, 0, 0, 0, 0x05, 0xdc]);
        v6.resize(70, 0);
        assert_eq!(original_length(&v6, false), 14 + 40 + 1500);
        assert_eq!(original_length(&[0u8; 14], false), 14, "no IP: the frame as it is");
    }

    #[test]
    fn malformed_packets_are_named_never_a_panic() {
        let frame = ipv4_frame(60, 46);
        let whole = ipv4(47, &gre(true, Some(2), Some(1), PROTO_TEB, &frame));
        // Every prefix of a valid packet: truncated IP, truncated GRE, a frame too short.
        for len in 0..whole.len() {
            let _ = decode_ipv4(&whole[..len]);
        }
        assert_eq!(decode_ipv4(&whole[..10]), Err(Undecodable::TruncatedIp));
        assert_eq!(decode_ipv4(&whole[..30]), Err(Undecodable::TruncatedGre));
        assert_eq!(decode_ipv4(&whole[..40]), Err(Undecodable::TruncatedFrame));
        assert_eq!(decode_ipv4(&ipv4(17, &[0; 40])), Err(Undecodable::NotGre));
        assert_eq!(decode_ipv4(&[0x60; 40]), Err(Undecodable::NotIpv4));
        assert_eq!(
            decode_gre(SENDER.into(), &gre(false, None, None, 0x0800, &frame)),
            Err(Undecodable::UnknownProtocol)
        );
        let mut pptp = gre(false, Some(1), None, 0x880b, &frame);
        pptp[1] |= 1;
        assert_eq!(decode_gre(SENDER.into(), &pptp), Err(Undecodable::GreVersion));

        let mut bad = erspan3(3, 0, 0, false, false);
        bad[0] = 0x30;
        bad.extend_from_slice(&frame);
        assert_eq!(
            decode_gre(SENDER.into(), &gre(false, None, Some(1), PROTO_ERSPAN_III, &bad)),
            Err(Undecodable::ErspanVersion)
        );
        let mut bad = erspan2(3, 0);
        bad[0] = 0x20;
        bad.extend_from_slice(&frame);
        assert_eq!(
            decode_gre(SENDER.into(), &gre(false, None, Some(1), PROTO_ERSPAN_II, &bad)),
            Err(Undecodable::ErspanVersion)
        );
        assert_eq!(
            decode_gre(SENDER.into(), &gre(false, None, Some(1), PROTO_ERSPAN_III, &[0x20, 0, 0])),
            Err(Undecodable::TruncatedErspan)
        );
        let mut ip_frames = erspan3(3, 0, 0, false, false);
        ip_frames[10] |= 2 << 2;
        assert_eq!(
            decode_gre(SENDER.into(), &gre(false, None, Some(1), PROTO_ERSPAN_III, &ip_frames)),
            Err(Undecodable::ErspanFrameType)
        );
        // An IHL larger than the packet, a total length smaller than the header.
        let mut odd = whole.clone();
        odd[0] = 0x4f;
        assert_eq!(decode_ipv4(&odd[..50]), Err(Undecodable::TruncatedIp));
        let mut odd = whole.clone();
        odd[2..4].copy_from_slice(&[0, 4]);
        assert!(decode_ipv4(&odd).is_ok(), "a bogus total length falls back to what arrived");
    }

    #[test]
    fn random_input_never_panics() {
        let mut x: u32 = 0x1234_5678;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x
        };
        for _ in 0..20_000 {
            let len = (next() % 120) as usize;
            let mut packet: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            // Half of them look like GRE of a known protocol, to reach the deeper decoders.
            if len > 24 && next() % 2 == 0 {
                packet[0] = 0x45;
                packet[9] = 47;
                packet[20] &= !0x40;
                packet[21] &= !0x07;
                let protocol = [PROTO_TEB, PROTO_ERSPAN_II, PROTO_ERSPAN_III][(next() % 3) as usize];
                packet[22..24].copy_from_slice(&protocol.to_be_bytes());
            }
            let _ = decode_ipv4(&packet);
        }
    }
}
