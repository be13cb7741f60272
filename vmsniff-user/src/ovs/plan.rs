//! OVS mode's transactions, decided without touching OVSDB: (request, snapshot) → the one
//! `transact` of an attach or a detach. Pure and unit-tested; `apply::ovs` sends them.
//!
//! An attach inserts a GRE Interface and Port and a Mirror, and adds them to the bridge with
//! `mutate ... insert`: the bridge's other ports and mirrors are never rewritten, so a change
//! someone makes at the same time is kept, not clobbered. `wait` guards make the transaction
//! fail whole if the bridge or the VM's port changed since they were read.
use std::{collections::BTreeSet, net::IpAddr};

use serde_json::{Value, json};
use thiserror::Error;
use vmsniff_ebpf::MAX_SESSION_ID;

use crate::model::mirror::Directions;
use crate::{
    ovs::session::{
        BridgeRow, CREATED_KEY, DAEMON_ARGS_KEY, DAEMON_KEY, NIC_KEY, OvsSession, PortRow, SESSION_KEY,
        Snapshot, TAP_KEY, VM_KEY,
    },
    ovsdb::{Condition, Mutation, Operation, datum},
};

/// An OVS mirror session, as asked for and resolved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OvsAttachRequest {
    /// The bridge holding the VM's port.
    pub bridge: String,
    /// The VM's port: qvo for the hybrid plug, the tap for native OVS.
    pub vm_port: String,
    /// IPv4, or IPv6 through an `ip6gre` port (OVS's name for Ethernet in GRE over IPv6).
    pub remote: IpAddr,
    /// `--key`; the session id when absent. Sent as is: one OVS port carries both directions.
    pub key: Option<u32>,
    pub ttl: u8,
    pub tos: u8,
    pub directions: Directions,
    /// Recorded for `status`, `detach TAP` and `detach VM`.
    pub tap: String,
    pub vm: Option<String>,
    pub nic: Option<usize>,
    /// The `vmsniff daemon` config session that keeps it.
    pub daemon: Option<DaemonOwner>,
    /// Seconds since the epoch.
    pub now: u64,
}

/// The daemon's config session behind an OVS session, recorded in its rows: OVSDB outlives
/// the daemon's state file (a host reboot), and a restarted daemon compares its config with
/// what the rows were made from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DaemonOwner {
    pub name: String,
    /// Its attach arguments, as the config gave them.
    pub argv: Vec<String>,
}

#[derive(Clone, Debug)]
pub struct OvsAttachPlan {
    pub id: u32,
    pub key: u32,
    pub gre_port: String,
    pub mirror: String,
    pub operations: Vec<Operation>,
    /// The same change as one `ovs-vsctl` command, for operators.
    pub vsctl: String,
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum OvsPlanError {
    #[error("OVSDB has no bridge {bridge}; `ovs-vsctl list-br` lists them")]
    NoBridge { bridge: String },
    #[error("OVSDB has no port {port} on bridge {bridge}; `ovs-vsctl list-ports {bridge}` lists them")]
    NoPort { port: String, bridge: String },
    #[error("port {port} is vmsniff's own GRE output (session {session}): mirror the VM's port instead")]
    PortIsOutput { port: String, session: u32 },
    #[error(
        "all {MAX_SESSION_ID} session ids are in use (eBPF and OVS sessions share them); detach sessions that are no longer needed"
    )]
    NoFreeSessionId,
    #[error("session {session}'s Mirror is gone from OVSDB: detach the session and attach it again")]
    MirrorGone { session: u32 },
    #[error(
        "GRE port {port} already sends to {remote} with key {key}; OVS cannot tell two such tunnels apart: choose another --key"
    )]
    DuplicateTunnel { port: String, remote: IpAddr, key: u32 },
}

/// `vms<id>-ovs`: vmsniff's GRE port (a name no kernel device gets: OVS carries every GRE port
/// through one `gre_sys` device). Distinct from eBPF mode's `vms<id>-out`/`vms<id>-in`.
pub fn gre_port_name(id: u32) -> String {
    format!("vms{id}-ovs")
}

/// The Interface type of a GRE port toward `remote`: OVS names Ethernet in GRE over IPv6
/// `ip6gre` (a `gre` port's kernel vport is IPv4 only).
pub fn gre_port_type(remote: IpAddr) -> &'static str {
    match remote {
        IpAddr::V4(_) => "gre",
        IpAddr::V6(_) => "ip6gre",
    }
}

/// `vmsniff-<id>`: the session's Mirror.
pub fn mirror_name(id: u32) -> String {
    format!("vmsniff-{id}")
}

/// The session id a vmsniff row name carries, if the name is one of vmsniff's.
pub fn id_in_name(name: &str) -> Option<u32> {
    let digits = name
        .strip_prefix("vms")
        .and_then(|n| n.strip_suffix("-ovs"))
        .or_else(|| name.strip_prefix("vmsniff-"))?;
    (!digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit())).then(|| digits.parse().ok())?
}

/// Plans an attach. `taken` holds the ids of this namespace's eBPF sessions; OVSDB's own
/// vmsniff rows and names are read from the snapshot.
pub fn plan_ovs_attach(
    request: &OvsAttachRequest,
    snapshot: &Snapshot,
    taken: &BTreeSet<u32>,
) -> Result<OvsAttachPlan, OvsPlanError> {
    let (bridge, vm_port) = bridge_and_vm_port(request, snapshot)?;
    let id = free_session_id(snapshot, taken)?;
    let key = request.key.unwrap_or(id);
    refuse_duplicate_tunnel(snapshot, request.remote, key)?;
    let new = NewSession {
        request,
        id,
        gre_port: gre_port_name(id),
        mirror: mirror_name(id),
        external_ids: external_ids(request, id),
        options: gre_options(request, key),
        selects: Selects::of(request.directions),
    };
    let operations = attach_operations(&new, bridge, vm_port);
    let vsctl = shell_lines(&vsctl_lines(&new));
    Ok(OvsAttachPlan { id, key, gre_port: new.gre_port, mirror: new.mirror, operations, vsctl })
}

