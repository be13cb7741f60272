//! The BPF filesystem: found (the host's, also from inside `ip netns exec`), mounted when
//! missing.
use std::{
    fs,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use nix::{
    mount::{MsFlags, mount},
    sys::statfs::{BPF_FS_MAGIC, statfs},
};

use crate::sys::KernelError;
use crate::sys::paths::BPFFS;

/// The bpffs that holds vmsniff's pins, for a command that changes state: the host's, mounted
/// at /sys/fs/bpf first when it is missing and this process may mount it there.
///
/// `ip netns exec` runs its command in a mount namespace of its own with a fresh /sys, where
/// /sys/fs/bpf is an empty sysfs directory: pins made in a bpffs mounted there would vanish with
/// the command. So in another mount namespace than the host's, vmsniff reaches the host's
/// bpffs through `/proc/PID/root` of a process in the host's namespace, and pins exactly where
/// it pins without `ip netns exec`.
pub fn locate_for_writing() -> Result<PathBuf, KernelError> {
    let local = Path::new(BPFFS);
    match host_root() {
        Host::Ours | Host::Unknown => {
            ensure_mounted(local)?;
            Ok(local.to_owned())
        }
        Host::Other(root) => {
            let host = root.join(BPFFS.trim_start_matches('/'));
            if is_bpffs(&host) {
                Ok(prefer_local(local, host))
            } else {
                Err(KernelError::HostBpffsMissing { path: local.to_owned(), through: host })
            }
        }
    }
}

/// The bpffs that holds vmsniff's pins, for a reader: as [`locate_for_writing`], but it mounts
/// nothing and never fails; where no bpffs is, there is no state.
pub fn locate_for_reading() -> PathBuf {
    let local = Path::new(BPFFS);
    match host_root() {
        Host::Ours | Host::Unknown => local.to_owned(),
        Host::Other(root) => prefer_local(local, root.join(BPFFS.trim_start_matches('/'))),
    }
}

/// `local` when it is the host's bpffs itself (systemd's private namespace for the service
/// binds it there), which reads better in messages; else the path through /proc.
fn prefer_local(local: &Path, host: PathBuf) -> PathBuf {
    let device = |p: &Path| fs::metadata(p).map(|m| m.dev()).ok();
    if is_bpffs(local) && device(local).is_some() && device(local) == device(&host) {
        return local.to_owned();
    }
    log::debug!("in a mount namespace of its own: using the host's bpffs through {}", host.display());
    host
}

enum Host {
    /// This process is in the host's mount namespace.
    Ours,
    /// The host's root directory, seen from this process's own mount namespace.
    Other(PathBuf),
    /// No process of the host's mount namespace can be read (a service without
    /// CAP_SYS_PTRACE, whose parent is init): /sys/fs/bpf is taken as it is, as before.
    Unknown,
}

/// The host's mount namespace is PID 1's. Where PID 1 cannot be read (a sandbox whose init
/// hides itself), the outermost ancestor of this process that can be read stands in for it:
/// `ip netns exec` and `unshare` leave their caller in the namespace they came from.
fn host_root() -> Host {
    let Ok(own) = fs::read_link("/proc/self/ns/mnt") else { return Host::Unknown };
    let readable = |pid: u32| {
        let root = PathBuf::from(format!("/proc/{pid}/root"));
        let ns = fs::read_link(format!("/proc/{pid}/ns/mnt")).ok()?;
        fs::metadata(&root).ok()?;
        Some((ns, root))
    };
    let host = readable(1).or_else(|| ancestors().into_iter().rev().find_map(readable));
    match host {
        Some((ns, _)) if ns == own => Host::Ours,
        Some((_, root)) => Host::Other(root),
        None => Host::Unknown,
    }
}

/// This process's ancestors, nearest first, PID 1 excluded.
fn ancestors() -> Vec<u32> {
    let mut pids = Vec::new();
    let mut pid = std::process::id();
    while let Some(parent) = parent_of(pid).filter(|&p| p > 1 && !pids.contains(&p)) {
        pids.push(parent);
        pid = parent;
    }
    pids
}

fn parent_of(pid: u32) -> Option<u32> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|l| l.strip_prefix("PPid:")).and_then(|v| v.trim().parse().ok())
}

/// Mounts bpffs at `bpffs` unless it is mounted there already.
fn ensure_mounted(bpffs: &Path) -> Result<(), KernelError> {
    if is_bpffs(bpffs) {
        return Ok(());
    }
    log::info!("mounting bpffs at {}", bpffs.display());
    mount(Some("bpf"), bpffs, Some("bpf"), MsFlags::empty(), Some("mode=0700"))
        .map_err(|errno| KernelError::BpffsUnavailable { path: bpffs.to_owned(), source: errno.into() })
}

pub fn is_bpffs(path: &Path) -> bool {
    statfs(path).map(|s| s.filesystem_type() == BPF_FS_MAGIC).unwrap_or(false)
}
