//! The control connection to the relay, over one UDP socket that also carries relay frames
//! (so the address QAD reports is the mapping the data path uses).
//!
//! The connection is driven inline: every call that waits (`next_message`, `next_frame`)
//! moves datagrams, timers and keep-alives until what it waits for arrives. Relay frames
//! that arrive meanwhile are queued for `next_frame`, control messages for `next_message`.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use thiserror::Error;
use tokio::net::UdpSocket;
use ztna_proto::control::{MessageReader, Role};
use ztna_proto::frame;
use ztna_proto::identity::{Identity, Kind};
use ztna_proto::{CONTROL_VERSION, ErrorCode, Message};

use crate::keepalive::KeepAlive;
use crate::tls::ClientTls;

pub const CONTROL_STREAM: u64 = 0;
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Keep-alive well inside the idle timeout, so NAT mappings and the connection stay up.
const KEEPALIVE: Duration = Duration::from_secs(10);
const MAX_DATAGRAM: usize = 2048;
const MAX_QUEUED_FRAMES: usize = 4096;

#[derive(Debug, Error)]
pub enum ClientError {
    #[error("relay {0} did not answer within {1:?} (is it running, and is UDP to it allowed?)")]
    Timeout(SocketAddr, Duration),
    #[error("TLS handshake with the relay failed: {0}")]
    Handshake(String),
    #[error("the relay closed the connection: {reason} (code {code:#x})")]
    ClosedByRelay { code: u64, reason: String },
    #[error("the relay's certificate is not a relay identity: {0}")]
    NotARelay(String),
    #[error("the relay refused: {message} ({code})")]
    Refused { code: ErrorCode, message: String },
    #[error("unexpected message from the relay: {0:?}")]
    Unexpected(Box<Message>),
    #[error("connection closed")]
    Closed,
    #[error("the relay reset the connection: it no longer knows it (restarted?)")]
    Reset,
    #[error(transparent)]
    Setup(#[from] anyhow::Error),
    #[error("the relay sent an unreadable control stream: {0}")]
    Protocol(String),
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("QUIC: {0}")]
    Quic(#[from] quiche::Error),
}

impl ClientError {
    /// A stable short name for counting failures by kind.
    pub fn kind(&self) -> &'static str {
        match self {
            ClientError::Timeout(..) => "timeout",
            ClientError::Handshake(_) => "tls_handshake",
            ClientError::ClosedByRelay { .. } => "closed_by_relay",
            ClientError::NotARelay(_) => "not_a_relay",
            ClientError::Refused { .. } => "refused",
            ClientError::Unexpected(_) => "unexpected_message",
            ClientError::Closed => "closed",
            ClientError::Reset => "reset",
            ClientError::Setup(_) => "setup",
            ClientError::Protocol(_) => "protocol",
            ClientError::Io(_) => "io",
            ClientError::Quic(_) => "quic",
        }
    }
}

/// What the relay said about us when we connected.
#[derive(Debug, Clone)]
pub struct RelayInfo {
    pub relay_identity: Identity,
    pub identity: String,
    pub role: Role,
    /// Services the policy lets us reach (agent) or serve (connector).
    pub services: Vec<String>,
    /// Our address as the relay sees it (QAD).
    pub observed: SocketAddr,
    pub handshake_time: Duration,
}

/// The source address the kernel would use towards `dest` (a connected UDP socket sends
/// nothing), so the client's socket has a concrete local address to compare with QAD.
pub fn source_ip_for(dest: SocketAddr) -> std::io::Result<std::net::IpAddr> {
    let any: SocketAddr = if dest.is_ipv4() { ([0, 0, 0, 0], 0).into() } else { (std::net::Ipv6Addr::UNSPECIFIED, 0).into() };
    let probe = std::net::UdpSocket::bind(any)?;
    probe.connect(dest)?;
    Ok(probe.local_addr()?.ip())
}

