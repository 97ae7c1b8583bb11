//! Black-box harness for the `presenced` integration tests.
//!
//! Tests talk to the real binary over real sockets, exactly as a browser or
//! an operator would; nothing here links against the gateway's library. The
//! harness hides ports and processes so that a test reads like the scenario
//! it checks:
//!
//! - [`RedisServer`] runs a private `redis-server` on a free port,
//! - [`Gateway`] runs `presenced` on `127.0.0.1:0` and learns its port from
//!   the one line it prints on stdout,
//! - [`Client`] is a WebSocket tab that keeps reading in the background (so
//!   it answers the server's pings) and buffers frames so none is lost,
//! - [`SilentClient`] completes the handshake and then never reads again, so
//!   it never answers a ping,
//! - [`http`] is a tiny HTTP/1.1 client for the plain-HTTP refusals.
//!
//! Every wait is bounded: a gateway that does not answer makes a test fail,
//! never hang. The only fixed-length waits are the short quiet windows of
//! negative assertions ("nothing arrives").

// Each test crate uses a different part of the harness.
// Its items are `pub` for the test crates, each a crate of its own.
#![allow(dead_code, unused_imports, unused_macros, unreachable_pub)]

pub mod client;
pub mod gateway;
pub mod http;
pub mod matchers;
pub mod raw_ws;
pub mod redis_server;

use std::{future::Future, time::Duration};

pub use client::{Client, UserState};
pub use gateway::Gateway;
pub use matchers::*;
pub use raw_ws::SilentClient;
pub use redis_server::RedisServer;

/// How long a test waits for something the protocol says must happen.
pub const EVENT_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a test listens before concluding that nothing arrives. Used only
/// for negative assertions.
pub const QUIET_WINDOW: Duration = Duration::from_millis(300);

/// Upper bound for a whole scenario, so that a hung gateway fails the test.
pub const SCENARIO_TIMEOUT: Duration = Duration::from_secs(120);

/// The presence store a gateway under test runs against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// No `--redis`: the in-process store.
    Memory,
    /// A private `redis-server` started for this test.
    Redis,
}

/// A gateway and, for [`Backend::Redis`], the Redis server it uses. Both
/// processes die when this is dropped.
pub struct Deployment {
    pub gateway: Gateway,
    pub redis: Option<RedisServer>,
}

impl Deployment {
    /// The Redis server; panics for the memory backend.
    pub fn redis(&self) -> &RedisServer {
        self.redis
            .as_ref()
            .expect("this deployment runs on the memory store")
    }
}

impl Backend {
    /// Starts a `--dev` gateway on this store with `extra_args`.
    pub async fn start(self, extra_args: &[&str]) -> Deployment {
        match self {
            Backend::Memory => Deployment {
                gateway: Gateway::memory(extra_args).await,
                redis: None,
            },
            Backend::Redis => {
                let redis = RedisServer::start().await;
                let gateway = Gateway::redis(&redis, extra_args).await;
                Deployment {
                    gateway,
                    redis: Some(redis),
                }
            }
        }
    }
}

/// Scenarios of one test binary share this lock; a scenario that measures
/// load (how many Redis transactions a storm costs) holds it alone, so the
/// other scenarios' gateways do not share the two cores with it.
static SCENARIOS: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

/// Runs a scenario with an overall deadline, beside other scenarios.
pub async fn within_scenario_timeout(scenario: impl Future<Output = ()>) {
    let _shared = SCENARIOS.read().await;
    run_with_deadline(scenario).await;
}

/// Runs a load-measuring scenario with an overall deadline, alone.
pub async fn alone_within_scenario_timeout(scenario: impl Future<Output = ()>) {
    let _alone = SCENARIOS.write().await;
    run_with_deadline(scenario).await;
}

async fn run_with_deadline(scenario: impl Future<Output = ()>) {
    if tokio::time::timeout(SCENARIO_TIMEOUT, scenario)
        .await
        .is_err()
    {
        panic!("scenario did not finish within {SCENARIO_TIMEOUT:?}");
    }
}

/// Instantiates a scenario `async fn(Backend)` once per store:
///
/// ```ignore
/// on_both_stores!(three_tabs_one_online_event =>
///     three_tabs_one_online_event_memory, three_tabs_one_online_event_redis);
/// ```
macro_rules! on_both_stores {
    (alone $scenario:ident => $memory:ident, $redis:ident) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $memory() {
            $crate::support::alone_within_scenario_timeout($scenario(
                $crate::support::Backend::Memory,
            ))
            .await
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $redis() {
            $crate::support::alone_within_scenario_timeout($scenario(
                $crate::support::Backend::Redis,
            ))
            .await
        }
    };
    ($scenario:ident => $memory:ident, $redis:ident) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $memory() {
            $crate::support::within_scenario_timeout($scenario($crate::support::Backend::Memory))
                .await
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $redis() {
            $crate::support::within_scenario_timeout($scenario($crate::support::Backend::Redis))
                .await
        }
    };
}
pub(crate) use on_both_stores;
