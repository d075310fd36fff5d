//! `ztna-delayline`: a user-space layer-2 delay line for the labs (the kernel here has no
//! `tc netem`).
//!
//! ```text
//! ztna-delayline --a IFACE --b IFACE --delay-ms N [--loss-pct P] [--queue-mib M]
//! ```
//!
//! It bridges two network interfaces of the namespace it runs in: every Ethernet frame that
//! arrives on one is sent out of the other `N` milliseconds later (fractions allowed, 0 is a
//! plain bridge), in both directions, until SIGTERM or SIGINT; then it prints its counters to
//! stderr and exits 0. `--loss-pct P` drops that share of the frames of each direction at
//! random (default 0). `--queue-mib M` is the memory for the frames in flight, per direction
//! (default 32): a frame that arrives while its direction's queue is full is dropped and
//! counted. Once it is forwarding it prints a line starting `ztna-delayline: forwarding`.
//!
//! How: per interface, one AF_PACKET `SOCK_RAW` socket bound to it with `ETH_P_ALL` for
//! receiving (promiscuous, `PACKET_IGNORE_OUTGOING` so it does not read back what the other
//! socket sends there, `PACKET_AUXDATA` for VLAN tags the kernel took out of the frame) and
//! one bound to it with protocol 0 for sending (it receives nothing). One thread per
//! direction owns a FIFO ring of fixed-size frame slots allocated once at start:
//! `recvmmsg` receives a batch straight into the free slots, each frame is stamped with
//! CLOCK_MONOTONIC, and `sendmmsg` sends the frames whose time has come straight from their
//! slots. A constant delay keeps the ring in time order, so the thread only waits (`ppoll`
//! with a nanosecond timeout and a 1 ns timer slack) for the oldest frame's time or for the
//! next frame to arrive, whichever is first.
//!
//! The interfaces need no IP addresses, but the frames must be real frames of at most the MTU
//! (plus the 14-byte Ethernet header and VLAN tags) with their checksums filled in: this
//! program copies bytes and knows nothing of the kernel's offload metadata. So turn the
//! offloads off on both ends of both links, the delay line's interfaces and the hosts':
//!
//! ```text
//! ethtool -K DEV tx off rx off gro off gso off tso off
//! ```
//!
//! Two of these matter (each was seen to break a veth lab; the rest is for simplicity):
//!
//! - `tx` (checksum offload) off **on the hosts' ends**: a frame otherwise crosses the veth
//!   with its TCP/UDP checksum left to "the hardware", and copied out as plain bytes it reaches
//!   the far host with a wrong checksum and is dropped there: not even a TCP SYN gets through
//!   (counted here as "csum-partial", with a warning). TSO needs checksum offload, so this
//!   also keeps TCP from handing the veth super-frames of up to 64 KiB;
//! - `gro` off **on the delay line's ends** (a veth's default, but labs turn it on for XDP):
//!   GRO merges the received frames into super-frames again (frames of 7 KB seen), which are
//!   larger than the buffers and the MTU and are dropped (counted as "oversize", with a
//!   warning); TCP then crawls at well under 1 Mbit/s.
//!
//! Frame buffers are sized from the larger MTU of the two interfaces, read at start. A VLAN
//! tag that the receiving kernel moved out of a frame into its metadata is put back.
//!
//! On exit, per direction: frames and bytes forwarded and received, the drops by cause, how
//! late frames went out (between a frame's due time and its `sendmmsg`: mean, most, and a
//! histogram; the time a frame waited in the receive socket before being stamped comes on
//! top), and the mean batch sizes. The kernel's receive processing of what it sends (the far
//! host's TCP, for a veth) runs in its `sendmmsg` calls and so counts as its CPU time. On a
//! machine whose cores are all busy (the endpoints of a benchmark on the same few cores, other
//! work) its threads wait for a CPU and frames go out late, by a millisecond and more under
//! load; `chrt -f 10 ztna-delayline ...` lets them go first (they sleep whenever nothing is
//! due, but a flood that keeps them busy then also keeps a core from everything else).
//!
//! The delay line's own namespace needs no IPv6 (`sysctl -w
//! net.ipv6.conf.default.disable_ipv6=1` before the interfaces move in), or its kernel speaks
//! on the link too (router and neighbour solicitations), harmless but noise.

use std::ffi::CString;
use std::io;
use std::mem::{size_of, zeroed};
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd};
use std::ptr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

const USAGE: &str = "usage: ztna-delayline --a IFACE --b IFACE --delay-ms N [--loss-pct P] [--queue-mib M]

