//! Conversions between `SocketAddr` and `sockaddr_storage` without allocation.
//! Addresses leave here canonical (IPv4-mapped IPv6 as IPv4) and are mapped back to IPv6
//! when the socket is IPv6, so the rest of the relay sees one form per peer.

use std::mem;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};

pub fn from_storage(ss: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match ss.ss_family as i32 {
        libc::AF_INET => {
            // SAFETY: the family says this storage holds a sockaddr_in.
            let sin = unsafe { &*(ss as *const _ as *const libc::sockaddr_in) };
            let ip = Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
            Some(SocketAddr::V4(SocketAddrV4::new(ip, u16::from_be(sin.sin_port))))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says this storage holds a sockaddr_in6.
            let sin6 = unsafe { &*(ss as *const _ as *const libc::sockaddr_in6) };
            let ip = Ipv6Addr::from(sin6.sin6_addr.s6_addr);
            let port = u16::from_be(sin6.sin6_port);
            Some(match ip.to_ipv4_mapped() {
                Some(v4) => SocketAddr::new(IpAddr::V4(v4), port),
                None => SocketAddr::V6(SocketAddrV6::new(ip, port, sin6.sin6_flowinfo, sin6.sin6_scope_id)),
            })
        }
        _ => None,
    }
}

/// Writes `addr` for a socket of the given family; returns the address length.
pub fn to_storage(addr: &SocketAddr, socket_is_v6: bool, ss: &mut libc::sockaddr_storage) -> libc::socklen_t {
    let v6 = match (addr, socket_is_v6) {
        (SocketAddr::V4(v4), false) => {
            // SAFETY: sockaddr_storage is large and aligned enough for sockaddr_in.
            let sin = unsafe { &mut *(ss as *mut _ as *mut libc::sockaddr_in) };
            sin.sin_family = libc::AF_INET as libc::sa_family_t;
            sin.sin_port = v4.port().to_be();
            sin.sin_addr.s_addr = u32::from(*v4.ip()).to_be();
            return mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        }
        (SocketAddr::V4(v4), true) => SocketAddrV6::new(v4.ip().to_ipv6_mapped(), v4.port(), 0, 0),
        (SocketAddr::V6(v6), _) => *v6,
    };
    // SAFETY: sockaddr_storage is large and aligned enough for sockaddr_in6.
    let sin6 = unsafe { &mut *(ss as *mut _ as *mut libc::sockaddr_in6) };
    sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
    sin6.sin6_port = v6.port().to_be();
    sin6.sin6_flowinfo = v6.flowinfo();
    sin6.sin6_addr.s6_addr = v6.ip().octets();
    sin6.sin6_scope_id = v6.scope_id();
    mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_canonicalizes() {
        // SAFETY: all-zero is a valid sockaddr_storage.
        let mut ss: libc::sockaddr_storage = unsafe { mem::zeroed() };
        for (addr, v6sock) in [("192.0.2.1:80", false), ("192.0.2.1:80", true), ("[2001:db8::1]:443", true)] {
            let a: SocketAddr = addr.parse().unwrap();
            to_storage(&a, v6sock, &mut ss);
            assert_eq!(from_storage(&ss), Some(a), "{addr} via v6 socket: {v6sock}");
        }
    }
}
