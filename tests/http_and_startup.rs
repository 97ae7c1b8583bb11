//! Plain HTTP before the upgrade, and the configurations the gateway refuses
//! to start with. These do not depend on the store, so they run on memory.

mod support;

use std::time::Duration;

use support::{
    Gateway, gateway::run_expecting_exit, http, http::SAMPLE_WEBSOCKET_ACCEPT,
    within_scenario_timeout,
};

/// Bound for a refused start to exit.
const REFUSAL_TIMEOUT: Duration = Duration::from_secs(10);

#[tokio::test]
async fn healthz_answers_200_with_json() {
    within_scenario_timeout(async {
        let gateway = Gateway::memory(&[]).await;
        let response = http::get(gateway.addr, "/healthz").await;
        assert_eq!(response.status, 200, "{}", response.body_text());
        assert!(response.json().is_object(), "{}", response.body_text());
    })
    .await
}

#[tokio::test]
async fn unknown_path_answers_404_not_found() {
    within_scenario_timeout(async {
        let gateway = Gateway::memory(&[]).await;
        let response = http::get(gateway.addr, "/no/such/path").await;
        assert_eq!(response.status, 404, "{}", response.body_text());
        assert_eq!(response.error_code(), "not_found");
    })
    .await
}

#[tokio::test]
async fn known_path_with_another_method_answers_405() {
    within_scenario_timeout(async {
        let gateway = Gateway::memory(&[]).await;
        let response = http::request(gateway.addr, "POST", "/healthz", &[]).await;
        assert_eq!(response.status, 405, "{}", response.body_text());
        assert_eq!(response.error_code(), "method_not_allowed");
    })
    .await
}

#[tokio::test]
async fn ws_without_upgrade_answers_426() {
    within_scenario_timeout(async {
        let gateway = Gateway::memory(&[]).await;
        let response = http::get(gateway.addr, "/ws?user=alice").await;
        assert_eq!(response.status, 426, "{}", response.body_text());
        assert_eq!(response.error_code(), "upgrade_required");
    })
    .await
}

#[tokio::test]
async fn dev_upgrade_without_user_answers_400_missing_user() {
    within_scenario_timeout(async {
        let gateway = Gateway::memory(&[]).await;
        let response = http::websocket_upgrade(gateway.addr, "/ws", &[]).await;
        assert_eq!(response.status, 400, "{}", response.body_text());
        assert_eq!(response.error_code(), "missing_user");
    })
    .await
}

#[tokio::test]
async fn upgrade_with_a_bad_user_id_answers_400_invalid_user() {
    within_scenario_timeout(async {
        let gateway = Gateway::memory(&[]).await;
        let too_long = "u".repeat(129);
        let two_hundred = "u".repeat(200);
        for user in ["a%20b", "a/b", two_hundred.as_str(), too_long.as_str()] {
            let path = format!("/ws?user={user}");
            let response = http::websocket_upgrade(gateway.addr, &path, &[]).await;
            assert_eq!(
                response.status,
                400,
                "user {user:?}: {}",
                response.body_text()
            );
            assert_eq!(response.error_code(), "invalid_user", "user {user:?}");
        }

        // The edges of the rules are accepted: every allowed character, 128 bytes.
        let longest = "u".repeat(128);
        for user in ["Az09_-.:@", longest.as_str()] {
            let path = format!("/ws?user={user}");
            let response = http::websocket_upgrade(gateway.addr, &path, &[]).await;
            assert_eq!(
                response.status,
                101,
                "user {user:?} is valid: {}",
                response.body_text()
            );
        }
    })
    .await
}

#[tokio::test]
async fn permessage_deflate_is_never_negotiated() {
    within_scenario_timeout(async {
        let gateway = Gateway::memory(&[]).await;
        let response = http::websocket_upgrade(
            gateway.addr,
            "/ws?user=alice",
            &[(
                "Sec-WebSocket-Extensions",
                "permessage-deflate; client_max_window_bits",
            )],
        )
        .await;
        assert_eq!(response.status, 101, "{}", response.body_text());
        assert_eq!(
            response.header("sec-websocket-accept"),
            Some(SAMPLE_WEBSOCKET_ACCEPT)
        );
        assert_eq!(
            response.header("sec-websocket-extensions"),
            None,
            "no extension is negotiated: {:?}",
            response.headers
        );
    })
    .await
}

#[tokio::test]
async fn dev_mode_refuses_a_non_loopback_listen_address() {
    let refusal = run_expecting_exit(&["--dev", "--listen", "0.0.0.0:0"], REFUSAL_TIMEOUT).await;
    assert!(!refusal.status.success(), "exit status {}", refusal.status);
    assert!(
        refusal.stderr.to_lowercase().contains("loopback"),
        "the refusal explains that --dev is loopback-only; stderr:\n{}",
        refusal.stderr
    );
    assert!(
        !refusal.stdout.contains("listening"),
        "it never listened; stdout:\n{}",
        refusal.stdout
    );
}

#[tokio::test]
async fn refuses_to_start_without_dev_or_auth() {
    let refusal = run_expecting_exit(&["--listen", "127.0.0.1:0"], REFUSAL_TIMEOUT).await;
    assert!(!refusal.status.success(), "exit status {}", refusal.status);
    assert!(
        refusal.stderr.contains("--dev"),
        "the refusal points at --dev; stderr:\n{}",
        refusal.stderr
    );
    assert!(
        !refusal.stdout.contains("listening"),
        "it never listened; stdout:\n{}",
        refusal.stdout
    );
}

/// `/readyz` on the memory store is ready from the start.
#[tokio::test]
async fn readyz_answers_200_on_the_memory_store() {
    within_scenario_timeout(async {
        let gateway = Gateway::memory(&[]).await;
        let response = http::get(gateway.addr, "/readyz").await;
        assert_eq!(response.status, 200, "{}", response.body_text());
        assert_eq!(response.json()["status"], "ready");
    })
    .await
}

/// A single node on the memory store drains too: SIGTERM sends the
/// `offline` with reason `shutdown` to a watcher, then closes every socket
/// with 1012, and the process exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_a_memory_node() {
    within_scenario_timeout(async {
        let mut gateway = Gateway::memory(&[]).await;
        let mut watcher = support::Client::connect(&gateway.ws_url("walter")).await;
        watcher.watch(&["alice"]).await;
        let mut alice = support::Client::connect(&gateway.ws_url("alice")).await;
        watcher.expect_event(support::online("alice")).await;

        let status = gateway.terminate().await;
        assert!(status.success(), "exit status {status:?}");
        let offline = watcher.expect_event(support::offline("alice")).await;
        assert_eq!(offline["reason"], "shutdown", "{offline}");
        for client in [&mut watcher, &mut alice] {
            assert_eq!(
                client.expect_close(support::EVENT_TIMEOUT).await,
                Some(1012),
                "{}",
                client.label()
            );
        }
    })
    .await
}
