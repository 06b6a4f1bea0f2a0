//! The WebSocket ⇄ backend pump: moves bytes both ways at once until one side ends.
//!
//! The two directions run in one task and take turns at being polled (`polling`):
//! - client → backend (`to_backend`): each message is written to the backend whole, with the
//!   messages that have already arrived behind it joined into the same write;
//! - backend → client (`to_client`): each backend read becomes one message, read into the
//!   buffer that becomes its frame, with read sizes by the read-size rule stated there.
//!
//! The backend is any [`BackendStream`] (`backend_io`: TCP, Unix sockets, TLS); the client is a
//! WebSocket built on a [`FrameGate`](crate::frames::FrameGate), in either role
//! ([`Options::role`]). What the pump moves is counted in the session's totals and the route's
//! metrics (`counting`).
//!
//! The pump only reports how it ended ([`End`]); it sends no close frame and picks no close code.
//! That belongs to `session`, the one place that sees both sides. The pump knows nothing of
//! config, routes or HTTP, so a client mode can reuse it.
//!
//! A stop request is honoured only between messages: a message already read from one side is
//! written to the other (within `finish_timeout`) before the pump returns [`End::Stopped`]. Bytes
//! still in the kernel's buffers, not yet read, are not delivered.
//!
//! Beside the two directions the pump runs the session's liveness checks ([`Liveness`]: pings,
//! pong, idle and lifetime timeouts, the client's message rate; `liveness`), on a timer of their
//! own; the echo loop runs the same checks. A lifetime that runs out ends the pump like a stop;
//! the other limits end it at once.

mod backend_io;
mod client;
mod clock;
mod counting;
mod liveness;
mod polling;
mod to_backend;
mod to_client;

use std::io;
use std::sync::Mutex;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::StreamExt;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_util::sync::CancellationToken;
use tungstenite::protocol::Role;
use tungstenite::protocol::frame::CloseFrame;
use tungstenite::{Error as WsError, Message};

pub use backend_io::{BackendStream, TlsReadHalf, TlsWriteHalf};
pub(crate) use counting::DirectionMeter;
pub use counting::{BridgeMetrics, DirectionTotals, SessionTotals};
pub(crate) use liveness::Watch;
pub use liveness::{Limit, Liveness};

use crate::frames::ClientWs;
use client::{Client, Seen};
use polling::Running;

/// WebSocket message type used for backend bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// Binary messages.
    Binary,
    /// Text messages; backend bytes must be UTF-8.
    Text,
    /// The type of the client's last data message (binary before the first); text as above.
    Mirror,
}

/// A WebSocket data message type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Text.
    Text,
    /// Binary.
    Binary,
}

/// Which data message types the client may send; the others end the session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Accept {
    /// Text messages.
    pub text: bool,
    /// Binary messages.
    pub binary: bool,
}

impl Kind {
    /// The kind of a data message; `None` for control messages.
    pub fn of(message: &Message) -> Option<Kind> {
        match message {
            Message::Text(_) => Some(Kind::Text),
            Message::Binary(_) => Some(Kind::Binary),
            _ => None,
        }
    }
}

impl Framing {
    /// Whether backend bytes go to the client as text, given what the client has sent.
    fn is_text(self, seen: &Seen) -> bool {
        match self {
            Framing::Binary => false,
            Framing::Text => true,
            Framing::Mirror => seen.last_text.load(std::sync::atomic::Ordering::Relaxed),
        }
    }
}

impl Accept {
    /// Whether messages of `kind` are accepted.
    pub fn allows(self, kind: Kind) -> bool {
        match kind {
            Kind::Text => self.text,
            Kind::Binary => self.binary,
        }
    }
}

