//! The arguments that say which VM NIC to mirror, and where the copies go.
use clap::Args;

use crate::{
    netlink::Netlink,
    plan::request::{AttachModeChoice, Directions, Tap, Target, parse_collector},
    resolve::interface::{InterfaceError, ethernet_interface, validate_name},
};

#[derive(Args, Debug)]
pub struct MirrorArgs {
    /// The VM to mirror. Today: the name of its tap (as with --tap); Nova names, UUIDs, libvirt
    /// domains and MACs resolve through libvirt in a later version.
    #[arg(value_name = "VM", conflicts_with = "tap")]
    pub vm: Option<String>,

    /// The VM's tap, or any Ethernet interface standing for one (a veth, a qvo port).
    #[arg(long, value_name = "TAP")]
    pub tap: Option<String>,

    /// The collector's IPv4 address: copies go there in GRE (transparent Ethernet bridging).
    #[arg(long, value_name = "IP", value_parser = parse_collector, required_unless_present = "to_dev", conflicts_with = "to_dev")]
    pub to: Option<std::net::Ipv4Addr>,

    /// Copy into an existing local interface instead of GRE (local analysis; tests on kernels
    /// without ip_gre).
    #[arg(long, value_name = "IFNAME")]
    pub to_dev: Option<String>,

    /// The session's GRE key K; on the wire the key is K*2+d (d = 0 out, 1 in). Default: the
    /// session id.
    #[arg(long, value_name = "N", conflicts_with = "to_dev",
          value_parser = clap::value_parser!(u32).range(0..=i64::from(vmsniff_ebpf::MAX_GRE_USER_KEY)))]
    pub key: Option<u32>,

    /// Which frames: `in` (going into the VM), `out` (sent by the VM) or `both`.
    #[arg(long, value_enum, default_value_t = Directions::Both)]
    pub direction: Directions,

    /// Outer IP TTL of the GRE packets.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u8).range(1..), conflicts_with = "to_dev")]
    pub ttl: u8,

    /// Outer IP TOS of the GRE packets.
    #[arg(long, default_value_t = 0, conflicts_with = "to_dev")]
    pub tos: u8,

    /// How to attach to the tap: `tcx` links (Linux >= 6.6), `netlink` (a clsact qdisc), or
    /// `auto` (tcx where the kernel has it).
    #[arg(long, value_enum, default_value_t = AttachModeChoice::Auto)]
    pub attach_mode: AttachModeChoice,
}

#[derive(Debug, thiserror::Error)]
pub enum SelectError {
    #[error("say which VM to mirror: give its tap with --tap TAP")]
    Missing,
    #[error(
        "no interface named {0:?} here; naming a VM by its Nova name, UUID, libvirt domain or MAC \
         is not supported by this version: give the VM's tap with --tap (`virsh domiflist \
         DOMAIN` lists it)"
    )]
    UnknownVm(String),
    #[error(transparent)]
    Interface(#[from] InterfaceError),
}

impl MirrorArgs {
    /// The tap this command is about.
    pub async fn tap(&self, netlink: &Netlink) -> Result<Tap, SelectError> {
        let link = match (&self.tap, &self.vm) {
            (Some(tap), _) => ethernet_interface(netlink, "tap", tap).await?,
            (None, Some(vm)) => resolve_vm(netlink, vm).await?,
            (None, None) => return Err(SelectError::Missing),
        };
        Ok(Tap { ifindex: link.ifindex, name: link.name })
    }

    pub async fn target(&self, netlink: &Netlink) -> Result<Target, SelectError> {
        match (&self.to, &self.to_dev) {
            (Some(remote), _) => Ok(Target::Gre { remote: *remote, ttl: self.ttl, tos: self.tos }),
            (None, Some(dev)) => {
                let link = ethernet_interface(netlink, "--to-dev", dev).await?;
                Ok(Target::LocalDev { name: link.name, ifindex: link.ifindex })
            }
            (None, None) => unreachable!("clap requires --to or --to-dev"),
        }
    }
}

/// A VM selector. Only tap names resolve in this version.
pub async fn resolve_vm(netlink: &Netlink, selector: &str) -> Result<crate::netlink::Link, SelectError> {
    if validate_name(selector).is_err() {
        return Err(SelectError::UnknownVm(selector.to_owned()));
    }
    match ethernet_interface(netlink, "tap", selector).await {
        Ok(link) => Ok(link),
        Err(InterfaceError::NotFound { .. }) => Err(SelectError::UnknownVm(selector.to_owned())),
        Err(e) => Err(e.into()),
    }
}
