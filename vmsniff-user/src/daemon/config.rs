//! The daemon's declarative config: TOML, one `[session.NAME]` table per mirror, keys spelled
//! like `vmsniff attach`'s flags. Each table is turned into those flags and checked by the same
//! parser the command line uses, into the same typed [`MirrorSpec`], so a key means exactly what
//! its flag means; every error names the file and line.
use std::{collections::BTreeMap, fmt, net::SocketAddr, ops::Range, path::Path, time::Duration};

use clap::CommandFactory as _;
use serde::Deserialize;
use thiserror::Error;
use toml::Spanned;

use crate::{
    fleet::{
        etcd::{DEFAULT_ENDPOINT, DEFAULT_PREFIX, EtcdSettings},
        node::{NodeSettings, hostname},
        store::check_name as check_node_name,
    },
    model::{error::chain, listen::parse_listen_addr},
    service::{
        MirrorSpec,
        spec::{FlagsCli, SpecError},
    },
};

/// A checked config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DaemonConfig {
    /// `[daemon] keep-on-stop`: leave the mirrors running when the daemon stops.
    pub keep_on_stop: bool,
    /// `[daemon] resync-seconds`: the safety-net resync; events do the real work.
    pub resync: Duration,
    /// `[daemon] metrics = "ADDR:PORT"`: where `/metrics` is served (`--metrics` wins). Read at
    /// start: a reload that changes it takes effect at the next start.
    pub metrics: Option<SocketAddr>,
    pub sessions: BTreeMap<String, SessionSpec>,
    /// `[fleet]`: keep the fleet's mirrors whose VMs run on this node.
    pub fleet: Option<NodeSettings>,
}

/// One `[session.NAME]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionSpec {
    /// The line of its table header, for messages.
    pub line: usize,
    pub spec: MirrorSpec,
}

#[derive(Debug, Error, PartialEq, Eq)]
#[error("{file}:{line}: {message}")]
pub struct ConfigError {
    pub file: String,
    pub line: usize,
    pub message: String,
}

/// One `[session.NAME]` table as written, every key and value with its place in the file.
type RawSession = BTreeMap<Spanned<String>, Spanned<toml::Value>>;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    daemon: Option<RawDaemon>,
    #[serde(default)]
    session: BTreeMap<Spanned<String>, Spanned<RawSession>>,
    fleet: Option<Spanned<RawFleet>>,
}

/// `[fleet]`: etcd's settings as `vmsniff fleet` takes them (`key` is the client key, as
/// etcdctl's `--key`), and the node.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawFleet {
    endpoints: Option<Vec<String>>,
    cacert: Option<std::path::PathBuf>,
    cert: Option<std::path::PathBuf>,
    key: Option<std::path::PathBuf>,
    user: Option<String>,
    password: Option<String>,
    prefix: Option<String>,
    dial_timeout_seconds: Option<u64>,
    /// Default: the host name.
    node: Option<String>,
    lease_seconds: Option<u64>,
    report_seconds: Option<u64>,
}

/// The lease's default time to live: a dead node's mirrors show as lost this long after.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(10);
pub const DEFAULT_REPORT: Duration = Duration::from_secs(5);

