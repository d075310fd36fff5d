//! One worker: a pinned thread with its own `SO_REUSEPORT` socket and mailbox, running one
//! [`Core`] (the protocol logic) over them.
//!
//! Each turn of the loop: wait (on the socket and the mailbox eventfd, bounded by the
//! core's next timer), feed the core the mailbox and the received batches (handing
//! datagrams another worker owns to it), let it service what changed, and flush.

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use ztna_proto::SessionId;
use ztna_proto::steering::{self, Owner};

use crate::core::{Core, CoreMsg, Mirror, Sink};
use crate::ebpf::xdp::{Blocklist, SessionMirror};
use crate::io::Datapath;
use crate::metrics::{DropReason, WorkerMetrics};
use crate::shared::{Handoff, Inbox, Shared};

/// Most mailbox messages handled per turn, so the socket is never starved.
const INBOX_BUDGET: usize = 4096;
/// Most receive batches per turn before servicing connections and timers.
const RECV_BATCHES_PER_TURN: usize = 16;

pub struct Worker {
    core: Core,
    out: Out,
    inbox: Inbox,
    /// Owns the descriptor the datapath sends and receives on.
    _socket: UdpSocket,
}

/// The core's [`Sink`]: the socket's send queue, the other workers' mailboxes, the
/// kernel's maps.
struct Out {
    index: u8,
    shared: Arc<Shared>,
    m: WorkerMetrics,
    io: Datapath,
    mirror: Option<SessionMirror>,
    blocklist: Option<Blocklist>,
    reported_sent: (u64, u64, u64),
    reported_no_buffers: u64,
}

impl Worker {
    pub fn new(index: u8, shared: Arc<Shared>, socket: UdpSocket, inbox: Inbox) -> anyhow::Result<Self> {
        let wake_fd = shared.mailboxes[index as usize].wake_fd();
        let io = Datapath::new(shared.config.io, &socket, shared.local_addr.is_ipv6(), wake_fd)
            .map_err(|e| e.context(format!("worker {index}")))?;
        let core = Core::new(index, shared.clone(), Instant::now())?;
        let out = Out {
            index,
            m: shared.metrics.worker(index as usize),
            mirror: shared.kernel.session_mirror(),
            blocklist: shared.kernel.blocklist(),
            shared,
            io,
            reported_sent: (0, 0, 0),
            reported_no_buffers: 0,
        };
        Ok(Worker { core, out, inbox, _socket: socket })
    }

    pub fn run(mut self) {
        let shared = self.out.shared.clone();
        shared.running_workers.fetch_add(1, Ordering::Relaxed);
        // Apart from the datapath so datagrams can be borrowed while the core handles them.
        let mut rx = self.out.io.rx_batch();
        loop {
            let now = Instant::now();
            self.out.io.wait(&mut rx, self.core.next_timeout().saturating_duration_since(now));

            let now = Instant::now();
            self.handle_inbox(now);
            for _ in 0..RECV_BATCHES_PER_TURN {
                let (n, more) = match self.out.io.recv(&mut rx) {
                    Ok(r) => r,
                    Err(e) => {
                        tracing::warn!(worker = self.out.index, error = %e, "receive failed");
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
                        _ => self.out.m.drop(DropReason::malformed_packet),
                    }
                }
                if n > 0 {
                    self.out.m.packets_in.inc_by(n as u64);
                    self.out.m.bytes_in.inc_by(bytes);
                }
                if !more {
                    break;
                }
            }
            self.core.handle_timeout(now, &mut self.out);
            self.core.service(now, &mut self.out);
            self.out.flush(self.core.take_forwarded());
            if self.core.finished(now) {
                break;
            }
        }
        tracing::info!(worker = self.out.index, open = self.core.connections(), "worker stopped");
        shared.running_workers.fetch_sub(1, Ordering::Relaxed);
    }

