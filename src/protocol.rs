//! Wire protocol v1: the JSON text frames of `docs/protocol.md`.
//!
//! Decoding turns one client text frame into a [`ClientFrame`] or a
//! [`DecodeError`] carrying the wire error code; nothing past this module
//! sees raw JSON from a client. Encoding produces [`Utf8Bytes`], so an event
//! is serialized once and every recipient gets a cheap clone of the same
//! bytes.
//!
//! This is the one definition of the vocabulary: every request
//! ([`Request`], its [`RequestKind`]), every event ([`Event`], its
//! [`EventKind`] and its [`Audience`]) and every error code. Their wire
//! names come from serde and strum derives on these types; metrics, the
//! store codec and the fan-out take them from here.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use strum::{EnumDiscriminants, EnumIter, EnumString, IntoStaticStr};
use tokio_tungstenite::tungstenite::Utf8Bytes;

use crate::ids::{ConnId, IdError, Meta, MetaError, NodeId, RoomName, UserId};

/// Longest `ref` string a client may send, in characters.
pub const MAX_REF_LEN: usize = 64;

/// The `code` of an error frame; one variant per documented code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, EnumIter, IntoStaticStr)]
#[serde(rename_all = "snake_case")]
#[strum(serialize_all = "snake_case")]
pub enum ErrorCode {
    /// Not JSON, not an object, a missing or ill-typed field, a binary frame.
    BadRequest,
    /// `type` names no request.
    UnknownType,
    /// A room name outside the naming rules.
    InvalidRoom,
    /// A user id outside the naming rules.
    InvalidUser,
    /// `leave` of a room the connection is not in.
    NotJoined,
    /// A list longer than the configured bound.
    LimitExceeded,
    /// The presence store did not answer a direct read.
    Unavailable,
    /// The connection's token does not allow this room, user or feed.
    Forbidden,
    /// Over the connection's message rate; the message was dropped.
    RateLimited,
    /// A `refresh` token that does not verify.
    InvalidToken,
}

impl From<IdError> for ErrorCode {
    fn from(e: IdError) -> Self {
        match e {
            IdError::User => ErrorCode::InvalidUser,
            IdError::Room => ErrorCode::InvalidRoom,
        }
    }
}

/// What a client asked for. [`RequestKind`] names each kind: its wire
/// `type` (what [`decode`] reads) and its metrics label.
#[derive(Debug, Clone, PartialEq, EnumDiscriminants)]
#[strum_discriminants(
    name(RequestKind),
    derive(EnumIter, EnumString, IntoStaticStr),
    strum(serialize_all = "snake_case")
)]
pub enum Request {
    /// Join a room; with metadata, which becomes the connection's metadata
    /// from then on.
    Join(RoomName, Option<Meta>),
    /// Leave a room.
    Leave(RoomName),
    /// Set this user's state in a room the connection is in (latest wins;
    /// the connection writes at most `--state-rate` a second per room).
    Update(RoomName, Meta),
    /// Subscribe to these users' online/offline events.
    Watch(Vec<UserId>),
    /// Undo `Watch` for these users.
    Unwatch(Vec<UserId>),
    /// One-off presence of these users.
    Query(Vec<UserId>),
    /// One page of a room's members.
    Room {
        /// The room.
        room: RoomName,
        /// About how many members per page.
        limit: usize,
        /// Where to continue (`None`: the start).
        cursor: Option<String>,
    },
    /// Users online and connections, cluster-wide.
    Count,
    /// Application-level ping.
    Ping,
    /// Replace the connection's token before it expires.
    Refresh(String),
    /// Receive every user's online/offline (needs the `feed` claim).
    SubscribeFeed,
    /// Undo `SubscribeFeed`.
    UnsubscribeFeed,
}

impl Request {
    /// Which kind of request this is.
    pub fn kind(&self) -> RequestKind {
        self.into()
    }

    /// The room this request reads or changes, which the token's `rooms`
    /// claim must allow (leaving is always allowed).
    pub fn room_to_grant(&self) -> Option<&RoomName> {
        match self {
            Request::Join(room, _) | Request::Update(room, _) | Request::Room { room, .. } => {
                Some(room)
            }
            _ => None,
        }
    }
}

