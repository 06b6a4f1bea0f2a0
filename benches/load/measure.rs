//! Wall-clock and memory figures: throughput, round-trip latency, CPU
//! and resident memory read from `/proc`.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::Mode;
use crate::client::*;
use crate::targets::*;

/// Payload bytes per second over `duration`, with `sessions` sessions each sending `size`-byte
/// messages as fast as the target takes them: the bytes that came back (`Echo`), that were sent
/// (`Send`), or, sending nothing, that arrived (`Receive`).
pub(crate) async fn throughput(
    t: &Endpoint,
    tls: &tokio_rustls::TlsConnector,
    mode: Mode,
    sessions: usize,
    size: usize,
    duration: Duration,
) -> f64 {
    let mut conns = Vec::new();
    for _ in 0..sessions {
        conns.push(Conn::open(t, tls).await);
    }
    let counted = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let (send, count_sent) = (mode != Mode::Receive, mode == Mode::Send);
    let mut tasks = Vec::new();
    for conn in conns {
        let (counted, stop) = (counted.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let count = |n: usize| {
                counted.fetch_add(n as u64, Ordering::Relaxed);
            };
            let wire = conn.wire(&vec![0x5a_u8; size]);
            let Conn { io, mut reader, early } = conn;
            let (mut r, mut w) = tokio::io::split(io);
            let writer = async {
                while send && !stop.load(Ordering::Relaxed) {
                    if w.write_all(&wire).await.is_err() {
                        break;
                    }
                    if count_sent {
                        count(size);
                    }
                }
            };
            let reader = async {
                if !count_sent {
                    count(early);
                }
                let mut buf = vec![0u8; 256 * 1024];
                while let Ok(n @ 1..) = r.read(&mut buf).await {
                    let payload = reader.count(&buf[..n]);
                    if !count_sent {
                        count(payload);
                    }
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                }
            };
            tokio::select! { _ = async { tokio::join!(writer, reader) } => {}, _ = wait_stop(&stop) => {} }
        }));
    }
    // Warm up briefly, then measure the window.
    tokio::time::sleep(duration / 5).await;
    let (b0, t0) = (counted.load(Ordering::Relaxed), Instant::now());
    tokio::time::sleep(duration).await;
    let (b1, t1) = (counted.load(Ordering::Relaxed), Instant::now());
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(2), t).await;
    }
    (b1 - b0) as f64 / (t1 - t0).as_secs_f64()
}

pub(crate) async fn wait_stop(stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
}

/// Round-trip times of `size`-byte messages: each of `sessions` sessions sends one, waits for the
/// whole echo, and repeats, for `duration`.
pub(crate) async fn latency(
    t: &Endpoint,
    tls: &tokio_rustls::TlsConnector,
    sessions: usize,
    size: usize,
    duration: Duration,
) -> Vec<Duration> {
    let mut conns = Vec::new();
    for _ in 0..sessions {
        conns.push(Conn::open(t, tls).await);
    }
    let deadline = Instant::now() + duration;
    let mut tasks = Vec::new();
    for conn in conns {
        tasks.push(tokio::spawn(async move {
            let mut samples = Vec::new();
            let mut conn = conn;
            let wire = conn.wire(&vec![7u8; size]);
            let mut buf = vec![0u8; 64 * 1024];
            while Instant::now() < deadline {
                let t0 = Instant::now();
                conn.round_trip(&wire, size, &mut buf).await;
                samples.push(t0.elapsed());
            }
            samples
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all.sort();
    all
}

pub(crate) fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Proportional set size of a process and all its descendants, KiB: PSS splits pages shared
/// between processes (websockify forks one per connection), so the sum is not inflated.
pub(crate) fn rss_kib(pid: u32) -> u64 {
    let pss = |p: u32| -> u64 {
        let text = std::fs::read_to_string(format!("/proc/{p}/smaps_rollup")).unwrap_or_default();
        text.lines()
            .find_map(|l| l.strip_prefix("Pss:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    descendants(pid).into_iter().map(pss).sum()
}

/// `pid` and every process below it.
pub(crate) fn descendants(pid: u32) -> Vec<u32> {
    let parent_of = |p: u32| -> Option<u32> {
        let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).ok()?;
        stat.rsplit(')').next()?.split_whitespace().nth(1)?.parse().ok()
    };
    let all: Vec<u32> = std::fs::read_dir("/proc")
        .map(|d| d.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok()).collect())
        .unwrap_or_default();
    let mut tree = vec![pid];
    let mut i = 0;
    while i < tree.len() {
        let p = tree[i];
        tree.extend(all.iter().copied().filter(|c| parent_of(*c) == Some(p)));
        i += 1;
    }
    tree
}

/// CPU seconds (user + system) a process tree has used: its own, its live descendants', and
/// its reaped children's.
pub(crate) fn cpu_secs(pid: u32) -> f64 {
    let one = |p: u32, with_children: bool| -> f64 {
        let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).unwrap_or_default();
        // Fields after the ")" that ends the command name: utime, stime, cutime, cstime are the
        // 12th to 15th.
        let rest = stat.rsplit(')').next().unwrap_or("");
        let f: Vec<&str> = rest.split_whitespace().collect();
        let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
        let children = if with_children { ticks(13) + ticks(14) } else { 0.0 };
        (ticks(11) + ticks(12) + children) / 100.0
    };
    descendants(pid).into_iter().enumerate().map(|(i, p)| one(p, i == 0)).sum()
}

/// Idle memory per session: resident memory of the relaying process at `low` and `high` idle
/// sessions held by a child process; the slope between them, KiB per session.
pub(crate) fn idle_memory(t: &Target, ca_pem: &Path, low: usize, high: usize) -> Option<f64> {
    let pid = t.pid()?;
    let me = std::env::current_exe().unwrap();
    let hold = |count: usize| {
        let mut cmd = Command::new(&me);
        cmd.args(["hold", "--url", &t.at.url(), "--count", &count.to_string()]);
        if t.at.kind == Kind::Wss {
            cmd.arg("--ca").arg(ca_pem);
        }
        spawn_and_find(cmd, |l| l.strip_prefix("held ").map(|_| SocketAddr::from(([0, 0, 0, 0], 0))), true).0
    };
    let settle = || std::thread::sleep(Duration::from_millis(500));
    let mut first = hold(low);
    settle();
    let rss_low = rss_kib(pid);
    let mut second = hold(high - low);
    settle();
    let rss_high = rss_kib(pid);
    for c in [&mut first, &mut second] {
        drop(c.stdin.take());
        let _ = c.wait();
    }
    Some((rss_high as f64 - rss_low as f64) / (high - low) as f64)
}