    /// Hands a datagram to the worker that owns it, or feeds it to this worker's core.
    fn route(&mut self, buf: &mut [u8], from: SocketAddr, now: Instant) {
        match steering::owner(buf, self.out.shared.workers) {
            Owner::Worker(w) if w != self.out.index => self.out.hand_off(w, buf, from),
            Owner::Malformed if !ztna_proto::frame::is_relay_frame(buf) => self.out.m.drop(DropReason::malformed_packet),
            _ => self.core.handle_datagram(buf, from, now, &mut self.out),
        }
    }

    fn handle_inbox(&mut self, now: Instant) {
        for _ in 0..INBOX_BUDGET {
            if let Ok(msg) = self.inbox.control.try_recv() {
                self.core.handle_message(msg, &mut self.out);
            } else if let Ok(Handoff { from, mut buf, len, pool }) = self.inbox.datagrams.try_recv() {
                self.core.handle_datagram(&mut buf[..len], from, now, &mut self.out);
                self.out.shared.handoff_pools[pool as usize].give_back(buf);
            } else {
                break;
            }
        }
    }
}

impl Out {
    /// Copies a datagram into a buffer of this worker's hand-off pool and queues it for
    /// its owner; with the pool or the owner's queue full, it is dropped and counted.
    fn hand_off(&mut self, owner: u8, buf: &[u8], from: SocketAddr) {
        let pool = &self.shared.handoff_pools[self.index as usize];
        let Some(mut copy) = pool.take() else {
            return self.m.drop(DropReason::handoff_queue_full);
        };
        let len = buf.len().min(copy.len());
        copy[..len].copy_from_slice(&buf[..len]);
        self.m.handoffs.inc();
        let msg = Handoff { from, buf: copy, len, pool: self.index };
        if let Err(Handoff { buf, .. }) = self.shared.mailboxes[owner as usize].hand_off(msg) {
            pool.give_back(buf);
            self.m.drop(DropReason::handoff_queue_full);
        }
    }

    /// Sends what the turn queued and brings the send counters up to date.
    fn flush(&mut self, forwarded: u64) {
        if self.io.pending() > 0 {
            self.io.flush();
        }
        if forwarded > 0 {
            self.m.frames_forwarded.inc_by(forwarded);
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
}

impl Mirror for Out {
    fn mirror_upsert(&mut self, id: &SessionId, agent: SocketAddr, connector: SocketAddr) {
        if let Some(m) = &self.mirror {
            m.upsert(id, agent, connector);
        }
    }

    fn mirror_remove(&mut self, id: &SessionId) {
        if let Some(m) = &self.mirror {
            m.remove(id);
        }
    }

    fn mirror_last_seen(&self, id: &SessionId, now: Instant) -> Option<Instant> {
        self.mirror.as_ref().and_then(|m| m.last_seen(id, now))
    }
}

impl Sink for Out {
    #[inline]
    fn send_with(&mut self, to: SocketAddr, fill: impl FnOnce(&mut [u8]) -> usize) {
        self.io.push_with(to, fill);
    }

    #[inline]
    fn send_dynamic(&mut self, fill: impl FnOnce(&mut [u8]) -> Option<(usize, SocketAddr)>) -> bool {
        self.io.push_dynamic(fill)
    }

    #[inline]
    fn send_copy(&mut self, to: SocketAddr, data: &[u8]) {
        self.io.push(to, data);
    }

    fn post(&mut self, to: u8, msg: CoreMsg) -> Result<(), CoreMsg> {
        self.shared.mailboxes[to as usize].post(msg)
    }

    fn has_blocklist(&self) -> bool {
        self.blocklist.is_some()
    }

    fn block(&mut self, ip: IpAddr, until: Instant, now: Instant) {
        if let Some(b) = &self.blocklist {
            b.block(ip, until, now);
        }
    }

    fn unblock_expired(&mut self, ip: IpAddr) {
        if let Some(b) = &self.blocklist {
            b.unblock_expired(ip);
        }
    }
}