Copies every Ethernet frame between interfaces IFACE a and b of this network namespace after
N ms (fractions allowed), both directions, until SIGTERM/SIGINT. --loss-pct drops that share
of each direction's frames at random (default 0); --queue-mib is the memory for frames in
flight per direction (default 32). Needs root and offloads off on both ends of both links:
  ethtool -K DEV tx off rx off gro off gso off tso off";

/// Frames per `recvmmsg`/`sendmmsg`.
const BATCH: usize = 64;
/// Room in front of each frame in its slot, to put back a VLAN tag the kernel took out.
const TAG: usize = 4;
const ETH_HLEN: usize = 14;
/// Room for VLAN tags after the Ethernet header, beyond the MTU.
const VLAN_SLACK: usize = 8;
/// Control-message room per received frame (one `tpacket_auxdata`).
const CTRL_WORDS: usize = 8;
const DEFAULT_QUEUE_MIB: usize = 32;
const RCVBUF: libc::c_int = 32 << 20;
const SNDBUF: libc::c_int = 8 << 20;

fn main() {
    let args = match parse_args(std::env::args().skip(1)) {
        Ok(Cli::Run(a)) => a,
        Ok(Cli::Help) => {
            println!("{USAGE}");
            return;
        }
        Err(e) => {
            eprintln!("ztna-delayline: {e}\n{USAGE}");
            std::process::exit(2);
        }
    };
    match run(&args) {
        Ok(true) => {}
        Ok(false) => std::process::exit(1),
        Err(e) => {
            eprintln!("ztna-delayline: {e}");
            std::process::exit(1);
        }
    }
}

struct Args {
    a: String,
    b: String,
    delay_ns: u64,
    loss_pct: f64,
    queue_mib: usize,
}

enum Cli {
    Run(Args),
    Help,
}

fn parse_args(mut it: impl Iterator<Item = String>) -> Result<Cli, String> {
    let (mut a, mut b, mut delay_ms, mut loss_pct, mut queue_mib) = (None, None, None, 0.0, DEFAULT_QUEUE_MIB);
    while let Some(arg) = it.next() {
        let (key, inline) = match arg.split_once('=') {
            Some((k, v)) if k.starts_with("--") => (k.to_string(), Some(v.to_string())),
            _ => (arg.clone(), None),
        };
        if key == "-h" || key == "--help" {
            return Ok(Cli::Help);
        }
        let value = inline.or_else(|| it.next()).ok_or_else(|| format!("{key} needs a value"))?;
        let number = |what: &str| -> Result<f64, String> {
            value.parse::<f64>().ok().filter(|v| v.is_finite() && *v >= 0.0).ok_or_else(|| format!("{what} must be a number >= 0, not {value:?}"))
        };
        match key.as_str() {
            "--a" => a = Some(value),
            "--b" => b = Some(value),
            "--delay-ms" => delay_ms = Some(number("--delay-ms")?),
            "--loss-pct" => loss_pct = number("--loss-pct")?,
            "--queue-mib" => queue_mib = number("--queue-mib")? as usize,
            _ => return Err(format!("unknown argument {arg:?}")),
        }
    }
    let a = a.ok_or("--a IFACE is required")?;
    let b = b.ok_or("--b IFACE is required")?;
    let delay_ms = delay_ms.ok_or("--delay-ms N is required")?;
    if a == b {
        return Err("--a and --b must be different interfaces".into());
    }
    if delay_ms > 600_000.0 {
        return Err("--delay-ms is at most 600000".into());
    }
    if loss_pct > 100.0 {
        return Err("--loss-pct is at most 100".into());
    }
    if !(1..=65_536).contains(&queue_mib) {
        return Err("--queue-mib is 1 to 65536".into());
    }
    Ok(Cli::Run(Args { a, b, delay_ns: (delay_ms * 1e6).round() as u64, loss_pct, queue_mib }))
}

