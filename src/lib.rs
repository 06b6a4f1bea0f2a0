//! wsgate: a WebSocket-to-TCP gateway.
//!
//! Browsers speak WebSocket; many services speak only TCP. wsgate accepts `ws://` and `wss://`
//! upgrades, checks each request against its config (route, origin), dials the route's backend,
//! and pumps bytes both ways with backpressure until one side ends, telling the client why with
//! the right close code.
//!
//! # Layout
//!
//! - [`config`]: `config.toml` → validated [`Config`] (raw → validated, errors, restart-only
//!   keys); defaults and limits; one-line errors.
//! - [`tls`]: rustls server configs from PEM files; the self-signed development pair.
//! - [`tls_stream`]: a `wss` connection over rustls's unbuffered API: no buffer while idle.
//! - [`tickets`]: TLS session resumption kept across reloads; ticket keys shared by a fleet.
//! - `server`: accept loop, TLS, HTTP/1.1, the answer to each request (route, admit, bounds,
//!   dial, 101, spawn), refusals answered, logged and counted.
//! - [`admission`]: who gets in and how much they hold: per-client connections, handshakes and
//!   rate in one bounded table; the handshake pool that sheds from the client holding most;
//!   route session and connect caps; the memory budget. Kept across reloads.
//! - [`auth`]: credentials per route (bearer token digests, JWTs, HTTP Basic) from their
//!   carriers, checked after `policy::admit` and before the dial; 401/403/429 refusals.
//! - [`client_cert`]: a verified client certificate's subject and names; route `client_certs`
//!   matching. Pure.
//! - [`client_stream`]: the client connection as one type, from accept through hyper's upgrade.
//! - [`router`]: the route table (route, limits, metrics, backend per entry); (`Host`, path) →
//!   entry. Pure.
//! - [`policy`]: the admission step (upgrade, origin, subprotocol) → admitted, or a [`policy::Refusal`]
//!   with its status, reason and headers. Pure.
//! - [`client_addr`]: the client address of a request: the peer, or what a trusted proxy's
//!   forwarded header names. Pure.
//! - [`proxy_protocol`]: PROXY protocol v1/v2 headers read from trusted balancers and sent to
//!   backends.
//! - [`session`]: dials the backend; one upgraded WebSocket: runs the pump, maps the ending to a
//!   close frame, logs.
//! - [`bridge`]: the WebSocket ⇄ backend pump over any backend stream (TCP, Unix socket, TLS),
//!   as a WebSocket server or client; knows nothing of config or HTTP.
//! - [`frames`]: data frames written past tungstenite's copy (masked in the client role).
//! - [`readahead`]: the client read buffer that exists only while data flows.
//! - [`backend`]: connects backend TCP services (resolve, try every address, timeout).
//! - [`echo`]: the built-in WebSocket echo backend and TCP echo service.
//! - [`console`]: the built-in console page (HTML embedded in the binary).
//! - [`control`]: the wsgate control channel (half-close), negotiated per session.
//! - [`client`]: `wsgate connect`: a local TCP/Unix port or stdio carried over ws/wss through
//!   the same bridge, in the client role.
//! - [`metrics`]: every metric name and help text; one Prometheus recorder per instance.
//! - [`throttle`]: a repeated warning written once per interval, with the count of the rest.
//! - `admin`: the admin listener: `/metrics`, `/healthz`, `/readyz`.
//! - [`probe`]: `wsgate probe`: one plain-HTTP GET of `/healthz` as an exit code (the image's
//!   health check, which has no shell).
//! - [`reload`]: reloads on SIGHUP and when a watched file changes (a metadata poll that sees
//!   Kubernetes' `..data` symlink swaps); what is watched.
//! - [`shutdown`]: the shutdown request; the drain order lives in [`Gateway::run`].
//!
//! # Flow
//!
//! ```text
//! config.toml → config → Gateway::bind (listeners, TLS) → Gateway::run
//! TCP → server → admission (client caps, handshake pool) → tls → HTTP/1.1 → router
//!     → policy::admit ──refuse──→ HTTP 4xx/5xx
//!       └─admit─→ admission (route caps, memory) → session::dial, answer 101
//!                                                               └── session → bridge: WS ⇄ TCP
//! Shutdown (main: SIGTERM/SIGINT) → /readyz 503 → drain delay → stop accepting
//!        → sessions close with 1001 over the close window → deadline → drop the rest
//! Reloader (main: SIGHUP; reload::watch: a file changed) → config + certificates
//!        → new snapshot for new connections
//! ```
//!
//! Nothing here installs process-wide state, so tests run several gateways in one process.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod admin;
pub mod admission;
pub mod auth;
pub mod backend;
pub mod bridge;
pub mod client;
pub mod client_addr;
pub mod client_cert;
pub mod client_stream;
pub mod config;
pub mod console;
pub mod control;
pub mod echo;
pub mod frames;
pub mod metrics;
pub mod policy;
pub mod probe;
pub mod proxy_protocol;
pub mod readahead;
pub mod reload;
pub mod router;
mod server;
pub mod session;
pub mod shutdown;
pub mod throttle;
pub mod tickets;
pub mod tls;
pub mod tls_stream;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::net::{TcpListener, TcpSocket};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

