//! `Frame::parse` on arbitrary datagrams: never panics, accepted frames re-encode, and a
//! probe is always long enough for the largest reply (no amplification).
#![no_main]

use std::net::{Ipv6Addr, SocketAddr};

use libfuzzer_sys::fuzz_target;
use ztna_proto::Frame;
use ztna_proto::frame::{PUNCH_LEN, QAD_PROBE_MIN_LEN, encode_data, is_relay_frame, write_punch, write_qad_reply};

fuzz_target!(|data: &[u8]| {
    let Ok(frame) = Frame::parse(data) else { return };
    assert!(is_relay_frame(data));
    match frame {
        Frame::Data { session, payload } => {
            let mut out = Vec::new();
            encode_data(&session, payload, &mut out);
            assert_eq!(out, data);
        }
        Frame::QadProbe { nonce } => {
            assert!(data.len() >= QAD_PROBE_MIN_LEN);
            let largest = SocketAddr::from((Ipv6Addr::new(0x2001, 0xdb8, 1, 2, 3, 4, 5, 6), u16::MAX));
            let mut reply = [0u8; 64];
            let n = write_qad_reply(nonce, &largest, &mut reply).expect("reply fits");
            assert!(n <= data.len(), "reply of {n} bytes to a {}-byte probe", data.len());
        }
        Frame::QadReply { nonce, observed } => {
            let mut reply = [0u8; 64];
            let n = write_qad_reply(nonce, &observed, &mut reply).expect("reply fits");
            assert_eq!(Frame::parse(&reply[..n]), Ok(Frame::QadReply { nonce, observed }));
        }
        Frame::Punch { session, token } => {
            let mut out = [0u8; PUNCH_LEN];
            write_punch(&session, &token, &mut out);
            assert_eq!(&out[..], data);
        }
    }
});
