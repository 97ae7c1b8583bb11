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
//! It also keeps this node's view of its own connections (user, rooms), so a
//! disconnect becomes the right leaves, and it refreshes the node lease.
//! Outcomes become replies and events, serialized once and sent to every
//! worker's [`Broadcaster`] as one ordered [`Dispatch`]. When the store
//! fails, the batch is kept and retried with backoff: connections stay open
//! and answers wait. The registry never touches a socket.

use std::{
    cell::RefCell,
    collections::{HashMap, HashSet, VecDeque},
    future::Future,
    rc::Rc,
    sync::Arc,
    time::{Duration, Instant},
};

use actix::prelude::*;
use serde_json::Value;
use tracing::{debug, warn};

use crate::{
    broadcast::{Audience, Broadcaster, Delivery, Dispatch, SubChange},
    ids::{ConnId, RoomName, UserId},
    metrics::{FrameKind, metrics},
    protocol::{self, ErrorCode, Event, Member, ReplyBody, Request, UserState},
    store::{Outcome, Store, StoreError, StoreOp, UserPresence},
};

/// First wait before retrying a failed batch.
const RETRY_MIN: Duration = Duration::from_millis(50);
/// Longest wait between retries of a failed batch.
const RETRY_MAX: Duration = Duration::from_secs(2);
/// How often the cluster-wide users-online gauge is re-read from the store.
pub const USERS_ONLINE_REFRESH: Duration = Duration::from_secs(2);

/// Batching knobs, from the config.
#[derive(Debug, Clone, Copy)]
pub struct Batching {
    /// Most ops in one batch.
    pub max: usize,
    /// Shortest time between a batch's return and the next batch's start.
    pub linger: Duration,
    /// Interval between node lease refreshes.
    pub lease_refresh: Duration,
}

/// What a `Conn` tells the registry.
#[derive(Debug)]
pub enum ConnEvent {
    /// A connection came up on this node with its verified user and its
    /// metadata (a validated JSON object).
    Connected(ConnId, UserId, Option<Arc<str>>),
    /// A connection on this node went away (any reason).
    Disconnected(ConnId),
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
            Then::Nothing => None,
            Then::Join(c, ..)
            | Then::Leave(c, ..)
            | Then::Watch(c, ..)
            | Then::Query(c, ..)
            | Then::Reply(c, ..) => Some(c),
        }
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
                    | StoreOp::Disconnect(_)
                    | StoreOp::Join(..)
                    | StoreOp::Leave(..)
                    | StoreOp::Attach(..)
                    | StoreOp::Detach(..)
            )
        )
    }
}

struct LocalConn {
    user: UserId,
    rooms: HashSet<RoomName>,
}

/// The node's presence registry.
pub struct PresenceRegistry {
    store: Arc<dyn Store>,
    broadcasters: Vec<Addr<Broadcaster>>,
    batching: Batching,
    conns: HashMap<ConnId, LocalConn>,
    pending: VecDeque<Pending>,
    in_flight: bool,
    timer_armed: bool,
    last_end: Option<Instant>,
    retry_at: Option<Instant>,
    retry_delay: Duration,
}

impl PresenceRegistry {
    /// A registry writing to `store` and fanning out to `broadcasters`.
    pub fn new(
        store: Arc<dyn Store>,
        broadcasters: Vec<Addr<Broadcaster>>,
        batching: Batching,
    ) -> Self {
        Self {
            store,
            broadcasters,
            batching,
            conns: HashMap::new(),
            pending: VecDeque::new(),
            in_flight: false,
            timer_armed: false,
            last_end: None,
            retry_at: None,
            retry_delay: RETRY_MIN,
        }
    }

    fn queue(&mut self, op: Option<StoreOp>, then: Then) {
        self.pending.push_back(Pending { op, then });
    }

