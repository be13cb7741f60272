//! What a mirror is made of, as typed values every layer shares: directions, the mirrored tap,
//! where copies go, how programs attach, who keeps a session.
use std::{
    fmt,
    net::{IpAddr, Ipv6Addr},
};

use vmsniff_ebpf::{ATTACH_NETLINK, ATTACH_TCX, Direction};

use super::{mac::Mac, wire::Encap};

/// `--direction in|out|both`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Directions {
    /// Frames going into the VM.
    In,
    /// Frames the VM sends.
    Out,
    #[default]
    Both,
}

impl Directions {
    pub fn includes(self, direction: Direction) -> bool {
        matches!(
            (self, direction),
            (Directions::Both, _) | (Directions::In, Direction::In) | (Directions::Out, Direction::Out)
        )
    }

    pub fn iter(self) -> impl Iterator<Item = Direction> {
        Direction::ALL.into_iter().filter(move |d| self.includes(*d))
    }

    pub fn bits(self) -> u32 {
        self.iter().map(Direction::bit).fold(0, |a, b| a | b)
    }

    pub fn from_bits(bits: u32) -> Option<Self> {
        match (bits & Direction::In.bit() != 0, bits & Direction::Out.bit() != 0) {
            (true, true) => Some(Directions::Both),
            (true, false) => Some(Directions::In),
            (false, true) => Some(Directions::Out),
            (false, false) => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Directions::In => "in",
            Directions::Out => "out",
            Directions::Both => "both",
        }
    }
}

/// How the tap programs are attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachMode {
    /// TCX links (kernel >= 6.6), pinned.
    Tcx,
    /// cls_bpf filters in a clsact qdisc, through netlink.
    Netlink,
}

impl AttachMode {
    pub fn abi(self) -> u32 {
        match self {
            AttachMode::Tcx => ATTACH_TCX,
            AttachMode::Netlink => ATTACH_NETLINK,
        }
    }

    pub fn from_abi(value: u32) -> Option<Self> {
        match value {
            ATTACH_TCX => Some(AttachMode::Tcx),
            ATTACH_NETLINK => Some(AttachMode::Netlink),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            AttachMode::Tcx => "tcx",
            AttachMode::Netlink => "netlink",
        }
    }
}

/// `--attach-mode auto|tcx|netlink`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum AttachModeChoice {
    /// TCX on kernels >= 6.6, netlink below.
    #[default]
    Auto,
    Tcx,
    Netlink,
}

impl AttachModeChoice {
    pub fn as_str(self) -> &'static str {
        match self {
            AttachModeChoice::Auto => "auto",
            AttachModeChoice::Tcx => "tcx",
            AttachModeChoice::Netlink => "netlink",
        }
    }
}

/// Where the copies go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// A collector reached over GRE (gretap, TEB 0x6558), ERSPAN or VXLAN, over IPv4 or IPv6,
    /// through vmsniff's own devices. `ttl` is IPv6's hop limit, `tos` its traffic class.
    Tunnel { remote: IpAddr, ttl: u8, tos: u8, encap: Encap },
    /// An existing local interface (`--to-dev`), for local analysis and for tests on kernels
    /// without GRE.
    LocalDev { name: String, ifindex: u32 },
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Tunnel { remote, encap: Encap::Gre, .. } => write!(f, "{remote} (GRE)"),
            Target::Tunnel { remote, encap: Encap::ErspanIII { .. }, .. } => {
                write!(f, "{remote} (ERSPAN III)")
            }
            Target::Tunnel { remote, encap: Encap::ErspanII, .. } => write!(f, "{remote} (ERSPAN II)"),
            Target::Tunnel { remote, encap: Encap::Vxlan { port }, .. } => {
                write!(f, "{remote} (VXLAN, UDP port {port})")
            }
            Target::LocalDev { name, .. } => write!(f, "device {name}"),
        }
    }
}

/// The mirrored interface.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tap {
    pub ifindex: u32,
    pub name: String,
}

/// Who keeps a session, and so who removes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Owner {
    /// `attach`: it persists after the command exits, until `detach`.
    Persistent,
    /// `mirror`: the process with this pid; when it dies the session is an orphan.
    Foreground { pid: u32 },
    /// `vmsniff daemon`: the config session with this [`vmsniff_ebpf::daemon_tag`]. It
    /// persists, so that a restarted daemon adopts it.
    Daemon { tag: u32 },
}

