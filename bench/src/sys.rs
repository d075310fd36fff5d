//! What the harness reads from the system: a process's RSS and CPU time from /proc, the
//! machine's description, the date, and the relay's Prometheus metrics over plain HTTP.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use serde::Serialize;

/// A `VmRSS`-style field of /proc/PID/status, in KiB.
fn status_kib(pid: u32, field: &str) -> Result<u64> {
    let path = format!("/proc/{pid}/status");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path} (is process {pid} running?)"))?;
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix(field).and_then(|r| r.strip_prefix(':')) {
            let kib = rest.trim().trim_end_matches("kB").trim();
            return kib.parse().with_context(|| format!("parsing {field} in {path}: {line:?}"));
        }
    }
    bail!("{path} has no {field} line")
}

/// Resident set size of `pid`, in bytes.
pub fn rss_bytes(pid: u32) -> Result<u64> {
    Ok(status_kib(pid, "VmRSS")? * 1024)
}

/// Peak resident set size of `pid`, in bytes.
pub fn rss_peak_bytes(pid: u32) -> Result<u64> {
    Ok(status_kib(pid, "VmHWM")? * 1024)
}

fn clock_ticks_per_sec() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

/// User plus system CPU time of a process (all its threads), in seconds. `None` means self.
pub fn cpu_seconds(pid: Option<u32>) -> Result<f64> {
    let path = match pid {
        Some(p) => format!("/proc/{p}/stat"),
        None => "/proc/self/stat".to_string(),
    };
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    // The command name (field 2) may hold spaces and parentheses: fields resume after the last ')'.
    let rest = text.rsplit_once(')').map(|(_, r)| r).context("malformed /proc stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state); utime and stime are fields 14 and 15.
    let utime: u64 = fields.get(11).context("no utime")?.parse()?;
    let stime: u64 = fields.get(12).context("no stime")?.parse()?;
    Ok((utime + stime) as f64 / clock_ticks_per_sec())
}

/// CPU time spent busy (not idle, not waiting for I/O) by the whole machine, all cores, in seconds.
pub fn machine_busy_seconds() -> Result<f64> {
    let text = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    let line = text.lines().next().filter(|l| l.starts_with("cpu ")).context("malformed /proc/stat")?;
    let v: Vec<u64> = line.split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
    // user nice system idle iowait irq softirq steal (guest time is already inside user).
    let total: u64 = v.iter().take(8).sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    Ok(total.saturating_sub(idle) as f64 / clock_ticks_per_sec())
}

static STOP: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

extern "C" fn on_stop_signal(_: libc::c_int) {
    STOP.store(true, std::sync::atomic::Ordering::Relaxed);
}

/// From now on SIGINT and SIGTERM only set [`stop_requested`]: long runs poll it and unwind,
/// so their guards (child processes, network namespaces) clean up.
pub fn catch_stop_signals() {
    // SAFETY: the handler only stores to an atomic (async-signal-safe).
    unsafe {
        libc::signal(libc::SIGINT, on_stop_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_stop_signal as *const () as libc::sighandler_t);
    }
}

/// True once SIGINT or SIGTERM arrived after [`catch_stop_signals`].
pub fn stop_requested() -> bool {
    STOP.load(std::sync::atomic::Ordering::Relaxed)
}

/// Raises this process's open-file limit to its hard limit (each client connection owns a socket).
pub fn raise_nofile_limit() -> u64 {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: plain syscalls on a stack value.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 0;
        }
        if lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            let _ = libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
            let _ = libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        }
    }
    lim.rlim_cur
}

/// UDP counters (all sockets of a network namespace, from /proc/PID/net/snmp).
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct UdpCounters {
    pub in_datagrams: u64,
    pub out_datagrams: u64,
    /// Datagrams dropped because a socket's receive buffer was full.
    pub rcvbuf_errors: u64,
    pub sndbuf_errors: u64,
}

