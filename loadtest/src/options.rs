//! Command-line options: one struct shared by every scenario, so a storm
//! and a churn against the same cluster differ only in the subcommand.

use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use serde::{Deserialize, Serialize};

/// Least time between a user's connect and its next close, or close and
/// next connect (the users keep it; a `--reload-ms` must not be shorter).
pub const UNACKED_GAP: Duration = Duration::from_millis(50);

/// How far from a grace's end an open must start to be surely in time
/// (before it), or surely late (after it and the gateway's check of the
/// deadlines): covers the connect's and the close's way to the store.
pub const GRACE_MARGIN: Duration = Duration::from_millis(500);

/// Default users per run.
pub const DEFAULT_USERS: usize = 100;
/// Default tabs (connections) per user.
pub const DEFAULT_TABS: usize = 1;
/// Default users per room when `--rooms` is set.
pub const DEFAULT_ROOM_SIZE: usize = 10;
/// Default seconds a `churn` or `hold` run lasts.
pub const DEFAULT_DURATION_S: f64 = 10.0;
/// Default observers.
pub const DEFAULT_OBSERVERS: usize = 1;
/// Default tab opens+closes a second for `churn`.
pub const DEFAULT_CHURN_RATE: f64 = 500.0;
/// Default tab opens a second for `hold` (a storm defaults to unpaced),
/// and for the opens before a `fanout`.
pub const DEFAULT_HOLD_RATE: f64 = 1000.0;
/// Default joins+leaves a second for `fanout`.
pub const DEFAULT_FANOUT_RATE: f64 = 200.0;
/// Default `update` frames a second per member for `cursors`.
pub const DEFAULT_CURSOR_RATE: f64 = 30.0;
/// Default fraction of a killed node's users whose tab comes back
/// (`nodeloss`).
pub const DEFAULT_RETURN_FRACTION: f64 = 1.0;
/// Default spread of the returning tabs after the kill, ms (`nodeloss`).
pub const DEFAULT_RETURN_WITHIN_MS: u64 = 2000;

/// `presenced-load`: drives a presenced gateway or cluster with WebSocket
/// tabs and checks every event the observers see.
#[derive(Debug, Parser)]
#[command(name = "presenced-load", version, about)]
pub struct Cli {
    /// What load to apply.
    #[command(subcommand)]
    pub scenario: ScenarioCommand,
}

/// The subcommands; each carries the common options.
#[derive(Debug, Subcommand)]
pub enum ScenarioCommand {
    /// Open every tab as fast as --rate allows (unpaced by default), wait
    /// until the observers saw every user online, then close them all.
    Storm(Options),
    /// For --duration seconds, open and close random tabs at --rate
    /// actions a second in total.
    Churn(Options),
    /// Open every tab at --rate, hold them --duration seconds while the
    /// gateways' memory is sampled, then close them all.
    Hold(Options),
    /// Rooms of --room-size users, every tab a member: for --duration
    /// seconds members leave and re-join at --rate actions a second, and
    /// every member checks the joined/left it receives.
    Fanout(Options),
    /// One tab per user over the nodes: open them all, kill -9 the
    /// gateway --kill-target (pid --kill-pid), bring --return-fraction of
    /// its users back on the surviving nodes within --return-within-ms,
    /// check that they never went offline and that the others did, once.
    Nodeloss(Options),
    /// Rooms of --room-size users, one tab each: for --duration seconds
    /// every member sends `update` frames (a moving cursor) at --rate a
    /// second, and every member checks that it ends with every other
    /// member's last state, in order, never its own.
    Cursors(Options),
    /// A worker process of `--procs` (started by the tool itself; its
    /// orders come in the PRESENCED_LOAD_WORKER environment variable).
    #[command(hide = true)]
    Worker {
        /// Which shard of users this worker runs (users u with u % procs
        /// == shard).
        #[arg(long)]
        shard: usize,
    },
}

