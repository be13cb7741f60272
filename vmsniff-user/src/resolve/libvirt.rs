//! The VMs of this host as libvirt knows them, through a read-only connection: vmsniff never
//! changes a domain.
use crate::model::sources::LibvirtUri;

use serde::Serialize;
use thiserror::Error;
use virt::{connect::Connect, sys};

use super::domain::{self, DomainXml, DomainXmlError};

/// Which libvirt to talk to, and where that choice came from (for error messages).
#[derive(Debug, Error)]
pub enum LibvirtError {
    #[error(
        "cannot reach libvirt at {uri}: {message}; is libvirtd or virtqemud running on this host \
         (`systemctl status libvirtd virtqemud`)? Name another with --connect URI or \
         LIBVIRT_DEFAULT_URI, or name the tap with --tap TAP"
    )]
    Unreachable { uri: LibvirtUri, message: String },
    #[error("libvirt at {uri}: {what} failed: {message}")]
    Call { uri: LibvirtUri, what: String, message: String },
    #[error("libvirt at {uri}: domain {domain}")]
    Xml {
        uri: LibvirtUri,
        domain: String,
        #[source]
        source: DomainXmlError,
    },
}

/// A domain's run state, from virDomainGetState.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum VmState {
    Running,
    Blocked,
    Paused,
    ShuttingDown,
    ShutOff,
    Crashed,
    Suspended,
    Unknown,
}

impl VmState {
    fn from_libvirt(state: sys::virDomainState) -> Self {
        match state {
            sys::VIR_DOMAIN_RUNNING => VmState::Running,
            sys::VIR_DOMAIN_BLOCKED => VmState::Blocked,
            sys::VIR_DOMAIN_PAUSED => VmState::Paused,
            sys::VIR_DOMAIN_SHUTDOWN => VmState::ShuttingDown,
            sys::VIR_DOMAIN_SHUTOFF => VmState::ShutOff,
            sys::VIR_DOMAIN_CRASHED => VmState::Crashed,
            sys::VIR_DOMAIN_PMSUSPENDED => VmState::Suspended,
            _ => VmState::Unknown,
        }
    }

    /// Whether QEMU runs and so holds the VM's taps.
    pub fn has_taps(self) -> bool {
        !matches!(self, VmState::ShutOff | VmState::Crashed)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            VmState::Running => "running",
            VmState::Blocked => "blocked",
            VmState::Paused => "paused",
            VmState::ShuttingDown => "shutting-down",
            VmState::ShutOff => "shut-off",
            VmState::Crashed => "crashed",
            VmState::Suspended => "suspended",
            VmState::Unknown => "unknown",
        }
    }
}

/// One domain: its XML and its state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Vm {
    pub xml: DomainXml,
    pub state: VmState,
}

impl Vm {
    pub fn nova_name(&self) -> Option<&str> {
        self.xml.nova.as_ref().and_then(|n| n.name.as_deref())
    }

    /// The operator's name for it: Nova's, else the domain's.
    pub fn display_name(&self) -> &str {
        self.nova_name().unwrap_or(&self.xml.name)
    }
}

/// A read-only libvirt connection.
pub struct Libvirt {
    connect: Connect,
    pub uri: LibvirtUri,
}

impl Libvirt {
    pub fn open(uri: LibvirtUri) -> Result<Self, LibvirtError> {
        // libvirt's default handler prints every error on stderr; vmsniff reports them itself.
        virt::error::clear_error_callback();
        match Connect::open_read_only(uri.for_libvirt()) {
            Ok(connect) => Ok(Libvirt { connect, uri }),
            Err(e) => Err(LibvirtError::Unreachable { uri, message: e.message().to_owned() }),
        }
    }

    /// Every domain, running or defined, in libvirt's order.
    pub fn vms(&self) -> Result<Vec<Vm>, LibvirtError> {
        let call = |what: &str, e: virt::error::Error| LibvirtError::Call {
            uri: self.uri.clone(),
            what: what.to_owned(),
            message: e.message().to_owned(),
        };
        let domains = self.connect.list_all_domains(0).map_err(|e| call("listing domains", e))?;
        let mut vms = Vec::with_capacity(domains.len());
        for domain in domains {
            let name = domain.get_name().map_err(|e| call("reading a domain's name", e))?;
            // The live XML: it names the taps libvirt created.
            let text =
                domain.get_xml_desc(0).map_err(|e| call(&format!("reading domain {name}'s XML"), e))?;
            let (state, _reason) =
                domain.get_state().map_err(|e| call(&format!("reading domain {name}'s state"), e))?;
            let xml = domain::parse(&text).map_err(|source| LibvirtError::Xml {
                uri: self.uri.clone(),
                domain: name.clone(),
                source,
            })?;
            vms.push(Vm { xml, state: VmState::from_libvirt(state) });
        }
        // libvirt lists running domains first, by id: sorted by name, lists read predictably.
        vms.sort_by(|a, b| (a.display_name(), &a.xml.name).cmp(&(b.display_name(), &b.xml.name)));
        Ok(vms)
    }
}

#[cfg(test)]
pub mod tests {
    use super::*;

    /// The node fixture as libvirt's test driver reads it.
    pub fn fixture_uri() -> LibvirtUri {
        LibvirtUri::Option(format!(
            "test://{}/tests/fixtures/libvirt/nova-node.xml",
            env!("CARGO_MANIFEST_DIR")
        ))
    }

    pub fn fixture_vms() -> Vec<Vm> {
        Libvirt::open(fixture_uri()).expect("libvirt's test driver opens the fixture").vms().unwrap()
    }

    #[test]
    fn the_test_driver_lists_every_fixture_domain_with_its_state() {
        let vms = fixture_vms();
        let names: Vec<(&str, &str, VmState)> =
            vms.iter().map(|v| (v.xml.name.as_str(), v.display_name(), v.state)).collect();
        for expected in [
            ("instance-00000003", "c-private", VmState::Running),
            ("instance-00000004", "c-web", VmState::Running),
            ("instance-00000005", "c-dup", VmState::Running),
            ("instance-00000006", "c-dup", VmState::Running),
            ("instance-00000007", "c-stopped", VmState::ShutOff),
            ("lab-router", "lab-router", VmState::Running),
        ] {
            assert!(names.contains(&expected), "{expected:?} missing from {names:?}");
        }
        let private = vms.iter().find(|v| v.nova_name() == Some("c-private")).unwrap();
        assert_eq!(private.xml.nics.len(), 2);
        assert_eq!(private.xml.nics[0].target_dev.as_deref(), Some("tapf7eae624-34"));
        assert_eq!(private.xml.nova.as_ref().unwrap().ports[1], "8e3c1a52-07d4-4e1f-a2b3-c4d5e6f70819");
    }

    #[test]
    fn an_unreachable_libvirt_names_the_uri_and_the_fix() {
        let uri = LibvirtUri::Option("test:///nonexistent/node.xml".into());
        let Err(error) = Libvirt::open(uri) else { panic!("a missing node file opened") };
        let text = error.to_string();
        assert!(text.contains("test:///nonexistent/node.xml (--connect)"), "{text}");
        assert!(text.contains("libvirtd") && text.contains("--connect"), "{text}");
    }
}