fn fleet_settings(raw: RawFleet) -> Result<NodeSettings, String> {
    let seconds =
        |what: &str, value: Option<u64>, range: std::ops::RangeInclusive<u64>, default: Duration| match value
        {
            None => Ok(default),
            Some(s) if range.contains(&s) => Ok(Duration::from_secs(s)),
            Some(_) => Err(format!("[fleet] {what} must be {} to {}", range.start(), range.end())),
        };
    let node = raw.node.unwrap_or_else(hostname);
    check_node_name(&node).map_err(|_| {
        format!("[fleet] node {node:?}: use 1 to 64 letters, digits, '-', '_' or '.' (set `node` if the host name is not)")
    })?;
    if raw.cert.is_some() != raw.key.is_some() {
        return Err("[fleet] a client certificate needs its key: give both `cert` and `key`".into());
    }
    Ok(NodeSettings {
        etcd: EtcdSettings {
            endpoints: raw.endpoints.unwrap_or_else(|| vec![DEFAULT_ENDPOINT.to_owned()]),
            cacert: raw.cacert,
            cert: raw.cert,
            key: raw.key,
            user: raw.user,
            password: raw.password,
            prefix: raw.prefix.unwrap_or_else(|| DEFAULT_PREFIX.to_owned()),
            timeout: seconds(
                "dial-timeout-seconds",
                raw.dial_timeout_seconds,
                1..=300,
                Duration::from_secs(5),
            )?,
        },
        node,
        lease: seconds("lease-seconds", raw.lease_seconds, 2..=600, DEFAULT_LEASE)?,
        report_every: seconds("report-seconds", raw.report_seconds, 1..=600, DEFAULT_REPORT)?,
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawDaemon {
    keep_on_stop: Option<bool>,
    resync_seconds: Option<Spanned<u64>>,
    metrics: Option<Spanned<String>>,
}

/// Reads and checks the config file.
pub fn load(path: &Path) -> Result<DaemonConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
        file: path.display().to_string(),
        line: 0,
        message: format!("cannot read the config: {e}"),
    })?;
    parse(&path.display().to_string(), &text)
}

/// Parses and checks config text; `file` names it in errors.
pub fn parse(file: &str, text: &str) -> Result<DaemonConfig, ConfigError> {
    let error = |span: Option<Range<usize>>, message: String| ConfigError {
        file: file.to_owned(),
        line: span.map_or(1, |s| line_of(text, s.start)),
        message,
    };
    let raw: RawConfig = toml::from_str(text).map_err(|e| {
        let message = e.message().trim_end().to_owned();
        error(
            e.span(),
            format!("{message} (the config has a [daemon] table, a [fleet] table and [session.NAME] tables)"),
        )
    })?;
    let daemon = raw.daemon.unwrap_or(RawDaemon { keep_on_stop: None, resync_seconds: None, metrics: None });
    let metrics = match &daemon.metrics {
        Some(text) => Some(
            parse_listen_addr(text.get_ref())
                .map_err(|why| error(Some(text.span()), format!("metrics: {why}")))?,
        ),
        None => None,
    };
    let resync = match daemon.resync_seconds {
        Some(s) if *s.get_ref() == 0 || *s.get_ref() > 86_400 => {
            return Err(error(Some(s.span()), "resync-seconds must be 1 to 86400".into()));
        }
        Some(s) => Duration::from_secs(*s.get_ref()),
        None => DEFAULT_RESYNC,
    };
    let fleet = match raw.fleet {
        Some(table) => {
            let span = table.span();
            Some(fleet_settings(table.into_inner()).map_err(|m| error(Some(span), m))?)
        }
        None => None,
    };
    let flags = attach_flags();
    let mut sessions = BTreeMap::new();
    for (name, table) in raw.session {
        let line = line_of(text, name.span().start);
        check_name(name.get_ref()).map_err(|why| error(Some(name.span()), why))?;
        let name = name.into_inner();
        let in_session = |m: String| format!("session {name:?}: {m}");
        let mut argv = Vec::new();
        let mut key_spans = BTreeMap::new();
        // Flags in clap's order, so that the same session always has the same argv.
        let table = table.into_inner();
        for key in table.keys() {
            if !flags.iter().any(|f| f.key == *key.get_ref()) {
                let known: Vec<&str> = flags.iter().map(|f| f.key.as_str()).collect();
                return Err(error(
                    Some(key.span()),
                    in_session(format!(
                        "unknown key {:?}; a session takes {}",
                        key.get_ref(),
                        known.join(", ")
                    )),
                ));
            }
        }
        for flag in &flags {
            let Some((key, value)) = table.get_key_value(flag.key.as_str()) else { continue };
            key_spans.insert(flag.key.clone(), key.span());
            let text_value = match value.get_ref() {
                toml::Value::String(s) => s.clone(),
                toml::Value::Integer(i) => i.to_string(),
                toml::Value::Boolean(b) if flag.switch => {
                    if *b {
                        argv.push(format!("--{}", flag.key));
                    }
                    continue;
                }
                _ => {
                    return Err(error(
                        Some(value.span()),
                        in_session(format!(
                            "{} takes {}",
                            flag.key,
                            if flag.switch { "true or false" } else { "a string or a number" }
                        )),
                    ));
                }
            };
            if flag.key == "vm" {
                argv.push(text_value);
            } else {
                argv.push(format!("--{}", flag.key));
                argv.push(text_value);
            }
        }
        let key_line = |key: &str| key_spans.get(key).cloned().or(Some(name_span_fallback(text, line)));
        let flags = FlagsCli::parse_args(&argv).map_err(|e| {
            let (key, message) = clap_message(&e);
            error(key.and_then(|k| key_line(&k)), in_session(message))
        })?;
        if flags.mirror.vm.is_none() && flags.mirror.tap.is_none() {
            let message = "say which VM: `vm` (its Nova name, UUID, libvirt domain or MAC) or `tap`";
            return Err(error(key_line("vm"), in_session(message.into())));
        }
        let spec = flags.spec().map_err(|e| error(key_line(e.flag()), in_session(spec_message(&e))))?;
        sessions.insert(name, SessionSpec { line, spec });
    }
    Ok(DaemonConfig { keep_on_stop: daemon.keep_on_stop.unwrap_or(false), resync, metrics, sessions, fleet })
}

