//! Measures a cluster of gateways from outside: how long after a `kill -9`
//! a dead node's users go offline, and how long an event decided on one
//! node takes to reach a watcher on another under steady churn.
//!
//! It starts everything it measures: a private `redis-server` (free port,
//! no persistence) and release gateways on it with default flags, so node A
//! and node B share one Redis and form a cluster. Tabs, watchers and the
//! clock all live in this process, so every latency is one monotonic clock
//! read twice.
//!
//! `reap`, per run: a fresh node A holds TABS tabs of USERS users; a
//! watcher on B watches them all and first sees each come online. A starts
//! after a random pause of up to a second (so the kill falls anywhere in
//! B's once-a-second reaper tick) and is killed after a random pause of up
//! to a third of the lease (A renews its lease that often, so the kill
//! falls anywhere in the renewal cycle): SIGKILL at t0. The run's figure
//! is t0 → the watcher's last `offline` (`node_lost`); the watcher then
//! listens two reaper ticks longer for doubled events.
//!
//! `churn`, per RATE:SECONDS: RATE new users a second each open one tab on
//! A (connect → `welcome` → hold a random HOLD ms → Close), while a watcher
//! on B watches them all. Online latency: the tab's `welcome` → `online` at
//! the watcher. Offline latency: the tab sends its Close → `offline` at the
//! watcher. Every cycle must show exactly one of each at the watcher.
//!
//! ```text
//! cargo run --release --example cluster_bench -- --gateway target/release/presenced \
//!     --runs 7 --users 100 --tabs 200 --churn 500:10,2000:10 --hold-ms 200:800
//! ```
//! `--gateway-flags "--batch-linger-ms 1"` passes flags to every gateway
//! (default: none, the gateway's defaults). `benches/cluster.sh` builds and
//! runs it. A tool, so failures just panic.

use std::{
    collections::{HashMap, HashSet},
    process::Stdio,
    time::{Duration, Instant},
};

use futures_util::{SinkExt, StreamExt, future::join_all, stream::SplitSink};
use presenced_load::rng::Rng;
use serde_json::{Value, json};
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::TcpStream,
    process::{Child, Command},
    sync::mpsc,
    time::{sleep, sleep_until, timeout, timeout_at},
};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream, connect_async, tungstenite::Message};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// The gateway's default `--node-lease-ms`; it refreshes a third as often.
const LEASE: Duration = Duration::from_millis(5_000);
/// The gateway's default `--max-ids`: most users in one `watch`.
const MAX_IDS: usize = 1000;
/// Survivors look for expired leases this often.
const REAP_INTERVAL: Duration = Duration::from_secs(1);
/// Bound on anything the protocol says must happen (start, welcome, reply).
const STEP_TIMEOUT: Duration = Duration::from_secs(10);
/// After the last expected event: long enough for a second reap or a late
/// duplicate to show.
const QUIET_WINDOW: Duration = Duration::from_secs(2);

/// A private `redis-server` on a free port; killed on drop.
struct RedisServer {
    _child: Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl RedisServer {
    async fn start() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--dir"])
            .arg(dir.path())
            .stdout(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("redis-server on PATH");
        let deadline = Instant::now() + STEP_TIMEOUT;
        while !redis_answers(port).await {
            assert!(Instant::now() < deadline, "redis-server did not start");
            sleep(Duration::from_millis(50)).await;
        }
        Self {
            _child: child,
            url: format!("redis://127.0.0.1:{port}/"),
            _dir: dir,
        }
    }
}

async fn redis_answers(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)).await else {
        return false;
    };
    let mut buf = [0u8; 7];
    s.write_all(b"PING\r\n").await.is_ok()
        && s.read_exact(&mut buf).await.is_ok()
        && &buf == b"+PONG\r\n"
}

/// What every gateway of the cluster is started with.
struct Cluster {
    redis: RedisServer,
    bin: String,
    flags: Vec<String>,
}

/// One `presenced --dev` on the shared Redis; killed on drop.
struct Gateway {
    child: Child,
    addr: String,
}

