//! Client → backend: each WebSocket message (binary, or text as its UTF-8 bytes) is written to
//! the backend whole before the next message is waited for. Messages that have already arrived
//! when one is written (a burst of small ones, readable without waiting) are joined into the same
//! write, up to `client_batch_bytes`, so a burst costs one system call rather than one per message
//! (docs/performance.md, item 9); nothing ever waits to be joined. At most one message (bounded by
//! the WebSocket's `max_message_size`) plus one batch is held per session in this direction.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio_util::sync::CancellationToken;
use tungstenite::{Error as WsError, Message};

use super::client::Seen;
use super::counting::DirectionMeter;
use super::polling::{is_ready, until_woken};
use super::{Accept, ControlFault, End, Kind, Relay};
use crate::control::Control;
use crate::shutdown::Cancelled;

/// Relays the client's messages (`stream`) to the backend (`to_backend`) until either ends or
/// `stop` is cancelled between messages.
#[allow(clippy::manual_async_fn)] // An `async fn` would hold its arguments twice.
pub(super) fn client_to_backend<'a, S, W>(
    stream: &'a mut S,
    to_backend: &'a mut W,
    options: Relay,
    seen: &'a Seen,
    stop: &'a CancellationToken,
    meter: &'a mut DirectionMeter<'_>,
) -> impl Future<Output = End> + 'a
where
    S: Stream<Item = Result<Message, WsError>> + Unpin,
    W: AsyncWrite + Unpin,
{
    async move {
        let stopped = Cancelled::new(stop);
        tokio::pin!(stopped);
        // A message already read that did not fit the last batch; it goes first in the next one.
        let mut carried: Option<(Kind, Bytes)> = None;
        // Whether the client stream's last poll returned Pending and the task has not given way
        // since: the stream has this task's waker, so polling it again now would only repeat that
        // Pending (docs/performance.md, item 12).
        let mut registered = false;
        loop {
            let (first, is_stopping) = match carried.take() {
                // Already read, so it is delivered whatever happens; but once a stop is requested
                // nothing more is gathered behind it.
                Some(message) => (message, is_ready(stopped.as_mut()).await),
                None => {
                    if std::mem::take(&mut registered) {
                        until_woken().await;
                    }
                    let next = tokio::select! {
                        biased;
                        _ = stopped.as_mut() => return End::Stopped,
                        next = stream.next() => next,
                    };
                    match data_of(next, options.accept, options.control) {
                        Ok(Some(message)) => (message, false),
                        Ok(None) => continue,
                        Err(Halt::End(end)) => return end,
                        Err(Halt::ShutdownWrite) => {
                            return Box::pin(half_closed(stream, to_backend, stopped.as_mut())).await;
                        }
                    }
                }
            };
            let batch = match is_stopping {
                true => Batch::alone(first, &seen.last_text, After::End(End::Stopped)),
                false => gather(stream, first, &options, seen).await,
            };
            let waited = match write_batch(to_backend, &batch, options.finish_timeout, meter).await {
                Written::Done { waited } => waited,
                Written::Failed(e) => return End::BackendFailed(e),
                Written::GaveUp => return batch.after.into_end(),
            };
            match batch.after {
                After::More => {}
                After::Drained => registered = !waited,
                After::Carried(message) => carried = Some(message),
                After::End(end) => return end,
                After::ShutdownWrite => return Box::pin(half_closed(stream, to_backend, stopped.as_mut())).await,
            }
        }
    }
}

