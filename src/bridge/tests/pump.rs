//! Helpers for the tests that run the whole pump, in a task of its own, over loopback sockets.

use std::time::Duration;

use futures_util::StreamExt;
use hyper_tungstenite::WebSocketStream;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tungstenite::Message;
use tungstenite::protocol::Role;

use crate::bridge::{self, Accept, BackendStream, BridgeMetrics, End, Framing, Options, SessionTotals};
use crate::frames::{ClientWs, FrameGate};
use crate::metrics::DirectionMetrics;

pub(super) fn options(role: Role, backend_read_bytes: usize) -> Options {
    Options {
        backend_read_bytes,
        client_batch_bytes: 64 * 1024,
        framing: Framing::Binary,
        accept: Accept { text: true, binary: true },
        finish_timeout: Duration::from_secs(1),
        role,
        liveness: bridge::Liveness::OFF,
        control: false,
    }
}

/// A loopback connection: the pump's WebSocket (over a gate, in `role`) and the plain socket of
/// its peer.
pub(super) async fn ws_and_socket(role: Role) -> (ClientWs<TcpStream>, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let peer = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
    let (ours, _) = listener.accept().await.unwrap();
    (WebSocketStream::from_raw_socket(FrameGate::new(ours), role, None).await, peer)
}

/// The same with the peer a plain tungstenite WebSocket in the other role.
pub(super) async fn ws_pair(role: Role) -> (ClientWs<TcpStream>, WebSocketStream<TcpStream>) {
    let (ours, peer) = ws_and_socket(role).await;
    let peer_role = match role {
        Role::Server => Role::Client,
        Role::Client => Role::Server,
    };
    (ours, WebSocketStream::from_raw_socket(peer, peer_role, None).await)
}

/// Runs the pump in a task of its own until it ends (or `stop`); returns its ending, the
/// backend stream and the session's totals.
pub(super) fn spawn_pump<B>(
    mut ws: ClientWs<TcpStream>,
    backend: B,
    options: Options,
    stop: CancellationToken,
) -> JoinHandle<(End, B, SessionTotals)>
where
    B: BackendStream + Send + 'static,
    B::ReadHalf: Send + Sync,
    B::WriteHalf: Send + Sync,
{
    tokio::spawn(async move {
        let (metrics, mut totals) = (DirectionMetrics::detached(), SessionTotals::default());
        let both = BridgeMetrics { to_backend: &metrics, to_client: &metrics };
        let (end, backend) = bridge::run(&mut ws, backend, options, &stop, &mut totals, both).await;
        (end, backend, totals)
    })
}

/// A hang fails the test with what it was waiting for.
pub(super) async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(10), fut).await.unwrap_or_else(|_| panic!("stalled: {what}"))
}

pub(super) fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8 ^ seed).collect()
}

/// Reads WebSocket messages from `peer` until `len` payload bytes have come; returns them joined.
pub(super) async fn read_messages(peer: &mut WebSocketStream<TcpStream>, len: usize) -> Vec<u8> {
    let mut got = Vec::with_capacity(len);
    while got.len() < len {
        match within("a message from the pump", peer.next()).await {
            Some(Ok(Message::Binary(data))) => got.extend_from_slice(&data),
            other => panic!("expected a binary message, got {other:?}"),
        }
    }
    got
}
