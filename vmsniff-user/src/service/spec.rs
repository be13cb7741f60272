//! One mirror, typed: what `attach`'s flags and a daemon config table both mean, parsed and
//! checked once ([`MirrorFlags::spec`]). Every service operation takes it; front ends never
//! hand arguments further down. Its argument form ([`MirrorSpec::to_args`]) is how the daemon
//! records what it applied (its state file, OVSDB's rows), read back by [`MirrorSpec::from_args`].
use std::{collections::BTreeMap, net::IpAddr};

use clap::Parser;
use thiserror::Error;

use super::flags::MirrorFlags;
use crate::{
    model::{
        error::chain,
        mirror::{AttachModeChoice, Directions, Mode, NicChoice},
        wire::{Encap, EncapError},
    },
    plan::{
        controls::Controls,
        filter::{FilterError, compile},
    },
};

/// Which NIC: a VM selector (through libvirt) or an interface named directly.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NicRef {
    /// A Nova name, UUID, libvirt domain, MAC or tap; `nic` chooses among its NICs.
    Vm { selector: String, nic: NicChoice },
    /// `--tap`: this interface, no libvirt. `nic` is refused when resolved (an interface has no
    /// NICs to choose among), with the same words as the command line always used.
    Tap { name: String, nic: NicChoice },
}

impl NicRef {
    pub fn choice(&self) -> NicChoice {
        match self {
            NicRef::Vm { nic, .. } | NicRef::Tap { nic, .. } => *nic,
        }
    }

    /// The VM selector, if the NIC is named through one.
    pub fn selector(&self) -> Option<&str> {
        match self {
            NicRef::Vm { selector, .. } => Some(selector),
            NicRef::Tap { .. } => None,
        }
    }

    /// The tap, if named directly.
    pub fn tap(&self) -> Option<&str> {
        match self {
            NicRef::Tap { name, .. } => Some(name),
            NicRef::Vm { .. } => None,
        }
    }
}

/// Where copies go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Destination {
    /// A collector (IPv4 or IPv6), through vmsniff's tunnel devices (eBPF mode) or an OVS GRE
    /// port.
    Collector { remote: IpAddr, ttl: u8, tos: u8, encap: Encap },
    /// `--to-dev`: an existing local interface (eBPF mode only).
    Device { name: String },
}

/// One mirror, checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MirrorSpec {
    pub nic: NicRef,
    pub mode: Mode,
    pub destination: Destination,
    /// `--key`; the session id when absent.
    pub key: Option<u32>,
    pub direction: Directions,
    /// Default (every frame, whole) in OVS mode, which has none.
    pub controls: Controls,
    /// `--attach-mode`, when given (eBPF mode).
    pub attach_mode: Option<AttachModeChoice>,
}

/// The keys a change of which `vmsniff update` (and so a daemon reload) carries in place.
pub const LIVE_KEYS: [&str; 4] = ["filter", "snaplen", "sample", "rate-limit"];

