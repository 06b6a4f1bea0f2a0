//! The server side of a `wss` connection over rustls's unbuffered API, so an idle connection
//! holds no buffer.
//!
//! rustls's buffered `ServerConnection` keeps a 4 KiB buffer for the records it reads for as
//! long as the connection lives, idle or not (docs/performance.md, "TLS idle memory"). Over the
//! unbuffered API the buffers are ours: [`TlsStream`] reads records into a buffer that goes as
//! soon as the socket has nothing more to give, and encrypts each write into a buffer of the
//! worker thread's, keeping per connection only what the socket has not yet taken. What rustls
//! itself keeps per connection (keys, the key schedule, its state) stays.
//!
//! The cost: rustls 0.23 seals each record of an unbuffered write into a vector of its own and
//! copies it out, one copy per byte more than its buffered path (docs/performance.md).
//!
//! The server accepts with [`accept`] (`server::tls_handshake`); the stream then serves HTTP
//! and is relayed like any other client stream ([`crate::client_stream`]).

use std::cell::RefCell;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use rustls::server::{ServerConnectionData, UnbufferedServerConnection};
use rustls::unbuffered::{ConnectionState, EncodeError, EncryptError, UnbufferedConnectionCommon, UnbufferedStatus};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// Bytes asked of the socket per read: whole records (up to 16 KiB of plaintext each) in few
/// system calls, as the buffered stream's read-ahead does.
const READ_BYTES: usize = 64 * 1024;

/// The largest TLS record on the wire (16 KiB of plaintext, header, and up to 2 KiB of expansion
/// TLS 1.2 allows): room for less than this at the end of `incoming` moves what is left to its
/// front before the next read.
const MAX_RECORD: usize = 5 + 16 * 1024 + 2048;

/// Plaintext encrypted per write call, at most (the caller writes the rest in further calls):
/// a WebSocket frame of 64 KiB with its header in one call.
const WRITE_BYTES: usize = 128 * 1024;

/// The most a TLS record adds to up to 16 KiB of plaintext: header, content type, tag, TLS 1.2's
/// explicit nonce, with room to spare (a larger need is met by growing and retrying).
const RECORD_OVERHEAD: usize = 64;

thread_local! {
    /// Where each write's records are encrypted before the socket takes them: one buffer per
    /// worker thread, kept (and so zero-filled once), where one per connection would be kept
    /// by idle connections or zero-filled on every write.
    static SEALED: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// A TLS server stream whose buffers exist only while data moves.
pub struct TlsStream {
    io: TcpStream,
    conn: UnbufferedServerConnection,
    /// Records read and not yet processed: `incoming[start..]`. Capacity 0 when the socket has
    /// had nothing more to give.
    incoming: Vec<u8>,
    start: usize,
    /// Records encoded and not yet written: `outgoing[sent..]`. Capacity 0 once written.
    outgoing: Vec<u8>,
    sent: usize,
    /// Plaintext decrypted and not yet handed out (a record larger than the reader's buffer, or
    /// records decrypted on the way to a write): `plaintext[taken..]`.
    plaintext: Vec<u8>,
    taken: usize,
    /// The peer has closed its side (close_notify, or the socket's end after it).
    read_closed: bool,
    /// We sent close_notify.
    write_closed: bool,
}

impl std::fmt::Debug for TlsStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsStream")
            .field("io", &self.io)
            .field("incoming", &(self.incoming.len() - self.start))
            .field("outgoing", &(self.outgoing.len() - self.sent))
            .finish_non_exhaustive()
    }
}

/// Runs the server side of a TLS handshake on `io` with `config`; `progressed` is called once
/// the client's first flight (its ClientHello) has been read and answered.
pub async fn accept(
    config: Arc<rustls::ServerConfig>,
    io: TcpStream,
    progressed: impl FnOnce(),
) -> io::Result<TlsStream> {
    let conn = UnbufferedServerConnection::new(config).map_err(io::Error::other)?;
    let mut stream = TlsStream {
        io,
        conn,
        incoming: Vec::new(),
        start: 0,
        outgoing: Vec::new(),
        sent: 0,
        plaintext: Vec::new(),
        taken: 0,
        read_closed: false,
        write_closed: false,
    };
    let mut progressed = Some(progressed);
    std::future::poll_fn(|cx| stream.poll_handshake(cx, &mut progressed)).await?;
    Ok(stream)
}

