//! The steps of a run, in the words failures and error reports use: a
//! failure names the step the run was in, and the first error of each kind
//! a tab or an observer met names the step it met it in.

use std::fmt;

use crate::options::Scenario;

/// The steps of a run, as the coordinator takes them (a shard sees
/// [`Step::Held`] where the coordinator checks and holds).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Connecting the observers, watching every user, joining every room,
    /// starting the shards.
    Setup,
    /// The scenario's action phase: the storm, the opens of a hold, the
    /// churn, the opens, leaves and joins of a fanout, or the opens and
    /// updates of `cursors`.
    Actions(Scenario),
    /// `hold`: the tabs held open.
    Hold,
    /// A shard's view of the held check and the hold: its tabs stay open
    /// until the coordinator orders the close.
    Held,
    /// The check after the action phase (`held`).
    HeldCheck,
    /// `nodeloss`: the kill and the returning tabs.
    Loss,
    /// `nodeloss`: the check once the killed node's users are back or
    /// offline (`lost`).
    LostCheck,
    /// Closing every tab.
    CloseAll,
    /// The check after every tab closed (`closed`).
    ClosedCheck,
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Setup => "the setup",
            Self::Actions(Scenario::Storm) => "the storm",
            Self::Actions(Scenario::Hold) => "the opens",
            Self::Actions(Scenario::Churn) => "the churn",
            Self::Actions(Scenario::Fanout) => "the fanout",
            Self::Actions(Scenario::Nodeloss) => "the opens",
            Self::Actions(Scenario::Cursors) => "the cursor moves",
            Self::Hold => "the hold",
            Self::Held => "the check and hold of the open tabs",
            Self::HeldCheck => "the held check",
            Self::Loss => "the node loss",
            Self::LostCheck => "the lost check",
            Self::CloseAll => "the close of every tab",
            Self::ClosedCheck => "the closed check",
        })
    }
}
