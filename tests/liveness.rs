//! Liveness: a connection that vanishes counts as disconnected, whether the
//! TCP connection ends (EOF) or the peer silently stops answering pings
//! (idle timeout, close code 1001).

mod support;

use std::time::Duration;

use serde_json::json;
use support::{
    Backend, Client, EVENT_TIMEOUT, SilentClient, UserState, any_frame, joined, left, offline,
    on_both_stores, online, raw_ws::SilentEnd,
};
use tokio::time::Instant;

on_both_stores!(dropped_tcp_goes_offline =>
    dropped_tcp_goes_offline_memory, dropped_tcp_goes_offline_redis);

async fn dropped_tcp_goes_offline(backend: Backend) {
    // Pings far apart: an offline within seconds can only come from the EOF.
    let deployment = backend
        .start(&["--heartbeat-ms", "30000", "--idle-timeout-ms", "60000"])
        .await;
    let gateway = &deployment.gateway;
    let mut watcher = Client::connect(&gateway.ws_url("walter")).await;
    watcher.watch(&["alice"]).await;
    let mut zoe = Client::connect(&gateway.ws_url("zoe")).await;
    zoe.join("lobby").await;
    zoe.expect_event(joined("lobby", "zoe")).await;

    let mut alice = Client::connect(&gateway.ws_url("alice")).await;
    alice.join("lobby").await;
    watcher.expect_event(online("alice")).await;
    zoe.expect_event(joined("lobby", "alice")).await;

    alice.drop_tcp().await;
    let within = Duration::from_secs(3);
    let went_offline = watcher.expect_event_within(offline("alice"), within).await;
    assert_eq!(went_offline["seq"], 2, "{went_offline}");
    zoe.expect_event_within(left("lobby", "alice"), within)
        .await;
    assert_eq!(
        watcher.query_one("alice").await,
        UserState::new("alice", false, 2)
    );
    // An end without a Close is the client's doing, not a protocol error.
    assert_eq!(
        gateway
            .metric("presenced_connections_closed_total{reason=\"client\"}")
            .await,
        1.0
    );
    assert_eq!(
        gateway
            .metric("presenced_connections_closed_total{reason=\"protocol_error\"}")
            .await,
        0.0
    );
}

on_both_stores!(silent_client_times_out_with_1001 =>
    silent_client_times_out_with_1001_memory, silent_client_times_out_with_1001_redis);

async fn silent_client_times_out_with_1001(backend: Backend) {
    const IDLE_TIMEOUT: Duration = Duration::from_millis(400);
    let deployment = backend
        .start(&["--heartbeat-ms", "100", "--idle-timeout-ms", "400"])
        .await;
    let gateway = &deployment.gateway;
    // The watcher and zoe answer pings (their reader keeps reading), so
    // they must outlive the idle timeout.
    let mut watcher = Client::connect(&gateway.ws_url("walter")).await;
    watcher.watch(&["alice"]).await;
    let mut zoe = Client::connect(&gateway.ws_url("zoe")).await;
    zoe.join("lobby").await;
    zoe.expect_event(joined("lobby", "zoe")).await;

    let mut alice = SilentClient::connect(gateway.addr, "alice").await;
    alice
        .send_json(&json!({"type": "join", "room": "lobby", "ref": 1}))
        .await;
    let silent_since = Instant::now();
    let reply = alice.next_json(EVENT_TIMEOUT).await;
    assert_eq!(reply["type"], "reply", "{reply}");
    watcher.expect_event(online("alice")).await;
    zoe.expect_event(joined("lobby", "alice")).await;

    // From here alice sends nothing and answers no ping.
    let went_offline = watcher.expect_event(offline("alice")).await;
    assert_eq!(went_offline["reason"], "timeout", "{went_offline}");
    let silent_for = silent_since.elapsed();
    assert!(
        silent_for >= IDLE_TIMEOUT,
        "alice went offline after {silent_for:?} of silence, before the {IDLE_TIMEOUT:?} idle timeout"
    );
    let left_lobby = zoe.expect_event(left("lobby", "alice")).await;
    assert_eq!(left_lobby["reason"], "timeout", "{left_lobby}");
    assert_eq!(
        alice.wait_for_end(EVENT_TIMEOUT).await,
        SilentEnd::CloseCode(1001),
        "an idle connection is closed with 1001"
    );

    // Connections that answer pings stay, well past the idle timeout.
    watcher.expect_no_event(any_frame()).await;
    zoe.expect_no_event(any_frame()).await;
    watcher.ping().await;
    zoe.ping().await;
}
