//! The XDP program on the relay's interfaces, and the maps user space keeps it fed with:
//! the session mirror (DATA-frame forwarding in the kernel), the blocklist (from the
//! handshake rate limiter), the worker→CPU table and the CPU map (steering).

use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use aya::maps::{Array, CpuMap, DevMapHash, MapData, PerCpuArray};
use aya::programs::{Xdp, XdpMode as AyaMode};
use aya::{Ebpf, EbpfLoader};
use serde::Deserialize;
use ztna_proto::SessionId;

use super::maps::*;
use super::sys;

/// Name of the program in `ebpf/xdp_relay.c`; also how leftovers of an earlier relay are
/// recognised on an interface.
pub const PROGRAM: &str = "ztna_xdp";
/// Packets queued per CPU in the CPU map before the steering CPU drops.
const CPU_QUEUE: u32 = 2048;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum XdpMode {
    /// In the driver (fastest; the NIC driver must support XDP).
    Native,
    /// Generic XDP in the kernel's receive path (any interface; for testing).
    Skb,
    /// No XDP program: user space does all the work.
    Off,
}

pub struct XdpOptions<'a> {
    pub ifaces: &'a [String],
    pub mode: XdpMode,
    /// Forward DATA frames in XDP (otherwise only filter and steer).
    pub forward: bool,
    pub port: u16,
    pub workers: u8,
    /// The CPU each worker is pinned to, if any.
    pub worker_cpus: &'a [Option<usize>],
    pub max_sessions: u32,
}

/// The attached program. Dropping it detaches the program from every interface (aya owns
/// the links; they are file descriptors, so even a killed relay leaves nothing attached).
pub struct XdpPath {
    /// Owns the program and its links: dropping it detaches.
    _ebpf: Ebpf,
    maps: Arc<MapFds>,
    /// Forwarding sysctls the relay switched on, restored when it goes.
    _forwarding: ForwardingSysctls,
    pub ifaces: Vec<String>,
    pub mode: XdpMode,
}

/// The maps workers write through, shared by every worker.
struct MapFds {
    sessions: MapData,
    blocklist: MapData,
    config: MapData,
    strict: AtomicBool,
    mirror_failures: AtomicU64,
}

impl XdpPath {
    pub fn attach(o: &XdpOptions<'_>) -> Result<(XdpPath, PerCpuArray<MapData, u64>)> {
        let aya_mode = match o.mode {
            XdpMode::Native => AyaMode::Driver,
            XdpMode::Skb => AyaMode::Skb,
            XdpMode::Off => bail!("XDP is off"),
        };
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| e).context("counting possible CPUs")? as u32;
        let mut ebpf = EbpfLoader::new()
            .map_max_entries("sessions", o.max_sessions.max(1))
            .map_max_entries("cpus", cpus)
            .load(XDP_OBJECT)
            .context("loading the XDP program")?;

        let mut flags = ZTNA_CFG_STRICT_SESSIONS as u8;
        if o.forward {
            flags |= ZTNA_CFG_FORWARD as u8;
        }
        let mut worker_cpu: Array<_, u32> = Array::try_from(ebpf.map_mut("worker_cpu").context("worker_cpu map missing")?)?;
        let mut steer = false;
        for (w, cpu) in o.worker_cpus.iter().enumerate() {
            let cpu = cpu.map_or(ZTNA_NO_CPU, |c| c as u32);
            steer |= cpu != ZTNA_NO_CPU;
            worker_cpu.set(w as u32, cpu, 0)?;
        }
        if steer {
            flags |= ZTNA_CFG_STEER_CPU as u8;
            let mut cpumap: CpuMap<_> = CpuMap::try_from(ebpf.map_mut("cpus").context("cpus map missing")?)?;
            for cpu in o.worker_cpus.iter().flatten() {
                cpumap.set(*cpu as u32, CPU_QUEUE, None, 0).with_context(|| format!("adding CPU {cpu} to the CPU map"))?;
            }
        }
        let mut ifindexes = Vec::new();
        for name in o.ifaces {
            let index = ifindex(name)?;
            ifindexes.push(index);
        }
        {
            let mut ports: DevMapHash<_> = DevMapHash::try_from(ebpf.map_mut("tx_ports").context("tx_ports map missing")?)?;
            for &i in &ifindexes {
                ports.insert(i, i, None, 0).context("adding an interface to the redirect map")?;
            }
        }
        let cfg = ztna_config { relay_port: o.port.to_be(), workers: o.workers, flags, pad: 0 };
        Array::<_, ztna_config>::try_from(ebpf.map_mut("config").context("config map missing")?)?.set(0, cfg, 0)?;

