//! wsgate's load generator: measures, in one run and side by side, direct TCP to an echo
//! backend (the machine's limit), a plain TCP relay built here (what any relay that copies bytes
//! can do), a bare WebSocket→TCP bridge built here from the same libraries (the floor our
//! dependencies allow), wsgate over ws and wss with its default limits and metrics, and peers
//! (websocat, websockify) when they are installed.
//!
//! `cargo bench --bench load` runs everything (about 7 minutes on 2 cores); `-- --quick` is a
//! shorter pass for development. Results: a markdown table on stdout, plus
//! `target/bench/results.md` and `target/bench/chart.svg`. docs/performance.md explains each
//! figure and holds a reference run.
//!
//! Every wall-clock figure is the median of interleaved runs (target A, B, C, A, B, C, ...), so
//! drift in the machine's load hits every target alike, and is shown with the median of its
//! per-run ratios to the bare bridge. Relays under test and the echo backend run in processes of
//! their own; the clients run in this process, except for the idle-memory test, where clients
//! are held by a child process so the 2 descriptors per session stay within limits.
//!
//! The same binary plays helper roles (`bare-bridge`, `tcp-relay`, `backend`, `hold`), started by
//! the orchestrator, and `drive`, which measures one figure against any endpoint.

use std::io::{BufRead, BufReader, Write as _};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use futures_util::{SinkExt, StreamExt};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::{Frame, FrameHeader};

#[derive(Parser)]
#[command(about = "wsgate load generator: side-by-side throughput, latency, memory and handshake figures")]
struct Args {
    #[command(subcommand)]
    role: Option<Role>,
    /// Shorter runs and fewer repetitions, for development.
    #[arg(long)]
    quick: bool,
    /// Interleaved repetitions per figure (median reported); default 5, or 1 with --quick.
    #[arg(long)]
    runs: Option<usize>,
    /// Skip the valgrind (callgrind) instruction counts.
    #[arg(long)]
    no_callgrind: bool,
    /// Only the callgrind instruction counts (no wall-clock or memory figures).
    #[arg(long)]
    callgrind_only: bool,
    /// callgrind windows per figure (median reported); default 3, or 1 with --quick.
    #[arg(long)]
    callgrind_repeats: Option<usize>,
    /// Only these targets (comma-separated names, e.g. "bare-ws,wsgate-ws").
    #[arg(long)]
    only: Option<String>,
    /// Extra `[limits]` lines for the wsgate under test, e.g. "ws_read_buffer_bytes = 4096".
    #[arg(long, default_value = "")]
    wsgate_limits: String,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true, global = true)]
    bench: bool,
}

#[derive(Subcommand)]
enum Role {
    /// A bare bridge: tokio-tungstenite server → TCP, two copy loops, 16 KiB read buffer.
    #[command(hide = true)]
    BareBridge {
        #[arg(long)]
        backend: SocketAddr,
        /// PEM certificate and key: serve wss.
        #[arg(long, num_args = 2)]
        tls: Option<Vec<PathBuf>>,
    },
    /// A plain TCP relay: TCP in, TCP to the backend, two copy loops with 64 KiB buffers.
    #[command(hide = true)]
    TcpRelay {
        #[arg(long)]
        backend: SocketAddr,
    },
    /// Drives load at any endpoint (a deployed wsgate, a peer, a backend) and prints one figure.
    Drive {
        /// `ws://host:port/path`, `wss://host:port/path` or `tcp://host:port`.
        url: String,
        /// What to measure.
        #[arg(long, value_enum, default_value = "echo")]
        mode: Mode,
        /// Concurrent sessions.
        #[arg(long, default_value_t = 1)]
        sessions: usize,
        /// Message size, bytes (TCP: write size).
        #[arg(long, default_value_t = 64 * 1024)]
        size: usize,
        /// Measuring window, seconds (after a warm-up of a fifth of it).
        #[arg(long, default_value_t = 5.0)]
        secs: f64,
        /// PEM CA certificate to trust for wss (the default trusts no one).
        #[arg(long)]
        ca: Option<PathBuf>,
    },
    /// A TCP backend: echo (sends back what it reads), sink (discards), source (sends without end).
    Backend {
        #[arg(value_enum)]
        kind: BackendKind,
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: SocketAddr,
    },
    /// Opens and holds WebSocket sessions until standard input closes.
    #[command(hide = true)]
    Hold {
        #[arg(long)]
        url: String,
        #[arg(long)]
        count: usize,
        /// PEM CA certificate to trust (wss).
        #[arg(long)]
        ca: Option<PathBuf>,
    },
}

#[derive(Clone, Copy, PartialEq, Eq, Debug, clap::ValueEnum)]
enum Mode {
    /// Send messages as fast as they are taken; count the bytes that come back (echo backend).
    Echo,
    /// Send messages as fast as they are taken; count the bytes sent (sink backend).
    Send,
    /// Send nothing; count the bytes received (source backend).
    Receive,
    /// Round trips: send one message, wait for all of it to come back, repeat (echo backend).
    Rtt,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug, clap::ValueEnum)]
enum BackendKind {
    Echo,
    Sink,
    Source,
}

fn main() {
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
    match args.role {
        Some(Role::BareBridge { backend, tls }) => rt.block_on(bare_bridge(backend, tls)),
        Some(Role::TcpRelay { backend }) => rt.block_on(tcp_relay(backend)),
        Some(Role::Hold { url, count, ca }) => rt.block_on(hold(url, count, ca)),
        Some(Role::Drive { url, mode, sessions, size, secs, ca }) => {
            let at = Endpoint::parse(&url).unwrap_or_else(|e| {
                eprintln!("drive: {e}");
                std::process::exit(2)
            });
            rt.block_on(drive(&at, mode, sessions, size, Duration::from_secs_f64(secs), ca.as_deref()))
        }
        Some(Role::Backend { kind, listen }) => rt.block_on(backend(kind, listen)),
        None => rt.block_on(orchestrate(&args)),
    }
}

// ---------------------------------------------------------------------------------------------
// Targets

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Tcp,
    Ws,
    Wss,
}

/// Where clients connect and how: a WebSocket URL, or a TCP address.
#[derive(Clone, Debug)]
struct Endpoint {
    kind: Kind,
    addr: SocketAddr,
    /// The URL's host: the TLS server name and the Host header.
    host: String,
    path: String,
}

