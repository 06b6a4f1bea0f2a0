//! The handshake pool: at most `max_handshakes` connections at once in the TLS handshake or
//! reading their request, at most a client's share (`per_client.max_handshakes`) of them from
//! one client, and what a connection does when there is no place for it.
//!
//! A connection that finds no place waits for one, within its handshake deadline. What fills the
//! pool in the field is a reconnect storm: thousands of browsers at once after a replica drained
//! or a network blip, each of whose handshakes takes milliseconds; a short wait serves every one
//! of them, where shedding or refusing (what wsgate did first) failed most of the storm.
//!
//! What fills it under attack is slowloris: sockets that trickle their handshake to hold places
//! and, once they must wait, sockets that wait to take the next. Two rules keep real clients
//! served through that:
//! - A free place goes to the waiting client with the fewest unfinished handshakes (places held
//!   and connections waiting). A real client has one or two; an address that floods has many,
//!   and is served after every other. Among equals the newest waiter goes first: an attack from
//!   as many addresses as it has sockets queues more sockets than the pool can serve before
//!   their deadlines, and oldest first would put a real client behind all of them, where newest
//!   first serves it at the next place. (In a storm the pool drains, the order changes nothing.)
//! - A place is a connection's own only for `shed_after`: held longer while a connection that
//!   may take it waits, it is taken back (the one holding it is shed, closed without an answer)
//!   and given to the waiter. The victim is taken from the client that holds the most places
//!   (never the waiter's own client: that would only trade one of its handshakes for another),
//!   its oldest without progress (its TLS ClientHello has not arrived whole) first, then its
//!   oldest. A real client finishes within a few round trips and is not shed.
//!
//! So to keep a real client waiting, an attacker must have no more unfinished handshakes per
//! address than that client does: as many addresses as it has sockets. A connection beyond its
//! client's share waits too, and is passed over until its client holds fewer places.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{Notify, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::ClientKey;

/// The pool of one gateway instance, shared by its listeners.
#[derive(Debug)]
pub struct Pool {
    capacity: usize,
    shed_after: Duration,
    inner: Mutex<Inner>,
    /// Told when the waiters may need a place shed for them (see [`Pool::clock`]).
    changed: Notify,
    /// `wsgate_handshakes_in_progress` and `wsgate_handshakes_waiting`, set under the lock so
    /// that they are never stale.
    occupancy: metrics::Gauge,
    waiting: metrics::Gauge,
}

#[derive(Debug)]
struct Member {
    client: ClientKey,
    token: CancellationToken,
    progressed: bool,
    since: Instant,
}

/// A connection waiting for a place, and how to give it one.
#[derive(Debug)]
struct Waiter {
    id: u64,
    share: usize,
    /// Its handshake deadline: a place is never given to it after this.
    deadline: Instant,
    tx: oneshot::Sender<(u64, CancellationToken)>,
}

/// What one client has in the pool and waiting for it.
#[derive(Debug, Default)]
struct Client {
    held: usize,
    /// Oldest first.
    waiters: VecDeque<Waiter>,
}

impl Client {
    /// Where the client stands in [`Inner::order`], if it has connections waiting: fewest
    /// unfinished first, then newest waiter first.
    fn rank(&self, key: ClientKey) -> Option<(usize, u64, ClientKey)> {
        let newest = self.waiters.back()?.id;
        Some((self.held + self.waiters.len(), u64::MAX - newest, key))
    }
}

#[derive(Debug, Default)]
struct Inner {
    next: u64,
    /// Members by the order they got their place: the first is the oldest.
    members: BTreeMap<u64, Member>,
    /// Clients with places or waiting connections.
    clients: HashMap<ClientKey, Client>,
    /// Clients with waiting connections, the next to be served first: fewest unfinished
    /// handshakes, then the one whose newest waiter came last.
    order: BTreeSet<(usize, u64, ClientKey)>,
    waiting: usize,
}

impl Inner {
    fn id(&mut self) -> u64 {
        self.next += 1;
        self.next
    }