impl UdpCounters {
    pub fn since(&self, before: &UdpCounters) -> UdpCounters {
        UdpCounters {
            in_datagrams: self.in_datagrams.saturating_sub(before.in_datagrams),
            out_datagrams: self.out_datagrams.saturating_sub(before.out_datagrams),
            rcvbuf_errors: self.rcvbuf_errors.saturating_sub(before.rcvbuf_errors),
            sndbuf_errors: self.sndbuf_errors.saturating_sub(before.sndbuf_errors),
        }
    }
}

/// The UDP counters of the network namespaces that `pids` run in, added up (list each
/// namespace once: one process per lab host).
pub fn udp_counters(pids: &[u32]) -> UdpCounters {
    let mut sum = UdpCounters::default();
    for pid in pids {
        let c = udp_counters_of(*pid);
        sum.in_datagrams += c.in_datagrams;
        sum.out_datagrams += c.out_datagrams;
        sum.rcvbuf_errors += c.rcvbuf_errors;
        sum.sndbuf_errors += c.sndbuf_errors;
    }
    sum
}

fn udp_counters_of(pid: u32) -> UdpCounters {
    let text = std::fs::read_to_string(format!("/proc/{pid}/net/snmp")).unwrap_or_default();
    let mut lines = text.lines().filter(|l| l.starts_with("Udp:"));
    let (Some(names), Some(values)) = (lines.next(), lines.next()) else { return UdpCounters::default() };
    let get = |key: &str| {
        names
            .split_whitespace()
            .zip(values.split_whitespace())
            .find(|(n, _)| *n == key)
            .and_then(|(_, v)| v.parse().ok())
            .unwrap_or(0)
    };
    UdpCounters {
        in_datagrams: get("InDatagrams"),
        out_datagrams: get("OutDatagrams"),
        rcvbuf_errors: get("RcvbufErrors"),
        sndbuf_errors: get("SndbufErrors"),
    }
}

/// Datagrams dropped by the UDP sockets `pid` holds (the `drops` column of /proc/net/udp and
/// udp6: mostly a full receive buffer), summed over its sockets, in whatever network namespace.
pub fn udp_socket_drops(pid: u32) -> Result<u64> {
    let dir = format!("/proc/{pid}/fd");
    let mut inodes = std::collections::HashSet::new();
    for e in std::fs::read_dir(&dir).with_context(|| format!("reading {dir}"))? {
        let Ok(e) = e else { continue };
        if let Ok(t) = std::fs::read_link(e.path())
            && let Some(i) = t.to_str().and_then(|t| t.strip_prefix("socket:[")).and_then(|t| t.strip_suffix(']'))
        {
            inodes.insert(i.to_string());
        }
    }
    let mut drops = 0;
    // The process's own view (/proc/PID/net), so sockets in another network namespace count.
    for table in ["udp", "udp6"] {
        let text = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")).unwrap_or_default();
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            // sl local rem st tx:rx tr:when retrnsmt uid timeout inode ref pointer drops
            if f.len() >= 13 && inodes.contains(f[9]) {
                drops += f[12].parse::<u64>().unwrap_or(0);
            }
        }
    }
    Ok(drops)
}

#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub cpu_model: String,
    pub cores: usize,
    pub kernel: String,
    pub memory_gib: f64,
}

pub fn machine() -> Machine {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu_model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name").and_then(|r| r.split_once(':')).map(|(_, v)| v.trim().to_string()))
        .unwrap_or_else(|| "unknown".to_string());
    let cores = cpuinfo.lines().filter(|l| l.starts_with("processor")).count();
    let cores = if cores > 0 { cores } else { std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1) };
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_kib: f64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0.0);
    Machine { cpu_model, cores, kernel: uname(), memory_gib: mem_kib / (1024.0 * 1024.0) }
}

