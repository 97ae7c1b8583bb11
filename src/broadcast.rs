//! Local fan-out: the [`Broadcaster`] actor, one per worker arbiter, and
//! the worker's [`Hub`] of subscriptions.
//!
//! The registry sends each worker one [`Dispatch`] per store batch: the
//! batch's replies and events, in the order the store decided them, with
//! every frame already serialized. The broadcaster walks it once: a reply
//! goes to its connection (if it lives on this worker) and settles that
//! request's subscription change; an event goes to its
//! [`Audience`](crate::protocol::Audience) on this worker, each connection
//! getting a clone of the same bytes, once.
//! Because replies and events travel in one ordered stream, a joiner sees its
//! snapshot before any event that follows it, and a subscription starts
//! exactly at the snapshot.
//!
//! The hub holds the one worker-side record of each connection
//! ([`Subscriber`]): what it hears, which is what the store accepted, and
//! which joins and watches it asked for that are not answered yet. The
//! `Conn` checks its room and watch bounds against that record; the record
//! changes only when a reply settles a request. It never talks to the store.

use std::{
    cell::RefCell,
    collections::{HashMap, HashSet},
    rc::Rc,
    sync::Arc,
};

use actix::prelude::*;
use tokio_tungstenite::tungstenite::{Message as WsMessage, Utf8Bytes, protocol::CloseFrame};

use crate::{
    ids::{ConnId, RoomName, UserId},
    metrics::{Sent, metrics},
    outbox::Outbox,
    protocol::{self, Audience, Request, UserState},
};

/// How a request changes its connection's subscriptions once accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SubChange {
    /// Nothing.
    None,
    /// Start hearing this room's events.
    Join(RoomName),
    /// Stop hearing this room's events.
    Leave(RoomName),
    /// Start hearing these users' online/offline.
    Watch(Vec<UserId>),
    /// Stop hearing these users' online/offline.
    Unwatch(Vec<UserId>),
}

impl SubChange {
    /// What `request` asks to change in what its connection hears: the one
    /// place that says it, for the `Conn` (which counts it in flight) and
    /// the registry (whose reply settles it).
    pub fn of(request: &Request) -> Self {
        match request {
            Request::Join(room, _) => SubChange::Join(room.clone()),
            Request::Leave(room) => SubChange::Leave(room.clone()),
            Request::Watch(users) => SubChange::Watch(users.clone()),
            Request::Unwatch(users) => SubChange::Unwatch(users.clone()),
            _ => SubChange::None,
        }
    }
}

/// One item of a dispatch, in store order.
#[derive(Debug, Clone)]
pub enum Delivery {
    /// The answer to one connection's request: a reply (`accepted`) or an
    /// error. Either settles the request's `change`, applied just before
    /// the frame is queued when accepted, dropped when not.
    Reply {
        /// The connection that asked.
        conn: ConnId,
        /// The serialized frame.
        frame: Utf8Bytes,
        /// What the request asked to change.
        change: SubChange,
        /// A reply (true) or an error frame (false).
        accepted: bool,
    },
    /// Presence of watched users, to each watcher (see [`UserSync`]).
    SyncUsers(Arc<UserSync>),
    /// A frame for an audience: an event, or a room's `sync`.
    Broadcast {
        /// Who hears it.
        audience: Audience,
        /// The frame, serialized once.
        frame: Utf8Bytes,
        /// What it is, for the metrics.
        kind: Sent,
    },
}

/// The current presence of watched users, after events may have been
/// missed: each watcher gets one `sync` frame with the users it watches.
#[derive(Debug, Clone)]
pub struct UserSync(pub HashMap<UserId, UserState>);

/// A store batch's replies and events, for every worker.
#[derive(Message, Clone, Debug)]
#[rtype(result = "()")]
pub struct Dispatch(pub Arc<[Delivery]>);

/// The worker-side record of one connection.
#[derive(Debug)]
pub struct Subscriber {
    outbox: Outbox,
    /// Rooms it is in (the store accepted the join).
    rooms: HashSet<RoomName>,
    /// Users it watches.
    watching: HashSet<UserId>,
    /// Requests sent and not answered yet; allocated only while there are
    /// any, so an idle connection's record stays small (the hub holds
    /// thousands).
    in_flight: Option<Box<InFlight>>,
}

/// What a connection asked for and has not had answered, by room or user.
#[derive(Debug, Default)]
struct InFlight {
    joining: HashMap<RoomName, u32>,
    leaving: HashMap<RoomName, u32>,
    asked_to_watch: HashMap<UserId, u32>,
    asked_to_unwatch: HashMap<UserId, u32>,
}

