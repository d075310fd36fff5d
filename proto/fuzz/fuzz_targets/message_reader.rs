//! `MessageReader` fed arbitrary bytes in varying chunk sizes (derived from the first byte)
//! until the input is exhausted or framing is lost. The messages must be the same as when
//! the whole stream arrives at once.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ztna_proto::control::{DecodeError, FramingError};
use ztna_proto::{Message, MessageReader};

type Outcome = (Vec<Result<Message, DecodeError>>, Option<FramingError>, usize);

fn run(stream: &[u8], mut seed: u32) -> Outcome {
    let mut reader = MessageReader::new();
    let mut got = Vec::new();
    let mut rest = stream;
    while !rest.is_empty() {
        // Chunk sizes 1..=64 from a small LCG; seed 0 means "everything at once".
        let size = if seed == 0 { rest.len() } else { 1 + (seed >> 16) as usize % 64 };
        seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12_345) | 1;
        let (chunk, tail) = rest.split_at(size.min(rest.len()));
        rest = tail;
        reader.push(chunk);
        while let Some(next) = reader.next_message() {
            match next {
                Ok(msg) => got.push(msg),
                Err(e) => return (got, Some(e), reader.pending()),
            }
        }
    }
    assert!(reader.next_message().is_none());
    (got, None, reader.pending())
}

fuzz_target!(|data: &[u8]| {
    let Some((&seed, stream)) = data.split_first() else { return };
    let chunked = run(stream, seed as u32);
    let whole = run(stream, 0);
    assert_eq!((&chunked.0, &chunked.1), (&whole.0, &whole.1));
    if chunked.1.is_none() {
        assert_eq!(chunked.2, whole.2, "pending bytes");
        // Whatever is left over is one incomplete message.
        let rest = &stream[stream.len() - chunked.2..];
        if rest.len() >= 2 {
            assert!(rest.len() < 2 + u16::from_be_bytes([rest[0], rest[1]]) as usize);
        }
    }
});
