//! Presence: watchers get one `online` when a user's first connection opens
//! and one `offline` when their last one ends, however many tabs they have
//! and however connects and disconnects race.

mod support;

use std::{
    collections::{HashMap, HashSet},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde_json::{Value, json};
use support::{
    Backend, Client, EVENT_TIMEOUT, QUIET_WINDOW, UserState, any_presence_event, offline,
    on_both_stores, online, presence_of,
};

/// Unix milliseconds now, to check `last_seen` against.
fn unix_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis() as u64
}

on_both_stores!(three_tabs_one_online_event =>
    three_tabs_one_online_event_memory, three_tabs_one_online_event_redis);

async fn three_tabs_one_online_event(backend: Backend) {
    let deployment = backend.start(&[]).await;
    let gateway = &deployment.gateway;
    let started = unix_millis();

    let mut watcher = Client::connect(&gateway.ws_url("walter")).await;
    assert_eq!(
        watcher.watch(&["alice"]).await,
        [UserState::new("alice", false, 0)],
        "alice was never seen"
    );

    let first_tab = Client::connect(&gateway.ws_url("alice")).await;
    let second_tab = Client::connect(&gateway.ws_url("alice")).await;
    let last_tab = Client::connect(&gateway.ws_url("alice")).await;

    let came_online = watcher.expect_event(online("alice")).await;
    assert_eq!(
        came_online,
        json!({"type": "online", "user": "alice", "seq": 1}),
        "the first transition of a never-seen user is online with seq 1"
    );
    watcher.expect_no_event(presence_of("alice")).await;

    first_tab.close().await;
    second_tab.close().await;
    watcher.expect_no_event(presence_of("alice")).await;
    assert!(
        watcher.query_one("alice").await.online,
        "alice still has a tab open"
    );

    last_tab.close().await;
    let went_offline = watcher.expect_event(offline("alice")).await;
    assert_eq!(
        went_offline["seq"], 2,
        "offline follows online by one seq: {went_offline}"
    );
    let last_seen = went_offline["last_seen"]
        .as_u64()
        .unwrap_or_else(|| panic!("offline carries last_seen in Unix ms: {went_offline}"));
    assert!(
        (started.saturating_sub(60_000)..=unix_millis() + 60_000).contains(&last_seen),
        "last_seen {last_seen} is not a Unix-ms time near now ({started})"
    );
    let mut fields: Vec<&str> = went_offline
        .as_object()
        .expect("object")
        .keys()
        .map(String::as_str)
        .collect();
    fields.sort_unstable();
    assert_eq!(
        fields,
        ["last_seen", "reason", "seq", "type", "user"],
        "{went_offline}"
    );
    assert_eq!(
        went_offline["reason"], "closed",
        "the client closed its last tab: {went_offline}"
    );
    watcher.expect_no_event(presence_of("alice")).await;
    assert_eq!(
        watcher.query_one("alice").await,
        UserState::new("alice", false, 2)
    );
}

on_both_stores!(racing_connects_and_disconnects_alternate =>
    racing_connects_and_disconnects_alternate_memory,
    racing_connects_and_disconnects_alternate_redis);

