//! The lingering close: the Close frame reaches a client that keeps sending.
//!
//! Closing a TCP socket with unread data in its receive buffer makes the
//! kernel answer with a reset, and the reset destroys what is still on its
//! way to the peer, the Close frame included: a client that wrote a flood
//! in one go would see 1006 instead of 4029, the rest of an oversized frame
//! would turn 1009 into 1006. So once its Close frame is out, the writer
//! goes on reading, and discarding, what the peer sends until the peer's
//! own Close (or the end of the connection) or [`LINGER`], and only then
//! closes the socket, as nginx's lingering close does.
//!
//! The read half is shared: [`split`] gives the [`Conn`](crate::conn::Conn)
//! a [`Reader`], its stream of frames while it lives, and the writer task a
//! [`Tail`], with which it takes the read half back when it is done writing
//! and rejoins it with the write half ([`Tail::linger`]). Both live on the
//! connection's worker thread, hence `Rc`. The Conn has stopped and told
//! the registry before any of this: presence never waits for a linger, only
//! the socket (and its connection slot) does.
//!
//! While tungstenite can still parse the peer's frames, the linger reads
//! frames, so the peer's Close ends it at once. After tungstenite gave up
//! on the stream (an oversized frame, a protocol error, invalid UTF-8: its
//! stream ends there), only bytes can be drained: the write half is shut
//! down, which tells the peer that nothing more comes, and bytes are read
//! until the peer closes too.

use std::{
    cell::RefCell,
    pin::Pin,
    rc::Rc,
    task::{Context, Poll, ready},
    time::Duration,
};

use futures_util::{
    Stream, StreamExt,
    stream::{SplitSink, SplitStream},
};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    time::{Instant, timeout_at},
};
use tokio_tungstenite::{
    WebSocketStream,
    tungstenite::{Error as WsError, Message},
};

/// Longest wait for the peer's Close after ours.
pub const LINGER: Duration = Duration::from_secs(1);

/// The write half of a connection's socket.
pub type WriteHalf<T> = SplitSink<WebSocketStream<T>, Message>;

/// The Conn's side of the read half: its stream of frames.
#[derive(Debug)]
pub struct Reader<T>(Rc<RefCell<ReadHalf<T>>>);

/// The writer's side of the read half: what it lingers with.
#[derive(Debug)]
pub struct Tail<T>(Rc<RefCell<ReadHalf<T>>>);

#[derive(Debug)]
struct ReadHalf<T> {
    /// `None` once the writer took it back.
    frames: Option<SplitStream<WebSocketStream<T>>>,
    state: ReadState,
}

/// How far the Conn read the peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReadState {
    /// Frames can still be read.
    Open,
    /// The peer's Close was read (or the stream ended after it): the peer
    /// sends nothing more.
    PeerClosed,
    /// tungstenite gave up on the stream: only bytes are left to drain.
    Failed,
}

/// Splits an upgraded socket into its write half, the Conn's [`Reader`]
/// and the writer's [`Tail`].
pub fn split<T>(socket: WebSocketStream<T>) -> (WriteHalf<T>, Reader<T>, Tail<T>)
where
    T: AsyncRead + AsyncWrite + Unpin,
{
    let (sink, frames) = socket.split();
    let read = Rc::new(RefCell::new(ReadHalf {
        frames: Some(frames),
        state: ReadState::Open,
    }));
    (sink, Reader(read.clone()), Tail(read))
}

impl<T> Stream for Reader<T>
where
    T: AsyncRead + AsyncWrite + Unpin,
{
    type Item = Result<Message, WsError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let mut read = self.0.borrow_mut();
        // Taken back by the writer: the Conn is stopping (the writer told
        // it), so there is nothing more for it to read, and no end either,
        // which would stop it before it knows why.
        let Some(frames) = read.frames.as_mut() else {
            return Poll::Pending;
        };
        let item = ready!(frames.poll_next_unpin(cx));
        match &item {
            Some(Ok(Message::Close(_))) | None => read.state = ReadState::PeerClosed,
            Some(Err(_)) => read.state = ReadState::Failed,
            Some(Ok(_)) => {}
        }
        Poll::Ready(item)
    }
}

