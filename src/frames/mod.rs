//! The client's byte stream under tungstenite: data frames to the client written past
//! tungstenite's write buffer, and frames from the client cut to size before tungstenite reads
//! them (`cut`).
//!
//! tungstenite copies every frame it sends into its write buffer before writing it, and keeps
//! that buffer as large as the largest frame it has sent. For the bridge's backend → client
//! direction that is one more copy of every byte, and, after bulk traffic, a buffer of up to
//! `backend_read_bytes` kept for the rest of the session. So the bridge builds each frame itself,
//! in the buffer the backend was read into (the payload lands after [`HEADROOM`] bytes, and the
//! header is written into their end), and writes it straight to the client's socket. When the
//! bridge is the WebSocket's client, it masks the payload there too ([`frame_masked`]).
//!
//! tungstenite still writes to the same socket: pongs and close replies, which it sends from its
//! read side, and the close frame `session` sends through it. [`FrameGate`] is the stream the
//! WebSocket is built on, so it sees every one of those writes, and it keeps frames whole:
//! - one of our frames starts only when tungstenite has nothing half-written ([`poll_send`]
//!   first lets tungstenite finish, through the gate);
//! - while one of ours is half-written, the gate finishes it before passing on any of
//!   tungstenite's writes, whether or not the bridge is still there to drive it (a stop or a
//!   finish timeout may drop the bridge mid-frame; the frame is still completed before the close
//!   frame goes out).
//!
//! On the read side the gate cuts the peer's long data frames into pieces of at most
//! [`PIECE_BYTES`], so a message is held once while tungstenite assembles it, not twice, and
//! notes when the peer's Close frame has been read ([`FrameGate::peer_closed`]); see `cut`.
//!
//! The gate also counts what crosses the client's socket ([`Activity`]), for the session's
//! liveness checks (`bridge::liveness`), which read the counts on their own timer, so the
//! per-message path bumps counters and never reads a clock.

mod cut;

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes, BytesMut};
use futures_util::SinkExt;
use hyper_tungstenite::WebSocketStream;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tungstenite::{Error as WsError, Message};

use cut::Cutter;
pub use cut::PIECE_BYTES;

/// Bytes to leave in front of a payload for the longest header a frame of ours has: 2 bytes, a
/// 64-bit length and, from a client, a 4-byte mask key. A server's frame uses the last 10 at most.
pub const HEADROOM: usize = 14;

/// A WebSocket to the client whose data frames can be written past tungstenite.
pub type ClientWs<S> = WebSocketStream<FrameGate<S>>;

/// The client's byte stream under tungstenite, shared with the frames the bridge writes itself.
#[derive(Debug)]
pub struct FrameGate<S> {
    io: S,
    /// What is still to be written of our last frame; empty (and holding no buffer) otherwise.
    rest: Bytes,
    /// Whether tungstenite's last write stopped short or had to wait: its write buffer then
    /// holds the rest of a frame, which must go out before any of ours.
    short: bool,
    /// The read side: the peer's frames as tungstenite gets them.
    cutter: Cutter,
    /// What has crossed the client's socket, for the liveness checks.
    activity: Activity,
}

/// What has crossed the client's socket so far: counts only ever grow, and the liveness checks
/// compare them between their ticks.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Activity {
    /// Reads from the client that brought bytes (any bytes: a pong may queue behind a large
    /// upload), or an error.
    pub reads: u64,
    /// Messages and control frames read from the client (a fragmented message counts once).
    pub frames_in: u64,
    /// Data messages, either way (pings, pongs and close frames are not data).
    pub data: u64,
}

impl<S> FrameGate<S> {
    /// Wraps the peer's stream, which is at a frame boundary (nothing of it read yet).
    pub fn new(io: S) -> Self {
        FrameGate { io, rest: Bytes::new(), short: false, cutter: Cutter::new(u64::MAX), activity: Activity::default() }
    }

