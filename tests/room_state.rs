//! Room state: `update` sets a member's state in a room, members hear
//! `updated` (not the sender's own connection, not outsiders), the state is
//! in snapshots and gone with `left`, writes are paced per connection and
//! room (latest wins), and bad updates are refused and change nothing.

mod support;

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::{
    Backend, Client, EVENT_TIMEOUT, Gateway, Matcher, RedisServer, joined, left, on_both_stores,
};

const ROOM: &str = "doc:1";

/// `{"type":"updated","room":ROOM,"user":USER,...}`
fn updated(room: &str, user: &str) -> Matcher {
    let (room, user) = (room.to_owned(), user.to_owned());
    Matcher::new(format!("updated {room} {user}"), move |f| {
        f["type"] == "updated" && f["room"] == room.as_str() && f["user"] == user.as_str()
    })
}

/// Sends an update and returns its answer (a reply or an error).
async fn update(client: &mut Client, room: &str, state: Value) -> Value {
    client
        .ask(json!({"type": "update", "room": room, "state": state}))
        .await
}

/// Joins `room` as `user` and takes the join's own `joined`, if it was
/// the user's first connection in it.
async fn enter(client: &mut Client, user: &str, room: &str, first: bool) {
    client.join(room).await;
    if first {
        client.expect_event(joined(room, user)).await;
    }
}

/// bob, then alice, in ROOM on `gateway`, each having heard its own
/// `joined` and bob alice's.
async fn bob_then_alice(gateway: &Gateway) -> (Client, Client) {
    let mut bob = Client::connect(&gateway.ws_url("bob")).await;
    enter(&mut bob, "bob", ROOM, true).await;
    let mut alice = Client::connect(&gateway.ws_url("alice")).await;
    enter(&mut alice, "alice", ROOM, true).await;
    bob.expect_event(joined(ROOM, "alice")).await;
    (bob, alice)
}

/// A join's members as sent: `[{"user":..,"meta":..,"state":..}]`.
async fn members(client: &mut Client, room: &str) -> Value {
    let reply = client.ask_ok(json!({"type": "join", "room": room})).await;
    reply["members"].clone()
}

/// A page's `members` sorted by user, after checking they follow its `users`.
fn sorted_members(page: &Value) -> Value {
    let members = page["members"].as_array().expect("members").clone();
    let users: Vec<&Value> = members.iter().map(|m| &m["user"]).collect();
    let listed: Vec<&Value> = page["users"].as_array().expect("users").iter().collect();
    assert_eq!(users, listed, "members in the order of users: {page}");
    let mut members = members;
    members.sort_by(|a, b| a["user"].as_str().cmp(&b["user"].as_str()));
    Value::Array(members)
}

on_both_stores!(an_update_reaches_the_other_members_only =>
    an_update_reaches_the_other_members_only_memory, an_update_reaches_the_other_members_only_redis);

