//! One gateway under load: the URL tabs connect to, and its Prometheus page
//! (on the same port), read over a bare HTTP/1.1 request.
//!
//! The gateway's `process_cpu_seconds_total` counts whole seconds, too
//! coarse for a run's few CPU seconds. When the gateway runs on this
//! machine, its CPU time is also read from `/proc/PID/stat` (clock ticks,
//! 10 ms): the pid is the one holding the target's listening socket, found
//! through `/proc/net/tcp*` and the processes' fds, or given with
//! `--gateway-pids`.

use std::time::Duration;

use serde::Serialize;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    time::timeout,
};

/// Bound on one /metrics read.
const METRICS_TIMEOUT: Duration = Duration::from_secs(5);

/// A gateway's WebSocket URL and the `HOST:PORT` its HTTP API answers on.
#[derive(Debug, Clone)]
pub struct Target {
    /// `ws://HOST:PORT/ws` as given.
    pub ws: String,
    /// `HOST:PORT`.
    pub authority: String,
    /// The gateway's pid, when it runs on this machine.
    pub pid: Option<u32>,
}

impl Target {
    /// Parses `ws://HOST:PORT/PATH`; `wss://` is refused (no TLS here yet).
    pub fn parse(url: &str) -> anyhow::Result<Self> {
        let rest = url
            .strip_prefix("ws://")
            .ok_or_else(|| anyhow::anyhow!("{url:?}: only ws:// targets are supported"))?;
        let authority = rest.split(['/', '?']).next().unwrap_or_default();
        anyhow::ensure!(!authority.is_empty(), "{url:?}: no host");
        Ok(Self {
            ws: url.to_owned(),
            authority: authority.to_owned(),
            pid: None,
        })
    }

    /// Finds the pid of a gateway on this machine from its port.
    pub fn find_pid(&mut self) {
        let local = ["127.", "localhost:", "[::1]:"]
            .iter()
            .any(|p| self.authority.starts_with(p));
        let port = self
            .authority
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok());
        if let (true, Some(port)) = (local, port) {
            self.pid = listener_pid(port);
        }
    }

    /// The URL a tab of `user` connects to (dev identity).
    pub fn tab_url(&self, user: &str) -> String {
        let sep = if self.ws.contains('?') { '&' } else { '?' };
        format!("{}{sep}user={user}", self.ws)
    }

    /// The process figures of the gateway's /metrics page.
    pub async fn process_sample(&self) -> Result<ProcessSample, String> {
        let page = timeout(METRICS_TIMEOUT, self.metrics_page())
            .await
            .map_err(|_| "metrics timeout".to_owned())??;
        let get = |name| sample(&page, name).ok_or_else(|| format!("no {name} in /metrics"));
        Ok(ProcessSample {
            rss_bytes: get("process_resident_memory_bytes")?,
            cpu_seconds: get("process_cpu_seconds_total")?,
            open_fds: get("process_open_fds")?,
            proc_cpu_seconds: self.pid.and_then(proc_cpu_seconds),
        })
    }

    async fn metrics_page(&self) -> Result<String, String> {
        let mut s = TcpStream::connect(&self.authority)
            .await
            .map_err(|e| e.to_string())?;
        let request = format!(
            "GET /metrics HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
            self.authority
        );
        s.write_all(request.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        let mut page = String::new();
        s.read_to_string(&mut page)
            .await
            .map_err(|e| e.to_string())?;
        Ok(page)
    }
}

/// A gateway process's resources at one moment.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct ProcessSample {
    /// `process_resident_memory_bytes`.
    pub rss_bytes: f64,
    /// `process_cpu_seconds_total`.
    pub cpu_seconds: f64,
    /// `process_open_fds`.
    pub open_fds: f64,
    /// User + system CPU seconds from `/proc/PID/stat`, when the gateway's
    /// pid is known.
    pub proc_cpu_seconds: Option<f64>,
}

/// Linux's `USER_HZ`: the unit of `/proc/PID/stat` CPU times (100 on every
/// architecture Linux runs this tool on).
const CLOCK_TICKS_PER_S: f64 = 100.0;

