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

    /// A quiche config for the control connection (client side, mutual TLS).
    pub fn control_config(&self, idle_timeout_ms: u64) -> Result<quiche::Config> {
        let s = |p: &Path| p.to_str().map(str::to_owned).context("path is not UTF-8");
        let mut c = quiche::Config::new(quiche::PROTOCOL_VERSION)?;
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
