//! The NAT lab of `deploy/lab/nat.sh`, for hole-punching tests: an "internet" bridge with the
//! relay (two addresses, for RFC 5780 tests) and a third-party host on it, and the agent and the
//! connector each behind a home router whose NAT type is chosen per side ([`NatType`]),
//! optionally with a one-way delay on each router's WAN link. Documentation addresses only,
//! under a prefix of the caller's own; everything goes when the [`NatLab`] is dropped (see
//! [`NsLab`]).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use anyhow::{Result, bail};

use crate::bins;
use crate::nslab::{LabHost, NsLab, tagged_prefix};

/// How a home router maps and filters (the script's `--agent-nat` / `--conn-nat`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NatType {
    /// Publicly routed: no NAT, no filter.
    None,
    /// Endpoint-independent mapping and filtering: anyone reaches a mapping.
    FullCone,
    /// Endpoint-independent mapping, address-and-port-dependent filtering.
    PortRestricted,
    /// A new mapping (random port) for every destination.
    Symmetric,
}

impl NatType {
    pub const ALL: [NatType; 4] = [NatType::None, NatType::FullCone, NatType::PortRestricted, NatType::Symmetric];

    /// The script's spelling.
    pub fn name(self) -> &'static str {
        match self {
            NatType::None => "none",
            NatType::FullCone => "full-cone",
            NatType::PortRestricted => "port-restricted",
            NatType::Symmetric => "symmetric",
        }
    }

    /// The same public address and port whatever the destination (all but symmetric).
    pub fn endpoint_independent_mapping(self) -> bool {
        self != NatType::Symmetric
    }

    /// Anyone may send to a host's address (its mapping) once it exists: none and full-cone.
    pub fn endpoint_independent_filtering(self) -> bool {
        matches!(self, NatType::None | NatType::FullCone)
    }
}

impl fmt::Display for NatType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for NatType {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<NatType> {
        match NatType::ALL.into_iter().find(|t| t.name() == s) {
            Some(t) => Ok(t),
            None => bail!("unknown NAT type {s:?} (one of: none, full-cone, port-restricted, symmetric)"),
        }
    }
}

/// Whether hole punching between an agent behind `agent` and a connector behind `conn` can
/// find a direct path: both mappings endpoint-independent (each side learns the other's
/// mapping from the relay), or one side symmetric and the other open to anyone (the symmetric
/// side's fresh mapping reaches it, and its replies go back through that mapping).
pub fn direct_expected(agent: NatType, conn: NatType) -> bool {
    match (agent.endpoint_independent_mapping(), conn.endpoint_independent_mapping()) {
        (true, true) => true,
        (false, false) => false,
        (false, true) => conn.endpoint_independent_filtering(),
        (true, false) => agent.endpoint_independent_filtering(),
    }
}

/// The hosts of the NAT lab (see the picture in nat.sh).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NatHost {
    Agent,
    Conn,
    Relay,
    /// The agent's home router.
    AgentRouter,
    /// The connector's home router.
    ConnRouter,
    /// The "internet": the bridge and the router between its hosts.
    Wan,
    /// A third-party internet host (forged packets, unsolicited traffic).
    Evil,
}

impl LabHost for NatHost {
    const ALL: &'static [NatHost] =
        &[NatHost::Agent, NatHost::Conn, NatHost::Relay, NatHost::AgentRouter, NatHost::ConnRouter, NatHost::Wan, NatHost::Evil];
    fn suffix(self) -> &'static str {
        match self {
            NatHost::Agent => "agent",
            NatHost::Conn => "conn",
            NatHost::Relay => "relay",
            NatHost::AgentRouter => "ra",
            NatHost::ConnRouter => "rc",
            NatHost::Wan => "wan",
            NatHost::Evil => "evil",
        }
    }
}

/// Addresses of the NAT lab (see the picture in nat.sh).
pub const WAN_V4: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);
pub const WAN_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xf, 0, 0, 0, 0, 1);
pub const RELAY_V4: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
/// The relay's second address (RFC 5780 tests).
pub const RELAY2_V4: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 11);
pub const RELAY_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xf, 0, 0, 0, 0, 0x10);
pub const RELAY2_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xf, 0, 0, 0, 0, 0x11);
pub const EVIL_V4: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 66);
pub const EVIL_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xf, 0, 0, 0, 0, 0x66);
pub const AGENT_ROUTER_WAN_V4: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 2);
pub const AGENT_ROUTER_WAN_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xf, 0, 0, 0, 0, 2);
pub const AGENT_ROUTER_LAN_V4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
pub const AGENT_ROUTER_LAN_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xa, 0, 0, 0, 0, 1);
pub const AGENT_V4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 2);
pub const AGENT_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xa, 0, 0, 0, 0, 2);
pub const CONN_ROUTER_WAN_V4: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 3);
pub const CONN_ROUTER_WAN_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xf, 0, 0, 0, 0, 3);
pub const CONN_ROUTER_LAN_V4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
pub const CONN_ROUTER_LAN_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xc, 0, 0, 0, 0, 1);
pub const CONN_V4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 2);
pub const CONN_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xc, 0, 0, 0, 0, 2);

/// One of the two home networks: the agent's or the connector's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NatSide {
    Agent,
    Conn,
}

impl NatSide {
    pub const BOTH: [NatSide; 2] = [NatSide::Agent, NatSide::Conn];

