//! io_uring backend: one ring per worker.
//!
//! - Receive: one multishot `RecvMsgMulti` on the worker socket picks buffers from a
//!   registered provided-buffer ring (allocated once, recycled after each batch is handled).
//!   With UDP GRO on, one buffer may hold many coalesced datagrams; the `UDP_GRO` cmsg gives
//!   the segment size and [`GroSegments`] splits them again.
//! - Mailbox: a multishot poll on the eventfd completes in the same ring, so the worker
//!   blocks in one `io_uring_enter` with a timeout (EXT_ARG).
//! - Send: datagrams go into a fixed pool of slots; `flush` turns the queue into `SendMsg`
//!   SQEs (one `submit` for all), joining runs to one destination into UDP GSO sends.

use std::io;
use std::mem;
use std::net::SocketAddr;
use std::os::fd::RawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{Duration, Instant};

use io_uring::types::{BufRingEntry, Fd, RecvMsgOut, SubmitArgs, Timespec};
use io_uring::{IoUring, cqueue, opcode, squeue};

use super::MAX_DATAGRAM;
use super::sockaddr::{from_storage, to_storage};

/// Submission queue size; the completion queue is larger because multishot receive posts
/// many completions per submission.
const SQ_ENTRIES: u32 = 512;
const CQ_ENTRIES: u32 = 4096;
const BGID: u16 = 0;
/// Receive buffers with GRO: each holds a whole coalesced burst (up to 64 KiB). 128 ran dry
/// noticeably more often under a flood (docs/DESIGN.md §4.1).
const RX_BUFS_GRO: u16 = 256;
/// Receive buffers without GRO: one datagram each.
const RX_BUFS_PLAIN: u16 = 1024;
const GRO_PAYLOAD: usize = 65_536;
/// Layout of a buffer: io_uring_recvmsg_out, the source address, the cmsg area, the payload.
const RECVMSG_OUT: usize = 16;
const NAME_LEN: usize = mem::size_of::<libc::sockaddr_storage>();
const CONTROL_LEN: usize = 64;
const RX_HEADROOM: usize = RECVMSG_OUT + NAME_LEN + CONTROL_LEN;
/// Datagrams handed to the worker per receive batch.
pub const RX_BATCH: usize = 128;
/// Send slots (datagram buffers) per worker; a flush happens when they run out.
pub const TX_SLOTS: usize = 256;
/// UDP GSO limits: the kernel accepts 64 segments everywhere and one IP packet's worth of
/// payload (65,535 less the IPv4 and UDP headers).
pub const MAX_GSO_SEGMENTS: usize = 64;
pub const MAX_GSO_BYTES: usize = 65_507;

const UD_RECV: u64 = 1 << 32;
const UD_POLL: u64 = 2 << 32;
const UD_SEND: u64 = 3 << 32;
const UD_CANCEL: u64 = 4 << 32;
const UD_KIND: u64 = 0xffff_ffff << 32;

/// Checks that this kernel and sandbox let the worker use io_uring as this backend does.
/// The error names the reason, for the one warning (auto) or the startup error (uring).
pub fn probe() -> Result<(), String> {
    let ring: IoUring = IoUring::new(8).map_err(|e| match e.raw_os_error() {
        Some(libc::EPERM) => "io_uring_setup returned EPERM: blocked by seccomp, a container policy or kernel.io_uring_disabled".to_string(),
        Some(libc::ENOSYS) => "io_uring_setup returned ENOSYS: the kernel has no io_uring (or seccomp hides it)".to_string(),
        _ => format!("io_uring_setup failed: {e}"),
    })?;
    if !ring.params().is_feature_ext_arg() {
        return Err("the kernel lacks IORING_FEAT_EXT_ARG (needs Linux 5.11+)".into());
    }
    let mut probe = io_uring::Probe::new();
    ring.submitter().register_probe(&mut probe).map_err(|e| format!("io_uring probe failed: {e}"))?;
    for (code, name) in [
        (opcode::RecvMsgMulti::CODE, "RECVMSG"),
        (opcode::SendMsg::CODE, "SENDMSG"),
        (opcode::PollAdd::CODE, "POLL_ADD"),
        (opcode::AsyncCancel::CODE, "ASYNC_CANCEL"),
    ] {
        if !probe.is_supported(code) {
            return Err(format!("io_uring lacks the {name} operation"));
        }
    }
    // Multishot recvmsg arrived in 6.0; there is no opcode to probe for it.
    if let Some((major, minor)) = kernel_version()
        && (major, minor) < (6, 0)
    {
        return Err(format!("Linux {major}.{minor} lacks multishot recvmsg (needs 6.0+)"));
    }
    let mem = RxMem::new(8, 64).map_err(|e| format!("mapping a buffer ring: {e}"))?;
    // SAFETY: the ring memory outlives the registration (unregistered just below).
    unsafe { ring.submitter().register_buf_ring_with_flags(mem.base as u64, 8, BGID, 0) }
        .map_err(|e| format!("registering a provided-buffer ring failed (needs Linux 5.19+): {e}"))?;
    let _ = ring.submitter().unregister_buf_ring(BGID);
    Ok(())
}

