//! Frame shapes: the `welcome`, and the `watch`/`unwatch`/`query` replies
//! exactly as docs/protocol.md shows them.

mod support;

use serde_json::{Value, json};
use support::{Backend, Client, Gateway, offline, on_both_stores, online, presence_of};
use uuid::Uuid;

/// The sorted field names of a JSON object.
fn fields(frame: &Value) -> Vec<&str> {
    let mut names: Vec<&str> = frame
        .as_object()
        .unwrap_or_else(|| panic!("not an object: {frame}"))
        .keys()
        .map(String::as_str)
        .collect();
    names.sort_unstable();
    names
}

fn uuid_field(frame: &Value, field: &str) -> Uuid {
    let text = frame[field]
        .as_str()
        .unwrap_or_else(|| panic!("{field} is a string: {frame}"));
    Uuid::parse_str(text).unwrap_or_else(|error| panic!("{field} is a uuid ({error}): {frame}"))
}

on_both_stores!(welcome_frame_describes_connection_and_node =>
    welcome_frame_describes_connection_and_node_memory,
    welcome_frame_describes_connection_and_node_redis);

async fn welcome_frame_describes_connection_and_node(backend: Backend) {
    let deployment = backend.start(&["--heartbeat-ms", "1234"]).await;
    let gateway = &deployment.gateway;

    let alice = Client::connect(&gateway.ws_url("alice")).await;
    let bob = Client::connect(&gateway.ws_url("bob")).await;
    for (client, user) in [(&alice, "alice"), (&bob, "bob")] {
        let welcome = client.welcome();
        assert_eq!(
            fields(welcome),
            ["conn", "heartbeat_ms", "node", "type", "user"],
            "{welcome}"
        );
        assert_eq!(welcome["type"], "welcome");
        assert_eq!(welcome["user"], user);
        assert_eq!(
            welcome["heartbeat_ms"], 1234,
            "heartbeat_ms is --heartbeat-ms"
        );
        uuid_field(welcome, "conn");
        uuid_field(welcome, "node");
    }
    assert_ne!(
        uuid_field(alice.welcome(), "conn"),
        uuid_field(bob.welcome(), "conn"),
        "each connection has its own id"
    );
    assert_eq!(
        uuid_field(alice.welcome(), "node"),
        uuid_field(bob.welcome(), "node"),
        "one gateway process, one node id"
    );
}

#[tokio::test]
async fn each_gateway_process_has_its_own_node_id() {
    support::within_scenario_timeout(async {
        let first = Gateway::memory(&[]).await;
        let second = Gateway::memory(&[]).await;
        let on_first = Client::connect(&first.ws_url("alice")).await;
        let on_second = Client::connect(&second.ws_url("alice")).await;
        assert_ne!(
            uuid_field(on_first.welcome(), "node"),
            uuid_field(on_second.welcome(), "node"),
            "node is a fresh uuid per process"
        );
    })
    .await
}

on_both_stores!(watch_query_and_unwatch_replies =>
    watch_query_and_unwatch_replies_memory, watch_query_and_unwatch_replies_redis);

async fn watch_query_and_unwatch_replies(backend: Backend) {
    let deployment = backend.start(&[]).await;
    let gateway = &deployment.gateway;

    // Give bob one transition (online, seq 1) and dave two (offline, seq 2);
    // carol is never seen (offline, seq 0).
    let mut walter = Client::connect(&gateway.ws_url("walter")).await;
    walter.watch(&["bob", "dave"]).await;
    let mut bob = Client::connect(&gateway.ws_url("bob")).await;
    assert_eq!(
        walter.expect_event(online("bob")).await,
        json!({"type": "online", "user": "bob", "seq": 1})
    );
    let dave = Client::connect(&gateway.ws_url("dave")).await;
    walter.expect_event(online("dave")).await;
    dave.close().await;
    assert_eq!(walter.expect_event(offline("dave")).await["seq"], 2);

    let mut wanda = Client::connect(&gateway.ws_url("wanda")).await;
    assert_eq!(
        wanda
            .request(json!({"type": "watch", "users": ["bob", "carol"], "ref": 3}))
            .await,
        json!({"type": "reply", "ref": 3, "ok": true, "users": [
            {"user": "bob", "online": true, "seq": 1},
            {"user": "carol", "online": false, "seq": 0},
        ]})
    );
    assert_eq!(
        wanda
            .request(json!({"type": "query",
                            "users": ["dave", "bob", "dave", "carol", "bob"],
                            "ref": "q-5"}))
            .await,
        json!({"type": "reply", "ref": "q-5", "ok": true, "users": [
            {"user": "dave", "online": false, "seq": 2},
            {"user": "bob", "online": true, "seq": 1},
            {"user": "carol", "online": false, "seq": 0},
        ]}),
        "duplicates collapse, request order is kept"
    );
    assert_eq!(
        wanda
            .request(json!({"type": "unwatch", "users": ["bob"], "ref": 4}))
            .await,
        json!({"type": "reply", "ref": 4, "ok": true})
    );

    // bob goes offline: walter, still watching, hears it; wanda does not.
    bob.ping().await;
    bob.close().await;
    assert_eq!(walter.expect_event(offline("bob")).await["seq"], 2);
    wanda.expect_no_event(presence_of("bob")).await;

    // wanda still watches carol.
    let _carol = Client::connect(&gateway.ws_url("carol")).await;
    assert_eq!(
        wanda.expect_event(online("carol")).await,
        json!({"type": "online", "user": "carol", "seq": 1})
    );
    wanda.expect_silence().await;
}
