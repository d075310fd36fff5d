//! State every worker can reach: configuration, policy, the connector registry, the retry
//! key, metrics and the mailboxes. Everything here is either immutable, atomic, or taken
//! only on the control path.

use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use crossbeam_channel::{Receiver, Sender, TrySendError};
use crate::config::Config;
use crate::core::CoreMsg;
use crate::metrics::Metrics;
use crate::policy::Policy;
use crate::ratelimit::HandshakeLimiter;
use crate::registry::Registry;
use crate::retry::RetryKey;

/// A datagram that arrived on a worker that does not own it, in a buffer from the sending
/// worker's hand-off pool (returned there after use).
pub struct Handoff {
    pub from: SocketAddr,
    pub buf: HandoffBuf,
    pub len: usize,
    pub pool: u8,
}

/// A buffer for one handed-off datagram.
pub type HandoffBuf = Box<[u8; crate::io::MAX_DATAGRAM]>;
/// Hand-off buffers per worker, allocated at start: a hand-off never allocates, and when
/// every buffer is in flight the datagram is dropped and counted (`handoff_queue_full`).
pub const HANDOFF_BUFFERS: usize = 1024;

/// One worker's pool of hand-off buffers. Any worker may return a buffer to it.
pub struct HandoffPool {
    free_tx: Sender<HandoffBuf>,
    free_rx: Receiver<HandoffBuf>,
}

impl HandoffPool {
    pub fn new() -> Self {
        let (free_tx, free_rx) = crossbeam_channel::bounded(HANDOFF_BUFFERS);
        for _ in 0..HANDOFF_BUFFERS {
            let _ = free_tx.try_send(Box::new([0u8; crate::io::MAX_DATAGRAM]));
        }
        HandoffPool { free_tx, free_rx }
    }

    pub fn take(&self) -> Option<HandoffBuf> {
        self.free_rx.try_recv().ok()
    }

    pub fn give_back(&self, buf: HandoffBuf) {
        let _ = self.free_tx.try_send(buf);
    }
}

impl Default for HandoffPool {
    fn default() -> Self {
        Self::new()
    }
}

/// A worker's inbox. Handed-off datagrams wait in a bounded queue (a flood must not grow
/// memory; past it they are dropped and counted); control messages between workers go in a
/// queue of their own that never refuses, since losing one would strand a session. An
/// eventfd wakes the worker's poll.
pub struct Mailbox {
    datagrams: Sender<Handoff>,
    control: Sender<CoreMsg>,
    wake: OwnedFd,
}

/// The receiving side of a [`Mailbox`], owned by its worker.
pub struct Inbox {
    pub control: Receiver<CoreMsg>,
    pub datagrams: Receiver<Handoff>,
}

pub const MAILBOX_CAPACITY: usize = 8192;

impl Mailbox {
    pub fn new() -> std::io::Result<(Mailbox, Inbox)> {
        // SAFETY: eventfd returns a new descriptor or -1.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let (datagrams, datagrams_rx) = crossbeam_channel::bounded(MAILBOX_CAPACITY);
        let (control, control_rx) = crossbeam_channel::unbounded();
        // SAFETY: fd is a fresh descriptor we own.
        let wake = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok((Mailbox { datagrams, control, wake }, Inbox { control: control_rx, datagrams: datagrams_rx }))
    }

    /// Queues a handed-off datagram and wakes the worker. One that does not fit is handed
    /// back so the caller can count it and recycle its buffer.
    pub fn hand_off(&self, d: Handoff) -> Result<(), Handoff> {
        self.queue(&self.datagrams, d)
    }

    /// Queues a message for the worker's core and wakes it; refused only when the worker
    /// is gone.
    pub fn post(&self, msg: CoreMsg) -> Result<(), CoreMsg> {
        self.queue(&self.control, msg)
    }

    fn queue<T>(&self, queue: &Sender<T>, item: T) -> Result<(), T> {
        match queue.try_send(item) {
            Ok(()) => {
                self.wake();
                Ok(())
            }
            Err(TrySendError::Full(m)) | Err(TrySendError::Disconnected(m)) => Err(m),
        }
    }

    pub fn wake(&self) {
        let one: u64 = 1;
        // SAFETY: writing 8 bytes from a valid u64 to our eventfd.
        unsafe { libc::write(self.wake.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }

    pub fn wake_fd(&self) -> RawFd {
        self.wake.as_raw_fd()
    }
}

pub struct Shared {
    pub workers: u8,
    pub config: Config,
    /// The bound relay address (the port is resolved when the config asked for port 0).
    pub local_addr: SocketAddr,
    pub policy: RwLock<Arc<Policy>>,
    registry: Mutex<Registry>,
    pub retry_key: RetryKey,
    /// Stateless-reset tokens of our connection ids, from the key in the state directory.
    pub reset_key: crate::reset::ResetKey,
    /// New handshakes per source, for the relay as a whole.
    pub limiter: HandshakeLimiter,
    pub metrics: Metrics,
    pub mailboxes: Vec<Mailbox>,
    /// Hand-off buffer pools, one per worker (indexed by the sending worker).
    pub handoff_pools: Vec<HandoffPool>,
    /// Set on SIGTERM: stop accepting, close connections, exit.
    pub draining: AtomicBool,
    /// Bumped after a successful SIGHUP reload; workers rebuild their TLS config.
    pub generation: AtomicU64,
    pub running_workers: AtomicUsize,
    /// The eBPF programs attached for this relay (detached when it goes).
    pub kernel: crate::ebpf::Kernel,
}

impl Shared {
    pub fn new(
        config: Config,
        local_addr: SocketAddr,
        policy: Policy,
        workers: u8,
        mailboxes: Vec<Mailbox>,
        kernel: crate::ebpf::Kernel,
        kernel_counters: crate::ebpf::counters::KernelCounters,
    ) -> Self {
        let mut metrics = Metrics::new(workers as usize);
        // Summed from the programs' per-CPU maps at scrape time.
        metrics.registry.register_collector(Box::new(kernel_counters));
        Shared {
            kernel,
            workers,
            local_addr,
            policy: RwLock::new(Arc::new(policy)),
            registry: Mutex::new(Registry::default()),
            retry_key: RetryKey::random(),
            reset_key: match crate::reset::ResetKey::load_or_create(&config.state_dir) {
                Ok(k) => k,
                Err(e) => {
                    tracing::warn!("{e:#}: stateless resets will not be recognised after a restart");
                    crate::reset::ResetKey::ephemeral()
                }
            },
            limiter: HandshakeLimiter::new(config.limits.handshakes_per_ip_per_sec, config.limits.handshake_burst),
            metrics,
            handoff_pools: (0..workers).map(|_| HandoffPool::new()).collect(),
            mailboxes,
            draining: AtomicBool::new(false),
            generation: AtomicU64::new(0),
            running_workers: AtomicUsize::new(0),
            config,
        }
    }

    pub fn policy(&self) -> Arc<Policy> {
        // A poisoned lock only means a panic elsewhere; the Arc inside is still whole.
        self.policy.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn set_policy(&self, policy: Policy) {
        *self.policy.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(policy);
    }

    pub fn registry(&self) -> MutexGuard<'_, Registry> {
        self.registry.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    pub fn healthy(&self) -> bool {
        !self.is_draining() && self.running_workers.load(Ordering::Relaxed) == self.workers as usize
    }

    pub fn wake_all(&self) {
        self.mailboxes.iter().for_each(Mailbox::wake);
    }
}