/// How the pump runs.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// Largest single backend read, and so the largest message sent to the client.
    pub backend_read_bytes: usize,
    /// Most bytes of client messages that have already arrived joined into one backend write.
    pub client_batch_bytes: usize,
    /// Message type for backend bytes.
    pub framing: Framing,
    /// Message types accepted from the client.
    pub accept: Accept,
    /// After a stop or backend EOF, how long the other direction may take to finish writing
    /// the message in flight.
    pub finish_timeout: Duration,
    /// The pump's side of the WebSocket: a client masks every frame it sends (RFC 6455 §5.3),
    /// a server none.
    pub role: Role,
    /// Pings, timeouts and the client's message rate.
    pub liveness: Liveness,
    /// The wsgate control channel was negotiated (`crate::control`). As a server: the client's
    /// text messages are controls (so `accept.text` should be off), and `shutdown_write` shuts
    /// down the backend's write side while its output is still relayed. As a client: the
    /// backend's EOF is sent as `shutdown_write`, and the server's Close ends the pump.
    pub control: bool,
}

/// [`Options`] less the liveness limits, which only the watch reads: what each direction keeps,
/// a copy each for the session's life.
#[derive(Debug, Clone, Copy)]
struct Relay {
    backend_read_bytes: usize,
    client_batch_bytes: usize,
    framing: Framing,
    accept: Accept,
    finish_timeout: Duration,
    role: Role,
    control: bool,
}

impl From<&Options> for Relay {
    fn from(o: &Options) -> Relay {
        Relay {
            backend_read_bytes: o.backend_read_bytes,
            client_batch_bytes: o.client_batch_bytes,
            framing: o.framing,
            accept: o.accept,
            finish_timeout: o.finish_timeout,
            role: o.role,
            control: o.control,
        }
    }
}

/// What a client did against the wsgate control channel's contract (`crate::control`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ControlFault {
    /// A data message after `shutdown_write`.
    DataAfterShutdownWrite,
    /// A text message that is not a control this version knows.
    UnknownControl,
}

/// How the pump ended: the first side to end decides.
#[derive(Debug)]
pub enum End {
    /// The client sent a Close frame (tungstenite has queued the reply).
    ClientClosed(Option<CloseFrame>),
    /// Reading from the client failed: too big, bad UTF-8, protocol violation, or the socket.
    ClientFailed(WsError),
    /// The client sent a message type the route does not accept.
    ClientUnsupported(Kind),
    /// The client broke the wsgate control channel's contract (`crate::control`).
    ControlViolation(ControlFault),
    /// The client's socket ended without a Close frame.
    ClientGone,
    /// Writing to the client failed.
    ClientWriteFailed(WsError),
    /// The backend closed its side; everything it sent was delivered.
    BackendEof,
    /// Reading from or writing to the backend failed.
    BackendFailed(io::Error),
    /// The backend sent bytes that are not UTF-8 on a text route.
    BackendNotUtf8,
    /// A stop was requested; everything in flight was delivered.
    Stopped,
    /// The gateway could not go on: no randomness for a client-role frame's mask key.
    NoMaskKey,
    /// A liveness limit was reached ([`Liveness`]).
    Limit(Limit),
}

