//! Sessions: brokering one between an agent and a live connector, ending it (one path for
//! every cause: either side asks, either side leaves, idle, policy), and re-checking
//! connections, registrations and sessions against a reloaded policy.

use std::time::Instant;

use ztna_proto::candidate::{Candidate, CandidateKind};
use ztna_proto::control::Role;
use ztna_proto::identity::{Identity, Kind};
use ztna_proto::{ErrorCode, Message, SessionId};

use super::conn::{ConnKey, ControlConn, State, close_code};
use super::{Core, CoreMsg, Ctx, Side, Signal, Sink};
use crate::policy::Decision;
use crate::sessions::{ConnRef, Session};
use crate::tls;

impl Ctx {
    /// An agent asks for a session to `service`: policy, limits, a live connector, then an
    /// offer to each side. The session lives here, on the agent's worker. With `resume`
    /// (connector identity, tunnel id: `Resume`), the session goes to that connector and
    /// carries the agent's existing tunnel (PROTOCOL.md §7.15).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn connect(
        &mut self,
        conn: &mut ControlConn,
        id: &Identity,
        request_id: u32,
        service: String,
        resume: Option<(String, SessionId)>,
        now: Instant,
        sink: &mut impl Sink,
    ) {
        if id.kind != Kind::Agent {
            return self.refuse(conn, request_id, ErrorCode::WrongRole, format!("{id} is not an agent and cannot open sessions"));
        }
        match self.shared.policy().decide(id, &service) {
            Decision::Allow => {}
            Decision::UnknownService => {
                return self.refuse(conn, request_id, ErrorCode::UnknownService, format!("service {service:?} is not in the relay's policy"));
            }
            Decision::NotAuthorized => {
                return self.refuse(conn, request_id, ErrorCode::NotAuthorized, format!("{id} may not reach {service:?}"));
            }
        }
        if conn.sessions().len() >= self.shared.config.limits.max_sessions_per_connection {
            return self.refuse(conn, request_id, ErrorCode::SessionLimit, "too many open sessions on this connection".into());
        }
        let picked = match &resume {
            Some((identity, _)) => self.shared.registry().pick_identity(&service, identity),
            None => self.shared.registry().pick(&service),
        };
        let Some(connector) = picked else {
            let whom = resume.as_ref().map_or_else(|| "no connector is".to_string(), |(c, _)| format!("{c} is not"));
            return self.refuse(conn, request_id, ErrorCode::NoConnectorAvailable, format!("{whom} serving {service:?} right now"));
        };
        let session = loop {
            let candidate = SessionId::new(self.index, rand::random());
            if !self.sessions.contains(&candidate) {
                break candidate;
            }
        };
        // Each side learns the other's address as the relay sees it with the offer, so
        // punching starts with the session (PROTOCOL.md §14.2).
        let punch_token = rand::random();
        let peer_candidates = |addr| Message::PeerCandidates {
            session,
            token: punch_token,
            candidates: vec![Candidate::new(CandidateKind::ServerReflexive, addr)],
        };
        // The connector hears first: if its worker is gone, the agent gets a refusal rather
        // than a session nobody serves.
        let offer = Message::SessionOffer {
            session,
            request_id: 0,
            service: service.clone(),
            peer_role: Role::Agent,
            peer_identity: id.to_string(),
        };
        // The connector hears that the session resumes a tunnel before it hears candidates,
        // so those reach the tunnel rather than wait for a new one.
        let mut msgs = vec![offer];
        if let Some((_, tunnel)) = resume {
            msgs.push(Message::SessionResumes { session, tunnel });
        }
        msgs.push(peer_candidates(conn.reflexive_candidate()));
        let to_connector = CoreMsg::Offer {
            conn: connector.conn.conn,
            session,
            owner: self.index,
            addr: connector.addr,
            msgs: msgs.into_boxed_slice(),
        };
        if self.post(connector.conn.worker, to_connector, sink).is_err() {
            return self.refuse(conn, request_id, ErrorCode::Internal, "the connector's worker is not running".into());
        }
        let record = Session {
            service: service.clone(),
            agent: ConnRef { worker: self.index, conn: conn.key() },
            agent_addr: conn.peer(),
            connector: connector.conn,
            connector_identity: connector.identity.clone(),
            connector_addr: connector.addr,
            last_active: now,
            frames: 0,
            punch_token,
            direct: [false; 2],
        };
        self.sessions.insert(session, record, sink);
        conn.add_session(session);
        self.m.sessions_active.inc();
        self.shared.metrics.sessions_created.inc();
        tracing::info!(%session, agent = %id, connector = %connector.identity, %service, "session created");
        conn.send(&Message::SessionOffer {
            session,
            request_id,
            service,
            peer_role: Role::Connector,
            peer_identity: connector.identity.to_string(),
        });
        conn.send(&peer_candidates(connector.reflexive_candidate()));
    }

    /// Sends a message to worker `to`'s core; one for this worker waits in the local queue
    /// until the connection at hand is released (see [`Core::service`]).
    pub(super) fn post(&mut self, to: u8, msg: CoreMsg, sink: &mut impl Sink) -> Result<(), CoreMsg> {
        if to == self.index {
            self.local.push(msg);
            Ok(())
        } else {
            sink.post(to, msg)
        }
    }
}

