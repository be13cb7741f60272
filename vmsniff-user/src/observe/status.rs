//! `status`: every session of the caller's network namespace, from the pinned maps and the
//! devices' own counters. The JSON form is versioned; fields are added, never renamed.
use std::{collections::BTreeMap, net::IpAddr};

use serde::Serialize;
use vmsniff_ebpf::{
    Direction, DirectionCounters, FILTER_SLOT_BASE, RATE_BITS, RATE_PACKETS, SESSION_ACTIVE, SessionConfig,
    TARGET_GRE, TARGET_LOCAL_DEV, TcHook,
};

use crate::{
    model::{
        mirror::{AttachMode, Directions, family},
        observed::Observed,
    },
    plan::{
        attach::session_remote,
        controls::{RateLimit, RateUnit},
        detach::ifname,
        filter::stored_expression,
    },
    sys::{
        KernelError,
        maps::PinnedMaps,
        netlink::{ErspanLink, Link, LinkStats, Netlink},
    },
};

pub const STATUS_VERSION: u32 = 1;

#[derive(Debug, Serialize)]
pub struct Status {
    pub version: u32,
    pub sessions: Vec<SessionStatus>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct SessionStatus {
    pub session: u32,
    /// `ebpf` (OVS mode's sessions say `ovs`).
    pub mode: &'static str,
    pub tap: String,
    pub tap_ifindex: u32,
    /// The VM and NIC index behind the tap, when libvirt knows them (`status` only).
    pub vm: Option<String>,
    pub nic: Option<usize>,
    /// The collector (tunnel sessions), IPv4 or IPv6.
    pub to: Option<IpAddr>,
    /// The collector's address family: `ipv4` or `ipv6` (tunnel sessions).
    pub family: Option<&'static str>,
    /// The local interface (`--to-dev` sessions).
    pub to_dev: Option<String>,
    /// `gre`, `erspan` (type III), `erspan1` (type II) or `vxlan`, read from the session's
    /// devices; `none` for `--to-dev`.
    pub encap: &'static str,
    /// ERSPAN type III's hardware id.
    pub erspan_hwid: Option<u16>,
    /// VXLAN's UDP destination port, read from the session's devices.
    pub port: Option<u16>,
    /// GRE sessions: `--key`, `--ttl` and `--tos` (the wire key is key * 2 + d).
    pub key: Option<u32>,
    pub ttl: Option<u8>,
    pub tos: Option<u8>,
    pub direction: &'static str,
    /// `--filter`: the tcpdump expression, or null for every frame.
    pub filter: Option<String>,
    /// `--sample`: 1 frame in N (1 = every frame).
    pub sample: u32,
    /// `--rate-limit`, in tc's units (`10mbit`, `50kpps`), or null.
    pub rate_limit: Option<String>,
    /// `--snaplen`: copies cut to this many bytes, or null for whole frames.
    pub snaplen: Option<u32>,
    pub attach_mode: Option<&'static str>,
    /// `active`; `tap-gone` (the tap was deleted: its VM stopped or moved); `orphaned` (its
    /// owner process died; the next vmsniff command removes it); `busy` (being created or
    /// removed right now); `programs-gone` (someone removed its tc filters from the tap, with
    /// `tc qdisc del dev TAP clsact` say: nothing is copied until the daemon, or a detach and
    /// attach, puts them back).
    pub state: &'static str,
    /// The `mirror` process that owns the session, if any.
    pub owner_pid: Option<u32>,
    pub created_at: u64,
    pub counters: PerDirection<Counters>,
    /// The devices carrying each direction's copies, with the kernel's own counters.
    pub devices: PerDirection<Option<DeviceStatus>>,
}

#[derive(Debug, Serialize, Default)]
pub struct PerDirection<T> {
    #[serde(rename = "in")]
    pub into_vm: T,
    #[serde(rename = "out")]
    pub out_of_vm: T,
}

impl<T> PerDirection<T> {
    fn get_mut(&mut self, direction: Direction) -> &mut T {
        match direction {
            Direction::In => &mut self.into_vm,
            Direction::Out => &mut self.out_of_vm,
        }
    }
}

#[derive(Debug, Serialize, Default, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub struct Counters {
    /// Copies sent, and their bytes.
    pub frames: u64,
    pub bytes: u64,
    pub clone_errors: u64,
    /// Frames not copied: not matching `--filter`, not drawn by `--sample`, over
    /// `--rate-limit`.
    pub filtered: u64,
    pub sampled_out: u64,
    pub rate_limited: u64,
    /// Copies cut to `--snaplen`.
    pub truncated: u64,
    /// Copies dropped because the kernel would not cut them that short (never sent whole).
    pub snaplen_refused: u64,
}

