//! The [`Conn`] actor: one per WebSocket, living on one worker for its life.
//!
//! The socket's read half is the actor's stream; its write half belongs to
//! a writer task draining the connection's bounded [`Outbox`], which takes
//! the read half back for the lingering close ([`linger`]) once it is done,
//! and holds the connection's slot until the socket is closed. A `Conn`
//! parses client frames (bad ones get an error frame and change nothing),
//! enforces what the connection's token allows (rooms, watched users, the
//! feed), its rate limit and its room and watch bounds, answers pings and
//! token refreshes, closes it when its token expires, keeps the heartbeat,
//! and tells the registry what changed.
//! Every way a connection ends (clean close, EOF, error, idle timeout,
//! oversize frame, slow consumer) goes through [`Actor::stopped`], the one
//! disconnect path. A `Conn` never talks to the store.

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, Instant},
};

use actix::prelude::*;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_tungstenite::{
    WebSocketStream,
    tungstenite::{
        Bytes, Error as WsError, Message as WsMessage, Utf8Bytes,
        error::ProtocolError,
        protocol::{CloseFrame, frame::coding::CloseCode},
    },
};

use crate::{
    auth::{Grants, Identity, Verifier, now_s},
    broadcast::{SharedHub, SubChange},
    close::CloseReason,
    ids::{ConnId, Meta, NodeId, RoomName, UserId},
    linger,
    metrics::{Received, Sent, metrics},
    outbox::Outbox,
    protocol::{self, ClientFrame, Ends, ErrorCode, Reason, ReplyBody, Request},
    rate::{RateLimiter, Verdict},
    registry::{Notice, RegistryLink},
    slots::Slot,
};

/// Longest single wait of the expiry timer; it re-arms past that.
const EXPIRY_CHECK_MAX: Duration = Duration::from_secs(3600);

/// What a `Conn` needs from its worker, fixed for its life.
#[derive(Clone, Debug)]
pub struct ConnSettings {
    /// This node.
    pub node: NodeId,
    /// Interval between server pings.
    pub heartbeat: Duration,
    /// Silence after which the connection is closed.
    pub idle_timeout: Duration,
    /// What a client frame may ask for.
    pub bounds: protocol::Bounds,
    /// Outbox bound in frames.
    pub outbox_messages: usize,
    /// Outbox bound in bytes.
    pub outbox_bytes: usize,
    /// Verifies `refresh` tokens (`None`: `--dev` without a key).
    pub verifier: Option<Arc<Verifier>>,
    /// Most rooms one connection may be in.
    pub max_rooms: usize,
    /// Most users one connection may watch.
    pub max_watch: usize,
    /// Sustained client messages per second.
    pub rate_limit: u32,
    /// Client messages at once above the rate.
    pub rate_burst: u32,
    /// `update` frames per second (and at once), apart from `rate_limit`.
    pub max_update_rate: u32,
    /// Shortest time between two room-state writes of one room.
    pub state_every: Duration,
}

/// One room's state writes of a connection: when the next may go, and
/// the update waiting for that moment (latest wins).
#[derive(Debug)]
struct StateTurn {
    next_at: Instant,
    waiting: Option<(Option<serde_json::Value>, Meta)>,
}

/// One WebSocket connection.
pub struct Conn {
    id: ConnId,
    user: UserId,
    meta: Option<Meta>,
    /// The token set the metadata: the client may not replace it.
    meta_locked: bool,
    grants: Arc<Grants>,
    /// The token's `exp`, Unix seconds.
    expires_at: Option<u64>,
    /// The timer that closes the connection at `expires_at` + leeway.
    expiry: Option<SpawnHandle>,
    rate: RateLimiter,
    /// `update` frames have their own bound: a cursor sends many.
    update_rate: RateLimiter,
    /// Per room, the pacing of this connection's state writes.
    states: HashMap<RoomName, StateTurn>,
    settings: ConnSettings,
    registry: RegistryLink,
    hub: SharedHub,
    outbox: Outbox,
    last_heard: Instant,
    /// The close frame to send when the actor stops, if the server closes.
    close_with: Option<CloseFrame>,
    /// Why the connection ends, for the metrics.
    close_reason: CloseReason,
    /// The client closed with 1000: a deliberate sign-out, whose presence
    /// ends at once rather than after the grace.
    signed_out: bool,
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn")
            .field("id", &self.id)
            .field("user", &self.user)
            .field("outbox", &self.outbox)
            .finish_non_exhaustive()
    }
}

