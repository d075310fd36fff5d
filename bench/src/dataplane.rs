//! `ztna-bench dataplane`: the forwarding rate of one worker on the lab topology
//! (`deploy/lab/lab.sh`), side by side for the kernel-socket baseline (`baseline-forwarder`) and
//! the relay on each of its I/O paths (recvmmsg/sendmmsg, io_uring, XDP native), for 64- and
//! 1200-byte payloads, and the latency the relay adds at half of its maximum rate.
//!
//! The lab gets a prefix of this run's own and is removed at the end, also on error or Ctrl-C.
//! Sessions are made through the real control protocol, with the agents' sockets in the agent
//! host and the connector's in the connector host (see `netns`). `trafgen` sends their DATA
//! frames from the agent host at a set rate and count; an nftables rule at the connector host's
//! ingress counts and drops them (no userspace receive cost). A short search (doubling, then
//! bisection) finds the highest offered rate with less than 1% loss. When trafgen cannot reach the
//! rate it was asked for, the result says GENERATOR LIMITED instead of blaming the relay.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::Serialize;

use crate::flood::{self, FloodArgs, LatencyUs};
use ztna_testbed::lab::{self, Host, Lab};
use ztna_testbed::{Process, Relay, Scrape, TempDir, bins};

use crate::interrupt::{self, check_interrupted};
use crate::lab_run;
use crate::relay_counters;
use crate::relay_under_test::{self, DROP_GRACE};
use crate::sessions::{self, ExportCommon, ExportTrafgenArgs, SessionEntry, SessionsFile};
use crate::setup::{self, SessionSetupArgs};
use crate::sys::{self, Machine};


/// Latency runs get a connector identity and service each (`lat-N`), so a connector that an
/// earlier run left registered (its close lost in a full socket) cannot take a later run's offers.
const LATENCY_IDENTITIES: usize = 16;

/// `ztna-relay pki init` with agent alice, connectors web-1 and lat-1.., and a policy granting
/// alice service `web` (served by web-1) and `latN` (served by lat-N).
fn pki_init(relay_bin: &Path, dir: &Path) -> Result<()> {
    let latency: Vec<String> = (1..=LATENCY_IDENTITIES).map(|i| format!("lat-{i}")).collect();
    let latency: Vec<&str> = latency.iter().map(String::as_str).collect();
    let pki = relay_under_test::pki_init(relay_bin, dir, &latency)?;
    let mut policy = String::from("[services.web]\nagents = [\"ztna://agent/alice\"]\nconnectors = [\"ztna://connector/web-1\"]\n");
    for i in 1..=LATENCY_IDENTITIES {
        let _ = write!(policy, "\n[services.lat{i}]\nagents = [\"ztna://agent/alice\"]\nconnectors = [\"ztna://connector/lat-{i}\"]\n");
    }
    pki.set_policy(&policy)
}

/// UDP ports in the relay host: the relay's, and the baseline forwarder's beside it.
const RELAY_PORT: u16 = 4433;
const BASELINE_PORT: u16 = 4434;
const ADMIN: &str = "127.0.0.1:9090";
/// A rate step passes with less loss than this.
pub const MAX_LOSS: f64 = 0.01;
/// The generator reached its target when it offered at least this share of it.
const GENERATOR_OK: f64 = 0.95;
/// nftables table (connector host) that counts and drops the generator's frames.
const NFT_TABLE: &str = "ztnabench";
/// Where the search starts, and at most how many steps it takes per row.
pub const START_PPS: f64 = 100_000.0;
const MAX_STEPS: usize = 10;
/// Frames per second of step time that a flat-out step sends (more than trafgen manages here).
const FLAT_OUT_PPS: f64 = 1_000_000.0;
/// Generator and forwarder run at this niceness, so other work on the machine disturbs less.
pub const NICE: &str = "-10";
/// Wait after the generator stops, for frames still queued on the way.
const DRAIN: Duration = Duration::from_millis(200);

/// Below this many cores busy with other work, the machine counts as quiet.
const QUIET_CORES: f64 = 0.25;

/// Cores kept busy by everything else on the machine (other builds), sampled with no traffic.
fn background_load() -> Result<f64> {
    let t = Duration::from_millis(500);
    let b0 = sys::machine_busy_seconds()?;
    std::thread::sleep(t);
    Ok((sys::machine_busy_seconds()? - b0) / t.as_secs_f64())
}

/// Waits up to `limit` for the machine to be quiet; returns the last other load measured.
fn wait_quiet(limit: Duration) -> Result<f64> {
    let end = Instant::now() + limit;
    let mut said = false;
    loop {
        let load = background_load()?;
        if load < QUIET_CORES || Instant::now() >= end {
            return Ok(load);
        }
        check_interrupted()?;
        if !said {
            println!("   waiting up to {:.0} s for other load ({load:.2} cores) to settle", limit.as_secs_f64());
            said = true;
        }
    }
}

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Variant {
    /// `ztna-bench baseline-forwarder`: recvmmsg → lookup → sendmmsg, one thread.
    Baseline,
    /// `ztna-relay --workers 1 --io mmsg`.
    Mmsg,
    /// `ztna-relay --workers 1 --io uring`.
    Uring,
    /// `ztna-relay --workers 1 --xdp-iface a0 --xdp-iface c0 --xdp-mode native`.
    Xdp,
}

impl Variant {
    pub fn label(self) -> &'static str {
        match self {
            Variant::Baseline => "baseline (recvmmsg/sendmmsg forwarder)",
            Variant::Mmsg => "relay, mmsg",
            Variant::Uring => "relay, io_uring",
            Variant::Xdp => "relay, XDP native",
        }
    }

    /// The relay flags for this variant, or why the relay binary cannot run it (from its --help).
    fn relay_flags(self, help: &str) -> std::result::Result<Vec<&'static str>, String> {
        let has_io = help.contains("--io");
        let has_xdp = help.contains("--xdp-iface") && help.contains("--xdp-mode");
        match self {
            Variant::Baseline => Ok(vec![]),
            // Before --io existed the relay's only backend was recvmmsg/sendmmsg.
            Variant::Mmsg => Ok(if has_io { vec!["--io", "mmsg"] } else { vec![] }),
            Variant::Uring if has_io => Ok(vec!["--io", "uring"]),
            Variant::Uring => Err("the relay does not support --io (needed for --io uring): skipped".into()),
            Variant::Xdp if has_xdp => Ok(vec!["--xdp-iface", "a0", "--xdp-iface", "c0", "--xdp-mode", "native"]),
            Variant::Xdp => Err("the relay does not support --xdp-iface/--xdp-mode: skipped".into()),
        }
    }
}

