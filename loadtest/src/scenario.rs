//! A run, as the coordinator drives it: observers first, then the shards'
//! action phase, then the checks.
//!
//! Every scenario ends the same way: wait until each observer's view equals
//! the truth the shards report, ask the gateway (`query`, `room` pages) what
//! it believes, close every tab and check again. Observers pump their frames
//! in their own tasks while the shards act, and are taken back for the
//! checks. Once every shard reported its users' true transitions, each
//! observer's events are checked against them (room events exactly, see
//! [`crate::truth`]) and their latencies computed.
//!
//! `nodeloss` has one more step between the two checks: the shard kills a
//! gateway and brings some of its users back elsewhere, and a `lost`
//! check waits (longer: the lease, the reap and the grace) until every
//! observer sees the users who did not come back offline.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use indicatif::{ProgressBar, ProgressDrawTarget};
use tokio::{
    sync::{mpsc, watch},
    task::JoinHandle,
    time::sleep,
};

use crate::{
    clock::{RunClock, Stamp},
    failure::Failure,
    layout::Layout,
    observer::Reason,
    observer::{Comparison, Observer, ObserverError},
    options::{Options, Scenario},
    report::{
        CursorsReport, Distribution, FanoutReport, GatewayReport, NodelossReport, OfflineChecks,
        RedisReport, ReloadReport, Report, TargetReport,
    },
    shard::{
        CursorShard, FanoutShard, Held, Lost, Order, QUIET_WINDOW, ShardFailure, ShardMsg,
        ShardSpec,
    },
    stats::{EventKind, HistogramData, KindHistograms, Latency, Progress, Shared},
    step::Step,
    target::{ProcessSample, Target},
    truth::{CLOCK_TOLERANCE_US, EventChecks, Received, TruthLog, WindowOfUser, check_window},
    worker::{self, ShardHandle},
    ws::STEP_TIMEOUT,
};

/// How often the progress line redraws.
const PROGRESS_INTERVAL: Duration = Duration::from_millis(200);
/// Longest a shard may take to build its users (a worker to start).
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest a shard may stay silent once it runs: it reports progress four
/// times a second while it acts, so this long without a word means it is
/// stuck, not busy.
const SHARD_SILENCE: Duration = Duration::from_secs(30);
/// How often the silence of the shards is looked at while waiting.
const SILENCE_POLL: Duration = Duration::from_secs(1);
/// `nodeloss`: how long the `lost` check waits, past the grace, for the
/// observers to see the users who did not come back offline: the killed
/// node's lease must run out and a survivor's reaper must see it.
const LOSS_SETTLE: Duration = Duration::from_secs(60);

/// The shards, and the latest progress of each.
struct Shards {
    handles: Vec<ShardHandle>,
    progress: Arc<Mutex<Vec<Progress>>>,
    /// Every shard's messages, tagged with its number, in one queue.
    msgs: mpsc::UnboundedReceiver<(usize, ShardMsg)>,
}

impl Shards {
    /// Starts `procs` shards (in this process when 1).
    fn start(
        scenario: Scenario,
        opts: &Options,
        layout: &Layout,
        clock: RunClock,
    ) -> Result<Self, Failure> {
        let mut handles = Vec::with_capacity(layout.shards);
        for shard in 0..layout.shards {
            let spec = ShardSpec {
                scenario,
                opts: opts.clone(),
                shard,
                run: layout.run.clone(),
                clock_start_unix_ns: clock.start_unix_ns(),
            };
            handles.push(if layout.shards == 1 {
                worker::start_local(spec, clock)
            } else {
                worker::start_process(&spec, &opts.worker_command).map_err(|error| {
                    Failure::Shard {
                        shard,
                        step: Step::Setup,
                        error,
                    }
                })?
            });
        }
        let progress = Arc::new(Mutex::new(vec![Progress::default(); handles.len()]));
        // Progress is kept for the progress line and goes on too: it is
        // what shows a shard is alive.
        let (tx, msgs) = mpsc::unbounded_channel();
        for (k, h) in handles.iter_mut().enumerate() {
            let mut from = std::mem::replace(&mut h.msgs, mpsc::unbounded_channel().1);
            let (progress, tx) = (Arc::clone(&progress), tx.clone());
            tokio::spawn(async move {
                while let Some(msg) = from.recv().await {
                    if let ShardMsg::Progress(p) = &msg {
                        progress.lock().unwrap_or_else(|e| e.into_inner())[k] = *p;
                    }
                    if tx.send((k, msg)).is_err() {
                        return;
                    }
                }
                // The shard's channel closed (its task ended); a shard that
                // reported already is not waited for again.
                let _ = tx.send((k, ShardMsg::Failed(ShardFailure::Ended)));
            });
        }
        Ok(Self {
            handles,
            progress,
            msgs,
        })
    }

