//! Who a client is (its certificate, once the handshake completes) and what its control
//! messages mean: Hello, Register, Connect, CloseSession, Ping; refusals with reasons.

use std::net::SocketAddr;
use std::time::Instant;

use ztna_proto::control::{DecodeError, MAX_SERVICES};
use ztna_proto::identity::{Identity, Kind};
use ztna_proto::{CONTROL_VERSION, ErrorCode, Message};

use super::conn::{ControlConn, Incoming, State, close_code};
use super::{CoreMsg, Ctx, Side, Signal, Sink};
use crate::policy::Decision;
use crate::registry::ConnectorEntry;
use crate::sessions::ConnRef;

impl Ctx {
    /// The handshake finished: establish who the client is from its certificate.
    pub(super) fn authenticate(&mut self, conn: &mut ControlConn, now: Instant) {
        let metrics = &self.shared.metrics;
        let id = match conn.peer_cert().map(Identity::from_certificate_der) {
            None => Err(("no_certificate", "a client certificate is required".to_string())),
            Some(Err(e)) => Err(("bad_identity", e.to_string())),
            Some(Ok(id)) if id.kind == Kind::Relay => {
                Err(("wrong_role", format!("{id} is a relay identity, not an agent or connector")))
            }
            Some(Ok(id)) => Ok(id),
        };
        match id {
            Ok(id) => {
                metrics.handshake(true);
                metrics.handshake_duration.observe(conn.handshake_time(now).as_secs_f64());
                tracing::info!(peer = %conn.peer(), identity = %id, "control connection authenticated");
                conn.authenticated(id);
            }
            Err((reason, text)) => {
                // handshakes{failed} is counted when the connection is removed.
                metrics.auth_failure(reason);
                tracing::info!(peer = %conn.peer(), reason, "authentication failed: {text}");
                conn.close(close_code::AUTH_FAILED, &text);
            }
        }
    }

    pub(super) fn read_control(&mut self, conn: &mut ControlConn, now: Instant, sink: &mut impl Sink) {
        let mut incoming = std::mem::take(&mut self.incoming);
        if let Err(why) = conn.read_stream(&mut self.scratch, &mut incoming) {
            self.shared.metrics.malformed_control.inc();
            conn.close(close_code::PROTOCOL_VIOLATION, why);
        }
        for item in incoming.drain(..) {
            if conn.state() == State::Closing {
                break;
            }
            match item {
                Incoming::Message(msg) => self.on_message(conn, msg, now, sink),
                Incoming::Invalid(DecodeError::UnknownType(kind)) => {
                    // Newer clients may send types this relay does not know: refuse, don't count as malformed.
                    self.refuse(conn, 0, ErrorCode::UnsupportedMessage, format!("unsupported control message type {kind:#04x}"));
                }
                Incoming::Invalid(e) => {
                    self.shared.metrics.malformed_control.inc();
                    self.refuse(conn, 0, ErrorCode::Malformed, format!("malformed control message: {e}"));
                }
                Incoming::Framing(e) => {
                    self.shared.metrics.malformed_control.inc();
                    self.shared.metrics.refusal(ErrorCode::Malformed);
                    conn.close(close_code::PROTOCOL_VIOLATION, &e.to_string());
                }
            }
        }
        self.incoming = incoming;
    }

    pub(super) fn refuse(&self, conn: &mut ControlConn, request_id: u32, code: ErrorCode, message: String) {
        self.shared.metrics.refusal(code);
        tracing::info!(peer = %conn.peer(), identity = %conn.identity_text(), code = %code, "refused: {message}");
        conn.send(&Message::Error { request_id, code, message });
    }

    fn on_message(&mut self, conn: &mut ControlConn, msg: Message, now: Instant, sink: &mut impl Sink) {
        let Some(id) = conn.identity().cloned() else { return };
        match (conn.state(), msg) {
            (State::AwaitHello, Message::Hello { version, .. }) => self.hello(conn, &id, version),
            (State::AwaitHello, _) => {
                self.refuse(conn, 0, ErrorCode::ProtocolViolation, "the first message must be Hello".into());
            }
            (State::Ready, Message::Register { services }) => self.register(conn, &id, services),
            (State::Ready, Message::Connect { request_id, service }) => {
                self.connect(conn, &id, request_id, service, None, now, sink)
            }
            (State::Ready, Message::Resume { request_id, service, connector, tunnel }) => {
                self.connect(conn, &id, request_id, service, Some((connector, tunnel)), now, sink)
            }
            (State::Ready, Message::CloseSession { session }) => {
                if !conn.forget_session(&session) {
                    return;
                }
                let by = if id.kind == Kind::Agent { Side::Agent } else { Side::Connector };
                // Queued even for this worker: ending a session touches the other side's
                // connection, and this handler holds one already.
                let _ = self.post(session.worker(), CoreMsg::EndSession { session, reason: ErrorCode::PeerGone, by }, sink);
            }
            (State::Ready, Message::Ping { nonce }) => conn.send(&Message::Pong { nonce }),
            (State::Ready, Message::Candidates { session, candidates }) => {
                self.signal(conn, &id, session, Signal::Candidates(candidates), sink)
            }
            (State::Ready, Message::PathStatus { session, direct }) => {
                self.signal(conn, &id, session, Signal::PathStatus(direct), sink)
            }
            (State::Ready, Message::DirectAddress { addr }) => self.direct_address(conn, &id, addr),
            (State::Ready, Message::Hello { .. }) => {
                self.refuse(conn, 0, ErrorCode::ProtocolViolation, "Hello was already sent".into());
            }
            (_, other) => {
                self.refuse(conn, 0, ErrorCode::UnsupportedMessage, format!("message type {:#04x} is not for the relay", other.kind()));
            }
        }
    }

