//! Ctrl-C during a long run: SIGINT and SIGTERM only set a flag that the run polls, so it
//! unwinds through its guards (child processes, the lab's namespaces) instead of dying with
//! them in place.

use anyhow::{Result, bail};

static STOP: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

extern "C" fn on_stop_signal(_: libc::c_int) {
    STOP.store(true, std::sync::atomic::Ordering::Relaxed);
}

/// From now on SIGINT and SIGTERM only set [`stop_requested`]: long runs poll it and unwind,
/// so their guards (child processes, network namespaces) clean up.
pub fn catch_stop_signals() {
    // SAFETY: the handler only stores to an atomic (async-signal-safe).
    unsafe {
        libc::signal(libc::SIGINT, on_stop_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_stop_signal as *const () as libc::sighandler_t);
    }
}

/// True once SIGINT or SIGTERM arrived after [`catch_stop_signals`].
pub fn stop_requested() -> bool {
    STOP.load(std::sync::atomic::Ordering::Relaxed)
}

/// Errors out once SIGINT or SIGTERM arrived (see [`catch_stop_signals`]).
pub fn check_interrupted() -> Result<()> {
    if stop_requested() {
        bail!("interrupted");
    }
    Ok(())
}
