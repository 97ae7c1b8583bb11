//! Room state as `cursors` checks it: the states a sender sends, what a
//! receiver makes of the `updated` frames it gets, and what a sender's
//! `update` replies said. No sockets here, so each check is tested alone.
//!
//! Every state a member sends carries its sequence number `n` (1, 2, …;
//! `{"x":…,"y":…,"n":n}`), so a receiver can tell, per sender, what it
//! got: the gateway writes a sender's states in the order they were sent
//! and members hear them in store order, so the `n`s of one sender only
//! increase at every receiver (a repeat is `duplicated`, a lower one
//! `out_of_order`); pacing may skip some (superseded ones are never sent),
//! but the last one a receiver holds once the senders stopped must be the
//! sender's last (`unconverged` otherwise). An `updated` that reaches the
//! connection that sent it is `to_sender`: the gateway must not echo it.
//! A join snapshot or a room page carries the state too: the receiver
//! takes it as the latest it knows (it is exactly in store order).
//!
//! This module imports only the clock.

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::clock::Stamp;

/// The state a sender sends as its `n`th update: a point that moves, and
/// `n` (the only part the checks read).
pub fn state(n: u64) -> Value {
    json!({"x": (n * 37) % 1920, "y": (n * 23) % 1080, "n": n})
}

/// The `n` of a state the tool sent; `None` for a state of any other
/// shape (or none: `null`).
pub fn n_of(state: &Value) -> Option<u64> {
    state.get("n")?.as_u64().filter(|n| *n > 0)
}

/// What a receiver's `updated` frames showed (summed over receivers;
/// each must be 0 but `delivered`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateChecks {
    /// `updated` frames received with a state of the run.
    pub delivered: u64,
    /// A sender's `n` again.
    pub duplicated: u64,
    /// A sender's `n` below one already held.
    pub out_of_order: u64,
    /// `updated` at the connection whose `update` it was.
    pub to_sender: u64,
    /// `updated` whose state carries no `n` of the run.
    pub unreadable: u64,
}

impl StateChecks {
    /// Adds `other`'s counts.
    pub fn add(&mut self, other: &StateChecks) {
        self.delivered += other.delivered;
        self.duplicated += other.duplicated;
        self.out_of_order += other.out_of_order;
        self.to_sender += other.to_sender;
        self.unreadable += other.unreadable;
    }

    /// Whether nothing went wrong.
    pub fn clean(&self) -> bool {
        self.duplicated == 0
            && self.out_of_order == 0
            && self.to_sender == 0
            && self.unreadable == 0
    }
}

/// One `updated` as it arrived: the sender's position, the state's `n`,
/// the arrival.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delivery {
    /// The sender's position among the receiver's senders.
    pub sender: usize,
    /// The state's `n`.
    pub n: u64,
    /// When it arrived.
    pub at: Stamp,
}

/// What one receiver knows of its senders' states, fed frame by frame.
#[derive(Debug, Clone)]
pub struct StateLog {
    /// Per sender position: the `n` of the latest state held (0: none).
    latest: Vec<u64>,
    /// Every `updated` in arrival order (those the checks accepted).
    pub deliveries: Vec<Delivery>,
    /// The checks so far.
    pub checks: StateChecks,
}

impl StateLog {
    /// A receiver of `senders` senders, holding no state of any.
    pub fn new(senders: usize) -> Self {
        Self {
            latest: vec![0; senders],
            deliveries: Vec::new(),
            checks: StateChecks::default(),
        }
    }

    /// A snapshot (join reply, room page) listed `sender` with `state`:
    /// the latest the receiver knows.
    pub fn snapshot(&mut self, sender: usize, state: &Value) {
        if let (Some(l), Some(n)) = (self.latest.get_mut(sender), n_of(state)) {
            *l = n;
        }
    }

    /// An `updated` of `sender` with `state` arrived at `at`; `to_sender`
    /// when this receiver is the connection that sent it.
    pub fn updated(&mut self, sender: usize, state: &Value, at: Stamp, to_sender: bool) {
        if to_sender {
            self.checks.to_sender += 1;
            return;
        }
        let (Some(latest), Some(n)) = (self.latest.get_mut(sender), n_of(state)) else {
            self.checks.unreadable += 1;
            return;
        };
        if n <= *latest {
            if n == *latest {
                self.checks.duplicated += 1;
            } else {
                self.checks.out_of_order += 1;
            }
            return;
        }
        *latest = n;
        self.checks.delivered += 1;
        self.deliveries.push(Delivery { sender, n, at });
    }

