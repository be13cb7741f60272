//! Removing vmsniff's state that this vmsniff cannot read (another ABI version's, or
//! incomplete), by what every version names alike: `vmsniff detach --all`'s way out.
use vmsniff_ebpf::TcHook;

use crate::{
    apply::{executor::Kernel, gre, tc},
    model::mirror::AttachMode,
    sys::{
        KernelError, maps,
        paths::{gre_device_alias, gre_device_session},
    },
};

/// What [`remove_by_name`] removed.
#[derive(Debug, Default)]
pub struct RemovedByName {
    pub filters: usize,
    pub devices: usize,
}

/// Removes vmsniff's state in the namespace without reading its maps (another ABI version's, or
/// incomplete), by what every version names alike: cls_bpf filters running vmsniff's programs,
/// on any interface; devices with a vmsniff GRE device's name and alias; then the pin
/// directory, whose TCX link pins are the TCX attachments. The pins go only when everything
/// else did: while they stay, the next `detach --all` finds the rest again. clsact qdiscs stay,
/// since whether vmsniff added one is recorded in the maps, and an empty one changes nothing.
/// Goes on past a failing interface and returns the failures.
pub async fn remove_by_name(kernel: &Kernel) -> (RemovedByName, Vec<KernelError>) {
    let mut removed = RemovedByName::default();
    let mut failures = Vec::new();
    let links = match kernel.netlink.links().await {
        Ok(links) => links,
        Err(e) => return (removed, vec![KernelError::netlink("listing the interfaces")(e)]),
    };
    for link in &links {
        for hook in TcHook::ALL {
            let filters = match tc::filters_by_program_name(&kernel.netlink, link.ifindex, hook).await {
                Ok(filters) => filters,
                Err(e) => {
                    failures.push(e);
                    continue;
                }
            };
            for (priority, handle, program) in filters {
                let filter = tc::Filter { name: &link.name, ifindex: link.ifindex, hook, program };
                match tc::detach(
                    &kernel.netlink,
                    &kernel.paths,
                    filter,
                    AttachMode::Netlink,
                    priority,
                    handle,
                )
                .await
                {
                    Ok(()) => removed.filters += 1,
                    Err(e) => failures.push(e),
                }
            }
        }
    }
    for link in &links {
        if let Some((id, direction)) = gre_device_session(&link.name, link.alias.as_deref()) {
            match gre::delete(&kernel.netlink, link.ifindex, &link.name, &gre_device_alias(id, direction))
                .await
            {
                Ok(()) => removed.devices += 1,
                Err(e) => failures.push(e),
            }
        }
    }
    if failures.is_empty()
        && let Err(e) = maps::remove_pins(&kernel.paths)
    {
        failures.push(e);
    }
    (removed, failures)
}
