//! The client-facing listener: a connection from its accept (`accept`: limits, its client, its
//! handshake place) through TLS and HTTP/1.1 to the answer to its request.
//!
//! Per request, in order ([`upgrade`]): match a route (`router`, 404), admit the request
//! (`policy::admit`: a well-formed upgrade, origin, subprotocol), dial the backend
//! (`session::dial`), and only then answer 101 and run the session, in the connection's task.
//! Dialling first means a client never sees `onopen` for a backend that is not there; how it
//! learns of a dead backend instead is the route's choice (an in-band 1013 close, or HTTP
//! 502/503/504). Every refusal is a `policy::Refusal`, answered, logged and counted in
//! [`respond`].
//!
//! Each connection works under the [`Snapshot`] (routes, limits, certificates) current when it
//! was accepted; a reload swaps the snapshot whole, so new connections see the new config and
//! existing sessions keep theirs.
//!
//! Limits (`admission`) are values held by the task they limit: a connection's place under
//! `max_connections` and its client's count live as long as the client socket (through the
//! session); its place in the handshake pool and its client's handshake share until the request
//! is answered or the backend dial begins; a route's session place as long as the session.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use bytes::Bytes;
use futures_util::FutureExt;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, warn};
use tungstenite::handshake::derive_accept_key;

mod accept;
mod access;
mod shared;

use accept::Slot;
pub(crate) use accept::{Listener, Tuning, accept_bounded, accept_loop};
use access::{authenticate, find_target, refuse_in_band};
pub(crate) use shared::{Page, Shared, Snapshot};

use crate::admission::{ClientKey, LoadGuard, Over, Place, Shed};
use crate::backend::{self, ConnectFailure, DialRequest, Hold};
use crate::client_addr;
use crate::client_cert::ClientCert;
use crate::client_stream::{ClientIo, ClientStream};
use crate::config::{Addressing, Unavailable};
use crate::metrics::ListenerMetrics;
use crate::policy::{self, Refusal, RefusalKind};
use crate::proxy_protocol;
use crate::readahead::ReadAhead;
use crate::router::Entry;
use crate::session::{self, Dialed};
use crate::throttle::Throttle;
use crate::tls_stream::TlsStream;

/// A client connection, as requests on it see it.
struct Connection {
    /// The client's address: the TCP peer's, or the one its PROXY header carried.
    peer: SocketAddr,
    /// The address the client connected to: the listener's, or the one its PROXY header
    /// carried (the balancer's). What a backend's PROXY header names as the destination, and
    /// read (a system call) only when a route of its snapshot sends one.
    local: Option<SocketAddr>,
    /// Its listener's trusted proxies and forwarded header, as accepted.
    addressing: Arc<Addressing>,
    secure: bool,
    /// Held by the connection task and by the session it upgrades to; the socket counts against
    /// `max_connections` and its client's connections until both are done.
    slot: Arc<Slot>,
    /// Why every request on it is answered 429, if it is: its client is over its rate.
    over: Option<Over>,
    /// Its place in the handshake pool, until the request is admitted.
    handshake: Mutex<Option<Place>>,
    /// The config this connection was accepted under.
    snapshot: Arc<Snapshot>,
    /// The client certificate its TLS handshake verified (mTLS), read once; boxed, so a
    /// connection without one pays a pointer.
    client_cert: OnceLock<Box<ClientCert>>,
    /// The session its request was answered 101 for, left by [`upgrade`] (or the in-band
    /// refusal) for the connection's task to run once hyper has written the 101.
    pending: Mutex<Option<PendingSession>>,
}

/// A session answered 101 (admitted and dialled, or refused in band), waiting for hyper to hand
/// over the upgraded connection.
///
/// It runs in the task that served the handshake, not a task of its own: a spawn per session
/// was a task to schedule, a move of the session's future and, often, a wake of the other
/// worker.
struct PendingSession {
    pending: hyper::upgrade::OnUpgrade,
    dialed: Dialed,
    ctx: session::Context,
    /// Its place on its route (and pool member), when it has a backend.
    place: Option<(LoadGuard, Option<Hold>)>,
}

