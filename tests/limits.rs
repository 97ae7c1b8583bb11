//! Every bound a client can run into, each with its outcome on the wire:
//! the message rate (`rate_limited`, then close 4029), rooms and watched
//! users per connection (`limit_exceeded`), connections per user and per
//! node (429 / 503 before the upgrade), stalled handshakes (closed after
//! `--handshake-timeout-ms`, never blocking anyone), request heads (431
//! past `--max-request-head-bytes`), and the log lines a flood of refused
//! handshakes may cause. A bystander checks each time that nobody else's
//! presence moved.

mod support;

use std::time::Duration;

use futures_util::future::join_all;
use serde_json::{Value, json};
use support::{
    Client, EVENT_TIMEOUT, Gateway, QUIET_WINDOW, UserState,
    http::{self, Connection, HttpResponse, SAMPLE_WEBSOCKET_KEY},
    offline, online, within_scenario_timeout,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    time::{Instant, timeout_at},
};

#[tokio::test]
async fn a_flood_is_refused_then_closed_with_4029() {
    within_scenario_timeout(async {
        let gateway = Gateway::memory(&["--rate-limit", "5", "--rate-burst", "10"]).await;
        let mut bystander = Client::connect(&gateway.ws_url("bystander")).await;
        bystander.watch(&["flooder", "calm"]).await;
        let mut calm = Client::connect(&gateway.ws_url("calm")).await;
        bystander.expect_event(online("calm")).await;
        let mut flooder = Client::connect(&gateway.ws_url("flooder")).await;
        bystander.expect_event(online("flooder")).await;

        // The burst passes; past it each ping is refused, with its ref.
        // Exactly enough to be closed: 10 pass (the burst), 10 are refused
        // (a burst of refusals is tolerated), the 21st closes. One write, so
        // the bucket cannot refill in between and the counts are exact (a
        // longer flood gets its 4029 too: tests/lingering_close.rs).
        let flood: Vec<Value> = (0..21).map(|i| json!({"type": "ping", "ref": i})).collect();
        flooder.send_json_burst(&flood).await;
        let (frames, code) = flooder.frames_until_close(EVENT_TIMEOUT).await;
        let pongs = frames.iter().filter(|f| f["type"] == "pong").count();
        let refused: Vec<&Value> = frames
            .iter()
            .filter(|f| f["code"] == "rate_limited")
            .map(|f| &f["ref"])
            .collect();
        assert_eq!(
            pongs + refused.len(),
            frames.len(),
            "only pongs and refusals: {frames:?}"
        );
        assert_eq!(
            code,
            Some(4029),
            "a client that keeps flooding is closed with 4029"
        );
        assert!(
            (10..=12).contains(&pongs),
            "the burst of 10 passes: {pongs} pongs"
        );
        assert!(
            refused.len() == 10 && refused.iter().all(|r| r.is_number()),
            "refusals carry the dropped message's ref: {refused:?}"
        );
        let gone = bystander.expect_event(offline("flooder")).await;
        assert_eq!(gone["reason"], "closed");

        // Nobody else moved, and a client within the rate is untouched.
        for _ in 0..5 {
            calm.ping().await;
        }
        bystander
            .expect_no_event_within(offline("calm"), QUIET_WINDOW)
            .await;
        assert_eq!(
            bystander.query_one("calm").await,
            UserState::new("calm", true, 1)
        );
        assert_eq!(
            gateway
                .metric("presenced_connections_closed_total{reason=\"rate_limited\"}")
                .await,
            1.0
        );
        assert_eq!(
            gateway
                .metric("presenced_errors_sent_total{code=\"rate_limited\"}")
                .await,
            10.0
        );
    })
    .await
}

