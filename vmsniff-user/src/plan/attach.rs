//! Planning an attach: which session id, which devices, which programs, in which order.
use std::net::IpAddr;

use thiserror::Error;
use vmsniff_ebpf::{
    Direction, FILTER_SLOT_BASE, MAX_GRE_USER_KEY, MAX_SESSION_ID, MAX_SESSIONS_PER_TAP, SESSION_ACTIVE,
    SESSION_BUSY, SessionConfig, TARGET_GRE, TARGET_LOCAL_DEV, TapSessions, TcHook, filter::Filter,
    gre_wire_key,
};

use crate::{
    model::wire::{Encap, MAX_ERSPAN_KEY, MAX_VXLAN_KEY},
    sys::paths::{gre_device_alias, gre_device_name},
};
use crate::{
    model::{
        mirror::{AttachMode, AttachModeChoice, Owner, Tap, Target},
        observed::Observed,
    },
    plan::request::AttachRequest,
};

#[derive(Debug, Error, PartialEq, Eq)]
pub enum AttachPlanError {
    #[error(
        "all {MAX_SESSION_ID} session ids are in use; detach sessions that are no longer needed \
         (`vmsniff status` lists them)"
    )]
    NoFreeSessionId,
    #[error(
        "tap {tap} already carries {MAX_SESSIONS_PER_TAP} sessions, the most one tap can have; \
         detach one first (`vmsniff status` lists them)"
    )]
    TapFull { tap: String },
    #[error(
        "tap {tap} is already mirrored to {target} by session {session}; use that session, or \
         detach it first (`vmsniff detach {session}`)"
    )]
    AlreadyMirrored { tap: String, target: String, session: u32 },
    #[error(
        "session {session} already sends to {remote} with key {key}; a collector could not tell \
         the two apart: give this session another --key"
    )]
    KeyInUse { remote: IpAddr, key: u32, session: u32 },
    #[error(
        "--key {key} is too large: the GRE key on the wire is key * 2 + direction, so the key must be at most {MAX_GRE_USER_KEY}"
    )]
    KeyTooLarge { key: u32 },
    #[error(
        "--key {key} is too large for VXLAN: the VNI is key * 2 + direction in 24 bits, so the key \
         must be at most {MAX_VXLAN_KEY}"
    )]
    VxlanKeyTooLarge { key: u32 },
    #[error(
        "{what} {key} is too large for ERSPAN: its session id has 10 bits and the kernel's \
         ERSPAN devices need K * 2 + 1 to fit them too, so the key must be at most \
         {MAX_ERSPAN_KEY}{hint}"
    )]
    ErspanKeyTooLarge { what: &'static str, key: u32, hint: &'static str },
    #[error(
        "--to-dev {dev} is the mirrored tap itself: its copies would be mirrored again; give \
         another interface"
    )]
    TargetIsTap { dev: String },
    #[error(
        "--to-dev {dev} is itself mirrored by vmsniff (session {session}): copies would loop; \
         give an interface that no session mirrors"
    )]
    TargetIsMirrored { dev: String, session: u32 },
    #[error("TCX needs Linux 6.6 or newer; use --attach-mode netlink (or auto) on this kernel")]
    TcxUnsupported,
    #[error(
        "tap {tap}'s programs are attached through {existing}; --attach-mode {asked} cannot be \
         used for a further session on it (omit --attach-mode)"
    )]
    ModeConflict { tap: String, existing: &'static str, asked: &'static str },
}

/// Everything an attach creates, in order. Each step is undone in reverse if a later one fails.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AttachPlan {
    pub session_id: u32,
    pub key: u32,
    pub steps: Vec<AttachStep>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AttachStep {
    /// Take the session slot, marked busy (skipped by the programs) and owned by this process.
    ClaimSession { id: u32, config: SessionConfig },
    /// Zero the slot's per-CPU counters and token bucket, left from an earlier session with
    /// this id.
    ResetCounters { id: u32 },
    /// Write the session's filter program into its first filter slot (before activation, so
    /// the session never runs without it).
    WriteFilter { id: u32, filter: Box<Filter> },
    /// Create and raise one direction's GRE device.
    CreateGreDevice { id: u32, direction: Direction, device: TunnelDevice },
    /// Attach the copy program (it cuts copies to the snaplen) to the egress hook of one
    /// direction's target device, adding a clsact qdisc there if it has none. Only for a
    /// snaplen: every copy would pass through it (`update` adds and removes it).
    AttachCopyProgram { id: u32, direction: Direction, device: String },
    /// Record the tap (empty session list, attach mode) before its programs are attached, so
    /// that a run that dies half-way leaves a record of what to clean.
    RegisterTap { tap: Tap, mode: AttachMode },
    /// Add the tap's clsact qdisc unless one exists (netlink attach only).
    EnsureClsact { tap: Tap },
    /// Attach one tap program.
    AttachProgram { tap: Tap, hook: TcHook, mode: AttachMode },
    /// Mark the session active, with the target ifindexes known by now.
    ActivateSession { id: u32 },
    /// Put the session in the tap's list: from here on the programs mirror it.
    AddToTap { tap: Tap, id: u32 },
    /// Record the tap a re-homed session now lives on (last: it needs no undo).
    MoveSession { id: u32, tap_ifindex: u32 },
}

