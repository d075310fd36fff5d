//! Path candidates for direct agent↔connector paths (PROTOCOL.md §14): the addresses at
//! which one side may be reachable, with RFC 8445 priorities, and their wire encoding in the
//! `Candidates` / `PeerCandidates` control messages: `[u8 kind][u32 priority][address]`.

use std::net::{IpAddr, SocketAddr};

use crate::addr;
use crate::wire::{Reader, WireError};

/// Most candidates in one message; a side has a few (its interfaces, its reflexive address).
pub const MAX_CANDIDATES: usize = 16;
/// Length of the per-session punch token the relay hands both sides (§14.3).
pub const PUNCH_TOKEN_LEN: usize = 16;

/// Where a candidate address comes from (RFC 8445 §5.1.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum CandidateKind {
    /// An address of one of the host's own interfaces.
    Host,
    /// The host's address as the relay observes it (QAD): its NAT's mapping.
    ServerReflexive,
    /// An address learned from a peer's authenticated punch (a mapping only the peer saw).
    PeerReflexive,
}

impl CandidateKind {
    pub const ALL: [CandidateKind; 3] = [CandidateKind::Host, CandidateKind::ServerReflexive, CandidateKind::PeerReflexive];

    /// RFC 8445 §5.1.2.2 recommended type preferences.
    pub fn type_preference(self) -> u32 {
        match self {
            CandidateKind::Host => 126,
            CandidateKind::PeerReflexive => 110,
            CandidateKind::ServerReflexive => 100,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            CandidateKind::Host => "host",
            CandidateKind::ServerReflexive => "srflx",
            CandidateKind::PeerReflexive => "prflx",
        }
    }

    fn to_u8(self) -> u8 {
        match self {
            CandidateKind::Host => 1,
            CandidateKind::ServerReflexive => 2,
            CandidateKind::PeerReflexive => 3,
        }
    }

