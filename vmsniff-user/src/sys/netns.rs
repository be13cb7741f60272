//! The caller's network namespace: every command acts on it.
use std::{io, os::unix::fs::MetadataExt as _};

/// The inode of the calling thread's network namespace: unique among live namespaces.
pub fn current_inode() -> io::Result<u64> {
    std::fs::metadata("/proc/thread-self/ns/net").map(|m| m.ino())
}
