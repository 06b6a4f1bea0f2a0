//! The WebSocket ⇄ TCP pump: moves bytes both ways at once until one side ends.
//!
//! Client → backend: each WebSocket message (binary, or text as its UTF-8 bytes) is written to the
//! backend whole before the next message is waited for. Messages that have already arrived when
//! one is written (a burst of small ones, readable without waiting) are joined
//! into the same write, up to `client_batch_bytes`, so a burst costs one system call rather than
//! one per message; nothing ever waits to be joined. At most one message (bounded by the
//! WebSocket's `max_message_size`) plus one batch is held per session in that direction.
//!
//! Backend → client: each read becomes one message, and the next read waits until that message
//! has been handed to the client socket. Reads start at 64 KiB and double while they come back
//! full, up to `backend_read_bytes`; after a small read (under 1 KiB) the next one goes to the
//! stack first and gets a buffer of its own size. The read buffer is
//! allocated only once the backend socket is readable, so an idle session holds none, and it
//! becomes the frame: the payload is read in after room for the header and written to the
//! client's socket as it is, not copied into tungstenite's write buffer ([`crate::frames`]).
//!
//! Text mode carries an incomplete trailing UTF-8 sequence (at most 3 bytes) over to the next
//! read; bytes that can never be UTF-8 end the session.
//!
//! The pump only reports how it ended ([`End`]); it sends no close frame and picks no close code.
//! That belongs to `session`, the one place that sees both sides. The pump knows nothing of
//! config, routes or HTTP, so the planned client mode can reuse it over any WebSocket built on a
//! [`FrameGate`](crate::frames::FrameGate).
//!
//! A stop request is honoured only between messages: a message already read from one side is
//! written to the other (within `finish_timeout`) before the pump returns [`End::Stopped`]. Bytes
//! still in the kernel's buffers, not yet read, are not delivered.

use std::io;
use std::pin::Pin;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::Poll;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::{Stream, StreamExt};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio_util::io::poll_read_buf;
use tokio_util::sync::CancellationToken;
use tungstenite::protocol::frame::CloseFrame;
use tungstenite::{Error as WsError, Message};

use crate::frames::{self, ClientWs, HEADROOM};
use crate::metrics::Flow;
use crate::shutdown::Cancelled;

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
}

/// Bytes and messages moved by one session, per direction.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    /// Client → backend.
    pub to_backend: Tally,
    /// Backend → client.
    pub to_client: Tally,
    /// Backend bytes read after the client closed, and so never delivered.
    pub dropped_bytes: u64,
}

/// One direction of one session.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Tally {
    /// Payload bytes written to the destination.
    pub bytes: u64,
    /// Messages relayed.
    pub messages: u64,
    /// Most bytes held at once (read from one side, not yet written to the other).
    pub peak_buffered: u64,
}

/// The route's metrics for both directions.
#[derive(Debug, Clone, Copy)]
pub struct Flows<'a> {
    /// Client → backend.
    pub to_backend: &'a Flow,
    /// Backend → client.
    pub to_client: &'a Flow,
}

/// One direction's session tally and the route's shared metrics, updated together.
pub(crate) struct Meter<'a> {
    flow: &'a Flow,
    tally: &'a mut Tally,
}

impl<'a> Meter<'a> {
    pub(crate) fn new(flow: &'a Flow, tally: &'a mut Tally) -> Self {
        Meter { flow, tally }
    }

    /// Runs `write`, which hands `n` bytes read from one side to the other. The route's
    /// buffered-bytes gauge counts them only once the write has to wait: a write the socket
    /// takes at once (nearly every one) then costs no update of a gauge that all the route's
    /// sessions share, and two such updates per message measured about 1 % of the relay's CPU
    /// with 50 sessions trading small messages.
    ///
    /// Also returns whether the write had to wait (the task gave way to the runtime).
    pub(crate) async fn write<F: Future>(&mut self, n: usize, write: F) -> (F::Output, bool) {
        self.tally.peak_buffered = self.tally.peak_buffered.max(n as u64);
        let mut write = std::pin::pin!(write);
        if let Poll::Ready(done) = std::future::poll_fn(|cx| Poll::Ready(write.as_mut().poll(cx))).await {
            return (done, false);
        }
        let _held = self.flow.hold(n);
        (write.await, true)
    }