impl ScenarioCommand {
    /// The scenario and its options, or `None` for a worker.
    pub fn split(self) -> Option<(Scenario, Options)> {
        Some(match self {
            Self::Storm(o) => (Scenario::Storm, o),
            Self::Churn(o) => (Scenario::Churn, o),
            Self::Hold(o) => (Scenario::Hold, o),
            Self::Fanout(o) => (Scenario::Fanout, o),
            Self::Nodeloss(o) => (Scenario::Nodeloss, o),
            Self::Cursors(o) => (Scenario::Cursors, o),
            Self::Worker { .. } => return None,
        })
    }
}

/// Which load shape a run applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scenario {
    /// Everything opens at once, then closes at once.
    Storm,
    /// Random opens and closes at a steady rate.
    Churn,
    /// Everything opens, stays, then closes.
    Hold,
    /// Room members leave and re-join at a steady rate.
    Fanout,
    /// A node killed -9; some of its users come back on the others.
    Nodeloss,
    /// Room members send room states (`update`) at a steady rate.
    Cursors,
}

impl Scenario {
    /// The subcommand's name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Storm => "storm",
            Self::Churn => "churn",
            Self::Hold => "hold",
            Self::Fanout => "fanout",
            Self::Nodeloss => "nodeloss",
            Self::Cursors => "cursors",
        }
    }
}

/// Options common to every scenario.
#[derive(Debug, Clone, Args, Serialize, Deserialize)]
pub struct Options {
    /// Gateway WebSocket URLs, comma-separated (`ws://HOST:PORT/ws`); the
    /// tabs of one user are spread across them. The gateways must run with
    /// `--dev` (identity from `?user=`).
    #[arg(long, value_delimiter = ',', required = true)]
    pub targets: Vec<String>,
    /// Distinct users.
    #[arg(long, default_value_t = DEFAULT_USERS)]
    pub users: usize,
    /// Tabs (connections) per user.
    #[arg(long, default_value_t = DEFAULT_TABS)]
    pub tabs: usize,
    /// Rooms; the first rooms × room-size users each join one room with
    /// every tab. `fanout` needs rooms and runs exactly rooms × room-size
    /// users (--users is ignored).
    #[arg(long, default_value_t = 0)]
    pub rooms: usize,
    /// Users per room.
    #[arg(long, default_value_t = DEFAULT_ROOM_SIZE)]
    pub room_size: usize,
    /// Actions a second: tab opens+closes for churn, opens for storm and
    /// hold, leaves+joins for fanout (0 = as fast as possible); for
    /// cursors, `update` frames a second per member. Default: 500 for
    /// churn, 1000 for hold, 200 for fanout, 30 for cursors, unpaced for
    /// storm.
    #[arg(long)]
    pub rate: Option<f64>,
    /// Tab opens a second before a `fanout`'s or `cursors`' actions (0 =
    /// unpaced).
    #[arg(long, default_value_t = DEFAULT_HOLD_RATE)]
    pub open_rate: f64,
    /// Seconds of churn or fanout, or of holding in `hold`.
    #[arg(long, default_value_t = DEFAULT_DURATION_S)]
    pub duration: f64,
    /// Connections that watch every user and join every room, and check
    /// each event they receive.
    #[arg(long, default_value_t = DEFAULT_OBSERVERS)]
    pub observers: usize,
    /// Local addresses the tabs connect from, comma-separated (e.g.
    /// `127.0.0.2,127.0.0.3`), used in turn: each address has its own
    /// ~28k ephemeral ports towards one target. Default: the system's
    /// choice.
    #[arg(long, value_delimiter = ',')]
    pub source_addrs: Vec<std::net::IpAddr>,
    /// Worker processes the tabs run in (users u with u % procs == k in
    /// worker k); the observers and the checks stay in this process. One
    /// process may hold 20,000 open files here: use about one worker per
    /// 15,000 tabs.
    #[arg(long, default_value_t = 1)]
    pub procs: usize,
    /// Pids of the gateway processes, in the order of the distinct
    /// targets, for CPU time from /proc (default: found from each local
    /// target's listening port).
    #[arg(long, value_delimiter = ',')]
    pub gateway_pids: Vec<u32>,
    /// The cluster's Redis (`redis://HOST:PORT`), to count its `MULTI`/
    /// `EXEC` transactions (INFO commandstats) per 1,000 connects.
    #[arg(long)]
    pub redis: Option<String>,
    /// Print the report as one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
    /// The gateways' `--offline-grace-ms` (the tool cannot see it; 0 =
    /// the gateways run without a grace). With a grace, a tab close that
    /// ends a user's last tab (a reload, a crash: the tool sends 1001)
    /// leaves the user online and in its room until the grace runs out,
    /// and a tab of the user that opens within it means no event at all.
    #[arg(long, default_value_t = 0)]
    pub offline_grace_ms: u64,
    /// `churn`: an open tab the churn picks is reloaded (closed with 1001,
    /// re-opened in the same slot this many ms later) half the time, and
    /// closed for good the other half (0 = no reloads: every pick toggles
    /// the slot, as before). At least 50.
    #[arg(long, default_value_t = 0)]
    pub reload_ms: u64,
    /// `nodeloss`: the pid of the gateway to kill with SIGKILL.
    #[arg(long)]
    pub kill_pid: Option<u32>,
    /// `nodeloss`: the index in --targets of the gateway --kill-pid is.
    #[arg(long)]
    pub kill_target: Option<usize>,
    /// `nodeloss`: the fraction of the killed node's users whose tab
    /// reconnects to a surviving node; the others never return.
    #[arg(long, default_value_t = DEFAULT_RETURN_FRACTION)]
    pub return_fraction: f64,
    /// `nodeloss`: the returning tabs reconnect spread evenly over this
    /// many ms after the kill; must be under the grace by 500 ms.
    #[arg(long, default_value_t = DEFAULT_RETURN_WITHIN_MS)]
    pub return_within_ms: u64,
    /// The command that starts a worker (default: this executable with
    /// `worker`); tests point it at their own harness.
    #[arg(skip)]
    #[serde(skip)]
    pub worker_command: Vec<String>,
}

