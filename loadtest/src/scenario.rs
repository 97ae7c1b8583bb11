//! A run: observers first, then the scenario's actions, then the checks.
//!
//! Every scenario ends the same way: wait until each observer's view equals
//! the truth, ask the gateway (`query`, `room` pages) what it believes,
//! close every tab and check again. Users act in their own tasks; observers
//! pump their frames in theirs while users act, and are taken back for the
//! checks.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::{Duration, Instant},
};

use indicatif::{ProgressBar, ProgressDrawTarget};
use tokio::{
    sync::{Semaphore, watch},
    task::JoinHandle,
    time::{sleep, sleep_until},
};

use crate::{
    observer::{Comparison, EventChecks, Observer},
    options::{Options, Scenario},
    report::{GatewayReport, Report, TargetReport},
    rng::Rng,
    stats::{Latency, Shared, new_histogram},
    tab::STEP_TIMEOUT,
    target::{ProcessSample, Target},
    user::{TruthLog, User},
};

/// After every observer's view matched the truth: how long to keep
/// listening so a late duplicate shows.
const QUIET_WINDOW: Duration = Duration::from_secs(1);
/// Most connects in flight at once when opens are unpaced.
const MAX_CONNECTS_IN_FLIGHT: usize = 256;
/// How often the progress line redraws.
const PROGRESS_INTERVAL: Duration = Duration::from_millis(200);

/// The names of one run; a random prefix keeps runs against the same
/// cluster apart.
struct Names {
    user_prefix: String,
    users: Vec<String>,
    rooms: Vec<String>,
    observers: Vec<String>,
}

impl Names {
    fn new(opts: &Options) -> Self {
        let run = format!("lt{:08x}", Rng::seeded().below(1 << 32));
        let user_prefix = format!("{run}u");
        Self {
            users: (0..opts.users)
                .map(|i| format!("{user_prefix}{i}"))
                .collect(),
            rooms: (0..opts.rooms).map(|r| format!("{run}r{r}")).collect(),
            observers: (0..opts.observers)
                .map(|o| format!("{run}obs{o}"))
                .collect(),
            user_prefix,
        }
    }

    /// The room of user `i`: the first rooms × room-size users fill the
    /// rooms in order.
    fn room_of(&self, i: usize, room_size: usize) -> Option<String> {
        self.rooms.get(i / room_size.max(1)).cloned()
    }
}

