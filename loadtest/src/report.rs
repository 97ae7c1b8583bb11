//! The result of a run: one serializable struct, printed as a table for
//! people or as JSON (`--json`) for scripts.

use std::{collections::BTreeMap, fmt::Write as _};

use serde::Serialize;

use crate::{
    observer::{Comparison, EventChecks},
    options::Scenario,
    stats::Latency,
    target::ProcessSample,
};

/// Everything a run measured and checked.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The scenario run.
    pub scenario: Scenario,
    /// `--targets`.
    pub targets: Vec<String>,
    /// `--users`.
    pub users: usize,
    /// `--tabs`.
    pub tabs: usize,
    /// `--rooms`.
    pub rooms: usize,
    /// `--room-size`.
    pub room_size: usize,
    /// `--observers`.
    pub observers: usize,
    /// Actions a second used (0 = unpaced).
    pub rate: f64,
    /// `--duration`.
    pub duration_s: f64,
    /// Wall time of the whole run, checks included.
    pub elapsed_s: f64,
    /// Tabs welcomed.
    pub connects: u64,
    /// Tabs welcomed per second of the action phase (opens for storm and
    /// hold, the churn itself for churn).
    pub connects_per_s: f64,
    /// Tabs closed by the tool (each one a connect+disconnect cycle).
    pub closes: u64,
    /// Tabs open when the action phase ended.
    pub open_tabs_held: u64,
    /// Connect started → `welcome` received.
    pub connect_latency: Latency,
    /// Action (connect started / Close sent) → `online`/`offline` at an
    /// observer.
    pub presence_event_latency: Latency,
    /// Action (`join` sent / Close sent) → `joined`/`left` at an observer.
    pub room_event_latency: Latency,
    /// Presence and room events the observers received.
    pub events: u64,
    /// Presence event checks, summed over observers (must be 0).
    pub presence: EventChecks,
    /// Room event checks, summed over observers (must be 0).
    pub room: EventChecks,
    /// Frames at observers that are neither replies nor events of the run.
    pub unexpected_frames: u64,
    /// `sync` frames at observers.
    pub syncs: u64,
    /// The comparisons with the gateway: after the actions (`held`) and
    /// after closing every tab (`closed`).
    pub checks: Vec<Comparison>,
    /// Errors by kind.
    pub errors: BTreeMap<String, u64>,
    /// The gateways' processes.
    pub gateway: GatewayReport,
}

impl Report {
    /// Whether every check passed: no missed, duplicated or out-of-order
    /// event, observers settled, and the gateway agreed with the truth.
    pub fn correct(&self) -> bool {
        self.presence.clean()
            && self.room.clean()
            && self.checks.iter().all(|c| {
                c.observers_settled && c.presence_mismatches == 0 && c.room_mismatches == 0
            })
    }

