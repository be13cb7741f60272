//! A small OVSDB client (RFC 7047, JSON-RPC over the unix socket): `transact` with typed
//! operations and errors. vmsniff reads Open vSwitch's tables through it, and OVS mode sends its
//! mirrors' transactions through it.
pub mod vswitch;

use std::{
    fmt,
    io::{BufReader, Write as _},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    time::Duration,
};

use serde_json::{Value, json};
use thiserror::Error;

/// Where ovsdb-server listens on Debian and in OVS's own packaging.
const DEFAULT_SOCKETS: [&str; 2] = ["/run/openvswitch/db.sock", "/var/run/openvswitch/db.sock"];
/// How long one request may take: a healthy local server answers in milliseconds.
const TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Error)]
pub enum OvsdbError {
    #[error("{0:?} is not an OVSDB address: give unix:PATH (for example unix:/run/openvswitch/db.sock)")]
    BadAddress(String),
    #[error(
        "no OVSDB socket at {}; is ovsdb-server running (`systemctl status openvswitch-switch`)? \
         Name it with --ovsdb unix:PATH or VMSNIFF_OVSDB",
        DEFAULT_SOCKETS.join(" or ")
    )]
    NoSocket,
    #[error("cannot connect to OVSDB at {path}; is ovsdb-server running? Name it with --ovsdb unix:PATH")]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("talking to OVSDB at {path} failed")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("OVSDB at {path} sent something that is not JSON-RPC")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("OVSDB at {path} closed the connection")]
    Closed { path: PathBuf },
    #[error("OVSDB at {path} answered {method} with an error: {error}")]
    Rpc { path: PathBuf, method: &'static str, error: Value },
    #[error("OVSDB operation {index} failed: {error}{}", details.as_deref().map(|d| format!(" ({d})")).unwrap_or_default())]
    Operation { index: usize, error: String, details: Option<String> },
    #[error("OVSDB's answer to {what} is malformed: {found}")]
    Malformed { what: &'static str, found: String },
}

/// `--ovsdb unix:PATH` or `VMSNIFF_OVSDB`, else the first default socket that exists.
pub fn socket_path(option: Option<&str>) -> Result<PathBuf, OvsdbError> {
    match option {
        Some(address) => match address.strip_prefix("unix:") {
            Some(path) if !path.is_empty() => Ok(PathBuf::from(path)),
            _ => Err(OvsdbError::BadAddress(address.to_owned())),
        },
        None => DEFAULT_SOCKETS.iter().map(PathBuf::from).find(|p| p.exists()).ok_or(OvsdbError::NoSocket),
    }
}

impl Client {
    /// Connects to the OVSDB that `--ovsdb` names (`None`: the default socket).
    pub fn open(option: Option<&str>) -> Result<Client, OvsdbError> {
        Client::connect(&socket_path(option)?)
    }
}

/// One condition of a `select`: `[column, function, value]`.
#[derive(Clone, Debug)]
pub struct Condition {
    pub column: String,
    pub function: &'static str,
    pub value: Value,
}

/// An OVSDB operation (RFC 7047 5.2).
#[derive(Clone, Debug)]
pub enum Operation {
    /// Rows of `table` matching every condition; only `columns` if given (`_uuid` always).
    Select {
        table: String,
        conditions: Vec<Condition>,
        columns: Option<Vec<String>>,
    },
    /// A new row; `uuid_name` lets later operations of the transaction refer to it as
    /// `["named-uuid", NAME]`.
    Insert {
        table: String,
        row: Value,
        uuid_name: String,
    },
    /// Changes columns of matching rows in place (`insert`/`delete` on sets, `+=` on integers),
    /// leaving every other member of a set as it is.
    Mutate {
        table: String,
        conditions: Vec<Condition>,
        mutations: Vec<Mutation>,
    },
    Delete {
        table: String,
        conditions: Vec<Condition>,
    },
    /// Sets the given columns of matching rows to `row`'s values.
    Update {
        table: String,
        conditions: Vec<Condition>,
        row: Value,
    },
    /// Aborts the whole transaction unless the matching rows' `columns` equal `rows` now (a
    /// guard against changes made since they were read).
    Wait {
        table: String,
        conditions: Vec<Condition>,
        columns: Vec<String>,
        rows: Vec<Value>,
    },
    /// Recorded in ovsdb-server's log with the transaction.
    Comment(String),
}

/// One mutation of a `mutate`: `[column, mutator, value]`.
#[derive(Clone, Debug)]
pub struct Mutation {
    pub column: String,
    pub mutator: &'static str,
    pub value: Value,
}

impl Condition {
    /// `_uuid == uuid`.
    pub fn uuid(uuid: &str) -> Condition {
        Condition { column: "_uuid".into(), function: "==", value: json!(["uuid", uuid]) }
    }
}

fn conditions_json(conditions: &[Condition]) -> Value {
    conditions.iter().map(|c| json!([c.column, c.function, c.value])).collect()
}

impl Operation {
    pub fn to_json(&self) -> Value {
        match self {
            Operation::Select { table, conditions, columns } => {
                let mut op = json!({
                    "op": "select",
                    "table": table,
                    "where": conditions_json(conditions),
                });
                if let Some(columns) = columns {
                    let mut columns = columns.clone();
                    if !columns.iter().any(|c| c == "_uuid") {
                        columns.push("_uuid".into());
                    }
                    op["columns"] = json!(columns);
                }
                op
            }
            Operation::Insert { table, row, uuid_name } => {
                json!({"op": "insert", "table": table, "row": row, "uuid-name": uuid_name})
            }
            Operation::Mutate { table, conditions, mutations } => json!({
                "op": "mutate",
                "table": table,
                "where": conditions_json(conditions),
                "mutations": mutations.iter().map(|m| json!([m.column, m.mutator, m.value])).collect::<Vec<_>>(),
            }),
            Operation::Delete { table, conditions } => {
                json!({"op": "delete", "table": table, "where": conditions_json(conditions)})
            }
            Operation::Update { table, conditions, row } => {
                json!({"op": "update", "table": table, "where": conditions_json(conditions), "row": row})
            }
            Operation::Wait { table, conditions, columns, rows } => json!({
                "op": "wait",
                "timeout": 0,
                "table": table,
                "where": conditions_json(conditions),
                "columns": columns,
                "until": "==",
                "rows": rows,
            }),
            Operation::Comment(comment) => json!({"op": "comment", "comment": comment}),
        }
    }
}

/// A connection to one ovsdb-server.
pub struct Client {
    path: PathBuf,
    writer: UnixStream,
    reader: serde_json::StreamDeserializer<'static, serde_json::de::IoRead<BufReader<UnixStream>>, Value>,
    next_id: u64,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client").field("path", &self.path).finish()
    }
}