impl From<DirectionCounters> for Counters {
    fn from(c: DirectionCounters) -> Self {
        Counters {
            frames: c.frames,
            bytes: c.bytes,
            clone_errors: c.clone_errors,
            filtered: c.filtered,
            sampled_out: c.sampled_out,
            rate_limited: c.rate_limited,
            truncated: c.truncated,
            snaplen_refused: c.snaplen_refused,
        }
    }
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct DeviceStatus {
    pub name: String,
    pub ifindex: u32,
    pub up: bool,
    #[serde(flatten)]
    pub stats: LinkStats,
    #[serde(skip)]
    pub erspan: Option<ErspanLink>,
    #[serde(skip)]
    pub vxlan_port: Option<u16>,
}

/// Reads every session's status.
/// `unhooked`: the taps whose programs someone removed, and from which hooks.
pub async fn read(
    netlink: &Netlink,
    maps: Option<&PinnedMaps>,
    observed: &Observed,
    unhooked: &BTreeMap<u32, Vec<TcHook>>,
) -> Result<Status, KernelError> {
    let mut sessions = Vec::new();
    for (&id, config) in &observed.sessions {
        let mut status = session_status(netlink, maps, observed, id, config).await?;
        let directions = Directions::from_bits(config.directions).unwrap_or(Directions::Both);
        let gone = unhooked
            .get(&config.tap_ifindex)
            .is_some_and(|hooks| hooks.iter().any(|hook| directions.includes(hook.direction())));
        if gone && status.state == "active" {
            status.state = "programs-gone";
        }
        sessions.push(status);
    }
    Ok(Status { version: STATUS_VERSION, sessions })
}

async fn session_status(
    netlink: &Netlink,
    maps: Option<&PinnedMaps>,
    observed: &Observed,
    id: u32,
    config: &SessionConfig,
) -> Result<SessionStatus, KernelError> {
    let tap_entry = observed.tap_of(id).map(|(_, tap)| *tap);
    let tap_link = link_by_index(netlink, config.tap_ifindex).await?;
    let recorded_name = tap_entry.map(|t| ifname(&t.ifname)).filter(|n| !n.is_empty());
    let (tap, tap_present) = tap_name_and_presence(tap_link.map(|l| l.name), recorded_name);
    let state = session_state(observed.orphaned.contains(&id), config.state == SESSION_ACTIVE, tap_present);

    let directions = Directions::from_bits(config.directions).unwrap_or(Directions::Both);
    let (counters, devices) = direction_readings(netlink, maps, id, config, directions).await?;
    let filter = match maps {
        Some(maps) => stored_filter(maps, id, config)?,
        None => None,
    };
    let gre = config.target_kind == TARGET_GRE;
    let erspan = [&devices.out_of_vm, &devices.into_vm].into_iter().flatten().find_map(|d| d.erspan);
    let vxlan_port = [&devices.out_of_vm, &devices.into_vm].into_iter().flatten().find_map(|d| d.vxlan_port);
    let to = session_remote(config);
    let to_dev = (config.target_kind == TARGET_LOCAL_DEV)
        .then(|| devices.into_vm.as_ref().or(devices.out_of_vm.as_ref()).map(|d| d.name.clone()))
        .flatten();
    Ok(SessionStatus {
        session: id,
        mode: "ebpf",
        tap,
        tap_ifindex: config.tap_ifindex,
        vm: None,
        nic: None,
        to,
        family: to.map(family),
        to_dev,
        encap: encap_name(gre, erspan, vxlan_port),
        erspan_hwid: erspan.filter(|e| e.version != 1).map(|e| e.hwid),
        port: vxlan_port,
        key: gre.then_some(config.key),
        ttl: gre.then_some(config.ttl),
        tos: gre.then_some(config.tos),
        direction: directions.as_str(),
        filter,
        sample: config.sample_every.max(1),
        rate_limit: rate_limit(config).map(|r| r.to_string()),
        snaplen: (config.snaplen != 0).then_some(config.snaplen),
        attach_mode: tap_entry.and_then(|t| AttachMode::from_abi(t.attach_mode)).map(AttachMode::as_str),
        state,
        owner_pid: (config.owner_pid != 0).then_some(config.owner_pid),
        created_at: config.created_at,
        counters,
        devices,
    })
}

async fn link_by_index(netlink: &Netlink, ifindex: u32) -> Result<Option<Link>, KernelError> {
    netlink
        .link_by_index(ifindex)
        .await
        .map_err(KernelError::netlink(format!("looking up ifindex {ifindex}")))
}

/// The tap's name, and whether it still exists: the name recorded at attach, else the
/// kernel's for the ifindex. A different device at the recorded ifindex means the tap is gone
/// (the kernel reuses ifindexes).
fn tap_name_and_presence(link_name: Option<String>, recorded_name: Option<String>) -> (String, bool) {
    let present = match (&link_name, &recorded_name) {
        (Some(link), Some(recorded)) => link == recorded,
        (Some(_), None) => true,
        (None, _) => false,
    };
    (recorded_name.or(link_name).unwrap_or_default(), present)
}

/// `orphaned` before `busy` before `tap-gone`: the first is what the operator must act on.
fn session_state(orphaned: bool, active: bool, tap_present: bool) -> &'static str {
    if orphaned {
        "orphaned"
    } else if !active {
        "busy"
    } else if !tap_present {
        "tap-gone"
    } else {
        "active"
    }
}

