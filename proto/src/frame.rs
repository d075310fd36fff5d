//! Relay frames: the non-QUIC datagrams that share the relay's UDP port with control QUIC.
//!
//! A frame's first byte has the QUIC fixed bit (0x40) and the long-header bit (0x80) clear,
//! so it never parses as QUIC v1. Typed zero-copy views over the datagram bytes.

use std::net::SocketAddr;

use thiserror::Error;

use crate::addr;
use crate::candidate::PUNCH_TOKEN_LEN;
use crate::id::{ID_LEN, SessionId};
use crate::wire::{Reader, WireError};

/// `DATA`: `[0x01][session id: 8][opaque payload]`; the payload is an e2e QUIC packet.
pub const TYPE_DATA: u8 = 0x01;
/// `QAD_PROBE`: `[0x02][nonce: 8][zero padding]`, at least [`QAD_PROBE_MIN_LEN`] bytes.
pub const TYPE_QAD_PROBE: u8 = 0x02;
/// `QAD_REPLY`: `[0x03][nonce: 8][address]`, never longer than the probe it answers.
pub const TYPE_QAD_REPLY: u8 = 0x03;
/// `PUNCH`: `[0x04][session id: 8][punch token: 16]`, sent peer to peer (never to the relay)
/// to open NAT mappings and teach the peer a reflexive address (PROTOCOL.md §14.3).
pub const TYPE_PUNCH: u8 = 0x04;
/// Length of a PUNCH frame.
pub const PUNCH_LEN: usize = 1 + ID_LEN + PUNCH_TOKEN_LEN;

/// Bytes before a DATA frame's payload.
pub const DATA_HEADER_LEN: usize = 1 + ID_LEN;
/// A probe must be at least as long as the largest reply, so a reply never amplifies.
pub const QAD_PROBE_MIN_LEN: usize = 1 + 8 + addr::MAX_ENCODED_LEN;
/// Bits that are clear in every relay frame's first byte.
pub const NOT_QUIC_MASK: u8 = 0xc0;

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum FrameError {
    #[error("datagram is empty")]
    Empty,
    #[error("first byte {0:#04x} is a QUIC packet, not a relay frame")]
    IsQuic(u8),
    #[error("unknown relay frame type {0:#04x}")]
    UnknownType(u8),
    #[error("DATA frame shorter than its {DATA_HEADER_LEN}-byte header")]
    ShortData,
    #[error("QAD probe shorter than {QAD_PROBE_MIN_LEN} bytes")]
    ShortProbe,
    #[error("malformed QAD reply: {0}")]
    BadReply(WireError),
    #[error("PUNCH frame is not {PUNCH_LEN} bytes")]
    BadPunch,
}

/// A parsed relay frame, borrowing the datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Frame<'a> {
    Data { session: SessionId, payload: &'a [u8] },
    QadProbe { nonce: u64 },
    QadReply { nonce: u64, observed: SocketAddr },
    Punch { session: SessionId, token: [u8; PUNCH_TOKEN_LEN] },
}

/// True when the datagram is a relay frame rather than a QUIC packet.
pub fn is_relay_frame(datagram: &[u8]) -> bool {
    datagram.first().is_some_and(|b| b & NOT_QUIC_MASK == 0)
}

