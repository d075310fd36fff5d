//! One worker: a pinned thread with its own `SO_REUSEPORT` socket, its shard of control
//! connections and sessions, and a mailbox for everything other workers hand it.
//!
//! Each turn of the loop: wait (poll on the socket and the mailbox eventfd, bounded by the
//! next QUIC timer), drain the mailbox, receive batches, route each datagram (hand-off to its
//! owner, DATA-frame forwarding, QAD probes, QUIC), then service the connections that
//! changed and flush the send queue.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::hash::BuildHasherDefault;
use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use ztna_proto::control::{DecodeError, MAX_SERVICES, Role};
use ztna_proto::frame::{self, Frame, FrameError};
use ztna_proto::identity::{Identity, Kind};
use ztna_proto::steering::{self, Owner};
use ztna_proto::{CONTROL_VERSION, ErrorCode, ID_LEN, Message, SessionId};

use crate::control::{ConnKey, ControlConn, Incoming, MAX_OUTBOX, State, close_code};
use crate::io::Datapath;
use crate::metrics::{DropReason, WorkerMetrics};
use crate::policy::Decision;
use crate::ratelimit::HandshakeLimiter;
use crate::registry::ConnectorEntry;
use crate::sessions::{ConnRef, Forward, IdHasher, Session, SessionTable};
use crate::shared::{Inbox, Shared, WorkerMsg};
use crate::tls;

type ConnMap = HashMap<ConnKey, ControlConn, BuildHasherDefault<IdHasher>>;

/// Most mailbox messages handled per turn, so the socket is never starved.
const INBOX_BUDGET: usize = 4096;
/// Most receive batches per turn before servicing connections and timers.
const RECV_BATCHES_PER_TURN: usize = 16;
const MAINTENANCE_EVERY: Duration = Duration::from_millis(500);

pub struct Worker {
    conns: ConnMap,
    /// Client-chosen Initial DCIDs that point at a connection (only when Retry is off).
    aliases: HashMap<Vec<u8>, ConnKey>,
    timers: BinaryHeap<Reverse<(Instant, ConnKey)>>,
    dirty: Vec<ConnKey>,
    ctx: Ctx,
}

/// Everything but the connection table, so handlers can borrow one connection and the rest.
struct Ctx {
    index: u8,
    shared: Arc<Shared>,
    m: WorkerMetrics,
    /// Owns the descriptor the datapath sends and receives on.
    _socket: UdpSocket,
    io: Datapath,
    inbox: Inbox,
    quic_config: quiche::Config,
    generation: u64,
    sessions: SessionTable,
    /// The XDP blocklist, when XDP is on.
    blocklist: Option<crate::ebpf::xdp::Blocklist>,
    limiter: HandshakeLimiter,
    scratch: Box<[u8]>,
    incoming: Vec<Incoming>,
    reported_sent: (u64, u64, u64),
    reported_no_buffers: u64,
    /// DATA frames forwarded since the last flush (added to the metric once per turn).
    forwarded: u64,
}

impl Worker {
    pub fn new(index: u8, shared: Arc<Shared>, socket: UdpSocket, inbox: Inbox) -> anyhow::Result<Self> {
        let quic_config = tls::server_config(&shared.config)?;
        let limits = &shared.config.limits;
        let wake_fd = shared.mailboxes[index as usize].wake_fd();
        let io = Datapath::new(shared.config.io, &socket, shared.local_addr.is_ipv6(), wake_fd)
            .map_err(|e| e.context(format!("worker {index}")))?;
        let (sessions, blocklist) = (SessionTable::new(shared.kernel.session_mirror()), shared.kernel.blocklist());
        let ctx = Ctx {
            index,
            m: shared.metrics.worker(index as usize),
            limiter: HandshakeLimiter::new(limits.handshakes_per_ip_per_sec, limits.handshake_burst),
            generation: shared.generation.load(Ordering::Relaxed),
            shared,
            _socket: socket,
            io,
            inbox,
            quic_config,
            sessions,
            scratch: vec![0u8; 64 * 1024].into_boxed_slice(),
            blocklist,
            incoming: Vec::with_capacity(16),
            reported_sent: (0, 0, 0),
            reported_no_buffers: 0,
            forwarded: 0,
        };
        Ok(Worker { conns: ConnMap::default(), aliases: HashMap::new(), timers: BinaryHeap::new(), dirty: Vec::new(), ctx })
    }

