//! The client engine shared by agent and connector: one task that owns the UDP socket (control
//! QUIC, relay frames and every end-to-end tunnel share it, so QAD reports the mapping the data
//! path uses), the control connection with reconnect, and the tunnels with their flows.
//!
//! Local flows (TCP connections, UDP datagrams) live in tasks of their own and talk to the
//! engine through [`Event`]s; the engine moves their bytes into QUIC streams and DATAGRAMs and
//! back, with back-pressure on every hop (see `flows.rs`).

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use tokio::net::{TcpStream, UdpSocket};
use tokio::sync::mpsc;
use ztna_proto::frame::{self, Frame};
use ztna_proto::{ErrorCode, Message, SessionId};

use crate::backoff::Backoff;
use crate::control::{ClientError, ControlClient, ControlCore};
use crate::flows::{self, FlowEvent, FlowKey, FlowTasks, WriterMsg};
use crate::metrics::ClientMetrics;
use crate::path::PathLayer;
use crate::tls::ClientTls;
use crate::tunnel::{Tunnel, stream_error};

/// First byte of every tunnel stream: the agent announces a TCP flow, so the connector can
/// reach the backend before the local application says anything (server-speaks-first
/// protocols such as SSH or SMTP).
pub const STREAM_PREAMBLE_TCP: u8 = 0x01;
/// UDP flows ride QUIC DATAGRAMs: `[flow id: u32][payload]`.
pub const UDP_FLOW_HEADER: usize = 4;
/// UDP flows with no traffic for this long are forgotten (connector closes its socket).
pub const UDP_FLOW_IDLE: Duration = Duration::from_secs(60);
const BACKEND_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_DATAGRAM: usize = 2048;
/// Datagrams taken from the socket per wake-up before servicing timers and sending.
const RECV_BATCH: usize = 64;
/// Tunnel packets that arrive before their session offer (the offer and the first packet
/// race through the relay) are held briefly, a few per session.
const EARLY_FRAMES_PER_SESSION: usize = 8;
const EARLY_SESSIONS: usize = 64;
/// How long a local connection may wait for its tunnel before it is reset.
const TUNNEL_WAIT: Duration = Duration::from_secs(10);

/// Where a connector sends a service's flows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backend {
    Tcp(String),
    Udp(String),
}

#[derive(Debug, Clone)]
pub enum Role {
    /// The services the agent forwards (checked against the relay's Welcome at start).
    Agent { services: Vec<String> },
    Connector { backends: HashMap<String, Backend> },
}

#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub relay: SocketAddr,
    pub server_name: Option<String>,
    pub tls: ClientTls,
    pub software: String,
    pub connect_timeout: Duration,
    pub role: Role,
}

/// Everything that wakes the engine besides the socket.
#[derive(Debug)]
pub enum Event {
    /// Agent: a local TCP connection for a service.
    NewTcp { service: String, stream: TcpStream },
    /// Agent: a datagram from a local UDP client (flow ids are per forward).
    UdpIn { service: String, flow: u32, data: Vec<u8> },
    /// Agent: where replies for a service's UDP flows go.
    UdpReturn { service: String, tx: UdpReplies },
    Flow(FlowEvent),
    /// Connector: the backend of a stream answered, or did not.
    BackendReady { key: FlowKey, stream: TcpStream },
    BackendFailed { key: FlowKey, error: String },
    /// Connector: a datagram from a UDP backend.
    UdpFromBackend { session: SessionId, flow: u32, data: Vec<u8> },
}

/// Where an agent's UDP forward takes replies: (flow id, payload).
pub type UdpReplies = mpsc::Sender<(u32, Vec<u8>)>;

/// One tunnelled TCP flow.
struct Flow {
    tasks: Option<FlowTasks>,
    /// Bytes from the local side waiting for stream capacity.
    pending: VecDeque<Vec<u8>>,
    pending_offset: usize,
    local_eof: bool,
    fin_sent: bool,
    remote_done: bool,
    /// The writer's queue was full last time: read the QUIC stream again when it drains.
    read_blocked: bool,
    /// Agent: the stream preamble still has to go out. Connector: it has not arrived yet.
    preamble_pending: bool,
}

impl Flow {
    fn new(tasks: Option<FlowTasks>) -> Self {
        Flow {
            tasks,
            pending: VecDeque::new(),
            pending_offset: 0,
            local_eof: false,
            fin_sent: false,
            remote_done: false,
            read_blocked: false,
            preamble_pending: true,
        }
    }
}

