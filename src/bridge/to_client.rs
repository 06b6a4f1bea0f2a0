//! Backend → client: each backend read becomes one message, and the next read waits until that
//! message has been handed to the client's socket. The read buffer is allocated only once the
//! backend is readable, so an idle session holds none, and it becomes the frame: the payload is
//! read in after [`HEADROOM`] bytes and written to the client's socket as it is, not copied into
//! tungstenite's write buffer ([`crate::frames`]). In the client role each frame is masked with a
//! key of its own, as RFC 6455 §5.3 requires of a client.
//!
//! # Read sizes
//!
//! A read buffer is held whole until the client has taken the message read into it, so reads
//! start at [`FIRST_READ_BYTES`] (64 KiB, or `backend_read_bytes` if that is smaller), double
//! while they come back full, up to `backend_read_bytes` (a bulk stream gets there in two reads),
//! and halve, back to the first size, while they come back less than half full
//! ([`next_read_size`]). After a read of less than [`SMALL_READ_BYTES`] (1 KiB), the next read
//! goes to a buffer of that size on the stack first and, if that was all there was, into a frame
//! buffer of just its size; if it filled the stack buffer, the read goes on in a buffer of the
//! read size, so a large message after small ones is not split ([`poll_read_frame`];
//! docs/performance.md, items 14 and 15). Elsewhere this is "the read-size rule".
//!
//! Text mode carries an incomplete trailing UTF-8 sequence (at most 3 bytes) over to the next
//! read; bytes that can never be UTF-8 end the session.

use std::io;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use rustls::crypto::SecureRandom;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::io::poll_read_buf;
use tokio_util::sync::CancellationToken;
use tungstenite::protocol::Role;

use super::client::{Client, Seen};
use super::counting::DirectionMeter;
use super::{End, Framing, Relay};
use crate::control::Control;
use crate::frames::{self, HEADROOM};
use crate::readahead::ReadReady;
use crate::shutdown::Cancelled;

/// Relays what the backend sends (`from_backend`) to the client until either ends or `stop` is
/// cancelled between messages.
#[allow(clippy::manual_async_fn)] // An `async fn` would hold its arguments twice.
pub(super) fn backend_to_client<'a, R, C>(
    from_backend: &'a mut R,
    client: &'a Client<'_, C>,
    options: Relay,
    seen: &'a Seen,
    stop: &'a CancellationToken,
    meter: &'a mut DirectionMeter<'_>,
) -> impl Future<Output = End> + 'a
where
    R: AsyncRead + ReadReady + Unpin,
    C: AsyncRead + AsyncWrite + Unpin,
{
    async move {
        // Text mode only: the start of a UTF-8 sequence that the last read cut in two (< 4 bytes).
        let mut carry = BytesMut::new();
        let mut sizes = ReadSizes::new(options.backend_read_bytes);
        // A read error that came after bytes the same read delivered.
        let mut failed = None;
        let random = mask_keys(options.role);
        let stopped = Cancelled::new(stop);
        tokio::pin!(stopped);
        loop {
            if let Some(e) = failed.take() {
                return End::BackendFailed(e);
            }
            if let Err(end) = readable(from_backend, stopped.as_mut()).await {
                return end;
            }
            if seen.client_ended.load(Ordering::Relaxed) {
                // The other direction ends the pump once its last write is done; what the backend
                // sends meanwhile stays unread, for `session` to drain and count.
                return std::future::pending().await;
            }
            let mut buf = BytesMut::new();
            match read_once(from_backend, &carry, &sizes, &mut buf, &mut failed).await {
                Some(Ok(0)) if buf.len() == HEADROOM && random.is_some() && options.control => {
                    return Box::pin(half_close(client, seen, random, stopped.as_mut())).await;
                }
                Some(Ok(0)) if buf.len() == HEADROOM => return End::BackendEof,
                // EOF in the middle of a UTF-8 sequence: those bytes can never become text.
                Some(Ok(0)) => return End::BackendNotUtf8,
                Some(Ok(n)) => sizes.after(n),
                // The readiness was stale: wait again.
                None => continue,
                Some(Err(e)) => return End::BackendFailed(e),
            }
            let (as_text, not_utf8) = text_cut(&mut buf, &mut carry, options.framing, seen);
            let len = buf.len() - HEADROOM;
            if len == 0 && not_utf8 {
                return End::BackendNotUtf8;
            } else if len == 0 {
                continue;
            }
            let Some(frame) = frame_of(buf, as_text, random) else { return End::NoMaskKey };
            if let (Err(e), _) = meter.write(len, client.send(frame, seen)).await {
                return End::ClientWriteFailed(e);
            }
            meter.relayed(len, 1);
            if not_utf8 {
                return End::BackendNotUtf8;
            }
        }
    }
}

