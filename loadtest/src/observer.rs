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
//! bias the latencies. The checking itself is [`ObserverLog`], which needs
//! no socket; it ignores frame types it does not check, so a new event in
//! the protocol does not break a run. Room states (`updated`, and the
//! `state` of each member in a join snapshot) are kept per user in a
//! [`StateLog`], checked as a member's are (`cursors`).
//!
//! Nothing an observer does ends in a panic: every way it can fail is an
//! [`ObserverError`] that the coordinator reports with the step it was in.
//! A request the gateway refuses fails with a message that names the limit
//! (`--max-watch`, `--max-rooms`, ...), except `rate_limited`, which is
//! counted and retried after a pause. When the gateway closes the socket,
//! the reader hands its Close frame over (code and reason), so the failure
//! says why, whether it shows at the next read or at the next send.

use std::{
    collections::{BTreeMap, HashSet},
    sync::{Arc, atomic::Ordering::Relaxed},
    time::{Duration, Instant},
};

use futures_util::{StreamExt, stream::SplitSink};
use serde::Serialize;
use serde_json::{Value, json};
use tokio::{
    sync::{mpsc, watch},
    task::JoinHandle,
    time::{sleep, timeout_at},
};
use tokio_tungstenite::tungstenite::Message;

use crate::{
    clock::Stamp,
    cursor::StateLog,
    stats::Shared,
    target::Target,
    truth::EventChecks,
    ws::{
        ConnectError, ENDED_WITHOUT_CLOSE, FrameKind, STEP_TIMEOUT, SendError, SocketEnd, Ws,
        open_ws, parse_text, send_json,
    },
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
/// After a failed send: how long the reader may take to hand over the
/// Close frame (or the read error) that explains it.
const END_GRACE: Duration = Duration::from_secs(2);

/// Why an observer cannot go on. Each reads after "observer N" in the
/// failure line ("observer 0 was closed by ws://… with 4008 slow
/// consumer").
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ObserverError {
    /// The connect or the `welcome` failed.
    #[error("could not connect to {target}: {error}")]
    Connect {
        /// The target's URL.
        target: String,
        /// What went wrong.
        error: ConnectError,
    },
    /// The socket ended: the gateway closed it, or the connection broke.
    #[error("{}", end.said_of(target))]
    Closed {
        /// The target's URL.
        target: String,
        /// How it ended.
        end: SocketEnd,
    },
    /// A request got no reply within [`STEP_TIMEOUT`].
    #[error("got no reply to {request:?} from {target} within {STEP_TIMEOUT:?}")]
    NoReply {
        /// The target's URL.
        target: String,
        /// The request's `type`.
        request: String,
    },
    /// The gateway refused a request with an error frame.
    #[error("was refused {request:?} by {target} with {code}")]
    Refused {
        /// The target's URL.
        target: String,
        /// The request's `type`.
        request: String,
        /// The error frame's `code`.
        code: String,
    },
    /// Every try of a request was refused `rate_limited`.
    #[error("was still refused {request:?} by {target} with rate_limited after {tries} tries")]
    RateLimited {
        /// The target's URL.
        target: String,
        /// The request's `type`.
        request: String,
        /// Tries made.
        tries: usize,
    },
    /// The observer's task panicked (a bug of the tool).
    #[error("stopped: its task panicked: {0}")]
    Panicked(String),
    /// The observer's task did not stop when told to (a bug of the tool).
    #[error("did not stop within {STEP_TIMEOUT:?} when told to")]
    Stuck,
}

impl ObserverError {
    /// What to change so the run fits, when the failure says so; starts
    /// with "; " so it follows the failure line.
    pub fn hint(&self) -> &'static str {
        match self {
            Self::Refused { request, code, .. } => match (code.as_str(), request.as_str()) {
                ("limit_exceeded", "watch") => {
                    "; start the gateways with --max-watch at least the run's --users"
                }
                ("limit_exceeded", "join") => {
                    "; start the gateways with --max-rooms at least the run's rooms"
                }
                _ => "",
            },
            Self::RateLimited { .. } => "; raise the gateways' --rate-limit / --rate-burst",
            Self::Closed {
                end: SocketEnd::Closed { code: 4008, .. },
                ..
            } => {
                "; an observer gets every event of the run and fell behind: give the tool more CPU, or raise the gateways' --outbox-messages / --outbox-bytes"
            }
            Self::Closed {
                end: SocketEnd::Closed { code: 4029, .. },
                ..
            } => "; raise the gateways' --rate-limit / --rate-burst",
            _ => "",
        }
    }
}

