//! The load generator's clients: TLS, the upgrade, and a WebSocket client cheap enough that
//! the relay's work, not the client's, dominates the figures.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::{Frame, FrameHeader};

use crate::targets::*;

pub(crate) trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}
pub(crate) type Ws = tokio_tungstenite::WebSocketStream<Box<dyn Io>>;

pub(crate) fn client_tls(ca: &rustls::pki_types::CertificateDer<'static>) -> tokio_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.clone()).unwrap();
    let cfg = rustls::ClientConfig::builder_with_provider(wsgate::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
}

/// A TLS client trusting the PEM CA certificate at `ca`, or (without one) a throwaway
/// certificate, which is enough for ws:// and tcp:// endpoints.
pub(crate) fn client_tls_from(ca: Option<&Path>) -> tokio_rustls::TlsConnector {
    use rustls::pki_types::pem::PemObject;
    let ca = match ca {
        Some(p) => rustls::pki_types::CertificateDer::from_pem_file(p)
            .unwrap_or_else(|e| panic!("read the CA certificate {}: {e}", p.display())),
        None => rcgen::generate_simple_self_signed(vec!["x".into()]).unwrap().cert.der().clone(),
    };
    client_tls(&ca)
}

pub(crate) fn client_ws_config() -> WebSocketConfig {
    WebSocketConfig::default().max_message_size(Some(64 << 20)).max_frame_size(Some(64 << 20))
}

/// The TCP connection to `t`, with TLS on top for wss.
pub(crate) async fn open(t: &Endpoint, tls: &tokio_rustls::TlsConnector) -> Box<dyn Io> {
    let tcp = TcpStream::connect(t.addr).await.expect("connect");
    let _ = tcp.set_nodelay(true);
    match t.kind {
        Kind::Wss => {
            let name = ServerName::try_from(t.host.clone()).expect("a TLS server name");
            Box::new(tls.connect(name, tcp).await.expect("tls"))
        }
        _ => Box::new(tcp),
    }
}

/// A general-purpose WebSocket client (tokio-tungstenite), for holding sessions and counting
/// handshakes, where the client's cost per byte does not matter.
pub(crate) async fn ws_connect(t: &Endpoint, tls: &tokio_rustls::TlsConnector) -> Ws {
    let io = open(t, tls).await;
    let (ws, _) =
        tokio_tungstenite::client_async_with_config(t.url(), io, Some(client_ws_config())).await.expect("ws handshake");
    ws
}

/// A session as the throughput and latency figures drive it: a byte stream, plus, for
/// WebSocket, a reader that finds the payload in the frames the server sends.
///
/// Not tokio-tungstenite. A general client masks every byte it sends with a fresh key and builds
/// a message from every frame it reads; on 2 shared cores that cost more CPU than the relays
/// under test and capped them all alike (direct TCP measured only 1.6× the bare bridge; with
/// this client, about 2.7×). This client masks a message once and sends the same frame
/// every time, and counts payload bytes as they arrive without copying them anywhere, so the
/// relay's work dominates. Servers see ordinary masked binary frames; RFC 6455 asks for a fresh
/// mask per frame to protect intermediaries from bytes a page chose, which a load generator has
/// no need of.
pub(crate) struct Conn {
    pub(crate) io: Box<dyn Io>,
    pub(crate) reader: Payload,
    /// Payload bytes that arrived together with the handshake response.
    pub(crate) early: usize,
}

impl Conn {
    pub(crate) async fn open(t: &Endpoint, tls: &tokio_rustls::TlsConnector) -> Conn {
        let mut io = open(t, tls).await;
        let mut reader = Payload { is_ws: t.kind != Kind::Tcp, ..Payload::default() };
        let early = if reader.is_ws { reader.count(&upgrade(&mut io, t).await) } else { 0 };
        Conn { io, reader, early }
    }

    /// The bytes that carry one message of `payload`: itself over TCP, one masked binary frame
    /// over WebSocket.
    pub(crate) fn wire(&self, payload: &[u8]) -> Vec<u8> {
        if !self.reader.is_ws {
            return payload.to_vec();
        }
        let mut frame = Frame::message(bytes::Bytes::copy_from_slice(payload), OpCode::Data(Data::Binary), true);
        frame.header_mut().mask = Some([0x37, 0xfa, 0x21, 0x3d]);
        let mut wire = Vec::with_capacity(frame.len());
        frame.format(&mut wire).expect("formatting into a Vec cannot fail");
        wire
    }

    /// Sends `wire`, one message of `size` payload bytes, and waits until `size` payload bytes
    /// have come back.
    pub(crate) async fn round_trip(&mut self, wire: &[u8], size: usize, buf: &mut [u8]) {
        self.io.write_all(wire).await.expect("send a message");
        let mut got = 0;
        while got < size {
            let n = self.io.read(buf).await.expect("read the echo");
            assert!(n > 0, "the target closed the session");
            got += self.reader.count(&buf[..n]);
        }
    }
}

/// Sends the HTTP upgrade request and reads the response; returns the bytes that followed it.
pub(crate) async fn upgrade(io: &mut Box<dyn Io>, t: &Endpoint) -> Vec<u8> {
    match try_upgrade(io, t).await {
        Ok(rest) => rest,
        Err(NotUpgraded::Io(step, e)) => panic!("{}: {step}: {e}", t.url()),
        Err(NotUpgraded::Closed) => panic!("{}: connection closed during the handshake", t.url()),
        Err(NotUpgraded::Answered(head)) => panic!("{}: not upgraded: {}", t.url(), head.lines().next().unwrap_or("")),
    }
}

/// Why an upgrade did not happen.
pub(crate) enum NotUpgraded {
    /// Sending the request (`"request"`) or reading the answer (`"response"`) failed.
    Io(&'static str, std::io::Error),
    /// The connection closed before a whole response head.
    Closed,
    /// A response other than 101: its head.
    Answered(String),
}

/// [`upgrade`], telling what went wrong instead of panicking.
pub(crate) async fn try_upgrade(io: &mut Box<dyn Io>, t: &Endpoint) -> Result<Vec<u8>, NotUpgraded> {
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: {}:{}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        t.path,
        t.host,
        t.addr.port()
    );
    io.write_all(request.as_bytes()).await.map_err(|e| NotUpgraded::Io("request", e))?;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = io.read(&mut buf).await.map_err(|e| NotUpgraded::Io("response", e))?;
        if n == 0 {
            return Err(NotUpgraded::Closed);
        }
        got.extend_from_slice(&buf[..n]);
        if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&got[..end]).into_owned();
            if !head.starts_with("HTTP/1.1 101") {
                return Err(NotUpgraded::Answered(head));
            }
            return Ok(got.split_off(end + 4));
        }
    }
}

