//! One upgraded WebSocket session: runs the pump for its route, decides how it ended, sends the
//! one close frame that says so, and writes the session's log line.
//!
//! The server has already dialled the backend ([`dial`]) before answering the upgrade (so
//! `onopen` means the backend is there); the session receives the result as [`Dialed`]. It is
//! the only place that sees both sides, so it alone maps an ending to a close code:
//! [`Outcome::close_frame`] (in `close`, with the closing handshake) is that mapping, and
//! `docs/close-codes.md` mirrors it row for row.
//!
//! A session ends exactly once. Whichever side ends first decides the [`Outcome`]; the pump stops
//! the other direction; the close frame is sent once; both sockets are released when `run`
//! returns.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper::upgrade::OnUpgrade;
use hyper_tungstenite::WebSocketStream;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, Span, debug, error, field, info, info_span, warn};
use tungstenite::protocol::{Role, WebSocketConfig};

use crate::admission::Shed;
use crate::backend::{BackendConn, BackendError, ConnectFailure, DialRequest, Hold};
use crate::bridge::{self, Accept, BridgeMetrics, Framing, Liveness, SessionTotals};
use crate::client_stream;
use crate::config::Outbound;
use crate::echo;
use crate::frames::{ClientWs, FrameGate};
use crate::metrics::RouteMetrics;
use crate::policy::{Denied, Identity};
use crate::router::{Entry, SessionLimits, Target};
use crate::shutdown::Cancelled;

mod close;

pub use close::{ClientFault, IoFailure, Outcome, Side, truncate_reason};
use close::{close_client, close_code};

/// The backend side of a session, as the server found it before upgrading.
#[derive(Debug)]
pub enum Dialed {
    /// A connected backend: TCP or a Unix socket, either under TLS.
    Backend(BackendConn),
    /// The built-in echo: nothing to dial.
    Echo,
    /// The backend could not be reached; the session closes at once with 1013.
    Unavailable(ConnectFailure),
    /// The route or the gateway was at a bound; the session closes at once with 1013.
    Shed(Shed),
    /// The access policy refused the client (`on_refusal = "close"`); the session closes at
    /// once with 4401, 4403 or 4429 and the reason.
    Refused(Denied, String),
}

/// What a session needs besides its sockets.
#[derive(Debug, Clone)]
pub struct Context {
    /// Unique within this gateway instance.
    pub id: u64,
    /// The matched route, with its limits and metrics.
    pub entry: Arc<Entry>,
    /// The client's address.
    pub client_addr: SocketAddr,
    /// Who the client proved to be (`policy::admit`).
    pub identity: Identity,
    /// On shutdown, sessions close at a point spread over this window (by session id), so
    /// thousands of clients do not reconnect in the same second.
    pub close_window: Duration,
    /// When the client's credentials expire (a JWT's `exp` plus grace, with `close_at_expiry`):
    /// the session then closes with 4401.
    pub credentials_expire: Option<Instant>,
    /// The client asked for the wsgate control channel and the 101 agreed (`crate::control`).
    pub control: bool,
}

/// Connects the route's backend and writes `preamble` (the route's PROXY protocol header, or
/// nothing) on the raw socket before the bridge ever sees it; the server calls this before it
/// answers the upgrade, so `onopen` means the backend is there. A pool member comes with its
/// [`Hold`], to be kept for the session's life. Records the connect time or the failure (metric, and a
/// warning with the address, at most one per route per `throttle::WARN_INTERVAL`); what the
/// client sees of a failure is the caller's choice.
pub async fn dial(
    entry: &Entry,
    req: &DialRequest<'_>,
    preamble: &[u8],
) -> Result<(Dialed, Option<Hold>), BackendError> {
    let Target::Backend(dialer) = &entry.target else { return Ok((Dialed::Echo, None)) };
    let started = Instant::now();
    match dialer.connect(req, preamble).await {
        Ok((conn, hold)) => {
            entry.metrics.connect_duration.record(started.elapsed().as_secs_f64());
            Ok((Dialed::Backend(conn), hold))
        }
        // Not a backend failure: the server refuses the request, and counts and logs that.
        Err(e) if e.failure() == ConnectFailure::NotAllowed => {
            debug!(route = %entry.route.name, error = %e, "token-mapped target refused");
            Err(e)
        }
        Err(e) => {
            entry.metrics.connect_failed(e.failure().label());
            // Every client retry during an outage would add a line: one per interval says it,
            // with how many were left out; the metric counts each.
            match entry.metrics.connect_warnings.allow() {
                Some(suppressed) => warn!(route = %entry.route.name, error = %e, suppressed, "backend unavailable"),
                None => debug!(route = %entry.route.name, error = %e, "backend unavailable"),
            }
            Err(e)
        }
    }
}