    /// `messages` messages, `n` bytes in all, were written to their destination.
    pub(crate) fn relayed(&mut self, n: usize, messages: u64) {
        self.tally.bytes += n as u64;
        self.tally.messages += messages;
        self.flow.bytes.increment(n as u64);
        self.flow.messages.increment(messages);
    }
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
}

/// Pumps `ws` ⇄ `backend` until one side ends, and returns how, with the backend socket (so the
/// caller can shut it down or drain it as the ending requires).
pub async fn run<C>(
    ws: &mut ClientWs<C>,
    backend: TcpStream,
    options: Options,
    stop: &CancellationToken,
    stats: &mut Stats,
    flows: Flows<'_>,
) -> (End, TcpStream)
where
    C: AsyncRead + AsyncWrite + Unpin + Send,
{
    let (mut from_backend, mut to_backend) = backend.into_split();
    let client = Client(Mutex::new(ws));
    let mut stream = futures_util::stream::poll_fn(|cx| client.with(|ws| ws.poll_next_unpin(cx)));
    let mut up_meter = Meter::new(flows.to_backend, &mut stats.to_backend);
    let mut down_meter = Meter::new(flows.to_client, &mut stats.to_client);
    let seen = Seen::default();
    // Both directions stop at a message boundary once `finish` is cancelled: on a stop request,
    // or after the backend's last byte was delivered. The direction still running then gets up
    // to `finish_timeout` to complete the message it is writing, so nothing read is lost.
    let finish = stop.child_token();
    let end = {
        let up = client_to_backend(&mut stream, &mut to_backend, options, &seen, &finish, &mut up_meter);
        let down = backend_to_client(&mut from_backend, &client, options, &seen, &finish, &mut down_meter);
        tokio::pin!(up, down);
        // The two directions take turns at going first, so one that is always ready cannot
        // starve the other (what `select!` does with a random number on every poll).
        let mut up_first = false;
        let (end, up_running) = std::future::poll_fn(|cx| {
            up_first = !up_first;
            for up_turn in [up_first, !up_first] {
                let polled = match up_turn {
                    true => up.as_mut().poll(cx).map(|end| (end, false)),
                    false => down.as_mut().poll(cx).map(|end| (end, true)),
                };
                if polled.is_ready() {
                    return polled;
                }
            }
            Poll::Pending
        })
        .await;
        match end {
            End::Stopped | End::BackendEof => {
                finish.cancel();
                let rest = async { if up_running { up.as_mut().await } else { down.as_mut().await } };
                // Whatever the other direction reports now is secondary: the first ending decides.
                let _ = tokio::time::timeout(options.finish_timeout, rest).await;
                end
            }
            // A write to the backend failed: often because it sent its last reply and closed.
            // Deliver what it sent before deciding; a clean EOF then means it simply finished.
            End::BackendFailed(e) if up_running => End::BackendFailed(e),
            End::BackendFailed(e) => match tokio::time::timeout(options.finish_timeout, down.as_mut()).await {
                Ok(End::BackendEof) => End::BackendEof,
                _ => End::BackendFailed(e),
            },
            other => other,
        }
    };
    let backend = from_backend.reunite(to_backend).expect("halves of the same stream");
    (end, backend)
}

/// What the client → backend direction has seen of the client, for the other direction. Both
/// run in one task, so Relaxed is enough; the atomics only make the shared borrow `Send`.
#[derive(Default)]
struct Seen {
    /// Mirror framing: whether the client's last data message was text.
    last_text: AtomicBool,
    /// The client's stream has ended (its Close, an error, its socket) while the messages read
    /// before that are still being written to the backend. Nothing more goes to the client then:
    /// after its Close, tungstenite may write the reply at any flush, and no data frame may
    /// follow that.
    client_ended: AtomicBool,
}

