//! The engine's tunnels, and which of them need attention now. Every mutable access marks a
//! tunnel touched; the engine services and flushes only the touched ones and those whose own
//! deadline has come, and sleeps until the earliest deadline. (Walking every tunnel on every
//! wake-up made a connector's CPU grow with tunnels × events: 1,000 tunnels punching at once
//! cost it 18 CPU-seconds, and their liveness checks timed out.)

use std::collections::{HashMap, HashSet};
use std::time::Instant;

use ztna_proto::SessionId;

use crate::tunnel::Tunnel;

#[derive(Default)]
pub struct TunnelTable {
    tunnels: HashMap<SessionId, Tunnel>,
    /// Changed since the last flush: they may have packets to send and a new deadline.
    touched: HashSet<SessionId>,
    /// When each tunnel's timers next fire (as of its last flush).
    deadlines: HashMap<SessionId, Instant>,
}

impl TunnelTable {
    pub fn get(&self, session: &SessionId) -> Option<&Tunnel> {
        self.tunnels.get(session)
    }

    pub fn get_mut(&mut self, session: &SessionId) -> Option<&mut Tunnel> {
        let t = self.tunnels.get_mut(session)?;
        self.touched.insert(*session);
        Some(t)
    }

    pub fn contains_key(&self, session: &SessionId) -> bool {
        self.tunnels.contains_key(session)
    }

    pub fn insert(&mut self, session: SessionId, tunnel: Tunnel) {
        self.tunnels.insert(session, tunnel);
        self.touched.insert(session);
    }

    pub fn remove(&mut self, session: &SessionId) -> Option<Tunnel> {
        self.touched.remove(session);
        self.deadlines.remove(session);
        self.tunnels.remove(session)
    }

    /// Read-only: touches nothing.
    pub fn iter(&self) -> impl Iterator<Item = &Tunnel> {
        self.tunnels.values()
    }

    pub fn len(&self) -> usize {
        self.tunnels.len()
    }

    /// Every session with a tunnel.
    pub fn sessions(&self) -> Vec<SessionId> {
        self.tunnels.keys().copied().collect()
    }

    /// The tunnels to service now: touched since the last flush, or due.
    pub fn needing_service(&self, now: Instant) -> Vec<SessionId> {
        let due = self.deadlines.iter().filter(|(_, at)| **at <= now).map(|(s, _)| *s);
        let mut v: Vec<SessionId> = self.touched.iter().copied().chain(due).collect();
        v.sort_unstable();
        v.dedup();
        v
    }

    /// Hands out the touched tunnels for sending; [`TunnelTable::flushed`] records each one's
    /// new deadline afterwards.
    pub fn take_touched(&mut self) -> Vec<SessionId> {
        self.touched.drain().collect()
    }

    /// A tunnel being flushed, without marking it touched again.
    pub fn for_flush(&mut self, session: &SessionId) -> Option<&mut Tunnel> {
        self.tunnels.get_mut(session)
    }

    /// After a flush: when the tunnel's timers fire next.
    pub fn flushed(&mut self, session: SessionId, now: Instant) {
        match self.tunnels.get(&session).and_then(|t| t.timeout(now)) {
            Some(d) => self.deadlines.insert(session, now + d),
            None => self.deadlines.remove(&session),
        };
    }

    /// The earliest deadline of any tunnel.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.deadlines.values().min().copied()
    }
}
