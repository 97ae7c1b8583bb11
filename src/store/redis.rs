//! The shared store: many nodes, one truth in Redis.
//!
//! A registry batch becomes one pipelined `MULTI`, one `EVALSHA` of
//! `scripts/batch.lua`, `EXEC`: a single round trip and a single atomic
//! step, however many ops the batch holds. The script, not this file,
//! decides transitions, so nodes racing on one user each see exactly the
//! transitions their own ops caused. Key layout: see the script's header
//! and docs/operations.md.

use std::{sync::Arc, time::Duration};

use futures_util::{FutureExt, StreamExt, future::BoxFuture, stream::BoxStream};
use redis::{ErrorKind, RedisError, ServerErrorKind, Value, aio::ConnectionManager};
use tokio::sync::mpsc;
use tracing::{info, warn};

use super::{
    Applied, ConnRecord, FeedItem, NodeState, Outcome, Page, Reaped, RoomMember, Stats, Store,
    StoreError, StoreOp, UserPresence, UserRecord,
};
use crate::{
    ids::{NodeId, RoomName, UserId},
    protocol::{Event, Reason},
};

const BATCH_LUA: &str = concat!(
    include_str!("scripts/common.lua"),
    include_str!("scripts/batch.lua")
);
const REAP_LUA: &str = concat!(
    include_str!("scripts/common.lua"),
    include_str!("scripts/reap.lua")
);
const LEASE_LUA: &str = include_str!("scripts/lease.lua");
const STATS_LUA: &str = include_str!("scripts/stats.lua");

/// Longest wait between attempts to resubscribe to the event channel.
const RESUBSCRIBE_MAX: Duration = Duration::from_secs(2);

/// How often the event subscription is pinged when no event arrives: a
/// connection that died silently (no FIN, no RST: a partition) is noticed
/// within this plus [`DEFAULT_RESPONSE_TIMEOUT`].
const FEED_PING_INTERVAL: Duration = Duration::from_secs(5);

/// Reconnect attempts inside one call before it fails.
const RECONNECT_RETRIES: usize = 2;

/// How long one Redis call may take before it counts as failed.
pub const DEFAULT_RESPONSE_TIMEOUT: Duration = Duration::from_secs(5);

