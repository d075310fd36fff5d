//! The datapath backends on real loopback sockets: batched receive (GRO-coalesced bursts
//! split back into datagrams), batched sends (GSO runs arrive as separate datagrams), and
//! the mailbox eventfd waking `wait`.

use std::net::{SocketAddr, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use ztna_relay::config::IoBackend;
use ztna_relay::io::{Datapath, bind_worker_socket};

fn eventfd() -> OwnedFd {
    // SAFETY: eventfd returns a new descriptor or -1 (checked).
    let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: a fresh descriptor we own.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// Sends `data` as one GSO send of `seg`-byte datagrams (the kernel coalesces them again
/// for a GRO socket on loopback).
fn send_gso(sock: &UdpSocket, to: SocketAddr, data: &[u8], seg: u16) -> bool {
    let SocketAddr::V4(v4) = to else { panic!("v4 only") };
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as u16,
        sin_port: v4.port().to_be(),
        sin_addr: libc::in_addr { s_addr: u32::from(*v4.ip()).to_be() },
        sin_zero: [0; 8],
    };
    let mut iov = libc::iovec { iov_base: data.as_ptr() as *mut _, iov_len: data.len() };
    let mut cmsg = [0u64; 4];
    // SAFETY: building a msghdr over live local buffers for one sendmsg call.
    unsafe {
        let mut hdr: libc::msghdr = std::mem::zeroed();
        hdr.msg_name = &sin as *const _ as *mut _;
        hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as u32;
        hdr.msg_iov = &mut iov;
        hdr.msg_iovlen = 1;
        hdr.msg_control = cmsg.as_mut_ptr().cast();
        hdr.msg_controllen = libc::CMSG_SPACE(2) as usize;
        let c = libc::CMSG_FIRSTHDR(&hdr);
        (*c).cmsg_level = libc::SOL_UDP;
        (*c).cmsg_type = libc::UDP_SEGMENT;
        (*c).cmsg_len = libc::CMSG_LEN(2) as usize;
        libc::CMSG_DATA(c).cast::<u16>().write_unaligned(seg);
        libc::sendmsg(sock.as_raw_fd(), &hdr, 0) == data.len() as isize
    }
}

fn round_trip(backend: IoBackend) {
    let relay_sock = bind_worker_socket("127.0.0.1:0".parse().unwrap()).unwrap();
    let relay_addr = relay_sock.local_addr().unwrap();
    let wake = eventfd();
    let mut dp = Datapath::new(backend, &relay_sock, false, wake.as_raw_fd()).unwrap();
    assert_eq!(dp.backend(), backend);
    let mut rx = dp.rx_batch();
    let client = UdpSocket::bind("127.0.0.1:0").unwrap();
    let client_addr = client.local_addr().unwrap();

    // Receive: 5 plain datagrams, then a GSO burst of 10 x 1000 + 1 x 300 bytes.
    for i in 0..5u8 {
        client.send_to(&[i; 700], relay_addr).unwrap();
    }
    let mut burst = Vec::new();
    for i in 0..10u8 {
        burst.extend_from_slice(&[100 + i; 1000]);
    }
    burst.extend_from_slice(&[200; 300]);
    let gso_sent = send_gso(&client, relay_addr, &burst, 1000);
    let want = if gso_sent { 16 } else { 5 };
    let mut got: Vec<(u8, usize)> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    while got.len() < want && Instant::now() < deadline {
        dp.wait(&mut rx, Duration::from_millis(100));
        loop {
            let (n, more) = dp.recv(&mut rx).unwrap();
            for i in 0..n {
                let (buf, from, truncated) = rx.get(i);
                assert!(!truncated);
                assert_eq!(from, Some(client_addr));
                assert!(buf.iter().all(|b| *b == buf[0]), "one datagram's bytes, not a mix");
                got.push((buf[0], buf.len()));
            }
            if !more {
                break;
            }
        }
    }
    let mut expect: Vec<(u8, usize)> = (0..5u8).map(|i| (i, 700)).collect();
    if gso_sent {
        expect.extend((0..10u8).map(|i| (100 + i, 1000)));
        expect.push((200, 300));
    }
    assert_eq!(got, expect);

    // Send: 20 x 1200 (a GSO run), 1 x 500 (its short tail), then 3 others; all arrive apart.
    for i in 0..20u8 {
        dp.push(client_addr, &[i; 1200]);
    }
    dp.push(client_addr, &[20; 500]);
    for i in 21..24u8 {
        dp.push(client_addr, &[i; 64]);
    }
    assert_eq!(dp.pending(), 24);
    dp.flush();
    client.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut buf = [0u8; 65536];
    for i in 0..24u8 {
        let (n, from) = client.recv_from(&mut buf).unwrap();
        assert_eq!(from, relay_addr);
        let len = match i {
            0..20 => 1200,
            20 => 500,
            _ => 64,
        };
        assert_eq!((buf[0], n), (i, len), "datagram {i}");
    }
    // Completions are counted by the next wait at the latest.
    let deadline = Instant::now() + Duration::from_secs(2);
    while dp.sent_totals().0 < 24 && Instant::now() < deadline {
        dp.wait(&mut rx, Duration::from_millis(10));
    }
    assert_eq!(dp.sent_totals(), (24, 20 * 1200 + 500 + 3 * 64, 0));

    // The mailbox eventfd wakes the wait, and is drained by it.
    let one: u64 = 1;
    // SAFETY: writing 8 bytes to our eventfd.
    unsafe { libc::write(wake.as_raw_fd(), (&one as *const u64).cast(), 8) };
    let t = Instant::now();
    assert!(dp.wait(&mut rx, Duration::from_secs(2)), "mailbox fired");
    assert!(t.elapsed() < Duration::from_secs(1));
    assert!(!dp.wait(&mut rx, Duration::from_millis(20)), "drained: no second wake-up");
}

#[test]
fn mmsg_round_trip() {
    round_trip(IoBackend::Mmsg);
}

#[test]
fn uring_round_trip_with_gro_and_gso() {
    if let Err(why) = ztna_relay::io::uring::probe() {
        eprintln!("skipped: io_uring unavailable here: {why}");
        return;
    }
    round_trip(IoBackend::Uring);
}

#[test]
fn uring_send_pool_exhaustion_submits_and_reuses_slots() {
    if ztna_relay::io::uring::probe().is_err() {
        return;
    }
    let relay_sock = bind_worker_socket("127.0.0.1:0".parse().unwrap()).unwrap();
    let wake = eventfd();
    let mut dp = Datapath::new(IoBackend::Uring, &relay_sock, false, wake.as_raw_fd()).unwrap();
    let client = UdpSocket::bind("127.0.0.1:0").unwrap();
    grow_rcvbuf(&client);
    let to = client.local_addr().unwrap();
    // More than the slot pool: pushes past it must flush, reap and reuse slots.
    let n = ztna_relay::io::uring::TX_SLOTS * 3;
    for i in 0..n {
        dp.push(to, &(i as u32).to_be_bytes());
    }
    dp.flush();
    client.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut buf = [0u8; 64];
    let mut seen = 0;
    while let Ok(len) = client.recv(&mut buf) {
        assert_eq!(len, 4);
        seen += 1;
        if seen == n {
            break;
        }
    }
    let (sent, _, failed) = dp.sent_totals();
    assert_eq!(seen, n, "sent {sent}, failed {failed}");
}

/// A receive buffer big enough for the burst above.
fn grow_rcvbuf(sock: &UdpSocket) {
    let size: libc::c_int = 4 << 20;
    // SAFETY: setsockopt with a valid int.
    unsafe {
        libc::setsockopt(sock.as_raw_fd(), libc::SOL_SOCKET, libc::SO_RCVBUF, (&size as *const libc::c_int).cast(), 4);
    }
}
