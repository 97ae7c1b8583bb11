//! Configuration: one struct, parsed from flags and `PRESENCED_*` env vars,
//! validated in one place, logged once at start. It imports only leaves
//! (the origin patterns it validates).

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::Parser;

use crate::origin::OriginPattern;

/// Default listen address: loopback, so a bare `cargo run` is private.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
/// Default Redis key prefix.
pub const DEFAULT_PREFIX: &str = "presence";
/// Default interval between server pings, in milliseconds.
pub const DEFAULT_HEARTBEAT_MS: u64 = 25_000;
/// Default silence after which a connection is closed, in milliseconds.
pub const DEFAULT_IDLE_TIMEOUT_MS: u64 = 60_000;
/// Default most ops in one store batch.
pub const DEFAULT_BATCH_MAX: usize = 512;
/// Default shortest time from a batch's return to the next batch's start, in milliseconds.
pub const DEFAULT_BATCH_LINGER_MS: u64 = 5;
/// Default largest accepted client message, in bytes.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 64 * 1024;
/// Default most frames queued for one connection.
pub const DEFAULT_OUTBOX_MESSAGES: usize = 1024;
/// Default most bytes queued for one connection.
pub const DEFAULT_OUTBOX_BYTES: usize = 1024 * 1024;
/// Default longest `users` list in one request.
pub const DEFAULT_MAX_IDS: usize = 1000;
/// Default largest connection metadata, in bytes.
pub const DEFAULT_MAX_META_BYTES: usize = 1024;
/// Default largest room state of an `update`, in bytes.
pub const DEFAULT_MAX_STATE_BYTES: usize = 1024;
/// Default `update` frames a connection may send per second.
pub const DEFAULT_MAX_UPDATE_RATE: u32 = 120;
/// Default room-state writes per connection and room per second.
pub const DEFAULT_STATE_RATE: u32 = 10;
/// Default largest page of the `/v1` API.
pub const DEFAULT_MAX_PAGE: usize = 1000;
/// Default node lease length, in milliseconds.
pub const DEFAULT_NODE_LEASE_MS: u64 = 5_000;
/// Default bound on a graceful drain, in milliseconds.
pub const DEFAULT_DRAIN_TIMEOUT_MS: u64 = 10_000;
/// Default bound on requests waiting for the store.
pub const DEFAULT_MAX_PENDING: usize = 10_000;
/// Default clock leeway for token `exp`, `nbf` and `iat`, seconds.
pub const DEFAULT_JWT_LEEWAY_S: u64 = 30;
/// Default sustained client messages per connection per second.
pub const DEFAULT_RATE_LIMIT: u32 = 20;
/// Default client messages a connection may send at once above the rate.
pub const DEFAULT_RATE_BURST: u32 = 50;
/// Default most rooms one connection may be in.
pub const DEFAULT_MAX_ROOMS: usize = 100;
/// Default most users one connection may watch.
pub const DEFAULT_MAX_WATCH: usize = 1000;
/// Default most connections of one user on one node.
pub const DEFAULT_MAX_CONNS_PER_USER: usize = 50;
/// Default most WebSocket connections on one node: under the 20,000 open
/// files a process may hold here, leaving room for handshakes in progress,
/// the listeners and the Redis connections.
pub const DEFAULT_MAX_CONNECTIONS: usize = 19_000;
/// Default offline grace: how long a user whose last connection ended
/// (other than by signing out) stays online, in milliseconds.
pub const DEFAULT_OFFLINE_GRACE_MS: u64 = 5_000;
/// Default longest time a client may take to send its HTTP request head.
pub const DEFAULT_HANDSHAKE_TIMEOUT_MS: u64 = 10_000;
/// Default largest HTTP request head (request line and headers), in bytes:
/// a browser's handshake with a token and cookies is a few KiB.
pub const DEFAULT_MAX_REQUEST_HEAD_BYTES: usize = 16 * 1024;
/// Default interval between counts of the log lines held back, in milliseconds.
pub const DEFAULT_LOG_SUMMARY_MS: u64 = 10_000;

