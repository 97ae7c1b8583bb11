//! One tab: a WebSocket of a user on one gateway. Once welcomed, a reader
//! task drains it (events, server pings) so the gateway never sees a slow
//! consumer, counts error frames and server closes by kind, and hands
//! replies back to the tool, which keeps only the sink. Frames a tab does
//! not check (presence events, `sync`, types newer than the tool) are
//! dropped.
//!
//! In `fanout` a tab is also a receiver: its reader opens a [`Window`] at
//! each `join` reply (with the snapshot), records every event of its room
//! in arrival order, and closes the window at the `leave` reply. Doing that
//! in the reader, in frame order, is what makes the window exact: the
//! first event after the reply cannot slip in before the window exists.
//!
//! In `cursors` a receiver also keeps its room's states ([`StateLog`]:
//! the join snapshot's, then each `updated`), and the tab sends `update`
//! frames without waiting for each reply (the gateway holds one back up
//! to 1/`--state-rate` s); their replies are tallied as they come
//! ([`UpdateTally`]) and waited for once the sends are over.

use std::{
    collections::{HashMap, HashSet},
    net::IpAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering::Relaxed},
    },
    time::Instant,
};

use futures_util::{StreamExt, stream::SplitSink};
use serde_json::{Value, json};
use tokio::{
    sync::mpsc,
    task::JoinHandle,
    time::{timeout, timeout_at},
};
use tokio_tungstenite::tungstenite::{
    Message,
    protocol::{CloseFrame, frame::coding::CloseCode},
};

use crate::{
    clock::Stamp,
    cursor::{StateLog, UpdateTally},
    stats::Shared,
    truth::Received,
    ws::{
        FrameKind, STEP_TIMEOUT, SocketEnd, Ws, open_ws, parse_text, read_error_kind, send,
        send_json,
    },
};

/// The members of one room, as user indices, and each one's position.
#[derive(Debug, Default)]
pub struct RoomIndex {
    /// The room's name.
    pub name: String,
    /// Member users, by index into the run's users.
    pub users: Vec<usize>,
    /// User index → position in `users`.
    pub position: HashMap<usize, usize>,
}

impl RoomIndex {
    /// The room `name` with these member users.
    pub fn new(name: String, users: Vec<usize>) -> Self {
        let position = users.iter().enumerate().map(|(p, &u)| (u, p)).collect();
        Self {
            name,
            users,
            position,
        }
    }
}

/// One stay of a receiver tab in its room: `join` reply to `leave` reply.
#[derive(Debug, Clone)]
pub struct Window {
    /// `join` sent, reply received.
    pub joined: (Stamp, Stamp),
    /// Room transitions the tab's own user had before this join.
    pub own_before: usize,
    /// Per member position: whether the snapshot listed the member.
    pub snapshot: Vec<bool>,
    /// Per member position: the member's events, in arrival order.
    pub events: Vec<Vec<Received>>,
    /// Per member position: the view (snapshot, then the events applied).
    pub view: Vec<bool>,
    /// `leave` sent, reply received.
    pub left: Option<(Stamp, Stamp)>,
    /// Room events that arrived after the `leave` reply.
    pub after_leave: u64,
}

/// What a receiver tab recorded, shared by its owner and its reader.
#[derive(Debug)]
pub struct ReceiverLog {
    /// The tab's room.
    pub room: Arc<RoomIndex>,
    /// The run's user-name prefix (`{prefix}{index}`).
    pub user_prefix: Arc<str>,
    /// The request in flight: `(ref, is join, sent, own transitions)`.
    pending: Option<(u64, bool, Stamp, usize)>,
    /// Its stays, in order.
    pub windows: Vec<Window>,
    /// Events received.
    pub events: u64,
    /// The position of the tab's own user in the room.
    pub own: Option<usize>,
    /// The members' states, as this tab knows them (`cursors`).
    pub states: StateLog,
}

