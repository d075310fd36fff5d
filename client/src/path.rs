//! The path layer: how each packet of the end-to-end QUIC connection really travels
//! (PROTOCOL.md §13.7, §14). Every packet is a DATA frame of the session; it goes via the
//! relay, or straight to the peer once a direct path is validated ([`crate::direct`] decides
//! which). quiche sees each real path as its own path, so RTT, congestion window and MTU are
//! kept per path and a new path starts fresh, and it validates a path before using it; the
//! relay path stays as the warm fallback.
//!
//! **Addresses as quiche sees them.** The relay path is a pair of labels (below); a direct
//! path is this side's label and the peer's real address, so the address quiche sends a
//! packet to *is* where the packet goes.
//!
//! **Virtual addresses.** quiche wants an address pair for every packet. The tunnel gives it
//! labels from `100::/64`, the IPv6 discard-only prefix (RFC 6666): no host has such an
//! address and no router forwards one, so a label can never be mistaken for a host of the
//! deployment (the lab's hosts use the documentation ranges) nor leak as a destination. The
//! relay path is `[100::1]:1` on the agent's side and `[100::2]:2` on the connector's; later
//! per-path labels take the form `100::<path>`. No packet is ever sent to a label.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use ztna_proto::SessionId;
use ztna_proto::frame::{self, DATA_HEADER_LEN, Frame, write_data_header};

use crate::direct::{DirectPaths, Role};

/// The agent's end of the relay path, as quiche sees it.
pub const VIRTUAL_AGENT: SocketAddr = label(1, 1);
/// The connector's end of the relay path, as quiche sees it.
pub const VIRTUAL_CONNECTOR: SocketAddr = label(2, 2);

/// `[100::<path>]:port`.
const fn label(path: u16, port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V6(Ipv6Addr::new(0x100, 0, 0, 0, 0, 0, 0, path)), port)
}

/// True for an address of the label range `100::/64`.
pub fn is_label(addr: SocketAddr) -> bool {
    match addr.ip() {
        IpAddr::V6(ip) => ip.segments()[..4] == [0x100, 0, 0, 0],
        IpAddr::V4(_) => false,
    }
}

/// Which end of the tunnel this is: the agent is the QUIC client, the connector the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Agent,
    Connector,
}

impl Side {
    pub fn peer(self) -> Side {
        match self {
            Side::Agent => Side::Connector,
            Side::Connector => Side::Agent,
        }
    }

    /// This side's label on the relay path.
    pub fn label(self) -> SocketAddr {
        match self {
            Side::Agent => VIRTUAL_AGENT,
            Side::Connector => VIRTUAL_CONNECTOR,
        }
    }
}

/// How a packet leaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    Relay(SocketAddr),
    Direct(SocketAddr),
}

impl Path {
    /// The value of the `path` metric label.
    pub fn name(&self) -> &'static str {
        match self {
            Path::Relay(_) => "relay",
            Path::Direct(_) => "direct",
        }
    }
}

/// The paths of one tunnel. Relay frames carry the current relay session; direct frames
/// carry the tunnel's id (its first session), which both ends keep when the tunnel moves to a
/// new relay session (after a relay restart), so the direct path never notices the move.
#[derive(Debug, Clone)]
pub struct PathLayer {
    id: SessionId,
    session: SessionId,
    side: Side,
    relay: SocketAddr,
    pub direct: DirectPaths,
}

impl PathLayer {
    /// Room to leave in front of a tunnel packet for the frame header.
    pub const HEADROOM: usize = DATA_HEADER_LEN;

    /// The agent's side of a tunnel carried by the relay; the tunnel says which side it is
    /// ([`for_side`](Self::for_side)).
    pub fn via_relay(session: SessionId, relay: SocketAddr) -> Self {
        PathLayer { id: session, session, side: Side::Agent, relay, direct: DirectPaths::new(Role::Controlling) }
    }

    pub fn for_side(self, side: Side) -> Self {
        let role = match side {
            Side::Agent => Role::Controlling,
            Side::Connector => Role::Controlled,
        };
        PathLayer { side, direct: DirectPaths::new(role), ..self }
    }

    pub fn relay(&self) -> SocketAddr {
        self.relay
    }

    /// The relay session that carries the tunnel now.
    pub fn session(&self) -> SessionId {
        self.session
    }

    /// The tunnel's id: its first relay session, for the tunnel's whole life.
    pub fn id(&self) -> SessionId {
        self.id
    }

    /// The tunnel now rides relay session `session` (the old one was lost with the relay).
    pub fn rebind(&mut self, session: SessionId) {
        self.session = session;
    }

    pub fn current(&self) -> Path {
        match self.direct.active() {
            Some(peer) => Path::Direct(peer),
            None => Path::Relay(self.relay),
        }
    }

