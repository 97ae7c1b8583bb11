//! `presenced-load`: the load and correctness tool of presenced.
//!
//! Data flow of a run: [`options::Options`] name the gateways
//! ([`target::Target`]) and the load; [`scenario::run`] connects the
//! [`observer::Observer`]s (watch every user, join every room), then drives
//! [`user::User`]s (each a sequence of [`tab::Tab`] opens and closes that
//! records the true transitions) while the observers check every event;
//! at the end it compares the gateway's `query` and `room` answers with the
//! truth, twice (tabs held, tabs closed), and returns a [`report::Report`].
//! Counters shared while running live in [`stats::Shared`].
//!
//! Correctness is not optional: a run without observers is refused.

pub mod observer;
pub mod options;
pub mod report;
pub mod rng;
pub mod scenario;
pub mod stats;
pub mod tab;
pub mod target;
pub mod user;

pub use options::{Options, Scenario};
pub use report::Report;
pub use scenario::run;
