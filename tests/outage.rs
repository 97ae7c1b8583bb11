//! A Redis outage is bounded: while the store is unreachable, requests
//! that wait for it queue up to `--max-pending`; past that they are
//! answered `unavailable` at once (and counted), the gateway keeps running,
//! and the queued ones are answered once Redis is back.

mod support;

use std::time::Duration;

use serde_json::{Value, json};
use support::{Client, EVENT_TIMEOUT, Gateway, QUIET_WINDOW, RedisServer, http};
use tokio::time::{Instant, sleep};

const MAX_PENDING: usize = 5;
const SENT: usize = 12;

fn counter(page: &str, name: &str) -> f64 {
    page.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in\n{page}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_past_the_bound_are_refused_while_redis_is_down() {
    support::within_scenario_timeout(async {
        let mut redis = RedisServer::start().await;
        let max = MAX_PENDING.to_string();
        let gateway = Gateway::redis(&redis, &["--max-pending", &max]).await;
        let mut carl = Client::connect(&gateway.ws_url("carl")).await;
        assert!(carl.query_one("carl").await.online);

        redis.kill();
        // Wait until the node has noticed (a lease refresh fails), so every
        // request below meets a failing store.
        let deadline = Instant::now() + EVENT_TIMEOUT;
        while http::get(gateway.addr, "/readyz").await.status != 503 {
            assert!(Instant::now() < deadline, "/readyz never turned 503");
            // A probe has no change signal to await.
            sleep(Duration::from_millis(100)).await;
        }
        for n in 0..SENT {
            carl.send_json(json!({"type": "query", "users": ["carl"], "ref": format!("q{n}")}))
                .await;
        }
        let mut answered: Vec<Value> = Vec::new();
        while let Some(frame) = carl.try_next_json(QUIET_WINDOW).await {
            answered.push(frame);
        }
        // One batch may be in flight besides the queue.
        assert!(
            answered.len() >= SENT - MAX_PENDING - 1,
            "at most {MAX_PENDING} requests wait; the rest are refused at once: {answered:?}"
        );
        for frame in &answered {
            assert_eq!(frame["type"], "error", "{frame}");
            assert_eq!(frame["code"], "unavailable", "{frame}");
        }
        let page = http::get(gateway.addr, "/metrics").await.body_text();
        assert_eq!(
            counter(&page, "presenced_store_queue_overflows_total"),
            answered.len() as f64
        );
        // The connection stays open and answers what needs no store.
        carl.ping().await;

        redis.restart().await;
        // The queued requests are answered, in order, once Redis is back.
        let mut refs: Vec<String> = answered
            .iter()
            .map(|f| f["ref"].as_str().expect("a ref").to_owned())
            .collect();
        while refs.len() < SENT {
            let frame = carl.next_json(Duration::from_secs(15)).await;
            assert_eq!(frame["type"], "reply", "{frame}");
            assert_eq!(frame["users"][0]["online"], true, "{frame}");
            refs.push(frame["ref"].as_str().expect("a ref").to_owned());
        }
        refs.sort_unstable();
        let mut all: Vec<String> = (0..SENT).map(|n| format!("q{n}")).collect();
        all.sort_unstable();
        assert_eq!(refs, all, "each request answered once");
    })
    .await
}

/// When a node's event subscription breaks (here: Redis drops every
/// pub/sub client), the node subscribes again and sends its clients a
/// `sync` with the current state of what they follow, so events published
/// in the gap are not lost on them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_subscription_is_replaced_and_clients_resynced() {
    support::within_scenario_timeout(async {
        let redis = RedisServer::start().await;
        let node_a = Gateway::redis(&redis, &[]).await;
        let node_b = Gateway::redis(&redis, &[]).await;
        let mut walter = Client::connect(&node_b.ws_url("walter")).await;
        walter.watch(&["alice"]).await;
        assert_eq!(walter.join("doc:gap").await, ["walter"]);
        walter.expect_event(support::joined("doc:gap", "walter")).await;

        let killed: i64 = redis.command(&["CLIENT", "KILL", "TYPE", "pubsub"]).await;
        assert_eq!(killed, 2, "one subscription per node");
        let mut alice = Client::connect(&node_a.ws_url("alice")).await;
        alice.join("doc:gap").await;

        // Whether or not walter's node was subscribed again in time for
        // alice's events, it sends a sync once it is.
        let is_sync = |f: &Value| f["type"] == "sync";
        let mut syncs = Vec::new();
        let deadline = Instant::now() + EVENT_TIMEOUT;
        while syncs.len() < 2 {
            let frame = walter.next_json(deadline - Instant::now()).await;
            if is_sync(&frame) {
                syncs.push(frame);
            }
        }
        syncs.sort_by_key(|f| f["room"].is_string());
        assert_eq!(
            syncs,
            [
                json!({"type": "sync", "users": [{"user": "alice", "online": true, "seq": 1}]}),
                json!({"type": "sync", "room": "doc:gap", "members": [{"user": "alice"}, {"user": "walter"}]}),
            ]
        );
        // Events flow again afterwards.
        alice.close().await;
        let offline = walter.expect_event(support::offline("alice")).await;
        assert_eq!(offline["reason"], "closed");
    })
    .await
}

