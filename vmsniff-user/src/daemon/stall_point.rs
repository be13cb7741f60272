//! A test seam for a slow daemon pass: in a debug build, `VMSNIFF_TEST_PASS_STALL_MS=N` makes
//! every pass of `vmsniff daemon` block its thread for N ms first, as loading and attaching eBPF
//! programs does on a slow or loaded machine (in the VM harness's 6.1 guest, under TCG, an
//! attach held the daemon's thread for 1.3 to 2.5 s at a time). The fleet's tests use it on the
//! host to check that a node's etcd lease and watch outlive such passes. Release builds compile
//! it to nothing.

/// Blocks the calling thread for the time the test asked for, if any.
#[cfg(debug_assertions)]
pub fn pass_started() {
    use std::{sync::OnceLock, time::Duration};
    static STALL: OnceLock<Option<Duration>> = OnceLock::new();
    let stall = STALL.get_or_init(|| {
        let ms: u64 = std::env::var("VMSNIFF_TEST_PASS_STALL_MS").ok()?.parse().ok()?;
        Some(Duration::from_millis(ms))
    });
    if let Some(stall) = stall {
        std::thread::sleep(*stall);
    }
}

#[cfg(not(debug_assertions))]
#[inline(always)]
pub fn pass_started() {}
