//! `--mode ovs`: the classic Open vSwitch mirror (a Mirror on the VM's port with a GRE output
//! port), made by one OVSDB transaction and removed by another that touches only its own rows.
use std::collections::BTreeSet;

use anyhow::{Context as _, bail};
use serde_json::{Value, json};

use crate::cli::{attach::AttachArgs, sessions::SessionArgs, target::MirrorArgs};
use crate::{
    ovs::{
        apply::{apply_attach, remove},
        plan::{DaemonOwner, OvsAttachPlan, OvsAttachRequest, plan_ovs_attach},
        port::{check_route, vm_port},
        session::{OvsSession, Snapshot},
        status::{OvsSessionStatus, session_status},
    },
    ovsdb::{Client, Operation, OvsdbError, socket_path, vswitch::DATABASE},
    resolve::{
        select::NicChoice,
        vm::{Resolved, Sources, vm_taps},
    },
    service::namespace::Namespace,
};

/// Opens OVSDB for a command that needs it.
pub fn connect(sources: &Sources) -> Result<Client, OvsdbError> {
    Client::connect(&socket_path(sources.ovsdb.as_deref())?)
}

/// Opens OVSDB for a command that only may find OVS sessions there: `None` when there is no
/// OVSDB (a host without Open vSwitch) unless `--ovsdb` named one.
fn connect_if_present(sources: &Sources) -> anyhow::Result<Option<Client>> {
    match connect(sources) {
        Ok(client) => Ok(Some(client)),
        Err(e) if sources.ovsdb.is_none() => {
            log::debug!("no OVS sessions: {e}");
            Ok(None)
        }
        Err(e) => Err(e.into()),
    }
}

/// The ids OVS sessions hold, for an eBPF attach to leave free; none without OVSDB.
pub fn reserved_ids(sources: &Sources) -> BTreeSet<u32> {
    let read = connect(sources).and_then(|mut client| Snapshot::read(&mut client));
    match read {
        Ok(snapshot) => snapshot.sessions().into_keys().collect(),
        Err(e) => {
            log::debug!("no OVS session ids to avoid: {e}");
            BTreeSet::new()
        }
    }
}

/// The collector an OVS session sends to: `--to`, required.
fn collector(mirror: &MirrorArgs) -> anyhow::Result<std::net::Ipv4Addr> {
    mirror.to.context("--mode ovs sends copies to a GRE collector: give --to IP")
}

/// Refuses what only eBPF mode can do, naming each option.
pub fn refuse_ebpf_options(args: &AttachArgs) -> anyhow::Result<()> {
    let controls = &args.controls;
    let given: Vec<&str> = [
        (controls.filter.is_some(), "--filter"),
        (controls.snaplen.is_some(), "--snaplen"),
        (controls.sample.is_some(), "--sample"),
        (controls.rate_limit.is_some(), "--rate-limit"),
        (args.mirror.to_dev.is_some(), "--to-dev"),
        (args.mirror.attach_mode.is_some(), "--attach-mode"),
        // vmsniff's OVS mirror sends through an OVS GRE port: plain GRE with the key.
        (args.mirror.encap != crate::model::wire::EncapChoice::Gre, "--encap erspan"),
        (args.mirror.erspan_hwid.is_some(), "--erspan-hwid"),
    ]
    .into_iter()
    .filter_map(|(given, name)| given.then_some(name))
    .collect();
    if !given.is_empty() {
        bail!(
            "{} {} eBPF mode's: an OVS mirror copies every frame whole to a GRE collector (--to), \
             and has no tc programs to attach. Drop {}, or drop --mode ovs",
            given.join(", "),
            if given.len() == 1 { "is" } else { "are" },
            if given.len() == 1 { "it" } else { "them" }
        );
    }
    collector(&args.mirror)?;
    Ok(())
}

/// `vmsniff attach VM --mode ovs --to IP [--key N] [--direction D] [--dry-run]`.
pub async fn attach(sources: &Sources, args: AttachArgs) -> anyhow::Result<()> {
    refuse_ebpf_options(&args)?;
    let mirror = &args.mirror;
    let namespace = if args.dry_run { Namespace::open_for_reading()? } else { Namespace::open()? };
    let resolved = mirror.resolve(sources, &namespace.kernel.netlink).await?;
    let mut client = connect(sources)?;
    // Session ids are shared with eBPF mode: hold the same lock while choosing one.
    let _lock = if args.dry_run { None } else { Some(namespace.lock()?) };
    if !args.dry_run {
        namespace.clean_orphans().await?;
    }
    let planned = plan_attach(&namespace, &mut client, mirror, &resolved, None).await?;
    let plan = &planned.plan;
    if args.dry_run {
        println!("{}", transaction_text(&plan.operations));
        println!("\n# The same change with ovs-vsctl:\n{}", plan.vsctl);
        log::info!("dry run: session {} would mirror {}; nothing was changed", plan.id, planned.what);
        return Ok(());
    }
    apply_attach(&mut client, plan)?;
    log::info!("session {}: mirroring {}", plan.id, planned.what);
    println!("{}", plan.id);
    Ok(())
}

/// An OVS session planned for a resolved NIC, and the words that say what it mirrors.
pub struct PlannedOvsAttach {
    pub plan: OvsAttachPlan,
    pub what: String,
}

