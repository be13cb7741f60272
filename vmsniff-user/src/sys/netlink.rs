//! One rtnetlink connection per command, and the link facts vmsniff reads through it.
use futures::TryStreamExt as _;
use netlink_packet_route::link::{
    InfoData, InfoGre, InfoGre6, InfoKind, InfoVxlan, LinkAttribute, LinkFlags, LinkInfo, LinkLayerType,
    LinkMessage,
};
use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteType};
use rtnetlink::{Handle, RouteMessageBuilder};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// A route netlink socket in the caller's network namespace.
#[derive(Clone)]
pub struct Netlink {
    pub handle: Handle,
}

impl Netlink {
    /// Must be called inside a tokio runtime: the connection runs as a task on it.
    pub fn open() -> std::io::Result<Self> {
        let (connection, handle, _) = rtnetlink::new_connection()?;
        tokio::spawn(connection);
        Ok(Self { handle })
    }

    pub async fn link_by_name(&self, name: &str) -> Result<Option<Link>, rtnetlink::Error> {
        let mut request = self.handle.link().get().match_name(name.to_owned()).execute();
        not_found_is_none(request.try_next().await).map(|m| m.map(Link::from_message))
    }

    /// Every interface of the namespace.
    pub async fn links(&self) -> Result<Vec<Link>, rtnetlink::Error> {
        self.handle.link().get().execute().map_ok(Link::from_message).try_collect().await
    }

    pub async fn link_by_index(&self, ifindex: u32) -> Result<Option<Link>, rtnetlink::Error> {
        let mut request = self.handle.link().get().match_index(ifindex).execute();
        not_found_is_none(request.try_next().await).map(|m| m.map(Link::from_message))
    }

    /// Where the kernel would send a packet to `to` (`ip route get TO`).
    pub async fn route_to(&self, to: IpAddr) -> Result<RouteTo, rtnetlink::Error> {
        let message = match to {
            IpAddr::V4(v4) => RouteMessageBuilder::<Ipv4Addr>::new().destination_prefix(v4, 32).build(),
            IpAddr::V6(v6) => RouteMessageBuilder::<Ipv6Addr>::new().destination_prefix(v6, 128).build(),
        };
        let route = match self.handle.route().get(message).execute().try_next().await {
            Ok(Some(route)) => route,
            Ok(None) => return Ok(RouteTo::Unreachable),
            Err(e) if matches!(errno(&e), Some(libc::ENETUNREACH | libc::EHOSTUNREACH)) => {
                return Ok(RouteTo::Unreachable);
            }
            Err(e) => return Err(e),
        };
        Ok(match route.header.kind {
            RouteType::Local => RouteTo::Local,
            RouteType::Unreachable | RouteType::BlackHole | RouteType::Prohibit => RouteTo::Unreachable,
            _ => RouteTo::Out {
                oif: route.attributes.iter().find_map(|a| match a {
                    RouteAttribute::Oif(index) => Some(*index),
                    _ => None,
                }),
                source: route.attributes.iter().find_map(|a| match a {
                    RouteAttribute::PrefSource(RouteAddress::Inet(v4)) => Some(IpAddr::V4(*v4)),
                    RouteAttribute::PrefSource(RouteAddress::Inet6(v6)) => Some(IpAddr::V6(*v6)),
                    _ => None,
                }),
            },
        })
    }
}

/// The answer of [`Netlink::route_to`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RouteTo {
    /// No route, or one that discards.
    Unreachable,
    /// An address of this host.
    Local,
    /// Out through this interface, from this source address.
    Out { oif: Option<u32>, source: Option<IpAddr> },
}

/// ENODEV from a lookup means "no such link", which callers handle as `None`.
fn not_found_is_none(
    result: Result<Option<LinkMessage>, rtnetlink::Error>,
) -> Result<Option<LinkMessage>, rtnetlink::Error> {
    match result {
        Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(None),
        other => other,
    }
}

/// The positive errno of a netlink error reply, if it is one.
pub fn errno(error: &rtnetlink::Error) -> Option<i32> {
    match error {
        rtnetlink::Error::NetlinkError(message) => message.code.map(|c| -c.get()),
        _ => None,
    }
}

