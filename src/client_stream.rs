//! The client's connection as one type, from accept to the end of its session.
//!
//! The server serves HTTP on a [`ClientIo`] (the socket, or the TLS stream for wss, under
//! [`ReadAhead`]) and hyper hides it behind its upgraded-connection type; the session takes it
//! back with [`take_back`], so the relay reads and writes the socket without hyper's layers. Both
//! sides name this one type: whatever comes to wrap the client socket (a PROXY-protocol reader,
//! an mTLS identity) becomes part of [`ClientStream`], which the session then gets back too. A
//! stream of any other type would still work, through hyper's layers, but that is a bug, and
//! [`take_back`] says so.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::readahead::{ReadAhead, ReadReady};
use crate::tls_stream::TlsStream;

/// What the server serves HTTP on, and what the session relays over.
pub type ClientIo = ReadAhead<ClientStream>;

/// The client's byte stream under [`ReadAhead`].
#[derive(Debug)]
pub enum ClientStream {
    /// A `ws` listener's socket.
    Tcp(TcpStream),
    /// A `wss` listener's TLS stream (boxed: rustls's state is large, and most sessions of a
    /// plain listener never need it).
    Tls(Box<TlsStream>),
    /// hyper's upgraded connection, when it could not be taken back (see [`take_back`]).
    Upgraded(TokioIo<Upgraded>),
}

/// The client's connection out of hyper's upgraded one: the stream the server served HTTP on,
/// with the bytes hyper had read and not parsed put back in front. `Err` (with the connection
/// wrapped as it is, reads ahead in `chunk`-byte reads) if the server served HTTP on another
/// type, which is a bug.
pub fn take_back(upgraded: Upgraded, chunk: usize) -> Result<ClientIo, ClientIo> {
    match upgraded.downcast::<TokioIo<ClientIo>>() {
        Ok(parts) => {
            let (io, buffered, chunk) = parts.io.into_inner().into_parts();
            let unread = match parts.read_buf.is_empty() {
                true => buffered,
                false => {
                    let mut all = bytes::BytesMut::with_capacity(parts.read_buf.len() + buffered.len());
                    all.extend_from_slice(&parts.read_buf);
                    all.extend_from_slice(&buffered);
                    all
                }
            };
            Ok(ReadAhead::resume(io, unread, chunk))
        }
        Err(upgraded) => Err(ReadAhead::new(ClientStream::Upgraded(TokioIo::new(upgraded)), chunk)),
    }
}

/// The client's connection as the relay sees it.
pub trait Duplex: AsyncRead + AsyncWrite + Send + Unpin {}

impl<T: AsyncRead + AsyncWrite + Send + Unpin> Duplex for T {}

/// `io` for the relay: boxed, with the stream under [`ReadAhead`] taken out of its enum, so each
/// kind of stream gets a relay of its own (no `match` on every read and write, and tungstenite's
/// frame parsing stays small enough to inline: docs/performance.md, item 17).
pub fn into_relay(io: ClientIo) -> Box<dyn Duplex> {
    let (stream, buffered, chunk) = io.into_parts();
    match stream {
        ClientStream::Tcp(s) => Box::new(ReadAhead::resume(s, buffered, chunk)),
        ClientStream::Tls(s) => Box::new(ReadAhead::resume(*s, buffered, chunk)),
        ClientStream::Upgraded(s) => Box::new(ReadAhead::resume(s, buffered, chunk)),
    }
}

/// rustls may hold decrypted bytes while the socket is empty, so this says "ready" and lets the
/// read find out; `ReadAhead` then reads straight into its caller's buffer.
impl ReadReady for TlsStream {
    fn poll_read_ready(&self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// hyper's stream may hold bytes it read: as for TLS, the read finds out.
impl ReadReady for TokioIo<Upgraded> {
    fn poll_read_ready(&self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

impl ReadReady for ClientStream {
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self {
            ClientStream::Tcp(s) => s.poll_read_ready(cx),
            ClientStream::Tls(s) => s.as_ref().poll_read_ready(cx),
            ClientStream::Upgraded(s) => s.poll_read_ready(cx),
        }
    }
}

/// `$body` with `$s` bound to whichever stream `$stream` holds.
macro_rules! each {
    ($stream:expr, $s:ident => $body:expr) => {
        match $stream {
            ClientStream::Tcp($s) => $body,
            ClientStream::Tls($s) => $body,
            ClientStream::Upgraded($s) => $body,
        }
    };
}

impl AsyncRead for ClientStream {
    #[inline]
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        each!(self.get_mut(), s => Pin::new(s).poll_read(cx, buf))
    }
}

impl AsyncWrite for ClientStream {
    #[inline]
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        each!(self.get_mut(), s => Pin::new(s).poll_write(cx, data))
    }

    #[inline]
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        each!(self.get_mut(), s => Pin::new(s).poll_write_vectored(cx, bufs))
    }

    #[inline]
    fn is_write_vectored(&self) -> bool {
        each!(self, s => s.is_write_vectored())
    }

    #[inline]
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        each!(self.get_mut(), s => Pin::new(s).poll_flush(cx))
    }

    #[inline]
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        each!(self.get_mut(), s => Pin::new(s).poll_shutdown(cx))
    }
}
