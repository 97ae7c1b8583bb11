//! Properties checked on generated inputs (proptest): the client frame
//! decoder against docs/protocol.md, and both stores' transition logic
//! against a reference model.
//!
//! The decoder properties need nothing but the library. The store property
//! issues random op sequences of the kind a registry issues (a connection
//! leaves its rooms, is detached, then disconnects) to `MemoryStore` and to
//! a `RedisStore` on one private redis-server, cut into random batches, and
//! compares every outcome with a model that knows only which connections
//! are live and which rooms each is in: a user is online while one of their
//! connections is live, a member of a room while one of their connections
//! is in it. Each store runs twice: with no offline grace, and with a grace
//! longer than any case, where a connection that ends other than by a
//! sign-out leaves its user online (and a member) until they come back.

mod support;

use std::{
    collections::{HashMap, HashSet},
    fmt::Display,
    future::Future,
    sync::{
        Arc, LazyLock,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use futures_util::{FutureExt, future::BoxFuture};
use presenced::{
    ids::{ConnId, Meta, NodeId, RoomName, UserId},
    protocol::{
        Bounds, ClientFrame, DEFAULT_PAGE, DecodeError, Ends, ErrorCode, Event, MAX_REF_LEN,
        Member, Reason, Request, decode, pong_frame,
    },
    store::{MemoryStore, Outcome, Read, RedisStore, Store, StoreError, StoreOp, UserPresence},
};
use proptest::{
    collection::{btree_map, vec},
    option,
    prelude::*,
    sample::{Index, select},
    test_runner::{TestCaseError, TestRunner},
};
use serde_json::{Map, Value, json};
use support::RedisServer;

// ---------------------------------------------------------------------------
// The decoder
// ---------------------------------------------------------------------------

/// The gateway's defaults (`--max-ids`, `--max-page`, `--max-meta-bytes`,
/// `--max-state-bytes`).
const BOUNDS: Bounds = Bounds {
    max_ids: 1000,
    max_page: 1000,
    max_meta_bytes: 1024,
    max_state_bytes: 1024,
};

/// Requests carrying a `users` list.
const LIST_TYPES: [&str; 3] = ["watch", "unwatch", "query"];
/// Requests carrying a `room`.
const ROOM_TYPES: [&str; 3] = ["join", "leave", "room"];
/// Request types this version decodes. More may be added, so no property
/// assumes that another type is unknown, except the `x-` ones.
const KNOWN_TYPES: [&str; 11] = [
    "join",
    "leave",
    "watch",
    "unwatch",
    "query",
    "room",
    "count",
    "ping",
    "refresh",
    "subscribe_feed",
    "unsubscribe_feed",
];

/// The codes decoding may give; `not_joined` and `unavailable` come from
/// the registry.
const DECODER_CODES: [ErrorCode; 5] = [
    ErrorCode::BadRequest,
    ErrorCode::UnknownType,
    ErrorCode::InvalidRoom,
    ErrorCode::InvalidUser,
    ErrorCode::LimitExceeded,
];

/// The codes of docs/protocol.md's "Errors" table.
static DOCUMENTED_CODES: LazyLock<Vec<String>> = LazyLock::new(|| {
    let doc = include_str!("../docs/protocol.md");
    let errors = doc
        .split("### Errors")
        .nth(1)
        .expect("docs/protocol.md has an Errors section");
    let codes: Vec<String> = errors
        .lines()
        .take_while(|line| !line.starts_with("## "))
        .filter_map(|line| line.strip_prefix("| `")?.split('`').next())
        .map(str::to_owned)
        .collect();
    assert!(
        codes.iter().any(|c| c == "bad_request"),
        "the Errors table was not found: {codes:?}"
    );
    codes
});

/// A valid user id: a few recurring ones (so lists repeat ids), short
/// random ones and ones at the length limit.
fn user_id() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => select(vec!["ann", "bob", "carol", "B.1", "x@y:z-_"]).prop_map(str::to_owned),
        2 => "[A-Za-z0-9_.:@-]{1,16}",
        1 => "[A-Za-z0-9_.:@-]{120,128}",
    ]
}

/// A valid room name.
fn room_name() -> impl Strategy<Value = String> {
    prop_oneof![
        2 => select(vec!["doc:1", "doc:1/a+b=c", "r"]).prop_map(str::to_owned),
        2 => "[A-Za-z0-9_.:@/+=-]{1,24}",
        1 => "[A-Za-z0-9_.:@/+=-]{190,200}",
    ]
}

/// A user id breaking the rules: empty, over 128 bytes, or with a
/// character outside `A-Z a-z 0-9 _ - . : @`.
fn invalid_user_id() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        "[A-Za-z0-9_.:@-]{129,160}",
        "[A-Za-z0-9_.:@-]{0,8}[^A-Za-z0-9_.:@-][A-Za-z0-9_.:@-]{0,8}",
    ]
}

/// A room name breaking the rules: empty, over 200 bytes, or with a
/// character outside `A-Z a-z 0-9 _ - . : @ / + =`.
fn invalid_room_name() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        "[A-Za-z0-9_.:@/+=-]{201,240}",
        "[A-Za-z0-9_.:@/+=-]{0,8}[^A-Za-z0-9_.:@/+=-][A-Za-z0-9_.:@/+=-]{0,8}",
    ]
}