pub use config::Config;
pub use shutdown::Shutdown;

use crate::admission::Admission;
use crate::metrics::Metrics;
use crate::server::{Shared, Snapshot};

/// Why a gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A listener's address could not be bound (in use, not local, no permission).
    #[error("listener \"{name}\": bind {address}: {source}")]
    Bind {
        /// Listener name (`listeners.NAME`), or `builtin.tcp_echo` / `admin`.
        name: String,
        /// The configured address.
        address: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// A route's credential files (tokens, keys, JWKS, htpasswd) could not be used; one line
    /// per problem.
    #[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))]
    Auth(Vec<auth::AuthError>),
    /// A token-mapped route's map file or JWT keys could not be used; one line per problem.
    #[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))]
    Targets(Vec<backend::TargetsError>),
    /// A listener's TLS material could not be loaded or generated.
    #[error("listener \"{name}\": {source}")]
    Tls {
        /// Listener name.
        name: String,
        /// What was wrong (boxed: rustls errors are large, and this is the cold path).
        source: Box<tls::TlsError>,
    },
    /// The admin listener's certificate or tokens file could not be loaded.
    #[error("{0}")]
    Admin(Box<admin::AccessError>),
    /// A route's backend TLS files (`backend_tls`: CA, client certificate or key) could not be
    /// used; one line per problem.
    #[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))]
    BackendTls(Vec<backend::tls::LoadError>),
}

/// Why a reload was refused; the config in force stays.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The new file is invalid (one line per problem).
    #[error("{0}")]
    Config(config::ConfigErrors),
    /// The new file changes something a running gateway cannot change.
    #[error("{0} changed: restart wsgate to apply it (nothing was reloaded)")]
    RestartRequired(String),
    /// Certificates (or the admin tokens file) could not be loaded.
    #[error("{0}")]
    Tls(StartError),
}

/// A gateway whose sockets are bound and whose TLS material is loaded, ready to [`run`].
///
/// [`run`]: Gateway::run
pub struct Gateway {
    listeners: Vec<server::Listener>,
    tcp_echo: Option<TcpListener>,
    admin: Option<TcpListener>,
    shared: Arc<Shared>,
    ready: Arc<AtomicBool>,
    reloader: Reloader,
}

