//! The control-plane part of the standard set: the `bench:control-plane` section of
//! docs/BENCHMARKS.md (handshakes with and without Retry, idle connections' memory).

use std::fmt::Write as _;

use super::markdown::{Section, measured, section_start};
use crate::control_plane::ControlPlaneReport;
use crate::handshakes::{self, HandshakeReport};

pub const SECTION: Section = Section {
    begin: "<!-- bench:control-plane:begin -->",
    end: "<!-- bench:control-plane:end -->",
    heading: "## Control plane",
};
const BEGIN: &str = SECTION.begin;
const END: &str = SECTION.end;

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

pub fn render(r: &ControlPlaneReport) -> String {
    let m = &r.machine;
    let mut s = String::new();
    section_start(&mut s, BEGIN, "`ztna-bench standard`", "Control plane: handshakes and idle connections");
    let _ = writeln!(
        s,
        "{}. Topology: the lab of `deploy/lab/lab.sh` \
         (network namespaces on this machine joined by veth pairs: agent host 192.0.2.2 — relay host 192.0.2.1). \
         Relay: the release build in the relay host, 1 worker, unpinned, per-IP handshake limit raised out of \
         the way, logging at `{}`; load generator: `ztna-bench` (tokio, one UDP socket per connection, identity \
         `agent/alice`) with its sockets in the agent host, so every handshake crosses the veth pair and the \
         relay host's kernel stack, but runs on the same machine and CPUs as the relay; client trust store: {}.",
        measured(&r.date, &r.revision, m), r.relay_log, r.client_trust_store
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
        r.throughput_retry.concurrency,
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

