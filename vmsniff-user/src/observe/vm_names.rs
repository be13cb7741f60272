//! The VM and NIC behind each session's tap, for `status`: what lets a collector's `--names`
//! name its captures after VMs. Best effort: without libvirt the fields stay empty.
use std::collections::BTreeMap;

use super::status::Status;
use crate::{
    model::{error::chain, sources::Sources},
    resolve::{libvirt::Vm, vm::read_vms},
};

/// Fills each session's `vm` and `nic` from libvirt, when it answers.
pub async fn fill(status: &mut Status, sources: &Sources) {
    if status.sessions.is_empty() {
        return;
    }
    let vms = match read_vms(sources).await {
        Ok(vms) => vms,
        Err(e) => {
            log::debug!("sessions are shown without their VMs: {}", chain(&e));
            return;
        }
    };
    let by_tap = nics_by_tap(&vms);
    for session in &mut status.sessions {
        if let Some((vm, nic)) = by_tap.get(&session.tap) {
            session.vm = Some(vm.clone());
            session.nic = Some(*nic);
        }
    }
}

/// Tap name → (the VM's display name, the NIC's index).
pub fn nics_by_tap(vms: &[Vm]) -> BTreeMap<String, (String, usize)> {
    vms.iter()
        .flat_map(|vm| {
            vm.xml.nics.iter().filter_map(move |nic| {
                Some((nic.target_dev.clone()?, (vm.display_name().to_owned(), nic.index)))
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resolve::libvirt::tests::fixture_vms;

    #[test]
    fn taps_lead_to_their_vm_and_nic() {
        let by_tap = nics_by_tap(&fixture_vms());
        assert_eq!(by_tap["tapf7eae624-34"], ("c-private".to_owned(), 0));
        assert_eq!(by_tap["tap8e3c1a52-07"], ("c-private".to_owned(), 1));
        assert_eq!(by_tap["tap-lab1"], ("lab-router".to_owned(), 1));
    }
}
