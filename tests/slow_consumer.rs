//! Slow consumers: a tab that stops reading while the gateway has a lot to
//! send it fills the kernel buffers, then its outbox, and is cut off. Its
//! user goes offline and leaves its rooms; if the tab ever reads again it
//! finds close code 4008, or just the end of the connection. Nobody else
//! notices anything but that user going away, not even a tab that asks for
//! just as much but reads it.

mod support;

use futures_util::future::join_all;
use serde_json::{Value, json};
use support::{
    Backend, Client, EVENT_TIMEOUT, Matcher, SilentClient, UserState, joined, left, offline,
    on_both_stores, online, raw_ws::SilentEnd,
};

const OUTBOX_MESSAGES: usize = 64;
const OUTBOX_BYTES: usize = 512 * 1024;
/// The gateway hands a whole store batch to the outboxes before any writer
/// runs, so small batches keep each delivery within the outbox bound: the
/// outbox then only fills when the kernel buffers are full, that is when
/// the tab does not read.
const BATCH_MAX: usize = 8;

/// What Linux buffers on loopback for a peer that reads nothing: the
/// sender's buffer grows to `net.ipv4.tcp_wmem`'s 4 MiB maximum, plus the
/// receiver's 128 KiB.
const LOOPBACK_BUFFERING: usize = 4_400_000;

const ROOM: &str = "doc:big";

/// Members besides the bystander, the observer and the slow tab. With the
/// longest user ids, one snapshot of the room is about 42 KB.
const FILLERS: usize = 300;

/// Duplicate joins in a flood: each answers the whole snapshot again.
const DUPLICATE_JOINS: u64 = 400;

const SLOW: &str = "slow";
const BYSTANDER: &str = "bystander";
const OBSERVER: &str = "observer";

/// A 128-byte user id, the longest allowed, so that snapshots are big.
fn filler_id(index: usize) -> String {
    let prefix = format!("filler-{index:03}-");
    format!("{prefix}{}", "f".repeat(128 - prefix.len()))
}

fn duplicate_joins() -> Vec<Value> {
    (1..=DUPLICATE_JOINS)
        .map(|index| json!({"type": "join", "room": ROOM, "ref": format!("again-{index}")}))
        .collect()
}

/// The reply to the request with this `ref`.
fn reply_to(reference: &Value) -> Matcher {
    let reference = reference.clone();
    Matcher::new(format!("reply to ref {reference}"), move |frame| {
        frame["type"] == "reply" && frame["ref"] == reference
    })
}

fn member_ids(snapshot: &Value) -> Vec<&str> {
    snapshot["members"]
        .as_array()
        .unwrap_or_else(|| panic!("join reply without members: {}", snapshot["type"]))
        .iter()
        .map(|member| member["user"].as_str().expect("member user id"))
        .collect()
}

on_both_stores!(slow_consumer_is_cut_off_and_nobody_else_notices =>
    slow_consumer_is_cut_off_and_nobody_else_notices_memory,
    slow_consumer_is_cut_off_and_nobody_else_notices_redis);