    /// Data frames from the peer announcing more than `max` bytes are passed whole, not cut, so
    /// tungstenite refuses them from their header (its `max_frame_size`, set to the same value)
    /// before reading any of their payload.
    pub fn frame_limit(mut self, max: usize) -> Self {
        self.cutter = Cutter::new(max as u64);
        self
    }

    /// Whether the peer's Close frame has been read from the stream, whole (by tungstenite, or
    /// by whoever reads the gate after it).
    pub fn peer_closed(&self) -> bool {
        self.cutter.peer_closed()
    }

    /// What has crossed the client's socket so far.
    pub fn activity(&self) -> Activity {
        self.activity
    }

    /// Counts `message`, just read from the client by the WebSocket on this gate.
    #[inline(always)]
    pub fn received(&mut self, message: &Message) {
        self.activity.frames_in += 1;
        self.activity.data += u64::from(matches!(message, Message::Text(_) | Message::Binary(_)));
    }

    /// Counts a data message sent to the client through tungstenite (the gate counts its own).
    pub fn sent_data(&mut self) {
        self.activity.data += 1;
    }
}

impl<S: AsyncWrite + Unpin> FrameGate<S> {
    /// Writes the rest of our frame, if any.
    fn poll_rest(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.rest.is_empty() {
            match ready!(Pin::new(&mut self.io).poll_write(cx, &self.rest))? {
                0 => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                n => self.rest.advance(n),
            }
        }
        // An emptied `Bytes` still holds its buffer.
        self.rest = Bytes::new();
        Poll::Ready(Ok(()))
    }
}

/// Turns `buf` ([`HEADROOM`] bytes, then a payload) into one final, unmasked data frame, as a
/// server sends them: its header goes into the end of the headroom, so header and payload go out
/// in one write, and the payload is not copied.
pub fn frame(buf: BytesMut, text: bool) -> Bytes {
    frame_with(buf, text, None)
}

/// The same as [`frame`] for a client, whose frames are masked (RFC 6455 §5.3): the payload is
/// masked in place with `key`, which must be fresh from a strong source of randomness for each
/// frame (so a peer's script cannot choose the bytes on the wire).
pub fn frame_masked(mut buf: BytesMut, text: bool, key: [u8; 4]) -> Bytes {
    apply_mask(&mut buf[HEADROOM..], key);
    frame_with(buf, text, Some(key))
}

/// XORs `payload` with `key` repeated (RFC 6455 §5.3), four bytes at a time.
fn apply_mask(payload: &mut [u8], key: [u8; 4]) {
    let word = u32::from_ne_bytes(key);
    let mut chunks = payload.chunks_exact_mut(4);
    for chunk in &mut chunks {
        let masked = u32::from_ne_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]) ^ word;
        chunk.copy_from_slice(&masked.to_ne_bytes());
    }
    for (byte, k) in chunks.into_remainder().iter_mut().zip(key) {
        *byte ^= k;
    }
}

/// Written out here rather than with tungstenite's `FrameHeader::format` (generic over its
/// writer, and not always inlined): it is on every message to the client (docs/performance.md,
/// item 18). Inlined into each of its two callers, so the server's unmasked frames carry no
/// trace of the client role's mask.
#[inline(always)]
fn frame_with(mut buf: BytesMut, text: bool, mask: Option<[u8; 4]>) -> Bytes {
    let len = buf.len() - HEADROOM;
    let mut header = [0u8; HEADROOM];
    // FIN, and the opcode: 1 text, 2 binary.
    header[0] = 0x80 | if text { 0x1 } else { 0x2 };
    let masked = if mask.is_some() { 0x80 } else { 0 };
    let mut n = match len {
        0..=125 => {
            header[1] = masked | len as u8;
            2
        }
        126..=65535 => {
            header[1] = masked | 126;
            header[2..4].copy_from_slice(&(len as u16).to_be_bytes());
            4
        }
        _ => {
            header[1] = masked | 127;
            header[2..10].copy_from_slice(&(len as u64).to_be_bytes());
            10
        }
    };
    if let Some(key) = mask {
        header[n..n + 4].copy_from_slice(&key);
        n += 4;
    }
    let start = HEADROOM - n;
    buf[start..HEADROOM].copy_from_slice(&header[..n]);
    let mut frame = buf.freeze();
    frame.advance(start);
    frame
}

