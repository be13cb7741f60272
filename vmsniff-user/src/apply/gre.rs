//! vmsniff's tunnel devices: one classic gretap (TEB, 0x6558), erspan or vxlan device per
//! session and direction (ip6gretap and ip6erspan toward an IPv6 collector; vxlan takes both
//! families).
//!
//! Why classic devices and not one collect_md (`external`) device with a program setting the
//! tunnel key: a network namespace holds a single collect_md gretap, and Open vSwitch creates
//! one (`gre_sys`) as soon as a bridge has a GRE port, which is every compute node with GRE
//! tenant networks; classic devices coexist with it. The kernel sets key, TTL and TOS itself on
//! every kernel from 5.10 on (no bpf_tunnel_key layout to match), and the ERSPAN header too, whose
//! direction bit is fixed per device: hence one device per direction.
//!
//! Every GRE device sends GRE sequence numbers, and the kernel numbers each device's packets on
//! its own: one device per session and direction makes a collector's count of lost copies exact
//! per session and direction. VXLAN has no sequence number; its VNI carries key and direction as
//! the GRE key does.
use std::net::IpAddr;

use netlink_packet_core::DefaultNla;
use netlink_packet_route::link::{
    ErSpanDir, GreIOFlags, InfoData, InfoGre, InfoGre6, LinkAttribute, LinkInfo, LinkMessage, VxlanDf,
};
use rtnetlink::{LinkGre, LinkGre6, LinkUnspec, LinkVxlan};

use crate::sys::KernelError;
use crate::{
    model::wire::{VXLAN_SOURCE_PORTS, erspan_d_bit, erspan_ii_index},
    plan::attach::{DeviceEncap, ErspanHeader, TunnelDevice},
    sys::netlink::{Netlink, errno},
};

/// IFLA_GRE_IGNORE_DF, which netlink-packet-route does not name.
const IFLA_GRE_IGNORE_DF: u16 = 19;
/// IFLA_GRE_FLAGS (the ip6_tnl flags of an IPv6 GRE device), not named either.
const IFLA_GRE_FLAGS: u16 = 13;
/// IP6_TNL_F_IGN_ENCAP_LIMIT: no tunnel encapsulation limit option. Without it the kernel puts
/// an 8-byte destination options header before GRE, which collectors expecting GRE right after
/// the IPv6 header (vmsniff's own, many probes) would not decode.
const IP6_TNL_F_IGN_ENCAP_LIMIT: u32 = 1;
/// The traffic class's place in IPv6's flow information word (IFLA_GRE_FLOWINFO).
const IPV6_TCLASS_SHIFT: u32 = 20;

/// Copies may be as large as the largest jumbo frame plus its VLAN tags. The kernel checks the
/// copy against this MTU, not the uplink's: a copy larger than the uplink's MTU is fragmented
/// on the way out (DF is clear, see `create`), never silently dropped or answered with an ICMP
/// "fragmentation needed" aimed at the VM's peer.
const TUNNEL_DEVICE_MTU: u32 = 65000;

