//! A libvirt domain's XML, as far as vmsniff needs it: names, Nova's metadata and each
//! `<interface>` in order, with the way it is plugged into the host. Pure: parsed from text.
use crate::model::mac::Mac;

use roxmltree::{Document, Node};
use thiserror::Error;

/// Nova's metadata namespace; the version after it (1.0, 1.1, 1.2, ...) changes with Nova.
const NOVA_NAMESPACE_PREFIX: &str = "http://openstack.org/xmlns/libvirt/nova/";

#[derive(Debug, Error)]
pub enum DomainXmlError {
    #[error("libvirt returned domain XML that does not parse")]
    Syntax(#[source] roxmltree::Error),
    #[error("the domain XML has no <{0}> element")]
    Missing(&'static str),
}

/// What the XML says about one domain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DomainXml {
    pub name: String,
    pub uuid: String,
    pub nova: Option<NovaInstance>,
    pub nics: Vec<Nic>,
}

/// `<metadata><nova:instance>`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NovaInstance {
    pub name: Option<String>,
    /// The Neutron port ids of `<nova:ports>`, in document order.
    pub ports: Vec<String>,
}

/// One `<interface>`; `index` counts them in document order (what `--nic` counts).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Nic {
    pub index: usize,
    /// The `type` attribute: bridge, network, ethernet, vhostuser, hostdev, direct, ...
    pub interface_type: String,
    pub mac: Option<Mac>,
    pub source_bridge: Option<String>,
    /// `<source dev>` (direct/macvtap: the lower device).
    pub source_dev: Option<String>,
    pub target_dev: Option<String>,
    /// `<virtualport type>` and its `interfaceid` (the Neutron port id for OVS).
    pub virtualport: Option<String>,
    pub interface_id: Option<String>,
    pub plug: Plug,
}

/// How a NIC reaches the host's network, which decides where its frames can be seen.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Plug {
    /// Nova's hybrid plug: the tap in a Linux bridge qbrXXXX, joined to br-int by the veth pair
    /// qvbXXXX/qvoXXXX (for iptables security groups).
    Hybrid { bridge: String },
    /// The tap is a port of an Open vSwitch bridge (`<virtualport type='openvswitch'>`).
    Ovs { bridge: String },
    /// The tap in a plain Linux bridge (or a libvirt network's bridge).
    Bridge { bridge: Option<String> },
    /// A tap libvirt creates and leaves unplugged (`type='ethernet'`); something else plugs it.
    Ethernet,
    /// A NIC whose frames no tap on this host carries.
    Unmirrorable { why: &'static str },
}

impl Plug {
    /// The name `list`, `show` and JSON use.
    pub fn kind(&self, nic: &Nic) -> String {
        match self {
            Plug::Hybrid { .. } => "hybrid".into(),
            Plug::Ovs { .. } => "ovs".into(),
            Plug::Bridge { .. } => "bridge".into(),
            Plug::Ethernet => "ethernet".into(),
            Plug::Unmirrorable { .. } => nic.interface_type.clone(),
        }
    }
}

/// A UUID reduced to 32 lower-case hex digits, so that any spelling compares equal.
pub fn normalize_uuid(text: &str) -> Option<String> {
    let hex: String = text.chars().filter(|&c| c != '-').collect::<String>().to_ascii_lowercase();
    (hex.len() == 32 && hex.bytes().all(|b| b.is_ascii_hexdigit())).then_some(hex)
}

pub fn parse(xml: &str) -> Result<DomainXml, DomainXmlError> {
    let document = Document::parse(xml).map_err(DomainXmlError::Syntax)?;
    let domain = document.root_element();
    let name = child_text(domain, "name").ok_or(DomainXmlError::Missing("name"))?;
    let uuid = child_text(domain, "uuid").ok_or(DomainXmlError::Missing("uuid"))?;
    let nova = child(domain, "metadata").and_then(nova_instance);
    let nics = child(domain, "devices")
        .map(|devices| {
            devices
                .children()
                .filter(|n| n.has_tag_name("interface"))
                .enumerate()
                .map(|(index, node)| nic(index, node))
                .collect()
        })
        .unwrap_or_default();
    Ok(DomainXml { name, uuid, nova, nics })
}

fn nova_instance(metadata: Node) -> Option<NovaInstance> {
    let is_nova = |n: &Node| n.tag_name().namespace().is_some_and(|ns| ns.starts_with(NOVA_NAMESPACE_PREFIX));
    let instance = metadata.children().find(|n| is_nova(n) && n.tag_name().name() == "instance")?;
    let name = instance
        .children()
        .find(|n| is_nova(n) && n.tag_name().name() == "name")
        .and_then(|n| n.text())
        .map(|t| t.trim().to_owned());
    let ports = instance
        .children()
        .filter(|n| is_nova(n) && n.tag_name().name() == "ports")
        .flat_map(|ports| ports.children())
        .filter(|n| is_nova(n) && n.tag_name().name() == "port")
        .filter_map(|n| n.attribute("uuid").map(str::to_owned))
        .collect();
    Some(NovaInstance { name, ports })
}