/// What one step of rustls asked for.
enum Step {
    /// Go on processing.
    Again,
    /// More records from the peer are needed.
    Input,
    /// The handshake is done (application data may flow).
    Traffic,
}

impl TlsStream {
    /// The connection's TLS state: negotiated parameters, the client's certificates.
    pub fn connection(&self) -> &UnbufferedConnectionCommon<ServerConnectionData> {
        &self.conn
    }

    /// Bytes held in buffers right now (records in and out, plaintext): 0 for an idle stream.
    pub fn allocated(&self) -> usize {
        self.incoming.capacity() + self.outgoing.capacity() + self.plaintext.capacity()
    }

    fn poll_handshake(&mut self, cx: &mut Context<'_>, progressed: &mut Option<impl FnOnce()>) -> Poll<io::Result<()>> {
        loop {
            let step = self.step(None)?;
            if self.outgoing.len() > self.sent
                && let Some(progressed) = progressed.take()
            {
                progressed();
            }
            match step {
                Step::Again => continue,
                Step::Traffic => {
                    ready!(self.poll_write_out(cx))?;
                    return Poll::Ready(Ok(()));
                }
                Step::Input => {
                    // The peer waits for our flight before it sends more.
                    ready!(self.poll_write_out(cx))?;
                    if self.read_closed || ready!(self.poll_read_in(cx))? == 0 {
                        return Poll::Ready(Err(io::Error::new(io::ErrorKind::UnexpectedEof, "tls handshake eof")));
                    }
                }
            }
        }
    }

    /// One call into rustls over the records read so far. Records it encodes go to `outgoing`;
    /// plaintext goes to `out` while it has room, then to `plaintext`. An error is returned
    /// after the alert rustls queued for it, if any, has been encoded (and a write attempted).
    fn step(&mut self, mut out: Option<&mut ReadBuf<'_>>) -> io::Result<Step> {
        let UnbufferedStatus { mut discard, state } = self.conn.process_tls_records(&mut self.incoming[self.start..]);
        let step = match state {
            Ok(ConnectionState::ReadTraffic(mut records)) => {
                while let Some(record) = records.next_record() {
                    let record = record.map_err(invalid)?;
                    discard += record.discard;
                    let payload = record.payload;
                    let n = match out.as_deref_mut() {
                        Some(out) => {
                            let n = out.remaining().min(payload.len());
                            out.put_slice(&payload[..n]);
                            n
                        }
                        None => 0,
                    };
                    self.plaintext.extend_from_slice(&payload[n..]);
                    if out.as_ref().is_some_and(|out| out.remaining() == 0) {
                        break;
                    }
                }
                Step::Again
            }
            Ok(ConnectionState::EncodeTlsData(mut encode)) => {
                let at = self.outgoing.len();
                // The first try, with no room, asks the record's size: nothing is zero-filled
                // beyond it.
                let mut room = 0;
                loop {
                    self.outgoing.resize(at + room, 0);
                    match encode.encode(&mut self.outgoing[at..]) {
                        Ok(n) => {
                            self.outgoing.truncate(at + n);
                            break;
                        }
                        Err(EncodeError::InsufficientSize(e)) => room = e.required_size,
                        Err(e) => {
                            self.outgoing.truncate(at);
                            return Err(io::Error::other(e.to_string()));
                        }
                    }
                }
                Step::Again
            }
            // `outgoing` is written before any more input is asked for and before a write or
            // flush returns, so the records count as sent once they are in it.
            Ok(ConnectionState::TransmitTlsData(transmit)) => {
                transmit.done();
                Step::Again
            }
            Ok(ConnectionState::BlockedHandshake) => Step::Input,
            Ok(ConnectionState::WriteTraffic(_)) => Step::Traffic,
            Ok(ConnectionState::PeerClosed | ConnectionState::Closed) => {
                self.read_closed = true;
                if self.conn.is_handshaking() { Step::Input } else { Step::Traffic }
            }
            Ok(other) => return Err(io::Error::other(format!("tls: unexpected state {other:?}"))),
            Err(e) => {
                self.start += discard;
                self.encode_alert();
                return Err(invalid(e));
            }
        };
        self.start += discard;
        Ok(step)
    }