/// A decoded client frame: the request and the `ref` to echo.
#[derive(Debug, Clone, PartialEq)]
pub struct ClientFrame {
    /// The client's `ref`, echoed verbatim in the answer.
    pub reference: Option<Value>,
    /// The request.
    pub request: Request,
}

/// A frame that could not be decoded, with what the error frame says.
#[derive(Debug, Clone, PartialEq)]
pub struct DecodeError {
    /// The frame's `ref`, when it had a readable one.
    pub reference: Option<Value>,
    /// Wire error code.
    pub code: ErrorCode,
    /// Human-readable reason.
    pub message: String,
}

impl DecodeError {
    fn new(reference: Option<Value>, code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            reference,
            code,
            message: message.into(),
        }
    }

    /// The error frame to send back.
    pub fn to_frame(&self) -> Utf8Bytes {
        error_frame(self.reference.as_ref(), self.code, &self.message)
    }
}

/// Default `limit` of a `room` query.
pub const DEFAULT_PAGE: usize = 100;

/// Bounds on what a client frame may ask for.
#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    /// Longest `users` list (distinct ids).
    pub max_ids: usize,
    /// Largest `limit` of a `room` query.
    pub max_page: usize,
    /// Largest `meta` of a `join`, in bytes of compact JSON.
    pub max_meta_bytes: usize,
    /// Largest `state` of an `update`, in bytes of compact JSON.
    pub max_state_bytes: usize,
}

/// Decodes one client text frame within `bounds`.
pub fn decode(text: &str, bounds: Bounds) -> Result<ClientFrame, DecodeError> {
    let max_ids = bounds.max_ids;
    let bad = |r: &Option<Value>, m: &str| DecodeError::new(r.clone(), ErrorCode::BadRequest, m);
    let value: Value = serde_json::from_str(text)
        .map_err(|e| DecodeError::new(None, ErrorCode::BadRequest, format!("invalid JSON: {e}")))?;
    let Value::Object(mut obj) = value else {
        return Err(bad(&None, "a frame must be a JSON object"));
    };
    let reference = match obj.remove("ref") {
        None | Some(Value::Null) => None,
        Some(v @ Value::Number(_)) => Some(v),
        Some(Value::String(s)) if s.chars().count() <= MAX_REF_LEN => Some(Value::String(s)),
        Some(_) => {
            return Err(bad(
                &None,
                "\"ref\" must be a number or a string of at most 64 characters",
            ));
        }
    };
    let kind = match obj.get("type") {
        Some(Value::String(s)) => s.as_str().parse::<RequestKind>().map_err(|_| {
            DecodeError::new(
                reference.clone(),
                ErrorCode::UnknownType,
                format!("unknown type {:?}", truncate(s, 40)),
            )
        })?,
        Some(_) => return Err(bad(&reference, "\"type\" must be a string")),
        None => return Err(bad(&reference, "missing \"type\"")),
    };
    let request = match kind {
        RequestKind::Join => Request::Join(
            room_field(&obj, &reference)?,
            meta_field(&obj, &reference, bounds.max_meta_bytes)?,
        ),
        RequestKind::Leave => Request::Leave(room_field(&obj, &reference)?),
        RequestKind::Update => {
            let room = room_field(&obj, &reference)?;
            match obj.get("state").filter(|v| !v.is_null()) {
                Some(state) => Request::Update(
                    room,
                    object_field("state", state, &reference, bounds.max_state_bytes)?,
                ),
                None => return Err(bad(&reference, "missing \"state\"")),
            }
        }
        RequestKind::Watch => Request::Watch(users_field(&obj, &reference, max_ids)?),
        RequestKind::Unwatch => Request::Unwatch(users_field(&obj, &reference, max_ids)?),
        RequestKind::Query => Request::Query(users_field(&obj, &reference, max_ids)?),
        RequestKind::Ping => Request::Ping,
        RequestKind::Count => Request::Count,
        RequestKind::Room => room_query(&obj, &reference, bounds.max_page)?,
        RequestKind::Refresh => match obj.get("token") {
            Some(Value::String(token)) if !token.is_empty() => Request::Refresh(token.clone()),
            Some(_) => return Err(bad(&reference, "\"token\" must be a non-empty string")),
            None => return Err(bad(&reference, "missing \"token\"")),
        },
        RequestKind::SubscribeFeed => Request::SubscribeFeed,
        RequestKind::UnsubscribeFeed => Request::UnsubscribeFeed,
    };
    Ok(ClientFrame { reference, request })
}

