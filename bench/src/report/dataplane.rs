//! The data-plane benchmark's results: the console tables and the `bench:dataplane` section
//! of docs/BENCHMARKS.md.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Result;

use super::markdown::{self, Section, measured, section_start};
use crate::dataplane::{DataplaneReport, MAX_LOSS, NICE, Row, START_PPS, Variant, family};
use crate::flood::LatencyUs;

pub const SECTION: Section = Section {
    begin: "<!-- bench:dataplane:begin -->",
    end: "<!-- bench:dataplane:end -->",
    heading: "## Data plane: forwarding rate on the lab topology",
};
const BEGIN: &str = SECTION.begin;
const END: &str = SECTION.end;

fn pps(v: Option<f64>) -> String {
    v.map(|v| format!("{:.0}", v)).unwrap_or_else(|| "-".into())
}

fn us(l: &Option<LatencyUs>, f: impl Fn(&LatencyUs) -> f64) -> String {
    l.as_ref().map(|l| format!("{:.0} µs", f(l))).unwrap_or_else(|| "-".into())
}

fn baseline_of<'a>(r: &'a DataplaneReport, row: &Row) -> Option<&'a Row> {
    r.rows.iter().find(|b| b.variant == Variant::Baseline && b.ipv6 == row.ipv6 && b.payload == row.payload)
}

fn ratio(r: &DataplaneReport, row: &Row) -> String {
    if row.variant == Variant::Baseline {
        return "1.00".into();
    }
    match (row.max_pps, baseline_of(r, row)) {
        (Some(m), Some(b)) => match b.max_pps.filter(|&x| x > 0.0) {
            Some(bp) => {
                // A generator-limited side gives only a lower (or upper) bound.
                let bound = match (row.generator_limited, b.generator_limited) {
                    (true, false) => "≥ ",
                    (false, true) => "≤ ",
                    (true, true) => "? ",
                    (false, false) => "",
                };
                format!("{bound}{:.2}", m / bp)
            }
            None => "-".into(),
        },
        _ => "-".into(),
    }
}

fn note(row: &Row) -> String {
    let mut n = Vec::new();
    if let Some(e) = &row.error {
        // The first line says what failed; a log's last line usually says why.
        let lines: Vec<&str> = e.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
        n.push(match lines.as_slice() {
            [] => String::new(),
            [one] => one.to_string(),
            [first, .., last] => format!("{first} … {last}"),
        });
    }
    if row.generator_limited {
        let paced = row.steps.iter().rfind(|s| s.target_pps.is_some() && s.generator_limited);
        let flat = row.steps.iter().rfind(|s| s.target_pps.is_none());
        let mut t = "**GENERATOR LIMITED**".to_string();
        if let Some(p) = paced {
            let _ = write!(t, ": trafgen paced {:.0} of {:.0} pps asked", p.offered_pps, p.target_pps.unwrap_or_default());
        }
        match flat {
            Some(f) if f.loss < MAX_LOSS => {
                let _ = write!(t, "; flat out it offered {:.0} pps and {:.2}% were lost: the max is higher", f.offered_pps, f.loss * 100.0);
            }
            Some(f) => {
                let _ = write!(
                    t,
                    "; flat out it offered {:.0} pps and {:.1}% were lost: the max lies in between, where trafgen cannot pace",
                    f.offered_pps,
                    f.loss * 100.0
                );
            }
            None => t.push_str("; the max is higher"),
        }
        n.push(t);
    }
    if row.background_cores.is_some_and(|c| c > 0.25) {
        n.push("other load on the machine: figures disturbed".into());
    }
    if !row.relay_dropped.is_empty() {
        let d: Vec<String> = row.relay_dropped.iter().map(|(k, v)| format!("{v} {k}")).collect();
        n.push(format!("relay drops: {}", d.join(", ")));
    }
    n.join("; ").replace('|', "\\|")
}

pub fn print(r: &DataplaneReport) {
    println!();
    println!("{}", table(r));
    println!("{}", latency_table(r));
}

