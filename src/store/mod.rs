//! The presence store: where connection counts live and transitions are
//! decided.
//!
//! One trait, two implementations: [`MemoryStore`] (one node, no Redis, the
//! default) and [`RedisStore`] (many nodes share one Redis). The
//! [`PresenceRegistry`](crate::registry::PresenceRegistry) hands a store a
//! whole batch of [`StoreOp`]s at once; the store applies it atomically and
//! answers one [`Outcome`] per op, in order. A transition (a user's 0 → 1
//! connections, 1 → 0, a user's first tab in a room, last tab out) is
//! decided inside that atomic step, so of two racing connections exactly one
//! sees each transition. The store never talks to clients.

mod memory;
mod redis;

use futures_util::future::BoxFuture;

pub use self::{memory::MemoryStore, redis::RedisStore};
use std::sync::Arc;

use crate::ids::{ConnId, RoomName, UserId};

/// One write or read in a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreOp {
    /// A connection of `user` came up.
    Connect(UserId),
    /// A connection of `user` went away.
    Disconnect(UserId),
    /// A connection of `user` joined `room`.
    Join(RoomName, UserId),
    /// A connection of `user` left `room`.
    Leave(RoomName, UserId),
    /// Read `room`'s members.
    Members(RoomName),
    /// Read these users' presence.
    Presence(Vec<UserId>),
    /// Record a connection of `user` on this node, with its metadata (a
    /// JSON object, already validated), for `GET /v1/users/{id}`.
    Attach(UserId, ConnId, Option<Arc<str>>),
    /// Forget that connection record.
    Detach(UserId, ConnId),
}

/// What the store decided for one op.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// `Connect`: `Some(seq)` when the user went online.
    Connected(Option<u64>),
    /// `Disconnect`: `Some((seq, last_seen_ms))` when the user went offline.
    Disconnected(Option<(u64, u64)>),
    /// `Join`: whether this was the user's first connection in the room,
    /// and the members right after it, sorted.
    Joined(bool, Vec<RoomMember>),
    /// `Leave`: whether the user's last connection left the room.
    Left(bool),
    /// `Members`: the room's members, sorted.
    Members(Vec<RoomMember>),
    /// `Presence`: one entry per requested user, in order.
    Presence(Vec<UserPresence>),
    /// `Attach` or `Detach`: recorded.
    Recorded,
}

/// One live connection of a user, as `GET /v1/users/{id}` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnRecord {
    /// The connection's id.
    pub conn: String,
    /// The node holding it.
    pub node: String,
    /// When it was recorded, Unix milliseconds (store clock).
    pub since_ms: u64,
    /// Its metadata, a JSON object as text.
    pub meta: Option<String>,
}

/// Everything the store knows of one user.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct UserRecord {
    /// At least one live connection.
    pub online: bool,
    /// The live connections, sorted by id.
    pub connections: Vec<ConnRecord>,
    /// When the user last went offline, Unix milliseconds.
    pub last_seen_ms: Option<u64>,
    /// The metadata of the user's most recently attached connection.
    pub meta: Option<String>,
}

/// A room member in a snapshot, with the user's metadata (the latest
/// attached connection's, a JSON object as text).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct RoomMember {
    /// The member.
    pub user: UserId,
    /// Their metadata, if any connection of theirs carried some.
    pub meta: Option<String>,
}

impl RoomMember {
    /// A member without metadata.
    pub fn plain(user: UserId) -> Self {
        Self { user, meta: None }
    }
}

/// A user's presence as the store sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct UserPresence {
    /// At least one live connection somewhere.
    pub online: bool,
    /// Presence sequence: +1 on every online/offline transition.
    pub seq: u64,
}

/// One page of a scan over users (a room's members, or everyone online).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Page {
    /// The users on this page.
    pub users: Vec<UserId>,
    /// Where the next page starts; `None` when this was the last page.
    /// Opaque to clients.
    pub next: Option<String>,
}

/// Cluster-wide counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Stats {
    /// Users with at least one live connection.
    pub users_online: u64,
    /// Live connections.
    pub connections: u64,
    /// Nodes whose lease has not expired.
    pub nodes_alive: u64,
}

/// Why a store call failed. The batch was not applied.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Redis refused, dropped the connection or timed out.
    #[error("redis: {0}")]
    Redis(#[from] ::redis::RedisError),
    /// A cursor this store did not hand out.
    #[error("invalid cursor")]
    BadCursor,
    /// Redis answered something this version does not understand.
    #[error("unexpected store reply: {0}")]
    Protocol(String),
}

/// A presence store. Implementations are shared by the registry and must
/// apply each batch atomically.
pub trait Store: Send + Sync + 'static {
    /// Applies `ops` in order as one atomic step; one outcome per op.
    fn apply(&self, ops: Vec<StoreOp>) -> BoxFuture<'static, Result<Vec<Outcome>, StoreError>>;

    /// One page of `room`'s members from `cursor` (`None`: the start), about
    /// `limit` long, and the room's member count.
    fn room_page(
        &self,
        room: RoomName,
        cursor: Option<String>,
        limit: usize,
    ) -> BoxFuture<'static, Result<(Page, u64), StoreError>>;

    /// One page of the users online from `cursor`, about `limit` long.
    fn users_page(
        &self,
        cursor: Option<String>,
        limit: usize,
    ) -> BoxFuture<'static, Result<Page, StoreError>>;

    /// One user's presence, connections and metadata.
    fn user(&self, user: UserId) -> BoxFuture<'static, Result<UserRecord, StoreError>>;

    /// Users online and nodes alive, cluster-wide.
    fn stats(&self) -> BoxFuture<'static, Result<Stats, StoreError>>;

    /// Extends this node's lease so other nodes know it is alive.
    fn refresh_lease(&self) -> BoxFuture<'static, Result<(), StoreError>>;
}
