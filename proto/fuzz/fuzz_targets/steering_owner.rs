//! `steering::owner` with the worker count from the first byte (1..=255): never panics, a
//! named worker is below the count, and DATA frames go to their session's worker.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ztna_proto::Frame;
use ztna_proto::steering::{Owner, owner};

fuzz_target!(|data: &[u8]| {
    let Some((&workers, datagram)) = data.split_first() else { return };
    if workers == 0 {
        return;
    }
    let got = owner(datagram, workers);
    if let Owner::Worker(w) = got {
        assert!(w < workers, "worker {w} of {workers}");
    }
    if let Ok(Frame::Data { session, .. }) = Frame::parse(datagram) {
        let want = if session.worker() < workers { Owner::Worker(session.worker()) } else { Owner::Malformed };
        assert_eq!(got, want);
    }
});
