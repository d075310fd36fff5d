//! Time to a direct path (`ztna-bench direct`): the NAT lab of `deploy/lab/nat.sh` with a one-way
//! delay on each router's WAN link (the user-space delay line: this kernel has no netem), the
//! real relay, connector and agent. Each run starts a fresh agent, opens one tunnel with one
//! request and reads how long after the tunnel's first packet it moved to a direct path (the
//! agent's own measure, `after=` of its "moved to a direct path" line: from creating the QUIC
//! connection to the migration, after which the next packet goes direct). Root only.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use serde::Serialize;
use ztna_testbed::natlab::{self, NatHost, NatLab, NatLabConfig, NatType};
use ztna_testbed::{TempDir, process::wait_for_log};

use crate::relay_under_test::{self, sibling_bin};

#[derive(Debug, Clone, clap::Args)]
pub struct DirectArgs {
    /// Tunnels to open, one agent each.
    #[arg(long, default_value_t = 50)]
    pub runs: usize,
    #[command(flatten)]
    pub lab: NatPairArgs,
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// The NAT lab a direct-path benchmark runs in: the two router types and the WAN delay.
#[derive(Debug, Clone, clap::Args)]
pub struct NatPairArgs {
    /// One-way delay on each router's WAN link, in ms (0: none).
    #[arg(long, default_value_t = 10)]
    pub delay_ms: u32,
    #[arg(long, default_value = "port-restricted")]
    pub agent_nat: NatType,
    #[arg(long, default_value = "port-restricted")]
    pub conn_nat: NatType,
    /// `deploy/lab/nat.sh` (default: the workspace's).
    #[arg(long)]
    pub nat_script: Option<PathBuf>,
    /// The connector sends direct traffic from a socket of its own on this port
    /// (`--p2p-socket`); default: from its one socket.
    #[arg(long)]
    pub p2p_port: Option<u16>,
}

impl NatPairArgs {
    pub fn config(&self) -> NatLabConfig {
        NatLabConfig { delay_ms: self.delay_ms, ..NatLabConfig::new(self.agent_nat, self.conn_nat) }
    }

    /// The connector's arguments beyond the lab's defaults.
    pub fn connector_args(&self) -> Vec<String> {
        self.p2p_port.map(|p| vec!["--p2p-socket".to_string(), p.to_string()]).unwrap_or_default()
    }
}

#[derive(Debug, Serialize)]
pub struct DirectResult {
    pub runs: usize,
    pub direct: usize,
    pub delay_ms: u32,
    pub agent_nat: String,
    pub conn_nat: String,
    /// The connector's separate peer-to-peer port, if it used one.
    pub p2p_port: Option<u16>,
    /// Milliseconds from the tunnel's first packet to the move, per run that went direct.
    pub times_ms: Vec<f64>,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub min_ms: f64,
    pub max_ms: f64,
}

const RELAY: &str = "203.0.113.10:4433";
const ADMIN: &str = "127.0.0.1:9090";

/// The NAT lab with the relay and a connector serving `web` at `backend` (which the caller
/// starts in the connector host, `start_backend` receiving the lab and the work directory).
pub(crate) struct NatLabRun {
    pub lab: NatLab,
    pub dir: PathBuf,
    pub agent_bin: PathBuf,
    /// The relay's process index in the lab.
    pub relay: usize,
    pub connector: usize,
    _tmp: TempDir,
}

impl NatLabRun {
    pub(crate) fn start(
        tag: &str,
        cfg: &NatLabConfig,
        script: Option<&Path>,
        backend: &str,
        relay_extra: &[&str],
        conn_extra: &[String],
        start_backend: impl FnOnce(&mut NatLab, &Path) -> Result<()>,
    ) -> Result<NatLabRun> {
        crate::interrupt::catch_stop_signals();
        let relay_bin = relay_under_test::relay_bin(None)?;
        let (agent_bin, connector_bin) = (sibling_bin("ztna-agent", None)?, sibling_bin("ztna-connector", None)?);
        let tmp = TempDir::new(&format!("bench-{tag}"))?;
        let dir = tmp.path().to_path_buf();
        relay_under_test::pki_init(&relay_bin, &dir, &[])?;
        let script = script.map(Path::to_path_buf).unwrap_or_else(natlab::nat_script);
        let mut lab = NatLab::up_tagged(&script, tag, cfg)?;
        let d = dir.display().to_string();

        let relay_log = dir.join("relay.log");
        let mut relay_args = ztna_testbed::relay::args(&dir, "[::]:4433", ADMIN, ztna_testbed::relay::Workers::Unpinned(2));
        relay_args.extend(relay_extra.iter().map(|a| a.to_string()));
        let relay_args: Vec<&str> = relay_args.iter().map(String::as_str).collect();
        let relay = lab.spawn(NatHost::Relay, &relay_bin, &relay_args, &relay_log)?;
        wait_for_log(&relay_log, "relay started", Duration::from_secs(10))?;
        start_backend(&mut lab, &dir)?;
        let conn_log = dir.join("connector.log");
        let service = format!("web={backend}");
        let mut conn_args = vec!["--relay", RELAY, "--direct", "on", "--pki-dir", &d, "--name", "web-1", "--service", &service];
        conn_args.extend(conn_extra.iter().map(String::as_str));
        let connector = lab.spawn(NatHost::Conn, &connector_bin, &conn_args, &conn_log)?;
        wait_for_log(&conn_log, "registered", Duration::from_secs(10))?;
        Ok(NatLabRun { lab, dir, agent_bin, relay, connector, _tmp: tmp })
    }