    fn order(&self, order: Order) {
        for h in &self.handles {
            let _ = h.orders.send(order);
        }
    }

    /// The next `want`ed message of every shard, in shard order; fails as
    /// soon as one shard fails, sends something else, or stays silent for
    /// `silence`.
    async fn next_of_all<T>(
        &mut self,
        step: Step,
        silence: Duration,
        want: impl Fn(ShardMsg) -> Option<T>,
    ) -> Result<Vec<T>, Failure> {
        let n = self.handles.len();
        let mut out: Vec<Option<T>> = (0..n).map(|_| None).collect();
        let mut heard = vec![Instant::now(); n];
        let fail = |shard, error| Failure::Shard { shard, step, error };
        while out.iter().any(Option::is_none) {
            if let Ok(got) = tokio::time::timeout(SILENCE_POLL, self.msgs.recv()).await {
                // The queue closes only after every forwarder passed on
                // its shard's end, which the arms below take; should it
                // close anyway, the first shard still awaited ended.
                let Some((k, msg)) = got else {
                    let k = out.iter().position(Option::is_none).unwrap_or_default();
                    return Err(fail(k, ShardFailure::Ended));
                };
                heard[k] = Instant::now();
                match msg {
                    ShardMsg::Progress(_) => {}
                    ShardMsg::Failed(ShardFailure::Ended) if out[k].is_some() => {}
                    ShardMsg::Failed(e) => return Err(fail(k, e)),
                    msg if out[k].is_none() => match want(msg) {
                        Some(t) => out[k] = Some(t),
                        None => return Err(fail(k, ShardFailure::OutOfTurn)),
                    },
                    _ => return Err(fail(k, ShardFailure::OutOfTurn)),
                }
            }
            let now = Instant::now();
            if let Some(k) = (0..n).find(|&k| out[k].is_none() && now - heard[k] > silence) {
                return Err(fail(k, ShardFailure::Silent(silence.as_secs())));
            }
        }
        Ok(out.into_iter().flatten().collect())
    }
}

