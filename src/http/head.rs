//! Bounded request heads: no request line and headers longer than
//! `--max-request-head-bytes`, on any request of a connection.
//!
//! hyper 1 buffers an unfinished head up to its `max_buf_size` (~400 KB),
//! and its own smaller bound (`max_header_size`) answers a bare `431` with
//! an empty body that no code of ours sees. So [`HeadLimit`] sits between
//! the socket and hyper and counts the bytes of each head as hyper reads
//! them. A read is cut to the room left in the head, so an endless head
//! costs the cap and not 400 KB; the read that fills the cap without ending
//! the head fails instead (hyper never holds a whole cap of a head), and
//! `serve` takes the socket back from hyper and [`refuse`] writes the JSON
//! `431` every other refusal gets, from the one error table.
//!
//! To know where the next head starts on a kept-alive connection it follows
//! requests exactly as far as that needs: the empty line that ends a head
//! and a `Content-Length` body after it. It never refuses or changes
//! anything else: hyper stays the one HTTP parser, this only counts. A body
//! it does not follow (`Transfer-Encoding`, an unreadable `Content-Length`)
//! makes it stand aside for the rest of the connection, where hyper's
//! `max_header_size`, set to the same cap, still bounds every head (with
//! hyper's bare 431). After a `101` the socket is taken out of it.

use std::{
    io,
    pin::Pin,
    task::{Context, Poll, ready},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf},
    net::TcpStream,
    time::{Instant, timeout_at},
};

use super::HttpError;

/// How long [`refuse`] keeps reading (and dropping) what the client still
/// sends after the 431: closing a socket with unread input sends a reset,
/// which can destroy the answer before the client reads it.
const LINGER: Duration = Duration::from_secs(1);

/// Most bytes [`refuse`] reads and drops while it lingers.
const LINGER_BYTES: usize = 64 * 1024;

/// How much of each header line is kept while scanning: enough for
/// `Content-Length:` and any sane value.
const LINE_PREFIX: usize = 64;

/// A socket whose request heads are counted, and refused past `cap` bytes.
#[derive(Debug)]
pub(super) struct HeadLimit<S> {
    inner: S,
    cap: usize,
    framing: Framing,
    refused: bool,
}

impl<S> HeadLimit<S> {
    /// Wraps a fresh connection: its first bytes are a request head.
    pub(super) fn new(inner: S, cap: usize) -> Self {
        Self {
            inner,
            cap,
            framing: Framing::Head(HeadScan::default()),
            refused: false,
        }
    }

    /// The socket.
    pub(super) fn into_inner(self) -> S {
        self.inner
    }

    /// The socket, if a head on it went over the cap (it gets the 431).
    pub(super) fn into_refused(self) -> Option<S> {
        self.refused.then_some(self.inner)
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for HeadLimit<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.refused {
            return Poll::Ready(Err(too_large()));
        }
        let start = buf.filled().len();
        match this.framing.room(this.cap) {
            Some(room) if room < buf.remaining() => {
                let read = {
                    let mut short = ReadBuf::new(buf.initialize_unfilled_to(room));
                    ready!(Pin::new(&mut this.inner).poll_read(cx, &mut short))?;
                    short.filled().len()
                };
                buf.advance(read);
            }
            _ => ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?,
        }
        this.framing.scan(&buf.filled()[start..]);
        if this.framing.is_full(this.cap) {
            // Not even the cap of an unfinished head reaches hyper, so its
            // own bound (the same size, for what this does not frame) never
            // answers first.
            buf.set_filled(start);
            this.refused = true;
            return Poll::Ready(Err(too_large()));
        }
        Poll::Ready(Ok(()))
    }
}

fn too_large() -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        "request head over --max-request-head-bytes",
    )
}

impl<S: AsyncWrite + Unpin> AsyncWrite for HeadLimit<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.refused {
            // hyper closing a connection whose head was refused: the 431
            // is still to be written.
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

/// Answers a head over the cap with the JSON 431 and closes the socket,
/// after a bounded linger (see [`LINGER`]).
pub(super) async fn refuse(mut socket: TcpStream, cap: usize) {
    let response = HttpError::RequestHeadTooLarge(cap).into_http1_bytes();
    let deadline = Instant::now() + LINGER;
    let _ = timeout_at(deadline, async {
        socket.write_all(&response).await?;
        socket.shutdown().await?;
        let mut sink = [0u8; 1024];
        let mut dropped = 0;
        while dropped < LINGER_BYTES {
            match socket.read(&mut sink).await? {
                0 => break,
                n => dropped += n,
            }
        }
        io::Result::Ok(())
    })
    .await;
}

/// Where the byte stream of a connection stands, for counting heads.
#[derive(Debug)]
enum Framing {
    /// Inside a request head.
    Head(HeadScan),
    /// Inside a `Content-Length` body, this many bytes from its end.
    Body(u64),
    /// After a body whose end is not followed: no more counting.
    Unframed,
}

impl Framing {
    /// How many bytes the next read may bring (`None`: any): the rest of
    /// what is in progress and at most the cap of the head after it. A
    /// read can hold several pipelined requests; none of their heads can
    /// then pass the cap either, since each is within this read.
    fn room(&self, cap: usize) -> Option<usize> {
        match self {
            Framing::Head(head) => Some(cap.saturating_sub(head.seen)),
            Framing::Body(left) => Some(
                usize::try_from(*left)
                    .unwrap_or(usize::MAX)
                    .saturating_add(cap),
            ),
            Framing::Unframed => None,
        }
    }

