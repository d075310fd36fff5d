//! A separate peer-to-peer socket (PROTOCOL.md §14.6), for sites whose firewall treats the
//! control connection and direct traffic differently: the relay path stays on the client's
//! main socket, direct paths (punches, checks, tunnel packets) use this one. Its
//! server-reflexive address comes from stateless QAD probes (§8.3) to the relay, which the
//! control connection cannot report: the relay never sees this socket otherwise.
//!
//! [`ReflexiveProbe`] is the probing schedule without I/O; [`P2pSocket`] binds it to a socket.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tokio::net::UdpSocket;
use ztna_proto::frame;

/// Waits before re-sending an unanswered probe: quick at first, then backing off to the cap.
pub const RETRY_FIRST: Duration = Duration::from_millis(250);
pub const RETRY_MAX: Duration = Duration::from_secs(5);
/// Between answered probes. A probe also refreshes the socket's NAT mapping, which for an
/// endpoint-independent NAT is the mapping peers punch towards: well inside the 30 s after
/// which Linux conntrack forgets an unanswered UDP flow, and most home routers' 60 s or more.
pub const REFRESH: Duration = Duration::from_secs(15);

/// Learns and refreshes one socket's server-reflexive address from the relay.
#[derive(Debug, Clone)]
pub struct ReflexiveProbe {
    relay: SocketAddr,
    reflexive: Option<SocketAddr>,
    /// The nonce of the probe in flight (retransmissions reuse it) and the wait before the next.
    pending: Option<(u64, Duration)>,
    next_send: Instant,
}

impl ReflexiveProbe {
    /// The first probe is due at once.
    pub fn new(relay: SocketAddr, now: Instant) -> Self {
        ReflexiveProbe { relay, reflexive: None, pending: None, next_send: now }
    }

    pub fn reflexive(&self) -> Option<SocketAddr> {
        self.reflexive
    }

    /// The nonce of a probe to send now, if one is due.
    pub fn poll(&mut self, now: Instant) -> Option<u64> {
        if now < self.next_send {
            return None;
        }
        let (nonce, wait) = match self.pending {
            Some((nonce, wait)) => (nonce, (wait * 2).min(RETRY_MAX)),
            None => (rand::random(), RETRY_FIRST),
        };
        self.pending = Some((nonce, wait));
        self.next_send = now + wait;
        Some(nonce)
    }

    /// Sends the next probe now rather than at its time (before a reconnect, for example).
    pub fn hurry(&mut self, now: Instant) {
        self.next_send = self.next_send.min(now);
    }

    pub fn next_send(&self) -> Instant {
        self.next_send
    }

    /// A `QAD_REPLY` arrived from `from`: the new address when it answers our probe and
    /// differs from what we knew; `Err` when it does not answer our probe.
    pub fn on_reply(&mut self, nonce: u64, observed: SocketAddr, from: SocketAddr, now: Instant) -> Result<Option<SocketAddr>, StrayReply> {
        if from != self.relay || self.pending.map(|(n, _)| n) != Some(nonce) {
            return Err(StrayReply);
        }
        self.pending = None;
        self.next_send = now + REFRESH;
        let observed = ztna_proto::addr::canonical(observed);
        Ok((self.reflexive.replace(observed) != Some(observed)).then_some(observed))
    }
}

/// A `QAD_REPLY` that answers no probe of ours (wrong nonce, or not from the relay).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StrayReply;

/// The socket and its probing.
pub struct P2pSocket {
    pub socket: UdpSocket,
    pub local: SocketAddr,
    pub probe: ReflexiveProbe,
    /// The probe being sent.
    buf: Vec<u8>,
}

impl P2pSocket {
    /// Binds `addr` (large buffers, dual stack on `[::]`, as the main socket; `[::]` falls back
    /// to `0.0.0.0` on a host without IPv6).
    pub fn bind(addr: SocketAddr, relay: SocketAddr, now: Instant) -> Result<P2pSocket> {
        let v4_any = SocketAddr::new(std::net::Ipv4Addr::UNSPECIFIED.into(), addr.port());
        let socket = crate::control::bind_client_socket(addr)
            .or_else(|e| if addr.ip() == std::net::Ipv6Addr::UNSPECIFIED { crate::control::bind_client_socket(v4_any) } else { Err(e) })
            .with_context(|| format!("binding the peer-to-peer socket {addr}"))?;
        let local = socket.local_addr()?;
        tracing::info!(local = %local, "direct paths use a socket of their own");
        Ok(P2pSocket { socket, local, probe: ReflexiveProbe::new(relay, now), buf: Vec::with_capacity(frame::QAD_PROBE_MIN_LEN) })
    }

