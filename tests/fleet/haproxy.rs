//! HAProxy for the fleet test: `deploy/haproxy/haproxy.cfg` rendered with loopback ports and a
//! short check interval, run in the foreground, and watched through its stats socket.
//!
//! The rendering rewrites named lines of the example and fails when one of them is missing, so
//! the test runs the example as shipped (timeouts, balance, retries, checks, PROXY v2) and an edit
//! that moves a line the test depends on breaks the test instead of being silently untested.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::process::{Child, Command};
use tokio::time::Instant;

/// The example, as shipped.
const EXAMPLE: &str = include_str!("../../deploy/haproxy/haproxy.cfg");

/// Where Debian's package puts HAProxy; `PATH` is tried first.
fn binary() -> PathBuf {
    if let Some(paths) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&paths) {
            let candidate = dir.join("haproxy");
            if candidate.is_file() {
                return candidate;
            }
        }
    }
    for candidate in ["/usr/sbin/haproxy", "/sbin/haproxy"] {
        if Path::new(candidate).is_file() {
            return candidate.into();
        }
    }
    panic!("haproxy is not installed: scripts/test installs Debian's package (apt-get install haproxy)");
}

/// Replaces the one line of `cfg` that, trimmed, equals `old` (keeping its indentation); panics
/// when there is not exactly one.
fn replace_line(cfg: &str, old: &str, new: Option<&str>) -> String {
    let hits = cfg.lines().filter(|l| l.trim() == old).count();
    assert_eq!(hits, 1, "deploy/haproxy/haproxy.cfg: expected one line `{old}`, found {hits}");
    let mut out = String::new();
    for line in cfg.lines() {
        if line.trim() == old {
            if let Some(new) = new {
                let indent = &line[..line.len() - line.trim_start().len()];
                out.push_str(indent);
                out.push_str(new);
                out.push('\n');
            }
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// The ports of one replica, as HAProxy reaches it.
#[derive(Clone, Copy, Debug)]
pub struct ReplicaPorts {
    pub listener: u16,
    pub admin: u16,
}

/// The example with the test's addresses: the frontend on `frontend`, the three replicas on
/// loopback with their own admin ports, the stats socket at `stats`, checks every `inter_ms`,
/// each given `check_timeout_ms`.
pub fn render(
    frontend: u16,
    replicas: &[ReplicaPorts; 3],
    stats: &Path,
    inter_ms: u64,
    check_timeout_ms: u64,
) -> String {
    let mut cfg = EXAMPLE.to_string();
    // Root-only or host-specific settings: the test runs as any user, with nothing in /run.
    // Emergencies only: one line per connection would bury the test's output, and HAProxy
    // prints servers going DOWN and UP on its standard error anyway.
    cfg = replace_line(&cfg, "log /dev/log local0", Some("log stderr format raw local0 emerg"));
    cfg = replace_line(&cfg, "chroot /var/lib/haproxy", None);
    cfg = replace_line(&cfg, "user haproxy", None);
    cfg = replace_line(&cfg, "group haproxy", None);
    cfg = replace_line(
        &cfg,
        "stats socket /run/haproxy/admin.sock mode 660 level admin",
        Some(&format!("stats socket {} mode 600 level admin", stats.display())),
    );
    // Within the test's file descriptor limit (2 per session, 300 sessions and reconnects).
    cfg = replace_line(&cfg, "maxconn 50000", Some("maxconn 4000"));
    cfg = replace_line(&cfg, "bind :443", Some(&format!("bind 127.0.0.1:{frontend}")));
    // Only the interval shrinks; fall, rise, the check itself and PROXY v2 stay as shipped.
    cfg = replace_line(
        &cfg,
        "default-server check port 9090 inter 1s fall 2 rise 2 send-proxy-v2",
        Some(&format!("default-server check port 9090 inter {inter_ms}ms fall 2 rise 2 send-proxy-v2")),
    );
    cfg = replace_line(&cfg, "timeout check 1s", Some(&format!("timeout check {check_timeout_ms}ms")));
    for (i, r) in replicas.iter().enumerate() {
        let n = i + 1;
        cfg = replace_line(
            &cfg,
            &format!("server wsgate{n} 10.0.0.1{n}:8443"),
            Some(&format!("server wsgate{n} 127.0.0.1:{} port {}", r.listener, r.admin)),
        );
    }
    cfg
}

/// A running HAProxy; killed when dropped.
pub struct Haproxy {
    _child: Child,
    stats: PathBuf,
}

impl Haproxy {
    /// Starts HAProxy on `cfg` in the foreground, and waits until its stats socket answers.
    pub async fn start(cfg: &Path, stats: &Path) -> Haproxy {
        let child = Command::new(binary())
            .arg("-db")
            .arg("-f")
            .arg(cfg)
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("start haproxy");
        let h = Haproxy { _child: child, stats: stats.to_path_buf() };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if h.try_command("show info\n").await.is_ok() {
                return h;
            }
            assert!(Instant::now() < deadline, "haproxy's stats socket did not answer within 10 s");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn try_command(&self, command: &str) -> std::io::Result<String> {
        let mut s = UnixStream::connect(&self.stats).await?;
        s.write_all(command.as_bytes()).await?;
        let mut out = String::new();
        s.read_to_string(&mut out).await?;
        Ok(out)
    }

    /// Each replica's status as HAProxy's `show stat` reports it (`UP`, `DOWN`, `UP 1/2`...),
    /// in server order.
    pub async fn statuses(&self) -> Vec<String> {
        let csv = self.try_command("show stat\n").await.expect("haproxy stats socket");
        let mut header: Vec<&str> = Vec::new();
        let mut out = Vec::new();
        for line in csv.lines() {
            if let Some(h) = line.strip_prefix("# ") {
                header = h.split(',').collect();
                continue;
            }
            let fields: Vec<&str> = line.split(',').collect();
            let col = |name: &str| header.iter().position(|h| *h == name).map(|i| fields.get(i).copied().unwrap_or(""));
            if col("pxname") == Some("wsgate") && col("svname").is_some_and(|s| s.starts_with("wsgate")) {
                out.push(col("status").unwrap_or("").to_string());
            }
        }
        out
    }

    /// Waits until replica `i` (0-based) has status `want` exactly (`UP` or `DOWN`); returns when
    /// it was seen. Polled every 20 ms: HAProxy has no push interface for this.
    pub async fn wait_status(&self, i: usize, want: &str, within: Duration) -> Instant {
        let deadline = Instant::now() + within;
        loop {
            let s = self.statuses().await;
            if s.get(i).map(String::as_str) == Some(want) {
                return Instant::now();
            }
            assert!(Instant::now() < deadline, "haproxy: wsgate{} not {want} within {within:?}: {s:?}", i + 1);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
