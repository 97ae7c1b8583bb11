//! The `/v1` HTTP API: answers match the WebSocket truth on both stores,
//! pages cover everyone exactly once, a bulk question is one store round
//! trip, and every refusal has its status and JSON code.

mod support;

use std::collections::BTreeSet;

use serde_json::{Value, json};
use support::{Backend, Client, Deployment, http, on_both_stores};

async fn get(d: &Deployment, path: &str) -> http::HttpResponse {
    http::get(d.gateway.addr, path).await
}

async fn post_presence(d: &Deployment, body: &str) -> http::HttpResponse {
    http::request_with_body(d.gateway.addr, "POST", "/v1/presence", &[], body).await
}

fn ok(response: http::HttpResponse) -> Value {
    assert_eq!(response.status, 200, "{}", response.body_text());
    response.json()
}

/// Follows `next_cursor` from the first page to the last.
async fn all_pages(d: &Deployment, path: &str, limit: usize) -> (Vec<String>, usize) {
    let mut users = Vec::new();
    let mut pages = 0;
    let mut cursor = String::new();
    loop {
        let page = ok(get(d, &format!("{path}?limit={limit}&cursor={cursor}")).await);
        users.extend(
            page["users"]
                .as_array()
                .expect("users")
                .iter()
                .map(|u| u.as_str().expect("user id").to_owned()),
        );
        pages += 1;
        assert!(pages < 100, "paging must end");
        match page["next_cursor"].as_str() {
            Some(next) => cursor = next.to_owned(),
            None => return (users, pages),
        }
    }
}

on_both_stores!(bulk_presence_matches_the_websocket_truth =>
    bulk_presence_matches_the_websocket_truth_memory,
    bulk_presence_matches_the_websocket_truth_redis);

