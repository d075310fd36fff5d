//! What the relay's own counters (its `/metrics`) say happened during a measurement.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use anyhow::Result;
use serde::Serialize;
use ztna_testbed::metrics::{self, Scrape};
use ztna_testbed::netns;

/// One scrape of the admin endpoint, from inside network namespace `ns` when given.
pub fn scrape_in(ns: Option<&str>, admin: SocketAddr) -> Result<Scrape> {
    netns::maybe_in(ns, || metrics::scrape(admin))
}

/// Counters between two scrapes.
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
    let d = |name: &str, labels: &[(&str, &str)]| (after.sum(name, labels) - before.sum(name, labels)).max(0.0).round() as u64;
    RelayCounters {
        handshakes_ok: d("ztna_relay_handshakes_total", &[("reason", "ok")]),
        handshakes_failed: d("ztna_relay_handshakes_total", &[("reason", "failed")]),
        retries_sent: d("ztna_relay_retries_sent_total", &[]),
        dropped: drops_between(before, after),
        control_connections: after.sum("ztna_relay_control_connections", &[]).round() as u64,
    }
}

/// Datagrams the relay dropped between two scrapes, by reason (only reasons that moved).
pub fn drops_between(before: &Scrape, after: &Scrape) -> BTreeMap<String, u64> {
    let b = before.by_label("ztna_relay_dropped_total", "reason");
    after
        .by_label("ztna_relay_dropped_total", "reason")
        .into_iter()
        .map(|(k, v)| (k.clone(), (v - b.get(&k).copied().unwrap_or(0.0)).max(0.0).round() as u64))
        .filter(|(_, v)| *v > 0)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_what_moved() {
        let s = Scrape::parse(
            "ztna_relay_handshakes_total{reason=\"ok\"} 5\n\
             ztna_relay_handshakes_total{reason=\"failed\"} 1\n\
             ztna_relay_dropped_total{worker=\"0\",reason=\"rate_limited\"} 2\n\
             ztna_relay_dropped_total{worker=\"1\",reason=\"rate_limited\"} 3\n\
             ztna_relay_dropped_total{worker=\"1\",reason=\"unknown_session\"} 0\n",
        );
        let c = counters_between(&Scrape::default(), &s);
        assert_eq!(c.handshakes_ok, 5);
        assert_eq!(c.handshakes_failed, 1);
        assert_eq!(c.dropped["rate_limited"], 5);
        assert!(!c.dropped.contains_key("unknown_session"));
    }
}
