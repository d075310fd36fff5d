//! `ztna-agent`: the user's side of ZTNA. `check` is the operator's first diagnostic:
//! connect, authenticate, and show what the relay sees and allows.

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

mod forward;
use ztna_client::ControlClient;
use ztna_client::engine::agent::Agent;
use ztna_client::engine::{Engine, EngineConfig};
use ztna_client::target::{DirectArgs, RelayArgs};
use ztna_proto::Message;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "ztna-agent", version, about = "ZTNA agent: reach private services through the relay")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Forward local ports to services through the relay.
    Run {
        #[command(flatten)]
        relay: RelayArgs,
        #[command(flatten)]
        direct: DirectArgs,
        /// TCP forward [bind:]port:service (bind defaults to 127.0.0.1); repeatable.
        #[arg(short = 'L', long = "tcp")]
        tcp: Vec<String>,
        /// UDP forward [bind:]port:service; repeatable.
        #[arg(short = 'U', long = "udp")]
        udp: Vec<String>,
        /// TOML file with `tcp = [...]`, `udp = [...]` and `metrics = "ADDR"` (merged with flags).
        #[arg(long)]
        config: Option<std::path::PathBuf>,
        /// Serve Prometheus metrics on this address (off by default).
        #[arg(long)]
        metrics: Option<std::net::SocketAddr>,
    },
    /// Connect to the relay, authenticate, and print handshake time, RTT, the observed
    /// address (QAD) and the services the policy allows. Exits non-zero on any failure.
    Check {
        #[command(flatten)]
        relay: RelayArgs,
        /// Also ask for a session to this service and show which connector would serve it.
        #[arg(long)]
        service: Option<String>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Also test the NAT's mapping and filtering behaviour (RFC 5780) against the relay's
        /// NAT-test responder at ADDR (default: the relay's address, port 3478) and say which
        /// peers this host can reach directly.
        #[arg(long, value_name = "ADDR", num_args = 0..=1, default_missing_value = "relay")]
        nat_test: Option<String>,
    },
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Run { relay, direct, tcp, udp, config, metrics } => {
            ztna_client::cli::init_logging("info");
            ztna_client::cli::run("ztna-agent", run(relay, direct, tcp, udp, config, metrics))
        }
        Command::Check { relay, service, json, nat_test } => {
            ztna_client::cli::init_logging("warn");
            ztna_client::cli::run("ztna-agent check: FAILED", async move { check(&relay, service.as_deref(), json, nat_test.as_deref()).await })
        }
    }
}

/// The agent's config file; every key is optional and adds to the command line.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct AgentFile {
    #[serde(default)]
    tcp: Vec<String>,
    #[serde(default)]
    udp: Vec<String>,
    metrics: Option<std::net::SocketAddr>,
}

async fn run(
    relay: RelayArgs,
    direct: DirectArgs,
    mut tcp: Vec<String>,
    mut udp: Vec<String>,
    config: Option<std::path::PathBuf>,
    mut metrics_addr: Option<std::net::SocketAddr>,
) -> anyhow::Result<()> {
    use anyhow::Context;
    if let Some(path) = config {
        let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        let file: AgentFile = toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        tcp.extend(file.tcp);
        udp.extend(file.udp);
        metrics_addr = metrics_addr.or(file.metrics);
    }
    let tcp = tcp.iter().map(|s| forward::parse(s)).collect::<anyhow::Result<Vec<_>>>()?;
    let udp = udp.iter().map(|s| forward::parse(s)).collect::<anyhow::Result<Vec<_>>>()?;
    if tcp.is_empty() && udp.is_empty() {
        anyhow::bail!("nothing to forward: give -L [bind:]port:service or -U [bind:]port:service");
    }
    let mut services: Vec<String> = tcp.iter().chain(&udp).map(|f| f.service.clone()).collect();
    services.sort();
    services.dedup();
    let (addr, server_name) = relay.resolve().await?;
    let metrics = std::sync::Arc::new(ztna_client::metrics::ClientMetrics::new("ztna_agent"));
    let _endpoint = match metrics_addr {
        Some(a) => Some(ztna_metrics_http::Endpoint::start(a, metrics.clone())?),
        None => None,
    };
    let cfg = EngineConfig {
        relay: addr,
        server_name,
        tls: relay.tls("agent", "alice"),
        software: concat!("ztna-agent/", env!("CARGO_PKG_VERSION")).into(),
        connect_timeout: relay.timeout(),
        direct: direct.config()?,
    };
    let engine = Engine::new(cfg, metrics, |_| Agent::new(services))?;
    for f in tcp {
        forward::serve_tcp(f, engine.handle()).await?;
    }
    for f in udp {
        forward::serve_udp(f, engine.handle()).await?;
    }
    engine.run_until(ztna_client::cli::stop_signal()).await
}