/// The client's WebSocket buffers and size limits under `limits`. `echo`: whether tungstenite
/// writes the route's messages (the built-in echo) rather than only control frames.
fn ws_config(limits: &SessionLimits, echo: bool) -> WebSocketConfig {
    let max = limits.max_message_bytes;
    WebSocketConfig::default()
        // Allocated for every session, idle or not; large reads go through `ReadAhead`'s
        // buffer, which exists only while data flows.
        .read_buffer_size(WS_READ_BUFFER_BYTES)
        // Write each message at once: the pumps wait for it to reach the socket before reading
        // more, which is what gives backpressure, so a write buffer would only add a copy.
        .write_buffer_size(0)
        // What may wait for a client that does not read. tungstenite refuses any frame that
        // would take the buffer past this bound, so it must hold the largest frame sent. On a TCP
        // route that is a control frame (the bridge's data frames do not pass through
        // tungstenite: `frames`): a pong that does not fit waits outside the buffer, where a
        // newer ping's pong replaces it (RFC 6455 §5.5.3), so a client that pings and never
        // reads costs no more than this. The echo sends the echoed message through it.
        .max_write_buffer_size(if echo { max + 64 * 1024 } else { CONTROL_WRITE_BUFFER_BYTES })
        .max_message_size(Some(max))
        .max_frame_size(Some(max))
}

/// tungstenite's own read buffer: small, because every session holds it for its whole life.
/// It also caps each read tungstenite makes, which is why `ReadAhead` reads for it while busy.
const WS_READ_BUFFER_BYTES: usize = 2048;

/// The write buffer of a session whose data frames go past tungstenite: two control frames
/// (a close frame and a pong), each at most 2 bytes of header, a 4-byte mask key and 125 bytes.
const CONTROL_WRITE_BUFFER_BYTES: usize = 2 * 131;

/// One session from the pending upgrade to the last byte, or until `abort` (the shutdown
/// deadline) drops it; run by its connection's task once the handshake is done.
///
/// Its span is created now, as a child of the caller's (the connection's). It is entered around
/// what the session logs (an upgrade that fails, its close, its end line), not for the relay,
/// which is polled on every message and logs nothing (docs/performance.md, item 15); what
/// tungstenite logs at debug level meanwhile carries no session fields.
pub fn run(
    upgrade: OnUpgrade,
    dialed: Dialed,
    ctx: Context,
    stop: CancellationToken,
    abort: CancellationToken,
) -> impl Future<Output = ()> + Send {
    // Given at creation: recording a field afterwards is a second trip through the subscriber.
    let backend_addr = match &dialed {
        Dialed::Backend(conn) => conn.peer(),
        _ => None,
    };
    let span = info_span!(
        "session",
        id = ctx.id,
        route = %ctx.entry.route.name,
        backend.addr = backend_addr.map(field::display),
    );
    // What the session owns is captured here once and lent to `run_inner`: whatever a future
    // takes by value it keeps for its whole life, and an `async fn` keeps each such argument twice.
    // The backend too, until the relay takes it.
    let mut dialed = Some(dialed);
    async move {
        tokio::select! {
            biased;
            _ = Cancelled::new(&abort) => span.in_scope(|| warn!("session dropped at the shutdown deadline")),
            _ = run_inner(upgrade, &mut dialed, &ctx, &stop, &span) => {}
        }
    }
}

