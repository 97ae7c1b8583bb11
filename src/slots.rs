//! The node's connection slots: how many WebSockets it holds, in total and
//! per user, across workers.
//!
//! A `/ws` handshake takes a [`Slot`] before it is upgraded and the
//! connection gives it back when it ends, so `--max-connections` and
//! `--max-conns-per-user` hold on every worker at once. A leaf: it knows
//! user ids and nothing else of ours.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

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
        })
    }

    /// Takes a slot for one connection of `user`.
    pub fn take(self: &Arc<Self>, user: &UserId) -> Result<Slot, SlotError> {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
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

    fn give_back(&self, user: &UserId) {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(of_user) = held.per_user.get_mut(user) {
            *of_user -= 1;
            if *of_user == 0 {
                held.per_user.remove(user);
            }
        }
        held.total -= 1;
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
}