impl Endpoint {
    fn local(kind: Kind, addr: SocketAddr, path: &str) -> Endpoint {
        Endpoint { kind, addr, host: "localhost".into(), path: path.into() }
    }

    /// `ws://host:port/path`, `wss://host:port/path` or `tcp://host:port`.
    fn parse(url: &str) -> Result<Endpoint, String> {
        use std::net::ToSocketAddrs;
        let (scheme, rest) =
            url.split_once("://").ok_or_else(|| format!("{url}: no scheme (ws://, wss://, tcp://)"))?;
        let kind = match scheme {
            "ws" => Kind::Ws,
            "wss" => Kind::Wss,
            "tcp" => Kind::Tcp,
            other => return Err(format!("{url}: scheme {other:?} is not ws, wss or tcp")),
        };
        let (authority, path) = rest.split_once('/').map_or((rest, "/".to_string()), |(a, p)| (a, format!("/{p}")));
        let default_port = if kind == Kind::Wss { 443 } else { 80 };
        let with_port = if authority.rsplit_once(':').is_some_and(|(_, p)| p.parse::<u16>().is_ok()) {
            authority.to_string()
        } else {
            format!("{authority}:{default_port}")
        };
        let addr = with_port
            .to_socket_addrs()
            .map_err(|e| format!("{url}: {e}"))?
            .next()
            .ok_or_else(|| format!("{url}: no address"))?;
        let host = with_port.rsplit_once(':').map_or(authority, |(h, _)| h).trim_matches(['[', ']']).to_string();
        Ok(Endpoint { kind, addr, host, path })
    }

    fn url(&self) -> String {
        let scheme = match self.kind {
            Kind::Tcp => "tcp",
            Kind::Ws => "ws",
            Kind::Wss => "wss",
        };
        format!("{scheme}://{}:{}{}", self.host, self.addr.port(), self.path)
    }
}

/// One thing under test: an endpoint and the process relaying its traffic.
struct Target {
    name: &'static str,
    at: Endpoint,
    /// The process relaying the traffic (none for direct TCP).
    process: Option<Child>,
    /// Peers are held to 1,000 idle sessions.
    max_idle: usize,
}

impl Target {
    fn pid(&self) -> Option<u32> {
        self.process.as_ref().map(Child::id)
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        if let Some(p) = &mut self.process {
            let _ = p.kill();
            let _ = p.wait();
        }
    }
}

/// Starts a child and waits for a line on stderr (or stdout) that yields its address.
fn spawn_and_find(
    mut cmd: Command,
    find: impl Fn(&str) -> Option<SocketAddr>,
    from_stdout: bool,
) -> (Child, SocketAddr) {
    cmd.stdin(Stdio::piped());
    if from_stdout {
        cmd.stdout(Stdio::piped()).stderr(Stdio::null());
    } else {
        cmd.stdout(Stdio::null()).stderr(Stdio::piped());
    }
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("start {cmd:?}: {e}"));
    let out: Box<dyn std::io::Read + Send> =
        if from_stdout { Box::new(child.stdout.take().unwrap()) } else { Box::new(child.stderr.take().unwrap()) };
    let mut lines = BufReader::new(out).lines();
    let addr = loop {
        let line = lines.next().unwrap_or_else(|| panic!("{cmd:?} exited before telling its address")).unwrap();
        if let Some(a) = find(&line) {
            break a;
        }
    };
    // Keep draining so the child never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    (child, addr)
}