/// A classic (not collect_md) tunnel device of one session and direction: gretap, erspan or
/// vxlan, or their IPv6 kinds (ip6gretap, ip6erspan) toward an IPv6 collector.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TunnelDevice {
    pub name: String,
    pub alias: String,
    pub remote: IpAddr,
    /// The source address, where the kernel needs one: its IPv6 GRE devices send nothing
    /// without (ip6_tnl_xmit_ctl). The one the route to the collector chose at attach.
    pub local: Option<IpAddr>,
    /// `key * 2 + d`: the GRE key or the VNI on the wire (`--encap gre|vxlan`), and every GRE
    /// device's receive key (the kernel tells classic tunnels toward one collector apart by it).
    pub wire_key: u32,
    /// IPv4's TTL and TOS, IPv6's hop limit and traffic class.
    pub ttl: u8,
    pub tos: u8,
    pub encap: DeviceEncap,
}

/// What a tunnel device puts around each copy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceEncap {
    /// GRE with key and sequence number.
    Gre,
    /// GRE with a sequence number, then an ERSPAN header with these fields.
    Erspan(ErspanHeader),
    /// VXLAN with VNI `wire_key`, toward this UDP port.
    Vxlan { port: u16 },
}

/// What one ERSPAN device writes into every copy's ERSPAN header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ErspanHeader {
    /// 2 for type III, 1 for type II.
    pub version: u8,
    /// The session's key K.
    pub session_id: u32,
    pub direction: Direction,
    /// Type III only.
    pub hwid: u8,
}

/// Plans an attach: refuses what the observed state rules out, then lists the steps.
pub fn plan_attach(request: &AttachRequest, observed: &Observed) -> Result<AttachPlan, AttachPlanError> {
    let existing_tap = observed.taps.get(&request.tap.ifindex);
    check_tap_has_room(&request.tap, existing_tap)?;
    check_target_cannot_loop(request, observed)?;
    let session_id = free_session_id(observed)?;
    let key = request.key.unwrap_or(session_id);
    check_key_fits(request, key)?;
    check_copies_are_new(request, observed, existing_tap, key)?;
    let mode = choose_mode(
        &request.tap.name,
        request.mode,
        request.tcx_supported,
        existing_tap.map(|t| t.attach_mode),
    )?;

    let mut steps = vec![
        AttachStep::ClaimSession { id: session_id, config: session_config(request, key) },
        AttachStep::ResetCounters { id: session_id },
    ];
    if let Some(filter) = &request.controls.filter {
        steps.push(AttachStep::WriteFilter { id: session_id, filter: Box::new(filter.to_map_value()) });
    }
    steps.extend(gre_device_steps(request, session_id, key));
    steps.extend(copy_program_steps(request, session_id));
    if existing_tap.is_none() {
        steps.extend(tap_program_steps(&request.tap, mode));
    }
    steps.push(AttachStep::ActivateSession { id: session_id });
    steps.push(AttachStep::AddToTap { tap: request.tap.clone(), id: session_id });
    Ok(AttachPlan { session_id, key, steps })
}

fn check_tap_has_room(tap: &Tap, existing: Option<&TapSessions>) -> Result<(), AttachPlanError> {
    match existing {
        Some(sessions) if sessions.session_count() >= MAX_SESSIONS_PER_TAP => {
            Err(AttachPlanError::TapFull { tap: tap.name.clone() })
        }
        _ => Ok(()),
    }
}

/// Refuses a `--to-dev` whose copies would be mirrored again: the tap itself, or an
/// interface some session mirrors.
fn check_target_cannot_loop(request: &AttachRequest, observed: &Observed) -> Result<(), AttachPlanError> {
    let Target::LocalDev { name, ifindex } = &request.target else { return Ok(()) };
    if *ifindex == request.tap.ifindex {
        return Err(AttachPlanError::TargetIsTap { dev: name.clone() });
    }
    if let Some(tap) = observed.taps.get(ifindex)
        && let Some(&session) = tap.ids.iter().find(|&&id| id != 0)
    {
        return Err(AttachPlanError::TargetIsMirrored { dev: name.clone(), session: u32::from(session) });
    }
    Ok(())
}

/// The lowest id that neither an eBPF session nor an OVS session (`reserved`) holds.
fn free_session_id(observed: &Observed) -> Result<u32, AttachPlanError> {
    (1..=MAX_SESSION_ID)
        .find(|id| !observed.sessions.contains_key(id) && !observed.reserved.contains(id))
        .ok_or(AttachPlanError::NoFreeSessionId)
}