/// Runs `scenario` against `opts.targets` and reports; shows a progress
/// line on stderr when `progress` is set. A run that cannot finish (an
/// observer closed by the gateway, a shard that stopped, ...) returns the
/// [`Failure`] instead; a run that finishes returns its report, correct or
/// not.
pub async fn run(scenario: Scenario, opts: &Options, progress: bool) -> Result<Report, Failure> {
    let invalid = |e: anyhow::Error| Failure::Options(format!("{e:#}"));
    opts.validate(scenario).map_err(invalid)?;
    let targets: Vec<Target> = opts
        .targets
        .iter()
        .map(|t| Target::parse(t))
        .collect::<anyhow::Result<_>>()
        .map_err(invalid)?;
    let mut processes: Vec<Target> = Vec::new();
    for t in &targets {
        if !processes.iter().any(|p| p.authority == t.authority) {
            processes.push(t.clone());
        }
    }
    for (i, p) in processes.iter_mut().enumerate() {
        match opts.gateway_pids.get(i) {
            Some(&pid) => p.pid = Some(pid),
            None => p.find_pid(),
        }
    }
    let clock = RunClock::start();
    let layout = Layout::new(scenario, opts);
    let user_names = layout.user_names();
    let shared = Arc::new(Shared::new(clock));

    let mut observers = Vec::with_capacity(opts.observers);
    for j in 0..opts.observers {
        let failed = |error| Failure::Observer {
            index: j,
            step: Step::Setup,
            error,
        };
        // Observers sit on another node than user 0's first tab when there
        // are several, so events cross nodes; never on the node a
        // `nodeloss` kills.
        let mut t = (j + 1) % targets.len();
        if scenario == Scenario::Nodeloss && opts.kill_target == Some(t) {
            t = (t + 1) % targets.len();
        }
        let mut o = Observer::connect(
            (&targets[t], t as u16),
            &layout.observer_name(j),
            &layout.user_prefix(),
            layout.users,
            Arc::clone(&shared),
        )
        .await
        .map_err(failed)?;
        o.watch_all(&user_names).await.map_err(failed)?;
        for room in layout.room_names() {
            o.join(&room).await.map_err(failed)?;
        }
        observers.push(o);
    }

    let mut shards = Shards::start(scenario, opts, &layout, clock)?;
    let (_, observers_back) = with_observers(
        observers,
        Step::Setup,
        shards.next_of_all(Step::Setup, READY_TIMEOUT, |m| {
            matches!(m, ShardMsg::Ready).then_some(())
        }),
    )
    .await?;
    observers = observers_back;

    let bar = progress.then(|| spinner(scenario, &shared, &shards.progress));
    let before = sample_all(&processes).await;
    let redis_before = redis_sample(opts, Step::Setup).await?;
    let commands_before = redis_commands(scenario, opts, Step::Setup).await?;
    let started = clock.now();
    let started_at = Instant::now();

    // The action phase.
    shards.order(Order::Go);
    let actions = Step::Actions(scenario);
    shared.set_step(actions);
    let (helds, observers_back) = with_observers(
        observers,
        actions,
        shards.next_of_all(actions, SHARD_SILENCE, |m| match m {
            ShardMsg::Held(h) => Some(*h),
            _ => None,
        }),
    )
    .await?;
    let mut observers = observers_back;
    let mut online = vec![false; layout.users];
    let mut in_room = vec![false; layout.users];
    for h in &helds {
        for &(u, on, room) in &h.users {
            online[u] = on;
            in_room[u] = room;
        }
    }

    let held_sample = sample_all(&processes).await;
    let commands_held = redis_commands(scenario, opts, Step::HeldCheck).await?;
    // `cursors`: each member's last state sent, by user.
    let mut finals = vec![0; layout.users];
    for c in helds.iter().filter_map(|h| h.cursors.as_ref()) {
        for &(u, n) in &c.finals {
            finals[u] = n;
        }
    }
    let held = (Step::HeldCheck, "held");
    shared.set_step(Step::HeldCheck);
    let mut checks = vec![
        check(
            held,
            &mut observers,
            (&online, &in_room),
            (scenario == Scenario::Cursors).then_some(&finals[..]),
            &layout,
            STEP_TIMEOUT,
        )
        .await?,
    ];
    // Every observer saw every transition: the store wrote them all.
    let redis_held = redis_sample(opts, Step::HeldCheck).await?;
    if scenario == Scenario::Hold {
        let hold = Duration::from_secs_f64(opts.duration);
        shared.set_step(Step::Hold);
        // Nothing but progress is due from the shards while they hold:
        // anything else (a worker's end, its silence) fails the hold now
        // rather than at the close.
        let shard_failure = shards.next_of_all(Step::Hold, SHARD_SILENCE, |_| None::<()>);
        observers = with_observers(observers, Step::Hold, async {
            tokio::select! {
                () = sleep(hold) => Ok(()),
                failed = shard_failure => failed.map(drop),
            }
        })
        .await?
        .1;
    }
    let held_late = sample_all(&processes).await;
    let mut lost: Vec<Lost> = Vec::new();
    if scenario == Scenario::Nodeloss {
        shards.order(Order::Lose);
        shared.set_step(Step::Loss);
        let (losts, observers_back) = with_observers(
            observers,
            Step::Loss,
            shards.next_of_all(Step::Loss, SHARD_SILENCE, |m| match m {
                ShardMsg::Lost(l) => Some(*l),
                _ => None,
            }),
        )
        .await?;
        observers = observers_back;
        for l in &losts {
            for &(u, on, room) in &l.users {
                online[u] = on;
                in_room[u] = room;
            }
        }
        shared.set_step(Step::LostCheck);
        let within = STEP_TIMEOUT + LOSS_SETTLE + Duration::from_millis(opts.offline_grace_ms);
        let phase = (Step::LostCheck, "lost");
        let truth = (&online[..], &in_room[..]);
        checks.push(check(phase, &mut observers, truth, None, &layout, within).await?);
        lost = losts;
    }

    let closes_from = clock.now();
    shards.order(Order::Close);
    shared.set_step(Step::CloseAll);
    let (reports, observers_back) = with_observers(
        observers,
        Step::CloseAll,
        shards.next_of_all(Step::CloseAll, SHARD_SILENCE, |m| match m {
            ShardMsg::Done(r) => Some(*r),
            _ => None,
        }),
    )
    .await?;
    observers = observers_back;
    let nobody = vec![false; layout.users];
    let closed = (Step::ClosedCheck, "closed");
    shared.set_step(Step::ClosedCheck);
    checks.push(
        check(
            closed,
            &mut observers,
            (&nobody, &nobody),
            None,
            &layout,
            STEP_TIMEOUT,
        )
        .await?,
    );
    let after = sample_all(&processes).await;
    let redis_after = redis_sample(opts, Step::ClosedCheck).await?;
    drop(bar);

    // Observers against the truth: latencies, and room events exactly.
    let mut truth = vec![TruthLog::default(); layout.users];
    for r in &reports {
        for (u, log) in &r.truth {
            truth[*u] = log.clone();
        }
    }
    // Churn measures its steady phase: the final close of every tab is a
    // storm of its own, counted apart.
    let steady_until = (scenario == Scenario::Churn).then_some(closes_from);
    let observed = check_observers(&observers, &truth, &layout, &shared, steady_until);
    let reload = (opts.reload_ms > 0).then(|| reload_report(&observers, &truth, opts.reload_ms));
    let nodeloss = (scenario == Scenario::Nodeloss).then(|| {
        nodeloss_report(
            &observers,
            &lost,
            opts.kill_target.unwrap_or_default(),
            closes_from,
        )
    });
    let opens = span(helds.iter().map(|h| h.opens));
    // Every tab welcomed, and every observer saw every `online`.
    let all_online_s = matches!(scenario, Scenario::Storm | Scenario::Hold)
        .then(|| all_online_at(&observers, closes_from))
        .flatten()
        .filter(|_| checks[0].observers_settled)
        .map(|at| at.max(opens.1).saturating_sub(started) as f64 / 1e6);

    let (mut presence, mut unexpected, mut syncs) = (EventChecks::default(), 0, 0);
    let mut ignored_frames = BTreeMap::new();
    for o in &observers {
        presence.add(&o.log.presence);
        unexpected += o.log.unexpected;
        syncs += o.log.syncs;
        for (kind, n) in &o.log.ignored {
            *ignored_frames.entry(kind.clone()).or_default() += n;
        }
    }
    let mut errors = shared.errors();
    let mut first_errors = shared.first_errors();
    for r in &reports {
        for (k, v) in &r.errors {
            *errors.entry(k.clone()).or_default() += v;
        }
        // The first shard's first of a kind stands for all (they ran at
        // once; which came first across processes is not known).
        for (k, said) in &r.first_errors {
            first_errors
                .entry(k.clone())
                .or_insert_with(|| said.clone());
        }
    }
    let connects: u64 = reports.iter().map(|r| r.connects).sum();
    let cycles: u64 = reports.iter().map(|r| r.closes).sum();
    let open_tabs: u64 = helds.iter().map(|h| h.open_tabs).sum();
    let connects_in_opens: u64 = helds.iter().map(|h| h.connects_in_opens).sum();
    let gateway = GatewayReport::new(
        processes
            .iter()
            .enumerate()
            .map(|(i, p)| TargetReport {
                target: p.authority.clone(),
                pid: p.pid,
                before: before[i],
                held: held_late[i].or(held_sample[i]),
                after: after[i],
            })
            .collect(),
        open_tabs,
        cycles,
    );
    let fanout = (scenario == Scenario::Fanout)
        .then(|| fanout_report(&helds, &observers, opts.rooms))
        .flatten();
    let cursors = (scenario == Scenario::Cursors).then(|| {
        let sum = |samples: &[Option<ProcessSample>]| -> Option<f64> {
            samples
                .iter()
                .map(|p| p.and_then(|p| p.proc_cpu_seconds))
                .sum()
        };
        let spent = CursorSpend {
            gateway_cpu_s: sum(&held_sample).zip(sum(&before)).map(|(h, b)| h - b),
            redis_commands: commands_held.zip(commands_before).map(|(h, b)| h - b),
            closed_by_server: errors
                .iter()
                .filter(|(k, _)| k.starts_with("closed_by_server"))
                .map(|(_, v)| v)
                .sum(),
        };
        cursors_report(&helds, &observers, &finals, opts, spent)
    });
    let users = layout.users;
    let redis = match (redis_before, redis_held, redis_after) {
        (Some(before), Some(held), Some(after)) => Some(RedisReport {
            transactions_before: before,
            transactions_held: held,
            transactions_after: after,
            // Only opens happened before the held sample in these two.
            per_1000_connects: (matches!(scenario, Scenario::Storm | Scenario::Hold)
                && connects_in_opens > 0)
                .then(|| (held - before) as f64 * 1000.0 / connects_in_opens as f64),
        }),
        _ => None,
    };
    Ok(Report {
        scenario,
        targets: opts.targets.clone(),
        users,
        tabs: opts.tabs,
        rooms: opts.rooms,
        room_size: opts.room_size,
        observers: opts.observers,
        procs: layout.shards,
        rate: opts.rate_for(scenario),
        duration_s: opts.duration,
        elapsed_s: started_at.elapsed().as_secs_f64(),
        connects,
        connects_per_s: connects_in_opens as f64 / secs(opens).max(1e-9),
        closes: cycles,
        open_tabs_held: open_tabs,
        connect_latency: Latency::of(&HistogramData::merge(
            reports.iter().map(|r| &r.connect_latency),
        )),
        all_online_s,
        tabs_per_s_until_all_online: all_online_s
            .filter(|s| *s > 0.0)
            .map(|s| connects_in_opens as f64 / s),
        event_latency: observed.latency.latencies(),
        event_latency_cross_node: observed.cross_node.latencies(),
        event_latency_close_all: observed.close_all.latencies(),
        events: shared.events.load(std::sync::atomic::Ordering::Relaxed),
        presence,
        room: observed.room,
        unexpected_frames: unexpected,
        ignored_frames,
        syncs,
        offline_grace_ms: opts.offline_grace_ms,
        offline_checks: observed.offline,
        reload,
        nodeloss,
        fanout,
        cursors,
        checks,
        errors,
        first_errors,
        gateway,
        redis,
    })
}

