//! From a VM selector (Nova name, UUID, libvirt domain, MAC or tap) and an optional NIC choice
//! to one VM NIC, over the VMs libvirt listed. Pure: every error names the fix.
use crate::model::mirror::NicChoice;
use std::fmt;

use thiserror::Error;

use crate::{
    model::mac::Mac,
    resolve::{
        domain::{Nic, Plug, normalize_uuid},
        interface::{InterfaceError, validate_name},
        libvirt::{Vm, VmState},
    },
};

/// A VM found by a selector; `nic` when the selector itself named a NIC (a MAC, a tap).
#[derive(Debug)]
pub struct Found<'a> {
    pub vm: &'a Vm,
    pub nic: Option<usize>,
}

#[derive(Debug, Error)]
pub enum SelectError {
    #[error(
        "no VM matches {selector:?}{}; `vmsniff list` shows every VM with its NICs (a VM can be \
         named by its Nova name, UUID, libvirt domain, MAC or tap)",
        suggest(suggestions)
    )]
    UnknownVm { selector: String, suggestions: Vec<String> },
    #[error(
        "{selector:?} names {} VMs; name one by its UUID:\n{}",
        matches.len(),
        matches.iter().map(|m| format!("  {m}")).collect::<Vec<_>>().join("\n")
    )]
    Ambiguous { selector: String, matches: Vec<VmSummary> },
    #[error(
        "{selector:?} is the {kind} of VM {identified} and also the Nova name of {}; a name a \
         tenant chose never stands in for an identifier, so vmsniff picks neither: name the VM by \
         its UUID",
        named.iter().map(|m| format!("VM {m}")).collect::<Vec<_>>().join(", ")
    )]
    NameCollides { selector: String, kind: &'static str, identified: Box<VmSummary>, named: Vec<VmSummary> },
    #[error(
        "VM {vm} is {}: it has no tap to mirror until it runs (`openstack server start` or \
         `virsh start`)",
        state.as_str()
    )]
    NotRunning { vm: String, state: VmState },
    #[error("VM {vm} has no NIC {index}: it has {} (--nic counts from 0):\n{nics}", nics.0.len())]
    NicOutOfRange { vm: String, index: usize, nics: NicList },
    #[error("VM {vm} has no NIC with MAC {mac}; its NICs:\n{nics}")]
    NoNicWithMac { vm: String, mac: Mac, nics: NicList },
    #[error("VM {vm} has {} NICs: choose one with --nic N or --mac MAC:\n{nics}", nics.0.len())]
    ChooseNic { vm: String, nics: NicList },
    #[error(
        "{selector:?} is NIC {named} of VM {vm}, but NIC {chosen} was chosen with --nic/--mac; \
         drop one of the two"
    )]
    NicConflict { selector: String, vm: String, named: usize, chosen: usize },
    #[error("cannot mirror NIC {index} of VM {vm} (type {kind}) because {why}")]
    Unmirrorable { vm: String, index: usize, kind: String, why: &'static str },
    #[error(
        "NIC {index} of VM {vm} has no <target dev> in its libvirt XML, so its tap is unknown; \
         check `virsh domiflist {domain}` and give the tap with --tap TAP"
    )]
    NoTap { vm: String, domain: String, index: usize },
    #[error("NIC {index} of VM {vm}: libvirt names its tap {tap:?}, which vmsniff will not use")]
    BadTapName {
        vm: String,
        index: usize,
        tap: String,
        #[source]
        source: Box<InterfaceError>,
    },
}

fn suggest(suggestions: &[String]) -> String {
    match suggestions {
        [] => String::new(),
        [one] => format!(" (did you mean {one}?)"),
        many => format!(" (did you mean one of {}?)", many.join(", ")),
    }
}

/// A VM as errors list it.
#[derive(Debug, Clone)]
pub struct VmSummary {
    pub name: String,
    pub domain: String,
    pub uuid: String,
    pub state: VmState,
}

impl VmSummary {
    fn of(vm: &Vm) -> Self {
        VmSummary {
            name: vm.display_name().to_owned(),
            domain: vm.xml.name.clone(),
            uuid: vm.xml.uuid.clone(),
            state: vm.state,
        }
    }
}

impl fmt::Display for VmSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}  {} (domain {}, {})", self.uuid, self.name, self.domain, self.state.as_str())
    }
}

/// A VM's NICs as errors list them: index, MAC, tap, plug kind.
#[derive(Debug, Clone)]
pub struct NicList(pub Vec<String>);

