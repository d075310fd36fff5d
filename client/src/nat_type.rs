//! What kind of NAT this host is behind, RFC 5780 style, against the relay's NAT-test
//! responder (PROTOCOL.md §14.9), and which peers it can therefore reach directly.
//!
//! The tests: from one socket, is the mapping the same toward the responder's primary
//! address, its alternate address, and its alternate port (mapping behaviour)? From a fresh
//! socket that has sent only to the primary, does an answer get in from the alternate address,
//! or from the primary address's other port (filtering behaviour)? [`classify`] turns the
//! answers into a [`NatBehaviour`]; [`discover`] asks them over the network.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio::net::UdpSocket;
use ztna_proto::addr;
use ztna_proto::nat_test::{CHANGE_ADDRESS, CHANGE_PORT, NAT_PROBE_LEN, NAT_REPLY_MAX_LEN, NatProbe, NatReply};

/// How a NAT picks the public address of a flow (RFC 4787 §4.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mapping {
    EndpointIndependent,
    AddressDependent,
    AddressAndPortDependent,
}

/// Which packets a NAT lets in to a mapping (RFC 4787 §5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Filtering {
    EndpointIndependent,
    AddressDependent,
    AddressAndPortDependent,
}

impl Mapping {
    /// RFC 4787's name.
    pub fn name(self) -> &'static str {
        match self {
            Mapping::EndpointIndependent => "endpoint-independent",
            Mapping::AddressDependent => "address-dependent",
            Mapping::AddressAndPortDependent => "address-and-port-dependent",
        }
    }
}

impl Filtering {
    /// RFC 4787's name.
    pub fn name(self) -> &'static str {
        match self {
            Filtering::EndpointIndependent => "endpoint-independent",
            Filtering::AddressDependent => "address-dependent",
            Filtering::AddressAndPortDependent => "address-and-port-dependent",
        }
    }
}

/// The answers of the tests; `None` where no reply came.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Observations {
    pub local: SocketAddr,
    /// Mapped address toward the primary address and port.
    pub primary: SocketAddr,
    /// Toward the alternate address, primary port.
    pub alternate_address: Option<SocketAddr>,
    /// Toward the alternate address and port.
    pub alternate_both: Option<SocketAddr>,
    /// A reply from the alternate address and port got in.
    pub filter_let_in_other_address: bool,
    /// A reply from the primary address's other port got in.
    pub filter_let_in_other_port: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NatBehaviour {
    /// The address the responder saw (the server-reflexive candidate).
    pub mapped: SocketAddr,
    /// False when the mapped address is the local one (a public address, perhaps firewalled).
    pub translated: bool,
    pub mapping: Mapping,
    pub filtering: Filtering,
}

/// The peer types of the NAT lab, for "which peers can this host reach directly".
pub const PEER_TYPES: [(&str, NatBehaviour); 5] = {
    const fn peer(translated: bool, mapping: Mapping, filtering: Filtering) -> NatBehaviour {
        let mapped = SocketAddr::V4(std::net::SocketAddrV4::new(std::net::Ipv4Addr::UNSPECIFIED, 0));
        NatBehaviour { mapped, translated, mapping, filtering }
    }
    use Filtering as F;
    use Mapping as M;
    [
        ("no NAT", peer(false, M::EndpointIndependent, F::EndpointIndependent)),
        ("full cone", peer(true, M::EndpointIndependent, F::EndpointIndependent)),
        ("address-restricted cone", peer(true, M::EndpointIndependent, F::AddressDependent)),
        ("port-restricted cone", peer(true, M::EndpointIndependent, F::AddressAndPortDependent)),
        ("symmetric", peer(true, M::AddressAndPortDependent, F::AddressAndPortDependent)),
    ]
};

