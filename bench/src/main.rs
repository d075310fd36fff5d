//! `ztna-bench`: load generator and benchmark harness for the ZTNA relay.
//!
//! Everything it sends goes to the relay address it is given, or to processes it starts in the
//! network namespaces of the lab it creates (`tunnel`, `dataplane`, `standard`), and every run
//! is bounded in time and stops by itself.

// Measuring: one module per command, and what they share.
mod baseline;
mod client;
mod control_plane;
mod dataplane;
mod direct;
mod direct_storm;
mod direct_stream;
mod flood;
mod handshakes;
mod idle_rss;
mod reconnect_storm;
mod sessions;
mod setup;
mod tunnel;
// Running: the relay under test, its counters, the lab run, Ctrl-C, the system's figures.
mod interrupt;
mod lab_run;
mod relay_counters;
mod relay_under_test;
mod sys;
// Reporting, and the standard set that runs everything and writes docs/BENCHMARKS.md.
mod report;
mod standard;

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
}

#[derive(Subcommand)]
enum Cmd {
    /// Control-connection handshakes per second: N loops of connect (full handshake) + close.
    Handshakes(handshakes::HandshakeArgs),
    /// N real client engines reconnecting to a relay restarted with SIGTERM, with and without
    /// its reconnect spread: time until all are back, peak handshake rate.
    ReconnectStorm(reconnect_storm::ReconnectStormArgs),
    /// Relay resident memory per idle control connection.
    IdleRss(idle_rss::IdleRssArgs),
    /// End-to-end tunnel throughput and added latency (relay, connector, agent started each in
    /// its host of the lab topology; root).
    Tunnel(tunnel::TunnelArgs),
    /// The standard set, all on the lab topology (root): control plane and tunnel against
    /// processes it starts in the lab's hosts, then the data plane (--skip-dataplane leaves it
    /// out); rewrites docs/BENCHMARKS.md.
    Standard(standard::StandardArgs),
    /// DATA-frame flood through N real sessions (sendmmsg/GSO generator, recvmmsg sink on the
    /// connector's socket): offered/delivered pps, loss, reordering, one-way latency, relay CPU.
    Flood(flood::FloodArgs),
    /// Create N sessions, write them to a JSON file and hold them, counting the DATA frames that
    /// arrive at the connector (the sink for an external packet generator).
    Sessions(sessions::SessionsArgs),
    /// Forwarding rate of one worker on the lab topology (network namespaces, trafgen): the
    /// baseline forwarder and the relay on mmsg, io_uring and XDP side by side, and the latency
    /// the relay adds at half its maximum rate. Needs root.
    Dataplane(dataplane::DataplaneArgs),
    /// The kernel-socket baseline: a minimal recvmmsg → session lookup → sendmmsg forwarder for
    /// the sessions of a sessions file (one thread, one socket).
    BaselineForwarder(baseline::BaselineArgs),
    /// Time from a new tunnel's first packet to its move onto a direct path, through the NAT
    /// lab with a one-way delay on each WAN link (root).
    Direct(direct::DirectArgs),
    /// One TCP stream (iperf3) through the NAT lab: plain kernel TCP, the tunnel on the relay
    /// path and the tunnel on a direct path, alternating (root).
    DirectStream(direct_stream::DirectStreamArgs),
    /// Many tunnels punching at once through the NAT lab: success rate, time to direct and the
    /// relay's CPU during the storm (root).
    DirectStorm(direct_storm::DirectStormArgs),
    /// Write a trafgen (netsniff-ng) config with one DATA frame per session of a sessions file.
    ExportTrafgen(sessions::ExportTrafgenArgs),
    /// Write a classic pcap with one DATA frame per session of a sessions file.
    ExportPcap(sessions::ExportPcapArgs),
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
        Cmd::Tunnel(a) => {
            let r = tunnel::run(&a, None).await?;
            report::tunnel::print(&r);
            if let Some(out) = &a.out {
                report::tunnel::write_section(out, &r)?;
                println!("-- wrote the tunnel section of {}", out.display());
            }
            write_json(a.json.as_deref(), &r)
        }
        Cmd::Flood(a) => {
            let r = flood::run(&a).await?;
            flood::print(&r);
            write_json(a.json.as_deref(), &r)
        }
        Cmd::Sessions(a) => {
            let r = sessions::run(&a).await?;
            sessions::print(&r);
            Ok(())
        }
        Cmd::Dataplane(a) => {
            let r = dataplane::run(&a).await?;
            report::dataplane::print(&r);
            if let Some(out) = &a.out {
                report::dataplane::write_section(out, &r)?;
                println!("-- wrote the data-plane section of {}", out.display());
            }
            write_json(a.json.as_deref(), &r)
        }
        Cmd::Direct(a) => {
            let r = direct::run(&a)?;
            direct::print(&r);
            write_json(a.json.as_deref(), &r)
        }
        Cmd::DirectStream(a) => {
            let r = direct_stream::run(&a)?;
            direct_stream::print(&r);
            write_json(a.json.as_deref(), &r)
        }
        Cmd::ReconnectStorm(a) => {
            let r = reconnect_storm::run(&a).await?;
            reconnect_storm::print(&r);
            write_json(a.json.as_deref(), &r)
        }
        Cmd::DirectStorm(a) => {
            let r = direct_storm::run(&a)?;
            direct_storm::print(&r);
            write_json(a.json.as_deref(), &r)
        }
        Cmd::BaselineForwarder(a) => baseline::run(&a).map(|_| ()),
        Cmd::ExportTrafgen(a) => sessions::export_trafgen(&a),
        Cmd::ExportPcap(a) => sessions::export_pcap(&a),
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
    // Children are spawned from this thread (the runtime's `block_on`), which lives as long as
    // the run: let them die with it even if no destructor gets to run.
    ztna_testbed::process::die_with_spawning_thread();
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
