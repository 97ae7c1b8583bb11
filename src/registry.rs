//! The [`PresenceRegistry`] actor: one per node, the only writer to the store.
//!
//! Every `Conn` tells it what changed (connected, disconnected, a request)
//! through its worker's [`RegistryLink`]; it queues these as ops and writes them in batches: one
//! [`Store::apply`] call (for Redis, one pipelined `MULTI`/`EXEC`) per
//! batch. A batch starts when the previous one has returned and either the
//! queue holds `--batch-max` ops or `--batch-linger-ms` has passed since the
//! previous batch returned; an op after a quiet spell goes at once. A storm
//! of thousands of connects therefore costs a handful of round trips.
//!
//! It also keeps this node's view of its own connections (user, rooms,
//! metadata): a disconnect becomes the right leaves, and that view is the
//! truth the node reasserts ([`StoreOp::Reassert`]) whenever the store may
//! have lost or doubled its writes: a failed batch, a lease found gone
//! (reaped while alive, or Redis restarted empty). While the store fails,
//! writes are not queued one by one: the next reassert carries their sum,
//! so an outage costs memory bounded by the live connections, and only
//! requests waiting for an answer queue (bounded by `--max-pending`).
//!
//! Events: with the memory store, a batch's transitions are delivered from
//! its outcomes. With a shared store, every node (this one included) hears
//! every transition from the store's [`feed`](Store::feed), numbered in the
//! order the store decided them; replies to this node's requests are held
//! until the events before them have been delivered, so a joiner still gets
//! its snapshot exactly between the events before and after it. Everything
//! is serialized once and sent to every worker's [`Broadcaster`] as one
//! ordered [`Dispatch`]. The registry also reaps dead nodes every second
//! and drains this one on shutdown. It never touches a socket.

