//! A shard: the users of one process, and what they do. Without `--procs`
//! the one shard runs in the coordinator's process; with it, each worker
//! process runs one (see [`crate::worker`]). Either way the coordinator
//! talks to it through the same messages:
//!
//! 1. the shard builds its users and says [`ShardMsg::Ready`];
//! 2. on [`Order::Go`] it runs the action phase (opens, churn, or opens
//!    then leaves/joins, or opens then cursor moves), and for `fanout`
//!    waits until every member tab's view equals the truth and checks each
//!    member's events exactly (for `cursors`, until every member holds
//!    every other member's last state, and checks each member's `updated`
//!    frames); then it reports the truth at that moment
//!    ([`ShardMsg::Held`]);
//! 3. `nodeloss` only: on [`Order::Lose`] it kills the gateway, lets the
//!    chosen users' tabs come back on the surviving nodes and reports the
//!    truth then ([`ShardMsg::Lost`]);
//! 4. on [`Order::Close`] it closes every tab (a sign-out, 1000) and
//!    reports its counts, its histograms and every user's true transitions
//!    ([`ShardMsg::Done`]), from which the coordinator checks the
//!    observers' events.
//!
//! With the gateways' offline grace, the action phase ends only once every
//! grace its closes started surely ran out, so the checks see a settled
//! truth.
//!
//! Every user lives in exactly one shard, and every member of a room in
//! the room's shard, so each truth a check needs is known where it runs.
//!
//! A tab's trouble (refused, closed by the gateway, no reply) is counted by
//! kind and the run goes on; what stops a shard is a [`ShardFailure`],
//! which crosses to the coordinator as [`ShardMsg::Failed`].

use std::{
    collections::BTreeMap,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};
use tokio::{
    sync::{Semaphore, mpsc},
    task::JoinHandle,
    time::{sleep, sleep_until},
};

use crate::{
    clock::{RunClock, Stamp},
    cursor::{StateChecks, UpdateTally},
    layout::Layout,
    options::{Options, Scenario},
    rng::Rng,
    stats::{EventKind, HistogramData, KindHistograms, Progress, Shared},
    step::Step,
    tab::{CloseAs, RoomIndex},
    target::Target,
    truth::{EventChecks, TruthLog, WindowOfUser, check_window},
    user::{Membership, User},
    ws::STEP_TIMEOUT,
};

/// Most connects in flight at once when opens are unpaced.
const MAX_CONNECTS_IN_FLIGHT: usize = 256;
/// How often a shard reports its counters for the progress line.
const PROGRESS_INTERVAL: Duration = Duration::from_millis(250);
/// After every member's view matched the truth: how long to keep
/// listening so a late duplicate shows.
pub const QUIET_WINDOW: Duration = Duration::from_secs(1);
/// How often the members' views are compared with the truth while
/// settling.
const SETTLE_POLL: Duration = Duration::from_millis(100);

/// What a shard is asked to run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ShardSpec {
    /// The scenario.
    pub scenario: Scenario,
    /// The run's options.
    pub opts: Options,
    /// This shard's number (`0 .. procs`).
    pub shard: usize,
    /// The run's name prefix.
    pub run: String,
    /// The run's start, for [`RunClock::joined`].
    pub clock_start_unix_ns: u128,
}

/// The coordinator's orders.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Order {
    /// Run the action phase.
    Go,
    /// `nodeloss`: kill the gateway, bring the returning tabs back.
    Lose,
    /// Close every tab and report.
    Close,
}

/// A shard's messages to the coordinator.
#[derive(Debug, Serialize, Deserialize)]
pub enum ShardMsg {
    /// Users built; waiting for [`Order::Go`].
    Ready,
    /// Counters so far.
    Progress(Progress),
    /// The action phase is over.
    Held(Box<Held>),
    /// `nodeloss`: the gateway was killed and the returning tabs are back.
    Lost(Box<Lost>),
    /// Every tab closed.
    Done(Box<ShardReport>),
    /// The shard could not go on.
    Failed(ShardFailure),
}