/// Creates the device and brings it up. Returns its ifindex.
pub async fn create(netlink: &Netlink, device: &TunnelDevice) -> Result<u32, KernelError> {
    if let Some(existing) = netlink
        .link_by_name(&device.name)
        .await
        .map_err(KernelError::netlink(format!("looking up {}", device.name)))?
    {
        if existing.alias.as_deref() != Some(device.alias.as_str()) {
            return Err(KernelError::DeviceNameTaken { name: device.name.clone() });
        }
        // Our own, left by a run that crashed before it recorded the device: replace it.
        delete(netlink, existing.ifindex, &device.name, &device.alias).await?;
    }
    let message = link_message(device);
    match netlink.handle.link().add(message).execute().await {
        Ok(()) => {}
        // EOPNOTSUPP: no such link kind, that is no ip_gre, ip6_gre or vxlan module and none
        // autoloaded.
        Err(e) if errno(&e) == Some(libc::EOPNOTSUPP) => {
            return Err(KernelError::NoTunnelSupport { kind: kind_name(device) });
        }
        // EEXIST with the name free: a VXLAN device with this VNI and port exists (the kernel
        // allows one per namespace, whatever its remote), or a GRE device with the same remote
        // and key.
        Err(e) if errno(&e) == Some(libc::EEXIST) => {
            return Err(match device.encap {
                DeviceEncap::Vxlan { port } => KernelError::VniInUse { vni: device.wire_key, port },
                DeviceEncap::Gre | DeviceEncap::Erspan(_) => {
                    KernelError::TunnelExists { remote: device.remote, wire_key: device.wire_key }
                }
            });
        }
        Err(e) => {
            return Err(KernelError::netlink(format!(
                "creating {} device {} toward {}",
                kind_name(device),
                device.name,
                device.remote
            ))(e));
        }
    }
    // The crash tests' seam: a kill here leaves the device unmarked (see `delete_unrecorded`).
    crate::sys::kill_point::change_made();
    let created = netlink
        .link_by_name(&device.name)
        .await
        .map_err(KernelError::netlink(format!("looking up {}", device.name)))?
        .ok_or_else(|| KernelError::DeviceVanished { name: device.name.clone() })?;
    // RTM_NEWLINK ignores IFLA_IFALIAS: the mark of ownership is set by a second request.
    let alias = LinkUnspec::new_with_index(created.ifindex).alias(device.alias.clone()).up().build();
    if let Err(e) = netlink.handle.link().set(alias).execute().await {
        let _ = netlink.handle.link().del(created.ifindex).execute().await;
        // A VXLAN device opens its UDP port when it goes up: another socket holds it (Open
        // vSwitch's vxlan_sys_4789, a VXLAN device with other receive flags).
        if let (DeviceEncap::Vxlan { port }, Some(libc::EADDRINUSE)) = (device.encap, errno(&e)) {
            return Err(KernelError::UdpPortInUse { port });
        }
        return Err(KernelError::netlink(format!("marking {} as vmsniff's", device.name))(e));
    }
    Ok(created.ifindex)
}

/// Deletes the device at `ifindex` if it still is vmsniff's (same name and alias). A device
/// that is gone is fine; one that is now somebody else's is left alone.
pub async fn delete(netlink: &Netlink, ifindex: u32, name: &str, alias: &str) -> Result<(), KernelError> {
    let Some(link) =
        netlink.link_by_index(ifindex).await.map_err(KernelError::netlink(format!("looking up {name}")))?
    else {
        return Ok(());
    };
    if link.name != name || link.alias.as_deref() != Some(alias) {
        log::warn!("ifindex {ifindex} is now {:?}, not vmsniff's {name}: left alone", link.name);
        return Ok(());
    }
    match netlink.handle.link().del(ifindex).execute().await {
        Ok(()) => Ok(()),
        Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(()),
        Err(e) => Err(KernelError::netlink(format!("deleting tunnel device {name}"))(e)),
    }
}

/// The kernel's link kind of `device`, as `ip -d link` shows it.
pub fn kind_name(device: &TunnelDevice) -> &'static str {
    match (device.remote, device.encap) {
        (_, DeviceEncap::Vxlan { .. }) => "vxlan",
        (IpAddr::V4(_), DeviceEncap::Gre) => "gretap",
        (IpAddr::V4(_), DeviceEncap::Erspan(_)) => "erspan",
        (IpAddr::V6(_), DeviceEncap::Gre) => "ip6gretap",
        (IpAddr::V6(_), DeviceEncap::Erspan(_)) => "ip6erspan",
    }
}

/// Deletes the device named `name` if it is vmsniff's: marked with `alias`, or unmarked as
/// `create` leaves it between its two requests (no alias, down, of a GRE kind). vmsniff's lock
/// is held and `create` refuses a name that is taken, so such a device at the name of a
/// crashed session is the one its run created. A device that is gone is fine.
pub async fn delete_unrecorded(netlink: &Netlink, name: &str, alias: &str) -> Result<(), KernelError> {
    let Some(link) =
        netlink.link_by_name(name).await.map_err(KernelError::netlink(format!("looking up {name}")))?
    else {
        return Ok(());
    };
    let unmarked = link.alias.is_none()
        && !link.up
        && matches!(link.kind.as_deref(), Some("gretap" | "erspan" | "ip6gretap" | "ip6erspan" | "vxlan"));
    if !unmarked {
        // Marked as vmsniff's, or somebody else's: `delete` tells them apart.
        return delete(netlink, link.ifindex, name, alias).await;
    }
    log::warn!("{name} was created but not yet marked by a vmsniff that died: deleting it");
    match netlink.handle.link().del(link.ifindex).execute().await {
        Ok(()) => Ok(()),
        Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(()),
        Err(e) => Err(KernelError::netlink(format!("deleting GRE device {name}"))(e)),
    }
}

