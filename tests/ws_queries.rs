//! The WebSocket `room` (paged members) and `count` queries: they agree
//! with what the room and the tabs are, page through everyone once, and
//! refuse bad paging with an error frame; a store that does not answer is
//! an `unavailable` error, and the socket stays.

mod support;

use std::collections::BTreeSet;

use serde_json::{Value, json};
use support::{Backend, Client, on_both_stores};

on_both_stores!(room_pages_and_counts_agree_with_the_tabs =>
    room_pages_and_counts_agree_with_the_tabs_memory,
    room_pages_and_counts_agree_with_the_tabs_redis);

async fn room_pages_and_counts_agree_with_the_tabs(backend: Backend) {
    const MEMBERS: usize = 12;
    let d = backend.start(&[]).await;
    let names: Vec<String> = (0..MEMBERS).map(|i| format!("m{i:02}")).collect();
    let mut tabs = Vec::new();
    for name in &names {
        let mut tab = Client::connect(&d.gateway.ws_url(name)).await;
        tab.join("doc:1").await;
        tabs.push(tab);
    }
    let mut asker = Client::connect(&d.gateway.ws_url("asker")).await;

    let mut seen = Vec::new();
    let mut cursor = Value::Null;
    for page in 1.. {
        assert!(page < 50, "paging must end");
        let reply = asker
            .request_ok(
                json!({"type": "room", "room": "doc:1", "limit": 5, "cursor": cursor, "ref": page}),
            )
            .await;
        assert_eq!(reply["room"], "doc:1");
        assert_eq!(reply["count"], MEMBERS);
        seen.extend(
            reply["users"]
                .as_array()
                .expect("users")
                .iter()
                .map(|u| u.as_str().expect("id").to_owned()),
        );
        cursor = reply["next_cursor"].clone();
        if cursor.is_null() {
            break;
        }
    }
    assert_eq!(seen.len(), MEMBERS, "nobody twice: {seen:?}");
    assert_eq!(
        seen.into_iter().collect::<BTreeSet<_>>(),
        names.iter().cloned().collect::<BTreeSet<_>>()
    );

    // A second tab of one member: one more connection, no more users.
    let _second = Client::connect(&d.gateway.ws_url("m00")).await;
    asker.query(&["m00"]).await;
    let count = asker.request_ok(json!({"type": "count", "ref": "c"})).await;
    assert_eq!(count["users_online"], MEMBERS + 1, "members and the asker");
    assert_eq!(count["connections"], MEMBERS + 2);

    for (frame, code) in [
        (
            json!({"type": "room", "room": "doc:1", "limit": 0, "ref": "z"}),
            "bad_request",
        ),
        (
            json!({"type": "room", "room": "doc:1", "limit": 1001, "ref": "z"}),
            "bad_request",
        ),
        (
            json!({"type": "room", "room": "doc:1", "cursor": "forged cursor", "ref": "z"}),
            "bad_request",
        ),
        (
            json!({"type": "room", "room": "a b", "ref": "z"}),
            "invalid_room",
        ),
    ] {
        let reply = asker.request(frame.clone()).await;
        assert_eq!(
            (
                reply["type"].as_str(),
                reply["code"].as_str(),
                &reply["ref"]
            ),
            (Some("error"), Some(code), &json!("z")),
            "{frame}"
        );
    }
    asker.ping().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_that_does_not_answer_is_unavailable() {
    let mut d = Backend::Redis.start(&[]).await;
    let mut tab = Client::connect(&d.gateway.ws_url("alice")).await;
    d.redis.as_mut().expect("redis").kill();
    let reply = tab.request(json!({"type": "count", "ref": 1})).await;
    assert_eq!(
        (reply["type"].as_str(), reply["code"].as_str()),
        (Some("error"), Some("unavailable")),
        "{reply}"
    );
    tab.ping().await;
}
