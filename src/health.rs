//! What `/readyz` reports: whether the store answers and whether the node
//! drains. The registry sets it; the HTTP workers read it. A leaf: it
//! knows nothing of either.

use std::sync::atomic::{AtomicBool, Ordering};

use tracing::{info, warn};

/// Readiness, shared by the registry and the HTTP workers.
#[derive(Debug)]
pub struct Health {
    /// The last store write or lease refresh succeeded.
    store_ok: AtomicBool,
    /// The node is draining.
    draining: AtomicBool,
}

impl Default for Health {
    /// Ready: the gateway starts serving only once it reached its store.
    fn default() -> Self {
        Self {
            store_ok: AtomicBool::new(true),
            draining: AtomicBool::new(false),
        }
    }
}

impl Health {
    /// Ready for traffic: the store answers and the node is not draining.
    pub fn ready(&self) -> bool {
        self.store_ok.load(Ordering::Relaxed) && !self.draining.load(Ordering::Relaxed)
    }

    /// Whether the node is draining.
    pub fn draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// The node starts draining; it never stops.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    /// Records whether the store answered; logs the changes.
    pub fn set_store_ok(&self, ok: bool) {
        if self.store_ok.swap(ok, Ordering::Relaxed) != ok {
            if ok {
                info!("presence store answers again");
            } else {
                warn!("presence store unavailable; /readyz answers 503");
            }
        }
    }
}
