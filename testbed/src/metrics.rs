//! The admin endpoint of the relay (and of an agent with `--metrics`): `/healthz` and
//! `/metrics` over plain HTTP, and the values in the Prometheus text.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use anyhow::{Context, Result, bail};

/// A minimal HTTP/1.1 GET (one request per connection): the status code and the body.
pub fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    let timeout = Duration::from_secs(5);
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).with_context(|| format!("connecting to http://{addr}"))?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")?;
    let mut resp = Vec::new();
    s.read_to_end(&mut resp).with_context(|| format!("reading the answer of http://{addr}{path}"))?;
    let text = String::from_utf8_lossy(&resp);
    let (head, body) = text.split_once("\r\n\r\n").with_context(|| format!("malformed HTTP response from http://{addr}{path}"))?;
    let status = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).context("malformed HTTP status line")?;
    Ok((status, body.to_string()))
}

/// True when `/healthz` answers 200.
pub fn healthy(admin: SocketAddr) -> bool {
    matches!(http_get(admin, "/healthz"), Ok((200, _)))
}

/// The Prometheus text of `/metrics`.
pub fn metrics_text(admin: SocketAddr) -> Result<String> {
    let (status, body) = http_get(admin, "/metrics").with_context(|| format!("scraping http://{admin}/metrics"))?;
    if status != 200 {
        bail!("http://{admin}/metrics answered {status}");
    }
    Ok(body)
}

/// One scrape of `/metrics`.
pub fn scrape(admin: SocketAddr) -> Result<Scrape> {
    Ok(Scrape::parse(&metrics_text(admin)?))
}

/// Sum of every sample of metric `name` in Prometheus text whose labels include all of
/// `labels` (`("reason", "ok")` for `reason="ok"`).
pub fn metric_sum(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    Scrape::parse(text).sum(name, labels)
}

/// Prometheus text parsed into series (`name{labels}`) and their values.
#[derive(Debug, Clone, Default)]
pub struct Scrape {
    series: BTreeMap<String, f64>,
}

impl Scrape {
    pub fn parse(text: &str) -> Scrape {
        let mut series = BTreeMap::new();
        for line in text.lines() {
            if line.starts_with('#') || line.trim().is_empty() {
                continue;
            }
            if let Some((name, value)) = line.rsplit_once(' ')
                && let Ok(v) = value.parse::<f64>()
            {
                *series.entry(name.to_string()).or_insert(0.0) += v;
            }
        }
        Scrape { series }
    }

    /// Sum of every series of metric `name` that has all of `labels`.
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.of(name).filter(|(s, _)| labels.iter().all(|(k, v)| label(s, k) == Some(v))).map(|(_, v)| v).sum()
    }

    /// Metric `name` summed per value of label `key`.
    pub fn by_label(&self, name: &str, key: &str) -> BTreeMap<String, f64> {
        let mut out = BTreeMap::new();
        for (s, v) in self.of(name) {
            if let Some(l) = label(s, key) {
                *out.entry(l.to_string()).or_insert(0.0) += v;
            }
        }
        out
    }

    fn of<'a>(&'a self, name: &'a str) -> impl Iterator<Item = (&'a str, f64)> + 'a {
        self.series.iter().filter(move |(s, _)| s.split('{').next() == Some(name)).map(|(s, v)| (s.as_str(), *v))
    }
}

/// The value of label `key` in a series (`name{a="1",key="v"}`).
fn label<'a>(series: &'a str, key: &str) -> Option<&'a str> {
    let labels = series.split_once('{')?.1.strip_suffix('}')?;
    let mut rest = labels;
    while !rest.is_empty() {
        let (k, after) = rest.split_once("=\"")?;
        let end = after.find('"')?;
        if k.trim_start_matches(',') == key {
            return Some(&after[..end]);
        }
        rest = &after[end + 1..];
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_series_by_name_and_labels() {
        let text = "# HELP ztna_relay_handshakes_total x\n\
                    ztna_relay_handshakes_total{reason=\"ok\"} 5\n\
                    ztna_relay_handshakes_total{reason=\"failed\"} 1\n\
                    ztna_relay_dropped_total{worker=\"0\",reason=\"rate_limited\"} 2\n\
                    ztna_relay_dropped_total{worker=\"1\",reason=\"rate_limited\"} 3\n\
                    ztna_relay_dropped_total{worker=\"1\",reason=\"unknown_session\"} 4\n\
                    ztna_relay_control_connections 7\n";
        let s = Scrape::parse(text);
        assert_eq!(s.sum("ztna_relay_handshakes_total", &[("reason", "ok")]), 5.0);
        assert_eq!(s.sum("ztna_relay_handshakes_total", &[]), 6.0);
        assert_eq!(s.sum("ztna_relay_dropped_total", &[("worker", "1"), ("reason", "rate_limited")]), 3.0);
        assert_eq!(s.sum("ztna_relay_dropped_total", &[("eason", "rate_limited")]), 0.0);
        assert_eq!(s.sum("ztna_relay_control_connections", &[]), 7.0);
        assert_eq!(s.by_label("ztna_relay_dropped_total", "reason")["rate_limited"], 5.0);
        assert_eq!(metric_sum(text, "ztna_relay", &[]), 0.0);
    }
}
