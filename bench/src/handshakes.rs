//! `ztna-bench handshakes`: control-connection handshakes per second.
//!
//! N concurrent loops, each: open a control connection with a full handshake (QUIC + mutual
//! TLS, Hello/Welcome, first QAD report), close it, repeat, until the time is up.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use hdrhistogram::Histogram;
use serde::Serialize;
use ztna_client::{ClientError, ClientTls};

use crate::client::{self, ClientArgs, ClientNetns};
use crate::relay_counters::{self, RelayCounters};
use crate::sys;

#[derive(clap::Args, Debug, Clone)]
pub struct HandshakeArgs {
    /// Relay UDP address (e.g. 127.0.0.1:4433).
    #[arg(long)]
    pub relay: SocketAddr,
    /// Directory written by `ztna-relay pki init` (CA and client identities).
    #[arg(long)]
    pub pki_dir: PathBuf,
    /// Seconds to run (connections still in flight at the end are finished, not counted in the rate).
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Concurrent connect/close loops.
    #[arg(long, default_value_t = 32)]
    pub concurrency: usize,
    /// Per-connection timeout in seconds.
    #[arg(long, default_value_t = 5.0)]
    pub timeout: f64,
    #[command(flatten)]
    pub client: ClientArgs,
    /// Relay process id: report its CPU time (utime+stime) during the run.
    #[arg(long)]
    pub relay_pid: Option<u32>,
    /// Relay admin address: report its own counters (handshakes, retries, drops) for the run.
    #[arg(long)]
    pub admin: Option<SocketAddr>,
    #[command(flatten)]
    pub netns: ClientNetns,
    /// Also write the result as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Latency {
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub mean_ms: f64,
}

