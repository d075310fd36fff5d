//! One worker's shard of relay sessions and the DATA-frame forwarding decision.
//! A session lives on the worker named by its id (the agent's worker), so forwarding is one
//! lookup in a table nobody else touches.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use ztna_proto::SessionId;

use crate::metrics::DropReason;

/// The kernel's copy of the session table (the XDP fast path). Every change to the table
/// goes through one, so no caller can forget to mirror it.
pub trait Mirror {
    fn mirror_upsert(&mut self, id: &SessionId, agent: SocketAddr, connector: SocketAddr);
    fn mirror_remove(&mut self, id: &SessionId);
    /// When the kernel last forwarded a frame of `id` (frames XDP forwards never reach
    /// user space); `None` without XDP.
    fn mirror_last_seen(&self, id: &SessionId, now: Instant) -> Option<Instant>;
}

/// No kernel copy (XDP off).
impl Mirror for () {
    fn mirror_upsert(&mut self, _: &SessionId, _: SocketAddr, _: SocketAddr) {}
    fn mirror_remove(&mut self, _: &SessionId) {}
    fn mirror_last_seen(&self, _: &SessionId, _: Instant) -> Option<Instant> {
        None
    }
}

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
    pub conn: crate::core::conn::ConnKey,
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
    /// Both sides send it in PUNCH frames to each other (PROTOCOL.md §14.3).
    pub punch_token: [u8; ztna_proto::candidate::PUNCH_TOKEN_LEN],
    /// The last `PathStatus` of the agent and of the connector: the tunnel is direct.
    pub direct: [bool; 2],
}

impl Session {
    /// Either side reports a direct path.
    pub fn is_direct(&self) -> bool {
        self.direct.iter().any(|d| *d)
    }
}

/// Outcome of one DATA frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Forward {
    To(SocketAddr),
    Drop(DropReason),
}

/// The sessions a worker owns.
#[derive(Default)]
pub struct SessionTable {
    sessions: IdMap<Session>,
}

impl SessionTable {
    pub fn insert(&mut self, id: SessionId, s: Session, mirror: &mut impl Mirror) {
        mirror.mirror_upsert(&id, s.agent_addr, s.connector_addr);
        self.sessions.insert(id, s);
    }

    pub fn remove(&mut self, id: &SessionId, mirror: &mut impl Mirror) -> Option<Session> {
        let s = self.sessions.remove(id)?;
        mirror.mirror_remove(id);
        Some(s)
    }

    /// The agent's validated address moved (QUIC migration or NAT rebinding).
    pub fn rebind_agent(&mut self, id: &SessionId, addr: SocketAddr, mirror: &mut impl Mirror) {
        self.rebind(id, |s| s.agent_addr = addr, mirror);
    }

    /// The connector's validated address moved.
    pub fn rebind_connector(&mut self, id: &SessionId, addr: SocketAddr, mirror: &mut impl Mirror) {
        self.rebind(id, |s| s.connector_addr = addr, mirror);
    }

    fn rebind(&mut self, id: &SessionId, change: impl FnOnce(&mut Session), mirror: &mut impl Mirror) {
        let Some(s) = self.sessions.get_mut(id) else { return };
        change(s);
        mirror.mirror_upsert(id, s.agent_addr, s.connector_addr);
    }

    pub fn get(&self, id: &SessionId) -> Option<&Session> {
        self.sessions.get(id)
    }

    pub fn get_mut(&mut self, id: &SessionId) -> Option<&mut Session> {
        self.sessions.get_mut(id)
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

    /// Sessions idle for longer than `idle` (left in the table: ending one is the caller's).
    /// Frames XDP forwarded never reached this table, so a session idle here asks the
    /// kernel mirror when it last moved. A session whose tunnel went direct carries nothing
    /// here by design and stays as the warm fallback path while both sides are connected.
    pub fn idle(&mut self, now: Instant, idle: Duration, mirror: &impl Mirror) -> Vec<SessionId> {
        let mut expired = Vec::new();
        for (id, s) in self.sessions.iter_mut() {
            if s.is_direct() || now.saturating_duration_since(s.last_active) <= idle {
                continue;
            }
            if let Some(seen) = mirror.mirror_last_seen(id, now)
                && seen > s.last_active
            {
                s.last_active = seen;
                if now.saturating_duration_since(seen) <= idle {
                    continue;
                }
            }
            expired.push(*id);
        }
        expired
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
            punch_token: [0; 16],
            direct: [false; 2],
        }
    }

    #[test]
    fn forwards_between_bound_sides_only() {
        let now = Instant::now();
        let mut t = SessionTable::default();
        let id = SessionId::new(0, [1; 7]);
        t.insert(id, session("192.0.2.1:1000", "[2001:db8::2]:2000", now), &mut ());
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
        t.insert(a, session("192.0.2.1:1", "192.0.2.2:2", now), &mut ());
        t.insert(b, session("192.0.2.1:1", "192.0.2.2:2", now), &mut ());
        t.forward(&b, "192.0.2.1:1".parse().unwrap(), now + Duration::from_secs(50));
        let idle = t.idle(now + Duration::from_secs(61), Duration::from_secs(60), &());
        assert_eq!(idle, vec![a]);
    }
}