/// What the observer's reader hands over.
#[derive(Debug)]
enum Incoming {
    /// A text frame and when it arrived.
    Frame(Stamp, Value),
    /// The socket ended; nothing follows.
    End(SocketEnd),
}

/// What an observer believes about one user.
#[derive(Debug, Default, Clone, Copy)]
struct View {
    online: bool,
    seq: u64,
    in_room: bool,
}

/// The `reason` of an `offline` or `left` (docs/protocol.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// The client closed the connection, or sent `leave`.
    Closed,
    /// The connection was silent past the idle timeout.
    Timeout,
    /// The node holding the connection died and was reaped.
    NodeLost,
    /// The node holding the connection was drained.
    Shutdown,
    /// Any other reason, or none (an `online`, a `joined`).
    Other,
}

impl Reason {
    fn of(frame: &Value) -> Self {
        match frame["reason"].as_str() {
            Some("closed") => Self::Closed,
            Some("timeout") => Self::Timeout,
            Some("node_lost") => Self::NodeLost,
            Some("shutdown") => Self::Shutdown,
            _ => Self::Other,
        }
    }
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
    /// The `reason` of an `offline` or `left`.
    pub reason: Reason,
    /// The `last_seen` of an `offline` (Unix ms; 0 otherwise).
    pub last_seen_ms: u64,
}

/// What one observer believes about the run's users and what it received,
/// fed one frame at a time. It needs no socket, so its checks are tested
/// without one.
///
/// It is strict about the frames it checks (`online`, `offline`, `joined`,
/// `left`, `updated`, `sync`, and replies and errors only as answers to
/// its own requests) and ignores, counting them by type, frames of any other type:
/// a new event in the protocol changes nothing here until the tool checks
/// it.
#[derive(Debug)]
pub struct ObserverLog {
    user_prefix: String,
    views: Vec<View>,
    /// Presence checks so far.
    pub presence: EventChecks,
    /// Frames of a checked kind that do not fit (a reply no request waits
    /// for, an event about a user of no run here), and text that is no
    /// frame at all (not a JSON object with a string `type`).
    pub unexpected: u64,
    /// Frames of types the observer does not check, by type (ignored).
    pub ignored: BTreeMap<String, u64>,
    /// `sync` frames (the node resubscribed; views were replaced).
    pub syncs: u64,
    /// Every user's room state as this observer knows it, by user index.
    pub states: StateLog,
    /// Every event received, in order.
    pub seen: Vec<Seen>,
    shared: Arc<Shared>,
}

impl ObserverLog {
    /// The log of an observer of `users` users named
    /// `{user_prefix}{index}`, each offline, out of every room, `seq` 0.
    pub fn new(user_prefix: &str, users: usize, shared: Arc<Shared>) -> Self {
        Self {
            user_prefix: user_prefix.to_owned(),
            views: vec![View::default(); users],
            presence: EventChecks::default(),
            unexpected: 0,
            ignored: BTreeMap::new(),
            syncs: 0,
            states: StateLog::new(users),
            seen: Vec::new(),
            shared,
        }
    }

    fn user_index(&self, name: &str) -> Option<usize> {
        let i: usize = name.strip_prefix(&self.user_prefix)?.parse().ok()?;
        (i < self.views.len()).then_some(i)
    }

    /// Takes `users` (`[{user, online, seq}]`, as a `watch` reply or a
    /// `sync` lists them) as the view.
    fn apply_states(&mut self, users: &Value) {
        for u in users.as_array().into_iter().flatten() {
            if let Some(i) = u["user"].as_str().and_then(|n| self.user_index(n)) {
                self.views[i].online = u["online"] == true;
                self.views[i].seq = u["seq"].as_u64().unwrap_or_default();
            }
        }
    }