impl ReceiverLog {
    /// An empty log of a tab of user `own` that will receive `room`'s
    /// events.
    pub fn new(room: Arc<RoomIndex>, user_prefix: Arc<str>, own: usize) -> Self {
        Self {
            own: room.position.get(&own).copied(),
            states: StateLog::new(room.users.len()),
            room,
            user_prefix,
            pending: None,
            windows: Vec::new(),
            events: 0,
        }
    }

    fn member(&self, name: &str) -> Option<usize> {
        let i: usize = name.strip_prefix(&*self.user_prefix)?.parse().ok()?;
        self.room.position.get(&i).copied()
    }

    /// Handles a reply to this tab's `join` or `leave`.
    fn reply(&mut self, reference: u64, at: Stamp, frame: &Value) {
        let Some((r, join, sent, own_before)) = self.pending else {
            return;
        };
        if r != reference || frame["ok"] != true {
            return;
        }
        self.pending = None;
        if join {
            let mut snapshot = vec![false; self.room.users.len()];
            for m in frame["members"].as_array().into_iter().flatten() {
                if let Some(p) = m["user"].as_str().and_then(|u| self.member(u)) {
                    snapshot[p] = true;
                    self.states.snapshot(p, &m["state"]);
                }
            }
            self.windows.push(Window {
                joined: (sent, at),
                own_before,
                view: snapshot.clone(),
                snapshot,
                events: vec![Vec::new(); self.room.users.len()],
                left: None,
                after_leave: 0,
            });
        } else if let Some(w) = self.windows.last_mut() {
            w.left = Some((sent, at));
        }
    }

    /// Records a `joined`/`left` of the tab's room.
    fn event(&mut self, to: bool, at: Stamp, frame: &Value) {
        if frame["room"].as_str() != Some(self.room.name.as_str()) {
            return;
        }
        let Some(p) = frame["user"].as_str().and_then(|u| self.member(u)) else {
            return;
        };
        self.events += 1;
        match self.windows.last_mut() {
            Some(w) if w.left.is_none() => {
                w.events[p].push(Received { to, at });
                w.view[p] = to;
            }
            Some(w) => w.after_leave += 1,
            None => {}
        }
    }
}

impl ReceiverLog {
    /// Records an `updated` of the tab's room.
    fn updated(&mut self, at: Stamp, frame: &Value) {
        if frame["room"].as_str() != Some(self.room.name.as_str()) {
            return;
        }
        let Some(p) = frame["user"].as_str().and_then(|u| self.member(u)) else {
            return;
        };
        let own = Some(p) == self.own;
        self.states.updated(p, &frame["state"], at, own);
    }
}

/// How the tool closes a tab, which decides whether the gateway's offline
/// grace applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseAs {
    /// A page unloaded or reloaded, a tab crashed: Close 1001 (going
    /// away), as a browser sends it; the user's presence gets the grace.
    Away,
    /// A deliberate sign-out: Close 1000; presence ends at once.
    SignOut,
}

impl CloseAs {
    fn code(self) -> CloseCode {
        match self {
            Self::Away => CloseCode::Away,
            Self::SignOut => CloseCode::Normal,
        }
    }
}

/// An open, welcomed tab.
#[derive(Debug)]
pub struct Tab {
    sink: SplitSink<Ws, Message>,
    reader: JoinHandle<()>,
    /// Set before the Close is sent, so the reader can tell a read error
    /// during the closing handshake from one on a live tab.
    closing: Arc<AtomicBool>,
    /// Set before the tab's gateway is killed (`nodeloss`): the socket's
    /// end is then expected, not an error.
    lost: Arc<AtomicBool>,
    replies: mpsc::UnboundedReceiver<(Stamp, Value)>,
    next_ref: u64,
    /// `update`s sent whose reply has not come yet, by `ref`.
    pending_updates: HashSet<u64>,
    /// What the replies to this tab's `update`s said.
    updates: UpdateTally,
    /// Whether this tab is in its user's room (its last `join` succeeded,
    /// no `leave` since).
    pub joined: bool,
    /// The target index this tab is connected to.
    pub target: u16,
    /// Who it is, for error reports: `tab 1 of lt…u7 on ws://…/ws`.
    who: Arc<str>,
    /// What this tab received, when it is a receiver.
    pub log: Option<Arc<Mutex<ReceiverLog>>>,
}