    fn held(&self, client: &ClientKey) -> usize {
        self.clients.get(client).map_or(0, |c| c.held)
    }

    /// Whether `client` may take a place: it holds fewer than `share` (0: no share).
    fn fits(&self, client: &ClientKey, share: usize) -> bool {
        share == 0 || self.held(client) < share
    }

    /// Changes what `key` has, keeping its rank in `order` and forgetting it once it has
    /// nothing.
    fn update<T>(&mut self, key: ClientKey, change: impl FnOnce(&mut Client) -> T) -> T {
        let client = self.clients.entry(key).or_default();
        if let Some(rank) = client.rank(key) {
            self.order.remove(&rank);
        }
        let out = change(client);
        match client.rank(key) {
            Some(rank) => {
                self.order.insert(rank);
            }
            None if client.held == 0 => {
                self.clients.remove(&key);
            }
            None => {}
        }
        out
    }

    fn insert(&mut self, client: ClientKey, now: Instant) -> (u64, CancellationToken) {
        let (id, token) = (self.id(), CancellationToken::new());
        self.update(client, |c| c.held += 1);
        self.members.insert(id, Member { client, token: token.clone(), progressed: false, since: now });
        (id, token)
    }

    fn remove(&mut self, id: u64) -> Option<Member> {
        let member = self.members.remove(&id)?;
        self.update(member.client, |c| c.held = c.held.saturating_sub(1));
        Some(member)
    }

    /// The member to shed for a waiter of `waiting`: of those of other clients that have held
    /// their place since `cutoff` or longer, one of the client holding the most places, its
    /// oldest without progress, or else its oldest.
    fn victim(&self, cutoff: Option<Instant>, waiting: ClientKey) -> Option<u64> {
        let cutoff = cutoff?;
        let aged = || self.members.iter().filter(|(_, m)| m.since <= cutoff && m.client != waiting);
        let most = aged().map(|(_, m)| self.held(&m.client)).max()?;
        let theirs = || aged().filter(|(_, m)| self.held(&m.client) == most);
        theirs().find(|(_, m)| !m.progressed).or_else(|| theirs().next()).map(|(id, _)| *id)
    }

    /// Sheds member `id`: it is out of the pool, and its task is told to close.
    fn shed(&mut self, id: u64) {
        if let Some(member) = self.remove(id) {
            member.token.cancel();
        }
    }

    /// The client whose newest waiter is to get the next place: the first in `order` within
    /// its share.
    fn next_waiter(&self) -> Option<ClientKey> {
        let fits = |key: &ClientKey| {
            let share = self.clients.get(key).and_then(|c| c.waiters.back()).map_or(0, |w| w.share);
            self.fits(key, share)
        };
        self.order.iter().map(|(_, _, key)| *key).find(fits)
    }
}

