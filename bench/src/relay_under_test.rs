//! The relay the benchmarks measure: its binary, its PKI, its command line (1 worker, unpinned,
//! the per-IP handshake limit out of the way), starting it in the lab's relay host, and
//! stopping it with a record of how it ended and what it logged.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use serde::Serialize;
use ztna_testbed::lab::{self, Host, Lab};
use ztna_testbed::pki::{Identities, Pki};
use ztna_testbed::process::{self, Process};
use ztna_testbed::relay::{self, Relay, Workers};
use ztna_testbed::{Scrape, bins};

/// The build command that puts every binary the benchmarks start next to `ztna-bench`.
pub const BUILD: &str = "cargo build --release -p ztna-relay -p ztna-agent -p ztna-connector -p ztna-bench";

/// The relay's UDP port in the relay host (all addresses) and its admin address (the relay
/// host's loopback).
pub const RELAY_PORT: u16 = 4433;
pub const ADMIN: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 9901);

/// How long a child of a benchmark gets to exit after SIGTERM when its guard is dropped.
pub const DROP_GRACE: Duration = Duration::from_secs(3);

/// `name` (`ztna-agent`, ...) next to this executable, or `explicit`.
pub fn sibling_bin(name: &str, explicit: Option<&Path>) -> Result<PathBuf> {
    bins::find_or(explicit, name).with_context(|| format!("the benchmarks start the release binaries next to ztna-bench: `{BUILD}`"))
}

pub fn relay_bin(explicit: Option<&Path>) -> Result<PathBuf> {
    sibling_bin("ztna-relay", explicit)
}

/// `ztna-relay pki init` in `dir`: a CA, the relay's certificate, agent alice, connector web-1
/// and `connectors`, and pki init's policy (alice may reach service `web`, served by web-1).
pub fn pki_init(relay_bin: &Path, dir: &Path, connectors: &[&str]) -> Result<Pki> {
    let mut all = vec!["web-1"];
    all.extend_from_slice(connectors);
    Pki::create_in(relay_bin, dir, Identities { agents: &["alice"], connectors: &all })
}

/// The relay's command line on `listen` and `admin` (PKI files in `pki`).
pub fn args(pki: &Path, listen: &str, admin: &str, retry: bool) -> Vec<String> {
    let mut v = relay::args(pki, listen, admin, Workers::Unpinned(1));
    v.extend(["--handshake-rate".into(), "1000000".into()]);
    if !retry {
        v.push("--no-retry".into());
    }
    v
}

/// The relay's command line in the reports (PKI paths as `PKI`).
pub fn command_line(log_level: &str) -> String {
    format!(
        "ztna-relay {} (ZTNA_LOG={log_level}), in the relay host",
        args(Path::new("PKI"), &format!("0.0.0.0:{RELAY_PORT}"), &ADMIN.to_string(), true).join(" ")
    )
}

/// A relay in the lab's relay host.
pub struct LabRelay {
    pub relay: Relay,
    /// Its address as the agent host reaches it.
    pub listen: SocketAddr,
    /// Its address as the connector host reaches it.
    pub connector_listen: SocketAddr,
    pub retry: bool,
}

impl LabRelay {
    /// Starts a relay in the relay host (all its IPv4 addresses), its log `relay-N.log` in
    /// `tmp`, and waits until its admin endpoint answers.
    pub fn start(lab: &Lab, bin: &Path, pki: &Path, tmp: &Path, retry: bool, log_level: &str, n: usize) -> Result<LabRelay> {
        let mut cmd = lab.cmd(Host::Relay, bin);
        cmd.args(args(pki, &format!("0.0.0.0:{RELAY_PORT}"), &ADMIN.to_string(), retry)).env("ZTNA_LOG", log_level);
        let mut relay = Relay::spawn(cmd, &tmp.join(format!("relay-{n}.log")), RELAY_PORT, ADMIN, Some(&lab.ns(Host::Relay)))?;
        relay.process.set_drop_grace(DROP_GRACE);
        let (listen, connector_listen) = lab::relay_addrs(false, RELAY_PORT);
        Ok(LabRelay { relay, listen, connector_listen, retry })
    }

    pub fn pid(&self) -> u32 {
        self.relay.pid()
    }

    pub fn admin(&self) -> SocketAddr {
        self.relay.admin
    }

    /// The relay's /metrics (scraped from inside the relay host).
    pub fn scrape(&self) -> Result<Scrape> {
        self.relay.scrape()
    }

    /// SIGTERM (SIGKILL after 15 s); how it ended and its WARN/ERROR lines.
    pub fn finish(self, purpose: &str) -> RelayRun {
        let pid = self.pid();
        let (exit, stop_s) = self.relay.process.stop(Duration::from_secs(15));
        let (log_warnings, log_warning_count) = process::log_warnings(self.relay.process.log(), 5);
        println!("   relay (pid {pid}) stopped: {exit} in {stop_s:.2} s; {log_warning_count} WARN/ERROR log lines");
        for w in &log_warnings {
            println!("     {w}");
        }
        RelayRun {
            purpose: purpose.to_string(),
            retry: self.retry,
            listen: self.listen,
            admin: self.relay.admin,
            pid,
            exit,
            stop_s,
            log_warnings,
            log_warning_count,
        }
    }
}

/// How one relay run ended.
#[derive(Debug, Clone, Serialize)]
pub struct RelayRun {
    pub purpose: String,
    pub retry: bool,
    pub listen: SocketAddr,
    pub admin: SocketAddr,
    pub pid: u32,
    /// How the relay ended after SIGTERM.
    pub exit: String,
    pub stop_s: f64,
    /// WARN/ERROR lines from its log (first few).
    pub log_warnings: Vec<String>,
    pub log_warning_count: usize,
}

/// How a child process ended and what it logged.
#[derive(Debug, Clone, Serialize)]
pub struct ProcRun {
    pub what: String,
    pub pid: u32,
    pub exit: String,
    pub log_warnings: Vec<String>,
    pub log_warning_count: usize,
}

/// SIGTERM (SIGKILL after 5 s) for a client process; how it ended and its WARN/ERROR lines.
pub fn stop_client(p: &Process) -> ProcRun {
    let pid = p.pid();
    let (exit, _) = p.stop(Duration::from_secs(5));
    let (log_warnings, log_warning_count) = process::log_warnings(p.log(), 5);
    println!("   {} (pid {pid}) stopped: {exit}; {log_warning_count} WARN/ERROR log lines", p.what());
    for w in &log_warnings {
        println!("     {w}");
    }
    ProcRun { what: p.what().to_string(), pid, exit, log_warnings, log_warning_count }
}