    /// Starts a batch if one may start now, or arms a timer for when it may.
    fn maybe_flush(&mut self, ctx: &mut Context<Self>) {
        if self.in_flight || self.pending.is_empty() {
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
        let n = self.pending.len().min(self.batching.max);
        // Answers for a connection that is gone have nobody to go to: drop
        // its reads and local replies rather than make everyone wait for
        // them. Its writes stay, in order, so its counts stay exact.
        let conns = &self.conns;
        let batch: Vec<Pending> = self
            .pending
            .drain(..n)
            .filter(|p| p.is_write() || p.then.conn().is_none_or(|c| conns.contains_key(c)))
            .collect();
        if batch.is_empty() {
            // Nothing left to write from this slice; the rest may still wait.
            self.maybe_flush(ctx);
            return;
        }
        let ops: Vec<StoreOp> = batch.iter().filter_map(|p| p.op.clone()).collect();
        self.in_flight = true;
        let started = Instant::now();
        let apply = self.store.apply(ops);
        ctx.spawn(apply.into_actor(self).map(move |result, this, ctx| {
            this.in_flight = false;
            this.last_end = Some(Instant::now());
            match result {
                Ok(outcomes) => {
                    let elapsed = started.elapsed();
                    metrics().batch_ops.observe(batch.len() as f64);
                    metrics().batch_seconds.observe(elapsed.as_secs_f64());
                    debug!(ops = batch.len(), ?elapsed, "batch written");
                    this.retry_at = None;
                    this.retry_delay = RETRY_MIN;
                    this.dispatch(batch, outcomes);
                }
                Err(e) => this.retry_later(batch, e),
            }
            this.maybe_flush(ctx);
        }));
    }

    fn retry_later(&mut self, batch: Vec<Pending>, error: StoreError) {
        metrics().batch_failures.inc();
        warn!(%error, ops = batch.len(), retry_in = ?self.retry_delay, "store write failed; will retry");
        for p in batch.into_iter().rev() {
            self.pending.push_front(p);
        }
        self.retry_at = Some(Instant::now() + self.retry_delay);
        self.retry_delay = (self.retry_delay * 2).min(RETRY_MAX);
    }

    fn dispatch(&mut self, batch: Vec<Pending>, outcomes: Vec<Outcome>) {
        let mut outcomes = outcomes.into_iter();
        let mut items = Vec::with_capacity(batch.len() * 2);
        for Pending { op, then } in batch {
            let outcome = match &op {
                Some(_) => outcomes.next(),
                None => None,
            };
            if let Some(reply) = reply_for(then, outcome.as_ref()) {
                items.push(reply);
            }
            if let (Some(op), Some(outcome)) = (op, outcome)
                && let Some(event) = event_for(op, outcome)
            {
                let (audience, kind) = match &event {
                    Event::Online { user, .. } => {
                        (Audience::Watchers(user.clone()), FrameKind::Online)
                    }
                    Event::Offline { user, .. } => {
                        (Audience::Watchers(user.clone()), FrameKind::Offline)
                    }
                    Event::Joined { room, .. } => (Audience::Room(room.clone()), FrameKind::Joined),
                    Event::Left { room, .. } => (Audience::Room(room.clone()), FrameKind::Left),
                };
                metrics().events_published.get(kind).inc();
                items.push(Delivery::Event {
                    audience,
                    frame: event.encode(),
                    kind,
                });
            }
        }
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

/// The transition an op's outcome represents, if any.
fn event_for(op: StoreOp, outcome: Outcome) -> Option<Event> {
    match (op, outcome) {
        (StoreOp::Connect(user), Outcome::Connected(Some(seq))) => {
            Some(Event::Online { user, seq })
        }
        (StoreOp::Disconnect(user), Outcome::Disconnected(Some((seq, last_seen)))) => {
            Some(Event::Offline {
                user,
                seq,
                last_seen,
            })
        }
        (StoreOp::Join(room, user), Outcome::Joined(true, _)) => Some(Event::Joined { room, user }),
        (StoreOp::Leave(room, user), Outcome::Left(true)) => Some(Event::Left { room, user }),
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

/// The reply an op's outcome answers, if the op came from a request.
fn reply_for(then: Then, outcome: Option<&Outcome>) -> Option<Delivery> {
    let reply = |conn, reference: Option<Value>, body: ReplyBody, change| Delivery::Reply {
        conn,
        frame: protocol::reply_frame(reference.as_ref(), &body),
        change,
        kind: FrameKind::Reply,
    };
    Some(match (then, outcome) {
        (Then::Nothing, _) => return None,
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
            let members = members
                .iter()
                .map(|m| Member {
                    user: m.user.to_string(),
                    // Stored only after validation as a JSON object.
                    meta: m.meta.as_deref().and_then(|t| serde_json::from_str(t).ok()),
                })
                .collect();
            let body = ReplyBody::Joined {
                room: room.to_string(),
                members,
            };
            reply(conn, reference, body, SubChange::Join(room))
        }
        (Then::Leave(conn, reference, room), Some(Outcome::Left(_))) => {
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
        ctx.spawn(
            self.store
                .refresh_lease()
                .into_actor(self)
                .map(|result, _, _| {
                    if let Err(error) = result {
                        warn!(%error, "node lease refresh failed");
                    }
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
                ConnEvent::Disconnected(conn) => self.disconnected(conn),
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
        self.conns.insert(
            conn,
            LocalConn {
                user: user.clone(),
                rooms: HashSet::new(),
            },
        );
        self.queue(Some(StoreOp::Connect(user.clone())), Then::Nothing);
        self.queue(Some(StoreOp::Attach(user, conn, meta)), Then::Nothing);
    }

    fn disconnected(&mut self, conn: ConnId) {
        let Some(local) = self.conns.remove(&conn) else {
            return;
        };
        for room in local.rooms {
            self.queue(
                Some(StoreOp::Leave(room, local.user.clone())),
                Then::Nothing,
            );
        }
        self.queue(
            Some(StoreOp::Detach(local.user.clone(), conn)),
            Then::Nothing,
        );
        self.queue(Some(StoreOp::Disconnect(local.user)), Then::Nothing);
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
            Request::Join(room) => {
                let op = if local.rooms.insert(room.clone()) {
                    StoreOp::Join(room.clone(), user)
                } else {
                    StoreOp::Members(room.clone())
                };
                (Some(op), Then::Join(conn, reference, room))
            }
            Request::Leave(room) => {
                if local.rooms.remove(&room) {
                    let op = StoreOp::Leave(room.clone(), user);
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
            Request::Ping => return,
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
        fn apply(&self, ops: Vec<StoreOp>) -> BoxFuture<'static, Result<Vec<Outcome>, StoreError>> {
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
        fn refresh_lease(&self) -> BoxFuture<'static, Result<(), StoreError>> {
            self.inner.refresh_lease()
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
        };
        let registry = PresenceRegistry::new(Arc::new(store.clone()), vec![], batching).start();
        let (conn, user) = (ConnId::new(), UserId::parse("flooder").unwrap());
        let room = RoomName::parse("r").unwrap();
        let mut events = vec![
            ConnEvent::Connected(conn, user.clone(), None),
            ConnEvent::Request(conn, None, Request::Join(room.clone())),
        ];
        for _ in 0..100 {
            events.push(ConnEvent::Request(conn, None, Request::Join(room.clone())));
            events.push(ConnEvent::Request(
                conn,
                None,
                Request::Query(vec![user.clone()]),
            ));
        }
        events.push(ConnEvent::Disconnected(conn));
        registry.send(ConnEvents(events)).await.unwrap();
        let seen = store.seen(6).await;
        assert_eq!(
            seen,
            vec![
                StoreOp::Connect(user.clone()),
                StoreOp::Attach(user.clone(), conn, None),
                StoreOp::Join(room.clone(), user.clone()),
                StoreOp::Leave(room, user.clone()),
                StoreOp::Detach(user.clone(), conn),
                StoreOp::Disconnect(user),
            ]
        );
    }
}
