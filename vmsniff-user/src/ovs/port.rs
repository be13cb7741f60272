//! OVS mode's view of a resolved NIC: the OVS port that carries its frames (qvo for the hybrid
//! plug, the tap itself for native OVS), the devices on the way, and whether the copies' route
//! to the collector would run back through them.
use std::net::IpAddr;

use thiserror::Error;

use crate::{
    model::mac::Mac,
    resolve::{
        domain::Plug,
        vm::{Resolved, port_id},
    },
};
use crate::{
    ovs::session::Snapshot,
    sys::netlink::{Link, Netlink, RouteTo},
};

#[derive(Debug, Error)]
pub enum OvsPortError {
    #[error(
        "{what} is plugged into Linux bridge {bridge}, not into Open vSwitch: OVS mode mirrors an OVS \
         port. Mirror it in eBPF mode instead (drop --mode ovs)"
    )]
    LinuxBridge { what: String, bridge: String },
    #[error(
        "{what} is not on Open vSwitch: OVSDB has no interface for it (by Neutron port id, MAC, the \
         tap's name, or a veth from its Linux bridge). OVS mode mirrors an OVS port; mirror it in eBPF \
         mode instead (drop --mode ovs)"
    )]
    NotOnOvs { what: String },
    #[error(
        "the OVS port of {what}, {port}, is not on any bridge (`ovs-vsctl port-to-br {port}` says \
         so too); plug it into its bridge, or mirror the tap in eBPF mode (drop --mode ovs)"
    )]
    NoBridge { what: String, port: String },
    #[error(
        "{to} is an address of this host: GRE copies sent to it would come back into Open vSwitch; give the collector's address"
    )]
    LocalAddress { to: IpAddr },
    #[error(
        "no route to {to} in this network namespace (`ip route get {to}`): the copies could not \
         leave; add a route or give another --to"
    )]
    NoRoute { to: IpAddr },
    #[error(
        "the route to {to} leaves through {device}, which {why}: the GRE copies would be mirrored \
         into themselves. Give a collector reached through another interface"
    )]
    Loop { to: IpAddr, device: String, why: String },
    #[error("reading interfaces and routes through netlink failed")]
    Netlink(#[source] rtnetlink::Error),
}

/// Where a NIC's frames meet Open vSwitch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmPort {
    pub bridge: String,
    /// The OVS Port (and Interface) name.
    pub port: String,
    /// The devices the frames cross up to that port, tap first.
    pub path: Vec<String>,
}

/// Finds a NIC's OVS port: through OVSDB's iface-id or attached-mac for a libvirt NIC, else the
/// tap itself (native plug) or the veth peer of its Linux bridge's veth port (hybrid plug),
/// checked through rtnetlink.
pub async fn vm_port(
    netlink: &Netlink,
    resolved: &Resolved,
    snapshot: &Snapshot,
) -> Result<VmPort, OvsPortError> {
    let links = netlink.links().await.map_err(OvsPortError::Netlink)?;
    let tap = resolved.tap();
    let what = match resolved {
        Resolved::Nic { vm, nic, tap } => {
            format!("NIC {} of VM {} (tap {})", nic.index, vm.display_name(), tap.name)
        }
        Resolved::Interface { tap } => format!("interface {}", tap.name),
    };
    let by_ids = match resolved {
        Resolved::Nic { vm, nic, .. } => find_by_ids(snapshot, port_id(vm, nic).as_deref(), nic.mac),
        Resolved::Interface { .. } => None,
    };
    let master = tap.master.and_then(|m| links.iter().find(|l| l.ifindex == m));
    let hybrid = || {
        let qbr = master.filter(|m| m.kind.as_deref() == Some("bridge"))?;
        links.iter().filter(|l| l.master == Some(qbr.ifindex) && l.kind.as_deref() == Some("veth")).find_map(
            |qvb| {
                let qvo = links.iter().find(|l| Some(l.ifindex) == qvb.peer)?;
                snapshot.interfaces.iter().any(|i| i.row.name == qvo.name).then(|| {
                    (
                        qvo.name.clone(),
                        vec![tap.name.clone(), qbr.name.clone(), qvb.name.clone(), qvo.name.clone()],
                    )
                })
            },
        )
    };
    let (interface, path) = match by_ids {
        Some(name) => (name.clone(), path_to(&links, tap, &name)),
        None if snapshot.interfaces.iter().any(|i| i.row.name == tap.name) => {
            (tap.name.clone(), vec![tap.name.clone()])
        }
        None => match hybrid() {
            Some(found) => found,
            None => {
                let bridge = match resolved {
                    Resolved::Nic { nic, .. } => match &nic.plug {
                        Plug::Bridge { bridge } => bridge.clone(),
                        _ => None,
                    },
                    Resolved::Interface { .. } => None,
                }
                .or_else(|| master.filter(|m| m.kind.as_deref() == Some("bridge")).map(|m| m.name.clone()));
                return Err(match bridge {
                    Some(bridge) => OvsPortError::LinuxBridge { what, bridge },
                    None => OvsPortError::NotOnOvs { what },
                });
            }
        },
    };
    let found = snapshot
        .interfaces
        .iter()
        .find(|i| i.row.name == interface)
        .and_then(|i| snapshot.port_of_interface(&i.row.uuid));
    match found {
        Some((port, Some(bridge))) => {
            Ok(VmPort { bridge: bridge.row.name.clone(), port: port.row.name.clone(), path })
        }
        Some((port, None)) => Err(OvsPortError::NoBridge { what, port: port.row.name.clone() }),
        None => Err(OvsPortError::NoBridge { what, port: interface }),
    }
}

