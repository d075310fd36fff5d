//! This side's own path candidates (PROTOCOL.md §14.1): host candidates from the real
//! interfaces, on the port of the client's one socket, so a peer that can route to an
//! interface address reaches the same socket that talks to the relay. The server-reflexive
//! candidate is the relay's to announce (it sees our mapping); peer-reflexive ones are
//! learned in [`crate::direct`].

use std::net::{IpAddr, SocketAddr};

use ztna_proto::candidate::{Candidate, CandidateKind, MAX_CANDIDATES, is_unusable};

use crate::path::is_label;

/// Whether this side tries direct paths, and which interface addresses it may advertise.
#[derive(Debug, Clone)]
pub struct DirectConfig {
    pub enabled: bool,
    /// Empty: every usable address.
    pub host_prefixes: Vec<Prefix>,
    /// Direct traffic on a socket of its own, bound here ([`crate::p2p`]); `None`: on the
    /// client's one socket.
    pub p2p_socket: Option<SocketAddr>,
}

impl Default for DirectConfig {
    fn default() -> Self {
        DirectConfig { enabled: true, host_prefixes: Vec::new(), p2p_socket: None }
    }
}

/// An address prefix, `ADDR/LEN`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Prefix {
    addr: IpAddr,
    len: u8,
}

impl Prefix {
    pub fn parse(s: &str) -> anyhow::Result<Prefix> {
        let (a, l) = s.trim().split_once('/').ok_or_else(|| anyhow::anyhow!("{s:?} is not ADDR/LEN"))?;
        let addr: IpAddr = a.parse().map_err(|_| anyhow::anyhow!("{a:?} in {s:?} is not an IP address"))?;
        let len: u8 = l.parse().map_err(|_| anyhow::anyhow!("{l:?} in {s:?} is not a prefix length"))?;
        if len > if addr.is_ipv4() { 32 } else { 128 } {
            anyhow::bail!("prefix length {len} is too long for {addr}");
        }
        Ok(Prefix { addr, len })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        let (a, b, bits) = match (self.addr, ip) {
            (IpAddr::V4(a), IpAddr::V4(b)) => (u32::from(a) as u128, u32::from(b) as u128, 32),
            (IpAddr::V6(a), IpAddr::V6(b)) => (u128::from(a), u128::from(b), 128),
            _ => return false,
        };
        let shift = bits - u32::from(self.len);
        shift >= bits || (a >> shift) == (b >> shift)
    }
}

/// Host candidates for a socket bound to `local`: every usable interface address of the
/// socket's family (both families for a dual-stack socket bound to `[::]`), with its port,
/// within the configured prefixes.
pub fn host_candidates(local: SocketAddr, cfg: &DirectConfig) -> Vec<Candidate> {
    let addrs = match if_addrs::get_if_addrs() {
        Ok(a) => a.into_iter().map(|i| i.ip()).collect(),
        Err(e) => {
            tracing::warn!(error = %e, "cannot list the interfaces; no host candidates");
            Vec::new()
        }
    };
    let allowed = |ip: &IpAddr| cfg.host_prefixes.is_empty() || cfg.host_prefixes.iter().any(|p| p.contains(*ip));
    from_addresses(local, addrs.into_iter().filter(allowed).collect())
}

/// The candidates among `ips` that a socket bound to `local` can use.
fn from_addresses(local: SocketAddr, ips: Vec<IpAddr>) -> Vec<Candidate> {
    let port = local.port();
    let fits = |ip: &IpAddr| match local.ip() {
        IpAddr::V6(v6) if v6.is_unspecified() => true,
        IpAddr::V4(v4) if v4.is_unspecified() => ip.is_ipv4(),
        bound => *ip == bound,
    };
    let mut out: Vec<Candidate> = ips
        .into_iter()
        .filter(|ip| !is_unusable(*ip) && fits(ip))
        .map(|ip| Candidate::new(CandidateKind::Host, SocketAddr::new(ip, port)))
        .filter(|c| !is_label(c.addr))
        .collect();
    out.sort_by_key(|c| std::cmp::Reverse(c.priority));
    out.dedup_by_key(|c| c.addr);
    // Room is left for the reflexive candidates in the same message.
    out.truncate(MAX_CANDIDATES - 4);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ips(list: &[&str]) -> Vec<IpAddr> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn host_candidates_follow_the_socket_family_and_skip_unusable_addresses() {
        let all = ips(&["127.0.0.1", "192.0.2.2", "169.254.3.3", "::1", "fe80::1", "2001:db8:a::2", "100::1"]);
        let dual: Vec<SocketAddr> = from_addresses("[::]:4000".parse().unwrap(), all.clone()).iter().map(|c| c.addr).collect();
        assert_eq!(dual, vec!["[2001:db8:a::2]:4000".parse().unwrap(), "192.0.2.2:4000".parse().unwrap()], "IPv6 first");
        let v4: Vec<SocketAddr> = from_addresses("0.0.0.0:4000".parse().unwrap(), all.clone()).iter().map(|c| c.addr).collect();
        assert_eq!(v4, vec!["192.0.2.2:4000".parse().unwrap()]);
        let bound: Vec<SocketAddr> = from_addresses("192.0.2.2:4000".parse().unwrap(), all).iter().map(|c| c.addr).collect();
        assert_eq!(bound, vec!["192.0.2.2:4000".parse().unwrap()]);
    }

    #[test]
    fn prefixes() {
        let p = Prefix::parse("192.0.2.0/24").unwrap();
        assert!(p.contains("192.0.2.77".parse().unwrap()) && !p.contains("192.0.3.1".parse().unwrap()));
        assert!(!p.contains("2001:db8::1".parse().unwrap()));
        let v6 = Prefix::parse("2001:db8::/32").unwrap();
        assert!(v6.contains("2001:db8:a::2".parse().unwrap()) && !v6.contains("2001:db9::1".parse().unwrap()));
        assert!(Prefix::parse("0.0.0.0/0").unwrap().contains("203.0.113.1".parse().unwrap()));
        assert!(Prefix::parse("192.0.2.1/32").unwrap().contains("192.0.2.1".parse().unwrap()));
        for bad in ["192.0.2.0", "192.0.2.0/33", "x/8", "::/129", "10.0.0.0/y"] {
            assert!(Prefix::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn this_machine_has_candidates_or_none_without_failing() {
        // Whatever the interfaces are, gathering never yields an unusable address.
        for c in host_candidates("[::]:4000".parse().unwrap(), &DirectConfig::default()) {
            assert!(!is_unusable(c.addr.ip()) && c.kind == CandidateKind::Host && c.addr.port() == 4000);
        }
    }
}