impl Core {
    /// Ends a session this worker owns, telling each side that did not end it itself (`by`;
    /// `None` when the relay ends it: idle or policy). The one path every cause takes.
    pub(super) fn end_session(&mut self, id: SessionId, reason: ErrorCode, by: Option<Side>, sink: &mut impl Sink) {
        let Some(s) = self.ctx.sessions.remove(&id, sink) else { return };
        self.ctx.m.sessions_active.dec();
        if s.is_direct() {
            self.ctx.shared.metrics.sessions_direct.dec();
        }
        self.ctx.shared.metrics.session_closed(reason);
        tracing::debug!(session = %id, service = %s.service, reason = %reason, frames = s.frames, "session ended");
        if self.ctx.shared.is_draining() {
            // The relay is going, not the peer: the tunnels outlive their sessions and both
            // sides ask the next relay for new ones (PROTOCOL.md §7.15). A SessionClosed now
            // would make them give the tunnel up.
            return;
        }
        if by != Some(Side::Agent)
            && let Some(c) = self.conns.touch(&s.agent.conn)
        {
            c.session_closed(id, reason);
        }
        if by != Some(Side::Connector) {
            let msg = CoreMsg::SessionEnded { conn: s.connector.conn, session: id, reason };
            if s.connector.worker == self.ctx.index {
                self.handle_message(msg, sink);
            } else {
                let _ = sink.post(s.connector.worker, msg);
            }
        }
    }

    /// Path signalling from a party of session `id`: candidates go to the other side with
    /// the session's punch token; a path status is recorded (a direct session is not
    /// expired for carrying nothing here).
    pub(super) fn signal(&mut self, id: SessionId, by: Side, signal: Signal, sink: &mut impl Sink) {
        let metrics = &self.ctx.shared.metrics;
        let name = signal.name();
        let Some(s) = self.ctx.sessions.get_mut(&id) else {
            return metrics.signal(name, "unknown_session");
        };
        match signal {
            Signal::PathStatus(direct) => {
                let was = s.is_direct();
                s.direct[usize::from(by == Side::Connector)] = direct;
                match (was, s.is_direct()) {
                    (false, true) => metrics.sessions_direct.inc(),
                    (true, false) => metrics.sessions_direct.dec(),
                    _ => 0,
                };
                metrics.signal(name, "recorded");
            }
            Signal::Candidates(candidates) => {
                metrics.signal(name, "forwarded");
                let msg = Message::PeerCandidates { session: id, token: s.punch_token, candidates };
                let (to, worker) = match by {
                    Side::Agent => (s.connector.conn, s.connector.worker),
                    Side::Connector => (s.agent.conn, s.agent.worker),
                };
                let deliver = CoreMsg::Deliver { conn: to, session: id, msg };
                if worker == self.ctx.index {
                    self.handle_message(deliver, sink);
                } else {
                    let _ = sink.post(worker, deliver);
                }
            }
        }
    }