/// The Redis transaction count, when `--redis` is given.
async fn redis_sample(opts: &Options, step: Step) -> Result<Option<u64>, Failure> {
    match &opts.redis {
        None => Ok(None),
        Some(url) => crate::target::redis_transactions(url)
            .await
            .map(Some)
            .map_err(|reason| Failure::Redis {
                url: url.clone(),
                step,
                reason,
            }),
    }
}

/// `cursors`: Redis's command count (`--redis`), for commands a second.
async fn redis_commands(
    scenario: Scenario,
    opts: &Options,
    step: Step,
) -> Result<Option<u64>, Failure> {
    match &opts.redis {
        Some(url) if scenario == Scenario::Cursors => crate::target::redis_commands(url)
            .await
            .map(Some)
            .map_err(|reason| Failure::Redis {
                url: url.clone(),
                step,
                reason,
            }),
        _ => Ok(None),
    }
}

/// The earliest start and latest end of `spans`.
fn span(spans: impl Iterator<Item = (Stamp, Stamp)>) -> (Stamp, Stamp) {
    spans.fold((Stamp::MAX, 0), |(a, b), (s, e)| (a.min(s), b.max(e)))
}

fn secs((start, end): (Stamp, Stamp)) -> f64 {
    end.saturating_sub(start) as f64 / 1e6
}

