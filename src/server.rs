//! The client-facing listener: accept loop, connection and handshake limits, TLS, HTTP/1.1, and
//! the upgrade decision for each request.
//!
//! Per request, in order: route by `Host` and path (404), check that it is a well-formed
//! WebSocket upgrade (426 for a plain GET, 400 for a malformed upgrade), check the origin
//! policy (403) and the subprotocol (400), dial the backend, and only then answer 101 and hand
//! the socket to `session`. Dialling first means a client never sees `onopen` for a backend
//! that is not there; how it learns of a dead backend instead is the route's choice (an
//! in-band 1013 close, or HTTP 502/503/504).
//!
//! Each connection works under the [`Snapshot`] (routes, limits, certificates) current when it
//! was accepted; a reload swaps the snapshot whole, so new connections see the new config and
//! existing sessions keep theirs.
//!
//! Limits are semaphore permits held by the task they limit: a connection permit lives as long
//! as the client socket (through the session), a handshake permit until the request is answered.
//! At either limit a new socket is closed at once rather than queued, and counted.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use futures_util::FutureExt;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode, Version};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info_span, warn};
use tungstenite::handshake::derive_accept_key;
use tungstenite::protocol::WebSocketConfig;

use crate::backend;
use crate::config::Limits;
use crate::metrics::{ListenerMetrics, Metrics, RouteMetrics};
use crate::policy;
use crate::readahead::ReadAhead;
use crate::router::Router;
use crate::session;

/// What every connection of one gateway instance shares for the instance's whole life.
pub(crate) struct Shared {
    pub connections: Arc<Semaphore>,
    pub handshakes: Arc<Semaphore>,
    pub next_session: AtomicU64,
    /// Cancelled when the drain begins: stop accepting, close sessions with 1001.
    pub stop: CancellationToken,
    /// Cancelled at the shutdown deadline: drop whatever is left.
    pub abort: CancellationToken,
    /// Tracks every connection and session task, so shutdown can wait for them.
    pub tasks: TaskTracker,
    pub metrics: Arc<Metrics>,
    /// The current config snapshot; replaced whole by a reload.
    snapshot: RwLock<Arc<Snapshot>>,
}

/// Everything a reload may change, as one value.
pub(crate) struct Snapshot {
    pub router: Router,
    pub limits: Limits,
    /// How a shutdown proceeds (read when it starts).
    pub shutdown: crate::config::Shutdown,
    /// TLS acceptors by listener name (`wss` listeners only).
    pub tls: HashMap<String, TlsAcceptor>,
    /// Pages served for plain GET on an exact path (the console), given by `lib.rs`.
    pub pages: Vec<Page>,
    /// Metric handles of every route, registered up front so each route shows in `/metrics`
    /// (with zeros) before its first session.
    pub route_metrics: HashMap<String, Arc<RouteMetrics>>,
}

/// A static page: served for GET or HEAD on exactly `path`, on every listener.
pub(crate) struct Page {
    pub path: String,
    pub render: fn() -> Response<Full<Bytes>>,
}

impl Shared {
    pub fn new(limits: &Limits, metrics: Arc<Metrics>, snapshot: Snapshot) -> Shared {
        Shared {
            connections: Arc::new(Semaphore::new(limits.max_connections)),
            handshakes: Arc::new(Semaphore::new(limits.max_handshakes)),
            next_session: AtomicU64::new(1),
            stop: CancellationToken::new(),
            abort: CancellationToken::new(),
            tasks: TaskTracker::new(),
            metrics,
            snapshot: RwLock::new(Arc::new(snapshot)),
        }
    }

    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn replace(&self, snapshot: Snapshot) {
        *self.snapshot.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(snapshot);
    }
}

impl Snapshot {
    fn ws_config(&self) -> WebSocketConfig {
        let max = self.limits.max_message_bytes;
        WebSocketConfig::default()
            // Allocated for every session, idle or not; large reads go through `ReadAhead`'s
            // buffer, which exists only while data flows.
            .read_buffer_size(WS_READ_BUFFER_BYTES)
            // Write each message at once: the pumps wait for it to reach the socket before reading
            // more, which is what gives backpressure, so a write buffer would only add a copy.
            .write_buffer_size(0)
            // Bound for frames queued behind a slow client: one echoed message (up to `max`)
            // plus control frames. tungstenite refuses any single frame larger than this, so it
            // must hold the largest message it sends. (The bridge's data frames do not pass
            // through tungstenite: `frames`.)
            .max_write_buffer_size(max + 64 * 1024)
            .max_message_size(Some(max))
            .max_frame_size(Some(max))
    }
}

