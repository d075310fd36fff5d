//! Creating relay sessions through the real control protocol, for `flood` and `sessions`:
//! one connector registers a service, N agent control connections each ask for a session to
//! it, and both sides wait for their `SessionOffer`.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use ztna_client::{ClientError, ClientTls, ControlClient};
use ztna_proto::{Message, SessionId};
use ztna_testbed::Pki;

use crate::client::{self, SOFTWARE};

/// Who creates the sessions (identities from the PKI directory) and to which service.
#[derive(clap::Args, Debug, Clone)]
pub struct SessionSetupArgs {
    /// Relay UDP address.
    #[arg(long)]
    pub relay: SocketAddr,
    /// Directory written by `ztna-relay pki init` (CA and client identities).
    #[arg(long)]
    pub pki_dir: PathBuf,
    /// Agent identity name (one control connection per session, all with this identity).
    #[arg(long, default_value = "alice")]
    pub agent: String,
    /// Connector identity name (one control connection, registered for --service).
    #[arg(long, default_value = "web-1")]
    pub connector: String,
    /// Service the agents connect to.
    #[arg(long, default_value = "web")]
    pub service: String,
    /// Verify the relay certificate against this name (default: CA only).
    #[arg(long)]
    pub server_name: Option<String>,
    /// Seconds to wait for each handshake and each answer.
    #[arg(long, default_value_t = 5.0)]
    pub timeout: f64,
    /// Relay address for the connector, when it reaches the relay elsewhere than the agents
    /// (e.g. the lab: agents at 192.0.2.1, the connector at 198.51.100.1). Default: --relay.
    #[arg(long)]
    pub connector_relay: Option<SocketAddr>,
    /// Network namespace (`ip netns` name) for the agents' sockets; default: this process's.
    #[arg(long)]
    pub agent_netns: Option<String>,
    /// Network namespace for the connector's socket.
    #[arg(long)]
    pub connector_netns: Option<String>,
}

impl SessionSetupArgs {
    /// Setup against `relay` with the defaults of every other option.
    pub fn new(relay: SocketAddr, pki_dir: PathBuf) -> SessionSetupArgs {
        #[derive(clap::Parser)]
        struct Only {
            #[command(flatten)]
            setup: SessionSetupArgs,
        }
        let relay = relay.to_string();
        let argv: [&std::ffi::OsStr; 5] = ["setup".as_ref(), "--relay".as_ref(), relay.as_ref(), "--pki-dir".as_ref(), pki_dir.as_os_str()];
        <Only as clap::Parser>::parse_from(argv).setup
    }
}

pub struct Established {
    pub connector: ControlClient,
    /// One agent control connection per session, in session order.
    pub agents: Vec<ControlClient>,
    pub sessions: Vec<SessionId>,
    pub setup_s: f64,
}

fn explain(relay: SocketAddr, timeout: f64, who: &str, e: ClientError) -> anyhow::Error {
    match e {
        ClientError::Timeout(..) => anyhow::anyhow!(
            "no answer from the relay at {relay} within {timeout} s (as {who}): is the relay running, on this address, and is the path open?"
        ),
        ClientError::Io(io) if io.kind() == std::io::ErrorKind::ConnectionRefused => anyhow::anyhow!(
            "nothing listens at {relay} (as {who}: the host answered port unreachable): is the relay running on this port?"
        ),
        other => anyhow::anyhow!("connecting to the relay {relay} as {who}: {other}"),
    }
}

async fn connect(a: &SessionSetupArgs, relay: SocketAddr, netns: Option<&str>, tls: &ClientTls, who: &str) -> Result<ControlClient> {
    let sock = client::client_socket(relay, netns).with_context(|| format!("a client socket towards the relay {relay}"))?;
    ControlClient::connect_on(sock, relay, a.server_name.as_deref(), tls, SOFTWARE, Duration::from_secs_f64(a.timeout))
        .await
        .map_err(|e| explain(relay, a.timeout, who, e))
}

async fn expect_offer(c: &mut ControlClient, who: &str, deadline: Instant) -> Result<SessionId> {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match c.next_message(left).await {
            Ok(Message::SessionOffer { session, .. }) => return Ok(session),
            Ok(Message::Error { code, message, .. }) => {
                bail!("{who}: the relay refused: {code:?}: {message}")
            }
            Ok(_) => continue,
            Err(e) => bail!("{who}: waiting for a session offer: {e}"),
        }
    }
}

/// Creates `n` sessions. Nothing here services the control connections afterwards: the caller
/// either does (`ControlClient::idle`) or keeps its run shorter than the relay's control idle
/// timeout (30 s).
pub async fn establish(a: &SessionSetupArgs, n: usize) -> Result<Established> {
    if n == 0 {
        bail!("at least one session is needed");
    }
    let started = Instant::now();
    let timeout = Duration::from_secs_f64(a.timeout);
    let pki = Pki::open(&a.pki_dir);
    let ctls = pki.tls("connector", &a.connector)?;
    let atls = pki.tls("agent", &a.agent)?;
    let who_c = format!("connector {}", a.connector);
    let crelay = a.connector_relay.unwrap_or(a.relay);
    let mut connector = connect(a, crelay, a.connector_netns.as_deref(), &ctls, &who_c).await?;
    connector.send(&Message::Register {
        services: vec![a.service.clone()],
    })?;
    let deadline = Instant::now() + timeout;
    loop {
        match connector
            .next_message(deadline.saturating_duration_since(Instant::now()))
            .await
        {
            Ok(Message::Registered { .. }) => break,
            Ok(Message::Error { code, message, .. }) => {
                bail!("{who_c}: registering {}: {code:?}: {message}", a.service)
            }
            Ok(_) => continue,
            Err(e) => bail!("{who_c}: waiting for Registered: {e}"),
        }
    }
    let mut agents = Vec::with_capacity(n);
    let mut sessions = Vec::with_capacity(n);
    let mut offered_to_connector: HashSet<SessionId> = HashSet::new();
    let who_a = format!("agent {}", a.agent);
    for i in 0..n {
        let mut agent = connect(a, a.relay, a.agent_netns.as_deref(), &atls, &who_a)
            .await
            .with_context(|| format!("session {} of {n}", i + 1))?;
        agent.send(&Message::Connect {
            request_id: i as u32 + 1,
            service: a.service.clone(),
        })?;
        let deadline = Instant::now() + timeout;
        let session = expect_offer(&mut agent, &who_a, deadline).await?;
        while !offered_to_connector.contains(&session) {
            let s = expect_offer(&mut connector, &who_c, deadline).await.context(
                "no offer for the agent's session reached our connector: is another connector with this identity registered \
                 (a previous run's, until the relay's 30 s control idle timeout)?",
            )?;
            offered_to_connector.insert(s);
        }
        agents.push(agent);
        sessions.push(session);
        if (i + 1) % 100 == 0 {
            eprintln!("-- {} sessions created", i + 1);
        }
    }
    Ok(Established {
        connector,
        agents,
        sessions,
        setup_s: started.elapsed().as_secs_f64(),
    })
}

/// The address the relay bound for a client: its latest QAD report (what the relay saw), or
/// the local address when there was none.
pub fn bound_addr(c: &ControlClient) -> SocketAddr {
    c.observed().unwrap_or_else(|| c.local_addr())
}
