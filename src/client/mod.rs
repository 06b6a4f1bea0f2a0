//! `wsgate connect`: carries a local TCP or Unix port (`--listen`), or stdio (`--stdio`, for
//! `ssh -o ProxyCommand`), over a ws:// or wss:// session to a wsgate route.
//!
//! The data path is the gateway's own: [`bridge::run`] in the client role, with the local
//! connection (or stdio) as its "backend" side, so both ends share one tested pump. `dial` makes
//! the WebSocket (TCP, an optional HTTP CONNECT proxy, TLS verified against system roots or a CA
//! file, the handshake with the token and the control channel); `local` is the local side;
//! this module runs one session per local connection and says how it ended as a
//! [`ClientError`], whose variant fixes the one-line message and the exit code (`main`).
//!
//! Half-close: the client asks for the control channel (`crate::control`); when the gateway
//! agrees, the local side's EOF is sent as `shutdown_write` and the gateway's output is still
//! relayed until it closes, so `echo QUERY | wsgate connect --stdio …` gets the whole reply.
//! Environment variables (token, proxy) are read by `main`, never here.

mod dial;
mod local;
mod tls;
mod token;

use std::path::PathBuf;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use tungstenite::protocol::CloseFrame;
use tungstenite::protocol::Role;
use tungstenite::protocol::frame::coding::CloseCode;

use crate::bridge::{self, Accept, BackendStream, BridgeMetrics, End, Framing, Liveness, SessionTotals};
use crate::metrics::DirectionMetrics;

pub use dial::{Proxy, Target, is_exempt};
pub use local::Listen;
pub use token::TokenVia;

/// What `wsgate connect` was asked to do, validated (`main` parses the arguments).
#[derive(Debug, Clone)]
pub struct Options {
    /// The route's ws:// or wss:// URL.
    pub target: Target,
    /// How the server is verified and how this client proves itself.
    pub tls: TlsOptions,
    /// The bearer token; never logged.
    pub token: Option<Secret>,
    /// Where the token goes (`--token-via`).
    pub token_via: TokenVia,
    /// Extra request headers.
    pub headers: Vec<(String, String)>,
    /// Subprotocols offered, in order.
    pub subprotocols: Vec<String>,
    /// An HTTP proxy to CONNECT through.
    pub proxy: Option<Proxy>,
    /// Pings to the gateway this often (and the session ends if it stops answering).
    pub ping_interval: Option<Duration>,
    /// How long a dial may take in all (TCP, proxy, TLS, handshake); with `--listen`, also how
    /// long a new local connection waits, retrying, while the gateway is unreachable.
    pub connect_timeout: Duration,
    /// With `--listen`: fail a local connection at the first failed dial instead of retrying.
    pub fail_fast: bool,
    /// Ask for the control channel (half-close); off with `--no-half-close`.
    pub control: bool,
}

/// Certificate verification and the client certificate.
#[derive(Debug, Clone, Default)]
pub struct TlsOptions {
    /// Trust only the CAs in this PEM file (instead of the system's roots).
    pub ca: Option<PathBuf>,
    /// The system's root store, when `ca` is not given: a PEM bundle (`SSL_CERT_FILE` or the
    /// distribution's), found by `main`.
    pub system_roots: Option<PathBuf>,
    /// Skip verification of the server's certificate.
    pub insecure: bool,
    /// The name to verify (and send as SNI), if not the URL's host.
    pub server_name: Option<String>,
    /// A client certificate chain and key (PEM), for mTLS.
    pub identity: Option<(PathBuf, PathBuf)>,
}