/// tungstenite's own read buffer: small, because every session holds it for its whole life.
/// It also caps each read tungstenite makes, which is why `ReadAhead` reads for it while busy.
const WS_READ_BUFFER_BYTES: usize = 2048;

/// One listener as the accept loop sees it.
pub(crate) struct Listener {
    pub name: String,
    pub tcp: TcpListener,
    pub secure: bool,
    pub metrics: ListenerMetrics,
}

/// Accepts connections until the drain begins. Accept errors (such as running out of file
/// descriptors) are logged and retried with a growing pause, never fatal.
pub(crate) async fn accept_loop(listener: Listener, shared: Arc<Shared>) {
    let mut backoff = Duration::from_millis(10);
    let m = &listener.metrics;
    loop {
        let accepted = tokio::select! {
            _ = shared.stop.cancelled() => return,
            accepted = listener.tcp.accept() => accepted,
        };
        let (tcp, peer) = match accepted {
            Ok(pair) => {
                backoff = Duration::from_millis(10);
                pair
            }
            Err(e) => {
                warn!(listener = %listener.name, error = %e, pause = ?backoff, "accept failed; pausing");
                tokio::select! {
                    _ = shared.stop.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        m.accepted.increment(1);
        let Ok(conn_permit) = shared.connections.clone().try_acquire_owned() else {
            m.refused_connection_limit.increment(1);
            // debug, not warn: under a flood this would log once per socket; the counter
            // wsgate_connections_refused_total is what to alert on.
            debug!(listener = %listener.name, client.addr = %peer, "connection limit reached (limits.max_connections); closing");
            continue;
        };
        let Ok(handshake_permit) = shared.handshakes.clone().try_acquire_owned() else {
            m.refused_handshake_limit.increment(1);
            debug!(listener = %listener.name, client.addr = %peer, "handshake limit reached (limits.max_handshakes); closing");
            continue;
        };
        let snapshot = shared.snapshot();
        let tls = snapshot.tls.get(&listener.name).cloned();
        if listener.secure && tls.is_none() {
            // Cannot happen: reloads that would change a listener's scheme are refused.
            warn!(listener = %listener.name, "no certificate for this wss listener; closing");
            continue;
        }
        let span = info_span!("conn", listener = %listener.name, client.addr = %peer);
        let conn = Connection { peer, secure: listener.secure, slot: Arc::new(Slot::new(conn_permit, m)), snapshot };
        let (shared2, metrics) = (shared.clone(), listener.metrics.clone());
        shared.tasks.spawn(
            async move {
                let abort = shared2.abort.clone();
                tokio::select! {
                    _ = abort.cancelled() => {}
                    _ = handle_connection(tcp, tls, conn, handshake_permit, metrics, shared2) => {}
                }
            }
            .instrument(span),
        );
    }
}

/// A client socket's place under `max_connections`, and in the open-connections gauge.
struct Slot {
    _permit: OwnedSemaphorePermit,
    open: metrics::Gauge,
}

impl Slot {
    fn new(permit: OwnedSemaphorePermit, m: &ListenerMetrics) -> Slot {
        m.open.increment(1.0);
        Slot { _permit: permit, open: m.open.clone() }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.open.decrement(1.0);
    }
}

/// A client connection, as requests on it see it.
struct Connection {
    peer: SocketAddr,
    secure: bool,
    /// Held by the connection task and by the session it upgrades to; the socket counts against
    /// `max_connections` until both are done.
    slot: Arc<Slot>,
    /// The config this connection was accepted under.
    snapshot: Arc<Snapshot>,
}

async fn handle_connection(
    tcp: TcpStream,
    tls: Option<TlsAcceptor>,
    conn: Connection,
    handshake_permit: OwnedSemaphorePermit,
    metrics: ListenerMetrics,
    shared: Arc<Shared>,
) {
    backend::tune(&tcp, conn.snapshot.limits.tcp_keepalive);
    // One deadline for the whole handshake, TLS included, so a wss client gets no more time
    // than a ws one.
    let timeout = conn.snapshot.limits.handshake_timeout;
    let deadline = tokio::time::Instant::now() + timeout;
    let conn = Arc::new(conn);
    // Reads from the client go through `ReadAhead` (below hyper, so the WebSocket upgraded from
    // this connection reads through it too): large reads while data flows, no buffer when idle.
    let chunk = conn.snapshot.limits.ws_read_buffer_bytes;
    match tls {
        None => serve_http(ReadAhead::new(tcp, chunk), conn, deadline, shared).await,
        Some(acceptor) => match tokio::time::timeout_at(deadline, acceptor.accept(tcp)).await {
            Ok(Ok(stream)) => serve_http(ReadAhead::new(stream, chunk), conn, deadline, shared).await,
            Ok(Err(e)) => {
                metrics.tls_failed.increment(1);
                debug!(error = %e, "tls handshake failed");
            }
            Err(_) => {
                metrics.tls_timeout.increment(1);
                debug!(?timeout, "tls handshake timed out (limits.handshake_timeout_secs)");
            }
        },
    }
    drop(handshake_permit);
}

/// Serves one HTTP/1.1 request on `io`: the upgrade, or a refusal (or the console page), after
/// which the connection closes (every non-101 response says `Connection: close`). A WebSocket
/// gateway has nothing to serve on a second request, and one request per connection means the
/// handshake permit bounds sockets that have not upgraded, whatever the client does. (hyper's
/// `keep_alive(false)` cannot be used: it would also put `close` on the 101.)
async fn serve_http<IO>(io: IO, conn: Arc<Connection>, deadline: tokio::time::Instant, shared: Arc<Shared>)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
    if remaining.is_zero() {
        return;
    }
    let service = {
        let shared = shared.clone();
        service_fn(move |req| respond(req, conn.clone(), shared.clone()))
    };
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(remaining)
        // Bounds the request head; a WebSocket upgrade needs a few hundred bytes. (hyper's
        // minimum is 8 KiB.)
        .max_buf_size(16 * 1024)
        .keep_alive(true);
    let http = builder.serve_connection(TokioIo::new(io), service).with_upgrades();
    tokio::pin!(http);
    tokio::select! {
        result = http.as_mut() => if let Err(e) = result { debug!(error = %e, "http connection ended with an error") },
        _ = shared.stop.cancelled() => {
            // Finish the request in progress, if any, then close.
            http.as_mut().graceful_shutdown();
            let _ = http.await;
        }
    }
}

/// Answers one request and counts the answer by route and status.
async fn respond(
    req: Request<Incoming>,
    conn: Arc<Connection>,
    shared: Arc<Shared>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let (route, response) = decide(req, &conn, &shared).await;
    match route {
        Some(route) => route.handshake(response.status().as_u16()),
        None => shared.metrics.unrouted_request(response.status().as_u16()),
    }
    Ok(response)
}

async fn decide(
    mut req: Request<Incoming>,
    conn: &Connection,
    shared: &Shared,
) -> (Option<Arc<RouteMetrics>>, Response<Full<Bytes>>) {
    let snap = &conn.snapshot;
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .or_else(|| req.uri().authority().map(|a| a.as_str().to_owned()));
    let path = req.uri().path().to_owned();
    if (req.method() == Method::GET || req.method() == Method::HEAD)
        && !is_upgrade(&req)
        && let Some(page) = snap.pages.iter().find(|p| p.path == path)
    {
        let mut page = (page.render)();
        page.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
        return (None, page);
    }
    let Some(route) = snap.router.find(host.as_deref(), &path).cloned() else {
        debug!(%path, "no route");
        return (None, text(StatusCode::NOT_FOUND, &format!("no route for {path}")));
    };
    let m = snap.route_metrics.get(&route.name).cloned().unwrap_or_else(|| shared.metrics.route(&route.name));
    if let Some(refusal) = upgrade_refusal(&req) {
        debug!(route = %route.name, status = refusal.status().as_u16(), "not a valid websocket upgrade");
        return (Some(m), refusal);
    }
    let origin = req.headers().get(header::ORIGIN).map(|v| v.to_str().unwrap_or("(not text)"));
    if let Err(refusal) = policy::check_origin(&route, origin, host.as_deref(), conn.secure) {
        warn!(route = %route.name, status = refusal.status, reason = %refusal.reason, "request refused");
        let status = StatusCode::from_u16(refusal.status).unwrap_or(StatusCode::FORBIDDEN);
        return (Some(m), text(status, &refusal.reason));
    }
    let offered = req
        .headers()
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|p| !p.is_empty());
    let subprotocol = match policy::select_subprotocol(&route, offered) {
        Ok(chosen) => chosen,
        Err(refusal) => {
            warn!(route = %route.name, status = refusal.status, reason = %refusal.reason, "request refused");
            return (Some(m), text(StatusCode::BAD_REQUEST, &refusal.reason));
        }
    };
    let dialed = match session::dial(&route, &snap.limits, &m).await {
        Ok(dialed) => dialed,
        Err((status, body)) => {
            return (Some(m), text(StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY), &body));
        }
    };
    // The key's form was checked by `upgrade_refusal`.
    let key = req.headers().get(header::SEC_WEBSOCKET_KEY).map(HeaderValue::as_bytes).unwrap_or_default();
    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = response.headers_mut();
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    if let Ok(accept) = HeaderValue::from_str(&derive_accept_key(key)) {
        headers.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
    }
    if let Some(chosen) = subprotocol.and_then(|p| HeaderValue::from_str(&p).ok()) {
        headers.insert(header::SEC_WEBSOCKET_PROTOCOL, chosen);
    }
    let upgrade = session::Upgrade { on: hyper::upgrade::on(&mut req), config: snap.ws_config() };
    let ctx = session::Context {
        id: shared.next_session.fetch_add(1, Ordering::Relaxed),
        route,
        client_addr: conn.peer,
        max_message_bytes: snap.limits.max_message_bytes,
        backend_read_bytes: snap.limits.backend_read_bytes,
        client_batch_bytes: snap.limits.ws_read_buffer_bytes,
        close_timeout: snap.limits.close_timeout,
        close_window: snap.shutdown.close_window,
        metrics: m.clone(),
    };
    let slot = conn.slot.clone();
    let (stop, abort) = (shared.stop.clone(), shared.abort.clone());
    // `map`, not `async move { session.await; .. }`: an async block that awaits a future it
    // captured stores it twice, and a session's future is most of what an idle session costs.
    let session = session::run(upgrade, dialed, ctx, stop, abort).map(move |()| drop(slot));
    shared.tasks.spawn(session);
    (Some(m), response)
}

