//! One upgraded WebSocket session: runs the pump for its route, decides how it ended, sends the
//! one close frame that says so, and writes the session's log line.
//!
//! The server has already dialled the backend ([`dial`]) before answering the upgrade (so
//! `onopen` means the backend is there); the session receives the result as [`Dialed`]. It is the only place
//! that sees both sides, so it alone maps an ending to a close code: [`Outcome::close_frame`] is
//! that mapping, and `docs/close-codes.md` mirrors it row for row.
//!
//! A session ends exactly once. Whichever side ends first decides the [`Outcome`]; the pump stops
//! the other direction; the close frame is sent once; both sockets are released when `run`
//! returns.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use hyper::upgrade::OnUpgrade;
use hyper_tungstenite::WebSocketStream;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, Span, debug, error, field, info, info_span, warn};
use tungstenite::error::{CapacityError, ProtocolError};
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tungstenite::{Error as WsError, Message};

use crate::backend::{BackendError, ConnectFailure};
use crate::bridge::{self, Accept, BridgeMetrics, End, Framing, Kind, SessionTotals};
use crate::client_stream;
use crate::config::Outbound;
use crate::echo;
use crate::frames::{ClientWs, FrameGate};
use crate::metrics::RouteMetrics;
use crate::router::{Entry, SessionLimits, Target};
use crate::shutdown::Cancelled;

/// The backend side of a session, as the server found it before upgrading.
#[derive(Debug)]
pub enum Dialed {
    /// A connected TCP backend.
    Tcp(TcpStream),
    /// The built-in echo: nothing to dial.
    Echo,
    /// The backend could not be reached; the session closes at once with 1013.
    Unavailable(ConnectFailure),
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
    /// On shutdown, sessions close at a point spread over this window (by session id), so
    /// thousands of clients do not reconnect in the same second.
    pub close_window: Duration,
}

/// Which side ended a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The WebSocket client.
    Client,
    /// The backend service.
    Backend,
    /// wsgate itself (shutdown).
    Gateway,
}

impl Side {
    fn as_str(self) -> &'static str {
        match self {
            Side::Client => "client",
            Side::Backend => "backend",
            Side::Gateway => "gateway",
        }
    }
}

/// How a session ended, with enough detail to choose the close frame and write the log line.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// The client sent Close with this code; tungstenite echoes it.
    ClientClosed {
        /// The client's code (`None`: a Close without one, which reads as 1005).
        code: Option<u16>,
        /// The client's reason, for the log line.
        reason: String,
    },
    /// The client's socket ended or failed without a Close; nothing can be sent.
    ClientGone,
    /// The client broke the protocol (bad opcode, unmasked frame, bad close code, ...).
    ClientProtocolError(ClientFault),
    /// A text message from the client was not UTF-8.
    ClientInvalidUtf8,
    /// The client sent a message type the route does not accept ("text" or "binary").
    ClientUnsupported(Kind),
    /// A message from the client exceeded the limit.
    ClientTooBig {
        /// The configured limit in bytes.
        limit: usize,
    },
    /// Writing to the client failed; nothing more can be sent.
    ClientWriteFailed,
    /// The backend closed its side after all its bytes were delivered.
    BackendClosed,
    /// The backend failed mid-session (reset, write error).
    BackendFailed(IoFailure),
    /// The backend sent bytes that are not UTF-8 on a text route.
    BackendNotUtf8,
    /// The backend could not be reached at all.
    BackendUnavailable(ConnectFailure),
    /// The gateway is shutting down.
    Shutdown,
    /// The gateway failed (no randomness for a client-role frame's mask key).
    GatewayFailed,
}

