//! Identifier newtypes, validated once at the edge.
//!
//! Every id that enters from a client (a user id in the URL or a list, a
//! room name in a frame) becomes a [`UserId`] or [`RoomName`] here or is
//! refused here; the rest of the gateway never re-checks. Connection
//! metadata likewise becomes a [`Meta`] where it enters (`?meta=`, a
//! token's claim, a `join`), checked by one function. The allowed
//! characters of ids exclude the space, which the Redis store uses to join
//! a room and a user into one field name.

use std::{fmt, sync::Arc};

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Value, value::RawValue};
use uuid::Uuid;

/// Longest accepted user id, in bytes.
pub const MAX_USER_LEN: usize = 128;
/// Longest accepted room name, in bytes.
pub const MAX_ROOM_LEN: usize = 200;

/// Why an id was refused; the message is shown to the client as is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    /// A user id outside the naming rules.
    #[error("user id must be 1-128 bytes of A-Z a-z 0-9 _ - . : @")]
    User,
    /// A room name outside the naming rules.
    #[error("room name must be 1-200 bytes of A-Z a-z 0-9 _ - . : @ / + =")]
    Room,
}

fn valid(s: &str, max: usize, extra: &[u8]) -> bool {
    !s.is_empty()
        && s.len() <= max
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_-.:@".contains(&b) || extra.contains(&b))
}

/// A user's id: the unit of presence (many connections, one user).
///
/// Cheap to clone (shared string), since one id sits in many maps.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct UserId(Arc<str>);

impl UserId {
    /// Validates `s` as a user id.
    pub fn parse(s: &str) -> Result<Self, IdError> {
        if valid(s, MAX_USER_LEN, b"") {
            Ok(Self(s.into()))
        } else {
            Err(IdError::User)
        }
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A room's name.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RoomName(Arc<str>);

impl RoomName {
    /// Validates `s` as a room name.
    pub fn parse(s: &str) -> Result<Self, IdError> {
        if valid(s, MAX_ROOM_LEN, b"/+=") {
            Ok(Self(s.into()))
        } else {
            Err(IdError::Room)
        }
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

macro_rules! text_id_fmt {
    ($($t:ty),*) => {$(
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
        impl fmt::Debug for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(&*self.0, f)
            }
        }
    )*};
}
text_id_fmt!(UserId, RoomName);

/// Ids travel as their text (JSON frames, the Redis codec); reading one
/// back checks the naming rules again, so a value from outside cannot
/// smuggle an invalid id in.
macro_rules! text_id_serde {
    ($($t:ty),*) => {$(
        impl Serialize for $t {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.0)
            }
        }
        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                <$t>::parse(&text).map_err(serde::de::Error::custom)
            }
        }
    )*};
}
text_id_serde!(UserId, RoomName);

/// Why metadata was refused; each edge maps it to its own wire code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum MetaError {
    /// Not JSON at all.
    #[error("meta must be a JSON object")]
    NotJson,
    /// JSON, but not an object.
    #[error("meta must be a JSON object")]
    NotObject,
    /// Over the configured size once written compactly.
    #[error("meta is {size} bytes; at most {max}")]
    TooLarge {
        /// Its compact size.
        size: usize,
        /// The bound (`--max-meta-bytes`).
        max: usize,
    },
}

/// A connection's metadata (at most `--max-meta-bytes`), or a member's
/// room state (at most `--max-state-bytes`): a JSON object, stored compact. Built once where it enters; everywhere else it is
/// opaque text that frames embed verbatim (no re-parse, no re-encoding of
/// its numbers).
#[derive(Clone)]
pub struct Meta(Arc<RawValue>);

impl Meta {
    /// Checks a JSON value: an object of at most `max` bytes compact.
    pub fn from_value(value: &Value, max: usize) -> Result<Self, MetaError> {
        if !value.is_object() {
            return Err(MetaError::NotObject);
        }
        let compact = value.to_string();
        if compact.len() > max {
            return Err(MetaError::TooLarge {
                size: compact.len(),
                max,
            });
        }
        Ok(Self::trusted(compact))
    }

    /// Checks JSON text (a `?meta=` parameter). Text far over the bound is
    /// refused before it is parsed.
    pub fn parse(text: &str, max: usize) -> Result<Self, MetaError> {
        if text.len() > max.saturating_mul(4) {
            return Err(MetaError::TooLarge {
                size: text.len(),
                max,
            });
        }
        let value: Value = serde_json::from_str(text).map_err(|_| MetaError::NotJson)?;
        Self::from_value(&value, max)
    }

    /// Metadata read back from the store, which only ever holds what
    /// [`Meta::from_value`] accepted; `None` if it is not JSON after all.
    pub fn from_stored(text: impl Into<String>) -> Option<Self> {
        RawValue::from_string(text.into())
            .ok()
            .map(|raw| Self(raw.into()))
    }

