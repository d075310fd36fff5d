//! The tunnel's framing on arbitrary bytes: a UDP flow datagram either parses and re-encodes
//! to the same bytes or is refused as short; a preamble byte is known or refused, never both.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ztna_proto::tunnel::{StreamKind, TunnelError, UDP_FLOW_HEADER_LEN, UdpDatagram};

fuzz_target!(|data: &[u8]| {
    match UdpDatagram::parse(data) {
        Ok(d) => {
            assert_eq!(d.len(), data.len());
            let mut out = vec![0u8; data.len()];
            assert_eq!(d.write(&mut out), Ok(data.len()));
            assert_eq!(out, data);
            // One byte short of room is refused, not overrun.
            assert_eq!(d.write(&mut out[1..]), Err(TunnelError::NoRoom { need: data.len(), room: data.len() - 1 }));
        }
        Err(e) => {
            assert!(data.len() < UDP_FLOW_HEADER_LEN);
            assert_eq!(e, TunnelError::ShortDatagram(data.len()));
        }
    }
    if let Some(&first) = data.first() {
        match StreamKind::from_preamble(first) {
            Ok(kind) => assert_eq!(kind.preamble(), first),
            Err(e) => assert_eq!(e, TunnelError::UnknownPreamble(first)),
        }
    }
});
