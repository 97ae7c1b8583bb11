//! The embedded store: one node, all state in this process.
//!
//! It is the default (no `--redis`), so `cargo run` needs nothing else. Its
//! semantics are the Redis store's, checked by the same conformance suite;
//! there are no other nodes, so it keeps no per-node bookkeeping.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use futures_util::{FutureExt, future::BoxFuture, stream::BoxStream};

use super::{
    Applied, ConnRecord, FeedItem, NodeState, Outcome, Page, Read, Reaped, Stats, Store,
    StoreError, StoreOp, UserPresence, UserRecord,
};
use crate::{
    ids::{ConnId, Meta, NodeId, RoomName, UserId},
    protocol::{Ends, Event, Member, Reason},
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

/// A presence that ended after-grace and waits for its deadline.
#[derive(Debug, Clone, Copy)]
struct Grace {
    until_ms: u64,
    reason: Reason,
    /// When the connection that started it ended (the offline's
    /// `last_seen`).
    at_ms: u64,
}

#[derive(Debug, Default)]
struct State {
    /// The offline grace, milliseconds (0: none).
    grace_ms: u64,
    /// user → live connections; 0 while in the offline grace
    connections: HashMap<UserId, u64>,
    /// user → their grace, while counted 0 in `connections`
    graces: HashMap<UserId, Grace>,
    /// user → presence sequence
    seq: HashMap<UserId, u64>,
    /// room → user → that user's connections in the room; 0 in the grace
    rooms: HashMap<RoomName, HashMap<UserId, u64>>,
    /// (room, user) → the membership's grace, while counted 0
    room_graces: HashMap<(RoomName, UserId), Grace>,
    /// room → user → that member's room state (the latest `update`)
    states: HashMap<RoomName, HashMap<UserId, Meta>>,
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

    /// The same store with an offline grace of `grace` (the default: none).
    pub fn with_grace(self, grace: Duration) -> Self {
        // unwrap: see `apply`.
        self.state.lock().unwrap().grace_ms = grace.as_millis() as u64;
        self
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Room members with their metadata and room state, sorted by user.
fn snapshot<'a>(
    users: impl Iterator<Item = &'a UserId>,
    meta: &HashMap<UserId, Meta>,
    states: Option<&HashMap<UserId, Meta>>,
) -> Vec<Member> {
    let mut v: Vec<Member> = users
        .map(|u| Member {
            user: u.clone(),
            meta: meta.get(u).cloned(),
            state: states.and_then(|s| s.get(u)).cloned(),
        })
        .collect();
    v.sort();
    v
}

/// How a count changed: it rose from zero (or from none), or fell to
/// zero; anything else is no transition.
#[derive(Debug, PartialEq, Eq)]
enum Crossing {
    Rose,
    Fell,
    None,
}

/// Adds `delta` to `map[key]` (a count of live connections; 0 is kept, it
/// means "in the grace"). A count that would go below zero (a disconnect
/// the store never saw) is dropped, with no transition.
fn add<K: std::hash::Hash + Eq + Clone>(
    map: &mut HashMap<K, u64>,
    key: &K,
    delta: i64,
) -> Crossing {
    let before = map.get(key).copied();
    let after = before.unwrap_or(0) as i64 + delta;
    if after < 0 {
        map.remove(key);
        return Crossing::None;
    }
    map.insert(key.clone(), after as u64);
    match (before.unwrap_or(0), after) {
        (0, 1..) => Crossing::Rose,
        (1.., 0) => Crossing::Fell,
        _ => Crossing::None,
    }
}

impl State {
    fn apply(&mut self, op: StoreOp, now: u64) -> Outcome {
        let mut out = Outcome::default();
        match op {
            StoreOp::Connect(user) => {
                if add(&mut self.connections, &user, 1) == Crossing::Rose {
                    self.user_came(&user, &mut out);
                }
            }
            StoreOp::Disconnect(user, reason, ends) => {
                if add(&mut self.connections, &user, -1) == Crossing::Fell {
                    self.user_ended(&user, reason, ends, now, &mut out);
                }
            }
            StoreOp::Attach(user, conn, meta) => {
                if let Some(m) = &meta {
                    self.meta.insert(user.clone(), m.clone());
                }
                let records = self.records.entry(user).or_default();
                let since_ms = records.get(&conn).map_or(now, |a| a.since_ms);
                records.insert(conn, Attached { since_ms, meta });
            }
            StoreOp::Detach(user, conn) => {
                if let Some(records) = self.records.get_mut(&user) {
                    records.remove(&conn);
                    if records.is_empty() {
                        self.records.remove(&user);
                    }
                }
            }
            StoreOp::Join(room, user) => {
                let members = self.rooms.entry(room.clone()).or_default();
                if add(members, &user, 1) == Crossing::Rose {
                    self.member_came(&room, &user, &mut out);
                }
                out.read = Read::Members(self.members(&room));
            }
            StoreOp::Leave(room, user, reason, ends) => {
                let fell = self
                    .rooms
                    .get_mut(&room)
                    .is_some_and(|members| add(members, &user, -1) == Crossing::Fell);
                if fell {
                    self.member_ended(&room, &user, reason, ends, now, &mut out);
                }
                self.drop_empty_room(&room);
            }
            StoreOp::Members(room) => out.read = Read::Members(self.members(&room)),
            StoreOp::Update(room, user, conn, state) => {
                // A member (a leave may have overtaken the update): the
                // latest state of any of their connections wins.
                if self.rooms.get(&room).is_some_and(|m| m.contains_key(&user)) {
                    let states = self.states.entry(room.clone()).or_default();
                    states.insert(user.clone(), state.clone());
                    out.events.push(Event::Updated {
                        room,
                        user,
                        state,
                        from: Some(conn),
                    });
                }
            }
            StoreOp::Reassert(state) => self.reassert(&state, now, &mut out),
            StoreOp::Presence(users) => {
                out.read = Read::Presence(
                    users
                        .iter()
                        .map(|u| UserPresence {
                            online: self.connections.contains_key(u),
                            seq: self.seq.get(u).copied().unwrap_or(0),
                        })
                        .collect(),
                );
            }
            StoreOp::Expire => self.expire(now, &mut out),
        }
        out
    }

    fn members(&self, room: &RoomName) -> Vec<Member> {
        snapshot(
            self.rooms.get(room).into_iter().flat_map(|m| m.keys()),
            &self.meta,
            self.states.get(room),
        )
    }

    /// A member is gone from `room`: so is their room state.
    fn forget_member(&mut self, room: &RoomName, user: &UserId) {
        if let Some(members) = self.rooms.get_mut(room) {
            members.remove(user);
        }
        if let Some(states) = self.states.get_mut(room) {
            states.remove(user);
            if states.is_empty() {
                self.states.remove(room);
            }
        }
    }

    fn drop_empty_room(&mut self, room: &RoomName) {
        if self.rooms.get(room).is_some_and(HashMap::is_empty) {
            self.rooms.remove(room);
        }
    }

    /// The user's count rose from zero: back within the grace (nobody is
    /// told), or online.
    fn user_came(&mut self, user: &UserId, out: &mut Outcome) {
        if self.graces.remove(user).is_some() {
            out.tally.grace_cancelled_users += 1;
        } else {
            out.events.push(Event::Online {
                seq: self.bump(user),
                user: user.clone(),
            });
        }
    }

    /// The user's last live connection ended: the grace starts, or, with
    /// none, they are offline.
    fn user_ended(
        &mut self,
        user: &UserId,
        reason: Reason,
        ends: Ends,
        now: u64,
        out: &mut Outcome,
    ) {
        if ends == Ends::AfterGrace && self.grace_ms > 0 {
            let grace = Grace {
                until_ms: now + self.grace_ms,
                reason,
                at_ms: now,
            };
            self.graces.insert(user.clone(), grace);
            out.tally.grace_started_users += 1;
        } else {
            self.connections.remove(user);
            self.went_offline(user, reason, now, out);
        }
    }

    fn went_offline(&mut self, user: &UserId, reason: Reason, at: u64, out: &mut Outcome) {
        self.last_seen.insert(user.clone(), at);
        out.events.push(Event::Offline {
            seq: self.bump(user),
            user: user.clone(),
            last_seen: at,
            reason,
        });
    }

    fn member_came(&mut self, room: &RoomName, user: &UserId, out: &mut Outcome) {
        if self
            .room_graces
            .remove(&(room.clone(), user.clone()))
            .is_some()
        {
            out.tally.grace_cancelled_rooms += 1;
        } else {
            // A fresh member starts with no state, whatever a count the
            // store lost left behind.
            if let Some(states) = self.states.get_mut(room) {
                states.remove(user);
            }
            out.events.push(Event::Joined {
                room: room.clone(),
                user: user.clone(),
            });
        }
    }

    fn member_ended(
        &mut self,
        room: &RoomName,
        user: &UserId,
        reason: Reason,
        ends: Ends,
        now: u64,
        out: &mut Outcome,
    ) {
        if ends == Ends::AfterGrace && self.grace_ms > 0 {
            let grace = Grace {
                until_ms: now + self.grace_ms,
                reason,
                at_ms: now,
            };
            self.room_graces.insert((room.clone(), user.clone()), grace);
            out.tally.grace_started_rooms += 1;
        } else {
            self.forget_member(room, user);
            out.events.push(Event::Left {
                room: room.clone(),
                user: user.clone(),
                reason,
            });
        }
    }

    /// Ends the graces that ran out: rooms first, as a disconnect leaves
    /// its rooms before it goes offline.
    fn expire(&mut self, now: u64, out: &mut Outcome) {
        let mut due: Vec<((RoomName, UserId), Grace)> = self
            .room_graces
            .iter()
            .filter(|(_, g)| g.until_ms <= now)
            .map(|(k, g)| (k.clone(), *g))
            .collect();
        due.sort_by_key(|(_, g)| g.until_ms);
        for ((room, user), grace) in due {
            self.room_graces.remove(&(room.clone(), user.clone()));
            self.forget_member(&room, &user);
            self.drop_empty_room(&room);
            out.events.push(Event::Left {
                room,
                user,
                reason: grace.reason,
            });
            out.tally.grace_expired_rooms += 1;
        }
        let mut due: Vec<(UserId, Grace)> = self
            .graces
            .iter()
            .filter(|(_, g)| g.until_ms <= now)
            .map(|(u, g)| (u.clone(), *g))
            .collect();
        due.sort_by_key(|(_, g)| g.until_ms);
        for (user, grace) in due {
            self.graces.remove(&user);
            self.connections.remove(&user);
            self.went_offline(&user, grace.reason, grace.at_ms, out);
            out.tally.grace_expired_users += 1;
        }
    }

    /// This store is the only node, so the node's state is the whole
    /// state: make it exactly `state`, returning the transitions (room
    /// events first, as a disconnect leaves its rooms first). What it held
    /// and the node no longer does ends after the grace.
    fn reassert(&mut self, state: &NodeState, now: u64, out: &mut Outcome) {
        let mut want_rooms: HashMap<(RoomName, UserId), u64> = HashMap::new();
        for (room, user, n) in &state.rooms {
            want_rooms.insert((room.clone(), user.clone()), *n);
        }
        let mut pairs: Vec<(RoomName, UserId)> = want_rooms.keys().cloned().collect();
        for (room, members) in &self.rooms {
            pairs.extend(members.keys().map(|u| (room.clone(), u.clone())));
        }
        pairs.sort();
        pairs.dedup();
        for (room, user) in pairs {
            let have = self.rooms.get(&room).and_then(|m| m.get(&user)).copied();
            let want = want_rooms
                .get(&(room.clone(), user.clone()))
                .copied()
                .unwrap_or(0);
            let delta = want as i64 - have.unwrap_or(0) as i64;
            if delta == 0 {
                continue;
            }
            out.tally.corrected_room_counts += 1;
            let members = self.rooms.entry(room.clone()).or_default();
            match add(members, &user, delta) {
                Crossing::Rose => self.member_came(&room, &user, out),
                Crossing::Fell => {
                    self.member_ended(&room, &user, state.gone, Ends::AfterGrace, now, out);
                }
                Crossing::None => {}
            }
            self.drop_empty_room(&room);
        }

        let mut want: HashMap<UserId, u64> = HashMap::new();
        for (user, ..) in &state.conns {
            *want.entry(user.clone()).or_default() += 1;
        }
        let mut users: Vec<UserId> = want.keys().cloned().collect();
        users.extend(self.connections.keys().cloned());
        users.sort();
        users.dedup();
        for user in users {
            let have = self.connections.get(&user).copied().unwrap_or(0);
            let delta = want.get(&user).copied().unwrap_or(0) as i64 - have as i64;
            if delta == 0 {
                continue;
            }
            out.tally.corrected_user_counts += 1;
            match add(&mut self.connections, &user, delta) {
                Crossing::Rose => self.user_came(&user, out),
                Crossing::Fell => self.user_ended(&user, state.gone, Ends::AfterGrace, now, out),
                Crossing::None => {}
            }
        }

        let mut records: HashMap<UserId, HashMap<ConnId, Attached>> = HashMap::new();
        for (user, conn, meta) in &state.conns {
            let since_ms = match self.records.get(user).and_then(|r| r.get(conn)) {
                Some(a) => a.since_ms,
                None => {
                    out.tally.corrected_connections += 1;
                    now
                }
            };
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
        let dropped: usize = self
            .records
            .iter()
            .map(|(user, r)| {
                r.keys()
                    .filter(|c| !records.get(user).is_some_and(|mine| mine.contains_key(c)))
                    .count()
            })
            .sum();
        out.tally.corrected_connections += dropped as u64;
        self.records = records;
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
        members: Vec::new(),
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
        let result = page(members.into_iter().flat_map(|m| m.keys()), cursor, limit).map(|p| {
            let members = snapshot(p.users.iter(), &state.meta, state.states.get(&room));
            (Page { members, ..p }, count)
        });
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
            grace_until_ms: state.graces.get(&user).map(|g| g.until_ms),
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
            users_in_grace: state.graces.len() as u64,
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
