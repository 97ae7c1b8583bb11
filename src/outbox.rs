//! A connection's bounded write queue and the task that drains it.
//!
//! `actix::io::SinkWrite` queues without bound; here every frame for one
//! socket goes through an [`Outbox`] that counts frames and bytes. A slow
//! consumer is one that cannot keep up, not one that got a burst: a
//! broadcaster queues a whole store batch before the writer task gets to
//! run, so the bound may be passed for a moment. A connection whose queue
//! stays over the bound for [`SLOW_CONSUMER_GRACE`], or grows past
//! [`HARD_LIMIT_FACTOR`] times it, is closed with 4008 and its queue
//! dropped; a client that stops reading costs at most that much and slows
//! nobody else. A lone frame on an empty queue is always accepted. The
//! [`Conn`](crate::conn::Conn) and the worker's
//! [`Hub`](crate::broadcast::Hub) share one outbox per socket; both live on
//! the same worker thread, hence `Rc`. An idle outbox holds no buffer.

use std::{
    cell::{Cell, RefCell},
    collections::VecDeque,
    pin::pin,
    rc::Rc,
    time::Duration,
};

use tokio::time::Instant;

use futures_util::{Sink, SinkExt};
use tokio::sync::Notify;
use tokio_tungstenite::tungstenite::{Error as WsError, Message, protocol::CloseFrame};

use crate::close::CloseReason;

/// How long a closing socket may take to take its last frames.
pub const CLOSE_GRACE: Duration = Duration::from_secs(2);

/// How long a queue may stay over its bound before the connection counts
/// as a slow consumer.
pub const SLOW_CONSUMER_GRACE: Duration = Duration::from_secs(1);

/// A queue this many times over its bound is cut off at once.
pub const HARD_LIMIT_FACTOR: usize = 4;

/// The outbox passed its bound; the connection is being closed with 4008.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Overflow;

/// Shared handle to one socket's write queue.
#[derive(Clone)]
pub struct Outbox(Rc<Inner>);

struct Inner {
    queue: RefCell<VecDeque<Message>>,
    bytes: Cell<usize>,
    max_messages: usize,
    max_bytes: usize,
    /// Since when the queue has been over its bound, if it is.
    over_since: Cell<Option<Instant>>,
    /// Set once: no more frames are accepted; the writer sends what is
    /// queued, then this close frame (if any), then closes.
    closing: Cell<bool>,
    close_frame: RefCell<Option<CloseFrame>>,
    /// Set with `closing`: by then what is left must have been written.
    close_by: Cell<Option<Instant>>,
    /// Set when the queue was dropped: the writer stops at once.
    aborted: Cell<bool>,
    wake: Notify,
    /// Woken when the queue is dropped or the close starts.
    interrupt: Notify,
}

impl std::fmt::Debug for Outbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbox")
            .field("queued", &self.len())
            .field("bytes", &self.0.bytes.get())
            .field("closing", &self.is_closing())
            .finish()
    }
}

/// What the writer should do next.
enum Step {
    Send(Message),
    Close(Option<CloseFrame>),
    Wait,
}

impl Outbox {
    /// An empty outbox bounded by `max_messages` frames and `max_bytes`.
    pub fn new(max_messages: usize, max_bytes: usize) -> Self {
        Self(Rc::new(Inner {
            queue: RefCell::new(VecDeque::new()),
            bytes: Cell::new(0),
            max_messages,
            max_bytes,
            over_since: Cell::new(None),
            closing: Cell::new(false),
            close_frame: RefCell::new(None),
            close_by: Cell::new(None),
            aborted: Cell::new(false),
            wake: Notify::new(),
            interrupt: Notify::new(),
        }))
    }

    /// Queues a frame. A queue over its bound for longer than the grace, or
    /// far over it, is dropped, the socket is closed with 4008 and
    /// `Overflow` is returned. Frames pushed after a close are dropped
    /// silently: the socket is going away.
    pub fn push(&self, msg: Message) -> Result<(), Overflow> {
        let inner = &self.0;
        if inner.closing.get() {
            return Ok(());
        }
        let mut queue = inner.queue.borrow_mut();
        let messages = queue.len() + 1;
        let bytes = inner.bytes.get() + msg.len();
        if messages > inner.max_messages || bytes > inner.max_bytes {
            let far_over = messages > inner.max_messages * HARD_LIMIT_FACTOR
                || bytes > inner.max_bytes.saturating_mul(HARD_LIMIT_FACTOR);
            let now = Instant::now();
            let since = *inner.over_since.get().get_or_insert(now);
            inner.over_since.set(Some(since));
            if !queue.is_empty() && (far_over || now - since > SLOW_CONSUMER_GRACE) {
                drop(queue);
                self.abort(CloseReason::SlowConsumer.frame());
                return Err(Overflow);
            }
        }
        queue.push_back(msg);
        inner.bytes.set(bytes);
        drop(queue);
        inner.wake.notify_one();
        Ok(())
    }

