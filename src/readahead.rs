//! A read buffer that exists only while data flows.
//!
//! tungstenite allocates its read buffer when a session starts, keeps it for the session's
//! life, and never reads more than that buffer's size in one call. A large buffer makes every
//! idle session expensive; a small one makes a busy session pay a system call per few KiB.
//! [`ReadAhead`] wraps the client socket (the TLS stream for wss) below hyper, so the WebSocket
//! that hyper upgrades reads through it, and wsgate can have both: tungstenite gets a small
//! buffer (paid by every session), and this adapter reads the socket in large chunks into a
//! buffer of its own, which it frees as soon as the socket has nothing more to give. An idle
//! session holds no buffer here. While messages are small (the last read brought less than the
//! caller's buffer holds), it reads straight into the caller's buffer instead, so a small message
//! costs neither an allocation nor a copy here; a read that fills the caller's buffer switches
//! it back to whole chunks.
//!
//! Writes pass straight through.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// Streams that can tell, without a buffer, that a read would wait.
///
/// A session's task is polled whenever either of its sockets is ready, and each poll asks the
/// client side for its next message; without this, every such poll would allocate a read
/// buffer only to find nothing to read.
pub trait ReadReady {
    /// `Pending` (and `cx` woken later) when a read would wait; `Ready` when it may not.
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
}

impl ReadReady for TcpStream {
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        TcpStream::poll_read_ready(self, cx)
    }
}

/// Wraps a stream; reads ahead in `chunk`-byte reads while data flows.
#[derive(Debug)]
pub struct ReadAhead<S> {
    inner: S,
    /// Data read from `inner` and not yet handed out. Its allocation (`chunk` bytes, never
    /// zero-filled) exists only while busy: capacity 0 means idle.
    buf: BytesMut,
    chunk: usize,
    /// Whether the last read from `inner` brought less than the caller's buffer holds: messages
    /// are small, so the next read goes straight into the caller's buffer (no allocation, no
    /// copy). After a read that filled it, reads go through `buf` in whole chunks until one
    /// brings less than the caller could have taken, so a stream of large messages still costs
    /// one read each.
    small: bool,
}

impl<S> ReadAhead<S> {
    /// Wraps `inner`; `chunk` is the size of each read while data flows.
    pub fn new(inner: S, chunk: usize) -> Self {
        ReadAhead { inner, buf: BytesMut::new(), chunk: chunk.max(1), small: true }
    }

    /// Wraps `inner` with `buffered` already read from it, to be handed out first (a stream
    /// taken back from hyper after an upgrade, with what hyper had read and not parsed).
    pub fn resume(inner: S, buffered: BytesMut, chunk: usize) -> Self {
        ReadAhead { inner, buf: buffered, chunk: chunk.max(1), small: true }
    }

    /// The wrapped stream, the bytes read from it and not yet handed out, and the chunk size.
    pub fn into_parts(self) -> (S, BytesMut, usize) {
        (self.inner, self.buf, self.chunk)
    }

    /// Bytes held for the reader right now (buffered or not): 0 for an idle stream.
    pub fn allocated(&self) -> usize {
        self.buf.capacity()
    }

    fn hand_out(&mut self, out: &mut ReadBuf<'_>) {
        let n = out.remaining().min(self.buf.len());
        out.put_slice(&self.buf[..n]);
        self.buf.advance(n);
    }
}

