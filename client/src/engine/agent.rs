//! The agent's behaviour: it asks the relay for one session per service that local
//! applications use, starts the tunnel's handshake when the offer comes, and feeds the local
//! forwards' connections and datagrams into it. Local flows that arrive while no tunnel is
//! ready wait for it a while.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use ztna_proto::tunnel::UdpDatagram;
use ztna_proto::{ErrorCode, Message, SessionId};

use super::{Core, LOG, Role};
use crate::control::RelayInfo;
use crate::flows;
use crate::path::Side;
use crate::tunnel::Tunnel;

/// How long a local connection may wait for its tunnel before it is reset.
const TUNNEL_WAIT: Duration = Duration::from_secs(10);
/// UDP datagrams held per service while its tunnel comes up; later ones are dropped.
const WAITING_UDP: usize = 64;
/// After a refused `Resume` (its connector is not back yet), the next try.
const RESUME_RETRY: Duration = Duration::from_millis(500);

/// What a request in flight asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Request {
    /// A session for a service's new tunnel.
    Connect(String),
    /// A new session for tunnel `key`, whose relay session was lost.
    Resume(SessionId),
}

/// What the agent's local forwards tell the engine.
#[derive(Debug)]
pub enum AgentEvent {
    /// A local TCP connection for a service.
    NewTcp { service: String, stream: TcpStream },
    /// A datagram from a local UDP client (flow ids are unique across forwards).
    UdpIn { service: String, flow: u32, data: Vec<u8> },
    /// Where replies for a service's UDP flows go.
    UdpReturn { service: String, tx: UdpReplies },
}

/// Where an agent's UDP forward takes replies: (flow id, payload).
pub type UdpReplies = mpsc::Sender<(u32, Vec<u8>)>;

pub struct Agent {
    /// The services the agent forwards (checked against the relay's Welcome at start).
    services: Vec<String>,
    /// The tunnel serving each service (from its offer on), and Connect requests in flight.
    service_sessions: HashMap<String, SessionId>,
    requests: HashMap<u32, Request>,
    next_request: u32,
    /// Tunnels whose `Resume` was refused, and when to ask again.
    resume_retry: HashMap<SessionId, Instant>,
    /// Local connections waiting for their service's tunnel.
    waiting: HashMap<String, Vec<(TcpStream, Instant)>>,
    /// UDP datagrams waiting for their service's tunnel (a few, then dropped).
    waiting_udp: HashMap<String, Vec<(u32, Vec<u8>)>>,
    /// The UDP forwards of each service; each forward ignores replies for flows it does not
    /// own.
    udp_return: HashMap<String, Vec<UdpReplies>>,
}

impl Agent {
    pub fn new(services: Vec<String>) -> Self {
        Agent {
            services,
            service_sessions: HashMap::new(),
            requests: HashMap::new(),
            next_request: 1,
            resume_retry: HashMap::new(),
            waiting: HashMap::new(),
            waiting_udp: HashMap::new(),
            udp_return: HashMap::new(),
        }
    }

    /// The service's tunnel, once its peer is verified.
    fn ready_tunnel(&self, core: &Core, service: &str) -> Option<SessionId> {
        self.service_sessions.get(service).copied().filter(|s| core.is_verified(*s))
    }

    fn request_session(&mut self, core: &mut Core, service: &str) {
        // One tunnel per service: none while a request or a handshake is under way.
        let asked = self.requests.values().any(|r| matches!(r, Request::Connect(s) if s == service));
        if asked || self.service_sessions.contains_key(service) {
            return;
        }
        let msg = Message::Connect { request_id: self.next_request, service: service.to_owned() };
        self.request(core, msg, Request::Connect(service.to_owned()));
    }

    /// Asks for a new relay session for tunnel `key`, to the connector it already talks to.
    fn request_resume(&mut self, core: &mut Core, key: SessionId, service: String, connector: String) {
        self.resume_retry.remove(&key);
        let msg = Message::Resume { request_id: self.next_request, service, connector, tunnel: key };
        self.request(core, msg, Request::Resume(key));
    }

    /// Sends `msg`, which carries the next request id.
    fn request(&mut self, core: &mut Core, msg: Message, what: Request) {
        if !core.is_connected() {
            return;
        }
        let request_id = self.next_request;
        self.next_request = self.next_request.wrapping_add(1).max(1);
        if core.send_control(&msg) {
            self.requests.insert(request_id, what);
        }
    }
}

impl Role for Agent {
    type Event = AgentEvent;
    const SIDE: Side = Side::Agent;

    fn check_relay(&self, info: &RelayInfo, first: bool) -> Result<()> {
        if !first {
            return Ok(());
        }
        let denied: Vec<&String> = self.services.iter().filter(|s| !info.services.contains(s)).collect();
        if !denied.is_empty() {
            let list = denied.iter().map(|s| format!("{s:?}")).collect::<Vec<_>>().join(", ");
            bail!("the relay's policy does not let {} reach {list}", info.identity);
        }
        Ok(())
    }

