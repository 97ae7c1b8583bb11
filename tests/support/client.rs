//! A WebSocket tab, as a browser would hold it.
//!
//! A background task reads the socket for the whole life of the client:
//! reading is what makes tungstenite answer the server's pings, so a
//! [`Client`] stays alive through any idle timeout, like a browser tab. Text
//! frames are parsed and queued; the test consumes them either strictly in
//! order ([`Client::next_json`]) or by waiting for a matching frame while
//! keeping the others ([`Client::expect_event`], [`Client::request`]), so no
//! event is ever lost to a wait for another one.

use std::{collections::VecDeque, time::Duration};

use futures_util::{
    SinkExt, StreamExt,
    stream::{SplitSink, SplitStream},
};
use serde_json::{Value, json};
use tokio::{
    net::TcpStream,
    sync::mpsc,
    task::JoinHandle,
    time::{Instant, timeout, timeout_at},
};
use tokio_tungstenite::{
    MaybeTlsStream, WebSocketStream, connect_async,
    tungstenite::{
        Message,
        client::IntoClientRequest,
        handshake::client::Request as ClientRequest,
        protocol::{CloseFrame, frame::coding::CloseCode},
    },
};

use super::{EVENT_TIMEOUT, QUIET_WINDOW, matchers::Matcher};

type WsStream = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Bound for a WebSocket handshake; generous because some scenarios open a
/// thousand sockets at once on a two-core machine.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// Bound for the server's answer to our close frame.
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// What the reader task hands to the test.
enum Incoming {
    Frame(Value),
    /// The server sent something the protocol does not allow (binary frame,
    /// text that is not JSON).
    Invalid(String),
    /// The connection ended: with the server's close code, or without a
    /// close frame.
    Closed {
        code: Option<u16>,
        detail: String,
    },
}

enum Polled {
    Frame(Value),
    TimedOut,
    Closed,
}

/// One user's presence as a `watch` or `query` reply states it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserState {
    pub user: String,
    pub online: bool,
    pub seq: u64,
}

impl UserState {
    pub fn new(user: &str, online: bool, seq: u64) -> Self {
        Self {
            user: user.to_owned(),
            online,
            seq,
        }
    }

    /// Parses `{"user":..,"online":..,"seq":..}`, panicking on any other shape.
    pub fn from_json(entry: &Value) -> Self {
        let parse = || {
            Some(UserState {
                user: entry["user"].as_str()?.to_owned(),
                online: entry["online"].as_bool()?,
                seq: entry["seq"].as_u64()?,
            })
        };
        parse().unwrap_or_else(|| panic!("malformed user state entry: {entry}"))
    }
}

/// A WebSocket connection to the gateway.
pub struct Client {
    label: String,
    sink: SplitSink<WsStream, Message>,
    incoming: mpsc::UnboundedReceiver<Incoming>,
    /// Frames received but not consumed yet, in arrival order.
    pending: VecDeque<Value>,
    /// Set once the connection has ended: (close code, how it ended).
    closed: Option<(Option<u16>, String)>,
    reader: JoinHandle<()>,
    welcome: Option<Value>,
    next_ref: u64,
}

impl Client {
    /// Opens a connection and reads the `welcome`, which must be the first
    /// frame.
    pub async fn connect(url: &str) -> Client {
        let mut client = Client::connect_without_welcome(url).await;
        let first = client.next_json(EVENT_TIMEOUT).await;
        assert_eq!(
            first["type"], "welcome",
            "{}: the first frame must be the welcome, got {first}",
            client.label
        );
        client.welcome = Some(first);
        client
    }

    /// Like [`Client::connect`], with extra handshake headers (`Origin`,
    /// `Authorization`).
    pub async fn connect_with_headers(url: &str, headers: &[(&str, &str)]) -> Client {
        let mut request = url.into_client_request().expect("a ws:// URL");
        for (name, value) in headers {
            request.headers_mut().insert(
                tokio_tungstenite::tungstenite::http::HeaderName::from_bytes(name.as_bytes())
                    .expect("header name"),
                value.parse().expect("header value"),
            );
        }
        let mut client = Client::open(url, request).await;
        let first = client.next_json(EVENT_TIMEOUT).await;
        assert_eq!(
            first["type"], "welcome",
            "the first frame must be the welcome, got {first}"
        );
        client.welcome = Some(first);
        client
    }

