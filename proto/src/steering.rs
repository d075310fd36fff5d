//! Which worker owns a datagram. The same rule runs in user space (hand-off between
//! workers) and, later, in the SK_REUSEPORT and XDP programs, so it stays this small:
//!
//! * relay frame (first byte & 0xc0 == 0): DATA frames name their worker in byte 1 (the
//!   session id's worker byte); other frames are stateless and any worker may answer;
//! * QUIC short header: byte 1 is the first byte of the relay-chosen DCID, the worker;
//! * QUIC long header: FNV-1a of the DCID modulo the worker count. Client Initials carry a
//!   DCID the client chose, so retransmits land on the same worker. The relay picks its own
//!   connection ids so that both rules agree (see [`id_is_consistent`]), which keeps a
//!   connection on one worker when the client switches to the relay's DCID mid-handshake.

use crate::frame::{NOT_QUIC_MASK, TYPE_DATA};
use crate::id::{ID_LEN, id_worker};

/// Longest DCID allowed by QUIC v1.
pub const MAX_DCID_LEN: usize = 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Owner {
    /// This worker index owns the datagram.
    Worker(u8),
    /// Stateless: whichever worker received it handles it.
    Any,
    /// Too short or malformed to route; drop and count.
    Malformed,
}

/// FNV-1a 32-bit: trivially expressible as a bounded loop in eBPF.
pub fn fnv1a(bytes: &[u8]) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for &b in bytes {
        h ^= b as u32;
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

/// Worker for a long-header DCID.
pub fn hash_worker(dcid: &[u8], workers: u8) -> u8 {
    (fnv1a(dcid) % workers.max(1) as u32) as u8
}

/// True when a relay-chosen id routes to its worker under both the short-header rule
/// (worker byte) and the long-header rule (hash). The relay draws ids until this holds.
pub fn id_is_consistent(id: &[u8; ID_LEN], workers: u8) -> bool {
    hash_worker(id, workers) == id_worker(id)
}

/// The owner of one received datagram, given the worker count (1..=255).
pub fn owner(datagram: &[u8], workers: u8) -> Owner {
    let Some(&first) = datagram.first() else { return Owner::Malformed };
    let by_byte1 = || match datagram.get(1) {
        Some(&w) if w < workers && datagram.len() > ID_LEN => Owner::Worker(w),
        _ => Owner::Malformed,
    };
    if first & NOT_QUIC_MASK == 0 {
        return if first == TYPE_DATA { by_byte1() } else { Owner::Any };
    }
    if first & 0x80 == 0 {
        return by_byte1();
    }
    // Long header: flags(1) version(4) dcid_len(1) dcid.
    let Some(&dcid_len) = datagram.get(5) else { return Owner::Malformed };
    let dcid_len = dcid_len as usize;
    if dcid_len > MAX_DCID_LEN {
        return Owner::Malformed;
    }
    match datagram.get(6..6 + dcid_len) {
        Some(dcid) => Owner::Worker(hash_worker(dcid, workers)),
        None => Owner::Malformed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::id::make_id;
    use proptest::prelude::*;

    #[test]
    fn fnv_known_values() {
        assert_eq!(fnv1a(b""), 0x811c_9dc5);
        assert_eq!(fnv1a(b"a"), 0xe40c_292c);
    }

    #[test]
    fn short_header_and_data_use_worker_byte() {
        let id = make_id(1, [9; 7]);
        let mut short = vec![0x41];
        short.extend_from_slice(&id);
        short.extend_from_slice(&[0; 20]);
        assert_eq!(owner(&short, 2), Owner::Worker(1));
        short[0] = TYPE_DATA;
        assert_eq!(owner(&short, 2), Owner::Worker(1));
        assert_eq!(owner(&short, 1), Owner::Malformed, "worker byte beyond the worker count");
        assert_eq!(owner(&[0x02; 40], 2), Owner::Any);
        assert_eq!(owner(&[], 2), Owner::Malformed);
    }

    proptest! {
        #[test]
        fn consistent_ids_route_the_same_both_ways(random in any::<[u8; 7]>(), workers in 1u8..=64) {
            for w in 0..workers {
                let id = make_id(w, random);
                if !id_is_consistent(&id, workers) { continue; }
                let mut long = vec![0xc0, 0, 0, 0, 1, ID_LEN as u8];
                long.extend_from_slice(&id);
                long.push(0);
                let mut short = vec![0x40];
                short.extend_from_slice(&id);
                short.push(0);
                prop_assert_eq!(owner(&long, workers), Owner::Worker(w));
                prop_assert_eq!(owner(&short, workers), Owner::Worker(w));
            }
        }

        #[test]
        fn owner_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..40), workers in 1u8..=255) {
            if let Owner::Worker(w) = owner(&bytes, workers) { prop_assert!(w < workers); }
        }
    }
}
