//! A connection's bounded write queue and the task that drains it.
//!
//! `actix::io::SinkWrite` queues without bound; here every frame for one
//! socket goes through an [`Outbox`] that counts frames and bytes and
//! refuses past its bound, so a client that stops reading costs at most the
//! bound and is then closed with 4008 instead of slowing anyone else. The
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

use futures_util::{Sink, SinkExt};
use tokio::sync::Notify;
use tokio_tungstenite::tungstenite::{
    Error as WsError, Message,
    protocol::{CloseFrame, frame::coding::CloseCode},
};

/// How long a closing socket may take to take its last frames.
pub const CLOSE_GRACE: Duration = Duration::from_secs(2);

/// Close code for a connection whose outbox overflowed.
pub const SLOW_CONSUMER: u16 = 4008;

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
    /// Set once: no more frames are accepted; the writer sends what is
    /// queued, then this close frame (if any), then closes.
    closing: Cell<bool>,
    close_frame: RefCell<Option<CloseFrame>>,
    /// Set when the queue was dropped: the writer stops at once.
    aborted: Cell<bool>,
    wake: Notify,
    abort: Notify,
}

/// What the writer should do next.
enum Step {
    Send(Message),
    Close(Option<CloseFrame>),
    Wait,
}

/// Builds a close frame.
pub fn close_frame(code: u16, reason: &'static str) -> CloseFrame {
    CloseFrame {
        code: CloseCode::from(code),
        reason: reason.into(),
    }
}

impl Outbox {
    /// An empty outbox bounded by `max_messages` frames and `max_bytes`.
    pub fn new(max_messages: usize, max_bytes: usize) -> Self {
        Self(Rc::new(Inner {
            queue: RefCell::new(VecDeque::new()),
            bytes: Cell::new(0),
            max_messages,
            max_bytes,
            closing: Cell::new(false),
            close_frame: RefCell::new(None),
            aborted: Cell::new(false),
            wake: Notify::new(),
            abort: Notify::new(),
        }))
    }

    /// Queues a frame. Past the bound the queue is dropped, the socket is
    /// closed with 4008 and `Overflow` is returned. Frames pushed after a
    /// close are dropped silently: the socket is going away.
    pub fn push(&self, msg: Message) -> Result<(), Overflow> {
        let inner = &self.0;
        if inner.closing.get() {
            return Ok(());
        }
        let len = msg.len();
        let mut queue = inner.queue.borrow_mut();
        if queue.len() >= inner.max_messages || inner.bytes.get() + len > inner.max_bytes {
            drop(queue);
            self.abort(close_frame(SLOW_CONSUMER, "slow consumer"));
            return Err(Overflow);
        }
        queue.push_back(msg);
        inner.bytes.set(inner.bytes.get() + len);
        drop(queue);
        inner.wake.notify_one();
        Ok(())
    }

    /// Sends what is queued, then `frame` (if any), then closes the socket.
    pub fn close(&self, frame: Option<CloseFrame>) {
        let inner = &self.0;
        if inner.closing.replace(true) {
            return;
        }
        *inner.close_frame.borrow_mut() = frame;
        inner.wake.notify_one();
    }

    /// Drops what is queued and closes the socket with `frame` at once.
    pub fn abort(&self, frame: CloseFrame) {
        let inner = &self.0;
        if inner.aborted.replace(true) {
            return;
        }
        inner.queue.borrow_mut().clear();
        inner.bytes.set(0);
        inner.closing.set(true);
        *inner.close_frame.borrow_mut() = Some(frame);
        inner.abort.notify_waiters();
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

    /// True once the socket is closing: pushes are dropped.
    pub fn is_closing(&self) -> bool {
        self.0.closing.get()
    }

    fn next_step(&self) -> Step {
        let inner = &self.0;
        if let Some(msg) = inner.queue.borrow_mut().pop_front() {
            inner.bytes.set(inner.bytes.get().saturating_sub(msg.len()));
            return Step::Send(msg);
        }
        if inner.closing.get() {
            return Step::Close(inner.close_frame.borrow_mut().take());
        }
        Step::Wait
    }

    async fn aborted(&self) {
        loop {
            let notified = self.0.abort.notified();
            let mut notified = pin!(notified);
            notified.as_mut().enable();
            if self.0.aborted.get() {
                return;
            }
            notified.await;
        }
    }

    /// Drains the outbox into `sink` until the socket closes; runs as one
    /// task per connection on its worker. `on_abort` runs as soon as an
    /// overflow aborts the queue, before the (bounded) close handshake, so
    /// the connection's presence goes away without waiting for a slow peer.
    pub async fn write_to<S>(self, mut sink: S, on_abort: impl FnOnce())
    where
        S: Sink<Message, Error = WsError> + Unpin,
    {
        let mut on_abort = Some(on_abort);
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
                    tokio::select! {
                        biased;
                        () = self.aborted() => {}
                        result = write => if result.is_err() { return },
                    }
                }
                Step::Close(frame) => {
                    if self.0.aborted.get()
                        && let Some(f) = on_abort.take()
                    {
                        f();
                    }
                    let _ = tokio::time::timeout(CLOSE_GRACE, async {
                        if let Some(frame) = frame {
                            sink.send(Message::Close(Some(frame))).await?;
                        }
                        sink.close().await
                    })
                    .await;
                    return;
                }
                Step::Wait => self.0.wake.notified().await,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overflow_by_count_drops_the_queue_and_closes() {
        let out = Outbox::new(2, 1 << 20);
        assert_eq!(out.push(Message::text("a")), Ok(()));
        assert_eq!(out.push(Message::text("b")), Ok(()));
        assert_eq!(out.push(Message::text("c")), Err(Overflow));
        assert!(out.is_closing());
        assert!(out.is_empty());
        // Frames after the close are dropped, not queued.
        assert_eq!(out.push(Message::text("d")), Ok(()));
        assert!(out.is_empty());
    }

    #[test]
    fn overflow_by_bytes() {
        let out = Outbox::new(100, 10);
        assert_eq!(out.push(Message::text("12345")), Ok(()));
        assert_eq!(out.push(Message::text("123456")), Err(Overflow));
    }

    #[tokio::test]
    async fn writer_sends_queued_frames_then_the_close_frame() {
        let out = Outbox::new(10, 1000);
        out.push(Message::text("one")).unwrap();
        out.push(Message::text("two")).unwrap();
        out.close(Some(close_frame(1001, "bye")));
        let mut got: Vec<Message> = Vec::new();
        let sink = (&mut got).sink_map_err(|e: std::convert::Infallible| match e {});
        out.write_to(sink, || panic!("not aborted")).await;
        assert_eq!(
            got,
            vec![
                Message::text("one"),
                Message::text("two"),
                Message::Close(Some(close_frame(1001, "bye")))
            ]
        );
    }
}
