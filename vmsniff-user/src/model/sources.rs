//! Where VMs and OVS ports are read from: libvirt's URI and OVSDB's socket, as the global
//! `--connect` and `--ovsdb` options (and the environment) give them.
use std::fmt;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LibvirtUri {
    /// `--connect URI`.
    Option(String),
    /// `LIBVIRT_DEFAULT_URI`; libvirt reads it itself.
    Environment(String),
    /// Neither: libvirt's own default (qemu:///system for root, unless libvirt.conf says
    /// otherwise).
    Default,
}

impl LibvirtUri {
    pub fn new(option: Option<String>) -> Self {
        match (option, std::env::var("LIBVIRT_DEFAULT_URI")) {
            (Some(uri), _) => LibvirtUri::Option(uri),
            (None, Ok(uri)) if !uri.is_empty() => LibvirtUri::Environment(uri),
            (None, _) => LibvirtUri::Default,
        }
    }

    /// What to pass to libvirt: `None` lets it apply the environment and its configuration.
    pub fn for_libvirt(&self) -> Option<&str> {
        match self {
            LibvirtUri::Option(uri) => Some(uri),
            LibvirtUri::Environment(_) | LibvirtUri::Default => None,
        }
    }
}

impl fmt::Display for LibvirtUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LibvirtUri::Option(uri) => write!(f, "{uri} (--connect)"),
            LibvirtUri::Environment(uri) => write!(f, "{uri} (LIBVIRT_DEFAULT_URI)"),
            LibvirtUri::Default => write!(f, "libvirt's default URI (qemu:///system)"),
        }
    }
}

/// Where VMs and ports are read from: the global `--connect` and `--ovsdb` options.
#[derive(Clone, Debug)]
pub struct Sources {
    pub libvirt: LibvirtUri,
    /// `--ovsdb unix:PATH` or VMSNIFF_OVSDB.
    pub ovsdb: Option<String>,
}
