//! The client engine shared by agent and connector: one task that owns the UDP socket (control
//! QUIC, relay frames and every end-to-end tunnel share it, so QAD reports the mapping the data
//! path uses), the control connection with reconnect, and the tunnels with their flows.
//!
//! This module is the role-independent core. What only an agent or only a connector does
//! (asking for sessions and serving local forwards; registering, accepting tunnels and
//! reaching backends) lives in [`agent`] and [`connector`], behind the [`Role`] hooks.
//! TCP flows over tunnel streams are [`streams`]; how tunnel packets travel is the path layer
//! (`crate::path`).
//!
//! Modules depend downwards only: the roles use the core, the core uses `streams`, and
//! nothing here uses a role. Log lines that tools and operators match on carry the target
//! `ztna_client::engine` ([`LOG`]) whichever module emits them (the rest log under their
//! module path, which starts with it too).

pub mod agent;
pub mod connector;
pub mod streams;
mod table;

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use ztna_proto::candidate::{Candidate, CandidateKind, PUNCH_TOKEN_LEN};
use ztna_proto::frame::{self, Frame};
use ztna_proto::liveness::{CONTROL_LIVENESS, Liveness, Verdict};
use ztna_proto::tunnel::UdpDatagram;
use ztna_proto::{ErrorCode, Message, SessionId};

use crate::backoff::Backoff;
use crate::candidates::host_candidates;
use crate::control::{ClientError, ControlCore, RelayInfo};
use crate::direct::Punch;
use crate::flows::{FlowEvent, FlowKey};
use crate::metrics::ClientMetrics;
use crate::p2p::P2pSocket;
use crate::path::{PathLayer, Side};
use crate::tls::ClientTls;
use crate::tunnel::{PathChange, PathWork, Tunnel};
use streams::Streams;
use table::TunnelTable;

/// The tracing target of the engine's log lines (`ztna_client::engine: lost the relay`).
pub const LOG: &str = "ztna_client::engine";
const MAX_DATAGRAM: usize = 2048;
/// Datagrams taken from the socket per wake-up before servicing timers and sending.
const RECV_BATCH: usize = 64;
/// A connector's control keep-alive. Agents keep the control connection's 10 s: a connector
/// that sends more often learns sooner of a relay that crashed and came back (its next packet
/// draws a stateless reset), and agents' new sessions wait for connectors to re-register.
const CONNECTOR_KEEPALIVE: Duration = Duration::from_secs(2);
/// How long a tunnel on the relay path may wait for a new relay session after the control
/// connection was lost; then it is closed (a tunnel on a direct path waits as long as that
/// path works).
pub const RESUME_WITHIN: Duration = Duration::from_secs(30);
/// The longest reconnect spread a relay may ask for (`GoingAway`): more would only leave
/// tunnels without a relay session for longer.
const MAX_RECONNECT_SPREAD: Duration = Duration::from_secs(30);
/// Peer candidates kept for sessions whose tunnel has not started yet (the connector hears
/// of them with the offer, before the agent's first packet).
const MAX_PENDING_CANDIDATES: usize = 1024;

#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub relay: SocketAddr,
    pub server_name: Option<String>,
    pub tls: ClientTls,
    pub software: String,
    pub connect_timeout: Duration,
    pub direct: crate::candidates::DirectConfig,
}

/// What an agent or a connector adds to the core. Every hook gets the core, so a role can
/// open tunnels and flows, send control messages and UDP datagrams.
pub trait Role {
    /// What the role's own tasks (local listeners, backends) send to the engine.
    type Event: Send + 'static;
    /// Which end of every tunnel this role is.
    const SIDE: Side;