/// The client's WebSocket, shared by the two directions: one reads messages from it, the other
/// writes frames to it. They run in one task and never hold it across an await, so the lock is
/// never contended; it is there so the shared borrow is `Send` (as `split`'s lock would be).
struct Client<'a, C>(Mutex<&'a mut ClientWs<C>>);

impl<C: AsyncRead + AsyncWrite + Unpin> Client<'_, C> {
    fn with<R>(&self, f: impl FnOnce(&mut ClientWs<C>) -> R) -> R {
        f(&mut self.0.lock().expect("never held across a panic"))
    }

    /// Writes one frame (from `frames::frame`) to the client, unless the client's stream has
    /// ended before the frame could start (`poll_send` may first have to let tungstenite finish
    /// a write, which may then include its reply to the client's Close): then it never
    /// completes, and the other direction ends the pump.
    async fn send(&self, frame: Bytes, seen: &Seen) -> Result<(), WsError> {
        let mut frame = Some(frame);
        std::future::poll_fn(|cx| {
            if frame.is_some() && seen.client_ended.load(Ordering::Relaxed) {
                return Poll::Pending;
            }
            self.with(|ws| frames::poll_send(ws, cx, &mut frame))
        })
        .await
    }
}

async fn client_to_backend<S>(
    stream: &mut S,
    to_backend: &mut OwnedWriteHalf,
    options: Options,
    seen: &Seen,
    stop: &CancellationToken,
    meter: &mut Meter<'_>,
) -> End
where
    S: Stream<Item = Result<Message, WsError>> + Unpin,
{
    let stopped = Cancelled::new(stop);
    tokio::pin!(stopped);
    // A message already read that did not fit the last batch; it goes first in the next one.
    let mut carried: Option<(Kind, Bytes)> = None;
    // Whether the client stream's last poll returned Pending and the task has not given way
    // since: the stream has this task's waker, so polling it again now would only repeat that
    // Pending (one poll through tungstenite, hyper and the socket's readiness per message).
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
                match data_of(next, options.accept) {
                    Ok(Some(message)) => (message, false),
                    Ok(None) => continue,
                    Err(end) => return end,
                }
            }
        };
        let batch = match is_stopping {
            true => Batch::alone(first, &seen.last_text, After::End(End::Stopped)),
            false => gather(stream, first, &options, seen).await,
        };
        // The carried message was read too and waits with the batch.
        let held = batch.data.len() + batch.after.carried_len();
        let write = meter.write(held, to_backend.write_all(&batch.data));
        let (written, waited) = match &batch.after {
            // The last messages before the client's Close (or its error, or its socket's end)
            // get `finish_timeout` to reach the backend; then the client's ending decides,
            // delivered or not, so a backend that stopped reading (or failed) cannot keep the
            // client waiting for its close. (A stop is bounded by `run`.)
            After::End(end) if !matches!(end, End::Stopped) => {
                match tokio::time::timeout(options.finish_timeout, write).await {
                    Ok((Ok(()), waited)) => (Ok(()), waited),
                    Ok((Err(_), _)) | Err(_) => match batch.after {
                        After::End(end) => return end,
                        _ => unreachable!("matched above"),
                    },
                }
            }
            _ => write.await,
        };
        if let Err(e) = written {
            return End::BackendFailed(e);
        }
        meter.relayed(batch.data.len(), batch.messages);
        match batch.after {
            After::More => {}
            After::Drained => registered = !waited,
            After::Carried(message) => carried = Some(message),
            After::End(end) => return end,
        }
    }
}

/// Gives the task back to the runtime once, until one of the wakers it registered wakes it.
///
/// Sound only where a poll in this task has just returned Pending (so a waker is registered)
/// and the task has not given way since (so no wake-up has been spent): a wake-up that comes
/// while the task runs makes the runtime poll it again, and a spurious poll just returns Ready.
/// The task's other wake-up sources must stay registered across such a wait too: the stop
/// check (`Cancelled`) does, until the token is cancelled.
async fn until_woken() {
    let mut first = true;
    std::future::poll_fn(|_| match std::mem::take(&mut first) {
        true => Poll::Pending,
        false => Poll::Ready(()),
    })
    .await
}

