//! `status` for OVS mode's sessions, read back from OVSDB (their one record), beside the eBPF
//! sessions of `observe::status`. Same JSON field names where the meaning is the same.
use std::net::IpAddr;

use serde::Serialize;

use crate::ovs::session::{NIC_KEY, OvsSession};

#[derive(Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct OvsSessionStatus {
    pub session: u32,
    /// `ovs` (eBPF sessions say `ebpf`).
    pub mode: &'static str,
    pub tap: Option<String>,
    pub vm: Option<String>,
    pub nic: Option<u32>,
    pub to: Option<IpAddr>,
    /// `ipv4` or `ipv6`, as eBPF sessions say it.
    pub family: Option<&'static str>,
    pub encap: &'static str,
    /// The GRE key as sent: OVS sessions send `--key` itself (one port carries both directions).
    pub key: Option<u32>,
    pub ttl: Option<u8>,
    pub tos: Option<u8>,
    pub direction: Option<&'static str>,
    /// `active`; `mirror-gone` (someone removed the Mirror, its GRE port is left: `detach`
    /// removes it); `output-gone` (its GRE port was removed); `vm-port-gone` (the VM's port was
    /// deleted, its VM stopped or moved); `gre-error` (ovs-vswitchd could not set the GRE port up).
    pub state: &'static str,
    pub created_at: u64,
    pub ovs: OvsDetails,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct OvsDetails {
    pub bridge: Option<String>,
    /// The mirrored port: qvo (hybrid plug) or the tap (native plug).
    pub port: Option<String>,
    pub mirror: Option<String>,
    pub gre_port: Option<String>,
    /// ovs-vswitchd's `error` on the GRE interface.
    pub error: Option<String>,
    /// The Mirror's statistics: copies sent, both directions together (ovs-vswitchd updates
    /// them every few seconds).
    pub tx_packets: u64,
    pub tx_bytes: u64,
}

pub fn session_status(session: &OvsSession) -> OvsSessionStatus {
    let error = session.gre_interface.as_ref().and_then(|i| i.error.clone());
    let state = state(session, error.is_some());
    OvsSessionStatus {
        session: session.id,
        mode: "ovs",
        tap: session.tap().map(str::to_owned),
        vm: session.vm().map(str::to_owned),
        nic: session.external_id(NIC_KEY).and_then(|n| n.parse().ok()),
        to: session.option("remote_ip").and_then(|ip| ip.parse().ok()),
        family: session.option("remote_ip").and_then(|ip| ip.parse().ok()).map(crate::model::mirror::family),
        encap: "gre",
        key: session.option("key").and_then(|k| k.parse().ok()),
        ttl: session.option("ttl").and_then(|t| t.parse().ok()),
        tos: session.option("tos").and_then(|t| t.parse().ok()),
        direction: session.directions.map(|d| d.as_str()),
        state,
        created_at: session.created_at(),
        ovs: OvsDetails {
            bridge: session.bridges.first().map(|b| b.row.name.clone()),
            port: session.vm_port.clone(),
            mirror: session.mirror.as_ref().map(|m| m.row.name.clone()),
            gre_port: session.gre_port.as_ref().map(|p| p.row.name.clone()),
            error,
            tx_packets: session.statistic("tx_packets"),
            tx_bytes: session.statistic("tx_bytes"),
        },
    }
}

/// The session's first missing part (Mirror, GRE port, VM's port), else its GRE error, else
/// `active`.
fn state(session: &OvsSession, gre_error: bool) -> &'static str {
    if session.mirror.is_none() {
        "mirror-gone"
    } else if session.gre_port.is_none() {
        "output-gone"
    } else if session.vm_port.is_none() {
        "vm-port-gone"
    } else if gre_error {
        "gre-error"
    } else {
        "active"
    }
}

/// The OVS sessions' table `vmsniff status` prints below the eBPF one.
pub fn render_table(sessions: &[OvsSessionStatus]) -> String {
    let mut out = format!(
        "{:<7} {:<15} {:<22} {:>10} {:<4} {:<4} {:<12} {:<10} {:<15} {:<12} {:>10} {:>12}\n",
        "SESSION",
        "TAP",
        "TO",
        "KEY",
        "DIR",
        "MODE",
        "STATE",
        "BRIDGE",
        "PORT",
        "GRE PORT",
        "TX PACKETS",
        "TX BYTES"
    );
    let or_dash = |v: Option<&str>| v.unwrap_or("-").to_owned();
    for s in sessions {
        out.push_str(&format!(
            "{:<7} {:<15} {:<22} {:>10} {:<4} {:<4} {:<12} {:<10} {:<15} {:<12} {:>10} {:>12}\n",
            s.session,
            or_dash(s.tap.as_deref()),
            s.to.map_or("-".into(), |ip| format!("{ip} (gre)")),
            s.key.map_or("-".into(), |k| k.to_string()),
            or_dash(s.direction),
            s.mode,
            s.state,
            or_dash(s.ovs.bridge.as_deref()),
            or_dash(s.ovs.port.as_deref()),
            or_dash(s.ovs.gre_port.as_deref()),
            s.ovs.tx_packets,
            s.ovs.tx_bytes,
        ));
        if let Some(error) = &s.ovs.error {
            out.push_str(&format!("        GRE port error: {error}\n"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ovs::session::{MirrorRow, PortRow};

    #[test]
    fn the_state_names_the_first_missing_part() {
        let whole = OvsSession {
            id: 1,
            mirror: Some(MirrorRow::default()),
            gre_port: Some(PortRow::default()),
            gre_interface: None,
            bridges: Vec::new(),
            vm_port: Some("qvo1".into()),
            directions: None,
        };
        assert_eq!(state(&whole, false), "active");
        assert_eq!(state(&whole, true), "gre-error");
        let no_vm_port = OvsSession { vm_port: None, ..whole.clone() };
        assert_eq!(state(&no_vm_port, true), "vm-port-gone");
        let no_output = OvsSession { gre_port: None, ..no_vm_port.clone() };
        assert_eq!(state(&no_output, true), "output-gone");
        assert_eq!(state(&OvsSession { mirror: None, ..no_output }, true), "mirror-gone");
    }
}
