//! Whether an eBPF session's copies can reach their collector without being mirrored again:
//! the route to it must exist, leave this host, and run neither through the mirrored tap or
//! the bridge the tap is a port of, nor through a vmsniff tunnel device or a tap another session
//! mirrors (each copy would be copied again).
use std::net::IpAddr;

use thiserror::Error;

use crate::{
    model::{mirror::Tap, observed::Observed},
    sys::{
        netlink::{Link, Netlink, RouteTo},
        paths::gre_device_session,
    },
};

/// The rtnetlink kind of Open vSwitch's datapath device, every OVS port's master.
const OVS_DATAPATH: &str = "openvswitch";

#[derive(Debug, Error)]
pub enum RouteError {
    #[error(
        "no route to {to} in this network namespace (`ip route get {to}`): the copies could not \
         leave; add a route or give another --to"
    )]
    NoRoute { to: IpAddr },
    #[error("{to} is an address of this host: give the collector's address")]
    LocalAddress { to: IpAddr },
    #[error(
        "the route to {to} leaves through {device}, which {why}: the copies would be mirrored into \
         themselves. Give a collector reached through another interface"
    )]
    Loop { to: IpAddr, device: String, why: String },
    #[error("reading interfaces and routes through netlink failed")]
    Netlink(#[source] rtnetlink::Error),
}

/// Refuses a collector with no route, a local one, and one reached through `tap` or its bridge,
/// a vmsniff tunnel device or a tap a session of `observed` mirrors. Returns the source address
/// the route would use.
pub async fn check_collector_route(
    netlink: &Netlink,
    to: IpAddr,
    tap: &Tap,
    observed: &Observed,
) -> Result<Option<IpAddr>, RouteError> {
    let (oif, source) = match netlink.route_to(to).await.map_err(RouteError::Netlink)? {
        RouteTo::Unreachable => return Err(RouteError::NoRoute { to }),
        RouteTo::Local => return Err(RouteError::LocalAddress { to }),
        RouteTo::Out { oif: None, source } => return Ok(source),
        RouteTo::Out { oif: Some(oif), source } => (oif, source),
    };
    let Some(device) = netlink.link_by_index(oif).await.map_err(RouteError::Netlink)? else {
        return Ok(source);
    };
    let bridge = match netlink.link_by_index(tap.ifindex).await.map_err(RouteError::Netlink)? {
        Some(link) => link.master,
        None => None,
    };
    // Every port of every Open vSwitch bridge has the one datapath device as its master, so
    // sharing it says nothing about sharing the VM's bridge (br-ex is not br-int).
    let bridge_is_ovs = match bridge {
        Some(index) => netlink
            .link_by_index(index)
            .await
            .map_err(RouteError::Netlink)?
            .is_some_and(|l| l.kind.as_deref() == Some(OVS_DATAPATH)),
        None => false,
    };
    match loop_reason(&device, tap, bridge.filter(|_| !bridge_is_ovs), observed) {
        Some(why) => Err(RouteError::Loop { to, device: device.name, why }),
        None => Ok(source),
    }
}

/// Why copies leaving through `device` would come back as copies, if they would. `bridge` is
/// the Linux bridge `tap` is a port of.
fn loop_reason(device: &Link, tap: &Tap, bridge: Option<u32>, observed: &Observed) -> Option<String> {
    if device.ifindex == tap.ifindex {
        return Some("is the mirrored tap".to_owned());
    }
    if let Some((id, direction)) = gre_device_session(&device.name, device.alias.as_deref()) {
        return Some(format!("is vmsniff's tunnel device of session {id} ({})", direction.as_str()));
    }
    if let Some(id) = observed.taps.get(&device.ifindex).and_then(|t| t.ids.iter().find(|&&id| id != 0)) {
        return Some(format!("is a tap mirrored by session {id}"));
    }
    if bridge == Some(device.ifindex) {
        return Some(format!("is the bridge of the mirrored tap {}", tap.name));
    }
    if bridge.is_some() && device.master == bridge {
        return Some(format!("is a port of the bridge of the mirrored tap {}", tap.name));
    }
    None
}