#[derive(Debug, Error)]
pub enum SpecError {
    #[error("say which VM: its Nova name, UUID, libvirt domain or MAC, or its tap with --tap TAP")]
    NoVm,
    #[error(
        "{} {} eBPF mode's: an OVS mirror copies every frame whole to a GRE collector (--to), and \
         has no tc programs to attach. Drop {}, or drop --mode ovs",
        given.join(", "),
        if given.len() == 1 { "is" } else { "are" },
        if given.len() == 1 { "it" } else { "them" }
    )]
    EbpfOnly { given: Vec<&'static str> },
    #[error("--mode ovs sends copies to a GRE collector: give --to IP")]
    OvsWithoutCollector,
    #[error(transparent)]
    Filter(#[from] FilterError),
    #[error(transparent)]
    Encap(#[from] EncapError),
    #[error("a recorded mirror's arguments no longer parse ({message}): it is made again")]
    Record { message: String },
}

impl SpecError {
    /// The flag the error is about, for a config's `file:line`.
    pub fn flag(&self) -> &'static str {
        match self {
            SpecError::NoVm => "vm",
            SpecError::EbpfOnly { .. } | SpecError::OvsWithoutCollector => "mode",
            SpecError::Filter(_) => "filter",
            SpecError::Encap(EncapError::PortWithoutVxlan { .. }) => "port",
            SpecError::Encap(_) | SpecError::Record { .. } => "encap",
        }
    }
}

impl MirrorFlags {
    /// Checks everything that needs no kernel, libvirt or OVSDB: what the command line refuses
    /// before it touches anything, and what a config refuses at start or reload.
    pub fn spec(&self) -> Result<MirrorSpec, SpecError> {
        let args = &self.mirror;
        let nic_choice = args.nic.choice();
        let nic = match (&args.vm, &args.tap) {
            (_, Some(tap)) => NicRef::Tap { name: tap.clone(), nic: nic_choice },
            (Some(vm), None) => NicRef::Vm { selector: vm.clone(), nic: nic_choice },
            (None, None) => return Err(SpecError::NoVm),
        };
        if self.mode == Mode::Ovs {
            self.refuse_ebpf_options()?;
        }
        let c = &self.controls;
        let controls = Controls {
            filter: c.filter.as_deref().map(compile).transpose()?,
            sample_every: c.sample.unwrap_or(1),
            rate_limit: c.rate_limit,
            snaplen: c.snaplen.unwrap_or(0),
        };
        let encap = args.encap.checked(args.erspan_hwid, args.port)?;
        let destination = match (&args.to, &args.to_dev) {
            (Some(remote), _) => {
                Destination::Collector { remote: *remote, ttl: args.ttl, tos: args.tos, encap }
            }
            (None, Some(name)) => Destination::Device { name: name.clone() },
            // clap requires one of them; OVS mode said so above.
            (None, None) => return Err(SpecError::OvsWithoutCollector),
        };
        Ok(MirrorSpec {
            nic,
            mode: self.mode,
            destination,
            key: args.key,
            direction: args.direction,
            controls,
            attach_mode: args.attach_mode,
        })
    }

    /// OVS mode has no tc programs and one encapsulation: each eBPF-only flag is named.
    fn refuse_ebpf_options(&self) -> Result<(), SpecError> {
        let (controls, mirror) = (&self.controls, &self.mirror);
        let given: Vec<&'static str> = [
            (controls.filter.is_some(), "--filter"),
            (controls.snaplen.is_some(), "--snaplen"),
            (controls.sample.is_some(), "--sample"),
            (controls.rate_limit.is_some(), "--rate-limit"),
            (mirror.to_dev.is_some(), "--to-dev"),
            (mirror.attach_mode.is_some(), "--attach-mode"),
            // vmsniff's OVS mirror sends through an OVS GRE port: plain GRE with the key.
            (mirror.encap != crate::model::wire::EncapChoice::Gre, encap_flag(mirror.encap)),
            (mirror.port.is_some(), "--port"),
            (mirror.erspan_hwid.is_some(), "--erspan-hwid"),
        ]
        .into_iter()
        .filter_map(|(given, name)| given.then_some(name))
        .collect();
        if !given.is_empty() {
            return Err(SpecError::EbpfOnly { given });
        }
        if mirror.to.is_none() {
            return Err(SpecError::OvsWithoutCollector);
        }
        Ok(())
    }
}

/// `--encap X` as the operator gave it, for naming a refused flag.
fn encap_flag(encap: crate::model::wire::EncapChoice) -> &'static str {
    use crate::model::wire::EncapChoice;
    match encap {
        EncapChoice::Gre => "--encap gre",
        EncapChoice::Erspan => "--encap erspan",
        EncapChoice::Erspan1 => "--encap erspan1",
        EncapChoice::Vxlan => "--encap vxlan",
    }
}

/// The flags alone, as a config table or a record gives them.
#[derive(Parser)]
#[command(no_binary_name = false, disable_help_flag = true, disable_version_flag = true)]
pub struct FlagsCli {
    #[command(flatten)]
    pub flags: MirrorFlags,
}

impl FlagsCli {
    pub fn parse_args(args: &[String]) -> Result<MirrorFlags, clap::Error> {
        Self::try_parse_from(std::iter::once("mirror".to_owned()).chain(args.iter().cloned()))
            .map(|c| c.flags)
    }
}

