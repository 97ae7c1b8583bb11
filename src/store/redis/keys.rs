//! The Redis key names this process reads directly (the scripts spell
//! theirs in `scripts/common.lua`); both follow the one layout documented
//! in docs/operations.md ("Redis keys").

use crate::ids::{RoomName, UserId};

/// Key names under one `--prefix`.
#[derive(Debug, Clone)]
pub(super) struct Keys {
    prefix: String,
}

impl Keys {
    pub(super) fn new(prefix: &str) -> Self {
        Self {
            prefix: prefix.to_owned(),
        }
    }

    /// The prefix itself (the scripts derive their keys from it).
    pub(super) fn prefix(&self) -> &str {
        &self.prefix
    }

    /// user → live connection count, cluster-wide.
    pub(super) fn users(&self) -> String {
        format!("{}:users", self.prefix)
    }

    /// Live connections, cluster-wide.
    pub(super) fn connections(&self) -> String {
        format!("{}:connections", self.prefix)
    }

    /// user → that user's connections in `room`.
    pub(super) fn room(&self, room: &RoomName) -> String {
        format!("{}:room:{room}", self.prefix)
    }

    pub(super) fn room_state(&self, room: &RoomName) -> String {
        format!("{}:room_state:{room}", self.prefix)
    }

    /// `seq`, `last_seen`, `meta` of `user`.
    pub(super) fn user(&self, user: &UserId) -> String {
        format!("{}:user:{user}", self.prefix)
    }

    /// Connection id → record, for `user`.
    pub(super) fn user_conns(&self, user: &UserId) -> String {
        format!("{}:user:{user}:conns", self.prefix)
    }

    /// User → the deadline of their offline grace.
    pub(super) fn grace(&self) -> String {
        format!("{}:grace", self.prefix)
    }

    /// Node → lease deadline.
    pub(super) fn nodes(&self) -> String {
        format!("{}:nodes", self.prefix)
    }

    /// The event channel.
    pub(super) fn events(&self) -> String {
        format!("{}:events", self.prefix)
    }

    /// Number of the last event published on the channel.
    pub(super) fn events_seq(&self) -> String {
        format!("{}:events:seq", self.prefix)
    }
}
