//! One wsgate replica of the fleet: the built binary on its own config, restarted on the same
//! ports, and what its JSON log says (ports, the drain, every session's end and dropped bytes).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;
use tokio::time::Instant;

/// The drain settings of every replica (`[shutdown]`), short so the test stays short. The drain
/// delay must outlast HAProxy's `inter * fall + timeout check` (checked by the test).
pub const DRAIN_DELAY_SECS: u64 = 2;
pub const CLOSE_WINDOW_SECS: u64 = 2;
pub const DEADLINE_SECS: u64 = 12;

/// What the replica's log said, summed over all its runs.
#[derive(Debug, Default)]
pub struct LogTotals {
    /// `session ended` lines.
    pub sessions_ended: u64,
    /// The sum of their `dropped.bytes`: what the gateway counted in
    /// `wsgate_dropped_bytes_total` (the same figure, logged as it is added).
    pub dropped_bytes: u64,
    /// The sum of their `dropped.client_bytes`: client bytes that crossed the 1001, counted in
    /// `wsgate_dropped_bytes_total{direction="to_backend"}`.
    pub dropped_client_bytes: u64,
    /// The sum of their `to_backend.bytes` and `to_client.bytes`: what the gateway delivered.
    pub to_backend: u64,
    pub to_client: u64,
    /// `session ended` lines with `close.code` 1001.
    pub closed_1001: u64,
    /// Warnings and errors, and sessions dropped at the deadline: any is a failure.
    pub problems: Vec<String>,
}

/// Events a run's log reports as they happen.
#[derive(Debug)]
pub enum Event {
    Listening(u16),
    AdminListening(u16),
    Draining(Instant),
    ShutdownComplete,
}

pub struct Replica {
    pub index: usize,
    config: PathBuf,
    backend_port: u16,
    pub listener_port: u16,
    pub admin_port: u16,
    child: Option<Child>,
    events: Option<mpsc::UnboundedReceiver<Event>>,
    pub totals: Arc<Mutex<LogTotals>>,
    /// `sessions_ended` and `dropped_bytes` of `totals` when the running process started.
    run_start: (u64, u64),
}

/// The figures of a `/metrics` scrape the test needs (each summed over its labels).
#[derive(Debug, Default, Clone, Copy)]
pub struct Scrape {
    pub sessions_open: u64,
    pub sessions_total: u64,
    /// `wsgate_dropped_bytes_total{direction="to_client"}` and `{direction="to_backend"}`.
    pub dropped_bytes: u64,
    pub dropped_client_bytes: u64,
}

/// Scrapes `/metrics` on `127.0.0.1:port`.
pub async fn scrape(port: u16) -> Result<Scrape, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.map_err(|e| format!("connect: {e}"))?;
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: wsgate\r\n\r\n").await.map_err(|e| format!("write: {e}"))?;
    let mut body = String::new();
    s.read_to_string(&mut body).await.map_err(|e| format!("read: {e}"))?;
    if !body.starts_with("HTTP/1.0 200") {
        return Err(format!("answer: {:?}", &body[..body.len().min(200)]));
    }
    let mut out = Scrape::default();
    for line in body.lines() {
        let name = line.split(['{', ' ']).next().unwrap_or("");
        let field = match name {
            "wsgate_sessions_open" => &mut out.sessions_open,
            "wsgate_sessions_total" => &mut out.sessions_total,
            "wsgate_dropped_bytes_total" if line.contains("direction=\"to_client\"") => &mut out.dropped_bytes,
            "wsgate_dropped_bytes_total" if line.contains("direction=\"to_backend\"") => &mut out.dropped_client_bytes,
            _ => continue,
        };
        *field += line.rsplit(' ').next().unwrap().parse::<f64>().expect("a sample value") as u64;
    }
    Ok(out)
}

fn config_text(listener: u16, admin: u16, backend: u16) -> String {
    format!(
        r#"# A fleet test replica: behind HAProxy (PROXY v2 in), PROXY v2 out to its backend.
[listeners.public]
address = "127.0.0.1:{listener}"
proxy_protocol = true
trusted_proxies = ["127.0.0.1/32"]

[admin]
address = "127.0.0.1:{admin}"

[routes.fleet]
path = "/fleet"
backend = "127.0.0.1:{backend}"
proxy_protocol = "v2"

[shutdown]
drain_delay_secs = {DRAIN_DELAY_SECS}
close_window_secs = {CLOSE_WINDOW_SECS}
deadline_secs = {DEADLINE_SECS}

[log]
format = "json"
"#
    )
}

fn port_of(url: &str) -> u16 {
    let rest = url.split("://").nth(1).expect("url");
    let hostport = rest.split('/').next().unwrap();
    hostport.rsplit(':').next().unwrap().parse().expect("port")
}

impl Replica {
    /// Starts replica `index` on OS-chosen ports (learnt from its log), relaying to
    /// `backend_port`.
    pub async fn start(index: usize, dir: &Path, backend_port: u16) -> Replica {
        let mut r = Replica {
            index,
            config: dir.join(format!("wsgate{}.toml", index + 1)),
            backend_port,
            listener_port: 0,
            admin_port: 0,
            child: None,
            events: None,
            totals: Arc::default(),
            run_start: (0, 0),
        };
        r.spawn().await;
        r
    }

