//! Direct paths of one tunnel, without I/O (PROTOCOL.md §14): the peer's candidates, the
//! punching and probing schedule, nomination, liveness and fallback. It is fed candidates,
//! punches, what quiche said about paths and time, and answers with [`Action`]s that the
//! tunnel applies to its socket and its quiche connection.
//!
//! **Checks are QUIC's own path validation.** A direct path is used only once quiche
//! validated it (PATH_CHALLENGE/PATH_RESPONSE inside the end-to-end connection, so neither
//! the relay nor anyone on the path can forge it) or, for a path quiche validated before,
//! once an authenticated packet arrives on it again. PUNCH frames only open NAT mappings
//! and teach a peer-reflexive address: they carry the session's token and are never
//! answered, so they cannot be used to amplify.
//!
//! **Roles.** The agent (QUIC client) is controlling: it probes pairs and nominates by
//! migrating the connection. The connector (server) punches, answers probes (quiche does)
//! and follows the agent's migration.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use ztna_proto::candidate::{Candidate, CandidateKind, MAX_CANDIDATES, PUNCH_TOKEN_LEN};

/// When the punch (and probe) rounds of one attempt go out, from its start: fast at first
/// (a path may open after one round trip), then backing off.
pub const ROUNDS_MS: [u64; 9] = [0, 25, 50, 100, 200, 400, 800, 1600, 3200];
/// An attempt that validated nothing by then has failed.
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(5);
/// First wait before a new attempt after a failure or a fallback; doubles up to the cap.
pub const RETRY_FIRST: Duration = Duration::from_secs(1);
pub const RETRY_MAX: Duration = Duration::from_secs(60);
/// Silence on the direct path, while the tunnel sends, before a liveness ping.
pub const PING_AFTER: Duration = Duration::from_millis(250);
/// Silence after which a direct path that was asked (pinged) twice counts as dead.
pub const DEAD_AFTER: Duration = Duration::from_millis(1000);
/// The tunnel counts as sending if it sent within this window (an idle tunnel is not pinged).
pub const ACTIVE_WINDOW: Duration = Duration::from_secs(2);
/// Peer-reflexive candidates learned per tunnel, at most.
pub const MAX_PEER_REFLEXIVE: usize = 4;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The agent: probes and nominates.
    Controlling,
    /// The connector: punches and follows.
    Controlled,
}

/// What the tunnel should do now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Send a PUNCH frame to this address.
    Punch(SocketAddr),
    /// Ask quiche to validate the path to this address.
    Probe(SocketAddr),
    /// Make quiche send an ack-eliciting packet on the active direct path.
    Ping(SocketAddr),
    /// Move the connection to this validated direct path.
    Migrate(SocketAddr),
    /// The direct path went silent: move the connection back to the relay path.
    FallBack(SocketAddr),
    /// An attempt ended without a direct path (for the metrics).
    AttemptFailed,
}

/// What a PUNCH frame was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Punch {
    /// From a known candidate.
    Known,
    /// From an address no candidate named: learned as peer-reflexive.
    Learned,
    /// The token is wrong, or too many addresses were learned already: ignored.
    Rejected,
}

#[derive(Debug, Clone)]
struct Remote {
    candidate: Candidate,
    /// Last authenticated packet from it.
    last_rx: Option<Instant>,
    /// A probe went to it in the current attempt.
    probed: bool,
}

#[derive(Debug, Clone, Copy)]
struct Attempt {
    started: Instant,
    round: usize,
    /// A probe round went out (the first one goes as soon as probing is possible, not at
    /// the next punch round: the tunnel's handshake usually ends between two rounds).
    probed: bool,
}

#[derive(Debug, Clone)]
pub struct DirectPaths {
    role: Role,
    token: Option<[u8; PUNCH_TOKEN_LEN]>,
    remotes: Vec<Remote>,
    attempt: Option<Attempt>,
    next_attempt: Option<Instant>,
    backoff: Duration,
    active: Option<SocketAddr>,
    last_tx: Option<Instant>,
    last_ping: Option<Instant>,
    unanswered_pings: u32,
}

impl DirectPaths {
    pub fn new(role: Role) -> DirectPaths {
        DirectPaths {
            role,
            token: None,
            remotes: Vec::new(),
            attempt: None,
            next_attempt: None,
            backoff: RETRY_FIRST,
            active: None,
            last_tx: None,
            last_ping: None,
            unanswered_pings: 0,
        }
    }

    /// The direct path in use, if any.
    pub fn active(&self) -> Option<SocketAddr> {
        self.active
    }

    pub fn token(&self) -> Option<&[u8; PUNCH_TOKEN_LEN]> {
        self.token.as_ref()
    }

    pub fn candidates(&self) -> impl Iterator<Item = &Candidate> {
        self.remotes.iter().map(|r| &r.candidate)
    }

