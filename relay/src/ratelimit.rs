//! Per-source-IP token buckets for new handshakes. Each worker keeps its own table (no
//! locks), so the effective limit per IP is the configured rate on each worker a client's
//! connections hash to. The table is bounded: idle full buckets are swept.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Instant;

struct Bucket {
    tokens: f64,
    updated: Instant,
    /// Set while the source is on the XDP blocklist.
    blocked_until: Option<Instant>,
}

pub struct HandshakeLimiter {
    rate: f64,
    burst: f64,
    buckets: HashMap<IpAddr, Bucket>,
    max_entries: usize,
    /// Sources whose block ran out since the last [`HandshakeLimiter::take_unblocked`].
    unblocked: Vec<IpAddr>,
}

impl HandshakeLimiter {
    pub fn new(rate_per_sec: f64, burst: f64) -> Self {
        HandshakeLimiter { rate: rate_per_sec, burst, buckets: HashMap::new(), max_entries: 65_536, unblocked: Vec::new() }
    }

    /// Takes one token for `ip`; false when the IP is over its limit.
    pub fn allow(&mut self, ip: IpAddr, now: Instant) -> bool {
        if self.buckets.len() >= self.max_entries && !self.buckets.contains_key(&ip) {
            self.sweep(now);
            if self.buckets.len() >= self.max_entries {
                // Table full of active sources: refuse newcomers rather than grow without bound.
                return false;
            }
        }
        let (rate, burst) = (self.rate, self.burst);
        let b = self.buckets.entry(ip).or_insert(Bucket { tokens: burst, updated: now, blocked_until: None });
        let elapsed = now.saturating_duration_since(b.updated).as_secs_f64();
        b.tokens = (b.tokens + elapsed * rate).min(burst);
        b.updated = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Marks `ip` (just refused) as blocked for `duration`. Returns the end of the block
    /// when it is new, `None` when the source is blocked already (nothing to tell XDP).
    pub fn block(&mut self, ip: IpAddr, now: Instant, duration: std::time::Duration) -> Option<Instant> {
        let b = self.buckets.get_mut(&ip)?;
        if b.blocked_until.is_some_and(|t| t > now) {
            return None;
        }
        let until = now + duration;
        b.blocked_until = Some(until);
        Some(until)
    }

    /// Forgets buckets that have refilled completely (they behave like new ones), and ends
    /// blocks that ran out.
    pub fn sweep(&mut self, now: Instant) {
        let (rate, burst) = (self.rate, self.burst);
        let unblocked = &mut self.unblocked;
        self.buckets.retain(|ip, b| {
            if b.blocked_until.is_some_and(|t| t <= now) {
                b.blocked_until = None;
                unblocked.push(*ip);
            }
            b.blocked_until.is_some() || b.tokens + now.saturating_duration_since(b.updated).as_secs_f64() * rate < burst
        });
    }

    /// Sources whose block ended (to be removed from the kernel's blocklist).
    pub fn take_unblocked(&mut self) -> impl Iterator<Item = IpAddr> + '_ {
        self.unblocked.drain(..)
    }

    pub fn tracked(&self) -> usize {
        self.buckets.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn burst_then_refill_per_ip() {
        let mut l = HandshakeLimiter::new(10.0, 3.0);
        let t0 = Instant::now();
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "2001:db8::1".parse().unwrap();
        assert!((0..3).all(|_| l.allow(a, t0)));
        assert!(!l.allow(a, t0), "burst spent");
        assert!(l.allow(b, t0), "other IPs unaffected");
        assert!(l.allow(a, t0 + Duration::from_millis(100)), "one token after 100 ms at 10/s");
        assert!(!l.allow(a, t0 + Duration::from_millis(100)));
        l.sweep(t0 + Duration::from_secs(10));
        assert_eq!(l.tracked(), 0);
    }

    #[test]
    fn blocks_once_until_they_run_out() {
        let mut l = HandshakeLimiter::new(1.0, 1.0);
        let t0 = Instant::now();
        let a: IpAddr = "198.51.100.9".parse().unwrap();
        assert!(l.allow(a, t0));
        assert!(!l.allow(a, t0));
        let until = l.block(a, t0, Duration::from_secs(10)).expect("a new block");
        assert_eq!(until, t0 + Duration::from_secs(10));
        assert_eq!(l.block(a, t0 + Duration::from_secs(1), Duration::from_secs(10)), None, "already blocked");
        l.sweep(t0 + Duration::from_secs(5));
        assert_eq!(l.take_unblocked().count(), 0);
        l.sweep(t0 + Duration::from_secs(11));
        assert_eq!(l.take_unblocked().collect::<Vec<_>>(), vec![a]);
    }
}