impl Pool {
    /// A pool of `capacity` places (at least 1), each a connection's own for `shed_after`.
    pub fn new(capacity: usize, shed_after: Duration, occupancy: metrics::Gauge, waiting: metrics::Gauge) -> Pool {
        let (capacity, inner, changed) = (capacity.max(1), Mutex::default(), Notify::new());
        Pool { capacity, shed_after, inner, changed, occupancy, waiting }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The gauges, after a change.
    fn count(&self, inner: &Inner) {
        self.occupancy.set(inner.members.len() as f64);
        self.waiting.set(inner.waiting as f64);
    }

    /// A place for a new connection from `client`, whose share is `share` places (0: no
    /// share): at once if the pool has room, otherwise when one is given to it; `None` once
    /// `deadline` has passed without one. Dropping the future gives up waiting.
    pub async fn enter(self: &Arc<Self>, client: ClientKey, share: usize, deadline: Instant) -> Option<Place> {
        let mut wait = {
            let mut inner = self.lock();
            let now = Instant::now();
            if inner.fits(&client, share) && inner.members.len() < self.capacity {
                let (id, token) = inner.insert(client, now);
                self.count(&inner);
                return Some(Place { id, token, pool: self.clone() });
            }
            let (id, (tx, rx)) = (inner.id(), oneshot::channel());
            inner.update(client, |c| c.waiters.push_back(Waiter { id, share, deadline, tx }));
            inner.waiting += 1;
            self.shed_for_waiters(&mut inner, now);
            if inner.next_waiter().is_some() {
                self.changed.notify_one();
            }
            self.count(&inner);
            Wait { pool: self.clone(), client, id, rx, placed: false }
        };
        // The sender is dropped unused when the waiter's deadline has passed.
        let (id, token) = tokio::time::timeout_at(deadline, &mut wait.rx).await.ok()?.ok()?;
        wait.placed = true;
        Some(Place { id, token, pool: self.clone() })
    }

    /// Gives free places to waiting connections, in turn; waiters past their deadline are let
    /// go instead.
    fn hand_over(&self, inner: &mut Inner, now: Instant) {
        while inner.members.len() < self.capacity {
            let Some(key) = inner.next_waiter() else { break };
            let Some(waiter) = inner.update(key, |c| c.waiters.pop_back()) else { break };
            inner.waiting -= 1;
            if waiter.deadline <= now {
                continue;
            }
            let (id, token) = inner.insert(key, now);
            if waiter.tx.send((id, token)).is_err() {
                // Gave up in the meantime (cannot happen: a waiter leaves the list first).
                inner.remove(id);
            }
        }
    }

    /// Sheds places held `shed_after` or longer for waiting connections that may take them.
    fn shed_for_waiters(&self, inner: &mut Inner, now: Instant) {
        while let Some(waiting) = inner.next_waiter() {
            let Some(victim) = inner.victim(now.checked_sub(self.shed_after), waiting) else { break };
            inner.shed(victim);
            self.hand_over(inner, now);
        }
    }

    /// Sheds what has come due; returns when the next place will have been held long enough,
    /// if a waiter may need one.
    fn shed_due(&self, now: Instant) -> Option<Instant> {
        let mut inner = self.lock();
        self.shed_for_waiters(&mut inner, now);
        self.count(&inner);
        inner.next_waiter()?;
        inner.members.values().map(|m| m.since).min().map(|since| since + self.shed_after)
    }

    /// Runs the pool's clock until `stop`: sheds places for waiting connections as they come
    /// due. It keeps no timer while nobody waits.
    pub async fn clock(self: Arc<Self>, stop: CancellationToken) {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let due = self.shed_due(Instant::now());
            let timer = async {
                match due {
                    Some(due) => tokio::time::sleep_until(due).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = changed => {}
                _ = timer => {}
            }
        }
    }

    /// Connections in the pool now.
    pub fn occupied(&self) -> usize {
        self.lock().members.len()
    }

    /// Connections waiting for a place now.
    pub fn waiting(&self) -> usize {
        self.lock().waiting
    }
}

/// A connection's wait for a place: leaves the list when dropped, or gives back the place it
/// was given but never took.
struct Wait {
    pool: Arc<Pool>,
    client: ClientKey,
    id: u64,
    rx: oneshot::Receiver<(u64, CancellationToken)>,
    placed: bool,
}

impl Drop for Wait {
    fn drop(&mut self) {
        if self.placed {
            return;
        }
        let mut inner = self.pool.lock();
        let id = self.id;
        let left = inner.update(self.client, |c| {
            let before = c.waiters.len();
            c.waiters.retain(|w| w.id != id);
            before != c.waiters.len()
        });
        if left {
            inner.waiting -= 1;
        } else if let Ok((id, _)) = self.rx.try_recv()
            && inner.remove(id).is_some()
        {
            self.pool.hand_over(&mut inner, Instant::now());
        }
        self.pool.count(&inner);
    }
}

/// A connection's place in the pool, given up when dropped.
#[derive(Debug)]
pub struct Place {
    id: u64,
    token: CancellationToken,
    pool: Arc<Pool>,
}

impl Place {
    /// Cancelled when the pool sheds this connection to give its place to another.
    pub fn token(&self) -> CancellationToken {
        self.token.clone()
    }

