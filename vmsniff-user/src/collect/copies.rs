//! From a received packet to a written copy: who sent it (`--from`), what it carries
//! (decode.rs), then counting it in its stream (its reading thread's shard of the counts) and
//! writing it. Only the writing, and what spans senders in the counts, is shared between
//! reading threads.
use std::{net::IpAddr, time::Duration};

use super::{
    decode::{self, Copy, Kind, Undecodable},
    names::Names,
    pcapng::{Capture, Destination, Interface, Packet, PcapngError, Rotate},
    stats::{InterfaceKey, Stats, StreamIndex, StreamKey},
};
use crate::model::wire::pcapng_direction_flags;

/// An IPv4 or IPv6 network, for `--from`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    pub network: IpAddr,
    pub prefix: u8,
}

impl Cidr {
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.network, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.prefix)).unwrap_or(0);
                u32::from(ip) & mask == u32::from(net) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(self.prefix)).unwrap_or(0);
                u128::from(ip) & mask == u128::from(net) & mask
            }
            _ => false,
        }
    }
}

/// `--from`: `10.0.0.0/8`, `2001:db8::/32`, or an address alone (/32, /128).
pub fn parse_cidr(text: &str) -> Result<Cidr, String> {
    let err = || {
        format!(
            "--from {text:?}: give a sender's address or network, such as 192.0.2.1, 10.0.0.0/8 or \
             2001:db8::/32"
        )
    };
    let (ip, prefix) = match text.split_once('/') {
        Some((ip, prefix)) => (ip, Some(prefix.parse::<u8>().map_err(|_| err())?)),
        None => (text, None),
    };
    let network: IpAddr = ip.parse().map_err(|_| err())?;
    let bits = if network.is_ipv4() { 32 } else { 128 };
    let prefix = prefix.unwrap_or(bits);
    if prefix > bits {
        return Err(err());
    }
    Ok(Cidr { network, prefix })
}

pub struct Options {
    pub from: Vec<Cidr>,
    /// VXLAN's UDP port, when VXLAN is received too.
    pub vxlan_port: Option<u16>,
    pub destination: Destination,
    pub rotate: Option<Rotate>,
    pub count: Option<u64>,
    pub names: Names,
    /// `--plain-gre`: record GRE without vmsniff's sequence numbers whatever its key.
    pub plain_gre: bool,
    /// `--buffer-size`: each receive ring's size in MiB.
    pub ring_mib: usize,
    /// `--threads`: reading threads, each with its own ring.
    pub threads: usize,
}

/// What one socket receives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Listener {
    /// Raw IPv4, protocol GRE: whole IPv4 packets.
    GreV4,
    /// Raw IPv6, protocol GRE: the GRE header onward; the sender in the address.
    GreV6,
    /// UDP on the VXLAN port, both families: the VXLAN header onward.
    Vxlan,
}

/// Why a packet is not written: counted, never fatal.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Skip {
    /// From a sender `--from` does not list.
    Ignored,
    Undecodable(Undecodable),
    /// A datagram without its sender's address: nothing to attribute it to.
    Unattributed,
}

impl Skip {
    pub fn count(self, stats: &mut Stats) {
        match self {
            Skip::Ignored => stats.ignored += 1,
            Skip::Undecodable(why) => stats.undecodable(why),
            Skip::Unattributed => {}
        }
    }
}

impl From<Undecodable> for Skip {
    fn from(why: Undecodable) -> Skip {
        Skip::Undecodable(why)
    }
}

/// The copy `packet` carries, when its sender is one `--from` accepts. A raw IPv4 socket's
/// packet names its sender in its header; the others' come with `from`.
pub fn decode_copy<'a>(
    listener: Listener,
    packet: &'a [u8],
    from: Option<IpAddr>,
    options: &Options,
) -> Result<Copy<'a>, Skip> {
    let sender = match (listener, from) {
        (Listener::GreV4, _) => IpAddr::V4(decode::ipv4_source(packet)?),
        (_, Some(sender)) => sender,
        (_, None) => return Err(Skip::Unattributed),
    };
    if !options.from.is_empty() && !options.from.iter().any(|c| c.contains(sender)) {
        return Err(Skip::Ignored);
    }
    let copy = match listener {
        Listener::GreV4 => decode::decode_ipv4(packet),
        Listener::GreV6 => decode::decode_gre(sender, packet),
        Listener::Vxlan => decode::decode_vxlan(sender, packet),
    };
    Ok(copy?)
}