/// The interface whose iface-id is the NIC's Neutron port id, else whose attached-mac is its MAC.
fn find_by_ids(snapshot: &Snapshot, port_id: Option<&str>, mac: Option<Mac>) -> Option<String> {
    let by_id = port_id.and_then(|id| {
        snapshot
            .interfaces
            .iter()
            .find(|i| i.row.external_ids.get("iface-id").map(String::as_str) == Some(id))
    });
    let by_mac = || {
        mac.and_then(|mac| {
            snapshot.interfaces.iter().find(|i| {
                i.row.external_ids.get("attached-mac").and_then(|m| m.parse::<Mac>().ok()) == Some(mac)
            })
        })
    };
    by_id.or_else(by_mac).map(|i| i.row.name.clone())
}

/// The tap, its bridge and the veth pair up to `interface`, as far as rtnetlink shows them.
fn path_to(links: &[Link], tap: &Link, interface: &str) -> Vec<String> {
    let mut path = vec![tap.name.clone()];
    if interface == tap.name {
        return path;
    }
    if let Some(qbr) =
        tap.master.and_then(|m| links.iter().find(|l| l.ifindex == m && l.kind.as_deref() == Some("bridge")))
    {
        path.push(qbr.name.clone());
        if let Some(qvb) = links.iter().find(|l| {
            l.master == Some(qbr.ifindex)
                && l.peer
                    .and_then(|p| links.iter().find(|o| o.ifindex == p))
                    .is_some_and(|o| o.name == interface)
        }) {
            path.push(qvb.name.clone());
        }
    }
    path.push(interface.to_owned());
    path
}

/// Refuses a collector whose route runs through the mirrored path or the VM's OVS bridge: the
/// GRE copies would cross the mirrored port, or be flooded to it, and be mirrored again.
pub async fn check_route(
    netlink: &Netlink,
    to: IpAddr,
    vm_port: &VmPort,
    snapshot: &Snapshot,
) -> Result<(), OvsPortError> {
    let oif = match netlink.route_to(to).await.map_err(OvsPortError::Netlink)? {
        RouteTo::Unreachable => return Err(OvsPortError::NoRoute { to }),
        RouteTo::Local => return Err(OvsPortError::LocalAddress { to }),
        RouteTo::Out { oif: None, .. } => return Ok(()),
        RouteTo::Out { oif: Some(oif), .. } => oif,
    };
    let Some(device) = netlink.link_by_index(oif).await.map_err(OvsPortError::Netlink)? else {
        return Ok(());
    };
    let why = if vm_port.path.contains(&device.name) {
        Some(format!("carries the mirrored frames ({})", vm_port.path.join(" → ")))
    } else {
        let bridge = snapshot.bridge_named(&vm_port.bridge);
        let on_bridge = bridge.is_some_and(|b| {
            b.ports.iter().filter_map(|p| snapshot.port(p)).any(|p| {
                p.interfaces.iter().filter_map(|i| snapshot.interface(i)).any(|i| i.row.name == device.name)
            })
        });
        on_bridge.then(|| format!("is a port of {}, the bridge whose port is mirrored", vm_port.bridge))
    };
    match why {
        Some(why) => Err(OvsPortError::Loop { to, device: device.name, why }),
        None => Ok(()),
    }
}