    /// Records that the connection has shown progress: among its client's places it is shed
    /// only after those that have not.
    pub fn progressed(&self) {
        if let Some(member) = self.pool.lock().members.get_mut(&self.id) {
            member.progressed = true;
        }
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        let mut inner = self.pool.lock();
        // A shed place is out of the pool already, and its successor has it.
        if inner.remove(self.id).is_some() && inner.waiting > 0 {
            self.pool.hand_over(&mut inner, Instant::now());
            if inner.next_waiter().is_some() {
                self.pool.changed.notify_one();
            }
        }
        self.pool.count(&inner);
    }
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use futures_util::FutureExt;

    use super::*;

    fn key(last: u8) -> ClientKey {
        ClientKey::new(IpAddr::from([10, 0, 0, last]), 64)
    }

    fn new_pool(capacity: usize, shed_after: Duration) -> Arc<Pool> {
        Arc::new(Pool::new(capacity, shed_after, metrics::Gauge::noop(), metrics::Gauge::noop()))
    }

    fn far() -> Instant {
        Instant::now() + LONG
    }

    /// A place at once, or `None` if the connection has to wait (its wait given up).
    fn now_or_never(pool: &Arc<Pool>, client: ClientKey, share: usize) -> Option<Place> {
        pool.enter(client, share, far()).now_or_never().flatten()
    }

    /// A task waiting for a place, once it waits (it must have to).
    async fn waiter(pool: &Arc<Pool>, client: ClientKey, share: usize) -> tokio::task::JoinHandle<Place> {
        let before = pool.waiting();
        let task = tokio::spawn({
            let pool = pool.clone();
            async move { pool.enter(client, share, far()).await.expect("a place before the deadline") }
        });
        while pool.waiting() == before {
            tokio::task::yield_now().await;
        }
        task
    }

    const LONG: Duration = Duration::from_secs(3600);

    /// With no place held long enough to shed, a newcomer waits; among equals a freed place
    /// goes to the newest waiter, and a waiter that gives up leaves no trace.
    #[tokio::test]
    async fn a_full_pool_makes_newcomers_wait_newest_first() {
        let pool = new_pool(2, LONG);
        let a = now_or_never(&pool, key(1), 0).unwrap();
        let _b = now_or_never(&pool, key(2), 0).unwrap();
        assert!(now_or_never(&pool, key(3), 0).is_none());
        assert_eq!((pool.occupied(), pool.waiting()), (2, 0));
        let older = waiter(&pool, key(3), 0).await;
        let newer = waiter(&pool, key(4), 0).await;
        assert_eq!((pool.occupied(), pool.waiting()), (2, 2));
        drop(a);
        let newer = newer.await.unwrap();
        assert!(!newer.token.is_cancelled());
        assert_eq!((pool.occupied(), pool.waiting()), (2, 1));
        older.abort();
        assert!(older.await.unwrap_err().is_cancelled());
        assert_eq!((pool.occupied(), pool.waiting()), (2, 0));
    }

    /// A newcomer at a full pool sheds a place held `shed_after` or longer: of the client
    /// holding the most, its oldest without progress first, however old another client's is.
    #[tokio::test]
    async fn a_place_held_long_enough_is_shed_for_a_newcomer() {
        let shed_after = Duration::from_millis(50);
        let pool = new_pool(4, shed_after);
        let real = now_or_never(&pool, key(1), 0).unwrap();
        let attacker: Vec<_> = (0..3).map(|_| now_or_never(&pool, key(9), 0).unwrap()).collect();
        attacker[0].progressed();
        tokio::time::sleep(shed_after).await;
        let _next = now_or_never(&pool, key(5), 0).unwrap();
        assert!(!real.token.is_cancelled() && !attacker[0].token.is_cancelled());
        assert!(attacker[1].token.is_cancelled() && !attacker[2].token.is_cancelled());
        assert_eq!(pool.occupied(), 4);
        // The shed place's drop does not remove its successor.
        drop(attacker);
        assert_eq!(pool.occupied(), 2);
        // Places younger than `shed_after` are not shed.
        let young = new_pool(1, LONG);
        let _held = now_or_never(&young, key(1), 0).unwrap();
        assert!(now_or_never(&young, key(2), 0).is_none());
    }