/// What becomes of a decoded copy once counted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admission {
    /// Counted and to be written, on `interface`; `stream` is its stream's index in the shard.
    Write { interface: InterfaceKey, stream: StreamIndex },
    /// Counted as refused (plain GRE, the stream table full): not written.
    Refused,
    /// `--count` copies are admitted already (written, or about to be by the reading thread
    /// that holds them): neither counted nor written.
    Counted,
}

/// Adds the copies `stats` admitted to `--count`'s shared tally; true once `--count` copies are
/// admitted in all.
pub fn settle(options: &Options, stats: &mut Stats) -> bool {
    options.count.is_some_and(|n| stats.settle(n))
}

/// Counts `copy` in its stream; a copy to write is counted as written already (whoever holds
/// it writes it). With `--count`, the shard settles after its batch ([`settle`]).
pub fn admit(copy: &Copy<'_>, options: &Options, stats: &mut Stats) -> Admission {
    let key =
        StreamKey { sender: copy.sender, kind: copy.kind, session: copy.session, direction: copy.direction };
    let names = &options.names;
    if copy.kind == Kind::PlainGre && !options.plain_gre && !names.knows_plain(&key.interface()) {
        stats.refused_plain += 1;
        return Admission::Refused;
    }
    if let Some(count) = options.count
        && !stats.take_one(count)
    {
        return Admission::Counted;
    }
    let counted = match names.fleet_interface(&key) {
        Some(interface) => stats
            .fleet_copy(interface, key, copy.frame.len(), copy.sequence)
            .map(|stream| (interface, stream)),
        None => stats.copy(key, copy.frame.len(), copy.sequence).map(|stream| (key.interface(), stream)),
    };
    let Some((interface, stream)) = counted else {
        if options.count.is_some() {
            stats.give_back_one();
        }
        return Admission::Refused;
    };
    stats.written += 1;
    Admission::Write { interface, stream }
}

/// The pcapng interface of a stream: its name and description.
pub fn interface(names: &Names, key: &InterfaceKey) -> Interface {
    Interface { name: names.interface_name(key), description: names.interface_description(key) }
}

/// The packet block's content for `copy`.
pub fn packet<'a>(copy: &Copy<'a>, timestamp: Duration) -> Packet<'a> {
    Packet {
        timestamp,
        frame: copy.frame,
        original_len: copy.original_len,
        flags: pcapng_direction_flags(copy.direction),
    }
}

/// Counts `copy` in its stream and writes it; `Ok(true)` once `--count` copies are written.
pub fn record(
    copy: &Copy<'_>,
    timestamp: Duration,
    options: &Options,
    stats: &mut Stats,
    capture: &mut Capture<InterfaceKey>,
) -> Result<bool, PcapngError> {
    if let Admission::Write { interface: key, .. } = admit(copy, options, stats) {
        capture.write(&key, || interface(&options.names, &key), &packet(copy, timestamp))?;
    }
    Ok(settle(options, stats))
}