impl Gateway {
    /// Binds every listener of `config` (the admin listener and built-in TCP echo too, if
    /// enabled) and loads TLS, generating the development certificate pair where the config
    /// allows it.
    pub async fn bind(config: Config) -> Result<Gateway, StartError> {
        let metrics = Arc::new(Metrics::new(config.metrics));
        let (occupancy, waiting) = (metrics.handshakes_in_progress.clone(), metrics.handshakes_waiting.clone());
        let admission = Arc::new(Admission::new(&config.limits, occupancy, waiting));
        let pools = Arc::new(backend::Pools::new(metrics.clone()));
        let resumption = Arc::new(tickets::Resumption::default());
        let (snapshot, made) = snapshot(&config, &metrics, &admission, &pools, &resumption)?;
        resumption.keep(made);
        pools.publish(snapshot.router.pools());
        let mut listeners = Vec::with_capacity(config.listeners.len());
        let tuning = server::Tuning::of(&config.limits.session);
        for l in &config.listeners {
            let (tcp, inherited) = bind_client_listener(&l.name, l.address, config.limits.listen_backlog, tuning)?;
            listeners.push(server::Listener {
                name: l.name.clone(),
                tcp,
                secure: l.tls.is_some(),
                metrics: metrics.listener(&l.name),
                inherited,
            });
        }
        let tcp_echo = match config.builtin.tcp_echo {
            Some(address) => Some(bind("builtin.tcp_echo", address).await?),
            None => None,
        };
        let admin = match config.admin {
            Some(address) => Some(bind("admin", address).await?),
            None => None,
        };
        let admin_access = Arc::new(std::sync::RwLock::new(Arc::new(admin_access(&config)?)));
        let shared = Arc::new(Shared::new(&config.limits, admission, metrics, snapshot));
        // Stamped after the snapshot, so a development pair generated just now is no change.
        let baseline = Arc::new(std::sync::Mutex::new(reload::Baseline::take(reload::files(&config))));
        let running = Arc::new(std::sync::Mutex::new(Arc::new(config)));
        let reloader = Reloader { shared: shared.clone(), running, admin_access, pools, resumption, baseline };
        Ok(Gateway { listeners, tcp_echo, admin, shared, ready: Arc::new(AtomicBool::new(false)), reloader })
    }

    /// The bound address of the listener named `name` (useful when the config said port 0).
    pub fn local_addr(&self, name: &str) -> Option<SocketAddr> {
        self.listeners.iter().find(|l| l.name == name).and_then(|l| l.tcp.local_addr().ok())
    }

