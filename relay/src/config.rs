//! Relay configuration: a TOML file, overridden by command-line flags, with defaults that
//! run out of the box on a development machine.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde::Deserialize;

pub use crate::ebpf::xdp::XdpMode;

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// UDP address for control QUIC and relay frames. `[::]` listens dual-stack.
    pub listen: SocketAddr,
    /// Admin HTTP address for `/metrics` and `/healthz`.
    pub admin: SocketAddr,
    /// Worker threads; 0 means one per core.
    pub workers: usize,
    /// Pin each worker to its own core.
    pub pin_workers: bool,
    /// Relay certificate chain (PEM), its key, and the CA that client certificates must chain to.
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
    /// Access policy (TOML): which agents may reach and which connectors may serve each service.
    pub policy: PathBuf,
    /// Create a development PKI and policy in `dev_pki_dir` when none of cert, key and CA exist.
    pub dev_pki: bool,
    pub dev_pki_dir: PathBuf,
    /// Datagram I/O backend of the workers: `auto` (io_uring, else recvmmsg/sendmmsg),
    /// `uring` (fail if io_uring is unavailable) or `mmsg`.
    pub io: IoBackend,
    pub limits: Limits,
    /// Steer datagrams to their owning worker's socket with the SK_REUSEPORT program (falls
    /// back to user-space hand-offs, with a warning, where eBPF cannot be loaded).
    pub ebpf_steering: bool,
    pub xdp: XdpConfig,
    pub nat_test: NatTestConfig,
    /// Where the relay keeps what must outlive a restart: the stateless-reset key.
    pub state_dir: PathBuf,
}

/// The NAT-test responder (`[nat_test]`, PROTOCOL.md §14.9): off unless two addresses of this
/// host are named. It answers on both addresses, on `port` and `port + 1`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NatTestConfig {
    /// The primary address (the one clients are told) and the alternate, same family.
    pub addresses: Vec<std::net::IpAddr>,
    pub port: u16,
    /// Replies per second, all sources together (a reply is never larger than its probe).
    pub replies_per_sec: u32,
}

impl Default for NatTestConfig {
    fn default() -> Self {
        NatTestConfig { addresses: Vec::new(), port: 3478, replies_per_sec: 2000 }
    }
}

impl NatTestConfig {
    pub fn enabled(&self) -> bool {
        !self.addresses.is_empty()
    }

    fn validate(&self) -> Result<()> {
        if !self.enabled() {
            return Ok(());
        }
        match self.addresses.as_slice() {
            [a, b] if a.is_ipv4() == b.is_ipv4() && a != b => {}
            _ => bail!("nat_test.addresses must be two different addresses of one family (primary, alternate)"),
        }
        if self.port == 0 || self.port == u16::MAX || self.replies_per_sec == 0 {
            bail!("nat_test.port must be 1..65534 (it also uses port + 1) and nat_test.replies_per_sec > 0");
        }
        Ok(())
    }
}

/// The XDP fast path (`[xdp]`): off unless interfaces are named.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct XdpConfig {
    /// Interfaces that carry relay traffic (both the agent and the connector side).
    pub ifaces: Vec<String>,
    pub mode: XdpMode,
    /// Forward DATA frames of mirrored sessions in XDP; false only filters and steers.
    pub forward: bool,
    /// Size of the kernel's session mirror; past it, user space forwards the rest.
    pub max_sessions: u32,
}

impl Default for XdpConfig {
    fn default() -> Self {
        XdpConfig { ifaces: Vec::new(), mode: XdpMode::Native, forward: true, max_sessions: 262_144 }
    }
}

impl XdpConfig {
    pub fn enabled(&self) -> bool {
        !self.ifaces.is_empty() && self.mode != XdpMode::Off
    }
}

/// Which datagram I/O backend the workers use.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum IoBackend {
    #[default]
    Auto,
    Uring,
    Mmsg,
}

impl IoBackend {
    pub fn as_str(self) -> &'static str {
        match self {
            IoBackend::Auto => "auto",
            IoBackend::Uring => "uring",
            IoBackend::Mmsg => "mmsg",
        }
    }
}

impl std::fmt::Display for IoBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// New handshakes allowed per source IP per second (token bucket), after address validation.
    pub handshakes_per_ip_per_sec: f64,
    /// Burst size of that bucket.
    pub handshake_burst: f64,
    /// Send a stateless Retry to validate the source address before any handshake state.
    pub retry: bool,
    /// Most control connections one worker holds.
    pub max_connections_per_worker: usize,
    /// Most sessions one agent connection may hold open.
    pub max_sessions_per_connection: usize,
    /// Sessions with no DATA frame in this long are closed.
    pub session_idle_timeout_secs: u64,
    /// QUIC idle timeout of control connections (clients keep them alive).
    pub control_idle_timeout_secs: u64,
    /// On SIGTERM, how long to wait for connections to close before exiting.
    pub drain_timeout_secs: u64,
    /// On SIGTERM, clients are asked to reconnect at a random moment within this many
    /// milliseconds (`GoingAway`), which spreads the reconnects after a restart. 0: at once.
    pub reconnect_spread_ms: u32,
    /// A connector with sessions that answers nothing for this long is dropped, so its
    /// sessions end and new ones go elsewhere (PROTOCOL.md §7.14); it is asked (PING) from a
    /// quarter of it on. 0: no such check (QUIC's idle timeout only).
    pub connector_dead_after_ms: u64,
    /// A source over its handshake limit is blocklisted in XDP (its QUIC Initials dropped
    /// before they reach user space) for this long. Only with XDP on.
    pub blocklist_secs: u64,
}