impl<S: AsyncRead + ReadReady + Unpin> AsyncRead for ReadAhead<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, out: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.buf.is_empty() {
            this.hand_out(out);
            return Poll::Ready(Ok(()));
        }
        // Read a whole chunk, into a buffer that exists only for as long as reads find data:
        // it is allocated only when the socket may have data, and goes as soon as a read would
        // wait. Everything handed out was copied, so `reserve` on the emptied buffer reclaims
        // the same allocation rather than making a new one.
        if this.inner.poll_read_ready(cx)?.is_pending() {
            this.buf = BytesMut::new();
            return Poll::Pending;
        }
        let room = out.remaining();
        if room == 0 {
            return Poll::Ready(Ok(()));
        }
        if this.small {
            // Nothing is buffered, but an emptied buffer may still hold its allocation (a TLS
            // stream is always "ready", so an idle one never frees it above).
            this.buf = BytesMut::new();
            let before = out.filled().len();
            ready!(Pin::new(&mut this.inner).poll_read(cx, out))?;
            this.small = out.filled().len() - before < room;
            return Poll::Ready(Ok(()));
        }
        this.buf.clear();
        this.buf.reserve(this.chunk);
        match tokio_util::io::poll_read_buf(Pin::new(&mut this.inner), cx, &mut this.buf) {
            Poll::Pending => {
                this.buf = BytesMut::new();
                Poll::Pending
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Ready(Ok(n)) => {
                this.small = n < room;
                this.hand_out(out);
                Poll::Ready(Ok(()))
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for ReadAhead<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, data)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Bytes come out in order whatever the read sizes; the buffer exists only while data
    /// flows and is gone once the socket has nothing more.
    #[tokio::test]
    async fn reads_ahead_while_busy_and_frees_when_idle() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let tx = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (rx, _) = listener.accept().await.unwrap();
        let mut r = ReadAhead::new(rx, 16 * 1024);
        let data: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect();
        // Written from another task: more than the socket buffers may hold at once.
        let writer = tokio::spawn({
            let data = data.clone();
            async move {
                let mut tx = tx;
                tx.write_all(&data).await.unwrap();
                tx
            }
        });
        let mut got = Vec::new();
        let mut small = [0u8; 1000];
        while got.len() < data.len() {
            let n = r.read(&mut small).await.unwrap();
            got.extend_from_slice(&small[..n]);
            if got.len() < data.len() - 16 * 1024 {
                assert!(r.allocated() <= 16 * 1024);
            }
        }
        assert_eq!(got, data);
        let mut tx = writer.await.unwrap();
        // Nothing more to read: the next read is pending, and the buffer is freed.
        let pending = tokio::time::timeout(std::time::Duration::from_millis(20), r.read(&mut small)).await;
        assert!(pending.is_err(), "no data, so the read waits");
        assert_eq!(r.allocated(), 0, "an idle stream holds no read-ahead buffer");
        tx.write_all(b"again").await.unwrap();
        let n = r.read(&mut small).await.unwrap();
        assert_eq!(&small[..n], b"again");
        // That read brought less than the caller's buffer holds: once the socket is empty again,
        // the next message is read straight into the caller's buffer, with no buffer here.
        let pending = tokio::time::timeout(std::time::Duration::from_millis(20), r.read(&mut small)).await;
        assert!(pending.is_err(), "no data, so the read waits");
        tx.write_all(b"small").await.unwrap();
        let n = r.read(&mut small).await.unwrap();
        assert_eq!(&small[..n], b"small");
        assert_eq!(r.allocated(), 0, "a small message is read straight into the caller's buffer");
        drop(tx);
        assert_eq!(r.read(&mut small).await.unwrap(), 0, "EOF passes through");
    }

    /// A stream that cannot tell whether a read would wait (as TLS): an idle one must still end
    /// up holding no buffer, after a message that switched to whole chunks and back.
    #[tokio::test]
    async fn a_stream_always_ready_frees_its_buffer_when_idle() {
        struct AlwaysReady(TcpStream);
        impl AsyncRead for AlwaysReady {
            fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
                Pin::new(&mut self.get_mut().0).poll_read(cx, buf)
            }
        }
        impl ReadReady for AlwaysReady {
            fn poll_read_ready(&self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
                Poll::Ready(Ok(()))
            }
        }
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut tx = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (rx, _) = listener.accept().await.unwrap();
        let mut r = ReadAhead::new(AlwaysReady(rx), 16 * 1024);
        let data = vec![7u8; 3000];
        tx.write_all(&data).await.unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 2048];
        while got.len() < data.len() {
            let n = r.read(&mut buf).await.unwrap();
            got.extend_from_slice(&buf[..n]);
        }
        assert_eq!(got, data);
        let idle = tokio::time::timeout(std::time::Duration::from_millis(20), r.read(&mut buf)).await;
        assert!(idle.is_err(), "no data, so the read waits");
        assert_eq!(r.allocated(), 0, "an idle stream holds no read-ahead buffer");
    }
}