use std::{
    cell::RefCell,
    collections::{HashMap, HashSet, VecDeque},
    future::Future,
    rc::Rc,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use actix::prelude::*;
use futures_util::stream::BoxStream;
use serde_json::Value;
use tokio::sync::oneshot;
use tracing::{debug, info, warn};

use crate::{
    broadcast::{Audience, Broadcaster, Delivery, Dispatch, SubChange, Subscriptions, UserSync},
    ids::{ConnId, RoomName, UserId},
    metrics::{FrameKind, metrics},
    protocol::{self, ErrorCode, Event, Member, Reason, ReplyBody, Request, UserState},
    store::{
        Applied, FeedItem, NodeState, Outcome, RoomMember, Store, StoreError, StoreOp, UserPresence,
    },
};

/// First wait before retrying a failed batch.
const RETRY_MIN: Duration = Duration::from_millis(50);
/// Longest wait between retries of a failed batch.
const RETRY_MAX: Duration = Duration::from_secs(2);
/// How often the cluster-wide users-online gauge is re-read from the store.
pub const USERS_ONLINE_REFRESH: Duration = Duration::from_secs(2);
/// How often expired node leases are looked for.
pub const REAP_INTERVAL: Duration = Duration::from_secs(1);
/// Longest a reply waits for the feed to deliver the events before it; past
/// this (events lost with a subscription) it goes anyway.
pub const REPLY_WAIT_MAX: Duration = Duration::from_secs(1);

/// What `/readyz` reports, shared with the HTTP workers.
#[derive(Debug, Default)]
pub struct Health {
    /// The last store write or lease refresh succeeded.
    store_ok: AtomicBool,
    /// The node is draining.
    draining: AtomicBool,
}

impl Health {
    /// Ready for traffic: the store answers and the node is not draining.
    pub fn ready(&self) -> bool {
        self.store_ok.load(Ordering::Relaxed) && !self.draining.load(Ordering::Relaxed)
    }

    /// Whether the node is draining.
    pub fn draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    fn set_store_ok(&self, ok: bool) {
        if self.store_ok.swap(ok, Ordering::Relaxed) != ok {
            if ok {
                info!("presence store answers again");
            } else {
                warn!("presence store unavailable; /readyz answers 503");
            }
        }
    }
}

/// Batching knobs, from the config.
#[derive(Debug, Clone, Copy)]
pub struct Batching {
    /// Most ops in one batch.
    pub max: usize,
    /// Shortest time between a batch's return and the next batch's start.
    pub linger: Duration,
    /// Interval between node lease refreshes.
    pub lease_refresh: Duration,
    /// Most requests waiting for the store; past it they are answered
    /// `unavailable` at once.
    pub max_pending: usize,
}

/// What a `Conn` tells the registry.
#[derive(Debug)]
pub enum ConnEvent {
    /// A connection came up on this node with its verified user and its
    /// metadata (a validated JSON object).
    Connected(ConnId, UserId, Option<Arc<str>>),
    /// A connection on this node went away, and why.
    Disconnected(ConnId, Reason),
    /// A client request that needs the store or changes subscriptions
    /// (never `Ping`: the Conn answers that itself), with its `ref`.
    Request(ConnId, Option<Value>, Request),
}

/// Several `ConnEvent`s from one worker, in the order they happened.
#[derive(Message)]
#[rtype(result = "()")]
pub struct ConnEvents(pub Vec<ConnEvent>);

/// A worker's line to the registry. `Conn`s on one worker tell it what
/// happened; whatever they tell it during one turn of the worker's event
/// loop crosses to the registry's thread as one message, not one each.
#[derive(Clone)]
pub struct RegistryLink(Rc<LinkInner>);

struct LinkInner {
    registry: Addr<PresenceRegistry>,
    queue: RefCell<Vec<ConnEvent>>,
}

impl RegistryLink {
    /// A link for the current worker.
    pub fn new(registry: Addr<PresenceRegistry>) -> Self {
        Self(Rc::new(LinkInner {
            registry,
            queue: RefCell::new(Vec::new()),
        }))
    }

    /// Queues `event`; the worker's queue is sent once the current tasks
    /// have run.
    pub fn send(&self, event: ConnEvent) {
        let mut queue = self.0.queue.borrow_mut();
        queue.push(event);
        if queue.len() == 1 {
            let link = self.0.clone();
            actix_rt::spawn(async move {
                tokio::task::yield_now().await;
                let events = std::mem::take(&mut *link.queue.borrow_mut());
                link.registry.do_send(ConnEvents(events));
            });
        }
    }
}

/// What to do with an op's outcome besides emitting its events.
enum Then {
    Nothing,
    /// The outcome of a reassert: its events (local delivery only).
    Reasserted,
    /// The presence of these watched users, as a `sync` to their watchers.
    SyncUsers(Vec<UserId>),
    /// This room's members, as a `sync` to its members.
    SyncRoom(RoomName),
    Join(ConnId, Option<Value>, RoomName),
    Leave(ConnId, Option<Value>, RoomName),
    Watch(ConnId, Option<Value>, Vec<UserId>),
    Query(ConnId, Option<Value>, Vec<UserId>),
    /// Answer without the store, in order with the rest.
    Reply(
        ConnId,
        tokio_tungstenite::tungstenite::Utf8Bytes,
        SubChange,
        FrameKind,
    ),
}

impl Then {
    /// The connection this answers, if any.
    fn conn(&self) -> Option<&ConnId> {
        match self {
            Then::Nothing | Then::Reasserted | Then::SyncUsers(_) | Then::SyncRoom(_) => None,
            Then::Join(c, ..)
            | Then::Leave(c, ..)
            | Then::Watch(c, ..)
            | Then::Query(c, ..)
            | Then::Reply(c, ..) => Some(c),
        }
    }

    /// Whether something waits for this op's outcome (it is not a bare
    /// write).
    fn answers(&self) -> bool {
        !matches!(self, Then::Nothing | Then::Reasserted)
    }
}

struct Pending {
    op: Option<StoreOp>,
    then: Then,
}

impl Pending {
    fn is_write(&self) -> bool {
        matches!(
            self.op,
            Some(
                StoreOp::Connect(_)
                    | StoreOp::Disconnect(..)
                    | StoreOp::Join(..)
                    | StoreOp::Leave(..)
                    | StoreOp::Attach(..)
                    | StoreOp::Detach(..)
                    | StoreOp::Reassert(..)
            )
        )
    }
}

struct LocalConn {
    user: UserId,
    meta: Option<Arc<str>>,
    rooms: HashSet<RoomName>,
}

/// Where this node's events come from.
enum Events {
    /// From each batch's outcomes (the memory store).
    Local,
    /// From the store's feed, numbered. `delivered`: the number of the last
    /// event delivered, `None` while unsubscribed. `waiting`: replies held
    /// until the events numbered up to their position have been delivered.
    /// `holding`: a batch with replies is in flight, so events from the
    /// feed (which may overtake its answer) wait in `held` until its
    /// replies can be put between them. `lost`: the feed was lost at least
    /// once, so a new subscription means events were missed.
    Feed {
        delivered: Option<u64>,
        waiting: VecDeque<(u64, Instant, Delivery)>,
        holding: bool,
        held: Vec<(u64, Event)>,
        lost: bool,
    },
}

/// The node's presence registry.
pub struct PresenceRegistry {
    store: Arc<dyn Store>,
    broadcasters: Vec<Addr<Broadcaster>>,
    batching: Batching,
    health: Arc<Health>,
    conns: HashMap<ConnId, LocalConn>,
    pending: VecDeque<Pending>,
    /// Requests (ops with an answer) in `pending`.
    waiting_requests: usize,
    /// The store may not hold exactly this node's connections: the next
    /// batch starts with a reassert, and queued writes are folded into it.
    reassert: bool,
    events: Events,
    in_flight: bool,
    timer_armed: bool,
    last_end: Option<Instant>,
    retry_at: Option<Instant>,
    retry_delay: Duration,
    /// Set by a drain: fired once its removals are written.
    drained: Option<oneshot::Sender<()>>,
    /// The queue overflowed since the last batch that went through (the
    /// warning is logged once per episode).
    overflowing: bool,
    /// The shared store's event feed, until the actor starts reading it.
    feed: Option<BoxStream<'static, FeedItem>>,
}

impl PresenceRegistry {
    /// A registry writing to `store` and fanning out to `broadcasters`.
    pub fn new(
        store: Arc<dyn Store>,
        broadcasters: Vec<Addr<Broadcaster>>,
        batching: Batching,
        health: Arc<Health>,
    ) -> Self {
        // Connected at start-up (the Redis store took its lease).
        health.store_ok.store(true, Ordering::Relaxed);
        Self {
            store,
            broadcasters,
            batching,
            health,
            conns: HashMap::new(),
            pending: VecDeque::new(),
            waiting_requests: 0,
            reassert: false,
            events: Events::Local,
            in_flight: false,
            timer_armed: false,
            last_end: None,
            retry_at: None,
            retry_delay: RETRY_MIN,
            drained: None,
            overflowing: false,
            feed: None,
        }
    }

    /// Takes the shared store's event feed ([`Store::feed`]), already
    /// subscribed: events come from it instead of from batch outcomes.
    pub fn with_feed(mut self, feed: BoxStream<'static, FeedItem>) -> Self {
        self.feed = Some(feed);
        self
    }

    fn queue(&mut self, op: Option<StoreOp>, then: Then) {
        let answers = then.answers();
        if !answers && self.reassert {
            // A bare write: the reassert carries it.
            return;
        }
        if answers && self.waiting_requests >= self.batching.max_pending {
            metrics().store_queue_overflows.inc();
            if !self.overflowing {
                self.overflowing = true;
                warn!(
                    limit = self.batching.max_pending,
                    "store queue full; answering `unavailable` until the store catches up"
                );
            }
            if let Some(conn) = then.conn().copied() {
                let frame = protocol::error_frame(
                    reference_of(&then),
                    ErrorCode::Unavailable,
                    "the presence store is not keeping up; retry later",
                );
                metrics().errors_sent.get(ErrorCode::Unavailable).inc();
                self.send_to_workers(vec![Delivery::Reply {
                    conn,
                    frame,
                    change: SubChange::None,
                    kind: FrameKind::Error,
                }]);
            }
            return;
        }
        if !answers && self.pending.len() >= self.batching.max_pending.saturating_mul(4) {
            // The store is far behind: fold the queued writes into one
            // reassert instead of holding them one by one.
            metrics().store_queue_overflows.inc();
            if !self.overflowing {
                self.overflowing = true;
                warn!("store write queue full; folding it into a reassert");
            }
            self.reassert = true;
            return;
        }
        if answers {
            self.waiting_requests += 1;
        }
        self.pending.push_back(Pending { op, then });
    }

    /// This node's connections and rooms, as a reassert writes them.
    fn snapshot(&self, gone: Reason) -> NodeState {
        let mut rooms: HashMap<(&RoomName, &UserId), u64> = HashMap::new();
        let conns = self
            .conns
            .iter()
            .map(|(id, local)| {
                for room in &local.rooms {
                    *rooms.entry((room, &local.user)).or_default() += 1;
                }
                (local.user.clone(), *id, local.meta.clone())
            })
            .collect();
        NodeState {
            conns,
            rooms: rooms
                .into_iter()
                .map(|((room, user), n)| (room.clone(), user.clone(), n))
                .collect(),
            gone,
        }
    }

    /// Folds the queued writes into a reassert at the head of the queue;
    /// requests keep their place and get their answers from reads.
    fn fold_into_reassert(&mut self) {
        let gone = if self.drained.is_some() {
            Reason::Shutdown
        } else {
            Reason::Closed
        };
        let mut kept = VecDeque::with_capacity(self.pending.len() + 1);
        kept.push_back(Pending {
            op: Some(StoreOp::Reassert(Arc::new(self.snapshot(gone)))),
            then: Then::Reasserted,
        });
        for p in self.pending.drain(..) {
            match (p.op, p.then) {
                (Some(StoreOp::Join(room, _)), then @ Then::Join(..)) => kept.push_back(Pending {
                    op: Some(StoreOp::Members(room)),
                    then,
                }),
                (Some(StoreOp::Leave(..)), then @ Then::Leave(..)) => {
                    kept.push_back(Pending { op: None, then });
                }
                (_, Then::Nothing | Then::Reasserted) => {}
                (op, then) => kept.push_back(Pending { op, then }),
            }
        }
        self.pending = kept;
        self.reassert = false;
    }

    /// Starts a batch if one may start now, or arms a timer for when it may.
    fn maybe_flush(&mut self, ctx: &mut Context<Self>) {
        if self.in_flight || (self.pending.is_empty() && !self.reassert) {
            return;
        }
        let now = Instant::now();
        let full = self.pending.len() >= self.batching.max;
        let mut earliest = match self.last_end {
            Some(t) if !full => t + self.batching.linger,
            _ => now,
        };
        if let Some(retry) = self.retry_at {
            earliest = earliest.max(retry);
        }
        if earliest <= now {
            self.flush(ctx);
        } else if !self.timer_armed {
            self.timer_armed = true;
            ctx.run_later(earliest - now, |this, ctx| {
                this.timer_armed = false;
                this.maybe_flush(ctx);
            });
        }
    }

    fn flush(&mut self, ctx: &mut Context<Self>) {
        if self.reassert {
            self.fold_into_reassert();
        }
        // A drain writes its removals in one batch.
        let max = if self.drained.is_some() {
            usize::MAX
        } else {
            self.batching.max
        };
        let n = self.pending.len().min(max);
        // Answers for a connection that is gone have nobody to go to: drop
        // its reads and local replies rather than make everyone wait for
        // them. Its writes stay, in order, so its counts stay exact.
        let drained: Vec<Pending> = self.pending.drain(..n).collect();
        self.waiting_requests -= drained.iter().filter(|p| p.then.answers()).count();
        let conns = &self.conns;
        let batch: Vec<Pending> = drained
            .into_iter()
            .filter(|p| p.is_write() || p.then.conn().is_none_or(|c| conns.contains_key(c)))
            .collect();
        if batch.is_empty() {
            // Nothing left to write from this slice; the rest may still wait.
            self.maybe_flush(ctx);
            return;
        }
        let ops: Vec<StoreOp> = batch.iter().filter_map(|p| p.op.clone()).collect();
        if let Events::Feed { holding, .. } = &mut self.events {
            *holding = batch.iter().any(|p| p.then.answers());
        }
        self.in_flight = true;
        let started = Instant::now();
        let apply = self.store.apply(ops);
        ctx.spawn(apply.into_actor(self).map(move |result, this, ctx| {
            this.in_flight = false;
            this.last_end = Some(Instant::now());
            match result {
                Ok(applied) => {
                    let elapsed = started.elapsed();
                    metrics().batch_ops.observe(batch.len() as f64);
                    metrics().batch_seconds.observe(elapsed.as_secs_f64());
                    debug!(ops = batch.len(), ?elapsed, "batch written");
                    this.health.set_store_ok(true);
                    this.overflowing = false;
                    this.retry_at = None;
                    this.retry_delay = RETRY_MIN;
                    this.dispatch(batch, applied);
                }
                Err(e) => this.retry_later(batch, e),
            }
            // Events that overtook the batch's answer go now, with its
            // replies in between.
            if let Events::Feed { holding, held, .. } = &mut this.events {
                *holding = false;
                let held = std::mem::take(held);
                if !held.is_empty() {
                    this.on_feed(FeedItem::Events(held), ctx);
                }
            }
            this.check_drained(ctx);
            this.maybe_flush(ctx);
        }));
    }

    fn retry_later(&mut self, batch: Vec<Pending>, error: StoreError) {
        metrics().batch_failures.inc();
        if matches!(error, StoreError::LeaseLost) {
            // Reaped while alive, or Redis lost its data: nothing was
            // written; reassert at once.
            warn!("this node's lease is gone; reasserting its connections");
            self.retry_at = None;
        } else {
            self.health.set_store_ok(false);
            warn!(%error, ops = batch.len(), retry_in = ?self.retry_delay, "store write failed; will reassert and retry");
            self.retry_at = Some(Instant::now() + self.retry_delay);
            self.retry_delay = (self.retry_delay * 2).min(RETRY_MAX);
        }
        // The batch may or may not have been applied (a timeout after EXEC
        // was sent): a reassert is right either way. Its requests wait.
        for p in batch.into_iter().rev() {
            if p.then.answers() {
                self.waiting_requests += 1;
            }
            self.pending.push_front(p);
        }
        self.reassert = true;
    }

    fn dispatch(&mut self, batch: Vec<Pending>, applied: Applied) {
        let mut outcomes = applied.outcomes.into_iter();
        let mut position = applied.published_after;
        let local = matches!(self.events, Events::Local);
        let mut items = Vec::with_capacity(batch.len() * 2);
        let mut held = Vec::new();
        for Pending { op, then } in batch {
            let outcome = match &op {
                Some(_) => outcomes.next(),
                None => None,
            };
            let reasserted = match &outcome {
                Some(Outcome::Reasserted(events)) => events.clone(),
                _ => Vec::new(),
            };
            if let Some(reply) = reply_for(then, outcome.as_ref()) {
                match position {
                    Some(at) if !local => held.push((at, reply)),
                    _ => items.push(reply),
                }
            }
            let mut events = reasserted;
            if let (Some(op), Some(outcome)) = (op, outcome)
                && let Some(event) = event_for(op, outcome)
            {
                events.push(event);
            }
            for event in events {
                let delivery = event_delivery(&event);
                if let Delivery::Event { kind, .. } = &delivery {
                    metrics().events_published.get(*kind).inc();
                }
                if local {
                    items.push(delivery);
                }
                position = position.map(|p| p + 1);
            }
        }
        if let Events::Feed { waiting, .. } = &mut self.events {
            let now = Instant::now();
            waiting.extend(held.into_iter().map(|(at, reply)| (at, now, reply)));
        }
        self.release_replies(&mut items, None);
        self.send_to_workers(items);
    }

    /// Moves the held replies whose events have all been delivered (or
    /// that waited too long, or all when unsubscribed) to `items`; with
    /// `before`, only those positioned before that event.
    fn release_replies(&mut self, items: &mut Vec<Delivery>, before: Option<u64>) {
        let Events::Feed {
            delivered, waiting, ..
        } = &mut self.events
        else {
            return;
        };
        let now = Instant::now();
        while let Some((at, since, _)) = waiting.front() {
            let due = match (before, *delivered) {
                (Some(seq), _) => *at < seq,
                (None, Some(done)) => *at <= done,
                (None, None) => true,
            };
            let overdue = now.duration_since(*since) >= REPLY_WAIT_MAX;
            if !due && !overdue {
                break;
            }
            if overdue && !due {
                metrics().replies_released_late.inc();
            }
            if let Some((_, _, reply)) = waiting.pop_front() {
                items.push(reply);
            }
        }
    }

    /// What the feed brought: events in store order, with the replies
    /// that were waiting for them in between.
    fn on_feed(&mut self, item: FeedItem, ctx: &mut Context<Self>) {
        let mut items = Vec::new();
        match item {
            FeedItem::Subscribed { floor } => {
                if let Events::Feed {
                    delivered, lost, ..
                } = &mut self.events
                {
                    *delivered = Some(floor);
                    if *lost {
                        // Give every node (this one too) a moment to
                        // reassert, so the sync shows the settled truth;
                        // anything later arrives as events anyway.
                        ctx.run_later(self.batching.lease_refresh, |this, ctx| this.resync(ctx));
                    }
                }
            }
            FeedItem::Lost => {
                if let Events::Feed {
                    delivered, lost, ..
                } = &mut self.events
                {
                    *delivered = None;
                    *lost = true;
                }
            }
            FeedItem::Events(mut events) => {
                if let Events::Feed {
                    holding: true,
                    held,
                    ..
                } = &mut self.events
                {
                    held.append(&mut events);
                    return;
                }
                for (seq, event) in events {
                    self.release_replies(&mut items, Some(seq));
                    let delivery = event_delivery(&event);
                    if let Delivery::Event { kind, .. } = &delivery {
                        metrics().events_received.get(*kind).inc();
                    }
                    items.push(delivery);
                    if let Events::Feed { delivered, .. } = &mut self.events {
                        *delivered = Some(delivered.map_or(seq, |d| d.max(seq)));
                    }
                }
            }
        }
        self.release_replies(&mut items, None);
        self.send_to_workers(items);
    }

    /// Hands deliveries to every worker's broadcaster, in order.
    fn send_to_workers(&self, items: Vec<Delivery>) {
        if items.is_empty() {
            return;
        }
        let items: Arc<[Delivery]> = items.into();
        for b in &self.broadcasters {
            b.do_send(Dispatch(items.clone()));
        }
    }
}

/// An event serialized for its audience.
fn event_delivery(event: &Event) -> Delivery {
    let (audience, kind) = match event {
        Event::Online { user, .. } => (Audience::Watchers(user.clone()), FrameKind::Online),
        Event::Offline { user, .. } => (Audience::Watchers(user.clone()), FrameKind::Offline),
        Event::Joined { room, .. } => (Audience::Room(room.clone()), FrameKind::Joined),
        Event::Left { room, .. } => (Audience::Room(room.clone()), FrameKind::Left),
    };
    Delivery::Event {
        audience,
        frame: event.encode(),
        kind,
    }
}

/// The `ref` a queued answer echoes.
fn reference_of(then: &Then) -> Option<&Value> {
    match then {
        Then::Join(_, r, _)
        | Then::Leave(_, r, _)
        | Then::Watch(_, r, _)
        | Then::Query(_, r, _) => r.as_ref(),
        Then::Nothing
        | Then::Reasserted
        | Then::SyncUsers(_)
        | Then::SyncRoom(_)
        | Then::Reply(..) => None,
    }
}

/// The transition an op's outcome represents, if any.
fn event_for(op: StoreOp, outcome: Outcome) -> Option<Event> {
    match (op, outcome) {
        (StoreOp::Connect(user), Outcome::Connected(Some(seq))) => {
            Some(Event::Online { user, seq })
        }
        (StoreOp::Disconnect(user, reason), Outcome::Disconnected(Some((seq, last_seen)))) => {
            Some(Event::Offline {
                user,
                seq,
                last_seen,
                reason,
            })
        }
        (StoreOp::Join(room, user), Outcome::Joined(true, _)) => Some(Event::Joined { room, user }),
        (StoreOp::Leave(room, user, reason), Outcome::Left(true)) => {
            Some(Event::Left { room, user, reason })
        }
        _ => None,
    }
}

fn states(users: &[UserId], presence: &[UserPresence]) -> Vec<UserState> {
    users
        .iter()
        .zip(presence)
        .map(|(u, p)| UserState {
            user: u.to_string(),
            online: p.online,
            seq: p.seq,
        })
        .collect()
}

/// Room members as the wire shows them.
fn members_of(members: &[RoomMember]) -> Vec<Member> {
    members
        .iter()
        .map(|m| Member {
            user: m.user.to_string(),
            // Stored only after validation as a JSON object.
            meta: m.meta.as_deref().and_then(|t| serde_json::from_str(t).ok()),
        })
        .collect()
}

/// The reply an op's outcome answers, if the op came from a request.
fn reply_for(then: Then, outcome: Option<&Outcome>) -> Option<Delivery> {
    let reply = |conn, reference: Option<Value>, body: ReplyBody, change| Delivery::Reply {
        conn,
        frame: protocol::reply_frame(reference.as_ref(), &body),
        change,
        kind: FrameKind::Reply,
    };
    Some(match (then, outcome) {
        (Then::Nothing | Then::Reasserted, _) => return None,
        (Then::SyncUsers(users), Some(Outcome::Presence(p))) => {
            let states = users.iter().cloned().zip(states(&users, p)).collect();
            Delivery::SyncUsers(Arc::new(UserSync(states)))
        }
        (Then::SyncRoom(room), Some(Outcome::Members(members))) => Delivery::Event {
            frame: protocol::sync_room_frame(&room, &members_of(members)),
            audience: Audience::Room(room),
            kind: FrameKind::Sync,
        },
        (Then::Reply(conn, frame, change, kind), _) => Delivery::Reply {
            conn,
            frame,
            change,
            kind,
        },
        (
            Then::Join(conn, reference, room),
            Some(Outcome::Joined(_, members) | Outcome::Members(members)),
        ) => {
            let members = members_of(members);
            let body = ReplyBody::Joined {
                room: room.to_string(),
                members,
            };
            reply(conn, reference, body, SubChange::Join(room))
        }
        // No outcome: a leave folded into a reassert.
        (Then::Leave(conn, reference, room), Some(Outcome::Left(_)) | None) => {
            let body = ReplyBody::Left {
                room: room.to_string(),
            };
            reply(conn, reference, body, SubChange::Leave(room))
        }
        (Then::Watch(conn, reference, users), Some(Outcome::Presence(p))) => {
            let body = ReplyBody::Users {
                users: states(&users, p),
            };
            reply(conn, reference, body, SubChange::Watch(users))
        }
        (Then::Query(conn, reference, users), Some(Outcome::Presence(p))) => {
            let body = ReplyBody::Users {
                users: states(&users, p),
            };
            reply(conn, reference, body, SubChange::None)
        }
        (_, outcome) => {
            warn!(?outcome, "store outcome does not match its op");
            return None;
        }
    })
}

impl Actor for PresenceRegistry {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        self.refresh_lease(ctx);
        ctx.run_interval(self.batching.lease_refresh, |this, ctx| {
            this.refresh_lease(ctx);
        });
        self.refresh_users_online(ctx);
        ctx.run_interval(USERS_ONLINE_REFRESH, |this, ctx| {
            this.refresh_users_online(ctx);
        });
        if let Some(feed) = self.feed.take() {
            self.events = Events::Feed {
                delivered: None,
                waiting: VecDeque::new(),
                holding: false,
                held: Vec::new(),
                lost: false,
            };
            ctx.add_stream(feed);
            ctx.run_interval(REPLY_WAIT_MAX / 4, |this, _| {
                let mut items = Vec::new();
                this.release_replies(&mut items, None);
                this.send_to_workers(items);
            });
            ctx.run_interval(REAP_INTERVAL, |this, ctx| this.reap(ctx));
        }
    }
}