impl Client {
    pub fn connect(path: &Path) -> Result<Self, OvsdbError> {
        let connect = |source| OvsdbError::Connect { path: path.to_owned(), source };
        let stream = UnixStream::connect(path).map_err(connect)?;
        stream.set_read_timeout(Some(TIMEOUT)).map_err(connect)?;
        stream.set_write_timeout(Some(TIMEOUT)).map_err(connect)?;
        let reader = stream.try_clone().map_err(connect)?;
        Ok(Client {
            path: path.to_owned(),
            writer: stream,
            // OVSDB sends JSON objects back to back with no framing: a streaming parser splits them.
            reader: serde_json::Deserializer::from_reader(BufReader::new(reader)).into_iter(),
            next_id: 0,
        })
    }

    /// Runs `operations` in one transaction on `database`; one result per operation.
    pub fn transact(&mut self, database: &str, operations: &[Operation]) -> Result<Vec<Value>, OvsdbError> {
        let mut params = vec![json!(database)];
        params.extend(operations.iter().map(Operation::to_json));
        let result = self.call("transact", Value::Array(params))?;
        let Value::Array(results) = result else {
            return Err(OvsdbError::Malformed { what: "transact", found: result.to_string() });
        };
        // An error in any operation aborts the transaction; its result object says which.
        for (index, r) in results.iter().enumerate() {
            if let Some(error) = r.get("error").and_then(Value::as_str) {
                return Err(OvsdbError::Operation {
                    index,
                    error: error.to_owned(),
                    details: r.get("details").and_then(Value::as_str).map(str::to_owned),
                });
            }
        }
        if results.len() < operations.len() {
            return Err(OvsdbError::Malformed { what: "transact", found: Value::Array(results).to_string() });
        }
        Ok(results)
    }