    /// Whether a head has `cap` bytes and has not ended: it is over.
    fn is_full(&self, cap: usize) -> bool {
        matches!(self, Framing::Head(head) if head.seen >= cap)
    }

    /// Moves past `bytes`, just read.
    fn scan(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            match self {
                Framing::Head(head) => {
                    let (used, body) = head.scan(bytes);
                    bytes = &bytes[used..];
                    match body {
                        None => {}
                        Some(Body::None | Body::Length(0)) => {
                            *self = Framing::Head(HeadScan::default());
                        }
                        Some(Body::Length(n)) => *self = Framing::Body(n),
                        Some(Body::Unframed) => *self = Framing::Unframed,
                    }
                }
                Framing::Body(left) => {
                    let used = usize::try_from(*left).map_or(bytes.len(), |l| l.min(bytes.len()));
                    bytes = &bytes[used..];
                    *left -= used as u64;
                    if *left == 0 {
                        *self = Framing::Head(HeadScan::default());
                    }
                }
                Framing::Unframed => return,
            }
        }
    }
}

/// What a head's headers say about the body after it.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum Body {
    /// No `Content-Length` nor `Transfer-Encoding`: none.
    #[default]
    None,
    /// `Content-Length`.
    Length(u64),
    /// `Transfer-Encoding`, or a `Content-Length` this does not read the
    /// way hyper would (hyper refuses most of those with a 400 and closes).
    Unframed,
}

impl Body {
    /// Folds in one header line (its first [`LINE_PREFIX`] bytes; `cut`
    /// when the line was longer).
    fn with_header(self, line: &[u8], cut: bool) -> Body {
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            return self;
        };
        let (name, value) = (&line[..colon], line[colon + 1..].trim_ascii());
        if name.eq_ignore_ascii_case(b"transfer-encoding") {
            return Body::Unframed;
        }
        if !name.eq_ignore_ascii_case(b"content-length") {
            return self;
        }
        let length = (!cut && !value.is_empty() && value.iter().all(u8::is_ascii_digit))
            .then(|| std::str::from_utf8(value).ok()?.parse::<u64>().ok())
            .flatten();
        match (self, length) {
            (Body::None, Some(n)) => Body::Length(n),
            (Body::Length(m), Some(n)) if m == n => self,
            _ => Body::Unframed,
        }
    }
}

/// The head being read: its length so far and what it says of its body.
#[derive(Debug)]
struct HeadScan {
    seen: usize,
    /// The first bytes of the current line.
    line: [u8; LINE_PREFIX],
    /// The current line's length so far.
    line_len: usize,
    /// The request line is behind (empty lines before it do not end the
    /// head: hyper skips them).
    started: bool,
    body: Body,
}

impl Default for HeadScan {
    fn default() -> Self {
        Self {
            seen: 0,
            line: [0; LINE_PREFIX],
            line_len: 0,
            started: false,
            body: Body::None,
        }
    }
}

impl HeadScan {
    /// Reads `bytes` up to the end of the head: how many belong to it, and
    /// what follows if it ended. A line ends at LF (an LF alone ends one
    /// for hyper too); the head ends at its first empty line.
    fn scan(&mut self, bytes: &[u8]) -> (usize, Option<Body>) {
        for (i, &byte) in bytes.iter().enumerate() {
            self.seen += 1;
            if byte != b'\n' {
                if let Some(slot) = self.line.get_mut(self.line_len) {
                    *slot = byte;
                }
                self.line_len += 1;
                continue;
            }
            let len = std::mem::take(&mut self.line_len);
            let kept = &self.line[..len.min(LINE_PREFIX)];
            let cut = len > LINE_PREFIX;
            let line = if cut {
                kept
            } else {
                kept.strip_suffix(b"\r").unwrap_or(kept)
            };
            if line.is_empty() && !cut {
                if self.started {
                    return (i + 1, Some(self.body));
                }
            } else if !self.started {
                self.started = true;
            } else {
                self.body = self.body.with_header(line, cut);
            }
        }
        (bytes.len(), None)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt, duplex};

    use super::*;

    /// The heads `input` holds, as the framing sees them: where each read
    /// of `chunk` bytes leaves it.
    fn framing_after(input: &[u8], chunk: usize) -> Framing {
        let mut framing = Framing::Head(HeadScan::default());
        for part in input.chunks(chunk) {
            framing.scan(part);
        }
        framing
    }

    fn seen(framing: &Framing) -> Option<usize> {
        match framing {
            Framing::Head(head) => Some(head.seen),
            _ => None,
        }
    }