/// The client role's end of the local stream with the control channel on: the server is told
/// `shutdown_write` (its backend then sees EOF) and the pump goes on relaying the server's data
/// to the local stream until the server closes (which ends the other direction, and the pump).
async fn half_close<C: AsyncRead + AsyncWrite + Unpin>(
    client: &Client<'_, C>,
    seen: &Seen,
    random: Option<&dyn SecureRandom>,
    stopped: Pin<&mut Cancelled<'_>>,
) -> End {
    let buf = Control::ShutdownWrite.frame_buffer(HEADROOM);
    let Some(frame) = frame_of(buf, true, random) else { return End::NoMaskKey };
    if let Err(e) = client.send(frame, seen).await {
        return End::ClientWriteFailed(e);
    }
    stopped.await;
    End::Stopped
}

/// The client role's source of mask keys: rustls's, a CSPRNG. `None` for a server.
fn mask_keys(role: Role) -> Option<&'static dyn SecureRandom> {
    matches!(role, Role::Client).then(|| crate::tls::provider().secure_random)
}

/// Whether `buf` goes as text, and, if so, cuts it to valid UTF-8 (an incomplete sequence at its
/// end moves to `carry`); also whether bytes that can never be UTF-8 followed, which end the
/// session after the valid text before them.
fn text_cut(buf: &mut BytesMut, carry: &mut BytesMut, framing: Framing, seen: &Seen) -> (bool, bool) {
    carry.clear();
    let as_text = framing.is_text(seen);
    (as_text, as_text && cut_to_utf8(buf, carry))
}

/// Waits until the backend stream may be read, or until a stop: its own readiness, not
/// `readable()`, which queues a waiter on every wait (docs/performance.md, item 15). A plain
/// function, not an `async fn`: the relay's own future holds its state.
fn readable<'a, R: ReadReady>(
    from_backend: &'a R,
    mut stopped: Pin<&'a mut Cancelled<'_>>,
) -> impl Future<Output = Result<(), End>> + 'a {
    std::future::poll_fn(move |cx| {
        if stopped.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Err(End::Stopped));
        }
        from_backend.poll_read_ready(cx).map_err(End::BackendFailed)
    })
}

/// One read into a new frame buffer, `buf` ([`poll_read_frame`]), through `poll_read`, which
/// clears the socket's readiness after a read that did not fill the buffer (docs/performance.md,
/// item 5). `None` when the readiness was stale.
fn read_once<'a, R: AsyncRead + Unpin>(
    from_backend: &'a mut R,
    carry: &'a [u8],
    sizes: &'a ReadSizes,
    buf: &'a mut BytesMut,
    failed: &'a mut Option<io::Error>,
) -> impl Future<Output = Option<io::Result<usize>>> + 'a {
    std::future::poll_fn(move |cx| {
        match poll_read_frame(from_backend, cx, carry, sizes.small, sizes.next, buf, failed) {
            Poll::Pending => Poll::Ready(None),
            Poll::Ready(r) => Poll::Ready(Some(r)),
        }
    })
}

/// `buf` as a frame for the client; in the client role (`random` given), masked with a fresh key.
/// `None` when the source of randomness fails.
fn frame_of(buf: BytesMut, as_text: bool, random: Option<&dyn SecureRandom>) -> Option<Bytes> {
    let Some(random) = random else {
        return Some(frames::frame(buf, as_text));
    };
    let mut key = [0; 4];
    random.fill(&mut key).ok()?;
    Some(frames::frame_masked(buf, as_text, key))
}