impl StreamHandler<FeedItem> for PresenceRegistry {
    fn handle(&mut self, item: FeedItem, ctx: &mut Context<Self>) {
        self.on_feed(item, ctx);
    }

    fn finished(&mut self, _: &mut Context<Self>) {
        // The feed task only ends with the process; never stop the registry.
        warn!("presence event feed ended");
    }
}

/// Removes every connection of this node from the store, as one batch
/// with reason `shutdown`; answers once it is written (or could not be).
/// From then on the registry ignores its connections.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Drain(pub oneshot::Sender<()>);

impl Handler<Drain> for PresenceRegistry {
    type Result = ();

    fn handle(&mut self, msg: Drain, ctx: &mut Context<Self>) {
        self.health.draining.store(true, Ordering::Relaxed);
        self.drained = Some(msg.0);
        let conns: Vec<ConnId> = self.conns.keys().copied().collect();
        info!(
            connections = conns.len(),
            "draining: removing this node's connections"
        );
        for conn in conns {
            self.disconnected(conn, Reason::Shutdown);
        }
        self.check_drained(ctx);
        self.maybe_flush(ctx);
    }
}

impl PresenceRegistry {
    /// Caches the store's count in a gauge, so a scrape never calls the store.
    fn refresh_users_online(&mut self, ctx: &mut Context<Self>) {
        ctx.spawn(
            self.store
                .stats()
                .into_actor(self)
                .map(|result, _, _| match result {
                    Ok(stats) => metrics().users_online.set(stats.users_online as i64),
                    Err(error) => warn!(%error, "users-online refresh failed"),
                }),
        );
    }