/// A port nothing listens on right now, for peers that cannot report the port they bound.
/// (A race in principle; on an idle loopback, never seen in practice.)
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn wait_listening(addr: SocketAddr) {
    let until = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(Instant::now() < until, "nothing listening on {addr}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

struct Setup {
    dir: tempfile::TempDir,
    echo: SocketAddr,
    cert: PathBuf,
    key: PathBuf,
    ca_der: rustls::pki_types::CertificateDer<'static>,
}

fn setup_certs(dir: &Path) -> (PathBuf, PathBuf, rustls::pki_types::CertificateDer<'static>) {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert, ck.cert.pem()).unwrap();
    std::fs::write(&key, ck.signing_key.serialize_pem()).unwrap();
    (cert, key, ck.cert.der().clone())
}

fn start_targets(setup: &Setup, only: &Option<String>, limits: &str) -> Vec<Target> {
    let want = |name: &str| only.as_ref().is_none_or(|o| o.split(',').any(|n| n == name));
    let me = std::env::current_exe().unwrap();
    let mut targets = Vec::new();
    if want("tcp") {
        targets.push(Target {
            name: "tcp",
            at: Endpoint::local(Kind::Tcp, setup.echo, ""),
            process: None,
            max_idle: 8000,
        });
    }
    if want("tcp-relay") {
        let mut cmd = Command::new(&me);
        cmd.args(["tcp-relay", "--backend", &setup.echo.to_string()]);
        let (child, addr) = spawn_and_find(cmd, |l| l.strip_prefix("listening ")?.parse().ok(), true);
        targets.push(Target {
            name: "tcp-relay",
            at: Endpoint::local(Kind::Tcp, addr, ""),
            process: Some(child),
            max_idle: 0,
        });
    }
    for (name, kind) in [("bare-ws", Kind::Ws), ("bare-wss", Kind::Wss)] {
        if !want(name) {
            continue;
        }
        let mut cmd = Command::new(&me);
        cmd.args(["bare-bridge", "--backend", &setup.echo.to_string()]);
        if kind == Kind::Wss {
            cmd.arg("--tls").arg(&setup.cert).arg(&setup.key);
        }
        let (child, addr) = spawn_and_find(cmd, |l| l.strip_prefix("listening ")?.parse().ok(), true);
        targets.push(Target { name, at: Endpoint::local(kind, addr, "/"), process: Some(child), max_idle: 8000 });
    }
    if want("wsgate-ws") || want("wsgate-wss") {
        let config = setup.dir.path().join("wsgate.toml");
        std::fs::write(
            &config,
            format!(
                "[listeners.plain]\naddress = \"127.0.0.1:0\"\n[listeners.secure]\naddress = \"127.0.0.1:0\"\n\
                 tls = {{ cert = {:?}, key = {:?} }}\n[routes.bench]\npath = \"/bench\"\nbackend = \"{}\"\n\
                 [admin]\naddress = \"127.0.0.1:0\"\n[shutdown]\ndrain_delay_secs = 0\nclose_window_secs = 0\n\
                 [limits]\n{}\n",
                setup.cert,
                setup.key,
                setup.echo,
                limits.replace(';', "\n")
            ),
        )
        .unwrap();
        for (name, kind, listener) in [("wsgate-ws", Kind::Ws, "plain"), ("wsgate-wss", Kind::Wss, "secure")] {
            if !want(name) {
                continue;
            }
            // One gateway process per target, so memory and CPU figures are its own.
            let mut cmd = Command::new(env!("CARGO_BIN_EXE_wsgate"));
            cmd.args(["run", "--config"]).arg(&config).env("RUST_LOG", "warn,wsgate=info");
            let tag = format!("listener={listener} url=");
            let (child, addr) = spawn_and_find(
                cmd,
                |l| l.split(&tag).nth(1)?.split_whitespace().next()?.split("://").nth(1)?.parse().ok(),
                false,
            );
            targets.push(Target {
                name,
                at: Endpoint::local(kind, addr, "/bench"),
                process: Some(child),
                max_idle: 8000,
            });
        }
    }
    // Peers cannot report the port they bound: give them a free one and wait for it.
    type PeerArgs = fn(u16, SocketAddr) -> Vec<String>;
    let peers: [(&'static str, PeerArgs); 2] = [
        ("websocat", |port, echo| {
            vec!["--binary".into(), "-E".into(), format!("ws-l:127.0.0.1:{port}"), format!("tcp:{echo}")]
        }),
        ("websockify", |port, echo| vec![format!("127.0.0.1:{port}"), echo.to_string()]),
    ];
    for (name, args) in peers {
        if !want(name) || !which(name) {
            continue;
        }
        let port = free_port();
        let mut cmd = Command::new(name);
        cmd.args(args(port, setup.echo)).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
        let child = cmd.spawn().unwrap();
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        wait_listening(addr);
        targets.push(Target { name, at: Endpoint::local(Kind::Ws, addr, "/"), process: Some(child), max_idle: 1000 });
    }
    targets
}

fn which(program: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {program}"))
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

// ---------------------------------------------------------------------------------------------
// Connections

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}
type Ws = tokio_tungstenite::WebSocketStream<Box<dyn Io>>;

fn client_tls(ca: &rustls::pki_types::CertificateDer<'static>) -> tokio_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.clone()).unwrap();
    let cfg = rustls::ClientConfig::builder_with_provider(wsgate::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
}

/// A TLS client trusting the PEM CA certificate at `ca`, or (without one) a throwaway
/// certificate, which is enough for ws:// and tcp:// endpoints.
fn client_tls_from(ca: Option<&Path>) -> tokio_rustls::TlsConnector {
    use rustls::pki_types::pem::PemObject;
    let ca = match ca {
        Some(p) => rustls::pki_types::CertificateDer::from_pem_file(p)
            .unwrap_or_else(|e| panic!("read the CA certificate {}: {e}", p.display())),
        None => rcgen::generate_simple_self_signed(vec!["x".into()]).unwrap().cert.der().clone(),
    };
    client_tls(&ca)
}

fn client_ws_config() -> WebSocketConfig {
    WebSocketConfig::default().max_message_size(Some(64 << 20)).max_frame_size(Some(64 << 20))
}

/// The TCP connection to `t`, with TLS on top for wss.
async fn open(t: &Endpoint, tls: &tokio_rustls::TlsConnector) -> Box<dyn Io> {
    let tcp = TcpStream::connect(t.addr).await.expect("connect");
    let _ = tcp.set_nodelay(true);
    match t.kind {
        Kind::Wss => {
            let name = ServerName::try_from(t.host.clone()).expect("a TLS server name");
            Box::new(tls.connect(name, tcp).await.expect("tls"))
        }
        _ => Box::new(tcp),
    }
}

/// A general-purpose WebSocket client (tokio-tungstenite), for holding sessions and counting
/// handshakes, where the client's cost per byte does not matter.
async fn ws_connect(t: &Endpoint, tls: &tokio_rustls::TlsConnector) -> Ws {
    let io = open(t, tls).await;
    let (ws, _) =
        tokio_tungstenite::client_async_with_config(t.url(), io, Some(client_ws_config())).await.expect("ws handshake");
    ws
}

/// A session as the throughput and latency figures drive it: a byte stream, plus, for
/// WebSocket, a reader that finds the payload in the frames the server sends.
///
/// Not tokio-tungstenite. A general client masks every byte it sends with a fresh key and builds
/// a message from every frame it reads; on 2 shared cores that cost more CPU than the relays
/// under test and capped them all alike (direct TCP measured only 1.6× the bare bridge; with
/// this client, about 2.7×). This client masks a message once and sends the same frame
/// every time, and counts payload bytes as they arrive without copying them anywhere, so the
/// relay's work dominates. Servers see ordinary masked binary frames; RFC 6455 asks for a fresh
/// mask per frame to protect intermediaries from bytes a page chose, which a load generator has
/// no need of.
struct Conn {
    io: Box<dyn Io>,
    reader: Payload,
    /// Payload bytes that arrived together with the handshake response.
    early: usize,
}

impl Conn {
    async fn open(t: &Endpoint, tls: &tokio_rustls::TlsConnector) -> Conn {
        let mut io = open(t, tls).await;
        let mut reader = Payload { is_ws: t.kind != Kind::Tcp, ..Payload::default() };
        let early = if reader.is_ws { reader.count(&upgrade(&mut io, t).await) } else { 0 };
        Conn { io, reader, early }
    }

    /// The bytes that carry one message of `payload`: itself over TCP, one masked binary frame
    /// over WebSocket.
    fn wire(&self, payload: &[u8]) -> Vec<u8> {
        if !self.reader.is_ws {
            return payload.to_vec();
        }
        let mut frame = Frame::message(bytes::Bytes::copy_from_slice(payload), OpCode::Data(Data::Binary), true);
        frame.header_mut().mask = Some([0x37, 0xfa, 0x21, 0x3d]);
        let mut wire = Vec::with_capacity(frame.len());
        frame.format(&mut wire).expect("formatting into a Vec cannot fail");
        wire
    }

    /// Sends `wire`, one message of `size` payload bytes, and waits until `size` payload bytes
    /// have come back.
    async fn round_trip(&mut self, wire: &[u8], size: usize, buf: &mut [u8]) {
        self.io.write_all(wire).await.expect("send a message");
        let mut got = 0;
        while got < size {
            let n = self.io.read(buf).await.expect("read the echo");
            assert!(n > 0, "the target closed the session");
            got += self.reader.count(&buf[..n]);
        }
    }
}

/// Sends the HTTP upgrade request and reads the response; returns the bytes that followed it.
async fn upgrade(io: &mut Box<dyn Io>, t: &Endpoint) -> Vec<u8> {
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: {}:{}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        t.path,
        t.host,
        t.addr.port()
    );
    io.write_all(request.as_bytes()).await.expect("send the upgrade request");
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = io.read(&mut buf).await.expect("read the upgrade response");
        assert!(n > 0, "{}: connection closed during the handshake", t.url());
        got.extend_from_slice(&buf[..n]);
        if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&got[..end]).into_owned();
            assert!(
                head.starts_with("HTTP/1.1 101"),
                "{}: not upgraded: {}",
                t.url(),
                head.lines().next().unwrap_or("")
            );
            return got.split_off(end + 4);
        }
    }
}

