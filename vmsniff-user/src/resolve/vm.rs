//! A VM argument, resolved against libvirt, Open vSwitch and this network namespace.
use crate::model::sources::Sources;
use thiserror::Error;

use crate::{
    model::mirror::NicChoice,
    resolve::{
        domain::{Nic, Plug},
        interface::{InterfaceError, ethernet_interface, validate_name},
        libvirt::{Libvirt, LibvirtError, Vm},
        select::{SelectError, choose_nic, chosen_nics, find_vm, mirrorable_tap},
    },
};
use crate::{
    ovsdb::{
        Client, OvsdbError,
        vswitch::{FoundBy, OvsAttachment, Switch},
    },
    sys::{
        blocking::off_thread,
        netlink::{Link, Netlink},
    },
};

#[derive(Debug, Error)]
pub enum ResolveError {
    #[error("say which VM: its Nova name, UUID, libvirt domain or MAC, or its tap with --tap TAP")]
    Missing,
    #[error(transparent)]
    Select(#[from] SelectError),
    #[error(transparent)]
    Libvirt(#[from] LibvirtError),
    #[error(transparent)]
    Interface(#[from] InterfaceError),
    #[error(
        "VM {vm} runs, but the tap of its NIC {index}, {tap}, is not in this network namespace: run \
         vmsniff on the VM's compute node, in the host's network namespace (`virsh domiflist {domain}` \
         shows the tap)"
    )]
    TapMissing { vm: String, domain: String, index: usize, tap: String },
    #[error("{selector:?} is an interface, not a VM: --nic and --mac choose among a VM's NICs; drop them")]
    NicOfInterface { selector: String },
}

impl ResolveError {
    /// Whether it goes away by itself when the VM comes (back): stopped, not defined on this
    /// host (migrated away), its tap not there yet. A daemon waits for these.
    pub fn waits(&self) -> bool {
        matches!(
            self,
            ResolveError::Select(SelectError::NotRunning { .. } | SelectError::UnknownVm { .. })
                | ResolveError::TapMissing { .. }
                | ResolveError::Interface(InterfaceError::NotFound { .. })
        )
    }
}

/// What a VM argument named.
#[derive(Debug)]
pub enum Resolved {
    /// A NIC of a libvirt domain, with its tap as the kernel has it now.
    Nic { vm: Box<Vm>, nic: Nic, tap: Link },
    /// An interface named directly (`--tap`, or a name libvirt does not know).
    Interface { tap: Link },
}

impl Resolved {
    pub fn tap(&self) -> &Link {
        match self {
            Resolved::Nic { tap, .. } | Resolved::Interface { tap } => tap,
        }
    }
}

/// Resolves a VM argument to the tap to mirror. `--tap` goes straight to the interface. A
/// selector goes through libvirt; when libvirt is unreachable or knows no such VM, an Ethernet
/// interface of exactly that name is used instead, and stderr says so.
pub async fn resolve_tap(
    sources: &Sources,
    netlink: &Netlink,
    selector: Option<&str>,
    tap: Option<&str>,
    choice: NicChoice,
) -> Result<Resolved, ResolveError> {
    if let Some(tap) = tap {
        if choice != NicChoice::Unspecified {
            return Err(ResolveError::NicOfInterface { selector: tap.to_owned() });
        }
        return Ok(Resolved::Interface { tap: ethernet_interface(netlink, "tap", tap).await? });
    }
    let selector = selector.ok_or(ResolveError::Missing)?;
    let libvirt_failure = match read_vms(sources).await {
        Ok(vms) => match resolve_in_vms(netlink, &vms, selector, choice).await {
            Err(e @ ResolveError::Select(SelectError::UnknownVm { .. })) => e,
            other => return other,
        },
        Err(e) => ResolveError::Libvirt(e),
    };
    if choice == NicChoice::Unspecified
        && validate_name(selector).is_ok()
        && let Ok(Some(link)) = netlink.link_by_name(selector).await
        && link.ethernet
    {
        log::warn!(
            "{}: using the interface named {selector} (--tap {selector} says so explicitly)",
            match &libvirt_failure {
                ResolveError::Libvirt(_) => "libvirt is unreachable",
                _ => "no libvirt VM has this name",
            }
        );
        return Ok(Resolved::Interface { tap: link });
    }
    Err(libvirt_failure)
}

/// A VM selector resolved among domains read already (the daemon reads libvirt once per pass).
pub async fn resolve_in_vms(
    netlink: &Netlink,
    vms: &[Vm],
    selector: &str,
    choice: NicChoice,
) -> Result<Resolved, ResolveError> {
    let found = find_vm(vms, selector)?;
    let nic = choose_nic(selector, &found, choice)?;
    let tap_name = mirrorable_tap(found.vm, nic)?;
    let tap = match ethernet_interface(netlink, "tap", tap_name).await {
        Ok(tap) => tap,
        Err(InterfaceError::NotFound { .. }) => {
            return Err(ResolveError::TapMissing {
                vm: found.vm.display_name().to_owned(),
                domain: found.vm.xml.name.clone(),
                index: nic.index,
                tap: tap_name.to_owned(),
            });
        }
        Err(e) => return Err(e.into()),
    };
    Ok(Resolved::Nic { vm: Box::new(found.vm.clone()), nic: nic.clone(), tap })
}

/// Every domain libvirt has, read off the runtime thread.
pub async fn read_vms(sources: &Sources) -> Result<Vec<Vm>, LibvirtError> {
    let uri = sources.libvirt.clone();
    off_thread(move || Libvirt::open(uri)?.vms()).await
}

/// The taps a VM argument stands for, without checking that they exist: a tap that is gone
/// (its VM stopped) may still have sessions to show or remove. All the VM's NICs unless one is
/// chosen.
pub async fn vm_taps(
    sources: &Sources,
    selector: &str,
    choice: NicChoice,
) -> Result<Vec<String>, ResolveError> {
    let vms = read_vms(sources).await?;
    let found = find_vm(&vms, selector)?;
    let nics = chosen_nics(selector, &found, choice)?;
    Ok(nics.into_iter().filter_map(|n| n.target_dev.clone()).filter(|t| validate_name(t).is_ok()).collect())
}

/// Open vSwitch as far as it could be read.
#[derive(Debug)]
pub enum OvsView {
    Read(Switch),
    Unreachable(OvsdbError),
}

impl OvsView {
    pub fn read(sources: &Sources) -> OvsView {
        let read = Client::open(sources.ovsdb.as_deref()).and_then(|mut client| Switch::read(&mut client));
        match read {
            Ok(switch) => OvsView::Read(switch),
            Err(e) => OvsView::Unreachable(e),
        }
    }