#[derive(clap::Args, Debug, Clone)]
pub struct DataplaneArgs {
    /// Variants, in order (the baseline runs beside the first relay variant, which makes its sessions).
    #[arg(long, value_enum, value_delimiter = ',', default_value = "baseline,mmsg,uring,xdp")]
    pub variants: Vec<Variant>,
    /// DATA payload sizes in bytes (16..=1400).
    #[arg(long, value_delimiter = ',', default_value = "64,1200")]
    pub payloads: Vec<usize>,
    /// Leave out the IPv6 rows (baseline and mmsg relay, smallest payload).
    #[arg(long)]
    pub no_ipv6: bool,
    /// Sessions whose frames the generator sends (round robin).
    #[arg(long, default_value_t = 8)]
    pub sessions: usize,
    /// Seconds of generator traffic per rate step.
    #[arg(long, default_value_t = 1.5)]
    pub step_seconds: f64,
    /// Seconds for all rate searches together (each row gets its share).
    #[arg(long, default_value_t = 180.0)]
    pub budget: f64,
    /// Seconds of each latency run (through the relay and the direct path), 0 skips them.
    #[arg(long, default_value_t = 2.0)]
    pub latency_seconds: f64,
    /// Before each row, wait up to this many seconds for other work on the machine to settle
    /// (the load is measured and reported either way).
    #[arg(long, default_value_t = 20.0)]
    pub wait_quiet: f64,
    /// CPU for the relay or baseline process (trafgen runs on CPU 0).
    #[arg(long, default_value_t = 1)]
    pub relay_cpu: usize,
    /// Receive Packet Steering: run the relay host's receive processing on the relay's CPU (and
    /// the connector host's on the other), instead of on the CPU that sent the frames, as a veth
    /// does by default. Costs an inter-processor interrupt per batch (dear on a VM).
    #[arg(long)]
    pub rps: bool,
    /// The relay binary (default: `ztna-relay` next to this executable).
    #[arg(long)]
    pub relay_bin: Option<PathBuf>,
    /// The lab script.
    #[arg(long, default_value = "deploy/lab/lab.sh")]
    pub lab_script: PathBuf,
    /// Rewrite the data-plane section of this Markdown file (e.g. docs/BENCHMARKS.md).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Also write the result as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

#[derive(clap::Parser)]
struct DefaultsOnly {
    #[command(flatten)]
    args: DataplaneArgs,
}

impl DataplaneArgs {
    /// The defaults of every option (for `standard`).
    pub fn defaults() -> DataplaneArgs {
        <DefaultsOnly as clap::Parser>::parse_from(["dataplane"]).args
    }
}

/// One generator run at one rate.
#[derive(Debug, Clone, Serialize)]
pub struct Step {
    /// The rate trafgen was asked for; none: flat out.
    pub target_pps: Option<f64>,
    pub seconds: f64,
    /// Frames the generator put on the agent host's veth (tx packets + tx drops).
    pub sent: u64,
    /// Frames counted at the connector host's ingress.
    pub delivered: u64,
    pub offered_pps: f64,
    pub delivered_pps: f64,
    pub loss: f64,
    pub generator_limited: bool,
    /// Busy time of the whole machine (all cores, /proc/stat) during the step and its drain.
    pub machine_cpu_s: f64,
    /// CPU of the generator process (trafgen), which the machine's figure includes.
    pub generator_cpu_s: f64,
    /// CPU (utime+stime) of the relay or baseline process, and the datagrams the kernel dropped
    /// at its sockets for a full receive buffer.
    pub forwarder_cpu_s: Option<f64>,
    pub forwarder_socket_drops: Option<u64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Latency {
    pub rate_pps: f64,
    pub relay: Option<LatencyUs>,
    pub direct: Option<LatencyUs>,
    pub relay_loss: f64,
    pub generator_limited: bool,
    pub note: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub variant: Variant,
    pub ipv6: bool,
    pub payload: usize,
    /// Offered rate of the fastest step with less than 1% loss.
    pub max_pps: Option<f64>,
    pub delivered_pps: Option<f64>,
    pub loss_at_max: Option<f64>,
    /// The generator could not go faster: the relay's maximum is at least `max_pps`.
    pub generator_limited: bool,
    /// Machine CPU per forwarded frame at the max step, less the generator's own cost per frame
    /// (measured alone, with the frames dropped at the relay host's ingress), in µs.
    pub cpu_us_per_frame: Option<f64>,
    pub machine_cpu_us_per_frame: Option<f64>,
    /// CPU of the relay (or baseline) process per forwarded frame at the max step, in µs: the
    /// figure that other load on the machine does not inflate (XDP forwards outside it).
    pub forwarder_cpu_us_per_frame: Option<f64>,
    /// Cores busy with other work just before the row's search (no traffic).
    pub background_cores: Option<f64>,
    /// XDP rows: the program's own run time per packet over the search, from the kernel's
    /// BPF statistics (`kernel.bpf_stats_enabled`), in ns. The trafgen-bound rate cannot show
    /// XDP's ceiling on this machine; this is the cost that sets it.
    pub xdp_program_ns: Option<f64>,
    /// Relay drops by reason (its /metrics) over the whole search.
    pub relay_dropped: BTreeMap<String, u64>,
    pub steps: Vec<Step>,
    pub latency: Option<Latency>,
    /// Why the row has no result (variant unsupported, relay failed to start, ...).
    pub error: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct DataplaneReport {
    pub date: String,
    pub revision: String,
    pub machine: Machine,
    pub command: String,
    pub relay_cpu: usize,
    /// Receive steering was on (`--rps`).
    pub rps: bool,
    pub step_seconds: f64,
    pub sessions: usize,
    pub relay_args: String,
    /// Generator cost alone per frame (µs of machine CPU), by "IPv4/64" etc.
    pub generator_us_per_frame: BTreeMap<String, f64>,
    pub rows: Vec<Row>,
    pub search_s: f64,
    pub total_s: f64,
}

pub fn family(v6: bool) -> &'static str {
    if v6 { "IPv6" } else { "IPv4" }
}

/// Everything a run needs about the lab and its files.
struct Ctx<'a> {
    a: &'a DataplaneArgs,
    lab: &'a Lab,
    tmp: PathBuf,
    pki: PathBuf,
    relay_bin: PathBuf,
    src_mac: String,
    dst_mac: String,
    /// Latency runs so far (each takes the next `lat-N` identity).
    latency_runs: std::cell::Cell<usize>,
}

impl Ctx<'_> {
    fn setup_args(&self, v6: bool) -> SessionSetupArgs {
        let (a_side, c_side) = lab::relay_addrs(v6, RELAY_PORT);
        SessionSetupArgs {
            connector_relay: Some(c_side),
            agent_netns: Some(self.lab.ns(Host::Agent)),
            connector_netns: Some(self.lab.ns(Host::Conn)),
            ..SessionSetupArgs::new(a_side, self.pki.clone())
        }
    }

