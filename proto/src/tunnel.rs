//! The end-to-end tunnel's own framing, inside its QUIC connection (PROTOCOL.md §13.8): the
//! preamble byte that opens every stream, and the flow header of every UDP datagram.
//!
//! The relay never sees these bytes (they are encrypted end to end); agent and connector
//! both speak them, so they live here beside the relay's formats. No allocation: a datagram
//! is parsed as a view and written into the caller's buffer.

use thiserror::Error;

/// First byte of every tunnel stream: "this stream is a TCP flow to the session's service".
/// The agent sends it at once, so the connector can reach the backend before the local
/// application says anything (server-speaks-first protocols such as SSH or SMTP).
pub const STREAM_PREAMBLE_TCP: u8 = 0x01;

/// Bytes in front of a UDP payload in its QUIC DATAGRAM: the flow id, a big-endian u32.
pub const UDP_FLOW_HEADER_LEN: usize = 4;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum TunnelError {
    /// Other values are reserved for new kinds of flow; the connector resets such a stream.
    #[error("unknown stream preamble {0:#04x}")]
    UnknownPreamble(u8),
    #[error("UDP flow datagram of {0} bytes is shorter than its {UDP_FLOW_HEADER_LEN}-byte header")]
    ShortDatagram(usize),
    #[error("a {need}-byte UDP flow datagram does not fit in {room} bytes")]
    NoRoom { need: usize, room: usize },
}

/// What a stream carries, as its preamble announces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamKind {
    Tcp,
}

impl StreamKind {
    /// The stream's first byte.
    pub fn preamble(self) -> u8 {
        match self {
            StreamKind::Tcp => STREAM_PREAMBLE_TCP,
        }
    }

    pub fn from_preamble(byte: u8) -> Result<StreamKind, TunnelError> {
        match byte {
            STREAM_PREAMBLE_TCP => Ok(StreamKind::Tcp),
            other => Err(TunnelError::UnknownPreamble(other)),
        }
    }
}

/// One UDP datagram of a flow, as carried in a QUIC DATAGRAM: `[flow: u32][payload]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UdpDatagram<'a> {
    pub flow: u32,
    pub payload: &'a [u8],
}

impl<'a> UdpDatagram<'a> {
    pub fn parse(dgram: &'a [u8]) -> Result<UdpDatagram<'a>, TunnelError> {
        let Some((flow, payload)) = dgram.split_first_chunk::<UDP_FLOW_HEADER_LEN>() else {
            return Err(TunnelError::ShortDatagram(dgram.len()));
        };
        Ok(UdpDatagram { flow: u32::from_be_bytes(*flow), payload })
    }

    /// Bytes on the wire: header and payload.
    pub fn len(&self) -> usize {
        UDP_FLOW_HEADER_LEN + self.payload.len()
    }

    /// Never true: a datagram always has its header. (For clippy's `len` convention.)
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Writes the datagram into `out`; returns its length.
    pub fn write(&self, out: &mut [u8]) -> Result<usize, TunnelError> {
        let need = self.len();
        let room = out.len();
        let out = out.get_mut(..need).ok_or(TunnelError::NoRoom { need, room })?;
        let (header, body) = out.split_at_mut(UDP_FLOW_HEADER_LEN);
        header.copy_from_slice(&self.flow.to_be_bytes());
        body.copy_from_slice(self.payload);
        Ok(need)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn udp_datagram_round_trip(flow in any::<u32>(), payload in proptest::collection::vec(any::<u8>(), 0..1500)) {
            let d = UdpDatagram { flow, payload: &payload };
            let mut out = vec![0u8; 1504];
            let n = d.write(&mut out).unwrap();
            prop_assert_eq!(n, UDP_FLOW_HEADER_LEN + payload.len());
            prop_assert_eq!(&out[..4], &flow.to_be_bytes());
            prop_assert_eq!(UdpDatagram::parse(&out[..n]), Ok(d));
        }

        #[test]
        fn parsed_datagrams_re_encode_exactly(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            match UdpDatagram::parse(&bytes) {
                Ok(d) => {
                    let mut out = vec![0u8; bytes.len()];
                    prop_assert_eq!(d.write(&mut out), Ok(bytes.len()));
                    prop_assert_eq!(out, bytes);
                }
                Err(e) => {
                    prop_assert!(bytes.len() < UDP_FLOW_HEADER_LEN);
                    prop_assert_eq!(e, TunnelError::ShortDatagram(bytes.len()));
                }
            }
        }

        #[test]
        fn a_short_buffer_is_refused_not_overrun(payload in proptest::collection::vec(any::<u8>(), 0..64), room in 0usize..68) {
            let d = UdpDatagram { flow: 7, payload: &payload };
            let mut out = vec![0u8; room];
            let got = d.write(&mut out);
            if room >= d.len() {
                prop_assert_eq!(got, Ok(d.len()));
            } else {
                prop_assert_eq!(got, Err(TunnelError::NoRoom { need: d.len(), room }));
            }
        }

        #[test]
        fn preamble_round_trip(byte in any::<u8>()) {
            match StreamKind::from_preamble(byte) {
                Ok(kind) => prop_assert_eq!(kind.preamble(), byte),
                Err(e) => prop_assert_eq!(e, TunnelError::UnknownPreamble(byte)),
            }
        }
    }

    #[test]
    fn exact_bytes() {
        assert_eq!(StreamKind::Tcp.preamble(), 0x01);
        assert_eq!(StreamKind::from_preamble(0x00), Err(TunnelError::UnknownPreamble(0x00)));
        assert_eq!(StreamKind::from_preamble(0x02), Err(TunnelError::UnknownPreamble(0x02)));
        let mut out = [0u8; 7];
        assert_eq!(UdpDatagram { flow: 0x0102_0304, payload: b"abc" }.write(&mut out), Ok(7));
        assert_eq!(out, [1, 2, 3, 4, b'a', b'b', b'c']);
        // The example of PROTOCOL.md §13.8.
        let mut out = [0u8; 6];
        assert_eq!(UdpDatagram { flow: 258, payload: b"hi" }.write(&mut out), Ok(6));
        assert_eq!(out, [0x00, 0x00, 0x01, 0x02, 0x68, 0x69]);
        assert_eq!(UdpDatagram::parse(&[0, 0, 0, 9]), Ok(UdpDatagram { flow: 9, payload: &[] }));
        assert_eq!(UdpDatagram::parse(&[0, 0, 9]), Err(TunnelError::ShortDatagram(3)));
    }
}
