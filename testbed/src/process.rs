//! A child process (relay, agent, connector, a backend, ...) with its log file: its stdout
//! and stderr go to the log, and it is killed when the guard is dropped, on success, on error
//! and on panic, so no test or benchmark leaves processes behind.

use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

pub const SIGHUP: i32 = libc::SIGHUP;
pub const SIGKILL: i32 = libc::SIGKILL;
pub const SIGTERM: i32 = libc::SIGTERM;

static DIE_WITH_SPAWNING_THREAD: AtomicBool = AtomicBool::new(false);

/// From now on, children get SIGTERM when the thread that spawned them exits
/// (`PR_SET_PDEATHSIG`), so they do not outlive a program that is killed before its
/// destructors run. Only for programs that spawn from one long-lived thread (a benchmark's
/// main thread): a test's helper thread may end while the test still uses the child.
pub fn die_with_spawning_thread() {
    DIE_WITH_SPAWNING_THREAD.store(true, Ordering::Relaxed);
}

pub struct Process {
    what: String,
    /// Behind a lock so that looking at the process (is it alive?) takes `&self`.
    child: Mutex<Option<Child>>,
    log: PathBuf,
    /// On drop: SIGTERM and this long to exit before SIGKILL; zero: SIGKILL at once.
    drop_grace: Duration,
}

impl Process {
    /// Starts `cmd` with stdin closed and stdout and stderr appended to `log`. `what` names
    /// the process in errors ("relay", "connector").
    pub fn spawn(what: &str, mut cmd: Command, log: impl Into<PathBuf>) -> Result<Process> {
        let log = log.into();
        let out = std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        if DIE_WITH_SPAWNING_THREAD.load(Ordering::Relaxed) {
            // SAFETY: prctl is async-signal-safe; the closure runs in the forked child before exec.
            unsafe {
                cmd.pre_exec(|| {
                    libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                    Ok(())
                });
            }
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("starting the {what} ({})", cmd.get_program().to_string_lossy()))?;
        Ok(Process { what: what.to_string(), child: Mutex::new(Some(child)), log, drop_grace: Duration::ZERO })
    }

    /// On drop, SIGTERM first and SIGKILL only if it has not exited within `grace` (so a
    /// relay can detach what it attached in an orderly way).
    pub fn set_drop_grace(&mut self, grace: Duration) {
        self.drop_grace = grace;
    }

    pub fn what(&self) -> &str {
        &self.what
    }

    pub fn log(&self) -> &Path {
        &self.log
    }

    /// The process id, 0 once it has been reaped.
    pub fn pid(&self) -> u32 {
        self.child().as_ref().map(Child::id).unwrap_or(0)
    }

    fn child(&self) -> std::sync::MutexGuard<'_, Option<Child>> {
        self.child.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The last `n` lines of the log, for error messages.
    pub fn log_tail(&self, n: usize) -> String {
        log_tail(&self.log, n)
    }

    /// Error (with the end of the log) if the process has exited.
    pub fn check_alive(&self) -> Result<()> {
        let exited = self.child().as_mut().and_then(|c| c.try_wait().ok().flatten());
        if let Some(st) = exited {
            bail!("the {} exited ({st}); the end of its log:\n{}", self.what, self.log_tail(20));
        }
        Ok(())
    }