    /// Setup for one latency run (IPv4): a `lat-N` connector identity and service of its own.
    fn latency_setup_args(&self) -> SessionSetupArgs {
        let n = self.latency_runs.get() % LATENCY_IDENTITIES + 1;
        self.latency_runs.set(self.latency_runs.get() + 1);
        SessionSetupArgs { connector: format!("lat-{n}"), service: format!("lat{n}"), ..self.setup_args(false) }
    }

    /// A trafgen config with one frame per session of `file`, sent to `file.relay`.
    fn trafgen_config(&self, file: &SessionsFile, payload: usize, tag: &str) -> Result<Frames> {
        let sessions = self.tmp.join(format!("sessions-{tag}.json"));
        sessions::write_sessions_file(&sessions, file)?;
        let out = self.tmp.join(format!("frames-{tag}-{payload}.cfg"));
        sessions::export_trafgen(&ExportTrafgenArgs {
            common: ExportCommon {
                sessions,
                out: out.clone(),
                src_mac: self.src_mac.clone(),
                dst_mac: self.dst_mac.clone(),
                payload,
                ttl: 64,
                allow_stale: false,
            },
        })?;
        let ip_header = if file.relay.is_ipv6() { 40 } else { 20 };
        Ok(Frames { cfg: out, frame_len: 14 + ip_header + 8 + ztna_proto::frame::DATA_HEADER_LEN + payload })
    }

    /// `nice` arguments that run a forwarder at raised priority on its CPU.
    fn pinned(&self) -> Vec<String> {
        ["-n", NICE, "taskset", "-c"].iter().map(|s| s.to_string()).chain([self.a.relay_cpu.to_string()]).collect()
    }
}

/// CPU time of this process's reaped children (trafgen, once it exited), in seconds.
fn children_cpu_s() -> f64 {
    // SAFETY: getrusage fills the struct we own.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru) } != 0 {
        return 0.0;
    }
    let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    t(ru.ru_utime) + t(ru.ru_stime)
}

/// nftables rules that count and drop the generator's frames (UDP, DATA type byte, then the
/// exporter's "ZTNA" payload marker) at a host's ingress, before any socket; flood's frames
/// (no marker) pass.
fn install_counter(lab: &Lab, host: Host, dev: &str) -> Result<()> {
    let rules = format!(
        "table netdev {NFT_TABLE} {{\n  chain in {{\n    type filter hook ingress device \"{dev}\" priority -500;\n    \
         meta l4proto udp @th,64,8 0x01 @th,136,32 0x5a544e41 counter drop\n  }}\n}}\n"
    );
    let path = std::env::temp_dir().join(format!("ztna-bench-{}-{dev}.nft", std::process::id()));
    std::fs::write(&path, rules).with_context(|| format!("writing {}", path.display()))?;
    let r = lab.run(host, &["nft", "-f", &path.display().to_string()]);
    let _ = std::fs::remove_file(&path);
    r.context("installing the nftables counter (is nftables installed? Debian: apt-get install nftables)")?;
    Ok(())
}

fn remove_counter(lab: &Lab, host: Host) -> Result<()> {
    lab.run(host, &["nft", "delete", "table", "netdev", NFT_TABLE]).map(|_| ())
}

fn read_counter(lab: &Lab, host: Host) -> Result<u64> {
    let text = lab.run(host, &["nft", "-j", "list", "table", "netdev", NFT_TABLE])?;
    let v: serde_json::Value = serde_json::from_str(&text).context("parsing `nft -j` output")?;
    let packets = v["nftables"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|o| o["rule"]["expr"].as_array())
        .flatten()
        .find_map(|e| e["counter"]["packets"].as_u64());
    packets.context("no counter in the nftables table")
}

/// The process that forwards (relay or baseline), for its CPU time and socket drops.
#[derive(Clone, Copy)]
struct Forwarder(Option<u32>);

impl Forwarder {
    fn sample(self) -> (Option<f64>, Option<u64>) {
        match self.0 {
            Some(pid) => (sys::cpu_seconds(Some(pid)).ok(), sys::udp_socket_drops(pid).ok()),
            None => (None, None),
        }
    }
}

fn delta<T: std::ops::Sub<Output = T> + PartialOrd + Copy>(a: Option<T>, b: Option<T>) -> Option<T> {
    match (a, b) {
        (Some(a), Some(b)) if a >= b => Some(a - b),
        _ => None,
    }
}

/// A trafgen config and the length of its Ethernet frames (all the same).
pub struct Frames {
    pub cfg: PathBuf,
    pub frame_len: usize,
}