/// Refuses a key whose wire form would not fit: GRE's 32 bits after the direction bit, and
/// for VXLAN the 24-bit VNI, for ERSPAN the 10-bit session id (the error says whether `--key`
/// or the default was it).
fn check_key_fits(request: &AttachRequest, key: u32) -> Result<(), AttachPlanError> {
    if key > MAX_GRE_USER_KEY {
        return Err(AttachPlanError::KeyTooLarge { key });
    }
    if let Target::Tunnel { encap: Encap::Vxlan { .. }, .. } = request.target
        && key > MAX_VXLAN_KEY
    {
        return Err(AttachPlanError::VxlanKeyTooLarge { key });
    }
    if let Target::Tunnel { encap: Encap::ErspanIII { .. } | Encap::ErspanII, .. } = request.target
        && key > MAX_ERSPAN_KEY
    {
        return Err(match request.key {
            Some(key) => AttachPlanError::ErspanKeyTooLarge { what: "--key", key, hint: "" },
            None => AttachPlanError::ErspanKeyTooLarge {
                what: "the session id (the default key)",
                key,
                hint: "; give a smaller one with --key",
            },
        });
    }
    Ok(())
}

/// Refuses copies some live session already sends: the same tap to the same target, or any
/// tap to the same collector with the same key (the collector could not tell them apart).
fn check_copies_are_new(
    request: &AttachRequest,
    observed: &Observed,
    existing_tap: Option<&TapSessions>,
    key: u32,
) -> Result<(), AttachPlanError> {
    let on_this_tap = existing_tap.into_iter().flat_map(|t| t.ids).filter(|&id| id != 0).map(u32::from);
    for id in on_this_tap {
        if let Some(other) = observed.sessions.get(&id)
            && same_target(other, &request.target, key)
        {
            let target = match &request.target {
                Target::Tunnel { .. } => format!("{} with key {key}", request.target),
                Target::LocalDev { .. } => request.target.to_string(),
            };
            return Err(AttachPlanError::AlreadyMirrored {
                tap: request.tap.name.clone(),
                target,
                session: id,
            });
        }
    }
    if let Target::Tunnel { remote, .. } = &request.target
        && let Some((&session, _)) =
            observed.sessions.iter().find(|(_, s)| same_target(s, &request.target, key))
    {
        return Err(AttachPlanError::KeyInUse { remote: *remote, key, session });
    }
    Ok(())
}

/// The session's map entry as first claimed: busy, so the programs skip it until activated.
fn session_config(request: &AttachRequest, key: u32) -> SessionConfig {
    let mut config = SessionConfig::EMPTY;
    config.state = SESSION_BUSY;
    config.directions = request.directions.bits();
    config.tap_ifindex = request.tap.ifindex;
    match request.owner {
        Owner::Persistent => {}
        Owner::Foreground { pid } => config.owner_pid = pid,
        Owner::Daemon { tag } => config.daemon_tag = tag,
    }
    config.key = key;
    config.created_at = request.now;
    request.controls.apply_to(&mut config);
    if request.controls.filter.is_some() {
        config.filter = FILTER_SLOT_BASE;
    }
    match &request.target {
        Target::Tunnel { remote, ttl, tos, .. } => {
            config.target_kind = TARGET_GRE;
            (config.remote_family, config.remote) = remote_bytes(*remote);
            config.ttl = *ttl;
            config.tos = *tos;
        }
        Target::LocalDev { ifindex, .. } => {
            config.target_kind = TARGET_LOCAL_DEV;
            for direction in request.directions.iter() {
                config.target_ifindex[direction.index()] = *ifindex;
            }
        }
    }
    config
}

/// One GRE, ERSPAN or VXLAN device per direction (none for `--to-dev`).
fn gre_device_steps(request: &AttachRequest, id: u32, key: u32) -> Vec<AttachStep> {
    let Target::Tunnel { remote, ttl, tos, encap } = &request.target else { return Vec::new() };
    request
        .directions
        .iter()
        .map(|direction| AttachStep::CreateGreDevice {
            id,
            direction,
            device: TunnelDevice {
                name: gre_device_name(id, direction),
                alias: gre_device_alias(id, direction),
                remote: *remote,
                local: None,
                wire_key: gre_wire_key(key, direction),
                ttl: *ttl,
                tos: *tos,
                encap: device_encap(*encap, key, direction),
            },
        })
        .collect()
}

/// What a device of `encap` puts around each copy: for ERSPAN, its header's fields.
fn device_encap(encap: Encap, key: u32, direction: Direction) -> DeviceEncap {
    let header = |version, hwid| ErspanHeader { version, session_id: key, direction, hwid };
    match encap {
        Encap::Gre => DeviceEncap::Gre,
        Encap::ErspanIII { hwid } => DeviceEncap::Erspan(header(2, hwid)),
        Encap::ErspanII => DeviceEncap::Erspan(header(1, 0)),
        Encap::Vxlan { port } => DeviceEncap::Vxlan { port },
    }
}

/// With a snaplen, a copy program on each device the copies leave through: each direction's
/// GRE device, or the one `--to-dev` device, which both directions share and one program serves.
fn copy_program_steps(request: &AttachRequest, id: u32) -> Vec<AttachStep> {
    if request.controls.snaplen == 0 {
        return Vec::new();
    }
    let mut directions = request.directions.iter();
    match &request.target {
        Target::Tunnel { .. } => directions
            .map(|direction| AttachStep::AttachCopyProgram {
                id,
                direction,
                device: gre_device_name(id, direction),
            })
            .collect(),
        Target::LocalDev { name, .. } => directions
            .next()
            .map(|direction| AttachStep::AttachCopyProgram { id, direction, device: name.clone() })
            .into_iter()
            .collect(),
    }
}