/// The control connection's protocol state, without I/O: the quiche connection, the
/// control stream's reassembly and outbox, received messages and the latest QAD report.
/// [`ControlClient`] drives it inline; the tunnel engine drives it from its event loop.
/// Socket buffers a client asks for: one socket carries the control connection and every
/// tunnel, so bursts of a fast flow must not overflow it.
pub const CLIENT_SOCKET_BUFFER: usize = 4 << 20;

/// Binds the client's one UDP socket, with large buffers.
pub fn bind_client_socket(addr: SocketAddr) -> std::io::Result<UdpSocket> {
    let domain = if addr.is_ipv4() { socket2::Domain::IPV4 } else { socket2::Domain::IPV6 };
    let sock = socket2::Socket::new(domain, socket2::Type::DGRAM, Some(socket2::Protocol::UDP))?;
    ztna_sockopt::grow_buffers(&sock, CLIENT_SOCKET_BUFFER);
    sock.set_nonblocking(true)?;
    if addr.is_ipv6() && addr.ip().is_unspecified() {
        // Dual stack: one socket for the relay and for direct paths of either family.
        sock.set_only_v6(false)?;
    }
    sock.bind(&addr.into())?;
    UdpSocket::from_std(sock.into())
}

/// The engine's socket: dual-stack on `[::]` so direct paths can use IPv6 host candidates
/// whichever family the relay has; bound to the source address towards the relay where
/// the host has no IPv6.
pub fn bind_engine_socket(relay: SocketAddr) -> std::io::Result<UdpSocket> {
    bind_client_socket((std::net::Ipv6Addr::UNSPECIFIED, 0).into())
        .or_else(|_| bind_client_socket(SocketAddr::new(source_ip_for(relay)?, 0)))
}

pub struct ControlCore {
    conn: quiche::Connection,
    relay: SocketAddr,
    local: SocketAddr,
    reader: MessageReader,
    outbox: Vec<u8>,
    messages: VecDeque<Message>,
    keepalive: KeepAlive,
    /// Latest QAD report.
    pub observed: Option<SocketAddr>,
    protocol_error: Option<String>,
    /// While the connection is being set up.
    setup: Option<Setup>,
}

/// A control connection being set up: QUIC and TLS, the relay's identity, Hello and Welcome,
/// the first QAD report. Without I/O: whoever owns the socket feeds the core datagrams and
/// time and asks [`ControlCore::poll_setup`], so an engine keeps serving its tunnels (and
/// their direct paths) on the same socket while it reconnects.
struct Setup {
    started: Instant,
    deadline: Instant,
    timeout: Duration,
    software: String,
    hello_sent: bool,
    relay_identity: Option<Identity>,
    handshake_time: Duration,
    welcome: Option<(String, Role, Vec<String>)>,
}

impl ControlCore {
    fn new(conn: quiche::Connection, relay: SocketAddr, local: SocketAddr) -> Self {
        ControlCore {
            conn,
            relay,
            local,
            reader: MessageReader::new(),
            outbox: Vec::new(),
            messages: VecDeque::new(),
            keepalive: KeepAlive::new(KEEPALIVE),
            observed: None,
            protocol_error: None,
            setup: None,
        }
    }

    /// Starts a control connection to `relay` from a socket bound to `local`; the setup
    /// fails if it is not over within `timeout`.
    pub fn connect(
        local: SocketAddr,
        relay: SocketAddr,
        server_name: Option<&str>,
        tls: &ClientTls,
        software: &str,
        timeout: Duration,
    ) -> Result<ControlCore, ClientError> {
        let mut config = tls.control_config(IDLE_TIMEOUT.as_millis() as u64)?;
        let scid: [u8; 16] = rand::random();
        let conn = quiche::connect(server_name, &quiche::ConnectionId::from_ref(&scid), local, relay, &mut config)?;
        let mut core = ControlCore::new(conn, relay, local);
        let started = Instant::now();
        core.setup = Some(Setup {
            started,
            deadline: started + timeout,
            timeout,
            software: software.to_owned(),
            hello_sent: false,
            relay_identity: None,
            handshake_time: Duration::ZERO,
            welcome: None,
        });
        Ok(core)
    }

