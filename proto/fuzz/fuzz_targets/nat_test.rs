//! NAT-test probes and replies on arbitrary datagrams: never panics, accepted ones re-encode
//! byte for byte, and the reply to any accepted probe is no longer than the probe.
#![no_main]

use std::net::{Ipv6Addr, SocketAddr};

use libfuzzer_sys::fuzz_target;
use ztna_proto::nat_test::{NAT_PROBE_LEN, NAT_REPLY_MAX_LEN, NatProbe, NatReply};

fuzz_target!(|data: &[u8]| {
    if let Ok(probe) = NatProbe::parse(data) {
        let mut out = [0u8; NAT_PROBE_LEN];
        probe.write(&mut out);
        assert_eq!(NatProbe::parse(&out), Ok(probe));
        let largest = SocketAddr::from((Ipv6Addr::new(0x2001, 0xdb8, 1, 2, 3, 4, 5, 6), u16::MAX));
        let mut reply = [0u8; NAT_REPLY_MAX_LEN];
        let n = NatReply { nonce: probe.nonce, observed: largest, other: largest }.write(&mut reply);
        assert!(n <= data.len(), "reply of {n} bytes to a {}-byte probe", data.len());
    }
    if let Ok(reply) = NatReply::parse(data) {
        let mut out = [0u8; NAT_REPLY_MAX_LEN];
        let n = reply.write(&mut out);
        assert_eq!(NatReply::parse(&out[..n]), Ok(reply));
    }
});