/// Whether `fut` is ready now, without waiting.
async fn is_ready<F: Future + Unpin>(mut fut: F) -> bool {
    std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut fut).poll(cx).is_ready())).await
}

/// What one item from the client's stream means for the backend: a data message's kind and
/// bytes, nothing (control messages: tungstenite answers pings, pongs carry nothing), or the end
/// of the pump.
fn data_of(next: Option<Result<Message, WsError>>, accept: Accept) -> Result<Option<(Kind, Bytes)>, End> {
    match next {
        None => Err(End::ClientGone),
        Some(Err(e)) => Err(End::ClientFailed(e)),
        Some(Ok(Message::Close(frame))) => Err(End::ClientClosed(frame)),
        Some(Ok(message)) => match Kind::of(&message) {
            None => Ok(None),
            Some(kind) if !accept.allows(kind) => Err(End::ClientUnsupported(kind)),
            Some(kind) => Ok(Some((kind, message.into_data()))),
        },
    }
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
}

impl After {
    fn carried_len(&self) -> usize {
        match self {
            After::Carried((_, data)) => data.len(),
            _ => 0,
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
async fn gather<S>(stream: &mut S, first: (Kind, Bytes), options: &Options, seen: &Seen) -> Batch
where
    S: Stream<Item = Result<Message, WsError>> + Unpin,
{
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
        let (kind, data) = match data_of(next, options.accept) {
            Ok(Some(message)) => message,
            Ok(None) => continue,
            Err(end) => {
                seen.client_ended.store(true, Ordering::Relaxed);
                batch.after = After::End(end);
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

async fn backend_to_client<C>(
    from_backend: &mut OwnedReadHalf,
    client: &Client<'_, C>,
    options: Options,
    seen: &Seen,
    stop: &CancellationToken,
    meter: &mut Meter<'_>,
) -> End
where
    C: AsyncRead + AsyncWrite + Unpin,
{
    // Text mode only: the start of a UTF-8 sequence that the last read cut in two (< 4 bytes).
    let mut carry = BytesMut::new();
    // The next read's size. A read buffer is held whole until the client has taken the message
    // read into it, so reads start at `FIRST_READ_BYTES` (a small message does not hold
    // `backend_read_bytes`), double, up to `backend_read_bytes`, while they come back full (a
    // bulk stream gets there in two reads), and halve, back to the first size, while they come
    // back less than half full.
    let first_read = options.backend_read_bytes.min(FIRST_READ_BYTES);
    let mut read_size = first_read;
    // Whether the last read was small: the next one then goes through the stack.
    let mut small = true;
    // A read error that came after bytes the same read delivered.
    let mut failed = None;
    let stopped = Cancelled::new(stop);
    tokio::pin!(stopped);
    loop {
        if let Some(e) = failed.take() {
            return End::BackendFailed(e);
        }
        tokio::select! {
            biased;
            _ = stopped.as_mut() => return End::Stopped,
            // `poll_read_ready`, not `readable()`: the socket's own waker slot rather than a
            // waiter queued and unqueued on every wait (about 200 instructions per message,
            // callgrind).
            ready = std::future::poll_fn(|cx| from_backend.as_ref().poll_read_ready(cx)) => {
                if let Err(e) = ready {
                    return End::BackendFailed(e);
                }
            }
        }
        if seen.client_ended.load(Ordering::Relaxed) {
            // The other direction ends the pump once its last write is done; what the backend
            // sends meanwhile stays unread, for `session` to drain and count.
            return std::future::pending().await;
        }
        // One read through `poll_read`, not `try_read_buf`: tokio clears the socket's readiness
        // after a read that did not fill the buffer, which saves the read that would only
        // return EAGAIN (`perf stat`: one system call fewer per message). Pending means the
        // readiness was stale; the loop then waits again.
        let mut buf = BytesMut::new();
        let read = std::future::poll_fn(|cx| {
            match poll_read_frame(from_backend, cx, &carry, small, read_size, &mut buf, &mut failed) {
                Poll::Pending => Poll::Ready(None),
                Poll::Ready(r) => Poll::Ready(Some(r)),
            }
        });
        match read.await {
            Some(Ok(0)) if buf.len() == HEADROOM => return End::BackendEof,
            // EOF in the middle of a UTF-8 sequence: those bytes can never become text.
            Some(Ok(0)) => return End::BackendNotUtf8,
            Some(Ok(n)) => {
                small = n < SMALL_READ_BYTES;
                read_size = next_read_size(read_size, n, first_read, options.backend_read_bytes);
            }
            None => continue,
            Some(Err(e)) => return End::BackendFailed(e),
        }
        carry.clear();
        let as_text = match options.framing {
            Framing::Binary => false,
            Framing::Text => true,
            Framing::Mirror => seen.last_text.load(Ordering::Relaxed),
        };
        // Bytes that can never be UTF-8 end the session, after the valid text before them.
        let mut not_utf8 = false;
        if as_text {
            let (valid, invalid) = utf8_prefix(&buf[HEADROOM..]);
            if !invalid {
                // A copy of at most 3 bytes, so the read buffer is not kept alive by it.
                carry = BytesMut::from(&buf[HEADROOM + valid..]);
            }
            buf.truncate(HEADROOM + valid);
            not_utf8 = invalid;
            if valid == 0 {
                if not_utf8 {
                    return End::BackendNotUtf8;
                }
                continue;
            }
        }
        let len = buf.len() - HEADROOM;
        if let (Err(e), _) = meter.write(len, client.send(frames::frame(buf, as_text), seen)).await {
            return End::ClientWriteFailed(e);
        }
        meter.relayed(len, 1);
        if not_utf8 {
            return End::BackendNotUtf8;
        }
    }
}

/// Largest read taken on the stack first while the backend sends small messages.
const SMALL_READ_BYTES: usize = 1024;

/// One read from the backend into a new frame buffer, `buf`: [`HEADROOM`] bytes, then `carry`,
/// then at most `size` bytes read; returns the bytes read. After a small read (`small`), the read
/// goes to the stack first, up to [`SMALL_READ_BYTES`], and if that is all there was, the buffer
/// is made just large enough for it: a small message then costs one small allocation, served
/// from the allocator's per-thread cache, instead of a 64 KiB one (callgrind, 64-byte round
/// trips: about 300 instructions fewer each). If it filled the stack buffer, more is likely
/// waiting: the bytes go into a buffer of `size` and the read goes on there, without waiting, so
/// a large message after small ones is not split. An error in that second read is left in
/// `failed`, after the bytes already read.
fn poll_read_frame(
    from_backend: &mut OwnedReadHalf,
    cx: &mut std::task::Context<'_>,
    carry: &[u8],
    small: bool,
    size: usize,
    buf: &mut BytesMut,
    failed: &mut Option<io::Error>,
) -> Poll<io::Result<usize>> {
    let frame_of = |payload: usize| {
        let mut buf = BytesMut::with_capacity(HEADROOM + carry.len() + payload);
        buf.extend_from_slice(&[0; HEADROOM]);
        buf.extend_from_slice(carry);
        buf
    };
    if !small {
        *buf = frame_of(size);
        return poll_read_buf(Pin::new(from_backend), cx, buf);
    }
    let mut stack = [std::mem::MaybeUninit::<u8>::uninit(); SMALL_READ_BYTES];
    let mut read = tokio::io::ReadBuf::uninit(&mut stack);
    std::task::ready!(Pin::new(&mut *from_backend).poll_read(cx, &mut read))?;
    let got = read.filled();
    if got.len() < SMALL_READ_BYTES || size <= SMALL_READ_BYTES {
        *buf = frame_of(got.len());
        buf.extend_from_slice(got);
        return Poll::Ready(Ok(got.len()));
    }
    *buf = frame_of(size);
    buf.extend_from_slice(got);
    match poll_read_buf(Pin::new(from_backend), cx, buf) {
        Poll::Ready(Ok(more)) => Poll::Ready(Ok(got.len() + more)),
        Poll::Pending => Poll::Ready(Ok(got.len())),
        Poll::Ready(Err(e)) => {
            *failed = Some(e);
            Poll::Ready(Ok(got.len()))
        }
    }
}

/// The first backend read's size, and the smallest reads shrink back to.
const FIRST_READ_BYTES: usize = 64 * 1024;

/// The size of the backend read after one of `size` bytes that read `n`: double (up to `most`)
/// when it came back full, half (down to `least`) when it came back less than half full.
fn next_read_size(size: usize, n: usize, least: usize, most: usize) -> usize {
    match n {
        n if n >= size => (2 * size).min(most),
        n if n < size / 2 => (size / 2).max(least),
        _ => size,
    }
}

/// The length of the longest valid UTF-8 prefix of `bytes`, and whether the bytes after it can
/// never be UTF-8 (rather than being the start of a sequence that a later read may complete).
fn utf8_prefix(bytes: &[u8]) -> (usize, bool) {
    match std::str::from_utf8(bytes) {
        Ok(_) => (bytes.len(), false),
        Err(e) => (e.valid_up_to(), e.error_len().is_some()),
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
mod tests {
    use super::*;

    /// A complete string is valid whole; a sequence cut at the end is left for the next read;
    /// bytes that can never be UTF-8 are reported, with the valid text before them counted.
    #[test]
    fn utf8_prefix_leaves_an_incomplete_tail_and_rejects_garbage() {
        assert_eq!(utf8_prefix("héllo".as_bytes()), (6, false));
        let euro = "€".as_bytes(); // 3 bytes
        assert_eq!(utf8_prefix(&[b"ab", &euro[..2]].concat()), (2, false));
        assert_eq!(utf8_prefix(b"ok\xff\xfe"), (2, true));
        assert_eq!(utf8_prefix(&euro[..1]), (0, false));
    }

    /// A connection to a backend whose socket buffers towards it are full, so that the next write
    /// waits: the backend's end, the gateway's write half (and its read half, kept open), and how
    /// many bytes filled them.
    async fn full_backend() -> (TcpStream, OwnedWriteHalf, OwnedReadHalf, usize) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let gateway_side = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (backend, _) = listener.accept().await.unwrap();
        let (from_backend, to_backend) = gateway_side.into_split();
        let mut filled = 0;
        while let Ok(n) = to_backend.try_write(&[0u8; 64 * 1024]) {
            filled += n;
        }
        (backend, to_backend, from_backend, filled)
    }

    /// Runs the client → backend direction over `client` (a channel's messages) until it ends.
    async fn pump_client(
        client: tokio::sync::mpsc::UnboundedReceiver<Result<Message, WsError>>,
        to_backend: &mut OwnedWriteHalf,
        finish_timeout: Duration,
        seen: &Seen,
    ) -> End {
        let mut client = client;
        let mut stream = futures_util::stream::poll_fn(move |cx| client.poll_recv(cx));
        let options = Options {
            backend_read_bytes: 1024,
            client_batch_bytes: 64 * 1024,
            framing: Framing::Binary,
            accept: Accept { text: true, binary: true },
            finish_timeout,
        };
        let (flow, mut tally, stop) = (Flow::detached(), Tally::default(), CancellationToken::new());
        let mut meter = Meter::new(&flow, &mut tally);
        client_to_backend(&mut stream, to_backend, options, seen, &stop, &mut meter).await
    }

    /// The case `until_woken` must not be used in, made to happen every time: a message is read
    /// with nothing behind it (the client stream returns Pending), its write to a full backend
    /// socket has to wait, and the next message arrives during that wait, spending the wake-up
    /// the stream had registered. Once the backend reads again, the pump must read that message
    /// itself; waiting for another wake-up would stall the session for good.
    #[tokio::test]
    async fn a_message_that_arrives_while_a_write_waits_is_relayed() {
        let (mut backend, mut to_backend, _from_backend, filled) = full_backend().await;
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let pump =
            tokio::spawn(
                async move { pump_client(rx, &mut to_backend, Duration::from_secs(1), &Seen::default()).await },
            );
        tx.send(Ok(Message::binary(&b"first"[..]))).unwrap();
        // The pump reads it, finds nothing behind it, and waits to write it.
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!pump.is_finished());
        tx.send(Ok(Message::binary(&b"second"[..]))).unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        // The backend reads again: everything must arrive, the second message included.
        let want = filled + b"firstsecond".len();
        let mut got = Vec::with_capacity(want);
        let read = tokio::time::timeout(Duration::from_secs(5), async {
            let mut buf = vec![0u8; 256 * 1024];
            while got.len() < want {
                let n = backend.read(&mut buf).await.unwrap();
                assert!(n > 0, "the backend socket closed early");
                got.extend_from_slice(&buf[..n]);
            }
        })
        .await;
        assert!(read.is_ok(), "stalled: {} of {want} bytes reached the backend", got.len());
        assert_eq!(&got[filled..], b"firstsecond");
        drop(tx);
        assert!(matches!(pump.await.unwrap(), End::ClientGone));
    }

    /// The client's last message and its Close arrive together, and the backend has stopped
    /// reading: the message gets `finish_timeout` to reach the backend, then the Close ends the
    /// pump (so the session can answer it), and the other direction has been told to send the
    /// client nothing more.
    #[tokio::test]
    async fn a_close_behind_a_stalled_write_ends_the_pump_after_finish_timeout() {
        let (_backend, mut to_backend, _from_backend, _) = full_backend().await;
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tx.send(Ok(Message::binary(&b"last"[..]))).unwrap();
        tx.send(Ok(Message::Close(None))).unwrap();
        let seen = Seen::default();
        let started = std::time::Instant::now();
        let pump = pump_client(rx, &mut to_backend, Duration::from_millis(200), &seen);
        let end = tokio::time::timeout(Duration::from_secs(5), pump).await.expect("the pump waited on the backend");
        assert!(matches!(end, End::ClientClosed(None)), "{end:?}");
        assert!(started.elapsed() >= Duration::from_millis(200), "the message got its finish_timeout");
        assert!(seen.client_ended.load(Ordering::Relaxed), "the backend → client direction was told");
    }

    /// The same with a backend that has reset the connection: the failed write does not make the
    /// backend's failure the ending; the client's Close still decides, at once.
    #[tokio::test]
    async fn a_close_behind_a_failed_write_still_ends_the_pump_as_closed() {
        let (backend, mut to_backend, _from_backend, _) = full_backend().await;
        socket2::SockRef::from(&backend).set_linger(Some(Duration::ZERO)).unwrap();
        drop(backend);
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tx.send(Ok(Message::binary(&b"last"[..]))).unwrap();
        tx.send(Ok(Message::Close(None))).unwrap();
        let seen = Seen::default();
        let pump = pump_client(rx, &mut to_backend, Duration::from_secs(30), &seen);
        let end = tokio::time::timeout(Duration::from_secs(5), pump).await.expect("the pump waited");
        assert!(matches!(end, End::ClientClosed(None)), "{end:?}");
    }

    /// Reads double while they come back full, up to the most; halve while they come back less
    /// than half full, down to the least; otherwise keep their size.
    #[test]
    fn read_sizes_grow_while_full_and_shrink_while_mostly_empty() {
        const K: usize = 1024;
        let (least, most) = (64 * K, 256 * K);
        let mut size = least;
        let mut sizes = Vec::new();
        for n in [64 * K, 128 * K, 256 * K, 200 * K, 100 * K, 10, 10] {
            size = next_read_size(size, n, least, most);
            sizes.push(size / K);
        }
        assert_eq!(sizes, [128, 256, 256, 256, 128, 64, 64]);
        // A bound below 64 KiB is both the least and the most.
        assert_eq!(next_read_size(4 * K, 4 * K, 4 * K, 4 * K), 4 * K);
        assert_eq!(next_read_size(4 * K, 1, 4 * K, 4 * K), 4 * K);
    }

    /// A frame that has not started when the client's stream ends is never sent: here it waits
    /// behind a message tungstenite half-wrote to a client that is not reading; the client's
    /// stream then ends, the client reads everything, and the frame must not follow (after a
    /// client's Close, what tungstenite finishes first may be its reply).
    #[tokio::test]
    async fn a_frame_not_started_when_the_client_ends_is_never_sent() {
        use futures_util::SinkExt;
        use hyper_tungstenite::WebSocketStream;
        use tungstenite::protocol::Role;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let peer = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let mut server = WebSocketStream::from_raw_socket(frames::FrameGate::new(server), Role::Server, None).await;
        let mut peer = WebSocketStream::from_raw_socket(peer, Role::Client, None).await;
        let big = vec![7u8; 8 << 20];
        let mut sending = server.send(Message::binary(big.clone()));
        assert!(!is_ready(&mut sending).await, "8 MiB do not fit in the socket buffers");
        drop(sending);
        let seen = Seen::default();
        let client = Client(Mutex::new(&mut server));
        let mut buf = BytesMut::from(&[0u8; HEADROOM][..]);
        buf.extend_from_slice(b"late");
        let mut send = std::pin::pin!(client.send(frames::frame(buf, false), &seen));
        assert!(!is_ready(send.as_mut()).await, "the frame waits for tungstenite's message");
        seen.client_ended.store(true, Ordering::Relaxed);
        let reader = tokio::spawn(async move {
            let first = peer.next().await.unwrap().unwrap();
            let next = tokio::time::timeout(Duration::from_millis(300), peer.next()).await;
            (first, next.is_ok())
        });
        // tungstenite finishes its message (in the pump, the session's close does that) while
        // the send is polled again: it must not start the frame.
        let flush = std::future::poll_fn(|cx| client.with(|ws| ws.poll_flush_unpin(cx)));
        tokio::time::timeout(Duration::from_secs(10), flush).await.expect("flushed").unwrap();
        assert!(tokio::time::timeout(Duration::from_millis(200), send.as_mut()).await.is_err());
        let (first, more) = tokio::time::timeout(Duration::from_secs(10), reader).await.expect("read").unwrap();
        assert!(first == Message::Binary(big.into()), "tungstenite's message arrives whole");
        assert!(!more, "nothing may follow it");
    }

    /// After small reads, a large message already waiting is read whole (the stack read fills,
    /// and the read goes on in a buffer of the read size), and a small one gets a buffer of just
    /// its size.
    #[tokio::test]
    async fn reads_after_small_ones_are_whole_and_small_ones_sized() {
        use tokio::io::AsyncWriteExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let gateway_side = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (mut backend, _) = listener.accept().await.unwrap();
        let (mut from_backend, _to_backend) = gateway_side.into_split();
        let mut read = async |expect: usize| {
            for _ in 0..100 {
                from_backend.readable().await.unwrap();
                let (mut buf, mut failed) = (BytesMut::new(), None);
                let frame = |cx: &mut std::task::Context<'_>| match poll_read_frame(
                    &mut from_backend,
                    cx,
                    b"",
                    true,
                    64 * 1024,
                    &mut buf,
                    &mut failed,
                ) {
                    Poll::Pending => Poll::Ready(None),
                    Poll::Ready(r) => Poll::Ready(Some(r)),
                };
                if let Some(n) = std::future::poll_fn(frame).await {
                    assert!(failed.is_none());
                    assert_eq!(n.unwrap(), expect, "one read");
                    return buf;
                }
            }
            panic!("never readable");
        };
        let big: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        backend.write_all(&big).await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        let buf = read(big.len()).await;
        assert_eq!(&buf[HEADROOM..], &big[..]);
        backend.write_all(b"hi").await.unwrap();
        let buf = read(2).await;
        assert_eq!(&buf[HEADROOM..], b"hi");
        assert_eq!(buf.capacity(), HEADROOM + 2, "a small read gets a buffer of its size");
    }
}