impl Drop for Tab {
    fn drop(&mut self) {
        // The reader holds the socket's other half: stop it, so a tab
        // dropped without its close (a shard stopped mid-run) closes its
        // socket too.
        self.reader.abort();
    }
}

impl Tab {
    /// Opens a tab at `url` (`who`, in error reports); records the
    /// connect latency or the error. With `log`, the tab records its
    /// room's events.
    pub async fn open(
        (url, target): (&str, u16),
        source: Option<IpAddr>,
        who: Arc<str>,
        shared: &Arc<Shared>,
        log: Option<ReceiverLog>,
    ) -> Option<Tab> {
        let started = Instant::now();
        let ws = match open_ws(url, source).await {
            Ok(ws) => ws,
            Err(e) => {
                shared.error(&e.label(), || format!("{who} could not connect: {e}"));
                return None;
            }
        };
        shared.connected(started.elapsed());
        let (sink, mut stream) = ws.split();
        let reader_shared = Arc::clone(shared);
        let closing = Arc::new(AtomicBool::new(false));
        let reader_closing = Arc::clone(&closing);
        let lost = Arc::new(AtomicBool::new(false));
        let reader_lost = Arc::clone(&lost);
        let log = log.map(|l| Arc::new(Mutex::new(l)));
        let reader_log = log.clone();
        let reader_who = Arc::clone(&who);
        let (tx, replies) = mpsc::unbounded_channel();
        let reader = tokio::spawn(async move {
            let (shared, who) = (reader_shared, reader_who);
            while let Some(frame) = stream.next().await {
                match frame {
                    Ok(Message::Text(t)) => {
                        let at = shared.clock.now();
                        let frame = parse_text(&t);
                        read_frame(&shared, &who, reader_log.as_deref(), &tx, at, frame);
                    }
                    Ok(Message::Close(close)) if !reader_closing.load(Relaxed) => {
                        let code = close.as_ref().map_or(CloseCode::Status, |c| c.code);
                        let end = SocketEnd::of_close(close.as_ref());
                        shared.error(&format!("closed_by_server_{}", u16::from(code)), || {
                            format!("{who} {}", end.said_of("the gateway"))
                        });
                    }
                    Ok(_) => {}
                    Err(_) if reader_lost.load(Relaxed) => break,
                    Err(e) => {
                        if reader_closing.load(Relaxed) {
                            shared.error(&format!("after_close_{}", read_error_kind(&e)), || {
                                format!("{who} got no Close reply to its Close: {e}")
                            });
                        } else {
                            shared.error(&read_error_kind(&e), || {
                                format!("{who} lost its connection: {e}")
                            });
                        }
                        break;
                    }
                }
            }
        });
        Some(Tab {
            sink,
            reader,
            closing,
            lost,
            replies,
            next_ref: 0,
            pending_updates: HashSet::new(),
            updates: UpdateTally::default(),
            joined: false,
            target,
            who,
            log,
        })
    }

    /// Sends `{"type": kind, "room": room}` and waits for its reply;
    /// returns when the reply arrived, or records the error's kind
    /// (`tab_error_<code>` for an error frame) and returns `None`.
    async fn room_request(
        &mut self,
        kind: &str,
        room: &str,
        sent: Stamp,
        own_before: usize,
        shared: &Shared,
    ) -> Option<Stamp> {
        self.next_ref += 1;
        let r = self.next_ref;
        if let Some(log) = &self.log {
            // unwrap: no code panics while holding this lock.
            log.lock().unwrap().pending = Some((r, kind == "join", sent, own_before));
        }
        let frame = json!({"type": kind, "room": room, "ref": r});
        let who = &self.who;
        if let Err(e) = send_json(&mut self.sink, &frame).await {
            shared.error(&format!("{kind}_send"), || {
                format!("{who} could not send its {kind:?}: {e}")
            });
            return None;
        }
        let deadline = Instant::now() + STEP_TIMEOUT;
        loop {
            match timeout_at(deadline.into(), self.replies.recv()).await {
                Err(_) => {
                    shared.error(&format!("{kind}_reply_timeout"), || {
                        format!("{who} got no reply to its {kind:?} within {STEP_TIMEOUT:?}")
                    });
                    return None;
                }
                Ok(None) => {
                    shared.error(&format!("{kind}_tab_gone"), || {
                        format!("{who} ended before the reply to its {kind:?}")
                    });
                    return None;
                }
                Ok(Some((at, reply))) if reply["ref"] == json!(r) => {
                    // An error reply was counted by the reader.
                    return (reply["type"] == "reply" && reply["ok"] == true).then_some(at);
                }
                Ok(Some(_)) => {}
            }
        }
    }

