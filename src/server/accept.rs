//! The accept path: each listener's loop, and what a new socket meets before anything is read
//! from it: the connection limit (and its 503s) and its client's limits. On a `proxy_protocol` listener the peer must be a trusted
//! proxy, and the client's limits wait for its PROXY header ([`proxied`]). Also the accept loop
//! of the side services.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use futures_util::future::OptionFuture;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, Span, debug, field, info_span, warn};

use super::{Connection, Shared, Snapshot, handle_connection};
use crate::admission::{Closed, ConnectionLease, Over, Verdict};
use crate::backend;
use crate::client_addr;
use crate::config::{Addressing, SessionLimits};
use crate::metrics::ListenerMetrics;
use crate::proxy_protocol::{self, Carried};
use crate::shutdown::Cancelled;

/// One listener as the accept loop sees it.
pub(crate) struct Listener {
    pub name: String,
    pub tcp: TcpListener,
    pub secure: bool,
    pub metrics: ListenerMetrics,
    /// The options set on the listening socket at bind, which Linux copies into every socket it
    /// accepts; `None` where that is not relied on, or when the listening socket refused one.
    pub inherited: Option<Tuning>,
}

/// A session socket's keepalive idle time and `TCP_USER_TIMEOUT`, with `TCP_NODELAY` always on
/// (see [`backend::tune`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Tuning {
    pub keepalive: Option<Duration>,
    pub user_timeout: Option<Duration>,
}

impl Tuning {
    pub fn of(limits: &SessionLimits) -> Tuning {
        Tuning { keepalive: limits.tcp_keepalive, user_timeout: limits.tcp_user_timeout }
    }

    pub fn apply(self, socket: &impl std::os::fd::AsFd) {
        backend::tune(socket, self.keepalive, self.user_timeout);
    }
}

impl Listener {
    /// The options an accepted socket still needs set: none when it inherited them from the
    /// listening socket (six system calls saved per connection), which holds until a reload
    /// changes them. Set in the connection's task, not here, so the accept loop stays quick.
    fn tuning(&self, limits: &SessionLimits) -> Option<Tuning> {
        let wanted = Tuning::of(limits);
        (self.inherited != Some(wanted)).then_some(wanted)
    }
}

