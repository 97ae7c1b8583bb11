//! An observer: one connection that watches every user of the run and joins
//! every room, and checks each event against the protocol's promises.
//!
//! Presence events carry `seq`, one per transition of a user, so an observer
//! knows exactly what it missed (a gap), saw twice (the same `seq`) or saw
//! out of order (a lower `seq`, or an `online` where the alternation says
//! `offline`). Room events have no `seq`: the observer keeps them in arrival
//! order, and once the run is over the coordinator checks them exactly
//! against each user's true transitions ([`crate::truth::check_window`]).
//! A reader task stamps each frame on arrival, so a busy checker does not
//! bias the latencies.
//!
//! A request the gateway refuses ends the run with a message that names
//! the limit (`--max-watch`, `--max-rooms`, ...), except `rate_limited`,
//! which is counted and retried after a pause.

use std::{
    collections::HashSet,
    sync::{Arc, atomic::Ordering::Relaxed},
    time::{Duration, Instant},
};

use futures_util::{SinkExt, StreamExt, stream::SplitSink};
use serde::Serialize;
use serde_json::{Value, json};
use tokio::{
    sync::{mpsc, watch},
    time::{sleep, timeout_at},
};
use tokio_tungstenite::tungstenite::Message;

use crate::{
    clock::Stamp,
    stats::Shared,
    target::Target,
    truth::EventChecks,
    ws::{STEP_TIMEOUT, Ws, open_ws},
};

/// The gateway's default `--max-ids`: most users in one `watch` or `query`.
pub const MAX_IDS: usize = 1000;
/// Most members in one `room` page.
const MAX_PAGE: usize = 1000;
/// Pause after a `rate_limited` refusal: the gateway's bucket refills at
/// `--rate-limit` messages a second.
const RATE_LIMITED_PAUSE: Duration = Duration::from_secs(1);
/// Most retries of one refused request.
const RATE_LIMITED_RETRIES: usize = 30;

/// What an observer believes about one user.
#[derive(Debug, Default, Clone, Copy)]
struct View {
    online: bool,
    seq: u64,
    in_room: bool,
}

/// A received event, kept to check it and compute its latency against the
/// truth once the run is over.
#[derive(Debug, Clone, Copy)]
pub struct Seen {
    /// Index of the user.
    pub user: usize,
    /// `true` for `online` / `joined`.
    pub to: bool,
    /// `true` for `joined` / `left`.
    pub room: bool,
    /// The presence event's `seq` (0 for room events).
    pub seq: u64,
    /// When the frame arrived.
    pub at: Stamp,
}

/// One observing connection.
pub struct Observer {
    /// Its name (user id).
    pub name: String,
    /// Index of the target it is connected to.
    pub target: u16,
    sink: SplitSink<Ws, Message>,
    frames: mpsc::UnboundedReceiver<(Stamp, Value)>,
    next_ref: u64,
    user_prefix: String,
    views: Vec<View>,
    /// Presence checks so far.
    pub presence: EventChecks,
    /// Frames that are neither replies nor events about users of the run.
    pub unexpected: u64,
    /// `sync` frames (the node resubscribed; views were replaced).
    pub syncs: u64,
    /// Every event received, in order.
    pub seen: Vec<Seen>,
    shared: Arc<Shared>,
}

/// What the final comparison with the gateway found.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Comparison {
    /// When the comparison ran (`held` or `closed`).
    pub phase: String,
    /// Whether every observer's view matched the truth before the deadline.
    pub observers_settled: bool,
    /// Users whose `query` answer (online) differs from the truth.
    pub presence_mismatches: u64,
    /// Room members missing or extra in the gateway's `room` pages.
    pub room_mismatches: u64,
    /// Users online, as the truth has it.
    pub users_online: u64,
}

impl Observer {
    /// Connects as `name` to `target` (number `index`); events are about
    /// users named `{user_prefix}{index}`, `users` of them.
    pub async fn connect(
        (target, index): (&Target, u16),
        name: &str,
        user_prefix: &str,
        users: usize,
        shared: Arc<Shared>,
    ) -> anyhow::Result<Self> {
        let ws = open_ws(&target.tab_url(name), None)
            .await
            .map_err(|kind| anyhow::anyhow!("observer {name} on {}: {kind}", target.ws))?;
        let (sink, mut stream) = ws.split();
        let (tx, frames) = mpsc::unbounded_channel();
        let clock = shared.clock;
        tokio::spawn(async move {
            while let Some(Ok(message)) = stream.next().await {
                if let Message::Text(t) = message {
                    let at = clock.now();
                    let frame = serde_json::from_str(&t).unwrap_or(Value::Null);
                    if tx.send((at, frame)).is_err() {
                        break;
                    }
                }
            }
        });
        Ok(Self {
            name: name.to_owned(),
            target: index,
            sink,
            frames,
            next_ref: 0,
            user_prefix: user_prefix.to_owned(),
            views: vec![View::default(); users],
            presence: EventChecks::default(),
            unexpected: 0,
            syncs: 0,
            seen: Vec::new(),
            shared,
        })
    }