    #[test]
    fn each_head_is_counted_from_its_first_byte_whatever_the_reads() {
        let two = b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nGET /b HTTP/1.1\r\nHo";
        for chunk in [1, 2, 7, two.len()] {
            assert_eq!(seen(&framing_after(two, chunk)), Some(19), "chunk {chunk}");
        }
        // A bare LF ends lines too; empty lines before a request line do
        // not end anything.
        let bare = b"\r\n\nGET / HTTP/1.1\nHost: x\n\nGET";
        assert_eq!(seen(&framing_after(bare, 3)), Some(3));
    }

    #[test]
    fn a_content_length_body_is_skipped_and_the_next_head_counted() {
        let post =
            b"POST /v1/presence HTTP/1.1\r\ncontent-LENGTH: 12\r\n\r\n\r\n\r\n\r\n\r\n\r\n\r\nGET";
        for chunk in [1, 5, post.len()] {
            assert_eq!(seen(&framing_after(post, chunk)), Some(3), "chunk {chunk}");
        }
        let half = b"POST / HTTP/1.1\r\nContent-Length: 10\r\n\r\n12345";
        assert!(matches!(framing_after(half, 4), Framing::Body(5)));
        let empty = b"POST / HTTP/1.1\r\nContent-Length: 0\r\n\r\nGE";
        assert_eq!(seen(&framing_after(empty, 4)), Some(2));
    }

    #[test]
    fn a_body_it_cannot_follow_ends_the_counting() {
        for head in [
            &b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"[..],
            b"POST / HTTP/1.1\r\nContent-Length: +5\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n",
        ] {
            let framing = framing_after(head, 3);
            assert!(matches!(framing, Framing::Unframed), "{framing:?}");
            assert_eq!(framing.room(100), None);
        }
        // A long line is fine as long as it is not the one saying the length.
        let long = format!("GET / HTTP/1.1\r\nCookie: {}\r\n\r\n", "c".repeat(500));
        assert_eq!(seen(&framing_after(long.as_bytes(), 64)), Some(0));
        let padded = format!(
            "GET / HTTP/1.1\r\nContent-Length:{}5\r\n\r\n",
            " ".repeat(80)
        );
        assert!(matches!(
            framing_after(padded.as_bytes(), 64),
            Framing::Unframed
        ));
    }

    #[test]
    fn reads_never_bring_more_than_the_cap_of_one_head() {
        let framing = framing_after(b"GET / HTTP/1.1\r\nHost", 100);
        assert_eq!(framing.room(100), Some(80));
        let framing = framing_after(b"POST / HTTP/1.1\r\nContent-Length: 7\r\n\r\nab", 100);
        assert_eq!(framing.room(100), Some(105));
    }

    #[tokio::test]
    async fn a_head_of_exactly_the_cap_passes_and_one_byte_more_is_refused() {
        let head = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";
        let cap = head.len();
        for (input, refused) in [
            (head.to_vec(), false),
            ([&b"\r\n"[..], head].concat(), true),
        ] {
            let (mut client, server) = duplex(4096);
            client.write_all(&input).await.unwrap();
            drop(client);
            let mut limited = HeadLimit::new(server, cap);
            let mut got = Vec::new();
            let result = limited.read_to_end(&mut got).await;
            assert_eq!(result.is_err(), refused, "{result:?}");
            assert_eq!(
                got.len() == cap,
                !refused,
                "hyper was handed {} bytes",
                got.len()
            );
            assert_eq!(limited.into_refused().is_some(), refused);
        }
    }

    #[tokio::test]
    async fn an_endless_head_is_refused_at_the_cap_and_a_body_may_be_longer() {
        let (mut client, server) = duplex(64 * 1024);
        client
            .write_all(format!("GET / HTTP/1.1\r\nX: {}", "a".repeat(50_000)).as_bytes())
            .await
            .unwrap();
        let mut limited = HeadLimit::new(server, 1024);
        let mut got = vec![0; 64 * 1024];
        let mut total = 0;
        let error = loop {
            match limited.read(&mut got[total..]).await {
                Ok(n) => total += n,
                Err(error) => break error,
            }
        };
        assert!(total < 1024, "hyper was handed {total} bytes");
        assert_eq!(error.kind(), io::ErrorKind::InvalidData);
        assert!(limited.into_refused().is_some());

        let (mut client, server) = duplex(64 * 1024);
        let body = "b".repeat(5000);
        client
            .write_all(
                format!(
                    "POST / HTTP/1.1\r\nContent-Length: 5000\r\n\r\n{body}GET / HTTP/1.1\r\n\r\n"
                )
                .as_bytes(),
            )
            .await
            .unwrap();
        drop(client);
        let mut limited = HeadLimit::new(server, 1024);
        let mut got = Vec::new();
        limited.read_to_end(&mut got).await.unwrap();
        assert!(got.ends_with(b"GET / HTTP/1.1\r\n\r\n"));
    }
}
