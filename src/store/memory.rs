//! The embedded store: one node, all state in this process.
//!
//! It is the default (no `--redis`), so `cargo run` needs nothing else. Its
//! semantics are the Redis store's, checked by the same conformance suite;
//! there are no other nodes, so it keeps no per-node bookkeeping.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{SystemTime, UNIX_EPOCH},
};

use futures_util::{FutureExt, future::BoxFuture, stream::BoxStream};

use super::{
    Applied, ConnRecord, FeedItem, NodeState, Outcome, Page, Read, Reaped, Stats, Store,
    StoreError, StoreOp, UserPresence, UserRecord,
};
use crate::{
    ids::{ConnId, Meta, NodeId, RoomName, UserId},
    protocol::{Event, Member},
};

/// In-process presence state.
#[derive(Debug, Default, Clone)]
pub struct MemoryStore {
    state: Arc<Mutex<State>>,
    node: String,
}

/// One attached connection.
#[derive(Debug)]
struct Attached {
    since_ms: u64,
    meta: Option<Meta>,
}

#[derive(Debug, Default)]
struct State {
    /// user → live connections
    connections: HashMap<UserId, u64>,
    /// user → presence sequence
    seq: HashMap<UserId, u64>,
    /// room → user → that user's connections in the room
    rooms: HashMap<RoomName, HashMap<UserId, u64>>,
    /// user → connection → its record
    records: HashMap<UserId, HashMap<ConnId, Attached>>,
    /// user → metadata of the latest attached connection
    meta: HashMap<UserId, Meta>,
    /// user → when they last went offline
    last_seen: HashMap<UserId, u64>,
}

impl MemoryStore {
    /// An empty store for a node with a fresh id.
    pub fn new() -> Self {
        Self::for_node(NodeId::new())
    }

    /// An empty store for `node`, named in connection records.
    pub fn for_node(node: NodeId) -> Self {
        Self {
            state: Arc::default(),
            node: node.to_string(),
        }
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Room members with their metadata, sorted by user.
fn snapshot<'a>(
    users: impl Iterator<Item = &'a UserId>,
    meta: &HashMap<UserId, Meta>,
) -> Vec<Member> {
    let mut v: Vec<Member> = users
        .map(|u| Member {
            user: u.clone(),
            meta: meta.get(u).cloned(),
        })
        .collect();
    v.sort();
    v
}

/// Decrements `map[key]`, removing it at zero; true when it reached zero.
/// A missing key stays missing (a disconnect the store never saw).
fn decrement<K: std::hash::Hash + Eq>(map: &mut HashMap<K, u64>, key: &K) -> bool {
    match map.get_mut(key) {
        Some(n) if *n > 1 => {
            *n -= 1;
            false
        }
        Some(_) => {
            map.remove(key);
            true
        }
        None => false,
    }
}

impl State {
    fn apply(&mut self, op: StoreOp, now: u64) -> Outcome {
        match op {
            StoreOp::Connect(user) => {
                let n = self.connections.entry(user.clone()).or_default();
                *n += 1;
                let first = *n == 1;
                Outcome::events(if first {
                    vec![Event::Online {
                        seq: self.bump(&user),
                        user,
                    }]
                } else {
                    Vec::new()
                })
            }
            StoreOp::Disconnect(user, reason) => {
                if !decrement(&mut self.connections, &user) {
                    return Outcome::default();
                }
                self.last_seen.insert(user.clone(), now);
                Outcome::events(vec![Event::Offline {
                    seq: self.bump(&user),
                    user,
                    last_seen: now,
                    reason,
                }])
            }
            StoreOp::Attach(user, conn, meta) => {
                if let Some(m) = &meta {
                    self.meta.insert(user.clone(), m.clone());
                }
                let records = self.records.entry(user).or_default();
                let since_ms = records.get(&conn).map_or(now, |a| a.since_ms);
                records.insert(conn, Attached { since_ms, meta });
                Outcome::default()
            }
            StoreOp::Detach(user, conn) => {
                if let Some(records) = self.records.get_mut(&user) {
                    records.remove(&conn);
                    if records.is_empty() {
                        self.records.remove(&user);
                    }
                }
                Outcome::default()
            }
            StoreOp::Join(room, user) => {
                let members = self.rooms.entry(room.clone()).or_default();
                let n = members.entry(user.clone()).or_default();
                *n += 1;
                let first = *n == 1;
                let snapshot = snapshot(members.keys(), &self.meta);
                Outcome {
                    events: if first {
                        vec![Event::Joined { room, user }]
                    } else {
                        Vec::new()
                    },
                    read: Read::Members(snapshot),
                }
            }
            StoreOp::Leave(room, user, reason) => {
                let Some(members) = self.rooms.get_mut(&room) else {
                    return Outcome::default();
                };
                let last = decrement(members, &user);
                if members.is_empty() {
                    self.rooms.remove(&room);
                }
                Outcome::events(if last {
                    vec![Event::Left { room, user, reason }]
                } else {
                    Vec::new()
                })
            }
            StoreOp::Members(room) => Outcome::read(Read::Members(snapshot(
                self.rooms.get(&room).into_iter().flat_map(|m| m.keys()),
                &self.meta,
            ))),
            StoreOp::Reassert(state) => Outcome::events(self.reassert(&state, now)),
            StoreOp::Presence(users) => Outcome::read(Read::Presence(
                users
                    .iter()
                    .map(|u| UserPresence {
                        online: self.connections.contains_key(u),
                        seq: self.seq.get(u).copied().unwrap_or(0),
                    })
                    .collect(),
            )),
        }
    }

