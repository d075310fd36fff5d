//! Relay configuration: a TOML file, overridden by command-line flags, with defaults that
//! run out of the box on a development machine.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde::Deserialize;

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
    pub limits: Limits,
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
            limits: Limits::default(),
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
        }
    }
}

impl Limits {
    pub fn session_idle_timeout(&self) -> Duration {
        Duration::from_secs(self.session_idle_timeout_secs)
    }
    pub fn drain_timeout(&self) -> Duration {
        Duration::from_secs(self.drain_timeout_secs)
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
        Ok(())
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
    }

    #[test]
    fn unknown_keys_are_errors() {
        assert!(toml::from_str::<Config>("listn = \"[::]:1\"").is_err());
        let c = Config { workers: 300, ..Config::default() };
        assert!(c.validate().is_err());
    }
}