/// Paces the agent host's veth to `pps` frames of `frame_len` bytes: a token bucket (tbf) with
/// 5 ms of burst. trafgen's own `--rate` sends each second's frames in one burst at the start of
/// the second, which measures how big a burst the forwarder's socket buffer absorbs, not its
/// rate; behind the shaper trafgen's per-frame sends block, so the frames leave evenly.
fn shape(lab: &Lab, pps: f64, frame_len: usize) -> Result<()> {
    let bytes_per_s = pps * frame_len as f64;
    let burst = ((bytes_per_s / 200.0) as u64).max(4 * frame_len as u64).max(4000);
    let rate = format!("{}bit", (bytes_per_s * 8.0).round() as u64);
    lab.run(Host::Agent, &["tc", "qdisc", "replace", "dev", "a1", "root", "tbf", "rate", &rate, "burst", &burst.to_string(), "limit", "4000000"])
        .map(|_| ())
        .context("pacing the generator with a tbf qdisc on a1")
}

fn unshape(lab: &Lab) {
    let _ = lab.run(Host::Agent, &["tc", "qdisc", "del", "dev", "a1", "root"]);
}

/// How trafgen sends in a step.
#[derive(Debug, Clone, Copy)]
enum Pace {
    /// This many frames per second, behind the shaper.
    Rate(f64),
    /// Flat out from trafgen's TX ring, past the qdisc (its fastest).
    FlatOut,
    /// Flat out with blocking per-frame sends through a plain FIFO qdisc: for when the TX ring
    /// gives up on a busy device (trafgen exits on EAGAIN; the XDP path's veth can push back).
    FlatOutQueued,
}

impl Pace {
    fn rate(self) -> Option<f64> {
        match self {
            Pace::Rate(r) => Some(r),
            _ => None,
        }
    }
}

/// trafgen's own pacing in the blocking per-frame mode: far above any rate it reaches, so the
/// qdisc in front of the device sets the pace.
const UNPACED: &str = "100000000pps";

