//! The node's connection slots: how many WebSockets it holds, in total and
//! per user, across workers.
//!
//! A `/ws` handshake takes a [`Slot`] before it is upgraded and the
//! connection gives it back once its socket is closed (after the lingering
//! close, see [`crate::linger`]), so `--max-connections` and
//! `--max-conns-per-user` hold on every worker at once, and a drain can wait
//! for the last connection to go ([`ConnSlots::all_returned`]) instead of
//! polling a gauge. A leaf: it knows user ids and nothing else of ours.

use std::{
    collections::HashMap,
    pin::pin,
    sync::{Arc, Mutex},
};

use tokio::sync::Notify;

use crate::ids::UserId;

/// Why the connection slots refused a handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotError {
    /// The node holds `--max-connections`.
    NodeFull,
    /// The user holds `--max-conns-per-user` on this node.
    UserFull,
}

/// Counts the node's WebSocket connections, in total and per user, across
/// workers. A handshake takes a [`Slot`] before it is upgraded; the slot
/// goes back when the connection ends.
#[derive(Debug)]
pub struct ConnSlots {
    max_total: usize,
    max_per_user: usize,
    held: Mutex<Held>,
    /// Woken when the last slot is given back.
    emptied: Notify,
}

/// The connections holding a slot.
#[derive(Debug, Default)]
struct Held {
    total: usize,
    per_user: HashMap<UserId, usize>,
}

impl ConnSlots {
    /// Slots for at most `max_total` connections, `max_per_user` per user.
    pub fn new(max_total: usize, max_per_user: usize) -> Arc<Self> {
        Arc::new(Self {
            max_total,
            max_per_user,
            held: Mutex::default(),
            emptied: Notify::new(),
        })
    }

    /// Takes a slot for one connection of `user`.
    pub fn take(self: &Arc<Self>, user: &UserId) -> Result<Slot, SlotError> {
        let mut held = self.lock();
        if held.total >= self.max_total {
            return Err(SlotError::NodeFull);
        }
        let of_user = held.per_user.entry(user.clone()).or_insert(0);
        if *of_user >= self.max_per_user {
            return Err(SlotError::UserFull);
        }
        *of_user += 1;
        held.total += 1;
        Ok(Slot {
            slots: self.clone(),
            user: user.clone(),
        })
    }

    /// Slots held now: connections open or being upgraded.
    pub fn held(&self) -> usize {
        self.lock().total
    }

    /// Resolves once no slot is held (at once if none is). A slot taken
    /// meanwhile is waited for too.
    pub async fn all_returned(&self) {
        loop {
            // Registered before the count is read, so a give-back between
            // the two still wakes this wait.
            let mut emptied = pin!(self.emptied.notified());
            emptied.as_mut().enable();
            if self.held() == 0 {
                return;
            }
            emptied.await;
        }
    }

    fn give_back(&self, user: &UserId) {
        let mut held = self.lock();
        if let Some(of_user) = held.per_user.get_mut(user) {
            *of_user -= 1;
            if *of_user == 0 {
                held.per_user.remove(user);
            }
        }
        held.total -= 1;
        if held.total == 0 {
            self.emptied.notify_waiters();
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Held> {
        // A panic while holding the lock cannot leave the counts half
        // updated: each change is one statement.
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// One connection's place in [`ConnSlots`], given back on drop.
#[derive(Debug)]
pub struct Slot {
    slots: Arc<ConnSlots>,
    user: UserId,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.slots.give_back(&self.user);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_bound_each_user_and_the_node() {
        let slots = ConnSlots::new(3, 2);
        let a = UserId::parse("a").unwrap();
        let b = UserId::parse("b").unwrap();
        let a1 = slots.take(&a).unwrap();
        let _a2 = slots.take(&a).unwrap();
        assert_eq!(slots.take(&a).unwrap_err(), SlotError::UserFull);
        let _b1 = slots.take(&b).unwrap();
        assert_eq!(slots.take(&b).unwrap_err(), SlotError::NodeFull);
        drop(a1);
        let _a3 = slots.take(&a).unwrap();
        assert_eq!(slots.take(&a).unwrap_err(), SlotError::NodeFull);
    }

    #[tokio::test]
    async fn all_returned_waits_for_the_last_slot() {
        let slots = ConnSlots::new(10, 10);
        let a = UserId::parse("a").unwrap();
        slots.all_returned().await;
        let first = slots.take(&a).unwrap();
        let second = slots.take(&a).unwrap();
        let mut wait = pin!(slots.all_returned());
        drop(first);
        assert!(
            futures_util::poll!(&mut wait).is_pending(),
            "one slot is still held"
        );
        drop(second);
        tokio::time::timeout(std::time::Duration::from_secs(5), wait)
            .await
            .expect("the wait ends with the last slot");
        assert_eq!(slots.held(), 0);
    }
}
