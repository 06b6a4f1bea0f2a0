//! The peer's frames, cut to size before tungstenite reads them.
//!
//! tungstenite reads each frame whole into its read buffer before it looks at it, and keeps that
//! buffer's allocation, as large as the largest frame yet, for the rest of the session. The
//! payload of a fragment is then copied into the message being assembled. So a client sending a
//! message in large fragments, and never finishing it, made a session hold it twice: in the read
//! buffer and in the message. [`Cutter`] sits in the read path below tungstenite and cuts every
//! data frame longer than [`PIECE_BYTES`] into frames of that size (the first keeps the opcode,
//! the others continue it, the last keeps the FIN bit), so tungstenite assembles a large message
//! from pieces, and its read buffer never holds more than a piece.
//!
//! Only headers change. A piece keeps its frame's mask key, which stays in step with the payload
//! because every piece but the last is a multiple of 4 bytes long. Frames that are not cut pass
//! as they are: control frames, frames with reserved bits or opcodes (tungstenite refuses them),
//! and frames longer than the message limit, which tungstenite refuses (1009) from their header,
//! before any of the payload is read. A header that a read cuts in two is held back until it is
//! whole, since it may have to be rewritten.
//!
//! Following the frame boundaries anyway, it also notes when the peer's Close frame has been read
//! whole ([`Cutter::peer_closed`]): the closing handshake needs to know, and tungstenite may have
//! read that frame, and failed on it, before the session asks.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, ReadBuf};
use tungstenite::protocol::frame::FrameHeader;
use tungstenite::protocol::frame::coding::{Data, OpCode};

/// The longest data frame tungstenite is given: longer ones are cut into pieces of this size. A
/// multiple of 4, so each piece starts at the same point of the mask key's cycle; above 65,535,
/// so a piece's header is as long as that of any frame it is cut from.
pub const PIECE_BYTES: u64 = 64 * 1024;

/// The longest frame header: 2 bytes, a 64-bit length and a mask key.
const MAX_HEADER: usize = 14;

/// Where the peer's byte stream stands, frame by frame.
#[derive(Debug)]
pub(super) struct Cutter {
    /// Payload bytes still to come of the frame, or piece, being passed.
    left: u64,
    /// Nothing held and nothing being cut: reads go straight to the caller's buffer.
    plain: bool,
    /// The frame being passed is a Close.
    closing: bool,
    /// The peer's Close frame has been read whole.
    peer_closed: bool,
    /// Data frames announcing more than this pass whole, for tungstenite to refuse.
    max: u64,
    /// The frame being cut, if any.
    cut: Option<Cut>,
    /// A header held here: one a read cut in two, being completed, or one being handed out.
    head: Head,
}

/// What is left of a frame being cut, after the current piece.
#[derive(Debug)]
struct Cut {
    /// Payload bytes after the current piece.
    rest: u64,
    /// Whether the frame was final: its last piece is.
    fin: bool,
    mask: Option<[u8; 4]>,
}

/// A frame header held by the cutter: `bytes[..len]`, of which `bytes[..out]` are handed out.
#[derive(Debug, Default)]
struct Head {
    bytes: [u8; MAX_HEADER],
    len: usize,
    out: usize,
    /// Whole (and rewritten if its frame is cut, or made here for a piece): to be handed out.
    ready: bool,
}

impl Cutter {
    /// A cutter for a stream that begins at a frame boundary; data frames longer than `max` are
    /// passed whole.
    pub(super) fn new(max: u64) -> Self {
        Cutter { left: 0, plain: true, closing: false, peer_closed: false, max, cut: None, head: Head::default() }
    }

    /// Whether the peer's Close frame has been read whole.
    pub(super) fn peer_closed(&self) -> bool {
        self.peer_closed
    }

