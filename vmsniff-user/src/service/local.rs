//! This node's VMs, read once per daemon pass, and an index of the names a selector can give
//! (Nova name, libvirt domain, UUID, MAC): the daemon matches the fleet's mirrors against it,
//! so its work grows with this node's VMs and the mirrors of their VMs, not with the fleet.
use std::collections::HashSet;

use super::{MirrorSpec, ResolveError, Resolved, Service};
use crate::{
    model::mac::Mac,
    resolve::{
        domain::normalize_uuid,
        libvirt::Vm,
        vm::{read_vms, resolve_in_vms},
    },
};

/// The domains libvirt has on this node now.
pub struct LocalVms {
    vms: Vec<Vm>,
    names: HashSet<String>,
}

/// A selector in the one spelling both sides of a match use: a MAC in lower case with ':', a
/// UUID as 32 lower-case hex digits, anything else (a name) as given.
pub fn selector_key(selector: &str) -> String {
    let selector = selector.trim();
    if let Ok(mac) = selector.parse::<Mac>() {
        return mac.to_string();
    }
    normalize_uuid(selector).unwrap_or_else(|| selector.to_owned())
}

impl LocalVms {
    fn new(vms: Vec<Vm>) -> Self {
        let mut names = HashSet::new();
        for vm in &vms {
            names.extend(vm.nova_name().map(str::to_owned));
            names.insert(vm.xml.name.clone());
            names.extend(normalize_uuid(&vm.xml.uuid));
            names.extend(vm.xml.nics.iter().filter_map(|n| n.mac).map(|m| m.to_string()));
        }
        LocalVms { vms, names }
    }

    /// Every [`selector_key`] that names one of these VMs: a declared set indexed by the same
    /// keys is matched in time that grows with this node's VMs, not with the fleet.
    pub fn keys(&self) -> impl Iterator<Item = &String> {
        self.names.iter()
    }

    /// How many domains this node has.
    pub fn domains(&self) -> usize {
        self.vms.len()
    }
}

impl Service {
    /// This node's domains, from libvirt, once.
    pub async fn local_vms(&self) -> Result<LocalVms, ResolveError> {
        Ok(LocalVms::new(read_vms(&self.sources).await?))
    }

    /// The tap of a spec's VM among `local` (libvirt is not read again).
    pub async fn resolve_in(&self, spec: &MirrorSpec, local: &LocalVms) -> Result<Resolved, ResolveError> {
        let selector = spec.nic.selector().ok_or(ResolveError::Missing)?;
        resolve_in_vms(&self.namespace.kernel.netlink, &local.vms, selector, spec.nic.choice()).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resolve::libvirt::tests::fixture_vms;

    #[test]
    fn every_name_of_a_local_vm_is_held_and_others_are_not() {
        let local = LocalVms::new(fixture_vms());
        let holds = |s: &str| local.names.contains(&selector_key(s));
        for selector in [
            "c-private",
            "instance-00000003",
            "3F2A9C1E7B4D4E8F9A6B1C2D3E4F5A6B",
            "3f2a9c1e-7b4d-4e8f-9a6b-1c2d3e4f5a6b",
            "FA-16-3E-11-22-33",
        ] {
            assert!(holds(selector), "{selector}");
        }
        for selector in ["c-elsewhere", "00000000-0000-4000-8000-000000000000", "fa:16:3e:00:00:99"] {
            assert!(!holds(selector), "{selector}");
        }
    }
}
