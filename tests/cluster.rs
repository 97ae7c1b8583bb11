//! Many nodes, one truth: gateways sharing one Redis (same `--redis`, same
//! `--prefix`) are one cluster. A transition decided on any node reaches
//! watchers and room members on every node exactly once and in store order;
//! a node killed with SIGKILL is reaped by a survivor (`node_lost`), a node
//! drained by SIGTERM hands its users off (`shutdown`) and exits 0, and a
//! Redis that comes back empty is filled again with the live connections.
//!
//! Every scenario checks what a browser sees (events, replies, close codes)
//! and, where the issue defines it, what Redis holds afterwards: the store
//! must equal the live connections the test itself holds open.

mod support;

use std::{
    collections::{BTreeMap, BTreeSet},
    time::Duration,
};

use serde_json::{Value, json};
use support::{
    Client, EVENT_TIMEOUT, Gateway, Matcher, QUIET_WINDOW, RedisServer, UserState,
    alone_within_scenario_timeout, any_event, any_presence_event, http, joined, left_because,
    offline, offline_because, online, presence_of, room_event_in, within_scenario_timeout,
};
use tokio::time::{Instant, sleep};

/// The default `--prefix`, which every gateway here runs with.
const PREFIX: &str = "presence";

/// Bound for a killed node's users to be reaped. The default lease is 5 s and
/// survivors look for expired leases every second, so ~6 s is expected;
/// timing itself is the benchmarks' business, this only catches "never".
const REAP_BOUND: Duration = Duration::from_secs(15);

/// How long the store may take to hold the truth again after Redis came
/// back empty (the issue says ~5 s).
const REFILL_BOUND: Duration = Duration::from_secs(10);

/// Bound for `/readyz` to follow Redis going away or coming back.
const READINESS_BOUND: Duration = Duration::from_secs(15);

/// A quiet window long enough for a second reaper to act: every node checks
/// leases once a second, so a double reap would show within two ticks.
const REAPER_QUIET_WINDOW: Duration = Duration::from_millis(2_500);

/// Interval between reads of something that offers no change signal to
/// await (Redis contents, `/readyz`).
const POLL_INTERVAL: Duration = Duration::from_millis(50);

// ---- scenarios -------------------------------------------------------------

