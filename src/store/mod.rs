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
//! sees each transition. An outcome carries the transitions as
//! [`Event`]s, the wire's own type, so nothing between the store and the
//! sockets translates them. The store never talks to clients.
//!
//! **Offline grace.** A store has a grace length (zero: none). A user whose
//! last connection ends [`Ends::AfterGrace`] stays online (counted with no
//! live connection) until the grace runs out; a connection of theirs
//! within it, from any node, ends the grace with no event at all. A room
//! member likewise. The deadlines live in the store, and
//! [`StoreOp::Expire`], which any node may run, ends the due ones exactly
//! once with the `offline` and `left` the connection's end called for.

mod memory;
mod redis;

use std::sync::Arc;

use futures_util::{future::BoxFuture, stream::BoxStream};

pub use self::{memory::MemoryStore, redis::RedisStore};
use crate::{
    ids::{ConnId, Meta, RoomName, UserId},
    protocol::{Ends, Event, Member, Reason},
};

/// One write or read in a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreOp {
    /// A connection of `user` came up.
    Connect(UserId),
    /// A connection of `user` went away, for `reason`; if it was their
    /// last, they go offline as `Ends` says.
    Disconnect(UserId, Reason, Ends),
    /// A connection of `user` joined `room`; reads the members after it.
    Join(RoomName, UserId),
    /// A connection of `user` left `room`, for `reason`; if it was their
    /// last in the room, they leave it as `Ends` says.
    Leave(RoomName, UserId, Reason, Ends),
    /// Read `room`'s members.
    Members(RoomName),
    /// A connection of `user` set their state in `room` (latest wins);
    /// members hear it (but that connection). Nothing if `user` is no
    /// member (a leave overtook it).
    Update(RoomName, UserId, ConnId, Meta),
    /// Read these users' presence.
    Presence(Vec<UserId>),
    /// Record a connection of `user` on this node, with its metadata, for
    /// `GET /v1/users/{id}`; metadata becomes the user's. Again for a
    /// recorded connection: replaces its metadata, keeps its `since_ms`.
    Attach(UserId, ConnId, Option<Meta>),
    /// Forget that connection record.
    Detach(UserId, ConnId),
    /// Make the store's view of this node exactly `state` (and renew the
    /// node's lease), emitting the transitions that takes. Used after the
    /// store lost or may have lost writes: Redis restarted empty, the lease
    /// was reaped, or a batch failed in a way that may or may not have
    /// applied. Idempotent. What the store held and the node no longer
    /// does ends after the grace.
    Reassert(Arc<NodeState>),
    /// End the offline graces whose deadline has passed (this node's or
    /// any other's), deciding their `left` and `offline`.
    Expire,
}

impl StoreOp {
    /// Whether the op changes the store (a read needs no lease, and may be
    /// dropped when nobody waits for its answer).
    pub fn is_write(&self) -> bool {
        !matches!(self, StoreOp::Members(_) | StoreOp::Presence(_))
    }

    /// What the op reads besides deciding its transitions, so a store's
    /// reply can be checked against it.
    pub fn reads(&self) -> ReadKind {
        match self {
            StoreOp::Join(..) | StoreOp::Members(_) => ReadKind::Members,
            StoreOp::Presence(_) => ReadKind::Presence,
            _ => ReadKind::Nothing,
        }
    }

    /// What is left of a queued op once the writes are folded into a
    /// reassert (which writes their sum): the read its answer still needs,
    /// if any, or the op itself where a node's state does not hold it. A
    /// join still answers with the room's members; an update is no part
    /// of the node's state and stays as it is.
    pub fn read_part(&self) -> Option<StoreOp> {
        match self {
            StoreOp::Join(room, _) => Some(StoreOp::Members(room.clone())),
            StoreOp::Update(..) => Some(self.clone()),
            read if !read.is_write() => Some(read.clone()),
            _ => None,
        }
    }
}

/// Everything one node holds, as [`StoreOp::Reassert`] writes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeState {
    /// Every live connection: its user, id and metadata.
    pub conns: Vec<(UserId, ConnId, Option<Meta>)>,
    /// Every (room, user) with how many of that user's connections on this
    /// node are in the room.
    pub rooms: Vec<(RoomName, UserId, u64)>,
    /// The reason of the `offline` and `left` events for what the store
    /// holds and this node no longer does.
    pub gone: Reason,
}

/// What the store decided for one op: the transitions it took, in order,
/// what it read, and the bookkeeping it did that is no event.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Outcome {
    /// The events the op caused (a write's transitions).
    pub events: Vec<Event>,
    /// What the op read.
    pub read: Read,
    /// What it did that clients do not see, for the metrics.
    pub tally: Tally,
}

