//! Store order for a node that hears events from a shared store's feed:
//! the events of every node arrive through the feed, numbered in the order
//! the store decided them, while this node's replies come back with its
//! batches. [`FeedOrder`] puts each reply exactly between the events before
//! and after its op, so a joiner still gets its snapshot before its own
//! `joined` and after everything that happened before it. A plain struct:
//! no actix, no clock of its own (callers pass `now`), tested directly.

use std::{
    collections::VecDeque,
    time::{Duration, Instant},
};

use crate::protocol::Event;

/// Something released in store order.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Released<R> {
    /// A reply whose preceding events have all been released.
    Reply(R),
    /// An event from the feed.
    Event(Event),
}

/// Replies waiting for the feed's events, and the feed's position.
#[derive(Debug)]
pub(super) struct FeedOrder<R> {
    /// The number of the last event released; `None` while unsubscribed.
    delivered: Option<u64>,
    /// Replies with the number of the last event before them and when
    /// they started waiting.
    waiting: VecDeque<(u64, Instant, R)>,
    /// A batch with replies is in flight: events from the feed (which may
    /// overtake its answer) wait in `held` until its replies are placed.
    holding: bool,
    held: Vec<(u64, Event)>,
    /// The feed was lost at least once, so a new subscription means events
    /// were missed.
    lost: bool,
    /// Longest a reply waits for its events (lost with a subscription).
    wait_max: Duration,
}

impl<R> FeedOrder<R> {
    /// Nothing delivered yet, not subscribed.
    pub(super) fn new(wait_max: Duration) -> Self {
        Self {
            delivered: None,
            waiting: VecDeque::new(),
            holding: false,
            held: Vec::new(),
            lost: false,
            wait_max,
        }
    }

    /// (Re)subscribed: events up to `floor` will not arrive. True when
    /// events were missed (a subscription had been lost): the caller
    /// resyncs its connections.
    pub(super) fn subscribed(&mut self, floor: u64) -> bool {
        self.delivered = Some(floor);
        self.lost
    }

    /// The subscription broke: until the next one, replies do not wait.
    pub(super) fn lost(&mut self) {
        self.delivered = None;
        self.lost = true;
    }

    /// A batch with replies went to the store: hold the feed's events.
    pub(super) fn hold(&mut self) {
        self.holding = true;
    }

    /// The batch returned: `replies`, each after the event numbered before
    /// it, then whatever is due, including events held meanwhile.
    pub(super) fn batch_done(&mut self, replies: Vec<(u64, R)>, now: Instant) -> Vec<Released<R>> {
        self.waiting
            .extend(replies.into_iter().map(|(at, reply)| (at, now, reply)));
        self.holding = false;
        let held = std::mem::take(&mut self.held);
        self.published(held, now)
    }

    /// Events from the feed, in order, with the replies due between them.
    pub(super) fn published(
        &mut self,
        events: Vec<(u64, Event)>,
        now: Instant,
    ) -> Vec<Released<R>> {
        let mut out = Vec::new();
        if self.holding {
            self.held.extend(events);
            return out;
        }
        for (seq, event) in events {
            self.release(&mut out, Some(seq), now);
            out.push(Released::Event(event));
            self.delivered = Some(self.delivered.map_or(seq, |d| d.max(seq)));
        }
        self.release(&mut out, None, now);
        out
    }

    /// Replies that are due or have waited too long.
    pub(super) fn due(&mut self, now: Instant) -> Vec<Released<R>> {
        let mut out = Vec::new();
        self.release(&mut out, None, now);
        out
    }

    /// Moves the waiting replies whose events have all been released (or
    /// that waited too long, or all when unsubscribed) to `out`; with
    /// `before`, only those positioned before that event.
    fn release(&mut self, out: &mut Vec<Released<R>>, before: Option<u64>, now: Instant) {
        while let Some((at, since, _)) = self.waiting.front() {
            let due = match (before, self.delivered) {
                (Some(seq), _) => *at < seq,
                (None, Some(done)) => *at <= done,
                (None, None) => true,
            };
            let overdue = now.duration_since(*since) >= self.wait_max;
            if !due && !overdue {
                break;
            }
            if overdue && !due {
                crate::metrics::metrics().replies_released_late.inc();
            }
            if let Some((_, _, reply)) = self.waiting.pop_front() {
                out.push(Released::Reply(reply));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::UserId;

    const WAIT: Duration = Duration::from_secs(1);

    fn online(n: u64) -> (u64, Event) {
        (
            n,
            Event::Online {
                user: UserId::parse("u").unwrap(),
                seq: n,
            },
        )
    }

    fn names(released: Vec<Released<&'static str>>) -> Vec<String> {
        released
            .into_iter()
            .map(|r| match r {
                Released::Reply(name) => name.to_owned(),
                Released::Event(Event::Online { seq, .. }) => format!("event {seq}"),
                Released::Event(other) => format!("{other:?}"),
            })
            .collect()
    }

    #[test]
    fn a_reply_goes_between_the_events_before_and_after_its_op() {
        let now = Instant::now();
        let mut order = FeedOrder::new(WAIT);
        assert!(!order.subscribed(10));
        order.hold();
        // The feed overtakes the batch's answer: events 11 and 12 arrive
        // first; the reply sits after event 11 (its op came after it).
        assert!(
            order
                .published(vec![online(11), online(12)], now)
                .is_empty()
        );
        let out = order.batch_done(vec![(11, "reply")], now);
        assert_eq!(names(out), ["event 11", "reply", "event 12"]);
    }

    #[test]
    fn a_reply_waits_for_its_events_then_goes_before_the_next() {
        let now = Instant::now();
        let mut order = FeedOrder::new(WAIT);
        order.subscribed(10);
        order.hold();
        assert!(order.batch_done(vec![(12, "reply")], now).is_empty());
        assert_eq!(names(order.published(vec![online(11)], now)), ["event 11"]);
        assert_eq!(
            names(order.published(vec![online(12), online(13)], now)),
            ["event 12", "reply", "event 13"]
        );
    }

    #[test]
    fn a_reply_whose_events_were_lost_goes_after_the_wait() {
        let now = Instant::now();
        let mut order = FeedOrder::new(WAIT);
        order.subscribed(10);
        order.hold();
        assert!(order.batch_done(vec![(15, "reply")], now).is_empty());
        assert!(order.due(now + WAIT / 2).is_empty());
        assert_eq!(names(order.due(now + WAIT)), ["reply"]);
    }

    #[test]
    fn unsubscribed_replies_do_not_wait_and_a_new_subscription_says_events_were_missed() {
        let now = Instant::now();
        let mut order = FeedOrder::new(WAIT);
        order.subscribed(10);
        order.lost();
        order.hold();
        assert_eq!(names(order.batch_done(vec![(30, "reply")], now)), ["reply"]);
        assert!(order.subscribed(40), "a resync is due");
    }
}