/// What an attach decided, written out twice: as the transaction and as `ovs-vsctl` text.
struct NewSession<'a> {
    request: &'a OvsAttachRequest,
    id: u32,
    gre_port: String,
    mirror: String,
    /// The same on all three new rows.
    external_ids: Vec<(&'static str, String)>,
    /// The GRE Interface's `options`.
    options: [(&'static str, String); 5],
    selects: Selects,
}

/// The bridge and the VM's port on it, as read; a port that is some session's GRE output is
/// refused (it carries copies, not a VM's frames).
fn bridge_and_vm_port<'s>(
    request: &OvsAttachRequest,
    snapshot: &'s Snapshot,
) -> Result<(&'s BridgeRow, &'s PortRow), OvsPlanError> {
    let bridge = snapshot
        .bridge_named(&request.bridge)
        .ok_or_else(|| OvsPlanError::NoBridge { bridge: request.bridge.clone() })?;
    let vm_port =
        snapshot.port_named(&request.vm_port).filter(|p| bridge.ports.contains(&p.row.uuid)).ok_or_else(
            || OvsPlanError::NoPort { port: request.vm_port.clone(), bridge: request.bridge.clone() },
        )?;
    if let Some(session) = vm_port.row.session() {
        return Err(OvsPlanError::PortIsOutput { port: request.vm_port.clone(), session });
    }
    Ok((bridge, vm_port))
}

/// The lowest id held neither by an eBPF session (`taken`) nor by a vmsniff row or name in
/// OVSDB: both modes' sessions share one id space.
fn free_session_id(snapshot: &Snapshot, taken: &BTreeSet<u32>) -> Result<u32, OvsPlanError> {
    let in_ovsdb = snapshot.taken_ids();
    (1..=MAX_SESSION_ID)
        .find(|id| !taken.contains(id) && !in_ovsdb.contains(id))
        .ok_or(OvsPlanError::NoFreeSessionId)
}

/// Refuses a second GRE port toward `remote` with `key`: OVS could not tell the two tunnels
/// apart. A GRE Interface without a `key` option sends key 0.
fn refuse_duplicate_tunnel(snapshot: &Snapshot, remote: IpAddr, key: u32) -> Result<(), OvsPlanError> {
    let duplicate = snapshot.interfaces.iter().find(|i| {
        (i.kind == "gre" || i.kind == "ip6gre")
            && i.options.get("remote_ip").and_then(|ip| ip.parse::<IpAddr>().ok()) == Some(remote)
            && i.options.get("key").map_or("0", String::as_str) == key.to_string()
    });
    match duplicate {
        Some(duplicate) => {
            Err(OvsPlanError::DuplicateTunnel { port: duplicate.row.name.clone(), remote, key })
        }
        None => Ok(()),
    }
}

/// The `external_ids` of the session's rows: what `status`, `detach TAP`/`detach VM` and a
/// restarted daemon read back.
fn external_ids(request: &OvsAttachRequest, id: u32) -> Vec<(&'static str, String)> {
    let mut ids = vec![(SESSION_KEY, id.to_string()), (TAP_KEY, request.tap.clone())];
    if let Some(vm) = &request.vm {
        ids.push((VM_KEY, vm.clone()));
    }
    if let Some(nic) = request.nic {
        ids.push((NIC_KEY, nic.to_string()));
    }
    if let Some(daemon) = &request.daemon {
        ids.push((DAEMON_KEY, daemon.name.clone()));
        ids.push((DAEMON_ARGS_KEY, Value::from(daemon.argv.clone()).to_string()));
    }
    ids.push((CREATED_KEY, request.now.to_string()));
    ids
}

/// The GRE Interface's `options`.
fn gre_options(request: &OvsAttachRequest, key: u32) -> [(&'static str, String); 5] {
    [
        ("remote_ip", request.remote.to_string()),
        ("key", key.to_string()),
        // Copies of full-size frames outgrow the uplink's MTU; with DF set they would be
        // dropped silently. Without it the host fragments them and they arrive whole.
        ("df_default", "false".to_owned()),
        ("ttl", request.ttl.to_string()),
        ("tos", request.tos.to_string()),
    ]
}

/// Which of a Mirror's selections hold the VM's port: `select_src_port` takes the frames the
/// VM sends (`out`), `select_dst_port` those sent to it (`in`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Selects {
    src: bool,
    dst: bool,
}

impl Selects {
    fn of(directions: Directions) -> Self {
        Selects { src: directions != Directions::In, dst: directions != Directions::Out }
    }

    /// The Mirror's `select_src_port` and `select_dst_port` columns, for the port `port_uuid`.
    fn columns(self, port_uuid: &str) -> (Value, Value) {
        let column = |yes: bool| if yes { json!(["set", [["uuid", port_uuid]]]) } else { json!(["set", []]) };
        (column(self.src), column(self.dst))
    }
}

/// The attach transaction: guards on what was read, the new rows, their addition to the
/// bridge, and the `next_cfg` handshake.
fn attach_operations(new: &NewSession, bridge: &BridgeRow, vm_port: &PortRow) -> Vec<Operation> {
    let request = new.request;
    let mut operations = vec![
        Operation::Comment(format!(
            "vmsniff: attach session {}: mirror {} of port {} on {} to {} over GRE port {}",
            new.id, new.mirror, request.vm_port, request.bridge, request.remote, new.gre_port
        )),
        still_named("Bridge", &bridge.row.uuid, &request.bridge),
        still_named("Port", &vm_port.row.uuid, &request.vm_port),
        // Mirror names are not unique in OVSDB: make sure this one is still free.
        Operation::Wait {
            table: "Mirror".into(),
            conditions: vec![Condition { column: "name".into(), function: "==", value: json!(new.mirror) }],
            columns: vec!["name".into()],
            rows: Vec::new(),
        },
    ];
    operations.extend(new_rows(new, &vm_port.row.uuid));
    operations.extend([
        Operation::Mutate {
            table: "Bridge".into(),
            conditions: vec![Condition::uuid(&bridge.row.uuid)],
            mutations: vec![
                Mutation { column: "ports".into(), mutator: "insert", value: named_set("gre_port") },
                Mutation { column: "mirrors".into(), mutator: "insert", value: named_set("mirror") },
            ],
        },
        bump_next_cfg(),
        select_next_cfg(),
    ]);
    operations
}

/// The inserts of the GRE Interface, its Port and the Mirror, which the transaction's later
/// operations name `gre_interface`, `gre_port` and `mirror`.
fn new_rows(new: &NewSession, vm_port_uuid: &str) -> [Operation; 3] {
    let external_ids = datum::to_string_map(new.external_ids.iter().map(|(k, v)| (*k, v.clone())));
    let (select_src_port, select_dst_port) = new.selects.columns(vm_port_uuid);
    [
        Operation::Insert {
            table: "Interface".into(),
            row: json!({
                "name": new.gre_port,
                "type": gre_port_type(new.request.remote),
                "options": datum::to_string_map(new.options.iter().map(|(k, v)| (*k, v.clone()))),
                "external_ids": external_ids,
            }),
            uuid_name: "gre_interface".into(),
        },
        Operation::Insert {
            table: "Port".into(),
            row: json!({
                "name": new.gre_port,
                "interfaces": ["named-uuid", "gre_interface"],
                "external_ids": external_ids,
            }),
            uuid_name: "gre_port".into(),
        },
        Operation::Insert {
            table: "Mirror".into(),
            row: json!({
                "name": new.mirror,
                "select_src_port": select_src_port,
                "select_dst_port": select_dst_port,
                "output_port": ["named-uuid", "gre_port"],
                "external_ids": external_ids,
            }),
            uuid_name: "mirror".into(),
        },
    ]
}

/// The attach as `ovs-vsctl` words, one `--` clause a line.
fn vsctl_lines(new: &NewSession) -> Vec<Vec<String>> {
    let request = new.request;
    let external_ids =
        || new.external_ids.iter().map(|(k, v)| format!("external_ids:{k}={}", vsctl_value(v)));
    let gre_name = format!("name={}", new.gre_port);
    let gre_type = format!("type={}", gre_port_type(new.request.remote));
    let mut interface = words(&["--", "--id=@gi", "create", "Interface", &gre_name, &gre_type]);
    interface.extend(new.options.iter().map(|(k, v)| format!("options:{k}={}", vsctl_value(v))));
    interface.extend(external_ids());
    let mut port = words(&["--", "--id=@gp", "create", "Port", &gre_name, "interfaces=@gi"]);
    port.extend(external_ids());
    let mut mirror = words(&["--", "--id=@m", "create", "Mirror", &format!("name={}", new.mirror)]);
    if new.selects.src {
        mirror.push("select-src-port=@vm".into());
    }
    if new.selects.dst {
        mirror.push("select-dst-port=@vm".into());
    }
    mirror.push("output-port=@gp".into());
    mirror.extend(external_ids());
    vec![
        words(&["ovs-vsctl", "--timeout=30"]),
        interface,
        port,
        words(&["--", "add", "Bridge", &request.bridge, "ports", "@gp"]),
        words(&["--", "--id=@vm", "get", "Port", &request.vm_port]),
        mirror,
        words(&["--", "add", "Bridge", &request.bridge, "mirrors", "@m"]),
    ]
}

fn words(words: &[&str]) -> Vec<String> {
    words.iter().map(|w| (*w).to_owned()).collect()
}

/// One shell command, a line per clause, each word quoted where the shell needs it.
fn shell_lines(lines: &[Vec<String>]) -> String {
    lines
        .iter()
        .map(|words| words.iter().map(|w| shell_word(w)).collect::<Vec<_>>().join(" "))
        .collect::<Vec<_>>()
        .join(" \\\n  ")
}

/// A session's VM came back on a new OVS port (a VM's port is deleted and added again when it
/// reboots hard or migrates back; the Mirror's weak references to the old one are gone).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OvsReselectRequest {
    pub vm_port: String,
    pub directions: Directions,
    /// The VM's tap now, recorded for `status` and `detach TAP`.
    pub tap: String,
}

