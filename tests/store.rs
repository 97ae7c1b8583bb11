//! Store conformance: the same scenarios against `MemoryStore` and
//! `RedisStore` (a real redis-server per test). Transitions must be decided
//! identically by both, and atomically under races.

mod support;

use std::{sync::Arc, time::Duration};

use futures_util::StreamExt;

use presenced::{
    ids::{ConnId, Meta, NodeId, RoomName, UserId},
    protocol::{Ends, Event, Member, Reason},
    store::{
        FeedItem, MemoryStore, NodeState, Outcome, Read, RedisStore, Store, StoreError, StoreOp,
        Tally, UserPresence,
    },
};
use support::RedisServer;

const LEASE: Duration = Duration::from_secs(5);

fn user(s: &str) -> UserId {
    UserId::parse(s).unwrap()
}
fn room(s: &str) -> RoomName {
    RoomName::parse(s).unwrap()
}
fn members(v: &[&str]) -> Vec<Member> {
    users(v).into_iter().map(Member::plain).collect()
}
fn meta(text: &str) -> Meta {
    Meta::parse(text, 1024).unwrap()
}

// Outcomes, as the scenarios expect them.

/// Nothing decided, nothing read.
fn quiet() -> Outcome {
    Outcome::default()
}
/// `u` went online with `seq`.
fn online(u: &str, seq: u64) -> Outcome {
    Outcome::events(vec![Event::Online { user: user(u), seq }])
}
/// `u`'s first connection in `r`, and the members after it.
fn joined(r: &str, u: &str, after: Vec<Member>) -> Outcome {
    Outcome {
        events: vec![Event::Joined {
            room: room(r),
            user: user(u),
        }],
        read: Read::Members(after),
        ..Outcome::default()
    }
}
/// The room's members, and nothing decided (a join of a user already in
/// the room, or a members read).
fn members_read(now: Vec<Member>) -> Outcome {
    Outcome::read(Read::Members(now))
}
/// `u`'s last connection left `r`.
fn left(r: &str, u: &str) -> Outcome {
    Outcome::events(vec![Event::Left {
        room: room(r),
        user: user(u),
        reason: Reason::Closed,
    }])
}
fn presence(states: Vec<UserPresence>) -> Outcome {
    Outcome::read(Read::Presence(states))
}
/// The seq of an online the outcome holds.
fn online_seq(outcome: &Outcome) -> Option<u64> {
    match outcome.events.as_slice() {
        [Event::Online { seq, .. }] => Some(*seq),
        _ => None,
    }
}
/// The seq and last_seen of an offline the outcome holds.
fn offline_seq(outcome: &Outcome) -> Option<(u64, u64)> {
    match outcome.events.as_slice() {
        [Event::Offline { seq, last_seen, .. }] => Some((*seq, *last_seen)),
        _ => None,
    }
}
fn users(v: &[&str]) -> Vec<UserId> {
    v.iter().map(|s| user(s)).collect()
}

/// Hands out store handles: for memory, clones of one store; for Redis, a
/// new node (own NodeId, own connection) on the same server each time.
enum Backend {
    Memory(MemoryStore),
    Redis(RedisServer),
}

impl Backend {
    async fn memory() -> Self {
        Backend::Memory(MemoryStore::new())
    }
    async fn redis() -> Self {
        Backend::Redis(RedisServer::start().await)
    }
    async fn node(&self) -> Arc<dyn Store> {
        self.node_with_id(NodeId::new()).await
    }
    async fn node_with_id(&self, id: NodeId) -> Arc<dyn Store> {
        self.graced_node_with_id(id, Duration::ZERO).await
    }
    /// A node whose store has an offline grace of `grace`.
    async fn graced_node(&self, grace: Duration) -> Arc<dyn Store> {
        self.graced_node_with_id(NodeId::new(), grace).await
    }
    async fn graced_node_with_id(&self, id: NodeId, grace: Duration) -> Arc<dyn Store> {
        match self {
            Backend::Memory(m) => Arc::new(m.clone().with_grace(grace)),
            Backend::Redis(r) => Arc::new(
                RedisStore::connect(&r.url(), "presence", id, LEASE)
                    .await
                    .unwrap()
                    .with_grace(grace),
            ),
        }
    }
}

async fn apply(store: &Arc<dyn Store>, ops: Vec<StoreOp>) -> Vec<Outcome> {
    tokio::time::timeout(Duration::from_secs(10), store.apply(ops))
        .await
        .expect("store answered in time")
        .expect("store applied the batch")
        .outcomes
}

