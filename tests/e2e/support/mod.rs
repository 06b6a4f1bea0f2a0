//! Test harness: a real gateway on 127.0.0.1:0, real TCP backends, real WebSocket clients.
//!
//! Scenario builders in the linkerd style, so each test reads as setup then assertions:
//! `Gateway::builder().route("tcp", "/tcp", &echo.target()).start().await`,
//! `TcpEcho::start().await`, `gw.ws("/tcp").await`.
//!
//! Every await that could hang goes through [`within`], so a hang fails with a message.

#![allow(dead_code)]

pub mod browser;
/// `wsgate connect` run as a user runs it; a CONNECT proxy; a real sshd.
pub mod client;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use rustls::pki_types::ServerName;
use tempfile::TempDir;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{WebSocketStream, client_async_with_config};

/// Default bound on any single wait in a test.
pub const WAIT: Duration = Duration::from_secs(20);

/// Awaits `fut`, failing the test with `what` if it takes longer than [`WAIT`].
pub async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    match tokio::time::timeout(WAIT, fut).await {
        Ok(v) => v,
        Err(_) => panic!("timed out after {WAIT:?} waiting for: {what}"),
    }
}

/// Deterministic pseudo-random bytes (xorshift), so failures reproduce.
pub fn payload(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// The byte pattern the browser helpers use: byte i is (i * 31 + seed) mod 251.
pub fn js_pattern(len: usize, seed: u64) -> Vec<u8> {
    (0..len as u64).map(|i| ((i * 31 + seed) % 251) as u8).collect()
}

// ---------------------------------------------------------------------------------------------
// Certificates

/// A throw-away CA and a `localhost` certificate it signed, written as PEM files.
pub struct TestCa {
    pub dir: TempDir,
    ca_der: rustls::pki_types::CertificateDer<'static>,
}

impl TestCa {
    pub fn new() -> TestCa {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
        let dir = tempfile::tempdir().unwrap();
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca_params, ca_key);
        let leaf_key = KeyPair::generate().unwrap();
        let leaf = CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()])
            .unwrap()
            .signed_by(&leaf_key, &issuer)
            .unwrap();
        std::fs::write(dir.path().join("cert.pem"), leaf.pem()).unwrap();
        std::fs::write(dir.path().join("key.pem"), leaf_key.serialize_pem()).unwrap();
        // For clients given a CA file (`wsgate connect --ca`).
        std::fs::write(dir.path().join("ca.pem"), ca_cert.pem()).unwrap();
        TestCa { ca_der: ca_cert.der().clone(), dir }
    }

    pub fn cert_path(&self) -> String {
        self.dir.path().join("cert.pem").display().to_string()
    }

    pub fn key_path(&self) -> String {
        self.dir.path().join("key.pem").display().to_string()
    }

    pub fn client_config(&self) -> Arc<rustls::ClientConfig> {
        client_config_trusting(self.ca_der.clone())
    }
}