/// A tap's first session registers it and attaches its programs.
fn tap_program_steps(tap: &Tap, mode: AttachMode) -> Vec<AttachStep> {
    let mut steps = vec![AttachStep::RegisterTap { tap: tap.clone(), mode }];
    if mode == AttachMode::Netlink {
        steps.push(AttachStep::EnsureClsact { tap: tap.clone() });
    }
    // Both hooks even for one direction: a later session on this tap may want the other,
    // and a program whose tap lists no session for a direction costs one map lookup.
    steps.extend(TcHook::ALL.into_iter().map(|hook| AttachStep::AttachProgram {
        tap: tap.clone(),
        hook,
        mode,
    }));
    steps
}

impl AttachPlan {
    /// Gives the devices that need a source address (IPv6 GRE and ERSPAN) `source`, the one the
    /// route to the collector uses (known only once the route is read).
    pub fn set_tunnel_source(&mut self, source: Option<IpAddr>) {
        for step in &mut self.steps {
            if let AttachStep::CreateGreDevice { device, .. } = step
                && device.remote.is_ipv6()
                && !matches!(device.encap, DeviceEncap::Vxlan { .. })
            {
                device.local = source;
            }
        }
    }
}

/// The attach mode for a tap: the one its programs already use (`existing`), else `choice`.
pub fn choose_mode(
    tap: &str,
    choice: AttachModeChoice,
    tcx_supported: bool,
    existing: Option<u32>,
) -> Result<AttachMode, AttachPlanError> {
    if let Some(existing) = existing.and_then(AttachMode::from_abi) {
        let asked = match choice {
            AttachModeChoice::Auto => return Ok(existing),
            AttachModeChoice::Tcx => AttachMode::Tcx,
            AttachModeChoice::Netlink => AttachMode::Netlink,
        };
        if asked != existing {
            return Err(AttachPlanError::ModeConflict {
                tap: tap.to_owned(),
                existing: existing.as_str(),
                asked: asked.as_str(),
            });
        }
        return Ok(existing);
    }
    match choice {
        AttachModeChoice::Auto if tcx_supported => Ok(AttachMode::Tcx),
        AttachModeChoice::Auto | AttachModeChoice::Netlink => Ok(AttachMode::Netlink),
        AttachModeChoice::Tcx if tcx_supported => Ok(AttachMode::Tcx),
        AttachModeChoice::Tcx => Err(AttachPlanError::TcxUnsupported),
    }
}

/// The session map's `remote_family` and `remote` of a collector.
fn remote_bytes(remote: IpAddr) -> (u8, [u8; 16]) {
    let mut bytes = [0; 16];
    match remote {
        IpAddr::V4(v4) => {
            bytes[..4].copy_from_slice(&v4.octets());
            (4, bytes)
        }
        IpAddr::V6(v6) => (6, v6.octets()),
    }
}

/// The collector a session's map entry records (`None` for `--to-dev` sessions).
pub fn session_remote(session: &SessionConfig) -> Option<IpAddr> {
    match (session.target_kind, session.remote_family) {
        (TARGET_GRE, 4) => {
            Some(IpAddr::from([session.remote[0], session.remote[1], session.remote[2], session.remote[3]]))
        }
        (TARGET_GRE, 6) => Some(IpAddr::from(session.remote)),
        _ => None,
    }
}

fn same_target(session: &SessionConfig, target: &Target, key: u32) -> bool {
    if session.state != SESSION_ACTIVE && session.state != SESSION_BUSY {
        return false;
    }
    match target {
        Target::Tunnel { remote, .. } => {
            session.target_kind == TARGET_GRE
                && (session.remote_family, session.remote) == remote_bytes(*remote)
                && session.key == key
        }
        Target::LocalDev { ifindex, .. } => {
            session.target_kind == TARGET_LOCAL_DEV && session.target_ifindex.contains(ifindex)
        }
    }
}

#[cfg(test)]
mod tests {
    use vmsniff_ebpf::{ATTACH_NETLINK, ATTACH_TCX, TapSessions};

    use super::*;
    use crate::{
        model::mirror::Directions,
        plan::{
            controls::{Controls, parse_rate_limit},
            filter::{compile, stored_expression},
        },
    };

    fn request(target: Target) -> AttachRequest {
        AttachRequest {
            tap: Tap { ifindex: 7, name: "tap0".into() },
            target,
            key: None,
            directions: Directions::Both,
            controls: Controls::default(),
            mode: AttachModeChoice::Auto,
            tcx_supported: true,
            owner: Owner::Persistent,
            now: 1_700_000_000,
        }
    }

    fn gre(ip: [u8; 4]) -> Target {
        Target::Tunnel { remote: IpAddr::from(ip), ttl: 64, tos: 0, encap: Encap::Gre }
    }

    fn erspan(ip: [u8; 4], encap: Encap) -> Target {
        Target::Tunnel { remote: IpAddr::from(ip), ttl: 64, tos: 0, encap }
    }