    fn refresh_lease(&mut self, ctx: &mut Context<Self>) {
        if self.drained.is_some() {
            return;
        }
        ctx.spawn(self.store.refresh_lease().into_actor(self).map(
            |result, this, ctx| match result {
                Ok(true) => {
                    // A failed batch already set it false, and only a
                    // batch may set it back.
                    if !this.reassert {
                        this.health.set_store_ok(true);
                    }
                }
                Ok(false) => {
                    warn!("this node's lease is gone; reasserting its connections");
                    this.health.set_store_ok(true);
                    this.reassert = true;
                    this.maybe_flush(ctx);
                }
                Err(error) => {
                    this.health.set_store_ok(false);
                    warn!(%error, "node lease refresh failed");
                }
            },
        ));
    }

    fn reap(&mut self, ctx: &mut Context<Self>) {
        ctx.spawn(
            self.store
                .reap()
                .into_actor(self)
                .map(|result, _, _| match result {
                    Ok(reaped) => {
                        for node in &reaped.nodes {
                            info!(%node, events = reaped.events, "reaped a dead node");
                        }
                        metrics().nodes_reaped.inc_by(reaped.nodes.len() as u64);
                    }
                    Err(error) => debug!(%error, "reaping dead nodes failed"),
                }),
        );
    }

