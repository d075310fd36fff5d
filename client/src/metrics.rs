//! Agent and connector metrics, served on an opt-in admin port (`--metrics ADDR`).

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

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
    path: Family<Vec<(String, String)>, Gauge>,
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
            path: Family::default(),
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
        registry.register("path", "1 for the path tunnels currently use (relay or direct)", m.path.clone());
        m.set_path(None);
        ClientMetrics { registry, ..m }
    }

    /// Which path tunnels use now; `None` when there is no relay connection.
    pub fn set_path(&self, current: Option<&str>) {
        for p in ["relay", "direct", "none"] {
            let on = current.unwrap_or("none") == p;
            self.path.get_or_create(&vec![("path".to_string(), p.to_string())]).set(on as i64);
        }
    }
}

impl ztna_metrics_http::Source for ClientMetrics {
    fn registry(&self) -> &Registry {
        &self.registry
    }
}