    /// The bound address of the built-in TCP echo service, if enabled.
    pub fn tcp_echo_addr(&self) -> Option<SocketAddr> {
        self.tcp_echo.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// The bound address of the admin listener, if enabled.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// Counts, in `wsgate_log_lines_dropped_total`, what `dropped` says the process's log writer
    /// has dropped so far (read at each scrape). The writer belongs to whoever set up logging.
    pub fn count_dropped_log_lines(&self, dropped: impl Fn() -> u64 + Send + Sync + 'static) {
        self.shared.metrics.count_dropped_log_lines(dropped);
    }

    /// A handle that applies new configs to this gateway while it runs.
    pub fn reloader(&self) -> Reloader {
        self.reloader.clone()
    }

    /// Serves until `shutdown` is requested, then drains in order: `/readyz` answers 503 at
    /// once; listeners keep accepting for the drain delay (skipped by [`Shutdown::now`]); then
    /// they stop, and sessions are closed with 1001 ("going away") spread over the close window,
    /// each after delivering what it had read; at the deadline, counted from the request, what
    /// is left is dropped. Returns when everything has ended.
    pub async fn run(self, shutdown: Shutdown) {
        let shared = self.shared;
        let accept_loops = TaskTracker::new();
        for listener in self.listeners {
            if let Ok(addr) = listener.tcp.local_addr() {
                let scheme = if listener.secure { "wss" } else { "ws" };
                info!(listener = %listener.name, url = %format!("{scheme}://{addr}"), "listening");
            }
            accept_loops.spawn(server::accept_loop(listener, shared.clone()));
        }
        accept_loops.close();
        // The built-in TCP echo and the admin listener outlive the sessions: sessions bridged
        // to the echo must end with 1001, not with a backend EOF, and /readyz must answer 503
        // through the whole drain.
        let services_stop = CancellationToken::new();
        let services = TaskTracker::new();
        if let Some(listener) = self.tcp_echo {
            if let Ok(addr) = listener.local_addr() {
                info!(address = %addr, "builtin tcp echo listening");
            }
            services.spawn(echo::serve_tcp(listener, services_stop.clone(), services.clone()));
        }
        if let Some(listener) = self.admin {
            let access = self.reloader.admin_access.clone();
            if let Ok(addr) = listener.local_addr() {
                let tls = access.read().unwrap_or_else(|p| p.into_inner()).tls_enabled();
                let scheme = if tls { "https" } else { "http" };
                info!(url = %format!("{scheme}://{addr}/metrics"), "admin listening");
            }
            let state = admin::State { metrics: shared.metrics.clone(), ready: self.ready.clone(), access };
            services.spawn(admin::serve(listener, state, services_stop.clone(), services.clone()));
        }
        // The handshake pool's clock sheds places that have come due for waiting connections.
        services.spawn(shared.admission.pool.clone().clock(services_stop.clone()));
        // Pool members' health checks, for the pools of whichever snapshot is in force.
        services.spawn(backend::health::run(self.reloader.pools.clone(), services_stop.clone()));
        // The file watcher stops when shutdown is requested: a reload during the drain would
        // change nothing the draining gateway still uses.
        let watch_stop = CancellationToken::new();
        services.spawn(reload::watch(self.reloader.clone(), watch_stop.clone()));
        self.ready.store(true, Ordering::Relaxed);
        shared.metrics.ready.set(1.0);

        shutdown.requested().await;
        watch_stop.cancel();
        let deadline = tokio::time::Instant::now() + shared.snapshot().shutdown.deadline;
        self.ready.store(false, Ordering::Relaxed);
        shared.metrics.ready.set(0.0);
        let plan = shared.snapshot().shutdown.clone();
        info!(
            drain_delay = ?plan.drain_delay, close_window = ?plan.close_window, deadline = ?plan.deadline,
            "shutdown requested: /readyz now answers 503"
        );
        let _ = tokio::time::timeout_at(deadline, shutdown.drain_delay(plan.drain_delay)).await;
        info!(open = shared.tasks.len(), "draining: listeners closed; closing sessions with 1001");
        shared.stop.cancel();
        accept_loops.wait().await;
        shared.tasks.close();
        if tokio::time::timeout_at(deadline, shared.tasks.wait()).await.is_err() {
            warn!(left = shared.tasks.len(), "shutdown deadline reached; dropping what is left");
            shared.abort.cancel();
            shared.tasks.wait().await;
        }
        services_stop.cancel();
        services.close();
        services.wait().await;
        info!("shutdown complete");
    }
}

/// Applies a new config to a running gateway: routes, policies, limits and certificates for new
/// connections; sessions already open keep the config they started with. What cannot change
/// without a restart (listener set and addresses, schemes, connection and handshake limits, the
/// admin and built-in listeners, the log format, metrics on or off) makes the whole reload fail,
/// so nothing is half-applied.
#[derive(Clone)]
pub struct Reloader {
    shared: Arc<Shared>,
    running: Arc<std::sync::Mutex<Arc<Config>>>,
    /// Who may read the admin listener, rebuilt (files reread) by each reload.
    admin_access: Arc<std::sync::RwLock<Arc<admin::Access>>>,
    /// Pool members' states, kept across reloads, and the pools the health task checks.
    pools: Arc<backend::Pools>,
    /// Listeners' TLS resumption state (ticket keys, session cache), kept across reloads.
    resumption: Arc<tickets::Resumption>,
    /// The watched files' stamps from just before the last reload read them; its lock is held
    /// through each whole reload, so reloads never overlap.
    baseline: Arc<std::sync::Mutex<reload::Baseline>>,
}

impl std::fmt::Debug for Reloader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reloader").finish_non_exhaustive()
    }
}

