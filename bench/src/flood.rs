//! `ztna-bench flood`: DATA-frame packet generator and sink through a real relay.
//!
//! Creates N sessions through the control protocol (see `setup`), then one sender thread moves
//! DATA frames `[0x01][session id][seq u64 LE][send time u64 LE, CLOCK_MONOTONIC ns][zeros]` from
//! each agent's own socket (the address the relay bound for the session) to the relay with
//! `sendmmsg` (or one `sendmsg` with UDP GSO per batch), paced to `--rate`; one sink thread reads
//! the connector's socket with `recvmmsg` and counts delivered, lost, reordered and duplicated
//! frames, and one-way latency (sender and sink share the host's monotonic clock).
//!
//! The control connections are not serviced during the run (the sockets belong to the sender and
//! the sink), so a run is capped at 20 s: the relay closes a control connection that has been
//! quiet for 30 s, and with it its sessions.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use hdrhistogram::Histogram;
use serde::Serialize;
use ztna_proto::SessionId;
use ztna_proto::frame::Frame;

use crate::setup::{self, SessionSetupArgs};
use crate::sys;

/// Longest run without servicing the control connections (relay control idle timeout: 30 s).
pub const MAX_SECONDS: f64 = 20.0;
/// Largest payload: a DATA frame in one 1500-byte IPv4 packet (1472 - 9 header bytes).
pub const MAX_PAYLOAD: usize = 1463;
const SEQ_TS_LEN: usize = 16;
const HDR: usize = 1 + ztna_proto::ID_LEN;

