//! `ztna-bench idle-rss`: the relay's resident memory per idle control connection.
//!
//! Reads the relay's VmRSS, opens N control connections and keeps them open (each in its own
//! task, servicing keep-alives), waits for RSS to settle, reads VmRSS again, closes them.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use serde::Serialize;
use tokio::sync::{Semaphore, mpsc};

use crate::client::{self, ClientArgs, ClientNetns};
use crate::relay_counters;
use crate::sys;

#[derive(clap::Args, Debug, Clone)]
pub struct IdleRssArgs {
    /// Process id of the relay (its /proc/PID/status is read).
    #[arg(long)]
    pub relay_pid: u32,
    /// Relay UDP address (e.g. 127.0.0.1:4433).
    #[arg(long)]
    pub relay: SocketAddr,
    /// Directory written by `ztna-relay pki init`.
    #[arg(long)]
    pub pki_dir: PathBuf,
    /// Control connections to hold open.
    #[arg(long, default_value_t = 1000)]
    pub connections: usize,
    /// Connections being opened at once.
    #[arg(long, default_value_t = 32)]
    pub open_concurrency: usize,
    /// Per-connection timeout in seconds.
    #[arg(long, default_value_t = 5.0)]
    pub timeout: f64,
    /// Give up opening connections after this many seconds.
    #[arg(long, default_value_t = 120.0)]
    pub establish_timeout: f64,
    /// Connections opened and closed before the baseline reading (warms the relay's allocator).
    #[arg(long, default_value_t = 20)]
    pub warmup: usize,
    #[command(flatten)]
    pub client: ClientArgs,
    /// Relay admin address: check the relay's own count of open control connections.
    #[arg(long)]
    pub admin: Option<SocketAddr>,
    #[command(flatten)]
    pub netns: ClientNetns,
    /// Also write the result as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

#[derive(Debug, Clone, Serialize)]
pub struct IdleRssReport {
    pub relay: SocketAddr,
    pub relay_pid: u32,
    pub connections_requested: usize,
    pub connections_established: u64,
    pub connect_failures: u64,
    pub first_error: Option<String>,
    /// Connections that died while being held.
    pub lost_while_holding: u64,
    /// What the relay's /metrics said it held (if --admin was given).
    pub relay_reported_connections: Option<u64>,
    pub rss_before_bytes: u64,
    pub rss_after_bytes: u64,
    pub rss_delta_bytes: i64,
    pub rss_per_connection_bytes: f64,
    pub rss_per_connection_kib: f64,
    pub rss_peak_bytes: u64,
    pub establish_s: f64,
    pub settle_s: f64,
    /// Relay CPU while holding the idle connections (keep-alives, timers), in cores.
    pub relay_idle_cpu_cores: f64,
}

/// Samples RSS every 250 ms until it has moved less than 1% (or 64 KiB) over the last 2 s,
/// or `max` has passed. Returns the last sample.
async fn settle(pid: u32, max: Duration) -> Result<(u64, f64)> {
    let start = Instant::now();
    let step = Duration::from_millis(250);
    let window = 8; // 2 s of samples
    let mut samples: Vec<u64> = Vec::new();
    loop {
        samples.push(sys::rss_bytes(pid)?);
        if samples.len() > window {
            let last = &samples[samples.len() - window - 1..];
            let (lo, hi) = (*last.iter().min().unwrap_or(&0), *last.iter().max().unwrap_or(&0));
            if hi - lo <= (hi / 100).max(64 * 1024) || start.elapsed() >= max {
                return Ok((*samples.last().unwrap_or(&0), start.elapsed().as_secs_f64()));
            }
        }
        tokio::time::sleep(step).await;
    }
}

pub async fn run(args: &IdleRssArgs) -> Result<IdleRssReport> {
    if args.connections == 0 || args.connections > 100_000 {
        bail!("--connections must be in 1..=100000");
    }
    let pid = args.relay_pid;
    sys::rss_bytes(pid)?;
    let limit = sys::raise_nofile_limit();
    if limit != 0 && (args.connections as u64) + 64 > limit {
        bail!("{} connections need as many sockets, but the open-file limit is {limit} (ulimit -n)", args.connections);
    }
    let timeout = Duration::from_secs_f64(args.timeout.clamp(0.1, 60.0));
    let tls = Arc::new(args.client.tls(&args.pki_dir)?);
    let server_name = args.client.server_name.clone();
    let netns = args.netns.clients.clone();
    client::preflight(args.relay, netns.as_deref(), server_name.as_deref(), &tls, timeout).await?;
    for _ in 0..args.warmup {
        if let Ok(c) = client::connect(args.relay, netns.as_deref(), server_name.as_deref(), &tls, timeout).await {
            c.close().await;
        }
    }
    // Let closed connections leave the relay's tables before the baseline.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_before = sys::rss_bytes(pid)?;

    let stop = Arc::new(AtomicBool::new(false));
    let lost = Arc::new(AtomicU64::new(0));
    let gate = Arc::new(Semaphore::new(args.open_concurrency.max(1)));
    let (tx, mut rx) = mpsc::unbounded_channel::<Result<(), String>>();
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(args.connections);
    for _ in 0..args.connections {
        let (tls, server_name, netns, stop, lost, gate, tx) =
            (tls.clone(), server_name.clone(), netns.clone(), stop.clone(), lost.clone(), gate.clone(), tx.clone());
        let relay = args.relay;
        tasks.push(tokio::spawn(async move {
            let client = {
                let Ok(_permit) = gate.acquire().await else { return };
                if stop.load(Ordering::Relaxed) {
                    return;
                }
                client::connect(relay, netns.as_deref(), server_name.as_deref(), &tls, timeout).await
            };
            let mut client = match client {
                Ok(c) => {
                    let _ = tx.send(Ok(()));
                    c
                }
                Err(e) => {
                    let _ = tx.send(Err(e.to_string()));
                    return;
                }
            };
            while !stop.load(Ordering::Relaxed) {
                if client.idle(Duration::from_millis(500)).await.is_err() {
                    lost.fetch_add(1, Ordering::Relaxed);
                    return;
                }
            }
            client.close().await;
        }));
    }
    drop(tx);

    let deadline = started + Duration::from_secs_f64(args.establish_timeout.clamp(1.0, 3600.0));
    let (mut ok, mut failed, mut first_error) = (0u64, 0u64, None);
    while ok + failed < args.connections as u64 {
        match tokio::time::timeout_at(deadline.into(), rx.recv()).await {
            Ok(Some(Ok(()))) => ok += 1,
            Ok(Some(Err(e))) => {
                failed += 1;
                first_error.get_or_insert(e);
            }
            Ok(None) => break,
            Err(_) => {
                eprintln!("idle-rss: gave up opening connections after {:.0} s", args.establish_timeout);
                break;
            }
        }
    }
    let establish_s = started.elapsed().as_secs_f64();
    let result = async {
        if ok == 0 {
            bail!("no connection could be opened ({failed} failures; first: {})", first_error.as_deref().unwrap_or("none"));
        }
        let cpu0 = sys::cpu_seconds(Some(pid))?;
        let t0 = Instant::now();
        let (rss_after, settle_s) = settle(pid, Duration::from_secs(10)).await?;
        let relay_idle_cpu_cores = (sys::cpu_seconds(Some(pid))? - cpu0) / t0.elapsed().as_secs_f64();
        let relay_reported_connections = match args.admin {
            Some(a) => Some(relay_counters::scrape_in(args.netns.admin.as_deref(), a)?.sum("ztna_relay_control_connections", &[]).round() as u64),
            None => None,
        };
        let delta = rss_after as i64 - rss_before as i64;
        Ok(IdleRssReport {
            relay: args.relay,
            relay_pid: pid,
            connections_requested: args.connections,
            connections_established: ok,
            connect_failures: failed,
            first_error: first_error.clone(),
            lost_while_holding: lost.load(Ordering::Relaxed),
            relay_reported_connections,
            rss_before_bytes: rss_before,
            rss_after_bytes: rss_after,
            rss_delta_bytes: delta,
            rss_per_connection_bytes: delta as f64 / ok as f64,
            rss_per_connection_kib: delta as f64 / ok as f64 / 1024.0,
            rss_peak_bytes: sys::rss_peak_bytes(pid)?,
            establish_s,
            settle_s,
            relay_idle_cpu_cores,
        })
    }
    .await;
    // Close everything, whatever happened; each task notices within one idle slice.
    stop.store(true, Ordering::Relaxed);
    let close_deadline = Instant::now() + Duration::from_secs(10) + timeout;
    for t in tasks {
        let left = close_deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, t).await {
            Ok(_) => {}
            Err(_) => break, // the runtime drops what is left when the command returns
        }
    }
    let mut report = result?;
    report.lost_while_holding = lost.load(Ordering::Relaxed);
    Ok(report)
}

