//! What every lab topology has in common, whichever script builds it (`deploy/lab/lab.sh`:
//! [`crate::lab::Lab`], `deploy/lab/nat.sh`: [`crate::natlab::NatLab`]): the script run with
//! `LAB_PREFIX`, its hosts as namespaces `<prefix>-<host>`, commands and processes inside them,
//! and the teardown on drop (the processes it started, any other process still inside its
//! namespaces, then `down`), also when a test fails or a benchmark errors.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use anyhow::{Context, Result, bail};

use crate::metrics::{self, Scrape};
use crate::netns;
use crate::process::Process;

/// The hosts of one topology.
pub trait LabHost: Copy + 'static {
    /// Every host, so that the teardown can look into each namespace.
    const ALL: &'static [Self];
    /// The host's part of its namespace's name.
    fn suffix(self) -> &'static str;
}

/// A topology built by a lab script under a prefix of the caller's own.
pub struct NsLab<H: LabHost> {
    pub prefix: String,
    script: PathBuf,
    /// Started by [`NsLab::spawn`]; killed before the namespaces go.
    processes: Vec<Process>,
    _hosts: std::marker::PhantomData<H>,
}

/// A prefix of `tag` plus part of this process's id, so that parallel tests (different tags)
/// and parallel runs (different pids) do not collide.
pub fn tagged_prefix(tag: &str) -> String {
    format!("{tag}{}", std::process::id() % 100_000)
}

impl<H: LabHost> NsLab<H> {
    /// `script up ARGS...` with `LAB_PREFIX=prefix` (needs root).
    pub(crate) fn build(script: &Path, prefix: &str, args: &[String]) -> Result<Self> {
        if !script.is_file() {
            bail!("the lab script {} does not exist (run from the workspace root or pass --lab-script)", script.display());
        }
        // Constructed first, so a half-built lab is removed too.
        let lab = NsLab { prefix: prefix.to_string(), script: script.to_path_buf(), processes: Vec::new(), _hosts: Default::default() };
        let out = lab.script_cmd("up").args(args).output().with_context(|| format!("running {} up", script.display()))?;
        if !out.status.success() {
            bail!(
                "{} up {} failed (root, iproute2 and veth support are needed): {}",
                script.display(),
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(lab)
    }

    /// `script ACTION ARGS...` to completion: an error with its stderr when it fails.
    pub(crate) fn script(&self, action: &str, args: &[&str]) -> Result<()> {
        let out = self.script_cmd(action).args(args).output().with_context(|| format!("running {} {action}", self.script.display()))?;
        if !out.status.success() {
            bail!("{} {action} {} failed: {}", self.script.display(), args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(())
    }

    fn script_cmd(&self, action: &str) -> Command {
        let mut c = Command::new("bash");
        c.arg(&self.script).arg(action).env("LAB_PREFIX", &self.prefix).stdin(Stdio::null());
        c
    }

    /// The namespace name of a host.
    pub fn ns(&self, host: H) -> String {
        format!("{}-{}", self.prefix, host.suffix())
    }

    /// A command to run inside a host.
    pub fn cmd(&self, host: H, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns(host)]).arg(program);
        c
    }

    /// Runs `args` (program first) in a host to completion, whatever its exit status.
    pub fn output(&self, host: H, args: &[&str]) -> Result<Output> {
        let (program, rest) = args.split_first().context("empty command")?;
        self.cmd(host, program)
            .args(rest)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running {program} in {}", self.ns(host)))
    }

    /// Runs `args` in a host to completion: its stdout, or an error with its stderr.
    pub fn run(&self, host: H, args: &[&str]) -> Result<String> {
        let out = self.output(host, args)?;
        if !out.status.success() {
            bail!(
                "`{}` in {} failed ({}): {}",
                args.join(" "),
                self.ns(host),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Runs `f` on a thread inside a host's namespace (sockets it opens stay there).
    pub fn run_in<T: Send>(&self, host: H, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
        netns::run_in(&self.ns(host), f)
    }

    /// Starts a long-running process in a host (`ZTNA_LOG=info`, output to `log`), owned by
    /// the lab. Returns its index for [`NsLab::process`].
    pub fn spawn(&mut self, host: H, program: &Path, args: &[&str], log: &Path) -> Result<usize> {
        let mut cmd = self.cmd(host, program);
        cmd.args(args).env("ZTNA_LOG", "info");
        let what = format!("{} in {}", program.file_name().unwrap_or(program.as_os_str()).to_string_lossy(), self.ns(host));
        self.processes.push(Process::spawn(&what, cmd, log)?);
        Ok(self.processes.len() - 1)
    }

    /// A process started by [`NsLab::spawn`].
    pub fn process(&self, index: usize) -> &Process {
        &self.processes[index]
    }

    /// The metrics of an admin endpoint inside a host (e.g. the relay's on its loopback).
    pub fn scrape(&self, host: H, admin: SocketAddr) -> Result<Scrape> {
        Ok(Scrape::parse(&self.metrics_text(host, admin)?))
    }

    /// The Prometheus text of an admin endpoint inside a host.
    pub fn metrics_text(&self, host: H, admin: SocketAddr) -> Result<String> {
        self.run_in(host, || metrics::metrics_text(admin))
    }

    /// SIGKILLs every process still in one of the lab's namespaces: a namespace stays alive
    /// while a process is in it, and so would its links and XDP programs.
    fn kill_stragglers(&self) {
        for &host in H::ALL {
            let Ok(out) = Command::new("ip").args(["netns", "pids", &self.ns(host)]).stderr(Stdio::null()).output() else { continue };
            for pid in String::from_utf8_lossy(&out.stdout).split_whitespace().filter_map(|p| p.parse::<i32>().ok()) {
                if pid as u32 != std::process::id() {
                    // SAFETY: kill(2) on a process in a namespace this lab created.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
        }
    }
}

impl<H: LabHost> Drop for NsLab<H> {
    fn drop(&mut self) {
        self.processes.clear();
        self.kill_stragglers();
        match self.script_cmd("down").output() {
            Ok(o) if o.status.success() => {}
            _ => eprintln!(
                "warning: removing the lab failed; run `LAB_PREFIX={} {} down`",
                self.prefix,
                self.script.display()
            ),
        }
    }
}
