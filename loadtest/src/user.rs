//! One simulated user: its tabs and the truth about it. A user acts
//! sequentially (one open, close, join or leave at a time, each waited
//! for), so its own log is the true order of its transitions: online iff at
//! least one tab is open, in its room iff at least one open tab joined it,
//! across all nodes.
//!
//! A transition is stamped when the action that causes it *begins* (connect
//! started, Close or `join`/`leave` sent), which is before the gateway can
//! act on it; an observer's event latency is measured from that stamp.
//!
//! `join` and `leave` replies come once the store decided them, but a
//! `welcome` and a close reply come before the connect or disconnect is
//! written. An open and a close of one user on different nodes could
//! reach the store in either order, so a user spaces an open after its last
//! close, and a close after its last open, by [`UNACKED_GAP`], ten times
//! the gateway's default batch linger. (Opens after opens, or closes after
//! closes, change the count the same way in any order.)

use std::{
    net::IpAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::time::sleep_until;

use crate::{
    stats::Shared,
    tab::{ReceiverLog, RoomIndex, Tab},
    target::Target,
    truth::{Transition, TruthLog},
};

/// Least time between a user's connect and its next close, or close and
/// next connect.
pub const UNACKED_GAP: Duration = Duration::from_millis(50);

/// The room of a user, when it has one.
#[derive(Debug, Clone)]
pub struct Membership {
    /// The room and its members.
    pub room: Arc<RoomIndex>,
    /// Whether every tab records its room's events (`fanout`).
    pub receivers: bool,
    /// The run's user-name prefix, for receivers.
    pub user_prefix: Arc<str>,
}

/// A user of the run: its tab slots and what it did.
#[derive(Debug)]
pub struct User {
    /// Index of the user in the run.
    pub index: usize,
    /// The user id.
    pub name: String,
    /// The room every tab joins, if the user is a room member.
    pub membership: Option<Membership>,
    /// Per slot: the URL, the target's index, and who the tab is in
    /// error reports.
    urls: Vec<(String, u16, Arc<str>)>,
    sources: Vec<Option<IpAddr>>,
    tabs: Vec<Option<Tab>>,
    /// The truth so far.
    pub log: TruthLog,
    /// `fanout`: whether the user is leaving its room tab by tab (else
    /// joining it tab by tab).
    leaving: bool,
    /// When the user's last open and last close went out (the store does
    /// not acknowledge either).
    last_open: Option<Instant>,
    last_close: Option<Instant>,
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
        membership: Option<Membership>,
        tabs: usize,
        targets: &[Target],
        sources: &[IpAddr],
        shared: Arc<Shared>,
    ) -> Self {
        let urls = (0..tabs)
            .map(|i| {
                let t = (index + i) % targets.len();
                let who = format!("tab {i} of {name} on {}", targets[t].ws);
                (targets[t].tab_url(&name), t as u16, who.into())
            })
            .collect();
        let sources = (0..tabs)
            .map(|i| (!sources.is_empty()).then(|| sources[(index * tabs + i) % sources.len()]))
            .collect();
        Self {
            index,
            name,
            membership,
            urls,
            sources,
            tabs: (0..tabs).map(|_| None).collect(),
            log: TruthLog::default(),
            leaving: true,
            last_open: None,
            last_close: None,
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

    /// The open tabs' receiver logs (receivers only).
    pub fn open_logs(&self) -> impl Iterator<Item = &Arc<std::sync::Mutex<ReceiverLog>>> {
        self.tabs.iter().flatten().filter_map(|t| t.log.as_ref())
    }

    /// Waits until [`UNACKED_GAP`] after `last`.
    async fn space_after(last: Option<Instant>) {
        if let Some(t) = last {
            sleep_until((t + UNACKED_GAP).into()).await;
        }
    }

    /// Opens slot `i` (it must be empty), then joins the user's room.
    pub async fn open(&mut self, i: usize) {
        Self::space_after(self.last_close).await;
        self.last_open = Some(Instant::now());
        let started = self.shared.clock.now();
        let was_online = self.online();
        let (url, target, who) = self.urls[i].clone();
        let log = self
            .membership
            .as_ref()
            .filter(|m| m.receivers)
            .map(|m| ReceiverLog::new(Arc::clone(&m.room), Arc::clone(&m.user_prefix)));
        let Some(tab) = Tab::open((&url, target), self.sources[i], who, &self.shared, log).await
        else {
            return;
        };
        if !was_online {
            self.log.presence.push(Transition {
                to: true,
                sent: started,
                done: None,
                target,
            });
        }
        self.tabs[i] = Some(tab);
        if self.membership.is_some() {
            self.join(i).await;
        }
    }

    /// Joins the room with open slot `i`.
    async fn join(&mut self, i: usize) {
        let was_in_room = self.in_room();
        let own_before = self.log.room.len();
        let (Some(m), Some(tab)) = (&self.membership, self.tabs[i].as_mut()) else {
            return;
        };
        let sent = self.shared.clock.now();
        let Some(done) = tab.join(&m.room.name, sent, own_before, &self.shared).await else {
            return;
        };
        if !was_in_room {
            self.log.room.push(Transition {
                to: true,
                sent,
                done: Some(done),
                target: tab.target,
            });
        }
    }

    /// Leaves the room with open slot `i`.
    async fn leave(&mut self, i: usize) {
        let (Some(m), Some(tab)) = (&self.membership, self.tabs[i].as_mut()) else {
            return;
        };
        let sent = self.shared.clock.now();
        let target = tab.target;
        let Some(done) = tab.leave(&m.room.name, sent, &self.shared).await else {
            return;
        };
        if !self.in_room() {
            self.log.room.push(Transition {
                to: false,
                sent,
                done: Some(done),
                target,
            });
        }
    }

    /// Closes slot `i` if it is open.
    pub async fn close(&mut self, i: usize) {
        if self.tabs[i].is_none() {
            return;
        }
        Self::space_after(self.last_open).await;
        self.last_close = Some(Instant::now());
        let Some(tab) = self.tabs[i].take() else {
            return;
        };
        let sent = self.shared.clock.now();
        let target = tab.target;
        let was_joined = tab.joined;
        tab.close(&self.shared).await;
        if !self.online() {
            self.log.presence.push(Transition {
                to: false,
                sent,
                done: None,
                target,
            });
        }
        if was_joined && !self.in_room() {
            self.log.room.push(Transition {
                to: false,
                sent,
                done: None,
                target,
            });
        }
    }

    /// Closes every open tab.
    pub async fn close_all(&mut self) {
        for i in 0..self.tabs.len() {
            self.close(i).await;
        }
    }

    /// One `fanout` action: the user leaves its room tab by tab (the last
    /// leave makes it `left`), then joins it again tab by tab (the first
    /// join makes it `joined`), one tab per call.
    pub async fn fanout_step(&mut self) {
        let joined: Vec<usize> = (0..self.tabs.len())
            .filter(|&i| self.tabs[i].as_ref().is_some_and(|t| t.joined))
            .collect();
        let open: Vec<usize> = (0..self.tabs.len()).filter(|&i| self.is_open(i)).collect();
        if joined.is_empty() {
            self.leaving = false;
        } else if joined.len() == open.len() {
            self.leaving = true;
        }
        if self.leaving {
            if let Some(&i) = joined.last() {
                self.leave(i).await;
            }
        } else if let Some(&i) = open.iter().find(|&&i| !joined.contains(&i)) {
            self.join(i).await;
        }
    }
}
