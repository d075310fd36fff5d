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
    requests: HashMap<u32, String>,
    next_request: u32,
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
        if self.requests.values().any(|s| s == service) || self.service_sessions.contains_key(service) {
            return;
        }
        if !core.is_connected() {
            return;
        }
        let request_id = self.next_request;
        self.next_request = self.next_request.wrapping_add(1).max(1);
        if core.send_control(&Message::Connect { request_id, service: service.to_owned() }) {
            self.requests.insert(request_id, service.to_owned());
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
        // Local flows that arrived while we were away get their sessions now.
        let mut wanted: Vec<String> = self.waiting.keys().chain(self.waiting_udp.keys()).cloned().collect();
        wanted.dedup();
        for service in wanted {
            self.request_session(core, &service);
        }
    }

    fn on_disconnected(&mut self) {
        self.requests.clear();
        self.service_sessions.clear();
        // Local connections waiting for a tunnel keep waiting (up to TUNNEL_WAIT): the
        // reconnect asks for their sessions again.
    }

    fn on_message(&mut self, core: &mut Core, msg: Message) -> Result<()> {
        if let Message::SessionOffer { session, request_id, service, peer_identity, .. } = msg {
            if self.requests.remove(&request_id).is_none() {
                return Ok(());
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
        let Some(service) = self.requests.remove(&request_id) else { return false };
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

    fn on_timers(&mut self, now: Instant) {
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
    }
}
