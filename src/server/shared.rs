//! What every connection of one gateway instance shares ([`Shared`]: its bounds, admission,
//! shutdown tokens, tasks, metrics) and the config each works under ([`Snapshot`]), replaced
//! whole by a reload.

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, RwLock};

use bytes::Bytes;
use http_body_util::Full;
use hyper::Response;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::accept::OVERFLOW_RESPONSES;
use crate::admission::Admission;
use crate::auth;
use crate::backend;
use crate::config::{Addressing, Limits};
use crate::metrics::Metrics;
use crate::router::Router;

/// What every connection of one gateway instance shares for the instance's whole life.
pub(crate) struct Shared {
    pub connections: Arc<Semaphore>,
    /// Sockets beyond `max_connections` being told so with a 503 (ws listeners only).
    pub(super) overflow: Arc<Semaphore>,
    pub admission: Arc<Admission>,
    pub next_session: AtomicU64,
    /// Cancelled when the drain begins: stop accepting, close sessions with 1001.
    pub stop: CancellationToken,
    /// Cancelled at the shutdown deadline: drop whatever is left.
    pub abort: CancellationToken,
    /// Tracks every connection and session task, so shutdown can wait for them.
    pub tasks: TaskTracker,
    pub metrics: Arc<Metrics>,
    /// The current config snapshot; replaced whole by a reload.
    snapshot: RwLock<Arc<Snapshot>>,
    /// HTTP Basic password checks in progress (`limits.max_password_checks`), across reloads.
    pub password_checks: Arc<auth::PasswordChecks>,
}

/// Everything a reload may change, as one value.
pub(crate) struct Snapshot {
    pub router: Router,
    pub limits: Limits,
    /// How a shutdown proceeds (read when it starts).
    pub shutdown: crate::config::Shutdown,
    /// TLS acceptors by listener name (`wss` listeners only).
    pub tls: HashMap<String, TlsAcceptor>,
    /// Pages served for plain GET on an exact path (the console), given by `lib.rs`.
    pub pages: Vec<Page>,
    /// How each listener learns its clients' addresses, by listener name.
    pub addressing: HashMap<String, Arc<Addressing>>,
    /// The access policy of each route that has one, files loaded, by route name.
    pub auth: HashMap<String, Arc<auth::RouteAuth>>,
    /// The token lookup of each token-mapped route, map files and keys loaded, by route name.
    pub targets: HashMap<String, Arc<backend::Mapping>>,
    /// Whether any route sends its backend a PROXY header, the one use of a connection's local
    /// address.
    pub sends_proxy_headers: bool,
}

/// A static page: served for GET or HEAD on exactly `path`, on every listener.
pub(crate) struct Page {
    pub path: String,
    pub render: fn() -> Response<Full<Bytes>>,
}

impl Shared {
    pub fn new(limits: &Limits, admission: Arc<Admission>, metrics: Arc<Metrics>, snapshot: Snapshot) -> Shared {
        Shared {
            connections: Arc::new(Semaphore::new(limits.max_connections)),
            overflow: Arc::new(Semaphore::new(OVERFLOW_RESPONSES)),
            admission,
            next_session: AtomicU64::new(1),
            stop: CancellationToken::new(),
            abort: CancellationToken::new(),
            tasks: TaskTracker::new(),
            metrics,
            snapshot: RwLock::new(Arc::new(snapshot)),
            password_checks: Arc::default(),
        }
    }

    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn replace(&self, snapshot: Snapshot) {
        *self.snapshot.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(snapshot);
    }
}
