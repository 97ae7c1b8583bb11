//! Log lines that survive an attack: a line per event, up to a few a
//! second per kind, and a count of the rest.
//!
//! Some events are logged one line each (a refused handshake with its
//! code). A client can cause them as fast as it can send, so without a
//! bound a flood of bad handshakes becomes a flood of log lines: disk,
//! log shipping and the operator's attention pay for the attacker's
//! requests. A [`LogLimiter`] lets each kind (a `&'static str`, such as the
//! refusal code) log [`LINES_BURST`] lines at once and [`LINES_PER_SECOND`]
//! sustained, the token bucket of [`crate::rate`], and counts what it holds
//! back. Exact counts stay in the metrics; the log keeps examples and the
//! size of what it left out.
//!
//! The counts are written by one named loop, [`summarize`], every
//! `--log-summary-ms`: "1234 handshakes refused with invalid_token in the
//! last 10 s (not logged one by one)". One loop for every kind, not a task
//! per kind; and not lazily at a kind's next event either, because an
//! attack that stops would then never have its last count written. The
//! loop writes nothing while nothing is held back, and writes a last time
//! when it stops, after the drain, so no count is lost.

use std::{
    fmt::Write as _,
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant},
};

use tokio::sync::oneshot;
use tracing::info;

use crate::rate::{RateLimiter, Verdict};

/// Lines one kind may log per second, sustained.
pub const LINES_PER_SECOND: u32 = 5;

/// Lines one kind may log at once.
pub const LINES_BURST: u32 = 5;

/// Decides which events of a family get a line of their own, and counts
/// the others for [`summarize`].
#[derive(Debug)]
pub struct LogLimiter {
    /// The family, plural, as the summary says it: "handshakes refused".
    what: &'static str,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    /// When the counts were last written (or started).
    since: Instant,
    /// Every kind seen so far: a handful of codes, so a list.
    kinds: Vec<Kind>,
}

#[derive(Debug)]
struct Kind {
    key: &'static str,
    bucket: RateLimiter,
    held_back: u64,
}

impl LogLimiter {
    /// A limiter for the family `what` (plural: "handshakes refused").
    pub fn new(what: &'static str, now: Instant) -> Self {
        Self {
            what,
            state: Mutex::new(State {
                since: now,
                kinds: Vec::new(),
            }),
        }
    }

    /// Whether this event of `kind`, at `now`, gets its own line; if not,
    /// it is counted for the next summary.
    pub fn admit(&self, kind: &'static str, now: Instant) -> bool {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let index = match state.kinds.iter().position(|k| k.key == kind) {
            Some(index) => index,
            None => {
                state.kinds.push(Kind {
                    key: kind,
                    bucket: RateLimiter::new(LINES_PER_SECOND, LINES_BURST, now),
                    held_back: 0,
                });
                state.kinds.len() - 1
            }
        };
        let kind = &mut state.kinds[index];
        // A refusal or a "close" of the bucket both mean: over the rate.
        if kind.bucket.check(now) == Verdict::Allow {
            true
        } else {
            kind.held_back += 1;
            false
        }
    }

    /// One summary line per kind with events held back since the last
    /// call, and starts counting again.
    pub fn take_summaries(&self, now: Instant) -> Vec<String> {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let period = period(now.saturating_duration_since(state.since));
        state.since = now;
        state
            .kinds
            .iter_mut()
            .filter(|kind| kind.held_back > 0)
            .map(|kind| {
                let count = std::mem::take(&mut kind.held_back);
                format!(
                    "{count} {} with {} in the last {period} (not logged one by one)",
                    self.what, kind.key
                )
            })
            .collect()
    }
}

/// "10 s", "500 ms": a summary's period, as people say it.
fn period(elapsed: Duration) -> String {
    let mut text = String::new();
    if elapsed >= Duration::from_secs(1) {
        let _ = write!(text, "{} s", elapsed.as_secs_f64().round());
    } else {
        let _ = write!(text, "{} ms", elapsed.as_millis());
    }
    text
}

/// The log summary loop: every `every`, logs what `limiter` held back;
/// on `stop` (or when its sender is dropped), logs it a last time and
/// returns.
pub async fn summarize(limiter: Arc<LogLimiter>, every: Duration, mut stop: oneshot::Receiver<()>) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The first tick is immediate: nothing is held back yet.
    tick.tick().await;
    loop {
        let last = tokio::select! {
            _ = tick.tick() => false,
            _ = &mut stop => true,
        };
        for line in limiter.take_summaries(Instant::now()) {
            info!("{line}");
        }
        if last {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn a_flood_logs_its_burst_then_five_lines_a_second() {
        let t0 = Instant::now();
        let limiter = LogLimiter::new("handshakes refused", t0);
        // 1,000 events a second for 3 s.
        let logged = (0..3000)
            .filter(|i| limiter.admit("invalid_token", t0 + MS * *i))
            .count();
        // The burst of 5, then 5 a second (the bucket refills during the
        // 3 s): 5 + 15, give or take the one in flight.
        assert!((19..=21).contains(&logged), "{logged} lines");
        let summaries = limiter.take_summaries(t0 + MS * 3000);
        assert_eq!(
            summaries,
            [format!(
                "{} handshakes refused with invalid_token in the last 3 s (not logged one by one)",
                3000 - logged
            )]
        );
        // Counted once: the next summary has nothing to say.
        assert!(limiter.take_summaries(t0 + MS * 4000).is_empty());
    }

    #[test]
    fn each_kind_has_its_own_lines_and_its_own_count() {
        let t0 = Instant::now();
        let limiter = LogLimiter::new("handshakes refused", t0);
        for _ in 0..100 {
            limiter.admit("invalid_token", t0);
        }
        // One kind flooding does not silence another.
        assert!(limiter.admit("node_full", t0));
        let summaries = limiter.take_summaries(t0 + MS * 500);
        assert_eq!(
            summaries,
            ["95 handshakes refused with invalid_token in the last 500 ms (not logged one by one)"]
        );
    }

    #[test]
    fn a_kind_within_the_rate_is_never_held_back() {
        let t0 = Instant::now();
        let limiter = LogLimiter::new("handshakes refused", t0);
        // 4 a second for a minute.
        assert!((0..240).all(|i| limiter.admit("missing_token", t0 + MS * 250 * i)));
        assert!(limiter.take_summaries(t0 + MS * 60_000).is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn the_loop_writes_a_last_time_when_stopped() {
        let limiter = Arc::new(LogLimiter::new("handshakes refused", Instant::now()));
        let (stop, stopped) = oneshot::channel();
        let summary = tokio::spawn(summarize(limiter.clone(), Duration::from_secs(10), stopped));
        for _ in 0..10 {
            limiter.admit("invalid_token", Instant::now());
        }
        stop.send(()).unwrap();
        // Returns at once (paused time would let a missed stop hang here
        // only until the test's own timeout).
        tokio::time::timeout(Duration::from_secs(1), summary)
            .await
            .expect("the loop stops when told")
            .unwrap();
        assert!(
            limiter.take_summaries(Instant::now()).is_empty(),
            "it took the count"
        );
    }
}