/// Counts the payload bytes in a server's byte stream: all of them over TCP; over WebSocket,
/// those of data frames, skipping frame headers and control frames.
#[derive(Default)]
struct Payload {
    is_ws: bool,
    /// The frame header read so far (at most 14 bytes: 2, 8 of length, 4 of mask).
    header: [u8; 14],
    have: usize,
    /// Payload bytes of the current frame still to come.
    remaining: u64,
    /// Whether the current frame carries data (continuation, text, binary).
    is_data: bool,
}

impl Payload {
    /// The payload bytes in `data`, the next bytes read from the server.
    fn count(&mut self, mut data: &[u8]) -> usize {
        if !self.is_ws {
            return data.len();
        }
        let mut n = 0;
        while !data.is_empty() {
            if self.remaining > 0 {
                let take = self.remaining.min(data.len() as u64) as usize;
                if self.is_data {
                    n += take;
                }
                self.remaining -= take as u64;
                data = &data[take..];
                continue;
            }
            self.header[self.have] = data[0];
            self.have += 1;
            data = &data[1..];
            let parsed = FrameHeader::parse(&mut std::io::Cursor::new(&self.header[..self.have]));
            if let Some((header, len)) = parsed.expect("the server sent a malformed frame header") {
                (self.have, self.remaining, self.is_data) = (0, len, matches!(header.opcode, OpCode::Data(_)));
            }
        }
        n
    }
}

// ---------------------------------------------------------------------------------------------
// Measurements