impl Connection {
    fn new(
        peer: SocketAddr,
        local: Option<SocketAddr>,
        addressing: Arc<Addressing>,
        secure: bool,
        slot: Slot,
        over: Option<Over>,
        snapshot: Arc<Snapshot>,
    ) -> Connection {
        Connection {
            peer,
            local,
            addressing,
            secure,
            slot: Arc::new(slot),
            over,
            handshake: Mutex::new(None),
            snapshot,
            client_cert: OnceLock::new(),
            pending: Mutex::new(None),
        }
    }

    /// Leaves the session its request was answered 101 for, for the connection's task to run.
    fn leave_session(&self, session: PendingSession) {
        *self.pending.lock().unwrap_or_else(|p| p.into_inner()) = Some(session);
    }

    /// Takes the session the connection was upgraded to, if it was, ready to run. Made here,
    /// under the connection's span, so that the session's span is its child.
    fn take_session(&self, shared: &Shared) -> Option<impl Future<Output = ()> + Send + use<>> {
        let PendingSession { pending, dialed, ctx, place } =
            self.pending.lock().unwrap_or_else(|p| p.into_inner()).take()?;
        let slot = self.slot.clone();
        let (stop, abort) = (shared.stop.clone(), shared.abort.clone());
        // `map`, not `async move { session.await; .. }`: an async block that awaits a future it
        // captured stores it twice, and a session's future is most of what an idle session costs.
        // Boxed where it is made: on its way into the task it is moved several times, each a
        // copy of all of it into memory not yet in cache, where a box moves as a pointer.
        Some(Box::pin(session::run(pending, dialed, ctx, stop, abort).map(move |()| drop((slot, place)))))
    }

    /// Leaves the handshake pool and the client's handshake share: the request has been read
    /// and admitted, and what follows (the dial) is bounded per route instead.
    fn finish_handshake(&self) {
        *self.handshake.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// Whether it still holds its place in the handshake pool (its request not yet admitted).
    fn in_handshake(&self) -> bool {
        self.handshake.lock().unwrap_or_else(|p| p.into_inner()).is_some()
    }

    /// Records progress in the handshake (see `admission::Pool`).
    fn progressed(&self) {
        if let Some(place) = &*self.handshake.lock().unwrap_or_else(|p| p.into_inner()) {
            place.progressed();
        }
    }
}

/// Serves one accepted connection of `client`: its place in the handshake pool (waited for if
/// need be), TLS, then HTTP, until it is answered, upgraded, or shed from the pool.
///
/// The connection asks for its place here, when its task first runs, not at accept: under a
/// flood the accept loop takes connections far faster than their tasks run, and a place taken
/// at accept would age in the run queue, where a real client's could come due to be shed
/// before its request, already waiting in the socket, was ever read.
///
/// `deadline` is the handshake's, when it began before this (with a PROXY header); otherwise
/// the handshake begins now. It bounds the wait for a place too.
///
/// Returns the session the connection was upgraded to, for the caller to run.
async fn handle_connection(
    tcp: TcpStream,
    tls: Option<TlsAcceptor>,
    mut conn: Connection,
    client: ClientKey,
    metrics: ListenerMetrics,
    shared: Arc<Shared>,
    deadline: Option<tokio::time::Instant>,
) -> Option<impl Future<Output = ()> + Send + 'static> {
    let limits = conn.snapshot.limits.clone();
    // One deadline for the whole handshake, waiting and TLS included, so a wss client gets no
    // more time than a ws one; within it, a shorter one for the request head once TLS is done.
    let timeout = limits.handshake_timeout;
    let deadline = deadline.unwrap_or_else(|| tokio::time::Instant::now() + timeout);
    let share = limits.per_client.max_handshakes;
    let Some(place) = shared.admission.pool.enter(client, share, deadline).await else {
        metrics.handshake_wait_timeout.increment(1);
        debug!(?timeout, "no place in the handshake pool within limits.handshake_timeout_secs; closing");
        return None;
    };
    let shed = place.token();
    *conn.handshake.get_mut().unwrap_or_else(|p| p.into_inner()) = Some(place);
    let head_timeout = limits.request_head_timeout;
    let conn = Arc::new(conn);
    // Reads from the client go through `ReadAhead` (below hyper, so the WebSocket upgraded from
    // this connection reads through it too): large reads while data flows, no buffer when idle.
    let chunk = limits.session.client_read_bytes;
    let serve = async {
        let stream = match tls {
            None => ClientStream::Tcp(tcp),
            Some(acceptor) => match tokio::time::timeout_at(deadline, tls_handshake(acceptor, tcp, &conn)).await {
                Ok(Ok(stream)) => {
                    match stream.connection().handshake_kind() {
                        Some(rustls::HandshakeKind::Resumed) => metrics.tls_resumed.increment(1),
                        _ => metrics.tls_full.increment(1),
                    }
                    ClientStream::Tls(Box::new(stream))
                }
                Ok(Err(e)) => {
                    metrics.tls_failed.increment(1);
                    debug!(error = %e, "tls handshake failed");
                    return;
                }
                Err(_) => {
                    metrics.tls_timeout.increment(1);
                    debug!(?timeout, "tls handshake timed out (limits.handshake_timeout_secs)");
                    return;
                }
            },
        };
        let head_deadline = deadline.min(tokio::time::Instant::now() + head_timeout);
        if serve_http(ReadAhead::new(stream, chunk), conn.clone(), head_deadline, shared.clone()).await {
            metrics.request_timeout.increment(1);
        }
    };
    tokio::pin!(serve);
    tokio::select! {
        _ = &mut serve => {}
        _ = shed.cancelled() => {
            if conn.in_handshake() {
                metrics.handshake_shed.increment(1);
                debug!("handshake pool full: shed this connection, which held its place past limits.handshake_shed_after_secs, for one waiting");
            } else {
                // The pool shed it after this task, not yet aware, had admitted its request
                // (`select!` polls in random order): its place is the waiter's already, dropping
                // it now would free nothing, and what it does next (a dial, an answer) is
                // bounded per route.
                serve.await;
            }
        }
    }
    conn.take_session(&shared)
}

