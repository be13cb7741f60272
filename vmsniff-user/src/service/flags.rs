//! The flags that describe one mirror, as `vmsniff attach` takes them and a daemon config
//! table spells them (keys named like the flags). clap parses them; [`MirrorFlags::spec`]
//! checks them into the one typed [`MirrorSpec`](super::spec::MirrorSpec).
use clap::Args;

use crate::{
    model::{
        mac::Mac,
        mirror::{AttachModeChoice, Directions, Mode, NicChoice, parse_collector},
        wire::{EncapChoice, MAX_ERSPAN_HWID},
    },
    plan::{
        controls::{RateLimit, parse_rate_limit, parse_sample, parse_snaplen},
        filter::{FilterError, compile},
        update::ControlChange,
    },
};

/// Everything that says what one mirror is: which NIC, where copies go, how, and which frames.
#[derive(Args, Debug, Clone)]
pub struct MirrorFlags {
    #[command(flatten)]
    pub mirror: MirrorArgs,

    #[command(flatten)]
    pub controls: ControlArgs,

    /// `ebpf`: tc programs on the tap clone the frames (every plug, all controls). `ovs`: an Open
    /// vSwitch Mirror on the VM's OVS port with a GRE output port, as `ovs-vsctl create mirror`
    /// makes it (OVS plugs only).
    #[arg(long, value_enum, default_value_t = Mode::Ebpf)]
    pub mode: Mode,
}

#[derive(Args, Debug, Clone)]
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

    /// The collector's IPv4 or IPv6 address: copies go there in GRE (transparent Ethernet
    /// bridging), ERSPAN or VXLAN (--encap).
    #[arg(long, value_name = "IP", value_parser = parse_collector, required_unless_present = "to_dev", conflicts_with = "to_dev")]
    pub to: Option<std::net::IpAddr>,

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

    /// Outer IPv4 TTL or IPv6 hop limit of the copies.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u8).range(1..), conflicts_with = "to_dev")]
    pub ttl: u8,

    /// Outer IPv4 TOS or IPv6 traffic class of the copies.
    #[arg(long, default_value_t = 0, conflicts_with = "to_dev")]
    pub tos: u8,

    /// How copies travel: `gre` (the Ethernet frame in GRE, key K*2+d, sequence numbers),
    /// `erspan` (ERSPAN type III: span id K, direction bit), `erspan1` (ERSPAN type II) or
    /// `vxlan` (UDP, VNI K*2+d, no sequence numbers).
    #[arg(long, value_enum, default_value_t = EncapChoice::Gre, conflicts_with = "to_dev")]
    pub encap: EncapChoice,

    /// ERSPAN type III's hardware id, 0..63 (with --encap erspan). Default: 0.
    #[arg(long, value_name = "N", conflicts_with = "to_dev",
          value_parser = clap::value_parser!(u8).range(0..=i64::from(MAX_ERSPAN_HWID)))]
    pub erspan_hwid: Option<u8>,

    /// VXLAN's UDP destination port (with --encap vxlan). Default: 4789.
    #[arg(long, value_name = "PORT", conflicts_with = "to_dev", value_parser = parse_vxlan_port)]
    pub port: Option<u16>,

    /// How to attach to the tap: `tcx` links (Linux >= 6.6), `netlink` (a clsact qdisc), or
    /// `auto` (tcx where the kernel has it; the default).
    #[arg(long, value_enum)]
    pub attach_mode: Option<AttachModeChoice>,
}

/// `--nic N` / `--mac MAC`: which NIC of a VM with several.
#[derive(Args, Debug, Clone, Default)]
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

fn parse_vxlan_port(text: &str) -> Result<u16, String> {
    match text.parse::<u16>() {
        Ok(0) => Err(
            "port 0 is no destination: give VXLAN's UDP port, 1..65535 (4789, the default, is VXLAN's own)"
                .into(),
        ),
        Ok(port) => Ok(port),
        Err(_) => {
            Err(format!("{text:?} is not a UDP port: give 1..65535 (4789, the default, is VXLAN's own)"))
        }
    }
}

fn parse_mac(text: &str) -> Result<Mac, String> {
    text.parse()
        .map_err(|()| format!("{text:?} is not a MAC address: give six hex bytes such as fa:16:3e:11:22:33"))
}

#[derive(Args, Debug, Clone, Default)]
pub struct ControlArgs {
    /// Mirror only frames matching this tcpdump (pcap-filter) expression, evaluated in the
    /// kernel before the copy: 'tcp port 443 and net 10.0.0.0/8', 'not arp', 'vlan 100'.
    #[arg(long, value_name = "EXPR")]
    pub filter: Option<String>,

    /// Mirror 1 frame in N (chosen at random) of those the filter selects.
    #[arg(long, value_name = "N", value_parser = parse_sample)]
    pub sample: Option<u32>,

    /// Send copies at most at this rate (tc units: 10mbit, 1gbit, 500kbps; or 50kpps); copies
    /// over it are counted and not sent. The VM's own traffic is never limited.
    #[arg(long, value_name = "RATE", value_parser = parse_rate_limit)]
    pub rate_limit: Option<RateLimit>,

    /// Cut each copy to its first N bytes (1..65535); the VM's frame is never cut. The
    /// original length stays in the copy's IP header (see the README).
    #[arg(long, value_name = "N", value_parser = parse_snaplen)]
    pub snaplen: Option<u32>,
}

/// What `update` (and `fleet update`) changes: the controls given, and those lifted.
#[derive(Args, Debug, Clone, Default)]
pub struct ChangeArgs {
    #[command(flatten)]
    pub controls: ControlArgs,

    /// Drop the filter: mirror every frame again.
    #[arg(long, conflicts_with = "filter")]
    pub no_filter: bool,

    /// Send whole frames again.
    #[arg(long, conflicts_with = "snaplen")]
    pub no_snaplen: bool,

    /// Drop the rate limit.
    #[arg(long, conflicts_with = "rate_limit")]
    pub no_rate_limit: bool,
}

impl ChangeArgs {
    /// The change, checked and compiled before any session is read.
    pub fn change(&self) -> Result<ControlChange, FilterError> {
        let c = &self.controls;
        let filter = match (&c.filter, self.no_filter) {
            (Some(expression), _) => Some(Some(compile(expression)?)),
            (None, true) => Some(None),
            (None, false) => None,
        };
        Ok(ControlChange {
            filter,
            snaplen: c.snaplen.or(self.no_snaplen.then_some(0)),
            sample_every: c.sample,
            rate_limit: match (c.rate_limit, self.no_rate_limit) {
                (Some(limit), _) => Some(Some(limit)),
                (None, true) => Some(None),
                (None, false) => None,
            },
        })
    }
}
