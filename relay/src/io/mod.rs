//! Datagram I/O for the workers. Each worker owns one `SO_REUSEPORT` UDP socket bound to the
//! relay port, and moves datagrams in batches with buffers allocated once at start.
//! Backends: `mmsg` (recvmmsg/sendmmsg, works everywhere). io_uring joins in the data-path work.

pub mod mmsg;
pub mod sockaddr;

use std::net::{SocketAddr, UdpSocket};

use anyhow::{Context, Result};
use socket2::{Domain, Protocol, Socket, Type};

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