fn kernel_version() -> Option<(u32, u32)> {
    // SAFETY: utsname is plain data; uname fills it.
    let mut u: libc::utsname = unsafe { mem::zeroed() };
    // SAFETY: u is a valid utsname.
    if unsafe { libc::uname(&mut u) } != 0 {
        return None;
    }
    let release: Vec<u8> = u.release.iter().take_while(|c| **c != 0).map(|c| *c as u8).collect();
    let text = String::from_utf8_lossy(&release);
    let mut parts = text.split(|c: char| !c.is_ascii_digit());
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

/// The buffer ring and its buffers: one anonymous mapping, page aligned as the kernel wants.
struct RxMem {
    base: *mut u8,
    len: usize,
    ring_bytes: usize,
    buf_size: usize,
    nbufs: u16,
}

// SAFETY: a plain memory region; who writes which buffer when is governed by the ring
// protocol (kernel owns buffers in the ring, the worker owns those it was handed).
unsafe impl Send for RxMem {}
unsafe impl Sync for RxMem {}

impl RxMem {
    fn new(nbufs: u16, buf_size: usize) -> io::Result<RxMem> {
        let ring_bytes = (nbufs as usize * mem::size_of::<BufRingEntry>()).next_multiple_of(4096);
        let len = ring_bytes + nbufs as usize * buf_size;
        // SAFETY: anonymous private mapping; checked below.
        let base = unsafe {
            libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0)
        };
        if base == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(RxMem { base: base.cast(), len, ring_bytes, buf_size, nbufs })
    }

    fn buf(&self, bid: u16) -> *mut u8 {
        // SAFETY: bid < nbufs is checked by callers; the offset stays inside the mapping.
        unsafe { self.base.add(self.ring_bytes + bid as usize * self.buf_size) }
    }
}

impl Drop for RxMem {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what new() mapped.
        unsafe { libc::munmap(self.base.cast(), self.len) };
    }
}

#[derive(Clone, Copy)]
struct Desc {
    bid: u16,
    off: u32,
    len: u32,
    addr: Option<SocketAddr>,
    truncated: bool,
}

/// One receive batch: datagrams that point into provided buffers the worker holds until
/// the next `recv`/`wait`, when they go back to the kernel.
pub struct RxBatch {
    mem: Arc<RxMem>,
    descs: Box<[Desc]>,
    n: usize,
    held: Box<[u16]>,
    nheld: usize,
}

impl RxBatch {
    pub fn len(&self) -> usize {
        self.n
    }

    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    pub fn get(&mut self, i: usize) -> (&mut [u8], Option<SocketAddr>, bool) {
        let d = self.descs[i];
        let bid = if d.bid < self.mem.nbufs { d.bid } else { 0 };
        let len = (d.len as usize).min(self.mem.buf_size.saturating_sub(d.off as usize));
        // SAFETY: the buffer was handed to us by the kernel and is not back in the ring until
        // this batch is released; the segment lies inside it; the &mut self borrow keeps
        // two segments from being handed out at once.
        let buf = unsafe { std::slice::from_raw_parts_mut(self.mem.buf(bid).add(d.off as usize), len) };
        (buf, d.addr, d.truncated)
    }
}

struct SendOp {
    hdr: libc::msghdr,
    iov: [libc::iovec; MAX_GSO_SEGMENTS],
    cmsg: [u64; 4],
    slots: [u16; MAX_GSO_SEGMENTS],
    n: usize,
    gso: bool,
}

pub struct Uring {
    ring: IoUring,
    fd: RawFd,
    wake_fd: RawFd,
    socket_is_v6: bool,
    mem: Arc<RxMem>,
    /// Our copy of the buffer ring's tail, published to the kernel after each recycle round.
    ring_tail: u16,
    /// Buffers the kernel handed out and we have not yet given back.
    bufs_out: usize,
    rx_hdr: Box<libc::msghdr>,
    recv_armed: bool,
    poll_armed: bool,
    woke: bool,
    /// After repeated receive errors, re-arm no sooner than this (no busy loop).
    rx_retry_at: Option<Instant>,
    rx_errors_in_row: u32,
    /// Receive completions reaped (e.g. while waiting for send slots) but not yet handled.
    stash: Box<[(i32, u32)]>,
    stash_head: usize,
    stash_len: usize,
    // Send side.
    slots: Box<[[u8; MAX_DATAGRAM]]>,
    slot_addr: Box<[libc::sockaddr_storage]>,
    slot_addr_len: Box<[libc::socklen_t]>,
    free_slots: Vec<u16>,
    queue: Box<[(SocketAddr, usize)]>,
    queue_slot: Box<[u16]>,
    queued: usize,
    ops: Box<[SendOp]>,
    free_ops: Vec<u16>,
    in_flight: usize,
    gso: bool,
    pub gro: bool,
    pub sent_packets: u64,
    pub sent_bytes: u64,
    pub failed: u64,
    /// Times the buffer ring ran dry (datagrams wait in the socket buffer meanwhile).
    pub rx_no_buffers: u64,
}