    fn user_index(&self, name: &str) -> Option<usize> {
        let i: usize = name.strip_prefix(&self.user_prefix)?.parse().ok()?;
        (i < self.views.len()).then_some(i)
    }

    /// Sends `request` with a fresh `ref` and handles frames until its
    /// reply arrives. A `rate_limited` refusal is counted and retried after
    /// a pause; any other refusal fails with the gateway's reason.
    pub async fn request(&mut self, request: Value) -> anyhow::Result<Value> {
        for _ in 0..RATE_LIMITED_RETRIES {
            match self.request_once(request.clone()).await? {
                Ok(reply) => return Ok(reply),
                Err(code) if code == "rate_limited" => {
                    self.shared.error("observer_error_rate_limited");
                    sleep(RATE_LIMITED_PAUSE).await;
                }
                Err(code) => {
                    self.shared.error(&format!("observer_error_{code}"));
                    let hint = match (code.as_str(), request["type"].as_str()) {
                        ("limit_exceeded", Some("watch")) => {
                            "; start the gateways with --max-watch at least the run's --users"
                        }
                        ("limit_exceeded", Some("join")) => {
                            "; start the gateways with --max-rooms at least the run's rooms"
                        }
                        _ => "",
                    };
                    anyhow::bail!(
                        "observer {}: the gateway refused {} with {code}{hint}",
                        self.name,
                        request["type"]
                    );
                }
            }
        }
        anyhow::bail!(
            "observer {}: {} still rate_limited after {RATE_LIMITED_RETRIES} tries; raise the gateways' --rate-limit / --rate-burst",
            self.name,
            request["type"]
        )
    }

    /// One try of `request`: the reply, or the error frame's code.
    async fn request_once(&mut self, mut request: Value) -> anyhow::Result<Result<Value, String>> {
        self.next_ref += 1;
        let r = self.next_ref;
        request["ref"] = json!(r);
        self.sink
            .send(Message::Text(request.to_string().into()))
            .await?;
        let deadline = Instant::now() + STEP_TIMEOUT;
        loop {
            let Ok(Some((at, frame))) = timeout_at(deadline.into(), self.frames.recv()).await
            else {
                anyhow::bail!("observer {}: no reply to {request}", self.name);
            };
            if frame["ref"] == json!(r) {
                if frame["type"] == "reply" && frame["ok"] == true {
                    return Ok(Ok(frame));
                }
                let code = frame["code"].as_str().unwrap_or("unknown").to_owned();
                return Ok(Err(code));
            }
            self.handle(at, &frame);
        }
    }

    /// Watches every user, in chunks of at most `MAX_IDS`.
    pub async fn watch_all(&mut self, names: &[String]) -> anyhow::Result<()> {
        for chunk in names.chunks(MAX_IDS) {
            let reply = self
                .request(json!({"type": "watch", "users": chunk}))
                .await?;
            self.apply_states(&reply["users"]);
        }
        Ok(())
    }

    /// Joins `room` and takes its snapshot as the starting view.
    pub async fn join(&mut self, room: &str) -> anyhow::Result<()> {
        let reply = self.request(json!({"type": "join", "room": room})).await?;
        for m in reply["members"].as_array().into_iter().flatten() {
            if let Some(i) = m["user"].as_str().and_then(|u| self.user_index(u)) {
                self.views[i].in_room = true;
            }
        }
        Ok(())
    }

    fn apply_states(&mut self, users: &Value) {
        for u in users.as_array().into_iter().flatten() {
            if let Some(i) = u["user"].as_str().and_then(|n| self.user_index(n)) {
                self.views[i].online = u["online"] == true;
                self.views[i].seq = u["seq"].as_u64().unwrap_or_default();
            }
        }
    }