        let prog: &mut Xdp = ebpf.program_mut(PROGRAM).context("XDP program missing")?.try_into()?;
        prog.load().context("the kernel refused the XDP program")?;
        for name in o.ifaces {
            remove_leftover(name)?;
        }
        // Restored by the guard's drop if anything below fails.
        let mut forwarding = ForwardingSysctls::default();
        if o.forward {
            for name in o.ifaces {
                forwarding.enable(name)?;
            }
        }
        for name in o.ifaces {
            prog.attach(name, aya_mode).with_context(|| {
                format!("attaching XDP to {name} in {} mode (does the driver support it? try --xdp-mode skb)", mode_name(o.mode))
            })?;
            tracing::info!(iface = %name, mode = mode_name(o.mode), forward = o.forward, "XDP attached");
        }
        let counters = PerCpuArray::try_from(ebpf.take_map("counters").context("counters map missing")?)?;
        let maps = Arc::new(MapFds {
            sessions: take(&mut ebpf, "sessions")?,
            blocklist: take(&mut ebpf, "blocklist")?,
            config: take(&mut ebpf, "config")?,
            strict: AtomicBool::new(true),
            mirror_failures: AtomicU64::new(0),
        });
        Ok((XdpPath { _ebpf: ebpf, maps, _forwarding: forwarding, ifaces: o.ifaces.to_vec(), mode: o.mode }, counters))
    }

    pub fn mirror(&self) -> SessionMirror {
        SessionMirror { maps: self.maps.clone() }
    }

    pub fn blocklist(&self) -> Blocklist {
        Blocklist { maps: self.maps.clone() }
    }

    /// Session-mirror updates the kernel refused (map full): from the first one on, XDP
    /// passes unknown sessions to user space instead of dropping them.
    pub fn mirror_failures(&self) -> u64 {
        self.maps.mirror_failures.load(Ordering::Relaxed)
    }
}

impl Drop for XdpPath {
    fn drop(&mut self) {
        // The links are detached when `self._ebpf` drops, right after this; say so for the operator.
        for iface in &self.ifaces {
            tracing::info!(iface = %iface, "XDP detached");
        }
    }
}

fn take(ebpf: &mut Ebpf, name: &str) -> Result<MapData> {
    let map = ebpf.take_map(name).with_context(|| format!("{name} map missing"))?;
    match map {
        aya::maps::Map::HashMap(m) | aya::maps::Map::Array(m) => Ok(m),
        _ => bail!("{name} has an unexpected map type"),
    }
}

fn mode_name(m: XdpMode) -> &'static str {
    match m {
        XdpMode::Native => "native",
        XdpMode::Skb => "skb",
        XdpMode::Off => "off",
    }
}

fn ifindex(name: &str) -> Result<u32> {
    let c = std::ffi::CString::new(name).context("interface name")?;
    // SAFETY: c is a valid NUL-terminated string.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if i == 0 {
        bail!("no network interface named {name:?} (--xdp-iface)");
    }
    Ok(i)
}

/// `bpf_fib_lookup` answers only for interfaces with forwarding on (it checks the ingress
/// device's `forwarding` setting, IPv4 and IPv6). The relay turns it on for its XDP
/// interfaces and off again when it goes. It still routes nothing itself: packets to other
/// hosts are the host firewall's business (see docs/OPERATIONS.md).
#[derive(Default)]
struct ForwardingSysctls {
    switched_on: Vec<String>,
}