    /// Before the connection is taken over: may the program go on with what the relay said?
    /// `first` on the first successful connect.
    fn check_relay(&self, _info: &RelayInfo, _first: bool) -> Result<()> {
        Ok(())
    }
    /// After every (re)connect.
    fn on_connected(&mut self, core: &mut Core);
    /// The control connection is gone, and with it every session.
    fn on_disconnected(&mut self);
    /// A control message the core does not handle itself (offers, registration).
    fn on_message(&mut self, core: &mut Core, msg: Message) -> Result<()>;
    /// The relay refused request `request_id`; false when the request is not this role's.
    fn on_refused(&mut self, _request_id: u32, _code: ErrorCode, _message: &str) -> bool {
        false
    }
    /// The relay closed a session, whether or not it has a tunnel yet.
    fn on_session_closed(&mut self, _session: SessionId) {}
    /// A DATA frame from the relay for a session without a tunnel (`datagram` is the whole
    /// frame); the role may open the tunnel now.
    fn on_unknown_session(&mut self, _core: &mut Core, _session: SessionId, _datagram: &[u8]) {}
    /// The tunnel's peer proved the identity the relay announced.
    fn on_verified(&mut self, _core: &mut Core, _session: SessionId) {}
    /// The peer opened a TCP flow (connector).
    fn on_new_stream(&mut self, _core: &mut Core, _key: FlowKey) {}
    /// A UDP flow datagram from the peer, on `tunnel`.
    fn on_udp(&mut self, tunnel: &Tunnel, dgram: UdpDatagram<'_>);
    fn on_event(&mut self, core: &mut Core, event: Self::Event);
    fn on_timers(&mut self, _core: &mut Core, _now: Instant) {}
    /// The tunnel left the table (its flows are already reset).
    fn on_tunnel_closed(&mut self, _tunnel: &Tunnel) {}
}

/// The role-independent state: socket, control connection, tunnels and their flows.
pub struct Core {
    cfg: EngineConfig,
    side: Side,
    metrics: Arc<ClientMetrics>,
    /// Bound at the first connection attempt and kept for good: the tunnels' relay frames,
    /// their direct paths and the NAT mapping peers punch towards all live on it, across
    /// control connections.
    socket: Option<UdpSocket>,
    /// A control connection being set up, driven by the loop like everything else.
    connecting: Option<ControlCore>,
    /// Direct traffic's own socket, when configured; it outlives control connections.
    p2p: Option<P2pSocket>,
    control: Option<ControlCore>,
    /// Whether the relay answers what we send it: a dead relay is noticed in seconds, not at
    /// the control connection's 30 s idle timeout.
    relay_liveness: Liveness,
    backoff: Backoff,
    reconnect_at: Option<Instant>,
    /// The relay said it is going away: come back at a random moment within this.
    going_away: Option<Duration>,
    ever_connected: bool,
    tunnel_config: quiche::Config,
    tunnels: TunnelTable,
    /// Relay sessions that carry a tunnel of another key (one resumed after a relay loss).
    aliases: HashMap<SessionId, SessionId>,
    /// While tunnels wait for new relay sessions: when to look for ones that waited too long.
    next_orphan_check: Option<Instant>,
    /// Relayed peer candidates of sessions without a tunnel yet.
    pending_candidates: HashMap<SessionId, ([u8; PUNCH_TOKEN_LEN], Vec<Candidate>)>,
    /// Our address as the relay last reported it (QAD): a change is a new candidate.
    observed: Option<SocketAddr>,
    path_work: PathWork,
    streams: Streams,
    /// Datagrams to handle again, as if just received (frames that beat their offer, frames
    /// that arrived while the control connection was being set up).
    replay: VecDeque<(Vec<u8>, SocketAddr)>,
    rxbuf: Vec<u8>,
    txbuf: Vec<u8>,
    dgrambuf: Vec<u8>,
}

impl Core {
    pub fn relay(&self) -> SocketAddr {
        self.cfg.relay
    }

    /// There is a control connection (it may have closed since the last timer run).
    pub fn is_connected(&self) -> bool {
        self.control.is_some()
    }

    /// Queues a control message; false when there is no control connection or it failed.
    pub fn send_control(&mut self, msg: &Message) -> bool {
        self.control.as_mut().is_some_and(|core| core.send(msg).is_ok())
    }

    pub fn tunnel(&self, session: SessionId) -> Option<&Tunnel> {
        self.tunnels.get(&session)
    }

    /// The key of the tunnel that relay session `session` carries.
    fn tunnel_key(&self, session: SessionId) -> SessionId {
        self.aliases.get(&session).copied().unwrap_or(session)
    }

    /// Tunnels that lost their relay session: (key, service, peer identity).
    pub fn orphaned_tunnels(&self) -> Vec<(SessionId, String, String)> {
        self.tunnels.iter().filter(|t| t.orphaned.is_some()).map(|t| (t.session, t.service.clone(), t.peer_identity.clone())).collect()
    }

    /// Tunnel `key` now rides relay session `session`: its relay frames carry that id, and
    /// QUIC is made to send at once so what the outage held up is retransmitted now rather
    /// than at its backed-off timer. False when there is no such tunnel.
    pub fn resume_tunnel(&mut self, key: SessionId, session: SessionId) -> bool {
        let Some(t) = self.tunnels.get_mut(&key) else { return false };
        let stalled = t.orphaned.take().map(|since| since.elapsed());
        let old = t.path.session();
        t.path.rebind(session);
        let _ = t.conn.send_ack_eliciting();
        let direct = t.path.direct.active().is_some();
        self.aliases.remove(&old);
        if session != key {
            self.aliases.insert(session, key);
        }
        self.metrics.tunnels_resumed.inc();
        tracing::info!(target: LOG, tunnel = %key, %session, ?stalled, "tunnel resumed on a new relay session");
        if direct {
            self.send_control(&Message::PathStatus { session, direct });
        }
        true
    }

    /// The session's tunnel exists and its peer is who the relay announced.
    pub fn is_verified(&self, session: SessionId) -> bool {
        self.tunnels.get(&session).is_some_and(|t| t.verified)
    }

    /// Starts the session's tunnel over the relay: the agent's handshake, or the connector's
    /// side of it (then the agent's first packet is due).
    pub fn open_tunnel(&mut self, session: SessionId, service: String, peer_identity: String) -> Result<()> {
        let path = PathLayer::via_relay(session, self.cfg.relay);
        let config = &mut self.tunnel_config;
        let t = match self.side {
            Side::Agent => Tunnel::connect(session, service, peer_identity, path, config)?,
            Side::Connector => Tunnel::accept(session, service, peer_identity, path, config)?,
        };
        let mut t = t;
        if let Some((token, candidates)) = self.pending_candidates.remove(&session) {
            t.add_candidates(token, &candidates, Instant::now());
        }
        self.tunnels.insert(session, t);
        self.metrics.sessions.inc();
        self.metrics.tunnel_path(None, Some("relay"));
        self.announce_candidates(session, None);
        Ok(())
    }

