//! The host-wide lock around vmsniff's state: every state-changing operation holds it
//! exclusively, `status` shared. Waiting for it never blocks a runtime thread (the daemon's
//! loop keeps hearing signals and events) and never lasts for ever: after `WAIT`, the error
//! names the process that holds it.
use std::{
    fs::{File, OpenOptions},
    os::unix::fs::{MetadataExt as _, OpenOptionsExt as _},
    path::Path,
    time::{Duration, Instant},
};

use nix::{
    errno::Errno,
    fcntl::{Flock, FlockArg},
};

use crate::sys::{KernelError, paths::LOCK_FILE};

/// Longer than anything vmsniff does under the lock: an OVS attach waits up to 30 s for
/// ovs-vswitchd by default. VMSNIFF_LOCK_WAIT (seconds) changes it.
const WAIT: Duration = Duration::from_secs(60);

fn wait() -> Duration {
    std::env::var("VMSNIFF_LOCK_WAIT").ok().and_then(|s| s.parse().ok()).map_or(WAIT, Duration::from_secs)
}
const POLL: Duration = Duration::from_millis(20);

/// Held while an operation reads and changes vmsniff's state; released on drop.
pub struct StateLock {
    _lock: Flock<File>,
}

/// Takes vmsniff's lock, waiting (without blocking the runtime) for another vmsniff that holds
/// it.
pub async fn lock() -> Result<StateLock, KernelError> {
    let path = Path::new(LOCK_FILE);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(KernelError::io(format!("creating {}", dir.display())))?;
    }
    // Not through a symlink someone planted in /run/lock, and readable by root only.
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(KernelError::io(format!("opening {LOCK_FILE}")))?;
    check_owner(&file)?;
    wait_for(file, FlockArg::LockExclusiveNonblock).await
}

/// /run/lock is writable by every user: a lock file someone else made (and could hold for
/// ever) is refused, and one root made with a wider mode (older releases) is narrowed, so that
/// no other user can open it to hold it.
fn check_owner(file: &File) -> Result<(), KernelError> {
    use std::os::unix::fs::PermissionsExt as _;
    let metadata = file.metadata().map_err(KernelError::io(format!("reading {LOCK_FILE}'s owner")))?;
    if metadata.uid() != 0 {
        return Err(KernelError::LockNotRoots { path: LOCK_FILE.into(), uid: metadata.uid() });
    }
    if metadata.permissions().mode() & 0o077 != 0 {
        file.set_permissions(std::fs::Permissions::from_mode(0o600))
            .map_err(KernelError::io(format!("making {LOCK_FILE} root's only")))?;
    }
    Ok(())
}

/// The pid holding a flock on `path`, if any (for "which process" in errors and checks).
pub fn flock_holder(path: &Path) -> Option<u32> {
    holder(std::fs::symlink_metadata(path).ok()?.ino())
}

/// Waits until no vmsniff changes state, for a reader (`status`) that must not see an attach
/// or detach half-way (some maps pinned, others not yet). Creates nothing: without the lock
/// file no state-changing command has run since boot. Shared, so readers do not wait for each
/// other.
pub async fn read_lock() -> Result<Option<StateLock>, KernelError> {
    let file = match OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW).open(LOCK_FILE) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(KernelError::io(format!("opening {LOCK_FILE}"))(e)),
    };
    if file.metadata().is_ok_and(|m| m.uid() != 0) {
        let uid = file.metadata().map(|m| m.uid()).unwrap_or_default();
        return Err(KernelError::LockNotRoots { path: LOCK_FILE.into(), uid });
    }
    wait_for(file, FlockArg::LockSharedNonblock).await.map(Some)
}

async fn wait_for(mut file: File, how: FlockArg) -> Result<StateLock, KernelError> {
    let waited = wait();
    let deadline = Instant::now() + waited;
    loop {
        match Flock::lock(file, how) {
            Ok(lock) => return Ok(StateLock { _lock: lock }),
            Err((back, Errno::EWOULDBLOCK)) if Instant::now() < deadline => {
                file = back;
                tokio::time::sleep(POLL).await;
            }
            Err((back, Errno::EWOULDBLOCK)) => {
                let holder = back.metadata().ok().and_then(|m| holder(m.ino()));
                return Err(KernelError::LockHeld { path: LOCK_FILE.into(), waited, holder });
            }
            Err((_, errno)) => return Err(KernelError::io(format!("locking {LOCK_FILE}"))(errno.into())),
        }
    }
}

/// The pid holding a flock on the file with inode `inode`, from /proc/locks.
fn holder(inode: u64) -> Option<u32> {
    holder_in(&std::fs::read_to_string("/proc/locks").ok()?, inode)
}

/// `1: FLOCK  ADVISORY  WRITE 1234 00:1a:5678 0 EOF`: the pid is the fifth field, the inode the
/// last part of the sixth. Blocked waiters (`->` lines) hold nothing.
fn holder_in(locks: &str, inode: u64) -> Option<u32> {
    locks.lines().filter(|l| !l.contains("->")).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let file_inode = fields.get(5)?.rsplit(':').next()?.parse::<u64>().ok()?;
        (fields.get(1) == Some(&"FLOCK") && file_inode == inode)
            .then(|| fields.get(4)?.parse().ok())
            .flatten()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_holder_is_read_from_proc_locks() {
        let locks = "1: POSIX  ADVISORY  WRITE 99 00:1a:77 0 EOF\n\
                     2: FLOCK  ADVISORY  WRITE 1234 00:1a:77 0 EOF\n\
                     2: -> FLOCK  ADVISORY  WRITE 4321 00:1a:77 0 EOF\n\
                     3: FLOCK  ADVISORY  READ 555 00:1a:78 0 EOF\n";
        assert_eq!(holder_in(locks, 77), Some(1234));
        assert_eq!(holder_in(locks, 78), Some(555));
        assert_eq!(holder_in(locks, 79), None);
    }

    #[tokio::test]
    async fn a_held_lock_is_waited_for_then_taken() {
        let path = std::env::temp_dir().join(format!("vmsniff-lock-test-{}", std::process::id()));
        let open = || OpenOptions::new().create(true).truncate(false).write(true).open(&path).unwrap();
        let held = Flock::lock(open(), FlockArg::LockExclusive).unwrap();
        let release = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            drop(held);
        });
        let started = Instant::now();
        let taken = wait_for(open(), FlockArg::LockExclusiveNonblock).await;
        assert!(taken.is_ok() && started.elapsed() >= Duration::from_millis(80));
        release.await.unwrap();
        std::fs::remove_file(&path).unwrap();
    }
}
