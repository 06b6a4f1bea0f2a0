//! The backend streams the pump can drive: anything it can split into a read half that tells,
//! without a buffer, whether a read would wait ([`ReadReady`]) and a write half, and reunite
//! afterwards. Implemented for TCP and Unix sockets with tokio's owned halves (no lock, the
//! socket's own readiness) and for a TLS client stream with halves of our own.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpStream, UnixStream, tcp, unix};
use tokio_rustls::client::TlsStream;

use crate::readahead::ReadReady;

/// A backend stream the pump can split into halves that it drives at once, and put back together
/// for `session` (to shut it down or drain it) when the pump is done.
pub trait BackendStream: Sized {
    /// What the pump reads from.
    type ReadHalf: AsyncRead + ReadReady + Unpin;
    /// What the pump writes to.
    type WriteHalf: AsyncWrite + Unpin;

    /// Splits the stream.
    fn into_split(self) -> (Self::ReadHalf, Self::WriteHalf);

    /// Puts back together the halves `into_split` returned.
    fn reunite(read: Self::ReadHalf, write: Self::WriteHalf) -> Self;
}

/// A socket type whose tokio owned halves are the pump's halves: no lock, and the read half's
/// readiness is the socket's own.
macro_rules! owned_halves {
    ($stream:ty, $halves:ident) => {
        impl BackendStream for $stream {
            type ReadHalf = $halves::OwnedReadHalf;
            type WriteHalf = $halves::OwnedWriteHalf;

            fn into_split(self) -> (Self::ReadHalf, Self::WriteHalf) {
                <$stream>::into_split(self)
            }

            fn reunite(read: Self::ReadHalf, write: Self::WriteHalf) -> Self {
                read.reunite(write).expect("halves of the same stream")
            }
        }

        impl ReadReady for $halves::OwnedReadHalf {
            fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                self.as_ref().poll_read_ready(cx)
            }
        }
    };
}

owned_halves!(TcpStream, tcp);
owned_halves!(UnixStream, unix);

impl ReadReady for UnixStream {
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        UnixStream::poll_read_ready(self, cx)
    }
}

/// A TLS client stream to the backend over `S` (TCP or a Unix socket), boxed because a rustls
/// connection is large and a session's dialled backend waits in its future.
impl<S> BackendStream for Box<TlsStream<S>>
where
    S: AsyncRead + AsyncWrite + ReadReady + Unpin,
{
    type ReadHalf = TlsReadHalf<S>;
    type WriteHalf = TlsWriteHalf<S>;

    fn into_split(self) -> (Self::ReadHalf, Self::WriteHalf) {
        let shared = Arc::new(Mutex::new(*self));
        (TlsReadHalf(shared.clone()), TlsWriteHalf(shared))
    }

    fn reunite(read: Self::ReadHalf, write: Self::WriteHalf) -> Self {
        assert!(Arc::ptr_eq(&read.0, &write.0), "halves of the same stream");
        drop(write);
        let shared = Arc::into_inner(read.0).expect("the only handle left");
        Box::new(shared.into_inner().unwrap_or_else(|poisoned| poisoned.into_inner()))
    }
}

/// The read half of a TLS stream. Both halves lock the one rustls connection for each call;
/// the pump polls them from one task, so the lock is never contended.
#[derive(Debug)]
pub struct TlsReadHalf<S>(Arc<Mutex<TlsStream<S>>>);

/// The write half of a TLS stream.
#[derive(Debug)]
pub struct TlsWriteHalf<S>(Arc<Mutex<TlsStream<S>>>);

/// The stream behind either half; a panic while it was locked leaves it as usable as any
/// stream after a failed call.
fn lock<S>(shared: &Mutex<TlsStream<S>>) -> MutexGuard<'_, TlsStream<S>> {
    shared.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Ready when a read would not wait: rustls holds decrypted bytes (which the socket no longer
/// shows), or the peer has closed, or the socket is readable. A failed connection is ready too, so the read reports the failure.
impl<S: ReadReady> ReadReady for TlsReadHalf<S> {
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut stream = lock(&self.0);
        let (socket, connection) = stream.get_mut();
        match connection.process_new_packets() {
            Ok(state) if state.plaintext_bytes_to_read() == 0 && !state.peer_has_closed() => socket.poll_read_ready(cx),
            _ => Poll::Ready(Ok(())),
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for TlsReadHalf<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *lock(&self.0)).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for TlsWriteHalf<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut *lock(&self.0)).poll_write(cx, data)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *lock(&self.0)).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *lock(&self.0)).poll_shutdown(cx)
    }
}
