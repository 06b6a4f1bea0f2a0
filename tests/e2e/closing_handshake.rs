//! The closing handshake on the raw socket (RFC 6455 §7.1.1): once close frames have crossed,
//! valid or not, the gateway closes TCP at once, with a FIN, after its close frame arrived whole.

use std::io::ErrorKind;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::*;

/// How soon after its close frame the gateway's FIN must arrive.
const PROMPTLY: Duration = Duration::from_millis(100);

/// A client Close that is itself invalid (Autobahn 7.3.2: a 1-byte payload; 7.3.6: a reason
/// over 123 bytes; and a reason that is not UTF-8) is answered with 1002 (1007 for the UTF-8),
/// which arrives whole, with no reset before it, and the gateway's FIN follows within 100 ms,
/// with the default `close_timeout_secs` (5 s) and nothing more from the client.
#[tokio::test]
async fn an_invalid_close_is_answered_then_the_connection_closed_at_once() {
    let (backend, _received) = Backend::sink().await;
    let gw = Gateway::builder().route("tcp", "/tcp", &backend.target()).start().await;
    let mut long_reason = 1000u16.to_be_bytes().to_vec();
    long_reason.extend_from_slice(&[b'r'; 124]);
    let cases: [(&str, Vec<u8>, u16); 3] = [
        ("7.3.2: one byte", vec![0x03], 1002),
        ("7.3.6: a reason of 124 bytes", long_reason, 1002),
        ("a reason that is not UTF-8", vec![0x03, 0xe8, 0xff, 0xfe], 1007),
    ];
    for (what, payload, want) in cases {
        let mut s = open(gw.plain).await;
        s.write_all(&masked_frame(0x88, &payload)).await.unwrap();
        let code = read_close(&mut s, what).await;
        assert_eq!(code, want, "{what}");
        fin_within(&mut s, PROMPTLY, what).await;
    }
}

/// The same after a client error that is not its Close: the gateway answers 1002 and waits for
/// the client's Close, and closes within 100 ms of it.
#[tokio::test]
async fn after_a_client_error_the_clients_close_ends_the_connection_at_once() {
    let (backend, _received) = Backend::sink().await;
    let gw = Gateway::builder().route("tcp", "/tcp", &backend.target()).start().await;
    let mut s = open(gw.plain).await;
    // A continuation frame with nothing to continue.
    s.write_all(&masked_frame(0x80, b"x")).await.unwrap();
    assert_eq!(read_close(&mut s, "stray continuation").await, 1002);
    s.write_all(&masked_frame(0x88, &1002u16.to_be_bytes())).await.unwrap();
    fin_within(&mut s, PROMPTLY, "after the client's Close").await;
}

/// A raw WebSocket session on `/tcp`, nothing read after the 101.
async fn open(gateway: SocketAddr) -> TcpStream {
    raw_upgrade(within("connect", TcpStream::connect(gateway)).await.unwrap(), "/tcp").await
}

/// Reads one whole server close frame and returns its code; a reset or an early end fails.
async fn read_close(s: &mut TcpStream, what: &str) -> u16 {
    let mut head = [0u8; 2];
    within("close frame", s.read_exact(&mut head))
        .await
        .unwrap_or_else(|e| panic!("{what}: before the close frame: {e}"));
    assert_eq!(head[0], 0x88, "{what}: a final close frame");
    assert!(head[1] <= 125 && head[1] >= 2, "{what}: unmasked, with a code");
    let mut payload = vec![0u8; head[1] as usize];
    within("close payload", s.read_exact(&mut payload))
        .await
        .unwrap_or_else(|e| panic!("{what}: inside the close frame: {e}"));
    assert!(std::str::from_utf8(&payload[2..]).is_ok(), "{what}: the reason is text");
    u16::from_be_bytes([payload[0], payload[1]])
}

/// The next read finds the end of the stream (the gateway's FIN) within `limit`: no more bytes,
/// no reset.
async fn fin_within(s: &mut TcpStream, limit: Duration, what: &str) {
    let since = Instant::now();
    let mut buf = [0u8; 64];
    match within("the gateway's FIN", s.read(&mut buf)).await {
        Ok(0) => {}
        Ok(n) => panic!("{what}: {n} bytes after the close frame"),
        Err(e) if e.kind() == ErrorKind::ConnectionReset => panic!("{what}: reset instead of FIN"),
        Err(e) => panic!("{what}: {e}"),
    }
    let took = since.elapsed();
    assert!(took <= limit, "{what}: FIN {took:?} after the close frame, more than {limit:?}");
}
