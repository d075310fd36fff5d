//! Noticing quickly that the other end of a QUIC connection died, without I/O: the relay
//! watches connectors that have sessions, a client watches the relay while it has sent
//! something the relay has not answered (PROTOCOL.md §7.14). QUIC's idle timeout (30 s on the
//! control connection) stays the backstop; this is what makes the answer come in seconds.
//!
//! The owner says when a packet arrived (and, if it watches only while it waits for an
//! answer, when it sent one) and asks, while it watches, what to do now: nothing, send an
//! ack-eliciting packet (a PING, which the peer acknowledges at once), or give up. Silence
//! counts from the last packet received, or from the first packet sent after it when sends
//! are reported.

use std::time::{Duration, Instant};

/// The schedule: ask after `ping_after` of silence and again at that interval; judge the peer
/// dead after `dead_after` of silence once `pings` asks went unanswered, the last of them
/// `ping_after` ago (so an owner that itself stalled for seconds asks before it judges).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LivenessConfig {
    pub ping_after: Duration,
    pub dead_after: Duration,
    pub pings: u32,
}

/// The control connection's schedule on both sides: asked at 0.5, 1 and 1.5 s of silence,
/// dead at 2 s, which leaves a second of the 3 s that users may wait to hear of a failure.
pub const CONTROL_LIVENESS: LivenessConfig =
    LivenessConfig { ping_after: Duration::from_millis(500), dead_after: Duration::from_millis(2000), pings: 3 };

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Quiet,
    /// Send an ack-eliciting packet now.
    Ping,
    /// No answer: the peer is gone. Carries the silence.
    Dead(Duration),
}

#[derive(Debug, Clone)]
pub struct Liveness {
    cfg: LivenessConfig,
    /// Where the silence starts.
    since: Instant,
    /// A packet was sent since the last one received.
    awaiting: bool,
    last_ping: Option<Instant>,
    unanswered: u32,
}

impl Liveness {
    pub fn new(cfg: LivenessConfig, now: Instant) -> Self {
        Liveness { cfg, since: now, awaiting: false, last_ping: None, unanswered: 0 }
    }

    /// A packet from the peer was accepted.
    pub fn on_rx(&mut self, now: Instant) {
        self.since = now;
        self.awaiting = false;
        self.unanswered = 0;
    }

    /// A packet went to the peer: if it is the first since the last answer, silence counts
    /// from now.
    pub fn on_tx(&mut self, now: Instant) {
        if !self.awaiting {
            self.awaiting = true;
            self.since = now;
        }
    }

    /// Something was sent that the peer has not answered yet.
    pub fn awaiting(&self) -> bool {
        self.awaiting
    }

    /// When [`poll`](Self::poll) next has something to do.
    pub fn deadline(&self) -> Instant {
        match self.last_ping {
            Some(p) if self.unanswered > 0 => p + self.cfg.ping_after,
            _ => self.since + self.cfg.ping_after,
        }
    }

    pub fn poll(&mut self, now: Instant) -> Verdict {
        let silent = now.saturating_duration_since(self.since);
        let ask_due = self.unanswered == 0 || self.last_ping.is_none_or(|p| now >= p + self.cfg.ping_after);
        if !ask_due || silent < self.cfg.ping_after {
            return Verdict::Quiet;
        }
        if silent >= self.cfg.dead_after && self.unanswered >= self.cfg.pings {
            return Verdict::Dead(silent);
        }
        self.last_ping = Some(now);
        self.unanswered += 1;
        Verdict::Ping
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    /// Polls at every deadline from `from` until a verdict other than a ping, or `limit`.
    fn run(l: &mut Liveness, from: Instant, limit: Duration) -> (Vec<Duration>, Option<Duration>) {
        let mut pings = Vec::new();
        let mut now = from;
        while now < from + limit {
            now = l.deadline().max(now);
            match l.poll(now) {
                Verdict::Ping => pings.push(now - from),
                Verdict::Dead(silent) => return (pings, Some(silent)),
                Verdict::Quiet => now += MS,
            }
        }
        (pings, None)
    }

    #[test]
    fn a_silent_peer_is_asked_three_times_then_judged_dead_at_the_bound() {
        let t0 = Instant::now();
        let mut l = Liveness::new(CONTROL_LIVENESS, t0);
        let (pings, dead) = run(&mut l, t0, Duration::from_secs(10));
        assert_eq!(pings, [500 * MS, 1000 * MS, 1500 * MS]);
        assert_eq!(dead, Some(2000 * MS));
    }

    #[test]
    fn an_answer_starts_over() {
        let t0 = Instant::now();
        let mut l = Liveness::new(CONTROL_LIVENESS, t0);
        assert_eq!(l.poll(t0 + 600 * MS), Verdict::Ping);
        l.on_rx(t0 + 620 * MS);
        assert_eq!(l.deadline(), t0 + 1120 * MS);
        assert_eq!(l.poll(t0 + 1000 * MS), Verdict::Quiet);
        let (_, dead) = run(&mut l, t0 + 620 * MS, Duration::from_secs(10));
        assert_eq!(dead, Some(2000 * MS), "the bound counts from the last answer");
    }

    #[test]
    fn with_sends_reported_silence_counts_from_the_first_unanswered_send() {
        let t0 = Instant::now();
        let mut l = Liveness::new(CONTROL_LIVENESS, t0);
        assert!(!l.awaiting());
        // Idle for a minute, then a send: no ping at once, the peer has its interval to answer.
        let sent = t0 + Duration::from_secs(60);
        l.on_tx(sent);
        l.on_tx(sent + 100 * MS);
        assert!(l.awaiting());
        assert_eq!(l.poll(sent + 400 * MS), Verdict::Quiet);
        let (pings, dead) = run(&mut l, sent, Duration::from_secs(10));
        assert_eq!(pings.len(), 3);
        assert_eq!(dead, Some(2000 * MS));
        l.on_rx(sent + Duration::from_secs(3));
        assert!(!l.awaiting());
    }

    #[test]
    fn an_owner_that_stalled_asks_before_it_judges() {
        let t0 = Instant::now();
        let mut l = Liveness::new(CONTROL_LIVENESS, t0);
        // Nothing polled for a minute (the process was stopped): silence is long, but nobody asked.
        let later = t0 + Duration::from_secs(60);
        assert_eq!(l.poll(later), Verdict::Ping);
        assert_eq!(l.poll(later + 100 * MS), Verdict::Quiet, "one ask per interval");
        l.on_rx(later + 150 * MS);
        assert_eq!(l.poll(later + 700 * MS), Verdict::Ping, "silent again after the answer");
    }
}