impl Reloader {
    /// Re-reads `path` and its certificate files and applies them, or explains why not, as
    /// SIGHUP does (counted as `trigger="signal"`; nothing is logged: see [`Reloader::reload`]).
    /// Every outcome is counted in `wsgate_config_reloads_total`.
    pub fn reload_file(&self, path: &Path) -> Result<(), ReloadError> {
        self.reload_counted(path, &reload::Trigger::Signal)
    }

    /// One reload, start to end, under the baseline's lock: stamp the watched files, read and
    /// apply, then watch what the outcome names (see [`reload`]); counted by trigger.
    fn reload_counted(&self, path: &Path, trigger: &reload::Trigger) -> Result<(), ReloadError> {
        let mut baseline = self.baseline.lock().unwrap_or_else(|p| p.into_inner());
        let before = reload::Baseline::take(baseline.paths());
        let (result, refused_files) = match config::load(path) {
            Err(e) => (Err(ReloadError::Config(e)), Vec::new()),
            Ok(new) => {
                let files = reload::files(&new);
                (self.apply(new), files)
            }
        };
        let mut watched = reload::files(&self.running());
        if result.is_err() {
            watched.extend(refused_files.into_iter().filter(|f| !watched.contains(f)).collect::<Vec<_>>());
        }
        *baseline = before.extend_to(watched);
        drop(baseline);
        let counters = &self.shared.metrics.reloads;
        let counter = match (trigger, result.is_ok()) {
            (reload::Trigger::Signal, true) => &counters.signal_ok,
            (reload::Trigger::Signal, false) => &counters.signal_error,
            (reload::Trigger::Watch { .. }, true) => &counters.watch_ok,
            (reload::Trigger::Watch { .. }, false) => &counters.watch_error,
        };
        counter.increment(1);
        result
    }

