//! HAProxy's PROXY protocol, v1 (text) and v2 (binary): reading the header a trusted load
//! balancer puts before its client's bytes ([`read_header`]), and building the one a route sends
//! its backend before any other byte ([`header`]). Parsing and building are the `ppp` crate's;
//! what is here is how much to read, and what the header means for us.
//!
//! The reader takes exactly the header's bytes from the socket and not one more: what follows is
//! the client's TLS ClientHello or HTTP request, which the rest of the server reads. Every header
//! is at least 15 bytes (`PROXY UNKNOWN\r\n`; v2's fixed part is 16), so those are read first;
//! a v2 header then says its length (capped by `limits.proxy_header_max_bytes`), and a v1 line
//! is taken up to its `\n` by peeking (at most 107 bytes, the protocol's bound). The caller
//! bounds the whole read by the handshake deadline.
//!
//! Who may send a header, and what happens to a connection without one, is the server's
//! business (`server::accept`).

use std::io;
use std::net::{IpAddr, SocketAddr};

use ppp::v2::{Builder, Command, Protocol, Type};
use ppp::{v1, v2};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

use crate::config::ProxyVersion;
use crate::policy::Identity;

/// What a received header says about the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Carried {
    /// A proxied client: its address, and the address it connected to (the balancer's).
    Client {
        /// The client's address and port.
        source: SocketAddr,
        /// The address the client connected to.
        destination: SocketAddr,
    },
    /// The balancer's own connection (v2 `LOCAL`, as its health checks send; v1 `UNKNOWN`; or
    /// addresses other than IP): the peer's address stands.
    Balancer,
}

