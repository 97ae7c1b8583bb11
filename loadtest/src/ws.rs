//! The socket helpers tabs and observers share: the client WebSocket
//! type, its settings, the one bound on every protocol step, the connect
//! (optionally from a chosen source address) that waits for the `welcome`,
//! and the stable labels errors are counted under.
//!
//! This module knows sockets, not the run: it never counts, checks or
//! stamps anything itself.

use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use futures_util::StreamExt;
use tokio::{
    net::{TcpSocket, TcpStream, lookup_host},
    time::timeout,
};
use tokio_tungstenite::{
    MaybeTlsStream, WebSocketStream, client_async_with_config, connect_async_with_config,
    tungstenite::{Error as WsError, Message, protocol::WebSocketConfig},
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

/// Connects to `url` (from `source` when given) and waits for the
/// `welcome`; on failure returns the error's kind for the report.
pub async fn open_ws(url: &str, source: Option<IpAddr>) -> Result<Ws, String> {
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
        Err(_) => return Err("connect_timeout".into()),
        Ok(Err(WsError::Http(response))) => {
            return Err(format!("connect_http_{}", response.status().as_u16()));
        }
        Ok(Err(WsError::Io(e))) => return Err(format!("connect_io_{:?}", e.kind())),
        Ok(Err(_)) => return Err("connect".into()),
        Ok(Ok(ok)) => ok,
    };
    loop {
        match timeout(STEP_TIMEOUT, ws.next()).await {
            Err(_) => return Err("welcome_timeout".into()),
            Ok(Some(Ok(Message::Text(t)))) if t.contains("\"welcome\"") => return Ok(ws),
            Ok(Some(Ok(Message::Close(Some(c))))) => {
                return Err(format!("closed_before_welcome_{}", u16::from(c.code)));
            }
            Ok(Some(Ok(_))) => {}
            Ok(Some(Err(_)) | None) => return Err("closed_before_welcome".into()),
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
