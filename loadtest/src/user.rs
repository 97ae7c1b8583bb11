//! One simulated user: its tabs and the truth about it. A user acts
//! sequentially (one open or close at a time), so its own log is the true
//! order of its transitions: online iff at least one tab is open, in its
//! room iff at least one tab that joined is open, across all nodes.
//!
//! A transition is stamped when the action that causes it *begins* (connect
//! started, Close sent), which is before the gateway can act on it; an
//! observer's event latency is measured from that stamp.

use std::{net::IpAddr, sync::Arc, time::Instant};

use crate::{stats::Shared, tab::Tab, target::Target};

/// The true transitions of one user, in order.
#[derive(Debug, Default, Clone)]
pub struct TruthLog {
    /// `(when, online)` each time the open-tab count left or reached 0.
    pub presence: Vec<(Instant, bool)>,
    /// `(when, in_room)` each time the joined-tab count left or reached 0.
    pub room: Vec<(Instant, bool)>,
}

impl TruthLog {
    /// The latest transition to `to` stamped at or before `at`.
    pub fn cause(log: &[(Instant, bool)], to: bool, at: Instant) -> Option<Instant> {
        let end = log.partition_point(|(t, _)| *t <= at);
        log[..end]
            .iter()
            .rev()
            .find(|(_, state)| *state == to)
            .map(|(t, _)| *t)
    }
}

/// A user of the run: its tab slots and what it did.
#[derive(Debug)]
pub struct User {
    /// The user id.
    pub name: String,
    /// The room every tab joins, if the user is a room member.
    pub room: Option<String>,
    urls: Vec<String>,
    sources: Vec<Option<IpAddr>>,
    tabs: Vec<Option<Tab>>,
    /// The truth so far.
    pub log: TruthLog,
    shared: Arc<Shared>,
}

impl User {
    /// User number `index` of a run: tab `i` goes to target
    /// `(index + i) % targets`, so one user's tabs spread over the nodes,
    /// and connects from source address `(index * tabs + i) % sources`
    /// (the system's choice when `sources` is empty).
    pub fn new(
        index: usize,
        name: String,
        room: Option<String>,
        tabs: usize,
        targets: &[Target],
        sources: &[IpAddr],
        shared: Arc<Shared>,
    ) -> Self {
        let urls = (0..tabs)
            .map(|i| targets[(index + i) % targets.len()].tab_url(&name))
            .collect();
        let sources = (0..tabs)
            .map(|i| (!sources.is_empty()).then(|| sources[(index * tabs + i) % sources.len()]))
            .collect();
        Self {
            name,
            room,
            urls,
            sources,
            tabs: (0..tabs).map(|_| None).collect(),
            log: TruthLog::default(),
            shared,
        }
    }

    /// Tab slots.
    pub fn slots(&self) -> usize {
        self.tabs.len()
    }

    /// Whether slot `i` holds an open tab.
    pub fn is_open(&self, i: usize) -> bool {
        self.tabs[i].is_some()
    }

    /// Open tabs.
    pub fn open_count(&self) -> usize {
        self.tabs.iter().filter(|t| t.is_some()).count()
    }

    /// Whether the user is online, as the truth has it.
    pub fn online(&self) -> bool {
        self.open_count() > 0
    }

    /// Whether the user is in its room, as the truth has it.
    pub fn in_room(&self) -> bool {
        self.tabs.iter().flatten().any(|t| t.joined)
    }

    /// Opens slot `i` (it must be empty), then joins the user's room.
    pub async fn open(&mut self, i: usize) {
        let started = Instant::now();
        let was_online = self.online();
        let was_in_room = self.in_room();
        let Some(mut tab) = Tab::open(&self.urls[i], self.sources[i], &self.shared).await else {
            return;
        };
        if !was_online {
            self.log.presence.push((started, true));
        }
        if let Some(room) = &self.room {
            let sent = Instant::now();
            tab.join(room, &self.shared).await;
            if !was_in_room {
                self.log.room.push((sent, true));
            }
        }
        self.tabs[i] = Some(tab);
    }

    /// Closes slot `i` if it is open.
    pub async fn close(&mut self, i: usize) {
        let Some(tab) = self.tabs[i].take() else {
            return;
        };
        let sent = Instant::now();
        tab.close(&self.shared).await;
        if !self.online() {
            self.log.presence.push((sent, false));
        }
        if self.room.is_some() && !self.in_room() && self.log.room.last().is_some_and(|r| r.1) {
            self.log.room.push((sent, false));
        }
    }

    /// Closes every open tab.
    pub async fn close_all(&mut self) {
        for i in 0..self.tabs.len() {
            self.close(i).await;
        }
    }
}
