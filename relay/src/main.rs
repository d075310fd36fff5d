//! `ztna-relay`: run the relay, or manage a development PKI.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use ztna_proto::identity::{Identity, Kind};
use ztna_relay::config::{Config, IoBackend};
use ztna_relay::pki::{self, CertificateAuthority, DevPkiSpec};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "ztna-relay", version, args_conflicts_with_subcommands = true, about = "ZTNA relay appliance: authenticates agents and connectors, reports their public address, forwards their end-to-end tunnels")]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Run the relay (the default).
    Run(RunArgs),
    /// Development PKI: a private CA and identities, no openssl needed.
    #[command(subcommand)]
    Pki(PkiCommand),
}

#[derive(Args, Default)]
struct RunArgs {
    /// TOML configuration file; flags below override it.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// UDP listen address (default [::]:4433, dual-stack).
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Admin address for /metrics and /healthz (default 127.0.0.1:9090).
    #[arg(long)]
    admin: Option<SocketAddr>,
    /// Worker threads (default: one per core).
    #[arg(long)]
    workers: Option<usize>,
    #[arg(long)]
    cert: Option<PathBuf>,
    #[arg(long)]
    key: Option<PathBuf>,
    #[arg(long)]
    ca: Option<PathBuf>,
    #[arg(long)]
    policy: Option<PathBuf>,
    /// Skip the stateless Retry (address validation) before handshakes.
    #[arg(long)]
    no_retry: bool,
    /// Do not pin workers to cores.
    #[arg(long)]
    no_pin: bool,
    /// New handshakes allowed per source IP per second.
    #[arg(long)]
    handshake_rate: Option<f64>,
    /// Burst of new handshakes allowed per source IP.
    #[arg(long)]
    handshake_burst: Option<f64>,
    /// Session idle timeout in seconds.
    #[arg(long)]
    session_idle_timeout: Option<u64>,
    /// Datagram I/O backend: auto (io_uring, else recvmmsg/sendmmsg), uring (fail if
    /// unavailable) or mmsg.
    #[arg(long, value_enum)]
    io: Option<IoBackend>,
    /// Attach the XDP fast path to this interface (repeatable, or comma-separated).
    #[arg(long = "xdp-iface", value_delimiter = ',')]
    xdp_ifaces: Vec<String>,
    /// XDP attach mode (default native; off disables XDP even if the config names interfaces).
    #[arg(long, value_enum)]
    xdp_mode: Option<ztna_relay::config::XdpMode>,
    /// With XDP: only filter and steer, leave DATA-frame forwarding to user space.
    #[arg(long)]
    xdp_no_forward: bool,
    /// Do not load the SK_REUSEPORT steering program (user-space hand-offs only).
    #[arg(long)]
    no_ebpf_steering: bool,
    /// Run the NAT-test responder on two addresses of this host, PRIMARY,ALTERNATE (for
    /// `ztna-agent check --nat-test`).
    #[arg(long = "nat-test", value_delimiter = ',')]
    nat_test: Vec<std::net::IpAddr>,
    /// Its port (it also uses the next one; default 3478).
    #[arg(long)]
    nat_test_port: Option<u16>,
    /// On SIGTERM, clients reconnect at a random moment within this many ms (default 1000).
    #[arg(long)]
    reconnect_spread_ms: Option<u32>,
    /// Directory for state that outlives a restart, the stateless-reset key (default `state`).
    #[arg(long)]
    state_dir: Option<std::path::PathBuf>,
}

#[derive(Subcommand)]
enum PkiCommand {
    /// Create a CA, the relay certificate, identities and an example policy.
    Init {
        #[arg(long, default_value = "pki")]
        dir: PathBuf,
        /// Agent names to issue (ztna://agent/NAME); repeatable.
        #[arg(long = "agent", default_values_t = vec!["alice".to_string()])]
        agents: Vec<String>,
        /// Connector names to issue (ztna://connector/NAME); repeatable.
        #[arg(long = "connector", default_values_t = vec!["web-1".to_string()])]
        connectors: Vec<String>,
        /// DNS names in the relay certificate (127.0.0.1 and ::1 are always included).
        #[arg(long = "relay-name", default_values_t = vec!["localhost".to_string()])]
        relay_names: Vec<String>,
        /// The service the example policy grants.
        #[arg(long, default_value = "web")]
        service: String,
        /// Replace an existing CA.
        #[arg(long)]
        force: bool,
    },
    /// Issue one more identity from an existing CA.
    Issue {
        #[arg(long, default_value = "pki")]
        dir: PathBuf,
        /// ztna://agent/NAME or ztna://connector/NAME
        identity: String,
    },
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("ZTNA_LOG").unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Some(Command::Pki(cmd)) => pki_command(cmd),
        Some(Command::Run(args)) => run(args),
        None => run(cli.run),
    };
    if let Err(e) = result {
        eprintln!("ztna-relay: error: {e:#}");
        std::process::exit(1);
    }
}