#[derive(clap::Args, Debug, Clone)]
pub struct FloodArgs {
    #[command(flatten)]
    pub setup: SessionSetupArgs,
    /// Sessions (agent control connections, each with its own socket).
    #[arg(long, default_value_t = 16)]
    pub sessions: usize,
    /// Target packets per second over all sessions (default: flat out).
    #[arg(long)]
    pub rate: Option<f64>,
    /// DATA payload bytes (16..=1463; the frame adds 9).
    #[arg(long, default_value_t = 64)]
    pub payload: usize,
    /// Seconds to send (at most 20: the control connections are not serviced meanwhile).
    #[arg(long, default_value_t = 5.0)]
    pub seconds: f64,
    /// Stop after this many frames in all.
    #[arg(long)]
    pub count: Option<u64>,
    /// Frames per sendmmsg call (one session per batch, sessions in turn).
    #[arg(long, default_value_t = 32)]
    pub batch: usize,
    /// Send each batch as one UDP GSO super-datagram (UDP_SEGMENT); falls back to sendmmsg if
    /// the kernel refuses.
    #[arg(long)]
    pub gso: bool,
    /// Milliseconds the sink keeps reading after the last send.
    #[arg(long, default_value_t = 500)]
    pub drain_ms: u64,
    /// Send the DATA frames straight to the connector's address instead of the relay's (the
    /// sessions are still made through the relay): the reference path for the relay's added
    /// latency, where the network routes between the agent and the connector (the lab does).
    #[arg(long)]
    pub direct: bool,
    /// Relay process id: report its CPU seconds per million forwarded frames.
    #[arg(long)]
    pub relay_pid: Option<u32>,
    /// Also write the result as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

#[derive(Debug, Clone, Serialize)]
pub struct LatencyUs {
    pub p50: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
    pub mean: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct FloodReport {
    pub relay: SocketAddr,
    /// The frames went straight to the connector (`--direct`), not through the relay.
    pub direct: bool,
    pub sessions: usize,
    pub payload_bytes: usize,
    /// UDP payload bytes per frame (payload + 9); the Gbps figures count these.
    pub frame_bytes: usize,
    pub target_pps: Option<f64>,
    pub gso: bool,
    pub gso_fell_back: bool,
    pub batch: usize,
    pub setup_s: f64,
    pub send_s: f64,
    pub sent: u64,
    pub send_errors: u64,
    pub first_send_error: Option<String>,
    pub offered_pps: f64,
    pub offered_gbps: f64,
    pub delivered: u64,
    pub delivered_pps: f64,
    pub delivered_gbps: f64,
    pub lost: u64,
    pub loss_ratio: f64,
    pub reordered: u64,
    pub duplicated: u64,
    /// Datagrams at the sink that were not DATA frames of our sessions (control QUIC, strangers).
    pub other_datagrams: u64,
    /// Datagrams the kernel dropped at this process's sockets (the sink's, for a full receive
    /// buffer) during the run: loss that is the sink's, not the relay's.
    pub sink_socket_drops: u64,
    /// The same at the relay's sockets (with --relay-pid): frames that never reached the relay.
    pub relay_socket_drops: Option<u64>,
    pub latency_us: Option<LatencyUs>,
    pub relay_cpu_s: Option<f64>,
    pub relay_cpu_s_per_million: Option<f64>,
    pub bench_cpu_s: f64,
    /// The generator reached less than 95% of --rate: the figures say nothing about the relay's limit.
    pub generator_limited: bool,
    pub verdict: String,
    /// (sent, delivered) per whole second.
    pub per_second: Vec<(u64, u64)>,
}

pub fn mono_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

pub fn sockaddr(addr: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: all-zero is a valid sockaddr_storage.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than sockaddr_in and suitably aligned.
            unsafe { std::ptr::write(&mut ss as *mut _ as *mut libc::sockaddr_in, sin) };
            std::mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: a.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: a.scope_id(),
            };
            // SAFETY: as above.
            unsafe { std::ptr::write(&mut ss as *mut _ as *mut libc::sockaddr_in6, sin6) };
            std::mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (ss, len as libc::socklen_t)
}

struct Shared {
    sent: AtomicU64,
    delivered: AtomicU64,
    stop_send: AtomicBool,
    stop_sink: AtomicBool,
}

struct SendResult {
    sent: u64,
    errors: u64,
    first_error: Option<String>,
    gso_fell_back: bool,
    send_s: f64,
}

struct SendPlan {
    fds: Vec<RawFd>,
    ids: Vec<SessionId>,
    relay: SocketAddr,
    payload: usize,
    rate: Option<f64>,
    seconds: f64,
    count: u64,
    batch: usize,
    gso: bool,
}

/// Sends one batch; returns how many frames left, or the error after some (maybe zero) left.
fn send_batch(
    fd: RawFd,
    buf: &mut [u8],
    frame_len: usize,
    n: usize,
    to: &(libc::sockaddr_storage, libc::socklen_t),
    gso: bool,
) -> (usize, Option<std::io::Error>) {
    if gso {
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr() as *mut libc::c_void,
            iov_len: frame_len * n,
        };
        let mut cbuf = [0u64; 8];
        // SAFETY: msghdr/cmsg built over buffers that outlive the call.
        unsafe {
            let mut msg: libc::msghdr = std::mem::zeroed();
            msg.msg_name = &to.0 as *const _ as *mut libc::c_void;
            msg.msg_namelen = to.1;
            msg.msg_iov = &mut iov;
            msg.msg_iovlen = 1;
            msg.msg_control = cbuf.as_mut_ptr() as *mut libc::c_void;
            msg.msg_controllen = libc::CMSG_SPACE(2) as _;
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = libc::SOL_UDP;
            (*c).cmsg_type = libc::UDP_SEGMENT;
            (*c).cmsg_len = libc::CMSG_LEN(2) as _;
            std::ptr::write_unaligned(libc::CMSG_DATA(c) as *mut u16, frame_len as u16);
            let r = libc::sendmsg(fd, &msg, 0);
            if r < 0 {
                (0, Some(std::io::Error::last_os_error()))
            } else {
                (n, None)
            }
        }
    } else {
        let mut iovs: Vec<libc::iovec> = (0..n)
            .map(|i| libc::iovec {
                iov_base: buf[i * frame_len..].as_mut_ptr() as *mut libc::c_void,
                iov_len: frame_len,
            })
            .collect();
        // SAFETY: as above; every mmsghdr points at an iovec in `iovs` and at `to`.
        let mut msgs: Vec<libc::mmsghdr> = iovs
            .iter_mut()
            .map(|iov| {
                let mut m: libc::mmsghdr = unsafe { std::mem::zeroed() };
                m.msg_hdr.msg_name = &to.0 as *const _ as *mut libc::c_void;
                m.msg_hdr.msg_namelen = to.1;
                m.msg_hdr.msg_iov = iov;
                m.msg_hdr.msg_iovlen = 1;
                m
            })
            .collect();
        let mut done = 0;
        while done < n {
            // SAFETY: see above.
            let r = unsafe {
                libc::sendmmsg(fd, msgs[done..].as_mut_ptr(), (n - done) as libc::c_uint, 0)
            };
            if r < 0 {
                return (done, Some(std::io::Error::last_os_error()));
            }
            done += r as usize;
        }
        (n, None)
    }
}