fn truncate(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

fn room_field(
    obj: &Map<String, Value>,
    reference: &Option<Value>,
) -> Result<RoomName, DecodeError> {
    match obj.get("room") {
        Some(Value::String(s)) => RoomName::parse(s)
            .map_err(|e| DecodeError::new(reference.clone(), e.into(), e.to_string())),
        Some(_) => Err(DecodeError::new(
            reference.clone(),
            ErrorCode::BadRequest,
            "\"room\" must be a string",
        )),
        None => Err(DecodeError::new(
            reference.clone(),
            ErrorCode::BadRequest,
            "missing \"room\"",
        )),
    }
}

/// A `join`'s optional `meta`: a JSON object of at most `max` bytes as
/// compact JSON.
fn meta_field(
    obj: &Map<String, Value>,
    reference: &Option<Value>,
    max: usize,
) -> Result<Option<Meta>, DecodeError> {
    let Some(meta) = obj.get("meta").filter(|v| !v.is_null()) else {
        return Ok(None);
    };
    object_field("meta", meta, reference, max).map(Some)
}

/// A field that must be a JSON object of at most `max` bytes compact
/// (a `join`'s `meta`, an `update`'s `state`).
fn object_field(
    name: &str,
    value: &Value,
    reference: &Option<Value>,
    max: usize,
) -> Result<Meta, DecodeError> {
    Meta::from_value(value, max).map_err(|e| match e {
        MetaError::TooLarge { size, max } => DecodeError::new(
            reference.clone(),
            ErrorCode::LimitExceeded,
            format!("\"{name}\" is {size} bytes; at most {max}"),
        ),
        MetaError::NotJson | MetaError::NotObject => DecodeError::new(
            reference.clone(),
            ErrorCode::BadRequest,
            format!("\"{name}\" must be a JSON object"),
        ),
    })
}

fn room_query(
    obj: &Map<String, Value>,
    reference: &Option<Value>,
    max_page: usize,
) -> Result<Request, DecodeError> {
    let bad = |m: String| DecodeError::new(reference.clone(), ErrorCode::BadRequest, m);
    let room = room_field(obj, reference)?;
    let limit = match obj.get("limit") {
        None | Some(Value::Null) => DEFAULT_PAGE.min(max_page),
        Some(v) => v
            .as_u64()
            .and_then(|n| usize::try_from(n).ok())
            .filter(|n| (1..=max_page).contains(n))
            .ok_or_else(|| bad(format!("\"limit\" must be an integer from 1 to {max_page}")))?,
    };
    let cursor = match obj.get("cursor") {
        None | Some(Value::Null) => None,
        Some(Value::String(c)) if c.len() <= MAX_REF_LEN * 4 => Some(c.clone()),
        Some(_) => {
            return Err(bad(
                "\"cursor\" must be a string from a previous reply".into()
            ));
        }
    };
    Ok(Request::Room {
        room,
        limit,
        cursor,
    })
}

/// Reads `users`: validated, duplicates dropped, request order kept.
fn users_field(
    obj: &Map<String, Value>,
    reference: &Option<Value>,
    max_ids: usize,
) -> Result<Vec<UserId>, DecodeError> {
    let err = |code, msg: String| DecodeError::new(reference.clone(), code, msg);
    let list = match obj.get("users") {
        Some(Value::Array(list)) => list,
        Some(_) => {
            return Err(err(
                ErrorCode::BadRequest,
                "\"users\" must be an array of strings".into(),
            ));
        }
        None => return Err(err(ErrorCode::BadRequest, "missing \"users\"".into())),
    };
    let mut users: Vec<UserId> = Vec::with_capacity(list.len().min(max_ids));
    let mut seen = std::collections::HashSet::with_capacity(list.len().min(max_ids));
    for item in list {
        let Value::String(s) = item else {
            return Err(err(
                ErrorCode::BadRequest,
                "\"users\" must be an array of strings".into(),
            ));
        };
        let user = UserId::parse(s).map_err(|e| err(e.into(), e.to_string()))?;
        if seen.insert(user.clone()) {
            users.push(user);
        }
    }
    // Distinct ids count; the frame size bounds the raw list length.
    if users.len() > max_ids {
        return Err(err(
            ErrorCode::LimitExceeded,
            format!(
                "at most {max_ids} distinct users per request, got {}",
                users.len()
            ),
        ));
    }
    Ok(users)
}

fn encode<T: Serialize>(frame: &T) -> Utf8Bytes {
    // unwrap: these frames hold only strings, numbers and bools, which
    // serde_json always serializes.
    serde_json::to_string(frame).unwrap().into()
}

/// The first frame of every connection.
pub fn welcome_frame(conn: ConnId, user: &UserId, node: NodeId, heartbeat_ms: u64) -> Utf8Bytes {
    #[derive(Serialize)]
    struct Welcome<'a> {
        r#type: &'static str,
        conn: String,
        user: &'a str,
        node: String,
        heartbeat_ms: u64,
    }
    encode(&Welcome {
        r#type: "welcome",
        conn: conn.to_string(),
        user: user.as_str(),
        node: node.to_string(),
        heartbeat_ms,
    })
}

