//! Which connectors serve which service, across all workers. Touched only on the control
//! path (register, connect, disconnect), never per packet, so a mutex is fine here.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use crate::sessions::ConnRef;

#[derive(Debug, Clone)]
pub struct ConnectorEntry {
    pub conn: ConnRef,
    pub identity: Arc<str>,
    /// The control connection's address: where the connector's relay frames come from and go.
    pub addr: SocketAddr,
    /// Its separate peer-to-peer socket's address (`DirectAddress`), if it has one.
    pub direct_addr: Option<SocketAddr>,
}

impl ConnectorEntry {
    /// The server-reflexive candidate an agent of a new session is given.
    pub fn reflexive_candidate(&self) -> SocketAddr {
        self.direct_addr.unwrap_or(self.addr)
    }
}

#[derive(Default)]
pub struct Registry {
    services: HashMap<String, Vec<ConnectorEntry>>,
    /// Round-robin cursor per service, so load spreads over live connectors.
    cursors: HashMap<String, usize>,
}

impl Registry {
    pub fn register(&mut self, service: &str, entry: ConnectorEntry) {
        let list = self.services.entry(service.to_owned()).or_default();
        list.retain(|e| e.conn != entry.conn);
        list.push(entry);
    }

    /// Removes every registration of a connection; returns how many there were.
    pub fn remove_conn(&mut self, conn: ConnRef) -> usize {
        let mut removed = 0;
        self.services.retain(|_, list| {
            let before = list.len();
            list.retain(|e| e.conn != conn);
            removed += before - list.len();
            !list.is_empty()
        });
        removed
    }

    /// Removes one registration (the policy no longer allows it).
    pub fn unregister(&mut self, service: &str, conn: ConnRef) -> bool {
        let Some(list) = self.services.get_mut(service) else { return false };
        let before = list.len();
        list.retain(|e| e.conn != conn);
        let removed = list.len() != before;
        if list.is_empty() {
            self.services.remove(service);
        }
        removed
    }

    pub fn update_addr(&mut self, conn: ConnRef, addr: SocketAddr) {
        for e in self.entries_of(conn) {
            e.addr = addr;
        }
    }

    pub fn update_direct_addr(&mut self, conn: ConnRef, addr: SocketAddr) {
        for e in self.entries_of(conn) {
            e.direct_addr = Some(addr);
        }
    }

    fn entries_of(&mut self, conn: ConnRef) -> impl Iterator<Item = &mut ConnectorEntry> {
        self.services.values_mut().flatten().filter(move |e| e.conn == conn)
    }

    /// A live connector for `service`, round-robin.
    pub fn pick(&mut self, service: &str) -> Option<ConnectorEntry> {
        let list = self.services.get(service).filter(|l| !l.is_empty())?;
        let cursor = self.cursors.entry(service.to_owned()).or_default();
        let entry = list[*cursor % list.len()].clone();
        *cursor = cursor.wrapping_add(1);
        Some(entry)
    }

    /// The connection of connector `identity` serving `service` (the first, when one
    /// identity has several connections).
    pub fn pick_identity(&self, service: &str, identity: &str) -> Option<ConnectorEntry> {
        self.services.get(service)?.iter().find(|e| &*e.identity == identity).cloned()
    }

    pub fn registrations(&self) -> usize {
        self.services.values().map(Vec::len).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(worker: u8, n: u8) -> ConnectorEntry {
        ConnectorEntry { conn: ConnRef { worker, conn: [n; 8] }, identity: "ztna://connector/x".into(), addr: "192.0.2.9:1".parse().unwrap(), direct_addr: None }
    }

    #[test]
    fn round_robin_and_removal() {
        let mut r = Registry::default();
        r.register("web", entry(0, 1));
        r.register("web", entry(1, 2));
        r.register("web", entry(1, 2));
        assert_eq!(r.registrations(), 2);
        let a = r.pick("web").unwrap().conn;
        let b = r.pick("web").unwrap().conn;
        assert_ne!(a, b);
        assert_eq!(r.remove_conn(entry(0, 1).conn), 1);
        assert_eq!(r.pick("web").unwrap().conn, entry(1, 2).conn);
        assert!(r.unregister("web", entry(1, 2).conn));
        assert!(r.pick("web").is_none());
    }
}