/// Accepts connections until the drain begins. Accept errors (such as running out of file
/// descriptors) are logged and retried with a growing pause, never fatal.
pub(crate) async fn accept_loop(listener: Listener, shared: Arc<Shared>) {
    let mut backoff = Duration::from_millis(10);
    let m = &listener.metrics;
    loop {
        let accepted = tokio::select! {
            _ = shared.stop.cancelled() => return,
            accepted = listener.tcp.accept() => accepted,
        };
        let (tcp, peer) = match accepted {
            Ok(pair) => {
                backoff = Duration::from_millis(10);
                pair
            }
            Err(e) => {
                warn!(listener = %listener.name, error = %e, pause = ?backoff, "accept failed; pausing");
                tokio::select! {
                    _ = shared.stop.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        m.accepted.increment(1);
        let snapshot = shared.snapshot();
        let Ok(conn_permit) = shared.connections.clone().try_acquire_owned() else {
            m.refused_connection_limit.increment(1);
            // debug, not warn: under a flood this would log once per socket; the counter
            // wsgate_connections_refused_total is what to alert on.
            debug!(listener = %listener.name, client.addr = %peer, "connection limit reached (limits.max_connections)");
            if !listener.secure {
                overflow(tcp, &shared);
            }
            continue;
        };
        let addressing = snapshot.addressing.get(&listener.name).cloned().unwrap_or_default();
        if addressing.proxy_protocol {
            proxied(&listener, tcp, peer, conn_permit, addressing, snapshot, &shared);
            continue;
        }
        let Some(admitted) = admit_client(&listener.name, m, peer, &snapshot, &shared) else { continue };
        let tls = snapshot.tls.get(&listener.name).cloned();
        if listener.secure && tls.is_none() {
            // Cannot happen: reloads that would change a listener's scheme are refused.
            warn!(listener = %listener.name, "no certificate for this wss listener; closing");
            continue;
        }
        let tuning = listener.tuning(&snapshot.limits.session);
        let span = info_span!("conn", listener = %listener.name, client.addr = %peer);
        let (lease, over) = admitted;
        let client = lease.client();
        let local = snapshot.sends_proxy_headers.then(|| tcp.local_addr().unwrap_or(peer));
        let slot = Slot::new(conn_permit, lease, m);
        let conn = Connection::new(peer, local, addressing, listener.secure, slot, over, snapshot);
        let (shared2, metrics) = (shared.clone(), listener.metrics.clone());
        let handshake = async move {
            if let Some(tuning) = tuning {
                tuning.apply(&tcp);
            }
            tokio::select! {
                _ = Cancelled::new(&shared2.abort) => None,
                session = handle_connection(tcp, tls, conn, client, metrics, shared2.clone(), None) => session,
            }
        };
        spawn_connection(&shared, handshake.instrument(span));
    }
}

/// Spawns a connection's task: its handshake, then the session it was upgraded to, if any.
///
/// The handshake is boxed, so its state (about 6 KiB, larger than a session's) is freed when it
/// ends rather than held in the task for the session's life; the session comes boxed too
/// (`Connection::take_session`), so the task itself is a few pointers. Only the handshake runs
/// in the connection's span: the session enters its own (a child of it) around what it logs,
/// and the relay is polled on every message.
fn spawn_connection<S>(shared: &Shared, handshake: impl Future<Output = Option<S>> + Send + 'static)
where
    S: Future<Output = ()> + Send + 'static,
{
    // `then`, not an async block: one would keep the handshake's box, or a second copy of the
    // session, alongside the session for its whole life.
    let task = Box::pin(handshake).then(OptionFuture::from).map(drop);
    shared.tasks.spawn(task);
}

/// A connection on a `proxy_protocol` listener: closed at once unless its peer is a trusted
/// proxy; otherwise, in a task of its own, its PROXY header is read within the handshake
/// deadline, and only then is its client (the address the header carries) counted against the
/// per-client limits and the connection served. Until its header is in, it holds a place under
/// `max_connections` and none in the handshake pool, whose shares are per client.
fn proxied(
    listener: &Listener,
    mut tcp: TcpStream,
    peer: SocketAddr,
    conn_permit: OwnedSemaphorePermit,
    addressing: Arc<Addressing>,
    snapshot: Arc<Snapshot>,
    shared: &Arc<Shared>,
) {
    let m = &listener.metrics;
    if !addressing.trusted_proxies.contains(peer.ip()) {
        m.refused_untrusted_proxy.increment(1);
        // debug: anyone can connect; the counter is what to alert on.
        debug!(listener = %listener.name, peer.addr = %peer, "peer is not in trusted_proxies; closing");
        return;
    }
    let tls = snapshot.tls.get(&listener.name).cloned();
    if listener.secure && tls.is_none() {
        warn!(listener = %listener.name, "no certificate for this wss listener; closing");
        return;
    }
    let tuning = listener.tuning(&snapshot.limits.session);
    let span = info_span!("conn", listener = %listener.name, proxy.addr = %peer, client.addr = field::Empty);
    let (name, metrics, shared2) = (listener.name.clone(), listener.metrics.clone(), shared.clone());
    let serve = async move {
        if let Some(tuning) = tuning {
            tuning.apply(&tcp);
        }
        let limits = &snapshot.limits;
        let deadline = tokio::time::Instant::now() + limits.handshake_timeout;
        let max = limits.proxy_header_max_bytes;
        let carried = match tokio::time::timeout_at(deadline, proxy_protocol::read_header(&mut tcp, max)).await {
            Ok(Ok(carried)) => carried,
            Ok(Err(e)) => {
                metrics.refused_proxy_header.increment(1);
                debug!(error = %e, "no usable PROXY header; closing");
                return None;
            }
            Err(_) => {
                metrics.refused_proxy_header.increment(1);
                debug!(timeout = ?limits.handshake_timeout, "no PROXY header within limits.handshake_timeout_secs; closing");
                return None;
            }
        };
        let (client, local) = match carried {
            Carried::Client { source, destination } => (client_addr::canonical(source), Some(destination)),
            Carried::Balancer => (peer, snapshot.sends_proxy_headers.then(|| tcp.local_addr().unwrap_or(peer))),
        };
        Span::current().record("client.addr", field::display(client));
        let (lease, over) = admit_client(&name, &metrics, client, &snapshot, &shared2)?;
        let key = lease.client();
        let slot = Slot::new(conn_permit, lease, &metrics);
        let conn = Connection::new(client, local, addressing, tls.is_some(), slot, over, snapshot);
        handle_connection(tcp, tls, conn, key, metrics, shared2, Some(deadline)).await
    };
    let shared2 = shared.clone();
    let handshake = async move {
        tokio::select! {
            _ = Cancelled::new(&shared2.abort) => None,
            session = serve => session,
        }
    };
    spawn_connection(shared, handshake.instrument(span));
}

/// How many sockets beyond `max_connections` may be open at once to tell their clients so with a
/// 503 (the limit is there for file descriptors, so only a few); past these, sockets are closed.
pub(crate) const OVERFLOW_RESPONSES: usize = 64;

/// The 503 a `ws` client gets at `max_connections`, written without reading its request.
const OVERFLOW_RESPONSE: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\n\
Retry-After: 5\r\nConnection: close\r\nContent-Length: 52\r\n\r\ngateway is at its connection limit; try again later\n";

/// Answers a socket over `max_connections` with [`OVERFLOW_RESPONSE`] if one of the
/// [`OVERFLOW_RESPONSES`] places is free, then closes it after a short, bounded linger (reading
/// what the client sends, so the close does not reset the answer away); otherwise drops it.
fn overflow(mut tcp: TcpStream, shared: &Shared) {
    let Ok(place) = shared.overflow.clone().try_acquire_owned() else { return };
    let abort = shared.abort.clone();
    shared.tasks.spawn(async move {
        let answer = async {
            tcp.write_all(OVERFLOW_RESPONSE).await?;
            tcp.shutdown().await?;
            let mut sink = [0u8; 4096];
            while tcp.read(&mut sink).await? > 0 {}
            Ok::<(), std::io::Error>(())
        };
        tokio::select! {
            _ = abort.cancelled() => {}
            _ = tokio::time::timeout(Duration::from_secs(1), answer) => {}
        }
        drop(place);
    });
}

/// Counts a new connection against its client's limits: its lease, and why it is to be
/// answered 429 if it is; `None` when it is closed at accept.
fn admit_client(
    listener: &str,
    m: &ListenerMetrics,
    peer: SocketAddr,
    snapshot: &Snapshot,
    shared: &Shared,
) -> Option<(ConnectionLease, Option<Over>)> {
    let admission = &shared.admission;
    let verdict = admission.clients.admit(peer.ip(), &snapshot.limits.per_client, Instant::now());
    shared.metrics.clients_tracked.set(admission.clients.tracked() as f64);
    match verdict {
        Verdict::Closed(closed @ Closed::Connections(_)) => {
            m.refused_client_connections.increment(1);
            debug!(listener, client.addr = %peer, ?closed, "client connection limit reached (limits.per_client.max_connections)");
            None
        }
        Verdict::Refused(lease, over @ Over::Rate { .. }) => {
            m.refused_client_rate.increment(1);
            Some((lease, Some(over)))
        }
        Verdict::Admitted(lease) => Some((lease, None)),
    }
}

/// The next connection on one of the side services' listeners (admin, built-in TCP echo), with
/// its place under `slots`; `None` once `stop` is cancelled. Accept errors are logged and
/// retried after a pause; a connection over the limit is closed at once, with a warning.
pub(crate) async fn accept_bounded(
    listener: &TcpListener,
    slots: &Arc<Semaphore>,
    stop: &CancellationToken,
    service: &str,
) -> Option<(TcpStream, SocketAddr, OwnedSemaphorePermit)> {
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => return None,
            accepted = listener.accept() => accepted,
        };
        let (tcp, peer) = match accepted {
            Ok(pair) => pair,
            Err(e) => {
                warn!(error = %e, "{service}: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        match slots.clone().try_acquire_owned() {
            Ok(slot) => return Some((tcp, peer, slot)),
            Err(_) => warn!(client.addr = %peer, "{service}: connection limit reached; closing"),
        }
    }
}

/// A client socket's place under `max_connections` and among its client's connections, and in
/// the open-connections gauge.
pub(super) struct Slot {
    _permit: OwnedSemaphorePermit,
    _client: ConnectionLease,
    open: metrics::Gauge,
}

impl Slot {
    fn new(permit: OwnedSemaphorePermit, client: ConnectionLease, m: &ListenerMetrics) -> Slot {
        m.open.increment(1.0);
        Slot { _permit: permit, _client: client, open: m.open.clone() }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.open.decrement(1.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The hand-written 503 says how long its body is, correctly.
    #[test]
    fn overflow_response_is_well_formed() {
        let text = std::str::from_utf8(OVERFLOW_RESPONSE).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.contains(&format!("\r\nContent-Length: {}", body.len())), "{head}");
        assert!(head.starts_with("HTTP/1.1 503 "));
    }
}