    /// Opens a connection and returns as soon as the upgrade is done, without
    /// waiting for the `welcome` (which stays queued as the first frame).
    pub async fn connect_without_welcome(url: &str) -> Client {
        let request = url.into_client_request().expect("a ws:// URL");
        Client::open(url, request).await
    }

    async fn open(url: &str, request: ClientRequest) -> Client {
        let label = url
            .split_once("user=")
            .map_or("anonymous", |(_, user)| user)
            .to_owned();
        let (stream, _response) = match timeout(CONNECT_TIMEOUT, connect_async(request)).await {
            Ok(Ok(connected)) => connected,
            Ok(Err(error)) => panic!("{label}: WebSocket connect to {url} failed: {error}"),
            Err(_) => panic!("{label}: WebSocket connect to {url} took over {CONNECT_TIMEOUT:?}"),
        };
        let (sink, stream) = stream.split();
        let (tx, incoming) = mpsc::unbounded_channel();
        let reader = tokio::spawn(read_frames(stream, tx));
        Client {
            label,
            sink,
            incoming,
            pending: VecDeque::new(),
            closed: None,
            reader,
            welcome: None,
            next_ref: 0,
        }
    }

    /// The `welcome` frame read by [`Client::connect`].
    pub fn welcome(&self) -> &Value {
        self.welcome
            .as_ref()
            .expect("this client was connected without waiting for its welcome")
    }

    pub fn label(&self) -> &str {
        &self.label
    }

    // ---- sending -----------------------------------------------------------

