//! A WebSocket client driven by hand, for the one thing a library client
//! cannot do: stay connected while never answering a ping.
//!
//! A [`SilentClient`] completes the handshake, may send a few frames, and
//! then reads nothing until the test asks it to look for the server's close
//! frame. It never writes a pong, so from the server's side it is a browser
//! whose network silently died.

use std::{net::SocketAddr, time::Duration};

use serde_json::Value;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    time::{Instant, timeout_at},
};

use super::http::{SAMPLE_WEBSOCKET_ACCEPT, open_websocket_with_receive_buffer};

const OPCODE_CONTINUATION: u8 = 0x0;
const OPCODE_TEXT: u8 = 0x1;
const OPCODE_CLOSE: u8 = 0x8;

/// One complete server message (continuations already joined).
struct RawMessage {
    opcode: u8,
    payload: Vec<u8>,
}

/// Why no message could be read.
enum ReadFailure {
    TimedOut,
    Ended(String),
}

/// How the server ended a silent connection.
#[derive(Debug, PartialEq, Eq)]
pub enum SilentEnd {
    /// A close frame with this code.
    CloseCode(u16),
    /// A close frame without a code.
    CloseWithoutCode,
    /// The TCP connection ended (EOF or reset) without a close frame.
    NoCloseFrame(String),
}

/// How a flood that never answered the server's Close ended.
#[derive(Debug)]
pub struct Flooded {
    /// The code of the server's close frame, if one was read.
    pub close_code: Option<u16>,
    /// When the server ended the TCP connection.
    pub ended_at: Instant,
}

pub struct SilentClient {
    label: String,
    stream: TcpStream,
    /// Bytes read from the socket but not parsed into a frame yet.
    buffer: Vec<u8>,
    welcome: Value,
}

impl SilentClient {
    /// Connects as `user` and reads the `welcome`.
    pub async fn connect(addr: SocketAddr, user: &str) -> SilentClient {
        SilentClient::connect_with_receive_buffer(addr, user, None).await
    }

    /// Like [`SilentClient::connect`], with this kernel receive buffer (if
    /// given): a small one keeps what the server sends in the server's own
    /// send buffer until this client reads it.
    pub async fn connect_with_receive_buffer(
        addr: SocketAddr,
        user: &str,
        receive_buffer: Option<u32>,
    ) -> SilentClient {
        let (response, stream, rest) = open_websocket_with_receive_buffer(
            addr,
            &format!("/ws?user={user}"),
            &[],
            receive_buffer,
        )
        .await;
        assert_eq!(
            response.status,
            101,
            "{user}: upgrade refused: {}",
            response.body_text()
        );
        assert_eq!(
            response.header("sec-websocket-accept"),
            Some(SAMPLE_WEBSOCKET_ACCEPT),
            "{user}: wrong Sec-WebSocket-Accept"
        );
        let mut client = SilentClient {
            label: format!("{user} (silent)"),
            stream,
            buffer: rest,
            welcome: Value::Null,
        };
        let welcome = client.next_json(super::EVENT_TIMEOUT).await;
        assert_eq!(welcome["type"], "welcome", "first frame: {welcome}");
        client.welcome = welcome;
        client
    }

    pub fn welcome(&self) -> &Value {
        &self.welcome
    }

    /// Sends one masked text frame, as a client must.
    pub async fn send_json(&mut self, frame: &Value) {
        let bytes = masked_frame(OPCODE_TEXT, frame.to_string().as_bytes());
        self.stream
            .write_all(&bytes)
            .await
            .unwrap_or_else(|error| panic!("{}: write failed: {error}", self.label));
    }

    /// Sends `frames` as masked text frames in a single write, so that all of
    /// them are on their way before the server answers (or closes on) the
    /// first.
    pub async fn send_json_burst(&mut self, frames: &[Value]) {
        let bytes: Vec<u8> = frames
            .iter()
            .flat_map(|frame| masked_frame(OPCODE_TEXT, frame.to_string().as_bytes()))
            .collect();
        self.stream
            .write_all(&bytes)
            .await
            .unwrap_or_else(|error| panic!("{}: write failed: {error}", self.label));
    }

    /// Sends one masked text frame whose payload is exactly `payload`, valid
    /// UTF-8 or not.
    pub async fn send_text_bytes(&mut self, payload: &[u8]) {
        let bytes = masked_frame(OPCODE_TEXT, payload);
        self.stream
            .write_all(&bytes)
            .await
            .unwrap_or_else(|error| panic!("{}: write failed: {error}", self.label));
    }