impl InFlight {
    fn is_empty(&self) -> bool {
        self.joining.is_empty()
            && self.leaving.is_empty()
            && self.asked_to_watch.is_empty()
            && self.asked_to_unwatch.is_empty()
    }
}

/// No request in flight.
static NONE_IN_FLIGHT: std::sync::LazyLock<InFlight> = std::sync::LazyLock::new(InFlight::default);

/// Takes one off a count, dropping it at zero.
fn settle<K: std::hash::Hash + Eq>(map: &mut HashMap<K, u32>, key: &K) {
    if let Some(n) = map.get_mut(key) {
        *n -= 1;
        if *n == 0 {
            map.remove(key);
        }
    }
}

/// What a connection holds once its requests in flight are answered as
/// asked: what it has, plus what it asked for, minus what it asked to
/// drop.
fn expected<'a, K: std::hash::Hash + Eq>(
    has: &'a HashSet<K>,
    adding: &'a HashMap<K, u32>,
    dropping: &'a HashMap<K, u32>,
) -> impl Iterator<Item = &'a K> {
    has.iter()
        .chain(adding.keys().filter(|k| !has.contains(*k)))
        .filter(|k| !dropping.contains_key(*k))
}

impl Subscriber {
    /// Whether joining `room` keeps the connection within `max` rooms,
    /// counting its joins and leaves in flight as if accepted.
    pub fn may_join(&self, room: &RoomName, max: usize) -> bool {
        let in_flight = self.in_flight();
        let mut count = 0;
        for held in expected(&self.rooms, &in_flight.joining, &in_flight.leaving) {
            if held == room {
                return true;
            }
            count += 1;
        }
        count < max
    }

    /// Whether it is in `room`, or will be once its requests in flight are
    /// answered as asked.
    pub fn will_be_in(&self, room: &RoomName) -> bool {
        let in_flight = self.in_flight();
        expected(&self.rooms, &in_flight.joining, &in_flight.leaving).any(|held| held == room)
    }

    /// How many users it will watch once its requests in flight are
    /// answered, and how many of `users` would be new.
    pub fn watch_counts(&self, users: &[UserId]) -> (usize, usize) {
        let in_flight = self.in_flight();
        let held: HashSet<&UserId> = expected(
            &self.watching,
            &in_flight.asked_to_watch,
            &in_flight.asked_to_unwatch,
        )
        .collect();
        let new: HashSet<&UserId> = users.iter().filter(|u| !held.contains(u)).collect();
        (held.len(), new.len())
    }

    /// Records a request on its way to the registry.
    fn ask(&mut self, change: &SubChange) {
        fn count<K: std::hash::Hash + Eq + Clone>(map: &mut HashMap<K, u32>, keys: &[K]) {
            for key in keys {
                *map.entry(key.clone()).or_default() += 1;
            }
        }
        if *change == SubChange::None {
            return;
        }
        let in_flight = self.in_flight.get_or_insert_default();
        match change {
            SubChange::Join(room) => count(&mut in_flight.joining, std::slice::from_ref(room)),
            SubChange::Leave(room) => count(&mut in_flight.leaving, std::slice::from_ref(room)),
            SubChange::Watch(users) => count(&mut in_flight.asked_to_watch, users),
            SubChange::Unwatch(users) => count(&mut in_flight.asked_to_unwatch, users),
            SubChange::None => {}
        }
    }

    fn in_flight(&self) -> &InFlight {
        self.in_flight.as_deref().unwrap_or(&NONE_IN_FLIGHT)
    }

    /// Takes one answered request of `change` off what is in flight.
    fn answered(&mut self, change: &SubChange) {
        let Some(in_flight) = self.in_flight.as_deref_mut() else {
            return;
        };
        match change {
            SubChange::Join(room) => settle(&mut in_flight.joining, room),
            SubChange::Leave(room) => settle(&mut in_flight.leaving, room),
            SubChange::Watch(users) => {
                users
                    .iter()
                    .for_each(|u| settle(&mut in_flight.asked_to_watch, u));
            }
            SubChange::Unwatch(users) => {
                users
                    .iter()
                    .for_each(|u| settle(&mut in_flight.asked_to_unwatch, u));
            }
            SubChange::None => {}
        }
        if in_flight.is_empty() {
            self.in_flight = None;
        }
    }
}

