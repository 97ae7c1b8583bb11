//! Identifier newtypes, validated once at the edge.
//!
//! Every id that enters from a client (a user id in the URL or a list, a
//! room name in a frame) becomes a [`UserId`] or [`RoomName`] here or is
//! refused here; the rest of the gateway never re-checks. The allowed
//! characters exclude the space, which the Redis store uses to join a room
//! and a user into one field name.

use std::{fmt, sync::Arc};

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

/// One WebSocket connection's id, unique across the cluster.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct ConnId(pub Uuid);

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