async fn slow_consumer_is_cut_off_and_nobody_else_notices(backend: Backend) {
    let deployment = backend
        .start(&[
            "--outbox-messages",
            &OUTBOX_MESSAGES.to_string(),
            "--outbox-bytes",
            &OUTBOX_BYTES.to_string(),
            "--batch-max",
            &BATCH_MAX.to_string(),
            // The flood below is far over the default message rate; this
            // test is about the outbox, not the rate limit.
            "--rate-limit",
            "100000",
            "--rate-burst",
            "100000",
        ])
        .await;
    let gateway = &deployment.gateway;

    // The observer watches both users.
    let mut observer = Client::connect(&gateway.ws_url(OBSERVER)).await;
    observer.watch(&[BYSTANDER, SLOW]).await;

    // Fill the room, one join at a time so that every member gets one
    // joined event per delivery. Each member hears every later one join.
    let filler_ids: Vec<String> = (0..FILLERS).map(filler_id).collect();
    let filler_urls: Vec<String> = filler_ids.iter().map(|user| gateway.ws_url(user)).collect();
    let mut fillers = join_all(filler_urls.iter().map(|url| Client::connect(url))).await;
    for filler in &mut fillers {
        filler.join(ROOM).await;
    }
    for (index, filler) in fillers.iter_mut().enumerate() {
        for later in &filler_ids[index..] {
            assert_eq!(
                filler.next_event().await,
                json!({"type": "joined", "room": ROOM, "user": later})
            );
        }
    }

    // The bystander and the observer join too; the observer would see the
    // bystander go offline or leave.
    let mut bystander = Client::connect(&gateway.ws_url(BYSTANDER)).await;
    bystander.join(ROOM).await;
    bystander.expect_event(joined(ROOM, BYSTANDER)).await;
    observer.expect_event(online(BYSTANDER)).await;
    observer.join(ROOM).await;
    observer.expect_event(joined(ROOM, OBSERVER)).await;
    bystander.expect_event(joined(ROOM, OBSERVER)).await;

    // The slow tab joins the room and reads the answer, once.
    let mut slow = SilentClient::connect(gateway.addr, SLOW).await;
    slow.send_json(&json!({"type": "join", "room": ROOM, "ref": 0}))
        .await;
    let snapshot = slow.next_json(EVENT_TIMEOUT).await;
    assert_eq!(member_ids(&snapshot).len(), FILLERS + 3, "the room is full");
    observer.expect_event(online(SLOW)).await;
    observer.expect_event(joined(ROOM, SLOW)).await;
    bystander.expect_event(joined(ROOM, SLOW)).await;
    let snapshot_bytes = snapshot.to_string().len();
    assert!(
        BATCH_MAX * snapshot_bytes < OUTBOX_BYTES,
        "a batch of {BATCH_MAX} snapshots of {snapshot_bytes} bytes must fit in the outbox"
    );
    assert!(
        DUPLICATE_JOINS as usize * snapshot_bytes > 3 * (LOOPBACK_BUFFERING + OUTBOX_BYTES),
        "a flood of {DUPLICATE_JOINS} snapshots of {snapshot_bytes} bytes must be well over \
         what the kernel buffers and the outbox hold"
    );

    // From here the slow tab reads nothing, yet asks for the snapshot again
    // and again.
    slow.send_json_burst(&duplicate_joins()).await;

    let went_offline = observer.expect_event(offline(SLOW)).await;
    assert_eq!(went_offline["seq"], 2, "{went_offline}");
    observer.expect_event(left(ROOM, SLOW)).await;
    bystander.expect_event(left(ROOM, SLOW)).await;
    for filler in &mut fillers {
        filler.expect_event(left(ROOM, SLOW)).await;
    }

    // Reading at last, the slow tab finds its connection ended by the
    // server: with 4008 if the close frame got through in the close grace.
    match slow.wait_for_end(EVENT_TIMEOUT).await {
        SilentEnd::CloseCode(code) => {
            assert_eq!(code, 4008, "a slow consumer is closed with 4008");
            let how = slow.wait_for_disconnect(EVENT_TIMEOUT).await;
            eprintln!("the slow tab read a 4008 close frame, then {how}");
        }
        SilentEnd::NoCloseFrame(how) => {
            eprintln!("the slow tab read no close frame: {how}")
        }
        SilentEnd::CloseWithoutCode => {
            panic!("a slow consumer is closed with 4008, not with a close frame without a code")
        }
    }

    // The bystander asks for just as much, but reads as it goes: at most
    // one batch of requests in flight, whose answers fit in its outbox
    // however fast or slow this test process parses them. It is not cut
    // off.
    let mut expected_members: Vec<&str> = filler_ids.iter().map(String::as_str).collect();
    expected_members.extend([BYSTANDER, OBSERVER]);
    expected_members.sort_unstable();
    for window in duplicate_joins().chunks(BATCH_MAX) {
        for join in window {
            bystander.send_json(join.clone()).await;
        }
        for join in window {
            let reply = bystander.expect_event(reply_to(&join["ref"])).await;
            assert_eq!(
                member_ids(&reply),
                expected_members,
                "everyone but the slow user is in the room"
            );
        }
    }

    // Nobody else moved.
    let bystander_moved = || offline(BYSTANDER).or(left(ROOM, BYSTANDER));
    observer.expect_no_event(bystander_moved()).await;
    bystander.ping().await;
    assert_eq!(bystander.join("doc:after").await, [BYSTANDER]);
    for filler in &mut fillers {
        filler.ping().await;
    }
    assert_eq!(
        observer.query(&[BYSTANDER, SLOW]).await,
        [
            UserState::new(BYSTANDER, true, 1),
            UserState::new(SLOW, false, 2)
        ]
    );
}