/// Presence in Redis, shared by every node using the same prefix.
#[derive(Clone)]
pub struct RedisStore {
    client: redis::Client,
    conn: ConnectionManager,
    batch: redis::Script,
    reap: redis::Script,
    lease: redis::Script,
    stats: redis::Script,
    prefix: String,
    node: String,
    lease_ms: u64,
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
            prefix: prefix.to_owned(),
            node: node.to_string(),
            lease_ms: lease.as_millis() as u64,
        };
        store.load_batch_script().await?;
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

    /// The event channel's name.
    fn channel(&self) -> String {
        format!("{}:events", self.prefix)
    }

    /// Subscribes to the event channel; returns the connection and the
    /// feed's sequence number right after the subscription took effect.
    async fn subscribe(&self) -> Result<(redis::aio::PubSub, u64), StoreError> {
        let connect = self.client.get_async_pubsub();
        let mut pubsub = tokio::time::timeout(DEFAULT_RESPONSE_TIMEOUT, connect)
            .await
            .map_err(|_| StoreError::Protocol("pub/sub connect timed out".into()))??;
        pubsub.subscribe(self.channel()).await?;
        let mut conn = self.conn.clone();
        let floor: Option<u64> = redis::cmd("GET")
            .arg(format!("{}:events:seq", self.prefix))
            .query_async(&mut conn)
            .await?;
        Ok((pubsub, floor.unwrap_or(0)))
    }

    /// Keeps a subscription to the event channel, resubscribing after a
    /// loss, until the receiver is dropped.
    async fn run_feed(self, tx: mpsc::UnboundedSender<FeedItem>) {
        let mut delay = Duration::from_millis(50);
        loop {
            match self.subscribe().await {
                Ok((pubsub, floor)) => {
                    info!(floor, "subscribed to presence events");
                    delay = Duration::from_millis(50);
                    if tx.send(FeedItem::Subscribed { floor }).is_err() {
                        return;
                    }
                    let (mut sink, mut messages) = pubsub.split();
                    let quiet = tokio::time::sleep(FEED_PING_INTERVAL);
                    tokio::pin!(quiet);
                    loop {
                        let first = tokio::select! {
                            msg = messages.next() => match msg {
                                Some(msg) => msg,
                                None => break,
                            },
                            () = &mut quiet => {
                                let ping = sink.ping::<Value>();
                                match tokio::time::timeout(DEFAULT_RESPONSE_TIMEOUT, ping).await {
                                    Ok(Ok(_)) => {
                                        quiet.as_mut().reset(tokio::time::Instant::now() + FEED_PING_INTERVAL);
                                        continue;
                                    }
                                    _ => break,
                                }
                            }
                        };
                        quiet
                            .as_mut()
                            .reset(tokio::time::Instant::now() + FEED_PING_INTERVAL);
                        // Whatever else has already arrived goes along.
                        let mut events = Vec::new();
                        let mut next = Some(first);
                        while let Some(msg) = next {
                            match parse_published(msg.get_payload_bytes()) {
                                Ok(event) => events.push(event),
                                Err(error) => warn!(%error, "unreadable presence event"),
                            }
                            next = messages.next().now_or_never().flatten();
                        }
                        if tx.send(FeedItem::Events(events)).is_err() {
                            return;
                        }
                    }
                    warn!("presence event subscription lost; resubscribing");
                    if tx.send(FeedItem::Lost).is_err() {
                        return;
                    }
                }
                Err(error) => {
                    warn!(%error, retry_in = ?delay, "cannot subscribe to presence events")
                }
            }
            if tx.is_closed() {
                return;
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(RESUBSCRIBE_MAX);
        }
    }

    async fn load_batch_script(&self) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        let _: String = redis::cmd("SCRIPT")
            .arg("LOAD")
            .arg(BATCH_LUA)
            .query_async(&mut conn)
            .await?;
        Ok(())
    }

    fn batch_pipeline(&self, ops: &[StoreOp]) -> redis::Pipeline {
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(self.batch.get_hash())
            .arg(0)
            .arg(&self.prefix)
            .arg(&self.node)
            .arg(self.lease_ms)
            .arg(if needs_lease(ops) { "1" } else { "0" });
        for op in ops {
            match op {
                StoreOp::Connect(u) => cmd.arg("C").arg(u.as_str()),
                StoreOp::Disconnect(u, why) => cmd.arg("D").arg(u.as_str()).arg(why.as_str()),
                StoreOp::Join(r, u) => cmd.arg("J").arg(r.as_str()).arg(u.as_str()),
                StoreOp::Leave(r, u, why) => cmd
                    .arg("L")
                    .arg(r.as_str())
                    .arg(u.as_str())
                    .arg(why.as_str()),
                StoreOp::Reassert(state) => reassert_args(&mut cmd, state),
                StoreOp::Members(r) => cmd.arg("M").arg(r.as_str()),
                StoreOp::Attach(u, conn, meta) => cmd
                    .arg("A")
                    .arg(u.as_str())
                    .arg(conn.to_string())
                    .arg(meta.as_deref().unwrap_or("")),
                StoreOp::Detach(u, conn) => cmd.arg("X").arg(u.as_str()).arg(conn.to_string()),
                StoreOp::Presence(users) => {
                    cmd.arg("P").arg(users.len());
                    for u in users {
                        cmd.arg(u.as_str());
                    }
                    &mut cmd
                }
            };
        }
        let mut pipe = redis::pipe();
        pipe.atomic().add_command(cmd);
        pipe
    }
}

/// Whether a batch writes on this node's behalf without first reasserting
/// (and so must be refused if the node lost its lease).
fn needs_lease(ops: &[StoreOp]) -> bool {
    !matches!(ops.first(), Some(StoreOp::Reassert(_)))
        && ops
            .iter()
            .any(|op| !matches!(op, StoreOp::Members(_) | StoreOp::Presence(_)))
}