/// Why a shard could not go on. Each reads after "shard K" in the failure
/// line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum ShardFailure {
    /// The shard (its worker process) could not start.
    #[error("could not start: {0}")]
    Start(String),
    /// Nothing came from the shard (not even progress) for this long.
    #[error("sent nothing for {0} s")]
    Silent(u64),
    /// The shard's messages ended before it reported (its process exited).
    #[error("ended before reporting (see its stderr above)")]
    Ended,
    /// A worker's message line could not be read.
    #[error("sent an unreadable message: {0}")]
    Unreadable(String),
    /// A message that does not fit the step.
    #[error("sent a message out of turn")]
    OutOfTurn,
    /// The coordinator's orders stopped (it went away).
    #[error("lost its coordinator")]
    Orphaned,
    /// `nodeloss`: the gateway could not be killed.
    #[error("could not kill the gateway: {0}")]
    Kill(String),
    /// A user's task panicked (a bug of the tool).
    #[error("lost user {user}: its task panicked: {message}")]
    UserPanicked {
        /// The user id.
        user: String,
        /// The panic's message.
        message: String,
    },
}

/// The state at the end of the action phase.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Held {
    /// `(user, online, in its room)`, as the truth has it.
    pub users: Vec<(usize, bool, bool)>,
    /// Tabs open.
    pub open_tabs: u64,
    /// Tabs welcomed during the opens.
    pub connects_in_opens: u64,
    /// Opens (storm, hold, before a fanout), or the churn: first and last
    /// moment.
    pub opens: (Stamp, Stamp),
    /// The leaves and joins of a fanout.
    pub fanout: Option<FanoutShard>,
    /// The cursor moves of `cursors`.
    pub cursors: Option<CursorShard>,
}

/// `nodeloss`: the state once the killed node's returning users are back.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Lost {
    /// `(user, online, in its room)`, as the truth has it (the users who
    /// do not come back are offline once the reap and their grace are
    /// over).
    pub users: Vec<(usize, bool, bool)>,
    /// When the kill was sent.
    pub kill: Stamp,
    /// The users whose tab was on the killed node.
    pub lost: Vec<usize>,
    /// Of those, the users whose tab came back on a surviving node.
    pub returned: Vec<usize>,
    /// When the last returning tab was welcomed.
    pub returns_done: Stamp,
}

/// A shard's `fanout` results.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct FanoutShard {
    /// First and last moment of the leaves and joins.
    pub actions: (Stamp, Stamp),
    /// Leaves and joins done.
    pub room_actions: u64,
    /// `joined`/`left` transitions they caused.
    pub transitions: u64,
    /// Member windows (stays of a tab in its room) checked.
    pub windows: u64,
    /// Events the member tabs received.
    pub member_events: u64,
    /// Of those, events that arrived during the leaves and joins.
    pub member_events_in_actions: u64,
    /// Member checks.
    pub member: EventChecks,
    /// Windows whose join snapshot fits no moment of the join.
    pub snapshot_mismatches: u64,
    /// Whether every member's view reached the truth in time.
    pub settled: bool,
    /// Latency histograms per kind (joined, left) at the members.
    pub latency: [HistogramData; 4],
}

/// A shard's `cursors` results.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CursorShard {
    /// The first `update` sent and the last.
    pub moves: (Stamp, Stamp),
    /// What the replies to the `update`s said.
    pub updates: UpdateTally,
    /// `(user, n of its last state sent)` (0: it sent none).
    pub finals: Vec<(usize, u64)>,
    /// What the members' `updated` frames showed.
    pub member: StateChecks,
    /// Of the deliveries, those that arrived during the moves.
    pub delivered_in_moves: u64,
    /// (member, other member) pairs where the member does not hold the
    /// other's last state (must be 0).
    pub unconverged: u64,
    /// Whether every member held every last state in time.
    pub settled: bool,
    /// `update` sent → its `updated` at each member (matched by `n`).
    pub latency: HistogramData,
}

