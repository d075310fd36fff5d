//! The lab topology of `deploy/lab/lab.sh` (three network namespaces joined by veth pairs,
//! documentation addresses only) under a prefix of this run's own: brought up by [`Lab::up`],
//! removed when the guard is dropped (on success, on error, on panic) and after Ctrl-C, which
//! the run notices through [`check_interrupted`].

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

use crate::sys;

/// The three hosts of the lab.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Host {
    Agent,
    Relay,
    Conn,
}

impl Host {
    fn suffix(self) -> &'static str {
        match self {
            Host::Agent => "agent",
            Host::Relay => "relay",
            Host::Conn => "conn",
        }
    }
}

/// Addresses of the lab (see the picture in lab.sh).
pub const AGENT_V4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 2);
pub const AGENT_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xa, 0, 0, 0, 0, 2);
pub const CONN_V4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 2);
pub const RELAY_A_V4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
pub const RELAY_C_V4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
pub const RELAY_A_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xa, 0, 0, 0, 0, 1);
pub const RELAY_C_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xc, 0, 0, 0, 0, 1);

/// The agent host's address.
pub fn agent_ip(v6: bool) -> IpAddr {
    if v6 { AGENT_V6.into() } else { AGENT_V4.into() }
}

/// The relay's address as the agent host reaches it (`a0`) and as the connector host does (`c0`).
pub fn relay_addrs(v6: bool, port: u16) -> (SocketAddr, SocketAddr) {
    let (a, c): (IpAddr, IpAddr) =
        if v6 { (RELAY_A_V6.into(), RELAY_C_V6.into()) } else { (RELAY_A_V4.into(), RELAY_C_V4.into()) };
    ((a, port).into(), (c, port).into())
}

/// Errors out once SIGINT or SIGTERM arrived (see [`sys::catch_stop_signals`]).
pub fn check_interrupted() -> Result<()> {
    if sys::stop_requested() {
        bail!("interrupted");
    }
    Ok(())
}

pub struct Lab {
    pub prefix: String,
    script: PathBuf,
}

impl Lab {
    /// `deploy/lab/lab.sh up` with `LAB_PREFIX=prefix`. From here on SIGINT and SIGTERM only
    /// set [`sys::stop_requested`], so the run unwinds and the namespaces are always removed.
    pub fn up(script: &Path, prefix: &str) -> Result<Lab> {
        if !script.is_file() {
            bail!("the lab script {} does not exist (run from the workspace root or pass --lab-script)", script.display());
        }
        sys::catch_stop_signals();
        // Constructed first, so a half-built lab is removed too.
        let lab = Lab { prefix: prefix.to_string(), script: script.to_path_buf() };
        let out = lab.script_cmd("up").output().with_context(|| format!("running {} up", script.display()))?;
        if !out.status.success() {
            bail!(
                "{} up failed (root, iproute2 and veth support are needed): {}",
                script.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(lab)
    }

    /// [`Lab::up`] under a prefix of this process's own (`tag` plus part of the pid) with the
    /// relay host routing between the other two ([`Lab::enable_routing`]).
    pub fn for_run(script: &Path, tag: &str) -> Result<Lab> {
        let lab = Lab::up(script, &format!("{tag}{}", std::process::id() % 100_000))?;
        lab.enable_routing()?;
        Ok(lab)
    }

    fn script_cmd(&self, action: &str) -> Command {
        let mut c = Command::new("bash");
        c.arg(&self.script).arg(action).env("LAB_PREFIX", &self.prefix).stdin(Stdio::null());
        c
    }

    /// The namespace name of a host.
    pub fn ns(&self, host: Host) -> String {
        format!("{}-{}", self.prefix, host.suffix())
    }

    /// A command to run inside a host.
    pub fn cmd(&self, host: Host, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns(host)]).arg(program);
        c
    }

    /// Runs a command in a host to completion; its stdout, or an error with its stderr.
    pub fn run(&self, host: Host, args: &[&str]) -> Result<String> {
        let (program, rest) = args.split_first().context("empty command")?;
        let out = self
            .cmd(host, program)
            .args(rest)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running {program} in {}", self.ns(host)))?;
        if !out.status.success() {
            bail!(
                "`{}` in {} failed ({}): {}",
                args.join(" "),
                self.ns(host),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// MAC address of an interface in a host.
    pub fn mac(&self, host: Host, dev: &str) -> Result<String> {
        Ok(self.run(host, &["cat", &format!("/sys/class/net/{dev}/address")])?.trim().to_string())
    }

    /// Packet counters of an interface in a host.
    pub fn link_stats(&self, host: Host, dev: &str) -> Result<LinkStats> {
        let text = self.run(host, &["ip", "-s", "-j", "link", "show", "dev", dev])?;
        let v: serde_json::Value = serde_json::from_str(&text).context("parsing `ip -s -j link` output")?;
        let s = &v[0]["stats64"];
        let n = |dir: &str, k: &str| s[dir][k].as_u64().unwrap_or(0);
        Ok(LinkStats {
            rx_packets: n("rx", "packets"),
            rx_dropped: n("rx", "dropped"),
            tx_packets: n("tx", "packets"),
            tx_dropped: n("tx", "dropped"),
        })
    }

    /// Receive Packet Steering: the host's receive processing of frames arriving on `dev` runs
    /// on `cpu` (a veth otherwise does it on the CPU that sent them, i.e. the peer host's).
    pub fn steer_rx(&self, host: Host, dev: &str, cpu: usize) -> Result<()> {
        let mask = format!("{:x}", 1u64 << cpu.min(63));
        self.run(host, &["sh", "-c", &format!("echo {mask} > /sys/class/net/{dev}/queues/rx-0/rps_cpus")]).map(|_| ())
    }

    /// Makes the relay host a plain IP router between the agent and connector hosts (routes
    /// both ways, forwarding on): the kernel-only path that the relay's added latency is
    /// measured against.
    pub fn enable_routing(&self) -> Result<()> {
        self.run(Host::Relay, &["sysctl", "-q", "-w", "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"])?;
        self.run(Host::Agent, &["ip", "route", "replace", "198.51.100.0/24", "via", "192.0.2.1"])?;
        self.run(Host::Agent, &["ip", "-6", "route", "replace", "2001:db8:c::/64", "via", "2001:db8:a::1"])?;
        self.run(Host::Conn, &["ip", "route", "replace", "192.0.2.0/24", "via", "198.51.100.1"])?;
        self.run(Host::Conn, &["ip", "-6", "route", "replace", "2001:db8:a::/64", "via", "2001:db8:c::1"])?;
        Ok(())
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        match self.script_cmd("down").output() {
            Ok(o) if o.status.success() => {}
            _ => eprintln!(
                "ztna-bench: warning: removing the lab failed; run `LAB_PREFIX={} {} down`",
                self.prefix,
                self.script.display()
            ),
        }
    }
}

/// Counters of one interface (`ip -s link`).
#[derive(Debug, Clone, Copy, Default)]
pub struct LinkStats {
    pub rx_packets: u64,
    pub rx_dropped: u64,
    pub tx_packets: u64,
    pub tx_dropped: u64,
}

impl LinkStats {
    pub fn since(&self, b: &LinkStats) -> LinkStats {
        LinkStats {
            rx_packets: self.rx_packets.saturating_sub(b.rx_packets),
            rx_dropped: self.rx_dropped.saturating_sub(b.rx_dropped),
            tx_packets: self.tx_packets.saturating_sub(b.tx_packets),
            tx_dropped: self.tx_dropped.saturating_sub(b.tx_dropped),
        }
    }
}