/// The session, from the upgrade to its log line.
#[allow(clippy::manual_async_fn)] // An `async fn` would hold its arguments twice.
fn run_inner<'a>(
    upgrade: OnUpgrade,
    dialed: &'a mut Option<Dialed>,
    ctx: &'a Context,
    stop: &'a CancellationToken,
    span: &'a Span,
) -> impl Future<Output = ()> + Send + 'a {
    async move {
        let started = Instant::now();
        let limits = &ctx.entry.limits;
        let is_echo = matches!(dialed, Some(Dialed::Echo));
        let Some(mut ws) = websocket(upgrade, limits, is_echo, span).await else { return };
        let m = &ctx.entry.metrics;
        let open = OpenSession::new(m);
        let mut totals = SessionTotals::default();
        let (outcome, backend) = relay(&mut ws, dialed, ctx, stop, &mut totals).await;
        // Boxed: it runs once, and its state kept in this future would be paid by every idle
        // session (what it holds across its awaits could not share space with the relay's).
        let ending = Ending { ws, outcome, backend, open, totals, started };
        Box::pin(end(ending, ctx, span)).await;
    }
}

/// A session whose relay has ended, as [`end`] takes it.
struct Ending<'a> {
    ws: Ws,
    outcome: Outcome,
    backend: Option<BackendConn>,
    open: OpenSession<'a>,
    totals: SessionTotals,
    started: Instant,
}

/// Closes the client's side, lingers on the backend's as the ending requires, then counts and
/// logs the session.
async fn end(ending: Ending<'_>, ctx: &Context, span: &Span) {
    let Ending { mut ws, outcome, backend, mut open, mut totals, started } = ending;
    let (limits, m) = (&ctx.entry.limits, &ctx.entry.metrics);
    totals.dropped_client_bytes = close_client(&mut ws, &outcome, limits.close_timeout).instrument(span.clone()).await;
    // Counted now: the client has its close; lingering on the backend below (and a deadline
    // that may cut it short) does not change how the session ended.
    let code = close_code(&outcome);
    open.ended(code, outcome.side());
    // Release the client socket before lingering on the backend: the page's `onclose` waits for
    // the TCP close, and must not wait for a slow backend.
    drop(ws);
    if let Some(mut backend) = backend
        && matches!(outcome, Outcome::ClientClosed { .. } | Outcome::Shutdown)
    {
        // Tell the backend the client is done, then drop (and count) whatever it still sends,
        // so it sees an orderly end rather than a reset.
        bridge::shutdown_write(&mut backend).await;
        totals.dropped_bytes = bridge::drain(&mut backend, limits.close_timeout).await;
    }
    let duration = started.elapsed();
    m.duration.record(duration.as_secs_f64());
    m.to_backend.peak.record(totals.to_backend.peak_buffered as f64);
    m.to_client.peak.record(totals.to_client.peak_buffered as f64);
    m.dropped_to_client.increment(totals.dropped_bytes);
    m.dropped_to_backend.increment(totals.dropped_client_bytes);
    span.in_scope(|| log_end(ctx, &outcome, code, &totals, duration));
}

/// The client's WebSocket as a session relays over it.
type Ws = ClientWs<Box<dyn client_stream::Duplex>>;

/// The client's WebSocket, once hyper has handed over the connection (after the 101 went out);
/// `None` if the upgrade did not complete. `echo` as for [`ws_config`].
async fn websocket(upgrade: OnUpgrade, limits: &SessionLimits, echo: bool, span: &Span) -> Option<Ws> {
    let upgraded = match upgrade.await {
        Ok(upgraded) => upgraded,
        Err(e) => {
            span.in_scope(|| debug!(error = %e, "upgrade did not complete"));
            return None;
        }
    };
    let io = client_stream::take_back(upgraded, limits.client_read_bytes).unwrap_or_else(|io| {
        span.in_scope(|| {
            error!("bug: the client connection came back as another type; relaying through hyper's layers")
        });
        io
    });
    let io = FrameGate::new(client_stream::into_relay(io)).frame_limit(limits.max_message_bytes);
    Some(WebSocketStream::from_raw_socket(io, Role::Server, Some(ws_config(limits, echo))).await)
}