/// Sets up both interfaces, runs the two directions until SIGTERM/SIGINT and prints the
/// counters. `Ok(false)`: a direction failed on the way.
fn run(args: &Args) -> Result<bool, String> {
    // Block the stop signals here, before any thread starts (they inherit the mask): only
    // sigwaitinfo below takes them.
    // SAFETY: plain sigset manipulation on a local set.
    let set = unsafe {
        let mut set: libc::sigset_t = zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, ptr::null_mut());
        set
    };

    let a = Iface::open(&args.a)?;
    let b = Iface::open(&args.b)?;
    let frame_max = a.mtu.max(b.mtu) + ETH_HLEN + VLAN_SLACK;
    let slot = (TAG + frame_max).next_multiple_of(64);
    let cap = ((args.queue_mib << 20) / slot).max(2 * BATCH);
    let loss_threshold = if args.loss_pct >= 100.0 { u64::MAX } else { (args.loss_pct / 100.0 * 2f64.powi(64)) as u64 };
    // SAFETY: eventfd(2) with valid flags; the fd is owned below.
    let stop = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    if stop < 0 {
        return Err(format!("eventfd: {}", io::Error::last_os_error()));
    }
    // SAFETY: a fresh fd that nothing else owns.
    let stop = unsafe { OwnedFd::from_raw_fd(stop) };
    let failed = Arc::new(AtomicBool::new(false));
    let seed = mono_ns() ^ (u64::from(std::process::id()) << 32);

    let (a_name, b_name) = (a.name.clone(), b.name.clone());
    let (a_rx, a_tx, b_rx, b_tx) = (a.rx, a.tx, b.rx, b.tx);
    let directions = [
        Direction { name: format!("{a_name} -> {b_name}"), rx: a_rx, tx: b_tx, seed: seed ^ 0x9e37_79b9_7f4a_7c15 },
        Direction { name: format!("{b_name} -> {a_name}"), rx: b_rx, tx: a_tx, seed: seed ^ 0xc2b2_ae3d_27d4_eb4f },
    ];
    let mut threads = Vec::new();
    for d in directions {
        let stop = stop.as_raw_fd();
        let failed = failed.clone();
        let (delay_ns, name) = (args.delay_ns, d.name.clone());
        let label = d.name.clone();
        let spawned = std::thread::Builder::new().name(format!("dl {}", d.name)).spawn(move || {
            let _wake = WakeMainOnPanic;
            let out = Line::new(d, stop, delay_ns, loss_threshold, slot, cap).run();
            if let Err(e) = &out {
                eprintln!("ztna-delayline: {name}: {e}");
                failed.store(true, Ordering::Relaxed);
                // SAFETY: kill(2) on our own process; the main thread takes it in sigwaitinfo.
                unsafe { libc::kill(libc::getpid(), libc::SIGTERM) };
            }
            out
        });
        threads.push((label, spawned.map_err(|e| format!("starting a thread: {e}"))?));
    }
    eprintln!(
        "ztna-delayline: forwarding {a_name} <-> {b_name} (MTU {} / {}), delay {:.3} ms, loss {}%, queue {cap} frames of {slot} B per direction",
        a.mtu,
        b.mtu,
        args.delay_ns as f64 / 1e6,
        args.loss_pct
    );

    loop {
        // SAFETY: waits for one of the signals blocked above.
        let sig = unsafe { libc::sigwaitinfo(&set, ptr::null_mut()) };
        if sig == libc::SIGTERM || sig == libc::SIGINT {
            break;
        }
    }
    let one: u64 = 1;
    // SAFETY: writes 8 bytes from a live u64 to our eventfd; every thread polls it.
    unsafe { libc::write(stop.as_raw_fd(), (&one as *const u64).cast(), 8) };
    let mut ok = !failed.load(Ordering::Relaxed);
    for (name, t) in threads {
        match t.join() {
            Ok(Ok(s)) => eprintln!("ztna-delayline: {name}: {}", s.report()),
            Ok(Err(_)) => ok = false,
            Err(_) => {
                eprintln!("ztna-delayline: {name}: the thread panicked");
                ok = false;
            }
        }
    }
    eprintln!("ztna-delayline: stopped");
    Ok(ok)
}

/// Wakes the main thread (which then stops the other direction) if a direction panics.
struct WakeMainOnPanic;

impl Drop for WakeMainOnPanic {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // SAFETY: kill(2) on our own process; the main thread takes it in sigwaitinfo.
            unsafe { libc::kill(libc::getpid(), libc::SIGTERM) };
        }
    }
}

/// One interface: its index, MTU and two packet sockets bound to it.
struct Iface {
    name: String,
    mtu: usize,
    rx: OwnedFd,
    tx: OwnedFd,
}

