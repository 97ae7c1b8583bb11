//! Store conformance: the same scenarios against `MemoryStore` and
//! `RedisStore` (a real redis-server per test). Transitions must be decided
//! identically by both, and atomically under races.

mod support;

use std::{sync::Arc, time::Duration};

use presenced::{
    ids::{ConnId, NodeId, RoomName, UserId},
    store::{
        MemoryStore, Outcome, RedisStore, RoomMember, Store, StoreError, StoreOp, UserPresence,
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
fn members(v: &[&str]) -> Vec<RoomMember> {
    users(v).into_iter().map(RoomMember::plain).collect()
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
        match self {
            Backend::Memory(m) => Arc::new(m.clone()),
            Backend::Redis(r) => Arc::new(
                RedisStore::connect(&r.url(), "presence", id, LEASE)
                    .await
                    .unwrap(),
            ),
        }
    }
}

async fn apply(store: &Arc<dyn Store>, ops: Vec<StoreOp>) -> Vec<Outcome> {
    tokio::time::timeout(Duration::from_secs(10), store.apply(ops))
        .await
        .expect("store answered in time")
        .expect("store applied the batch")
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
);

async fn second_tab_is_no_transition(b: Backend) {
    let s = b.node().await;
    let u = user("alice");
    let out = apply(
        &s,
        vec![StoreOp::Connect(u.clone()), StoreOp::Connect(u.clone())],
    )
    .await;
    assert_eq!(
        out,
        vec![Outcome::Connected(Some(1)), Outcome::Connected(None)]
    );
    let out = apply(&s, vec![StoreOp::Disconnect(u.clone())]).await;
    assert_eq!(out, vec![Outcome::Disconnected(None)]);
    let out = apply(&s, vec![StoreOp::Disconnect(u.clone())]).await;
    let Outcome::Disconnected(Some((seq, last_seen))) = out[0] else {
        panic!("last tab gone must be a transition: {out:?}");
    };
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
            vec![StoreOp::Connect(u.clone()), StoreOp::Disconnect(u.clone())],
        )
        .await;
        assert_eq!(out[0], Outcome::Connected(Some(round * 2 + 1)));
        assert!(matches!(out[1], Outcome::Disconnected(Some((seq, _))) if seq == round * 2 + 2));
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
            Outcome::Joined(true, members(&["v"])),
            Outcome::Joined(true, members(&["u", "v"])),
            Outcome::Joined(false, members(&["u", "v"])),
        ]
    );
    let out = apply(
        &s,
        vec![
            StoreOp::Leave(r.clone(), u.clone()),
            StoreOp::Members(r.clone()),
            StoreOp::Leave(r.clone(), u.clone()),
            StoreOp::Members(r.clone()),
            StoreOp::Leave(r.clone(), v.clone()),
            StoreOp::Members(r.clone()),
        ],
    )
    .await;
    assert_eq!(
        out,
        vec![
            Outcome::Left(false),
            Outcome::Members(members(&["u", "v"])),
            Outcome::Left(true),
            Outcome::Members(members(&["v"])),
            Outcome::Left(true),
            Outcome::Members(vec![]),
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
            StoreOp::Disconnect(user("was")),
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
            Outcome::Presence(vec![
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
            Outcome::Presence(vec![]),
        ]
    );
}

async fn unknown_disconnect_is_no_event(b: Backend) {
    let s = b.node().await;
    let (u, r) = (user("ghost"), room("r"));
    let out = apply(
        &s,
        vec![
            StoreOp::Disconnect(u.clone()),
            StoreOp::Leave(r.clone(), u.clone()),
        ],
    )
    .await;
    assert_eq!(out, vec![Outcome::Disconnected(None), Outcome::Left(false)]);
    // The count did not go below zero: the next connect is a transition.
    let out = apply(&s, vec![StoreOp::Connect(u.clone()), StoreOp::Join(r, u)]).await;
    assert_eq!(
        out,
        vec![
            Outcome::Connected(Some(1)),
            Outcome::Joined(true, members(&["ghost"]))
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
                for op in [StoreOp::Connect(u.clone()), StoreOp::Disconnect(u.clone())] {
                    match apply(&store, vec![op]).await[0] {
                        Outcome::Connected(Some(seq)) => seen.push((seq, true)),
                        Outcome::Disconnected(Some((seq, _))) => seen.push((seq, false)),
                        _ => {}
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
        vec![Outcome::Presence(vec![UserPresence {
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
            StoreOp::Leave(room("r"), user("u")),
            StoreOp::Disconnect(user("u")),
            StoreOp::Disconnect(user("u")),
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
    assert!(out.iter().all(|o| matches!(o, Outcome::Connected(Some(1)))));
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
    // must be refilled transparently (NOSCRIPT inside MULTI).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let out = loop {
        match tokio::time::timeout(
            Duration::from_secs(5),
            s.apply(vec![StoreOp::Connect(user("v"))]),
        )
        .await
        {
            Ok(Ok(out)) => break out,
            _ if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            other => panic!("store never recovered: {other:?}"),
        }
    };
    assert_eq!(out, vec![Outcome::Connected(Some(1))]);
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
            StoreOp::Disconnect(user("y")),
            StoreOp::Disconnect(user("ghost")),
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
            StoreOp::Attach(u.clone(), c1, Some(r#"{"tab":1}"#.into())),
            StoreOp::Connect(u.clone()),
            StoreOp::Attach(u.clone(), c2, None),
        ],
    )
    .await;
    let record = s.user(u.clone()).await.unwrap();
    assert!(record.online);
    assert_eq!(
        record.meta.as_deref(),
        Some(r#"{"tab":1}"#),
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
        let meta = if c.conn == c1.to_string() {
            Some(r#"{"tab":1}"#)
        } else {
            None
        };
        assert_eq!(c.meta.as_deref(), meta);
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
        RoomMember {
            user: u.clone(),
            meta: Some(r#"{"tab":1}"#.into()),
        },
        RoomMember::plain(user("bob")),
    ];
    assert_eq!(out[2], Outcome::Members(with_meta.clone()));
    assert_eq!(out[1], Outcome::Joined(true, with_meta));

    apply(
        &s,
        vec![
            StoreOp::Detach(u.clone(), c1),
            StoreOp::Disconnect(u.clone()),
            StoreOp::Detach(u.clone(), c2),
            StoreOp::Disconnect(u.clone()),
        ],
    )
    .await;
    let record = s.user(u).await.unwrap();
    assert!(!record.online);
    assert!(record.connections.is_empty());
    assert!(record.last_seen_ms.is_some_and(|t| t > 1_700_000_000_000));
    assert_eq!(
        record.meta.as_deref(),
        Some(r#"{"tab":1}"#),
        "kept after offline"
    );
}