/// `None` when `req` is a WebSocket upgrade we can accept; otherwise the response RFC 6455 (and
/// RFC 9110) prescribe for what is wrong with it.
fn upgrade_refusal(req: &Request<Incoming>) -> Option<Response<Full<Bytes>>> {
    if !is_upgrade(req) {
        if req.method() == Method::GET || req.method() == Method::HEAD {
            let mut r =
                text(StatusCode::UPGRADE_REQUIRED, "this is a WebSocket endpoint: connect with a WebSocket client");
            r.headers_mut().insert(header::UPGRADE, HeaderValue::from_static("websocket"));
            r.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("Upgrade, close"));
            return Some(r);
        }
        return Some(method_not_allowed());
    }
    if req.method() != Method::GET {
        return Some(method_not_allowed());
    }
    if req.version() != Version::HTTP_11 {
        return Some(text(StatusCode::BAD_REQUEST, "a WebSocket upgrade needs HTTP/1.1"));
    }
    if !header_has_token(req, header::CONNECTION, "upgrade") {
        return Some(text(StatusCode::BAD_REQUEST, "a WebSocket upgrade needs \"Connection: Upgrade\""));
    }
    let version = req.headers().get(header::SEC_WEBSOCKET_VERSION).map(HeaderValue::as_bytes);
    if version != Some(b"13") {
        let mut r = text(StatusCode::UPGRADE_REQUIRED, "unsupported Sec-WebSocket-Version: only 13 is supported");
        r.headers_mut().insert(header::SEC_WEBSOCKET_VERSION, HeaderValue::from_static("13"));
        return Some(r);
    }
    let key_ok = req
        .headers()
        .get(header::SEC_WEBSOCKET_KEY)
        .and_then(|k| base64::engine::general_purpose::STANDARD.decode(k.as_bytes()).ok())
        .is_some_and(|k| k.len() == 16);
    if !key_ok {
        return Some(text(StatusCode::BAD_REQUEST, "missing or malformed Sec-WebSocket-Key"));
    }
    None
}

/// Whether the request asks for a WebSocket upgrade at all (`Upgrade: websocket`); whether it
/// asks well is `upgrade_refusal`'s question.
fn is_upgrade<B>(req: &Request<B>) -> bool {
    header_has_token(req, header::UPGRADE, "websocket")
}

fn header_has_token<B>(req: &Request<B>, name: header::HeaderName, token: &str) -> bool {
    req.headers()
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

fn method_not_allowed() -> Response<Full<Bytes>> {
    let mut r = text(StatusCode::METHOD_NOT_ALLOWED, "a WebSocket upgrade must use GET");
    r.headers_mut().insert(header::ALLOW, HeaderValue::from_static("GET"));
    r
}

fn text(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(format!("{body}\n"))));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    r.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
    r
}