/// A worker's subscriptions: which local connection hears what. Shared
/// (`Rc`) by the worker's broadcaster and its `Conn`s, which register and
/// unregister themselves directly; all on one thread.
#[derive(Default, Debug)]
pub struct Hub {
    conns: HashMap<ConnId, Subscriber>,
    rooms: HashMap<RoomName, HashSet<ConnId>>,
    watchers: HashMap<UserId, HashSet<ConnId>>,
    /// Connections subscribed to every user's online/offline.
    feed: HashSet<ConnId>,
    /// Set by a drain: every connection, even one registering later, is
    /// closed with this frame.
    closing: Option<CloseFrame>,
}

/// Shared handle to a worker's hub.
pub type SharedHub = Rc<RefCell<Hub>>;

fn unlink<K: std::hash::Hash + Eq>(map: &mut HashMap<K, HashSet<ConnId>>, key: &K, conn: &ConnId) {
    if let Some(set) = map.get_mut(key) {
        set.remove(conn);
        if set.is_empty() {
            map.remove(key);
        }
    }
}

impl Hub {
    /// Adds a connection with no subscriptions.
    pub fn register(&mut self, conn: ConnId, outbox: Outbox) {
        if let Some(frame) = &self.closing {
            outbox.close(Some(frame.clone()));
        }
        self.conns.insert(
            conn,
            Subscriber {
                outbox,
                rooms: HashSet::new(),
                watching: HashSet::new(),
                in_flight: None,
            },
        );
    }

    /// Closes every connection of this worker with `frame` once its queued
    /// frames are written; connections registering later too. Returns how
    /// many were open.
    pub fn close_all(&mut self, frame: CloseFrame) -> usize {
        for sub in self.conns.values() {
            sub.outbox.close(Some(frame.clone()));
        }
        self.closing = Some(frame);
        self.conns.len()
    }

    /// Removes a connection and all it heard.
    pub fn unregister(&mut self, conn: &ConnId) {
        let Some(sub) = self.conns.remove(conn) else {
            return;
        };
        for room in &sub.rooms {
            unlink(&mut self.rooms, room, conn);
        }
        for user in &sub.watching {
            unlink(&mut self.watchers, user, conn);
        }
        self.feed.remove(conn);
    }

    /// The record of a connection of this worker.
    pub fn subscriber(&self, conn: &ConnId) -> Option<&Subscriber> {
        self.conns.get(conn)
    }

    /// Records that `conn` asked for `change` (the registry will answer).
    pub fn ask(&mut self, conn: &ConnId, change: &SubChange) {
        if let Some(sub) = self.conns.get_mut(conn) {
            sub.ask(change);
        }
    }

    /// Starts (`true`) or stops a connection's global online/offline feed.
    pub fn set_feed(&mut self, conn: ConnId, on: bool) {
        if !self.conns.contains_key(&conn) {
            return;
        }
        if on {
            self.feed.insert(conn);
        } else {
            self.feed.remove(&conn);
        }
    }

    /// Settles a request's change: applied if it was accepted, and no
    /// longer counted as in flight either way.
    fn settle(&mut self, conn: ConnId, change: &SubChange, accepted: bool) {
        let Some(sub) = self.conns.get_mut(&conn) else {
            return;
        };
        sub.answered(change);
        match change {
            SubChange::None => {}
            SubChange::Join(room) => {
                if accepted && sub.rooms.insert(room.clone()) {
                    self.rooms.entry(room.clone()).or_default().insert(conn);
                }
            }
            SubChange::Leave(room) => {
                if accepted && sub.rooms.remove(room) {
                    unlink(&mut self.rooms, room, &conn);
                }
            }
            SubChange::Watch(users) => {
                for user in users {
                    if accepted && sub.watching.insert(user.clone()) {
                        self.watchers.entry(user.clone()).or_default().insert(conn);
                    }
                }
            }
            SubChange::Unwatch(users) => {
                for user in users {
                    if accepted && sub.watching.remove(user) {
                        unlink(&mut self.watchers, user, &conn);
                    }
                }
            }
        }
    }

    /// The connections of this worker that hear `audience`, each once.
    fn audience<'a>(&'a self, audience: &'a Audience) -> impl Iterator<Item = &'a Subscriber> {
        let (targets, feed, except) = match audience {
            Audience::Watchers(user) => (self.watchers.get(user), Some(&self.feed), None),
            Audience::Room(room) => (self.rooms.get(room), None, None),
            Audience::RoomExcept(room, conn) => (self.rooms.get(room), None, Some(conn)),
        };
        // A feed subscriber that also watches the user hears it once.
        let feed_only = feed
            .into_iter()
            .flatten()
            .filter(move |conn| !targets.is_some_and(|t| t.contains(*conn)));
        targets
            .into_iter()
            .flatten()
            .chain(feed_only)
            .filter(move |conn| except != Some(*conn))
            .filter_map(|conn| self.conns.get(conn))
    }

