//! Local fan-out: the [`Broadcaster`] actor, one per worker arbiter.
//!
//! The registry sends each worker one [`Dispatch`] per store batch: the
//! batch's replies and events, in the order the store decided them, with
//! every frame already serialized. The broadcaster walks it once: a reply
//! goes to its connection (if it lives on this worker) and applies that
//! request's subscription change; an event goes to the room's members or the
//! user's watchers on this worker, each getting a clone of the same bytes;
//! `online`/`offline` also go to the worker's feed subscribers (connections
//! whose token allows `subscribe_feed`), once each.
//! Because replies and events travel in one ordered stream, a joiner sees its
//! snapshot before any event that follows it, and a subscription starts
//! exactly at the snapshot. It never talks to the store.

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
    metrics::{FrameKind, metrics},
    outbox::Outbox,
    protocol::{self, UserState},
};

/// How a reply changes its connection's subscriptions.
#[derive(Debug, Clone)]
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

/// Who an event is for.
#[derive(Debug, Clone)]
pub enum Audience {
    /// Connections watching this user.
    Watchers(UserId),
    /// Connections that joined this room.
    Room(RoomName),
}

/// One item of a dispatch, in store order.
#[derive(Debug, Clone)]
pub enum Delivery {
    /// A reply (or error) to one connection, with its subscription change.
    Reply {
        /// The connection that asked.
        conn: ConnId,
        /// The serialized frame.
        frame: Utf8Bytes,
        /// Applied just before the frame is queued.
        change: SubChange,
        /// `Reply` or `Error`, for the metrics.
        kind: FrameKind,
    },
    /// Presence of watched users, to each watcher (see [`UserSync`]).
    SyncUsers(Arc<UserSync>),
    /// An event for an audience.
    Event {
        /// Who hears it.
        audience: Audience,
        /// The event, serialized once.
        frame: Utf8Bytes,
        /// Which event, for the metrics.
        kind: FrameKind,
    },
}

/// The current presence of watched users, after events may have been
/// missed: each watcher gets one `sync` frame with the users it watches.
#[derive(Debug, Clone)]
pub struct UserSync(pub HashMap<UserId, UserState>);

/// A store batch's replies and events, for every worker.
#[derive(Message, Clone)]
#[rtype(result = "()")]
pub struct Dispatch(pub Arc<[Delivery]>);

/// One connection as the hub knows it.
struct Subscriber {
    outbox: Outbox,
    rooms: HashSet<RoomName>,
    watching: HashSet<UserId>,
}