/// What the observers' events showed against the truth.
struct Observed {
    latency: KindHistograms,
    cross_node: KindHistograms,
    /// Latencies of transitions sent at or after `steady_until`.
    close_all: KindHistograms,
    room: EventChecks,
    offline: OfflineChecks,
}

impl Observed {
    /// One event's latency, from its action (`sent`) to its receipt: with
    /// the close-all storm's when the action came at or after
    /// `steady_until`, else with the steady ones (and the cross-node ones
    /// when the action was on another node than the observer's).
    fn record(
        &mut self,
        kind: EventKind,
        sent: Stamp,
        at: Stamp,
        cross_node: bool,
        steady_until: Option<Stamp>,
    ) {
        let us = at.saturating_sub(sent);
        if steady_until.is_some_and(|until| sent >= until) {
            self.close_all.record(kind, us);
        } else {
            self.latency.record(kind, us);
            if cross_node {
                self.cross_node.record(kind, us);
            }
        }
    }
}

/// Checks every observer's events against the users' true transitions:
/// presence latencies by `seq`, room events exactly (one window per user,
/// from before the first action to the end).
fn check_observers(
    observers: &[Observer],
    truth: &[TruthLog],
    layout: &Layout,
    shared: &Shared,
    steady_until: Option<Stamp>,
) -> Observed {
    let mut out = Observed {
        latency: KindHistograms::default(),
        cross_node: KindHistograms::default(),
        close_all: KindHistograms::default(),
        room: EventChecks::default(),
        offline: OfflineChecks::default(),
    };
    let start_unix_us = shared.clock.start_unix_ns() / 1000;
    for o in observers {
        let mut room_events: BTreeMap<usize, Vec<Received>> = BTreeMap::new();
        for s in &o.log.seen {
            if s.room {
                room_events
                    .entry(s.user)
                    .or_default()
                    .push(Received { to: s.to, at: s.at });
                continue;
            }
            let Some(t) = truth[s.user].presence_cause(s.seq, s.to) else {
                out.offline.unexplained += 1;
                shared.error_found("event_without_cause", || {
                    let kind = if s.to { "online" } else { "offline" };
                    format!(
                        "observer {} got {kind} seq {} of user {} {} ms into the run, which no action of the user explains",
                        o.name,
                        s.seq,
                        layout.user_name(s.user),
                        s.at / 1000
                    )
                });
                continue;
            };
            if s.at < t.due() {
                out.offline.early += 1;
            }
            if !s.to {
                let reason = if t.lost {
                    Reason::NodeLost
                } else {
                    Reason::Closed
                };
                out.offline.reason_mismatches += u64::from(s.reason != reason);
                // `last_seen` is when the store wrote the close (the reap,
                // for a killed node's tab): after the Close went out, and
                // a grace before the event arrived.
                let last_seen = (u128::from(s.last_seen_ms) * 1000).saturating_sub(start_unix_us);
                let last_seen = last_seen as Stamp;
                let within = last_seen + CLOCK_TOLERANCE_US >= t.sent
                    && last_seen <= s.at.saturating_sub(t.grace_us) + CLOCK_TOLERANCE_US;
                out.offline.last_seen_mismatches += u64::from(!within);
            }
            // A killed node's offlines are timed from the kill instead
            // (`nodeloss`'s time to offline).
            if !t.lost {
                let kind = EventKind::of(false, s.to);
                let cross = t.target != o.target;
                out.record(kind, t.latency_from(), s.at, cross, steady_until);
            }
        }
        for (u, log) in truth.iter().enumerate() {
            if layout.room_of(u).is_none() {
                continue;
            }
            let events = room_events.get(&u).map_or(&[][..], Vec::as_slice);
            let view = WindowOfUser {
                events,
                ..Default::default()
            };
            let c = check_window(&log.room, &view, &mut |t, at| {
                if !t.lost {
                    let kind = EventKind::of(true, t.to);
                    let cross = t.target != o.target;
                    out.record(kind, t.latency_from(), at, cross, steady_until);
                }
            });
            out.room.add(&c.events);
        }
    }
    out
}