async fn an_update_reaches_the_other_members_only(backend: Backend) {
    let deployment = backend.start(&[]).await;
    let gateway = &deployment.gateway;
    let mut bob = Client::connect(&gateway.ws_url("bob")).await;
    enter(&mut bob, "bob", ROOM, true).await;
    let mut tab1 = Client::connect(&gateway.ws_url("alice")).await;
    let mut tab2 = Client::connect(&gateway.ws_url("alice")).await;
    enter(&mut tab1, "alice", ROOM, true).await;
    enter(&mut tab2, "alice", ROOM, false).await;
    bob.expect_event(joined(ROOM, "alice")).await;
    // eve is in another room of the same node.
    let mut eve = Client::connect(&gateway.ws_url("eve")).await;
    enter(&mut eve, "eve", "doc:2", true).await;

    let reply = update(&mut tab1, ROOM, json!({"cursor": [3, 4], "typing": true})).await;
    assert_eq!(
        reply,
        json!({"type": "reply", "ref": reply["ref"], "ok": true, "room": ROOM})
    );
    let want = json!({"type": "updated", "room": ROOM, "user": "alice",
                      "state": {"cursor": [3, 4], "typing": true}});
    assert_eq!(bob.expect_event(updated(ROOM, "alice")).await, want);
    // The user's other tab hears it; the sending tab does not.
    assert_eq!(tab2.expect_event(updated(ROOM, "alice")).await, want);

    // bob's update comes after alice's for everyone: what tab1 sees first
    // is bob's, so alice's own never reached it.
    update(&mut bob, ROOM, json!({"page": 2})).await;
    let seen = tab1
        .expect_event(updated(ROOM, "bob").or(updated(ROOM, "alice")))
        .await;
    assert_eq!(seen["user"], "bob", "the sender got its own update: {seen}");
    tab2.expect_event(updated(ROOM, "bob")).await;
    eve.expect_silence().await;

    // A late joiner's snapshot holds each member's latest state.
    // carol has metadata: pages show it beside the states.
    let carol_url = format!("{}&meta=%7B%22desk%22%3A1%7D", gateway.ws_url("carol"));
    let mut carol = Client::connect(&carol_url).await;
    assert_eq!(
        members(&mut carol, ROOM).await,
        json!([
            {"user": "alice", "state": {"cursor": [3, 4], "typing": true}},
            {"user": "bob", "state": {"page": 2}},
            {"user": "carol", "meta": {"desk": 1}},
        ])
    );
    // So do room pages, over WebSocket and HTTP, their `members` in the
    // order of their `users` (with Redis a small room comes whole, in
    // hash order: compared sorted).
    let want_members = json!([
        {"user": "alice", "state": {"cursor": [3, 4], "typing": true}},
        {"user": "bob", "state": {"page": 2}},
        {"user": "carol", "meta": {"desk": 1}},
    ]);
    let page = carol
        .ask_ok(json!({"type": "room", "room": ROOM, "limit": 3}))
        .await;
    assert_eq!(sorted_members(&page), want_members, "{page}");
    let http = support::http::get(gateway.addr, "/v1/rooms/doc%3A1?limit=3").await;
    assert_eq!(http.status, 200);
    assert_eq!(sorted_members(&http.json()), want_members);
    // The latest update of any tab is the user's state.
    update(&mut tab2, ROOM, json!({"cursor": [5, 6]})).await;
    carol.expect_event(updated(ROOM, "alice")).await;
    assert_eq!(
        members(&mut carol, ROOM).await[0],
        json!({"user": "alice", "state": {"cursor": [5, 6]}})
    );
}

on_both_stores!(the_state_goes_with_the_member =>
    the_state_goes_with_the_member_memory, the_state_goes_with_the_member_redis);

async fn the_state_goes_with_the_member(backend: Backend) {
    let deployment = backend.start(&[]).await;
    let gateway = &deployment.gateway;
    let (mut bob, mut alice) = bob_then_alice(gateway).await;
    update(&mut alice, ROOM, json!({"typing": true})).await;
    bob.expect_event(updated(ROOM, "alice")).await;

    alice.leave(ROOM).await;
    bob.expect_event(left(ROOM, "alice")).await;
    assert_eq!(
        members(&mut alice, ROOM).await,
        json!([{"user": "alice"}, {"user": "bob"}]),
        "a member who left and came back starts with no state"
    );
    bob.expect_event(joined(ROOM, "alice")).await;

    // A disconnect (grace 0 here) drops it too.
    update(&mut alice, ROOM, json!({"typing": false})).await;
    bob.expect_event(updated(ROOM, "alice")).await;
    alice.close().await;
    bob.expect_event(left(ROOM, "alice")).await;
    let mut alice = Client::connect(&gateway.ws_url("alice")).await;
    assert_eq!(
        members(&mut alice, ROOM).await,
        json!([{"user": "alice"}, {"user": "bob"}])
    );
}

