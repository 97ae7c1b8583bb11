//! The [`PresenceRegistry`] actor: one per node, the only writer to the store.
//!
//! Every `Conn` tells it what changed (connected, disconnected, a request)
//! through its worker's [`RegistryLink`]; it queues these as ops
//! ([`queue`]) and writes them in batches: one [`Store::apply`] call (for
//! Redis, one transaction) per batch. A batch starts when the previous one
//! has returned and either the queue holds `--batch-max` ops or
//! `--batch-linger-ms` has passed since the previous batch returned; an op
//! after a quiet spell goes at once. A storm of thousands of connects
//! therefore costs a handful of round trips.
//!
//! Each request has one handler here that says which op it needs and how
//! its reply is rendered from what that op read ([`render::Answer`]); the
//! events an op caused come back from the store as [`protocol::Event`]s and
//! are sent as they are, to the audience each event names.
//!
//! It keeps the node's record of its own connections (user, rooms,
//! metadata), changed only by what it queues for the store: a request it
//! refuses leaves no trace. A disconnect becomes the right leaves, and the
//! record is the truth the node reasserts ([`StoreOp::Reassert`]) whenever
//! the store may have lost or doubled its writes: a failed batch, a lease
//! found gone (reaped while alive, or Redis restarted empty). While the
//! store fails, writes are not queued one by one: the next reassert carries
//! their sum, so an outage costs memory bounded by the live connections,
//! and only requests waiting for an answer queue (bounded by
//! `--max-pending`).
//!
//! Events: with the memory store, a batch's transitions are delivered from
//! its outcomes. With a shared store, every node (this one included) hears
//! every transition from the store's [`feed`](Store::feed), and
//! [`order::FeedOrder`] puts this node's replies between them in store
//! order. Everything is serialized once and sent to every worker's
//! [`Broadcaster`] as one ordered [`Dispatch`]. Lease, reaping and resync
//! are in [`upkeep`]. It never touches a socket.

mod link;
mod order;
mod queue;
mod render;
mod upkeep;

use std::{
    collections::{HashMap, HashSet},
    future::Future,
    sync::Arc,
    time::{Duration, Instant},
};

use actix::prelude::*;
use futures_util::stream::BoxStream;
use serde_json::Value;
use tokio::sync::oneshot;
use tracing::{debug, info, warn};

pub use self::link::{Notice, Notices, RegistryLink};
use self::{
    order::{FeedOrder, Released},
    queue::{Pending, Queue},
    render::Answer,
};
use crate::{
    broadcast::{Broadcaster, Delivery, Dispatch, SubChange},
    health::Health,
    ids::{ConnId, Meta, RoomName, UserId},
    metrics::metrics,
    protocol::{self, Ends, ErrorCode, Reason, ReplyBody, Request},
    store::{Applied, FeedItem, NodeState, Store, StoreError, StoreOp},
};

/// How often the cluster-wide users-online gauge is re-read from the store.
pub const USERS_ONLINE_REFRESH: Duration = Duration::from_secs(2);
/// How often expired node leases are looked for.
pub const REAP_INTERVAL: Duration = Duration::from_secs(1);
/// Longest a reply waits for the feed to deliver the events before it; past
/// this (events lost with a subscription) it goes anyway.
pub const REPLY_WAIT_MAX: Duration = Duration::from_secs(1);

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
    /// How often due offline graces are ended (`None`: no grace here).
    pub grace_check: Option<Duration>,
}

/// The registry's record of one connection of this node.
#[derive(Debug)]
struct LocalConn {
    user: UserId,
    meta: Option<Meta>,
    rooms: HashSet<RoomName>,
}

/// The node's presence registry.
pub struct PresenceRegistry {
    store: Arc<dyn Store>,
    broadcasters: Vec<Addr<Broadcaster>>,
    batching: Batching,
    health: Arc<Health>,
    conns: HashMap<ConnId, LocalConn>,
    queue: Queue,
    /// With a shared store: this node's replies in order with the feed's
    /// events. `None`: events come from each batch's outcomes.
    order: Option<FeedOrder<Delivery>>,
    in_flight: bool,
    timer_armed: bool,
    last_end: Option<Instant>,
    /// Set by a drain: fired once its removals are written.
    drained: Option<oneshot::Sender<()>>,
    /// The shared store's event feed, until the actor starts reading it.
    feed: Option<BoxStream<'static, FeedItem>>,
}

impl std::fmt::Debug for PresenceRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PresenceRegistry")
            .field("conns", &self.conns.len())
            .field("queued", &self.queue.len())
            .field("in_flight", &self.in_flight)
            .finish_non_exhaustive()
    }
}

