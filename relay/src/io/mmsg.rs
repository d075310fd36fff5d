//! recvmmsg/sendmmsg backend: one syscall moves up to [`BATCH`] datagrams each way.

use std::io;
use std::mem;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::time::Duration;

use super::sockaddr::{from_storage, to_storage};
use super::{BATCH, MAX_DATAGRAM};

/// Received datagrams of one batch, in buffers allocated once.
pub struct RxBatch {
    bufs: Box<[[u8; MAX_DATAGRAM]]>,
    addrs: Box<[libc::sockaddr_storage]>,
    iovecs: Box<[libc::iovec]>,
    hdrs: Box<[libc::mmsghdr]>,
    count: usize,
}

impl Default for RxBatch {
    fn default() -> Self {
        Self::new()
    }
}

impl RxBatch {
    pub fn new() -> Self {
        // SAFETY: all-zero is a valid value for these plain C structs.
        let zeroed_hdr: libc::mmsghdr = unsafe { mem::zeroed() };
        let zeroed_ss: libc::sockaddr_storage = unsafe { mem::zeroed() };
        RxBatch {
            bufs: vec![[0u8; MAX_DATAGRAM]; BATCH].into_boxed_slice(),
            addrs: vec![zeroed_ss; BATCH].into_boxed_slice(),
            iovecs: vec![libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 }; BATCH].into_boxed_slice(),
            hdrs: vec![zeroed_hdr; BATCH].into_boxed_slice(),
            count: 0,
        }
    }

    /// Receives up to a batch without blocking. Returns the number received (0: nothing ready).
    pub fn recv(&mut self, fd: RawFd) -> io::Result<usize> {
        for i in 0..BATCH {
            self.iovecs[i] = libc::iovec { iov_base: self.bufs[i].as_mut_ptr().cast(), iov_len: MAX_DATAGRAM };
            let h = &mut self.hdrs[i].msg_hdr;
            h.msg_name = (&mut self.addrs[i] as *mut libc::sockaddr_storage).cast();
            h.msg_namelen = mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            h.msg_iov = &mut self.iovecs[i];
            h.msg_iovlen = 1;
            h.msg_control = std::ptr::null_mut();
            h.msg_controllen = 0;
            h.msg_flags = 0;
            self.hdrs[i].msg_len = 0;
        }
        // SAFETY: every header points into buffers owned by self that outlive the call.
        let n = unsafe {
            libc::recvmmsg(fd, self.hdrs.as_mut_ptr(), BATCH as u32, libc::MSG_DONTWAIT, std::ptr::null_mut())
        };
        if n < 0 {
            let err = io::Error::last_os_error();
            self.count = 0;
            return match err.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(0),
                _ => Err(err),
            };
        }
        self.count = n as usize;
        Ok(self.count)
    }

    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Datagram `i`: its bytes (mutable: quiche decrypts in place), its source, and whether
    /// the kernel truncated it.
    pub fn get(&mut self, i: usize) -> (&mut [u8], Option<SocketAddr>, bool) {
        let len = (self.hdrs[i].msg_len as usize).min(MAX_DATAGRAM);
        let truncated = self.hdrs[i].msg_hdr.msg_flags & libc::MSG_TRUNC != 0;
        (&mut self.bufs[i][..len], from_storage(&self.addrs[i]), truncated)
    }
}

/// Outgoing datagrams, flushed with sendmmsg when full or at the end of a loop turn.
pub struct TxQueue {
    fd: RawFd,
    socket_is_v6: bool,
    bufs: Box<[[u8; MAX_DATAGRAM]]>,
    lens: Box<[usize]>,
    addrs: Box<[libc::sockaddr_storage]>,
    addr_lens: Box<[libc::socklen_t]>,
    iovecs: Box<[libc::iovec]>,
    hdrs: Box<[libc::mmsghdr]>,
    count: usize,
    /// Totals since start, read by the worker for metrics.
    pub sent_packets: u64,
    pub sent_bytes: u64,
    pub failed: u64,
}

