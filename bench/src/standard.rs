//! `ztna-bench standard`: the standard benchmark set, run in one go against processes this
//! command starts itself, all on the lab topology (`deploy/lab/lab.sh`: agent, relay and
//! connector hosts as network namespaces joined by veth pairs): control plane (relays in the
//! relay host, the load generator's sockets in the agent host) and tunnel (relay, connector,
//! agent, each in its host) in one lab, then the data plane (baseline and relay I/O paths,
//! trafgen) in a lab of its own; the results are written into docs/BENCHMARKS.md between markers.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use serde::Serialize;
use ztna_testbed::TempDir;
use ztna_testbed::lab;

use crate::control_plane::{self, ControlPlaneArgs, ControlPlaneReport};
use crate::dataplane::{self, DataplaneArgs, DataplaneReport};
use crate::interrupt::check_interrupted;
use crate::lab_run;
use crate::relay_under_test::{self, sibling_bin};
use crate::report;
use crate::sys;
use crate::tunnel::{self, TunnelArgs, TunnelReport};

#[derive(clap::Args, Debug, Clone)]
pub struct StandardArgs {
    /// Markdown file whose control-plane and tunnel sections are rewritten (created if missing).
    #[arg(long, default_value = "docs/BENCHMARKS.md")]
    pub out: PathBuf,
    #[command(flatten)]
    pub control_plane: ControlPlaneArgs,
    /// Seconds of each tunnel throughput run (direct and tunnel alternate, twice each).
    #[arg(long, default_value_t = 10.0)]
    pub tunnel_seconds: f64,
    /// Request/response exchanges measured per path in the tunnel latency run.
    #[arg(long, default_value_t = 10_000)]
    pub tunnel_exchanges: usize,
    /// The relay binary (default: `ztna-relay` next to this executable); agent and connector
    /// are always taken from next to this executable.
    #[arg(long)]
    pub relay_bin: Option<PathBuf>,
    /// Leave out the data-plane part (it needs trafgen and nftables).
    #[arg(long)]
    pub skip_dataplane: bool,
    /// The lab script (network namespaces; root needed).
    #[arg(long, default_value = "deploy/lab/lab.sh")]
    pub lab_script: PathBuf,
    /// Seconds for the data-plane rate searches together.
    #[arg(long, default_value_t = 180.0)]
    pub dataplane_budget: f64,
    /// ZTNA_LOG level of the relay under test.
    #[arg(long, default_value = "warn")]
    pub relay_log: String,
    /// Also write every result as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

#[derive(Debug, Clone, Serialize)]
pub struct StandardReport {
    /// Flattened: the JSON keeps the control-plane fields at the top level.
    #[serde(flatten)]
    pub control_plane: ControlPlaneReport,
    pub tunnel: TunnelReport,
    pub dataplane: Option<DataplaneReport>,
}

fn validate(args: &StandardArgs) -> Result<()> {
    let c = &args.control_plane;
    if !(c.duration > 0.0 && c.duration <= 600.0 && (0.0..=600.0).contains(&c.latency_duration)) {
        bail!("--duration must be in (0, 600] and --latency-duration in [0, 600] seconds");
    }
    if c.concurrency == 0 || c.concurrency > 10_000 || c.connections == 0 || c.connections > 100_000 {
        bail!("--concurrency must be in 1..=10000 and --connections in 1..=100000");
    }
    if let Some(dir) = args.out.parent().filter(|d| !d.as_os_str().is_empty())
        && !dir.is_dir()
    {
        bail!("{} does not exist: run from the workspace root or pass --out FILE", dir.display());
    }
    Ok(())
}

pub async fn run(args: &StandardArgs) -> Result<StandardReport> {
    validate(args)?;
    let bin = relay_under_test::relay_bin(args.relay_bin.as_deref())?;
    // Fail now, not after the control-plane runs, if the tunnel's binaries are missing.
    sibling_bin("ztna-agent", None)?;
    sibling_bin("ztna-connector", None)?;
    if !args.skip_dataplane {
        dataplane::check_tools().context("the data-plane part of the standard set (or pass --skip-dataplane)")?;
    }
    sys::raise_nofile_limit();
    let tmp = TempDir::new("bench")?;
    let pki = tmp.path().join("pki");
    relay_under_test::pki_init(&bin, &pki, &[])?;
    // One lab for the control-plane and tunnel parts; the data-plane part brings up its own.
    let lab = lab_run::up(&args.lab_script, "zs")?;
    println!(
        "-- lab {} up (agent {} → relay {} | {} → connector {})",
        lab.prefix,
        lab::AGENT_V4,
        lab::RELAY_A_V4,
        lab::RELAY_C_V4,
        lab::CONN_V4
    );

    let cp = control_plane::run(&args.control_plane, &lab, &bin, &pki, tmp.path(), &args.relay_log).await?;

    let tunnel_args = TunnelArgs {
        seconds: args.tunnel_seconds,
        rounds: 2,
        exchanges: args.tunnel_exchanges,
        warmup: 1000,
        size: 64,
        relay_bin: args.relay_bin.clone(),
        agent_bin: None,
        connector_bin: None,
        relay_log: args.relay_log.clone(),
        lab_script: args.lab_script.clone(),
        out: None,
        json: None,
    };
    check_interrupted()?;
    let tun = tunnel::run(&tunnel_args, Some(&lab)).await?;
    report::tunnel::print(&tun);
    drop(lab);

    let dp = if args.skip_dataplane {
        None
    } else {
        let dp_args = DataplaneArgs {
            relay_bin: args.relay_bin.clone(),
            budget: args.dataplane_budget,
            lab_script: args.lab_script.clone(),
            ..DataplaneArgs::defaults()
        };
        let r = dataplane::run(&dp_args).await?;
        report::dataplane::print(&r);
        Some(r)
    };

    let report = StandardReport { control_plane: cp, tunnel: tun, dataplane: dp };
    let mut sections = vec![
        (report::control_plane::SECTION, report::control_plane::render(&report.control_plane)),
        (report::tunnel::SECTION, report::tunnel::render(&report.tunnel)),
    ];
    if let Some(dp) = &report.dataplane {
        sections.push((report::dataplane::SECTION, report::dataplane::render(dp)));
    }
    report::markdown::write(&args.out, &sections)?;
    println!(
        "-- wrote the control-plane, tunnel{} sections of {}",
        if report.dataplane.is_some() { " and data-plane" } else { "" },
        args.out.display()
    );
    Ok(report)
}