    /// The script's spelling (`block agent`).
    pub fn name(self) -> &'static str {
        match self {
            NatSide::Agent => "agent",
            NatSide::Conn => "conn",
        }
    }

    /// The host on the LAN.
    pub fn host(self) -> NatHost {
        match self {
            NatSide::Agent => NatHost::Agent,
            NatSide::Conn => NatHost::Conn,
        }
    }

    /// Its home router.
    pub fn router(self) -> NatHost {
        match self {
            NatSide::Agent => NatHost::AgentRouter,
            NatSide::Conn => NatHost::ConnRouter,
        }
    }

    /// The LAN host's own address.
    pub fn host_ip(self, v6: bool) -> IpAddr {
        match (self, v6) {
            (NatSide::Agent, false) => AGENT_V4.into(),
            (NatSide::Agent, true) => AGENT_V6.into(),
            (NatSide::Conn, false) => CONN_V4.into(),
            (NatSide::Conn, true) => CONN_V6.into(),
        }
    }

    /// The router's address on the internet (the NATed source of the LAN's IPv4).
    pub fn router_wan_ip(self, v6: bool) -> IpAddr {
        match (self, v6) {
            (NatSide::Agent, false) => AGENT_ROUTER_WAN_V4.into(),
            (NatSide::Agent, true) => AGENT_ROUTER_WAN_V6.into(),
            (NatSide::Conn, false) => CONN_ROUTER_WAN_V4.into(),
            (NatSide::Conn, true) => CONN_ROUTER_WAN_V6.into(),
        }
    }
}

/// What `nat.sh up` builds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NatLabConfig {
    pub agent: NatType,
    pub conn: NatType,
    /// IPv6 addresses and routes too (never NATed; a stateful firewall unless `none`).
    pub v6: bool,
    /// One-way delay on each router's WAN link, through `ztna-delayline` (0: none).
    pub delay_ms: u32,
    /// The `ztna-delayline` binary; `None`: the workspace's ([`bins::delayline`]).
    pub delayline: Option<PathBuf>,
}

impl NatLabConfig {
    /// IPv4 only, no delay.
    pub fn new(agent: NatType, conn: NatType) -> NatLabConfig {
        NatLabConfig { agent, conn, v6: false, delay_ms: 0, delayline: None }
    }

    /// The NAT type of one side.
    pub fn nat(&self, side: NatSide) -> NatType {
        match side {
            NatSide::Agent => self.agent,
            NatSide::Conn => self.conn,
        }
    }

    /// The arguments of `nat.sh up`.
    fn up_args(&self) -> Result<Vec<String>> {
        let mut args = vec!["--agent-nat".into(), self.agent.name().into(), "--conn-nat".into(), self.conn.name().into()];
        if self.v6 {
            args.push("--v6".into());
        }
        if self.delay_ms > 0 {
            let delayline = match &self.delayline {
                Some(p) => bins::find_or(Some(p), "ztna-delayline")?,
                None => bins::delayline()?,
            };
            args.extend(["--delay-ms".into(), self.delay_ms.to_string(), "--delayline".into(), delayline.display().to_string()]);
        }
        Ok(args)
    }
}

/// `deploy/lab/nat.sh` of this workspace.
pub fn nat_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/lab/nat.sh")
}

/// The NAT lab: its hosts, commands and processes in them, and the teardown on drop are
/// [`NsLab`]'s (and `nat.sh down` also ends the delay lines).
pub type NatLab = NsLab<NatHost>;

impl NsLab<NatHost> {
    /// `nat.sh up` with `LAB_PREFIX=prefix` (needs root, nftables and ethtool).
    pub fn up(script: &Path, prefix: &str, cfg: &NatLabConfig) -> Result<NatLab> {
        NsLab::build(script, prefix, &cfg.up_args()?)
    }

    /// The lab under prefix `tag` plus part of this process's id (see [`tagged_prefix`]).
    pub fn up_tagged(script: &Path, tag: &str, cfg: &NatLabConfig) -> Result<NatLab> {
        NatLab::up(script, &tagged_prefix(tag), cfg)
    }

    /// At that side's router, drops all forwarded UDP between WAN and LAN unless it is from or
    /// to one of the relay's addresses: no direct path, the relay path stays.
    pub fn block(&self, side: NatSide) -> Result<()> {
        self.script("block", &[side.name()])
    }

    /// [`NatLab::block`], except for UDP of the LAN host's `port`: a site firewall that lets
    /// only that port talk to anyone but the relay.
    pub fn block_except_port(&self, side: NatSide, port: u16) -> Result<()> {
        self.script("block", &[side.name(), "--except-port", &port.to_string()])
    }

    /// Removes [`NatLab::block`]'s rules (and nothing else).
    pub fn unblock(&self, side: NatSide) -> Result<()> {
        self.script("unblock", &[side.name()])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use NatType::*;

    #[test]
    fn names_round_trip() {
        for t in NatType::ALL {
            assert_eq!(t.name().parse::<NatType>().unwrap(), t);
        }
        assert!("cone".parse::<NatType>().is_err());
    }

    #[test]
    fn direct_paths_exist_unless_a_symmetric_nat_meets_a_filtering_one() {
        for a in NatType::ALL {
            for c in NatType::ALL {
                let expected = !matches!((a, c), (Symmetric, PortRestricted) | (PortRestricted, Symmetric) | (Symmetric, Symmetric));
                assert_eq!(direct_expected(a, c), expected, "{a} x {c}");
            }
        }
    }
}
