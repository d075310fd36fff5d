//! `ztna-bench baseline-forwarder`: the kernel-socket baseline for the data-plane benchmark. One
//! thread, one UDP socket, `recvmmsg` a batch, and per datagram the work the relay does for a
//! DATA frame (frame type, the 8-byte session id at offset 1, one hash-map lookup session →
//! {agent, connector}, source check, pick the other side), then `sendmmsg` the batch. No QUIC, no
//! metrics beyond counters. The sessions come from a file written by `ztna-bench sessions` (the
//! relay that made them keeps them; this forwarder only needs their addresses).

use std::collections::HashMap;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::AsRawFd as _;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use socket2::{Domain, Protocol, Socket, Type};
use ztna_proto::SessionId;
use ztna_proto::frame::{DATA_HEADER_LEN, TYPE_DATA as DATA};

use crate::flood::sockaddr;
use crate::sessions::load_sessions;
use crate::interrupt;

/// Datagrams per recvmmsg/sendmmsg call, buffer size and socket buffers: the relay's.
const BATCH: usize = 64;
const MAX_DATAGRAM: usize = 2048;
const SOCKET_BUFFER: usize = 8 << 20;
#[derive(clap::Args, Debug, Clone)]
pub struct BaselineArgs {
    /// UDP address to listen on (`[::]:PORT` takes IPv4 too).
    #[arg(long)]
    pub listen: SocketAddr,
    /// Sessions file written by `ztna-bench sessions` (agent and connector address per session).
    #[arg(long)]
    pub sessions: PathBuf,
    /// Seconds to run (it also stops on SIGINT/SIGTERM), at most one hour.
    #[arg(long, default_value_t = 60.0)]
    pub seconds: f64,
    /// Load the sessions file even when it looks stale.
    #[arg(long)]
    pub allow_stale: bool,
}

/// What the forwarder did (printed as one JSON line at the end).
#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
pub struct Counters {
    pub received: u64,
    pub forwarded: u64,
    pub not_data: u64,
    pub unknown_session: u64,
    pub unbound_source: u64,
    pub send_errors: u64,
}

/// The address as the socket reports and takes it: IPv4 as v4-mapped on a dual-stack socket.
fn canonical(a: SocketAddr, dual_stack: bool) -> SocketAddr {
    match a {
        SocketAddr::V4(v4) if dual_stack => SocketAddrV6::new(v4.ip().to_ipv6_mapped(), v4.port(), 0, 0).into(),
        other => other,
    }
}

fn from_storage(ss: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match ss.ss_family as libc::c_int {
        libc::AF_INET => {
            // SAFETY: the family says the storage holds a sockaddr_in.
            let sin = unsafe { &*(ss as *const _ as *const libc::sockaddr_in) };
            Some(SocketAddrV4::new(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)), u16::from_be(sin.sin_port)).into())
        }
        libc::AF_INET6 => {
            // SAFETY: the family says the storage holds a sockaddr_in6.
            let sin6 = unsafe { &*(ss as *const _ as *const libc::sockaddr_in6) };
            Some(SocketAddrV6::new(Ipv6Addr::from(sin6.sin6_addr.s6_addr), u16::from_be(sin6.sin6_port), 0, 0).into())
        }
        _ => None,
    }
}

/// Where a datagram goes: the other side of its session, or why it is dropped.
enum Verdict {
    To(usize),
    NotData,
    UnknownSession,
    UnboundSource,
}

/// Session table: id → index into the address list (agent at 2i, connector at 2i+1), with
/// every address also kept as a ready `sockaddr` for sendmmsg.
struct Table {
    index: HashMap<SessionId, usize>,
    addrs: Vec<SocketAddr>,
    raw: Vec<(libc::sockaddr_storage, libc::socklen_t)>,
}

impl Table {
    fn classify(&self, datagram: &[u8], from: SocketAddr) -> Verdict {
        if datagram.len() < DATA_HEADER_LEN || datagram[0] != DATA {
            return Verdict::NotData;
        }
        let mut id = [0u8; ztna_proto::ID_LEN];
        id.copy_from_slice(&datagram[1..DATA_HEADER_LEN]);
        let Some(&i) = self.index.get(&SessionId(id)) else { return Verdict::UnknownSession };
        if from == self.addrs[2 * i] {
            Verdict::To(2 * i + 1)
        } else if from == self.addrs[2 * i + 1] {
            Verdict::To(2 * i)
        } else {
            Verdict::UnboundSource
        }
    }
}

fn bind(addr: SocketAddr) -> Result<Socket> {
    let sock = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP)).context("creating UDP socket")?;
    if addr.is_ipv6() {
        sock.set_only_v6(false).context("clearing IPV6_V6ONLY")?;
    }
    ztna_sockopt::grow_buffers(&sock, SOCKET_BUFFER);
    sock.set_read_timeout(Some(Duration::from_millis(100)))?;
    sock.bind(&addr.into()).with_context(|| format!("binding UDP {addr}"))?;
    Ok(sock)
}

