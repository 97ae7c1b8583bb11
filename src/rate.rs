//! The per-connection message rate limit: a token bucket.
//!
//! A connection may send `burst` messages at once and `rate` per second
//! sustained. A message over that is refused (the client gets
//! `rate_limited` and the message is dropped). Refusals fill a second
//! bucket of the same size that drains at the same rate: a client that
//! slows down when told is only throttled, one that keeps flooding
//! (another `burst` refusals faster than they drain) is closed.

use std::time::Instant;

/// What to do with one client message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Within the rate: handle it.
    Allow,
    /// Over the rate: drop it and say so.
    Refuse,
    /// Over the rate and ignoring the refusals: close the connection.
    Close,
}

/// One connection's token bucket.
#[derive(Debug, Clone)]
pub struct RateLimiter {
    rate: f64,
    burst: f64,
    tokens: f64,
    strikes: f64,
    last: Instant,
}

impl RateLimiter {
    /// A full bucket: `burst` messages at once, `rate` per second.
    pub fn new(rate: u32, burst: u32, now: Instant) -> Self {
        Self {
            rate: f64::from(rate),
            burst: f64::from(burst),
            tokens: f64::from(burst),
            strikes: 0.0,
            last: now,
        }
    }

    /// Counts one message arriving at `now`.
    pub fn check(&mut self, now: Instant) -> Verdict {
        let refill = now.saturating_duration_since(self.last).as_secs_f64() * self.rate;
        self.last = now;
        self.tokens = (self.tokens + refill).min(self.burst);
        self.strikes = (self.strikes - refill).max(0.0);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Verdict::Allow
        } else {
            self.strikes += 1.0;
            if self.strikes > self.burst {
                Verdict::Close
            } else {
                Verdict::Refuse
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn a_burst_passes_then_the_rate_holds() {
        let t0 = Instant::now();
        let mut bucket = RateLimiter::new(10, 5, t0);
        for _ in 0..5 {
            assert_eq!(bucket.check(t0), Verdict::Allow);
        }
        assert_eq!(bucket.check(t0), Verdict::Refuse);
        // 100 ms at 10/s: one more token.
        let t1 = t0 + Duration::from_millis(100);
        assert_eq!(bucket.check(t1), Verdict::Allow);
        assert_eq!(bucket.check(t1), Verdict::Refuse);
    }

    #[test]
    fn a_flood_is_closed_and_a_slightly_fast_client_is_not() {
        let t0 = Instant::now();
        let mut flood = RateLimiter::new(20, 50, t0);
        let verdicts: Vec<Verdict> = (0..200).map(|_| flood.check(t0)).collect();
        assert_eq!(
            verdicts.iter().filter(|v| **v == Verdict::Allow).count(),
            50
        );
        assert_eq!(verdicts[99], Verdict::Refuse, "50 refusals are tolerated");
        assert_eq!(verdicts[100], Verdict::Close);

        // 25 messages a second against a rate of 20: throttled for ever,
        // never closed.
        let mut steady = RateLimiter::new(20, 50, t0);
        let mut closed = false;
        for i in 0..(25 * 60) {
            let now = t0 + Duration::from_millis(40 * i);
            closed |= steady.check(now) == Verdict::Close;
        }
        assert!(!closed);
    }
}