/// Plans an OVS session on `resolved`'s OVS port: finds the port, checks the collector's route
/// and takes an id free on both sides. The caller holds vmsniff's lock (ids are shared with
/// eBPF mode); `daemon` names the daemon's config session that keeps it.
pub async fn plan_attach(
    namespace: &Namespace,
    client: &mut Client,
    mirror: &MirrorArgs,
    resolved: &Resolved,
    daemon: Option<DaemonOwner>,
) -> anyhow::Result<PlannedOvsAttach> {
    let to = collector(mirror)?;
    let netlink = &namespace.kernel.netlink;
    let snapshot = Snapshot::read(client)?;
    let port = vm_port(netlink, resolved, &snapshot).await?;
    check_route(netlink, to, &port, &snapshot).await?;
    let taken: BTreeSet<u32> = namespace.observe()?.sessions.keys().copied().collect();
    let (vm, nic) = match resolved {
        Resolved::Nic { vm, nic, .. } => (Some(vm.display_name().to_owned()), Some(nic.index)),
        Resolved::Interface { .. } => (None, None),
    };
    let request = OvsAttachRequest {
        bridge: port.bridge.clone(),
        vm_port: port.port.clone(),
        remote: to,
        key: mirror.key,
        ttl: mirror.ttl,
        tos: mirror.tos,
        directions: mirror.direction,
        tap: resolved.tap().name.clone(),
        vm,
        nic,
        daemon,
        now: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
    };
    let plan = plan_ovs_attach(&request, &snapshot, &taken)?;
    let what = format!(
        "{} ({}) of {} at OVS port {} on {} to {to} (GRE port {}, key {}; mirror {})",
        mirror.direction.as_str(),
        crate::cli::attach::direction_words(mirror.direction),
        crate::cli::attach::describe(resolved),
        port.port,
        port.bridge,
        plan.gre_port,
        plan.key,
        plan.mirror
    );
    Ok(PlannedOvsAttach { plan, what })
}

/// The JSON-RPC request, one operation a line: valid JSON, and readable.
fn transaction_text(operations: &[Operation]) -> String {
    let mut lines = vec![json!(DATABASE).to_string()];
    lines.extend(operations.iter().map(|o| o.to_json().to_string()));
    format!("{{\"method\": \"transact\", \"id\": 0, \"params\": [\n  {}\n]}}", lines.join(",\n  "))
}

/// The OVS sessions a `detach` names; `None` without OVSDB. Never fails for a name that matches
/// nothing: the eBPF side says so.
pub fn select(sources: &Sources, args: &SessionArgs) -> anyhow::Result<Option<(Client, BTreeSet<u32>)>> {
    let Some(mut client) = connect_if_present(sources)? else { return Ok(None) };
    let sessions = Snapshot::read(&mut client)?.sessions();
    let choice = args.nic.choice();
    let ids: BTreeSet<u32> = if args.all {
        sessions.keys().copied().collect()
    } else if let Some(id) = args.session {
        sessions.contains_key(&id).then_some(id).into_iter().collect()
    } else if let Some(id) = args
        .target
        .as_deref()
        .filter(|t| !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()) && args.vm.is_none())
        .and_then(|t| t.parse::<u32>().ok())
        .filter(|id| sessions.contains_key(id))
    {
        BTreeSet::from([id])
    } else if let Some(name) = args.tap.as_ref().or(args.vm.as_ref()).or(args.target.as_ref()) {
        matching(sources, &sessions, name, choice, args.tap.is_some())
    } else {
        BTreeSet::new()
    };
    Ok(Some((client, ids)))
}

/// Sessions of a tap (as recorded at attach) or of a VM's NICs.
fn matching(
    sources: &Sources,
    sessions: &std::collections::BTreeMap<u32, OvsSession>,
    name: &str,
    choice: NicChoice,
    tap_only: bool,
) -> BTreeSet<u32> {
    let mut ids: BTreeSet<u32> = if choice == NicChoice::Unspecified {
        sessions.values().filter(|s| s.tap() == Some(name)).map(|s| s.id).collect()
    } else {
        BTreeSet::new()
    };
    if !tap_only && let Ok(taps) = vm_taps(sources, name, choice) {
        ids.extend(
            sessions.values().filter(|s| s.tap().is_some_and(|t| taps.iter().any(|x| x == t))).map(|s| s.id),
        );
    }
    ids
}

/// Removes OVS sessions in one transaction.
pub fn detach(client: &mut Client, ids: &BTreeSet<u32>) -> anyhow::Result<()> {
    let ids: Vec<u32> = ids.iter().copied().collect();
    remove(client, &ids, true).context("removing OVS mirror sessions")?;
    Ok(())
}

/// Every OVS session, for `status`; none without OVSDB. An OVSDB that is named but cannot be
/// read is a warning: the eBPF sessions are still worth showing.
pub fn status(sources: &Sources) -> Vec<OvsSessionStatus> {
    let read = connect_if_present(sources)
        .and_then(|client| client.map(|mut c| Snapshot::read(&mut c)).transpose().map_err(Into::into));
    match read {
        Ok(Some(snapshot)) => snapshot.sessions().values().map(session_status).collect(),
        Ok(None) => Vec::new(),
        Err(e) => {
            log::warn!("OVS sessions not shown: {}", crate::model::error::chain(e.as_ref()));
            Vec::new()
        }
    }
}

/// `status --json`'s sessions: eBPF's, then OVS's.
pub fn merge_json(ebpf: Value, ovs: &[OvsSessionStatus]) -> anyhow::Result<Value> {
    let mut status = ebpf;
    let sessions = status["sessions"].as_array_mut().context("status has a sessions array")?;
    for s in ovs {
        sessions.push(serde_json::to_value(s)?);
    }
    Ok(status)
}
