//! A test seam for crash windows: in a debug build, `VMSNIFF_TEST_KILL_AT=N` makes vmsniff
//! SIGKILL itself right after its Nth kernel change (a map write, a device, a qdisc, a filter
//! or link, pins), so that the privileged tests can check what the next command finds after a
//! kill at every point of a real attach or detach. Release builds (the package, `cargo
//! install`) compile it to nothing; in a debug build it can only do what any root user's
//! `kill -9` does.

/// Counts one kernel change made, and dies here if the test asked for it.
#[cfg(debug_assertions)]
pub fn change_made() {
    use std::sync::{
        OnceLock,
        atomic::{AtomicUsize, Ordering},
    };
    static KILL_AT: OnceLock<Option<usize>> = OnceLock::new();
    static CHANGES: AtomicUsize = AtomicUsize::new(0);
    let Some(at) = *KILL_AT.get_or_init(|| std::env::var("VMSNIFF_TEST_KILL_AT").ok()?.parse().ok()) else {
        return;
    };
    if CHANGES.fetch_add(1, Ordering::SeqCst) + 1 == at {
        let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
    }
}

#[cfg(not(debug_assertions))]
#[inline(always)]
pub fn change_made() {}
