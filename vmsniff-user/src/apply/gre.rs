//! vmsniff's tunnel devices: one classic gretap (TEB, 0x6558) or erspan device per session and
//! direction.
//!
//! Why classic devices and not one collect_md (`external`) device with a program setting the
//! tunnel key: a network namespace holds a single collect_md gretap, and Open vSwitch creates
//! one (`gre_sys`) as soon as a bridge has a GRE port, which is every compute node with GRE
//! tenant networks; classic devices coexist with it. The kernel sets key, TTL and TOS itself on
//! every kernel from 5.10 on (no bpf_tunnel_key layout to match), and the ERSPAN header too, whose
//! direction bit is fixed per device: hence one device per direction.
//!
//! Every device sends GRE sequence numbers, and the kernel numbers each device's packets on its
//! own: one device per session and direction makes a collector's count of lost copies exact per
//! session and direction.
use netlink_packet_core::DefaultNla;
use netlink_packet_route::link::{
    ErSpanDir, GreIOFlags, InfoData, InfoGre, LinkAttribute, LinkInfo, LinkMessage,
};
use rtnetlink::{LinkGre, LinkUnspec};

use crate::sys::KernelError;
use crate::{
    model::wire::{erspan_d_bit, erspan_ii_index},
    plan::attach::GreDevice,
    sys::netlink::{Netlink, errno},
};

/// IFLA_GRE_IGNORE_DF, which netlink-packet-route does not name.
const IFLA_GRE_IGNORE_DF: u16 = 19;

/// Copies may be as large as the largest jumbo frame plus its VLAN tags. The kernel checks the
/// copy against this MTU, not the uplink's: a copy larger than the uplink's MTU is fragmented
/// on the way out (DF is clear, see `create`), never silently dropped or answered with an ICMP
/// "fragmentation needed" aimed at the VM's peer.
const GRE_DEVICE_MTU: u32 = 65000;

/// Creates the device and brings it up. Returns its ifindex.
pub async fn create(netlink: &Netlink, device: &GreDevice) -> Result<u32, KernelError> {
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
        // EOPNOTSUPP: no "gretap" or "erspan" link kind, that is no ip_gre module and none
        // autoloaded.
        Err(e) if errno(&e) == Some(libc::EOPNOTSUPP) => return Err(KernelError::NoGreSupport),
        // EEXIST with the name free: a GRE device with the same remote and key exists.
        Err(e) if errno(&e) == Some(libc::EEXIST) => {
            return Err(KernelError::TunnelExists { remote: device.remote, wire_key: device.wire_key });
        }
        Err(e) => {
            return Err(KernelError::netlink(format!(
                "creating GRE device {} toward {}",
                device.name, device.remote
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
        Err(e) => Err(KernelError::netlink(format!("deleting GRE device {name}"))(e)),
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
fn link_message(device: &GreDevice) -> LinkMessage {
    let builder = match &device.erspan {
        None => LinkGre::new_gretap(&device.name).okey(device.wire_key),
        Some(erspan) => {
            // The kernel takes ERSPAN's session id from the output key.
            let builder =
                LinkGre::new_erspan(&device.name).okey(erspan.session_id).erspan_ver(erspan.version);
            if erspan.version == 2 {
                let dir = match erspan_d_bit(erspan.direction) {
                    0 => ErSpanDir::Ingress,
                    _ => ErSpanDir::Egress,
                };
                builder.erspan_dir(dir).erspan_hwid(u16::from(erspan.hwid))
            } else {
                builder.erspan_index(erspan_ii_index(erspan.direction))
            }
        }
    };
    let mut message = builder
        .remote(device.remote)
        .ttl(device.ttl)
        .tos(device.tos)
        // Sequence numbers, counted by the kernel per device: a collector counts lost copies
        // exactly. ERSPAN devices must have exactly these two flags.
        .oflags(GreIOFlags::Key | GreIOFlags::Seq)
        // The receive key too: the kernel tells classic tunnels apart by (remote, local, ikey),
        // so the out and in devices of one session toward one collector need distinct ikeys.
        .iflags(GreIOFlags::Key)
        .ikey(device.wire_key)
        // No path MTU discovery and DF ignored: the outer header never has DF, so a copy that
        // does not fit the uplink is fragmented rather than lost.
        .pmtudisc(false)
        .mtu(GRE_DEVICE_MTU)
        .build();
    for attribute in &mut message.attributes {
        if let LinkAttribute::LinkInfo(infos) = attribute {
            for info in infos {
                if let LinkInfo::Data(InfoData::GreTap(data) | InfoData::ErSpan(data)) = info {
                    data.push(InfoGre::Other(DefaultNla::new(IFLA_GRE_IGNORE_DF, vec![1])));
                }
            }
        }
    }
    message
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use netlink_packet_core::Nla as _;
    use netlink_packet_route::link::InfoKind;
    use vmsniff_ebpf::Direction;

    use super::*;
    use crate::plan::attach::ErspanHeader;

    fn device(erspan: Option<ErspanHeader>) -> GreDevice {
        GreDevice {
            name: "vms3-in".into(),
            alias: "vmsniff session 3 in".into(),
            remote: Ipv4Addr::new(192, 0, 2, 10),
            wire_key: 7,
            ttl: 64,
            tos: 0,
            erspan,
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
