//! One TCP stream three ways (`ztna-bench direct-stream`), through the NAT lab of
//! `deploy/lab/nat.sh`: plain kernel TCP from the agent host to the backend (the connector's
//! router is publicly routed by default, so the agent can reach it), the same stream through the
//! tunnel on the relay path (an agent with `--direct off`), and through the tunnel on a direct
//! path (an agent with `--direct on`, measured once it has moved). iperf3 moves the bytes; the
//! three alternate within each round, so the ratios come from the same minutes of a noisy machine.
//! The relay's frame counter says which path the tunnel's bytes took. Root only.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::Serialize;
use ztna_testbed::metrics::metric_sum;
use ztna_testbed::natlab::{NatHost, NatLabConfig, NatType};
use ztna_testbed::process::wait_for_log;

use crate::direct::NatLabRun;

#[derive(Debug, Clone, clap::Args)]
pub struct DirectStreamArgs {
    /// Rounds; each measures all three paths once.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Seconds per measurement.
    #[arg(long, default_value_t = 5)]
    pub seconds: u32,
    /// One-way delay on each router's WAN link, in ms (0: none; the delay line then is not in the path).
    #[arg(long, default_value_t = 0)]
    pub delay_ms: u32,
    #[arg(long, default_value = "port-restricted")]
    pub agent_nat: NatType,
    /// Must let the agent host reach the backend directly for the kernel-TCP baseline.
    #[arg(long, default_value = "none")]
    pub conn_nat: NatType,
    #[arg(long)]
    pub nat_script: Option<PathBuf>,
    #[arg(long)]
    pub json: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum StreamPath {
    KernelTcp,
    TunnelRelay,
    TunnelDirect,
}

impl StreamPath {
    const ALL: [StreamPath; 3] = [StreamPath::KernelTcp, StreamPath::TunnelRelay, StreamPath::TunnelDirect];

    fn name(self) -> &'static str {
        match self {
            StreamPath::KernelTcp => "kernel TCP, no tunnel",
            StreamPath::TunnelRelay => "tunnel, relay path",
            StreamPath::TunnelDirect => "tunnel, direct path",
        }
    }
}

#[derive(Debug, Serialize)]
pub struct StreamSample {
    pub round: usize,
    pub path: StreamPath,
    /// Received by the iperf3 server, megabytes (10^6) per second.
    pub mb_per_s: f64,
    /// DATA frames the relay forwarded during the measurement.
    pub relay_frames: f64,
}

#[derive(Debug, Serialize)]
pub struct DirectStreamResult {
    pub agent_nat: String,
    pub conn_nat: String,
    pub delay_ms: u32,
    pub seconds: u32,
    pub samples: Vec<StreamSample>,
}

const BACKEND: &str = "198.51.100.2:5201";
const RELAY_PORT: u16 = 5301;
const DIRECT_PORT: u16 = 5302;