    fn header(device: &TunnelDevice) -> Option<ErspanHeader> {
        match device.encap {
            DeviceEncap::Erspan(header) => Some(header),
            DeviceEncap::Gre | DeviceEncap::Vxlan { .. } => None,
        }
    }

    #[test]
    fn vxlan_devices_carry_the_vni_and_port_and_ipv6_collectors_are_recorded() {
        let remote: IpAddr = "2001:db8::10".parse().unwrap();
        let mut req = request(Target::Tunnel { remote, ttl: 9, tos: 32, encap: Encap::Vxlan { port: 8472 } });
        req.key = Some(7);
        let plan = plan_attach(&req, &Observed::default()).unwrap();
        let created = devices(&plan);
        assert_eq!(created.len(), 2);
        for (device, direction) in created.iter().zip([Direction::Out, Direction::In]) {
            assert_eq!(device.encap, DeviceEncap::Vxlan { port: 8472 });
            assert_eq!(device.wire_key, 14 + direction as u32, "VNI K*2+d, as the GRE key");
            assert_eq!((device.remote, device.ttl, device.tos), (remote, 9, 32));
        }
        let AttachStep::ClaimSession { config, .. } = &plan.steps[0] else { panic!() };
        assert_eq!(session_remote(config), Some(remote));
        let source: IpAddr = "2001:db8::1".parse().unwrap();
        let mut with_source = plan.clone();
        with_source.set_tunnel_source(Some(source));
        assert!(devices(&with_source).iter().all(|d| d.local.is_none()), "vxlan picks its source per packet");
        let mut gre6 = req.clone();
        gre6.target = Target::Tunnel { remote, ttl: 64, tos: 0, encap: Encap::ErspanII };
        let mut plan6 = plan_attach(&gre6, &Observed::default()).unwrap();
        plan6.set_tunnel_source(Some(source));
        assert!(devices(&plan6).iter().all(|d| d.local == Some(source)), "ip6erspan needs its source");
        let mut observed = Observed::default();
        applied(&mut observed, &req);
        req.tap.ifindex = 8;
        assert!(matches!(plan_attach(&req, &observed), Err(AttachPlanError::KeyInUse { .. })));
        req.key = Some(MAX_VXLAN_KEY + 1);
        assert!(matches!(plan_attach(&req, &observed), Err(AttachPlanError::VxlanKeyTooLarge { .. })));
    }