    fn trusted(compact: String) -> Self {
        // unwrap: `compact` was just written by serde_json from a value.
        Self(RawValue::from_string(compact).unwrap().into())
    }

    /// The compact JSON text.
    pub fn as_str(&self) -> &str {
        self.0.get()
    }
}

impl PartialEq for Meta {
    fn eq(&self, other: &Self) -> bool {
        self.as_str() == other.as_str()
    }
}

impl Eq for Meta {}

impl PartialOrd for Meta {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Meta {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.as_str().cmp(other.as_str())
    }
}

impl fmt::Debug for Meta {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Embedded as the JSON object it is.
impl Serialize for Meta {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(s)
    }
}

/// From the store's text (a string: what the Redis codec carries) or from
/// an object (what the wire carries).
impl<'de> Deserialize<'de> for Meta {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Text;
        impl<'de> serde::de::Visitor<'de> for Text {
            type Value = Meta;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object, or its text")
            }
            fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<Meta, E> {
                Meta::from_stored(text).ok_or_else(|| E::custom("not JSON text"))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<Meta, A::Error> {
                let value = Value::deserialize(serde::de::value::MapAccessDeserializer::new(map))?;
                Ok(Meta::trusted(value.to_string()))
            }
        }
        d.deserialize_any(Text)
    }
}

/// One WebSocket connection's id, unique across the cluster. It travels
/// as its hyphenated text in every format (a compact format would make
/// the uuid bytes, and the Redis codec keys records by this text).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct ConnId(pub Uuid);

impl Serialize for ConnId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&self.0.hyphenated())
    }
}

impl<'de> Deserialize<'de> for ConnId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        Uuid::parse_str(&text)
            .map(ConnId)
            .map_err(serde::de::Error::custom)
    }
}

impl ConnId {
    /// A fresh random id.
    pub fn new() -> Self {
        Self(Uuid::new_v4())
    }
}

impl Default for ConnId {
    fn default() -> Self {
        Self::new()
    }
}

/// One gateway process's id: a fresh uuid per process start.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct NodeId(pub Uuid);

impl NodeId {
    /// A fresh random id.
    pub fn new() -> Self {
        Self(Uuid::new_v4())
    }
}

impl Default for NodeId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl fmt::Display for ConnId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_ids_follow_the_naming_rules() {
        assert!(UserId::parse("alice").is_ok());
        assert!(UserId::parse("a.b-c_d:e@f").is_ok());
        assert!(UserId::parse(&"x".repeat(MAX_USER_LEN)).is_ok());
        assert_eq!(UserId::parse(""), Err(IdError::User));
        assert_eq!(UserId::parse("a b"), Err(IdError::User));
        assert_eq!(UserId::parse("a/b"), Err(IdError::User));
        assert_eq!(UserId::parse("é"), Err(IdError::User));
        assert_eq!(
            UserId::parse(&"x".repeat(MAX_USER_LEN + 1)),
            Err(IdError::User)
        );
    }

    #[test]
    fn meta_is_an_object_within_the_bound_stored_compact() {
        let meta = Meta::parse(r#"{"a": 1, "b": [true, null]}"#, 100).unwrap();
        assert_eq!(meta.as_str(), r#"{"a":1,"b":[true,null]}"#);
        assert_eq!(Meta::parse("[1]", 100), Err(MetaError::NotObject));
        assert_eq!(Meta::parse("{", 100), Err(MetaError::NotJson));
        assert_eq!(
            Meta::parse(r#"{"name":"far too long"}"#, 10),
            Err(MetaError::TooLarge { size: 23, max: 10 })
        );
        // Far over the bound: refused unparsed.
        assert!(matches!(
            Meta::parse(&" ".repeat(41), 10),
            Err(MetaError::TooLarge { .. })
        ));
        assert_eq!(
            serde_json::to_string(&meta).unwrap(),
            meta.as_str(),
            "embedded verbatim"
        );
        assert_eq!(Meta::from_stored(meta.as_str()), Some(meta));
        assert_eq!(Meta::from_stored("{oops"), None);
    }

    #[test]
    fn ids_read_back_are_checked_again() {
        let user: UserId = serde_json::from_str("\"alice\"").unwrap();
        assert_eq!(serde_json::to_string(&user).unwrap(), "\"alice\"");
        assert!(serde_json::from_str::<UserId>("\"a b\"").is_err());
        assert!(serde_json::from_str::<RoomName>("\"doc:1\"").is_ok());
    }

    #[test]
    fn room_names_follow_the_naming_rules() {
        assert!(RoomName::parse("doc:1/a+b=c").is_ok());
        assert!(RoomName::parse(&"r".repeat(MAX_ROOM_LEN)).is_ok());
        assert_eq!(RoomName::parse("a b"), Err(IdError::Room));
        assert_eq!(RoomName::parse(""), Err(IdError::Room));
        assert_eq!(
            RoomName::parse(&"r".repeat(MAX_ROOM_LEN + 1)),
            Err(IdError::Room)
        );
    }
}
