//! What OVS mode reads from the Open_vSwitch database: bridges, ports, interfaces and mirrors,
//! and vmsniff's own mirror sessions among them. OVSDB is the one record of OVS mode (no
//! files): every row vmsniff creates carries `external_ids:vmsniff-session=<id>`.
use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;

use crate::model::mirror::Directions;
use crate::ovsdb::{Client, Operation, OvsdbError, datum, vswitch::DATABASE};

/// `external_ids` keys on vmsniff's rows (Mirror, Port, Interface).
pub const SESSION_KEY: &str = "vmsniff-session";
pub const TAP_KEY: &str = "vmsniff-tap";
pub const VM_KEY: &str = "vmsniff-vm";
pub const NIC_KEY: &str = "vmsniff-nic";
pub const CREATED_KEY: &str = "vmsniff-created-at";
/// The `vmsniff daemon` config session that keeps this session; absent on `vmsniff attach`'s.
pub const DAEMON_KEY: &str = "vmsniff-daemon-session";
/// The attach arguments the daemon made it from, a JSON array of strings.
pub const DAEMON_ARGS_KEY: &str = "vmsniff-daemon-args";

/// What every table's rows have in common here.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Row {
    pub uuid: String,
    pub name: String,
    pub external_ids: BTreeMap<String, String>,
}