/// One generator run for `--step-seconds`, frames counted where `counter_host` drops them.
fn step(ctx: &Ctx, frames: &Frames, pace: Pace, counter_host: Host, fwd: Forwarder) -> Result<Step> {
    check_interrupted()?;
    let lab = ctx.lab;
    let rate = pace.rate();
    let n = ((rate.unwrap_or(FLAT_OUT_PPS) * ctx.a.step_seconds).ceil() as u64).max(1000);
    let pacing: Vec<&str> = match pace {
        Pace::Rate(r) => {
            shape(lab, r, frames.frame_len)?;
            vec!["--qdisc-path", "--rate", UNPACED]
        }
        Pace::FlatOut => {
            unshape(lab);
            Vec::new()
        }
        Pace::FlatOutQueued => {
            lab.run(Host::Agent, &["tc", "qdisc", "replace", "dev", "a1", "root", "pfifo", "limit", "10000"])?;
            vec!["--qdisc-path", "--rate", UNPACED]
        }
    };
    let cfg = &frames.cfg;
    let (c0, l0) = (read_counter(lab, counter_host)?, lab.link_stats(Host::Agent, "a1")?);
    let (f0, d0) = fwd.sample();
    let (m0, g0) = (sys::machine_busy_seconds()?, children_cpu_s());
    let started = Instant::now();
    let mut child = lab
        .cmd(Host::Agent, "nice")
        .args(["-n", NICE, "trafgen", "--dev", "a1", "--conf"])
        .arg(cfg)
        .args(["--num", &n.to_string()])
        .args(pacing)
        // One process on CPU 0; leave IRQ affinity and the machine's socket memory alone.
        .args(["--cpus", "1", "--notouch-irq", "--no-sock-mem", "--no-cpu-stats"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting trafgen in the agent host (Debian: apt-get install netsniff-ng)")?;
    let limit = Duration::from_secs_f64(ctx.a.step_seconds * 4.0 + 5.0);
    let status = loop {
        if let Some(st) = child.try_wait()? {
            break st;
        }
        if started.elapsed() > limit || interrupt::stop_requested() {
            let _ = child.kill();
            let _ = child.wait();
            check_interrupted()?;
            bail!("trafgen did not finish {n} frames within {:.0} s", limit.as_secs_f64());
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let seconds = started.elapsed().as_secs_f64();
    let generator_cpu_s = children_cpu_s() - g0;
    unshape(lab);
    if !status.success() {
        let mut err = String::new();
        if let Some(mut e) = child.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut e, &mut err);
        }
        bail!("trafgen failed ({status}): {}", err.trim());
    }
    // Frames still queued in the relay are delivered (and their CPU spent) within this.
    std::thread::sleep(DRAIN);
    let machine_cpu_s = sys::machine_busy_seconds()? - m0;
    let (f1, d1) = fwd.sample();
    let l = lab.link_stats(Host::Agent, "a1")?.since(&l0);
    let delivered = read_counter(lab, counter_host)?.saturating_sub(c0);
    let sent = l.tx_packets + l.tx_dropped;
    let offered_pps = sent as f64 / seconds;
    let loss = if sent > 0 { 1.0 - (delivered.min(sent) as f64 / sent as f64) } else { 1.0 };
    let s = Step {
        target_pps: rate,
        seconds,
        sent,
        delivered,
        offered_pps,
        delivered_pps: delivered as f64 / seconds,
        loss,
        generator_limited: rate.is_none_or(|r| offered_pps < GENERATOR_OK * r),
        machine_cpu_s,
        generator_cpu_s,
        forwarder_cpu_s: delta(f1, f0),
        forwarder_socket_drops: delta(d1, d0),
    };
    println!(
        "   target {:>9} pps: offered {:>9.0}, delivered {:>9.0} pps, loss {:>6.2}% (forwarder socket drops {}){}",
        match pace {
            Pace::Rate(r) => format!("{r:.0}"),
            Pace::FlatOut => "flat out".into(),
            Pace::FlatOutQueued => "flat out*".into(),
        },
        s.offered_pps,
        s.delivered_pps,
        s.loss * 100.0,
        s.forwarder_socket_drops.map_or("-".into(), |d| d.to_string()),
        if s.generator_limited { "  (generator limited)" } else { "" }
    );
    Ok(s)
}

struct Search {
    best: Option<Step>,
    steps: Vec<Step>,
    generator_limited: bool,
    /// What ended the search early (the steps before it still count).
    error: Option<String>,
}

/// Doubling from [`START_PPS`] until a step loses 1% or more, then bisection, within `budget`;
/// when trafgen cannot pace any faster, one flat-out step ends it.
fn search(ctx: &Ctx, cfg: &Frames, budget: Duration, fwd: Forwarder) -> Search {
    let mut r = Search { best: None, steps: Vec::new(), generator_limited: false, error: None };
    if let Err(e) = search_steps(ctx, cfg, budget, fwd, &mut r) {
        r.error = Some(format!("{e:#}"));
    }
    r
}

fn search_steps(ctx: &Ctx, cfg: &Frames, budget: Duration, fwd: Forwarder, r: &mut Search) -> Result<()> {
    let end = Instant::now() + budget;
    let (mut lo, mut hi): (f64, Option<f64>) = (0.0, None);
    let mut rate = START_PPS;
    let step_cost = Duration::from_secs_f64(ctx.a.step_seconds + 0.5);
    while r.steps.len() < MAX_STEPS && (r.steps.is_empty() || Instant::now() + step_cost < end) {
        let s = step(ctx, cfg, Pace::Rate(rate), Host::Conn, fwd)?;
        if s.delivered == 0 {
            bail!(
                "nothing reached the connector host at {rate:.0} pps ({} frames sent): the sessions are not forwarded \
                 (relay dropped them? see its drop counters)",
                s.sent
            );
        }
        let ok = s.loss < MAX_LOSS;
        let limited = s.generator_limited;
        if ok {
            lo = lo.max(rate);
            if r.best.as_ref().is_none_or(|b| s.offered_pps > b.offered_pps) {
                r.best = Some(s.clone());
            }
        } else {
            // Failed at what the generator actually offered.
            let h = if limited { s.offered_pps } else { rate };
            hi = Some(hi.map_or(h, |x: f64| x.min(h)));
        }
        r.steps.push(s);
        if ok && limited {
            // trafgen's pacing tops out below its flat-out rate: one flat-out step tells whether
            // the forwarder keeps up with all the generator has.
            r.generator_limited = true;
            let f = match step(ctx, cfg, Pace::FlatOut, Host::Conn, fwd) {
                Err(e) if format!("{e:#}").contains("temporarily unavailable") => step(ctx, cfg, Pace::FlatOutQueued, Host::Conn, fwd)?,
                other => other?,
            };
            if f.loss < MAX_LOSS && r.best.as_ref().is_none_or(|b| f.offered_pps > b.offered_pps) {
                r.best = Some(f.clone());
            }
            r.steps.push(f);
            break;
        }
        rate = match hi {
            None => rate * 2.0,
            Some(h) if h - lo < 0.08 * h || h < 2_000.0 => break,
            Some(h) => (lo + h) / 2.0,
        };
    }
    Ok(())
}

/// Holds sessions (control connections serviced) until [`Holder::close`].
struct Holder {
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    file: SessionsFile,
}

impl Holder {
    async fn start(ctx: &Ctx<'_>, v6: bool) -> Result<Holder> {
        let setup = ctx.setup_args(v6);
        let est = setup::establish(&setup, ctx.a.sessions).await?;
        let file = sessions::sessions_file(setup.relay, &est, ctx.a.budget + 600.0);
        let stop = Arc::new(AtomicBool::new(false));
        let mut tasks = Vec::new();
        for mut c in est.agents.into_iter().chain(std::iter::once(est.connector)) {
            let stop = stop.clone();
            tasks.push(tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    if c.idle(Duration::from_millis(200)).await.is_err() {
                        break;
                    }
                }
                c.close().await;
            }));
        }
        Ok(Holder { stop, tasks, file })
    }

    /// The sessions file with frames going to `port` of the same relay host address.
    fn file_for(&self, port: u16) -> SessionsFile {
        let mut f = self.file.clone();
        f.relay.set_port(port);
        f
    }

    async fn close(self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

fn relay_command_line(pki: &Path, flags: &[&str]) -> Vec<String> {
    let mut v = relay_under_test::args(pki, &format!("[::]:{RELAY_PORT}"), ADMIN, true);
    v.extend(flags.iter().map(|s| s.to_string()));
    v
}

fn start_relay(ctx: &Ctx, variant: Variant, flags: &[&str]) -> Result<Relay> {
    let mut cmd = ctx.lab.cmd(Host::Relay, "nice");
    cmd.args(ctx.pinned()).arg(&ctx.relay_bin).args(relay_command_line(&ctx.pki, flags)).env("ZTNA_LOG", "warn");
    let log = ctx.tmp.join(format!("relay-{variant:?}.log"));
    let mut relay = Relay::spawn(cmd, &log, RELAY_PORT, ADMIN.parse()?, Some(&ctx.lab.ns(Host::Relay)))
        .with_context(|| format!("starting the {}", variant.label()))?;
    relay.process.set_drop_grace(DROP_GRACE);
    Ok(relay)
}

fn start_baseline(ctx: &Ctx<'_>, sessions: &Path, tag: &str) -> Result<Process> {
    let exe = std::env::current_exe().context("locating this executable")?;
    let mut cmd = ctx.lab.cmd(Host::Relay, "nice");
    cmd.args(ctx.pinned())
        .arg(exe)
        .args(["baseline-forwarder", "--listen", &format!("[::]:{BASELINE_PORT}"), "--sessions"])
        .arg(sessions)
        .args(["--seconds", &format!("{:.0}", ctx.a.budget + 300.0)]);
    let mut p = Process::spawn("baseline forwarder", cmd, ctx.tmp.join(format!("baseline-{tag}.log")))?;
    p.set_drop_grace(DROP_GRACE);
    p.wait_for_log(&["listening on"], Duration::from_secs(10))?;
    Ok(p)
}

fn relay_drops(ctx: &Ctx) -> Option<Scrape> {
    ctx.lab.scrape(Host::Relay, ADMIN.parse().ok()?).ok()
}

fn empty_row(variant: Variant, ipv6: bool, payload: usize, error: Option<String>) -> Row {
    Row {
        variant,
        ipv6,
        payload,
        max_pps: None,
        delivered_pps: None,
        loss_at_max: None,
        generator_limited: false,
        cpu_us_per_frame: None,
        machine_cpu_us_per_frame: None,
        forwarder_cpu_us_per_frame: None,
        background_cores: None,
        xdp_program_ns: None,
        relay_dropped: BTreeMap::new(),
        steps: Vec::new(),
        latency: None,
        error,
    }
}

/// Searches one row; errors become the row's note, so one failing variant does not end the run.
fn measure_row(ctx: &Ctx, row: &mut Row, cfg: &Frames, budget: Duration, gen_cost: Option<f64>, fwd: Forwarder, scrape: bool) {
    println!("-- {} / {} / {} B payload:", row.variant.label(), family(row.ipv6), row.payload);
    row.background_cores = wait_quiet(Duration::from_secs_f64(ctx.a.wait_quiet)).ok();
    let before = if scrape { relay_drops(ctx) } else { None };
    let stats = (row.variant == Variant::Xdp).then(BpfStats::enable);
    let prog_before = stats.as_ref().and_then(|_| xdp_program_stats(ctx.lab));
    let s = search(ctx, cfg, budget, fwd);
    if let (Some((t0, n0)), Some((t1, n1))) = (prog_before, stats.as_ref().and_then(|_| xdp_program_stats(ctx.lab))) {
        row.xdp_program_ns = (n1 > n0).then(|| (t1 - t0) as f64 / (n1 - n0) as f64);
    }
    drop(stats);
    if let Some(b) = &s.best {
        row.max_pps = Some(b.offered_pps);
        row.delivered_pps = Some(b.delivered_pps);
        row.loss_at_max = Some(b.loss);
        let per = |cpu: f64| (b.delivered > 0).then(|| cpu / b.delivered as f64 * 1e6);
        row.machine_cpu_us_per_frame = per(b.machine_cpu_s);
        let background = row.background_cores.unwrap_or(0.0) * (b.seconds + DRAIN.as_secs_f64());
        row.cpu_us_per_frame = gen_cost.and_then(|g| per(b.machine_cpu_s - g * 1e-6 * b.sent as f64 - background));
        row.forwarder_cpu_us_per_frame = b.forwarder_cpu_s.and_then(per);
    }
    row.error = match (s.error, &s.best) {
        (Some(e), _) => Some(e),
        (None, None) => Some(format!("no step had less than {:.0}% loss", MAX_LOSS * 100.0)),
        (None, Some(_)) => None,
    };
    row.generator_limited = s.generator_limited;
    row.steps = s.steps;
    if let (Some(b), Some(a)) = (before, scrape.then(|| relay_drops(ctx)).flatten()) {
        row.relay_dropped = relay_counters::drops_between(&b, &a);
    }
}

/// Turns the kernel's per-program run-time statistics on for its lifetime (they cost a
/// clock read per run, so they are off by default) and restores the previous setting.
struct BpfStats(Option<String>);

const BPF_STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";

impl BpfStats {
    fn enable() -> BpfStats {
        let previous = std::fs::read_to_string(BPF_STATS).ok();
        let _ = std::fs::write(BPF_STATS, "1");
        BpfStats(previous)
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        if let Some(p) = &self.0 {
            let _ = std::fs::write(BPF_STATS, p.trim());
        }
    }
}

/// (run_time_ns, run_cnt) of the XDP program attached to the relay host's a0.
fn xdp_program_stats(lab: &Lab) -> Option<(u64, u64)> {
    let link: serde_json::Value = serde_json::from_str(&lab.run(Host::Relay, &["ip", "-d", "-j", "link", "show", "dev", "a0"]).ok()?).ok()?;
    let id = link.get(0)?.get("xdp")?.get("prog")?.get("id")?.as_u64()?;
    let out = Command::new("bpftool").args(["-j", "prog", "show", "id", &id.to_string()]).output().ok()?;
    let prog: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    prog.get("id")?;
    // bpftool leaves both fields out while they are zero.
    let field = |k: &str| prog.get(k).and_then(|v| v.as_u64()).unwrap_or(0);
    Some((field("run_time_ns"), field("run_cnt")))
}

/// The generator's own machine CPU per frame: frames dropped at the relay host's ingress (no
/// relay running), at a rate it reaches.
fn generator_cost(ctx: &Ctx, v6: bool, payload: usize) -> Result<f64> {
    let (relay, _) = lab::relay_addrs(v6, RELAY_PORT);
    let file = SessionsFile {
        relay,
        created_unix: 0,
        hold_until_unix: u64::MAX / 2,
        holder_pid: std::process::id(),
        sessions: (0..ctx.a.sessions)
            .map(|i| SessionEntry {
                id: format!("{:016x}", 0x5a00_0000_0000_0000u64 + i as u64),
                agent: SocketAddr::new(lab::agent_ip(v6), 40_000 + i as u16),
                connector: relay,
            })
            .collect(),
    };
    let cfg = ctx.trafgen_config(&file, payload, &format!("calibrate-{}", family(v6)))?;
    install_counter(ctx.lab, Host::Relay, "a0")?;
    let s = step(ctx, &cfg, Pace::Rate(200_000.0), Host::Relay, Forwarder(None));
    remove_counter(ctx.lab, Host::Relay)?;
    let s = s?;
    if s.sent == 0 {
        bail!("the generator sent nothing");
    }
    Ok(s.machine_cpu_s / s.sent as f64 * 1e6)
}

/// Restricts the calling thread (and the threads it starts meanwhile) to one CPU until dropped.
struct PinnedThread(Option<libc::cpu_set_t>);

impl PinnedThread {
    fn to(cpu: usize) -> PinnedThread {
        // SAFETY: sched_{get,set}affinity on this thread with cpu_set_t values we own.
        unsafe {
            let mut old: libc::cpu_set_t = std::mem::zeroed();
            if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut old) != 0 {
                return PinnedThread(None);
            }
            let mut one: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(cpu, &mut one);
            if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &one) != 0 {
                return PinnedThread(None);
            }
            PinnedThread(Some(old))
        }
    }
}