    /// This store is the only node, so the node's state is the whole
    /// state: make it exactly `state`, returning the transitions (room
    /// events first, as a disconnect leaves its rooms first).
    fn reassert(&mut self, state: &NodeState, now: u64) -> Vec<Event> {
        let mut events = Vec::new();
        let mut want_rooms: HashMap<RoomName, HashMap<UserId, u64>> = HashMap::new();
        for (room, user, n) in &state.rooms {
            want_rooms
                .entry(room.clone())
                .or_default()
                .insert(user.clone(), *n);
        }
        for (room, members) in &self.rooms {
            for user in members.keys() {
                if !want_rooms.get(room).is_some_and(|m| m.contains_key(user)) {
                    events.push(Event::Left {
                        room: room.clone(),
                        user: user.clone(),
                        reason: state.gone,
                    });
                }
            }
        }
        for (room, members) in &want_rooms {
            for user in members.keys() {
                if !self.rooms.get(room).is_some_and(|m| m.contains_key(user)) {
                    events.push(Event::Joined {
                        room: room.clone(),
                        user: user.clone(),
                    });
                }
            }
        }
        self.rooms = want_rooms;

        let mut want: HashMap<UserId, u64> = HashMap::new();
        for (user, ..) in &state.conns {
            *want.entry(user.clone()).or_default() += 1;
        }
        let gone: Vec<UserId> = self
            .connections
            .keys()
            .filter(|u| !want.contains_key(*u))
            .cloned()
            .collect();
        for user in gone {
            self.last_seen.insert(user.clone(), now);
            events.push(Event::Offline {
                seq: self.bump(&user),
                user,
                last_seen: now,
                reason: state.gone,
            });
        }
        let came: Vec<UserId> = want
            .keys()
            .filter(|u| !self.connections.contains_key(*u))
            .cloned()
            .collect();
        for user in came {
            events.push(Event::Online {
                seq: self.bump(&user),
                user,
            });
        }
        self.connections = want;

        let mut records: HashMap<UserId, HashMap<ConnId, Attached>> = HashMap::new();
        for (user, conn, meta) in &state.conns {
            let since_ms = self
                .records
                .get(user)
                .and_then(|r| r.get(conn))
                .map_or(now, |a| a.since_ms);
            if let Some(m) = meta {
                self.meta.insert(user.clone(), m.clone());
            }
            records.entry(user.clone()).or_default().insert(
                *conn,
                Attached {
                    since_ms,
                    meta: meta.clone(),
                },
            );
        }
        self.records = records;
        events
    }

