//! Command-line description of how to reach the relay and who we are, shared by the agent,
//! the connector and the benchmarks.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::ClientTls;

#[derive(Debug, Clone, clap::Args)]
pub struct RelayArgs {
    /// Relay address, HOST:PORT (a name, or an IPv4/[IPv6] address).
    #[arg(long, default_value = "localhost:4433")]
    pub relay: String,
    /// TLS server name to verify (default: the relay's host name; none for an IP address,
    /// in which case the relay is still required to present a ztna://relay/ identity).
    #[arg(long)]
    pub server_name: Option<String>,
    /// Directory written by `ztna-relay pki init` (cert, key and CA are found by name).
    #[arg(long, default_value = "pki")]
    pub pki_dir: PathBuf,
    /// Our name within the PKI directory (agent-NAME.pem / connector-NAME.pem).
    #[arg(long)]
    pub name: Option<String>,
    /// Explicit certificate, key and CA files (override --pki-dir/--name).
    #[arg(long)]
    pub cert: Option<PathBuf>,
    #[arg(long)]
    pub key: Option<PathBuf>,
    #[arg(long)]
    pub ca: Option<PathBuf>,
    /// Seconds to wait for the relay.
    #[arg(long, default_value_t = 5.0)]
    pub timeout: f64,
}

/// Direct peer-to-peer paths (hole punching, with the relay as the fallback).
#[derive(Debug, Clone, clap::Args)]
pub struct DirectArgs {
    /// `on`: punch holes and move tunnels onto direct paths when they validate, keeping the
    /// relay as the fallback; `off`: every byte goes through the relay, and this side
    /// neither punches nor accepts packets from anyone but the relay.
    #[arg(long, default_value = "on", value_parser = ["on", "off"])]
    pub direct: String,
    /// Advertise as host candidates only interface addresses inside these prefixes
    /// (comma-separated, e.g. 192.0.2.0/24,2001:db8::/32). Default: every usable address.
    #[arg(long, value_delimiter = ',')]
    pub host_candidates: Vec<String>,
}

impl DirectArgs {
    pub fn config(&self) -> Result<crate::candidates::DirectConfig> {
        let prefixes = self.host_candidates.iter().map(|p| crate::candidates::Prefix::parse(p)).collect::<Result<_>>()?;
        Ok(crate::candidates::DirectConfig { enabled: self.direct == "on", host_prefixes: prefixes, p2p_socket: None })
    }
}

impl RelayArgs {
    pub fn tls(&self, kind: &str, default_name: &str) -> ClientTls {
        let name = self.name.as_deref().unwrap_or(default_name);
        let mut tls = ClientTls::from_pki_dir(&self.pki_dir, kind, name);
        if let Some(c) = &self.cert {
            tls.cert = c.clone();
        }
        if let Some(k) = &self.key {
            tls.key = k.clone();
        }
        if let Some(ca) = &self.ca {
            tls.ca = ca.clone();
        }
        tls
    }

    pub fn timeout(&self) -> Duration {
        Duration::from_secs_f64(self.timeout.max(0.1))
    }

    /// Resolves the relay address and the server name to verify.
    pub async fn resolve(&self) -> Result<(SocketAddr, Option<String>)> {
        let (host, _) = self.relay.rsplit_once(':').context("--relay must be HOST:PORT")?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let addr = tokio::net::lookup_host(&self.relay)
            .await
            .with_context(|| format!("resolving relay {}", self.relay))?
            .next();
        let Some(addr) = addr else { bail!("relay {} resolved to no address", self.relay) };
        let name = match &self.server_name {
            Some(n) => Some(n.clone()),
            None if host.parse::<std::net::IpAddr>().is_ok() => None,
            None => Some(host.to_owned()),
        };
        Ok((addr, name))
    }
}
