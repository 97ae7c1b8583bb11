//! `/metrics`: the counters and gauges follow what happened, the page is
//! valid Prometheus text (checked by the real `promtool`), and a scrape
//! costs no store call.

mod support;

use std::{process::Stdio, time::Duration};

use support::{Backend, Client, EVENT_TIMEOUT, Matcher, http, on_both_stores, online};
use tokio::io::AsyncWriteExt;

/// The value of one sample line, `name` including its labels.
fn sample(page: &str, name: &str) -> Option<f64> {
    page.lines()
        .filter(|line| !line.starts_with('#'))
        .find_map(|line| {
            let (key, value) = line.rsplit_once(' ')?;
            (key == name).then(|| value.parse().ok()).flatten()
        })
}

fn value(page: &str, name: &str) -> f64 {
    sample(page, name).unwrap_or_else(|| panic!("no sample {name} in\n{page}"))
}

async fn scrape(deployment: &support::Deployment) -> String {
    let response = http::get(deployment.gateway.addr, "/metrics").await;
    assert_eq!(response.status, 200);
    assert!(
        response
            .header("content-type")
            .is_some_and(|t| t.starts_with("text/plain; version=0.0.4")),
        "{:?}",
        response.headers
    );
    response.body_text()
}

/// Scrapes until `name` reads `expected` (the users-online gauge is
/// refreshed on a timer), within a bounded wait.
async fn scrape_until(deployment: &support::Deployment, name: &str, expected: f64) -> String {
    let deadline = tokio::time::Instant::now() + EVENT_TIMEOUT;
    loop {
        let page = scrape(deployment).await;
        if sample(&page, name) == Some(expected) {
            return page;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{name} never read {expected}; last page:\n{page}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn an_error() -> Matcher {
    Matcher::new("an error frame", |frame| frame["type"] == "error")
}

on_both_stores!(metrics_follow_the_scenario =>
    metrics_follow_the_scenario_memory, metrics_follow_the_scenario_redis);

async fn metrics_follow_the_scenario(backend: Backend) {
    let deployment = backend.start(&[]).await;
    let gateway = &deployment.gateway;
    let before = scrape(&deployment).await;
    assert_eq!(value(&before, "presenced_connections_open"), 0.0);
    assert_eq!(value(&before, "presenced_users_online"), 0.0);

    // Three connections of two users; one joins a room, one sends garbage.
    let mut watcher = Client::connect(&gateway.ws_url("walter")).await;
    watcher.watch(&["alice"]).await;
    let mut alice_1 = Client::connect(&gateway.ws_url("alice")).await;
    let alice_2 = Client::connect(&gateway.ws_url("alice")).await;
    watcher.expect_event(online("alice")).await;
    alice_1.join("doc:1").await;
    alice_1.send_text("not json").await;
    alice_1.expect_event(an_error()).await;

    let page = scrape_until(&deployment, "presenced_users_online", 2.0).await;
    for (name, expected) in [
        ("presenced_connections_open", 3.0),
        ("presenced_connections_opened_total", 3.0),
        ("presenced_frames_received_total{type=\"join\"}", 1.0),
        ("presenced_frames_received_total{type=\"watch\"}", 1.0),
        ("presenced_frames_received_total{type=\"invalid\"}", 1.0),
        ("presenced_frames_sent_total{type=\"welcome\"}", 3.0),
        ("presenced_frames_sent_total{type=\"reply\"}", 2.0),
        ("presenced_frames_sent_total{type=\"online\"}", 1.0),
        ("presenced_errors_sent_total{code=\"bad_request\"}", 1.0),
        ("presenced_events_published_total{kind=\"online\"}", 2.0),
        ("presenced_events_published_total{kind=\"joined\"}", 1.0),
    ] {
        assert_eq!(value(&page, name), expected, "{name}");
    }
    assert!(value(&page, "presenced_store_batch_ops_count") >= 1.0);
    assert!(
        value(&page, "presenced_store_batch_ops_sum") >= 5.0,
        "3 connects, 1 join, 1 watch"
    );
    assert!(value(&page, "presenced_store_batch_duration_seconds_count") >= 1.0);
    assert!(value(&page, "process_resident_memory_bytes") > 1e6);
    assert!(value(&page, "process_open_fds") >= 3.0);

    // Closing both of alice's tabs: one offline, two closes by the client.
    alice_1.close().await;
    alice_2.close().await;
    watcher
        .expect_event(Matcher::new("offline alice", |f| {
            f["type"] == "offline" && f["user"] == "alice"
        }))
        .await;
    let page = scrape_until(&deployment, "presenced_users_online", 1.0).await;
    assert_eq!(value(&page, "presenced_connections_open"), 1.0);
    assert_eq!(
        value(
            &page,
            "presenced_connections_closed_total{reason=\"client\"}"
        ),
        2.0
    );
    assert_eq!(
        value(&page, "presenced_events_published_total{kind=\"offline\"}"),
        1.0
    );
    assert_eq!(
        value(&page, "presenced_events_published_total{kind=\"left\"}"),
        1.0
    );
}

/// The page after traffic is valid exposition format with clean metric
/// names, as the Prometheus project's own linter sees it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promtool_accepts_the_metrics_page() {
    let deployment = Backend::Memory.start(&[]).await;
    let gateway = &deployment.gateway;
    let mut tab = Client::connect(&gateway.ws_url("alice")).await;
    tab.join("doc:1").await;
    tab.send_text("[]").await;
    tab.expect_event(an_error()).await;
    let page = scrape(&deployment).await;

    let mut promtool = tokio::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("promtool on the PATH (Debian package `prometheus`; .ci/test installs it)");
    let mut stdin = promtool.stdin.take().expect("stdin");
    stdin.write_all(page.as_bytes()).await.expect("write page");
    drop(stdin);
    let output = tokio::time::timeout(Duration::from_secs(30), promtool.wait_with_output())
        .await
        .expect("promtool finished in time")
        .expect("promtool ran");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        output.status.success(),
        "promtool rejected the page: {said}\n{page}"
    );
    assert!(said.trim().is_empty(), "promtool found problems: {said}");
}

#[tokio::test]
async fn metrics_only_answers_get() {
    let deployment = Backend::Memory.start(&[]).await;
    let response = http::request(deployment.gateway.addr, "POST", "/metrics", &[]).await;
    assert_eq!(response.status, 405);
    assert_eq!(response.error_code(), "method_not_allowed");
}
