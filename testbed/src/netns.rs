//! Running a piece of code inside a named network namespace (`ip netns add NAME`): on a thread
//! of its own that `setns(2)`es into `/run/netns/NAME`. A socket created there stays in that
//! namespace when the thread ends, so one process can hold sockets in several namespaces (the
//! agent side of a session in one host of the lab, the connector side in another).

use std::os::fd::AsRawFd as _;

use anyhow::{Context, Result, anyhow, bail};

/// Runs `f` on a new thread inside network namespace `ns` and returns its result.
pub fn run_in<T: Send>(ns: &str, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
    let path = format!("/run/netns/{ns}");
    let file = std::fs::File::open(&path).with_context(|| format!("opening network namespace {path}"))?;
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: setns(2) on a namespace fd we own; it changes only this thread's namespace.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                bail!("entering network namespace {ns}: {} (root needed)", std::io::Error::last_os_error());
            }
            f()
        })
        .join()
        .map_err(|_| anyhow!("a thread in network namespace {ns} panicked"))?
    })
}

/// Runs `f` in `ns` when one is given, here otherwise.
pub fn maybe_in<T: Send>(ns: Option<&str>, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
    match ns {
        Some(ns) => run_in(ns, f),
        None => f(),
    }
}
