//! The truth model: what really happened to each user, and the exact check
//! of the room events a receiver (an observer, or a member tab in `fanout`)
//! got against it.
//!
//! Each user acts sequentially, and an action that can change room
//! membership (`join`, `leave`) waits for its reply, which the gateway sends
//! only after the store decided it. So a user's transitions are totally
//! ordered, and each one was decided at some moment inside its
//! `[sent, done]` interval. A close is decided after it was sent, with no
//! upper bound (`done` is `None`).
//!
//! Room events carry no `seq`, but the protocol gives a receiver an exact
//! slice of the store's order: a `join` reply's snapshot sits exactly
//! between the events before and after it, and once the `leave` reply
//! arrived no event of the room follows. So for each user `u` of its room,
//! a receiver's window `[join, leave]` must deliver exactly `u`'s
//! transitions `a+1 ..= b`, in order, where `a` (`b`) is the number of `u`'s
//! transitions decided before the join (the leave). The tool knows `a` and
//! `b` exactly when no transition of `u` overlaps the join (leave) in time;
//! when some do, the snapshot's state of `u` (transitions alternate) picks
//! `a` among the candidates, and `b` is a range: a transition racing the
//! leave may or may not be delivered; both are correct. Nothing else is
//! left to chance: an event the window does not explain is an error.
//!
//! A receiver's own user is special: its snapshot already lists it, and if
//! its join made the user join, that `joined` still follows the reply.
//!
//! With the gateways' offline grace, an `offline` or `left` that a close
//! caused is due only once the grace after the close ran out
//! ([`Transition::grace_us`]): an event of it that arrives earlier does
//! not match it. A close whose user came back within the grace is no
//! transition at all, so any event of it is one nothing explains. The
//! user's reloads are kept ([`Reload`]) to count the flaps observers saw.

use serde::{Deserialize, Serialize};

use crate::clock::Stamp;

/// Event checks of one kind (presence or room), summed over observers.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventChecks {
    /// Events that never arrived.
    pub missed: u64,
    /// Events that arrived twice.
    pub duplicated: u64,
    /// Events that arrived in the wrong order.
    pub out_of_order: u64,
}

impl EventChecks {
    /// Whether nothing went wrong.
    pub fn clean(&self) -> bool {
        self.missed == 0 && self.duplicated == 0 && self.out_of_order == 0
    }

    /// Adds `other` to these counts.
    pub fn add(&mut self, other: &EventChecks) {
        self.missed += other.missed;
        self.duplicated += other.duplicated;
        self.out_of_order += other.out_of_order;
    }
}

/// One transition of a user (online/offline, or joined/left its room).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transition {
    /// `true` for online / joined.
    pub to: bool,
    /// When the action that caused it began (connect started, Close, `join`
    /// or `leave` sent).
    pub sent: Stamp,
    /// When its reply arrived (`join`, `leave`): the store had decided it
    /// by then. `None` when nothing bounds the decision (connects, closes).
    pub done: Option<Stamp>,
    /// Index of the target the acting tab was connected to.
    pub target: u16,
    /// An `offline`/`left` after a close with the grace on: the grace, in
    /// µs; its event is due no earlier than `sent` + this (0 otherwise).
    #[serde(default)]
    pub grace_us: u64,
    /// `nodeloss`: the tab's node was killed (`sent` is the kill); its
    /// event says `node_lost` and comes after the reap and the grace.
    #[serde(default)]
    pub lost: bool,
}

/// How far the gateway's clock (its `last_seen`, its grace deadlines) may
/// be off the tool's, in µs: the same machine's wall clock, read in
/// milliseconds.
pub const CLOCK_TOLERANCE_US: u64 = 5_000;

impl Transition {
    /// The earliest moment an event of this transition may arrive: its
    /// action, or the end of the grace after it (less the clocks'
    /// tolerance).
    pub fn due(&self) -> Stamp {
        if self.grace_us == 0 {
            self.sent
        } else {
            (self.sent + self.grace_us).saturating_sub(CLOCK_TOLERANCE_US)
        }
    }