/// A secret whose `Debug` prints `<redacted>`.
#[derive(Clone)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Why `wsgate connect` failed; the variant decides the exit code ([`ClientError::exit_code`]).
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The arguments or the files they name are not usable.
    #[error("{0}")]
    Usage(String),
    /// The gateway (or the proxy) could not be reached.
    #[error("gateway unreachable: {0}")]
    Unreachable(String),
    /// The TLS handshake failed: the certificate did not verify, or the server refused ours.
    #[error("TLS with {host} failed: {problem}")]
    Tls {
        /// The name verified.
        host: String,
        /// rustls's reason.
        problem: String,
    },
    /// The proxy refused the CONNECT.
    #[error("proxy refused CONNECT: {0}")]
    Proxy(String),
    /// The gateway refused our credentials: HTTP 401/403/429, or closed with 4401/4403/4429.
    #[error("access refused: {status} {reason}")]
    Access {
        /// The HTTP status or close code.
        status: u16,
        /// The server's reason.
        reason: String,
    },
    /// No route at that path (HTTP 404).
    #[error("route not found: 404 {0}")]
    NotFound(String),
    /// The route's backend is down: HTTP 502/503/504, or closed at once with 1013.
    #[error("backend unavailable: {status} {reason}")]
    BackendDown {
        /// The HTTP status or close code.
        status: u16,
        /// The server's reason.
        reason: String,
    },
    /// The gateway answered the upgrade with another refusal, or broke the handshake.
    #[error("handshake refused: {0}")]
    Handshake(String),
    /// The session ended abnormally after it started.
    #[error("session ended: {0}")]
    Session(String),
    /// The local side failed: binding the listener, stdio.
    #[error("local: {0}")]
    Local(String),
}

impl ClientError {
    /// The process exit code for this failure (README and docs/client.md list them).
    pub fn exit_code(&self) -> u8 {
        match self {
            ClientError::Usage(_) => 2,
            ClientError::Unreachable(_) => 3,
            ClientError::Tls { .. } => 4,
            ClientError::Access { .. } => 5,
            ClientError::NotFound(_) => 6,
            ClientError::BackendDown { .. } => 7,
            ClientError::Handshake(_) => 8,
            ClientError::Proxy(_) => 9,
            ClientError::Session(_) => 10,
            ClientError::Local(_) => 11,
        }
    }

    /// Whether a retry may succeed once the gateway is back (`--listen`'s reconnect).
    fn is_transient(&self) -> bool {
        matches!(self, ClientError::Unreachable(_) | ClientError::Proxy(_) | ClientError::BackendDown { .. })
    }
}

/// Carries stdio over one session; returns when it ends.
pub async fn run_stdio(options: Options) -> Result<(), ClientError> {
    let ws = dial::connect(&options).await?;
    session(ws, local::Local::Stdio(local::Stdio::new()), &options, &CancellationToken::new()).await
}