pub fn run(a: &BaselineArgs) -> Result<Counters> {
    if !(a.seconds > 0.0 && a.seconds <= 3600.0) {
        bail!("--seconds must be in (0, 3600]");
    }
    let file = load_sessions(&a.sessions, a.allow_stale)?;
    let dual = a.listen.is_ipv6();
    let mut table = Table { index: HashMap::new(), addrs: Vec::new(), raw: Vec::new() };
    for (i, e) in file.sessions.iter().enumerate() {
        let id = SessionId::from_hex(&e.id).context("bad session id")?;
        table.index.insert(id, i);
        for addr in [e.agent, e.connector] {
            let c = canonical(addr, dual);
            table.addrs.push(c);
            table.raw.push(sockaddr(c));
        }
    }
    let sock = bind(a.listen)?;
    interrupt::catch_stop_signals();
    println!("baseline-forwarder: {} sessions from {}, listening on {}", file.sessions.len(), a.sessions.display(), a.listen);
    let counters = forward(sock.as_raw_fd(), &table, Duration::from_secs_f64(a.seconds));
    println!("{}", serde_json::to_string(&counters)?);
    Ok(counters)
}

/// The forwarding loop, until `limit` passes or a stop signal arrives.
fn forward(fd: libc::c_int, table: &Table, limit: Duration) -> Counters {
    let mut c = Counters::default();
    let mut bufs = vec![[0u8; MAX_DATAGRAM]; BATCH];
    // SAFETY (all zeroed values below): all-zero is valid for these C structs.
    let mut from: Vec<libc::sockaddr_storage> = vec![unsafe { std::mem::zeroed() }; BATCH];
    let mut riov: Vec<libc::iovec> = bufs
        .iter_mut()
        .map(|b| libc::iovec { iov_base: b.as_mut_ptr().cast(), iov_len: MAX_DATAGRAM })
        .collect();
    let mut rhdr: Vec<libc::mmsghdr> = vec![unsafe { std::mem::zeroed() }; BATCH];
    let mut siov: Vec<libc::iovec> = vec![libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 }; BATCH];
    let mut shdr: Vec<libc::mmsghdr> = vec![unsafe { std::mem::zeroed() }; BATCH];
    let end = Instant::now() + limit;
    while Instant::now() < end && !interrupt::stop_requested() {
        for i in 0..BATCH {
            let h = &mut rhdr[i].msg_hdr;
            h.msg_name = (&mut from[i] as *mut libc::sockaddr_storage).cast();
            h.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            h.msg_iov = &mut riov[i];
            h.msg_iovlen = 1;
        }
        // SAFETY: every header points at buffers and addresses that outlive the call. The
        // socket has a 100 ms receive timeout, so the loop checks its deadline.
        let n = unsafe { libc::recvmmsg(fd, rhdr.as_mut_ptr(), BATCH as u32, libc::MSG_WAITFORONE, std::ptr::null_mut()) };
        if n <= 0 {
            continue;
        }
        let n = n as usize;
        c.received += n as u64;
        let mut out = 0;
        for i in 0..n {
            let len = rhdr[i].msg_len as usize;
            let verdict = match from_storage(&from[i]) {
                Some(src) => table.classify(&bufs[i][..len.min(MAX_DATAGRAM)], src),
                None => Verdict::UnboundSource,
            };
            match verdict {
                Verdict::To(k) => {
                    siov[out] = libc::iovec { iov_base: bufs[i].as_mut_ptr().cast(), iov_len: len };
                    let (ss, sl) = &table.raw[k];
                    let h = &mut shdr[out].msg_hdr;
                    h.msg_name = (ss as *const libc::sockaddr_storage).cast_mut().cast();
                    h.msg_namelen = *sl;
                    h.msg_iov = &mut siov[out];
                    h.msg_iovlen = 1;
                    out += 1;
                }
                Verdict::NotData => c.not_data += 1,
                Verdict::UnknownSession => c.unknown_session += 1,
                Verdict::UnboundSource => c.unbound_source += 1,
            }
        }
        let mut sent = 0;
        while sent < out {
            // SAFETY: headers point at `bufs` and `table.raw`, both alive across the call.
            let r = unsafe { libc::sendmmsg(fd, shdr[sent..].as_mut_ptr(), (out - sent) as u32, 0) };
            if r <= 0 {
                // A full send buffer or an unreachable peer: drop the rest of the batch.
                c.send_errors += (out - sent) as u64;
                break;
            }
            sent += r as usize;
        }
        c.forwarded += sent as u64;
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwards_between_the_bound_sides_only() {
        let agent: SocketAddr = "192.0.2.2:40000".parse().unwrap();
        let conn: SocketAddr = "198.51.100.2:40001".parse().unwrap();
        let id = SessionId([7; 8]);
        let addrs = vec![canonical(agent, true), canonical(conn, true)];
        let t = Table { index: HashMap::from([(id, 0)]), raw: addrs.iter().map(|a| sockaddr(*a)).collect(), addrs };
        let mut frame = vec![DATA];
        frame.extend_from_slice(&[7; 8]);
        frame.extend_from_slice(b"payload");
        assert!(matches!(t.classify(&frame, canonical(agent, true)), Verdict::To(1)));
        assert!(matches!(t.classify(&frame, canonical(conn, true)), Verdict::To(0)));
        assert!(matches!(t.classify(&frame, "[::ffff:192.0.2.9]:40000".parse().unwrap()), Verdict::UnboundSource));
        frame[1] = 8;
        assert!(matches!(t.classify(&frame, canonical(agent, true)), Verdict::UnknownSession));
        assert!(matches!(t.classify(&[0x40, 1, 2], canonical(agent, true)), Verdict::NotData));
        // The socket's own view of a v4-mapped source converts back and forth.
        let (ss, _) = sockaddr(canonical(agent, true));
        assert_eq!(from_storage(&ss), Some(canonical(agent, true)));
    }
}