    /// When the latency of its event starts: its action, or the end of
    /// the grace after it.
    pub fn latency_from(&self) -> Stamp {
        self.sent + self.grace_us
    }
}

/// One reload of a user's tab (`churn --reload-ms`): the Close sent, and
/// the re-open of the same slot started.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reload {
    /// Close sent.
    pub closed: Stamp,
    /// Re-open (connect) started.
    pub reopened: Stamp,
    /// Whether the closed tab was the user's last open one (so without a
    /// grace its user went offline and came back: a flap).
    pub last_tab: bool,
    /// Whether it was the user's last tab in its room.
    pub last_in_room: bool,
    /// When the user's next close after the re-open was sent (`None`: no
    /// close followed): a flap of this reload arrives before it.
    pub until: Option<Stamp>,
}

/// The true transitions of one user, in order.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct TruthLog {
    /// Each time the open-tab count left or reached 0.
    pub presence: Vec<Transition>,
    /// Each time the joined-tab count left or reached 0.
    pub room: Vec<Transition>,
    /// Reloads (`churn --reload-ms`), in order.
    #[serde(default)]
    pub reloads: Vec<Reload>,
}

impl TruthLog {
    /// The transition a presence event with `seq` reports: the `seq`-th
    /// one, if it goes `to` (names are fresh in every run, so `seq` counts
    /// from 1). `None`: nothing the user did explains the event.
    pub fn presence_cause(&self, seq: u64, to: bool) -> Option<&Transition> {
        (seq as usize)
            .checked_sub(1)
            .and_then(|i| self.presence.get(i))
            .filter(|t| t.to == to)
    }
}

/// A room event as a receiver got it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Received {
    /// `true` for `joined`.
    pub to: bool,
    /// When it arrived.
    pub at: Stamp,
}

/// What a receiver's window saw of one user of its room.
#[derive(Debug, Clone, Default)]
pub struct WindowOfUser<'a> {
    /// When the receiver's `join` was sent, and when its reply arrived;
    /// `None` for a receiver in the room before the run's first action.
    pub joined: Option<(Stamp, Stamp)>,
    /// Whether the join reply's snapshot listed the user.
    pub in_snapshot: bool,
    /// For the receiver's own user: how many room transitions the user had
    /// before this receiver's join (its join may cause the next one).
    pub own_before: Option<usize>,
    /// The user's events, in arrival order.
    pub events: &'a [Received],
    /// When the receiver's `leave` was sent and its reply arrived; `None`
    /// while it is still in the room (then every transition must arrive).
    pub left: Option<(Stamp, Stamp)>,
    /// Events that arrived after the `leave` reply (never allowed).
    pub after_leave: u64,
}

/// What the check of one window found.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct WindowCheck {
    /// Missed, duplicated and out-of-order events.
    pub events: EventChecks,
    /// The snapshot's state of the user fits no moment of the join.
    pub snapshot_mismatch: bool,
}

