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
    layout::Layout,
    observer::{Comparison, Observer},
    options::{Options, Scenario},
    report::{FanoutReport, GatewayReport, RedisReport, Report, TargetReport},
    shard::{FanoutShard, Held, Order, QUIET_WINDOW, ShardMsg, ShardSpec},
    stats::{EventKind, HistogramData, KindHistograms, Latency, Progress, Shared},
    target::{ProcessSample, Target},
    truth::{EventChecks, Received, TruthLog, WindowOfUser, check_window},
    worker::{self, ShardHandle},
    ws::STEP_TIMEOUT,
};

/// How often the progress line redraws.
const PROGRESS_INTERVAL: Duration = Duration::from_millis(200);
/// Longest a shard may take to build its users (a worker to start).
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// The shards, and the latest progress of each.
struct Shards {
    handles: Vec<ShardHandle>,
    progress: Arc<Mutex<Vec<Progress>>>,
    msgs: Vec<mpsc::UnboundedReceiver<ShardMsg>>,
}

impl Shards {
    /// Starts `procs` shards (in this process when 1).
    fn start(
        scenario: Scenario,
        opts: &Options,
        layout: &Layout,
        clock: RunClock,
    ) -> anyhow::Result<Self> {
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
                worker::start_process(&spec, &opts.worker_command)?
            });
        }
        let progress = Arc::new(Mutex::new(vec![Progress::default(); handles.len()]));
        // Progress messages are absorbed here; the rest go on in order.
        let msgs = handles
            .iter_mut()
            .enumerate()
            .map(|(k, h)| {
                let (tx, rx) = mpsc::unbounded_channel();
                let mut from = std::mem::replace(&mut h.msgs, mpsc::unbounded_channel().1);
                let progress = Arc::clone(&progress);
                tokio::spawn(async move {
                    while let Some(msg) = from.recv().await {
                        match msg {
                            ShardMsg::Progress(p) => {
                                progress.lock().unwrap_or_else(|e| e.into_inner())[k] = p;
                            }
                            other => {
                                if tx.send(other).is_err() {
                                    return;
                                }
                            }
                        }
                    }
                });
                rx
            })
            .collect();
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

    /// The next message of every shard (all must be `want`).
    async fn next_of_all<T>(
        &mut self,
        what: &str,
        want: impl Fn(ShardMsg) -> Option<T>,
    ) -> anyhow::Result<Vec<T>> {
        let mut out = Vec::with_capacity(self.msgs.len());
        for (k, rx) in self.msgs.iter_mut().enumerate() {
            match rx.recv().await {
                Some(ShardMsg::Failed(e)) => anyhow::bail!("shard {k}: {e}"),
                None => anyhow::bail!("shard {k} ended before {what}"),
                Some(msg) => match want(msg) {
                    Some(t) => out.push(t),
                    None => anyhow::bail!("shard {k}: unexpected message before {what}"),
                },
            }
        }
        Ok(out)
    }
}

/// Runs `scenario` against `opts.targets` and reports; shows a progress
/// line on stderr when `progress` is set.
pub async fn run(scenario: Scenario, opts: &Options, progress: bool) -> anyhow::Result<Report> {
    opts.validate(scenario)?;
    let targets: Vec<Target> = opts
        .targets
        .iter()
        .map(|t| Target::parse(t))
        .collect::<anyhow::Result<_>>()?;
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
        // Observers sit on another node than user 0's first tab when there
        // are several, so events cross nodes.
        let t = (j + 1) % targets.len();
        let mut o = Observer::connect(
            (&targets[t], t as u16),
            &layout.observer_name(j),
            &layout.user_prefix(),
            layout.users,
            Arc::clone(&shared),
        )
        .await?;
        o.watch_all(&user_names).await?;
        for room in layout.room_names() {
            o.join(&room).await?;
        }
        observers.push(o);
    }

    let mut shards = Shards::start(scenario, opts, &layout, clock)?;
    tokio::time::timeout(
        READY_TIMEOUT,
        shards.next_of_all("ready", |m| matches!(m, ShardMsg::Ready).then_some(())),
    )
    .await
    .map_err(|_| anyhow::anyhow!("the shards were not ready within {READY_TIMEOUT:?}"))??;

    let bar = progress.then(|| spinner(scenario, &shared, &shards.progress));
    let before = sample_all(&processes).await;
    let redis_before = redis_sample(opts).await?;
    let started = clock.now();
    let started_at = Instant::now();

    // The action phase.
    shards.order(Order::Go);
    let (helds, observers_back) = with_observers(
        observers,
        shards.next_of_all("the action phase ended", |m| match m {
            ShardMsg::Held(h) => Some(*h),
            _ => None,
        }),
    )
    .await;
    let helds = helds?;
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
    let mut checks = vec![check("held", &mut observers, &online, &in_room, &layout).await?];
    // Every observer saw every transition: the store wrote them all.
    let redis_held = redis_sample(opts).await?;
    if scenario == Scenario::Hold {
        let hold = Duration::from_secs_f64(opts.duration);
        observers = with_observers(observers, sleep(hold)).await.1;
    }
    let held_late = sample_all(&processes).await;

    let closes_from = clock.now();
    shards.order(Order::Close);
    let (reports, observers_back) = with_observers(
        observers,
        shards.next_of_all("every tab closed", |m| match m {
            ShardMsg::Done(r) => Some(*r),
            _ => None,
        }),
    )
    .await;
    let reports = reports?;
    observers = observers_back;
    let nobody = vec![false; layout.users];
    checks.push(check("closed", &mut observers, &nobody, &nobody, &layout).await?);
    let after = sample_all(&processes).await;
    let redis_after = redis_sample(opts).await?;
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }

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
    let opens = span(helds.iter().map(|h| h.opens));
    // Every tab welcomed, and every observer saw every `online`.
    let all_online_s = matches!(scenario, Scenario::Storm | Scenario::Hold)
        .then(|| all_online_at(&observers, closes_from))
        .flatten()
        .filter(|_| checks[0].observers_settled)
        .map(|at| at.max(opens.1).saturating_sub(started) as f64 / 1e6);

    let (mut presence, mut unexpected, mut syncs) = (EventChecks::default(), 0, 0);
    for o in &observers {
        presence.add(&o.presence);
        unexpected += o.unexpected;
        syncs += o.syncs;
    }
    let mut errors = shared.errors();
    for r in &reports {
        for (k, v) in &r.errors {
            *errors.entry(k.clone()).or_default() += v;
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
        syncs,
        fanout,
        checks,
        errors,
        gateway,
        redis,
    })
}

