//! The offline grace: a reload, a network blip or a lost node is invisible
//! to watchers and room members when the user is back within
//! `--offline-grace-ms`; otherwise exactly one `offline` (and `left`) comes
//! when it runs out, with the reason and the moment of the end. A sign-out
//! (Close 1000) and an explicit `leave` have no grace. Real gateway
//! binaries, both stores, and a real redis-server for the cluster cases.
//!
//! A negative ("nothing about alice") needs a moment after which anything
//! would have arrived: bob ends the same way right after alice and does not
//! come back, so his `offline` is decided by the same expiry that would
//! have decided hers, after hers in store order. Waiting for bob's is the
//! bounded wait; then nothing about alice may be among what arrived.

mod support;

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::future::join_all;
use serde_json::json;
use support::{
    Backend, Client, EVENT_TIMEOUT, Gateway, RedisServer, http, joined, left, left_because,
    offline, offline_because, on_both_stores, online, presence_of,
};

/// Short enough for tests, long enough for a reconnect on a loaded machine.
const GRACE_MS: &str = "1500";

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// Anything about `user`: presence or a room event.
fn anything_about(user: &str) -> support::Matcher {
    let name = user.to_owned();
    presence_of(user).or(support::Matcher::new(
        format!("a room event of {user}"),
        move |f| {
            matches!(f["type"].as_str(), Some("joined" | "left")) && f["user"] == name.as_str()
        },
    ))
}

on_both_stores!(a_reload_within_the_grace_is_invisible =>
    a_reload_within_the_grace_is_invisible_memory, a_reload_within_the_grace_is_invisible_redis);

async fn a_reload_within_the_grace_is_invisible(backend: Backend) {
    let deployment = backend.start(&["--offline-grace-ms", GRACE_MS]).await;
    let gateway = &deployment.gateway;
    let mut watcher = Client::connect(&gateway.ws_url("watcher")).await;
    watcher.watch(&["alice", "bob"]).await;
    watcher.join("doc").await;
    let mut alice = Client::connect(&gateway.ws_url("alice")).await;
    alice.join("doc").await;
    let mut bob = Client::connect(&gateway.ws_url("bob")).await;
    bob.join("doc").await;
    for user in ["alice", "bob"] {
        watcher.expect_event(online(user)).await;
        watcher.expect_event(joined("doc", user)).await;
    }

    // A page reload: 1001, then a new tab that joins the room again.
    alice.close_with(1001).await;
    let closed_at = now_ms();
    bob.close_with(1001).await;
    let mut alice = Client::connect(&gateway.ws_url("alice")).await;
    let members = alice.join("doc").await;
    assert!(members.contains(&"alice".to_owned()) && members.contains(&"bob".to_owned()));
    // During the grace bob is still online and a member, for every read.
    let bob_now = alice.query_one("bob").await;
    assert!(bob_now.online, "in the grace: online");
    assert_eq!(bob_now.seq, 1, "and no new seq");
    let record = http::get(gateway.addr, "/v1/users/bob").await.json();
    assert_eq!(record["online"], true, "{record}");
    assert_eq!(record["connections"], json!([]), "{record}");
    assert!(record["grace_until_ms"].as_u64().is_some(), "{record}");
    let stats = http::get(gateway.addr, "/v1/stats").await.json();
    assert_eq!(
        (
            stats["users_online"].as_u64(),
            stats["connections"].as_u64()
        ),
        (Some(3), Some(2))
    );

    // bob's grace runs out: one offline, one left, the reason and moment
    // of the end.
    let gone = watcher.expect_event(offline_because("bob", "closed")).await;
    let arrived = now_ms();
    let last_seen = gone["last_seen"].as_u64().expect("last_seen");
    assert!(
        last_seen + 1_000 >= closed_at && last_seen + 1_000 <= arrived,
        "last_seen is when bob's tab closed ({closed_at}), not the expiry ({arrived}): {last_seen}"
    );
    assert_eq!(gone["seq"], 2);
    watcher
        .expect_event(left_because("doc", "bob", "closed"))
        .await;
    // alice's would have come with it: nothing about her at all.
    watcher.expect_no_event(anything_about("alice")).await;
    watcher.expect_no_event(offline("bob")).await;

    let metric = |series: &'static str| gateway.metric(series);
    assert_eq!(
        metric("presenced_offline_grace_started_total{scope=\"user\"}").await,
        2.0
    );
    assert_eq!(
        metric("presenced_offline_grace_cancelled_total{scope=\"user\"}").await,
        1.0
    );
    assert_eq!(
        metric("presenced_offline_grace_expired_total{scope=\"user\"}").await,
        1.0
    );
    assert_eq!(
        metric("presenced_offline_grace_cancelled_total{scope=\"room\"}").await,
        1.0
    );
    assert_eq!(
        metric("presenced_offline_grace_expired_total{scope=\"room\"}").await,
        1.0
    );
}

