//! The [`Conn`] actor: one per WebSocket, living on one worker for its life.
//!
//! The socket's read half is the actor's stream; its write half belongs to
//! a writer task draining the connection's bounded [`Outbox`]. A `Conn`
//! parses client frames (bad ones get an error frame and change nothing),
//! answers pings, keeps the heartbeat, and tells the registry what changed.
//! Every way a connection ends (clean close, EOF, error, idle timeout,
//! oversize frame, slow consumer) goes through [`Actor::stopped`], the one
//! disconnect path. A `Conn` never talks to the store.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use actix::prelude::*;
use futures_util::{Sink, Stream, StreamExt, stream::SplitStream};
use tokio_tungstenite::tungstenite::{
    Bytes, Error as WsError, Message as WsMessage, Utf8Bytes, protocol::CloseFrame,
};

use crate::{
    broadcast::SharedHub,
    ids::{ConnId, NodeId, UserId},
    metrics::{CloseReason, FrameKind, metrics},
    outbox::{Outbox, close_frame},
    protocol::{self, ErrorCode, Reason, Request},
    registry::{ConnEvent, RegistryLink},
};

/// Close code when nothing arrived within the idle timeout.
pub const IDLE_TIMEOUT: u16 = 1001;
/// Close code for a frame or message over the size limit.
pub const TOO_BIG: u16 = 1009;
/// Close code for a WebSocket protocol violation.
pub const PROTOCOL_ERROR: u16 = 1002;

/// What a `Conn` needs from its worker, fixed for its life.
#[derive(Clone)]
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
}

/// One WebSocket connection.
pub struct Conn {
    id: ConnId,
    user: UserId,
    meta: Option<Arc<str>>,
    settings: ConnSettings,
    registry: RegistryLink,
    hub: SharedHub,
    outbox: Outbox,
    last_heard: Instant,
    /// The close frame to send when the actor stops, if the server closes.
    close_with: Option<CloseFrame>,
    /// Why the connection ends, for the metrics.
    close_reason: CloseReason,
}

/// The writer gave up on the socket (outbox overflow or write error).
#[derive(Message)]
#[rtype(result = "()")]
struct WriterGone;

impl Conn {
    /// Starts a `Conn` on the current worker for an upgraded socket.
    pub fn start<S>(
        socket: S,
        user: UserId,
        meta: Option<Arc<str>>,
        settings: ConnSettings,
        registry: RegistryLink,
        hub: SharedHub,
    ) -> Addr<Conn>
    where
        S: Stream<Item = Result<WsMessage, WsError>> + Sink<WsMessage, Error = WsError> + 'static,
    {
        let (sink, stream): (_, SplitStream<S>) = socket.split();
        Conn::create(move |ctx| {
            ctx.add_stream(stream);
            let outbox = Outbox::new(settings.outbox_messages, settings.outbox_bytes);
            let addr = ctx.address();
            let gone = addr.clone();
            let writer = outbox.clone();
            actix_rt::spawn(async move {
                writer
                    .write_to(sink, move || gone.do_send(WriterGone))
                    .await;
                // A socket the writer could not write to is dead: stop
                // reading it too (a no-op once the actor has stopped).
                addr.do_send(WriterGone);
            });
            Conn {
                id: ConnId::new(),
                user,
                meta,
                settings,
                registry,
                hub,
                outbox,
                last_heard: Instant::now(),
                close_with: None,
                close_reason: CloseReason::Client,
            }
        })
    }

    fn send(&mut self, kind: FrameKind, frame: Utf8Bytes, ctx: &mut Context<Self>) {
        self.push(kind, WsMessage::Text(frame), ctx);
    }

    fn push(&mut self, kind: FrameKind, msg: WsMessage, ctx: &mut Context<Self>) {
        if self.outbox.push(msg).is_ok() {
            metrics().frames_sent.get(kind).inc();
        } else {
            self.close_reason = CloseReason::SlowConsumer;
            ctx.stop();
        }
    }

    fn send_error(&mut self, code: ErrorCode, frame: Utf8Bytes, ctx: &mut Context<Self>) {
        metrics().errors_sent.get(code).inc();
        self.send(FrameKind::Error, frame, ctx);
    }

    fn close(
        &mut self,
        why: CloseReason,
        code: u16,
        reason: &'static str,
        ctx: &mut Context<Self>,
    ) {
        self.close_reason = why;
        self.close_with = Some(close_frame(code, reason));
        ctx.stop();
    }

    fn on_text(&mut self, text: &str, ctx: &mut Context<Self>) {
        let received = &metrics().frames_received;
        match protocol::decode(text, self.settings.bounds) {
            Ok(frame) if frame.request == Request::Ping => {
                received.get(FrameKind::Ping).inc();
                self.send(
                    FrameKind::Pong,
                    protocol::pong_frame(frame.reference.as_ref()),
                    ctx,
                );
            }
            Ok(frame) => {
                received.get(frame_kind(&frame.request)).inc();
                self.registry
                    .send(ConnEvent::Request(self.id, frame.reference, frame.request));
            }
            Err(e) => {
                received.get(FrameKind::Invalid).inc();
                self.send_error(e.code, e.to_frame(), ctx);
            }
        }
    }

    fn heartbeat(&mut self, ctx: &mut Context<Self>) {
        if self.last_heard.elapsed() >= self.settings.idle_timeout {
            self.close(CloseReason::IdleTimeout, IDLE_TIMEOUT, "idle timeout", ctx);
        } else {
            self.push(FrameKind::Ping, WsMessage::Ping(Bytes::new()), ctx);
        }
    }
}

fn frame_kind(request: &Request) -> FrameKind {
    match request {
        Request::Join(..) => FrameKind::Join,
        Request::Leave(_) => FrameKind::Leave,
        Request::Watch(_) => FrameKind::Watch,
        Request::Unwatch(_) => FrameKind::Unwatch,
        Request::Query(_) => FrameKind::Query,
        Request::Room { .. } => FrameKind::Room,
        Request::Count => FrameKind::Count,
        Request::Ping => FrameKind::Ping,
    }
}

impl Actor for Conn {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        self.hub.borrow_mut().register(self.id, self.outbox.clone());
        self.registry.send(ConnEvent::Connected(
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
        self.send(FrameKind::Welcome, welcome, ctx);
        ctx.run_interval(self.settings.heartbeat, Self::heartbeat);
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
        self.registry.send(ConnEvent::Disconnected(self.id, reason));
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
                        metrics().frames_received.get(FrameKind::Invalid).inc();
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
                    WsMessage::Close(_) => ctx.stop(),
                }
            }
            Err(WsError::Capacity(_)) => {
                self.close(CloseReason::TooBig, TOO_BIG, "message too big", ctx);
            }
            Err(WsError::Protocol(_)) => {
                self.close(
                    CloseReason::ProtocolError,
                    PROTOCOL_ERROR,
                    "protocol error",
                    ctx,
                );
            }
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