fn nic(index: usize, node: Node) -> Nic {
    let interface_type = node.attribute("type").unwrap_or("").to_owned();
    let source = child(node, "source");
    let virtualport = child(node, "virtualport");
    let mut nic = Nic {
        index,
        mac: child(node, "mac").and_then(|m| m.attribute("address")).and_then(|a| a.parse().ok()),
        source_bridge: source.and_then(|s| s.attribute("bridge")).map(str::to_owned),
        source_dev: source.and_then(|s| s.attribute("dev")).map(str::to_owned),
        target_dev: child(node, "target").and_then(|t| t.attribute("dev")).map(str::to_owned),
        virtualport: virtualport.and_then(|v| v.attribute("type")).map(str::to_owned),
        interface_id: virtualport
            .and_then(|v| child(v, "parameters"))
            .and_then(|p| p.attribute("interfaceid"))
            .map(str::to_owned),
        plug: Plug::Ethernet,
        interface_type,
    };
    nic.plug = plug(&nic);
    nic
}

fn plug(nic: &Nic) -> Plug {
    let on_ovs = nic.virtualport.as_deref() == Some("openvswitch");
    match nic.interface_type.as_str() {
        "bridge" | "network" => match (&nic.source_bridge, on_ovs) {
            (Some(bridge), true) => Plug::Ovs { bridge: bridge.clone() },
            (Some(bridge), false) if bridge.starts_with("qbr") => Plug::Hybrid { bridge: bridge.clone() },
            (bridge, _) => Plug::Bridge { bridge: bridge.clone() },
        },
        "ethernet" => Plug::Ethernet,
        "vhostuser" => Plug::Unmirrorable {
            why: "its frames pass between the guest and a userspace switch (OVS-DPDK) through shared \
                  memory and never cross the host's kernel, so there is no tap to hook; mirror its \
                  port on that switch (an OVS mirror) or the uplink instead",
        },
        "hostdev" => Plug::Unmirrorable {
            why: "it is a PCI device or SR-IOV virtual function handed to the guest: its frames go \
                  between the guest and the NIC hardware without touching the host's kernel; \
                  mirror on the physical switch port or the uplink instead",
        },
        "direct" => Plug::Unmirrorable {
            why: "it is a macvtap on a host device: the guest's frames go straight to the lower \
                  device without a tap whose tc hooks see them; mirror that lower device (the \
                  uplink) instead",
        },
        "user" => Plug::Unmirrorable {
            why: "user-mode networking (SLIRP) runs inside the QEMU process and has no host \
                  interface",
        },
        _ => Plug::Unmirrorable {
            why: "this kind of libvirt interface has no tap on the host; vmsniff mirrors bridge, \
                  network, OVS and ethernet interfaces",
        },
    }
}

fn child<'a, 'i>(node: Node<'a, 'i>, name: &str) -> Option<Node<'a, 'i>> {
    node.children()
        .find(|n| n.is_element() && n.tag_name().name() == name && n.tag_name().namespace().is_none())
}

