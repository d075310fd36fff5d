//! Datagram I/O for the workers. Each worker owns one `SO_REUSEPORT` UDP socket bound to the
//! relay port, and moves datagrams in batches with buffers allocated once at start.
//! Backends: `uring` (io_uring: multishot receive into a buffer ring, GRO, batched GSO
//! sends) and `mmsg` (recvmmsg/sendmmsg, works everywhere). [`Datapath`] hides which one
//! runs from the worker.

pub mod mmsg;
pub mod sockaddr;
pub mod uring;

use std::net::{SocketAddr, UdpSocket};
use std::os::fd::{AsRawFd, RawFd};
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use socket2::{Domain, Protocol, Socket, Type};

use crate::config::IoBackend;

/// Largest datagram a buffer holds. Larger ones are truncated by the kernel and dropped.
pub const MAX_DATAGRAM: usize = 2048;
/// Datagrams per recvmmsg/sendmmsg call.
pub const BATCH: usize = 64;

/// Socket buffer size each worker asks for: it absorbs bursts between two batches.
pub const SOCKET_BUFFER: usize = 8 << 20;

/// Binds one worker's socket: non-blocking, `SO_REUSEPORT`, dual-stack when `addr` is `[::]`.
pub fn bind_worker_socket(addr: SocketAddr) -> Result<UdpSocket> {
    let domain = if addr.is_ipv6() { Domain::IPV6 } else { Domain::IPV4 };
    let sock = Socket::new(domain, Type::DGRAM, Some(Protocol::UDP)).context("creating UDP socket")?;
    if addr.is_ipv6() {
        // Accept IPv4 too (as v4-mapped addresses) so one port serves both families.
        sock.set_only_v6(false).context("clearing IPV6_V6ONLY")?;
    }
    sock.set_reuse_port(true).context("setting SO_REUSEPORT")?;
    sock.set_nonblocking(true)?;
    ztna_sockopt::grow_buffers(&sock, SOCKET_BUFFER);
    sock.bind(&addr.into()).with_context(|| format!("binding UDP {addr}"))?;
    Ok(sock.into())
}

/// Turns the configured backend into the one to run: `auto` probes io_uring and falls back
/// to mmsg with one warning naming why; `uring` fails when io_uring is unavailable.
pub fn resolve(requested: IoBackend) -> Result<IoBackend> {
    match requested {
        IoBackend::Mmsg => Ok(IoBackend::Mmsg),
        IoBackend::Uring => match uring::probe() {
            Ok(()) => Ok(IoBackend::Uring),
            Err(why) => Err(anyhow!("the io_uring backend was requested (--io uring) but io_uring is unavailable: {why}; use --io auto or --io mmsg")),
        },
        IoBackend::Auto => match uring::probe() {
            Ok(()) => Ok(IoBackend::Uring),
            Err(why) => {
                tracing::warn!("io_uring unavailable, using the recvmmsg/sendmmsg backend: {why}");
                Ok(IoBackend::Mmsg)
            }
        },
    }
}

/// One worker's datagram I/O: waiting, receiving in batches, queueing and flushing sends.
pub enum Datapath {
    Mmsg { tx: mmsg::TxQueue, sock: RawFd, wake: RawFd },
    Uring(Box<uring::Uring>),
}

/// A receive batch of the matching backend, owned by the worker loop (apart from the
/// `Datapath`, so datagrams can be borrowed while the worker handles them).
pub enum RxBatch {
    Mmsg(Box<mmsg::RxBatch>),
    Uring(uring::RxBatch),
}

impl RxBatch {
    /// Datagram `i`: its bytes (mutable: quiche decrypts in place), its source, and whether
    /// it was truncated.
    pub fn get(&mut self, i: usize) -> (&mut [u8], Option<SocketAddr>, bool) {
        match self {
            RxBatch::Mmsg(b) => b.get(i),
            RxBatch::Uring(b) => b.get(i),
        }
    }

