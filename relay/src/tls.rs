//! quiche configuration of the relay's control connections: mutual TLS against the
//! deployment CA, the control ALPN, and transport limits sized for a control channel.

use anyhow::{Context, Result};

use crate::config::Config;

/// Largest UDP payload the relay sends; fits IPv6 minimum-MTU paths with tunnel overhead.
pub const MAX_SEND_UDP_PAYLOAD: usize = 1350;

pub fn server_config(cfg: &Config) -> Result<quiche::Config> {
    let path = |p: &std::path::Path| p.to_str().map(str::to_owned).context("certificate path is not UTF-8");
    let mut c = private_trust_config()?;
    c.load_cert_chain_from_pem_file(&path(&cfg.cert)?)
        .with_context(|| format!("loading relay certificate {}", cfg.cert.display()))?;
    c.load_priv_key_from_pem_file(&path(&cfg.key)?)
        .with_context(|| format!("loading relay key {}", cfg.key.display()))?;
    c.load_verify_locations_from_file(&path(&cfg.ca)?)
        .with_context(|| format!("loading CA {}", cfg.ca.display()))?;
    // Clients must present a certificate from the CA; one without is closed after the
    // handshake (quiche requests but cannot require it) and counted as `no_certificate`.
    c.verify_peer(true);
    c.set_application_protos(&[ztna_proto::CONTROL_ALPN])?;
    c.set_max_idle_timeout(cfg.limits.control_idle_timeout_secs * 1000);
    c.set_max_recv_udp_payload_size(crate::io::MAX_DATAGRAM);
    c.set_max_send_udp_payload_size(MAX_SEND_UDP_PAYLOAD);
    c.set_initial_max_data(1 << 20);
    c.set_initial_max_stream_data_bidi_local(256 * 1024);
    c.set_initial_max_stream_data_bidi_remote(256 * 1024);
    c.set_initial_max_stream_data_uni(0);
    c.set_initial_max_streams_bidi(1);
    c.set_initial_max_streams_uni(0);
    // Clients keep one socket for everything, so they never migrate on purpose; NAT
    // rebinding (a new source address on the same connection id) is still followed and
    // reported by QAD. The relay issues no spare connection ids.
    c.set_disable_active_migration(true);
    Ok(c)
}

/// A quiche config whose trust store starts empty, so only the deployment CA loaded into it
/// vouches for peers. (`quiche::Config::new` also loads the system's public roots, which
/// must never vouch for a ztna identity, and costs milliseconds per config.)
pub fn private_trust_config() -> anyhow::Result<quiche::Config> {
    let builder = boring::ssl::SslContextBuilder::new(boring::ssl::SslMethod::tls())?;
    Ok(quiche::Config::with_boring_ssl_ctx_builder(quiche::PROTOCOL_VERSION, builder)?)
}