/// What a shard measured, at the end.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ShardReport {
    /// Tabs welcomed.
    pub connects: u64,
    /// Tabs closed.
    pub closes: u64,
    /// Connect latencies.
    pub connect_latency: HistogramData,
    /// Errors by kind.
    pub errors: BTreeMap<String, u64>,
    /// The first error of each kind, said in full.
    pub first_errors: BTreeMap<String, String>,
    /// Every user's true transitions.
    pub truth: Vec<(usize, TruthLog)>,
}

/// Runs shard `spec.shard` until it reported [`ShardMsg::Done`]; `orders`
/// come from the coordinator, `out` goes to it.
pub async fn run(
    spec: ShardSpec,
    clock: RunClock,
    mut orders: mpsc::UnboundedReceiver<Order>,
    out: mpsc::UnboundedSender<ShardMsg>,
) -> Result<(), ShardFailure> {
    let (scenario, opts) = (spec.scenario, &spec.opts);
    let targets: Vec<Target> = opts
        .targets
        .iter()
        .map(|t| Target::parse(t))
        .collect::<anyhow::Result<_>>()
        .map_err(|e| ShardFailure::Start(format!("{e:#}")))?;
    let layout = Layout::with_run(spec.run.clone(), scenario, opts);
    let shared = Arc::new(Shared::new(clock));
    let prefix: Arc<str> = layout.user_prefix().into();
    let rooms: BTreeMap<usize, Arc<RoomIndex>> = (0..layout.rooms)
        .filter(|r| r % layout.shards == spec.shard)
        .map(|r| {
            let room = RoomIndex::new(layout.room_name(r), layout.members(r));
            (r, Arc::new(room))
        })
        .collect();
    let users: Vec<User> = layout
        .users_of_shard(spec.shard)
        .map(|i| {
            let membership = layout.room_of(i).map(|r| Membership {
                room: Arc::clone(&rooms[&r]),
                receivers: matches!(scenario, Scenario::Fanout | Scenario::Cursors),
                user_prefix: Arc::clone(&prefix),
            });
            User::new(
                i,
                layout.user_name(i),
                membership,
                opts.tabs,
                &targets,
                &opts.source_addrs,
                Arc::clone(&shared),
            )
            .with_grace(Duration::from_millis(opts.offline_grace_ms))
        })
        .collect();

    let reporter = {
        let (shared, out) = (Arc::clone(&shared), out.clone());
        AbortOnDrop(tokio::spawn(async move {
            loop {
                let _ = out.send(ShardMsg::Progress(shared.progress()));
                sleep(PROGRESS_INTERVAL).await;
            }
        }))
    };
    let _ = out.send(ShardMsg::Ready);
    if orders.recv().await != Some(Order::Go) {
        return Err(ShardFailure::Orphaned);
    }
    shared.set_step(Step::Actions(scenario));

    let procs = layout.shards as f64;
    let rate = opts.rate_for(scenario) / procs;
    let opens_start = clock.now();
    let mut users = match scenario {
        Scenario::Storm | Scenario::Hold | Scenario::Nodeloss => open_all(users, rate).await?,
        Scenario::Churn if opts.reload_ms > 0 => {
            let after = Duration::from_millis(opts.reload_ms);
            churn(users, rate, opts.duration, move |u| {
                Box::pin(u.churn_step(Some(after)))
            })
            .await?
        }
        Scenario::Churn => {
            churn(users, rate, opts.duration, |u| Box::pin(u.churn_step(None))).await?
        }
        Scenario::Fanout | Scenario::Cursors => open_all(users, opts.open_rate / procs).await?,
    };
    let opens = (opens_start, clock.now());
    let connects_in_opens = shared.connects.load(Relaxed);
    let fanout = if scenario == Scenario::Fanout {
        let start = clock.now();
        let transitions_before: usize = users.iter().map(|u| u.log.room.len()).sum();
        let actions = Arc::new(AtomicU64::new(0));
        let counter = Arc::clone(&actions);
        users = churn(users, rate, opts.duration, move |u| {
            counter.fetch_add(1, Relaxed);
            Box::pin(u.fanout_step())
        })
        .await?;
        let end = clock.now();
        let transitions: usize = users.iter().map(|u| u.log.room.len()).sum();
        let mut f = check_members(&users).await;
        f.actions = (start, end);
        f.room_actions = actions.load(Relaxed);
        f.transitions = (transitions - transitions_before) as u64;
        f.member_events_in_actions = count_member_events(&users, start, end);
        Some(f)
    } else {
        None
    };
    let cursors = if scenario == Scenario::Cursors {
        let c;
        (users, c) = move_cursors(users, opts.rate_for(scenario), opts.duration, &clock).await?;
        Some(c)
    } else {
        None
    };
    let mut users = let_graces_run_out(users).await?;
    let held = Held {
        users: states(&users),
        open_tabs: shared.open.load(Relaxed),
        connects_in_opens,
        opens,
        fanout,
        cursors,
    };
    let _ = out.send(ShardMsg::Held(Box::new(held)));
    shared.set_step(Step::Held);
    let mut order = orders.recv().await;
    if scenario == Scenario::Nodeloss && order == Some(Order::Lose) {
        shared.set_step(Step::Loss);
        let lost;
        (users, lost) = lose_a_node(users, opts, &targets, &shared).await?;
        let _ = out.send(ShardMsg::Lost(Box::new(lost)));
        shared.set_step(Step::Held);
        order = orders.recv().await;
    }
    if order != Some(Order::Close) {
        return Err(ShardFailure::Orphaned);
    }
    shared.set_step(Step::CloseAll);

    let users = close_all(users).await?;
    drop(reporter);
    let _ = out.send(ShardMsg::Progress(shared.progress()));
    let report = ShardReport {
        connects: shared.connects.load(Relaxed),
        closes: shared.closes.load(Relaxed),
        connect_latency: shared.connect_latency(),
        errors: shared.errors(),
        first_errors: shared.first_errors(),
        truth: users.into_iter().map(|u| (u.index, u.log)).collect(),
    };
    let _ = out.send(ShardMsg::Done(Box::new(report)));
    Ok(())
}