macro_rules! both_stores {
    ($($name:ident),* $(,)?) => {
        mod memory {
            $(#[tokio::test] async fn $name() { super::$name(super::Backend::memory().await).await; })*
        }
        mod redis {
            $(#[tokio::test] async fn $name() { super::$name(super::Backend::redis().await).await; })*
        }
    };
}

both_stores!(
    second_tab_is_no_transition,
    seq_counts_every_transition,
    room_transitions_follow_first_and_last_tab,
    presence_reads_state_and_seq,
    unknown_disconnect_is_no_event,
    racing_nodes_see_each_transition_once,
    pages_cover_every_member_once,
    stats_count_users_and_live_nodes,
    user_records_follow_connections,
    reassert_makes_the_store_match_the_node,
    a_return_within_the_grace_is_no_event_and_expiry_is_the_original_end,
    ending_now_skips_the_grace,
    a_grace_started_on_one_node_ends_on_another,
);

async fn second_tab_is_no_transition(b: Backend) {
    let s = b.node().await;
    let u = user("alice");
    let out = apply(
        &s,
        vec![StoreOp::Connect(u.clone()), StoreOp::Connect(u.clone())],
    )
    .await;
    assert_eq!(out, vec![online("alice", 1), quiet()]);
    let out = apply(
        &s,
        vec![StoreOp::Disconnect(u.clone(), Reason::Closed, Ends::Now)],
    )
    .await;
    assert_eq!(out, vec![quiet()]);
    let out = apply(
        &s,
        vec![StoreOp::Disconnect(u.clone(), Reason::Closed, Ends::Now)],
    )
    .await;
    let Some((seq, last_seen)) = offline_seq(&out[0]) else {
        panic!("last tab gone must be a transition: {out:?}");
    };
    assert_eq!(
        out[0].events[0],
        Event::Offline {
            user: u.clone(),
            seq,
            last_seen,
            reason: Reason::Closed
        }
    );
    assert_eq!(seq, 2);
    assert!(
        last_seen > 1_700_000_000_000,
        "last_seen is Unix ms: {last_seen}"
    );
}

async fn seq_counts_every_transition(b: Backend) {
    let s = b.node().await;
    let u = user("bob");
    for round in 0..3u64 {
        let out = apply(
            &s,
            vec![
                StoreOp::Connect(u.clone()),
                StoreOp::Disconnect(u.clone(), Reason::Closed, Ends::Now),
            ],
        )
        .await;
        assert_eq!(out[0], online("bob", round * 2 + 1));
        assert_eq!(
            offline_seq(&out[1]).map(|(seq, _)| seq),
            Some(round * 2 + 2)
        );
    }
}

async fn room_transitions_follow_first_and_last_tab(b: Backend) {
    let s = b.node().await;
    let (r, u, v) = (room("doc:1"), user("u"), user("v"));
    let out = apply(
        &s,
        vec![
            StoreOp::Join(r.clone(), v.clone()),
            StoreOp::Join(r.clone(), u.clone()),
            StoreOp::Join(r.clone(), u.clone()),
        ],
    )
    .await;
    assert_eq!(
        out,
        vec![
            joined("doc:1", "v", members(&["v"])),
            joined("doc:1", "u", members(&["u", "v"])),
            members_read(members(&["u", "v"])),
        ]
    );
    let out = apply(
        &s,
        vec![
            StoreOp::Leave(r.clone(), u.clone(), Reason::Closed, Ends::Now),
            StoreOp::Members(r.clone()),
            StoreOp::Leave(r.clone(), u.clone(), Reason::Closed, Ends::Now),
            StoreOp::Members(r.clone()),
            StoreOp::Leave(r.clone(), v.clone(), Reason::Closed, Ends::Now),
            StoreOp::Members(r.clone()),
        ],
    )
    .await;
    assert_eq!(
        out,
        vec![
            quiet(),
            members_read(members(&["u", "v"])),
            left("doc:1", "u"),
            members_read(members(&["v"])),
            left("doc:1", "v"),
            members_read(vec![]),
        ]
    );
}

async fn presence_reads_state_and_seq(b: Backend) {
    let s = b.node().await;
    apply(&s, vec![StoreOp::Connect(user("on"))]).await;
    apply(
        &s,
        vec![
            StoreOp::Connect(user("was")),
            StoreOp::Disconnect(user("was"), Reason::Closed, Ends::Now),
        ],
    )
    .await;
    let out = apply(
        &s,
        vec![
            StoreOp::Presence(users(&["never", "on", "was"])),
            StoreOp::Presence(vec![]),
        ],
    )
    .await;
    assert_eq!(
        out,
        vec![
            presence(vec![
                UserPresence {
                    online: false,
                    seq: 0
                },
                UserPresence {
                    online: true,
                    seq: 1
                },
                UserPresence {
                    online: false,
                    seq: 2
                },
            ]),
            presence(vec![]),
        ]
    );
}

async fn unknown_disconnect_is_no_event(b: Backend) {
    let s = b.node().await;
    let (u, r) = (user("ghost"), room("r"));
    let out = apply(
        &s,
        vec![
            StoreOp::Disconnect(u.clone(), Reason::Closed, Ends::Now),
            StoreOp::Leave(r.clone(), u.clone(), Reason::Closed, Ends::Now),
        ],
    )
    .await;
    assert_eq!(out, vec![quiet(), quiet()]);
    // The count did not go below zero: the next connect is a transition.
    let out = apply(&s, vec![StoreOp::Connect(u.clone()), StoreOp::Join(r, u)]).await;
    assert_eq!(
        out,
        vec![
            online("ghost", 1),
            joined("r", "ghost", members(&["ghost"]))
        ]
    );
}

/// Two nodes, many tasks, one user connecting and disconnecting: every
/// transition is seen by exactly one op, and by seq they alternate.
async fn racing_nodes_see_each_transition_once(b: Backend) {
    let nodes = [b.node().await, b.node().await];
    let u = user("racer");
    let mut tasks = Vec::new();
    for t in 0..8 {
        let store = nodes[t % 2].clone();
        let u = u.clone();
        tasks.push(tokio::spawn(async move {
            let mut seen = Vec::new();
            for _ in 0..25 {
                for op in [
                    StoreOp::Connect(u.clone()),
                    StoreOp::Disconnect(u.clone(), Reason::Closed, Ends::Now),
                ] {
                    let outcome = &apply(&store, vec![op]).await[0];
                    if let Some(seq) = online_seq(outcome) {
                        seen.push((seq, true));
                    }
                    if let Some((seq, _)) = offline_seq(outcome) {
                        seen.push((seq, false));
                    }
                }
            }
            seen
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all.sort();
    assert!(!all.is_empty());
    for (i, (seq, online)) in all.iter().enumerate() {
        assert_eq!(*seq, i as u64 + 1, "each seq decided exactly once: {all:?}");
        assert_eq!(*online, i % 2 == 0, "online and offline alternate: {all:?}");
    }
    assert!(
        !all.last().unwrap().1,
        "every connect was undone: ends offline"
    );
    let out = apply(&nodes[0], vec![StoreOp::Presence(vec![u])]).await;
    assert_eq!(
        out,
        vec![presence(vec![UserPresence {
            online: false,
            seq: all.len() as u64
        }])]
    );
}

#[tokio::test]
async fn redis_keeps_per_node_bookkeeping_and_lease() {
    let b = Backend::redis().await;
    let Backend::Redis(server) = &b else {
        unreachable!()
    };
    let id = NodeId::new();
    let s = b.node_with_id(id).await;
    apply(
        &s,
        vec![
            StoreOp::Connect(user("u")),
            StoreOp::Connect(user("u")),
            StoreOp::Join(room("r"), user("u")),
        ],
    )
    .await;
    let node_users = format!("presence:node:{id}:users");
    let node_rooms = format!("presence:node:{id}:rooms");
    assert_eq!(server.command::<i64>(&["HGET", &node_users, "u"]).await, 2);
    assert_eq!(
        server.command::<i64>(&["HGET", &node_rooms, "r u"]).await,
        1
    );
    assert_eq!(
        server
            .command::<i64>(&["HGET", "presence:users", "u"])
            .await,
        2
    );
    apply(
        &s,
        vec![
            StoreOp::Leave(room("r"), user("u"), Reason::Closed, Ends::Now),
            StoreOp::Disconnect(user("u"), Reason::Closed, Ends::Now),
            StoreOp::Disconnect(user("u"), Reason::Closed, Ends::Now),
        ],
    )
    .await;
    assert_eq!(
        server
            .command::<i64>(&[
                "EXISTS",
                &node_users,
                &node_rooms,
                "presence:users",
                "presence:room:r"
            ])
            .await,
        0
    );

    tokio::time::timeout(Duration::from_secs(5), s.refresh_lease())
        .await
        .unwrap()
        .unwrap();
    let deadline: f64 = server
        .command(&["ZSCORE", "presence:nodes", &id.to_string()])
        .await;
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as f64;
    assert!(
        deadline > now_ms + 3000.0 && deadline < now_ms + 7000.0,
        "lease ~5 s ahead: {deadline} vs {now_ms}"
    );
}

#[tokio::test]
async fn redis_batch_is_one_transaction() {
    let b = Backend::redis().await;
    let Backend::Redis(server) = &b else {
        unreachable!()
    };
    let s = b.node().await;
    server.reset_stats().await;
    let ops: Vec<StoreOp> = (0..300)
        .map(|i| StoreOp::Connect(user(&format!("u{i}"))))
        .collect();
    let out = apply(&s, ops).await;
    assert_eq!(out.len(), 300);
    assert!(out.iter().all(|o| online_seq(o) == Some(1)));
    assert_eq!(server.command_calls("exec").await, 1);
    assert_eq!(server.command_calls("evalsha").await, 1);
}

#[tokio::test]
async fn redis_restart_without_persistence_reloads_the_script() {
    let mut b = Backend::redis().await;
    let s = b.node().await;
    apply(&s, vec![StoreOp::Connect(user("u"))]).await;
    let Backend::Redis(server) = &mut b else {
        unreachable!()
    };
    server.restart().await;
    // The reconnect may take a few attempts; the script cache is empty and
    // must be refilled transparently (NOSCRIPT inside MULTI). Then the
    // script finds this node's lease gone with the data, and refuses to
    // write before the node reasserts.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match tokio::time::timeout(
            Duration::from_secs(5),
            s.apply(vec![StoreOp::Connect(user("v"))]),
        )
        .await
        {
            Ok(Err(StoreError::LeaseLost)) => break,
            Ok(Ok(out)) => panic!("a node without a lease wrote: {out:?}"),
            _ if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            other => panic!("store never recovered: {other:?}"),
        }
    }
    assert!(
        !tokio::time::timeout(Duration::from_secs(5), s.refresh_lease())
            .await
            .unwrap()
            .unwrap(),
        "a lost lease is reported, not silently renewed"
    );
    let state = NodeState {
        conns: vec![(user("u"), ConnId::new(), None)],
        rooms: vec![(room("r"), user("u"), 1)],
        gone: Reason::Closed,
    };
    let out = apply(
        &s,
        vec![
            StoreOp::Reassert(Arc::new(state)),
            StoreOp::Connect(user("v")),
        ],
    )
    .await;
    assert_eq!(
        out,
        vec![
            Outcome {
                events: vec![
                    Event::Joined {
                        room: room("r"),
                        user: user("u")
                    },
                    Event::Online {
                        user: user("u"),
                        seq: 1
                    },
                ],
                // Redis lost it all: the connection, the user's count and
                // the room's, each fixed and counted.
                tally: Tally {
                    corrected_connections: 1,
                    corrected_user_counts: 1,
                    corrected_room_counts: 1,
                    ..Tally::default()
                },
                ..Outcome::default()
            },
            online("v", 1),
        ]
    );
}

/// Paging a big room (and everyone online) page by page returns every user
/// exactly once; a made-up cursor is refused. Big: Redis returns a hash
/// small enough for its compact encoding (512 entries by default) whole.
async fn pages_cover_every_member_once(b: Backend) {
    const MEMBERS: usize = 1200;
    const LIMIT: usize = 40;
    let s = b.node().await;
    let room = room("big");
    let all: Vec<UserId> = (0..MEMBERS).map(|i| user(&format!("m{i:04}"))).collect();
    let ops = all
        .iter()
        .flat_map(|u| {
            [
                StoreOp::Connect(u.clone()),
                StoreOp::Join(room.clone(), u.clone()),
            ]
        })
        .collect();
    apply(&s, ops).await;

    let mut seen = Vec::new();
    let mut cursor = None;
    let mut pages = 0;
    loop {
        let (page, count) = s.room_page(room.clone(), cursor, LIMIT).await.unwrap();
        assert_eq!(count, MEMBERS as u64);
        assert!(
            page.users.len() <= 2 * LIMIT,
            "about `limit` per page: {}",
            page.users.len()
        );
        seen.extend(page.users);
        pages += 1;
        assert!(pages < 1000, "paging must end");
        match page.next {
            Some(next) => cursor = Some(next),
            None => break,
        }
    }
    assert!(
        pages > 1,
        "a 300-member room takes several pages of {LIMIT}"
    );
    let mut sorted = seen.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted.len(), seen.len(), "no member twice");
    assert_eq!(sorted, all, "no member missing");

    let mut online = Vec::new();
    let mut cursor = None;
    loop {
        let page = s.users_page(cursor, LIMIT).await.unwrap();
        online.extend(page.users);
        match page.next {
            Some(next) => cursor = Some(next),
            None => break,
        }
    }
    online.sort();
    assert_eq!(online, all);

    let empty = s
        .room_page(room_name_nobody_uses(), None, LIMIT)
        .await
        .unwrap();
    assert_eq!(empty, (Default::default(), 0));
    assert!(matches!(
        s.users_page(Some("not a cursor!".into()), LIMIT).await,
        Err(StoreError::BadCursor)
    ));
}

fn room_name_nobody_uses() -> RoomName {
    room("nobody-here")
}

async fn stats_count_users_and_live_nodes(b: Backend) {
    let (a, c) = (b.node().await, b.node().await);
    for s in [&a, &c] {
        tokio::time::timeout(Duration::from_secs(5), s.refresh_lease())
            .await
            .unwrap()
            .unwrap();
    }
    apply(
        &a,
        vec![StoreOp::Connect(user("x")), StoreOp::Connect(user("y"))],
    )
    .await;
    apply(&c, vec![StoreOp::Connect(user("y"))]).await;
    let stats = a.stats().await.unwrap();
    assert_eq!(stats.users_online, 2);
    assert_eq!(stats.connections, 3);
    apply(
        &c,
        vec![
            StoreOp::Disconnect(user("y"), Reason::Closed, Ends::Now),
            StoreOp::Disconnect(user("ghost"), Reason::Closed, Ends::Now),
        ],
    )
    .await;
    assert_eq!(
        a.stats().await.unwrap().connections,
        2,
        "an unknown disconnect counts nothing"
    );
    let nodes = match b {
        Backend::Memory(_) => 1, // one process, one node
        Backend::Redis(_) => 2,
    };
    assert_eq!(stats.nodes_alive, nodes);
}

/// Connection records and metadata: what `GET /v1/users/{id}` reads.
async fn user_records_follow_connections(b: Backend) {
    let id = NodeId::new();
    let s = b.node_with_id(id).await;
    let u = user("alice");
    let (c1, c2) = (ConnId::new(), ConnId::new());
    let never = s.user(user("nobody")).await.unwrap();
    assert_eq!(never, Default::default());

    apply(
        &s,
        vec![
            StoreOp::Connect(u.clone()),
            StoreOp::Attach(u.clone(), c1, Some(meta(r#"{"tab":1}"#))),
            StoreOp::Connect(u.clone()),
            StoreOp::Attach(u.clone(), c2, None),
        ],
    )
    .await;
    let record = s.user(u.clone()).await.unwrap();
    assert!(record.online);
    assert_eq!(
        record.meta,
        Some(meta(r#"{"tab":1}"#)),
        "the latest metadata given"
    );
    let mut conns: Vec<_> = record.connections.iter().map(|c| c.conn.clone()).collect();
    conns.sort();
    let mut expected = vec![c1.to_string(), c2.to_string()];
    expected.sort();
    assert_eq!(conns, expected);
    for c in &record.connections {
        if matches!(b, Backend::Redis(_)) {
            assert_eq!(c.node, id.to_string());
        }
        assert!(c.since_ms > 1_700_000_000_000);
        let expected = if c.conn == c1.to_string() {
            Some(meta(r#"{"tab":1}"#))
        } else {
            None
        };
        assert_eq!(c.meta, expected);
    }
    assert_eq!(record.last_seen_ms, None);

    // Room snapshots carry each member's metadata.
    let out = apply(
        &s,
        vec![
            StoreOp::Join(room("r"), u.clone()),
            StoreOp::Join(room("r"), user("bob")),
            StoreOp::Members(room("r")),
        ],
    )
    .await;
    let with_meta = vec![
        Member {
            user: u.clone(),
            meta: Some(meta(r#"{"tab":1}"#)),
            state: None,
        },
        Member::plain(user("bob")),
    ];
    assert_eq!(out[2], members_read(with_meta.clone()));
    assert_eq!(out[1], joined("r", "bob", with_meta));

    // New metadata for a recorded connection (a join carrying meta):
    // replaced, since_ms kept, and snapshots show it.
    let since = |r: &presenced::store::UserRecord, c: ConnId| {
        r.connections
            .iter()
            .find(|x| x.conn == c.to_string())
            .map(|x| (x.since_ms, x.meta.clone()))
            .expect("recorded")
    };
    let (c2_since, _) = since(&s.user(u.clone()).await.unwrap(), c2);
    let out = apply(
        &s,
        vec![
            StoreOp::Attach(u.clone(), c2, Some(meta(r#"{"tab":2}"#))),
            StoreOp::Members(room("r")),
        ],
    )
    .await;
    let record = s.user(u.clone()).await.unwrap();
    assert_eq!(since(&record, c2), (c2_since, Some(meta(r#"{"tab":2}"#))));
    assert_eq!(record.meta, Some(meta(r#"{"tab":2}"#)));
    assert_eq!(
        out[1],
        members_read(vec![
            Member {
                user: u.clone(),
                meta: Some(meta(r#"{"tab":2}"#)),
                state: None,
            },
            Member::plain(user("bob")),
        ])
    );

    apply(
        &s,
        vec![
            StoreOp::Detach(u.clone(), c1),
            StoreOp::Disconnect(u.clone(), Reason::Closed, Ends::Now),
            StoreOp::Detach(u.clone(), c2),
            StoreOp::Disconnect(u.clone(), Reason::Closed, Ends::Now),
        ],
    )
    .await;
    let record = s.user(u).await.unwrap();
    assert!(!record.online);
    assert!(record.connections.is_empty());
    assert!(record.last_seen_ms.is_some_and(|t| t > 1_700_000_000_000));
    assert_eq!(
        record.meta,
        Some(meta(r#"{"tab":2}"#)),
        "kept after offline"
    );
}

/// Events as sortable text: a reassert walks hashes in no fixed order.
fn sorted_events(events: &[Event]) -> Vec<String> {
    let mut v: Vec<String> = events.iter().map(|e| e.encode().to_string()).collect();
    v.sort();
    v
}

/// A reassert makes the store hold exactly the node's connections and
/// rooms, whatever it held before, emitting the transitions that takes;
/// reasserting the same state again changes nothing.
async fn reassert_makes_the_store_match_the_node(b: Backend) {
    let s = b.node().await;
    let (keep, drop, new) = (ConnId::new(), ConnId::new(), ConnId::new());
    apply(
        &s,
        vec![
            StoreOp::Connect(user("u")),
            StoreOp::Attach(user("u"), keep, None),
            StoreOp::Connect(user("u")),
            StoreOp::Join(room("r"), user("u")),
            StoreOp::Connect(user("v")),
            StoreOp::Attach(user("v"), drop, None),
            StoreOp::Join(room("r"), user("v")),
        ],
    )
    .await;
    let since = s.user(user("u")).await.unwrap().connections[0].since_ms;
    // The node really holds: u once (still in r), w (new, in q). v's
    // connection and u's second one are gone.
    let state = Arc::new(NodeState {
        conns: vec![
            (user("u"), keep, None),
            (user("w"), new, Some(meta(r#"{"k":1}"#))),
        ],
        rooms: vec![(room("r"), user("u"), 1), (room("q"), user("w"), 1)],
        gone: Reason::Shutdown,
    });
    let out = apply(&s, vec![StoreOp::Reassert(state.clone())]).await;
    let events = &out[0].events;
    assert_eq!(out[0].read, Read::Nothing);
    let last_seen = match events.iter().find(|e| matches!(e, Event::Offline { .. })) {
        Some(Event::Offline { last_seen, .. }) => *last_seen,
        _ => panic!("v went offline: {events:?}"),
    };
    assert_eq!(
        sorted_events(events),
        sorted_events(&[
            Event::Left {
                room: room("r"),
                user: user("v"),
                reason: Reason::Shutdown
            },
            Event::Joined {
                room: room("q"),
                user: user("w")
            },
            Event::Offline {
                user: user("v"),
                seq: 2,
                last_seen,
                reason: Reason::Shutdown
            },
            Event::Online {
                user: user("w"),
                seq: 1
            },
        ])
    );
    let out = apply(
        &s,
        vec![
            StoreOp::Presence(users(&["u", "v", "w"])),
            StoreOp::Members(room("r")),
        ],
    )
    .await;
    assert_eq!(
        out[0],
        presence(vec![
            UserPresence {
                online: true,
                seq: 1
            },
            UserPresence {
                online: false,
                seq: 2
            },
            UserPresence {
                online: true,
                seq: 1
            },
        ])
    );
    assert_eq!(out[1], members_read(members(&["u"])));
    let stats = s.stats().await.unwrap();
    assert_eq!((stats.users_online, stats.connections), (2, 2));
    let u = s.user(user("u")).await.unwrap();
    assert_eq!(u.connections.len(), 1);
    assert_eq!(
        u.connections[0].since_ms, since,
        "a kept connection keeps its since"
    );
    assert!(s.user(user("v")).await.unwrap().connections.is_empty());
    let w = s.user(user("w")).await.unwrap();
    assert_eq!(w.connections[0].meta, Some(meta(r#"{"k":1}"#)));

    let again = apply(&s, vec![StoreOp::Reassert(state)]).await;
    assert_eq!(again, vec![quiet()]);
}

/// Waits (bounded) for the next events from a feed, skipping
/// subscription notices.
async fn next_events(feed: &mut futures_util::stream::BoxStream<'static, FeedItem>) -> Vec<Event> {
    loop {
        match tokio::time::timeout(Duration::from_secs(10), feed.next()).await {
            Ok(Some(FeedItem::Published(events))) => {
                return events.into_iter().map(|(_, e)| e).collect();
            }
            Ok(Some(FeedItem::Subscribed { .. })) => {}
            other => panic!("no events from the feed: {other:?}"),
        }
    }
}

/// A node whose lease expires is reaped exactly once however many nodes
/// reap at the same moment: its users who have no connection elsewhere go
/// offline and leave their rooms with reason `node_lost`, its bookkeeping
/// and lease are gone, and the shared counts keep the other node's share.
#[tokio::test]
async fn redis_dead_node_is_reaped_once() {
    let server = RedisServer::start().await;
    let short = Duration::from_millis(1000);
    let dead_id = NodeId::new();
    let dead: Arc<dyn Store> = Arc::new(
        RedisStore::connect(&server.url(), "presence", dead_id, short)
            .await
            .unwrap(),
    );
    let b = Backend::Redis(server);
    let (alive, other) = (b.node().await, b.node().await);
    let Backend::Redis(server) = &b else {
        unreachable!()
    };
    let mut feed = alive.feed().expect("the Redis store has a feed");
    // Subscribed before anything happens.
    match tokio::time::timeout(Duration::from_secs(10), feed.next()).await {
        Ok(Some(FeedItem::Subscribed { .. })) => {}
        other => panic!("expected a subscription first: {other:?}"),
    }
    apply(
        &dead,
        vec![
            StoreOp::Connect(user("gone")),
            StoreOp::Attach(user("gone"), ConnId::new(), None),
            StoreOp::Join(room("r"), user("gone")),
            StoreOp::Connect(user("both")),
            StoreOp::Join(room("r"), user("both")),
        ],
    )
    .await;
    apply(
        &alive,
        vec![
            StoreOp::Connect(user("both")),
            StoreOp::Join(room("r"), user("both")),
        ],
    )
    .await;
    let mut seen = Vec::new();
    while seen.len() < 4 {
        seen.extend(next_events(&mut feed).await);
    }
    // `dead` stops refreshing; poll both survivors until one reaps it.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut reaped = Vec::new();
    while reaped.is_empty() {
        assert!(tokio::time::Instant::now() < deadline, "never reaped");
        let (a, o) = tokio::join!(alive.reap(), other.reap());
        for r in [a.unwrap(), o.unwrap()] {
            reaped.extend(r.nodes.into_iter().map(|n| (n, r.events)));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        reaped,
        vec![(dead_id.to_string(), 2)],
        "reaped once, two events"
    );
    let events = next_events(&mut feed).await;
    let last_seen = match events.last() {
        Some(Event::Offline { last_seen, .. }) => *last_seen,
        _ => panic!("the last event is an offline: {events:?}"),
    };
    assert_eq!(
        events,
        vec![
            Event::Left {
                room: room("r"),
                user: user("gone"),
                reason: Reason::NodeLost
            },
            Event::Offline {
                user: user("gone"),
                seq: 2,
                last_seen,
                reason: Reason::NodeLost
            },
        ]
    );
    let users: Vec<String> = server.command(&["HKEYS", "presence:users"]).await;
    assert_eq!(users, vec!["both".to_owned()]);
    let room_members: Vec<(String, i64)> = server.command(&["HGETALL", "presence:room:r"]).await;
    assert_eq!(room_members, vec![("both".to_owned(), 1)]);
    let dead_keys: i64 = server
        .command(&[
            "EXISTS",
            &format!("presence:node:{dead_id}:users"),
            &format!("presence:node:{dead_id}:rooms"),
            "presence:user:gone:conns",
        ])
        .await;
    assert_eq!(dead_keys, 0);
    let lease: Option<f64> = server
        .command(&["ZSCORE", "presence:nodes", &dead_id.to_string()])
        .await;
    assert_eq!(lease, None);
    let connections: i64 = server.command(&["GET", "presence:connections"]).await;
    assert_eq!(connections, 1);
    // The dead node, had it only been slow, must reassert before writing.
    assert!(matches!(
        dead.apply(vec![StoreOp::Connect(user("late"))]).await,
        Err(StoreError::LeaseLost)
    ));
}

const GRACE: Duration = Duration::from_millis(400);

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// `Expire` on `s` until it ends something (bounded): a deadline in the
/// store can only be watched by asking.
async fn expire_until_due(s: &Arc<dyn Store>) -> Outcome {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let out = apply(s, vec![StoreOp::Expire]).await.remove(0);
        if !out.events.is_empty() {
            return out;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no grace ran out within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

fn started(users: u64, rooms: u64) -> Tally {
    Tally {
        grace_started_users: users,
        grace_started_rooms: rooms,
        ..Tally::default()
    }
}

fn with_tally(mut outcome: Outcome, tally: Tally) -> Outcome {
    outcome.tally = tally;
    outcome
}

/// A last connection that ends after-grace leaves the user online, and a
/// member in the room, with no event; a connection and a join within the
/// grace end it with no event either. When it runs out, the `left` and the
/// `offline` come once, with the reason and the moment of the end.
async fn a_return_within_the_grace_is_no_event_and_expiry_is_the_original_end(b: Backend) {
    let s = b.graced_node(GRACE).await;
    let (u, r) = (user("g"), room("doc"));
    apply(
        &s,
        vec![
            StoreOp::Connect(u.clone()),
            StoreOp::Join(r.clone(), u.clone()),
        ],
    )
    .await;
    let ends = |reason| {
        vec![
            StoreOp::Leave(r.clone(), u.clone(), reason, Ends::AfterGrace),
            StoreOp::Disconnect(u.clone(), reason, Ends::AfterGrace),
        ]
    };
    let closed_at = now_ms();
    let out = apply(&s, ends(Reason::Timeout)).await;
    assert_eq!(
        out,
        vec![
            with_tally(quiet(), started(0, 1)),
            with_tally(quiet(), started(1, 0))
        ]
    );
    // Online for every read meanwhile.
    let out = apply(
        &s,
        vec![
            StoreOp::Presence(vec![u.clone()]),
            StoreOp::Members(r.clone()),
        ],
    )
    .await;
    assert_eq!(
        out,
        vec![
            presence(vec![UserPresence {
                online: true,
                seq: 1
            }]),
            members_read(members(&["g"])),
        ]
    );
    let stats = s.stats().await.unwrap();
    assert_eq!(
        (stats.users_online, stats.connections, stats.users_in_grace),
        (1, 0, 1)
    );
    let record = s.user(u.clone()).await.unwrap();
    assert!(record.online && record.connections.is_empty());
    let until = record.grace_until_ms.expect("in the grace");
    assert!(
        until + 1_000 >= closed_at + GRACE.as_millis() as u64
            && until <= now_ms() + GRACE.as_millis() as u64 + 1_000,
        "the grace runs out {GRACE:?} after the end: {until} vs {closed_at}"
    );
    // Not due yet.
    assert_eq!(apply(&s, vec![StoreOp::Expire]).await, vec![quiet()]);

    // Back within the grace: nothing to tell anyone.
    let out = apply(
        &s,
        vec![
            StoreOp::Connect(u.clone()),
            StoreOp::Join(r.clone(), u.clone()),
        ],
    )
    .await;
    let cancelled = |users, rooms| Tally {
        grace_cancelled_users: users,
        grace_cancelled_rooms: rooms,
        ..Tally::default()
    };
    assert_eq!(
        out,
        vec![
            with_tally(quiet(), cancelled(1, 0)),
            with_tally(members_read(members(&["g"])), cancelled(0, 1)),
        ]
    );
    assert_eq!(s.user(u.clone()).await.unwrap().grace_until_ms, None);

    // Gone again: the grace starts anew from this end, and runs out.
    let closed_at = now_ms();
    apply(&s, ends(Reason::Shutdown)).await;
    let out = expire_until_due(&s).await;
    let expired_at = now_ms();
    let last_seen = match out.events.as_slice() {
        [_, Event::Offline { last_seen, .. }] => *last_seen,
        other => panic!("a left, then an offline: {other:?}"),
    };
    assert_eq!(
        out.events,
        vec![
            Event::Left {
                room: r.clone(),
                user: u.clone(),
                reason: Reason::Shutdown
            },
            Event::Offline {
                user: u.clone(),
                seq: 2,
                last_seen,
                reason: Reason::Shutdown
            },
        ]
    );
    assert_eq!(
        (out.tally.grace_expired_users, out.tally.grace_expired_rooms),
        (1, 1)
    );
    assert!(
        last_seen + 1_000 >= closed_at && last_seen + GRACE.as_millis() as u64 / 2 <= expired_at,
        "last_seen is the end ({closed_at}), not the expiry ({expired_at}): {last_seen}"
    );
    // Exactly once.
    assert_eq!(apply(&s, vec![StoreOp::Expire]).await, vec![quiet()]);
    let stats = s.stats().await.unwrap();
    assert_eq!((stats.users_online, stats.users_in_grace), (0, 0));
    assert_eq!(
        apply(&s, vec![StoreOp::Members(r)]).await,
        vec![members_read(vec![])]
    );
}

/// A sign-out (close 1000) and an explicit leave end at once, whatever
/// the grace.
async fn ending_now_skips_the_grace(b: Backend) {
    let s = b.graced_node(Duration::from_secs(60)).await;
    let (u, r) = (user("n"), room("doc"));
    apply(
        &s,
        vec![
            StoreOp::Connect(u.clone()),
            StoreOp::Join(r.clone(), u.clone()),
        ],
    )
    .await;
    let out = apply(
        &s,
        vec![
            StoreOp::Leave(r.clone(), u.clone(), Reason::Closed, Ends::Now),
            StoreOp::Disconnect(u.clone(), Reason::Closed, Ends::Now),
        ],
    )
    .await;
    assert_eq!(out[0], left("doc", "n"));
    assert!(offline_seq(&out[1]).is_some(), "offline at once: {out:?}");
    assert_eq!(s.stats().await.unwrap().users_in_grace, 0);
}

/// A grace started by one node's op is cancelled by another node's
/// connect, and one started there runs out on the first node's expire,
/// once.
async fn a_grace_started_on_one_node_ends_on_another(b: Backend) {
    let (a, c) = (b.graced_node(GRACE).await, b.graced_node(GRACE).await);
    let u = user("roamer");
    apply(&a, vec![StoreOp::Connect(u.clone())]).await;
    apply(
        &a,
        vec![StoreOp::Disconnect(
            u.clone(),
            Reason::Closed,
            Ends::AfterGrace,
        )],
    )
    .await;
    let out = apply(&c, vec![StoreOp::Connect(u.clone())]).await;
    assert!(
        out[0].events.is_empty(),
        "the other node's connect is no online: {out:?}"
    );
    assert_eq!(out[0].tally.grace_cancelled_users, 1);
    apply(
        &c,
        vec![StoreOp::Disconnect(
            u.clone(),
            Reason::Closed,
            Ends::AfterGrace,
        )],
    )
    .await;
    let out = expire_until_due(&a).await;
    assert!(
        matches!(out.events.as_slice(), [Event::Offline { seq: 2, .. }]),
        "{out:?}"
    );
    assert_eq!(apply(&c, vec![StoreOp::Expire]).await, vec![quiet()]);
}

/// 100,000 graces started and run out leave nothing behind: no deadline,
/// no reason, no count, no field in a user's record.
#[tokio::test]
async fn redis_graces_leave_no_keys_behind() {
    const USERS: usize = 100_000;
    let b = Backend::redis().await;
    let s = b.graced_node(Duration::from_millis(100)).await;
    let Backend::Redis(server) = &b else {
        unreachable!()
    };
    let names: Vec<UserId> = (0..USERS).map(|i| user(&format!("g{i}"))).collect();
    // Batches of about the registry's size (--batch-max 512): a script of
    // thousands of ops can outlast the store's 5 s response timeout on a
    // loaded machine.
    // Every tenth user is also in one of 1,000 rooms (10 each: a join's
    // snapshot reads its whole room, which is not what this measures).
    for (c, chunk) in names.chunks(250).enumerate() {
        let mut ops = Vec::new();
        for (i, u) in chunk.iter().enumerate() {
            ops.push(StoreOp::Connect(u.clone()));
            if i % 10 == 0 {
                let r = room(&format!("r{}", (c * 25 + i / 10) % 1000));
                ops.push(StoreOp::Join(r.clone(), u.clone()));
                ops.push(StoreOp::Leave(
                    r,
                    u.clone(),
                    Reason::Closed,
                    Ends::AfterGrace,
                ));
            }
            ops.push(StoreOp::Disconnect(
                u.clone(),
                Reason::Closed,
                Ends::AfterGrace,
            ));
        }
        apply(&s, ops).await;
    }
    assert_eq!(s.stats().await.unwrap().users_in_grace, USERS as u64);
    let mut offline = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while s.stats().await.unwrap().users_in_grace > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the graces never all ran out"
        );
        let out = apply(&s, vec![StoreOp::Expire]).await.remove(0);
        offline += out
            .events
            .iter()
            .filter(|e| matches!(e, Event::Offline { .. }))
            .count();
        if out.events.is_empty() {
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
    assert_eq!(
        offline, USERS,
        "each grace ran out into exactly one offline"
    );
    let left: i64 = server
        .command(&[
            "EXISTS",
            "presence:grace",
            "presence:room_grace",
            "presence:room_grace:reasons",
            "presence:users",
            "presence:room:r0",
        ])
        .await;
    assert_eq!(left, 0, "no grace structure, count or room is left");
    for u in ["g0", "g99999"] {
        let fields: Vec<String> = server
            .command(&["HKEYS", &format!("presence:user:{u}")])
            .await;
        let mut fields = fields;
        fields.sort();
        assert_eq!(
            fields,
            ["last_seen", "seq"],
            "{u}: only what outlives presence"
        );
    }
}

/// A killed node's users enter the grace when it is reaped: one who
/// reconnects in time never goes offline, the other goes offline once,
/// with reason node_lost.
#[tokio::test]
async fn redis_a_reaped_nodes_users_enter_the_grace() {
    let server = RedisServer::start().await;
    let dead_id = NodeId::new();
    let dead: Arc<dyn Store> = Arc::new(
        RedisStore::connect(
            &server.url(),
            "presence",
            dead_id,
            Duration::from_millis(1000),
        )
        .await
        .unwrap(),
    );
    let b = Backend::Redis(server);
    let alive = b.graced_node(GRACE).await;
    apply(
        &dead,
        vec![
            StoreOp::Connect(user("back")),
            StoreOp::Connect(user("gone")),
            StoreOp::Join(room("r"), user("gone")),
        ],
    )
    .await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let reaped = loop {
        let reaped = alive.reap().await.unwrap();
        if !reaped.nodes.is_empty() {
            break reaped;
        }
        assert!(tokio::time::Instant::now() < deadline, "never reaped");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(reaped.events, 0, "nobody is told at the reap");
    assert_eq!(
        (
            reaped.tally.grace_started_users,
            reaped.tally.grace_started_rooms
        ),
        (2, 1)
    );
    let out = apply(&alive, vec![StoreOp::Connect(user("back"))]).await;
    assert!(out[0].events.is_empty(), "back in time: {out:?}");
    let out = expire_until_due(&alive).await;
    let last_seen = match out.events.last() {
        Some(Event::Offline { last_seen, .. }) => *last_seen,
        other => panic!("an offline last: {other:?}"),
    };
    assert_eq!(
        out.events,
        vec![
            Event::Left {
                room: room("r"),
                user: user("gone"),
                reason: Reason::NodeLost
            },
            Event::Offline {
                user: user("gone"),
                seq: 2,
                last_seen,
                reason: Reason::NodeLost
            },
        ]
    );
}
