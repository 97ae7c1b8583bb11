//! What every task of a run counts while it runs: shared atomics for the
//! progress line, an HDR histogram of connect latencies and errors by kind,
//! each kind with its first occurrence said in full (which tab or observer,
//! what the gateway said, in which [`Step`]), so a report names what went
//! wrong and not only how often. Tasks lock a mutex only for one record;
//! nothing here blocks on I/O.
//!
//! Histograms cross process boundaries (`--procs`) as [`HistogramData`]:
//! the raw `(value, count)` pairs, which merge exactly.

use std::{
    collections::BTreeMap,
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::Duration,
};

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use crate::{clock::RunClock, step::Step};

/// Highest latency the histograms hold, in microseconds (a minute).
const MAX_LATENCY_US: u64 = 60_000_000;

/// Counters and samples shared by the tasks of one run.
#[derive(Debug)]
pub struct Shared {
    /// Tabs that got their `welcome`.
    pub connects: AtomicU64,
    /// Tabs closed by this tool (Close sent).
    pub closes: AtomicU64,
    /// Tabs open right now.
    pub open: AtomicU64,
    /// Presence and room events the observers received.
    pub events: AtomicU64,
    /// Errors of any kind.
    pub error_count: AtomicU64,
    /// The run's clock.
    pub clock: RunClock,
    connect_latency: Mutex<Histogram<u64>>,
    errors: Mutex<BTreeMap<String, u64>>,
    /// The first error of each kind, said in full.
    first_errors: Mutex<BTreeMap<String, String>>,
    /// The step the run is in, as this process knows it.
    step: Mutex<Step>,
}

impl Default for Shared {
    fn default() -> Self {
        Self::new(RunClock::start())
    }
}

impl Shared {
    /// Counters of a run timed by `clock`.
    pub fn new(clock: RunClock) -> Self {
        Self {
            clock,
            connects: AtomicU64::new(0),
            closes: AtomicU64::new(0),
            open: AtomicU64::new(0),
            events: AtomicU64::new(0),
            error_count: AtomicU64::new(0),
            connect_latency: Mutex::new(new_histogram()),
            errors: Mutex::new(BTreeMap::new()),
            first_errors: Mutex::new(BTreeMap::new()),
            step: Mutex::new(Step::Setup),
        }
    }

    /// A tab got its `welcome` `took` after the connect began.
    pub fn connected(&self, took: Duration) {
        self.connects.fetch_add(1, Relaxed);
        self.open.fetch_add(1, Relaxed);
        record(&self.connect_latency, took);
    }

    /// The run is now in `step` (for the errors it meets from now on).
    pub fn set_step(&self, step: Step) {
        *self.step.lock().unwrap_or_else(|e| e.into_inner()) = step;
    }

    /// One error of `kind` (a short stable label such as `connect`);
    /// `what` says it in full ("tab 1 of lt…u7 on ws://… was closed by the
    /// gateway with 4008 slow consumer"), and is kept, with the step, when
    /// it is the first of its kind.
    pub fn error(&self, kind: &str, what: impl FnOnce() -> String) {
        if self.count_error(kind) {
            let step = *self.step.lock().unwrap_or_else(|e| e.into_inner());
            self.keep_first(kind, format!("{} during {step}", what()));
        }
    }

    /// One error of `kind` found when checking after the fact (so no step
    /// of its own); `what` says it in full, with its moment.
    pub fn error_found(&self, kind: &str, what: impl FnOnce() -> String) {
        if self.count_error(kind) {
            self.keep_first(kind, what());
        }
    }

    /// Counts one error of `kind`; whether it is the first of its kind.
    fn count_error(&self, kind: &str) -> bool {
        self.error_count.fetch_add(1, Relaxed);
        // unwrap: no code panics while holding this lock.
        let mut errors = self.errors.lock().unwrap();
        let n = errors.entry(kind.to_owned()).or_default();
        *n += 1;
        *n == 1
    }