    /// Checks one frame that is not the reply being waited for.
    fn handle(&mut self, at: Stamp, frame: &Value) {
        let kind = frame["type"].as_str().unwrap_or_default();
        let user = frame["user"].as_str().and_then(|u| self.user_index(u));
        match (kind, user) {
            ("online" | "offline", Some(i)) => {
                self.shared.events.fetch_add(1, Relaxed);
                let online = kind == "online";
                let seq = frame["seq"].as_u64().unwrap_or_default();
                let v = &mut self.views[i];
                if seq <= v.seq {
                    if seq == v.seq {
                        self.presence.duplicated += 1;
                    } else {
                        self.presence.out_of_order += 1;
                    }
                    return;
                }
                self.presence.missed += seq - v.seq - 1;
                // Transitions alternate, so the parity of the jump says
                // which kind this event must be.
                let expected = if (seq - v.seq) % 2 == 1 {
                    !v.online
                } else {
                    v.online
                };
                if online != expected {
                    self.presence.out_of_order += 1;
                }
                v.online = online;
                v.seq = seq;
                self.seen.push(Seen {
                    user: i,
                    to: online,
                    room: false,
                    seq,
                    at,
                });
            }
            ("joined" | "left", Some(i)) => {
                self.shared.events.fetch_add(1, Relaxed);
                let joined = kind == "joined";
                self.views[i].in_room = joined;
                self.seen.push(Seen {
                    user: i,
                    to: joined,
                    room: true,
                    seq: 0,
                    at,
                });
            }
            ("sync", _) => {
                self.syncs += 1;
                self.apply_states(&frame["users"]);
            }
            // Other observers joining and leaving rooms are not checked.
            ("joined" | "left", None) if frame["user"].is_string() => {}
            _ => self.unexpected += 1,
        }
    }

    /// Handles frames until `stop` turns true.
    pub async fn pump_until(&mut self, stop: &mut watch::Receiver<bool>) {
        loop {
            tokio::select! {
                frame = self.frames.recv() => match frame {
                    Some((at, frame)) => self.handle(at, &frame),
                    None => {
                        self.shared.error("observer_closed");
                        return;
                    }
                },
                _ = stop.wait_for(|s| *s) => return,
            }
        }
    }

    /// Handles frames until `deadline`, or until `done(views)` holds.
    async fn pump(&mut self, deadline: Instant, done: &dyn Fn(usize, bool, bool) -> bool) -> bool {
        loop {
            let settled = self
                .views
                .iter()
                .enumerate()
                .all(|(i, v)| done(i, v.online, v.in_room));
            if settled {
                return true;
            }
            match timeout_at(deadline.into(), self.frames.recv()).await {
                Ok(Some((at, frame))) => self.handle(at, &frame),
                _ => return false,
            }
        }
    }

    /// Waits until this observer's view equals the truth (`online`,
    /// `in_room` per user) or `deadline` passes; then keeps listening for
    /// `quiet` so late duplicates show. Returns whether it settled.
    pub async fn settle(
        &mut self,
        online: &[bool],
        in_room: &[bool],
        deadline: Instant,
        quiet: std::time::Duration,
    ) -> bool {
        let settled = self
            .pump(deadline, &|i, o, r| online[i] == o && in_room[i] == r)
            .await;
        self.pump(Instant::now() + quiet, &|_, _, _| false).await;
        settled
    }

    /// Counts what this observer's presence view still lacks as missed
    /// events, then takes the gateway's state (and the truth for rooms,
    /// whose misses the exact check at the end counts) as its view, so a
    /// later check does not count the same miss again.
    pub fn count_final_misses(&mut self, gateway: &[(bool, u64)], in_room: &[bool]) {
        for (i, v) in self.views.iter_mut().enumerate() {
            let (online, seq) = gateway[i];
            if seq > v.seq {
                self.presence.missed += seq - v.seq;
                v.online = online;
                v.seq = seq;
            }
            v.in_room = in_room[i];
        }
    }

    /// Asks the gateway for every user's state; returns `(online, seq)`.
    pub async fn query_all(&mut self, names: &[String]) -> anyhow::Result<Vec<(bool, u64)>> {
        let mut states = vec![(false, 0); names.len()];
        for chunk in names.chunks(MAX_IDS) {
            let reply = self
                .request(json!({"type": "query", "users": chunk}))
                .await?;
            for u in reply["users"].as_array().into_iter().flatten() {
                if let Some(i) = u["user"].as_str().and_then(|n| self.user_index(n)) {
                    states[i] = (u["online"] == true, u["seq"].as_u64().unwrap_or_default());
                }
            }
        }
        Ok(states)
    }

    /// Every member of `room` that is a user of the run, page by page.
    pub async fn room_members(&mut self, room: &str) -> anyhow::Result<HashSet<usize>> {
        let mut members = HashSet::new();
        let mut cursor = Value::Null;
        loop {
            let reply = self
                .request(json!({"type": "room", "room": room, "limit": MAX_PAGE, "cursor": cursor}))
                .await?;
            for u in reply["users"].as_array().into_iter().flatten() {
                if let Some(i) = u.as_str().and_then(|n| self.user_index(n)) {
                    members.insert(i);
                }
            }
            cursor = reply["next_cursor"].clone();
            if cursor.is_null() {
                return Ok(members);
            }
        }
    }
}