    /// The config in force.
    fn running(&self) -> Arc<Config> {
        self.running.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The first watched file changed since the last reload read it, if any (waits for a
    /// reload in progress).
    fn changed_file(&self) -> Option<std::path::PathBuf> {
        self.baseline.lock().unwrap_or_else(|p| p.into_inner()).changed()
    }

    fn apply(&self, new: Config) -> Result<(), ReloadError> {
        let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(what) = config::restart_required(&running, &new) {
            return Err(ReloadError::RestartRequired(what));
        }
        // Everything that can fail comes first: a refused reload leaves nothing of itself behind.
        let admin_access = admin_access(&new).map_err(ReloadError::Tls)?;
        let (snapshot, made) =
            snapshot(&new, &self.shared.metrics, &self.shared.admission, &self.pools, &self.resumption)
                .map_err(ReloadError::Tls)?;
        let pools = snapshot.router.pools();
        self.shared.replace(snapshot);
        self.resumption.keep(made);
        self.pools.publish(pools);
        *self.admin_access.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(admin_access);
        *running = Arc::new(new);
        Ok(())
    }
}

/// Everything a reload may change, built from `config`: routes, limits, certificates, pages;
/// and the TLS resumption state made for it, for the caller to keep once it is in force.
fn snapshot(
    config: &Config,
    metrics: &Arc<Metrics>,
    admission: &Admission,
    pools: &backend::Pools,
    resumption: &tickets::Resumption,
) -> Result<(Snapshot, tickets::Made), StartError> {
    let mut tls = HashMap::new();
    let mut made = tickets::Made::default();
    for l in &config.listeners {
        if let Some(files) = &l.tls {
            tls.insert(l.name.clone(), TlsAcceptor::from(load_tls(&l.name, files, resumption, &mut made)?));
        }
    }
    let auth = auth::load(config).map_err(StartError::Auth)?;
    let targets = backend::load_targets(config).map_err(StartError::Targets)?;
    let backend_tls = backend::tls::load(config).map_err(StartError::BackendTls)?;
    let snapshot = Snapshot {
        auth,
        targets,
        router: router::Router::new(
            &config.routes,
            |name| metrics.route(name),
            |name| admission.route(name),
            pools,
            |name| backend_tls.get(name).cloned(),
        ),
        limits: config.limits.clone(),
        shutdown: config.shutdown.clone(),
        tls,
        pages: config.console.iter().map(|path| server::Page { path: path.clone(), render: console::page }).collect(),
        addressing: config.listeners.iter().map(|l| (l.name.clone(), Arc::new(l.addressing.clone()))).collect(),
        sends_proxy_headers: config.routes.iter().any(|r| r.proxy_protocol.is_some()),
    };
    Ok((snapshot, made))
}

fn load_tls(
    name: &str,
    files: &config::TlsFiles,
    resumption: &tickets::Resumption,
    made: &mut tickets::Made,
) -> Result<Arc<rustls::ServerConfig>, StartError> {
    let err = |source: tls::TlsError| StartError::Tls { name: name.to_string(), source: Box::new(source) };
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
    let state = resumption.state(name, files, made).map_err(|e| err(e.into()))?;
    tls::server_config_with(&files.cert, &files.key, files.client_auth.as_ref(), Some(state)).map_err(err)
}

/// The admin listener's TLS and tokens, loaded from their files (nothing when it is disabled).
fn admin_access(config: &Config) -> Result<admin::Access, StartError> {
    match config.admin {
        None => Ok(admin::Access::default()),
        Some(_) => admin::Access::load(&config.admin_access).map_err(|e| StartError::Admin(Box::new(e))),
    }
}

/// A client-facing listener with the configured backlog (tokio's `bind` fixes it at 1024), given
/// the session socket options its connections inherit on Linux; with them, if it took every one.
fn bind_client_listener(
    name: &str,
    address: SocketAddr,
    backlog: u32,
    tuning: server::Tuning,
) -> Result<(TcpListener, Option<server::Tuning>), StartError> {
    let err = |source| StartError::Bind { name: name.to_string(), address, source };
    let socket = if address.is_ipv4() { TcpSocket::new_v4() } else { TcpSocket::new_v6() }.map_err(err)?;
    let tuned = backend::try_tune(&socket, tuning.keepalive, tuning.user_timeout).is_ok();
    // As tokio's `bind` does: a restarted gateway can bind while old connections are in TIME_WAIT.
    socket.set_reuseaddr(true).map_err(err)?;
    socket.bind(address).map_err(err)?;
    let inherited = (cfg!(target_os = "linux") && tuned).then_some(tuning);
    Ok((socket.listen(backlog).map_err(err)?, inherited))
}

async fn bind(name: &str, address: SocketAddr) -> Result<TcpListener, StartError> {
    TcpListener::bind(address).await.map_err(|source| StartError::Bind { name: name.to_string(), address, source })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// What the accept loop relies on: a socket accepted from a client listener carries every
    /// option set on the listener at bind (on Linux), keepalive's interval and count included,
    /// and none of them when they are off.
    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn accepted_sockets_inherit_the_listeners_options() {
        let secs = |s| Some(Duration::from_secs(s));
        for tuning in [
            server::Tuning { keepalive: secs(60), user_timeout: secs(30) },
            server::Tuning { keepalive: None, user_timeout: None },
        ] {
            let any = "127.0.0.1:0".parse().unwrap();
            let (listener, inherited) = bind_client_listener("test", any, 16, tuning).unwrap();
            assert_eq!(inherited, Some(tuning), "the listening socket took every option");
            let _client = tokio::net::TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
            let (accepted, _) = listener.accept().await.unwrap();
            let socket = socket2::SockRef::from(&accepted);
            assert!(socket.tcp_nodelay().unwrap());
            assert_eq!(socket.keepalive().unwrap(), tuning.keepalive.is_some());
            if let Some(idle) = tuning.keepalive {
                assert_eq!(socket.tcp_keepalive_time().unwrap(), idle);
                assert_eq!(socket.tcp_keepalive_interval().unwrap(), Duration::from_secs(10));
                assert_eq!(socket.tcp_keepalive_retries().unwrap(), 5);
            }
            assert_eq!(socket.tcp_user_timeout().unwrap(), tuning.user_timeout);
        }
    }
}