/// A valid `ref`: absent, a number, or a string of at most 64 characters.
fn reference() -> impl Strategy<Value = Option<Value>> {
    prop_oneof![
        Just(None),
        any::<i64>().prop_map(|n| Some(json!(n))),
        any::<u64>().prop_map(|n| Some(json!(n))),
        vec(any::<char>(), 0..=MAX_REF_LEN)
            .prop_map(|s| Some(Value::String(s.into_iter().collect()))),
    ]
}

/// A JSON value without arrays or objects.
fn json_leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        any::<String>().prop_map(Value::String),
        user_id().prop_map(Value::String),
    ]
}

/// A field name: mostly the protocol's.
fn field_name() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => select(vec!["type", "ref", "room", "users", "meta", "limit", "cursor"])
            .prop_map(str::to_owned),
        1 => "[a-z]{1,6}",
    ]
}

/// Any JSON value, a few levels deep.
fn json_value() -> impl Strategy<Value = Value> {
    json_leaf().prop_recursive(3, 32, 6, |inner| {
        prop_oneof![
            vec(inner.clone(), 0..6).prop_map(Value::Array),
            btree_map(field_name(), inner, 0..6)
                .prop_map(|fields| Value::Object(fields.into_iter().collect())),
        ]
    })
}

/// A JSON object that looks like a request: protocol fields with any
/// values, often a known `type` and a valid `ref`.
fn request_like_object() -> impl Strategy<Value = Value> {
    (
        btree_map(field_name(), json_value(), 0..6),
        option::of(select(KNOWN_TYPES.to_vec())),
        option::of(reference()),
    )
        .prop_map(|(fields, kind, reference)| {
            let mut object: Map<String, Value> = fields.into_iter().collect();
            if let Some(kind) = kind {
                object.insert("type".into(), kind.into());
            }
            if let Some(Some(reference)) = reference {
                object.insert("ref".into(), reference);
            }
            Value::Object(object)
        })
}

/// A `meta` object of a few small fields.
fn meta_object() -> impl Strategy<Value = Map<String, Value>> {
    btree_map("[a-z]{1,8}", json_leaf(), 0..4).prop_map(|fields| fields.into_iter().collect())
}

/// One request frame as text: `type`, `ref` when given, and `fields`.
fn frame<K: Into<String>>(
    kind: &str,
    reference: &Option<Value>,
    fields: Vec<(K, Value)>,
) -> String {
    let mut object = Map::new();
    object.insert("type".into(), kind.into());
    if let Some(reference) = reference {
        object.insert("ref".into(), reference.clone());
    }
    for (name, value) in fields {
        object.insert(name.into(), value);
    }
    Value::Object(object).to_string()
}

fn parse_user(s: &str) -> UserId {
    UserId::parse(s).expect("generated ids follow the rules")
}

fn parse_room(s: &str) -> RoomName {
    RoomName::parse(s).expect("generated names follow the rules")
}

/// Each distinct id once, in request order.
fn distinct_ids<S: AsRef<str>>(ids: &[S]) -> Vec<UserId> {
    let mut seen = HashSet::new();
    ids.iter()
        .map(AsRef::as_ref)
        .filter(|id| seen.insert(*id))
        .map(parse_user)
        .collect()
}

fn list_request(kind: &str, users: Vec<UserId>) -> Request {
    match kind {
        "watch" => Request::Watch(users),
        "unwatch" => Request::Unwatch(users),
        "query" => Request::Query(users),
        other => unreachable!("not a list request: {other}"),
    }
}

type Fields = Vec<(&'static str, Value)>;

/// A well-formed request from valid ids, as text, and what it must decode
/// to.
fn well_formed() -> impl Strategy<Value = (String, ClientFrame)> {
    let request = prop_oneof![
        (room_name(), option::of(meta_object())).prop_map(|(room, meta)| {
            let mut fields: Fields = vec![("room", json!(room))];
            let compact = meta.map(|meta| {
                let meta = Value::Object(meta);
                let compact = meta.to_string();
                fields.push(("meta", meta));
                Meta::from_stored(compact).expect("compact JSON")
            });
            ("join", fields, Request::Join(parse_room(&room), compact))
        }),
        room_name().prop_map(|room| {
            let request = Request::Leave(parse_room(&room));
            ("leave", vec![("room", json!(room))], request)
        }),
        (room_name(), meta_object()).prop_map(|(room, state)| {
            let state = Value::Object(state);
            let compact = Meta::from_stored(state.to_string()).expect("compact JSON");
            let request = Request::Update(parse_room(&room), compact);
            (
                "update",
                vec![("room", json!(room)), ("state", state)],
                request,
            )
        }),
        (select(LIST_TYPES.to_vec()), vec(user_id(), 0..12)).prop_map(|(kind, users)| {
            let request = list_request(kind, distinct_ids(&users));
            (kind, vec![("users", json!(users))], request)
        }),
        (
            room_name(),
            option::of(1..=BOUNDS.max_page),
            prop_oneof![
                Just(None),
                Just(Some(Value::Null)),
                "[A-Za-z0-9_.:@-]{1,32}".prop_map(|c| Some(Value::String(c))),
            ],
        )
            .prop_map(|(room, limit, cursor)| {
                let mut fields: Fields = vec![("room", json!(room))];
                if let Some(limit) = limit {
                    fields.push(("limit", json!(limit)));
                }
                if let Some(cursor) = &cursor {
                    fields.push(("cursor", cursor.clone()));
                }
                let request = Request::Room {
                    room: parse_room(&room),
                    limit: limit.unwrap_or(DEFAULT_PAGE),
                    cursor: cursor.and_then(|c| c.as_str().map(str::to_owned)),
                };
                ("room", fields, request)
            }),
        Just(("count", Fields::new(), Request::Count)),
        Just(("ping", Fields::new(), Request::Ping)),
        Just(("subscribe_feed", Fields::new(), Request::SubscribeFeed)),
        Just(("unsubscribe_feed", Fields::new(), Request::UnsubscribeFeed)),
        "[A-Za-z0-9_.-]{1,80}".prop_map(|token| {
            let request = Request::Refresh(token.clone());
            ("refresh", vec![("token", json!(token))], request)
        }),
    ];
    (request, reference()).prop_map(|((kind, fields, request), reference)| {
        let text = frame(kind, &reference, fields);
        (text, ClientFrame { reference, request })
    })
}

/// Any text, JSON-looking text, and well-formed frames with one character
/// inserted or cut short.
fn arbitrary_text() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        "\\{[ -~]{0,60}\\}",
        (well_formed(), any::<Index>(), any::<char>(), any::<bool>()).prop_map(
            |((text, _), at, c, cut)| {
                let mut chars: Vec<char> = text.chars().collect();
                let at = at.index(chars.len() + 1);
                if cut {
                    chars.truncate(at);
                } else {
                    chars.insert(at, c);
                }
                chars.into_iter().collect()
            }
        ),
    ]
}

