//! The close code reaches a client that keeps sending. A socket closed with
//! unread data in its receive buffer makes the kernel answer with a reset,
//! and the reset destroys the Close frame still in flight: the client would
//! see 1006 (abnormal closure) instead of 4029 or 1009, and its "keep the
//! backoff" rule would never fire for a real flood. So after its Close the
//! gateway reads and discards what the client still sends until the
//! client's own Close (or 1 s), then closes. Presence does not wait for
//! that: the user is offline as soon as the gateway decides to close.

mod support;

use serde_json::{Value, json};
use support::{
    Client, EVENT_TIMEOUT, Gateway, SilentClient, offline, online, within_scenario_timeout,
};
use tokio::time::Instant;

/// Far more than the gateway reads before it closes: the default burst (50)
/// passes, 50 refusals are tolerated, the 101st closes; the other 2,899
/// are still on their way, unread, when the gateway sends its Close.
const FLOOD: usize = 3000;

fn pings(count: usize) -> Vec<Value> {
    (0..count)
        .map(|i| json!({"type": "ping", "ref": i}))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_3000_pings_in_one_write_still_reads_close_4029() {
    within_scenario_timeout(async {
        let gateway = Gateway::memory(&[]).await;
        let mut watcher = Client::connect(&gateway.ws_url("walter")).await;
        watcher.watch(&["flooder"]).await;
        let mut flooder = Client::connect(&gateway.ws_url("flooder")).await;
        watcher.expect_event(online("flooder")).await;

        flooder.send_json_burst(&pings(FLOOD)).await;
        let (frames, code) = flooder.frames_until_close(EVENT_TIMEOUT).await;
        assert_eq!(
            code,
            Some(4029),
            "a flood in one write is told why it was closed, not reset ({} frames before)",
            frames.len()
        );
        assert!(
            frames
                .iter()
                .all(|f| f["type"] == "pong" || f["code"] == "rate_limited"),
            "only pongs and refusals before the close"
        );
        let gone = watcher.expect_event(offline("flooder")).await;
        assert_eq!(gone["reason"], "closed");
        assert_eq!(
            gateway
                .metric("presenced_connections_closed_total{reason=\"rate_limited\"}")
                .await,
            1.0
        );
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_frame_with_more_behind_it_in_the_same_write_reads_close_1009() {
    within_scenario_timeout(async {
        let gateway = Gateway::memory(&["--max-message-bytes", "1024"]).await;
        let mut watcher = Client::connect(&gateway.ws_url("walter")).await;
        watcher.watch(&["sender"]).await;
        let mut sender = Client::connect(&gateway.ws_url("sender")).await;
        watcher.expect_event(online("sender")).await;

        // Pongs are on their way when the gateway reads the oversized
        // frame's header and stops reading: the rest of that frame and the
        // pings behind it are unread when it closes.
        let mut burst = pings(100);
        burst.push(json!({"type": "ping", "padding": "x".repeat(64 * 1024)}));
        burst.extend(pings(100));
        sender.send_json_burst(&burst).await;
        let (frames, code) = sender.frames_until_close(EVENT_TIMEOUT).await;
        assert_eq!(
            code,
            Some(1009),
            "the data behind an oversized frame does not turn its 1009 into a reset \
             ({} frames before)",
            frames.len()
        );
        assert_eq!(
            frames.len(),
            100,
            "a pong for each ping before the oversized frame"
        );
        watcher.expect_event(offline("sender")).await;
        assert_eq!(
            gateway
                .metric("presenced_connections_closed_total{reason=\"too_big\"}")
                .await,
            1.0
        );
    })
    .await
}

/// A client that floods and never stops, never answering the Close: the
/// gateway drops it once the linger is over, and its user went offline
/// before that, not after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_never_answers_the_close_is_dropped_and_offline_first() {
    within_scenario_timeout(async {
        let gateway = Gateway::memory(&["--rate-limit", "5", "--rate-burst", "10"]).await;
        let mut watcher = Client::connect(&gateway.ws_url("walter")).await;
        watcher.watch(&["flooder"]).await;
        let flooder = SilentClient::connect(gateway.addr, "flooder").await;
        watcher.expect_event(online("flooder")).await;

        let went_offline = async {
            let event = watcher.expect_event(offline("flooder")).await;
            (event, Instant::now())
        };
        let flood = flooder.flood_until_dropped(json!({"type": "ping"}), EVENT_TIMEOUT);
        let ((event, offline_at), flooded) = tokio::join!(went_offline, flood);
        assert_eq!(event["reason"], "closed");
        assert_eq!(
            flooded.close_code,
            Some(4029),
            "the close frame was read before the connection ended"
        );
        assert!(
            offline_at < flooded.ended_at,
            "presence does not wait for the lingering socket: offline came {:?} after the \
             connection ended",
            offline_at.duration_since(flooded.ended_at)
        );
        // The gateway is as it was: a new tab of the same user is served.
        let mut back = Client::connect(&gateway.ws_url("flooder")).await;
        back.ping().await;
    })
    .await
}