on_both_stores!(a_sign_out_and_a_leave_are_at_once =>
    a_sign_out_and_a_leave_are_at_once_memory, a_sign_out_and_a_leave_are_at_once_redis);

/// With a grace far longer than any wait here, a Close 1000 and a `leave`
/// still reach the watcher within the usual bound.
async fn a_sign_out_and_a_leave_are_at_once(backend: Backend) {
    let deployment = backend.start(&["--offline-grace-ms", "600000"]).await;
    let gateway = &deployment.gateway;
    let mut watcher = Client::connect(&gateway.ws_url("watcher")).await;
    watcher.watch(&["carol"]).await;
    watcher.join("doc").await;
    let mut carol = Client::connect(&gateway.ws_url("carol")).await;
    carol.join("doc").await;
    watcher.expect_event(joined("doc", "carol")).await;

    carol.leave("doc").await;
    watcher
        .expect_event(left_because("doc", "carol", "closed"))
        .await;
    carol.close().await;
    watcher
        .expect_event(offline_because("carol", "closed"))
        .await;
    let record = http::get(gateway.addr, "/v1/users/carol").await.json();
    assert_eq!(record["online"], false);
    assert!(record.get("grace_until_ms").is_none(), "{record}");
}

on_both_stores!(a_dropped_network_gets_the_grace_too =>
    a_dropped_network_gets_the_grace_too_memory, a_dropped_network_gets_the_grace_too_redis);

/// No Close at all (the network went away) is no sign-out: the user is
/// back in time and nobody sees a thing; rooms likewise.
async fn a_dropped_network_gets_the_grace_too(backend: Backend) {
    let deployment = backend.start(&["--offline-grace-ms", GRACE_MS]).await;
    let gateway = &deployment.gateway;
    let mut watcher = Client::connect(&gateway.ws_url("watcher")).await;
    watcher.watch(&["dan", "bob"]).await;
    watcher.join("doc").await;
    let mut dan = Client::connect(&gateway.ws_url("dan")).await;
    dan.join("doc").await;
    let mut bob = Client::connect(&gateway.ws_url("bob")).await;
    bob.join("doc").await;
    for user in ["dan", "bob"] {
        watcher.expect_event(online(user)).await;
        watcher.expect_event(joined("doc", user)).await;
    }
    dan.drop_tcp().await;
    bob.drop_tcp().await;
    let mut dan = Client::connect(&gateway.ws_url("dan")).await;
    dan.join("doc").await;
    watcher.expect_event(offline("bob")).await;
    watcher.expect_event(left("doc", "bob")).await;
    watcher.expect_no_event(anything_about("dan")).await;
}

/// The grace holds across nodes: a tab closed on one gateway and reopened
/// on another within it is invisible to watchers on both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_onto_another_node_is_invisible() {
    support::within_scenario_timeout(async {
        let redis = RedisServer::start().await;
        let a = Gateway::redis(&redis, &["--offline-grace-ms", GRACE_MS]).await;
        let b = Gateway::redis(&redis, &["--offline-grace-ms", GRACE_MS]).await;
        let mut on_a = Client::connect(&a.ws_url("watcher-a")).await;
        let mut on_b = Client::connect(&b.ws_url("watcher-b")).await;
        for w in [&mut on_a, &mut on_b] {
            w.watch(&["erin", "bob"]).await;
            w.join("doc").await;
        }
        let mut erin = Client::connect(&a.ws_url("erin")).await;
        erin.join("doc").await;
        let mut bob = Client::connect(&a.ws_url("bob")).await;
        bob.join("doc").await;
        for w in [&mut on_a, &mut on_b] {
            for user in ["erin", "bob"] {
                w.expect_event(online(user)).await;
                w.expect_event(joined("doc", user)).await;
            }
        }
        erin.close_with(1001).await;
        bob.close_with(1001).await;
        let mut erin = Client::connect(&b.ws_url("erin")).await;
        erin.join("doc").await;
        for w in [&mut on_a, &mut on_b] {
            w.expect_event(offline("bob")).await;
            w.expect_event(left("doc", "bob")).await;
            w.expect_no_event(anything_about("erin")).await;
        }
    })
    .await;
}