impl Gateway {
    async fn start(cluster: &Cluster) -> Self {
        let bin = &cluster.bin;
        let mut child = Command::new(bin)
            .args(["--dev", "--listen", "127.0.0.1:0", "--redis"])
            .arg(&cluster.redis.url)
            .args(&cluster.flags)
            .env("PRESENCED_LOG", "warn")
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("{bin}: {e}"));
        // unwrap: stdout was piped just above.
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let line = timeout(STEP_TIMEOUT, lines.next_line())
            .await
            .expect("gateway start")
            .expect("gateway stdout")
            .expect("a listening line");
        let addr = line
            .strip_prefix("presenced listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .to_owned();
        // Anything printed later must not hit a closed pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Self { child, addr }
    }

    fn url(&self, user: &str) -> String {
        format!("ws://{}/ws?user={user}", self.addr)
    }

    /// The Prometheus page, over a bare HTTP/1.1 request.
    async fn metrics(&self) -> String {
        let mut s = TcpStream::connect(&self.addr).await.expect("metrics");
        let request = format!(
            "GET /metrics HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
            self.addr
        );
        s.write_all(request.as_bytes()).await.expect("metrics");
        let mut page = String::new();
        s.read_to_string(&mut page).await.expect("metrics");
        page
    }
}

/// The value of an unlabelled sample on a Prometheus page.
fn sample(page: &str, name: &str) -> f64 {
    presenced_load::target::sample(page, name).unwrap_or_else(|| panic!("no {name} in /metrics"))
}

/// Connects as `user` and waits for the `welcome`; returns the tab and when
/// the welcome arrived.
async fn open_tab(url: &str) -> Result<(Ws, Instant), String> {
    let (mut ws, _) = connect_async(url).await.map_err(|e| e.to_string())?;
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(t))) if t.contains("\"welcome\"") => {
                return Ok((ws, Instant::now()));
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(e.to_string()),
            None => return Err("closed before welcome".into()),
        }
    }
}

/// A connection that watches users; a reader task stamps every frame the
/// moment it arrives, so a slow consumer here does not bias the latencies.
struct Watcher {
    sink: SplitSink<Ws, Message>,
    frames: mpsc::UnboundedReceiver<(Instant, Value)>,
    next_ref: u64,
}

impl Watcher {
    async fn connect(gateway: &Gateway, user: &str) -> Self {
        let (ws, _) = open_tab(&gateway.url(user)).await.expect("watcher");
        let (sink, mut stream) = ws.split();
        let (tx, frames) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Some(Ok(message)) = stream.next().await {
                if let Message::Text(t) = message {
                    let at = Instant::now();
                    let frame = serde_json::from_str(&t).expect("JSON frame");
                    if tx.send((at, frame)).is_err() {
                        break;
                    }
                }
            }
        });
        Self {
            sink,
            frames,
            next_ref: 0,
        }
    }

    /// Watches `users`, at most `MAX_IDS` per request. Nobody is online
    /// yet, so the only frames expected meanwhile are the replies.
    async fn watch(&mut self, users: &[String]) {
        for chunk in users.chunks(MAX_IDS) {
            self.next_ref += 1;
            let request = json!({"type": "watch", "users": chunk, "ref": self.next_ref});
            self.sink
                .send(Message::Text(request.to_string().into()))
                .await
                .expect("watch");
            let (_, reply) = self
                .next(Instant::now() + STEP_TIMEOUT)
                .await
                .expect("reply");
            assert!(
                reply["type"] == "reply" && reply["ref"] == self.next_ref && reply["ok"] == true,
                "unexpected answer to watch: {reply}"
            );
        }
    }

    async fn next(&mut self, deadline: Instant) -> Option<(Instant, Value)> {
        timeout_at(deadline.into(), self.frames.recv())
            .await
            .ok()
            .flatten()
    }
}

/// What one kill showed at the watcher.
struct ReapRun {
    /// A's start → the kill; A renews its lease every third of it.
    lived: Duration,
    /// t0 → first and last `offline`.
    first: Duration,
    last: Duration,
    reaped: usize,
    doubled: usize,
    wrong_reason: usize,
    other_frames: usize,
}

