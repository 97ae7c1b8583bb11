//! The subscription to the cluster's event channel: one task per node that
//! keeps it subscribed (resubscribing with backoff after a loss, pinging it
//! when quiet so a silently dead connection is noticed) and hands what
//! arrives to the registry as [`FeedItem`]s.

use std::time::Duration;

use futures_util::{FutureExt, StreamExt};
use redis::Value;
use tokio::sync::mpsc;
use tracing::{info, warn};

use super::{DEFAULT_RESPONSE_TIMEOUT, RedisStore, codec};
use crate::store::{FeedItem, StoreError};

/// Longest wait between attempts to resubscribe to the event channel.
const RESUBSCRIBE_MAX: Duration = Duration::from_secs(2);

/// How often the event subscription is pinged when no event arrives: a
/// connection that died silently (no FIN, no RST: a partition) is noticed
/// within this plus [`DEFAULT_RESPONSE_TIMEOUT`].
const FEED_PING_INTERVAL: Duration = Duration::from_secs(5);

impl RedisStore {
    /// Subscribes to the event channel; returns the connection and the
    /// feed's sequence number right after the subscription took effect.
    async fn subscribe(&self) -> Result<(redis::aio::PubSub, u64), StoreError> {
        let connect = self.client.get_async_pubsub();
        let mut pubsub = tokio::time::timeout(DEFAULT_RESPONSE_TIMEOUT, connect)
            .await
            .map_err(|_| StoreError::Protocol("pub/sub connect timed out".into()))??;
        pubsub.subscribe(self.keys.events()).await?;
        let mut conn = self.conn.clone();
        let floor: Option<u64> = redis::cmd("GET")
            .arg(self.keys.events_seq())
            .query_async(&mut conn)
            .await?;
        Ok((pubsub, floor.unwrap_or(0)))
    }

    /// Keeps a subscription to the event channel, resubscribing after a
    /// loss, until the receiver is dropped.
    pub(super) async fn run_feed(self, tx: mpsc::UnboundedSender<FeedItem>) {
        let mut delay = Duration::from_millis(50);
        loop {
            match self.subscribe().await {
                Ok((pubsub, floor)) => {
                    info!(floor, "subscribed to presence events");
                    delay = Duration::from_millis(50);
                    if tx.send(FeedItem::Subscribed { floor }).is_err() {
                        return;
                    }
                    if relay(pubsub, &tx).await.is_err() {
                        return;
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
}

/// Hands every message of `pubsub` to `tx` until the subscription breaks
/// (`Ok`) or nobody listens any more (`Err`).
async fn relay(pubsub: redis::aio::PubSub, tx: &mpsc::UnboundedSender<FeedItem>) -> Result<(), ()> {
    let (mut sink, mut messages) = pubsub.split();
    let quiet = tokio::time::sleep(FEED_PING_INTERVAL);
    tokio::pin!(quiet);
    loop {
        let first = tokio::select! {
            msg = messages.next() => match msg {
                Some(msg) => msg,
                None => return Ok(()),
            },
            () = &mut quiet => {
                let ping = sink.ping::<Value>();
                match tokio::time::timeout(DEFAULT_RESPONSE_TIMEOUT, ping).await {
                    Ok(Ok(_)) => {
                        quiet.as_mut().reset(tokio::time::Instant::now() + FEED_PING_INTERVAL);
                        continue;
                    }
                    _ => return Ok(()),
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
            match codec::decode_published(msg.get_payload_bytes()) {
                Ok(event) => events.push(event),
                Err(error) => warn!(%error, "unreadable presence event"),
            }
            next = messages.next().now_or_never().flatten();
        }
        tx.send(FeedItem::Published(events)).map_err(|_| ())?;
    }
}