/// The writer gave up on the socket (outbox overflow or write error).
#[derive(Message)]
#[rtype(result = "()")]
struct WriterGone;

impl Conn {
    /// Starts a `Conn` on the current worker for an upgraded socket, which
    /// holds `slot` until it is closed.
    pub fn start<T>(
        socket: WebSocketStream<T>,
        identity: Identity,
        slot: Option<Slot>,
        settings: ConnSettings,
        registry: RegistryLink,
        hub: SharedHub,
    ) -> Addr<Conn>
    where
        T: AsyncRead + AsyncWrite + Unpin + 'static,
    {
        let (sink, reader, tail) = linger::split(socket);
        Conn::create(move |ctx| {
            ctx.add_stream(reader);
            let outbox = Outbox::new(settings.outbox_messages, settings.outbox_bytes);
            let gone = ctx.address();
            let writer = outbox.clone();
            actix_rt::spawn(async move {
                // Once the writer is done the Conn stops (a no-op if it
                // already has): a socket it cannot write to is dead, and
                // presence must not wait for the linger below.
                let sink = writer
                    .write_to(sink, move || gone.do_send(WriterGone))
                    .await;
                // Boxed: what the linger holds is allocated when it runs,
                // not kept in every connection's task while it is idle.
                Box::pin(tail.linger(sink)).await;
                // The socket is closed only now: so is its place in the
                // node's bounds, and the drain waits for it.
                drop(slot);
            });
            Conn {
                id: ConnId::new(),
                user: identity.user,
                meta: identity.meta,
                meta_locked: identity.meta_locked,
                grants: identity.grants,
                expires_at: identity.expires_at,
                expiry: None,
                rate: RateLimiter::new(settings.rate_limit, settings.rate_burst, Instant::now()),
                update_rate: RateLimiter::new(
                    settings.max_update_rate,
                    settings.max_update_rate,
                    Instant::now(),
                ),
                states: HashMap::new(),
                settings,
                registry,
                hub,
                outbox,
                last_heard: Instant::now(),
                close_with: None,
                close_reason: CloseReason::Client,
                signed_out: false,
            }
        })
    }

    fn send(&mut self, kind: Sent, frame: Utf8Bytes, ctx: &mut Context<Self>) {
        self.push(kind, WsMessage::Text(frame), ctx);
    }

    fn push(&mut self, kind: Sent, msg: WsMessage, ctx: &mut Context<Self>) {
        if self.outbox.push(msg).is_ok() {
            metrics().frames_sent.get(kind).inc();
        } else {
            self.close_reason = CloseReason::SlowConsumer;
            ctx.stop();
        }
    }

    fn send_error(&mut self, code: ErrorCode, frame: Utf8Bytes, ctx: &mut Context<Self>) {
        metrics().errors_sent.get(code).inc();
        self.send(Sent::Error, frame, ctx);
    }

    /// Closes the connection with `why`'s close frame (see [`crate::close`]).
    fn close(&mut self, why: CloseReason, ctx: &mut Context<Self>) {
        self.close_reason = why;
        self.close_with = why.frame();
        ctx.stop();
    }

    /// Counts a client message against the rate limit (an `update`
    /// against `--max-update-rate`); false when it must be dropped (an
    /// error was sent, or the connection is closing).
    fn within_rate(
        &mut self,
        reference: Option<&serde_json::Value>,
        update: bool,
        ctx: &mut Context<Self>,
    ) -> bool {
        let limiter = if update {
            &mut self.update_rate
        } else {
            &mut self.rate
        };
        match limiter.check(Instant::now()) {
            Verdict::Allow => true,
            Verdict::Refuse => {
                metrics().frames_received.get(Received::RateLimited).inc();
                let message = if update {
                    format!(
                        "over {} updates per second (--max-update-rate): this update was dropped",
                        self.settings.max_update_rate
                    )
                } else {
                    format!(
                        "over {} messages per second (burst {}): this message was dropped",
                        self.settings.rate_limit, self.settings.rate_burst
                    )
                };
                let frame = protocol::error_frame(reference, ErrorCode::RateLimited, &message);
                self.send_error(ErrorCode::RateLimited, frame, ctx);
                false
            }
            Verdict::Close => {
                metrics().frames_received.get(Received::RateLimited).inc();
                self.close(CloseReason::RateLimited, ctx);
                false
            }
        }
    }

