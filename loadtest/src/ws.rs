//! The socket helpers tabs and observers share: the client WebSocket
//! type, its settings, the one bound on every protocol step, the connect
//! (optionally from a chosen source address) that waits for the `welcome`,
//! how a socket the tool did not close ended ([`SocketEnd`]: the gateway's
//! close code and reason), the kinds of server frame the tool reads
//! ([`FrameKind`]), and the stable labels errors are counted under.
//!
//! This module knows sockets, not the run: it never counts, checks or
//! stamps anything itself.

use std::{
    fmt,
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use futures_util::{Sink, SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::{
    net::{TcpSocket, TcpStream, lookup_host},
    time::timeout,
};
use tokio_tungstenite::{
    MaybeTlsStream, WebSocketStream, client_async_with_config, connect_async_with_config,
    tungstenite::{
        Error as WsError, Message,
        protocol::{CloseFrame, WebSocketConfig},
    },
};

/// A client WebSocket.
pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Bound on anything the protocol says must happen (welcome, reply, close).
pub const STEP_TIMEOUT: Duration = Duration::from_secs(10);

/// Read buffer of a tab's socket. tungstenite's default reserves 128 KiB
/// per connection, which would make 50,000 tabs cost gigabytes here; a
/// tab's frames are small, and the buffer grows for a bigger one.
const READ_BUFFER: usize = 4096;

/// The socket settings of a tab (and of an observer).
pub fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER)
        .write_buffer_size(0)
}

/// Why a connect did not end with a `welcome`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConnectError {
    /// No WebSocket handshake within [`STEP_TIMEOUT`].
    #[error("no handshake within {STEP_TIMEOUT:?}")]
    Timeout,
    /// The gateway answered the upgrade with this HTTP status.
    #[error("the upgrade was answered with HTTP {0}")]
    Http(u16),
    /// The TCP connection failed (refused, reset, out of ports, ...).
    #[error("{0}")]
    Io(std::io::ErrorKind),
    /// Any other handshake failure.
    #[error("the handshake failed: {0}")]
    Handshake(String),
    /// Connected, but no `welcome` within [`STEP_TIMEOUT`].
    #[error("no welcome within {STEP_TIMEOUT:?}")]
    WelcomeTimeout,
    /// The socket ended before the `welcome`.
    #[error("the socket ended before the welcome: {0}")]
    ClosedBeforeWelcome(SocketEnd),
}

impl ConnectError {
    /// The short, stable label the error is counted under, e.g.
    /// `connect_io_ConnectionRefused` or `closed_before_welcome_4029`.
    pub fn label(&self) -> String {
        match self {
            Self::Timeout => "connect_timeout".to_owned(),
            Self::Http(status) => format!("connect_http_{status}"),
            Self::Io(kind) => format!("connect_io_{kind:?}"),
            Self::Handshake(_) => "connect".to_owned(),
            Self::WelcomeTimeout => "welcome_timeout".to_owned(),
            Self::ClosedBeforeWelcome(SocketEnd::Closed { code, .. }) => {
                format!("closed_before_welcome_{code}")
            }
            Self::ClosedBeforeWelcome(_) => "closed_before_welcome".to_owned(),
        }
    }
}

/// How a socket ended that the tool did not close.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SocketEnd {
    /// The gateway sent a Close frame with this code and reason.
    Closed {
        /// The close code (e.g. 4008: slow consumer).
        code: u16,
        /// The close reason, as the gateway wrote it (may be empty).
        reason: String,
    },
    /// The gateway sent a Close frame without a code.
    ClosedWithoutCode,
    /// The connection broke without a Close frame (reset, end of stream,
    /// a failed send): what the socket said.
    Broken(String),
}

impl SocketEnd {
    /// The end a received Close frame means.
    pub fn of_close(frame: Option<&CloseFrame>) -> Self {
        match frame {
            Some(f) => Self::Closed {
                code: u16::from(f.code),
                reason: f.reason.to_string(),
            },
            None => Self::ClosedWithoutCode,
        }
    }

    /// What the socket ended with, said of a client of `target`: "was
    /// closed by TARGET with 4008 slow consumer", "lost its connection to
    /// TARGET: …".
    pub fn said_of(&self, target: &str) -> String {
        match self {
            Self::Closed { code, reason } if reason.is_empty() => {
                format!("was closed by {target} with {code}")
            }
            Self::Closed { code, reason } => format!("was closed by {target} with {code} {reason}"),
            Self::ClosedWithoutCode => format!("was closed by {target} without a close code"),
            Self::Broken(why) => format!("lost its connection to {target}: {why}"),
        }
    }
}

impl fmt::Display for SocketEnd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Closed { code, reason } if reason.is_empty() => write!(f, "closed with {code}"),
            Self::Closed { code, reason } => write!(f, "closed with {code} {reason}"),
            Self::ClosedWithoutCode => f.write_str("closed without a close code"),
            Self::Broken(why) => f.write_str(why),
        }
    }
}

