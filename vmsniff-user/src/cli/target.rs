//! The arguments that say which VM NIC to mirror, and where the copies go.
use clap::Args;

use crate::{
    model::{
        mac::Mac,
        mirror::{AttachModeChoice, Directions, Target, parse_collector},
        wire::{Encap, EncapChoice, EncapError, MAX_ERSPAN_HWID},
    },
    resolve::{
        interface::{InterfaceError, ethernet_interface},
        select::NicChoice,
        vm::{ResolveError, Resolved, Sources, resolve_tap},
    },
    sys::netlink::Netlink,
};

#[derive(Args, Debug)]
pub struct MirrorArgs {
    /// The VM to mirror: its Nova name, UUID, libvirt domain, MAC or tap (through libvirt; an
    /// interface of that name when libvirt knows no such VM).
    #[arg(value_name = "VM", conflicts_with = "tap")]
    pub vm: Option<String>,

    /// The VM's tap, or any Ethernet interface standing for one (a veth, a qvo port).
    #[arg(long, value_name = "TAP")]
    pub tap: Option<String>,

    #[command(flatten)]
    pub nic: NicArgs,

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

    /// How copies travel: `gre` (the Ethernet frame in GRE, key K*2+d, sequence numbers),
    /// `erspan` (ERSPAN type III: span id K, direction bit) or `erspan1` (ERSPAN type II).
    #[arg(long, value_enum, default_value_t = EncapChoice::Gre, conflicts_with = "to_dev")]
    pub encap: EncapChoice,

    /// ERSPAN type III's hardware id, 0..63 (with --encap erspan). Default: 0.
    #[arg(long, value_name = "N", conflicts_with = "to_dev",
          value_parser = clap::value_parser!(u8).range(0..=i64::from(MAX_ERSPAN_HWID)))]
    pub erspan_hwid: Option<u8>,

    /// How to attach to the tap: `tcx` links (Linux >= 6.6), `netlink` (a clsact qdisc), or
    /// `auto` (tcx where the kernel has it; the default).
    #[arg(long, value_enum)]
    pub attach_mode: Option<AttachModeChoice>,
}

impl MirrorArgs {
    /// The VM NIC (or interface) this command is about.
    pub async fn resolve(&self, sources: &Sources, netlink: &Netlink) -> Result<Resolved, ResolveError> {
        resolve_tap(sources, netlink, self.vm.as_deref(), self.tap.as_deref(), self.nic.choice()).await
    }

    /// `--encap` with `--erspan-hwid`, checked.
    pub fn encap(&self) -> Result<Encap, EncapError> {
        self.encap.checked(self.erspan_hwid)
    }

    /// Where the copies go; `encap` from [`MirrorArgs::encap`].
    pub async fn target(&self, netlink: &Netlink, encap: Encap) -> Result<Target, InterfaceError> {
        match (&self.to, &self.to_dev) {
            (Some(remote), _) => Ok(Target::Gre { remote: *remote, ttl: self.ttl, tos: self.tos, encap }),
            (None, Some(dev)) => {
                let link = ethernet_interface(netlink, "--to-dev", dev).await?;
                Ok(Target::LocalDev { name: link.name, ifindex: link.ifindex })
            }
            (None, None) => unreachable!("clap requires --to or --to-dev"),
        }
    }
}

/// `--nic N` / `--mac MAC`: which NIC of a VM with several.
#[derive(Args, Debug, Default)]
pub struct NicArgs {
    /// The VM's NIC N, counting its <interface> elements from 0 (eth0 = 0 in Nova's guests; the
    /// order of `virsh domiflist`).
    #[arg(long, value_name = "N", conflicts_with = "mac")]
    pub nic: Option<usize>,

    /// The VM's NIC with this MAC address (any case, ':' or '-').
    #[arg(long, value_name = "MAC", value_parser = parse_mac)]
    pub mac: Option<Mac>,
}

impl NicArgs {
    pub fn choice(&self) -> NicChoice {
        match (self.nic, self.mac) {
            (Some(index), _) => NicChoice::Index(index),
            (None, Some(mac)) => NicChoice::Mac(mac),
            (None, None) => NicChoice::Unspecified,
        }
    }
}

fn parse_mac(text: &str) -> Result<Mac, String> {
    text.parse()
        .map_err(|()| format!("{text:?} is not a MAC address: give six hex bytes such as fa:16:3e:11:22:33"))
}