    /// Whether [`poll_setup`](Self::poll_setup) has something to look at (a driver waits
    /// for this, for the next datagram, or for its timer).
    pub fn setup_can_move(&self) -> bool {
        let Some(s) = &self.setup else { return false };
        self.conn.is_closed()
            || (self.conn.is_established()
                && (!s.hello_sent || if s.welcome.is_none() { !self.messages.is_empty() } else { self.observed.is_some() }))
    }

    /// Moves the setup on: `Some` once it is over, with what the relay said or why it failed.
    pub fn poll_setup(&mut self, now: Instant) -> Option<Result<RelayInfo, ClientError>> {
        let mut s = self.setup.take()?;
        let outcome = self.advance_setup(&mut s, now);
        if outcome.is_none() {
            self.setup = Some(s);
        }
        outcome
    }

    fn advance_setup(&mut self, s: &mut Setup, now: Instant) -> Option<Result<RelayInfo, ClientError>> {
        if self.conn.is_closed() {
            return Some(Err(self.closed_error()));
        }
        if now >= s.deadline {
            return Some(Err(ClientError::Timeout(self.relay, s.timeout)));
        }
        if !self.conn.is_established() {
            return None;
        }
        if !s.hello_sent {
            let id = match self.conn.peer_cert().map(Identity::from_certificate_der).transpose() {
                Ok(Some(id)) => id,
                Ok(None) => return Some(Err(ClientError::NotARelay("no certificate".into()))),
                Err(e) => return Some(Err(ClientError::NotARelay(e.to_string()))),
            };
            if id.kind != Kind::Relay {
                return Some(Err(ClientError::NotARelay(id.to_string())));
            }
            s.relay_identity = Some(id);
            s.handshake_time = now.saturating_duration_since(s.started);
            if let Err(e) = self.send(&Message::Hello { version: CONTROL_VERSION, software: s.software.clone() }) {
                return Some(Err(e));
            }
            s.hello_sent = true;
        }
        if s.welcome.is_none() {
            match self.messages.pop_front()? {
                Message::Welcome { identity, role, services, .. } => s.welcome = Some((identity, role, services)),
                Message::Error { code, message, .. } => return Some(Err(ClientError::Refused { code, message })),
                other => return Some(Err(ClientError::Unexpected(Box::new(other)))),
            }
        }
        // The first QAD report follows Welcome.
        let observed = self.observed?;
        let (identity, role, services) = s.welcome.take()?;
        let relay_identity = s.relay_identity.take()?;
        Some(Ok(RelayInfo { relay_identity, identity, role, services, observed, handshake_time: s.handshake_time }))
    }

    pub fn relay(&self) -> SocketAddr {
        self.relay
    }

    pub fn is_established(&self) -> bool {
        self.conn.is_established()
    }

    pub fn is_closed(&self) -> bool {
        self.conn.is_closed()
    }

    pub fn rtt(&self) -> Option<Duration> {
        self.conn.path_stats().next().map(|p| p.rtt)
    }

    pub fn relay_worker(&self) -> u8 {
        self.conn.destination_id().as_ref().first().copied().unwrap_or(0)
    }