    /// Waits until every one of `needles` is in the log; errors (with the end of the log)
    /// when the process exits first or `limit` passes.
    pub fn wait_for_log(&self, needles: &[&str], limit: Duration) -> Result<()> {
        let deadline = Instant::now() + limit;
        loop {
            let text = self.log_text();
            let missing: Vec<&str> = needles.iter().copied().filter(|n| !text.contains(n)).collect();
            if missing.is_empty() {
                return Ok(());
            }
            self.check_alive().with_context(|| format!("waiting for it to log {missing:?}"))?;
            if Instant::now() >= deadline {
                bail!(
                    "the {} did not log {missing:?} within {:.1} s; the end of its log:\n{}",
                    self.what,
                    limit.as_secs_f64(),
                    self.log_tail(20)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn signal(&self, sig: i32) {
        if let Some(c) = self.child().as_ref() {
            signal(c, sig);
        }
    }

    /// Waits up to `timeout` for the process to exit; then it is reaped and its exit code
    /// returned (`None`: still running, or killed by a signal).
    pub fn wait_exit(&self, timeout: Duration) -> Option<i32> {
        let mut child = self.child();
        let st = wait_for(child.as_mut()?, timeout)?;
        *child = None;
        st.code()
    }

    /// SIGTERM, up to `grace` to exit, then SIGKILL. Returns how it ended and how long it took.
    pub fn stop(&self, grace: Duration) -> (String, f64) {
        let Some(mut child) = self.child().take() else { return ("not running".into(), 0.0) };
        let t = Instant::now();
        if let Ok(Some(st)) = child.try_wait() {
            return (format!("had already exited ({st})"), 0.0);
        }
        signal(&child, libc::SIGTERM);
        let how = match wait_for(&mut child, grace) {
            Some(st) => format!("{st} after SIGTERM"),
            None => {
                let _ = child.kill();
                let _ = child.wait();
                format!("did not stop within {:.0} s of SIGTERM: killed", grace.as_secs_f64())
            }
        };
        (how, t.elapsed().as_secs_f64())
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("---- {} log ({}) ----\n{}", self.what, self.log.display(), self.log_text());
        }
        let Some(mut child) = self.child().take() else { return };
        if !self.drop_grace.is_zero() {
            signal(&child, libc::SIGTERM);
            if wait_for(&mut child, self.drop_grace).is_some() {
                return;
            }
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

fn signal(child: &Child, sig: i32) {
    // SAFETY: kill(2) on the pid of a child we own and have not reaped.
    unsafe {
        libc::kill(child.id() as libc::pid_t, sig);
    }
}

fn wait_for(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let end = Instant::now() + limit;
    loop {
        if let Ok(Some(st)) = child.try_wait() {
            return Some(st);
        }
        if Instant::now() >= end {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The last `n` lines of a log file.
pub fn log_tail(log: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    if lines.is_empty() {
        return "(the log is empty)".to_string();
    }
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Waits until a log file contains `needle`; errors with the log otherwise. For logs of
/// processes this crate did not start (or that several processes write).
pub fn wait_for_log(log: &Path, needle: &str, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if std::fs::read_to_string(log).unwrap_or_default().contains(needle) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    bail!("{} never got {needle:?} within {timeout:?}:\n{}", log.display(), std::fs::read_to_string(log).unwrap_or_default())
}

/// True for a log line worth reporting: a tracing line at WARN or ERROR, or a line that is not
/// a tracing line at all (a panic, a message printed to stderr).
fn noteworthy(line: &str) -> bool {
    let mut it = line.split_whitespace();
    match (it.next(), it.next()) {
        (Some(ts), Some(level)) if ts.ends_with('Z') && ts.starts_with(|c: char| c.is_ascii_digit()) => {
            matches!(level, "WARN" | "ERROR")
        }
        (None, _) => false,
        _ => true,
    }
}

/// WARN and ERROR lines of a log and other stderr output (the first `keep`), and how many
/// there were.
pub fn log_warnings(log: &Path, keep: usize) -> (Vec<String>, usize) {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let w: Vec<String> = text.lines().filter(|l| noteworthy(l)).map(|l| l.trim().to_string()).collect();
    let n = w.len();
    (w.into_iter().take(keep).collect(), n)
}

/// VmRSS of a process in KiB (0 if unknown).
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok()))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_warnings_and_stray_output() {
        assert!(!noteworthy("2026-11-23T00:56:08.653091Z  INFO ztna_relay: relay started"));
        assert!(noteworthy("2026-11-23T00:56:08.653091Z  WARN ztna_client::engine: lost the relay"));
        assert!(noteworthy("2026-11-23T00:56:08.653091Z ERROR ztna_client::engine: cannot start tunnel"));
        assert!(noteworthy("thread 'main' panicked at src/main.rs:1:1"));
        assert!(!noteworthy("   "));
    }

    #[test]
    fn a_process_is_killed_on_drop_and_its_log_kept_until_then() {
        let dir = crate::TempDir::new("testbed-proc").unwrap();
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo ready; exec sleep 30"]);
        let p = Process::spawn("sleeper", cmd, dir.path().join("sleeper.log")).unwrap();
        p.wait_for_log(&["ready"], Duration::from_secs(5)).unwrap();
        let pid = p.pid();
        assert!(std::path::Path::new(&format!("/proc/{pid}")).exists());
        drop(p);
        assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists(), "killed and reaped");
    }

    #[test]
    fn an_exit_before_the_log_line_is_an_error_with_the_log() {
        let dir = crate::TempDir::new("testbed-proc").unwrap();
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo cannot bind; exit 3"]);
        let p = Process::spawn("relay", cmd, dir.path().join("relay.log")).unwrap();
        let e = format!("{:#}", p.wait_for_log(&["relay started"], Duration::from_secs(5)).unwrap_err());
        assert!(e.contains("the relay exited") && e.contains("cannot bind"), "{e}");
    }
}