/// The TLS handshake; once the ClientHello has arrived whole the connection has shown progress,
/// and the pool sheds it only after those that have not. A client certificate it verified is
/// read into the connection for the routes to check.
async fn tls_handshake(acceptor: TlsAcceptor, tcp: TcpStream, conn: &Connection) -> std::io::Result<TlsStream> {
    let stream = crate::tls_stream::accept(acceptor.config().clone(), tcp, || conn.progressed()).await?;
    let cert = stream.connection().peer_certificates().and_then(|chain| chain.first());
    if let Some(cert) = cert.and_then(|cert| ClientCert::from_der(cert)) {
        let _ = conn.client_cert.set(Box::new(cert));
    }
    Ok(stream)
}

/// Serves one HTTP/1.1 request on `io`: the upgrade, or a refusal (or the console page), after
/// which the connection closes (every non-101 response says `Connection: close`). A WebSocket
/// gateway has nothing to serve on a second request, and one request per connection means the
/// handshake permit bounds sockets that have not upgraded, whatever the client does. (hyper's
/// `keep_alive(false)` cannot be used: it would also put `close` on the 101.)
///
/// It takes a [`ClientIo`], the one type the session takes back from hyper after the upgrade.
/// Returns whether the request head failed to arrive whole by `deadline` (the connection is
/// then closed without an answer).
async fn serve_http(io: ClientIo, conn: Arc<Connection>, deadline: tokio::time::Instant, shared: Arc<Shared>) -> bool {
    let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
    if remaining.is_zero() {
        debug!("no time left for the request head (limits.handshake_timeout_secs); closing");
        return true;
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
        result = http.as_mut() => match result {
            Err(e) if e.is_timeout() => {
                debug!(?remaining, "request head incomplete at its deadline (limits.request_head_timeout_secs or handshake_timeout_secs); closing");
                return true;
            }
            Err(e) => debug!(error = %e, "http connection ended with an error"),
            Ok(()) => {}
        },
        _ = shared.stop.cancelled() => {
            // Finish the request in progress, if any, then close.
            http.as_mut().graceful_shutdown();
            let _ = http.await;
        }
    }
    false
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
        // Warnings an operator wants, throttled per route and kind (a flood would write one per
        // request); every refusal is still counted below, and logged at debug.
        let throttle = entry.as_ref().and_then(|e| match refusal.kind {
            RefusalKind::Origin => Some(&e.metrics.origin_warnings),
            RefusalKind::Subprotocol => Some(&e.metrics.subprotocol_warnings),
            RefusalKind::Access(_) => Some(&e.metrics.access_warnings),
            RefusalKind::Target(_) => Some(&e.metrics.target_warnings),
            _ => None,
        });
        if let (Some(entry), RefusalKind::Access(denied)) = (&entry, refusal.kind) {
            entry.metrics.access_denied(denied.label());
        }
        if let (Some(entry), RefusalKind::Target(refused)) = (&entry, refusal.kind) {
            entry.metrics.target_refused(refused.label());
        }
        match throttle.and_then(Throttle::allow) {
            Some(suppressed) => warn!(route, status, %reason, suppressed, "request refused"),
            None => debug!(route, status, %reason, "request refused"),
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
    if let Some(over) = conn.over {
        return (None, Err(Refusal::client_over(over, Instant::now())));
    }
    if let Some(page) = page(&req, snap) {
        return (None, Ok(page));
    }
    let host = match policy::host(req.uri(), req.headers()) {
        Ok(host) => host.to_owned(),
        Err(e) => return (None, Err(e.into())),
    };
    let Some(entry) = snap.router.find(Some(&host), req.uri().path()).cloned() else {
        return (None, Err(Refusal::no_route()));
    };
    let answer = upgrade(&mut req, Some(&host), &entry, conn, shared).await;
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

/// Admit, dial, answer 101, and leave the session for the connection's task.
async fn upgrade(
    req: &mut Request<Incoming>,
    host: Option<&str>,
    entry: &Arc<Entry>,
    conn: &Connection,
    shared: &Shared,
) -> Result<Response<Full<Bytes>>, Refusal> {
    // The address the route's client rules, the session log and PROXY protocol out see.
    let client = client_addr::client(conn.peer, req.headers(), &conn.addressing).ok_or_else(Refusal::unknown_client)?;
    let parts = policy::Request {
        method: req.method(),
        version: req.version(),
        headers: req.headers(),
        host,
        secure: conn.secure,
        peer: client,
        client_cert: conn.client_cert.get().map(|c| &**c),
    };
    let mut admitted = match policy::admit(parts, &entry.route) {
        Ok(admitted) => admitted,
        // The client address and certificate rules refuse before the upgrade is checked; an
        // upgrade that would otherwise complete can still be refused in band.
        Err(refusal @ Refusal { kind: RefusalKind::Access(_), .. }) => match policy::upgradable(parts, &entry.route) {
            Ok(subprotocol) => return refuse_in_band(req, entry, conn, shared, client, subprotocol, refusal),
            Err(_) => return Err(refusal),
        },
        Err(refusal) => return Err(refusal),
    };
    let credentials_expire = match authenticate(req, parts, entry, conn, shared).await {
        Ok(who) => {
            admitted.identity.user = who.user;
            who.expires
        }
        Err(refusal) => return refuse_in_band(req, entry, conn, shared, client, admitted.subprotocol, refusal),
    };
    let target = find_target(req, entry, conn, shared, client.ip())?;
    conn.finish_handshake();
    // Built from the identity as admission settled it, and sent before any other byte.
    let preamble = entry
        .route
        .proxy_protocol
        .map(|version| {
            // Always read: this route is in the snapshot the connection was accepted under.
            let local = conn.local.unwrap_or(client);
            proxy_protocol::header(version, client, local, &admitted.identity, conn.secure)
        })
        .unwrap_or_default();
    let dial = DialRequest { client, path: req.uri().path(), query: req.uri().query(), target: target.as_ref() };
    let (place, dialed) = match start(entry, conn, shared, &dial, &preamble).await {
        Ok((place, dialed)) => (Some(place), dialed),
        Err(not) => {
            // A target outside the allow-list is refused, whatever the route says of backends
            // that are down: it is the request that is wrong.
            if let NotStarted::Failed(ConnectFailure::NotAllowed) = not {
                return Err(Refusal::target(backend::Refused::NotAllowed));
            }
            if let NotStarted::Shed(shed) = not {
                entry.metrics.shed(shed.label());
                debug!(route = %entry.route.name, reason = %shed.reason(), "session shed");
            }
            match (entry.route.on_backend_unavailable, not) {
                (Unavailable::Http, NotStarted::Shed(shed)) => return Err(Refusal::shed(shed)),
                (Unavailable::Http, NotStarted::Failed(failure)) => return Err(Refusal::backend_unavailable(failure)),
                (Unavailable::Close, NotStarted::Shed(shed)) => (None, Dialed::Shed(shed)),
                (Unavailable::Close, NotStarted::Failed(failure)) => (None, Dialed::Unavailable(failure)),
            }
        }
    };
    // The key's form was checked by `admit`.
    let key = req.headers().get(header::SEC_WEBSOCKET_KEY).map(HeaderValue::as_bytes).unwrap_or_default();
    let mut response = switching_protocols(key, admitted.subprotocol.as_deref());
    // Only the bridge speaks it: the built-in echo and closes at once do not.
    let control =
        entry.route.half_close && matches!(dialed, Dialed::Backend(_)) && agree_control(req.headers(), &mut response);
    if let (Some(user), Some(true)) = (&admitted.identity.user, entry.route.auth.as_ref().map(|a| a.user_label)) {
        entry.metrics.user_session(user);
    }
    let ctx = session::Context {
        id: shared.next_session.fetch_add(1, Ordering::Relaxed),
        entry: entry.clone(),
        client_addr: client,
        identity: admitted.identity,
        close_window: conn.snapshot.shutdown.close_window,
        credentials_expire,
        control,
    };
    conn.leave_session(PendingSession { pending: hyper::upgrade::on(req), dialed, ctx, place });
    Ok(response)
}

/// Why an admitted request gets no session.
enum NotStarted {
    /// A bound of the route or the gateway.
    Shed(Shed),
    /// The backend could not be reached.
    Failed(ConnectFailure),
}

/// The bounds a session starts under, then the dial (for `req`, with `preamble`, the route's
/// PROXY header, written first): the session's place on its route (and on its pool member)
/// and its backend, or why not. The
/// route's cap on connects in progress is held only while dialling.
async fn start(
    entry: &Entry,
    conn: &Connection,
    shared: &Shared,
    req: &DialRequest<'_>,
    preamble: &[u8],
) -> Result<((LoadGuard, Option<Hold>), Dialed), NotStarted> {
    let place = entry.load.session(entry.limits.max_sessions).map_err(NotStarted::Shed)?;
    if shared.admission.memory.is_over(conn.snapshot.limits.max_memory) {
        return Err(NotStarted::Shed(Shed::Memory));
    }
    // Waiting for a place counts towards no deadline of the dial's own: a storm's requests wait
    // their turn rather than fail, and one that waits the whole connect timeout is shed.
    let connecting = entry
        .load
        .connect(entry.limits.max_pending_connects, entry.limits.connect_timeout)
        .await
        .map_err(NotStarted::Shed)?;
    let (dialed, member) = session::dial(entry, req, preamble).await.map_err(|e| NotStarted::Failed(e.failure()))?;
    drop(connecting);
    Ok(((place, member), dialed))
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

/// Agrees to the wsgate control channel (`crate::control`) in the 101 when the request asks for
/// a version this build speaks; returns whether it did.
fn agree_control(request: &hyper::HeaderMap, response: &mut Response<Full<Bytes>>) -> bool {
    let asked = request.get(crate::control::HEADER).is_some_and(|v| crate::control::is_requested(v.as_bytes()));
    if asked {
        response.headers_mut().insert(crate::control::HEADER, HeaderValue::from_static(crate::control::VERSION));
    }
    asked
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