/// Checks one receiver window against `truth` (the user's room
/// transitions); calls `on_match` with each event's transition and arrival
/// (for its latency).
pub fn check_window(
    truth: &[Transition],
    w: &WindowOfUser<'_>,
    on_match: &mut dyn FnMut(&Transition, Stamp),
) -> WindowCheck {
    let n = truth.len();
    let state = |a: usize| a > 0 && truth[a - 1].to;
    let mut snapshot_mismatch = false;
    let starts: Vec<usize> = match (w.own_before, w.joined) {
        (Some(a), _) => vec![a.min(n)],
        (None, None) => vec![0],
        (None, Some((sent, done))) => {
            // Decided before the join for sure, or possibly.
            let lo = truth.partition_point(|t| t.done.is_some_and(|d| d < sent));
            let hi = truth.partition_point(|t| t.sent < done);
            let fit: Vec<usize> = (lo..=hi.max(lo))
                .filter(|&a| state(a) == w.in_snapshot)
                .collect();
            if fit.is_empty() {
                snapshot_mismatch = true;
                vec![lo]
            } else {
                fit
            }
        }
    };
    // Transitions the window must deliver (decided before the leave was
    // sent) and may deliver (begun before the leave's reply).
    let (must, may) = match w.left {
        None => (n, n),
        Some((sent, done)) => (
            truth.partition_point(|t| t.done.is_some_and(|d| d < sent)),
            truth.partition_point(|t| t.sent < done),
        ),
    };
    /// `(errors, checks, matched)` of one candidate start.
    type Candidate = (u64, EventChecks, Vec<(usize, Stamp)>);
    let mut best: Option<Candidate> = None;
    for a in starts {
        let (mut checks, matched, reached) = match_events(truth, a, w.events);
        checks.missed += must.saturating_sub(reached) as u64;
        checks.duplicated += reached.saturating_sub(may.max(a)) as u64 + w.after_leave;
        let cost = checks.missed + checks.duplicated + checks.out_of_order;
        if best.as_ref().is_none_or(|b| cost < b.0) {
            best = Some((cost, checks, matched));
        }
    }
    // unwrap: `starts` is never empty.
    let (_, events, matched) = best.unwrap();
    for (i, at) in matched {
        on_match(&truth[i], at);
    }
    WindowCheck {
        events,
        snapshot_mismatch,
    }
}

