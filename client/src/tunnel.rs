//! One end-to-end tunnel: a quiche connection between agent (client) and connector (server)
//! for one relay session, mutually authenticated with certificates from the deployment CA.
//! The relay only ever sees its packets as opaque DATA-frame payloads.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use ztna_proto::SessionId;
use ztna_proto::candidate::{Candidate, PUNCH_TOKEN_LEN};
use ztna_proto::identity::Identity;

use crate::direct::{Action, Punch};
use crate::keepalive::KeepAlive;
use crate::path::{PathLayer, Side, is_label};

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

/// Connection ids each side keeps issued to the other, so the agent can probe several
/// direct paths and both can move between paths (quiche needs a fresh id per new path).
pub const ACTIVE_CONNECTION_IDS: u64 = 8;

/// A change of the path the tunnel uses, for the engine to report (PathStatus, metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathChange {
    /// Moved to the direct path to this address.
    Direct(SocketAddr),
    /// Back on the relay path.
    Relay,
}

/// What one punching round asks of the engine besides quiche.
#[derive(Debug, Default)]
pub struct PathWork {
    /// PUNCH frames to send.
    pub punches: Vec<SocketAddr>,
    /// Attempts that ended without a direct path.
    pub failed_attempts: u32,
}

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
    /// The tunnel's key for its whole life: its first relay session (`path.session()` is the
    /// current one).
    pub session: SessionId,
    pub service: String,
    /// The identity the relay announced for the other side; the certificate must match.
    pub peer_identity: String,
    pub conn: quiche::Connection,
    pub path: PathLayer,
    /// The peer's certificate has been checked against `peer_identity`.
    pub verified: bool,
    /// Since when the tunnel has had no relay session (the control connection was lost).
    pub orphaned: Option<Instant>,
    side: Side,
    /// The agent keeps idle tunnels alive; the connector only answers.
    keepalive: Option<KeepAlive>,
    next_stream: u64,
    /// When the tunnel was opened (for the time-to-direct histogram).
    pub opened: Instant,
    /// It has been on a direct path before (only the first move counts as time to direct).
    pub was_direct: bool,
    /// Path changes not yet reported by the engine.
    changes: Vec<PathChange>,
    actions: Vec<Action>,
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
            orphaned: None,
            side,
            keepalive: (side == Side::Agent).then(|| KeepAlive::new(KEEPALIVE)),
            // Client-initiated bidirectional streams: 0, 4, 8, ...
            next_stream: 0,
            opened: Instant::now(),
            was_direct: false,
            changes: Vec::new(),
            actions: Vec::new(),
        }
    }

    /// A DATA frame for this tunnel's session, from the relay or straight from the peer.
    /// False when a direct one was not an authentic packet of this connection (counted by
    /// the caller); a relayed one quiche rejects is dropped and loss recovery covers it.
    pub fn recv_frame(&mut self, datagram: &mut [u8], from: SocketAddr, now: Instant) -> bool {
        let Some((packet, info)) = self.path.unwrap(datagram, from) else { return true };
        if from == self.path.relay() {
            let _ = self.conn.recv(packet, info);
            self.path_events(now);
            return true;
        }
        // quiche drops what it cannot decrypt without an error: its count of packets
        // accepted on this path says whether this one was authentic.
        let before = received_on(&self.conn, info.to, from);
        let _ = self.conn.recv(packet, info);
        let authentic = received_on(&self.conn, info.to, from) > before;
        if authentic {
            let validated = self.conn.is_path_validated(info.to, from).unwrap_or(false);
            if let Some(a) = self.path.direct.on_authenticated_rx(from, validated, now) {
                self.apply(a, now, &mut PathWork::default());
            }
        }
        self.path_events(now);
        authentic
    }

    /// The peer's candidates and the session's punch token, relayed.
    pub fn add_candidates(&mut self, token: [u8; PUNCH_TOKEN_LEN], candidates: &[Candidate], now: Instant) {
        self.path.direct.add_candidates(token, candidates, now);
    }

    /// A PUNCH frame for this session from `from`.
    pub fn on_punch(&mut self, from: SocketAddr, token: &[u8; PUNCH_TOKEN_LEN], now: Instant) -> Punch {
        self.path.direct.on_punch(from, token, now)
    }

    /// Path changes since the last call.
    pub fn take_changes(&mut self) -> impl Iterator<Item = PathChange> + '_ {
        self.changes.drain(..)
    }

    /// Runs the direct-path schedule: probes, pings and migrations go to quiche here; the
    /// punches to send are added to `work`.
    pub fn drive_paths(&mut self, now: Instant, work: &mut PathWork) {
        // quiche sends the ids once the handshake is confirmed, so a probe waits about one
        // round trip after the agent's handshake completes for the connector's ids.
        if self.conn.is_established() {
            self.issue_connection_ids();
        }
        let can_probe = self.conn.is_established() && self.conn.available_dcids() > 0;
        let mut actions = std::mem::take(&mut self.actions);
        self.path.direct.poll(now, can_probe, &mut actions);
        for a in actions.drain(..) {
            self.apply(a, now, work);
        }
        self.actions = actions;
    }

    fn apply(&mut self, action: Action, now: Instant, work: &mut PathWork) {
        let local = self.path.local_label();
        match action {
            Action::Punch(to) => work.punches.push(to),
            Action::Probe(to) => {
                // Out of connection ids or paths: the next round tries again.
                let _ = self.conn.probe_path(local, to);
            }
            Action::Ping(to) => {
                let _ = self.conn.send_ack_eliciting_on_path(local, to);
            }
            // After a move, a PING goes out on the new path at once: the connector follows
            // the first non-probing packet it sees there, and a receiving agent may have
            // nothing else to send.
            Action::Migrate(to) => {
                if self.conn.migrate(local, to).is_ok() {
                    let _ = self.conn.send_ack_eliciting();
                    self.path.direct.now_direct(to, now);
                    self.changes.push(PathChange::Direct(to));
                }
            }
            Action::FallBack(_) => {
                if self.conn.migrate(local, self.path.peer_label()).is_ok() {
                    let _ = self.conn.send_ack_eliciting();
                    self.path.direct.now_relayed(now);
                    self.changes.push(PathChange::Relay);
                }
            }
            Action::AttemptFailed => work.failed_attempts += 1,
        }
    }

    /// What quiche says about paths: the agent's probes answered or failed; the agent's
    /// migrations, as the connector sees them.
    fn path_events(&mut self, now: Instant) {
        while let Some(ev) = self.conn.path_event_next() {
            match ev {
                quiche::PathEvent::Validated(_, peer) => {
                    if let Some(a) = self.path.direct.on_validated(peer, now) {
                        self.apply(a, now, &mut PathWork::default());
                    }
                }
                quiche::PathEvent::PeerMigrated(_, peer) if self.side == Side::Connector => {
                    let was = self.path.direct.active();
                    if is_label(peer) {
                        if was.is_some() {
                            self.path.direct.now_relayed(now);
                            self.changes.push(PathChange::Relay);
                        }
                    } else if was != Some(peer) {
                        self.path.direct.now_direct(peer, now);
                        self.changes.push(PathChange::Direct(peer));
                    }
                }
                _ => {}
            }
        }
    }

    /// Keeps the peer supplied with spare connection ids (each new path takes one).
    fn issue_connection_ids(&mut self) {
        while self.conn.scids_left() > 0 {
            let scid: [u8; 16] = rand::random();
            if self.conn.new_scid(&quiche::ConnectionId::from_ref(&scid), rand::random(), false).is_err() {
                break;
            }
        }
    }

    /// The next framed datagram to send: written into `buf` with the frame header in front.
    pub fn poll_transmit(&mut self, buf: &mut [u8]) -> Option<(usize, SocketAddr)> {
        let room = (buf.len() - PathLayer::HEADROOM).min(MAX_TUNNEL_PACKET);
        loop {
            let (n, info) = self.conn.send(&mut buf[PathLayer::HEADROOM..PathLayer::HEADROOM + room]).ok()?;
            let now = Instant::now();
            if let Some(k) = &mut self.keepalive {
                k.sent(now);
            }
            if !is_label(info.to) {
                self.path.direct.on_direct_tx(now);
            }
            // quiche addresses only the peer's label or a real address it has a path to, so
            // this always maps; anything else would be lost, and loss recovery covers that.
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
        let quic = match &self.keepalive {
            Some(k) => k.timeout(&self.conn, now),
            None => self.conn.timeout(),
        };
        match (quic, self.path.direct.timeout(now)) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
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

/// Packets quiche accepted on the path between `local` and `peer` (0 while there is none).
/// Cheap per packet, unlike `Connection::stats`, which walks every stream.
fn received_on(conn: &quiche::Connection, local: SocketAddr, peer: SocketAddr) -> usize {
    conn.path_stats().find(|p| p.local_addr == local && p.peer_addr == peer).map_or(0, |p| p.recv)
}
