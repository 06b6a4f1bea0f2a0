//! The local side of `wsgate connect`: stdio as a stream the bridge can drive ([`Stdio`]), the
//! `--listen` listener (TCP or a Unix socket) whose connections each get a session, and
//! [`Local`], the one stream type the client hands the bridge for all three.

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Mutex, MutexGuard};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream, tcp, unix};

use super::ClientError;
use crate::bridge::BackendStream;
use crate::readahead::ReadReady;

/// Where `--listen` accepts local connections.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    /// A TCP address.
    Tcp(SocketAddr),
    /// A Unix socket path (`unix:/path`).
    Unix(PathBuf),
}

impl Listen {
    /// Reads `ADDR:PORT` or `unix:/path`; a TCP address that is not loopback needs
    /// `allow_remote`, since it opens the route to whoever can reach this host.
    pub fn parse(text: &str, allow_remote: bool) -> Result<Listen, ClientError> {
        if let Some(path) = text.strip_prefix("unix:") {
            return Ok(Listen::Unix(PathBuf::from(path)));
        }
        let addr: SocketAddr =
            text.parse().map_err(|_| ClientError::Usage(format!("--listen {text:?}: not ADDR:PORT or unix:/path")))?;
        if !addr.ip().is_loopback() && !allow_remote {
            return Err(ClientError::Usage(format!(
                "--listen {addr}: not a loopback address; add --allow-remote to open the route to the network"
            )));
        }
        Ok(Listen::Tcp(addr))
    }
}

/// A bound `--listen` socket.
pub(super) enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
}

/// An accepted local connection.
pub(super) enum Conn {
    Tcp(TcpStream, SocketAddr),
    Unix(UnixStream),
}

impl Listener {
    pub(super) async fn bind(listen: &Listen) -> Result<Listener, ClientError> {
        let failed = |what: String, e: io::Error| ClientError::Local(format!("listen on {what}: {e}"));
        match listen {
            Listen::Tcp(addr) => {
                TcpListener::bind(addr).await.map(Listener::Tcp).map_err(|e| failed(addr.to_string(), e))
            }
            Listen::Unix(path) => UnixListener::bind(path)
                .map(|l| Listener::Unix(l, path.clone()))
                .map_err(|e| failed(path.display().to_string(), e)),
        }
    }

    /// The address bound, as `--listen` would name it.
    pub(super) fn describe(&self) -> String {
        match self {
            Listener::Tcp(l) => l.local_addr().map(|a| a.to_string()).unwrap_or_default(),
            Listener::Unix(_, path) => format!("unix:{}", path.display()),
        }
    }