async fn bulk_presence_matches_the_websocket_truth(backend: Backend) {
    let d = backend.start(&[]).await;
    let _alice_1 = Client::connect(&d.gateway.ws_url("alice")).await;
    let _alice_2 = Client::connect(&d.gateway.ws_url("alice")).await;
    let mut bob = Client::connect(&d.gateway.ws_url("bob")).await;
    // The query goes through the same store: once it says so, HTTP must too.
    bob.query(&["alice"]).await;
    assert_eq!(
        ok(post_presence(&d, r#"{"users":["alice","bob","carol","alice"]}"#).await),
        json!({"online": {"alice": true, "bob": true, "carol": false}})
    );
    let stats = ok(get(&d, "/v1/stats").await);
    assert_eq!(stats["users_online"], 2);
    assert_eq!(stats["connections"], 3);
    assert_eq!(stats["nodes_alive"], 1);
    assert_eq!(stats["node_connections"], 3);
    assert_eq!(stats["node"], bob.welcome()["node"]);
}

on_both_stores!(pages_cover_every_user_once =>
    pages_cover_every_user_once_memory, pages_cover_every_user_once_redis);

async fn pages_cover_every_user_once(backend: Backend) {
    const USERS: usize = 30;
    let d = backend.start(&[]).await;
    let names: Vec<String> = (0..USERS).map(|i| format!("u{i:02}")).collect();
    let mut tabs = Vec::new();
    for name in &names {
        let mut tab = Client::connect(&d.gateway.ws_url(name)).await;
        tab.join("doc:1").await;
        tabs.push(tab);
    }
    let expected: BTreeSet<String> = names.iter().cloned().collect();

    // `doc:1` percent-encoded as a browser's encodeURIComponent would.
    let (members, pages) = all_pages(&d, "/v1/rooms/doc%3A1", 7).await;
    assert_eq!(members.len(), USERS, "no member twice: {members:?}");
    assert_eq!(members.into_iter().collect::<BTreeSet<_>>(), expected);
    if d.redis.is_none() {
        assert_eq!(pages, USERS.div_ceil(7), "the memory store pages exactly");
    }
    let first = ok(get(&d, "/v1/rooms/doc:1?limit=7").await);
    assert_eq!(first["room"], "doc:1");
    assert_eq!(first["count"], USERS);

    let (online, _) = all_pages(&d, "/v1/users", 7).await;
    assert_eq!(online.len(), USERS);
    assert_eq!(online.into_iter().collect::<BTreeSet<_>>(), expected);

    let empty = ok(get(&d, "/v1/rooms/nobody-here").await);
    assert_eq!(
        empty,
        json!({"room": "nobody-here", "count": 0, "users": [], "members": [], "next_cursor": null})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_ids_are_one_redis_round_trip() {
    let d = Backend::Redis.start(&[]).await;
    let mut tab = Client::connect(&d.gateway.ws_url("u0007")).await;
    // A round trip through the registry: the tab's own writes are done.
    assert!(tab.query_one("u0007").await.online);
    let ids: Vec<String> = (0..1000).map(|i| format!("u{i:04}")).collect();
    let body = json!({ "users": ids }).to_string();
    let redis = d.redis();
    redis.reset_stats().await;
    let answer = ok(post_presence(&d, &body).await);
    // One transaction: MULTI, one EVALSHA of the batch script, EXEC. (The
    // node's lease, reaper and stats scripts run on timers as plain
    // EVALSHAs, so EVALSHA alone is not counted here.)
    assert_eq!(redis.command_calls("multi").await, 1);
    assert_eq!(redis.command_calls("exec").await, 1);
    let online = answer["online"].as_object().expect("online map");
    assert_eq!(online.len(), 1000);
    assert_eq!(online.values().filter(|v| **v == json!(true)).count(), 1);
    assert_eq!(online["u0007"], true);

    let too_many: Vec<String> = (0..1001).map(|i| format!("u{i:04}")).collect();
    let refused = post_presence(&d, &json!({ "users": too_many }).to_string()).await;
    assert_eq!(
        (refused.status, refused.error_code().as_str()),
        (400, "limit_exceeded")
    );
}

on_both_stores!(bad_requests_get_their_status_and_code =>
    bad_requests_get_their_status_and_code_memory,
    bad_requests_get_their_status_and_code_redis);

async fn bad_requests_get_their_status_and_code(backend: Backend) {
    let d = backend.start(&[]).await;
    let mut bystander = Client::connect(&d.gateway.ws_url("bystander")).await;
    for (what, response, status, code) in [
        (
            "not JSON",
            post_presence(&d, "nope").await,
            400,
            "bad_request",
        ),
        (
            "users not a list",
            post_presence(&d, r#"{"users":"a"}"#).await,
            400,
            "bad_request",
        ),
        (
            "bad user id",
            post_presence(&d, r#"{"users":["a b"]}"#).await,
            400,
            "invalid_user",
        ),
        (
            "GET presence",
            get(&d, "/v1/presence").await,
            405,
            "method_not_allowed",
        ),
        ("unknown route", get(&d, "/v1/nope").await, 404, "not_found"),
        (
            "bad room",
            get(&d, "/v1/rooms/a%20b").await,
            400,
            "invalid_room",
        ),
        (
            "limit 0",
            get(&d, "/v1/users?limit=0").await,
            400,
            "bad_request",
        ),
        (
            "limit too big",
            get(&d, "/v1/users?limit=1001").await,
            400,
            "bad_request",
        ),
        (
            "forged cursor",
            get(&d, "/v1/users?cursor=not%20mine").await,
            400,
            "bad_request",
        ),
    ] {
        assert_eq!(
            (response.status, response.error_code().as_str()),
            (status, code),
            "{what}: {}",
            response.body_text()
        );
    }
    assert!(bystander.query_one("bystander").await.online);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_down_is_503_and_sockets_stay() {
    let mut d = Backend::Redis.start(&[]).await;
    let mut tab = Client::connect(&d.gateway.ws_url("alice")).await;
    d.redis.as_mut().expect("redis").kill();
    let response = get(&d, "/v1/stats").await;
    assert_eq!(
        (response.status, response.error_code().as_str()),
        (503, "unavailable")
    );
    tab.ping().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_key_is_required_when_set() {
    let d = Backend::Memory.start(&["--api-key", "s3cret"]).await;
    let addr = d.gateway.addr;
    let none = http::get(addr, "/v1/stats").await;
    assert_eq!(
        (none.status, none.error_code().as_str()),
        (401, "unauthorized")
    );
    assert_eq!(none.header("www-authenticate"), Some("Bearer"));
    let wrong = http::request(
        addr,
        "GET",
        "/v1/stats",
        &[("Authorization", "Bearer nope")],
    )
    .await;
    assert_eq!(wrong.status, 401);
    let right = http::request(
        addr,
        "GET",
        "/v1/stats",
        &[("Authorization", "Bearer s3cret")],
    )
    .await;
    assert_eq!(right.status, 200, "{}", right.body_text());
    let lower = http::request(
        addr,
        "GET",
        "/v1/stats",
        &[("Authorization", "bearer s3cret")],
    )
    .await;
    assert_eq!(lower.status, 200, "the scheme is case-insensitive");
    // The key guards /v1 only.
    assert_eq!(http::get(addr, "/healthz").await.status, 200);
}

on_both_stores!(a_users_record_shows_its_connections_and_metadata =>
    a_users_record_shows_its_connections_and_metadata_memory,
    a_users_record_shows_its_connections_and_metadata_redis);

async fn a_users_record_shows_its_connections_and_metadata(backend: Backend) {
    let d = backend.start(&["--max-meta-bytes", "64"]).await;
    let url = |meta: &str| format!("{}&meta={meta}", d.gateway.ws_url("alice"));
    // {"device":"phone"} percent-encoded, as encodeURIComponent would.
    let phone = Client::connect(&url("%7B%22device%22%3A%22phone%22%7D")).await;
    let mut laptop = Client::connect(&d.gateway.ws_url("alice")).await;
    laptop.query(&["alice"]).await;

    let record = ok(get(&d, "/v1/users/alice").await);
    assert_eq!(record["user"], "alice");
    assert_eq!(record["online"], true);
    assert_eq!(record["meta"], json!({"device": "phone"}));
    assert_eq!(record["last_seen_ms"], Value::Null);
    let conns = record["connections"].as_array().expect("connections");
    assert_eq!(conns.len(), 2);
    for (tab, meta) in [(&phone, json!({"device": "phone"})), (&laptop, Value::Null)] {
        let c = conns
            .iter()
            .find(|c| c["conn"] == tab.welcome()["conn"])
            .unwrap_or_else(|| panic!("no record of {}", tab.welcome()));
        assert_eq!(c["node"], tab.welcome()["node"]);
        assert_eq!(c["meta"], meta);
        assert!(
            c["since_ms"]
                .as_u64()
                .is_some_and(|t| t > 1_700_000_000_000)
        );
    }

    // A room snapshot carries each member's metadata.
    laptop.join("doc:m").await;
    let mut walter = Client::connect(&d.gateway.ws_url("walter")).await;
    let snapshot = walter
        .request_ok(json!({"type": "join", "room": "doc:m", "ref": "s"}))
        .await;
    assert_eq!(
        snapshot["members"],
        json!([{"user": "alice", "meta": {"device": "phone"}}, {"user": "walter"}])
    );

    // A join may carry metadata: it becomes the tab's (and the user's)
    // metadata, shown to everyone joining later and in the record; the
    // tab keeps its since_ms. Bad metadata is an error and changes nothing.
    let laptop_since = conns
        .iter()
        .find(|c| c["conn"] == laptop.welcome()["conn"])
        .map(|c| c["since_ms"].clone())
        .expect("laptop recorded");
    for (meta, code) in [
        (json!([1, 2]), "bad_request"),
        (json!({"x": "y".repeat(100)}), "limit_exceeded"),
    ] {
        let refused = laptop
            .request(json!({"type": "join", "room": "doc:n", "meta": meta, "ref": "bad"}))
            .await;
        assert_eq!(
            (refused["type"].as_str(), refused["code"].as_str()),
            (Some("error"), Some(code))
        );
    }
    laptop
        .request_ok(
            json!({"type": "join", "room": "doc:n", "meta": {"device": "laptop"}, "ref": "m"}),
        )
        .await;
    let mut wendy = Client::connect(&d.gateway.ws_url("wendy")).await;
    let snapshot = wendy
        .request_ok(json!({"type": "join", "room": "doc:n", "ref": "s"}))
        .await;
    assert_eq!(
        snapshot["members"],
        json!([{"user": "alice", "meta": {"device": "laptop"}}, {"user": "wendy"}])
    );
    let record = ok(get(&d, "/v1/users/alice").await);
    assert_eq!(record["meta"], json!({"device": "laptop"}));
    let laptop_record = record["connections"]
        .as_array()
        .expect("connections")
        .iter()
        .find(|c| c["conn"] == laptop.welcome()["conn"])
        .cloned()
        .expect("laptop recorded");
    assert_eq!(laptop_record["meta"], json!({"device": "laptop"}));
    assert_eq!(laptop_record["since_ms"], laptop_since);

    let mut watcher = Client::connect(&d.gateway.ws_url("watcher")).await;
    watcher.watch(&["alice"]).await;
    phone.close().await;
    laptop.close().await;
    let offline = watcher.expect_event(support::offline("alice")).await;
    let record = ok(get(&d, "/v1/users/alice").await);
    assert_eq!(record["online"], false);
    assert_eq!(record["connections"], json!([]));
    assert_eq!(record["last_seen_ms"], offline["last_seen"]);
    assert_eq!(record["meta"], json!({"device": "laptop"}));

    let never = ok(get(&d, "/v1/users/nobody").await);
    assert_eq!(
        never,
        json!({"user": "nobody", "online": false, "connections": [], "last_seen_ms": null, "meta": null})
    );
    let bad = get(&d, "/v1/users/a%20b").await;
    assert_eq!(
        (bad.status, bad.error_code().as_str()),
        (400, "invalid_user")
    );

    // Metadata is checked before the upgrade: no WebSocket is opened.
    let big = format!("%7B%22x%22%3A%22{}%22%7D", "y".repeat(100));
    for (meta, code) in [
        ("not-json", "invalid_meta"),
        ("%5B1%2C2%5D", "invalid_meta"),
        (big.as_str(), "meta_too_large"),
    ] {
        let path = format!("/ws?user=alice&meta={meta}");
        let refused = http::websocket_upgrade(d.gateway.addr, &path, &[]).await;
        assert_eq!(
            (refused.status, refused.error_code().as_str()),
            (400, code),
            "{meta}"
        );
    }
}
