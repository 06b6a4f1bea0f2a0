//! The reader over real loopback sockets, and the headers built for backends read back.

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::*;

/// A connected pair of loopback sockets: (the side that writes, the side `read_header` reads).
pub(super) async fn pair() -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
    let (server, _) = listener.accept().await.unwrap();
    (client, server)
}

/// Sends `bytes` then EOF; reads a header; returns its result and every byte left behind.
async fn read_from(bytes: &[u8], max_v2: usize) -> (Result<Carried, HeaderError>, Vec<u8>) {
    let (mut client, mut server) = pair().await;
    client.write_all(bytes).await.unwrap();
    client.shutdown().await.unwrap();
    let result = read_header(&mut server, max_v2).await;
    let mut rest = Vec::new();
    server.read_to_end(&mut rest).await.unwrap();
    (result, rest)
}

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// v1 and v2 headers give their addresses and leave the bytes behind them in the socket.
#[tokio::test]
async fn headers_are_read_exactly() {
    let tls_hello = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03";
    let mut v1 = b"PROXY TCP4 192.0.2.1 198.51.100.1 56324 443\r\n".to_vec();
    v1.extend_from_slice(tls_hello);
    let (result, rest) = read_from(&v1, 4096).await;
    let expected = Carried::Client { source: sa("192.0.2.1:56324"), destination: sa("198.51.100.1:443") };
    assert_eq!(result.unwrap(), expected);
    assert_eq!(rest, tls_hello);

    let mut v1 = b"PROXY TCP6 2001:db8::1 2001:db8::2 1 2\r\nGET /".to_vec();
    let (result, rest) = read_from(&v1, 4096).await;
    let expected = Carried::Client { source: sa("[2001:db8::1]:1"), destination: sa("[2001:db8::2]:2") };
    assert_eq!(result.unwrap(), expected);
    assert_eq!(rest, b"GET /");
    v1.clear();
    v1.extend_from_slice(b"PROXY UNKNOWN\r\nX");
    let (result, rest) = read_from(&v1, 4096).await;
    assert_eq!((result.unwrap(), rest.as_slice()), (Carried::Balancer, &b"X"[..]));

    let identity = Identity { user: Some("alice".into()), ..Identity::default() };
    let mut v2 = header(ProxyVersion::V2, sa("203.0.113.9:4000"), sa("10.0.0.1:443"), &identity, true);
    let len = v2.len();
    v2.extend_from_slice(tls_hello);
    let (result, rest) = read_from(&v2, 4096).await;
    let expected = Carried::Client { source: sa("203.0.113.9:4000"), destination: sa("10.0.0.1:443") };
    assert_eq!(result.unwrap(), expected);
    assert_eq!(rest, tls_hello);
    // The cap counts the whole header.
    let (result, _) = read_from(&v2, len - 1).await;
    assert!(matches!(result, Err(HeaderError::TooLong { len: l, .. }) if l == len), "{result:?}");
}