/// A rustls client config that trusts exactly `root`.
pub fn client_config_trusting(root: rustls::pki_types::CertificateDer<'static>) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(root).unwrap();
    Arc::new(
        rustls::ClientConfig::builder_with_provider(wsgate::tls::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

// ---------------------------------------------------------------------------------------------
// The gateway

/// Builds a config in TOML (so tests go through the real config loader) and starts a gateway.
pub struct GatewayBuilder {
    routes: String,
    console: bool,
    limits: Vec<(String, String)>,
    tls: Option<TestCa>,
    deadline_secs: f64,
    shipped_client_limits: bool,
    /// More TOML lines for every listener's table (`proxy_protocol`, `trusted_proxies`, ...).
    listener_keys: String,
}

/// `[limits]` keys (dotted) that turn the per-client limits off unless a test sets them.
const UNLIMITED_CLIENT: [(&str, &str); 3] = [
    ("per_client.max_connections", "0"),
    ("per_client.max_handshakes", "0"),
    ("per_client.new_connections_per_sec", "0"),
];

impl Default for GatewayBuilder {
    fn default() -> Self {
        GatewayBuilder {
            routes: String::new(),
            console: false,
            limits: Vec::new(),
            tls: None,
            deadline_secs: 5.0,
            shipped_client_limits: false,
            listener_keys: String::new(),
        }
    }
}

impl GatewayBuilder {
    /// Adds a route; `extra` is more TOML lines for the route table (e.g. `outbound = "text"`).
    pub fn route_with(mut self, name: &str, path: &str, backend: &str, extra: &str) -> Self {
        self.routes.push_str(&format!("[routes.{name}]\npath = \"{path}\"\nbackend = \"{backend}\"\n{extra}\n"));
        self
    }

    pub fn route(self, name: &str, path: &str, backend: &str) -> Self {
        self.route_with(name, path, backend, "")
    }

    /// Adds a route whose table is `lines` (TOML, e.g. `backends = [...]` and a `[routes.NAME.health]`
    /// table last) after its path: for routes without a single `backend`.
    pub fn route_table(self, name: &str, path: &str, lines: &str) -> Self {
        self.route_toml(&format!("[routes.{name}]\npath = \"{path}\"\n{lines}"))
    }

    /// Adds `toml` as it is among the routes: a route table that `route_with` cannot write (one
    /// without a `backend` key, such as a token-mapped route).
    pub fn route_toml(mut self, toml: &str) -> Self {
        self.routes.push_str(toml);
        self.routes.push('\n');
        self
    }

    /// Sets `[limits] key = value` (value as TOML).
    pub fn limit(mut self, key: &str, value: &str) -> Self {
        self.limits.push((key.into(), value.into()));
        self
    }

    /// Adds a `wss` listener with a certificate from a fresh test CA.
    pub fn tls(mut self) -> Self {
        self.tls = Some(TestCa::new());
        self
    }

    /// Serves the console page at `/console` (the browser tests load it as their page).
    pub fn console(mut self) -> Self {
        self.console = true;
        self
    }

    /// Keeps `[limits.per_client]` at its defaults (other tests turn it off).
    pub fn shipped_client_limits(mut self) -> Self {
        self.shipped_client_limits = true;
        self
    }

    /// Adds `lines` (TOML) to every listener's table.
    pub fn listener_keys(mut self, lines: &str) -> Self {
        self.listener_keys.push_str(lines);
        self.listener_keys.push('\n');
        self
    }

    pub fn deadline_secs(mut self, secs: f64) -> Self {
        self.deadline_secs = secs;
        self
    }

    pub fn toml(&self) -> String {
        let mut t = String::from("[listeners.plain]\naddress = \"127.0.0.1:0\"\n");
        t.push_str(&self.listener_keys);
        if let Some(ca) = &self.tls {
            t.push_str(&format!(
                "[listeners.secure]\naddress = \"127.0.0.1:0\"\ntls = {{ cert = {:?}, key = {:?} }}\n",
                ca.cert_path(),
                ca.key_path()
            ));
            t.push_str(&self.listener_keys);
        }
        t.push_str(&self.routes);
        t.push_str("[limits]\n");
        for (k, v) in &self.limits {
            t.push_str(&format!("{k} = {v}\n"));
        }
        // Tests open hundreds of connections at once from 127.0.0.1, which is what the
        // per-client defaults exist to refuse; the tests of those limits set their own.
        for (k, v) in UNLIMITED_CLIENT {
            if !self.shipped_client_limits && !self.limits.iter().any(|(set, _)| set == k) {
                t.push_str(&format!("{k} = {v}\n"));
            }
        }
        t.push_str(&format!(
            "[shutdown]\ndrain_delay_secs = 0\nclose_window_secs = 0\ndeadline_secs = {}\n[admin]\naddress = \"127.0.0.1:0\"\n",
            self.deadline_secs
        ));
        if self.console {
            t.push_str("[console]\nenabled = true\n");
        }
        t
    }

    pub async fn start(self) -> Gateway {
        let mut gw = Gateway::from_toml(&self.toml()).await;
        gw.ca = self.tls;
        gw
    }
}

impl Gateway {
    /// Starts a gateway on config text (as if read from `test.toml`).
    pub async fn from_toml(text: &str) -> Gateway {
        let config = wsgate::config::parse(text, std::path::Path::new("test.toml"))
            .unwrap_or_else(|e| panic!("test config invalid:\n{e}\n---\n{text}"));
        Gateway::from_config(config).await
    }

    /// Starts a gateway on a config file.
    pub async fn from_file(path: &std::path::Path) -> Gateway {
        let config = wsgate::config::load(path).unwrap_or_else(|e| panic!("test config invalid:\n{e}"));
        Gateway::from_config(config).await
    }

    async fn from_config(config: wsgate::Config) -> Gateway {
        let gateway = wsgate::Gateway::bind(config).await.expect("bind gateway");
        let plain = gateway.local_addr("plain").unwrap();
        let secure = gateway.local_addr("secure");
        let admin = gateway.admin_addr().unwrap();
        let reloader = gateway.reloader();
        let shutdown = wsgate::Shutdown::new();
        let task = tokio::spawn(gateway.run(shutdown.clone()));
        Gateway { plain, secure, admin, reloader, shutdown, task: Some(task), ca: None }
    }
}

/// Opens a wss:// session at `addr` trusting only `ca`; the error says what failed.
pub async fn wss_connect(addr: SocketAddr, ca: &TestCa, path: &str) -> Result<Ws, String> {
    let tcp = within("tcp connect", TcpStream::connect(addr)).await.map_err(|e| e.to_string())?;
    let connector = tokio_rustls::TlsConnector::from(ca.client_config());
    let tls = within("tls handshake", connector.connect(ServerName::try_from("localhost").unwrap(), tcp))
        .await
        .map_err(|e| format!("tls: {e}"))?;
    let url = format!("wss://localhost:{}{path}", addr.port());
    let (ws, _) =
        within("wss handshake", client_async_with_config(url, Box::new(tls) as Box<dyn Io>, Some(client_ws_config())))
            .await
            .map_err(|e| format!("websocket: {e}"))?;
    Ok(ws)
}

/// A running gateway; shut down when dropped.
pub struct Gateway {
    pub plain: SocketAddr,
    pub secure: Option<SocketAddr>,
    pub admin: SocketAddr,
    pub reloader: wsgate::Reloader,
    pub shutdown: wsgate::Shutdown,
    task: Option<JoinHandle<()>>,
    ca: Option<TestCa>,
}

impl Gateway {
    pub fn builder() -> GatewayBuilder {
        GatewayBuilder::default()
    }

    pub fn url(&self, path: &str) -> String {
        format!("ws://{}{path}", self.plain)
    }

    /// Opens a ws:// session to `path` (no Origin header, like a non-browser client).
    pub async fn ws(&self, path: &str) -> Ws {
        self.ws_with(path, &[]).await.unwrap_or_else(|e| panic!("connect {path}: {e}"))
    }

    /// Opens a ws:// session with extra request headers; returns the handshake error if refused.
    pub async fn ws_with(&self, path: &str, headers: &[(&str, &str)]) -> Result<Ws, tungstenite::Error> {
        let mut req = self.url(path).into_client_request().unwrap();
        for (k, v) in headers {
            req.headers_mut()
                .insert(tungstenite::http::HeaderName::from_bytes(k.as_bytes()).unwrap(), v.parse().unwrap());
        }
        let tcp = within("tcp connect", TcpStream::connect(self.plain)).await.unwrap();
        let (ws, _) = within(
            "ws handshake",
            client_async_with_config(req, Box::new(tcp) as Box<dyn Io>, Some(client_ws_config())),
        )
        .await?;
        Ok(ws)
    }

    /// Opens a ws:// (or, with `secure`, wss://) session to `path` from the loopback address
    /// `src`; the error says what failed.
    pub async fn session_from(&self, src: std::net::IpAddr, path: &str, secure: bool) -> Result<Ws, String> {
        self.session_via(src, b"", path, secure, &[]).await.map(|(ws, _)| ws)
    }

    /// Opens a session to `path` from `src`, writing `preamble` first (a balancer's PROXY
    /// header, or nothing), over ws or wss, with extra request headers; returns it and the
    /// client socket's own address (what the gateway sees as its peer).
    pub async fn session_via(
        &self,
        src: std::net::IpAddr,
        preamble: &[u8],
        path: &str,
        secure: bool,
        headers: &[(&str, &str)],
    ) -> Result<(Ws, SocketAddr), String> {
        let addr = if secure { self.secure.expect("gateway built with .tls()") } else { self.plain };
        let mut tcp = within("tcp connect", connect_from(src, addr)).await.map_err(|e| format!("connect: {e}"))?;
        let local = tcp.local_addr().unwrap();
        tcp.write_all(preamble).await.map_err(|e| format!("write the preamble: {e}"))?;
        let io: Box<dyn Io> = if secure {
            let connector = tokio_rustls::TlsConnector::from(self.client_tls());
            let tls = within("tls handshake", connector.connect(ServerName::try_from("localhost").unwrap(), tcp))
                .await
                .map_err(|e| format!("tls: {e}"))?;
            Box::new(tls)
        } else {
            Box::new(tcp)
        };
        let url = format!("{}://localhost:{}{path}", if secure { "wss" } else { "ws" }, addr.port());
        let mut req = url.into_client_request().unwrap();
        for (k, v) in headers {
            let name = tungstenite::http::HeaderName::from_bytes(k.as_bytes()).unwrap();
            req.headers_mut().append(name, v.parse().unwrap());
        }
        let (ws, _) = within("ws handshake", client_async_with_config(req, io, Some(client_ws_config())))
            .await
            .map_err(|e| format!("websocket: {e}"))?;
        Ok((ws, local))
    }

    /// Opens a wss:// session to `path`, verifying the test CA's certificate for `localhost`.
    pub async fn wss(&self, path: &str) -> Ws {
        let addr = self.secure.expect("gateway built with .tls()");
        let ca = self.ca.as_ref().unwrap();
        let tcp = within("tcp connect", TcpStream::connect(addr)).await.unwrap();
        let connector = tokio_rustls::TlsConnector::from(ca.client_config());
        let tls = within("tls handshake", connector.connect(ServerName::try_from("localhost").unwrap(), tcp))
            .await
            .expect("tls handshake");
        let url = format!("wss://localhost:{}{path}", addr.port());
        let (ws, _) = within(
            "wss handshake",
            client_async_with_config(url, Box::new(tls) as Box<dyn Io>, Some(client_ws_config())),
        )
        .await
        .expect("wss handshake");
        ws
    }

    /// A rustls client config trusting the gateway's test CA (built with `.tls()`).
    /// The test CA's certificate as a PEM file (`.tls()` gateways only).
    pub fn ca_pem_path(&self) -> String {
        self.ca.as_ref().expect("gateway built with .tls()").dir.path().join("ca.pem").display().to_string()
    }

    pub fn client_tls(&self) -> Arc<rustls::ClientConfig> {
        self.ca.as_ref().expect("gateway built with .tls()").client_config()
    }

    /// Starts the graceful shutdown and waits until `run` has returned.
    pub async fn stop(&mut self) {
        self.shutdown.now();
        if let Some(task) = self.task.take() {
            within("gateway shutdown", task).await.unwrap();
        }
    }

    /// Whether `run` has returned.
    pub fn is_finished(&self) -> bool {
        self.task.as_ref().is_none_or(|t| t.is_finished())
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.shutdown.now();
    }
}

/// Client side: allow big messages back (the gateway bounds what it sends, not the test).
fn client_ws_config() -> tungstenite::protocol::WebSocketConfig {
    tungstenite::protocol::WebSocketConfig::default().max_message_size(Some(64 << 20)).max_frame_size(Some(64 << 20))
}

pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// A test WebSocket client over ws or wss.
pub type Ws = WebSocketStream<Box<dyn Io>>;

/// Reads messages until `want` bytes of binary or text data have arrived, and returns them joined
/// (the gateway turns a byte stream into messages at arbitrary boundaries).
pub async fn read_bytes(ws: &mut Ws, want: usize) -> Vec<u8> {
    let mut got = Vec::with_capacity(want);
    while got.len() < want {
        match within("data from the gateway", ws.next()).await {
            Some(Ok(Message::Binary(b))) => got.extend_from_slice(&b),
            Some(Ok(Message::Text(t))) => got.extend_from_slice(t.as_bytes()),
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
            other => panic!("expected data after {} of {want} bytes, got {other:?}", got.len()),
        }
    }
    assert_eq!(got.len(), want, "more bytes than sent came back");
    got
}

/// Reads data messages until at least `want` bytes arrived (for endless streams).
pub async fn read_at_least(ws: &mut Ws, want: usize) -> usize {
    let mut got = 0;
    while got < want {
        match within("data from the gateway", ws.next()).await {
            Some(Ok(Message::Binary(b))) => got += b.len(),
            Some(Ok(Message::Text(t))) => got += t.len(),
            other => panic!("expected data after {got} bytes, got {other:?}"),
        }
    }
    got
}

/// Reads until a Close frame arrives; returns (code, reason). Data messages before it are
/// returned too, joined.
pub async fn read_until_close(ws: &mut Ws) -> (Vec<u8>, u16, String) {
    let mut data = Vec::new();
    loop {
        match within("close frame from the gateway", ws.next()).await {
            Some(Ok(Message::Binary(b))) => data.extend_from_slice(&b),
            Some(Ok(Message::Text(t))) => data.extend_from_slice(t.as_bytes()),
            Some(Ok(Message::Close(Some(CloseFrame { code, reason })))) => {
                return (data, u16::from(code), reason.as_str().to_string());
            }
            Some(Ok(Message::Close(None))) => return (data, 1005, String::new()),
            Some(Ok(_)) => {}
            other => panic!("expected a close frame after {} data bytes, got {other:?}", data.len()),
        }
    }
}

/// After a Close was received, the stream must end (tungstenite answers it) without error.
pub async fn expect_end(ws: &mut Ws) {
    loop {
        match within("end of stream", ws.next()).await {
            None => return,
            Some(Ok(Message::Close(_))) => {}
            Some(Err(tungstenite::Error::ConnectionClosed)) => return,
            other => panic!("expected the stream to end, got {other:?}"),
        }
    }
}

pub async fn send_binary(ws: &mut Ws, data: &[u8]) {
    within("send", ws.send(Message::Binary(data.to_vec().into()))).await.expect("send binary");
}

// ---------------------------------------------------------------------------------------------
// Backends

/// A TCP backend whose connections are handled by `handler`; counts accepted connections.
pub struct Backend {
    pub addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    _task: JoinHandle<()>,
}

impl Backend {
    pub async fn start<F, Fut>(handler: F) -> Backend
    where
        F: Fn(TcpStream) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        Backend::start_at("127.0.0.1:0".parse().unwrap(), handler).await
    }

    /// As [`Backend::start`], listening on `addr` (another loopback address, such as 127.0.0.2:0).
    pub async fn start_at<F, Fut>(addr: SocketAddr, handler: F) -> Backend
    where
        F: Fn(TcpStream) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let listener = TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(handler(stream));
            }
        });
        Backend { addr, accepted, _task: task }
    }

    /// A TCP echo backend.
    pub async fn echo() -> Backend {
        Backend::start(|mut s: TcpStream| async move {
            let (mut r, mut w) = s.split();
            let _ = tokio::io::copy(&mut r, &mut w).await;
        })
        .await
    }

    /// A TCP echo backend listening on `addr`.
    pub async fn echo_on(addr: SocketAddr) -> Backend {
        Backend::start_at(addr, |mut s: TcpStream| async move {
            let (mut r, mut w) = s.split();
            let _ = tokio::io::copy(&mut r, &mut w).await;
        })
        .await
    }

    /// A backend that reads everything until EOF and reports it on the returned channel.
    pub async fn sink() -> (Backend, mpsc::UnboundedReceiver<Vec<u8>>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let b = Backend::start(move |mut s: TcpStream| {
            let tx = tx.clone();
            async move {
                let mut all = Vec::new();
                let _ = s.read_to_end(&mut all).await;
                let _ = tx.send(all);
            }
        })
        .await;
        (b, rx)
    }

    /// A backend that writes `data` and then closes its connection (EOF).
    pub async fn say_and_close(data: Vec<u8>) -> Backend {
        let data = Arc::new(data);
        Backend::start(move |mut s: TcpStream| {
            let data = data.clone();
            async move {
                s.write_all(&data).await.unwrap();
                s.shutdown().await.unwrap();
                // Keep reading until the gateway closes, so the close is orderly.
                let mut sink = Vec::new();
                let _ = s.read_to_end(&mut sink).await;
            }
        })
        .await
    }

    /// `host:port` for a route's `backend` key.
    pub fn target(&self) -> String {
        self.addr.to_string()
    }

    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

