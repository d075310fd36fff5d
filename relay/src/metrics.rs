//! Prometheus metrics. Every hot-path counter is resolved to a plain atomic handle per worker
//! at start-up ([`WorkerMetrics`]), so counting a packet is one relaxed atomic add on a
//! counter no other worker touches; label lookups happen only at scrape time.

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use ztna_proto::ErrorCode;

/// Why a datagram or frame was dropped. One label value each, stable for dashboards.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum DropReason {
    /// Not a relay frame and not a parseable QUIC header.
    malformed_packet,
    /// A relay frame of a type this relay does not know.
    unknown_frame_type,
    /// DATA frame shorter than its header.
    malformed_frame,
    /// DATA frame for a session id that does not exist (or expired).
    unknown_session,
    /// DATA frame from an address bound to neither side of its session.
    unbound_source,
    /// QUIC packet for a connection id this relay does not know (not an Initial).
    unknown_connection,
    /// QUIC version this relay does not speak (answered with version negotiation).
    unsupported_version,
    /// Initial packet too small to be a valid client Initial (anti-amplification).
    short_initial,
    /// Retry token failed validation.
    invalid_token,
    /// New handshake over the per-source-IP limit.
    rate_limited,
    /// The worker's connection table is full.
    connection_limit,
    /// quiche rejected the packet.
    quic_error,
    /// QAD probe shorter than the reply would be.
    short_probe,
    /// Could not hand the packet to its owning worker (queue full).
    handoff_queue_full,
    /// The kernel refused the send (buffer full).
    send_failed,
}