impl Outcome {
    /// Which side caused the ending.
    pub fn side(&self) -> Side {
        match self {
            Outcome::ClientClosed { .. }
            | Outcome::ClientGone
            | Outcome::ClientProtocolError(_)
            | Outcome::ClientInvalidUtf8
            | Outcome::ClientUnsupported(_)
            | Outcome::ClientTooBig { .. }
            | Outcome::ClientWriteFailed => Side::Client,
            Outcome::BackendClosed
            | Outcome::BackendFailed(_)
            | Outcome::BackendNotUtf8
            | Outcome::BackendUnavailable(_) => Side::Backend,
            Outcome::Shutdown | Outcome::GatewayFailed => Side::Gateway,
        }
    }

    /// The close frame wsgate sends for this outcome: the whole close-code contract in one place
    /// (docs/close-codes.md). `None` where wsgate sends none: the client closed (tungstenite
    /// answers with the client's own code) or the client socket is gone.
    pub fn close_frame(&self) -> Option<CloseFrame> {
        let (code, reason): (u16, String) = match self {
            Outcome::ClientClosed { .. } | Outcome::ClientGone | Outcome::ClientWriteFailed => {
                return None;
            }
            Outcome::BackendClosed => (1000, "backend closed the connection".into()),
            Outcome::Shutdown => (1001, "gateway shutting down".into()),
            Outcome::ClientProtocolError(fault) => {
                (1002, format!("protocol error: {}", fault.to_string().to_lowercase()))
            }
            Outcome::ClientUnsupported(kind) => {
                let kind = if *kind == Kind::Text { "text" } else { "binary" };
                (1003, format!("{kind} messages are not accepted on this route"))
            }
            Outcome::ClientInvalidUtf8 => (1007, "text message is not valid UTF-8".into()),
            Outcome::ClientTooBig { limit } => (1009, format!("message too big: limit is {limit} bytes")),
            Outcome::BackendFailed(failure) => (1011, format!("backend error: {}", failure.label())),
            Outcome::BackendNotUtf8 => (1011, "backend sent bytes that are not UTF-8 on a text route".into()),
            Outcome::BackendUnavailable(failure) => (1013, format!("backend unavailable: {}", failure.label())),
            Outcome::GatewayFailed => (1011, "gateway error".into()),
        };
        Some(CloseFrame { code: CloseCode::from(code), reason: truncate_reason(&reason).to_string().into() })
    }

    /// Whether the client's stream failed on a read (tungstenite then reads no more).
    fn is_read_error(&self) -> bool {
        matches!(self, Outcome::ClientProtocolError(_) | Outcome::ClientInvalidUtf8 | Outcome::ClientTooBig { .. })
    }

    fn from_end(end: End, max_message_bytes: usize) -> Outcome {
        match end {
            End::ClientClosed(frame) => Outcome::ClientClosed {
                code: frame.as_ref().map(|f| u16::from(f.code)),
                reason: frame.map(|f| f.reason.as_str().to_string()).unwrap_or_default(),
            },
            End::ClientGone => Outcome::ClientGone,
            End::ClientFailed(e) => Outcome::from_client_error(e, max_message_bytes),
            End::ClientUnsupported(kind) => Outcome::ClientUnsupported(kind),
            End::ClientWriteFailed(_) => Outcome::ClientWriteFailed,
            End::BackendEof => Outcome::BackendClosed,
            End::BackendFailed(e) => Outcome::BackendFailed(IoFailure::of(&e)),
            End::BackendNotUtf8 => Outcome::BackendNotUtf8,
            End::Stopped => Outcome::Shutdown,
            End::NoMaskKey => Outcome::GatewayFailed,
        }
    }

    fn from_client_error(e: WsError, max_message_bytes: usize) -> Outcome {
        match e {
            WsError::Capacity(CapacityError::MessageTooLong { .. }) => {
                Outcome::ClientTooBig { limit: max_message_bytes }
            }
            WsError::Utf8(_) => Outcome::ClientInvalidUtf8,
            WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake) => Outcome::ClientGone,
            WsError::Io(_) | WsError::ConnectionClosed | WsError::AlreadyClosed => Outcome::ClientGone,
            WsError::Protocol(p) => Outcome::ClientProtocolError(ClientFault::Protocol(p)),
            other => Outcome::ClientProtocolError(ClientFault::Other(Arc::new(other))),
        }
    }
}