impl Options {
    /// Options for `users` users with `tabs` tabs each on `targets`, the
    /// rest at their defaults: what a test or a library caller starts from.
    pub fn new(targets: Vec<String>, users: usize, tabs: usize) -> Self {
        Self {
            targets,
            users,
            tabs,
            rooms: 0,
            room_size: DEFAULT_ROOM_SIZE,
            rate: None,
            open_rate: DEFAULT_HOLD_RATE,
            duration: DEFAULT_DURATION_S,
            observers: DEFAULT_OBSERVERS,
            source_addrs: Vec::new(),
            procs: 1,
            gateway_pids: Vec::new(),
            redis: None,
            json: false,
            offline_grace_ms: 0,
            reload_ms: 0,
            kill_pid: None,
            kill_target: None,
            return_fraction: DEFAULT_RETURN_FRACTION,
            return_within_ms: DEFAULT_RETURN_WITHIN_MS,
            worker_command: Vec::new(),
        }
    }

    /// The users of a run of `scenario`: rooms × room-size for `fanout`
    /// and `cursors`.
    pub fn users_for(&self, scenario: Scenario) -> usize {
        match scenario {
            Scenario::Fanout | Scenario::Cursors => self.rooms * self.room_size,
            _ => self.users,
        }
    }

    /// The pacing this scenario uses, in actions a second (0 = unpaced).
    pub fn rate_for(&self, scenario: Scenario) -> f64 {
        self.rate.unwrap_or(match scenario {
            Scenario::Storm => 0.0,
            Scenario::Churn => DEFAULT_CHURN_RATE,
            Scenario::Hold | Scenario::Nodeloss => DEFAULT_HOLD_RATE,
            Scenario::Fanout => DEFAULT_FANOUT_RATE,
            Scenario::Cursors => DEFAULT_CURSOR_RATE,
        })
    }

