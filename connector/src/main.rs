//! `ztna-connector`: the service side of ZTNA. It keeps a control connection to the relay,
//! registers the services it serves, and accepts the sessions the relay offers.
//! (The end-to-end tunnel to the backends builds on these sessions.)

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Parser;
use ztna_client::ControlClient;
use ztna_client::target::RelayArgs;
use ztna_proto::Message;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "ztna-connector", version, about = "ZTNA app connector: serve private services through the relay")]
struct Cli {
    #[command(flatten)]
    relay: RelayArgs,
    /// A service to serve: NAME=HOST:PORT (TCP) or NAME=udp:HOST:PORT; repeatable.
    #[arg(long = "service", required = true)]
    services: Vec<String>,
    /// Exit after this many seconds (for scripted checks); default: run until stopped.
    #[arg(long)]
    run_for: Option<f64>,
}

/// One `--service` mapping.
#[derive(Debug, Clone)]
struct ServiceMap {
    name: String,
    backend: String,
}

fn parse_service(s: &str) -> Result<ServiceMap> {
    let (name, backend) = s.split_once('=').with_context(|| format!("--service {s:?}: expected NAME=HOST:PORT"))?;
    if !ztna_proto::control::valid_service_name(name) {
        bail!("--service {s:?}: invalid service name (1-63 of a-z 0-9 . _ -)");
    }
    let addr = backend.strip_prefix("udp:").unwrap_or(backend);
    if addr.rsplit_once(':').and_then(|(_, p)| p.parse::<u16>().ok()).is_none() {
        bail!("--service {s:?}: backend must be HOST:PORT");
    }
    Ok(ServiceMap { name: name.to_owned(), backend: backend.to_owned() })
}

fn main() -> ExitCode {
    ztna_client::cli::init_logging("info");
    ztna_client::cli::run("ztna-connector: error", run(Cli::parse()))
}

async fn run(cli: Cli) -> Result<()> {
    let services = cli.services.iter().map(|s| parse_service(s)).collect::<Result<Vec<_>>>()?;
    let (addr, server_name) = cli.relay.resolve().await?;
    let tls = cli.relay.tls("connector", "web-1");
    let software = concat!("ztna-connector/", env!("CARGO_PKG_VERSION"));
    let mut client = ControlClient::connect(addr, server_name.as_deref(), &tls, software, cli.relay.timeout()).await?;
    let info = client.info.clone().context("no relay info")?;
    tracing::info!(identity = %info.identity, observed = %info.observed, relay = %addr, "connected to relay");
    client.send(&Message::Register { services: services.iter().map(|s| s.name.clone()).collect() })?;
    let mut refusals = Vec::new();
    let registered = loop {
        match client.next_message(cli.relay.timeout()).await? {
            Message::Registered { services } => break services,
            Message::Error { code, message, .. } => {
                eprintln!("ztna-connector: relay refused: {message} ({code})");
                refusals.push(message);
            }
            _ => {}
        }
    };
    if registered.is_empty() {
        bail!("the relay accepted none of the services ({})", refusals.join("; "));
    }
    for s in services.iter().filter(|s| registered.contains(&s.name)) {
        tracing::info!(service = %s.name, backend = %s.backend, "serving");
    }
    let deadline = cli.run_for.map(|s| tokio::time::Instant::now() + Duration::from_secs_f64(s));
    loop {
        if deadline.is_some_and(|d| tokio::time::Instant::now() >= d) {
            client.close().await;
            return Ok(());
        }
        let msg = match client.next_message(Duration::from_secs(1)).await {
            Ok(m) => m,
            Err(ztna_client::ClientError::Timeout(..)) => continue,
            Err(e) => return Err(e.into()),
        };
        match msg {
            Message::SessionOffer { session, service, peer_identity, .. } => {
                tracing::info!(%session, %service, agent = %peer_identity, "session offered");
            }
            Message::SessionClosed { session, reason } => tracing::info!(%session, %reason, "session closed"),
            Message::ObservedAddress { addr, .. } => tracing::info!(observed = %addr, "relay reports a new address"),
            Message::Error { code, message, .. } => tracing::warn!(%code, "relay: {message}"),
            _ => {}
        }
    }
}