    fn bump(&mut self, user: &UserId) -> u64 {
        let s = self.seq.entry(user.clone()).or_default();
        *s += 1;
        *s
    }
}

/// The page of sorted `users` after `cursor` (the last id of the previous
/// page), exactly `limit` long unless it is the last.
fn page<'a>(
    users: impl Iterator<Item = &'a UserId>,
    cursor: Option<String>,
    limit: usize,
) -> Result<Page, StoreError> {
    let after = match cursor {
        Some(c) => Some(UserId::parse(&c).map_err(|_| StoreError::BadCursor)?),
        None => None,
    };
    let mut all: Vec<&UserId> = users
        .filter(|u| after.as_ref().is_none_or(|a| *u > a))
        .collect();
    all.sort();
    let more = all.len() > limit;
    all.truncate(limit);
    Ok(Page {
        next: more.then(|| all.last().map(|u| u.to_string())).flatten(),
        users: all.into_iter().cloned().collect(),
    })
}

impl Store for MemoryStore {
    fn apply(&self, ops: Vec<StoreOp>) -> BoxFuture<'static, Result<Applied, StoreError>> {
        let now = now_ms();
        // unwrap: the lock is only held inside this synchronous loop, which
        // does not panic, so it is never poisoned.
        let mut state = self.state.lock().unwrap();
        let outcomes = ops.into_iter().map(|op| state.apply(op, now)).collect();
        futures_util::future::ready(Ok(Applied {
            outcomes,
            published_after: None,
        }))
        .boxed()
    }

    fn room_page(
        &self,
        room: RoomName,
        cursor: Option<String>,
        limit: usize,
    ) -> BoxFuture<'static, Result<(Page, u64), StoreError>> {
        // unwrap: see `apply`.
        let state = self.state.lock().unwrap();
        let members = state.rooms.get(&room);
        let count = members.map_or(0, |m| m.len() as u64);
        let result =
            page(members.into_iter().flat_map(|m| m.keys()), cursor, limit).map(|p| (p, count));
        futures_util::future::ready(result).boxed()
    }

    fn users_page(
        &self,
        cursor: Option<String>,
        limit: usize,
    ) -> BoxFuture<'static, Result<Page, StoreError>> {
        // unwrap: see `apply`.
        let state = self.state.lock().unwrap();
        futures_util::future::ready(page(state.connections.keys(), cursor, limit)).boxed()
    }

    fn user(&self, user: UserId) -> BoxFuture<'static, Result<UserRecord, StoreError>> {
        // unwrap: see `apply`.
        let state = self.state.lock().unwrap();
        let mut connections: Vec<ConnRecord> = state
            .records
            .get(&user)
            .into_iter()
            .flatten()
            .map(|(conn, attached)| ConnRecord {
                conn: conn.to_string(),
                node: self.node.clone(),
                since_ms: attached.since_ms,
                meta: attached.meta.clone(),
            })
            .collect();
        connections.sort_by(|a, b| a.conn.cmp(&b.conn));
        let record = UserRecord {
            online: state.connections.contains_key(&user),
            connections,
            last_seen_ms: state.last_seen.get(&user).copied(),
            meta: state.meta.get(&user).cloned(),
        };
        futures_util::future::ready(Ok(record)).boxed()
    }

    fn stats(&self) -> BoxFuture<'static, Result<Stats, StoreError>> {
        // unwrap: see `apply`.
        let state = self.state.lock().unwrap();
        futures_util::future::ready(Ok(Stats {
            users_online: state.connections.len() as u64,
            connections: state.connections.values().sum(),
            nodes_alive: 1,
        }))
        .boxed()
    }

    /// One node, in this process: its lease cannot lapse.
    fn refresh_lease(&self) -> BoxFuture<'static, Result<bool, StoreError>> {
        futures_util::future::ready(Ok(true)).boxed()
    }

    /// There are no other nodes to reap.
    fn reap(&self) -> BoxFuture<'static, Result<Reaped, StoreError>> {
        futures_util::future::ready(Ok(Reaped::default())).boxed()
    }

    fn retire(&self) -> BoxFuture<'static, Result<(), StoreError>> {
        futures_util::future::ready(Ok(())).boxed()
    }

    /// Events are delivered from [`Store::apply`]'s outcomes.
    fn feed(&self) -> Option<BoxStream<'static, FeedItem>> {
        None
    }
}
