//! `--procs`: shards in worker processes, and the worker's side.
//!
//! The coordinator starts each worker by re-executing its own binary as
//! `presenced-load worker --shard K` with the [`ShardSpec`] as JSON in the
//! `PRESENCED_LOAD_WORKER` environment variable. Orders go down the
//! worker's stdin as lines (`go`, `lose`, `close`); the worker's messages come up
//! its stdout as one JSON line each, behind [`LINE_PREFIX`], so anything
//! else a harness prints there (a test harness's own lines) is ignored. The
//! worker's stderr is the coordinator's. A worker that exits before
//! reporting fails the run ([`ShardFailure::Ended`]); a worker is killed
//! when its handle goes, and an in-process shard is stopped, so a failed
//! run leaves no tabs behind.

use std::{process::Stdio, sync::Arc};

use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    process::{Child, Command},
    sync::mpsc,
    task::AbortHandle,
};

use crate::{
    clock::RunClock,
    shard::{self, Order, ShardFailure, ShardMsg, ShardSpec},
};

/// The environment variable that carries a worker's [`ShardSpec`].
pub const WORKER_ENV: &str = "PRESENCED_LOAD_WORKER";
/// What each message line of a worker starts with.
pub const LINE_PREFIX: &str = "@presenced-load ";

/// A running shard, local or in a worker process, as the coordinator sees
/// it.
#[derive(Debug)]
pub struct ShardHandle {
    /// Orders to the shard.
    pub orders: mpsc::UnboundedSender<Order>,
    /// The shard's messages.
    pub msgs: mpsc::UnboundedReceiver<ShardMsg>,
    /// The worker process, if any (killed on drop).
    pub child: Option<Child>,
    /// The in-process shard's task, if any (stopped on drop).
    task: Option<AbortHandle>,
}

impl Drop for ShardHandle {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// Starts `spec`'s shard in this process.
pub fn start_local(spec: ShardSpec, clock: RunClock) -> ShardHandle {
    let (orders, order_rx) = mpsc::unbounded_channel();
    let (msg_tx, msgs) = mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        if let Err(e) = shard::run(spec, clock, order_rx, msg_tx.clone()).await {
            let _ = msg_tx.send(ShardMsg::Failed(e));
        }
    });
    ShardHandle {
        orders,
        msgs,
        child: None,
        task: Some(task.abort_handle()),
    }
}

/// Starts `spec`'s shard in a worker process: `command` (program and
/// arguments; empty: this executable with `worker --shard K`).
pub fn start_process(spec: &ShardSpec, command: &[String]) -> Result<ShardHandle, ShardFailure> {
    let start = |e: &dyn std::fmt::Display| ShardFailure::Start(e.to_string());
    let mut cmd = match command.split_first() {
        Some((program, args)) => {
            let mut c = Command::new(program);
            c.args(args);
            c
        }
        None => {
            let mut c = Command::new(std::env::current_exe().map_err(|e| start(&e))?);
            c.args(["worker", "--shard", &spec.shard.to_string()]);
            c
        }
    };
    let mut child = cmd
        .env(
            WORKER_ENV,
            serde_json::to_string(spec).map_err(|e| start(&e))?,
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| start(&e))?;
    // unwrap: both were piped just above.
    let (mut stdin, stdout) = (child.stdin.take().unwrap(), child.stdout.take().unwrap());
    let (orders, mut order_rx) = mpsc::unbounded_channel::<Order>();
    tokio::spawn(async move {
        while let Some(order) = order_rx.recv().await {
            let line: &[u8] = match order {
                Order::Go => b"go\n",
                Order::Lose => b"lose\n",
                Order::Close => b"close\n",
            };
            if stdin.write_all(line).await.is_err() || stdin.flush().await.is_err() {
                return;
            }
        }
    });
    let (msg_tx, msgs) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut lines = BufReader::new(stdout).lines();
        let mut done = false;
        while let Ok(Some(line)) = lines.next_line().await {
            // A test harness may print before the message on its line.
            let Some(json) = line
                .find(LINE_PREFIX)
                .map(|i| &line[i + LINE_PREFIX.len()..])
            else {
                continue;
            };
            let msg = serde_json::from_str(json)
                .unwrap_or_else(|e| ShardMsg::Failed(ShardFailure::Unreadable(e.to_string())));
            done |= matches!(msg, ShardMsg::Done(_) | ShardMsg::Failed(_));
            if msg_tx.send(msg).is_err() {
                return;
            }
        }
        if !done {
            let _ = msg_tx.send(ShardMsg::Failed(ShardFailure::Ended));
        }
    });
    Ok(ShardHandle {
        orders,
        msgs,
        child: Some(child),
        task: None,
    })
}

/// If this process was started as a worker, runs its shard to the end and
/// returns its result; `None` otherwise.
pub async fn serve_from_env() -> Option<Result<(), ShardFailure>> {
    let spec = std::env::var(WORKER_ENV).ok()?;
    Some(serve(&spec).await)
}

async fn serve(spec: &str) -> Result<(), ShardFailure> {
    let spec: ShardSpec = serde_json::from_str(spec)
        .map_err(|e| ShardFailure::Start(format!("{WORKER_ENV}: {e}")))?;
    let clock = RunClock::joined(spec.clock_start_unix_ns);
    let (orders, order_rx) = mpsc::unbounded_channel();
    let (msg_tx, mut msgs) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut lines = BufReader::new(tokio::io::stdin()).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            let order = match line.trim() {
                "go" => Order::Go,
                "lose" => Order::Lose,
                "close" => Order::Close,
                _ => continue,
            };
            if orders.send(order).is_err() {
                return;
            }
        }
    });
    let writer = tokio::spawn(async move {
        let mut stdout = tokio::io::stdout();
        while let Some(msg) = msgs.recv().await {
            let done = matches!(msg, ShardMsg::Done(_) | ShardMsg::Failed(_));
            let Ok(json) = serde_json::to_string(&msg) else {
                continue;
            };
            let line = format!("{LINE_PREFIX}{json}\n");
            if stdout.write_all(line.as_bytes()).await.is_err() {
                return;
            }
            let _ = stdout.flush().await;
            if done {
                return;
            }
        }
    });
    let failed = Arc::new(msg_tx.clone());
    let result = shard::run(spec, clock, order_rx, msg_tx).await;
    if let Err(e) = &result {
        let _ = failed.send(ShardMsg::Failed(e.clone()));
    }
    drop(failed);
    let _ = writer.await;
    result
}
