//! `--names [SENDER=]FILE`: what `vmsniff status --json` printed on a hypervisor, so that the
//! capture's interfaces are named after the VM (or tap) and session rather than by number.
use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr},
    path::PathBuf,
};

use serde::Deserialize;
use thiserror::Error;
use tokio::sync::watch;

use super::stats::{InterfaceKey, StreamKey};
use crate::model::wire::FleetLabel;

#[derive(Debug, Error)]
pub enum NamesError {
    #[error("--names {}: cannot read it", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "--names {}: not what `vmsniff status --json` prints (`{{\"version\": 1, \"sessions\": \
         [...]}}`); save that on the hypervisor and give it here",
        path.display()
    )]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("--names {}: status version {version} is newer than this vmsniff knows (1)", path.display())]
    Version { path: PathBuf, version: u64 },
}

/// `--names [SENDER=]FILE`, as given.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NamesArg {
    pub sender: Option<IpAddr>,
    pub path: PathBuf,
}

pub fn parse_names_arg(text: &str) -> Result<NamesArg, String> {
    match text.split_once('=') {
        Some((sender, path)) => {
            let sender = sender.parse().map_err(|_| {
                format!("--names {text:?}: {sender:?} is not an IP address; give SENDER=FILE or FILE")
            })?;
            Ok(NamesArg { sender: Some(sender), path: path.into() })
        }
        None => Ok(NamesArg { sender: None, path: text.into() }),
    }
}

#[derive(Deserialize)]
struct StatusFile {
    version: u64,
    sessions: Vec<SessionEntry>,
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case")]
struct SessionEntry {
    session: u32,
    tap: String,
    key: Option<u32>,
    #[serde(default)]
    encap: Option<String>,
    /// Later status versions may name the VM and NIC.
    #[serde(default)]
    vm: Option<String>,
    #[serde(default)]
    nic: Option<u32>,
    /// `ovs` for an Open vSwitch Mirror, whose GRE port sends plain GRE (key K, no sequence).
    #[serde(default)]
    mode: Option<String>,
}

/// Characters of a name a capture shows at most. Names come from hypervisors' status (a VM's
/// name is its tenant's choice): they reach terminals and Wireshark, so they are cut and made
/// printable.
const NAME_CHARS: usize = 64;

/// `text` without control characters (terminal escapes, newlines), at most [`NAME_CHARS`] long.
pub fn printable(text: &str) -> String {
    let mut out: String =
        text.chars().take(NAME_CHARS).map(|c| if c.is_control() { '?' } else { c }).collect();
    if text.chars().nth(NAME_CHARS).is_some() {
        out.push('…');
    }
    out
}

/// Names of sessions, by (sender or any, ERSPAN or GRE, key).
#[derive(Clone, Debug, Default)]
pub struct Names {
    by_key: BTreeMap<(Option<IpAddr>, bool, u32), Named>,
    /// OVS mode's sessions, whose copies are plain GRE with key K: by (sender or any, key).
    plain: BTreeMap<(Option<IpAddr>, u32), Named>,
    /// `--fleet`: fleet mirrors by key K, "NAME (VM nic N)", as the fleet declares them now
    /// (a watch of etcd updates it). Their copies share one interface whichever node sends them.
    fleet: Option<watch::Receiver<BTreeMap<u32, FleetLabel>>>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Named {
    pub session: u32,
    /// "c-private nic 0" or the tap's name.
    pub label: String,
    pub tap: String,
    pub encap: String,
}

impl Names {
    pub fn load(args: &[NamesArg]) -> Result<Names, NamesError> {
        let mut names = Names::default();
        for arg in args {
            let text = std::fs::read_to_string(&arg.path)
                .map_err(|source| NamesError::Read { path: arg.path.clone(), source })?;
            names.add(arg.sender, &text).map_err(|e| match e {
                AddError::Parse(source) => NamesError::Parse { path: arg.path.clone(), source },
                AddError::Version(version) => NamesError::Version { path: arg.path.clone(), version },
            })?;
        }
        Ok(names)
    }

    /// Names the fleet's mirrors, by their keys, as `fleet` says at each copy.
    pub fn set_fleet(&mut self, fleet: watch::Receiver<BTreeMap<u32, FleetLabel>>) {
        self.fleet = Some(fleet);
    }

    /// Whether plain GRE of `key` is a mirror someone named (an OVS-mode session in `--names`,
    /// an OVS-mode fleet mirror's key), so that it is recorded without `--plain-gre`.
    pub fn knows_plain(&self, key: &InterfaceKey) -> bool {
        key.plain && (self.get(key).is_some() || self.is_fleet(key))
    }

    /// The interface of a fleet mirror's stream: one per mirror, whichever node sends it (its
    /// sender is left unspecified). Plain GRE is a fleet mirror's only when that mirror is in
    /// OVS mode (its GRE port sends key K); vmsniff's encapsulations only when it is not: plain
    /// GRE whose key an eBPF-mode mirror holds is someone else's (a GRE tenant network).
    pub fn fleet_interface(&self, key: &StreamKey) -> Option<InterfaceKey> {
        let interface = key.interface();
        self.is_fleet(&interface)
            .then_some(InterfaceKey { sender: IpAddr::V4(Ipv4Addr::UNSPECIFIED), ..interface })
    }

    /// Asked for every copy: formats nothing.
    fn is_fleet(&self, key: &InterfaceKey) -> bool {
        self.fleet_label(key, |_| ()).is_some()
    }

    fn fleet_name(&self, key: &InterfaceKey) -> Option<String> {
        self.fleet_label(key, |label| printable(&label.name))
    }

    fn fleet_label<R>(&self, key: &InterfaceKey, read: impl FnOnce(&FleetLabel) -> R) -> Option<R> {
        self.fleet.as_ref()?.borrow().get(&key.session).filter(|label| label.plain_gre == key.plain).map(read)
    }

    fn add(&mut self, sender: Option<IpAddr>, text: &str) -> Result<(), AddError> {
        let file: StatusFile = serde_json::from_str(text).map_err(AddError::Parse)?;
        if file.version != 1 {
            return Err(AddError::Version(file.version));
        }
        for s in file.sessions {
            let Some(key) = s.key else { continue };
            let encap = printable(&s.encap.unwrap_or_else(|| "gre".into()));
            let label = match (&s.vm, s.nic) {
                (Some(vm), Some(nic)) => format!("{} nic {nic}", printable(vm)),
                (Some(vm), None) => printable(vm),
                _ => printable(&s.tap),
            };
            let erspan = encap.starts_with("erspan");
            let named = Named { session: s.session, label, tap: printable(&s.tap), encap };
            if s.mode.as_deref() == Some("ovs") && !erspan {
                self.plain.insert((sender, key), named);
            } else {
                self.by_key.insert((sender, erspan, key), named);
            }
        }
        Ok(())
    }

    /// The name of an interface's session: the sender's own file first, then one for any sender.
    pub fn get(&self, key: &InterfaceKey) -> Option<&Named> {
        if key.plain {
            return self
                .plain
                .get(&(Some(key.sender), key.session))
                .or_else(|| self.plain.get(&(None, key.session)));
        }
        self.by_key
            .get(&(Some(key.sender), key.erspan, key.session))
            .or_else(|| self.by_key.get(&(None, key.erspan, key.session)))
    }

    /// The pcapng interface name: `SENDER session N` (N = the key on the wire, the session id
    /// unless `--key` was given), or `VM nic N session S` / `TAP session S` from `--names`;
    /// a plain GRE mirror's is `SENDER gre key K`.
    pub fn interface_name(&self, key: &InterfaceKey) -> String {
        if let Some(name) = self.fleet_name(key) {
            return name;
        }
        match (self.get(key), key.plain) {
            (Some(named), _) => format!("{} session {}", named.label, named.session),
            (None, true) => format!("{} gre key {}", key.sender, key.session),
            (None, false) => format!("{} session {}", key.sender, key.session),
        }
    }

    /// The interface description: everything known about the stream.
    pub fn interface_description(&self, key: &InterfaceKey) -> String {
        let what = match (key.plain, key.erspan, key.vxlan) {
            (true, _, _) => format!("GRE mirror key {}", key.session),
            (false, true, _) => format!("ERSPAN span id {}", key.session),
            (false, false, true) => format!("vmsniff VXLAN key {}", key.session),
            (false, false, false) => format!("vmsniff GRE key {}", key.session),
        };
        if let Some(name) = self.fleet_name(key) {
            return format!("fleet mirror {name}: {what}, from whichever node runs it");
        }
        match self.get(key) {
            Some(n) => format!(
                "{what} from {}: vmsniff session {} on {} ({}), encap {}",
                key.sender, n.session, n.label, n.tap, n.encap
            ),
            None => format!("{what} from {}", key.sender),
        }
    }
}

#[derive(Debug)]
enum AddError {
    Parse(serde_json::Error),
    Version(u64),
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    const STATUS: &str = r#"{"version": 1, "sessions": [
        {"session": 1, "tap": "tapvm0", "key": 7, "encap": "gre", "direction": "both"},
        {"session": 2, "tap": "tapf7", "key": 2, "encap": "erspan", "vm": "c-private", "nic": 0},
        {"session": 3, "tap": "mir0", "key": null, "encap": "none"}
    ]}"#;

    fn key(sender: [u8; 4], erspan: bool, session: u32) -> InterfaceKey {
        InterfaceKey { sender: Ipv4Addr::from(sender).into(), erspan, plain: false, vxlan: false, session }
    }

    #[test]
    fn sessions_are_named_after_vm_or_tap() {
        let mut names = Names::default();
        names.add(None, STATUS).unwrap();
        assert_eq!(names.interface_name(&key([192, 0, 2, 1], false, 7)), "tapvm0 session 1");
        assert_eq!(names.interface_name(&key([192, 0, 2, 1], true, 2)), "c-private nic 0 session 2");
        assert_eq!(
            names.interface_name(&key([192, 0, 2, 1], false, 2)),
            "192.0.2.1 session 2",
            "GRE key 2 is not the ERSPAN session"
        );
        let plain = InterfaceKey { plain: true, ..key([192, 0, 2, 9], false, 7) };
        assert_eq!(names.interface_name(&plain), "192.0.2.9 gre key 7");
        assert!(
            names
                .interface_description(&key([192, 0, 2, 1], false, 7))
                .contains("vmsniff session 1 on tapvm0")
        );
    }

    #[test]
    fn ovs_sessions_name_their_plain_gre_and_hostile_names_are_made_printable() {
        let mut names = Names::default();
        let evil = format!("\u{1b}]0;pwned\u{7}{}", "x".repeat(200));
        let status = serde_json::json!({"version": 1, "sessions": [
            {"session": 4, "mode": "ovs", "tap": "qvo1", "key": 4, "encap": "gre", "vm": evil, "nic": 0},
        ]});
        names.add(None, &status.to_string()).unwrap();
        let plain = InterfaceKey { plain: true, ..key([192, 0, 2, 9], false, 4) };
        assert!(names.knows_plain(&plain));
        assert!(!names.knows_plain(&InterfaceKey { session: 5, ..plain }));
        let name = names.interface_name(&plain);
        assert!(name.starts_with("?]0;pwned?xxx"), "{name}");
        assert!(!name.chars().any(char::is_control), "{name}");
        assert!(name.chars().count() < NAME_CHARS + 20, "{name}");
        assert_eq!(names.interface_name(&key([192, 0, 2, 9], false, 4)), "192.0.2.9 session 4");
    }

    #[test]
    fn a_senders_own_file_comes_first() {
        let mut names = Names::default();
        names.add(None, STATUS).unwrap();
        names
            .add(
                Some(Ipv4Addr::new(192, 0, 2, 5).into()),
                r#"{"version":1,"sessions":[{"session":9,"tap":"tapx","key":7}]}"#,
            )
            .unwrap();
        assert_eq!(names.interface_name(&key([192, 0, 2, 5], false, 7)), "tapx session 9");
        assert_eq!(names.interface_name(&key([192, 0, 2, 6], false, 7)), "tapvm0 session 1");
    }

    fn fleet_label(name: &str, plain_gre: bool) -> FleetLabel {
        FleetLabel { name: name.to_owned(), plain_gre }
    }

    #[test]
    fn a_fleet_mirror_has_one_interface_named_after_it_whoever_sends() {
        let mut names = Names::default();
        let (fleet, receiver) =
            watch::channel(BTreeMap::from([(7, fleet_label("web (c-private nic 0)", false))]));
        names.set_fleet(receiver);
        let stream = |sender: [u8; 4]| StreamKey {
            sender: Ipv4Addr::from(sender).into(),
            kind: super::super::decode::Kind::VmsniffGre,
            session: 7,
            direction: None,
        };
        let a = names.fleet_interface(&stream([192, 0, 2, 1])).unwrap();
        assert_eq!(Some(a), names.fleet_interface(&stream([192, 0, 2, 2])));
        assert_eq!(names.interface_name(&a), "web (c-private nic 0)");
        assert_eq!(names.interface_name(&key([192, 0, 2, 1], false, 7)), "web (c-private nic 0)");
        assert!(names.interface_description(&a).contains("fleet mirror web"));
        assert_eq!(names.fleet_interface(&StreamKey { session: 8, ..stream([192, 0, 2, 1]) }), None);
        // Declared later: named from then on.
        fleet.send_modify(|f| {
            f.insert(8, fleet_label("db (c-db)", false));
        });
        let b = names.fleet_interface(&StreamKey { session: 8, ..stream([192, 0, 2, 1]) }).unwrap();
        assert_eq!(names.interface_name(&b), "db (c-db)");
    }

    #[test]
    fn an_ovs_mode_fleet_mirrors_plain_gre_has_its_one_interface_and_a_tenants_has_none() {
        use super::super::decode::Kind;
        let mut names = Names::default();
        let (_fleet, receiver) = watch::channel(BTreeMap::from([
            (4, fleet_label("ovs-web (c-private nic 0)", true)),
            (7, fleet_label("web (c-web)", false)),
        ]));
        names.set_fleet(receiver);
        let stream = |sender: [u8; 4], kind, session| StreamKey {
            sender: Ipv4Addr::from(sender).into(),
            kind,
            session,
            direction: None,
        };
        // Key 4, an OVS-mode mirror: its plain GRE from either node goes to one interface.
        let a = names.fleet_interface(&stream([192, 0, 2, 1], Kind::PlainGre, 4)).unwrap();
        assert_eq!(Some(a), names.fleet_interface(&stream([192, 0, 2, 2], Kind::PlainGre, 4)));
        assert!(a.plain);
        assert!(names.knows_plain(&a));
        assert_eq!(names.interface_name(&a), "ovs-web (c-private nic 0)");
        assert!(names.interface_description(&a).contains("fleet mirror ovs-web"), "{a:?}");
        // vmsniff's GRE with key 4 is not that mirror's.
        assert_eq!(names.fleet_interface(&stream([192, 0, 2, 1], Kind::VmsniffGre, 4)), None);
        // Key 7, an eBPF-mode mirror: plain GRE with its key is a tenant network's, neither
        // named after it nor recorded without --plain-gre; its own copies keep their interface.
        let tenant = stream([192, 0, 2, 1], Kind::PlainGre, 7);
        assert_eq!(names.fleet_interface(&tenant), None);
        assert!(!names.knows_plain(&tenant.interface()));
        assert_eq!(names.interface_name(&tenant.interface()), "192.0.2.1 gre key 7");
        let own = names.fleet_interface(&stream([192, 0, 2, 1], Kind::VmsniffGre, 7)).unwrap();
        assert_eq!(names.interface_name(&own), "web (c-web)");
    }

    #[test]
    fn bad_files_and_arguments_are_refused() {
        assert!(matches!(Names::default().add(None, "[1, 2]"), Err(AddError::Parse(_))));
        assert!(matches!(
            Names::default().add(None, r#"{"version": 2, "sessions": []}"#),
            Err(AddError::Version(2))
        ));
        assert_eq!(
            parse_names_arg("192.0.2.1=/x.json"),
            Ok(NamesArg { sender: Some(Ipv4Addr::new(192, 0, 2, 1).into()), path: "/x.json".into() })
        );
        assert_eq!(parse_names_arg("2001:db8::1=/x.json").unwrap().sender, "2001:db8::1".parse().ok());
        assert_eq!(parse_names_arg("/x.json").unwrap().sender, None);
        assert!(parse_names_arg("host=/x.json").is_err());
        let missing =
            Names::load(&[NamesArg { sender: None, path: "/nonexistent/s.json".into() }]).unwrap_err();
        assert!(missing.to_string().contains("/nonexistent/s.json"));
    }
}