impl TxQueue {
    pub fn new(socket: &impl AsRawFd, socket_is_v6: bool) -> Self {
        // SAFETY: all-zero is a valid value for these plain C structs.
        let zeroed_hdr: libc::mmsghdr = unsafe { mem::zeroed() };
        let zeroed_ss: libc::sockaddr_storage = unsafe { mem::zeroed() };
        TxQueue {
            fd: socket.as_raw_fd(),
            socket_is_v6,
            bufs: vec![[0u8; MAX_DATAGRAM]; BATCH].into_boxed_slice(),
            lens: vec![0; BATCH].into_boxed_slice(),
            addrs: vec![zeroed_ss; BATCH].into_boxed_slice(),
            addr_lens: vec![0; BATCH].into_boxed_slice(),
            iovecs: vec![libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 }; BATCH].into_boxed_slice(),
            hdrs: vec![zeroed_hdr; BATCH].into_boxed_slice(),
            count: 0,
            sent_packets: 0,
            sent_bytes: 0,
            failed: 0,
        }
    }

    /// Queues one datagram to `to`, written by `fill` into a buffer of [`MAX_DATAGRAM`]
    /// bytes; `fill` returns the length (0 cancels). Flushes first when the queue is full.
    pub fn push_with(&mut self, to: SocketAddr, fill: impl FnOnce(&mut [u8]) -> usize) -> usize {
        if self.count == BATCH {
            self.flush();
        }
        let i = self.count;
        let len = fill(&mut self.bufs[i][..]).min(MAX_DATAGRAM);
        if len == 0 {
            return 0;
        }
        self.lens[i] = len;
        self.addr_lens[i] = to_storage(&to, self.socket_is_v6, &mut self.addrs[i]);
        self.count += 1;
        len
    }

    /// Queues a datagram whose destination is known only once written (QUIC's `send`):
    /// `fill` returns its length and destination, or `None` when it has nothing to send.
    pub fn push_dynamic(&mut self, fill: impl FnOnce(&mut [u8]) -> Option<(usize, SocketAddr)>) -> bool {
        if self.count == BATCH {
            self.flush();
        }
        let i = self.count;
        let Some((len, to)) = fill(&mut self.bufs[i][..]) else { return false };
        self.lens[i] = len.min(MAX_DATAGRAM);
        self.addr_lens[i] = to_storage(&to, self.socket_is_v6, &mut self.addrs[i]);
        self.count += 1;
        true
    }

    pub fn pending(&self) -> usize {
        self.count
    }

    /// Sends everything queued. Datagrams the kernel will not take now (full buffer) are
    /// dropped and counted in `failed`: UDP, and QUIC retransmits.
    pub fn flush(&mut self) {
        let mut start = 0;
        for i in 0..self.count {
            self.iovecs[i] = libc::iovec { iov_base: self.bufs[i].as_mut_ptr().cast(), iov_len: self.lens[i] };
            let h = &mut self.hdrs[i].msg_hdr;
            h.msg_name = (&mut self.addrs[i] as *mut libc::sockaddr_storage).cast();
            h.msg_namelen = self.addr_lens[i];
            h.msg_iov = &mut self.iovecs[i];
            h.msg_iovlen = 1;
            h.msg_control = std::ptr::null_mut();
            h.msg_controllen = 0;
            h.msg_flags = 0;
        }
        while start < self.count {
            // SAFETY: headers [start, count) point into buffers owned by self.
            let n = unsafe {
                libc::sendmmsg(self.fd, self.hdrs[start..].as_mut_ptr(), (self.count - start) as u32, libc::MSG_DONTWAIT)
            };
            if n <= 0 {
                let err = io::Error::last_os_error();
                if n < 0 && err.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                // Would block, or this one datagram is unsendable (e.g. no route): skip it.
                self.failed += 1;
                start += 1;
                continue;
            }
            for i in start..start + n as usize {
                self.sent_packets += 1;
                self.sent_bytes += self.lens[i] as u64;
            }
            start += n as usize;
        }
        self.count = 0;
    }
}

/// Waits until the socket or the mailbox is readable, or `wait` passes. True when the
/// mailbox's eventfd fired (only then is it worth a read to reset it).
pub fn poll_two(sock: RawFd, wake: RawFd, wait: Duration) -> bool {
    let mut fds = [
        libc::pollfd { fd: sock, events: libc::POLLIN, revents: 0 },
        libc::pollfd { fd: wake, events: libc::POLLIN, revents: 0 },
    ];
    let ms = wait.as_millis().min(1000) as i32;
    // Round sub-millisecond waits up so a due timer is not spun on.
    let ms = if ms == 0 && !wait.is_zero() { 1 } else { ms };
    // SAFETY: fds is a valid array of two pollfd for the duration of the call.
    unsafe { libc::poll(fds.as_mut_ptr(), 2, ms) };
    fds[1].revents & libc::POLLIN != 0
}

// SAFETY: the raw pointers inside the C headers only ever point into buffers owned by the
// same struct, and are rewritten before each syscall; moving the struct to another thread
// moves its buffers with it (they are boxed, so their addresses do not change).
unsafe impl Send for RxBatch {}
unsafe impl Send for TxQueue {}