/// `{"type":"sync","users":[...]}`: the current presence of the users a
/// connection watches, sent after events may have been missed.
pub fn sync_users_frame(users: &[&UserState]) -> Utf8Bytes {
    #[derive(Serialize)]
    struct Sync<'a> {
        r#type: &'static str,
        users: &'a [&'a UserState],
    }
    encode(&Sync {
        r#type: "sync",
        users,
    })
}

/// `{"type":"sync","room":R,"members":[...]}`: a room's current members,
/// sent to its members after events may have been missed.
pub fn sync_room_frame(room: &RoomName, members: &[Member]) -> Utf8Bytes {
    #[derive(Serialize)]
    struct Sync<'a> {
        r#type: &'static str,
        room: &'a str,
        members: &'a [Member],
    }
    encode(&Sync {
        r#type: "sync",
        room: room.as_str(),
        members,
    })
}

/// An error frame.
pub fn error_frame(reference: Option<&Value>, code: ErrorCode, message: &str) -> Utf8Bytes {
    #[derive(Serialize)]
    struct Error<'a> {
        r#type: &'static str,
        #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
        reference: Option<&'a Value>,
        code: ErrorCode,
        message: &'a str,
    }
    encode(&Error {
        r#type: "error",
        reference,
        code,
        message,
    })
}

/// The answer to an application-level ping.
pub fn pong_frame(reference: Option<&Value>) -> Utf8Bytes {
    #[derive(Serialize)]
    struct Pong<'a> {
        r#type: &'static str,
        #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
        reference: Option<&'a Value>,
    }
    encode(&Pong {
        r#type: "pong",
        reference,
    })
}

/// One user's state in a `watch` or `query` reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UserState {
    /// The user.
    pub user: UserId,
    /// Whether any connection of theirs is live.
    pub online: bool,
    /// Their current presence sequence (0: never seen).
    pub seq: u64,
}

/// One member in a room snapshot, with the user's metadata (the latest
/// attached connection's).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Member {
    /// The member's user id.
    pub user: UserId,
    /// The member's metadata, when any connection of theirs carried some.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub meta: Option<Meta>,
    /// The member's room state, the latest `update` of any of their
    /// connections in the room, once there was one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state: Option<Meta>,
}

impl Member {
    /// A member without metadata or state.
    pub fn plain(user: UserId) -> Self {
        Self {
            user,
            meta: None,
            state: None,
        }
    }
}