/// The client sent `shutdown_write` (control channel): the backend's write side is shut down,
/// and the client may now only close; meanwhile the other direction relays what the backend
/// still sends, and its EOF ends the pump (which stops this direction). Boxed where it is
/// awaited, so the relay's own future does not grow by its state.
async fn half_closed<S, W>(stream: &mut S, to_backend: &mut W, mut stopped: Pin<&mut Cancelled<'_>>) -> End
where
    S: Stream<Item = Result<Message, WsError>> + Unpin,
    W: AsyncWrite + Unpin,
{
    if let Err(e) = to_backend.shutdown().await {
        return End::BackendFailed(e);
    }
    loop {
        let next = tokio::select! {
            biased;
            _ = stopped.as_mut() => return End::Stopped,
            next = stream.next() => next,
        };
        match next {
            None => return End::ClientGone,
            Some(Err(e)) => return End::ClientFailed(e),
            Some(Ok(Message::Close(frame))) => return End::ClientClosed(frame),
            // Data after the client said it had no more breaks the control channel's contract.
            Some(Ok(message)) => match Kind::of(&message) {
                Some(_) => return End::ControlViolation(ControlFault::DataAfterShutdownWrite),
                None => continue,
            },
        }
    }
}

/// How a batch's write went.
enum Written {
    /// Written and counted; `waited` if the write had to wait.
    Done { waited: bool },
    /// The write failed.
    Failed(io::Error),
    /// The client's stream had ended behind the batch, and the write did not finish (or failed)
    /// within `finish_timeout`: the client's ending decides.
    GaveUp,
}

/// Writes `batch` to the backend and counts it.
async fn write_batch<W: AsyncWrite + Unpin>(
    to_backend: &mut W,
    batch: &Batch,
    finish_timeout: Duration,
    meter: &mut DirectionMeter<'_>,
) -> Written {
    // The carried message was read too and waits with the batch.
    let buffered = batch.data.len() + batch.after.carried_len();
    // Flushed: a TLS backend may keep the end of a write in its buffer (a no-op on TCP).
    let write = meter.write(buffered, async {
        to_backend.write_all(&batch.data).await?;
        to_backend.flush().await
    });
    // The last messages before the client's Close (or its error, or its socket's end) get
    // `finish_timeout` to reach the backend; then the client's ending decides, delivered or not,
    // so a backend that stopped reading (or failed) cannot keep the client waiting for its close.
    // (A stop is bounded by `run`.)
    let (written, waited) = match &batch.after {
        After::End(end) if !matches!(end, End::Stopped) => {
            // Boxed: at most once per session, and a timer's state kept in the relay's future
            // would be paid by every idle session.
            match Box::pin(tokio::time::timeout(finish_timeout, write)).await {
                Ok((Ok(()), waited)) => (Ok(()), waited),
                Ok((Err(_), _)) | Err(_) => return Written::GaveUp,
            }
        }
        _ => write.await,
    };
    if let Err(e) = written {
        return Written::Failed(e);
    }
    meter.relayed(batch.data.len(), batch.messages);
    Written::Done { waited }
}

/// What one item from the client's stream means for the backend: a data message's kind and
/// bytes, nothing (control frames: tungstenite answers pings, pongs carry nothing), or a halt:
/// the end of the pump, or the client's `shutdown_write`.
fn data_of(
    next: Option<Result<Message, WsError>>,
    accept: Accept,
    control: bool,
) -> Result<Option<(Kind, Bytes)>, Halt> {
    match next {
        None => Err(Halt::End(End::ClientGone)),
        Some(Err(e)) => Err(Halt::End(End::ClientFailed(e))),
        Some(Ok(Message::Close(frame))) => Err(Halt::End(End::ClientClosed(frame))),
        Some(Ok(message)) => match Kind::of(&message) {
            None => Ok(None),
            Some(kind) if !accept.allows(kind) => Err(refused(kind, &message, control)),
            Some(kind) => Ok(Some((kind, message.into_data()))),
        },
    }
}

/// A message of a type the route does not take: with the control channel, a text message is a
/// control (`accept.text` is off then, so data messages never come this way), and one this
/// version does not know ends the pump as a control violation; otherwise the end of the pump.
#[cold]
fn refused(kind: Kind, message: &Message, control: bool) -> Halt {
    match message {
        Message::Text(text) if control => match Control::parse(text.as_bytes()) {
            Some(Control::ShutdownWrite) => Halt::ShutdownWrite,
            None => Halt::End(End::ControlViolation(ControlFault::UnknownControl)),
        },
        _ => Halt::End(End::ClientUnsupported(kind)),
    }
}

/// Why a client message does not go to the backend as data.
enum Halt {
    /// The pump ends.
    End(End),
    /// The client has no more data (control channel): shut down the backend's write side.
    ShutdownWrite,
}

/// Client messages bound for one backend write.
struct Batch {
    data: Bytes,
    messages: u64,
    after: After,
}

impl Batch {
    /// One message on its own, followed by `after`.
    fn alone((kind, data): (Kind, Bytes), last_text: &AtomicBool, after: After) -> Batch {
        last_text.store(kind == Kind::Text, Ordering::Relaxed);
        Batch { data, messages: 1, after }
    }
}

/// What `gather` met after the batch.
enum After {
    /// The batch reached its bound in bytes or in items; more may be ready.
    More,
    /// Nothing more was ready: the client stream returned Pending, which registered the
    /// task's waker for the next message.
    Drained,
    /// A message that would have made the batch larger than its bound.
    Carried((Kind, Bytes)),
    /// The client's stream ended or failed, or a stop was requested; the batch is still to be
    /// written.
    End(End),
    /// The client sent `shutdown_write` after the batch.
    ShutdownWrite,
}

impl After {
    fn carried_len(&self) -> usize {
        match self {
            After::Carried((_, data)) => data.len(),
            _ => 0,
        }
    }

    /// The ending this holds; only for `After::End`.
    fn into_end(self) -> End {
        match self {
            After::End(end) => end,
            _ => unreachable!("into_end is only called on After::End"),
        }
    }
}

/// Most items (messages, pings, pongs) one batch looks at, so that a flood of empty messages or
/// pings cannot keep `gather` from returning to the stop check.
const MAX_BATCH_ITEMS: usize = 4096;

/// Joins to `first` the client messages that can be read now, without waiting for more, while
/// the batch stays within `client_batch_bytes`: a burst of small messages goes to the backend in
/// one write, not a system call each. A message as large as the bound goes alone, uncopied.
/// `seen.last_text` follows the messages as they join, so mirror framing sees the type of the last
/// message the backend has been sent.
#[allow(clippy::manual_async_fn)] // An `async fn` would hold its arguments twice.
fn gather<'a, S>(
    stream: &'a mut S,
    first: (Kind, Bytes),
    options: &'a Relay,
    seen: &'a Seen,
) -> impl Future<Output = Batch> + 'a
where
    S: Stream<Item = Result<Message, WsError>> + Unpin,
{
    async move {
        let limit = options.client_batch_bytes;
        let mut batch = Batch::alone(first, &seen.last_text, After::More);
        let mut joined: Option<Vec<u8>> = None;
        // Bytes in the batch so far: `batch.data` until a second message joins, then `joined`.
        let mut len = batch.data.len();
        for _ in 1..MAX_BATCH_ITEMS {
            if len >= limit {
                break;
            }
            // Polled with the task's own waker: Pending also registers interest in more data.
            let next = match std::future::poll_fn(|cx| Poll::Ready(stream.poll_next_unpin(cx))).await {
                Poll::Pending => {
                    batch.after = After::Drained;
                    break;
                }
                Poll::Ready(next) => next,
            };
            let (kind, data) = match data_of(next, options.accept, options.control) {
                Ok(Some(message)) => message,
                Ok(None) => continue,
                Err(Halt::End(end)) => {
                    seen.client_ended.store(true, Ordering::Relaxed);
                    batch.after = After::End(end);
                    break;
                }
                // The client is still there: the other direction goes on.
                Err(Halt::ShutdownWrite) => {
                    batch.after = After::ShutdownWrite;
                    break;
                }
            };
            if len + data.len() > limit {
                batch.after = After::Carried((kind, data));
                break;
            }
            // Grown as messages join (doubling, but never past the bound), not sized to the bound
            // up front: bursts are usually far smaller than `client_batch_bytes`.
            let needed = len + data.len();
            let joined = joined.get_or_insert_with(|| {
                let mut v = Vec::with_capacity((2 * needed).min(limit));
                v.extend_from_slice(&std::mem::take(&mut batch.data));
                v
            });
            if joined.capacity() < needed {
                joined.reserve_exact((2 * needed).min(limit) - joined.len());
            }
            joined.extend_from_slice(&data);
            len = needed;
            seen.last_text.store(kind == Kind::Text, Ordering::Relaxed);
            batch.messages += 1;
        }
        if let Some(joined) = joined {
            batch.data = Bytes::from(joined);
        }
        batch
    }
}
