//! The handshake pool: at most `max_handshakes` connections at once in the TLS handshake or
//! waiting for their request, and what happens when it is full.
//!
//! A full pool neither queues nor refuses the newcomer: it sheds a connection that has been
//! handshaking a long time, taken from the client that holds the most places. A real client
//! finishes its handshake within a few round trips and holds one or two places, so the ones shed
//! are those trickling bytes (slowloris) or stalled, from the addresses that hold many. Refusing
//! newcomers instead (what wsgate did first) hands the pool to whoever fills it first and keeps it
//! for as long as they trickle, and queueing them makes every real client wait behind them.
//!
//! Among the places of that client, one that has shown no progress goes first (its TLS
//! ClientHello has not arrived whole), then the oldest. Taking the victim from the client with
//! the most places means an attacker who wants to push out a real client's handshake must hold
//! no more places per address than that client does: with the per-client share (32 by default)
//! bounding how many one address may hold, that takes as many addresses as the pool has places.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio_util::sync::CancellationToken;

use super::ClientKey;

/// The pool of one gateway instance, shared by its listeners.
#[derive(Debug)]
pub struct Pool {
    capacity: usize,
    inner: Mutex<Inner>,
    /// `wsgate_handshakes_in_progress`, set under the lock so that it is never stale.
    occupancy: metrics::Gauge,
}

#[derive(Debug)]
struct Member {
    client: ClientKey,
    token: CancellationToken,
    progressed: bool,
}

#[derive(Debug, Default)]
struct Inner {
    next: u64,
    /// Members by arrival: the first is the oldest.
    members: BTreeMap<u64, Member>,
    /// Places held per client.
    held: HashMap<ClientKey, usize>,
}

impl Inner {
    fn insert(&mut self, id: u64, member: Member) {
        *self.held.entry(member.client).or_default() += 1;
        self.members.insert(id, member);
    }

    fn remove(&mut self, id: u64) -> Option<Member> {
        let member = self.members.remove(&id)?;
        if let Some(n) = self.held.get_mut(&member.client) {
            *n -= 1;
            if *n == 0 {
                self.held.remove(&member.client);
            }
        }
        Some(member)
    }

    /// The member to shed: of the client holding the most places, the oldest without progress,
    /// or else its oldest.
    fn victim(&self) -> Option<u64> {
        let most = self.held.values().copied().max()?;
        let theirs = || self.members.iter().filter(|(_, m)| self.held.get(&m.client) == Some(&most));
        theirs().find(|(_, m)| !m.progressed).or_else(|| theirs().next()).map(|(id, _)| *id)
    }
}

impl Pool {
    /// A pool of `capacity` places (at least 1).
    pub fn new(capacity: usize, occupancy: metrics::Gauge) -> Pool {
        Pool { capacity: capacity.max(1), inner: Mutex::default(), occupancy }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A place for a new connection from `client`, and whether another was shed to make room
    /// (its [`Place::token`] is cancelled).
    pub fn enter(self: &Arc<Self>, client: ClientKey) -> (Place, bool) {
        let mut inner = self.lock();
        let mut shed = false;
        while inner.members.len() >= self.capacity {
            let Some(id) = inner.victim() else { break };
            if let Some(member) = inner.remove(id) {
                member.token.cancel();
                shed = true;
            }
        }
        let id = inner.next;
        inner.next += 1;
        let token = CancellationToken::new();
        inner.insert(id, Member { client, token: token.clone(), progressed: false });
        self.occupancy.set(inner.members.len() as f64);
        (Place { id, token, pool: self.clone() }, shed)
    }

    /// Connections in the pool now.
    pub fn occupied(&self) -> usize {
        self.lock().members.len()
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
    /// Cancelled when the pool sheds this connection to make room for a newer one.
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
        inner.remove(self.id);
        self.pool.occupancy.set(inner.members.len() as f64);
    }
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use super::*;

    fn key(last: u8) -> ClientKey {
        ClientKey::new(IpAddr::from([10, 0, 0, last]), 64)
    }

    #[test]
    fn a_full_pool_sheds_the_oldest() {
        let pool = Arc::new(Pool::new(2, metrics::Gauge::noop()));
        let (a, shed_a) = pool.enter(key(1));
        let (b, shed_b) = pool.enter(key(2));
        assert!(!shed_a && !shed_b);
        let (c, shed_c) = pool.enter(key(3));
        assert!(shed_c);
        assert!(a.token.is_cancelled() && !b.token.is_cancelled() && !c.token.is_cancelled());
        assert_eq!(pool.occupied(), 2);
        // The shed place's drop does not remove its successor.
        drop(a);
        assert_eq!(pool.occupied(), 2);
        drop(b);
        let (_d, shed_d) = pool.enter(key(4));
        assert!(!shed_d);
        assert!(!c.token.is_cancelled());
    }

    /// The client holding the most places loses one, its oldest without progress first, however
    /// old another client's single place is.
    #[test]
    fn the_client_holding_most_loses_first() {
        let pool = Arc::new(Pool::new(4, metrics::Gauge::noop()));
        let (real, _) = pool.enter(key(1));
        let attacker: Vec<_> = (0..3).map(|_| pool.enter(key(9)).0).collect();
        attacker[0].progressed();
        let (_next, shed) = pool.enter(key(9));
        assert!(shed && !real.token.is_cancelled());
        assert!(!attacker[0].token.is_cancelled() && attacker[1].token.is_cancelled());
        assert_eq!(pool.occupied(), 4);

        // Progress protects a place only among its client's own.
        let pool = Arc::new(Pool::new(3, metrics::Gauge::noop()));
        let (real, _) = pool.enter(key(1));
        let attacker: Vec<_> = (0..2).map(|_| pool.enter(key(9)).0).collect();
        attacker.iter().for_each(Place::progressed);
        let (_next, _) = pool.enter(key(9));
        assert!(attacker[0].token.is_cancelled() && !attacker[1].token.is_cancelled());
        assert!(!real.token.is_cancelled());
    }
}