/// The arguments of an `R` op: the connections, then the room counts.
fn reassert_args<'a>(cmd: &'a mut redis::Cmd, state: &NodeState) -> &'a mut redis::Cmd {
    cmd.arg("R").arg(state.conns.len());
    for (user, conn, meta) in &state.conns {
        cmd.arg(user.as_str())
            .arg(conn.to_string())
            .arg(meta.as_deref().unwrap_or(""));
    }
    cmd.arg(state.rooms.len());
    for (room, user, n) in &state.rooms {
        cmd.arg(room.as_str()).arg(user.as_str()).arg(*n);
    }
    cmd.arg(state.gone.as_str())
}

/// A client's cursor as an HSCAN cursor (the start when absent).
fn scan_cursor(cursor: Option<String>) -> Result<u64, StoreError> {
    cursor.map_or(Ok(0), |c| c.parse().map_err(|_| StoreError::BadCursor))
}

/// An HSCAN reply (cursor, field, value, field, value …) as a page.
fn scan_page(next: u64, flat: Vec<String>) -> Result<Page, StoreError> {
    let users = flat
        .into_iter()
        .step_by(2)
        .map(|f| UserId::parse(&f).map_err(|_| StoreError::Protocol(format!("not a user id: {f}"))))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Page {
        users,
        next: (next != 0).then(|| next.to_string()),
    })
}

fn is_noscript(e: &RedisError) -> bool {
    e.kind() == ErrorKind::Server(ServerErrorKind::NoScript)
}

/// The batch script's refusal when this node has no lease (inside
/// MULTI/EXEC it comes back as a pipeline failure).
fn is_nolease(e: &RedisError) -> bool {
    e.code() == Some("NOLEASE")
        || e.clone()
            .into_server_errors()
            .is_some_and(|errors| errors.iter().any(|(_, e)| e.code() == "NOLEASE"))
}

/// One message of the event channel: "seq kind args".
fn parse_published(payload: &[u8]) -> Result<(u64, Event), StoreError> {
    let text = std::str::from_utf8(payload)
        .map_err(|_| StoreError::Protocol("event is not UTF-8".into()))?;
    let (seq, event) = text
        .split_once(' ')
        .ok_or_else(|| StoreError::Protocol(format!("event {text:?}")))?;
    let seq = seq
        .parse()
        .map_err(|_| StoreError::Protocol(format!("event {text:?}")))?;
    Ok((seq, parse_event(event)?))
}