    pub fn len(&self) -> usize {
        match self {
            RxBatch::Mmsg(b) => b.len(),
            RxBatch::Uring(b) => b.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Datapath {
    /// `backend` must be resolved (not `auto`).
    pub fn new(backend: IoBackend, socket: &UdpSocket, socket_is_v6: bool, wake: RawFd) -> Result<Datapath> {
        let sock = socket.as_raw_fd();
        match backend {
            IoBackend::Uring => {
                let u = uring::Uring::new(sock, socket_is_v6, wake).context("setting up the worker's io_uring")?;
                Ok(Datapath::Uring(Box::new(u)))
            }
            IoBackend::Mmsg | IoBackend::Auto => {
                Ok(Datapath::Mmsg { tx: mmsg::TxQueue::new(socket, socket_is_v6), sock, wake })
            }
        }
    }

    pub fn backend(&self) -> IoBackend {
        match self {
            Datapath::Mmsg { .. } => IoBackend::Mmsg,
            Datapath::Uring(_) => IoBackend::Uring,
        }
    }

    pub fn rx_batch(&self) -> RxBatch {
        match self {
            Datapath::Mmsg { .. } => RxBatch::Mmsg(Box::default()),
            Datapath::Uring(u) => RxBatch::Uring(u.rx_batch()),
        }
    }

    /// Blocks until a datagram or the mailbox is ready, or `timeout` passes. True when the
    /// mailbox's eventfd fired (it is drained then).
    pub fn wait(&mut self, rx: &mut RxBatch, timeout: Duration) -> bool {
        match (self, rx) {
            (Datapath::Uring(u), RxBatch::Uring(rx)) => u.wait(rx, timeout),
            (Datapath::Mmsg { sock, wake, .. }, _) => {
                let fired = mmsg::poll_two(*sock, *wake, timeout);
                if fired {
                    drain_eventfd(*wake);
                }
                fired
            }
            (Datapath::Uring(_), RxBatch::Mmsg(_)) => false,
        }
    }

    /// Receives the next batch into `rx`: how many datagrams, and whether more are likely
    /// waiting (worth another batch this turn).
    pub fn recv(&mut self, rx: &mut RxBatch) -> std::io::Result<(usize, bool)> {
        match (self, rx) {
            (Datapath::Uring(u), RxBatch::Uring(rx)) => Ok(u.recv(rx)),
            (Datapath::Mmsg { sock, .. }, RxBatch::Mmsg(rx)) => rx.recv(*sock).map(|n| (n, n == BATCH)),
            _ => Ok((0, false)),
        }
    }

    /// Queues one datagram to `to`, written by `fill` into a buffer of [`MAX_DATAGRAM`]
    /// bytes; `fill` returns the length (0 cancels).
    #[inline]
    pub fn push_with(&mut self, to: SocketAddr, fill: impl FnOnce(&mut [u8]) -> usize) -> usize {
        match self {
            Datapath::Mmsg { tx, .. } => tx.push_with(to, fill),
            Datapath::Uring(u) => u.push_with(to, fill),
        }
    }

    /// Queues a datagram whose destination is known only once written (QUIC's `send`).
    #[inline]
    pub fn push_dynamic(&mut self, fill: impl FnOnce(&mut [u8]) -> Option<(usize, SocketAddr)>) -> bool {
        match self {
            Datapath::Mmsg { tx, .. } => tx.push_dynamic(fill),
            Datapath::Uring(u) => u.push_dynamic(fill),
        }
    }

    /// Queues a copy of `data`.
    #[inline]
    pub fn push(&mut self, to: SocketAddr, data: &[u8]) {
        self.push_with(to, |buf| {
            let n = data.len().min(buf.len());
            buf[..n].copy_from_slice(&data[..n]);
            n
        });
    }

    pub fn pending(&self) -> usize {
        match self {
            Datapath::Mmsg { tx, .. } => tx.pending(),
            Datapath::Uring(u) => u.pending(),
        }
    }

    pub fn flush(&mut self) {
        match self {
            Datapath::Mmsg { tx, .. } => tx.flush(),
            Datapath::Uring(u) => u.flush(),
        }
    }

    /// Totals since start: (datagrams sent, bytes sent, datagrams the kernel refused).
    pub fn sent_totals(&self) -> (u64, u64, u64) {
        match self {
            Datapath::Mmsg { tx, .. } => (tx.sent_packets, tx.sent_bytes, tx.failed),
            Datapath::Uring(u) => (u.sent_packets, u.sent_bytes, u.failed),
        }
    }

    /// Times the receive buffer ring ran dry (io_uring only).
    pub fn rx_no_buffers(&self) -> u64 {
        match self {
            Datapath::Mmsg { .. } => 0,
            Datapath::Uring(u) => u.rx_no_buffers,
        }
    }
}

/// Resets the mailbox eventfd after it fired.
pub(crate) fn drain_eventfd(fd: RawFd) {
    let mut v: u64 = 0;
    // SAFETY: reading 8 bytes into a valid u64 from our non-blocking eventfd.
    unsafe { libc::read(fd, (&mut v as *mut u64).cast(), 8) };
}
