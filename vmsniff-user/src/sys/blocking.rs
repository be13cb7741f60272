//! Calls that block (libvirt's API, the OVSDB client's socket) run on tokio's blocking pool, so
//! that the daemon's one runtime thread keeps serving signals and events meanwhile.

/// Runs `f` on the blocking pool and returns its result; a panic in `f` goes on in the caller.
pub async fn off_thread<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    match tokio::task::spawn_blocking(f).await {
        Ok(value) => value,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        // Only a runtime shutting down cancels a blocking task, and then nobody awaits this.
        Err(e) => unreachable!("a blocking task was cancelled: {e}"),
    }
}