/// An event as the scripts write it: "kind args" (see batch.lua).
fn parse_event(text: &str) -> Result<Event, StoreError> {
    let bad = || StoreError::Protocol(format!("event {text:?}"));
    let user = |s: &str| UserId::parse(s).map_err(|_| bad());
    let room = |s: &str| RoomName::parse(s).map_err(|_| bad());
    let num = |s: &str| s.parse::<u64>().map_err(|_| bad());
    let reason = |s: &str| Reason::parse(s).ok_or_else(bad);
    let parts: Vec<&str> = text.split(' ').collect();
    Ok(match parts.as_slice() {
        ["online", u, seq] => Event::Online {
            user: user(u)?,
            seq: num(seq)?,
        },
        ["offline", u, seq, at, why] => Event::Offline {
            user: user(u)?,
            seq: num(seq)?,
            last_seen: num(at)?,
            reason: reason(why)?,
        },
        ["joined", r, u] => Event::Joined {
            room: room(r)?,
            user: user(u)?,
        },
        ["left", r, u, why] => Event::Left {
            room: room(r)?,
            user: user(u)?,
            reason: reason(why)?,
        },
        _ => return Err(bad()),
    })
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
            let pipe = this.batch_pipeline(&ops);
            let mut conn = this.conn.clone();
            let result: Result<(Value,), RedisError> = pipe.query_async(&mut conn).await;
            let (reply,) = match result {
                // A Redis restarted since we connected has forgotten the
                // script; inside MULTI nothing was applied, so load and redo.
                Err(e) if is_noscript(&e) => {
                    this.load_batch_script().await?;
                    match pipe.query_async(&mut conn).await {
                        Err(e) if is_nolease(&e) => return Err(StoreError::LeaseLost),
                        other => other?,
                    }
                }
                Err(e) if is_nolease(&e) => return Err(StoreError::LeaseLost),
                other => other?,
            };
            let mut items = array(reply)?.into_iter();
            let base = items
                .next()
                .ok_or_else(|| StoreError::Protocol("empty batch reply".into()))?;
            Ok(Applied {
                published_after: Some(int(&base)?.max(0) as u64),
                outcomes: parse_outcomes(&ops, items.collect())?,
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
            let key = format!("{}:room:{}", this.prefix, room);
            let mut conn = this.conn.clone();
            let ((next, flat), count): ((u64, Vec<String>), u64) = redis::pipe()
                .cmd("HSCAN")
                .arg(&key)
                .arg(cursor)
                .arg("COUNT")
                .arg(limit)
                .cmd("HLEN")
                .arg(&key)
                .query_async(&mut conn)
                .await?;
            Ok((scan_page(next, flat)?, count))
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
            let (next, flat): (u64, Vec<String>) = redis::cmd("HSCAN")
                .arg(format!("{}:users", this.prefix))
                .arg(cursor)
                .arg("COUNT")
                .arg(limit)
                .query_async(&mut conn)
                .await?;
            scan_page(next, flat)
        }
        .boxed()
    }

    fn user(&self, user: UserId) -> BoxFuture<'static, Result<UserRecord, StoreError>> {
        let this = self.clone();
        async move {
            let p = &this.prefix;
            let key = format!("{p}:user:{user}");
            let mut conn = this.conn.clone();
            #[allow(clippy::type_complexity)]
            let (online, records, (last_seen, meta)): (
                bool,
                Vec<(String, String)>,
                (Option<u64>, Option<String>),
            ) = redis::pipe()
                .cmd("HEXISTS")
                .arg(format!("{p}:users"))
                .arg(user.as_str())
                .cmd("HGETALL")
                .arg(format!("{key}:conns"))
                .cmd("HMGET")
                .arg(&key)
                .arg("last_seen")
                .arg("meta")
                .query_async(&mut conn)
                .await?;
            let mut connections = records
                .into_iter()
                .map(|(conn, record)| {
                    let mut parts = record.splitn(3, ' ');
                    let node = parts.next().unwrap_or_default().to_owned();
                    let since_ms = parts.next().and_then(|t| t.parse().ok()).ok_or_else(|| {
                        StoreError::Protocol(format!("connection record {record:?}"))
                    })?;
                    Ok(ConnRecord {
                        conn,
                        node,
                        since_ms,
                        meta: parts.next().map(str::to_owned),
                    })
                })
                .collect::<Result<Vec<_>, StoreError>>()?;
            connections.sort_by(|a, b| a.conn.cmp(&b.conn));
            Ok(UserRecord {
                online,
                connections,
                last_seen_ms: last_seen,
                meta,
            })
        }
        .boxed()
    }

    fn stats(&self) -> BoxFuture<'static, Result<Stats, StoreError>> {
        let this = self.clone();
        async move {
            let mut conn = this.conn.clone();
            let (users_online, connections, nodes_alive): (u64, i64, u64) = this
                .stats
                .key(format!("{}:users", this.prefix))
                .key(format!("{}:nodes", this.prefix))
                .key(format!("{}:connections", this.prefix))
                .invoke_async(&mut conn)
                .await?;
            Ok(Stats {
                users_online,
                connections: connections.max(0) as u64,
                nodes_alive,
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
                .key(format!("{}:nodes", this.prefix))
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
            let reply: Vec<Value> = this
                .reap
                .arg(&this.prefix)
                .arg(&this.node)
                .invoke_async(&mut conn)
                .await?;
            let mut items = reply.into_iter();
            let events = items
                .next()
                .ok_or_else(|| StoreError::Protocol("empty reap reply".into()))?;
            Ok(Reaped {
                events: int(&events)?.max(0) as u64,
                nodes: items.map(text).collect::<Result<_, _>>()?,
            })
        }
        .boxed()
    }

    fn retire(&self) -> BoxFuture<'static, Result<(), StoreError>> {
        let this = self.clone();
        async move {
            let mut conn = this.conn.clone();
            let _: i64 = redis::cmd("ZREM")
                .arg(format!("{}:nodes", this.prefix))
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

fn unexpected(what: &str, v: &Value) -> StoreError {
    StoreError::Protocol(format!("{what}: {v:?}"))
}

fn text(v: Value) -> Result<String, StoreError> {
    match v {
        Value::BulkString(b) => {
            String::from_utf8(b).map_err(|_| StoreError::Protocol("reply not UTF-8".into()))
        }
        other => Err(unexpected("expected a string", &other)),
    }
}

fn int(v: &Value) -> Result<i64, StoreError> {
    match v {
        Value::Int(n) => Ok(*n),
        other => Err(unexpected("expected an integer", other)),
    }
}

fn array(v: Value) -> Result<Vec<Value>, StoreError> {
    match v {
        Value::Array(items) => Ok(items),
        other => Err(unexpected("expected an array", &other)),
    }
}

fn users(items: impl Iterator<Item = Value>) -> Result<Vec<UserId>, StoreError> {
    let mut out = items
        .map(|v| match &v {
            Value::BulkString(b) => std::str::from_utf8(b)
                .ok()
                .and_then(|s| UserId::parse(s).ok())
                .ok_or_else(|| unexpected("not a user id", &v)),
            _ => Err(unexpected("expected a user id", &v)),
        })
        .collect::<Result<Vec<_>, _>>()?;
    out.sort();
    Ok(out)
}

/// Pairs of (member, metadata or "") as sorted room members.
fn room_members(items: Vec<Value>) -> Result<Vec<RoomMember>, StoreError> {
    if !items.len().is_multiple_of(2) {
        return Err(StoreError::Protocol("odd member/meta list".into()));
    }
    let mut flat = items.into_iter();
    let mut out = Vec::new();
    while let (Some(user), Some(meta)) = (flat.next(), flat.next()) {
        let user = users(std::iter::once(user))?.remove(0);
        let meta = match meta {
            Value::BulkString(b) if b.is_empty() => None,
            Value::BulkString(b) => Some(
                String::from_utf8(b).map_err(|_| StoreError::Protocol("meta not UTF-8".into()))?,
            ),
            other => return Err(unexpected("expected metadata", &other)),
        };
        out.push(RoomMember { user, meta });
    }
    out.sort();
    Ok(out)
}

fn parse_outcomes(ops: &[StoreOp], items: Vec<Value>) -> Result<Vec<Outcome>, StoreError> {
    if items.len() != ops.len() {
        return Err(StoreError::Protocol(format!(
            "{} outcomes for {} ops",
            items.len(),
            ops.len()
        )));
    }
    ops.iter()
        .zip(items)
        .map(|(op, v)| {
            Ok(match op {
                StoreOp::Connect(_) => {
                    let seq = int(&v)?;
                    Outcome::Connected((seq > 0).then_some(seq as u64))
                }
                StoreOp::Disconnect(..) => {
                    let pair = array(v)?;
                    let (seq, at) = match pair.as_slice() {
                        [s, t] => (int(s)?, int(t)?),
                        _ => return Err(StoreError::Protocol("disconnect outcome".into())),
                    };
                    Outcome::Disconnected((seq > 0).then_some((seq as u64, at as u64)))
                }
                StoreOp::Join(..) => {
                    let mut items = array(v)?.into_iter();
                    let first = items
                        .next()
                        .ok_or_else(|| StoreError::Protocol("empty join outcome".into()))?;
                    Outcome::Joined(int(&first)? == 1, room_members(items.collect())?)
                }
                StoreOp::Leave(..) => Outcome::Left(int(&v)? == 1),
                StoreOp::Reassert(_) => Outcome::Reasserted(
                    array(v)?
                        .into_iter()
                        .map(|e| parse_event(&text(e)?))
                        .collect::<Result<_, _>>()?,
                ),
                StoreOp::Attach(..) | StoreOp::Detach(..) => {
                    int(&v)?;
                    Outcome::Recorded
                }
                StoreOp::Members(_) => Outcome::Members(room_members(array(v)?)?),
                StoreOp::Presence(requested) => {
                    let flat = array(v)?;
                    if flat.len() != requested.len() * 2 {
                        return Err(StoreError::Protocol("presence outcome".into()));
                    }
                    Outcome::Presence(
                        flat.chunks(2)
                            .map(|c| {
                                Ok(UserPresence {
                                    online: int(&c[0])? == 1,
                                    seq: int(&c[1])?.max(0) as u64,
                                })
                            })
                            .collect::<Result<_, StoreError>>()?,
                    )
                }
            })
        })
        .collect()
}
