//! The reconnect storm: what a relay does when thousands of browsers reconnect at once, as after
//! a replica drains or a network blip.
//!
//! 5,000 wss clients (full TLS handshakes: a storm after a drain meets a replica that has never
//! seen them) from 64 source addresses in 127.0.0.0/8, so that per-client limits see a spread of
//! addresses as they would in the field and no address runs short of ephemeral ports. They are
//! driven by a few child processes of the generator (`storm-clients`), each one tokio runtime
//! on one thread holding its share, all released at once and connecting as fast as they can.
//! Each session stays open until every client has its answer, then all close. The relay is a
//! fresh process per storm, so its peak resident memory (`VmHWM`) is the storm's, not that of
//! the figures before it; wsgate runs with its default limits and metrics on, so its per-client
//! and handshake-pool limits are part of what is measured, and its refusal counters are read
//! after the storm to name the limit behind any failure.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rustls::pki_types::ServerName;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpSocket;

use crate::client::{Io, NotUpgraded, try_upgrade};
use crate::handshake::{self, Handshake};
use crate::measure::rss_kib;
use crate::targets::*;

/// The storm's shape: clients, driving processes, source addresses (127.0.0.2 onwards).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Shape {
    pub(crate) clients: usize,
    pub(crate) processes: usize,
    pub(crate) sources: usize,
}

pub(crate) const SHAPE: Shape = Shape { clients: 5000, processes: 4, sources: 64 };

/// A client gives up on a handshake after this long: three times wsgate's default
/// `handshake_timeout_secs`, and long enough for SYNs the kernel dropped (a full listen
/// backlog) to be sent again (1 s, then 3 s).
const CLIENT_TIMEOUT: Duration = Duration::from_secs(30);

/// What one storm did.
pub(crate) struct Storm {
    pub(crate) name: &'static str,
    /// From the release until the last client had its answer (open or failed).
    pub(crate) all_answered: Duration,
    pub(crate) opened: usize,
    /// Handshake latencies of the clients that opened, from their connect to the 101.
    pub(crate) latencies_us: Vec<u64>,
    /// Failures by what the client saw.
    pub(crate) failures: BTreeMap<String, usize>,
    /// The relay's peak resident set (`VmHWM`) and its PSS with every client answered, KiB.
    pub(crate) peak_rss_kib: u64,
    pub(crate) pss_kib: u64,
    /// wsgate's refusal and TLS failure counters after the storm (not 0 only).
    pub(crate) refusals: Vec<String>,
    /// SYNs the kernel dropped at the relay's full listen backlog during the storm (the
    /// machine's `TcpExtListenOverflows`; the echo backend's backlog is as large, and it is
    /// dialled no faster than clients arrive). Each costs its client a retransmission a second
    /// later: the storm's tail.
    pub(crate) backlog_overflows: Option<u64>,
}

impl Storm {
    pub(crate) fn report(&self) -> String {
        let pct = |p: f64| {
            let v = &self.latencies_us;
            if v.is_empty() { f64::NAN } else { v[((v.len() - 1) as f64 * p).round() as usize] as f64 / 1000.0 }
        };
        let failed: usize = self.failures.values().sum();
        let mut s = format!(
            "| {} | {} | {:.2} s{} | {:.0}/{:.0}/{:.0} | {failed} | {} | {:.1} | {:.1} |\n",
            self.name,
            self.opened,
            self.all_answered.as_secs_f64(),
            if failed > 0 { " (not all open)" } else { "" },
            pct(0.5),
            pct(0.99),
            pct(1.0),
            self.backlog_overflows.map_or("–".to_string(), |n| n.to_string()),
            self.peak_rss_kib as f64 / 1024.0,
            self.pss_kib as f64 / 1024.0,
        );
        for (reason, n) in &self.failures {
            s += &format!("|  | failed: {reason}: {n} | | | | | | |\n");
        }
        s
    }

    pub(crate) fn header(shape: Shape) -> String {
        format!(
            "Reconnect storm: {} wss clients (full handshakes) from {} source addresses (127.0.0.2-127.0.0.{}), \
             {} client processes of one tokio thread each, all released at once; sessions held until every client \
             has its answer.\n\n\
             | target | opened | until all answered | handshake p50/p99/max ms | failed | SYNs dropped at the backlog | peak RSS MiB | PSS all open MiB |\n\
             |---|---|---|---|---|---|---|---|\n",
            shape.clients,
            shape.sources,
            shape.sources + 1,
            shape.processes
        )
    }
}

