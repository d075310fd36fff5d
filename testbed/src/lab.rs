//! The lab topology of `deploy/lab/lab.sh`: three network namespaces (agent, relay and
//! connector hosts) joined by veth pairs, documentation addresses only, under a prefix of the
//! caller's own so parallel labs do not collide. Everything goes when the [`Lab`] is dropped,
//! also when a test fails or a benchmark errors: the processes it started, any other process
//! still inside its namespaces, then the namespaces and links themselves.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::nslab::{LabHost, NsLab, tagged_prefix};

/// The three hosts of the lab.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Host {
    Agent,
    Relay,
    Conn,
}

/// Addresses of the lab (see the picture in lab.sh).
pub const AGENT_V4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 2);
pub const AGENT_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xa, 0, 0, 0, 0, 2);
pub const CONN_V4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 2);
pub const RELAY_A_V4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
pub const RELAY_C_V4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
pub const RELAY_A_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xa, 0, 0, 0, 0, 1);
pub const RELAY_C_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xc, 0, 0, 0, 0, 1);

/// The agent host's address.
pub fn agent_ip(v6: bool) -> IpAddr {
    if v6 { AGENT_V6.into() } else { AGENT_V4.into() }
}

/// The relay's address as the agent host reaches it (`a0`) and as the connector host does (`c0`).
pub fn relay_addrs(v6: bool, port: u16) -> (SocketAddr, SocketAddr) {
    let (a, c): (IpAddr, IpAddr) =
        if v6 { (RELAY_A_V6.into(), RELAY_C_V6.into()) } else { (RELAY_A_V4.into(), RELAY_C_V4.into()) };
    ((a, port).into(), (c, port).into())
}

/// `deploy/lab/lab.sh` of this workspace (for tests; a benchmark takes the path as an option).
pub fn workspace_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/lab/lab.sh")
}

/// The lab: its hosts, commands and processes in them, and the teardown on drop are
/// [`NsLab`]'s.
pub type Lab = NsLab<Host>;

impl LabHost for Host {
    const ALL: &'static [Host] = &[Host::Agent, Host::Relay, Host::Conn];
    fn suffix(self) -> &'static str {
        match self {
            Host::Agent => "agent",
            Host::Relay => "relay",
            Host::Conn => "conn",
        }
    }
}

impl NsLab<Host> {
    /// `lab.sh up` with `LAB_PREFIX=prefix` (needs root).
    pub fn up(script: &Path, prefix: &str) -> Result<Lab> {
        NsLab::build(script, prefix, &[])
    }

    /// The workspace's lab under prefix `tag` plus part of this process's id, so parallel
    /// tests (different tags) and parallel runs (different pids) do not collide.
    pub fn up_tagged(script: &Path, tag: &str) -> Result<Lab> {
        Lab::up(script, &tagged_prefix(tag))
    }

    /// MAC address of an interface in a host.
    pub fn mac(&self, host: Host, dev: &str) -> Result<String> {
        Ok(self.run(host, &["cat", &format!("/sys/class/net/{dev}/address")])?.trim().to_string())
    }

    /// Packet counters of an interface in a host.
    pub fn link_stats(&self, host: Host, dev: &str) -> Result<LinkStats> {
        let text = self.run(host, &["ip", "-s", "-j", "link", "show", "dev", dev])?;
        let v: serde_json::Value = serde_json::from_str(&text).context("parsing `ip -s -j link` output")?;
        let s = &v[0]["stats64"];
        let n = |dir: &str, k: &str| s[dir][k].as_u64().unwrap_or(0);
        Ok(LinkStats {
            rx_packets: n("rx", "packets"),
            rx_dropped: n("rx", "dropped"),
            tx_packets: n("tx", "packets"),
            tx_dropped: n("tx", "dropped"),
        })
    }

    /// Receive Packet Steering: the host's receive processing of frames arriving on `dev` runs
    /// on `cpu` (a veth otherwise does it on the CPU that sent them, i.e. the peer host's).
    pub fn steer_rx(&self, host: Host, dev: &str, cpu: usize) -> Result<()> {
        let mask = format!("{:x}", 1u64 << cpu.min(63));
        self.run(host, &["sh", "-c", &format!("echo {mask} > /sys/class/net/{dev}/queues/rx-0/rps_cpus")]).map(|_| ())
    }

    /// Makes the relay host a plain IP router between the agent and connector hosts (routes
    /// both ways, forwarding on): the kernel-only path that the relay is measured against.
    pub fn enable_routing(&self) -> Result<()> {
        self.run(Host::Relay, &["sysctl", "-q", "-w", "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"])?;
        self.run(Host::Agent, &["ip", "route", "replace", "198.51.100.0/24", "via", "192.0.2.1"])?;
        self.run(Host::Agent, &["ip", "-6", "route", "replace", "2001:db8:c::/64", "via", "2001:db8:a::1"])?;
        self.run(Host::Conn, &["ip", "route", "replace", "192.0.2.0/24", "via", "198.51.100.1"])?;
        self.run(Host::Conn, &["ip", "-6", "route", "replace", "2001:db8:a::/64", "via", "2001:db8:c::1"])?;
        Ok(())
    }
}

/// Counters of one interface (`ip -s link`).
#[derive(Debug, Clone, Copy, Default)]
pub struct LinkStats {
    pub rx_packets: u64,
    pub rx_dropped: u64,
    pub tx_packets: u64,
    pub tx_dropped: u64,
}

impl LinkStats {
    pub fn since(&self, b: &LinkStats) -> LinkStats {
        LinkStats {
            rx_packets: self.rx_packets.saturating_sub(b.rx_packets),
            rx_dropped: self.rx_dropped.saturating_sub(b.rx_dropped),
            tx_packets: self.tx_packets.saturating_sub(b.tx_packets),
            tx_dropped: self.tx_dropped.saturating_sub(b.tx_dropped),
        }
    }
}
