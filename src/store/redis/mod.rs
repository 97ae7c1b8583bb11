//! The shared store: many nodes, one truth in Redis.
//!
//! A registry batch becomes one pipelined `MULTI`, one `EVALSHA` of
//! `scripts/batch.lua`, `EXEC`: a single round trip and a single atomic
//! step (one transaction, what `cmdstat_exec` counts), however many ops
//! the batch holds. The script, not this file, decides transitions, so
//! nodes racing on one user each see exactly the transitions their own ops
//! caused. What crosses to the scripts and back is [`codec`]; the key
//! layout is docs/operations.md; events from every node arrive through
//! [`feed`].

mod codec;
mod feed;
mod keys;

use std::{sync::Arc, time::Duration};

use futures_util::{FutureExt, StreamExt, future::BoxFuture, stream::BoxStream};
use redis::{ErrorKind, RedisError, ServerErrorKind, aio::ConnectionManager};
use tokio::sync::mpsc;

use self::{
    codec::{BatchReply, ConnRecordWire, Packed, ReapReply},
    keys::Keys,
};
use super::{
    Applied, ConnRecord, FeedItem, NodeState, Page, Reaped, Stats, Store, StoreError, StoreOp,
    UserRecord,
};
use crate::{
    ids::{Meta, NodeId, RoomName, UserId},
    protocol::{Member, Reason},
};

const BATCH_LUA: &str = concat!(
    include_str!("../scripts/common.lua"),
    include_str!("../scripts/batch.lua")
);
const REAP_LUA: &str = concat!(
    include_str!("../scripts/common.lua"),
    include_str!("../scripts/reap.lua")
);
const LEASE_LUA: &str = include_str!("../scripts/lease.lua");
const STATS_LUA: &str = include_str!("../scripts/stats.lua");

/// Reconnect attempts inside one call before it fails.
const RECONNECT_RETRIES: usize = 2;

/// How long one Redis call may take before it counts as failed.
pub(super) const DEFAULT_RESPONSE_TIMEOUT: Duration = Duration::from_secs(5);

/// Presence in Redis, shared by every node using the same prefix.
#[derive(Clone)]
pub struct RedisStore {
    client: redis::Client,
    conn: ConnectionManager,
    batch: redis::Script,
    reap: redis::Script,
    lease: redis::Script,
    stats: redis::Script,
    keys: Keys,
    node: String,
    lease_ms: u64,
    /// The offline grace, ms (0: none).
    grace_ms: u64,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("prefix", &self.keys.prefix())
            .field("node", &self.node)
            .finish_non_exhaustive()
    }
}

impl RedisStore {
    /// Connects to `url` and loads the scripts. `lease` is how long this
    /// node counts as alive after each [`Store::refresh_lease`].
    pub async fn connect(
        url: &str,
        prefix: &str,
        node: NodeId,
        lease: Duration,
    ) -> Result<Self, StoreError> {
        let client = redis::Client::open(url)?;
        // Fail fast when Redis is gone: the registry retries batches with
        // its own backoff, and an HTTP or `count` read should answer 503 /
        // `unavailable` at once rather than after redis-rs's default ~6 s
        // of reconnect attempts. The manager reconnects on the next call.
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(DEFAULT_RESPONSE_TIMEOUT))
            .set_response_timeout(Some(DEFAULT_RESPONSE_TIMEOUT))
            .set_number_of_retries(RECONNECT_RETRIES)
            .set_min_delay(Duration::from_millis(50))
            .set_max_delay(Duration::from_millis(500));
        let conn = client.get_connection_manager_with_config(config).await?;
        let store = Self {
            client,
            conn,
            batch: redis::Script::new(BATCH_LUA),
            reap: redis::Script::new(REAP_LUA),
            lease: redis::Script::new(LEASE_LUA),
            stats: redis::Script::new(STATS_LUA),
            keys: Keys::new(prefix),
            node: node.to_string(),
            lease_ms: lease.as_millis() as u64,
            grace_ms: 0,
        };
        // Take the lease: from now on other nodes may reap this one.
        store
            .apply(vec![StoreOp::Reassert(Arc::new(NodeState {
                conns: Vec::new(),
                rooms: Vec::new(),
                gone: Reason::Closed,
            }))])
            .await?;
        Ok(store)
    }

    /// The same store with an offline grace of `grace` (the default: none).
    pub fn with_grace(mut self, grace: Duration) -> Self {
        self.grace_ms = grace.as_millis() as u64;
        self
    }

    /// One batch: `MULTI`, the batch script, `EXEC`.
    fn batch_pipeline(&self, ops: &[StoreOp]) -> redis::Pipeline {
        let mut call = self.batch.prepare_invoke();
        call.arg(self.keys.prefix())
            .arg(&self.node)
            .arg(self.grace_ms)
            .arg(self.lease_ms)
            .arg(if needs_lease(ops) { "1" } else { "0" })
            .arg(codec::encode_ops(ops));
        let mut pipe = redis::pipe();
        pipe.atomic().invoke_script(&call);
        pipe
    }

    /// Runs one batch, loading the script once if this Redis does not know
    /// it (it restarted since).
    async fn run_batch(&self, ops: &[StoreOp]) -> Result<BatchReply, StoreError> {
        let pipe = self.batch_pipeline(ops);
        let mut conn = self.conn.clone();
        let result: Result<(Packed<BatchReply>,), RedisError> = pipe.query_async(&mut conn).await;
        let reply = match result {
            // Inside MULTI nothing was applied: load and redo.
            Err(e) if is_noscript(&e) => {
                self.batch.load_async(&mut conn).await?;
                pipe.query_async(&mut conn).await
            }
            other => other,
        };
        match reply {
            Ok((Packed(reply),)) => Ok(reply),
            Err(e) if is_nolease(&e) => Err(StoreError::LeaseLost),
            Err(e) => Err(e.into()),
        }
    }
}

