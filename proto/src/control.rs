//! Control messages, carried on the client-initiated bidirectional stream 0 of the control
//! connection. Each message is `[u16 length][u8 type][body]`, the length covering type and
//! body. Strings are `[u16 length][UTF-8]`; lists are `[u16 count][items]`.

use std::net::SocketAddr;

use thiserror::Error;

use crate::addr;
use crate::candidate::{self, Candidate, PUNCH_TOKEN_LEN};
use crate::id::{ID_LEN, SessionId};
use crate::wire::{Reader, WireError, put_string};

/// Largest message (type + body). A peer that announces more is closed: framing is lost.
pub const MAX_MESSAGE_LEN: usize = 16 * 1024;
/// Longest service name, in bytes (`[a-z0-9._-]`).
pub const MAX_SERVICE_LEN: usize = 63;
/// Longest identity (a certificate URI SAN such as `ztna://agent/alice`).
pub const MAX_IDENTITY_LEN: usize = 255;
/// Longest free-text field (error messages, software names).
pub const MAX_TEXT_LEN: usize = 1024;
/// Most services in one list.
pub const MAX_SERVICES: usize = 128;

/// QUIC application error codes the relay sends in CONNECTION_CLOSE of a control
/// connection (the reason phrase says more).
pub mod close_code {
    /// Relay shutting down (drain) or a client saying goodbye.
    pub const SHUTDOWN: u64 = 0;
    /// The client certificate is missing or names no valid identity.
    pub const AUTH_FAILED: u64 = 0x101;
    /// The identity is not in the relay's policy (or no longer is).
    pub const NOT_AUTHORIZED: u64 = 0x102;
    /// Control-stream framing lost, data on another stream, or an unsupported version.
    pub const PROTOCOL_VIOLATION: u64 = 0x103;
    /// The client stopped reading its control stream.
    pub const SLOW_READER: u64 = 0x104;
    /// A connector with sessions stopped answering the relay's liveness pings.
    pub const UNRESPONSIVE: u64 = 0x105;

    /// Codes after which reconnecting cannot help: the client's identity was refused.
    pub fn is_permanent(code: u64) -> bool {
        code == AUTH_FAILED || code == NOT_AUTHORIZED
    }
}

/// Reason codes of `Error` and `SessionClosed`. Unknown codes are kept, not rejected, so an
/// older client still shows a newer relay's refusal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    Malformed,
    UnsupportedVersion,
    UnknownService,
    NotAuthorized,
    NoConnectorAvailable,
    WrongRole,
    ProtocolViolation,
    RateLimited,
    SessionLimit,
    IdleTimeout,
    PeerGone,
    UnsupportedMessage,
    Internal,
    Other(u16),
}

impl ErrorCode {
    pub const ALL: [ErrorCode; 13] = [
        ErrorCode::Malformed,
        ErrorCode::UnsupportedVersion,
        ErrorCode::UnknownService,
        ErrorCode::NotAuthorized,
        ErrorCode::NoConnectorAvailable,
        ErrorCode::WrongRole,
        ErrorCode::ProtocolViolation,
        ErrorCode::RateLimited,
        ErrorCode::SessionLimit,
        ErrorCode::IdleTimeout,
        ErrorCode::PeerGone,
        ErrorCode::UnsupportedMessage,
        ErrorCode::Internal,
    ];

    pub fn to_u16(self) -> u16 {
        match self {
            ErrorCode::Malformed => 1,
            ErrorCode::UnsupportedVersion => 2,
            ErrorCode::UnknownService => 3,
            ErrorCode::NotAuthorized => 4,
            ErrorCode::NoConnectorAvailable => 5,
            ErrorCode::WrongRole => 6,
            ErrorCode::ProtocolViolation => 7,
            ErrorCode::RateLimited => 8,
            ErrorCode::SessionLimit => 9,
            ErrorCode::IdleTimeout => 10,
            ErrorCode::PeerGone => 11,
            ErrorCode::UnsupportedMessage => 12,
            ErrorCode::Internal => 13,
            ErrorCode::Other(v) => v,
        }
    }

    pub fn from_u16(v: u16) -> Self {
        ErrorCode::ALL.into_iter().find(|c| c.to_u16() == v).unwrap_or(ErrorCode::Other(v))
    }

    /// Stable snake_case name, used in metrics labels and user-facing text.
    pub fn name(self) -> &'static str {
        match self {
            ErrorCode::Malformed => "malformed",
            ErrorCode::UnsupportedVersion => "unsupported_version",
            ErrorCode::UnknownService => "unknown_service",
            ErrorCode::NotAuthorized => "not_authorized",
            ErrorCode::NoConnectorAvailable => "no_connector_available",
            ErrorCode::WrongRole => "wrong_role",
            ErrorCode::ProtocolViolation => "protocol_violation",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::SessionLimit => "session_limit",
            ErrorCode::IdleTimeout => "idle_timeout",
            ErrorCode::PeerGone => "peer_gone",
            ErrorCode::UnsupportedMessage => "unsupported_message",
            ErrorCode::Internal => "internal",
            ErrorCode::Other(_) => "other",
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ErrorCode::Other(v) => write!(f, "error code {v}"),
            c => f.write_str(c.name()),
        }
    }
}

/// Which side a session message is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    Agent,
    Connector,
}

impl Role {
    fn to_u8(self) -> u8 {
        match self {
            Role::Agent => 1,
            Role::Connector => 2,
        }
    }
    fn from_u8(v: u8) -> Result<Self, WireError> {
        match v {
            1 => Ok(Role::Agent),
            2 => Ok(Role::Connector),
            _ => Err(WireError::Invalid("unknown role")),
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Role::Agent => "agent",
            Role::Connector => "connector",
        }
    }
}

