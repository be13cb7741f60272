//! vmsniff's GRE devices: one classic gretap (TEB, 0x6558) per session and direction.
//!
//! Why classic devices and not one collect_md (`external`) device with a program setting the
//! tunnel key: a network namespace holds a single collect_md gretap, and Open vSwitch creates
//! one (`gre_sys`) as soon as a bridge has a GRE port, which is every compute node with GRE
//! tenant networks; classic devices coexist with it. Each also keeps its own GRE sequence
//! counter, so a collector can count lost copies per session and direction, and the kernel sets
//! key, TTL and TOS itself on every kernel from 5.10 on (no bpf_tunnel_key layout to match).
use netlink_packet_core::DefaultNla;
use netlink_packet_route::link::{GreIOFlags, InfoData, InfoGre, LinkAttribute, LinkInfo, LinkMessage};
use rtnetlink::{LinkGre, LinkUnspec};

use super::KernelError;
use crate::{
    netlink::{Netlink, errno},
    plan::attach::GreDevice,
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
        // EOPNOTSUPP: no "gretap" link kind, that is no ip_gre module and none autoloaded.
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
    let created = netlink
        .link_by_name(&device.name)
        .await
        .map_err(KernelError::netlink(format!("looking up {}", device.name)))?
        .ok_or_else(|| KernelError::Io {
            op: format!("GRE device {} vanished right after its creation", device.name),
            source: std::io::Error::from_raw_os_error(libc::ENODEV),
        })?;
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

/// The RTM_NEWLINK message that creates `device`.
fn link_message(device: &GreDevice) -> LinkMessage {
    let mut message = LinkGre::new_gretap(&device.name)
        .remote(device.remote)
        .ttl(device.ttl)
        .tos(device.tos)
        .oflags(GreIOFlags::Key)
        .okey(device.wire_key)
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
                if let LinkInfo::Data(InfoData::GreTap(data)) = info {
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

    use super::*;

    #[test]
    fn the_device_sends_keyed_gre_without_df_or_checksum() {
        let device = GreDevice {
            name: "vms3-in".into(),
            alias: "vmsniff session 3 in".into(),
            remote: Ipv4Addr::new(192, 0, 2, 10),
            wire_key: 7,
            ttl: 64,
            tos: 0,
        };
        let message = link_message(&device);
        let data: Vec<InfoGre> = message
            .attributes
            .iter()
            .find_map(|a| match a {
                LinkAttribute::LinkInfo(infos) => infos.iter().find_map(|i| match i {
                    LinkInfo::Data(InfoData::GreTap(v)) => Some(v.clone()),
                    _ => None,
                }),
                _ => None,
            })
            .expect("gretap info data");
        assert!(data.contains(&InfoGre::Remote(Ipv4Addr::new(192, 0, 2, 10))));
        assert!(data.contains(&InfoGre::OKey(7)));
        assert!(data.contains(&InfoGre::OFlags(GreIOFlags::Key)), "key only: no checksum, no sequence");
        assert!(data.contains(&InfoGre::Ttl(64)));
        assert!(data.contains(&InfoGre::PathMTUDiscovery(false)));
        assert!(data.iter().any(|i| i.kind() == IFLA_GRE_IGNORE_DF));
        assert!(data.contains(&InfoGre::IKey(7)), "distinct receive keys keep the out and in devices apart");
    }
}