/// What an op did that is no event: offline graces and reassert
/// corrections, for the metrics. The Redis scripts count by these field
/// names (absent: zero).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(default)]
pub struct Tally {
    /// Graces started (a last connection ended after-grace), users.
    pub grace_started_users: u64,
    /// The same, room memberships.
    pub grace_started_rooms: u64,
    /// Graces ended by the user's return (flaps nobody saw), users.
    pub grace_cancelled_users: u64,
    /// The same, room memberships.
    pub grace_cancelled_rooms: u64,
    /// Graces that ran out (the `offline`/`left` went out), users.
    pub grace_expired_users: u64,
    /// The same, room memberships.
    pub grace_expired_rooms: u64,
    /// `Expire` stopped at its bound with more graces due.
    pub expire_more: bool,
    /// What a reassert found wrong and fixed: connection records added or
    /// dropped.
    pub corrected_connections: u64,
    /// Users whose count on this node was off.
    pub corrected_user_counts: u64,
    /// (room, user) pairs whose count on this node was off.
    pub corrected_room_counts: u64,
}

impl Outcome {
    /// A write's outcome: these transitions, nothing read.
    pub fn events(events: Vec<Event>) -> Self {
        Self {
            events,
            ..Self::default()
        }
    }

    /// A read's outcome.
    pub fn read(read: Read) -> Self {
        Self {
            read,
            ..Self::default()
        }
    }
}

/// What an op read.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Read {
    /// Nothing (a plain write).
    #[default]
    Nothing,
    /// `Join`, `Members`: the room's members, sorted by user id.
    Members(Vec<Member>),
    /// `Presence`: one entry per requested user, in order.
    Presence(Vec<UserPresence>),
}

/// Which [`Read`] an op makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadKind {
    /// [`Read::Nothing`].
    Nothing,
    /// [`Read::Members`].
    Members,
    /// [`Read::Presence`].
    Presence,
}

impl Read {
    /// The members this read holds (none for another read).
    pub fn into_members(self) -> Vec<Member> {
        match self {
            Read::Members(members) => members,
            _ => Vec::new(),
        }
    }

    /// The presence this read holds (none for another read).
    pub fn into_presence(self) -> Vec<UserPresence> {
        match self {
            Read::Presence(presence) => presence,
            _ => Vec::new(),
        }
    }
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
    /// Events any node published, in the order the store decided them,
    /// with their numbers.
    Published(Vec<(u64, Event)>),
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
    /// The graces it started.
    pub tally: Tally,
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
    /// Its metadata.
    pub meta: Option<Meta>,
}

/// Everything the store knows of one user.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct UserRecord {
    /// At least one live connection, or in the offline grace.
    pub online: bool,
    /// While in the offline grace (no live connection): when it runs out,
    /// Unix milliseconds (store clock).
    pub grace_until_ms: Option<u64>,
    /// The live connections, sorted by id.
    pub connections: Vec<ConnRecord>,
    /// When the user last went offline, Unix milliseconds.
    pub last_seen_ms: Option<u64>,
    /// The metadata of the user's most recently attached connection.
    pub meta: Option<Meta>,
}

/// A user's presence as the store sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct UserPresence {
    /// At least one live connection somewhere, or in the offline grace.
    pub online: bool,
    /// Presence sequence: +1 on every online/offline transition.
    pub seq: u64,
}

/// One page of a scan over users (a room's members, or everyone online).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Page {
    /// The users on this page.
    pub users: Vec<UserId>,
    /// A room's page: the same users with their metadata and room state,
    /// in the same order (empty for other scans).
    pub members: Vec<Member>,
    /// Where the next page starts; `None` when this was the last page.
    /// Opaque to clients.
    pub next: Option<String>,
}

/// Cluster-wide counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Stats {
    /// Users online: with at least one live connection, or in the grace.
    pub users_online: u64,
    /// Live connections.
    pub connections: u64,
    /// Nodes whose lease has not expired.
    pub nodes_alive: u64,
    /// Users in the offline grace (online with no live connection).
    pub users_in_grace: u64,
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
pub trait Store: std::fmt::Debug + Send + Sync + 'static {
    /// Applies `ops` in order as one atomic step; one outcome per op.
    fn apply(&self, ops: Vec<StoreOp>) -> BoxFuture<'static, Result<Applied, StoreError>>;

    /// One page of `room`'s members from `cursor` (`None`: the start), about
    /// `limit` long, with their metadata and room state, and the room's
    /// member count.
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
