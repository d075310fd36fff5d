//! A reconnect storm (`ztna-bench reconnect-storm`): N agents, each a real client engine (all
//! in this process, each with its own socket), connected to a relay on loopback; the relay is
//! stopped with SIGTERM and started again on the same port at once, and the bench watches the
//! new relay's connections come back. Once with each `--spread-ms` value, side by side: the
//! relay's `GoingAway` spread (PROTOCOL.md §7.16) against everyone coming back at once.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use serde::Serialize;
use ztna_client::candidates::DirectConfig;
use ztna_client::engine::agent::Agent;
use ztna_client::engine::{Engine, EngineConfig};
use ztna_client::metrics::ClientMetrics;
use ztna_client::tls::ClientTls;
use ztna_testbed::relay::Relay;

use crate::relay_under_test;

#[derive(Debug, Clone, clap::Args)]
pub struct ReconnectStormArgs {
    /// Agents reconnecting at once.
    #[arg(long, default_value_t = 1000)]
    pub clients: usize,
    /// The relay's reconnect spreads to compare, in ms (comma-separated).
    #[arg(long, value_delimiter = ',', default_values_t = vec![0, 1000])]
    pub spread_ms: Vec<u32>,
    #[arg(long)]
    pub json: Option<PathBuf>,
}

#[derive(Debug, Serialize)]
pub struct StormRun {
    pub spread_ms: u32,
    pub clients: usize,
    /// From the SIGTERM until the new relay answered its health check.
    pub relay_up_s: f64,
    /// From the SIGTERM until half, and until all, of the clients were connected again.
    pub half_back_s: f64,
    pub all_back_s: f64,
    /// The most handshakes the new relay completed in one 100 ms window, per second.
    pub peak_handshakes_per_s: f64,
}

const WINDOW: Duration = Duration::from_millis(100);

pub async fn run(a: &ReconnectStormArgs) -> Result<Vec<StormRun>> {
    let relay_bin = relay_under_test::relay_bin(None)?;
    let tmp = ztna_testbed::tempdir::TempDir::new("bench-storm")?;
    let pki = relay_under_test::pki_init(&relay_bin, tmp.path(), &[])?;
    let mut runs = Vec::new();
    for &spread in &a.spread_ms {
        runs.push(storm(&pki, a.clients, spread).await?);
    }
    Ok(runs)
}

async fn storm(pki: &ztna_testbed::pki::Pki, clients: usize, spread: u32) -> Result<StormRun> {
    // Every client comes from 127.0.0.1: lift the per-source handshake limit.
    let spread_arg = spread.to_string();
    let extra = ["--handshake-rate", "1000000", "--handshake-burst", "1000000", "--reconnect-spread-ms", &spread_arg];
    let relay = Relay::start(pki, 2, &extra)?;
    let port = relay.addr_v4().port();
    let metrics = Arc::new(ClientMetrics::new("ztna_agent"));
    let mut engines = Vec::with_capacity(clients);
    for _ in 0..clients {
        let cfg = EngineConfig {
            relay: relay.addr_v4(),
            server_name: None,
            tls: ClientTls::from_pki_dir(pki.path(), "agent", "alice"),
            software: "ztna-bench/storm".into(),
            connect_timeout: Duration::from_secs(5),
            direct: DirectConfig { enabled: false, ..DirectConfig::default() },
        };
        let engine = Engine::new(cfg, metrics.clone(), |_| Agent::new(vec!["web".into()]))?;
        engines.push(tokio::spawn(engine.run()));
    }
    let connections = |r: &Relay| r.metric("ztna_relay_control_connections", &[]) as usize;
    wait_for(Duration::from_secs(60), || connections(&relay) >= clients).await?;

    let stopped = Instant::now();
    relay.signal(ztna_testbed::process::SIGTERM);
    relay.wait_exit(Duration::from_secs(10));
    drop(relay);
    let relay = Relay::start_on(pki, port, 2, &extra)?;
    let relay_up = stopped.elapsed();
    let (mut half, mut last_ok, mut peak) = (None, 0.0, 0.0f64);
    let all = loop {
        let t = stopped.elapsed();
        let scrape = relay.scrape()?;
        let back = scrape.sum("ztna_relay_control_connections", &[]) as usize;
        let ok = scrape.sum("ztna_relay_handshakes_total", &[("reason", "ok")]);
        peak = peak.max((ok - last_ok) / WINDOW.as_secs_f64());
        last_ok = ok;
        if half.is_none() && back * 2 >= clients {
            half = Some(t);
        }
        if back >= clients {
            break t;
        }
        if t > Duration::from_secs(60) {
            bail!("only {back} of {clients} clients came back within 60 s");
        }
        tokio::time::sleep(WINDOW).await;
    };
    for e in engines {
        e.abort();
    }
    relay.signal(ztna_testbed::process::SIGTERM);
    relay.wait_exit(Duration::from_secs(10));
    Ok(StormRun {
        spread_ms: spread,
        clients,
        relay_up_s: relay_up.as_secs_f64(),
        half_back_s: half.unwrap_or(all).as_secs_f64(),
        all_back_s: all.as_secs_f64(),
        peak_handshakes_per_s: peak,
    })
}

async fn wait_for(limit: Duration, mut done: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + limit;
    while !done() {
        if Instant::now() > deadline {
            bail!("the clients did not all connect within {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

pub fn print(runs: &[StormRun]) {
    println!("reconnect storm: SIGTERM, then a new relay on the same port at once; time from the SIGTERM");
    println!("{:>10} {:>8} {:>10} {:>10} {:>10} {:>16}", "spread", "clients", "relay up", "half back", "all back", "peak handshakes");
    for r in runs {
        println!(
            "{:>8}ms {:>8} {:>9.2}s {:>9.2}s {:>9.2}s {:>14.0}/s",
            r.spread_ms, r.clients, r.relay_up_s, r.half_back_s, r.all_back_s, r.peak_handshakes_per_s
        );
    }
}