impl Drop for PinnedThread {
    fn drop(&mut self) {
        if let Some(old) = &self.0 {
            // SAFETY: restores the mask read in `to`.
            unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), old) };
        }
    }
}

/// The CPU the generator side uses: the other one than the forwarder's.
fn generator_cpu(relay_cpu: usize) -> usize {
    usize::from(relay_cpu == 0)
}

async fn latency(ctx: &Ctx<'_>, relay_pid: u32, payload: usize, rate: f64) -> Latency {
    // flood's sender and sink threads start from this thread: keep them off the relay's CPU.
    let _pin = PinnedThread::to(generator_cpu(ctx.a.relay_cpu));
    let mut args = FloodArgs {
        setup: ctx.latency_setup_args(),
        sessions: 4,
        rate: Some(rate),
        payload: payload.max(16),
        seconds: ctx.a.latency_seconds,
        count: None,
        batch: 32,
        gso: false,
        drain_ms: 300,
        direct: false,
        relay_pid: Some(relay_pid),
        json: None,
    };
    let mut out = Latency { rate_pps: rate, relay: None, direct: None, relay_loss: 0.0, generator_limited: false, note: None };
    match flood::run(&args).await {
        Ok(r) => {
            out.relay = r.latency_us;
            out.relay_loss = r.loss_ratio;
            out.generator_limited = r.generator_limited;
        }
        Err(e) => out.note = Some(format!("through the relay: {e:#}")),
    }
    args.direct = true;
    args.relay_pid = None;
    args.setup = ctx.latency_setup_args();
    match flood::run(&args).await {
        Ok(r) => out.direct = r.latency_us,
        Err(e) => out.note = Some(format!("direct path: {e:#}")),
    }
    out
}