pub const DEFAULT_RESYNC: Duration = Duration::from_secs(60);

/// A spec's error in the config's words.
fn spec_message(error: &SpecError) -> String {
    match error {
        SpecError::EbpfOnly { .. } | SpecError::OvsWithoutCollector => {
            flags_as_keys(&error.to_string().replace("--mode ovs", "mode = \"ovs\""))
        }
        _ => chain(error),
    }
}

/// A command-line message in the config's words: `--filter,` becomes `` `filter`, ``.
fn flags_as_keys(message: &str) -> String {
    message
        .split(' ')
        .map(|word| {
            let (before, rest) = word.split_at(word.find("--").unwrap_or(word.len()));
            match rest.strip_prefix("--") {
                Some(flag) if before.chars().all(|c| c.is_ascii_punctuation()) => {
                    let end =
                        flag.find(|c: char| !(c.is_ascii_alphanumeric() || c == '-')).unwrap_or(flag.len());
                    format!("{before}`{}`{}", &flag[..end], &flag[end..])
                }
                _ => word.to_owned(),
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// A session name: the session's identity across reloads, and a log word.
fn check_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "session name {name:?}: use 1 to 64 letters, digits, '-', '_' or '.' (it names the session in logs and status)"
        ))
    }
}

struct Flag {
    key: String,
    switch: bool,
}

/// The attach flags a session table may hold, from the attach parser itself; the VM selector
/// is `vm`.
fn attach_flags() -> Vec<Flag> {
    FlagsCli::command()
        .get_arguments()
        .filter_map(|a| {
            let key =
                a.get_long().map(str::to_owned).or_else(|| a.is_positional().then(|| "vm".to_owned()))?;
            let switch = matches!(a.get_action(), clap::ArgAction::SetTrue);
            Some(Flag { key, switch })
        })
        .collect()
}

