//! One end-to-end tunnel: a quiche connection between agent (client) and connector (server)
//! for one relay session, mutually authenticated with certificates from the deployment CA.
//! The relay only ever sees its packets as opaque DATA-frame payloads.

use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use ztna_proto::SessionId;
use ztna_proto::identity::Identity;

use crate::keepalive::KeepAlive;
use crate::path::{PathLayer, Side};

pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Keep-alive inside the idle timeout, so an idle tunnel (and its NAT mappings) stays up.
pub const KEEPALIVE: Duration = Duration::from_secs(15);
/// Largest tunnel packet; with the DATA header it is the relay datagram.
pub const MAX_TUNNEL_PACKET: usize = 1200;
/// Per-stream flow-control window: how far a sender may run ahead of a slow reader.
pub const STREAM_WINDOW: u64 = 1024 * 1024;
/// Whole-connection window.
pub const CONNECTION_WINDOW: u64 = 16 * 1024 * 1024;
/// Concurrent TCP flows per tunnel (quiche raises the limit as streams finish).
pub const MAX_STREAMS: u64 = 1024;
/// UDP flows with no traffic for this long are forgotten (the connector closes its backend
/// socket, the agent's forward forgets the client address).
pub const UDP_FLOW_IDLE: Duration = Duration::from_secs(60);

/// QUIC stream error codes of the tunnel (RESET_STREAM / STOP_SENDING).
pub mod stream_error {
    /// The local TCP connection was reset or failed.
    pub const TCP_RESET: u64 = 1;
    /// The connector could not reach the backend (refused, unreachable, timed out).
    pub const BACKEND_UNREACHABLE: u64 = 2;
    /// The tunnel or session is going away.
    pub const TUNNEL_CLOSED: u64 = 3;
}

pub struct Tunnel {
    pub session: SessionId,
    pub service: String,
    /// The identity the relay announced for the other side; the certificate must match.
    pub peer_identity: String,
    pub conn: quiche::Connection,
    pub path: PathLayer,
    /// The peer's certificate has been checked against `peer_identity`.
    pub verified: bool,
    side: Side,
    /// The agent keeps idle tunnels alive; the connector only answers.
    keepalive: Option<KeepAlive>,
    next_stream: u64,
}

impl Tunnel {
    /// Agent side: start the handshake towards the connector.
    pub fn connect(
        session: SessionId,
        service: String,
        peer_identity: String,
        path: PathLayer,
        config: &mut quiche::Config,
    ) -> Result<Tunnel> {
        let path = path.for_side(Side::Agent);
        let scid: [u8; 16] = rand::random();
        let conn = quiche::connect(
            None,
            &quiche::ConnectionId::from_ref(&scid),
            path.local_label(),
            path.peer_label(),
            config,
        )?;
        Ok(Tunnel::new(session, service, peer_identity, path, conn, Side::Agent))
    }

    /// Connector side: accept the agent's first packet.
    pub fn accept(
        session: SessionId,
        service: String,
        peer_identity: String,
        path: PathLayer,
        config: &mut quiche::Config,
    ) -> Result<Tunnel> {
        let path = path.for_side(Side::Connector);
        let scid: [u8; 16] = rand::random();
        let conn =
            quiche::accept(&quiche::ConnectionId::from_ref(&scid), None, path.local_label(), path.peer_label(), config)?;
        Ok(Tunnel::new(session, service, peer_identity, path, conn, Side::Connector))
    }

    fn new(
        session: SessionId,
        service: String,
        peer_identity: String,
        path: PathLayer,
        conn: quiche::Connection,
        side: Side,
    ) -> Tunnel {
        Tunnel {
            session,
            service,
            peer_identity,
            conn,
            path,
            verified: false,
            side,
            keepalive: (side == Side::Agent).then(|| KeepAlive::new(KEEPALIVE)),
            // Client-initiated bidirectional streams: 0, 4, 8, ...
            next_stream: 0,
        }
    }

    /// A tunnel packet (a DATA frame's payload) from the peer, on the relay path.
    pub fn recv(&mut self, packet: &mut [u8]) {
        // A packet quiche rejects is dropped; loss recovery covers it.
        let _ = self.conn.recv(packet, self.path.recv_info());
    }

    /// A datagram for this tunnel's session: the path layer takes what is really ours.
    pub fn recv_frame(&mut self, datagram: &mut [u8], from: std::net::SocketAddr) {
        if let Some((packet, info)) = self.path.unwrap(datagram, from) {
            let _ = self.conn.recv(packet, info);
        }
    }

    /// The next framed datagram to send: written into `buf` with the frame header in front.
    pub fn poll_transmit(&mut self, buf: &mut [u8]) -> Option<(usize, std::net::SocketAddr)> {
        let room = (buf.len() - PathLayer::HEADROOM).min(MAX_TUNNEL_PACKET);
        loop {
            let (n, info) = self.conn.send(&mut buf[PathLayer::HEADROOM..PathLayer::HEADROOM + room]).ok()?;
            if let Some(k) = &mut self.keepalive {
                k.sent(Instant::now());
            }
            // quiche only addresses the label it was given, so this always maps; a packet
            // for a label without a path would be lost, and loss recovery covers that.
            if let Some(framed) = self.path.wrap(buf, n, info.to) {
                return Some(framed);
            }
        }
    }

    /// Once established: the peer's certificate must name the identity the relay announced.
    pub fn verify_peer(&mut self) -> Result<()> {
        // Before the handshake completes, a certificate may be present but unverified.
        if !self.conn.is_established() {
            bail!("the tunnel handshake has not completed");
        }
        let der = self.conn.peer_cert().ok_or_else(|| anyhow::anyhow!("peer presented no certificate"))?;
        let got = Identity::from_certificate_der(der)?;
        if got.to_string() != self.peer_identity {
            bail!("peer is {got}, but the relay announced {}", self.peer_identity);
        }
        self.verified = true;
        Ok(())
    }

    pub fn timeout(&self, now: Instant) -> Option<Duration> {
        match &self.keepalive {
            Some(k) => k.timeout(&self.conn, now),
            None => self.conn.timeout(),
        }
    }

    pub fn on_timeout(&mut self, now: Instant) {
        match &self.keepalive {
            Some(k) => k.on_timeout(&mut self.conn, now),
            None => self.conn.on_timeout(),
        }
    }

    /// A new stream id for a TCP flow (agent side).
    pub fn open_stream(&mut self) -> u64 {
        let id = self.next_stream;
        self.next_stream += 4;
        id
    }

    pub fn side(&self) -> Side {
        self.side
    }

    pub fn is_agent(&self) -> bool {
        self.side == Side::Agent
    }
}