    /// Sends a probe if one is due (a full socket buffer loses it; the retransmission follows).
    pub fn drive(&mut self, now: Instant) {
        let Some(nonce) = self.probe.poll(now) else { return };
        if let Err(e) = self.socket.try_send_to(probe_frame(nonce, &mut self.buf), self.probe.relay) {
            tracing::debug!(error = %e, "cannot send a QAD probe from the peer-to-peer socket");
        }
    }

    /// Sends the next probe now, waiting for the socket if need be: a socket the runtime has
    /// not polled yet refuses a non-blocking send.
    pub async fn probe_now(&mut self) {
        self.probe.hurry(Instant::now());
        let Some(nonce) = self.probe.poll(Instant::now()) else { return };
        if let Err(e) = self.socket.send_to(probe_frame(nonce, &mut self.buf), self.probe.relay).await {
            tracing::debug!(error = %e, "cannot send a QAD probe from the peer-to-peer socket");
        }
    }
}

fn probe_frame(nonce: u64, buf: &mut Vec<u8>) -> &[u8] {
    buf.clear();
    frame::encode_qad_probe(nonce, buf);
    buf
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn probes_back_off_until_answered_then_refresh() {
        let t0 = Instant::now();
        let relay = addr("203.0.113.10:4433");
        let mut p = ReflexiveProbe::new(relay, t0);
        let nonce = p.poll(t0).expect("the first probe goes at once");
        assert_eq!(p.poll(t0), None);
        let mut t = t0;
        let mut waits = Vec::new();
        for _ in 0..6 {
            let at = p.next_send();
            waits.push(at - t);
            t = at;
            assert_eq!(p.poll(t), Some(nonce), "a retransmission keeps the nonce");
        }
        let ms: Vec<u128> = waits.iter().map(Duration::as_millis).collect();
        assert_eq!(ms, [250, 500, 1000, 2000, 4000, 5000]);
        let mapped = addr("198.51.100.77:4600");
        assert_eq!(p.on_reply(nonce, mapped, relay, t), Ok(Some(mapped)));
        assert_eq!(p.reflexive(), Some(mapped));
        assert_eq!(p.next_send(), t + REFRESH);
        // The refresh uses a fresh nonce; the same answer changes nothing.
        let again = p.poll(t + REFRESH).unwrap();
        assert_ne!(again, nonce);
        assert_eq!(p.on_reply(again, mapped, relay, t + REFRESH), Ok(None));
        // A rebinding NAT: the next answer says where we are now.
        let third = p.poll(t + REFRESH * 2).unwrap();
        let moved = addr("198.51.100.77:31000");
        assert_eq!(p.on_reply(third, moved, relay, t + REFRESH * 2), Ok(Some(moved)));
    }

    #[test]
    fn replies_that_answer_no_probe_are_refused() {
        let t0 = Instant::now();
        let relay = addr("203.0.113.10:4433");
        let mut p = ReflexiveProbe::new(relay, t0);
        let mapped = addr("198.51.100.77:4600");
        assert_eq!(p.on_reply(1, mapped, relay, t0), Err(StrayReply), "nothing in flight");
        let nonce = p.poll(t0).unwrap();
        assert_eq!(p.on_reply(nonce.wrapping_add(1), mapped, relay, t0), Err(StrayReply), "wrong nonce");
        assert_eq!(p.on_reply(nonce, mapped, addr("203.0.113.66:4433"), t0), Err(StrayReply), "not from the relay");
        assert_eq!(p.reflexive(), None);
        assert_eq!(p.on_reply(nonce, mapped, relay, t0), Ok(Some(mapped)));
        assert_eq!(p.on_reply(nonce, mapped, relay, t0), Err(StrayReply), "answered already");
    }

    #[test]
    fn hurry_brings_the_next_probe_forward_only() {
        let t0 = Instant::now();
        let mut p = ReflexiveProbe::new(addr("203.0.113.10:4433"), t0);
        p.poll(t0);
        p.hurry(t0 + Duration::from_millis(10));
        assert_eq!(p.next_send(), t0 + Duration::from_millis(10));
        p.hurry(t0 + Duration::from_secs(9));
        assert_eq!(p.next_send(), t0 + Duration::from_millis(10));
    }
}
