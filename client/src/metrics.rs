//! Agent and connector metrics, served on an opt-in admin port (`--metrics ADDR`).

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::direct::Punch;

type Labels = Vec<(String, String)>;

fn label(name: &str, value: &str) -> Labels {
    vec![(name.to_string(), value.to_string())]
}

pub struct ClientMetrics {
    pub registry: Registry,
    pub sessions: Gauge,
    pub streams: Gauge,
    pub streams_total: Counter,
    /// Payload bytes sent into tunnels (TCP stream bytes and UDP datagram payloads).
    pub bytes_to_peer: Counter,
    /// Payload bytes received from tunnels.
    pub bytes_from_peer: Counter,
    pub udp_dropped_oversize: Counter,
    pub reconnects: Counter,
    pub tunnels_resumed: Counter,
    pub tunnels_lost: Counter,
    tunnels: Family<Labels, Gauge>,
    path_switches: Family<Labels, Counter>,
    punch_attempts: Family<Labels, Counter>,
    punches_received: Family<Labels, Counter>,
    pub punches_sent: Counter,
    direct_rejected: Family<Labels, Counter>,
    time_to_direct: Histogram,
}

impl ClientMetrics {
    /// `prefix` is the program: `ztna_agent` or `ztna_connector`.
    pub fn new(prefix: &str) -> Self {
        let mut registry = Registry::with_prefix(prefix);
        let m = ClientMetrics {
            registry: Registry::default(),
            sessions: Gauge::default(),
            streams: Gauge::default(),
            streams_total: Counter::default(),
            bytes_to_peer: Counter::default(),
            bytes_from_peer: Counter::default(),
            udp_dropped_oversize: Counter::default(),
            reconnects: Counter::default(),
            tunnels_resumed: Counter::default(),
            tunnels_lost: Counter::default(),
            tunnels: Family::default(),
            path_switches: Family::default(),
            punch_attempts: Family::default(),
            punches_received: Family::default(),
            punches_sent: Counter::default(),
            direct_rejected: Family::default(),
            // 5 ms .. about 20 s.
            time_to_direct: Histogram::new(exponential_buckets(0.005, 2.0, 12)),
        };
        registry.register("sessions", "Open end-to-end tunnels (one per relay session)", m.sessions.clone());
        registry.register("streams", "Open tunnelled TCP flows", m.streams.clone());
        registry.register("streams_opened", "Tunnelled TCP flows opened", m.streams_total.clone());
        registry.register("sent_bytes", "Payload bytes sent to the peer through tunnels", m.bytes_to_peer.clone());
        registry.register("received_bytes", "Payload bytes received from the peer through tunnels", m.bytes_from_peer.clone());
        registry.register(
            "udp_dropped_oversize",
            "UDP datagrams dropped because they exceed what a QUIC DATAGRAM can carry",
            m.udp_dropped_oversize.clone(),
        );
        registry.register("reconnects", "Control connections re-established after a loss", m.reconnects.clone());
        registry.register(
            "tunnels_resumed",
            "Tunnels carried on by a new relay session after the control connection was lost",
            m.tunnels_resumed.clone(),
        );
        registry.register(
            "tunnels_lost",
            "Tunnels closed because no new relay session took them on in time",
            m.tunnels_lost.clone(),
        );
        registry.register("tunnels", "Open tunnels by the path their traffic takes (relay or direct)", m.tunnels.clone());
        registry.register(
            "path_switches",
            "Tunnels moved between paths, by direction (relay_to_direct, direct_to_relay)",
            m.path_switches.clone(),
        );
        registry.register(
            "punch_attempts",
            "Hole-punching attempts by outcome (direct: a direct path was taken; failed: none validated in time)",
            m.punch_attempts.clone(),
        );
        registry.register(
            "punches_received",
            "PUNCH frames received, by what they were (known, learned a peer-reflexive address, rejected)",
            m.punches_received.clone(),
        );
        registry.register("punches_sent", "PUNCH frames sent", m.punches_sent.clone());
        registry.register(
            "direct_rejected",
            "Datagrams from outside the relay that were refused (not_authentic: not a packet of the tunnel; unknown_session; direct_off: direct paths are off; wrong_socket: relay traffic on the peer-to-peer socket or direct traffic on the main one; stray_qad_reply: a QAD reply to no probe of ours)",
            m.direct_rejected.clone(),
        );
        registry.register_with_unit(
            "time_to_direct",
            "From a tunnel's start to its first move onto a direct path",
            prometheus_client::registry::Unit::Seconds,
            m.time_to_direct.clone(),
        );
        for p in ["relay", "direct"] {
            let _ = m.tunnels.get_or_create(&label("path", p));
        }
        for d in ["relay_to_direct", "direct_to_relay"] {
            let _ = m.path_switches.get_or_create(&label("direction", d));
        }
        for o in ["direct", "failed"] {
            let _ = m.punch_attempts.get_or_create(&label("outcome", o));
        }
        for o in ["known", "learned", "rejected"] {
            let _ = m.punches_received.get_or_create(&label("result", o));
        }
        for r in ["not_authentic", "unknown_session", "direct_off", "wrong_socket", "stray_qad_reply"] {
            let _ = m.direct_rejected.get_or_create(&label("reason", r));
        }
        ClientMetrics { registry, ..m }
    }

    /// A tunnel left path `from` (`None`: it is new) for `to` (`None`: it closed).
    pub fn tunnel_path(&self, from: Option<&str>, to: Option<&str>) {
        if let Some(p) = from {
            self.tunnels.get_or_create(&label("path", p)).dec();
        }
        if let Some(p) = to {
            self.tunnels.get_or_create(&label("path", p)).inc();
        }
    }

    /// A tunnel switched to a direct path (`to_direct`) or back; `first_direct`: its first
    /// move to a direct path, this long after it began.
    pub fn switched(&self, to_direct: bool, first_direct: Option<std::time::Duration>) {
        if to_direct {
            self.tunnel_path(Some("relay"), Some("direct"));
            self.path_switches.get_or_create(&label("direction", "relay_to_direct")).inc();
            self.punch_attempts("direct");
            if let Some(d) = first_direct {
                self.time_to_direct.observe(d.as_secs_f64());
            }
        } else {
            self.tunnel_path(Some("direct"), Some("relay"));
            self.path_switches.get_or_create(&label("direction", "direct_to_relay")).inc();
        }
    }

    pub fn punch_attempts(&self, outcome: &str) {
        self.punch_attempts.get_or_create(&label("outcome", outcome)).inc();
    }

    pub fn punch_received(&self, what: Punch) {
        let result = match what {
            Punch::Known => "known",
            Punch::Learned => "learned",
            Punch::Rejected => "rejected",
        };
        self.punches_received.get_or_create(&label("result", result)).inc();
    }

    pub fn direct_rejected(&self, reason: &str) {
        self.direct_rejected.get_or_create(&label("reason", reason)).inc();
    }
}

impl ztna_metrics_http::Source for ClientMetrics {
    fn registry(&self) -> &Registry {
        &self.registry
    }
}