    /// The clock sheds a place for a waiter once one has been held long enough.
    #[tokio::test]
    async fn the_clock_sheds_for_waiters_when_places_come_due() {
        let shed_after = Duration::from_millis(50);
        let pool = new_pool(1, shed_after);
        let stop = CancellationToken::new();
        tokio::spawn(pool.clone().clock(stop.clone()));
        let slow = now_or_never(&pool, key(9), 0).unwrap();
        let start = Instant::now();
        let waiter = pool.enter(key(1), 0, far()).await.unwrap();
        assert!(start.elapsed() >= shed_after / 2, "shed before it came due");
        assert!(slow.token.is_cancelled() && !waiter.token.is_cancelled());
        stop.cancel();
    }

    /// A free place goes to the waiting client with the fewest unfinished handshakes, however
    /// long another has waited.
    #[tokio::test]
    async fn the_client_with_fewest_unfinished_is_served_first() {
        let pool = new_pool(1, LONG);
        let holder = now_or_never(&pool, key(2), 0).unwrap();
        let mut flood = Vec::new();
        for _ in 0..3 {
            flood.push(waiter(&pool, key(9), 0).await);
        }
        let real = waiter(&pool, key(1), 0).await;
        drop(holder);
        let _real = real.await.unwrap();
        assert_eq!(pool.waiting(), 3);
        for task in &flood {
            assert!(!task.is_finished());
        }
    }

    /// A waiter whose deadline has passed is not given a place (it would have no time left to
    /// use it): the next is, and the late one's wait ends with `None`.
    #[tokio::test]
    async fn a_waiter_past_its_deadline_is_passed_over() {
        let pool = new_pool(1, LONG);
        let holder = now_or_never(&pool, key(1), 0).unwrap();
        let patient = waiter(&pool, key(2), 0).await;
        let deadline = Instant::now() + Duration::from_millis(20);
        let mut late = Box::pin(pool.enter(key(3), 0, deadline));
        assert!(late.as_mut().now_or_never().is_none(), "it waits");
        tokio::time::sleep_until(deadline).await;
        // Still listed (its task has not run since), and the newest: passed over all the same.
        assert_eq!(pool.waiting(), 2);
        drop(holder);
        let _patient = patient.await.unwrap();
        assert!(late.await.is_none());
        assert_eq!((pool.occupied(), pool.waiting()), (1, 0));
    }

    /// A client's waiter never sheds its own client's places: that would trade one of its
    /// handshakes for another. Another client's waiter does.
    #[tokio::test]
    async fn a_waiter_does_not_shed_its_own_clients_place() {
        let shed_after = Duration::from_millis(20);
        let pool = new_pool(1, shed_after);
        let slow = now_or_never(&pool, key(9), 0).unwrap();
        tokio::time::sleep(shed_after).await;
        let sibling = waiter(&pool, key(9), 0).await;
        assert!(!slow.token.is_cancelled(), "shed for its own client");
        // Another client's newcomer sheds it at once.
        let other = now_or_never(&pool, key(1), 0).expect("a place for another client");
        assert!(slow.token.is_cancelled() && !other.token.is_cancelled());
        assert_eq!(pool.waiting(), 1);
        sibling.abort();
    }

    /// A client at its share waits even with room in the pool, and is passed over for others
    /// until one of its own places is given up.
    #[tokio::test]
    async fn a_client_at_its_share_waits_for_its_own_place() {
        let pool = new_pool(4, LONG);
        let first = now_or_never(&pool, key(9), 2).unwrap();
        let _second = now_or_never(&pool, key(9), 2).unwrap();
        let third = waiter(&pool, key(9), 2).await;
        assert_eq!((pool.occupied(), pool.waiting()), (2, 1));
        let _other = now_or_never(&pool, key(1), 2).unwrap();
        assert_eq!(pool.occupied(), 3);
        drop(first);
        let _third = third.await.unwrap();
        assert_eq!((pool.occupied(), pool.waiting()), (3, 0));
    }
}