impl NicList {
    pub fn of(vm: &Vm) -> Self {
        NicList(
            vm.xml
                .nics
                .iter()
                .map(|n| {
                    format!(
                        "  --nic {}  {}  {}  {}",
                        n.index,
                        n.mac.map_or("-".into(), |m| m.to_string()),
                        n.target_dev.as_deref().unwrap_or("-"),
                        n.plug.kind(n)
                    )
                })
                .collect(),
        )
    }
}

impl fmt::Display for NicList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0.join("\n"))
    }
}

/// Finds the VM a selector names. Identifiers Nova and Neutron assign (a UUID, a MAC, the
/// libvirt domain, a tap) are matched first and exactly; a Nova name, which the tenant chooses,
/// never stands in for one. A selector that is one VM's MAC, domain or tap and another VM's
/// name is refused naming both; a UUID always names its own VM (it is what every refusal tells
/// the operator to use); a selector shaped like a UUID or a MAC matches no name at all.
pub fn find_vm<'a>(vms: &'a [Vm], selector: &str) -> Result<Found<'a>, SelectError> {
    let selector = selector.trim();
    let identified = by_identifier(vms, selector);
    let named: Vec<&Vm> = vms.iter().filter(|vm| vm.nova_name() == Some(selector)).collect();
    let named_elsewhere: Vec<&Vm> = named
        .iter()
        .copied()
        .filter(|vm| !identified.iter().any(|(hit, _, _)| std::ptr::eq(*hit, *vm)))
        .collect();
    if let Some((vm, _, kind)) = identified.first()
        && *kind != "UUID"
        && !named_elsewhere.is_empty()
    {
        return Err(SelectError::NameCollides {
            selector: selector.to_owned(),
            kind,
            identified: Box::new(VmSummary::of(vm)),
            named: named_elsewhere.into_iter().map(VmSummary::of).collect(),
        });
    }
    let mut distinct: Vec<&Vm> = Vec::new();
    for (vm, _, _) in &identified {
        if !distinct.iter().any(|d| std::ptr::eq(*d, *vm)) {
            distinct.push(vm);
        }
    }
    match distinct.as_slice() {
        [vm] => {
            let nics: Vec<Option<usize>> = identified.iter().map(|(_, nic, _)| *nic).collect();
            let nic = if nics.iter().all(|n| *n == nics[0]) { nics[0] } else { None };
            return Ok(Found { vm, nic });
        }
        [] => {}
        many => return Err(ambiguous(selector, many.iter().copied())),
    }
    if looks_like_identifier(selector) {
        // No VM has this UUID or MAC: a VM merely named so is not the one meant.
        return Err(unknown(vms, selector));
    }
    match named.as_slice() {
        [vm] => Ok(Found { vm, nic: None }),
        [] => Err(unknown(vms, selector)),
        _ => Err(ambiguous(selector, named.into_iter())),
    }
}

/// Every VM (and NIC) whose assigned identifiers include `selector`, with the kind that matched.
fn by_identifier<'a>(vms: &'a [Vm], selector: &str) -> Vec<(&'a Vm, Option<usize>, &'static str)> {
    let mac = selector.parse::<Mac>().ok();
    let uuid = normalize_uuid(selector);
    let mut hits = Vec::new();
    for vm in vms {
        if uuid.is_some() && normalize_uuid(&vm.xml.uuid) == uuid {
            hits.push((vm, None, "UUID"));
        }
        if vm.xml.name == selector {
            hits.push((vm, None, "libvirt domain"));
        }
        for nic in &vm.xml.nics {
            if mac.is_some() && nic.mac == mac {
                hits.push((vm, Some(nic.index), "MAC"));
            }
            if nic.target_dev.as_deref() == Some(selector) {
                hits.push((vm, Some(nic.index), "tap"));
            }
        }
    }
    hits
}

/// A MAC or a UUID: a selector of that shape means that identifier, never a name.
fn looks_like_identifier(selector: &str) -> bool {
    selector.parse::<Mac>().is_ok() || normalize_uuid(selector).is_some()
}

fn ambiguous<'a>(selector: &str, vms: impl Iterator<Item = &'a Vm>) -> SelectError {
    SelectError::Ambiguous { selector: selector.to_owned(), matches: vms.map(VmSummary::of).collect() }
}

fn unknown(vms: &[Vm], selector: &str) -> SelectError {
    SelectError::UnknownVm { selector: selector.to_owned(), suggestions: suggestions(vms, selector) }
}