/// Text mode: cuts the frame buffer `buf` to its longest valid UTF-8 payload, keeping an
/// incomplete trailing sequence in `carry`; returns whether the bytes after the valid text can
/// never be UTF-8.
fn cut_to_utf8(buf: &mut BytesMut, carry: &mut BytesMut) -> bool {
    let (valid, invalid) = utf8_prefix(&buf[HEADROOM..]);
    if !invalid {
        // A copy of at most 3 bytes, so the read buffer is not kept alive by it.
        *carry = BytesMut::from(&buf[HEADROOM + valid..]);
    }
    buf.truncate(HEADROOM + valid);
    invalid
}

/// Where the read-size rule (module doc) stands.
struct ReadSizes {
    /// The next read's size.
    next: usize,
    /// The first read's size, and the smallest reads shrink back to.
    first: usize,
    /// `backend_read_bytes`.
    most: usize,
    /// Whether the last read was small: the next one then goes through the stack.
    small: bool,
}

impl ReadSizes {
    fn new(most: usize) -> Self {
        let first = most.min(FIRST_READ_BYTES);
        ReadSizes { next: first, first, most, small: true }
    }

    /// A read of `self.next` bytes brought `n`.
    fn after(&mut self, n: usize) {
        self.small = n < SMALL_READ_BYTES;
        self.next = next_read_size(self.next, n, self.first, self.most);
    }
}

/// Largest read taken on the stack first while the backend sends small messages.
pub(super) const SMALL_READ_BYTES: usize = 1024;

/// The first backend read's size, and the smallest reads shrink back to.
pub(super) const FIRST_READ_BYTES: usize = 64 * 1024;

/// One read from the backend into a new frame buffer, `buf`: [`HEADROOM`] bytes, then `carry`,
/// then at most `size` bytes read; returns the bytes read. `small` and the stack buffer are the
/// read-size rule's (module doc). An error in the read that goes on after a full stack buffer is
/// left in `failed`, after the bytes already read.
pub(super) fn poll_read_frame<R: AsyncRead + Unpin>(
    from_backend: &mut R,
    cx: &mut Context<'_>,
    carry: &[u8],
    small: bool,
    size: usize,
    buf: &mut BytesMut,
    failed: &mut Option<io::Error>,
) -> Poll<io::Result<usize>> {
    let new_buf = |payload: usize| {
        let mut buf = BytesMut::with_capacity(HEADROOM + carry.len() + payload);
        buf.extend_from_slice(&[0; HEADROOM]);
        buf.extend_from_slice(carry);
        buf
    };
    if !small {
        *buf = new_buf(size);
        return poll_read_buf(Pin::new(from_backend), cx, buf);
    }
    let mut stack = [std::mem::MaybeUninit::<u8>::uninit(); SMALL_READ_BYTES];
    let mut read = tokio::io::ReadBuf::uninit(&mut stack);
    std::task::ready!(Pin::new(&mut *from_backend).poll_read(cx, &mut read))?;
    let got = read.filled();
    if got.len() < SMALL_READ_BYTES || size <= SMALL_READ_BYTES {
        *buf = new_buf(got.len());
        buf.extend_from_slice(got);
        return Poll::Ready(Ok(got.len()));
    }
    *buf = new_buf(size);
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

/// The size of the backend read after one of `size` bytes that read `n`, by the read-size rule
/// (module doc), between `least` and `most`.
pub(super) fn next_read_size(size: usize, n: usize, least: usize, most: usize) -> usize {
    match n {
        n if n >= size => (2 * size).min(most),
        n if n < size / 2 => (size / 2).max(least),
        _ => size,
    }
}

/// The length of the longest valid UTF-8 prefix of `bytes`, and whether the bytes after it can
/// never be UTF-8 (rather than being the start of a sequence that a later read may complete).
pub(super) fn utf8_prefix(bytes: &[u8]) -> (usize, bool) {
    match std::str::from_utf8(bytes) {
        Ok(_) => (bytes.len(), false),
        Err(e) => (e.valid_up_to(), e.error_len().is_some()),
    }
}
