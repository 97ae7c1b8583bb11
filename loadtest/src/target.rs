//! One gateway under load: the URL tabs connect to, and its Prometheus page
//! (on the same port), read over a bare HTTP/1.1 request.

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
        })
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
}

/// The value of an unlabelled sample on a Prometheus page.
pub fn sample(page: &str, name: &str) -> Option<f64> {
    page.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}