fn child_text(node: Node, name: &str) -> Option<String> {
    child(node, name).and_then(|n| n.text()).map(|t| t.trim().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn domain(metadata: &str, interfaces: &str) -> String {
        format!(
            "<domain type='kvm'><name>instance-00000003</name>\
             <uuid>3f2a9c1e-7b4d-4e8f-9a6b-1c2d3e4f5a6b</uuid>{metadata}\
             <devices><disk type='file'/>{interfaces}<memballoon model='virtio'/></devices></domain>"
        )
    }

    const HYBRID: &str = "<interface type='bridge'><mac address='FA:16:3E:11:22:33'/>\
        <source bridge='qbrf7eae624-34'/><target dev='tapf7eae624-34'/><model type='virtio'/></interface>";
    const OVS: &str = "<interface type='bridge'><mac address='fa:16:3e:44:55:66'/>\
        <source bridge='br-int'/><virtualport type='openvswitch'>\
        <parameters interfaceid='8e3c1a52-07d4-4e1f-a2b3-c4d5e6f70819'/></virtualport>\
        <target dev='tap8e3c1a52-07'/></interface>";

    #[test]
    fn reads_nova_metadata_of_every_namespace_version() {
        for version in ["1.0", "1.1", "1.2"] {
            let xml = domain(
                &format!(
                    "<metadata><other:x xmlns:other='urn:x'><other:name>not this</other:name></other:x>\
                     <nova:instance xmlns:nova='http://openstack.org/xmlns/libvirt/nova/{version}'>\
                     <nova:name> c-private </nova:name><nova:ports>\
                     <nova:port uuid='f7eae624-3412-4b6c-9e3a-0d1c2b3a4f55'/>\
                     <nova:port uuid='8e3c1a52-07d4-4e1f-a2b3-c4d5e6f70819'/></nova:ports>\
                     </nova:instance></metadata>"
                ),
                HYBRID,
            );
            let parsed = parse(&xml).unwrap();
            let nova = parsed.nova.expect("nova metadata");
            assert_eq!(nova.name.as_deref(), Some("c-private"), "{version}");
            assert_eq!(nova.ports.len(), 2);
            assert_eq!(parsed.name, "instance-00000003");
            assert_eq!(parsed.uuid, "3f2a9c1e-7b4d-4e8f-9a6b-1c2d3e4f5a6b");
        }
    }

    #[test]
    fn another_namespace_named_instance_is_not_nova() {
        let xml = domain(
            "<metadata><x:instance xmlns:x='http://example.com/nova'><x:name>no</x:name></x:instance></metadata>",
            "",
        );
        assert_eq!(parse(&xml).unwrap().nova, None);
    }

    #[test]
    fn interfaces_in_order_with_their_plug() {
        let eth =
            "<interface type='ethernet'><mac address='52:54:00:00:00:03'/><target dev='tapx'/></interface>";
        let plain = "<interface type='bridge'><mac address='52:54:00:00:00:04'/><source bridge='br-lab'/><target dev='vnet0'/></interface>";
        let net = "<interface type='network'><source network='default' bridge='virbr0'/><target dev='vnet1'/></interface>";
        let nics = parse(&domain("", &format!("{HYBRID}{OVS}{eth}{plain}{net}"))).unwrap().nics;
        assert_eq!(nics.len(), 5);
        assert_eq!(nics.iter().map(|n| n.index).collect::<Vec<_>>(), [0, 1, 2, 3, 4]);
        assert_eq!(nics[0].plug, Plug::Hybrid { bridge: "qbrf7eae624-34".into() });
        assert_eq!(nics[0].mac.unwrap().to_string(), "fa:16:3e:11:22:33");
        assert_eq!(nics[0].target_dev.as_deref(), Some("tapf7eae624-34"));
        assert_eq!(nics[1].plug, Plug::Ovs { bridge: "br-int".into() });
        assert_eq!(nics[1].interface_id.as_deref(), Some("8e3c1a52-07d4-4e1f-a2b3-c4d5e6f70819"));
        assert_eq!(nics[1].virtualport.as_deref(), Some("openvswitch"));
        assert_eq!(nics[2].plug, Plug::Ethernet);
        assert_eq!(nics[3].plug, Plug::Bridge { bridge: Some("br-lab".into()) });
        assert_eq!(nics[4].plug, Plug::Bridge { bridge: Some("virbr0".into()) });
        assert_eq!(
            nics.iter().map(|n| n.plug.kind(n)).collect::<Vec<_>>(),
            ["hybrid", "ovs", "ethernet", "bridge", "bridge"]
        );
    }

    #[test]
    fn kernel_bypassing_nics_are_unmirrorable_with_a_reason() {
        for (xml, kind, words) in [
            (
                "<interface type='vhostuser'><source type='unix' path='/x' mode='server'/></interface>",
                "vhostuser",
                "never cross",
            ),
            (
                "<interface type='hostdev'><source><address type='pci'/></source></interface>",
                "hostdev",
                "SR-IOV",
            ),
            ("<interface type='direct'><source dev='eth1' mode='vepa'/></interface>", "direct", "macvtap"),
            ("<interface type='user'/>", "user", "SLIRP"),
            ("<interface type='mcast'/>", "mcast", "no tap"),
        ] {
            let nic = &parse(&domain("", xml)).unwrap().nics[0];
            let Plug::Unmirrorable { why } = nic.plug else { panic!("{kind} should be unmirrorable") };
            assert!(why.contains(words), "{kind}: {why}");
            assert_eq!(nic.plug.kind(nic), kind);
        }
    }

    #[test]
    fn broken_xml_is_an_error() {
        assert!(matches!(parse("<domain><name>x</name>"), Err(DomainXmlError::Syntax(_))));
        assert!(matches!(parse("<domain><uuid>u</uuid></domain>"), Err(DomainXmlError::Missing("name"))));
    }

    #[test]
    fn macs_and_uuids_in_any_spelling() {
        let mac = Mac([0xfa, 0x16, 0x3e, 0x11, 0x22, 0x33]);
        for text in ["fa:16:3e:11:22:33", "FA:16:3E:11:22:33", "fa-16-3e-11-22-33"] {
            assert_eq!(text.parse::<Mac>(), Ok(mac), "{text}");
        }
        for bad in [
            "fa:16:3e:11:22",
            "fa:16:3e:11:22:33:44",
            "fa16.3e11.2233",
            "fa:16-3e:11:22:33",
            "g0:16:3e:11:22:33",
            "c-private",
        ] {
            assert!(bad.parse::<Mac>().is_err(), "{bad}");
        }
        let uuid = Some("3f2a9c1e7b4d4e8f9a6b1c2d3e4f5a6b".to_string());
        assert_eq!(normalize_uuid("3F2A9C1E-7B4D-4E8F-9A6B-1C2D3E4F5A6B"), uuid);
        assert_eq!(normalize_uuid("3f2a9c1e7b4d4e8f9a6b1c2d3e4f5a6b"), uuid);
        assert_eq!(normalize_uuid("instance-00000003"), None);
        assert_eq!(normalize_uuid("3f2a9c1e"), None);
    }
}
