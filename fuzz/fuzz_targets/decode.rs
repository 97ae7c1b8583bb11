//! Fuzzes the client frame decoder, `presenced::protocol::decode`.
//!
//! Beyond "never panics", every answer must be one the gateway can send as
//! it is: an error carries a documented decoder code, a message and a `ref`
//! that follows the rules, and its frame is a JSON error object; a decoded
//! request agrees with the JSON it came from and stays within the bounds.
//! The input is also used as a user id and as a room name inside otherwise
//! valid frames, so the naming rules are fuzzed directly.

#![no_main]

use std::collections::HashSet;

use libfuzzer_sys::fuzz_target;
use presenced::{
    ids::{RoomName, UserId},
    protocol::{Bounds, ClientFrame, DecodeError, ErrorCode, MAX_REF_LEN, Request, decode},
};
use serde_json::{Value, json};

/// The gateway's defaults (`--max-ids`, `--max-page`, `--max-meta-bytes`).
const BOUNDS: Bounds = Bounds {
    max_ids: 1000,
    max_page: 1000,
    max_meta_bytes: 1024,
};

/// The codes the decoder itself may give; `not_joined` and `unavailable`
/// come from the registry, never from decoding.
const DECODER_CODES: [ErrorCode; 5] = [
    ErrorCode::BadRequest,
    ErrorCode::UnknownType,
    ErrorCode::InvalidRoom,
    ErrorCode::InvalidUser,
    ErrorCode::LimitExceeded,
];

fuzz_target!(|data: &[u8]| {
    match std::str::from_utf8(data) {
        Ok(text) => {
            check(text);
            check_as_ids(text);
        }
        // A WebSocket text frame is valid UTF-8; the lossy text still
        // exercises the decoder on what is left of the input.
        Err(_) => check(&String::from_utf8_lossy(data)),
    }
});

fn check(text: &str) {
    let result = decode(text, BOUNDS);
    assert_eq!(result, decode(text, BOUNDS), "decoding is deterministic");
    match result {
        Ok(frame) => check_frame(text, &frame),
        Err(error) => check_error(&error),
    }
}

/// The input as the only id of a `query` and as the room of a `join`:
/// accepted exactly when the naming rules accept it, else refused with the
/// naming error.
fn check_as_ids(s: &str) {
    let query = json!({"type": "query", "users": [s], "ref": 1}).to_string();
    match (decode(&query, BOUNDS), UserId::parse(s)) {
        (Ok(frame), Ok(user)) => assert_eq!(frame.request, Request::Query(vec![user])),
        (Err(error), Err(_)) => {
            assert_eq!(error.code, ErrorCode::InvalidUser);
            assert_eq!(error.reference, Some(json!(1)));
        }
        (result, parsed) => panic!("query of {s:?}: {result:?}, but UserId::parse: {parsed:?}"),
    }
    let join = json!({"type": "join", "room": s, "ref": "j"}).to_string();
    match (decode(&join, BOUNDS), RoomName::parse(s)) {
        (Ok(frame), Ok(room)) => assert_eq!(frame.request, Request::Join(room, None)),
        (Err(error), Err(_)) => {
            assert_eq!(error.code, ErrorCode::InvalidRoom);
            assert_eq!(error.reference, Some(json!("j")));
        }
        (result, parsed) => panic!("join of {s:?}: {result:?}, but RoomName::parse: {parsed:?}"),
    }
}

fn check_reference(reference: &Option<Value>) {
    match reference {
        None | Some(Value::Number(_)) => {}
        Some(Value::String(s)) => assert!(s.chars().count() <= MAX_REF_LEN, "ref {s:?}"),
        Some(other) => panic!("ref must be a number or a string: {other:?}"),
    }
}

fn check_error(error: &DecodeError) {
    assert!(DECODER_CODES.contains(&error.code), "{error:?}");
    assert!(!error.message.is_empty(), "{error:?}");
    check_reference(&error.reference);
    let frame = error.to_frame();
    let value: Value = serde_json::from_str(frame.as_str()).expect("error frame is JSON");
    let object = value.as_object().expect("error frame is an object");
    assert_eq!(object["type"], "error");
    assert_eq!(object["code"], serde_json::to_value(error.code).unwrap());
    assert_eq!(object["message"], error.message.as_str());
    assert_eq!(object.get("ref"), error.reference.as_ref());
}

fn check_frame(text: &str, frame: &ClientFrame) {
    check_reference(&frame.reference);
    let value: Value = serde_json::from_str(text).expect("a decoded frame is JSON");
    let object = value.as_object().expect("a decoded frame is an object");
    let echoed = object.get("ref").filter(|r| !r.is_null());
    assert_eq!(frame.reference.as_ref(), echoed, "ref echoed verbatim");
    let kind = object["type"].as_str().expect("type is a string");
    // Every request decodes from exactly its kind's wire type.
    assert_eq!(kind, <&str>::from(frame.request.kind()));
    // The fields of the kinds that carry any; a kind this target does not
    // know yet is checked for its type and ref only.
    match &frame.request {
        Request::Join(room, meta) => {
            assert_eq!(kind, "join");
            assert_eq!(object["room"], room.as_str());
            if let Some(meta) = meta {
                assert!(meta.as_str().len() <= BOUNDS.max_meta_bytes);
                let parsed: Value = serde_json::from_str(meta.as_str()).expect("meta is JSON");
                assert!(parsed.is_object());
                assert_eq!(&parsed, &object["meta"]);
            } else {
                assert!(object.get("meta").is_none_or(Value::is_null));
            }
        }
        Request::Leave(room) => {
            assert_eq!(kind, "leave");
            assert_eq!(object["room"], room.as_str());
        }
        Request::Watch(users) | Request::Unwatch(users) | Request::Query(users) => {
            assert!(["watch", "unwatch", "query"].contains(&kind));
            assert!(users.len() <= BOUNDS.max_ids, "{} ids", users.len());
            // Distinct, in request order: the raw list without repeats.
            let mut seen = HashSet::new();
            let distinct: Vec<&str> = object["users"]
                .as_array()
                .expect("users is a list")
                .iter()
                .map(|item| item.as_str().expect("ids are strings"))
                .filter(|s| seen.insert(*s))
                .collect();
            let decoded: Vec<&str> = users.iter().map(UserId::as_str).collect();
            assert_eq!(decoded, distinct);
        }
        Request::Room {
            room,
            limit,
            cursor,
        } => {
            assert_eq!(kind, "room");
            assert_eq!(object["room"], room.as_str());
            assert!((1..=BOUNDS.max_page).contains(limit), "limit {limit}");
            if let Some(cursor) = cursor {
                assert_eq!(object["cursor"], cursor.as_str());
            }
        }
        Request::Refresh(token) => {
            assert!(!token.is_empty(), "an empty token is refused");
            assert_eq!(object["token"], token.as_str());
        }
        _ => {}
    }
}
