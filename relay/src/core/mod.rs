//! The relay's protocol logic for one worker, without I/O (quinn-proto's split): it is fed
//! datagrams, messages from other workers and time, and hands every effect to a [`Sink`]
//! (datagrams to send, messages for other workers, session-mirror and blocklist updates)
//! that the worker implements over its socket, its mailboxes and the kernel's maps.
//! Tests implement the sink in memory and drive whole handshakes between real quiche
//! clients and two cores with simulated time.
//!
//! * [`conn`]: one control connection's state; [`conns`]: the worker's table of them.
//! * [`accept`]: client Initials: version negotiation, Retry, limits, accepting.
//! * [`dispatch`]: authentication and the control messages (Hello, Register, Connect, …).
//! * [`broker`]: sessions: creating, rebinding, reloading and ending them.
//!
//! What crosses workers: a session lives on its agent's worker (named by its id), so a
//! connector on another worker hears of it by [`CoreMsg`]. While one connection is being
//! handled, effects on other connections go through a message too (even to this worker),
//! so no handler ever holds two connections.

pub mod accept;
pub mod broker;
pub mod conn;
pub mod conns;
pub mod dispatch;
#[cfg(test)]
mod tests;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use ztna_proto::frame::{self, Frame, FrameError};
use ztna_proto::{ErrorCode, ID_LEN, Message, SessionId};

use crate::metrics::{DropReason, WorkerMetrics};
pub use crate::sessions::Mirror;
use crate::sessions::{Forward, SessionTable};
use crate::shared::Shared;
use crate::tls;
use conn::{ConnKey, Incoming, MAX_OUTBOX, close_code};
use conns::ConnTable;

/// How often idle sessions, the limiter's table and reloads are looked at.
pub const MAINTENANCE_EVERY: Duration = Duration::from_millis(500);
/// Between `GoingAway` and the close that follows it: time for the message to leave (a close
/// discards stream data not yet sent).
const DRAIN_NOTICE: Duration = Duration::from_millis(20);

/// Messages between the cores of different workers (or to this one, from inside a handler).
#[derive(Debug)]
pub enum CoreMsg {
    /// Deliver a session offer to a connector connection on this worker. `addr` is the
    /// connector address the owner bound; if the connector has moved since, its worker
    /// tells the owner.
    Offer { conn: ConnKey, session: SessionId, owner: u8, addr: SocketAddr, msgs: Box<[Message]> },
    /// A session ended: tell this connection (if still here) and forget the session.
    SessionEnded { conn: ConnKey, session: SessionId, reason: ErrorCode },
    /// To a session's owner: end it on behalf of `by`, who left or asked.
    EndSession { session: SessionId, reason: ErrorCode, by: Side },
    /// To a session's owner: the connector side's validated address changed.
    ConnectorMoved { session: SessionId, addr: SocketAddr },
    /// To a session's owner: path signalling from side `by`, a party of the session.
    Signal { session: SessionId, by: Side, signal: Signal },
    /// Deliver a message to this connection if it still takes part in `session`.
    Deliver { conn: ConnKey, session: SessionId, msg: Message },
}

/// Path signalling a party sends about its session (PROTOCOL.md §14.2).
#[derive(Debug)]
pub enum Signal {
    /// Its candidates, for the other side.
    Candidates(Vec<ztna_proto::candidate::Candidate>),
    /// Whether its tunnel now uses a direct path.
    PathStatus(bool),
}

impl Signal {
    /// The `message` label of the signalling metric.
    pub fn name(&self) -> &'static str {
        match self {
            Signal::Candidates(_) => "candidates",
            Signal::PathStatus(_) => "path_status",
        }
    }
}

/// A side of a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Agent,
    Connector,
}

/// Where the core's effects go. Sends are queued and flushed by the worker once per turn.
pub trait Sink: Mirror {
    /// Queues a datagram to `to`, written by `fill` into a buffer of
    /// [`crate::io::MAX_DATAGRAM`] bytes; `fill` returns its length (0 cancels).
    fn send_with(&mut self, to: SocketAddr, fill: impl FnOnce(&mut [u8]) -> usize);
    /// Queues a datagram whose destination is known only once written (QUIC's `send`);
    /// false when `fill` had nothing to send.
    fn send_dynamic(&mut self, fill: impl FnOnce(&mut [u8]) -> Option<(usize, SocketAddr)>) -> bool;
    /// Queues a copy of `data` to `to` (DATA forwarding: the hot path).
    fn send_copy(&mut self, to: SocketAddr, data: &[u8]);
    /// Posts a message to worker `to`'s core. Control messages are never refused by a
    /// running worker; an error means that worker is gone.
    fn post(&mut self, to: u8, msg: CoreMsg) -> Result<(), CoreMsg>;
    /// Whether the kernel drops blocklisted sources (XDP is on).
    fn has_blocklist(&self) -> bool;
    /// Drops this source's Initials in the kernel until `until` (XDP's blocklist).
    fn block(&mut self, ip: IpAddr, until: Instant, now: Instant);
    /// Removes `ip` from the kernel's blocklist if its entry has run out.
    fn unblock_expired(&mut self, ip: IpAddr);
}