/// What the client got wrong, for the 1002 reason.
#[derive(Debug, Clone)]
pub enum ClientFault {
    /// A protocol violation tungstenite found in what the client sent.
    Protocol(ProtocolError),
    /// Any other error tungstenite reported on a read (none is expected after the upgrade).
    Other(Arc<WsError>),
}

impl std::fmt::Display for ClientFault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClientFault::Protocol(p) => p.fmt(f),
            ClientFault::Other(e) => e.fmt(f),
        }
    }
}

/// How a backend failed mid-session: the close reason's words, from the I/O error's kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoFailure {
    /// The backend reset the connection.
    Reset,
    /// The connection was aborted.
    Aborted,
    /// A write found the connection closed.
    BrokenPipe,
    /// The connection timed out (TCP keepalive or retransmission).
    TimedOut,
    /// Any other I/O error.
    Other,
}

impl IoFailure {
    fn of(e: &std::io::Error) -> IoFailure {
        use std::io::ErrorKind;
        match e.kind() {
            ErrorKind::ConnectionReset => IoFailure::Reset,
            ErrorKind::ConnectionAborted => IoFailure::Aborted,
            ErrorKind::BrokenPipe => IoFailure::BrokenPipe,
            ErrorKind::TimedOut => IoFailure::TimedOut,
            _ => IoFailure::Other,
        }
    }

    /// The words a close reason uses; they name no address.
    pub fn label(self) -> &'static str {
        match self {
            IoFailure::Reset => "connection reset",
            IoFailure::Aborted => "connection aborted",
            IoFailure::BrokenPipe => "connection closed while writing",
            IoFailure::TimedOut => "timed out",
            IoFailure::Other => "i/o error",
        }
    }
}

/// A close reason may be at most 123 bytes (a control frame carries 125, 2 of them the code).
/// Cuts at a UTF-8 boundary.
pub fn truncate_reason(reason: &str) -> &str {
    const MAX: usize = 123;
    if reason.len() <= MAX {
        return reason;
    }
    let mut end = MAX;
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    &reason[..end]
}

/// Connects the route's backend; the server calls this before it answers the upgrade, so
/// `onopen` means the backend is there. Records the connect time or the failure (metric and
/// warning, with the address); what the client sees of a failure is the caller's choice.
pub async fn dial(entry: &Entry) -> Result<Dialed, BackendError> {
    let Target::Tcp(dialer) = &entry.target else { return Ok(Dialed::Echo) };
    let started = Instant::now();
    match dialer.connect().await {
        Ok(stream) => {
            entry.metrics.connect_duration.record(started.elapsed().as_secs_f64());
            Ok(Dialed::Tcp(stream))
        }
        Err(e) => {
            entry.metrics.connect_failed(e.failure().label());
            warn!(route = %entry.route.name, error = %e, "backend unavailable");
            Err(e)
        }
    }
}

/// The client's WebSocket buffers and size limits under `limits`.
fn ws_config(limits: &SessionLimits) -> WebSocketConfig {
    let max = limits.max_message_bytes;
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

/// tungstenite's own read buffer: small, because every session holds it for its whole life.
/// It also caps each read tungstenite makes, which is why `ReadAhead` reads for it while busy.
const WS_READ_BUFFER_BYTES: usize = 2048;

/// One session from the pending upgrade to the last byte, or until `abort` (the shutdown
/// deadline) drops it, to be spawned as a task of its own.
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
    let span = info_span!(
        "session",
        id = ctx.id,
        route = %ctx.entry.route.name,
        backend.addr = field::Empty,
    );
    if let Dialed::Tcp(stream) = &dialed
        && let Ok(addr) = stream.peer_addr()
    {
        span.record("backend.addr", field::display(addr));
    }
    async move {
        tokio::select! {
            biased;
            _ = Cancelled::new(&abort) => span.in_scope(|| warn!("session dropped at the shutdown deadline")),
            _ = run_inner(upgrade, dialed, ctx, stop, &span) => {}
        }
    }
}