/// alice has a tab on node A and one on B; walter watches her from C. He
/// hears one `online` and one `offline`, the latter only once her last tab,
/// on either node, is gone. Room events cross nodes the same way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tabs_on_two_nodes_are_one_user_on_a_third() {
    within_scenario_timeout(async {
        let redis = RedisServer::start().await;
        let node_a = Gateway::redis(&redis, &[]).await;
        let node_b = Gateway::redis(&redis, &[]).await;
        let node_c = Gateway::redis(&redis, &[]).await;

        let mut walter = Client::connect(&node_c.ws_url("walter")).await;
        assert_eq!(
            walter.watch(&["alice"]).await,
            [UserState::new("alice", false, 0)]
        );
        let c = node_of(&walter);
        let walter_tab = LiveTab::new(&c, "walter", &[]);

        // Round 1: A opens first and closes first.
        let tab_a = Client::connect(&node_a.ws_url("alice")).await;
        let a = node_of(&tab_a);
        assert_eq!(
            walter.expect_event(online("alice")).await,
            json!({"type": "online", "user": "alice", "seq": 1}),
            "an online decided on A reaches a watcher on C"
        );
        let tab_b = Client::connect(&node_b.ws_url("alice")).await;
        let b = node_of(&tab_b);
        let nodes = [a.as_str(), b.as_str(), c.as_str()];
        assert_eq!(
            nodes.iter().collect::<BTreeSet<_>>().len(),
            3,
            "each process has its own node id: {nodes:?}"
        );
        // Once the store counts both tabs, the second one cannot turn into
        // an offline/online pair when the first one goes.
        let both_tabs = [
            walter_tab.clone(),
            LiveTab::new(&a, "alice", &[]),
            LiveTab::new(&b, "alice", &[]),
        ];
        wait_for_live_truth(&redis, &nodes, &both_tabs).await;
        walter.expect_no_event(presence_of("alice")).await;

        tab_a.close().await;
        let only_b = [walter_tab.clone(), LiveTab::new(&b, "alice", &[])];
        wait_for_live_truth(&redis, &nodes, &only_b).await;
        walter.expect_no_event(presence_of("alice")).await;
        assert!(
            walter.query_one("alice").await.online,
            "alice still has her tab on B"
        );

        tab_b.close().await;
        assert_eq!(
            without_last_seen(walter.expect_event(offline("alice")).await),
            json!({"type": "offline", "user": "alice", "seq": 2, "reason": "closed"}),
            "the last tab closing on B is alice going offline, for a watcher on C"
        );
        walter.expect_no_event(presence_of("alice")).await;

        // Round 2: B opens first and closes first.
        let tab_b = Client::connect(&node_b.ws_url("alice")).await;
        assert_eq!(
            walter.expect_event(online("alice")).await,
            json!({"type": "online", "user": "alice", "seq": 3})
        );
        let tab_a = Client::connect(&node_a.ws_url("alice")).await;
        wait_for_live_truth(&redis, &nodes, &both_tabs).await;
        walter.expect_no_event(presence_of("alice")).await;
        tab_b.close().await;
        let only_a = [walter_tab.clone(), LiveTab::new(&a, "alice", &[])];
        wait_for_live_truth(&redis, &nodes, &only_a).await;
        walter.expect_no_event(presence_of("alice")).await;
        tab_a.close().await;
        assert_eq!(
            without_last_seen(walter.expect_event(offline("alice")).await),
            json!({"type": "offline", "user": "alice", "seq": 4, "reason": "closed"})
        );
        walter.expect_no_event(presence_of("alice")).await;
        assert_eq!(
            walter.query_one("alice").await,
            UserState::new("alice", false, 4)
        );

        // Rooms: zoe (A) and yan (C) are in doc:1; bob comes and goes on B and C.
        const ROOM: &str = "doc:1";
        let mut zoe = Client::connect(&node_a.ws_url("zoe")).await;
        assert_eq!(zoe.join(ROOM).await, ["zoe"]);
        zoe.expect_event(joined(ROOM, "zoe")).await;
        let mut yan = Client::connect(&node_c.ws_url("yan")).await;
        assert_eq!(yan.join(ROOM).await, ["yan", "zoe"]);
        yan.expect_event(joined(ROOM, "yan")).await;
        assert_eq!(
            zoe.next_event().await,
            json!({"type": "joined", "room": ROOM, "user": "yan"}),
            "a join on C reaches a member on A"
        );

        let mut bob_b = Client::connect(&node_b.ws_url("bob")).await;
        assert_eq!(
            bob_b.join(ROOM).await,
            ["bob", "yan", "zoe"],
            "the snapshot holds the members of every node"
        );
        for member in [&mut zoe, &mut yan] {
            assert_eq!(
                member.next_event().await,
                json!({"type": "joined", "room": ROOM, "user": "bob"}),
                "{}: a join on B reaches members on A and C",
                member.label()
            );
        }

        let mut bob_c = Client::connect(&node_c.ws_url("bob")).await;
        assert_eq!(bob_c.join(ROOM).await, ["bob", "yan", "zoe"]);
        let members_and_bob_twice = [
            walter_tab.clone(),
            LiveTab::new(&a, "zoe", &[ROOM]),
            LiveTab::new(&c, "yan", &[ROOM]),
            LiveTab::new(&b, "bob", &[ROOM]),
            LiveTab::new(&c, "bob", &[ROOM]),
        ];
        wait_for_live_truth(&redis, &nodes, &members_and_bob_twice).await;
        zoe.expect_no_event(room_event_in(ROOM)).await;
        yan.expect_no_event(room_event_in(ROOM)).await;

        bob_b.close().await;
        let bob_on_c_only = [
            walter_tab.clone(),
            LiveTab::new(&a, "zoe", &[ROOM]),
            LiveTab::new(&c, "yan", &[ROOM]),
            LiveTab::new(&c, "bob", &[ROOM]),
        ];
        wait_for_live_truth(&redis, &nodes, &bob_on_c_only).await;
        zoe.expect_no_event(room_event_in(ROOM)).await;
        yan.expect_no_event(room_event_in(ROOM)).await;

        bob_c.close().await;
        for member in [&mut zoe, &mut yan] {
            assert_eq!(
                member.next_event().await,
                json!({"type": "left", "room": ROOM, "user": "bob", "reason": "closed"}),
                "{}: bob's last tab in the room closing on C is bob leaving",
                member.label()
            );
        }

        // Leaving by request is `closed` too.
        let mut bob_b = Client::connect(&node_b.ws_url("bob")).await;
        assert_eq!(bob_b.join(ROOM).await, ["bob", "yan", "zoe"]);
        zoe.expect_event(joined(ROOM, "bob")).await;
        yan.expect_event(joined(ROOM, "bob")).await;
        bob_b.leave(ROOM).await;
        for member in [&mut zoe, &mut yan] {
            assert_eq!(
                member.next_event().await,
                json!({"type": "left", "room": ROOM, "user": "bob", "reason": "closed"}),
                "{}: bob's leave on B",
                member.label()
            );
            member.expect_silence().await;
        }

        let in_the_end = [
            walter_tab,
            LiveTab::new(&a, "zoe", &[ROOM]),
            LiveTab::new(&c, "yan", &[ROOM]),
            LiveTab::new(&b, "bob", &[]),
        ];
        wait_for_live_truth(&redis, &nodes, &in_the_end).await;
    })
    .await
}

