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
//!
//! With the gateways' offline grace (`--offline-grace-ms`), a close with
//! 1001 (a reload, a crash) that ends the user's last tab, or its last tab
//! in its room, is no transition yet: the user is in its grace. A tab of
//! the user that opens before the grace runs out cancels it (no event, no
//! `seq`); otherwise the `offline` (and `left`) is due once it ran out,
//! and is logged then, stamped with the close. Whether an open came in
//! time is decided from the close's moment: an open that would start
//! within [`GRACE_MARGIN`] of the grace's end, or before the gateway's
//! check of the deadlines (a twentieth of the grace, 50 ms to 1 s) and that margin are
//! surely past, waits until they are, so no open races the deadline. A
//! close with 1000 (a sign-out: the final close of every tab) has no
//! grace.

use std::{
    net::IpAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::time::sleep_until;

use crate::{
    clock::Stamp,
    cursor::{UpdateTally, state},
    options::{GRACE_MARGIN, UNACKED_GAP},
    stats::Shared,
    tab::{CloseAs, ReceiverLog, RoomIndex, Tab},
    target::Target,
    truth::{Reload, Transition, TruthLog},
};

/// A grace the user is in: its last tab (or last tab in its room) closed
/// with 1001, or its node was killed.
#[derive(Debug, Clone, Copy)]
struct Grace {
    /// The Close sent (the kill, for a lost tab).
    sent: Stamp,
    /// `sent` + the grace, on this process's clock.
    ends: Instant,
    /// The target of the tab that ended it.
    target: u16,
    /// Whether it ended the user's presence (else only its room stay).
    presence: bool,
    /// Whether it ended the user's room stay.
    room: bool,
    /// The tab's node was killed: the grace starts only at the reap, so
    /// only an open well before `ends` is known to be in time.
    lost: bool,
}

/// The room of a user, when it has one.
#[derive(Debug, Clone)]
pub struct Membership {
    /// The room and its members.
    pub room: Arc<RoomIndex>,
    /// Whether every tab records its room's events (`fanout`,
    /// `cursors`).
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
    /// The gateways' offline grace (zero: none).
    grace: Duration,
    /// The grace the user is in, if any.
    in_grace: Option<Grace>,
    /// The open under way cancelled a room grace: its join is no
    /// transition.
    rejoin_in_grace: bool,
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
            grace: Duration::ZERO,
            in_grace: None,
            rejoin_in_grace: false,
            shared,
        }
    }

    /// The same user, against gateways with this offline grace.
    pub fn with_grace(mut self, grace: Duration) -> Self {
        self.grace = grace;
        self
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

    /// Whether the user is online, as the truth has it (an open tab, or
    /// in its grace).
    pub fn online(&self) -> bool {
        self.open_count() > 0 || self.in_grace.is_some_and(|g| g.presence)
    }

    /// Whether the user is in its room, as the truth has it (an open tab
    /// in it, or in its grace).
    pub fn in_room(&self) -> bool {
        self.joined_tabs() > 0 || self.in_grace.is_some_and(|g| g.room)
    }

    fn joined_tabs(&self) -> usize {
        self.tabs.iter().flatten().filter(|t| t.joined).count()
    }

    /// When a grace that ran from `ends − grace` is surely over at the
    /// gateway: its end, the gateway's check of the deadlines (a
    /// twentieth of the grace, 50 ms to 1 s) and [`GRACE_MARGIN`].
    fn surely_over(&self, ends: Instant) -> Instant {
        let check = (self.grace / 20).clamp(Duration::from_millis(50), Duration::from_secs(1));
        ends + check + GRACE_MARGIN
    }

    /// The user's grace ran out: its `offline` (and `left`) are due.
    fn grace_ran_out(&mut self, g: Grace) {
        let t = Transition {
            to: false,
            sent: g.sent,
            done: None,
            target: g.target,
            grace_us: self.grace.as_micros() as u64,
            lost: g.lost,
        };
        if g.presence {
            self.log.presence.push(t);
        }
        if g.room {
            self.log.room.push(t);
        }
    }

    /// Before an open: settles the grace the user is in. Returns it if the
    /// open comes surely in time (it cancels the grace); logs the grace's
    /// events and returns `None` if it comes surely late, after waiting
    /// past its end if it would start too close to it.
    async fn settle_grace_before_open(&mut self) -> Option<Grace> {
        let g = self.in_grace.take()?;
        let now = Instant::now();
        if now + GRACE_MARGIN < g.ends {
            return Some(g);
        }
        if g.lost {
            // The grace of a lost tab starts at the reap, which the tool
            // does not see: an open this late may or may not be in time.
            self.shared.error("nodeloss_return_late", || {
                format!(
                    "{} came back less than {GRACE_MARGIN:?} before the grace after the kill ran out: whether in time is unknown",
                    self.name
                )
            });
            return Some(g);
        }
        sleep_until(self.surely_over(g.ends).into()).await;
        self.grace_ran_out(g);
        None
    }

    /// The end of the action phase: waits until every grace the user is in
    /// surely ran out, and logs its events (so the checks that follow see
    /// a settled truth).
    pub async fn let_grace_run_out(&mut self) {
        if let Some(g) = self.in_grace.take() {
            sleep_until(self.surely_over(g.ends).into()).await;
            self.grace_ran_out(g);
        }
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

    /// Opens slot `i` (it must be empty), then joins the user's room;
    /// returns when the connect started.
    pub async fn open(&mut self, i: usize) -> Stamp {
        Self::space_after(self.last_close).await;
        let cancelled = self.settle_grace_before_open().await;
        self.last_open = Some(Instant::now());
        let started = self.shared.clock.now();
        let was_online = self.open_count() > 0 || cancelled.is_some_and(|g| g.presence);
        let (url, target, who) = self.urls[i].clone();
        let log =
            self.membership.as_ref().filter(|m| m.receivers).map(|m| {
                ReceiverLog::new(Arc::clone(&m.room), Arc::clone(&m.user_prefix), self.index)
            });
        let Some(tab) = Tab::open((&url, target), self.sources[i], who, &self.shared, log).await
        else {
            // Nothing came up: the grace goes on.
            self.in_grace = cancelled;
            return started;
        };
        if !was_online {
            self.log.presence.push(Transition {
                to: true,
                sent: started,
                done: None,
                target,
                grace_us: 0,
                lost: false,
            });
        }
        self.tabs[i] = Some(tab);
        match cancelled {
            Some(g) if g.room && self.membership.is_some() => self.rejoin_in_grace = true,
            // Back online, but the room stay is not back until a join:
            // none comes, so it runs out.
            Some(g) if g.room => {
                self.in_grace = Some(Grace {
                    presence: false,
                    ..g
                })
            }
            _ => {}
        }
        if self.membership.is_some() {
            self.join(i).await;
        }
        self.rejoin_in_grace = false;
        started
    }

    /// Joins the room with open slot `i`.
    async fn join(&mut self, i: usize) {
        let was_in_room = self.joined_tabs() > 0 || self.rejoin_in_grace;
        let own_before = self.log.room.len();
        let (Some(m), Some(tab)) = (&self.membership, self.tabs[i].as_mut()) else {
            return;
        };
        let sent = self.shared.clock.now();
        let Some(done) = tab.join(&m.room.name, sent, own_before, &self.shared).await else {
            return;
        };
        self.rejoin_in_grace = false;
        if !was_in_room {
            self.log.room.push(Transition {
                to: true,
                sent,
                done: Some(done),
                target: tab.target,
                grace_us: 0,
                lost: false,
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
        // An explicit leave has no grace.
        if self.joined_tabs() == 0 {
            self.log.room.push(Transition {
                to: false,
                sent,
                done: Some(done),
                target,
                grace_us: 0,
                lost: false,
            });
        }
    }

    /// A tab of the user ended at `sent` (`at` on this clock): logs the
    /// transitions it made, or starts the grace (`graced`).
    fn tab_ended(
        &mut self,
        (sent, at): (Stamp, Instant),
        target: u16,
        was_joined: bool,
        graced: bool,
        lost: bool,
    ) {
        let presence = self.open_count() == 0;
        let room = was_joined && self.joined_tabs() == 0;
        if graced && !self.grace.is_zero() && (presence || room) {
            self.in_grace = Some(Grace {
                sent,
                ends: at + self.grace,
                target,
                presence,
                room,
                lost,
            });
            return;
        }
        let t = Transition {
            to: false,
            sent,
            done: None,
            target,
            grace_us: 0,
            lost,
        };
        if presence {
            self.log.presence.push(t);
        }
        if room {
            self.log.room.push(t);
        }
    }

    /// Closes slot `i` if it is open (`how`: 1001 or 1000); returns when
    /// the Close went out.
    pub async fn close(&mut self, i: usize, how: CloseAs) -> Option<(Stamp, Instant)> {
        self.tabs[i].as_ref()?;
        Self::space_after(self.last_open).await;
        let tab = self.tabs[i].take()?;
        let at = Instant::now();
        self.last_close = Some(at);
        let sent = self.shared.clock.now();
        if let Some(r) = self.log.reloads.last_mut().filter(|r| r.until.is_none()) {
            r.until = Some(sent);
        }
        let (target, was_joined) = (tab.target, tab.joined);
        tab.close(how, &self.shared).await;
        self.tab_ended((sent, at), target, was_joined, how == CloseAs::Away, false);
        Some((sent, at))
    }

    /// Closes every open tab with 1000: a sign-out, which ends presence at
    /// once (the final close of a run, so its check need not wait out the
    /// grace).
    pub async fn close_all(&mut self) {
        for i in 0..self.tabs.len() {
            self.close(i, CloseAs::SignOut).await;
        }
    }

    /// A reload of slot `i` (it must be open): Close 1001, then the same
    /// slot re-opens `after` the Close went out.
    pub async fn reload(&mut self, i: usize, after: Duration) {
        let last_tab = self.open_count() == 1;
        let last_in_room =
            self.tabs[i].as_ref().is_some_and(|t| t.joined) && self.joined_tabs() == 1;
        let Some((closed, at)) = self.close(i, CloseAs::Away).await else {
            return;
        };
        sleep_until((at + after).into()).await;
        let reopened = self.open(i).await;
        self.log.reloads.push(Reload {
            closed,
            reopened,
            last_tab,
            last_in_room,
            until: None,
        });
    }

    /// The target slot `i` connects to.
    pub fn target_of(&self, i: usize) -> u16 {
        self.urls[i].1
    }

    /// Points slot `i` at another target (`nodeloss`: its node died).
    pub fn retarget(&mut self, i: usize, target: &Target, index: u16) {
        let who = format!("tab {i} of {} on {}", self.name, target.ws);
        self.urls[i] = (target.tab_url(&self.name), index, who.into());
    }

    /// Marks the tabs on `target` as about to lose their node.
    pub fn expect_loss(&self, target: u16) {
        for t in self.tabs.iter().flatten().filter(|t| t.target == target) {
            t.expect_loss();
        }
    }

    /// The node of `target` was killed at `kill`: its tabs are gone, and
    /// the user is in its grace (if that was its last tab).
    pub fn lose(&mut self, target: u16, kill: (Stamp, Instant)) {
        for i in 0..self.tabs.len() {
            if self.tabs[i].as_ref().is_some_and(|t| t.target == target) {
                // unwrap: just checked.
                let tab = self.tabs[i].take().unwrap();
                let was_joined = tab.joined;
                tab.lose(&self.shared);
                self.tab_ended(kill, target, was_joined, true, true);
            }
        }
    }

    /// `nodeloss`: the user does not come back; its grace (after the reap)
    /// will run out, so its `offline` is due.
    pub fn stay_lost(&mut self) {
        if let Some(g) = self.in_grace.take() {
            self.grace_ran_out(g);
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

    /// `cursors`: from tab 0, sends an `update` of the user's room every
    /// `1 / rate` s (the first at `start`) until `end`, the `n`th with
    /// [`state`]`(n)`; returns when each went out, by `n` − 1. Sends do not
    /// wait for replies; a send that fails ends the moves.
    pub async fn move_cursor(&mut self, rate: f64, start: Instant, end: Instant) -> Vec<Stamp> {
        let mut sent = Vec::new();
        let (Some(m), Some(tab)) = (&self.membership, self.tabs[0].as_mut()) else {
            return sent;
        };
        let period = Duration::from_secs_f64(1.0 / rate);
        loop {
            let at = start + period.mul_f64(sent.len() as f64);
            if at >= end {
                return sent;
            }
            sleep_until(at.into()).await;
            let stamp = self.shared.clock.now();
            if !tab
                .update(&m.room.name, &state(sent.len() as u64 + 1), &self.shared)
                .await
            {
                return sent;
            }
            sent.push(stamp);
        }
    }

    /// `cursors`: waits for the replies to tab 0's `update`s; what they
    /// said.
    pub async fn cursor_replies(&mut self) -> UpdateTally {
        match self.tabs[0].as_mut() {
            Some(tab) => tab.update_replies(&self.shared).await,
            None => UpdateTally::default(),
        }
    }
}