/// A reply to the request with this `ref`.
fn reply_to(reference: u64) -> support::Matcher {
    support::Matcher::new(format!("the answer to ref {reference}"), move |f| {
        matches!(f["type"].as_str(), Some("reply" | "error")) && f["ref"] == reference
    })
}

/// Polls `/metrics` until `series` reaches `at_least` (a counter has no
/// change signal a test could await).
async fn wait_for_metric(gateway: &Gateway, series: &str, at_least: f64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while gateway.metric(series).await < at_least {
        assert!(
            Instant::now() < deadline,
            "{series} never reached {at_least}"
        );
        sleep(Duration::from_millis(100)).await;
    }
}

/// A join refused `unavailable` (the store hangs and the queue is full)
/// leaves no trace: not in the room once the store answers again, not in
/// the reassert that follows the failed batch, not as a `left` when the tab
/// closes, and not against the connection's `--max-rooms`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_join_leaves_no_trace_after_the_store_recovers() {
    support::within_scenario_timeout(async {
        let redis = RedisServer::start().await;
        let gateway = Gateway::redis(&redis, &["--max-pending", "1", "--max-rooms", "3"]).await;
        let mut observer = Client::connect(&gateway.ws_url("observer")).await;
        observer.join("r").await;
        observer.watch(&["tab"]).await;
        let mut tab = Client::connect(&gateway.ws_url("tab")).await;
        observer.expect_event(support::online("tab")).await;

        redis.pause();
        // One in flight, one waiting: the third cannot be queued, whatever
        // the batching.
        tab.send_json_burst(&[
            json!({"type": "join", "room": "r2", "ref": 1}),
            json!({"type": "join", "room": "r3", "ref": 2}),
            json!({"type": "join", "room": "r", "ref": 3}),
        ])
        .await;
        let refused = tab.expect_event(reply_to(3)).await;
        assert_eq!(refused["type"], "error", "{refused}");
        assert_eq!(refused["code"], "unavailable", "{refused}");
        // The batch in flight times out: the node will reassert.
        wait_for_metric(&gateway, "presenced_store_batch_failures_total", 1.0).await;
        redis.resume();

        assert_eq!(tab.expect_event(reply_to(1)).await["type"], "reply");
        let second = tab.expect_event(reply_to(2)).await;
        let held = 1 + usize::from(second["type"] == "reply");
        // The store answers again, reassert included.
        let deadline = Instant::now() + EVENT_TIMEOUT;
        while http::get(gateway.addr, "/readyz").await.status != 200 {
            assert!(Instant::now() < deadline, "/readyz never turned 200 again");
            sleep(Duration::from_millis(100)).await;
        }
        let page = tab.ask_ok(json!({"type": "room", "room": "r"})).await;
        assert_eq!(page["users"], json!(["observer"]), "{page}");
        let fields: Vec<String> = redis.command(&["HKEYS", "presence:room:r"]).await;
        assert_eq!(fields, vec!["observer".to_owned()]);

        // Its room bound counts only the rooms it holds.
        for room in ["r4", "r5"].iter().take(3 - held) {
            tab.ask_ok(json!({"type": "join", "room": room})).await;
        }
        let over = tab.ask(json!({"type": "join", "room": "r6"})).await;
        assert_eq!(over["code"], "limit_exceeded", "{over}");

        tab.close().await;
        observer.expect_event(support::offline("tab")).await;
        observer.expect_no_event(support::left("r", "tab")).await;
    })
    .await;
}
