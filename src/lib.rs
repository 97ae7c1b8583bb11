//! presenced: a WebSocket presence gateway.
//!
//! Data flow, one node:
//!
//! ```text
//! socket ─► http (hyper, upgrade) ─► Conn (actor, one per socket, on a worker)
//!                                      │ Notice: Connected / Disconnected / Request
//!                                      ▼
//!                               PresenceRegistry (one per node)
//!                                      │ batch of ops ─► Store (memory | Redis, atomic)
//!                                      │ ◄─ outcomes: the Events the store decided
//!                                      ▼ Dispatch (replies + events, serialized once)
//!                               Broadcaster (one per worker) ─► Outbox of each
//!                                                               subscribed Conn
//! ```
//!
//! [`server`] wires it together; [`protocol`] is the wire format;
//! [`store`] holds the truth.

pub mod auth;
pub mod broadcast;
pub mod close;
pub mod config;
pub mod conn;
pub mod health;
pub mod http;
pub mod ids;
pub mod linger;
pub mod logs;
pub mod metrics;
pub mod origin;
pub mod outbox;
pub mod protocol;
pub mod rate;
pub mod registry;
pub mod server;
pub mod slots;
pub mod store;