/// User + system CPU seconds of `pid` (all its threads).
pub fn proc_cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may hold
    // spaces: state is field 3, utime 14, stime 15.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / CLOCK_TICKS_PER_S)
}

/// The pid of the process on this machine listening on TCP `port`.
pub fn listener_pid(port: u16) -> Option<u32> {
    let mut inodes = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            let (Some(local), Some(state), Some(inode)) = (f.get(1), f.get(3), f.get(9)) else {
                continue;
            };
            let listening = *state == "0A";
            let on_port = local
                .rsplit(':')
                .next()
                .and_then(|p| u16::from_str_radix(p, 16).ok())
                == Some(port);
            if listening && on_port {
                inodes.push(format!("socket:[{inode}]"));
            }
        }
    }
    if inodes.is_empty() {
        return None;
    }
    for proc_dir in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = proc_dir.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(proc_dir.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if let Ok(link) = std::fs::read_link(fd.path())
                && inodes.iter().any(|i| link.as_os_str() == i.as_str())
            {
                return Some(pid);
            }
        }
    }
    None
}

/// The value of an unlabelled sample on a Prometheus page.
pub fn sample(page: &str, name: &str) -> Option<f64> {
    page.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

/// Bound on one Redis `INFO` read.
const REDIS_TIMEOUT: Duration = Duration::from_secs(5);

/// The `EXEC` calls (`MULTI`/`EXEC` transactions) a Redis server has run,
/// from `INFO commandstats`; `url` is `redis://[user:pass@]HOST:PORT[/db]`.
pub async fn redis_transactions(url: &str) -> Result<u64, String> {
    let page = redis_info(url, "commandstats").await?;
    Ok(page
        .lines()
        .find_map(|l| l.strip_prefix("cmdstat_exec:calls="))
        .and_then(|v| v.split(',').next()?.parse().ok())
        .unwrap_or(0))
}

/// The commands a Redis server has processed (`total_commands_processed`
/// of `INFO stats`: what its clients sent, a script's `EVALSHA` one).
pub async fn redis_commands(url: &str) -> Result<u64, String> {
    let page = redis_info(url, "stats").await?;
    page.lines()
        .find_map(|l| l.strip_prefix("total_commands_processed:"))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| "INFO stats has no total_commands_processed".to_owned())
}

/// One `INFO` section's text.
async fn redis_info(url: &str, section: &str) -> Result<String, String> {
    let rest = url
        .strip_prefix("redis://")
        .ok_or_else(|| format!("{url:?}: not a redis:// URL"))?;
    let authority = rest.split('/').next().unwrap_or_default();
    let host = authority.rsplit('@').next().unwrap_or_default();
    let page = timeout(REDIS_TIMEOUT, async {
        let mut s = TcpStream::connect(host)
            .await
            .map_err(|e| format!("redis {host}: {e}"))?;
        s.write_all(format!("INFO {section}\r\n").as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        let mut buf = Vec::new();
        let mut chunk = [0u8; 8192];
        loop {
            let n = s.read(&mut chunk).await.map_err(|e| e.to_string())?;
            if n == 0 {
                return Err("redis closed the connection".to_owned());
            }
            buf.extend_from_slice(&chunk[..n]);
            // A bulk string: `$LEN\r\n` then LEN bytes and `\r\n`.
            let text = String::from_utf8_lossy(&buf);
            if let Some((head, body)) = text.split_once("\r\n") {
                let len: usize = head
                    .strip_prefix('$')
                    .and_then(|l| l.parse().ok())
                    .ok_or_else(|| format!("unexpected answer {head:?}"))?;
                if body.len() >= len {
                    return Ok(body[..len].to_owned());
                }
            }
        }
    })
    .await
    .map_err(|_| "redis INFO timeout".to_owned())??;
    Ok(page)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_cpu_is_read_and_a_listener_is_found_by_port() {
        assert!(proc_cpu_seconds(std::process::id()).is_some());
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        assert_eq!(listener_pid(port), Some(std::process::id()));
    }
}
