//! The path a NIC's frames take on this host as it exists now (tap → qbr → qvb/qvo → br-int),
//! each hop checked through rtnetlink (names, masters, veth peers) and OVSDB, never inferred
//! from names alone.
use std::collections::HashMap;

use serde::Serialize;

use crate::{
    ovsdb::vswitch::OvsAttachment,
    resolve::{
        domain::{Nic, Plug},
        interface::validate_name,
        vm::OvsView,
    },
    sys::netlink::{Link, Netlink},
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum HopState {
    Present,
    Missing,
    /// Its source could not be read (OVSDB unreachable).
    Unknown,
}

impl HopState {
    pub fn as_str(self) -> &'static str {
        match self {
            HopState::Present => "present",
            HopState::Missing => "missing",
            HopState::Unknown => "unknown",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Hop {
    pub name: String,
    pub role: &'static str,
    pub state: HopState,
    /// What was checked, and what was found.
    pub detail: String,
}

/// The links of the namespace, by name and index.
struct Links {
    by_name: HashMap<String, Link>,
    by_index: HashMap<u32, Link>,
}

impl Links {
    fn name_of(&self, ifindex: u32) -> String {
        self.by_index.get(&ifindex).map_or_else(|| format!("ifindex {ifindex}"), |l| l.name.clone())
    }

    /// A hop for `name` that must exist and have `master` as its master.
    fn port_of(&self, name: &str, role: &'static str, master: Option<&Link>) -> (Hop, Option<Link>) {
        let link = validate_name(name).ok().and_then(|_| self.by_name.get(name)).cloned();
        let (state, detail) = match (&link, master) {
            (None, _) => (HopState::Missing, "no such interface in this network namespace".to_owned()),
            (Some(link), Some(master)) if link.master == Some(master.ifindex) => {
                (HopState::Present, format!("ifindex {}, port of {}", link.ifindex, master.name))
            }
            (Some(link), Some(master)) => (
                HopState::Missing,
                format!(
                    "ifindex {} exists but is not a port of {} ({})",
                    link.ifindex,
                    master.name,
                    link.master.map_or("it has no master".to_owned(), |m| format!(
                        "its master is {}",
                        self.name_of(m)
                    ))
                ),
            ),
            (Some(link), None) => (HopState::Present, format!("ifindex {}", link.ifindex)),
        };
        (Hop { name: name.to_owned(), role, state, detail }, link)
    }
}

/// The hops of one NIC's path. `attachment` is its OVS interface as [`OvsView::attachment`]
/// found it.
pub async fn frame_path(
    netlink: &Netlink,
    nic: &Nic,
    ovs: &OvsView,
    attachment: Option<&OvsAttachment>,
) -> Result<Vec<Hop>, rtnetlink::Error> {
    let all = netlink.links().await?;
    let links = Links {
        by_index: all.iter().map(|l| (l.ifindex, l.clone())).collect(),
        by_name: all.into_iter().map(|l| (l.name.clone(), l)).collect(),
    };
    let Some(tap_name) = nic.target_dev.as_deref() else { return Ok(Vec::new()) };
    let (tap_hop, tap) = links.port_of(tap_name, "tap", None);
    let mut hops = vec![tap_hop];
    let mut last = tap;
    match &nic.plug {
        Plug::Hybrid { bridge } => {
            let (qbr_hop, qbr) = links.bridge(bridge, last.as_ref());
            hops.push(qbr_hop);
            // The bridge side of the veth: the veth port of qbr (the tap is its other port).
            let qvb = qbr.as_ref().and_then(|qbr| {
                links
                    .by_index
                    .values()
                    .find(|l| l.master == Some(qbr.ifindex) && l.kind.as_deref() == Some("veth"))
                    .cloned()
            });
            let expected = |prefix: &str| tap_name.strip_prefix("tap").map(|s| format!("{prefix}{s}"));
            let qvb_name =
                qvb.as_ref().map(|l| l.name.clone()).or_else(|| expected("qvb")).unwrap_or_default();
            let (qvb_hop, qvb) = links.port_of(&qvb_name, "veth (bridge side)", qbr.as_ref());
            hops.push(Hop {
                detail: if qvb.is_some() {
                    format!("{}, a veth", qvb_hop.detail)
                } else {
                    qvb_hop.detail.clone()
                },
                ..qvb_hop
            });
            let qvo = qvb.as_ref().and_then(|l| l.peer).and_then(|p| links.by_index.get(&p)).cloned();
            let qvo_name = qvo
                .as_ref()
                .map(|l| l.name.clone())
                .or_else(|| attachment.map(|a| a.interface.clone()))
                .or_else(|| expected("qvo"))
                .unwrap_or_default();
            hops.push(match &qvo {
                Some(link) => Hop {
                    name: qvo_name,
                    role: "veth (OVS side)",
                    state: HopState::Present,
                    detail: format!("ifindex {}, the veth peer of {}", link.ifindex, qvb_name),
                },
                None => Hop {
                    name: qvo_name,
                    role: "veth (OVS side)",
                    state: HopState::Missing,
                    detail: "no veth peer of the bridge side in this network namespace".into(),
                },
            });
            last = qvo;
            hops.push(ovs_hop(&links, ovs, attachment, last.as_ref()));
        }
        Plug::Ovs { .. } => hops.push(ovs_hop(&links, ovs, attachment, last.as_ref())),
        Plug::Bridge { bridge: Some(bridge) } => hops.push(links.bridge(bridge, last.as_ref()).0),
        Plug::Bridge { bridge: None } | Plug::Ethernet => {
            if attachment.is_some() {
                hops.push(ovs_hop(&links, ovs, attachment, last.as_ref()));
            } else if let Some(master) =
                last.as_ref().and_then(|l| l.master).and_then(|m| links.by_index.get(&m))
            {
                hops.push(Hop {
                    name: master.name.clone(),
                    role: "master",
                    state: HopState::Present,
                    detail: format!("ifindex {}, the master of {tap_name}", master.ifindex),
                });
            }
        }
        Plug::Unmirrorable { .. } => {}
    }
    Ok(hops)
}

impl Links {
    /// A Linux bridge hop: it exists, is a bridge, and `port` is one of its ports.
    fn bridge(&self, name: &str, port: Option<&Link>) -> (Hop, Option<Link>) {
        let link = self.by_name.get(name).cloned();
        let (state, detail) = match (&link, port) {
            (None, _) => (HopState::Missing, "no such bridge in this network namespace".to_owned()),
            (Some(b), _) if b.kind.as_deref() != Some("bridge") => (
                HopState::Missing,
                format!(
                    "ifindex {} is not a Linux bridge (kind {})",
                    b.ifindex,
                    b.kind.as_deref().unwrap_or("none")
                ),
            ),
            (Some(b), Some(p)) if p.master == Some(b.ifindex) => (
                HopState::Present,
                format!("ifindex {}, a Linux bridge with {} as a port", b.ifindex, p.name),
            ),
            (Some(b), Some(p)) => (
                HopState::Missing,
                format!("ifindex {} is a Linux bridge, but {} is not its port", b.ifindex, p.name),
            ),
            (Some(b), None) => (HopState::Present, format!("ifindex {}, a Linux bridge", b.ifindex)),
        };
        (Hop { name: name.to_owned(), role: "linux-bridge", state, detail }, link)
    }
}

/// The OVS bridge hop: OVSDB's word on which bridge holds the interface, and whether the kernel
/// has it in the OVS datapath.
fn ovs_hop(links: &Links, ovs: &OvsView, attachment: Option<&OvsAttachment>, port: Option<&Link>) -> Hop {
    let datapath = match port {
        Some(p) => match p.master.and_then(|m| links.by_index.get(&m)) {
            Some(m) if m.kind.as_deref() == Some("openvswitch") => {
                format!("; {} is in the kernel datapath {}", p.name, m.name)
            }
            _ => format!("; {} is not in an OVS kernel datapath (is ovs-vswitchd running?)", p.name),
        },
        None => String::new(),
    };
    match (ovs, attachment) {
        (OvsView::Unreachable(e), _) => Hop {
            name: attachment.and_then(|a| a.bridge.clone()).unwrap_or_else(|| "?".into()),
            role: "ovs-bridge",
            state: HopState::Unknown,
            detail: format!("OVSDB could not be read ({}){datapath}", short(e)),
        },
        (OvsView::Read(_), Some(a)) if a.bridge.is_some() => Hop {
            name: a.bridge.clone().unwrap_or_default(),
            role: "ovs-bridge",
            state: HopState::Present,
            detail: format!(
                "OVSDB: interface {} in port {} (ofport {}), found by {}{datapath}",
                a.interface,
                a.port.as_deref().unwrap_or("?"),
                a.ofport.map_or("-".into(), |o| o.to_string()),
                match a.found_by {
                    crate::ovsdb::vswitch::FoundBy::IfaceId => "iface-id",
                    crate::ovsdb::vswitch::FoundBy::AttachedMac => "attached-mac",
                    crate::ovsdb::vswitch::FoundBy::NamingConvention => "name",
                }
            ),
        },
        (OvsView::Read(_), Some(a)) => Hop {
            name: "?".into(),
            role: "ovs-bridge",
            state: HopState::Missing,
            detail: format!("OVSDB has interface {} but no bridge holds it{datapath}", a.interface),
        },
        (OvsView::Read(_), None) => Hop {
            name: "?".into(),
            role: "ovs-bridge",
            state: HopState::Missing,
            detail: format!("OVSDB has no interface with this NIC's Neutron port id or MAC{datapath}"),
        },
    }
}

/// The first clause of an OVSDB error, for a one-line hop.
fn short(error: &crate::ovsdb::OvsdbError) -> String {
    let text = error.to_string();
    text.split(';').next().unwrap_or(&text).to_owned()
}
