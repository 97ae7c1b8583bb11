//! The `presenced` process under test.
//!
//! The gateway always binds `127.0.0.1:0`; the harness learns the port from
//! the single line the binary prints on stdout once it listens. Stderr (the
//! logs) is collected in the background so the pipe never fills, and its tail
//! is printed when a test fails while the gateway is alive.

use std::{
    net::SocketAddr,
    process::{ExitStatus, Stdio},
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::{
    io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, BufReader},
    process::{Child, Command},
    sync::Notify,
    task::JoinHandle,
    time::{Instant, timeout, timeout_at},
};

use super::RedisServer;

/// Bound for the gateway to print its listen line.
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(15);

/// Bound for a gateway to exit after SIGTERM: the default
/// `--drain-timeout-ms` (10 s) and a margin for a loaded machine.
pub const DRAIN_EXIT_TIMEOUT: Duration = Duration::from_secs(20);

const LISTEN_LINE_PREFIX: &str = "presenced listening on ";

/// How much of the gateway's stderr is kept, and how much a failing test
/// prints.
const STDERR_KEEP_BYTES: usize = 1 << 20;
const STDERR_TAIL_BYTES: usize = 8 << 10;

/// Output of a process, collected in the background.
type Collected = Arc<Output>;

#[derive(Default)]
struct Output {
    text: Mutex<String>,
    /// Notified each time more output arrived.
    grew: Notify,
}

pub struct Gateway {
    pub addr: SocketAddr,
    child: Child,
    stderr: Collected,
    args: Vec<String>,
}

impl Gateway {
    /// Starts the gateway with `--listen 127.0.0.1:0` and `args`, and waits
    /// until it listens.
    /// Without `--offline-grace-ms` in `args`, the grace is off (0): the
    /// scenarios that do not test it expect every `offline` and `left` at
    /// once.
    pub async fn start(args: &[&str]) -> Gateway {
        let mut all_args = vec!["--listen".to_owned(), "127.0.0.1:0".to_owned()];
        if !args.contains(&"--offline-grace-ms") {
            all_args.extend(["--offline-grace-ms".to_owned(), "0".to_owned()]);
        }
        all_args.extend(args.iter().map(|arg| (*arg).to_owned()));
        let mut child = command(&all_args)
            .spawn()
            .unwrap_or_else(|error| panic!("cannot spawn presenced: {error}"));
        let (stderr, stderr_done) = collect(child.stderr.take().expect("stderr is piped"));
        let stdout = child.stdout.take().expect("stdout is piped");

        let mut lines = BufReader::new(stdout).lines();
        let mut other_stdout = Vec::new();
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        let addr = loop {
            let failure = match timeout_at(deadline, lines.next_line()).await {
                Ok(Ok(Some(line))) => match line.strip_prefix(LISTEN_LINE_PREFIX) {
                    Some(addr) => match addr.trim().parse::<SocketAddr>() {
                        Ok(addr) => break addr,
                        Err(error) => format!("unparsable listen line {line:?}: {error}"),
                    },
                    None => {
                        other_stdout.push(line);
                        continue;
                    }
                },
                Ok(Ok(None)) => "stdout closed before the listen line".to_owned(),
                Ok(Err(error)) => format!("reading stdout failed: {error}"),
                Err(_) => format!("no listen line within {STARTUP_TIMEOUT:?}"),
            };
            let _ = child.start_kill();
            let status = timeout(Duration::from_secs(5), child.wait()).await;
            let _ = timeout(Duration::from_secs(2), stderr_done).await;
            panic!(
                "presenced {all_args:?} did not start: {failure}\nexit: {status:?}\n\
                 other stdout lines: {other_stdout:?}\nstderr:\n{}",
                lock(&stderr)
            );
        };
        // Keep draining stdout so that the gateway never blocks on it.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });

        Gateway {
            addr,
            child,
            stderr,
            args: all_args,
        }
    }

    /// A `--dev` gateway on the in-memory store.
    pub async fn memory(extra_args: &[&str]) -> Gateway {
        let mut args = vec!["--dev"];
        args.extend_from_slice(extra_args);
        Gateway::start(&args).await
    }

    /// A `--dev` gateway on `redis`.
    pub async fn redis(redis: &RedisServer, extra_args: &[&str]) -> Gateway {
        let url = redis.url();
        let mut args = vec!["--dev", "--redis", url.as_str()];
        args.extend_from_slice(extra_args);
        Gateway::start(&args).await
    }

    /// `ws://…/ws?user=USER` (dev identity).
    pub fn ws_url(&self, user: &str) -> String {
        format!("ws://{}/ws?user={user}", self.addr)
    }

    /// The gateway's process id (for a tool that kills it itself).
    pub fn pid(&self) -> u32 {
        self.child.id().expect("the gateway was already waited for")
    }

    /// `ws://…/ws` without a user: a load tool target.
    pub fn ws_url_base(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }

    pub fn http_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// The value of one series of `/metrics`, e.g.
    /// `presenced_errors_sent_total{code="forbidden"}`; panics if absent.
    pub async fn metric(&self, series: &str) -> f64 {
        let text = super::http::get(self.addr, "/metrics").await.body_text();
        text.lines()
            .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {series} in /metrics:\n{text}"))
    }

    /// Everything the gateway wrote on stderr so far.
    pub fn stderr(&self) -> String {
        lock(&self.stderr).clone()
    }

