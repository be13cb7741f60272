//! Link events: a tap created or deleted is what a VM's start, stop, reboot and migration look
//! like from the host. Subscribed before the daemon's first reconcile, so nothing falls between
//! the initial look and the first event.
use std::collections::BTreeMap;

use futures::{StreamExt as _, channel::mpsc::UnboundedReceiver};
use netlink_packet_core::{NetlinkMessage, NetlinkPayload};
use netlink_packet_route::{
    RouteNetlinkMessage,
    link::{LinkAttribute, LinkMessage},
};
use rtnetlink::sys::{AsyncSocket as _, SocketAddr};

type Messages = UnboundedReceiver<(NetlinkMessage<RouteNetlinkMessage>, SocketAddr)>;

pub struct LinkEvents {
    messages: Messages,
    /// ifindex → name, to tell a new or renamed interface from a state change.
    known: BTreeMap<u32, String>,
}

/// What an event means to the daemon.
#[derive(Debug, PartialEq, Eq)]
pub enum LinkChange {
    Appeared {
        ifindex: u32,
        name: String,
    },
    Gone {
        ifindex: u32,
        name: String,
    },
    /// A qdisc or tc filter was deleted on this interface: maybe vmsniff's programs with it.
    TcRemoved {
        ifindex: u32,
        name: String,
    },
}

impl LinkEvents {
    /// Joins the link and traffic-control groups (RTMGRP_LINK, RTMGRP_TC) of the caller's
    /// network namespace: a `tc qdisc del` on a mirrored tap removes vmsniff's programs, and
    /// nothing but this event says so at once.
    pub fn subscribe() -> std::io::Result<Self> {
        let (mut connection, _, messages) = rtnetlink::new_connection()?;
        let socket = connection.socket_mut().socket_mut();
        // A large buffer: a burst of interface changes (a node's OVS restarting) must not
        // overflow it; the periodic resync still covers an overrun.
        socket.set_rx_buf_sz(4 << 20)?;
        socket
            .bind(&SocketAddr::new(0, rtnetlink::constants::RTMGRP_LINK | rtnetlink::constants::RTMGRP_TC))?;
        tokio::spawn(connection);
        Ok(Self { messages, known: BTreeMap::new() })
    }

    /// Records the interfaces that exist now.
    pub fn know(&mut self, links: impl IntoIterator<Item = (u32, String)>) {
        self.known.extend(links);
    }

    /// The next appearance or disappearance; `None` when the socket closed.
    pub async fn next(&mut self) -> Option<LinkChange> {
        loop {
            let (message, _) = self.messages.next().await?;
            if let Some(change) = self.interpret(message) {
                return Some(change);
            }
        }
    }

    fn interpret(&mut self, message: NetlinkMessage<RouteNetlinkMessage>) -> Option<LinkChange> {
        match message.payload {
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(link)) => {
                let (ifindex, name) = identity(&link)?;
                if self.known.get(&ifindex) == Some(&name) {
                    return None;
                }
                self.known.insert(ifindex, name.clone());
                Some(LinkChange::Appeared { ifindex, name })
            }
            NetlinkPayload::InnerMessage(
                RouteNetlinkMessage::DelQueueDiscipline(tc) | RouteNetlinkMessage::DelTrafficFilter(tc),
            ) => {
                let ifindex = u32::try_from(tc.header.index).ok()?;
                let name = self.known.get(&ifindex)?.clone();
                Some(LinkChange::TcRemoved { ifindex, name })
            }
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelLink(link)) => {
                let (ifindex, name) = identity(&link)?;
                self.known.remove(&ifindex);
                Some(LinkChange::Gone { ifindex, name })
            }
            _ => None,
        }
    }
}

fn identity(link: &LinkMessage) -> Option<(u32, String)> {
    let name = link.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(name) => Some(name.clone()),
        _ => None,
    })?;
    Some((link.header.index, name))
}