async fn run_inner(upgrade: OnUpgrade, dialed: Dialed, ctx: Context, stop: CancellationToken, span: &Span) {
    let started = Instant::now();
    let limits = &ctx.entry.limits;
    let Some(mut ws) = websocket(upgrade, limits, span).await else { return };
    let m = &ctx.entry.metrics;
    let mut open = OpenSession::new(m);
    let mut totals = SessionTotals::default();
    let (outcome, backend) = relay(&mut ws, dialed, &ctx, &stop, &mut totals).await;
    close_client(&mut ws, &outcome, limits.close_timeout).instrument(span.clone()).await;
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
    m.dropped_bytes.increment(totals.dropped_bytes);
    span.in_scope(|| log_end(&ctx, &outcome, code, &totals, duration));
}

/// The client's WebSocket as a session relays over it.
type Ws = ClientWs<Box<dyn client_stream::Duplex>>;

/// The client's WebSocket, once hyper has handed over the connection (after the 101 went out);
/// `None` if the upgrade did not complete.
async fn websocket(upgrade: OnUpgrade, limits: &SessionLimits, span: &Span) -> Option<Ws> {
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
    let io = FrameGate::new(client_stream::into_relay(io));
    Some(WebSocketStream::from_raw_socket(io, Role::Server, Some(ws_config(limits))).await)
}

/// Runs the session's pump (the bridge, the built-in echo, or nothing for an unreachable
/// backend) until one side ends it or the session's moment in the shutdown close window comes;
/// returns how it ended, and the backend socket for the caller to release.
async fn relay(
    ws: &mut Ws,
    dialed: Dialed,
    ctx: &Context,
    stop: &CancellationToken,
    totals: &mut SessionTotals,
) -> (Outcome, Option<TcpStream>) {
    let (route, limits, m) = (&ctx.entry.route, &ctx.entry.limits, &ctx.entry.metrics);
    let accept = Accept { text: route.accept.text, binary: route.accept.binary };
    let metrics = BridgeMetrics { to_backend: &m.to_backend, to_client: &m.to_client };
    // This session's own stop: the shutdown signal, delayed by its place in the close window.
    let session_stop = CancellationToken::new();
    let spread = async {
        Cancelled::new(stop).await;
        tokio::time::sleep(spread_offset(ctx.id, ctx.close_window)).await;
        session_stop.cancel();
        // Done: let the pump finish on its own (it sees `session_stop`).
        std::future::pending().await
    };
    let pump = async {
        match dialed {
            Dialed::Unavailable(failure) => (Outcome::BackendUnavailable(failure), None),
            Dialed::Echo => {
                let end = echo::run_ws(ws, accept, &session_stop, totals, metrics).await;
                (Outcome::from_end(end, limits.max_message_bytes), None)
            }
            Dialed::Tcp(stream) => {
                let options = bridge_options(route.outbound, accept, limits);
                let (end, backend) = bridge::run(ws, stream, options, &session_stop, totals, metrics).await;
                (Outcome::from_end(end, limits.max_message_bytes), Some(backend))
            }
        }
    };
    tokio::select! {
        biased;
        done = pump => done,
        never = spread => never,
    }
}