/// Counts the payload bytes in a server's byte stream: all of them over TCP; over WebSocket,
/// those of data frames, skipping frame headers and control frames.
#[derive(Default)]
pub(crate) struct Payload {
    pub(crate) is_ws: bool,
    /// The frame header read so far (at most 14 bytes: 2, 8 of length, 4 of mask).
    pub(crate) header: [u8; 14],
    pub(crate) have: usize,
    /// Payload bytes of the current frame still to come.
    pub(crate) remaining: u64,
    /// Whether the current frame carries data (continuation, text, binary).
    pub(crate) is_data: bool,
}

impl Payload {
    /// The payload bytes in `data`, the next bytes read from the server.
    pub(crate) fn count(&mut self, mut data: &[u8]) -> usize {
        if !self.is_ws {
            return data.len();
        }
        let mut n = 0;
        while !data.is_empty() {
            if self.remaining > 0 {
                let take = self.remaining.min(data.len() as u64) as usize;
                if self.is_data {
                    n += take;
                }
                self.remaining -= take as u64;
                data = &data[take..];
                continue;
            }
            self.header[self.have] = data[0];
            self.have += 1;
            data = &data[1..];
            let parsed = FrameHeader::parse(&mut std::io::Cursor::new(&self.header[..self.have]));
            if let Some((header, len)) = parsed.expect("the server sent a malformed frame header") {
                (self.have, self.remaining, self.is_data) = (0, len, matches!(header.opcode, OpCode::Data(_)));
            }
        }
        n
    }
}