    pub fn run(mut self) {
        let shared = self.ctx.shared.clone();
        shared.running_workers.fetch_add(1, Ordering::Relaxed);
        // Apart from self.ctx.io so datagrams can be borrowed while self handles them.
        let mut rx = self.ctx.io.rx_batch();
        let mut next_maintenance = Instant::now() + MAINTENANCE_EVERY;
        let mut drain_deadline: Option<Instant> = None;
        loop {
            let now = Instant::now();
            let mut wait = next_maintenance.saturating_duration_since(now);
            if let Some(Reverse((t, _))) = self.timers.peek() {
                wait = wait.min(t.saturating_duration_since(now));
            }
            self.ctx.io.wait(&mut rx, wait);

            let now = Instant::now();
            self.handle_inbox(now);
            for _ in 0..RECV_BATCHES_PER_TURN {
                let (n, more) = match self.ctx.io.recv(&mut rx) {
                    Ok(r) => r,
                    Err(e) => {
                        tracing::warn!(worker = self.ctx.index, error = %e, "receive failed");
                        (0, false)
                    }
                };
                // Counted once per batch: one atomic add each, not one per datagram.
                let mut bytes = 0u64;
                for i in 0..n {
                    let (buf, from, truncated) = rx.get(i);
                    bytes += buf.len() as u64;
                    match from {
                        Some(from) if !truncated => self.route(buf, from, now),
                        _ => self.ctx.m.drop(DropReason::malformed_packet),
                    }
                }
                if n > 0 {
                    self.ctx.m.packets_in.inc_by(n as u64);
                    self.ctx.m.bytes_in.inc_by(bytes);
                }
                if !more {
                    break;
                }
            }
            self.fire_timers(now);
            if now >= next_maintenance {
                self.maintenance(now);
                next_maintenance = now + MAINTENANCE_EVERY;
            }
            if shared.is_draining() && drain_deadline.is_none() {
                drain_deadline = Some(now + shared.config.limits.drain_timeout());
                self.close_all();
            }
            self.service_dirty(now);
            self.ctx.flush();
            if let Some(deadline) = drain_deadline
                && (self.conns.is_empty() || now >= deadline)
            {
                break;
            }
        }
        tracing::info!(worker = self.ctx.index, open = self.conns.len(), "worker stopped");
        shared.running_workers.fetch_sub(1, Ordering::Relaxed);
    }

    /// Sends a datagram to the worker that owns it, or handles it here.
    fn route(&mut self, buf: &mut [u8], from: SocketAddr, now: Instant) {
        let is_frame = frame::is_relay_frame(buf);
        match steering::owner(buf, self.ctx.shared.workers) {
            Owner::Worker(w) if w != self.ctx.index => {
                let shared = &self.ctx.shared;
                let pool = &shared.handoff_pools[self.ctx.index as usize];
                let Some(mut copy) = pool.take() else {
                    return self.ctx.m.drop(DropReason::handoff_queue_full);
                };
                let len = buf.len().min(copy.len());
                copy[..len].copy_from_slice(&buf[..len]);
                self.ctx.m.handoffs.inc();
                let msg = WorkerMsg::Datagram { from, buf: copy, len, pool: self.ctx.index };
                if let Err(WorkerMsg::Datagram { buf, .. }) = shared.mailboxes[w as usize].send(msg) {
                    pool.give_back(buf);
                    self.ctx.m.drop(DropReason::handoff_queue_full);
                }
            }
            Owner::Malformed if !is_frame => self.ctx.m.drop(DropReason::malformed_packet),
            _ if is_frame => self.ctx.handle_frame(buf, from, now),
            _ => self.handle_quic(buf, from, now),
        }
    }