impl Default for Config {
    fn default() -> Self {
        let dir = PathBuf::from("pki");
        Config {
            listen: "[::]:4433".parse().unwrap_or_else(|_| unreachable!()),
            admin: "127.0.0.1:9090".parse().unwrap_or_else(|_| unreachable!()),
            workers: 0,
            pin_workers: true,
            cert: dir.join("relay.pem"),
            key: dir.join("relay.key"),
            ca: dir.join("ca.pem"),
            policy: dir.join("policy.toml"),
            dev_pki: true,
            dev_pki_dir: dir,
            io: IoBackend::Auto,
            limits: Limits::default(),
            ebpf_steering: true,
            xdp: XdpConfig::default(),
            nat_test: NatTestConfig::default(),
            state_dir: PathBuf::from("state"),
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            handshakes_per_ip_per_sec: 20.0,
            handshake_burst: 50.0,
            retry: true,
            max_connections_per_worker: 100_000,
            max_sessions_per_connection: 1024,
            session_idle_timeout_secs: 120,
            control_idle_timeout_secs: 30,
            drain_timeout_secs: 5,
            reconnect_spread_ms: 1000,
            connector_dead_after_ms: 2000,
            blocklist_secs: 10,
        }
    }
}

impl Limits {
    /// The liveness schedule for connectors with sessions, if the check is on.
    pub fn connector_liveness(&self) -> Option<ztna_proto::liveness::LivenessConfig> {
        let dead = Duration::from_millis(self.connector_dead_after_ms);
        (!dead.is_zero()).then(|| ztna_proto::liveness::LivenessConfig { ping_after: dead / 4, dead_after: dead, pings: 3 })
    }

    pub fn session_idle_timeout(&self) -> Duration {
        Duration::from_secs(self.session_idle_timeout_secs)
    }
    pub fn drain_timeout(&self) -> Duration {
        Duration::from_secs(self.drain_timeout_secs)
    }
    pub fn blocklist_for(&self) -> Duration {
        Duration::from_secs(self.blocklist_secs)
    }
}

impl Config {
    pub fn load(path: Option<&Path>) -> Result<Config> {
        let Some(path) = path else { return Ok(Config::default()) };
        let text = std::fs::read_to_string(path).with_context(|| format!("reading config {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("parsing config {}", path.display()))
    }

    pub fn worker_count(&self) -> Result<usize> {
        let n = if self.workers == 0 {
            std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
        } else {
            self.workers
        };
        if n > ztna_proto::id::MAX_WORKERS {
            bail!("at most {} workers are supported (the id layout has one worker byte), got {n}", ztna_proto::id::MAX_WORKERS);
        }
        Ok(n)
    }

    pub fn validate(&self) -> Result<()> {
        self.worker_count()?;
        let l = &self.limits;
        if l.handshakes_per_ip_per_sec <= 0.0 || l.handshake_burst < 1.0 {
            bail!("limits.handshakes_per_ip_per_sec must be > 0 and limits.handshake_burst >= 1");
        }
        if l.session_idle_timeout_secs == 0 || l.control_idle_timeout_secs == 0 {
            bail!("idle timeouts must be at least one second");
        }
        self.nat_test.validate()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_partial_file() {
        let c: Config = toml::from_str("workers = 2\n[limits]\nretry = false\n").unwrap();
        assert_eq!(c.workers, 2);
        assert!(!c.limits.retry);
        assert_eq!(c.limits.session_idle_timeout_secs, 120);
        assert_eq!(c.listen, "[::]:4433".parse().unwrap());
        c.validate().unwrap();
        assert!(!c.xdp.enabled(), "XDP is off unless interfaces are named");
        let x: Config = toml::from_str("[xdp]\nifaces = [\"a0\", \"c0\"]\nmode = \"skb\"\n").unwrap();
        assert!(x.xdp.enabled());
        assert_eq!(x.xdp.mode, XdpMode::Skb);
        assert!(toml::from_str::<Config>("[xdp]\nmode = \"turbo\"\n").is_err());
    }

    #[test]
    fn io_backend_key() {
        assert_eq!(Config::default().io, IoBackend::Auto);
        for (text, want) in [("auto", IoBackend::Auto), ("uring", IoBackend::Uring), ("mmsg", IoBackend::Mmsg)] {
            let c: Config = toml::from_str(&format!("io = \"{text}\"")).unwrap();
            assert_eq!(c.io, want);
        }
        assert!(toml::from_str::<Config>("io = \"epoll\"").is_err());
    }

    #[test]
    fn unknown_keys_are_errors() {
        assert!(toml::from_str::<Config>("listn = \"[::]:1\"").is_err());
        let c = Config { workers: 300, ..Config::default() };
        assert!(c.validate().is_err());
    }
}