/// Up to three names close to what was typed: a small edit distance, or a different case.
fn suggestions(vms: &[Vm], selector: &str) -> Vec<String> {
    let wanted = selector.to_lowercase();
    let limit = (wanted.chars().count() / 4).max(2);
    let mut close: Vec<(usize, String)> = vms
        .iter()
        .flat_map(|vm| vm.nova_name().into_iter().chain([vm.xml.name.as_str()]))
        .filter_map(|name| {
            let distance = strsim::levenshtein(&wanted, &name.to_lowercase());
            (distance <= limit).then(|| (distance, name.to_owned()))
        })
        .collect();
    close.sort();
    close.dedup_by(|a, b| a.1 == b.1);
    close.into_iter().take(3).map(|(_, name)| name).collect()
}

/// The NICs a selector and `--nic`/`--mac` stand for: the one named, else all of the VM's.
pub fn chosen_nics<'a>(
    selector: &str,
    found: &Found<'a>,
    choice: NicChoice,
) -> Result<Vec<&'a Nic>, SelectError> {
    Ok(if found.nic.is_some() || choice != NicChoice::Unspecified {
        vec![choose_nic(selector, found, choice)?]
    } else {
        found.vm.xml.nics.iter().collect()
    })
}

/// The NIC of a found VM that the selector and `--nic`/`--mac` name.
pub fn choose_nic<'a>(selector: &str, found: &Found<'a>, choice: NicChoice) -> Result<&'a Nic, SelectError> {
    let vm = found.vm;
    let name = || vm.display_name().to_owned();
    let chosen = match choice {
        NicChoice::Index(index) => {
            Some(vm.xml.nics.get(index).ok_or_else(|| SelectError::NicOutOfRange {
                vm: name(),
                index,
                nics: NicList::of(vm),
            })?)
        }
        NicChoice::Mac(mac) => Some(
            vm.xml.nics.iter().find(|n| n.mac == Some(mac)).ok_or_else(|| SelectError::NoNicWithMac {
                vm: name(),
                mac,
                nics: NicList::of(vm),
            })?,
        ),
        NicChoice::Unspecified => None,
    };
    match (found.nic, chosen) {
        (Some(named), Some(nic)) if named != nic.index => Err(SelectError::NicConflict {
            selector: selector.to_owned(),
            vm: name(),
            named,
            chosen: nic.index,
        }),
        (_, Some(nic)) => Ok(nic),
        (Some(named), None) => Ok(&vm.xml.nics[named]),
        (None, None) => match vm.xml.nics.as_slice() {
            [only] => Ok(only),
            [] => Err(SelectError::NicOutOfRange { vm: name(), index: 0, nics: NicList(Vec::new()) }),
            _ => Err(SelectError::ChooseNic { vm: name(), nics: NicList::of(vm) }),
        },
    }
}