    fn handle_inbox(&mut self, now: Instant) {
        for _ in 0..INBOX_BUDGET {
            let msg = match self.ctx.inbox.control.try_recv() {
                Ok(m) => m,
                Err(_) => match self.ctx.inbox.datagrams.try_recv() {
                    Ok(m) => m,
                    Err(_) => break,
                },
            };
            match msg {
                WorkerMsg::Datagram { from, mut buf, len, pool } => {
                    let data = &mut buf[..len];
                    if frame::is_relay_frame(data) {
                        self.ctx.handle_frame(data, from, now)
                    } else {
                        self.handle_quic(data, from, now)
                    }
                    self.ctx.shared.handoff_pools[pool as usize].give_back(buf);
                }
                WorkerMsg::Offer { conn, session, owner, addr, msg } => match self.conns.get_mut(&conn) {
                    Some(c) if c.state == State::Ready => {
                        c.sessions.push(session);
                        c.send(&msg);
                        mark_dirty(&mut self.dirty, c);
                        if c.peer != addr {
                            // Moved while the offer was in flight: rebind the session.
                            let _ = self.ctx.shared.mailboxes[owner as usize]
                                .send(WorkerMsg::ConnectorMoved { session, addr: c.peer });
                        }
                    }
                    _ => {
                        let _ = self.ctx.shared.mailboxes[owner as usize]
                            .send(WorkerMsg::EndSession { session, reason: ErrorCode::PeerGone });
                    }
                },
                WorkerMsg::SessionEnded { conn, session, reason } => {
                    if let Some(c) = self.conns.get_mut(&conn) {
                        c.sessions.retain(|s| *s != session);
                        c.send(&Message::SessionClosed { session, reason });
                        mark_dirty(&mut self.dirty, c);
                    }
                }
                WorkerMsg::EndSession { session, reason } => self.end_session(session, reason, Some(Role::Connector)),
                WorkerMsg::ConnectorMoved { session, addr } => self.ctx.sessions.rebind_connector(&session, addr),
            }
        }
    }

    fn handle_quic(&mut self, buf: &mut [u8], from: SocketAddr, now: Instant) {
        if buf[0] & 0x80 == 0 {
            // Short header: the DCID is our 8-byte connection id.
            let key: Option<ConnKey> = buf.get(1..1 + ID_LEN).and_then(|d| d.try_into().ok());
            match key {
                Some(key) if self.conns.contains_key(&key) => self.recv_on(key, buf, from),
                Some(_) => self.ctx.m.drop(DropReason::unknown_connection),
                None => self.ctx.m.drop(DropReason::malformed_packet),
            }
            return;
        }
        let hdr = match quiche::Header::from_slice(buf, ID_LEN) {
            Ok(h) => h,
            Err(_) => return self.ctx.m.drop(DropReason::malformed_packet),
        };
        let dcid: &[u8] = &hdr.dcid;
        let key = <ConnKey>::try_from(dcid)
            .ok()
            .filter(|k| self.conns.contains_key(k))
            .or_else(|| self.aliases.get(dcid).copied());
        if let Some(key) = key {
            return self.recv_on(key, buf, from);
        }
        if hdr.ty != quiche::Type::Initial {
            return self.ctx.m.drop(DropReason::unknown_connection);
        }
        self.accept(&hdr, buf, from, now);
    }

    /// A client Initial for no known connection: version check, Retry, limits, accept.
    fn accept(&mut self, hdr: &quiche::Header<'_>, buf: &mut [u8], from: SocketAddr, now: Instant) {
        let ctx = &mut self.ctx;
        // RFC 9000 §14.1: client Initials are padded to 1200 bytes; answering smaller
        // datagrams (Retry, version negotiation) could make the relay an amplifier.
        if buf.len() < 1200 {
            return ctx.m.drop(DropReason::short_initial);
        }
        if !quiche::version_is_supported(hdr.version) {
            ctx.m.drop(DropReason::unsupported_version);
            ctx.io.push_with(from, |out| quiche::negotiate_version(&hdr.scid, &hdr.dcid, out).unwrap_or(0));
            return;
        }
        if ctx.shared.is_draining() || self.conns.len() >= ctx.shared.config.limits.max_connections_per_worker {
            return ctx.m.drop(DropReason::connection_limit);
        }
        let (scid, odcid) = if ctx.shared.config.limits.retry {
            let token = hdr.token.as_deref().unwrap_or(&[]);
            if token.is_empty() {
                let new_scid = ctx.new_conn_id(&self.conns);
                let mut tok = [0u8; crate::retry::MAX_TOKEN_LEN];
                let n = ctx.shared.retry_key.mint(&from, &hdr.dcid, &mut tok);
                let scid = quiche::ConnectionId::from_ref(&new_scid);
                ctx.io.push_with(from, |out| {
                    quiche::retry(&hdr.scid, &hdr.dcid, &scid, &tok[..n], hdr.version, out).unwrap_or(0)
                });
                ctx.shared.metrics.retries_sent.inc();
                return;
            }
            let Some(odcid) = ctx.shared.retry_key.validate(&from, token) else {
                return ctx.m.drop(DropReason::invalid_token);
            };
            // After Retry the client's DCID is the id we chose: it must name this worker.
            let Ok(scid) = <ConnKey>::try_from(&hdr.dcid[..]) else {
                return ctx.m.drop(DropReason::invalid_token);
            };
            if scid[0] != ctx.index {
                return ctx.m.drop(DropReason::invalid_token);
            }
            (scid, Some(odcid.to_vec()))
        } else {
            (ctx.new_conn_id(&self.conns), None)
        };
        if !ctx.limiter.allow(from.ip(), now) {
            // Over the limit: let XDP drop this source's Initials for a while, before
            // they cost a wake-up and a Retry check here.
            if let Some(b) = &ctx.blocklist
                && let Some(until) = ctx.limiter.block(from.ip(), now, ctx.shared.config.limits.blocklist_for())
            {
                b.block(from.ip(), until, now);
                ctx.shared.metrics.blocklisted.inc();
            }
            return ctx.m.drop(DropReason::rate_limited);
        }
        let odcid_ref = odcid.as_deref().map(quiche::ConnectionId::from_ref);
        let quic = match quiche::accept(
            &quiche::ConnectionId::from_ref(&scid),
            odcid_ref.as_ref(),
            ctx.shared.local_addr,
            from,
            &mut ctx.quic_config,
        ) {
            Ok(q) => q,
            Err(e) => {
                tracing::debug!(error = %e, %from, "accept failed");
                return ctx.m.drop(DropReason::quic_error);
            }
        };
        let mut conn = ControlConn::new(quic, scid, from, now);
        if odcid.is_none() {
            conn.initial_dcid = Some(hdr.dcid.to_vec());
            self.aliases.insert(hdr.dcid.to_vec(), scid);
        }
        self.conns.insert(scid, conn);
        ctx.m.control_connections.inc();
        self.recv_on(scid, buf, from);
    }