    /// This end's and the peer's labels, for quiche.
    pub fn local_label(&self) -> SocketAddr {
        self.side.label()
    }

    pub fn peer_label(&self) -> SocketAddr {
        self.side.peer().label()
    }

    /// The addresses quiche is told for a packet that came on the relay path.
    pub fn recv_info(&self) -> quiche::RecvInfo {
        quiche::RecvInfo { from: self.peer_label(), to: self.local_label() }
    }

    /// The tunnel packet inside `datagram`, if it is a DATA frame of this session: from the
    /// relay it came on the relay path, from anywhere else on a direct path (quiche decides
    /// whether it is authentic; nothing else is trusted about it). Anything else is not this
    /// tunnel's to read.
    pub fn unwrap<'a>(&self, datagram: &'a mut [u8], from: SocketAddr) -> Option<(&'a mut [u8], quiche::RecvInfo)> {
        let Ok(Frame::Data { session, .. }) = Frame::parse(datagram) else { return None };
        let via_relay = from == self.relay;
        if session != if via_relay { self.session } else { self.id } || is_label(from) {
            return None;
        }
        let info = if via_relay { self.recv_info() } else { quiche::RecvInfo { from, to: self.local_label() } };
        Some((&mut datagram[frame::DATA_HEADER_LEN..], info))
    }

    /// Frames the tunnel packet that sits at `buf[HEADROOM..HEADROOM + len]` in place and
    /// says where the datagram goes: the peer's label means the relay, a real address is a
    /// direct path. Another label has no path (`None`).
    pub fn wrap(&self, buf: &mut [u8], len: usize, to: SocketAddr) -> Option<(usize, SocketAddr)> {
        let (dest, session) = if to == self.peer_label() {
            (self.relay, &self.session)
        } else if !is_label(to) {
            (to, &self.id)
        } else {
            return None;
        };
        write_data_header(session, buf.first_chunk_mut::<DATA_HEADER_LEN>()?);
        Some((DATA_HEADER_LEN + len, dest))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SESSION: SessionId = SessionId([0x01, 2, 3, 4, 5, 6, 7, 8]);

    fn relay() -> SocketAddr {
        "192.0.2.1:4433".parse().unwrap()
    }

    fn frame_of(session: &SessionId, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        frame::encode_data(session, payload, &mut out);
        out
    }

    #[test]
    fn labels_are_discard_only_addresses_and_no_host() {
        assert_eq!(VIRTUAL_AGENT, "[100::1]:1".parse().unwrap());
        assert_eq!(VIRTUAL_CONNECTOR, "[100::2]:2".parse().unwrap());
        assert!(is_label(VIRTUAL_AGENT) && is_label(VIRTUAL_CONNECTOR));
        // The lab's hosts (documentation ranges) are not labels.
        for host in ["198.51.100.1:1", "198.51.100.2:2", "192.0.2.1:4433", "[2001:db8:c::1]:4433", "[100:0:0:1::1]:1"] {
            assert!(!is_label(host.parse().unwrap()), "{host}");
        }
        assert_eq!(Side::Agent.peer().label(), VIRTUAL_CONNECTOR);
        assert_eq!(Side::Connector.peer().label(), VIRTUAL_AGENT);
    }

    #[test]
    fn each_side_sees_itself_local_and_the_other_as_peer() {
        let agent = PathLayer::via_relay(SESSION, relay());
        assert_eq!((agent.local_label(), agent.peer_label()), (VIRTUAL_AGENT, VIRTUAL_CONNECTOR));
        let connector = agent.clone().for_side(Side::Connector);
        assert_eq!((connector.local_label(), connector.peer_label()), (VIRTUAL_CONNECTOR, VIRTUAL_AGENT));
        let info = connector.recv_info();
        assert_eq!((info.from, info.to), (VIRTUAL_AGENT, VIRTUAL_CONNECTOR));
        assert_eq!(connector.current(), Path::Relay(relay()));
        assert_eq!(connector.current().name(), "relay");
    }

    #[test]
    fn wrap_frames_in_place_towards_the_relay() {
        let path = PathLayer::via_relay(SESSION, relay());
        let mut buf = [0u8; 64];
        buf[PathLayer::HEADROOM..PathLayer::HEADROOM + 5].copy_from_slice(b"quic!");
        let (n, to) = path.wrap(&mut buf, 5, VIRTUAL_CONNECTOR).unwrap();
        assert_eq!(to, relay());
        assert_eq!(&buf[..n], &frame_of(&SESSION, b"quic!")[..]);
        assert_eq!(Frame::parse(&buf[..n]), Ok(Frame::Data { session: SESSION, payload: b"quic!" }));
    }

    #[test]
    fn wrap_maps_only_the_peer_label() {
        let path = PathLayer::via_relay(SESSION, relay());
        let mut buf = [0u8; 64];
        assert_eq!(path.wrap(&mut buf, 5, VIRTUAL_AGENT), None, "our own label is not a destination");
        let direct: SocketAddr = "203.0.113.3:5000".parse().unwrap();
        assert_eq!(path.wrap(&mut buf, 5, direct).map(|(_, to)| to), Some(direct), "a real address is a direct path");
        assert_eq!(path.wrap(&mut [0u8; 4], 0, VIRTUAL_CONNECTOR), None, "no room for the header");
        let connector = path.for_side(Side::Connector);
        assert_eq!(connector.wrap(&mut buf, 5, VIRTUAL_AGENT).map(|(_, to)| to), Some(relay()));
    }

    #[test]
    fn unwrap_takes_this_sessions_frames_from_the_relay() {
        let path = PathLayer::via_relay(SESSION, relay()).for_side(Side::Connector);
        let mut dgram = frame_of(&SESSION, b"packet");
        let (payload, info) = path.unwrap(&mut dgram, relay()).unwrap();
        assert_eq!(payload, b"packet");
        assert_eq!((info.from, info.to), (VIRTUAL_AGENT, VIRTUAL_CONNECTOR));
        // Round trip: what one side wraps, the other unwraps.
        let agent = PathLayer::via_relay(SESSION, relay());
        let mut buf = [0u8; 32];
        buf[PathLayer::HEADROOM..PathLayer::HEADROOM + 3].copy_from_slice(b"abc");
        let (n, to) = agent.wrap(&mut buf, 3, agent.peer_label()).unwrap();
        assert_eq!(path.unwrap(&mut buf[..n], to).map(|(p, _)| p.to_vec()), Some(b"abc".to_vec()));
    }

    #[test]
    fn a_rebound_tunnel_uses_the_new_session_on_the_relay_and_its_id_direct() {
        let mut path = PathLayer::via_relay(SESSION, relay());
        let new = SessionId([0x01, 9, 9, 9, 9, 9, 9, 9]);
        path.rebind(new);
        assert_eq!((path.id(), path.session()), (SESSION, new));
        let mut buf = [0u8; 32];
        let (n, to) = path.wrap(&mut buf, 3, path.peer_label()).unwrap();
        assert_eq!((Frame::parse(&buf[..n]).map(|f| matches!(f, Frame::Data { session, .. } if session == new)), to), (Ok(true), relay()));
        let peer: SocketAddr = "203.0.113.3:5000".parse().unwrap();
        let (n, _) = path.wrap(&mut buf, 3, peer).unwrap();
        assert!(matches!(Frame::parse(&buf[..n]), Ok(Frame::Data { session, .. }) if session == SESSION));
        assert!(path.unwrap(&mut frame_of(&new, b"x"), relay()).is_some());
        assert!(path.unwrap(&mut frame_of(&SESSION, b"x"), relay()).is_none(), "the lost session is over on the relay");
        assert!(path.unwrap(&mut frame_of(&SESSION, b"x"), peer).is_some());
        assert!(path.unwrap(&mut frame_of(&new, b"x"), peer).is_none(), "direct frames carry the tunnel's id");
    }

    #[test]
    fn unwrap_rejects_other_sessions_sources_and_kinds() {
        let path = PathLayer::via_relay(SESSION, relay());
        let other = SessionId([0x01, 2, 3, 4, 5, 6, 7, 9]);
        assert!(path.unwrap(&mut frame_of(&other, b"x"), relay()).is_none(), "another session");
        let peer: SocketAddr = "192.0.2.9:4433".parse().unwrap();
        let (_, info) = path.unwrap(&mut frame_of(&SESSION, b"x"), peer).unwrap();
        assert_eq!((info.from, info.to), (peer, VIRTUAL_AGENT), "a direct packet is the peer's real address to quiche");
        assert!(path.unwrap(&mut frame_of(&SESSION, b"x"), VIRTUAL_CONNECTOR).is_none(), "never from a label");
        assert!(path.unwrap(&mut [0x40, 1, 2, 3], relay()).is_none(), "a QUIC packet");
        assert!(path.unwrap(&mut [frame::TYPE_DATA, 1, 2], relay()).is_none(), "a short DATA frame");
        let mut probe = Vec::new();
        frame::encode_qad_probe(7, &mut probe);
        assert!(path.unwrap(&mut probe, relay()).is_none(), "a QAD probe");
        assert!(path.unwrap(&mut frame_of(&SESSION, b""), relay()).is_some_and(|(p, _)| p.is_empty()));
    }
}
