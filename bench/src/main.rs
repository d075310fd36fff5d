//! `ztna-bench`: load generator and benchmark harness for the ZTNA relay.
//!
//! Everything it sends goes to the relay address it is given (loopback in `standard`), and every
//! run is bounded in time and stops by itself.

mod handshakes;
mod idle_rss;
mod standard;
mod sys;

use std::path::Path;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use serde::Serialize;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "ztna-bench", version, about = "Load generator and benchmark harness for the ZTNA relay")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
    /// Let the client side load the system CA bundle on every connect, as quiche does by
    /// default (about 6 ms of CPU per connection, which starves the relay of CPU on small
    /// machines). Without this flag the load generator sets SSL_CERT_FILE=/dev/null for
    /// itself: clients then trust only the private CA they load explicitly.
    #[arg(long, global = true)]
    system_roots: bool,
}

/// The caller's SSL_CERT_FILE, before this process changed its own (children get it back).
static ORIGINAL_SSL_CERT_FILE: std::sync::OnceLock<Option<std::ffi::OsString>> = std::sync::OnceLock::new();

/// Gives a child process the caller's SSL_CERT_FILE, not the load generator's.
pub fn restore_ssl_cert_file(cmd: &mut std::process::Command) {
    match ORIGINAL_SSL_CERT_FILE.get().cloned().flatten() {
        Some(v) => cmd.env("SSL_CERT_FILE", v),
        None => cmd.env_remove("SSL_CERT_FILE"),
    };
}

/// How the load generator's clients build their trust store (for reports).
pub fn client_trust_store() -> &'static str {
    if std::env::var_os("SSL_CERT_FILE").is_some_and(|v| v == "/dev/null") {
        "private CA only (SSL_CERT_FILE=/dev/null: the system CA bundle is not loaded per connect)"
    } else {
        "system CA bundle loaded per connect (quiche default) plus the private CA"
    }
}

#[derive(Subcommand)]
enum Cmd {
    /// Control-connection handshakes per second: N loops of connect (full handshake) + close.
    Handshakes(handshakes::HandshakeArgs),
    /// Relay resident memory per idle control connection.
    IdleRss(idle_rss::IdleRssArgs),
    /// The standard control-plane set against a relay it starts on loopback; rewrites docs/BENCHMARKS.md.
    Standard(standard::StandardArgs),
}

fn write_json<T: Serialize>(path: Option<&Path>, value: &T) -> Result<()> {
    if let Some(p) = path {
        let text = serde_json::to_string_pretty(value)?;
        std::fs::write(p, text + "\n").with_context(|| format!("writing {}", p.display()))?;
        println!("-- wrote {}", p.display());
    }
    Ok(())
}

async fn run(cmd: Cmd) -> Result<()> {
    match cmd {
        Cmd::Handshakes(a) => {
            let r = handshakes::run(&a).await?;
            handshakes::print(&r, "");
            write_json(a.json.as_deref(), &r)
        }
        Cmd::IdleRss(a) => {
            let r = idle_rss::run(&a).await?;
            idle_rss::print(&r);
            write_json(a.json.as_deref(), &r)
        }
        Cmd::Standard(a) => {
            let r = standard::run(&a).await?;
            write_json(a.json.as_deref(), &r)
        }
    }
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("ZTNA_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let _ = ORIGINAL_SSL_CERT_FILE.set(std::env::var_os("SSL_CERT_FILE"));
    if !cli.system_roots {
        // SAFETY: still single-threaded here (no runtime, no threads spawned yet).
        unsafe { std::env::set_var("SSL_CERT_FILE", "/dev/null") };
    }
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("ztna-bench: error: starting the runtime: {e}");
            std::process::exit(1);
        }
    };
    let result = rt.block_on(run(cli.command));
    // Do not wait for stray tasks (e.g. connections still closing after an error).
    rt.shutdown_timeout(std::time::Duration::from_secs(1));
    if let Err(e) = result {
        eprintln!("ztna-bench: error: {e:#}");
        std::process::exit(1);
    }
}