/// A node killed while its users are in their grace: the deadlines live in
/// Redis, the other node ends them, and each offline comes once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graces_outlive_the_node_that_started_them() {
    support::within_scenario_timeout(async {
        let redis = RedisServer::start().await;
        let args = ["--offline-grace-ms", GRACE_MS, "--node-lease-ms", "1000"];
        let mut a = Gateway::redis(&redis, &args).await;
        let b = Gateway::redis(&redis, &args).await;
        let mut watcher = Client::connect(&b.ws_url("watcher")).await;
        watcher.watch(&["fay", "gus"]).await;
        let fay = Client::connect(&a.ws_url("fay")).await;
        let gus = Client::connect(&a.ws_url("gus")).await;
        watcher.expect_event(online("fay")).await;
        watcher.expect_event(online("gus")).await;
        fay.close_with(1001).await;
        gus.close_with(1001).await;
        // The graces are in the store before the node dies.
        let deadline = Instant::now() + EVENT_TIMEOUT;
        while a
            .metric("presenced_offline_grace_started_total{scope=\"user\"}")
            .await
            < 2.0
        {
            assert!(Instant::now() < deadline, "the graces never started");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        a.kill().await;
        watcher.expect_event(offline_because("fay", "closed")).await;
        watcher.expect_event(offline_because("gus", "closed")).await;
        watcher.expect_no_event(offline("fay")).await;
        watcher.expect_no_event(offline("gus")).await;
    })
    .await;
}

/// `kill -9` of a node holding 500 tabs whose clients reconnect to the
/// surviving node at once: observers see no `offline` at all, before or
/// after the dead node is reaped, and Redis holds exactly the live tabs
/// afterwards. (A tab back before the reap keeps its user's count above
/// zero; one back after it ends the grace the reap started.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_node_whose_tabs_reconnect_elsewhere_is_invisible() {
    const TABS: usize = 500;
    support::alone_within_scenario_timeout(async {
        let redis = RedisServer::start().await;
        // The default grace, named: the harness turns it off otherwise.
        let args = [
            "--offline-grace-ms",
            "5000",
            "--node-lease-ms",
            "1000",
            "--max-watch",
            "1000",
        ];
        let mut doomed = Gateway::redis(&redis, &args).await;
        let survivor = Gateway::redis(&redis, &args).await;
        let users: Vec<String> = (0..TABS).map(|i| format!("u{i:03}")).collect();
        let names: Vec<&str> = users.iter().map(String::as_str).collect();
        let mut observer = Client::connect(&survivor.ws_url("observer")).await;
        observer.watch(&names).await;
        let urls: Vec<String> = users.iter().map(|u| doomed.ws_url(u)).collect();
        let tabs = join_all(urls.iter().map(|url| Client::connect(url))).await;
        for u in &users {
            observer.expect_event(online(u)).await;
        }
        doomed.kill().await;
        drop(tabs);
        let urls: Vec<String> = users.iter().map(|u| survivor.ws_url(u)).collect();
        let back = join_all(urls.iter().map(|url| Client::connect(url))).await;
        // Every tab is back. Once the dead node is reaped (lease 1 s) no
        // grace is left to run out: a wrong offline would have come by then.
        let deadline = Instant::now() + Duration::from_secs(20);
        while survivor.metric("presenced_nodes_reaped_total").await < 1.0 {
            assert!(Instant::now() < deadline, "the dead node was never reaped");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let in_grace: i64 = redis.command(&["ZCARD", "presence:grace"]).await;
        assert_eq!(
            in_grace, 0,
            "every grace the reap started was ended by a return"
        );
        observer
            .expect_no_event(support::any_presence_event())
            .await;
        assert_eq!(
            survivor
                .metric("presenced_offline_grace_expired_total{scope=\"user\"}")
                .await,
            0.0
        );
        // Redis holds exactly the survivor's tabs.
        let counts: std::collections::BTreeMap<String, i64> =
            redis.command(&["HGETALL", "presence:users"]).await;
        assert_eq!(counts.len(), TABS + 1);
        assert!(
            counts.values().all(|n| *n == 1),
            "one live tab each: {counts:?}"
        );
        assert_eq!(
            redis.get_integer("presence:connections").await,
            Some(TABS as i64 + 1)
        );
        drop(back);
    })
    .await;
}

#[tokio::test]
async fn grace_zero_is_todays_behaviour() {
    support::within_scenario_timeout(async {
        let gateway = Gateway::memory(&["--offline-grace-ms", "0"]).await;
        let mut watcher = Client::connect(&gateway.ws_url("watcher")).await;
        watcher.watch(&["hal"]).await;
        watcher.join("doc").await;
        let mut hal = Client::connect(&gateway.ws_url("hal")).await;
        hal.join("doc").await;
        watcher.expect_event(online("hal")).await;
        watcher.expect_event(joined("doc", "hal")).await;
        hal.close_with(1001).await;
        watcher.expect_event(left("doc", "hal")).await;
        watcher.expect_event(offline("hal")).await;
        watcher.expect_no_event(anything_about("hal")).await;
    })
    .await;
}
