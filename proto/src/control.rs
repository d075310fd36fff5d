//! Control messages, carried on the client-initiated bidirectional stream 0 of the control
//! connection. Each message is `[u16 length][u8 type][body]`, the length covering type and
//! body. Strings are `[u16 length][UTF-8]`; lists are `[u16 count][items]`.

use std::net::SocketAddr;

use thiserror::Error;

use crate::addr;
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
}

pub const TYPE_HELLO: u8 = 0x01;
pub const TYPE_REGISTER: u8 = 0x02;
pub const TYPE_CONNECT: u8 = 0x03;
pub const TYPE_CLOSE_SESSION: u8 = 0x04;
pub const TYPE_PING: u8 = 0x05;
pub const TYPE_WELCOME: u8 = 0x81;
pub const TYPE_OBSERVED_ADDRESS: u8 = 0x82;
pub const TYPE_REGISTERED: u8 = 0x83;
pub const TYPE_SESSION_OFFER: u8 = 0x84;
pub const TYPE_SESSION_CLOSED: u8 = 0x85;
pub const TYPE_ERROR: u8 = 0x86;
pub const TYPE_PONG: u8 = 0x87;

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
