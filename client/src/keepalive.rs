//! Keeps a quiche connection (and the NAT mappings on its path) alive: a PING whenever
//! nothing was sent for `interval`, folded into the connection's own timer.

use std::time::{Duration, Instant};

pub struct KeepAlive {
    interval: Duration,
    last_send: Instant,
}

impl KeepAlive {
    pub fn new(interval: Duration) -> Self {
        KeepAlive { interval, last_send: Instant::now() }
    }

    pub fn set_interval(&mut self, interval: Duration) {
        self.interval = interval;
    }

    /// Something left on this connection.
    pub fn sent(&mut self, now: Instant) {
        self.last_send = now;
    }

    /// When the connection next needs attention: its QUIC timer or the keep-alive.
    pub fn timeout(&self, conn: &quiche::Connection, now: Instant) -> Option<Duration> {
        let keepalive =
            conn.is_established().then(|| self.interval.saturating_sub(now.saturating_duration_since(self.last_send)));
        match (conn.timeout(), keepalive) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Runs due QUIC timers (quiche checks its own deadlines, so calling early is harmless)
    /// and queues a PING when the line has been quiet.
    pub fn on_timeout(&self, conn: &mut quiche::Connection, now: Instant) {
        conn.on_timeout();
        if conn.is_established() && now.saturating_duration_since(self.last_send) >= self.interval {
            let _ = conn.send_ack_eliciting();
        }
    }
}