    /// (Re)starts the process on the ports it had (0 the first time), and waits for both
    /// `listening` lines.
    pub async fn spawn(&mut self) {
        {
            let t = self.totals.lock().unwrap();
            self.run_start = (t.sessions_ended, t.dropped_bytes);
        }
        std::fs::write(&self.config, config_text(self.listener_port, self.admin_port, self.backend_port)).unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_wsgate"))
            .args(["run", "--config"])
            .arg(&self.config)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("start wsgate");
        let (tx, mut rx) = mpsc::unbounded_channel();
        let lines = BufReader::new(child.stderr.take().unwrap()).lines();
        tokio::spawn(read_log(self.index, lines, tx, self.totals.clone()));
        let (mut listener, mut admin) = (None, None);
        while listener.is_none() || admin.is_none() {
            match tokio::time::timeout(Duration::from_secs(20), rx.recv()).await {
                Ok(Some(Event::Listening(p))) => listener = Some(p),
                Ok(Some(Event::AdminListening(p))) => admin = Some(p),
                Ok(other) => panic!("wsgate{}: no `listening` lines, got {other:?}", self.index + 1),
                Err(_) => panic!("wsgate{}: no `listening` lines within 20 s", self.index + 1),
            }
        }
        if self.listener_port != 0 {
            assert_eq!(
                (listener, admin),
                (Some(self.listener_port), Some(self.admin_port)),
                "restart on the same ports"
            );
        }
        self.listener_port = listener.unwrap();
        self.admin_port = admin.unwrap();
        self.child = Some(child);
        self.events = Some(rx);
    }

    /// `session ended` lines and their dropped bytes since the running process started.
    pub fn this_run(&self) -> (u64, u64) {
        let t = self.totals.lock().unwrap();
        (t.sessions_ended - self.run_start.0, t.dropped_bytes - self.run_start.1)
    }

    pub fn sigterm(&self) {
        let pid = self.child.as_ref().and_then(|c| c.id()).expect("running").to_string();
        let ok = std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap().success();
        assert!(ok, "kill -TERM {pid}");
    }

    /// Waits for the `draining: listeners closed` line; returns when it came.
    pub async fn draining(&mut self, within: Duration) -> Instant {
        loop {
            match self.next_event(within, "draining").await {
                Event::Draining(at) => return at,
                _ => continue,
            }
        }
    }

    /// Waits for `shutdown complete` and the exit, which must be a clean one.
    pub async fn exited(&mut self, within: Duration) {
        loop {
            if let Event::ShutdownComplete = self.next_event(within, "shutdown complete").await {
                break;
            }
        }
        let mut child = self.child.take().unwrap();
        let status = tokio::time::timeout(within, child.wait()).await.expect("exit").unwrap();
        assert!(status.success(), "wsgate{} exited with {status}", self.index + 1);
    }

    async fn next_event(&mut self, within: Duration, what: &str) -> Event {
        let rx = self.events.as_mut().unwrap();
        match tokio::time::timeout(within, rx.recv()).await {
            Ok(Some(e)) => e,
            Ok(None) => panic!("wsgate{}: log ended before `{what}`", self.index + 1),
            Err(_) => panic!("wsgate{}: no `{what}` within {within:?}", self.index + 1),
        }
    }
}

async fn read_log(
    index: usize,
    mut lines: tokio::io::Lines<BufReader<tokio::process::ChildStderr>>,
    tx: mpsc::UnboundedSender<Event>,
    totals: Arc<Mutex<LogTotals>>,
) {
    let mut keep = std::env::var_os("FLEET_LOG_DIR").map(|d| {
        let path = std::path::Path::new(&d).join(format!("wsgate{}.log", index + 1));
        std::fs::OpenOptions::new().create(true).append(true).open(path).unwrap()
    });
    while let Ok(Some(line)) = lines.next_line().await {
        if let Some(f) = keep.as_mut() {
            use std::io::Write;
            let _ = writeln!(f, "{line}");
        }
        let Ok(v) = serde_json::from_str::<Value>(&line) else {
            totals.lock().unwrap().problems.push(format!("wsgate{}: not JSON: {line}", index + 1));
            continue;
        };
        let message = v["message"].as_str().unwrap_or("");
        let level = v["level"].as_str().unwrap_or("");
        let event = match message {
            "listening" => Some(Event::Listening(port_of(v["url"].as_str().unwrap()))),
            "admin listening" => Some(Event::AdminListening(port_of(v["url"].as_str().unwrap()))),
            m if m.starts_with("draining: listeners closed") => Some(Event::Draining(Instant::now())),
            "shutdown complete" => Some(Event::ShutdownComplete),
            "session ended" => {
                let mut t = totals.lock().unwrap();
                t.sessions_ended += 1;
                t.dropped_bytes += v["dropped.bytes"].as_u64().expect("dropped.bytes");
                t.dropped_client_bytes += v["dropped.client_bytes"].as_u64().expect("dropped.client_bytes");
                t.to_backend += v["to_backend.bytes"].as_u64().expect("to_backend.bytes");
                t.to_client += v["to_client.bytes"].as_u64().expect("to_client.bytes");
                if v["close.code"].as_u64() == Some(1001) {
                    t.closed_1001 += 1;
                }
                None
            }
            _ => None,
        };
        if level == "WARN" || level == "ERROR" {
            totals.lock().unwrap().problems.push(format!("wsgate{}: {line}", index + 1));
        }
        if let Some(e) = event {
            let _ = tx.send(e);
        }
    }
}