pub fn print(r: &IdleRssReport) {
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    println!("== idle-rss: relay {} (pid {}), {} connections", r.relay, r.relay_pid, r.connections_requested);
    let rows = [
        (
            "connections established",
            format!(
                "{} in {:.1} s ({} failed, {} lost while held{})",
                r.connections_established,
                r.establish_s,
                r.connect_failures,
                r.lost_while_holding,
                r.relay_reported_connections.map(|n| format!("; relay reports {n} open")).unwrap_or_default()
            ),
        ),
        ("RSS before", format!("{:.1} MiB", mib(r.rss_before_bytes))),
        ("RSS after (settled)", format!("{:.1} MiB after {:.1} s", mib(r.rss_after_bytes), r.settle_s)),
        ("RSS delta", format!("{} bytes ({:.1} MiB)", r.rss_delta_bytes, r.rss_delta_bytes as f64 / 1048576.0)),
        ("RSS per connection", format!("{:.0} bytes ({:.1} KiB)", r.rss_per_connection_bytes, r.rss_per_connection_kib)),
        ("RSS peak (VmHWM)", format!("{:.1} MiB", mib(r.rss_peak_bytes))),
        ("relay CPU while idle", format!("{:.3} cores", r.relay_idle_cpu_cores)),
    ];
    for (k, v) in rows {
        println!("  {k:<32} {v}");
    }
    if let Some(e) = &r.first_error {
        println!("  first connect error: {e}");
    }
}
