//! Stateless Retry tokens (RFC 9000 §8.1.2): the relay proves a client owns its source
//! address before keeping any handshake state. A token is
//! `issued_at (u64 ms) | odcid_len (u8) | odcid | HMAC-SHA256(key, issued_at | addr | odcid)[..16]`,
//! valid for [`TOKEN_LIFETIME`]. The key is random per relay process and shared by workers.

use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hmac::{Hmac, Mac};
use sha2::Sha256;

pub const TOKEN_LIFETIME: Duration = Duration::from_secs(10);
const MAC_LEN: usize = 16;
pub const MAX_TOKEN_LEN: usize = 8 + 1 + 20 + MAC_LEN;

#[derive(Clone)]
pub struct RetryKey([u8; 32]);

impl RetryKey {
    pub fn random() -> Self {
        RetryKey(rand::random())
    }

    fn mac(&self, issued_at: u64, peer: &SocketAddr, odcid: &[u8]) -> [u8; MAC_LEN] {
        // HMAC accepts keys of any length; this cannot fail.
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.0).unwrap_or_else(|_| unreachable!());
        mac.update(&issued_at.to_be_bytes());
        let peer = ztna_proto::addr::canonical(*peer);
        match peer.ip() {
            std::net::IpAddr::V4(ip) => mac.update(&ip.octets()),
            std::net::IpAddr::V6(ip) => mac.update(&ip.octets()),
        }
        mac.update(&peer.port().to_be_bytes());
        mac.update(odcid);
        let full = mac.finalize().into_bytes();
        let mut out = [0u8; MAC_LEN];
        out.copy_from_slice(&full[..MAC_LEN]);
        out
    }

    /// Writes a token into `out`, returning its length.
    pub fn mint(&self, peer: &SocketAddr, odcid: &[u8], out: &mut [u8; MAX_TOKEN_LEN]) -> usize {
        self.mint_at(now_ms(), peer, odcid, out)
    }

    fn mint_at(&self, issued_at: u64, peer: &SocketAddr, odcid: &[u8], out: &mut [u8; MAX_TOKEN_LEN]) -> usize {
        let odcid = &odcid[..odcid.len().min(20)];
        out[..8].copy_from_slice(&issued_at.to_be_bytes());
        out[8] = odcid.len() as u8;
        out[9..9 + odcid.len()].copy_from_slice(odcid);
        let end = 9 + odcid.len();
        out[end..end + MAC_LEN].copy_from_slice(&self.mac(issued_at, peer, odcid));
        end + MAC_LEN
    }

    /// The original DCID carried by a valid token from `peer`, or `None`.
    pub fn validate<'t>(&self, peer: &SocketAddr, token: &'t [u8]) -> Option<&'t [u8]> {
        self.validate_at(now_ms(), peer, token)
    }

    fn validate_at<'t>(&self, now: u64, peer: &SocketAddr, token: &'t [u8]) -> Option<&'t [u8]> {
        let issued_at = u64::from_be_bytes(token.get(..8)?.try_into().ok()?);
        let odcid_len = *token.get(8)? as usize;
        if odcid_len > 20 || token.len() != 9 + odcid_len + MAC_LEN {
            return None;
        }
        let odcid = &token[9..9 + odcid_len];
        let age = now.checked_sub(issued_at)?;
        if age > TOKEN_LIFETIME.as_millis() as u64 {
            return None;
        }
        let expected = self.mac(issued_at, peer, odcid);
        // Constant-time compare: the MAC must not leak through timing.
        let diff = expected.iter().zip(&token[9 + odcid_len..]).fold(0u8, |d, (a, b)| d | (a ^ b));
        (diff == 0).then_some(odcid)
    }
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn valid_token_round_trips_and_binds_address_and_time() {
        let key = RetryKey::random();
        let peer: SocketAddr = "192.0.2.1:5000".parse().unwrap();
        let mut buf = [0u8; MAX_TOKEN_LEN];
        let n = key.mint_at(1_000, &peer, b"odcid-123", &mut buf);
        assert_eq!(key.validate_at(1_500, &peer, &buf[..n]), Some(&b"odcid-123"[..]));
        assert_eq!(key.validate_at(1_500, &"192.0.2.1:5001".parse().unwrap(), &buf[..n]), None);
        assert_eq!(key.validate_at(1_000 + 10_001, &peer, &buf[..n]), None, "expired");
        assert_eq!(key.validate_at(999, &peer, &buf[..n]), None, "from the future");
        assert_eq!(RetryKey::random().validate_at(1_500, &peer, &buf[..n]), None, "other key");
        buf[n - 1] ^= 1;
        assert_eq!(key.validate_at(1_500, &peer, &buf[..n]), None, "tampered");
    }

    proptest! {
        #[test]
        fn garbage_never_validates(token in proptest::collection::vec(any::<u8>(), 0..64)) {
            let key = RetryKey::random();
            prop_assert_eq!(key.validate(&"[2001:db8::1]:1".parse().unwrap(), &token), None);
        }
    }
}