/// 20 concurrent tasks × 10 connect/disconnect cycles of one user, mixing
/// clean closes, closes before the welcome arrives and dropped TCP.
async fn racing_connects_and_disconnects_alternate(backend: Backend) {
    const TASKS: usize = 20;
    const CYCLES: usize = 10;
    let deployment = backend.start(&[]).await;
    let gateway = &deployment.gateway;

    let mut watcher = Client::connect(&gateway.ws_url("walter")).await;
    assert_eq!(
        watcher.watch(&["alice"]).await,
        [UserState::new("alice", false, 0)]
    );

    let url = gateway.ws_url("alice");
    let tasks: Vec<_> = (0..TASKS)
        .map(|task| {
            let url = url.clone();
            tokio::spawn(async move {
                for cycle in 0..CYCLES {
                    match (task + cycle) % 3 {
                        0 => Client::connect(&url).await.close().await,
                        1 => Client::connect_without_welcome(&url).await.close().await,
                        _ => Client::connect(&url).await.drop_tcp().await,
                    }
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("a connect/disconnect task failed");
    }

    // Follow alice's events from the watch reply's state (offline, seq 0):
    // each must flip the state and add exactly one to seq. The stream is over
    // once alice is offline, nothing more arrives, and the store agrees.
    let (mut is_online, mut seq, mut transitions) = (false, 0, 0);
    loop {
        let event = if is_online {
            watcher.next_event().await
        } else if let Some(event) = watcher.try_next_json(QUIET_WINDOW).await {
            event
        } else {
            let stored = watcher.query_one("alice").await;
            if stored.seq == seq {
                assert_eq!(
                    stored,
                    UserState::new("alice", false, seq),
                    "after every connection ended alice is offline at the last event's seq"
                );
                break;
            }
            assert!(
                stored.seq > seq,
                "query answers seq {} although an event with seq {seq} was already delivered",
                stored.seq
            );
            // Events up to the stored seq are still on their way.
            watcher.next_event().await
        };
        let expected_type = if is_online { "offline" } else { "online" };
        assert!(
            event["type"] == expected_type && event["user"] == "alice",
            "after {transitions} transitions (seq {seq}) expected {expected_type} of alice, got {event}"
        );
        assert_eq!(
            event["seq"],
            seq + 1,
            "seq must grow by exactly one per transition: {event}"
        );
        is_online = !is_online;
        seq += 1;
        transitions += 1;
    }
    eprintln!("alice made {transitions} transitions");
    assert!(
        transitions >= 2,
        "alice held connections open, so she came online at least once"
    );
}

on_both_stores!(alone thousand_tabs_connect_at_once =>
    thousand_tabs_connect_at_once_memory, thousand_tabs_connect_at_once_redis);

/// 250 users × 4 tabs open together: one `online` per user, few Redis
/// transactions (presence updates are batched), then one `offline` each.
async fn thousand_tabs_connect_at_once(backend: Backend) {
    const USERS: usize = 250;
    const TABS_PER_USER: usize = 4;
    const MAX_EXEC_CALLS: u64 = 50;
    const PHASE_TIMEOUT: Duration = Duration::from_secs(60);
    let deployment = backend.start(&[]).await;
    let gateway = &deployment.gateway;

    let users: Vec<String> = (0..USERS).map(|index| format!("user-{index:03}")).collect();
    let user_ids: Vec<&str> = users.iter().map(String::as_str).collect();
    let mut watcher = Client::connect(&gateway.ws_url("walter")).await;
    let never_seen: Vec<UserState> = users
        .iter()
        .map(|user| UserState::new(user, false, 0))
        .collect();
    assert_eq!(watcher.watch(&user_ids).await, never_seen);

    if let Some(redis) = &deployment.redis {
        redis.reset_stats().await;
    }
    let connect_phase = tokio::time::Instant::now();
    let connecting: Vec<_> = users
        .iter()
        .flat_map(|user| std::iter::repeat_n(gateway.ws_url(user), TABS_PER_USER))
        .map(|url| tokio::spawn(async move { Client::connect(&url).await }))
        .collect();
    let mut tabs = Vec::with_capacity(connecting.len());
    for connect in connecting {
        tabs.push(connect.await.expect("a tab failed to connect"));
    }

    let online_seqs =
        expect_one_event_per_user(&mut watcher, "online", &users, PHASE_TIMEOUT).await;
    assert!(
        online_seqs.values().all(|seq| *seq == 1),
        "first transition of each user has seq 1: {online_seqs:?}"
    );
    watcher.expect_no_event(any_presence_event()).await;
    let all_online: Vec<UserState> = users
        .iter()
        .map(|user| UserState::new(user, true, 1))
        .collect();
    assert_eq!(watcher.query(&user_ids).await, all_online);

    if let Some(redis) = &deployment.redis {
        let exec_calls = redis.command_calls("exec").await;
        let took = connect_phase.elapsed();
        eprintln!("connect phase: {exec_calls} EXEC calls in {took:?}");
        assert!(
            exec_calls <= MAX_EXEC_CALLS,
            "{} connections caused {exec_calls} Redis EXEC calls in {took:?}; batching \
             should keep it at most {MAX_EXEC_CALLS}",
            USERS * TABS_PER_USER
        );
    }

    let closing: Vec<_> = tabs
        .into_iter()
        .map(|tab| tokio::spawn(tab.close()))
        .collect();
    for close in closing {
        close.await.expect("a tab failed to close");
    }

    let offline_seqs =
        expect_one_event_per_user(&mut watcher, "offline", &users, PHASE_TIMEOUT).await;
    assert!(
        offline_seqs.values().all(|seq| *seq == 2),
        "offline follows online by one seq: {offline_seqs:?}"
    );
    watcher.expect_no_event(any_presence_event()).await;
    let all_offline: Vec<UserState> = users
        .iter()
        .map(|user| UserState::new(user, false, 2))
        .collect();
    assert_eq!(watcher.query(&user_ids).await, all_offline);
}

/// Reads exactly one `kind` event for each of `users` (in any order) and
/// returns their seqs; any other frame, or a second event for a user, fails.
async fn expect_one_event_per_user(
    watcher: &mut Client,
    kind: &str,
    users: &[String],
    within: Duration,
) -> HashMap<String, u64> {
    let expected: HashSet<&str> = users.iter().map(String::as_str).collect();
    let mut seqs = HashMap::new();
    let deadline = tokio::time::Instant::now() + within;
    while seqs.len() < users.len() {
        let event: Value = watcher.next_json(EVENT_TIMEOUT).await;
        let user = event["user"].as_str().unwrap_or_default().to_owned();
        assert!(
            event["type"] == kind && expected.contains(user.as_str()),
            "expected only {kind} events of watched users, got {event} after {} of them",
            seqs.len()
        );
        let seq = event["seq"]
            .as_u64()
            .unwrap_or_else(|| panic!("event without seq: {event}"));
        assert!(
            seqs.insert(user, seq).is_none(),
            "second {kind} for one user: {event}"
        );
        assert!(
            tokio::time::Instant::now() <= deadline,
            "only {} of {} {kind} events within {within:?}",
            seqs.len(),
            users.len()
        );
    }
    seqs
}
