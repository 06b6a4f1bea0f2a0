//! The client-facing listener: accept loop, connection and handshake limits, TLS, HTTP/1.1, and
//! the answer to each request.
//!
//! Per request, in order ([`upgrade`]): match a route (`router`, 404), admit the request
//! (`policy::admit`: a well-formed upgrade, origin, subprotocol), dial the backend
//! (`session::dial`), and only then answer 101 and spawn the session. Dialling first means a
//! client never sees `onopen` for a backend that is not there; how it learns of a dead backend
//! instead is the route's choice (an in-band 1013 close, or HTTP 502/503/504). Every refusal is a
//! `policy::Refusal`, answered, logged and counted in [`respond`].
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

use bytes::Bytes;
use futures_util::FutureExt;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info_span, warn};
use tungstenite::handshake::derive_accept_key;

use crate::backend;
use crate::client_stream::{ClientIo, ClientStream};
use crate::config::{Limits, Unavailable};
use crate::metrics::{ListenerMetrics, Metrics};
use crate::policy::{self, Refusal};
use crate::readahead::ReadAhead;
use crate::router::{Entry, Router};
use crate::session::{self, Dialed};

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

/// The next connection on one of the side services' listeners (admin, built-in TCP echo), with
/// its place under `slots`; `None` once `stop` is cancelled. Accept errors are logged and
/// retried after a pause; a connection over the limit is closed at once, with a warning.
pub(crate) async fn accept_bounded(
    listener: &TcpListener,
    slots: &Arc<Semaphore>,
    stop: &CancellationToken,
    service: &str,
) -> Option<(TcpStream, SocketAddr, OwnedSemaphorePermit)> {
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => return None,
            accepted = listener.accept() => accepted,
        };
        let (tcp, peer) = match accepted {
            Ok(pair) => pair,
            Err(e) => {
                warn!(error = %e, "{service}: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        match slots.clone().try_acquire_owned() {
            Ok(slot) => return Some((tcp, peer, slot)),
            Err(_) => warn!(client.addr = %peer, "{service}: connection limit reached; closing"),
        }
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
    backend::tune(&tcp, conn.snapshot.limits.tcp_keepalive, conn.snapshot.limits.tcp_user_timeout);
    // One deadline for the whole handshake, TLS included, so a wss client gets no more time
    // than a ws one.
    let timeout = conn.snapshot.limits.handshake_timeout;
    let deadline = tokio::time::Instant::now() + timeout;
    let conn = Arc::new(conn);
    // Reads from the client go through `ReadAhead` (below hyper, so the WebSocket upgraded from
    // this connection reads through it too): large reads while data flows, no buffer when idle.
    let chunk = conn.snapshot.limits.ws_read_buffer_bytes;
    match tls {
        None => serve_http(ReadAhead::new(ClientStream::Tcp(tcp), chunk), conn, deadline, shared).await,
        Some(acceptor) => match tokio::time::timeout_at(deadline, acceptor.accept(tcp)).await {
            Ok(Ok(stream)) => {
                let io = ReadAhead::new(ClientStream::Tls(Box::new(stream)), chunk);
                serve_http(io, conn, deadline, shared).await
            }
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
///
/// It takes a [`ClientIo`], the one type the session takes back from hyper after the upgrade.
async fn serve_http(io: ClientIo, conn: Arc<Connection>, deadline: tokio::time::Instant, shared: Arc<Shared>) {
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

/// Answers one request; logs a refusal and counts every answer by route and status.
async fn respond(
    req: Request<Incoming>,
    conn: Arc<Connection>,
    shared: Arc<Shared>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let (entry, answer) = answer(req, &conn, &shared).await;
    let route = entry.as_ref().map(|e| e.route.name.as_str());
    let response = answer.unwrap_or_else(|refusal| {
        let (status, reason) = (refusal.status.as_u16(), &refusal.reason);
        match refusal.is_notable {
            true => warn!(route, status, %reason, "request refused"),
            false => debug!(route, status, %reason, "request refused"),
        }
        refused(refusal)
    });
    match entry {
        Some(entry) => entry.metrics.handshake(response.status().as_u16()),
        None => shared.metrics.unrouted_request(response.status().as_u16()),
    }
    Ok(response)
}

/// The page, the upgrade, or why not; with the route the request matched, if any.
async fn answer(
    mut req: Request<Incoming>,
    conn: &Connection,
    shared: &Shared,
) -> (Option<Arc<Entry>>, Result<Response<Full<Bytes>>, Refusal>) {
    let snap = &conn.snapshot;
    if let Some(page) = page(&req, snap) {
        return (None, Ok(page));
    }
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .or_else(|| req.uri().authority().map(|a| a.as_str().to_owned()));
    let Some(entry) = snap.router.find(host.as_deref(), req.uri().path()).cloned() else {
        return (None, Err(Refusal::no_route(req.uri().path())));
    };
    let answer = upgrade(&mut req, host.as_deref(), &entry, conn, shared).await;
    (Some(entry), answer)
}

/// The console page, for a plain GET or HEAD on its path.
fn page<B>(req: &Request<B>, snap: &Snapshot) -> Option<Response<Full<Bytes>>> {
    if (req.method() != Method::GET && req.method() != Method::HEAD) || policy::is_upgrade(req.headers()) {
        return None;
    }
    let page = snap.pages.iter().find(|p| p.path == req.uri().path())?;
    let mut page = (page.render)();
    page.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
    Some(page)
}

/// Admit, dial, answer 101, spawn the session.
async fn upgrade(
    req: &mut Request<Incoming>,
    host: Option<&str>,
    entry: &Arc<Entry>,
    conn: &Connection,
    shared: &Shared,
) -> Result<Response<Full<Bytes>>, Refusal> {
    let parts = policy::Request {
        method: req.method(),
        version: req.version(),
        headers: req.headers(),
        host,
        secure: conn.secure,
        peer: conn.peer,
    };
    let admitted = policy::admit(parts, &entry.route)?;
    let dialed = match session::dial(entry).await {
        Ok(dialed) => dialed,
        Err(e) if entry.route.on_backend_unavailable == Unavailable::Http => {
            return Err(Refusal::backend_unavailable(e.failure()));
        }
        Err(e) => Dialed::Unavailable(e.failure()),
    };
    // The key's form was checked by `admit`.
    let key = req.headers().get(header::SEC_WEBSOCKET_KEY).map(HeaderValue::as_bytes).unwrap_or_default();
    let response = switching_protocols(key, admitted.subprotocol.as_deref());
    let ctx = session::Context {
        id: shared.next_session.fetch_add(1, Ordering::Relaxed),
        entry: entry.clone(),
        client_addr: conn.peer,
        close_window: conn.snapshot.shutdown.close_window,
    };
    let slot = conn.slot.clone();
    let (stop, abort) = (shared.stop.clone(), shared.abort.clone());
    let upgrading = hyper::upgrade::on(req);
    // `map`, not `async move { session.await; .. }`: an async block that awaits a future it
    // captured stores it twice, and a session's future is most of what an idle session costs.
    let session = session::run(upgrading, dialed, ctx, stop, abort).map(move |()| drop(slot));
    shared.tasks.spawn(session);
    Ok(response)
}

/// The 101 that completes a WebSocket handshake.
fn switching_protocols(key: &[u8], subprotocol: Option<&str>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = response.headers_mut();
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    if let Ok(accept) = HeaderValue::from_str(&derive_accept_key(key)) {
        headers.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
    }
    if let Some(chosen) = subprotocol.and_then(|p| HeaderValue::from_str(p).ok()) {
        headers.insert(header::SEC_WEBSOCKET_PROTOCOL, chosen);
    }
    response
}

/// A refusal as the client sees it: its status, its reason as a line of text, its headers, and
/// `Connection: close` unless it names its own.
fn refused(refusal: Refusal) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(format!("{}\n", refusal.reason))));
    *r.status_mut() = refusal.status;
    let headers = r.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
    for (name, value) in refusal.headers {
        headers.insert(name, value);
    }
    r
}