    /// Starts an agent forwarding 127.0.0.1:`port` to `web`; returns its process index and log.
    pub(crate) fn agent(&mut self, name: &str, port: u16, direct: bool) -> Result<(usize, PathBuf)> {
        let (d, log) = (self.dir.display().to_string(), self.dir.join(format!("agent-{name}.log")));
        let forward = format!("{port}:web");
        let direct = if direct { "on" } else { "off" };
        let agent_args = ["run", "--relay", RELAY, "--direct", direct, "--pki-dir", &d, "--name", "alice", "-L", &forward];
        let idx = self.lab.spawn(NatHost::Agent, &self.agent_bin, &agent_args, &log)?;
        wait_for_log(&log, "TCP forward ready", Duration::from_secs(10))?;
        Ok((idx, log))
    }

    /// The relay's metrics (from its admin endpoint on the relay host's loopback).
    pub(crate) fn relay_metrics(&self) -> Result<String> {
        self.lab.metrics_text(NatHost::Relay, ADMIN.parse()?)
    }
}

/// Where [`hello_backend`] listens.
pub(crate) const HELLO_BACKEND: &str = "198.51.100.2:8000";

/// A web server in the connector host with one small file, `/hello`.
pub(crate) fn hello_backend(lab: &mut NatLab, dir: &Path) -> Result<()> {
    let www = dir.join("www");
    std::fs::create_dir_all(&www)?;
    std::fs::write(www.join("hello"), "hello\n")?;
    let backend_log = dir.join("backend.log");
    let www = www.display().to_string();
    // `python3 -m http.server`, but with a listen backlog for a storm of connections (its
    // default of 5 drops SYNs, and each drop costs the client a retransmission second).
    let server = "import functools, http.server, sys\n\
        class Server(http.server.ThreadingHTTPServer): request_queue_size = 4096\n\
        handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=sys.argv[1])\n\
        print('Serving HTTP', flush=True)\n\
        Server(('198.51.100.2', 8000), handler).serve_forever()";
    lab.spawn(NatHost::Conn, Path::new("python3"), &["-c", server, &www], &backend_log)?;
    wait_for_log(&backend_log, "Serving HTTP", Duration::from_secs(10))
}

pub fn run(a: &DirectArgs) -> Result<DirectResult> {
    let mut run = NatLabRun::start("bd", &a.lab.config(), a.lab.nat_script.as_deref(), HELLO_BACKEND, &[], &a.lab.connector_args(), hello_backend)?;

    let mut times_ms = Vec::new();
    for i in 0..a.runs {
        crate::interrupt::check_interrupted()?;
        let (idx, log) = run.agent(&i.to_string(), 8080, true)?;
        let o = run.lab.output(NatHost::Agent, &["curl", "-sS", "--max-time", "10", "-o", "/dev/null", "http://127.0.0.1:8080/hello"])?;
        if !o.status.success() {
            bail!("run {i}: curl failed: {}", String::from_utf8_lossy(&o.stderr));
        }
        let deadline = Instant::now() + Duration::from_secs(8);
        let mut took = None;
        while took.is_none() && Instant::now() < deadline {
            took = std::fs::read_to_string(&log)?.lines().find_map(moved_after_ms);
            std::thread::sleep(Duration::from_millis(20));
        }
        run.lab.process(idx).stop(Duration::from_secs(3));
        match took {
            Some(ms) => times_ms.push(ms),
            None => eprintln!("run {i}: no direct path within 8 s"),
        }
    }
    let mut sorted = times_ms.clone();
    sorted.sort_by(f64::total_cmp);
    let q = |p: f64| sorted.get(((sorted.len() as f64 - 1.0) * p).round() as usize).copied().unwrap_or(f64::NAN);
    Ok(DirectResult {
        runs: a.runs,
        direct: times_ms.len(),
        delay_ms: a.lab.delay_ms,
        agent_nat: a.lab.agent_nat.to_string(),
        conn_nat: a.lab.conn_nat.to_string(),
        p2p_port: a.lab.p2p_port,
        p50_ms: q(0.5),
        p99_ms: q(0.99),
        min_ms: sorted.first().copied().unwrap_or(f64::NAN),
        max_ms: sorted.last().copied().unwrap_or(f64::NAN),
        times_ms,
    })
}

/// `after=35.03ms` (or `after=1.2s`) of an agent's "moved to a direct path" line, in ms.
pub(crate) fn moved_after_ms(line: &str) -> Option<f64> {
    if !line.contains("tunnel moved to a direct path") {
        return None;
    }
    let v = line.split("after=").nth(1)?.split_whitespace().next()?;
    let (num, scale) = if let Some(n) = v.strip_suffix("ms") {
        (n, 1.0)
    } else if let Some(n) = v.strip_suffix("µs") {
        (n, 0.001)
    } else {
        (v.strip_suffix('s')?, 1000.0)
    };
    num.parse::<f64>().ok().map(|n| n * scale)
}

pub fn print(r: &DirectResult) {
    println!(
        "time to a direct path, {} × {}, {} ms one-way on each WAN link (so {} ms round trip agent↔relay, {} ms agent↔connector):",
        r.agent_nat,
        r.conn_nat,
        r.delay_ms,
        2 * r.delay_ms,
        4 * r.delay_ms
    );
    println!(
        "  {} of {} tunnels went direct; p50 {:.1} ms, p99 {:.1} ms, min {:.1} ms, max {:.1} ms",
        r.direct, r.runs, r.p50_ms, r.p99_ms, r.min_ms, r.max_ms
    );
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_the_agents_after_field() {
        let l = "INFO ztna_client::engine: tunnel moved to a direct path session=01 peer=203.0.113.3:1 after=35.034865ms";
        assert_eq!(super::moved_after_ms(l), Some(35.034865));
        assert_eq!(super::moved_after_ms(&l.replace("35.034865ms", "1.5s")), Some(1500.0));
        assert_eq!(super::moved_after_ms("tunnel back on the relay path"), None);
    }
}