    /// Sends what is queued, then `frame` (if any), then closes the socket,
    /// all within [`CLOSE_GRACE`].
    pub fn close(&self, frame: Option<CloseFrame>) {
        let inner = &self.0;
        if inner.closing.replace(true) {
            return;
        }
        *inner.close_frame.borrow_mut() = frame;
        inner.close_by.set(Some(Instant::now() + CLOSE_GRACE));
        inner.interrupt.notify_waiters();
        inner.wake.notify_one();
    }

    /// Drops what is queued and closes the socket with `frame` (if any) at
    /// once.
    pub fn abort(&self, frame: Option<CloseFrame>) {
        let inner = &self.0;
        if inner.aborted.replace(true) {
            return;
        }
        inner.queue.borrow_mut().clear();
        inner.bytes.set(0);
        inner.closing.set(true);
        *inner.close_frame.borrow_mut() = frame;
        inner.close_by.set(Some(Instant::now() + CLOSE_GRACE));
        inner.interrupt.notify_waiters();
        inner.wake.notify_one();
    }

    /// Frames waiting to be written.
    pub fn len(&self) -> usize {
        self.0.queue.borrow().len()
    }

    /// True when nothing waits to be written.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// True when the queue was dropped for overflowing.
    pub fn was_aborted(&self) -> bool {
        self.0.aborted.get()
    }

    /// True once the socket is closing: pushes are dropped.
    pub fn is_closing(&self) -> bool {
        self.0.closing.get()
    }

    fn next_step(&self) -> Step {
        let inner = &self.0;
        let mut queue = inner.queue.borrow_mut();
        if let Some(msg) = queue.pop_front() {
            let bytes = inner.bytes.get().saturating_sub(msg.len());
            inner.bytes.set(bytes);
            if queue.len() <= inner.max_messages && bytes <= inner.max_bytes {
                inner.over_since.set(None);
            }
            return Step::Send(msg);
        }
        drop(queue);
        if inner.closing.get() {
            return Step::Close(inner.close_frame.borrow_mut().take());
        }
        Step::Wait
    }

    /// Resolves once the queue was dropped.
    async fn aborted(&self) {
        loop {
            let mut woken = pin!(self.0.interrupt.notified());
            woken.as_mut().enable();
            if self.0.aborted.get() {
                return;
            }
            woken.await;
        }
    }

    /// Resolves once the socket is closing and its close grace is over.
    async fn close_grace_over(&self) {
        loop {
            let mut woken = pin!(self.0.interrupt.notified());
            woken.as_mut().enable();
            if let Some(deadline) = self.0.close_by.get() {
                tokio::time::sleep_until(deadline).await;
                return;
            }
            woken.await;
        }
    }

