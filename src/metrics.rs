//! Every Prometheus metric of the gateway, registered in one place.
//!
//! Hot paths never look labels up: each labelled family's children are
//! resolved once here, so counting a frame is one atomic add. Scraping
//! reads these atomics and the process's own figures; it never calls the
//! store (the cluster-wide user count is a gauge the registry refreshes on
//! a timer).

use std::sync::LazyLock;

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};

use strum::IntoEnumIterator;

use crate::{
    close::CloseReason,
    protocol::{ErrorCode, EventKind, RequestKind},
    store::Tally,
};

/// A client frame, as `presenced_frames_received_total{type}` counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Received {
    /// A request, by its kind.
    Request(RequestKind),
    /// A client frame dropped by the rate limit.
    RateLimited,
    /// A client frame that could not be decoded (text or binary).
    Invalid,
}

impl Received {
    fn all() -> impl Iterator<Item = Self> {
        RequestKind::iter()
            .map(Received::Request)
            .chain([Received::RateLimited, Received::Invalid])
    }

    fn label(self) -> &'static str {
        match self {
            Received::Request(kind) => kind.into(),
            Received::RateLimited => "rate_limited",
            Received::Invalid => "invalid",
        }
    }
}

/// A frame queued to a client, as `presenced_frames_sent_total{type}`
/// counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sent {
    /// `welcome`.
    Welcome,
    /// `reply`.
    Reply,
    /// `error`.
    Error,
    /// `pong`.
    Pong,
    /// A WebSocket ping.
    Ping,
    /// `sync` (current state after events may have been missed).
    Sync,
    /// An event, by its kind.
    Event(EventKind),
}

impl Sent {
    fn all() -> impl Iterator<Item = Self> {
        [
            Sent::Welcome,
            Sent::Reply,
            Sent::Error,
            Sent::Pong,
            Sent::Ping,
            Sent::Sync,
        ]
        .into_iter()
        .chain(EventKind::iter().map(Sent::Event))
    }

    fn label(self) -> &'static str {
        match self {
            Sent::Welcome => "welcome",
            Sent::Reply => "reply",
            Sent::Error => "error",
            Sent::Pong => "pong",
            Sent::Ping => "ping",
            Sent::Sync => "sync",
            Sent::Event(kind) => kind.into(),
        }
    }
}

/// Every error code a `/ws` handshake can be refused with (see
/// `HttpError`), and `request_header_too_large` for a request head over
/// the bound on any path; the first also counts any other.
const HANDSHAKE_REFUSALS: [&str; 19] = [
    "bad_handshake",
    "upgrade_required",
    "unsupported_version",
    "missing_user",
    "invalid_user",
    "invalid_meta",
    "meta_too_large",
    "not_ready",
    "missing_token",
    "invalid_token",
    "token_expired",
    "token_not_yet_valid",
    "invalid_audience",
    "invalid_issuer",
    "invalid_subject",
    "forbidden_origin",
    "too_many_connections",
    "node_full",
    "request_header_too_large",
];

/// A counter family with one child per value of a small enum, resolved
/// once, so counting never looks a label up.
pub struct Family<K> {
    keys: Vec<K>,
    children: Vec<IntCounter>,
}

impl<K: Copy + PartialEq> Family<K> {
    fn new(
        registry: &Registry,
        name: &str,
        help: &str,
        label: &str,
        keys: impl IntoIterator<Item = K>,
        label_of: fn(K) -> &'static str,
    ) -> Self {
        let vec = IntCounterVec::new(Opts::new(name, help), &[label]).expect("valid metric");
        registry
            .register(Box::new(vec.clone()))
            .expect("unique metric");
        let keys: Vec<K> = keys.into_iter().collect();
        let children = keys
            .iter()
            .map(|k| vec.with_label_values(&[label_of(*k)]))
            .collect();
        Self { keys, children }
    }

    /// The counter for `key`.
    pub fn get(&self, key: K) -> &IntCounter {
        let i = self.keys.iter().position(|k| *k == key).unwrap_or(0);
        &self.children[i]
    }
}

impl<K: std::fmt::Debug> std::fmt::Debug for Family<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Family").field("keys", &self.keys).finish()
    }
}