fn sender(plan: SendPlan, shared: Arc<Shared>) -> SendResult {
    let frame_len = HDR + plan.payload;
    let mut batch = plan.batch.clamp(1, 64);
    if plan.gso {
        batch = batch.min(65_000 / frame_len).max(1);
    }
    let to = sockaddr(plan.relay);
    let mut buf = vec![0u8; batch * frame_len];
    let mut seqs = vec![0u64; plan.ids.len()];
    let mut gso = plan.gso;
    let mut res = SendResult {
        sent: 0,
        errors: 0,
        first_error: None,
        gso_fell_back: false,
        send_s: 0.0,
    };
    let started = Instant::now();
    let deadline = Duration::from_secs_f64(plan.seconds);
    let mut rr = 0usize;
    while res.sent < plan.count && !shared.stop_send.load(Ordering::Relaxed) {
        let elapsed = started.elapsed();
        if elapsed >= deadline {
            break;
        }
        let n = (batch as u64).min(plan.count - res.sent) as usize;
        if let Some(rate) = plan.rate {
            // Frames allowed by now, with one batch of slack.
            let allowed = (elapsed.as_secs_f64() * rate) as u64 + batch as u64;
            if res.sent + n as u64 > allowed {
                let wait = (res.sent + n as u64 - allowed) as f64 / rate;
                if wait > 0.0005 {
                    std::thread::sleep(Duration::from_secs_f64(wait - 0.0002));
                } else {
                    std::hint::spin_loop();
                }
                continue;
            }
        }
        let s = rr;
        rr = (rr + 1) % plan.ids.len();
        let now = mono_ns();
        let id = plan.ids[s].as_bytes();
        for i in 0..n {
            let f = &mut buf[i * frame_len..(i + 1) * frame_len];
            f[0] = 0x01;
            f[1..HDR].copy_from_slice(id);
            f[HDR..HDR + 8].copy_from_slice(&(seqs[s] + i as u64).to_le_bytes());
            f[HDR + 8..HDR + 16].copy_from_slice(&now.to_le_bytes());
        }
        let (mut done, mut err) = send_batch(plan.fds[s], &mut buf, frame_len, n, &to, gso);
        if gso && err.is_some() && done == 0 {
            // No GSO here (old kernel, device without it): fall back for the rest of the run.
            gso = false;
            res.gso_fell_back = true;
            (done, err) = send_batch(plan.fds[s], &mut buf, frame_len, n, &to, false);
        }
        if let Some(e) = err {
            res.errors += (n - done) as u64;
            if res.first_error.is_none() {
                res.first_error = Some(e.to_string());
            }
        }
        // Only frames that left take sequence numbers, so the sink's gaps are losses.
        seqs[s] += done as u64;
        res.sent += done as u64;
        shared.sent.fetch_add(done as u64, Ordering::Relaxed);
    }
    res.send_s = started.elapsed().as_secs_f64();
    res
}

struct SinkResult {
    delivered: u64,
    reordered: u64,
    duplicated: u64,
    other: u64,
    hist: Histogram<u64>,
    per_session_unique: Vec<u64>,
}

/// The connector's control connection, answered by the sink: the relay pings a connector
/// with sessions and drops it if nothing answers for 2 s (PROTOCOL.md §7.14).
type Control = Arc<Mutex<(std::net::UdpSocket, ztna_client::control::ControlCore)>>;