    /// Applies one dispatch in order. Returns how many frames were queued.
    pub fn deliver(&mut self, items: &[Delivery]) -> usize {
        let mut queued = 0;
        for item in items {
            let (kind, n) = match item {
                Delivery::Reply {
                    conn,
                    frame,
                    change,
                    accepted,
                } => {
                    if !self.conns.contains_key(conn) {
                        continue;
                    }
                    self.settle(*conn, change, *accepted);
                    let sent = self.conns.get(conn).map_or(0, |sub| {
                        // An overflow closes that connection; its Conn
                        // unregisters when it stops.
                        usize::from(sub.outbox.push(WsMessage::Text(frame.clone())).is_ok())
                    });
                    (if *accepted { Sent::Reply } else { Sent::Error }, sent)
                }
                Delivery::SyncUsers(sync) => {
                    let mut sent = 0;
                    for sub in self.conns.values() {
                        let states: Vec<&UserState> =
                            sub.watching.iter().filter_map(|u| sync.0.get(u)).collect();
                        if states.is_empty() {
                            continue;
                        }
                        let frame = protocol::sync_users_frame(&states);
                        sent += usize::from(sub.outbox.push(WsMessage::Text(frame)).is_ok());
                    }
                    (Sent::Sync, sent)
                }
                Delivery::Broadcast {
                    audience,
                    frame,
                    kind,
                } => {
                    let sent = self
                        .audience(audience)
                        .filter(|sub| sub.outbox.push(WsMessage::Text(frame.clone())).is_ok())
                        .count();
                    (*kind, sent)
                }
            };
            if n > 0 {
                metrics().frames_sent.get(kind).inc_by(n as u64);
            }
            queued += n;
        }
        queued
    }
}

/// A worker's fan-out actor: receives dispatches from the registry.
#[derive(Debug)]
pub struct Broadcaster {
    hub: SharedHub,
}

impl Broadcaster {
    /// A broadcaster over `hub`; start it on the hub's worker.
    pub fn new(hub: SharedHub) -> Self {
        Self { hub }
    }
}

impl Actor for Broadcaster {
    type Context = Context<Self>;
}

/// The users watched and rooms joined on the worker, for a resync.
#[derive(Message)]
#[rtype(result = "(Vec<UserId>, Vec<RoomName>)")]
#[derive(Debug)]
pub struct Subscriptions;

impl Handler<Subscriptions> for Broadcaster {
    type Result = MessageResult<Subscriptions>;

    fn handle(&mut self, _: Subscriptions, _: &mut Context<Self>) -> Self::Result {
        let hub = self.hub.borrow();
        MessageResult((
            hub.watchers.keys().cloned().collect(),
            hub.rooms.keys().cloned().collect(),
        ))
    }
}

/// Closes every connection of the worker (a drain); answers how many.
#[derive(Message)]
#[rtype(result = "usize")]
#[derive(Debug)]
pub struct CloseAll(pub CloseFrame);

impl Handler<CloseAll> for Broadcaster {
    type Result = usize;

    fn handle(&mut self, msg: CloseAll, _: &mut Context<Self>) -> usize {
        self.hub.borrow_mut().close_all(msg.0)
    }
}

impl Handler<Dispatch> for Broadcaster {
    type Result = ();