/// Writes `frame` (from [`frame`]) to the client and flushes it: first whatever tungstenite has
/// half-written, then the frame, then whatever tungstenite tried to write meanwhile (a pong held
/// back by the frame, say), so that goes out now rather than at tungstenite's next write.
/// `frame` is taken once tungstenite has nothing half-written; from then on the frame belongs to
/// the gate, which completes it even if this is not polled again. What tungstenite finishes
/// first may be its reply to a client's Close: the caller decides whether a frame may still
/// start (the bridge stops once the client's stream has ended).
pub fn poll_send<S>(ws: &mut ClientWs<S>, cx: &mut Context<'_>, frame: &mut Option<Bytes>) -> Poll<Result<(), WsError>>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    if frame.is_some() {
        if ws.get_ref().short {
            ready!(ws.poll_flush_unpin(cx))?;
        }
        let gate = ws.get_mut();
        gate.rest = frame.take().expect("checked");
        gate.activity.data += 1;
    }
    // A flush, not just the rest of the frame: TLS takes the end of a frame into its buffer and
    // reports it written before it has reached the socket, and nothing else may write to the
    // client again until the backend sends more. (A no-op on plain TCP.)
    ready!(Pin::new(ws.get_mut()).poll_flush(cx))?;
    if ws.get_ref().short {
        ready!(ws.poll_flush_unpin(cx))?;
    }
    Poll::Ready(Ok(()))
}

/// What tungstenite (or the closing handshake after it) reads: the peer's frames, cut to size.
impl<S: AsyncRead + Unpin> AsyncRead for FrameGate<S> {
    // Inlined into tungstenite's read, as the plain forward it replaced was: this is on every
    // client read of the relay (docs/performance.md, item 18).
    #[inline(always)]
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let read = this.cutter.poll_read(&mut this.io, cx, buf);
        // A read that is ready brought bytes (tungstenite always leaves room), or ends the
        // session: counted for the liveness checks without measuring it.
        this.activity.reads += u64::from(read.is_ready());
        read
    }
}