/// 1,000 cycles, four at a time, each opening a tab of alice on A and one
/// on B together and closing both together, so that the two nodes' counts
/// race in Redis all along. walter on C sees strictly alternating
/// online/offline, seq growing by one, ending offline; the store ends exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_racing_cycles_across_two_nodes_alternate() {
    alone_within_scenario_timeout(async {
        const WORKERS: usize = 4;
        const CYCLES_PER_WORKER: usize = 250;
        let redis = RedisServer::start().await;
        let node_a = Gateway::redis(&redis, &[]).await;
        let node_b = Gateway::redis(&redis, &[]).await;
        let node_c = Gateway::redis(&redis, &[]).await;

        let mut walter = Client::connect(&node_c.ws_url("walter")).await;
        assert_eq!(
            walter.watch(&["alice"]).await,
            [UserState::new("alice", false, 0)]
        );

        let started = Instant::now();
        let (url_a, url_b) = (node_a.ws_url("alice"), node_b.ws_url("alice"));
        let workers: Vec<_> = (0..WORKERS)
            .map(|worker| {
                let (url_a, url_b) = (url_a.clone(), url_b.clone());
                tokio::spawn(async move {
                    let mut nodes = BTreeSet::new();
                    for cycle in 0..CYCLES_PER_WORKER {
                        if (worker + cycle).is_multiple_of(2) {
                            let (tab_a, tab_b) =
                                tokio::join!(Client::connect(&url_a), Client::connect(&url_b));
                            nodes.insert(node_of(&tab_a));
                            nodes.insert(node_of(&tab_b));
                            tokio::join!(tab_a.close(), tab_b.close());
                        } else {
                            // Closing without waiting for the welcome: the
                            // disconnect follows the connect as closely as
                            // a client can make it.
                            let (tab_a, tab_b) = tokio::join!(
                                Client::connect_without_welcome(&url_a),
                                Client::connect_without_welcome(&url_b)
                            );
                            tokio::join!(tab_a.close(), tab_b.close());
                        }
                    }
                    nodes
                })
            })
            .collect();
        let mut nodes = BTreeSet::from([node_of(&walter)]);
        for worker in workers {
            nodes.extend(worker.await.expect("a connect/disconnect worker failed"));
        }
        eprintln!(
            "{} cycles of alice on 2 nodes took {:?}",
            WORKERS * CYCLES_PER_WORKER,
            started.elapsed()
        );
        let nodes: Vec<&str> = nodes.iter().map(String::as_str).collect();
        assert_eq!(nodes.len(), 3, "three nodes took part: {nodes:?}");

        // Every tab is closed: the store must come to hold walter alone,
        // with nothing of alice left on A or B.
        let walter_alone =
            StoreState::expected(&nodes, &[LiveTab::new(&node_of(&walter), "walter", &[])]);
        wait_for_store(&redis, &walter_alone, EVENT_TIMEOUT).await;

        let transitions = follow_until_offline(&mut walter, "alice").await;
        eprintln!(
            "alice made {transitions} transitions, all seen on the third node {:?} after the \
             first cycle began",
            started.elapsed()
        );
        assert!(
            transitions >= 2,
            "alice held tabs open, so she came online at least once"
        );
        walter.expect_no_event(any_presence_event()).await;
        assert_store(&redis, &walter_alone).await;
        assert_eq!(
            walter.query_one("alice").await,
            UserState::new("alice", false, transitions),
            "query agrees with the last event"
        );
    })
    .await
}

