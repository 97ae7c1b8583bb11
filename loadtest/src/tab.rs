//! One tab: a WebSocket of a user on one gateway. Once welcomed, a reader
//! task drains it (room events, server pings) so the gateway never sees a
//! slow consumer, and counts error frames; the tool keeps only the sink.

use std::{
    net::{IpAddr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering::Relaxed},
    },
    time::{Duration, Instant},
};

use futures_util::{SinkExt, StreamExt, stream::SplitSink};
use serde_json::json;
use tokio::{
    net::{TcpSocket, TcpStream, lookup_host},
    task::JoinHandle,
    time::timeout,
};
use tokio_tungstenite::{
    MaybeTlsStream, WebSocketStream, client_async, connect_async,
    tungstenite::{Error as WsError, Message},
};

use crate::stats::Shared;

/// A client WebSocket.
pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Bound on anything the protocol says must happen (welcome, reply, close).
pub const STEP_TIMEOUT: Duration = Duration::from_secs(10);

/// An open, welcomed tab.
#[derive(Debug)]
pub struct Tab {
    sink: SplitSink<Ws, Message>,
    reader: JoinHandle<()>,
    /// Set before the Close is sent, so the reader can tell a read error
    /// during the closing handshake from one on a live tab.
    closing: Arc<AtomicBool>,
    /// Whether this tab sent a `join`.
    pub joined: bool,
}

/// Connects to `url` (from `source` when given) and waits for the
/// `welcome`; on failure returns the error's kind for the report.
pub async fn open_ws(url: &str, source: Option<IpAddr>) -> Result<Ws, &'static str> {
    let connect = async {
        match source {
            None => connect_async(url).await,
            Some(ip) => {
                let stream = connect_from(url, ip).await?;
                client_async(url, MaybeTlsStream::Plain(stream)).await
            }
        }
    };
    let (mut ws, _) = match timeout(STEP_TIMEOUT, connect).await {
        Err(_) => return Err("connect_timeout"),
        Ok(Err(_)) => return Err("connect"),
        Ok(Ok(ok)) => ok,
    };
    loop {
        match timeout(STEP_TIMEOUT, ws.next()).await {
            Err(_) => return Err("welcome_timeout"),
            Ok(Some(Ok(Message::Text(t)))) if t.contains("\"welcome\"") => return Ok(ws),
            Ok(Some(Ok(_))) => {}
            Ok(Some(Err(_)) | None) => return Err("closed_before_welcome"),
        }
    }
}

/// A TCP connection to the host of `ws://HOST:PORT/...` bound to `source`,
/// so one load process can use more than one address's ephemeral ports.
async fn connect_from(url: &str, source: IpAddr) -> Result<TcpStream, WsError> {
    let authority = url
        .strip_prefix("ws://")
        .and_then(|r| r.split(['/', '?']).next())
        .unwrap_or_default();
    let mut last = std::io::Error::other("no address");
    for addr in lookup_host(authority).await? {
        let socket = if addr.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        socket.bind(SocketAddr::new(source, 0))?;
        match socket.connect(addr).await {
            Ok(stream) => return Ok(stream),
            Err(e) => last = e,
        }
    }
    Err(WsError::Io(last))
}

/// A short, stable label for a read error, e.g. `tab_read_io_ConnectionReset`.
fn read_error_kind(e: &tokio_tungstenite::tungstenite::Error) -> String {
    use tokio_tungstenite::tungstenite::Error;
    match e {
        Error::Io(io) => format!("tab_read_io_{:?}", io.kind()),
        Error::Protocol(p) => format!("tab_read_protocol_{p:?}")
            .chars()
            .take_while(|c| *c != '(')
            .collect(),
        Error::ConnectionClosed | Error::AlreadyClosed => "tab_read_closed".to_owned(),
        _ => "tab_read_other".to_owned(),
    }
}

impl Tab {
    /// Opens a tab at `url`; records the connect latency or the error.
    pub async fn open(url: &str, source: Option<IpAddr>, shared: &Arc<Shared>) -> Option<Tab> {
        let started = Instant::now();
        let ws = match open_ws(url, source).await {
            Ok(ws) => ws,
            Err(kind) => {
                shared.error(kind);
                return None;
            }
        };
        shared.connected(started.elapsed());
        let (sink, mut stream) = ws.split();
        let reader_shared = Arc::clone(shared);
        let closing = Arc::new(AtomicBool::new(false));
        let reader_closing = Arc::clone(&closing);
        let reader = tokio::spawn(async move {
            while let Some(frame) = stream.next().await {
                match frame {
                    Ok(Message::Text(t)) if t.starts_with("{\"type\":\"error\"") => {
                        reader_shared.error("error_frame_at_tab");
                    }
                    Ok(_) => {}
                    Err(e) => {
                        let when = if reader_closing.load(Relaxed) {
                            "after_close_"
                        } else {
                            ""
                        };
                        reader_shared.error(&format!("{when}{}", read_error_kind(&e)));
                        break;
                    }
                }
            }
        });
        Some(Tab {
            sink,
            reader,
            closing,
            joined: false,
        })
    }

    /// Sends a `join` of `room` without waiting for the reply (the reader
    /// counts an error reply).
    pub async fn join(&mut self, room: &str, shared: &Shared) {
        let frame = json!({"type": "join", "room": room, "ref": 1}).to_string();
        if self.sink.send(Message::Text(frame.into())).await.is_err() {
            shared.error("join_send");
        }
        self.joined = true;
    }

    /// Whether the gateway ended this tab before the tool closed it.
    pub fn ended_by_server(&self) -> bool {
        self.reader.is_finished()
    }

    /// Sends a Close and waits for the gateway's close reply.
    pub async fn close(mut self, shared: &Shared) {
        shared.closes.fetch_add(1, Relaxed);
        shared.open.fetch_sub(1, Relaxed);
        if self.ended_by_server() {
            shared.error("closed_by_server");
            return;
        }
        self.closing.store(true, Relaxed);
        if self.sink.send(Message::Close(None)).await.is_err() {
            shared.error("close_send");
        }
        match timeout(STEP_TIMEOUT, &mut self.reader).await {
            Ok(_) => {}
            Err(_) => {
                self.reader.abort();
                shared.error("close_timeout");
            }
        }
    }
}