    fn handle(&mut self, msg: Dispatch, _: &mut Context<Self>) {
        self.hub.borrow_mut().deliver(&msg.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::EventKind;

    fn user(s: &str) -> UserId {
        UserId::parse(s).unwrap()
    }
    fn room(s: &str) -> RoomName {
        RoomName::parse(s).unwrap()
    }
    fn reply(conn: ConnId, change: SubChange) -> Delivery {
        Delivery::Reply {
            conn,
            frame: "reply".into(),
            change,
            accepted: true,
        }
    }
    fn refusal(conn: ConnId, change: SubChange) -> Delivery {
        Delivery::Reply {
            conn,
            frame: "error".into(),
            change,
            accepted: false,
        }
    }
    fn event(audience: Audience) -> Delivery {
        Delivery::Broadcast {
            audience,
            frame: "e".into(),
            kind: Sent::Event(EventKind::Online),
        }
    }

    #[test]
    fn room_events_reach_members_only_and_share_bytes() {
        let mut hub = Hub::default();
        let (a, b) = (ConnId::new(), ConnId::new());
        let (oa, ob) = (Outbox::new(10, 1000), Outbox::new(10, 1000));
        hub.register(a, oa.clone());
        hub.register(b, ob.clone());
        hub.deliver(&[
            reply(a, SubChange::Join(room("r"))),
            event(Audience::Room(room("r"))),
        ]);
        assert_eq!((oa.len(), ob.len()), (2, 0));
        hub.unregister(&a);
        assert!(hub.rooms.is_empty(), "unregister drops room links");
    }

    #[test]
    fn replies_for_unknown_connections_subscribe_nothing() {
        let mut hub = Hub::default();
        hub.deliver(&[reply(ConnId::new(), SubChange::Watch(vec![user("u")]))]);
        assert!(hub.watchers.is_empty());
    }

    #[test]
    fn unwatch_stops_events() {
        let mut hub = Hub::default();
        let a = ConnId::new();
        let oa = Outbox::new(10, 1000);
        hub.register(a, oa.clone());
        let ev = |u: &str| event(Audience::Watchers(user(u)));
        hub.deliver(&[
            reply(a, SubChange::Watch(vec![user("u")])),
            ev("u"),
            ev("v"),
        ]);
        assert_eq!(oa.len(), 2);
        hub.deliver(&[reply(a, SubChange::Unwatch(vec![user("u")])), ev("u")]);
        assert_eq!(oa.len(), 3);
        assert!(hub.watchers.is_empty());
    }

    #[test]
    fn the_feed_hears_every_user_once_and_no_room_event() {
        let mut hub = Hub::default();
        let (a, b) = (ConnId::new(), ConnId::new());
        let (oa, ob) = (Outbox::new(10, 1000), Outbox::new(10, 1000));
        hub.register(a, oa.clone());
        hub.register(b, ob.clone());
        hub.set_feed(a, true);
        hub.deliver(&[
            reply(a, SubChange::Watch(vec![user("u")])),
            event(Audience::Watchers(user("u"))),
            event(Audience::Watchers(user("v"))),
            event(Audience::Room(room("r"))),
        ]);
        assert_eq!((oa.len(), ob.len()), (3, 0), "reply + u once + v");
        hub.set_feed(a, false);
        hub.deliver(&[event(Audience::Watchers(user("v")))]);
        assert_eq!(oa.len(), 3);
        hub.set_feed(a, true);
        hub.unregister(&a);
        assert!(hub.feed.is_empty(), "unregister leaves the feed");
    }

    #[test]
    fn the_record_counts_requests_in_flight_and_keeps_only_accepted_ones() {
        let mut hub = Hub::default();
        let a = ConnId::new();
        hub.register(a, Outbox::new(10, 1000));
        let record = |hub: &Hub| hub.subscriber(&a).unwrap().may_join(&room("new"), 2);
        hub.ask(&a, &SubChange::Join(room("r1")));
        hub.ask(&a, &SubChange::Join(room("r2")));
        assert!(!record(&hub), "two joins in flight fill a bound of two");
        assert!(
            hub.subscriber(&a).unwrap().may_join(&room("r1"), 2),
            "a room being joined is no new room"
        );
        // One is refused (say `unavailable`): no trace, room for another.
        hub.deliver(&[refusal(a, SubChange::Join(room("r1")))]);
        assert!(record(&hub));
        assert!(!hub.rooms.contains_key(&room("r1")));
        hub.deliver(&[reply(a, SubChange::Join(room("r2")))]);
        assert!(hub.rooms.contains_key(&room("r2")));
        assert!(record(&hub), "one room held, one free");

        hub.ask(&a, &SubChange::Watch(vec![user("u"), user("v")]));
        assert_eq!(
            hub.subscriber(&a)
                .unwrap()
                .watch_counts(&[user("u"), user("w")]),
            (2, 1)
        );
        hub.deliver(&[refusal(a, SubChange::Watch(vec![user("u"), user("v")]))]);
        assert_eq!(
            hub.subscriber(&a).unwrap().watch_counts(&[user("u")]),
            (0, 1)
        );
        assert!(hub.watchers.is_empty(), "a refused watch hears nothing");
        assert!(
            hub.subscriber(&a).unwrap().in_flight.is_none(),
            "nothing in flight: the record holds no buffer for it"
        );
    }
}