async fn reap_run(
    cluster: &Cluster,
    b: &Gateway,
    run: usize,
    users: usize,
    tabs: usize,
    rng: &mut Rng,
) -> ReapRun {
    let names: Vec<String> = (0..users).map(|u| format!("reap{run}u{u}")).collect();
    let mut watcher = Watcher::connect(b, &format!("reapwatcher{run}")).await;
    watcher.watch(&names).await;

    // The runs follow each other at a steady pace; without this the kill
    // would land at the same point of B's reaper tick every run.
    sleep(Duration::from_millis(
        rng.below(REAP_INTERVAL.as_millis() as u64),
    ))
    .await;
    let started = Instant::now();
    let mut a = Gateway::start(cluster).await;
    let held: Vec<Ws> = join_all((0..tabs).map(|t| {
        let url = a.url(&names[t % users]);
        async move { open_tab(&url).await.expect("tab on A").0 }
    }))
    .await;
    let mut online = HashSet::new();
    let deadline = Instant::now() + STEP_TIMEOUT;
    while online.len() < users {
        let (_, frame) = watcher
            .next(deadline)
            .await
            .expect("every user online at B");
        assert_eq!(frame["type"], "online", "unexpected frame {frame}");
        online.insert(frame["user"].as_str().expect("user").to_owned());
    }

    let pause = Duration::from_millis(rng.below(LEASE.as_millis() as u64 / 3));
    sleep(pause).await;
    let t0 = Instant::now();
    a.child.start_kill().expect("SIGKILL");
    let lived = t0 - started;

    let mut offline: HashMap<String, Duration> = HashMap::new();
    let (mut doubled, mut wrong_reason, mut other_frames) = (0, 0, 0);
    let mut deadline = t0 + LEASE + REAP_INTERVAL + STEP_TIMEOUT;
    let mut quiet_from = None;
    while let Some((at, frame)) = watcher.next(deadline).await {
        if frame["type"] != "offline" {
            eprintln!("reap run {run}: unexpected frame {frame}");
            other_frames += 1;
            continue;
        }
        if frame["reason"] != "node_lost" {
            eprintln!("reap run {run}: offline with the wrong reason: {frame}");
            wrong_reason += 1;
        }
        let user = frame["user"].as_str().expect("user").to_owned();
        if offline.insert(user, at - t0).is_some() {
            eprintln!("reap run {run}: second offline: {frame}");
            doubled += 1;
        }
        if offline.len() == users && quiet_from.is_none() {
            quiet_from = Some(Instant::now());
            deadline = Instant::now() + QUIET_WINDOW;
        }
    }
    if quiet_from.is_none() {
        eprintln!(
            "reap run {run}: only {} of {users} users went offline within {:?}",
            offline.len(),
            deadline - t0
        );
    }
    a.child.wait().await.expect("A exits");
    drop(held);
    ReapRun {
        lived,
        first: offline.values().min().copied().unwrap_or_default(),
        last: offline.values().max().copied().unwrap_or_default(),
        reaped: offline.len(),
        doubled,
        wrong_reason,
        other_frames,
    }
}

/// When one churn tab saw its `welcome` and sent its Close.
struct Cycle {
    welcome: Instant,
    close: Instant,
}

async fn cycle(url: String, hold: Duration) -> Result<Cycle, String> {
    let (mut ws, welcome) = open_tab(&url).await?;
    sleep(hold).await;
    let close = Instant::now();
    ws.close(None).await.map_err(|e| e.to_string())?;
    // The server's close reply ends the cycle.
    while let Some(Ok(_)) = ws.next().await {}
    Ok(Cycle { welcome, close })
}

/// What the watcher saw of one churn user.
#[derive(Default)]
struct Seen {
    online: Vec<(Instant, u64)>,
    offline: Vec<(Instant, u64, String)>,
}

/// Signed, in microseconds: a tab may read its `welcome` after the watcher
/// read the `online` (both are tasks on the same two cores).
fn micros(from: Instant, to: Instant) -> i64 {
    if to >= from {
        (to - from).as_micros() as i64
    } else {
        -((from - to).as_micros() as i64)
    }
}

/// Nearest-rank percentile of a sorted, non-empty slice.
fn percentile(sorted: &[i64], p: f64) -> i64 {
    let rank = ((p / 100.0 * sorted.len() as f64).ceil() as usize).max(1);
    sorted[rank - 1]
}

fn ms(us: i64) -> String {
    format!("{:.1}", us as f64 / 1000.0)
}

