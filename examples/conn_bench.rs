//! Measures what a connection costs the gateway, from outside.
//!
//! `idle`: opens N WebSocket connections (N users, one tab each), waits for
//! every `welcome`, and reports the gateway's RSS growth per connection.
//! `cycle`: runs M connect → welcome → close cycles, C at a time, and
//! reports the gateway's CPU time (user + system, from /proc) per cycle,
//! which includes the presence writes (online and offline) of each cycle.
//!
//! ```text
//! cargo run --release --example conn_bench -- --pid PID --url ws://127.0.0.1:8080/ws idle 10000
//! cargo run --release --example conn_bench -- --pid PID --url ws://127.0.0.1:8080/ws cycle 20000 64
//! ```
//! The gateway must run with `--dev`. A tool, so failures just panic.

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use tokio_tungstenite::{connect_async, tungstenite::Message};

fn proc_field(pid: u32, key: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("gateway pid");
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("field in /proc status")
}

/// Gateway CPU time (user + system) in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("gateway pid");
    // Fields after the ")" of the command name; utime and stime are 14 and 15.
    let rest = &stat[stat.rfind(')').expect("stat format") + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

async fn open(
    url: &str,
    user: &str,
) -> tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>> {
    let (mut ws, _) = connect_async(format!("{url}?user={user}"))
        .await
        .expect("connect");
    loop {
        match ws.next().await.expect("welcome").expect("frame") {
            Message::Text(t) if t.contains("\"welcome\"") => return ws,
            _ => {}
        }
    }
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |name: &str| {
        let i = args.iter().position(|a| a == name).expect(name);
        args[i + 1].clone()
    };
    let pid: u32 = arg("--pid").parse().unwrap();
    let url = arg("--url");
    let mode_at = args
        .iter()
        .position(|a| a == "idle" || a == "cycle")
        .expect("mode");
    let n: usize = args[mode_at + 1].parse().unwrap();
    let ticks_per_sec = 100.0; // USER_HZ on Linux

    match args[mode_at].as_str() {
        "idle" => {
            let before = proc_field(pid, "VmRSS:");
            let start = Instant::now();
            let mut conns = Vec::with_capacity(n);
            let mut tasks = Vec::new();
            for chunk in (0..n).collect::<Vec<_>>().chunks(500) {
                for &i in chunk {
                    let url = url.clone();
                    tasks.push(tokio::spawn(async move {
                        open(&url, &format!("idle{i}")).await
                    }));
                }
                for t in tasks.drain(..) {
                    conns.push(t.await.unwrap());
                }
            }
            let elapsed = start.elapsed();
            // Let the registry's last batch and allocator settle.
            tokio::time::sleep(Duration::from_secs(2)).await;
            let after = proc_field(pid, "VmRSS:");
            println!(
                "idle: {n} connections in {:.2}s; gateway RSS {before} KiB -> {after} KiB; {:.2} KiB per connection",
                elapsed.as_secs_f64(),
                (after - before) as f64 / n as f64
            );
            for mut c in conns {
                let _ = c.close(None).await;
            }
        }
        "cycle" => {
            let concurrency: usize = args[mode_at + 2].parse().unwrap();
            let cpu_before = cpu_ticks(pid);
            let start = Instant::now();
            let per_task = n / concurrency;
            let tasks: Vec<_> = (0..concurrency)
                .map(|t| {
                    let url = url.clone();
                    tokio::spawn(async move {
                        for i in 0..per_task {
                            let mut ws = open(&url, &format!("cyc{t}x{i}")).await;
                            ws.close(None).await.unwrap();
                            // Wait for the server's close reply: the cycle is done.
                            while let Some(Ok(_)) = ws.next().await {}
                        }
                    })
                })
                .collect();
            for t in tasks {
                t.await.unwrap();
            }
            let elapsed = start.elapsed();
            tokio::time::sleep(Duration::from_millis(500)).await;
            let cpu = (cpu_ticks(pid) - cpu_before) as f64 / ticks_per_sec;
            let cycles = per_task * concurrency;
            println!(
                "cycle: {cycles} connect+close cycles in {:.2}s ({:.0}/s); gateway CPU {cpu:.2}s; {:.1} µs per cycle",
                elapsed.as_secs_f64(),
                cycles as f64 / elapsed.as_secs_f64(),
                cpu * 1e6 / cycles as f64
            );
        }
        _ => unreachable!(),
    }
}