impl Iface {
    fn open(name: &str) -> Result<Iface, String> {
        let ctx = |what: &str, e: io::Error| format!("{name}: {what}: {e}");
        let cname = CString::new(name).map_err(|_| format!("bad interface name {name:?}"))?;
        if name.is_empty() || name.len() >= libc::IFNAMSIZ {
            return Err(format!("bad interface name {name:?}"));
        }
        // SAFETY: a NUL-terminated name.
        let index = unsafe { libc::if_nametoindex(cname.as_ptr()) } as libc::c_int;
        if index == 0 {
            return Err(format!("no interface {name} in this network namespace"));
        }

        // Protocol 0 receives nothing until bound: no frames of other interfaces sneak in
        // between socket() and bind().
        let rx = packet_socket().map_err(|e| ctx("AF_PACKET socket (root needed)", e))?;
        let mtu = mtu(rx.as_raw_fd(), name).map_err(|e| ctx("reading the MTU", e))?;
        let fd = rx.as_raw_fd();
        setopt(fd, libc::SOL_PACKET, libc::PACKET_IGNORE_OUTGOING, &1).map_err(|e| ctx("PACKET_IGNORE_OUTGOING", e))?;
        setopt(fd, libc::SOL_PACKET, libc::PACKET_AUXDATA, &1).map_err(|e| ctx("PACKET_AUXDATA", e))?;
        set_buffer(fd, libc::SO_RCVBUFFORCE, libc::SO_RCVBUF, RCVBUF).map_err(|e| ctx("SO_RCVBUF", e))?;
        let promisc = libc::packet_mreq {
            mr_ifindex: index,
            mr_type: libc::PACKET_MR_PROMISC as u16,
            mr_alen: 0,
            mr_address: [0; 8],
        };
        setopt(fd, libc::SOL_PACKET, libc::PACKET_ADD_MEMBERSHIP, &promisc).map_err(|e| ctx("promiscuous mode", e))?;
        bind(fd, index, libc::ETH_P_ALL as u16).map_err(|e| ctx("binding", e))?;

        let tx = packet_socket().map_err(|e| ctx("AF_PACKET socket", e))?;
        let fd = tx.as_raw_fd();
        // Straight to the driver; a veth has no qdisc anyway.
        let _ = setopt(fd, libc::SOL_PACKET, libc::PACKET_QDISC_BYPASS, &1);
        set_buffer(fd, libc::SO_SNDBUFFORCE, libc::SO_SNDBUF, SNDBUF).map_err(|e| ctx("SO_SNDBUF", e))?;
        bind(fd, index, 0).map_err(|e| ctx("binding", e))?;
        Ok(Iface { name: name.to_string(), mtu, rx, tx })
    }
}

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 { Err(io::Error::last_os_error()) } else { Ok(r) }
}