    /// The peer's candidates, with the session's punch token (relayed `PeerCandidates`).
    /// New candidates start an attempt at once unless a direct path is in use.
    pub fn add_candidates(&mut self, token: [u8; PUNCH_TOKEN_LEN], candidates: &[Candidate], now: Instant) {
        self.token.get_or_insert(token);
        let mut added = false;
        for c in candidates {
            if self.remotes.len() >= MAX_CANDIDATES {
                break;
            }
            if crate::path::is_label(c.addr) || self.remote(c.addr).is_some() {
                continue;
            }
            self.remotes.push(Remote { candidate: *c, last_rx: None, probed: false });
            added = true;
        }
        // Highest pair priority first; with one local candidate per family that is the
        // order of the remote priorities.
        self.remotes.sort_by_key(|r| std::cmp::Reverse(r.candidate.priority));
        if added && self.active.is_none() {
            self.start_attempt(now);
        }
    }

    /// A PUNCH frame for this session arrived from `from`.
    pub fn on_punch(&mut self, from: SocketAddr, token: &[u8; PUNCH_TOKEN_LEN], now: Instant) -> Punch {
        if self.token.as_ref() != Some(token) {
            return Punch::Rejected;
        }
        if self.remote(from).is_some() {
            return Punch::Known;
        }
        let learned = self.remotes.iter().filter(|r| r.candidate.kind == CandidateKind::PeerReflexive).count();
        if learned >= MAX_PEER_REFLEXIVE || self.remotes.len() >= MAX_CANDIDATES {
            return Punch::Rejected;
        }
        self.remotes.insert(0, Remote { candidate: Candidate::new(CandidateKind::PeerReflexive, from), last_rx: None, probed: false });
        if self.active.is_none() && self.attempt.is_none() {
            self.start_attempt(now);
        }
        Punch::Learned
    }

    /// quiche accepted a packet that came from `from` directly (so it is authenticated).
    /// `validated`: quiche has validated that path. A path that worked before and answers
    /// a probe of the current attempt is nominated again.
    pub fn on_authenticated_rx(&mut self, from: SocketAddr, validated: bool, now: Instant) -> Option<Action> {
        let role = self.role;
        let active = self.active;
        let attempt = self.attempt.is_some();
        let r = self.remote_mut(from)?;
        r.last_rx = Some(now);
        if active == Some(from) {
            self.unanswered_pings = 0;
            return None;
        }
        (role == Role::Controlling && active.is_none() && attempt && validated && r.probed).then_some(Action::Migrate(from))
    }

    /// quiche validated the path to `addr` (the agent's probe was answered).
    pub fn on_validated(&mut self, addr: SocketAddr, now: Instant) -> Option<Action> {
        let r = self.remote_mut(addr)?;
        r.last_rx = Some(now);
        (self.role == Role::Controlling && self.active.is_none()).then_some(Action::Migrate(addr))
    }

    /// The connection now uses the direct path to `addr` (the agent migrated, or the
    /// connector saw the agent migrate).
    pub fn now_direct(&mut self, addr: SocketAddr, now: Instant) {
        self.active = Some(addr);
        self.attempt = None;
        self.next_attempt = None;
        self.backoff = RETRY_FIRST;
        self.unanswered_pings = 0;
        self.last_ping = None;
        if let Some(r) = self.remote_mut(addr) {
            r.last_rx.get_or_insert(now);
        }
    }

    /// The connection is back on the relay path: punch again later.
    pub fn now_relayed(&mut self, now: Instant) {
        self.active = None;
        self.attempt = None;
        self.schedule_retry(now);
    }

    /// A packet left on the direct path.
    pub fn on_direct_tx(&mut self, now: Instant) {
        self.last_tx = Some(now);
    }

    /// The next actions due; call again after the returned timeout.
    pub fn poll(&mut self, now: Instant, can_probe: bool, out: &mut Vec<Action>) {
        if let Some(active) = self.active {
            if self.role == Role::Controlling {
                self.check_liveness(active, now, out);
            }
            return;
        }
        if self.attempt.is_none() && self.next_attempt.is_some_and(|t| now >= t) && !self.remotes.is_empty() {
            self.start_attempt(now);
        }
        let Some(mut a) = self.attempt else { return };
        let probing = self.role == Role::Controlling && can_probe;
        while a.round < ROUNDS_MS.len() && now >= a.started + Duration::from_millis(ROUNDS_MS[a.round]) {
            a.round += 1;
            for r in &mut self.remotes {
                out.push(Action::Punch(r.candidate.addr));
                if probing {
                    out.push(Action::Probe(r.candidate.addr));
                    r.probed = true;
                }
            }
            a.probed |= probing;
        }
        if probing && !a.probed && a.round < ROUNDS_MS.len() {
            a.probed = true;
            for r in &mut self.remotes {
                out.push(Action::Probe(r.candidate.addr));
                r.probed = true;
            }
        }
        self.attempt = Some(a);
        if now >= a.started + ATTEMPT_TIMEOUT {
            out.push(Action::AttemptFailed);
            self.attempt = None;
            self.schedule_retry(now);
        }
    }