/// Pumps `ws` ⇄ `backend` until one side ends, and returns how, with the backend stream (so the
/// caller can shut it down or drain it as the ending requires).
#[allow(clippy::manual_async_fn)] // An `async fn` would hold its arguments twice.
pub fn run<'a, C, B>(
    ws: &'a mut ClientWs<C>,
    backend: B,
    options: Options,
    stop: &'a CancellationToken,
    totals: &'a mut SessionTotals,
    metrics: BridgeMetrics<'a>,
) -> impl Future<Output = (End, B)> + 'a
where
    C: AsyncRead + AsyncWrite + Unpin + Send,
    B: BackendStream + 'a,
{
    // Started here, so the future holds the watch and not the limits it was made from too.
    let mut watch = Watch::new(options.liveness);
    let options = Relay::from(&options);
    async move {
        let (mut from_backend, mut to_backend) = backend.into_split();
        let client = Client(Mutex::new(ws));
        let mut stream = futures_util::stream::poll_fn(|cx| {
            client.with(|ws| {
                let next = ws.poll_next_unpin(cx);
                if let Poll::Ready(Some(Ok(message))) = &next {
                    ws.get_mut().received(message);
                }
                next
            })
        });
        let seen = Seen::default();
        let mut up_meter =
            DirectionMeter::new(metrics.to_backend, &mut totals.to_backend).counting_stalls(&seen.stalls);
        let mut down_meter =
            DirectionMeter::new(metrics.to_client, &mut totals.to_client).counting_stalls(&seen.stalls);
        // Once the client's stream has ended, its ending decides: no pings, no more limits.
        let mut watching = |cx: &mut Context<'_>| match watch.poll_due(cx) {
            Some(fired) if !seen.client_ended.load(Ordering::Relaxed) => {
                client.with(|ws| watch.run(cx, ws, fired, seen.stalls.load(Ordering::Relaxed)))
            }
            _ => Poll::Pending,
        };
        // Both directions stop at a message boundary once `finish` is cancelled: on a stop request,
        // or after the backend's last byte was delivered. The direction still running then gets up
        // to `finish_timeout` to complete the message it is writing, so nothing read is lost.
        let finish = stop.child_token();
        let end = {
            let up =
                to_backend::client_to_backend(&mut stream, &mut to_backend, options, &seen, &finish, &mut up_meter);
            let down =
                to_client::backend_to_client(&mut from_backend, &client, options, &seen, &finish, &mut down_meter);
            tokio::pin!(up, down);
            let (end, running) = polling::first_to_end(up.as_mut(), down.as_mut(), &mut watching).await;
            match end {
                End::Stopped | End::BackendEof | End::Limit(Limit::MaxSession(_)) => {
                    finish.cancel();
                    let rest = async {
                        match running {
                            Running::Up => {
                                up.as_mut().await;
                            }
                            Running::Down => {
                                down.as_mut().await;
                            }
                            Running::Both => {
                                tokio::join!(up.as_mut(), down.as_mut());
                            }
                        }
                    };
                    // Whatever the others report now is secondary: the first ending decides.
                    // Boxed, like the wait below: once per session, and a timer's state kept in
                    // the pump's future would be paid by every idle session.
                    let _ = Box::pin(tokio::time::timeout(options.finish_timeout, rest)).await;
                    end
                }
                // A write to the backend failed: often because it sent its last reply and closed.
                // Deliver what it sent before deciding; a clean EOF then means it simply finished.
                End::BackendFailed(e) if running == Running::Up => End::BackendFailed(e),
                End::BackendFailed(e) => {
                    match Box::pin(tokio::time::timeout(options.finish_timeout, down.as_mut())).await {
                        Ok(End::BackendEof) => End::BackendEof,
                        _ => End::BackendFailed(e),
                    }
                }
                other => other,
            }
        };
        (end, B::reunite(from_backend, to_backend))
    }
}

/// After the client closed: reads and discards what the backend still sends until it closes or
/// `timeout` passes, so the backend sees an orderly end rather than a reset. Returns the bytes
/// dropped. The caller has already shut down the backend's write side.
pub async fn drain<R: AsyncRead + Unpin>(backend: &mut R, timeout: Duration) -> u64 {
    let mut dropped = 0u64;
    // On the heap, and only now: an array here would be part of every session's future, idle
    // ones included (an async fn's state is as large as its largest await point).
    let mut scratch = vec![0u8; 4096];
    let _ = tokio::time::timeout(timeout, async {
        while let Ok(n @ 1..) = backend.read(&mut scratch).await {
            dropped += n as u64;
        }
    })
    .await;
    dropped
}

/// Shuts down the write side of `backend`, ignoring errors: the peer may already be gone.
pub async fn shutdown_write<W: AsyncWrite + Unpin>(backend: &mut W) {
    let _ = backend.shutdown().await;
}

#[cfg(test)]
mod tests;