    /// A connection closed: count it, and end what it took part in.
    pub(super) fn remove_conn(&mut self, key: ConnKey, sink: &mut impl Sink) {
        let Some(mut conn) = self.conns.remove(&key) else { return };
        let ctx = &mut self.ctx;
        ctx.m.control_connections.dec();
        if conn.state() == State::Handshaking || conn.identity().is_none() {
            ctx.shared.metrics.handshake(false);
            if let Some(alert) = conn.tls_alert_sent() {
                // The client's certificate did not verify.
                ctx.shared.metrics.auth_failure("tls_handshake");
                tracing::info!(peer = %conn.peer(), alert, "TLS handshake refused");
            }
            return;
        }
        tracing::info!(peer = %conn.peer(), identity = %conn.identity_text(), "control connection closed");
        let side = match conn.kind() {
            Some(Kind::Agent) => Side::Agent,
            Some(Kind::Connector) => {
                let removed = ctx.shared.registry().remove_conn(ConnRef { worker: ctx.index, conn: key });
                ctx.shared.metrics.registered_connectors.dec_by(removed as i64);
                Side::Connector
            }
            _ => return,
        };
        for s in conn.take_sessions() {
            if s.worker() == self.ctx.index {
                self.end_session(s, ErrorCode::PeerGone, Some(side), sink);
            } else {
                let _ = sink.post(s.worker(), CoreMsg::EndSession { session: s, reason: ErrorCode::PeerGone, by: side });
            }
        }
    }

    /// After SIGHUP: new TLS material for new connections, and the new policy applied to
    /// existing connections, registrations and sessions.
    pub(super) fn reload(&mut self, sink: &mut impl Sink) {
        let ctx = &mut self.ctx;
        match tls::server_config(&ctx.shared.config) {
            Ok(c) => ctx.quic_config = c,
            Err(e) => tracing::error!(error = %e, "keeping the previous TLS configuration"),
        }
        let policy = ctx.shared.policy();
        for key in self.conns.keys() {
            let Some(conn) = self.conns.get_mut(&key) else { continue };
            let Some(id) = conn.identity().cloned() else { continue };
            let mut changed = false;
            if conn.state() == State::Ready && !policy.knows(&id) {
                conn.close(close_code::NOT_AUTHORIZED, &format!("{id} is no longer in the relay's policy"));
                changed = true;
            }
            if id.kind == Kind::Connector {
                let me = ConnRef { worker: ctx.index, conn: key };
                for service in conn.drop_registrations(|s| policy.decide(&id, s) == Decision::Allow) {
                    if ctx.shared.registry().unregister(&service, me) {
                        ctx.shared.metrics.registered_connectors.dec();
                    }
                    conn.send(&Message::Error {
                        request_id: 0,
                        code: ErrorCode::NotAuthorized,
                        message: format!("the policy no longer lets {id} serve {service:?}"),
                    });
                    changed = true;
                }
            }
            if changed {
                self.conns.touch(&key);
            }
        }
        let sids: Vec<SessionId> = self.ctx.sessions.ids().collect();
        for sid in sids {
            let Some(s) = self.ctx.sessions.get(&sid) else { continue };
            let agent = self.conns.get(&s.agent.conn).and_then(|c| c.identity().cloned());
            let connector = Identity::parse(&s.connector_identity).ok();
            let allowed = |who: Option<Identity>| who.is_some_and(|w| policy.decide(&w, &s.service) == Decision::Allow);
            if !allowed(agent) || !allowed(connector) {
                self.end_session(sid, ErrorCode::NotAuthorized, None, sink);
            }
        }
    }
}
