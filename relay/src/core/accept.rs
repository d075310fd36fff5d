//! A client Initial for no known connection: version negotiation, stateless Retry, the
//! relay-wide handshake limit (and the XDP blocklist past it), then a new connection.

use std::net::SocketAddr;
use std::time::Instant;

use ztna_proto::steering;

use super::conn::{ConnKey, ControlConn};
use super::conns::ConnTable;
use super::{Ctx, Sink};
use crate::metrics::DropReason;

impl Ctx {
    /// Returns the new connection's key, or `None` when the Initial was answered
    /// statelessly or dropped (and counted).
    pub(super) fn accept(
        &mut self,
        conns: &mut ConnTable,
        hdr: &quiche::Header<'_>,
        buf: &[u8],
        from: SocketAddr,
        now: Instant,
        sink: &mut impl Sink,
    ) -> Option<ConnKey> {
        // RFC 9000 §14.1: client Initials are padded to 1200 bytes; answering smaller
        // datagrams (Retry, version negotiation) could make the relay an amplifier.
        if buf.len() < 1200 {
            self.m.drop(DropReason::short_initial);
            return None;
        }
        if !quiche::version_is_supported(hdr.version) {
            self.m.drop(DropReason::unsupported_version);
            sink.send_with(from, |out| quiche::negotiate_version(&hdr.scid, &hdr.dcid, out).unwrap_or(0));
            return None;
        }
        let limits = &self.shared.config.limits;
        if self.shared.is_draining() || conns.len() >= limits.max_connections_per_worker {
            self.m.drop(DropReason::connection_limit);
            return None;
        }
        let (scid, odcid) = if limits.retry {
            let token = hdr.token.as_deref().unwrap_or(&[]);
            if token.is_empty() {
                self.send_retry(conns, hdr, from, sink);
                return None;
            }
            let Some(odcid) = self.shared.retry_key.validate(&from, token) else {
                self.m.drop(DropReason::invalid_token);
                return None;
            };
            // After Retry the client's DCID is the id we chose: it must name this worker.
            match <ConnKey>::try_from(&hdr.dcid[..]) {
                Ok(scid) if scid[0] == self.index => (scid, Some(odcid)),
                _ => {
                    self.m.drop(DropReason::invalid_token);
                    return None;
                }
            }
        } else {
            (self.new_conn_id(conns), None)
        };
        if !self.shared.limiter.allow(from.ip(), now) {
            // Over the limit: let XDP drop this source's Initials for a while, before
            // they cost a wake-up and a Retry check here.
            if sink.has_blocklist()
                && let Some(until) = self.shared.limiter.block(from.ip(), now, limits.blocklist_for())
            {
                sink.block(from.ip(), until, now);
                self.shared.metrics.blocklisted.inc();
            }
            self.m.drop(DropReason::rate_limited);
            return None;
        }
        let odcid_ref = odcid.map(quiche::ConnectionId::from_ref);
        let scid_ref = quiche::ConnectionId::from_ref(&scid);
        // The connection keeps this id (the relay issues no others), so one token covers it.
        self.quic_config.set_stateless_reset_token(Some(self.shared.reset_key.token(&scid)));
        let quic = match quiche::accept(&scid_ref, odcid_ref.as_ref(), self.shared.local_addr, from, &mut self.quic_config) {
            Ok(q) => q,
            Err(e) => {
                tracing::debug!(error = %e, %from, "accept failed");
                self.m.drop(DropReason::quic_error);
                return None;
            }
        };
        // Without Retry, the client's retransmitted Initials still carry its own DCID.
        let alias = odcid.is_none().then_some(&hdr.dcid[..]);
        conns.insert(ControlConn::new(quic, scid, from, now, self.shared.config.limits.connector_liveness()), alias);
        self.m.control_connections.inc();
        Some(scid)
    }

    fn send_retry(&mut self, conns: &ConnTable, hdr: &quiche::Header<'_>, from: SocketAddr, sink: &mut impl Sink) {
        let new_scid = self.new_conn_id(conns);
        let mut tok = [0u8; crate::retry::MAX_TOKEN_LEN];
        let n = self.shared.retry_key.mint(&from, &hdr.dcid, &mut tok);
        let scid = quiche::ConnectionId::from_ref(&new_scid);
        sink.send_with(from, |out| quiche::retry(&hdr.scid, &hdr.dcid, &scid, &tok[..n], hdr.version, out).unwrap_or(0));
        self.shared.metrics.retries_sent.inc();
    }

    /// A fresh connection id for this worker that routes here under both steering rules.
    fn new_conn_id(&self, conns: &ConnTable) -> ConnKey {
        loop {
            let id = ztna_proto::id::make_id(self.index, rand::random());
            if steering::id_is_consistent(&id, self.shared.workers) && !conns.contains(&id) {
                return id;
            }
        }
    }
}