    /// Refuses option combinations that cannot run.
    pub fn validate(&self, scenario: Scenario) -> anyhow::Result<()> {
        anyhow::ensure!(!self.targets.is_empty(), "--targets needs at least one URL");
        anyhow::ensure!(self.procs > 0, "--procs must be at least 1");
        if matches!(scenario, Scenario::Fanout | Scenario::Cursors) {
            let name = scenario.name();
            anyhow::ensure!(
                self.rooms > 0 && self.room_size > 0,
                "{name} needs --rooms and --room-size of at least 1"
            );
            anyhow::ensure!(
                self.rooms.is_multiple_of(self.procs),
                "{name}: --rooms must be a multiple of --procs (a room's members live in one worker)"
            );
        }
        if scenario == Scenario::Cursors {
            // One tab per member: an `updated` at a member's tab is then
            // never its own, which the check relies on.
            anyhow::ensure!(self.tabs == 1, "cursors runs one tab per member (--tabs 1)");
            anyhow::ensure!(
                self.rate_for(scenario) > 0.0,
                "cursors needs a --rate above 0 (updates a second per member)"
            );
        }
        anyhow::ensure!(self.users_for(scenario) > 0, "--users must be at least 1");
        anyhow::ensure!(self.tabs > 0, "--tabs must be at least 1");
        anyhow::ensure!(
            self.observers > 0,
            "--observers must be at least 1: correctness checks are always on"
        );
        anyhow::ensure!(
            self.rooms == 0 || self.room_size > 0,
            "--room-size must be at least 1"
        );
        anyhow::ensure!(
            self.duration >= 0.0 && self.duration.is_finite(),
            "--duration must be a number of seconds"
        );
        anyhow::ensure!(
            self.rate.is_none_or(|r| r >= 0.0 && r.is_finite()),
            "--rate must be 0 or more"
        );
        anyhow::ensure!(
            self.open_rate >= 0.0 && self.open_rate.is_finite(),
            "--open-rate must be 0 or more"
        );
        anyhow::ensure!(
            self.reload_ms == 0 || scenario == Scenario::Churn,
            "--reload-ms is for churn"
        );
        anyhow::ensure!(
            self.reload_ms == 0 || self.reload_ms >= UNACKED_GAP.as_millis() as u64,
            "--reload-ms must be 0 or at least {} (a user's open follows its close by that much)",
            UNACKED_GAP.as_millis()
        );
        if scenario == Scenario::Nodeloss {
            let (Some(_), Some(k)) = (self.kill_pid, self.kill_target) else {
                anyhow::bail!("nodeloss needs --kill-pid and --kill-target");
            };
            anyhow::ensure!(
                self.targets.len() >= 2 && k < self.targets.len(),
                "nodeloss needs at least 2 --targets, and --kill-target below their count"
            );
            anyhow::ensure!(self.tabs == 1, "nodeloss runs one tab per user (--tabs 1)");
            anyhow::ensure!(self.procs == 1, "nodeloss runs in one process (--procs 1)");
            anyhow::ensure!(
                (0.0..=1.0).contains(&self.return_fraction),
                "--return-fraction must be within 0 ..= 1"
            );
            let margin = GRACE_MARGIN.as_millis() as u64;
            anyhow::ensure!(
                self.return_fraction == 0.0
                    || self.return_within_ms + margin <= self.offline_grace_ms,
                "nodeloss: --return-within-ms + {margin} must be at most --offline-grace-ms \
                 (whether a tab that comes back later was in time is not known to the tool)"
            );
        }
        for t in &self.targets {
            crate::target::Target::parse(t)?;
        }
        Ok(())
    }
}