/// Why no header could be read; the connection is closed.
#[derive(Debug, thiserror::Error)]
pub enum HeaderError {
    /// The peer closed before a whole header arrived.
    #[error("connection closed before a complete PROXY header")]
    Closed,
    /// The socket failed.
    #[error("reading the PROXY header: {0}")]
    Io(#[source] io::Error),
    /// The connection does not start with a PROXY header.
    #[error("no PROXY protocol header")]
    Missing,
    /// A v1 line that does not parse, or is longer than the protocol allows.
    #[error("malformed PROXY v1 header: {0}")]
    V1(String),
    /// A v2 header that does not parse.
    #[error("malformed PROXY v2 header: {0}")]
    V2(#[source] v2::ParseError),
    /// A v2 PROXY header for a datagram (UDP) connection: this is a TCP listener, so whatever
    /// sent it is not describing this connection.
    #[error("PROXY v2 header for a datagram connection on a stream listener")]
    Datagram,
    /// A v2 header longer than `limits.proxy_header_max_bytes`.
    #[error("PROXY v2 header of {len} bytes is over limits.proxy_header_max_bytes ({max})")]
    TooLong {
        /// Its length, prefix included.
        len: usize,
        /// The cap.
        max: usize,
    },
}

impl From<io::Error> for HeaderError {
    fn from(e: io::Error) -> Self {
        if e.kind() == io::ErrorKind::UnexpectedEof { HeaderError::Closed } else { HeaderError::Io(e) }
    }
}

/// The shortest header of either version: `PROXY UNKNOWN\r\n` (v2's fixed part is 16 bytes).
const SHORTEST: usize = 15;
/// v2's fixed part: the 12-byte signature, version and command, family, 16-bit length.
const V2_FIXED: usize = 16;
/// v1's bound on a whole line, CRLF included (the protocol's own).
const V1_MAX: usize = 107;

/// Reads exactly one PROXY header (v1 or v2) from the start of `stream`. A v2 header longer
/// than `max_v2` bytes is refused before its body is read. Unbounded in time: the caller puts
/// it under the handshake deadline.
pub async fn read_header(stream: &mut TcpStream, max_v2: usize) -> Result<Carried, HeaderError> {
    let mut head = [0u8; SHORTEST];
    stream.read_exact(&mut head).await?;
    if head.starts_with(v2::PROTOCOL_PREFIX) {
        read_v2(stream, &head, max_v2).await
    } else if head.starts_with(b"PROXY ") {
        read_v1(stream, &head).await
    } else {
        Err(HeaderError::Missing)
    }
}

async fn read_v2(stream: &mut TcpStream, head: &[u8; SHORTEST], max: usize) -> Result<Carried, HeaderError> {
    let mut header = Vec::with_capacity(V2_FIXED + 64);
    header.extend_from_slice(head);
    header.push(stream.read_u8().await?);
    let len = V2_FIXED + usize::from(u16::from_be_bytes([header[14], header[15]]));
    if len > max {
        return Err(HeaderError::TooLong { len, max });
    }
    header.resize(len, 0);
    stream.read_exact(&mut header[V2_FIXED..]).await?;
    let parsed = v2::Header::try_from(header.as_slice()).map_err(HeaderError::V2)?;
    if parsed.command == Command::Proxy && parsed.protocol == v2::Protocol::Datagram {
        return Err(HeaderError::Datagram);
    }
    Ok(match (parsed.command, parsed.addresses) {
        (Command::Local, _) => Carried::Balancer,
        (Command::Proxy, v2::Addresses::IPv4(a)) => Carried::Client {
            source: SocketAddr::new(IpAddr::V4(a.source_address), a.source_port),
            destination: SocketAddr::new(IpAddr::V4(a.destination_address), a.destination_port),
        },
        (Command::Proxy, v2::Addresses::IPv6(a)) => Carried::Client {
            source: SocketAddr::new(IpAddr::V6(a.source_address), a.source_port),
            destination: SocketAddr::new(IpAddr::V6(a.destination_address), a.destination_port),
        },
        (Command::Proxy, v2::Addresses::Unspecified | v2::Addresses::Unix(_)) => Carried::Balancer,
    })
}

/// Takes the rest of a v1 line: peek, then read exactly up to the `\n` if it has arrived, or
/// everything peeked if not (all of it belongs to the line). Each round consumes what it saw,
/// so the next peek waits for new bytes rather than returning the same ones again.
async fn read_v1(stream: &mut TcpStream, head: &[u8; SHORTEST]) -> Result<Carried, HeaderError> {
    let mut line = Vec::with_capacity(V1_MAX);
    line.extend_from_slice(head);
    let mut seen = [0u8; V1_MAX];
    while !line.contains(&b'\n') {
        let room = V1_MAX - line.len();
        if room == 0 {
            return Err(HeaderError::V1(format!("no end of line within {V1_MAX} bytes")));
        }
        let n = stream.peek(&mut seen[..room]).await.map_err(HeaderError::from)?;
        if n == 0 {
            return Err(HeaderError::Closed);
        }
        let take = seen[..n].iter().position(|&b| b == b'\n').map_or(n, |i| i + 1);
        stream.read_exact(&mut seen[..take]).await?;
        line.extend_from_slice(&seen[..take]);
    }
    let parsed = v1::Header::try_from(line.as_slice()).map_err(|e| HeaderError::V1(e.to_string()))?;
    // The line ends at the first `\n`; a header that ends earlier (at a lone `\r\n` inside the
    // first bytes) would leave bytes of ours unaccounted for.
    if parsed.header.len() != line.len() {
        return Err(HeaderError::V1("the line does not end with \\r\\n".into()));
    }
    Ok(match parsed.addresses {
        v1::Addresses::Tcp4(a) => Carried::Client {
            source: SocketAddr::new(IpAddr::V4(a.source_address), a.source_port),
            destination: SocketAddr::new(IpAddr::V4(a.destination_address), a.destination_port),
        },
        v1::Addresses::Tcp6(a) => Carried::Client {
            source: SocketAddr::new(IpAddr::V6(a.source_address), a.source_port),
            destination: SocketAddr::new(IpAddr::V6(a.destination_address), a.destination_port),
        },
        v1::Addresses::Unknown => Carried::Balancer,
    })
}

/// The PP2 type of the TLV that carries the authenticated user (UTF-8): the first of the range
/// the protocol leaves to applications (`PP2_TYPE_MIN_CUSTOM`, 0xE0).
pub const PP2_TYPE_USER: u8 = 0xE0;
/// `PP2_CLIENT_SSL`, `PP2_CLIENT_CERT_CONN`, `PP2_CLIENT_CERT_SESS`: the client bits of a
/// `PP2_TYPE_SSL` TLV.
const PP2_CLIENT_SSL: u8 = 0x01;
const PP2_CLIENT_CERT_CONN: u8 = 0x02;
const PP2_CLIENT_CERT_SESS: u8 = 0x04;
/// An identity value longer than this is left out of the header rather than cut: a truncated
/// name would be someone else's. Two of them keep the header far below its 64 KiB bound.
const MAX_TLV_VALUE: usize = 4096;

/// The header a route sends its backend: the client's address and port (`client`) and the
/// address it connected to (`destination`), in one family (IPv4 when both are, otherwise
/// IPv6, IPv4 ones mapped). For v2, TLVs say what the gateway knows of the client: whether it
/// came over TLS and the common name of its verified certificate (`PP2_TYPE_SSL` with
/// `PP2_SUBTYPE_SSL_CN`), and the authenticated user ([`PP2_TYPE_USER`]).
pub fn header(
    version: ProxyVersion,
    client: SocketAddr,
    destination: SocketAddr,
    identity: &Identity,
    tls: bool,
) -> Vec<u8> {
    let (client, destination) = same_family(client, destination);
    match version {
        ProxyVersion::V1 => v1::Addresses::from((client, destination)).to_string().into_bytes(),
        ProxyVersion::V2 => {
            let version_command = v2::Version::Two | Command::Proxy;
            let mut builder = Builder::with_addresses(version_command, Protocol::Stream, (client, destination));
            // Building into a `Vec` fails only past the 64 KiB length, which the bound on each
            // value rules out.
            const BOUNDED: &str = "TLV values are bounded by MAX_TLV_VALUE";
            if tls {
                builder = builder.write_payload(ssl_tlv(identity)).expect(BOUNDED);
            }
            if let Some(user) = identity.user.as_deref().filter(|u| u.len() <= MAX_TLV_VALUE) {
                builder = builder.write_tlv(PP2_TYPE_USER, user.as_bytes()).expect(BOUNDED);
            }
            builder.build().expect(BOUNDED)
        }
    }
}

/// `PP2_TYPE_SSL`: client bits, a 32-bit verify result (0: verified, as every certificate that
/// reaches here was), then `PP2_SUBTYPE_SSL_CN` when the certificate has a common name.
fn ssl_tlv(identity: &Identity) -> v2::TypeLengthValue<'static> {
    let mut value = vec![PP2_CLIENT_SSL, 0, 0, 0, 0];
    if identity.cert_subject.is_some() {
        value[0] |= PP2_CLIENT_CERT_CONN | PP2_CLIENT_CERT_SESS;
    }
    if let Some(cn) = identity.cert_common_name.as_deref().filter(|cn| cn.len() <= MAX_TLV_VALUE) {
        value.push(u8::from(Type::SSLCommonName));
        let len = u16::try_from(cn.len()).expect("bounded by MAX_TLV_VALUE");
        value.extend_from_slice(&len.to_be_bytes());
        value.extend_from_slice(cn.as_bytes());
    }
    v2::TypeLengthValue::new(Type::SSL, &value).to_owned()
}

/// The header a health check sends before anything else on a route that sends PROXY headers:
/// the balancer's own connection (v2 `LOCAL`, v1 `UNKNOWN`), so the backend neither refuses
/// the check nor counts it as a client.
pub fn local_header(version: ProxyVersion) -> &'static [u8] {
    match version {
        ProxyVersion::V1 => b"PROXY UNKNOWN\r\n",
        // The v2 signature, version 2 with command LOCAL, family UNSPEC, no address bytes.
        ProxyVersion::V2 => b"\r\n\r\n\0\r\nQUIT\n\x20\x00\x00\x00",
    }
}

/// `a` and `b` in one address family: IPv4 when both are (mapped addresses count), otherwise
/// IPv6 with IPv4 ones mapped.
fn same_family(a: SocketAddr, b: SocketAddr) -> (SocketAddr, SocketAddr) {
    let (a, b) = (crate::client_addr::canonical(a), crate::client_addr::canonical(b));
    if a.is_ipv4() == b.is_ipv4() {
        return (a, b);
    }
    let v6 = |s: SocketAddr| match s.ip() {
        IpAddr::V4(v4) => SocketAddr::new(IpAddr::V6(v4.to_ipv6_mapped()), s.port()),
        IpAddr::V6(_) => s,
    };
    (v6(a), v6(b))
}

#[cfg(test)]
mod proptests;
#[cfg(test)]
mod tests;