/// presenced: a WebSocket presence gateway.
#[derive(Debug, Clone, Parser)]
#[command(name = "presenced", version, about)]
pub struct Config {
    /// Address to listen on (HTTP, WebSocket, metrics share it).
    #[arg(long, env = "PRESENCED_LISTEN", default_value = DEFAULT_LISTEN)]
    pub listen: SocketAddr,

    /// Redis URL (redis://host:port/db). Without it presence lives in this
    /// process only (one node).
    #[arg(long, env = "PRESENCED_REDIS")]
    pub redis: Option<String>,

    /// Prefix of every Redis key. Use a hash tag ("{presence}") on Redis Cluster.
    #[arg(long, env = "PRESENCED_PREFIX", default_value = DEFAULT_PREFIX)]
    pub prefix: String,

    /// Development mode: the user id comes from `?user=` (loopback only).
    #[arg(long, env = "PRESENCED_DEV")]
    pub dev: bool,

    /// Worker threads holding connections [default: number of cores].
    #[arg(long, env = "PRESENCED_WORKERS")]
    pub workers: Option<usize>,

    /// Interval between server pings, milliseconds.
    #[arg(long, env = "PRESENCED_HEARTBEAT_MS", default_value_t = DEFAULT_HEARTBEAT_MS)]
    pub heartbeat_ms: u64,

    /// Close a connection that sent nothing (no frame, no pong) this long, milliseconds.
    #[arg(long, env = "PRESENCED_IDLE_TIMEOUT_MS", default_value_t = DEFAULT_IDLE_TIMEOUT_MS)]
    pub idle_timeout_ms: u64,

    /// Most ops written to the store in one batch.
    #[arg(long, env = "PRESENCED_BATCH_MAX", default_value_t = DEFAULT_BATCH_MAX)]
    pub batch_max: usize,

    /// Shortest time from a batch's return to the next batch's start,
    /// milliseconds; an op arriving after a quiet spell is written at once.
    #[arg(long, env = "PRESENCED_BATCH_LINGER_MS", default_value_t = DEFAULT_BATCH_LINGER_MS)]
    pub batch_linger_ms: u64,

    /// Largest accepted client message or frame, bytes (bigger: close 1009).
    #[arg(long, env = "PRESENCED_MAX_MESSAGE_BYTES", default_value_t = DEFAULT_MAX_MESSAGE_BYTES)]
    pub max_message_bytes: usize,

    /// Most frames queued for one connection before it counts as a slow consumer.
    #[arg(long, env = "PRESENCED_OUTBOX_MESSAGES", default_value_t = DEFAULT_OUTBOX_MESSAGES)]
    pub outbox_messages: usize,

    /// Most bytes queued for one connection before it counts as a slow consumer.
    #[arg(long, env = "PRESENCED_OUTBOX_BYTES", default_value_t = DEFAULT_OUTBOX_BYTES)]
    pub outbox_bytes: usize,

    /// Longest `users` list accepted in one request.
    #[arg(long, env = "PRESENCED_MAX_IDS", default_value_t = DEFAULT_MAX_IDS)]
    pub max_ids: usize,

    /// Bearer key required by the `/v1` HTTP API. Without it `/v1` answers
    /// only on a loopback listen address.
    #[arg(long, env = "PRESENCED_API_KEY", hide_env_values = true)]
    pub api_key: Option<Secret>,

    /// Largest connection metadata (a JSON object), bytes.
    #[arg(long, env = "PRESENCED_MAX_META_BYTES", default_value_t = DEFAULT_MAX_META_BYTES)]
    pub max_meta_bytes: usize,

    /// Largest room state (the JSON object of an `update`), bytes.
    #[arg(long, env = "PRESENCED_MAX_STATE_BYTES", default_value_t = DEFAULT_MAX_STATE_BYTES)]
    pub max_state_bytes: usize,

