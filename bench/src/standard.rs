//! `ztna-bench standard`: the standard benchmark set, run in one go against processes this
//! command starts itself, all on the lab topology (`deploy/lab/lab.sh`: agent, relay and
//! connector hosts as network namespaces joined by veth pairs): control plane (relays in the
//! relay host, the load generator's sockets in the agent host) and tunnel (relay, connector,
//! agent, each in its host) in one lab, then the data plane (baseline and relay I/O paths,
//! trafgen) in a lab of its own; the results are written into docs/BENCHMARKS.md between markers.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::Serialize;

use crate::dataplane::{self, DataplaneArgs, DataplaneReport};
use crate::handshakes::{self, ClientArgs, ClientNetns, HandshakeArgs, HandshakeReport};
use crate::idle_rss::{self, IdleRssArgs, IdleRssReport};
use crate::lab::{self, Host, Lab};
use crate::procs::{self, ChildGuard, TempDir};
use crate::sys::{self, Machine};
use crate::tunnel::{self, TunnelArgs, TunnelReport};

pub const BEGIN: &str = "<!-- bench:control-plane:begin -->";
pub const END: &str = "<!-- bench:control-plane:end -->";
pub const HEADING: &str = "## Control plane";

/// The relay's UDP port (in the relay host, all addresses) and its admin address (the relay
/// host's loopback).
const RELAY_PORT: u16 = 4433;
const ADMIN: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 9901);