    /// Events were missed (the feed was lost): reads the current presence
    /// of every user watched on this node and the members of every room
    /// joined on it, in order with the events, and sends each connection a
    /// `sync` with what it follows.
    fn resync(&mut self, ctx: &mut Context<Self>) {
        let asks: Vec<_> = self
            .broadcasters
            .iter()
            .map(|b| b.send(Subscriptions))
            .collect();
        ctx.spawn(futures_util::future::join_all(asks).into_actor(self).map(
            |answers, this, ctx| {
                let mut users = HashSet::new();
                let mut rooms = HashSet::new();
                for (u, r) in answers.into_iter().flatten() {
                    users.extend(u);
                    rooms.extend(r);
                }
                info!(
                    users = users.len(),
                    rooms = rooms.len(),
                    "events were missed; resyncing"
                );
                if !users.is_empty() {
                    let users: Vec<UserId> = users.into_iter().collect();
                    this.queue(
                        Some(StoreOp::Presence(users.clone())),
                        Then::SyncUsers(users),
                    );
                }
                for room in rooms {
                    this.queue(Some(StoreOp::Members(room.clone())), Then::SyncRoom(room));
                }
                this.maybe_flush(ctx);
            },
        ));
    }

    /// Fires the drain's answer once its removals are written and the
    /// lease is given up.
    fn check_drained(&mut self, ctx: &mut Context<Self>) {
        if self.in_flight || !self.pending.is_empty() || self.reassert {
            return;
        }
        let Some(done) = self.drained.take() else {
            return;
        };
        ctx.spawn(
            self.store
                .retire()
                .into_actor(self)
                .map(move |result, _, _| {
                    if let Err(error) = result {
                        warn!(%error, "could not give up the node lease; it will expire");
                    }
                    info!("drain written");
                    let _ = done.send(());
                }),
        );
    }
}