    /// The human summary.
    pub fn table(&self) -> String {
        let mut s = String::new();
        let ms = |us: u64| format!("{:.1}", us as f64 / 1000.0);
        let lat = |l: &Latency| {
            if l.n == 0 {
                "none".to_owned()
            } else {
                format!(
                    "p50 {} ms  p99 {} ms  max {} ms  (n={})",
                    ms(l.p50_us),
                    ms(l.p99_us),
                    ms(l.max_us),
                    l.n
                )
            }
        };
        let checks = |c: &EventChecks| {
            format!(
                "missed {}  duplicated {}  out of order {}",
                c.missed, c.duplicated, c.out_of_order
            )
        };
        let _ = writeln!(
            s,
            "presenced-load {:?}: {} users x {} tabs on {} target(s), {} rooms of {}, {} observer(s), rate {}, {:.1} s",
            self.scenario,
            self.users,
            self.tabs,
            self.targets.len(),
            self.rooms,
            self.room_size,
            self.observers,
            if self.rate > 0.0 {
                format!("{}/s", self.rate)
            } else {
                "unpaced".into()
            },
            self.elapsed_s
        );
        let rows: Vec<(&str, String)> = vec![
            (
                "connects",
                format!(
                    "{} ({:.0}/s), closes {}, open at end of actions {}",
                    self.connects, self.connects_per_s, self.closes, self.open_tabs_held
                ),
            ),
            ("connect latency", lat(&self.connect_latency)),
            ("presence event latency", lat(&self.presence_event_latency)),
            ("room event latency", lat(&self.room_event_latency)),
            (
                "events at observers",
                format!(
                    "{} (unexpected frames {}, syncs {})",
                    self.events, self.unexpected_frames, self.syncs
                ),
            ),
            ("presence events", checks(&self.presence)),
            ("room events", checks(&self.room)),
        ];
        for (k, v) in rows {
            let _ = writeln!(s, "  {k:<24} {v}");
        }
        for c in &self.checks {
            let _ = writeln!(
                s,
                "  {:<24} observers settled {}  online {}  gateway mismatches: presence {} room {}",
                format!("check ({})", c.phase),
                c.observers_settled,
                c.users_online,
                c.presence_mismatches,
                c.room_mismatches
            );
        }
        let errors = if self.errors.is_empty() {
            "none".to_owned()
        } else {
            self.errors
                .iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let _ = writeln!(s, "  {:<24} {errors}", "errors");
        for t in &self.gateway.targets {
            let f = |p: &Option<ProcessSample>| match p {
                Some(p) => format!(
                    "rss {:.1} MiB cpu {:.2} s fds {}",
                    p.rss_bytes / 1048576.0,
                    p.cpu_seconds,
                    p.open_fds
                ),
                None => "n/a".into(),
            };
            let _ = writeln!(
                s,
                "  {:<24} before: {}  held: {}  after: {}",
                format!("gateway {}", t.target),
                f(&t.before),
                f(&t.held),
                f(&t.after)
            );
        }
        let opt =
            |v: Option<f64>, unit: &str| v.map_or("n/a".to_owned(), |v| format!("{v:.1} {unit}"));
        let _ = writeln!(
            s,
            "  {:<24} {} per tab held, {} CPU per connect+disconnect cycle (all targets)",
            "gateway cost",
            opt(self.gateway.kib_per_tab, "KiB"),
            opt(self.gateway.cpu_us_per_cycle, "µs")
        );
        let _ = writeln!(
            s,
            "  {:<24} {}",
            "result",
            if self.correct() {
                "CORRECT"
            } else {
                "INCORRECT"
            }
        );
        s
    }
}

/// One gateway process's samples.
#[derive(Debug, Clone, Serialize)]
pub struct TargetReport {
    /// `HOST:PORT`.
    pub target: String,
    /// Before any tab opened.
    pub before: Option<ProcessSample>,
    /// With the tabs held (end of the action phase, or of the hold).
    pub held: Option<ProcessSample>,
    /// After every tab closed.
    pub after: Option<ProcessSample>,
}

/// The gateways' resources, and what they cost per tab and per cycle.
#[derive(Debug, Clone, Serialize)]
pub struct GatewayReport {
    /// Per process.
    pub targets: Vec<TargetReport>,
    /// (Σ held RSS − Σ before RSS) / tabs held, in KiB.
    pub kib_per_tab: Option<f64>,
    /// (Σ after CPU − Σ before CPU) / cycles, in µs; includes the
    /// observers' events and the checks. `None` below one CPU second of
    /// difference: `process_cpu_seconds_total` counts whole seconds.
    pub cpu_us_per_cycle: Option<f64>,
}

impl GatewayReport {
    /// Derives the per-tab and per-cycle figures; `None` when a sample is
    /// missing or there is nothing to divide by.
    pub fn new(targets: Vec<TargetReport>, tabs_held: u64, cycles: u64) -> Self {
        let sum = |f: &dyn Fn(&TargetReport) -> Option<f64>| -> Option<f64> {
            targets.iter().map(f).sum::<Option<f64>>()
        };
        let rss_before = sum(&|t| t.before.map(|p| p.rss_bytes));
        let rss_held = sum(&|t| t.held.map(|p| p.rss_bytes));
        let cpu_before = sum(&|t| t.before.map(|p| p.cpu_seconds));
        let cpu_after = sum(&|t| t.after.map(|p| p.cpu_seconds));
        let kib_per_tab = match (rss_before, rss_held) {
            (Some(b), Some(h)) if tabs_held > 0 => Some((h - b) / 1024.0 / tabs_held as f64),
            _ => None,
        };
        let cpu_us_per_cycle = match (cpu_before, cpu_after) {
            // The gateway exports whole CPU seconds: below one second of
            // difference the figure would be noise (usually 0).
            (Some(b), Some(a)) if cycles > 0 && a - b >= 1.0 => Some((a - b) * 1e6 / cycles as f64),
            _ => None,
        };
        Self {
            targets,
            kib_per_tab,
            cpu_us_per_cycle,
        }
    }
}