/// Node A holds 200 tabs of 100 users (2 each); 50 of the users also have a
/// tab on B. A is killed with SIGKILL. oscar on C, watching all 100 and in
/// the room some of them joined, hears exactly one `offline` (`node_lost`)
/// per user who was only on A, exactly one `left` (`node_lost`) per user
/// whose room connections were all on A, and nothing else. The store then
/// holds exactly the survivors.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_node_is_reaped_exactly_once() {
    alone_within_scenario_timeout(async {
        const ROOM: &str = "doc:crash";
        const USERS: usize = 100;
        // Users below SHARED also have a tab on B.
        const SHARED: usize = 50;
        // Users in ROOM_USERS join ROOM from their first tab on A; those in
        // ROOM_ON_B_TOO also from their tab on B, so they stay in the room.
        const ROOM_USERS: std::ops::Range<usize> = 40..60;
        const ROOM_ON_B_TOO: std::ops::Range<usize> = 45..50;
        let redis = RedisServer::start().await;
        let mut node_a = Gateway::redis(&redis, &[]).await;
        let node_b = Gateway::redis(&redis, &[]).await;
        let node_c = Gateway::redis(&redis, &[]).await;

        let users: Vec<String> = (0..USERS).map(|index| format!("u{index:03}")).collect();
        let user_ids: Vec<&str> = users.iter().map(String::as_str).collect();
        let mut oscar = Client::connect(&node_c.ws_url("oscar")).await;
        assert_eq!(oscar.join(ROOM).await, ["oscar"]);
        oscar.expect_event(joined(ROOM, "oscar")).await;
        assert_eq!(oscar.watch(&user_ids).await, never_seen(&user_ids));

        let mut urls = Vec::new();
        for (index, user) in users.iter().enumerate() {
            urls.extend([node_a.ws_url(user), node_a.ws_url(user)]);
            if index < SHARED {
                urls.push(node_b.ws_url(user));
            }
        }
        let connecting: Vec<_> = urls
            .into_iter()
            .map(|url| tokio::spawn(async move { Client::connect(&url).await }))
            .collect();
        // user → tabs in connect order: two on A, then the one on B if any.
        let mut tabs: BTreeMap<String, Vec<Client>> = BTreeMap::new();
        for connect in connecting {
            let tab = connect.await.expect("a tab failed to connect");
            tabs.entry(tab.label().to_owned()).or_default().push(tab);
        }
        let a = node_of(&tabs[&users[0]][0]);
        let b = node_of(&tabs[&users[0]][2]);
        let c = node_of(&oscar);
        for user_tabs in tabs.values() {
            let nodes: Vec<String> = user_tabs.iter().map(node_of).collect();
            assert!(
                nodes[..2] == [a.clone(), a.clone()] && nodes[2..].iter().all(|n| *n == b),
                "tabs are where the test put them: {nodes:?}"
            );
        }
        for index in ROOM_USERS {
            let user_tabs = tabs.get_mut(&users[index]).expect("tabs of every user");
            user_tabs[0].join(ROOM).await;
            if ROOM_ON_B_TOO.contains(&index) {
                user_tabs[2].join(ROOM).await;
            }
        }

        let mut came_in: Vec<Matcher> = users.iter().map(|user| online(user)).collect();
        came_in.extend(ROOM_USERS.map(|index| joined(ROOM, &users[index])));
        expect_exactly(&mut oscar, came_in, EVENT_TIMEOUT).await;

        let mut live = vec![LiveTab::new(&c, "oscar", &[ROOM])];
        let mut survivors = live.clone();
        for (index, user) in users.iter().enumerate() {
            let room_on_a: &[&str] = if ROOM_USERS.contains(&index) {
                &[ROOM]
            } else {
                &[]
            };
            let room_on_b: &[&str] = if ROOM_ON_B_TOO.contains(&index) {
                &[ROOM]
            } else {
                &[]
            };
            live.push(LiveTab::new(&a, user, room_on_a));
            live.push(LiveTab::new(&a, user, &[]));
            if index < SHARED {
                live.push(LiveTab::new(&b, user, room_on_b));
                survivors.push(LiveTab::new(&b, user, room_on_b));
            }
        }
        let nodes = [a.as_str(), b.as_str(), c.as_str()];
        wait_for_live_truth(&redis, &nodes, &live).await;

        let killed = Instant::now();
        node_a.kill().await;

        let mut reaped: Vec<Matcher> = users[SHARED..]
            .iter()
            .map(|user| offline_because(user, "node_lost"))
            .collect();
        reaped.extend(
            ROOM_USERS
                .filter(|index| !ROOM_ON_B_TOO.contains(index))
                .map(|index| left_because(ROOM, &users[index], "node_lost")),
        );
        expect_exactly(&mut oscar, reaped, REAP_BOUND + Duration::from_secs(5)).await;
        let reap_took = killed.elapsed();
        eprintln!(
            "kill -9 of a node with {} tabs: last node_lost event at the observer after \
             {reap_took:?}",
            USERS * 2
        );
        assert!(
            reap_took <= REAP_BOUND,
            "the dead node's users went offline {reap_took:?} after the kill; the default \
             lease is 5 s, reaped within ~6 s, bound {REAP_BOUND:?}"
        );
        oscar
            .expect_no_event_within(any_event(), REAPER_QUIET_WINDOW)
            .await;

        wait_for_live_truth(&redis, &[b.as_str(), c.as_str()], &survivors).await;
        // Each user came online once (seq 1); the reaped went offline (seq 2).
        let truth: Vec<UserState> = users
            .iter()
            .enumerate()
            .map(|(index, user)| {
                let shared = index < SHARED;
                UserState::new(user, shared, if shared { 1 } else { 2 })
            })
            .collect();
        assert_eq!(oscar.query(&user_ids).await, truth);
        // Exactly one survivor reaped A, and counted it.
        let mut reaped = 0.0;
        for node in [&node_b, &node_c] {
            let page = http::get(node.addr, "/metrics").await.body_text();
            reaped += page
                .lines()
                .find_map(|line| line.strip_prefix("presenced_nodes_reaped_total "))
                .and_then(|v| v.trim().parse::<f64>().ok())
                .unwrap_or_else(|| panic!("no presenced_nodes_reaped_total in\n{page}"));
        }
        assert_eq!(reaped, 1.0, "one reap, counted once across the survivors");
    })
    .await
}

