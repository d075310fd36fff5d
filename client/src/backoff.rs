//! Reconnect delays: exponential from 500 ms, doubling, capped at 30 s, with jitter so a
//! relay restart is not met by every client at the same instant.

use std::time::Duration;

pub const INITIAL: Duration = Duration::from_millis(500);
pub const MAX: Duration = Duration::from_secs(30);

#[derive(Debug, Clone)]
pub struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff { next: INITIAL }
    }
}

impl Backoff {
    /// The delay before the next attempt: the current step with ±20% jitter; the step
    /// then doubles up to the cap.
    pub fn next_delay(&mut self) -> Duration {
        let base = self.next;
        self.next = (self.next * 2).min(MAX);
        let jitter = 0.8 + 0.4 * rand::random::<f64>();
        base.mul_f64(jitter).min(MAX)
    }

    /// After a successful connection the next failure starts from the beginning again.
    pub fn reset(&mut self) {
        self.next = INITIAL;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_from_half_a_second_to_thirty_with_jitter() {
        let mut b = Backoff::default();
        let delays: Vec<Duration> = (0..10).map(|_| b.next_delay()).collect();
        let bases = [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0, 30.0];
        for (d, base) in delays.iter().zip(bases) {
            let s = d.as_secs_f64();
            assert!(s >= base * 0.8 - 1e-9 && s <= (base * 1.2).min(30.0) + 1e-9, "{s} vs {base}");
        }
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(600));
    }
}