impl Latency {
    pub fn from_hist(h: &Histogram<u64>) -> Latency {
        let ms = |us: u64| us as f64 / 1000.0;
        Latency {
            p50_ms: ms(h.value_at_quantile(0.50)),
            p90_ms: ms(h.value_at_quantile(0.90)),
            p99_ms: ms(h.value_at_quantile(0.99)),
            max_ms: ms(h.max()),
            mean_ms: h.mean() / 1000.0,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct HandshakeReport {
    pub relay: SocketAddr,
    pub duration_s: f64,
    pub concurrency: usize,
    /// Handshakes completed inside the time window.
    pub completed: u64,
    /// Handshakes completed in all, including those finished after the window closed.
    pub completed_total: u64,
    pub failures: u64,
    /// Failures by kind (timeout, handshake, closed_by_relay, refused, ...).
    pub failure_kinds: BTreeMap<String, u64>,
    pub first_error: Option<String>,
    /// `completed / duration_s`.
    pub rate_mean_per_s: f64,
    /// Slowest and fastest whole second.
    pub rate_min_per_s: u64,
    pub rate_max_per_s: u64,
    pub per_second: Vec<u64>,
    /// Full connect: QUIC + mTLS handshake, Hello/Welcome and the first QAD report.
    pub connect_latency: Option<Latency>,
    /// The QUIC + TLS handshake alone (until the connection is established).
    pub quic_handshake_latency: Option<Latency>,
    /// Relay CPU (user + system, all threads) from the start of the window until every loop stopped.
    pub relay_cpu_s: Option<f64>,
    /// `relay_cpu_s` per completed handshake (all of them), in microseconds.
    pub relay_cpu_us_per_handshake: Option<f64>,
    /// `relay_cpu_s` over the wall time it was measured on (1.0 = one core busy).
    pub relay_cpu_cores: Option<f64>,
    /// This load generator's own CPU over the same interval.
    pub bench_cpu_s: f64,
    /// CPU used by everything else on the machine over the same interval (other processes,
    /// interrupts, softirq packet processing): the whole machine's busy time minus the relay's and ours. Only meaningful
    /// with --relay-pid; a large value means the figures are disturbed.
    pub other_cpu_s: Option<f64>,
    pub wall_s: f64,
    pub relay_counters: Option<RelayCounters>,
    /// How the clients built their TLS trust store (see `--system-roots`).
    pub client_trust_store: String,
}

struct LoopStats {
    connect: Histogram<u64>,
    quic: Histogram<u64>,
    per_second: Vec<u64>,
    completed: u64,
    completed_total: u64,
    failures: BTreeMap<String, u64>,
    first_error: Option<String>,
}

pub fn new_hist() -> Histogram<u64> {
    // Microseconds, 1 µs to 10 min, 3 significant digits.
    Histogram::new_with_bounds(1, 600_000_000, 3).unwrap_or_else(|_| unreachable!())
}

pub fn error_kind(e: &ClientError) -> &'static str {
    e.kind()
}

#[allow(clippy::too_many_arguments)]
async fn connect_loop(
    relay: SocketAddr,
    netns: Option<String>,
    server_name: Option<String>,
    tls: Arc<ClientTls>,
    start: Instant,
    end: Instant,
    timeout: Duration,
    seconds: usize,
) -> LoopStats {
    let mut st = LoopStats {
        connect: new_hist(),
        quic: new_hist(),
        per_second: vec![0; seconds],
        completed: 0,
        completed_total: 0,
        failures: BTreeMap::new(),
        first_error: None,
    };
    while Instant::now() < end {
        let t0 = Instant::now();
        match client::connect(relay, netns.as_deref(), server_name.as_deref(), &tls, timeout).await {
            Ok(client) => {
                let done = Instant::now();
                let _ = st.connect.record((done - t0).as_micros().max(1) as u64);
                if let Some(info) = &client.info {
                    let _ = st.quic.record(info.handshake_time.as_micros().max(1) as u64);
                }
                st.completed_total += 1;
                if done < end {
                    st.completed += 1;
                    let i = ((done - start).as_secs() as usize).min(seconds.saturating_sub(1));
                    st.per_second[i] += 1;
                }
                client.close().await;
            }
            Err(e) => {
                *st.failures.entry(error_kind(&e).to_string()).or_insert(0) += 1;
                if st.first_error.is_none() {
                    st.first_error = Some(e.to_string());
                }
                if matches!(e, ClientError::Io(_) | ClientError::Setup(_)) {
                    // Local trouble (e.g. out of ports or files): do not spin.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
    st
}

pub async fn run(args: &HandshakeArgs) -> Result<HandshakeReport> {
    if !(0.5..=3600.0).contains(&args.duration) {
        bail!("--duration must be in [0.5, 3600] seconds");
    }
    if args.concurrency == 0 || args.concurrency > 10_000 {
        bail!("--concurrency must be in 1..=10000");
    }
    let timeout = Duration::from_secs_f64(args.timeout.clamp(0.1, 60.0));
    let tls = Arc::new(args.client.tls(&args.pki_dir)?);
    let ns = &args.netns;
    client::preflight(args.relay, ns.clients.as_deref(), args.client.server_name.as_deref(), &tls, timeout).await?;

    let before = match args.admin {
        Some(a) => Some(relay_counters::scrape_in(ns.admin.as_deref(), a)?),
        None => None,
    };
    let relay_cpu0 = args.relay_pid.map(|p| sys::cpu_seconds(Some(p))).transpose()?;
    let bench_cpu0 = sys::cpu_seconds(None)?;
    let busy0 = sys::machine_busy_seconds()?;
    let duration = Duration::from_secs_f64(args.duration);
    let seconds = args.duration.ceil() as usize;
    let start = Instant::now();
    let end = start + duration;
    let mut tasks = Vec::with_capacity(args.concurrency);
    for _ in 0..args.concurrency {
        tasks.push(tokio::spawn(connect_loop(
            args.relay,
            ns.clients.clone(),
            args.client.server_name.clone(),
            tls.clone(),
            start,
            end,
            timeout,
            seconds,
        )));
    }
    let mut connect = new_hist();
    let mut quic = new_hist();
    let mut per_second = vec![0u64; seconds];
    let (mut completed, mut completed_total) = (0, 0);
    let mut failure_kinds: BTreeMap<String, u64> = BTreeMap::new();
    let mut first_error = None;
    for t in tasks {
        let st = t.await.context("a connect loop panicked")?;
        connect.add(&st.connect).ok();
        quic.add(&st.quic).ok();
        for (a, b) in per_second.iter_mut().zip(&st.per_second) {
            *a += b;
        }
        completed += st.completed;
        completed_total += st.completed_total;
        for (k, v) in st.failures {
            *failure_kinds.entry(k).or_insert(0) += v;
        }
        if first_error.is_none() {
            first_error = st.first_error;
        }
    }
    let wall = start.elapsed().as_secs_f64();
    let bench_cpu_s = sys::cpu_seconds(None)? - bench_cpu0;
    let relay_cpu_s = match (args.relay_pid, relay_cpu0) {
        (Some(p), Some(c0)) => Some(sys::cpu_seconds(Some(p))? - c0),
        _ => None,
    };
    let busy = sys::machine_busy_seconds()? - busy0;
    let other_cpu_s = relay_cpu_s.map(|r| (busy - r - bench_cpu_s).max(0.0));
    let relay_counters = match (args.admin, before) {
        (Some(a), Some(b)) => Some(relay_counters::counters_between(&b, &relay_counters::scrape_in(ns.admin.as_deref(), a)?)),
        _ => None,
    };
    let failures = failure_kinds.values().sum();
    // Whole seconds only for min/max (a fractional last second would look slow).
    let whole = &per_second[..(args.duration.floor() as usize).max(1).min(per_second.len())];
    let report = HandshakeReport {
        relay: args.relay,
        duration_s: args.duration,
        concurrency: args.concurrency,
        completed,
        completed_total,
        failures,
        failure_kinds,
        first_error,
        rate_mean_per_s: completed as f64 / args.duration,
        rate_min_per_s: whole.iter().copied().min().unwrap_or(0),
        rate_max_per_s: whole.iter().copied().max().unwrap_or(0),
        per_second,
        connect_latency: (!connect.is_empty()).then(|| Latency::from_hist(&connect)),
        quic_handshake_latency: (!quic.is_empty()).then(|| Latency::from_hist(&quic)),
        relay_cpu_s,
        relay_cpu_us_per_handshake: relay_cpu_s
            .filter(|_| completed_total > 0)
            .map(|c| c * 1e6 / completed_total as f64),
        relay_cpu_cores: relay_cpu_s.map(|c| c / wall),
        bench_cpu_s,
        other_cpu_s,
        wall_s: wall,
        relay_counters,
        client_trust_store: client::TRUST_STORE.to_string(),
    };
    if report.completed_total == 0 {
        bail!(
            "no handshake completed in {:.1} s ({} failures; first: {})",
            args.duration,
            report.failures,
            report.first_error.as_deref().unwrap_or("none")
        );
    }
    Ok(report)
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map(|v| format!("{v:.digits$}")).unwrap_or_else(|| "-".to_string())
}

pub fn print(r: &HandshakeReport, label: &str) {
    println!("== handshakes{label}: relay {}, {} loops, {:.1} s", r.relay, r.concurrency, r.duration_s);
    let rows: Vec<(&str, String)> = vec![
        ("handshakes completed", format!("{} in window ({} in all)", r.completed, r.completed_total)),
        ("rate mean", format!("{:.1} /s", r.rate_mean_per_s)),
        ("rate per second min..max", format!("{} .. {}", r.rate_min_per_s, r.rate_max_per_s)),
        (
            "connect latency p50 / p99 / max",
            r.connect_latency
                .as_ref()
                .map(|l| format!("{:.2} / {:.2} / {:.2} ms", l.p50_ms, l.p99_ms, l.max_ms))
                .unwrap_or_else(|| "-".into()),
        ),
        (
            "QUIC handshake p50 / p99",
            r.quic_handshake_latency
                .as_ref()
                .map(|l| format!("{:.2} / {:.2} ms", l.p50_ms, l.p99_ms))
                .unwrap_or_else(|| "-".into()),
        ),
        (
            "failures",
            if r.failures == 0 {
                "0".to_string()
            } else {
                format!("{} {:?} first: {}", r.failures, r.failure_kinds, r.first_error.as_deref().unwrap_or(""))
            },
        ),
        ("relay CPU", format!("{} s ({} cores)", opt(r.relay_cpu_s, 2), opt(r.relay_cpu_cores, 2))),
        ("relay CPU per handshake", format!("{} µs", opt(r.relay_cpu_us_per_handshake, 0))),
        ("load generator CPU", format!("{:.2} s over {:.2} s wall", r.bench_cpu_s, r.wall_s)),
        ("other CPU on the machine", format!("{} s", opt(r.other_cpu_s, 2))),
        ("client trust store", r.client_trust_store.clone()),
    ];
    let mut rows = rows;
    if let Some(c) = &r.relay_counters {
        rows.push((
            "relay counters",
            format!(
                "handshakes ok {} failed {}, retries sent {}, drops {:?}",
                c.handshakes_ok, c.handshakes_failed, c.retries_sent, c.dropped
            ),
        ));
    }
    for (k, v) in rows {
        println!("  {k:<32} {v}");
    }
    if let Some(o) = r.other_cpu_s
        && o > 0.1 * r.wall_s
    {
        println!(
            "  WARNING: {o:.1} s of CPU not charged to the relay or this process (other processes, interrupts, \
             softirq) during the run: the figures may be disturbed"
        );
    }
    if r.failure_kinds.contains_key("timeout") {
        println!("  note: timeouts usually mean the relay dropped Initials (rate limit, overload): see its drop counters");
    }
}