/// Node A gets SIGTERM while holding tabs: users only there, users also on
/// B, some in a room. oscar on B hears `offline` and `left` with reason
/// `shutdown` for exactly those who lose their last connection (or last
/// room connection) with A; A's clients see close code 1012; A exits 0 and
/// leaves nothing of itself in Redis.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_node_hands_its_users_off_and_exits_cleanly() {
    within_scenario_timeout(async {
        const ROOM: &str = "doc:drain";
        let redis = RedisServer::start().await;
        let mut node_a = Gateway::redis(&redis, &[]).await;
        let node_b = Gateway::redis(&redis, &[]).await;

        let mut oscar = Client::connect(&node_b.ws_url("oscar")).await;
        assert_eq!(oscar.join(ROOM).await, ["oscar"]);
        oscar.expect_event(joined(ROOM, "oscar")).await;
        // dora, dina, dirk are on A only; sam and sara on A and B.
        let watched = ["dora", "dina", "dirk", "sam", "sara"];
        assert_eq!(oscar.watch(&watched).await, never_seen(&watched));

        let mut on_a = Vec::new();
        for user in watched {
            on_a.push(Client::connect(&node_a.ws_url(user)).await);
        }
        // On A, all but dirk join the room; on B, sara does.
        for tab in on_a.iter_mut().filter(|tab| tab.label() != "dirk") {
            tab.join(ROOM).await;
        }
        let sam_b = Client::connect(&node_b.ws_url("sam")).await;
        let mut sara_b = Client::connect(&node_b.ws_url("sara")).await;
        sara_b.join(ROOM).await;

        let mut came_in: Vec<Matcher> = watched.iter().map(|user| online(user)).collect();
        came_in.extend(
            ["dora", "dina", "sam", "sara"]
                .iter()
                .map(|user| joined(ROOM, user)),
        );
        expect_exactly(&mut oscar, came_in, EVENT_TIMEOUT).await;

        let (a, b) = (node_of(&on_a[0]), node_of(&oscar));
        let mut live: Vec<LiveTab> = on_a
            .iter()
            .map(|tab| {
                let rooms: &[&str] = if tab.label() == "dirk" { &[] } else { &[ROOM] };
                LiveTab::new(&a, tab.label(), rooms)
            })
            .collect();
        let after_drain = vec![
            LiveTab::new(&b, "oscar", &[ROOM]),
            LiveTab::new(&b, "sam", &[]),
            LiveTab::new(&b, "sara", &[ROOM]),
        ];
        live.extend(after_drain.iter().cloned());
        wait_for_live_truth(&redis, &[a.as_str(), b.as_str()], &live).await;

        let signalled = Instant::now();
        let status = node_a.terminate().await;
        eprintln!("SIGTERM to exit: {:?}", signalled.elapsed());
        assert!(
            status.success(),
            "a drained node exits with status 0, got {status}"
        );

        let mut handed_off: Vec<Matcher> = ["dora", "dina", "dirk"]
            .iter()
            .map(|user| offline_because(user, "shutdown"))
            .collect();
        handed_off.extend(
            ["dora", "dina", "sam"]
                .iter()
                .map(|user| left_because(ROOM, user, "shutdown")),
        );
        expect_exactly(&mut oscar, handed_off, EVENT_TIMEOUT).await;
        oscar.expect_no_event(any_event()).await;

        for mut tab in on_a {
            assert_eq!(
                tab.expect_close(EVENT_TIMEOUT).await,
                Some(1012),
                "{}: a draining node closes its sockets with 1012 (service restart)",
                tab.label()
            );
        }

        wait_for_live_truth(&redis, &[b.as_str()], &after_drain).await;
        assert_eq!(
            oscar.query(&watched).await,
            [
                UserState::new("dora", false, 2),
                UserState::new("dina", false, 2),
                UserState::new("dirk", false, 2),
                UserState::new("sam", true, 1),
                UserState::new("sara", true, 1),
            ]
        );
        drop((sam_b, sara_b));
    })
    .await
}

