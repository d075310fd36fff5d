//! The relay under test: its command line, starting it and waiting until its admin endpoint
//! says it is healthy, and reading its metrics (from inside its network namespace when it
//! runs in one).

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::metrics::{self, Scrape};
use crate::netns;
use crate::pki::Pki;
use crate::ports::{free_tcp_port, free_udp_port};
use crate::process::Process;

/// How long a relay may take from spawn to a healthy admin endpoint.
pub const START_TIMEOUT: Duration = Duration::from_secs(10);

/// The relay's worker threads.
#[derive(Debug, Clone, Copy)]
pub enum Workers {
    /// Not pinned to cores (`--no-pin`): tests and benchmarks share the cores with it.
    Unpinned(usize),
    /// Pinned one per core, as in production.
    Pinned(usize),
}

/// The relay command line every test and benchmark starts from: listen and admin addresses,
/// workers, and the PKI's certificate, key, CA and policy. Callers append their own flags.
pub fn args(pki_dir: &Path, listen: &str, admin: &str, workers: Workers) -> Vec<String> {
    let (n, pin) = match workers {
        Workers::Unpinned(n) => (n, false),
        Workers::Pinned(n) => (n, true),
    };
    let mut v: Vec<String> = vec!["--listen".into(), listen.into(), "--admin".into(), admin.into(), "--workers".into(), n.to_string()];
    if !pin {
        v.push("--no-pin".into());
    }
    for (flag, file) in [("--cert", "relay.pem"), ("--key", "relay.key"), ("--ca", "ca.pem"), ("--policy", "policy.toml"), ("--state-dir", "state")] {
        v.push(flag.into());
        v.push(pki_dir.join(file).display().to_string());
    }
    v
}

/// The `ZTNA_LOG` level for processes of tests: the caller's, `info` by default.
pub fn test_log_level() -> String {
    std::env::var("ZTNA_LOG").unwrap_or_else(|_| "info".into())
}

/// A running relay, killed when dropped.
pub struct Relay {
    pub process: Process,
    /// Its UDP port (on every address it listens on).
    pub port: u16,
    pub admin: SocketAddr,
    /// The network namespace its admin address is reached in; `None`: this process's.
    netns: Option<String>,
}

impl Relay {
    /// Spawns `cmd` (a relay command line, e.g. from [`args`], possibly under `ip netns exec`)
    /// and waits until `admin` answers `/healthz` from inside `netns`. The error says whether
    /// the relay exited or never became healthy, with the end of its log.
    pub fn spawn(cmd: Command, log: &Path, port: u16, admin: SocketAddr, netns: Option<&str>) -> Result<Relay> {
        let process = Process::spawn("relay", cmd, log)?;
        let relay = Relay { process, port, admin, netns: netns.map(str::to_string) };
        relay.wait_healthy(START_TIMEOUT)?;
        Ok(relay)
    }

    /// On loopback, dual-stack (`[::]`) on a free UDP port, admin on a free port of 127.0.0.1,
    /// `workers` unpinned workers, `extra` flags; its log in the PKI directory.
    pub fn start(pki: &Pki, workers: usize, extra: &[&str]) -> Result<Relay> {
        Relay::start_on(pki, free_udp_port(), workers, extra)
    }

    /// Like [`start`](Self::start) on a given UDP port (to restart a relay in place).
    pub fn start_on(pki: &Pki, port: u16, workers: usize, extra: &[&str]) -> Result<Relay> {
        Relay::start_with_env(pki, port, workers, extra, &[])
    }

    /// Like [`start_on`](Self::start_on) with extra environment variables for the relay.
    pub fn start_with_env(pki: &Pki, port: u16, workers: usize, extra: &[&str], env: &[(&str, &Path)]) -> Result<Relay> {
        let admin = SocketAddr::from(([127, 0, 0, 1], free_tcp_port()));
        let mut cmd = Command::new(crate::bins::find("ztna-relay")?);
        cmd.args(args(pki.path(), &format!("[::]:{port}"), &admin.to_string(), Workers::Unpinned(workers)))
            .args(extra)
            .envs(env.iter().copied())
            .env("ZTNA_LOG", test_log_level());
        Relay::spawn(cmd, &pki.file(&format!("relay-{port}.log")), port, admin, None)
    }

    fn wait_healthy(&self, limit: Duration) -> Result<()> {
        let deadline = Instant::now() + limit;
        loop {
            self.process.check_alive().context("the relay did not start")?;
            if self.healthy()? {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "the relay did not become healthy on http://{}/healthz{} within {:.0} s; the end of its log:\n{}",
                    self.admin,
                    self.netns.as_deref().map(|n| format!(" (in {n})")).unwrap_or_default(),
                    limit.as_secs_f64(),
                    self.process.log_tail(20)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Whether `/healthz` answers 200 now.
    pub fn healthy(&self) -> Result<bool> {
        let admin = self.admin;
        netns::maybe_in(self.netns.as_deref(), || Ok(metrics::healthy(admin)))
    }

    pub fn addr_v4(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    pub fn addr_v6(&self) -> SocketAddr {
        SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, self.port))
    }

    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    pub fn log_text(&self) -> String {
        self.process.log_text()
    }

    /// The Prometheus text of `/metrics`.
    pub fn metrics_text(&self) -> Result<String> {
        let admin = self.admin;
        netns::maybe_in(self.netns.as_deref(), || metrics::metrics_text(admin))
    }

    /// One scrape of `/metrics`.
    pub fn scrape(&self) -> Result<Scrape> {
        Ok(Scrape::parse(&self.metrics_text()?))
    }

    /// Sum of metric `name` over the series with all of `labels`; 0 when the scrape fails.
    pub fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.scrape().map(|s| s.sum(name, labels)).unwrap_or(0.0)
    }

    /// Polls a metric until it reaches `want`, for 5 s at most (for counts the relay updates
    /// when it finishes closing a connection, a few round trips after the client is gone).
    /// Returns the last value.
    pub fn wait_metric(&self, name: &str, labels: &[(&str, &str)], want: f64) -> f64 {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let v = self.metric(name, labels);
            if v >= want || Instant::now() > deadline {
                return v;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    pub fn signal(&self, sig: i32) {
        self.process.signal(sig);
    }

    /// Waits for the relay to exit; its exit code.
    pub fn wait_exit(&self, timeout: Duration) -> Option<i32> {
        self.process.wait_exit(timeout)
    }
}