    /// Tells the peer (through the relay) where else it may reach us: our interfaces, and
    /// `reflexive` when our mapping changed mid-session (the relay announced the first one
    /// itself).
    fn announce_candidates(&mut self, session: SessionId, reflexive: Option<SocketAddr>) {
        if !self.cfg.direct.enabled {
            return;
        }
        let local = match &self.p2p {
            Some(p2p) => Some(p2p.local),
            None => self.socket.as_ref().and_then(|s| s.local_addr().ok()),
        };
        let Some(local) = local else { return };
        let mut candidates = host_candidates(local, &self.cfg.direct);
        if let Some(addr) = reflexive {
            candidates.insert(0, Candidate::new(CandidateKind::ServerReflexive, addr));
        }
        let session = self.tunnels.get(&session).map_or(session, |t| t.path.session());
        if !candidates.is_empty() {
            self.send_control(&Message::Candidates { session, candidates });
        }
    }

    /// A local connection becomes a new flow of the session's tunnel (agent).
    pub fn open_flow(&mut self, session: SessionId, stream: tokio::net::TcpStream) {
        if let Some(t) = self.tunnels.get_mut(&session) {
            self.streams.open(t, stream);
        }
    }

    /// The backend of an announced flow answered (connector).
    pub fn attach_flow(&mut self, key: FlowKey, stream: tokio::net::TcpStream) {
        self.streams.attach(self.tunnels.get_mut(&key.0), key, stream);
    }

    pub fn reset_flow(&mut self, key: FlowKey, code: u64) {
        self.streams.reset(self.tunnels.get_mut(&key.0), key, code);
    }

    /// Sends one UDP datagram of a flow; one that QUIC cannot carry whole is dropped and
    /// counted.
    pub fn send_udp(&mut self, session: SessionId, flow: u32, data: &[u8]) {
        let Some(t) = self.tunnels.get_mut(&session) else { return };
        let dgram = UdpDatagram { flow, payload: data };
        let fits = t.conn.dgram_max_writable_len().is_some_and(|max| dgram.len() <= max);
        let Some(n) = fits.then(|| dgram.write(&mut self.dgrambuf).ok()).flatten() else {
            self.metrics.udp_dropped_oversize.inc();
            return;
        };
        if t.conn.dgram_send(&self.dgrambuf[..n]).is_ok() {
            self.metrics.bytes_to_peer.inc_by(data.len() as u64);
        }
    }

    /// Handles `datagram` again once the current message is done.
    pub fn replay(&mut self, datagram: Vec<u8>, from: SocketAddr) {
        self.replay.push_back((datagram, from));
    }

    /// Starts a connection attempt on the engine's socket (bound now if it is the first);
    /// the loop drives it.
    fn start_connect(&mut self) -> Result<()> {
        let c = &self.cfg;
        if self.socket.is_none() {
            // Dual stack, so direct paths may use IPv6 host candidates whatever the relay's family.
            match crate::control::bind_engine_socket(c.relay) {
                Ok(socket) => self.socket = Some(socket),
                Err(e) => return self.connect_failed(e.into()),
            }
        }
        let local = self.socket.as_ref().and_then(|s| s.local_addr().ok());
        let Some(local) = local else { return self.connect_failed(ClientError::Closed) };
        match ControlCore::connect(local, c.relay, c.server_name.as_deref(), &c.tls, &c.software, c.connect_timeout) {
            Ok(core) => self.connecting = Some(core),
            Err(e) => return self.connect_failed(e),
        }
        Ok(())
    }

    /// An attempt failed: retry after the backoff, unless it is a failure that retrying cannot
    /// mend and we never got in (then the program ends).
    fn connect_failed(&mut self, e: ClientError) -> Result<()> {
        let fatal = match &e {
            ClientError::Refused { .. } | ClientError::Handshake(_) | ClientError::NotARelay(_) | ClientError::Setup(_) => true,
            ClientError::ClosedByRelay { code, .. } => ztna_proto::control::close_code::is_permanent(*code),
            _ => false,
        };
        if fatal && !self.ever_connected {
            bail!("{e}");
        }
        let delay = self.backoff.next_delay();
        tracing::warn!(error = %e, retry_in = ?delay, "cannot reach the relay");
        self.reconnect_at = Some(Instant::now() + delay);
        Ok(())
    }

    /// The control connection is set up: it becomes the engine's.
    fn install(&mut self, mut core: ControlCore, info: &RelayInfo) {
        if self.ever_connected {
            self.metrics.reconnects.inc();
        }
        self.ever_connected = true;
        self.backoff.reset();
        tracing::info!(relay = %self.cfg.relay, identity = %info.identity, observed = %info.observed, "connected to the relay");
        if self.side == Side::Connector {
            core.set_keepalive(CONNECTOR_KEEPALIVE);
        }
        self.relay_liveness = Liveness::new(CONTROL_LIVENESS, Instant::now());
        self.control = Some(core);
    }

    /// The control connection is gone, and the relay sessions with it. The socket stays.
    fn lose_control(&mut self) {
        self.control = None;
    }

    fn schedule_reconnect(&mut self) {
        // After a `GoingAway`, a moment of the relay's choosing spreads a restart's reconnects;
        // later attempts back off as usual.
        let delay = match self.going_away.take() {
            Some(within) => within.mul_f64(rand::random::<f64>()),
            None => self.backoff.next_delay(),
        };
        self.reconnect_at = Some(Instant::now() + delay);
    }