/// Each user's events at one observer, in arrival order: `(presence,
/// room)`.
fn events_by_user(o: &Observer) -> BTreeMap<usize, (Vec<Received>, Vec<Received>)> {
    let mut by_user: BTreeMap<usize, (Vec<Received>, Vec<Received>)> = BTreeMap::new();
    for s in &o.log.seen {
        let e = by_user.entry(s.user).or_default();
        let r = Received { to: s.to, at: s.at };
        if s.room { e.1.push(r) } else { e.0.push(r) }
    }
    by_user
}

/// `churn --reload-ms`: counts the reloads, and those for which some
/// observer saw the user go away and come back: an `offline` (`left`)
/// that arrived after the reload's Close, followed by an `online`
/// (`joined`) that arrived after its re-open, before the user's next
/// close.
fn reload_report(observers: &[Observer], truth: &[TruthLog], reload_ms: u64) -> ReloadReport {
    let mut r = ReloadReport {
        reload_ms,
        ..Default::default()
    };
    let seen: Vec<_> = observers.iter().map(events_by_user).collect();
    for (u, log) in truth.iter().enumerate() {
        r.reloads += log.reloads.len() as u64;
        r.reloads_of_last_tab += log.reloads.iter().filter(|x| x.last_tab).count() as u64;
        r.reloads_of_last_room_tab += log.reloads.iter().filter(|x| x.last_in_room).count() as u64;
        if log.reloads.is_empty() {
            continue;
        }
        let mut flapped = vec![false; log.reloads.len()];
        let mut room_flapped = vec![false; log.reloads.len()];
        for by_user in &seen {
            let Some((presence, room)) = by_user.get(&u) else {
                continue;
            };
            for (events, flags) in [(presence, &mut flapped), (room, &mut room_flapped)] {
                for pair in events.windows(2) {
                    let (away, back) = (pair[0], pair[1]);
                    if away.to || !back.to {
                        continue;
                    }
                    let k = log.reloads.partition_point(|x| x.closed <= away.at);
                    let Some(k) = k.checked_sub(1) else {
                        continue;
                    };
                    let x = &log.reloads[k];
                    if x.reopened <= back.at && x.until.is_none_or(|until| away.at < until) {
                        flags[k] = true;
                    }
                }
            }
        }
        r.flaps += flapped.iter().filter(|f| **f).count() as u64;
        r.room_flaps += room_flapped.iter().filter(|f| **f).count() as u64;
    }
    r
}

/// `nodeloss`: what the observers got, between the kill and the final
/// close (`until`), of the killed node's users: nothing of those who came
/// back; one `offline` each of those who did not, timed from the kill.
fn nodeloss_report(
    observers: &[Observer],
    lost: &[Lost],
    kill_target: usize,
    until: Stamp,
) -> NodelossReport {
    let mut r = NodelossReport {
        kill_target,
        ..Default::default()
    };
    let mut returned = std::collections::HashSet::new();
    let mut gone = std::collections::HashSet::new();
    let mut kill = Stamp::MAX;
    for l in lost {
        kill = kill.min(l.kill);
        r.returns_s = r
            .returns_s
            .max(l.returns_done.saturating_sub(l.kill) as f64 / 1e6);
        returned.extend(l.returned.iter().copied());
        gone.extend(l.lost.iter().copied().filter(|u| !l.returned.contains(u)));
    }
    r.lost_users = (returned.len() + gone.len()) as u64;
    r.returned_users = returned.len() as u64;
    r.gone_offlines_expected = (gone.len() * observers.len()) as u64;
    let mut times = Vec::new();
    for o in observers {
        for s in o
            .log
            .seen
            .iter()
            .filter(|s| !s.to && (kill..until).contains(&s.at))
        {
            if returned.contains(&s.user) {
                if s.room {
                    r.returned_lefts += 1;
                } else {
                    r.returned_offlines += 1;
                }
            } else if gone.contains(&s.user) && !s.room {
                r.gone_offlines += 1;
                times.push(s.at - kill);
            }
        }
    }
    r.time_to_offline = Distribution::of(times);
    r
}

