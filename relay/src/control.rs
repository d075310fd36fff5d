//! One control connection's protocol state: the quiche connection, the control stream's
//! message reassembly and outbox, and who the peer is. No sockets here; the worker moves
//! datagrams and decides what messages mean.

use std::net::SocketAddr;
use std::time::Instant;

use ztna_proto::control::{DecodeError, FramingError, MessageReader};
use ztna_proto::identity::Identity;
use ztna_proto::{Message, SessionId};

/// A connection's key: the relay-chosen source connection id (worker byte + random).
pub type ConnKey = [u8; ztna_proto::ID_LEN];

/// The one control stream: the client's first bidirectional stream.
pub const CONTROL_STREAM: u64 = 0;
/// Cap on control bytes waiting for stream credit, per connection; past it the client is
/// not reading and is closed rather than buffered without bound.
pub const MAX_OUTBOX: usize = 256 * 1024;

pub use ztna_proto::control::close_code;

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

pub struct ControlConn {
    pub quic: quiche::Connection,
    pub key: ConnKey,
    /// The client's current address (changes when QUIC migrates).
    pub peer: SocketAddr,
    pub started: Instant,
    pub state: State,
    pub identity: Option<Identity>,
    /// Identity as text, shared with session offers and the registry.
    pub identity_text: std::sync::Arc<str>,
    /// Sessions this connection takes part in (either side).
    pub sessions: Vec<SessionId>,
    /// Services registered by this connection (connectors).
    pub registered: Vec<String>,
    /// The client-chosen DCID of its first Initial, aliased to this connection until the
    /// handshake completes (only without Retry).
    pub initial_dcid: Option<Vec<u8>>,
    pub timer_deadline: Option<Instant>,
    /// Queued for servicing this loop turn.
    pub dirty: bool,
    pub qad_seq: u32,
    reader: MessageReader,
    outbox: Vec<u8>,
    outbox_sent: usize,
}

/// What reading the control stream produced.
pub enum Incoming {
    Message(Message),
    Invalid(DecodeError),
    Framing(FramingError),
}

impl ControlConn {
    pub fn new(quic: quiche::Connection, key: ConnKey, peer: SocketAddr, now: Instant) -> Self {
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
            initial_dcid: None,
            timer_deadline: None,
            dirty: false,
            qad_seq: 0,
            reader: MessageReader::new(),
            outbox: Vec::new(),
            outbox_sent: 0,
        }
    }

    /// Queues a message on the control stream. Encoding errors are bugs in the relay (the
    /// fields come from validated input), so they are logged and the message skipped.
    pub fn send(&mut self, msg: &Message) {
        if let Err(e) = msg.encode(&mut self.outbox) {
            tracing::error!(error = %e, kind = msg.kind(), "relay built an invalid control message");
        }
        self.flush_outbox();
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
        let readable: Vec<u64> = self.quic.readable().collect();
        for stream in readable {
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

    /// Closes with an application error; the reason phrase reaches the client's user.
    pub fn close(&mut self, code: u64, reason: &str) {
        let _ = self.quic.close(true, code, reason.as_bytes());
        self.state = State::Closing;
    }
}