    /// Our peer-to-peer socket's reflexive address is new: the relay announces it in new
    /// sessions, and the peers of open ones hear it now.
    fn on_p2p_address(&mut self, addr: SocketAddr) {
        tracing::info!(reflexive = %addr, "the relay sees the peer-to-peer socket at a new address");
        if !self.send_control(&Message::DirectAddress { addr }) {
            return;
        }
        for s in self.tunnels.sessions() {
            self.announce_candidates(s, Some(addr));
        }
    }

    /// Removes a tunnel; its CONNECTION_CLOSE goes out right here (when there is a socket)
    /// and the relay hears that the session is done.
    fn close_tunnel(&mut self, session: SessionId, why: &str) -> Option<Tunnel> {
        let mut t = self.tunnels.remove(&session)?;
        self.metrics.tunnel_path(Some(t.path.current().name()), None);
        let _ = t.conn.close(true, 0, why.as_bytes());
        while let Some((n, to)) = t.poll_transmit(&mut self.txbuf) {
            if let Some(socket) = socket_to(to, self.cfg.relay, self.socket.as_ref(), self.p2p.as_ref()) {
                let _ = socket.try_send_to(&self.txbuf[..n], to);
            }
        }
        if t.orphaned.is_none() {
            self.send_control(&Message::CloseSession { session: t.path.session() });
        }
        self.aliases.remove(&t.path.session());
        self.metrics.sessions.dec();
        self.streams.reset_session(session);
        Some(t)
    }

    fn next_wake(&self, now: Instant) -> Duration {
        let mut wait = Duration::from_secs(1);
        if let Some(at) = self.reconnect_at {
            wait = wait.min(at.saturating_duration_since(now));
        }
        for core in self.control.iter().chain(&self.connecting) {
            if let Some(t) = core.timeout(now) {
                wait = wait.min(t);
            }
        }
        if let Some(at) = self.tunnels.next_deadline() {
            wait = wait.min(at.saturating_duration_since(now));
        }
        if let Some(p2p) = &self.p2p {
            wait = wait.min(p2p.probe.next_send().saturating_duration_since(now));
        }
        if self.control.is_some() && self.relay_liveness.awaiting() {
            wait = wait.min(self.relay_liveness.deadline().saturating_duration_since(now));
        }
        wait
    }

    async fn flush(&mut self) {
        let Some(socket) = &self.socket else { return };
        let mut to_relay = false;
        if let Some(core) = &mut self.control {
            while let Ok(Some((n, to))) = core.poll_transmit(&mut self.txbuf) {
                let _ = socket.send_to(&self.txbuf[..n], to).await;
                to_relay = true;
            }
        }
        if let Some(core) = &mut self.connecting {
            while let Ok(Some((n, to))) = core.poll_transmit(&mut self.txbuf) {
                let _ = socket.send_to(&self.txbuf[..n], to).await;
            }
        }
        // Only tunnels that changed can have something new to send.
        for session in self.tunnels.take_touched() {
            let Some(t) = self.tunnels.for_flush(&session) else { continue };
            while let Some((n, to)) = t.poll_transmit(&mut self.txbuf) {
                let Some(socket) = socket_to(to, self.cfg.relay, Some(socket), self.p2p.as_ref()) else { continue };
                let _ = socket.send_to(&self.txbuf[..n], to).await;
                to_relay |= to == self.cfg.relay;
            }
            self.tunnels.flushed(session, Instant::now());
        }
        if to_relay {
            self.relay_liveness.on_tx(Instant::now());
        }
    }
}

/// The socket a datagram to `to` leaves from: one to the relay from the main socket, one to
/// a direct peer from the peer-to-peer socket when there is one.
fn socket_to<'a>(to: SocketAddr, relay: SocketAddr, main: Option<&'a UdpSocket>, p2p: Option<&'a P2pSocket>) -> Option<&'a UdpSocket> {
    match p2p {
        Some(p2p) if to != relay => Some(&p2p.socket),
        _ => main,
    }
}

/// Waits until `socket` has a datagram; forever without a socket.
async fn readable(socket: Option<&UdpSocket>) -> std::io::Result<()> {
    match socket {
        Some(s) => s.readable().await,
        None => std::future::pending().await,
    }
}

/// Which socket a datagram came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Via {
    Main,
    P2p,
}

/// The engine: the core, driven by one role.
pub struct Engine<R: Role> {
    core: Core,
    role: R,
    flow_events: mpsc::UnboundedReceiver<FlowEvent>,
    events_tx: mpsc::UnboundedSender<R::Event>,
    events_rx: mpsc::UnboundedReceiver<R::Event>,
}

