//! The registry's queue of ops for the store: what waits for the next
//! batch, the bound on requests waiting through an outage, the retry
//! backoff after a failed batch, and the fold of queued writes into one
//! reassert. It counts its own waiting requests, so no caller keeps a
//! count beside it.

use std::{
    collections::VecDeque,
    time::{Duration, Instant},
};

use tracing::warn;

use super::render::Answer;
use crate::{
    metrics::metrics,
    store::{NodeState, StoreOp},
};

/// First wait before retrying a failed batch.
const RETRY_MIN: Duration = Duration::from_millis(50);
/// Longest wait between retries of a failed batch.
const RETRY_MAX: Duration = Duration::from_secs(2);

/// One queued op (none: an answer given in order without the store) and
/// what waits for its outcome.
#[derive(Debug)]
pub(super) struct Pending {
    pub(super) op: Option<StoreOp>,
    pub(super) answer: Answer,
}

impl Pending {
    /// A write nobody waits for.
    pub(super) fn write(op: StoreOp) -> Self {
        Self {
            op: Some(op),
            answer: Answer::None,
        }
    }
}

/// The queue.
#[derive(Debug)]
pub(super) struct Queue {
    items: VecDeque<Pending>,
    /// Items in `items` whose answer someone waits for.
    waiting: usize,
    /// Most waiting requests (`--max-pending`).
    max_waiting: usize,
    /// The store may not hold exactly this node's connections: the next
    /// batch starts with a reassert, and queued writes are folded into it.
    reassert: bool,
    /// Overflowing since the last batch that went through (the warning is
    /// logged once per episode).
    overflowing: bool,
    /// No batch before this (backing off after a failure).
    retry_at: Option<Instant>,
    retry_delay: Duration,
}

impl Queue {
    /// An empty queue holding at most `max_waiting` waiting requests.
    pub(super) fn new(max_waiting: usize) -> Self {
        Self {
            items: VecDeque::new(),
            waiting: 0,
            max_waiting,
            reassert: false,
            overflowing: false,
            retry_at: None,
            retry_delay: RETRY_MIN,
        }
    }

    /// Ops queued.
    pub(super) fn len(&self) -> usize {
        self.items.len()
    }

    /// Whether nothing at all is due: no op, no reassert.
    pub(super) fn is_idle(&self) -> bool {
        self.items.is_empty() && !self.reassert
    }

    /// When the next batch may start at the earliest (backing off).
    pub(super) fn retry_at(&self) -> Option<Instant> {
        self.retry_at
    }

    /// Whether a reassert is due.
    pub(super) fn reassert_due(&self) -> bool {
        self.reassert
    }

    /// The store may have lost writes: reassert before anything else.
    pub(super) fn need_reassert(&mut self) {
        self.reassert = true;
    }

    /// Whether one more request may wait. When not, the overflow is
    /// counted (and warned about once per episode): the caller refuses it.
    pub(super) fn admits_request(&mut self) -> bool {
        if self.waiting < self.max_waiting {
            return true;
        }
        metrics().store_queue_overflows.inc();
        if !self.overflowing {
            self.overflowing = true;
            warn!(
                limit = self.max_waiting,
                "store queue full; answering `unavailable` until the store catches up"
            );
        }
        false
    }

    /// Queues an item. A request must have been admitted
    /// ([`Queue::admits_request`]). A bare write is folded into the
    /// reassert when one is due, and makes one due when the queue is far
    /// behind, so an outage holds no more than the live connections.
    pub(super) fn push(&mut self, pending: Pending) {
        if !pending.answer.waits() {
            if self.reassert {
                return;
            }
            if self.items.len() >= self.max_waiting.saturating_mul(4) {
                metrics().store_queue_overflows.inc();
                if !self.overflowing {
                    self.overflowing = true;
                    warn!("store write queue full; folding it into a reassert");
                }
                self.reassert = true;
                return;
            }
        } else {
            self.waiting += 1;
        }
        self.items.push_back(pending);
    }

    /// Replaces the queued writes by one reassert of `state` at the head;
    /// requests keep their place and get their answers from reads.
    pub(super) fn fold_into_reassert(&mut self, state: NodeState) {
        let mut kept = VecDeque::with_capacity(self.items.len() + 1);
        kept.push_back(Pending::write(StoreOp::Reassert(state.into())));
        for Pending { op, answer } in self.items.drain(..) {
            if answer.waits() {
                kept.push_back(Pending {
                    op: op.and_then(|op| op.read_part()),
                    answer,
                });
            }
        }
        self.items = kept;
        self.reassert = false;
    }