/// One storm against a fresh `bare-wss` or `wsgate-wss`.
pub(crate) fn run(name: &'static str, setup: &Setup, ca_pem: &Path, shape: Shape, limits: &str) -> Storm {
    let me = std::env::current_exe().unwrap();
    // The relay inherits this process's descriptor limit and holds two per session.
    let soft = soft_fd_limit();
    if soft < 2 * shape.clients + 256 {
        eprintln!("\nstorm: the descriptor limit ({soft}) is below what the relay needs; raise it (ulimit -n)");
    }
    // The relay: a process of its own, started for this storm only.
    let (relay, gateway, at) = if name == "wsgate-wss" {
        let g = Gateway::start_wss(setup, limits);
        let at = g.at.clone();
        (None, Some(g), at)
    } else {
        let mut cmd = Command::new(&me);
        cmd.args(["bare-bridge", "--backend", &setup.echo.to_string(), "--tls"]).arg(&setup.cert).arg(&setup.key);
        let (child, addr) = spawn_and_find(cmd, |l| l.strip_prefix("listening ")?.parse().ok(), true);
        (Some(child), None, Endpoint::local(Kind::Wss, addr, "/"))
    };
    let pid = gateway.as_ref().map_or_else(|| relay.as_ref().unwrap().id(), |g| g.process.id());
    let per = shape.clients.div_ceil(shape.processes);
    let (tx, rx) = std::sync::mpsc::channel::<(usize, String)>();
    let mut drivers = Vec::new();
    for p in 0..shape.processes {
        let (offset, count) = (p * per, per.min(shape.clients - (p * per).min(shape.clients)));
        let mut cmd = Command::new(&me);
        cmd.args(["storm-clients", "--url", &at.url(), "--ca"])
            .arg(ca_pem)
            .args(["--offset", &offset.to_string(), "--count", &count.to_string()])
            .args(["--sources", &shape.sources.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = cmd.spawn().expect("start a storm-clients process");
        let lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                let _ = tx.send((p, line));
            }
            let _ = tx.send((p, "exit".into()));
        });
        drivers.push(child);
    }
    let wait_for = |word: &str, limit: Duration, mut each: Box<dyn FnMut(&str) + '_>| {
        let until = Instant::now() + limit;
        let mut seen = vec![false; shape.processes];
        while seen.iter().any(|s| !s) {
            let left = until.checked_duration_since(Instant::now()).unwrap_or_default();
            let (p, line) =
                rx.recv_timeout(left).unwrap_or_else(|_| panic!("storm: no \"{word}\" from every client process"));
            if line == word || line == "exit" {
                seen[p] = true;
            } else {
                each(&line);
            }
        }
    };
    wait_for("ready", Duration::from_secs(30), Box::new(|_| {}));
    let overflows_before = listen_overflows();
    let released = SystemTime::now();
    for d in &mut drivers {
        writeln!(d.stdin.as_mut().unwrap(), "go").unwrap();
    }
    let (mut latencies_us, mut failures, mut last_ns) = (Vec::new(), BTreeMap::new(), 0u128);
    wait_for(
        "answered",
        CLIENT_TIMEOUT + Duration::from_secs(60),
        Box::new(|line| {
            if let Some(us) = line.strip_prefix("open ") {
                latencies_us.push(us.parse().unwrap());
            } else if let Some(reason) = line.strip_prefix("fail ") {
                *failures.entry(reason.to_string()).or_insert(0) += 1;
            } else if let Some(ns) = line.strip_prefix("last ") {
                last_ns = last_ns.max(ns.parse().unwrap());
            }
        }),
    );
    let backlog_overflows = overflows_before.zip(listen_overflows()).map(|(a, b)| b.saturating_sub(a));
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let peak_rss_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    let pss_kib = rss_kib(pid);
    for d in &mut drivers {
        let _ = writeln!(d.stdin.as_mut().unwrap(), "close");
    }
    for d in &mut drivers {
        drop(d.stdin.take());
        let _ = d.wait();
    }
    let refusals = gateway.as_ref().map_or(Vec::new(), |g| {
        ["wsgate_connections_refused_total", "wsgate_tls_handshake_failures_total", "wsgate_sessions_shed_total"]
            .iter()
            .flat_map(|m| g.metrics(&format!("{m}{{")))
            .chain(g.metrics("wsgate_handshakes_total{").into_iter().filter(|l| !l.contains("status=\"101\"")))
            .collect()
    });
    if let Some(mut c) = relay {
        let _ = c.kill();
        let _ = c.wait();
    }
    latencies_us.sort_unstable();
    let start_ns = released.duration_since(UNIX_EPOCH).unwrap().as_nanos();
    Storm {
        name,
        all_answered: Duration::from_nanos(last_ns.saturating_sub(start_ns) as u64),
        opened: latencies_us.len(),
        latencies_us,
        failures,
        peak_rss_kib,
        pss_kib,
        refusals,
        backlog_overflows,
    }
}