/// v2 LOCAL (health checks) leaves the peer's address; anything that is not a header, or is
/// cut short, is an error.
#[tokio::test]
async fn local_missing_and_truncated() {
    let local = v2::Builder::with_addresses(
        v2::Version::Two | Command::Local,
        Protocol::Unspecified,
        v2::Addresses::Unspecified,
    )
    .build()
    .unwrap();
    let (result, rest) = read_from(&[&local[..], b"GET"].concat(), 4096).await;
    assert_eq!((result.unwrap(), rest.as_slice()), (Carried::Balancer, &b"GET"[..]));

    let (result, _) = read_from(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", 4096).await;
    assert!(matches!(result, Err(HeaderError::Missing)), "{result:?}");
    let (result, _) = read_from(b"PROXY TCP4 1.2.3.4", 4096).await;
    assert!(matches!(result, Err(HeaderError::Closed)), "{result:?}");
    let (result, _) = read_from(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n", 4096).await;
    assert!(matches!(result, Err(HeaderError::V1(_))), "{result:?}");
    let (result, _) = read_from(&[b"PROXY TCP4 ".as_slice(), &[b'1'; 120]].concat(), 4096).await;
    assert!(matches!(result, Err(HeaderError::V1(_))), "{result:?}");
    let (result, _) = read_from(&local[..15], 4096).await;
    assert!(matches!(result, Err(HeaderError::Closed)), "{result:?}");
    // A UDP client's header describes some other connection than this TCP one.
    let addresses = v2::IPv4::new([203, 0, 113, 9], [10, 0, 0, 1], 4000, 443);
    let udp =
        v2::Builder::with_addresses(v2::Version::Two | Command::Proxy, Protocol::Datagram, addresses).build().unwrap();
    let (result, _) = read_from(&udp, 4096).await;
    assert!(matches!(result, Err(HeaderError::Datagram)), "{result:?}");
}

/// What a backend gets: v1 as text, in one family; v2 with the SSL TLV (CN) and the user TLV.
#[test]
fn headers_for_backends() {
    let none = Identity::default();
    let v1 = header(ProxyVersion::V1, sa("127.0.0.2:5000"), sa("127.0.0.1:8080"), &none, false);
    assert_eq!(v1, b"PROXY TCP4 127.0.0.2 127.0.0.1 5000 8080\r\n");
    let mixed = header(ProxyVersion::V1, sa("[2001:db8::7]:5000"), sa("[::ffff:127.0.0.1]:8080"), &none, false);
    assert_eq!(mixed, b"PROXY TCP6 2001:db8::7 ::ffff:127.0.0.1 5000 8080\r\n");
    let mapped = header(ProxyVersion::V1, sa("[::ffff:10.0.0.1]:1"), sa("10.0.0.2:2"), &none, false);
    assert_eq!(mapped, b"PROXY TCP4 10.0.0.1 10.0.0.2 1 2\r\n");

    // The common name as the certificate holds it, never re-parsed from the subject's text.
    let id = Identity {
        user: Some("alice".into()),
        cert_subject: Some("OU=x\\,CN=admin,CN=ops.example.com,O=Example".into()),
        cert_common_name: Some("ops.example.com".into()),
    };
    let v2 = header(ProxyVersion::V2, sa("127.0.0.3:6000"), sa("127.0.0.1:8443"), &id, true);
    let parsed = v2::Header::try_from(v2.as_slice()).unwrap();
    assert_eq!(parsed.len(), v2.len());
    assert_eq!(parsed.command, Command::Proxy);
    let tlvs: Vec<_> = parsed.tlvs().map(|t| t.unwrap()).collect();
    assert_eq!(tlvs.len(), 2, "{tlvs:?}");
    assert_eq!(tlvs[0].kind, 0x20);
    let ssl = &tlvs[0].value;
    assert_eq!(ssl[0], PP2_CLIENT_SSL | PP2_CLIENT_CERT_CONN | PP2_CLIENT_CERT_SESS);
    assert_eq!(&ssl[1..5], &[0, 0, 0, 0], "verified");
    assert_eq!(&ssl[5..], [&[0x22, 0, 15][..], b"ops.example.com"].concat());
    assert_eq!((tlvs[1].kind, &tlvs[1].value[..]), (PP2_TYPE_USER, &b"alice"[..]));
    // Plain ws, nobody authenticated: addresses only.
    let bare = header(ProxyVersion::V2, sa("127.0.0.3:6000"), sa("127.0.0.1:8443"), &none, false);
    assert_eq!(bare.len(), 16 + 12);
}

/// A health check's header reads as the balancer's own connection, in both versions, and
/// leaves what follows it.
#[tokio::test]
async fn local_headers_read_as_the_balancer() {
    for version in [ProxyVersion::V1, ProxyVersion::V2] {
        let mut bytes = local_header(version).to_vec();
        bytes.extend_from_slice(b"RFB?");
        let (result, rest) = read_from(&bytes, 4096).await;
        assert_eq!((result.unwrap(), rest.as_slice()), (Carried::Balancer, &b"RFB?"[..]), "{version:?}");
    }
}