on_both_stores!(updates_are_paced_and_the_latest_wins =>
    updates_are_paced_and_the_latest_wins_memory, updates_are_paced_and_the_latest_wins_redis);

/// 200 updates over about two seconds from one tab: members see at most
/// `--state-rate` (10) a second of them, the last one is the final state,
/// and every update is answered (written, or superseded by a later one).
async fn updates_are_paced_and_the_latest_wins(backend: Backend) {
    let deployment = backend.start(&[]).await;
    let gateway = &deployment.gateway;
    let (mut bob, mut alice) = bob_then_alice(gateway).await;

    let started = Instant::now();
    for i in 0..200 {
        alice
            .send_json(json!({"type": "update", "room": ROOM, "state": {"i": i}, "ref": i}))
            .await;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let sending = started.elapsed();
    // Every update is answered: written (ok) or superseded; none refused.
    let (mut written, mut superseded) = (0, 0);
    while written + superseded < 200 {
        let frame = alice.next_event().await;
        match (frame["type"].as_str(), frame["superseded"].as_bool()) {
            (Some("reply"), Some(true)) => superseded += 1,
            (Some("reply"), None) => written += 1,
            _ => panic!("alice got {frame} among her update replies"),
        }
    }
    // bob sees exactly the written ones, the final state last.
    let mut seen = Vec::new();
    while seen.len() < written {
        seen.push(bob.expect_event(updated(ROOM, "alice")).await["state"]["i"].clone());
    }
    assert_eq!(seen.last(), Some(&json!(199)), "the final state comes last");
    assert!(
        seen.windows(2).all(|w| w[0].as_u64() < w[1].as_u64()),
        "states in the order sent: {seen:?}"
    );
    // At most one write per 100 ms of sending, plus the first and the last.
    let bound = (sending.as_millis() / 100) as usize + 2;
    assert!(
        written <= bound,
        "{written} of 200 updates were written in {sending:?} (at most {bound})"
    );
    assert!(superseded >= 200 - bound, "{superseded} superseded");
    bob.expect_silence().await;
    alice.ping().await;
}

/// `update` frames do not count against `--rate-limit`: 100 at once is
/// over its burst (50) but within `--max-update-rate` (120).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn updates_have_their_own_rate_bound() {
    support::within_scenario_timeout(async {
        let gateway = Gateway::memory(&[]).await;
        let mut alice = Client::connect(&gateway.ws_url("alice")).await;
        enter(&mut alice, "alice", ROOM, true).await;
        let burst: Vec<Value> = (0..100)
            .map(|i| json!({"type": "update", "room": ROOM, "state": {"i": i}, "ref": i}))
            .collect();
        alice.send_json_burst(&burst).await;
        for _ in 0..100 {
            let frame = alice.next_event().await;
            assert_eq!(frame["type"], "reply", "{frame}");
        }
        // Past --max-update-rate they are refused, and the connection stays.
        let gateway = Gateway::memory(&["--max-update-rate", "5"]).await;
        let mut alice = Client::connect(&gateway.ws_url("alice")).await;
        enter(&mut alice, "alice", ROOM, true).await;
        alice.send_json_burst(&burst[..8]).await;
        let mut refused = 0;
        for _ in 0..8 {
            let frame = alice.next_event().await;
            if frame["type"] == "error" {
                assert_eq!(frame["code"], "rate_limited", "{frame}");
                refused += 1;
            }
        }
        assert_eq!(refused, 3, "5 at once pass, the 3 after are refused");
        alice.ping().await;
    })
    .await;
}

on_both_stores!(bad_updates_are_refused_and_change_nothing =>
    bad_updates_are_refused_and_change_nothing_memory, bad_updates_are_refused_and_change_nothing_redis);

