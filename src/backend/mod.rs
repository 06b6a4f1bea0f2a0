//! Connects a session to its backend service.
//!
//! Names are resolved at connect time (so DNS changes apply to new sessions without a reload)
//! and every resolved address is tried in order, within one overall timeout: a dual-stack name
//! whose first address is dead still connects. A backend may also be a Unix socket, and either
//! may be under TLS (`tls`); the result is a [`BackendConn`] (`conn`). Nothing here knows about
//! WebSocket; `session` decides what a failure means for the client.

mod conn;
pub mod tls;

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

pub mod health;
pub mod pool;
mod targets;

pub use conn::{BackendConn, Peer};
pub use pool::{Hold, Pool, Pools};
pub use targets::{Mapping, Refused, Target, TargetsError, load as load_targets};

use crate::config::{self, UnixAddr};

/// Why a backend could not be connected.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The host name did not resolve.
    #[error("resolve {target}: {source}")]
    Resolve {
        /// `host:port` as configured.
        target: String,
        /// The resolver's error.
        #[source]
        source: io::Error,
    },
    /// The host name resolved to nothing.
    #[error("resolve {target}: no addresses")]
    NoAddress {
        /// `host:port` as configured.
        target: String,
    },
    /// Every address was tried and failed; this is the last failure.
    #[error("connect to {addr} ({target}): {source}")]
    Connect {
        /// `host:port` as configured.
        target: String,
        /// The last address tried.
        addr: SocketAddr,
        /// Why it failed.
        #[source]
        source: io::Error,
    },
    /// Connected, but the PROXY protocol header could not be written.
    #[error("send the PROXY header to {target}: {source}")]
    Send {
        /// `host:port` as configured.
        target: String,
        /// Why the write failed.
        #[source]
        source: io::Error,
    },
    /// A token-mapped target outside the route's allow-list: its port (`addr` none), or an
    /// address its name resolved to. Nothing was connected.
    #[error("target {target} is not allowed by the route's allow-list{}", addr.map(|a| format!(" (resolved to {a})")).unwrap_or_default())]
    NotAllowed {
        /// `host:port` as the token named it.
        target: String,
        /// The (normalised) address that is not allowed, when the port was.
        addr: Option<SocketAddr>,
    },
    /// A Unix socket could not be connected.
    #[error("connect to {target}: {source}")]
    ConnectUnix {
        /// The socket as configured (`unix:/path`, `unix:@name`).
        target: String,
        /// Why it failed.
        #[source]
        source: io::Error,
    },
    /// Connected, but the TLS handshake failed: most often a certificate the route does not
    /// trust or one for another name (rustls's reason is the source).
    #[error("TLS handshake with {target}: {source}")]
    Tls {
        /// The backend as configured.
        target: String,
        /// rustls's reason, or the socket's error during the handshake.
        #[source]
        source: io::Error,
    },
    /// The connect timeout passed first.
    #[error("connect to {target} timed out after {after:?}")]
    Timeout {
        /// `host:port` as configured.
        target: String,
        /// The configured timeout.
        after: Duration,
    },
    /// Every member of the route's pool is down, drained or at its session cap.
    #[error("route {route}: no backend of its pool is up with room for a session")]
    NoBackend {
        /// The route's name.
        route: String,
    },
}

/// What kind of connect failure a [`BackendError`] is: the one value that the HTTP status, the
/// close reason and the metric label are derived from (each in one place: `policy`, `session`
/// and [`ConnectFailure::label`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectFailure {
    /// The name did not resolve, or resolved to nothing.
    NotResolved,
    /// The connect timeout passed, or the OS timed the connect out.
    TimedOut,
    /// The backend host answered with a refusal (nothing listens on the port).
    Refused,
    /// No route to the host or its network.
    Unreachable,
    /// The TLS handshake with the backend failed (an untrusted certificate, a name mismatch).
    Tls,
    /// Any other connect error.
    Other,
    /// Every member of the route's pool is down, drained or at its session cap.
    NoBackend,
    /// A token-mapped target outside the route's allow-list: refused, nothing connected.
    NotAllowed,
}

impl ConnectFailure {
    /// A short, stable description for close reasons and the `kind` metric label: it names no
    /// address, so a web page may read it.
    pub fn label(self) -> &'static str {
        match self {
            ConnectFailure::NotResolved => "name not resolved",
            ConnectFailure::TimedOut => "connect timed out",
            ConnectFailure::Refused => "connection refused",
            ConnectFailure::Unreachable => "unreachable",
            ConnectFailure::Tls => "TLS handshake failed",
            ConnectFailure::Other => "connect failed",
            ConnectFailure::NoBackend => "no backend available",
            ConnectFailure::NotAllowed => "target not allowed",
        }
    }
}

