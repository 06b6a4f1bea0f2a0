//! Built-in echo services, so a newcomer can try the gateway with nothing else running.
//!
//! - [`run_ws`]: the `builtin:echo` backend. Each message comes back as the same message (text
//!   as text, binary as binary, fragments joined), with no greeting, like echo.websocket.org.
//!   Pings, close replies and UTF-8 checks are tungstenite's, under the session's limits; the
//!   session's liveness checks (pings, timeouts, message rate) are the bridge's.
//! - [`serve_tcp`]: a plain TCP echo service on a loopback port (`[builtin] tcp_echo`), so the
//!   real WebSocket ⇄ TCP path through the bridge works out of the box.
//!
//! Neither is meant to face the internet; both stop when asked.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::Poll;

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::debug;
use tungstenite::Message;

use crate::bridge::{Accept, BridgeMetrics, DirectionMeter, End, Kind, Liveness, SessionTotals, Watch};
use crate::frames::ClientWs;
use crate::server;
use crate::shutdown::Cancelled;

/// Echoes every message on `ws` until the client closes, fails, a `liveness` limit is reached,
/// or `stop` is cancelled. Reports the ending the same way the bridge does, so `session` maps
/// both alike.
pub async fn run_ws<S>(
    ws: &mut ClientWs<S>,
    accept: Accept,
    liveness: Liveness,
    stop: &CancellationToken,
    totals: &mut SessionTotals,
    metrics: BridgeMetrics<'_>,
) -> End
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let stopped = Cancelled::new(stop);
    tokio::pin!(stopped);
    let mut watch = Watch::new(liveness);
    // Echoes that had to wait for the client (see `DirectionMeter::counting_stalls`).
    let stalls = AtomicU64::new(0);
    loop {
        let next = std::future::poll_fn(|cx| {
            if let Poll::Ready(end) = watch.poll(cx, ws, stalls.load(Ordering::Relaxed)) {
                return Poll::Ready(Err(end));
            }
            if stopped.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Err(End::Stopped));
            }
            ws.poll_next_unpin(cx).map(Ok)
        })
        .await;
        let message = match next {
            Err(end) => return end,
            Ok(None) => return End::ClientGone,
            Ok(Some(Err(e))) => return End::ClientFailed(e),
            Ok(Some(Ok(message))) => message,
        };
        ws.get_mut().received(&message);
        let message = match message {
            Message::Close(frame) => return End::ClientClosed(frame),
            message => message,
        };
        match Kind::of(&message) {
            // Pings are answered by tungstenite itself; pongs carry nothing to echo.
            None => continue,
            Some(kind) if !accept.allows(kind) => return End::ClientUnsupported(kind),
            Some(_) => {}
        }
        let len = message.len();
        DirectionMeter::new(metrics.to_backend, &mut totals.to_backend).relayed(len, 1);
        let mut out = DirectionMeter::new(metrics.to_client, &mut totals.to_client).counting_stalls(&stalls);
        if let (Err(end), _) = out.write(len, send(ws, &mut watch, &stalls, message)).await {
            return end;
        }
        out.relayed(len, 1);
    }
}

/// Sends `message` to the client, with the liveness checks running while it waits: a client
/// that stops reading must still meet its lifetime and idle limits (not the pong timeout: the
/// wait counts in `stalls`).
async fn send<S>(ws: &mut ClientWs<S>, watch: &mut Watch, stalls: &AtomicU64, message: Message) -> Result<(), End>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut message = Some(message);
    std::future::poll_fn(|cx| {
        if let Poll::Ready(end) = watch.poll(cx, ws, stalls.load(Ordering::Relaxed)) {
            return Poll::Ready(Err(end));
        }
        if message.is_some() {
            if let Err(e) = std::task::ready!(ws.poll_ready_unpin(cx)) {
                return Poll::Ready(Err(End::ClientWriteFailed(e)));
            }
            ws.start_send_unpin(message.take().expect("checked")).map_err(End::ClientWriteFailed)?;
            ws.get_mut().sent_data();
        }
        ws.poll_flush_unpin(cx).map_err(End::ClientWriteFailed)
    })
    .await
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
