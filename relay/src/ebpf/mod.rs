//! The relay's kernel side: the C programs in `ebpf/` (built by `build.rs`), loaded with aya.
//!
//! * [`reuseport`]: an `SK_REUSEPORT` program that delivers each datagram to the socket of
//!   the worker that owns it, so user-space hand-offs become rare.
//! * [`xdp`]: an XDP program on chosen interfaces that drops malformed and blocklisted
//!   packets, steers relay packets to the owning worker's CPU and forwards DATA frames of
//!   sessions mirrored into a BPF map without waking user space.
//!
//! User space stays the source of truth: sessions are created, rebound and removed by the
//! workers and mirrored into the kernel ([`xdp::SessionMirror`]); with XDP off, or for
//! anything the XDP path cannot do, user space forwards the same frames.

pub mod counters;
pub mod maps;
pub mod reuseport;
mod sys;
pub mod xdp;

/// What the relay attached at start-up, kept for its lifetime (dropping detaches).
#[derive(Default)]
pub struct Kernel {
    pub reuseport: Option<reuseport::ReuseportSteering>,
    pub xdp: Option<xdp::XdpPath>,
}

impl Kernel {
    /// The session mirror workers write through, when XDP is on.
    pub fn session_mirror(&self) -> Option<xdp::SessionMirror> {
        self.xdp.as_ref().map(|x| x.mirror())
    }

    /// The blocklist the workers' rate limiters fill, when XDP is on.
    pub fn blocklist(&self) -> Option<xdp::Blocklist> {
        self.xdp.as_ref().map(|x| x.blocklist())
    }
}

/// Loads what the configuration asks for. SK_REUSEPORT steering is an optimisation and
/// falls back to user-space hand-offs with a warning; XDP was asked for by name, so
/// failing to attach it is an error.
pub fn attach(
    config: &crate::config::Config,
    sockets: &[std::net::UdpSocket],
    port: u16,
    worker_cpus: &[Option<usize>],
) -> anyhow::Result<(Kernel, counters::KernelCounters)> {
    let mut kernel = Kernel::default();
    let mut counters = counters::KernelCounters::default();
    if config.ebpf_steering {
        match reuseport::ReuseportSteering::attach(sockets) {
            Ok((steering, c)) => {
                kernel.reuseport = Some(steering);
                counters.reuseport = Some(c);
                tracing::info!(workers = sockets.len(), "SK_REUSEPORT steering attached");
            }
            Err(e) => tracing::warn!(
                "SK_REUSEPORT steering unavailable ({e:#}); workers hand misdelivered datagrams to each other in user space"
            ),
        }
    }
    if config.xdp.enabled() {
        let opts = xdp::XdpOptions {
            ifaces: &config.xdp.ifaces,
            mode: config.xdp.mode,
            forward: config.xdp.forward,
            port,
            workers: sockets.len() as u8,
            worker_cpus,
            max_sessions: config.xdp.max_sessions,
        };
        let (path, c) = xdp::XdpPath::attach(&opts)?;
        kernel.xdp = Some(path);
        counters.xdp = Some(c);
    }
    Ok((kernel, counters))
}