/// Root and the tools the data-plane benchmark runs, with the package to install when one is missing.
pub fn check_tools() -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the data-plane benchmark needs root (network namespaces, trafgen, nftables)");
    }
    for (tool, pkg) in [("trafgen", "netsniff-ng"), ("nft", "nftables"), ("taskset", "util-linux"), ("ip", "iproute2")] {
        if !bins::on_path(tool) {
            bail!("{tool} is not installed (Debian: apt-get install {pkg}; scripts/install-deps.sh installs it)");
        }
    }
    Ok(())
}

pub async fn run(a: &DataplaneArgs) -> Result<DataplaneReport> {
    if a.variants.is_empty() || a.payloads.is_empty() {
        bail!("--variants and --payloads need at least one value each");
    }
    if let Some(p) = a.payloads.iter().find(|p| !(16..=1400).contains(*p)) {
        bail!("payload {p}: must be 16..=1400 bytes");
    }
    if !((0.2..=10.0).contains(&a.step_seconds) && a.budget > 0.0 && a.budget <= 1800.0) {
        bail!("--step-seconds must be in [0.2, 10] and --budget in (0, 1800]");
    }
    if !(0.0..=600.0).contains(&a.wait_quiet) {
        bail!("--wait-quiet must be in [0, 600] seconds");
    }
    if a.sessions == 0 || a.sessions > 1000 || !(0.0..=flood::MAX_SECONDS).contains(&a.latency_seconds) {
        bail!("--sessions must be in 1..=1000 and --latency-seconds in [0, {}]", flood::MAX_SECONDS);
    }
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    if a.relay_cpu >= cores {
        bail!("--relay-cpu {} does not exist on this {cores}-core machine", a.relay_cpu);
    }
    check_tools()?;
    let relay_bin = relay_under_test::relay_bin(a.relay_bin.as_deref())?;
    let help = Command::new(&relay_bin).arg("--help").output().context("running ztna-relay --help")?;
    let help = String::from_utf8_lossy(&help.stdout).into_owned();
    let started = Instant::now();
    let tmp = TempDir::new("bench")?;
    let pki = tmp.path().join("pki");
    pki_init(&relay_bin, &pki)?;
    let lab = lab_run::up(&a.lab_script, "zb")?;
    if a.rps {
        // As with a NIC whose interrupts land on the relay's core: the relay host's receive work
        // on the relay's CPU, the connector host's on the other one (the generator's).
        for (host, dev, cpu) in [(Host::Relay, "a0", a.relay_cpu), (Host::Conn, "c1", generator_cpu(a.relay_cpu))] {
            lab.steer_rx(host, dev, cpu).with_context(|| format!("setting receive steering (RPS) for {dev}"))?;
        }
    }
    let ctx = Ctx {
        a,
        lab: &lab,
        tmp: tmp.path().to_path_buf(),
        pki,
        relay_bin,
        src_mac: lab.mac(Host::Agent, "a1")?,
        dst_mac: lab.mac(Host::Relay, "a0")?,
        latency_runs: std::cell::Cell::new(0),
    };
    println!("-- lab {} up (agent 192.0.2.2 → relay 192.0.2.1 | 198.51.100.1 → connector 198.51.100.2)", lab.prefix);

    // The rows, in the order they run.
    let small = a.payloads.iter().copied().min().unwrap_or(64);
    let want_v6 = |v: Variant| !a.no_ipv6 && matches!(v, Variant::Baseline | Variant::Mmsg);
    let mut plan: Vec<(Variant, bool, usize)> = Vec::new();
    for &v in &a.variants {
        for &p in &a.payloads {
            plan.push((v, false, p));
        }
        if want_v6(v) {
            plan.push((v, true, small));
        }
    }
    let runnable = plan.iter().filter(|(v, _, _)| v.relay_flags(&help).is_ok()).count().max(1);
    let per_row = Duration::from_secs_f64(a.budget / runnable as f64);

    let mut gen_cost: HashMap<(bool, usize), f64> = HashMap::new();
    let mut generator_us_per_frame = BTreeMap::new();
    for &(v, v6, p) in &plan {
        if v.relay_flags(&help).is_ok() && !gen_cost.contains_key(&(v6, p)) {
            match generator_cost(&ctx, v6, p) {
                Ok(c) => {
                    println!("-- generator alone, {} {p} B: {c:.2} µs of machine CPU per frame", family(v6));
                    gen_cost.insert((v6, p), c);
                    generator_us_per_frame.insert(format!("{}/{p}", family(v6)), c);
                }
                Err(e) => eprintln!("ztna-bench: warning: measuring the generator alone: {e:#}"),
            }
        }
    }
    install_counter(&lab, Host::Conn, "c1")?;

    let search_started = Instant::now();
    let mut rows: Vec<Row> = plan.iter().map(|&(v, v6, p)| empty_row(v, v6, p, v.relay_flags(&help).err())).collect();
    let relay_variants: Vec<Variant> = a.variants.iter().copied().filter(|v| *v != Variant::Baseline).collect();
    let mut baseline_done = !a.variants.contains(&Variant::Baseline);
    // The baseline needs a relay to make its sessions: the first relay variant that starts
    // (or the mmsg relay, only for that, when no relay variant was asked for).
    let host_variants: Vec<Variant> = if relay_variants.is_empty() { vec![Variant::Mmsg] } else { relay_variants.clone() };
    for variant in host_variants {
        check_interrupted()?;
        let Ok(flags) = variant.relay_flags(&help) else { continue };
        let measure_self = relay_variants.contains(&variant);
        let relay = match start_relay(&ctx, variant, &flags) {
            Ok(r) => r,
            Err(e) => {
                for r in rows.iter_mut().filter(|r| r.variant == variant) {
                    r.error = Some(format!("{e:#}"));
                }
                continue;
            }
        };
        println!("-- {} running in {} (pid {})", variant.label(), lab.ns(Host::Relay), relay.pid());
        for v6 in [false, true] {
            let rows_here: Vec<usize> = (0..rows.len())
                .filter(|&i| {
                    rows[i].ipv6 == v6
                        && rows[i].error.is_none()
                        && ((measure_self && rows[i].variant == variant) || (!baseline_done && rows[i].variant == Variant::Baseline))
                })
                .collect();
            if rows_here.is_empty() {
                continue;
            }
            let holder = match Holder::start(&ctx, v6).await {
                Ok(h) => h,
                Err(e) => {
                    for &i in &rows_here {
                        rows[i].error = Some(format!("making sessions: {e:#}"));
                    }
                    continue;
                }
            };
            // Baseline rows first (beside this relay, which holds the sessions), then this relay's.
            let mut baseline: Option<Process> = None;
            for &i in &rows_here {
                let (rv, payload) = (rows[i].variant, rows[i].payload);
                let port = if rv == Variant::Baseline { BASELINE_PORT } else { RELAY_PORT };
                let tag = format!("{rv:?}-{}", family(v6));
                let cfg = match ctx.trafgen_config(&holder.file_for(port), payload, &tag) {
                    Ok(c) => c,
                    Err(e) => {
                        rows[i].error = Some(format!("{e:#}"));
                        continue;
                    }
                };
                if rv == Variant::Baseline && baseline.is_none() {
                    let sessions = ctx.tmp.join(format!("sessions-{tag}.json"));
                    match start_baseline(&ctx, &sessions, &tag) {
                        Ok(b) => baseline = Some(b),
                        Err(e) => {
                            rows[i].error = Some(format!("{e:#}"));
                            continue;
                        }
                    }
                }
                let gc = gen_cost.get(&(v6, payload)).copied();
                let fwd = Forwarder(Some(if rv == Variant::Baseline { baseline.as_ref().map_or(0, |b| b.pid()) } else { relay.pid() }));
                measure_row(&ctx, &mut rows[i], &cfg, per_row, gc, fwd, rv != Variant::Baseline);
            }
            if let Some(b) = baseline {
                b.stop(Duration::from_secs(5));
            }
            holder.close().await;
        }
        baseline_done = true;
        if measure_self && a.latency_seconds > 0.0 {
            for p in a.payloads.clone() {
                let Some(i) = rows.iter().position(|r| r.variant == variant && !r.ipv6 && r.payload == p) else { continue };
                let Some(max) = rows[i].max_pps else { continue };
                println!("-- latency, {} {p} B at {:.0} pps (half of the max):", variant.label(), max / 2.0);
                rows[i].latency = Some(latency(&ctx, relay.pid(), p, max / 2.0).await);
            }
        }
        let (exit, _) = relay.process.stop(Duration::from_secs(10));
        let (warnings, n) = ztna_testbed::process::log_warnings(relay.process.log(), 3);
        if n > 0 {
            println!("   relay stopped: {exit}; {n} WARN/ERROR log lines: {}", warnings.join(" | "));
        }
    }
    for r in rows.iter_mut().filter(|r| r.steps.is_empty() && r.error.is_none()) {
        r.error = Some("not run: no relay variant started to make its sessions".into());
    }
    let search_s = search_started.elapsed().as_secs_f64();
    drop(lab);

    let argv: Vec<String> = std::env::args().skip(1).collect();
    let report = DataplaneReport {
        date: sys::utc_now(),
        revision: sys::git_revision(),
        machine: sys::machine(),
        command: format!("{} && target/release/ztna-bench {}", relay_under_test::BUILD, argv.join(" ")),
        relay_cpu: a.relay_cpu,
        rps: a.rps,
        step_seconds: a.step_seconds,
        sessions: a.sessions,
        relay_args: format!(
            "nice -n {NICE} taskset -c {} ztna-relay {} (ZTNA_LOG=warn) plus the variant's flags",
            a.relay_cpu,
            relay_command_line(Path::new("PKI"), &[]).join(" ")
        ),
        generator_us_per_frame,
        rows,
        search_s,
        total_s: started.elapsed().as_secs_f64(),
    };
    Ok(report)
}