/// Runs `scenario` against `opts.targets` and reports; shows a progress
/// line on stderr when `progress` is set.
pub async fn run(scenario: Scenario, opts: &Options, progress: bool) -> anyhow::Result<Report> {
    opts.validate()?;
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
    let names = Names::new(opts);
    let shared = Arc::new(Shared::default());
    let rate = opts.rate_for(scenario);

    let mut observers = Vec::with_capacity(opts.observers);
    for (j, name) in names.observers.iter().enumerate() {
        // Observers sit on another node than user 0's first tab when there
        // are several, so events cross nodes.
        let target = &targets[(j + 1) % targets.len()];
        let mut o = Observer::connect(
            target,
            name,
            &names.user_prefix,
            opts.users,
            Arc::clone(&shared),
        )
        .await?;
        o.watch_all(&names.users).await?;
        for room in &names.rooms {
            o.join(room).await?;
        }
        observers.push(o);
    }
    let users: Vec<User> = (0..opts.users)
        .map(|i| {
            User::new(
                i,
                names.users[i].clone(),
                names.room_of(i, opts.room_size),
                opts.tabs,
                &targets,
                &opts.source_addrs,
                Arc::clone(&shared),
            )
        })
        .collect();

    let bar = progress.then(|| spinner(scenario, &shared));
    let before = sample_all(&processes).await;
    let started = Instant::now();

    // The action phase: opens (storm, hold) or random toggles (churn).
    let (users, observers_back) = with_observers(observers, async {
        match scenario {
            Scenario::Storm | Scenario::Hold => open_all(users, rate).await,
            Scenario::Churn => churn(users, rate, opts.duration).await,
        }
    })
    .await;
    let mut observers = observers_back;
    let action_secs = started.elapsed().as_secs_f64();
    let connects_in_actions = shared.connects.load(Relaxed);
    let open_tabs = shared.open.load(Relaxed);

    let held_sample = sample_all(&processes).await;
    let mut checks = vec![check("held", &mut observers, &users, &names).await?];
    if scenario == Scenario::Hold {
        let hold = Duration::from_secs_f64(opts.duration);
        observers = with_observers(observers, sleep(hold)).await.1;
    }
    let held_late = sample_all(&processes).await;

    let (users, observers_back) = with_observers(observers, close_all(users)).await;
    observers = observers_back;
    checks.push(check("closed", &mut observers, &users, &names).await?);
    let after = sample_all(&processes).await;
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }

    // Latencies: each event against the truth transition that caused it.
    let (mut presence_h, mut room_h) = (new_histogram(), new_histogram());
    let (mut presence, mut room) = (EventChecks::default(), EventChecks::default());
    let (mut unexpected, mut syncs) = (0, 0);
    for o in &observers {
        presence.add(&o.presence);
        room.add(&o.room);
        unexpected += o.unexpected;
        syncs += o.syncs;
        for s in &o.seen {
            let log = &users[s.user].log;
            let truth = if s.room { &log.room } else { &log.presence };
            match TruthLog::cause(truth, s.to, s.at) {
                Some(t) => {
                    Latency::record(if s.room { &mut room_h } else { &mut presence_h }, s.at - t)
                }
                None => shared.error("event_without_cause"),
            }
        }
    }

    let cycles = shared.closes.load(Relaxed);
    let gateway = GatewayReport::new(
        processes
            .iter()
            .enumerate()
            .map(|(i, p)| TargetReport {
                target: p.authority.clone(),
                before: before[i],
                held: held_late[i].or(held_sample[i]),
                after: after[i],
            })
            .collect(),
        open_tabs,
        cycles,
    );
    Ok(Report {
        scenario,
        targets: opts.targets.clone(),
        users: opts.users,
        tabs: opts.tabs,
        rooms: opts.rooms,
        room_size: opts.room_size,
        observers: opts.observers,
        rate,
        duration_s: opts.duration,
        elapsed_s: started.elapsed().as_secs_f64(),
        connects: shared.connects.load(Relaxed),
        connects_per_s: connects_in_actions as f64 / action_secs.max(1e-9),
        closes: cycles,
        open_tabs_held: open_tabs,
        connect_latency: shared.connect_latency(),
        presence_event_latency: Latency::of(&presence_h),
        room_event_latency: Latency::of(&room_h),
        events: shared.events.load(Relaxed),
        presence,
        room,
        unexpected_frames: unexpected,
        syncs,
        checks,
        errors: shared.errors(),
        gateway,
    })
}