// SAFETY: the raw pointers (in msghdrs and the mapping) point into memory owned by this
// struct or its Arc'd mapping; the ring moves with the struct to the worker thread.
unsafe impl Send for Uring {}
unsafe impl Send for RxBatch {}

impl Uring {
    pub fn new(fd: RawFd, socket_is_v6: bool, wake_fd: RawFd) -> io::Result<Uring> {
        let ring = IoUring::builder()
            .setup_cqsize(CQ_ENTRIES)
            .setup_coop_taskrun()
            .setup_taskrun_flag()
            .build(SQ_ENTRIES)
            .or_else(|_| IoUring::builder().setup_cqsize(CQ_ENTRIES).build(SQ_ENTRIES))?;
        let gro = set_gro(fd);
        let (nbufs, payload) = if gro { (RX_BUFS_GRO, GRO_PAYLOAD) } else { (RX_BUFS_PLAIN, MAX_DATAGRAM) };
        let mem = Arc::new(RxMem::new(nbufs, RX_HEADROOM + payload)?);
        // SAFETY: the mapping lives in self.mem until after Drop unregisters it.
        unsafe { ring.submitter().register_buf_ring_with_flags(mem.base as u64, nbufs, BGID, 0)? };
        // SAFETY: all-zero is a valid msghdr; only the name and control lengths matter here.
        let mut rx_hdr: Box<libc::msghdr> = Box::new(unsafe { mem::zeroed() });
        rx_hdr.msg_namelen = NAME_LEN as libc::socklen_t;
        rx_hdr.msg_controllen = CONTROL_LEN;
        // SAFETY: plain C structs, all-zero valid.
        let zero_ss: libc::sockaddr_storage = unsafe { mem::zeroed() };
        let zero_op = || SendOp {
            // SAFETY: as above.
            hdr: unsafe { mem::zeroed() },
            iov: [libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 }; MAX_GSO_SEGMENTS],
            cmsg: [0; 4],
            slots: [0; MAX_GSO_SEGMENTS],
            n: 0,
            gso: false,
        };
        let unspecified: SocketAddr = SocketAddr::from(([0, 0, 0, 0], 0));
        let mut u = Uring {
            ring,
            fd,
            wake_fd,
            socket_is_v6,
            ring_tail: 0,
            bufs_out: nbufs as usize,
            rx_hdr,
            recv_armed: false,
            poll_armed: false,
            woke: false,
            rx_retry_at: None,
            rx_errors_in_row: 0,
            stash: vec![(0, 0); nbufs as usize].into_boxed_slice(),
            stash_head: 0,
            stash_len: 0,
            slots: vec![[0u8; MAX_DATAGRAM]; TX_SLOTS].into_boxed_slice(),
            slot_addr: vec![zero_ss; TX_SLOTS].into_boxed_slice(),
            slot_addr_len: vec![0; TX_SLOTS].into_boxed_slice(),
            free_slots: (0..TX_SLOTS as u16).rev().collect(),
            queue: vec![(unspecified, 0); TX_SLOTS].into_boxed_slice(),
            queue_slot: vec![0; TX_SLOTS].into_boxed_slice(),
            queued: 0,
            ops: (0..TX_SLOTS).map(|_| zero_op()).collect(),
            free_ops: (0..TX_SLOTS as u16).rev().collect(),
            in_flight: 0,
            gso: true,
            gro,
            mem,
            sent_packets: 0,
            sent_bytes: 0,
            failed: 0,
            rx_no_buffers: 0,
        };
        for bid in 0..nbufs {
            u.recycle(bid);
        }
        u.publish();
        Ok(u)
    }

    pub fn rx_batch(&self) -> RxBatch {
        let empty = Desc { bid: 0, off: 0, len: 0, addr: None, truncated: false };
        RxBatch {
            mem: self.mem.clone(),
            descs: vec![empty; RX_BATCH].into_boxed_slice(),
            n: 0,
            held: vec![0; RX_BATCH].into_boxed_slice(),
            nheld: 0,
        }
    }

    /// Puts buffer `bid` back at the ring's tail (visible to the kernel after `publish`).
    fn recycle(&mut self, bid: u16) {
        let mem = &self.mem;
        if bid >= mem.nbufs {
            return;
        }
        let mask = mem.nbufs - 1;
        // SAFETY: entry index < nbufs, inside the ring area of the mapping. Entry 0's `resv`
        // is the ring tail; the setters below leave it alone.
        let entry = unsafe { &mut *(mem.base as *mut BufRingEntry).add((self.ring_tail & mask) as usize) };
        entry.set_addr(mem.buf(bid) as u64);
        entry.set_len(mem.buf_size as u32);
        entry.set_bid(bid);
        self.ring_tail = self.ring_tail.wrapping_add(1);
        self.bufs_out = self.bufs_out.saturating_sub(1);
    }

    fn publish(&self) {
        // SAFETY: the tail lives in entry 0 of the mapped ring; the kernel reads it with acquire.
        let tail = unsafe { &*(BufRingEntry::tail(self.mem.base as *const BufRingEntry) as *const AtomicU16) };
        tail.store(self.ring_tail, Ordering::Release);
    }

    fn release(&mut self, rx: &mut RxBatch) {
        if rx.nheld == 0 {
            rx.n = 0;
            return;
        }
        for i in 0..rx.nheld {
            self.recycle(rx.held[i]);
        }
        rx.nheld = 0;
        rx.n = 0;
        self.publish();
    }

    fn push_sqe(&mut self, entry: &squeue::Entry) {
        for _ in 0..64 {
            // SAFETY: every pointer in our entries refers to memory owned by self (msghdrs,
            // iovecs, slots, the mapping) that stays put until the completion is reaped.
            if unsafe { self.ring.submission().push(entry) }.is_ok() {
                return;
            }
            // Full: hand the queue to the kernel and retry.
            let _ = self.ring.submit();
        }
    }

    fn arm(&mut self) {
        if !self.recv_armed
            && self.bufs_out < self.mem.nbufs as usize
            && self.rx_retry_at.is_none_or(|t| Instant::now() >= t)
        {
            let e = opcode::RecvMsgMulti::new(Fd(self.fd), &*self.rx_hdr as *const libc::msghdr, BGID)
                .build()
                .user_data(UD_RECV);
            self.push_sqe(&e);
            self.recv_armed = true;
        }
        if !self.poll_armed {
            let e = opcode::PollAdd::new(Fd(self.wake_fd), libc::POLLIN as u32).multi(true).build().user_data(UD_POLL);
            self.push_sqe(&e);
            self.poll_armed = true;
        }
    }

    /// Blocks (one `io_uring_enter`) until a datagram or the mailbox is ready or `timeout`
    /// passes. True when the mailbox eventfd fired; it is drained then.
    pub fn wait(&mut self, rx: &mut RxBatch, timeout: Duration) -> bool {
        self.release(rx);
        self.arm();
        let mut timeout = timeout.min(Duration::from_secs(1));
        if let Some(t) = self.rx_retry_at {
            timeout = timeout.min(t.saturating_duration_since(Instant::now()));
        }
        let ready = self.stash_len > 0 || !self.ring.completion().is_empty();
        let res = if ready || timeout.is_zero() {
            self.ring.submit()
        } else {
            let ts = Timespec::new().sec(timeout.as_secs()).nsec(timeout.subsec_nanos());
            let args = SubmitArgs::new().timespec(&ts);
            self.ring.submitter().submit_with_args(1, &args)
        };
        if let Err(e) = res
            && !matches!(e.raw_os_error(), Some(libc::ETIME | libc::EINTR | libc::EBUSY | libc::EAGAIN))
        {
            tracing::warn!(error = %e, "io_uring_enter failed");
        }
        self.reap();
        let woke = mem::take(&mut self.woke);
        if woke {
            super::drain_eventfd(self.wake_fd);
        }
        woke
    }

    /// Hands the worker the next batch of received datagrams (recycling the previous
    /// batch's buffers first). Returns how many, and whether more are already waiting.
    pub fn recv(&mut self, rx: &mut RxBatch) -> (usize, bool) {
        self.release(rx);
        self.reap();
        if self.stash_len == 0 && (self.ring.submission().taskrun() || !self.recv_armed) {
            // Completions may wait as deferred task work, or receive needs re-arming.
            self.arm();
            let _ = self.ring.submit();
            self.reap();
        }
        let mem = self.mem.clone();
        let mut recycled = false;
        while self.stash_len > 0 && rx.n < RX_BATCH {
            let (res, flags) = self.stash[self.stash_head];
            let Some(bid) = cqueue::buffer_select(flags).filter(|b| *b < mem.nbufs) else {
                self.stash_pop();
                continue;
            };
            let base = mem.buf(bid);
            let filled = (res.max(0) as usize).min(mem.buf_size);
            // SAFETY: the kernel wrote `filled` bytes into buffer `bid`, which is ours until recycled.
            let whole = unsafe { std::slice::from_raw_parts(base as *const u8, filled) };
            let Ok(out) = RecvMsgOut::parse(whole, &self.rx_hdr) else {
                // Not even a header: count it as one malformed datagram.
                self.stash_pop();
                self.recycle(bid);
                recycled = true;
                rx.descs[rx.n] = Desc { bid, off: 0, len: 0, addr: None, truncated: true };
                rx.n += 1;
                continue;
            };
            let payload = out.payload_data();
            let off = payload.as_ptr() as usize - base as usize;
            let len = payload.len();
            let truncated = out.is_payload_truncated();
            let addr = if out.is_name_data_truncated() { None } else { name_to_addr(out.name_data()) };
            let seg = if truncated { 0 } else { gro_segment_size(out.control_data()).unwrap_or(0) };
            let count = gro_count(len, seg);
            let room = RX_BATCH - rx.n;
            if count > room && rx.n > 0 {
                break; // next batch
            }
            self.stash_pop();
            rx.held[rx.nheld] = bid;
            rx.nheld += 1;
            for (o, l) in GroSegments::new(len, seg).take(room) {
                rx.descs[rx.n] = Desc { bid, off: (off + o) as u32, len: l as u32, addr, truncated };
                rx.n += 1;
            }
        }
        if recycled {
            self.publish();
        }
        (rx.n, self.stash_len > 0)
    }

    fn stash_pop(&mut self) {
        self.stash_head = (self.stash_head + 1) % self.stash.len();
        self.stash_len -= 1;
    }

    /// Handles every completion in the queue: sends are accounted, receives stashed.
    fn reap(&mut self) {
        loop {
            let Some(cqe) = self.ring.completion().next() else { break };
            let (ud, res, flags) = (cqe.user_data(), cqe.result(), cqe.flags());
            match ud & UD_KIND {
                UD_RECV => self.on_recv(res, flags),
                UD_POLL => {
                    // Any outcome (even an error) means: look at the mailbox.
                    self.woke |= res != -libc::ECANCELED;
                    if !cqueue::more(flags) {
                        self.poll_armed = false;
                    }
                }
                UD_SEND => self.on_send((ud & 0xffff) as usize, res),
                _ => {}
            }
        }
    }

    fn on_recv(&mut self, res: i32, flags: u32) {
        if !cqueue::more(flags) {
            self.recv_armed = false;
        }
        if let Some(bid) = cqueue::buffer_select(flags) {
            self.bufs_out += 1;
            if self.stash_len == self.stash.len() {
                // Cannot happen (one slot per buffer); give the buffer back rather than leak it.
                self.recycle(bid);
                self.publish();
                return;
            }
            let i = (self.stash_head + self.stash_len) % self.stash.len();
            self.stash[i] = (res, flags);
            self.stash_len += 1;
            self.rx_errors_in_row = 0;
            self.rx_retry_at = None;
            return;
        }
        match -res {
            0 => {}
            libc::ENOBUFS => self.rx_no_buffers += 1,
            libc::ECANCELED => {}
            errno => {
                self.rx_errors_in_row += 1;
                if self.rx_errors_in_row == 1 || self.rx_errors_in_row.is_power_of_two() {
                    tracing::warn!(error = %io::Error::from_raw_os_error(errno), times = self.rx_errors_in_row, "io_uring receive failed");
                }
                if self.rx_errors_in_row > 2 {
                    self.rx_retry_at = Some(Instant::now() + Duration::from_millis(50));
                }
            }
        }
    }

    fn on_send(&mut self, op: usize, res: i32) {
        let Some(o) = self.ops.get(op) else { return };
        let (n, gso) = (o.n, o.gso);
        self.in_flight = self.in_flight.saturating_sub(1);
        if res >= 0 {
            self.sent_packets += n as u64;
            self.sent_bytes += res as u64;
        } else if gso && self.gso && matches!(-res, libc::EIO | libc::EINVAL | libc::EOPNOTSUPP) {
            // The path cannot segment (no checksum offload, MTU): send these one by one.
            self.gso = false;
            tracing::warn!(error = %io::Error::from_raw_os_error(-res), "UDP GSO send failed: sending datagrams one by one from now on");
            for k in 0..n {
                let slot = self.ops[op].slots[k];
                let qi = self.queued;
                if qi < self.queue.len() {
                    self.queue[qi] = (self.queue_dest(slot), self.ops[op].iov[k].iov_len);
                    self.queue_slot[qi] = slot;
                    self.queued += 1;
                } else {
                    self.failed += 1;
                    self.free_slots.push(slot);
                }
            }
            self.free_ops.push(op as u16);
            return;
        } else {
            self.failed += n as u64;
        }
        for k in 0..n {
            self.free_slots.push(self.ops[op].slots[k]);
        }
        self.free_ops.push(op as u16);
    }

    fn queue_dest(&self, slot: u16) -> SocketAddr {
        from_storage(&self.slot_addr[slot as usize]).unwrap_or(SocketAddr::from(([0, 0, 0, 0], 0)))
    }

    /// A free send slot, flushing and reaping completions when the pool is exhausted.
    fn take_slot(&mut self) -> Option<u16> {
        if let Some(s) = self.free_slots.pop() {
            return Some(s);
        }
        self.flush();
        for _ in 0..10 {
            if let Some(s) = self.free_slots.pop() {
                return Some(s);
            }
            let ts = Timespec::new().nsec(1_000_000);
            let args = SubmitArgs::new().timespec(&ts);
            let _ = self.ring.submitter().submit_with_args(1, &args);
            self.reap();
        }
        self.free_slots.pop()
    }

    fn enqueue(&mut self, slot: u16, to: SocketAddr, len: usize) {
        let s = slot as usize;
        self.slot_addr_len[s] = to_storage(&to, self.socket_is_v6, &mut self.slot_addr[s]);
        self.queue[self.queued] = (to, len);
        self.queue_slot[self.queued] = slot;
        self.queued += 1;
    }

    pub fn push_with(&mut self, to: SocketAddr, fill: impl FnOnce(&mut [u8]) -> usize) -> usize {
        let Some(slot) = self.take_slot() else {
            self.failed += 1;
            return 0;
        };
        let len = fill(&mut self.slots[slot as usize][..]).min(MAX_DATAGRAM);
        if len == 0 {
            self.free_slots.push(slot);
            return 0;
        }
        self.enqueue(slot, to, len);
        len
    }

    pub fn push_dynamic(&mut self, fill: impl FnOnce(&mut [u8]) -> Option<(usize, SocketAddr)>) -> bool {
        let Some(slot) = self.take_slot() else {
            self.failed += 1;
            return false;
        };
        let Some((len, to)) = fill(&mut self.slots[slot as usize][..]) else {
            self.free_slots.push(slot);
            return false;
        };
        self.enqueue(slot, to, len.min(MAX_DATAGRAM));
        true
    }

    pub fn pending(&self) -> usize {
        self.queued
    }

    /// Turns the queue into SendMsg SQEs (GSO runs joined), submits them in one call, and
    /// reaps whatever has completed.
    pub fn flush(&mut self) {
        // A second round only for datagrams requeued by a failed GSO send.
        for _ in 0..2 {
            if self.queued == 0 {
                break;
            }
            let mut i = 0;
            while i < self.queued {
                let run = if self.gso { gso_run(&self.queue[i..self.queued], MAX_GSO_SEGMENTS, MAX_GSO_BYTES) } else { 1 };
                let run = run.max(1);
                let Some(op) = self.free_ops.pop() else {
                    // Ops match slots one to one, so this cannot happen; drop rather than stall.
                    for k in i..i + run {
                        self.free_slots.push(self.queue_slot[k]);
                    }
                    self.failed += run as u64;
                    i += run;
                    continue;
                };
                self.build_op(op as usize, i, run);
                let e = opcode::SendMsg::new(Fd(self.fd), &self.ops[op as usize].hdr as *const libc::msghdr)
                    .flags(libc::MSG_DONTWAIT as u32)
                    .build()
                    .user_data(UD_SEND | op as u64);
                self.push_sqe(&e);
                self.in_flight += 1;
                i += run;
            }
            self.queued = 0;
            if let Err(e) = self.ring.submit()
                && !matches!(e.raw_os_error(), Some(libc::EINTR | libc::EBUSY | libc::EAGAIN))
            {
                tracing::warn!(error = %e, "io_uring submit failed");
            }
            self.reap();
        }
    }

    fn build_op(&mut self, op: usize, start: usize, run: usize) {
        let first = self.queue_slot[start] as usize;
        let seg = self.queue[start].1;
        let o = &mut self.ops[op];
        for k in 0..run {
            let slot = self.queue_slot[start + k];
            let len = self.queue[start + k].1;
            o.iov[k] = libc::iovec { iov_base: self.slots[slot as usize].as_mut_ptr().cast(), iov_len: len };
            o.slots[k] = slot;
        }
        o.n = run;
        o.gso = run > 1;
        o.hdr.msg_name = (&mut self.slot_addr[first] as *mut libc::sockaddr_storage).cast();
        o.hdr.msg_namelen = self.slot_addr_len[first];
        o.hdr.msg_iov = o.iov.as_mut_ptr();
        o.hdr.msg_iovlen = run;
        o.hdr.msg_flags = 0;
        if run > 1 {
            let c = o.cmsg.as_mut_ptr().cast::<libc::cmsghdr>();
            // SAFETY: cmsg is 32 bytes, 8-aligned: room for CMSG_SPACE(2) = 24.
            unsafe {
                (*c).cmsg_len = libc::CMSG_LEN(mem::size_of::<u16>() as u32) as usize;
                (*c).cmsg_level = libc::SOL_UDP;
                (*c).cmsg_type = libc::UDP_SEGMENT;
                libc::CMSG_DATA(c).cast::<u16>().write_unaligned(seg as u16);
                o.hdr.msg_controllen = libc::CMSG_SPACE(mem::size_of::<u16>() as u32) as usize;
            }
            o.hdr.msg_control = c.cast();
        } else {
            o.hdr.msg_control = std::ptr::null_mut();
            o.hdr.msg_controllen = 0;
        }
    }
}