    /// `update` frames a connection may send per second (with a burst of
    /// as many), counted apart from --rate-limit; past it they are refused
    /// with `rate_limited`, and a client that keeps on is closed with 4029.
    #[arg(long, env = "PRESENCED_MAX_UPDATE_RATE", default_value_t = DEFAULT_MAX_UPDATE_RATE)]
    pub max_update_rate: u32,

    /// Room-state writes per connection and room per second: an `update`
    /// arriving sooner waits, and a later one replaces it (latest wins).
    #[arg(long, env = "PRESENCED_STATE_RATE", default_value_t = DEFAULT_STATE_RATE)]
    pub state_rate: u32,

    /// Largest page of users the `/v1` API returns.
    #[arg(long, env = "PRESENCED_MAX_PAGE", default_value_t = DEFAULT_MAX_PAGE)]
    pub max_page: usize,

    /// How long a node counts as alive after each lease refresh, milliseconds.
    #[arg(long, env = "PRESENCED_NODE_LEASE_MS", default_value_t = DEFAULT_NODE_LEASE_MS)]
    pub node_lease_ms: u64,

    /// On SIGTERM/SIGINT, longest the drain (write the removals, close the
    /// sockets with 1012) may take before the process exits anyway,
    /// milliseconds.
    #[arg(long, env = "PRESENCED_DRAIN_TIMEOUT_MS", default_value_t = DEFAULT_DRAIN_TIMEOUT_MS)]
    pub drain_timeout_ms: u64,

    /// Most client requests that may wait for the presence store (during
    /// an outage); past it they are answered `unavailable` at once.
    #[arg(long, env = "PRESENCED_MAX_PENDING", default_value_t = DEFAULT_MAX_PENDING)]
    pub max_pending: usize,

    /// HS256 secret that signs client tokens (JWT). Prefer
    /// --jwt-secret-file: a command line is visible to other local users.
    #[arg(long, env = "PRESENCED_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<Secret>,

    /// File holding the HS256 secret (surrounding whitespace is trimmed).
    #[arg(long, env = "PRESENCED_JWT_SECRET_FILE")]
    pub jwt_secret_file: Option<PathBuf>,

    /// PEM public key that verifies client tokens: an RSA key accepts
    /// RS256 tokens only, a P-256 EC key ES256 tokens only.
    #[arg(long, env = "PRESENCED_JWT_PUBLIC_KEY_FILE")]
    pub jwt_public_key_file: Option<PathBuf>,

    /// Required `aud` of client tokens.
    #[arg(long, env = "PRESENCED_JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,

    /// Required `iss` of client tokens.
    #[arg(long, env = "PRESENCED_JWT_ISSUER")]
    pub jwt_issuer: Option<String>,

    /// Clock leeway for token `exp`, `nbf` and `iat`, seconds.
    #[arg(long, env = "PRESENCED_JWT_LEEWAY_S", default_value_t = DEFAULT_JWT_LEEWAY_S)]
    pub jwt_leeway_s: u64,