impl BackendError {
    /// The kind of failure, for the status, close reason and metric label.
    pub fn failure(&self) -> ConnectFailure {
        match self {
            BackendError::Resolve { .. } | BackendError::NoAddress { .. } => ConnectFailure::NotResolved,
            BackendError::Timeout { .. } => ConnectFailure::TimedOut,
            BackendError::NoBackend { .. } => ConnectFailure::NoBackend,
            BackendError::NotAllowed { .. } => ConnectFailure::NotAllowed,
            BackendError::Tls { .. } => ConnectFailure::Tls,
            BackendError::Connect { source, .. }
            | BackendError::Send { source, .. }
            | BackendError::ConnectUnix { source, .. } => match source.kind() {
                io::ErrorKind::TimedOut => ConnectFailure::TimedOut,
                // A socket file that does not exist: nothing listens there either.
                io::ErrorKind::ConnectionRefused | io::ErrorKind::NotFound => ConnectFailure::Refused,
                io::ErrorKind::HostUnreachable | io::ErrorKind::NetworkUnreachable => ConnectFailure::Unreachable,
                _ => ConnectFailure::Other,
            },
        }
    }
}

/// What a dial may look at of the request it serves: a pool balances on the client, a
/// token-mapped route finds its target in the path or query.
#[derive(Debug, Clone, Copy)]
pub struct DialRequest<'a> {
    /// The client's address (after PROXY protocol and trusted forwarded headers).
    pub client: SocketAddr,
    /// The request target's path.
    pub path: &'a str,
    /// The request target's query, if any.
    pub query: Option<&'a str>,
    /// On a token-mapped route, the target its token named (`Mapping::find`).
    pub target: Option<&'a Target>,
}

/// How a route reaches its backend: the connect settings, and which backend a session goes to;
/// fixed when the route table is built.
#[derive(Debug, Clone)]
pub struct Dialer {
    settings: Settings,
    choice: Choice,
}

/// How every backend connection of a route is made.
#[derive(Debug, Clone)]
struct Settings {
    timeout: Duration,
    keepalive: Option<Duration>,
    user_timeout: Option<Duration>,
    /// TLS on every connection, when the route has `backend_tls`.
    tls: Option<Arc<tls::Connector>>,
}

/// Which backend a session goes to.
#[derive(Debug, Clone)]
enum Choice {
    /// Always the one `host:port`.
    One { host: String, port: u16 },
    /// Always the one Unix socket.
    Unix(UnixAddr),
    /// A member of the route's pool, picked per session.
    Pool(Arc<Pool>),
    /// The target the request's token named, if the allow-list allows it.
    Mapped(Box<config::Targets>),
}

impl Dialer {
    /// The dialer of `route`, or `None` for the built-in echo: its backend (one address, a Unix
    /// socket, a pool whose members' states `pools` keeps, or token-mapped targets) under the
    /// route's connect limits, with `tls` on every connection.
    pub fn of(route: &config::Route, pools: &Pools, tls: Option<Arc<tls::Connector>>) -> Option<Dialer> {
        let choice = match &route.backend {
            config::Backend::Tcp { host, port } => Choice::One { host: host.clone(), port: *port },
            config::Backend::Unix(addr) => Choice::Unix(addr.clone()),
            config::Backend::Pool(pool) => Choice::Pool(pools.build(route, pool)),
            config::Backend::Mapped(targets) => Choice::Mapped(targets.clone()),
            config::Backend::Echo => return None,
        };
        let limits = &route.limits;
        let settings = Settings {
            timeout: limits.connect_timeout,
            keepalive: limits.tcp_keepalive,
            user_timeout: limits.tcp_user_timeout,
            tls,
        };
        Some(Dialer { settings, choice })
    }

    /// The route's pool, if it has one.
    pub fn pool_of(&self) -> Option<&Arc<Pool>> {
        match &self.choice {
            Choice::Pool(pool) => Some(pool),
            Choice::One { .. } | Choice::Unix(_) | Choice::Mapped(_) => None,
        }
    }