    /// Drains the outbox into `sink` until the socket closes, then hands
    /// the sink back (for the lingering close); runs as one task per
    /// connection on its worker. `on_done` runs once no more frames will be
    /// written (the queue is closing or was dropped, or the socket failed),
    /// before the close handshake, so the connection's presence goes away
    /// without waiting for a slow peer. Once closing, what is left (queued
    /// frames, then the Close frame) must be written within
    /// [`CLOSE_GRACE`]: a peer that takes nothing cannot hold the socket.
    pub async fn write_to<S>(self, mut sink: S, on_done: impl FnOnce()) -> S
    where
        S: Sink<Message, Error = WsError> + Unpin,
    {
        let mut on_done = Some(on_done);
        let mut done = move || {
            if let Some(f) = on_done.take() {
                f();
            }
        };
        loop {
            match self.next_step() {
                Step::Send(msg) => {
                    let write = async {
                        sink.feed(msg).await?;
                        if self.is_empty() {
                            sink.flush().await?;
                        }
                        Ok::<_, WsError>(())
                    };
                    let failed = tokio::select! {
                        biased;
                        // The queue is gone: on to its Close frame.
                        () = self.aborted() => false,
                        () = self.close_grace_over() => {
                            done();
                            return sink;
                        }
                        result = write => result.is_err(),
                    };
                    if failed {
                        done();
                        // Typically the peer's Close was read meanwhile
                        // (tungstenite refuses data after it): closing
                        // still sends the queued reply to that Close, so
                        // the peer sees a clean handshake, not a reset.
                        let _ = tokio::time::timeout(CLOSE_GRACE, sink.close()).await;
                        return sink;
                    }
                }
                Step::Close(frame) => {
                    done();
                    let deadline = self
                        .0
                        .close_by
                        .get()
                        .unwrap_or_else(|| Instant::now() + CLOSE_GRACE);
                    let _ = tokio::time::timeout_at(deadline, async {
                        if let Some(frame) = frame {
                            // Refused if the peer's Close crossed ours;
                            // closing still flushes the reply to it.
                            let _ = sink.send(Message::Close(Some(frame))).await;
                        }
                        sink.close().await
                    })
                    .await;
                    return sink;
                }
                Step::Wait => self.0.wake.notified().await,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_burst_over_the_bound_is_fine_if_it_drains_in_time() {
        let out = Outbox::new(2, 1 << 20);
        for _ in 0..2 * HARD_LIMIT_FACTOR {
            assert_eq!(out.push(Message::text("x")), Ok(()));
        }
        // The writer catches up: back under the bound, the clock resets.
        while out.len() > 2 {
            let _ = out.next_step();
        }
        tokio::time::advance(SLOW_CONSUMER_GRACE * 2).await;
        assert_eq!(out.push(Message::text("y")), Ok(()));
        assert!(!out.is_closing());
    }

    #[tokio::test(start_paused = true)]
    async fn staying_over_the_bound_past_the_grace_is_a_slow_consumer() {
        let out = Outbox::new(2, 1 << 20);
        for _ in 0..3 {
            assert_eq!(out.push(Message::text("x")), Ok(()));
        }
        tokio::time::advance(SLOW_CONSUMER_GRACE + Duration::from_millis(1)).await;
        assert_eq!(out.push(Message::text("late")), Err(Overflow));
        assert!(out.is_closing());
        assert!(out.is_empty(), "the queue is dropped");
        // Frames after the close are dropped, not queued.
        assert_eq!(out.push(Message::text("d")), Ok(()));
        assert!(out.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn far_over_the_bound_is_cut_off_at_once() {
        let out = Outbox::new(100, 10);
        assert_eq!(out.push(Message::text("12345")), Ok(()));
        assert_eq!(
            out.push(Message::text("123456")),
            Ok(()),
            "over, not far over"
        );
        assert_eq!(out.push(Message::text("x".repeat(40))), Err(Overflow));
        assert!(out.is_closing());
    }

    #[tokio::test(start_paused = true)]
    async fn a_lone_frame_bigger_than_the_bound_is_accepted() {
        let out = Outbox::new(100, 10);
        assert_eq!(out.push(Message::text("x".repeat(1000))), Ok(()));
        assert!(!out.is_closing());
    }

    /// A sink like a tungstenite socket whose peer has sent Close: data is
    /// refused; closing is what flushes the reply.
    #[derive(Default)]
    struct PeerClosed {
        closed: bool,
    }

    impl Sink<Message> for PeerClosed {
        type Error = WsError;
        fn poll_ready(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Result<(), WsError>> {
            std::task::Poll::Ready(Ok(()))
        }
        fn start_send(self: std::pin::Pin<&mut Self>, _: Message) -> Result<(), WsError> {
            Err(WsError::Protocol(
                tokio_tungstenite::tungstenite::error::ProtocolError::SendAfterClosing,
            ))
        }
        fn poll_flush(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Result<(), WsError>> {
            std::task::Poll::Ready(Ok(()))
        }
        fn poll_close(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Result<(), WsError>> {
            self.closed = true;
            std::task::Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn a_refused_frame_still_closes_the_socket() {
        let out = Outbox::new(10, 1000);
        out.push(Message::text("an event after the peer's Close"))
            .unwrap();
        let mut sink = PeerClosed::default();
        let mut done = false;
        out.write_to(&mut sink, || done = true).await;
        assert!(sink.closed, "the reply to the peer's Close is flushed");
        assert!(done, "the Conn is told the writer is done");
    }

    /// A sink whose peer takes nothing: never ready.
    struct Stuck;

    impl Sink<Message> for Stuck {
        type Error = WsError;
        fn poll_ready(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Result<(), WsError>> {
            std::task::Poll::Pending
        }
        fn start_send(self: std::pin::Pin<&mut Self>, _: Message) -> Result<(), WsError> {
            unreachable!("never ready")
        }
        fn poll_flush(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Result<(), WsError>> {
            std::task::Poll::Pending
        }
        fn poll_close(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Result<(), WsError>> {
            std::task::Poll::Pending
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_closing_socket_whose_peer_takes_nothing_is_given_up_after_the_grace() {
        let out = Outbox::new(10, 1000);
        out.push(Message::text("queued before the close")).unwrap();
        out.push(Message::text("and this")).unwrap();
        let mut done = false;
        let write = out.clone().write_to(Stuck, || done = true);
        let close = async {
            // The writer is stuck on the first frame when the close comes.
            tokio::task::yield_now().await;
            out.close(CloseReason::IdleTimeout.frame());
            Instant::now()
        };
        let (_, closed_at) =
            tokio::time::timeout(CLOSE_GRACE * 2, async { tokio::join!(write, close) })
                .await
                .expect("the writer gives up");
        assert!(done, "the Conn is told the writer is done");
        assert!(closed_at.elapsed() >= CLOSE_GRACE, "not before the grace");
    }

    #[tokio::test]
    async fn writer_sends_queued_frames_then_the_close_frame() {
        let out = Outbox::new(10, 1000);
        out.push(Message::text("one")).unwrap();
        out.push(Message::text("two")).unwrap();
        out.close(CloseReason::IdleTimeout.frame());
        let mut got: Vec<Message> = Vec::new();
        let sink = (&mut got).sink_map_err(|e: std::convert::Infallible| match e {});
        let _ = out.write_to(sink, || ()).await;
        assert_eq!(
            got,
            vec![
                Message::text("one"),
                Message::text("two"),
                Message::Close(CloseReason::IdleTimeout.frame())
            ]
        );
    }
}