impl Drop for Uring {
    fn drop(&mut self) {
        // Cancel the multishot operations and let in-flight sends finish, so the kernel is
        // done with our buffers before they are unmapped.
        for target in [UD_RECV, UD_POLL] {
            let e = opcode::AsyncCancel::new(target).build().user_data(UD_CANCEL);
            self.push_sqe(&e);
        }
        let deadline = Instant::now() + Duration::from_millis(500);
        while (self.recv_armed || self.poll_armed || self.in_flight > 0) && Instant::now() < deadline {
            let ts = Timespec::new().nsec(10_000_000);
            let args = SubmitArgs::new().timespec(&ts);
            let _ = self.ring.submitter().submit_with_args(1, &args);
            self.reap();
        }
        let _ = self.ring.submitter().unregister_buf_ring(BGID);
    }
}

/// Turns on UDP GRO for the socket; false when the kernel refuses.
fn set_gro(fd: RawFd) -> bool {
    let on: libc::c_int = 1;
    // SAFETY: setsockopt with a valid int option value.
    let r = unsafe {
        libc::setsockopt(fd, libc::SOL_UDP, libc::UDP_GRO, (&on as *const libc::c_int).cast(), mem::size_of::<libc::c_int>() as libc::socklen_t)
    };
    r == 0
}

