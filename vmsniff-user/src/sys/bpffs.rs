//! The BPF filesystem: mounted when missing; and the host-wide lock around vmsniff's state.
use std::{
    fs::{self, File, OpenOptions},
    path::Path,
};

use nix::{
    fcntl::{Flock, FlockArg},
    mount::{MsFlags, mount},
    sys::statfs::{BPF_FS_MAGIC, statfs},
};

use crate::sys::KernelError;
use crate::sys::paths::LOCK_FILE;

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

/// Held while a command reads and changes vmsniff's state; released on drop.
pub struct StateLock {
    _lock: Flock<File>,
}

/// Waits until no vmsniff changes state, for a reader (`status`) that must not see an attach
/// or detach half-way (some maps pinned, others not yet). Creates nothing: without the lock
/// file no state-changing command has run since boot. Shared, so readers do not wait for each
/// other.
pub fn read_lock() -> Result<Option<StateLock>, KernelError> {
    let file = match OpenOptions::new().read(true).open(LOCK_FILE) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(KernelError::io(format!("opening {LOCK_FILE}"))(e)),
    };
    let lock = Flock::lock(file, FlockArg::LockShared)
        .map_err(|(_, errno)| KernelError::io(format!("locking {LOCK_FILE}"))(errno.into()))?;
    Ok(Some(StateLock { _lock: lock }))
}

/// Takes vmsniff's lock, waiting for another vmsniff that holds it.
pub fn lock() -> Result<StateLock, KernelError> {
    let path = Path::new(LOCK_FILE);
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).map_err(KernelError::io(format!("creating {}", dir.display())))?;
    }
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(KernelError::io(format!("opening {LOCK_FILE}")))?;
    let lock = Flock::lock(file, FlockArg::LockExclusive)
        .map_err(|(_, errno)| KernelError::io(format!("locking {LOCK_FILE}"))(errno.into()))?;
    Ok(StateLock { _lock: lock })
}