/// Every control message. Client-to-relay types are 0x01..=0x7f, relay-to-client 0x81..=0xff.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// C->R, first message: the control protocol version and the client software.
    Hello { version: u16, software: String },
    /// C->R, connector: serve these services.
    Register { services: Vec<String> },
    /// C->R, agent: open a session to a service; `request_id` is echoed in the answer.
    Connect { request_id: u32, service: String },
    /// C->R: this client is done with a session.
    CloseSession { session: SessionId },
    /// C->R: application-level RTT probe; answered by `Pong`.
    Ping { nonce: u64 },
    /// C->R: this side's path candidates for a session it takes part in; the relay passes
    /// them to the other side as `PeerCandidates` (§14.2).
    Candidates { session: SessionId, candidates: Vec<Candidate> },
    /// C->R: which path the session's tunnel uses now (`direct` or via the relay).
    PathStatus { session: SessionId, direct: bool },
    /// C->R: this client sends and receives direct traffic on a socket of its own, which a
    /// stateless QAD probe (§8.3) saw at `addr`: the relay announces that address, not the
    /// control connection's, as this side's server-reflexive candidate of new sessions (§14.6).
    DirectAddress { addr: SocketAddr },
    /// C->R, agent: a new session for the live end-to-end tunnel `tunnel` (the id of the
    /// tunnel's first session) with connector `connector`, after the old session was lost
    /// with the control connection. Answered like `Connect` (§7.15).
    Resume { request_id: u32, service: String, connector: String, tunnel: SessionId },
    /// R->C, answer to Hello: the identity and role the relay authenticated, and the
    /// services the policy lets it reach (agent) or serve (connector).
    Welcome { version: u16, role: Role, identity: String, services: Vec<String> },
    /// R->C, QAD: the client's address as the relay observes it. `seq` grows per report.
    ObservedAddress { seq: u32, addr: SocketAddr },
    /// R->C, answer to Register: the services now registered for this connector.
    Registered { services: Vec<String> },
    /// R->C: a session exists; sent to both sides. `request_id` is the agent's Connect id
    /// (0 for the connector); `peer_role`/`peer_identity` name the other side.
    SessionOffer { session: SessionId, request_id: u32, service: String, peer_role: Role, peer_identity: String },
    /// R->C: a session ended (peer gone, idle, closed).
    SessionClosed { session: SessionId, reason: ErrorCode },
    /// R->C: a refusal. `request_id` names the Connect it answers, or 0.
    Error { request_id: u32, code: ErrorCode, message: String },
    /// R->C: answer to Ping.
    Pong { nonce: u64 },
    /// R->C: the other side's candidates for a session, and the session's punch token.
    /// Sent with every `SessionOffer` (holding the peer's address as the relay sees it) and
    /// whenever the peer sends `Candidates`.
    PeerCandidates { session: SessionId, token: [u8; PUNCH_TOKEN_LEN], candidates: Vec<Candidate> },
    /// R->C, connector, right after a `SessionOffer`: the new session carries the existing
    /// tunnel `tunnel` (an agent's `Resume`).
    SessionResumes { session: SessionId, tunnel: SessionId },
    /// R->C: the relay is shutting down and closes this connection next; reconnect at a
    /// random moment within `reconnect_within_ms`, so the clients of a restart do not all
    /// come back at once (§7.16).
    GoingAway { reconnect_within_ms: u32 },
}

