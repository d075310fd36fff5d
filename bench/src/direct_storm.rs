//! Many traversals at once (`ztna-bench direct-storm`): N agents in the NAT lab's agent host,
//! all behind one router, each with its own tunnel to the one connector; once all are
//! connected, each sends one request at the same moment, so N tunnels handshake and punch
//! together. Reports how many went direct, the time to direct (each agent's own `after=`, from
//! creating its tunnel), and the relay's and connector's CPU over the storm. Root only.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use serde::Serialize;
use ztna_testbed::natlab::NatHost;

use crate::direct::{HELLO_BACKEND, NatLabRun, NatPairArgs, hello_backend, moved_after_ms};
use crate::sys::cpu_seconds;

#[derive(Debug, Clone, clap::Args)]
pub struct DirectStormArgs {
    /// Agents, one tunnel each, all punching at once.
    #[arg(long, default_value_t = 1000)]
    pub agents: usize,
    #[command(flatten)]
    pub lab: NatPairArgs,
    /// How long to wait for the tunnels to go direct after the requests.
    #[arg(long, default_value_t = 30)]
    pub wait_secs: u64,
    #[arg(long)]
    pub json: Option<PathBuf>,
}

#[derive(Debug, Serialize)]
pub struct DirectStormResult {
    pub agents: usize,
    pub delay_ms: u32,
    pub agent_nat: String,
    pub conn_nat: String,
    /// Requests that completed (through whichever path).
    pub requests_ok: usize,
    /// From firing the requests until the last one was answered (or timed out).
    pub requests_secs: f64,
    pub direct: usize,
    /// Of those, how many fell back to the relay path at least once during the wait.
    pub fell_back: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// From firing the requests until the last tunnel went direct (or the wait ended).
    pub storm_secs: f64,
    pub relay_cpu_secs: f64,
    pub connector_cpu_secs: f64,
}

pub fn run(a: &DirectStormArgs) -> Result<DirectStormResult> {
    // Every agent comes from the one router address: lift the per-source handshake limit.
    let relay_extra = ["--handshake-rate", "1000000", "--handshake-burst", "1000000"];
    let mut run = NatLabRun::start("bm", &a.lab.config(), a.lab.nat_script.as_deref(), HELLO_BACKEND, &relay_extra, &a.lab.connector_args(), hello_backend)?;
    let connector_pid = run.lab.process(run.connector).pid();
    let relay_pid = run.lab.process(run.relay).pid();
    let mut logs = Vec::with_capacity(a.agents);
    for i in 0..a.agents {
        crate::interrupt::check_interrupted()?;
        let (_, log) = run.agent(&i.to_string(), agent_port(i), true)?;
        logs.push(log);
    }
    eprintln!("{} agents connected; firing one request each", a.agents);

    let (relay_cpu0, conn_cpu0) = (cpu_seconds(Some(relay_pid))?, cpu_seconds(Some(connector_pid))?);
    let started = Instant::now();
    // One shell in the agent host starts every curl at once and waits for them all.
    let curls: String = (0..a.agents)
        .map(|i| format!("curl -s --max-time {} -o /dev/null -w '%{{http_code}}\\n' http://127.0.0.1:{}/hello & ", a.wait_secs, agent_port(i)))
        .collect();
    let out = run.lab.output(NatHost::Agent, &["bash", "-c", &format!("{curls} wait")])?;
    let requests_ok = String::from_utf8_lossy(&out.stdout).lines().filter(|l| l.trim() == "200").count();
    let requests_secs = started.elapsed().as_secs_f64();

    let deadline = started + Duration::from_secs(a.wait_secs);
    let mut times: Vec<Option<f64>> = vec![None; a.agents];
    loop {
        for (t, log) in times.iter_mut().zip(&logs) {
            if t.is_none() {
                *t = std::fs::read_to_string(log)?.lines().find_map(moved_after_ms);
            }
        }
        if times.iter().all(Option::is_some) || Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let storm_secs = started.elapsed().as_secs_f64();
    // Tunnels that went direct and later fell back (liveness lost under the storm's load).
    let mut fell_back = 0;
    for log in &logs {
        fell_back += usize::from(std::fs::read_to_string(log)?.contains("tunnel back on the relay path"));
    }
    let (relay_cpu, conn_cpu) = (cpu_seconds(Some(relay_pid))? - relay_cpu0, cpu_seconds(Some(connector_pid))? - conn_cpu0);
    let mut sorted: Vec<f64> = times.iter().flatten().copied().collect();
    if sorted.is_empty() && a.agents > 0 {
        bail!("no tunnel went direct; logs in {}", run.dir.display());
    }
    sorted.sort_by(f64::total_cmp);
    let q = |p: f64| sorted.get(((sorted.len() as f64 - 1.0) * p).round() as usize).copied().unwrap_or(f64::NAN);
    Ok(DirectStormResult {
        agents: a.agents,
        delay_ms: a.lab.delay_ms,
        agent_nat: a.lab.agent_nat.to_string(),
        conn_nat: a.lab.conn_nat.to_string(),
        requests_ok,
        requests_secs,
        direct: sorted.len(),
        fell_back,
        p50_ms: q(0.5),
        p99_ms: q(0.99),
        max_ms: sorted.last().copied().unwrap_or(f64::NAN),
        storm_secs,
        relay_cpu_secs: relay_cpu,
        connector_cpu_secs: conn_cpu,
    })
}

fn agent_port(i: usize) -> u16 {
    20000 + i as u16
}

pub fn print(r: &DirectStormResult) {
    println!(
        "{} traversals at once, {} × {}, {} ms one-way on each WAN link:",
        r.agents, r.agent_nat, r.conn_nat, r.delay_ms
    );
    println!(
        "  {} of {} requests answered (the last after {:.1} s); {} tunnels went direct; time to direct p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        r.requests_ok, r.agents, r.requests_secs, r.direct, r.p50_ms, r.p99_ms, r.max_ms
    );
    println!("  {} of the direct tunnels fell back to the relay path at least once", r.fell_back);
    println!(
        "  over the {:.1} s storm: relay {:.2} CPU-s, connector {:.2} CPU-s",
        r.storm_secs, r.relay_cpu_secs, r.connector_cpu_secs
    );
}