/// Runs the session's pump (the bridge, the built-in echo, or nothing for an unreachable
/// backend) until one side ends it, a liveness limit is reached (both pumps run the checks), or
/// the session's moment in the shutdown close window comes; returns how it ended, and the
/// backend connection for the caller to release. Counts an ending at a liveness limit. Takes
/// `dialed` (`Some` until then) when the pump starts.
#[allow(clippy::manual_async_fn)] // An `async fn` would hold its arguments twice.
fn relay<'a>(
    ws: &'a mut Ws,
    dialed: &'a mut Option<Dialed>,
    ctx: &'a Context,
    stop: &'a CancellationToken,
    totals: &'a mut SessionTotals,
) -> impl Future<Output = (Outcome, Option<BackendConn>)> + Send + 'a {
    async move {
        let (route, m, limits) = (&ctx.entry.route, &ctx.entry.metrics, &ctx.entry.limits);
        // With the control channel, the client's text messages are controls, never data.
        let accept = Accept { text: route.accept.text && !ctx.control, binary: route.accept.binary };
        let metrics = BridgeMetrics { to_backend: &m.to_backend, to_client: &m.to_client };
        // This session's own stop: the shutdown signal, delayed by its place in the close window.
        let session_stop = CancellationToken::new();
        let spread = async {
            Cancelled::new(stop).await;
            // Boxed: a timer's state in the session's future would be paid by every idle session.
            Box::pin(tokio::time::sleep(spread_offset(ctx.id, ctx.close_window))).await;
            session_stop.cancel();
            // Done: let the pump finish on its own (it sees `session_stop`).
            std::future::pending().await
        };
        let pump = async {
            // Made here, where they are handed on before the first await, so no future keeps them.
            // Credentials that expire end the session through the lifetime limit, which the
            // liveness clock already keeps: nothing is added to the relay.
            let mut liveness = liveness(limits);
            let expiry = ctx
                .credentials_expire
                .map(|at| at.saturating_duration_since(Instant::now()).max(Duration::from_millis(1)));
            let expiry_binds = expiry.is_some_and(|left| limits.max_session.is_none_or(|max| left < max));
            if expiry_binds {
                liveness.max_session = expiry;
            }
            let (outcome, backend) = match dialed.take().expect("the relay takes the backend once") {
                Dialed::Unavailable(failure) => (Outcome::BackendUnavailable(failure), None),
                Dialed::Shed(shed) => (Outcome::Shed(shed), None),
                Dialed::Refused(denied, reason) => (Outcome::AccessRefused { denied, reason }, None),
                Dialed::Echo => {
                    let end = echo::run_ws(ws, accept, liveness, &session_stop, totals, metrics).await;
                    (Outcome::from_end(end, limits.max_message_bytes), None)
                }
                // One bridge per stream type, so each relays over its own stream with no dispatch.
                Dialed::Backend(conn) => {
                    let options = bridge::Options {
                        control: ctx.control,
                        ..bridge_options(route.outbound, accept, limits, liveness)
                    };
                    let (end, backend) = match conn {
                        BackendConn::Tcp(stream) => {
                            let (end, stream) = bridge::run(ws, stream, options, &session_stop, totals, metrics).await;
                            (end, BackendConn::Tcp(stream))
                        }
                        BackendConn::Unix(stream) => {
                            let (end, stream) = bridge::run(ws, stream, options, &session_stop, totals, metrics).await;
                            (end, BackendConn::Unix(stream))
                        }
                        BackendConn::Tls(stream) => {
                            let (end, stream) = bridge::run(ws, stream, options, &session_stop, totals, metrics).await;
                            (end, BackendConn::Tls(stream))
                        }
                        BackendConn::UnixTls(stream) => {
                            let (end, stream) = bridge::run(ws, stream, options, &session_stop, totals, metrics).await;
                            (end, BackendConn::UnixTls(stream))
                        }
                    };
                    (Outcome::from_end(end, limits.max_message_bytes), Some(backend))
                }
            };
            match outcome {
                Outcome::LifetimeLimit(_) if expiry_binds => (Outcome::CredentialsExpired, backend),
                outcome => (outcome, backend),
            }
        };
        let (outcome, backend) = tokio::select! {
            biased;
            done = pump => done,
            never = spread => never,
        };
        if let Some(limit) = outcome.limit() {
            m.limit_reached(limit);
        }
        (outcome, backend)
    }
}

