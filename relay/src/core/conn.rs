//! One control connection's protocol state: the quiche connection, the control stream's
//! message reassembly and outbox, who the peer is and what it holds (sessions,
//! registrations). No sockets and no other connections here: the core decides what
//! messages mean.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ztna_proto::control::{DecodeError, FramingError, MessageReader};
use ztna_proto::identity::{Identity, Kind};
use ztna_proto::{Message, SessionId};
use ztna_proto::liveness::{Liveness, LivenessConfig, Verdict};

pub use ztna_proto::control::close_code;

/// A connection's key: the relay-chosen source connection id (worker byte + random).
pub type ConnKey = [u8; ztna_proto::ID_LEN];

/// The one control stream: the client's first bidirectional stream.
pub const CONTROL_STREAM: u64 = 0;
/// Cap on control bytes waiting for stream credit, per connection; past it the client is
/// not reading and is closed rather than buffered without bound.
pub const MAX_OUTBOX: usize = 256 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// TLS handshake in progress.
    Handshaking,
    /// Authenticated; waiting for Hello.
    AwaitHello,
    /// Hello answered; requests accepted.
    Ready,
    /// Closing (sent or received CONNECTION_CLOSE).
    Closing,
}

/// What reading the control stream produced.
pub enum Incoming {
    Message(Message),
    Invalid(DecodeError),
    Framing(FramingError),
}

pub struct ControlConn {
    quic: quiche::Connection,
    key: ConnKey,
    /// The client's current address (changes when QUIC migrates).
    peer: SocketAddr,
    started: Instant,
    state: State,
    identity: Option<Identity>,
    /// Identity as text, shared with session offers and the registry.
    identity_text: Arc<str>,
    /// Sessions this connection takes part in (either side).
    sessions: Vec<SessionId>,
    /// Services registered by this connection (connectors).
    registered: Vec<String>,
    /// Where the client's separate peer-to-peer socket is seen (`DirectAddress`), if it has one.
    direct_addr: Option<SocketAddr>,
    qad_seq: u32,
    /// Packets QUIC accepted from the client, for the liveness check of connectors with
    /// sessions (`None`: the check is off).
    liveness: Option<Liveness>,
    unresponsive: bool,
    reader: MessageReader,
    outbox: Vec<u8>,
    outbox_sent: usize,
}

impl ControlConn {
    pub fn new(quic: quiche::Connection, key: ConnKey, peer: SocketAddr, now: Instant, liveness: Option<LivenessConfig>) -> Self {
        ControlConn {
            quic,
            key,
            peer,
            started: now,
            state: State::Handshaking,
            identity: None,
            identity_text: "".into(),
            sessions: Vec::new(),
            registered: Vec::new(),
            direct_addr: None,
            qad_seq: 0,
            liveness: liveness.map(|cfg| Liveness::new(cfg, now)),
            unresponsive: false,
            reader: MessageReader::new(),
            outbox: Vec::new(),
            outbox_sent: 0,
        }
    }

    pub fn key(&self) -> ConnKey {
        self.key
    }

    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    /// The address the other side of a new session punches towards: the client's
    /// peer-to-peer socket when it named one, else the control connection's own address.
    pub fn reflexive_candidate(&self) -> SocketAddr {
        self.direct_addr.unwrap_or(self.peer)
    }

    pub fn set_direct_addr(&mut self, addr: SocketAddr) {
        self.direct_addr = Some(addr);
    }

    pub fn direct_addr(&self) -> Option<SocketAddr> {
        self.direct_addr
    }

    pub fn state(&self) -> State {
        self.state
    }

    /// Authenticated and not closing: control messages are read.
    pub fn is_open(&self) -> bool {
        matches!(self.state, State::AwaitHello | State::Ready)
    }

    pub fn identity(&self) -> Option<&Identity> {
        self.identity.as_ref()
    }

    pub fn kind(&self) -> Option<Kind> {
        self.identity.as_ref().map(|i| i.kind)
    }

    pub fn identity_text(&self) -> &Arc<str> {
        &self.identity_text
    }

    // ---- QUIC ----