fn name_to_addr(name: &[u8]) -> Option<SocketAddr> {
    // SAFETY: all-zero is a valid sockaddr_storage.
    let mut ss: libc::sockaddr_storage = unsafe { mem::zeroed() };
    let n = name.len().min(mem::size_of::<libc::sockaddr_storage>());
    // SAFETY: copying n <= size_of(ss) bytes into ss.
    unsafe { std::ptr::copy_nonoverlapping(name.as_ptr(), (&mut ss as *mut libc::sockaddr_storage).cast::<u8>(), n) };
    from_storage(&ss)
}

/// The `UDP_GRO` segment size in a received control area, if present.
pub fn gro_segment_size(control: &[u8]) -> Option<usize> {
    let hdr = mem::size_of::<libc::cmsghdr>();
    let align = mem::size_of::<usize>();
    let mut off = 0;
    while off + hdr <= control.len() {
        // SAFETY: hdr bytes are in bounds; read unaligned since the area has no alignment guarantee.
        let c: libc::cmsghdr = unsafe { control.as_ptr().add(off).cast::<libc::cmsghdr>().read_unaligned() };
        let clen = c.cmsg_len;
        if clen < hdr || off + clen > control.len() {
            return None;
        }
        if c.cmsg_level == libc::SOL_UDP && c.cmsg_type == libc::UDP_GRO && clen >= hdr + 2 {
            let data = &control[off + hdr..off + clen];
            let v = if data.len() >= 4 {
                i32::from_ne_bytes([data[0], data[1], data[2], data[3]]) as i64
            } else {
                u16::from_ne_bytes([data[0], data[1]]) as i64
            };
            return (v > 0).then_some(v as usize);
        }
        off += clen.next_multiple_of(align);
    }
    None
}