/// One worker's protocol state.
pub struct Core {
    conns: ConnTable,
    ctx: Ctx,
}

/// Everything but the connection table, so handlers can hold one connection and the rest.
struct Ctx {
    index: u8,
    shared: Arc<Shared>,
    m: WorkerMetrics,
    quic_config: quiche::Config,
    generation: u64,
    sessions: SessionTable,
    scratch: Box<[u8]>,
    incoming: Vec<Incoming>,
    unblocked: Vec<IpAddr>,
    /// Messages for this worker's own core, posted while a connection was held.
    local: Vec<CoreMsg>,
    /// DATA frames forwarded since the last [`Core::take_forwarded`].
    forwarded: u64,
    next_maintenance: Instant,
    /// Set once draining began: the time by which the worker stops anyway.
    drain_deadline: Option<Instant>,
    /// While draining: when the connections told `GoingAway` are closed.
    drain_close_at: Option<Instant>,
    reset_budget: crate::reset::ResetBudget,
}

impl Core {
    pub fn new(index: u8, shared: Arc<Shared>, now: Instant) -> anyhow::Result<Core> {
        let ctx = Ctx {
            index,
            m: shared.metrics.worker(index as usize),
            quic_config: tls::server_config(&shared.config)?,
            generation: shared.generation.load(Ordering::Relaxed),
            shared,
            sessions: SessionTable::default(),
            scratch: vec![0u8; 64 * 1024].into_boxed_slice(),
            incoming: Vec::with_capacity(16),
            unblocked: Vec::new(),
            local: Vec::new(),
            forwarded: 0,
            next_maintenance: now + MAINTENANCE_EVERY,
            drain_deadline: None,
            drain_close_at: None,
            reset_budget: crate::reset::ResetBudget::new(),
        };
        Ok(Core { conns: ConnTable::default(), ctx })
    }

    pub fn connections(&self) -> usize {
        self.conns.len()
    }

    pub fn sessions(&self) -> &SessionTable {
        &self.ctx.sessions
    }

    /// When the core next needs [`Core::handle_timeout`].
    pub fn next_timeout(&self) -> Instant {
        let t = self.ctx.drain_close_at.map_or(self.ctx.next_maintenance, |c| c.min(self.ctx.next_maintenance));
        self.conns.next_deadline().map_or(t, |d| d.min(t))
    }

    /// DATA frames forwarded since the last call (the worker adds them to its metric once
    /// a turn: one atomic add, not one per frame).
    pub fn take_forwarded(&mut self) -> u64 {
        std::mem::take(&mut self.ctx.forwarded)
    }

    /// A datagram this worker owns (the worker has already handed others to their owner).
    pub fn handle_datagram(&mut self, buf: &mut [u8], from: SocketAddr, now: Instant, sink: &mut impl Sink) {
        if frame::is_relay_frame(buf) {
            self.ctx.handle_frame(buf, from, now, sink)
        } else {
            self.handle_quic(buf, from, now, sink)
        }
    }

    /// A message from another worker's core (or this one's).
    pub fn handle_message(&mut self, msg: CoreMsg, sink: &mut impl Sink) {
        match msg {
            CoreMsg::Offer { conn, session, owner, addr, msgs } => match self.conns.touch(&conn) {
                Some(c) if c.state() == conn::State::Ready => {
                    c.add_session(session);
                    for msg in msgs.iter() {
                        c.send(msg);
                    }
                    if c.peer() != addr {
                        // Moved while the offer was in flight: rebind the session.
                        let moved = CoreMsg::ConnectorMoved { session, addr: c.peer() };
                        let _ = self.ctx.post(owner, moved, sink);
                    }
                }
                _ => {
                    let ended = CoreMsg::EndSession { session, reason: ErrorCode::PeerGone, by: Side::Connector };
                    let _ = self.ctx.post(owner, ended, sink);
                }
            },
            CoreMsg::SessionEnded { conn, session, reason } => {
                if let Some(c) = self.conns.touch(&conn) {
                    c.session_closed(session, reason);
                }
            }
            CoreMsg::EndSession { session, reason, by } => self.end_session(session, reason, Some(by), sink),
            CoreMsg::ConnectorMoved { session, addr } => self.ctx.sessions.rebind_connector(&session, addr, sink),
            CoreMsg::Signal { session, by, signal } => self.signal(session, by, signal, sink),
            CoreMsg::Deliver { conn, session, msg } => {
                if let Some(c) = self.conns.touch(&conn)
                    && c.sessions().contains(&session)
                {
                    c.send(&msg);
                }
            }
        }
    }