/// Where the NAT-test responder is: `relay` means the relay's address at the default port.
fn nat_test_server(arg: &str, relay: std::net::SocketAddr) -> anyhow::Result<std::net::SocketAddr> {
    use anyhow::Context;
    match arg {
        "relay" => Ok(std::net::SocketAddr::new(relay.ip(), 3478)),
        a => a.parse().with_context(|| format!("--nat-test {a}: not an address:port")),
    }
}

async fn check(args: &RelayArgs, service: Option<&str>, json: bool, nat_test: Option<&str>) -> anyhow::Result<()> {
    let (addr, server_name) = args.resolve().await?;
    let nat = match nat_test {
        Some(arg) => Some(ztna_client::nat_type::discover(nat_test_server(arg, addr)?).await?),
        None => None,
    };
    let tls = args.tls("agent", "alice");
    let software = concat!("ztna-agent/", env!("CARGO_PKG_VERSION"));
    let mut client = ControlClient::connect(addr, server_name.as_deref(), &tls, software, args.timeout()).await?;
    // One Ping round trip gives the RTT estimator a sample past the handshake.
    let nonce: u64 = rand_nonce();
    client.send(&Message::Ping { nonce })?;
    loop {
        if let Message::Pong { nonce: n } = client.next_message(args.timeout()).await?
            && n == nonce
        {
            break;
        }
    }
    let info = client.info.clone().ok_or_else(|| anyhow::anyhow!("no relay info"))?;
    let rtt = client.rtt().unwrap_or_default();
    let mut session = None;
    if let Some(svc) = service {
        client.send(&Message::Connect { request_id: 1, service: svc.to_owned() })?;
        session = Some(loop {
            match client.next_message(args.timeout()).await? {
                Message::SessionOffer { session, peer_identity, .. } => {
                    client.send(&Message::CloseSession { session })?;
                    break Ok((session.to_string(), peer_identity));
                }
                Message::Error { code, message, .. } => break Err(format!("{message} ({code})")),
                _ => continue,
            }
        });
    }
    client.idle(Duration::from_millis(20)).await?;
    let local = client.local_addr();
    client.close().await;
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    if json {
        let session_json = match &session {
            None => "null".to_string(),
            Some(Ok((id, peer))) => format!("{{\"id\":\"{id}\",\"connector\":\"{peer}\"}}"),
            Some(Err(e)) => format!("{{\"error\":{e:?}}}"),
        };
        let nat_json = match &nat {
            None => "null".to_string(),
            Some(n) => {
                let (direct, relayed) = n.reach();
                format!(
                    "{{\"type\":{:?},\"mapping\":\"{}\",\"filtering\":\"{}\",\"mapped\":\"{}\",\"direct_with\":{direct:?},\"relayed_with\":{relayed:?}}}",
                    n.name(), n.mapping.name(), n.filtering.name(), n.mapped
                )
            }
        };
        println!(
            "{{\"relay\":\"{addr}\",\"relay_identity\":\"{}\",\"identity\":\"{}\",\"role\":\"{}\",\"handshake_ms\":{:.3},\"rtt_ms\":{:.3},\"observed\":\"{}\",\"local\":\"{}\",\"services\":{:?},\"session\":{session_json},\"nat\":{nat_json}}}",
            info.relay_identity, info.identity, info.role.name(), ms(info.handshake_time), ms(rtt), info.observed,
            local, info.services,
        );
    } else {
        println!("relay       {addr} ({})", info.relay_identity);
        println!("identity    {} ({})", info.identity, info.role.name());
        println!("handshake   {:.2} ms", ms(info.handshake_time));
        println!("rtt         {:.2} ms", ms(rtt));
        println!("local       {local}");
        println!("observed    {} (QUIC address discovery)", info.observed);
        println!("services    {}", if info.services.is_empty() { "(none)".to_string() } else { info.services.join(", ") });
        match &session {
            Some(Ok((id, peer))) => println!("session     {id} served by {peer}"),
            Some(Err(e)) => println!("session     refused: {e}"),
            None => {}
        }
        if let Some(n) = &nat {
            let (direct, relayed) = n.reach();
            println!("nat         {} ({} mapping, {} filtering; mapped to {})", n.name(), n.mapping.name(), n.filtering.name(), n.mapped);
            println!("direct      with peers behind: {}", direct.join(", "));
            println!("relayed     with peers behind: {}", if relayed.is_empty() { "(none)".to_string() } else { relayed.join(", ") });
        }
    }
    if let Some(Err(e)) = session {
        anyhow::bail!("session refused: {e}");
    }
    Ok(())
}

fn rand_nonce() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(1)
}