    fn call(&mut self, method: &'static str, params: Value) -> Result<Value, OvsdbError> {
        let id = self.next_id;
        self.next_id += 1;
        let request = json!({"method": method, "params": params, "id": id});
        self.send(&request)?;
        loop {
            let message = self.receive()?;
            if self.answered_echo(&message)? {
                continue;
            }
            if message.get("id") != Some(&json!(id)) {
                log::debug!("OVSDB: ignoring {message}");
                continue;
            }
            return match message.get("error") {
                Some(error) if !error.is_null() => {
                    Err(OvsdbError::Rpc { path: self.path.clone(), method, error: error.clone() })
                }
                _ => Ok(message.get("result").cloned().unwrap_or(Value::Null)),
            };
        }
    }

    /// The server probes idle clients with "echo"; answering keeps the connection.
    fn answered_echo(&mut self, message: &Value) -> Result<bool, OvsdbError> {
        if message.get("method").and_then(Value::as_str) != Some("echo") {
            return Ok(false);
        }
        let reply = json!({"result": message["params"], "error": null, "id": message["id"]});
        self.send(&reply)?;
        Ok(true)
    }

    /// Asks to be told of every change to `columns` of each table (RFC 7047 `monitor`), and
    /// from then on waits for changes without a time limit: see [`Client::next_update`].
    pub fn monitor(&mut self, database: &str, columns: &[(&str, &[&str])]) -> Result<(), OvsdbError> {
        let requests: serde_json::Map<String, Value> = columns
            .iter()
            .map(|(table, columns)| {
                (table.to_string(), json!({"columns": columns, "select": {"initial": false}}))
            })
            .collect();
        self.call("monitor", json!([database, null, requests]))?;
        self.writer
            .set_read_timeout(None)
            .map_err(|source| OvsdbError::Io { path: self.path.clone(), source })
    }

    /// Waits for the next `update` notification of a [`Client::monitor`].
    pub fn next_update(&mut self) -> Result<(), OvsdbError> {
        loop {
            let message = self.receive()?;
            if self.answered_echo(&message)? {
                continue;
            }
            if message.get("method").and_then(Value::as_str) == Some("update") {
                return Ok(());
            }
            log::debug!("OVSDB: ignoring {message}");
        }
    }

    fn send(&mut self, message: &Value) -> Result<(), OvsdbError> {
        let bytes = serde_json::to_vec(message)
            .map_err(|source| OvsdbError::Json { path: self.path.clone(), source })?;
        self.writer.write_all(&bytes).map_err(|source| OvsdbError::Io { path: self.path.clone(), source })
    }

    fn receive(&mut self) -> Result<Value, OvsdbError> {
        match self.reader.next() {
            Some(Ok(value)) => Ok(value),
            Some(Err(e)) if e.is_io() => {
                Err(OvsdbError::Io { path: self.path.clone(), source: std::io::Error::from(e) })
            }
            Some(Err(source)) => Err(OvsdbError::Json { path: self.path.clone(), source }),
            None => Err(OvsdbError::Closed { path: self.path.clone() }),
        }
    }
}

/// The `rows` of a select's result.
pub fn rows(result: Value) -> Result<Vec<Value>, OvsdbError> {
    match result {
        Value::Object(mut object) => match object.remove("rows") {
            Some(Value::Array(rows)) => Ok(rows),
            other => Err(OvsdbError::Malformed { what: "select", found: format!("{other:?}") }),
        },
        other => Err(OvsdbError::Malformed { what: "select", found: other.to_string() }),
    }
}

/// OVSDB's datum encodings (RFC 7047 5.1).
pub mod datum {
    use serde_json::Value;