/// `(user, online, in its room)` of every user, as the truth has it.
fn states(users: &[User]) -> Vec<(usize, bool, bool)> {
    users
        .iter()
        .map(|u| (u.index, u.online(), u.in_room()))
        .collect()
}

/// Waits until every grace a user is in surely ran out (see
/// [`User::let_grace_run_out`]), all users at once.
async fn let_graces_run_out(users: Vec<User>) -> Result<Vec<User>, ShardFailure> {
    let names = users.iter().map(|u| u.name.clone()).collect();
    let tasks = users
        .into_iter()
        .map(|mut u| {
            tokio::spawn(async move {
                u.let_grace_run_out().await;
                u
            })
        })
        .collect();
    join_users(names, tasks).await
}

/// `nodeloss`: kills the gateway `--kill-pid` (target `--kill-target`)
/// with SIGKILL, then lets `--return-fraction` of its users (chosen at
/// random) reconnect to the surviving targets, spread evenly over
/// `--return-within-ms` after the kill; the others never come back.
async fn lose_a_node(
    mut users: Vec<User>,
    opts: &Options,
    targets: &[Target],
    shared: &Shared,
) -> Result<(Vec<User>, Lost), ShardFailure> {
    let (Some(pid), Some(k)) = (opts.kill_pid, opts.kill_target) else {
        return Err(ShardFailure::Kill("no --kill-pid / --kill-target".into()));
    };
    let dead = k as u16;
    for u in &users {
        u.expect_loss(dead);
    }
    let kill_at = Instant::now();
    let kill = shared.clock.now();
    // `kill(1)`, not a libc binding: the tool has no unsafe code.
    let status = tokio::process::Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .await
        .map_err(|e| ShardFailure::Kill(format!("kill -KILL {pid}: {e}")))?;
    if !status.success() {
        return Err(ShardFailure::Kill(format!("kill -KILL {pid}: {status}")));
    }
    let lost: Vec<usize> = (0..users.len())
        .filter(|&p| users[p].target_of(0) == dead)
        .collect();
    for &p in &lost {
        users[p].lose(dead, (kill, kill_at));
    }
    // A random choice of the returning ones, in a random order.
    let mut order = lost.clone();
    let mut rng = Rng::seeded();
    for i in (1..order.len()).rev() {
        order.swap(i, rng.below(i as u64 + 1) as usize);
    }
    order.truncate((opts.return_fraction * lost.len() as f64).round() as usize);
    let survivors: Vec<u16> = (0..targets.len() as u16).filter(|&t| t != dead).collect();
    let within = Duration::from_millis(opts.return_within_ms);
    let mut back_at: Vec<Option<Instant>> = vec![None; users.len()];
    for (j, &p) in order.iter().enumerate() {
        let t = survivors[users[p].index % survivors.len()];
        users[p].retarget(0, &targets[t as usize], t);
        back_at[p] = Some(kill_at + within.mul_f64((j as f64 + 0.5) / order.len() as f64));
    }
    let names = users.iter().map(|u| u.name.clone()).collect();
    let tasks = users
        .into_iter()
        .zip(back_at)
        .map(|(mut u, at)| {
            tokio::spawn(async move {
                if let Some(at) = at {
                    sleep_until(at.into()).await;
                    u.open(0).await;
                }
                u
            })
        })
        .collect();
    let mut users = join_users(names, tasks).await?;
    let returns_done = shared.clock.now();
    let returned: Vec<usize> = order.iter().map(|&p| users[p].index).collect();
    for &p in &lost {
        users[p].stay_lost();
    }
    let lost = Lost {
        users: states(&users),
        kill,
        lost: lost.iter().map(|&p| users[p].index).collect(),
        returned,
        returns_done,
    };
    Ok((users, lost))
}