/// What vmsniff needs to know about an interface.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Link {
    pub ifindex: u32,
    pub name: String,
    pub alias: Option<String>,
    /// The rtnetlink kind (`tun`, `veth`, `gretap`, ...); `None` for physical devices.
    pub kind: Option<String>,
    pub ethernet: bool,
    pub up: bool,
    pub mtu: u32,
    pub stats: LinkStats,
    /// The bridge (or OVS datapath) this interface is a port of (IFLA_MASTER).
    pub master: Option<u32>,
    /// A veth's peer in this namespace (IFLA_LINK without a link netns).
    pub peer: Option<u32>,
    /// An erspan or ip6erspan device's ERSPAN version (1 = type II, 2 = type III) and hardware
    /// id.
    pub erspan: Option<ErspanLink>,
    /// A vxlan device's UDP destination port.
    pub vxlan_port: Option<u16>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ErspanLink {
    pub version: u8,
    pub hwid: u16,
}

/// The kernel's own counters of a device, for the copies vmsniff hands it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct LinkStats {
    pub tx_packets: u64,
    pub tx_bytes: u64,
    pub tx_errors: u64,
    pub tx_dropped: u64,
    pub tx_carrier_errors: u64,
}

impl Link {
    fn from_message(message: LinkMessage) -> Self {
        let mut link = Link {
            ifindex: message.header.index,
            name: String::new(),
            alias: None,
            kind: None,
            ethernet: message.header.link_layer_type == LinkLayerType::Ether,
            up: message.header.flags.contains(LinkFlags::Up),
            mtu: 0,
            stats: LinkStats::default(),
            master: None,
            peer: None,
            erspan: None,
            vxlan_port: None,
        };
        let mut peer_elsewhere = false;
        for attribute in message.attributes {
            match attribute {
                LinkAttribute::IfName(name) => link.name = name,
                LinkAttribute::IfAlias(alias) => link.alias = Some(alias),
                LinkAttribute::Mtu(mtu) => link.mtu = mtu,
                LinkAttribute::Controller(master) => link.master = Some(master),
                LinkAttribute::Link(peer) => link.peer = Some(peer),
                LinkAttribute::LinkNetNsId(_) => peer_elsewhere = true,
                LinkAttribute::Stats64(s) => {
                    link.stats = LinkStats {
                        tx_packets: s.tx_packets,
                        tx_bytes: s.tx_bytes,
                        tx_errors: s.tx_errors,
                        tx_dropped: s.tx_dropped,
                        tx_carrier_errors: s.tx_carrier_errors,
                    }
                }
                LinkAttribute::LinkInfo(infos) => {
                    for info in infos {
                        match info {
                            LinkInfo::Kind(kind) => link.kind = Some(kind_name(&kind)),
                            LinkInfo::Data(InfoData::ErSpan(data)) => {
                                let mut erspan = ErspanLink::default();
                                for item in data {
                                    match item {
                                        InfoGre::ErSpanVer(v) => erspan.version = v,
                                        InfoGre::ErSpanHwId(h) => erspan.hwid = h,
                                        _ => {}
                                    }
                                }
                                link.erspan = Some(erspan);
                            }
                            LinkInfo::Data(InfoData::Ip6ErSpan(data)) => {
                                let mut erspan = ErspanLink::default();
                                for item in data {
                                    match item {
                                        InfoGre6::ErSpanVer(v) => erspan.version = v,
                                        InfoGre6::ErSpanHwId(h) => erspan.hwid = h,
                                        _ => {}
                                    }
                                }
                                link.erspan = Some(erspan);
                            }
                            LinkInfo::Data(InfoData::Vxlan(data)) => {
                                link.vxlan_port = data.into_iter().find_map(|item| match item {
                                    InfoVxlan::Port(port) => Some(port),
                                    _ => None,
                                });
                            }
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
        if peer_elsewhere || link.peer == Some(link.ifindex) {
            link.peer = None;
        }
        link
    }
}

fn kind_name(kind: &InfoKind) -> String {
    match kind {
        InfoKind::Other(name) => name.clone(),
        known => known.to_string(),
    }
}