    /// `["uuid", "..."]`.
    pub fn uuid(value: &Value) -> Option<&str> {
        match value.as_array()?.as_slice() {
            [tag, id] if tag == "uuid" => id.as_str(),
            _ => None,
        }
    }

    /// The members of a set: `["set", [...]]`, or a single atom standing for a one-element set.
    pub fn set(value: &Value) -> Vec<&Value> {
        match value.as_array().map(Vec::as_slice) {
            Some([tag, Value::Array(members)]) if tag == "set" => members.iter().collect(),
            _ => vec![value],
        }
    }

    /// The string pairs of a map: `["map", [[k, v], ...]]`.
    pub fn string_map(value: &Value) -> Vec<(&str, &str)> {
        match value.as_array().map(Vec::as_slice) {
            Some([tag, Value::Array(pairs)]) if tag == "map" => pairs
                .iter()
                .filter_map(|pair| match pair.as_array()?.as_slice() {
                    [k, v] => Some((k.as_str()?, v.as_str()?)),
                    _ => None,
                })
                .collect(),
            _ => Vec::new(),
        }
    }

    /// The integer values of a map: `["map", [[k, 5], ...]]` (statistics columns).
    pub fn integer_map(value: &Value) -> Vec<(&str, i64)> {
        match value.as_array().map(Vec::as_slice) {
            Some([tag, Value::Array(pairs)]) if tag == "map" => pairs
                .iter()
                .filter_map(|pair| match pair.as_array()?.as_slice() {
                    [k, v] => Some((k.as_str()?, v.as_i64()?)),
                    _ => None,
                })
                .collect(),
            _ => Vec::new(),
        }
    }

    /// A map of strings in OVSDB's encoding.
    pub fn to_string_map<'a>(pairs: impl IntoIterator<Item = (&'a str, String)>) -> Value {
        Value::Array(vec![
            "map".into(),
            pairs.into_iter().map(|(k, v)| Value::Array(vec![k.into(), v.into()])).collect(),
        ])
    }

    /// A set of UUIDs in OVSDB's encoding.
    pub fn uuid_set<'a>(uuids: impl IntoIterator<Item = &'a str>) -> Value {
        Value::Array(vec![
            "set".into(),
            uuids.into_iter().map(|u| Value::Array(vec!["uuid".into(), u.into()])).collect(),
        ])
    }

    /// An optional integer: an empty set, or the integer.
    pub fn optional_integer(value: &Value) -> Option<i64> {
        value.as_i64().or_else(|| set(value).first().and_then(|v| v.as_i64()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses() {
        assert_eq!(socket_path(Some("unix:/tmp/db.sock")).unwrap(), PathBuf::from("/tmp/db.sock"));
        for bad in ["/tmp/db.sock", "tcp:127.0.0.1:6640", "unix:"] {
            let err = socket_path(Some(bad)).unwrap_err();
            assert!(err.to_string().contains("unix:PATH"), "{err}");
        }
    }

    #[test]
    fn select_operations_always_ask_for_the_uuid() {
        let op = Operation::Select {
            table: "Interface".into(),
            conditions: vec![Condition { column: "name".into(), function: "==", value: json!("qvo1") }],
            columns: Some(vec!["name".into()]),
        };
        assert_eq!(
            op.to_json(),
            json!({"op": "select", "table": "Interface", "where": [["name", "==", "qvo1"]], "columns": ["name", "_uuid"]})
        );
    }

    #[test]
    fn datum_encodings() {
        let map = json!(["map", [["iface-id", "f7ea"], ["attached-mac", "fa:16:3e:11:22:33"]]]);
        assert_eq!(datum::string_map(&map), [("iface-id", "f7ea"), ("attached-mac", "fa:16:3e:11:22:33")]);
        assert_eq!(datum::uuid(&json!(["uuid", "abc"])), Some("abc"));
        assert_eq!(datum::set(&json!(["set", [["uuid", "a"], ["uuid", "b"]]])).len(), 2);
        assert_eq!(datum::set(&json!(["uuid", "a"])).len(), 1);
        assert_eq!(datum::optional_integer(&json!(5)), Some(5));
        assert_eq!(datum::optional_integer(&json!(["set", []])), None);
    }
}