    /// After an error, encodes the alert rustls queued for the peer, and tries once to send it.
    fn encode_alert(&mut self) {
        let UnbufferedStatus { state, .. } = self.conn.process_tls_records(&mut []);
        if let Ok(ConnectionState::EncodeTlsData(mut encode)) = state {
            let mut alert = [0u8; 64];
            if let Ok(n) = encode.encode(&mut alert) {
                self.outgoing.extend_from_slice(&alert[..n]);
                let _ = self.io.try_write(&self.outgoing[self.sent..]);
            }
        }
    }

    /// Reads more records from the socket into `incoming`: the bytes read, 0 at its end.
    /// `incoming` is freed when the read would wait with nothing left in it.
    fn poll_read_in(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.start == self.incoming.len() {
            self.incoming.clear();
            self.start = 0;
        } else if self.incoming.capacity() - self.incoming.len() < MAX_RECORD {
            // Only the start of a record is left: moved to the front, rather than the buffer
            // grown (which would copy all of it).
            self.incoming.drain(..self.start);
            self.start = 0;
        }
        if self.incoming.capacity() == 0 {
            // A session's task polls this read each time it wakes: no buffer for a socket that
            // has nothing.
            ready!(self.io.poll_read_ready(cx))?;
        }
        if self.incoming.capacity() - self.incoming.len() < MAX_RECORD {
            self.incoming.reserve(READ_BYTES);
        }
        match tokio_util::io::poll_read_buf(Pin::new(&mut self.io), cx, &mut self.incoming) {
            Poll::Pending => {
                // Waiting with part of a record: kept at its own size, not the read's, so a
                // client that stops mid-record (on purpose or not) holds at most one record.
                self.incoming.drain(..self.start);
                self.start = 0;
                self.incoming.shrink_to_fit();
                Poll::Pending
            }
            ready => ready,
        }
    }

    /// Writes `outgoing` to the socket; frees it once written.
    fn poll_write_out(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.sent < self.outgoing.len() {
            match ready!(Pin::new(&mut self.io).poll_write(cx, &self.outgoing[self.sent..]))? {
                0 => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                n => self.sent += n,
            }
        }
        self.outgoing = Vec::new();
        self.sent = 0;
        Poll::Ready(Ok(()))
    }

    /// Runs rustls until it allows application data, taking whatever it produces on the way.
    fn ready_to_write(&mut self) -> io::Result<()> {
        loop {
            match self.step(None)? {
                Step::Again => continue,
                Step::Traffic => return Ok(()),
                Step::Input => return Err(io::Error::new(io::ErrorKind::NotConnected, "tls handshake not complete")),
            }
        }
    }

    /// Encrypts `data` (or with `None`, a close_notify) after whatever `outgoing` holds.
    fn encrypt(&mut self, data: Option<&[u8]>) -> io::Result<()> {
        let at = self.outgoing.len();
        let end = seal(&mut self.conn, data, &mut self.outgoing, at)?;
        self.outgoing.truncate(end);
        Ok(())
    }

    fn hand_out(&mut self, out: &mut ReadBuf<'_>) {
        let n = out.remaining().min(self.plaintext.len() - self.taken);
        out.put_slice(&self.plaintext[self.taken..self.taken + n]);
        self.taken += n;
        if self.taken == self.plaintext.len() {
            self.plaintext = Vec::new();
            self.taken = 0;
        }
    }
}

