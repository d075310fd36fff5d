//! The processes a benchmark starts (relay, connector, agent) and what it needs around them:
//! a temporary directory, log files, readiness checks, and guards that
//! stop every child when dropped (on success, on error, and on panic).

use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// The build command that puts every binary the benchmarks start next to `ztna-bench`.
pub const BUILD: &str = "cargo build --release -p ztna-relay -p ztna-agent -p ztna-connector -p ztna-bench";

/// A directory removed when dropped.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new() -> Result<TempDir> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let p = std::env::temp_dir().join(format!("ztna-bench-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&p).with_context(|| format!("creating {}", p.display()))?;
        Ok(TempDir(p))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn signal(child: &Child, sig: libc::c_int) {
    // SAFETY: kill(2) on our own child's pid.
    unsafe {
        libc::kill(child.id() as libc::pid_t, sig);
    }
}

/// Waits for the child to exit, up to `limit`.
pub fn wait_for(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let end = Instant::now() + limit;
    loop {
        if let Ok(Some(st)) = child.try_wait() {
            return Some(st);
        }
        if Instant::now() >= end {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn log_tail(log: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    if lines.is_empty() {
        return "(the log is empty)".to_string();
    }
    lines[lines.len().saturating_sub(n)..].join("\n")
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

/// WARN and ERROR lines of a log, and other stderr output (the first `keep`), and how many
/// there were.
pub fn log_warnings(log: &Path, keep: usize) -> (Vec<String>, usize) {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let w: Vec<String> = text.lines().filter(|l| noteworthy(l)).map(|l| l.trim().to_string()).collect();
    let n = w.len();
    (w.into_iter().take(keep).collect(), n)
}

/// `name` next to this executable (or `explicit`), with a clear error naming the build command.
pub fn sibling_bin(name: &str, explicit: Option<&Path>) -> Result<PathBuf> {
    if let Some(p) = explicit {
        if !p.is_file() {
            bail!("{name} binary {} does not exist", p.display());
        }
        return Ok(p.to_path_buf());
    }
    let exe = std::env::current_exe().context("locating this executable")?;
    let dir = exe.parent().context("this executable has no parent directory")?;
    let p = dir.join(name);
    if !p.is_file() {
        bail!("the {name} binary {} is missing: build it next to ztna-bench with `{BUILD}`", p.display());
    }
    Ok(p)
}

/// Makes the child receive SIGTERM if this thread exits (e.g. the benchmark is killed), so no
/// relay, agent or connector outlives a run even when no destructor gets to run. Children are
/// spawned from the thread that drives the benchmark (the main thread in `block_on`).
pub fn die_with_parent(cmd: &mut Command) {
    // SAFETY: prctl is async-signal-safe; the closure runs in the forked child before exec.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
            Ok(())
        });
    }
}

/// A child process with its log file: SIGTERM (then SIGKILL) when dropped.
pub struct ChildGuard {
    pub what: String,
    pub child: Option<Child>,
    pub log: PathBuf,
}

impl ChildGuard {
    /// Starts `cmd` with stdout and stderr going to `log`.
    pub fn spawn(what: &str, mut cmd: Command, log: PathBuf) -> Result<ChildGuard> {
        let out = std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        die_with_parent(&mut cmd);
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("starting the {what} ({})", cmd.get_program().to_string_lossy()))?;
        Ok(ChildGuard { what: what.to_string(), child: Some(child), log })
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or(0)
    }

    /// Error if the child has exited.
    pub fn check_alive(&mut self) -> Result<()> {
        if let Some(c) = self.child.as_mut()
            && let Ok(Some(st)) = c.try_wait()
        {
            bail!("the {} exited ({st}); the end of its log:\n{}", self.what, log_tail(&self.log, 20));
        }
        Ok(())
    }

    /// Waits until every one of `needles` has appeared in the log; errors (with the log's
    /// tail) if the child exits or `limit` passes first.
    pub async fn wait_for_log(&mut self, needles: &[&str], limit: Duration) -> Result<()> {
        let deadline = Instant::now() + limit;
        loop {
            self.check_alive()?;
            let text = std::fs::read_to_string(&self.log).unwrap_or_default();
            if needles.iter().all(|n| text.contains(n)) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                let missing: Vec<&&str> = needles.iter().filter(|n| !text.contains(**n)).collect();
                bail!(
                    "the {} did not log {missing:?} within {:.0} s; the end of its log:\n{}",
                    self.what,
                    limit.as_secs_f64(),
                    log_tail(&self.log, 20)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGTERM, wait up to `grace`, SIGKILL if it hangs. Returns how it ended and how long it took.
    pub fn stop(&mut self, grace: Duration) -> (String, f64) {
        let Some(mut child) = self.child.take() else { return ("not running".into(), 0.0) };
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

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            signal(&child, libc::SIGTERM);
            if wait_for(&mut child, Duration::from_secs(3)).is_none() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
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
}