    /// Sends one text frame WITHOUT the mask RFC 6455 requires of a client:
    /// a protocol violation the server must close the connection for.
    pub async fn send_unmasked_json(&mut self, frame: &Value) {
        let bytes = client_frame(OPCODE_TEXT, frame.to_string().as_bytes(), None);
        self.stream
            .write_all(&bytes)
            .await
            .unwrap_or_else(|error| panic!("{}: write failed: {error}", self.label));
    }

    /// The next text frame as JSON, skipping pings without answering them.
    pub async fn next_json(&mut self, within: Duration) -> Value {
        let deadline = Instant::now() + within;
        loop {
            match self.read_message(deadline).await {
                Ok(message) if message.opcode == OPCODE_TEXT => {
                    return serde_json::from_slice(&message.payload).unwrap_or_else(|error| {
                        panic!("{}: text frame is not JSON: {error}", self.label)
                    });
                }
                Ok(message) if message.opcode == OPCODE_CLOSE => {
                    panic!(
                        "{}: server closed the connection: {:?}",
                        self.label,
                        close_code(&message)
                    )
                }
                Ok(_) => {} // ping or pong: deliberately left unanswered
                Err(ReadFailure::TimedOut) => {
                    panic!("{}: no frame arrived within {within:?}", self.label)
                }
                Err(ReadFailure::Ended(how)) => {
                    panic!("{}: waiting for a frame: {how}", self.label)
                }
            }
        }
    }

    /// Reads, without ever answering, until the server's close frame or the
    /// end of the connection.
    pub async fn wait_for_end(&mut self, within: Duration) -> SilentEnd {
        let deadline = Instant::now() + within;
        loop {
            match self.read_message(deadline).await {
                Ok(message) if message.opcode == OPCODE_CLOSE => {
                    return match close_code(&message) {
                        Some(code) => SilentEnd::CloseCode(code),
                        None => SilentEnd::CloseWithoutCode,
                    };
                }
                Ok(_) => {}
                Err(ReadFailure::TimedOut) => panic!(
                    "{}: the server did not end the connection within {within:?}",
                    self.label
                ),
                Err(ReadFailure::Ended(how)) => return SilentEnd::NoCloseFrame(how),
            }
        }
    }

    /// After the server's close frame: reads (discarding, never answering)
    /// until the server ends the TCP connection, and says how it ended.
    pub async fn wait_for_disconnect(&mut self, within: Duration) -> String {
        let deadline = Instant::now() + within;
        loop {
            match self.read_message(deadline).await {
                Ok(_) => {}
                Err(ReadFailure::TimedOut) => panic!(
                    "{}: the server did not end the TCP connection within {within:?}",
                    self.label
                ),
                Err(ReadFailure::Ended(how)) => return how,
            }
        }
    }

    /// Writes `frame` over and over, never answering anything, while reading
    /// what the server sends, until the server ends the TCP connection:
    /// a peer that never sends its Close. Panics if the connection is still
    /// open after `within`.
    pub async fn flood_until_dropped(self, frame: Value, within: Duration) -> Flooded {
        const FRAMES_PER_WRITE: usize = 100;
        let deadline = Instant::now() + within;
        let label = self.label;
        let chunk: Vec<u8> = (0..FRAMES_PER_WRITE)
            .flat_map(|_| masked_frame(OPCODE_TEXT, frame.to_string().as_bytes()))
            .collect();
        let (mut read_half, mut write_half) = self.stream.into_split();
        // Whole writes only: a write cut short by the end of the reader
        // below never matters, the connection is over by then.
        let write = async move {
            while write_half.write_all(&chunk).await.is_ok() {}
            std::future::pending::<()>().await
        };
        let read = async move {
            let mut buffer = self.buffer;
            let mut close_code = None;
            loop {
                while let Some((_, opcode, payload, used)) = parse_frame(&buffer) {
                    buffer.drain(..used);
                    if opcode == OPCODE_CLOSE && close_code.is_none() {
                        close_code = close_code_of(&payload);
                    }
                }
                let mut bytes = [0u8; 4096];
                match timeout_at(deadline, read_half.read(&mut bytes)).await {
                    Err(_) => panic!(
                        "{label}: the server did not end the TCP connection within {within:?}"
                    ),
                    Ok(Ok(0) | Err(_)) => {
                        return Flooded {
                            close_code,
                            ended_at: Instant::now(),
                        };
                    }
                    Ok(Ok(read)) => buffer.extend_from_slice(&bytes[..read]),
                }
            }
        };
        tokio::select! {
            flooded = read => flooded,
            () = write => unreachable!("the writer never ends by itself"),
        }
    }