    fn devices(plan: &AttachPlan) -> Vec<&TunnelDevice> {
        plan.steps
            .iter()
            .filter_map(|s| match s {
                AttachStep::CreateGreDevice { device, .. } => Some(device),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn erspan_devices_carry_the_key_as_span_id_and_one_direction_each() {
        let mut req = request(erspan([192, 0, 2, 10], Encap::ErspanIII { hwid: 9 }));
        req.key = Some(300);
        let plan = plan_attach(&req, &Observed::default()).unwrap();
        let created = devices(&plan);
        assert_eq!(created.len(), 2);
        for (device, direction) in created.iter().zip([Direction::Out, Direction::In]) {
            let header = header(device).expect("an ERSPAN header");
            assert_eq!((header.version, header.session_id, header.hwid), (2, 300, 9));
            assert_eq!(header.direction, direction);
            assert_eq!(device.wire_key, 600 + direction as u32, "distinct receive keys per direction");
        }
        req.target = erspan([192, 0, 2, 10], Encap::ErspanII);
        let plan = plan_attach(&req, &Observed::default()).unwrap();
        assert!(devices(&plan).iter().all(|d| header(d).is_some_and(|h| h.version == 1)));
        req.target = gre([192, 0, 2, 10]);
        let plan = plan_attach(&req, &Observed::default()).unwrap();
        assert!(devices(&plan).iter().all(|d| d.encap == DeviceEncap::Gre));
    }

    #[test]
    fn erspan_keys_must_fit_the_kernels_receive_key() {
        let mut req = request(erspan([192, 0, 2, 10], Encap::ErspanII));
        req.key = Some(MAX_ERSPAN_KEY + 1);
        assert!(matches!(
            plan_attach(&req, &Observed::default()),
            Err(AttachPlanError::ErspanKeyTooLarge { what: "--key", key: 512, .. })
        ));
        req.key = Some(MAX_ERSPAN_KEY);
        assert!(plan_attach(&req, &Observed::default()).is_ok());

        req.key = None;
        let mut observed = Observed::default();
        for id in 1..=MAX_ERSPAN_KEY {
            observed.sessions.insert(id, SessionConfig { state: SESSION_ACTIVE, ..SessionConfig::EMPTY });
        }
        let error = plan_attach(&req, &observed).unwrap_err();
        assert!(error.to_string().contains("give a smaller one with --key"), "{error}");
        req.key = Some(3);
        assert!(plan_attach(&req, &observed).is_ok(), "an explicit small key works beside many sessions");
    }

    /// The state after planning and applying `req` (as the executor would leave it).
    fn applied(observed: &mut Observed, req: &AttachRequest) -> u32 {
        let plan = plan_attach(req, observed).unwrap();
        let mut config = match &plan.steps[0] {
            AttachStep::ClaimSession { config, .. } => *config,
            other => panic!("first step is {other:?}"),
        };
        config.state = SESSION_ACTIVE;
        observed.sessions.insert(plan.session_id, config);
        let tap = observed
            .taps
            .entry(req.tap.ifindex)
            .or_insert(TapSessions { attach_mode: ATTACH_TCX, ..TapSessions::EMPTY });
        let slot = tap.ids.iter().position(|&id| id == 0).unwrap();
        tap.ids[slot] = plan.session_id as u16;
        plan.session_id
    }

    #[test]
    fn controls_reach_the_session_and_the_filter_is_written_before_activation() {
        let mut req = request(gre([192, 0, 2, 10]));
        req.controls = Controls {
            filter: Some(compile("tcp port 443").unwrap()),
            sample_every: 10,
            rate_limit: Some(parse_rate_limit("10mbit").unwrap()),
            snaplen: 128,
        };
        let plan = plan_attach(&req, &Observed::default()).unwrap();
        let AttachStep::ClaimSession { config, .. } = &plan.steps[0] else { panic!() };
        assert_eq!((config.filter, config.sample_every), (FILTER_SLOT_BASE, 10));
        assert_eq!((config.rate_unit, config.rate), (vmsniff_ebpf::RATE_BITS, 10_000_000));
        assert_eq!(config.snaplen, 128);
        let position = |wanted: fn(&AttachStep) -> bool| plan.steps.iter().position(wanted).unwrap();
        let write = position(|s| matches!(s, AttachStep::WriteFilter { .. }));
        assert!(write < position(|s| matches!(s, AttachStep::ActivateSession { .. })));
        let AttachStep::WriteFilter { filter, .. } = &plan.steps[write] else { panic!() };
        assert_eq!(stored_expression(filter), "tcp port 443");

        let plain = plan_attach(&request(gre([192, 0, 2, 10])), &Observed::default()).unwrap();
        let AttachStep::ClaimSession { config, .. } = &plain.steps[0] else { panic!() };
        assert_eq!((config.filter, config.sample_every, config.rate_unit), (0, 1, 0));
        assert!(!plain.steps.iter().any(|s| matches!(s, AttachStep::WriteFilter { .. })));
    }

    #[test]
    fn first_session_creates_devices_then_attaches_then_publishes() {
        let mut req = request(gre([192, 0, 2, 10]));
        req.controls.snaplen = 96;
        let plan = plan_attach(&req, &Observed::default()).unwrap();
        assert_eq!(plan.session_id, 1);
        assert_eq!(plan.key, 1, "the key defaults to the session id");
        let kinds: Vec<&str> = plan
            .steps
            .iter()
            .map(|s| match s {
                AttachStep::ClaimSession { .. } => "claim",
                AttachStep::ResetCounters { .. } => "reset",
                AttachStep::WriteFilter { .. } => "filter",
                AttachStep::CreateGreDevice { .. } => "gre",
                AttachStep::AttachCopyProgram { .. } => "copy",
                AttachStep::RegisterTap { .. } => "register",
                AttachStep::EnsureClsact { .. } => "clsact",
                AttachStep::AttachProgram { .. } => "attach",
                AttachStep::ActivateSession { .. } => "activate",
                AttachStep::AddToTap { .. } => "publish",
                AttachStep::MoveSession { .. } => "move",
            })
            .collect();
        assert_eq!(
            kinds,
            [
                "claim", "reset", "gre", "gre", "copy", "copy", "register", "attach", "attach", "activate",
                "publish"
            ]
        );
        let keys: Vec<u32> = plan
            .steps
            .iter()
            .filter_map(|s| match s {
                AttachStep::CreateGreDevice { device, .. } => Some(device.wire_key),
                _ => None,
            })
            .collect();
        assert_eq!(keys, [2, 3], "wire key = key * 2 + d, out = 0, in = 1");
    }

    #[test]
    fn claimed_session_is_busy_until_activated() {
        let plan = plan_attach(&request(gre([192, 0, 2, 10])), &Observed::default()).unwrap();
        let AttachStep::ClaimSession { config, .. } = &plan.steps[0] else { panic!() };
        assert_eq!(config.state, SESSION_BUSY);
        assert_eq!(&config.remote[..4], &[192, 0, 2, 10]);
        assert_eq!(config.target_kind, TARGET_GRE);
    }

    #[test]
    fn one_direction_creates_one_device() {
        let mut req = request(gre([192, 0, 2, 10]));
        req.directions = Directions::In;
        req.controls.snaplen = 96;
        let plan = plan_attach(&req, &Observed::default()).unwrap();
        let devices: Vec<&TunnelDevice> = plan
            .steps
            .iter()
            .filter_map(|s| match s {
                AttachStep::CreateGreDevice { device, .. } => Some(device),
                _ => None,
            })
            .collect();
        assert_eq!(devices.len(), 1);
        assert_eq!(devices[0].name, "vms1-in");
        let copies: Vec<&str> = plan
            .steps
            .iter()
            .filter_map(|s| match s {
                AttachStep::AttachCopyProgram { device, .. } => Some(device.as_str()),
                _ => None,
            })
            .collect();
        assert_eq!(copies, ["vms1-in"], "the copy program goes where the copies go");
    }

    #[test]
    fn session_ids_are_the_lowest_free() {
        let mut observed = Observed::default();
        assert_eq!(applied(&mut observed, &request(gre([192, 0, 2, 1]))), 1);
        assert_eq!(applied(&mut observed, &request(gre([192, 0, 2, 2]))), 2);
        observed.sessions.remove(&1);
        let plan = plan_attach(&request(gre([192, 0, 2, 3])), &observed).unwrap();
        assert_eq!(plan.session_id, 1);
    }

    #[test]
    fn session_ids_skip_those_of_ovs_sessions() {
        let observed = Observed { reserved: [1, 2].into(), ..Observed::default() };
        assert_eq!(plan_attach(&request(gre([192, 0, 2, 1])), &observed).unwrap().session_id, 3);
    }

    #[test]
    fn a_second_session_on_a_tap_reuses_its_programs() {
        let mut observed = Observed::default();
        applied(&mut observed, &request(gre([192, 0, 2, 1])));
        let plan = plan_attach(&request(gre([192, 0, 2, 2])), &observed).unwrap();
        assert!(!plan.steps.iter().any(|s| matches!(s, AttachStep::AttachProgram { .. })));
        assert!(matches!(plan.steps.last(), Some(AttachStep::AddToTap { id: 2, .. })));
    }

    #[test]
    fn the_same_collector_and_key_twice_is_refused() {
        let mut observed = Observed::default();
        applied(&mut observed, &request(gre([192, 0, 2, 1])));
        let mut again = request(gre([192, 0, 2, 1]));
        again.key = Some(1);
        assert_eq!(
            plan_attach(&again, &observed),
            Err(AttachPlanError::AlreadyMirrored {
                tap: "tap0".into(),
                target: "192.0.2.1 (GRE) with key 1".into(),
                session: 1
            })
        );
    }

    #[test]
    fn one_key_toward_one_collector_belongs_to_one_session() {
        let mut observed = Observed::default();
        applied(&mut observed, &request(gre([192, 0, 2, 1])));
        let mut other_tap = request(gre([192, 0, 2, 1]));
        other_tap.tap = Tap { ifindex: 9, name: "tap1".into() };
        other_tap.key = Some(1);
        assert!(matches!(
            plan_attach(&other_tap, &observed),
            Err(AttachPlanError::KeyInUse { key: 1, session: 1, .. })
        ));
        other_tap.key = None;
        assert_eq!(
            plan_attach(&other_tap, &observed).unwrap().key,
            2,
            "the default key is the new session's id"
        );
    }

    #[test]
    fn a_tap_holds_at_most_eight_sessions() {
        let mut observed = Observed::default();
        for i in 0..8u8 {
            applied(&mut observed, &request(gre([192, 0, 2, i + 1])));
        }
        assert_eq!(
            plan_attach(&request(gre([192, 0, 2, 99])), &observed),
            Err(AttachPlanError::TapFull { tap: "tap0".into() })
        );
    }

    #[test]
    fn session_ids_run_out_at_1023() {
        let mut observed = Observed::default();
        for id in 1..=MAX_SESSION_ID {
            observed.sessions.insert(id, SessionConfig { state: SESSION_ACTIVE, ..SessionConfig::EMPTY });
        }
        assert_eq!(
            plan_attach(&request(gre([192, 0, 2, 1])), &observed),
            Err(AttachPlanError::NoFreeSessionId)
        );
    }

    #[test]
    fn keys_must_leave_room_for_the_direction_bit() {
        let mut req = request(gre([192, 0, 2, 1]));
        req.key = Some(MAX_GRE_USER_KEY + 1);
        assert!(matches!(plan_attach(&req, &Observed::default()), Err(AttachPlanError::KeyTooLarge { .. })));
        req.key = Some(MAX_GRE_USER_KEY);
        assert!(plan_attach(&req, &Observed::default()).is_ok());
    }

    #[test]
    fn local_targets_cannot_loop() {
        let req = request(Target::LocalDev { name: "tap0".into(), ifindex: 7 });
        assert!(matches!(plan_attach(&req, &Observed::default()), Err(AttachPlanError::TargetIsTap { .. })));

        let mut observed = Observed::default();
        let mut other = request(gre([192, 0, 2, 1]));
        other.tap = Tap { ifindex: 9, name: "tap1".into() };
        applied(&mut observed, &other);
        let req = request(Target::LocalDev { name: "tap1".into(), ifindex: 9 });
        assert!(matches!(
            plan_attach(&req, &observed),
            Err(AttachPlanError::TargetIsMirrored { session: 1, .. })
        ));
    }

    #[test]
    fn local_targets_need_no_device_and_fill_both_directions() {
        let plan = plan_attach(
            &request(Target::LocalDev { name: "veth0".into(), ifindex: 4 }),
            &Observed::default(),
        )
        .unwrap();
        assert!(!plan.steps.iter().any(|s| matches!(s, AttachStep::CreateGreDevice { .. })));
        let AttachStep::ClaimSession { config, .. } = &plan.steps[0] else { panic!() };
        assert_eq!(config.target_ifindex, [4, 4]);
        assert_eq!(config.target_kind, TARGET_LOCAL_DEV);
    }

    #[test]
    fn one_copy_program_serves_a_local_device_for_both_directions() {
        let mut req = request(Target::LocalDev { name: "veth0".into(), ifindex: 4 });
        assert_eq!(copy_program_steps(&req, 3), [], "no snaplen, no copy program");
        req.controls.snaplen = 96;
        assert_eq!(
            copy_program_steps(&req, 3),
            [AttachStep::AttachCopyProgram { id: 3, direction: Direction::Out, device: "veth0".into() }]
        );
        let mut req = request(gre([192, 0, 2, 1]));
        req.controls.snaplen = 96;
        let devices: Vec<String> = copy_program_steps(&req, 3)
            .into_iter()
            .filter_map(|s| match s {
                AttachStep::AttachCopyProgram { device, .. } => Some(device),
                _ => None,
            })
            .collect();
        assert_eq!(devices, ["vms3-out", "vms3-in"]);
    }

    #[test]
    fn a_local_device_mirrored_twice_is_named_without_a_key() {
        let mut observed = Observed::default();
        let req = request(Target::LocalDev { name: "veth0".into(), ifindex: 4 });
        applied(&mut observed, &req);
        assert_eq!(
            plan_attach(&req, &observed),
            Err(AttachPlanError::AlreadyMirrored {
                tap: "tap0".into(),
                target: "device veth0".into(),
                session: 1
            })
        );
    }

    #[test]
    fn only_erspan_limits_the_key_to_its_session_id() {
        let mut req = request(gre([192, 0, 2, 1]));
        req.key = Some(MAX_ERSPAN_KEY + 1);
        assert_eq!(check_key_fits(&req, MAX_ERSPAN_KEY + 1), Ok(()));
        req.target = erspan([192, 0, 2, 1], Encap::ErspanIII { hwid: 0 });
        assert!(matches!(
            check_key_fits(&req, MAX_ERSPAN_KEY + 1),
            Err(AttachPlanError::ErspanKeyTooLarge { what: "--key", .. })
        ));
    }

    #[test]
    fn the_owner_is_recorded_where_cleanup_looks_for_it() {
        let mut req = request(gre([192, 0, 2, 1]));
        let owner_fields = |req: &AttachRequest| {
            let config = session_config(req, 1);
            (config.owner_pid, config.daemon_tag)
        };
        assert_eq!(owner_fields(&req), (0, 0));
        req.owner = Owner::Foreground { pid: 42 };
        assert_eq!(owner_fields(&req), (42, 0));
        req.owner = Owner::Daemon { tag: 7 };
        assert_eq!(owner_fields(&req), (0, 7));
    }

    #[test]
    fn a_new_tap_gets_clsact_only_on_the_netlink_path_and_both_hooks_always() {
        let tap = Tap { ifindex: 7, name: "tap0".into() };
        let steps = tap_program_steps(&tap, AttachMode::Tcx);
        assert!(matches!(steps[0], AttachStep::RegisterTap { mode: AttachMode::Tcx, .. }));
        assert!(!steps.iter().any(|s| matches!(s, AttachStep::EnsureClsact { .. })));
        let steps = tap_program_steps(&tap, AttachMode::Netlink);
        assert!(matches!(steps[1], AttachStep::EnsureClsact { .. }));
        let hooks: Vec<TcHook> = steps
            .iter()
            .filter_map(|s| match s {
                AttachStep::AttachProgram { hook, .. } => Some(*hook),
                _ => None,
            })
            .collect();
        assert_eq!(hooks, TcHook::ALL);
    }

    #[test]
    fn attach_mode_follows_the_kernel_and_the_tap() {
        let mut req = request(gre([192, 0, 2, 1]));
        req.tcx_supported = false;
        let plan = plan_attach(&req, &Observed::default()).unwrap();
        assert!(plan.steps.iter().any(|s| matches!(s, AttachStep::EnsureClsact { .. })));
        assert!(
            plan.steps
                .iter()
                .any(|s| matches!(s, AttachStep::AttachProgram { mode: AttachMode::Netlink, .. }))
        );

        req.mode = AttachModeChoice::Tcx;
        assert_eq!(plan_attach(&req, &Observed::default()), Err(AttachPlanError::TcxUnsupported));

        let mut observed = Observed::default();
        observed.taps.insert(
            7,
            TapSessions { attach_mode: ATTACH_NETLINK, ids: [5, 0, 0, 0, 0, 0, 0, 0], ..TapSessions::EMPTY },
        );
        observed.sessions.insert(5, SessionConfig { state: SESSION_ACTIVE, ..SessionConfig::EMPTY });
        let mut req = request(gre([192, 0, 2, 1]));
        req.mode = AttachModeChoice::Tcx;
        assert!(matches!(plan_attach(&req, &observed), Err(AttachPlanError::ModeConflict { .. })));
        req.mode = AttachModeChoice::Auto;
        let plan = plan_attach(&req, &observed).unwrap();
        assert!(
            !plan
                .steps
                .iter()
                .any(|s| matches!(s, AttachStep::RegisterTap { .. } | AttachStep::AttachProgram { .. }))
        );
    }
}