impl ForwardingSysctls {
    fn enable(&mut self, iface: &str) -> Result<()> {
        for family in ["ipv4", "ipv6"] {
            let path = format!("/proc/sys/net/{family}/conf/{iface}/forwarding");
            let Ok(value) = std::fs::read_to_string(&path) else { continue };
            if value.trim() == "0" {
                std::fs::write(&path, "1").with_context(|| format!("enabling {path} (XDP forwarding needs it for bpf_fib_lookup)"))?;
                tracing::info!(iface, family, "enabled forwarding on the interface for XDP's route lookups");
                self.switched_on.push(path);
            }
        }
        Ok(())
    }
}

impl Drop for ForwardingSysctls {
    fn drop(&mut self) {
        for path in &self.switched_on {
            if let Err(e) = std::fs::write(path, "0") {
                tracing::warn!(path, error = %e, "could not restore a forwarding sysctl");
            }
        }
    }
}

/// An XDP program attached through netlink outlives the process that attached it. If the
/// one on `iface` is the relay's own (a previous instance), remove it; if it belongs to
/// something else, refuse rather than take the interface over.
fn remove_leftover(iface: &str) -> Result<()> {
    let Ok(out) = Command::new("ip").args(["-d", "-j", "link", "show", "dev", iface]).output() else {
        return Ok(()); // without iproute2 the attach itself reports a busy interface
    };
    let text = String::from_utf8_lossy(&out.stdout);
    let Some(name) = attached_program_name(&text) else { return Ok(()) };
    if name.is_empty() {
        // Reading a program's name takes CAP_SYS_ADMIN, which the relay need not have.
        bail!("{iface} already has an XDP program the relay cannot identify without CAP_SYS_ADMIN; if it is an earlier relay's, remove it (ip link set dev {iface} xdp off)");
    }
    if name != PROGRAM {
        bail!("{iface} already has an XDP program ({name:?}) that is not the relay's; remove it first (ip link set dev {iface} xdp off)");
    }
    tracing::warn!(iface, "removing the XDP program a previous relay left attached");
    for kind in ["xdp", "xdpgeneric", "xdpdrv"] {
        let _ = Command::new("ip").args(["link", "set", "dev", iface, kind, "off"]).status();
    }
    Ok(())
}

/// The name of the XDP program in `ip -d -j link show` output, if one is attached.
fn attached_program_name(json: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(json).ok()?;
    let xdp = v.get(0)?.get("xdp")?;
    let prog = xdp.get("prog").or_else(|| xdp.get("attached")?.get(0)?.get("prog"))?;
    Some(prog.get("name").and_then(|n| n.as_str()).unwrap_or("").to_string())
}

/// A worker's handle on the kernel's session map. Every call is one `bpf(2)` syscall on a
/// shared descriptor: session changes are control-path events, never per packet.
#[derive(Clone)]
pub struct SessionMirror {
    maps: Arc<MapFds>,
}

impl SessionMirror {
    fn sessions_fd(&self) -> RawFd {
        self.maps.sessions.fd().as_fd().as_raw_fd()
    }

    /// Creates or rebinds a session. A rebind keeps XDP's last-seen time and frame count.
    pub fn upsert(&self, id: &SessionId, agent: SocketAddr, connector: SocketAddr) {
        let key = ztna_session_key { id: id.0 };
        let fd = self.sessions_fd();
        // SAFETY: key and value types are the map's (generated from the same header).
        let mut value: ztna_session = unsafe { sys::lookup(fd, &key) }.unwrap_or_default();
        value.side = [ztna_endpoint::from_socket_addr(agent), ztna_endpoint::from_socket_addr(connector)];
        // SAFETY: as above.
        if let Err(e) = unsafe { sys::update(fd, &key, &value, sys::BPF_ANY) } {
            self.mirror_failed(id, e);
        }
    }