/// `--mode`: how the copies are made.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Default, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// tc programs on the VM's tap clone its frames (every plug; filter, snaplen, sample, rate
    /// limit).
    #[default]
    Ebpf,
    /// An Open vSwitch Mirror on the VM's OVS port with a GRE output port (OVS plugs only; whole
    /// frames, every one).
    Ovs,
}

impl Mode {
    /// As `--mode` and the JSON outputs spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Ebpf => "ebpf",
            Mode::Ovs => "ovs",
        }
    }
}

/// `--nic N` / `--mac MAC`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum NicChoice {
    /// Neither: the VM must have one NIC, unless the selector named one.
    #[default]
    Unspecified,
    Index(usize),
    Mac(Mac),
}

/// A collector address: IPv4 or IPv6, unicast, and for IPv6 not link-local.
pub fn parse_collector(text: &str) -> Result<IpAddr, String> {
    let ip: IpAddr = text.parse().map_err(|_| {
        format!(
            "{text:?} is not an IP address; give the collector's IPv4 or IPv6 address, for example \
             --to 192.0.2.10 or --to 2001:db8::10"
        )
    })?;
    let unicast = "give the unicast address of the host that receives the copies";
    match ip {
        IpAddr::V4(v4) if v4.is_unspecified() || v4.is_broadcast() || v4.is_multicast() => {
            Err(format!("{v4} cannot be a collector: {unicast}"))
        }
        IpAddr::V6(v6) if v6.is_unspecified() || v6.is_multicast() => {
            Err(format!("{v6} cannot be a collector: {unicast}"))
        }
        // A tunnel toward a link-local address needs the link it is on, and vmsniff's devices
        // follow the routing table instead: the copies could leave on any link, or none.
        IpAddr::V6(v6) if is_link_local(v6) => Err(format!(
            "{v6} is a link-local address, reachable only on one link, which a tunnel device \
             does not name: give the collector's global or unique-local address"
        )),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => Err(format!("{v6} is an IPv4 address written as IPv6: give --to {v4}")),
            None => Ok(ip),
        },
        IpAddr::V4(_) => Ok(ip),
    }
}

/// fe80::/10.
fn is_link_local(ip: Ipv6Addr) -> bool {
    ip.segments()[0] & 0xffc0 == 0xfe80
}

/// An address family, as `status --json` spells it.
pub fn family(ip: IpAddr) -> &'static str {
    match ip {
        IpAddr::V4(_) => "ipv4",
        IpAddr::V6(_) => "ipv6",
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    #[test]
    fn directions_select_their_side() {
        assert!(Directions::In.includes(Direction::In));
        assert!(!Directions::In.includes(Direction::Out));
        assert_eq!(Directions::Both.iter().count(), 2);
        for d in [Directions::In, Directions::Out, Directions::Both] {
            assert_eq!(Directions::from_bits(d.bits()), Some(d));
        }
        assert_eq!(Directions::from_bits(0), None);
    }

    #[test]
    fn collector_addresses_are_checked() {
        assert_eq!(parse_collector("192.0.2.10").unwrap(), IpAddr::V4(Ipv4Addr::new(192, 0, 2, 10)));
        assert_eq!(parse_collector("2001:db8::10").unwrap(), "2001:db8::10".parse::<IpAddr>().unwrap());
        assert_eq!(parse_collector("fd00::1").unwrap(), "fd00::1".parse::<IpAddr>().unwrap());
        for bad in [
            "",
            "192.0.2",
            "192.0.2.300",
            "0.0.0.0",
            "255.255.255.255",
            "224.0.0.1",
            "host",
            "fe80::1",
            "febf::1",
            "ff02::1",
            "::",
            "::ffff:192.0.2.1",
        ] {
            assert!(parse_collector(bad).is_err(), "{bad}");
        }
        assert!(parse_collector("fe80::1").unwrap_err().contains("link-local"));
        assert!(parse_collector("ff02::1").unwrap_err().contains("unicast"));
        assert!(parse_collector("::ffff:192.0.2.1").unwrap_err().contains("--to 192.0.2.1"));
        assert_eq!(family(parse_collector("2001:db8::1").unwrap()), "ipv6");
    }

    #[test]
    fn attach_modes_round_trip_through_the_abi() {
        for m in [AttachMode::Tcx, AttachMode::Netlink] {
            assert_eq!(AttachMode::from_abi(m.abi()), Some(m));
        }
        assert_eq!(AttachMode::from_abi(0), None);
    }
}
