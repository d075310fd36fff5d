//! The control-plane part of the standard set, on the lab topology: handshakes per second
//! with Retry on and off (each on a fresh relay in the relay host, the load generator's
//! sockets in the agent host), then relay memory per idle control connection on a third.

use std::path::Path;

use anyhow::Result;
use serde::Serialize;
use ztna_testbed::lab::{Host, Lab};

use crate::client::{ClientArgs, ClientNetns};
use crate::handshakes::{self, HandshakeArgs, HandshakeReport};
use crate::idle_rss::{self, IdleRssArgs, IdleRssReport};
use crate::interrupt::check_interrupted;
use crate::relay_under_test::{self, LabRelay, RelayRun};
use crate::sys::{self, Machine};

#[derive(clap::Args, Debug, Clone)]
pub struct ControlPlaneArgs {
    /// Seconds per handshake-throughput run.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Concurrent connect/close loops in the throughput runs.
    #[arg(long, default_value_t = 32)]
    pub concurrency: usize,
    /// Seconds of the single-loop (unloaded) latency run after each throughput run; 0 skips it.
    #[arg(long, default_value_t = 5.0)]
    pub latency_duration: f64,
    /// Idle control connections held for the RSS measurement.
    #[arg(long, default_value_t = 1000)]
    pub connections: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct ControlPlaneReport {
    pub date: String,
    /// The workspace's git commit when measured.
    pub revision: String,
    pub machine: Machine,
    pub command: String,
    pub relay_args: String,
    pub client_trust_store: String,
    pub throughput_retry: HandshakeReport,
    pub throughput_no_retry: HandshakeReport,
    pub latency_retry: Option<HandshakeReport>,
    pub latency_no_retry: Option<HandshakeReport>,
    pub idle_rss: IdleRssReport,
    pub relay_runs: Vec<RelayRun>,
    /// The relay's ZTNA_LOG level (in the report's prose; the JSON has it in `relay_args`).
    #[serde(skip)]
    pub relay_log: String,
}

fn client_args() -> ClientArgs {
    ClientArgs { kind: "agent".into(), name: "alice".into(), server_name: None }
}

/// The load generator's clients in the agent host, the admin scrapes in the relay's.
fn client_netns(lab: &Lab) -> ClientNetns {
    ClientNetns { clients: Some(lab.ns(Host::Agent)), admin: Some(lab.ns(Host::Relay)) }
}

fn hs_args(lab: &Lab, g: &LabRelay, pki: &Path, duration: f64, concurrency: usize) -> HandshakeArgs {
    HandshakeArgs {
        relay: g.listen,
        pki_dir: pki.to_path_buf(),
        duration,
        concurrency,
        timeout: 5.0,
        client: client_args(),
        relay_pid: Some(g.pid()),
        admin: Some(g.admin()),
        netns: client_netns(lab),
        json: None,
    }
}

/// Runs the part in `lab` with relay binary `bin`, the PKI in `pki`, logs in `tmp`.
pub async fn run(a: &ControlPlaneArgs, lab: &Lab, bin: &Path, pki: &Path, tmp: &Path, relay_log: &str) -> Result<ControlPlaneReport> {
    let mut runs = Vec::new();
    let mut results = Vec::new();
    for (n, retry) in [true, false].into_iter().enumerate() {
        check_interrupted()?;
        let tag = if retry { "Retry on" } else { "Retry off (--no-retry)" };
        let g = LabRelay::start(lab, bin, pki, tmp, retry, relay_log, n)?;
        println!("-- relay run {} ({tag}): pid {}, {} admin {}", n + 1, g.pid(), g.listen, g.admin());
        let thr = handshakes::run(&hs_args(lab, &g, pki, a.duration, a.concurrency)).await?;
        handshakes::print(&thr, &format!(" ({tag})"));
        let lat = if a.latency_duration > 0.0 {
            let l = handshakes::run(&hs_args(lab, &g, pki, a.latency_duration, 1)).await?;
            handshakes::print(&l, &format!(" ({tag}, one loop)"));
            Some(l)
        } else {
            None
        };
        runs.push(g.finish(&format!("handshakes, {tag}")));
        results.push((thr, lat));
    }

    check_interrupted()?;
    let g = LabRelay::start(lab, bin, pki, tmp, true, relay_log, 2)?;
    println!("-- relay run 3 (idle connections): pid {}, {} admin {}", g.pid(), g.listen, g.admin());
    let idle = idle_rss::run(&IdleRssArgs {
        relay_pid: g.pid(),
        relay: g.listen,
        pki_dir: pki.to_path_buf(),
        connections: a.connections,
        open_concurrency: 32,
        timeout: 5.0,
        establish_timeout: 120.0,
        warmup: 20,
        client: client_args(),
        admin: Some(g.admin()),
        netns: client_netns(lab),
        json: None,
    })
    .await?;
    idle_rss::print(&idle);
    runs.push(g.finish("idle-rss, Retry on"));

    let mut it = results.into_iter();
    let (Some((thr_r, lat_r)), Some((thr_n, lat_n))) = (it.next(), it.next()) else { unreachable!() };
    let argv: Vec<String> = std::env::args().skip(1).collect();
    Ok(ControlPlaneReport {
        date: sys::utc_now(),
        revision: sys::git_revision(),
        machine: sys::machine(),
        command: format!("{} && target/release/ztna-bench {}", relay_under_test::BUILD, argv.join(" ")),
        relay_args: relay_under_test::command_line(relay_log),
        client_trust_store: crate::client::TRUST_STORE.to_string(),
        throughput_retry: thr_r,
        throughput_no_retry: thr_n,
        latency_retry: lat_r,
        latency_no_retry: lat_n,
        idle_rss: idle,
        relay_runs: runs,
        relay_log: relay_log.to_string(),
    })
}
