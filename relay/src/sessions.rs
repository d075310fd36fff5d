//! One worker's shard of relay sessions and the DATA-frame forwarding decision.
//! A session lives on the worker named by its id (the agent's worker), so forwarding is one
//! lookup in a table nobody else touches.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use ztna_proto::SessionId;

use crate::ebpf::xdp::SessionMirror;
use crate::metrics::DropReason;

/// Session ids are random (but for the worker byte), so their bytes are already a good hash;
/// a keyed hasher would only cost cycles on the hot path.
#[derive(Default)]
pub struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ b as u64;
        }
    }
}

pub type IdMap<V> = HashMap<SessionId, V, BuildHasherDefault<IdHasher>>;

/// Where a session's connector lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnRef {
    pub worker: u8,
    pub conn: crate::control::ConnKey,
}

#[derive(Debug, Clone)]
pub struct Session {
    pub service: String,
    pub agent: ConnRef,
    pub agent_addr: SocketAddr,
    pub connector: ConnRef,
    /// The connector's identity, so a policy reload can re-check this side too.
    pub connector_identity: std::sync::Arc<str>,
    pub connector_addr: SocketAddr,
    pub last_active: Instant,
    pub frames: u64,
}

/// Outcome of one DATA frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Forward {
    To(SocketAddr),
    Drop(DropReason),
}

/// The sessions a worker owns. With XDP on, every change is mirrored into the
/// kernel's session map here, so no caller can forget to.
#[derive(Default)]
pub struct SessionTable {
    sessions: IdMap<Session>,
    mirror: Option<SessionMirror>,
}

impl SessionTable {
    pub fn new(mirror: Option<SessionMirror>) -> Self {
        SessionTable { sessions: IdMap::default(), mirror }
    }

    pub fn insert(&mut self, id: SessionId, s: Session) {
        if let Some(m) = &self.mirror {
            m.upsert(&id, s.agent_addr, s.connector_addr);
        }
        self.sessions.insert(id, s);
    }

    pub fn remove(&mut self, id: &SessionId) -> Option<Session> {
        let s = self.sessions.remove(id)?;
        if let Some(m) = &self.mirror {
            m.remove(id);
        }
        Some(s)
    }

    /// The agent's validated address moved (QUIC migration or NAT rebinding).
    pub fn rebind_agent(&mut self, id: &SessionId, addr: SocketAddr) {
        self.rebind(id, |s| s.agent_addr = addr);
    }

    /// The connector's validated address moved.
    pub fn rebind_connector(&mut self, id: &SessionId, addr: SocketAddr) {
        self.rebind(id, |s| s.connector_addr = addr);
    }

    fn rebind(&mut self, id: &SessionId, change: impl FnOnce(&mut Session)) {
        let Some(s) = self.sessions.get_mut(id) else { return };
        change(s);
        if let Some(m) = &self.mirror {
            m.upsert(id, s.agent_addr, s.connector_addr);
        }
    }

    pub fn get(&self, id: &SessionId) -> Option<&Session> {
        self.sessions.get(id)
    }

    pub fn len(&self) -> usize {
        self.sessions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sessions.is_empty()
    }

    pub fn ids(&self) -> impl Iterator<Item = SessionId> + '_ {
        self.sessions.keys().copied()
    }

    pub fn contains(&self, id: &SessionId) -> bool {
        self.sessions.contains_key(id)
    }

    /// Decides where a DATA frame of `id` from `from` goes: from one bound side to the other.
    pub fn forward(&mut self, id: &SessionId, from: SocketAddr, now: Instant) -> Forward {
        let Some(s) = self.sessions.get_mut(id) else { return Forward::Drop(DropReason::unknown_session) };
        let to = if from == s.agent_addr {
            s.connector_addr
        } else if from == s.connector_addr {
            s.agent_addr
        } else {
            return Forward::Drop(DropReason::unbound_source);
        };
        s.last_active = now;
        s.frames += 1;
        Forward::To(to)
    }

    /// Removes and returns sessions idle for longer than `idle`. Frames XDP forwarded never
    /// reached this table, so a session idle here asks the kernel mirror when it last moved.
    pub fn expire(&mut self, now: Instant, idle: Duration, out: &mut Vec<(SessionId, Session)>) {
        let mut expired = Vec::new();
        for (id, s) in self.sessions.iter_mut() {
            if now.saturating_duration_since(s.last_active) <= idle {
                continue;
            }
            if let Some(seen) = self.mirror.as_ref().and_then(|m| m.last_seen(id, now))
                && seen > s.last_active
            {
                s.last_active = seen;
                if now.saturating_duration_since(seen) <= idle {
                    continue;
                }
            }
            expired.push(*id);
        }
        for id in expired {
            if let Some(s) = self.remove(&id) {
                out.push((id, s));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session(agent: &str, connector: &str, now: Instant) -> Session {
        let r = ConnRef { worker: 0, conn: [0; 8] };
        Session {
            service: "web".into(),
            agent: r,
            agent_addr: agent.parse().unwrap(),
            connector: r,
            connector_identity: "ztna://connector/web-1".into(),
            connector_addr: connector.parse().unwrap(),
            last_active: now,
            frames: 0,
        }
    }

    #[test]
    fn forwards_between_bound_sides_only() {
        let now = Instant::now();
        let mut t = SessionTable::default();
        let id = SessionId::new(0, [1; 7]);
        t.insert(id, session("192.0.2.1:1000", "[2001:db8::2]:2000", now));
        assert_eq!(t.forward(&id, "192.0.2.1:1000".parse().unwrap(), now), Forward::To("[2001:db8::2]:2000".parse().unwrap()));
        assert_eq!(t.forward(&id, "[2001:db8::2]:2000".parse().unwrap(), now), Forward::To("192.0.2.1:1000".parse().unwrap()));
        assert_eq!(t.forward(&id, "192.0.2.1:1001".parse().unwrap(), now), Forward::Drop(DropReason::unbound_source));
        assert_eq!(t.forward(&SessionId::new(0, [2; 7]), "192.0.2.1:1000".parse().unwrap(), now), Forward::Drop(DropReason::unknown_session));
        assert_eq!(t.get(&id).unwrap().frames, 2);
    }

    #[test]
    fn idle_sessions_expire() {
        let now = Instant::now();
        let mut t = SessionTable::default();
        let (a, b) = (SessionId::new(0, [1; 7]), SessionId::new(0, [2; 7]));
        t.insert(a, session("192.0.2.1:1", "192.0.2.2:2", now));
        t.insert(b, session("192.0.2.1:1", "192.0.2.2:2", now));
        t.forward(&b, "192.0.2.1:1".parse().unwrap(), now + Duration::from_secs(50));
        let mut out = Vec::new();
        t.expire(now + Duration::from_secs(61), Duration::from_secs(60), &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].0, a);
        assert!(t.contains(&b));
    }
}