impl MirrorSpec {
    /// Its flags, each given only where it differs from the default, in the parser's order: the
    /// same spec always gives the same arguments.
    pub fn to_args(&self) -> Vec<String> {
        let mut args = Vec::new();
        // The selector is positional, and first.
        if let NicRef::Vm { selector, .. } = &self.nic {
            args.push(selector.clone());
        }
        let mut flag = |name: &str, value: String| {
            args.push(format!("--{name}"));
            args.push(value);
        };
        if let NicRef::Tap { name, .. } = &self.nic {
            flag("tap", name.clone());
        }
        let nic = self.nic.choice();
        match nic {
            NicChoice::Index(index) => flag("nic", index.to_string()),
            NicChoice::Mac(mac) => flag("mac", mac.to_string()),
            NicChoice::Unspecified => {}
        }
        let encap = match &self.destination {
            Destination::Collector { remote, ttl, tos, encap } => {
                flag("to", remote.to_string());
                if *ttl != 64 {
                    flag("ttl", ttl.to_string());
                }
                if *tos != 0 {
                    flag("tos", tos.to_string());
                }
                Some(*encap)
            }
            Destination::Device { name } => {
                flag("to-dev", name.clone());
                None
            }
        };
        if let Some(key) = self.key {
            flag("key", key.to_string());
        }
        if self.direction != Directions::Both {
            flag("direction", self.direction.as_str().to_owned());
        }
        match encap {
            Some(Encap::ErspanIII { hwid }) => {
                flag("encap", "erspan".into());
                if hwid != 0 {
                    flag("erspan-hwid", hwid.to_string());
                }
            }
            Some(Encap::ErspanII) => flag("encap", "erspan1".into()),
            Some(Encap::Vxlan { port }) => {
                flag("encap", "vxlan".into());
                if port != crate::model::wire::VXLAN_PORT {
                    flag("port", port.to_string());
                }
            }
            Some(Encap::Gre) | None => {}
        }
        if let Some(mode) = self.attach_mode {
            flag("attach-mode", mode.as_str().to_owned());
        }
        let c = &self.controls;
        if let Some(filter) = &c.filter {
            flag("filter", filter.expression.clone());
        }
        if c.sample_every > 1 {
            flag("sample", c.sample_every.to_string());
        }
        if let Some(limit) = &c.rate_limit {
            flag("rate-limit", limit.to_string());
        }
        if c.snaplen != 0 {
            flag("snaplen", c.snaplen.to_string());
        }
        if self.mode == Mode::Ovs {
            flag("mode", "ovs".into());
        }
        args
    }

    /// A spec recorded with [`MirrorSpec::to_args`] (or, before this release, as the config's
    /// own flags: both parse alike).
    pub fn from_args(args: &[String]) -> Result<MirrorSpec, SpecError> {
        let flags = FlagsCli::parse_args(args).map_err(|e| SpecError::Record {
            message: e.render().to_string().lines().next().unwrap_or_default().to_owned(),
        })?;
        flags.spec().map_err(|e| SpecError::Record { message: chain(&e) })
    }

    /// The keys whose values differ from `other`'s, spelled as flags without `--` (the VM
    /// selector is `vm`).
    pub fn changed_keys(&self, other: &MirrorSpec) -> Vec<String> {
        let (a, b) = (keyed(&self.to_args()), keyed(&other.to_args()));
        let mut keys: Vec<String> =
            a.keys().chain(b.keys()).filter(|k| a.get(*k) != b.get(*k)).cloned().collect();
        keys.sort();
        keys.dedup();
        keys
    }

    /// Whether only keys `vmsniff update` changes in place differ from `other`.
    pub fn differs_only_live(&self, other: &MirrorSpec) -> bool {
        self.changed_keys(other).iter().all(|k| LIVE_KEYS.contains(&k.as_str()))
    }

    pub fn is_ovs(&self) -> bool {
        self.mode == Mode::Ovs
    }
}