impl NatBehaviour {
    /// The usual name of this behaviour.
    pub fn name(&self) -> &'static str {
        match (self.translated, self.mapping, self.filtering) {
            (false, _, Filtering::EndpointIndependent) => "no NAT",
            (false, _, _) => "no NAT, firewalled",
            (true, Mapping::EndpointIndependent, Filtering::EndpointIndependent) => "full cone",
            (true, Mapping::EndpointIndependent, Filtering::AddressDependent) => "address-restricted cone",
            (true, Mapping::EndpointIndependent, Filtering::AddressAndPortDependent) => "port-restricted cone",
            (true, _, _) => "symmetric",
        }
    }

    /// Whether hole punching as this product does it (PROTOCOL.md §14) opens a direct path
    /// between hosts with these behaviours. An endpoint-independent mapping is what the
    /// peer's punches aim at; a mapping that changes per destination reaches only a peer that
    /// lets in a port it has not sent to (its filtering ignores the port), which then learns
    /// the real mapping as a peer-reflexive candidate. Two changing mappings meet only by
    /// port guessing, which is not done here.
    pub fn reaches_directly(&self, peer: &NatBehaviour) -> bool {
        let accepts_unknown_port = |b: &NatBehaviour| b.mapping == Mapping::EndpointIndependent && b.filtering != Filtering::AddressAndPortDependent;
        match (self.mapping == Mapping::EndpointIndependent, peer.mapping == Mapping::EndpointIndependent) {
            (true, true) => true,
            (false, true) => accepts_unknown_port(peer),
            (true, false) => accepts_unknown_port(self),
            (false, false) => false,
        }
    }

    /// The lab's peer types split into those reached directly and those left to the relay.
    pub fn reach(&self) -> (Vec<&'static str>, Vec<&'static str>) {
        let (direct, relayed): (Vec<_>, Vec<_>) = PEER_TYPES.iter().partition(|(_, p)| self.reaches_directly(p));
        (direct.iter().map(|(n, _)| *n).collect(), relayed.iter().map(|(n, _)| *n).collect())
    }
}

/// RFC 5780 §4.3 and §4.4, on the tests' answers.
pub fn classify(o: &Observations) -> NatBehaviour {
    let mapping = match (o.alternate_address, o.alternate_both) {
        (Some(m2), _) if m2 == o.primary => Mapping::EndpointIndependent,
        (Some(m2), Some(m3)) if m3 == m2 => Mapping::AddressDependent,
        // No answer from the alternate address: nothing says the mapping is kept.
        _ => Mapping::AddressAndPortDependent,
    };
    let filtering = if o.filter_let_in_other_address {
        Filtering::EndpointIndependent
    } else if o.filter_let_in_other_port {
        Filtering::AddressDependent
    } else {
        Filtering::AddressAndPortDependent
    };
    NatBehaviour { mapped: o.primary, translated: addr::canonical(o.local) != o.primary, mapping, filtering }
}

/// Tries per test, and the wait for each.
const TRIES: usize = 4;
const WAIT: Duration = Duration::from_millis(250);

/// Sends one probe (retransmitted) and returns the reply that came from `expect_from`, or
/// `None` when none did in time.
async fn ask(sock: &UdpSocket, to: SocketAddr, change: u8, expect_from: Option<SocketAddr>) -> Result<Option<NatReply>> {
    let nonce: u64 = rand::random();
    let mut probe = [0u8; NAT_PROBE_LEN];
    NatProbe { nonce, change }.write(&mut probe);
    let mut buf = [0u8; NAT_REPLY_MAX_LEN + 1];
    for _ in 0..TRIES {
        sock.send_to(&probe, to).await.with_context(|| format!("sending a NAT probe to {to}"))?;
        let deadline = tokio::time::Instant::now() + WAIT;
        while let Ok(got) = tokio::time::timeout_at(deadline, sock.recv_from(&mut buf)).await {
            let (n, from) = got?;
            match NatReply::parse(&buf[..n]) {
                Ok(r) if r.nonce == nonce && expect_from.is_none_or(|e| addr::canonical(from) == e) => return Ok(Some(r)),
                _ => continue,
            }
        }
    }
    Ok(None)
}

async fn socket_toward(server: SocketAddr) -> Result<UdpSocket> {
    let any: SocketAddr = if server.is_ipv4() { "0.0.0.0:0".parse()? } else { "[::]:0".parse()? };
    Ok(UdpSocket::bind(any).await?)
}

/// The local address a socket uses toward `server` (its bound address is the wildcard).
async fn local_toward(server: SocketAddr) -> Result<SocketAddr> {
    let s = socket_toward(server).await?;
    s.connect(server).await?;
    Ok(s.local_addr()?)
}

