//! Start-up and shutdown: the acceptor, the worker arbiters, the registry.
//!
//! The system arbiter (the main thread) owns the [`PresenceRegistry`].
//! Each of `--workers` worker arbiters owns a listener on the shared port
//! (`SO_REUSEPORT`: the kernel spreads new connections over them), a
//! [`Broadcaster`], and every connection it accepts: it serves HTTP,
//! upgrades and runs the `Conn` on the same thread; a socket never changes
//! thread, and accepting costs no cross-thread hand-off.

use std::{cell::RefCell, io::Write, net::SocketAddr, rc::Rc, sync::Arc, time::Duration};

use actix::prelude::*;
use futures_util::StreamExt;
use tokio::{
    net::{TcpListener, TcpSocket},
    sync::{oneshot, watch},
    time::Instant,
};
use tracing::{error, info, warn};

use crate::{
    auth::{KeyError, Verifier},
    broadcast::{Broadcaster, CloseAll, Hub},
    close::CloseReason,
    config::Config,
    conn::ConnSettings,
    health::Health,
    http::{self, WorkerState},
    ids::NodeId,
    logs::{self, LogLimiter},
    origin::OriginPattern,
    registry::{Batching, Drain, PresenceRegistry, RegistryLink},
    slots::ConnSlots,
    store::{FeedItem, MemoryStore, RedisStore, Store, StoreError},
};

/// Longest start-up wait for the subscription to the cluster's events.
const FEED_START_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The listen address could not be bound.
    #[error("cannot listen on {0}: {1}")]
    Bind(SocketAddr, std::io::Error),
    /// Redis could not be reached or refused the scripts.
    #[error("cannot use Redis at {0}: {1}")]
    Store(String, StoreError),
    /// A worker thread failed to come up.
    #[error("worker {0} failed to start")]
    Worker(usize),
    /// The token key could not be loaded.
    #[error("cannot load the token key: {0}")]
    Key(KeyError),
}

/// Runs the gateway until SIGINT or SIGTERM, then drains it.
pub fn run(config: Config) -> Result<(), StartError> {
    actix_rt::System::new().block_on(serve(config))
}