    /// How long until [`poll`](Self::poll) has something to do.
    pub fn timeout(&self, now: Instant) -> Option<Duration> {
        let at = if self.active.is_some() {
            (self.role == Role::Controlling).then(|| now + PING_AFTER.min(DEAD_AFTER) / 2)?
        } else if let Some(a) = self.attempt {
            match ROUNDS_MS.get(a.round) {
                Some(ms) => a.started + Duration::from_millis(*ms),
                None => a.started + ATTEMPT_TIMEOUT,
            }
        } else {
            self.next_attempt?
        };
        Some(at.saturating_duration_since(now))
    }

    fn check_liveness(&mut self, active: SocketAddr, now: Instant, out: &mut Vec<Action>) {
        let last_rx = self.remote(active).and_then(|r| r.last_rx).unwrap_or(now);
        let silent = now.saturating_duration_since(last_rx);
        if silent >= DEAD_AFTER && self.unanswered_pings >= 2 {
            out.push(Action::FallBack(active));
            return;
        }
        let sending = self.last_tx.is_some_and(|t| now.saturating_duration_since(t) < ACTIVE_WINDOW);
        let ping_due = self.last_ping.is_none_or(|t| now.saturating_duration_since(t) >= PING_AFTER);
        if silent >= PING_AFTER && sending && ping_due {
            self.last_ping = Some(now);
            self.unanswered_pings += 1;
            out.push(Action::Ping(active));
        }
    }

    fn start_attempt(&mut self, now: Instant) {
        self.attempt = Some(Attempt { started: now, round: 0, probed: false });
        self.next_attempt = None;
        for r in &mut self.remotes {
            r.probed = false;
        }
    }

    fn schedule_retry(&mut self, now: Instant) {
        self.next_attempt = Some(now + self.backoff);
        self.backoff = (self.backoff * 2).min(RETRY_MAX);
    }

    fn remote(&self, addr: SocketAddr) -> Option<&Remote> {
        self.remotes.iter().find(|r| r.candidate.addr == addr)
    }