impl Row {
    /// The vmsniff session that owns this row, if any.
    pub fn session(&self) -> Option<u32> {
        self.external_ids.get(SESSION_KEY)?.parse().ok()
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BridgeRow {
    pub row: Row,
    pub ports: Vec<String>,
    pub mirrors: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PortRow {
    pub row: Row,
    pub interfaces: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct InterfaceRow {
    pub row: Row,
    /// `type`: empty for a system interface, `internal`, `gre`, ...
    pub kind: String,
    pub options: BTreeMap<String, String>,
    /// Why ovs-vswitchd could not set the interface up, if it could not.
    pub error: Option<String>,
    pub ofport: Option<i64>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MirrorRow {
    pub row: Row,
    pub select_src_port: Vec<String>,
    pub select_dst_port: Vec<String>,
    pub output_port: Option<String>,
    /// `tx_packets`, `tx_bytes`: copies ovs-vswitchd sent (updated every few seconds).
    pub statistics: BTreeMap<String, i64>,
}

/// The four tables, read in one transaction so they agree.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub bridges: Vec<BridgeRow>,
    pub ports: Vec<PortRow>,
    pub interfaces: Vec<InterfaceRow>,
    pub mirrors: Vec<MirrorRow>,
}

/// One vmsniff OVS session as OVSDB holds it now. A session may have lost rows to someone
/// else's hand (`ovs-vsctl clear bridge br-int mirrors` takes its Mirror and leaves its port):
/// every part is optional.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OvsSession {
    pub id: u32,
    pub mirror: Option<MirrorRow>,
    /// The GRE port and its interface.
    pub gre_port: Option<PortRow>,
    pub gre_interface: Option<InterfaceRow>,
    /// The bridges holding the mirror or the GRE port (one, unless edited by hand).
    pub bridges: Vec<BridgeRow>,
    /// The mirrored port's name (the VM's qvo or tap).
    pub vm_port: Option<String>,
    pub directions: Option<Directions>,
}

impl OvsSession {
    fn new(id: u32) -> Self {
        OvsSession {
            id,
            mirror: None,
            gre_port: None,
            gre_interface: None,
            bridges: Vec::new(),
            vm_port: None,
            directions: None,
        }
    }

    fn ids(&self) -> &BTreeMap<String, String> {
        let row = self
            .mirror
            .as_ref()
            .map(|m| &m.row)
            .or(self.gre_port.as_ref().map(|p| &p.row))
            .or(self.gre_interface.as_ref().map(|i| &i.row));
        static EMPTY: BTreeMap<String, String> = BTreeMap::new();
        row.map_or(&EMPTY, |r| &r.external_ids)
    }

    pub fn external_id(&self, key: &str) -> Option<&str> {
        self.ids().get(key).map(String::as_str)
    }

    pub fn tap(&self) -> Option<&str> {
        self.external_id(TAP_KEY)
    }

    pub fn vm(&self) -> Option<&str> {
        self.external_id(VM_KEY)
    }

    /// The daemon's config session that keeps it, if the daemon made it.
    pub fn daemon(&self) -> Option<&str> {
        self.external_id(DAEMON_KEY)
    }

    /// The attach arguments the daemon made it from.
    pub fn daemon_args(&self) -> Option<Vec<String>> {
        serde_json::from_str(self.external_id(DAEMON_ARGS_KEY)?).ok()
    }

    pub fn created_at(&self) -> u64 {
        self.ids().get(CREATED_KEY).and_then(|t| t.parse().ok()).unwrap_or(0)
    }

    pub fn option(&self, key: &str) -> Option<&str> {
        self.gre_interface.as_ref()?.options.get(key).map(String::as_str)
    }

    pub fn statistic(&self, key: &str) -> u64 {
        self.mirror.as_ref().and_then(|m| m.statistics.get(key)).map_or(0, |&v| v.max(0) as u64)
    }
}

impl Snapshot {
    pub fn read(client: &mut Client) -> Result<Snapshot, OvsdbError> {
        let select = |table: &str, columns: &[&str]| Operation::Select {
            table: table.into(),
            conditions: Vec::new(),
            columns: Some(columns.iter().map(|c| c.to_string()).collect()),
        };
        let results = client.transact(
            DATABASE,
            &[
                select("Bridge", &["name", "external_ids", "ports", "mirrors"]),
                select("Port", &["name", "external_ids", "interfaces"]),
                select("Interface", &["name", "external_ids", "type", "options", "error", "ofport"]),
                select(
                    "Mirror",
                    &[
                        "name",
                        "external_ids",
                        "select_src_port",
                        "select_dst_port",
                        "output_port",
                        "statistics",
                    ],
                ),
            ],
        )?;
        let mut tables = results.into_iter().map(crate::ovsdb::rows);
        let mut next = || tables.next().unwrap_or_else(|| Ok(Vec::new()));
        let bridges = next()?
            .iter()
            .map(|r| Ok(BridgeRow { row: row(r)?, ports: uuids(&r["ports"]), mirrors: uuids(&r["mirrors"]) }))
            .collect::<Result<_, OvsdbError>>()?;
        let ports = next()?
            .iter()
            .map(|r| Ok(PortRow { row: row(r)?, interfaces: uuids(&r["interfaces"]) }))
            .collect::<Result<_, OvsdbError>>()?;
        let interfaces = next()?
            .iter()
            .map(|r| {
                Ok(InterfaceRow {
                    row: row(r)?,
                    kind: r["type"].as_str().unwrap_or_default().to_owned(),
                    options: string_map(&r["options"]),
                    error: datum::set(&r["error"]).first().and_then(|e| e.as_str()).map(str::to_owned),
                    ofport: datum::optional_integer(&r["ofport"]),
                })
            })
            .collect::<Result<_, OvsdbError>>()?;
        let mirrors = next()?
            .iter()
            .map(|r| {
                Ok(MirrorRow {
                    row: row(r)?,
                    select_src_port: uuids(&r["select_src_port"]),
                    select_dst_port: uuids(&r["select_dst_port"]),
                    output_port: uuids(&r["output_port"]).into_iter().next(),
                    statistics: datum::integer_map(&r["statistics"])
                        .into_iter()
                        .map(|(k, v)| (k.to_owned(), v))
                        .collect(),
                })
            })
            .collect::<Result<_, OvsdbError>>()?;
        Ok(Snapshot { bridges, ports, interfaces, mirrors })
    }

    pub fn port(&self, uuid: &str) -> Option<&PortRow> {
        self.ports.iter().find(|p| p.row.uuid == uuid)
    }

    pub fn port_named(&self, name: &str) -> Option<&PortRow> {
        self.ports.iter().find(|p| p.row.name == name)
    }

    pub fn interface(&self, uuid: &str) -> Option<&InterfaceRow> {
        self.interfaces.iter().find(|i| i.row.uuid == uuid)
    }

    pub fn bridge_named(&self, name: &str) -> Option<&BridgeRow> {
        self.bridges.iter().find(|b| b.row.name == name)
    }

    /// The port holding an interface, and the bridge holding that port.
    pub fn port_of_interface(&self, interface_uuid: &str) -> Option<(&PortRow, Option<&BridgeRow>)> {
        let port = self.ports.iter().find(|p| p.interfaces.iter().any(|i| i == interface_uuid))?;
        Some((port, self.bridges.iter().find(|b| b.ports.contains(&port.row.uuid))))
    }

    /// Every session id vmsniff rows hold, and every id whose names (`vms<id>-ovs`,
    /// `vmsniff-<id>`) someone else took: OVS mode cannot use those.
    pub fn taken_ids(&self) -> BTreeSet<u32> {
        let rows = self
            .mirrors
            .iter()
            .map(|m| &m.row)
            .chain(self.ports.iter().map(|p| &p.row))
            .chain(self.interfaces.iter().map(|i| &i.row));
        let mut ids = BTreeSet::new();
        for row in rows {
            ids.extend(row.session());
            ids.extend(crate::ovs::plan::id_in_name(&row.name));
        }
        ids
    }

    /// vmsniff's sessions, by id.
    pub fn sessions(&self) -> BTreeMap<u32, OvsSession> {
        let mut sessions = BTreeMap::new();
        for mirror in &self.mirrors {
            let Some(id) = mirror.row.session() else { continue };
            let session = sessions.entry(id).or_insert_with(|| OvsSession::new(id));
            let src = mirror.select_src_port.first();
            let dst = mirror.select_dst_port.first();
            session.vm_port = src.or(dst).and_then(|u| self.port(u)).map(|p| p.row.name.clone());
            session.directions = match (src.is_some(), dst.is_some()) {
                (true, true) => Some(Directions::Both),
                (true, false) => Some(Directions::Out),
                (false, true) => Some(Directions::In),
                (false, false) => None,
            };
            session.mirror = Some(mirror.clone());
        }
        for port in &self.ports {
            let Some(id) = port.row.session() else { continue };
            let session = sessions.entry(id).or_insert_with(|| OvsSession::new(id));
            session.gre_interface = port.interfaces.first().and_then(|u| self.interface(u)).cloned();
            session.gre_port = Some(port.clone());
        }
        for session in sessions.values_mut() {
            let mirror = session.mirror.as_ref().map(|m| m.row.uuid.clone());
            let port = session.gre_port.as_ref().map(|p| p.row.uuid.clone());
            session.bridges = self
                .bridges
                .iter()
                .filter(|b| {
                    mirror.as_ref().is_some_and(|m| b.mirrors.contains(m))
                        || port.as_ref().is_some_and(|p| b.ports.contains(p))
                })
                .cloned()
                .collect();
        }
        sessions
    }
}

/// The `next_cfg`/`cur_cfg` pair of the Open_vSwitch row: ovs-vswitchd copies next_cfg to
/// cur_cfg once it has applied the database up to that change.
pub fn cur_cfg(client: &mut Client) -> Result<i64, OvsdbError> {
    let select = Operation::Select {
        table: "Open_vSwitch".into(),
        conditions: Vec::new(),
        columns: Some(vec!["cur_cfg".into()]),
    };
    let rows = crate::ovsdb::rows(client.transact(DATABASE, &[select])?.remove(0))?;
    rows.first()
        .and_then(|r| r["cur_cfg"].as_i64())
        .ok_or_else(|| OvsdbError::Malformed { what: "the Open_vSwitch row", found: format!("{rows:?}") })
}

fn row(value: &Value) -> Result<Row, OvsdbError> {
    let malformed = || OvsdbError::Malformed { what: "a row", found: value.to_string() };
    Ok(Row {
        uuid: datum::uuid(&value["_uuid"]).ok_or_else(malformed)?.to_owned(),
        name: value["name"].as_str().ok_or_else(malformed)?.to_owned(),
        external_ids: string_map(&value["external_ids"]),
    })
}

fn string_map(value: &Value) -> BTreeMap<String, String> {
    datum::string_map(value).into_iter().map(|(k, v)| (k.to_owned(), v.to_owned())).collect()
}

fn uuids(value: &Value) -> Vec<String> {
    datum::set(value).into_iter().filter_map(datum::uuid).map(str::to_owned).collect()
}
