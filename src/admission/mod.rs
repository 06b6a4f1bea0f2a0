//! Who gets in, and how much they may hold: every bound applied before a session starts, kept
//! across reloads (the limits themselves come from the config in force at each decision).
//!
//! In the order a connection meets them:
//! 1. `max_connections` (the server's semaphore) and the client's connection cap
//!    ([`Clients`]): a socket over either is closed at accept, before anything is read.
//! 2. The client's rate ([`Clients`]): over it, the request is read and answered 429 with
//!    `Retry-After`.
//! 3. The handshake pool ([`Pool`]) and the client's share of it: a connection without a place
//!    waits for one, within its handshake deadline.
//! 4. After the request is admitted by `policy` and before the dial: the route's session cap
//!    and the memory budget ([`Memory`]), over which a request is shed ([`Shed`]) as the
//!    route's `on_backend_unavailable` says; then its cap on connects in progress
//!    ([`RouteLoad`]), for which a request waits up to the route's connect timeout before it
//!    is shed the same way.
//!
//! Waiting at a bound rather than failing is what a reconnect storm needs: every bound above is
//! full for a few seconds while thousands of clients that will each be served in milliseconds
//! arrive at once. What bounds the waiting is the sockets (`max_connections`, per client and in
//! all) and the deadlines.
//!
//! The backend dial holds no handshake place: a dead backend ties up only its own route's
//! connects, not the pool every route shares.

mod clients;
mod memory;
mod pool;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;

pub use clients::{ClientKey, Clients, Closed, ConnectionLease, Over, Verdict};
pub use memory::Memory;
pub use pool::{Place, Pool};

use crate::config::Limits;

/// The admission state of one gateway instance.
#[derive(Debug)]
pub struct Admission {
    /// Per-client connections, handshakes and rates.
    pub clients: Arc<Clients>,
    /// The handshake pool.
    pub pool: Arc<Pool>,
    /// The memory budget.
    pub memory: Memory,
    routes: Mutex<HashMap<String, Arc<RouteLoad>>>,
}

impl Admission {
    /// State sized by `limits` (the pool's size needs a restart to change); `occupancy` and
    /// `waiting` are the gauges of the pool's places in use and of the connections waiting.
    pub fn new(limits: &Limits, occupancy: metrics::Gauge, waiting: metrics::Gauge) -> Admission {
        let pool = Pool::new(limits.max_handshakes, limits.handshake_shed_after, occupancy, waiting);
        Admission { clients: Arc::default(), pool: Arc::new(pool), memory: Memory::new(), routes: Mutex::default() }
    }

    /// The load of the route named `name`, the same across reloads, so sessions opened under
    /// an old config count against the new one's caps.
    pub fn route(&self, name: &str) -> Arc<RouteLoad> {
        let mut routes = self.routes.lock().unwrap_or_else(|p| p.into_inner());
        routes.entry(name.to_string()).or_default().clone()
    }
}

/// What a route has in use: sessions open, and backend connects in progress.
#[derive(Debug, Default)]
pub struct RouteLoad {
    sessions: AtomicUsize,
    connecting: AtomicUsize,
    /// Told when a connect place is given back.
    connect_freed: Notify,
}

impl RouteLoad {
    /// A place among the route's sessions, if it has fewer than `cap` (`None`: no cap).
    pub fn session(self: &Arc<Self>, cap: Option<usize>) -> Result<LoadGuard, Shed> {
        LoadGuard::take(self, false, cap.unwrap_or(usize::MAX)).ok_or(Shed::MaxSessions(cap.unwrap_or(0)))
    }

    /// A place among the route's connects in progress, of which it has at most `cap`: at once,
    /// or when one is given back within `wait`.
    pub async fn connect(self: &Arc<Self>, cap: usize, wait: Duration) -> Result<LoadGuard, Shed> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let freed = self.connect_freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            if let Some(guard) = LoadGuard::take(self, true, cap) {
                return Ok(guard);
            }
            if tokio::time::timeout_at(deadline, freed).await.is_err() {
                return Err(Shed::PendingConnects(cap));
            }
        }
    }
}

/// One place counted in a [`RouteLoad`], given back when dropped.
#[derive(Debug)]
pub struct LoadGuard {
    load: Arc<RouteLoad>,
    /// A connect place (else a session place).
    connect: bool,
}