/// The body of a successful reply, beside `type`, `ref` and `ok`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum ReplyBody {
    /// `join`: the room and its members.
    Joined {
        /// The room joined.
        room: RoomName,
        /// Members right after the join, sorted by user id.
        members: Vec<Member>,
    },
    /// `leave`: the room left.
    Left {
        /// The room left.
        room: RoomName,
    },
    /// `update`: the state was written, or replaced by a later `update`
    /// before it was (`superseded`, never sent to anyone).
    Updated {
        /// The room.
        room: RoomName,
        /// A later update took this one's place.
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        superseded: bool,
    },
    /// `watch` / `query`: each user's state.
    Users {
        /// One entry per distinct requested user, in request order.
        users: Vec<UserState>,
    },
    /// `room`: one page of members.
    RoomPage {
        /// The room.
        room: RoomName,
        /// How many members the room has.
        count: u64,
        /// This page's members.
        users: Vec<UserId>,
        /// The same members with their metadata and room state.
        members: Vec<Member>,
        /// Where the next page starts; `null` after the last.
        next_cursor: Option<String>,
    },
    /// `count`: cluster-wide counts.
    Count {
        /// Users with at least one live connection.
        users_online: u64,
        /// Live connections.
        connections: u64,
    },
    /// `refresh`: when the new token expires.
    Refreshed {
        /// The new token's `exp`, Unix seconds.
        expires_at: u64,
    },
    /// `unwatch`, `subscribe_feed`: nothing more to say.
    Empty {},
}

/// A successful reply frame.
pub fn reply_frame(reference: Option<&Value>, body: &ReplyBody) -> Utf8Bytes {
    #[derive(Serialize)]
    struct Reply<'a> {
        r#type: &'static str,
        #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
        reference: Option<&'a Value>,
        ok: bool,
        #[serde(flatten)]
        body: &'a ReplyBody,
    }
    encode(&Reply {
        r#type: "reply",
        reference,
        ok: true,
        body,
    })
}

/// Why a user went offline or left a room, carried by `offline` and `left`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// The client closed the connection, or sent `leave`.
    Closed,
    /// The connection was silent past the idle timeout (or failed).
    Timeout,
    /// The node holding the connection died; a surviving node reaped it.
    NodeLost,
    /// The node holding the connection was drained (SIGTERM/SIGINT).
    Shutdown,
}

/// How a connection's presence ends: at once, or after the offline grace
/// (`--offline-grace-ms`) unless the user comes back within it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ends {
    /// At once: a deliberate sign-out (the client's Close 1000) or an
    /// explicit `leave`.
    Now,
    /// After the grace: a tab closed or reloaded (Close 1001), a dropped
    /// network, an idle timeout, a node stopped or lost.
    AfterGrace,
}

/// A presence transition, as decided by the store, exactly as it goes on
/// the wire (`{"type":"online",...}`) and through the Redis codec.
/// [`EventKind`] names each kind; [`Event::audience`] says who hears it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, EnumDiscriminants)]
#[serde(tag = "type", rename_all = "lowercase")]
#[strum_discriminants(
    name(EventKind),
    derive(EnumIter, IntoStaticStr),
    strum(serialize_all = "lowercase")
)]
pub enum Event {
    /// The user's first connection came up.
    Online {
        /// Who.
        user: UserId,
        /// Their presence sequence after this transition.
        seq: u64,
    },
    /// The user's last connection went away.
    Offline {
        /// Who.
        user: UserId,
        /// Their presence sequence after this transition.
        seq: u64,
        /// Store clock at the transition, Unix milliseconds.
        last_seen: u64,
        /// Why.
        reason: Reason,
    },
    /// The user's first connection joined the room.
    Joined {
        /// Which room.
        room: RoomName,
        /// Who.
        user: UserId,
    },
    /// The user's last connection left the room.
    Left {
        /// Which room.
        room: RoomName,
        /// Who.
        user: UserId,
        /// Why.
        reason: Reason,
    },
    /// A member's room state changed (an `update` of one of their
    /// connections in the room).
    Updated {
        /// Which room.
        room: RoomName,
        /// Whose state.
        user: UserId,
        /// The new state.
        state: Meta,
        /// The connection that sent it, which does not hear it (the store
        /// carries it; the wire does not).
        #[serde(skip_serializing, default)]
        from: Option<ConnId>,
    },
}

