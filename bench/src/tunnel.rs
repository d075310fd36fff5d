//! `ztna-bench tunnel`: what the end-to-end tunnel costs a TCP connection, measured side by
//! side with a direct connection in one run, on the lab topology (`deploy/lab/lab.sh`).
//!
//! It starts a relay (1 worker) in the relay host, a connector (`web-1`, service `web`) in the
//! connector host and an agent (`alice`, `-L 127.0.0.1:PORT:web`) in the agent host, from the
//! release binaries next to this executable, with a temporary PKI, plus an in-process TCP
//! backend listening in the connector host. The writer's sockets are created in the agent host:
//! through the tunnel they connect to the agent's forward, directly to the backend, routed by
//! the relay host's kernel. The first byte of every connection to the backend picks what it does: `S` sinks (reads and discards until EOF, then answers with the
//! byte count as a big-endian u64), `E` echoes. Then:
//!
//! 1. throughput of one TCP stream: write as fast as possible for N seconds, direct and through
//!    the tunnel alternately; the rate is the bytes the backend counted over the time from the
//!    first write until its count came back (so bytes still buffered when the writer stops are
//!    counted, and so is the time to deliver them);
//! 2. request/response latency: 64-byte requests echoed by the backend, sequential, on one
//!    connection per path, in alternating blocks after a warm-up.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

use ztna_testbed::lab::{self, Host, Lab};
use ztna_testbed::{Process, Scrape, TempDir, clients, netns};

use crate::interrupt::check_interrupted;
use crate::lab_run;
use crate::relay_counters;
use crate::relay_under_test::{self, DROP_GRACE, LabRelay, ProcRun, RelayRun, sibling_bin, stop_client};
use crate::sys::{self, Machine, UdpCounters};


const MODE_SINK: u8 = b'S';
const MODE_ECHO: u8 = b'E';
/// The writer's buffer and the backend's read buffer.
const IO_BUF: usize = 256 * 1024;
/// Connecting through the agent may wait for the tunnel (the agent holds it up to 10 s).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
/// After the writer stops: how long the backend may take to receive the rest and answer.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// One request/response exchange.
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(5);
/// Exchanges per path before switching to the other path.
const BLOCK: usize = 500;
const PROCESS_START_TIMEOUT: Duration = Duration::from_secs(15);

#[derive(clap::Args, Debug, Clone)]
pub struct TunnelArgs {
    /// Seconds of each throughput run (direct and tunnel alternate, --rounds times each).
    #[arg(long, default_value_t = 10.0)]
    pub seconds: f64,
    /// Throughput runs per path: direct, tunnel, direct, tunnel, ...
    #[arg(long, default_value_t = 2)]
    pub rounds: usize,
    /// Request/response exchanges measured per path.
    #[arg(long, default_value_t = 10_000)]
    pub exchanges: usize,
    /// Exchanges per path before measuring.
    #[arg(long, default_value_t = 1_000)]
    pub warmup: usize,
    /// Request (and response) size in bytes.
    #[arg(long, default_value_t = 64)]
    pub size: usize,
    /// The relay binary (default: `ztna-relay` next to this executable).
    #[arg(long)]
    pub relay_bin: Option<PathBuf>,
    /// The agent binary (default: `ztna-agent` next to this executable).
    #[arg(long)]
    pub agent_bin: Option<PathBuf>,
    /// The connector binary (default: `ztna-connector` next to this executable).
    #[arg(long)]
    pub connector_bin: Option<PathBuf>,
    /// ZTNA_LOG level of the relay.
    #[arg(long, default_value = "warn")]
    pub relay_log: String,
    /// The lab script (network namespaces; root needed).
    #[arg(long, default_value = "deploy/lab/lab.sh")]
    pub lab_script: PathBuf,
    /// Also rewrite the tunnel section (between its markers) of this Markdown file.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Also write the result as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// CPU seconds (utime + stime) of the processes in the tunnel's path.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct PathCpu {
    pub relay_s: f64,
    pub agent_s: f64,
    pub connector_s: f64,
    /// This process: the writer or requester and the backend.
    pub bench_s: f64,
    /// The whole machine's busy time (all cores).
    pub machine_busy_s: f64,
}