pub const TYPE_HELLO: u8 = 0x01;
pub const TYPE_REGISTER: u8 = 0x02;
pub const TYPE_CONNECT: u8 = 0x03;
pub const TYPE_CLOSE_SESSION: u8 = 0x04;
pub const TYPE_PING: u8 = 0x05;
pub const TYPE_CANDIDATES: u8 = 0x06;
pub const TYPE_PATH_STATUS: u8 = 0x07;
pub const TYPE_DIRECT_ADDRESS: u8 = 0x08;
pub const TYPE_RESUME: u8 = 0x09;
pub const TYPE_WELCOME: u8 = 0x81;
pub const TYPE_OBSERVED_ADDRESS: u8 = 0x82;
pub const TYPE_REGISTERED: u8 = 0x83;
pub const TYPE_SESSION_OFFER: u8 = 0x84;
pub const TYPE_SESSION_CLOSED: u8 = 0x85;
pub const TYPE_ERROR: u8 = 0x86;
pub const TYPE_PONG: u8 = 0x87;
pub const TYPE_PEER_CANDIDATES: u8 = 0x88;
pub const TYPE_SESSION_RESUMES: u8 = 0x89;
pub const TYPE_GOING_AWAY: u8 = 0x8a;

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DecodeError {
    #[error("empty message")]
    Empty,
    #[error("unknown message type {0:#04x}")]
    UnknownType(u8),
    #[error("malformed message type {kind:#04x}: {err}")]
    Malformed { kind: u8, err: WireError },
    #[error("invalid service name")]
    BadServiceName,
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum EncodeError {
    #[error("invalid service name {0:?}")]
    BadServiceName(String),
    #[error("field too long: {0}")]
    TooLong(&'static str),
}

/// Service names are short lowercase tokens, so they are safe in logs, metrics and files.
pub fn valid_service_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_SERVICE_LEN
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
}

impl Message {
    pub fn kind(&self) -> u8 {
        match self {
            Message::Hello { .. } => TYPE_HELLO,
            Message::Register { .. } => TYPE_REGISTER,
            Message::Connect { .. } => TYPE_CONNECT,
            Message::CloseSession { .. } => TYPE_CLOSE_SESSION,
            Message::Ping { .. } => TYPE_PING,
            Message::Welcome { .. } => TYPE_WELCOME,
            Message::ObservedAddress { .. } => TYPE_OBSERVED_ADDRESS,
            Message::Registered { .. } => TYPE_REGISTERED,
            Message::SessionOffer { .. } => TYPE_SESSION_OFFER,
            Message::SessionClosed { .. } => TYPE_SESSION_CLOSED,
            Message::Error { .. } => TYPE_ERROR,
            Message::Pong { .. } => TYPE_PONG,
            Message::Candidates { .. } => TYPE_CANDIDATES,
            Message::PathStatus { .. } => TYPE_PATH_STATUS,
            Message::DirectAddress { .. } => TYPE_DIRECT_ADDRESS,
            Message::Resume { .. } => TYPE_RESUME,
            Message::SessionResumes { .. } => TYPE_SESSION_RESUMES,
            Message::GoingAway { .. } => TYPE_GOING_AWAY,
            Message::PeerCandidates { .. } => TYPE_PEER_CANDIDATES,
        }
    }

    /// Appends `[u16 length][type][body]` to `out`. Fails (writing nothing) on a field the
    /// spec does not allow, so a bad message never reaches the wire.
    pub fn encode(&self, out: &mut Vec<u8>) -> Result<(), EncodeError> {
        let start = out.len();
        out.extend_from_slice(&[0, 0]);
        out.push(self.kind());
        if let Err(e) = self.encode_body(out) {
            out.truncate(start);
            return Err(e);
        }
        let len = out.len() - start - 2;
        if len > MAX_MESSAGE_LEN {
            out.truncate(start);
            return Err(EncodeError::TooLong("message"));
        }
        out[start..start + 2].copy_from_slice(&(len as u16).to_be_bytes());
        Ok(())
    }

    fn encode_body(&self, out: &mut Vec<u8>) -> Result<(), EncodeError> {
        match self {
            Message::Hello { version, software } => {
                out.extend_from_slice(&version.to_be_bytes());
                text(out, software, MAX_TEXT_LEN, "software")?;
            }
            Message::Register { services } | Message::Registered { services } => service_list(out, services)?,
            Message::Connect { request_id, service } => {
                out.extend_from_slice(&request_id.to_be_bytes());
                service_name(out, service)?;
            }
            Message::CloseSession { session } => out.extend_from_slice(session.as_bytes()),
            Message::Ping { nonce } | Message::Pong { nonce } => out.extend_from_slice(&nonce.to_be_bytes()),
            Message::Welcome { version, role, identity, services } => {
                out.extend_from_slice(&version.to_be_bytes());
                out.push(role.to_u8());
                text(out, identity, MAX_IDENTITY_LEN, "identity")?;
                service_list(out, services)?;
            }
            Message::ObservedAddress { seq, addr: a } => {
                out.extend_from_slice(&seq.to_be_bytes());
                addr::encode(a, out);
            }
            Message::DirectAddress { addr: a } => addr::encode(a, out),
            Message::Resume { request_id, service, connector, tunnel } => {
                out.extend_from_slice(&request_id.to_be_bytes());
                service_name(out, service)?;
                text(out, connector, MAX_IDENTITY_LEN, "connector identity")?;
                out.extend_from_slice(tunnel.as_bytes());
            }
            Message::SessionResumes { session, tunnel } => {
                out.extend_from_slice(session.as_bytes());
                out.extend_from_slice(tunnel.as_bytes());
            }
            Message::GoingAway { reconnect_within_ms } => out.extend_from_slice(&reconnect_within_ms.to_be_bytes()),
            Message::SessionOffer { session, request_id, service, peer_role, peer_identity } => {
                out.extend_from_slice(session.as_bytes());
                out.extend_from_slice(&request_id.to_be_bytes());
                service_name(out, service)?;
                out.push(peer_role.to_u8());
                text(out, peer_identity, MAX_IDENTITY_LEN, "peer identity")?;
            }
            Message::SessionClosed { session, reason } => {
                out.extend_from_slice(session.as_bytes());
                out.extend_from_slice(&reason.to_u16().to_be_bytes());
            }
            Message::Error { request_id, code, message } => {
                out.extend_from_slice(&request_id.to_be_bytes());
                out.extend_from_slice(&code.to_u16().to_be_bytes());
                text(out, message, MAX_TEXT_LEN, "error message")?;
            }
            Message::Candidates { session, candidates } => {
                out.extend_from_slice(session.as_bytes());
                candidate::encode_list(out, candidates).map_err(EncodeError::TooLong)?;
            }
            Message::PathStatus { session, direct } => {
                out.extend_from_slice(session.as_bytes());
                out.push(u8::from(*direct));
            }
            Message::PeerCandidates { session, token, candidates } => {
                out.extend_from_slice(session.as_bytes());
                out.extend_from_slice(token);
                candidate::encode_list(out, candidates).map_err(EncodeError::TooLong)?;
            }
        }
        Ok(())
    }

    /// Decodes one message body (`[type][fields]`, without the length prefix).
    pub fn decode(body: &[u8]) -> Result<Message, DecodeError> {
        let (&kind, rest) = body.split_first().ok_or(DecodeError::Empty)?;
        let mut r = Reader::new(rest);
        let malformed = |err| DecodeError::Malformed { kind, err };
        let msg = match kind {
            TYPE_HELLO => Message::Hello { version: r.u16().map_err(malformed)?, software: r.string(MAX_TEXT_LEN).map_err(malformed)?.to_owned() },
            TYPE_REGISTER => Message::Register { services: read_services(&mut r, kind)? },
            TYPE_CONNECT => Message::Connect { request_id: r.u32().map_err(malformed)?, service: read_service(&mut r, kind)? },
            TYPE_CLOSE_SESSION => Message::CloseSession { session: read_session(&mut r).map_err(malformed)? },
            TYPE_PING => Message::Ping { nonce: r.u64().map_err(malformed)? },
            TYPE_PONG => Message::Pong { nonce: r.u64().map_err(malformed)? },
            TYPE_WELCOME => Message::Welcome {
                version: r.u16().map_err(malformed)?,
                role: Role::from_u8(r.u8().map_err(malformed)?).map_err(malformed)?,
                identity: r.string(MAX_IDENTITY_LEN).map_err(malformed)?.to_owned(),
                services: read_services(&mut r, kind)?,
            },
            TYPE_OBSERVED_ADDRESS => Message::ObservedAddress { seq: r.u32().map_err(malformed)?, addr: addr::decode(&mut r).map_err(malformed)? },
            TYPE_DIRECT_ADDRESS => Message::DirectAddress { addr: addr::decode(&mut r).map_err(malformed)? },
            TYPE_RESUME => Message::Resume {
                request_id: r.u32().map_err(malformed)?,
                service: read_service(&mut r, kind)?,
                connector: r.string(MAX_IDENTITY_LEN).map_err(malformed)?.to_owned(),
                tunnel: read_session(&mut r).map_err(malformed)?,
            },
            TYPE_GOING_AWAY => Message::GoingAway { reconnect_within_ms: r.u32().map_err(malformed)? },
            TYPE_SESSION_RESUMES => Message::SessionResumes {
                session: read_session(&mut r).map_err(malformed)?,
                tunnel: read_session(&mut r).map_err(malformed)?,
            },
            TYPE_REGISTERED => Message::Registered { services: read_services(&mut r, kind)? },
            TYPE_SESSION_OFFER => Message::SessionOffer {
                session: read_session(&mut r).map_err(malformed)?,
                request_id: r.u32().map_err(malformed)?,
                service: read_service(&mut r, kind)?,
                peer_role: Role::from_u8(r.u8().map_err(malformed)?).map_err(malformed)?,
                peer_identity: r.string(MAX_IDENTITY_LEN).map_err(malformed)?.to_owned(),
            },
            TYPE_SESSION_CLOSED => Message::SessionClosed {
                session: read_session(&mut r).map_err(malformed)?,
                reason: ErrorCode::from_u16(r.u16().map_err(malformed)?),
            },
            TYPE_ERROR => Message::Error {
                request_id: r.u32().map_err(malformed)?,
                code: ErrorCode::from_u16(r.u16().map_err(malformed)?),
                message: r.string(MAX_TEXT_LEN).map_err(malformed)?.to_owned(),
            },
            TYPE_CANDIDATES => Message::Candidates {
                session: read_session(&mut r).map_err(malformed)?,
                candidates: candidate::decode_list(&mut r).map_err(malformed)?,
            },
            TYPE_PATH_STATUS => Message::PathStatus {
                session: read_session(&mut r).map_err(malformed)?,
                direct: match r.u8().map_err(malformed)? {
                    0 => false,
                    1 => true,
                    _ => return Err(malformed(WireError::Invalid("path status is 0 or 1"))),
                },
            },
            TYPE_PEER_CANDIDATES => Message::PeerCandidates {
                session: read_session(&mut r).map_err(malformed)?,
                token: r.array::<PUNCH_TOKEN_LEN>().map_err(malformed)?,
                candidates: candidate::decode_list(&mut r).map_err(malformed)?,
            },
            other => return Err(DecodeError::UnknownType(other)),
        };
        r.finish().map_err(malformed)?;
        Ok(msg)
    }
}

fn text(out: &mut Vec<u8>, s: &str, max: usize, what: &'static str) -> Result<(), EncodeError> {
    if s.len() > max {
        return Err(EncodeError::TooLong(what));
    }
    put_string(out, s);
    Ok(())
}

fn service_name(out: &mut Vec<u8>, s: &str) -> Result<(), EncodeError> {
    if !valid_service_name(s) {
        return Err(EncodeError::BadServiceName(s.to_owned()));
    }
    put_string(out, s);
    Ok(())
}

fn service_list(out: &mut Vec<u8>, services: &[String]) -> Result<(), EncodeError> {
    if services.len() > MAX_SERVICES {
        return Err(EncodeError::TooLong("service list"));
    }
    out.extend_from_slice(&(services.len() as u16).to_be_bytes());
    services.iter().try_for_each(|s| service_name(out, s))
}

fn read_session(r: &mut Reader<'_>) -> Result<SessionId, WireError> {
    Ok(SessionId(r.array::<ID_LEN>()?))
}

fn read_service(r: &mut Reader<'_>, kind: u8) -> Result<String, DecodeError> {
    let s = r.string(MAX_SERVICE_LEN).map_err(|err| DecodeError::Malformed { kind, err })?;
    if !valid_service_name(s) {
        return Err(DecodeError::BadServiceName);
    }
    Ok(s.to_owned())
}

fn read_services(r: &mut Reader<'_>, kind: u8) -> Result<Vec<String>, DecodeError> {
    let count = r.u16().map_err(|err| DecodeError::Malformed { kind, err })? as usize;
    if count > MAX_SERVICES {
        return Err(DecodeError::Malformed { kind, err: WireError::Invalid("too many services") });
    }
    // Each name takes at least 3 bytes, so a lying count cannot make us reserve much.
    let mut out = Vec::with_capacity(count.min(r.remaining() / 3));
    for _ in 0..count {
        out.push(read_service(r, kind)?);
    }
    Ok(out)
}

/// Framing error: the stream can no longer be parsed and the connection must close.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("control message length {0} exceeds the maximum of {MAX_MESSAGE_LEN}")]
pub struct FramingError(pub usize);

/// Reassembles messages from control-stream bytes as they arrive.
#[derive(Debug, Default)]
pub struct MessageReader {
    buf: Vec<u8>,
    start: usize,
}

impl MessageReader {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn push(&mut self, bytes: &[u8]) {
        if self.start > 0 && self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes received but not yet consumed (a partial message).
    pub fn pending(&self) -> usize {
        self.buf.len() - self.start
    }

    /// The next complete message: `None` when more bytes are needed, `Some(Ok(Err(_)))`
    /// for a well-framed but invalid message (the stream stays usable), `Some(Err(_))` when
    /// framing is lost.
    pub fn next_message(&mut self) -> Option<Result<Result<Message, DecodeError>, FramingError>> {
        let avail = &self.buf[self.start..];
        if avail.len() < 2 {
            return None;
        }
        let len = u16::from_be_bytes([avail[0], avail[1]]) as usize;
        if len > MAX_MESSAGE_LEN {
            return Some(Err(FramingError(len)));
        }
        if avail.len() < 2 + len {
            return None;
        }
        let msg = Message::decode(&avail[2..2 + len]);
        self.start += 2 + len;
        if self.start > 4096 && self.start * 2 > self.buf.len() {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        Some(Ok(msg))
    }
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

    use proptest::collection::vec;
    use proptest::prelude::*;
    use proptest::sample::{Index, select};

    use super::*;

    const KNOWN_TYPES: [u8; 15] = [
        TYPE_HELLO,
        TYPE_REGISTER,
        TYPE_CONNECT,
        TYPE_CLOSE_SESSION,
        TYPE_PING,
        TYPE_WELCOME,
        TYPE_OBSERVED_ADDRESS,
        TYPE_REGISTERED,
        TYPE_SESSION_OFFER,
        TYPE_SESSION_CLOSED,
        TYPE_ERROR,
        TYPE_PONG,
        TYPE_CANDIDATES,
        TYPE_PATH_STATUS,
        TYPE_PEER_CANDIDATES,
    ];

    /// Cuts `s` to at most `max` bytes, on a char boundary.
    fn truncate_bytes(mut s: String, max: usize) -> String {
        let mut n = s.len().min(max);
        while !s.is_char_boundary(n) {
            n -= 1;
        }
        s.truncate(n);
        s
    }

    /// Any UTF-8 text of at most `max` bytes, with the exact limit (ASCII and multi-byte)
    /// generated on purpose.
    fn text(max: usize) -> impl Strategy<Value = String> {
        prop_oneof![
            6 => vec(any::<char>(), 0..=max.min(48)).prop_map(move |cs| truncate_bytes(cs.into_iter().collect(), max)),
            2 => vec(any::<char>(), 0..=max).prop_map(move |cs| truncate_bytes(cs.into_iter().collect(), max)),
            1 => Just("x".repeat(max)),
            1 => Just("é".repeat(max / 2)),
        ]
    }

    fn service() -> impl Strategy<Value = String> {
        prop_oneof![
            8 => "[a-z0-9._-]{1,16}",
            2 => "[a-z0-9._-]{1,63}",
            1 => Just("z".repeat(MAX_SERVICE_LEN)),
        ]
    }

    fn services() -> impl Strategy<Value = Vec<String>> {
        prop_oneof![
            8 => vec(service(), 0..8),
            1 => vec(service(), 0..=MAX_SERVICES),
            1 => vec(service(), MAX_SERVICES),
        ]
    }

    fn error_code() -> impl Strategy<Value = ErrorCode> {
        let known: Vec<u16> = ErrorCode::ALL.iter().map(|c| c.to_u16()).collect();
        prop_oneof![
            select(ErrorCode::ALL.to_vec()),
            any::<u16>().prop_filter("not a known code", move |v| !known.contains(v)).prop_map(ErrorCode::Other),
            Just(ErrorCode::Other(0)),
            Just(ErrorCode::Other(u16::MAX)),
        ]
    }

    fn role() -> impl Strategy<Value = Role> {
        prop_oneof![Just(Role::Agent), Just(Role::Connector)]
    }

    fn session() -> impl Strategy<Value = SessionId> {
        any::<[u8; ID_LEN]>().prop_map(SessionId)
    }

    /// Canonical socket addresses (what `ObservedAddress` decodes to).
    fn socket_addr() -> impl Strategy<Value = SocketAddr> {
        prop_oneof![
            (any::<[u8; 4]>(), any::<u16>())
                .prop_map(|(ip, port)| SocketAddr::new(IpAddr::V4(Ipv4Addr::from(ip)), port)),
            (any::<[u8; 16]>(), any::<u16>())
                .prop_map(|(ip, port)| addr::canonical(SocketAddr::new(IpAddr::V6(Ipv6Addr::from(ip)), port))),
            any::<u16>().prop_map(|port| SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), port)),
        ]
    }

    fn message() -> impl Strategy<Value = Message> {
        prop_oneof![
            (any::<u16>(), text(MAX_TEXT_LEN)).prop_map(|(version, software)| Message::Hello { version, software }),
            services().prop_map(|services| Message::Register { services }),
            (any::<u32>(), service()).prop_map(|(request_id, service)| Message::Connect { request_id, service }),
            session().prop_map(|session| Message::CloseSession { session }),
            any::<u64>().prop_map(|nonce| Message::Ping { nonce }),
            (any::<u16>(), role(), text(MAX_IDENTITY_LEN), services())
                .prop_map(|(version, role, identity, services)| Message::Welcome { version, role, identity, services }),
            (any::<u32>(), socket_addr()).prop_map(|(seq, addr)| Message::ObservedAddress { seq, addr }),
            services().prop_map(|services| Message::Registered { services }),
            (session(), any::<u32>(), service(), role(), text(MAX_IDENTITY_LEN)).prop_map(
                |(session, request_id, service, peer_role, peer_identity)| Message::SessionOffer {
                    session,
                    request_id,
                    service,
                    peer_role,
                    peer_identity
                }
            ),
            (session(), error_code()).prop_map(|(session, reason)| Message::SessionClosed { session, reason }),
            (any::<u32>(), error_code(), text(MAX_TEXT_LEN)).prop_map(|(request_id, code, message)| Message::Error {
                request_id,
                code,
                message
            }),
            any::<u64>().prop_map(|nonce| Message::Pong { nonce }),
            (session(), candidates()).prop_map(|(session, candidates)| Message::Candidates { session, candidates }),
            (session(), any::<bool>()).prop_map(|(session, direct)| Message::PathStatus { session, direct }),
            socket_addr().prop_map(|addr| Message::DirectAddress { addr }),
            (any::<u32>(), service(), text(MAX_IDENTITY_LEN), session())
                .prop_map(|(request_id, service, connector, tunnel)| Message::Resume { request_id, service, connector, tunnel }),
            (session(), session()).prop_map(|(session, tunnel)| Message::SessionResumes { session, tunnel }),
            any::<u32>().prop_map(|reconnect_within_ms| Message::GoingAway { reconnect_within_ms }),
            (session(), any::<[u8; PUNCH_TOKEN_LEN]>(), candidates())
                .prop_map(|(session, token, candidates)| Message::PeerCandidates { session, token, candidates }),
        ]
    }

    fn candidates() -> impl Strategy<Value = Vec<Candidate>> {
        let one = || {
            (select(crate::candidate::CandidateKind::ALL.to_vec()), any::<u32>(), socket_addr())
                .prop_map(|(kind, priority, addr)| Candidate { kind, priority, addr })
        };
        prop_oneof![4 => vec(one(), 0..4), 1 => vec(one(), crate::candidate::MAX_CANDIDATES)]
    }

    fn encoded(msg: &Message) -> Vec<u8> {
        let mut out = Vec::new();
        msg.encode(&mut out).expect("valid message encodes");
        out
    }

    /// Pushes `bytes` into a fresh reader in chunks of the given sizes (cycled) and drains
    /// it after every push. Stops at the first framing error.
    fn feed(
        bytes: &[u8],
        chunks: &[usize],
    ) -> (Vec<Result<Message, DecodeError>>, Option<FramingError>, MessageReader) {
        let mut reader = MessageReader::new();
        let mut out = Vec::new();
        let mut pos = 0;
        for &size in chunks.iter().cycle() {
            if pos == bytes.len() {
                break;
            }
            let end = (pos + size.max(1)).min(bytes.len());
            reader.push(&bytes[pos..end]);
            pos = end;
            while let Some(next) = reader.next_message() {
                match next {
                    Ok(msg) => out.push(msg),
                    Err(e) => return (out, Some(e), reader),
                }
            }
        }
        (out, None, reader)
    }

    /// If `body` decodes, the value must survive an encode/decode round trip.
    fn check_reencode(body: &[u8]) -> Result<(), TestCaseError> {
        if let Ok(msg) = Message::decode(body) {
            let mut out = Vec::new();
            prop_assert_eq!(msg.encode(&mut out), Ok(()), "a decoded message must re-encode: {:?}", msg);
            prop_assert_eq!(u16::from_be_bytes([out[0], out[1]]) as usize, out.len() - 2);
            prop_assert_eq!(Message::decode(&out[2..]), Ok(msg));
        }
        Ok(())
    }

    fn bad_service_name() -> impl Strategy<Value = String> {
        prop_oneof![
            Just(String::new()),
            "[a-z0-9._-]{64,80}",
            (
                "[a-z0-9._-]{0,10}",
                prop_oneof![
                    3 => (0u8..0x80).prop_map(char::from),
                    1 => any::<char>(),
                ]
                .prop_filter("invalid char", |c| !valid_service_name(&c.to_string())),
                "[a-z0-9._-]{0,10}"
            )
                .prop_map(|(a, b, c)| format!("{a}{b}{c}")),
        ]
    }

    /// Text over `max` bytes (also multi-byte text whose char count is within the limit).
    fn long_text(max: usize) -> impl Strategy<Value = String> {
        prop_oneof![
            (max + 1..max + 64).prop_map(|n| "y".repeat(n)),
            (max / 2 + 1..max / 2 + 32).prop_map(|n| "é".repeat(n)),
        ]
    }

    fn services_with_bad_name() -> impl Strategy<Value = (Vec<String>, String)> {
        (vec(service(), 0..8), bad_service_name(), any::<Index>()).prop_map(|(mut list, bad, at)| {
            list.insert(at.index(list.len() + 1), bad.clone());
            (list, bad)
        })
    }

    /// A message with exactly one field the spec forbids, and the error encode must report.
    fn invalid_message() -> impl Strategy<Value = (Message, EncodeError)> {
        let too_many = || vec(service(), MAX_SERVICES + 1..MAX_SERVICES + 8);
        prop_oneof![
            (any::<u16>(), long_text(MAX_TEXT_LEN)).prop_map(|(version, software)| (
                Message::Hello { version, software },
                EncodeError::TooLong("software")
            )),
            services_with_bad_name()
                .prop_map(|(services, bad)| (Message::Register { services }, EncodeError::BadServiceName(bad))),
            too_many().prop_map(|services| (Message::Register { services }, EncodeError::TooLong("service list"))),
            services_with_bad_name()
                .prop_map(|(services, bad)| (Message::Registered { services }, EncodeError::BadServiceName(bad))),
            too_many().prop_map(|services| (Message::Registered { services }, EncodeError::TooLong("service list"))),
            (any::<u32>(), bad_service_name()).prop_map(|(request_id, bad)| (
                Message::Connect { request_id, service: bad.clone() },
                EncodeError::BadServiceName(bad)
            )),
            (role(), long_text(MAX_IDENTITY_LEN), services()).prop_map(|(role, identity, services)| (
                Message::Welcome { version: 1, role, identity, services },
                EncodeError::TooLong("identity")
            )),
            (role(), text(MAX_IDENTITY_LEN), services_with_bad_name()).prop_map(|(role, identity, (services, bad))| (
                Message::Welcome { version: 1, role, identity, services },
                EncodeError::BadServiceName(bad)
            )),
            (role(), text(MAX_IDENTITY_LEN), too_many()).prop_map(|(role, identity, services)| (
                Message::Welcome { version: 1, role, identity, services },
                EncodeError::TooLong("service list")
            )),
            (session(), bad_service_name(), role(), text(MAX_IDENTITY_LEN)).prop_map(
                |(session, bad, peer_role, peer_identity)| (
                    Message::SessionOffer { session, request_id: 7, service: bad.clone(), peer_role, peer_identity },
                    EncodeError::BadServiceName(bad)
                )
            ),
            (session(), service(), role(), long_text(MAX_IDENTITY_LEN)).prop_map(
                |(session, service, peer_role, peer_identity)| (
                    Message::SessionOffer { session, request_id: 7, service, peer_role, peer_identity },
                    EncodeError::TooLong("peer identity")
                )
            ),
            (any::<u32>(), error_code(), long_text(MAX_TEXT_LEN)).prop_map(|(request_id, code, message)| (
                Message::Error { request_id, code, message },
                EncodeError::TooLong("error message")
            )),
        ]
    }

    proptest! {
        #[test]
        fn round_trip_through_reader(
            msgs in vec(message(), 1..6),
            chunks in prop_oneof![Just(vec![1usize]), vec(1usize..=300, 1..16), Just(vec![usize::MAX])],
        ) {
            let mut bytes = Vec::new();
            for msg in &msgs {
                let start = bytes.len();
                prop_assert_eq!(msg.encode(&mut bytes), Ok(()));
                let frame = &bytes[start..];
                prop_assert_eq!(u16::from_be_bytes([frame[0], frame[1]]) as usize, frame.len() - 2);
                prop_assert!(frame.len() - 2 <= MAX_MESSAGE_LEN);
                prop_assert_eq!(frame[2], msg.kind());
                prop_assert_eq!(&Message::decode(&frame[2..]), &Ok(msg.clone()));
            }
            let (got, framing, mut reader) = feed(&bytes, &chunks);
            prop_assert_eq!(framing, None);
            let want: Vec<_> = msgs.into_iter().map(Ok).collect();
            prop_assert_eq!(got, want);
            prop_assert_eq!(reader.pending(), 0);
            prop_assert!(reader.next_message().is_none());
        }

        #[test]
        fn reader_yields_each_frame_in_order(
            frames in vec(prop_oneof![
                message().prop_map(|m| encoded(&m)[2..].to_vec()),
                vec(any::<u8>(), 0..48),
                (select(KNOWN_TYPES.to_vec()), vec(any::<u8>(), 0..48)).prop_map(|(t, mut v)| { v.insert(0, t); v }),
            ], 1..12),
            chunks in vec(1usize..=40, 1..8),
        ) {
            // Well-framed bodies, valid or not: the reader reports exactly what decode says
            // about each one, in order, and never loses framing.
            let mut bytes = Vec::new();
            for body in &frames {
                bytes.extend_from_slice(&(body.len() as u16).to_be_bytes());
                bytes.extend_from_slice(body);
            }
            let (got, framing, reader) = feed(&bytes, &chunks);
            prop_assert_eq!(framing, None);
            prop_assert_eq!(got, frames.iter().map(|b| Message::decode(b)).collect::<Vec<_>>());
            prop_assert_eq!(reader.pending(), 0);
        }

        #[test]
        fn every_strict_prefix_of_a_body_is_rejected(msg in message()) {
            let frame = encoded(&msg);
            let body = &frame[2..];
            for k in 0..body.len() {
                prop_assert!(Message::decode(&body[..k]).is_err(), "prefix {} of {:?} decoded", k, msg);
            }
        }

        #[test]
        fn trailing_bytes_are_rejected(msg in message(), extra in vec(any::<u8>(), 1..16), next in message()) {
            let mut body = encoded(&msg)[2..].to_vec();
            body.extend_from_slice(&extra);
            let err = DecodeError::Malformed { kind: msg.kind(), err: WireError::Invalid("trailing bytes") };
            prop_assert_eq!(Message::decode(&body), Err(err.clone()));
            // Through the reader: the bad message is reported and the stream stays usable.
            let mut stream = (body.len() as u16).to_be_bytes().to_vec();
            stream.extend_from_slice(&body);
            stream.extend_from_slice(&encoded(&next));
            let (got, framing, _) = feed(&stream, &[usize::MAX]);
            prop_assert_eq!(framing, None);
            prop_assert_eq!(got, vec![Err(err), Ok(next)]);
        }

        #[test]
        fn decode_never_panics(
            bytes in prop_oneof![
                vec(any::<u8>(), 0..256),
                (select(KNOWN_TYPES.to_vec()), vec(any::<u8>(), 0..256)).prop_map(|(t, mut v)| { v.insert(0, t); v }),
            ],
        ) {
            check_reencode(&bytes)?;
        }

        #[test]
        fn mutated_messages_never_panic_and_reencode(
            msg in message(),
            flips in vec((any::<Index>(), any::<u8>()), 1..4),
            cut in any::<Index>(),
            truncate in any::<bool>(),
        ) {
            let mut body = encoded(&msg)[2..].to_vec();
            for (at, byte) in flips {
                let i = at.index(body.len());
                body[i] = byte;
            }
            if truncate {
                body.truncate(cut.index(body.len() + 1));
            }
            check_reencode(&body)?;
        }

        #[test]
        fn observed_address_wire_forms_decode_canonically(
            seq in any::<u32>(),
            v4 in any::<[u8; 4]>(),
            v6 in any::<[u8; 16]>(),
            port in any::<u16>(),
            mapped in any::<bool>(),
        ) {
            let mut body = vec![TYPE_OBSERVED_ADDRESS];
            body.extend_from_slice(&seq.to_be_bytes());
            body.push(addr::FAMILY_V6);
            let ip = if mapped { Ipv4Addr::from(v4).to_ipv6_mapped() } else { Ipv6Addr::from(v6) };
            body.extend_from_slice(&ip.octets());
            body.extend_from_slice(&port.to_be_bytes());
            let want = addr::canonical(SocketAddr::new(IpAddr::V6(ip), port));
            prop_assert_eq!(Message::decode(&body), Ok(Message::ObservedAddress { seq, addr: want }));
            check_reencode(&body)?;
        }

        #[test]
        fn reader_never_panics_on_arbitrary_bytes(bytes in vec(any::<u8>(), 0..2048), chunks in vec(1usize..=64, 1..8)) {
            let (got, framing, mut reader) = feed(&bytes, &chunks);
            // Fed whole, the same bytes give the same messages.
            let (whole, whole_framing, _) = feed(&bytes, &[usize::MAX]);
            prop_assert_eq!(&got, &whole);
            prop_assert_eq!(&framing, &whole_framing);
            if framing.is_none() {
                prop_assert!(reader.next_message().is_none());
                // What is left is an incomplete message.
                let rest = &bytes[bytes.len() - reader.pending()..];
                if rest.len() >= 2 {
                    prop_assert!(rest.len() < 2 + u16::from_be_bytes([rest[0], rest[1]]) as usize);
                }
            }
        }

        #[test]
        fn oversized_length_prefix_is_a_framing_error(
            len in MAX_MESSAGE_LEN as u16 + 1..=u16::MAX,
            before in vec(message(), 0..3),
            tail in vec(any::<u8>(), 0..64),
            chunks in vec(1usize..=16, 1..4),
        ) {
            let mut bytes = Vec::new();
            for msg in &before {
                msg.encode(&mut bytes).unwrap();
            }
            bytes.extend_from_slice(&len.to_be_bytes());
            bytes.extend_from_slice(&tail);
            let (got, framing, _) = feed(&bytes, &chunks);
            prop_assert_eq!(got, before.into_iter().map(Ok).collect::<Vec<_>>());
            prop_assert_eq!(framing, Some(FramingError(len as usize)));
        }

        #[test]
        fn encode_rejects_invalid_fields_and_writes_nothing(
            (msg, want) in invalid_message(),
            prefix in vec(any::<u8>(), 0..8),
        ) {
            let mut out = prefix.clone();
            prop_assert_eq!(msg.encode(&mut out), Err(want));
            prop_assert_eq!(out, prefix);
        }

        #[test]
        fn error_code_round_trips(c in error_code()) {
            prop_assert_eq!(ErrorCode::from_u16(c.to_u16()), c);
        }
    }

    #[test]
    fn service_name_alphabet_and_length() {
        for b in 0u8..=0x7f {
            let c = char::from(b);
            let want = c.is_ascii_lowercase() || c.is_ascii_digit() || "._-".contains(c);
            assert_eq!(valid_service_name(&format!("a{c}b")), want, "{c:?}");
        }
        for bad in ["", "é", "A", "web app", "web/app", "ß"] {
            assert!(!valid_service_name(bad), "{bad:?}");
        }
        assert!(valid_service_name(&"a".repeat(MAX_SERVICE_LEN)));
        assert!(!valid_service_name(&"a".repeat(MAX_SERVICE_LEN + 1)));
    }

    #[test]
    fn error_code_wire_values_are_fixed() {
        // The codes are part of the protocol: changing one breaks deployed peers.
        let wire: Vec<(u16, &str)> = ErrorCode::ALL.iter().map(|c| (c.to_u16(), c.name())).collect();
        assert_eq!(
            wire,
            [
                (1, "malformed"),
                (2, "unsupported_version"),
                (3, "unknown_service"),
                (4, "not_authorized"),
                (5, "no_connector_available"),
                (6, "wrong_role"),
                (7, "protocol_violation"),
                (8, "rate_limited"),
                (9, "session_limit"),
                (10, "idle_timeout"),
                (11, "peer_gone"),
                (12, "unsupported_message"),
                (13, "internal"),
            ]
        );
        assert_eq!(ErrorCode::Other(500).to_string(), "error code 500");
        assert_eq!(ErrorCode::NotAuthorized.to_string(), "not_authorized");
    }

    #[test]
    fn error_codes_are_distinct_and_total() {
        for (i, a) in ErrorCode::ALL.iter().enumerate() {
            assert!(!matches!(a, ErrorCode::Other(_)));
            assert_eq!(ErrorCode::from_u16(a.to_u16()), *a);
            for b in &ErrorCode::ALL[i + 1..] {
                assert_ne!(a.to_u16(), b.to_u16());
                assert_ne!(a.name(), b.name());
            }
        }
        for v in 0..=u16::MAX {
            let c = ErrorCode::from_u16(v);
            assert_eq!(c.to_u16(), v);
            assert_eq!(matches!(c, ErrorCode::Other(_)), !ErrorCode::ALL.iter().any(|k| k.to_u16() == v));
        }
    }

    #[test]
    fn max_length_prefix_is_not_a_framing_error() {
        let mut reader = MessageReader::new();
        reader.push(&(MAX_MESSAGE_LEN as u16).to_be_bytes());
        reader.push(&[0xee; MAX_MESSAGE_LEN - 1]);
        assert!(reader.next_message().is_none());
        reader.push(&[0xee]);
        assert_eq!(reader.next_message(), Some(Ok(Err(DecodeError::UnknownType(0xee)))));
        assert_eq!(reader.pending(), 0);
        reader.push(&(MAX_MESSAGE_LEN as u16 + 1).to_be_bytes());
        assert_eq!(reader.next_message(), Some(Err(FramingError(MAX_MESSAGE_LEN + 1))));
    }

    #[test]
    fn mapped_ipv6_is_sent_as_ipv4() {
        let v4 = Ipv4Addr::new(192, 0, 2, 7);
        let msg = Message::ObservedAddress { seq: 3, addr: SocketAddr::new(IpAddr::V6(v4.to_ipv6_mapped()), 4433) };
        let frame = encoded(&msg);
        assert_eq!(frame[2 + 1 + 4], addr::FAMILY_V4);
        assert_eq!(
            Message::decode(&frame[2..]),
            Ok(Message::ObservedAddress { seq: 3, addr: SocketAddr::new(IpAddr::V4(v4), 4433) })
        );
    }

    #[test]
    fn direct_address_is_the_spec_example() {
        let msg = Message::DirectAddress { addr: "198.51.100.2:4600".parse().unwrap() };
        assert_eq!(encoded(&msg), [0x00, 0x08, 0x08, 0x04, 198, 51, 100, 2, 0x11, 0xf8]);
    }

    #[test]
    fn reader_compacts_and_keeps_order() {
        let mut bytes = Vec::new();
        for nonce in 0..2000u64 {
            Message::Ping { nonce }.encode(&mut bytes).unwrap();
        }
        let mut reader = MessageReader::new();
        let mut next = 0u64;
        for chunk in bytes.chunks(997) {
            reader.push(chunk);
            while let Some(m) = reader.next_message() {
                assert_eq!(m, Ok(Ok(Message::Ping { nonce: next })));
                next += 1;
            }
            assert!(reader.buf.len() <= 2 * 4096 + 2 * 997, "buffer grows without bound: {}", reader.buf.len());
        }
        assert_eq!(next, 2000);
        assert_eq!(reader.pending(), 0);
    }
}