    /// Joins `room` and waits for the reply (so the store has decided it);
    /// returns when the reply arrived. `sent` stamps the action;
    /// `own_before` is how many room transitions the user had so far.
    pub async fn join(
        &mut self,
        room: &str,
        sent: Stamp,
        own_before: usize,
        shared: &Shared,
    ) -> Option<Stamp> {
        let done = self
            .room_request("join", room, sent, own_before, shared)
            .await;
        self.joined |= done.is_some();
        done
    }

    /// Leaves `room` and waits for the reply.
    pub async fn leave(&mut self, room: &str, sent: Stamp, shared: &Shared) -> Option<Stamp> {
        let done = self.room_request("leave", room, sent, 0, shared).await;
        if done.is_some() {
            self.joined = false;
        }
        done
    }

    /// Sends `{"type":"update","room":room,"state":state}` and returns
    /// whether it went out, without waiting for its reply (replies are
    /// tallied as they come, and [`Tab::update_replies`] waits for the
    /// rest).
    pub async fn update(&mut self, room: &str, state: &Value, shared: &Shared) -> bool {
        self.take_update_replies();
        self.next_ref += 1;
        let r = self.next_ref;
        let frame = json!({"type": "update", "room": room, "state": state, "ref": r});
        if let Err(e) = send_json(&mut self.sink, &frame).await {
            let who = &self.who;
            shared.error("update_send", || {
                format!("{who} could not send its \"update\": {e}")
            });
            return false;
        }
        self.pending_updates.insert(r);
        self.updates.sent += 1;
        true
    }

    /// Tallies `reply` if it answers one of this tab's `update`s.
    fn answer_update(&mut self, reply: &Value) {
        if let Some(r) = reply["ref"].as_u64()
            && self.pending_updates.remove(&r)
        {
            self.updates.answer(reply);
        }
    }

    /// Tallies the update replies that came so far.
    fn take_update_replies(&mut self) {
        while let Ok((_, reply)) = self.replies.try_recv() {
            self.answer_update(&reply);
        }
    }

    /// Waits (at most [`STEP_TIMEOUT`]) for the reply to every `update`
    /// sent; returns what they said (the rest counted `unanswered`).
    pub async fn update_replies(&mut self, shared: &Shared) -> UpdateTally {
        self.take_update_replies();
        let deadline = Instant::now() + STEP_TIMEOUT;
        while !self.pending_updates.is_empty() {
            match timeout_at(deadline.into(), self.replies.recv()).await {
                Ok(Some((_, reply))) => self.answer_update(&reply),
                gone => {
                    let (who, n) = (&self.who, self.pending_updates.len());
                    let kind = if gone.is_err() {
                        "update_reply_timeout"
                    } else {
                        "update_tab_gone"
                    };
                    shared.error(kind, || {
                        format!(
                            "{who} got no reply to {n} of its \"update\"s within {STEP_TIMEOUT:?}"
                        )
                    });
                    self.updates.unanswered += n as u64;
                    self.pending_updates.clear();
                }
            }
        }
        self.updates
    }

    /// Whether the gateway ended this tab before the tool closed it.
    pub fn ended_by_server(&self) -> bool {
        self.reader.is_finished()
    }

    /// Marks the tab's socket as about to break (its gateway is killed):
    /// its end is not counted as an error.
    pub fn expect_loss(&self) {
        self.lost.store(true, Relaxed);
    }