/// Plans pointing session `session`'s Mirror at the VM's port again, in one transaction: the
/// session keeps its id, GRE port, key and Mirror (and so its statistics). Fails whole if the
/// Mirror or the port changed since `snapshot` was read.
pub fn plan_ovs_reselect(
    session: &OvsSession,
    request: &OvsReselectRequest,
    snapshot: &Snapshot,
) -> Result<Vec<Operation>, OvsPlanError> {
    let mirror = session.mirror.as_ref().ok_or(OvsPlanError::MirrorGone { session: session.id })?;
    let bridge = session.bridges.first().map_or_else(String::new, |b| b.row.name.clone());
    let port = snapshot
        .port_named(&request.vm_port)
        .filter(|p| session.bridges.iter().any(|b| b.ports.contains(&p.row.uuid)))
        .ok_or_else(|| OvsPlanError::NoPort { port: request.vm_port.clone(), bridge })?;
    let (select_src_port, select_dst_port) = Selects::of(request.directions).columns(&port.row.uuid);
    let mut operations = vec![
        Operation::Comment(format!(
            "vmsniff: session {}: mirror {} selects port {} again",
            session.id, mirror.row.name, request.vm_port
        )),
        still_named("Mirror", &mirror.row.uuid, &mirror.row.name),
        still_named("Port", &port.row.uuid, &request.vm_port),
        Operation::Update {
            table: "Mirror".into(),
            conditions: vec![Condition::uuid(&mirror.row.uuid)],
            row: json!({ "select_src_port": select_src_port, "select_dst_port": select_dst_port }),
        },
    ];
    if session.tap() != Some(request.tap.as_str()) {
        let rows =
            [("Mirror", Some(&mirror.row.uuid)), ("Port", session.gre_port.as_ref().map(|p| &p.row.uuid))]
                .into_iter()
                .chain(std::iter::once(("Interface", session.gre_interface.as_ref().map(|i| &i.row.uuid))));
        for (table, uuid) in rows {
            let Some(uuid) = uuid else { continue };
            operations.push(Operation::Mutate {
                table: table.into(),
                conditions: vec![Condition::uuid(uuid)],
                mutations: vec![
                    Mutation {
                        column: "external_ids".into(),
                        mutator: "delete",
                        value: json!(["set", [TAP_KEY]]),
                    },
                    Mutation {
                        column: "external_ids".into(),
                        mutator: "insert",
                        value: datum::to_string_map([(TAP_KEY, request.tap.clone())]),
                    },
                ],
            });
        }
    }
    operations.push(bump_next_cfg());
    operations.push(select_next_cfg());
    Ok(operations)
}

