//! A tiny HTTP/1.1 client over a plain `TcpStream`, for what happens before
//! the WebSocket upgrade: status codes, headers and JSON error bodies exactly
//! as they are on the wire, with no client library normalising them.

use std::{net::SocketAddr, time::Duration};

use serde_json::Value;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpSocket, TcpStream},
    time::{Instant, timeout, timeout_at},
};

/// Bound for one request/response exchange.
pub const HTTP_TIMEOUT: Duration = Duration::from_secs(10);

/// The key from RFC 6455 section 1.3 and the accept value it must produce.
pub const SAMPLE_WEBSOCKET_KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
pub const SAMPLE_WEBSOCKET_ACCEPT: &str = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";

#[derive(Debug)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpResponse {
    /// The first header with this name (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.as_str())
    }

    pub fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body parsed as JSON; panics if it is not.
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|error| {
            panic!(
                "HTTP {} body is not JSON ({error}): {:?}",
                self.status,
                self.body_text()
            )
        })
    }

    /// Asserts the body is `{"error":{"code":..,"message":..}}` and returns
    /// the code.
    pub fn error_code(&self) -> String {
        let body = self.json();
        let code = body["error"]["code"].as_str();
        let message = body["error"]["message"].as_str();
        match (code, message) {
            (Some(code), Some(_)) => code.to_owned(),
            _ => panic!(
                "HTTP {} body is not {{\"error\":{{\"code\":..,\"message\":..}}}}: {body}",
                self.status
            ),
        }
    }
}

/// `GET path` with `Connection: close`.
pub async fn get(addr: SocketAddr, path: &str) -> HttpResponse {
    request(addr, "GET", path, &[]).await
}

/// Any method and path, with `Connection: close` and the given headers.
pub async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> HttpResponse {
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    if method != "GET" {
        head.push_str("Content-Length: 0\r\n");
    }
    head.push_str("\r\n");
    exchange(addr, &head).await.0
}

/// A request with a body (sent with its `Content-Length`) and headers.
pub async fn request_with_body(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> HttpResponse {
    let mut message = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (name, value) in headers {
        message.push_str(&format!("{name}: {value}\r\n"));
    }
    message.push_str("\r\n");
    message.push_str(body);
    exchange(addr, &message).await.0
}

/// A WebSocket upgrade request for `path` (RFC 6455 sample key) plus
/// `extra_headers`. A `101` is returned as soon as its head is read.
pub async fn websocket_upgrade(
    addr: SocketAddr,
    path: &str,
    extra_headers: &[(&str, &str)],
) -> HttpResponse {
    let (response, _stream, _rest) = open_websocket(addr, path, extra_headers).await;
    response
}

/// Like [`websocket_upgrade`], but also hands back the socket and any bytes
/// read past the response head, for a hand-driven WebSocket.
pub async fn open_websocket(
    addr: SocketAddr,
    path: &str,
    extra_headers: &[(&str, &str)],
) -> (HttpResponse, TcpStream, Vec<u8>) {
    open_websocket_with_receive_buffer(addr, path, extra_headers, None).await
}

/// Like [`open_websocket`], from a socket whose kernel receive buffer is
/// `receive_buffer` bytes (if given): the server can then have only that
/// much on its way to this client, the rest waits in its own send buffer.
pub async fn open_websocket_with_receive_buffer(
    addr: SocketAddr,
    path: &str,
    extra_headers: &[(&str, &str)],
    receive_buffer: Option<u32>,
) -> (HttpResponse, TcpStream, Vec<u8>) {
    let mut head = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {SAMPLE_WEBSOCKET_KEY}\r\nSec-WebSocket-Version: 13\r\n"
    );
    for (name, value) in extra_headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    let (response, stream, rest) = exchange_on(addr, &head, receive_buffer).await;
    (response, stream, rest)
}

/// Sends `head`, reads one response. Returns the response, the socket, and
/// for a `101` the bytes already read past the head.
async fn exchange(addr: SocketAddr, head: &str) -> (HttpResponse, TcpStream, Vec<u8>) {
    exchange_on(addr, head, None).await
}

/// [`exchange`] from a socket with this receive buffer size, if given.
async fn exchange_on(
    addr: SocketAddr,
    head: &str,
    receive_buffer: Option<u32>,
) -> (HttpResponse, TcpStream, Vec<u8>) {
    let mut connection = Connection::open_with(addr, receive_buffer).await;
    let response = connection.request(head.as_bytes()).await;
    let Connection { stream, buffered } = connection;
    let rest = if response.status == 101 {
        buffered
    } else {
        Vec::new()
    };
    (response, stream, rest)
}

/// One HTTP/1.1 connection used for as many requests as the server keeps
/// it open: raw bytes out, responses parsed as they are on the wire.
pub struct Connection {
    stream: TcpStream,
    /// Read past the last response.
    buffered: Vec<u8>,
}

impl Connection {
    pub async fn open(addr: SocketAddr) -> Connection {
        Connection::open_with(addr, None).await
    }

    /// [`Connection::open`] from a socket whose kernel receive buffer is
    /// `receive_buffer` bytes, if given.
    pub async fn open_with(addr: SocketAddr, receive_buffer: Option<u32>) -> Connection {
        let socket = match addr {
            SocketAddr::V4(_) => TcpSocket::new_v4(),
            SocketAddr::V6(_) => TcpSocket::new_v6(),
        }
        .expect("a TCP socket");
        if let Some(size) = receive_buffer {
            socket
                .set_recv_buffer_size(size)
                .expect("setting the receive buffer size");
        }
        let stream = timeout(HTTP_TIMEOUT, socket.connect(addr))
            .await
            .unwrap_or_else(|_| panic!("HTTP connect to {addr} timed out"))
            .unwrap_or_else(|error| panic!("HTTP connect to {addr} failed: {error}"));
        Connection {
            stream,
            buffered: Vec::new(),
        }
    }

