//! The registry's background work, each a named loop with its interval in
//! config: the node lease (every `--node-lease-ms` / 3), the cluster-wide
//! users-online gauge ([`USERS_ONLINE_REFRESH`]), reaping dead nodes
//! ([`REAP_INTERVAL`](super::REAP_INTERVAL), shared stores only), ending
//! due offline graces (every twentieth of `--offline-grace-ms`, see
//! [`Batching::grace_check`](super::Batching)), the resync after missed
//! events, and the end of a drain. The loops run on the registry's
//! context, so they stop with it.

use std::collections::HashSet;

use actix::prelude::*;
use tracing::{debug, info, warn};

use super::{PresenceRegistry, USERS_ONLINE_REFRESH, queue::Pending, render::Answer};
use crate::{broadcast::Subscriptions, ids::UserId, metrics::metrics, store::StoreOp};

impl PresenceRegistry {
    /// Starts the lease and users-online loops.
    pub(super) fn start_upkeep(&mut self, ctx: &mut Context<Self>) {
        self.refresh_lease(ctx);
        ctx.run_interval(self.batching.lease_refresh, |this, ctx| {
            this.refresh_lease(ctx);
        });
        self.refresh_users_online(ctx);
        ctx.run_interval(USERS_ONLINE_REFRESH, |this, ctx| {
            this.refresh_users_online(ctx);
        });
        if let Some(every) = self.batching.grace_check {
            ctx.run_interval(every, |this, ctx| this.expire_graces(ctx));
        }
    }

    /// Ends the offline graces that ran out, this node's or any other's:
    /// one `Expire` op, which rides along with the next batch (or is one,
    /// when the node is idle). Every node does it; the store ends each
    /// grace once.
    fn expire_graces(&mut self, ctx: &mut Context<Self>) {
        if self.drained.is_some() {
            return;
        }
        self.queue.push(Pending::write(StoreOp::Expire));
        self.maybe_flush(ctx);
    }

    /// Caches the store's count in a gauge, so a scrape never calls the store.
    fn refresh_users_online(&mut self, ctx: &mut Context<Self>) {
        ctx.spawn(
            self.store
                .stats()
                .into_actor(self)
                .map(|result, _, _| match result {
                    Ok(stats) => {
                        metrics().users_online.set(stats.users_online as i64);
                        metrics().users_in_grace.set(stats.users_in_grace as i64);
                    }
                    Err(error) => warn!(%error, "users-online refresh failed"),
                }),
        );
    }

    fn refresh_lease(&mut self, ctx: &mut Context<Self>) {
        if self.drained.is_some() {
            return;
        }
        ctx.spawn(self.store.refresh_lease().into_actor(self).map(
            |result, this, ctx| match result {
                Ok(true) => {
                    // A failed batch already set it false, and only a
                    // batch may set it back.
                    if !this.queue.reassert_due() {
                        this.health.set_store_ok(true);
                    }
                }
                Ok(false) => {
                    warn!("this node's lease is gone; reasserting its connections");
                    this.health.set_store_ok(true);
                    this.queue.need_reassert();
                    this.maybe_flush(ctx);
                }
                Err(error) => {
                    this.health.set_store_ok(false);
                    warn!(%error, "node lease refresh failed");
                }
            },
        ));
    }

    pub(super) fn reap(&mut self, ctx: &mut Context<Self>) {
        ctx.spawn(
            self.store
                .reap()
                .into_actor(self)
                .map(|result, _, _| match result {
                    Ok(reaped) => {
                        for node in &reaped.nodes {
                            info!(%node, events = reaped.events, "reaped a dead node");
                        }
                        metrics().nodes_reaped.inc_by(reaped.nodes.len() as u64);
                        metrics().count_tally(&reaped.tally);
                    }
                    Err(error) => debug!(%error, "reaping dead nodes failed"),
                }),
        );
    }

    /// Events were missed (the feed was lost): reads the current presence
    /// of every user watched on this node and the members of every room
    /// joined on it, in order with the events, and sends each connection a
    /// `sync` with what it follows.
    pub(super) fn resync(&mut self, ctx: &mut Context<Self>) {
        let asks: Vec<_> = self
            .broadcasters
            .iter()
            .map(|b| b.send(Subscriptions))
            .collect();
        ctx.spawn(futures_util::future::join_all(asks).into_actor(self).map(
            |answers, this, ctx| {
                let mut users = HashSet::new();
                let mut rooms = HashSet::new();
                for (u, r) in answers.into_iter().flatten() {
                    users.extend(u);
                    rooms.extend(r);
                }
                info!(
                    users = users.len(),
                    rooms = rooms.len(),
                    "events were missed; resyncing"
                );
                if !users.is_empty() && this.queue.admits_request() {
                    let users: Vec<UserId> = users.into_iter().collect();
                    this.queue.push(Pending {
                        op: Some(StoreOp::Presence(users.clone())),
                        answer: Answer::SyncUsers(users),
                    });
                }
                for room in rooms {
                    if this.queue.admits_request() {
                        this.queue.push(Pending {
                            op: Some(StoreOp::Members(room.clone())),
                            answer: Answer::SyncRoom(room),
                        });
                    }
                }
                this.maybe_flush(ctx);
            },
        ));
    }

    /// Fires the drain's answer once its removals are written and the
    /// lease is given up.
    pub(super) fn check_drained(&mut self, ctx: &mut Context<Self>) {
        if self.in_flight || !self.queue.is_idle() {
            return;
        }
        let Some(done) = self.drained.take() else {
            return;
        };
        ctx.spawn(
            self.store
                .retire()
                .into_actor(self)
                .map(move |result, _, _| {
                    if let Err(error) = result {
                        warn!(%error, "could not give up the node lease; it will expire");
                    }
                    info!("drain written");
                    let _ = done.send(());
                }),
        );
    }
}