/// Plans the removal of `sessions` in one transaction: exactly their Mirror, Port and
/// Interface rows (found by UUID and checked by name), and their references from bridges.
pub fn plan_ovs_detach(sessions: &[&OvsSession]) -> Vec<Operation> {
    let ids: Vec<String> = sessions.iter().map(|s| s.id.to_string()).collect();
    let mut operations = vec![Operation::Comment(format!("vmsniff: detach session(s) {}", ids.join(", ")))];
    for session in sessions {
        if let Some(mirror) = &session.mirror {
            operations.push(still_named("Mirror", &mirror.row.uuid, &mirror.row.name));
            for bridge in session.bridges.iter().filter(|b| b.mirrors.contains(&mirror.row.uuid)) {
                operations.push(Operation::Mutate {
                    table: "Bridge".into(),
                    conditions: vec![Condition::uuid(&bridge.row.uuid)],
                    mutations: vec![Mutation {
                        column: "mirrors".into(),
                        mutator: "delete",
                        value: datum::uuid_set([mirror.row.uuid.as_str()]),
                    }],
                });
            }
            operations.push(Operation::Delete {
                table: "Mirror".into(),
                conditions: vec![Condition::uuid(&mirror.row.uuid)],
            });
        }
        if let Some(port) = &session.gre_port {
            operations.push(still_named("Port", &port.row.uuid, &port.row.name));
            for bridge in session.bridges.iter().filter(|b| b.ports.contains(&port.row.uuid)) {
                operations.push(Operation::Mutate {
                    table: "Bridge".into(),
                    conditions: vec![Condition::uuid(&bridge.row.uuid)],
                    mutations: vec![Mutation {
                        column: "ports".into(),
                        mutator: "delete",
                        value: datum::uuid_set([port.row.uuid.as_str()]),
                    }],
                });
            }
            operations.push(Operation::Delete {
                table: "Port".into(),
                conditions: vec![Condition::uuid(&port.row.uuid)],
            });
            for interface in &port.interfaces {
                operations.push(Operation::Delete {
                    table: "Interface".into(),
                    conditions: vec![Condition::uuid(interface)],
                });
            }
        }
    }
    operations.push(bump_next_cfg());
    operations.push(select_next_cfg());
    operations
}

/// Fails the transaction unless row `uuid` of `table` still exists with this name.
fn still_named(table: &str, uuid: &str, name: &str) -> Operation {
    Operation::Wait {
        table: table.into(),
        conditions: vec![Condition::uuid(uuid)],
        columns: vec!["name".into()],
        rows: vec![json!({ "name": name })],
    }
}

fn named_set(name: &str) -> Value {
    json!(["set", [["named-uuid", name]]])
}

/// Asks ovs-vswitchd to report when it has applied this transaction (as ovs-vsctl does).
fn bump_next_cfg() -> Operation {
    Operation::Mutate {
        table: "Open_vSwitch".into(),
        conditions: Vec::new(),
        mutations: vec![Mutation { column: "next_cfg".into(), mutator: "+=", value: json!(1) }],
    }
}

fn select_next_cfg() -> Operation {
    Operation::Select {
        table: "Open_vSwitch".into(),
        conditions: Vec::new(),
        columns: Some(vec!["next_cfg".into()]),
    }
}

