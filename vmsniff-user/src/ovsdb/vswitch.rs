//! The Open_vSwitch database's Bridge, Port and Interface tables, as far as finding a VM's
//! port goes: which Interface carries a Neutron port (external_ids), and its Port and Bridge.
use serde::Serialize;
use serde_json::Value;

use super::{Client, Operation, OvsdbError, datum};
use crate::model::mac::Mac;

pub const DATABASE: &str = "Open_vSwitch";

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InterfaceRow {
    pub uuid: String,
    pub name: String,
    /// `external_ids:iface-id`: the Neutron port id.
    pub iface_id: Option<String>,
    pub attached_mac: Option<Mac>,
    pub vm_uuid: Option<String>,
    pub ofport: Option<i64>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortRow {
    pub uuid: String,
    pub name: String,
    pub interfaces: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BridgeRow {
    pub uuid: String,
    pub name: String,
    pub ports: Vec<String>,
}

/// A snapshot of the three tables, read in one transaction so they agree.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Switch {
    pub interfaces: Vec<InterfaceRow>,
    pub ports: Vec<PortRow>,
    pub bridges: Vec<BridgeRow>,
}

/// How a VM NIC's OVS interface was found.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum FoundBy {
    /// `external_ids:iface-id` is the NIC's Neutron port id.
    IfaceId,
    /// `external_ids:attached-mac` is the NIC's MAC.
    AttachedMac,
    /// OVSDB could not be read: the name follows Nova's convention (tapXXXX → qvoXXXX), unchecked.
    NamingConvention,
}

impl FoundBy {
    pub fn describe(self) -> &'static str {
        match self {
            FoundBy::IfaceId => "OVSDB, by external_ids:iface-id",
            FoundBy::AttachedMac => "OVSDB, by external_ids:attached-mac",
            FoundBy::NamingConvention => "Nova's naming convention only: OVSDB could not be read",
        }
    }
}

/// A NIC's place on Open vSwitch.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct OvsAttachment {
    pub interface: String,
    pub port: Option<String>,
    pub bridge: Option<String>,
    pub ofport: Option<i64>,
    pub found_by: FoundBy,
}

impl Switch {
    pub fn read(client: &mut Client) -> Result<Switch, OvsdbError> {
        let select = |table: &str, columns: &[&str]| Operation::Select {
            table: table.into(),
            conditions: Vec::new(),
            columns: Some(columns.iter().map(|c| c.to_string()).collect()),
        };
        let results = client.transact(
            DATABASE,
            &[
                select("Interface", &["name", "external_ids", "ofport"]),
                select("Port", &["name", "interfaces"]),
                select("Bridge", &["name", "ports"]),
            ],
        )?;
        let mut tables = results.into_iter().map(super::rows);
        let mut next = || tables.next().unwrap_or_else(|| Ok(Vec::new()));
        let interfaces = next()?.iter().map(interface_row).collect::<Result<_, _>>()?;
        let ports = next()?.iter().map(|r| port_row(r, "interfaces")).collect::<Result<Vec<_>, _>>()?;
        let bridges = next()?
            .iter()
            .map(|r| {
                port_row(r, "ports").map(|p| BridgeRow { uuid: p.uuid, name: p.name, ports: p.interfaces })
            })
            .collect::<Result<_, _>>()?;
        Ok(Switch { interfaces, ports, bridges })
    }

    /// The interface of a VM NIC: the one whose iface-id is its Neutron port id, else the one
    /// whose attached-mac is its MAC.
    pub fn find_vm_interface(&self, port_id: Option<&str>, mac: Option<Mac>) -> Option<OvsAttachment> {
        let by_id = port_id
            .and_then(|id| self.interfaces.iter().find(|i| i.iface_id.as_deref() == Some(id)))
            .map(|i| (i, FoundBy::IfaceId));
        let by_mac = || {
            mac.and_then(|mac| self.interfaces.iter().find(|i| i.attached_mac == Some(mac)))
                .map(|i| (i, FoundBy::AttachedMac))
        };
        let (interface, found_by) = by_id.or_else(by_mac)?;
        Some(self.attachment(interface, found_by))
    }

    fn attachment(&self, interface: &InterfaceRow, found_by: FoundBy) -> OvsAttachment {
        let port = self.ports.iter().find(|p| p.interfaces.contains(&interface.uuid));
        let bridge = port.and_then(|p| self.bridges.iter().find(|b| b.ports.contains(&p.uuid)));
        OvsAttachment {
            interface: interface.name.clone(),
            port: port.map(|p| p.name.clone()),
            bridge: bridge.map(|b| b.name.clone()),
            ofport: interface.ofport,
            found_by,
        }
    }
}

fn malformed(what: &'static str, row: &Value) -> OvsdbError {
    OvsdbError::Malformed { what, found: row.to_string() }
}

fn uuid_and_name(row: &Value, what: &'static str) -> Result<(String, String), OvsdbError> {
    let uuid = datum::uuid(&row["_uuid"]).ok_or_else(|| malformed(what, row))?;
    let name = row["name"].as_str().ok_or_else(|| malformed(what, row))?;
    Ok((uuid.to_owned(), name.to_owned()))
}

fn interface_row(row: &Value) -> Result<InterfaceRow, OvsdbError> {
    let (uuid, name) = uuid_and_name(row, "an Interface row")?;
    let ids = datum::string_map(&row["external_ids"]);
    let id = |key: &str| ids.iter().find(|(k, _)| *k == key).map(|(_, v)| v.to_string());
    Ok(InterfaceRow {
        uuid,
        name,
        iface_id: id("iface-id"),
        attached_mac: id("attached-mac").and_then(|m| m.parse().ok()),
        vm_uuid: id("vm-uuid"),
        ofport: datum::optional_integer(&row["ofport"]),
    })
}