    fn remote_mut(&mut self, addr: SocketAddr) -> Option<&mut Remote> {
        self.remotes.iter_mut().find(|r| r.candidate.addr == addr)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOKEN: [u8; 16] = [9; 16];

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn srflx(s: &str) -> Candidate {
        Candidate::new(CandidateKind::ServerReflexive, addr(s))
    }

    fn poll(d: &mut DirectPaths, now: Instant, can_probe: bool) -> Vec<Action> {
        let mut out = Vec::new();
        d.poll(now, can_probe, &mut out);
        out
    }

    #[test]
    fn candidates_start_punching_at_once_and_rounds_back_off() {
        let t0 = Instant::now();
        let mut d = DirectPaths::new(Role::Controlled);
        d.add_candidates(TOKEN, &[srflx("203.0.113.3:5000")], t0);
        assert_eq!(poll(&mut d, t0, true), vec![Action::Punch(addr("203.0.113.3:5000"))], "the controlled side never probes");
        assert_eq!(d.timeout(t0), Some(Duration::from_millis(25)));
        let mut punches = 1;
        let mut t = t0;
        while t < t0 + ATTEMPT_TIMEOUT {
            t += Duration::from_millis(5);
            punches += poll(&mut d, t, true).iter().filter(|a| matches!(a, Action::Punch(_))).count();
        }
        assert_eq!(punches, ROUNDS_MS.len(), "one punch per round, bounded");
        assert_eq!(poll(&mut d, t0 + ATTEMPT_TIMEOUT, true), vec![]);
        assert!(d.timeout(t).is_some(), "a retry is scheduled");
    }

    #[test]
    fn the_agent_probes_once_it_can_and_migrates_on_validation() {
        let t0 = Instant::now();
        let mut d = DirectPaths::new(Role::Controlling);
        let x = addr("203.0.113.3:5000");
        d.add_candidates(TOKEN, &[srflx("203.0.113.3:5000")], t0);
        assert_eq!(poll(&mut d, t0, false), vec![Action::Punch(x)], "no probe before the tunnel is up");
        let t1 = t0 + Duration::from_millis(30);
        assert_eq!(poll(&mut d, t1, true), vec![Action::Punch(x), Action::Probe(x)]);
        // The tunnel came up between rounds: the first probe goes at once, not at the next round.
        let mut e = DirectPaths::new(Role::Controlling);
        e.add_candidates(TOKEN, &[srflx("203.0.113.3:5000")], t0);
        poll(&mut e, t0, false);
        assert_eq!(poll(&mut e, t0 + Duration::from_millis(10), true), vec![Action::Probe(x)]);
        assert_eq!(poll(&mut e, t0 + Duration::from_millis(12), true), vec![], "once");
        assert_eq!(d.on_validated(x, t1), Some(Action::Migrate(x)));
        d.now_direct(x, t1);
        assert_eq!(d.active(), Some(x));
        assert_eq!(poll(&mut d, t1 + Duration::from_millis(100), true), vec![], "no punching while direct");
    }

    #[test]
    fn punches_need_the_token_and_learn_a_bounded_number_of_addresses() {
        let t0 = Instant::now();
        let mut d = DirectPaths::new(Role::Controlling);
        d.add_candidates(TOKEN, &[srflx("203.0.113.3:5000")], t0);
        assert_eq!(d.on_punch(addr("203.0.113.66:1"), &[0; 16], t0), Punch::Rejected, "wrong token");
        assert_eq!(d.on_punch(addr("203.0.113.3:5000"), &TOKEN, t0), Punch::Known);
        for port in 1..=MAX_PEER_REFLEXIVE as u16 {
            assert_eq!(d.on_punch(SocketAddr::new(addr("203.0.113.3:0").ip(), 6000 + port), &TOKEN, t0), Punch::Learned);
        }
        assert_eq!(d.on_punch(addr("203.0.113.3:7000"), &TOKEN, t0), Punch::Rejected, "bounded");
        assert_eq!(d.candidates().count(), 1 + MAX_PEER_REFLEXIVE);
        // A learned address is probed like any other.
        let acts = poll(&mut d, t0, true);
        assert!(acts.contains(&Action::Probe(addr("203.0.113.3:6001"))), "{acts:?}");
    }

    #[test]
    fn silence_while_sending_falls_back_and_punching_resumes_later() {
        let t0 = Instant::now();
        let mut d = DirectPaths::new(Role::Controlling);
        let x = addr("203.0.113.3:5000");
        d.add_candidates(TOKEN, &[srflx("203.0.113.3:5000")], t0);
        poll(&mut d, t0, true);
        d.on_validated(x, t0);
        d.now_direct(x, t0);
        // Traffic flows both ways: no pings.
        let mut t = t0;
        for _ in 0..20 {
            t += Duration::from_millis(100);
            d.on_direct_tx(t);
            assert_eq!(d.on_authenticated_rx(x, true, t), None);
            assert_eq!(poll(&mut d, t, true), vec![]);
        }
        // The path goes silent while we keep sending: pings, then fallback within 1 s.
        let dead_from = t;
        let mut fell_back = None;
        while fell_back.is_none() {
            t += Duration::from_millis(50);
            d.on_direct_tx(t);
            for a in poll(&mut d, t, true) {
                match a {
                    Action::Ping(p) => assert_eq!(p, x),
                    Action::FallBack(p) => fell_back = Some((p, t)),
                    other => panic!("{other:?}"),
                }
            }
        }
        let (p, at) = fell_back.unwrap();
        assert_eq!(p, x);
        assert!(at - dead_from <= DEAD_AFTER + Duration::from_millis(100), "{:?}", at - dead_from);
        d.now_relayed(at);
        assert_eq!(poll(&mut d, at, true), vec![], "not at once");
        let retry = at + RETRY_FIRST;
        assert_eq!(poll(&mut d, retry, true), vec![Action::Punch(x), Action::Probe(x)]);
        // The path quiche validated before answers again: nominated again.
        assert_eq!(d.on_authenticated_rx(x, true, retry + Duration::from_millis(40)), Some(Action::Migrate(x)));
    }

    #[test]
    fn an_idle_direct_tunnel_is_not_pinged_and_a_quiet_peer_alone_is_not_dead() {
        let t0 = Instant::now();
        let mut d = DirectPaths::new(Role::Controlling);
        let x = addr("203.0.113.3:5000");
        d.add_candidates(TOKEN, &[srflx("203.0.113.3:5000")], t0);
        d.now_direct(x, t0);
        for s in 1..30 {
            assert_eq!(poll(&mut d, t0 + Duration::from_secs(s), true), vec![], "idle: nothing sent, nothing asked");
        }
        // The controlled side never judges the path: it follows the agent.
        let mut c = DirectPaths::new(Role::Controlled);
        c.add_candidates(TOKEN, &[srflx("192.0.2.9:4000")], t0);
        c.now_direct(addr("192.0.2.9:4000"), t0);
        c.on_direct_tx(t0 + Duration::from_secs(5));
        assert_eq!(poll(&mut c, t0 + Duration::from_secs(5), true), vec![]);
        assert_eq!(c.timeout(t0), None);
    }
}