struct UdpFlow {
    tx: mpsc::Sender<Vec<u8>>,
    last_active: Instant,
}

/// A session the relay offered whose tunnel has not started yet (connector side).
struct Offer {
    service: String,
    agent: String,
}

pub struct Engine {
    cfg: EngineConfig,
    metrics: Arc<ClientMetrics>,
    events_tx: mpsc::UnboundedSender<Event>,
    events_rx: mpsc::UnboundedReceiver<Event>,
    socket: Option<UdpSocket>,
    control: Option<ControlCore>,
    backoff: Backoff,
    reconnect_at: Option<Instant>,
    ever_connected: bool,
    /// Connector: registration confirmed since the last connect.
    registered: bool,
    tunnel_config_client: quiche::Config,
    tunnel_config_server: quiche::Config,
    tunnels: HashMap<SessionId, Tunnel>,
    offers: HashMap<SessionId, Offer>,
    /// Connector: tunnel packets that arrived before their offer, with when the first came.
    early: HashMap<SessionId, (Instant, Vec<Vec<u8>>)>,
    /// Agent: the tunnel serving each service, and Connect requests in flight.
    service_sessions: HashMap<String, SessionId>,
    requests: HashMap<u32, String>,
    next_request: u32,
    /// Agent: local connections waiting for their service's tunnel.
    waiting: HashMap<String, Vec<(TcpStream, Instant)>>,
    /// Agent: UDP datagrams waiting for their service's tunnel (a few, then dropped).
    waiting_udp: HashMap<String, Vec<(u32, Vec<u8>)>>,
    /// Agent: the UDP forwards of each service; flow ids are unique across forwards, and
    /// each forward ignores replies for flows it does not own.
    udp_return: HashMap<String, Vec<UdpReplies>>,
    flows: HashMap<FlowKey, Flow>,
    udp_flows: HashMap<(SessionId, u32), UdpFlow>,
    rxbuf: Vec<u8>,
    txbuf: Vec<u8>,
    streambuf: Vec<u8>,
}

impl Engine {
    pub fn new(cfg: EngineConfig, metrics: Arc<ClientMetrics>) -> Result<Engine> {
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        Ok(Engine {
            tunnel_config_client: cfg.tls.tunnel_config(false)?,
            tunnel_config_server: cfg.tls.tunnel_config(true)?,
            cfg,
            metrics,
            events_tx,
            events_rx,
            socket: None,
            control: None,
            backoff: Backoff::default(),
            reconnect_at: Some(Instant::now()),
            ever_connected: false,
            registered: false,
            tunnels: HashMap::new(),
            offers: HashMap::new(),
            early: HashMap::new(),
            service_sessions: HashMap::new(),
            requests: HashMap::new(),
            next_request: 1,
            waiting: HashMap::new(),
            waiting_udp: HashMap::new(),
            udp_return: HashMap::new(),
            flows: HashMap::new(),
            udp_flows: HashMap::new(),
            rxbuf: vec![0u8; MAX_DATAGRAM],
            txbuf: vec![0u8; MAX_DATAGRAM],
            streambuf: vec![0u8; flows::CHUNK],
        })
    }

    /// For local listeners: where to send [`Event`]s.
    pub fn handle(&self) -> mpsc::UnboundedSender<Event> {
        self.events_tx.clone()
    }