/// A store batch reaches the outboxes before any writer runs, so a tab that
/// reads everything can still find a burst over its bound queued for a
/// moment. That is not a slow consumer: it drains in time and stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reading_tab_survives_a_burst_over_its_outbox_bound() {
    const SMALL_OUTBOX_BYTES: usize = 64 * 1024;
    const MEMBERS: usize = 60;
    const BURST: usize = 25;
    let deployment = Backend::Memory
        .start(&["--outbox-bytes", &SMALL_OUTBOX_BYTES.to_string()])
        .await;
    let gateway = &deployment.gateway;
    let ids: Vec<String> = (0..MEMBERS).map(filler_id).collect();
    let urls: Vec<String> = ids.iter().map(|user| gateway.ws_url(user)).collect();
    let mut members = join_all(urls.iter().map(|url| Client::connect(url))).await;
    for member in &mut members {
        member.join(ROOM).await;
    }

    let mut reader = Client::connect(&gateway.ws_url(BYSTANDER)).await;
    let snapshot = reader
        .request_ok(json!({"type": "join", "room": ROOM, "ref": "first"}))
        .await;
    let snapshot_bytes = snapshot.to_string().len();
    assert!(
        BURST * snapshot_bytes > 3 * SMALL_OUTBOX_BYTES,
        "the burst ({BURST} × {snapshot_bytes} bytes) must be well over the outbox bound \
         even if it is split over a few batches"
    );
    let references: Vec<Value> = (0..BURST).map(|i| json!(format!("burst-{i}"))).collect();
    for reference in &references {
        reader
            .send_json(json!({"type": "join", "room": ROOM, "ref": reference}))
            .await;
    }
    for reference in &references {
        let reply = reader.expect_event(reply_to(reference)).await;
        assert_eq!(member_ids(&reply).len(), MEMBERS + 1);
    }
    reader.ping().await;
}

/// The issue's case: a member that never reads while *others* make its
/// room busy. A burst of joined/left events far over what the kernel and
/// its outbox hold cuts it off with 4008; a member that reads receives
/// every event of the burst, in order, and stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_member_of_a_busy_room_is_cut_off_and_a_reading_one_gets_everything() {
    /// Members that leave and re-join, each `TOGGLES` times.
    const CHURNERS: usize = 4;
    const TOGGLES: usize = 4608;
    /// Requests a churner has in flight at once.
    const WINDOW: usize = 32;
    let room = format!("busy/{}", "r".repeat(195));
    let deployment = Backend::Memory
        .start(&[
            "--outbox-messages",
            "64",
            "--outbox-bytes",
            "65536",
            "--batch-max",
            "32",
            // The churners send thousands of requests; the rate limit is
            // not what this test is about.
            "--rate-limit",
            "1000000",
            "--rate-burst",
            "1000000",
        ])
        .await;
    let gateway = &deployment.gateway;
    let churner_ids: Vec<String> = (0..CHURNERS).map(filler_id).collect();
    let reader_id = format!("reader-{}", "x".repeat(120));

    let mut observer = Client::connect(&gateway.ws_url(OBSERVER)).await;
    observer.watch(&[SLOW, &reader_id]).await;
    let mut reader = Client::connect(&gateway.ws_url(&reader_id)).await;
    reader.join(&room).await;
    reader.expect_event(joined(&room, &reader_id)).await;
    let churner_urls: Vec<String> = churner_ids.iter().map(|u| gateway.ws_url(u)).collect();
    let mut churners = join_all(churner_urls.iter().map(|url| Client::connect(url))).await;
    for (churner, id) in churners.iter_mut().zip(&churner_ids) {
        churner.join(&room).await;
        reader.expect_event(joined(&room, id)).await;
    }
    let mut slow = SilentClient::connect(gateway.addr, SLOW).await;
    slow.send_json(&json!({"type": "join", "room": room, "ref": 0}))
        .await;
    slow.next_json(EVENT_TIMEOUT).await;
    reader.expect_event(joined(&room, SLOW)).await;
    observer.expect_event(online(SLOW)).await;

    // 36,864 events of ~370 bytes: about three times what the kernel
    // buffers (~4.4 MB) and the outbox hold for the silent member.
    let churn = churners.iter_mut().map(|churner| {
        let room = room.clone();
        async move {
            for window in 0..(2 * TOGGLES / WINDOW) {
                let mut last = Value::Null;
                for i in 0..WINDOW {
                    let kind = if (window * WINDOW + i).is_multiple_of(2) {
                        "leave"
                    } else {
                        "join"
                    };
                    last = churner.fresh_ref();
                    churner
                        .send_json(json!({"type": kind, "room": room, "ref": last}))
                        .await;
                }
                churner.expect_event(reply_to(&last)).await;
                churner.forget_pending();
            }
        }
    });
    let read_all = async {
        let mut seen: std::collections::HashMap<String, Vec<String>> = Default::default();
        let expected = CHURNERS * 2 * TOGGLES + 1;
        let mut got = 0;
        while got < expected {
            let frame = reader.next_json(EVENT_TIMEOUT).await;
            if frame["room"] != json!(room) {
                continue;
            }
            let user = frame["user"].as_str().expect("user").to_owned();
            let kind = frame["type"].as_str().expect("type").to_owned();
            seen.entry(user).or_default().push(kind);
            got += 1;
        }
        seen
    };
    let (_, seen) = tokio::join!(join_all(churn), read_all);

    let toggled: Vec<String> = ["left", "joined"]
        .iter()
        .cycle()
        .take(2 * TOGGLES)
        .map(|k| (*k).to_owned())
        .collect();
    for id in &churner_ids {
        assert!(
            seen.get(id) == Some(&toggled),
            "the reading member got every left/joined of {id}, in order"
        );
    }
    assert_eq!(
        seen.get(SLOW).map(Vec::as_slice),
        Some(&["left".to_owned()][..])
    );
    let gone = observer.expect_event(offline(SLOW)).await;
    assert_eq!(gone["seq"], 2, "{gone}");
    match slow.wait_for_end(EVENT_TIMEOUT).await {
        SilentEnd::CloseCode(code) => assert_eq!(code, 4008, "a slow consumer is closed with 4008"),
        SilentEnd::NoCloseFrame(how) => eprintln!("the silent member read no close frame: {how}"),
        SilentEnd::CloseWithoutCode => panic!("a slow consumer is closed with 4008"),
    }
    // The reading member is still there and nobody else moved.
    observer
        .expect_no_event_within(offline(&reader_id), support::QUIET_WINDOW)
        .await;
    reader.ping().await;
    assert_eq!(
        observer.query(&[&reader_id]).await,
        [UserState::new(&reader_id, true, 1)]
    );
}