/// Connects to `url` (from `source` when given) and waits for the
/// `welcome`.
pub async fn open_ws(url: &str, source: Option<IpAddr>) -> Result<Ws, ConnectError> {
    let config = Some(ws_config());
    let connect = async {
        match source {
            None => connect_async_with_config(url, config, false).await,
            Some(ip) => {
                let stream = connect_from(url, ip).await?;
                client_async_with_config(url, MaybeTlsStream::Plain(stream), config).await
            }
        }
    };
    let (mut ws, _) = match timeout(STEP_TIMEOUT, connect).await {
        Err(_) => return Err(ConnectError::Timeout),
        Ok(Err(WsError::Http(response))) => {
            return Err(ConnectError::Http(response.status().as_u16()));
        }
        Ok(Err(WsError::Io(e))) => return Err(ConnectError::Io(e.kind())),
        Ok(Err(e)) => return Err(ConnectError::Handshake(e.to_string())),
        Ok(Ok(ok)) => ok,
    };
    loop {
        let end = match timeout(STEP_TIMEOUT, ws.next()).await {
            Err(_) => return Err(ConnectError::WelcomeTimeout),
            Ok(Some(Ok(Message::Text(t)))) if t.contains("\"welcome\"") => return Ok(ws),
            Ok(Some(Ok(Message::Close(c)))) => SocketEnd::of_close(c.as_ref()),
            Ok(Some(Ok(_))) => continue,
            Ok(Some(Err(e))) => SocketEnd::Broken(e.to_string()),
            Ok(None) => SocketEnd::Broken(ENDED_WITHOUT_CLOSE.to_owned()),
        };
        return Err(ConnectError::ClosedBeforeWelcome(end));
    }
}

/// The kinds of server frame the tool reads, by `type`. Every other type
/// is [`FrameKind::Unchecked`]: tabs and observers ignore it, so a new
/// frame in the protocol (`status`, …) needs no change here unless the
/// tool is to check it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameKind {
    /// `welcome`, first on every socket.
    Welcome,
    /// `reply` to a request.
    Reply,
    /// `error` refusing a request.
    Error,
    /// `online` presence event.
    Online,
    /// `offline` presence event.
    Offline,
    /// `joined` room event.
    Joined,
    /// `left` room event.
    Left,
    /// `updated` room state event (`cursors` checks it).
    Updated,
    /// `sync`: the state to take after a node resubscribed.
    Sync,
    /// A type the tool does not check.
    Unchecked,
}

impl FrameKind {
    /// The kind of `frame`; `None` when it is not a JSON object with a
    /// string `type` (not a frame of any protocol).
    pub fn of(frame: &Value) -> Option<Self> {
        Some(match frame.get("type")?.as_str()? {
            "welcome" => Self::Welcome,
            "reply" => Self::Reply,
            "error" => Self::Error,
            "online" => Self::Online,
            "offline" => Self::Offline,
            "joined" => Self::Joined,
            "left" => Self::Left,
            "updated" => Self::Updated,
            "sync" => Self::Sync,
            _ => Self::Unchecked,
        })
    }
}

/// What a socket whose stream ended without a Close frame says.
pub const ENDED_WITHOUT_CLOSE: &str = "the connection ended without a Close frame";

/// A text frame as JSON (`Null` when it is not JSON, which no check
/// accepts).
pub fn parse_text(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or(Value::Null)
}

/// Why a send failed.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// The socket refused it (closing, closed, reset, ...).
    #[error("{0}")]
    Ws(#[from] WsError),
    /// The gateway took nothing for [`STEP_TIMEOUT`] (it stopped reading).
    #[error("the gateway took nothing for {STEP_TIMEOUT:?}")]
    Timeout,
}

/// Sends `message`, waiting at most [`STEP_TIMEOUT`] for the gateway to
/// take it: a gateway that stopped reading fills the socket's buffers, and
/// then a send would wait for ever.
pub async fn send<S>(sink: &mut S, message: Message) -> Result<(), SendError>
where
    S: Sink<Message, Error = WsError> + Unpin,
{
    match timeout(STEP_TIMEOUT, sink.send(message)).await {
        Ok(sent) => Ok(sent?),
        Err(_) => Err(SendError::Timeout),
    }
}

/// Sends `frame` as one text message, as [`send`] does.
pub async fn send_json<S>(sink: &mut S, frame: &Value) -> Result<(), SendError>
where
    S: Sink<Message, Error = WsError> + Unpin,
{
    send(sink, Message::Text(frame.to_string().into())).await
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
pub fn read_error_kind(e: &WsError) -> String {
    match e {
        WsError::Io(io) => format!("tab_read_io_{:?}", io.kind()),
        WsError::Protocol(p) => format!("tab_read_protocol_{p:?}")
            .chars()
            .take_while(|c| *c != '(')
            .collect(),
        WsError::ConnectionClosed | WsError::AlreadyClosed => "tab_read_closed".to_owned(),
        _ => "tab_read_other".to_owned(),
    }
}