/// Encrypts `data` (or with `None`, a close_notify) into `buf` from `at`, growing it as needed;
/// returns where the records end. `buf` is not shortened, so a buffer that is kept is
/// zero-filled only as it grows.
fn seal(conn: &mut UnbufferedServerConnection, data: Option<&[u8]>, buf: &mut Vec<u8>, at: usize) -> io::Result<usize> {
    let UnbufferedStatus { state, .. } = conn.process_tls_records(&mut []);
    let Ok(ConnectionState::WriteTraffic(mut traffic)) = state else {
        return Err(io::Error::other("tls: not ready to write after all"));
    };
    let len = data.map_or(0, <[u8]>::len);
    let need = at + len + len.div_ceil(16 * 1024).max(1) * RECORD_OVERHEAD;
    if buf.len() < need {
        buf.resize(need, 0);
    }
    loop {
        let out = &mut buf[at..];
        let sealed = match data {
            Some(data) => traffic.encrypt(data, out),
            None => traffic.queue_close_notify(out),
        };
        match sealed {
            Ok(n) => return Ok(at + n),
            Err(EncryptError::InsufficientSize(e)) => buf.resize(at + e.required_size, 0),
            Err(e) => return Err(io::Error::other(e.to_string())),
        }
    }
}

fn invalid(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

impl AsyncRead for TlsStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, out: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = out.remaining();
        loop {
            if this.taken < this.plaintext.len() {
                this.hand_out(out);
            }
            if out.remaining() == 0 {
                return Poll::Ready(Ok(()));
            }
            let step = this.step(Some(out))?;
            if this.sent < this.outgoing.len() {
                // Records rustls answers with (a key update's): sent as the socket takes them;
                // a write that would wait is woken with this task.
                let _ = this.poll_write_out(cx)?;
            }
            if out.remaining() < before {
                return Poll::Ready(Ok(()));
            }
            match step {
                Step::Again => continue,
                _ if this.read_closed => return Poll::Ready(Ok(())),
                Step::Input | Step::Traffic => match ready!(this.poll_read_in(cx))? {
                    0 => {
                        // The socket ended without close_notify: a truncation an attacker could
                        // cause, so an error rather than the end of the stream (as rustls's own
                        // stream reports it).
                        this.read_closed = true;
                        return Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "peer closed connection without sending TLS close_notify",
                        )));
                    }
                    _ => continue,
                },
            }
        }
    }
}

impl AsyncWrite for TlsStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.write_closed {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        // Records from an earlier call go first; until they have, this call takes nothing.
        ready!(this.poll_write_out(cx))?;
        if data.is_empty() {
            return Poll::Ready(Ok(0));
        }
        this.ready_to_write()?;
        let data = &data[..data.len().min(WRITE_BYTES)];
        if this.outgoing.is_empty() {
            SEALED.with_borrow_mut(|sealed| {
                let end = seal(&mut this.conn, Some(data), sealed, 0)?;
                // What the socket does not take now goes with the next write or flush.
                let written = match Pin::new(&mut this.io).poll_write(cx, &sealed[..end]) {
                    Poll::Ready(Ok(n)) => n,
                    Poll::Ready(Err(e)) => return Err(e),
                    Poll::Pending => 0,
                };
                this.outgoing.extend_from_slice(&sealed[written..end]);
                Ok(())
            })?;
        } else {
            // Records rustls queued on the way (a key update's) go first.
            this.encrypt(Some(data))?;
            let _ = this.poll_write_out(cx)?;
        }
        Poll::Ready(Ok(data.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_write_out(cx))?;
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.write_closed {
            ready!(this.poll_write_out(cx))?;
            // A connection that cannot say close_notify any more (rustls failed) just closes.
            if this.ready_to_write().is_ok() {
                this.encrypt(None)?;
            }
            this.write_closed = true;
        }
        ready!(this.poll_write_out(cx))?;
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests;