/// Whether a batch writes on this node's behalf without first reasserting
/// (and so must be refused if the node lost its lease).
fn needs_lease(ops: &[StoreOp]) -> bool {
    !matches!(ops.first(), Some(StoreOp::Reassert(_))) && ops.iter().any(StoreOp::is_write)
}

/// A client's cursor as an HSCAN cursor (the start when absent).
fn scan_cursor(cursor: Option<String>) -> Result<u64, StoreError> {
    cursor.map_or(Ok(0), |c| c.parse().map_err(|_| StoreError::BadCursor))
}

/// An HSCAN reply (cursor, then field → count) as a page.
fn scan_page(next: u64, fields: Vec<(UserId, i64)>) -> Page {
    Page {
        users: fields.into_iter().map(|(user, _)| user).collect(),
        next: (next != 0).then(|| next.to_string()),
        members: Vec::new(),
    }
}

fn is_noscript(e: &RedisError) -> bool {
    e.kind() == ErrorKind::Server(ServerErrorKind::NoScript)
        || e.clone()
            .into_server_errors()
            .is_some_and(|errors| errors.iter().any(|(_, e)| e.code() == "NOSCRIPT"))
}

/// The batch script's refusal when this node has no lease (inside
/// MULTI/EXEC it comes back as a pipeline failure).
fn is_nolease(e: &RedisError) -> bool {
    e.code() == Some("NOLEASE")
        || e.clone()
            .into_server_errors()
            .is_some_and(|errors| errors.iter().any(|(_, e)| e.code() == "NOLEASE"))
}