#[derive(clap::Args, Debug, Clone)]
pub struct StandardArgs {
    /// Markdown file whose control-plane and tunnel sections are rewritten (created if missing).
    #[arg(long, default_value = "docs/BENCHMARKS.md")]
    pub out: PathBuf,
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
    /// Seconds of each tunnel throughput run (direct and tunnel alternate, twice each).
    #[arg(long, default_value_t = 10.0)]
    pub tunnel_seconds: f64,
    /// Request/response exchanges measured per path in the tunnel latency run.
    #[arg(long, default_value_t = 10_000)]
    pub tunnel_exchanges: usize,
    /// The relay binary (default: `ztna-relay` next to this executable); agent and connector
    /// are always taken from next to this executable.
    #[arg(long)]
    pub relay_bin: Option<PathBuf>,
    /// Leave out the data-plane part (it needs trafgen and nftables).
    #[arg(long)]
    pub skip_dataplane: bool,
    /// The lab script (network namespaces; root needed).
    #[arg(long, default_value = "deploy/lab/lab.sh")]
    pub lab_script: PathBuf,
    /// Seconds for the data-plane rate searches together.
    #[arg(long, default_value_t = 180.0)]
    pub dataplane_budget: f64,
    /// ZTNA_LOG level of the relay under test.
    #[arg(long, default_value = "warn")]
    pub relay_log: String,
    /// Also write every result as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

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

#[derive(Debug, Clone, Serialize)]
pub struct StandardReport {
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
    pub tunnel: TunnelReport,
    pub dataplane: Option<DataplaneReport>,
}

/// A relay child process in the lab's relay host: stopped (SIGTERM, then SIGKILL) when
/// dropped, so it never outlives us.
pub struct RelayGuard {
    pub proc: ChildGuard,
    /// Its address as the agent host reaches it.
    pub listen: SocketAddr,
    /// Its address as the connector host reaches it.
    pub connector_listen: SocketAddr,
    /// Its admin address, inside `ns`.
    pub admin: SocketAddr,
    /// The relay host's network namespace.
    pub ns: String,
    pub retry: bool,
}

impl RelayGuard {
    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// The relay's /metrics (scraped from inside the relay host).
    pub fn scrape(&self) -> Result<sys::Scrape> {
        sys::scrape_in(Some(&self.ns), self.admin)
    }
}

pub fn relay_bin(explicit: Option<&Path>) -> Result<PathBuf> {
    procs::sibling_bin("ztna-relay", explicit)
}

/// `ztna-relay pki init` in `dir`: a CA, the relay's certificate, agent alice, connector web-1,
/// and a policy letting alice reach service `web` served by web-1.
pub fn pki_init(bin: &Path, dir: &Path) -> Result<()> {
    let st = Command::new(bin)
        .args(["pki", "init", "--dir"])
        .arg(dir)
        .args(["--agent", "alice", "--connector", "web-1"])
        .stdout(Stdio::null())
        .status()
        .with_context(|| format!("running {} pki init", bin.display()))?;
    if !st.success() {
        bail!("`{} pki init` failed ({st})", bin.display());
    }
    Ok(())
}

pub fn relay_flags(pki: &Path, retry: bool) -> Vec<String> {
    let p = |f: &str| pki.join(f).display().to_string();
    let mut v: Vec<String> = vec![
        "--workers".into(),
        "1".into(),
        "--no-pin".into(),
        "--handshake-rate".into(),
        "1000000".into(),
        "--cert".into(),
        p("relay.pem"),
        "--key".into(),
        p("relay.key"),
        "--ca".into(),
        p("ca.pem"),
        "--policy".into(),
        p("policy.toml"),
    ];
    if !retry {
        v.push("--no-retry".into());
    }
    v
}

/// The relay's command line in the reports (PKI paths as `PKI`).
pub fn relay_command(log_level: &str) -> String {
    format!(
        "ztna-relay --listen 0.0.0.0:{RELAY_PORT} --admin {ADMIN} {} (ZTNA_LOG={log_level}), in the relay host",
        relay_flags(Path::new("PKI"), true).join(" ")
    )
}

/// Starts a relay in the lab's relay host (listening on all its IPv4 addresses) and waits
/// until its admin endpoint answers.
pub fn start_relay(lab: &Lab, bin: &Path, pki: &Path, tmp: &Path, retry: bool, log_level: &str, n: usize) -> Result<RelayGuard> {
    let mut cmd = lab.cmd(Host::Relay, bin);
    cmd.args(["--listen", &format!("0.0.0.0:{RELAY_PORT}"), "--admin", &ADMIN.to_string()])
        .args(relay_flags(pki, retry))
        .env("ZTNA_LOG", log_level);
    let proc = ChildGuard::spawn("relay", cmd, tmp.join(format!("relay-{n}.log")))?;
    let (listen, connector_listen) = lab::relay_addrs(false, RELAY_PORT);
    let ns = lab.ns(Host::Relay);
    let mut guard = RelayGuard { proc, listen, connector_listen, admin: ADMIN, ns, retry };
    let deadline = Instant::now() + Duration::from_secs(10);
    let admin = ADMIN;
    loop {
        guard.proc.check_alive().context("the relay did not start")?;
        if sys::healthy_in(Some(&guard.ns), admin)? {
            return Ok(guard);
        }
        if Instant::now() >= deadline {
            bail!(
                "the relay did not become healthy on http://{admin}/healthz (in {}) within 10 s; its log:\n{}",
                guard.ns,
                procs::log_tail(&guard.proc.log, 20)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn finish(mut guard: RelayGuard, purpose: &str) -> RelayRun {
    let pid = guard.pid();
    let (exit, stop_s) = guard.proc.stop(Duration::from_secs(15));
    let (log_warnings, log_warning_count) = procs::log_warnings(&guard.proc.log, 5);
    println!("   relay (pid {pid}) stopped: {exit} in {stop_s:.2} s; {log_warning_count} WARN/ERROR log lines");
    for w in &log_warnings {
        println!("     {w}");
    }
    RelayRun {
        purpose: purpose.to_string(),
        retry: guard.retry,
        listen: guard.listen,
        admin: guard.admin,
        pid,
        exit,
        stop_s,
        log_warnings,
        log_warning_count,
    }
}

fn client_args() -> ClientArgs {
    ClientArgs { kind: "agent".into(), name: "alice".into(), server_name: None }
}

/// The load generator's clients in the agent host, the admin scrapes in the relay's.
fn client_netns(lab: &Lab, g: &RelayGuard) -> ClientNetns {
    ClientNetns { clients: Some(lab.ns(Host::Agent)), admin: Some(g.ns.clone()) }
}

fn hs_args(lab: &Lab, g: &RelayGuard, pki: &Path, duration: f64, concurrency: usize) -> HandshakeArgs {
    HandshakeArgs {
        relay: g.listen,
        pki_dir: pki.to_path_buf(),
        duration,
        concurrency,
        timeout: 5.0,
        client: client_args(),
        relay_pid: Some(g.pid()),
        admin: Some(g.admin),
        netns: client_netns(lab, g),
        json: None,
    }
}

pub async fn run(args: &StandardArgs) -> Result<StandardReport> {
    if !(args.duration > 0.0 && args.duration <= 600.0 && (0.0..=600.0).contains(&args.latency_duration)) {
        bail!("--duration must be in (0, 600] and --latency-duration in [0, 600] seconds");
    }
    if args.concurrency == 0 || args.concurrency > 10_000 || args.connections == 0 || args.connections > 100_000 {
        bail!("--concurrency must be in 1..=10000 and --connections in 1..=100000");
    }
    let bin = relay_bin(args.relay_bin.as_deref())?;
    // Fail now, not after the control-plane runs, if the tunnel's binaries are missing.
    procs::sibling_bin("ztna-agent", None)?;
    procs::sibling_bin("ztna-connector", None)?;
    if !args.skip_dataplane {
        dataplane::check_tools().context("the data-plane part of the standard set (or pass --skip-dataplane)")?;
    }
    if let Some(dir) = args.out.parent().filter(|d| !d.as_os_str().is_empty())
        && !dir.is_dir()
    {
        bail!("{} does not exist: run from the workspace root or pass --out FILE", dir.display());
    }
    sys::raise_nofile_limit();
    let tmp = TempDir::new()?;
    let pki = tmp.0.join("pki");
    pki_init(&bin, &pki)?;
    // One lab for the control-plane and tunnel parts; the data-plane part brings up its own.
    let lab = Lab::for_run(&args.lab_script, "zs")?;
    println!(
        "-- lab {} up (agent {} → relay {} | {} → connector {})",
        lab.prefix,
        lab::AGENT_V4,
        lab::RELAY_A_V4,
        lab::RELAY_C_V4,
        lab::CONN_V4
    );

    let mut runs = Vec::new();
    let mut results = Vec::new();
    for (n, retry) in [true, false].into_iter().enumerate() {
        lab::check_interrupted()?;
        let tag = if retry { "Retry on" } else { "Retry off (--no-retry)" };
        let g = start_relay(&lab, &bin, &pki, &tmp.0, retry, &args.relay_log, n)?;
        println!("-- relay run {} ({tag}): pid {}, {} admin {}", n + 1, g.pid(), g.listen, g.admin);
        let thr = handshakes::run(&hs_args(&lab, &g, &pki, args.duration, args.concurrency)).await?;
        handshakes::print(&thr, &format!(" ({tag})"));
        let lat = if args.latency_duration > 0.0 {
            let l = handshakes::run(&hs_args(&lab, &g, &pki, args.latency_duration, 1)).await?;
            handshakes::print(&l, &format!(" ({tag}, one loop)"));
            Some(l)
        } else {
            None
        };
        runs.push(finish(g, &format!("handshakes, {tag}")));
        results.push((thr, lat));
    }

    lab::check_interrupted()?;
    let g = start_relay(&lab, &bin, &pki, &tmp.0, true, &args.relay_log, 2)?;
    println!("-- relay run 3 (idle connections): pid {}, {} admin {}", g.pid(), g.listen, g.admin);
    let idle = idle_rss::run(&IdleRssArgs {
        relay_pid: g.pid(),
        relay: g.listen,
        pki_dir: pki.clone(),
        connections: args.connections,
        open_concurrency: 32,
        timeout: 5.0,
        establish_timeout: 120.0,
        warmup: 20,
        client: client_args(),
        admin: Some(g.admin),
        netns: client_netns(&lab, &g),
        json: None,
    })
    .await?;
    idle_rss::print(&idle);
    runs.push(finish(g, "idle-rss, Retry on"));

    let tunnel_args = TunnelArgs {
        seconds: args.tunnel_seconds,
        rounds: 2,
        exchanges: args.tunnel_exchanges,
        warmup: 1000,
        size: 64,
        relay_bin: args.relay_bin.clone(),
        agent_bin: None,
        connector_bin: None,
        relay_log: args.relay_log.clone(),
        lab_script: args.lab_script.clone(),
        out: None,
        json: None,
    };
    lab::check_interrupted()?;
    let tun = tunnel::run(&tunnel_args, Some(&lab)).await?;
    tunnel::print(&tun);
    drop(lab);

    let dp = if args.skip_dataplane {
        None
    } else {
        let dp_args = DataplaneArgs {
            relay_bin: args.relay_bin.clone(),
            budget: args.dataplane_budget,
            lab_script: args.lab_script.clone(),
            ..DataplaneArgs::defaults()
        };
        let r = dataplane::run(&dp_args).await?;
        dataplane::print(&r);
        Some(r)
    };

    let mut it = results.into_iter();
    let (Some((thr_r, lat_r)), Some((thr_n, lat_n))) = (it.next(), it.next()) else { unreachable!() };
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let report = StandardReport {
        date: sys::utc_now(),
        revision: sys::git_revision(),
        machine: sys::machine(),
        command: format!("{} && target/release/ztna-bench {}", procs::BUILD, argv.join(" ")),
        relay_args: relay_command(&args.relay_log),
        client_trust_store: crate::client_trust_store().to_string(),
        throughput_retry: thr_r,
        throughput_no_retry: thr_n,
        latency_retry: lat_r,
        latency_no_retry: lat_n,
        idle_rss: idle,
        relay_runs: runs,
        tunnel: tun,
        dataplane: dp,
    };
    let mut sections = vec![
        (BEGIN, END, HEADING, render(&report, args)),
        (tunnel::BEGIN, tunnel::END, tunnel::HEADING, tunnel::render(&report.tunnel)),
    ];
    if let Some(dp) = &report.dataplane {
        sections.push((dataplane::BEGIN, dataplane::END, dataplane::HEADING, dataplane::render(dp)));
    }
    write_markdown(&args.out, &sections)?;
    println!("-- wrote the control-plane, tunnel{} sections of {}", if report.dataplane.is_some() { " and data-plane" } else { "" }, args.out.display());
    Ok(report)
}

fn ms(l: &Option<handshakes::Latency>, f: impl Fn(&handshakes::Latency) -> f64) -> String {
    l.as_ref().map(|l| format!("{:.2} ms", f(l))).unwrap_or_else(|| "-".into())
}

fn opt(v: Option<f64>, digits: usize, unit: &str) -> String {
    v.map(|v| format!("{v:.digits$}{unit}")).unwrap_or_else(|| "-".into())
}

fn failures(r: &HandshakeReport) -> String {
    if r.failures == 0 {
        "0".into()
    } else {
        let kinds: Vec<String> = r.failure_kinds.iter().map(|(k, v)| format!("{v} {k}")).collect();
        format!("{} ({})", r.failures, kinds.join(", "))
    }
}

fn drops(r: &HandshakeReport) -> String {
    match &r.relay_counters {
        Some(c) if !c.dropped.is_empty() => c.dropped.iter().map(|(k, v)| format!("{v} {k}")).collect::<Vec<_>>().join(", "),
        Some(_) => "0".into(),
        None => "-".into(),
    }
}

pub fn render(r: &StandardReport, args: &StandardArgs) -> String {
    let m = &r.machine;
    let mut s = String::new();
    let _ = writeln!(s, "{BEGIN}");
    let _ = writeln!(s, "<!-- Generated by `ztna-bench standard`; edits between these markers are overwritten. -->");
    let _ = writeln!(s);
    let _ = writeln!(s, "### Control plane: handshakes and idle connections");
    let _ = writeln!(s);
    let _ = writeln!(
        s,
        "Measured {} at commit {} on {} ({} cores, {:.0} GiB), {}. Topology: the lab of `deploy/lab/lab.sh` \
         (network namespaces on this machine joined by veth pairs: agent host 192.0.2.2 — relay host 192.0.2.1). \
         Relay: the release build in the relay host, 1 worker, unpinned, per-IP handshake limit raised out of \
         the way, logging at `{}`; load generator: `ztna-bench` (tokio, one UDP socket per connection, identity \
         `agent/alice`) with its sockets in the agent host, so every handshake crosses the veth pair and the \
         relay host's kernel stack, but runs on the same machine and CPUs as the relay; client trust store: {}.",
        r.date, r.revision, m.cpu_model, m.cores, m.memory_gib, m.kernel, args.relay_log, r.client_trust_store
    );
    let _ = writeln!(s);
    let _ = writeln!(
        s,
        "**Read with care:** the machine has {} cores and the load generator shares them with the relay (the \
         namespaces separate the network stacks, not the CPUs; the veth hops have no propagation delay). A client \
         handshake costs about as much CPU as the relay's side (both do an mTLS handshake: certificate signature and \
         verification), so the handshake rate below is what this machine sustains for relay *and* clients together, \
         not the relay's ceiling. The figure that carries over to other hardware is the relay's CPU per handshake \
         (relay utime+stime from /proc/PID/stat over the run, divided by the handshakes completed); 1 s of relay CPU \
         per second would be one core saturated. \
         *Other CPU* is the machine's busy time not spent by the relay or the load generator during the run \
         (from /proc/stat): other processes, and kernel work charged to no process (interrupts, softirq packet \
         processing of the lab's veth links); well above that small share, something else disturbed the run.",
        m.cores
    );
    let _ = writeln!(s);
    let _ = writeln!(s, "#### Handshakes (connect with full handshake, Hello/Welcome, first QAD report; then close)");
    let _ = writeln!(s);
    let _ = writeln!(
        s,
        "| run | loops | s | handshakes/s (mean) | per-second min–max | connect p50 | connect p99 | QUIC handshake p50 | failures | relay drops | relay CPU | relay CPU / handshake | load-gen CPU | other CPU |"
    );
    let _ = writeln!(s, "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|");
    let rows: [(&str, Option<&HandshakeReport>); 4] = [
        ("Retry on", Some(&r.throughput_retry)),
        ("Retry off (`--no-retry`)", Some(&r.throughput_no_retry)),
        ("Retry on, one loop", r.latency_retry.as_ref()),
        ("Retry off, one loop", r.latency_no_retry.as_ref()),
    ];
    for (name, h) in rows {
        let Some(h) = h else { continue };
        let _ = writeln!(
            s,
            "| {name} | {} | {:.0} | **{:.0}** | {}–{} | {} | {} | {} | {} | {} | {} s ({} cores) | **{}** | {:.2} s | {} s |",
            h.concurrency,
            h.duration_s,
            h.rate_mean_per_s,
            h.rate_min_per_s,
            h.rate_max_per_s,
            ms(&h.connect_latency, |l| l.p50_ms),
            ms(&h.connect_latency, |l| l.p99_ms),
            ms(&h.quic_handshake_latency, |l| l.p50_ms),
            failures(h),
            drops(h),
            opt(h.relay_cpu_s, 2, ""),
            opt(h.relay_cpu_cores, 2, ""),
            opt(h.relay_cpu_us_per_handshake, 0, " µs"),
            h.bench_cpu_s,
            opt(h.other_cpu_s, 2, ""),
        );
    }
    let _ = writeln!(s);
    let _ = writeln!(
        s,
        "Connect latency is measured by the client from its first packet to the first QAD report (with Retry: one more \
         round trip); with {} loops it is mostly queueing for CPU, the one-loop rows show it unloaded. \
         The two Retry settings ran on two fresh relay processes for the same time. With Retry on the relay sent \
         {} Retry packets per completed handshake (its own counters).",
        args.concurrency,
        r.throughput_retry
            .relay_counters
            .as_ref()
            .filter(|c| c.handshakes_ok > 0)
            .map(|c| format!("{:.2}", c.retries_sent as f64 / c.handshakes_ok as f64))
            .unwrap_or_else(|| "-".into())
    );
    let _ = writeln!(s);
    let i = &r.idle_rss;
    let _ = writeln!(s, "#### Idle control connections: relay memory");
    let _ = writeln!(s);
    let _ = writeln!(s, "| connections held | relay reports open | RSS before | RSS after | RSS delta | per connection | relay CPU while idle |");
    let _ = writeln!(s, "|--:|--:|--:|--:|--:|--:|--:|");
    let mib = |b: f64| b / 1048576.0;
    let _ = writeln!(
        s,
        "| {} of {} | {} | {:.1} MiB | {:.1} MiB | {:.1} MiB | **{:.1} KiB** ({:.0} bytes) | {:.3} cores |",
        i.connections_established,
        i.connections_requested,
        i.relay_reported_connections.map(|n| n.to_string()).unwrap_or_else(|| "-".into()),
        mib(i.rss_before_bytes as f64),
        mib(i.rss_after_bytes as f64),
        mib(i.rss_delta_bytes as f64),
        i.rss_per_connection_kib,
        i.rss_per_connection_bytes,
        i.relay_idle_cpu_cores,
    );
    let _ = writeln!(s);
    let _ = writeln!(
        s,
        "A fresh relay (Retry on); {} warm-up connections opened and closed before the baseline; VmRSS from \
         /proc/PID/status once all connections were established and RSS had been steady for 2 s; the clients keep \
         the connections alive (keep-alive every 10 s). {} connect failures, {} connections lost while held.",
        20, i.connect_failures, i.lost_while_holding
    );
    let _ = writeln!(s);
    let problems: Vec<String> = r
        .relay_runs
        .iter()
        .filter(|x| x.log_warning_count > 0 || !x.exit.contains("exit status: 0"))
        .map(|x| format!("{}: relay {}, {} WARN/ERROR log lines", x.purpose, x.exit, x.log_warning_count))
        .collect();
    if !problems.is_empty() {
        let _ = writeln!(s, "Relay runs with something to note: {}.", problems.join("; "));
        let _ = writeln!(s);
    }
    let _ = writeln!(s, "Relay command line: `{}`, plus `--no-retry` for the Retry-off run.", r.relay_args);
    let _ = writeln!(s);
    let _ = writeln!(
        s,
        "Reproduce (from the workspace root, as root: it creates the lab's network namespaces under a prefix of \
         its own and removes them at the end; about 80 s for this and the tunnel section below, then about 5 min \
         for the data-plane section; stops by itself):"
    );
    let _ = writeln!(s);
    let _ = writeln!(s, "```sh\n{}\n```", r.command.trim_end());
    let _ = writeln!(s, "{END}");
    s
}

const INTRO: &str = "# Benchmarks\n\n\
Measured results for the relay, each section produced by a command in `bench/` (the `ztna-bench` load \
generator) and rewritten in place between its markers when that command runs again. Every run is on the lab \
topology (`deploy/lab/lab.sh`: agent, relay and connector hosts as network namespaces on this machine, joined \
by veth pairs, documentation addresses only), with each process in its host; every run is bounded in time. \
See `bench/README.md` for the commands and what each one measures.\n";

/// Replaces each delimited section in `path` (or appends it under its heading); creates the
/// file with an intro if it is missing. `sections`: (begin marker, end marker, heading, text).
pub fn write_markdown(path: &Path, sections: &[(&str, &str, &str, String)]) -> Result<()> {
    let mut doc = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => INTRO.to_string(),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    for (begin, end, heading, section) in sections {
        doc = splice(&doc, begin, end, heading, section);
    }
    std::fs::write(path, doc).with_context(|| format!("writing {}", path.display()))
}

fn splice(old: &str, begin: &str, end: &str, heading: &str, section: &str) -> String {
    if let (Some(b), Some(e)) = (old.find(begin), old.find(end))
        && b < e
    {
        let mut tail = &old[e + end.len()..];
        tail = tail.strip_prefix('\n').unwrap_or(tail);
        return format!("{}{}{}", &old[..b], section, tail);
    }
    let mut out = old.to_string();
    if !out.ends_with('\n') {
        out.push('\n');
    }
    out.push('\n');
    out.push_str(heading);
    out.push_str("\n\n");
    out.push_str(section);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splices_between_markers() {
        let section = format!("{BEGIN}\nnew\n{END}\n");
        let appended = splice("# Benchmarks\n\nintro\n", BEGIN, END, HEADING, &section);
        assert!(appended.starts_with("# Benchmarks\n\nintro\n\n## Control plane\n\n"));
        assert!(appended.ends_with(&section));
        let doc = format!("head\n{BEGIN}\nold\nstuff\n{END}\ntail\n");
        assert_eq!(splice(&doc, BEGIN, END, HEADING, &section), format!("head\n{BEGIN}\nnew\n{END}\ntail\n"));
        // Idempotent.
        let once = splice(&doc, BEGIN, END, HEADING, &section);
        assert_eq!(splice(&once, BEGIN, END, HEADING, &section), once);
        // A second section lands after the first and leaves it alone.
        let t = format!("{}\nt\n{}\n", tunnel::BEGIN, tunnel::END);
        let both = splice(&once, tunnel::BEGIN, tunnel::END, tunnel::HEADING, &t);
        assert!(both.starts_with(&once));
        assert!(both.ends_with(&format!("{}\n\n{t}", tunnel::HEADING)));
        assert_eq!(splice(&both, tunnel::BEGIN, tunnel::END, tunnel::HEADING, &t), both);
    }
}
