//! The pump as a WebSocket client: every frame masked, with a key of its own.

use futures_util::SinkExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tungstenite::Message;
use tungstenite::protocol::Role;

use super::pump::{options, pattern, read_messages, spawn_pump, within, ws_and_socket, ws_pair};
use crate::bridge::End;

/// In the client role the pump's frames go to a standard server (tungstenite, which refuses an
/// unmasked frame from a client) and arrive byte for byte, at every header length; the server's
/// unmasked frames reach the backend too.
#[tokio::test]
async fn a_client_role_pump_sends_frames_a_server_accepts() {
    let (ws, mut server) = ws_pair(Role::Client).await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let gateway_side = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
    let (mut backend, _) = listener.accept().await.unwrap();
    let pump = spawn_pump(ws, gateway_side, options(Role::Client, 256 * 1024), CancellationToken::new());
    // One write each, taken by the pump as one read each (or more): every header form.
    for (n, seed) in [(1, 1), (125, 2), (126, 3), (65_535, 4), (200_000, 5)] {
        let sent = pattern(n, seed);
        within("the backend writing", backend.write_all(&sent)).await.unwrap();
        assert!(read_messages(&mut server, n).await == sent, "{n} bytes arrive as sent");
    }
    let reply = pattern(70_000, 6);
    within("the server sending", server.send(Message::binary(reply.clone()))).await.unwrap();
    let mut got = vec![0u8; reply.len()];
    within("the backend reading", backend.read_exact(&mut got)).await.unwrap();
    assert!(got == reply, "server → backend, byte for byte");
    drop(backend);
    let (end, _, _) = within("the pump ending", pump).await.unwrap();
    assert!(matches!(end, End::BackendEof), "{end:?}");
}

/// The client role's frames, read off the wire: each has the mask bit and a key of its own
/// (consecutive keys differ), and its payload is the backend's bytes masked with that key.
#[tokio::test]
async fn a_client_role_pump_masks_each_frame_with_a_fresh_key() {
    let (ws, mut wire) = ws_and_socket(Role::Client).await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let gateway_side = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
    let (mut backend, _) = listener.accept().await.unwrap();
    let stop = CancellationToken::new();
    let pump = spawn_pump(ws, gateway_side, options(Role::Client, 64 * 1024), stop.clone());
    let mut keys = Vec::new();
    for i in 0..8u8 {
        let sent = pattern(100, i);
        within("the backend writing", backend.write_all(&sent)).await.unwrap();
        // One frame per write: the next is written only once this one has been read.
        let mut head = [0u8; 6];
        within("a frame header", wire.read_exact(&mut head)).await.unwrap();
        assert_eq!(head[0], 0x82, "final binary frame");
        assert_eq!(head[1], 0x80 | 100, "masked, 100 bytes");
        let key = [head[2], head[3], head[4], head[5]];
        let mut payload = vec![0u8; 100];
        within("a frame payload", wire.read_exact(&mut payload)).await.unwrap();
        let unmasked: Vec<u8> = payload.iter().enumerate().map(|(j, b)| b ^ key[j % 4]).collect();
        assert!(unmasked == sent, "frame {i}: the payload is the backend's bytes, masked");
        keys.push(key);
    }
    for pair in keys.windows(2) {
        assert_ne!(pair[0], pair[1], "consecutive frames have different keys: {keys:?}");
    }
    stop.cancel();
    let (end, _, _) = within("the pump stopping", pump).await.unwrap();
    assert!(matches!(end, End::Stopped), "{end:?}");
}