impl<R: Role> Engine<R> {
    /// `role` is built with the sender its own tasks report through.
    pub fn new(cfg: EngineConfig, metrics: Arc<ClientMetrics>, role: impl FnOnce(mpsc::UnboundedSender<R::Event>) -> R) -> Result<Self> {
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        let (flow_tx, flow_events) = mpsc::unbounded_channel();
        let p2p = match cfg.direct.p2p_socket.filter(|_| cfg.direct.enabled) {
            Some(addr) => Some(P2pSocket::bind(addr, cfg.relay, Instant::now())?),
            None => None,
        };
        let core = Core {
            tunnel_config: cfg.tls.tunnel_config(R::SIDE == Side::Connector)?,
            cfg,
            side: R::SIDE,
            streams: Streams::new(R::SIDE, flow_tx, metrics.clone()),
            metrics,
            socket: None,
            connecting: None,
            p2p,
            control: None,
            relay_liveness: Liveness::new(CONTROL_LIVENESS, Instant::now()),
            backoff: Backoff::default(),
            reconnect_at: Some(Instant::now()),
            going_away: None,
            ever_connected: false,
            tunnels: TunnelTable::default(),
            aliases: HashMap::new(),
            next_orphan_check: None,
            pending_candidates: HashMap::new(),
            observed: None,
            path_work: PathWork::default(),
            replay: VecDeque::new(),
            rxbuf: vec![0u8; MAX_DATAGRAM],
            txbuf: vec![0u8; MAX_DATAGRAM],
            dgrambuf: vec![0u8; MAX_DATAGRAM],
        };
        Ok(Engine { core, role: role(events_tx.clone()), flow_events, events_tx, events_rx })
    }

    /// For local listeners: where to send the role's events.
    pub fn handle(&self) -> mpsc::UnboundedSender<R::Event> {
        self.events_tx.clone()
    }

    /// Runs until a fatal error (refused identity or policy, bad certificates).
    pub async fn run(self) -> Result<()> {
        self.run_until(std::future::pending()).await
    }

