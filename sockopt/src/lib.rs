//! Socket options shared by the relay and the clients.

use socket2::Socket;

/// Sets both socket buffers to `bytes`. The kernel caps SO_RCVBUF/SO_SNDBUF at
/// net.core.rmem_max/wmem_max (208 KiB by default, which drops datagrams under load); a
/// privileged process may exceed the cap with the FORCE variants, so try those too.
pub fn grow_buffers(sock: &Socket, bytes: usize) {
    let _ = sock.set_recv_buffer_size(bytes);
    let _ = sock.set_send_buffer_size(bytes);
    let val = bytes as libc::c_int;
    for (opt, now) in [
        (libc::SO_RCVBUFFORCE, sock.recv_buffer_size().unwrap_or(0)),
        (libc::SO_SNDBUFFORCE, sock.send_buffer_size().unwrap_or(0)),
    ] {
        if now < bytes {
            // SAFETY: setsockopt with a pointer to a c_int that lives across the call.
            unsafe {
                libc::setsockopt(
                    std::os::fd::AsRawFd::as_raw_fd(sock),
                    libc::SOL_SOCKET,
                    opt,
                    (&val as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                );
            }
        }
    }
}

