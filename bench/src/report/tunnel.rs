//! The tunnel benchmark's results: the console summary and the `bench:tunnel` section of
//! docs/BENCHMARKS.md.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Result;

use super::markdown::{self, Section, measured, section_start};
use crate::tunnel::{RelayData, ThroughputRun, TunnelReport};

pub const SECTION: Section = Section {
    begin: "<!-- bench:tunnel:begin -->",
    end: "<!-- bench:tunnel:end -->",
    heading: "## End-to-end tunnel",
};
const BEGIN: &str = SECTION.begin;
const END: &str = SECTION.end;

/// Warnings when CPU charged to none of the measured processes (other processes, interrupts and
/// softirq, e.g. the veth links' packet processing) exceeded 10 % of the wall time in a phase.
fn disturbances(r: &TunnelReport) -> Vec<String> {
    let mut out = Vec::new();
    let t = &r.throughput;
    let tunnel_other = t.tunnel_cpu.other_s();
    if tunnel_other > 0.1 * t.tunnel_wall_s {
        out.push(format!("{tunnel_other:.1} s during the {:.1} s of tunnel throughput runs", t.tunnel_wall_s));
    }
    let direct_other = t.direct_cpu.other_s();
    if direct_other > 0.1 * t.direct_wall_s {
        out.push(format!("{direct_other:.1} s during the {:.1} s of direct throughput runs", t.direct_wall_s));
    }
    let l = &r.latency;
    let lat_other = l.cpu.other_s();
    let lat_wall = l.tunnel_wall_s + l.direct.mean_us * l.direct.exchanges as f64 / 1e6;
    if lat_other > 0.1 * lat_wall {
        out.push(format!("{lat_other:.1} s during the {lat_wall:.1} s of latency measurement"));
    }
    out
}

fn cores(cpu: f64, wall: f64) -> f64 {
    if wall > 0.0 { cpu / wall } else { 0.0 }
}

fn drops(d: &RelayData) -> String {
    if d.dropped.is_empty() {
        "0".into()
    } else {
        d.dropped.iter().map(|(k, v)| format!("{v} {k}")).collect::<Vec<_>>().join(", ")
    }
}

pub fn print(r: &TunnelReport) {
    let t = &r.throughput;
    let l = &r.latency;
    println!("== tunnel: one TCP stream through agent -> relay -> connector, and direct, on the lab topology");
    let c = &t.tunnel_cpu;
    let rows: Vec<(&str, String)> = vec![
        (
            "first exchange, new tunnel",
            format!("{:.1} ms ({} relay frames)", r.first_exchange_ms, r.first_exchange_relay_frames),
        ),
        ("throughput direct", format!("{:.1} MB/s", t.direct_mb_per_s)),
        (
            "throughput tunnel",
            format!(
                "{:.1} MB/s (per second {:.1} .. {:.1}, {} stalled seconds)",
                t.tunnel_mb_per_s, t.tunnel_second_min_mb, t.tunnel_second_max_mb, t.tunnel_stalled_seconds
            ),
        ),
        ("ratio tunnel / direct", format!("{:.4} ({:.2} %)", t.ratio, t.ratio * 100.0)),
        (
            "CPU during tunnel runs",
            format!(
                "relay {:.2} s ({:.2} cores), agent {:.2} s ({:.2}), connector {:.2} s ({:.2}), bench {:.2} s ({:.2}), \
                 other {:.2} s, over {:.2} s",
                c.relay_s,
                cores(c.relay_s, t.tunnel_wall_s),
                c.agent_s,
                cores(c.agent_s, t.tunnel_wall_s),
                c.connector_s,
                cores(c.connector_s, t.tunnel_wall_s),
                c.bench_s,
                cores(c.bench_s, t.tunnel_wall_s),
                c.other_s(),
                t.tunnel_wall_s
            ),
        ),
        (
            "relay during tunnel runs",
            format!(
                "{} frames forwarded ({:.0} B avg datagram), drops {}",
                t.tunnel_relay.frames_forwarded,
                t.tunnel_relay.received_bytes as f64 / t.tunnel_relay.packets_received.max(1) as f64,
                drops(&t.tunnel_relay)
            ),
        ),
        (
            "UDP drops during tunnel runs",
            format!(
                "relay socket {}, agent socket {}, connector socket {} (the three hosts: {} receive-buffer drops of {} in)",
                t.tunnel_socket_drops.relay,
                t.tunnel_socket_drops.agent,
                t.tunnel_socket_drops.connector,
                t.tunnel_udp.rcvbuf_errors,
                t.tunnel_udp.in_datagrams
            ),
        ),
        (
            "latency direct p50/p99/p99.9",
            format!("{:.1} / {:.1} / {:.1} µs (max {:.0})", l.direct.p50_us, l.direct.p99_us, l.direct.p999_us, l.direct.max_us),
        ),
        (
            "latency tunnel p50/p99/p99.9",
            format!("{:.1} / {:.1} / {:.1} µs (max {:.0})", l.tunnel.p50_us, l.tunnel.p99_us, l.tunnel.p999_us, l.tunnel.max_us),
        ),
        ("added latency p50 / p99", format!("{:.1} / {:.1} µs", l.added_p50_us, l.added_p99_us)),
        (
            "CPU per tunnel exchange",
            format!(
                "relay {:.1} µs, agent {:.1} µs, connector {:.1} µs; {:.2} relay frames",
                l.relay_cpu_us_per_exchange, l.agent_cpu_us_per_exchange, l.connector_cpu_us_per_exchange,
                l.relay_frames_per_exchange
            ),
        ),
    ];
    for (k, v) in rows {
        println!("  {k:<32} {v}");
    }
    let d = disturbances(r);
    if !d.is_empty() {
        println!(
            "  WARNING: CPU not charged to the measured processes (other processes, interrupts, softirq): {}: \
             the figures may be disturbed",
            d.join("; ")
        );
    }
}

