//! Stateless resets (RFC 9000 §10.3): a relay that restarted answers a packet of a connection
//! it no longer knows with a reset its client recognises, so the client reconnects at once
//! instead of waiting for its liveness check. The client knows the token from the handshake
//! (the relay's `stateless_reset_token` transport parameter); it is derived from the
//! connection id with a key kept in the state directory, so the relay that comes back after a
//! restart or a crash computes the same token for the same id.

use std::io::Write;
use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use hmac::{Hmac, Mac};
use sha2::Sha256;

const KEY_FILE: &str = "stateless-reset.key";
const KEY_LEN: usize = 32;
const TOKEN_LEN: usize = 16;
/// The shortest reset a receiver tells from a short-header packet (RFC 9000 §10.3: 5 bytes
/// and the token); a packet no longer than this is not answered, so two endpoints can never
/// reset each other in a loop.
pub const MIN_RESET_LEN: usize = 5 + TOKEN_LEN;
/// Resets are never longer than this, however long the packet they answer.
const MAX_RESET_LEN: usize = 43;

#[derive(Clone)]
pub struct ResetKey([u8; KEY_LEN]);

/// Never prints the key.
impl std::fmt::Debug for ResetKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ResetKey(..)")
    }
}

impl ResetKey {
    /// A key for this process only: resets from a later process will not be recognised.
    pub fn ephemeral() -> Self {
        ResetKey(rand::random())
    }

    /// The key in `dir`, created (directory 0700, file 0600) when there is none yet.
    pub fn load_or_create(dir: &Path) -> Result<ResetKey> {
        use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
        let path = dir.join(KEY_FILE);
        match std::fs::read(&path) {
            Ok(bytes) => {
                let Ok(key) = <[u8; KEY_LEN]>::try_from(bytes.as_slice()) else {
                    bail!("{} holds {} bytes, not a {KEY_LEN}-byte key", path.display(), bytes.len());
                };
                return Ok(ResetKey(key));
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        }
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).with_context(|| format!("creating {}", dir.display()))?;
        let key: [u8; KEY_LEN] = rand::random();
        // create_new: two relays starting at once on one state directory keep one key.
        let mut f = match std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return ResetKey::load_or_create(dir),
            Err(e) => return Err(e).with_context(|| format!("creating {}", path.display())),
        };
        f.write_all(&key).and_then(|()| f.sync_all()).with_context(|| format!("writing {}", path.display()))?;
        Ok(ResetKey(key))
    }

    /// The reset token of connection id `cid`: HMAC-SHA256(key, cid), first 16 bytes.
    pub fn token(&self, cid: &[u8]) -> u128 {
        // HMAC accepts keys of any length; this cannot fail.
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.0).unwrap_or_else(|_| unreachable!());
        mac.update(cid);
        let full = mac.finalize().into_bytes();
        let mut token = [0u8; TOKEN_LEN];
        token.copy_from_slice(&full[..TOKEN_LEN]);
        u128::from_be_bytes(token)
    }

    /// A reset for a short-header packet of `received` bytes to `cid`, written into `out`:
    /// shorter than that packet (so it cannot amplify or loop), random but for the fixed bit
    /// and the token at its end. `None` when the packet is too short to answer.
    pub fn write_reset(&self, cid: &[u8], received: usize, out: &mut [u8]) -> Option<usize> {
        let len = received.checked_sub(1)?.min(MAX_RESET_LEN).min(out.len());
        if len < MIN_RESET_LEN {
            return None;
        }
        let (head, tail) = out[..len].split_at_mut(len - TOKEN_LEN);
        rand::fill(head);
        // A short header: form bit clear, fixed bit set.
        head[0] = (head[0] & 0x3f) | 0x40;
        tail.copy_from_slice(&self.token(cid).to_be_bytes());
        Some(len)
    }
}

/// Resets one worker sends per second at most: a flood of packets for unknown connections
/// (from spoofed sources, say) costs a bounded number of small replies.
pub const RESETS_PER_SEC: u32 = 1000;

/// A per-second budget of resets.
#[derive(Debug)]
pub struct ResetBudget {
    second: Option<Instant>,
    used: u32,
}

impl ResetBudget {
    pub fn new() -> Self {
        ResetBudget { second: None, used: 0 }
    }

    pub fn take(&mut self, now: Instant) -> bool {
        if self.second.is_none_or(|s| now.saturating_duration_since(s).as_secs() >= 1) {
            self.second = Some(now);
            self.used = 0;
        }
        self.used += 1;
        self.used <= RESETS_PER_SEC
    }
}

impl Default for ResetBudget {
    fn default() -> Self {
        ResetBudget::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn the_key_survives_a_restart_and_tokens_depend_on_the_id() {
        let dir = std::env::temp_dir().join(format!("ztna-reset-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let a = ResetKey::load_or_create(&dir).unwrap();
        let b = ResetKey::load_or_create(&dir).unwrap();
        assert_eq!(a.token(b"\x01abcdefg"), b.token(b"\x01abcdefg"), "the same key after a restart");
        assert_ne!(a.token(b"\x01abcdefg"), a.token(b"\x01abcdefh"));
        assert_ne!(a.token(b"\x01abcdefg"), ResetKey::ephemeral().token(b"\x01abcdefg"));
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.join(KEY_FILE)).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        std::fs::write(dir.join(KEY_FILE), b"short").unwrap();
        assert!(ResetKey::load_or_create(&dir).unwrap_err().to_string().contains("not a 32-byte key"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn resets_are_shorter_than_what_they_answer_and_end_in_the_token() {
        let key = ResetKey::ephemeral();
        let cid = [1u8, 2, 3, 4, 5, 6, 7, 8];
        let mut out = [0u8; 1500];
        for received in [0, 1, 20, 21, 22, 30, 44, 1200] {
            match key.write_reset(&cid, received, &mut out) {
                None => assert!(received <= MIN_RESET_LEN, "{received}"),
                Some(n) => {
                    assert!(n < received && n >= MIN_RESET_LEN && n <= MAX_RESET_LEN, "{received} -> {n}");
                    assert_eq!(out[0] & 0xc0, 0x40, "a short header");
                    assert_eq!(out[n - TOKEN_LEN..n], key.token(&cid).to_be_bytes());
                }
            }
        }
    }

    #[test]
    fn the_budget_refills_each_second() {
        let t0 = Instant::now();
        let mut b = ResetBudget::new();
        assert!((0..RESETS_PER_SEC).all(|_| b.take(t0)));
        assert!(!b.take(t0 + Duration::from_millis(500)));
        assert!(b.take(t0 + Duration::from_secs(1)));
    }
}
