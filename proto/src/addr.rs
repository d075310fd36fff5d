//! Socket address encoding used by QAD reports (control message and QAD reply frame).
//!
//! `family (4|6) | address (4|16 bytes) | port (u16)`. IPv4-mapped IPv6 addresses are
//! always reported as IPv4: that is what the client's own socket sees.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::wire::{Reader, WireError};

pub const FAMILY_V4: u8 = 4;
pub const FAMILY_V6: u8 = 6;
/// Largest encoded address (IPv6).
pub const MAX_ENCODED_LEN: usize = 1 + 16 + 2;

/// Returns the address with an IPv4-mapped IPv6 address turned into plain IPv4.
pub fn canonical(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), v6.port()),
            None => addr,
        },
        SocketAddr::V4(_) => addr,
    }
}

pub fn encoded_len(addr: &SocketAddr) -> usize {
    match canonical(*addr) {
        SocketAddr::V4(_) => 1 + 4 + 2,
        SocketAddr::V6(_) => MAX_ENCODED_LEN,
    }
}

pub fn encode(addr: &SocketAddr, out: &mut Vec<u8>) {
    match canonical(*addr) {
        SocketAddr::V4(a) => {
            out.push(FAMILY_V4);
            out.extend_from_slice(&a.ip().octets());
        }
        SocketAddr::V6(a) => {
            out.push(FAMILY_V6);
            out.extend_from_slice(&a.ip().octets());
        }
    }
    out.extend_from_slice(&addr.port().to_be_bytes());
}

/// Writes the encoding into a fixed buffer (no allocation); returns the bytes written.
pub fn encode_into(addr: &SocketAddr, out: &mut [u8]) -> Option<usize> {
    let len = encoded_len(addr);
    let out = out.get_mut(..len)?;
    match canonical(*addr) {
        SocketAddr::V4(a) => {
            out[0] = FAMILY_V4;
            out[1..5].copy_from_slice(&a.ip().octets());
        }
        SocketAddr::V6(a) => {
            out[0] = FAMILY_V6;
            out[1..17].copy_from_slice(&a.ip().octets());
        }
    }
    out[len - 2..].copy_from_slice(&addr.port().to_be_bytes());
    Some(len)
}

/// Decodes an address. An IPv4-mapped IPv6 address on the wire (which `encode` never
/// writes) is returned as IPv4, like everything else this module hands out, so a decoded
/// address always re-encodes to the same value.
pub(crate) fn decode(r: &mut Reader<'_>) -> Result<SocketAddr, WireError> {
    let ip = match r.u8()? {
        FAMILY_V4 => IpAddr::V4(Ipv4Addr::from(r.array::<4>()?)),
        FAMILY_V6 => IpAddr::V6(Ipv6Addr::from(r.array::<16>()?)),
        _ => return Err(WireError::Invalid("unknown address family")),
    };
    Ok(canonical(SocketAddr::new(ip, r.u16()?)))
}
