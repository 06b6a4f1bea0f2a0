//! How a session ends: the [`Outcome`] (which side, and why), the one close frame and code each
//! outcome sends ([`Outcome::close_frame`], the whole close-code contract; `docs/close-codes.md`
//! mirrors it row for row), and the closing handshake with the client, including the linger
//! after a client error.

use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tracing::debug;
use tungstenite::error::{CapacityError, ProtocolError};
use tungstenite::protocol::CloseFrame;
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::{Error as WsError, Message};

use crate::admission::Shed;
use crate::backend::ConnectFailure;
use crate::bridge::{ControlFault, End, Kind, Limit};
use crate::frames::{ClientWs, FrameGate};
use crate::policy::Denied;

/// Which side ended a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The WebSocket client.
    Client,
    /// The backend service.
    Backend,
    /// wsgate itself (shutdown, a limit).
    Gateway,
}

impl Side {
    pub(super) fn as_str(self) -> &'static str {
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
    /// The client broke the wsgate control channel's contract: data after `shutdown_write`, or
    /// a control this version does not know (docs/control.md).
    ControlViolation(ControlFault),
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
    /// The route or the gateway was at a bound when the session would have started
    /// (`on_backend_unavailable = "close"`).
    Shed(Shed),
    /// The gateway is shutting down.
    Shutdown,
    /// The gateway failed (no randomness for a client-role frame's mask key).
    GatewayFailed,
    /// A ping reached the client's socket and nothing came back from the client within this
    /// time (`limits.pong_timeout_secs`).
    PongTimeout(Duration),
    /// No data message either way for this long (`limits.idle_timeout_secs`).
    IdleTimeout(Duration),
    /// The session lasted this long (`limits.max_session_secs`).
    LifetimeLimit(Duration),
    /// The client sent more than this many messages and control frames in a second
    /// (`limits.max_messages_per_sec`).
    MessageRateExceeded(u64),
    /// The route's access policy refused the client, on a route with `on_refusal = "close"`:
    /// upgraded without a backend to say why in a close frame a page can read.
    AccessRefused {
        /// Why.
        denied: Denied,
        /// The refusal's reason (never a credential).
        reason: String,
    },
    /// The session's JWT expired (`exp` plus `expiry_grace_secs`; `close_at_expiry`).
    CredentialsExpired,
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
            | Outcome::ControlViolation(_)
            | Outcome::ClientTooBig { .. }
            | Outcome::ClientWriteFailed => Side::Client,
            Outcome::BackendClosed
            | Outcome::BackendFailed(_)
            | Outcome::BackendNotUtf8
            | Outcome::BackendUnavailable(_) => Side::Backend,
            Outcome::Shed(_)
            | Outcome::Shutdown
            | Outcome::GatewayFailed
            | Outcome::PongTimeout(_)
            | Outcome::IdleTimeout(_)
            | Outcome::LifetimeLimit(_)
            | Outcome::MessageRateExceeded(_)
            | Outcome::AccessRefused { .. }
            | Outcome::CredentialsExpired => Side::Gateway,
        }
    }

    /// The `limit` label of `wsgate_session_limits_total` for an ending at a liveness limit.
    pub fn limit(&self) -> Option<&'static str> {
        match self {
            Outcome::PongTimeout(_) => Some("pong_timeout"),
            Outcome::IdleTimeout(_) => Some("idle_timeout"),
            Outcome::LifetimeLimit(_) => Some("max_session"),
            Outcome::MessageRateExceeded(_) => Some("message_rate"),
            Outcome::CredentialsExpired => Some("credentials_expired"),
            _ => None,
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
            Outcome::ControlViolation(ControlFault::DataAfterShutdownWrite) => {
                (1003, "data message after shutdown_write".into())
            }
            Outcome::ControlViolation(ControlFault::UnknownControl) => (1003, "unknown control message".into()),
            Outcome::ClientInvalidUtf8 => (1007, "text message is not valid UTF-8".into()),
            Outcome::ClientTooBig { limit } => (1009, format!("message too big: limit is {limit} bytes")),
            Outcome::BackendFailed(failure) => (1011, format!("backend error: {}", failure.label())),
            Outcome::BackendNotUtf8 => (1011, "backend sent bytes that are not UTF-8 on a text route".into()),
            Outcome::BackendUnavailable(failure) => (1013, format!("backend unavailable: {}", failure.label())),
            Outcome::Shed(shed) => (1013, shed.reason()),
            Outcome::GatewayFailed => (1011, "gateway error".into()),
            Outcome::PongTimeout(after) => (1011, format!("no pong within {} s", after.as_secs_f64())),
            Outcome::IdleTimeout(after) => (1000, format!("idle timeout: no data for {} s", after.as_secs_f64())),
            Outcome::LifetimeLimit(max) => (1001, format!("session lifetime limit of {} s reached", max.as_secs_f64())),
            Outcome::MessageRateExceeded(max) => (1008, format!("message rate over {max} per second")),
            // 4000 plus the HTTP status the refusal stands for, so a page reads it as such.
            Outcome::AccessRefused { denied, reason } => match denied {
                Denied::MissingCredentials | Denied::InvalidCredentials => (4401, reason.clone()),
                Denied::Forbidden | Denied::ClientAddress | Denied::ClientCertificate => (4403, reason.clone()),
                Denied::TooManyFailures => (4429, reason.clone()),
            },
            Outcome::CredentialsExpired => (4401, "credentials expired".into()),
        };
        Some(CloseFrame { code: CloseCode::from(code), reason: truncate_reason(&reason).to_string().into() })
    }

    /// Whether the client's stream failed on a read (tungstenite then reads no more).
    fn is_read_error(&self) -> bool {
        matches!(self, Outcome::ClientProtocolError(_) | Outcome::ClientInvalidUtf8 | Outcome::ClientTooBig { .. })
    }

    pub(super) fn from_end(end: End, max_message_bytes: usize) -> Outcome {
        match end {
            End::ClientClosed(frame) => Outcome::ClientClosed {
                code: frame.as_ref().map(|f| u16::from(f.code)),
                reason: frame.map(|f| f.reason.as_str().to_string()).unwrap_or_default(),
            },
            End::ClientGone => Outcome::ClientGone,
            End::ClientFailed(e) => Outcome::from_client_error(e, max_message_bytes),
            End::ClientUnsupported(kind) => Outcome::ClientUnsupported(kind),
            End::ControlViolation(fault) => Outcome::ControlViolation(fault),
            End::ClientWriteFailed(_) => Outcome::ClientWriteFailed,
            End::BackendEof => Outcome::BackendClosed,
            End::BackendFailed(e) => Outcome::BackendFailed(IoFailure::of(&e)),
            End::BackendNotUtf8 => Outcome::BackendNotUtf8,
            End::Stopped => Outcome::Shutdown,
            End::NoMaskKey => Outcome::GatewayFailed,
            End::Limit(Limit::PongTimeout(after)) => Outcome::PongTimeout(after),
            End::Limit(Limit::IdleTimeout(after)) => Outcome::IdleTimeout(after),
            End::Limit(Limit::MaxSession(max)) => Outcome::LifetimeLimit(max),
            End::Limit(Limit::MessageRate(max)) => Outcome::MessageRateExceeded(max),
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
    /// A TLS backend closed its connection without `close_notify`, so what arrived may have
    /// been cut short.
    Truncated,
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
            // Only rustls reports it on a read: a plain socket's end is a read of 0 bytes.
            ErrorKind::UnexpectedEof => IoFailure::Truncated,
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
            IoFailure::Truncated => "TLS ended without close_notify",
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

/// The close code the client saw: ours, the client's own (echoed), or 1005/1006 as a browser
/// would report them.
pub(super) fn close_code(outcome: &Outcome) -> u16 {
    match (outcome, outcome.close_frame()) {
        (Outcome::ClientClosed { code, .. }, _) => code.unwrap_or(1005),
        (_, Some(f)) => u16::from(f.code),
        // 1006: no close frame was exchanged.
        (_, None) => 1006,
    }
}

/// Sends the outcome's close frame (or flushes tungstenite's reply to the client's Close) and
/// waits, up to `timeout`, for the client to finish the closing handshake, so the close is clean.
/// Once both close frames have been sent (the client's whole, valid or not), it returns at once,
/// and the caller closes the connection (RFC 6455 §7.1.1: the server closes TCP first).
/// Returns the payload bytes of the client messages that crossed our close frame: read, never
/// delivered to the backend.
pub(super) async fn close_client<S>(ws: &mut ClientWs<S>, outcome: &Outcome, timeout: Duration) -> u64
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut discarded = 0u64;
    let closing = async {
        match outcome {
            Outcome::ClientGone | Outcome::ClientWriteFailed => return,
            Outcome::ClientClosed { .. } => {
                if ws.flush().await.is_err() {
                    return;
                }
            }
            other => {
                // Flushed first: pongs to a client that does not read can fill the write
                // buffer, and tungstenite refuses (and loses) a close frame that does not fit.
                if ws.flush().await.is_err() || ws.send(Message::Close(other.close_frame())).await.is_err() {
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
            // The frame tungstenite failed on may have been that Close: then there is no wait.
            linger_until_client_close(ws.get_mut()).await;
        } else {
            // Read until the client's Close arrives and the stream ends; discard (and count)
            // data that crosses it.
            while let Some(Ok(message)) = ws.next().await {
                if let Message::Binary(data) = &message {
                    discarded += data.len() as u64;
                } else if let Message::Text(text) = &message {
                    discarded += text.len() as u64;
                }
            }
        }
    };
    if tokio::time::timeout(timeout, closing).await.is_err() {
        debug!(?timeout, "client did not finish the closing handshake in time");
    }
    discarded
}

/// How long a client may pause mid-stream before lingering gives up on its Close frame.
const LINGER_QUIET: Duration = Duration::from_secs(1);

/// Reads and discards what the client sends, frame by frame (the gate follows the frames), until
/// its Close frame has been read whole, the client closes, or it sends nothing for
/// [`LINGER_QUIET`]. The caller bounds the whole wait.
async fn linger_until_client_close<S: AsyncRead + Unpin>(gate: &mut FrameGate<S>) {
    // On the heap, and only when needed: an array here would make every session's future (and
    // so every idle session) 8 KiB larger, since an async fn's state is as large as its largest
    // await.
    let mut buf = Vec::new();
    while !gate.peer_closed() {
        if buf.is_empty() {
            buf = vec![0u8; 8192];
        }
        let Ok(Ok(1..)) = tokio::time::timeout(LINGER_QUIET, gate.read(&mut buf)).await else { return };
    }
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
        assert_eq!(
            code(Outcome::ControlViolation(ControlFault::DataAfterShutdownWrite)),
            Some((1003, "data message after shutdown_write".into()))
        );
        assert_eq!(
            code(Outcome::ControlViolation(ControlFault::UnknownControl)),
            Some((1003, "unknown control message".into()))
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
        assert_eq!(
            code(Outcome::BackendFailed(IoFailure::of(&std::io::ErrorKind::UnexpectedEof.into()))),
            Some((1011, "backend error: TLS ended without close_notify".into()))
        );
        assert_eq!(
            code(Outcome::BackendUnavailable(ConnectFailure::Tls)),
            Some((1013, "backend unavailable: TLS handshake failed".into()))
        );
        assert_eq!(code(Outcome::BackendNotUtf8).unwrap().0, 1011);
        assert_eq!(
            code(Outcome::BackendUnavailable(ConnectFailure::Refused)),
            Some((1013, "backend unavailable: connection refused".into()))
        );
        assert_eq!(code(Outcome::GatewayFailed), Some((1011, "gateway error".into())));
        assert_eq!(
            code(Outcome::Shed(Shed::MaxSessions(50))),
            Some((1013, "route is at its session limit (50); try again later".into()))
        );
        let secs = Duration::from_secs;
        assert_eq!(code(Outcome::PongTimeout(secs(30))), Some((1011, "no pong within 30 s".into())));
        assert_eq!(
            code(Outcome::IdleTimeout(Duration::from_millis(1500))),
            Some((1000, "idle timeout: no data for 1.5 s".into()))
        );
        assert_eq!(
            code(Outcome::LifetimeLimit(secs(86_400))),
            Some((1001, "session lifetime limit of 86400 s reached".into()))
        );
        assert_eq!(
            code(Outcome::MessageRateExceeded(10_000)),
            Some((1008, "message rate over 10000 per second".into()))
        );
        assert_eq!(code(Outcome::ClientClosed { code: Some(1000), reason: "bye".into() }), None);
        assert_eq!(code(Outcome::ClientGone), None);
        assert_eq!(code(Outcome::ClientWriteFailed), None);
    }

    /// Each outcome is blamed on the side that caused it.
    #[test]
    fn sides() {
        assert_eq!(Outcome::BackendClosed.side(), Side::Backend);
        assert_eq!(Outcome::ClientTooBig { limit: 1 }.side(), Side::Client);
        assert_eq!(Outcome::Shutdown.side(), Side::Gateway);
        assert_eq!(Outcome::PongTimeout(Duration::from_secs(1)).side(), Side::Gateway);
        assert_eq!(Outcome::MessageRateExceeded(1).side(), Side::Gateway);
    }

    /// Each liveness ending has its metric label; no other ending has one.
    #[test]
    fn limit_labels() {
        let d = Duration::from_secs(1);
        assert_eq!(Outcome::PongTimeout(d).limit(), Some("pong_timeout"));
        assert_eq!(Outcome::IdleTimeout(d).limit(), Some("idle_timeout"));
        assert_eq!(Outcome::LifetimeLimit(d).limit(), Some("max_session"));
        assert_eq!(Outcome::MessageRateExceeded(1).limit(), Some("message_rate"));
        assert_eq!(Outcome::Shutdown.limit(), None);
        assert_eq!(Outcome::ClientTooBig { limit: 1 }.limit(), None);
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