    /// Connects the backend `req` goes to: resolves the name now (so DNS changes apply without
    /// a reload) and tries every address, then writes `preamble` (a PROXY protocol header, or
    /// nothing) before any other byte, all within the timeout. A pool member's connection
    /// comes with its [`Hold`], which counts the session on the member until dropped.
    pub async fn connect(
        &self,
        req: &DialRequest<'_>,
        preamble: &[u8],
    ) -> Result<(BackendConn, Option<Hold>), BackendError> {
        match &self.choice {
            Choice::One { host, port } => Ok((self.settings.connect(host, *port, preamble).await?, None)),
            Choice::Pool(pool) => {
                let (stream, hold) = pool.connect(&self.settings, req.client.ip(), preamble).await?;
                Ok((stream, Some(hold)))
            }
            Choice::Unix(addr) => Ok((self.settings.connect_unix(addr, preamble).await?, None)),
            Choice::Mapped(allowed) => match req.target {
                Some(target) => Ok((targets::connect(&self.settings, allowed, target, preamble).await?, None)),
                // Cannot happen: the server finds the target before it dials.
                None => Err(BackendError::NoAddress { target: "token-mapped target (none found)".into() }),
            },
        }
    }
}

impl Settings {
    /// One TCP connection to `host:port`, then `preamble`, then the route's TLS handshake if it
    /// has one, all within the timeout.
    async fn connect(&self, host: &str, port: u16, preamble: &[u8]) -> Result<BackendConn, BackendError> {
        self.connect_named(host, host, port, preamble).await
    }

    /// As [`Settings::connect`], to `host` (an address already checked, for a token-mapped
    /// target), with `name` the host the TLS certificate must be for when the route names none.
    async fn connect_named(
        &self,
        host: &str,
        name: &str,
        port: u16,
        preamble: &[u8],
    ) -> Result<BackendConn, BackendError> {
        if preamble.is_empty() && self.tls.is_none() {
            let stream = connect(host, port, self.timeout, self.keepalive, self.user_timeout).await?;
            return Ok(BackendConn::Tcp(stream));
        }
        let started = tokio::time::Instant::now();
        let mut stream = connect(host, port, self.timeout, self.keepalive, self.user_timeout).await?;
        let target = display_target(host, port);
        self.send(&mut stream, preamble, started, &target).await?;
        match &self.tls {
            None => Ok(BackendConn::Tcp(stream)),
            Some(tls) => {
                let stream = self.within(started, &target, tls.handshake(name, stream, &target)).await?;
                Ok(BackendConn::Tls(Box::new(stream)))
            }
        }
    }

    /// One connection to the Unix socket `addr`, then as [`Settings::connect`]; the TLS name is
    /// the configured `server_name` (config requires one).
    async fn connect_unix(&self, addr: &UnixAddr, preamble: &[u8]) -> Result<BackendConn, BackendError> {
        let started = tokio::time::Instant::now();
        let target = addr.to_string();
        let mut stream = self.within(started, &target, conn::connect(addr)).await?;
        self.send(&mut stream, preamble, started, &target).await?;
        match &self.tls {
            None => Ok(BackendConn::Unix(stream)),
            Some(tls) => {
                let stream = self.within(started, &target, tls.handshake(&target, stream, &target)).await?;
                Ok(BackendConn::UnixTls(Box::new(stream)))
            }
        }
    }

    /// Writes `preamble` (a PROXY header, or nothing) before any other byte.
    async fn send<S: AsyncWrite + Unpin>(
        &self,
        stream: &mut S,
        preamble: &[u8],
        started: tokio::time::Instant,
        target: &str,
    ) -> Result<(), BackendError> {
        if preamble.is_empty() {
            return Ok(());
        }
        // A fresh socket's send buffer takes a header at once; the bound is for a backend whose
        // connection is already failing.
        self.within(started, target, async {
            stream.write_all(preamble).await.map_err(|source| BackendError::Send { target: target.to_string(), source })
        })
        .await
    }

    /// `step`, unless the connect timeout (counted from `started`) passes first.
    async fn within<T>(
        &self,
        started: tokio::time::Instant,
        target: &str,
        step: impl Future<Output = Result<T, BackendError>>,
    ) -> Result<T, BackendError> {
        match tokio::time::timeout_at(started + self.timeout, step).await {
            Ok(result) => result,
            Err(_) => Err(BackendError::Timeout { target: target.to_string(), after: self.timeout }),
        }
    }
}

/// Connects to `host:port`, trying each resolved address, all within `timeout`, and sets the
/// socket up as [`tune`] does.
pub async fn connect(
    host: &str,
    port: u16,
    timeout: Duration,
    keepalive: Option<Duration>,
    user_timeout: Option<Duration>,
) -> Result<TcpStream, BackendError> {
    let target = display_target(host, port);
    let connecting = connect_any(host, port, &target, keepalive, user_timeout);
    match tokio::time::timeout(timeout, connecting).await {
        Ok(result) => result,
        Err(_) => Err(BackendError::Timeout { target, after: timeout }),
    }
}