    /// Origin allowed to open a WebSocket (repeatable): exact
    /// (`https://app.example.com`) or a subdomain wildcard
    /// (`https://*.example.com`, `*.example.com` for any scheme). When any
    /// is set, a handshake with another or no Origin gets 403.
    #[arg(
        long = "allowed-origin",
        env = "PRESENCED_ALLOWED_ORIGINS",
        value_delimiter = ','
    )]
    pub allowed_origins: Vec<String>,

    /// Sustained client messages per connection per second; past it and
    /// the burst, messages are refused with `rate_limited`.
    #[arg(long, env = "PRESENCED_RATE_LIMIT", default_value_t = DEFAULT_RATE_LIMIT)]
    pub rate_limit: u32,

    /// Client messages a connection may send at once above the rate; a
    /// client that goes on sending this many more while refused is closed
    /// with 4029.
    #[arg(long, env = "PRESENCED_RATE_BURST", default_value_t = DEFAULT_RATE_BURST)]
    pub rate_burst: u32,

    /// How long a user whose last connection ended, other than by signing
    /// out (the client's Close 1000), stays online, milliseconds; a
    /// connection of theirs within it, on any node, means nobody sees them
    /// go. Room memberships likewise, except an explicit `leave`. 0: off.
    #[arg(long, env = "PRESENCED_OFFLINE_GRACE_MS", default_value_t = DEFAULT_OFFLINE_GRACE_MS)]
    pub offline_grace_ms: u64,

    /// Most rooms one connection may be in.
    #[arg(long, env = "PRESENCED_MAX_ROOMS", default_value_t = DEFAULT_MAX_ROOMS)]
    pub max_rooms: usize,

    /// Most users one connection may watch.
    #[arg(long, env = "PRESENCED_MAX_WATCH", default_value_t = DEFAULT_MAX_WATCH)]
    pub max_watch: usize,

    /// Most WebSocket connections of one user on this node (more: 429).
    #[arg(long, env = "PRESENCED_MAX_CONNS_PER_USER", default_value_t = DEFAULT_MAX_CONNS_PER_USER)]
    pub max_conns_per_user: usize,

    /// Most WebSocket connections on this node (more: 503).
    #[arg(long, env = "PRESENCED_MAX_CONNECTIONS", default_value_t = DEFAULT_MAX_CONNECTIONS)]
    pub max_connections: usize,

    /// Longest time a client may take to send its HTTP request head
    /// (slowloris), milliseconds.
    #[arg(long, env = "PRESENCED_HANDSHAKE_TIMEOUT_MS", default_value_t = DEFAULT_HANDSHAKE_TIMEOUT_MS)]
    pub handshake_timeout_ms: u64,

    /// Largest HTTP request head (request line and headers), bytes; a
    /// longer one is answered 431 and the connection closed.
    #[arg(long, env = "PRESENCED_MAX_REQUEST_HEAD_BYTES", default_value_t = DEFAULT_MAX_REQUEST_HEAD_BYTES)]
    pub max_request_head_bytes: usize,

    /// Interval between the log lines counting what was not logged one by
    /// one (a kind of line, such as a refused handshake's code, past 5 a
    /// second), milliseconds.
    #[arg(long, env = "PRESENCED_LOG_SUMMARY_MS", default_value_t = DEFAULT_LOG_SUMMARY_MS)]
    pub log_summary_ms: u64,
}

/// A secret from the command line or environment. Its `Debug` says only
/// that it is set, so logging a config never prints it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// The secret itself, for comparing.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::str::FromStr for Secret {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Self(s.to_owned()))
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(set)")
    }
}

/// A configuration the gateway refuses to start with.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// `--dev` on an address other machines can reach.
    #[error(
        "--dev takes the user id from the URL, so anyone could be anyone: it only runs on a \
         loopback address (127.0.0.1, ::1), not on {0}"
    )]
    DevNotLoopback(SocketAddr),
    /// No way to tell who a connection is.
    #[error(
        "no identity source configured: pass --jwt-secret-file, --jwt-secret or \
         --jwt-public-key-file to verify client tokens, or --dev for local development \
         (user id from ?user=, loopback only)"
    )]
    NoIdentity,
    /// A value out of its range.
    #[error("{0}")]
    Invalid(String),
}

