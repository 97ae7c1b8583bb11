//! The names of one run and who is where: users, rooms, observers, and
//! which worker process (shard) runs which user.
//!
//! A random run prefix keeps runs against the same cluster apart. With
//! `--procs N`, user `u` lives in shard `u % N`; rooms are filled within a
//! shard (room `r` holds users of shard `r % N` only), so every member of a
//! room, and so every receiver a `fanout` member checks, is in the same
//! process as the truth it is checked against.

use crate::{
    options::{Options, Scenario},
    rng::Rng,
};

/// Names and placement of one run.
#[derive(Debug, Clone)]
pub struct Layout {
    /// The run's prefix, `lt<8 hex digits>`.
    pub run: String,
    /// Users of the run.
    pub users: usize,
    /// Rooms of the run.
    pub rooms: usize,
    /// Users per room.
    pub room_size: usize,
    /// Worker processes (1 without `--procs`).
    pub shards: usize,
}

impl Layout {
    /// The layout of a new run (fresh random prefix).
    pub fn new(scenario: Scenario, opts: &Options) -> Self {
        Self::with_run(
            format!("lt{:08x}", Rng::seeded().below(1 << 32)),
            scenario,
            opts,
        )
    }

    /// The layout of the run named `run`.
    pub fn with_run(run: String, scenario: Scenario, opts: &Options) -> Self {
        Self {
            run,
            users: opts.users_for(scenario),
            rooms: opts.rooms,
            room_size: opts.room_size.max(1),
            shards: opts.procs.max(1),
        }
    }

    /// What every user id of the run starts with.
    pub fn user_prefix(&self) -> String {
        format!("{}u", self.run)
    }

    /// User `i`'s id.
    pub fn user_name(&self, i: usize) -> String {
        format!("{}u{i}", self.run)
    }

    /// Every user id, by index.
    pub fn user_names(&self) -> Vec<String> {
        (0..self.users).map(|i| self.user_name(i)).collect()
    }

    /// Room `r`'s name.
    pub fn room_name(&self, r: usize) -> String {
        format!("{}r{r}", self.run)
    }

    /// Every room name, by index.
    pub fn room_names(&self) -> Vec<String> {
        (0..self.rooms).map(|r| self.room_name(r)).collect()
    }

    /// Observer `j`'s id.
    pub fn observer_name(&self, j: usize) -> String {
        format!("{}obs{j}", self.run)
    }

    /// The shard that runs user `i`.
    pub fn shard_of(&self, i: usize) -> usize {
        i % self.shards
    }

    /// The users shard `k` runs.
    pub fn users_of_shard(&self, k: usize) -> impl Iterator<Item = usize> + use<> {
        (k..self.users).step_by(self.shards)
    }

    /// The room of user `i`: within its shard, users fill the shard's
    /// rooms in order, `room_size` each (with one shard: users
    /// `0 .. rooms × room_size` fill the rooms in order).
    pub fn room_of(&self, i: usize) -> Option<usize> {
        let (k, j) = (i % self.shards, i / self.shards);
        let r = (j / self.room_size) * self.shards + k;
        (r < self.rooms).then_some(r)
    }

    /// The members of room `r`, in user order.
    pub fn members(&self, r: usize) -> Vec<usize> {
        self.users_of_shard(r % self.shards)
            .filter(|&i| self.room_of(i) == Some(r))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(users: usize, rooms: usize, room_size: usize, shards: usize) -> Layout {
        Layout {
            run: "lt0".into(),
            users,
            rooms,
            room_size,
            shards,
        }
    }

    #[test]
    fn one_shard_fills_rooms_in_user_order() {
        let l = layout(25, 2, 10, 1);
        assert_eq!(l.room_of(0), Some(0));
        assert_eq!(l.room_of(9), Some(0));
        assert_eq!(l.room_of(10), Some(1));
        assert_eq!(l.room_of(20), None);
        assert_eq!(l.members(1), (10..20).collect::<Vec<_>>());
    }

    #[test]
    fn every_room_of_a_sharded_fanout_is_full_and_in_one_shard() {
        let l = layout(4 * 6, 4, 6, 2);
        for r in 0..4 {
            let m = l.members(r);
            assert_eq!(m.len(), 6, "room {r}: {m:?}");
            assert!(m.iter().all(|&u| l.shard_of(u) == r % 2), "room {r}: {m:?}");
        }
        assert!((0..24).all(|u| l.room_of(u).is_some()));
    }
}