/// A task that stops when this handle goes.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
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

/// What the users' tasks returned (`names` in the same order, for the
/// failure if one panicked).
async fn join_users<T>(
    names: Vec<String>,
    tasks: Vec<JoinHandle<T>>,
) -> Result<Vec<T>, ShardFailure> {
    let mut users = Vec::with_capacity(tasks.len());
    for (name, t) in names.into_iter().zip(tasks) {
        // Every step of a user is bounded (STEP_TIMEOUT), so its task ends.
        match t.await {
            Ok(u) => users.push(u),
            Err(e) => {
                let message = match e.try_into_panic() {
                    Ok(p) => p
                        .downcast_ref::<&str>()
                        .map(|s| (*s).to_owned())
                        .or_else(|| p.downcast_ref::<String>().cloned())
                        .unwrap_or_default(),
                    Err(e) => e.to_string(),
                };
                return Err(ShardFailure::UserPanicked {
                    user: name,
                    message,
                });
            }
        }
    }
    Ok(users)
}

/// Opens every tab of every user, paced at `rate` opens a second.
async fn open_all(users: Vec<User>, rate: f64) -> Result<Vec<User>, ShardFailure> {
    let pacer = Pacer::new(rate);
    let names = users.iter().map(|u| u.name.clone()).collect();
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
    join_users(names, tasks).await
}

/// Closes every open tab, all users at once.
async fn close_all(users: Vec<User>) -> Result<Vec<User>, ShardFailure> {
    let names = users.iter().map(|u| u.name.clone()).collect();
    let tasks = users
        .into_iter()
        .map(|mut u| {
            tokio::spawn(async move {
                u.close_all().await;
                u
            })
        })
        .collect();
    join_users(names, tasks).await
}

/// One action of a user, as a boxed future (so both churn and fanout
/// steps fit one driver).
type Action = dyn for<'a> Fn(&'a mut User) -> std::pin::Pin<Box<dyn Future<Output = ()> + Send + 'a>>
    + Send
    + Sync;

