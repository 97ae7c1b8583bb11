//! Rooms: the join snapshot, and `joined`/`left` fired per user (not per
//! tab) to the room's member connections only.

mod support;

use serde_json::json;
use support::{Backend, Client, joined, on_both_stores, room_event_in};

const ROOM: &str = "doc:1";

on_both_stores!(room_events_fire_per_user_across_tabs =>
    room_events_fire_per_user_across_tabs_memory, room_events_fire_per_user_across_tabs_redis);

async fn room_events_fire_per_user_across_tabs(backend: Backend) {
    let deployment = backend.start(&[]).await;
    let gateway = &deployment.gateway;

    // zoe is in the room first; she hears everything that happens in it.
    let mut zoe = Client::connect(&gateway.ws_url("zoe")).await;
    assert_eq!(
        zoe.join(ROOM).await,
        ["zoe"],
        "the joiner is in its snapshot"
    );
    assert_eq!(
        zoe.next_event().await,
        json!({"type": "joined", "room": ROOM, "user": "zoe"})
    );
    // eve is in another room, mallory in none: neither hears doc:1.
    let mut eve = Client::connect(&gateway.ws_url("eve")).await;
    assert_eq!(eve.join("doc:2").await, ["eve"]);
    eve.expect_event(joined("doc:2", "eve")).await;
    let mut mallory = Client::connect(&gateway.ws_url("mallory")).await;

    // The joiner gets its reply with the sorted snapshot before its own joined.
    let mut alice_tab_1 = Client::connect(&gateway.ws_url("alice")).await;
    alice_tab_1
        .send_json(json!({"type": "join", "room": ROOM, "ref": 1}))
        .await;
    assert_eq!(
        alice_tab_1.next_event().await,
        json!({"type": "reply", "ref": 1, "ok": true, "room": ROOM,
               "members": [{"user": "alice"}, {"user": "zoe"}]}),
        "first comes the reply, with members sorted by user id"
    );
    assert_eq!(
        alice_tab_1.next_event().await,
        json!({"type": "joined", "room": ROOM, "user": "alice"}),
        "then the joiner's own joined"
    );
    assert_eq!(
        zoe.next_event().await,
        json!({"type": "joined", "room": ROOM, "user": "alice"})
    );

    // A second tab of the same user joining is not the user joining.
    let mut alice_tab_2 = Client::connect(&gateway.ws_url("alice")).await;
    assert_eq!(alice_tab_2.join(ROOM).await, ["alice", "zoe"]);
    // Joining again on the same connection answers the snapshot again, silently.
    assert_eq!(alice_tab_1.join(ROOM).await, ["alice", "zoe"]);
    zoe.expect_no_event(room_event_in(ROOM)).await;
    alice_tab_1.expect_no_event(room_event_in(ROOM)).await;
    alice_tab_2.expect_no_event(room_event_in(ROOM)).await;

    // The first tab leaving is not the user leaving.
    let reply = alice_tab_1
        .request(json!({"type": "leave", "room": ROOM, "ref": "leave-1"}))
        .await;
    assert_eq!(
        reply,
        json!({"type": "reply", "ref": "leave-1", "ok": true, "room": ROOM})
    );
    zoe.expect_no_event(room_event_in(ROOM)).await;

    // The last tab leaving is.
    alice_tab_2.leave(ROOM).await;
    assert_eq!(
        zoe.next_event().await,
        json!({"type": "left", "room": ROOM, "user": "alice", "reason": "closed"})
    );

    // Disconnecting the last tab in the room is leaving too.
    assert_eq!(alice_tab_1.join(ROOM).await, ["alice", "zoe"]);
    alice_tab_1.expect_event(joined(ROOM, "alice")).await;
    assert_eq!(
        zoe.next_event().await,
        json!({"type": "joined", "room": ROOM, "user": "alice"})
    );
    alice_tab_1.close().await;
    assert_eq!(
        zoe.next_event().await,
        json!({"type": "left", "room": ROOM, "user": "alice", "reason": "closed"})
    );
    zoe.expect_silence().await;

    // "A connection that left no longer hears them; non-members hear nothing":
    // alice's second tab left before the rejoin and disconnect above.
    alice_tab_2.expect_no_event(room_event_in(ROOM)).await;
    eve.expect_no_event(room_event_in(ROOM)).await;
    mallory.expect_silence().await;

    // The room now holds zoe only.
    let mut bob = Client::connect(&gateway.ws_url("bob")).await;
    assert_eq!(bob.join(ROOM).await, ["bob", "zoe"]);
    assert_eq!(
        zoe.next_event().await,
        json!({"type": "joined", "room": ROOM, "user": "bob"})
    );
}

on_both_stores!(a_snapshot_bigger_than_any_client_frame_arrives_whole =>
    a_snapshot_bigger_than_any_client_frame_arrives_whole_memory,
    a_snapshot_bigger_than_any_client_frame_arrives_whole_redis);

/// A join snapshot is as big as the room: 300 members with 1 KiB of
/// metadata each make a reply of over 300 KiB, more than four times the
/// largest client message. It arrives whole; the gateway's write bound is
/// the outbox, not a frame size.
async fn a_snapshot_bigger_than_any_client_frame_arrives_whole(backend: Backend) {
    const MEMBERS: usize = 300;
    let deployment = backend.start(&[]).await;
    let gateway = &deployment.gateway;
    let filler = "x".repeat(1000);
    let meta = format!(r#"{{"bio":"{filler}"}}"#);
    let encoded: String = url_encoded(&meta);
    let mut members = Vec::new();
    for i in 0..MEMBERS {
        let url = format!("{}&meta={encoded}", gateway.ws_url(&format!("m{i:03}")));
        let mut member = Client::connect(&url).await;
        member.join("big").await;
        members.push(member);
    }
    let mut joiner = Client::connect(&gateway.ws_url("joiner")).await;
    let reply = joiner.ask_ok(json!({"type": "join", "room": "big"})).await;
    let listed = reply["members"].as_array().expect("members");
    assert_eq!(listed.len(), MEMBERS + 1);
    assert!(
        reply.to_string().len() > 4 * 65536,
        "the snapshot is bigger than four client messages"
    );
    assert_eq!(listed[1]["meta"]["bio"], filler.as_str());
    joiner.ping().await;
}

/// `s` as a URL query value.
fn url_encoded(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}