    /// Queues a control message on the stream.
    pub fn send(&mut self, msg: &Message) -> Result<(), ClientError> {
        msg.encode(&mut self.outbox).map_err(|e| ClientError::Setup(anyhow::anyhow!("{e}")))?;
        self.flush_outbox();
        Ok(())
    }

    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.outbox.extend_from_slice(bytes);
        self.flush_outbox();
    }

    pub fn pop_message(&mut self) -> Option<Message> {
        self.messages.pop_front()
    }

    pub fn has_messages(&self) -> bool {
        !self.messages.is_empty()
    }

    /// Closes with application code 0 and `reason` for the relay's log.
    pub fn close(&mut self, reason: &str) {
        let _ = self.conn.close(true, ztna_proto::control::close_code::SHUTDOWN, reason.as_bytes());
    }

    /// The next datagram to send, if any.
    pub fn poll_transmit(&mut self, out: &mut [u8]) -> Result<Option<(usize, SocketAddr)>, ClientError> {
        self.flush_outbox();
        match self.conn.send(out) {
            Ok((n, info)) => {
                self.keepalive.sent(Instant::now());
                Ok(Some((n, info.to)))
            }
            Err(quiche::Error::Done) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// A QUIC datagram from the relay; true if QUIC accepted it.
    pub fn on_datagram(&mut self, buf: &mut [u8], from: SocketAddr) -> bool {
        let info = quiche::RecvInfo { from, to: self.local };
        // A bad packet is quiche's to ignore; the connection carries on.
        let accepted = self.conn.recv(buf, info).is_ok();
        self.read_stream();
        accepted
    }

    /// How long the line may be quiet before a keep-alive.
    pub fn set_keepalive(&mut self, interval: Duration) {
        self.keepalive.set_interval(interval);
    }

    /// Queues an ack-eliciting packet: the relay's acknowledgement shows it is alive.
    pub fn ping(&mut self) {
        let _ = self.conn.send_ack_eliciting();
    }

    /// How long until [`on_timeout`](Self::on_timeout) has work: a QUIC timer or the keep-alive.
    pub fn timeout(&self, now: Instant) -> Option<Duration> {
        let quic = self.keepalive.timeout(&self.conn, now);
        match (&self.setup, quic) {
            (Some(s), Some(t)) => Some(t.min(s.deadline.saturating_duration_since(now))),
            (Some(s), None) => Some(s.deadline.saturating_duration_since(now)),
            (None, t) => t,
        }
    }

    /// Runs due QUIC timers and sends a keep-alive when the line has been quiet.
    pub fn on_timeout(&mut self, now: Instant) {
        self.keepalive.on_timeout(&mut self.conn, now);
    }

    fn flush_outbox(&mut self) {
        while !self.outbox.is_empty() {
            match self.conn.stream_send(CONTROL_STREAM, &self.outbox, false) {
                Ok(n) if n > 0 => {
                    self.outbox.drain(..n);
                }
                _ => break,
            }
        }
    }

    fn read_stream(&mut self) {
        let mut buf = [0u8; 4096];
        while let Ok((n, _fin)) = self.conn.stream_recv(CONTROL_STREAM, &mut buf) {
            self.reader.push(&buf[..n]);
        }
        while let Some(item) = self.reader.next_message() {
            let msg = match item {
                Ok(Ok(msg)) => msg,
                Ok(Err(e)) => {
                    // A message this client cannot read (a newer relay?): skip it, keep going.
                    tracing::warn!(error = %e, "ignoring an unreadable control message from the relay");
                    continue;
                }
                Err(e) => {
                    let _ = self.conn.close(true, ztna_proto::control::close_code::PROTOCOL_VIOLATION, b"control stream framing lost");
                    self.protocol_error = Some(e.to_string());
                    return;
                }
            };
            if let Message::ObservedAddress { addr, .. } = msg {
                self.observed = Some(addr);
            }
            self.messages.push_back(msg);
        }
    }

    pub fn closed_error(&self) -> ClientError {
        if let Some(e) = &self.protocol_error {
            return ClientError::Protocol(e.clone());
        }
        if let Some(e) = self.conn.peer_error() {
            let reason = String::from_utf8_lossy(&e.reason).into_owned();
            if !e.is_app && (0x100..0x200).contains(&e.error_code) {
                return ClientError::Handshake(format!("the relay sent TLS alert {} ({reason})", e.error_code - 0x100));
            }
            return ClientError::ClosedByRelay { code: e.error_code, reason };
        }
        if let Some(e) = self.conn.local_error()
            && !e.is_app
            && (0x100..0x200).contains(&e.error_code)
        {
            return ClientError::Handshake(format!(
                "we rejected the relay's certificate (TLS alert {})",
                e.error_code - 0x100
            ));
        }
        if self.conn.is_timed_out() {
            return ClientError::Timeout(self.relay, IDLE_TIMEOUT);
        }
        // Closed, with no error on either side and no timeout: QUIC took a stateless reset.
        if self.conn.is_closed() && self.conn.local_error().is_none() {
            return ClientError::Reset;
        }
        ClientError::Closed
    }

}

pub struct ControlClient {
    socket: UdpSocket,
    core: ControlCore,
    frames: VecDeque<(Vec<u8>, SocketAddr)>,
    pub info: Option<RelayInfo>,
    pub frames_dropped: u64,
}

impl ControlClient {
    /// Connects, authenticates both ways, sends Hello and waits for Welcome and the first
    /// QAD report. `server_name` enables hostname verification when the relay is named.
    pub async fn connect(
        relay: SocketAddr,
        server_name: Option<&str>,
        tls: &ClientTls,
        software: &str,
        timeout: Duration,
    ) -> Result<ControlClient, ClientError> {
        let socket = bind_client_socket(SocketAddr::new(source_ip_for(relay)?, 0))?;
        Self::connect_on(socket, relay, server_name, tls, software, timeout).await
    }

    /// Like [`connect`](Self::connect), over a socket the caller bound.
    pub async fn connect_on(
        socket: UdpSocket,
        relay: SocketAddr,
        server_name: Option<&str>,
        tls: &ClientTls,
        software: &str,
        timeout: Duration,
    ) -> Result<ControlClient, ClientError> {
        let deadline = Instant::now() + timeout;
        let core = ControlCore::connect(socket.local_addr()?, relay, server_name, tls, software, timeout)?;
        let mut client = ControlClient { socket, core, frames: VecDeque::new(), info: None, frames_dropped: 0 };
        loop {
            if let Some(outcome) = client.core.poll_setup(Instant::now()) {
                client.info = Some(outcome?);
                return Ok(client);
            }
            client.drive_until(deadline, |c| c.core.setup_can_move()).await?;
        }
    }

    /// Hands the socket, the protocol state and any frames that arrived early to a caller
    /// that runs its own event loop.
    pub fn into_parts(self) -> (UdpSocket, ControlCore, VecDeque<(Vec<u8>, SocketAddr)>) {
        (self.socket, self.core, self.frames)
    }

    pub fn relay(&self) -> SocketAddr {
        self.core.relay
    }

    /// The shared socket (control QUIC and relay frames), for callers that move frames
    /// themselves.
    pub fn socket(&self) -> &UdpSocket {
        &self.socket
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.core.local
    }

    /// Latest QAD report.
    pub fn observed(&self) -> Option<SocketAddr> {
        self.core.observed
    }

    /// The relay worker that owns this connection: byte 0 of the relay-chosen connection
    /// id we address (the id layout's worker byte).
    pub fn relay_worker(&self) -> u8 {
        self.core.relay_worker()
    }

    /// Smoothed RTT of the control connection's path.
    pub fn rtt(&self) -> Option<Duration> {
        self.core.rtt()
    }

    pub fn send(&mut self, msg: &Message) -> Result<(), ClientError> {
        self.core.send(msg)?;
        self.push_now();
        Ok(())
    }

    /// Sends raw bytes on the control stream (tests use this to send malformed messages).
    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.core.send_raw(bytes);
        self.push_now();
    }

    /// A QUIC datagram that a caller moving frames itself took from [`socket`](Self::socket):
    /// QUIC takes it and answers at once (the relay's liveness pings must be acknowledged,
    /// or it drops a connector with sessions within seconds).
    pub fn on_control_datagram(&mut self, buf: &mut [u8], from: SocketAddr) {
        self.core.on_datagram(buf, from);
        self.push_now();
    }

    /// Sends one datagram (a relay frame) to the relay from the control socket.
    pub async fn send_frame(&mut self, datagram: &[u8]) -> Result<(), ClientError> {
        self.socket.send_to(datagram, self.core.relay).await?;
        Ok(())
    }

    /// The next control message, waiting up to `timeout`.
    pub async fn next_message(&mut self, timeout: Duration) -> Result<Message, ClientError> {
        self.next_message_until(Instant::now() + timeout).await
    }

    async fn next_message_until(&mut self, deadline: Instant) -> Result<Message, ClientError> {
        self.drive_until(deadline, |c| c.core.has_messages()).await?;
        self.core.pop_message().ok_or(ClientError::Closed)
    }

    /// The next relay frame received on the control socket, with its source.
    pub async fn next_frame(&mut self, timeout: Duration) -> Result<(Vec<u8>, SocketAddr), ClientError> {
        self.drive_until(Instant::now() + timeout, |c| !c.frames.is_empty()).await?;
        self.frames.pop_front().ok_or(ClientError::Closed)
    }

    /// Keeps the connection serviced for `d` (answers, acks, keep-alives).
    pub async fn idle(&mut self, d: Duration) -> Result<(), ClientError> {
        match self.drive_until(Instant::now() + d, |_| false).await {
            Err(ClientError::Timeout(..)) => Ok(()),
            other => other,
        }
    }

    pub async fn close(mut self) {
        self.core.close("bye");
        self.push_now();
    }

    /// Puts queued data on the wire right away, without waiting for the next drive, so a
    /// message sent just before the caller turns to another connection still leaves. A
    /// datagram the socket will not take now is left to QUIC's loss recovery.
    fn push_now(&mut self) {
        let mut out = [0u8; MAX_DATAGRAM];
        while let Ok(Some((n, to))) = self.core.poll_transmit(&mut out) {
            if self.socket.try_send_to(&out[..n], to).is_err() {
                break;
            }
        }
    }

    async fn flush_quic(&mut self) -> Result<(), ClientError> {
        let mut out = [0u8; MAX_DATAGRAM];
        while let Some((n, to)) = self.core.poll_transmit(&mut out)? {
            self.socket.send_to(&out[..n], to).await?;
        }
        Ok(())
    }

    /// Moves datagrams and timers until `done` holds, the deadline passes, or the
    /// connection closes.
    async fn drive_until(&mut self, deadline: Instant, done: impl Fn(&Self) -> bool) -> Result<(), ClientError> {
        let mut buf = [0u8; MAX_DATAGRAM];
        let started = Instant::now();
        loop {
            self.flush_quic().await?;
            if done(self) {
                return Ok(());
            }
            if self.core.is_closed() {
                return Err(self.core.closed_error());
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(ClientError::Timeout(self.core.relay, now.saturating_duration_since(started)));
            }
            let wait = self.core.timeout(now).map_or(deadline - now, |t| t.min(deadline - now));
            match tokio::time::timeout(wait, self.socket.recv_from(&mut buf)).await {
                Err(_) => self.core.on_timeout(Instant::now()),
                Ok(Err(e)) => return Err(e.into()),
                Ok(Ok((n, from))) => {
                    let from = ztna_proto::addr::canonical(from);
                    if frame::is_relay_frame(&buf[..n]) {
                        if self.frames.len() < MAX_QUEUED_FRAMES {
                            self.frames.push_back((buf[..n].to_vec(), from));
                        } else {
                            self.frames_dropped += 1;
                        }
                    } else {
                        self.core.on_datagram(&mut buf[..n], from);
                    }
                }
            }
        }
    }
}