/// A TCP connection to `dst` from the loopback address `src` (any of 127.0.0.0/8), so one test
/// can be several clients.
pub async fn connect_from(src: std::net::IpAddr, dst: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(src, 0))?;
    socket.connect(dst).await
}

/// A port that refuses connections: bound but not listening, held for the test's life (no
/// probe-and-drop race).
pub struct RefusingPort {
    socket: tokio::net::TcpSocket,
    pub addr: SocketAddr,
}

impl RefusingPort {
    pub fn new() -> RefusingPort {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = socket.local_addr().unwrap();
        RefusingPort { socket, addr }
    }

    /// Starts listening on the port (a service that comes up).
    pub fn listen(self) -> TcpListener {
        self.socket.listen(64).unwrap()
    }
}

// ---------------------------------------------------------------------------------------------
// Raw HTTP

/// Sends `request` verbatim and returns (status, head, body) of the response.
pub async fn raw_http(addr: SocketAddr, request: &str) -> (u16, String, String) {
    let s = within("connect", TcpStream::connect(addr)).await.unwrap();
    raw_http_on(s, request).await
}

/// Sends `request` verbatim on `s` and returns (status, head, body) of the response.
pub async fn raw_http_on(mut s: TcpStream, request: &str) -> (u16, String, String) {
    within("write request", s.write_all(request.as_bytes())).await.unwrap();
    let mut buf = Vec::new();
    // Read until the head and a Content-Length body are complete (the connection may stay open).
    loop {
        let mut chunk = [0u8; 4096];
        let n = within("http response", s.read(&mut chunk)).await.unwrap();
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf).to_string();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let len = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse::<usize>().unwrap())
                })
                .unwrap_or(0);
            if body.len() >= len || n == 0 {
                let status = head.split(' ').nth(1).unwrap().parse().unwrap();
                return (status, head.to_string(), body.to_string());
            }
        }
        assert!(n > 0, "connection closed before a full response: {:?}", String::from_utf8_lossy(&buf));
    }
}