/// The type string of the requests that have one field to check.
fn kind_of(request: &Request) -> Option<&'static str> {
    match request {
        Request::Join(..) => Some("join"),
        Request::Leave(_) => Some("leave"),
        Request::Update(..) => Some("update"),
        Request::Watch(_) => Some("watch"),
        Request::Unwatch(_) => Some("unwatch"),
        Request::Query(_) => Some("query"),
        Request::Room { .. } => Some("room"),
        _ => None,
    }
}

fn users_of(request: &Request) -> Option<&[UserId]> {
    match request {
        Request::Watch(users) | Request::Unwatch(users) | Request::Query(users) => Some(users),
        _ => None,
    }
}

fn check_reference(reference: &Option<Value>) -> Result<(), TestCaseError> {
    match reference {
        None | Some(Value::Number(_)) => Ok(()),
        Some(Value::String(s)) => {
            prop_assert!(s.chars().count() <= MAX_REF_LEN, "ref {:?}", s);
            Ok(())
        }
        Some(other) => Err(TestCaseError::fail(format!("ref {other:?}"))),
    }
}

/// An error the gateway can send as it is: a documented decoder code, a
/// message, a valid `ref`, and a JSON error frame saying so.
fn check_error(error: &DecodeError) -> Result<(), TestCaseError> {
    prop_assert!(DECODER_CODES.contains(&error.code), "{:?}", error);
    prop_assert!(!error.message.is_empty(), "{:?}", error);
    check_reference(&error.reference)?;
    let frame: Value = serde_json::from_str(error.to_frame().as_str())
        .map_err(|e| TestCaseError::fail(format!("error frame is not JSON: {e}")))?;
    prop_assert_eq!(frame["type"].as_str(), Some("error"));
    let code = frame["code"].as_str().unwrap_or_default();
    prop_assert!(
        DOCUMENTED_CODES.iter().any(|c| c == code),
        "code {:?} is not in docs/protocol.md",
        code
    );
    prop_assert_eq!(frame["message"].as_str(), Some(error.message.as_str()));
    prop_assert_eq!(frame.get("ref"), error.reference.as_ref());
    Ok(())
}