impl Handler<ConnEvents> for PresenceRegistry {
    type Result = ();

    fn handle(&mut self, msg: ConnEvents, ctx: &mut Context<Self>) {
        for event in msg.0 {
            match event {
                ConnEvent::Connected(conn, user, meta) => self.connected(conn, user, meta),
                ConnEvent::Disconnected(conn, reason) => self.disconnected(conn, reason),
                ConnEvent::Request(conn, reference, request) => {
                    self.request(conn, reference, request, ctx);
                }
            }
        }
        self.maybe_flush(ctx);
    }
}

impl PresenceRegistry {
    fn connected(&mut self, conn: ConnId, user: UserId, meta: Option<Arc<str>>) {
        if self.health.draining() {
            // Accepted just before the drain; its socket is closed with
            // the rest.
            return;
        }
        self.conns.insert(
            conn,
            LocalConn {
                user: user.clone(),
                meta: meta.clone(),
                rooms: HashSet::new(),
            },
        );
        self.queue(Some(StoreOp::Connect(user.clone())), Then::Nothing);
        self.queue(Some(StoreOp::Attach(user, conn, meta)), Then::Nothing);
    }

    fn disconnected(&mut self, conn: ConnId, reason: Reason) {
        let Some(local) = self.conns.remove(&conn) else {
            return;
        };
        for room in local.rooms {
            self.queue(
                Some(StoreOp::Leave(room, local.user.clone(), reason)),
                Then::Nothing,
            );
        }
        self.queue(
            Some(StoreOp::Detach(local.user.clone(), conn)),
            Then::Nothing,
        );
        self.queue(Some(StoreOp::Disconnect(local.user, reason)), Then::Nothing);
    }

