//! The Redis codec end to end: every `StoreOp` goes through batch.lua on a
//! real redis-server and every event kind comes back (in the batch's
//! outcomes and on the event channel) exactly as it went in, with
//! metadata holding spaces, quotes, newlines, backslashes and non-ASCII
//! text, and ids using every character the naming rules allow.

mod support;

use std::{sync::Arc, time::Duration};

use futures_util::StreamExt;
use presenced::{
    ids::{ConnId, Meta, NodeId, RoomName, UserId},
    protocol::{Ends, Event, Member, Reason},
    store::{FeedItem, NodeState, Outcome, Read, RedisStore, Store, StoreOp, Tally, UserPresence},
};
use support::RedisServer;

/// Metadata no text encoding split on separators would survive.
const AWKWARD: &str = r#"{"name":"Zoë \"Z\" O'Brien","note":"two  spaces\nand a newline","path":"C:\\tmp","emoji":"🦀","big":12345678901234567890,"pi":3.141592653589793}"#;

fn meta(text: &str) -> Meta {
    Meta::parse(text, 4096).unwrap()
}

#[tokio::test]
async fn every_op_and_event_crosses_the_codec_unchanged() {
    let server = RedisServer::start().await;
    let node = NodeId::new();
    let store = RedisStore::connect(&server.url(), "codec", node, Duration::from_secs(30))
        .await
        .unwrap();
    let mut feed = store.feed().expect("the Redis store has a feed");
    match tokio::time::timeout(Duration::from_secs(10), feed.next()).await {
        Ok(Some(FeedItem::Subscribed { .. })) => {}
        other => panic!("expected a subscription first: {other:?}"),
    }
    let user = UserId::parse("a.b-c_d:e@f").unwrap();
    let room = RoomName::parse("doc:1/a+b=c").unwrap();
    let (conn, other_conn) = (ConnId::new(), ConnId::new());
    let awkward = meta(AWKWARD);
    // The float survives exactly, and the number beyond u64 precision is
    // kept as written: the text is opaque to Lua.
    assert!(awkward.as_str().contains("3.141592653589793"));

    let ops = vec![
        StoreOp::Connect(user.clone()),
        StoreOp::Attach(user.clone(), conn, Some(awkward.clone())),
        StoreOp::Join(room.clone(), user.clone()),
        StoreOp::Update(room.clone(), user.clone(), conn, awkward.clone()),
        StoreOp::Members(room.clone()),
        StoreOp::Presence(vec![user.clone()]),
        StoreOp::Leave(room.clone(), user.clone(), Reason::Timeout, Ends::Now),
        StoreOp::Detach(user.clone(), conn),
        StoreOp::Disconnect(user.clone(), Reason::Shutdown, Ends::Now),
        StoreOp::Reassert(Arc::new(NodeState {
            conns: vec![(user.clone(), other_conn, Some(awkward.clone()))],
            rooms: vec![(room.clone(), user.clone(), 1)],
            gone: Reason::NodeLost,
        })),
    ];
    let applied = tokio::time::timeout(Duration::from_secs(10), store.apply(ops))
        .await
        .unwrap()
        .unwrap();
    let out = applied.outcomes;
    let member = Member {
        user: user.clone(),
        meta: Some(awkward.clone()),
        state: None,
    };
    // The room state is as awkward as the metadata, and arrives as sent.
    let with_state = Member {
        state: Some(awkward.clone()),
        ..member.clone()
    };
    let last_seen = match out[8].events.as_slice() {
        [Event::Offline { last_seen, .. }] => *last_seen,
        other => panic!("the last connection's disconnect is an offline: {other:?}"),
    };
    let expected = vec![
        Outcome::events(vec![Event::Online {
            user: user.clone(),
            seq: 1,
        }]),
        Outcome::default(),
        Outcome {
            events: vec![Event::Joined {
                room: room.clone(),
                user: user.clone(),
            }],
            read: Read::Members(vec![member.clone()]),
            ..Outcome::default()
        },
        Outcome::events(vec![Event::Updated {
            room: room.clone(),
            user: user.clone(),
            state: awkward.clone(),
            from: Some(conn),
        }]),
        Outcome::read(Read::Members(vec![with_state])),
        Outcome::read(Read::Presence(vec![UserPresence {
            online: true,
            seq: 1,
        }])),
        Outcome::events(vec![Event::Left {
            room: room.clone(),
            user: user.clone(),
            reason: Reason::Timeout,
        }]),
        Outcome::default(),
        Outcome::events(vec![Event::Offline {
            user: user.clone(),
            seq: 2,
            last_seen,
            reason: Reason::Shutdown,
        }]),
        Outcome {
            events: vec![
                Event::Joined {
                    room: room.clone(),
                    user: user.clone(),
                },
                Event::Online {
                    user: user.clone(),
                    seq: 3,
                },
            ],
            // The store held none of it for this node: three fixes.
            tally: Tally {
                corrected_connections: 1,
                corrected_user_counts: 1,
                corrected_room_counts: 1,
                ..Tally::default()
            },
            ..Outcome::default()
        },
    ];
    assert_eq!(out, expected);

    // The channel carried the same events, numbered after the batch's base.
    let published: Vec<Event> = expected.iter().flat_map(|o| o.events.clone()).collect();
    let mut heard = Vec::new();
    while heard.len() < published.len() {
        match tokio::time::timeout(Duration::from_secs(10), feed.next()).await {
            Ok(Some(FeedItem::Published(events))) => heard.extend(events),
            other => panic!("no events from the feed: {other:?}"),
        }
    }
    let base = applied
        .published_after
        .expect("a shared store numbers events");
    let numbers: Vec<u64> = heard.iter().map(|(n, _)| *n).collect();
    assert_eq!(
        numbers,
        (base + 1..=base + published.len() as u64).collect::<Vec<_>>()
    );
    assert_eq!(
        heard.into_iter().map(|(_, e)| e).collect::<Vec<_>>(),
        published
    );

    // The connection record written by the reassert, read back.
    let record = store.user(user.clone()).await.unwrap();
    assert!(record.online);
    assert_eq!(record.meta, Some(awkward.clone()));
    assert_eq!(record.connections.len(), 1);
    assert_eq!(record.connections[0].conn, other_conn.to_string());
    assert_eq!(record.connections[0].node, node.to_string());
    assert_eq!(
        record.connections[0].meta.as_ref().map(Meta::as_str),
        Some(AWKWARD_COMPACT)
    );
}

/// `AWKWARD` as the gateway stores it: compact (keys in order), every
/// character of every value kept.
const AWKWARD_COMPACT: &str = r#"{"big":12345678901234567890,"emoji":"🦀","name":"Zoë \"Z\" O'Brien","note":"two  spaces\nand a newline","path":"C:\\tmp","pi":3.141592653589793}"#;