/// Tabs on two nodes, some in a room, and walter watching them. Redis is
/// killed: sockets stay open and answer pings, `/readyz` turns 503
/// (`/healthz` stays 200), and dave closes his tab meanwhile. Redis comes
/// back empty: `/readyz` turns 200 and the nodes write their live
/// connections again, so the store, `query` and walter's view end equal to
/// the truth, dave offline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_back_empty_is_refilled_with_the_live_truth() {
    within_scenario_timeout(async {
        const ROOM: &str = "doc:outage";
        let mut redis = RedisServer::start().await;
        let node_a = Gateway::redis(&redis, &[]).await;
        let node_b = Gateway::redis(&redis, &[]).await;
        for node in [&node_a, &node_b] {
            let ready = wait_for_readiness(node, 200, READINESS_BOUND).await;
            assert_eq!(ready.json(), json!({"status": "ready"}));
        }

        let watched = ["alice", "bob", "carol", "dave"];
        let mut walter = Client::connect(&node_a.ws_url("walter")).await;
        assert_eq!(walter.join(ROOM).await, ["walter"]);
        walter.expect_event(joined(ROOM, "walter")).await;
        assert_eq!(walter.watch(&watched).await, never_seen(&watched));

        let mut alice = Client::connect(&node_a.ws_url("alice")).await;
        alice.join(ROOM).await;
        let mut bob = Client::connect(&node_b.ws_url("bob")).await;
        bob.join(ROOM).await;
        let mut carol_a = Client::connect(&node_a.ws_url("carol")).await;
        let mut carol_b = Client::connect(&node_b.ws_url("carol")).await;
        carol_b.join(ROOM).await;
        let mut dave = Client::connect(&node_b.ws_url("dave")).await;
        dave.join(ROOM).await;

        let mut came_in: Vec<Matcher> = watched.iter().map(|user| online(user)).collect();
        came_in.extend(
            ["alice", "bob", "carol", "dave"]
                .iter()
                .map(|user| joined(ROOM, user)),
        );
        expect_exactly(&mut walter, came_in, EVENT_TIMEOUT).await;

        let (a, b) = (node_of(&walter), node_of(&bob));
        let nodes = [a.as_str(), b.as_str()];
        let survivors = vec![
            LiveTab::new(&a, "walter", &[ROOM]),
            LiveTab::new(&a, "alice", &[ROOM]),
            LiveTab::new(&b, "bob", &[ROOM]),
            LiveTab::new(&a, "carol", &[]),
            LiveTab::new(&b, "carol", &[ROOM]),
        ];
        let mut before = survivors.clone();
        before.push(LiveTab::new(&b, "dave", &[ROOM]));
        wait_for_live_truth(&redis, &nodes, &before).await;

        redis.kill();
        for node in [&node_a, &node_b] {
            let not_ready = wait_for_readiness(node, 503, READINESS_BOUND).await;
            assert_eq!(
                not_ready.error_code(),
                "not_ready",
                "{}",
                not_ready.body_text()
            );
            let health = http::get(node.addr, "/healthz").await;
            assert_eq!(health.status, 200, "/healthz does not depend on Redis");
        }
        for tab in [
            &mut walter,
            &mut alice,
            &mut bob,
            &mut carol_a,
            &mut carol_b,
            &mut dave,
        ] {
            tab.ping().await;
        }
        dave.close().await;

        redis.restart().await;
        let restarted = Instant::now();
        for node in [&node_a, &node_b] {
            let ready = wait_for_readiness(node, 200, READINESS_BOUND).await;
            assert_eq!(ready.json(), json!({"status": "ready"}));
        }
        let refill_took = wait_for_store(
            &redis,
            &StoreState::expected(&nodes, &survivors),
            REFILL_BOUND,
        )
        .await;
        eprintln!(
            "Redis back empty: ready again and refilled with the live truth {:?} after the \
             restart (store equal {refill_took:?} into polling)",
            restarted.elapsed()
        );

        let states = walter.query(&watched).await;
        let online_users: Vec<&str> = states
            .iter()
            .filter(|state| state.online)
            .map(|state| state.user.as_str())
            .collect();
        assert_eq!(
            online_users,
            ["alice", "bob", "carol"],
            "query answers the truth after the refill: {states:?}"
        );

        // walter may have seen offline/online pairs while the nodes wrote
        // their connections again; what counts is where his view ends.
        let mut view = View {
            online: watched
                .iter()
                .map(|user| (user.to_string(), true))
                .collect(),
            members: ["walter", "alice", "bob", "carol", "dave"]
                .iter()
                .map(|user| user.to_string())
                .collect(),
        };
        let truth = View {
            online: watched
                .iter()
                .map(|user| (user.to_string(), *user != "dave"))
                .collect(),
            members: ["walter", "alice", "bob", "carol"]
                .iter()
                .map(|user| user.to_string())
                .collect(),
        };
        view.settle(&mut walter, ROOM, &truth, EVENT_TIMEOUT).await;
        assert_store(&redis, &StoreState::expected(&nodes, &survivors)).await;
    })
    .await
}

// ---- helpers ---------------------------------------------------------------

/// The node a client's `welcome` names.
fn node_of(client: &Client) -> String {
    client.welcome()["node"]
        .as_str()
        .unwrap_or_else(|| panic!("welcome without a node id: {}", client.welcome()))
        .to_owned()
}

/// The watch reply for users a fresh Redis never saw.
fn never_seen(users: &[&str]) -> Vec<UserState> {
    users
        .iter()
        .map(|user| UserState::new(user, false, 0))
        .collect()
}

/// An `offline` event without its `last_seen`, which is a clock reading,
/// after checking it is one.
fn without_last_seen(mut event: Value) -> Value {
    let last_seen = event
        .as_object_mut()
        .and_then(|fields| fields.remove("last_seen"));
    assert!(
        last_seen.as_ref().is_some_and(Value::is_u64),
        "offline carries last_seen in Unix ms: {event} had {last_seen:?}"
    );
    event
}

/// Reads events until each of `expected` has matched one of them, in any
/// order. A presence or room event that matches none of those still
/// expected (a duplicate, a wrong reason) fails, and so does any of them
/// not arriving within `within`. Other frames are skipped.
async fn expect_exactly(client: &mut Client, mut expected: Vec<Matcher>, within: Duration) {
    let deadline = Instant::now() + within;
    let mut seen = 0;
    while !expected.is_empty() {
        let remaining = deadline.saturating_duration_since(Instant::now());
        let Some(frame) = client.try_next_json(remaining).await else {
            panic!(
                "{}: after {seen} expected events, {} did not arrive within {within:?}: {}",
                client.label(),
                expected.len(),
                describe(&expected)
            );
        };
        if !any_event().matches(&frame) {
            continue;
        }
        match expected.iter().position(|matcher| matcher.matches(&frame)) {
            Some(index) => {
                expected.swap_remove(index);
                seen += 1;
            }
            None => panic!(
                "{}: unexpected {frame} after {seen} expected events; still expecting {}",
                client.label(),
                describe(&expected)
            ),
        }
    }
}