fn sink(fd: RawFd, ids: Vec<SessionId>, shared: Arc<Shared>, control: Control, relay: std::net::SocketAddr) -> SinkResult {
    const B: usize = 64;
    const SZ: usize = 2048;
    let index: HashMap<[u8; 8], usize> = ids
        .iter()
        .enumerate()
        .map(|(i, s)| (*s.as_bytes(), i))
        .collect();
    let mut seen: Vec<Vec<u64>> = vec![Vec::new(); ids.len()];
    let mut max_seq: Vec<Option<u64>> = vec![None; ids.len()];
    let mut r = SinkResult {
        delivered: 0,
        reordered: 0,
        duplicated: 0,
        other: 0,
        hist: Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("histogram bounds"),
        per_session_unique: vec![0; ids.len()],
    };
    let mut bufs = vec![0u8; B * SZ];
    let mut iovs: Vec<libc::iovec> = (0..B)
        .map(|i| libc::iovec {
            iov_base: bufs[i * SZ..].as_mut_ptr() as *mut libc::c_void,
            iov_len: SZ,
        })
        .collect();
    // SAFETY: zeroed mmsghdrs pointing at our iovecs, which outlive the loop.
    let mut msgs: Vec<libc::mmsghdr> = iovs
        .iter_mut()
        .map(|iov| {
            let mut m: libc::mmsghdr = unsafe { std::mem::zeroed() };
            m.msg_hdr.msg_iov = iov;
            m.msg_hdr.msg_iovlen = 1;
            m
        })
        .collect();
    while !shared.stop_sink.load(Ordering::Relaxed) {
        // SAFETY: see above; the socket has a 100 ms receive timeout.
        let n = unsafe {
            libc::recvmmsg(
                fd,
                msgs.as_mut_ptr(),
                B as libc::c_uint,
                libc::MSG_WAITFORONE,
                std::ptr::null_mut(),
            )
        };
        if n <= 0 {
            continue;
        }
        let now = mono_ns();
        let mut delivered = 0;
        for (i, m) in msgs.iter().enumerate().take(n as usize) {
            let len = m.msg_len as usize;
            let d = &mut bufs[i * SZ..i * SZ + len.min(SZ)];
            if !ztna_proto::frame::is_relay_frame(d) {
                let mut c = control.lock().unwrap_or_else(|e| e.into_inner());
                let (sock, core) = &mut *c;
                core.on_datagram(d, relay);
                let mut out = [0u8; 1500];
                while let Ok(Some((n, to))) = core.poll_transmit(&mut out) {
                    let _ = sock.send_to(&out[..n], to);
                }
                r.other += 1;
                continue;
            }
            let (session, payload) = match Frame::parse(d) {
                Ok(Frame::Data { session, payload }) if payload.len() >= SEQ_TS_LEN => {
                    (session, payload)
                }
                _ => {
                    r.other += 1;
                    continue;
                }
            };
            let Some(&s) = index.get(session.as_bytes()) else {
                r.other += 1;
                continue;
            };
            let seq = u64::from_le_bytes(payload[..8].try_into().unwrap_or_default());
            let ts = u64::from_le_bytes(payload[8..16].try_into().unwrap_or_default());
            delivered += 1;
            let (w, b) = ((seq / 64) as usize, seq % 64);
            let bits = &mut seen[s];
            if bits.len() <= w {
                bits.resize(w + 1, 0);
            }
            if bits[w] & (1 << b) != 0 {
                r.duplicated += 1;
                continue;
            }
            bits[w] |= 1 << b;
            r.per_session_unique[s] += 1;
            match max_seq[s] {
                Some(m) if seq < m => r.reordered += 1,
                _ => max_seq[s] = Some(seq),
            }
            let _ = r.hist.record(now.saturating_sub(ts).max(1));
        }
        r.delivered += delivered;
        shared.delivered.fetch_add(delivered, Ordering::Relaxed);
    }
    r
}

struct Closer {
    conns: Vec<(std::net::UdpSocket, ztna_client::control::ControlCore)>,
    connector: Control,
}