    pub async fn send_message(&mut self, message: Message) {
        if let Err(error) = timeout(EVENT_TIMEOUT, self.sink.send(message))
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "{}: sending a frame took over {EVENT_TIMEOUT:?}",
                    self.label
                )
            })
        {
            panic!("{}: sending a frame failed: {error}", self.label);
        }
    }

    /// Sends `frames` in one write, so all of them are on their way before
    /// the server answers (or closes on) the first.
    pub async fn send_json_burst(&mut self, frames: &[Value]) {
        let sent = async {
            for frame in frames {
                self.sink.feed(Message::text(frame.to_string())).await?;
            }
            self.sink.flush().await
        };
        match timeout(EVENT_TIMEOUT, sent).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => panic!("{}: sending a burst failed: {error}", self.label),
            Err(_) => panic!(
                "{}: sending a burst took over {EVENT_TIMEOUT:?}",
                self.label
            ),
        }
    }

    pub async fn send_json(&mut self, frame: Value) {
        self.send_message(Message::text(frame.to_string())).await;
    }

    pub async fn send_text(&mut self, text: impl Into<String>) {
        self.send_message(Message::text(text.into())).await;
    }

    pub async fn send_binary(&mut self, bytes: Vec<u8>) {
        self.send_message(Message::binary(bytes)).await;
    }

    /// A `ref` no earlier request of this client used.
    pub fn fresh_ref(&mut self) -> Value {
        self.next_ref += 1;
        json!(self.next_ref)
    }

    // ---- receiving ---------------------------------------------------------

    /// Takes one frame from the socket (not from `pending`).
    async fn poll_frame(&mut self, deadline: Instant) -> Polled {
        if self.closed.is_some() {
            return Polled::Closed;
        }
        match timeout_at(deadline, self.incoming.recv()).await {
            Err(_) => Polled::TimedOut,
            Ok(Some(Incoming::Frame(frame))) => Polled::Frame(frame),
            Ok(Some(Incoming::Invalid(what))) => panic!("{}: {what}", self.label),
            Ok(Some(Incoming::Closed { code, detail })) => {
                self.closed = Some((code, detail));
                Polled::Closed
            }
            Ok(None) => {
                self.closed = Some((None, "the reader task stopped".to_owned()));
                Polled::Closed
            }
        }
    }

    fn closed_description(&self) -> String {
        match &self.closed {
            Some((Some(code), detail)) => format!("closed with code {code} ({detail})"),
            Some((None, detail)) => format!("closed without a close code ({detail})"),
            None => "open".to_owned(),
        }
    }

    fn pending_description(&self) -> String {
        if self.pending.is_empty() {
            return "no other frame arrived".to_owned();
        }
        let frames: Vec<String> = self.pending.iter().map(Value::to_string).collect();
        format!("frames received meanwhile: [{}]", frames.join(", "))
    }

    /// The very next frame, in order; panics if none arrives in `within`.
    pub async fn next_json(&mut self, within: Duration) -> Value {
        if let Some(frame) = self.pending.pop_front() {
            return frame;
        }
        match self.poll_frame(Instant::now() + within).await {
            Polled::Frame(frame) => frame,
            Polled::TimedOut => panic!("{}: no frame arrived within {within:?}", self.label),
            Polled::Closed => panic!(
                "{}: connection {} while waiting for a frame",
                self.label,
                self.closed_description()
            ),
        }
    }

    /// The very next frame, or `None` if nothing arrives within `window`
    /// (a negative observation: keep the window short).
    pub async fn try_next_json(&mut self, window: Duration) -> Option<Value> {
        if let Some(frame) = self.pending.pop_front() {
            return Some(frame);
        }
        match self.poll_frame(Instant::now() + window).await {
            Polled::Frame(frame) => Some(frame),
            Polled::TimedOut => None,
            Polled::Closed => panic!(
                "{}: connection {} while waiting for a frame",
                self.label,
                self.closed_description()
            ),
        }
    }

    /// The very next frame, waiting at most [`EVENT_TIMEOUT`].
    pub async fn next_event(&mut self) -> Value {
        self.next_json(EVENT_TIMEOUT).await
    }

    /// Waits for the first frame matching `matcher`, keeping any other frame
    /// for later consumers.
    pub async fn expect_event(&mut self, matcher: Matcher) -> Value {
        self.expect_event_within(matcher, EVENT_TIMEOUT).await
    }

    pub async fn expect_event_within(&mut self, matcher: Matcher, within: Duration) -> Value {
        if let Some(index) = self.pending.iter().position(|frame| matcher.matches(frame)) {
            return self.pending.remove(index).expect("index is in range");
        }
        let deadline = Instant::now() + within;
        loop {
            match self.poll_frame(deadline).await {
                Polled::Frame(frame) if matcher.matches(&frame) => return frame,
                Polled::Frame(frame) => self.pending.push_back(frame),
                Polled::TimedOut => panic!(
                    "{}: expected {matcher} within {within:?}; {}",
                    self.label,
                    self.pending_description()
                ),
                Polled::Closed => panic!(
                    "{}: expected {matcher} but the connection {}; {}",
                    self.label,
                    self.closed_description(),
                    self.pending_description()
                ),
            }
        }
    }

    /// Asserts that no frame matching `matcher` has arrived or arrives within
    /// [`QUIET_WINDOW`]. Other frames are kept.
    pub async fn expect_no_event(&mut self, matcher: Matcher) {
        self.expect_no_event_within(matcher, QUIET_WINDOW).await
    }

    pub async fn expect_no_event_within(&mut self, matcher: Matcher, window: Duration) {
        if let Some(frame) = self.pending.iter().find(|frame| matcher.matches(frame)) {
            panic!("{}: expected no {matcher}, got {frame}", self.label);
        }
        let deadline = Instant::now() + window;
        loop {
            match self.poll_frame(deadline).await {
                Polled::Frame(frame) if matcher.matches(&frame) => {
                    panic!("{}: expected no {matcher}, got {frame}", self.label)
                }
                Polled::Frame(frame) => self.pending.push_back(frame),
                Polled::TimedOut => return,
                Polled::Closed => panic!(
                    "{}: expected no {matcher}, but the connection {}",
                    self.label,
                    self.closed_description()
                ),
            }
        }
    }

    /// Asserts that nothing at all arrives within [`QUIET_WINDOW`] and that
    /// nothing is left unconsumed.
    pub async fn expect_silence(&mut self) {
        self.expect_no_event(super::any_frame()).await
    }

    /// Waits for the server to end the connection; returns every frame
    /// that arrived before, and the close code.
    pub async fn frames_until_close(&mut self, within: Duration) -> (Vec<Value>, Option<u16>) {
        let code = self.expect_close(within).await;
        (self.pending.drain(..).collect(), code)
    }

    /// Waits for the server to end the connection and returns its close code
    /// (`None` if the connection ended without a close frame). Frames that
    /// arrive first are kept.
    pub async fn expect_close(&mut self, within: Duration) -> Option<u16> {
        let deadline = Instant::now() + within;
        loop {
            match self.poll_frame(deadline).await {
                Polled::Frame(frame) => self.pending.push_back(frame),
                Polled::Closed => return self.closed.as_ref().and_then(|(code, _)| *code),
                Polled::TimedOut => panic!(
                    "{}: expected the server to close the connection within {within:?}; {}",
                    self.label,
                    self.pending_description()
                ),
            }
        }
    }

    // ---- requests ----------------------------------------------------------

    /// Forgets the frames read but not yet consumed (a client that only
    /// cares about its latest reply, in a long run).
    pub fn forget_pending(&mut self) {
        self.pending.clear();
    }

    /// [`Client::request`] with a fresh `ref` added to `request`.
    pub async fn ask(&mut self, mut request: Value) -> Value {
        request["ref"] = self.fresh_ref();
        self.request(request).await
    }

    /// [`Client::request_ok`] with a fresh `ref` added to `request`.
    pub async fn ask_ok(&mut self, mut request: Value) -> Value {
        request["ref"] = self.fresh_ref();
        self.request_ok(request).await
    }

    /// Sends a request carrying a `ref` and returns the `reply`, `error` or
    /// `pong` that echoes it. Frames that arrive first are kept.
    pub async fn request(&mut self, request: Value) -> Value {
        let reference = request["ref"].clone();
        assert!(
            !reference.is_null(),
            "request() needs a request with a ref: {request}"
        );
        let answers = move |frame: &Value| {
            matches!(frame["type"].as_str(), Some("reply" | "error" | "pong"))
                && frame["ref"] == reference
        };
        self.send_json(request.clone()).await;
        let deadline = Instant::now() + EVENT_TIMEOUT;
        if let Some(index) = self.pending.iter().position(&answers) {
            return self.pending.remove(index).expect("index is in range");
        }
        loop {
            match self.poll_frame(deadline).await {
                Polled::Frame(frame) if answers(&frame) => return frame,
                Polled::Frame(frame) => self.pending.push_back(frame),
                Polled::TimedOut => panic!(
                    "{}: no answer to {request} within {EVENT_TIMEOUT:?}; {}",
                    self.label,
                    self.pending_description()
                ),
                Polled::Closed => panic!(
                    "{}: connection {} while waiting for the answer to {request}",
                    self.label,
                    self.closed_description()
                ),
            }
        }
    }

    /// Sends a request and asserts that the answer is `{"type":"reply","ok":true}`.
    pub async fn request_ok(&mut self, request: Value) -> Value {
        let reply = self.request(request.clone()).await;
        assert!(
            reply["type"] == "reply" && reply["ok"] == true,
            "{}: expected an ok reply to {request}, got {reply}",
            self.label
        );
        reply
    }

    /// Joins `room` and returns the member snapshot (user ids, in reply order).
    pub async fn join(&mut self, room: &str) -> Vec<String> {
        let reference = self.fresh_ref();
        let reply = self
            .request_ok(json!({"type": "join", "room": room, "ref": reference}))
            .await;
        assert_eq!(reply["room"], room, "join reply names the room: {reply}");
        reply["members"]
            .as_array()
            .unwrap_or_else(|| panic!("join reply without a members list: {reply}"))
            .iter()
            .map(|member| {
                member["user"]
                    .as_str()
                    .unwrap_or_else(|| panic!("malformed member in {reply}"))
                    .to_owned()
            })
            .collect()
    }

    pub async fn leave(&mut self, room: &str) {
        let reference = self.fresh_ref();
        let reply = self
            .request_ok(json!({"type": "leave", "room": room, "ref": reference}))
            .await;
        assert_eq!(reply["room"], room, "leave reply names the room: {reply}");
    }

    /// Watches `users` and returns their states from the reply.
    pub async fn watch(&mut self, users: &[&str]) -> Vec<UserState> {
        let reference = self.fresh_ref();
        let reply = self
            .request_ok(json!({"type": "watch", "users": users, "ref": reference}))
            .await;
        user_states(&reply)
    }

    pub async fn unwatch(&mut self, users: &[&str]) {
        let reference = self.fresh_ref();
        self.request_ok(json!({"type": "unwatch", "users": users, "ref": reference}))
            .await;
    }

    /// Queries `users` and returns their states from the reply.
    pub async fn query(&mut self, users: &[&str]) -> Vec<UserState> {
        let reference = self.fresh_ref();
        let reply = self
            .request_ok(json!({"type": "query", "users": users, "ref": reference}))
            .await;
        user_states(&reply)
    }

    /// The state of one user, by `query`.
    pub async fn query_one(&mut self, user: &str) -> UserState {
        let mut states = self.query(&[user]).await;
        assert_eq!(states.len(), 1, "query of one user answers one entry");
        states.remove(0)
    }

    /// Application-level ping; asserts the `pong` echoes the ref.
    pub async fn ping(&mut self) {
        let reference = self.fresh_ref();
        let pong = self
            .request(json!({"type": "ping", "ref": reference}))
            .await;
        assert_eq!(
            pong,
            json!({"type": "pong", "ref": reference}),
            "{}: ping must be answered by a pong",
            self.label
        );
    }

    // ---- ending ------------------------------------------------------------

    /// Clean close: sends a close frame (1000) and waits for the server's.
    /// Closes with 1000, a deliberate sign-out, and waits for the end of
    /// the close handshake.
    pub async fn close(self) {
        self.close_with(1000).await;
    }

    /// Closes with `code` (1001: a page going away, reloading) and waits
    /// for the end of the close handshake.
    pub async fn close_with(mut self, code: u16) {
        let frame = CloseFrame {
            code: CloseCode::from(code),
            reason: "".into(),
        };
        self.send_message(Message::Close(Some(frame))).await;
        let label = self.label.clone();
        let deadline = Instant::now() + CLOSE_TIMEOUT;
        loop {
            match self.poll_frame(deadline).await {
                Polled::Frame(_) => {}
                Polled::Closed => break,
                Polled::TimedOut => {
                    panic!(
                        "{label}: the server did not answer our close frame within {CLOSE_TIMEOUT:?}"
                    )
                }
            }
        }
        // The reader ends once the close handshake is over; then both halves
        // of the socket are gone and the TCP connection closes.
        let _ = timeout_at(deadline, &mut self.reader).await;
    }

    /// Drops the TCP connection without a close frame, as a crashed browser
    /// or a lost network would.
    pub async fn drop_tcp(mut self) {
        self.reader.abort();
        let _ = (&mut self.reader).await;
        // Dropping the sink drops the last half of the socket.
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// The `users` list of a watch/query reply.
fn user_states(reply: &Value) -> Vec<UserState> {
    reply["users"]
        .as_array()
        .unwrap_or_else(|| panic!("reply without a users list: {reply}"))
        .iter()
        .map(UserState::from_json)
        .collect()
}

/// Reads the socket until it ends. Reading also flushes tungstenite's
/// automatic answers (pongs, the close reply), so it goes on after a close
/// frame until the server ends the connection.
async fn read_frames(mut stream: SplitStream<WsStream>, tx: mpsc::UnboundedSender<Incoming>) {
    let mut saw_close = false;
    loop {
        let item = match stream.next().await {
            Some(Ok(Message::Text(text))) => match serde_json::from_str::<Value>(&text) {
                Ok(frame) => Incoming::Frame(frame),
                Err(error) => Incoming::Invalid(format!(
                    "server sent a text frame that is not JSON ({error}): {}",
                    text.as_str()
                )),
            },
            Some(Ok(Message::Binary(bytes))) => Incoming::Invalid(format!(
                "server sent a binary frame of {} bytes; the protocol only uses text frames",
                bytes.len()
            )),
            Some(Ok(Message::Close(frame))) => {
                saw_close = true;
                Incoming::Closed {
                    code: frame.map(|frame| u16::from(frame.code)),
                    detail: "the server sent a close frame".to_owned(),
                }
            }
            Some(Ok(_)) => continue, // ping, pong: tungstenite answers pings itself
            Some(Err(error)) => {
                if !saw_close {
                    let _ = tx.send(Incoming::Closed {
                        code: None,
                        detail: format!("the connection failed without a close frame: {error}"),
                    });
                }
                return;
            }
            None => {
                if !saw_close {
                    let _ = tx.send(Incoming::Closed {
                        code: None,
                        detail: "the connection ended without a close frame".to_owned(),
                    });
                }
                return;
            }
        };
        if tx.send(item).is_err() {
            return;
        }
    }
}
