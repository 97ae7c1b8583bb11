//! The run's clock: microseconds since the run began, one time base for
//! the coordinator and every worker process, so an action stamped in a
//! worker and an event stamped at an observer in the parent subtract.
//!
//! `Instant` cannot cross a process boundary, so the parent names the run's
//! start as wall-clock time and each process maps it once onto its own
//! monotonic clock. After that every stamp is monotonic; the two clocks
//! are read back to back (well under a microsecond apart), and both run at
//! the rate NTP slews them, so stamps of two processes agree to about a
//! microsecond for the length of a run.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// A moment of the run: microseconds since its start.
pub type Stamp = u64;

/// Hands out [`Stamp`]s.
#[derive(Debug, Clone, Copy)]
pub struct RunClock {
    start: Instant,
    /// The same moment as wall-clock time, nanoseconds since 1970.
    start_unix_ns: u128,
}

impl RunClock {
    /// A clock whose run starts now.
    pub fn start() -> Self {
        let start = Instant::now();
        let start_unix_ns = unix_ns(SystemTime::now());
        Self {
            start,
            start_unix_ns,
        }
    }

    /// The clock of a run that started at `start_unix_ns` (as given by
    /// [`RunClock::start_unix_ns`] in another process).
    pub fn joined(start_unix_ns: u128) -> Self {
        let (now, wall) = (Instant::now(), unix_ns(SystemTime::now()));
        let since = Duration::from_nanos(wall.saturating_sub(start_unix_ns) as u64);
        Self {
            start: now.checked_sub(since).unwrap_or(now),
            start_unix_ns,
        }
    }

    /// The run's start as wall-clock time, for [`RunClock::joined`].
    pub fn start_unix_ns(&self) -> u128 {
        self.start_unix_ns
    }

    /// Now.
    pub fn now(&self) -> Stamp {
        self.stamp(Instant::now())
    }

    /// `at` as a stamp (0 for moments before the run).
    pub fn stamp(&self, at: Instant) -> Stamp {
        at.saturating_duration_since(self.start).as_micros() as Stamp
    }
}

fn unix_ns(t: SystemTime) -> u128 {
    t.duration_since(UNIX_EPOCH).unwrap_or_default().as_nanos()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_joined_clock_agrees_with_its_origin() {
        let origin = RunClock::start();
        std::thread::sleep(Duration::from_millis(20));
        let joined = RunClock::joined(origin.start_unix_ns());
        let (a, b) = (origin.now(), joined.now());
        assert!(a >= 20_000, "{a}");
        assert!(a.abs_diff(b) < 2_000, "origin {a} µs, joined {b} µs");
    }
}
