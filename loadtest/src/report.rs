//! The result of a run: one serializable struct, printed as a table for
//! people or as JSON (`--json`) for scripts.

use std::{collections::BTreeMap, fmt::Write as _};

use serde::Serialize;

use crate::{
    cursor::{StateChecks, UpdateTally},
    observer::Comparison,
    options::Scenario,
    stats::{KindLatencies, Latency},
    target::ProcessSample,
    truth::EventChecks,
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
    /// Processes the tabs ran in (`--procs`).
    pub procs: usize,
    /// Actions a second used (0 = unpaced).
    pub rate: f64,
    /// `--duration`.
    pub duration_s: f64,
    /// Wall time of the whole run, checks included.
    pub elapsed_s: f64,
    /// Tabs welcomed.
    pub connects: u64,
    /// Tabs welcomed per second of the opens (storm, hold, before a
    /// fanout) or of the churn.
    pub connects_per_s: f64,
    /// Tabs closed by the tool (each one a connect+disconnect cycle).
    pub closes: u64,
    /// Tabs open when the action phase ended.
    pub open_tabs_held: u64,
    /// Connect started → `welcome` received.
    pub connect_latency: Latency,
    /// `storm`, `hold`: first connect → every tab welcomed and the
    /// slowest observer saw the last `online`, in seconds (when every
    /// observer settled).
    pub all_online_s: Option<f64>,
    /// Tabs opened / `all_online_s`.
    pub tabs_per_s_until_all_online: Option<f64>,
    /// Action (connect started, Close sent, `join`/`leave` sent) → the
    /// event at an observer, per kind.
    pub event_latency: KindLatencies,
    /// The same, for events whose action was on another node than the
    /// observer's.
    pub event_latency_cross_node: KindLatencies,
    /// `churn`: the latencies of the final close of every tab, kept out
    /// of the two above, which then cover the steady churn only.
    pub event_latency_close_all: KindLatencies,
    /// Presence and room events the observers received.
    pub events: u64,
    /// Presence event checks, summed over observers (must be 0).
    pub presence: EventChecks,
    /// Room event checks at the observers, exact (must be 0).
    pub room: EventChecks,
    /// Frames at observers of a kind they check that fit nothing of the
    /// run (a reply no request waits for, an event about another run's
    /// user), or that are no frame at all.
    pub unexpected_frames: u64,
    /// Frames at observers of types the tool does not check (a newer
    /// gateway's events), by type: ignored, and counted only to show.
    pub ignored_frames: BTreeMap<String, u64>,
    /// `sync` frames at observers.
    pub syncs: u64,
    /// `--offline-grace-ms`: the gateways' grace, as the tool was told.
    pub offline_grace_ms: u64,
    /// What the observers' presence events said against the truth, past
    /// their order (must be 0).
    pub offline_checks: OfflineChecks,
    /// `churn --reload-ms`: the reloads and the flaps observers saw.
    pub reload: Option<ReloadReport>,
    /// `nodeloss`: the kill, the returns and the offlines after them.
    pub nodeloss: Option<NodelossReport>,
    /// `fanout`'s member checks and fan-out figures.
    pub fanout: Option<FanoutReport>,
    /// `cursors`' state checks and delivery figures.
    pub cursors: Option<CursorsReport>,
    /// The comparisons with the gateway: after the actions (`held`) and
    /// after closing every tab (`closed`).
    pub checks: Vec<Comparison>,
    /// Errors by kind.
    pub errors: BTreeMap<String, u64>,
    /// The first error of each kind, said in full: which tab or observer,
    /// what the gateway said (close code and reason), in which step.
    pub first_errors: BTreeMap<String, String>,
    /// The gateways' processes.
    pub gateway: GatewayReport,
    /// The cluster's Redis transactions (`--redis`).
    pub redis: Option<RedisReport>,
}

/// The observers' presence events against the truth, past their order
/// (summed over observers; each must be 0).
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct OfflineChecks {
    /// Presence events whose `seq` is no true transition of the user's
    /// (an `offline`/`online` of a user who came back within the grace).
    pub unexplained: u64,
    /// `offline`s that arrived before the grace after their close ran out.
    pub early: u64,
    /// `offline`s whose `last_seen` lies outside their close's interval
    /// (Close sent → arrival less the grace, ± 5 ms of clock).
    pub last_seen_mismatches: u64,
    /// `offline`s whose `reason` is not the close's (`closed`; `node_lost`
    /// for a killed node's tabs).
    pub reason_mismatches: u64,
}