/// tungstenite's writes. It writes its whole write buffer each time, so a write that takes all
/// of it leaves nothing half-written.
impl<S: AsyncWrite + Unpin> AsyncWrite for FrameGate<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let was_short = std::mem::replace(&mut this.short, true);
        ready!(this.poll_rest(cx))?;
        let written = ready!(Pin::new(&mut this.io).poll_write(cx, data))?;
        this.short = written < data.len();
        if was_short && !this.short {
            // tungstenite's write buffer has just drained after waiting. A pong that did not fit
            // it meanwhile waits outside it, and tungstenite retries that only when it is next
            // polled, which nothing else may cause: so poll it again.
            cx.waker().wake_by_ref();
        }
        Poll::Ready(Ok(written))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_rest(cx))?;
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_rest(cx))?;
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt;
    use tokio::net::{TcpListener, TcpStream};
    use tungstenite::protocol::frame::coding::CloseCode;
    use tungstenite::protocol::{CloseFrame, Role};
    use tungstenite::{Message, Utf8Bytes};

    /// A server WebSocket over a gate and a plain tungstenite client, on a loopback connection.
    async fn pair() -> (ClientWs<TcpStream>, WebSocketStream<TcpStream>) {
        pair_over(|tcp| tcp).await
    }

    /// The same, with the server's socket wrapped by `wrap`.
    async fn pair_over<S, F>(wrap: F) -> (ClientWs<S>, WebSocketStream<TcpStream>)
    where
        S: AsyncRead + AsyncWrite + Unpin,
        F: FnOnce(TcpStream) -> S,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        (
            WebSocketStream::from_raw_socket(FrameGate::new(wrap(server)), Role::Server, None).await,
            WebSocketStream::from_raw_socket(client, Role::Client, None).await,
        )
    }

    fn frame_of(payload: &[u8], text: bool) -> Bytes {
        let mut buf = BytesMut::with_capacity(HEADROOM + payload.len());
        buf.extend_from_slice(&[0; HEADROOM]);
        buf.extend_from_slice(payload);
        frame(buf, text)
    }

    async fn send<S: AsyncRead + AsyncWrite + Unpin>(ws: &mut ClientWs<S>, payload: &[u8], text: bool) {
        let mut frame = Some(frame_of(payload, text));
        std::future::poll_fn(|cx| poll_send(ws, cx, &mut frame)).await.unwrap();
    }

    /// Polls `fut` once: whether it finished.
    async fn poll_once<F: Future + Unpin>(fut: &mut F) -> bool {
        std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut *fut).poll(cx).is_ready())).await
    }

    /// A broken gate shows as a stream the client cannot parse, or as a stall: give up then.
    async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
        tokio::time::timeout(std::time::Duration::from_secs(10), fut)
            .await
            .unwrap_or_else(|_| panic!("stalled: {what}"))
    }

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i % 251) as u8).collect()
    }

    /// Every length form of the header (7-bit, 16-bit, 64-bit) at its edges, text and binary,
    /// reaches a standard client as the same message.
    #[tokio::test]
    async fn frames_of_every_header_form_arrive_as_sent() {
        let (mut server, mut client) = pair().await;
        let sizes = [0, 1, 125, 126, 127, 65_535, 65_536, 300_000];
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            for _ in 0..2 * sizes.len() {
                got.push(within("reading a frame", client.next()).await.unwrap().unwrap());
            }
            got
        });
        for &n in &sizes {
            within("sending", send(&mut server, &pattern(n), false)).await;
            within("sending", send(&mut server, "é".repeat(n / 2).as_bytes(), true)).await;
        }
        let got = within("reading", reader).await.unwrap();
        for (i, &n) in sizes.iter().enumerate() {
            assert_eq!(got[2 * i], Message::Binary(pattern(n).into()), "binary, {n} bytes");
            assert_eq!(got[2 * i + 1], Message::Text(Utf8Bytes::from("é".repeat(n / 2))), "text, {n} bytes");
        }
        assert!(server.get_ref().rest.is_empty(), "no frame left behind");
    }

    /// Masked frames of every length form, text and binary, from a client-role WebSocket reach
    /// a standard server (which refuses unmasked frames from a client) as the same messages.
    #[tokio::test]
    async fn masked_frames_of_every_header_form_reach_a_server() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let ours = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (theirs, _) = listener.accept().await.unwrap();
        let mut client = WebSocketStream::from_raw_socket(FrameGate::new(ours), Role::Client, None).await;
        let mut server = WebSocketStream::from_raw_socket(theirs, Role::Server, None).await;
        let sizes = [0, 1, 3, 125, 126, 65_535, 65_536, 300_001];
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            for _ in 0..2 * sizes.len() {
                got.push(within("reading a frame", server.next()).await.unwrap().unwrap());
            }
            got
        });
        for (i, &n) in sizes.iter().enumerate() {
            let key = [i as u8, 0x5a, 0xa5, 0xff];
            for (payload, text) in [(pattern(n), false), ("é".repeat(n / 2).into_bytes(), true)] {
                let mut buf = BytesMut::with_capacity(HEADROOM + payload.len());
                buf.extend_from_slice(&[0; HEADROOM]);
                buf.extend_from_slice(&payload);
                let mut frame = Some(frame_masked(buf, text, key));
                within("sending", std::future::poll_fn(|cx| poll_send(&mut client, cx, &mut frame))).await.unwrap();
            }
        }
        let got = within("reading", reader).await.unwrap();
        for (i, &n) in sizes.iter().enumerate() {
            assert_eq!(got[2 * i], Message::Binary(pattern(n).into()), "binary, {n} bytes");
            assert_eq!(got[2 * i + 1], Message::Text(Utf8Bytes::from("é".repeat(n / 2))), "text, {n} bytes");
        }
    }

    /// A frame of ours is half-written (the client is not reading) and the bridge that was
    /// writing it goes away; tungstenite then answers a ping and sends a close frame. Both must
    /// wait for the rest of the frame, and it must be completed without the bridge: the client
    /// reads the whole message, then the pong, then the close.
    #[tokio::test]
    async fn tungstenite_writes_wait_for_a_half_written_frame() {
        let (mut server, client) = pair().await;
        let big = pattern(8 << 20);
        let mut frame = Some(frame_of(&big, false));
        let mut sending = std::future::poll_fn(|cx| poll_send(&mut server, cx, &mut frame));
        assert!(!poll_once(&mut sending).await, "8 MiB do not fit in the socket buffers");
        drop(sending);
        let (mut to_server, mut from_server) = client.split();
        to_server.send(Message::Ping(Bytes::from_static(b"p"))).await.unwrap();
        let ping = within("reading the ping", server.next()).await;
        assert_eq!(ping.unwrap().unwrap(), Message::Ping(Bytes::from_static(b"p")));
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            while let Some(Ok(message)) = from_server.next().await {
                let done = matches!(message, Message::Close(_));
                got.push(message);
                if done {
                    break;
                }
            }
            got
        });
        // The pong goes out at tungstenite's next flush (then the close: a close frame
        // written with a pong pending would go first).
        within("writing the pong", server.flush()).await.unwrap();
        let bye = CloseFrame { code: CloseCode::Normal, reason: "bye".into() };
        within("writing the close", server.send(Message::Close(Some(bye.clone())))).await.unwrap();
        let got = within("reading", reader).await.unwrap();
        assert_eq!(got.len(), 3, "message, pong, close: {:?}", got.iter().map(Message::len).collect::<Vec<_>>());
        assert!(got[0] == Message::Binary(big.into()), "the frame arrives whole");
        assert_eq!(got[1], Message::Pong(Bytes::from_static(b"p")));
        assert_eq!(got[2], Message::Close(Some(bye)));
    }

    /// tungstenite has half-written a message (the client is not reading) when the bridge
    /// sends a frame: the frame waits for the rest of tungstenite's, and both arrive whole.
    #[tokio::test]
    async fn a_frame_waits_for_what_tungstenite_half_wrote() {
        let (mut server, mut client) = pair().await;
        let (first, second) = (pattern(8 << 20), pattern(3 << 20));
        let mut sending = server.send(Message::binary(first.clone()));
        assert!(!poll_once(&mut sending).await, "8 MiB do not fit in the socket buffers");
        drop(sending);
        assert!(server.get_ref().short);
        let reader = tokio::spawn(async move {
            let a = client.next().await.unwrap();
            let b = client.next().await.unwrap();
            (a.unwrap(), b.unwrap())
        });
        within("sending the frame", send(&mut server, &second, false)).await;
        let (a, b) = within("reading", reader).await.unwrap();
        assert!(a == Message::Binary(first.into()), "tungstenite's message arrives whole, first");
        assert!(b == Message::Binary(second.into()), "then the frame");
    }

    /// A stream that holds written bytes until it is flushed (as TLS may hold the end of a frame
    /// it has reported written): a frame sent with nothing after it still reaches the client.
    #[tokio::test]
    async fn a_frame_is_flushed_through_a_stream_that_buffers() {
        let (mut server, mut client) = pair_over(|tcp| tokio::io::BufWriter::with_capacity(64 * 1024, tcp)).await;
        within("sending", send(&mut server, b"the last words", false)).await;
        let got = within("reading the frame", client.next()).await.unwrap().unwrap();
        assert_eq!(got, Message::Binary(Bytes::from_static(b"the last words")));
    }
}