fn describe(matchers: &[Matcher]) -> String {
    let described: Vec<String> = matchers.iter().map(ToString::to_string).collect();
    format!("[{}]", described.join(", "))
}

/// Follows `user`'s events at `watcher`, who saw `user` offline at seq 0:
/// each must flip the state and add exactly one to seq, and an `offline`
/// must say `closed`. Over once the user is offline, nothing more arrives,
/// and `query` agrees. Returns the number of transitions.
async fn follow_until_offline(watcher: &mut Client, user: &str) -> u64 {
    let (mut is_online, mut seq) = (false, 0);
    loop {
        let event = if is_online {
            watcher.next_event().await
        } else if let Some(event) = watcher.try_next_json(QUIET_WINDOW).await {
            event
        } else {
            let stored = watcher.query_one(user).await;
            if stored.seq == seq {
                assert_eq!(
                    stored,
                    UserState::new(user, false, seq),
                    "after every connection ended {user} is offline at the last event's seq"
                );
                return seq;
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
            event["type"] == expected_type && event["user"] == user,
            "after {seq} transitions expected {expected_type} of {user}, got {event}"
        );
        assert_eq!(
            event["seq"],
            seq + 1,
            "seq must grow by exactly one per transition: {event}"
        );
        if is_online {
            assert_eq!(
                event["reason"], "closed",
                "every tab was closed by its client: {event}"
            );
        }
        is_online = !is_online;
        seq += 1;
    }
}

/// Polls `GET /readyz` until it answers `status`, and returns that answer.
async fn wait_for_readiness(
    gateway: &Gateway,
    status: u16,
    within: Duration,
) -> http::HttpResponse {
    let deadline = Instant::now() + within;
    loop {
        let response = http::get(gateway.addr, "/readyz").await;
        if response.status == status {
            return response;
        }
        assert!(
            Instant::now() < deadline,
            "/readyz on {} did not answer {status} within {within:?}; last: {} {}",
            gateway.addr,
            response.status,
            response.body_text()
        );
        // A probe has no change signal to await.
        sleep(POLL_INTERVAL).await;
    }
}

/// What a client believes about its watched users and one room, from a
/// starting state and the events it received since.
#[derive(Debug, PartialEq, Eq)]
struct View {
    online: BTreeMap<String, bool>,
    members: BTreeSet<String>,
}

impl View {
    /// Applies `client`'s events in arrival order until the view equals
    /// `truth` and no event arrives for a quiet window; fails if that does
    /// not happen within `within`.
    async fn settle(&mut self, client: &mut Client, room: &str, truth: &View, within: Duration) {
        let deadline = Instant::now() + within;
        let mut applied = Vec::new();
        loop {
            match client.try_next_json(QUIET_WINDOW).await {
                Some(event) => {
                    self.apply(&event, room);
                    applied.push(event);
                }
                None if self == truth => return,
                None => {}
            }
            assert!(
                Instant::now() < deadline,
                "{}: view {self:?} is not the truth {truth:?} within {within:?}; events \
                 applied: {applied:?}",
                client.label()
            );
        }
    }

    fn apply(&mut self, event: &Value, room: &str) {
        let user = event["user"].as_str().unwrap_or_default().to_owned();
        match event["type"].as_str() {
            Some("online") => {
                self.online.insert(user, true);
            }
            Some("offline") => {
                self.online.insert(user, false);
            }
            Some("joined") if event["room"] == room => {
                self.members.insert(user);
            }
            Some("left") if event["room"] == room => {
                self.members.remove(&user);
            }
            // After missed events: the current state, replacing the view.
            Some("sync") if event["room"] == room => {
                self.members = event["members"]
                    .as_array()
                    .expect("a room sync lists members")
                    .iter()
                    .map(|m| m["user"].as_str().expect("member").to_owned())
                    .collect();
            }
            Some("sync") if event["users"].is_array() => {
                for state in event["users"].as_array().into_iter().flatten() {
                    let user = state["user"].as_str().expect("user").to_owned();
                    self.online
                        .insert(user, state["online"].as_bool().expect("online"));
                }
            }
            _ => {}
        }
    }
}

/// An open connection as the test holds it: its node, user and rooms.
#[derive(Debug, Clone)]
struct LiveTab {
    node: String,
    user: String,
    rooms: Vec<String>,
}

impl LiveTab {
    fn new(node: &str, user: &str, rooms: &[&str]) -> Self {
        Self {
            node: node.to_owned(),
            user: user.to_owned(),
            rooms: rooms.iter().map(|room| (*room).to_owned()).collect(),
        }
    }
}

/// Field → count, as the presence hashes hold it.
type Counts = BTreeMap<String, i64>;

/// What Redis says about live connections, key family by key family (see
/// docs/operations.md). Empty hashes do not exist in Redis, so none appear
/// here either.
#[derive(Debug, Default, PartialEq, Eq)]
struct StoreState {
    /// `P:users`: user → live connections cluster-wide.
    users: Counts,
    /// `P:connections` (absent reads as 0).
    connections: i64,
    /// Members of `P:nodes`: nodes holding a lease.
    nodes: BTreeSet<String>,
    /// `P:node:N:users`, by node.
    node_users: BTreeMap<String, Counts>,
    /// `P:node:N:rooms` ("room user" → count), by node.
    node_rooms: BTreeMap<String, Counts>,
    /// `P:room:R`, by room.
    rooms: BTreeMap<String, Counts>,
    /// `P:user:U:conns` records counted by the node they name: user → node →
    /// connections.
    conns: BTreeMap<String, Counts>,
}

/// A `P:user:U:conns` record (MessagePack, see docs/operations.md).
#[derive(serde::Deserialize)]
struct ConnRecord {
    node: String,
}

impl StoreState {
    /// The state `tabs` (every live connection) on `nodes` (every live
    /// node) call for.
    fn expected(nodes: &[&str], tabs: &[LiveTab]) -> Self {
        let mut state = StoreState {
            nodes: nodes.iter().map(|node| (*node).to_owned()).collect(),
            ..StoreState::default()
        };
        let bump = |counts: &mut Counts, field: &str| {
            *counts.entry(field.to_owned()).or_default() += 1;
        };
        for tab in tabs {
            state.connections += 1;
            bump(&mut state.users, &tab.user);
            bump(
                state.node_users.entry(tab.node.clone()).or_default(),
                &tab.user,
            );
            bump(state.conns.entry(tab.user.clone()).or_default(), &tab.node);
            for room in &tab.rooms {
                bump(state.rooms.entry(room.clone()).or_default(), &tab.user);
                bump(
                    state.node_rooms.entry(tab.node.clone()).or_default(),
                    &format!("{room} {}", tab.user),
                );
            }
        }
        state
    }

    /// Reads the state from `redis`, one key at a time: only meaningful
    /// once the gateways are quiet, or polled until it settles.
    async fn read(redis: &RedisServer) -> Self {
        let mut state = StoreState {
            users: redis.hgetall(&format!("{PREFIX}:users")).await,
            connections: redis
                .get_integer(&format!("{PREFIX}:connections"))
                .await
                .unwrap_or(0),
            nodes: redis.zset_members(&format!("{PREFIX}:nodes")).await,
            ..StoreState::default()
        };
        let node_prefix = format!("{PREFIX}:node:");
        for key in redis.keys(&format!("{node_prefix}*")).await {
            let counts = redis.hgetall(&key).await;
            let rest = &key[node_prefix.len()..];
            match rest.rsplit_once(':') {
                Some((node, "users")) => state.node_users.insert(node.to_owned(), counts),
                Some((node, "rooms")) => state.node_rooms.insert(node.to_owned(), counts),
                _ => panic!("unexpected node key {key:?}"),
            };
        }
        let room_prefix = format!("{PREFIX}:room:");
        for key in redis.keys(&format!("{room_prefix}*")).await {
            let counts = redis.hgetall(&key).await;
            state
                .rooms
                .insert(key[room_prefix.len()..].to_owned(), counts);
        }
        let user_prefix = format!("{PREFIX}:user:");
        for key in redis.keys(&format!("{user_prefix}*:conns")).await {
            let user = key[user_prefix.len()..key.len() - ":conns".len()].to_owned();
            let per_node = state.conns.entry(user).or_default();
            for record in redis.hgetall_packed::<ConnRecord>(&key).await.into_values() {
                *per_node.entry(record.node).or_default() += 1;
            }
        }
        state
    }
}

/// Polls Redis until it holds exactly `expected`; returns how long that
/// took. Fails with both states if it does not within `within`.
async fn wait_for_store(redis: &RedisServer, expected: &StoreState, within: Duration) -> Duration {
    let started = Instant::now();
    loop {
        let actual = StoreState::read(redis).await;
        if actual == *expected {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < within,
            "Redis did not come to hold the live truth within {within:?}\n\
             expected: {expected:#?}\nactual: {actual:#?}"
        );
        // Redis offers no change signal for these keys that a test could await.
        sleep(POLL_INTERVAL).await;
    }
}

/// Waits up to [`EVENT_TIMEOUT`] for Redis to hold exactly `tabs` (every
/// live connection) on `nodes` (every live node).
async fn wait_for_live_truth(redis: &RedisServer, nodes: &[&str], tabs: &[LiveTab]) {
    wait_for_store(redis, &StoreState::expected(nodes, tabs), EVENT_TIMEOUT).await;
}

/// Asserts Redis holds exactly `expected` now.
async fn assert_store(redis: &RedisServer, expected: &StoreState) {
    assert_eq!(
        StoreState::read(redis).await,
        *expected,
        "Redis holds the live truth"
    );
}