/// Decodes, counts and writes one packet; `Ok(true)` once `--count` copies are written.
pub fn handle(
    listener: Listener,
    packet: &[u8],
    from: Option<IpAddr>,
    timestamp: Duration,
    options: &Options,
    stats: &mut Stats,
    capture: &mut Capture<InterfaceKey>,
) -> Result<bool, PcapngError> {
    match decode_copy(listener, packet, from, options) {
        Ok(copy) => record(&copy, timestamp, options, stats, capture),
        Err(skip) => {
            skip.count(stats);
            Ok(false)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::collect::stats::render_summary;

    /// Every option at its default, writing to `path`.
    fn writing_to(path: std::path::PathBuf) -> Options {
        Options {
            from: Vec::new(),
            vxlan_port: None,
            destination: Destination::File(path),
            rotate: None,
            count: None,
            names: Names::default(),
            plain_gre: false,
            ring_mib: crate::collect::ring::DEFAULT_RING_MIB,
            threads: 1,
        }
    }

    #[test]
    fn senders_are_filtered_by_network() {
        let ip = |text: &str| text.parse::<IpAddr>().unwrap();
        let net = parse_cidr("10.1.0.0/16").unwrap();
        assert!(net.contains(ip("10.1.200.3")));
        assert!(!net.contains(ip("10.2.0.1")));
        let host = parse_cidr("192.0.2.1").unwrap();
        assert!(host.contains(ip("192.0.2.1")) && !host.contains(ip("192.0.2.2")));
        assert!(parse_cidr("0.0.0.0/0").unwrap().contains(ip("203.0.113.9")));
        assert!(!parse_cidr("0.0.0.0/0").unwrap().contains(ip("2001:db8::1")), "families never mix");
        let net6 = parse_cidr("2001:db8:5::/48").unwrap();
        assert!(net6.contains(ip("2001:db8:5:1::9")) && !net6.contains(ip("2001:db8:6::9")));
        assert!(parse_cidr("fe80::1").unwrap().contains(ip("fe80::1")));
        assert!(parse_cidr("::/0").unwrap().contains(ip("2001:db8::1")));
        assert!(!parse_cidr("::/0").unwrap().contains(ip("192.0.2.1")));
        for bad in ["", "10.0.0.0/33", "10.0.0/8", "host", "2001:db8::/129", "10.0.0.0/"] {
            assert!(parse_cidr(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn vxlan_and_ipv6_gre_take_the_sender_from_the_socket() {
        use crate::collect::decode::tests::{gre, ipv4_frame, vxlan};
        let dir = std::env::temp_dir().join(format!("vmsniff-handle6-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let sender: IpAddr = "2001:db8::1".parse().unwrap();
        let options = Options {
            from: vec![parse_cidr("2001:db8::/64").unwrap()],
            vxlan_port: Some(4789),
            ..writing_to(dir.join("cap.pcapng"))
        };
        let mut stats = Stats::default();
        let mut capture = Capture::open(options.destination.clone(), None).unwrap();
        let frame = ipv4_frame(60, 46);
        let mut handle = |listener, packet: &[u8], from: Option<IpAddr>| {
            handle(listener, packet, from, Duration::ZERO, &options, &mut stats, &mut capture).unwrap()
        };
        handle(Listener::Vxlan, &vxlan(15, &frame), Some(sender));
        handle(
            Listener::GreV6,
            &gre(false, Some(14), Some(0), crate::model::wire::PROTO_TEB, &frame),
            Some(sender),
        );
        handle(Listener::Vxlan, &vxlan(15, &frame), Some("2001:db9::1".parse().unwrap()));
        handle(Listener::Vxlan, &vxlan(15, &frame), None);
        assert_eq!((stats.written, stats.ignored), (2, 1));
        let kinds: Vec<_> =
            stats.streams_sorted().iter().map(|(k, _)| (k.kind, k.session, k.direction, k.sender)).collect();
        assert_eq!(
            kinds,
            [
                (decode::Kind::VmsniffGre, 7, Some(vmsniff_ebpf::Direction::Out), sender),
                (decode::Kind::Vxlan, 7, Some(vmsniff_ebpf::Direction::In), sender)
            ]
        );
        let summary = render_summary(&stats.snapshot(), |k| k.session.to_string());
        assert!(summary.contains("VXLAN carries no sequence numbers"), "{summary}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn plain_gre_is_recorded_only_when_asked_for_or_named() {
        use crate::collect::decode::tests::{gre, ipv4, ipv4_frame};
        let dir = std::env::temp_dir().join(format!("vmsniff-plain-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let frame = ipv4_frame(60, 46);
        // A GRE tenant network's packet: TEB, key 5, no sequence number.
        let tenant = ipv4(47, &gre(false, Some(5), None, crate::model::wire::PROTO_TEB, &frame));
        let ovs_session = ipv4(47, &gre(false, Some(4), None, crate::model::wire::PROTO_TEB, &frame));
        let mut names = Names::default();
        let (_fleet, receiver) = tokio::sync::watch::channel(std::collections::BTreeMap::from([(
            4,
            crate::model::wire::FleetLabel { name: "web (c-private nic 0)".to_owned(), plain_gre: true },
        )]));
        names.set_fleet(receiver);
        for (plain_gre, written) in [(false, 1), (true, 2)] {
            let options = Options {
                names: names.clone(),
                plain_gre,
                ..writing_to(dir.join(format!("{plain_gre}.pcapng")))
            };
            let mut stats = Stats::default();
            let mut capture = Capture::open(options.destination.clone(), None).unwrap();
            for packet in [&tenant, &ovs_session] {
                handle(Listener::GreV4, packet, None, Duration::ZERO, &options, &mut stats, &mut capture)
                    .unwrap();
            }
            assert_eq!(
                (stats.written, stats.refused_plain),
                (written, 2 - written),
                "--plain-gre {plain_gre}"
            );
            let summary = render_summary(&stats.snapshot(), |k| k.session.to_string());
            assert_eq!(summary.contains("--plain-gre records it) 1"), !plain_gre, "{summary}");
        }
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn an_ovs_mode_fleet_mirrors_plain_gre_from_two_nodes_is_one_interface_with_one_move() {
        use crate::collect::decode::tests::{gre, ipv4, ipv4_frame};
        let dir = std::env::temp_dir().join(format!("vmsniff-fleet-plain-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("cap.pcapng");
        let mut names = Names::default();
        let (_fleet, receiver) = tokio::sync::watch::channel(std::collections::BTreeMap::from([(
            4,
            crate::model::wire::FleetLabel { name: "web (c-mig)".to_owned(), plain_gre: true },
        )]));
        names.set_fleet(receiver);
        let options = Options { names, ..writing_to(path.clone()) };
        let mut stats = Stats::default();
        let mut capture = Capture::open(options.destination.clone(), None).unwrap();
        let frame = ipv4_frame(60, 46);
        // Node a's Open vSwitch sends two copies (key 4, no sequence), then node b's two.
        let from_a = ipv4(47, &gre(false, Some(4), None, crate::model::wire::PROTO_TEB, &frame));
        let mut from_b = from_a.clone();
        from_b[12..16].copy_from_slice(&[192, 0, 2, 77]);
        for packet in [&from_a, &from_a, &from_b, &from_b] {
            handle(Listener::GreV4, packet, None, Duration::ZERO, &options, &mut stats, &mut capture)
                .unwrap();
        }
        capture.flush().unwrap();
        assert_eq!((stats.written, stats.refused_plain), (4, 0));
        let moves: Vec<u64> = stats.moves().iter().map(|(_, m)| m.moves).collect();
        assert_eq!(moves, [1], "one interface, one move: {:?}", stats.moves());
        let mut reader = pcap_file::pcapng::PcapNgReader::new(std::fs::File::open(&path).unwrap()).unwrap();
        let (mut interfaces, mut packets) = (Vec::new(), Vec::new());
        while let Some(block) = reader.next_block() {
            match block.unwrap() {
                pcap_file::pcapng::Block::InterfaceDescription(idb) => {
                    interfaces.push(format!("{:?}", idb.options))
                }
                pcap_file::pcapng::Block::EnhancedPacket(epb) => packets.push(epb.interface_id),
                _ => {}
            }
        }
        assert_eq!(interfaces.len(), 1, "{interfaces:?}");
        assert!(interfaces[0].contains("web (c-mig)"), "{interfaces:?}");
        assert_eq!(packets, [0, 0, 0, 0]);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn garbage_is_counted_and_copies_are_written_whole() {
        use crate::collect::decode::tests::{SENDER, gre, ipv4, ipv4_frame};
        let dir = std::env::temp_dir().join(format!("vmsniff-handle-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("cap.pcapng");
        let options = Options {
            from: vec![parse_cidr(&SENDER.to_string()).unwrap()],
            count: Some(3),
            ..writing_to(path.clone())
        };
        let mut stats = Stats::default();
        let mut capture = Capture::open(options.destination.clone(), None).unwrap();
        let frame = ipv4_frame(60, 46);
        let good = ipv4(47, &gre(false, Some(3), Some(1), crate::model::wire::PROTO_TEB, &frame));
        let mut stranger = good.clone();
        stranger[12..16].copy_from_slice(&[203, 0, 113, 5]);
        let mut x: u32 = 99;
        for i in 0..1000u32 {
            // A flood of garbage from a stranger, and from the listed sender.
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
            let mut junk: Vec<u8> = (0..(x % 90) as usize).map(|j| (x >> (j % 24)) as u8).collect();
            assert!(
                !handle(Listener::GreV4, &stranger, None, Duration::ZERO, &options, &mut stats, &mut capture)
                    .unwrap()
            );
            if junk.len() > 16 {
                junk[0] = 0x45;
                junk[12..16].copy_from_slice(&SENDER.octets());
            }
            handle(Listener::GreV4, &junk, None, Duration::ZERO, &options, &mut stats, &mut capture).unwrap();
            if i % 400 == 0 {
                handle(Listener::GreV4, &good, None, Duration::ZERO, &options, &mut stats, &mut capture)
                    .unwrap();
            }
        }
        assert_eq!(stats.ignored, 1000);
        assert!(stats.snapshot().undecodable_total() > 900, "{:?}", stats.undecodable);
        assert_eq!(stats.written, 3);
        let mut more = good.clone();
        more[20 + 11] = 4;
        assert!(
            handle(Listener::GreV4, &more, None, Duration::ZERO, &options, &mut stats, &mut capture).unwrap(),
            "--count 3 reached"
        );
        assert_eq!(stats.written, 3, "nothing is written beyond --count");
        capture.flush().unwrap();
        let mut reader = pcap_file::pcapng::PcapNgReader::new(std::fs::File::open(&path).unwrap()).unwrap();
        let mut packets = 0;
        while let Some(block) = reader.next_block() {
            if let pcap_file::pcapng::Block::EnhancedPacket(epb) = block.unwrap() {
                assert_eq!(&epb.data[..], &frame[..]);
                packets += 1;
            }
        }
        assert_eq!(packets, 3);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