impl Config {
    /// Checks everything that can be checked before starting.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |m: &str| Err(ConfigError::Invalid(m.to_owned()));
        if self.dev && !self.listen.ip().is_loopback() {
            return Err(ConfigError::DevNotLoopback(self.listen));
        }
        let keys = usize::from(self.jwt_secret.is_some())
            + usize::from(self.jwt_secret_file.is_some())
            + usize::from(self.jwt_public_key_file.is_some());
        if keys > 1 {
            return invalid(
                "give one token key: --jwt-secret, --jwt-secret-file or --jwt-public-key-file",
            );
        }
        if !self.dev && keys == 0 {
            return Err(ConfigError::NoIdentity);
        }
        if self.rate_limit == 0 || self.rate_burst == 0 {
            return invalid("--rate-limit and --rate-burst must be at least 1");
        }
        if self.max_update_rate == 0 || self.state_rate == 0 {
            return invalid("--max-update-rate and --state-rate must be at least 1");
        }
        if self.max_rooms == 0 || self.max_watch == 0 {
            return invalid("--max-rooms and --max-watch must be at least 1");
        }
        if self.max_conns_per_user == 0 || self.max_connections == 0 {
            return invalid("--max-conns-per-user and --max-connections must be at least 1");
        }
        if let Some(bad) = self
            .allowed_origins
            .iter()
            .find(|o| OriginPattern::parse(o).is_none())
        {
            return Err(ConfigError::Invalid(format!(
                "--allowed-origin {bad:?} is not an origin: give scheme://host[:port], \
                 optionally with *. before the host (https://*.example.com)"
            )));
        }
        if self.handshake_timeout_ms == 0 {
            return invalid("--handshake-timeout-ms must be at least 1");
        }
        // Under 1 KiB a handshake with a token in its URL no longer fits.
        if self.max_request_head_bytes < 1024 {
            return invalid("--max-request-head-bytes must be at least 1024");
        }
        if self.log_summary_ms < 100 {
            return invalid("--log-summary-ms must be at least 100");
        }
        if self.prefix.is_empty() || self.prefix.contains(char::is_whitespace) {
            return invalid("--prefix must be non-empty and without spaces");
        }
        if self.workers == Some(0) {
            return invalid("--workers must be at least 1");
        }
        if self.heartbeat_ms == 0 {
            return invalid("--heartbeat-ms must be at least 1");
        }
        if self.idle_timeout_ms <= self.heartbeat_ms {
            return invalid("--idle-timeout-ms must be longer than --heartbeat-ms");
        }
        if self.batch_max == 0 {
            return invalid("--batch-max must be at least 1");
        }
        if self.max_message_bytes < 1024 {
            return invalid("--max-message-bytes must be at least 1024");
        }
        if self.outbox_messages == 0 || self.outbox_bytes < self.max_message_bytes {
            return invalid(
                "--outbox-messages must be at least 1 and --outbox-bytes at least --max-message-bytes",
            );
        }
        if self.max_ids == 0 {
            return invalid("--max-ids must be at least 1");
        }
        if self.max_page == 0 {
            return invalid("--max-page must be at least 1");
        }
        if self.api_key.as_ref().is_some_and(|k| k.expose().is_empty()) {
            return invalid("--api-key must not be empty");
        }
        if self.node_lease_ms < 1000 {
            return invalid("--node-lease-ms must be at least 1000");
        }
        if self.max_pending == 0 {
            return invalid("--max-pending must be at least 1");
        }
        Ok(())
    }

    /// Worker count, resolving the default.
    pub fn worker_count(&self) -> usize {
        self.workers.unwrap_or_else(|| {
            std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
        })
    }

    /// Server ping interval.
    pub fn heartbeat(&self) -> Duration {
        Duration::from_millis(self.heartbeat_ms)
    }

    /// Idle timeout.
    pub fn idle_timeout(&self) -> Duration {
        Duration::from_millis(self.idle_timeout_ms)
    }

    /// Node lease length.
    pub fn node_lease(&self) -> Duration {
        Duration::from_millis(self.node_lease_ms)
    }

    /// The offline grace.
    pub fn offline_grace(&self) -> Duration {
        Duration::from_millis(self.offline_grace_ms)
    }

    /// How often due graces are ended: a twentieth of the grace, from 50 ms
    /// to 1 s, so an `offline` comes at most 5% late; `None` without one.
    pub fn grace_check(&self) -> Option<Duration> {
        (self.offline_grace_ms > 0)
            .then(|| Duration::from_millis((self.offline_grace_ms / 20).clamp(50, 1000)))
    }

    /// Bound on a graceful drain.
    pub fn drain_timeout(&self) -> Duration {
        Duration::from_millis(self.drain_timeout_ms)
    }

    /// Longest time a client may take to send its request head.
    pub fn handshake_timeout(&self) -> Duration {
        Duration::from_millis(self.handshake_timeout_ms)
    }

    /// Interval between counts of held-back log lines.
    pub fn log_summary(&self) -> Duration {
        Duration::from_millis(self.log_summary_ms)
    }

    /// Whether the `/v1` API may answer: with a key, or on loopback only.
    pub fn api_open(&self) -> bool {
        self.api_key.is_some() || self.listen.ip().is_loopback()
    }

    /// The Redis URL with any password replaced, for logs.
    pub fn redis_for_log(&self) -> String {
        match &self.redis {
            None => "not set (in-memory store)".to_owned(),
            Some(url) => match url.rsplit_once('@') {
                Some((creds, host)) => {
                    let scheme = creds.split_once("://").map_or("redis", |(s, _)| s);
                    format!("{scheme}://***@{host}")
                }
                None => url.clone(),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Config {
        Config::try_parse_from(std::iter::once("presenced").chain(args.iter().copied())).unwrap()
    }

    #[test]
    fn dev_is_refused_off_loopback() {
        let c = parse(&["--dev", "--listen", "0.0.0.0:8080"]);
        assert!(matches!(c.validate(), Err(ConfigError::DevNotLoopback(_))));
        assert_eq!(parse(&["--dev", "--listen", "[::1]:0"]).validate(), Ok(()));
    }

    #[test]
    fn no_identity_source_is_refused() {
        assert_eq!(parse(&[]).validate(), Err(ConfigError::NoIdentity));
        assert_eq!(parse(&["--jwt-secret", "s"]).validate(), Ok(()));
        assert!(matches!(
            parse(&["--jwt-secret", "s", "--jwt-public-key-file", "k.pem"]).validate(),
            Err(ConfigError::Invalid(_))
        ));
    }

    #[test]
    fn out_of_range_values_are_refused() {
        for args in [
            &["--dev", "--workers", "0"][..],
            &[
                "--dev",
                "--heartbeat-ms",
                "1000",
                "--idle-timeout-ms",
                "1000",
            ],
            &["--dev", "--batch-max", "0"],
            &["--dev", "--max-message-bytes", "10"],
            &["--dev", "--prefix", "a b"],
            &["--dev", "--max-request-head-bytes", "1023"],
            &["--dev", "--log-summary-ms", "99"],
        ] {
            assert!(
                matches!(parse(args).validate(), Err(ConfigError::Invalid(_))),
                "{args:?}"
            );
        }
    }

    #[test]
    fn request_heads_are_capped_at_16_kib_unless_told() {
        assert_eq!(parse(&["--dev"]).max_request_head_bytes, 16384);
        let c = parse(&["--dev", "--max-request-head-bytes", "1024"]);
        assert_eq!((c.max_request_head_bytes, c.validate()), (1024, Ok(())));
    }

    #[test]
    fn the_api_needs_a_key_off_loopback() {
        assert!(parse(&["--dev"]).api_open());
        let mut c = parse(&["--dev", "--listen", "0.0.0.0:8080"]);
        assert!(!c.api_open());
        c.api_key = Some("k".parse().unwrap());
        assert!(c.api_open());
        assert!(
            !format!("{c:?}").contains("\"k\""),
            "the key is never in Debug output"
        );
    }

    #[test]
    fn redis_password_is_not_logged() {
        let c = parse(&["--dev", "--redis", "redis://user:secret@h:6379/0"]);
        assert_eq!(c.redis_for_log(), "redis://***@h:6379/0");
    }
}
