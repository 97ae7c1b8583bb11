//! What every task of a run counts while it runs: shared atomics for the
//! progress line, an HDR histogram of connect latencies and errors by kind.
//! Tasks lock a mutex only for one record; nothing here blocks on I/O.

use std::{
    collections::BTreeMap,
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::Duration,
};

use hdrhistogram::Histogram;
use serde::Serialize;

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
    connect_latency: Mutex<Histogram<u64>>,
    errors: Mutex<BTreeMap<String, u64>>,
}

impl Default for Shared {
    fn default() -> Self {
        Self {
            connects: AtomicU64::new(0),
            closes: AtomicU64::new(0),
            open: AtomicU64::new(0),
            events: AtomicU64::new(0),
            error_count: AtomicU64::new(0),
            connect_latency: Mutex::new(new_histogram()),
            errors: Mutex::new(BTreeMap::new()),
        }
    }
}

impl Shared {
    /// A tab got its `welcome` `took` after the connect began.
    pub fn connected(&self, took: Duration) {
        self.connects.fetch_add(1, Relaxed);
        self.open.fetch_add(1, Relaxed);
        record(&self.connect_latency, took);
    }

    /// One error of `kind` (a short stable label such as `connect`).
    pub fn error(&self, kind: &str) {
        self.error_count.fetch_add(1, Relaxed);
        // unwrap: no code panics while holding this lock.
        *self
            .errors
            .lock()
            .unwrap()
            .entry(kind.to_owned())
            .or_default() += 1;
    }

    /// Connect latencies so far.
    pub fn connect_latency(&self) -> Latency {
        // unwrap: no code panics while holding this lock.
        Latency::of(&self.connect_latency.lock().unwrap())
    }

    /// Errors so far, by kind.
    pub fn errors(&self) -> BTreeMap<String, u64> {
        // unwrap: no code panics while holding this lock.
        self.errors.lock().unwrap().clone()
    }

    /// The progress line's text.
    pub fn progress(&self) -> String {
        format!(
            "open {} | connects {} | closes {} | events {} | errors {}",
            self.open.load(Relaxed),
            self.connects.load(Relaxed),
            self.closes.load(Relaxed),
            self.events.load(Relaxed),
            self.error_count.load(Relaxed),
        )
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
        let us = (took.as_micros() as u64).clamp(1, MAX_LATENCY_US);
        // unwrap: `us` is within the histogram's bounds.
        h.record(us).unwrap();
    }
}