    fn on_text(&mut self, text: &str, ctx: &mut Context<Self>) {
        let decoded = protocol::decode(text, self.settings.bounds);
        let (reference, update) = match &decoded {
            Ok(frame) => (
                frame.reference.as_ref(),
                matches!(frame.request, Request::Update(..)),
            ),
            Err(e) => (e.reference.as_ref(), false),
        };
        if !self.within_rate(reference, update, ctx) {
            return;
        }
        match decoded {
            Ok(frame) => {
                metrics()
                    .frames_received
                    .get(Received::Request((&frame.request).into()))
                    .inc();
                self.on_request(frame, ctx);
            }
            Err(e) => {
                metrics().frames_received.get(Received::Invalid).inc();
                self.send_error(e.code, e.to_frame(), ctx);
            }
        }
    }

    fn refuse(
        &mut self,
        reference: Option<&serde_json::Value>,
        code: ErrorCode,
        message: &str,
        ctx: &mut Context<Self>,
    ) {
        let frame = protocol::error_frame(reference, code, message);
        self.send_error(code, frame, ctx);
    }

    /// Checks a decoded request against the token's grants and the
    /// connection's bounds (counted in the worker's record of it, with
    /// what is still in flight); answers it here or passes it to the
    /// registry.
    fn on_request(&mut self, frame: ClientFrame, ctx: &mut Context<Self>) {
        let ClientFrame { reference, request } = frame;
        let r = reference.as_ref();
        if let Some(room) = request.room_to_grant()
            && !self.grants.may_join(room)
        {
            let message = format!("this token does not allow room {room}");
            self.refuse(r, ErrorCode::Forbidden, &message, ctx);
            return;
        }
        match &request {
            Request::Ping => {
                self.send(Sent::Pong, protocol::pong_frame(r), ctx);
                return;
            }
            Request::Refresh(token) => {
                self.refresh(r, token, ctx);
                return;
            }
            Request::SubscribeFeed | Request::UnsubscribeFeed => {
                let on = request == Request::SubscribeFeed;
                if on && !self.grants.may_read_feed() {
                    let message =
                        "this token does not allow the global feed (claim \"feed\": true)";
                    self.refuse(r, ErrorCode::Forbidden, message, ctx);
                    return;
                }
                self.hub.borrow_mut().set_feed(self.id, on);
                let reply = protocol::reply_frame(r, &ReplyBody::Empty {});
                self.send(Sent::Reply, reply, ctx);
                return;
            }
            Request::Join(room, meta) => {
                if meta.is_some() && self.meta_locked {
                    let message =
                        "this connection's meta comes from its token and cannot be replaced";
                    self.refuse(r, ErrorCode::Forbidden, message, ctx);
                    return;
                }
                let max = self.settings.max_rooms;
                let fits = self
                    .hub
                    .borrow()
                    .subscriber(&self.id)
                    .is_some_and(|record| record.may_join(room, max));
                if !fits {
                    let message =
                        format!("a connection may be in at most {max} rooms (--max-rooms)");
                    self.refuse(r, ErrorCode::LimitExceeded, &message, ctx);
                    return;
                }
            }
            Request::Update(..) => {
                if let Request::Update(room, state) = request {
                    self.update(reference, room, state, ctx);
                }
                return;
            }
            Request::Leave(room) => {
                // A state waiting for its turn goes no further.
                if let Some((waiting, _)) = self.states.remove(room).and_then(|t| t.waiting) {
                    self.superseded(waiting.as_ref(), room.clone(), ctx);
                }
            }
            Request::Watch(users) | Request::Query(users) => {
                if let Some(user) = users.iter().find(|u| !self.grants.may_watch(u)) {
                    let message = format!("this token does not allow watching user {user}");
                    self.refuse(r, ErrorCode::Forbidden, &message, ctx);
                    return;
                }
                let max = self.settings.max_watch;
                let (held, new) = match &request {
                    Request::Watch(users) => self
                        .hub
                        .borrow()
                        .subscriber(&self.id)
                        .map_or((0, 0), |record| record.watch_counts(users)),
                    _ => (0, 0),
                };
                if held + new > max {
                    let message = format!(
                        "a connection may watch at most {max} users (--max-watch); it watches {held}"
                    );
                    self.refuse(r, ErrorCode::LimitExceeded, &message, ctx);
                    return;
                }
            }
            // Everything else is the registry's to answer.
            _ => {}
        }
        self.pass_on(reference, request);
    }