fn port_row(row: &Value, members: &str) -> Result<PortRow, OvsdbError> {
    let (uuid, name) = uuid_and_name(row, "a Port or Bridge row")?;
    let members = datum::set(&row[members]).into_iter().filter_map(datum::uuid).map(str::to_owned).collect();
    Ok(PortRow { uuid, name, interfaces: members })
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmsniff_tests::ovsdb::OvsdbServer;

    const PORT_ID: &str = "f7eae624-3412-4b6c-9e3a-0d1c2b3a4f55";

    #[test]
    fn reads_bridges_ports_and_interfaces_from_a_real_ovsdb_server() {
        let Some(server) = OvsdbServer::start() else { return };
        server.vsctl(&[
            "add-br",
            "br-int",
            "--",
            "add-port",
            "br-int",
            "qvof7eae624-34",
            "--",
            "set",
            "Interface",
            "qvof7eae624-34",
            &format!("external_ids:iface-id={PORT_ID}"),
            "external_ids:attached-mac=FA:16:3E:11:22:33",
            "external_ids:iface-status=active",
            "external_ids:vm-uuid=3f2a9c1e-7b4d-4e8f-9a6b-1c2d3e4f5a6b",
            "--",
            "add-port",
            "br-int",
            "tap8e3c1a52-07",
            "--",
            "set",
            "Interface",
            "tap8e3c1a52-07",
            "external_ids:attached-mac=fa:16:3e:44:55:66",
            "--",
            "add-br",
            "br-ex",
        ]);
        let mut client = Client::connect(&server.socket).unwrap();
        let switch = Switch::read(&mut client).unwrap();
        let mut bridges: Vec<&str> = switch.bridges.iter().map(|b| b.name.as_str()).collect();
        bridges.sort();
        assert_eq!(bridges, ["br-ex", "br-int"]);

        let qvo = switch.find_vm_interface(Some(PORT_ID), None).expect("found by iface-id");
        assert_eq!(qvo.interface, "qvof7eae624-34");
        assert_eq!(qvo.port.as_deref(), Some("qvof7eae624-34"));
        assert_eq!(qvo.bridge.as_deref(), Some("br-int"));
        assert_eq!(qvo.found_by, FoundBy::IfaceId);
        let row = switch.interfaces.iter().find(|i| i.name == "qvof7eae624-34").unwrap();
        assert_eq!(row.vm_uuid.as_deref(), Some("3f2a9c1e-7b4d-4e8f-9a6b-1c2d3e4f5a6b"));
        // Any case of attached-mac matches.
        let by_mac =
            switch.find_vm_interface(Some("no-such-port"), "fa:16:3e:11:22:33".parse().ok()).unwrap();
        assert_eq!((by_mac.interface.as_str(), by_mac.found_by), ("qvof7eae624-34", FoundBy::AttachedMac));
        let tap = switch.find_vm_interface(None, "fa:16:3e:44:55:66".parse().ok()).unwrap();
        assert_eq!((tap.interface.as_str(), tap.bridge.as_deref()), ("tap8e3c1a52-07", Some("br-int")));
        assert_eq!(switch.find_vm_interface(Some("x"), "fa:16:3e:00:00:00".parse().ok()), None);
        // Bridges' own internal interfaces are rows too, without external_ids.
        let internal = switch.interfaces.iter().find(|i| i.name == "br-ex").unwrap();
        assert_eq!((internal.iface_id.as_ref(), internal.attached_mac), (None, None));
    }

    #[test]
    fn operation_and_rpc_errors_are_typed() {
        let Some(server) = OvsdbServer::start() else { return };
        let mut client = Client::connect(&server.socket).unwrap();
        let bad_table =
            Operation::Select { table: "NoSuchTable".into(), conditions: Vec::new(), columns: None };
        let err = client.transact(DATABASE, std::slice::from_ref(&bad_table)).unwrap_err();
        assert!(matches!(err, OvsdbError::Rpc { .. } | OvsdbError::Operation { .. }), "{err}");
        let err = client.transact("NoSuchDatabase", &[bad_table]).unwrap_err();
        assert!(
            matches!(err, OvsdbError::Rpc { method: "transact", .. } | OvsdbError::Operation { .. }),
            "{err}"
        );
        // The connection still works after errors.
        let all_bridges = Operation::Select { table: "Bridge".into(), conditions: Vec::new(), columns: None };
        let results = client.transact(DATABASE, &[all_bridges]).unwrap();
        assert_eq!(crate::ovsdb::rows(results[0].clone()).unwrap(), Vec::<Value>::new());
        let named = Operation::Select {
            table: "Open_vSwitch".into(),
            conditions: vec![crate::ovsdb::Condition {
                column: "bridges".into(),
                function: "==",
                value: serde_json::json!(["set", []]),
            }],
            columns: Some(vec!["ovs_version".into()]),
        };
        assert_eq!(
            crate::ovsdb::rows(client.transact(DATABASE, &[named]).unwrap().remove(0)).unwrap().len(),
            1
        );
    }

    #[test]
    fn a_missing_socket_names_the_fix() {
        let err = Client::connect(std::path::Path::new("/nonexistent/db.sock")).unwrap_err();
        assert!(matches!(err, OvsdbError::Connect { .. }));
        assert!(err.to_string().contains("--ovsdb unix:PATH"), "{err}");
    }
}