/// clap's message on one line, its flags spelled as config keys; and the key it is about.
fn clap_message(e: &clap::Error) -> (Option<String>, String) {
    let rendered = e.render().to_string();
    // The first line, and the indented lines that continue it (the missing arguments).
    let mut lines = rendered.lines();
    let mut first = lines.next().unwrap_or_default().trim_start_matches("error: ").to_owned();
    for more in lines.take_while(|l| l.starts_with("  ")) {
        first.push(' ');
        first.push_str(more.trim());
    }
    let mut message = String::new();
    let mut key = None;
    let mut rest = first.as_str();
    while let Some(start) = rest.find('\'') {
        message.push_str(&rest[..start]);
        let after = &rest[start + 1..];
        let Some(end) = after.find('\'') else {
            message.push_str(&rest[start..]);
            rest = "";
            break;
        };
        let quoted = &after[..end];
        match quoted.strip_prefix("--") {
            Some(flag) => {
                let flag = flag.split([' ', '=']).next().unwrap_or(flag);
                key.get_or_insert_with(|| flag.to_owned());
                message.push_str(&format!("`{flag}`"));
            }
            None if quoted == "[VM]" || quoted == "VM" => message.push_str("`vm`"),
            None => message.push_str(&format!("'{quoted}'")),
        }
        rest = &after[end + 1..];
    }
    message.push_str(rest);
    // Unquoted flags (clap lists missing arguments bare): `--to <IP>` becomes `to`.
    let mut words: Vec<String> = Vec::new();
    let mut tokens = message.split(' ').peekable();
    while let Some(token) = tokens.next() {
        match token.strip_prefix("--") {
            Some(flag) if !flag.is_empty() => {
                if tokens.peek().is_some_and(|t| t.starts_with('<')) {
                    tokens.next();
                }
                key.get_or_insert_with(|| flag.to_owned());
                words.push(format!("`{flag}`"));
            }
            _ => words.push(token.to_owned()),
        }
    }
    (key, words.join(" "))
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].bytes().filter(|&b| b == b'\n').count() + 1
}

/// The span of a line's start, for errors about a session as a whole.
fn name_span_fallback(text: &str, line: usize) -> Range<usize> {
    let start: usize = text.split_inclusive('\n').take(line - 1).map(str::len).sum();
    start..start
}

