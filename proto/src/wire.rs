//! Bounds-checked big-endian cursor used by every decoder in this crate.

use thiserror::Error;

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum WireError {
    #[error("truncated: needed {needed} more bytes")]
    Truncated { needed: usize },
    #[error("string is not UTF-8")]
    NotUtf8,
    #[error("{0}")]
    Invalid(&'static str),
}

pub(crate) struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Reader { buf }
    }

    pub fn remaining(&self) -> usize {
        self.buf.len()
    }

    pub fn bytes(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        if self.buf.len() < n {
            return Err(WireError::Truncated { needed: n - self.buf.len() });
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    pub fn array<const N: usize>(&mut self) -> Result<[u8; N], WireError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.bytes(N)?);
        Ok(out)
    }

    pub fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.array::<1>()?[0])
    }

    pub fn u16(&mut self) -> Result<u16, WireError> {
        Ok(u16::from_be_bytes(self.array()?))
    }

    pub fn u32(&mut self) -> Result<u32, WireError> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    pub fn u64(&mut self) -> Result<u64, WireError> {
        Ok(u64::from_be_bytes(self.array()?))
    }

    /// A string with a u16 length prefix, at most `max` bytes.
    pub fn string(&mut self, max: usize) -> Result<&'a str, WireError> {
        let len = self.u16()? as usize;
        if len > max {
            return Err(WireError::Invalid("string too long"));
        }
        std::str::from_utf8(self.bytes(len)?).map_err(|_| WireError::NotUtf8)
    }

    pub fn finish(self) -> Result<(), WireError> {
        if self.buf.is_empty() { Ok(()) } else { Err(WireError::Invalid("trailing bytes")) }
    }
}

pub(crate) fn put_string(out: &mut Vec<u8>, s: &str) {
    // Callers validate lengths before encoding; truncation here would corrupt the stream.
    debug_assert!(s.len() <= u16::MAX as usize);
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}
