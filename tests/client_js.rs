//! The JavaScript client's own suites, run from `cargo test` so the one test
//! command covers them: `npm test` in `client-js/` (unit and integration
//! tests against this build's gateway) and the browser end-to-end test
//! `client-js/e2e/run.mjs` (headless Chromium on the demo page, and on a
//! React page using the client's hooks, bundled when the test runs).
//!
//! Both get `PRESENCED_BIN`, the binary cargo just built. A missing
//! prerequisite fails the test with what to install: a test that skips
//! itself would let a machine without Node or Chromium pass for green.

use std::{
    io::Read,
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

/// Bound for `npm test`.
const NPM_TEST_TIMEOUT: Duration = Duration::from_secs(300);
/// Bound for the browser test (it bounds itself at 120 s).
const E2E_TIMEOUT: Duration = Duration::from_secs(180);

const CHROMIUM: &str = "/usr/bin/chromium";

/// The suites start gateways and a browser and check quiet windows: run
/// them one at a time so neither slows the other into a timeout.
static ONE_SUITE_AT_A_TIME: Mutex<()> = Mutex::new(());

#[test]
fn npm_test_passes() {
    let _alone = ONE_SUITE_AT_A_TIME
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    require_node_and_packages();
    run_suite("npm", &["test"], NPM_TEST_TIMEOUT);
}

#[test]
fn browser_end_to_end_passes() {
    let _alone = ONE_SUITE_AT_A_TIME
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    require_node_and_packages();
    assert!(
        Path::new(CHROMIUM).exists(),
        "{CHROMIUM} is missing; the browser test needs it: run .ci/test (or apt-get install chromium)"
    );
    run_suite("node", &["e2e/run.mjs"], E2E_TIMEOUT);
}

fn client_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("client-js")
}

fn require_node_and_packages() {
    for tool in ["node", "npm"] {
        let found = Command::new(tool)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|status| status.success());
        assert!(
            found,
            "`{tool}` is not on the PATH; the JavaScript client's tests need it: \
             run .ci/test (or apt-get install nodejs npm chromium, then cd client-js && npm ci)"
        );
    }
    assert!(
        client_dir().join("node_modules").is_dir(),
        "client-js/node_modules is missing; install the client's dev dependencies: \
         run .ci/test (or cd client-js && npm ci)"
    );
}

/// Runs `program args` in `client-js/` and fails with its output unless it
/// exits 0 within `limit`.
fn run_suite(program: &str, args: &[&str], limit: Duration) {
    let started = Instant::now();
    let mut child = Command::new(program)
        .args(args)
        .current_dir(client_dir())
        .env("PRESENCED_BIN", env!("CARGO_BIN_EXE_presenced"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own process group, so a timeout kills npm, node, the
        // gateways and the browser they started, not just npm.
        .process_group(0)
        .spawn()
        .unwrap_or_else(|error| panic!("cannot start `{program}`: {error}"));
    let stdout = drain(child.stdout.take());
    let stderr = drain(child.stderr.take());
    let status = wait_within(&mut child, limit);
    let output = format!(
        "---- stdout ----\n{}\n---- stderr ----\n{}",
        stdout.text(),
        stderr.text()
    );
    let command = format!("{program} {}", args.join(" "));
    match status {
        Some(status) if status.success() => {
            println!("`{command}` passed in {:.1?}\n{output}", started.elapsed());
        }
        Some(status) => panic!("`{command}` in client-js/ failed ({status})\n{output}"),
        None => {
            panic!("`{command}` in client-js/ did not finish within {limit:?}; killed\n{output}")
        }
    }
}

/// Output of a child, read on a thread so the child never blocks on a pipe.
struct Drained {
    bytes: Arc<Mutex<Vec<u8>>>,
    reader: thread::JoinHandle<()>,
}

impl Drained {
    /// What was read, after waiting a little for the pipe's end: a process
    /// that escaped the kill may hold it open.
    fn text(self) -> String {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !self.reader.is_finished() && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(20));
        }
        String::from_utf8_lossy(&self.bytes.lock().unwrap_or_else(|e| e.into_inner())).into_owned()
    }
}

fn drain(pipe: Option<impl Read + Send + 'static>) -> Drained {
    let bytes = Arc::new(Mutex::new(Vec::new()));
    let sink = bytes.clone();
    let reader = thread::spawn(move || {
        let Some(mut pipe) = pipe else { return };
        let mut chunk = [0u8; 8192];
        while let Ok(read @ 1..) = pipe.read(&mut chunk) {
            sink.lock()
                .unwrap_or_else(|e| e.into_inner())
                .extend_from_slice(&chunk[..read]);
        }
    });
    Drained { bytes, reader }
}

/// The exit status, or `None` after killing the child's process group at
/// `limit`.
fn wait_within(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(50)),
            Ok(None) => {
                // `kill(1)` on the group rather than a libc binding: no
                // unsafe code. The child is not reaped yet, so its pid (the
                // group id) cannot name another process group.
                let group = format!("-{}", child.id());
                let _ = Command::new("kill").args(["-KILL", "--", &group]).status();
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
            Err(error) => panic!("waiting for the child failed: {error}"),
        }
    }
}