/// `uname -srm`.
fn uname() -> String {
    // SAFETY: uname fills the zeroed struct; its fields are NUL-terminated C strings.
    unsafe {
        let mut u: libc::utsname = std::mem::zeroed();
        if libc::uname(&mut u) != 0 {
            return "unknown".to_string();
        }
        let s = |f: &[libc::c_char]| std::ffi::CStr::from_ptr(f.as_ptr()).to_string_lossy().into_owned();
        format!("{} {} {}", s(&u.sysname), s(&u.release), s(&u.machine))
    }
}

/// The workspace's git commit (short), with a note when the tree has uncommitted changes;
/// "unknown" outside a git checkout.
pub fn git_revision() -> String {
    let run = |args: &[&str]| {
        std::process::Command::new("git")
            .args(args)
            .stderr(std::process::Stdio::null())
            .output()
            .ok()
            .filter(|o| o.status.success())
            // Not `trim`: a porcelain status line starts with a space (` M path`).
            .map(|o| String::from_utf8_lossy(&o.stdout).trim_end().to_string())
    };
    match run(&["rev-parse", "--short", "HEAD"]) {
        Some(rev) if !rev.is_empty() => match run(&["status", "--porcelain"]) {
            Some(st) if !st.is_empty() => {
                // Which top-level directories the changes are in (`XY path` lines).
                let mut dirs: Vec<&str> = st
                    .lines()
                    .filter_map(|l| l.get(3..))
                    .map(|p| p.trim_matches('"').split('/').next().unwrap_or(p))
                    .collect();
                dirs.sort_unstable();
                dirs.dedup();
                format!("{rev} with uncommitted changes in {}", dirs.join(", "))
            }
            _ => rev,
        },
        _ => "unknown".to_string(),
    }
}

/// The current UTC time as `YYYY-MM-DD HH:MM UTC`.
pub fn utc_now() -> String {
    let secs = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Howard Hinnant's civil_from_days.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02} {:02}:{:02} UTC", rem / 3600, rem % 3600 / 60)
}

/// One scrape of the relay's `/metrics` (Prometheus text format): series → value.
#[derive(Debug, Clone, Default)]
pub struct Scrape {
    series: BTreeMap<String, f64>,
}

fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    let timeout = Duration::from_secs(2);
    let mut s = TcpStream::connect_timeout(&addr, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n\r\n")?;
    let mut body = Vec::new();
    s.read_to_end(&mut body)?;
    let text = String::from_utf8_lossy(&body).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").context("malformed HTTP response")?;
    let status = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).context("malformed HTTP status line")?;
    Ok((status, body.to_string()))
}

/// True when the admin endpoint answers `/healthz` with 200.
pub fn healthy(admin: SocketAddr) -> bool {
    matches!(http_get(admin, "/healthz"), Ok((200, _)))
}

/// [`healthy`] from inside network namespace `ns` when given.
pub fn healthy_in(ns: Option<&str>, admin: SocketAddr) -> Result<bool> {
    crate::netns::maybe_in(ns, || Ok(healthy(admin)))
}

/// [`scrape`] from inside network namespace `ns` when given.
pub fn scrape_in(ns: Option<&str>, admin: SocketAddr) -> Result<Scrape> {
    crate::netns::maybe_in(ns, || scrape(admin))
}

pub fn scrape(admin: SocketAddr) -> Result<Scrape> {
    let (status, body) = http_get(admin, "/metrics").with_context(|| format!("scraping http://{admin}/metrics"))?;
    if status != 200 {
        bail!("http://{admin}/metrics answered {status}");
    }
    let mut series = BTreeMap::new();
    for line in body.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        if let Some((name, value)) = line.rsplit_once(' ')
            && let Ok(v) = value.parse::<f64>()
        {
            series.insert(name.to_string(), v);
        }
    }
    Ok(Scrape { series })
}

/// The value of `key="..."` in a series' label set.
fn label<'a>(series: &'a str, key: &str) -> Option<&'a str> {
    let labels = series.split_once('{')?.1;
    let start = labels.find(&format!("{key}=\""))? + key.len() + 2;
    let end = labels[start..].find('"')? + start;
    Some(&labels[start..end])
}

