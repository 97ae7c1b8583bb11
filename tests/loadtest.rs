//! The load tool against the real gateway: a small churn must come out
//! correct (no missed, duplicated or out-of-order event at the observers,
//! and the gateway's answers equal to the tool's truth), on one in-memory
//! node and on a two-node Redis cluster; so must a storm, a fanout (every
//! member tab checked too), a churn run in two worker processes, and
//! `cursors` (room states: every member ends with every other member's
//! last state) on one memory node and across two Redis nodes, while a
//! gateway that refuses the updates makes a `cursors` run incorrect. This
//! keeps `presenced-load` honest as the gateway changes, and the gateway
//! honest under the tool. A run the gateway cuts short (its observer
//! closed as a slow consumer, or the gateway killed) must end with one
//! line naming the observer, the step and the close, and exit status 1,
//! never with a panic.

mod support;

use std::{
    process::Output,
    time::{Duration, Instant},
};

use clap::Parser;
use presenced_load::{
    Failure, Options, Report, Scenario, Step, observer::ObserverError, options::Cli, ws::SocketEnd,
};
use support::{EVENT_TIMEOUT, Gateway, RedisServer, alone_within_scenario_timeout};
use tokio::{process::Command, time::sleep};

/// Where `load_cli_entry` finds its command line (a JSON array).
const CLI_ARGS_ENV: &str = "PRESENCED_LOAD_TEST_CLI_ARGS";
/// How often a test looks at the gateway's `/metrics` while it waits.
const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// Every error the tool saw, by kind. A tab that sent its Close must get
/// the gateway's Close reply, not a reset (`after_close_*` errors).
fn errors(report: &Report) -> Vec<(&String, &u64)> {
    report.errors.iter().collect()
}

/// Runs `scenario` and fails with the whole table when it is not correct.
async fn run_correct(scenario: Scenario, opts: &Options) -> Report {
    let report = presenced_load::run(scenario, opts, false)
        .await
        .expect("the run completes");
    assert!(report.correct(), "incorrect run:\n{}", report.table());
    report
}