    pub(super) async fn accept(&self) -> io::Result<Conn> {
        match self {
            Listener::Tcp(l) => {
                let (stream, peer) = l.accept().await?;
                let _ = stream.set_nodelay(true);
                Ok(Conn::Tcp(stream, peer))
            }
            Listener::Unix(l, _) => Ok(Conn::Unix(l.accept().await?.0)),
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, path) = self {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Standard input and output as one stream. tokio reads stdin on a blocking thread, which
/// cannot tell whether a read would wait without doing it; so the read half reads ahead once
/// (at most [`STDIN_READ_BYTES`]) to answer [`ReadReady`], and hands those bytes out first.
pub(super) struct Stdio {
    stdin: StdinHalf,
    stdout: tokio::io::Stdout,
}

impl Stdio {
    pub(super) fn new() -> Stdio {
        let peeked = Peeked { stdin: tokio::io::stdin(), buf: Vec::new(), start: 0, eof: false };
        Stdio { stdin: StdinHalf(Mutex::new(peeked)), stdout: tokio::io::stdout() }
    }
}

impl BackendStream for Stdio {
    type ReadHalf = StdinHalf;
    type WriteHalf = tokio::io::Stdout;

    fn into_split(self) -> (StdinHalf, tokio::io::Stdout) {
        (self.stdin, self.stdout)
    }

    fn reunite(stdin: StdinHalf, stdout: tokio::io::Stdout) -> Self {
        Stdio { stdin, stdout }
    }
}

/// The most read ahead from stdin to learn that it is readable.
const STDIN_READ_BYTES: usize = 64 * 1024;

/// Stdin, with what was read ahead. The pump polls it from one task, so the lock is never
/// contended; it makes the shared borrow in `poll_read_ready` possible.
pub(super) struct StdinHalf(Mutex<Peeked>);

struct Peeked {
    stdin: tokio::io::Stdin,
    /// Bytes read ahead; `buf[start..]` are still to be handed out.
    buf: Vec<u8>,
    start: usize,
    /// The read ahead met EOF.
    eof: bool,
}

impl StdinHalf {
    fn lock(&self) -> MutexGuard<'_, Peeked> {
        self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl ReadReady for StdinHalf {
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut p = self.lock();
        if p.start < p.buf.len() || p.eof {
            return Poll::Ready(Ok(()));
        }
        let Peeked { stdin, buf, start, eof } = &mut *p;
        buf.resize(STDIN_READ_BYTES, 0);
        let mut read = ReadBuf::new(buf);
        let polled = Pin::new(stdin).poll_read(cx, &mut read);
        let n = read.filled().len();
        buf.truncate(n);
        *start = 0;
        match polled {
            Poll::Ready(Ok(())) => {
                *eof = n == 0;
                Poll::Ready(Ok(()))
            }
            other => other,
        }
    }
}

impl AsyncRead for StdinHalf {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, out: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let mut p = self.lock();
        if p.start < p.buf.len() {
            let n = (p.buf.len() - p.start).min(out.remaining());
            out.put_slice(&p.buf[p.start..p.start + n]);
            p.start += n;
            if p.start == p.buf.len() {
                // Released: an idle session holds no read-ahead.
                p.buf = Vec::new();
                p.start = 0;
            }
            return Poll::Ready(Ok(()));
        }
        if p.eof {
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut p.stdin).poll_read(cx, out)
    }
}

/// Whatever the local side is, as one stream type for the bridge. The client then compiles one
/// pump of its own, sharing no monomorphised copy with the gateway's relay (whose TCP and Unix
/// backends use `TcpStream` and `UnixStream` themselves): a second caller of those copies would
/// change how LLVM inlines the gateway's per-message path (docs/performance.md, item 22). The
/// `match` per call is the client's only price.
pub(super) enum Local {
    Tcp(TcpStream),
    Unix(UnixStream),
    Stdio(Stdio),
}

/// [`Local`]'s read half.
pub(super) enum LocalRead {
    Tcp(tcp::OwnedReadHalf),
    Unix(unix::OwnedReadHalf),
    Stdio(StdinHalf),
}

/// [`Local`]'s write half.
pub(super) enum LocalWrite {
    Tcp(tcp::OwnedWriteHalf),
    Unix(unix::OwnedWriteHalf),
    Stdio(tokio::io::Stdout),
}

impl BackendStream for Local {
    type ReadHalf = LocalRead;
    type WriteHalf = LocalWrite;

    fn into_split(self) -> (LocalRead, LocalWrite) {
        match self {
            Local::Tcp(s) => {
                let (r, w) = s.into_split();
                (LocalRead::Tcp(r), LocalWrite::Tcp(w))
            }
            Local::Unix(s) => {
                let (r, w) = s.into_split();
                (LocalRead::Unix(r), LocalWrite::Unix(w))
            }
            Local::Stdio(s) => {
                let (r, w) = s.into_split();
                (LocalRead::Stdio(r), LocalWrite::Stdio(w))
            }
        }
    }

    fn reunite(read: LocalRead, write: LocalWrite) -> Local {
        match (read, write) {
            (LocalRead::Tcp(r), LocalWrite::Tcp(w)) => Local::Tcp(TcpStream::reunite(r, w)),
            (LocalRead::Unix(r), LocalWrite::Unix(w)) => Local::Unix(UnixStream::reunite(r, w)),
            (LocalRead::Stdio(r), LocalWrite::Stdio(w)) => Local::Stdio(Stdio::reunite(r, w)),
            _ => unreachable!("halves of the same stream"),
        }
    }
}

impl ReadReady for LocalRead {
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self {
            LocalRead::Tcp(r) => r.poll_read_ready(cx),
            LocalRead::Unix(r) => r.poll_read_ready(cx),
            LocalRead::Stdio(r) => r.poll_read_ready(cx),
        }
    }
}

impl AsyncRead for LocalRead {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            LocalRead::Tcp(r) => Pin::new(r).poll_read(cx, buf),
            LocalRead::Unix(r) => Pin::new(r).poll_read(cx, buf),
            LocalRead::Stdio(r) => Pin::new(r).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for LocalWrite {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            LocalWrite::Tcp(w) => Pin::new(w).poll_write(cx, data),
            LocalWrite::Unix(w) => Pin::new(w).poll_write(cx, data),
            LocalWrite::Stdio(w) => Pin::new(w).poll_write(cx, data),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            LocalWrite::Tcp(w) => Pin::new(w).poll_flush(cx),
            LocalWrite::Unix(w) => Pin::new(w).poll_flush(cx),
            LocalWrite::Stdio(w) => Pin::new(w).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            LocalWrite::Tcp(w) => Pin::new(w).poll_shutdown(cx),
            LocalWrite::Unix(w) => Pin::new(w).poll_shutdown(cx),
            LocalWrite::Stdio(w) => Pin::new(w).poll_shutdown(cx),
        }
    }
}