    fn request(
        &mut self,
        conn: ConnId,
        reference: Option<Value>,
        request: Request,
        ctx: &mut Context<Self>,
    ) {
        // A request racing its connection's close: nobody to answer.
        let Some(local) = self.conns.get_mut(&conn) else {
            return;
        };
        let user = local.user.clone();
        let (op, then) = match request {
            Request::Join(room, meta) => {
                if let Some(meta) = meta {
                    // The snapshot below shows the joiner's new metadata.
                    local.meta = Some(meta.clone());
                    let attach = StoreOp::Attach(user.clone(), conn, Some(meta));
                    self.queue(Some(attach), Then::Nothing);
                }
                let Some(local) = self.conns.get_mut(&conn) else {
                    return;
                };
                let op = if local.rooms.insert(room.clone()) {
                    StoreOp::Join(room.clone(), user)
                } else {
                    StoreOp::Members(room.clone())
                };
                (Some(op), Then::Join(conn, reference, room))
            }
            Request::Leave(room) => {
                if local.rooms.remove(&room) {
                    let op = StoreOp::Leave(room.clone(), user, Reason::Closed);
                    (Some(op), Then::Leave(conn, reference, room))
                } else {
                    let message = format!("not in room {room}");
                    let frame =
                        protocol::error_frame(reference.as_ref(), ErrorCode::NotJoined, &message);
                    metrics().errors_sent.get(ErrorCode::NotJoined).inc();
                    (
                        None,
                        Then::Reply(conn, frame, SubChange::None, FrameKind::Error),
                    )
                }
            }
            Request::Watch(users) => (
                Some(StoreOp::Presence(users.clone())),
                Then::Watch(conn, reference, users),
            ),
            Request::Query(users) => (
                Some(StoreOp::Presence(users.clone())),
                Then::Query(conn, reference, users),
            ),
            Request::Unwatch(users) => {
                let frame = protocol::reply_frame(reference.as_ref(), &ReplyBody::Empty {});
                (
                    None,
                    Then::Reply(conn, frame, SubChange::Unwatch(users), FrameKind::Reply),
                )
            }
            Request::Room {
                room,
                limit,
                cursor,
            } => {
                let read = self.store.room_page(room.clone(), cursor, limit);
                self.read_directly(conn, reference, ctx, async move {
                    let (page, count) = read.await?;
                    Ok(ReplyBody::RoomPage {
                        room: room.to_string(),
                        count,
                        users: page.users.iter().map(ToString::to_string).collect(),
                        next_cursor: page.next,
                    })
                });
                return;
            }
            Request::Count => {
                let read = self.store.stats();
                self.read_directly(conn, reference, ctx, async move {
                    let stats = read.await?;
                    Ok(ReplyBody::Count {
                        users_online: stats.users_online,
                        connections: stats.connections,
                    })
                });
                return;
            }
            // Answered by the Conn itself.
            Request::Ping
            | Request::Refresh(_)
            | Request::SubscribeFeed
            | Request::UnsubscribeFeed => return,
        };
        self.queue(op, then);
    }

