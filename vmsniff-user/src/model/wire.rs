//! What vmsniff's copies look like on the wire, defined once for the sender (`attach`) and the
//! receiver (`collect`): the encapsulations, and how each carries the session and the direction.
//!
//! | `--encap` | GRE protocol | session | direction | sequence |
//! |---|---|---|---|---|
//! | `gre` | 0x6558 (TEB) | key >> 1 | key & 1 (0 out, 1 in) | GRE S, per session and direction |
//! | `erspan` (type III) | 0x22EB | span id = K | D bit (0 out, 1 in) | GRE S, per session and direction |
//! | `erspan1` (type II) | 0x88BE | span id = K | port index (0 out, 1 in) | GRE S, per session and direction |
//! | `vxlan` | none: UDP, `--port` | VNI >> 1 | VNI & 1 (0 out, 1 in) | none |
use thiserror::Error;
use vmsniff_ebpf::Direction;

/// GRE protocol of Ethernet frames (transparent Ethernet bridging).
pub const PROTO_TEB: u16 = 0x6558;
/// GRE protocol of ERSPAN types I and II.
pub const PROTO_ERSPAN_II: u16 = 0x88be;
/// GRE protocol of ERSPAN type III.
pub const PROTO_ERSPAN_III: u16 = 0x22eb;

/// ERSPAN's session id has 10 bits.
pub const MAX_ERSPAN_SESSION: u32 = 0x3ff;
/// The largest key K of an ERSPAN session. The kernel's ERSPAN devices also take a 10-bit
/// receive key, and tells devices toward one collector apart by it: vmsniff gives each
/// direction's device `K * 2 + d` there (never sent), which must fit 10 bits too.
pub const MAX_ERSPAN_KEY: u32 = MAX_ERSPAN_SESSION / 2;
/// ERSPAN type III's hardware id has 6 bits.
pub const MAX_ERSPAN_HWID: u8 = 63;
/// VXLAN's UDP destination port (IANA), the default of `--port`.
pub const VXLAN_PORT: u16 = 4789;
/// VXLAN's network identifier has 24 bits: the VNI `K * 2 + d` needs K below 2^23.
pub const MAX_VXLAN_KEY: u32 = (1 << 23) - 1;
/// The UDP source ports of VXLAN copies (RFC 7348's dynamic range): the kernel picks one per
/// flow of the mirrored traffic from its hash, so ECMP spreads the copies as it spreads the
/// flows, and one flow's copies stay in order on one path.
pub const VXLAN_SOURCE_PORTS: (u16, u16) = (49152, 65535);

/// What `collect --fleet` knows of a fleet mirror by its key K: its name, and whether its
/// copies are plain GRE with key K (an OVS-mode mirror's GRE port) rather than vmsniff's own
/// encapsulation (GRE key K*2+d with sequence numbers, ERSPAN, VXLAN).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FleetLabel {
    /// "NAME (VM nic N)".
    pub name: String,
    pub plain_gre: bool,
}

/// `--encap`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum EncapChoice {
    /// GRE carrying the Ethernet frame (0x6558), key K*2+d, with sequence numbers.
    #[default]
    Gre,
    /// ERSPAN type III: span id K, the direction in the D bit, hardware id --erspan-hwid.
    Erspan,
    /// ERSPAN type II, for collectors that only know it: span id K, the direction in the index.
    Erspan1,
    /// VXLAN (UDP, --port, default 4789): VNI K*2+d, no sequence number; for paths that pass
    /// only UDP.
    Vxlan,
}

/// A checked encapsulation toward a collector.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Encap {
    Gre,
    ErspanIII {
        hwid: u8,
    },
    ErspanII,
    /// VXLAN toward this UDP destination port.
    Vxlan {
        port: u16,
    },
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum EncapError {
    #[error(
        "--erspan-hwid sets ERSPAN type III's hardware id: it needs --encap erspan (it was \
         --encap {encap})"
    )]
    HwidWithoutErspan { encap: &'static str },
    #[error("--port sets VXLAN's UDP destination port: it needs --encap vxlan (it was --encap {encap})")]
    PortWithoutVxlan { encap: &'static str },
}

impl EncapChoice {
    /// The encapsulation; `hwid` (`--erspan-hwid`) only goes with `erspan`, `port` (`--port`,
    /// checked non-zero by its parser) only with `vxlan`.
    pub fn checked(self, hwid: Option<u8>, port: Option<u16>) -> Result<Encap, EncapError> {
        if self != EncapChoice::Vxlan && port.is_some() {
            return Err(EncapError::PortWithoutVxlan { encap: self.as_str() });
        }
        match (self, hwid) {
            (EncapChoice::Gre, None) => Ok(Encap::Gre),
            (EncapChoice::Erspan, hwid) => Ok(Encap::ErspanIII { hwid: hwid.unwrap_or(0) }),
            (EncapChoice::Erspan1, None) => Ok(Encap::ErspanII),
            (EncapChoice::Vxlan, None) => Ok(Encap::Vxlan { port: port.unwrap_or(VXLAN_PORT) }),
            (other, Some(_)) => Err(EncapError::HwidWithoutErspan { encap: other.as_str() }),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            EncapChoice::Gre => "gre",
            EncapChoice::Erspan => "erspan",
            EncapChoice::Erspan1 => "erspan1",
            EncapChoice::Vxlan => "vxlan",
        }
    }
}

impl Encap {
    /// The kernel's `erspan_ver`: 1 for type II, 2 for type III.
    pub fn erspan_version(self) -> Option<u8> {
        match self {
            Encap::Gre | Encap::Vxlan { .. } => None,
            Encap::ErspanIII { .. } => Some(2),
            Encap::ErspanII => Some(1),
        }
    }

    /// As `--encap` spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Encap::Gre => "gre",
            Encap::ErspanIII { .. } => "erspan",
            Encap::ErspanII => "erspan1",
            Encap::Vxlan { .. } => "vxlan",
        }
    }
}