/// Matches `events` in order against `truth[a..]`: each must be the next
/// transition (same kind, begun before it arrived). Returns the counts and
/// the `(transition, arrival)` pairs matched.
///
/// Kinds alternate, so an event that is not the next transition has the
/// kind of the last one matched: it is an out-of-order arrival if an
/// earlier transition of its kind was skipped; else the transition after
/// next if that one had begun (the next one was missed); else a duplicate.
fn match_events(
    truth: &[Transition],
    a: usize,
    events: &[Received],
) -> (EventChecks, Vec<(usize, Stamp)>, usize) {
    let mut checks = EventChecks::default();
    let mut matched = Vec::with_capacity(events.len());
    let mut skipped: Vec<usize> = Vec::new();
    let mut p = a;
    for e in events {
        let begun = |i: usize| {
            truth
                .get(i)
                .is_some_and(|t| t.to == e.to && t.due() <= e.at)
        };
        if begun(p) {
            matched.push((p, e.at));
            p += 1;
        } else if let Some(k) = skipped.iter().rposition(|&s| truth[s].to == e.to) {
            skipped.remove(k);
            checks.out_of_order += 1;
        } else if truth.get(p).is_none_or(|t| t.to != e.to) && begun(p + 1) {
            skipped.push(p);
            matched.push((p + 1, e.at));
            p += 2;
        } else {
            checks.duplicated += 1;
        }
    }
    checks.missed += skipped.len() as u64;
    (checks, matched, p)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::{EventKind, KindHistograms};

    /// Alternating transitions joined, left, joined, … begun at `sent[i]`,
    /// each answered 1 ms later.
    fn truth(sent: &[Stamp]) -> Vec<Transition> {
        sent.iter()
            .enumerate()
            .map(|(i, &s)| Transition {
                to: i % 2 == 0,
                sent: s,
                done: Some(s + 1_000),
                target: 0,
                grace_us: 0,
                lost: false,
            })
            .collect()
    }

    fn events(list: &[(bool, Stamp)]) -> Vec<Received> {
        list.iter().map(|&(to, at)| Received { to, at }).collect()
    }

    fn check(truth: &[Transition], w: &WindowOfUser<'_>) -> WindowCheck {
        check_window(truth, w, &mut |_, _| {})
    }

    fn counts(c: WindowCheck) -> (u64, u64, u64) {
        (c.events.missed, c.events.duplicated, c.events.out_of_order)
    }

    const T: [Stamp; 4] = [10_000, 20_000, 30_000, 40_000];

    #[test]
    fn an_observer_that_saw_every_transition_in_order_is_clean() {
        let t = truth(&T);
        let e = events(&[
            (true, 12_000),
            (false, 22_000),
            (true, 32_000),
            (false, 42_000),
        ]);
        let mut lat = KindHistograms::default();
        let c = check_window(
            &t,
            &WindowOfUser {
                events: &e,
                ..Default::default()
            },
            &mut |t, at| lat.record(EventKind::of(true, t.to), at - t.sent),
        );
        assert_eq!(counts(c), (0, 0, 0));
        assert!(!c.snapshot_mismatch);
        let l = lat.latencies();
        assert_eq!((l.joined.n, l.left.n), (2, 2));
        assert_eq!(l.joined.max_us, 2_000);
    }

    #[test]
    fn a_missing_event_at_the_end_is_missed() {
        let t = truth(&T);
        let e = events(&[(true, 12_000), (false, 22_000), (true, 32_000)]);
        let w = WindowOfUser {
            events: &e,
            ..Default::default()
        };
        assert_eq!(counts(check(&t, &w)), (1, 0, 0));
    }

    #[test]
    fn a_missing_event_in_the_middle_is_missed_not_duplicated() {
        let t = truth(&T);
        // `left` at 20 ms never came; `joined` of 30 ms did.
        let e = events(&[(true, 12_000), (true, 32_000), (false, 42_000)]);
        let w = WindowOfUser {
            events: &e,
            ..Default::default()
        };
        assert_eq!(counts(check(&t, &w)), (1, 0, 0));
    }

    #[test]
    fn the_same_event_twice_is_duplicated() {
        let t = truth(&T);
        // The second `joined` arrives before the next `joined` was begun.
        let e = events(&[
            (true, 12_000),
            (true, 13_000),
            (false, 22_000),
            (true, 32_000),
            (false, 42_000),
        ]);
        let w = WindowOfUser {
            events: &e,
            ..Default::default()
        };
        assert_eq!(counts(check(&t, &w)), (0, 1, 0));
    }

    #[test]
    fn two_events_swapped_are_out_of_order() {
        let t = truth(&T);
        // `joined`(30) arrives before `left`(20).
        let e = events(&[
            (true, 12_000),
            (true, 32_000),
            (false, 33_000),
            (false, 42_000),
        ]);
        let w = WindowOfUser {
            events: &e,
            ..Default::default()
        };
        assert_eq!(counts(check(&t, &w)), (0, 0, 1));
    }

    #[test]
    fn an_event_before_its_action_began_is_not_explained() {
        let t = truth(&T[..1]);
        let e = events(&[(true, 5_000)]);
        let w = WindowOfUser {
            events: &e,
            ..Default::default()
        };
        assert_eq!(counts(check(&t, &w)), (1, 1, 0));
    }

    #[test]
    fn a_late_joiner_starts_after_its_snapshot() {
        let t = truth(&T);
        // Joined at 25 ms (reply at 26): the user was out (left at 20), so
        // the window owes `joined`(30) and `left`(40).
        let e = events(&[(true, 31_000), (false, 41_000)]);
        let w = WindowOfUser {
            joined: Some((25_000, 26_000)),
            in_snapshot: false,
            events: &e,
            ..Default::default()
        };
        assert_eq!(counts(check(&t, &w)), (0, 0, 0));
        let wrong_snapshot = WindowOfUser {
            in_snapshot: true,
            ..w.clone()
        };
        assert!(check(&t, &wrong_snapshot).snapshot_mismatch);
    }

    #[test]
    fn the_snapshot_decides_a_transition_racing_the_join() {
        let t = truth(&T);
        // The receiver's join (sent 19.5 ms, reply 20.5 ms) raced `left`
        // (sent 20 ms, reply 21 ms). Snapshot "in": the left came after the
        // join, so it is owed.
        let owed = events(&[(false, 21_000), (true, 31_000), (false, 41_000)]);
        let w = WindowOfUser {
            joined: Some((19_500, 20_500)),
            in_snapshot: true,
            events: &owed,
            ..Default::default()
        };
        assert_eq!(counts(check(&t, &w)), (0, 0, 0));
        let without_it = events(&[(true, 31_000), (false, 41_000)]);
        let missing = WindowOfUser {
            events: &without_it,
            ..w.clone()
        };
        assert_eq!(counts(check(&t, &missing)), (1, 0, 0));
        // Snapshot "out": the left came before the join; not owed.
        let before = WindowOfUser {
            in_snapshot: false,
            events: &without_it,
            ..w
        };
        assert_eq!(counts(check(&t, &before)), (0, 0, 0));
    }

    #[test]
    fn a_leaver_owes_what_was_decided_before_its_leave_and_may_get_a_racer() {
        let t = truth(&T);
        // In from the start; leave sent at 29.9 ms, reply at 30.9 ms: the
        // `joined` begun at 30 ms races it.
        let w = |e| WindowOfUser {
            events: e,
            left: Some((29_900, 30_900)),
            ..Default::default()
        };
        let two = events(&[(true, 11_000), (false, 21_000)]);
        let three = events(&[(true, 11_000), (false, 21_000), (true, 30_500)]);
        let one = events(&[(true, 11_000)]);
        assert_eq!(counts(check(&t, &w(&two))), (0, 0, 0));
        assert_eq!(counts(check(&t, &w(&three))), (0, 0, 0));
        assert_eq!(counts(check(&t, &w(&one))), (1, 0, 0));
        let late = WindowOfUser {
            after_leave: 1,
            ..w(&two)
        };
        assert_eq!(counts(check(&t, &late)), (0, 1, 0));
    }

    #[test]
    fn the_own_joined_follows_the_snapshot() {
        let t = truth(&T[..1]);
        let own = events(&[(true, 10_500)]);
        let w = WindowOfUser {
            joined: Some((10_000, 11_000)),
            in_snapshot: true,
            own_before: Some(0),
            events: &own,
            ..Default::default()
        };
        assert_eq!(counts(check(&t, &w)), (0, 0, 0));
        let none = WindowOfUser {
            events: &[],
            ..w.clone()
        };
        assert_eq!(counts(check(&t, &none)), (1, 0, 0));
        // Another tab of the user was already in: no event is owed.
        let already = WindowOfUser {
            own_before: Some(1),
            events: &[],
            ..w
        };
        assert_eq!(counts(check(&t, &already)), (0, 0, 0));
    }

    #[test]
    fn a_presence_cause_is_found_by_seq() {
        let log = TruthLog {
            presence: truth(&T),
            ..Default::default()
        };
        assert_eq!(log.presence_cause(3, true).unwrap().sent, 30_000);
        // A seq past the truth, or of the other kind, is explained by
        // nothing (a flap within the grace is no transition).
        assert!(log.presence_cause(9, false).is_none());
        assert!(log.presence_cause(2, true).is_none());
        assert!(log.presence_cause(0, true).is_none());
    }

    #[test]
    fn a_left_is_due_only_once_the_grace_after_its_close_ran_out() {
        let mut t = truth(&T[..2]);
        // The `left` of a close at 20 ms with a grace of 1 s.
        t[1].done = None;
        t[1].grace_us = 1_000_000;
        let w = |e| WindowOfUser {
            events: e,
            ..Default::default()
        };
        let in_time = events(&[(true, 11_000), (false, 1_021_000)]);
        assert_eq!(counts(check(&t, &w(&in_time))), (0, 0, 0));
        // Before the grace ran out: not that transition, which stays owed.
        let early = events(&[(true, 11_000), (false, 500_000)]);
        assert_eq!(counts(check(&t, &w(&early))), (1, 1, 0));
    }
}