    /// Runs until `stop` resolves (with the reason to give) or a fatal error. A stop closes
    /// every tunnel and the control connection, so peers and the relay hear of it at once
    /// rather than at their idle timeouts.
    pub async fn run_until(mut self, stop: impl std::future::Future<Output = &'static str>) -> Result<()> {
        tokio::pin!(stop);
        if let Some(p2p) = &mut self.core.p2p {
            // The first probe waits for the new socket to be writable (see `probe_now`).
            p2p.probe_now().await;
        }
        loop {
            if let Some(at) = self.core.reconnect_at
                && Instant::now() >= at
            {
                self.core.reconnect_at = None;
                // The peer-to-peer socket's probe goes first, so its answer is likely in by
                // the time the handshake ends and the relay hears the address before any
                // session is offered.
                if let Some(p2p) = &mut self.core.p2p {
                    p2p.probe.hurry(Instant::now());
                    p2p.drive(Instant::now());
                }
                self.core.start_connect()?;
            }
            self.core.flush().await;
            let wait = self.core.next_wake(Instant::now());
            enum Wake<E> {
                Readable(Via, std::io::Result<()>),
                Flow(Option<FlowEvent>),
                Event(Option<E>),
                Timer,
                Stop(&'static str),
            }
            let wake = {
                tokio::select! {
                    r = readable(self.core.socket.as_ref()) => Wake::Readable(Via::Main, r),
                    r = readable(self.core.p2p.as_ref().map(|p| &p.socket)) => Wake::Readable(Via::P2p, r),
                    f = self.flow_events.recv() => Wake::Flow(f),
                    e = self.events_rx.recv() => Wake::Event(e),
                    _ = tokio::time::sleep(wait) => Wake::Timer,
                    why = &mut stop => Wake::Stop(why),
                }
            };
            match wake {
                Wake::Readable(via, Ok(())) => self.receive(via),
                Wake::Readable(_, Err(e)) => tracing::debug!(error = %e, "socket receive error"),
                Wake::Flow(Some(fe)) => {
                    let t = self.core.tunnels.get_mut(&fe.key().0);
                    self.core.streams.on_flow_event(t, fe);
                }
                Wake::Event(Some(ev)) => self.role.on_event(&mut self.core, ev),
                // Both senders live as long as the engine (it holds a clone of each).
                Wake::Flow(None) | Wake::Event(None) => return Ok(()),
                Wake::Timer => {}
                Wake::Stop(why) => return self.shut_down(why).await,
            }
            self.on_timers(Instant::now())?;
        }
    }

    /// Closes every tunnel (its peer hears CONNECTION_CLOSE) and the control connection with
    /// the reason, so the relay ends registrations and sessions now, not after its timeout.
    async fn shut_down(&mut self, why: &str) -> Result<()> {
        tracing::info!(target: LOG, reason = why, "stopping: closing tunnels and the relay connection");
        let reason = format!("client stopping ({why})");
        for s in self.core.tunnels.sessions() {
            self.close_tunnel(s, &reason);
        }
        if let Some(control) = &mut self.core.control {
            control.close(&reason);
        }
        self.core.flush().await;
        Ok(())
    }

    /// Takes what is queued on one socket, up to a batch, before timers and sends: one round
    /// of acknowledgements and window updates per batch, not per datagram.
    fn receive(&mut self, via: Via) {
        for _ in 0..RECV_BATCH {
            let socket = match via {
                Via::Main => self.core.socket.as_ref(),
                Via::P2p => self.core.p2p.as_ref().map(|p| &p.socket),
            };
            let Some(socket) = socket else { return };
            match socket.try_recv_from(&mut self.core.rxbuf) {
                Ok((n, from)) => self.on_datagram(n, ztna_proto::addr::canonical(from), via),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(e) => return tracing::debug!(error = %e, "socket receive error"),
            }
        }
    }

    /// The connection being set up is ready: it becomes the engine's control connection.
    fn connected(&mut self, core: ControlCore, info: RelayInfo) -> Result<()> {
        self.role.check_relay(&info, !self.core.ever_connected)?;
        self.core.install(core, &info);
        if let Some(p2p) = &self.core.p2p {
            // What we knew before this connection; an answer that changes it is sent as it comes.
            if let Some(addr) = p2p.probe.reflexive() {
                self.core.send_control(&Message::DirectAddress { addr });
            }
            self.receive(Via::P2p);
        }
        self.role.on_connected(&mut self.core);
        self.replay();
        Ok(())
    }

    /// The control connection is gone, and with it every relay session. The tunnels stay:
    /// they are end to end, and the agent asks the next relay connection for new sessions to
    /// carry them (PROTOCOL.md §7.15); meanwhile direct paths carry on and relayed traffic
    /// waits in QUIC.
    fn disconnected(&mut self, why: &str) {
        tracing::warn!(reason = why, tunnels = self.core.tunnels.len(), "lost the relay; tunnels wait for new sessions, reconnecting");
        self.core.lose_control();
        let now = Instant::now();
        for s in self.core.tunnels.sessions() {
            if let Some(t) = self.core.tunnels.get_mut(&s) {
                t.orphaned.get_or_insert(now);
            }
        }
        self.core.aliases.clear();
        self.core.pending_candidates.clear();
        self.core.next_orphan_check = Some(now + Duration::from_secs(1));
        self.role.on_disconnected();
        self.core.schedule_reconnect();
    }

    /// Tunnels on the relay path that found no new relay session in time are closed (looked
    /// for once a second, and only while some tunnel waits).
    fn expire_orphans(&mut self, now: Instant) {
        if self.core.next_orphan_check.is_none_or(|at| now < at) {
            return;
        }
        let waiting = self.core.tunnels.iter().any(|t| t.orphaned.is_some());
        self.core.next_orphan_check = waiting.then(|| now + Duration::from_secs(1));
        let expired: Vec<SessionId> = self
            .core
            .tunnels
            .iter()
            .filter(|t| t.path.direct.active().is_none() && t.orphaned.is_some_and(|since| now.saturating_duration_since(since) >= RESUME_WITHIN))
            .map(|t| t.session)
            .collect();
        for s in expired {
            self.core.metrics.tunnels_lost.inc();
            self.close_tunnel(s, "no new relay session within 30 s");
        }
    }

    fn on_control_message(&mut self, msg: Message) -> Result<()> {
        match msg {
            Message::SessionClosed { session, reason } => {
                tracing::info!(%session, %reason, "session closed by the relay");
                self.core.pending_candidates.remove(&session);
                self.role.on_session_closed(session);
                let key = self.core.tunnel_key(session);
                // Only the tunnel this session carries now: an old session's news is stale.
                if self.core.tunnels.get(&key).is_some_and(|t| t.path.session() == session) {
                    self.close_tunnel(key, reason.name());
                }
            }
            Message::Error { request_id, code, message } => {
                if self.role.on_refused(request_id, code, &message) {
                    // The role's request: it said what it means.
                } else if code == ErrorCode::NotAuthorized || code == ErrorCode::UnknownService {
                    eprintln!("relay: {message} ({code})");
                } else {
                    tracing::warn!(%code, "relay: {message}");
                }
            }
            Message::GoingAway { reconnect_within_ms } => {
                let within = Duration::from_millis(reconnect_within_ms.into()).min(MAX_RECONNECT_SPREAD);
                tracing::info!(target: LOG, ?within, "the relay is going away");
                self.core.going_away = Some(within);
            }
            Message::ObservedAddress { addr, .. } => {
                tracing::info!(observed = %addr, "relay reports our address");
                let previous = self.core.observed.replace(addr);
                // With a peer-to-peer socket the main socket's mapping is no direct candidate.
                if previous.is_some_and(|p| p != addr) && self.core.p2p.is_none() {
                    // Rebinding: our peers' candidates for us are stale.
                    let sessions: Vec<SessionId> = self.core.tunnels.sessions();
                    for s in sessions {
                        self.core.announce_candidates(s, Some(addr));
                    }
                }
            }
            Message::PeerCandidates { .. } if !self.core.cfg.direct.enabled => {}
            Message::PeerCandidates { session, token, candidates } => {
                tracing::debug!(%session, ?candidates, "peer candidates");
                let core = &mut self.core;
                let key = core.tunnel_key(session);
                match core.tunnels.get_mut(&key) {
                    Some(t) => t.add_candidates(token, &candidates, Instant::now()),
                    None if core.pending_candidates.len() < MAX_PENDING_CANDIDATES
                        || core.pending_candidates.contains_key(&session) =>
                    {
                        let entry = core.pending_candidates.entry(session).or_insert((token, Vec::new()));
                        entry.1.extend(candidates);
                    }
                    None => {}
                }
            }
            other => self.role.on_message(&mut self.core, other)?,
        }
        self.replay();
        Ok(())
    }

    fn replay(&mut self) {
        while let Some((datagram, from)) = self.core.replay.pop_front() {
            let n = datagram.len().min(self.core.rxbuf.len());
            self.core.rxbuf[..n].copy_from_slice(&datagram[..n]);
            self.on_datagram(n, from, Via::Main);
        }
    }

    /// A datagram in `core.rxbuf[..n]`, from socket `via`: control QUIC, or a relay frame for
    /// a tunnel, or the answer to the peer-to-peer socket's QAD probe.
    fn on_datagram(&mut self, n: usize, from: SocketAddr, via: Via) {
        let core = &mut self.core;
        let datagram = &mut core.rxbuf[..n];
        let from_relay = from == core.cfg.relay;
        if !frame::is_relay_frame(datagram) {
            match (via, &mut core.control) {
                (Via::Main, Some(control)) => {
                    if control.on_datagram(datagram, from) {
                        core.relay_liveness.on_rx(Instant::now());
                    }
                }
                (Via::Main, None) => {
                    if let Some(connecting) = &mut core.connecting {
                        connecting.on_datagram(datagram, from);
                    }
                }
                (Via::P2p, _) => core.metrics.direct_rejected("not_authentic"),
            }
            return;
        }
        if via == Via::P2p
            && let Ok(Frame::QadReply { nonce, observed }) = Frame::parse(datagram)
        {
            return self.on_p2p_reply(nonce, observed, from);
        }
        if !from_relay && !core.cfg.direct.enabled {
            core.metrics.direct_rejected("direct_off");
            return;
        }
        // With a peer-to-peer socket, direct traffic belongs there and relay traffic on the
        // main socket: a peer that punched one socket's mapping must be answered from it.
        if core.p2p.is_some() && (via == Via::P2p) == from_relay {
            core.metrics.direct_rejected("wrong_socket");
            return;
        }
        if from_relay {
            // Frames it forwards show the relay alive as much as its own packets do.
            core.relay_liveness.on_rx(Instant::now());
        }
        let session = match Frame::parse(datagram) {
            // Relay frames name the relay session, direct ones the tunnel (PathLayer).
            Ok(Frame::Data { session, .. }) if from_relay => core.tunnel_key(session),
            Ok(Frame::Data { session, .. }) => session,
            Ok(Frame::Punch { session, token }) => return self.on_punch(session, &token, from),
            _ => return,
        };
        if !core.tunnels.contains_key(&session) {
            // A tunnel only ever starts through the relay.
            if from != core.cfg.relay {
                core.metrics.direct_rejected("unknown_session");
                return;
            }
            // Lend the role the frame without copying it (the buffer comes back right after).
            let rxbuf = std::mem::take(&mut core.rxbuf);
            self.role.on_unknown_session(&mut self.core, session, &rxbuf[..n]);
            self.core.rxbuf = rxbuf;
        }
        let core = &mut self.core;
        let Some(t) = core.tunnels.get_mut(&session) else { return };
        if !t.recv_frame(&mut core.rxbuf[..n], from, Instant::now()) {
            core.metrics.direct_rejected("not_authentic");
        }
        self.report_path_changes(session);
        self.service_tunnel(session);
    }

    fn on_p2p_reply(&mut self, nonce: u64, observed: SocketAddr, from: SocketAddr) {
        let core = &mut self.core;
        let Some(p2p) = &mut core.p2p else { return };
        match p2p.probe.on_reply(nonce, observed, from, Instant::now()) {
            Ok(Some(addr)) => core.on_p2p_address(addr),
            Ok(None) => {}
            Err(_) => core.metrics.direct_rejected("stray_qad_reply"),
        }
    }

    /// A PUNCH frame: it opens nothing by itself, but may teach a peer-reflexive address.
    fn on_punch(&mut self, session: SessionId, token: &[u8; PUNCH_TOKEN_LEN], from: SocketAddr) {
        let core = &mut self.core;
        let outcome = match core.tunnels.get_mut(&session) {
            Some(t) if from != core.cfg.relay => t.on_punch(from, token, Instant::now()),
            _ => Punch::Rejected,
        };
        core.metrics.punch_received(outcome);
        if outcome == Punch::Learned {
            tracing::debug!(%session, %from, "learned a peer-reflexive candidate");
        }
    }

    /// Tells the relay and the metrics where a tunnel's traffic now goes.
    fn report_path_changes(&mut self, session: SessionId) {
        let Some(t) = self.core.tunnels.get_mut(&session) else { return };
        let opened = t.opened;
        let changes: Vec<PathChange> = t.take_changes().collect();
        for change in changes {
            let direct = matches!(change, PathChange::Direct(_));
            let m = &self.core.metrics;
            match change {
                PathChange::Direct(peer) => {
                    let first = self.core.tunnels.get_mut(&session).is_some_and(|t| !std::mem::replace(&mut t.was_direct, true));
                    m.switched(true, first.then(|| opened.elapsed()));
                    tracing::info!(target: LOG, %session, %peer, after = ?opened.elapsed(), "tunnel moved to a direct path");
                }
                PathChange::Relay => {
                    m.switched(false, None);
                    tracing::info!(target: LOG, %session, "tunnel back on the relay path");
                }
            }
            let current = self.core.tunnels.get(&session).map_or(session, |t| t.path.session());
            self.core.send_control(&Message::PathStatus { session: current, direct });
        }
    }

    /// Punching, probing and liveness of every tunnel's direct paths.
    fn drive_paths(&mut self, now: Instant, sessions: Vec<SessionId>) {
        let mut punch = [0u8; frame::PUNCH_LEN];
        for s in sessions {
            let core = &mut self.core;
            let Some(t) = core.tunnels.get_mut(&s) else { continue };
            let mut work = std::mem::take(&mut core.path_work);
            t.drive_paths(now, &mut work);
            if let Some(token) = t.path.direct.token() {
                let n = frame::write_punch(&s, token, &mut punch);
                for to in work.punches.drain(..) {
                    let Some(socket) = socket_to(to, core.cfg.relay, core.socket.as_ref(), core.p2p.as_ref()) else { continue };
                    let _ = socket.try_send_to(&punch[..n], to);
                    core.metrics.punches_sent.inc();
                }
            }
            work.punches.clear();
            for _ in 0..std::mem::take(&mut work.failed_attempts) {
                core.metrics.punch_attempts("failed");
            }
            core.path_work = work;
            self.report_path_changes(s);
        }
    }

    /// After a tunnel changed: verify the peer, start waiting flows, move stream data.
    fn service_tunnel(&mut self, session: SessionId) {
        let Some(t) = self.core.tunnels.get_mut(&session) else { return };
        if t.conn.is_established() && !t.verified {
            if let Err(e) = t.verify_peer() {
                tracing::error!(%session, error = %e, "tunnel peer identity mismatch; closing");
                eprintln!("refusing tunnel for {:?}: {e}", t.service);
                let _ = t.conn.close(true, 0x1, b"identity mismatch");
                return;
            }
            tracing::info!(%session, service = %t.service, peer = %t.peer_identity, "tunnel established");
            self.role.on_verified(&mut self.core, session);
        }
        let Some(t) = self.core.tunnels.get_mut(&session).filter(|t| t.verified) else { return };
        for key in self.core.streams.pump_readable(t) {
            self.role.on_new_stream(&mut self.core, key);
        }
        let Some(t) = self.core.tunnels.get_mut(&session) else { return };
        self.core.streams.pump_writable(t);
        self.pump_datagrams(session);
    }

    fn pump_datagrams(&mut self, session: SessionId) {
        let mut buf = [0u8; MAX_DATAGRAM];
        loop {
            let Some(t) = self.core.tunnels.get_mut(&session) else { return };
            let Ok(n) = t.conn.dgram_recv(&mut buf) else { return };
            // One shorter than its header is ignored (PROTOCOL.md §13.5).
            let Ok(dgram) = UdpDatagram::parse(&buf[..n]) else { continue };
            self.core.metrics.bytes_from_peer.inc_by(dgram.payload.len() as u64);
            self.role.on_udp(t, dgram);
        }
    }

    fn close_tunnel(&mut self, session: SessionId, why: &str) {
        let Some(t) = self.core.close_tunnel(session, why) else { return };
        self.role.on_tunnel_closed(&t);
        tracing::info!(%session, reason = why, "tunnel closed");
    }

    fn on_timers(&mut self, now: Instant) -> Result<()> {
        if let Some(core) = &mut self.core.connecting {
            if core.timeout(now).is_some_and(|d| d.is_zero()) {
                core.on_timeout(now);
            }
            if let Some(outcome) = core.poll_setup(now) {
                let core = self.core.connecting.take().unwrap_or_else(|| unreachable!());
                match outcome {
                    Ok(info) => self.connected(core, info)?,
                    Err(e) => self.core.connect_failed(e)?,
                }
            }
        }
        if let Some(core) = &mut self.core.control {
            if core.timeout(now).is_some_and(|d| d.is_zero()) {
                core.on_timeout(now);
            }
            if self.core.relay_liveness.awaiting() {
                match self.core.relay_liveness.poll(now) {
                    Verdict::Quiet => {}
                    Verdict::Ping => core.ping(),
                    Verdict::Dead(silent) => {
                        // An answer may be waiting in the socket (the loop woke for the timer).
                        self.receive(Via::Main);
                        if self.core.relay_liveness.awaiting() {
                            self.disconnected(&format!("the relay stopped answering (nothing for {} ms)", silent.as_millis()));
                            return Ok(());
                        }
                    }
                }
            }
            while let Some(msg) = self.core.control.as_mut().and_then(ControlCore::pop_message) {
                self.on_control_message(msg)?;
            }
            if let Some(core) = &self.core.control
                && core.is_closed()
            {
                let err = core.closed_error();
                if let ClientError::ClosedByRelay { code, .. } = &err
                    && ztna_proto::control::close_code::is_permanent(*code)
                {
                    bail!("{err}");
                }
                self.disconnected(&err.to_string());
            }
        }
        // Touched since the last flush or due; the others have nothing to do until their deadline.
        let sessions = self.core.tunnels.needing_service(now);
        for &s in &sessions {
            if let Some(t) = self.core.tunnels.get_mut(&s) {
                if t.timeout(now).is_some_and(|d| d.is_zero()) {
                    t.on_timeout(now);
                }
                if t.conn.is_closed() {
                    self.close_tunnel(s, "tunnel closed");
                    continue;
                }
            }
            self.service_tunnel(s);
        }
        self.drive_paths(now, sessions);
        self.expire_orphans(now);
        if let Some(p2p) = &mut self.core.p2p {
            p2p.drive(now);
        }
        self.role.on_timers(&mut self.core, now);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    /// Log lines are matched by target (`ztna_client::engine: lost the relay`): the core's own
    /// module path must stay the target every engine module uses.
    #[test]
    fn the_core_logs_under_the_engine_target() {
        assert_eq!(module_path!(), format!("{}::tests", super::LOG));
    }
}