/// A slow consumer whose close frame can be written: it is cut off while
/// it still sends (what it sends after that is unread when the gateway
/// closes), then reads everything queued for it. Its small receive buffer
/// keeps most of that in the gateway's send buffer, behind which the 4008
/// waits; closing the socket with the client's frames unread would reset
/// the connection and destroy all of it. The 4008 arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_consumer_that_reads_again_in_time_gets_its_4008() {
    /// Members, each with metadata of `META_BYTES`: a snapshot of about
    /// 200 KB, under the 256 KiB the gateway writes as one frame.
    const MEMBERS: usize = 4;
    const META_BYTES: usize = 50_000;
    const SMALL_OUTBOX_BYTES: usize = 64 * 1024;
    const JOINS: u64 = 60;
    const SMALL_RECEIVE_BUFFER: u32 = 8 * 1024;
    let deployment = Backend::Memory
        .start(&[
            "--max-meta-bytes",
            "60000",
            "--outbox-bytes",
            &SMALL_OUTBOX_BYTES.to_string(),
            // One reply per batch: the outbox only grows, and the tab is
            // only cut off, once the socket takes no more.
            "--batch-max",
            "1",
            "--rate-limit",
            "100000",
            "--rate-burst",
            "100000",
        ])
        .await;
    let gateway = &deployment.gateway;
    let mut observer = Client::connect(&gateway.ws_url(OBSERVER)).await;
    observer.watch(&[SLOW]).await;
    let ids: Vec<String> = (0..MEMBERS).map(filler_id).collect();
    let urls: Vec<String> = ids.iter().map(|user| gateway.ws_url(user)).collect();
    let mut members = join_all(urls.iter().map(|url| Client::connect(url))).await;
    for member in &mut members {
        let meta = json!({"blob": "m".repeat(META_BYTES)});
        member
            .ask_ok(json!({"type": "join", "room": ROOM, "meta": meta}))
            .await;
    }

    let mut slow =
        SilentClient::connect_with_receive_buffer(gateway.addr, SLOW, Some(SMALL_RECEIVE_BUFFER))
            .await;
    slow.send_json(&json!({"type": "join", "room": ROOM, "ref": 0}))
        .await;
    let snapshot = slow.next_json(EVENT_TIMEOUT).await;
    assert_eq!(member_ids(&snapshot).len(), MEMBERS + 1);
    observer.expect_event(online(SLOW)).await;
    let snapshot_bytes = snapshot.to_string().len();
    assert!(
        JOINS as usize * snapshot_bytes > 2 * (LOOPBACK_BUFFERING + 4 * SMALL_OUTBOX_BYTES),
        "{JOINS} snapshots of {snapshot_bytes} bytes must be well over what the kernel \
         buffers and the outbox hold"
    );
    let joins: Vec<Value> = (1..=JOINS)
        .map(|index| json!({"type": "join", "room": ROOM, "ref": index}))
        .collect();
    slow.send_json_burst(&joins).await;
    observer.expect_event(offline(SLOW)).await;

    // Cut off, the tab goes on sending, then reads at last.
    let pings: Vec<Value> = (0..1000)
        .map(|i| json!({"type": "ping", "ref": i}))
        .collect();
    slow.send_json_burst(&pings).await;
    assert_eq!(
        slow.wait_for_end(EVENT_TIMEOUT).await,
        SilentEnd::CloseCode(4008),
        "the slow consumer reads its close code"
    );
    slow.wait_for_disconnect(EVENT_TIMEOUT).await;
    assert_eq!(
        gateway
            .metric("presenced_connections_closed_total{reason=\"slow_consumer\"}")
            .await,
        1.0
    );
}