/// `decode` answers `text` with a sendable error, or with a request that
/// agrees with the JSON object it came from.
fn check_decoded(text: &str, bounds: Bounds) -> Result<(), TestCaseError> {
    let frame = match decode(text, bounds) {
        Ok(frame) => frame,
        Err(error) => return check_error(&error),
    };
    let value: Value = serde_json::from_str(text)
        .map_err(|e| TestCaseError::fail(format!("decoded text that is not JSON: {e}")))?;
    let object = value
        .as_object()
        .ok_or_else(|| TestCaseError::fail("decoded JSON that is not an object"))?;
    check_reference(&frame.reference)?;
    let sent_ref = object.get("ref").filter(|r| !r.is_null());
    prop_assert_eq!(frame.reference.as_ref(), sent_ref);
    if let Some(kind) = kind_of(&frame.request) {
        prop_assert_eq!(object["type"].as_str(), Some(kind));
    }
    if let Some(users) = users_of(&frame.request) {
        prop_assert!(users.len() <= bounds.max_ids);
        let sent: Vec<&str> = object["users"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        let want = distinct_ids(&sent);
        prop_assert_eq!(users, want.as_slice());
    }
    Ok(())
}

/// The error `decode` must have answered, checked as sendable.
fn refused(result: Result<ClientFrame, DecodeError>) -> Result<DecodeError, TestCaseError> {
    match result {
        Ok(frame) => Err(TestCaseError::fail(format!("accepted: {frame:?}"))),
        Err(error) => check_error(&error).map(|()| error),
    }
}

/// `max_ids`, how many distinct ids the list holds, and the list: each
/// distinct id at least once, some repeated, shuffled.
fn list_with_repeats() -> impl Strategy<Value = (usize, usize, Vec<String>)> {
    (1usize..=8)
        .prop_flat_map(|max_ids| (Just(max_ids), 0..=2 * max_ids + 2, "[A-Za-z0-9_.:@-]{0,6}"))
        .prop_flat_map(|(max_ids, distinct, stem)| {
            let ids: Vec<String> = (0..distinct).map(|i| format!("{stem}u{i}")).collect();
            let repeats = if distinct == 0 {
                Just(Vec::new()).boxed()
            } else {
                vec(0..distinct, 0..=2 * max_ids).boxed()
            };
            (Just(max_ids), Just(distinct), Just(ids), repeats)
        })
        .prop_flat_map(|(max_ids, distinct, ids, repeats)| {
            let mut list = ids.clone();
            list.extend(repeats.into_iter().map(|i| ids[i].clone()));
            (Just(max_ids), Just(distinct), Just(list).prop_shuffle())
        })
}

proptest! {
    #[test]
    fn any_text_is_decoded_or_refused_with_a_documented_code(text in arbitrary_text()) {
        check_decoded(&text, BOUNDS)?;
    }

    #[test]
    fn any_json_is_decoded_or_refused_with_a_documented_code(
        value in prop_oneof![json_value(), request_like_object()],
    ) {
        check_decoded(&value.to_string(), BOUNDS)?;
    }

    #[test]
    fn well_formed_requests_decode_to_exactly_that_request((text, expected) in well_formed()) {
        prop_assert_eq!(decode(&text, BOUNDS), Ok(expected));
    }

    #[test]
    fn a_user_id_breaking_the_rules_is_invalid_user(
        kind in select(LIST_TYPES.to_vec()),
        mut users in vec(user_id(), 0..6),
        bad in invalid_user_id(),
        at in any::<Index>(),
        reference in reference(),
    ) {
        users.insert(at.index(users.len() + 1), bad);
        let error = refused(decode(&frame(kind, &reference, vec![("users", json!(users))]), BOUNDS))?;
        prop_assert_eq!(error.code, ErrorCode::InvalidUser);
        prop_assert_eq!(error.reference, reference);
    }

    #[test]
    fn a_room_name_breaking_the_rules_is_invalid_room(
        kind in select(ROOM_TYPES.to_vec()),
        bad in invalid_room_name(),
        reference in reference(),
    ) {
        let error = refused(decode(&frame(kind, &reference, vec![("room", json!(bad))]), BOUNDS))?;
        prop_assert_eq!(error.code, ErrorCode::InvalidRoom);
        prop_assert_eq!(error.reference, reference);
    }

    #[test]
    fn more_distinct_ids_than_max_ids_is_limit_exceeded_and_repeats_count_once(
        kind in select(LIST_TYPES.to_vec()),
        (max_ids, distinct, users) in list_with_repeats(),
        reference in reference(),
    ) {
        let bounds = Bounds { max_ids, ..BOUNDS };
        let result = decode(&frame(kind, &reference, vec![("users", json!(users))]), bounds);
        if distinct <= max_ids {
            let request = list_request(kind, distinct_ids(&users));
            prop_assert_eq!(result, Ok(ClientFrame { reference, request }));
        } else {
            let error = refused(result)?;
            prop_assert_eq!(error.code, ErrorCode::LimitExceeded);
            prop_assert_eq!(error.reference, reference);
        }
    }

    #[test]
    fn a_join_meta_is_an_object_within_max_meta_bytes(
        room in room_name(),
        meta in meta_object(),
        max_meta_bytes in 2usize..=160,
        reference in reference(),
    ) {
        let bounds = Bounds { max_meta_bytes, ..BOUNDS };
        let meta = Value::Object(meta);
        let compact = meta.to_string();
        let text = frame("join", &reference, vec![("room", json!(room)), ("meta", meta)]);
        let result = decode(&text, bounds);
        if compact.len() <= max_meta_bytes {
            let meta = Meta::from_stored(compact).expect("compact JSON");
            let request = Request::Join(parse_room(&room), Some(meta));
            prop_assert_eq!(result, Ok(ClientFrame { reference, request }));
        } else {
            let error = refused(result)?;
            prop_assert_eq!(error.code, ErrorCode::LimitExceeded);
            prop_assert_eq!(error.reference, reference);
        }
    }

    #[test]
    fn an_update_state_is_an_object_within_max_state_bytes(
        room in room_name(),
        state in prop_oneof![
            meta_object().prop_map(Value::Object),
            json_value().prop_filter("not an object, not null", |v| !v.is_object() && !v.is_null()),
        ],
        max_state_bytes in 2usize..=160,
        reference in reference(),
    ) {
        let bounds = Bounds { max_state_bytes, ..BOUNDS };
        let compact = state.to_string();
        let text = frame("update", &reference, vec![("room", json!(room)), ("state", state.clone())]);
        let result = decode(&text, bounds);
        if !state.is_object() {
            let error = refused(result)?;
            prop_assert_eq!(error.code, ErrorCode::BadRequest);
            prop_assert_eq!(error.reference, reference);
        } else if compact.len() <= max_state_bytes {
            let state = Meta::from_stored(compact).expect("compact JSON");
            let request = Request::Update(parse_room(&room), state);
            prop_assert_eq!(result, Ok(ClientFrame { reference, request }));
        } else {
            let error = refused(result)?;
            prop_assert_eq!(error.code, ErrorCode::LimitExceeded);
            prop_assert_eq!(error.reference, reference);
        }
    }

    #[test]
    fn a_join_meta_that_is_not_an_object_is_bad_request(
        room in room_name(),
        meta in json_value().prop_filter("not an object, not null", |v| !v.is_object() && !v.is_null()),
        reference in reference(),
    ) {
        let text = frame("join", &reference, vec![("room", json!(room)), ("meta", meta)]);
        let error = refused(decode(&text, BOUNDS))?;
        prop_assert_eq!(error.code, ErrorCode::BadRequest);
        prop_assert_eq!(error.reference, reference);
    }

    #[test]
    fn an_unknown_type_is_unknown_type_with_the_ref(
        kind in prop_oneof!["x-[a-z_-]{0,12}", "x-\\PC{30,80}"],
        fields in btree_map(field_name(), json_value(), 0..4),
        reference in reference(),
    ) {
        let fields: Vec<(String, Value)> = fields
            .into_iter()
            .filter(|(name, _)| name != "type" && name != "ref")
            .collect();
        let error = refused(decode(&frame(&kind, &reference, fields), BOUNDS))?;
        prop_assert_eq!(error.code, ErrorCode::UnknownType);
        prop_assert_eq!(error.reference, reference);
    }

    #[test]
    fn a_number_ref_is_echoed_as_the_same_number(
        number in prop_oneof![
            any::<f64>().prop_filter("JSON has no NaN or infinity", |x| x.is_finite()).prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
        ],
    ) {
        // As a client writes it: the shortest text that reads back as the
        // same number (JSON.stringify does the same for a double).
        let sent = number.to_string();
        let text = format!(r#"{{"type":"ping","ref":{sent}}}"#);
        let frame = decode(&text, BOUNDS).map_err(|e| TestCaseError::fail(format!("{e:?}")))?;
        let pong = pong_frame(frame.reference.as_ref());
        prop_assert_eq!(pong.as_str(), format!(r#"{{"type":"pong","ref":{sent}}}"#));
        let error = refused(decode(&format!(r#"{{"type":"x-","ref":{sent}}}"#), BOUNDS))?;
        let echoed = serde_json::to_string(&error.reference).unwrap_or_default();
        prop_assert_eq!(echoed, sent);
    }

    #[test]
    fn a_ref_over_64_characters_is_bad_request_without_ref(
        kind in select(KNOWN_TYPES.to_vec()),
        reference in vec(any::<char>(), MAX_REF_LEN + 1..=2 * MAX_REF_LEN),
    ) {
        let reference = Some(Value::String(reference.into_iter().collect()));
        let error = refused(decode(&frame(kind, &reference, Fields::new()), BOUNDS))?;
        prop_assert_eq!(error.code, ErrorCode::BadRequest);
        prop_assert_eq!(error.reference, None);
    }
}

// ---------------------------------------------------------------------------
// The stores
// ---------------------------------------------------------------------------

const USERS: [&str; 3] = ["ann", "bob", "cy"];
const ROOMS: [&str; 2] = ["doc:1", "doc:2"];
const METAS: [&str; 2] = [r#"{"device":"phone"}"#, r#"{"device":"web"}"#];
/// Room states, one with the characters a separator-based codec would trip on.
const STATES: [&str; 2] = [r#"{"cursor":[1,2]}"#, r#"{"text":"a b \" c\n"}"#];

/// Bound on every store call.
const STORE_TIMEOUT: Duration = Duration::from_secs(10);
/// Longer than any case: no lease lapses mid-case.
const LEASE: Duration = Duration::from_secs(300);
/// Cases against Redis: each is a handful of round trips (milliseconds).
const REDIS_CASES: u32 = 64;
/// Slack for comparing store clocks (Redis `TIME`) with this process's.
const CLOCK_SLACK_MS: u64 = 2_000;

/// What happens on a node, as the registry would turn it into ops.
#[derive(Debug, Clone)]
enum Action {
    /// A connection of `USERS[user]` comes up, with `METAS[meta]`.
    Connect { user: usize, meta: Option<usize> },
    /// A live connection joins `ROOMS[room]` (again: a members read),
    /// setting its metadata to `METAS[meta]`.
    Join {
        conn: Index,
        room: usize,
        meta: Option<usize>,
    },
    /// A live connection leaves one of its rooms.
    Leave { conn: Index, room: Index },
    /// A live connection sets its user's state, `STATES[state]`, in one of
    /// its rooms.
    Update {
        conn: Index,
        room: Index,
        state: usize,
    },
    /// A live connection goes away, at once (a sign-out) or after-grace.
    Disconnect {
        conn: Index,
        reason: Reason,
        ends: Ends,
    },
    /// `watch`/`query` of these users.
    Presence(Vec<usize>),
    /// A room's members.
    Members(usize),
}

fn action() -> impl Strategy<Value = Action> {
    let reason = select(vec![Reason::Closed, Reason::Timeout, Reason::Shutdown]);
    prop_oneof![
        3 => (0..USERS.len(), option::of(0..METAS.len()))
            .prop_map(|(user, meta)| Action::Connect { user, meta }),
        3 => (any::<Index>(), 0..ROOMS.len(), option::weighted(0.3, 0..METAS.len()))
            .prop_map(|(conn, room, meta)| Action::Join { conn, room, meta }),
        2 => (any::<Index>(), any::<Index>()).prop_map(|(conn, room)| Action::Leave { conn, room }),
        2 => (any::<Index>(), any::<Index>(), 0..STATES.len())
            .prop_map(|(conn, room, state)| Action::Update { conn, room, state }),
        2 => (any::<Index>(), reason, select(vec![Ends::Now, Ends::AfterGrace]))
            .prop_map(|(conn, reason, ends)| Action::Disconnect { conn, reason, ends }),
        1 => vec(0..USERS.len(), 0..=USERS.len()).prop_map(Action::Presence),
        1 => (0..ROOMS.len()).prop_map(Action::Members),
    ]
}

/// The actions, and where the op sequence is cut into batches: after op
/// `i` when `cuts[i]` (ops past the end of `cuts` form the last batch).
fn script() -> impl Strategy<Value = (Vec<Action>, Vec<bool>)> {
    (
        vec(action(), 1..48),
        vec(prop::bool::weighted(0.25), 0..160),
    )
}

fn user(i: usize) -> UserId {
    parse_user(USERS[i])
}

fn room(i: usize) -> RoomName {
    parse_room(ROOMS[i])
}

/// One live connection of the node.
#[derive(Debug)]
struct LiveConn {
    id: ConnId,
    user: usize,
    /// Rooms joined, in join order.
    rooms: Vec<usize>,
    /// The metadata of its latest attach.
    meta: Option<&'static str>,
}

/// The reference model: the node's live connections and, per user, the
/// presence sequence, the latest metadata attached and whether they ever
/// went offline. Every count is recomputed from the connections. With
/// `grace` the store has an offline grace longer than any case: a last
/// connection ending after-grace leaves the user online (and a member)
/// until they come back.
#[derive(Debug, Default)]
struct Model {
    grace: bool,
    conns: Vec<LiveConn>,
    seq: [u64; USERS.len()],
    meta: [Option<&'static str>; USERS.len()],
    went_offline: [bool; USERS.len()],
    /// Users in the grace.
    graced: [bool; USERS.len()],
    /// (room, user) memberships in the grace.
    room_graced: HashSet<(usize, usize)>,
    /// (room, user) → that member's state.
    states: HashMap<(usize, usize), &'static str>,
}

impl Model {
    fn online(&self, user: usize) -> bool {
        self.live(user) > 0 || self.graced[user]
    }

    fn member(&self, room: usize, user: usize) -> bool {
        self.in_room(room, user) > 0 || self.room_graced.contains(&(room, user))
    }

    fn live(&self, user: usize) -> usize {
        self.conns.iter().filter(|c| c.user == user).count()
    }

    fn in_room(&self, room: usize, user: usize) -> usize {
        self.conns
            .iter()
            .filter(|c| c.user == user && c.rooms.contains(&room))
            .count()
    }

    fn members(&self, room: usize) -> Vec<Member> {
        let mut members: Vec<Member> = (0..USERS.len())
            .filter(|&u| self.member(room, u))
            .map(|u| Member {
                user: user(u),
                meta: self.meta[u].map(meta_of),
                state: self.states.get(&(room, u)).map(|s| meta_of(s)),
            })
            .collect();
        members.sort();
        members
    }

    fn members_read(&self, room: usize) -> Outcome {
        Outcome::read(Read::Members(self.members(room)))
    }

    fn presence(&self, users: &[usize]) -> Vec<UserPresence> {
        users
            .iter()
            .map(|&u| UserPresence {
                online: self.online(u),
                seq: self.seq[u],
            })
            .collect()
    }

    fn attach(&mut self, at: usize, meta: Option<&'static str>) -> (StoreOp, Outcome) {
        let conn = &mut self.conns[at];
        conn.meta = meta;
        let (u, id) = (conn.user, conn.id);
        if meta.is_some() {
            self.meta[u] = meta;
        }
        let op = StoreOp::Attach(user(u), id, meta.map(meta_of));
        (op, Outcome::default())
    }

    /// The ops the registry issues for `action`, each with the outcome the
    /// store must answer; applies the action.
    fn issue(&mut self, action: &Action) -> Vec<(StoreOp, Outcome)> {
        let mut ops = Vec::new();
        match action {
            Action::Connect { user: u, meta } => {
                let (u, meta) = (*u, meta.map(|m| METAS[m]));
                let mut outcome = Outcome::default();
                if self.live(u) == 0 && std::mem::take(&mut self.graced[u]) {
                    outcome.tally.grace_cancelled_users = 1;
                } else if self.live(u) == 0 {
                    self.seq[u] += 1;
                    outcome.events.push(Event::Online {
                        user: user(u),
                        seq: self.seq[u],
                    });
                }
                self.conns.push(LiveConn {
                    id: ConnId::new(),
                    user: u,
                    rooms: Vec::new(),
                    meta: None,
                });
                ops.push((StoreOp::Connect(user(u)), outcome));
                ops.push(self.attach(self.conns.len() - 1, meta));
            }
            Action::Join {
                conn,
                room: r,
                meta,
            } if !self.conns.is_empty() => {
                let at = conn.index(self.conns.len());
                if let Some(m) = meta {
                    ops.push(self.attach(at, Some(METAS[*m])));
                }
                let u = self.conns[at].user;
                if self.conns[at].rooms.contains(r) {
                    ops.push((StoreOp::Members(room(*r)), self.members_read(*r)));
                } else {
                    let first = self.in_room(*r, u) == 0;
                    let back = first && self.room_graced.remove(&(*r, u));
                    self.conns[at].rooms.push(*r);
                    let mut outcome = self.members_read(*r);
                    if back {
                        outcome.tally.grace_cancelled_rooms = 1;
                    } else if first {
                        outcome.events.push(Event::Joined {
                            room: room(*r),
                            user: user(u),
                        });
                    }
                    ops.push((StoreOp::Join(room(*r), user(u)), outcome));
                }
            }
            Action::Leave { conn, room: which } if !self.conns.is_empty() => {
                let at = conn.index(self.conns.len());
                let rooms = &mut self.conns[at].rooms;
                // Leaving a room the connection is not in is answered
                // `not_joined` by the registry: no op.
                if !rooms.is_empty() {
                    let r = rooms.remove(which.index(rooms.len()));
                    let u = self.conns[at].user;
                    let op = StoreOp::Leave(room(r), user(u), Reason::Closed, Ends::Now);
                    ops.push((op, self.left(r, u, Reason::Closed, Ends::Now)));
                }
            }
            Action::Update {
                conn,
                room: which,
                state,
            } if !self.conns.is_empty() => {
                let at = conn.index(self.conns.len());
                let live = &self.conns[at];
                // An update of a room the connection is not in is answered
                // `not_joined` by the registry: no op.
                if !live.rooms.is_empty() {
                    let r = live.rooms[which.index(live.rooms.len())];
                    let (u, id, text) = (live.user, live.id, STATES[*state]);
                    self.states.insert((r, u), text);
                    let op = StoreOp::Update(room(r), user(u), id, meta_of(text));
                    let updated = Event::Updated {
                        room: room(r),
                        user: user(u),
                        state: meta_of(text),
                        from: Some(id),
                    };
                    ops.push((op, Outcome::events(vec![updated])));
                }
            }
            Action::Disconnect { conn, reason, ends } if !self.conns.is_empty() => {
                let gone = self.conns.remove(conn.index(self.conns.len()));
                let u = gone.user;
                // The registry's order: each room left, the record
                // detached, then the disconnect.
                for &r in &gone.rooms {
                    let op = StoreOp::Leave(room(r), user(u), *reason, *ends);
                    ops.push((op, self.left(r, u, *reason, *ends)));
                }
                ops.push((StoreOp::Detach(user(u), gone.id), Outcome::default()));
                let mut outcome = Outcome::default();
                if self.live(u) == 0 && self.grace && *ends == Ends::AfterGrace {
                    self.graced[u] = true;
                    outcome.tally.grace_started_users = 1;
                } else if self.live(u) == 0 {
                    self.seq[u] += 1;
                    self.went_offline[u] = true;
                    outcome.events.push(Event::Offline {
                        user: user(u),
                        seq: self.seq[u],
                        last_seen: 0,
                        reason: *reason,
                    });
                }
                let op = StoreOp::Disconnect(user(u), *reason, *ends);
                ops.push((op, outcome));
            }
            Action::Presence(users) => {
                let op = StoreOp::Presence(users.iter().map(|&u| user(u)).collect());
                ops.push((op, Outcome::read(Read::Presence(self.presence(users)))));
            }
            Action::Members(r) => {
                ops.push((StoreOp::Members(room(*r)), self.members_read(*r)));
            }
            // A join, leave or disconnect with no live connection.
            _ => {}
        }
        ops
    }

    /// The outcome of a leave of `r` by one of `u`'s connections (already
    /// removed from the model).
    fn left(&mut self, r: usize, u: usize, reason: Reason, ends: Ends) -> Outcome {
        let mut outcome = Outcome::default();
        if self.in_room(r, u) > 0 {
            return outcome;
        }
        if self.grace && ends == Ends::AfterGrace {
            self.room_graced.insert((r, u));
            outcome.tally.grace_started_rooms = 1;
        } else {
            self.states.remove(&(r, u));
            outcome.events.push(Event::Left {
                room: room(r),
                user: user(u),
                reason,
            });
        }
        outcome
    }
}

fn meta_of(text: &str) -> Meta {
    Meta::parse(text, BOUNDS.max_meta_bytes).expect("a valid meta")
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// `fut`, bounded by [`STORE_TIMEOUT`], its error a test failure.
async fn within<T, E: Display>(
    what: &str,
    fut: impl Future<Output = Result<T, E>>,
) -> Result<T, TestCaseError> {
    match tokio::time::timeout(STORE_TIMEOUT, fut).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(error)) => Err(TestCaseError::fail(format!("{what}: {error}"))),
        Err(_) => Err(TestCaseError::fail(format!(
            "{what}: no answer within {STORE_TIMEOUT:?}"
        ))),
    }
}

/// Checks each offline's `last_seen` against the clock, then zeroes it:
/// the model does not know the store's clock.
fn without_last_seen(mut outcome: Outcome, since_ms: u64) -> Result<Outcome, TestCaseError> {
    for event in &mut outcome.events {
        if let Event::Offline { last_seen, .. } = event {
            let window = since_ms - CLOCK_SLACK_MS..=now_ms() + CLOCK_SLACK_MS;
            prop_assert!(window.contains(last_seen), "last_seen {}", last_seen);
            *last_seen = 0;
        }
    }
    Ok(outcome)
}

/// Plays `actions` against `store` in the batches `cuts` says, comparing
/// every outcome and then every read with the model.
async fn follows_the_model(
    store: &dyn Store,
    node: NodeId,
    grace: bool,
    actions: &[Action],
    cuts: &[bool],
) -> Result<(), TestCaseError> {
    let since_ms = now_ms();
    let mut model = Model {
        grace,
        ..Model::default()
    };
    let ops: Vec<(StoreOp, Outcome)> = actions.iter().flat_map(|a| model.issue(a)).collect();
    let mut batch = Vec::new();
    for (i, op) in ops.into_iter().enumerate() {
        batch.push(op);
        if cuts.get(i).copied().unwrap_or(false) {
            apply_and_compare(store, std::mem::take(&mut batch), since_ms).await?;
        }
    }
    if !batch.is_empty() {
        apply_and_compare(store, batch, since_ms).await?;
    }

    // Reads after the last batch.
    let everyone: Vec<usize> = (0..USERS.len()).collect();
    let mut reads = vec![(
        StoreOp::Presence(everyone.iter().map(|&u| user(u)).collect()),
        Outcome::read(Read::Presence(model.presence(&everyone))),
    )];
    for r in 0..ROOMS.len() {
        reads.push((StoreOp::Members(room(r)), model.members_read(r)));
    }
    apply_and_compare(store, reads, since_ms).await?;

    let stats = within("stats", store.stats()).await?;
    let online = everyone.iter().filter(|&&u| model.online(u)).count();
    prop_assert_eq!(stats.users_online, online as u64);
    prop_assert_eq!(stats.connections, model.conns.len() as u64);
    let in_grace = model.graced.iter().filter(|g| **g).count();
    prop_assert_eq!(stats.users_in_grace, in_grace as u64);

    for u in everyone {
        let record = within("user", store.user(user(u))).await?;
        prop_assert_eq!(record.online, model.online(u));
        prop_assert_eq!(record.grace_until_ms.is_some(), model.graced[u]);
        prop_assert_eq!(record.last_seen_ms.is_some(), model.went_offline[u]);
        prop_assert_eq!(record.meta.as_ref().map(Meta::as_str), model.meta[u]);
        let mut want: Vec<(String, Option<&str>)> = model
            .conns
            .iter()
            .filter(|c| c.user == u)
            .map(|c| (c.id.to_string(), c.meta))
            .collect();
        want.sort();
        let got: Vec<(String, Option<&str>)> = record
            .connections
            .iter()
            .map(|c| (c.conn.clone(), c.meta.as_ref().map(Meta::as_str)))
            .collect();
        prop_assert_eq!(got, want);
        for c in &record.connections {
            prop_assert_eq!(&c.node, &node.to_string());
            prop_assert!(
                c.since_ms >= since_ms - CLOCK_SLACK_MS && c.since_ms <= now_ms() + CLOCK_SLACK_MS
            );
        }
    }
    Ok(())
}

async fn apply_and_compare(
    store: &dyn Store,
    batch: Vec<(StoreOp, Outcome)>,
    since_ms: u64,
) -> Result<(), TestCaseError> {
    let (ops, want): (Vec<StoreOp>, Vec<Outcome>) = batch.into_iter().unzip();
    let applied = within("apply", store.apply(ops.clone())).await?;
    let got = applied
        .outcomes
        .into_iter()
        .map(|o| without_last_seen(o, since_ms))
        .collect::<Result<Vec<_>, _>>()?;
    prop_assert_eq!(got, want, "batch {:?}", ops);
    Ok(())
}

/// Runs the model property on a fresh store per case from `new_store`.
fn store_follows_the_model(
    runtime: &tokio::runtime::Runtime,
    cases: u32,
    grace: bool,
    new_store: impl Fn(NodeId) -> BoxFuture<'static, Result<Arc<dyn Store>, StoreError>>,
) {
    let config = ProptestConfig {
        cases,
        // Failing cases are saved beside this file, as proptest! does.
        source_file: Some(file!()),
        ..ProptestConfig::default()
    };
    let mut runner = TestRunner::new(config);
    let result = runner.run(&script(), |(actions, cuts)| {
        runtime.block_on(async {
            let node = NodeId::new();
            let store = within("new store", new_store(node)).await?;
            follows_the_model(&*store, node, grace, &actions, &cuts).await
        })
    });
    if let Err(failure) = result {
        panic!("{failure}");
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

/// Longer than any case runs: no grace expires while one is checked.
const LONG_GRACE: Duration = Duration::from_secs(3600);

#[test]
fn memory_store_follows_the_model() {
    store_follows_the_model(&runtime(), ProptestConfig::default().cases, false, |node| {
        let store: Arc<dyn Store> = Arc::new(MemoryStore::for_node(node));
        futures_util::future::ready(Ok(store)).boxed()
    });
}

#[test]
fn memory_store_with_a_grace_follows_the_model() {
    store_follows_the_model(&runtime(), ProptestConfig::default().cases, true, |node| {
        let store = MemoryStore::for_node(node).with_grace(LONG_GRACE);
        futures_util::future::ready(Ok(Arc::new(store) as Arc<dyn Store>)).boxed()
    });
}

/// The Redis store against the model, on a fresh key prefix per case.
fn redis_store_follows_the_model_with(grace: Option<Duration>) {
    let runtime = runtime();
    let redis = runtime.block_on(RedisServer::start());
    let url = redis.url();
    // A fresh key prefix per case (shrinking included): an empty store.
    let cases_run = AtomicUsize::new(0);
    // PROPTEST_CASES, when set, counts here too (for a longer search).
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(REDIS_CASES);
    store_follows_the_model(&runtime, cases, grace.is_some(), |node| {
        let url = url.clone();
        let prefix = format!("prop{}", cases_run.fetch_add(1, Ordering::Relaxed));
        async move {
            let store = RedisStore::connect(&url, &prefix, node, LEASE).await?;
            let store = match grace {
                Some(grace) => store.with_grace(grace),
                None => store,
            };
            Ok::<_, StoreError>(Arc::new(store) as Arc<dyn Store>)
        }
        .boxed()
    });
    drop(redis);
}

#[test]
fn redis_store_follows_the_model() {
    redis_store_follows_the_model_with(None);
}

#[test]
fn redis_store_with_a_grace_follows_the_model() {
    redis_store_follows_the_model_with(Some(LONG_GRACE));
}