/// How the bridge runs for a route: its framing and accepted types, under its limits.
fn bridge_options(outbound: Outbound, accept: Accept, limits: &SessionLimits) -> bridge::Options {
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

/// The close code the client saw: ours, the client's own (echoed), or 1005/1006 as a browser
/// would report them.
fn close_code(outcome: &Outcome) -> u16 {
    match (outcome, outcome.close_frame()) {
        (Outcome::ClientClosed { code, .. }, _) => code.unwrap_or(1005),
        (_, Some(f)) => u16::from(f.code),
        // 1006: no close frame was exchanged.
        (_, None) => 1006,
    }
}

/// Sends the outcome's close frame (or flushes tungstenite's reply to the client's Close) and
/// waits, up to `timeout`, for the client to finish the closing handshake, so the close is clean.
async fn close_client<S>(ws: &mut WebSocketStream<S>, outcome: &Outcome, timeout: Duration)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let closing = async {
        match outcome {
            Outcome::ClientGone | Outcome::ClientWriteFailed => return,
            Outcome::ClientClosed { .. } => {
                if ws.flush().await.is_err() {
                    return;
                }
            }
            other => {
                if ws.send(Message::Close(other.close_frame())).await.is_err() {
                    return;
                }
            }
        }
        if outcome.is_read_error() {
            // tungstenite reads nothing more after an error, yet the client may still be
            // sending (the rest of a too-big message). Closing now would answer those bytes
            // with a reset, and a browser would report 1006 instead of our code; half-closing
            // now makes Chromium call the close unclean. So read and discard until the client's
            // own Close frame has arrived (or it goes quiet), then close with nothing unread.
            linger_until_client_close(ws.get_mut()).await;
        } else {
            // Read until the client's Close arrives and the stream ends; discard data that
            // crosses it.
            while let Some(Ok(_)) = ws.next().await {}
        }
    };
    if tokio::time::timeout(timeout, closing).await.is_err() {
        debug!(?timeout, "client did not finish the closing handshake in time");
    }
}

/// How long a client may pause mid-stream before lingering gives up on its Close frame.
const LINGER_QUIET: Duration = Duration::from_secs(1);

/// Reads and discards raw bytes until they end with a client Close frame, the client closes,
/// or it sends nothing for [`LINGER_QUIET`]. The caller bounds the whole wait.
async fn linger_until_client_close<S: AsyncRead + Unpin>(io: &mut S) {
    let mut tail = Vec::with_capacity(2 * MAX_CLOSE_FRAME);
    // On the heap, and only now: an array here would make every session's future (and so every
    // idle session) 8 KiB larger, since an async fn's state is as large as its largest await.
    let mut buf = vec![0u8; 8192];
    while let Ok(Ok(n @ 1..)) = tokio::time::timeout(LINGER_QUIET, io.read(&mut buf)).await {
        tail.extend_from_slice(&buf[..n]);
        if tail.len() > MAX_CLOSE_FRAME {
            tail.drain(..tail.len() - MAX_CLOSE_FRAME);
        }
        if ends_with_client_close(&tail) {
            return;
        }
    }
}

/// A client Close frame is at most 2 + 4 (mask) + 125 bytes.
const MAX_CLOSE_FRAME: usize = 131;

/// Whether `bytes` end with a complete client Close frame: `0x88` (FIN, opcode 8), a masked
/// length of at most 125, the 4-byte mask and that many payload bytes. Data that happens to end
/// the same way only makes the linger end early.
fn ends_with_client_close(bytes: &[u8]) -> bool {
    (0..=125usize).any(|n| {
        bytes.len() >= 6 + n && {
            let frame = &bytes[bytes.len() - 6 - n..];
            frame[0] == 0x88 && usize::from(frame[1]) == (0x80 | n)
        }
    })
}