    fn from_u8(v: u8) -> Result<Self, WireError> {
        match v {
            1 => Ok(CandidateKind::Host),
            2 => Ok(CandidateKind::ServerReflexive),
            3 => Ok(CandidateKind::PeerReflexive),
            _ => Err(WireError::Invalid("unknown candidate kind")),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Candidate {
    pub kind: CandidateKind,
    pub priority: u32,
    pub addr: SocketAddr,
}

impl Candidate {
    /// A candidate with its RFC 8445 priority (one component; IPv6 preferred over IPv4, as
    /// RFC 8421 suggests, since an IPv6 path has no NAT to keep open).
    pub fn new(kind: CandidateKind, addr: SocketAddr) -> Candidate {
        let addr = addr::canonical(addr);
        let local_preference = if addr.is_ipv6() { 65535 } else { 65534 };
        Candidate { kind, priority: priority(kind.type_preference(), local_preference, 1), addr }
    }
}

/// RFC 8445 §5.1.2.1: `2^24 * type + 2^8 * local + (256 - component)`.
pub fn priority(type_preference: u32, local_preference: u32, component: u32) -> u32 {
    (type_preference << 24) | ((local_preference & 0xffff) << 8) | (256 - component.clamp(1, 256))
}

/// RFC 8445 §6.1.2.3: the pair's priority from the controlling side's candidate (`g`) and the
/// controlled side's (`d`).
pub fn pair_priority(g: u32, d: u32) -> u64 {
    let (g, d) = (g as u64, d as u64);
    (1 << 32) * g.min(d) + 2 * g.max(d) + u64::from(g > d)
}

/// An address that can never be a useful candidate: unspecified, loopback, link-local
/// (needs a scope the peer cannot know), multicast or broadcast.
pub fn is_unusable(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_unspecified() || v4.is_loopback() || v4.is_link_local() || v4.is_multicast() || v4.is_broadcast(),
        IpAddr::V6(v6) => {
            v6.is_unspecified() || v6.is_loopback() || v6.is_multicast() || (v6.segments()[0] & 0xffc0) == 0xfe80 || v6.to_ipv4_mapped().is_some()
        }
    }
}

pub(crate) fn encode_list(out: &mut Vec<u8>, list: &[Candidate]) -> Result<(), &'static str> {
    if list.len() > MAX_CANDIDATES {
        return Err("candidate list");
    }
    out.push(list.len() as u8);
    for c in list {
        out.push(c.kind.to_u8());
        out.extend_from_slice(&c.priority.to_be_bytes());
        addr::encode(&c.addr, out);
    }
    Ok(())
}

pub(crate) fn decode_list(r: &mut Reader<'_>) -> Result<Vec<Candidate>, WireError> {
    let count = r.u8()? as usize;
    if count > MAX_CANDIDATES {
        return Err(WireError::Invalid("too many candidates"));
    }
    let mut out = Vec::with_capacity(count);
    for _ in 0..count {
        let kind = CandidateKind::from_u8(r.u8()?)?;
        let priority = r.u32()?;
        out.push(Candidate { kind, priority, addr: addr::decode(r)? });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn priorities_follow_rfc_8445() {
        let host = Candidate::new(CandidateKind::Host, "192.0.2.2:4000".parse().unwrap());
        let srflx = Candidate::new(CandidateKind::ServerReflexive, "203.0.113.2:4000".parse().unwrap());
        let prflx = Candidate::new(CandidateKind::PeerReflexive, "203.0.113.2:5000".parse().unwrap());
        let host6 = Candidate::new(CandidateKind::Host, "[2001:db8:a::2]:4000".parse().unwrap());
        assert_eq!(host.priority, (126 << 24) + (65534 << 8) + 255);
        assert!(host6.priority > host.priority && host.priority > prflx.priority && prflx.priority > srflx.priority);
        // A pair ranks by its weaker candidate first, and the controlling side breaks ties.
        assert!(pair_priority(host.priority, host.priority) > pair_priority(host.priority, srflx.priority));
        assert_eq!(pair_priority(5, 3), (1 << 32) * 3 + 10 + 1);
        assert_eq!(pair_priority(3, 5), (1 << 32) * 3 + 10);
    }

    #[test]
    fn lists_over_the_limit_and_unknown_kinds_are_malformed() {
        use crate::control::{DecodeError, Message, TYPE_CANDIDATES, TYPE_PATH_STATUS};
        let session = [7u8; crate::ID_LEN];
        let mut body = vec![TYPE_CANDIDATES];
        body.extend_from_slice(&session);
        body.push(MAX_CANDIDATES as u8 + 1);
        assert!(matches!(Message::decode(&body), Err(DecodeError::Malformed { .. })));
        let mut body = vec![TYPE_CANDIDATES];
        body.extend_from_slice(&session);
        body.extend_from_slice(&[1, 9, 0, 0, 0, 1]);
        addr::encode(&"192.0.2.2:1".parse().unwrap(), &mut body);
        assert!(matches!(Message::decode(&body), Err(DecodeError::Malformed { .. })), "kind 9");
        let mut body = vec![TYPE_PATH_STATUS];
        body.extend_from_slice(&session);
        body.push(2);
        assert!(matches!(Message::decode(&body), Err(DecodeError::Malformed { .. })));
        let too_many = vec![Candidate::new(CandidateKind::Host, "192.0.2.2:1".parse().unwrap()); MAX_CANDIDATES + 1];
        let msg = Message::Candidates { session: crate::SessionId(session), candidates: too_many };
        assert!(msg.encode(&mut Vec::new()).is_err());
    }

    #[test]
    fn unusable_addresses() {
        for ip in ["0.0.0.0", "127.0.0.1", "169.254.1.1", "224.0.0.1", "255.255.255.255", "::", "::1", "fe80::1", "ff02::1", "::ffff:192.0.2.1"] {
            assert!(is_unusable(ip.parse().unwrap()), "{ip}");
        }
        for ip in ["192.0.2.2", "203.0.113.5", "2001:db8:a::2", "fd00::1"] {
            assert!(!is_unusable(ip.parse().unwrap()), "{ip}");
        }
    }
}
