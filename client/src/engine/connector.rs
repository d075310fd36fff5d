//! The connector's behaviour: it registers its services, accepts the tunnel of each session
//! the relay offers when the agent's first packet arrives, and connects every tunnelled
//! flow to the service's backend (a TCP connection per stream, a UDP socket per flow).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use tokio::net::{TcpStream, UdpSocket};
use tokio::sync::mpsc;
use ztna_proto::tunnel::UdpDatagram;
use ztna_proto::{Message, SessionId};

use super::{Core, LOG, Role};
use crate::flows::FlowKey;
use crate::path::Side;
use crate::tunnel::{Tunnel, UDP_FLOW_IDLE, stream_error};

const BACKEND_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Tunnel packets that arrive before their session offer (the offer and the first packet
/// race through the relay) are held briefly, a few per session.
const EARLY_FRAMES_PER_SESSION: usize = 8;
const EARLY_SESSIONS: usize = 64;
const EARLY_HOLD: Duration = Duration::from_secs(2);
/// Datagrams queued towards one UDP backend socket; more are dropped, like UDP.
const UDP_BACKEND_QUEUE: usize = 256;

/// Where a connector sends a service's flows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backend {
    Tcp(String),
    Udp(String),
}

/// What the connector's backend tasks tell the engine.
#[derive(Debug)]
pub enum ConnectorEvent {
    /// The backend of a stream answered, or did not.
    BackendReady { key: FlowKey, stream: TcpStream },
    BackendFailed { key: FlowKey, error: String },
    /// A datagram from a UDP backend.
    UdpFromBackend { session: SessionId, flow: u32, data: Vec<u8> },
}

/// A session the relay offered whose tunnel has not started yet.
struct Offer {
    service: String,
    agent: String,
}

struct UdpFlow {
    tx: mpsc::Sender<Vec<u8>>,
    last_active: Instant,
}

pub struct Connector {
    backends: HashMap<String, Backend>,
    events: mpsc::UnboundedSender<ConnectorEvent>,
    offers: HashMap<SessionId, Offer>,
    /// Tunnel packets that arrived before their offer, with when the first came.
    early: HashMap<SessionId, (Instant, Vec<Vec<u8>>)>,
    udp_flows: HashMap<(SessionId, u32), UdpFlow>,
}

impl Connector {
    /// `events` is the engine's handle ([`Engine::new`](super::Engine::new) passes it).
    pub fn new(backends: HashMap<String, Backend>, events: mpsc::UnboundedSender<ConnectorEvent>) -> Self {
        Connector { backends, events, offers: HashMap::new(), early: HashMap::new(), udp_flows: HashMap::new() }
    }

    /// Packets that came before their session was ready are handled now.
    fn replay_early(&mut self, core: &mut Core, session: SessionId) {
        for frame in self.early.remove(&session).map(|q| q.1).unwrap_or_default() {
            core.replay(frame, core.relay());
        }
    }

    /// Relay session `session` (just offered) carries our tunnel `tunnel`, if it is ours
    /// with the same agent and service; else the session is refused (closed).
    fn resume(&mut self, core: &mut Core, session: SessionId, tunnel: SessionId) {
        let Some(offer) = self.offers.remove(&session) else { return };
        let same = core.tunnel(tunnel).is_some_and(|t| t.peer_identity == offer.agent && t.service == offer.service);
        if same && core.resume_tunnel(tunnel, session) {
            self.replay_early(core, session);
        } else {
            tracing::warn!(target: LOG, %session, %tunnel, agent = %offer.agent, "asked to resume a tunnel this connector does not have; closing the session");
            self.early.remove(&session);
            core.send_control(&Message::CloseSession { session });
        }
    }

    fn connect_backend(&self, key: FlowKey, service: &str, agent: &str) {
        let Some(Backend::Tcp(addr)) = self.backends.get(service).cloned() else {
            let _ = self.events.send(ConnectorEvent::BackendFailed { key, error: format!("{service:?} is not a TCP service") });
            return;
        };
        tracing::info!(target: LOG, session = %key.0, stream = key.1, %service, %agent, backend = %addr, "new TCP flow");
        let events = self.events.clone();
        tokio::spawn(async move {
            let result = tokio::time::timeout(BACKEND_CONNECT_TIMEOUT, TcpStream::connect(&addr)).await;
            let event = match result {
                Ok(Ok(stream)) => ConnectorEvent::BackendReady { key, stream },
                Ok(Err(e)) => ConnectorEvent::BackendFailed { key, error: format!("{addr}: {e}") },
                Err(_) => ConnectorEvent::BackendFailed { key, error: format!("{addr}: connect timed out") },
            };
            let _ = events.send(event);
        });
    }
}

impl Role for Connector {
    type Event = ConnectorEvent;
    const SIDE: Side = Side::Connector;

    fn on_connected(&mut self, core: &mut Core) {
        let mut services: Vec<String> = self.backends.keys().cloned().collect();
        services.sort();
        core.send_control(&Message::Register { services });
    }

    fn on_disconnected(&mut self) {
        self.offers.clear();
    }