    /// Writes `bytes` (a request, or any part of one).
    pub async fn send(&mut self, bytes: &[u8]) {
        timeout(HTTP_TIMEOUT, self.stream.write_all(bytes))
            .await
            .expect("HTTP request write timed out")
            .expect("HTTP request write failed");
    }

    /// Writes `bytes` and reads the response to them.
    pub async fn request(&mut self, bytes: &[u8]) -> HttpResponse {
        self.send(bytes).await;
        self.response().await
    }

    /// Reads one response. A `101` is returned as soon as its head is read.
    pub async fn response(&mut self) -> HttpResponse {
        let deadline = Instant::now() + HTTP_TIMEOUT;
        let stream = &mut self.stream;
        let buf = &mut self.buffered;
        let head_end = loop {
            if let Some(index) = find(buf, b"\r\n\r\n") {
                break index + 4;
            }
            if read_more(stream, buf, deadline).await == 0 {
                panic!(
                    "connection closed before a complete HTTP response head; got {:?}",
                    String::from_utf8_lossy(buf)
                );
            }
        };
        let (status, headers) = parse_head(&buf[..head_end]);
        buf.drain(..head_end);
        let mut response = HttpResponse {
            status,
            headers,
            body: Vec::new(),
        };
        if status == 101 {
            return response;
        }

        let content_length = response.header("content-length").map(|value| {
            value
                .trim()
                .parse::<usize>()
                .expect("numeric Content-Length")
        });
        let chunked = response
            .header("transfer-encoding")
            .is_some_and(|value| value.to_ascii_lowercase().contains("chunked"));
        response.body = if let Some(length) = content_length {
            while buf.len() < length {
                if read_more(stream, buf, deadline).await == 0 {
                    panic!("connection closed inside a {length}-byte body");
                }
            }
            buf.drain(..length).collect()
        } else if chunked {
            loop {
                if let Some(body) = decode_chunked(buf) {
                    // This client never keeps a chunked response's
                    // connection for another request.
                    buf.clear();
                    break body;
                }
                if read_more(stream, buf, deadline).await == 0 {
                    panic!("connection closed inside a chunked body");
                }
            }
        } else {
            while read_more(stream, buf, deadline).await > 0 {}
            std::mem::take(buf)
        };
        response
    }

    /// Asserts the server closes the connection with nothing more to say.
    pub async fn expect_closed(&mut self) {
        let deadline = Instant::now() + HTTP_TIMEOUT;
        let mut chunk = [0u8; 1024];
        let more = match timeout_at(deadline, self.stream.read(&mut chunk)).await {
            Ok(Ok(0)) if self.buffered.is_empty() => return,
            // A reset after the answer is a closed connection too.
            Ok(Err(error)) if self.buffered.is_empty() => {
                assert_eq!(error.kind(), std::io::ErrorKind::ConnectionReset);
                return;
            }
            Ok(Ok(n)) => [&self.buffered[..], &chunk[..n]].concat(),
            Ok(Err(_)) => self.buffered.clone(),
            Err(_) => panic!("the connection is still open after {HTTP_TIMEOUT:?}"),
        };
        panic!(
            "expected the connection closed, got {:?}",
            String::from_utf8_lossy(&more)
        );
    }
}

async fn read_more(stream: &mut TcpStream, buf: &mut Vec<u8>, deadline: Instant) -> usize {
    let mut chunk = [0u8; 8192];
    let read = timeout_at(deadline, stream.read(&mut chunk))
        .await
        .unwrap_or_else(|_| {
            panic!(
                "HTTP response incomplete after {HTTP_TIMEOUT:?}; got {:?}",
                String::from_utf8_lossy(buf)
            )
        })
        .unwrap_or_else(|error| panic!("HTTP read failed: {error}"));
    buf.extend_from_slice(&chunk[..read]);
    read
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack
        .windows(needle.len())
        .position(|window| window == needle)
}

fn parse_head(head: &[u8]) -> (u16, Vec<(String, String)>) {
    let text = String::from_utf8_lossy(head);
    let mut lines = text.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("malformed HTTP status line: {status_line:?}"));
    let headers = lines
        .filter(|line| !line.is_empty())
        .map(|line| {
            let (name, value) = line
                .split_once(':')
                .unwrap_or_else(|| panic!("malformed HTTP header line: {line:?}"));
            (name.trim().to_owned(), value.trim().to_owned())
        })
        .collect();
    (status, headers)
}

/// The decoded body if `data` holds a complete chunked body.
fn decode_chunked(data: &[u8]) -> Option<Vec<u8>> {
    let mut body = Vec::new();
    let mut at = 0;
    loop {
        let line_end = at + find(&data[at..], b"\r\n")?;
        let size_text = String::from_utf8_lossy(&data[at..line_end]);
        let size_text = size_text.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_text, 16)
            .unwrap_or_else(|_| panic!("malformed chunk size {size_text:?}"));
        at = line_end + 2;
        if size == 0 {
            return Some(body);
        }
        if data.len() < at + size + 2 {
            return None;
        }
        body.extend_from_slice(&data[at..at + size]);
        at += size + 2;
    }
}