/// 50 users × 2 tabs churning 3 s, the first 40 in 4 rooms, 2 observers.
fn small_churn(targets: Vec<String>) -> Options {
    let mut opts = Options::new(targets, 50, 2);
    opts.rooms = 4;
    opts.room_size = 10;
    opts.duration = 3.0;
    opts.rate = Some(200.0);
    opts.observers = 2;
    opts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn churn_on_one_memory_node_is_correct() {
    alone_within_scenario_timeout(async {
        let gateway = Gateway::memory(&[]).await;
        let report = run_correct(Scenario::Churn, &small_churn(vec![gateway.ws_url_base()])).await;
        assert!(report.connects > 0 && report.closes == report.connects);
        assert!(report.events > 0, "the observers saw events");
        assert!(
            report.event_latency.joined.n > 0,
            "room events were checked"
        );
        assert!(
            report.event_latency.offline.n > 0,
            "offline events were timed"
        );
        assert_eq!(errors(&report), vec![], "{}", report.table());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn churn_across_two_redis_nodes_is_correct() {
    alone_within_scenario_timeout(async {
        let redis = RedisServer::start().await;
        let a = Gateway::redis(&redis, &[]).await;
        let b = Gateway::redis(&redis, &[]).await;
        let targets = vec![a.ws_url_base(), b.ws_url_base()];
        let report = run_correct(Scenario::Churn, &small_churn(targets)).await;
        assert_eq!(errors(&report), vec![], "{}", report.table());
        assert_eq!(report.gateway.targets.len(), 2);
        assert!(
            report.gateway.targets.iter().all(|t| t.before.is_some()),
            "both gateways' /metrics were read"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storm_from_two_source_addresses_is_correct() {
    alone_within_scenario_timeout(async {
        let gateway = Gateway::memory(&[]).await;
        let mut opts = Options::new(vec![gateway.ws_url_base()], 200, 2);
        // Linux answers on all of 127.0.0.0/8.
        opts.source_addrs = vec![[127, 0, 0, 2].into(), [127, 0, 0, 3].into()];
        let report = run_correct(Scenario::Storm, &opts).await;
        assert_eq!(report.connects, 400);
        assert_eq!(report.checks[0].users_online, 200);
        assert!(report.gateway.kib_per_tab.is_some());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fanout_across_two_redis_nodes_is_correct_at_every_member() {
    alone_within_scenario_timeout(async {
        let redis = RedisServer::start().await;
        let a = Gateway::redis(&redis, &[]).await;
        let b = Gateway::redis(&redis, &[]).await;
        // 4 rooms of 5 users × 2 tabs (one on each node), 3 s of leaves and
        // joins at 100 a second.
        let mut opts = Options::new(vec![a.ws_url_base(), b.ws_url_base()], 0, 2);
        opts.rooms = 4;
        opts.room_size = 5;
        opts.duration = 3.0;
        opts.rate = Some(100.0);
        let report = run_correct(Scenario::Fanout, &opts).await;
        assert_eq!(errors(&report), vec![], "{}", report.table());
        let f = report.fanout.as_ref().expect("fanout figures");
        assert!(f.transitions > 50, "{}", report.table());
        assert!(
            f.windows > 40,
            "members left and re-joined: {}",
            report.table()
        );
        assert!(f.member_latency_left.n > 0 && f.member_latency_joined.n > 0);
        assert!(report.event_latency_cross_node.left.n > 0);
    })
    .await;
}

/// 3 rooms of 5 members, each sending 30 updates a second for 2 s: the
/// gateway writes 10 a second per member (`--state-rate`), the rest are
/// superseded.
fn small_cursors(targets: Vec<String>) -> Options {
    let mut opts = Options::new(targets, 0, 1);
    opts.rooms = 3;
    opts.room_size = 5;
    opts.rate = Some(30.0);
    opts.duration = 2.0;
    opts
}

/// Checks a correct `cursors` run's figures against what the gateway
/// promises: every update answered, some written and some superseded,
/// each written state delivered to the 4 other members and the observer.
fn assert_cursor_figures(report: &Report) {
    let table = report.table();
    assert_eq!(errors(report), vec![], "{table}");
    let c = report.cursors.as_ref().expect("cursors figures");
    let u = &c.updates;
    // 60 sends in 2 s per member, the first at a random point of the
    // first 1/30 s.
    assert!(u.sent >= 15 * 59 && u.sent <= 15 * 60, "{table}");
    assert_eq!(u.written + u.superseded, u.sent, "{table}");
    assert!(u.written >= 15 * 15 && u.superseded > u.written, "{table}");
    assert_eq!(c.deliveries, u.written * 4, "{table}");
    assert_eq!(c.observer_deliveries, u.written, "{table}");
    assert_eq!(c.latency.n, c.deliveries, "{table}");
    assert!(c.gateway_cpu_s.is_some(), "{table}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cursors_on_one_memory_node_are_correct() {
    alone_within_scenario_timeout(async {
        let gateway = Gateway::memory(&[]).await;
        let opts = small_cursors(vec![gateway.ws_url_base()]);
        let report = run_correct(Scenario::Cursors, &opts).await;
        assert_cursor_figures(&report);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cursors_across_two_redis_nodes_are_correct() {
    alone_within_scenario_timeout(async {
        let redis = RedisServer::start().await;
        let a = Gateway::redis(&redis, &[]).await;
        let b = Gateway::redis(&redis, &[]).await;
        let mut opts = small_cursors(vec![a.ws_url_base(), b.ws_url_base()]);
        opts.redis = Some(redis.url());
        let report = run_correct(Scenario::Cursors, &opts).await;
        assert_cursor_figures(&report);
        let c = report.cursors.as_ref().expect("cursors figures");
        assert!(
            c.redis_commands_per_s.is_some_and(|n| n > 0.0),
            "{}",
            report.table()
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cursors_against_a_gateway_that_refuses_the_updates_are_incorrect() {
    alone_within_scenario_timeout(async {
        // 30 updates a second against a limit of 5: most are refused
        // rate_limited (or the tab closed with 4029), so the last states
        // cannot all arrive.
        let gateway = Gateway::memory(&["--max-update-rate", "5"]).await;
        let opts = small_cursors(vec![gateway.ws_url_base()]);
        let report = presenced_load::run(Scenario::Cursors, &opts, false)
            .await
            .expect("the run completes: refusals are counted, not fatal");
        assert!(!report.correct(), "{}", report.table());
        let c = report.cursors.as_ref().expect("cursors figures");
        assert!(
            c.updates.refused > 0 || c.closed_by_server > 0,
            "{}",
            report.table()
        );
        assert!(
            report
                .errors
                .keys()
                .any(|k| k == "tab_error_rate_limited" || k.starts_with("closed_by_server")),
            "{}",
            report.table()
        );
    })
    .await;
}

/// Not a test of its own: the worker processes of
/// `churn_in_two_worker_processes_is_correct` are this test binary running
/// only this function, with their orders in the environment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_worker_entry() {
    if let Some(result) = presenced_load::worker::serve_from_env().await {
        result.expect("the worker runs its shard");
        // This process is the tool's worker, not a test: it ends as one.
        #[allow(clippy::exit)]
        std::process::exit(0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn churn_in_two_worker_processes_is_correct() {
    alone_within_scenario_timeout(async {
        let redis = RedisServer::start().await;
        let a = Gateway::redis(&redis, &[]).await;
        let b = Gateway::redis(&redis, &[]).await;
        let mut opts = small_churn(vec![a.ws_url_base(), b.ws_url_base()]);
        opts.procs = 2;
        let exe = std::env::current_exe().expect("test binary");
        opts.worker_command = vec![
            exe.to_string_lossy().into_owned(),
            "load_worker_entry".into(),
            "--exact".into(),
            "--nocapture".into(),
            "--test-threads=1".into(),
        ];
        let report = run_correct(Scenario::Churn, &opts).await;
        assert_eq!(report.procs, 2);
        assert_eq!(errors(&report), vec![], "{}", report.table());
        assert!(report.connects > 0 && report.closes == report.connects);
        assert!(report.event_latency.joined.n > 0, "{}", report.table());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tab_the_gateway_refuses_is_named_in_the_report_with_its_step() {
    alone_within_scenario_timeout(async {
        // One connection per user: every user's second tab is refused.
        let gateway = Gateway::memory(&["--max-conns-per-user", "1"]).await;
        let target = gateway.ws_url_base();
        let opts = Options::new(vec![target.clone()], 20, 2);
        let report = presenced_load::run(Scenario::Storm, &opts, false)
            .await
            .expect("the run completes: a refused tab is counted, not fatal");
        assert_eq!(report.errors.get("connect_http_429"), Some(&20));
        let first = &report.first_errors["connect_http_429"];
        assert!(first.starts_with("tab 1 of lt"), "{first}");
        assert!(
            first.ends_with(&format!(
                " on {target} could not connect: the upgrade was answered with HTTP 429 during the storm"
            )),
            "{first}"
        );
        assert!(report.table().contains(first.as_str()));
    })
    .await;
}

/// Not a test of its own: `run_cli` runs this test binary with only this
/// function, which then runs the tool's command line exactly as the
/// `presenced-load` binary does (print, exit status), with the arguments
/// in the environment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_cli_entry() {
    if let Ok(args) = std::env::var(CLI_ARGS_ENV) {
        let args: Vec<String> = serde_json::from_str(&args).expect("the arguments as JSON");
        let cli = Cli::try_parse_from(std::iter::once("presenced-load".to_owned()).chain(args))
            .expect("a valid command line");
        let ok = presenced_load::cli::execute(cli, false).await;
        // This process is the tool's command line, not a test: it ends
        // with the tool's status.
        #[allow(clippy::exit)]
        std::process::exit(if ok { 0 } else { 1 });
    }
}

/// Runs `presenced-load ARGS` (through `load_cli_entry`) to its end.
async fn run_cli(args: &[&str]) -> Output {
    let exe = std::env::current_exe().expect("test binary");
    Command::new(exe)
        .args([
            "load_cli_entry",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CLI_ARGS_ENV, serde_json::to_string(args).unwrap())
        .kill_on_drop(true)
        .output()
        .await
        .expect("the tool runs")
}

/// The tool's own lines on stdout. The test harness prints its own too,
/// and its `test load_cli_entry ... ` starts the line the tool's first
/// output goes on.
fn tool_lines(stdout: &[u8]) -> Vec<String> {
    String::from_utf8_lossy(stdout)
        .lines()
        .filter_map(|l| l.find("presenced-load ").map(|i| l[i..].to_owned()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_observer_cut_off_as_a_slow_consumer_ends_the_run_with_one_failure_line() {
    alone_within_scenario_timeout(async {
        // An outbox of one frame: the first store batch of a storm's
        // `online`s overflows the observer's four times over, and the
        // gateway closes it with 4008 at once.
        let gateway = Gateway::memory(&["--outbox-messages", "1"]).await;
        let target = gateway.ws_url_base();
        let out = run_cli(&["storm", "--targets", &target, "--users", "300"]).await;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!stderr.contains("panicked"), "the tool panicked:\n{stderr}");
        assert_eq!(out.status.code(), Some(1), "{out:?}");
        let lines = tool_lines(&out.stdout);
        assert_eq!(lines.len(), 1, "one report line: {lines:#?}");
        let expected = format!(
            "presenced-load storm: FAILED: observer 0 was closed by {target} with 4008 slow consumer during the storm; "
        );
        let hint = lines[0]
            .strip_prefix(&expected)
            .unwrap_or_else(|| panic!("{:?} does not start with {expected:?}", lines[0]));
        assert!(hint.contains("--outbox-messages"), "{hint}");
    })
    .await;
}

/// Waits until the gateway opened at least `n` connections.
async fn wait_for_connections(gateway: &Gateway, n: f64) {
    let deadline = Instant::now() + EVENT_TIMEOUT;
    while gateway.metric("presenced_connections_opened_total").await < n {
        assert!(
            Instant::now() < deadline,
            "fewer than {n} connections within {EVENT_TIMEOUT:?}"
        );
        sleep(POLL_INTERVAL).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_churn_whose_gateway_is_killed_fails_at_once_naming_the_observer_and_the_step() {
    alone_within_scenario_timeout(async {
        let mut gateway = Gateway::memory(&[]).await;
        let mut opts = small_churn(vec![gateway.ws_url_base()]);
        opts.observers = 1;
        // Far longer than the test waits: the run must not sit it out.
        opts.duration = 60.0;
        let target = gateway.ws_url_base();
        let load = presenced_load::run(Scenario::Churn, &opts, false);
        let kill = async {
            // The observer and a good part of the tabs are in.
            wait_for_connections(&gateway, 30.0).await;
            gateway.kill().await;
            Instant::now()
        };
        let (result, killed) = tokio::join!(load, kill);
        let ended = killed.elapsed();
        match result {
            Err(Failure::Observer {
                index: 0,
                step: Step::Actions(Scenario::Churn),
                error:
                    ObserverError::Closed {
                        target: t,
                        end: SocketEnd::Broken(_),
                    },
            }) if t == target => {}
            other => panic!("not the observer's lost connection during the churn: {other:?}"),
        }
        assert!(
            ended < Duration::from_secs(10),
            "the run went on {ended:?} after the gateway died"
        );
    })
    .await;
}

/// 40 users × 1 tab (the first 20 in 2 rooms) on two Redis nodes, churning
/// 4 s at 40 actions a second: each user acts about once a second, and
/// half of its actions on its open tab are reloads of 200 ms.
fn reload_churn(targets: Vec<String>, grace_ms: u64) -> Options {
    let mut opts = Options::new(targets, 40, 1);
    opts.rooms = 2;
    opts.room_size = 10;
    opts.duration = 4.0;
    opts.rate = Some(40.0);
    opts.reload_ms = 200;
    opts.offline_grace_ms = grace_ms;
    opts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloads_within_the_grace_show_observers_no_flap() {
    alone_within_scenario_timeout(async {
        let redis = RedisServer::start().await;
        let grace = ["--offline-grace-ms", "2000"];
        let a = Gateway::redis(&redis, &grace).await;
        let b = Gateway::redis(&redis, &grace).await;
        let opts = reload_churn(vec![a.ws_url_base(), b.ws_url_base()], 2000);
        let report = run_correct(Scenario::Churn, &opts).await;
        assert_eq!(errors(&report), vec![], "{}", report.table());
        let r = report.reload.expect("reload figures");
        assert!(r.reloads_of_last_tab > 10, "{}", report.table());
        assert!(r.reloads_of_last_room_tab > 0, "{}", report.table());
        assert_eq!((r.flaps, r.room_flaps), (0, 0), "{}", report.table());
        // Closes for good whose grace ran out (at the latest at the end of
        // the churn) did send their offline, after the grace.
        assert!(report.event_latency.offline.n > 0, "{}", report.table());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloads_without_a_grace_flap_once_per_reload_of_a_last_tab() {
    alone_within_scenario_timeout(async {
        let redis = RedisServer::start().await;
        let a = Gateway::redis(&redis, &[]).await;
        let b = Gateway::redis(&redis, &[]).await;
        let opts = reload_churn(vec![a.ws_url_base(), b.ws_url_base()], 0);
        let report = run_correct(Scenario::Churn, &opts).await;
        assert_eq!(errors(&report), vec![], "{}", report.table());
        let r = report.reload.expect("reload figures");
        assert!(r.reloads_of_last_tab > 10, "{}", report.table());
        assert_eq!(r.flaps, r.reloads_of_last_tab, "{}", report.table());
        assert_eq!(
            r.room_flaps,
            r.reloads_of_last_room_tab,
            "{}",
            report.table()
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_node_whose_users_come_back_elsewhere_shows_no_offline_for_them() {
    alone_within_scenario_timeout(async {
        let redis = RedisServer::start().await;
        let flags = ["--node-lease-ms", "1000", "--offline-grace-ms", "1500"];
        let a = Gateway::redis(&redis, &flags).await;
        let b = Gateway::redis(&redis, &flags).await;
        let c = Gateway::redis(&redis, &flags).await;
        // 150 users, one tab each, 50 of them on b; 5 rooms of 10.
        let mut opts = Options::new(
            vec![a.ws_url_base(), b.ws_url_base(), c.ws_url_base()],
            150,
            1,
        );
        opts.rooms = 5;
        opts.room_size = 10;
        opts.offline_grace_ms = 1500;
        opts.kill_target = Some(1);
        opts.kill_pid = Some(b.pid());
        opts.return_fraction = 0.6;
        opts.return_within_ms = 800;
        let report = run_correct(Scenario::Nodeloss, &opts).await;
        assert_eq!(errors(&report), vec![], "{}", report.table());
        let n = report.nodeloss.as_ref().expect("nodeloss figures");
        assert_eq!(
            (n.lost_users, n.returned_users),
            (50, 30),
            "{}",
            report.table()
        );
        assert_eq!(
            (n.returned_offlines, n.returned_lefts),
            (0, 0),
            "{}",
            report.table()
        );
        // Every user who did not come back went offline exactly once.
        assert_eq!(n.gone_offlines, 20, "{}", report.table());
        assert_eq!(n.gone_offlines_expected, 20);
        let d = &n.time_to_offline;
        // Not before the grace; within lease + reaper + grace and slack.
        assert!(d.p50_ms >= 1500.0, "{}", report.table());
        assert!(d.max_ms < 1000.0 + 1500.0 + 5000.0, "{}", report.table());
        assert_eq!(report.checks.len(), 3, "held, lost, closed");
        assert_eq!(report.checks[1].users_online, 130, "{}", report.table());
    })
    .await;
}