/// How many datagrams a GRO buffer of `len` bytes with segment size `seg` holds.
pub fn gro_count(len: usize, seg: usize) -> usize {
    if seg == 0 || seg >= len { 1 } else { len.div_ceil(seg) }
}

/// The (offset, length) of each datagram in a GRO buffer: `seg`-sized pieces, the last
/// possibly shorter. `seg == 0` means not coalesced: one datagram.
pub struct GroSegments {
    off: usize,
    len: usize,
    seg: usize,
    first: bool,
}

impl GroSegments {
    pub fn new(len: usize, seg: usize) -> Self {
        GroSegments { off: 0, len, seg: if seg == 0 { len.max(1) } else { seg }, first: true }
    }
}

impl Iterator for GroSegments {
    type Item = (usize, usize);
    fn next(&mut self) -> Option<(usize, usize)> {
        // An empty datagram is still one datagram.
        if self.first && self.len == 0 {
            self.first = false;
            return Some((0, 0));
        }
        self.first = false;
        if self.off >= self.len {
            return None;
        }
        let l = self.seg.min(self.len - self.off);
        let item = (self.off, l);
        self.off += l;
        Some(item)
    }
}

/// Length of the GSO run at the head of `items` (destination, length): datagrams to one
/// destination, all as long as the first except possibly a shorter last one, at most
/// `max_segs` of them and `max_bytes` in all. Always at least 1 for a non-empty queue.
pub fn gso_run<K: PartialEq>(items: &[(K, usize)], max_segs: usize, max_bytes: usize) -> usize {
    let Some((dest, seg)) = items.first() else { return 0 };
    let seg = *seg;
    let mut n = 1;
    let mut total = seg;
    while n < items.len() && n < max_segs {
        let (d, len) = &items[n];
        if d != dest || *len > seg || *len == 0 || total + len > max_bytes {
            break;
        }
        n += 1;
        total += len;
        if *len < seg {
            break; // a shorter datagram ends the run
        }
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gro_splits_into_segments_with_a_short_tail() {
        let v: Vec<_> = GroSegments::new(3000, 1200).collect();
        assert_eq!(v, vec![(0, 1200), (1200, 1200), (2400, 600)]);
        assert_eq!(gro_count(3000, 1200), 3);
        let v: Vec<_> = GroSegments::new(2400, 1200).collect();
        assert_eq!(v, vec![(0, 1200), (1200, 1200)]);
        assert_eq!(gro_count(2400, 1200), 2);
    }

    #[test]
    fn gro_without_segment_size_is_one_datagram() {
        assert_eq!(GroSegments::new(900, 0).collect::<Vec<_>>(), vec![(0, 900)]);
        assert_eq!(GroSegments::new(900, 1200).collect::<Vec<_>>(), vec![(0, 900)]);
        assert_eq!(GroSegments::new(0, 0).collect::<Vec<_>>(), vec![(0, 0)]);
        assert_eq!(gro_count(900, 0), 1);
        assert_eq!(gro_count(0, 0), 1);
    }

    #[test]
    fn gro_cmsg_is_found_among_others() {
        let hdr = mem::size_of::<libc::cmsghdr>();
        let mut area = vec![0u8; 64];
        // First a cmsg of another kind (8 data bytes), then UDP_GRO with an int.
        let put = |area: &mut [u8], off: usize, level: i32, ty: i32, data: &[u8]| {
            let c = libc::cmsghdr { cmsg_len: hdr + data.len(), cmsg_level: level, cmsg_type: ty };
            // SAFETY: writing a cmsghdr inside the test buffer.
            unsafe { area.as_mut_ptr().add(off).cast::<libc::cmsghdr>().write_unaligned(c) };
            area[off + hdr..off + hdr + data.len()].copy_from_slice(data);
            (hdr + data.len()).next_multiple_of(8)
        };
        let next = put(&mut area, 0, libc::SOL_SOCKET, libc::SO_TIMESTAMP, &[1; 8]);
        put(&mut area, next, libc::SOL_UDP, libc::UDP_GRO, &1200i32.to_ne_bytes());
        assert_eq!(gro_segment_size(&area), Some(1200));
        assert_eq!(gro_segment_size(&area[..next]), None);
        assert_eq!(gro_segment_size(&[]), None);
        // A corrupt length ends the walk without panicking.
        let mut bad = area.clone();
        bad[0] = 0xff;
        assert_eq!(gro_segment_size(&bad), None);
    }

    #[test]
    fn gso_runs_group_same_destination_and_size() {
        let (a, b) = ("a", "b");
        assert_eq!(gso_run::<&str>(&[], 64, 65_507), 0);
        assert_eq!(gso_run(&[(a, 1200)], 64, 65_507), 1);
        assert_eq!(gso_run(&[(a, 1200), (a, 1200), (a, 1200), (b, 1200)], 64, 65_507), 3);
        // A shorter datagram may end a run; a longer one may not join it.
        assert_eq!(gso_run(&[(a, 1200), (a, 1200), (a, 500), (a, 1200)], 64, 65_507), 3);
        assert_eq!(gso_run(&[(a, 500), (a, 1200)], 64, 65_507), 1);
        // Segment and byte limits.
        let many = vec![(a, 100); 100];
        assert_eq!(gso_run(&many, 64, 65_507), 64);
        let big = vec![(a, 1500); 60];
        // 43 x 1500 = 64,500 fits; a 44th would pass 65,507.
        assert_eq!(gso_run(&big, 64, 65_507), 43);
    }
}