/// The RTM_NEWLINK message that creates `device`.
fn link_message(device: &TunnelDevice) -> LinkMessage {
    let mut message = match (device.remote, device.encap) {
        (remote, DeviceEncap::Vxlan { port }) => {
            let builder = LinkVxlan::new(&device.name, device.wire_key);
            let builder = match remote {
                IpAddr::V4(v4) => builder.remote(v4),
                IpAddr::V6(v6) => builder.remote6(v6),
            };
            return builder
                .port(port)
                .ttl(device.ttl)
                .tos(device.tos)
                // The source port from the mirrored frame's flow hash, in this range: ECMP
                // spreads copies per flow.
                .port_range(VXLAN_SOURCE_PORTS.0, VXLAN_SOURCE_PORTS.1)
                // DF clear: a copy larger than the uplink's MTU is fragmented, not lost.
                .df(VxlanDf::Unset)
                // Nothing is learnt from what arrives on the port: the device only sends.
                .learning(false)
                .mtu(TUNNEL_DEVICE_MTU)
                .build();
        }
        (IpAddr::V4(remote), encap) => {
            let builder = match encap {
                DeviceEncap::Erspan(erspan) => erspan_builder(LinkGre::new_erspan(&device.name), erspan),
                _ => LinkGre::new_gretap(&device.name).okey(device.wire_key),
            };
            builder
                .remote(remote)
                .ttl(device.ttl)
                .tos(device.tos)
                // Sequence numbers, counted by the kernel per device: a collector counts lost
                // copies exactly. ERSPAN devices must have exactly these two flags.
                .oflags(GreIOFlags::Key | GreIOFlags::Seq)
                // The receive key too: the kernel tells classic tunnels apart by (remote, local,
                // ikey), so the out and in devices of one session toward one collector need
                // distinct ikeys.
                .iflags(GreIOFlags::Key)
                .ikey(device.wire_key)
                // No path MTU discovery and DF ignored: the outer header never has DF, so a copy
                // that does not fit the uplink is fragmented rather than lost.
                .pmtudisc(false)
                .mtu(TUNNEL_DEVICE_MTU)
                .build()
        }
        (IpAddr::V6(remote), encap) => {
            let builder = match encap {
                DeviceEncap::Erspan(erspan) => {
                    let builder = LinkGre6::new_ip6erspan(&device.name).okey(erspan.session_id);
                    let builder = builder.erspan_ver(erspan.version);
                    if erspan.version == 2 {
                        builder.erspan_dir(erspan_dir(erspan)).erspan_hwid(u16::from(erspan.hwid))
                    } else {
                        builder.erspan_index(erspan_ii_index(erspan.direction))
                    }
                }
                _ => LinkGre6::new_gretap6(&device.name).okey(device.wire_key),
            };
            // As for IPv4; the hop limit is `ttl`. IPv6 routers never fragment, and the kernel's
            // IPv6 GRE devices have no "ignore DF": a copy larger than the path MTU is dropped
            // here (counted in the device's tx errors).
            // Without a local address the kernel's IPv6 tunnels send nothing.
            let builder = match device.local {
                Some(IpAddr::V6(local)) => builder.local(local),
                _ => builder,
            };
            builder
                .remote(remote)
                .ttl(device.ttl)
                .oflags(GreIOFlags::Key | GreIOFlags::Seq)
                .iflags(GreIOFlags::Key)
                .ikey(device.wire_key)
                .mtu(TUNNEL_DEVICE_MTU)
                .build()
        }
    };
    for attribute in &mut message.attributes {
        if let LinkAttribute::LinkInfo(infos) = attribute {
            for info in infos {
                match info {
                    LinkInfo::Data(InfoData::GreTap(data) | InfoData::ErSpan(data)) => {
                        data.push(InfoGre::Other(DefaultNla::new(IFLA_GRE_IGNORE_DF, vec![1])));
                    }
                    LinkInfo::Data(InfoData::GreTap6(data) | InfoData::Ip6ErSpan(data)) => {
                        // The traffic class travels in the flow information word.
                        data.push(InfoGre6::FlowLabel(u32::from(device.tos) << IPV6_TCLASS_SHIFT));
                        data.push(InfoGre6::Other(DefaultNla::new(
                            IFLA_GRE_FLAGS,
                            IP6_TNL_F_IGN_ENCAP_LIMIT.to_ne_bytes().to_vec(),
                        )));
                    }
                    _ => {}
                }
            }
        }
    }
    message
}