/// The machine's count of connections dropped at a full listen backlog (`TcpExt:
/// ListenOverflows` in `/proc/net/netstat`); `None` where it cannot be read.
fn listen_overflows() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/net/netstat").ok()?;
    let mut lines = text.lines().filter(|l| l.starts_with("TcpExt:"));
    let (names, values) = (lines.next()?, lines.next()?);
    let at = names.split_whitespace().position(|n| n == "ListenOverflows")?;
    values.split_whitespace().nth(at)?.parse().ok()
}

/// The `storm-clients` role: `count` clients, numbered from `offset`, client `i` bound to
/// 127.0.0.(2 + i % sources). Prints "ready", waits for "go" on standard input, connects every
/// client at once, prints "open MICROS" or "fail REASON" per client, "last UNIX_NANOS" (when the
/// last answer came), and "answered"; then holds the sessions until "close" or the end of
/// standard input.
pub(crate) async fn clients(url: String, ca: PathBuf, offset: usize, count: usize, sources: usize) {
    let at = Endpoint::parse(&url).unwrap_or_else(|e| panic!("storm-clients: {e}"));
    let ca_der = {
        use rustls::pki_types::pem::PemObject;
        rustls::pki_types::CertificateDer::from_pem_file(&ca).expect("read the CA certificate")
    };
    let tls = handshake::connector(&ca_der, Handshake::Full);
    let soft = soft_fd_limit();
    assert!(
        soft > count + 64,
        "storm-clients: {count} clients need more than the soft limit of {soft} descriptors (ulimit -n)"
    );
    let mut stdin = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    println!("ready");
    std::io::stdout().flush().unwrap();
    assert_eq!(stdin.next_line().await.unwrap().as_deref(), Some("go"), "storm-clients: expected \"go\"");
    let at = Arc::new(at);
    let mut tasks = Vec::with_capacity(count);
    for i in offset..offset + count {
        let source = Ipv4Addr::new(127, 0, 0, 2 + (i % sources) as u8);
        let (at, tls) = (at.clone(), tls.clone());
        tasks.push(tokio::spawn(async move {
            let t0 = Instant::now();
            let r = tokio::time::timeout(CLIENT_TIMEOUT, open(&at, &tls, source)).await;
            let answered = SystemTime::now();
            let r = r.unwrap_or_else(|_| Err(format!("timeout ({} s)", CLIENT_TIMEOUT.as_secs())));
            (r.map(|io| (io, t0.elapsed())), answered)
        }));
    }
    let mut held = Vec::new();
    let mut out = String::new();
    let mut last = UNIX_EPOCH;
    for task in tasks {
        let (r, answered) = task.await.unwrap();
        last = last.max(answered);
        match r {
            Ok(((io, early), took)) => {
                // A relay may upgrade and then close at once (wsgate does when it sheds the
                // session before dialling, with the route's `on_backend_unavailable = "close"`):
                // each session is watched while held, and one the relay closed is a failure.
                let (r, w) = tokio::io::split(io);
                held.push((w, tokio::spawn(watch(r, early)), took));
            }
            Err(reason) => out += &format!("fail {reason}\n"),
        }
    }
    // Time for a Close that trails the 101 to arrive.
    tokio::time::sleep(SETTLE).await;
    let mut writers = Vec::new();
    for (w, watcher, took) in held {
        if watcher.is_finished() {
            out += &format!("fail upgraded, then {}\n", watcher.await.unwrap());
        } else {
            out += &format!("open {}\n", took.as_micros());
            writers.push(w);
        }
    }
    out += &format!("last {}\nanswered\n", last.duration_since(UNIX_EPOCH).unwrap().as_nanos());
    std::io::stdout().write_all(out.as_bytes()).unwrap();
    std::io::stdout().flush().unwrap();
    while let Ok(Some(line)) = stdin.next_line().await {
        if line == "close" {
            break;
        }
    }
    // A masked Close (1000, no reason), then the end of the stream.
    let close = [0x88, 0x82, 0x37, 0xfa, 0x21, 0x3d, 0x03 ^ 0x37, 0xe8 ^ 0xfa];
    let closing = writers.into_iter().map(|mut w| async move {
        let _ = w.write_all(&close).await;
        let _ = w.shutdown().await;
    });
    let _ = tokio::time::timeout(Duration::from_secs(10), futures_util::future::join_all(closing)).await;
}