fn pki_command(cmd: PkiCommand) -> Result<()> {
    match cmd {
        PkiCommand::Init { dir, agents, connectors, relay_names, service, force } => {
            let spec = DevPkiSpec { relay_names, agents, connectors, service };
            pki::init_dev_pki(&dir, &spec, force)?;
            println!("created a development PKI in {}", dir.display());
            Ok(())
        }
        PkiCommand::Issue { dir, identity } => {
            let id = Identity::parse(&identity)?;
            if id.kind == Kind::Relay {
                anyhow::bail!("relay certificates come from `pki init`");
            }
            let ca = CertificateAuthority::load(&dir)?;
            ca.issue_to(&dir, &id, &[], &[])?;
            println!("issued {} -> {}", id, pki::cert_path(&dir, &id).display());
            Ok(())
        }
    }
}

fn run(args: RunArgs) -> Result<()> {
    let mut cfg = Config::load(args.config.as_deref())?;
    if let Some(v) = args.listen { cfg.listen = v }
    if let Some(v) = args.admin { cfg.admin = v }
    if let Some(v) = args.workers { cfg.workers = v }
    if let Some(v) = args.cert { cfg.cert = v }
    if let Some(v) = args.key { cfg.key = v }
    if let Some(v) = args.ca { cfg.ca = v }
    if let Some(v) = args.policy { cfg.policy = v }
    if let Some(v) = args.handshake_rate { cfg.limits.handshakes_per_ip_per_sec = v; cfg.limits.handshake_burst = cfg.limits.handshake_burst.max(v) }
    if let Some(v) = args.handshake_burst { cfg.limits.handshake_burst = v }
    if let Some(v) = args.session_idle_timeout { cfg.limits.session_idle_timeout_secs = v }
    if let Some(v) = args.io { cfg.io = v }
    if args.no_retry { cfg.limits.retry = false }
    if args.no_pin { cfg.pin_workers = false }
    if !args.xdp_ifaces.is_empty() { cfg.xdp.ifaces = args.xdp_ifaces }
    if let Some(v) = args.xdp_mode { cfg.xdp.mode = v }
    if args.xdp_no_forward { cfg.xdp.forward = false }
    if args.no_ebpf_steering { cfg.ebpf_steering = false }
    if !args.nat_test.is_empty() { cfg.nat_test.addresses = args.nat_test }
    if let Some(v) = args.nat_test_port { cfg.nat_test.port = v }
    if let Some(v) = args.state_dir { cfg.state_dir = v }
    if let Some(v) = args.reconnect_spread_ms { cfg.limits.reconnect_spread_ms = v }

    let nothing_exists = !cfg.cert.exists() && !cfg.key.exists() && !cfg.ca.exists();
    if cfg.dev_pki && nothing_exists {
        tracing::warn!(dir = %cfg.dev_pki_dir.display(), "no certificates found: creating a DEVELOPMENT PKI (not for production)");
        pki::init_dev_pki(&cfg.dev_pki_dir, &DevPkiSpec::default(), false).context("creating the development PKI")?;
        let d = &cfg.dev_pki_dir;
        (cfg.cert, cfg.key, cfg.ca) = (d.join("relay.pem"), d.join("relay.key"), d.join("ca.pem"));
        if !cfg.policy.exists() {
            cfg.policy = d.join("policy.toml");
        }
    }

    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGHUP])?;
    let relay = ztna_relay::Relay::start(cfg)?;
    for sig in signals.forever() {
        match sig {
            SIGHUP => {
                if let Err(e) = relay.reload() {
                    tracing::error!("{e:#}");
                }
            }
            _ => {
                tracing::info!("draining: closing connections");
                relay.drain();
                tracing::info!("relay stopped");
                return Ok(());
            }
        }
    }
    Ok(())
}