fn summary(mut v: Vec<i64>) -> String {
    if v.is_empty() {
        return "none".into();
    }
    v.sort_unstable();
    format!(
        "p50 {} ms, p99 {} ms, max {} ms, min {} ms (n={})",
        ms(percentile(&v, 50.0)),
        ms(percentile(&v, 99.0)),
        ms(v[v.len() - 1]),
        ms(v[0]),
        v.len()
    )
}

async fn churn_phase(
    a: &Gateway,
    b: &Gateway,
    phase: usize,
    rate: u64,
    seconds: u64,
    hold: (u64, u64),
    rng: &mut Rng,
) {
    let n = (rate * seconds) as usize;
    let names: Vec<String> = (0..n).map(|i| format!("churn{phase}u{i}")).collect();
    let mut watcher = Watcher::connect(b, &format!("churnwatcher{phase}")).await;
    watcher.watch(&names).await;
    let before = a.metrics().await;

    let period = Duration::from_secs_f64(1.0 / rate as f64);
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(n);
    for (i, name) in names.iter().enumerate() {
        sleep_until((start + period * i as u32).into()).await;
        let hold = Duration::from_millis(hold.0 + rng.below(hold.1 - hold.0 + 1));
        tasks.push(tokio::spawn(cycle(a.url(name), hold)));
    }
    let opened_in = start.elapsed();
    let mut cycles: HashMap<&str, Cycle> = HashMap::with_capacity(n);
    let mut failed = 0;
    for (name, task) in names.iter().zip(tasks) {
        // unwrap: a cycle task does not panic.
        match task.await.unwrap() {
            Ok(c) => {
                cycles.insert(name, c);
            }
            Err(e) => {
                if failed < 5 {
                    eprintln!("churn {rate}/s: {name}: {e}");
                }
                failed += 1;
            }
        }
    }
    let last_close = cycles.values().map(|c| c.close).max().expect("cycles");
    let after = a.metrics().await;

    // The reader task stamped the events as they came; collect them until
    // every cycle has both, then listen a while longer for duplicates.
    let mut seen: HashMap<String, Seen> = HashMap::with_capacity(n);
    let (mut complete, mut other_frames, mut wrong_reason) = (0, 0, 0);
    let mut deadline = last_close.max(Instant::now()) + STEP_TIMEOUT;
    let mut settled = false;
    while let Some((at, frame)) = watcher.next(deadline).await {
        let user = frame["user"].as_str().unwrap_or_default().to_owned();
        let seq = frame["seq"].as_u64().unwrap_or_default();
        let entry = seen.entry(user).or_default();
        let had_both = !entry.online.is_empty() && !entry.offline.is_empty();
        match frame["type"].as_str() {
            Some("online") => entry.online.push((at, seq)),
            Some("offline") => {
                let reason = frame["reason"].as_str().unwrap_or_default().to_owned();
                if reason != "closed" {
                    wrong_reason += 1;
                }
                entry.offline.push((at, seq, reason));
            }
            _ => {
                if other_frames < 5 {
                    eprintln!("churn {rate}/s: unexpected frame {frame}");
                }
                other_frames += 1;
                continue;
            }
        }
        if !had_both && !entry.online.is_empty() && !entry.offline.is_empty() {
            complete += 1;
        }
        if complete == cycles.len() && !settled {
            settled = true;
            deadline = Instant::now() + QUIET_WINDOW;
        }
    }

    let (mut online_us, mut offline_us) = (Vec::with_capacity(n), Vec::with_capacity(n));
    let (mut missed, mut doubled, mut out_of_order) = (0, 0, 0);
    let nothing = Seen::default();
    for (name, c) in &cycles {
        let s = seen.get(*name).unwrap_or(&nothing);
        for (count, what) in [(s.online.len(), "online"), (s.offline.len(), "offline")] {
            if count == 0 {
                if missed < 5 {
                    eprintln!("churn {rate}/s: {name}: no {what} at the watcher");
                }
                missed += 1;
            }
            doubled += count.saturating_sub(1);
        }
        if let (Some(&(on_at, on_seq)), Some((off_at, off_seq, _))) =
            (s.online.first(), s.offline.first())
        {
            online_us.push(micros(c.welcome, on_at));
            offline_us.push(micros(c.close, *off_at));
            if *off_seq <= on_seq || *off_at < on_at {
                out_of_order += 1;
            }
        }
    }
    let strangers = seen
        .keys()
        .filter(|u| !cycles.contains_key(u.as_str()))
        .count();

    let batches = sample(&after, "presenced_store_batch_ops_count")
        - sample(&before, "presenced_store_batch_ops_count");
    let ops = sample(&after, "presenced_store_batch_ops_sum")
        - sample(&before, "presenced_store_batch_ops_sum");
    let batch_s = sample(&after, "presenced_store_batch_duration_seconds_sum")
        - sample(&before, "presenced_store_batch_duration_seconds_sum");
    println!(
        "churn {rate}/s for {seconds}s: {} cycles done, {failed} failed; opens paced over {:.2}s ({:.0}/s); hold {}-{} ms",
        cycles.len(),
        opened_in.as_secs_f64(),
        n as f64 / opened_in.as_secs_f64(),
        hold.0,
        hold.1
    );
    println!("  welcome at tab -> online at B:  {}", summary(online_us));
    println!(
        "  close sent by tab -> offline at B: {}",
        summary(offline_us)
    );
    println!(
        "  watcher: missed {missed}, duplicated {doubled}, out of order {out_of_order}, reason other than closed {wrong_reason}, other frames {other_frames}, events of unknown users {strangers}"
    );
    println!(
        "  node A store batches: {batches:.0}, {:.1} ops per batch, {:.2} ms per batch round trip (means)",
        ops / batches.max(1.0),
        batch_s * 1000.0 / batches.max(1.0)
    );
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |name: &str, default: &str| {
        args.iter()
            .position(|a| a == name)
            .map_or(default.to_owned(), |i| args[i + 1].clone())
    };
    let bin = arg("--gateway", "target/release/presenced");
    let runs: usize = arg("--runs", "7").parse().expect("--runs");
    let users: usize = arg("--users", "100").parse().expect("--users");
    let tabs: usize = arg("--tabs", "200").parse().expect("--tabs");
    let pair = |s: &str| -> (u64, u64) {
        let (x, y) = s.split_once(':').expect("A:B");
        (x.parse().expect("number"), y.parse().expect("number"))
    };
    let churn: Vec<(u64, u64)> = arg("--churn", "500:10,2000:10")
        .split(',')
        .filter(|s| !s.is_empty())
        .map(pair)
        .collect();
    let hold = pair(&arg("--hold-ms", "200:800"));
    assert!(hold.0 <= hold.1, "--hold-ms MIN:MAX");
    let flags: Vec<String> = arg("--gateway-flags", "")
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    let mut rng = Rng::seeded();

    let cluster = Cluster {
        redis: RedisServer::start().await,
        bin,
        flags,
    };
    let b = Gateway::start(&cluster).await;

    if runs > 0 {
        println!(
            "reap: {runs} runs; each a fresh node A with {tabs} tabs of {users} users, killed with SIGKILL; watcher on B"
        );
        let mut lasts = Vec::with_capacity(runs);
        for run in 1..=runs {
            let r = reap_run(&cluster, &b, run, users, tabs, &mut rng).await;
            println!(
                "  run {run}: kill {} ms after A started; offline (node_lost) {}/{users}: first {:.3} s, last {:.3} s after the kill; doubled {}, wrong reason {}, other frames {}",
                r.lived.as_millis(),
                r.reaped,
                r.first.as_secs_f64(),
                r.last.as_secs_f64(),
                r.doubled,
                r.wrong_reason,
                r.other_frames
            );
            lasts.push(r.last);
        }
        lasts.sort();
        println!(
            "  reap time (kill -> last offline at B): median {:.2} s, min {:.2} s, max {:.2} s; runs: {}",
            lasts[lasts.len() / 2].as_secs_f64(),
            lasts[0].as_secs_f64(),
            lasts[lasts.len() - 1].as_secs_f64(),
            lasts
                .iter()
                .map(|d| format!("{:.2}", d.as_secs_f64()))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }

    if !churn.is_empty() {
        let a = Gateway::start(&cluster).await;
        for (phase, &(rate, seconds)) in churn.iter().enumerate() {
            churn_phase(&a, &b, phase, rate, seconds, hold, &mut rng).await;
        }
    }
}
