//! A private `redis-server` per test, after redis-rs `redis-test`: a free
//! port, a temporary directory, no persistence, killed on drop.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::TcpListener,
    process::{Child, Command, Stdio},
    time::Duration,
};

use redis::{FromRedisValue, aio::MultiplexedConnection};
use tempfile::TempDir;
use tokio::time::{Instant, sleep, timeout};

/// Bound for `redis-server` to answer PING after it was spawned.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound for one command sent by a test.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(5);
/// How often a start is retried (another process may take the free port
/// between the probe and redis binding it).
const START_ATTEMPTS: usize = 5;

pub struct RedisServer {
    port: u16,
    dir: TempDir,
    process: Option<Child>,
}

impl RedisServer {
    /// Starts a server on a free port and waits until it answers PING.
    pub async fn start() -> RedisServer {
        let mut failures = Vec::new();
        for _ in 0..START_ATTEMPTS {
            let mut server = RedisServer {
                port: free_port(),
                dir: tempfile::tempdir().expect("temp dir for redis-server"),
                process: None,
            };
            match server.spawn_and_wait().await {
                Ok(()) => return server,
                Err(failure) => failures.push(format!("port {}: {failure}", server.port)),
            }
        }
        panic!("redis-server did not start: {failures:#?}");
    }

    /// `redis://127.0.0.1:PORT/`
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// SIGKILL, and wait for the process to be gone.
    pub fn kill(&mut self) {
        if let Some(mut process) = self.process.take() {
            let _ = process.kill();
            let _ = process.wait();
        }
    }

    /// SIGSTOP: the server keeps its data and its sockets but answers
    /// nothing until [`RedisServer::resume`] (a hung or overloaded Redis).
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// SIGCONT after [`RedisServer::pause`].
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, signal: &str) {
        let pid = self
            .process
            .as_ref()
            .expect("redis-server is running")
            .id()
            .to_string();
        // kill(1), as the gateway harness does: no unsafe, no extra crate.
        let status = Command::new("kill")
            .args([signal, &pid])
            .status()
            .unwrap_or_else(|e| panic!("cannot run kill {signal} {pid}: {e}"));
        assert!(status.success(), "kill {signal} {pid} failed: {status}");
    }

    /// Kills the server and starts a fresh, empty one on the same port.
    pub async fn restart(&mut self) {
        self.kill();
        if let Err(failure) = self.spawn_and_wait().await {
            panic!(
                "redis-server did not restart on port {}: {failure}",
                self.port
            );
        }
    }

    /// Runs one command, e.g. `["CONFIG", "RESETSTAT"]`.
    pub async fn command<T: FromRedisValue>(&self, args: &[&str]) -> T {
        let mut connection = self.connection().await;
        let mut command = redis::cmd(args[0]);
        for arg in &args[1..] {
            command.arg(*arg);
        }
        timeout(COMMAND_TIMEOUT, command.query_async(&mut connection))
            .await
            .unwrap_or_else(|_| panic!("redis {args:?} took over {COMMAND_TIMEOUT:?}"))
            .unwrap_or_else(|error| panic!("redis {args:?} failed: {error}"))
    }

    /// `HGETALL key` with integer values (counts); an absent key is empty.
    pub async fn hgetall(&self, key: &str) -> BTreeMap<String, i64> {
        self.command(&["HGETALL", key]).await
    }

    /// `HGETALL key` with text values; an absent key is empty.
    pub async fn hgetall_text(&self, key: &str) -> BTreeMap<String, String> {
        self.command(&["HGETALL", key]).await
    }

    /// `HGETALL key` with MessagePack values (the gateway's connection
    /// records), each decoded as `T`; an absent key is empty.
    pub async fn hgetall_packed<T: serde::de::DeserializeOwned>(
        &self,
        key: &str,
    ) -> BTreeMap<String, T> {
        let raw: BTreeMap<String, Vec<u8>> = self.command(&["HGETALL", key]).await;
        raw.into_iter()
            .map(|(field, value)| {
                let decoded = rmp_serde::from_slice(&value)
                    .unwrap_or_else(|e| panic!("{key} {field}: not MessagePack: {e}"));
                (field, decoded)
            })
            .collect()
    }

    /// `GET key` as an integer, `None` when the key does not exist.
    pub async fn get_integer(&self, key: &str) -> Option<i64> {
        self.command(&["GET", key]).await
    }

    /// The members of the sorted set `key`, without their scores.
    pub async fn zset_members(&self, key: &str) -> BTreeSet<String> {
        self.command(&["ZRANGE", key, "0", "-1"]).await
    }

    /// Every key matching `pattern`. `KEYS` blocks the server while it scans:
    /// fine for the few keys of a test, never for a real deployment.
    pub async fn keys(&self, pattern: &str) -> BTreeSet<String> {
        self.command(&["KEYS", pattern]).await
    }

    /// Zeroes the per-command statistics.
    pub async fn reset_stats(&self) {
        let _: () = self.command(&["CONFIG", "RESETSTAT"]).await;
    }

    /// How many times `command` (lower case, e.g. `exec`) ran since start or
    /// the last [`RedisServer::reset_stats`], from `INFO commandstats`.
    pub async fn command_calls(&self, command: &str) -> u64 {
        let info: String = self.command(&["INFO", "commandstats"]).await;
        let prefix = format!("cmdstat_{command}:calls=");
        info.lines()
            .find_map(|line| line.strip_prefix(&prefix))
            .map_or(0, |rest| {
                let calls = rest.split(',').next().unwrap_or_default();
                calls
                    .parse()
                    .unwrap_or_else(|_| panic!("malformed commandstats line for {command}: {rest}"))
            })
    }

    async fn connection(&self) -> MultiplexedConnection {
        let client = redis::Client::open(self.url()).expect("valid redis url");
        timeout(COMMAND_TIMEOUT, client.get_multiplexed_async_connection())
            .await
            .unwrap_or_else(|_| panic!("connecting to redis on {} timed out", self.port))
            .unwrap_or_else(|error| panic!("connecting to redis on {} failed: {error}", self.port))
    }

    async fn spawn_and_wait(&mut self) -> Result<(), String> {
        let dir = self.dir.path();
        let process = Command::new("redis-server")
            .arg("--port")
            .arg(self.port.to_string())
            .args(["--bind", "127.0.0.1"])
            .args(["--save", ""])
            .args(["--appendonly", "no"])
            .arg("--dir")
            .arg(dir)
            .arg("--logfile")
            .arg(dir.join("redis.log"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|error| format!("cannot spawn redis-server (is it on PATH?): {error}"))?;
        self.process = Some(process);

        let deadline = Instant::now() + READY_TIMEOUT;
        let client = redis::Client::open(self.url()).expect("valid redis url");
        loop {
            if let Some(process) = self.process.as_mut()
                && let Ok(Some(status)) = process.try_wait()
            {
                let log = std::fs::read_to_string(dir.join("redis.log")).unwrap_or_default();
                return Err(format!("redis-server exited with {status}: {log}"));
            }
            let ping = async {
                let mut connection = client.get_multiplexed_async_connection().await?;
                redis::cmd("PING")
                    .query_async::<String>(&mut connection)
                    .await
            };
            if let Ok(Ok(pong)) = timeout(Duration::from_millis(500), ping).await
                && pong == "PONG"
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!("no PONG within {READY_TIMEOUT:?}"));
            }
            // Polling a process that gives no readiness signal of its own.
            sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A port that was free a moment ago (bind port 0, read it, release it).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}