fn packet_socket() -> io::Result<OwnedFd> {
    // SAFETY: socket(2); the fd is owned at once.
    let fd = cvt(unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: a fresh fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn setopt<T>(fd: RawFd, level: libc::c_int, name: libc::c_int, value: &T) -> io::Result<()> {
    // SAFETY: `value` is a live T and the length is its size.
    cvt(unsafe { libc::setsockopt(fd, level, name, (value as *const T).cast(), size_of::<T>() as libc::socklen_t) }).map(drop)
}

/// A socket buffer of `bytes`, beyond the sysctl limit when allowed (root).
fn set_buffer(fd: RawFd, force: libc::c_int, plain: libc::c_int, bytes: libc::c_int) -> io::Result<()> {
    setopt(fd, libc::SOL_SOCKET, force, &bytes).or_else(|_| setopt(fd, libc::SOL_SOCKET, plain, &bytes))
}

fn bind(fd: RawFd, index: libc::c_int, protocol: u16) -> io::Result<()> {
    // SAFETY: an all-zero sockaddr_ll is valid.
    let mut sll: libc::sockaddr_ll = unsafe { zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = protocol.to_be();
    sll.sll_ifindex = index;
    // SAFETY: a live sockaddr_ll and its size.
    cvt(unsafe {
        libc::bind(fd, (&sll as *const libc::sockaddr_ll).cast(), size_of::<libc::sockaddr_ll>() as libc::socklen_t)
    })
    .map(drop)
}

fn mtu(fd: RawFd, name: &str) -> io::Result<usize> {
    // SAFETY: an all-zero ifreq is valid.
    let mut req: libc::ifreq = unsafe { zeroed() };
    for (d, s) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *d = s as libc::c_char;
    }
    // SAFETY: SIOCGIFMTU fills the ifreq we pass.
    cvt(unsafe { libc::ioctl(fd, libc::SIOCGIFMTU, &mut req) })?;
    // SAFETY: SIOCGIFMTU wrote the mtu member of the union.
    Ok(unsafe { req.ifr_ifru.ifru_mtu }.max(68) as usize)
}

fn mono_ns() -> u64 {
    // SAFETY: an all-zero timespec is valid and clock_gettime fills it.
    let mut ts: libc::timespec = unsafe { zeroed() };
    // SAFETY: a live timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn errno() -> i32 {
    io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// What a direction thread gets: its sockets.
struct Direction {
    name: String,
    rx: OwnedFd,
    tx: OwnedFd,
    seed: u64,
}

#[derive(Default, Clone, Copy)]
struct Stats {
    rx_frames: u64,
    rx_bytes: u64,
    tx_frames: u64,
    tx_bytes: u64,
    /// Dropped on arrival: the queue was full.
    full: u64,
    /// Dropped at random (`--loss-pct`).
    lost: u64,
    /// Larger than the buffers (offloads left on).
    oversize: u64,
    /// `sendmmsg` refused them.
    send_errors: u64,
    last_send_error: i32,
    /// Arrived with the checksum left to an offload (tx checksumming on at the sender).
    csum_partial: u64,
    /// Dropped by the kernel before we read them (receive buffer full).
    socket_drops: u64,
    rx_errors: u64,
    /// How late frames went out: the sum over all sent, and the most.
    late_ns_sum: u64,
    late_ns_max: u64,
    /// `recvmmsg` calls that returned frames, `sendmmsg` calls.
    rx_calls: u64,
    tx_calls: u64,
    /// Frames sent late by < 10 µs, < 100 µs, < 1 ms, < 10 ms, more.
    late_hist: [u64; 5],
    /// Still queued at exit (not sent).
    left: u64,
}

impl Stats {
    fn report(&self) -> String {
        let mut s = format!(
            "forwarded {} frames, {} bytes (received {} frames, {} bytes); dropped: queue-full {}, loss {}, oversize {}, send-errors {}, socket {}; csum-partial {}, rx-errors {}, left-in-queue {}; sent late by {:.1} us on average, {:.1} us at most, by <10us/<100us/<1ms/<10ms/more: {}; {:.1} frames per recvmmsg, {:.1} per sendmmsg",
            self.tx_frames,
            self.tx_bytes,
            self.rx_frames,
            self.rx_bytes,
            self.full,
            self.lost,
            self.oversize,
            self.send_errors,
            self.socket_drops,
            self.csum_partial,
            self.rx_errors,
            self.left,
            self.late_ns_sum as f64 / self.tx_frames.max(1) as f64 / 1e3,
            self.late_ns_max as f64 / 1e3,
            self.late_hist.map(|n| n.to_string()).join("/"),
            self.rx_frames as f64 / self.rx_calls.max(1) as f64,
            self.tx_frames as f64 / self.tx_calls.max(1) as f64
        );
        if self.send_errors > 0 {
            s += &format!(" (last send error: {})", io::Error::from_raw_os_error(self.last_send_error));
        }
        s
    }
}

#[derive(Default, Clone, Copy)]
struct Meta {
    /// When it arrived (CLOCK_MONOTONIC, ns).
    stamp: u64,
    /// Frame length; 0: dropped on arrival (lost, oversize), skipped when its time comes.
    len: u32,
    /// Where the frame starts in its slot (TAG, or 0 with a VLAN tag put back).
    off: u32,
}

/// One direction: frames from `rx` go out of `tx` `delay_ns` after they arrived.
struct Line {
    name: String,
    rx: OwnedFd,
    tx: OwnedFd,
    stop: RawFd,
    delay_ns: u64,
    loss_threshold: u64,
    rng: u64,
    /// Bytes per slot.
    slot: usize,
    /// Slots in the ring.
    cap: usize,
    buf: Vec<u8>,
    meta: Vec<Meta>,
    /// Oldest queued slot, and how many are queued.
    head: usize,
    len: usize,
    /// Where frames go that arrive while the ring is full.
    scratch: Vec<u8>,
    ctrl: Vec<u64>,
    rx_iov: Vec<libc::iovec>,
    rx_hdr: Vec<libc::mmsghdr>,
    tx_iov: Vec<libc::iovec>,
    tx_hdr: Vec<libc::mmsghdr>,
    /// Slot index of each frame in tx_hdr.
    tx_slot: Vec<usize>,
    stats: Stats,
}

impl Line {
    fn new(d: Direction, stop: RawFd, delay_ns: u64, loss_threshold: u64, slot: usize, cap: usize) -> Line {
        let iov = libc::iovec { iov_base: ptr::null_mut(), iov_len: 0 };
        // SAFETY: an all-zero mmsghdr is valid (null pointers, zero lengths).
        let hdr: libc::mmsghdr = unsafe { zeroed() };
        Line {
            name: d.name,
            rx: d.rx,
            tx: d.tx,
            stop,
            delay_ns,
            loss_threshold,
            rng: d.seed | 1,
            slot,
            cap,
            // Zeroed memory from the allocator: its pages are touched only as the ring is used.
            buf: vec![0; slot * cap],
            meta: vec![Meta::default(); cap],
            head: 0,
            len: 0,
            scratch: vec![0; slot * BATCH],
            ctrl: vec![0; CTRL_WORDS * BATCH],
            rx_iov: vec![iov; BATCH],
            rx_hdr: vec![hdr; BATCH],
            tx_iov: vec![iov; BATCH],
            tx_hdr: vec![hdr; BATCH],
            tx_slot: vec![0; BATCH],
            stats: Stats::default(),
        }
    }

    fn run(mut self) -> Result<Stats, String> {
        // Wake-ups on time: the default slack would let ppoll oversleep by 50 µs.
        // SAFETY: prctl on this thread.
        unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong) };
        let mut rx_ready = true;
        loop {
            self.send_due(mono_ns());
            if rx_ready {
                let (got, asked) = self.receive()?;
                if got == asked && got > 0 {
                    // Probably more waiting: receive again (after sending what is due).
                    continue;
                }
            }
            let timeout = if self.len > 0 {
                let due = self.meta[self.head].stamp + self.delay_ns;
                Some(due.saturating_sub(mono_ns()))
            } else {
                None
            };
            let mut fds = [
                libc::pollfd { fd: self.rx.as_raw_fd(), events: libc::POLLIN, revents: 0 },
                libc::pollfd { fd: self.stop, events: libc::POLLIN, revents: 0 },
            ];
            let ts = timeout.map(|ns| libc::timespec { tv_sec: (ns / 1_000_000_000) as _, tv_nsec: (ns % 1_000_000_000) as _ });
            let tsp = ts.as_ref().map_or(ptr::null(), |t| t as *const libc::timespec);
            // SAFETY: two live pollfds, a timespec or null, no signal mask change.
            let r = unsafe { libc::ppoll(fds.as_mut_ptr(), 2, tsp, ptr::null()) };
            if r < 0 {
                if errno() == libc::EINTR {
                    continue;
                }
                return Err(format!("ppoll: {}", io::Error::last_os_error()));
            }
            if fds[1].revents != 0 {
                break;
            }
            rx_ready = fds[0].revents & (libc::POLLIN | libc::POLLERR) != 0;
        }
        self.stats.left = self.meta_iter_queued().filter(|m| m.len > 0).count() as u64;
        self.stats.socket_drops = socket_drops(self.rx.as_raw_fd());
        Ok(self.stats)
    }

    fn meta_iter_queued(&self) -> impl Iterator<Item = &Meta> {
        (0..self.len).map(|i| &self.meta[(self.head + i) % self.cap])
    }

    fn random(&mut self) -> u64 {
        // xorshift64*
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        self.rng.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// One `recvmmsg` into the free slots after the last queued one (into scratch, to be
    /// dropped, when the ring is full). Returns (frames received, frames asked for).
    fn receive(&mut self) -> Result<(usize, usize), String> {
        let into_ring = self.len < self.cap;
        let tail = (self.head + self.len) % self.cap;
        let (base, n) = if into_ring {
            // SAFETY: tail < cap, so the offset is inside buf.
            (unsafe { self.buf.as_mut_ptr().add(tail * self.slot) }, BATCH.min(self.cap - self.len).min(self.cap - tail))
        } else {
            (self.scratch.as_mut_ptr(), BATCH)
        };
        for i in 0..n {
            // SAFETY: slot i of the n-slot run starting at base, all inside buf or scratch.
            self.rx_iov[i] = libc::iovec { iov_base: unsafe { base.add(i * self.slot + TAG) }.cast(), iov_len: self.slot - TAG };
            let h = &mut self.rx_hdr[i];
            h.msg_len = 0;
            h.msg_hdr.msg_name = ptr::null_mut();
            h.msg_hdr.msg_namelen = 0;
            h.msg_hdr.msg_iov = &mut self.rx_iov[i];
            h.msg_hdr.msg_iovlen = 1;
            h.msg_hdr.msg_control = self.ctrl[i * CTRL_WORDS..].as_mut_ptr().cast();
            h.msg_hdr.msg_controllen = CTRL_WORDS * 8;
            h.msg_hdr.msg_flags = 0;
        }
        // SAFETY: n headers, each pointing at its own iovec, slot and control buffer.
        let r = unsafe { libc::recvmmsg(self.rx.as_raw_fd(), self.rx_hdr.as_mut_ptr(), n as u32, libc::MSG_DONTWAIT, ptr::null_mut()) };
        if r < 0 {
            return match errno() {
                libc::EAGAIN | libc::EINTR => Ok((0, n)),
                // The interface went down (or an error the socket reported once): go on.
                libc::ENETDOWN | libc::ENXIO | libc::ENOBUFS => {
                    self.stats.rx_errors += 1;
                    Ok((0, n))
                }
                _ => Err(format!("recvmmsg: {}", io::Error::last_os_error())),
            };
        }
        let got = r as usize;
        let now = mono_ns();
        self.stats.rx_calls += 1;
        for i in 0..got {
            let h = &self.rx_hdr[i];
            let len = h.msg_len as usize;
            let (flags, aux) = (h.msg_hdr.msg_flags, auxdata(&h.msg_hdr));
            self.stats.rx_frames += 1;
            self.stats.rx_bytes += len as u64;
            if !into_ring {
                self.stats.full += 1;
                continue;
            }
            let k = tail + i;
            self.meta[k] = Meta { stamp: now, len: 0, off: TAG as u32 };
            if flags & libc::MSG_TRUNC != 0 {
                if self.stats.oversize == 0 {
                    eprintln!(
                        "ztna-delayline: {}: warning: a frame larger than the MTU ({} B of {} B, dropped): turn off tso/gso at the sender and gro here",
                        self.name,
                        aux.map_or(len, |a| a.tp_len as usize),
                        self.slot - TAG
                    );
                }
                self.stats.oversize += 1;
                continue;
            }
            if self.loss_threshold > 0 && self.random() < self.loss_threshold {
                self.stats.lost += 1;
                continue;
            }
            let mut len = len;
            let mut off = TAG;
            if let Some(a) = aux {
                if a.tp_status & libc::TP_STATUS_CSUMNOTREADY != 0 {
                    if self.stats.csum_partial == 0 {
                        eprintln!(
                            "ztna-delayline: {}: warning: a frame whose checksum was left to an offload (its receiver will drop it): turn off tx checksumming at the sender",
                            self.name
                        );
                    }
                    self.stats.csum_partial += 1;
                }
                if a.tp_status & libc::TP_STATUS_VLAN_VALID != 0 && len >= 12 && len + TAG <= self.slot {
                    // The kernel took the outer VLAN tag out of the frame: put it back after the
                    // MAC addresses, moving them into the room in front.
                    let tpid = if a.tp_status & libc::TP_STATUS_VLAN_TPID_VALID != 0 { a.tp_vlan_tpid } else { 0x8100 };
                    let s = &mut self.buf[k * self.slot..(k + 1) * self.slot];
                    s.copy_within(TAG..TAG + 12, 0);
                    s[12..14].copy_from_slice(&tpid.to_be_bytes());
                    s[14..16].copy_from_slice(&a.tp_vlan_tci.to_be_bytes());
                    len += TAG;
                    off = 0;
                }
            }
            self.meta[k] = Meta { stamp: now, len: len as u32, off: off as u32 };
        }
        if into_ring {
            self.len += got;
        }
        Ok((got, n))
    }

    /// Sends every queued frame whose time has come.
    fn send_due(&mut self, now: u64) {
        while self.len > 0 {
            let run = self.len.min(self.cap - self.head).min(BATCH);
            let (mut taken, mut m) = (0, 0);
            while taken < run {
                let k = self.head + taken;
                let meta = self.meta[k];
                if meta.stamp + self.delay_ns > now {
                    break;
                }
                if meta.len > 0 {
                    // SAFETY: slot k is inside buf and the frame inside its slot.
                    let p = unsafe { self.buf.as_mut_ptr().add(k * self.slot + meta.off as usize) };
                    self.tx_iov[m] = libc::iovec { iov_base: p.cast(), iov_len: meta.len as usize };
                    let h = &mut self.tx_hdr[m];
                    h.msg_len = 0;
                    h.msg_hdr.msg_iov = &mut self.tx_iov[m];
                    h.msg_hdr.msg_iovlen = 1;
                    self.tx_slot[m] = k;
                    m += 1;
                }
                taken += 1;
            }
            if taken == 0 {
                return;
            }
            self.send(m, now);
            self.head += taken;
            self.len -= taken;
            if self.head == self.cap || self.len == 0 {
                // Wrap; an empty ring starts over at slot 0, where the cache is warm.
                self.head = 0;
            }
        }
    }

    /// `sendmmsg` of tx_hdr[..m]; a frame the kernel refuses is counted and skipped.
    fn send(&mut self, m: usize, now: u64) {
        let mut i = 0;
        while i < m {
            // SAFETY: headers i..m point at their iovecs and frames in buf.
            let r = unsafe { libc::sendmmsg(self.tx.as_raw_fd(), self.tx_hdr[i..].as_mut_ptr(), (m - i) as u32, 0) };
            self.stats.tx_calls += 1;
            if r > 0 {
                for j in i..i + r as usize {
                    let meta = self.meta[self.tx_slot[j]];
                    let late = now - (meta.stamp + self.delay_ns);
                    self.stats.tx_frames += 1;
                    self.stats.tx_bytes += u64::from(meta.len);
                    self.stats.late_ns_sum += late;
                    self.stats.late_ns_max = self.stats.late_ns_max.max(late);
                    let bucket = match late {
                        0..10_000 => 0,
                        10_000..100_000 => 1,
                        100_000..1_000_000 => 2,
                        1_000_000..10_000_000 => 3,
                        _ => 4,
                    };
                    self.stats.late_hist[bucket] += 1;
                }
                i += r as usize;
            } else {
                let e = errno();
                if e == libc::EINTR {
                    continue;
                }
                self.stats.send_errors += 1;
                self.stats.last_send_error = e;
                i += 1;
            }
        }
    }
}

/// The PACKET_AUXDATA control message of a received frame.
fn auxdata(h: &libc::msghdr) -> Option<libc::tpacket_auxdata> {
    // SAFETY: walks the control messages the kernel wrote into this header's buffer.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(h);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_PACKET
                && (*c).cmsg_type == libc::PACKET_AUXDATA
                && (*c).cmsg_len as usize >= libc::CMSG_LEN(size_of::<libc::tpacket_auxdata>() as u32) as usize
            {
                return Some(ptr::read_unaligned(libc::CMSG_DATA(c).cast::<libc::tpacket_auxdata>()));
            }
            c = libc::CMSG_NXTHDR(h, c);
        }
    }
    None
}

