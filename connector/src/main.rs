//! `ztna-connector`: the service side of ZTNA. It keeps a control connection to the relay,
//! registers the services it serves, accepts the end-to-end tunnels of the sessions the relay
//! offers, and connects each tunnelled flow to the service's backend.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Parser;
use std::collections::HashMap;
use std::sync::Arc;

use ztna_client::engine::connector::{Backend, Connector};
use ztna_client::engine::{Engine, EngineConfig};
use ztna_client::metrics::ClientMetrics;
use ztna_client::target::{DirectArgs, RelayArgs};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "ztna-connector", version, about = "ZTNA app connector: serve private services through the relay")]
struct Cli {
    #[command(flatten)]
    relay: RelayArgs,
    #[command(flatten)]
    direct: DirectArgs,
    /// Send and receive direct (peer-to-peer) traffic on a socket of its own, bound to PORT
    /// (all addresses) or ADDR:PORT, for firewalls that treat it apart from the connection to
    /// the relay; the relay path stays on the main socket. Default: one socket for both.
    #[arg(long, value_name = "[ADDR:]PORT", value_parser = parse_p2p_socket)]
    p2p_socket: Option<std::net::SocketAddr>,
    /// A service to serve: NAME=HOST:PORT (TCP) or NAME=udp:HOST:PORT; repeatable.
    #[arg(long = "service", required = true)]
    services: Vec<String>,
    /// Exit after this many seconds (for scripted checks); default: run until stopped.
    #[arg(long)]
    run_for: Option<f64>,
    /// Serve Prometheus metrics on this address (off by default).
    #[arg(long)]
    metrics: Option<std::net::SocketAddr>,
}

/// One `--service` mapping.
#[derive(Debug, Clone)]
struct ServiceMap {
    name: String,
    backend: Backend,
}

fn parse_service(s: &str) -> Result<ServiceMap> {
    let (name, backend) = s.split_once('=').with_context(|| format!("--service {s:?}: expected NAME=HOST:PORT"))?;
    if !ztna_proto::control::valid_service_name(name) {
        bail!("--service {s:?}: invalid service name (1-63 of a-z 0-9 . _ -)");
    }
    let (udp, addr) = match backend.strip_prefix("udp:") {
        Some(a) => (true, a),
        None => (false, backend.strip_prefix("tcp:").unwrap_or(backend)),
    };
    if addr.rsplit_once(':').and_then(|(_, p)| p.parse::<u16>().ok()).is_none() {
        bail!("--service {s:?}: backend must be HOST:PORT");
    }
    let backend = if udp { Backend::Udp(addr.to_owned()) } else { Backend::Tcp(addr.to_owned()) };
    Ok(ServiceMap { name: name.to_owned(), backend })
}

fn parse_p2p_socket(s: &str) -> Result<std::net::SocketAddr, String> {
    if let Ok(port) = s.parse::<u16>() {
        return Ok((std::net::Ipv6Addr::UNSPECIFIED, port).into());
    }
    s.parse().map_err(|_| format!("{s:?} is neither a port nor ADDR:PORT"))
}

fn main() -> ExitCode {
    ztna_client::cli::init_logging("info");
    ztna_client::cli::run("ztna-connector: error", run(Cli::parse()))
}

fn direct_config(cli: &Cli) -> Result<ztna_client::candidates::DirectConfig> {
    let mut direct = cli.direct.config()?;
    if cli.p2p_socket.is_some() && !direct.enabled {
        bail!("--p2p-socket is for direct traffic, and --direct is off");
    }
    direct.p2p_socket = cli.p2p_socket;
    Ok(direct)
}

async fn run(cli: Cli) -> Result<()> {
    let services = cli.services.iter().map(|s| parse_service(s)).collect::<Result<Vec<_>>>()?;
    let (addr, server_name) = cli.relay.resolve().await?;
    let metrics = Arc::new(ClientMetrics::new("ztna_connector"));
    let _endpoint = match cli.metrics {
        Some(a) => Some(ztna_metrics_http::Endpoint::start(a, metrics.clone())?),
        None => None,
    };
    let mut backends: HashMap<String, Backend> = HashMap::new();
    for s in services {
        if backends.insert(s.name.clone(), s.backend).is_some() {
            bail!("--service {:?} is given twice", s.name);
        }
    }
    let cfg = EngineConfig {
        relay: addr,
        server_name,
        tls: cli.relay.tls("connector", "web-1"),
        software: concat!("ztna-connector/", env!("CARGO_PKG_VERSION")).into(),
        connect_timeout: cli.relay.timeout(),
        direct: direct_config(&cli)?,
    };
    let engine = Engine::new(cfg, metrics, |events| Connector::new(backends, events))?;
    let run_for = cli.run_for.map(Duration::from_secs_f64);
    engine
        .run_until(async move {
            let deadline = async {
                match run_for {
                    Some(d) => tokio::time::sleep(d).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                why = ztna_client::cli::stop_signal() => why,
                _ = deadline => "--run-for elapsed",
            }
        })
        .await
}