    /// Waits until what the gateway wrote on stderr satisfies `done`, and
    /// returns it; panics after `within`.
    pub async fn wait_for_stderr(&self, within: Duration, done: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + within;
        loop {
            // Registered before looking, so output arriving in between
            // still wakes this wait.
            let grew = self.stderr.grew.notified();
            tokio::pin!(grew);
            grew.as_mut().enable();
            {
                let text = lock(&self.stderr);
                if done(&text) {
                    return text.clone();
                }
            }
            // The tail of stderr is printed as the gateway is dropped.
            if timeout_at(deadline, grew).await.is_err() {
                panic!("stderr did not show what was awaited within {within:?}");
            }
        }
    }

    /// SIGKILL, and wait for the process to be gone.
    pub async fn kill(&mut self) {
        let _ = self.child.start_kill();
        timeout(Duration::from_secs(10), self.child.wait())
            .await
            .expect("killed gateway did not exit")
            .expect("waiting for the killed gateway failed");
    }

    /// SIGTERM (a graceful drain), and wait up to [`DRAIN_EXIT_TIMEOUT`] for
    /// the process to exit; returns how it exited.
    pub async fn terminate(&mut self) -> ExitStatus {
        self.terminate_within(DRAIN_EXIT_TIMEOUT).await
    }

    /// SIGTERM, and wait up to `within` for the process to exit.
    pub async fn terminate_within(&mut self, within: Duration) -> ExitStatus {
        let pid = self
            .child
            .id()
            .expect("the gateway was already waited for")
            .to_string();
        // `kill(1)` rather than a libc binding: the harness has no unsafe
        // code and no extra dependency. The child is not reaped before the
        // wait below, so the pid cannot name another process.
        let sent = timeout(
            Duration::from_secs(5),
            Command::new("kill").args(["-TERM", &pid]).status(),
        )
        .await
        .unwrap_or_else(|_| panic!("kill -TERM {pid} did not return"))
        .unwrap_or_else(|error| panic!("cannot run kill -TERM {pid}: {error}"));
        assert!(sent.success(), "kill -TERM {pid} failed: {sent}");
        match timeout(within, self.child.wait()).await {
            Ok(status) => status.expect("waiting for the terminated gateway failed"),
            Err(_) => panic!(
                "presenced {:?} on {} was still running {within:?} after SIGTERM",
                self.args, self.addr
            ),
        }
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let stderr = lock(&self.stderr);
            let tail_start = stderr.len().saturating_sub(STDERR_TAIL_BYTES);
            let tail_start = (tail_start..stderr.len())
                .find(|index| stderr.is_char_boundary(*index))
                .unwrap_or(stderr.len());
            eprintln!(
                "---- presenced {:?} on {} stderr (last {} bytes) ----\n{}",
                self.args,
                self.addr,
                STDERR_TAIL_BYTES,
                &stderr[tail_start..]
            );
        }
        // kill_on_drop(true) ends the process.
    }
}

/// How a gateway run that was expected to refuse to start ended.
pub struct Refusal {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

/// Runs the gateway with exactly `args` (no implicit `--listen`) and waits
/// for it to exit; panics if it is still running after `within`, that is, if
/// it did not refuse to start.
pub async fn run_expecting_exit(args: &[&str], within: Duration) -> Refusal {
    let args: Vec<String> = args.iter().map(|arg| (*arg).to_owned()).collect();
    let mut child = command(&args)
        .spawn()
        .unwrap_or_else(|error| panic!("cannot spawn presenced: {error}"));
    let (stdout, stdout_done) = collect(child.stdout.take().expect("stdout is piped"));
    let (stderr, stderr_done) = collect(child.stderr.take().expect("stderr is piped"));
    let status = match timeout(within, child.wait()).await {
        Ok(status) => status.expect("waiting for presenced failed"),
        Err(_) => {
            let _ = child.start_kill();
            let _ = timeout(Duration::from_secs(5), child.wait()).await;
            panic!(
                "presenced {args:?} was expected to refuse to start, but was still running \
                 after {within:?}\nstdout:\n{}\nstderr:\n{}",
                lock(&stdout),
                lock(&stderr)
            );
        }
    };
    let _ = timeout(Duration::from_secs(2), stdout_done).await;
    let _ = timeout(Duration::from_secs(2), stderr_done).await;
    Refusal {
        status,
        stdout: lock(&stdout).clone(),
        stderr: lock(&stderr).clone(),
    }
}

fn command(args: &[String]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_presenced"));
    command.args(args);
    // Only the flags a test passes may configure the gateway.
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("PRESENCED_") {
            command.env_remove(key);
        }
    }
    command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    command
}

/// Reads `source` to its end in the background, keeping the last
/// [`STDERR_KEEP_BYTES`].
fn collect(mut source: impl AsyncRead + Unpin + Send + 'static) -> (Collected, JoinHandle<()>) {
    let collected = Collected::default();
    let sink = collected.clone();
    let done = tokio::spawn(async move {
        let mut chunk = [0u8; 8192];
        while let Ok(read @ 1..) = source.read(&mut chunk).await {
            {
                let mut text = lock(&sink);
                text.push_str(&String::from_utf8_lossy(&chunk[..read]));
                if text.len() > STDERR_KEEP_BYTES {
                    let cut = text.len() - STDERR_KEEP_BYTES;
                    let cut = (cut..text.len())
                        .find(|index| text.is_char_boundary(*index))
                        .unwrap_or(text.len());
                    text.drain(..cut);
                }
            }
            sink.grew.notify_waiters();
        }
    });
    (collected, done)
}

fn lock(collected: &Collected) -> std::sync::MutexGuard<'_, String> {
    collected
        .text
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