#[tokio::test]
async fn rooms_and_watched_users_per_connection_are_bounded() {
    within_scenario_timeout(async {
        let gateway = Gateway::memory(&["--max-rooms", "3", "--max-watch", "3"]).await;
        let mut bystander = Client::connect(&gateway.ws_url("bystander")).await;
        bystander.join("r4").await;
        let mut tab = Client::connect(&gateway.ws_url("tab")).await;
        for room in ["r1", "r2", "r3"] {
            tab.join(room).await;
        }
        let answer = tab.ask(json!({"type": "join", "room": "r4"})).await;
        assert_eq!(answer["code"], "limit_exceeded", "{answer}");
        // Nothing was written: r4 still has one member.
        let page = bystander.ask(json!({"type": "room", "room": "r4"})).await;
        assert_eq!(page["users"], json!(["bystander"]));
        // Joining a room it is in is not a new room; leaving frees a place.
        tab.join("r1").await;
        tab.leave("r2").await;
        assert_eq!(tab.join("r4").await, ["bystander", "tab"]);

        tab.watch(&["a", "b"]).await;
        let answer = tab.ask(json!({"type": "watch", "users": ["c", "d"]})).await;
        assert_eq!(answer["code"], "limit_exceeded", "{answer}");
        tab.watch(&["b", "c"]).await;
        tab.unwatch(&["a"]).await;
        tab.watch(&["d"]).await;
        // What it watches works; what was refused is not watched.
        let d = Client::connect(&gateway.ws_url("d")).await;
        tab.expect_event(online("d")).await;
        drop(d);
        let a = Client::connect(&gateway.ws_url("a")).await;
        tab.expect_no_event_within(online("a"), QUIET_WINDOW).await;
        drop(a);
    })
    .await
}

#[tokio::test]
async fn connections_per_user_and_per_node_are_bounded_before_the_upgrade() {
    within_scenario_timeout(async {
        let gateway =
            Gateway::memory(&["--max-conns-per-user", "2", "--max-connections", "4"]).await;
        let mut bystander = Client::connect(&gateway.ws_url("bystander")).await;
        bystander.watch(&["alice", "bob"]).await;
        let first = Client::connect(&gateway.ws_url("alice")).await;
        let _second = Client::connect(&gateway.ws_url("alice")).await;
        bystander.expect_event(online("alice")).await;
        let response = http::websocket_upgrade(gateway.addr, "/ws?user=alice", &[]).await;
        assert_eq!(
            (response.status, response.error_code().as_str()),
            (429, "too_many_connections")
        );
        let _bob = Client::connect(&gateway.ws_url("bob")).await;
        bystander.expect_event(online("bob")).await;
        // Four connections: the node is full, for any user.
        let response = http::websocket_upgrade(gateway.addr, "/ws?user=carol", &[]).await;
        assert_eq!(
            (response.status, response.error_code().as_str()),
            (503, "node_full")
        );
        // A closed connection gives its place back.
        first.close().await;
        let deadline = Instant::now() + EVENT_TIMEOUT;
        loop {
            let response = http::websocket_upgrade(gateway.addr, "/ws?user=carol", &[]).await;
            if response.status == 101 {
                break;
            }
            assert_eq!(response.error_code(), "node_full");
            assert!(
                Instant::now() < deadline,
                "the closed connection's place never came back"
            );
            tokio::task::yield_now().await;
        }
        bystander
            .expect_no_event_within(offline("alice").or(offline("bob")), QUIET_WINDOW)
            .await;
        assert_eq!(
            gateway
                .metric("presenced_handshakes_refused_total{code=\"too_many_connections\"}")
                .await,
            1.0
        );
        assert!(
            gateway
                .metric("presenced_handshakes_refused_total{code=\"node_full\"}")
                .await
                >= 1.0
        );
    })
    .await
}