/// For `seconds`, each user makes one `step` about every `users / rate`
/// seconds, with jitter, so the whole shard makes about `rate` actions a
/// second; a user's actions never overlap.
async fn churn<F>(
    users: Vec<User>,
    rate: f64,
    seconds: f64,
    step: F,
) -> Result<Vec<User>, ShardFailure>
where
    F: for<'a> Fn(&'a mut User) -> std::pin::Pin<Box<dyn Future<Output = ()> + Send + 'a>>
        + Send
        + Sync
        + 'static,
{
    let step: Arc<Action> = Arc::new(step);
    let n = users.len() as f64;
    let interval = if rate > 0.0 { n / rate } else { 0.0 };
    let end = Instant::now() + Duration::from_secs_f64(seconds);
    let names = users.iter().map(|u| u.name.clone()).collect();
    let tasks = users
        .into_iter()
        .map(|mut u| {
            let step = Arc::clone(&step);
            tokio::spawn(async move {
                let mut rng = Rng::seeded();
                let mut next = Instant::now() + Duration::from_secs_f64(interval * rng.unit());
                loop {
                    sleep_until(next.into()).await;
                    if Instant::now() >= end {
                        return u;
                    }
                    step(&mut u).await;
                    next += Duration::from_secs_f64(interval * (0.5 + rng.unit()));
                    if interval == 0.0 {
                        tokio::task::yield_now().await;
                    }
                }
            })
        })
        .collect();
    join_users(names, tasks).await
}

impl User {
    /// One `churn` action: toggle a random tab slot (open it if closed,
    /// close it with 1001 if open). With `reload`, an open slot is
    /// reloaded instead (closed, re-opened that much later) half the time.
    pub async fn churn_step(&mut self, reload: Option<Duration>) {
        let mut rng = Rng::seeded();
        let slot = rng.below(self.slots() as u64) as usize;
        if !self.is_open(slot) {
            self.open(slot).await;
        } else if let Some(after) = reload.filter(|_| rng.below(2) == 0) {
            self.reload(slot, after).await;
        } else {
            self.close(slot, CloseAs::Away).await;
        }
    }
}

/// Waits until every member tab's view of its room equals the truth (or
/// the step timeout passes), listens a little longer for late duplicates,
/// then checks every window of every member tab exactly.
async fn check_members(users: &[User]) -> FanoutShard {
    let in_room: BTreeMap<usize, bool> = users.iter().map(|u| (u.index, u.in_room())).collect();
    let deadline = Instant::now() + STEP_TIMEOUT;
    let settled = loop {
        let all = users.iter().flat_map(User::open_logs).all(|log| {
            let l = log.lock().unwrap_or_else(|e| e.into_inner());
            l.windows.last().is_none_or(|w| {
                w.left.is_some()
                    || l.room
                        .users
                        .iter()
                        .zip(&w.view)
                        .all(|(u, v)| in_room[u] == *v)
            })
        });
        if all {
            break true;
        }
        if Instant::now() >= deadline {
            break false;
        }
        sleep(SETTLE_POLL).await;
    };
    sleep(QUIET_WINDOW).await;

    let truth: BTreeMap<usize, &TruthLog> = users.iter().map(|u| (u.index, &u.log)).collect();
    let mut latency = KindHistograms::default();
    let mut f = FanoutShard {
        settled,
        ..Default::default()
    };
    for u in users {
        for log in u.open_logs() {
            let l = log.lock().unwrap_or_else(|e| e.into_inner());
            f.member_events += l.events;
            for w in &l.windows {
                f.windows += 1;
                f.member.duplicated += w.after_leave;
                for (p, &member) in l.room.users.iter().enumerate() {
                    let view = WindowOfUser {
                        joined: Some(w.joined),
                        in_snapshot: w.snapshot[p],
                        own_before: (member == u.index).then_some(w.own_before),
                        events: &w.events[p],
                        left: w.left,
                        after_leave: 0,
                    };
                    let c = check_window(&truth[&member].room, &view, &mut |t, at| {
                        latency.record(EventKind::of(true, t.to), at.saturating_sub(t.sent));
                    });
                    f.member.add(&c.events);
                    f.snapshot_mismatches += u64::from(c.snapshot_mismatch);
                }
            }
        }
    }
    f.latency = latency.data();
    f
}