/// When the slowest observer saw the last `online` before the closes.
fn all_online_at(observers: &[Observer], closes_from: Stamp) -> Option<Stamp> {
    observers
        .iter()
        .map(|o| {
            o.log
                .seen
                .iter()
                .filter(|s| !s.room && s.to && s.at < closes_from)
                .map(|s| s.at)
                .max()
        })
        .collect::<Option<Vec<_>>>()?
        .into_iter()
        .max()
}

/// Sums the shards' fanout results; the observers' room events during the
/// leaves and joins count towards the fan-out rate too.
fn fanout_report(helds: &[Held], observers: &[Observer], rooms: usize) -> Option<FanoutReport> {
    let parts: Vec<&FanoutShard> = helds.iter().filter_map(|h| h.fanout.as_ref()).collect();
    let actions = span(parts.iter().map(|f| f.actions));
    let seconds = secs(actions).max(1e-9);
    let mut latency = KindHistograms::default();
    let mut member = EventChecks::default();
    for f in &parts {
        latency.add(&f.latency);
        member.add(&f.member);
    }
    let observer_events: u64 = observers
        .iter()
        .map(|o| {
            o.log
                .seen
                .iter()
                .filter(|s| s.room && (actions.0..=actions.1).contains(&s.at))
                .count() as u64
        })
        .sum();
    let in_actions: u64 = parts.iter().map(|f| f.member_events_in_actions).sum();
    let l = latency.latencies();
    Some(FanoutReport {
        rooms,
        actions_s: secs(actions),
        room_actions: parts.iter().map(|f| f.room_actions).sum(),
        transitions: parts.iter().map(|f| f.transitions).sum(),
        windows: parts.iter().map(|f| f.windows).sum(),
        member_events: parts.iter().map(|f| f.member_events).sum(),
        member_events_per_s: in_actions as f64 / seconds,
        observer_room_events_per_s: observer_events as f64 / seconds,
        member,
        snapshot_mismatches: parts.iter().map(|f| f.snapshot_mismatches).sum(),
        members_settled: parts.iter().all(|f| f.settled),
        member_latency_joined: l.joined,
        member_latency_left: l.left,
    })
}

/// What `cursors` cost outside the tool, from before the opens to the end
/// of the members' checks.
struct CursorSpend {
    gateway_cpu_s: Option<f64>,
    redis_commands: Option<u64>,
    closed_by_server: u64,
}

/// Sums the shards' `cursors` results and checks each observer's states
/// against every member's last one (`finals`, by user).
fn cursors_report(
    helds: &[Held],
    observers: &[Observer],
    finals: &[u64],
    opts: &Options,
    spent: CursorSpend,
) -> CursorsReport {
    let parts: Vec<&CursorShard> = helds.iter().filter_map(|h| h.cursors.as_ref()).collect();
    let moves = span(parts.iter().map(|c| c.moves));
    let moves_s = secs(moves);
    let mut updates = crate::cursor::UpdateTally::default();
    let mut member = crate::cursor::StateChecks::default();
    let mut observer = crate::cursor::StateChecks::default();
    for c in &parts {
        updates.add(&c.updates);
        member.add(&c.member);
    }
    let mut observer_unconverged = 0;
    for o in observers {
        observer.add(&o.log.states.checks);
        observer_unconverged += o.log.states.unconverged(finals, None);
    }
    let deliveries = member.delivered;
    let all_deliveries = deliveries + observer.delivered;
    CursorsReport {
        rooms: opts.rooms,
        room_size: opts.room_size,
        rate_per_member: opts.rate_for(Scenario::Cursors),
        moves_s,
        updates,
        deliveries,
        deliveries_per_s: parts.iter().map(|c| c.delivered_in_moves).sum::<u64>() as f64
            / moves_s.max(1e-9),
        observer_deliveries: observer.delivered,
        latency: Latency::of(&HistogramData::merge(parts.iter().map(|c| &c.latency))),
        member,
        unconverged: parts.iter().map(|c| c.unconverged).sum(),
        members_settled: parts.iter().all(|c| c.settled),
        observer,
        observer_unconverged,
        closed_by_server: spent.closed_by_server,
        gateway_cpu_s: spent.gateway_cpu_s,
        cpu_us_per_delivery: spent
            .gateway_cpu_s
            .filter(|_| all_deliveries > 0)
            .map(|s| s * 1e6 / all_deliveries as f64),
        redis_commands: spent.redis_commands,
        redis_commands_per_s: spent
            .redis_commands
            .filter(|_| moves_s > 0.0)
            .map(|n| n as f64 / moves_s),
    }
}

/// The progress line; cleared when it goes, also when a run fails, so the
/// failure line does not share the terminal line with it.
struct ProgressLine(ProgressBar);

impl Drop for ProgressLine {
    fn drop(&mut self) {
        self.0.finish_and_clear();
    }
}