/// Slowloris: a thousand connections that send half a request head and
/// stall. Meanwhile new clients connect and work as usual; after the
/// handshake timeout the gateway has closed every stalled one.
#[tokio::test]
async fn stalled_handshakes_do_not_block_anyone_and_are_closed() {
    const STALLED: usize = 1000;
    within_scenario_timeout(async {
        let gateway = Gateway::memory(&["--handshake-timeout-ms", "2000"]).await;
        let mut bystander = Client::connect(&gateway.ws_url("bystander")).await;
        bystander.watch(&["newcomer"]).await;

        let stalled = join_all((0..STALLED).map(|_| async {
            let mut socket = TcpStream::connect(gateway.addr).await.expect("connect");
            socket
                .write_all(b"GET /ws?user=slow HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n")
                .await
                .expect("write half a head");
            socket
        }))
        .await;

        // While they stall, a new client connects and is served.
        let mut newcomer = Client::connect(&gateway.ws_url("newcomer")).await;
        bystander.expect_event(online("newcomer")).await;
        newcomer.ping().await;
        bystander.ping().await;

        // Each stalled socket is closed by the gateway (EOF), none answered.
        let deadline = Instant::now() + Duration::from_secs(30);
        let ends = join_all(stalled.into_iter().map(|mut socket| async move {
            let mut buf = [0u8; 256];
            match timeout_at(deadline, socket.read(&mut buf)).await {
                Ok(Ok(0) | Err(_)) => Ok(()),
                Ok(Ok(n)) => Err(format!(
                    "got {n} bytes: {:?}",
                    String::from_utf8_lossy(&buf[..n])
                )),
                Err(_) => Err("still open".to_owned()),
            }
        }))
        .await;
        let open: Vec<&String> = ends.iter().filter_map(|e| e.as_ref().err()).collect();
        assert!(
            open.is_empty(),
            "{} stalled sockets not closed, e.g. {:?}",
            open.len(),
            open.first()
        );
        assert!(
            gateway.metric("presenced_handshake_timeouts_total").await >= STALLED as f64,
            "every stalled handshake timed out"
        );
        assert_eq!(
            bystander.query_one("slow").await,
            UserState::new("slow", false, 0)
        );
        newcomer.ping().await;
    })
    .await
}

/// A `GET /healthz` head of exactly `len` bytes, padded by a header.
fn healthz_head(len: usize) -> Vec<u8> {
    let (start, end) = ("GET /healthz HTTP/1.1\r\nHost: x\r\nX-Pad: ", "\r\n\r\n");
    let pad = "p".repeat(len - start.len() - end.len());
    format!("{start}{pad}{end}").into_bytes()
}

fn assert_head_too_large(response: &HttpResponse) {
    assert_eq!(
        (response.status, response.error_code().as_str()),
        (431, "request_header_too_large"),
        "{}",
        response.body_text()
    );
}

