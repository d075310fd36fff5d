//! `Message::decode` on arbitrary bytes: never panics, and whatever it accepts re-encodes
//! to a message that decodes to the same value.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ztna_proto::Message;

fuzz_target!(|data: &[u8]| {
    let Ok(msg) = Message::decode(data) else { return };
    let mut out = Vec::new();
    if let Err(e) = msg.encode(&mut out) {
        panic!("decoded message does not re-encode ({e}): {msg:?}");
    }
    assert_eq!(u16::from_be_bytes([out[0], out[1]]) as usize, out.len() - 2, "length prefix");
    assert_eq!(Message::decode(&out[2..]), Ok(msg));
});
