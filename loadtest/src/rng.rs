//! A tiny random source for load shapes: nothing here needs more than
//! "spread out and different each run".

use std::{
    collections::hash_map::RandomState,
    hash::{BuildHasher, Hasher},
};

/// xorshift64, seeded by the std hasher's per-process random keys.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator seeded differently in every process and every call.
    pub fn seeded() -> Self {
        Self(RandomState::new().build_hasher().finish() | 1)
    }

    /// A number in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n.max(1)
    }

    /// A float in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        self.below(1 << 53) as f64 / (1u64 << 53) as f64
    }
}