impl PresenceRegistry {
    /// A registry writing to `store` and fanning out to `broadcasters`.
    pub fn new(
        store: Arc<dyn Store>,
        broadcasters: Vec<Addr<Broadcaster>>,
        batching: Batching,
        health: Arc<Health>,
    ) -> Self {
        Self {
            store,
            broadcasters,
            batching,
            health,
            conns: HashMap::new(),
            queue: Queue::new(batching.max_pending),
            order: None,
            in_flight: false,
            timer_armed: false,
            last_end: None,
            drained: None,
            feed: None,
        }
    }

    /// Takes the shared store's event feed ([`Store::feed`]), already
    /// subscribed: events come from it instead of from batch outcomes.
    pub fn with_feed(mut self, feed: BoxStream<'static, FeedItem>) -> Self {
        self.feed = Some(feed);
        self
    }

    /// This node's connections and rooms, as a reassert writes them.
    fn snapshot(&self) -> NodeState {
        let gone = if self.drained.is_some() {
            Reason::Shutdown
        } else {
            Reason::Closed
        };
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

    /// Starts a batch if one may start now, or arms a timer for when it may.
    fn maybe_flush(&mut self, ctx: &mut Context<Self>) {
        if self.in_flight || self.queue.is_idle() {
            return;
        }
        let now = Instant::now();
        let full = self.queue.len() >= self.batching.max;
        let mut earliest = match self.last_end {
            Some(t) if !full => t + self.batching.linger,
            _ => now,
        };
        if let Some(retry) = self.queue.retry_at() {
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
        if self.queue.reassert_due() {
            let state = self.snapshot();
            self.queue.fold_into_reassert(state);
        }
        // A drain writes its removals in one batch.
        let max = if self.drained.is_some() {
            usize::MAX
        } else {
            self.batching.max
        };
        // Answers for a connection that is gone have nobody to go to: drop
        // its reads and local replies rather than make everyone wait for
        // them. Its writes stay, in order, so its counts stay exact.
        let conns = &self.conns;
        let batch: Vec<Pending> = self
            .queue
            .take(max)
            .into_iter()
            .filter(|p| {
                p.op.as_ref().is_some_and(StoreOp::is_write)
                    || p.answer.conn().is_none_or(|c| conns.contains_key(c))
            })
            .collect();
        if batch.is_empty() {
            // Nothing left to write from this slice; the rest may still wait.
            self.maybe_flush(ctx);
            return;
        }
        let ops: Vec<StoreOp> = batch.iter().filter_map(|p| p.op.clone()).collect();
        if let Some(order) = &mut self.order
            && batch.iter().any(|p| p.answer.waits())
        {
            order.hold();
        }
        self.in_flight = true;
        let started = Instant::now();
        let apply = self.store.apply(ops);
        ctx.spawn(apply.into_actor(self).map(move |result, this, ctx| {
            this.in_flight = false;
            this.last_end = Some(Instant::now());
            let replies = match result {
                Ok(applied) => {
                    let elapsed = started.elapsed();
                    metrics().batch_ops.observe(batch.len() as f64);
                    metrics().batch_seconds.observe(elapsed.as_secs_f64());
                    debug!(ops = batch.len(), ?elapsed, "batch written");
                    this.health.set_store_ok(true);
                    this.queue.succeeded();
                    this.dispatch(batch, applied)
                }
                Err(e) => {
                    this.retry_later(batch, e);
                    Vec::new()
                }
            };
            // Events that overtook the batch's answer go now, with its
            // replies in between.
            if let Some(order) = &mut this.order {
                let released = order.batch_done(replies, Instant::now());
                this.send_released(released);
            }
            this.check_drained(ctx);
            this.maybe_flush(ctx);
        }));
    }

    fn retry_later(&mut self, batch: Vec<Pending>, error: StoreError) {
        metrics().batch_failures.inc();
        let ops = batch.len();
        if matches!(error, StoreError::LeaseLost) {
            // Reaped while alive, or Redis lost its data: nothing was
            // written; reassert at once.
            warn!("this node's lease is gone; reasserting its connections");
            self.queue.failed(batch, false);
        } else {
            self.health.set_store_ok(false);
            // The batch may or may not have been applied (a timeout after
            // EXEC was sent): a reassert is right either way. Its requests
            // wait.
            let retry_in = self.queue.failed(batch, true);
            warn!(%error, ops, ?retry_in, "store write failed; will reassert and retry");
        }
    }

    /// Sends what a batch decided: with the memory store, its replies and
    /// events in op order; with a shared store, the replies only, each
    /// returned with the number of the event before it, for
    /// [`FeedOrder`] (the events come through the feed).
    fn dispatch(&mut self, batch: Vec<Pending>, applied: Applied) -> Vec<(u64, Delivery)> {
        let mut outcomes = applied.outcomes.into_iter();
        let mut position = applied.published_after.unwrap_or(0);
        let local = self.order.is_none();
        let mut items = Vec::with_capacity(batch.len() * 2);
        let mut replies = Vec::new();
        for Pending { op, answer } in batch {
            let outcome = op.and(outcomes.next()).unwrap_or_default();
            metrics().count_tally(&outcome.tally);
            if outcome.tally.expire_more {
                // More graces are due than one op ends: go on at once.
                self.queue.push(Pending::write(StoreOp::Expire));
            }
            if let Some(reply) = answer.render(outcome.read) {
                if local {
                    items.push(reply);
                } else {
                    replies.push((position, reply));
                }
            }
            for event in &outcome.events {
                metrics().events_published.get(event.kind()).inc();
                if local {
                    items.push(render::event(event));
                }
            }
            position += outcome.events.len() as u64;
        }
        self.send_to_workers(items);
        replies
    }

    /// Sends what the feed order released, in order.
    fn send_released(&self, released: Vec<Released<Delivery>>) {
        let items = released
            .into_iter()
            .map(|item| match item {
                Released::Reply(reply) => reply,
                Released::Event(event) => {
                    metrics().events_received.get(event.kind()).inc();
                    render::event(&event)
                }
            })
            .collect();
        self.send_to_workers(items);
    }

    /// What the feed brought: events in store order, with the replies
    /// that were waiting for them in between.
    fn on_feed(&mut self, item: FeedItem, ctx: &mut Context<Self>) {
        let Some(order) = &mut self.order else {
            return;
        };
        match item {
            FeedItem::Subscribed { floor } => {
                if order.subscribed(floor) {
                    // Give every node (this one too) a moment to reassert,
                    // so the sync shows the settled truth; anything later
                    // arrives as events anyway.
                    ctx.run_later(self.batching.lease_refresh, |this, ctx| this.resync(ctx));
                }
                let released = order.due(Instant::now());
                self.send_released(released);
            }
            FeedItem::Lost => order.lost(),
            FeedItem::Published(events) => {
                let released = order.published(events, Instant::now());
                self.send_released(released);
            }
        }
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

impl Actor for PresenceRegistry {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        self.start_upkeep(ctx);
        if let Some(feed) = self.feed.take() {
            self.order = Some(FeedOrder::new(REPLY_WAIT_MAX));
            ctx.add_stream(feed);
            ctx.run_interval(REPLY_WAIT_MAX / 4, |this, _| {
                if let Some(order) = &mut this.order {
                    let released = order.due(Instant::now());
                    this.send_released(released);
                }
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

impl Handler<Notices> for PresenceRegistry {
    type Result = ();

    fn handle(&mut self, msg: Notices, ctx: &mut Context<Self>) {
        for notice in msg.0 {
            match notice {
                Notice::Connected(conn, user, meta) => self.connected(conn, user, meta),
                Notice::Disconnected(conn, reason, ends) => {
                    self.disconnected(conn, reason, ends);
                }
                Notice::Request(conn, reference, request) => {
                    self.request(conn, reference, request, ctx);
                }
            }
        }
        self.maybe_flush(ctx);
    }
}

/// Removes every connection of this node from the store, as one batch
/// with reason `shutdown`; answers once it is written (or could not be).
/// From then on the registry ignores its connections.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct Drain(pub oneshot::Sender<()>);

impl Handler<Drain> for PresenceRegistry {
    type Result = ();

    fn handle(&mut self, msg: Drain, ctx: &mut Context<Self>) {
        self.health.start_draining();
        self.drained = Some(msg.0);
        let conns: Vec<ConnId> = self.conns.keys().copied().collect();
        info!(
            connections = conns.len(),
            "draining: removing this node's connections"
        );
        for conn in conns {
            // Their clients reconnect elsewhere (1012): within the grace,
            // nobody sees them go.
            self.disconnected(conn, Reason::Shutdown, Ends::AfterGrace);
        }
        self.check_drained(ctx);
        self.maybe_flush(ctx);
    }
}

/// The handlers: one per notice and per request, each saying which ops it
/// needs and how it is answered.
impl PresenceRegistry {
    fn connected(&mut self, conn: ConnId, user: UserId, meta: Option<Meta>) {
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
        self.queue
            .push(Pending::write(StoreOp::Connect(user.clone())));
        self.queue
            .push(Pending::write(StoreOp::Attach(user, conn, meta)));
    }

    fn disconnected(&mut self, conn: ConnId, reason: Reason, ends: Ends) {
        let Some(local) = self.conns.remove(&conn) else {
            return;
        };
        for room in local.rooms {
            self.queue.push(Pending::write(StoreOp::Leave(
                room,
                local.user.clone(),
                reason,
                ends,
            )));
        }
        self.queue
            .push(Pending::write(StoreOp::Detach(local.user.clone(), conn)));
        self.queue.push(Pending::write(StoreOp::Disconnect(
            local.user, reason, ends,
        )));
    }

    fn request(
        &mut self,
        conn: ConnId,
        reference: Option<Value>,
        request: Request,
        ctx: &mut Context<Self>,
    ) {
        // A request racing its connection's close: nobody to answer.
        if !self.conns.contains_key(&conn) {
            return;
        }
        let change = SubChange::of(&request);
        match request {
            Request::Join(room, meta) => self.join(conn, reference, change, room, meta),
            Request::Leave(room) => self.leave(conn, reference, change, room),
            Request::Update(room, state) => self.update(conn, reference, change, room, state),
            Request::Watch(users) | Request::Query(users) => {
                let op = StoreOp::Presence(users.clone());
                self.ask(conn, reference, change, op, move |read| ReplyBody::Users {
                    users: render::states(&users, &read.into_presence()),
                });
            }
            Request::Unwatch(_) => {
                let frame = protocol::reply_frame(reference.as_ref(), &ReplyBody::Empty {});
                self.answer_in_order(Delivery::Reply {
                    conn,
                    frame,
                    change,
                    accepted: true,
                });
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
                        room,
                        count,
                        users: page.users,
                        members: page.members,
                        next_cursor: page.next,
                    })
                });
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
            }
            // Answered by the Conn itself.
            Request::Ping
            | Request::Refresh(_)
            | Request::SubscribeFeed
            | Request::UnsubscribeFeed => {}
        }
    }

    fn join(
        &mut self,
        conn: ConnId,
        reference: Option<Value>,
        change: SubChange,
        room: RoomName,
        meta: Option<Meta>,
    ) {
        if !self.admit(conn, &reference, &change) {
            return;
        }
        let Some(local) = self.conns.get_mut(&conn) else {
            return;
        };
        let user = local.user.clone();
        if let Some(meta) = meta {
            // The snapshot below shows the joiner's new metadata.
            local.meta = Some(meta.clone());
            self.queue.push(Pending::write(StoreOp::Attach(
                user.clone(),
                conn,
                Some(meta),
            )));
        }
        let first = self
            .conns
            .get_mut(&conn)
            .is_some_and(|local| local.rooms.insert(room.clone()));
        let op = if first {
            StoreOp::Join(room.clone(), user)
        } else {
            StoreOp::Members(room.clone())
        };
        let answer = Answer::reply(conn, reference, change, move |read| ReplyBody::Joined {
            room,
            members: read.into_members(),
        });
        self.queue.push(Pending {
            op: Some(op),
            answer,
        });
    }

    fn leave(&mut self, conn: ConnId, reference: Option<Value>, change: SubChange, room: RoomName) {
        let in_room = self
            .conns
            .get(&conn)
            .is_some_and(|local| local.rooms.contains(&room));
        if !in_room {
            self.refuse_not_joined(conn, reference, change, &format!("not in room {room}"));
            return;
        }
        if !self.admit(conn, &reference, &change) {
            return;
        }
        let Some(local) = self.conns.get_mut(&conn) else {
            return;
        };
        local.rooms.remove(&room);
        // An explicit leave is at once: no grace.
        let op = StoreOp::Leave(room.clone(), local.user.clone(), Reason::Closed, Ends::Now);
        let answer = Answer::reply(conn, reference, change, move |_| ReplyBody::Left { room });
        self.queue.push(Pending {
            op: Some(op),
            answer,
        });
    }

    /// A `leave` or `update` of a room the connection is not in: refused
    /// in its place among the connection's answers.
    fn refuse_not_joined(
        &mut self,
        conn: ConnId,
        reference: Option<Value>,
        change: SubChange,
        message: &str,
    ) {
        let refusal = render::refusal(
            conn,
            reference.as_ref(),
            change,
            ErrorCode::NotJoined,
            message,
        );
        self.answer_in_order(refusal);
    }

    /// `update` of a room the connection is in (its Conn paced it).
    fn update(
        &mut self,
        conn: ConnId,
        reference: Option<Value>,
        change: SubChange,
        room: RoomName,
        state: Meta,
    ) {
        let Some(local) = self.conns.get(&conn) else {
            return;
        };
        if !local.rooms.contains(&room) {
            let message = format!("not in room {room}: join it before updating its state");
            self.refuse_not_joined(conn, reference, change, &message);
            return;
        }
        let op = StoreOp::Update(room.clone(), local.user.clone(), conn, state);
        self.ask(conn, reference, change, op, move |_| ReplyBody::Updated {
            room,
            superseded: false,
        });
    }

    /// Queues a request's op, answered by `body` from what it read.
    fn ask(
        &mut self,
        conn: ConnId,
        reference: Option<Value>,
        change: SubChange,
        op: StoreOp,
        body: impl FnOnce(crate::store::Read) -> ReplyBody + 'static,
    ) {
        if !self.admit(conn, &reference, &change) {
            return;
        }
        self.queue.push(Pending {
            op: Some(op),
            answer: Answer::reply(conn, reference, change, body),
        });
    }

    /// Whether the queue takes one more request; if not, the request is
    /// answered `unavailable` at once and leaves no trace.
    fn admit(&mut self, conn: ConnId, reference: &Option<Value>, change: &SubChange) -> bool {
        if self.queue.admits_request() {
            return true;
        }
        self.send_to_workers(vec![render::refusal(
            conn,
            reference.as_ref(),
            change.clone(),
            ErrorCode::Unavailable,
            "the presence store is not keeping up; retry later",
        )]);
        false
    }

    /// An answer that needs no store, queued so it keeps its place after
    /// the connection's earlier requests.
    fn answer_in_order(&mut self, delivery: Delivery) {
        let answer = Answer::Ready(delivery);
        let conn = answer.conn().copied();
        if let (Some(conn), false) = (conn, self.queue.admits_request()) {
            if let Answer::Ready(Delivery::Reply { change, .. }) = answer {
                self.send_to_workers(vec![render::refusal(
                    conn,
                    None,
                    change,
                    ErrorCode::Unavailable,
                    "the presence store is not keeping up; retry later",
                )]);
            }
            return;
        }
        self.queue.push(Pending { op: None, answer });
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
            let delivery = match result {
                Ok(body) => Delivery::Reply {
                    conn,
                    frame: protocol::reply_frame(reference.as_ref(), &body),
                    change: SubChange::None,
                    accepted: true,
                },
                Err(error) => {
                    let (code, message) = match error {
                        StoreError::BadCursor => (ErrorCode::BadRequest, "invalid cursor"),
                        other => {
                            warn!(error = %other, "direct store read failed");
                            (
                                ErrorCode::Unavailable,
                                "the presence store is unavailable; retry later",
                            )
                        }
                    };
                    render::refusal(conn, reference.as_ref(), SubChange::None, code, message)
                }
            };
            this.send_to_workers(vec![delivery]);
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
    #[derive(Default, Clone, Debug)]
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
        fn feed(&self) -> Option<BoxStream<'static, FeedItem>> {
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
            grace_check: None,
        };
        let registry =
            PresenceRegistry::new(Arc::new(store.clone()), vec![], batching, Arc::default())
                .start();
        let (conn, user) = (ConnId::new(), UserId::parse("flooder").unwrap());
        let room = RoomName::parse("r").unwrap();
        let mut events = vec![
            Notice::Connected(conn, user.clone(), None),
            Notice::Request(conn, None, Request::Join(room.clone(), None)),
        ];
        for _ in 0..100 {
            events.push(Notice::Request(
                conn,
                None,
                Request::Join(room.clone(), None),
            ));
            events.push(Notice::Request(
                conn,
                None,
                Request::Query(vec![user.clone()]),
            ));
        }
        events.push(Notice::Disconnected(conn, Reason::Closed, Ends::Now));
        registry.send(Notices(events)).await.unwrap();
        let seen = store.seen(6).await;
        assert_eq!(
            seen,
            vec![
                StoreOp::Connect(user.clone()),
                StoreOp::Attach(user.clone(), conn, None),
                StoreOp::Join(room.clone(), user.clone()),
                StoreOp::Leave(room, user.clone(), Reason::Closed, Ends::Now),
                StoreOp::Detach(user.clone(), conn),
                StoreOp::Disconnect(user, Reason::Closed, Ends::Now),
            ]
        );
    }
}
