//! The load tool against the real gateway: a small churn must come out
//! correct (no missed, duplicated or out-of-order event at the observers,
//! and the gateway's answers equal to the tool's truth), on one in-memory
//! node and on a two-node Redis cluster; so must a storm, a fanout (every
//! member tab checked too) and a churn run in two worker processes. This
//! keeps `presenced-load` honest as the gateway changes, and the gateway
//! honest under the tool.

mod support;

use presenced_load::{Options, Report, Scenario};
use support::{Gateway, RedisServer, alone_within_scenario_timeout};

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

/// Not a test of its own: the worker processes of
/// `churn_in_two_worker_processes_is_correct` are this test binary running
/// only this function, with their orders in the environment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_worker_entry() {
    if let Some(result) = presenced_load::worker::serve_from_env().await {
        result.expect("the worker runs its shard");
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