/// The session's liveness checks under `limits`.
fn liveness(limits: &SessionLimits) -> Liveness {
    Liveness {
        ping_interval: limits.ping_interval,
        pong_timeout: limits.pong_timeout,
        idle_timeout: limits.idle_timeout,
        max_session: limits.max_session,
        max_messages_per_sec: limits.max_messages_per_sec,
    }
}

/// How the bridge runs for a route: its framing and accepted types, under its limits.
fn bridge_options(outbound: Outbound, accept: Accept, limits: &SessionLimits, liveness: Liveness) -> bridge::Options {
    bridge::Options {
        backend_read_bytes: limits.backend_read_bytes,
        client_batch_bytes: limits.client_read_bytes,
        framing: match outbound {
            Outbound::Binary => Framing::Binary,
            Outbound::Text => Framing::Text,
            Outbound::Mirror => Framing::Mirror,
        },
        accept,
        finish_timeout: limits.close_timeout,
        role: Role::Server,
        liveness,
        control: false,
    }
}

/// A session counted in `wsgate_sessions_open` and, once its close is settled, in
/// `wsgate_sessions_total`. If the session future is dropped before that (at the shutdown
/// deadline), the drop still lowers the gauge and counts the session as ended by the gateway
/// with 1006, the code the client sees when no close frame arrives.
struct OpenSession<'a> {
    metrics: &'a RouteMetrics,
    ended: bool,
}

impl<'a> OpenSession<'a> {
    fn new(metrics: &'a RouteMetrics) -> Self {
        metrics.sessions_open.increment(1.0);
        OpenSession { metrics, ended: false }
    }

    fn ended(&mut self, code: u16, side: Side) {
        self.metrics.session_ended(code, side.as_str());
        self.ended = true;
    }
}

impl Drop for OpenSession<'_> {
    fn drop(&mut self) {
        self.metrics.sessions_open.decrement(1.0);
        if !self.ended {
            self.metrics.session_ended(1006, Side::Gateway.as_str());
        }
    }
}

/// Where in `window` session `id` closes on shutdown: a fixed, well-spread point (Fibonacci
/// hashing of the id), so the spread needs no random number generator.
fn spread_offset(id: u64, window: Duration) -> Duration {
    let fraction = (id.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 11) as f64 / (1u64 << 53) as f64;
    window.mul_f64(fraction)
}

fn log_end(ctx: &Context, outcome: &Outcome, code: u16, totals: &SessionTotals, duration: Duration) {
    // Ours, or the client's own (untrusted text: logged with its quotes and escapes).
    let reason = match outcome {
        Outcome::ClientClosed { reason, .. } => reason.clone(),
        other => other.close_frame().map(|f| f.reason.as_str().to_string()).unwrap_or_default(),
    };
    info!(
        client.addr = %ctx.client_addr,
        user = ctx.identity.user.as_deref(),
        cert_subject = ctx.identity.cert_subject.as_deref(),
        route.backend = %ctx.entry.route.backend,
        duration_secs = duration.as_secs_f64(),
        to_backend.bytes = totals.to_backend.bytes,
        to_backend.messages = totals.to_backend.messages,
        to_backend.peak_buffered = totals.to_backend.peak_buffered,
        to_client.bytes = totals.to_client.bytes,
        to_client.messages = totals.to_client.messages,
        to_client.peak_buffered = totals.to_client.peak_buffered,
        dropped.bytes = totals.dropped_bytes,
        dropped.client_bytes = totals.dropped_client_bytes,
        close.code = code,
        close.reason = ?reason,
        closed_by = outcome.side().as_str(),
        "session ended"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Shutdown closes spread evenly over the window, never past it.
    #[test]
    fn shutdown_spread_covers_the_window() {
        let window = Duration::from_secs(10);
        let offsets: Vec<Duration> = (1..=1000).map(|id| spread_offset(id, window)).collect();
        assert!(offsets.iter().all(|o| *o < window));
        // Every tenth of the window gets a share of the closes.
        for tenth in 0..10 {
            let n = offsets.iter().filter(|o| o.as_secs() == tenth).count();
            assert!((50..=150).contains(&n), "second {tenth}: {n} of 1000");
        }
        assert_eq!(spread_offset(7, Duration::ZERO), Duration::ZERO);
    }
}