    /// Drops a tab whose gateway was killed: not a close of the tool's.
    pub fn lose(self, shared: &Shared) {
        shared.open.fetch_sub(1, Relaxed);
    }

    /// Sends a Close (1001 or 1000, `how`) and waits for the gateway's
    /// close reply.
    pub async fn close(mut self, how: CloseAs, shared: &Shared) {
        shared.closes.fetch_add(1, Relaxed);
        shared.open.fetch_sub(1, Relaxed);
        let who = Arc::clone(&self.who);
        if self.ended_by_server() {
            shared.error("closed_by_server", || {
                format!("{who} had ended before the tool closed it")
            });
            return;
        }
        self.closing.store(true, Relaxed);
        let frame = CloseFrame {
            code: how.code(),
            reason: "".into(),
        };
        if let Err(e) = send(&mut self.sink, Message::Close(Some(frame))).await {
            shared.error("close_send", || {
                format!("{who} could not send its Close: {e}")
            });
        }
        match timeout(STEP_TIMEOUT, &mut self.reader).await {
            Ok(_) => {}
            Err(_) => {
                self.reader.abort();
                shared.error("close_timeout", || {
                    format!("{who} got no Close reply within {STEP_TIMEOUT:?}")
                });
            }
        }
    }
}

/// One text frame at a tab's reader.
fn read_frame(
    shared: &Shared,
    who: &str,
    log: Option<&Mutex<ReceiverLog>>,
    replies: &mpsc::UnboundedSender<(Stamp, Value)>,
    at: Stamp,
    frame: Value,
) {
    let lock = || log.map(|l| l.lock().unwrap_or_else(|e| e.into_inner()));
    let kind = FrameKind::of(&frame);
    match kind {
        Some(FrameKind::Reply) => {
            if let (Some(mut l), Some(r)) = (lock(), frame["ref"].as_u64()) {
                l.reply(r, at, &frame);
            }
            let _ = replies.send((at, frame));
        }
        Some(FrameKind::Error) => {
            let code = frame["code"].as_str().unwrap_or("unknown");
            shared.error(&format!("tab_error_{code}"), || {
                format!("{who} got the error frame {frame}")
            });
            let _ = replies.send((at, frame));
        }
        Some(FrameKind::Joined | FrameKind::Left) => {
            if let Some(mut l) = lock() {
                shared.events.fetch_add(1, Relaxed);
                l.event(kind == Some(FrameKind::Joined), at, &frame);
            }
        }
        Some(FrameKind::Updated) => {
            if let Some(mut l) = lock() {
                shared.events.fetch_add(1, Relaxed);
                l.updated(at, &frame);
            }
        }
        // A tab checks only its own replies and, as a receiver, its room's
        // events; anything else (presence, `sync`, types the tool does not
        // check) is not its business.
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tab_passes_on_its_answers_and_ignores_the_rest() {
        let shared = Shared::default();
        let (tx, mut replies) = mpsc::unbounded_channel();
        for frame in [
            json!({"type": "updated", "room": "r", "user": "u", "meta": {}}),
            json!({"type": "status", "user": "u", "status": "away", "ref": 1}),
            json!({"type": "online", "user": "u", "seq": 1}),
            json!({"type": "joined", "room": "r", "user": "u"}),
            json!({"type": "reply", "ref": 1, "ok": true}),
            json!({"type": "error", "ref": 2, "code": "invalid_room"}),
        ] {
            read_frame(&shared, "tab 0 of u", None, &tx, 1, frame);
        }
        let mut answers = Vec::new();
        while let Ok((_, frame)) = replies.try_recv() {
            answers.push(frame["type"].as_str().unwrap_or_default().to_owned());
        }
        assert_eq!(answers, ["reply", "error"]);
        let errors: Vec<_> = shared.errors().into_iter().collect();
        assert_eq!(errors, [("tab_error_invalid_room".to_owned(), 1)]);
        let first = &shared.first_errors()["tab_error_invalid_room"];
        assert!(
            first.starts_with("tab 0 of u got the error frame {"),
            "{first}"
        );
        assert!(first.ends_with("during the setup"), "{first}");
    }
}
