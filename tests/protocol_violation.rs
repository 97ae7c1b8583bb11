//! WebSocket protocol violations: RFC 6455 (section 5.1) requires every
//! client frame to be masked and the server to close a connection that
//! sends an unmasked one. The gateway closes it with 1002 and counts it as a
//! disconnect: its user goes offline and leaves its rooms. Nobody else moves.
//! A text frame that is not UTF-8 (section 8.1) is closed the same way, with
//! 1007 (invalid frame payload data).

mod support;

use serde_json::json;
use support::{
    Backend, Client, EVENT_TIMEOUT, SilentClient, UserState, joined, left, offline, on_both_stores,
    online, raw_ws::SilentEnd, within_scenario_timeout,
};

const ROOM: &str = "lobby";

on_both_stores!(unmasked_frame_is_closed_with_1002_and_nobody_else_moves =>
    unmasked_frame_is_closed_with_1002_and_nobody_else_moves_memory,
    unmasked_frame_is_closed_with_1002_and_nobody_else_moves_redis);

async fn unmasked_frame_is_closed_with_1002_and_nobody_else_moves(backend: Backend) {
    let deployment = backend.start(&[]).await;
    let gateway = &deployment.gateway;

    // A watcher of both users, in the room with them.
    let mut watcher = Client::connect(&gateway.ws_url("walter")).await;
    watcher.watch(&["bystander", "violator"]).await;
    watcher.join(ROOM).await;
    watcher.expect_event(joined(ROOM, "walter")).await;
    let mut bystander = Client::connect(&gateway.ws_url("bystander")).await;
    bystander.join(ROOM).await;
    watcher.expect_event(online("bystander")).await;
    watcher.expect_event(joined(ROOM, "bystander")).await;

    // The violator is a well-behaved client at first.
    let mut violator = SilentClient::connect(gateway.addr, "violator").await;
    violator
        .send_json(&json!({"type": "join", "room": ROOM, "ref": 1}))
        .await;
    let reply = violator.next_json(EVENT_TIMEOUT).await;
    assert_eq!(reply["type"], "reply", "{reply}");
    assert_eq!(reply["ref"], 1, "{reply}");
    watcher.expect_event(online("violator")).await;
    watcher.expect_event(joined(ROOM, "violator")).await;
    bystander.expect_event(joined(ROOM, "violator")).await;

    // Then it sends a text frame without the mask.
    violator
        .send_unmasked_json(&json!({"type": "ping", "ref": 2}))
        .await;
    assert_eq!(
        violator.wait_for_end(EVENT_TIMEOUT).await,
        SilentEnd::CloseCode(1002),
        "an unmasked client frame is a protocol error"
    );
    violator.wait_for_disconnect(EVENT_TIMEOUT).await;

    let went_offline = watcher.expect_event(offline("violator")).await;
    assert_eq!(went_offline["seq"], 2, "{went_offline}");
    watcher.expect_event(left(ROOM, "violator")).await;
    bystander.expect_event(left(ROOM, "violator")).await;

    // Nobody else moved.
    watcher
        .expect_no_event(offline("bystander").or(left(ROOM, "bystander")))
        .await;
    assert_eq!(
        watcher.query(&["bystander", "violator"]).await,
        [
            UserState::new("bystander", true, 1),
            UserState::new("violator", false, 2)
        ]
    );
    bystander.ping().await;
    let mut latecomer = Client::connect(&gateway.ws_url("latecomer")).await;
    assert_eq!(
        latecomer.join(ROOM).await,
        ["bystander", "latecomer", "walter"],
        "the violator left the room, the bystander is still in it"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_text_frame_that_is_not_utf8_is_closed_with_1007() {
    within_scenario_timeout(async {
        let deployment = Backend::Memory.start(&[]).await;
        let gateway = &deployment.gateway;
        let mut watcher = Client::connect(&gateway.ws_url("walter")).await;
        watcher.watch(&["garbler"]).await;
        let mut garbler = SilentClient::connect(gateway.addr, "garbler").await;
        watcher.expect_event(online("garbler")).await;

        // A JSON ping with a lone continuation byte and an overlong "/" in it.
        garbler
            .send_text_bytes(b"{\"type\":\"ping\",\"ref\":\"\x80\xc0\xaf\"}")
            .await;
        assert_eq!(
            garbler.wait_for_end(EVENT_TIMEOUT).await,
            SilentEnd::CloseCode(1007),
            "invalid UTF-8 in a text frame is invalid frame payload data"
        );
        garbler.wait_for_disconnect(EVENT_TIMEOUT).await;

        let went_offline = watcher.expect_event(offline("garbler")).await;
        assert_eq!(went_offline["reason"], "closed", "{went_offline}");
        assert_eq!(
            gateway
                .metric("presenced_connections_closed_total{reason=\"invalid_payload\"}")
                .await,
            1.0
        );
        watcher.ping().await;
    })
    .await
}