fn erspan_dir(erspan: ErspanHeader) -> ErSpanDir {
    match erspan_d_bit(erspan.direction) {
        0 => ErSpanDir::Ingress,
        _ => ErSpanDir::Egress,
    }
}

/// The ERSPAN fields of an IPv4 erspan device. The kernel takes ERSPAN's session id from the
/// output key.
fn erspan_builder(
    builder: rtnetlink::LinkMessageBuilder<LinkGre>,
    erspan: ErspanHeader,
) -> rtnetlink::LinkMessageBuilder<LinkGre> {
    let builder = builder.okey(erspan.session_id).erspan_ver(erspan.version);
    if erspan.version == 2 {
        builder.erspan_dir(erspan_dir(erspan)).erspan_hwid(u16::from(erspan.hwid))
    } else {
        builder.erspan_index(erspan_ii_index(erspan.direction))
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use netlink_packet_core::Nla as _;
    use netlink_packet_route::link::{InfoKind, InfoVxlan};
    use vmsniff_ebpf::Direction;

    use super::*;

    fn device(erspan: Option<ErspanHeader>) -> TunnelDevice {
        TunnelDevice {
            name: "vms3-in".into(),
            alias: "vmsniff session 3 in".into(),
            remote: IpAddr::V4(Ipv4Addr::new(192, 0, 2, 10)),
            local: None,
            wire_key: 7,
            ttl: 64,
            tos: 0,
            encap: erspan.map_or(DeviceEncap::Gre, DeviceEncap::Erspan),
        }
    }

    fn link_info(message: &LinkMessage) -> &[LinkInfo] {
        message
            .attributes
            .iter()
            .find_map(|a| match a {
                LinkAttribute::LinkInfo(infos) => Some(infos.as_slice()),
                _ => None,
            })
            .expect("link info")
    }

    #[test]
    fn ipv6_devices_take_hop_limit_traffic_class_and_no_encapsulation_limit() {
        let remote = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x10);
        for erspan in
            [None, Some(ErspanHeader { version: 2, session_id: 3, direction: Direction::In, hwid: 5 })]
        {
            let mut d = device(erspan);
            let local = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1);
            (d.remote, d.local, d.ttl, d.tos) = (IpAddr::V6(remote), Some(IpAddr::V6(local)), 9, 0x20);
            let message = link_message(&d);
            let infos = link_info(&message);
            let data = infos
                .iter()
                .find_map(|i| match i {
                    LinkInfo::Data(InfoData::GreTap6(v) | InfoData::Ip6ErSpan(v)) => Some(v.clone()),
                    _ => None,
                })
                .expect("ip6gre data");
            let expected = if erspan.is_some() { InfoKind::Ip6ErSpan } else { InfoKind::GreTap6 };
            assert!(infos.contains(&LinkInfo::Kind(expected)));
            assert_eq!(kind_name(&d), if erspan.is_some() { "ip6erspan" } else { "ip6gretap" });
            assert!(data.contains(&InfoGre6::Remote(remote)));
            assert!(data.contains(&InfoGre6::Local(local)), "the route's source");
            assert!(data.contains(&InfoGre6::Ttl(9)), "the hop limit");
            assert!(data.contains(&InfoGre6::FlowLabel(0x20 << 20)), "the traffic class");
            assert!(data.contains(&InfoGre6::OFlags(GreIOFlags::Key | GreIOFlags::Seq)));
            assert!(data.iter().any(|i| i.kind() == IFLA_GRE_FLAGS), "no encapsulation limit option");
            if erspan.is_some() {
                assert!(data.contains(&InfoGre6::ErSpanDir(ErSpanDir::Egress)));
                assert!(data.contains(&InfoGre6::OKey(3)));
            } else {
                assert!(data.contains(&InfoGre6::OKey(7)));
            }
        }
    }

    #[test]
    fn vxlan_devices_send_the_vni_to_the_port_with_flow_source_ports_and_df_clear() {
        for remote in [IpAddr::from([192, 0, 2, 10]), "2001:db8::10".parse().unwrap()] {
            let mut d = device(None);
            (d.remote, d.encap, d.wire_key, d.tos) = (remote, DeviceEncap::Vxlan { port: 8472 }, 15, 4);
            let message = link_message(&d);
            let infos = link_info(&message);
            assert!(infos.contains(&LinkInfo::Kind(InfoKind::Vxlan)));
            let Some(LinkInfo::Data(InfoData::Vxlan(data))) =
                infos.iter().find(|i| matches!(i, LinkInfo::Data(_)))
            else {
                panic!("vxlan data")
            };
            assert!(data.contains(&InfoVxlan::Id(15)), "VNI = K*2+d");
            assert!(data.contains(&InfoVxlan::Port(8472)));
            assert!(data.contains(&InfoVxlan::PortRange(VXLAN_SOURCE_PORTS)));
            assert!(data.contains(&InfoVxlan::Df(VxlanDf::Unset)));
            assert!(data.contains(&InfoVxlan::Learning(false)));
            assert!(data.contains(&InfoVxlan::Tos(4)));
            match remote {
                IpAddr::V4(v4) => assert!(data.contains(&InfoVxlan::Group(v4))),
                IpAddr::V6(v6) => assert!(data.contains(&InfoVxlan::Group6(v6))),
            }
        }
    }

    fn info_data(message: &LinkMessage) -> (InfoKind, Vec<InfoGre>) {
        let infos = message
            .attributes
            .iter()
            .find_map(|a| match a {
                LinkAttribute::LinkInfo(infos) => Some(infos),
                _ => None,
            })
            .expect("link info");
        let kind = infos.iter().find_map(|i| match i {
            LinkInfo::Kind(k) => Some(k.clone()),
            _ => None,
        });
        let data = infos.iter().find_map(|i| match i {
            LinkInfo::Data(InfoData::GreTap(v) | InfoData::ErSpan(v)) => Some(v.clone()),
            _ => None,
        });
        (kind.expect("kind"), data.expect("gre info data"))
    }

    #[test]
    fn the_device_sends_keyed_gre_with_sequence_numbers_without_df_or_checksum() {
        let (kind, data) = info_data(&link_message(&device(None)));
        assert_eq!(kind, InfoKind::GreTap);
        assert!(data.contains(&InfoGre::Remote(Ipv4Addr::new(192, 0, 2, 10))));
        assert!(data.contains(&InfoGre::Tos(0)));
        assert!(data.contains(&InfoGre::OKey(7)));
        assert!(
            data.contains(&InfoGre::OFlags(GreIOFlags::Key | GreIOFlags::Seq)),
            "key and sequence: no checksum"
        );
        assert!(data.contains(&InfoGre::Ttl(64)));
        assert!(data.contains(&InfoGre::PathMTUDiscovery(false)));
        assert!(data.iter().any(|i| i.kind() == IFLA_GRE_IGNORE_DF));
        assert!(data.contains(&InfoGre::IKey(7)), "distinct receive keys keep the out and in devices apart");
    }

    #[test]
    fn erspan_devices_carry_span_id_direction_and_hardware_id() {
        let header = ErspanHeader { version: 2, session_id: 3, direction: Direction::In, hwid: 5 };
        let (kind, data) = info_data(&link_message(&device(Some(header))));
        assert_eq!(kind, InfoKind::ErSpan);
        assert!(data.contains(&InfoGre::OKey(3)), "the span id is the session's key");
        assert!(data.contains(&InfoGre::IKey(7)));
        assert!(data.contains(&InfoGre::ErSpanVer(2)));
        assert!(data.contains(&InfoGre::ErSpanDir(ErSpanDir::Egress)), "in = egress of the VM's port");
        assert!(data.contains(&InfoGre::ErSpanHwId(5)));
        assert!(data.contains(&InfoGre::OFlags(GreIOFlags::Key | GreIOFlags::Seq)));

        let header = ErspanHeader { version: 1, session_id: 3, direction: Direction::Out, hwid: 0 };
        let (_, data) = info_data(&link_message(&device(Some(header))));
        assert!(data.contains(&InfoGre::ErSpanVer(1)));
        assert!(data.contains(&InfoGre::ErSpanIndex(0)), "type II: the direction in the index");
        assert!(!data.iter().any(|i| matches!(i, InfoGre::ErSpanDir(_))));
    }
}
