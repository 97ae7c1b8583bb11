//! Bad input: each bad request gets its error frame (with the ref echoed
//! when one was readable), the connection stays usable, and nobody's
//! presence or room membership moves. An oversized frame closes with 1009.

mod support;

use serde_json::{Value, json};
use support::{
    Backend, Client, EVENT_TIMEOUT, UserState, joined, left, offline, on_both_stores, online,
};

/// What the prober sends.
enum Sent {
    Text(String),
    Binary(Vec<u8>),
}

struct BadInput {
    what: &'static str,
    sent: Sent,
    code: &'static str,
    /// The ref the error must echo; `None`: the frame had no readable ref.
    echoed_ref: Option<Value>,
}

fn text(frame: Value) -> Sent {
    Sent::Text(frame.to_string())
}

fn ids(count: usize) -> Vec<String> {
    (0..count).map(|index| format!("u{index}")).collect()
}

fn bad_inputs() -> Vec<BadInput> {
    let case = |what, sent, code, echoed_ref| BadInput {
        what,
        sent,
        code,
        echoed_ref,
    };
    vec![
        case(
            "not JSON",
            Sent::Text("this is not json {".to_owned()),
            "bad_request",
            None,
        ),
        case(
            "a JSON array",
            Sent::Text(r#"[{"type":"ping","ref":1}]"#.to_owned()),
            "bad_request",
            None,
        ),
        case(
            "a JSON string",
            Sent::Text(r#""ping""#.to_owned()),
            "bad_request",
            None,
        ),
        case(
            "an object without type",
            text(json!({"ref": "no-type"})),
            "bad_request",
            Some(json!("no-type")),
        ),
        case(
            "an unknown type",
            text(json!({"type": "dance", "ref": "r-unknown"})),
            "unknown_type",
            Some(json!("r-unknown")),
        ),
        case(
            "join without a room",
            text(json!({"type": "join", "ref": 11})),
            "bad_request",
            Some(json!(11)),
        ),
        case(
            "join with a numeric room",
            text(json!({"type": "join", "room": 42, "ref": 12})),
            "bad_request",
            Some(json!(12)),
        ),
        case(
            "join of a room name with a space",
            text(json!({"type": "join", "room": "doc 1", "ref": 13})),
            "invalid_room",
            Some(json!(13)),
        ),
        case(
            "join of a 201-byte room name",
            text(json!({"type": "join", "room": "r".repeat(201), "ref": 14})),
            "invalid_room",
            Some(json!(14)),
        ),
        case(
            "join of an empty room name",
            text(json!({"type": "join", "room": "", "ref": 15})),
            "invalid_room",
            Some(json!(15)),
        ),
        case(
            "watch of an invalid user id",
            text(json!({"type": "watch", "users": ["bob", "bad user"], "ref": 16})),
            "invalid_user",
            Some(json!(16)),
        ),
        case(
            "query of a 129-byte user id",
            text(json!({"type": "query", "users": ["u".repeat(129)], "ref": 17})),
            "invalid_user",
            Some(json!(17)),
        ),
        case(
            "query whose users is not a list",
            text(json!({"type": "query", "users": "bob", "ref": 18})),
            "bad_request",
            Some(json!(18)),
        ),
        case(
            "query of 1,001 ids",
            text(json!({"type": "query", "users": ids(1001), "ref": 19})),
            "limit_exceeded",
            Some(json!(19)),
        ),
        case(
            "watch of 1,001 ids",
            text(json!({"type": "watch", "users": ids(1001), "ref": "w-1001"})),
            "limit_exceeded",
            Some(json!("w-1001")),
        ),
        case(
            "leave of a room not joined",
            text(json!({"type": "leave", "room": "lobby", "ref": 21})),
            "not_joined",
            Some(json!(21)),
        ),
        case(
            "a ref that is an object",
            text(json!({"type": "ping", "ref": {"id": 22}})),
            "bad_request",
            None,
        ),
        case(
            "a binary frame",
            Sent::Binary(vec![0xde, 0xad, 0xbe, 0xef]),
            "bad_request",
            None,
        ),
    ]
}

/// Small enough for a test to exceed cheaply, large enough for a list of
/// 1,001 ids (about 7 KB).
const MAX_MESSAGE_BYTES: &str = "16384";

on_both_stores!(bad_requests_get_errors_and_change_nothing =>
    bad_requests_get_errors_and_change_nothing_memory,
    bad_requests_get_errors_and_change_nothing_redis);

async fn bad_requests_get_errors_and_change_nothing(backend: Backend) {
    let deployment = backend
        .start(&["--max-message-bytes", MAX_MESSAGE_BYTES])
        .await;
    let gateway = &deployment.gateway;

    // A bystander in the lobby, watched by an observer who is in it too.
    let mut observer = Client::connect(&gateway.ws_url("observer")).await;
    observer.join("lobby").await;
    observer.expect_event(joined("lobby", "observer")).await;
    observer.watch(&["bystander"]).await;
    let mut bystander = Client::connect(&gateway.ws_url("bystander")).await;
    bystander.join("lobby").await;
    observer.expect_event(online("bystander")).await;
    observer.expect_event(joined("lobby", "bystander")).await;
    let bystander_moved = || offline("bystander").or(left("lobby", "bystander"));

    let mut prober = Client::connect(&gateway.ws_url("prober")).await;
    for bad in bad_inputs() {
        eprintln!("prober sends {}", bad.what);
        match bad.sent {
            Sent::Text(frame) => prober.send_text(frame).await,
            Sent::Binary(bytes) => prober.send_binary(bytes).await,
        }
        let error = prober.next_event().await;
        assert_eq!(error["type"], "error", "{}: {error}", bad.what);
        assert_eq!(error["code"], bad.code, "{}: {error}", bad.what);
        assert!(
            error["message"]
                .as_str()
                .is_some_and(|text| !text.is_empty()),
            "{}: an error carries a message: {error}",
            bad.what
        );
        match &bad.echoed_ref {
            Some(reference) => assert_eq!(&error["ref"], reference, "{}: {error}", bad.what),
            None => assert!(
                error["ref"].is_null(),
                "{}: no readable ref, none echoed: {error}",
                bad.what
            ),
        }
        let fields = error.as_object().expect("object");
        assert!(
            fields
                .keys()
                .all(|key| ["type", "ref", "code", "message"].contains(&key.as_str())),
            "{}: error frame has only type, ref, code, message: {error}",
            bad.what
        );
        // The connection stays usable.
        prober.ping().await;
    }
    observer.expect_no_event(bystander_moved()).await;

    // An oversized frame is the one bad input that closes the connection.
    let oversized = json!({"type": "ping", "ref": 99, "padding": "x".repeat(20_000)});
    prober.send_json(oversized).await;
    assert_eq!(
        prober.expect_close(EVENT_TIMEOUT).await,
        Some(1009),
        "a frame over --max-message-bytes closes with 1009"
    );

    // The bystander never moved: still online, still in the lobby.
    observer.expect_no_event(bystander_moved()).await;
    assert_eq!(
        observer.query_one("bystander").await,
        UserState::new("bystander", true, 1)
    );
    let mut latecomer = Client::connect(&gateway.ws_url("latecomer")).await;
    assert_eq!(
        latecomer.join("lobby").await,
        ["bystander", "latecomer", "observer"],
        "no bad join put the prober in the lobby, and the bystander is still there"
    );
    bystander.ping().await;
}

on_both_stores!(list_limit_counts_distinct_ids =>
    list_limit_counts_distinct_ids_memory, list_limit_counts_distinct_ids_redis);

/// 1,001 entries holding 1,000 distinct ids are within the limit; an empty
/// list is allowed.
async fn list_limit_counts_distinct_ids(backend: Backend) {
    let deployment = backend.start(&[]).await;
    let mut client = Client::connect(&deployment.gateway.ws_url("walter")).await;

    let mut users = ids(1000);
    users.push("u0".to_owned());
    let reply = client
        .request(json!({"type": "query", "users": users, "ref": 1}))
        .await;
    assert_eq!(
        reply["type"], "reply",
        "1,000 distinct ids are allowed: {reply}"
    );
    let answered: Vec<&str> = reply["users"]
        .as_array()
        .expect("users list")
        .iter()
        .map(|entry| entry["user"].as_str().expect("user id"))
        .collect();
    assert_eq!(
        answered,
        ids(1000),
        "each distinct id once, in request order"
    );

    let reply = client
        .request(json!({"type": "watch", "users": users, "ref": 2}))
        .await;
    assert_eq!(
        reply["type"], "reply",
        "1,000 distinct ids are allowed: {reply}"
    );
    assert_eq!(reply["users"].as_array().expect("users list").len(), 1000);

    assert_eq!(
        client
            .request(json!({"type": "query", "users": [], "ref": 3}))
            .await,
        json!({"type": "reply", "ref": 3, "ok": true, "users": []})
    );
    assert_eq!(
        client
            .request(json!({"type": "watch", "users": [], "ref": 4}))
            .await,
        json!({"type": "reply", "ref": 4, "ok": true, "users": []})
    );
}
