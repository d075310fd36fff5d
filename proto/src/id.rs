//! The relay id layout, shared by relay-chosen QUIC connection ids and session ids.
//!
//! ```text
//!  byte 0        bytes 1..8
//! +-------------+----------------------------------+
//! | worker (u8) | 56 bits from a CSPRNG            |
//! +-------------+----------------------------------+
//! ```
//! Both sit at byte offset 1 of the datagram (QUIC short header DCID, DATA frame session id),
//! so one read names the owning worker for either plane.

use std::fmt;

/// Length of every relay-chosen id (connection ids and session ids).
pub const ID_LEN: usize = 8;
/// Number of random bytes in an id.
pub const ID_RANDOM_LEN: usize = ID_LEN - 1;
/// The worker field is one byte; worker indexes run 0..=254.
pub const MAX_WORKERS: usize = 255;

/// Builds an id from its worker and its random part.
pub fn make_id(worker: u8, random: [u8; ID_RANDOM_LEN]) -> [u8; ID_LEN] {
    let mut id = [0u8; ID_LEN];
    id[0] = worker;
    id[1..].copy_from_slice(&random);
    id
}

/// The worker named by an id.
pub fn id_worker(id: &[u8; ID_LEN]) -> u8 {
    id[0]
}

/// A session id: names one (agent, service, connector) relay session.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionId(pub [u8; ID_LEN]);

impl SessionId {
    pub fn new(worker: u8, random: [u8; ID_RANDOM_LEN]) -> Self {
        SessionId(make_id(worker, random))
    }

    pub fn worker(&self) -> u8 {
        id_worker(&self.0)
    }

    pub fn as_bytes(&self) -> &[u8; ID_LEN] {
        &self.0
    }

    /// Parses the 16-hex-digit text form used in logs and on command lines.
    pub fn from_hex(s: &str) -> Option<Self> {
        if s.len() != 2 * ID_LEN || !s.is_ascii() {
            return None;
        }
        let mut out = [0u8; ID_LEN];
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
        }
        Some(SessionId(out))
    }
}

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SessionId({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip() {
        let id = SessionId::new(3, [1, 2, 3, 4, 5, 6, 0xff]);
        assert_eq!(id.to_string(), "03010203040506ff");
        assert_eq!(SessionId::from_hex(&id.to_string()), Some(id));
        assert_eq!(SessionId::from_hex("zz"), None);
        assert_eq!(SessionId::from_hex("é0000000000000000"), None);
    }
}