/// All of the gateway's metrics.
pub struct Metrics {
    registry: Registry,
    /// WebSocket connections open on this node.
    pub connections_open: IntGauge,
    /// Users online cluster-wide (cached, refreshed by the registry).
    pub users_online: IntGauge,
    /// WebSocket connections accepted since start.
    pub connections_opened: IntCounter,
    /// WebSocket connections ended, by reason.
    pub connections_closed: Family<CloseReason>,
    /// Client frames, by type.
    pub frames_received: Family<Received>,
    /// Frames queued to clients, by type.
    pub frames_sent: Family<Sent>,
    /// Error frames sent, by code.
    pub errors_sent: Family<ErrorCode>,
    /// Ops per store batch.
    pub batch_ops: Histogram,
    /// Store batch round trip, seconds.
    pub batch_seconds: Histogram,
    /// Store batches that failed (and were retried).
    pub batch_failures: IntCounter,
    /// Transitions decided by the store, by kind.
    pub events_published: Family<EventKind>,
    /// Transitions heard from the shared store's event channel, by kind.
    pub events_received: Family<EventKind>,
    /// Dead nodes this node reaped.
    pub nodes_reaped: IntCounter,
    /// Requests refused, or writes folded into a reassert, because the
    /// store queue was full.
    pub store_queue_overflows: IntCounter,
    /// Replies sent before the events preceding them arrived (events lost
    /// with the event subscription).
    pub replies_released_late: IntCounter,
    /// Offline graces started (a last connection ended), by scope.
    pub grace_started: Family<&'static str>,
    /// Offline graces ended by the user's return: flaps nobody saw.
    pub grace_cancelled: Family<&'static str>,
    /// Offline graces that ran out (the `offline`/`left` went out).
    pub grace_expired: Family<&'static str>,
    /// Users in the offline grace, cluster-wide (refreshed with
    /// `users_online`).
    pub users_in_grace: IntGauge,
    /// What reasserts found wrong in the store and fixed, by kind.
    pub reassert_corrections: Family<&'static str>,
    /// `/ws` handshakes refused before the upgrade, by error code.
    pub handshakes_refused: Family<&'static str>,
    /// Connections closed because their request head did not arrive in time.
    pub handshake_timeouts: IntCounter,
}

impl Metrics {
    fn new() -> Self {
        let r = Registry::new();
        let gauge = |name: &str, help: &str| {
            let g = IntGauge::new(name, help).expect("valid metric");
            r.register(Box::new(g.clone())).expect("unique metric");
            g
        };
        let counter = |name: &str, help: &str| {
            let c = IntCounter::new(name, help).expect("valid metric");
            r.register(Box::new(c.clone())).expect("unique metric");
            c
        };
        let histogram = |name: &str, help: &str, buckets: Vec<f64>| {
            let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))
                .expect("valid metric");
            r.register(Box::new(h.clone())).expect("unique metric");
            h
        };
        #[cfg(target_os = "linux")]
        r.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))
        .expect("unique metric");
        Self {
            connections_open: gauge(
                "presenced_connections_open",
                "WebSocket connections open on this node.",
            ),
            users_online: gauge(
                "presenced_users_online",
                "Users online (a live connection, or in the offline grace), cluster-wide (refreshed every few seconds).",
            ),
            connections_opened: counter(
                "presenced_connections_opened_total",
                "WebSocket connections accepted on this node.",
            ),
            connections_closed: Family::new(
                &r,
                "presenced_connections_closed_total",
                "WebSocket connections ended on this node, by reason.",
                "reason",
                CloseReason::ALL,
                CloseReason::label,
            ),
            frames_received: Family::new(
                &r,
                "presenced_frames_received_total",
                "Client frames received, by type.",
                "type",
                Received::all(),
                Received::label,
            ),
            frames_sent: Family::new(
                &r,
                "presenced_frames_sent_total",
                "Frames queued to clients, by type.",
                "type",
                Sent::all(),
                Sent::label,
            ),
            errors_sent: Family::new(
                &r,
                "presenced_errors_sent_total",
                "Error frames sent to clients, by code.",
                "code",
                ErrorCode::iter(),
                <&'static str>::from,
            ),
            batch_ops: histogram(
                "presenced_store_batch_ops",
                "Ops written to the presence store per batch.",
                vec![1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 512.0, 1024.0],
            ),
            batch_seconds: histogram(
                "presenced_store_batch_duration_seconds",
                "Round trip of one presence store batch, seconds.",
                vec![
                    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5,
                    1.0, 5.0,
                ],
            ),
            batch_failures: counter(
                "presenced_store_batch_failures_total",
                "Presence store batches that failed and were queued for retry.",
            ),
            events_published: Family::new(
                &r,
                "presenced_events_published_total",
                "Presence transitions decided by the store for this node's ops, by kind.",
                "kind",
                EventKind::iter(),
                <&'static str>::from,
            ),
            events_received: Family::new(
                &r,
                "presenced_events_received_total",
                "Presence transitions received from the shared store's event channel, by kind.",
                "kind",
                EventKind::iter(),
                <&'static str>::from,
            ),
            nodes_reaped: counter(
                "presenced_nodes_reaped_total",
                "Dead nodes (expired leases) whose connections this node removed.",
            ),
            store_queue_overflows: counter(
                "presenced_store_queue_overflows_total",
                "Requests answered `unavailable`, or queued writes folded into a reassert, because the store queue was full.",
            ),
            replies_released_late: counter(
                "presenced_replies_released_late_total",
                "Replies sent without waiting any longer for the events before them (event subscription lost).",
            ),
            grace_started: Family::new(
                &r,
                "presenced_offline_grace_started_total",
                "Offline graces started by this node: a user's last connection (scope user) or a member's last connection in a room (scope room) ended after-grace.",
                "scope",
                GRACE_SCOPES,
                |scope| scope,
            ),
            grace_cancelled: Family::new(
                &r,
                "presenced_offline_grace_cancelled_total",
                "Offline graces this node ended because the user came back in time: flaps no observer saw.",
                "scope",
                GRACE_SCOPES,
                |scope| scope,
            ),
            grace_expired: Family::new(
                &r,
                "presenced_offline_grace_expired_total",
                "Offline graces this node ended because they ran out (their offline or left went out).",
                "scope",
                GRACE_SCOPES,
                |scope| scope,
            ),
            users_in_grace: gauge(
                "presenced_users_in_grace",
                "Users in the offline grace, online with no live connection, cluster-wide (refreshed every few seconds).",
            ),
            reassert_corrections: Family::new(
                &r,
                "presenced_reassert_corrections_total",
                "What this node's reasserts found wrong in the store and fixed: connection records, user counts, room counts.",
                "kind",
                CORRECTIONS,
                |kind| kind,
            ),
            handshakes_refused: Family::new(
                &r,
                "presenced_handshakes_refused_total",
                "WebSocket handshakes refused before the upgrade, by error code.",
                "code",
                HANDSHAKE_REFUSALS,
                |code| code,
            ),
            handshake_timeouts: counter(
                "presenced_handshake_timeouts_total",
                "Connections closed because the HTTP request head did not arrive within --handshake-timeout-ms.",
            ),
            registry: r,
        }
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        // unwrap: encoding into a Vec cannot fail for well-formed families.
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .unwrap();
        String::from_utf8(out).unwrap_or_default()
    }
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

