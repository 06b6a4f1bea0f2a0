//! wsgate: a WebSocket-to-TCP gateway.
//!
//! Browsers speak WebSocket; many services speak only TCP. wsgate accepts `ws://` and `wss://`
//! upgrades, checks each request against its config (route, origin), dials the route's backend,
//! and pumps bytes both ways with backpressure until one side ends, telling the client why with
//! the right close code.
//!
//! # Layout
//!
//! - [`config`]: `config.toml` → validated [`Config`]; defaults and limits; one-line errors.
//! - [`tls`]: rustls server configs from PEM files; the self-signed development pair.
//! - `server`: accept loop, connection and handshake limits, TLS, HTTP/1.1, the upgrade decision.
//! - [`router`]: (`Host`, path) → route. Pure.
//! - [`policy`]: origin checks → allow, or a refusal with its HTTP status. Pure.
//! - [`session`]: one upgraded WebSocket: runs the pump, maps the ending to a close frame, logs.
//! - [`bridge`]: the WebSocket ⇄ TCP pump; knows nothing of config or HTTP.
//! - [`backend`]: connects backend TCP services (resolve, try every address, timeout).
//! - [`echo`]: the built-in WebSocket echo backend and TCP echo service.
//! - [`console`]: the built-in console page (HTML embedded in the binary).
//!
//! # Flow
//!
//! ```text
//! config.toml → config → Gateway::bind (listeners, TLS) → Gateway::run
//! TCP → server → tls → HTTP/1.1 → router → policy ──refuse──→ HTTP 4xx/5xx
//!                                             └─accept─→ dial backend, answer 101
//!                                                        └── session → bridge: WS ⇄ TCP
//! shutdown token (main: SIGTERM/SIGINT) → server stops accepting → sessions close with 1001
//! ```
//!
//! Nothing here installs process-wide state, so tests run several gateways in one process.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod backend;
pub mod bridge;
pub mod config;
pub mod console;
pub mod echo;
pub mod policy;
pub mod router;
mod server;
pub mod session;
pub mod tls;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

pub use config::Config;

/// Why a gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A listener's address could not be bound (in use, not local, no permission).
    #[error("listener \"{name}\": bind {address}: {source}")]
    Bind {
        /// Listener name (`listeners.NAME`), or `builtin.tcp_echo`.
        name: String,
        /// The configured address.
        address: SocketAddr,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A listener's TLS material could not be loaded or generated.
    #[error("listener \"{name}\": {source}")]
    Tls {
        /// Listener name.
        name: String,
        /// What was wrong (boxed: rustls errors are large, and this is the cold path).
        #[source]
        source: Box<tls::TlsError>,
    },
}

/// A gateway whose sockets are bound and whose TLS material is loaded, ready to [`run`].
///
/// [`run`]: Gateway::run
pub struct Gateway {
    config: Arc<Config>,
    listeners: Vec<server::Listener>,
    addrs: Vec<(String, SocketAddr)>,
    tcp_echo: Option<TcpListener>,
}

impl Gateway {
    /// Binds every listener of `config` (and the built-in TCP echo, if enabled) and loads TLS,
    /// generating the development certificate pair where the config allows it.
    pub async fn bind(config: Config) -> Result<Gateway, StartError> {
        let mut listeners = Vec::with_capacity(config.listeners.len());
        let mut addrs = Vec::new();
        for l in &config.listeners {
            let tls = match &l.tls {
                None => None,
                Some(files) => Some(TlsAcceptor::from(load_tls(&l.name, files)?)),
            };
            let tcp = bind(&l.name, l.address).await?;
            addrs.push((l.name.clone(), tcp.local_addr().unwrap_or(l.address)));
            listeners.push(server::Listener {
                name: l.name.clone(),
                tcp,
                tls,
            });
        }
        let tcp_echo = match config.builtin.tcp_echo {
            Some(address) => Some(bind("builtin.tcp_echo", address).await?),
            None => None,
        };
        Ok(Gateway {
            config: Arc::new(config),
            listeners,
            addrs,
            tcp_echo,
        })
    }

    /// The bound address of the listener named `name` (useful when the config said port 0).
    pub fn local_addr(&self, name: &str) -> Option<SocketAddr> {
        self.addrs.iter().find(|(n, _)| n == name).map(|(_, a)| *a)
    }

    /// The bound address of the built-in TCP echo service, if enabled.
    pub fn tcp_echo_addr(&self) -> Option<SocketAddr> {
        self.tcp_echo.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// Serves until `shutdown` is cancelled, then stops accepting, closes every session with 1001
    /// ("going away"), waits up to the configured grace period for them to finish, drops the
    /// rest, and returns.
    pub async fn run(self, shutdown: CancellationToken) {
        let config = self.config;
        let shared = Arc::new(server::Shared {
            router: router::Router::new(&config.routes),
            limits: config.limits.clone(),
            connections: Arc::new(Semaphore::new(config.limits.max_connections)),
            handshakes: Arc::new(Semaphore::new(config.limits.max_handshakes)),
            next_session: AtomicU64::new(1),
            stop: shutdown.clone(),
            abort: CancellationToken::new(),
            tasks: TaskTracker::new(),
            pages: config
                .console
                .iter()
                .map(|path| server::Page {
                    path: path.clone(),
                    render: console::page,
                })
                .collect(),
        });
        let accept_loops = TaskTracker::new();
        for listener in self.listeners {
            if let Ok(addr) = listener.tcp.local_addr() {
                let scheme = if listener.tls.is_some() { "wss" } else { "ws" };
                info!(listener = %listener.name, url = %format!("{scheme}://{addr}"), "listening");
            }
            accept_loops.spawn(server::accept_loop(listener, shared.clone()));
        }
        if let Some(listener) = self.tcp_echo {
            if let Ok(addr) = listener.local_addr() {
                info!(address = %addr, "builtin tcp echo listening");
            }
            accept_loops.spawn(echo::serve_tcp(
                listener,
                shutdown.clone(),
                shared.tasks.clone(),
            ));
        }
        accept_loops.close();

        shutdown.cancelled().await;
        accept_loops.wait().await;
        info!(open = shared.tasks.len(), grace = ?config.shutdown.grace, "shutting down: closing sessions with 1001");
        shared.tasks.close();
        if tokio::time::timeout(config.shutdown.grace, shared.tasks.wait())
            .await
            .is_err()
        {
            warn!(
                left = shared.tasks.len(),
                "grace period over; dropping what is left"
            );
            shared.abort.cancel();
            shared.tasks.wait().await;
        }
        info!("shutdown complete");
    }
}

fn load_tls(name: &str, files: &config::TlsFiles) -> Result<Arc<rustls::ServerConfig>, StartError> {
    let err = |source: tls::TlsError| StartError::Tls {
        name: name.to_string(),
        source: Box::new(source),
    };
    if files.generate_self_signed && tls::needs_dev_pair(&files.cert, &files.key) {
        tls::generate_dev_pair(&files.cert, &files.key).map_err(err)?;
        warn!(
            listener = name,
            cert = %files.cert.display(),
            key = %files.key.display(),
            "generated a self-signed DEVELOPMENT certificate (browsers will not trust it); \
             put a real certificate there or set generate_self_signed = false"
        );
    }
    tls::server_config(&files.cert, &files.key).map_err(err)
}

async fn bind(name: &str, address: SocketAddr) -> Result<TcpListener, StartError> {
    TcpListener::bind(address)
        .await
        .map_err(|source| StartError::Bind {
            name: name.to_string(),
            address,
            source,
        })
}