impl Store for RedisStore {
    fn apply(&self, ops: Vec<StoreOp>) -> BoxFuture<'static, Result<Applied, StoreError>> {
        let this = self.clone();
        async move {
            if ops.is_empty() {
                return Ok(Applied {
                    outcomes: Vec::new(),
                    published_after: None,
                });
            }
            let (base, outcomes) = this.run_batch(&ops).await?;
            if outcomes.len() != ops.len() {
                return Err(StoreError::Protocol(format!(
                    "{} outcomes for {} ops",
                    outcomes.len(),
                    ops.len()
                )));
            }
            Ok(Applied {
                published_after: Some(base),
                outcomes: outcomes
                    .into_iter()
                    .zip(&ops)
                    .map(|(outcome, op)| outcome.into_outcome(op))
                    .collect::<Result<_, _>>()?,
            })
        }
        .boxed()
    }

    fn room_page(
        &self,
        room: RoomName,
        cursor: Option<String>,
        limit: usize,
    ) -> BoxFuture<'static, Result<(Page, u64), StoreError>> {
        let this = self.clone();
        async move {
            let cursor = scan_cursor(cursor)?;
            let key = this.keys.room(&room);
            let mut conn = this.conn.clone();
            let ((next, fields), count): ((u64, Vec<(UserId, i64)>), u64) = redis::pipe()
                .cmd("HSCAN")
                .arg(&key)
                .arg(cursor)
                .arg("COUNT")
                .arg(limit)
                .cmd("HLEN")
                .arg(&key)
                .query_async(&mut conn)
                .await?;
            let mut page = scan_page(next, fields);
            if !page.users.is_empty() {
                // Their room states and metadata: one more round trip, every
                // command an HMGET so the replies have one type.
                let mut pipe = redis::pipe();
                pipe.cmd("HMGET")
                    .arg(this.keys.room_state(&room))
                    .arg(page.users.iter().map(UserId::as_str).collect::<Vec<_>>());
                for user in &page.users {
                    pipe.cmd("HMGET").arg(this.keys.user(user)).arg("meta");
                }
                let mut replies: Vec<Vec<Option<String>>> = pipe.query_async(&mut conn).await?;
                let metas = replies.split_off(1);
                let states = replies.pop().unwrap_or_default();
                page.members = page
                    .users
                    .iter()
                    .zip(metas)
                    .zip(states)
                    .map(|((user, meta), state)| Member {
                        user: user.clone(),
                        meta: meta
                            .into_iter()
                            .flatten()
                            .next()
                            .and_then(Meta::from_stored),
                        state: state.and_then(Meta::from_stored),
                    })
                    .collect();
            }
            Ok((page, count))
        }
        .boxed()
    }

    fn users_page(
        &self,
        cursor: Option<String>,
        limit: usize,
    ) -> BoxFuture<'static, Result<Page, StoreError>> {
        let this = self.clone();
        async move {
            let cursor = scan_cursor(cursor)?;
            let mut conn = this.conn.clone();
            let (next, fields): (u64, Vec<(UserId, i64)>) = redis::cmd("HSCAN")
                .arg(this.keys.users())
                .arg(cursor)
                .arg("COUNT")
                .arg(limit)
                .query_async(&mut conn)
                .await?;
            Ok(scan_page(next, fields))
        }
        .boxed()
    }

    fn user(&self, user: UserId) -> BoxFuture<'static, Result<UserRecord, StoreError>> {
        let this = self.clone();
        async move {
            let mut conn = this.conn.clone();
            #[allow(clippy::type_complexity)]
            let (online, grace_until, records, (last_seen, meta)): (
                bool,
                Option<u64>,
                Vec<(String, Packed<ConnRecordWire>)>,
                (Option<u64>, Option<String>),
            ) = redis::pipe()
                .cmd("HEXISTS")
                .arg(this.keys.users())
                .arg(user.as_str())
                .cmd("ZSCORE")
                .arg(this.keys.grace())
                .arg(user.as_str())
                .cmd("HGETALL")
                .arg(this.keys.user_conns(&user))
                .cmd("HMGET")
                .arg(this.keys.user(&user))
                .arg("last_seen")
                .arg("meta")
                .query_async(&mut conn)
                .await?;
            let mut connections: Vec<ConnRecord> = records
                .into_iter()
                .map(|(conn, Packed(record))| ConnRecord {
                    conn,
                    node: record.node,
                    since_ms: record.since_ms,
                    meta: record.meta.and_then(Meta::from_stored),
                })
                .collect();
            connections.sort_by(|a, b| a.conn.cmp(&b.conn));
            Ok(UserRecord {
                online,
                grace_until_ms: grace_until,
                connections,
                last_seen_ms: last_seen,
                meta: meta.and_then(Meta::from_stored),
            })
        }
        .boxed()
    }

    fn stats(&self) -> BoxFuture<'static, Result<Stats, StoreError>> {
        let this = self.clone();
        async move {
            let mut conn = this.conn.clone();
            let (users_online, connections, nodes_alive, users_in_grace): (u64, i64, u64, u64) =
                this.stats
                    .key(this.keys.users())
                    .key(this.keys.nodes())
                    .key(this.keys.connections())
                    .key(this.keys.grace())
                    .invoke_async(&mut conn)
                    .await?;
            Ok(Stats {
                users_online,
                connections: connections.max(0) as u64,
                nodes_alive,
                users_in_grace,
            })
        }
        .boxed()
    }

    fn refresh_lease(&self) -> BoxFuture<'static, Result<bool, StoreError>> {
        let this = self.clone();
        async move {
            let mut conn = this.conn.clone();
            let deadline: i64 = this
                .lease
                .key(this.keys.nodes())
                .arg(&this.node)
                .arg(this.lease_ms)
                .invoke_async(&mut conn)
                .await?;
            Ok(deadline > 0)
        }
        .boxed()
    }

    fn reap(&self) -> BoxFuture<'static, Result<Reaped, StoreError>> {
        let this = self.clone();
        async move {
            let mut conn = this.conn.clone();
            let Packed(reply): Packed<ReapReply> = this
                .reap
                .arg(this.keys.prefix())
                .arg(&this.node)
                .arg(this.grace_ms)
                .invoke_async(&mut conn)
                .await?;
            Ok(Reaped {
                nodes: reply.nodes,
                events: reply.events,
                tally: reply.t,
            })
        }
        .boxed()
    }

    fn retire(&self) -> BoxFuture<'static, Result<(), StoreError>> {
        let this = self.clone();
        async move {
            let mut conn = this.conn.clone();
            let _: i64 = redis::cmd("ZREM")
                .arg(this.keys.nodes())
                .arg(&this.node)
                .query_async(&mut conn)
                .await?;
            Ok(())
        }
        .boxed()
    }

    fn feed(&self) -> Option<BoxStream<'static, FeedItem>> {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(self.clone().run_feed(tx));
        Some(
            futures_util::stream::unfold(rx, |mut rx| async move {
                rx.recv().await.map(|item| (item, rx))
            })
            .boxed(),
        )
    }
}
