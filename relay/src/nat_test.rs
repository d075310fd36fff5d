//! The NAT-test responder (PROTOCOL.md §14.9): RFC 5780's server side on relay frames. Four
//! sockets, on the primary and alternate address times `port` and `port + 1`; a probe that
//! reached one of them is answered from the one its change request names, so a client can
//! tell how its NAT maps (does the mapping change with the destination?) and filters (does it
//! let in a packet from an address or port it never sent to?).
//!
//! Kept off the workers' port on purpose: answering from another address needs a socket bound
//! to it, and none of this is on a hot path. A reply is never longer than its probe and goes
//! only to the probe's source, and all replies together are capped per second.

use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use prometheus_client::metrics::counter::Counter;
use ztna_proto::addr;
use ztna_proto::nat_test::{CHANGE_ADDRESS, CHANGE_PORT, NAT_PROBE_LEN, NAT_REPLY_MAX_LEN, NatProbe, NatReply};

use crate::config::NatTestConfig;
use crate::metrics::Metrics;

/// How often a responder thread looks at the stop flag.
const STOP_POLL: Duration = Duration::from_millis(200);

/// The running responder; dropping it stops its threads.
pub struct NatTestResponder {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    /// Primary address and port (what `ztna-agent check --nat-test` is pointed at).
    pub primary: SocketAddr,
}

/// Socket index: bit 0 is the address (0 primary, 1 alternate), bit 1 the port (0 `port`, 1 `port + 1`).
fn answering_socket(reached: usize, change: u8) -> usize {
    let mut i = reached;
    if change & CHANGE_ADDRESS != 0 {
        i ^= 1;
    }
    if change & CHANGE_PORT != 0 {
        i ^= 2;
    }
    i
}

struct Counters {
    answered: Counter,
    malformed: Counter,
    rate_limited: Counter,
    send_failed: Counter,
}

/// A token bucket shared by the four threads: one second's worth of burst.
struct Budget {
    per_sec: f64,
    state: Mutex<(f64, Instant)>,
}

impl Budget {
    fn take(&self) -> bool {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        s.0 = (s.0 + now.duration_since(s.1).as_secs_f64() * self.per_sec).min(self.per_sec);
        s.1 = now;
        if s.0 >= 1.0 {
            s.0 -= 1.0;
            true
        } else {
            false
        }
    }
}

impl NatTestResponder {
    pub fn start(cfg: &NatTestConfig, metrics: &Metrics) -> Result<NatTestResponder> {
        let (a, b) = (cfg.addresses[0], cfg.addresses[1]);
        let binds = [(a, cfg.port), (b, cfg.port), (a, cfg.port + 1), (b, cfg.port + 1)].map(SocketAddr::from);
        let mut sockets = Vec::with_capacity(4);
        for at in binds {
            let s = UdpSocket::bind(at).with_context(|| format!("binding the NAT-test responder to {at}"))?;
            s.set_read_timeout(Some(STOP_POLL))?;
            sockets.push(s);
        }
        let sockets: Arc<[UdpSocket]> = sockets.into();
        let counters = Arc::new(Counters {
            answered: metrics.nat_test("answered"),
            malformed: metrics.nat_test("malformed"),
            rate_limited: metrics.nat_test("rate_limited"),
            send_failed: metrics.nat_test("send_failed"),
        });
        let per_sec = f64::from(cfg.replies_per_sec);
        let budget = Arc::new(Budget { per_sec, state: Mutex::new((per_sec, Instant::now())) });
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::with_capacity(4);
        for reached in 0..4 {
            let (sockets, counters, budget, stop) = (sockets.clone(), counters.clone(), budget.clone(), stop.clone());
            let t = std::thread::Builder::new()
                .name(format!("nat-test-{reached}"))
                .spawn(move || serve(reached, &sockets, &counters, &budget, &stop))?;
            threads.push(t);
        }
        tracing::info!(primary = %binds[0], alternate = %binds[3], "NAT-test responder started");
        Ok(NatTestResponder { stop, threads, primary: binds[0] })
    }
}

