//! presenced: a WebSocket presence gateway.
//!
//! Data flow, one node:
//!
//! ```text
//! socket ─► http (hyper, upgrade) ─► Conn (actor, one per socket, on a worker)
//!                                      │ Connected / Disconnected / ClientRequest
//!                                      ▼
//!                               PresenceRegistry (one per node)
//!                                      │ batch of ops ─► Store (memory | Redis, atomic)
//!                                      │ ◄─ outcomes: transitions decided by the store
//!                                      ▼ Dispatch (replies + events, serialized once)
//!                               Broadcaster (one per worker) ─► Outbox of each
//!                                                               subscribed Conn
//! ```
//!
//! [`server`] wires it together; [`protocol`] is the wire format;
//! [`store`] holds the truth.

pub mod auth;
pub mod broadcast;
pub mod config;
pub mod conn;
pub mod http;
pub mod ids;
pub mod logs;
pub mod metrics;
pub mod outbox;
pub mod protocol;
pub mod rate;
pub mod registry;
pub mod server;
pub mod store;