/// `host:port` as errors name it (an IPv6 literal in brackets).
fn display_target(host: &str, port: u16) -> String {
    if host.contains(':') { format!("[{host}]:{port}") } else { format!("{host}:{port}") }
}

async fn connect_any(
    host: &str,
    port: u16,
    target: &str,
    keepalive: Option<Duration>,
    user_timeout: Option<Duration>,
) -> Result<TcpStream, BackendError> {
    let addrs = tokio::net::lookup_host((host, port))
        .await
        .map_err(|source| BackendError::Resolve { target: target.to_string(), source })?;
    let mut last = None;
    for addr in addrs {
        match TcpStream::connect(addr).await {
            Ok(stream) => {
                tune(&stream, keepalive, user_timeout);
                return Ok(stream);
            }
            Err(source) => last = Some(BackendError::Connect { target: target.to_string(), addr, source }),
        }
    }
    Err(last.unwrap_or_else(|| BackendError::NoAddress { target: target.to_string() }))
}

/// Sets the options every relayed socket (client or backend) gets. Best effort: a socket that
/// refuses an option still works.
///
/// - `TCP_NODELAY`: interactive protocols (VNC, SSH, telnet) send small writes that must not
///   wait for Nagle's algorithm.
/// - TCP keepalive, first probe after `keepalive` idle, then every 10 s, 5 probes: a peer that
///   vanished without a FIN (NAT timeout, power loss) is noticed and its session ends, instead
///   of holding its connection slot forever.
/// - `TCP_USER_TIMEOUT` (Linux): data sent and not acknowledged for `user_timeout` fails the
///   connection, so a peer that vanished while data was in flight to it is noticed within that
///   time rather than after the kernel's retransmissions (about 15 minutes). With keepalive on,
///   it also replaces the probe count: the connection fails at the first probe check once
///   `user_timeout` has passed since the peer was last heard (docs/config.md).
pub fn tune(socket: &impl std::os::fd::AsFd, keepalive: Option<Duration>, user_timeout: Option<Duration>) {
    let _ = try_tune(socket, keepalive, user_timeout);
}

/// [`tune`], stopping at the first option the socket refuses: for a listening socket, whose
/// connections are trusted to inherit the options only if every one was set.
pub fn try_tune(
    socket: &impl std::os::fd::AsFd,
    keepalive: Option<Duration>,
    user_timeout: Option<Duration>,
) -> io::Result<()> {
    let socket = socket2::SockRef::from(socket);
    socket.set_tcp_nodelay(true)?;
    match keepalive {
        Some(idle) => {
            let params =
                socket2::TcpKeepalive::new().with_time(idle).with_interval(Duration::from_secs(10)).with_retries(5);
            socket.set_tcp_keepalive(&params)?;
        }
        // Off must be said on an accepted socket, which inherits its listener's options.
        None => socket.set_keepalive(false)?,
    }
    #[cfg(any(target_os = "linux", target_os = "android", target_os = "fuchsia"))]
    socket.set_tcp_user_timeout(user_timeout)?;
    #[cfg(not(any(target_os = "linux", target_os = "android", target_os = "fuchsia")))]
    let _ = user_timeout;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A refused port and a name that resolves are told apart, and a dual-stack name still connects.
    #[tokio::test]
    async fn refused_and_resolved_errors_are_told_apart() {
        // A socket that is bound but not listening holds the port and refuses connections:
        // no probe-and-drop race.
        let held = tokio::net::TcpSocket::new_v4().unwrap();
        held.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let port = held.local_addr().unwrap().port();
        let err = connect("127.0.0.1", port, Duration::from_secs(5), None, None).await.unwrap_err();
        assert_eq!(err.failure(), ConnectFailure::Refused, "{err}");
        assert_eq!(err.failure().label(), "connection refused");
        assert!(err.to_string().contains(&format!("127.0.0.1:{port}")));

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let secs = Some(Duration::from_secs(60));
        let stream = connect("localhost", addr.port(), Duration::from_secs(5), secs, secs).await;
        // "localhost" may resolve to ::1 first; the refusal there must not stop the v4 attempt.
        assert!(stream.is_ok(), "{:?}", stream.err());
        // `tune` set the socket up.
        let socket = socket2::SockRef::from(stream.as_ref().unwrap());
        assert_eq!(socket.tcp_keepalive_time().unwrap(), Duration::from_secs(60));
        #[cfg(target_os = "linux")]
        assert_eq!(socket.tcp_user_timeout().unwrap(), secs);
    }
}