impl<'a> Frame<'a> {
    pub fn parse(datagram: &'a [u8]) -> Result<Frame<'a>, FrameError> {
        let (&kind, rest) = datagram.split_first().ok_or(FrameError::Empty)?;
        if kind & NOT_QUIC_MASK != 0 {
            return Err(FrameError::IsQuic(kind));
        }
        match kind {
            TYPE_DATA => {
                let id: [u8; ID_LEN] =
                    rest.get(..ID_LEN).ok_or(FrameError::ShortData)?.try_into().unwrap_or([0; ID_LEN]);
                Ok(Frame::Data { session: SessionId(id), payload: &rest[ID_LEN..] })
            }
            TYPE_QAD_PROBE => {
                if datagram.len() < QAD_PROBE_MIN_LEN {
                    return Err(FrameError::ShortProbe);
                }
                let mut r = Reader::new(rest);
                let nonce = r.u64().map_err(|_| FrameError::ShortProbe)?;
                Ok(Frame::QadProbe { nonce })
            }
            TYPE_QAD_REPLY => {
                let mut r = Reader::new(rest);
                let nonce = r.u64().map_err(FrameError::BadReply)?;
                let observed = addr::decode(&mut r).map_err(FrameError::BadReply)?;
                r.finish().map_err(FrameError::BadReply)?;
                Ok(Frame::QadReply { nonce, observed })
            }
            TYPE_PUNCH => {
                if datagram.len() != PUNCH_LEN {
                    return Err(FrameError::BadPunch);
                }
                let mut r = Reader::new(rest);
                let session = SessionId(r.array::<ID_LEN>().map_err(|_| FrameError::BadPunch)?);
                let token = r.array::<PUNCH_TOKEN_LEN>().map_err(|_| FrameError::BadPunch)?;
                Ok(Frame::Punch { session, token })
            }
            other => Err(FrameError::UnknownType(other)),
        }
    }
}

/// Writes a PUNCH frame; returns its length.
pub fn write_punch(session: &SessionId, token: &[u8; PUNCH_TOKEN_LEN], out: &mut [u8; PUNCH_LEN]) -> usize {
    out[0] = TYPE_PUNCH;
    out[1..1 + ID_LEN].copy_from_slice(session.as_bytes());
    out[1 + ID_LEN..].copy_from_slice(token);
    PUNCH_LEN
}

/// Writes a DATA frame header for `session` into `out[..DATA_HEADER_LEN]`.
pub fn write_data_header(session: &SessionId, out: &mut [u8; DATA_HEADER_LEN]) {
    out[0] = TYPE_DATA;
    out[1..].copy_from_slice(session.as_bytes());
}

/// Encodes a whole DATA frame.
pub fn encode_data(session: &SessionId, payload: &[u8], out: &mut Vec<u8>) {
    out.push(TYPE_DATA);
    out.extend_from_slice(session.as_bytes());
    out.extend_from_slice(payload);
}

/// Encodes a QAD probe padded to the minimum length.
pub fn encode_qad_probe(nonce: u64, out: &mut Vec<u8>) {
    out.push(TYPE_QAD_PROBE);
    out.extend_from_slice(&nonce.to_be_bytes());
    out.resize(out.len() + QAD_PROBE_MIN_LEN - 9, 0);
}

/// Writes the reply to a probe into `out` without allocating; returns its length.
/// The caller guarantees (by having parsed the probe) that the reply is no longer than it.
pub fn write_qad_reply(nonce: u64, observed: &SocketAddr, out: &mut [u8]) -> Option<usize> {
    if out.len() < 9 {
        return None;
    }
    out[0] = TYPE_QAD_REPLY;
    out[1..9].copy_from_slice(&nonce.to_be_bytes());
    Some(9 + addr::encode_into(observed, &mut out[9..])?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn data_round_trip(id in any::<[u8; 8]>(), payload in proptest::collection::vec(any::<u8>(), 0..1500)) {
            let mut out = Vec::new();
            encode_data(&SessionId(id), &payload, &mut out);
            prop_assert!(is_relay_frame(&out));
            prop_assert_eq!(Frame::parse(&out), Ok(Frame::Data { session: SessionId(id), payload: &payload }));
        }

        #[test]
        fn qad_round_trip(nonce in any::<u64>(), ip in any::<[u8; 16]>(), v4 in any::<[u8; 4]>(), port in any::<u16>(), use_v6 in any::<bool>()) {
            let observed: SocketAddr = if use_v6 {
                (std::net::Ipv6Addr::from(ip), port).into()
            } else {
                (std::net::Ipv4Addr::from(v4), port).into()
            };
            let observed = addr::canonical(observed);
            let mut probe = Vec::new();
            encode_qad_probe(nonce, &mut probe);
            prop_assert_eq!(Frame::parse(&probe), Ok(Frame::QadProbe { nonce }));
            let mut reply = [0u8; 64];
            let n = write_qad_reply(nonce, &observed, &mut reply).unwrap();
            prop_assert!(n <= probe.len(), "reply must never amplify");
            prop_assert_eq!(Frame::parse(&reply[..n]), Ok(Frame::QadReply { nonce, observed }));
        }

        #[test]
        fn punch_round_trip(id in any::<[u8; 8]>(), token in any::<[u8; PUNCH_TOKEN_LEN]>(), extra in 0usize..3) {
            let mut out = [0u8; PUNCH_LEN];
            let n = write_punch(&SessionId(id), &token, &mut out);
            prop_assert!(is_relay_frame(&out[..n]));
            prop_assert_eq!(Frame::parse(&out[..n]), Ok(Frame::Punch { session: SessionId(id), token }));
            // Any other length is not a punch.
            let mut longer = out.to_vec();
            longer.resize(PUNCH_LEN + extra + 1, 0);
            prop_assert_eq!(Frame::parse(&longer), Err(FrameError::BadPunch));
            prop_assert_eq!(Frame::parse(&out[..PUNCH_LEN - 1 - extra]), Err(FrameError::BadPunch));
        }

        #[test]
        fn parse_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = Frame::parse(&bytes);
        }
    }

    #[test]
    fn quic_bits_are_not_frames() {
        assert_eq!(Frame::parse(&[0x40, 0, 0]), Err(FrameError::IsQuic(0x40)));
        assert_eq!(Frame::parse(&[0xc0]), Err(FrameError::IsQuic(0xc0)));
        assert_eq!(Frame::parse(&[]), Err(FrameError::Empty));
        assert_eq!(Frame::parse(&[TYPE_DATA, 1, 2]), Err(FrameError::ShortData));
        assert_eq!(Frame::parse(&[TYPE_QAD_PROBE; 10]), Err(FrameError::ShortProbe));
        assert_eq!(Frame::parse(&[0x3f]), Err(FrameError::UnknownType(0x3f)));
    }
}
