//! The client's TLS material: its certificate and key (its identity) and the CA it trusts.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

#[derive(Debug, Clone)]
pub struct ClientTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

impl ClientTls {
    /// The files `ztna-relay pki init` writes for `<kind>-<name>` in `dir`.
    pub fn from_pki_dir(dir: &Path, kind: &str, name: &str) -> Self {
        ClientTls {
            cert: dir.join(format!("{kind}-{name}.pem")),
            key: dir.join(format!("{kind}-{name}.key")),
            ca: dir.join("ca.pem"),
        }
    }

    /// A quiche config for the end-to-end tunnel: the agent is the client, the connector the
    /// server, and both present certificates from the deployment CA.
    pub fn tunnel_config(&self, server: bool) -> Result<quiche::Config> {
        let mut c = self.base_config()?;
        c.set_application_protos(&[ztna_proto::TUNNEL_ALPN])?;
        c.set_max_idle_timeout(crate::tunnel::IDLE_TIMEOUT.as_millis() as u64);
        // Tunnel packets ride inside 9-byte DATA frames; 1200 keeps the framed datagram
        // well inside any path MTU.
        c.set_max_recv_udp_payload_size(1350);
        c.set_max_send_udp_payload_size(crate::tunnel::MAX_TUNNEL_PACKET);
        c.set_initial_max_data(crate::tunnel::CONNECTION_WINDOW);
        c.set_initial_max_stream_data_bidi_local(crate::tunnel::STREAM_WINDOW);
        c.set_initial_max_stream_data_bidi_remote(crate::tunnel::STREAM_WINDOW);
        c.set_initial_max_stream_data_uni(0);
        c.set_initial_max_streams_bidi(if server { crate::tunnel::MAX_STREAMS } else { 0 });
        c.set_initial_max_streams_uni(0);
        c.enable_dgram(true, 1024, 1024);
        // The agent moves the connection between the relay path and direct paths.
        c.set_disable_active_migration(false);
        c.set_active_connection_id_limit(crate::tunnel::ACTIVE_CONNECTION_IDS);
        Ok(c)
    }

    fn base_config(&self) -> Result<quiche::Config> {
        let s = |p: &Path| p.to_str().map(str::to_owned).context("path is not UTF-8");
        let mut c = private_trust_config()?;
        for (what, p) in [("certificate", &self.cert), ("key", &self.key), ("CA", &self.ca)] {
            if !p.exists() {
                anyhow::bail!("{what} file {} does not exist", p.display());
            }
        }
        c.load_cert_chain_from_pem_file(&s(&self.cert)?)
            .with_context(|| format!("loading certificate {}", self.cert.display()))?;
        c.load_priv_key_from_pem_file(&s(&self.key)?).with_context(|| format!("loading key {}", self.key.display()))?;
        c.load_verify_locations_from_file(&s(&self.ca)?).with_context(|| format!("loading CA {}", self.ca.display()))?;
        c.verify_peer(true);
        Ok(c)
    }

    /// A quiche config for the control connection (client side, mutual TLS).
    pub fn control_config(&self, idle_timeout_ms: u64) -> Result<quiche::Config> {
        let mut c = self.base_config()?;
        c.set_application_protos(&[ztna_proto::CONTROL_ALPN])?;
        c.set_max_idle_timeout(idle_timeout_ms);
        c.set_max_recv_udp_payload_size(2048);
        c.set_max_send_udp_payload_size(1350);
        c.set_initial_max_data(1 << 20);
        c.set_initial_max_stream_data_bidi_local(256 * 1024);
        c.set_initial_max_stream_data_bidi_remote(256 * 1024);
        c.set_initial_max_streams_bidi(0);
        c.set_initial_max_streams_uni(0);
        Ok(c)
    }
}

/// A quiche config whose trust store starts empty, so only the deployment CA loaded into it
/// vouches for peers. (`quiche::Config::new` also loads the system's public roots, which
/// must never vouch for a ztna identity, and costs milliseconds per config.)
pub fn private_trust_config() -> anyhow::Result<quiche::Config> {
    let builder = boring::ssl::SslContextBuilder::new(boring::ssl::SslMethod::tls())?;
    Ok(quiche::Config::with_boring_ssl_ctx_builder(quiche::PROTOCOL_VERSION, builder)?)
}