/// `--flag value` pairs of canonical arguments (the selector under `vm`).
fn keyed(args: &[String]) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut i = 0;
    while i < args.len() {
        match args[i].strip_prefix("--") {
            Some(flag) => {
                out.insert(flag.to_owned(), args.get(i + 1).cloned().unwrap_or_default());
                i += 2;
            }
            None => {
                out.insert("vm".to_owned(), args[i].clone());
                i += 1;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(args: &[&str]) -> Result<MirrorSpec, SpecError> {
        let args: Vec<String> = args.iter().map(|s| (*s).to_owned()).collect();
        FlagsCli::parse_args(&args).unwrap_or_else(|e| panic!("{e}")).spec()
    }

    #[test]
    fn flags_become_one_typed_spec() {
        let s =
            spec(&["c-private", "--nic", "1", "--to", "192.0.2.2", "--key", "7", "--filter", "tcp"]).unwrap();
        assert_eq!(s.nic, NicRef::Vm { selector: "c-private".into(), nic: NicChoice::Index(1) });
        assert_eq!(
            s.destination,
            Destination::Collector {
                remote: IpAddr::from([192, 0, 2, 2]),
                ttl: 64,
                tos: 0,
                encap: Encap::Gre
            }
        );
        assert_eq!(s.key, Some(7));
        assert_eq!(s.controls.filter.as_ref().map(|f| f.expression.as_str()), Some("tcp"));
        assert_eq!(s.controls.sample_every, 1);
        assert_eq!(s.mode, Mode::Ebpf);
        let tap = spec(&["--tap", "tap0", "--to-dev", "mir0"]).unwrap();
        assert_eq!(tap.nic, NicRef::Tap { name: "tap0".into(), nic: NicChoice::Unspecified });
        assert_eq!(tap.destination, Destination::Device { name: "mir0".into() });
    }

    #[test]
    fn what_needs_no_kernel_is_refused_here() {
        assert!(matches!(spec(&["--to", "192.0.2.2"]), Err(SpecError::NoVm)));
        let e = spec(&["vm", "--to", "192.0.2.2", "--mode", "ovs", "--snaplen", "9", "--filter", "tcp"])
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "--filter, --snaplen are eBPF mode's: an OVS mirror copies every frame whole to a GRE \
             collector (--to), and has no tc programs to attach. Drop them, or drop --mode ovs"
        );
        assert!(matches!(spec(&["vm", "--to-dev", "x", "--mode", "ovs"]), Err(SpecError::EbpfOnly { .. })));
        assert!(matches!(
            spec(&["vm", "--to", "192.0.2.2", "--filter", "tcp port"]),
            Err(SpecError::Filter(_))
        ));
        assert!(matches!(
            spec(&["vm", "--to", "192.0.2.2", "--erspan-hwid", "3"]),
            Err(SpecError::Encap(EncapError::HwidWithoutErspan { .. }))
        ));
    }

    #[test]
    fn arguments_round_trip_and_name_what_changed() {
        for args in [
            vec!["c-private", "--mac", "FA:16:3E:00:00:01", "--to", "192.0.2.2", "--ttl", "9", "--tos", "4"],
            vec![
                "--tap",
                "tap0",
                "--to-dev",
                "mir0",
                "--direction",
                "in",
                "--snaplen",
                "96",
                "--sample",
                "3",
            ],
            vec![
                "vm",
                "--to",
                "192.0.2.2",
                "--encap",
                "erspan",
                "--erspan-hwid",
                "5",
                "--rate-limit",
                "10mbit",
            ],
            vec!["vm", "--to", "192.0.2.2", "--mode", "ovs", "--key", "9", "--direction", "out"],
            vec!["vm", "--to", "192.0.2.2", "--encap", "erspan1", "--attach-mode", "netlink"],
            vec!["vm", "--to", "2001:db8::2", "--encap", "vxlan", "--port", "8472", "--tos", "32"],
            vec!["vm", "--to", "2001:db8::2", "--encap", "vxlan"],
            vec!["vm", "--to", "2001:db8::2", "--mode", "ovs"],
        ] {
            let s = spec(&args).unwrap();
            assert_eq!(MirrorSpec::from_args(&s.to_args()).unwrap(), s, "{args:?} -> {:?}", s.to_args());
        }
        // Spelled differently, meant the same: no change.
        let a = spec(&["vm", "--to", "192.0.2.2", "--mac", "fa-16-3e-00-00-01", "--sample", "1"]).unwrap();
        let b =
            spec(&["vm", "--mac", "fa:16:3e:00:00:01", "--to", "192.0.2.2", "--direction", "both"]).unwrap();
        assert!(a.changed_keys(&b).is_empty());
        let c = spec(&[
            "vm",
            "--to",
            "192.0.2.2",
            "--mac",
            "fa:16:3e:00:00:01",
            "--filter",
            "udp",
            "--snaplen",
            "64",
        ])
        .unwrap();
        assert_eq!(a.changed_keys(&c), ["filter", "snaplen"]);
        assert!(a.differs_only_live(&c));
        let d = spec(&["other", "--to", "192.0.2.2"]).unwrap();
        assert!(a.changed_keys(&d).contains(&"vm".to_owned()));
        assert!(!a.differs_only_live(&d));
    }

    #[test]
    fn vxlan_and_ipv6_flags_are_checked() {
        let s = spec(&["vm", "--to", "2001:db8::2", "--encap", "vxlan"]).unwrap();
        assert!(matches!(
            s.destination,
            Destination::Collector { remote: IpAddr::V6(_), encap: Encap::Vxlan { port: 4789 }, .. }
        ));
        assert!(matches!(
            spec(&["vm", "--to", "192.0.2.2", "--port", "4789"]),
            Err(SpecError::Encap(EncapError::PortWithoutVxlan { encap: "gre" }))
        ));
        let args: Vec<String> = ["vm", "--to", "192.0.2.2", "--encap", "vxlan", "--port", "0"]
            .iter()
            .map(|s| (*s).to_owned())
            .collect();
        let e = FlagsCli::parse_args(&args).unwrap_err().to_string();
        assert!(e.contains("port 0 is no destination"), "{e}");
        let args: Vec<String> = ["vm", "--to", "fe80::1"].iter().map(|s| (*s).to_owned()).collect();
        assert!(FlagsCli::parse_args(&args).unwrap_err().to_string().contains("link-local"));
        let e = spec(&["vm", "--to", "192.0.2.2", "--mode", "ovs", "--encap", "vxlan"]).unwrap_err();
        assert!(e.to_string().starts_with("--encap vxlan is eBPF mode's"), "{e}");
    }

    #[test]
    fn a_record_that_no_longer_parses_says_so() {
        let e = MirrorSpec::from_args(&["vm".into(), "--colour".into(), "red".into()]).unwrap_err();
        assert!(matches!(e, SpecError::Record { .. }), "{e}");
    }
}
