//! The path layer: the end-to-end QUIC connection addresses a stable virtual peer, and this
//! layer decides how each of its packets travels. Today that is always via the relay, in a
//! DATA frame of the session; a direct path after hole punching slots in here without the
//! tunnel noticing.

use std::net::SocketAddr;

use ztna_proto::SessionId;
use ztna_proto::frame::{DATA_HEADER_LEN, write_data_header};

/// Labels for the two ends of every tunnel as quiche sees them. They are never used as
/// network addresses: no packet is sent to them.
pub const VIRTUAL_AGENT: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::new(198, 51, 100, 1)), 1);
pub const VIRTUAL_CONNECTOR: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::new(198, 51, 100, 2)), 2);

/// How a packet leaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    Relay(SocketAddr),
}

impl Path {
    pub fn name(&self) -> &'static str {
        match self {
            Path::Relay(_) => "relay",
        }
    }
}

#[derive(Debug, Clone)]
pub struct PathLayer {
    session: SessionId,
    current: Path,
}

impl PathLayer {
    pub fn via_relay(session: SessionId, relay: SocketAddr) -> Self {
        PathLayer { session, current: Path::Relay(relay) }
    }

    pub fn current(&self) -> Path {
        self.current
    }

    /// Room to leave in front of a tunnel packet for the frame header.
    pub const HEADROOM: usize = DATA_HEADER_LEN;

    /// Frames the tunnel packet that sits at `buf[HEADROOM..HEADROOM + len]` in place and
    /// says where the datagram goes.
    pub fn wrap(&self, buf: &mut [u8], len: usize) -> (usize, SocketAddr) {
        let header: &mut [u8; DATA_HEADER_LEN] =
            (&mut buf[..DATA_HEADER_LEN]).try_into().unwrap_or_else(|_| unreachable!());
        write_data_header(&self.session, header);
        match self.current {
            Path::Relay(relay) => (DATA_HEADER_LEN + len, relay),
        }
    }
}