    /// Connection timers, and every [`MAINTENANCE_EVERY`]: idle sessions, the limiter's
    /// table, a reload, the start of a drain.
    pub fn handle_timeout(&mut self, now: Instant, sink: &mut impl Sink) {
        self.conns.fire_timers(now);
        if now >= self.ctx.next_maintenance {
            self.maintenance(now, sink);
            self.ctx.next_maintenance = now + MAINTENANCE_EVERY;
        }
        if self.ctx.shared.is_draining() && self.ctx.drain_deadline.is_none() {
            self.drain(now);
        }
        if self.ctx.drain_close_at.is_some_and(|at| now >= at) {
            self.ctx.drain_close_at = None;
            self.close_all();
        }
    }

    /// Draining and done: every connection closed, or the drain timeout passed.
    pub fn finished(&self, now: Instant) -> bool {
        self.ctx.drain_deadline.is_some_and(|d| self.conns.is_empty() || now >= d)
    }

    /// SIGTERM: new handshakes are refused; every client is told `GoingAway` (when to come
    /// back), and a moment later, once that has left, every connection is closed with a reason.
    fn drain(&mut self, now: Instant) {
        let limits = &self.ctx.shared.config.limits;
        self.ctx.drain_deadline = Some(now + limits.drain_timeout());
        let going_away = Message::GoingAway { reconnect_within_ms: limits.reconnect_spread_ms };
        for key in self.conns.keys() {
            if let Some(c) = self.conns.touch(&key).filter(|c| c.state() == conn::State::Ready) {
                c.send(&going_away);
            }
        }
        self.ctx.drain_close_at = Some(now + DRAIN_NOTICE);
    }

    fn close_all(&mut self) {
        for key in self.conns.keys() {
            if let Some(c) = self.conns.touch(&key) {
                c.close(close_code::SHUTDOWN, "relay shutting down");
            }
        }
    }

    fn maintenance(&mut self, now: Instant, sink: &mut impl Sink) {
        let idle = self.ctx.shared.config.limits.session_idle_timeout();
        for id in self.ctx.sessions.idle(now, idle, sink) {
            self.end_session(id, ErrorCode::IdleTimeout, None, sink);
        }
        let mut unblocked = std::mem::take(&mut self.ctx.unblocked);
        self.ctx.shared.limiter.sweep(now, &mut unblocked);
        for ip in unblocked.drain(..) {
            sink.unblock_expired(ip);
        }
        self.ctx.unblocked = unblocked;
        let generation = self.ctx.shared.generation.load(Ordering::Relaxed);
        if generation != self.ctx.generation {
            self.ctx.generation = generation;
            self.reload(sink);
        }
    }

    fn handle_quic(&mut self, buf: &mut [u8], from: SocketAddr, now: Instant, sink: &mut impl Sink) {
        if buf[0] & 0x80 == 0 {
            // Short header: the DCID is our 8-byte connection id.
            let key: Option<ConnKey> = buf.get(1..1 + ID_LEN).and_then(|d| d.try_into().ok());
            match key {
                Some(key) if self.conns.contains(&key) => self.recv_on(key, buf, from, now),
                Some(key) => {
                    self.ctx.m.drop(DropReason::unknown_connection);
                    self.ctx.stateless_reset(&key, buf.len(), from, now, sink);
                }
                None => self.ctx.m.drop(DropReason::malformed_packet),
            }
            return;
        }
        let hdr = match quiche::Header::from_slice(buf, ID_LEN) {
            Ok(h) => h,
            Err(_) => return self.ctx.m.drop(DropReason::malformed_packet),
        };
        if let Some(key) = self.conns.find(&hdr.dcid) {
            return self.recv_on(key, buf, from, now);
        }
        if hdr.ty != quiche::Type::Initial {
            return self.ctx.m.drop(DropReason::unknown_connection);
        }
        if let Some(key) = self.ctx.accept(&mut self.conns, &hdr, buf, from, now, sink) {
            self.recv_on(key, buf, from, now);
        }
    }