    /// Takes a `join` reply's `members` as in the room.
    fn apply_snapshot(&mut self, members: &Value) {
        for m in members.as_array().into_iter().flatten() {
            if let Some(i) = m["user"].as_str().and_then(|u| self.user_index(u)) {
                self.views[i].in_room = true;
                self.states.snapshot(i, &m["state"]);
            }
        }
    }

    /// Checks one frame that is not the answer being waited for.
    pub fn handle(&mut self, at: Stamp, frame: &Value) {
        let kind = FrameKind::of(frame);
        let user = frame["user"].as_str().and_then(|u| self.user_index(u));
        match (kind, user) {
            (Some(FrameKind::Online | FrameKind::Offline), Some(i)) => {
                self.shared.events.fetch_add(1, Relaxed);
                let online = kind == Some(FrameKind::Online);
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
                    reason: Reason::of(frame),
                    last_seen_ms: frame["last_seen"].as_u64().unwrap_or_default(),
                });
            }
            (Some(FrameKind::Joined | FrameKind::Left), Some(i)) => {
                self.shared.events.fetch_add(1, Relaxed);
                let joined = kind == Some(FrameKind::Joined);
                self.views[i].in_room = joined;
                self.seen.push(Seen {
                    user: i,
                    to: joined,
                    room: true,
                    seq: 0,
                    at,
                    reason: Reason::of(frame),
                    last_seen_ms: 0,
                });
            }
            (Some(FrameKind::Updated), Some(i)) => {
                self.shared.events.fetch_add(1, Relaxed);
                self.states.updated(i, &frame["state"], at, false);
            }
            (Some(FrameKind::Sync), _) => {
                self.syncs += 1;
                self.apply_states(&frame["users"]);
            }
            // Other observers joining and leaving rooms are not checked.
            (Some(FrameKind::Joined | FrameKind::Left), None) if frame["user"].is_string() => {}
            (Some(FrameKind::Unchecked), _) => {
                let kind = frame["type"].as_str().unwrap_or_default();
                match self.ignored.get_mut(kind) {
                    Some(n) => *n += 1,
                    None => {
                        self.ignored.insert(kind.to_owned(), 1);
                    }
                }
            }
            _ => self.unexpected += 1,
        }
    }

    /// Whether `done(user, online, in_room)` holds for every user's view.
    fn all(&self, done: &dyn Fn(usize, bool, bool) -> bool) -> bool {
        self.views
            .iter()
            .enumerate()
            .all(|(i, v)| done(i, v.online, v.in_room))
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
}

impl std::fmt::Debug for Observer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Observer")
            .field("name", &self.name)
            .field("target", &self.target)
            .finish_non_exhaustive()
    }
}

/// One observing connection.
pub struct Observer {
    /// Its name (user id).
    pub name: String,
    /// Index of the target it is connected to.
    pub target: u16,
    /// That target's URL, for failures.
    target_url: String,
    sink: SplitSink<Ws, Message>,
    frames: mpsc::UnboundedReceiver<Incoming>,
    reader: JoinHandle<()>,
    /// How the socket ended, once the reader said so.
    ended: Option<SocketEnd>,
    next_ref: u64,
    /// What it believes and received.
    pub log: ObserverLog,
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
    /// `cursors`: room members whose state in the gateway's `room` pages
    /// is not the last one they sent (0 for other scenarios).
    pub state_mismatches: u64,
    /// Users online, as the truth has it.
    pub users_online: u64,
}