/// Member events that arrived within `[start, end]`.
fn count_member_events(users: &[User], start: Stamp, end: Stamp) -> u64 {
    let mut n = 0;
    for log in users.iter().flat_map(User::open_logs) {
        let l = log.lock().unwrap_or_else(|e| e.into_inner());
        for w in &l.windows {
            n += w
                .events
                .iter()
                .flatten()
                .filter(|e| (start..=end).contains(&e.at))
                .count() as u64;
        }
    }
    n
}

/// `cursors`: every user sends `update`s of its room at `rate` a second
/// for `seconds` (each starting at a random point of the first period, so
/// the sends spread), then waits for their replies; then every member's
/// states are checked against each sender's last one ([`check_cursors`]).
async fn move_cursors(
    users: Vec<User>,
    rate: f64,
    seconds: f64,
    clock: &RunClock,
) -> Result<(Vec<User>, CursorShard), ShardFailure> {
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(seconds);
    let first = clock.now();
    let names = users.iter().map(|u| u.name.clone()).collect();
    let tasks = users
        .into_iter()
        .map(|mut u| {
            tokio::spawn(async move {
                let offset = Duration::from_secs_f64(Rng::seeded().unit() / rate);
                let sent = u.move_cursor(rate, start + offset, end).await;
                let tally = u.cursor_replies().await;
                (u, sent, tally)
            })
        })
        .collect();
    let moved = join_users(names, tasks).await?;
    let mut users = Vec::with_capacity(moved.len());
    let mut sends = BTreeMap::new();
    let mut updates = UpdateTally::default();
    let mut last = first;
    for (u, sent, tally) in moved {
        updates.add(&tally);
        last = last.max(sent.last().copied().unwrap_or(first));
        sends.insert(u.index, sent);
        users.push(u);
    }
    let mut c = check_cursors(&users, &sends, (first, last)).await;
    c.updates = updates;
    Ok((users, c))
}

/// Waits until every member tab holds every other member's last state
/// (or the step timeout passes), listens a little longer for late
/// repeats, then sums the members' checks and times each delivery from
/// the send of the state it carries (`sends[user][n - 1]`).
async fn check_cursors(
    users: &[User],
    sends: &BTreeMap<usize, Vec<Stamp>>,
    moves: (Stamp, Stamp),
) -> CursorShard {
    let finals: BTreeMap<usize, u64> = sends.iter().map(|(&u, s)| (u, s.len() as u64)).collect();
    let unconverged = || -> u64 {
        users
            .iter()
            .flat_map(User::open_logs)
            .map(|log| {
                let l = log.lock().unwrap_or_else(|e| e.into_inner());
                let room_finals: Vec<u64> = l
                    .room
                    .users
                    .iter()
                    .map(|u| finals.get(u).copied().unwrap_or_default())
                    .collect();
                l.states.unconverged(&room_finals, l.own)
            })
            .sum()
    };
    let deadline = Instant::now() + STEP_TIMEOUT;
    let settled = loop {
        if unconverged() == 0 {
            break true;
        }
        if Instant::now() >= deadline {
            break false;
        }
        sleep(SETTLE_POLL).await;
    };
    sleep(QUIET_WINDOW).await;

    let mut latency = crate::stats::new_histogram();
    let mut c = CursorShard {
        moves,
        finals: finals.iter().map(|(&u, &n)| (u, n)).collect(),
        unconverged: unconverged(),
        settled,
        ..Default::default()
    };
    for log in users.iter().flat_map(User::open_logs) {
        let l = log.lock().unwrap_or_else(|e| e.into_inner());
        c.member.add(&l.states.checks);
        for d in &l.states.deliveries {
            if (moves.0..=moves.1).contains(&d.at) {
                c.delivered_in_moves += 1;
            }
            let sent = sends
                .get(&l.room.users[d.sender])
                .and_then(|s| s.get(d.n as usize - 1));
            if let Some(&sent) = sent {
                crate::stats::Latency::record_us(&mut latency, d.at.saturating_sub(sent));
            }
        }
    }
    c.latency = HistogramData::of(&latency);
    c
}
