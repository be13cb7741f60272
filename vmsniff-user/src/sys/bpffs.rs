//! The BPF filesystem: mounted when missing.
use std::{fs, path::Path};

use nix::{
    mount::{MsFlags, mount},
    sys::statfs::{BPF_FS_MAGIC, statfs},
};

use crate::sys::KernelError;

/// Mounts bpffs at `bpffs` unless it is mounted there already.
pub fn ensure_mounted(bpffs: &Path) -> Result<(), KernelError> {
    if is_bpffs(bpffs) {
        return Ok(());
    }
    if in_private_mount_namespace() {
        // `ip netns exec` gives its command a fresh /sys: a bpffs mounted there would vanish with
        // the command, and with it every pin (TCX links would detach, state would be lost).
        return Err(KernelError::PrivateMountNamespace { path: bpffs.to_owned() });
    }
    log::info!("mounting bpffs at {}", bpffs.display());
    mount(Some("bpf"), bpffs, Some("bpf"), MsFlags::empty(), Some("mode=0700"))
        .map_err(|errno| KernelError::BpffsUnavailable { path: bpffs.to_owned(), source: errno.into() })
}

/// True when this process's mount namespace is not init's.
fn in_private_mount_namespace() -> bool {
    match (fs::read_link("/proc/self/ns/mnt"), fs::read_link("/proc/1/ns/mnt")) {
        (Ok(own), Ok(init)) => own != init,
        _ => false,
    }
}

pub fn is_bpffs(path: &Path) -> bool {
    statfs(path).map(|s| s.filesystem_type() == BPF_FS_MAGIC).unwrap_or(false)
}