/// Payload bytes per second over `duration`, with `sessions` sessions each sending `size`-byte
/// messages as fast as the target takes them: the bytes that came back (`Echo`), that were sent
/// (`Send`), or, sending nothing, that arrived (`Receive`).
async fn throughput(
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

async fn wait_stop(stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
}

/// Round-trip times of `size`-byte messages: each of `sessions` sessions sends one, waits for the
/// whole echo, and repeats, for `duration`.
async fn latency(
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

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Completed wss (or ws) handshakes per second with 8 concurrent clients.
async fn handshakes(t: &Endpoint, tls: &tokio_rustls::TlsConnector, duration: Duration) -> f64 {
    let done = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + duration;
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (done, tls, t) = (done.clone(), tls.clone(), t.clone());
        tasks.push(tokio::spawn(async move {
            while Instant::now() < deadline {
                let mut ws = ws_connect(&t, &tls).await;
                let _ = ws.close(None).await;
                done.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    done.load(Ordering::Relaxed) as f64 / duration.as_secs_f64()
}

/// Proportional set size of a process and all its descendants, KiB: PSS splits pages shared
/// between processes (websockify forks one per connection), so the sum is not inflated.
fn rss_kib(pid: u32) -> u64 {
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
fn descendants(pid: u32) -> Vec<u32> {
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
fn cpu_secs(pid: u32) -> f64 {
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
fn idle_memory(t: &Target, ca_pem: &Path, low: usize, high: usize) -> Option<f64> {
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

/// Instructions per relayed byte, from callgrind: all of them, and those outside glibc's
/// `memcpy`/`memmove`/`memset`. Those functions copy and fill large buffers with `rep movsb` and
/// `rep stosb`, which callgrind counts as one instruction per byte moved: a zero-filled read
/// buffer then weighs by its size, not by its cost (the bare bridge's 16 KiB zero-fill before each
/// read is 70 % of its count at 64 B and a fraction of a percent of its CPU time in `perf`).
#[derive(Clone, Copy, Debug)]
struct Instructions {
    all: f64,
    outside_mem: f64,
}

/// Instructions per relayed byte, from callgrind: the relay runs under callgrind, one session
/// warms up, the counters are zeroed (`callgrind_control -z`), `messages` messages of `size`
/// bytes go through in lockstep, and the counters are dumped (`callgrind_control -d`). Counting
/// only that window leaves out start-up and shutdown, whose counts move with wall-clock time
/// (quanta calibrating its clock for metrics-exporter-prometheus runs for a set time, not a set
/// number of instructions), so repeated runs agree within about 0.1 %.
fn instructions_per_byte(
    name: &str,
    setup: &Setup,
    (size, messages): (usize, usize),
    repeats: usize,
    metrics: bool,
) -> Option<Instructions> {
    if !which("valgrind") || !which("callgrind_control") {
        return None;
    }
    let run = || -> Option<Instructions> {
        let out = setup.dir.path().join(format!("callgrind.{name}.{size}.{metrics}"));
        let me = std::env::current_exe().unwrap();
        let mut cmd = Command::new("valgrind");
        cmd.arg("--tool=callgrind").arg(format!("--callgrind-out-file={}", out.display()));
        let tag;
        let from_stdout;
        if name == "wsgate-ws" {
            let config = setup.dir.path().join("callgrind.toml");
            std::fs::write(
                &config,
                format!(
                    "[listeners.plain]\naddress = \"127.0.0.1:0\"\n[routes.bench]\npath = \"/bench\"\nbackend = \"{}\"\n\
                     [admin]\naddress = \"127.0.0.1:0\"\n[shutdown]\ndrain_delay_secs = 0\nclose_window_secs = 0\n\
                     [metrics]\nenabled = {metrics}\n",
                    setup.echo
                ),
            )
            .ok()?;
            cmd.arg(env!("CARGO_BIN_EXE_wsgate"))
                .args(["run", "--config"])
                .arg(&config)
                .env("RUST_LOG", "warn,wsgate=info");
            tag = "listener=plain url=ws://";
            from_stdout = false;
        } else {
            cmd.arg(&me).args(["bare-bridge", "--backend", &setup.echo.to_string()]);
            tag = "listening ";
            from_stdout = true;
        }
        let (mut child, addr) =
            spawn_and_find(cmd, |l| l.split(tag).nth(1)?.split_whitespace().next()?.parse().ok(), from_stdout);
        let pid = child.id().to_string();
        let control = |what: &str| {
            let ok = Command::new("callgrind_control").args([what, &pid]).stdout(Stdio::null()).status();
            assert!(ok.is_ok_and(|s| s.success()), "callgrind_control {what} {pid} failed");
        };
        let path = if name == "wsgate-ws" { "/bench" } else { "/" };
        let target = Endpoint::local(Kind::Ws, addr, path);
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let tls = client_tls(&setup.ca_der);
            let mut conn = Conn::open(&target, &tls).await;
            let wire = conn.wire(&vec![1u8; size]);
            let mut buf = vec![0u8; 256 * 1024];
            // Lockstep (one message out, its echo back, then the next) so each message meets
            // the same sequence of reads and wake-ups, and the count repeats from run to run.
            let mut round_trips = async |n: usize| {
                for _ in 0..n {
                    conn.round_trip(&wire, size, &mut buf).await;
                }
            };
            round_trips(16).await;
            control("-z");
            round_trips(messages).await;
            control("-d");
        });
        let _ = Command::new("kill").args(["-KILL", &pid]).status();
        let _ = child.wait();
        // The dump of the window is the first numbered one.
        let text = std::fs::read_to_string(format!("{}.1", out.display())).ok()?;
        let total: f64 =
            text.lines().find_map(|l| l.strip_prefix("totals: "))?.split_whitespace().next()?.parse().ok()?;
        // Each byte crosses the relay twice (to the backend and back).
        let per_byte = |n: f64| n / (2.0 * (size * messages) as f64);
        let mem = mem_function_instructions(&text);
        if mem == 0 {
            // A libc without symbols shows its memcpy/memset as addresses: nothing is subtracted.
            eprintln!("\ncallgrind: no memcpy/memset symbols in the dump; the count outside them is the total");
        }
        Some(Instructions { all: per_byte(total), outside_mem: per_byte(total - mem as f64) })
    };
    let counts: Vec<Instructions> = (0..repeats).map(|_| run()).collect::<Option<_>>()?;
    let all: Vec<f64> = counts.iter().map(|c| c.all).collect();
    let outside: Vec<f64> = counts.iter().map(|c| c.outside_mem).collect();
    Some(Instructions { all: median(&all), outside_mem: median(&outside) })
}

/// The instructions a callgrind dump counts in glibc's `memcpy`, `memmove` and `memset` (their
/// own, not their callers'). The format: `fn=` starts a function's lines (`fn=(id) name` the
/// first time a name appears, here or in `cfn=`, then `fn=(id)`); a line of numbers is a
/// position and its cost, except the line after `calls=`, which is the call's inclusive cost.
fn mem_function_instructions(dump: &str) -> u64 {
    let mut names = std::collections::HashMap::new();
    let mut name_of = |spec: &str| -> String {
        match spec.strip_prefix('(').and_then(|s| s.split_once(')')) {
            Some((id, rest)) if !rest.trim().is_empty() => {
                names.insert(id.to_string(), rest.trim().to_string());
                rest.trim().to_string()
            }
            Some((id, _)) => names.get(id).cloned().unwrap_or_default(),
            None => spec.trim().to_string(),
        }
    };
    let (mut in_mem, mut call_cost_next, mut total) = (false, false, 0u64);
    for line in dump.lines() {
        if let Some(spec) = line.strip_prefix("fn=") {
            let name = name_of(spec);
            in_mem = ["__memcpy", "__memmove", "__memset", "__mempcpy"].iter().any(|p| name.starts_with(p));
        } else if let Some(spec) = line.strip_prefix("cfn=") {
            name_of(spec);
        } else if line.starts_with("calls=") {
            call_cost_next = true;
        } else if line.starts_with(|c: char| c.is_ascii_digit() || matches!(c, '+' | '-' | '*')) {
            if std::mem::take(&mut call_cost_next) {
                continue;
            }
            if in_mem {
                total += line.split_whitespace().nth(1).and_then(|c| c.parse::<u64>().ok()).unwrap_or(0);
            }
        }
    }
    total
}

// ---------------------------------------------------------------------------------------------
// Helper roles

async fn bare_bridge(backend: SocketAddr, tls: Option<Vec<PathBuf>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    println!("listening {}", listener.local_addr().unwrap());
    std::io::stdout().flush().unwrap();
    let acceptor = tls.map(|files| {
        use rustls::pki_types::pem::PemObject;
        let chain = rustls::pki_types::CertificateDer::pem_file_iter(&files[0])
            .unwrap()
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = rustls::pki_types::PrivateKeyDer::from_pem_file(&files[1]).unwrap();
        let mut cfg = rustls::ServerConfig::builder_with_provider(wsgate::tls::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .unwrap();
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        tokio_rustls::TlsAcceptor::from(Arc::new(cfg))
    });
    exit_when_stdin_closes();
    loop {
        let Ok((tcp, _)) = listener.accept().await else { continue };
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let _ = tcp.set_nodelay(true);
            let io: Box<dyn Io> = match acceptor {
                Some(a) => match a.accept(tcp).await {
                    Ok(s) => Box::new(s),
                    Err(_) => return,
                },
                None => Box::new(tcp),
            };
            let cfg = WebSocketConfig::default().read_buffer_size(16 * 1024).write_buffer_size(0);
            let Ok(ws) = tokio_tungstenite::accept_async_with_config(io, Some(cfg)).await else { return };
            let Ok(backend) = TcpStream::connect(backend).await else { return };
            let _ = backend.set_nodelay(true);
            let (mut br, mut bw) = backend.into_split();
            let (mut tx, mut rx) = ws.split();
            let up = async {
                while let Some(Ok(m)) = rx.next().await {
                    if m.is_binary() || m.is_text() {
                        if bw.write_all(&m.into_data()).await.is_err() {
                            break;
                        }
                    } else if m.is_close() {
                        break;
                    }
                }
            };
            let down = async {
                let mut buf = bytes::BytesMut::with_capacity(16 * 1024);
                loop {
                    buf.reserve(16 * 1024);
                    match br.read_buf(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(_) => {
                            if tx.send(Message::Binary(buf.split().freeze())).await.is_err() {
                                break;
                            }
                        }
                    }
                }
            };
            tokio::select! { _ = up => {}, _ = down => {} }
        });
    }
}

/// What any relay that moves bytes through user space can do on this machine: each byte is
/// received and sent once more per direction than on the direct path, with no WebSocket work at
/// all. A WebSocket relay can at best match it.
async fn tcp_relay(backend: SocketAddr) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    println!("listening {}", listener.local_addr().unwrap());
    std::io::stdout().flush().unwrap();
    exit_when_stdin_closes();
    loop {
        let Ok((mut client, _)) = listener.accept().await else { continue };
        tokio::spawn(async move {
            let Ok(mut server) = TcpStream::connect(backend).await else { return };
            let _ = (client.set_nodelay(true), server.set_nodelay(true));
            let _ = tokio::io::copy_bidirectional_with_sizes(&mut client, &mut server, 64 * 1024, 64 * 1024).await;
        });
    }
}

/// Helper roles end when the orchestrator goes away (it holds their standard input).
fn exit_when_stdin_closes() {
    tokio::task::spawn_blocking(|| {
        let _ = std::io::copy(&mut std::io::stdin(), &mut std::io::sink());
        std::process::exit(0);
    });
}

async fn hold(url: String, count: usize, ca: Option<PathBuf>) {
    let t = Endpoint::parse(&url).unwrap_or_else(|e| panic!("hold: {e}"));
    let tls = client_tls_from(ca.as_deref());
    let mut held = Vec::with_capacity(count);
    for _ in 0..count {
        held.push(ws_connect(&t, &tls).await);
    }
    println!("held {count}");
    std::io::stdout().flush().unwrap();
    let _ = tokio::task::spawn_blocking(|| std::io::copy(&mut std::io::stdin(), &mut std::io::sink())).await;
    drop(held);
}

// ---------------------------------------------------------------------------------------------
// The run

#[derive(Default, Clone)]
struct Row {
    name: &'static str,
    mbps_1x64k: Vec<f64>,
    mbps_50x4k: Vec<f64>,
    rtt1: Vec<[f64; 3]>,
    rtt50: Vec<[f64; 3]>,
    handshakes: Vec<f64>,
    cpu_per_gib: Vec<f64>,
    idle_kib: Option<f64>,
    instr_per_byte: Option<f64>,
}

fn median(v: &[f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    s[s.len() / 2]
}

fn median3(v: &[[f64; 3]]) -> [f64; 3] {
    let col = |i: usize| median(&v.iter().map(|r| r[i]).collect::<Vec<_>>());
    [col(0), col(1), col(2)]
}

async fn orchestrate(args: &Args) {
    let quick = args.quick;
    let runs = args.runs.unwrap_or(if quick { 1 } else { 5 });
    let secs = if quick { 0.5 } else { 1.0 };
    let dur = Duration::from_secs_f64(secs);
    // Tail latencies need more samples than throughput does: p99.9 of 1 s at one session is a
    // handful of round trips.
    let rtt_dur = dur * 2;
    let dir = tempfile::tempdir().unwrap();
    let (cert, key, ca_der) = setup_certs(dir.path());
    // The echo backend runs in a process of its own, like the relays, so that the relay's
    // descriptors, memory and CPU figures are its own and this process holds only clients.
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args(["backend", "echo"]);
    let (echo_process, echo) = spawn_and_find(cmd, |l| l.strip_prefix("listening ")?.parse().ok(), true);
    let _echo =
        Target { name: "echo", at: Endpoint::local(Kind::Tcp, echo, ""), process: Some(echo_process), max_idle: 0 };
    let setup = Setup { dir, echo, cert, key, ca_der };
    let tls = client_tls(&setup.ca_der);
    let mut targets = start_targets(&setup, &args.only, &args.wsgate_limits);
    eprintln!(
        "targets: {} ({} interleaved runs of {secs} s per figure)",
        targets.iter().map(|t| t.name).collect::<Vec<_>>().join(", "),
        runs
    );
    let mut rows: Vec<Row> = targets.iter().map(|t| Row { name: t.name, ..Row::default() }).collect();

    for run in 0..if args.callgrind_only { 0 } else { runs } {
        for (t, row) in targets.iter().zip(rows.iter_mut()) {
            eprint!("\rrun {}/{runs}: {:<11} throughput      ", run + 1, t.name);
            let cpu0 = t.pid().map(cpu_secs);
            let bps = throughput(&t.at, &tls, Mode::Echo, 1, 64 * 1024, dur).await;
            if let (Some(c0), Some(pid)) = (cpu0, t.pid()) {
                // Bytes relayed: the echoed bytes crossed the relay twice.
                let relayed = bps * (dur.as_secs_f64() * 1.2) * 2.0;
                row.cpu_per_gib.push((cpu_secs(pid) - c0) / (relayed / (1u64 << 30) as f64));
            }
            row.mbps_1x64k.push(bps / 1e6);
            row.mbps_50x4k.push(throughput(&t.at, &tls, Mode::Echo, 50, 4096, dur).await / 1e6);
            eprint!("\rrun {}/{runs}: {:<11} latency         ", run + 1, t.name);
            let one = latency(&t.at, &tls, 1, 64, rtt_dur).await;
            let fifty = latency(&t.at, &tls, 50, 64, rtt_dur).await;
            let us = |s: &[Duration]| [0.5, 0.99, 0.999].map(|p| percentile(s, p).as_secs_f64() * 1e6);
            row.rtt1.push(us(&one));
            row.rtt50.push(us(&fifty));
            if t.at.kind == Kind::Wss {
                eprint!("\rrun {}/{runs}: {:<11} handshakes      ", run + 1, t.name);
                row.handshakes.push(handshakes(&t.at, &tls, dur).await);
            }
        }
    }
    // The round-trip target (p99 at 50 sessions against the bare bridge) is the noisiest figure
    // on 2 shared cores: one run's p99 moves by ±20 %. It gets paired windows of its own, the two
    // relays alternating (and swapping who goes first), and the median and quartiles of the
    // per-pair ratios are reported.
    let mut rtt_pairs = Vec::new();
    let pair = ["bare-ws", "wsgate-ws"].map(|n| targets.iter().find(|t| t.name == n));
    if let ([Some(bare), Some(gate)], false) = (pair, args.callgrind_only) {
        let rounds = if quick { 3 } else { 15 };
        for round in 0..rounds {
            eprint!("\rround trips, paired: {}/{rounds}            ", round + 1);
            let p99 = |t: &Target| {
                let at = t.at.clone();
                let tls = tls.clone();
                async move { percentile(&latency(&at, &tls, 50, 64, rtt_dur).await, 0.99).as_secs_f64() }
            };
            let (b, g) = if round % 2 == 0 {
                let b = p99(bare).await;
                (b, p99(gate).await)
            } else {
                let g = p99(gate).await;
                (p99(bare).await, g)
            };
            rtt_pairs.push(g / b);
        }
    }
    let ca_pem = setup.dir.path().join("ca.pem");
    std::fs::write(&ca_pem, std::fs::read(&setup.cert).unwrap()).unwrap();
    for (t, row) in targets.iter_mut().zip(rows.iter_mut()) {
        if t.at.kind == Kind::Tcp || args.callgrind_only {
            continue;
        }
        let (low, high) = if quick { (100, 1000.min(t.max_idle)) } else { (t.max_idle / 8, t.max_idle) };
        eprint!("\ridle memory: {:<11} {low} → {high} sessions      ", t.name);
        row.idle_kib = tokio::task::block_in_place(|| idle_memory(t, &ca_pem, low, high));
    }
    // Metrics on vs. off, per relayed byte: with 64 KiB messages (the table's figure) and with
    // 64-byte ones, where the per-message cost of recording is largest relative to the bytes.
    let mut metrics_cost = Vec::new();
    let mut small_vs_bare = None;
    let mut large_counts = Vec::new();
    if !args.no_callgrind {
        let scale = if quick { 4 } else { 1 };
        let (large, small) = ((64 * 1024, 256 / scale), (64, 4096 / scale));
        let repeats = args.callgrind_repeats.unwrap_or(if quick { 1 } else { 3 });
        let count = |name: &str, window: (usize, usize), metrics: bool| {
            eprint!("\rcallgrind: {name:<11} {} B, metrics {}      ", window.0, if metrics { "on" } else { "off" });
            tokio::task::block_in_place(|| instructions_per_byte(name, &setup, window, repeats, metrics))
        };
        for row in rows.iter_mut().filter(|r| r.name == "bare-ws" || r.name == "wsgate-ws") {
            let counted = count(row.name, large, true);
            row.instr_per_byte = counted.map(|c| c.all);
            large_counts.push((row.name, counted));
        }
        if let Some(on) = large_counts.iter().find(|r| r.0 == "wsgate-ws").and_then(|r| r.1) {
            let small_on = count("wsgate-ws", small, true);
            for (window, on) in [(large, Some(on)), (small, small_on)] {
                if let (Some(on), Some(off)) = (on, count("wsgate-ws", window, false)) {
                    metrics_cost.push((window.0, on.all, off.all));
                }
            }
            // The round-trip target is about small messages: the instruction count to set
            // beside its wall-clock figure.
            if rows.iter().any(|r| r.name == "bare-ws") {
                small_vs_bare = small_on.zip(count("bare-ws", small, true));
            }
        }
    }
    eprintln!("\rdone.                                                     ");
    drop(targets);
    let mut table = render_table(&rows, runs);
    if !rtt_pairs.is_empty() {
        rtt_pairs.sort_by(f64::total_cmp);
        let q = |p: f64| rtt_pairs[((rtt_pairs.len() - 1) as f64 * p).round() as usize];
        table += &format!(
            "\nwsgate-ws vs. bare-ws, RTT p99 at 50 sessions × 64 B, {} paired {}-s windows: median ratio {:.2}× (quartiles {:.2}-{:.2}×)\n",
            rtt_pairs.len(),
            rtt_dur.as_secs_f64(),
            q(0.5),
            q(0.25),
            q(0.75)
        );
    }
    for (size, on, off) in metrics_cost {
        table += &format!(
            "\nwsgate-ws metrics on vs. off (callgrind, {size} B messages): {on:.4} vs. {off:.4} instructions per relayed byte ({:+.2} %)\n",
            (on / off - 1.0) * 100.0
        );
    }
    let large_of = |name: &str| large_counts.iter().find(|c| c.0 == name).and_then(|c| c.1);
    let large_pair = large_of("wsgate-ws").zip(large_of("bare-ws"));
    for (size, pair) in [("64 KiB", large_pair), ("64 B", small_vs_bare)] {
        if let Some((gate, bare)) = pair {
            table += &format!(
                "\nwsgate-ws vs. bare-ws (callgrind, {size} messages), instructions per relayed byte: {:.2} vs. {:.2} ({:.2}×); outside memcpy/memset: {:.2} vs. {:.2} ({:.2}×)\n",
                gate.all,
                bare.all,
                gate.all / bare.all,
                gate.outside_mem,
                bare.outside_mem,
                gate.outside_mem / bare.outside_mem
            );
        }
    }
    println!("{table}");
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("results.md"), &table).unwrap();
    std::fs::write(out.join("chart.svg"), render_chart(&rows)).unwrap();
    eprintln!("wrote {}/results.md and chart.svg", out.display());
}

/// A TCP backend in a process of its own, until standard input closes.
async fn backend(kind: BackendKind, listen: SocketAddr) {
    let listener = TcpListener::bind(listen).await.unwrap_or_else(|e| panic!("backend: bind {listen}: {e}"));
    println!("listening {}", listener.local_addr().unwrap());
    std::io::stdout().flush().unwrap();
    exit_when_stdin_closes();
    loop {
        let Ok((mut s, _)) = listener.accept().await else { continue };
        let _ = s.set_nodelay(true);
        tokio::spawn(async move {
            let (mut r, mut w) = s.split();
            match kind {
                // A 256 KiB buffer rather than tokio::io::copy's 8 KiB: with 8 KiB reads the
                // echo backend took more CPU than the relay under test.
                BackendKind::Echo => {
                    let mut buf = vec![0u8; 256 * 1024];
                    while let Ok(n @ 1..) = r.read(&mut buf).await {
                        if w.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                }
                BackendKind::Sink => {
                    let mut buf = vec![0u8; 256 * 1024];
                    while let Ok(1..) = r.read(&mut buf).await {}
                }
                BackendKind::Source => {
                    let chunk = vec![0xa5_u8; 64 * 1024];
                    while w.write_all(&chunk).await.is_ok() {}
                }
            }
        });
    }
}

/// Runs one measurement against any endpoint and prints it.
async fn drive(at: &Endpoint, mode: Mode, sessions: usize, size: usize, window: Duration, ca: Option<&Path>) {
    // A clear line for the usual mistake (nothing listening), rather than a panic per session.
    if let Err(e) = TcpStream::connect(at.addr).await {
        eprintln!("drive: connect to {} ({}): {e}", at.url(), at.addr);
        std::process::exit(1);
    }
    let tls = client_tls_from(ca);
    let what = format!("{} × {size} B to {}", sessions, at.url());
    if mode == Mode::Rtt {
        let rtts = latency(at, &tls, sessions, size, window).await;
        let us = |p| percentile(&rtts, p).as_secs_f64() * 1e6;
        println!(
            "rtt: {what}: p50 {:.0} µs, p99 {:.0} µs, p99.9 {:.0} µs ({} round trips)",
            us(0.5),
            us(0.99),
            us(0.999),
            rtts.len()
        );
    } else {
        let bps = throughput(at, &tls, mode, sessions, size, window).await;
        println!("{}: {what}: {:.1} MB/s", format!("{mode:?}").to_lowercase(), bps / 1e6);
    }
}

fn render_table(rows: &[Row], runs: usize) -> String {
    let base = rows.iter().find(|r| r.name == "bare-ws").cloned().unwrap_or_default();
    let base_tls = rows.iter().find(|r| r.name == "bare-wss").cloned().unwrap_or_default();
    // The ratio to the bare bridge is taken within each run, where the two were measured
    // seconds apart, and the median of those ratios is shown: drift in the machine's load between
    // runs then cancels instead of adding to the spread.
    let ratio = |v: &[f64], b: &[f64]| {
        let per_run: Vec<f64> =
            v.iter().zip(b).filter(|(v, b)| v.is_finite() && **b > 0.0).map(|(v, b)| v / b).collect();
        if per_run.is_empty() { String::new() } else { format!(" ({:.2}×)", median(&per_run)) }
    };
    let p99 = |rows: &[[f64; 3]]| rows.iter().map(|r| r[1]).collect::<Vec<_>>();
    let mut s = format!(
        "Medians of {runs} interleaved runs; (×) is the median of the per-run ratios to the bare bridge of the same scheme (RTT: of p99).\n\n\
         | target | 1 × 64 KiB MB/s | 50 × 4 KiB MB/s | RTT 1 session p50/p99/p99.9 µs | RTT 50 sessions p50/p99/p99.9 µs | idle KiB/session | wss handshakes/s | CPU s/GiB | instr/byte |\n\
         |---|---|---|---|---|---|---|---|---|\n"
    );
    for r in rows {
        let b = if r.name.ends_with("wss") { &base_tls } else { &base };
        let (t1, t50) = (median(&r.mbps_1x64k), median(&r.mbps_50x4k));
        let (l1, l50) = (median3(&r.rtt1), median3(&r.rtt50));
        // A figure not taken in this run (e.g. with --callgrind-only) shows as "–".
        let num = |v: f64| if v.is_finite() { format!("{v:.0}") } else { "–".into() };
        let rtt = |l: [f64; 3]| l.map(num).join("/");
        s += &format!(
            "| {} | {}{} | {}{} | {}{} | {}{} | {} | {} | {} | {} |\n",
            r.name,
            num(t1),
            ratio(&r.mbps_1x64k, &b.mbps_1x64k),
            num(t50),
            ratio(&r.mbps_50x4k, &b.mbps_50x4k),
            rtt(l1),
            ratio(&p99(&r.rtt1), &p99(&b.rtt1)),
            rtt(l50),
            ratio(&p99(&r.rtt50), &p99(&b.rtt50)),
            r.idle_kib.map_or("–".into(), |k| format!("{k:.1}")),
            if r.handshakes.is_empty() { "–".into() } else { format!("{:.0}", median(&r.handshakes)) },
            if r.cpu_per_gib.is_empty() { "–".into() } else { format!("{:.2}", median(&r.cpu_per_gib)) },
            r.instr_per_byte.map_or("–".into(), |i| format!("{i:.2}")),
        );
    }
    s
}

/// A bar chart of single-session and 50-session throughput per target, as SVG.
fn render_chart(rows: &[Row]) -> String {
    let max = rows
        .iter()
        .flat_map(|r| [median(&r.mbps_1x64k), median(&r.mbps_50x4k)])
        .filter(|v| v.is_finite())
        .fold(1.0, f64::max);
    let (w, bar, gap, left) = (760.0, 14.0, 14.0, 110.0);
    let h = 50.0 + rows.len() as f64 * (2.0 * bar + gap);
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <text x=\"10\" y=\"20\" font-size=\"14\">Echo throughput, MB/s (dark: 1 session × 64 KiB; light: 50 sessions × 4 KiB)</text>\n"
    );
    for (i, r) in rows.iter().enumerate() {
        let y = 40.0 + i as f64 * (2.0 * bar + gap);
        s += &format!("<text x=\"10\" y=\"{}\">{}</text>\n", y + bar + 4.0, r.name);
        for (j, (v, color)) in
            [(median(&r.mbps_1x64k), "#1d4f91"), (median(&r.mbps_50x4k), "#7fa7d9")].into_iter().enumerate()
        {
            if !v.is_finite() {
                continue;
            }
            let len = (w - left - 80.0) * v / max;
            let yy = y + j as f64 * bar;
            s += &format!(
                "<rect x=\"{left}\" y=\"{yy}\" width=\"{len:.1}\" height=\"{}\" fill=\"{color}\"/><text x=\"{:.1}\" y=\"{:.1}\">{v:.0}</text>\n",
                bar - 2.0,
                left + len + 4.0,
                yy + bar - 4.0
            );
        }
    }
    s + "</svg>\n"
}