    fn pass_on(&mut self, reference: Option<serde_json::Value>, request: Request) {
        self.hub
            .borrow_mut()
            .ask(&self.id, &SubChange::of(&request));
        self.registry
            .send(Notice::Request(self.id, reference, request));
    }

    /// `update`: written at once if this room's last write is at least
    /// `state_every` ago, else held for that moment; an update arriving
    /// while one is held replaces it, and the replaced one is answered
    /// `superseded` (nobody ever sees it).
    fn update(
        &mut self,
        reference: Option<serde_json::Value>,
        room: RoomName,
        state: Meta,
        ctx: &mut Context<Self>,
    ) {
        // Refused here, so a client cannot grow `states` with rooms it is
        // not in (the registry checks again: a leave may be racing).
        let member = self
            .hub
            .borrow()
            .subscriber(&self.id)
            .is_some_and(|record| record.will_be_in(&room));
        if !member {
            let message = format!("not in room {room}: join it before updating its state");
            self.refuse(reference.as_ref(), ErrorCode::NotJoined, &message, ctx);
            return;
        }
        let now = Instant::now();
        let every = self.settings.state_every;
        let turn = self.states.entry(room.clone()).or_insert(StateTurn {
            next_at: now,
            waiting: None,
        });
        if let Some((replaced, _)) = turn.waiting.replace((reference.clone(), state.clone())) {
            self.superseded(replaced.as_ref(), room, ctx);
            return;
        }
        if now >= turn.next_at {
            turn.waiting = None;
            turn.next_at = now + every;
            self.pass_on(reference, Request::Update(room, state));
            return;
        }
        let wait = turn.next_at - now;
        ctx.run_later(wait, move |conn, _| conn.state_turn(room));
    }

    /// A room's held update, at its turn.
    fn state_turn(&mut self, room: RoomName) {
        let Some(turn) = self.states.get_mut(&room) else {
            return;
        };
        let Some((reference, state)) = turn.waiting.take() else {
            return;
        };
        turn.next_at = Instant::now() + self.settings.state_every;
        self.pass_on(reference, Request::Update(room, state));
    }

    fn superseded(
        &mut self,
        reference: Option<&serde_json::Value>,
        room: RoomName,
        ctx: &mut Context<Self>,
    ) {
        let body = ReplyBody::Updated {
            room,
            superseded: true,
        };
        self.send(Sent::Reply, protocol::reply_frame(reference, &body), ctx);
    }

    /// `refresh`: a new token for the same user replaces the grants and
    /// the expiry.
    fn refresh(&mut self, r: Option<&serde_json::Value>, token: &str, ctx: &mut Context<Self>) {
        let (Some(verifier), Some(_)) = (self.settings.verifier.clone(), self.expires_at) else {
            let message = "this connection was not opened with a token: nothing to refresh";
            self.refuse(r, ErrorCode::BadRequest, message, ctx);
            return;
        };
        let identity = match verifier.verify(token) {
            Ok(identity) => identity,
            Err(e) => {
                let message = format!("{}: {e}", e.code());
                self.refuse(r, ErrorCode::InvalidToken, &message, ctx);
                return;
            }
        };
        if identity.user != self.user {
            let message = "the new token is for another user";
            self.refuse(r, ErrorCode::Forbidden, message, ctx);
            return;
        }
        if !identity.grants.may_read_feed() {
            self.hub.borrow_mut().set_feed(self.id, false);
        }
        self.grants = identity.grants;
        self.expires_at = identity.expires_at;
        self.arm_expiry(ctx);
        let expires_at = identity.expires_at.unwrap_or_default();
        let reply = protocol::reply_frame(r, &ReplyBody::Refreshed { expires_at });
        self.send(Sent::Reply, reply, ctx);
    }

    /// (Re)starts the timer that closes the connection with 4001 once its
    /// token is past `exp` + leeway.
    fn arm_expiry(&mut self, ctx: &mut Context<Self>) {
        if let Some(handle) = self.expiry.take() {
            ctx.cancel_future(handle);
        }
        let Some(exp) = self.expires_at else {
            return;
        };
        let leeway = self.settings.verifier.as_ref().map_or(0, |v| v.leeway());
        let deadline = exp.saturating_add(leeway);
        let now = now_s();
        if now >= deadline {
            self.close(CloseReason::TokenExpired, ctx);
            return;
        }
        let wait = Duration::from_secs(deadline - now).min(EXPIRY_CHECK_MAX);
        self.expiry = Some(ctx.run_later(wait, |conn, ctx| {
            conn.expiry = None;
            conn.arm_expiry(ctx);
        }));
    }