impl OfflineChecks {
    /// Whether nothing went wrong.
    pub fn clean(&self) -> bool {
        self.unexplained == 0
            && self.early == 0
            && self.last_seen_mismatches == 0
            && self.reason_mismatches == 0
    }
}

/// `churn --reload-ms`: reloads, and the flaps the observers saw.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct ReloadReport {
    /// `--reload-ms`.
    pub reload_ms: u64,
    /// Reloads done (a tab closed with 1001 and its slot re-opened).
    pub reloads: u64,
    /// Of those, reloads of the user's last open tab.
    pub reloads_of_last_tab: u64,
    /// Reloads of the user's last tab in its room.
    pub reloads_of_last_room_tab: u64,
    /// Reloads for which an observer saw the user's `offline` followed by
    /// its `online` (0 when the grace is longer than the reload; without a
    /// grace, every reload of a last tab).
    pub flaps: u64,
    /// Reloads for which an observer saw `left` followed by `joined`.
    pub room_flaps: u64,
}

/// A distribution of durations, in ms.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Distribution {
    /// Values.
    pub n: u64,
    /// Median.
    pub p50_ms: f64,
    /// 90th percentile.
    pub p90_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// Largest.
    pub max_ms: f64,
}

impl Distribution {
    /// The distribution of `us` (µs values), nearest-rank percentiles.
    pub fn of(mut us: Vec<u64>) -> Self {
        us.sort_unstable();
        let at = |q: f64| {
            let i = ((q * us.len() as f64).ceil() as usize).clamp(1, us.len().max(1)) - 1;
            us.get(i).map_or(0.0, |v| *v as f64 / 1000.0)
        };
        Self {
            n: us.len() as u64,
            p50_ms: at(0.5),
            p90_ms: at(0.9),
            p99_ms: at(0.99),
            max_ms: us.last().map_or(0.0, |v| *v as f64 / 1000.0),
        }
    }
}

/// `nodeloss`: what the observers saw of the killed node's users.
#[derive(Debug, Clone, Default, Serialize)]
pub struct NodelossReport {
    /// `--kill-target`.
    pub kill_target: usize,
    /// Users whose tab was on the killed node.
    pub lost_users: u64,
    /// Of those, users whose tab came back on a surviving node.
    pub returned_users: u64,
    /// Kill → the last returning tab welcomed, in seconds.
    pub returns_s: f64,
    /// `offline`s (and `left`s) observers got, after the kill, of users
    /// who came back (must be 0 with a grace longer than the returns).
    pub returned_offlines: u64,
    /// The same, `left`s.
    pub returned_lefts: u64,
    /// `offline`s observers got, after the kill, of users who did not
    /// come back: exactly one per user and observer.
    pub gone_offlines: u64,
    /// What `gone_offlines` must be: users who did not come back ×
    /// observers.
    pub gone_offlines_expected: u64,
    /// Kill → each `offline` of a user who did not come back at an
    /// observer: about lease + reaper tick + grace.
    pub time_to_offline: Distribution,
}

/// `MULTI`/`EXEC` transactions the cluster's Redis ran (`INFO
/// commandstats`, `cmdstat_exec`).
#[derive(Debug, Clone, Serialize)]
pub struct RedisReport {
    /// Before the first tab.
    pub transactions_before: u64,
    /// After the opens (or the churn), once every observer saw every
    /// transition.
    pub transactions_held: u64,
    /// After every tab closed.
    pub transactions_after: u64,
    /// (held − before) × 1,000 / tabs opened: what 1,000 connects cost.
    pub per_1000_connects: Option<f64>,
}