/// Upgrades `s` to a raw WebSocket session on `path`: the request, then the 101's head read a
/// byte at a time, so nothing after it is consumed.
pub async fn raw_upgrade(mut s: TcpStream, path: &str) -> TcpStream {
    s.write_all(upgrade_request(path, "").as_bytes()).await.unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8];
        assert_eq!(within("101", s.read(&mut byte)).await.unwrap(), 1, "closed during the upgrade");
        head.push(byte[0]);
    }
    assert!(head.starts_with(b"HTTP/1.1 101"), "{}", String::from_utf8_lossy(&head));
    s
}

/// A client frame with mask key 0 (so the payload is sent as it is): `first` is the first header
/// byte (FIN and opcode).
pub fn masked_frame(first: u8, payload: &[u8]) -> Vec<u8> {
    let mut frame = vec![first];
    match payload.len() {
        n @ 0..=125 => frame.push(0x80 | n as u8),
        n @ 126..=65535 => {
            frame.push(0x80 | 126);
            frame.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            frame.push(0x80 | 127);
            frame.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    frame.extend_from_slice(&[0; 4]);
    frame.extend_from_slice(payload);
    frame
}

/// A well-formed upgrade request for `path`, plus `extra` header lines.
pub fn upgrade_request(path: &str, extra: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{extra}\r\n"
    )
}

// ---------------------------------------------------------------------------------------------
// Admin endpoints and metrics

/// GET `path` on the admin listener: (status, body).
pub async fn admin_get(gw: &Gateway, path: &str) -> (u16, String) {
    let (status, _, body) =
        raw_http(gw.admin, &format!("GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n")).await;
    (status, body)
}

/// The value of the sample `name{labels}` in a Prometheus text exposition; labels not named
/// must not matter, so the match is on each given `key="value"`.
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
        .filter(|l| labels.iter().all(|(k, v)| l.contains(&format!("{k}=\"{v}\""))))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .reduce(|a, b| a + b)
}