/// The ERSPAN type III D bit of a direction: the VM's port is the mirrored port, so what the VM
/// sends enters it (0, ingress) and what it receives leaves it (1, egress).
pub const fn erspan_d_bit(direction: Direction) -> u8 {
    match direction {
        Direction::Out => 0,
        Direction::In => 1,
    }
}

/// The inverse of [`erspan_d_bit`].
pub const fn direction_of_d_bit(d: u8) -> Direction {
    if d & 1 == 0 { Direction::Out } else { Direction::In }
}

/// ERSPAN type II has no direction field: vmsniff sends the direction as the port index.
pub const fn erspan_ii_index(direction: Direction) -> u32 {
    direction as u32
}

/// The inverse of [`erspan_ii_index`]; `None` for an index vmsniff does not send (another
/// sender's port index).
pub const fn direction_of_erspan_ii_index(index: u32) -> Option<Direction> {
    match index {
        0 => Some(Direction::Out),
        1 => Some(Direction::In),
        _ => None,
    }
}

/// pcapng EPB flags (the `epb_flags` option): bits 0-1 are the direction, 1 inbound and
/// 2 outbound, relative to the VM.
pub const fn pcapng_direction_flags(direction: Option<Direction>) -> u32 {
    match direction {
        Some(Direction::In) => 1,
        Some(Direction::Out) => 2,
        None => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directions_map_as_the_conventions_table_says() {
        assert_eq!(erspan_d_bit(Direction::Out), 0, "out = ingress of the VM's port");
        assert_eq!(erspan_d_bit(Direction::In), 1, "in = egress of the VM's port");
        assert_eq!(pcapng_direction_flags(Some(Direction::Out)), 2, "outbound");
        assert_eq!(pcapng_direction_flags(Some(Direction::In)), 1, "inbound");
        assert_eq!(pcapng_direction_flags(None), 0);
        for d in Direction::ALL {
            assert_eq!(direction_of_d_bit(erspan_d_bit(d)), d);
            assert_eq!(direction_of_erspan_ii_index(erspan_ii_index(d)), Some(d));
        }
        assert_eq!(direction_of_erspan_ii_index(7), None);
    }

    #[test]
    fn the_hardware_id_goes_with_type_iii_only() {
        assert_eq!(EncapChoice::Erspan.checked(Some(5), None), Ok(Encap::ErspanIII { hwid: 5 }));
        assert_eq!(EncapChoice::Erspan.checked(None, None), Ok(Encap::ErspanIII { hwid: 0 }));
        assert_eq!(EncapChoice::Gre.checked(None, None), Ok(Encap::Gre));
        assert_eq!(EncapChoice::Erspan1.checked(None, None), Ok(Encap::ErspanII));
        assert_eq!(
            EncapChoice::Erspan1.checked(Some(1), None),
            Err(EncapError::HwidWithoutErspan { encap: "erspan1" })
        );
        assert!(EncapChoice::Gre.checked(Some(1), None).is_err());
        assert!(EncapChoice::Vxlan.checked(Some(1), None).is_err());
        assert_eq!(Encap::ErspanIII { hwid: 1 }.erspan_version(), Some(2));
        assert_eq!(Encap::ErspanII.erspan_version(), Some(1));
        assert_eq!(Encap::Gre.erspan_version(), None);
    }

    #[test]
    fn the_port_goes_with_vxlan_only() {
        assert_eq!(EncapChoice::Vxlan.checked(None, None), Ok(Encap::Vxlan { port: VXLAN_PORT }));
        assert_eq!(EncapChoice::Vxlan.checked(None, Some(8472)), Ok(Encap::Vxlan { port: 8472 }));
        assert_eq!(
            EncapChoice::Gre.checked(None, Some(4789)),
            Err(EncapError::PortWithoutVxlan { encap: "gre" })
        );
    }
}