    /// Reads from `io` into `out`, cutting frames as the module says. Every client read of the
    /// relay passes here, so the usual case, a read that ends inside a frame's payload, costs a
    /// few comparisons, inlined into tungstenite's read; the rest is out of line.
    #[inline(always)]
    pub(super) fn poll_read<S: AsyncRead + Unpin>(
        &mut self,
        io: &mut S,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.plain {
            return self.poll_read_held(io, cx, out);
        }
        let start = out.filled().len();
        ready!(Pin::new(&mut *io).poll_read(cx, out))?;
        let n = (out.filled().len() - start) as u64;
        if n < self.left {
            self.left -= n;
            return Poll::Ready(Ok(()));
        }
        self.after_read(io, cx, out, start)
    }

    /// A read into `out` from `start` brought the rest of a frame and maybe more: follows the
    /// frames in it (rewriting the header of a frame to be cut), and holds back a header it cut
    /// in two.
    #[inline(never)]
    fn after_read<S: AsyncRead + Unpin>(
        &mut self,
        io: &mut S,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
        start: usize,
    ) -> Poll<io::Result<()>> {
        let end = out.filled().len();
        let buf = &mut out.filled_mut()[start..];
        let mut pos = self.left as usize;
        self.left = 0;
        if self.closing {
            self.closing = false;
            self.peer_closed = true;
        }
        while pos < buf.len() {
            let rest = &mut buf[pos..];
            let Some(&[first, second]) = rest.first_chunk::<2>() else { break };
            let header = header_len(second);
            if rest.len() < header {
                break;
            }
            let len = payload_len(rest);
            let after = (rest.len() - header) as u64;
            if len <= after {
                // The whole frame is in the buffer.
                self.peer_closed |= first & 0x0f == 0x8;
                pos += header + len as usize;
                continue;
            }
            self.left = len - after;
            self.closing = first & 0x0f == 0x8;
            if len > PIECE_BYTES {
                self.cut_from(&mut rest[..header], len, after);
            }
            return Poll::Ready(Ok(()));
        }
        if pos >= buf.len() {
            return Poll::Ready(Ok(()));
        }
        // A header the read cut in two: held back until it is whole.
        let held = end - (start + pos);
        self.head.bytes[..held].copy_from_slice(&buf[pos..]);
        self.head.len = held;
        self.plain = false;
        out.set_filled(start + pos);
        if pos > 0 {
            return Poll::Ready(Ok(()));
        }
        // Nothing else came: read on for the rest of the header.
        self.poll_read_held(io, cx, out)
    }