    fn recv_on(&mut self, key: ConnKey, buf: &mut [u8], from: SocketAddr) {
        let Some(conn) = self.conns.get_mut(&key) else { return };
        let info = quiche::RecvInfo { from, to: self.ctx.shared.local_addr };
        match conn.quic.recv(buf, info) {
            Ok(_) | Err(quiche::Error::Done) => {}
            Err(e) => {
                tracing::trace!(error = %e, %from, "quic recv error");
                self.ctx.m.drop(DropReason::quic_error);
            }
        }
        mark_dirty(&mut self.dirty, conn);
    }

    fn fire_timers(&mut self, now: Instant) {
        while let Some(&Reverse((t, key))) = self.timers.peek() {
            if t > now {
                break;
            }
            self.timers.pop();
            if let Some(conn) = self.conns.get_mut(&key)
                && conn.timer_deadline == Some(t)
            {
                conn.timer_deadline = None;
                conn.quic.on_timeout();
                mark_dirty(&mut self.dirty, conn);
            }
        }
        // Stale entries (a deadline that moved) are skipped above; keep the heap bounded.
        if self.timers.len() > 4 * self.conns.len() + 1024 {
            self.timers = self.conns.values().filter_map(|c| c.timer_deadline.map(|t| Reverse((t, c.key)))).collect();
        }
    }

    /// Handshake completion, control messages, path changes, sends and timers of every
    /// connection touched this turn.
    fn service_dirty(&mut self, now: Instant) {
        let mut closed = Vec::new();
        let mut i = 0;
        // Handlers may mark more connections dirty; process until the list is empty.
        while i < self.dirty.len() {
            let key = self.dirty[i];
            i += 1;
            let Some(conn) = self.conns.get_mut(&key) else { continue };
            conn.dirty = false;
            let ctx = &mut self.ctx;
            if conn.state == State::Handshaking && conn.quic.is_established() {
                if let Some(dcid) = conn.initial_dcid.take() {
                    self.aliases.remove(&dcid);
                }
                ctx.authenticate(conn, now);
            }
            if matches!(conn.state, State::AwaitHello | State::Ready) {
                ctx.read_control(conn, now);
                ctx.path_events(conn);
            }
            conn.flush_outbox();
            if conn.backlog() > MAX_OUTBOX {
                conn.close(close_code::SLOW_READER, "control stream not read");
            }
            ctx.send_quic(conn);
            let deadline = conn.quic.timeout().map(|d| now + d);
            if deadline != conn.timer_deadline {
                conn.timer_deadline = deadline;
                if let Some(t) = deadline {
                    self.timers.push(Reverse((t, key)));
                }
            }
            if conn.quic.is_closed() {
                closed.push(key);
            }
        }
        self.dirty.clear();
        for key in closed {
            self.remove_conn(key);
        }
    }