    /// The latest `n` held of `sender` (0: none).
    pub fn latest(&self, sender: usize) -> u64 {
        self.latest.get(sender).copied().unwrap_or_default()
    }

    /// Senders whose latest state here is not their last one sent
    /// (`finals[p]`, 0 for a sender that sent none), leaving out the
    /// receiver's own position.
    pub fn unconverged(&self, finals: &[u64], own: Option<usize>) -> u64 {
        finals
            .iter()
            .enumerate()
            .filter(|&(p, f)| Some(p) != own && self.latest(p) != *f)
            .count() as u64
    }
}

/// A sender's `update` replies, by what they said.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpdateTally {
    /// `update` frames sent.
    pub sent: u64,
    /// Answered `ok` (written by the store).
    pub written: u64,
    /// Answered `ok` with `superseded` (replaced before it was written).
    pub superseded: u64,
    /// Answered with an error frame.
    pub refused: u64,
    /// Never answered within the step timeout.
    pub unanswered: u64,
}

impl UpdateTally {
    /// Adds `other`'s counts.
    pub fn add(&mut self, other: &UpdateTally) {
        self.sent += other.sent;
        self.written += other.written;
        self.superseded += other.superseded;
        self.refused += other.refused;
        self.unanswered += other.unanswered;
    }

    /// Counts one reply (`reply` or `error` frame) to an `update`.
    pub fn answer(&mut self, frame: &Value) {
        if frame["type"] != "reply" || frame["ok"] != true {
            self.refused += 1;
        } else if frame["superseded"] == true {
            self.superseded += 1;
        } else {
            self.written += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_receiver_that_got_every_last_state_has_converged() {
        let mut l = StateLog::new(3);
        l.snapshot(0, &state(2));
        l.updated(0, &state(4), 10, false);
        l.updated(1, &state(1), 11, false);
        l.updated(1, &state(7), 12, false);
        assert_eq!(l.unconverged(&[4, 7, 0], Some(2)), 0);
        assert!(l.checks.clean());
        assert_eq!(l.checks.delivered, 3);
        assert_eq!(
            l.deliveries
                .iter()
                .map(|d| (d.sender, d.n))
                .collect::<Vec<_>>(),
            [(0, 4), (1, 1), (1, 7)]
        );
    }

    #[test]
    fn a_missing_final_state_is_unconverged() {
        let mut l = StateLog::new(3);
        l.updated(0, &state(4), 10, false);
        // Sender 1's last state was 9; only 8 arrived.
        l.updated(1, &state(8), 11, false);
        assert_eq!(l.unconverged(&[4, 9, 0], Some(2)), 1);
        // A sender that sent nothing, of whom a state arrived, is off too;
        // the receiver's own position is not looked at.
        l.updated(2, &state(1), 12, false);
        assert_eq!(l.unconverged(&[4, 9, 0], None), 2);
        assert_eq!(l.unconverged(&[4, 9, 0], Some(2)), 1);
    }

    #[test]
    fn repeats_lower_ns_echoes_and_strangers_are_counted() {
        let mut l = StateLog::new(2);
        l.updated(0, &state(3), 1, false);
        l.updated(0, &state(3), 2, false);
        l.updated(0, &state(2), 3, false);
        l.updated(1, &state(1), 4, true);
        l.updated(0, &json!({"cursor": [1, 2]}), 5, false);
        l.updated(5, &state(1), 6, false);
        let c = l.checks;
        assert_eq!(
            (
                c.delivered,
                c.duplicated,
                c.out_of_order,
                c.to_sender,
                c.unreadable
            ),
            (1, 1, 1, 1, 2)
        );
        assert!(!c.clean());
        // What was refused changed nothing held.
        assert_eq!((l.latest(0), l.latest(1)), (3, 0));
    }

    #[test]
    fn replies_are_told_apart() {
        let mut t = UpdateTally::default();
        t.answer(&json!({"type": "reply", "ref": 1, "ok": true, "room": "r"}));
        t.answer(&json!({"type": "reply", "ref": 2, "ok": true, "room": "r", "superseded": true}));
        t.answer(&json!({"type": "error", "ref": 3, "code": "rate_limited"}));
        assert_eq!((t.written, t.superseded, t.refused), (1, 1, 1));
    }
}