/// The scopes of the grace counters.
const GRACE_SCOPES: [&str; 2] = ["user", "room"];
/// The kinds of reassert corrections.
const CORRECTIONS: [&str; 3] = ["connections", "user_counts", "room_counts"];

impl Metrics {
    /// Counts what a store op did besides its events.
    pub fn count_tally(&self, tally: &Tally) {
        let counts = [
            (&self.grace_started, "user", tally.grace_started_users),
            (&self.grace_started, "room", tally.grace_started_rooms),
            (&self.grace_cancelled, "user", tally.grace_cancelled_users),
            (&self.grace_cancelled, "room", tally.grace_cancelled_rooms),
            (&self.grace_expired, "user", tally.grace_expired_users),
            (&self.grace_expired, "room", tally.grace_expired_rooms),
            (
                &self.reassert_corrections,
                "connections",
                tally.corrected_connections,
            ),
            (
                &self.reassert_corrections,
                "user_counts",
                tally.corrected_user_counts,
            ),
            (
                &self.reassert_corrections,
                "room_counts",
                tally.corrected_room_counts,
            ),
        ];
        for (family, key, n) in counts {
            if n > 0 {
                family.get(key).inc_by(n);
            }
        }
    }
}

/// The process-wide metrics.
pub fn metrics() -> &'static Metrics {
    static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);
    &METRICS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_family_has_all_its_children_from_the_start() {
        let text = metrics().render();
        for needle in [
            "presenced_connections_closed_total{reason=\"slow_consumer\"} ",
            "presenced_frames_received_total{type=\"invalid\"} ",
            "presenced_frames_sent_total{type=\"left\"} ",
            "presenced_errors_sent_total{code=\"not_joined\"} ",
            "presenced_events_published_total{kind=\"online\"} ",
            "presenced_store_batch_duration_seconds_bucket",
            "presenced_handshakes_refused_total{code=\"node_full\"} ",
            "presenced_connections_closed_total{reason=\"token_expired\"} ",
            "presenced_errors_sent_total{code=\"forbidden\"} ",
            "presenced_handshake_timeouts_total ",
        ] {
            assert!(text.contains(needle), "missing {needle} in\n{text}");
        }
    }
}