fn spinner(scenario: Scenario, shared: &Arc<Shared>) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
    bar.set_prefix(format!("{scenario:?}").to_lowercase());
    bar.enable_steady_tick(PROGRESS_INTERVAL);
    let (bar2, shared) = (bar.clone(), Arc::clone(shared));
    tokio::spawn(async move {
        while !bar2.is_finished() {
            bar2.set_message(shared.progress());
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

/// Hands out start times `period` apart; unpaced when `rate` is 0.
struct Pacer {
    start: Instant,
    period: Option<Duration>,
    next: AtomicU64,
    in_flight: Semaphore,
}

impl Pacer {
    fn new(rate: f64) -> Arc<Self> {
        Arc::new(Self {
            start: Instant::now(),
            period: (rate > 0.0).then(|| Duration::from_secs_f64(1.0 / rate)),
            next: AtomicU64::new(0),
            in_flight: Semaphore::new(MAX_CONNECTS_IN_FLIGHT),
        })
    }

    async fn wait_turn(&self) {
        if let Some(period) = self.period {
            let n = self.next.fetch_add(1, Relaxed);
            sleep_until((self.start + period.mul_f64(n as f64)).into()).await;
        }
    }
}

async fn join_users(tasks: Vec<JoinHandle<User>>) -> Vec<User> {
    let mut users = Vec::with_capacity(tasks.len());
    for t in tasks {
        // unwrap: a user task does not panic.
        users.push(t.await.unwrap());
    }
    users
}

/// Opens every tab of every user, paced at `rate` opens a second.
async fn open_all(users: Vec<User>, rate: f64) -> Vec<User> {
    let pacer = Pacer::new(rate);
    let tasks = users
        .into_iter()
        .map(|mut u| {
            let pacer = Arc::clone(&pacer);
            tokio::spawn(async move {
                for i in 0..u.slots() {
                    pacer.wait_turn().await;
                    // unwrap: the semaphore is never closed.
                    let _permit = pacer.in_flight.acquire().await.unwrap();
                    u.open(i).await;
                }
                u
            })
        })
        .collect();
    join_users(tasks).await
}

/// Closes every open tab, all users at once.
async fn close_all(users: Vec<User>) -> Vec<User> {
    let tasks = users
        .into_iter()
        .map(|mut u| {
            tokio::spawn(async move {
                u.close_all().await;
                u
            })
        })
        .collect();
    join_users(tasks).await
}

/// For `seconds`, each user toggles a random tab slot (open it if closed,
/// close it if open) about every `users / rate` seconds, with jitter, so
/// the whole run makes about `rate` actions a second.
async fn churn(users: Vec<User>, rate: f64, seconds: f64) -> Vec<User> {
    let n = users.len() as f64;
    let interval = if rate > 0.0 { n / rate } else { 0.0 };
    let end = Instant::now() + Duration::from_secs_f64(seconds);
    let tasks = users
        .into_iter()
        .map(|mut u| {
            tokio::spawn(async move {
                let mut rng = Rng::seeded();
                let mut next = Instant::now() + Duration::from_secs_f64(interval * rng.unit());
                loop {
                    sleep_until(next.into()).await;
                    if Instant::now() >= end {
                        return u;
                    }
                    let slot = rng.below(u.slots() as u64) as usize;
                    if u.is_open(slot) {
                        u.close(slot).await;
                    } else {
                        u.open(slot).await;
                    }
                    next += Duration::from_secs_f64(interval * (0.5 + rng.unit()));
                    if interval == 0.0 {
                        tokio::task::yield_now().await;
                    }
                }
            })
        })
        .collect();
    join_users(tasks).await
}

/// Waits for the observers to agree with the truth, then compares the
/// gateway's answers with it.
async fn check(
    phase: &str,
    observers: &mut [Observer],
    users: &[User],
    names: &Names,
) -> anyhow::Result<Comparison> {
    let online: Vec<bool> = users.iter().map(User::online).collect();
    let in_room: Vec<bool> = users.iter().map(User::in_room).collect();
    let deadline = Instant::now() + STEP_TIMEOUT;
    let mut settled = true;
    for o in observers.iter_mut() {
        settled &= o.settle(&online, &in_room, deadline, QUIET_WINDOW).await;
    }
    // Each observer is its own client: any of them can ask.
    let gateway = observers[0].query_all(&names.users).await?;
    for o in observers.iter_mut() {
        o.count_final_misses(&gateway, &in_room);
    }
    let mut room_mismatches = 0;
    for room in &names.rooms {
        let members = observers[0].room_members(room).await?;
        for (i, u) in users.iter().enumerate() {
            let truth = u.room.as_deref() == Some(room.as_str()) && in_room[i];
            if truth != members.contains(&i) {
                room_mismatches += 1;
            }
        }
    }
    Ok(Comparison {
        phase: phase.to_owned(),
        observers_settled: settled,
        presence_mismatches: gateway
            .iter()
            .zip(&online)
            .filter(|((g, _), t)| g != *t)
            .count() as u64,
        room_mismatches,
        users_online: online.iter().filter(|o| **o).count() as u64,
    })
}
