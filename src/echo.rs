//! Built-in echo services, so a newcomer can try the gateway with nothing else running.
//!
//! - [`run_ws`]: the `builtin:echo` backend. Each message comes back as the same message (text
//!   as text, binary as binary, fragments joined), with no greeting, like echo.websocket.org.
//!   Pings, close replies and UTF-8 checks are tungstenite's, under the session's limits.
//! - [`serve_tcp`]: a plain TCP echo service on a loopback port (`[builtin] tcp_echo`), so the
//!   real WebSocket ⇄ TCP path through the bridge works out of the box.
//!
//! Neither is meant to face the internet; both stop when asked.

use std::net::SocketAddr;
use std::sync::Arc;

use futures_util::{Sink, SinkExt, Stream, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::debug;
use tungstenite::{Error as WsError, Message};

use crate::bridge::{Accept, BridgeMetrics, DirectionMeter, End, Kind, SessionTotals};
use crate::server;
use crate::shutdown::Cancelled;

/// Echoes every message on `ws` until the client closes, fails, or `stop` is cancelled.
/// Reports the ending the same way the bridge does, so `session` maps both alike.
pub async fn run_ws<W>(
    ws: &mut W,
    accept: Accept,
    stop: &CancellationToken,
    totals: &mut SessionTotals,
    metrics: BridgeMetrics<'_>,
) -> End
where
    W: Stream<Item = Result<Message, WsError>> + Sink<Message, Error = WsError> + Unpin,
{
    let stopped = Cancelled::new(stop);
    tokio::pin!(stopped);
    loop {
        let next = tokio::select! {
            biased;
            _ = stopped.as_mut() => return End::Stopped,
            next = ws.next() => next,
        };
        let message = match next {
            None => return End::ClientGone,
            Some(Err(e)) => return End::ClientFailed(e),
            Some(Ok(Message::Close(frame))) => return End::ClientClosed(frame),
            Some(Ok(message)) => message,
        };
        match Kind::of(&message) {
            // Pings are answered by tungstenite itself; pongs carry nothing to echo.
            None => continue,
            Some(kind) if !accept.allows(kind) => return End::ClientUnsupported(kind),
            Some(_) => {}
        }
        let len = message.len();
        DirectionMeter::new(metrics.to_backend, &mut totals.to_backend).relayed(len, 1);
        let mut out = DirectionMeter::new(metrics.to_client, &mut totals.to_client);
        if let (Err(e), _) = out.write(len, ws.send(message)).await {
            return End::ClientWriteFailed(e);
        }
        out.relayed(len, 1);
    }
}

/// Most connections the built-in TCP echo serves at once; it is a demo service, not a backend
/// to load-test, so past this new connections are closed.
const TCP_ECHO_MAX_CONNECTIONS: usize = 1024;

/// Serves TCP echo on `listener` until `stop` is cancelled; connections are tracked by `tasks`.
pub async fn serve_tcp(listener: TcpListener, stop: CancellationToken, tasks: TaskTracker) {
    let slots = Arc::new(Semaphore::new(TCP_ECHO_MAX_CONNECTIONS));
    while let Some((stream, peer, slot)) = server::accept_bounded(&listener, &slots, &stop, "builtin tcp echo").await {
        let stop = stop.clone();
        tasks.spawn(async move {
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = echo_tcp(stream, peer) => {}
            }
            drop(slot);
        });
    }
}

async fn echo_tcp(mut stream: TcpStream, peer: SocketAddr) {
    let _ = stream.set_nodelay(true);
    let (mut r, mut w) = stream.split();
    match tokio::io::copy(&mut r, &mut w).await {
        Ok(n) => debug!(client.addr = %peer, bytes = n, "builtin tcp echo: connection done"),
        Err(e) => debug!(client.addr = %peer, error = %e, "builtin tcp echo: connection failed"),
    }
}