impl PathCpu {
    fn since(&self, before: &PathCpu) -> PathCpu {
        PathCpu {
            relay_s: self.relay_s - before.relay_s,
            agent_s: self.agent_s - before.agent_s,
            connector_s: self.connector_s - before.connector_s,
            bench_s: self.bench_s - before.bench_s,
            machine_busy_s: self.machine_busy_s - before.machine_busy_s,
        }
    }

    fn add(&mut self, o: &PathCpu) {
        self.relay_s += o.relay_s;
        self.agent_s += o.agent_s;
        self.connector_s += o.connector_s;
        self.bench_s += o.bench_s;
        self.machine_busy_s += o.machine_busy_s;
    }

    /// Busy time not spent by the measured processes (other processes, interrupts, softirq).
    pub fn other_s(&self) -> f64 {
        (self.machine_busy_s - self.relay_s - self.agent_s - self.connector_s - self.bench_s).max(0.0)
    }
}

/// Datagrams dropped at each process's UDP sockets (full receive buffer), over an interval.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct SocketDrops {
    pub relay: u64,
    pub agent: u64,
    pub connector: u64,
}

impl SocketDrops {
    fn since(&self, b: &SocketDrops) -> SocketDrops {
        SocketDrops {
            relay: self.relay.saturating_sub(b.relay),
            agent: self.agent.saturating_sub(b.agent),
            connector: self.connector.saturating_sub(b.connector),
        }
    }

    fn add(&mut self, o: &SocketDrops) {
        self.relay += o.relay;
        self.agent += o.agent;
        self.connector += o.connector;
    }
}

#[derive(Debug, Clone, Copy)]
struct Pids {
    relay: u32,
    agent: u32,
    connector: u32,
}

impl Pids {
    fn cpu(&self) -> Result<PathCpu> {
        Ok(PathCpu {
            relay_s: sys::cpu_seconds(Some(self.relay))?,
            agent_s: sys::cpu_seconds(Some(self.agent))?,
            connector_s: sys::cpu_seconds(Some(self.connector))?,
            bench_s: sys::cpu_seconds(None)?,
            machine_busy_s: sys::machine_busy_seconds()?,
        })
    }

    /// The UDP counters of the three hosts (one process in each), added up.
    fn udp(&self) -> UdpCounters {
        sys::udp_counters(&[self.relay, self.agent, self.connector])
    }

    fn drops(&self) -> Result<SocketDrops> {
        Ok(SocketDrops {
            relay: sys::udp_socket_drops(self.relay)?,
            agent: sys::udp_socket_drops(self.agent)?,
            connector: sys::udp_socket_drops(self.connector)?,
        })
    }
}

/// The relay's own counters over an interval.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RelayData {
    pub frames_forwarded: u64,
    pub packets_received: u64,
    pub packets_sent: u64,
    pub received_bytes: u64,
    /// Drops by reason (only reasons that moved).
    pub dropped: std::collections::BTreeMap<String, u64>,
}

fn relay_data(before: &Scrape, after: &Scrape) -> RelayData {
    let d = |name: &str| (after.sum(name, &[]) - before.sum(name, &[])).max(0.0).round() as u64;
    RelayData {
        frames_forwarded: d("ztna_relay_frames_forwarded_total"),
        packets_received: d("ztna_relay_packets_received_total"),
        packets_sent: d("ztna_relay_packets_sent_total"),
        received_bytes: d("ztna_relay_received_bytes_total"),
        dropped: relay_counters::drops_between(before, after),
    }
}