    fn remove_conn(&mut self, key: ConnKey) {
        let Some(conn) = self.conns.remove(&key) else { return };
        let ctx = &mut self.ctx;
        if let Some(dcid) = &conn.initial_dcid {
            self.aliases.remove(dcid);
        }
        ctx.m.control_connections.dec();
        if conn.state == State::Handshaking || conn.identity.is_none() {
            ctx.shared.metrics.handshake(false);
            if let Some(e) = conn.quic.local_error()
                && !e.is_app
                && (0x100..0x200).contains(&e.error_code)
            {
                // A TLS alert we sent: the client's certificate did not verify.
                ctx.shared.metrics.auth_failure("tls_handshake");
                tracing::info!(peer = %conn.peer, alert = e.error_code - 0x100, "TLS handshake refused");
            }
            return;
        }
        let identity = conn.identity.as_ref().map(|i| i.kind);
        tracing::info!(peer = %conn.peer, identity = %conn.identity_text, "control connection closed");
        match identity {
            Some(Kind::Agent) => {
                for s in conn.sessions {
                    self.end_session(s, ErrorCode::PeerGone, Some(Role::Agent));
                }
            }
            Some(Kind::Connector) => {
                let removed = ctx.shared.registry().remove_conn(ConnRef { worker: ctx.index, conn: key });
                ctx.shared.metrics.registered_connectors.dec_by(removed as i64);
                for s in conn.sessions {
                    let _ = ctx.shared.mailboxes[s.worker() as usize]
                        .send(WorkerMsg::EndSession { session: s, reason: ErrorCode::PeerGone });
                }
            }
            _ => {}
        }
    }

    /// Ends a session this worker owns, telling the sides that did not end it.
    fn end_session(&mut self, id: SessionId, reason: ErrorCode, ended_by: Option<Role>) {
        let Some(s) = self.ctx.sessions.remove(&id) else { return };
        self.notify_session_end(id, &s, reason, ended_by);
    }

    fn notify_session_end(&mut self, id: SessionId, s: &Session, reason: ErrorCode, ended_by: Option<Role>) {
        let ctx = &mut self.ctx;
        ctx.m.sessions_active.dec();
        ctx.shared.metrics.session_closed(reason);
        tracing::debug!(session = %id, service = %s.service, reason = %reason, frames = s.frames, "session ended");
        if ended_by != Some(Role::Agent)
            && let Some(c) = self.conns.get_mut(&s.agent.conn)
        {
            c.sessions.retain(|x| *x != id);
            c.send(&Message::SessionClosed { session: id, reason });
            mark_dirty(&mut self.dirty, c);
        }
        if ended_by != Some(Role::Connector) {
            let _ = ctx.shared.mailboxes[s.connector.worker as usize].send(WorkerMsg::SessionEnded {
                conn: s.connector.conn,
                session: id,
                reason,
            });
        }
    }

    fn maintenance(&mut self, now: Instant) {
        let mut expired = Vec::new();
        let idle = self.ctx.shared.config.limits.session_idle_timeout();
        self.ctx.sessions.expire(now, idle, &mut expired);
        for (id, s) in expired {
            self.notify_session_end(id, &s, ErrorCode::IdleTimeout, None);
        }
        self.ctx.limiter.sweep(now);
        for ip in self.ctx.limiter.take_unblocked() {
            if let Some(b) = &self.ctx.blocklist {
                b.unblock_expired(ip);
            }
        }
        let generation = self.ctx.shared.generation.load(Ordering::Relaxed);
        if generation != self.ctx.generation {
            self.ctx.generation = generation;
            self.reload();
        }
    }