/// This process's soft limit on open descriptors (`ulimit -n`).
fn soft_fd_limit() -> usize {
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap_or_default();
    limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3)?.parse().ok())
        .unwrap_or(usize::MAX)
}

/// How long a client waits, after every client has its answer, for Closes that follow a 101.
const SETTLE: Duration = Duration::from_secs(1);

/// Reads a held session until the relay ends it; returns how: its Close's code and reason, or
/// the end of the stream. (The relay sends nothing else while the session is idle; a Ping, at
/// wsgate's 30 s interval, would be skipped.)
async fn watch(mut r: tokio::io::ReadHalf<Box<dyn Io>>, mut got: Vec<u8>) -> String {
    let mut buf = [0u8; 2048];
    loop {
        // Server frames are not masked; a Close's payload is at most 125 bytes (7-bit length).
        while got.len() >= 2 {
            let (opcode, len) = (got[0] & 0x0f, usize::from(got[1] & 0x7f));
            if len > 125 || got.len() < 2 + len {
                break;
            }
            if opcode == 0x8 {
                let payload = &got[2..2 + len];
                let code = if len >= 2 { u16::from_be_bytes([payload[0], payload[1]]).to_string() } else { "-".into() };
                let reason = String::from_utf8_lossy(payload.get(2..).unwrap_or_default());
                return format!("closed {code} \"{reason}\"");
            }
            got.drain(..2 + len);
        }
        match r.read(&mut buf).await {
            Ok(0) => return "closed without a Close".into(),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) => return format!("read: {}", io_reason(&e)),
        }
    }
}

/// One client: TCP from `source`, a full TLS handshake, the upgrade. The error says what the
/// client saw, and at which step. Returns the session and the bytes that followed the 101.
async fn open(
    at: &Endpoint,
    tls: &tokio_rustls::TlsConnector,
    source: Ipv4Addr,
) -> Result<(Box<dyn Io>, Vec<u8>), String> {
    let what = |step: &'static str| move |e: std::io::Error| format!("{step}: {}", io_reason(&e));
    let socket = TcpSocket::new_v4().map_err(what("socket"))?;
    socket.bind(SocketAddr::from((source, 0))).map_err(what("bind"))?;
    let tcp = socket.connect(at.addr).await.map_err(what("tcp connect"))?;
    let _ = tcp.set_nodelay(true);
    let name = ServerName::try_from(at.host.clone()).expect("a TLS server name");
    let mut io: Box<dyn Io> = Box::new(tls.connect(name, tcp).await.map_err(what("tls"))?);
    match try_upgrade(&mut io, at).await {
        Ok(rest) => Ok((io, rest)),
        Err(NotUpgraded::Io(step, e)) => Err(format!("{step}: {}", io_reason(&e))),
        Err(NotUpgraded::Closed) => Err("response: closed before an answer".into()),
        Err(NotUpgraded::Answered(head)) => {
            let status = head.split_whitespace().nth(1).unwrap_or("?").to_string();
            let retry_after = head
                .lines()
                .find_map(|l| l.split_once(':').filter(|(k, _)| k.eq_ignore_ascii_case("retry-after")))
                .map_or("none".to_string(), |(_, v)| v.trim().to_string());
            Err(format!("status {status}, Retry-After {retry_after}"))
        }
    }
}

/// An I/O error as the storm reports it: reset, closed, refused, or its kind.
fn io_reason(e: &std::io::Error) -> String {
    use std::io::ErrorKind::*;
    match e.kind() {
        ConnectionReset => "reset".into(),
        UnexpectedEof => "closed".into(),
        ConnectionRefused => "refused (TCP)".into(),
        TimedOut => "timeout".into(),
        BrokenPipe => "broken pipe".into(),
        AddrNotAvailable => "no address or port available".into(),
        _ => format!("{:?}: {e}", e.kind()),
    }
}