/// Each mirrored direction's counters (zero without maps) and target device.
async fn direction_readings(
    netlink: &Netlink,
    maps: Option<&PinnedMaps>,
    id: u32,
    config: &SessionConfig,
    directions: Directions,
) -> Result<(PerDirection<Counters>, PerDirection<Option<DeviceStatus>>), KernelError> {
    let mut counters = PerDirection::<Counters>::default();
    let mut devices = PerDirection::<Option<DeviceStatus>>::default();
    for direction in directions.iter() {
        if let Some(maps) = maps {
            *counters.get_mut(direction) = maps.counters(id, direction)?.into();
        }
        *devices.get_mut(direction) = target_device(netlink, config, direction).await?;
    }
    Ok((counters, devices))
}

/// The device one direction's copies leave through, with its counters; `None` when the
/// session has none for it or the device is gone.
async fn target_device(
    netlink: &Netlink,
    config: &SessionConfig,
    direction: Direction,
) -> Result<Option<DeviceStatus>, KernelError> {
    let ifindex = config.target_ifindex[direction.index()];
    if ifindex == 0 {
        return Ok(None);
    }
    let link = link_by_index(netlink, ifindex).await?;
    Ok(link.map(|l| DeviceStatus {
        name: l.name,
        ifindex,
        up: l.up,
        stats: l.stats,
        erspan: l.erspan,
        vxlan_port: l.vxlan_port,
    }))
}

/// `none` for `--to-dev`; else what the session's devices are: VXLAN, ERSPAN type II
/// (`erspan1`) or III (`erspan`), or plain GRE.
fn encap_name(gre: bool, erspan: Option<ErspanLink>, vxlan_port: Option<u16>) -> &'static str {
    match (gre, erspan, vxlan_port) {
        (false, _, _) => "none",
        (true, _, Some(_)) => "vxlan",
        (true, None, None) => "gre",
        (true, Some(ErspanLink { version: 1, .. }), None) => "erspan1",
        (true, Some(_), None) => "erspan",
    }
}

/// The expression of the session's `--filter`, if it has one.
fn stored_filter(maps: &PinnedMaps, id: u32, config: &SessionConfig) -> Result<Option<String>, KernelError> {
    let Some(slot) = config.filter.checked_sub(FILTER_SLOT_BASE) else { return Ok(None) };
    Ok(Some(stored_expression(&maps.filter(id, slot)?)))
}

fn rate_limit(config: &SessionConfig) -> Option<RateLimit> {
    let unit = match config.rate_unit {
        RATE_BITS => RateUnit::Bits,
        RATE_PACKETS => RateUnit::Packets,
        _ => return None,
    };
    Some(RateLimit { unit, rate: config.rate, burst: config.burst })
}

impl Status {
    /// The table `vmsniff status` prints.
    pub fn render_table(&self) -> String {
        if self.sessions.is_empty() {
            return "no mirror sessions in this network namespace\n".into();
        }
        let mut out = format!(
            "{:<7} {:<15} {:<22} {:>10} {:<4} {:<7} {:<8} {:>10} {:>12} {:>10} {:>12} {:>6}\n",
            "SESSION",
            "TAP",
            "TO",
            "KEY",
            "DIR",
            "MODE",
            "STATE",
            "OUT FRAMES",
            "OUT BYTES",
            "IN FRAMES",
            "IN BYTES",
            "LOST"
        );
        for s in &self.sessions {
            out.push_str(&format!(
                "{:<7} {:<15} {:<22} {:>10} {:<4} {:<7} {:<8} {:>10} {:>12} {:>10} {:>12} {:>6}\n",
                s.session,
                s.tap,
                target_column(s),
                s.key.map_or("-".to_string(), |k| k.to_string()),
                s.direction,
                s.attach_mode.unwrap_or("-"),
                s.state,
                s.counters.out_of_vm.frames,
                s.counters.out_of_vm.bytes,
                s.counters.into_vm.frames,
                s.counters.into_vm.bytes,
                s.lost(),
            ));
            if let Some(line) = controls_line(s) {
                out.push_str(&line);
            }
        }
        out
    }
}