    pub fn remove(&self, id: &SessionId) {
        let key = ztna_session_key { id: id.0 };
        // SAFETY: the key type is the map's. A missing entry (never mirrored) is fine.
        let _ = unsafe { sys::delete(self.sessions_fd(), &key) };
    }

    /// When XDP last forwarded a frame of this session.
    pub fn last_seen(&self, id: &SessionId, now: Instant) -> Option<Instant> {
        let key = ztna_session_key { id: id.0 };
        // SAFETY: key and value types are the map's.
        let v: ztna_session = unsafe { sys::lookup(self.sessions_fd(), &key) }?;
        if v.last_seen_ns == 0 {
            return None;
        }
        let ago = monotonic_ns().saturating_sub(v.last_seen_ns);
        now.checked_sub(Duration::from_nanos(ago))
    }

    fn mirror_failed(&self, id: &SessionId, e: std::io::Error) {
        self.maps.mirror_failures.fetch_add(1, Ordering::Relaxed);
        if self.maps.strict.swap(false, Ordering::Relaxed) {
            tracing::warn!(session = %id, error = %e, "could not mirror a session into XDP (map full?); XDP now passes unknown sessions to user space");
            let fd = self.maps.config.fd().as_fd().as_raw_fd();
            let zero = 0u32;
            // SAFETY: the config map is an array of one ztna_config keyed by u32.
            if let Some(mut cfg) = unsafe { sys::lookup::<_, ztna_config>(fd, &zero) } {
                cfg.flags &= !(ZTNA_CFG_STRICT_SESSIONS as u8);
                // SAFETY: as above.
                let _ = unsafe { sys::update(fd, &zero, &cfg, sys::BPF_ANY) };
            }
        }
    }
}

/// A worker's handle on the blocklist the handshake rate limiter fills: XDP drops QUIC
/// Initials from listed sources until their entry expires.
#[derive(Clone)]
pub struct Blocklist {
    maps: Arc<MapFds>,
}

impl Blocklist {
    /// Drops QUIC Initials from `ip` in XDP until `until`.
    pub fn block(&self, ip: IpAddr, until: Instant, now: Instant) {
        let key = ztna_block_key { addr: addr16(ip) };
        let expiry = monotonic_ns() + until.saturating_duration_since(now).as_nanos() as u64;
        // SAFETY: key and value types are the map's.
        if let Err(e) = unsafe { sys::update(self.maps.blocklist.fd().as_fd().as_raw_fd(), &key, &expiry, sys::BPF_ANY) } {
            tracing::debug!(%ip, error = %e, "blocklist update failed");
        }
    }

    /// Removes `ip` from the blocklist if its entry has expired (another worker may have
    /// renewed it).
    pub fn unblock_expired(&self, ip: IpAddr) {
        let key = ztna_block_key { addr: addr16(ip) };
        let fd = self.maps.blocklist.fd().as_fd().as_raw_fd();
        // SAFETY: key and value types are the map's.
        if let Some(expiry) = unsafe { sys::lookup::<_, u64>(fd, &key) }
            && expiry <= monotonic_ns()
        {
            // SAFETY: as above.
            let _ = unsafe { sys::delete(fd, &key) };
        }
    }
}

/// CLOCK_MONOTONIC in nanoseconds: the clock of `bpf_ktime_get_ns` and of `Instant`.
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: ts is a valid timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_attached_programs_in_ip_json() {
        let none = r#"[{"ifindex":3,"ifname":"a0","flags":["UP"]}]"#;
        assert_eq!(attached_program_name(none), None);
        let generic = r#"[{"ifname":"a0","xdp":{"mode":2,"prog":{"id":42,"name":"ztna_xdp","tag":"ab"}}}]"#;
        assert_eq!(attached_program_name(generic).as_deref(), Some("ztna_xdp"));
        let multi = r#"[{"ifname":"a0","xdp":{"mode":4,"attached":[{"mode":1,"prog":{"id":7,"name":"other"}}]}}]"#;
        assert_eq!(attached_program_name(multi).as_deref(), Some("other"));
    }
}