/// Who hears an event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Audience {
    /// The connections watching this user, and the connections holding
    /// the global feed (each once).
    Watchers(UserId),
    /// The connections that joined this room.
    Room(RoomName),
    /// The connections that joined this room but one (the sender).
    RoomExcept(RoomName, ConnId),
}

impl Event {
    /// Who hears this event: the one place that decides it.
    pub fn audience(&self) -> Audience {
        match self {
            Event::Online { user, .. } | Event::Offline { user, .. } => {
                Audience::Watchers(user.clone())
            }
            Event::Joined { room, .. } | Event::Left { room, .. } => Audience::Room(room.clone()),
            Event::Updated {
                room,
                from: Some(conn),
                ..
            } => Audience::RoomExcept(room.clone(), *conn),
            Event::Updated { room, .. } => Audience::Room(room.clone()),
        }
    }

    /// Which kind of event this is.
    pub fn kind(&self) -> EventKind {
        self.into()
    }

    /// Serializes the event frame once; recipients share the bytes.
    pub fn encode(&self) -> Utf8Bytes {
        encode(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const B: Bounds = Bounds {
        max_ids: 3,
        max_page: 10,
        max_meta_bytes: 20,
        max_state_bytes: 30,
    };

    fn code(text: &str) -> ErrorCode {
        decode(text, B).unwrap_err().code
    }

    #[test]
    fn decodes_every_request() {
        let f = decode(r#"{"type":"join","room":"doc:1","ref":1}"#, B).unwrap();
        assert_eq!(f.reference, Some(json!(1)));
        assert_eq!(
            f.request,
            Request::Join(RoomName::parse("doc:1").unwrap(), None)
        );
        let f = decode(r#"{"type":"join","room":"r","meta":{"name": "Ann"}}"#, B).unwrap();
        assert_eq!(
            f.request,
            Request::Join(
                RoomName::parse("r").unwrap(),
                Some(Meta::parse(r#"{"name":"Ann"}"#, 100).unwrap())
            )
        );
        let f = decode(r#"{"type":"watch","users":["b","a","b"],"ref":"x"}"#, B).unwrap();
        let ids = |v: &[&str]| {
            v.iter()
                .map(|s| UserId::parse(s).unwrap())
                .collect::<Vec<_>>()
        };
        assert_eq!(f.request, Request::Watch(ids(&["b", "a"])));
        assert_eq!(f.reference, Some(json!("x")));
        assert_eq!(
            decode(r#"{"type":"ping"}"#, B).unwrap().request,
            Request::Ping
        );
        assert_eq!(
            decode(r#"{"type":"count"}"#, B).unwrap().request,
            Request::Count
        );
        assert_eq!(
            decode(r#"{"type":"room","room":"r","limit":5,"cursor":"c"}"#, B)
                .unwrap()
                .request,
            Request::Room {
                room: RoomName::parse("r").unwrap(),
                limit: 5,
                cursor: Some("c".into())
            }
        );
        let default = decode(r#"{"type":"room","room":"r"}"#, B).unwrap().request;
        assert!(matches!(
            default,
            Request::Room {
                limit: 10,
                cursor: None,
                ..
            }
        ));
    }

    #[test]
    fn every_request_kind_is_decoded_from_its_own_name() {
        use strum::IntoEnumIterator;
        for kind in RequestKind::iter() {
            let name: &str = kind.into();
            let frame = format!(r#"{{"type":"{name}"}}"#);
            match decode(&frame, B) {
                Ok(decoded) => assert_eq!(decoded.request.kind(), kind),
                // Fields missing, but the type was known.
                Err(e) => assert_eq!(e.code, ErrorCode::BadRequest, "{name}: {e:?}"),
            }
        }
        assert_eq!(code(r#"{"type":"Join"}"#), ErrorCode::UnknownType);
    }

    #[test]
    fn bad_frames_get_their_codes_and_keep_the_ref() {
        assert_eq!(code("nope"), ErrorCode::BadRequest);
        assert_eq!(code("[1,2]"), ErrorCode::BadRequest);
        assert_eq!(code(r#"{"ref":1}"#), ErrorCode::BadRequest);
        assert_eq!(code(r#"{"type":"dance"}"#), ErrorCode::UnknownType);
        assert_eq!(code(r#"{"type":"join"}"#), ErrorCode::BadRequest);
        assert_eq!(code(r#"{"type":"join","room":5}"#), ErrorCode::BadRequest);
        assert_eq!(
            code(r#"{"type":"join","room":"r","meta":[1]}"#),
            ErrorCode::BadRequest
        );
        assert_eq!(
            code(r#"{"type":"join","room":"r","meta":{"name":"a name far too long"}}"#),
            ErrorCode::LimitExceeded
        );
        assert_eq!(
            code(r#"{"type":"join","room":"a b"}"#),
            ErrorCode::InvalidRoom
        );
        assert_eq!(
            code(r#"{"type":"watch","users":["a b"]}"#),
            ErrorCode::InvalidUser
        );
        assert_eq!(
            code(r#"{"type":"watch","users":"a"}"#),
            ErrorCode::BadRequest
        );
        assert_eq!(
            code(r#"{"type":"watch","users":[1]}"#),
            ErrorCode::BadRequest
        );
        assert_eq!(
            code(r#"{"type":"query","users":["a","b","c","d"]}"#),
            ErrorCode::LimitExceeded
        );
        // Duplicates count once against the limit.
        assert!(decode(r#"{"type":"query","users":["a","b","c","a"]}"#, B).is_ok());
        let e = decode(r#"{"type":"join","room":"a b","ref":"r1"}"#, B).unwrap_err();
        assert_eq!(e.reference, Some(json!("r1")));
        assert_eq!(
            code(r#"{"type":"room","room":"r","limit":0}"#),
            ErrorCode::BadRequest
        );
        assert_eq!(
            code(r#"{"type":"room","room":"r","limit":11}"#),
            ErrorCode::BadRequest
        );
        assert_eq!(
            code(r#"{"type":"room","room":"r","cursor":5}"#),
            ErrorCode::BadRequest
        );
        assert_eq!(code(r#"{"type":"room"}"#), ErrorCode::BadRequest);
        let e = decode(r#"{"type":"join","ref":{"x":1}}"#, B).unwrap_err();
        assert_eq!((e.code, e.reference), (ErrorCode::BadRequest, None));
    }

    #[test]
    fn frames_encode_as_documented() {
        let user = UserId::parse("bob").unwrap();
        let room = RoomName::parse("doc:1").unwrap();
        let v = |b: Utf8Bytes| serde_json::from_str::<Value>(b.as_str()).unwrap();
        assert_eq!(
            v(Event::Online {
                user: user.clone(),
                seq: 7
            }
            .encode()),
            json!({"type":"online","user":"bob","seq":7})
        );
        assert_eq!(
            v(Event::Offline {
                user: user.clone(),
                seq: 8,
                last_seen: 5,
                reason: Reason::NodeLost,
            }
            .encode()),
            json!({"type":"offline","user":"bob","seq":8,"last_seen":5,"reason":"node_lost"})
        );
        assert_eq!(
            v(Event::Left {
                room: room.clone(),
                user,
                reason: Reason::Closed,
            }
            .encode()),
            json!({"type":"left","room":"doc:1","user":"bob","reason":"closed"})
        );
        let body = ReplyBody::Joined {
            room: room.clone(),
            members: vec![Member::plain(UserId::parse("bob").unwrap())],
        };
        assert_eq!(
            v(reply_frame(Some(&json!(1)), &body)),
            json!({"type":"reply","ref":1,"ok":true,"room":"doc:1","members":[{"user":"bob"}]})
        );
        assert_eq!(
            v(reply_frame(None, &ReplyBody::Empty {})),
            json!({"type":"reply","ok":true})
        );
        assert_eq!(
            v(error_frame(None, ErrorCode::NotJoined, "m")),
            json!({"type":"error","code":"not_joined","message":"m"})
        );
    }
}