    /// A NIC's OVS interface: found in OVSDB by its Neutron port id or MAC; when OVSDB cannot
    /// be read, named by Nova's convention (hybrid: tapXXXX → qvoXXXX; OVS: the tap itself).
    pub fn attachment(&self, vm: &Vm, nic: &Nic) -> Option<OvsAttachment> {
        match self {
            OvsView::Read(switch) => switch.find_vm_interface(port_id(vm, nic).as_deref(), nic.mac),
            OvsView::Unreachable(_) => {
                let tap = nic.target_dev.as_deref()?;
                let (interface, bridge) = match &nic.plug {
                    Plug::Hybrid { .. } => (format!("qvo{}", tap.strip_prefix("tap")?), None),
                    Plug::Ovs { bridge } => (tap.to_owned(), Some(bridge.clone())),
                    _ => return None,
                };
                Some(OvsAttachment {
                    port: Some(interface.clone()),
                    interface,
                    bridge,
                    ofport: None,
                    found_by: FoundBy::NamingConvention,
                })
            }
        }
    }
}

/// A NIC's Neutron port id: the OVS interfaceid, else the Nova port whose id begins as the
/// tap's name does after `tap` (Nova names taps `tap` + the port id's first 11 characters).
pub fn port_id(vm: &Vm, nic: &Nic) -> Option<String> {
    if let Some(id) = &nic.interface_id {
        return Some(id.clone());
    }
    let suffix = nic.target_dev.as_deref()?.strip_prefix("tap").filter(|s| s.len() >= 8)?;
    vm.xml.nova.as_ref()?.ports.iter().find(|p| p.starts_with(suffix)).cloned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::sources::LibvirtUri;
    use vmsniff_tests::ovsdb::OvsdbServer;

    use crate::resolve::libvirt::tests::fixture_vms;

    fn vm<'a>(vms: &'a [Vm], name: &str) -> &'a Vm {
        vms.iter().find(|v| v.display_name() == name).unwrap()
    }

    #[test]
    fn port_ids_come_from_the_virtualport_or_nova_ports() {
        let vms = fixture_vms();
        let private = vm(&vms, "c-private");
        assert_eq!(
            port_id(private, &private.xml.nics[0]).as_deref(),
            Some("f7eae624-3412-4b6c-9e3a-0d1c2b3a4f55")
        );
        assert_eq!(
            port_id(private, &private.xml.nics[1]).as_deref(),
            Some("8e3c1a52-07d4-4e1f-a2b3-c4d5e6f70819")
        );
        let lab = vm(&vms, "lab-router");
        assert_eq!(port_id(lab, &lab.xml.nics[0]), None);
    }

    #[test]
    fn the_ovs_port_comes_from_ovsdb_and_the_naming_convention_only_without_it() {
        let vms = fixture_vms();
        let private = vm(&vms, "c-private");
        let unreachable = OvsView::read(&Sources {
            libvirt: LibvirtUri::Default,
            ovsdb: Some("unix:/nonexistent/db.sock".into()),
        });
        assert!(matches!(unreachable, OvsView::Unreachable(OvsdbError::Connect { .. })));
        let guessed = unreachable.attachment(private, &private.xml.nics[0]).unwrap();
        assert_eq!(
            (guessed.interface.as_str(), guessed.found_by),
            ("qvof7eae624-34", FoundBy::NamingConvention)
        );
        let guessed = unreachable.attachment(private, &private.xml.nics[1]).unwrap();
        assert_eq!(
            (guessed.interface.as_str(), guessed.bridge.as_deref()),
            ("tap8e3c1a52-07", Some("br-int"))
        );

        let Some(server) = OvsdbServer::start() else { return };
        // OVS says the hybrid NIC's port is named otherwise: OVSDB wins over the convention.
        server.vsctl(&[
            "add-br",
            "br-int",
            "--",
            "add-port",
            "br-int",
            "qvo-renamed",
            "--",
            "set",
            "Interface",
            "qvo-renamed",
            "external_ids:iface-id=f7eae624-3412-4b6c-9e3a-0d1c2b3a4f55",
        ]);
        let read = OvsView::read(&Sources { libvirt: LibvirtUri::Default, ovsdb: Some(server.address()) });
        let found = read.attachment(private, &private.xml.nics[0]).unwrap();
        assert_eq!((found.interface.as_str(), found.found_by), ("qvo-renamed", FoundBy::IfaceId));
        assert_eq!(found.bridge.as_deref(), Some("br-int"));
        // Not in OVSDB at all: none, rather than a guess.
        assert_eq!(read.attachment(private, &private.xml.nics[1]), None);
    }

    #[tokio::test]
    async fn vm_taps_lists_every_nic_unless_one_is_chosen() {
        let sources = Sources { libvirt: crate::resolve::libvirt::tests::fixture_uri(), ovsdb: None };
        assert_eq!(
            vm_taps(&sources, "c-private", NicChoice::Unspecified).await.unwrap(),
            ["tapf7eae624-34", "tap8e3c1a52-07"]
        );
        assert_eq!(vm_taps(&sources, "c-private", NicChoice::Index(1)).await.unwrap(), ["tap8e3c1a52-07"]);
        assert_eq!(
            vm_taps(&sources, "fa:16:3e:11:22:33", NicChoice::Unspecified).await.unwrap(),
            ["tapf7eae624-34"]
        );
        assert!(matches!(
            vm_taps(&sources, "c-dup", NicChoice::Unspecified).await,
            Err(ResolveError::Select(SelectError::Ambiguous { .. }))
        ));
    }
}