    /// Takes the next `n` items (or fewer) for a batch.
    pub(super) fn take(&mut self, n: usize) -> Vec<Pending> {
        let n = n.min(self.items.len());
        let batch: Vec<Pending> = self.items.drain(..n).collect();
        self.waiting -= batch.iter().filter(|p| p.answer.waits()).count();
        batch
    }

    /// A batch went through: no backoff, no overflow episode.
    pub(super) fn succeeded(&mut self) {
        self.overflowing = false;
        self.retry_at = None;
        self.retry_delay = RETRY_MIN;
    }

    /// A batch failed: its items go back to the head, in order, behind a
    /// reassert (it may or may not have been applied). `backoff`: wait
    /// before the next try (false: the store refused at once, retry now).
    /// Returns the wait.
    pub(super) fn failed(&mut self, batch: Vec<Pending>, backoff: bool) -> Duration {
        for pending in batch.into_iter().rev() {
            if pending.answer.waits() {
                self.waiting += 1;
            }
            self.items.push_front(pending);
        }
        self.reassert = true;
        if !backoff {
            self.retry_at = None;
            return Duration::ZERO;
        }
        let delay = self.retry_delay;
        self.retry_at = Some(Instant::now() + delay);
        self.retry_delay = (delay * 2).min(RETRY_MAX);
        delay
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        broadcast::{Delivery, SubChange},
        ids::{ConnId, RoomName, UserId},
        protocol::{Reason, ReplyBody},
    };

    fn user() -> UserId {
        UserId::parse("u").unwrap()
    }
    fn room() -> RoomName {
        RoomName::parse("r").unwrap()
    }
    fn request(op: StoreOp) -> Pending {
        Pending {
            op: Some(op),
            answer: Answer::reply(
                ConnId::new(),
                None,
                SubChange::None,
                |_| ReplyBody::Empty {},
            ),
        }
    }
    fn state() -> NodeState {
        NodeState {
            conns: Vec::new(),
            rooms: Vec::new(),
            gone: Reason::Closed,
        }
    }

    #[test]
    fn requests_past_the_bound_are_refused_and_counted_once_taken() {
        let mut queue = Queue::new(2);
        for _ in 0..2 {
            assert!(queue.admits_request());
            queue.push(request(StoreOp::Presence(vec![user()])));
        }
        assert!(!queue.admits_request());
        queue.push(Pending::write(StoreOp::Connect(user())));
        let mut batch = queue.take(1);
        assert!(queue.admits_request(), "one request left the queue");
        batch.extend(queue.take(10));
        assert_eq!(batch.len(), 3);
        queue.failed(batch, true);
        assert!(!queue.admits_request(), "failed requests wait again");
    }

    #[test]
    fn writes_fold_into_one_reassert_and_requests_keep_their_reads() {
        let mut queue = Queue::new(10);
        queue.push(Pending::write(StoreOp::Connect(user())));
        queue.push(request(StoreOp::Join(room(), user())));
        queue.push(request(StoreOp::Leave(
            room(),
            user(),
            Reason::Closed,
            crate::protocol::Ends::Now,
        )));
        queue.push(Pending {
            op: None,
            answer: Answer::Ready(Delivery::Reply {
                conn: ConnId::new(),
                frame: "r".into(),
                change: SubChange::None,
                accepted: true,
            }),
        });
        queue.need_reassert();
        queue.push(Pending::write(StoreOp::Connect(user())));
        assert_eq!(queue.len(), 4, "a write while a reassert is due is folded");
        queue.fold_into_reassert(state());
        let ops: Vec<Option<StoreOp>> = queue.take(10).into_iter().map(|p| p.op).collect();
        assert!(matches!(ops[0], Some(StoreOp::Reassert(_))));
        assert_eq!(
            ops[1..],
            [Some(StoreOp::Members(room())), None, None],
            "the join answers from a read, the leave and the ready reply need none"
        );
    }

    #[test]
    fn a_far_behind_queue_becomes_a_reassert() {
        let mut queue = Queue::new(1);
        for _ in 0..4 {
            queue.push(Pending::write(StoreOp::Connect(user())));
        }
        assert!(!queue.reassert_due());
        queue.push(Pending::write(StoreOp::Connect(user())));
        assert!(queue.reassert_due());
        assert_eq!(queue.len(), 4);
    }

    #[test]
    fn failures_back_off_and_success_resets() {
        let mut queue = Queue::new(1);
        assert_eq!(queue.failed(Vec::new(), true), RETRY_MIN);
        assert_eq!(queue.failed(Vec::new(), true), RETRY_MIN * 2);
        assert_eq!(queue.failed(Vec::new(), false), Duration::ZERO);
        assert!(queue.retry_at().is_none());
        queue.succeeded();
        assert_eq!(queue.failed(Vec::new(), true), RETRY_MIN);
    }
}