    fn keep_first(&self, kind: &str, said: String) {
        // unwrap: no code panics while holding this lock.
        let mut firsts = self.first_errors.lock().unwrap();
        firsts.entry(kind.to_owned()).or_insert(said);
    }

    /// Connect latencies so far.
    pub fn connect_latency(&self) -> HistogramData {
        // unwrap: no code panics while holding this lock.
        HistogramData::of(&self.connect_latency.lock().unwrap())
    }

    /// Errors so far, by kind.
    pub fn errors(&self) -> BTreeMap<String, u64> {
        // unwrap: no code panics while holding this lock.
        self.errors.lock().unwrap().clone()
    }

    /// The first error of each kind so far, said in full.
    pub fn first_errors(&self) -> BTreeMap<String, String> {
        // unwrap: no code panics while holding this lock.
        self.first_errors.lock().unwrap().clone()
    }

    /// The counters the progress line shows.
    pub fn progress(&self) -> Progress {
        Progress {
            open: self.open.load(Relaxed),
            connects: self.connects.load(Relaxed),
            closes: self.closes.load(Relaxed),
            events: self.events.load(Relaxed),
            errors: self.error_count.load(Relaxed),
        }
    }
}

/// The progress line's counters, of one process or summed.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct Progress {
    /// Tabs open.
    pub open: u64,
    /// Tabs welcomed.
    pub connects: u64,
    /// Tabs closed.
    pub closes: u64,
    /// Events received (observers, and members in `fanout`).
    pub events: u64,
    /// Errors.
    pub errors: u64,
}

impl Progress {
    /// Adds `other` to these counters.
    pub fn add(&mut self, other: &Progress) {
        self.open += other.open;
        self.connects += other.connects;
        self.closes += other.closes;
        self.events += other.events;
        self.errors += other.errors;
    }

    /// The progress line's text.
    pub fn line(&self) -> String {
        format!(
            "open {} | connects {} | closes {} | events {} | errors {}",
            self.open, self.connects, self.closes, self.events, self.errors
        )
    }
}

/// A latency histogram as data: its `(microseconds, count)` pairs, which
/// serialize compactly and merge exactly across processes.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct HistogramData(pub Vec<(u64, u64)>);

impl HistogramData {
    /// The recorded values of `h`.
    pub fn of(h: &Histogram<u64>) -> Self {
        Self(
            h.iter_recorded()
                .map(|v| (v.value_iterated_to(), v.count_at_value()))
                .collect(),
        )
    }

    /// Adds these values to `h`.
    pub fn add_to(&self, h: &mut Histogram<u64>) {
        for &(value, count) in &self.0 {
            // unwrap: the values came from a histogram with the same bounds.
            h.record_n(value.clamp(1, MAX_LATENCY_US), count).unwrap();
        }
    }

    /// A histogram holding the values of every part.
    pub fn merge<'a>(parts: impl IntoIterator<Item = &'a HistogramData>) -> Histogram<u64> {
        let mut h = new_histogram();
        for p in parts {
            p.add_to(&mut h);
        }
        h
    }
}

/// An empty latency histogram in microseconds, 3 significant digits.
pub fn new_histogram() -> Histogram<u64> {
    // unwrap: constant, valid bounds.
    Histogram::new_with_bounds(1, MAX_LATENCY_US, 3).unwrap()
}

fn record(h: &Mutex<Histogram<u64>>, took: Duration) {
    let us = (took.as_micros() as u64).clamp(1, MAX_LATENCY_US);
    // unwrap: no code panics while holding this lock; `us` is in bounds.
    h.lock().unwrap().record(us).unwrap();
}

/// Percentiles of a latency histogram, in microseconds.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Latency {
    /// Samples.
    pub n: u64,
    /// Median.
    pub p50_us: u64,
    /// 99th percentile.
    pub p99_us: u64,
    /// Largest.
    pub max_us: u64,
}