/// Where the copies go: the collector and its encapsulation, or the local device.
fn target_column(s: &SessionStatus) -> String {
    match (&s.to, &s.to_dev) {
        (Some(ip), _) => match s.port {
            Some(port) => format!("{ip} ({} {port})", s.encap),
            None => format!("{ip} ({})", s.encap),
        },
        (None, Some(dev)) => format!("dev {dev}"),
        (None, None) => "-".into(),
    }
}

/// The session's mirror controls and what they held back, under its row; `None` without any.
fn controls_line(s: &SessionStatus) -> Option<String> {
    let mut parts = Vec::new();
    if let Some(filter) = &s.filter {
        parts.push(format!("filter {filter:?}"));
    }
    if s.sample > 1 {
        parts.push(format!("sample 1/{}", s.sample));
    }
    if let Some(rate) = &s.rate_limit {
        parts.push(format!("rate-limit {rate}"));
    }
    if let Some(snaplen) = s.snaplen {
        parts.push(format!("snaplen {snaplen}"));
    }
    if parts.is_empty() {
        return None;
    }
    let sum = |f: fn(&Counters) -> u64| f(&s.counters.into_vm) + f(&s.counters.out_of_vm);
    let refused = sum(|c| c.snaplen_refused);
    Some(format!(
        "        {}; not copied: filtered {}, sampled out {}, rate limited {}; truncated {}{}\n",
        parts.join(", "),
        sum(|c| c.filtered),
        sum(|c| c.sampled_out),
        sum(|c| c.rate_limited),
        sum(|c| c.truncated),
        if refused > 0 { format!("; dropped, too short to cut: {refused}") } else { String::new() },
    ))
}

impl SessionStatus {
    /// Copies that left no trace at the collector: clone failures, plus what the session's own
    /// GRE devices dropped or failed to send (no route to the collector, for example).
    pub fn lost(&self) -> u64 {
        let mut lost = self.counters.into_vm.clone_errors + self.counters.out_of_vm.clone_errors;
        if self.to.is_some() {
            for d in [&self.devices.into_vm, &self.devices.out_of_vm].into_iter().flatten() {
                lost += d.stats.tx_dropped + d.stats.tx_errors;
            }
        }
        lost
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tap_is_present_while_its_ifindex_keeps_the_recorded_name() {
        let name = |n: &str| Some(n.to_owned());
        assert_eq!(tap_name_and_presence(name("tap0"), name("tap0")), ("tap0".into(), true));
        // The kernel gave the ifindex to another device: the tap is gone, under its own name.
        assert_eq!(tap_name_and_presence(name("veth9"), name("tap0")), ("tap0".into(), false));
        assert_eq!(tap_name_and_presence(name("tap0"), None), ("tap0".into(), true));
        assert_eq!(tap_name_and_presence(None, name("tap0")), ("tap0".into(), false));
        assert_eq!(tap_name_and_presence(None, None), (String::new(), false));
    }

    #[test]
    fn the_state_names_the_first_thing_to_act_on() {
        assert_eq!(session_state(true, false, false), "orphaned");
        assert_eq!(session_state(false, false, false), "busy");
        assert_eq!(session_state(false, true, false), "tap-gone");
        assert_eq!(session_state(false, true, true), "active");
    }

    #[test]
    fn the_encap_is_read_from_the_devices() {
        let erspan = |version| Some(ErspanLink { version, hwid: 0 });
        assert_eq!(encap_name(false, erspan(2), None), "none");
        assert_eq!(encap_name(true, None, None), "gre");
        assert_eq!(encap_name(true, erspan(1), None), "erspan1");
        assert_eq!(encap_name(true, erspan(2), None), "erspan");
        assert_eq!(encap_name(true, None, Some(4789)), "vxlan");
    }

    #[test]
    fn a_rate_limit_needs_a_known_unit() {
        let config = SessionConfig { rate_unit: RATE_PACKETS, rate: 50, burst: 8, ..SessionConfig::EMPTY };
        assert_eq!(rate_limit(&config), Some(RateLimit { unit: RateUnit::Packets, rate: 50, burst: 8 }));
        assert_eq!(
            rate_limit(&SessionConfig { rate_unit: RATE_BITS, ..config }).map(|r| r.unit),
            Some(RateUnit::Bits)
        );
        assert_eq!(rate_limit(&SessionConfig { rate_unit: 0, ..config }), None);
    }
}
