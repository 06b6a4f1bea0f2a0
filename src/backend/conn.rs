//! The connected backend as the session holds it ([`BackendConn`]: TCP, a Unix socket, either
//! under TLS), and connecting a Unix-socket backend (`unix:/path`, Linux `unix:@name`).
//!
//! The bridge is generic over its backend stream, so the session matches on [`BackendConn`]
//! once and runs a bridge made for that one type: a TCP session relays exactly as before. The
//! enum's own `AsyncRead`/`AsyncWrite` serve only the cold paths (drain and shut down).

use std::ffi::OsString;
use std::fmt;
use std::io;
use std::os::unix::ffi::OsStringExt;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpStream, UnixStream};
use tokio_rustls::client::TlsStream;

use super::BackendError;
use crate::config::UnixAddr;

/// A connected backend.
#[derive(Debug)]
pub enum BackendConn {
    /// A TCP connection.
    Tcp(TcpStream),
    /// A Unix stream socket.
    Unix(UnixStream),
    /// TLS over TCP (boxed: a rustls connection is large).
    Tls(Box<TlsStream<TcpStream>>),
    /// TLS over a Unix stream socket.
    UnixTls(Box<TlsStream<UnixStream>>),
}

/// Where a backend connection goes, for the session's log span.
#[derive(Debug)]
pub enum Peer {
    /// A TCP peer address.
    Tcp(std::net::SocketAddr),
    /// A Unix socket, as configured.
    Unix(String),
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Peer::Tcp(addr) => addr.fmt(f),
            Peer::Unix(addr) => f.write_str(addr),
        }
    }
}

impl BackendConn {
    /// The peer, when the socket still knows it.
    pub fn peer(&self) -> Option<Peer> {
        let unix = |s: &UnixStream| {
            let addr = s.peer_addr().ok()?;
            if let Some(path) = addr.as_pathname() {
                return Some(Peer::Unix(format!("unix:{}", path.display())));
            }
            #[cfg(any(target_os = "linux", target_os = "android"))]
            {
                use std::os::linux::net::SocketAddrExt;
                let addr: std::os::unix::net::SocketAddr = addr.into();
                if let Some(name) = addr.as_abstract_name() {
                    return Some(Peer::Unix(format!("unix:@{}", String::from_utf8_lossy(name))));
                }
            }
            None
        };
        match self {
            BackendConn::Tcp(s) => s.peer_addr().ok().map(Peer::Tcp),
            BackendConn::Tls(s) => s.get_ref().0.peer_addr().ok().map(Peer::Tcp),
            BackendConn::Unix(s) => unix(s),
            BackendConn::UnixTls(s) => unix(s.get_ref().0),
        }
    }
}

/// Connects the Unix socket at `addr` (no timeout here: the caller bounds the whole connect).
pub(super) async fn connect(addr: &UnixAddr) -> Result<UnixStream, BackendError> {
    let path = match addr {
        UnixAddr::Path(path) => path.clone().into_os_string(),
        // tokio reads a leading NUL byte as an abstract name.
        UnixAddr::Abstract(name) => OsString::from_vec([b"\0", name.as_bytes()].concat()),
    };
    UnixStream::connect(path).await.map_err(|source| BackendError::ConnectUnix { target: addr.to_string(), source })
}

macro_rules! each {
    ($conn:expr, $s:ident => $body:expr) => {
        match $conn {
            BackendConn::Tcp($s) => $body,
            BackendConn::Unix($s) => $body,
            BackendConn::Tls($s) => $body,
            BackendConn::UnixTls($s) => $body,
        }
    };
}

impl AsyncRead for BackendConn {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        each!(self.get_mut(), s => Pin::new(s).poll_read(cx, buf))
    }
}

impl AsyncWrite for BackendConn {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        each!(self.get_mut(), s => Pin::new(s).poll_write(cx, data))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        each!(self.get_mut(), s => Pin::new(s).poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        each!(self.get_mut(), s => Pin::new(s).poll_shutdown(cx))
    }
}