impl DropReason {
    pub const ALL: [DropReason; 15] = [
        DropReason::malformed_packet,
        DropReason::unknown_frame_type,
        DropReason::malformed_frame,
        DropReason::unknown_session,
        DropReason::unbound_source,
        DropReason::unknown_connection,
        DropReason::unsupported_version,
        DropReason::short_initial,
        DropReason::invalid_token,
        DropReason::rate_limited,
        DropReason::connection_limit,
        DropReason::quic_error,
        DropReason::short_probe,
        DropReason::handoff_queue_full,
        DropReason::send_failed,
    ];
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WorkerLabel {
    pub worker: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DropLabel {
    pub worker: String,
    pub reason: DropReason,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SignalLabel {
    pub message: String,
    pub result: String,
}

/// Path signalling messages (`Candidates`, `PathStatus`, `DirectAddress`) and what became of them.
pub const SIGNAL_MESSAGES: [&str; 3] = ["candidates", "path_status", "direct_address"];
/// `forwarded`/`recorded`: taken; `not_a_party`: the sender is not in that session;
/// `unknown_session`: the session is gone; `refused`: not an address anyone can send to.
pub const SIGNAL_RESULTS: [&str; 5] = ["forwarded", "recorded", "not_a_party", "unknown_session", "refused"];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FamilyLabel {
    pub family: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RoleLabel {
    pub role: String,
}

/// Why an authentication failed.
pub const AUTH_FAILURE_REASONS: [&str; 5] =
    ["tls_handshake", "no_certificate", "bad_identity", "not_in_policy", "wrong_role"];

/// All relay metrics, registered once.
pub struct Metrics {
    pub registry: Registry,
    packets_in: Family<WorkerLabel, Counter>,
    packets_out: Family<WorkerLabel, Counter>,
    bytes_in: Family<WorkerLabel, Counter>,
    bytes_out: Family<WorkerLabel, Counter>,
    frames_forwarded: Family<WorkerLabel, Counter>,
    dropped: Family<DropLabel, Counter>,
    handoffs: Family<WorkerLabel, Counter>,
    rx_no_buffers: Family<WorkerLabel, Counter>,
    io_backend: Family<Vec<(String, String)>, Gauge>,
    control_connections: Family<WorkerLabel, Gauge>,
    sessions_active: Family<WorkerLabel, Gauge>,
    pub handshakes: Family<ReasonLabel, Counter>,
    pub retries_sent: Counter,
    pub unresponsive_closed: Counter,
    pub stateless_resets_sent: Counter,
    pub auth_failures: Family<ReasonLabel, Counter>,
    pub refusals: Family<ReasonLabel, Counter>,
    pub malformed_control: Counter,
    pub sessions_created: Counter,
    pub sessions_closed: Family<ReasonLabel, Counter>,
    pub qad_reports: Family<FamilyLabel, Counter>,
    pub qad_probes: Counter,
    pub handshake_duration: Histogram,
    pub registered_connectors: Gauge,
    pub reloads: Family<ReasonLabel, Counter>,
    pub blocklisted: Counter,
    signaling: Family<SignalLabel, Counter>,
    pub sessions_direct: Gauge,
    nat_test: Family<ResultLabel, Counter>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: String,
}

/// What the NAT-test responder did with a datagram: `answered`; `malformed` (not a probe);
/// `rate_limited` (over `nat_test.replies_per_sec`); `send_failed`.
pub const NAT_TEST_RESULTS: [&str; 4] = ["answered", "malformed", "rate_limited", "send_failed"];

impl Metrics {
    pub fn new(workers: usize) -> Self {
        let mut registry = Registry::with_prefix("ztna_relay");
        let m = Metrics {
            packets_in: Family::default(),
            packets_out: Family::default(),
            bytes_in: Family::default(),
            bytes_out: Family::default(),
            frames_forwarded: Family::default(),
            dropped: Family::default(),
            handoffs: Family::default(),
            rx_no_buffers: Family::default(),
            io_backend: Family::default(),
            control_connections: Family::default(),
            sessions_active: Family::default(),
            handshakes: Family::default(),
            retries_sent: Counter::default(),
            unresponsive_closed: Counter::default(),
            stateless_resets_sent: Counter::default(),
            auth_failures: Family::default(),
            refusals: Family::default(),
            malformed_control: Counter::default(),
            sessions_created: Counter::default(),
            sessions_closed: Family::default(),
            qad_reports: Family::default(),
            qad_probes: Counter::default(),
            handshake_duration: Histogram::new(exponential_buckets(0.0005, 2.0, 14)),
            registered_connectors: Gauge::default(),
            reloads: Family::default(),
            blocklisted: Counter::default(),
            signaling: Family::default(),
            sessions_direct: Gauge::default(),
            nat_test: Family::default(),
            registry: Registry::default(),
        };
        registry.register("packets_received", "UDP datagrams received, per worker", m.packets_in.clone());
        registry.register("packets_sent", "UDP datagrams sent, per worker", m.packets_out.clone());
        registry.register("received_bytes", "UDP payload bytes received, per worker", m.bytes_in.clone());
        registry.register("sent_bytes", "UDP payload bytes sent, per worker", m.bytes_out.clone());
        registry.register("frames_forwarded", "DATA frames forwarded between the two sides of a session", m.frames_forwarded.clone());
        registry.register("dropped", "Datagrams and frames dropped, by worker and reason", m.dropped.clone());
        registry.register("handoffs", "Datagrams received by a worker that does not own them and handed to the owner", m.handoffs.clone());
        registry.register(
            "io_rx_buffers_exhausted",
            "Times a worker's io_uring receive buffer ring ran dry (datagrams wait in the socket buffer meanwhile)",
            m.rx_no_buffers.clone(),
        );
        registry.register("io_backend", "Datagram I/O backend the workers use (1 for the one in use)", m.io_backend.clone());
        registry.register("control_connections", "Open control connections, per worker", m.control_connections.clone());
        registry.register("sessions_active", "Active relay sessions, per owning worker", m.sessions_active.clone());
        registry.register("handshakes", "Control-connection handshakes by result", m.handshakes.clone());
        registry.register("retries_sent", "Stateless Retry packets sent for address validation", m.retries_sent.clone());
        registry.register(
            "stateless_resets_sent",
            "Stateless resets sent for packets of connections this relay does not know (restarted, or dropped them)",
            m.stateless_resets_sent.clone(),
        );
        registry.register(
            "unresponsive_closed",
            "Control connections of connectors with sessions dropped for not answering liveness pings",
            m.unresponsive_closed.clone(),
        );
        registry.register("auth_failures", "Authentication failures by reason", m.auth_failures.clone());
        registry.register("refusals", "Control requests refused, by reason code", m.refusals.clone());
        registry.register("control_messages_malformed", "Malformed control messages received", m.malformed_control.clone());
        registry.register("sessions_created", "Relay sessions created", m.sessions_created.clone());
        registry.register("sessions_closed", "Relay sessions closed, by reason", m.sessions_closed.clone());
        registry.register("qad_reports", "QUIC Address Discovery reports sent, by address family", m.qad_reports.clone());
        registry.register("qad_probes_answered", "Stateless QAD probe frames answered", m.qad_probes.clone());
        registry.register_with_unit(
            "handshake_duration",
            "Time from a connection's first Initial to an authenticated control connection",
            prometheus_client::registry::Unit::Seconds,
            m.handshake_duration.clone(),
        );
        registry.register("registered_connectors", "Connector registrations (connector, service) currently live", m.registered_connectors.clone());
        registry.register("blocklist_additions", "Sources put on the XDP blocklist for exceeding the handshake limit", m.blocklisted.clone());
        registry.register(
            "signaling_messages",
            "Path signalling messages from clients (candidates, path status), by result",
            m.signaling.clone(),
        );
        registry.register(
            "sessions_direct",
            "Sessions whose tunnel reports a direct peer-to-peer path (the relay carries none of their traffic)",
            m.sessions_direct.clone(),
        );
        registry.register(
            "nat_test_probes",
            "Datagrams at the NAT-test responder (RFC 5780-style mapping and filtering tests), by result",
            m.nat_test.clone(),
        );
        registry.register("config_reloads", "Certificate and policy reloads (SIGHUP), by result", m.reloads.clone());
        // A gauge fixed at 1 rather than an OpenMetrics `info`, which Prometheus' text
        // parser (and promtool) do not accept.
        let build = Family::<Vec<(String, String)>, Gauge>::default();
        build.get_or_create(&vec![("version".to_string(), env!("CARGO_PKG_VERSION").to_string())]).set(1);
        registry.register("build_info", "Relay build information", build);
        // Pre-create every label value so dashboards see zeros, not gaps.
        for w in 0..workers {
            let worker = w.to_string();
            let label = WorkerLabel { worker: worker.clone() };
            let _ = m.packets_in.get_or_create(&label);
            let _ = m.packets_out.get_or_create(&label);
            let _ = m.bytes_in.get_or_create(&label);
            let _ = m.bytes_out.get_or_create(&label);
            let _ = m.frames_forwarded.get_or_create(&label);
            let _ = m.handoffs.get_or_create(&label);
            let _ = m.rx_no_buffers.get_or_create(&label);
            let _ = m.control_connections.get_or_create(&label);
            let _ = m.sessions_active.get_or_create(&label);
        }
        for r in ["ok", "failed"] {
            let _ = m.handshakes.get_or_create(&ReasonLabel { reason: r.into() });
        }
        for r in AUTH_FAILURE_REASONS {
            let _ = m.auth_failures.get_or_create(&ReasonLabel { reason: r.into() });
        }
        for c in ErrorCode::ALL {
            let _ = m.refusals.get_or_create(&ReasonLabel { reason: c.name().into() });
        }
        for message in SIGNAL_MESSAGES {
            for result in SIGNAL_RESULTS {
                let _ = m.signaling.get_or_create(&SignalLabel { message: message.into(), result: result.into() });
            }
        }
        for r in NAT_TEST_RESULTS {
            let _ = m.nat_test.get_or_create(&ResultLabel { result: r.into() });
        }
        for f in ["ipv4", "ipv6"] {
            let _ = m.qad_reports.get_or_create(&FamilyLabel { family: f.into() });
        }
        Metrics { registry, ..m }
    }

    /// Handles for one worker's hot path.
    pub fn worker(&self, worker: usize) -> WorkerMetrics {
        let label = WorkerLabel { worker: worker.to_string() };
        let counter = |f: &Family<WorkerLabel, Counter>| f.get_or_create(&label).clone();
        WorkerMetrics {
            worker: label.worker.clone(),
            packets_in: counter(&self.packets_in),
            packets_out: counter(&self.packets_out),
            bytes_in: counter(&self.bytes_in),
            bytes_out: counter(&self.bytes_out),
            frames_forwarded: counter(&self.frames_forwarded),
            handoffs: counter(&self.handoffs),
            rx_no_buffers: counter(&self.rx_no_buffers),
            control_connections: self.control_connections.get_or_create(&label).clone(),
            sessions_active: self.sessions_active.get_or_create(&label).clone(),
            dropped: DropReason::ALL.map(|reason| {
                self.dropped.get_or_create(&DropLabel { worker: label.worker.clone(), reason }).clone()
            }),
        }
    }

    /// Records the backend chosen at start (`uring` or `mmsg`).
    pub fn set_io_backend(&self, backend: &str) {
        self.io_backend.get_or_create(&vec![("backend".to_string(), backend.to_string())]).set(1);
    }

    pub fn auth_failure(&self, reason: &str) {
        self.auth_failures.get_or_create(&ReasonLabel { reason: reason.into() }).inc();
    }

    pub fn refusal(&self, code: ErrorCode) {
        self.refusals.get_or_create(&ReasonLabel { reason: code.name().into() }).inc();
    }

    pub fn session_closed(&self, reason: ErrorCode) {
        self.sessions_closed.get_or_create(&ReasonLabel { reason: reason.name().into() }).inc();
    }

    /// A path signalling message (one of [`SIGNAL_MESSAGES`]) had `result` ([`SIGNAL_RESULTS`]).
    pub fn signal(&self, message: &str, result: &str) {
        self.signaling.get_or_create(&SignalLabel { message: message.into(), result: result.into() }).inc();
    }

    /// The counter of NAT-test datagrams with `result` (one of [`NAT_TEST_RESULTS`]).
    pub fn nat_test(&self, result: &str) -> Counter {
        self.nat_test.get_or_create(&ResultLabel { result: result.into() }).clone()
    }

    pub fn handshake(&self, ok: bool) {
        self.handshakes.get_or_create(&ReasonLabel { reason: if ok { "ok" } else { "failed" }.into() }).inc();
    }

    pub fn qad_report(&self, addr: &std::net::SocketAddr) {
        let family = if ztna_proto::addr::canonical(*addr).is_ipv4() { "ipv4" } else { "ipv6" };
        self.qad_reports.get_or_create(&FamilyLabel { family: family.into() }).inc();
    }

    /// Prometheus text format 0.0.4, what `promtool check metrics` and older scrapers read.
    pub fn encode_prometheus(&self) -> String {
        ztna_metrics_http::openmetrics_to_prometheus(&self.encode())
    }

    /// OpenMetrics 1.0 text.
    pub fn encode(&self) -> String {
        ztna_metrics_http::encode(&self.registry)
    }
}

/// One worker's counters, resolved once.
pub struct WorkerMetrics {
    pub worker: String,
    pub packets_in: Counter,
    pub packets_out: Counter,
    pub bytes_in: Counter,
    pub bytes_out: Counter,
    pub frames_forwarded: Counter,
    pub handoffs: Counter,
    pub rx_no_buffers: Counter,
    pub control_connections: Gauge,
    pub sessions_active: Gauge,
    dropped: [Counter; DropReason::ALL.len()],
}

impl WorkerMetrics {
    /// Counts a drop: an index and an atomic add (`ALL` lists the variants in order).
    pub fn drop(&self, reason: DropReason) {
        self.dropped[reason as usize].inc();
    }

    pub fn dropped(&self, reason: DropReason) -> u64 {
        self.dropped[reason as usize].get()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drop_reasons_index_their_counters() {
        for (i, r) in DropReason::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i);
        }
        let m = Metrics::new(1);
        let w = m.worker(0);
        w.drop(DropReason::unbound_source);
        assert_eq!(w.dropped(DropReason::unbound_source), 1);
        assert!(m.encode_prometheus().contains("ztna_relay_dropped_total{worker=\"0\",reason=\"unbound_source\"} 1"));
    }

}