    fn on_connected(&mut self, core: &mut Core) {
        // Tunnels that lost their session ask for new ones first; their flows go on.
        for (key, service, connector) in core.orphaned_tunnels() {
            self.request_resume(core, key, service, connector);
        }
        // Local flows that arrived while we were away get their sessions now.
        let mut wanted: Vec<String> = self.waiting.keys().chain(self.waiting_udp.keys()).cloned().collect();
        wanted.dedup();
        for service in wanted {
            self.request_session(core, &service);
        }
    }

    fn on_disconnected(&mut self) {
        // The tunnels stay (and with them `service_sessions`); what was asked is void.
        self.requests.clear();
        self.resume_retry.clear();
        // Local connections waiting for a tunnel keep waiting (up to TUNNEL_WAIT): the
        // reconnect asks for their sessions again.
    }

    fn on_message(&mut self, core: &mut Core, msg: Message) -> Result<()> {
        if let Message::SessionOffer { session, request_id, service, peer_identity, .. } = msg {
            match self.requests.remove(&request_id) {
                Some(Request::Connect(_)) => {}
                Some(Request::Resume(key)) => {
                    if !core.resume_tunnel(key, session) {
                        // The tunnel ended while we asked: the session has nothing to carry.
                        core.send_control(&Message::CloseSession { session });
                    }
                    return Ok(());
                }
                None => return Ok(()),
            }
            match core.open_tunnel(session, service.clone(), peer_identity) {
                Ok(()) => {
                    self.service_sessions.insert(service, session);
                }
                Err(e) => tracing::error!(target: LOG, error = %e, "cannot start tunnel"),
            }
        }
        Ok(())
    }

    fn on_refused(&mut self, request_id: u32, code: ErrorCode, message: &str) -> bool {
        let service = match self.requests.remove(&request_id) {
            Some(Request::Connect(service)) => service,
            Some(Request::Resume(key)) => {
                // Most often its connector has not reconnected yet: ask again shortly, until
                // the tunnel's wait for a session runs out.
                tracing::debug!(target: LOG, tunnel = %key, %code, "resume refused: {message}");
                self.resume_retry.insert(key, Instant::now() + RESUME_RETRY);
                return true;
            }
            None => return false,
        };
        // Nothing will serve these connections: reset them now, not at a timeout.
        tracing::error!(target: LOG, %service, %code, "relay refused the session: {message}");
        eprintln!("relay refused a session to {service:?}: {message} ({code})");
        for (stream, _) in self.waiting.remove(&service).unwrap_or_default() {
            flows::reset_local(stream);
        }
        self.waiting_udp.remove(&service);
        true
    }

    fn on_verified(&mut self, core: &mut Core, session: SessionId) {
        let Some(service) = core.tunnel(session).map(|t| t.service.clone()) else { return };
        for (stream, _) in self.waiting.remove(&service).unwrap_or_default() {
            core.open_flow(session, stream);
        }
        for (flow, data) in self.waiting_udp.remove(&service).unwrap_or_default() {
            core.send_udp(session, flow, &data);
        }
    }

    fn on_udp(&mut self, tunnel: &Tunnel, dgram: UdpDatagram<'_>) {
        for tx in self.udp_return.get(&tunnel.service).into_iter().flatten() {
            let _ = tx.try_send((dgram.flow, dgram.payload.to_vec()));
        }
    }

    fn on_event(&mut self, core: &mut Core, event: AgentEvent) {
        match event {
            AgentEvent::NewTcp { service, stream } => match self.ready_tunnel(core, &service) {
                Some(s) => core.open_flow(s, stream),
                None => {
                    self.waiting.entry(service.clone()).or_default().push((stream, Instant::now()));
                    self.request_session(core, &service);
                }
            },
            AgentEvent::UdpIn { service, flow, data } => match self.ready_tunnel(core, &service) {
                Some(s) => core.send_udp(s, flow, &data),
                None => {
                    let q = self.waiting_udp.entry(service.clone()).or_default();
                    if q.len() < WAITING_UDP {
                        q.push((flow, data));
                    }
                    self.request_session(core, &service);
                }
            },
            AgentEvent::UdpReturn { service, tx } => self.udp_return.entry(service).or_default().push(tx),
        }
    }

    fn on_timers(&mut self, core: &mut Core, now: Instant) {
        let due: Vec<SessionId> = self.resume_retry.iter().filter(|(_, at)| **at <= now).map(|(k, _)| *k).collect();
        for key in due {
            self.resume_retry.remove(&key);
            let Some(t) = core.tunnel(key).filter(|t| t.orphaned.is_some()) else { continue };
            let (service, connector) = (t.service.clone(), t.peer_identity.clone());
            self.request_resume(core, key, service, connector);
        }
        // Local connections that waited too long for a tunnel are reset.
        for streams in self.waiting.values_mut() {
            let (keep, expired): (Vec<_>, Vec<_>) =
                streams.drain(..).partition(|(_, since)| now.saturating_duration_since(*since) < TUNNEL_WAIT);
            *streams = keep;
            expired.into_iter().for_each(|(stream, _)| flows::reset_local(stream));
        }
    }

    fn on_tunnel_closed(&mut self, tunnel: &Tunnel) {
        if self.service_sessions.get(&tunnel.service) == Some(&tunnel.session) {
            self.service_sessions.remove(&tunnel.service);
        }
        self.resume_retry.remove(&tunnel.session);
    }
}