/// A head is served up to exactly `--max-request-head-bytes`; a longer one,
/// finished or endless, first or after others on a kept-alive connection,
/// gets the JSON 431 as soon as the bound is read and the connection is
/// closed. Nobody else notices.
#[tokio::test]
async fn request_heads_over_the_bound_get_a_json_431_and_are_closed() {
    const CAP: usize = 4096;
    within_scenario_timeout(async {
        let gateway = Gateway::memory(&["--max-request-head-bytes", "4096"]).await;
        let mut bystander = Client::connect(&gateway.ws_url("bystander")).await;
        bystander.watch(&["newcomer"]).await;

        let mut kept = Connection::open(gateway.addr).await;
        let served = kept.request(&healthz_head(CAP)).await;
        assert_eq!(
            (served.status, served.body_text().as_str()),
            (200, r#"{"status":"ok"}"#)
        );
        assert_head_too_large(&kept.request(&healthz_head(CAP + 1)).await);
        kept.expect_closed().await;

        // An endless head is answered once the bound is read, long before
        // the handshake timeout (10 s).
        let mut endless = Connection::open(gateway.addr).await;
        endless
            .send(b"GET /ws?user=endless HTTP/1.1\r\nUpgrade: websocket\r\nX-Pad: ")
            .await;
        endless.send(&[b'a'; 4 * CAP]).await;
        assert_head_too_large(&endless.response().await);
        endless.expect_closed().await;

        // After a request with a body, the next head is counted from its
        // first byte, not from the body's.
        let mut api = Connection::open(gateway.addr).await;
        let body = format!(r#"{{"users":["bystander"],"pad":"{}"}}"#, "b".repeat(CAP));
        let answer = api
            .request(
                format!(
                    "POST /v1/presence HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                )
                .as_bytes(),
            )
            .await;
        assert_eq!(answer.status, 200, "{}", answer.body_text());
        assert_eq!(api.request(&healthz_head(CAP)).await.status, 200);
        assert_head_too_large(&api.request(&healthz_head(CAP + 1)).await);
        api.expect_closed().await;

        // Past a chunked body, which it does not follow, hyper's own bound
        // (the same size) answers: its 431 has no body, and is counted too.
        let mut chunked = Connection::open(gateway.addr).await;
        let answer = chunked
            .request(
                b"POST /v1/presence HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n\
                  14\r\n{\"users\":[\"nobody\"]}\r\n0\r\n\r\n",
            )
            .await;
        assert_eq!(answer.status, 200, "{}", answer.body_text());
        let bare = chunked.request(&healthz_head(CAP + 1)).await;
        assert_eq!((bare.status, bare.body.len()), (431, 0));
        chunked.expect_closed().await;

        // A handshake within the bound is upgraded as usual.
        let pad = "p".repeat(CAP - 400);
        let upgraded =
            http::websocket_upgrade(gateway.addr, "/ws?user=padded", &[("X-Pad", &pad)]).await;
        assert_eq!(upgraded.status, 101);

        let mut newcomer = Client::connect(&gateway.ws_url("newcomer")).await;
        bystander.expect_event(online("newcomer")).await;
        newcomer.ping().await;
        bystander.ping().await;
        assert_eq!(
            gateway
                .metric("presenced_handshakes_refused_total{code=\"request_header_too_large\"}")
                .await,
            4.0
        );
    })
    .await
}

/// 10,000 handshakes with a bad token, on 200 kept-alive connections: the
/// metric counts every one, the log holds a few lines a second and
/// summaries that account for all the others, up to the node's stop.
#[tokio::test]
async fn a_flood_of_refused_handshakes_is_counted_exactly_and_logged_sparingly() {
    const CONNECTIONS: usize = 200;
    const PER_CONNECTION: usize = 50;
    const REFUSED: usize = CONNECTIONS * PER_CONNECTION;
    within_scenario_timeout(async {
        let mut gateway = Gateway::start(&[
            "--jwt-secret",
            "flood-test-secret",
            "--log-summary-ms",
            "200",
        ])
        .await;
        let handshake = format!(
            "GET /ws?token=not.a.token HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\
             Connection: Upgrade\r\nSec-WebSocket-Key: {SAMPLE_WEBSOCKET_KEY}\r\n\
             Sec-WebSocket-Version: 13\r\n\r\n"
        );
        let started = Instant::now();
        join_all((0..CONNECTIONS).map(|_| async {
            let mut connection = Connection::open(gateway.addr).await;
            for _ in 0..PER_CONNECTION {
                let response = connection.request(handshake.as_bytes()).await;
                assert_eq!(response.error_code(), "invalid_token");
            }
        }))
        .await;
        let flood = started.elapsed();
        assert_eq!(
            gateway
                .metric("presenced_handshakes_refused_total{code=\"invalid_token\"}")
                .await,
            REFUSED as f64
        );

        // Lines logged one by one, and the counts of the others.
        let tally = |stderr: &str| {
            let lines = stderr.lines().filter(|l| l.contains("invalid_token"));
            lines.fold((0, 0), |(logged, held_back), line| {
                if line.contains("handshake refused") {
                    (logged + 1, held_back)
                } else {
                    let count = line
                        .split_once(" handshakes refused with invalid_token in the last ")
                        .and_then(|(start, _)| start.rsplit(' ').next()?.parse::<usize>().ok());
                    (logged, held_back + count.unwrap_or(0))
                }
            })
        };
        let stderr = gateway
            .wait_for_stderr(EVENT_TIMEOUT, |stderr| {
                let (logged, held_back) = tally(stderr);
                logged + held_back >= REFUSED
            })
            .await;
        let (logged, held_back) = tally(&stderr);
        assert_eq!(
            logged + held_back,
            REFUSED,
            "each refusal is logged or counted once"
        );
        // The bucket: a burst of 5, then 5 a second while the flood lasts.
        let bound = 5 + 5 * (flood.as_secs() as usize + 1);
        assert!(
            logged <= bound,
            "{logged} lines for a flood of {flood:?} (at most {bound})"
        );
        assert!(
            stderr.contains("(not logged one by one)"),
            "a summary line:\n{stderr}"
        );

        // What is held back when the node stops is in its last summary.
        let mut connection = Connection::open(gateway.addr).await;
        for _ in 0..100 {
            connection.request(handshake.as_bytes()).await;
        }
        drop(connection);
        assert!(gateway.terminate().await.success());
        let stderr = gateway
            .wait_for_stderr(EVENT_TIMEOUT, |stderr| stderr.contains("stopped"))
            .await;
        let (logged, held_back) = tally(&stderr);
        assert_eq!(logged + held_back, REFUSED + 100);
    })
    .await
}