impl Latency {
    /// Summarizes `h`.
    pub fn of(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return Self::default();
        }
        Self {
            n: h.len(),
            p50_us: h.value_at_quantile(0.5),
            p99_us: h.value_at_quantile(0.99),
            max_us: h.max(),
        }
    }

    /// Records `took` into `h`, clamped into the histogram's range.
    pub fn record(h: &mut Histogram<u64>, took: Duration) {
        Self::record_us(h, took.as_micros() as u64);
    }

    /// Records `us` microseconds into `h`, clamped into its range.
    pub fn record_us(h: &mut Histogram<u64>, us: u64) {
        // unwrap: the value is clamped within the histogram's bounds.
        h.record(us.clamp(1, MAX_LATENCY_US)).unwrap();
    }
}

/// Event latencies by kind of event.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct KindLatencies {
    /// Action → `online`.
    pub online: Latency,
    /// Action → `offline`.
    pub offline: Latency,
    /// Action → `joined`.
    pub joined: Latency,
    /// Action → `left`.
    pub left: Latency,
}

/// One histogram per kind of event, while they fill.
#[derive(Debug)]
pub struct KindHistograms {
    /// `online`, `offline`, `joined`, `left`, in that order.
    pub kinds: [Histogram<u64>; 4],
}

impl Default for KindHistograms {
    fn default() -> Self {
        Self {
            kinds: std::array::from_fn(|_| new_histogram()),
        }
    }
}

/// The kinds of event, in [`KindHistograms`] order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    /// A user's first tab opened.
    Online = 0,
    /// A user's last tab closed.
    Offline = 1,
    /// A user's first tab joined the room.
    Joined = 2,
    /// A user's last tab in the room left it or closed.
    Left = 3,
}

impl EventKind {
    /// The kind of a presence (`room` false) or room event to `to`.
    pub fn of(room: bool, to: bool) -> Self {
        match (room, to) {
            (false, true) => Self::Online,
            (false, false) => Self::Offline,
            (true, true) => Self::Joined,
            (true, false) => Self::Left,
        }
    }
}

impl KindHistograms {
    /// Records `us` for an event of `kind`.
    pub fn record(&mut self, kind: EventKind, us: u64) {
        Latency::record_us(&mut self.kinds[kind as usize], us);
    }

    /// As data, per kind.
    pub fn data(&self) -> [HistogramData; 4] {
        std::array::from_fn(|i| HistogramData::of(&self.kinds[i]))
    }

    /// Adds per-kind data.
    pub fn add(&mut self, data: &[HistogramData; 4]) {
        for (h, d) in self.kinds.iter_mut().zip(data) {
            d.add_to(h);
        }
    }

    /// The percentiles of each kind.
    pub fn latencies(&self) -> KindLatencies {
        KindLatencies {
            online: Latency::of(&self.kinds[0]),
            offline: Latency::of(&self.kinds[1]),
            joined: Latency::of(&self.kinds[2]),
            left: Latency::of(&self.kinds[3]),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::options::Scenario;

    #[test]
    fn the_first_error_of_each_kind_is_kept_with_its_step() {
        let shared = Shared::default();
        shared.error("close_timeout", || "tab 0 of a got no Close reply".into());
        shared.set_step(Step::Actions(Scenario::Churn));
        shared.error("close_timeout", || unreachable!("only the first is said"));
        shared.error("connect", || "tab 1 of b could not connect".into());
        shared.error_found("event_without_cause", || {
            "observer o got online seq 3".into()
        });
        assert_eq!(shared.errors()["close_timeout"], 2);
        let firsts: Vec<_> = shared.first_errors().into_values().collect();
        assert_eq!(
            firsts,
            [
                "tab 0 of a got no Close reply during the setup",
                "tab 1 of b could not connect during the churn",
                "observer o got online seq 3",
            ]
        );
    }
}