impl LoadGuard {
    fn take(load: &Arc<RouteLoad>, connect: bool, cap: usize) -> Option<LoadGuard> {
        let count = if connect { &load.connecting } else { &load.sessions };
        count.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < cap).then_some(n + 1)).ok()?;
        Some(LoadGuard { load: load.clone(), connect })
    }
}

impl Drop for LoadGuard {
    fn drop(&mut self) {
        if self.connect {
            self.load.connecting.fetch_sub(1, Ordering::AcqRel);
            self.load.connect_freed.notify_one();
        } else {
            self.load.sessions.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// Why an admitted request gets no session: the gateway or the route is at a bound. What the
/// client sees follows the route's `on_backend_unavailable`: 1013 after the upgrade, or 503
/// with `Retry-After`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shed {
    /// The route has `max_sessions` open.
    MaxSessions(usize),
    /// The route has `max_pending_connects` backend connects in progress.
    PendingConnects(usize),
    /// The process is above its memory budget.
    Memory,
    /// `limits.max_password_checks` HTTP Basic passwords are being hashed (answered 503).
    PasswordChecks(usize),
}

impl Shed {
    /// The `reason` label of `wsgate_sessions_shed_total`.
    pub fn label(self) -> &'static str {
        match self {
            Shed::MaxSessions(_) => "max_sessions",
            Shed::PendingConnects(_) => "max_pending_connects",
            Shed::Memory => "memory",
            Shed::PasswordChecks(_) => "max_password_checks",
        }
    }

    /// The reason the client reads (the 503 body, or the 1013 close reason: at most 123 bytes).
    pub fn reason(self) -> String {
        match self {
            Shed::MaxSessions(n) => format!("route is at its session limit ({n}); try again later"),
            Shed::PendingConnects(n) => format!("route has {n} backend connects in progress; try again later"),
            Shed::Memory => "gateway is at its memory limit; try again later".to_string(),
            Shed::PasswordChecks(n) => format!("gateway is checking {n} passwords already; try again shortly"),
        }
    }

    /// How long a client should wait before it tries again (`Retry-After`). Sessions and
    /// memory free up as sessions end, connects within a round trip or a connect timeout.
    pub fn retry_after(self) -> Duration {
        match self {
            Shed::MaxSessions(_) | Shed::Memory => Duration::from_secs(5),
            Shed::PendingConnects(_) | Shed::PasswordChecks(_) => Duration::from_secs(1),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn route_caps_count_and_release() {
        let load = Arc::new(RouteLoad::default());
        let a = load.session(Some(2)).unwrap();
        let _b = load.session(Some(2)).unwrap();
        assert_eq!(load.session(Some(2)).unwrap_err(), Shed::MaxSessions(2));
        drop(a);
        let _c = load.session(Some(2)).unwrap();
        let held: Vec<_> = (0..100).map(|_| load.session(None).unwrap()).collect();
        assert_eq!(held.len(), 100);
        assert_eq!(load.connect(0, Duration::ZERO).await.unwrap_err(), Shed::PendingConnects(0));
        assert!(Shed::PendingConnects(100_000).reason().len() <= 123);
    }

    /// A connect beyond the cap waits for a place given back, up to its wait.
    #[tokio::test]
    async fn connects_wait_for_a_place() {
        let load = Arc::new(RouteLoad::default());
        let first = load.connect(1, Duration::ZERO).await.unwrap();
        let start = tokio::time::Instant::now();
        let wait = Duration::from_millis(50);
        assert_eq!(load.connect(1, wait).await.unwrap_err(), Shed::PendingConnects(1));
        assert!(start.elapsed() >= wait);
        let (waiting, mut waited) = tokio::sync::oneshot::channel();
        let second = tokio::spawn({
            let load = load.clone();
            async move {
                let place = load.connect(1, Duration::from_secs(3600));
                tokio::pin!(place);
                // Told once it waits, so the place is given back to a waiter, not taken at once.
                assert!(futures_util::FutureExt::now_or_never(place.as_mut()).is_none());
                let _ = waiting.send(());
                place.await
            }
        });
        (&mut waited).await.unwrap();
        drop(first);
        assert!(second.await.unwrap().is_ok());
    }
}
