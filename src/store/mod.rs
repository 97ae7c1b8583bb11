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

use futures_util::stream::BoxStream;

use crate::{
    ids::{ConnId, RoomName, UserId},
    protocol::{Event, Reason},
};

/// One write or read in a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreOp {
    /// A connection of `user` came up.
    Connect(UserId),
    /// A connection of `user` went away, for `reason`.
    Disconnect(UserId, Reason),
    /// A connection of `user` joined `room`.
    Join(RoomName, UserId),
    /// A connection of `user` left `room`, for `reason`.
    Leave(RoomName, UserId, Reason),
    /// Read `room`'s members.
    Members(RoomName),
    /// Read these users' presence.
    Presence(Vec<UserId>),
    /// Record a connection of `user` on this node, with its metadata (a
    /// JSON object, already validated), for `GET /v1/users/{id}`. Again for
    /// a recorded connection: replaces its metadata, keeps its `since_ms`.
    Attach(UserId, ConnId, Option<Arc<str>>),
    /// Forget that connection record.
    Detach(UserId, ConnId),
    /// Make the store's view of this node exactly `state` (and renew the
    /// node's lease), emitting the transitions that takes. Used after the
    /// store lost or may have lost writes: Redis restarted empty, the lease
    /// was reaped, or a batch failed in a way that may or may not have
    /// applied. Idempotent.
    Reassert(Arc<NodeState>),
}

/// Everything one node holds, as [`StoreOp::Reassert`] writes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeState {
    /// Every live connection: its user, id and metadata.
    pub conns: Vec<(UserId, ConnId, Option<Arc<str>>)>,
    /// Every (room, user) with how many of that user's connections on this
    /// node are in the room.
    pub rooms: Vec<(RoomName, UserId, u64)>,
    /// The reason of the `offline` and `left` events for what the store
    /// holds and this node no longer does.
    pub gone: Reason,
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
    /// `Reassert`: the transitions it took, in order.
    Reasserted(Vec<Event>),
}

/// What a batch did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    /// One outcome per op, in order.
    pub outcomes: Vec<Outcome>,
    /// For a store that publishes events to every node ([`Store::feed`]):
    /// the feed sequence number just before this batch's first event. Its
    /// events are numbered from `seq + 1` in op order and reach this node
    /// through the feed, not from here. `None`: deliver them locally.
    pub published_after: Option<u64>,
}

/// What [`Store::feed`] yields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FeedItem {
    /// (Re)subscribed: events numbered up to `floor` were published before
    /// the subscription and will not arrive.
    Subscribed {
        /// The feed's sequence number when the subscription began.
        floor: u64,
    },
    /// Events, in the order the store decided them, with their numbers.
    Events(Vec<(u64, Event)>),
    /// The subscription broke; events may be missed until the next
    /// `Subscribed`.
    Lost,
}

/// What [`Store::reap`] did.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Reaped {
    /// The dead nodes cleaned up by this call.
    pub nodes: Vec<String>,
    /// The `offline` and `left` events it published.
    pub events: u64,
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
    /// This node's lease is gone (reaped as dead, or Redis lost its data):
    /// the batch was refused; the node must reassert its state first.
    #[error("this node's lease is gone; its state must be reasserted")]
    LeaseLost,
    /// Redis answered something this version does not understand.
    #[error("unexpected store reply: {0}")]
    Protocol(String),
}

/// A presence store. Implementations are shared by the registry and must
/// apply each batch atomically.
pub trait Store: Send + Sync + 'static {
    /// Applies `ops` in order as one atomic step; one outcome per op.
    fn apply(&self, ops: Vec<StoreOp>) -> BoxFuture<'static, Result<Applied, StoreError>>;

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

    /// Extends this node's lease so other nodes know it is alive. `false`:
    /// the lease is gone (reaped, or Redis lost its data) and was not
    /// renewed; the node must reassert its state.
    fn refresh_lease(&self) -> BoxFuture<'static, Result<bool, StoreError>>;

    /// Cleans up every node whose lease expired, atomically, publishing the
    /// `offline` and `left` events (reason `node_lost`) that takes.
    fn reap(&self) -> BoxFuture<'static, Result<Reaped, StoreError>>;

    /// Removes this node's lease (after a drain wrote its removals).
    fn retire(&self) -> BoxFuture<'static, Result<(), StoreError>>;

    /// The events every node publishes, when the store is shared; `None`
    /// for a store whose events [`Store::apply`] hands back for local
    /// delivery.
    fn feed(&self) -> Option<BoxStream<'static, FeedItem>>;
}