    /// Path signalling is bound to the session: only its two parties may send it, and the
    /// relay, not the sender, decides whom it reaches.
    fn signal(&mut self, conn: &mut ControlConn, id: &Identity, session: ztna_proto::SessionId, signal: Signal, sink: &mut impl Sink) {
        if !conn.sessions().contains(&session) {
            self.shared.metrics.signal(signal.name(), "not_a_party");
            tracing::debug!(identity = %id, %session, "path signalling for a session this client is not in");
            return;
        }
        let by = if id.kind == Kind::Agent { Side::Agent } else { Side::Connector };
        let _ = self.post(session.worker(), CoreMsg::Signal { session, by, signal }, sink);
    }

    /// The client's direct traffic uses a socket of its own: new sessions announce that
    /// socket's address to the other side (PROTOCOL.md §14.6). Like any candidate it is the
    /// client's word, checked only for being an address a peer could send to.
    fn direct_address(&mut self, conn: &mut ControlConn, id: &Identity, addr: SocketAddr) {
        let metrics = &self.shared.metrics;
        if addr.port() == 0 || addr.ip().is_unspecified() || addr.ip().is_multicast() {
            metrics.signal("direct_address", "refused");
            return self.refuse(conn, 0, ErrorCode::Malformed, format!("{addr} cannot be a direct address"));
        }
        metrics.signal("direct_address", "recorded");
        tracing::debug!(identity = %id, direct = %addr, "direct traffic uses a socket of its own");
        conn.set_direct_addr(addr);
        if id.kind == Kind::Connector {
            self.shared.registry().update_direct_addr(ConnRef { worker: self.index, conn: conn.key() }, addr);
        }
    }

    fn hello(&mut self, conn: &mut ControlConn, id: &Identity, version: u16) {
        if version != CONTROL_VERSION {
            self.refuse(conn, 0, ErrorCode::UnsupportedVersion, format!("relay speaks control version {CONTROL_VERSION}, not {version}"));
            conn.close(close_code::PROTOCOL_VIOLATION, "unsupported control version");
            return;
        }
        let policy = self.shared.policy();
        if !policy.knows(id) {
            self.shared.metrics.auth_failure("not_in_policy");
            let text = format!("{id} is not allowed by the relay's policy");
            self.refuse(conn, 0, ErrorCode::NotAuthorized, text.clone());
            conn.close(close_code::NOT_AUTHORIZED, &text);
            return;
        }
        let Some(role) = id.kind.role() else { return };
        let mut services = policy.services_for(id);
        if services.len() > MAX_SERVICES {
            tracing::warn!(identity = %id, granted = services.len(), "Welcome lists only the first {MAX_SERVICES} services");
            services.truncate(MAX_SERVICES);
        }
        conn.send(&Message::Welcome { version: CONTROL_VERSION, role, identity: id.to_string(), services });
        conn.ready();
        self.report_address(conn);
    }

    fn register(&mut self, conn: &mut ControlConn, id: &Identity, services: Vec<String>) {
        if id.kind != Kind::Connector {
            return self.refuse(conn, 0, ErrorCode::WrongRole, format!("{id} is not a connector and cannot register services"));
        }
        let policy = self.shared.policy();
        let me = ConnRef { worker: self.index, conn: conn.key() };
        for service in services {
            let known = conn.registered().contains(&service);
            match policy.decide(id, &service) {
                Decision::Allow if !known && conn.registered().len() >= MAX_SERVICES => {
                    self.refuse(conn, 0, ErrorCode::ProtocolViolation, format!("at most {MAX_SERVICES} services per connector"))
                }
                Decision::Allow => {
                    if !known {
                        let entry = ConnectorEntry {
                            conn: me,
                            identity: conn.identity_text().clone(),
                            addr: conn.peer(),
                            direct_addr: conn.direct_addr(),
                        };
                        self.shared.registry().register(&service, entry);
                        self.shared.metrics.registered_connectors.inc();
                        conn.add_registration(service);
                    }
                }
                Decision::UnknownService => {
                    self.refuse(conn, 0, ErrorCode::UnknownService, format!("service {service:?} is not in the relay's policy"))
                }
                Decision::NotAuthorized => {
                    self.refuse(conn, 0, ErrorCode::NotAuthorized, format!("{id} may not serve {service:?}"))
                }
            }
        }
        tracing::info!(identity = %id, services = ?conn.registered(), "connector registered");
        conn.send(&Message::Registered { services: conn.registered().to_vec() });
    }

    /// QAD: tell the client the address we see it at.
    fn report_address(&self, conn: &mut ControlConn) {
        conn.report_address();
        self.shared.metrics.qad_report(&conn.peer());
    }

    /// A validated migration moved the client's address: report it (QAD) and rebind the
    /// client's sessions, so the relay keeps forwarding to where the client now is.
    pub(super) fn migrated(&mut self, conn: &mut ControlConn, peer: SocketAddr, sink: &mut impl Sink) {
        self.report_address(conn);
        match conn.kind() {
            Some(Kind::Agent) => {
                for s in conn.sessions() {
                    self.sessions.rebind_agent(s, peer, sink);
                }
            }
            Some(Kind::Connector) => {
                self.shared.registry().update_addr(ConnRef { worker: self.index, conn: conn.key() }, peer);
                for &session in conn.sessions() {
                    let _ = self.post(session.worker(), CoreMsg::ConnectorMoved { session, addr: peer }, sink);
                }
            }
            _ => {}
        }
    }
}