    pub fn recv(&mut self, buf: &mut [u8], info: quiche::RecvInfo, now: Instant) -> quiche::Result<usize> {
        let n = self.quic.recv(buf, info)?;
        if let Some(l) = &mut self.liveness {
            l.on_rx(now);
        }
        Ok(n)
    }

    pub fn is_established(&self) -> bool {
        self.quic.is_established()
    }

    /// The handshake completed on this turn: true once, while still `Handshaking`.
    pub fn handshake_completed(&self) -> bool {
        self.state == State::Handshaking && self.quic.is_established()
    }

    pub fn peer_cert(&self) -> Option<&[u8]> {
        self.quic.peer_cert()
    }

    /// How long the handshake took.
    pub fn handshake_time(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.started)
    }

    /// The client proved who it is: messages may flow.
    pub fn authenticated(&mut self, id: Identity) {
        self.identity_text = id.to_string().into();
        self.identity = Some(id);
        self.state = State::AwaitHello;
    }

    /// Hello answered.
    pub fn ready(&mut self) {
        self.state = State::Ready;
    }

    /// The next datagram QUIC wants sent, written into `out`: its length and destination.
    /// A send error closes the connection (nothing else can be done with it).
    pub fn transmit(&mut self, out: &mut [u8]) -> Option<(usize, SocketAddr)> {
        match self.quic.send(out) {
            Ok((n, info)) => Some((n, info.to)),
            Err(quiche::Error::Done) => None,
            Err(e) => {
                tracing::debug!(error = %e, "quic send failed");
                let _ = self.quic.close(false, 0x1, b"internal error");
                None
            }
        }
    }

    /// QUIC's timer, or the liveness check's when sooner.
    pub fn timeout(&self, now: Instant) -> Option<Duration> {
        let live = self.liveness_deadline().map(|t| t.saturating_duration_since(now));
        match (self.quic.timeout(), live) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    pub fn on_timeout(&mut self, now: Instant) {
        self.quic.on_timeout();
        if !self.liveness_watched() {
            return;
        }
        let Some(liveness) = &mut self.liveness else { return };
        match liveness.poll(now) {
            Verdict::Quiet => {}
            Verdict::Ping => {
                let _ = self.quic.send_ack_eliciting();
            }
            Verdict::Dead(silent) => {
                self.unresponsive = true;
                let why = format!("no answer for {} ms", silent.as_millis());
                tracing::info!(peer = %self.peer, identity = %self.identity_text, "connector unresponsive: {why}");
                self.close(close_code::UNRESPONSIVE, &why);
            }
        }
    }

    /// A connector with sessions: the relay must notice within seconds that it died, so its
    /// sessions end and new ones go elsewhere. (QUIC's idle timeout alone takes 30 s; agents
    /// and idle connectors are left to it.)
    fn liveness_watched(&self) -> bool {
        self.liveness.is_some()
            && self.state == State::Ready
            && !self.unresponsive
            && self.kind() == Some(Kind::Connector)
            && !self.sessions.is_empty()
    }

    fn liveness_deadline(&self) -> Option<Instant> {
        if !self.liveness_watched() {
            return None;
        }
        self.liveness.as_ref().map(Liveness::deadline)
    }

    /// Closed for not answering liveness pings: remove it now.
    pub fn is_unresponsive(&self) -> bool {
        self.unresponsive
    }

    pub fn is_closed(&self) -> bool {
        self.quic.is_closed()
    }

    /// The TLS alert this relay sent, when it refused the client's certificate.
    pub fn tls_alert_sent(&self) -> Option<u64> {
        let e = self.quic.local_error()?;
        (!e.is_app && (0x100..0x200).contains(&e.error_code)).then(|| e.error_code - 0x100)
    }

    /// Closes with an application error; the reason phrase reaches the client's user.
    pub fn close(&mut self, code: u64, reason: &str) {
        let _ = self.quic.close(true, code, reason.as_bytes());
        self.state = State::Closing;
    }

    /// The client's validated new address after a migration (or NAT rebinding), if it moved.
    pub fn take_migration(&mut self) -> Option<SocketAddr> {
        let mut moved = None;
        while let Some(ev) = self.quic.path_event_next() {
            let quiche::PathEvent::PeerMigrated(_, peer) = ev else { continue };
            let peer = ztna_proto::addr::canonical(peer);
            if peer != self.peer {
                tracing::info!(identity = %self.identity_text, from = %self.peer, to = %peer, "client address changed");
                self.peer = peer;
                moved = Some(peer);
            }
        }
        moved
    }

    // ---- the control stream ----

    /// Queues a message on the control stream. Encoding errors are bugs in the relay (the
    /// fields come from validated input), so they are logged and the message skipped.
    pub fn send(&mut self, msg: &Message) {
        if let Err(e) = msg.encode(&mut self.outbox) {
            tracing::error!(error = %e, kind = msg.kind(), "relay built an invalid control message");
        }
        self.flush_outbox();
    }

    /// The QAD report of the address the relay sees the client at (a new sequence number).
    pub fn report_address(&mut self) {
        self.qad_seq = self.qad_seq.wrapping_add(1);
        let msg = Message::ObservedAddress { seq: self.qad_seq, addr: self.peer };
        self.send(&msg);
    }

    /// Pushes queued bytes into the stream as flow control allows.
    pub fn flush_outbox(&mut self) {
        while self.outbox_sent < self.outbox.len() {
            match self.quic.stream_send(CONTROL_STREAM, &self.outbox[self.outbox_sent..], false) {
                Ok(0) | Err(quiche::Error::Done) => break,
                Ok(n) => self.outbox_sent += n,
                Err(_) => {
                    // Stream gone (reset or connection closing): nothing more will be sent.
                    self.outbox_sent = self.outbox.len();
                }
            }
        }
        if self.outbox_sent == self.outbox.len() {
            self.outbox.clear();
            self.outbox_sent = 0;
        }
    }

    /// Bytes waiting for stream credit.
    pub fn backlog(&self) -> usize {
        self.outbox.len() - self.outbox_sent
    }

    /// Reads whatever the control stream has and returns the complete messages.
    /// Data on any other stream is a protocol violation (returned as `Err`).
    pub fn read_stream(&mut self, scratch: &mut [u8], out: &mut Vec<Incoming>) -> Result<(), &'static str> {
        while let Some(stream) = self.quic.stream_readable_next() {
            if stream != CONTROL_STREAM {
                return Err("data on a stream other than the control stream");
            }
            loop {
                match self.quic.stream_recv(stream, scratch) {
                    Ok((n, fin)) => {
                        self.reader.push(&scratch[..n]);
                        if fin {
                            break;
                        }
                    }
                    Err(quiche::Error::Done) => break,
                    Err(_) => return Err("control stream reset"),
                }
            }
        }
        while let Some(item) = self.reader.next_message() {
            match item {
                Ok(Ok(msg)) => out.push(Incoming::Message(msg)),
                Ok(Err(e)) => out.push(Incoming::Invalid(e)),
                Err(e) => {
                    out.push(Incoming::Framing(e));
                    break;
                }
            }
        }
        Ok(())
    }

    // ---- what the connection holds ----

    pub fn sessions(&self) -> &[SessionId] {
        &self.sessions
    }

    pub fn add_session(&mut self, id: SessionId) {
        self.sessions.push(id);
    }

    /// Forgets a session; false when the connection did not take part in it.
    pub fn forget_session(&mut self, id: &SessionId) -> bool {
        let before = self.sessions.len();
        self.sessions.retain(|s| s != id);
        self.sessions.len() != before
    }

    /// Tells the client a session ended, and forgets it.
    pub fn session_closed(&mut self, session: SessionId, reason: ztna_proto::ErrorCode) {
        self.forget_session(&session);
        self.send(&Message::SessionClosed { session, reason });
    }

    pub fn take_sessions(&mut self) -> Vec<SessionId> {
        std::mem::take(&mut self.sessions)
    }

    pub fn registered(&self) -> &[String] {
        &self.registered
    }

    pub fn add_registration(&mut self, service: String) {
        self.registered.push(service);
    }

    /// Keeps the registrations `keep` approves and returns the others.
    pub fn drop_registrations(&mut self, keep: impl Fn(&str) -> bool) -> Vec<String> {
        let (kept, dropped) = std::mem::take(&mut self.registered).into_iter().partition(|s| keep(s));
        self.registered = kept;
        dropped
    }
}