/// The tap of a NIC, if vmsniff can mirror it now: the VM runs, the NIC is plugged through a
/// tap, and libvirt's name for that tap is a valid interface name.
pub fn mirrorable_tap<'a>(vm: &Vm, nic: &'a Nic) -> Result<&'a str, SelectError> {
    if let Plug::Unmirrorable { why } = nic.plug {
        return Err(SelectError::Unmirrorable {
            vm: vm.display_name().to_owned(),
            index: nic.index,
            kind: nic.interface_type.clone(),
            why,
        });
    }
    if !vm.state.has_taps() {
        return Err(SelectError::NotRunning { vm: vm.display_name().to_owned(), state: vm.state });
    }
    let tap = nic.target_dev.as_deref().ok_or_else(|| SelectError::NoTap {
        vm: vm.display_name().to_owned(),
        domain: vm.xml.name.clone(),
        index: nic.index,
    })?;
    validate_name(tap).map_err(|source| SelectError::BadTapName {
        vm: vm.display_name().to_owned(),
        index: nic.index,
        tap: tap.to_owned(),
        source: Box::new(source),
    })?;
    Ok(tap)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resolve::libvirt::tests::fixture_vms;

    fn nic_of(vms: &[Vm], selector: &str, choice: NicChoice) -> Result<(String, usize), SelectError> {
        let found = find_vm(vms, selector)?;
        let nic = choose_nic(selector, &found, choice)?;
        Ok((found.vm.xml.name.clone(), nic.index))
    }

    #[test]
    fn every_kind_of_selector_finds_the_vm() {
        let vms = fixture_vms();
        let private = ("instance-00000003".to_string(), 0);
        for selector in [
            "c-private",
            "instance-00000003",
            "3f2a9c1e-7b4d-4e8f-9a6b-1c2d3e4f5a6b",
            "3F2A9C1E7B4D4E8F9A6B1C2D3E4F5A6B",
            "fa:16:3e:11:22:33",
            "FA-16-3E-11-22-33",
            "tapf7eae624-34",
        ] {
            assert_eq!(nic_of(&vms, selector, NicChoice::Index(0)).unwrap(), private, "{selector}");
        }
        assert_eq!(nic_of(&vms, "fa:16:3e:44:55:66", NicChoice::Unspecified).unwrap().1, 1);
        assert_eq!(nic_of(&vms, "tap8e3c1a52-07", NicChoice::Unspecified).unwrap().1, 1);
        assert_eq!(nic_of(&vms, "c-web", NicChoice::Unspecified).unwrap().0, "instance-00000004");
        let mac = "FA:16:3E:44:55:66".parse().unwrap();
        assert_eq!(nic_of(&vms, "c-private", NicChoice::Mac(mac)).unwrap().1, 1);
    }

    #[test]
    fn a_multi_nic_vm_needs_a_choice_and_lists_its_nics() {
        let vms = fixture_vms();
        let err = nic_of(&vms, "c-private", NicChoice::Unspecified).unwrap_err();
        assert!(matches!(err, SelectError::ChooseNic { .. }));
        let text = err.to_string();
        assert!(text.contains("--nic N or --mac MAC"), "{text}");
        assert!(text.contains("--nic 0  fa:16:3e:11:22:33  tapf7eae624-34  hybrid"), "{text}");
        assert!(text.contains("--nic 1  fa:16:3e:44:55:66  tap8e3c1a52-07  ovs"), "{text}");

        let err = nic_of(&vms, "c-private", NicChoice::Index(2)).unwrap_err();
        assert!(matches!(err, SelectError::NicOutOfRange { index: 2, .. }), "{err}");
        assert!(err.to_string().contains("has 2"), "{err}");
        let err =
            nic_of(&vms, "c-private", NicChoice::Mac("fa:16:3e:00:00:00".parse().unwrap())).unwrap_err();
        assert!(matches!(err, SelectError::NoNicWithMac { .. }), "{err}");
        let err = nic_of(&vms, "fa:16:3e:11:22:33", NicChoice::Index(1)).unwrap_err();
        assert!(matches!(err, SelectError::NicConflict { named: 0, chosen: 1, .. }), "{err}");
    }

    #[test]
    fn a_shared_nova_name_is_ambiguous_and_lists_uuids() {
        let vms = fixture_vms();
        let err = find_vm(&vms, "c-dup").unwrap_err();
        let SelectError::Ambiguous { matches, .. } = &err else { panic!("{err}") };
        assert_eq!(matches.len(), 2);
        let text = err.to_string();
        assert!(text.contains("0e1d2c3b-4a59-4687-9a6b-5c4d3e2f1a0b"), "{text}");
        assert!(text.contains("6a7b8c9d-0e1f-4a2b-8c3d-4e5f6a7b8c9d"), "{text}");
        assert!(text.contains("UUID"), "{text}");
        // Its UUID, or its domain, tells them apart.
        assert_eq!(
            nic_of(&vms, "6a7b8c9d-0e1f-4a2b-8c3d-4e5f6a7b8c9d", NicChoice::Unspecified).unwrap().0,
            "instance-00000006"
        );
        assert_eq!(nic_of(&vms, "instance-00000005", NicChoice::Unspecified).unwrap().0, "instance-00000005");
    }

    /// The fixture with c-web renamed by its tenant to `name`.
    fn renamed_web(name: &str) -> Vec<Vm> {
        let mut vms = fixture_vms();
        let web = vms.iter_mut().find(|vm| vm.xml.name == "instance-00000004").unwrap();
        web.xml.nova.as_mut().unwrap().name = Some(name.to_owned());
        vms
    }

    #[test]
    fn a_tenants_name_never_stands_in_for_another_vms_identifier() {
        // c-web's tenant names it like c-private's tap, domain, UUID and MAC (any spelling).
        for (hostile, kind) in
            [("tapf7eae624-34", "tap"), ("instance-00000003", "libvirt domain"), ("fa:16:3e:11:22:33", "MAC")]
        {
            let vms = renamed_web(hostile);
            let err = find_vm(&vms, hostile).unwrap_err();
            let SelectError::NameCollides { kind: found_kind, identified, named, .. } = &err else {
                panic!("{hostile}: {err}")
            };
            assert_eq!(*found_kind, kind);
            assert_eq!(identified.domain, "instance-00000003", "{err}");
            assert_eq!(named[0].domain, "instance-00000004", "{err}");
            assert!(err.to_string().contains("UUID"), "{err}");
            // Each VM's own UUID still names it.
            assert_eq!(
                find_vm(&vms, "9b8a7c6d-5e4f-4a3b-8c2d-1e0f9a8b7c6d").unwrap().vm.xml.name,
                "instance-00000004"
            );
            assert_eq!(
                find_vm(&vms, "3f2a9c1e-7b4d-4e8f-9a6b-1c2d3e4f5a6b").unwrap().vm.xml.name,
                "instance-00000003"
            );
        }
        // Named like another VM's UUID: the UUID names its own VM, never the namesake.
        let vms = renamed_web("3f2a9c1e-7b4d-4e8f-9a6b-1c2d3e4f5a6b");
        assert_eq!(
            find_vm(&vms, "3F2A9C1E7B4D4E8F9A6B1C2D3E4F5A6B").unwrap().vm.xml.name,
            "instance-00000003"
        );
        // A name shaped like a UUID or a MAC that no VM has is not matched as a name.
        for shaped in ["00000000-0000-0000-0000-000000000000", "fa:16:3e:00:00:00"] {
            let vms = renamed_web(shaped);
            assert!(matches!(find_vm(&vms, shaped), Err(SelectError::UnknownVm { .. })), "{shaped}");
        }
        // A VM named like its own domain is simply that VM.
        let mut vms = fixture_vms();
        vms.iter_mut()
            .find(|vm| vm.xml.name == "instance-00000004")
            .unwrap()
            .xml
            .nova
            .as_mut()
            .unwrap()
            .name = Some("instance-00000004".into());
        assert_eq!(find_vm(&vms, "instance-00000004").unwrap().vm.xml.name, "instance-00000004");
    }

    #[test]
    fn unknown_vms_get_close_names() {
        let vms = fixture_vms();
        let err = find_vm(&vms, "c-privat").unwrap_err();
        assert!(err.to_string().contains("did you mean c-private?"), "{err}");
        let err = find_vm(&vms, "C-WEB").unwrap_err();
        assert!(err.to_string().contains("c-web"), "{err}");
        let err = find_vm(&vms, "instance-00000013").unwrap_err();
        let SelectError::UnknownVm { suggestions, .. } = &err else { panic!("{err}") };
        assert_eq!(suggestions[0], "instance-00000003", "{err}");
        let err = find_vm(&vms, "zzzzzzzzzz").unwrap_err();
        assert!(
            matches!(&err, SelectError::UnknownVm { suggestions, .. } if suggestions.is_empty()),
            "{err}"
        );
        assert!(err.to_string().contains("vmsniff list"), "{err}");
        // A UUID or MAC that no VM has is unknown too.
        assert!(matches!(
            find_vm(&vms, "00000000-0000-0000-0000-000000000000"),
            Err(SelectError::UnknownVm { .. })
        ));
        assert!(matches!(find_vm(&vms, "fa:16:3e:00:00:00"), Err(SelectError::UnknownVm { .. })));
    }

    #[test]
    fn only_a_running_vm_with_a_tap_is_mirrorable() {
        let vms = fixture_vms();
        let check = |selector: &str, choice| {
            let found = find_vm(&vms, selector).unwrap();
            let nic = choose_nic(selector, &found, choice).unwrap();
            mirrorable_tap(found.vm, nic).map(str::to_owned)
        };
        assert_eq!(check("c-private", NicChoice::Index(0)).unwrap(), "tapf7eae624-34");
        assert_eq!(check("lab-router", NicChoice::Index(1)).unwrap(), "tap-lab1");
        let err = check("c-stopped", NicChoice::Unspecified).unwrap_err();
        assert!(matches!(err, SelectError::NotRunning { state: VmState::ShutOff, .. }), "{err}");
        assert!(err.to_string().contains("shut-off") && err.to_string().contains("start"), "{err}");
        let err = check("c-dpdk", NicChoice::Unspecified).unwrap_err();
        assert!(
            err.to_string().starts_with("cannot mirror NIC 0 of VM c-dpdk (type vhostuser) because"),
            "{err}"
        );
        let err = check("c-sriov", NicChoice::Index(0)).unwrap_err();
        assert!(err.to_string().contains("SR-IOV"), "{err}");
        let err = check("c-sriov", NicChoice::Index(1)).unwrap_err();
        assert!(err.to_string().contains("macvtap") && err.to_string().contains("uplink"), "{err}");
    }
}