    /// Runs until a fatal error (refused identity or policy, bad certificates).
    pub async fn run(mut self) -> Result<()> {
        loop {
            if let Some(at) = self.reconnect_at
                && Instant::now() >= at
            {
                self.reconnect_at = None;
                self.connect().await?;
            }
            self.flush().await;
            let wait = self.next_wake(Instant::now());
            enum Wake {
                Datagram(std::io::Result<(usize, SocketAddr)>),
                Event(Option<Event>),
                Timer,
            }
            let wake = {
                let socket = &self.socket;
                let rxbuf = &mut self.rxbuf;
                let recv = async move {
                    match socket {
                        Some(s) => s.recv_from(rxbuf).await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    r = recv => Wake::Datagram(r),
                    e = self.events_rx.recv() => Wake::Event(e),
                    _ = tokio::time::sleep(wait) => Wake::Timer,
                }
            };
            match wake {
                Wake::Datagram(Ok((n, from))) => {
                    self.on_datagram(n, ztna_proto::addr::canonical(from));
                    // Take whatever else is queued before timers and sends: one round of
                    // acknowledgements and window updates per batch, not per datagram.
                    for _ in 0..RECV_BATCH {
                        let Some(socket) = &self.socket else { break };
                        match socket.try_recv_from(&mut self.rxbuf) {
                            Ok((n, from)) => self.on_datagram(n, ztna_proto::addr::canonical(from)),
                            Err(_) => break,
                        }
                    }
                }
                Wake::Datagram(Err(e)) => tracing::debug!(error = %e, "socket receive error"),
                Wake::Event(Some(ev)) => self.on_event(ev)?,
                Wake::Event(None) => return Ok(()),
                Wake::Timer => {}
            }
            self.on_timers(Instant::now())?;
        }
    }

    // ---- control connection -------------------------------------------------------------

    async fn connect(&mut self) -> Result<()> {
        let c = &self.cfg;
        let attempt =
            ControlClient::connect(c.relay, c.server_name.as_deref(), &c.tls, &c.software, c.connect_timeout).await;
        let client = match attempt {
            Ok(client) => client,
            Err(e) => {
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
                return Ok(());
            }
        };
        let info = client.info.clone().ok_or_else(|| anyhow::anyhow!("no relay info"))?;
        if let Role::Agent { services } = &self.cfg.role
            && !self.ever_connected
        {
            let denied: Vec<&String> = services.iter().filter(|s| !info.services.contains(s)).collect();
            if !denied.is_empty() {
                let list = denied.iter().map(|s| format!("{s:?}")).collect::<Vec<_>>().join(", ");
                bail!("the relay's policy does not let {} reach {list}", info.identity);
            }
        }
        if self.ever_connected {
            self.metrics.reconnects.inc();
        }
        self.ever_connected = true;
        self.backoff.reset();
        tracing::info!(relay = %self.cfg.relay, identity = %info.identity, observed = %info.observed, "connected to the relay");
        let (socket, mut core, early_frames) = client.into_parts();
        if let Role::Connector { backends } = &self.cfg.role {
            let mut services: Vec<String> = backends.keys().cloned().collect();
            services.sort();
            core.send(&Message::Register { services })?;
            self.registered = false;
        }
        self.socket = Some(socket);
        self.control = Some(core);
        // Local flows that arrived while we were away get their sessions now.
        let mut wanted: Vec<String> = self.waiting.keys().chain(self.waiting_udp.keys()).cloned().collect();
        wanted.dedup();
        for service in wanted {
            self.request_session(&service);
        }
        for (data, from) in early_frames {
            let n = data.len().min(self.rxbuf.len());
            self.rxbuf[..n].copy_from_slice(&data[..n]);
            self.on_datagram(n, from);
        }
        Ok(())
    }

    /// The control connection is gone: everything that depended on it goes too.
    fn disconnected(&mut self, why: &str) {
        tracing::warn!(reason = why, "lost the relay; open flows are reset, reconnecting");
        self.control = None;
        self.socket = None;
        let sessions: Vec<SessionId> = self.tunnels.keys().copied().collect();
        for s in sessions {
            self.close_tunnel(s, "relay connection lost");
        }
        self.offers.clear();
        self.requests.clear();
        self.service_sessions.clear();
        // Local connections waiting for a tunnel keep waiting (up to TUNNEL_WAIT): the
        // reconnect asks for their sessions again.
        let delay = self.backoff.next_delay();
        self.reconnect_at = Some(Instant::now() + delay);
        self.metrics.set_path(None);
    }

    fn on_control_message(&mut self, msg: Message) -> Result<()> {
        match msg {
            Message::Registered { services } => {
                if services.is_empty() {
                    bail!("the relay registered none of this connector's services");
                }
                tracing::info!(?services, "registered");
                self.registered = true;
            }
            Message::SessionOffer { session, request_id, service, peer_identity, .. } => match &self.cfg.role {
                Role::Agent { .. } => {
                    if self.requests.remove(&request_id).is_none() {
                        return Ok(());
                    }
                    let path = PathLayer::via_relay(session, self.cfg.relay);
                    match Tunnel::connect(session, service.clone(), peer_identity, path, &mut self.tunnel_config_client) {
                        Ok(t) => {
                            self.tunnels.insert(session, t);
                            self.service_sessions.insert(service, session);
                            self.metrics.sessions.inc();
                        }
                        Err(e) => tracing::error!(error = %e, "cannot start tunnel"),
                    }
                }
                Role::Connector { .. } => {
                    tracing::info!(%session, %service, agent = %peer_identity, "session offered");
                    self.offers.insert(session, Offer { service, agent: peer_identity });
                    let relay = self.cfg.relay;
                    for frame in self.early.remove(&session).map(|q| q.1).unwrap_or_default() {
                        let n = frame.len().min(self.rxbuf.len());
                        self.rxbuf[..n].copy_from_slice(&frame[..n]);
                        self.on_datagram(n, relay);
                    }
                }
            },
            Message::SessionClosed { session, reason } => {
                tracing::info!(%session, %reason, "session closed by the relay");
                self.offers.remove(&session);
                self.close_tunnel(session, reason.name());
            }
            Message::Error { request_id, code, message } => {
                if let Some(service) = self.requests.remove(&request_id) {
                    // Nothing will serve these connections: reset them now, not at a timeout.
                    tracing::error!(%service, %code, "relay refused the session: {message}");
                    eprintln!("relay refused a session to {service:?}: {message} ({code})");
                    for (stream, _) in self.waiting.remove(&service).unwrap_or_default() {
                        flows::reset_local(stream);
                    }
                    self.waiting_udp.remove(&service);
                } else if code == ErrorCode::NotAuthorized || code == ErrorCode::UnknownService {
                    eprintln!("relay: {message} ({code})");
                } else {
                    tracing::warn!(%code, "relay: {message}");
                }
            }
            Message::ObservedAddress { addr, .. } => tracing::info!(observed = %addr, "relay reports our address"),
            _ => {}
        }
        Ok(())
    }

    // ---- datagrams ----------------------------------------------------------------------

    fn on_datagram(&mut self, n: usize, from: SocketAddr) {
        if !frame::is_relay_frame(&self.rxbuf[..n]) {
            if let Some(core) = &mut self.control {
                core.on_datagram(&mut self.rxbuf[..n], from);
            }
            return;
        }
        let Ok(Frame::Data { session, .. }) = Frame::parse(&self.rxbuf[..n]) else { return };
        if from != self.cfg.relay {
            return;
        }
        let payload = &mut self.rxbuf[frame::DATA_HEADER_LEN..n];
        if !self.tunnels.contains_key(&session) {
            // Connector: the first packet of an offered session starts its tunnel.
            let Some(offer) = self.offers.remove(&session) else {
                // Maybe the offer is still on its way: keep the packet for a moment.
                if matches!(self.cfg.role, Role::Connector { .. })
                    && (self.early.len() < EARLY_SESSIONS || self.early.contains_key(&session))
                {
                    let q = self.early.entry(session).or_insert_with(|| (Instant::now(), Vec::new()));
                    if q.1.len() < EARLY_FRAMES_PER_SESSION {
                        q.1.push(self.rxbuf[..n].to_vec());
                    }
                }
                return;
            };
            let path = PathLayer::via_relay(session, self.cfg.relay);
            match Tunnel::accept(session, offer.service, offer.agent, path, &mut self.tunnel_config_server) {
                Ok(t) => {
                    self.tunnels.insert(session, t);
                    self.metrics.sessions.inc();
                }
                Err(e) => {
                    tracing::warn!(error = %e, %session, "cannot accept tunnel");
                    return;
                }
            }
        }
        if let Some(t) = self.tunnels.get_mut(&session) {
            t.recv(payload);
        }
        self.service_tunnel(session);
    }

    /// After a tunnel changed: verify the peer, start waiting flows, move stream data.
    fn service_tunnel(&mut self, session: SessionId) {
        let Some(t) = self.tunnels.get_mut(&session) else { return };
        if t.conn.is_established() && !t.verified {
            if let Err(e) = t.verify_peer() {
                tracing::error!(%session, error = %e, "tunnel peer identity mismatch; closing");
                eprintln!("refusing tunnel for {:?}: {e}", t.service);
                let _ = t.conn.close(true, 0x1, b"identity mismatch");
                return;
            }
            tracing::info!(%session, service = %t.service, peer = %t.peer_identity, "tunnel established");
            self.metrics.set_path(Some(t.path.current().name()));
            if t.is_agent() {
                let service = t.service.clone();
                for (stream, _) in self.waiting.remove(&service).unwrap_or_default() {
                    self.open_agent_flow(session, stream);
                }
                for (flow, data) in self.waiting_udp.remove(&service).unwrap_or_default() {
                    self.send_udp(session, flow, &data);
                }
            }
        }
        if !self.tunnels.get(&session).is_some_and(|t| t.verified) {
            return;
        }
        self.pump_readable(session);
        self.pump_writable(session);
        self.pump_datagrams(session);
    }

    // ---- streams ------------------------------------------------------------------------

    fn open_agent_flow(&mut self, session: SessionId, stream: TcpStream) {
        let Some(t) = self.tunnels.get_mut(&session) else { return };
        let id = t.open_stream();
        let key = (session, id);
        self.flows.insert(key, Flow::new(Some(flows::spawn(key, stream, self.events_tx.clone()))));
        self.metrics.streams.inc();
        self.metrics.streams_total.inc();
        self.pump_writable(session);
    }

    /// QUIC -> local: read streams whose writers have room.
    fn pump_readable(&mut self, session: SessionId) {
        let Some(t) = self.tunnels.get_mut(&session) else { return };
        let readable: Vec<u64> = t.conn.readable().collect();
        for id in readable {
            self.pump_stream_to_local((session, id));
        }
    }

    fn pump_stream_to_local(&mut self, key: FlowKey) {
        let (session, id) = key;
        let connector = matches!(self.cfg.role, Role::Connector { .. });
        if let std::collections::hash_map::Entry::Vacant(slot) = self.flows.entry(key) {
            if !connector || id % 4 != 0 {
                return;
            }
            // A new stream from the agent: reach the backend first, read nothing until then.
            slot.insert(Flow::new(None));
            self.metrics.streams.inc();
            self.metrics.streams_total.inc();
        }
        let Some(t) = self.tunnels.get_mut(&session) else { return };
        let Some(flow) = self.flows.get_mut(&key) else { return };
        if connector && flow.preamble_pending {
            let mut first = [0u8; 1];
            match t.conn.stream_recv(id, &mut first) {
                Ok((1, _)) if first[0] == STREAM_PREAMBLE_TCP => {
                    flow.preamble_pending = false;
                    let service = t.service.clone();
                    let agent = t.peer_identity.clone();
                    self.connect_backend(key, &service, &agent);
                }
                Ok(_) | Err(quiche::Error::StreamReset(_)) => {
                    let _ = t.conn.stream_shutdown(id, quiche::Shutdown::Read, stream_error::TCP_RESET);
                    let _ = t.conn.stream_shutdown(id, quiche::Shutdown::Write, stream_error::TCP_RESET);
                    self.remove_flow(key);
                }
                Err(_) => {}
            }
            return;
        }
        let Some(tasks) = &flow.tasks else { return };
        let mut reset = false;
        loop {
            let Ok(permit) = tasks.writer.try_reserve() else {
                flow.read_blocked = true;
                return;
            };
            match t.conn.stream_recv(id, &mut self.streambuf) {
                Ok((n, fin)) => {
                    self.metrics.bytes_from_peer.inc_by(n as u64);
                    permit.send(WriterMsg { data: self.streambuf[..n].to_vec(), fin });
                    if fin {
                        flow.remote_done = true;
                        break;
                    }
                }
                Err(quiche::Error::Done) => break,
                Err(quiche::Error::StreamReset(code)) => {
                    tracing::debug!(?key, code, "stream reset by peer");
                    drop(permit);
                    tasks.reset();
                    reset = true;
                    break;
                }
                Err(_) => break,
            }
        }
        if reset {
            return self.remove_flow(key);
        }
        flow.read_blocked = false;
        self.maybe_finish(key);
    }

    /// Local -> QUIC: move pending bytes of every flow of the session into its streams.
    fn pump_writable(&mut self, session: SessionId) {
        let keys: Vec<FlowKey> = self.flows.keys().filter(|k| k.0 == session).copied().collect();
        for key in keys {
            self.pump_local_to_stream(key);
        }
    }

    fn pump_local_to_stream(&mut self, key: FlowKey) {
        let (session, id) = key;
        let Some(t) = self.tunnels.get_mut(&session) else { return };
        let Some(flow) = self.flows.get_mut(&key) else { return };
        if t.is_agent() && flow.preamble_pending {
            match t.conn.stream_send(id, &[STREAM_PREAMBLE_TCP], false) {
                Ok(1) => flow.preamble_pending = false,
                _ => return,
            }
        }
        while let Some(chunk) = flow.pending.front() {
            let rest = &chunk[flow.pending_offset..];
            match t.conn.stream_send(id, rest, false) {
                Ok(n) => {
                    self.metrics.bytes_to_peer.inc_by(n as u64);
                    flow.pending_offset += n;
                    if flow.pending_offset < chunk.len() {
                        break;
                    }
                    let done = flow.pending.pop_front().map_or(0, |c| c.len());
                    flow.pending_offset = 0;
                    // In QUIC now: the reader may buffer that much again.
                    if let Some(tasks) = &flow.tasks {
                        tasks.credit.add_permits(done);
                    }
                }
                Err(quiche::Error::Done) => break,
                Err(quiche::Error::StreamStopped(_)) | Err(_) => {
                    // The peer no longer reads this stream: stop reading locally.
                    if let Some(tasks) = &flow.tasks {
                        tasks.reader.abort();
                    }
                    flow.pending.clear();
                    flow.local_eof = true;
                    flow.fin_sent = true;
                    break;
                }
            }
        }
        // The fin goes out as a zero-length write, usually after the data is already on the
        // wire. Stock quiche 0.30 could then collect the stream (dropping the fin) when the
        // data's ACK arrived before the fin was sent and the peer's fin had been read: the
        // peer saw every byte but never the end, and its local connection hung half-open.
        // The workspace patches quiche for this (vendor/quiche/ZTNA-PATCH.md).
        if flow.pending.is_empty() && flow.local_eof && !flow.fin_sent && t.conn.stream_send(id, &[], true).is_ok() {
            flow.fin_sent = true;
        }
        self.maybe_finish(key);
    }

    fn maybe_finish(&mut self, key: FlowKey) {
        if self.flows.get(&key).is_some_and(|f| f.fin_sent && f.remote_done) {
            self.remove_flow(key);
        }
    }

    fn remove_flow(&mut self, key: FlowKey) {
        if self.flows.remove(&key).is_some() {
            self.metrics.streams.dec();
        }
    }

    /// Resets a flow both ways (the local side saw an error or went away).
    fn reset_flow(&mut self, key: FlowKey, code: u64) {
        if let Some(t) = self.tunnels.get_mut(&key.0) {
            let _ = t.conn.stream_shutdown(key.1, quiche::Shutdown::Read, code);
            let _ = t.conn.stream_shutdown(key.1, quiche::Shutdown::Write, code);
        }
        if let Some(tasks) = self.flows.get(&key).and_then(|f| f.tasks.as_ref()) {
            tasks.reset();
        }
        self.remove_flow(key);
    }

    fn connect_backend(&mut self, key: FlowKey, service: &str, agent: &str) {
        let Role::Connector { backends } = &self.cfg.role else { return };
        let Some(Backend::Tcp(addr)) = backends.get(service).cloned() else {
            let _ = self.events_tx.send(Event::BackendFailed { key, error: format!("{service:?} is not a TCP service") });
            return;
        };
        tracing::info!(session = %key.0, stream = key.1, %service, %agent, backend = %addr, "new TCP flow");
        let events = self.events_tx.clone();
        tokio::spawn(async move {
            let result = tokio::time::timeout(BACKEND_CONNECT_TIMEOUT, TcpStream::connect(&addr)).await;
            let event = match result {
                Ok(Ok(stream)) => Event::BackendReady { key, stream },
                Ok(Err(e)) => Event::BackendFailed { key, error: format!("{addr}: {e}") },
                Err(_) => Event::BackendFailed { key, error: format!("{addr}: connect timed out") },
            };
            let _ = events.send(event);
        });
    }

    // ---- datagrams (UDP flows) ---------------------------------------------------------

    fn send_udp(&mut self, session: SessionId, flow: u32, data: &[u8]) {
        let Some(t) = self.tunnels.get_mut(&session) else { return };
        let len = UDP_FLOW_HEADER + data.len();
        if t.conn.dgram_max_writable_len().is_none_or(|max| len > max) {
            self.metrics.udp_dropped_oversize.inc();
            return;
        }
        let mut dgram = Vec::with_capacity(len);
        dgram.extend_from_slice(&flow.to_be_bytes());
        dgram.extend_from_slice(data);
        if t.conn.dgram_send(&dgram).is_ok() {
            self.metrics.bytes_to_peer.inc_by(data.len() as u64);
        }
    }

    fn pump_datagrams(&mut self, session: SessionId) {
        let mut buf = [0u8; 2048];
        loop {
            let Some(t) = self.tunnels.get_mut(&session) else { return };
            let Ok(n) = t.conn.dgram_recv(&mut buf) else { return };
            if n < UDP_FLOW_HEADER {
                continue;
            }
            let flow = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
            let data = buf[UDP_FLOW_HEADER..n].to_vec();
            self.metrics.bytes_from_peer.inc_by(data.len() as u64);
            let service = t.service.clone();
            match &self.cfg.role {
                Role::Agent { .. } => {
                    for tx in self.udp_return.get(&service).into_iter().flatten() {
                        let _ = tx.try_send((flow, data.clone()));
                    }
                }
                Role::Connector { backends } => {
                    let key = (session, flow);
                    if let Some(f) = self.udp_flows.get_mut(&key) {
                        f.last_active = Instant::now();
                        let _ = f.tx.try_send(data);
                        continue;
                    }
                    let Some(Backend::Udp(addr)) = backends.get(&service).cloned() else { continue };
                    let agent = t.peer_identity.clone();
                    tracing::info!(%session, flow, %service, %agent, backend = %addr, "new UDP flow");
                    let (tx, rx) = mpsc::channel(256);
                    let _ = tx.try_send(data);
                    self.udp_flows.insert(key, UdpFlow { tx, last_active: Instant::now() });
                    tokio::spawn(udp_backend(session, flow, addr, rx, self.events_tx.clone()));
                }
            }
        }
    }

    // ---- events, timers, sending --------------------------------------------------------

    fn on_event(&mut self, ev: Event) -> Result<()> {
        match ev {
            Event::NewTcp { service, stream } => {
                match self.service_sessions.get(&service).copied() {
                    Some(s) if self.tunnels.get(&s).is_some_and(|t| t.verified) => self.open_agent_flow(s, stream),
                    _ => {
                        self.waiting.entry(service.clone()).or_default().push((stream, Instant::now()));
                        self.request_session(&service);
                    }
                }
            }
            Event::UdpIn { service, flow, data } => match self.service_sessions.get(&service).copied() {
                Some(s) if self.tunnels.get(&s).is_some_and(|t| t.verified) => {
                    self.send_udp(s, flow, &data);
                    self.service_tunnel(s);
                }
                _ => {
                    let q = self.waiting_udp.entry(service.clone()).or_default();
                    if q.len() < 64 {
                        q.push((flow, data));
                    }
                    self.request_session(&service);
                }
            },
            Event::UdpReturn { service, tx } => {
                self.udp_return.entry(service).or_default().push(tx);
            }
            Event::Flow(fe) => self.on_flow_event(fe),
            Event::BackendReady { key, stream } => {
                if self.flows.contains_key(&key) {
                    let tasks = flows::spawn(key, stream, self.events_tx.clone());
                    if let Some(flow) = self.flows.get_mut(&key) {
                        flow.tasks = Some(tasks);
                    }
                    self.pump_stream_to_local(key);
                    self.pump_local_to_stream(key);
                }
            }
            Event::BackendFailed { key, error } => {
                tracing::warn!(session = %key.0, stream = key.1, "backend unreachable: {error}");
                self.reset_flow(key, stream_error::BACKEND_UNREACHABLE);
            }
            Event::UdpFromBackend { session, flow, data } => {
                if let Some(f) = self.udp_flows.get_mut(&(session, flow)) {
                    f.last_active = Instant::now();
                }
                self.send_udp(session, flow, &data);
            }
        }
        Ok(())
    }

    fn on_flow_event(&mut self, fe: FlowEvent) {
        match fe {
            FlowEvent::Data(key, data) => {
                if let Some(flow) = self.flows.get_mut(&key) {
                    flow.pending.push_back(data);
                    self.pump_local_to_stream(key);
                }
            }
            FlowEvent::Eof(key) => {
                if let Some(flow) = self.flows.get_mut(&key) {
                    flow.local_eof = true;
                    self.pump_local_to_stream(key);
                }
            }
            FlowEvent::ReadFailed(key) | FlowEvent::WriteFailed(key) => self.reset_flow(key, stream_error::TCP_RESET),
            FlowEvent::Drained(key) => {
                if self.flows.get(&key).is_some_and(|f| f.read_blocked) {
                    self.pump_stream_to_local(key);
                }
            }
        }
    }

    fn request_session(&mut self, service: &str) {
        // One tunnel per service: none while a request or a handshake is under way.
        if self.requests.values().any(|s| s == service) || self.service_sessions.contains_key(service) {
            return;
        }
        let Some(core) = &mut self.control else { return };
        let request_id = self.next_request;
        self.next_request = self.next_request.wrapping_add(1).max(1);
        if core.send(&Message::Connect { request_id, service: service.to_owned() }).is_ok() {
            self.requests.insert(request_id, service.to_owned());
        }
    }

    fn close_tunnel(&mut self, session: SessionId, why: &str) {
        let Some(mut t) = self.tunnels.remove(&session) else { return };
        let _ = t.conn.close(true, 0, why.as_bytes());
        // The tunnel leaves the table now, so its CONNECTION_CLOSE goes out right here.
        if let Some(socket) = &self.socket {
            while let Some((n, to)) = t.poll_transmit(&mut self.txbuf) {
                let _ = socket.try_send_to(&self.txbuf[..n], to);
            }
        }
        if let Some(core) = &mut self.control {
            let _ = core.send(&Message::CloseSession { session });
        }
        if self.service_sessions.get(&t.service) == Some(&session) {
            self.service_sessions.remove(&t.service);
        }
        self.metrics.sessions.dec();
        let keys: Vec<FlowKey> = self.flows.keys().filter(|k| k.0 == session).copied().collect();
        for key in keys {
            self.reset_flow(key, stream_error::TUNNEL_CLOSED);
        }
        self.udp_flows.retain(|(s, _), _| *s != session);
        tracing::info!(%session, reason = why, "tunnel closed");
    }

    fn next_wake(&self, now: Instant) -> Duration {
        let mut wait = Duration::from_secs(1);
        if let Some(at) = self.reconnect_at {
            wait = wait.min(at.saturating_duration_since(now));
        }
        if let Some(t) = self.control.as_ref().and_then(|c| c.timeout(now)) {
            wait = wait.min(t);
        }
        for t in self.tunnels.values() {
            if let Some(d) = t.timeout(now) {
                wait = wait.min(d);
            }
        }
        wait
    }

    fn on_timers(&mut self, now: Instant) -> Result<()> {
        if let Some(core) = &mut self.control {
            if core.timeout(now).is_some_and(|d| d.is_zero()) {
                core.on_timeout(now);
            }
            while let Some(msg) = self.control.as_mut().and_then(ControlCore::pop_message) {
                self.on_control_message(msg)?;
            }
            if let Some(core) = &self.control
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
        let sessions: Vec<SessionId> = self.tunnels.keys().copied().collect();
        for s in sessions {
            if let Some(t) = self.tunnels.get_mut(&s) {
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
        // Local connections that waited too long for a tunnel are reset.
        for streams in self.waiting.values_mut() {
            let (keep, expired): (Vec<_>, Vec<_>) =
                streams.drain(..).partition(|(_, since)| now.saturating_duration_since(*since) < TUNNEL_WAIT);
            *streams = keep;
            expired.into_iter().for_each(|(stream, _)| flows::reset_local(stream));
        }
        self.udp_flows.retain(|_, f| now.saturating_duration_since(f.last_active) < UDP_FLOW_IDLE);
        self.early.retain(|_, (since, _)| now.saturating_duration_since(*since) < Duration::from_secs(2));
        Ok(())
    }

    async fn flush(&mut self) {
        let Some(socket) = &self.socket else { return };
        if let Some(core) = &mut self.control {
            while let Ok(Some((n, to))) = core.poll_transmit(&mut self.txbuf) {
                let _ = socket.send_to(&self.txbuf[..n], to).await;
            }
        }
        for t in self.tunnels.values_mut() {
            while let Some((n, to)) = t.poll_transmit(&mut self.txbuf) {
                let _ = socket.send_to(&self.txbuf[..n], to).await;
            }
        }
    }
}

/// One UDP flow to a connector's backend: a connected socket, datagrams both ways.
async fn udp_backend(
    session: SessionId,
    flow: u32,
    addr: String,
    mut rx: mpsc::Receiver<Vec<u8>>,
    events: mpsc::UnboundedSender<Event>,
) {
    let Some(target) = tokio::net::lookup_host(&addr).await.ok().and_then(|mut a| a.next()) else {
        tracing::warn!(%addr, "cannot resolve UDP backend");
        return;
    };
    let bind: SocketAddr = if target.is_ipv4() { ([0, 0, 0, 0], 0).into() } else { (std::net::Ipv6Addr::UNSPECIFIED, 0).into() };
    let Ok(sock) = UdpSocket::bind(bind).await else { return };
    if sock.connect(target).await.is_err() {
        tracing::warn!(%addr, "cannot reach UDP backend");
        return;
    }
    let mut buf = vec![0u8; 65536];
    loop {
        tokio::select! {
            m = rx.recv() => match m {
                Some(data) => { let _ = sock.send(&data).await; }
                None => return,
            },
            r = sock.recv(&mut buf) => match r {
                Ok(n) => { let _ = events.send(Event::UdpFromBackend { session, flow, data: buf[..n].to_vec() }); }
                Err(_) => continue,
            },
        }
    }
}