    /// After SIGHUP: new TLS material for new connections, and the new policy applied to
    /// existing registrations and sessions.
    fn reload(&mut self) {
        match tls::server_config(&self.ctx.shared.config) {
            Ok(c) => self.ctx.quic_config = c,
            Err(e) => tracing::error!(error = %e, "keeping the previous TLS configuration"),
        }
        let policy = self.ctx.shared.policy();
        let keys: Vec<ConnKey> = self.conns.keys().copied().collect();
        for key in keys {
            let Some(conn) = self.conns.get_mut(&key) else { continue };
            let Some(id) = conn.identity.clone() else { continue };
            if conn.state == State::Ready && !policy.knows(&id) {
                conn.close(close_code::NOT_AUTHORIZED, &format!("{id} is no longer in the relay's policy"));
                mark_dirty(&mut self.dirty, conn);
            }
            if id.kind == Kind::Connector {
                let me = ConnRef { worker: self.ctx.index, conn: key };
                let (keep, drop): (Vec<String>, Vec<String>) =
                    conn.registered.drain(..).partition(|s| policy.decide(&id, s) == Decision::Allow);
                conn.registered = keep;
                for service in drop {
                    if self.ctx.shared.registry().unregister(&service, me) {
                        self.ctx.shared.metrics.registered_connectors.dec();
                    }
                    conn.send(&Message::Error {
                        request_id: 0,
                        code: ErrorCode::NotAuthorized,
                        message: format!("the policy no longer lets {id} serve {service:?}"),
                    });
                    mark_dirty(&mut self.dirty, conn);
                }
            }
        }
        let sids: Vec<SessionId> = self.ctx.sessions.ids().collect();
        for sid in sids {
            let Some(s) = self.ctx.sessions.get(&sid) else { continue };
            let agent = self.conns.get(&s.agent.conn).and_then(|c| c.identity.clone());
            let connector = Identity::parse(&s.connector_identity).ok();
            let allowed = |who: Option<Identity>| who.is_some_and(|w| policy.decide(&w, &s.service) == Decision::Allow);
            if !allowed(agent) || !allowed(connector) {
                self.end_session(sid, ErrorCode::NotAuthorized, None);
            }
        }
    }

    fn close_all(&mut self) {
        for conn in self.conns.values_mut() {
            conn.close(close_code::SHUTDOWN, "relay shutting down");
            mark_dirty(&mut self.dirty, conn);
        }
    }
}

fn mark_dirty(dirty: &mut Vec<ConnKey>, conn: &mut ControlConn) {
    if !conn.dirty {
        conn.dirty = true;
        dirty.push(conn.key);
    }
}

impl Ctx {
    /// A fresh connection id for this worker that routes here under both steering rules.
    fn new_conn_id(&self, conns: &ConnMap) -> ConnKey {
        loop {
            let id = ztna_proto::id::make_id(self.index, rand::random());
            if steering::id_is_consistent(&id, self.shared.workers) && !conns.contains_key(&id) {
                return id;
            }
        }
    }

    fn flush(&mut self) {
        if self.io.pending() > 0 {
            self.io.flush();
        }
        if self.forwarded > 0 {
            self.m.frames_forwarded.inc_by(std::mem::take(&mut self.forwarded));
        }
        let (p, b, f) = self.io.sent_totals();
        let (rp, rb, rf) = self.reported_sent;
        self.m.packets_out.inc_by(p - rp);
        self.m.bytes_out.inc_by(b - rb);
        for _ in rf..f {
            self.m.drop(DropReason::send_failed);
        }
        self.reported_sent = (p, b, f);
        let nb = self.io.rx_no_buffers();
        if nb != self.reported_no_buffers {
            self.m.rx_no_buffers.inc_by(nb - self.reported_no_buffers);
            self.reported_no_buffers = nb;
        }
    }

    /// Relay frames: DATA forwarding (the hot path) and stateless QAD probes.
    fn handle_frame(&mut self, buf: &mut [u8], from: SocketAddr, now: Instant) {
        match Frame::parse(buf) {
            Ok(Frame::Data { session, .. }) => match self.sessions.forward(&session, from, now) {
                Forward::To(to) => {
                    self.io.push(to, buf);
                    self.forwarded += 1;
                }
                Forward::Drop(reason) => self.m.drop(reason),
            },
            Ok(Frame::QadProbe { nonce }) => {
                let probe_len = buf.len();
                self.io.push_with(from, |out| {
                    // The reply is never longer than the probe (the probe's minimum size).
                    frame::write_qad_reply(nonce, &from, &mut out[..probe_len]).unwrap_or(0)
                });
                self.shared.metrics.qad_probes.inc();
            }
            Ok(Frame::QadReply { .. }) => self.m.drop(DropReason::unknown_frame_type),
            Err(FrameError::ShortData) => self.m.drop(DropReason::malformed_frame),
            Err(FrameError::ShortProbe) => self.m.drop(DropReason::short_probe),
            Err(_) => self.m.drop(DropReason::unknown_frame_type),
        }
    }

    fn send_quic(&mut self, conn: &mut ControlConn) {
        loop {
            let mut failed = false;
            let queued = self.io.push_dynamic(|out| match conn.quic.send(out) {
                Ok((n, info)) => Some((n, info.to)),
                Err(quiche::Error::Done) => None,
                Err(e) => {
                    tracing::debug!(error = %e, "quic send failed");
                    failed = true;
                    None
                }
            });
            if failed {
                let _ = conn.quic.close(false, 0x1, b"internal error");
            }
            if !queued {
                break;
            }
        }
    }