impl RelayData {
    fn add(&mut self, o: &RelayData) {
        self.frames_forwarded += o.frames_forwarded;
        self.packets_received += o.packets_received;
        self.packets_sent += o.packets_sent;
        self.received_bytes += o.received_bytes;
        for (k, v) in &o.dropped {
            *self.dropped.entry(k.clone()).or_insert(0) += v;
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct ThroughputRun {
    /// `direct` or `tunnel`.
    pub path: String,
    pub round: usize,
    /// Bytes the backend received (it reports its count at EOF); equal to `bytes_written`.
    pub bytes: u64,
    pub bytes_written: u64,
    /// From the first write until the backend's count arrived.
    pub elapsed_s: f64,
    /// After the writer stopped: until the backend's count arrived (draining buffers).
    pub drain_s: f64,
    /// `bytes / elapsed_s`, MB = 10^6 bytes.
    pub mb_per_s: f64,
    /// Bytes the backend received in each whole second of the writing window, in MB/s.
    pub per_second_mb: Vec<f64>,
    pub cpu: PathCpu,
    /// Tunnel runs: the relay's counters over the run.
    pub relay: Option<RelayData>,
    /// The UDP counters of the lab's three hosts over the run (all sockets).
    pub udp: UdpCounters,
    /// Tunnel runs: datagrams dropped at the relay's, agent's and connector's sockets.
    pub socket_drops: Option<SocketDrops>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ThroughputSummary {
    pub seconds: f64,
    pub rounds: usize,
    /// Bytes over time, all runs of a path together.
    pub direct_mb_per_s: f64,
    pub tunnel_mb_per_s: f64,
    pub ratio: f64,
    /// Slowest and fastest whole second of the tunnel runs.
    pub tunnel_second_min_mb: f64,
    pub tunnel_second_max_mb: f64,
    /// Whole seconds of the tunnel runs in which the backend received nothing.
    pub tunnel_stalled_seconds: usize,
    pub tunnel_wall_s: f64,
    /// CPU over all tunnel runs.
    pub tunnel_cpu: PathCpu,
    pub direct_wall_s: f64,
    pub direct_cpu: PathCpu,
    pub tunnel_relay: RelayData,
    pub tunnel_udp: UdpCounters,
    pub tunnel_socket_drops: SocketDrops,
    pub runs: Vec<ThroughputRun>,
}

#[derive(Debug, Clone, Serialize)]
pub struct LatencyStats {
    pub exchanges: u64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
    pub min_us: f64,
    pub mean_us: f64,
}

impl LatencyStats {
    fn from_hist(h: &Histogram<u64>) -> LatencyStats {
        let us = |ns: u64| ns as f64 / 1000.0;
        LatencyStats {
            exchanges: h.len(),
            p50_us: us(h.value_at_quantile(0.50)),
            p90_us: us(h.value_at_quantile(0.90)),
            p99_us: us(h.value_at_quantile(0.99)),
            p999_us: us(h.value_at_quantile(0.999)),
            max_us: us(h.max()),
            min_us: us(h.min()),
            mean_us: h.mean() / 1000.0,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct LatencySummary {
    pub size: usize,
    pub warmup: usize,
    pub block: usize,
    pub direct: LatencyStats,
    pub tunnel: LatencyStats,
    pub added_p50_us: f64,
    pub added_p99_us: f64,
    pub added_p999_us: f64,
    /// Time spent in the tunnel blocks, and exchanges per second there.
    pub tunnel_wall_s: f64,
    pub tunnel_exchanges_per_s: f64,
    /// CPU over the whole measured phase (the tunnel processes idle during the direct blocks).
    pub cpu: PathCpu,
    pub relay_cpu_us_per_exchange: f64,
    pub agent_cpu_us_per_exchange: f64,
    pub connector_cpu_us_per_exchange: f64,
    pub relay: RelayData,
    pub relay_frames_per_exchange: f64,
    pub socket_drops: SocketDrops,
}

#[derive(Debug, Clone, Serialize)]
pub struct TunnelReport {
    pub date: String,
    /// The workspace's git commit when measured.
    pub revision: String,
    pub machine: Machine,
    pub command: String,
    pub relay_args: String,
    pub agent_args: String,
    pub connector_args: String,
    /// From the first local connection to the agent until the first echo came back: session
    /// request, tunnel handshake through the relay, backend connect, one round trip.
    pub first_exchange_ms: f64,
    /// DATA frames the relay forwarded during the first exchange (both directions).
    pub first_exchange_relay_frames: u64,
    pub throughput: ThroughputSummary,
    pub latency: LatencySummary,
    pub relay_run: RelayRun,
    pub clients: Vec<ProcRun>,
}

// ---- the backend ---------------------------------------------------------------------------

struct Backend {
    /// Where it listens, in the connector host: on all addresses, this port.
    port: u16,
    /// Bytes received by sink connections, all together (sampled for per-second rates).
    sunk: Arc<AtomicU64>,
    accept: tokio::task::JoinHandle<()>,
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// The backend, listening in network namespace `ns`.
async fn start_backend(ns: &str) -> Result<Backend> {
    let std_listener = netns::run_in(ns, || {
        let l = std::net::TcpListener::bind("0.0.0.0:0").context("binding the test backend")?;
        l.set_nonblocking(true)?;
        Ok(l)
    })?;
    let listener = TcpListener::from_std(std_listener)?;
    let port = listener.local_addr()?.port();
    let sunk = Arc::new(AtomicU64::new(0));
    let counter = sunk.clone();
    let accept = tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((sock, _)) => {
                    tokio::spawn(serve(sock, counter.clone()));
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
    });
    Ok(Backend { port, sunk, accept })
}

async fn serve(mut s: TcpStream, sunk: Arc<AtomicU64>) -> std::io::Result<()> {
    s.set_nodelay(true)?;
    let mut mode = [0u8; 1];
    s.read_exact(&mut mode).await?;
    let mut buf = vec![0u8; IO_BUF];
    match mode[0] {
        MODE_SINK => {
            let mut total = 0u64;
            loop {
                let n = s.read(&mut buf).await?;
                if n == 0 {
                    break;
                }
                total += n as u64;
                sunk.fetch_add(n as u64, Ordering::Relaxed);
            }
            s.write_all(&total.to_be_bytes()).await?;
            s.shutdown().await
        }
        MODE_ECHO => loop {
            let n = s.read(&mut buf).await?;
            if n == 0 {
                return s.shutdown().await;
            }
            s.write_all(&buf[..n]).await?;
        },
        _ => Ok(()),
    }
}

/// A connection to `target` from a socket created in network namespace `ns`.
async fn open(ns: &str, target: SocketAddr, mode: u8) -> Result<TcpStream> {
    let sock = netns::run_in(ns, || Ok(if target.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? }))?;
    let mut s = tokio::time::timeout(CONNECT_TIMEOUT, sock.connect(target))
        .await
        .map_err(|_| anyhow::anyhow!("connecting to {target} timed out"))?
        .with_context(|| format!("connecting to {target}"))?;
    s.set_nodelay(true)?;
    s.write_all(&[mode]).await?;
    Ok(s)
}

// ---- throughput ----------------------------------------------------------------------------

struct Measured {
    bytes: u64,
    written: u64,
    elapsed: Duration,
    drain: Duration,
    per_second_mb: Vec<f64>,
}

/// One stream: write for `seconds`, half-close, read the backend's byte count.
async fn throughput_once(ns: &str, target: SocketAddr, seconds: f64, sunk: &AtomicU64) -> Result<Measured> {
    let mut s = open(ns, target, MODE_SINK).await?;
    let buf = vec![0x5au8; IO_BUF];
    let mut written = 0u64;
    let mut per_second_mb = Vec::new();
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(seconds);
    let mut next_tick = start + Duration::from_secs(1);
    let mut last_count = sunk.load(Ordering::Relaxed);
    loop {
        let wake = next_tick.min(deadline);
        // A cancelled `write` has written nothing, so `written` stays exact.
        match tokio::time::timeout_at(wake.into(), s.write(&buf)).await {
            Ok(Ok(n)) => written += n as u64,
            Ok(Err(e)) => return Err(e).context(format!("writing to {target} after {written} bytes")),
            Err(_) => {}
        }
        let now = Instant::now();
        if now >= next_tick && next_tick <= deadline {
            let c = sunk.load(Ordering::Relaxed);
            per_second_mb.push((c - last_count) as f64 / 1e6);
            last_count = c;
            next_tick += Duration::from_secs(1);
        }
        if now >= deadline {
            break;
        }
    }
    let stopped = Instant::now();
    let before = sunk.load(Ordering::Relaxed);
    let report = tokio::time::timeout(DRAIN_TIMEOUT, async {
        s.shutdown().await?;
        let mut total = [0u8; 8];
        s.read_exact(&mut total).await?;
        Ok::<u64, std::io::Error>(u64::from_be_bytes(total))
    })
    .await;
    let bytes = match report {
        Ok(Ok(b)) => b,
        Ok(Err(e)) => bail!("waiting for the backend's byte count via {target}: {e} (wrote {written} bytes)"),
        Err(_) => bail!(
            "stalled: {:.0} s after the writer stopped the backend had received {} of the {written} bytes written \
             via {target} ({} of them in that time)",
            DRAIN_TIMEOUT.as_secs_f64(),
            sunk.load(Ordering::Relaxed),
            sunk.load(Ordering::Relaxed) - before
        ),
    };
    let end = Instant::now();
    if bytes != written {
        bail!("the backend received {bytes} bytes via {target}, but {written} were written");
    }
    Ok(Measured { bytes, written, elapsed: end - start, drain: end - stopped, per_second_mb })
}

// ---- latency -------------------------------------------------------------------------------

fn new_ns_hist() -> Histogram<u64> {
    // Nanoseconds, 1 ns to 100 s, 3 significant digits.
    Histogram::new_with_bounds(1, 100_000_000_000, 3).unwrap_or_else(|_| unreachable!())
}

struct EchoConn {
    s: TcpStream,
    req: Vec<u8>,
    resp: Vec<u8>,
    seq: u64,
}

impl EchoConn {
    async fn open(ns: &str, target: SocketAddr, size: usize) -> Result<EchoConn> {
        Ok(EchoConn { s: open(ns, target, MODE_ECHO).await?, req: vec![0xa5; size], resp: vec![0; size], seq: 0 })
    }

    /// One request and its echo; returns the round-trip time.
    async fn exchange(&mut self) -> Result<Duration> {
        self.seq += 1;
        self.req[..8].copy_from_slice(&self.seq.to_be_bytes());
        let t0 = Instant::now();
        let r = tokio::time::timeout(EXCHANGE_TIMEOUT, async {
            self.s.write_all(&self.req).await?;
            self.s.read_exact(&mut self.resp).await
        })
        .await;
        let dt = t0.elapsed();
        match r {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => bail!("exchange {}: {e}", self.seq),
            Err(_) => bail!("exchange {} got no answer within {:.0} s (stalled)", self.seq, EXCHANGE_TIMEOUT.as_secs_f64()),
        }
        if self.resp != self.req {
            bail!("exchange {}: the echo differs from the request", self.seq);
        }
        Ok(dt)
    }

    async fn run(&mut self, n: usize, hist: Option<&mut Histogram<u64>>) -> Result<()> {
        let mut hist = hist;
        for _ in 0..n {
            let dt = self.exchange().await?;
            if let Some(h) = hist.as_deref_mut() {
                let _ = h.record((dt.as_nanos() as u64).max(1));
            }
        }
        Ok(())
    }
}

// ---- the run -------------------------------------------------------------------------------

struct Setup {
    _tmp: TempDir,
    backend: Backend,
    relay: LabRelay,
    connector: Process,
    agent: Process,
    /// The agent host's namespace, where the writer's sockets are created.
    agent_ns: String,
    /// The agent's local forward (in the agent host).
    agent_addr: SocketAddr,
    /// The backend as the agent host reaches it directly (through the relay host's kernel).
    direct_addr: SocketAddr,
    pids: Pids,
    relay_args: String,
    agent_args: String,
    connector_args: String,
}

impl Setup {
    fn check_alive(&mut self) -> Result<()> {
        self.relay.relay.process.check_alive()?;
        self.connector.check_alive()?;
        self.agent.check_alive()
    }

    /// The last lines of every child's log, for error messages.
    fn log_tails(&self) -> String {
        let mut s = String::new();
        for p in [&self.relay.relay.process, &self.connector, &self.agent] {
            let _ = write!(s, "\n--- end of the {} log ({}):\n{}", p.what(), p.log().display(), p.log_tail(12));
        }
        s
    }
}

fn validate(args: &TunnelArgs) -> Result<()> {
    if !(args.seconds >= 1.0 && args.seconds <= 600.0) {
        bail!("--seconds must be in [1, 600]");
    }
    if args.rounds == 0 || args.rounds > 20 {
        bail!("--rounds must be in 1..=20");
    }
    if args.exchanges == 0 || args.exchanges > 1_000_000 || args.warmup > 1_000_000 {
        bail!("--exchanges must be in 1..=1000000 and --warmup at most 1000000");
    }
    if !(8..=65536).contains(&args.size) {
        bail!("--size must be in 8..=65536 bytes");
    }
    Ok(())
}

/// The agent's local forward in the agent host.
const AGENT_FORWARD: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 8080);

async fn setup(args: &TunnelArgs, lab: &Lab) -> Result<Setup> {
    let relay_bin = relay_under_test::relay_bin(args.relay_bin.as_deref())?;
    let agent_bin = sibling_bin("ztna-agent", args.agent_bin.as_deref())?;
    let connector_bin = sibling_bin("ztna-connector", args.connector_bin.as_deref())?;
    let tmp = TempDir::new("bench")?;
    let pki = tmp.path().join("pki");
    relay_under_test::pki_init(&relay_bin, &pki, &[])?;
    let backend = start_backend(&lab.ns(Host::Conn)).await?;

    let relay = LabRelay::start(lab, &relay_bin, &pki, tmp.path(), true, &args.relay_log, 0)?;
    let start_client = |what: &str, host: Host, bin: &Path, args: &[String], needles: &[&str]| -> Result<Process> {
        let mut cmd = lab.cmd(host, bin);
        cmd.args(args).env("ZTNA_LOG", "info");
        let mut p = Process::spawn(what, cmd, tmp.path().join(format!("{what}.log")))?;
        p.set_drop_grace(DROP_GRACE);
        p.wait_for_log(needles, PROCESS_START_TIMEOUT)?;
        Ok(p)
    };
    let services = |port: &str| vec![format!("web=127.0.0.1:{port}")];
    let connector = start_client(
        "connector",
        Host::Conn,
        &connector_bin,
        &clients::connector_args(relay.connector_listen, &pki, "web-1", &services(&backend.port.to_string())),
        &["registered"],
    )?;
    let connector_args = clients::connector_args(relay.connector_listen, Path::new("PKI"), "web-1", &services("BACKEND_PORT")).join(" ");

    let agent_addr = AGENT_FORWARD;
    let forward = format!("{agent_addr}:web");
    let agent = start_client(
        "agent",
        Host::Agent,
        &agent_bin,
        &clients::agent_args(relay.listen, &pki, "alice", &["-L", &forward]),
        &["TCP forward ready", "connected to the relay"],
    )?;
    let agent_args = clients::agent_args(relay.listen, Path::new("PKI"), "alice", &["-L", &forward]).join(" ");

    let pids = Pids { relay: relay.pid(), agent: agent.pid(), connector: connector.pid() };
    let direct_addr = SocketAddr::new(lab::CONN_V4.into(), backend.port);
    Ok(Setup {
        _tmp: tmp,
        backend,
        relay,
        connector,
        agent,
        agent_ns: lab.ns(Host::Agent),
        agent_addr,
        direct_addr,
        pids,
        relay_args: relay_under_test::command_line(&args.relay_log),
        agent_args: format!("ztna-agent {agent_args} (ZTNA_LOG=info), in the agent host"),
        connector_args: format!("ztna-connector {connector_args} (ZTNA_LOG=info), in the connector host"),
    })
}

/// The first exchange through the agent: it requests the session and builds the tunnel.
/// Returns the connection, the time it took and the DATA frames the relay forwarded meanwhile.
async fn first_exchange(st: &Setup, size: usize) -> Result<(EchoConn, f64, u64)> {
    let s0 = st.relay.scrape()?;
    let t0 = Instant::now();
    let mut c = EchoConn::open(&st.agent_ns, st.agent_addr, size).await?;
    c.exchange().await.context("the first exchange through the tunnel failed")?;
    let ms = t0.elapsed().as_secs_f64() * 1000.0;
    let frames = relay_data(&s0, &st.relay.scrape()?).frames_forwarded;
    Ok((c, ms, frames))
}

async fn throughput(st: &mut Setup, args: &TunnelArgs) -> Result<ThroughputSummary> {
    let direct = st.direct_addr;
    let tunnel = st.agent_addr;
    let mut runs = Vec::new();
    for round in 1..=args.rounds {
        for (path, target) in [("direct", direct), ("tunnel", tunnel)] {
            check_interrupted()?;
            let via_tunnel = path == "tunnel";
            let scrape0 = if via_tunnel { Some(st.relay.scrape()?) } else { None };
            let udp0 = st.pids.udp();
            let drops0 = st.pids.drops()?;
            let cpu0 = st.pids.cpu()?;
            let m = throughput_once(&st.agent_ns, target, args.seconds, &st.backend.sunk)
                .await
                .with_context(|| format!("throughput run {round}, {path}"))?;
            let cpu = st.pids.cpu()?.since(&cpu0);
            let udp = st.pids.udp().since(&udp0);
            let socket_drops = via_tunnel.then(|| st.pids.drops().map(|d| d.since(&drops0))).transpose()?;
            let relay = match scrape0 {
                Some(s0) => Some(relay_data(&s0, &st.relay.scrape()?)),
                None => None,
            };
            st.check_alive()?;
            let run = ThroughputRun {
                path: path.to_string(),
                round,
                bytes: m.bytes,
                bytes_written: m.written,
                elapsed_s: m.elapsed.as_secs_f64(),
                drain_s: m.drain.as_secs_f64(),
                mb_per_s: m.bytes as f64 / 1e6 / m.elapsed.as_secs_f64(),
                per_second_mb: m.per_second_mb,
                cpu,
                relay,
                udp,
                socket_drops,
            };
            println!(
                "   {path:<6} round {round}: {:>9.1} MB/s ({:.0} MB in {:.2} s, drain {:.2} s)",
                run.mb_per_s,
                run.bytes as f64 / 1e6,
                run.elapsed_s,
                run.drain_s
            );
            runs.push(run);
        }
    }
    let sum = |path: &str| {
        let (mut bytes, mut secs, mut cpu) = (0u64, 0f64, PathCpu::default());
        for r in runs.iter().filter(|r| r.path == path) {
            bytes += r.bytes;
            secs += r.elapsed_s;
            cpu.add(&r.cpu);
        }
        (bytes as f64 / 1e6 / secs, secs, cpu)
    };
    let (direct_mb, direct_wall, direct_cpu) = sum("direct");
    let (tunnel_mb, tunnel_wall, tunnel_cpu) = sum("tunnel");
    let seconds: Vec<f64> = runs.iter().filter(|r| r.path == "tunnel").flat_map(|r| r.per_second_mb.clone()).collect();
    let mut relay = RelayData::default();
    let mut udp = UdpCounters::default();
    let mut socket_drops = SocketDrops::default();
    for r in runs.iter().filter(|r| r.path == "tunnel") {
        if let Some(d) = &r.socket_drops {
            socket_drops.add(d);
        }
        if let Some(d) = &r.relay {
            relay.add(d);
        }
        udp.in_datagrams += r.udp.in_datagrams;
        udp.out_datagrams += r.udp.out_datagrams;
        udp.rcvbuf_errors += r.udp.rcvbuf_errors;
        udp.sndbuf_errors += r.udp.sndbuf_errors;
    }
    Ok(ThroughputSummary {
        seconds: args.seconds,
        rounds: args.rounds,
        direct_mb_per_s: direct_mb,
        tunnel_mb_per_s: tunnel_mb,
        ratio: tunnel_mb / direct_mb,
        tunnel_second_min_mb: seconds.iter().copied().fold(f64::INFINITY, f64::min),
        tunnel_second_max_mb: seconds.iter().copied().fold(0.0, f64::max),
        tunnel_stalled_seconds: seconds.iter().filter(|&&s| s == 0.0).count(),
        tunnel_wall_s: tunnel_wall,
        tunnel_cpu,
        direct_wall_s: direct_wall,
        direct_cpu,
        tunnel_relay: relay,
        tunnel_udp: udp,
        tunnel_socket_drops: socket_drops,
        runs,
    })
}

async fn latency(st: &mut Setup, args: &TunnelArgs, mut tunnel: EchoConn) -> Result<LatencySummary> {
    let mut direct = EchoConn::open(&st.agent_ns, st.direct_addr, args.size).await?;
    let budget = Duration::from_secs(120) * (args.exchanges.div_ceil(10_000) as u32).max(1)
        + Duration::from_secs(60) * (args.warmup.div_ceil(10_000) as u32).max(1);
    let deadline = Instant::now() + budget;
    direct.run(args.warmup, None).await.context("direct warm-up")?;
    tunnel.run(args.warmup, None).await.context("tunnel warm-up")?;
    let (mut hd, mut ht) = (new_ns_hist(), new_ns_hist());
    let mut tunnel_wall = Duration::ZERO;
    let scrape0 = st.relay.scrape()?;
    let drops0 = st.pids.drops()?;
    let cpu0 = st.pids.cpu()?;
    let mut done = 0;
    while done < args.exchanges {
        check_interrupted()?;
        let n = BLOCK.min(args.exchanges - done);
        direct.run(n, Some(&mut hd)).await.context("direct exchanges")?;
        let t = Instant::now();
        tunnel.run(n, Some(&mut ht)).await.context("tunnel exchanges")?;
        tunnel_wall += t.elapsed();
        done += n;
        if Instant::now() > deadline {
            bail!("the latency phase exceeded its {:.0} s budget after {done} exchanges per path", budget.as_secs_f64());
        }
    }
    let cpu = st.pids.cpu()?.since(&cpu0);
    let relay = relay_data(&scrape0, &st.relay.scrape()?);
    let socket_drops = st.pids.drops()?.since(&drops0);
    st.check_alive()?;
    let (d, t) = (LatencyStats::from_hist(&hd), LatencyStats::from_hist(&ht));
    let per = |s: f64| s * 1e6 / args.exchanges as f64;
    Ok(LatencySummary {
        size: args.size,
        warmup: args.warmup,
        block: BLOCK,
        added_p50_us: t.p50_us - d.p50_us,
        added_p99_us: t.p99_us - d.p99_us,
        added_p999_us: t.p999_us - d.p999_us,
        direct: d,
        tunnel: t,
        tunnel_wall_s: tunnel_wall.as_secs_f64(),
        tunnel_exchanges_per_s: args.exchanges as f64 / tunnel_wall.as_secs_f64(),
        relay_cpu_us_per_exchange: per(cpu.relay_s),
        agent_cpu_us_per_exchange: per(cpu.agent_s),
        connector_cpu_us_per_exchange: per(cpu.connector_s),
        cpu,
        relay_frames_per_exchange: relay.frames_forwarded as f64 / args.exchanges as f64,
        relay,
        socket_drops,
    })
}

/// Runs the benchmark in `lab`, or in a lab of its own brought up for it (and removed after).
pub async fn run(args: &TunnelArgs, lab: Option<&Lab>) -> Result<TunnelReport> {
    validate(args)?;
    let own;
    let lab = match lab {
        Some(l) => l,
        None => {
            own = lab_run::up(&args.lab_script, "zt")?;
            &own
        }
    };
    let mut st = setup(args, lab).await?;
    println!(
        "-- tunnel (lab {}): relay pid {} on {} | {}, connector pid {}, agent pid {} forwarding {} -> backend port {} \
         (direct: {})",
        lab.prefix,
        st.relay.pid(),
        st.relay.listen,
        st.relay.connector_listen,
        st.connector.pid(),
        st.agent.pid(),
        st.agent_addr,
        st.backend.port,
        st.direct_addr
    );
    let measured = async {
        let (conn, first_ms, first_frames) = first_exchange(&st, args.size).await?;
        println!("   first exchange through a new tunnel: {first_ms:.1} ms ({first_frames} relay frames)");
        println!("   throughput, one TCP stream, {} × {:.0} s per path:", args.rounds, args.seconds);
        let thr = throughput(&mut st, args).await?;
        println!("   latency: {} × {} bytes each way per path (after {} warm-up):", args.exchanges, args.size, args.warmup);
        let lat = latency(&mut st, args, conn).await?;
        Ok::<_, anyhow::Error>((first_ms, first_frames, thr, lat))
    }
    .await;
    let (first_exchange_ms, first_exchange_relay_frames, throughput, latency) = match measured {
        Ok(m) => m,
        Err(e) => return Err(e.context(format!("tunnel benchmark failed{}", st.log_tails()))),
    };
    let clients = vec![stop_client(&st.agent), stop_client(&st.connector)];
    let Setup { relay, relay_args, agent_args, connector_args, .. } = st;
    let relay_run = relay.finish("tunnel");
    let argv: Vec<String> = std::env::args().skip(1).collect();
    Ok(TunnelReport {
        date: sys::utc_now(),
        revision: sys::git_revision(),
        machine: sys::machine(),
        command: format!("{} && target/release/ztna-bench {}", relay_under_test::BUILD, argv.join(" ")),
        relay_args,
        agent_args,
        connector_args,
        first_exchange_ms,
        first_exchange_relay_frames,
        throughput,
        latency,
        relay_run,
        clients,
    })
}