fn serve(reached: usize, sockets: &[UdpSocket], counters: &Counters, budget: &Budget, stop: &AtomicBool) {
    // One byte more than a probe, so an oversized datagram is seen as such.
    let mut buf = [0u8; NAT_PROBE_LEN + 1];
    let mut reply = [0u8; NAT_REPLY_MAX_LEN];
    let other = sockets[3 - reached].local_addr().ok();
    while !stop.load(Ordering::Relaxed) {
        let (n, from) = match sockets[reached].recv_from(&mut buf) {
            Ok(r) => r,
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => continue,
            Err(e) => {
                tracing::warn!(error = %e, "NAT-test responder: receive failed");
                std::thread::sleep(STOP_POLL);
                continue;
            }
        };
        let (Ok(probe), Some(other)) = (NatProbe::parse(&buf[..n]), other) else {
            counters.malformed.inc();
            continue;
        };
        if !budget.take() {
            counters.rate_limited.inc();
            continue;
        }
        let len = NatReply { nonce: probe.nonce, observed: addr::canonical(from), other }.write(&mut reply);
        match sockets[answering_socket(reached, probe.change)].send_to(&reply[..len], from) {
            Ok(_) => counters.answered.inc(),
            Err(_) => counters.send_failed.inc(),
        };
    }
}

impl Drop for NatTestResponder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn change_requests_pick_the_other_address_and_port() {
        assert_eq!(answering_socket(0, 0), 0);
        assert_eq!(answering_socket(0, CHANGE_PORT), 2);
        assert_eq!(answering_socket(0, CHANGE_ADDRESS | CHANGE_PORT), 3);
        assert_eq!(answering_socket(1, CHANGE_ADDRESS), 0);
        assert_eq!(answering_socket(3, CHANGE_ADDRESS | CHANGE_PORT), 0);
    }

    /// On loopback's 127.0.0.1 and 127.0.0.2: every change request is answered from the socket
    /// it names; garbage and probes over the budget are counted and not answered.
    #[test]
    fn answers_from_the_requested_socket_and_counts_what_it_refuses() {
        let metrics = Metrics::new(1);
        let cfg = NatTestConfig { addresses: vec!["127.0.0.1".parse().unwrap(), "127.0.0.2".parse().unwrap()], port: 0, replies_per_sec: 5 };
        // Port 0 is refused by the config; find a free pair here.
        let free = |p: u16| ["127.0.0.1", "127.0.0.2"].iter().all(|ip| UdpSocket::bind((*ip, p)).is_ok() && UdpSocket::bind((*ip, p + 1)).is_ok());
        let port = (20000..60000).step_by(2).find(|p| free(*p)).unwrap();
        let started = Instant::now();
        let responder = NatTestResponder::start(&NatTestConfig { port, ..cfg }, &metrics).unwrap();
        let client = UdpSocket::bind("127.0.0.1:0").unwrap();
        client.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut buf = [0u8; 64];
        let expected_from = |change: u8| match change {
            0 => SocketAddr::from(([127, 0, 0, 1], port)),
            CHANGE_PORT => SocketAddr::from(([127, 0, 0, 1], port + 1)),
            CHANGE_ADDRESS => SocketAddr::from(([127, 0, 0, 2], port)),
            _ => SocketAddr::from(([127, 0, 0, 2], port + 1)),
        };
        for (nonce, change) in [0, CHANGE_PORT, CHANGE_ADDRESS, CHANGE_ADDRESS | CHANGE_PORT].into_iter().enumerate() {
            let mut probe = [0u8; NAT_PROBE_LEN];
            NatProbe { nonce: nonce as u64, change }.write(&mut probe);
            client.send_to(&probe, responder.primary).unwrap();
            let (n, from) = client.recv_from(&mut buf).unwrap();
            assert_eq!(from, expected_from(change));
            let reply = NatReply::parse(&buf[..n]).unwrap();
            assert_eq!((reply.nonce, reply.observed), (nonce as u64, client.local_addr().unwrap()));
            assert_eq!(reply.other, SocketAddr::from(([127, 0, 0, 2], port + 1)));
        }
        client.send_to(b"\x05 not a probe", responder.primary).unwrap();
        // 30 more at once: past the budget of 5 per second (a burst of 5, 4 of it spent), the
        // bucket refills by 5 for every second since the start, and the rest are refused.
        let mut probe = [0u8; NAT_PROBE_LEN];
        NatProbe { nonce: 9, change: 0 }.write(&mut probe);
        for _ in 0..30 {
            client.send_to(&probe, responder.primary).unwrap();
        }
        let counted = || metrics.nat_test("answered").get() + metrics.nat_test("rate_limited").get() + metrics.nat_test("malformed").get();
        let deadline = Instant::now() + Duration::from_secs(5);
        while counted() < 35 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        let elapsed = started.elapsed().as_secs_f64();
        assert_eq!((counted(), metrics.nat_test("malformed").get()), (35, 1));
        let answered = metrics.nat_test("answered").get() as f64;
        assert!(answered <= 5.0 + (5.0 * elapsed).ceil(), "{answered} answered in {elapsed:.2} s");
        assert!(metrics.nat_test("rate_limited").get() > 0);
    }
}
