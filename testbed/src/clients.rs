//! The agent's and the connector's command lines, and starting them on loopback against a
//! relay with identities from a [`Pki`].

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::pki::Pki;
use crate::process::Process;
use crate::relay::test_log_level;

/// How long a connector may take to register with the relay.
pub const REGISTER_TIMEOUT: Duration = Duration::from_secs(10);

/// These helpers run agent and connector on one host, where a "direct path" would be
/// loopback: they measure and test the relay path, so direct paths are off (the NAT lab
/// tests direct paths between namespaces).
const RELAY_PATH_ONLY: [&str; 2] = ["--direct", "off"];

/// `ztna-connector` arguments: serve `services` (`name=host:port`, `name=udp:host:port`).
pub fn connector_args(relay: SocketAddr, pki_dir: &Path, name: &str, services: &[String]) -> Vec<String> {
    let mut v: Vec<String> = vec!["--relay".into(), relay.to_string(), "--pki-dir".into(), pki_dir.display().to_string()];
    v.extend(RELAY_PATH_ONLY.map(String::from));
    v.extend(["--name".into(), name.into()]);
    for s in services {
        v.extend(["--service".into(), s.clone()]);
    }
    v
}

/// `ztna-agent run` arguments with `forwards` (`-L`/`-U` flags and their values).
pub fn agent_args(relay: SocketAddr, pki_dir: &Path, name: &str, forwards: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = vec!["run".into(), "--relay".into(), relay.to_string(), "--pki-dir".into(), pki_dir.display().to_string()];
    v.extend(RELAY_PATH_ONLY.map(String::from));
    v.extend(["--name".into(), name.into()]);
    v.extend(forwards.iter().map(|s| s.to_string()));
    v
}

/// Starts workspace binary `bin_name` with `args`, its log in the PKI directory.
pub fn spawn(pki: &Pki, bin_name: &str, args: &[String]) -> Result<Process> {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut cmd = Command::new(crate::bins::find(bin_name)?);
    cmd.args(args).env("ZTNA_LOG", test_log_level());
    Process::spawn(bin_name, cmd, pki.file(&format!("{bin_name}-{n}.log")))
}

/// A connector serving `services`, started and registered with the relay.
pub fn start_connector(pki: &Pki, relay: SocketAddr, name: &str, services: &[String], extra: &[&str]) -> Result<Process> {
    let mut args = connector_args(relay, pki.path(), name, services);
    args.extend(extra.iter().map(|s| s.to_string()));
    let p = spawn(pki, "ztna-connector", &args)?;
    p.wait_for_log(&["registered"], REGISTER_TIMEOUT).with_context(|| format!("connector {name} did not register"))?;
    Ok(p)
}

/// An agent with `forwards`, started (callers wait for the log line they need).
pub fn start_agent(pki: &Pki, relay: SocketAddr, name: &str, forwards: &[&str]) -> Result<Process> {
    spawn(pki, "ztna-agent", &agent_args(relay, pki.path(), name, forwards))
}
