//! The pump's unit tests, over loopback sockets.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use bytes::BytesMut;
use futures_util::StreamExt;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio_util::sync::CancellationToken;
use tungstenite::{Error as WsError, Message};

use super::client::{Client, Seen};
use super::polling::is_ready;
use super::to_backend::client_to_backend;
use super::to_client::{next_read_size, poll_read_frame, utf8_prefix};
use super::{Accept, DirectionMeter, DirectionTotals, End, Framing, Options};
use crate::frames::{self, HEADROOM};
use crate::metrics::DirectionMetrics;

mod backends;
mod client_role;
mod pump;

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
        role: tungstenite::protocol::Role::Server,
        liveness: super::Liveness::OFF,
        control: false,
    };
    let (metrics, mut totals, stop) =
        (DirectionMetrics::detached(), DirectionTotals::default(), CancellationToken::new());
    let mut meter = DirectionMeter::new(&metrics, &mut totals);
    client_to_backend(&mut stream, to_backend, (&options).into(), seen, &stop, &mut meter).await
}

/// The case `until_woken` must not be used in, made to happen every time: a message is read
/// with nothing behind it (the client stream returns Pending), its write to a full backend
/// socket has to wait, and the next message arrives during that wait, spending the wake-up
/// the stream had registered. Once the backend reads again, the pump must read that message
/// itself; waiting for another wake-up would stall the session for good.
///
/// The pump is polled here only when its own waker is woken, as an executor would, so a lost
/// wake-up shows as a stall rather than being covered by a poll for something else.
#[tokio::test]
async fn a_message_that_arrives_while_a_write_waits_is_relayed() {
    let (mut backend, mut to_backend, _from_backend, filled) = full_backend().await;
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let seen = Seen::default();
    let mut pump = std::pin::pin!(pump_client(rx, &mut to_backend, Duration::from_secs(1), &seen));
    let flag = Arc::new(WakeFlag::default());
    let waker = Waker::from(flag.clone());
    tx.send(Ok(Message::binary(&b"first"[..]))).unwrap();
    // The pump reads it, finds nothing behind it, and waits to write it.
    assert!(pump.as_mut().poll(&mut Context::from_waker(&waker)).is_pending());
    tx.send(Ok(Message::binary(&b"second"[..]))).unwrap();
    assert!(flag.woken.load(Ordering::SeqCst), "the second message spent the stream's wake-up");
    let drive = async {
        loop {
            if flag.woken.swap(false, Ordering::SeqCst)
                && let Poll::Ready(end) = pump.as_mut().poll(&mut Context::from_waker(&waker))
            {
                return end;
            }
            flag.notify.notified().await;
        }
    };
    // The backend reads again: everything must arrive, the second message included.
    let want = filled + b"firstsecond".len();
    let read = async {
        let mut got = Vec::with_capacity(want);
        let mut buf = vec![0u8; 256 * 1024];
        while got.len() < want {
            let n = backend.read(&mut buf).await.unwrap();
            assert!(n > 0, "the backend socket closed early");
            got.extend_from_slice(&buf[..n]);
        }
        drop(tx);
        got
    };
    let both = tokio::time::timeout(Duration::from_secs(5), async { tokio::join!(drive, read) }).await;
    let (end, got) = both.expect("stalled: the pump lost the wake-up of the message that came during its write");
    assert_eq!(&got[filled..], b"firstsecond");
    assert!(matches!(end, End::ClientGone), "{end:?}");
}

/// A waker that records that it was woken and tells whoever waits.
#[derive(Default)]
struct WakeFlag {
    woken: AtomicBool,
    notify: tokio::sync::Notify,
}

impl Wake for WakeFlag {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::SeqCst);
        self.notify.notify_one();
    }
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
    let big: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
    backend.write_all(&big).await.unwrap();
    // Until all of it is in the socket, so that one read can take it whole.
    let mut probe = vec![0u8; big.len()];
    while from_backend.peek(&mut probe).await.unwrap() < big.len() {
        tokio::task::yield_now().await;
    }
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
    let buf = read(big.len()).await;
    assert_eq!(&buf[HEADROOM..], &big[..]);
    backend.write_all(b"hi").await.unwrap();
    let buf = read(2).await;
    assert_eq!(&buf[HEADROOM..], b"hi");
    assert_eq!(buf.capacity(), HEADROOM + 2, "a small read gets a buffer of its size");
}