    fn on_message(&mut self, core: &mut Core, msg: Message) -> Result<()> {
        match msg {
            Message::Registered { services } => {
                if services.is_empty() {
                    bail!("the relay registered none of this connector's services");
                }
                tracing::info!(target: LOG, ?services, "registered");
            }
            Message::SessionOffer { session, service, peer_identity, .. } => {
                tracing::info!(target: LOG, %session, %service, agent = %peer_identity, "session offered");
                self.offers.insert(session, Offer { service, agent: peer_identity });
                self.replay_early(core, session);
            }
            Message::SessionResumes { session, tunnel } => self.resume(core, session, tunnel),
            _ => {}
        }
        Ok(())
    }

    fn on_session_closed(&mut self, session: SessionId) {
        self.offers.remove(&session);
    }

    fn on_unknown_session(&mut self, core: &mut Core, session: SessionId, datagram: &[u8]) {
        // The first packet of an offered session starts its tunnel: the agent's Initial.
        // Anything else is held: its offer, or the news that the session resumes a tunnel
        // (`SessionResumes`), may still be on its way.
        let initial = datagram.get(ztna_proto::frame::DATA_HEADER_LEN).is_some_and(|&b| b & 0xf0 == 0xc0);
        let offer = if initial { self.offers.remove(&session) } else { None };
        let Some(offer) = offer else {
            // Maybe the offer is still on its way: keep the packet for a moment.
            if self.early.len() < EARLY_SESSIONS || self.early.contains_key(&session) {
                let q = self.early.entry(session).or_insert_with(|| (Instant::now(), Vec::new()));
                if q.1.len() < EARLY_FRAMES_PER_SESSION {
                    q.1.push(datagram.to_vec());
                }
            }
            return;
        };
        if let Err(e) = core.open_tunnel(session, offer.service, offer.agent) {
            tracing::warn!(target: LOG, error = %e, %session, "cannot accept tunnel");
        }
    }

    fn on_new_stream(&mut self, core: &mut Core, key: FlowKey) {
        let Some(t) = core.tunnel(key.0) else { return };
        self.connect_backend(key, &t.service, &t.peer_identity);
    }

    fn on_udp(&mut self, tunnel: &Tunnel, dgram: UdpDatagram<'_>) {
        let session = tunnel.session;
        let key = (session, dgram.flow);
        if let Some(f) = self.udp_flows.get_mut(&key) {
            f.last_active = Instant::now();
            let _ = f.tx.try_send(dgram.payload.to_vec());
            return;
        }
        // A datagram for a service whose backend is not UDP is dropped.
        let Some(Backend::Udp(addr)) = self.backends.get(&tunnel.service).cloned() else { return };
        tracing::info!(target: LOG, %session, flow = dgram.flow, service = %tunnel.service, agent = %tunnel.peer_identity, backend = %addr, "new UDP flow");
        let (tx, rx) = mpsc::channel(UDP_BACKEND_QUEUE);
        let _ = tx.try_send(dgram.payload.to_vec());
        self.udp_flows.insert(key, UdpFlow { tx, last_active: Instant::now() });
        tokio::spawn(udp_backend(session, dgram.flow, addr, rx, self.events.clone()));
    }

    fn on_event(&mut self, core: &mut Core, event: ConnectorEvent) {
        match event {
            ConnectorEvent::BackendReady { key, stream } => core.attach_flow(key, stream),
            ConnectorEvent::BackendFailed { key, error } => {
                tracing::warn!(target: LOG, session = %key.0, stream = key.1, "backend unreachable: {error}");
                core.reset_flow(key, stream_error::BACKEND_UNREACHABLE);
            }
            ConnectorEvent::UdpFromBackend { session, flow, data } => {
                if let Some(f) = self.udp_flows.get_mut(&(session, flow)) {
                    f.last_active = Instant::now();
                }
                core.send_udp(session, flow, &data);
            }
        }
    }

    fn on_timers(&mut self, _core: &mut Core, now: Instant) {
        self.udp_flows.retain(|_, f| now.saturating_duration_since(f.last_active) < UDP_FLOW_IDLE);
        self.early.retain(|_, (since, _)| now.saturating_duration_since(*since) < EARLY_HOLD);
    }

    fn on_tunnel_closed(&mut self, tunnel: &Tunnel) {
        self.udp_flows.retain(|(s, _), _| *s != tunnel.session);
    }
}

/// One UDP flow to a backend: a connected socket, datagrams both ways.
async fn udp_backend(
    session: SessionId,
    flow: u32,
    addr: String,
    mut rx: mpsc::Receiver<Vec<u8>>,
    events: mpsc::UnboundedSender<ConnectorEvent>,
) {
    let Some(target) = tokio::net::lookup_host(&addr).await.ok().and_then(|mut a| a.next()) else {
        tracing::warn!(target: LOG, %addr, "cannot resolve UDP backend");
        return;
    };
    let bind: SocketAddr = if target.is_ipv4() { ([0, 0, 0, 0], 0).into() } else { (std::net::Ipv6Addr::UNSPECIFIED, 0).into() };
    let Ok(sock) = UdpSocket::bind(bind).await else { return };
    if sock.connect(target).await.is_err() {
        tracing::warn!(target: LOG, %addr, "cannot reach UDP backend");
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
                Ok(n) => { let _ = events.send(ConnectorEvent::UdpFromBackend { session, flow, data: buf[..n].to_vec() }); }
                Err(_) => continue,
            },
        }
    }
}