    /// The handshake finished: establish who the client is from its certificate.
    fn authenticate(&mut self, conn: &mut ControlConn, now: Instant) {
        let metrics = &self.shared.metrics;
        let id = match conn.quic.peer_cert().map(Identity::from_certificate_der) {
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
                metrics.handshake_duration.observe(now.saturating_duration_since(conn.started).as_secs_f64());
                conn.identity_text = id.to_string().into();
                tracing::info!(peer = %conn.peer, identity = %id, "control connection authenticated");
                conn.identity = Some(id);
                conn.state = State::AwaitHello;
            }
            Err((reason, text)) => {
                // handshakes{failed} is counted when the connection is removed.
                metrics.auth_failure(reason);
                tracing::info!(peer = %conn.peer, reason, "authentication failed: {text}");
                conn.identity = None;
                conn.close(close_code::AUTH_FAILED, &text);
            }
        }
    }

    fn read_control(&mut self, conn: &mut ControlConn, now: Instant) {
        let mut incoming = std::mem::take(&mut self.incoming);
        if let Err(why) = conn.read_stream(&mut self.scratch, &mut incoming) {
            self.shared.metrics.malformed_control.inc();
            conn.close(close_code::PROTOCOL_VIOLATION, why);
        }
        for item in incoming.drain(..) {
            if conn.state == State::Closing {
                break;
            }
            match item {
                Incoming::Message(msg) => self.on_message(conn, msg, now),
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

    fn refuse(&self, conn: &mut ControlConn, request_id: u32, code: ErrorCode, message: String) {
        self.shared.metrics.refusal(code);
        tracing::info!(peer = %conn.peer, identity = %conn.identity_text, code = %code, "refused: {message}");
        conn.send(&Message::Error { request_id, code, message });
    }

    fn on_message(&mut self, conn: &mut ControlConn, msg: Message, now: Instant) {
        let Some(id) = conn.identity.clone() else { return };
        match (conn.state, msg) {
            (State::AwaitHello, Message::Hello { version, .. }) => {
                if version != CONTROL_VERSION {
                    self.refuse(conn, 0, ErrorCode::UnsupportedVersion, format!("relay speaks control version {CONTROL_VERSION}, not {version}"));
                    conn.close(close_code::PROTOCOL_VIOLATION, "unsupported control version");
                    return;
                }
                let policy = self.shared.policy();
                if !policy.knows(&id) {
                    self.shared.metrics.auth_failure("not_in_policy");
                    let text = format!("{id} is not allowed by the relay's policy");
                    self.refuse(conn, 0, ErrorCode::NotAuthorized, text.clone());
                    conn.close(close_code::NOT_AUTHORIZED, &text);
                    return;
                }
                let Some(role) = id.kind.role() else { return };
                let mut services = policy.services_for(&id);
                if services.len() > MAX_SERVICES {
                    tracing::warn!(identity = %id, granted = services.len(), "Welcome lists only the first {MAX_SERVICES} services");
                    services.truncate(MAX_SERVICES);
                }
                conn.send(&Message::Welcome { version: CONTROL_VERSION, role, identity: id.to_string(), services });
                conn.state = State::Ready;
                self.report_address(conn);
            }
            (State::AwaitHello, _) => {
                self.refuse(conn, 0, ErrorCode::ProtocolViolation, "the first message must be Hello".into());
            }
            (State::Ready, Message::Register { services }) => self.register(conn, &id, services),
            (State::Ready, Message::Connect { request_id, service }) => self.connect(conn, &id, request_id, service, now),
            (State::Ready, Message::CloseSession { session }) => {
                if !conn.sessions.contains(&session) {
                    return;
                }
                conn.sessions.retain(|s| *s != session);
                let reason = ErrorCode::PeerGone;
                if session.worker() == self.index && id.kind == Kind::Agent {
                    // The agent's own session lives here; end it without a mailbox round trip.
                    if let Some(s) = self.sessions.remove(&session) {
                        self.m.sessions_active.dec();
                        self.shared.metrics.session_closed(reason);
                        let _ = self.shared.mailboxes[s.connector.worker as usize].send(WorkerMsg::SessionEnded {
                            conn: s.connector.conn,
                            session,
                            reason,
                        });
                    }
                } else {
                    let _ = self.shared.mailboxes[session.worker() as usize].send(WorkerMsg::EndSession { session, reason });
                }
            }
            (State::Ready, Message::Ping { nonce }) => conn.send(&Message::Pong { nonce }),
            (State::Ready, Message::Hello { .. }) => {
                self.refuse(conn, 0, ErrorCode::ProtocolViolation, "Hello was already sent".into());
            }
            (_, other) => {
                self.refuse(conn, 0, ErrorCode::UnsupportedMessage, format!("message type {:#04x} is not for the relay", other.kind()));
            }
        }
    }

    fn register(&mut self, conn: &mut ControlConn, id: &Identity, services: Vec<String>) {
        if id.kind != Kind::Connector {
            return self.refuse(conn, 0, ErrorCode::WrongRole, format!("{id} is not a connector and cannot register services"));
        }
        let policy = self.shared.policy();
        let me = ConnRef { worker: self.index, conn: conn.key };
        for service in services {
            match policy.decide(id, &service) {
                Decision::Allow if !conn.registered.contains(&service) && conn.registered.len() >= MAX_SERVICES => {
                    self.refuse(conn, 0, ErrorCode::ProtocolViolation, format!("at most {MAX_SERVICES} services per connector"))
                }
                Decision::Allow => {
                    if !conn.registered.contains(&service) {
                        let entry = ConnectorEntry { conn: me, identity: conn.identity_text.clone(), addr: conn.peer };
                        self.shared.registry().register(&service, entry);
                        self.shared.metrics.registered_connectors.inc();
                        conn.registered.push(service);
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
        tracing::info!(identity = %id, services = ?conn.registered, "connector registered");
        conn.send(&Message::Registered { services: conn.registered.clone() });
    }

    fn connect(&mut self, conn: &mut ControlConn, id: &Identity, request_id: u32, service: String, now: Instant) {
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
        if conn.sessions.len() >= self.shared.config.limits.max_sessions_per_connection {
            return self.refuse(conn, request_id, ErrorCode::SessionLimit, "too many open sessions on this connection".into());
        }
        let Some(connector) = self.shared.registry().pick(&service) else {
            return self.refuse(conn, request_id, ErrorCode::NoConnectorAvailable, format!("no connector is serving {service:?} right now"));
        };
        let session = loop {
            let candidate = SessionId::new(self.index, rand::random());
            if !self.sessions.contains(&candidate) {
                break candidate;
            }
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
        let to_connector =
            WorkerMsg::Offer { conn: connector.conn.conn, session, owner: self.index, addr: connector.addr, msg: offer };
        if self.shared.mailboxes[connector.conn.worker as usize].send(to_connector).is_err() {
            return self.refuse(conn, request_id, ErrorCode::Internal, "the connector's worker is not running".into());
        }
        self.sessions.insert(
            session,
            Session {
                service: service.clone(),
                agent: ConnRef { worker: self.index, conn: conn.key },
                agent_addr: conn.peer,
                connector: connector.conn,
                connector_identity: connector.identity.clone(),
                connector_addr: connector.addr,
                last_active: now,
                frames: 0,
            },
        );
        conn.sessions.push(session);
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
    }

    /// QAD: tell the client the address we see it at.
    fn report_address(&mut self, conn: &mut ControlConn) {
        conn.qad_seq = conn.qad_seq.wrapping_add(1);
        conn.send(&Message::ObservedAddress { seq: conn.qad_seq, addr: conn.peer });
        self.shared.metrics.qad_report(&conn.peer);
    }

    /// A validated migration moves the client's address: report it (QAD) and rebind the
    /// client's sessions, so the relay keeps forwarding to where the client now is.
    fn path_events(&mut self, conn: &mut ControlConn) {
        while let Some(ev) = conn.quic.path_event_next() {
            let quiche::PathEvent::PeerMigrated(_, peer) = ev else { continue };
            let peer = ztna_proto::addr::canonical(peer);
            if peer == conn.peer {
                continue;
            }
            tracing::info!(identity = %conn.identity_text, from = %conn.peer, to = %peer, "client address changed");
            conn.peer = peer;
            self.report_address(conn);
            match conn.identity.as_ref().map(|i| i.kind) {
                Some(Kind::Agent) => {
                    for s in &conn.sessions {
                        self.sessions.rebind_agent(s, peer);
                    }
                }
                Some(Kind::Connector) => {
                    self.shared.registry().update_addr(ConnRef { worker: self.index, conn: conn.key }, peer);
                    for &session in &conn.sessions {
                        let _ = self.shared.mailboxes[session.worker() as usize]
                            .send(WorkerMsg::ConnectorMoved { session, addr: peer });
                    }
                }
                _ => {}
            }
        }
    }
}