/// A worker's subscriptions: which local connection hears what. Shared
/// (`Rc`) by the worker's broadcaster and its `Conn`s, which register and
/// unregister themselves directly; all on one thread.
#[derive(Default)]
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

    fn change(&mut self, conn: ConnId, change: SubChange) {
        let Some(sub) = self.conns.get_mut(&conn) else {
            return;
        };
        match change {
            SubChange::None => {}
            SubChange::Join(room) => {
                if sub.rooms.insert(room.clone()) {
                    self.rooms.entry(room).or_default().insert(conn);
                }
            }
            SubChange::Leave(room) => {
                if sub.rooms.remove(&room) {
                    unlink(&mut self.rooms, &room, &conn);
                }
            }
            SubChange::Watch(users) => {
                for user in users {
                    if sub.watching.insert(user.clone()) {
                        self.watchers.entry(user).or_default().insert(conn);
                    }
                }
            }
            SubChange::Unwatch(users) => {
                for user in users {
                    if sub.watching.remove(&user) {
                        unlink(&mut self.watchers, &user, &conn);
                    }
                }
            }
        }
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
                    kind,
                } => {
                    if !self.conns.contains_key(conn) {
                        continue;
                    }
                    self.change(*conn, change.clone());
                    let sent = self.conns.get(conn).map_or(0, |sub| {
                        // An overflow closes that connection; its Conn
                        // unregisters when it stops.
                        usize::from(sub.outbox.push(WsMessage::Text(frame.clone())).is_ok())
                    });
                    (*kind, sent)
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
                    (FrameKind::Sync, sent)
                }
                Delivery::Event {
                    audience,
                    frame,
                    kind,
                } => {
                    let (targets, feed) = match audience {
                        Audience::Watchers(user) => (self.watchers.get(user), Some(&self.feed)),
                        Audience::Room(room) => (self.rooms.get(room), None),
                    };
                    // A feed subscriber that also watches the user hears
                    // the event once.
                    let feed_only = feed
                        .into_iter()
                        .flatten()
                        .filter(|conn| !targets.is_some_and(|t| t.contains(*conn)));
                    let sent = targets
                        .into_iter()
                        .flatten()
                        .chain(feed_only)
                        .filter_map(|conn| self.conns.get(conn))
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

    fn user(s: &str) -> UserId {
        UserId::parse(s).unwrap()
    }
    fn room(s: &str) -> RoomName {
        RoomName::parse(s).unwrap()
    }
    fn drain(out: &Outbox) -> usize {
        out.len()
    }

    #[test]
    fn room_events_reach_members_only_and_share_bytes() {
        let mut hub = Hub::default();
        let (a, b) = (ConnId::new(), ConnId::new());
        let (oa, ob) = (Outbox::new(10, 1000), Outbox::new(10, 1000));
        hub.register(a, oa.clone());
        hub.register(b, ob.clone());
        let joined: Utf8Bytes = "joined".into();
        hub.deliver(&[
            Delivery::Reply {
                conn: a,
                frame: "reply".into(),
                change: SubChange::Join(room("r")),
                kind: FrameKind::Reply,
            },
            Delivery::Event {
                audience: Audience::Room(room("r")),
                frame: joined.clone(),
                kind: FrameKind::Joined,
            },
        ]);
        assert_eq!((drain(&oa), drain(&ob)), (2, 0));
        hub.unregister(&a);
        assert!(hub.rooms.is_empty(), "unregister drops room links");
    }

    #[test]
    fn replies_for_unknown_connections_subscribe_nothing() {
        let mut hub = Hub::default();
        let gone = ConnId::new();
        hub.deliver(&[Delivery::Reply {
            conn: gone,
            frame: "r".into(),
            change: SubChange::Watch(vec![user("u")]),
            kind: FrameKind::Reply,
        }]);
        assert!(hub.watchers.is_empty());
    }

    #[test]
    fn unwatch_stops_events() {
        let mut hub = Hub::default();
        let a = ConnId::new();
        let oa = Outbox::new(10, 1000);
        hub.register(a, oa.clone());
        let ev = |u: &str| Delivery::Event {
            audience: Audience::Watchers(user(u)),
            frame: "e".into(),
            kind: FrameKind::Online,
        };
        let reply = |c| Delivery::Reply {
            conn: a,
            frame: "r".into(),
            change: c,
            kind: FrameKind::Reply,
        };
        hub.deliver(&[reply(SubChange::Watch(vec![user("u")])), ev("u"), ev("v")]);
        assert_eq!(oa.len(), 2);
        hub.deliver(&[reply(SubChange::Unwatch(vec![user("u")])), ev("u")]);
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
            Delivery::Reply {
                conn: a,
                frame: "r".into(),
                change: SubChange::Watch(vec![user("u")]),
                kind: FrameKind::Reply,
            },
            Delivery::Event {
                audience: Audience::Watchers(user("u")),
                frame: "e".into(),
                kind: FrameKind::Online,
            },
            Delivery::Event {
                audience: Audience::Watchers(user("v")),
                frame: "e".into(),
                kind: FrameKind::Online,
            },
            Delivery::Event {
                audience: Audience::Room(room("r")),
                frame: "e".into(),
                kind: FrameKind::Joined,
            },
        ]);
        assert_eq!((oa.len(), ob.len()), (3, 0), "reply + u once + v");
        hub.set_feed(a, false);
        hub.deliver(&[Delivery::Event {
            audience: Audience::Watchers(user("v")),
            frame: "e".into(),
            kind: FrameKind::Online,
        }]);
        assert_eq!(oa.len(), 3);
        hub.set_feed(a, true);
        hub.unregister(&a);
        assert!(hub.feed.is_empty(), "unregister leaves the feed");
    }
}
