//! The unbuffered TLS stream against rustls's own client (tokio-rustls) over loopback sockets.

use std::time::Duration;

use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::*;

const WAIT: Duration = Duration::from_secs(10);

/// A connected pair: our server stream and a tokio-rustls client.
async fn pair() -> (TlsStream, tokio_rustls::client::TlsStream<TcpStream>) {
    let (server, client) = crate::tls::self_signed_configs();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let connect = async {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let name = ServerName::try_from("localhost").unwrap();
        tokio_rustls::TlsConnector::from(client).connect(name, tcp).await.unwrap()
    };
    let accept = async {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut progressed = false;
        let stream = accept(server, tcp, || progressed = true).await.unwrap();
        assert!(progressed, "the ClientHello was answered");
        stream
    };
    tokio::time::timeout(WAIT, async { tokio::join!(accept, connect) }).await.expect("handshake")
}

/// Bytes cross both ways intact whatever the read sizes: records larger than the reader's
/// buffer, several records per read, writes larger than one call takes. Once a read waits, the
/// stream holds no buffer.
#[tokio::test]
async fn relays_both_ways_and_holds_no_buffer_when_idle() {
    let (mut server, client) = pair().await;
    let (mut cr, mut cw) = tokio::io::split(client);
    let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let run = async {
        // Client to server, read in small pieces (a record is cut across reads).
        let writer = async {
            cw.write_all(&data).await.unwrap();
            cw.flush().await.unwrap();
        };
        let reader = async {
            let mut got = Vec::new();
            let mut small = [0u8; 1000];
            while got.len() < data.len() {
                let n = server.read(&mut small).await.unwrap();
                assert!(n > 0, "no early end");
                got.extend_from_slice(&small[..n]);
            }
            got
        };
        let ((), got) = tokio::join!(writer, reader);
        assert!(got == data, "client → server bytes intact");
        let idle = tokio::time::timeout(Duration::from_millis(20), server.read(&mut [0u8; 1000])).await;
        assert!(idle.is_err(), "no data, so the read waits");
        assert_eq!(server.allocated(), 0, "an idle stream holds no buffer");
        // Server to client, in large writes.
        let writer = async {
            server.write_all(&data).await.unwrap();
            server.flush().await.unwrap();
        };
        let reader = async {
            let mut got = vec![0u8; data.len()];
            cr.read_exact(&mut got).await.unwrap();
            got
        };
        let ((), got) = tokio::join!(writer, reader);
        assert!(got == data, "server → client bytes intact");
        assert_eq!(server.allocated(), 0, "written and flushed: no buffer");
    };
    tokio::time::timeout(WAIT, run).await.expect("relay");
}

/// The ends: the client's close_notify is the end of the stream; a socket closed without it
/// is an error (a truncation); our shutdown sends close_notify, which the client sees as the end.
#[tokio::test]
async fn close_notify_ends_the_stream_and_truncation_is_an_error() {
    let run = async {
        let (mut server, mut client) = pair().await;
        client.write_all(b"last").await.unwrap();
        client.shutdown().await.unwrap();
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.expect("a clean end");
        assert_eq!(got, b"last");
        server.write_all(b"reply").await.unwrap();
        server.shutdown().await.unwrap();
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.expect("close_notify from the server");
        assert_eq!(got, b"reply");

        let (mut server, client) = pair().await;
        // The socket's end (FIN) without close_notify; not dropped, which would send a reset
        // for the session tickets it has not read.
        let (mut tcp, _) = client.into_inner();
        tcp.shutdown().await.unwrap();
        let err = server.read(&mut [0u8; 100]).await.expect_err("no close_notify");
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    };
    tokio::time::timeout(WAIT, run).await.expect("close");
}

/// A client that stops in the middle of a record (a header announcing 16 KiB, then 10 bytes)
/// leaves the stream holding those bytes, not a read's worth of buffer.
#[tokio::test]
async fn a_stalled_partial_record_holds_only_itself() {
    let run = async {
        let (mut server, mut client) = pair().await;
        let mut partial = vec![0x17, 0x03, 0x03, 0x40, 0x00];
        partial.extend_from_slice(&[0u8; 10]);
        client.get_mut().0.write_all(&partial).await.unwrap();
        let stalled = tokio::time::timeout(Duration::from_millis(50), server.read(&mut [0u8; 1000])).await;
        assert!(stalled.is_err(), "the rest of the record never comes, so the read waits");
        assert!(
            server.allocated() <= partial.len(),
            "{} bytes held for a {}-byte partial record",
            server.allocated(),
            partial.len()
        );
    };
    tokio::time::timeout(WAIT, run).await.expect("stall");
}

/// A client that is not TLS fails the handshake with an error, not a hang.
#[tokio::test]
async fn a_client_that_is_not_tls_fails_the_handshake() {
    let (config, _) = crate::tls::self_signed_configs();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut tcp = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
    tcp.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let (server, _) = listener.accept().await.unwrap();
    let result = tokio::time::timeout(WAIT, accept(config, server, || {})).await.expect("no hang");
    assert_eq!(result.expect_err("not TLS").kind(), io::ErrorKind::InvalidData);
}