/// Accepts local connections on `listen` and carries each over a session of its own until
/// `stop`. `on_bound` is told the address actually bound (a port of 0 becomes a real one).
pub async fn run_listen(
    options: Options,
    listen: Listen,
    stop: CancellationToken,
    on_bound: impl FnOnce(&str),
) -> Result<(), ClientError> {
    let options = std::sync::Arc::new(options);
    let tls = tls::config(&options)?;
    let listener = local::Listener::bind(&listen).await?;
    on_bound(&listener.describe());
    let tasks = tokio_util::task::TaskTracker::new();
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let conn = match accepted {
            Ok(conn) => conn,
            Err(e) => {
                // Out of file descriptors, say: wait for some to be released.
                warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (options, tls, stop) = (options.clone(), tls.clone(), stop.clone());
        tasks.spawn(async move {
            let result = match conn {
                local::Conn::Tcp(stream, peer) => {
                    carry(local::Local::Tcp(stream), &peer.to_string(), &options, tls, &stop).await
                }
                local::Conn::Unix(stream) => carry(local::Local::Unix(stream), "unix", &options, tls, &stop).await,
            };
            if let Err(e) = result {
                warn!(code = e.exit_code(), "{e}");
            }
        });
    }
    tasks.close();
    tasks.wait().await;
    Ok(())
}

/// One local connection: dial (retrying while the gateway is unreachable, unless
/// `fail_fast`), then relay until either side ends.
async fn carry<B>(
    local: B,
    peer: &str,
    options: &Options,
    tls: Option<std::sync::Arc<rustls::ClientConfig>>,
    stop: &CancellationToken,
) -> Result<(), ClientError>
where
    B: BackendStream + Send,
    B::ReadHalf: Send,
    B::WriteHalf: Send,
{
    let deadline = tokio::time::Instant::now() + options.connect_timeout;
    let mut backoff = Duration::from_millis(100);
    let ws = loop {
        match dial::connect_with(options, tls.clone()).await {
            Ok(ws) => break ws,
            Err(e) if e.is_transient() && !options.fail_fast && tokio::time::Instant::now() + backoff < deadline => {
                info!(local.peer = peer, retry_in_ms = backoff.as_millis() as u64, "{e}");
                tokio::select! {
                    _ = stop.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
            Err(e) => return Err(e),
        }
    };
    info!(local.peer = peer, "session open");
    session(ws, local, options, stop).await
}

/// Relays `local` ⇄ the gateway over `ws` until one side ends, and closes both.
async fn session<B>(
    dialed: dial::Dialed,
    local: B,
    options: &Options,
    stop: &CancellationToken,
) -> Result<(), ClientError>
where
    B: BackendStream,
{
    let dial::Dialed { mut ws, control } = dialed;
    let liveness = Liveness { ping_interval: options.ping_interval, ..Liveness::OFF };
    let bridge_options = bridge::Options {
        backend_read_bytes: READ_BYTES,
        client_batch_bytes: READ_BYTES,
        framing: Framing::Binary,
        accept: Accept { text: true, binary: true },
        finish_timeout: FINISH_TIMEOUT,
        role: Role::Client,
        liveness,
        control,
    };
    let (metrics, mut totals) = (DirectionMetrics::detached(), SessionTotals::default());
    let both = BridgeMetrics { to_backend: &metrics, to_client: &metrics };
    let (end, mut local) = bridge::run(&mut ws, local, bridge_options, stop, &mut totals, both).await;
    let (read, mut write) = local.into_split();
    // The gateway's last byte is written: the local side sees EOF after it.
    bridge::shutdown_write(&mut write).await;
    local = B::reunite(read, write);
    drop(local);
    let we_close = matches!(end, End::BackendEof | End::Stopped);
    let result = ended(end);
    // Our Close (or the reply to the gateway's), bounded.
    let normal = CloseFrame { code: CloseCode::Normal, reason: "".into() };
    let _ = tokio::time::timeout(FINISH_TIMEOUT, ws.close(Some(normal))).await;
    if !we_close {
        return result;
    }
    // The gateway may have closed first (a backend down: 1013 right behind the 101) while the
    // local side was ending too: its Close, not the echo of ours, says how the session ended.
    let theirs = tokio::time::timeout(FINISH_TIMEOUT, async {
        use futures_util::StreamExt;
        while let Some(Ok(message)) = ws.next().await {
            if let tungstenite::Message::Close(frame) = message {
                return Some(frame);
            }
        }
        None
    })
    .await;
    match theirs {
        Ok(Some(frame)) => ended(End::ClientClosed(frame)),
        _ => result,
    }
}

/// How a session's ending reads as the command's result.
fn ended(end: End) -> Result<(), ClientError> {
    match end {
        End::ClientClosed(frame) => {
            let (code, reason) =
                frame.map(|f| (u16::from(f.code), f.reason.to_string())).unwrap_or((1005, String::new()));
            match code {
                1000 | 1005 => Ok(()),
                1013 => Err(ClientError::BackendDown { status: code, reason }),
                4401 | 4403 | 4429 => Err(ClientError::Access { status: code, reason }),
                _ => Err(ClientError::Session(format!("gateway closed with {code} {reason}"))),
            }
        }
        // The local side ended (without the control channel) or we were stopped: our Close
        // (1000) follows.
        End::BackendEof | End::Stopped => Ok(()),
        End::ClientGone => Err(ClientError::Session("the gateway's connection ended without a close frame".into())),
        End::ClientFailed(e) | End::ClientWriteFailed(e) => Err(ClientError::Session(e.to_string())),
        End::ClientUnsupported(_) => Err(ClientError::Session("unexpected message type from the gateway".into())),
        // The client role parses no controls: it never receives any.
        End::ControlViolation(_) => Err(ClientError::Session("unexpected control message from the gateway".into())),
        End::BackendFailed(e) => Err(ClientError::Local(e.to_string())),
        End::BackendNotUtf8 => Err(ClientError::Local("not UTF-8".into())),
        End::NoMaskKey => Err(ClientError::Local("no randomness for a frame's mask key".into())),
        End::Limit(limit) => Err(ClientError::Session(format!("{limit:?}"))),
    }
}

/// The largest local read, and so the largest message sent.
const READ_BYTES: usize = 256 * 1024;

/// How long the message in flight may take once the session is ending, and how long the
/// closing handshake may take.
const FINISH_TIMEOUT: Duration = Duration::from_secs(5);