fn table(r: &DataplaneReport) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "| variant | IP | payload | max rate at < 1% loss (pps) | delivered (pps) | Gbps (UDP payload) | × baseline | loss there | process CPU / frame | machine CPU / frame | same, less generator and other load | other load | steps | note |"
    );
    let _ = writeln!(s, "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|");
    for row in &r.rows {
        let gbps = row.delivered_pps.map(|p| format!("{:.3}", p * (row.payload + 9) as f64 * 8.0 / 1e9)).unwrap_or_else(|| "-".into());
        let _ = writeln!(
            s,
            "| {} | {} | {} B | **{}** | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            row.variant.label(),
            family(row.ipv6),
            row.payload,
            pps(row.max_pps),
            pps(row.delivered_pps),
            gbps,
            ratio(r, row),
            row.loss_at_max.map(|l| format!("{:.2}%", l * 100.0)).unwrap_or_else(|| "-".into()),
            match (row.forwarder_cpu_us_per_frame, row.xdp_program_ns) {
                (_, Some(ns)) => format!("{:.3} µs (XDP program)", ns / 1000.0),
                (Some(c), None) => format!("{c:.2} µs"),
                (None, None) => "-".into(),
            },
            row.machine_cpu_us_per_frame.map(|c| format!("{c:.2} µs")).unwrap_or_else(|| "-".into()),
            row.cpu_us_per_frame.map(|c| format!("{c:.2} µs")).unwrap_or_else(|| "-".into()),
            row.background_cores.map(|c| format!("{c:.2} cores")).unwrap_or_else(|| "-".into()),
            row.steps.len(),
            note(row),
        );
    }
    s
}

fn latency_table(r: &DataplaneReport) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "| variant | payload | rate (half the max) | relay p50 | relay p99 | direct p50 | direct p99 | **added p50** | **added p99** | loss | note |");
    let _ = writeln!(s, "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|");
    for row in r.rows.iter().filter(|row| row.latency.is_some()) {
        let Some(l) = &row.latency else { continue };
        let added = |f: fn(&LatencyUs) -> f64| match (&l.relay, &l.direct) {
            (Some(a), Some(b)) => format!("{:.0} µs", f(a) - f(b)),
            _ => "-".into(),
        };
        let mut notes: Vec<String> = l.note.iter().cloned().collect();
        if l.generator_limited {
            notes.push("GENERATOR LIMITED: flood did not reach the rate".into());
        }
        let _ = writeln!(
            s,
            "| {} | {} B | {:.0} pps | {} | {} | {} | {} | **{}** | **{}** | {:.2}% | {} |",
            row.variant.label(),
            row.payload,
            l.rate_pps,
            us(&l.relay, |x| x.p50),
            us(&l.relay, |x| x.p99),
            us(&l.direct, |x| x.p50),
            us(&l.direct, |x| x.p99),
            added(|x| x.p50),
            added(|x| x.p99),
            l.relay_loss * 100.0,
            notes.join("; ").replace('|', "\\|"),
        );
    }
    s
}

/// What one XDP-forwarded frame costs next to one the baseline forwards, where the rate
/// search cannot tell (the generator runs out first).
fn xdp_cost(r: &DataplaneReport) -> Option<String> {
    let lines: Vec<String> = r
        .rows
        .iter()
        .filter_map(|row| {
            let ns = row.xdp_program_ns?;
            let base = baseline_of(r, row).and_then(|b| b.forwarder_cpu_us_per_frame);
            Some(match base {
                Some(b) => format!(
                    "{} {} B: {ns:.0} ns per frame in the XDP program against {:.2} µs of baseline process CPU per frame ({:.0}× less)",
                    family(row.ipv6),
                    row.payload,
                    b,
                    b * 1000.0 / ns
                ),
                None => format!("{} {} B: {ns:.0} ns per frame in the XDP program", family(row.ipv6), row.payload),
            })
        })
        .collect();
    (!lines.is_empty()).then(|| {
        format!(
            "**XDP's own cost** (the kernel's BPF run-time statistics, `kernel.bpf_stats_enabled`, over the XDP rows' \
             searches: parsing, session lookup, source check, rewrite, checksums and `bpf_fib_lookup`, per packet; \
             not the veth's transmit of the redirected frame, which the kernel's own forwarding pays too): {}. \
             The baseline's figure is its process time, user and system (its syscalls, copies and the kernel's \
             send path), without the receive processing that runs in softirq: the whole gap is larger than this ratio.",
            lines.join("; ")
        )
    })
}

