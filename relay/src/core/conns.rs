//! One worker's control connections, with the bookkeeping around them: the client-chosen
//! Initial DCIDs that alias a connection until its handshake completes, the timer heap,
//! and the list of connections touched this turn.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::hash::BuildHasherDefault;
use std::time::Instant;

use super::conn::{ConnKey, ControlConn};
use crate::sessions::IdHasher;

struct Entry {
    conn: ControlConn,
    /// The client-chosen DCID of its first Initial, aliased to this connection until the
    /// handshake completes (only without Retry).
    alias: Option<Vec<u8>>,
    deadline: Option<Instant>,
    /// Queued for servicing this turn.
    dirty: bool,
}

#[derive(Default)]
pub struct ConnTable {
    entries: HashMap<ConnKey, Entry, BuildHasherDefault<IdHasher>>,
    aliases: HashMap<Vec<u8>, ConnKey>,
    timers: BinaryHeap<Reverse<(Instant, ConnKey)>>,
    dirty: Vec<ConnKey>,
}

impl ConnTable {
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn contains(&self, key: &ConnKey) -> bool {
        self.entries.contains_key(key)
    }

    /// Adds a new connection, aliased by the DCID of the client's first Initial when the
    /// handshake runs without Retry.
    pub fn insert(&mut self, conn: ControlConn, alias: Option<&[u8]>) {
        let key = conn.key();
        if let Some(a) = alias {
            self.aliases.insert(a.to_vec(), key);
        }
        self.entries.insert(key, Entry { conn, alias: alias.map(<[u8]>::to_vec), deadline: None, dirty: false });
    }

    /// The connection a long-header packet's DCID names: our id, or an Initial's alias.
    pub fn find(&self, dcid: &[u8]) -> Option<ConnKey> {
        <ConnKey>::try_from(dcid).ok().filter(|k| self.entries.contains_key(k)).or_else(|| self.aliases.get(dcid).copied())
    }

    pub fn get(&self, key: &ConnKey) -> Option<&ControlConn> {
        self.entries.get(key).map(|e| &e.conn)
    }

    /// A connection, marked to be serviced this turn.
    pub fn touch(&mut self, key: &ConnKey) -> Option<&mut ControlConn> {
        let e = self.entries.get_mut(key)?;
        if !e.dirty {
            e.dirty = true;
            self.dirty.push(*key);
        }
        Some(&mut e.conn)
    }

    pub fn has_dirty(&self) -> bool {
        !self.dirty.is_empty()
    }

    /// The next connection touched this turn (handlers may touch more while it runs).
    pub fn next_dirty(&mut self) -> Option<ConnKey> {
        while let Some(key) = self.dirty.pop() {
            if let Some(e) = self.entries.get_mut(&key) {
                e.dirty = false;
                return Some(key);
            }
        }
        None
    }

    pub fn get_mut(&mut self, key: &ConnKey) -> Option<&mut ControlConn> {
        self.entries.get_mut(key).map(|e| &mut e.conn)
    }

    /// After a connection was serviced: re-arms its timer, and once its handshake is done,
    /// forgets its Initial-DCID alias (no Initial may reach it any more).
    pub fn serviced(&mut self, key: &ConnKey, now: Instant) {
        let Some(e) = self.entries.get_mut(key) else { return };
        if e.conn.is_established()
            && let Some(a) = e.alias.take()
        {
            self.aliases.remove(&a);
        }
        let deadline = e.conn.timeout(now).map(|d| now + d);
        if deadline != e.deadline {
            e.deadline = deadline;
            if let Some(t) = deadline {
                self.timers.push(Reverse((t, *key)));
            }
        }
    }

    pub fn next_deadline(&self) -> Option<Instant> {
        self.timers.peek().map(|Reverse((t, _))| *t)
    }

    /// Runs QUIC's timeout on every connection whose timer is due, and touches it.
    pub fn fire_timers(&mut self, now: Instant) {
        while let Some(&Reverse((t, key))) = self.timers.peek() {
            if t > now {
                break;
            }
            self.timers.pop();
            if let Some(e) = self.entries.get_mut(&key)
                && e.deadline == Some(t)
            {
                e.deadline = None;
                e.conn.on_timeout(now);
                self.touch(&key);
            }
        }
        // Stale entries (a deadline that moved) are skipped above; keep the heap bounded.
        if self.timers.len() > 4 * self.entries.len() + 1024 {
            self.timers = self.entries.iter().filter_map(|(k, e)| e.deadline.map(|t| Reverse((t, *k)))).collect();
        }
    }

    pub fn remove(&mut self, key: &ConnKey) -> Option<ControlConn> {
        let e = self.entries.remove(key)?;
        if let Some(a) = &e.alias {
            self.aliases.remove(a);
        }
        Some(e.conn)
    }

    pub fn keys(&self) -> Vec<ConnKey> {
        self.entries.keys().copied().collect()
    }
}
