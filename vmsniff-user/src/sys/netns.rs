//! The caller's network namespace: every command acts on it.
use std::{io, os::unix::fs::MetadataExt as _};

/// The inode of the calling thread's network namespace: unique among live namespaces.
pub fn current_inode() -> io::Result<u64> {
    std::fs::metadata("/proc/thread-self/ns/net").map(|m| m.ino())
}

/// The cookie of the calling thread's network namespace (SO_NETNS_COOKIE, Linux 5.14 on):
/// unlike its inode, which the next namespace made may get once this one is deleted, it is
/// never given to another namespace while the host runs. `None` on older kernels.
pub fn current_cookie() -> Option<u64> {
    use std::os::fd::AsRawFd as _;
    // Any socket: it belongs to the namespace of the thread that made it.
    let socket = std::os::unix::net::UnixDatagram::unbound().ok()?;
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: the descriptor is open for the call, and `cookie` and `len` are valid for writes
    // of the sizes given.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &raw mut len,
        )
    };
    (rc == 0).then_some(cookie)
}

/// The entry in a pin directory that names the namespace whose state it holds.
pub fn cookie_mark(cookie: u64) -> String {
    format!("netns-{cookie}")
}

/// Whose state a pin directory (keyed by a namespace inode) holds, judged by its entries.
#[derive(Debug, PartialEq, Eq)]
pub enum PinOwner {
    /// This namespace's, or unknown (made before marks, or on a kernel without cookies): used.
    ThisOrUnknown,
    /// A deleted namespace's whose inode this one got: its devices and filters went with it,
    /// only the pins are left.
    DeletedNamespace,
}

/// Judges a pin directory by its entries' `names` and the caller's namespace cookie.
pub fn pin_owner<'a>(names: impl IntoIterator<Item = &'a str>, ours: Option<u64>) -> PinOwner {
    let Some(ours) = ours else { return PinOwner::ThisOrUnknown };
    let mut marks = names.into_iter().filter(|n| n.starts_with("netns-")).peekable();
    if marks.peek().is_none() {
        return PinOwner::ThisOrUnknown;
    }
    if marks.any(|n| n == cookie_mark(ours)) { PinOwner::ThisOrUnknown } else { PinOwner::DeletedNamespace }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pins_of_a_deleted_namespace_are_told_by_their_cookie() {
        assert_eq!(pin_owner(["maps", "netns-7"], Some(7)), PinOwner::ThisOrUnknown);
        assert_eq!(pin_owner(["maps", "netns-7"], Some(8)), PinOwner::DeletedNamespace);
        // Unmarked (an older release's) or no cookie to compare: used, as before marks.
        assert_eq!(pin_owner(["maps"], Some(8)), PinOwner::ThisOrUnknown);
        assert_eq!(pin_owner(["maps", "netns-7"], None), PinOwner::ThisOrUnknown);
    }

    #[test]
    fn this_namespace_has_a_cookie_on_kernels_from_5_14() {
        let cookie = current_cookie();
        if let Ok(release) = std::fs::read_to_string("/proc/sys/kernel/osrelease") {
            let mut parts = release.trim().split(['.', '-']).map(|p| p.parse::<u32>().unwrap_or(0));
            let version = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
            if version >= (5, 14) {
                assert!(cookie.is_some());
                assert_eq!(cookie, current_cookie(), "stable within a namespace");
            }
        }
    }
}