pub fn run(a: &DirectStreamArgs) -> Result<DirectStreamResult> {
    let cfg = NatLabConfig { delay_ms: a.delay_ms, ..NatLabConfig::new(a.agent_nat, a.conn_nat) };
    let iperf_server = |lab: &mut ztna_testbed::natlab::NatLab, dir: &std::path::Path| -> Result<()> {
        let log = dir.join("iperf3-server.log");
        lab.spawn(NatHost::Conn, std::path::Path::new("iperf3"), &["-s", "-B", "198.51.100.2", "-p", "5201", "--forceflush"], &log)?;
        wait_for_log(&log, "Server listening", Duration::from_secs(10))
    };
    let mut run = NatLabRun::start("bs", &cfg, a.nat_script.as_deref(), BACKEND, &[], &[], iperf_server)?;
    run.agent("relay", RELAY_PORT, false)?;
    let (_, direct_log) = run.agent("direct", DIRECT_PORT, true)?;
    // The first stream opens the direct agent's tunnel; punching starts with it.
    iperf(&run, &format!("127.0.0.1:{DIRECT_PORT}"), 1)?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !std::fs::read_to_string(&direct_log)?.contains("tunnel moved to a direct path") {
        if Instant::now() > deadline {
            bail!("the direct agent's tunnel did not move to a direct path within 10 s (NAT types {} × {})", a.agent_nat, a.conn_nat);
        }
        std::thread::sleep(Duration::from_millis(50));
    }

    let frames = |run: &NatLabRun| -> Result<f64> {
        let text = run.relay_metrics()?;
        let xdp = |r| metric_sum(&text, "ztna_relay_xdp_packets_total", &[("result", r)]);
        Ok(metric_sum(&text, "ztna_relay_frames_forwarded_total", &[]) + xdp("forwarded_tx") + xdp("forwarded_redirect"))
    };
    let mut samples = Vec::new();
    for round in 0..a.rounds {
        for k in 0..3 {
            crate::interrupt::check_interrupted()?;
            // Rotate the order so no path always runs first.
            let path = StreamPath::ALL[(round + k) % 3];
            let to = match path {
                StreamPath::KernelTcp => BACKEND.to_string(),
                StreamPath::TunnelRelay => format!("127.0.0.1:{RELAY_PORT}"),
                StreamPath::TunnelDirect => format!("127.0.0.1:{DIRECT_PORT}"),
            };
            let before = frames(&run)?;
            let mb_per_s = iperf(&run, &to, a.seconds)?;
            let relay_frames = frames(&run)? - before;
            eprintln!("round {round}: {:<22} {mb_per_s:8.1} MB/s  ({relay_frames} relay frames)", path.name());
            samples.push(StreamSample { round, path, mb_per_s, relay_frames });
        }
    }
    Ok(DirectStreamResult { agent_nat: a.agent_nat.to_string(), conn_nat: a.conn_nat.to_string(), delay_ms: a.delay_ms, seconds: a.seconds, samples })
}

/// One iperf3 stream from the agent host to `to` for `seconds`; the server's received rate, MB/s.
fn iperf(run: &NatLabRun, to: &str, seconds: u32) -> Result<f64> {
    let (host, port) = to.rsplit_once(':').context("host:port")?;
    let t = seconds.to_string();
    let out = run.lab.output(NatHost::Agent, &["iperf3", "-c", host, "-p", port, "-t", &t, "-J"])?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).with_context(|| format!("iperf3 to {to}: {}", String::from_utf8_lossy(&out.stderr)))?;
    if let Some(e) = v.get("error") {
        bail!("iperf3 to {to}: {e}");
    }
    let bps = v["end"]["sum_received"]["bits_per_second"].as_f64().with_context(|| format!("iperf3 to {to}: no sum_received"))?;
    Ok(bps / 8e6)
}

pub fn print(r: &DirectStreamResult) {
    println!(
        "one TCP stream (iperf3, {} s each), agent {} × connector {}, {} ms one-way per WAN link:",
        r.seconds, r.agent_nat, r.conn_nat, r.delay_ms
    );
    let median = |p: StreamPath| {
        let mut v: Vec<f64> = r.samples.iter().filter(|s| s.path == p).map(|s| s.mb_per_s).collect();
        v.sort_by(f64::total_cmp);
        (v.get(v.len() / 2).copied().unwrap_or(f64::NAN), v.first().copied().unwrap_or(f64::NAN), v.last().copied().unwrap_or(f64::NAN))
    };
    let kernel = median(StreamPath::KernelTcp).0;
    for p in StreamPath::ALL {
        let (med, min, max) = median(p);
        let frames: f64 = r.samples.iter().filter(|s| s.path == p).map(|s| s.relay_frames).sum();
        println!("  {:<22} median {med:7.1} MB/s (min {min:.1}, max {max:.1}), {:.2}× kernel TCP, {frames} relay frames in all", p.name(), med / kernel);
    }
}
