//! Per-source-IP token buckets for new handshakes, shared by every worker, so the limit the
//! configuration names holds for the relay as a whole: a client's Initials are spread over
//! the workers by their (random) DCIDs, and a bucket per worker would grant workers × burst.
//!
//! The table is split into shards, each behind its own mutex, picked by a keyed hash of the
//! source. A shard is locked once per handshake attempt that passed Retry (never per data
//! packet), for a few hundred nanoseconds, and two workers meet on one only when their
//! sources hash alike. Steering each source's handshakes to one worker would need no lock,
//! but it would pin every client behind one NAT address, and their sessions, to one core.
//! The table is bounded: idle full buckets are swept.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::net::IpAddr;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Shards of the shared table; a power of two well above any worker count.
const SHARDS: usize = 64;
/// Sources tracked at most, over all shards.
const MAX_SOURCES: usize = 65_536;

/// The relay-wide handshake limiter.
pub struct HandshakeLimiter {
    shards: Box<[Mutex<Buckets>]>,
    /// Keyed, so nobody can choose sources that crowd one shard.
    hasher: RandomState,
}

impl HandshakeLimiter {
    pub fn new(rate_per_sec: f64, burst: f64) -> Self {
        let shards = (0..SHARDS).map(|_| Mutex::new(Buckets::new(rate_per_sec, burst, MAX_SOURCES / SHARDS))).collect();
        HandshakeLimiter { shards, hasher: RandomState::new() }
    }

    fn shard(&self, ip: IpAddr) -> MutexGuard<'_, Buckets> {
        let i = self.hasher.hash_one(ip) as usize % SHARDS;
        // A poisoned shard only means a panic elsewhere; its buckets are still whole.
        self.shards[i].lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes one token for `ip`; false when the IP is over its limit.
    pub fn allow(&self, ip: IpAddr, now: Instant) -> bool {
        self.shard(ip).allow(ip, now)
    }

    /// Marks `ip` (just refused) as blocked for `duration`. Returns the end of the block
    /// when it is new, `None` when the source is blocked already (nothing to tell XDP).
    pub fn block(&self, ip: IpAddr, now: Instant, duration: Duration) -> Option<Instant> {
        self.shard(ip).block(ip, now, duration)
    }

    /// Forgets buckets that have refilled completely and ends blocks that ran out, in every
    /// shard; `unblocked` gets the sources whose block ended (to be removed from the
    /// kernel's blocklist). Any worker may sweep: each ended block is reported once.
    pub fn sweep(&self, now: Instant, unblocked: &mut Vec<IpAddr>) {
        for shard in self.shards.iter() {
            shard.lock().unwrap_or_else(|e| e.into_inner()).sweep(now, unblocked);
        }
    }

    pub fn tracked(&self) -> usize {
        self.shards.iter().map(|s| s.lock().unwrap_or_else(|e| e.into_inner()).buckets.len()).sum()
    }
}

struct Bucket {
    tokens: f64,
    updated: Instant,
    /// Set while the source is on the XDP blocklist.
    blocked_until: Option<Instant>,
}

/// One shard's buckets.
struct Buckets {
    rate: f64,
    burst: f64,
    buckets: HashMap<IpAddr, Bucket>,
    max_entries: usize,
}

impl Buckets {
    fn new(rate: f64, burst: f64, max_entries: usize) -> Self {
        Buckets { rate, burst, buckets: HashMap::new(), max_entries }
    }

    fn allow(&mut self, ip: IpAddr, now: Instant) -> bool {
        if self.buckets.len() >= self.max_entries && !self.buckets.contains_key(&ip) {
            self.sweep(now, &mut Vec::new());
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

    fn block(&mut self, ip: IpAddr, now: Instant, duration: Duration) -> Option<Instant> {
        let b = self.buckets.get_mut(&ip)?;
        if b.blocked_until.is_some_and(|t| t > now) {
            return None;
        }
        let until = now + duration;
        b.blocked_until = Some(until);
        Some(until)
    }

    fn sweep(&mut self, now: Instant, unblocked: &mut Vec<IpAddr>) {
        let (rate, burst) = (self.rate, self.burst);
        self.buckets.retain(|ip, b| {
            if b.blocked_until.is_some_and(|t| t <= now) {
                b.blocked_until = None;
                unblocked.push(*ip);
            }
            b.blocked_until.is_some() || b.tokens + now.saturating_duration_since(b.updated).as_secs_f64() * rate < burst
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_refill_per_ip() {
        let l = HandshakeLimiter::new(10.0, 3.0);
        let t0 = Instant::now();
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "2001:db8::1".parse().unwrap();
        assert!((0..3).all(|_| l.allow(a, t0)));
        assert!(!l.allow(a, t0), "burst spent");
        assert!(l.allow(b, t0), "other IPs unaffected");
        assert!(l.allow(a, t0 + Duration::from_millis(100)), "one token after 100 ms at 10/s");
        assert!(!l.allow(a, t0 + Duration::from_millis(100)));
        l.sweep(t0 + Duration::from_secs(10), &mut Vec::new());
        assert_eq!(l.tracked(), 0);
    }

    #[test]
    fn blocks_once_until_they_run_out() {
        let l = HandshakeLimiter::new(1.0, 1.0);
        let t0 = Instant::now();
        let a: IpAddr = "198.51.100.9".parse().unwrap();
        assert!(l.allow(a, t0));
        assert!(!l.allow(a, t0));
        let until = l.block(a, t0, Duration::from_secs(10)).expect("a new block");
        assert_eq!(until, t0 + Duration::from_secs(10));
        assert_eq!(l.block(a, t0 + Duration::from_secs(1), Duration::from_secs(10)), None, "already blocked");
        let mut unblocked = Vec::new();
        l.sweep(t0 + Duration::from_secs(5), &mut unblocked);
        assert!(unblocked.is_empty());
        l.sweep(t0 + Duration::from_secs(11), &mut unblocked);
        assert_eq!(unblocked, vec![a]);
        l.sweep(t0 + Duration::from_secs(12), &mut unblocked);
        assert_eq!(unblocked, vec![a], "an ended block is reported once");
    }

    /// The point of sharing: workers on other threads draw from the same bucket, so a
    /// source gets the configured burst from the relay as a whole.
    #[test]
    fn one_budget_across_threads() {
        let l = std::sync::Arc::new(HandshakeLimiter::new(0.001, 5.0));
        let t0 = Instant::now();
        let a: IpAddr = "203.0.113.7".parse().unwrap();
        let granted: usize = (0..4)
            .map(|_| {
                let l = l.clone();
                std::thread::spawn(move || (0..10).filter(|_| l.allow(a, t0)).count())
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|t| t.join().unwrap())
            .sum();
        assert_eq!(granted, 5);
    }
}
