//! Whether an eBPF session's copies can reach their collector without being mirrored again:
//! the route to it must exist, leave this host, and not run through the mirrored tap or the
//! bridge the tap is a port of.
use std::net::IpAddr;

use thiserror::Error;

use crate::{
    model::mirror::Tap,
    sys::netlink::{Netlink, RouteTo},
};

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

/// Refuses a collector with no route, a local one, and one reached through `tap` or its bridge.
/// Returns the source address the route would use.
pub async fn check_collector_route(
    netlink: &Netlink,
    to: IpAddr,
    tap: &Tap,
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
    let why = if oif == tap.ifindex {
        Some("is the mirrored tap".to_owned())
    } else if bridge == Some(oif) {
        Some(format!("is the bridge of the mirrored tap {}", tap.name))
    } else if bridge.is_some() && device.master == bridge {
        Some(format!("is a port of the bridge of the mirrored tap {}", tap.name))
    } else {
        None
    };
    match why {
        Some(why) => Err(RouteError::Loop { to, device: device.name, why }),
        None => Ok(source),
    }
}