pub fn render(r: &DataplaneReport) -> String {
    let m = &r.machine;
    let mut s = String::new();
    section_start(&mut s, BEGIN, "`ztna-bench dataplane` (and `standard`)", "Forwarding rate of one worker, lab topology");
    let _ = writeln!(
        s,
        "{}; {:.0} s of rate search, {:.0} s in all.",
        measured(&r.date, &r.revision, m), r.search_s, r.total_s
    );
    let _ = writeln!(s);
    let _ = writeln!(
        s,
        "Topology: `deploy/lab/lab.sh` (agent host 192.0.2.2 —veth— relay host 192.0.2.1 | 198.51.100.1 —veth— \
         connector host 198.51.100.2; IPv6 2001:db8:a::/64 and 2001:db8:c::/64), three network namespaces on this \
         machine. {} sessions made through the real control protocol (agent sockets in the agent host, the connector's \
         in the connector host). Generator: `trafgen` in the agent host, one process on CPU 0, one DATA frame per \
         session round robin, `--num` for the count, {:.1} s per step, paced by a token bucket (tc tbf, 5 ms of \
         burst) on the agent's veth behind which trafgen's sends block (trafgen's own `--rate` sends each second's \
         frames in one burst at the start of the second: that measures how large a burst the forwarder's socket \
         buffer absorbs, not its rate); flat-out steps use trafgen's TX ring without the shaper. The relay or the \
         baseline runs on CPU {} (`taskset`). {} XDP on a veth runs in the receiving veth's NAPI poll on the \
         sending CPU, so the XDP rows' forwarding shares CPU 0 with trafgen. Delivered frames are counted and dropped by an nftables rule at the \
         connector host's ingress (no socket, no userspace receive cost); sent = the agent veth's tx packets. \
         Generator and forwarder run at `nice {NICE}`. Search: from {:.0} pps doubling until a step loses ≥ 1%, then bisection; the row's rate is what the \
         generator offered in the fastest step under 1% loss.",
        r.sessions,
        r.step_seconds,
        r.relay_cpu,
        if r.rps {
            "Receive steering (`--rps`): the relay host's receive processing runs on that CPU too, the connector \
             host's on the other one."
        } else {
            "A veth hands each frame to the receiving host in softirq on the sending CPU: the relay host's receive \
             processing (IP, UDP, socket queue) runs on the generator's CPU 0 and is not in the forwarder's CPU \
             figures; the connector host's runs on the forwarder's CPU (`--rps` moves both, as with a real NIC)."
        },
        START_PPS
    );
    let _ = writeln!(s);
    let _ = writeln!(s, "{}", table(r));
    let _ = writeln!(
        s,
        "*× baseline*: the row's rate over the baseline forwarder's for the same IP version and payload (≥ when this \
         row was generator limited, ≤ when the baseline was, ? when both were). *Process CPU / frame*: utime+stime of the relay (or \
         baseline) process over the fastest passing step, per frame delivered; XDP forwards outside any process, so \
         for it only the machine figure means anything. *Machine CPU / frame*: busy time of the whole machine (all \
         cores, /proc/stat, softirq included — where XDP and the kernel's UDP path run) over that step and 0.2 s of \
         drain, per frame delivered: generator, kernel and forwarder together. *Less generator and other load*: the \
         same less trafgen's own cost per frame (measured alone at 200 kpps paced, with the frames dropped at the relay \
         host's ingress: {}) and less the *other load* (cores busy with other work, sampled for 0.5 s with no traffic \
         before the row); it is rough (trafgen's cost per frame differs between paced and flat-out sends, so it can \
         come out near zero or below for the fast paths). With other load well above zero (other builds on the machine) the rates and the machine \
         figure are disturbed: compare rows of one run, and rerun on a quiet machine. **GENERATOR LIMITED** means \
         trafgen could not send faster on this machine while the relay lost under 1%: the figure is a lower bound for \
         the relay, not its maximum.",
        if r.generator_us_per_frame.is_empty() {
            "not measured".to_string()
        } else {
            r.generator_us_per_frame.iter().map(|(k, v)| format!("{k} B: {v:.2} µs")).collect::<Vec<_>>().join(", ")
        }
    );
    let _ = writeln!(s);
    if let Some(p) = xdp_cost(r) {
        let _ = writeln!(s, "{p}");
        let _ = writeln!(s);
    }
    if r.rows.iter().any(|row| row.latency.is_some()) {
        let _ = writeln!(s, "#### Latency the relay adds, at half of its maximum rate");
        let _ = writeln!(s);
        let _ = writeln!(s, "{}", latency_table(r));
        let _ = writeln!(
            s,
            "One-way latency of `ztna-bench flood` frames (send timestamp in the payload, hdrhistogram at the sink; \
             sender in the agent host, recvmmsg sink in the connector host, 4 sessions, sendmmsg batches of 32) at half \
             the row's maximum rate; its threads run on the CPU the relay does not. *Direct*: the same frames at the same rate sent straight to the connector's \
             address, routed by the relay host's kernel (IP forwarding, no relay process), so *added* is what the relay \
             costs on top of crossing the same veths and host. The userspace sender and sink share the 2 cores with \
             the relay, so both paths include their scheduling delays."
        );
        let _ = writeln!(s);
    }
    let _ = writeln!(s, "Relay: `{}`.", r.relay_args);
    let _ = writeln!(s);
    let _ = writeln!(s, "Reproduce (from the workspace root, as root; the lab is created and removed by the command):");
    let _ = writeln!(s);
    let _ = writeln!(s, "```sh\n{}\n```", r.command.trim_end());
    let _ = writeln!(s, "{END}");
    s
}

/// Rewrites the data-plane section of `path` (appended with its heading if the markers are missing).
pub fn write_section(path: &Path, r: &DataplaneReport) -> Result<()> {
    markdown::write(path, &[(SECTION, render(r))])
}