/// The tunnel section of docs/BENCHMARKS.md, markers included.
pub fn render(r: &TunnelReport) -> String {
    let m = &r.machine;
    let t = &r.throughput;
    let l = &r.latency;
    let mut s = String::new();
    section_start(&mut s, BEGIN, "`ztna-bench tunnel` (and `standard`)", "End-to-end tunnel: one TCP stream, relay path, lab topology");
    let _ = writeln!(
        s,
        "{}. Topology: the lab of `deploy/lab/lab.sh` \
         (network namespaces on this machine joined by veth pairs: agent host 192.0.2.2 — relay host 192.0.2.1 | \
         198.51.100.1 — connector host 198.51.100.2), each process in its host. Path: `ztna-bench` (its socket in \
         the agent host) → TCP over the agent host's loopback → agent `alice` (local forward) → QUIC stream in the \
         end-to-end tunnel, in DATA frames over UDP → veth → relay (1 worker, unpinned) in the relay host → veth → \
         connector `web-1` → TCP over the connector host's loopback → a tokio backend inside `ztna-bench` (its \
         listening socket in the connector host). Direct: `ztna-bench` in the agent host → TCP → the same backend, \
         routed by the relay host's kernel (IP forwarding, the same two veth pairs, no relay process). Release \
         builds; relay logging at `warn`, agent and connector at `info` (a few lines per connection).",
        measured(&r.date, &r.revision, m)
    );
    let _ = writeln!(s);
    let _ = writeln!(
        s,
        "**Read with care:** the hosts are network namespaces on one machine: on {} cores the writer, agent, \
         relay, connector and backend all compete for CPU, and the veth links have no propagation delay and no \
         bandwidth limit: the tunnel figures are what this machine sustains for all of them together, and the \
         direct figures are kernel TCP forwarded by the relay host's kernel at its best. The CPU seconds per \
         process (utime+stime from /proc/PID/stat over the tunnel runs) show where the time goes.",
        m.cores
    );
    let _ = writeln!(s);
    let d = disturbances(r);
    if !d.is_empty() {
        let _ = writeln!(
            s,
            "**Possibly disturbed run:** CPU charged to none of the measured processes (other processes on the \
             machine, and kernel interrupt and softirq work such as the veth links' packet processing, which is \
             part of both paths here) exceeded 10 % of the wall time: {}; compare with care.",
            d.join("; ")
        );
        let _ = writeln!(s);
    }
    let _ = writeln!(s, "#### Throughput: one TCP stream, writer as fast as it can");
    let _ = writeln!(s);
    let _ = writeln!(s, "| path | runs | MB/s | per run | per-second min–max | drain after stop |");
    let _ = writeln!(s, "|---|--:|--:|--:|--:|--:|");
    for (path, mb) in [("direct", t.direct_mb_per_s), ("tunnel", t.tunnel_mb_per_s)] {
        let runs: Vec<&ThroughputRun> = t.runs.iter().filter(|r| r.path == path).collect();
        let per_run: Vec<String> = runs.iter().map(|r| format!("{:.1}", r.mb_per_s)).collect();
        let secs: Vec<f64> = runs.iter().flat_map(|r| r.per_second_mb.iter().copied()).collect();
        let lo = secs.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = secs.iter().copied().fold(0.0, f64::max);
        let drain = runs.iter().map(|r| r.drain_s).fold(0.0, f64::max);
        let _ = writeln!(
            s,
            "| {path} | {} × {:.0} s | **{:.1}** | {} | {:.1}–{:.1} | ≤ {:.2} s |",
            runs.len(),
            t.seconds,
            mb,
            per_run.join(", "),
            if lo.is_finite() { lo } else { 0.0 },
            hi,
            drain
        );
    }
    let _ = writeln!(s);
    let c = &t.tunnel_cpu;
    let w = t.tunnel_wall_s;
    let _ = writeln!(
        s,
        "**Tunnel / direct: {:.4} ({:.2} %).** MB = 10⁶ bytes. Runs alternated direct, tunnel, direct, tunnel, \
         … in one process; each wrote for {:.0} s, then half-closed, and its rate is the bytes the backend \
         received (it reports its exact count at EOF, checked against the bytes written) over the time from the \
         first write until that count came back, so data still buffered when the writer stopped is counted with \
         the time it took to arrive (*drain*). {} whole seconds of the tunnel runs moved no data.",
        t.ratio,
        t.ratio * 100.0,
        t.seconds,
        t.tunnel_stalled_seconds
    );
    let _ = writeln!(s);
    let _ = writeln!(s, "CPU during the tunnel runs ({w:.1} s of wall time in all):");
    let _ = writeln!(s);
    let _ = writeln!(s, "| relay | agent | connector | ztna-bench (writer + backend) | other | machine busy |");
    let _ = writeln!(s, "|--:|--:|--:|--:|--:|--:|");
    let _ = writeln!(
        s,
        "| {:.2} s ({:.2} cores) | {:.2} s ({:.2} cores) | {:.2} s ({:.2} cores) | {:.2} s ({:.2} cores) | {:.2} s | {:.2} of {} cores |",
        c.relay_s,
        cores(c.relay_s, w),
        c.agent_s,
        cores(c.agent_s, w),
        c.connector_s,
        cores(c.connector_s, w),
        c.bench_s,
        cores(c.bench_s, w),
        c.other_s(),
        cores(c.machine_busy_s, w),
        m.cores
    );
    let _ = writeln!(s);
    let d = &t.tunnel_relay;
    let tb: u64 = t.runs.iter().filter(|r| r.path == "tunnel").map(|r| r.bytes).sum();
    let _ = writeln!(
        s,
        "The relay forwarded {} DATA frames in the tunnel runs ({:.0} bytes per received datagram on average, \
         {:.1} µs of relay CPU per forwarded frame; {:.0} frames per MB of user data, both directions); the relay \
         dropped {}. Datagrams dropped by the kernel for a full socket receive buffer (/proc/net/udp, per socket) \
         over the same runs: relay {}, agent {}, connector {} (all sockets of the three hosts: {} of {} received).",
        d.frames_forwarded,
        d.received_bytes as f64 / d.packets_received.max(1) as f64,
        c.relay_s * 1e6 / d.frames_forwarded.max(1) as f64,
        d.frames_forwarded as f64 / (tb as f64 / 1e6).max(1e-9),
        drops(d),
        t.tunnel_socket_drops.relay,
        t.tunnel_socket_drops.agent,
        t.tunnel_socket_drops.connector,
        t.tunnel_udp.rcvbuf_errors,
        t.tunnel_udp.in_datagrams
    );
    let _ = writeln!(s);
    let _ = writeln!(
        s,
        "#### Added latency: {}-byte request, {}-byte echo, sequential on one connection",
        l.size, l.size
    );
    let _ = writeln!(s);
    let _ = writeln!(s, "| path | exchanges | p50 | p90 | p99 | p99.9 | max | mean |");
    let _ = writeln!(s, "|---|--:|--:|--:|--:|--:|--:|--:|");
    for (path, x) in [("direct", &l.direct), ("tunnel", &l.tunnel)] {
        let _ = writeln!(
            s,
            "| {path} | {} | {:.1} µs | {:.1} µs | {:.1} µs | {:.1} µs | {:.0} µs | {:.1} µs |",
            x.exchanges, x.p50_us, x.p90_us, x.p99_us, x.p999_us, x.max_us, x.mean_us
        );
    }
    let _ = writeln!(
        s,
        "| **added by the tunnel** | | **{:.1} µs** | {:.1} µs | **{:.1} µs** | {:.1} µs | | {:.1} µs |",
        l.added_p50_us,
        l.tunnel.p90_us - l.direct.p90_us,
        l.added_p99_us,
        l.added_p999_us,
        l.tunnel.mean_us - l.direct.mean_us
    );
    let _ = writeln!(s);
    let _ = writeln!(
        s,
        "One connection per path, opened before the measurement and warmed up with {} exchanges each; then blocks \
         of {} exchanges alternating direct and tunnel; round-trip time from before the request's write until the \
         whole echo was read (hdrhistogram, ns). Through the tunnel: {:.0} exchanges/s; per exchange the relay \
         used {:.1} µs of CPU, the agent {:.1} µs and the connector {:.1} µs, and the relay forwarded {:.2} DATA frames.",
        l.warmup,
        l.block,
        l.tunnel_exchanges_per_s,
        l.relay_cpu_us_per_exchange,
        l.agent_cpu_us_per_exchange,
        l.connector_cpu_us_per_exchange,
        l.relay_frames_per_exchange
    );
    let _ = writeln!(s);
    let _ = writeln!(
        s,
        "First exchange through a new tunnel (the agent asks the relay for a session, the tunnel's QUIC + mTLS \
         handshake runs through the relay, the connector connects to the backend, one echo): {:.1} ms, \
         {} DATA frames forwarded by the relay.",
        r.first_exchange_ms, r.first_exchange_relay_frames
    );
    let _ = writeln!(s);
    let mut notes: Vec<String> = Vec::new();
    let rr = &r.relay_run;
    if rr.log_warning_count > 0 || !rr.exit.contains("exit status: 0") {
        notes.push(format!("relay: {}, {} WARN/ERROR log lines", rr.exit, rr.log_warning_count));
    }
    for c in &r.clients {
        if c.log_warning_count > 0 {
            let first = c.log_warnings.first().map(|w| format!(" (first: `{w}`)")).unwrap_or_default();
            notes.push(format!("{}: {} WARN/ERROR log lines{first}", c.what, c.log_warning_count));
        }
    }
    if notes.is_empty() {
        let _ = writeln!(s, "No WARN/ERROR lines in the relay's, agent's or connector's logs during the run.");
    } else {
        let _ = writeln!(s, "Logs: {}.", notes.join("; "));
    }
    let _ = writeln!(s);
    let _ = writeln!(s, "Processes: `{}`; `{}`; `{}`.", r.relay_args, r.connector_args, r.agent_args);
    let _ = writeln!(s);
    let _ = writeln!(
        s,
        "Reproduce (from the workspace root, as root: it creates the lab's network namespaces under a prefix of its \
         own and removes them at the end; stops by itself):"
    );
    let _ = writeln!(s);
    let _ = writeln!(s, "```sh\n{}\n```", r.command.trim_end());
    let _ = writeln!(s, "{END}");
    s
}

/// Rewrites the tunnel section of `path` (appended with a heading if the markers are missing).
pub fn write_section(path: &Path, r: &TunnelReport) -> Result<()> {
    markdown::write(path, &[(SECTION, render(r))])
}