/// The `next_cfg` the transaction's last result holds.
pub fn next_cfg(results: &[Value]) -> Option<i64> {
    results.last()?.get("rows")?.get(0)?.get("next_cfg")?.as_i64()
}

/// An ovs-vsctl value: bare when it is a plain word, else in ovs-vsctl's double quotes.
fn vsctl_value(value: &str) -> String {
    if !value.is_empty() && value.chars().all(|c| c.is_ascii_alphanumeric() || "-_.:".contains(c)) {
        value.to_owned()
    } else {
        format!("\"{}\"", value.replace('\\', "\\\\").replace('"', "\\\""))
    }
}

/// A shell word: bare when safe, else in single quotes.
fn shell_word(word: &str) -> String {
    if !word.is_empty() && word.chars().all(|c| c.is_ascii_alphanumeric() || "-_.:=@/,+".contains(c)) {
        word.to_owned()
    } else {
        format!("'{}'", word.replace('\'', "'\\''"))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::ovs::session::{BridgeRow, InterfaceRow, MirrorRow, PortRow, Row};

    fn row(uuid: &str, name: &str) -> Row {
        Row { uuid: uuid.into(), name: name.into(), external_ids: BTreeMap::new() }
    }

    /// br-int with the VM's qvo, someone's mirror "span0" to port "span-out", and br-ex.
    fn snapshot() -> Snapshot {
        Snapshot {
            bridges: vec![
                BridgeRow {
                    row: row("b-int", "br-int"),
                    ports: vec!["p-qvo".into(), "p-span".into()],
                    mirrors: vec!["m-span".into()],
                },
                BridgeRow { row: row("b-ex", "br-ex"), ports: vec!["p-ex".into()], mirrors: Vec::new() },
            ],
            ports: vec![
                PortRow { row: row("p-qvo", "qvof7eae624-34"), interfaces: vec!["i-qvo".into()] },
                PortRow { row: row("p-span", "span-out"), interfaces: vec!["i-span".into()] },
                PortRow { row: row("p-ex", "eth1"), interfaces: vec!["i-ex".into()] },
            ],
            interfaces: vec![
                InterfaceRow { row: row("i-qvo", "qvof7eae624-34"), ..Default::default() },
                InterfaceRow {
                    row: row("i-span", "span-out"),
                    kind: "gre".into(),
                    options: BTreeMap::from([
                        ("remote_ip".into(), "192.0.2.9".into()),
                        ("key".into(), "5".into()),
                    ]),
                    ..Default::default()
                },
            ],
            mirrors: vec![MirrorRow {
                row: row("m-span", "span0"),
                select_src_port: vec!["p-qvo".into()],
                output_port: Some("p-span".into()),
                ..Default::default()
            }],
        }
    }

    fn request() -> OvsAttachRequest {
        OvsAttachRequest {
            bridge: "br-int".into(),
            vm_port: "qvof7eae624-34".into(),
            remote: IpAddr::from([192, 0, 2, 2]),
            key: None,
            ttl: 64,
            tos: 0,
            directions: Directions::Both,
            tap: "tapf7eae624-34".into(),
            vm: Some("c-private".into()),
            nic: None,
            daemon: None,
            now: 1_700_000_000,
        }
    }

    fn json(operations: &[Operation]) -> Vec<Value> {
        operations.iter().map(Operation::to_json).collect()
    }

    #[test]
    fn an_ipv6_collector_gets_an_ip6gre_port() {
        let remote: IpAddr = "2001:db8::2".parse().unwrap();
        let plan = plan_ovs_attach(&OvsAttachRequest { remote, ..request() }, &snapshot(), &BTreeSet::new())
            .unwrap();
        let ops = json(&plan.operations);
        assert_eq!(ops[4]["row"]["type"], "ip6gre");
        assert_eq!(ops[4]["row"]["options"][1][0], json!(["remote_ip", "2001:db8::2"]));
        assert!(
            plan.vsctl.contains("type=ip6gre options:remote_ip=2001:db8::2 options:key=1"),
            "{}",
            plan.vsctl
        );
    }

    #[test]
    fn attach_inserts_its_rows_and_adds_them_to_the_bridge_without_replacing_anything() {
        let plan = plan_ovs_attach(&request(), &snapshot(), &BTreeSet::new()).unwrap();
        assert_eq!((plan.id, plan.key), (1, 1));
        assert_eq!((plan.gre_port.as_str(), plan.mirror.as_str()), ("vms1-ovs", "vmsniff-1"));
        let ops = json(&plan.operations);
        let kinds: Vec<&str> = ops.iter().map(|o| o["op"].as_str().unwrap()).collect();
        assert_eq!(
            kinds,
            ["comment", "wait", "wait", "wait", "insert", "insert", "insert", "mutate", "mutate", "select"]
        );
        // Nothing is ever set wholesale: the bridge's other ports and mirrors stay.
        assert!(ops.iter().all(|o| o["op"] != "update"));
        assert_eq!(
            ops[7],
            json!({"op": "mutate", "table": "Bridge", "where": [["_uuid", "==", ["uuid", "b-int"]]],
                   "mutations": [["ports", "insert", ["set", [["named-uuid", "gre_port"]]]],
                                 ["mirrors", "insert", ["set", [["named-uuid", "mirror"]]]]]})
        );
        let interface = &ops[4];
        assert_eq!(
            (interface["table"].as_str(), interface["uuid-name"].as_str()),
            (Some("Interface"), Some("gre_interface"))
        );
        assert_eq!(interface["row"]["type"], "gre");
        assert_eq!(
            interface["row"]["options"],
            json!([
                "map",
                [
                    ["remote_ip", "192.0.2.2"],
                    ["key", "1"],
                    ["df_default", "false"],
                    ["ttl", "64"],
                    ["tos", "0"]
                ]
            ])
        );
        assert_eq!(ops[5]["row"]["interfaces"], json!(["named-uuid", "gre_interface"]));
        let mirror = &ops[6]["row"];
        assert_eq!(mirror["name"], "vmsniff-1");
        assert_eq!(mirror["select_src_port"], json!(["set", [["uuid", "p-qvo"]]]));
        assert_eq!(mirror["select_dst_port"], json!(["set", [["uuid", "p-qvo"]]]));
        assert_eq!(mirror["output_port"], json!(["named-uuid", "gre_port"]));
        assert_eq!(
            mirror["external_ids"],
            json!([
                "map",
                [
                    ["vmsniff-session", "1"],
                    ["vmsniff-tap", "tapf7eae624-34"],
                    ["vmsniff-vm", "c-private"],
                    ["vmsniff-created-at", "1700000000"]
                ]
            ])
        );
        // Guards: the bridge and the VM's port as read, and the mirror name still free.
        assert_eq!(ops[1]["where"], json!([["_uuid", "==", ["uuid", "b-int"]]]));
        assert_eq!(ops[1]["rows"], json!([{"name": "br-int"}]));
        assert_eq!(ops[2]["rows"], json!([{"name": "qvof7eae624-34"}]));
        assert_eq!(ops[3]["where"], json!([["name", "==", "vmsniff-1"]]));
        assert_eq!(ops[3]["rows"], json!([]));
        assert_eq!(ops[8]["mutations"], json!([["next_cfg", "+=", 1]]));
    }

    #[test]
    fn the_daemons_sessions_record_their_config_session_and_arguments() {
        let argv = vec!["c-private".to_owned(), "--to".to_owned(), "192.0.2.2".to_owned()];
        let request = OvsAttachRequest {
            daemon: Some(DaemonOwner { name: "ids".into(), argv: argv.clone() }),
            ..request()
        };
        let plan = plan_ovs_attach(&request, &snapshot(), &BTreeSet::new()).unwrap();
        let ops = json(&plan.operations);
        let ids = ops[6]["row"]["external_ids"][1].as_array().unwrap().clone();
        let get = |key: &str| ids.iter().find(|p| p[0] == key).map(|p| p[1].as_str().unwrap().to_owned());
        assert_eq!(get(DAEMON_KEY).as_deref(), Some("ids"));
        let recorded: Vec<String> = serde_json::from_str(&get(DAEMON_ARGS_KEY).unwrap()).unwrap();
        assert_eq!(recorded, argv);
    }

    #[test]
    fn directions_select_the_vm_port_on_their_side() {
        for (directions, src, dst) in [(Directions::Out, true, false), (Directions::In, false, true)] {
            let plan =
                plan_ovs_attach(&OvsAttachRequest { directions, ..request() }, &snapshot(), &BTreeSet::new())
                    .unwrap();
            let mirror = &json(&plan.operations)[6]["row"];
            let set = |yes| if yes { json!(["set", [["uuid", "p-qvo"]]]) } else { json!(["set", []]) };
            assert_eq!(mirror["select_src_port"], set(src), "{directions:?}");
            assert_eq!(mirror["select_dst_port"], set(dst), "{directions:?}");
            assert_eq!(plan.vsctl.contains("select-src-port=@vm"), src);
            assert_eq!(plan.vsctl.contains("select-dst-port=@vm"), dst);
        }
    }

    #[test]
    fn ids_skip_ebpf_sessions_and_vmsniff_rows_and_names() {
        let mut snapshot = snapshot();
        snapshot.mirrors.push(MirrorRow {
            row: Row {
                external_ids: BTreeMap::from([(SESSION_KEY.into(), "2".into())]),
                ..row("m-2", "vmsniff-2")
            },
            ..Default::default()
        });
        // Someone else's port with vmsniff's name for id 3.
        snapshot.ports.push(PortRow { row: row("p-3", "vms3-ovs"), interfaces: Vec::new() });
        let plan = plan_ovs_attach(&request(), &snapshot, &BTreeSet::from([1, 4])).unwrap();
        assert_eq!((plan.id, plan.key), (5, 5));
        let plan =
            plan_ovs_attach(&OvsAttachRequest { key: Some(77), ..request() }, &snapshot, &BTreeSet::new())
                .unwrap();
        assert_eq!((plan.id, plan.key), (1, 77));
        let all: BTreeSet<u32> = (1..=MAX_SESSION_ID).collect();
        assert_eq!(plan_ovs_attach(&request(), &snapshot, &all).unwrap_err(), OvsPlanError::NoFreeSessionId);
    }

    #[test]
    fn bad_requests_are_refused_by_name() {
        let snapshot = snapshot();
        let none = BTreeSet::new();
        let err =
            plan_ovs_attach(&OvsAttachRequest { bridge: "br-nope".into(), ..request() }, &snapshot, &none);
        assert!(matches!(err, Err(OvsPlanError::NoBridge { .. })));
        // A port of another bridge is not on this one.
        let err =
            plan_ovs_attach(&OvsAttachRequest { vm_port: "eth1".into(), ..request() }, &snapshot, &none);
        assert!(matches!(err, Err(OvsPlanError::NoPort { .. })));
        let err = plan_ovs_attach(
            &OvsAttachRequest { remote: IpAddr::from([192, 0, 2, 9]), key: Some(5), ..request() },
            &snapshot,
            &none,
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "GRE port span-out already sends to 192.0.2.9 with key 5; OVS cannot tell two such tunnels apart: choose another --key"
        );
    }

    #[test]
    fn a_gre_port_without_a_key_option_sends_key_0() {
        let mut snapshot = snapshot();
        let remote = IpAddr::from([192, 0, 2, 9]);
        snapshot.interfaces[1].options.remove("key");
        assert_eq!(
            refuse_duplicate_tunnel(&snapshot, remote, 0),
            Err(OvsPlanError::DuplicateTunnel { port: "span-out".into(), remote, key: 0 })
        );
        assert_eq!(refuse_duplicate_tunnel(&snapshot, remote, 5), Ok(()));
        // Only GRE interfaces are tunnels OVS must tell apart.
        snapshot.interfaces[1].kind = "vxlan".into();
        assert_eq!(refuse_duplicate_tunnel(&snapshot, remote, 0), Ok(()));
    }

    #[test]
    fn external_ids_record_what_is_known_and_always_the_session_tap_and_time() {
        let bare = OvsAttachRequest { vm: None, nic: None, ..request() };
        let keys = |ids: Vec<(&'static str, String)>| ids.into_iter().map(|(k, _)| k).collect::<Vec<_>>();
        assert_eq!(keys(external_ids(&bare, 3)), [SESSION_KEY, TAP_KEY, CREATED_KEY]);
        let daemon = Some(DaemonOwner { name: "ids".into(), argv: Vec::new() });
        let full = OvsAttachRequest { nic: Some(1), daemon, ..request() };
        assert_eq!(
            external_ids(&full, 3),
            [
                (SESSION_KEY, "3".to_owned()),
                (TAP_KEY, "tapf7eae624-34".to_owned()),
                (VM_KEY, "c-private".to_owned()),
                (NIC_KEY, "1".to_owned()),
                (DAEMON_KEY, "ids".to_owned()),
                (DAEMON_ARGS_KEY, "[]".to_owned()),
                (CREATED_KEY, "1700000000".to_owned()),
            ]
        );
    }

    #[test]
    fn out_selects_the_vm_ports_arriving_frames_and_in_its_departing_ones() {
        assert_eq!(Selects::of(Directions::Out), Selects { src: true, dst: false });
        assert_eq!(Selects::of(Directions::In), Selects { src: false, dst: true });
        assert_eq!(Selects::of(Directions::Both), Selects { src: true, dst: true });
    }

    #[test]
    fn detach_removes_exactly_the_sessions_rows() {
        let ids = BTreeMap::from([(SESSION_KEY.to_owned(), "1".to_owned())]);
        let snapshot = with_session(1, ids, &["p-qvo"]);
        let sessions = snapshot.sessions();
        assert_eq!(sessions.keys().copied().collect::<Vec<_>>(), [1]);
        let session = &sessions[&1];
        assert_eq!(
            (session.vm_port.as_deref(), session.directions),
            (Some("qvof7eae624-34"), Some(Directions::Both))
        );
        let ops = json(&plan_ovs_detach(&[session]));
        let kinds: Vec<&str> = ops.iter().map(|o| o["op"].as_str().unwrap()).collect();
        assert_eq!(
            kinds,
            ["comment", "wait", "mutate", "delete", "wait", "mutate", "delete", "delete", "mutate", "select"]
        );
        assert_eq!(ops[2]["mutations"], json!([["mirrors", "delete", ["set", [["uuid", "m-1"]]]]]));
        assert_eq!(ops[5]["mutations"], json!([["ports", "delete", ["set", [["uuid", "p-gre"]]]]]));
        let deleted: Vec<&Value> =
            ops.iter().filter(|o| o["op"] == "delete").map(|o| &o["where"][0][2][1]).collect();
        assert_eq!(deleted, [&json!("m-1"), &json!("p-gre"), &json!("i-gre")]);
        // Someone else's mirror and port are never named.
        let text = serde_json::to_string(&ops).unwrap();
        assert!(!text.contains("m-span") && !text.contains("p-span") && !text.contains("p-qvo"));
    }

    /// The snapshot with vmsniff session `id` on br-int: its GRE port, interface and Mirror,
    /// each carrying `ids`, the Mirror selecting the ports `selected` both ways.
    fn with_session(id: u32, ids: BTreeMap<String, String>, selected: &[&str]) -> Snapshot {
        let mut snapshot = snapshot();
        let (gre, mirror) = (gre_port_name(id), mirror_name(id));
        let mirror_uuid = format!("m-{id}");
        snapshot.bridges[0].ports.push("p-gre".into());
        snapshot.bridges[0].mirrors.push(mirror_uuid.clone());
        snapshot.ports.push(PortRow {
            row: Row { external_ids: ids.clone(), ..row("p-gre", &gre) },
            interfaces: vec!["i-gre".into()],
        });
        snapshot.interfaces.push(InterfaceRow {
            row: Row { external_ids: ids.clone(), ..row("i-gre", &gre) },
            kind: "gre".into(),
            ..Default::default()
        });
        let selected: Vec<String> = selected.iter().map(|p| p.to_string()).collect();
        snapshot.mirrors.push(MirrorRow {
            row: Row { external_ids: ids, ..row(&mirror_uuid, &mirror) },
            select_src_port: selected.clone(),
            select_dst_port: selected,
            output_port: Some("p-gre".into()),
            ..Default::default()
        });
        snapshot
    }

    /// The snapshot with session 4 of the daemon's config session "ids", whose Mirror lost
    /// the VM's port (deleted with its VM) and now selects nothing.
    fn with_orphaned_mirror() -> Snapshot {
        let ids = BTreeMap::from([
            (SESSION_KEY.to_owned(), "4".to_owned()),
            (TAP_KEY.to_owned(), "tapold".to_owned()),
            (DAEMON_KEY.to_owned(), "ids".to_owned()),
        ]);
        with_session(4, ids, &[])
    }

    #[test]
    fn reselect_points_the_same_mirror_at_the_new_port_and_records_the_tap() {
        let snapshot = with_orphaned_mirror();
        let sessions = snapshot.sessions();
        assert_eq!((sessions[&4].vm_port.as_deref(), sessions[&4].daemon()), (None, Some("ids")));
        let request = OvsReselectRequest {
            vm_port: "qvof7eae624-34".into(),
            directions: Directions::Out,
            tap: "tapf7eae624-34".into(),
        };
        let ops = json(&plan_ovs_reselect(&sessions[&4], &request, &snapshot).unwrap());
        let kinds: Vec<&str> = ops.iter().map(|o| o["op"].as_str().unwrap()).collect();
        assert_eq!(
            kinds,
            ["comment", "wait", "wait", "update", "mutate", "mutate", "mutate", "mutate", "select"]
        );
        assert_eq!(ops[1]["where"], json!([["_uuid", "==", ["uuid", "m-4"]]]));
        assert_eq!(ops[2]["rows"], json!([{"name": "qvof7eae624-34"}]));
        assert_eq!(
            ops[3],
            json!({"op": "update", "table": "Mirror", "where": [["_uuid", "==", ["uuid", "m-4"]]],
                   "row": {"select_src_port": ["set", [["uuid", "p-qvo"]]], "select_dst_port": ["set", []]}})
        );
        assert_eq!(
            ops[4]["mutations"],
            json!([
                ["external_ids", "delete", ["set", ["vmsniff-tap"]]],
                ["external_ids", "insert", ["map", [["vmsniff-tap", "tapf7eae624-34"]]]]
            ])
        );
        let tables: Vec<&str> = ops[4..7].iter().map(|o| o["table"].as_str().unwrap()).collect();
        assert_eq!(tables, ["Mirror", "Port", "Interface"]);

        // The same tap: nothing to record.
        let same = OvsReselectRequest { tap: "tapold".into(), ..request.clone() };
        assert_eq!(plan_ovs_reselect(&sessions[&4], &same, &snapshot).unwrap().len(), 6);
    }

    #[test]
    fn reselect_refuses_a_port_elsewhere_and_a_lost_mirror() {
        let mut snapshot = with_orphaned_mirror();
        let request =
            OvsReselectRequest { vm_port: "eth1".into(), directions: Directions::Both, tap: "tapx".into() };
        assert_eq!(
            plan_ovs_reselect(&snapshot.sessions()[&4], &request, &snapshot).unwrap_err(),
            OvsPlanError::NoPort { port: "eth1".into(), bridge: "br-int".into() }
        );
        snapshot.mirrors.retain(|m| m.row.uuid != "m-4");
        let request = OvsReselectRequest { vm_port: "qvof7eae624-34".into(), ..request };
        assert_eq!(
            plan_ovs_reselect(&snapshot.sessions()[&4], &request, &snapshot).unwrap_err(),
            OvsPlanError::MirrorGone { session: 4 }
        );
    }

    #[test]
    fn a_session_whose_mirror_was_cleared_still_has_its_port_removed() {
        let mut snapshot = snapshot();
        let ids = BTreeMap::from([(SESSION_KEY.to_owned(), "4".to_owned())]);
        snapshot.bridges[0].ports.push("p-gre".into());
        snapshot.ports.push(PortRow {
            row: Row { external_ids: ids, ..row("p-gre", "vms4-ovs") },
            interfaces: vec!["i-gre".into()],
        });
        let sessions = snapshot.sessions();
        let ops = json(&plan_ovs_detach(&[&sessions[&4]]));
        let kinds: Vec<&str> = ops.iter().map(|o| o["op"].as_str().unwrap()).collect();
        assert_eq!(kinds, ["comment", "wait", "mutate", "delete", "delete", "mutate", "select"]);
    }

    #[test]
    fn names_carry_the_id() {
        assert_eq!(gre_port_name(1023), "vms1023-ovs");
        assert!(gre_port_name(1023).len() <= 15);
        for (name, id) in [
            ("vms7-ovs", Some(7)),
            ("vmsniff-12", Some(12)),
            ("vms-ovs", None),
            ("vms1-out", None),
            ("qvo1", None),
        ] {
            assert_eq!(id_in_name(name), id, "{name}");
        }
    }

    #[test]
    fn the_vsctl_equivalent_quotes_what_needs_quoting() {
        let plan = plan_ovs_attach(
            &OvsAttachRequest { vm: Some("web 1's".into()), ..request() },
            &snapshot(),
            &BTreeSet::new(),
        )
        .unwrap();
        assert!(plan.vsctl.starts_with("ovs-vsctl --timeout=30 \\\n  -- --id=@gi create Interface name=vms1-ovs type=gre options:remote_ip=192.0.2.2 options:key=1 options:df_default=false"), "{}", plan.vsctl);
        assert!(plan.vsctl.contains(r#"'external_ids:vmsniff-vm="web 1'\''s"'"#), "{}", plan.vsctl);
        assert!(plan.vsctl.ends_with("-- add Bridge br-int mirrors @m"), "{}", plan.vsctl);
    }
}
