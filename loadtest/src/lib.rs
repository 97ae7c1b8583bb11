//! `presenced-load`: the load and correctness tool of presenced.
//!
//! Data flow of a run: [`options::Options`] name the gateways
//! ([`target::Target`]) and the load, [`layout::Layout`] the run's users,
//! rooms and observers. [`scenario::run`] (the coordinator) connects the
//! [`observer::Observer`]s (watch every user, join every room), then has
//! one [`shard`] per process (`--procs`, [`worker`]) drive its
//! [`user::User`]s: each a sequence of [`tab::Tab`] opens, closes, joins and
//! leaves that records its true transitions ([`truth::TruthLog`]). Tabs and
//! observers share one set of socket helpers ([`ws`]: connect and welcome,
//! the step timeout). In `fanout` every tab is also a receiver whose room
//! events its shard checks exactly ([`truth::check_window`], which counts
//! into [`truth::EventChecks`]). After the actions the coordinator
//! waits for the observers to reach the truth the shards report, compares
//! the gateway's `query` and `room` answers with it, twice (tabs held,
//! tabs closed), checks each observer event against the shards' truth logs
//! and returns a [`report::Report`]. Counters shared while running live in
//! [`stats::Shared`] (errors by kind, the first of each said in full with
//! its [`step::Step`]); every stamp is on the run's [`clock::RunClock`].
//!
//! A run that cannot finish (an observer the gateway closed, a shard that
//! stopped) returns a [`failure::Failure`] instead: the observer's
//! [`observer::ObserverError`] or the shard's [`shard::ShardFailure`],
//! with the [`step::Step`] the run was in. [`cli`] prints the report or
//! that one failure line and gives the exit status; nothing on the way
//! panics.
//!
//! Correctness is not optional: a run without observers is refused.
//!
//! Imports run one way, with no circle: [`clock`], [`rng`] and [`target`]
//! import nothing of ours, [`truth`] only the clock, and [`ws`] sits under
//! both [`tab`] and [`observer`], which do not import each other;
//! [`failure`] gathers the observer's and the shards' errors, and only the
//! coordinator ([`scenario`]) and [`cli`] import it.

pub mod cli;
pub mod clock;
pub mod cursor;
pub mod failure;
pub mod layout;
pub mod observer;
pub mod options;
pub mod report;
pub mod rng;
pub mod scenario;
pub mod shard;
pub mod stats;
pub mod step;
pub mod tab;
pub mod target;
pub mod truth;
pub mod user;
pub mod worker;
pub mod ws;

pub use failure::Failure;
pub use options::{Options, Scenario};
pub use report::Report;
pub use scenario::run;
pub use step::Step;