    /// Reads while a header is held or a frame is being cut.
    #[cold]
    #[inline(never)]
    fn poll_read_held<S: AsyncRead + Unpin>(
        &mut self,
        io: &mut S,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            if self.head.len > 0 {
                if self.head.ready {
                    self.head.hand_out(out);
                    self.plain = self.head.len == 0 && self.cut.is_none();
                    return Poll::Ready(Ok(()));
                }
                ready!(self.complete_head(io, cx))?;
                continue;
            }
            let Some(cut) = &mut self.cut else {
                self.plain = true;
                return self.poll_read(io, cx, out);
            };
            if self.left > 0 {
                return self.poll_piece(io, cx, out);
            }
            // The piece is done: the next one's header, or the frame is done.
            if cut.rest == 0 {
                self.cut = None;
                continue;
            }
            let piece = cut.rest.min(PIECE_BYTES);
            cut.rest -= piece;
            self.head = Head::piece(piece, cut.rest == 0 && cut.fin, cut.mask);
            self.left = piece;
        }
    }

    /// A whole header, held until now: notes its frame and rewrites the header if the frame is
    /// to be cut.
    fn start_held(&mut self) {
        let mut bytes = self.head.bytes;
        let header = &mut bytes[..self.head.len];
        let len = payload_len(header);
        self.left = len;
        self.closing = header[0] & 0x0f == 0x8;
        if len == 0 && std::mem::take(&mut self.closing) {
            self.peer_closed = true;
        }
        if len > PIECE_BYTES {
            self.cut_from(header, len, 0);
        }
        self.head.bytes = bytes;
    }

    /// Starts cutting the frame of `header` (`len` bytes of payload, `after` of them already read
    /// with the header) if it is a data frame to be cut, rewriting the header as its first
    /// piece's.
    #[cold]
    fn cut_from(&mut self, header: &mut [u8], len: u64, after: u64) {
        // Text, binary or continuation, no reserved bits (tungstenite refuses those).
        let plain_data = header[0] & 0x0f <= 0x2 && header[0] & 0x70 == 0;
        // The first piece takes at least what was read with the header, so nothing read needs a
        // header put in front of it.
        let first = after.max(PIECE_BYTES).next_multiple_of(4);
        if !plain_data || len > self.max || first >= len {
            return;
        }
        let mask = (header[1] & 0x80 != 0).then(|| [header[10], header[11], header[12], header[13]]);
        self.cut = Some(Cut { rest: len - first, fin: header[0] & 0x80 != 0, mask });
        self.plain = false;
        self.left = first - after;
        // Longer than 65,535 bytes, so the length is in its 64-bit form, as the piece's is.
        header[0] &= 0x7f;
        header[2..10].copy_from_slice(&first.to_be_bytes());
    }

    /// Reads the rest of a held header; once whole, it is noted (and rewritten) like any other.
    /// At the stream's end, what there is of it is handed out as it is.
    fn complete_head<S: AsyncRead + Unpin>(&mut self, io: &mut S, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let head = &mut self.head;
        let need = if head.len < 2 { 2 } else { header_len(head.bytes[1]) };
        let mut rb = ReadBuf::new(&mut head.bytes[head.len..need]);
        ready!(Pin::new(io).poll_read(cx, &mut rb))?;
        let n = rb.filled().len();
        head.len += n;
        if n == 0 {
            head.ready = true;
        } else if head.len >= 2 && head.len == header_len(head.bytes[1]) {
            head.ready = true;
            self.start_held();
        }
        Poll::Ready(Ok(()))
    }

    /// Reads payload of the current piece into `out`, never past the piece's end.
    fn poll_piece<S: AsyncRead + Unpin>(
        &mut self,
        io: &mut S,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let room = out.remaining().min(usize::try_from(self.left).unwrap_or(usize::MAX));
        let mut piece = ReadBuf::new(out.initialize_unfilled_to(room));
        ready!(Pin::new(io).poll_read(cx, &mut piece))?;
        let n = piece.filled().len();
        out.advance(n);
        self.left -= n as u64;
        Poll::Ready(Ok(()))
    }
}

impl Head {
    /// The header of a continuation piece of `len` bytes.
    fn piece(len: u64, fin: bool, mask: Option<[u8; 4]>) -> Head {
        let header =
            FrameHeader { is_final: fin, opcode: OpCode::Data(Data::Continue), mask, ..FrameHeader::default() };
        let mut head = Head { len: header.len(len), ready: true, ..Head::default() };
        header.format(len, &mut &mut head.bytes[..]).expect("a header fits 14 bytes");
        head
    }

    fn hand_out(&mut self, out: &mut ReadBuf<'_>) {
        let n = (self.len - self.out).min(out.remaining());
        out.put_slice(&self.bytes[self.out..self.out + n]);
        self.out += n;
        if self.out == self.len {
            *self = Head::default();
        }
    }
}

/// The length of a frame header whose second byte is `second`.
#[inline(always)]
fn header_len(second: u8) -> usize {
    let length = match second & 0x7f {
        126 => 2,
        127 => 8,
        _ => 0,
    };
    2 + length + if second & 0x80 != 0 { 4 } else { 0 }
}