async fn bad_updates_are_refused_and_change_nothing(backend: Backend) {
    let deployment = backend.start(&["--max-state-bytes", "32"]).await;
    let gateway = &deployment.gateway;
    let (mut bob, mut alice) = bob_then_alice(gateway).await;
    update(&mut alice, ROOM, json!({"ok": 1})).await;
    bob.expect_event(updated(ROOM, "alice")).await;

    let cases = [
        (
            json!({"type": "update", "room": "doc:2", "state": {"a": 1}}),
            "not_joined",
        ),
        (
            json!({"type": "update", "room": ROOM, "state": {"a": "x".repeat(40)}}),
            "limit_exceeded",
        ),
        (
            json!({"type": "update", "room": ROOM, "state": [1, 2]}),
            "bad_request",
        ),
        (
            json!({"type": "update", "room": ROOM, "state": "text"}),
            "bad_request",
        ),
        (json!({"type": "update", "room": ROOM}), "bad_request"),
        (
            json!({"type": "update", "room": "bad room", "state": {}}),
            "invalid_room",
        ),
    ];
    for (request, code) in cases {
        let answer = alice.ask(request.clone()).await;
        assert_eq!(answer["type"], "error", "{request} got {answer}");
        assert_eq!(answer["code"], code, "{request} got {answer}");
    }
    bob.expect_silence().await;
    assert_eq!(
        members(&mut bob, ROOM).await,
        json!([{"user": "alice", "state": {"ok": 1}}, {"user": "bob"}])
    );
}

/// Two nodes on one Redis: an update on one reaches members on the other,
/// and a member joining on the other node sees the state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_update_crosses_nodes() {
    support::within_scenario_timeout(async {
        let redis = RedisServer::start().await;
        let a = Gateway::redis(&redis, &[]).await;
        let b = Gateway::redis(&redis, &[]).await;
        let mut bob = Client::connect(&b.ws_url("bob")).await;
        enter(&mut bob, "bob", ROOM, true).await;
        let mut alice = Client::connect(&a.ws_url("alice")).await;
        enter(&mut alice, "alice", ROOM, true).await;
        bob.expect_event(joined(ROOM, "alice")).await;
        update(&mut alice, ROOM, json!({"x": 1})).await;
        assert_eq!(
            bob.expect_event(updated(ROOM, "alice")).await["state"],
            json!({"x": 1})
        );
        let mut carol = Client::connect(&b.ws_url("carol")).await;
        assert_eq!(
            members(&mut carol, ROOM).await[0],
            json!({"user": "alice", "state": {"x": 1}})
        );
        // The sender, on the other node, still hears nobody's echo of its own.
        update(&mut bob, ROOM, json!({"y": 2})).await;
        let seen = alice
            .expect_event_within(
                updated(ROOM, "bob").or(updated(ROOM, "alice")),
                EVENT_TIMEOUT,
            )
            .await;
        assert_eq!(seen["user"], "bob");
    })
    .await;
}

on_both_stores!(a_member_in_the_grace_keeps_their_state =>
    a_member_in_the_grace_keeps_their_state_memory, a_member_in_the_grace_keeps_their_state_redis);

/// A tab that drops and comes back within the offline grace finds its
/// state where it left it; members saw nothing at all.
async fn a_member_in_the_grace_keeps_their_state(backend: Backend) {
    let deployment = backend.start(&["--offline-grace-ms", "60000"]).await;
    let gateway = &deployment.gateway;
    let (mut bob, mut alice) = bob_then_alice(gateway).await;
    update(&mut alice, ROOM, json!({"page": 7})).await;
    bob.expect_event(updated(ROOM, "alice")).await;

    alice.drop_tcp().await;
    let mut alice = Client::connect(&gateway.ws_url("alice")).await;
    assert_eq!(
        members(&mut alice, ROOM).await,
        json!([{"user": "alice", "state": {"page": 7}}, {"user": "bob"}])
    );
    // bob's next frame is carol's joined: nothing came of alice's return.
    let mut carol = Client::connect(&gateway.ws_url("carol")).await;
    carol.join(ROOM).await;
    assert_eq!(
        bob.next_event().await,
        json!({"type": "joined", "room": ROOM, "user": "carol"})
    );
}