/// Runs the tests against the responder at `server` (its primary address and port).
pub async fn discover(server: SocketAddr) -> Result<NatBehaviour> {
    let server = addr::canonical(server);
    let mapping_sock = socket_toward(server).await?;
    let Some(first) = ask(&mapping_sock, server, 0, Some(server)).await? else {
        bail!("no answer from a NAT-test responder at {server} (is the relay started with --nat-test?)");
    };
    let other = addr::canonical(first.other);
    if other.ip() == server.ip() || other.port() == server.port() {
        bail!("the NAT-test responder at {server} names {other} as its other address: it needs another address and port");
    }
    let alt_address = SocketAddr::new(other.ip(), server.port());
    let m2 = ask(&mapping_sock, alt_address, 0, Some(alt_address)).await?.map(|r| r.observed);
    let m3 = match m2 {
        Some(m2) if m2 != first.observed => ask(&mapping_sock, other, 0, Some(other)).await?.map(|r| r.observed),
        _ => None,
    };
    let mut local = mapping_sock.local_addr()?;
    local.set_ip(local_toward(server).await?.ip());

    // A fresh socket, so that no earlier test has opened its filter toward the other ports.
    let filter_sock = socket_toward(server).await?;
    if ask(&filter_sock, server, 0, Some(server)).await?.is_none() {
        bail!("the NAT-test responder at {server} stopped answering");
    }
    let other_port = SocketAddr::new(server.ip(), other.port());
    let in_other_address = ask(&filter_sock, server, CHANGE_ADDRESS | CHANGE_PORT, Some(other)).await?.is_some();
    let in_other_port = in_other_address || ask(&filter_sock, server, CHANGE_PORT, Some(other_port)).await?.is_some();

    Ok(classify(&Observations {
        local,
        primary: first.observed,
        alternate_address: m2,
        alternate_both: m3,
        filter_let_in_other_address: in_other_address,
        filter_let_in_other_port: in_other_port,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn obs(m2: Option<&str>, m3: Option<&str>, other_address: bool, other_port: bool) -> Observations {
        Observations {
            local: a("192.0.2.2:5000"),
            primary: a("203.0.113.2:5000"),
            alternate_address: m2.map(a),
            alternate_both: m3.map(a),
            filter_let_in_other_address: other_address,
            filter_let_in_other_port: other_port,
        }
    }

    #[test]
    fn the_lab_router_types_are_told_apart() {
        let cone = |o, p| classify(&obs(Some("203.0.113.2:5000"), None, o, p));
        assert_eq!(cone(true, true).name(), "full cone");
        assert_eq!(cone(false, true).name(), "address-restricted cone");
        assert_eq!(cone(false, false).name(), "port-restricted cone");
        let symmetric = classify(&obs(Some("203.0.113.2:41000"), Some("203.0.113.2:52000"), false, false));
        assert_eq!((symmetric.mapping, symmetric.name()), (Mapping::AddressAndPortDependent, "symmetric"));
        let by_address = classify(&obs(Some("203.0.113.2:41000"), Some("203.0.113.2:41000"), false, false));
        assert_eq!(by_address.mapping, Mapping::AddressDependent);
        let public = classify(&Observations { local: a("203.0.113.2:5000"), ..obs(Some("203.0.113.2:5000"), None, true, true) });
        assert_eq!(public.name(), "no NAT");
        assert!(!public.translated);
        // A mapping never confirmed by the alternate address is not assumed to hold.
        assert_eq!(classify(&obs(None, None, false, false)).mapping, Mapping::AddressAndPortDependent);
    }

    #[test]
    fn reach_matches_the_nat_lab_matrix() {
        let by_name = |n: &str| PEER_TYPES.iter().find(|(name, _)| *name == n).unwrap().1;
        let (direct, relayed) = by_name("port-restricted cone").reach();
        assert_eq!(direct, ["no NAT", "full cone", "address-restricted cone", "port-restricted cone"]);
        assert_eq!(relayed, ["symmetric"]);
        let (direct, relayed) = by_name("symmetric").reach();
        assert_eq!(direct, ["no NAT", "full cone", "address-restricted cone"]);
        assert_eq!(relayed, ["port-restricted cone", "symmetric"]);
        // Symmetric, as the relation it is.
        for (_, x) in PEER_TYPES {
            for (_, y) in PEER_TYPES {
                assert_eq!(x.reaches_directly(&y), y.reaches_directly(&x));
            }
        }
    }
}