    /// Reads one complete message.
    async fn read_message(&mut self, deadline: Instant) -> Result<RawMessage, ReadFailure> {
        let mut assembled: Option<RawMessage> = None;
        loop {
            while let Some((fin, opcode, payload, used)) = parse_frame(&self.buffer) {
                self.buffer.drain(..used);
                if opcode >= 0x8 {
                    // Control frames may sit between fragments.
                    return Ok(RawMessage { opcode, payload });
                }
                let message = match assembled.take() {
                    Some(mut partial) if opcode == OPCODE_CONTINUATION => {
                        partial.payload.extend_from_slice(&payload);
                        partial
                    }
                    _ => RawMessage { opcode, payload },
                };
                if fin {
                    return Ok(message);
                }
                assembled = Some(message);
            }
            let mut chunk = [0u8; 4096];
            match timeout_at(deadline, self.stream.read(&mut chunk)).await {
                Err(_) => return Err(ReadFailure::TimedOut),
                Ok(Ok(0)) => return Err(ReadFailure::Ended("the connection ended (EOF)".into())),
                Ok(Ok(read)) => self.buffer.extend_from_slice(&chunk[..read]),
                Ok(Err(error)) => {
                    return Err(ReadFailure::Ended(format!(
                        "the connection failed: {error}"
                    )));
                }
            }
        }
    }
}

fn close_code(message: &RawMessage) -> Option<u16> {
    close_code_of(&message.payload)
}

fn close_code_of(payload: &[u8]) -> Option<u16> {
    (payload.len() >= 2).then(|| u16::from_be_bytes([payload[0], payload[1]]))
}

/// Parses one frame from the front of `buffer`: (fin, opcode, payload,
/// bytes used), or `None` if the frame is not complete yet.
fn parse_frame(buffer: &[u8]) -> Option<(bool, u8, Vec<u8>, usize)> {
    if buffer.len() < 2 {
        return None;
    }
    let fin = buffer[0] & 0x80 != 0;
    let opcode = buffer[0] & 0x0f;
    let masked = buffer[1] & 0x80 != 0;
    let (length, mut at) = match buffer[1] & 0x7f {
        126 => (
            u16::from_be_bytes(buffer.get(2..4)?.try_into().ok()?) as usize,
            4,
        ),
        127 => (
            u64::from_be_bytes(buffer.get(2..10)?.try_into().ok()?) as usize,
            10,
        ),
        short => (short as usize, 2),
    };
    let mask = if masked {
        let key: [u8; 4] = buffer.get(at..at + 4)?.try_into().ok()?;
        at += 4;
        Some(key)
    } else {
        None
    };
    let mut payload = buffer.get(at..at + length)?.to_vec();
    if let Some(key) = mask {
        for (index, byte) in payload.iter_mut().enumerate() {
            *byte ^= key[index % 4];
        }
    }
    Some((fin, opcode, payload, at + length))
}

/// A single final client frame, masked as RFC 6455 requires.
fn masked_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    const KEY: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];
    client_frame(opcode, payload, Some(KEY))
}

/// A single final client frame, masked with `key` or (a protocol violation)
/// not masked at all.
fn client_frame(opcode: u8, payload: &[u8], key: Option<[u8; 4]>) -> Vec<u8> {
    let mask_bit = if key.is_some() { 0x80 } else { 0x00 };
    let mut frame = vec![0x80 | opcode];
    match payload.len() {
        short @ 0..=125 => frame.push(mask_bit | short as u8),
        medium @ 126..=0xffff => {
            frame.push(mask_bit | 126);
            frame.extend_from_slice(&(medium as u16).to_be_bytes());
        }
        long => {
            frame.push(mask_bit | 127);
            frame.extend_from_slice(&(long as u64).to_be_bytes());
        }
    }
    match key {
        Some(key) => {
            frame.extend_from_slice(&key);
            frame.extend(
                payload
                    .iter()
                    .enumerate()
                    .map(|(index, byte)| byte ^ key[index % 4]),
            );
        }
        None => frame.extend_from_slice(payload),
    }
    frame
}
