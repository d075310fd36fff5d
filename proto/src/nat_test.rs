//! The NAT behaviour test (PROTOCOL.md §14.9): RFC 5780's mapping and filtering tests,
//! carried in two relay-frame types on the relay's NAT-test responder (a port of its own, on
//! two addresses, never the main port).
//!
//! A client sends `NAT_PROBE`; the responder answers with `NAT_REPLY` from the address the
//! probe asks for (the one it reached, another port, or another address and port), saying
//! where the probe came from and where the responder's other address is.

use std::net::SocketAddr;

use thiserror::Error;

use crate::addr;
use crate::wire::{Reader, WireError};

/// `NAT_PROBE`: `[0x05][nonce: 8][change: u8][zero padding]`, exactly [`NAT_PROBE_LEN`] bytes.
pub const TYPE_NAT_PROBE: u8 = 0x05;
/// `NAT_REPLY`: `[0x06][nonce: 8][observed address][other address]`.
pub const TYPE_NAT_REPLY: u8 = 0x06;
/// Change request: answer from the responder's other address.
pub const CHANGE_ADDRESS: u8 = 0x01;
/// Change request: answer from the responder's other port.
pub const CHANGE_PORT: u8 = 0x02;
/// The largest reply (two IPv6 addresses).
pub const NAT_REPLY_MAX_LEN: usize = 1 + 8 + 2 * addr::MAX_ENCODED_LEN;
/// A probe is as long as the largest reply, so no reply amplifies.
pub const NAT_PROBE_LEN: usize = NAT_REPLY_MAX_LEN;

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum NatTestError {
    #[error("not a NAT-test frame (type {0:#04x})")]
    WrongType(u8),
    #[error("NAT probe is not {NAT_PROBE_LEN} bytes")]
    BadProbeLength,
    #[error("NAT probe asks for unknown changes {0:#04x}")]
    UnknownChange(u8),
    #[error("malformed NAT reply: {0}")]
    BadReply(WireError),
}

/// What a probe asks of the responder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NatProbe {
    pub nonce: u64,
    /// [`CHANGE_ADDRESS`] and/or [`CHANGE_PORT`].
    pub change: u8,
}

/// The responder's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NatReply {
    pub nonce: u64,
    /// The probe's source address, as the responder saw it.
    pub observed: SocketAddr,
    /// The responder's other address and other port (RFC 5780's OTHER-ADDRESS).
    pub other: SocketAddr,
}

impl NatProbe {
    pub fn parse(datagram: &[u8]) -> Result<NatProbe, NatTestError> {
        match datagram.first() {
            Some(&TYPE_NAT_PROBE) => {}
            other => return Err(NatTestError::WrongType(other.copied().unwrap_or(0))),
        }
        if datagram.len() != NAT_PROBE_LEN {
            return Err(NatTestError::BadProbeLength);
        }
        let mut r = Reader::new(&datagram[1..]);
        let nonce = r.u64().map_err(|_| NatTestError::BadProbeLength)?;
        let change = r.u8().map_err(|_| NatTestError::BadProbeLength)?;
        if change & !(CHANGE_ADDRESS | CHANGE_PORT) != 0 {
            return Err(NatTestError::UnknownChange(change));
        }
        Ok(NatProbe { nonce, change })
    }

    pub fn write(&self, out: &mut [u8; NAT_PROBE_LEN]) {
        out.fill(0);
        out[0] = TYPE_NAT_PROBE;
        out[1..9].copy_from_slice(&self.nonce.to_be_bytes());
        out[9] = self.change;
    }
}

impl NatReply {
    pub fn parse(datagram: &[u8]) -> Result<NatReply, NatTestError> {
        match datagram.first() {
            Some(&TYPE_NAT_REPLY) => {}
            other => return Err(NatTestError::WrongType(other.copied().unwrap_or(0))),
        }
        let mut r = Reader::new(&datagram[1..]);
        let nonce = r.u64().map_err(NatTestError::BadReply)?;
        let observed = addr::decode(&mut r).map_err(NatTestError::BadReply)?;
        let other = addr::decode(&mut r).map_err(NatTestError::BadReply)?;
        r.finish().map_err(NatTestError::BadReply)?;
        Ok(NatReply { nonce, observed, other })
    }

    /// Writes the reply into `out` without allocating; returns its length.
    pub fn write(&self, out: &mut [u8; NAT_REPLY_MAX_LEN]) -> usize {
        out[0] = TYPE_NAT_REPLY;
        out[1..9].copy_from_slice(&self.nonce.to_be_bytes());
        // Both fit: the buffer holds two of the largest addresses.
        let a = addr::encode_into(&self.observed, &mut out[9..]).unwrap_or(0);
        let b = addr::encode_into(&self.other, &mut out[9 + a..]).unwrap_or(0);
        9 + a + b
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn any_addr() -> impl Strategy<Value = SocketAddr> {
        prop_oneof![
            (any::<[u8; 4]>(), any::<u16>()).prop_map(|(ip, port)| SocketAddr::from((ip, port))),
            (any::<[u8; 16]>(), any::<u16>()).prop_map(|(ip, port)| addr::canonical(SocketAddr::from((ip, port)))),
        ]
    }

    proptest! {
        #[test]
        fn probe_round_trip(nonce in any::<u64>(), change in 0u8..4) {
            let mut out = [0u8; NAT_PROBE_LEN];
            NatProbe { nonce, change }.write(&mut out);
            prop_assert_eq!(NatProbe::parse(&out), Ok(NatProbe { nonce, change }));
        }

        #[test]
        fn reply_round_trip_and_never_longer_than_a_probe(nonce in any::<u64>(), observed in any_addr(), other in any_addr()) {
            let mut out = [0u8; NAT_REPLY_MAX_LEN];
            let reply = NatReply { nonce, observed, other };
            let n = reply.write(&mut out);
            prop_assert!(n <= NAT_PROBE_LEN);
            prop_assert_eq!(NatReply::parse(&out[..n]), Ok(reply));
        }

        #[test]
        fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..80)) {
            let _ = NatProbe::parse(&data);
            let _ = NatReply::parse(&data);
        }
    }

    #[test]
    fn short_long_and_unknown_probes_are_refused() {
        let mut out = [0u8; NAT_PROBE_LEN];
        NatProbe { nonce: 7, change: CHANGE_PORT }.write(&mut out);
        assert_eq!(NatProbe::parse(&out[..NAT_PROBE_LEN - 1]), Err(NatTestError::BadProbeLength));
        let mut long = out.to_vec();
        long.push(0);
        assert_eq!(NatProbe::parse(&long), Err(NatTestError::BadProbeLength));
        out[9] = 0x04;
        assert_eq!(NatProbe::parse(&out), Err(NatTestError::UnknownChange(0x04)));
        assert_eq!(NatProbe::parse(&[]), Err(NatTestError::WrongType(0)));
    }
}