async fn serve(config: Config) -> Result<(), StartError> {
    let config = Arc::new(config);
    let node = NodeId::new();
    let store: Arc<dyn Store> = match &config.redis {
        Some(url) => Arc::new(
            RedisStore::connect(url, &config.prefix, node, config.node_lease())
                .await
                .map_err(|e| StartError::Store(config.redis_for_log(), e))?
                .with_grace(config.offline_grace()),
        ),
        None => Arc::new(MemoryStore::for_node(node).with_grace(config.offline_grace())),
    };
    // The first listener resolves port 0; the others join it on the port
    // it got.
    let mut listeners = Vec::new();
    let first = listen(config.listen).map_err(|e| StartError::Bind(config.listen, e))?;
    let addr = first
        .local_addr()
        .map_err(|e| StartError::Bind(config.listen, e))?;
    listeners.push(first);
    for _ in 1..config.worker_count() {
        listeners.push(listen(addr).map_err(|e| StartError::Bind(addr, e))?);
    }

    // The registry's address exists before it starts, so the workers can be
    // given it and the registry can be given their broadcasters.
    let registry_ctx = Context::<PresenceRegistry>::new();
    let api_store = store.clone();
    let registry = registry_ctx.address();
    let settings = ConnSettings {
        node,
        heartbeat: config.heartbeat(),
        idle_timeout: config.idle_timeout(),
        bounds: crate::protocol::Bounds {
            max_ids: config.max_ids,
            max_page: config.max_page,
            max_meta_bytes: config.max_meta_bytes,
            max_state_bytes: config.max_state_bytes,
        },
        outbox_messages: config.outbox_messages,
        outbox_bytes: config.outbox_bytes,
        verifier: Verifier::from_config(&config)
            .map_err(StartError::Key)?
            .map(Arc::new),
        max_rooms: config.max_rooms,
        max_watch: config.max_watch,
        rate_limit: config.rate_limit,
        rate_burst: config.rate_burst,
        max_update_rate: config.max_update_rate,
        state_every: Duration::from_secs(1) / config.state_rate,
    };
    let origins: Arc<[OriginPattern]> = config
        .allowed_origins
        .iter()
        .filter_map(|o| OriginPattern::parse(o))
        .collect();
    let slots = ConnSlots::new(config.max_connections, config.max_conns_per_user);
    let refusal_log = Arc::new(LogLimiter::new(
        "handshakes refused",
        std::time::Instant::now(),
    ));
    let health = Arc::new(Health::default());
    let (stop_accepting, accepting) = watch::channel(true);
    let mut broadcasters = Vec::new();
    // The worker threads run while these handles live: until `serve`
    // returns, at the end of the drain.
    let mut arbiters = Vec::new();
    for (index, listener) in listeners.into_iter().enumerate() {
        let worker = Worker {
            index,
            listener,
            store: api_store.clone(),
            config: config.clone(),
            settings: settings.clone(),
            registry: registry.clone(),
            health: health.clone(),
            accepting: accepting.clone(),
            origins: origins.clone(),
            slots: slots.clone(),
            refusal_log: refusal_log.clone(),
        };
        let (arbiter, broadcaster) = start_worker(worker)
            .await
            .ok_or(StartError::Worker(index))?;
        arbiters.push(arbiter);
        broadcasters.push(broadcaster);
    }
    // Subscribe to the cluster's events before accepting anyone: an event
    // published before the subscription would never reach this node.
    let feed = match store.feed() {
        Some(mut feed) => match tokio::time::timeout(FEED_START_TIMEOUT, feed.next()).await {
            Ok(Some(first @ FeedItem::Subscribed { .. })) => Some(
                futures_util::stream::once(std::future::ready(first))
                    .chain(feed)
                    .boxed(),
            ),
            _ => {
                return Err(StartError::Store(
                    config.redis_for_log(),
                    StoreError::Protocol("could not subscribe to the presence events".into()),
                ));
            }
        },
        None => None,
    };
    let batching = Batching {
        max: config.batch_max,
        linger: Duration::from_millis(config.batch_linger_ms),
        lease_refresh: config.node_lease() / 3,
        max_pending: config.max_pending,
        grace_check: config.grace_check(),
    };
    let broadcasters_len = broadcasters.len();
    let mut presence = PresenceRegistry::new(store, broadcasters.clone(), batching, health);
    if let Some(feed) = feed {
        presence = presence.with_feed(feed);
    }
    registry_ctx.run(presence);
    let (stop_summaries, summaries_stopped) = oneshot::channel();
    let summaries = actix_rt::spawn(logs::summarize(
        refusal_log,
        config.log_summary(),
        summaries_stopped,
    ));

    info!(
        %node,
        listen = %addr,
        redis = %config.redis_for_log(),
        prefix = %config.prefix,
        dev = config.dev,
        workers = broadcasters_len,
        heartbeat_ms = config.heartbeat_ms,
        idle_timeout_ms = config.idle_timeout_ms,
        batch_max = config.batch_max,
        batch_linger_ms = config.batch_linger_ms,
        max_message_bytes = config.max_message_bytes,
        outbox_messages = config.outbox_messages,
        outbox_bytes = config.outbox_bytes,
        max_ids = config.max_ids,
        node_lease_ms = config.node_lease_ms,
        drain_timeout_ms = config.drain_timeout_ms,
        max_pending = config.max_pending,
        max_page = config.max_page,
        max_meta_bytes = config.max_meta_bytes,
        max_state_bytes = config.max_state_bytes,
        max_update_rate = config.max_update_rate,
        state_rate = config.state_rate,
        token_key = ?settings.verifier,
        jwt_audience = ?config.jwt_audience,
        jwt_issuer = ?config.jwt_issuer,
        allowed_origins = ?config.allowed_origins,
        rate_limit = config.rate_limit,
        rate_burst = config.rate_burst,
        offline_grace_ms = config.offline_grace_ms,
        max_rooms = config.max_rooms,
        max_watch = config.max_watch,
        max_conns_per_user = config.max_conns_per_user,
        max_connections = config.max_connections,
        handshake_timeout_ms = config.handshake_timeout_ms,
        max_request_head_bytes = config.max_request_head_bytes,
        log_summary_ms = config.log_summary_ms,
        api_key = if config.api_key.is_some() { "set" } else { "not set" },
        "presenced started"
    );
    if !config.api_open() {
        warn!(
            "the /v1 HTTP API is refused (403): {} is reachable from other machines and no \
             --api-key is set, so anyone could read presence; set --api-key to enable it",
            addr
        );
    }
    // The one line on stdout: tests and scripts read the bound port here.
    println!("presenced listening on {addr}");
    let _ = std::io::stdout().flush();

    shutdown_signal().await;
    let deadline = Instant::now() + config.drain_timeout();
    info!(%node, timeout = ?config.drain_timeout(), "draining");
    let _ = stop_accepting.send(false);
    drain(registry, &broadcasters, &slots, deadline).await;
    // Last: the counts of log lines held back until the end of the drain.
    let _ = stop_summaries.send(());
    let _ = summaries.await;
    info!(%node, "stopped");
    Ok(())
}