impl Drop for Closer {
    fn drop(&mut self) {
        let mut out = vec![0u8; 1500];
        let mut connector = self.connector.lock().unwrap_or_else(|e| e.into_inner());
        for (sock, core) in self.conns.iter_mut().chain(std::iter::once(&mut *connector)) {
            core.close("bye");
            while let Ok(Some((n, to))) = core.poll_transmit(&mut out) {
                if sock.send_to(&out[..n], to).is_err() {
                    break;
                }
            }
        }
    }
}

fn to_blocking_std(sock: tokio::net::UdpSocket) -> Result<std::net::UdpSocket> {
    let s = sock.into_std().context("taking the socket from tokio")?;
    s.set_nonblocking(false)?;
    Ok(s)
}

pub async fn run(a: &FloodArgs) -> Result<FloodReport> {
    if !(SEQ_TS_LEN..=MAX_PAYLOAD).contains(&a.payload) {
        bail!("--payload must be between {SEQ_TS_LEN} and {MAX_PAYLOAD} bytes");
    }
    if !(a.seconds > 0.0 && a.seconds <= MAX_SECONDS) {
        bail!(
            "--seconds must be in (0, {MAX_SECONDS}]: the control connections are not serviced during a flood, and the relay drops them after 30 s of silence"
        );
    }
    if a.rate.is_some_and(|r| r.is_nan() || r <= 0.0) {
        bail!("--rate must be positive (leave it out for flat out)");
    }
    if a.count == Some(0) {
        bail!("--count must be at least 1");
    }
    let est = setup::establish(&a.setup, a.sessions).await?;
    let connector_addr = setup::bound_addr(&est.connector);
    let data_to = if a.direct { connector_addr } else { a.setup.relay };
    println!(
        "-- {} sessions through {} in {:.2} s (connector {} at {})",
        est.sessions.len(),
        a.setup.relay,
        est.setup_s,
        a.setup.connector,
        connector_addr
    );
    // Take the sockets; keep the control state alive (not serviced) until the end.
    let mut cores = Vec::new();
    let mut agent_socks = Vec::new();
    for agent in est.agents {
        let (sock, core, _) = agent.into_parts();
        agent_socks.push(to_blocking_std(sock)?);
        cores.push(core);
    }
    let relay_addr = est.connector.relay();
    let (csock, ccore, _) = est.connector.into_parts();
    let csock = to_blocking_std(csock)?;
    csock.set_read_timeout(Some(Duration::from_millis(100)))?;
    // Closes every control connection on the way out (also on error), so the relay ends the
    // sessions now rather than after its idle timeout (a stale connector would take the next
    // run's sessions).
    let control: Control = Arc::new(Mutex::new((csock.try_clone()?, ccore)));
    let _closer = Closer {
        conns: agent_socks
            .iter()
            .map(|s| s.try_clone())
            .collect::<std::io::Result<Vec<_>>>()?
            .into_iter()
            .zip(cores)
            .collect(),
        connector: control.clone(),
    };

    let shared = Arc::new(Shared {
        sent: AtomicU64::new(0),
        delivered: AtomicU64::new(0),
        stop_send: AtomicBool::new(false),
        stop_sink: AtomicBool::new(false),
    });
    let plan = SendPlan {
        fds: agent_socks.iter().map(|s| s.as_raw_fd()).collect(),
        ids: est.sessions.clone(),
        relay: data_to,
        payload: a.payload,
        rate: a.rate,
        seconds: a.seconds,
        count: a.count.unwrap_or(u64::MAX),
        batch: a.batch,
        gso: a.gso,
    };
    let relay_cpu0 = a.relay_pid.map(|p| sys::cpu_seconds(Some(p))).transpose()?;
    let bench_cpu0 = sys::cpu_seconds(None)?;
    let me = std::process::id();
    let sink_drops0 = sys::udp_socket_drops(me).unwrap_or(0);
    let relay_drops0 = a.relay_pid.and_then(|p| sys::udp_socket_drops(p).ok());
    let sink_h = {
        let (fd, ids, sh, control) = (csock.as_raw_fd(), est.sessions.clone(), shared.clone(), control.clone());
        std::thread::Builder::new()
            .name("flood-sink".into())
            .spawn(move || sink(fd, ids, sh, control, relay_addr))?
    };
    let send_h = {
        let sh = shared.clone();
        std::thread::Builder::new()
            .name("flood-send".into())
            .spawn(move || sender(plan, sh))?
    };
    let started = Instant::now();
    let mut per_second = Vec::new();
    let (mut last_s, mut last_d) = (0u64, 0u64);
    let mut tick = started;
    while !send_h.is_finished() {
        tokio::time::sleep(Duration::from_millis(50)).await;
        if tick.elapsed() >= Duration::from_secs(1) {
            tick += Duration::from_secs(1);
            let (s, d) = (
                shared.sent.load(Ordering::Relaxed),
                shared.delivered.load(Ordering::Relaxed),
            );
            per_second.push((s - last_s, d - last_d));
            println!(
                "  t={:>3} s  sent {:>10} pps  delivered {:>10} pps",
                per_second.len(),
                s - last_s,
                d - last_d
            );
            (last_s, last_d) = (s, d);
        }
    }
    let sres = send_h
        .join()
        .map_err(|_| anyhow::anyhow!("the sender thread panicked"))?;
    // Drain: until nothing new arrived for 100 ms, at most --drain-ms.
    let drain_end = Instant::now() + Duration::from_millis(a.drain_ms);
    let mut last = shared.delivered.load(Ordering::Relaxed);
    while Instant::now() < drain_end {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let d = shared.delivered.load(Ordering::Relaxed);
        if d == last && d >= sres.sent {
            break;
        }
        last = d;
    }
    shared.stop_sink.store(true, Ordering::Relaxed);
    let k = sink_h
        .join()
        .map_err(|_| anyhow::anyhow!("the sink thread panicked"))?;
    let relay_cpu = match (a.relay_pid, relay_cpu0) {
        (Some(p), Some(c0)) => {
            Some(sys::cpu_seconds(Some(p)).context("relay process gone during the run?")? - c0)
        }
        _ => None,
    };
    let bench_cpu_s = sys::cpu_seconds(None)? - bench_cpu0;
    let sink_socket_drops = sys::udp_socket_drops(me)
        .unwrap_or(0)
        .saturating_sub(sink_drops0);
    let relay_socket_drops = match (a.relay_pid, relay_drops0) {
        (Some(p), Some(d0)) => sys::udp_socket_drops(p).ok().map(|d| d.saturating_sub(d0)),
        _ => None,
    };

    let frame_bytes = HDR + a.payload;
    let unique: u64 = k.per_session_unique.iter().sum();
    let lost = sres.sent.saturating_sub(unique);
    let t = sres.send_s.max(1e-9);
    let offered_pps = sres.sent as f64 / t;
    let delivered_pps = unique as f64 / t;
    let gbps = |pps: f64| pps * frame_bytes as f64 * 8.0 / 1e9;
    let generator_limited = a.rate.is_some_and(|r| offered_pps < 0.95 * r);
    let loss_ratio = if sres.sent > 0 {
        lost as f64 / sres.sent as f64
    } else {
        0.0
    };
    let verdict = if sres.sent == 0 {
        format!(
            "nothing was sent ({})",
            sres.first_error.clone().unwrap_or_default()
        )
    } else if generator_limited {
        format!(
            "GENERATOR LIMITED: offered {:.0} pps of the {:.0} pps asked for; the relay was not pushed to the target (use more sessions, --gso, a bigger --batch or a packet generator)",
            offered_pps,
            a.rate.unwrap_or_default()
        )
    } else if unique == 0 {
        "nothing arrived at the connector: sessions not forwarding (relay dropped them? wrong address?)".to_string()
    } else if a.rate.is_none() {
        format!(
            "flat out: this generator offered {offered_pps:.0} pps; {:.2}% lost at the relay or the sink socket",
            loss_ratio * 100.0
        )
    } else {
        format!(
            "target reached by the generator; {:.3}% lost",
            loss_ratio * 100.0
        )
    };
    let latency_us = (!k.hist.is_empty()).then(|| {
        let us = |ns: u64| ns as f64 / 1000.0;
        LatencyUs {
            p50: us(k.hist.value_at_quantile(0.50)),
            p99: us(k.hist.value_at_quantile(0.99)),
            p999: us(k.hist.value_at_quantile(0.999)),
            max: us(k.hist.max()),
            mean: k.hist.mean() / 1000.0,
        }
    });
    Ok(FloodReport {
        relay: a.setup.relay,
        direct: a.direct,
        sessions: est.sessions.len(),
        payload_bytes: a.payload,
        frame_bytes,
        target_pps: a.rate,
        gso: a.gso,
        gso_fell_back: sres.gso_fell_back,
        batch: a.batch,
        setup_s: est.setup_s,
        send_s: sres.send_s,
        sent: sres.sent,
        send_errors: sres.errors,
        first_send_error: sres.first_error,
        offered_pps,
        offered_gbps: gbps(offered_pps),
        delivered: unique,
        delivered_pps,
        delivered_gbps: gbps(delivered_pps),
        lost,
        loss_ratio,
        reordered: k.reordered,
        duplicated: k.duplicated,
        other_datagrams: k.other,
        sink_socket_drops,
        relay_socket_drops,
        latency_us,
        relay_cpu_s: relay_cpu,
        relay_cpu_s_per_million: relay_cpu
            .filter(|_| unique > 0)
            .map(|c| c / (unique as f64 / 1e6)),
        bench_cpu_s,
        generator_limited,
        verdict,
        per_second,
    })
}