fn spinner(
    scenario: Scenario,
    shared: &Arc<Shared>,
    shards: &Arc<Mutex<Vec<Progress>>>,
) -> ProgressLine {
    let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
    bar.set_prefix(scenario.name());
    bar.enable_steady_tick(PROGRESS_INTERVAL);
    let (bar2, shared, shards) = (bar.clone(), Arc::clone(shared), Arc::clone(shards));
    tokio::spawn(async move {
        while !bar2.is_finished() {
            let mut p = shared.progress();
            for s in shards.lock().unwrap_or_else(|e| e.into_inner()).iter() {
                p.add(s);
            }
            bar2.set_message(p.line());
            sleep(PROGRESS_INTERVAL).await;
        }
    });
    ProgressLine(bar)
}

async fn sample_all(processes: &[Target]) -> Vec<Option<ProcessSample>> {
    let mut out = Vec::with_capacity(processes.len());
    for p in processes {
        out.push(p.process_sample().await.ok());
    }
    out
}

/// Runs `work` while every observer pumps its frames in its own task;
/// hands the observers back afterwards. Fails as soon as `work` fails or
/// an observer's socket ends, naming `step`.
async fn with_observers<T>(
    observers: Vec<Observer>,
    step: Step,
    work: impl Future<Output = Result<T, Failure>>,
) -> Result<(T, Vec<Observer>), Failure> {
    let (stop, stopped) = watch::channel(false);
    let (failed_tx, mut failed) = mpsc::unbounded_channel();
    let pumps: Vec<JoinHandle<Observer>> = observers
        .into_iter()
        .enumerate()
        .map(|(index, mut o)| {
            let (mut stopped, failed_tx) = (stopped.clone(), failed_tx.clone());
            tokio::spawn(async move {
                if let Err(error) = o.pump_until(&mut stopped).await {
                    let _ = failed_tx.send(Failure::Observer { index, step, error });
                }
                o
            })
        })
        .collect();
    drop(failed_tx);
    let out = tokio::select! {
        out = work => out?,
        // A pump ends early only when its observer failed.
        Some(failure) = failed.recv() => return Err(failure),
    };
    let _ = stop.send(true);
    let mut back = Vec::with_capacity(pumps.len());
    for (index, p) in pumps.into_iter().enumerate() {
        let panicked = |message: String| Failure::Observer {
            index,
            step,
            error: ObserverError::Panicked(message),
        };
        // A pump stops at once when told to.
        match tokio::time::timeout(STEP_TIMEOUT, p).await {
            Ok(Ok(o)) => back.push(o),
            Ok(Err(e)) => return Err(panicked(e.to_string())),
            Err(_) => {
                return Err(Failure::Observer {
                    index,
                    step,
                    error: ObserverError::Stuck,
                });
            }
        }
    }
    Ok((out, back))
}

/// Waits (at most `within`) for the observers to agree with the truth
/// (`online`, `in_room` per user), then compares the gateway's answers
/// with it (and, given each user's last state sent, `states`, the states
/// in its room pages).
async fn check(
    (step, phase): (Step, &str),
    observers: &mut [Observer],
    (online, in_room): (&[bool], &[bool]),
    states: Option<&[u64]>,
    layout: &Layout,
    within: Duration,
) -> Result<Comparison, Failure> {
    let failed = |index| move |error| Failure::Observer { index, step, error };
    let deadline = Instant::now() + within;
    let mut settled = true;
    for (j, o) in observers.iter_mut().enumerate() {
        settled &= o
            .settle(online, in_room, deadline, QUIET_WINDOW)
            .await
            .map_err(failed(j))?;
    }
    // Each observer is its own client: any of them can ask.
    let gateway = observers[0]
        .query_all(&layout.user_names())
        .await
        .map_err(failed(0))?;
    for o in observers.iter_mut() {
        o.log.count_final_misses(&gateway, in_room);
    }
    let (mut room_mismatches, mut state_mismatches) = (0, 0);
    for r in 0..layout.rooms {
        let pages = observers[0]
            .room_page_states(&layout.room_name(r))
            .await
            .map_err(failed(0))?;
        let gateway: std::collections::HashSet<usize> = pages.keys().copied().collect();
        let truth: std::collections::HashSet<usize> = layout
            .members(r)
            .into_iter()
            .filter(|&i| in_room[i])
            .collect();
        room_mismatches += truth.symmetric_difference(&gateway).count() as u64;
        if let Some(states) = states {
            state_mismatches += pages.iter().filter(|&(&u, &n)| states[u] != n).count() as u64;
        }
    }
    Ok(Comparison {
        phase: phase.to_owned(),
        observers_settled: settled,
        presence_mismatches: gateway
            .iter()
            .zip(online)
            .filter(|((g, _), t)| g != *t)
            .count() as u64,
        room_mismatches,
        state_mismatches,
        users_online: online.iter().filter(|o| **o).count() as u64,
    })
}