impl fmt::Display for DaemonConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} session(s)", self.sessions.len())?;
        if let Some(fleet) = &self.fleet {
            write!(f, ", the fleet at {} as node {}", fleet.etcd.endpoints.join(","), fleet.node)?;
        }
        if self.keep_on_stop {
            write!(f, ", mirrors kept on stop")?;
        }
        if let Some(addr) = self.metrics {
            write!(f, ", metrics on {addr}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service::{Destination, spec::NicRef};

    fn parse_ok(text: &str) -> DaemonConfig {
        parse("m.toml", text).unwrap_or_else(|e| panic!("{e}"))
    }

    fn parse_err(text: &str) -> ConfigError {
        parse("m.toml", text).expect_err("the config must be refused")
    }

    #[test]
    fn sessions_become_attach_arguments() {
        let config = parse_ok(
            r#"
[daemon]
keep-on-stop = true
resync-seconds = 30

[session.ids]
vm = "c-private"
nic = 0
to = "192.0.2.2"
key = 7
direction = "out"
filter = "tcp port 443"
snaplen = 128

[session.lab]
tap = "tap0"
to-dev = "mir0"
"#,
        );
        assert!(config.keep_on_stop);
        assert_eq!(config.resync, Duration::from_secs(30));
        let ids = &config.sessions["ids"];
        assert_eq!(ids.line, 6);
        let spec = &ids.spec;
        assert_eq!(
            spec.nic,
            NicRef::Vm { selector: "c-private".into(), nic: crate::model::mirror::NicChoice::Index(0) }
        );
        assert_eq!(spec.key, Some(7));
        assert_eq!(spec.controls.snaplen, 128);
        assert_eq!(spec.controls.filter.as_ref().map(|f| f.expression.as_str()), Some("tcp port 443"));
        assert_eq!(config.sessions["lab"].spec.destination, Destination::Device { name: "mir0".into() });
    }

    #[test]
    fn ovs_sessions_take_the_keys_ovs_mode_has() {
        let config = parse_ok(
            "[session.ovs]\nvm = \"c-private\"\nmode = \"ovs\"\nto = \"192.0.2.2\"\nkey = 9\ndirection = \"in\"\n",
        );
        assert!(config.sessions["ovs"].spec.is_ovs());
        assert_eq!(config.sessions["ovs"].spec.key, Some(9));
        assert!(!parse_ok("[session.e]\nvm = \"x\"\nto = \"192.0.2.2\"\n").sessions["e"].spec.is_ovs());
    }

    #[test]
    fn the_metrics_address_is_checked_with_its_line() {
        let config = parse_ok("[daemon]\nmetrics = \"127.0.0.1:9466\"\n");
        assert_eq!(config.metrics, Some("127.0.0.1:9466".parse().unwrap()));
        let e = parse_err("[daemon]\nkeep-on-stop = true\nmetrics = \"localhost\"\n");
        assert_eq!(e.line, 3, "{e}");
        assert!(e.to_string().contains("metrics: \"localhost\" is not ADDR:PORT"), "{e}");
    }

    #[test]
    fn underlay_keys_are_spelled_like_the_flags() {
        let config = parse_ok(
            "[session.v]\nvm = \"c-private\"\nto = \"2001:db8::2\"\nencap = \"vxlan\"\nport = 8472\ntos = 32\n",
        );
        let spec = &config.sessions["v"].spec;
        assert_eq!(
            spec.destination,
            crate::service::spec::Destination::Collector {
                remote: "2001:db8::2".parse().unwrap(),
                ttl: 64,
                tos: 32,
                encap: crate::model::wire::Encap::Vxlan { port: 8472 },
            }
        );
        let e = parse_err("[session.a]\nvm = \"x\"\nto = \"192.0.2.2\"\nencap = \"vxlan\"\nport = 0\n");
        assert!(e.message.contains("port 0 is no destination"), "{e}");
        let e = parse_err("[session.a]\nvm = \"x\"\nto = \"fe80::2\"\n");
        assert_eq!(e.line, 3, "{e}");
        assert!(e.message.contains("link-local"), "{e}");
    }

    #[test]
    fn an_empty_config_has_no_sessions() {
        let config = parse_ok("");
        assert!(config.sessions.is_empty());
        assert!(!config.keep_on_stop);
        assert_eq!(config.resync, DEFAULT_RESYNC);
    }

    #[test]
    fn errors_name_the_line_and_the_key() {
        let e = parse_err("[session.a]\nvm = \"x\"\nto = \"192.0.2.2\"\nsnaplen = 0\n");
        assert_eq!(e.line, 4, "{e}");
        assert!(e.to_string().starts_with("m.toml:4: session \"a\": "), "{e}");
        assert!(e.message.contains("snaplen"), "{e}");

        let e = parse_err("[session.a]\nvm = \"x\"\nto = \"192.0.2.2\"\ncolour = \"red\"\n");
        assert_eq!(e.line, 4);
        assert!(e.message.contains("unknown key \"colour\"") && e.message.contains("rate-limit"), "{e}");

        let e = parse_err("[session.a]\nvm = \"x\"\nto = \"192.0.2.2\"\nto-dev = \"mir0\"\n");
        assert!(e.message.contains("`to`") && e.message.contains("`to-dev`"), "{e}");

        let e = parse_err("[session.a]\nvm = \"x\"\n");
        assert!(e.message.contains("`to`"), "{e}");
        assert_eq!(e.line, 1);

        let e = parse_err("[session.a]\nvm = \"x\"\nto = \"192.0.2.2\"\n\nfilter = \"tcp port\"\n");
        assert_eq!(e.line, 5, "{e}");

        let e = parse_err("[session.a]\nto = \"192.0.2.2\"\n");
        assert!(e.message.contains("`vm`"), "{e}");

        let e = parse_err("[session.a]\nvm = \"x\"\nto = \"192.0.2.2\"\nmode = \"ovs\"\nsnaplen = 96\n");
        assert_eq!(e.line, 4, "{e}");
        assert!(
            e.message.contains("`snaplen` is eBPF mode's") && e.message.contains("mode = \"ovs\""),
            "{e}"
        );
        let e = parse_err("[session.a]\nvm = \"x\"\nmode = \"ovs\"\nto-dev = \"mir0\"\n");
        assert!(e.message.contains("`to-dev`"), "{e}");

        let e = parse_err("[session.a]\nvm = \"x\"\nto = \"192.0.2.2\"\ndry-run = true\n");
        assert!(e.message.contains("unknown key \"dry-run\""), "{e}");

        let e = parse_err("[session.a]\nvm = [\"x\"]\nto = \"192.0.2.2\"\n");
        assert_eq!(e.line, 2);
    }

    #[test]
    fn toml_errors_and_odd_tables_are_refused_with_a_line() {
        let e = parse_err("[session.a]\nvm = \"x\nto = 1\n");
        assert_eq!(e.line, 2, "{e}");
        let e = parse_err("[deamon]\nkeep-on-stop = true\n");
        assert!(e.message.contains("deamon"), "{e}");
        let e = parse_err("[daemon]\nresync-seconds = 0\n");
        assert_eq!(e.line, 2);
        let e = parse_err("[session.\"a b\"]\nvm = \"x\"\nto = \"192.0.2.2\"\n");
        assert!(e.message.contains("session name"), "{e}");
    }

    #[test]
    fn reloads_compare_keys() {
        let a = parse_ok("[session.a]\nvm = \"x\"\nto = \"192.0.2.2\"\nfilter = \"tcp\"\n");
        let b = parse_ok("[session.a]\nfilter = \"udp\"\nto = \"192.0.2.2\"\nvm = \"x\"\nsnaplen = 64\n");
        assert_eq!(a.sessions["a"].spec.changed_keys(&b.sessions["a"].spec), ["filter", "snaplen"]);
        let c = parse_ok("[session.a]\nvm = \"y\"\nto = \"192.0.2.2\"\nfilter = \"tcp\"\n");
        assert_eq!(a.sessions["a"].spec.changed_keys(&c.sessions["a"].spec), ["vm"]);
        assert!(a.sessions["a"].spec.changed_keys(&a.sessions["a"].spec).is_empty());
    }

    #[test]
    fn a_fleet_table_names_etcd_and_the_node_and_is_checked() {
        let config = parse_ok(
            "[fleet]\nendpoints = [\"https://etcd1:2379\"]\ncacert = \"/etc/ca.pem\"\nnode = \"cn-7\"\nlease-seconds = 4\n",
        );
        let fleet = config.fleet.unwrap();
        assert_eq!(fleet.etcd.endpoints, ["https://etcd1:2379"]);
        assert_eq!((fleet.node.as_str(), fleet.lease.as_secs()), ("cn-7", 4));
        assert_eq!(fleet.etcd.prefix, "/vmsniff");
        assert!(parse_ok("[session.a]\nvm = \"x\"\nto = \"192.0.2.2\"\n").fleet.is_none());
        for (bad, expected) in [
            ("[fleet]\nlease-seconds = 1\n", "lease-seconds must be 2 to 600"),
            ("[fleet]\nnode = \"a/b\"\n", "node \"a/b\""),
            ("[fleet]\ncert = \"/c.pem\"\n", "give both `cert` and `key`"),
            ("[fleet]\nendpoint = \"x\"\n", "unknown field `endpoint`"),
        ] {
            let e = parse("m.toml", bad).unwrap_err();
            assert!(e.to_string().contains(expected), "{bad}: {e}");
        }
    }
}