/// The Redis transaction count, when `--redis` is given.
async fn redis_sample(opts: &Options) -> anyhow::Result<Option<u64>> {
    match &opts.redis {
        None => Ok(None),
        Some(url) => crate::target::redis_transactions(url)
            .await
            .map(Some)
            .map_err(|e| anyhow::anyhow!("--redis: {e}")),
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
    };
    for o in observers {
        let mut room_events: BTreeMap<usize, Vec<Received>> = BTreeMap::new();
        for s in &o.seen {
            if s.room {
                room_events
                    .entry(s.user)
                    .or_default()
                    .push(Received { to: s.to, at: s.at });
                continue;
            }
            match truth[s.user].presence_cause(s.seq, s.to, s.at) {
                Some(t) => {
                    let kind = EventKind::of(false, s.to);
                    out.record(kind, t.sent, s.at, t.target != o.target, steady_until);
                }
                None => shared.error("event_without_cause"),
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
                let kind = EventKind::of(true, t.to);
                out.record(kind, t.sent, at, t.target != o.target, steady_until);
            });
            out.room.add(&c.events);
        }
    }
    out
}

/// When the slowest observer saw the last `online` before the closes.
fn all_online_at(observers: &[Observer], closes_from: Stamp) -> Option<Stamp> {
    observers
        .iter()
        .map(|o| {
            o.seen
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
            o.seen
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

fn spinner(
    scenario: Scenario,
    shared: &Arc<Shared>,
    shards: &Arc<Mutex<Vec<Progress>>>,
) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
    bar.set_prefix(format!("{scenario:?}").to_lowercase());
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
    bar
}

async fn sample_all(processes: &[Target]) -> Vec<Option<ProcessSample>> {
    let mut out = Vec::with_capacity(processes.len());
    for p in processes {
        out.push(p.process_sample().await.ok());
    }
    out
}

/// Runs `work` while every observer pumps its frames in its own task;
/// hands the observers back afterwards.
async fn with_observers<T>(
    observers: Vec<Observer>,
    work: impl Future<Output = T>,
) -> (T, Vec<Observer>) {
    let (stop, stopped) = watch::channel(false);
    let pumps: Vec<JoinHandle<Observer>> = observers
        .into_iter()
        .map(|mut o| {
            let mut stopped = stopped.clone();
            tokio::spawn(async move {
                o.pump_until(&mut stopped).await;
                o
            })
        })
        .collect();
    let out = work.await;
    let _ = stop.send(true);
    let mut back = Vec::with_capacity(pumps.len());
    for p in pumps {
        // unwrap: an observer's pump does not panic.
        back.push(p.await.unwrap());
    }
    (out, back)
}

/// Waits for the observers to agree with the truth (`online`, `in_room`
/// per user), then compares the gateway's answers with it.
async fn check(
    phase: &str,
    observers: &mut [Observer],
    online: &[bool],
    in_room: &[bool],
    layout: &Layout,
) -> anyhow::Result<Comparison> {
    let deadline = Instant::now() + STEP_TIMEOUT;
    let mut settled = true;
    for o in observers.iter_mut() {
        settled &= o.settle(online, in_room, deadline, QUIET_WINDOW).await;
    }
    // Each observer is its own client: any of them can ask.
    let gateway = observers[0].query_all(&layout.user_names()).await?;
    for o in observers.iter_mut() {
        o.count_final_misses(&gateway, in_room);
    }
    let mut room_mismatches = 0;
    for r in 0..layout.rooms {
        let gateway = observers[0].room_members(&layout.room_name(r)).await?;
        let truth: std::collections::HashSet<usize> = layout
            .members(r)
            .into_iter()
            .filter(|&i| in_room[i])
            .collect();
        room_mismatches += truth.symmetric_difference(&gateway).count() as u64;
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
        users_online: online.iter().filter(|o| **o).count() as u64,
    })
}