impl Scrape {
    /// Sum of every series of metric `name`, optionally only those with label `key="value"`.
    pub fn sum(&self, name: &str, filter: Option<(&str, &str)>) -> f64 {
        self.series
            .iter()
            .filter(|(s, _)| s.split('{').next() == Some(name))
            .filter(|(s, _)| filter.is_none_or(|(k, v)| label(s, k) == Some(v)))
            .map(|(_, v)| v)
            .sum()
    }

    /// Metric `name` summed per value of label `key`.
    pub fn by_label(&self, name: &str, key: &str) -> BTreeMap<String, f64> {
        let mut out = BTreeMap::new();
        for (s, v) in &self.series {
            if s.split('{').next() == Some(name)
                && let Some(l) = label(s, key)
            {
                *out.entry(l.to_string()).or_insert(0.0) += v;
            }
        }
        out
    }
}

/// What the relay's own counters say happened between two scrapes.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RelayCounters {
    pub handshakes_ok: u64,
    pub handshakes_failed: u64,
    pub retries_sent: u64,
    /// Datagrams dropped, by reason (only reasons that moved).
    pub dropped: BTreeMap<String, u64>,
    /// Open control connections at the second scrape.
    pub control_connections: u64,
}

pub fn counters_between(before: &Scrape, after: &Scrape) -> RelayCounters {
    let d = |name: &str, f: Option<(&str, &str)>| (after.sum(name, f) - before.sum(name, f)).max(0.0).round() as u64;
    let b = before.by_label("ztna_relay_dropped_total", "reason");
    let dropped = after
        .by_label("ztna_relay_dropped_total", "reason")
        .into_iter()
        .map(|(k, v)| {
            let delta = (v - b.get(&k).copied().unwrap_or(0.0)).max(0.0).round() as u64;
            (k, delta)
        })
        .filter(|(_, v)| *v > 0)
        .collect();
    RelayCounters {
        handshakes_ok: d("ztna_relay_handshakes_total", Some(("reason", "ok"))),
        handshakes_failed: d("ztna_relay_handshakes_total", Some(("reason", "failed"))),
        retries_sent: d("ztna_relay_retries_sent_total", None),
        dropped,
        control_connections: after.sum("ztna_relay_control_connections", None).round() as u64,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_labels_and_sums() {
        let mut s = Scrape::default();
        s.series.insert("ztna_relay_handshakes_total{reason=\"ok\"}".into(), 5.0);
        s.series.insert("ztna_relay_handshakes_total{reason=\"failed\"}".into(), 1.0);
        s.series.insert("ztna_relay_dropped_total{worker=\"0\",reason=\"rate_limited\"}".into(), 2.0);
        s.series.insert("ztna_relay_dropped_total{worker=\"1\",reason=\"rate_limited\"}".into(), 3.0);
        assert_eq!(s.sum("ztna_relay_handshakes_total", Some(("reason", "ok"))), 5.0);
        assert_eq!(s.sum("ztna_relay_handshakes_total", None), 6.0);
        assert_eq!(s.by_label("ztna_relay_dropped_total", "reason")["rate_limited"], 5.0);
        let c = counters_between(&Scrape::default(), &s);
        assert_eq!(c.handshakes_ok, 5);
        assert_eq!(c.dropped["rate_limited"], 5);
    }

    #[test]
    fn reads_own_process() {
        assert!(rss_bytes(std::process::id()).unwrap() > 0);
        assert!(cpu_seconds(None).unwrap() >= 0.0);
        assert!(machine_busy_seconds().unwrap() > 0.0);
        assert!(utc_now().ends_with("UTC"));
        let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        assert_eq!(udp_socket_drops(std::process::id()).unwrap(), 0);
        drop(sock);
    }
}