    /// Answers a read that is not part of a batch (a page scan, counts):
    /// one store call, then the reply, or an error frame if it failed.
    /// Nothing is written, so it need not wait its turn in the queue.
    fn read_directly(
        &mut self,
        conn: ConnId,
        reference: Option<Value>,
        ctx: &mut Context<Self>,
        read: impl Future<Output = Result<ReplyBody, StoreError>> + 'static,
    ) {
        ctx.spawn(read.into_actor(self).map(move |result, this, _| {
            let (frame, kind) = match result {
                Ok(body) => (
                    protocol::reply_frame(reference.as_ref(), &body),
                    FrameKind::Reply,
                ),
                Err(error) => {
                    let (code, message) = match error {
                        StoreError::BadCursor => {
                            (ErrorCode::BadRequest, "invalid cursor".to_owned())
                        }
                        other => {
                            warn!(error = %other, "direct store read failed");
                            (
                                ErrorCode::Unavailable,
                                "the presence store is unavailable; retry later".to_owned(),
                            )
                        }
                    };
                    metrics().errors_sent.get(code).inc();
                    (
                        protocol::error_frame(reference.as_ref(), code, &message),
                        FrameKind::Error,
                    )
                }
            };
            this.send_to_workers(vec![Delivery::Reply {
                conn,
                frame,
                change: SubChange::None,
                kind,
            }]);
        }));
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use futures_util::future::BoxFuture;

    use super::*;
    use crate::store::MemoryStore;

    /// A memory store that records every op it is given.
    #[derive(Default, Clone)]
    struct Recording {
        inner: MemoryStore,
        seen: Arc<Mutex<Vec<StoreOp>>>,
        applied: Arc<tokio::sync::Notify>,
    }

    impl Recording {
        /// Waits (bounded) until the store has seen `n` ops.
        async fn seen(&self, n: usize) -> Vec<StoreOp> {
            let wait = async {
                loop {
                    let notified = self.applied.notified();
                    let seen = self.seen.lock().unwrap().clone();
                    if seen.len() >= n {
                        return seen;
                    }
                    notified.await;
                }
            };
            tokio::time::timeout(Duration::from_secs(5), wait)
                .await
                .unwrap_or_else(|_| panic!("the store saw only {:?}", self.seen.lock().unwrap()))
        }
    }

    impl Store for Recording {
        fn apply(&self, ops: Vec<StoreOp>) -> BoxFuture<'static, Result<Applied, StoreError>> {
            self.seen.lock().unwrap().extend(ops.iter().cloned());
            self.applied.notify_waiters();
            self.inner.apply(ops)
        }
        fn room_page(
            &self,
            room: RoomName,
            cursor: Option<String>,
            limit: usize,
        ) -> BoxFuture<'static, Result<(crate::store::Page, u64), StoreError>> {
            self.inner.room_page(room, cursor, limit)
        }
        fn users_page(
            &self,
            cursor: Option<String>,
            limit: usize,
        ) -> BoxFuture<'static, Result<crate::store::Page, StoreError>> {
            self.inner.users_page(cursor, limit)
        }
        fn stats(&self) -> BoxFuture<'static, Result<crate::store::Stats, StoreError>> {
            self.inner.stats()
        }
        fn user(
            &self,
            user: UserId,
        ) -> BoxFuture<'static, Result<crate::store::UserRecord, StoreError>> {
            self.inner.user(user)
        }
        fn refresh_lease(&self) -> BoxFuture<'static, Result<bool, StoreError>> {
            self.inner.refresh_lease()
        }
        fn reap(&self) -> BoxFuture<'static, Result<crate::store::Reaped, StoreError>> {
            self.inner.reap()
        }
        fn retire(&self) -> BoxFuture<'static, Result<(), StoreError>> {
            self.inner.retire()
        }
        fn feed(&self) -> Option<futures_util::stream::BoxStream<'static, FeedItem>> {
            self.inner.feed()
        }
    }

    #[actix_rt::test]
    async fn a_gone_connections_reads_never_reach_the_store() {
        let store = Recording::default();
        // Small batches: whole slices of the queue hold only dropped reads.
        let batching = Batching {
            max: 4,
            linger: Duration::from_millis(1),
            lease_refresh: Duration::from_secs(60),
            max_pending: 1000,
        };
        let registry =
            PresenceRegistry::new(Arc::new(store.clone()), vec![], batching, Arc::default())
                .start();
        let (conn, user) = (ConnId::new(), UserId::parse("flooder").unwrap());
        let room = RoomName::parse("r").unwrap();
        let mut events = vec![
            ConnEvent::Connected(conn, user.clone(), None),
            ConnEvent::Request(conn, None, Request::Join(room.clone(), None)),
        ];
        for _ in 0..100 {
            events.push(ConnEvent::Request(
                conn,
                None,
                Request::Join(room.clone(), None),
            ));
            events.push(ConnEvent::Request(
                conn,
                None,
                Request::Query(vec![user.clone()]),
            ));
        }
        events.push(ConnEvent::Disconnected(conn, Reason::Closed));
        registry.send(ConnEvents(events)).await.unwrap();
        let seen = store.seen(6).await;
        assert_eq!(
            seen,
            vec![
                StoreOp::Connect(user.clone()),
                StoreOp::Attach(user.clone(), conn, None),
                StoreOp::Join(room.clone(), user.clone()),
                StoreOp::Leave(room, user.clone(), Reason::Closed),
                StoreOp::Detach(user.clone(), conn),
                StoreOp::Disconnect(user, Reason::Closed),
            ]
        );
    }
}