fn log_end(ctx: &Context, outcome: &Outcome, code: u16, totals: &SessionTotals, duration: Duration) {
    // Ours, or the client's own (untrusted text: logged with its quotes and escapes).
    let reason = match outcome {
        Outcome::ClientClosed { reason, .. } => reason.clone(),
        other => other.close_frame().map(|f| f.reason.as_str().to_string()).unwrap_or_default(),
    };
    info!(
        client.addr = %ctx.client_addr,
        route.backend = %ctx.entry.route.backend,
        duration_secs = duration.as_secs_f64(),
        to_backend.bytes = totals.to_backend.bytes,
        to_backend.messages = totals.to_backend.messages,
        to_backend.peak_buffered = totals.to_backend.peak_buffered,
        to_client.bytes = totals.to_client.bytes,
        to_client.messages = totals.to_client.messages,
        to_client.peak_buffered = totals.to_client.peak_buffered,
        dropped.bytes = totals.dropped_bytes,
        close.code = code,
        close.reason = ?reason,
        closed_by = outcome.side().as_str(),
        "session ended"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code(o: Outcome) -> Option<(u16, String)> {
        o.close_frame().map(|f| (u16::from(f.code), f.reason.as_str().to_string()))
    }

    /// Every row of docs/close-codes.md.
    #[test]
    fn close_code_contract() {
        assert_eq!(code(Outcome::BackendClosed), Some((1000, "backend closed the connection".into())));
        assert_eq!(code(Outcome::Shutdown), Some((1001, "gateway shutting down".into())));
        assert_eq!(
            code(Outcome::ClientProtocolError(ClientFault::Protocol(ProtocolError::UnmaskedFrameFromClient)))
                .unwrap()
                .0,
            1002
        );
        assert_eq!(
            code(Outcome::ClientUnsupported(Kind::Text)),
            Some((1003, "text messages are not accepted on this route".into()))
        );
        assert_eq!(code(Outcome::ClientInvalidUtf8).unwrap().0, 1007);
        assert_eq!(
            code(Outcome::ClientTooBig { limit: 10_485_760 }),
            Some((1009, "message too big: limit is 10485760 bytes".into()))
        );
        assert_eq!(
            code(Outcome::BackendFailed(IoFailure::Reset)),
            Some((1011, "backend error: connection reset".into()))
        );
        assert_eq!(code(Outcome::BackendNotUtf8).unwrap().0, 1011);
        assert_eq!(
            code(Outcome::BackendUnavailable(ConnectFailure::Refused)),
            Some((1013, "backend unavailable: connection refused".into()))
        );
        assert_eq!(code(Outcome::GatewayFailed), Some((1011, "gateway error".into())));
        assert_eq!(code(Outcome::ClientClosed { code: Some(1000), reason: "bye".into() }), None);
        assert_eq!(code(Outcome::ClientGone), None);
        assert_eq!(code(Outcome::ClientWriteFailed), None);
    }

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

    /// The linger recognises a masked client Close frame at the end of the bytes, and nothing else.
    #[test]
    fn client_close_frames_are_recognised_at_the_end() {
        // Masked close, code 1000 + "bye" (5 payload bytes).
        let close = [0x88, 0x85, 1, 2, 3, 4, 0xaa, 0xbb, 0xcc, 0xdd, 0xee];
        let mut stream = vec![0x42; 1000];
        stream.extend_from_slice(&close);
        assert!(ends_with_client_close(&stream));
        assert!(ends_with_client_close(&[0x88, 0x80, 9, 9, 9, 9]), "empty close");
        assert!(!ends_with_client_close(&stream[..stream.len() - 1]), "incomplete");
        assert!(!ends_with_client_close(&[0x88, 0x05, 1, 2, 3, 4, 5]), "unmasked is not a client frame");
        assert!(!ends_with_client_close(&[0x42; 200]));
    }

    /// Each outcome is blamed on the side that caused it.
    #[test]
    fn sides() {
        assert_eq!(Outcome::BackendClosed.side(), Side::Backend);
        assert_eq!(Outcome::ClientTooBig { limit: 1 }.side(), Side::Client);
        assert_eq!(Outcome::Shutdown.side(), Side::Gateway);
    }

    /// Close reasons are cut to 123 bytes on a UTF-8 boundary.
    #[test]
    fn reasons_are_cut_at_123_bytes_on_a_char_boundary() {
        let long = "é".repeat(100); // 200 bytes
        let cut = truncate_reason(&long);
        assert!(cut.len() <= 123 && cut.len() >= 122);
        assert!(long.starts_with(cut));
        let long = hyper::header::HeaderName::from_bytes("x".repeat(500).as_bytes()).unwrap();
        let frame = Outcome::ClientProtocolError(ClientFault::Protocol(ProtocolError::InvalidHeader(Box::new(long))))
            .close_frame()
            .unwrap();
        assert_eq!(frame.reason.len(), 123);
    }
}