    fn recv_on(&mut self, key: ConnKey, buf: &mut [u8], from: SocketAddr, now: Instant) {
        let Some(conn) = self.conns.touch(&key) else { return };
        let info = quiche::RecvInfo { from, to: self.ctx.shared.local_addr };
        match conn.recv(buf, info, now) {
            Ok(_) | Err(quiche::Error::Done) => {}
            Err(e) => {
                tracing::trace!(error = %e, %from, "quic recv error");
                self.ctx.m.drop(DropReason::quic_error);
            }
        }
    }

    /// Handshake completion, control messages, path changes, sends and timers of every
    /// connection touched since the last call; then removes the connections that closed.
    pub fn service(&mut self, now: Instant, sink: &mut impl Sink) {
        loop {
            for msg in std::mem::take(&mut self.ctx.local) {
                self.handle_message(msg, sink);
            }
            self.service_dirty(now, sink);
            // Removing a closed connection may end sessions, which touches others.
            if self.ctx.local.is_empty() && !self.conns.has_dirty() {
                break;
            }
        }
    }

    fn service_dirty(&mut self, now: Instant, sink: &mut impl Sink) {
        let mut closed = Vec::new();
        while let Some(key) = self.conns.next_dirty() {
            let Some(conn) = self.conns.get_mut(&key) else { continue };
            let ctx = &mut self.ctx;
            if conn.handshake_completed() {
                ctx.authenticate(conn, now);
            }
            if conn.is_open() {
                ctx.read_control(conn, now, sink);
                if let Some(peer) = conn.take_migration() {
                    ctx.migrated(conn, peer, sink);
                }
            }
            conn.flush_outbox();
            if conn.backlog() > MAX_OUTBOX {
                conn.close(close_code::SLOW_READER, "control stream not read");
            }
            while sink.send_dynamic(|out| conn.transmit(out)) {}
            // An unresponsive connector goes now, not after QUIC's draining period: its
            // sessions must move on within the liveness bound.
            let done = conn.is_closed() || conn.is_unresponsive();
            if conn.is_unresponsive() {
                ctx.shared.metrics.unresponsive_closed.inc();
            }
            self.conns.serviced(&key, now);
            if done {
                closed.push(key);
            }
        }
        for key in closed {
            self.remove_conn(key, sink);
        }
    }
}

impl Ctx {
    /// A short-header packet for a connection this relay does not know (it restarted, or
    /// dropped it): a stateless reset tells the client at once, within a budget.
    fn stateless_reset(&mut self, cid: &ConnKey, received: usize, to: SocketAddr, now: Instant, sink: &mut impl Sink) {
        if !self.reset_budget.take(now) {
            return;
        }
        let key = &self.shared.reset_key;
        let mut sent = false;
        sink.send_with(to, |out| {
            let n = key.write_reset(cid, received, out).unwrap_or(0);
            sent = n > 0;
            n
        });
        if sent {
            self.shared.metrics.stateless_resets_sent.inc();
        }
    }

    /// Relay frames: DATA forwarding (the hot path) and stateless QAD probes.
    fn handle_frame(&mut self, buf: &mut [u8], from: SocketAddr, now: Instant, sink: &mut impl Sink) {
        match Frame::parse(buf) {
            Ok(Frame::Data { session, .. }) => match self.sessions.forward(&session, from, now) {
                Forward::To(to) => {
                    sink.send_copy(to, buf);
                    self.forwarded += 1;
                }
                Forward::Drop(reason) => self.m.drop(reason),
            },
            Ok(Frame::QadProbe { nonce }) => {
                let probe_len = buf.len();
                sink.send_with(from, |out| {
                    // The reply is never longer than the probe (the probe's minimum size).
                    frame::write_qad_reply(nonce, &from, &mut out[..probe_len]).unwrap_or(0)
                });
                self.shared.metrics.qad_probes.inc();
            }
            // A reply, or a punch sent to the relay's address: neither is for the relay.
            Ok(Frame::QadReply { .. } | Frame::Punch { .. }) => self.m.drop(DropReason::unknown_frame_type),
            Err(FrameError::ShortData) => self.m.drop(DropReason::malformed_frame),
            Err(FrameError::ShortProbe) => self.m.drop(DropReason::short_probe),
            Err(_) => self.m.drop(DropReason::unknown_frame_type),
        }
    }
}