/// The payload length a whole header announces.
#[inline(always)]
fn payload_len(header: &[u8]) -> u64 {
    match header[1] & 0x7f {
        126 => u64::from(u16::from_be_bytes([header[2], header[3]])),
        127 => u64::from_be_bytes(header[2..10].try_into().expect("8 bytes")),
        n => u64::from(n),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frames::FrameGate;
    use futures_util::{SinkExt, StreamExt};
    use hyper_tungstenite::WebSocketStream;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};
    use tungstenite::protocol::frame::Frame;
    use tungstenite::protocol::{Role, WebSocketConfig};
    use tungstenite::{Message, Utf8Bytes};

    async fn tcp_pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        (client, server)
    }

    async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
        tokio::time::timeout(std::time::Duration::from_secs(20), fut)
            .await
            .unwrap_or_else(|_| panic!("stalled: {what}"))
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len).map(|i| (i % 251) as u8 ^ seed).collect()
    }

    /// One frame as a client sends it: `opcode` with FIN as given, masked with `key`.
    fn frame(opcode: u8, fin: bool, payload: &[u8], key: [u8; 4]) -> Vec<u8> {
        let op = OpCode::from(opcode);
        let header = FrameHeader { is_final: fin, opcode: op, mask: Some(key), ..FrameHeader::default() };
        let mut out = Vec::new();
        header.format(payload.len() as u64, &mut out).unwrap();
        let start = out.len();
        out.extend_from_slice(payload);
        super::super::apply_mask(&mut out[start..], key);
        out
    }

    /// A frame as read back: opcode, FIN, unmasked payload.
    #[derive(Debug, PartialEq)]
    struct Seen(u8, bool, Vec<u8>);

    /// Parses a byte stream into whole frames; `None` if it ends inside one.
    fn parse(mut bytes: &[u8]) -> Option<Vec<Seen>> {
        let mut frames = Vec::new();
        while !bytes.is_empty() {
            if bytes.len() < 2 || bytes.len() < header_len(bytes[1]) {
                return None;
            }
            let hlen = header_len(bytes[1]);
            let len = payload_len(bytes) as usize;
            let mut payload = bytes.get(hlen..hlen + len)?.to_vec();
            if bytes[1] & 0x80 != 0 {
                super::super::apply_mask(&mut payload, bytes[hlen - 4..hlen].try_into().unwrap());
            }
            frames.push(Seen(bytes[0] & 0x0f, bytes[0] & 0x80 != 0, payload));
            bytes = &bytes[hlen + len..];
        }
        Some(frames)
    }

    /// Reads through a gate with buffers of the sizes in `sizes`, in turn, until the frames read
    /// end with a Close: reads of a few bytes cut headers in two, reads of more than a piece take
    /// a piece and more at once.
    /// Nothing is parsed before `at_least` bytes have been read.
    async fn read_to_close<S: AsyncRead + Unpin>(
        gate: &mut FrameGate<S>,
        sizes: &[usize],
        at_least: usize,
    ) -> Vec<Seen> {
        let mut got = Vec::new();
        let mut buf = vec![0u8; *sizes.iter().max().unwrap()];
        for &size in sizes.iter().cycle() {
            let n = within("reading", gate.read(&mut buf[..size])).await.unwrap();
            assert!(n > 0, "the stream ended after {} bytes", got.len());
            got.extend_from_slice(&buf[..n]);
            if got.len() >= at_least
                && let Some(frames) = parse(&got)
                && frames.last().is_some_and(|f| f.0 == 0x8)
            {
                return frames;
            }
        }
        unreachable!("the sizes cycle")
    }

    /// Frames longer than a piece reach the reader as pieces of at most [`PIECE_BYTES`] with the
    /// same payload, first piece with the opcode, the rest continuing it, the last with the FIN
    /// bit; everything else passes as it is, frames over the limit included; however the reads
    /// cut the stream. (A read longer than a piece makes the first piece as long as what it
    /// brought, rounded up to a multiple of 4.)
    #[tokio::test]
    async fn long_data_frames_arrive_in_pieces_with_the_same_payload() {
        let max = 1_000_000;
        let key = [0x11, 0x22, 0x33, 0x44];
        let piece = PIECE_BYTES as usize;
        let sent: Vec<(u8, bool, Vec<u8>)> = vec![
            (0x2, true, pattern(10, 1)),
            (0x2, true, pattern(piece, 2)),
            (0x2, true, pattern(piece + 1, 3)),
            (0x1, false, "é".repeat(100_001).into_bytes()),
            (0x9, true, b"ping".to_vec()),
            (0x0, true, pattern(3 * piece + 7, 4)),
            (0x2, true, pattern(max + 1, 5)),
            (0x8, true, vec![0x03, 0xe8, b'b', b'y', b'e']),
        ];
        let wire: Vec<u8> = sent.iter().flat_map(|(op, fin, p)| frame(*op, *fin, p, key)).collect();
        for sizes in [&[1, 2, 3, 5, 7, 11, 13, 14, 2048][..], &[200_000, 3, 70_000]] {
            let (mut client, server) = tcp_pair().await;
            let mut gate = FrameGate::new(server).frame_limit(max);
            let writer = tokio::spawn({
                let wire = wire.clone();
                async move { client.write_all(&wire).await.map(|_| client) }
            });
            // Cutting only adds headers.
            let frames = read_to_close(&mut gate, sizes, wire.len()).await;
            let _client = writer.await.unwrap().unwrap();
            assert!(gate.peer_closed(), "the Close has been read");
            let mut want = Vec::new();
            for (op, fin, payload) in &sent {
                if *op > 2 || payload.len() <= piece || payload.len() > max {
                    want.push(Seen(*op, *fin, payload.clone()));
                    continue;
                }
                let first =
                    if sizes[0] > piece { (sizes[0] - 14).min(payload.len()).next_multiple_of(4) } else { piece };
                let (head, tail) = payload.split_at(first.min(payload.len()));
                let pieces: Vec<&[u8]> = std::iter::once(head).chain(tail.chunks(piece)).collect();
                for (i, p) in pieces.iter().enumerate() {
                    let last = i == pieces.len() - 1;
                    want.push(Seen(if i == 0 { *op } else { 0 }, last && *fin, p.to_vec()));
                }
            }
            let shape = |v: &[Seen]| v.iter().map(|f| (f.0, f.1, f.2.len())).collect::<Vec<_>>();
            if sizes[0] > piece {
                // How much of the first long frame the first read brings depends on the socket:
                // only the payloads, and the bound on every other piece, are certain.
                let joined = |v: &[Seen]| v.iter().flat_map(|f| f.2.clone()).collect::<Vec<u8>>();
                assert!(joined(&frames) == joined(&want), "payloads differ");
                assert!(
                    frames.iter().all(|f| f.0 > 2 || f.2.len() <= sizes[0] || f.2.len() > max),
                    "{:?}",
                    shape(&frames)
                );
            } else {
                assert_eq!(shape(&frames), shape(&want));
                assert!(frames == want, "payloads differ");
            }
        }
    }

    /// The peer's Close counts as read once its last byte has been, whatever frames came before
    /// it, and not before.
    #[tokio::test]
    async fn the_close_is_noticed_when_whole() {
        let (mut client, server) = tcp_pair().await;
        let mut gate = FrameGate::new(server);
        let key = [9, 8, 7, 6];
        let ping = frame(0x9, true, &[0x88; 3], key);
        let close = frame(0x8, true, &[0x03, 0xe8, b'x'], key);
        let mut buf = [0u8; 64];
        client.write_all(&ping).await.unwrap();
        client.write_all(&close[..close.len() - 1]).await.unwrap();
        let mut n = 0;
        while n < ping.len() + close.len() - 1 {
            n += within("reading", gate.read(&mut buf[n..])).await.unwrap();
        }
        assert!(!gate.peer_closed(), "one byte of the Close is still to come");
        client.write_all(&close[close.len() - 1..]).await.unwrap();
        assert_eq!(within("reading", gate.read(&mut buf)).await.unwrap(), 1);
        assert!(gate.peer_closed());
        // An empty Close, written in two parts and read a byte at a time: its header is held
        // until whole, so the Close counts as read from the first byte handed out.
        let (mut client, server) = tcp_pair().await;
        let mut gate = FrameGate::new(server);
        let empty = frame(0x8, true, &[], key);
        client.write_all(&empty[..1]).await.unwrap();
        client.write_all(&empty[1..]).await.unwrap();
        let mut got = 0;
        while got < empty.len() {
            got += within("reading", gate.read(&mut buf[got..got + 1])).await.unwrap();
        }
        assert_eq!(&buf[..got], &empty[..]);
        assert!(gate.peer_closed());
    }

    /// Through tungstenite, with a small read buffer (so its reads cut headers in two) and with
    /// its default one: messages of every size, fragmented or not, with pings between fragments,
    /// arrive as sent; a frame over the limit is still refused from its header, and a message
    /// over the limit from the piece that takes it past the limit.
    #[tokio::test]
    async fn tungstenite_assembles_the_pieces() {
        let max = 400_000;
        for read_buffer in [1, 128 * 1024] {
            let (client, server) = tcp_pair().await;
            let config = WebSocketConfig::default()
                .read_buffer_size(read_buffer)
                .max_message_size(Some(max))
                .max_frame_size(Some(max));
            let gate = FrameGate::new(server).frame_limit(max);
            let mut server = WebSocketStream::from_raw_socket(gate, Role::Server, Some(config)).await;
            let mut client = WebSocketStream::from_raw_socket(client, Role::Client, None).await;
            let big = pattern(max, 7);
            let text = "€".repeat(max / 3);
            let sender = tokio::spawn(async move {
                client.send(Message::binary(big.clone())).await.unwrap();
                client.send(Message::text(text.clone())).await.unwrap();
                let (a, b) = big.split_at(100_003);
                client
                    .send(Message::Frame(Frame::message(a.to_vec(), OpCode::Data(Data::Binary), false)))
                    .await
                    .unwrap();
                client.send(Message::Ping(bytes::Bytes::from_static(b"mid"))).await.unwrap();
                client
                    .send(Message::Frame(Frame::message(b.to_vec(), OpCode::Data(Data::Continue), true)))
                    .await
                    .unwrap();
                client.send(Message::binary(pattern(1, 0))).await.unwrap();
                client
            });
            let mut got = Vec::new();
            while got.len() < 5 {
                got.push(within("reading", server.next()).await.unwrap().unwrap());
            }
            let mut client = sender.await.unwrap();
            assert!(got[0] == Message::binary(pattern(max, 7)), "one long frame");
            assert!(got[1] == Message::Text(Utf8Bytes::from("€".repeat(max / 3))), "text, cut inside characters");
            assert_eq!(got[2], Message::Ping(bytes::Bytes::from_static(b"mid")));
            assert!(got[3] == Message::binary(pattern(max, 7)), "two fragments, a ping between");
            assert_eq!(got[4], Message::binary(pattern(1, 0)));
            // Over the limit in one frame: refused at its header.
            client.send(Message::binary(pattern(max + 1, 1))).await.unwrap();
            match within("reading", server.next()).await {
                Some(Err(tungstenite::Error::Capacity(_))) => {}
                other => panic!("expected a capacity error, got {other:?}"),
            }
        }
        // Over the limit in fragments, each within it: refused too.
        let (client, server) = tcp_pair().await;
        let config = WebSocketConfig::default().max_message_size(Some(max)).max_frame_size(Some(max));
        let mut server =
            WebSocketStream::from_raw_socket(FrameGate::new(server).frame_limit(max), Role::Server, Some(config)).await;
        let mut client = WebSocketStream::from_raw_socket(client, Role::Client, None).await;
        let half = pattern(max / 2 + 1, 3);
        let sender = tokio::spawn(async move {
            let first = Frame::message(half.clone(), OpCode::Data(Data::Binary), false);
            client.send(Message::Frame(first)).await.unwrap();
            let _ = client.send(Message::Frame(Frame::message(half, OpCode::Data(Data::Continue), true))).await;
            client
        });
        match within("reading", server.next()).await {
            Some(Err(tungstenite::Error::Capacity(_))) => {}
            other => panic!("expected a capacity error, got {other:?}"),
        }
        drop(sender.await);
    }
}