impl Report {
    /// Whether every check passed: no missed, duplicated or out-of-order
    /// event, observers settled, and the gateway agreed with the truth.
    pub fn correct(&self) -> bool {
        self.presence.clean()
            && self.room.clean()
            && self.offline_checks.clean()
            && self.nodeloss.as_ref().is_none_or(|n| {
                n.returned_offlines == 0
                    && n.returned_lefts == 0
                    && n.gone_offlines == n.gone_offlines_expected
            })
            && self
                .fanout
                .as_ref()
                .is_none_or(|f| f.member.clean() && f.snapshot_mismatches == 0 && f.members_settled)
            && self.cursors.as_ref().is_none_or(CursorsReport::clean)
            && self.checks.iter().all(|c| {
                c.observers_settled
                    && c.presence_mismatches == 0
                    && c.room_mismatches == 0
                    && c.state_mismatches == 0
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
            "presenced-load {}: {} users x {} tabs on {} target(s) from {} process(es), {} rooms of {}, {} observer(s), rate {}, {:.1} s",
            self.scenario.name(),
            self.users,
            self.tabs,
            self.targets.len(),
            self.procs,
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
        let mut rows: Vec<(&str, String)> = vec![
            (
                "connects",
                format!(
                    "{} ({:.0}/s), closes {}, open at end of actions {}",
                    self.connects, self.connects_per_s, self.closes, self.open_tabs_held
                ),
            ),
            ("connect latency", lat(&self.connect_latency)),
        ];
        if let (Some(s), Some(r)) = (self.all_online_s, self.tabs_per_s_until_all_online) {
            rows.push((
                "all online at observers",
                format!("after {s:.2} s ({r:.0} tabs/s)"),
            ));
        }
        let kinds = |k: &KindLatencies| {
            [
                ("online", k.online),
                ("offline", k.offline),
                ("joined", k.joined),
                ("left", k.left),
            ]
        };
        for (kind, l) in kinds(&self.event_latency) {
            if l.n > 0 {
                rows.push((kind_row(kind, false), lat(&l)));
            }
        }
        for (kind, l) in kinds(&self.event_latency_cross_node) {
            if l.n > 0 {
                rows.push((kind_row(kind, true), lat(&l)));
            }
        }
        for (kind, l) in kinds(&self.event_latency_close_all) {
            if l.n > 0 {
                rows.push((close_all_row(kind), lat(&l)));
            }
        }
        let ignored = if self.ignored_frames.is_empty() {
            String::new()
        } else {
            let by_type: Vec<String> = self
                .ignored_frames
                .iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect();
            format!(", ignored {}", by_type.join(", "))
        };
        rows.extend([
            (
                "events at observers",
                format!(
                    "{} (unexpected frames {}, syncs {}{ignored})",
                    self.events, self.unexpected_frames, self.syncs
                ),
            ),
            ("presence events", checks(&self.presence)),
            ("room events", checks(&self.room)),
            (
                "offline checks",
                format!(
                    "grace {} ms: unexplained {}  early {}  last_seen off {}  reason off {}",
                    self.offline_grace_ms,
                    self.offline_checks.unexplained,
                    self.offline_checks.early,
                    self.offline_checks.last_seen_mismatches,
                    self.offline_checks.reason_mismatches
                ),
            ),
        ]);
        if let Some(r) = &self.reload {
            rows.push((
                "reloads",
                format!(
                    "{} after {} ms ({} of a last tab, {} of a last room tab): flaps {}  room flaps {}",
                    r.reloads,
                    r.reload_ms,
                    r.reloads_of_last_tab,
                    r.reloads_of_last_room_tab,
                    r.flaps,
                    r.room_flaps
                ),
            ));
        }
        if let Some(n) = &self.nodeloss {
            let d = &n.time_to_offline;
            rows.extend([
                (
                    "node loss",
                    format!(
                        "target {} killed: {} users on it, {} came back within {:.2} s",
                        n.kill_target, n.lost_users, n.returned_users, n.returns_s
                    ),
                ),
                (
                    "  came back",
                    format!(
                        "offlines {}  lefts {} (must be 0)",
                        n.returned_offlines, n.returned_lefts
                    ),
                ),
                (
                    "  gone",
                    format!(
                        "offlines {} of {}; kill -> offline p50 {:.0} ms  p90 {:.0} ms  p99 {:.0} ms  max {:.0} ms",
                        n.gone_offlines,
                        n.gone_offlines_expected,
                        d.p50_ms,
                        d.p90_ms,
                        d.p99_ms,
                        d.max_ms
                    ),
                ),
            ]);
        }
        if let Some(f) = &self.fanout {
            rows.extend([
                (
                    "fanout actions",
                    format!(
                        "{} leaves+joins in {:.1} s, {} joined/left transitions, {} member windows",
                        f.room_actions, f.actions_s, f.transitions, f.windows
                    ),
                ),
                (
                    "fanout delivered",
                    format!(
                        "{:.0} events/s to members, {:.0} events/s to observers ({} member events)",
                        f.member_events_per_s, f.observer_room_events_per_s, f.member_events
                    ),
                ),
                ("member joined latency", lat(&f.member_latency_joined)),
                ("member left latency", lat(&f.member_latency_left)),
                (
                    "member events",
                    format!(
                        "{}  snapshot mismatches {}  settled {}",
                        checks(&f.member),
                        f.snapshot_mismatches,
                        f.members_settled
                    ),
                ),
            ]);
        }
        if let Some(c) = &self.cursors {
            rows.extend(c.rows(&lat));
        }
        for (k, v) in rows {
            let _ = writeln!(s, "  {k:<24} {v}");
        }
        for c in &self.checks {
            let _ = writeln!(
                s,
                "  {:<24} observers settled {}  online {}  gateway mismatches: presence {} room {} state {}",
                format!("check ({})", c.phase),
                c.observers_settled,
                c.users_online,
                c.presence_mismatches,
                c.room_mismatches,
                c.state_mismatches
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
        for (kind, said) in &self.first_errors {
            let _ = writeln!(s, "  {:<24} first {kind}: {said}", "");
        }
        for t in &self.gateway.targets {
            let f = |p: &Option<ProcessSample>| match p {
                Some(p) => format!(
                    "rss {:.1} MiB cpu {:.2} s fds {}",
                    p.rss_bytes / 1048576.0,
                    p.proc_cpu_seconds.unwrap_or(p.cpu_seconds),
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
            "  {:<24} {} per tab held, {} CPU per connect+disconnect cycle, {} CPU in all (all targets)",
            "gateway cost",
            opt(self.gateway.kib_per_tab, "KiB"),
            opt(self.gateway.cpu_us_per_cycle, "µs"),
            self.gateway
                .cpu_seconds
                .map_or("n/a".to_owned(), |v| format!("{v:.2} s"))
        );
        if let Some(r) = &self.redis {
            let _ = writeln!(
                s,
                "  {:<24} {} during the opens ({} per 1,000 connects), {} in all",
                "redis MULTI/EXEC",
                r.transactions_held - r.transactions_before,
                r.per_1000_connects
                    .map_or("n/a".to_owned(), |v| format!("{v:.1}")),
                r.transactions_after - r.transactions_before
            );
        }
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

/// The table row of a latency kind.
fn kind_row(kind: &str, cross: bool) -> &'static str {
    match (kind, cross) {
        ("online", false) => "online latency",
        ("offline", false) => "offline latency",
        ("joined", false) => "joined latency",
        ("left", false) => "left latency",
        ("online", true) => "  cross-node online",
        ("offline", true) => "  cross-node offline",
        ("joined", true) => "  cross-node joined",
        _ => "  cross-node left",
    }
}

/// `fanout`'s results, summed over processes.
#[derive(Debug, Clone, Serialize)]
pub struct FanoutReport {
    /// Rooms.
    pub rooms: usize,
    /// Seconds of leaves and joins.
    pub actions_s: f64,
    /// Leaves and joins done.
    pub room_actions: u64,
    /// `joined`/`left` transitions they caused.
    pub transitions: u64,
    /// Member windows (stays of a tab in its room) checked.
    pub windows: u64,
    /// Room events the member tabs received.
    pub member_events: u64,
    /// Room events delivered to members per second of the leaves and joins
    /// (the fan-out rate).
    pub member_events_per_s: f64,
    /// The same at the observers (each in every room).
    pub observer_room_events_per_s: f64,
    /// Member checks: missed, duplicated, out of order (must be 0).
    pub member: EventChecks,
    /// Join snapshots that fit no moment of the join (must be 0).
    pub snapshot_mismatches: u64,
    /// Whether every member's view reached the truth in time.
    pub members_settled: bool,
    /// `leave`/`join` sent → `joined` at each member.
    pub member_latency_joined: Latency,
    /// `leave` sent → `left` at each member.
    pub member_latency_left: Latency,
}

/// `cursors`' results, summed over processes.
#[derive(Debug, Clone, Serialize)]
pub struct CursorsReport {
    /// Rooms.
    pub rooms: usize,
    /// Members per room (one tab each).
    pub room_size: usize,
    /// `update` frames a second per member (`--rate`).
    pub rate_per_member: f64,
    /// Seconds from the first `update` sent to the last.
    pub moves_s: f64,
    /// The `update` frames sent and what their replies said: `written`,
    /// `superseded`, `refused` (an error frame), `unanswered`.
    pub updates: UpdateTally,
    /// `updated` frames members received (each a newer state of another
    /// member).
    pub deliveries: u64,
    /// Of those, the ones that arrived during the moves, per second of
    /// them.
    pub deliveries_per_s: f64,
    /// `updated` frames the observers received (each in every room).
    pub observer_deliveries: u64,
    /// `update` sent → its `updated` at each member (matched by `n`).
    pub latency: Latency,
    /// What the members' `updated` frames showed: duplicated, out of
    /// order, to the sender, unreadable (each must be 0).
    pub member: StateChecks,
    /// (member, other member) pairs where the member does not end with
    /// the other's last state (must be 0).
    pub unconverged: u64,
    /// Whether every member held every last state within the step
    /// timeout.
    pub members_settled: bool,
    /// The same checks at the observers, summed.
    pub observer: StateChecks,
    /// (observer, member) pairs where the observer does not end with the
    /// member's last state (must be 0).
    pub observer_unconverged: u64,
    /// Tabs the gateway closed (`closed_by_server_*`, e.g. 4029 rate
    /// limited, 4008 slow consumer; must be 0).
    pub closed_by_server: u64,
    /// Σ gateway CPU seconds (from `/proc`) from before the opens to the
    /// end of the members' checks.
    pub gateway_cpu_s: Option<f64>,
    /// That, in µs, per `updated` delivered (to members and observers).
    pub cpu_us_per_delivery: Option<f64>,
    /// Redis commands (`total_commands_processed`) over the same span,
    /// with `--redis`.
    pub redis_commands: Option<u64>,
    /// Those per second of the moves.
    pub redis_commands_per_s: Option<f64>,
}

impl CursorsReport {
    /// Whether every state check passed and no tab or update was refused.
    pub fn clean(&self) -> bool {
        self.updates.refused == 0
            && self.updates.unanswered == 0
            && self.member.clean()
            && self.observer.clean()
            && self.unconverged == 0
            && self.observer_unconverged == 0
            && self.members_settled
            && self.closed_by_server == 0
    }

    fn rows(&self, lat: &dyn Fn(&Latency) -> String) -> Vec<(&'static str, String)> {
        let u = &self.updates;
        let checks = |c: &StateChecks| {
            format!(
                "duplicated {}  out of order {}  to sender {}  unreadable {}",
                c.duplicated, c.out_of_order, c.to_sender, c.unreadable
            )
        };
        let opt =
            |v: Option<f64>, unit: &str| v.map_or("n/a".to_owned(), |v| format!("{v:.1}{unit}"));
        vec![
            (
                "cursor updates",
                format!(
                    "{} rooms of {} at {}/s each for {:.1} s: sent {}  written {}  superseded {}  refused {}  unanswered {}",
                    self.rooms,
                    self.room_size,
                    self.rate_per_member,
                    self.moves_s,
                    u.sent,
                    u.written,
                    u.superseded,
                    u.refused,
                    u.unanswered
                ),
            ),
            (
                "updated delivered",
                format!(
                    "{} to members ({:.0}/s during the moves), {} to observers",
                    self.deliveries, self.deliveries_per_s, self.observer_deliveries
                ),
            ),
            ("updated latency", lat(&self.latency)),
            (
                "member states",
                format!(
                    "{}  unconverged {}  settled {}",
                    checks(&self.member),
                    self.unconverged,
                    self.members_settled
                ),
            ),
            (
                "observer states",
                format!(
                    "{}  unconverged {}",
                    checks(&self.observer),
                    self.observer_unconverged
                ),
            ),
            (
                "cursor cost",
                format!(
                    "closed by gateway {}; gateway CPU {} ({} per delivery); redis {} commands/s",
                    self.closed_by_server,
                    opt(self.gateway_cpu_s, " s"),
                    opt(self.cpu_us_per_delivery, " µs"),
                    opt(self.redis_commands_per_s, "")
                ),
            ),
        ]
    }
}

/// One gateway process's samples.
#[derive(Debug, Clone, Serialize)]
pub struct TargetReport {
    /// `HOST:PORT`.
    pub target: String,
    /// Its pid, when it runs on this machine (CPU from /proc).
    pub pid: Option<u32>,
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
    /// observers' events and the checks. From /proc (10 ms resolution)
    /// when every gateway's pid is known; else from
    /// `process_cpu_seconds_total`, which counts whole seconds, and `None`
    /// below one second of difference.
    pub cpu_us_per_cycle: Option<f64>,
    /// Σ gateway CPU seconds from before the first tab to after the last
    /// close, from /proc when every pid is known.
    pub cpu_seconds: Option<f64>,
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
        let proc_before = sum(&|t| t.before.and_then(|p| p.proc_cpu_seconds));
        let proc_after = sum(&|t| t.after.and_then(|p| p.proc_cpu_seconds));
        let metrics_before = sum(&|t| t.before.map(|p| p.cpu_seconds));
        let metrics_after = sum(&|t| t.after.map(|p| p.cpu_seconds));
        let kib_per_tab = match (rss_before, rss_held) {
            (Some(b), Some(h)) if tabs_held > 0 => Some((h - b) / 1024.0 / tabs_held as f64),
            _ => None,
        };
        let cpu_seconds = proc_after.zip(proc_before).map(|(a, b)| a - b);
        let cpu_us_per_cycle = match (cpu_seconds, metrics_before, metrics_after) {
            (Some(d), ..) if cycles > 0 && d > 0.0 => Some(d * 1e6 / cycles as f64),
            // The gateway exports whole CPU seconds: below one second of
            // difference the figure would be noise (usually 0).
            (None, Some(b), Some(a)) if cycles > 0 && a - b >= 1.0 => {
                Some((a - b) * 1e6 / cycles as f64)
            }
            _ => None,
        };
        Self {
            targets,
            kib_per_tab,
            cpu_us_per_cycle,
            cpu_seconds,
        }
    }
}

fn close_all_row(kind: &str) -> &'static str {
    match kind {
        "online" => "close-all online",
        "offline" => "close-all offline",
        "joined" => "close-all joined",
        _ => "close-all left",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cursors() -> CursorsReport {
        CursorsReport {
            rooms: 1,
            room_size: 2,
            rate_per_member: 30.0,
            moves_s: 1.0,
            updates: UpdateTally {
                sent: 30,
                written: 10,
                superseded: 20,
                ..Default::default()
            },
            deliveries: 10,
            deliveries_per_s: 10.0,
            observer_deliveries: 10,
            latency: Latency::default(),
            member: StateChecks::default(),
            unconverged: 0,
            members_settled: true,
            observer: StateChecks::default(),
            observer_unconverged: 0,
            closed_by_server: 0,
            gateway_cpu_s: None,
            cpu_us_per_delivery: None,
            redis_commands: None,
            redis_commands_per_s: None,
        }
    }

    #[test]
    fn a_cursors_run_is_clean_only_with_every_last_state_and_nothing_refused() {
        assert!(cursors().clean());
        let spoiled: [fn(&mut CursorsReport); 5] = [
            |c| c.unconverged = 1,
            |c| c.observer_unconverged = 1,
            |c| c.updates.refused = 1,
            |c| c.closed_by_server = 1,
            |c| c.member.to_sender = 1,
        ];
        for spoil in spoiled {
            let mut c = cursors();
            spoil(&mut c);
            assert!(!c.clean(), "{c:?}");
        }
    }
}