/// Reads `/metrics` and returns `name{labels}` (0 when absent).
pub async fn scrape(gw: &Gateway, name: &str, labels: &[(&str, &str)]) -> f64 {
    let (status, body) = admin_get(gw, "/metrics").await;
    assert_eq!(status, 200, "{body}");
    metric(&body, name, labels).unwrap_or(0.0)
}

/// Polls `check` until it returns true; state that settles later (metrics recorded when a
/// session ends) is waited for, never slept for.
pub async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    within(what, async {
        while !check().await {
            // Spaces the checks of this bounded retry; the wait ends on the state itself.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
}

/// The log lines of everything that runs on this thread (a `#[tokio::test]` runtime runs the
/// gateway it starts on the test's thread), as text, from `capture` until the guard is dropped.
#[derive(Clone, Default)]
pub struct Logs(Arc<std::sync::Mutex<Vec<u8>>>);

impl Logs {
    pub fn capture() -> (Logs, tracing::subscriber::DefaultGuard) {
        Logs::capture_at(tracing::Level::DEBUG)
    }

    /// Lines at `level` and above only (`INFO` is what wsgate writes by default).
    pub fn capture_at(level: tracing::Level) -> (Logs, tracing::subscriber::DefaultGuard) {
        // While a single scoped subscriber exists in the process, tracing-core decides whether a
        // log line is wanted from the default of whichever thread reaches it first, and keeps that
        // answer: a line first reached by a test without a capture would then be lost to every
        // capture. A second subscriber, registered for good, turns that shortcut off.
        static SECOND: std::sync::OnceLock<tracing::Dispatch> = std::sync::OnceLock::new();
        SECOND.get_or_init(|| tracing::Dispatch::new(tracing::subscriber::NoSubscriber::default()));
        let logs = Logs::default();
        let writer = logs.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(level)
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        (logs, tracing::subscriber::set_default(subscriber))
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

impl std::io::Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// `wsgate run --config CONFIG`, the binary as a user starts it, logging at `rust_log` into a
/// pipe: the process (killed when dropped) and its log lines.
pub fn run_binary(
    config: &std::path::Path,
    rust_log: &str,
) -> (tokio::process::Child, tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStderr>>) {
    use tokio::io::AsyncBufReadExt;
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_wsgate"))
        .args(["run", "--config"])
        .arg(config)
        .env("RUST_LOG", rust_log)
        .env("NO_COLOR", "1")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let lines = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
    (child, lines)
}
