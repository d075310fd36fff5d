//! How the load generator's clients reach the relay: their identity from the PKI directory,
//! their sockets (in a network namespace when asked) and a first connect that turns "relay not
//! there" into a clear error.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Result;
use ztna_client::control::{bind_client_socket, source_ip_for};
use ztna_client::{ClientError, ClientTls, ControlClient};
use ztna_testbed::{Pki, netns};

/// How the load generator's clients build their trust store (for reports). The client library
/// builds every quiche config on an empty trust store and loads only the deployment CA.
pub const TRUST_STORE: &str = "private CA only (the client library starts every quiche config from an empty trust store)";

pub const SOFTWARE: &str = concat!("ztna-bench/", env!("CARGO_PKG_VERSION"));

/// Where the clients and the admin scrapes run: network namespaces (`ip netns` names), this
/// process's own by default.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct ClientNetns {
    /// Network namespace in which the client sockets are created.
    #[arg(long = "netns")]
    pub clients: Option<String>,
    /// Network namespace from which the relay's admin address is scraped.
    #[arg(long = "admin-netns")]
    pub admin: Option<String>,
}

/// A client socket towards `relay`, created inside network namespace `netns` when given (it
/// stays there), bound to the source address the kernel would use towards the relay.
pub fn client_socket(relay: SocketAddr, netns: Option<&str>) -> std::io::Result<tokio::net::UdpSocket> {
    let rt = tokio::runtime::Handle::current();
    let make = move || {
        let _rt = rt.enter();
        bind_client_socket(SocketAddr::new(source_ip_for(relay)?, 0))
    };
    match netns {
        None => make(),
        Some(ns) => netns::run_in(ns, || Ok(make()?)).map_err(std::io::Error::other),
    }
}

/// [`ControlClient::connect`] with its socket in network namespace `netns` when given.
pub async fn connect(
    relay: SocketAddr,
    netns: Option<&str>,
    server_name: Option<&str>,
    tls: &ClientTls,
    timeout: Duration,
) -> Result<ControlClient, ClientError> {
    let sock = client_socket(relay, netns)?;
    ControlClient::connect_on(sock, relay, server_name, tls, SOFTWARE, timeout).await
}

#[derive(clap::Args, Debug, Clone)]
pub struct ClientArgs {
    /// Identity kind of the client certificate in the PKI directory.
    #[arg(long, default_value = "agent")]
    pub kind: String,
    /// Identity name of the client certificate in the PKI directory.
    #[arg(long, default_value = "alice")]
    pub name: String,
    /// Verify the relay certificate against this name (default: no hostname check, CA only).
    #[arg(long)]
    pub server_name: Option<String>,
}

impl ClientArgs {
    pub fn tls(&self, pki_dir: &std::path::Path) -> Result<ClientTls> {
        Pki::open(pki_dir).tls(&self.kind, &self.name)
    }
}

/// One connect that must work before measuring: turns "relay not there" into a clear error.
pub async fn preflight(
    relay: SocketAddr,
    netns: Option<&str>,
    server_name: Option<&str>,
    tls: &ClientTls,
    timeout: Duration,
) -> Result<()> {
    match connect(relay, netns, server_name, tls, timeout).await {
        Ok(c) => {
            c.close().await;
            Ok(())
        }
        Err(e @ ClientError::Timeout(..)) => Err(anyhow::anyhow!(
            "cannot reach the relay at {relay}: {e}; start it first (see `ztna-bench standard`), \
             and if it enforces a per-IP handshake rate, raise it (--handshake-rate)"
        )),
        Err(e) => Err(anyhow::anyhow!("first test connection to the relay at {relay} failed: {e}")),
    }
}