impl Drop for Observer {
    fn drop(&mut self) {
        // The reader holds the socket's other half: stop it, so a dropped
        // observer's socket closes.
        self.reader.abort();
    }
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
    ) -> Result<Self, ObserverError> {
        let ws = open_ws(&target.tab_url(name), None)
            .await
            .map_err(|error| ObserverError::Connect {
                target: target.ws.clone(),
                error,
            })?;
        let (sink, mut stream) = ws.split();
        let (tx, frames) = mpsc::unbounded_channel();
        let clock = shared.clock;
        let reader = tokio::spawn(async move {
            let end = loop {
                match stream.next().await {
                    Some(Ok(Message::Text(t))) => {
                        let at = clock.now();
                        if tx.send(Incoming::Frame(at, parse_text(&t))).is_err() {
                            return;
                        }
                    }
                    Some(Ok(Message::Close(c))) => break SocketEnd::of_close(c.as_ref()),
                    Some(Ok(_)) => {}
                    Some(Err(e)) => break SocketEnd::Broken(e.to_string()),
                    None => break SocketEnd::Broken(ENDED_WITHOUT_CLOSE.to_owned()),
                }
            };
            let _ = tx.send(Incoming::End(end));
        });
        Ok(Self {
            name: name.to_owned(),
            target: index,
            target_url: target.ws.clone(),
            sink,
            frames,
            reader,
            ended: None,
            next_ref: 0,
            log: ObserverLog::new(user_prefix, users, Arc::clone(&shared)),
            shared,
        })
    }

    /// The failure of a socket that ended this way.
    fn closed(&self, end: SocketEnd) -> ObserverError {
        ObserverError::Closed {
            target: self.target_url.clone(),
            end,
        }
    }

    /// The next frame before `deadline` (`None` once it passed); fails once
    /// the socket ended.
    async fn next_frame(
        &mut self,
        deadline: Instant,
    ) -> Result<Option<(Stamp, Value)>, ObserverError> {
        if let Some(end) = &self.ended {
            return Err(self.closed(end.clone()));
        }
        let end = match timeout_at(deadline.into(), self.frames.recv()).await {
            Err(_) => return Ok(None),
            Ok(Some(Incoming::Frame(at, frame))) => return Ok(Some((at, frame))),
            Ok(Some(Incoming::End(end))) => end,
            Ok(None) => SocketEnd::Broken("the observer's reader stopped".to_owned()),
        };
        self.ended = Some(end.clone());
        Err(self.closed(end))
    }

    /// A send failed: the socket's end as the reader saw it (the gateway's
    /// Close usually arrived before the send found the socket closing),
    /// else the send's own error. Frames still queued are handled.
    async fn lost(&mut self, error: SendError) -> ObserverError {
        let deadline = Instant::now() + END_GRACE;
        loop {
            match self.next_frame(deadline).await {
                Err(e) => return e,
                Ok(Some((at, frame))) => self.log.handle(at, &frame),
                Ok(None) => {
                    let end = SocketEnd::Broken(format!("sending failed: {error}"));
                    self.ended = Some(end.clone());
                    return self.closed(end);
                }
            }
        }
    }

    /// Sends `request` with a fresh `ref` and handles frames until its
    /// reply arrives. A `rate_limited` refusal is counted and retried after
    /// a pause; any other refusal fails with the gateway's code.
    pub async fn request(&mut self, request: Value) -> Result<Value, ObserverError> {
        let kind = request["type"].as_str().unwrap_or_default().to_owned();
        for _ in 0..RATE_LIMITED_RETRIES {
            match self.request_once(request.clone(), &kind).await? {
                Ok(reply) => return Ok(reply),
                Err(code) if code == "rate_limited" => {
                    self.shared.error("observer_error_rate_limited", || {
                        format!(
                            "observer {} was refused {kind:?} with rate_limited",
                            self.name
                        )
                    });
                    sleep(RATE_LIMITED_PAUSE).await;
                }
                Err(code) => {
                    self.shared.error(&format!("observer_error_{code}"), || {
                        format!("observer {} was refused {kind:?} with {code}", self.name)
                    });
                    return Err(ObserverError::Refused {
                        target: self.target_url.clone(),
                        request: kind,
                        code,
                    });
                }
            }
        }
        Err(ObserverError::RateLimited {
            target: self.target_url.clone(),
            request: kind,
            tries: RATE_LIMITED_RETRIES,
        })
    }

    /// One try of `request` (of type `kind`): the reply, or the error
    /// frame's code.
    async fn request_once(
        &mut self,
        mut request: Value,
        kind: &str,
    ) -> Result<Result<Value, String>, ObserverError> {
        if let Some(end) = &self.ended {
            return Err(self.closed(end.clone()));
        }
        self.next_ref += 1;
        let r = self.next_ref;
        request["ref"] = json!(r);
        if let Err(e) = send_json(&mut self.sink, &request).await {
            return Err(self.lost(e).await);
        }
        let deadline = Instant::now() + STEP_TIMEOUT;
        loop {
            let Some((at, frame)) = self.next_frame(deadline).await? else {
                return Err(ObserverError::NoReply {
                    target: self.target_url.clone(),
                    request: kind.to_owned(),
                });
            };
            // Only a reply or an error answers; any other frame, even one
            // that carries this `ref`, is checked (or ignored) as usual.
            let answer = matches!(
                FrameKind::of(&frame),
                Some(FrameKind::Reply | FrameKind::Error)
            );
            if answer && frame["ref"] == json!(r) {
                if frame["type"] == "reply" && frame["ok"] == true {
                    return Ok(Ok(frame));
                }
                let code = frame["code"].as_str().unwrap_or("unknown").to_owned();
                return Ok(Err(code));
            }
            self.log.handle(at, &frame);
        }
    }

    /// Watches every user, in chunks of at most `MAX_IDS`.
    pub async fn watch_all(&mut self, names: &[String]) -> Result<(), ObserverError> {
        for chunk in names.chunks(MAX_IDS) {
            let reply = self
                .request(json!({"type": "watch", "users": chunk}))
                .await?;
            self.log.apply_states(&reply["users"]);
        }
        Ok(())
    }

    /// Joins `room` and takes its snapshot as the starting view.
    pub async fn join(&mut self, room: &str) -> Result<(), ObserverError> {
        let reply = self.request(json!({"type": "join", "room": room})).await?;
        self.log.apply_snapshot(&reply["members"]);
        Ok(())
    }

    /// Handles frames until `stop` turns true; fails as soon as the socket
    /// ends.
    pub async fn pump_until(
        &mut self,
        stop: &mut watch::Receiver<bool>,
    ) -> Result<(), ObserverError> {
        loop {
            // A frame at most a step apart: a quiet gateway is not a
            // failure here, so the wait just starts again.
            let deadline = Instant::now() + STEP_TIMEOUT;
            tokio::select! {
                frame = self.next_frame(deadline) => {
                    if let Some((at, frame)) = frame? {
                        self.log.handle(at, &frame);
                    }
                }
                _ = stop.wait_for(|s| *s) => return Ok(()),
            }
        }
    }

    /// Handles frames until `deadline`, or until `done(views)` holds;
    /// returns whether it held.
    async fn pump(
        &mut self,
        deadline: Instant,
        done: &dyn Fn(usize, bool, bool) -> bool,
    ) -> Result<bool, ObserverError> {
        loop {
            if self.log.all(done) {
                return Ok(true);
            }
            match self.next_frame(deadline).await? {
                Some((at, frame)) => self.log.handle(at, &frame),
                None => return Ok(false),
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
    ) -> Result<bool, ObserverError> {
        let settled = self
            .pump(deadline, &|i, o, r| online[i] == o && in_room[i] == r)
            .await?;
        self.pump(Instant::now() + quiet, &|_, _, _| false).await?;
        Ok(settled)
    }

    /// Asks the gateway for every user's state; returns `(online, seq)`.
    pub async fn query_all(&mut self, names: &[String]) -> Result<Vec<(bool, u64)>, ObserverError> {
        let mut states = vec![(false, 0); names.len()];
        for chunk in names.chunks(MAX_IDS) {
            let reply = self
                .request(json!({"type": "query", "users": chunk}))
                .await?;
            for u in reply["users"].as_array().into_iter().flatten() {
                if let Some(i) = u["user"].as_str().and_then(|n| self.log.user_index(n)) {
                    states[i] = (u["online"] == true, u["seq"].as_u64().unwrap_or_default());
                }
            }
        }
        Ok(states)
    }

    /// Every member of `room` that is a user of the run, page by page.
    pub async fn room_members(&mut self, room: &str) -> Result<HashSet<usize>, ObserverError> {
        Ok(self.room_page_states(room).await?.into_keys().collect())
    }

    /// Every member of `room` that is a user of the run, with the `n` of
    /// the state its page lists (0: none), page by page.
    pub async fn room_page_states(
        &mut self,
        room: &str,
    ) -> Result<BTreeMap<usize, u64>, ObserverError> {
        let mut members = BTreeMap::new();
        let mut cursor = Value::Null;
        loop {
            let reply = self
                .request(json!({"type": "room", "room": room, "limit": MAX_PAGE, "cursor": cursor}))
                .await?;
            for u in reply["users"].as_array().into_iter().flatten() {
                if let Some(i) = u.as_str().and_then(|n| self.log.user_index(n)) {
                    members.insert(i, 0);
                }
            }
            for m in reply["members"].as_array().into_iter().flatten() {
                if let Some(i) = m["user"].as_str().and_then(|n| self.log.user_index(n)) {
                    let n = crate::cursor::n_of(&m["state"]).unwrap_or_default();
                    members.insert(i, n);
                }
            }
            cursor = reply["next_cursor"].clone();
            if cursor.is_null() {
                return Ok(members);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log() -> ObserverLog {
        ObserverLog::new("ltu", 3, Arc::new(Shared::default()))
    }

    #[test]
    fn frames_of_types_it_does_not_check_are_ignored_not_unexpected() {
        let mut l = log();
        for frame in [
            json!({"type": "status", "user": "ltu1", "status": "away"}),
            json!({"type": "occupancy", "room": "ltr0", "count": 2}),
            json!({"type": "batch", "events": [{"type": "online", "user": "ltu2", "seq": 1}]}),
            json!({"type": "status", "user": "ltu2", "status": "busy"}),
        ] {
            l.handle(1, &frame);
        }
        assert_eq!(l.unexpected, 0);
        assert!(l.presence.clean());
        assert!(l.seen.is_empty());
        let ignored: Vec<_> = l.ignored.iter().map(|(k, v)| (k.as_str(), *v)).collect();
        assert_eq!(ignored, [("batch", 1), ("occupancy", 1), ("status", 2)]);
    }

    #[test]
    fn the_kinds_it_checks_stay_strict() {
        let mut l = log();
        l.handle(1, &json!({"type": "online", "user": "ltu0", "seq": 1}));
        // seq 2 never came: missed; then seq 3 again: duplicated.
        l.handle(2, &json!({"type": "online", "user": "ltu0", "seq": 3}));
        l.handle(3, &json!({"type": "online", "user": "ltu0", "seq": 3}));
        // Alternation broken: seq 4 must be an offline.
        l.handle(4, &json!({"type": "online", "user": "ltu0", "seq": 4}));
        assert_eq!(
            (
                l.presence.missed,
                l.presence.duplicated,
                l.presence.out_of_order
            ),
            (1, 1, 1)
        );
        // Checked kinds that fit nothing of the run, and text that is no
        // frame, are unexpected.
        for frame in [
            json!({"type": "online", "user": "someone-else", "seq": 1}),
            json!({"type": "reply", "ref": 99, "ok": true}),
            json!({"user": "ltu1", "seq": 1}),
            Value::Null,
        ] {
            l.handle(5, &frame);
        }
        assert_eq!(l.unexpected, 4);
        assert!(l.ignored.is_empty());
        l.handle(
            6,
            &json!({"type": "joined", "room": "ltr0", "user": "ltu1"}),
        );
        assert_eq!(
            l.seen.len(),
            4,
            "three presence events kept, one room event"
        );
    }

    #[test]
    fn updated_frames_are_read_as_room_states() {
        let mut l = log();
        l.apply_snapshot(&json!([{"user": "ltu1", "state": crate::cursor::state(2)}]));
        l.handle(1, &json!({"type": "updated", "room": "ltr0", "user": "ltu0", "state": crate::cursor::state(1)}));
        l.handle(2, &json!({"type": "updated", "room": "ltr0", "user": "ltu1", "state": crate::cursor::state(3)}));
        // Behind the snapshot: out of order.
        l.handle(3, &json!({"type": "updated", "room": "ltr0", "user": "ltu1", "state": crate::cursor::state(1)}));
        // Another run's user is unexpected, not ignored.
        l.handle(
            4,
            &json!({"type": "updated", "room": "x", "user": "other", "state": {}}),
        );
        assert!(l.ignored.is_empty());
        assert_eq!(l.unexpected, 1);
        assert_eq!((l.states.latest(0), l.states.latest(1)), (1, 3));
        assert_eq!(
            (l.states.checks.delivered, l.states.checks.out_of_order),
            (2, 1)
        );
        assert_eq!(l.states.unconverged(&[1, 3, 0], None), 0);
    }
}