impl<T> Tail<T>
where
    T: AsyncRead + AsyncWrite + Unpin,
{
    /// Once the writer is done with `sink`: reads and discards what the
    /// peer still sends, until its Close or the end of the connection, for
    /// at most [`LINGER`]; then drops the socket.
    pub async fn linger(self, sink: WriteHalf<T>) {
        let (frames, state) = {
            let mut read = self.0.borrow_mut();
            (read.frames.take(), read.state)
        };
        let Some(frames) = frames else {
            return;
        };
        if state == ReadState::PeerClosed {
            return;
        }
        let Ok(mut socket) = sink.reunite(frames) else {
            return;
        };
        let _ = timeout_at(Instant::now() + LINGER, async {
            if state == ReadState::Open {
                // tungstenite ends the stream once the peer's Close is
                // read (pings are not answered after ours).
                loop {
                    match socket.next().await {
                        Some(Ok(_)) => {}
                        None => return,
                        Some(Err(_)) => break,
                    }
                }
            }
            let io = socket.get_mut();
            if io.shutdown().await.is_err() {
                return;
            }
            let mut scrap = vec![0u8; 4096];
            while let Ok(1..) = io.read(&mut scrap).await {}
        })
        .await;
    }
}

#[cfg(test)]
mod tests {
    use futures_util::SinkExt;
    use tokio::io::{AsyncWriteExt, DuplexStream, duplex};
    use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, frame::coding::CloseCode};

    use super::*;

    async fn pair() -> (WebSocketStream<DuplexStream>, WebSocketStream<DuplexStream>) {
        let (server, client) = duplex(64 * 1024);
        (
            WebSocketStream::from_raw_socket(server, Role::Server, None).await,
            WebSocketStream::from_raw_socket(client, Role::Client, None).await,
        )
    }

    fn policy() -> Message {
        Message::Close(Some(CloseFrame {
            code: CloseCode::Policy,
            reason: "bye".into(),
        }))
    }

    #[tokio::test(start_paused = true)]
    async fn the_peers_close_ends_the_linger_and_what_came_before_is_discarded() {
        let (server, mut client) = pair().await;
        let (mut sink, _reader, tail) = split(server);
        for _ in 0..100 {
            client.send(Message::text("still flooding")).await.unwrap();
        }
        sink.send(policy()).await.unwrap();
        let started = Instant::now();
        let lingered = tail.linger(sink);
        let answered = async {
            // The client reads the Close and answers it (tungstenite does).
            while let Some(Ok(message)) = client.next().await {
                if message.is_close() {
                    break;
                }
            }
            client.flush().await.unwrap();
        };
        tokio::join!(lingered, answered);
        assert!(started.elapsed() < LINGER, "ended by the peer's Close");
    }

    #[tokio::test(start_paused = true)]
    async fn a_peer_that_never_closes_is_dropped_after_the_linger() {
        let (server, client) = pair().await;
        let (mut sink, _reader, tail) = split(server);
        sink.send(policy()).await.unwrap();
        let started = Instant::now();
        tail.linger(sink).await;
        assert!(started.elapsed() >= LINGER);
        drop(client);
    }

    #[tokio::test(start_paused = true)]
    async fn after_a_failed_stream_bytes_are_drained_until_the_peer_closes() {
        let (server_io, mut client_io) = duplex(64 * 1024);
        let server = WebSocketStream::from_raw_socket(server_io, Role::Server, None).await;
        let (mut sink, mut reader, tail) = split(server);
        // An unmasked frame: tungstenite fails the stream.
        client_io.write_all(&[0x81, 0x01, b'x']).await.unwrap();
        assert!(matches!(reader.next().await, Some(Err(_))));
        sink.send(policy()).await.unwrap();
        let started = Instant::now();
        let lingered = tail.linger(sink);
        let peer = async {
            client_io.write_all(&[0u8; 10_000]).await.unwrap();
            // Our write half was shut down: the peer reads our Close, then
            // the end, and closes too.
            let mut rest = Vec::new();
            client_io.read_to_end(&mut rest).await.unwrap();
            assert_eq!(rest[0], 0x88, "the Close frame came first");
            drop(client_io);
        };
        tokio::join!(lingered, peer);
        assert!(started.elapsed() < LINGER, "ended by the peer's end");
    }

    #[tokio::test(start_paused = true)]
    async fn the_reader_goes_quiet_once_the_tail_took_the_read_half() {
        let (server, _client) = pair().await;
        let (sink, mut reader, tail) = split(server);
        tail.linger(sink).await;
        let next = futures_util::poll!(reader.next());
        assert!(
            next.is_pending(),
            "no end of stream: the Conn stops on WriterGone"
        );
    }
}
