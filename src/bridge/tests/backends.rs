//! The pump over backends other than TCP: a Unix socket, and TLS with honest read readiness.

use futures_util::SinkExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UnixStream};
use tokio_util::sync::CancellationToken;
use tungstenite::Message;
use tungstenite::protocol::Role;

use super::pump::{options, pattern, read_messages, spawn_pump, within, ws_pair};
use crate::bridge::End;

/// A Unix-socket backend relays byte for byte both ways through the pump, and its EOF ends the
/// pump as `BackendEof` with everything counted.
#[tokio::test]
async fn a_unix_socket_backend_relays_byte_for_byte() {
    let (ws, mut peer) = ws_pair(Role::Server).await;
    let (gateway_side, mut backend) = UnixStream::pair().unwrap();
    let pump = spawn_pump(ws, gateway_side, options(Role::Server, 256 * 1024), CancellationToken::new());
    let (first, second) = (pattern(100_000, 1), pattern(3, 2));
    within("sending", peer.send(Message::binary(first.clone()))).await.unwrap();
    within("sending", peer.send(Message::binary(second.clone()))).await.unwrap();
    let mut up = vec![0u8; first.len() + second.len()];
    within("the backend reading", backend.read_exact(&mut up)).await.unwrap();
    assert!(up == [first, second].concat(), "client → backend, byte for byte");
    let down = pattern(700_000, 3);
    within("the backend writing", backend.write_all(&down)).await.unwrap();
    assert!(read_messages(&mut peer, down.len()).await == down, "backend → client, byte for byte");
    drop(backend);
    let (end, _, totals) = within("the pump ending", pump).await.unwrap();
    assert!(matches!(end, End::BackendEof), "{end:?}");
    assert_eq!((totals.to_backend.bytes, totals.to_backend.messages), (100_003, 2));
    assert_eq!(totals.to_client.bytes, 700_000);
}

/// A TLS backend sends two records in one write (so one TCP segment), with a 1 KiB read size:
/// the pump's first read takes the first record's 1,024 bytes, and the second record then sits
/// decrypted in rustls while the socket is empty. The backend's read readiness must report it,
/// so both reach the client with no more traffic (socket readiness alone would wait for good).
#[tokio::test]
async fn a_tls_backend_delivers_two_records_of_one_segment() {
    let (server_config, client_config) = crate::tls::self_signed_configs();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepting = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        tokio_rustls::TlsAcceptor::from(server_config).accept(tcp).await.unwrap()
    });
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let connector = tokio_rustls::TlsConnector::from(client_config);
    let gateway_side = within("the TLS handshake", connector.connect(name, tcp)).await.unwrap();
    let mut backend = within("the TLS accept", accepting).await.unwrap();
    let (ws, mut peer) = ws_pair(Role::Server).await;
    let pump = spawn_pump(ws, Box::new(gateway_side), options(Role::Server, 1024), CancellationToken::new());
    let (first, second) = (pattern(1024, 7), pattern(500, 8));
    {
        // Two records in rustls's send buffer (one per write), then one flush: one `writev`.
        use std::io::Write;
        let connection = backend.get_mut().1;
        connection.writer().write_all(&first).unwrap();
        connection.writer().write_all(&second).unwrap();
    }
    within("the backend flushing", backend.flush()).await.unwrap();
    let got = read_messages(&mut peer, first.len() + second.len()).await;
    assert!(got == [first, second].concat(), "both records arrive, byte for byte");
    // And the other way, through the TLS write half (which must flush what it writes).
    within("sending", peer.send(Message::binary(&b"back"[..]))).await.unwrap();
    let mut back = [0u8; 4];
    within("the backend reading", backend.read_exact(&mut back)).await.unwrap();
    assert_eq!(&back, b"back");
    within("the backend closing", backend.shutdown()).await.unwrap();
    let (end, _, totals) = within("the pump ending", pump).await.unwrap();
    assert!(matches!(end, End::BackendEof), "{end:?}");
    assert_eq!((totals.to_client.bytes, totals.to_client.messages), (1524, 2));
}