/// Writes the removal of every local connection (reason `shutdown`), then
/// closes the sockets with 1012 and waits for them to go, all by
/// `deadline`.
async fn drain(
    registry: Addr<PresenceRegistry>,
    broadcasters: &[Addr<Broadcaster>],
    slots: &ConnSlots,
    deadline: Instant,
) {
    let (done, written) = oneshot::channel();
    registry.do_send(Drain(done));
    if tokio::time::timeout_at(deadline, written).await.is_err() {
        warn!("drain: the removals were not written in time; other nodes will reap this one");
    }
    // unwrap: the table gives the shutdown reason a code (close.rs tests).
    let frame = CloseReason::Shutdown.frame().unwrap();
    let mut open = 0;
    for b in broadcasters {
        open += b.send(CloseAll(frame.clone())).await.unwrap_or(0);
    }
    info!(connections = open, "drain: closing sockets with 1012");
    // Each socket's writer sends the close frame and ends; its Conn then
    // stops and gives its slot back. The slots count connections across
    // workers and say when the last one is gone.
    if tokio::time::timeout_at(deadline, slots.all_returned())
        .await
        .is_err()
    {
        warn!(
            left = slots.held(),
            "drain timeout: exiting with sockets still open"
        );
    }
}

/// Accept queue length asked of the kernel (capped by `net.core.somaxconn`):
/// a connect storm must queue, not see its SYNs dropped and retried a
/// second later.
pub const LISTEN_BACKLOG: u32 = 4096;

/// A listener on `addr` that other listeners of this process can share.
/// Linux never hands out a port another `SO_REUSEPORT` group holds for a
/// port-0 bind, so two gateways cannot end up sharing one.
fn listen(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.set_reuseport(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)?.into_std()
}

/// What a worker arbiter starts with.
struct Worker {
    index: usize,
    listener: std::net::TcpListener,
    store: Arc<dyn Store>,
    config: Arc<Config>,
    settings: ConnSettings,
    registry: Addr<PresenceRegistry>,
    health: Arc<Health>,
    /// Turns false when the node starts draining.
    accepting: watch::Receiver<bool>,
    origins: Arc<[OriginPattern]>,
    slots: Arc<ConnSlots>,
    refusal_log: Arc<LogLimiter>,
}

/// Starts a worker on a new arbiter, accepting on its listener; returns
/// the arbiter (its thread runs while a handle to it lives) and its
/// broadcaster.
async fn start_worker(worker: Worker) -> Option<(Arbiter, Addr<Broadcaster>)> {
    let arbiter = Arbiter::new();
    let (ready_tx, ready_rx) = oneshot::channel();
    arbiter.spawn_fn(move || {
        let hub = Rc::new(RefCell::new(Hub::default()));
        let broadcaster = Broadcaster::new(hub.clone()).start();
        let state = Rc::new(WorkerState {
            config: worker.config,
            conn: worker.settings,
            registry: RegistryLink::new(worker.registry),
            hub,
            store: worker.store,
            health: worker.health,
            origins: worker.origins,
            slots: worker.slots,
            refusal_log: worker.refusal_log,
        });
        let index = worker.index;
        match TcpListener::from_std(worker.listener) {
            Ok(listener) => {
                let _ = ready_tx.send(broadcaster);
                actix_rt::spawn(accept(index, listener, state, worker.accepting));
            }
            Err(error) => error!(worker = index, %error, "cannot use listener"),
        }
    });
    ready_rx
        .await
        .ok()
        .map(|broadcaster| (arbiter, broadcaster))
}

/// Accepts connections for one worker and serves each on it, until the
/// node drains (the listener is then closed).
async fn accept(
    index: usize,
    listener: TcpListener,
    state: Rc<WorkerState>,
    mut accepting: watch::Receiver<bool>,
) {
    loop {
        let accepted = tokio::select! {
            biased;
            _ = accepting.wait_for(|open| !open) => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((socket, _)) => {
                let _ = socket.set_nodelay(true);
                actix_rt::spawn(http::serve(socket, state.clone()));
            }
            Err(error) => {
                // Out of file descriptors and the like: back off instead of
                // spinning; existing connections keep working.
                error!(worker = index, %error, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(error) => {
            warn!(%error, "cannot watch SIGTERM");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