pub fn print(r: &FloodReport) {
    let rate = r
        .target_pps
        .map_or("flat out".to_string(), |p| format!("{p:.0} pps"));
    println!();
    println!(
        "flood {}{}: {} sessions, {} B payload ({} B frames), target {rate}, batch {}{}",
        if r.direct { "direct to the connector, sessions via " } else { "through " },
        r.relay,
        r.sessions,
        r.payload_bytes,
        r.frame_bytes,
        r.batch,
        if r.gso {
            if r.gso_fell_back {
                ", GSO refused: sendmmsg"
            } else {
                ", UDP GSO"
            }
        } else {
            ", sendmmsg"
        }
    );
    println!("  {:<28} {:>14} {:>14}", "", "offered", "delivered");
    println!("  {:<28} {:>14} {:>14}", "frames", r.sent, r.delivered);
    println!(
        "  {:<28} {:>14.0} {:>14.0}",
        "pps", r.offered_pps, r.delivered_pps
    );
    println!(
        "  {:<28} {:>14.3} {:>14.3}",
        "Gbps (UDP payload)", r.offered_gbps, r.delivered_gbps
    );
    println!(
        "  {:<28} {:>14} ({:.4}%)",
        "lost",
        r.lost,
        r.loss_ratio * 100.0
    );
    println!("  {:<28} {:>14}", "reordered", r.reordered);
    println!("  {:<28} {:>14}", "duplicated", r.duplicated);
    println!(
        "  {:<28} sink socket {}  relay sockets {}  (the rest: inside the relay, see ztna_relay_dropped_total)",
        "of which kernel drops",
        r.sink_socket_drops,
        r.relay_socket_drops.map_or("-".into(), |d| d.to_string())
    );
    if r.send_errors > 0 {
        println!(
            "  {:<28} {:>14} ({})",
            "send errors",
            r.send_errors,
            r.first_send_error.as_deref().unwrap_or("")
        );
    }
    if let Some(l) = &r.latency_us {
        println!(
            "  {:<28} p50 {:.1}  p99 {:.1}  p99.9 {:.1}  max {:.1}",
            "one-way latency (µs)", l.p50, l.p99, l.p999, l.max
        );
    }
    if let (Some(c), per_m) = (r.relay_cpu_s, r.relay_cpu_s_per_million) {
        println!(
            "  {:<28} {:.3} s ({} per million forwarded)",
            "relay CPU",
            c,
            per_m.map_or("-".into(), |v| format!("{v:.3} s"))
        );
    }
    println!(
        "  {:<28} {:.3} s over {:.2} s",
        "generator+sink CPU", r.bench_cpu_s, r.send_s
    );
    println!("  {}", r.verdict);
}