    fn heartbeat(&mut self, ctx: &mut Context<Self>) {
        if self.last_heard.elapsed() >= self.settings.idle_timeout {
            self.close(CloseReason::IdleTimeout, ctx);
        } else {
            self.push(Sent::Ping, WsMessage::Ping(Bytes::new()), ctx);
        }
    }
}

impl Actor for Conn {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        self.hub.borrow_mut().register(self.id, self.outbox.clone());
        self.registry.send(Notice::Connected(
            self.id,
            self.user.clone(),
            self.meta.take(),
        ));
        let welcome = protocol::welcome_frame(
            self.id,
            &self.user,
            self.settings.node,
            self.settings.heartbeat.as_millis() as u64,
        );
        metrics().connections_opened.inc();
        metrics().connections_open.inc();
        self.send(Sent::Welcome, welcome, ctx);
        ctx.run_interval(self.settings.heartbeat, Self::heartbeat);
        self.arm_expiry(ctx);
    }

    fn stopped(&mut self, _: &mut Context<Self>) {
        metrics().connections_open.dec();
        metrics().connections_closed.get(self.close_reason).inc();
        self.hub.borrow_mut().unregister(&self.id);
        let reason = match self.close_reason {
            CloseReason::IdleTimeout => Reason::Timeout,
            CloseReason::Shutdown => Reason::Shutdown,
            _ => Reason::Closed,
        };
        let ends = if self.signed_out && self.close_reason == CloseReason::Client {
            Ends::Now
        } else {
            Ends::AfterGrace
        };
        self.registry
            .send(Notice::Disconnected(self.id, reason, ends));
        self.outbox.close(self.close_with.take());
    }
}

impl StreamHandler<Result<WsMessage, WsError>> for Conn {
    fn handle(&mut self, item: Result<WsMessage, WsError>, ctx: &mut Context<Self>) {
        match item {
            Ok(msg) => {
                self.last_heard = Instant::now();
                match msg {
                    WsMessage::Text(text) => self.on_text(&text, ctx),
                    WsMessage::Binary(_) => {
                        if !self.within_rate(None, false, ctx) {
                            return;
                        }
                        metrics().frames_received.get(Received::Invalid).inc();
                        self.send_error(
                            ErrorCode::BadRequest,
                            protocol::error_frame(
                                None,
                                ErrorCode::BadRequest,
                                "binary frames are not accepted: send JSON text frames",
                            ),
                            ctx,
                        );
                    }
                    // tungstenite answers pings itself and replies to a
                    // close; the stream ends after a close.
                    WsMessage::Ping(_) | WsMessage::Pong(_) | WsMessage::Frame(_) => {}
                    WsMessage::Close(frame) => {
                        self.signed_out = frame.is_some_and(|f| f.code == CloseCode::Normal);
                        ctx.stop();
                    }
                }
            }
            Err(WsError::Capacity(_)) => self.close(CloseReason::TooBig, ctx),
            // tungstenite checks text messages (and Close reasons) for
            // UTF-8; RFC 6455 section 7.4.1 has 1007 for that.
            Err(WsError::Utf8(_)) => self.close(CloseReason::InvalidPayload, ctx),
            // The TCP connection ended without a Close: the client went
            // away, it broke no rule, and nobody is left to tell.
            Err(WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake)) => ctx.stop(),
            Err(WsError::Protocol(_)) => self.close(CloseReason::ProtocolError, ctx),
            Err(_) => ctx.stop(),
        }
    }
}

impl Handler<WriterGone> for Conn {
    type Result = ();

    fn handle(&mut self, _: WriterGone, ctx: &mut Context<Self>) {
        self.close_reason = if self.outbox.was_aborted() {
            CloseReason::SlowConsumer
        } else if self.outbox.is_closing() {
            // Only the hub's drain closes an outbox under a live Conn.
            CloseReason::Shutdown
        } else {
            CloseReason::WriteError
        };
        ctx.stop();
    }
}