/// Frames the kernel dropped for a full receive buffer (PACKET_STATISTICS).
fn socket_drops(fd: RawFd) -> u64 {
    // SAFETY: an all-zero tpacket_stats is valid; getsockopt fills it.
    let mut st: libc::tpacket_stats = unsafe { zeroed() };
    let mut len = size_of::<libc::tpacket_stats>() as libc::socklen_t;
    // SAFETY: a live tpacket_stats and its size.
    let r = unsafe { libc::getsockopt(fd, libc::SOL_PACKET, libc::PACKET_STATISTICS, (&mut st as *mut libc::tpacket_stats).cast(), &mut len) };
    if r == 0 { u64::from(st.tp_drops) } else { 0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, String> {
        parse_args(args.iter().map(|s| s.to_string()))
    }

    #[test]
    fn parses_the_command_line() {
        let Ok(Cli::Run(a)) = parse(&["--a", "x0", "--b=x1", "--delay-ms", "2.5", "--loss-pct", "50"]) else { panic!() };
        assert_eq!((a.a.as_str(), a.b.as_str(), a.delay_ns, a.loss_pct, a.queue_mib), ("x0", "x1", 2_500_000, 50.0, DEFAULT_QUEUE_MIB));
        assert!(matches!(parse(&["--help"]), Ok(Cli::Help)));
        for bad in [
            &["--a", "x0", "--b", "x1"][..],
            &["--a", "x0", "--b", "x0", "--delay-ms", "1"],
            &["--a", "x0", "--b", "x1", "--delay-ms", "-1"],
            &["--a", "x0", "--b", "x1", "--delay-ms", "1", "--loss-pct", "101"],
            &["--a", "x0", "--b", "x1", "--delay-ms"],
            &["--a", "x0", "--b", "x1", "--delay-ms", "1", "--what", "2"],
            &["--a", "x0", "--b", "x1", "--delay-ms", "1", "--queue-mib", "0"],
            &["--a", "x0", "--b", "x1", "--delay-ms", "1", "--queue-mib", "1e30"],
        ] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
    }
}
