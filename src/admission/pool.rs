//! The handshake pool: at most `max_handshakes` connections at once in the TLS handshake or
//! waiting for their request, and what happens when it is full.
//!
//! A full pool neither queues nor refuses the newcomer: it sheds the connection that has been
//! handshaking longest. A real client finishes its handshake within a few round trips, so the
//! longest-waiting connections are the ones trickling bytes (slowloris) or stalled; refusing
//! newcomers instead (what wsgate did first) hands the pool to whoever fills it first and keeps it
//! for as long as they trickle, and queueing them makes every real client wait behind them.
//! Shedding the oldest means an attacker must open connections faster than real clients finish
//! their handshakes to push one out, and the per-client limits bound how fast one address may.
//!
//! A connection that has shown progress (its TLS ClientHello arrived whole) is shed only when no
//! connection without any is left: a trickling client never gets that far, and a real client's
//! TLS handshake takes round trips during which a flood of newcomers could otherwise push it out.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio_util::sync::CancellationToken;

/// The pool of one gateway instance, shared by its listeners.
#[derive(Debug)]
pub struct Pool {
    capacity: usize,
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    next: u64,
    /// Members that have shown no progress yet, by arrival: the first is the oldest.
    waiting: BTreeMap<u64, CancellationToken>,
    /// Members that have, by arrival.
    progressed: BTreeMap<u64, CancellationToken>,
}

impl Inner {
    fn len(&self) -> usize {
        self.waiting.len() + self.progressed.len()
    }
}

impl Pool {
    /// A pool of `capacity` places (at least 1).
    pub fn new(capacity: usize) -> Pool {
        Pool { capacity: capacity.max(1), inner: Mutex::default() }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A place for a new connection, and whether an older one was shed to make room (its
    /// [`Place::shed`] fires).
    pub fn enter(self: &Arc<Self>) -> (Place, bool) {
        let mut inner = self.lock();
        let mut shed = false;
        while inner.len() >= self.capacity {
            if let Some((_, oldest)) = inner.waiting.pop_first().or_else(|| inner.progressed.pop_first()) {
                oldest.cancel();
                shed = true;
            }
        }
        let id = inner.next;
        inner.next += 1;
        let token = CancellationToken::new();
        inner.waiting.insert(id, token.clone());
        (Place { id, token, pool: self.clone() }, shed)
    }

    /// Connections in the pool now.
    pub fn occupied(&self) -> usize {
        self.lock().len()
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

    /// Records that the connection has shown progress: it is shed only after every member
    /// that has not.
    pub fn progressed(&self) {
        let mut inner = self.pool.lock();
        if let Some(token) = inner.waiting.remove(&self.id) {
            inner.progressed.insert(self.id, token);
        }
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        let mut inner = self.pool.lock();
        if inner.waiting.remove(&self.id).is_none() {
            inner.progressed.remove(&self.id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_pool_sheds_the_oldest() {
        let pool = Arc::new(Pool::new(2));
        let (a, shed_a) = pool.enter();
        let (b, shed_b) = pool.enter();
        assert!(!shed_a && !shed_b);
        let (c, shed_c) = pool.enter();
        assert!(shed_c);
        assert!(a.token.is_cancelled() && !b.token.is_cancelled() && !c.token.is_cancelled());
        assert_eq!(pool.occupied(), 2);
        // The shed place's drop does not remove its successor.
        drop(a);
        assert_eq!(pool.occupied(), 2);
        drop(b);
        let (_d, shed_d) = pool.enter();
        assert!(!shed_d);
        assert!(!c.token.is_cancelled());
    }

    #[test]
    fn progress_protects_until_only_progressed_members_are_left() {
        let pool = Arc::new(Pool::new(2));
        let (a, _) = pool.enter();
        a.progressed();
        let (b, _) = pool.enter();
        let (c, _) = pool.enter();
        assert!(!a.token.is_cancelled() && b.token.is_cancelled(), "the oldest without progress goes first");
        c.progressed();
        let (_d, _) = pool.enter();
        assert!(a.token.is_cancelled() && !c.token.is_cancelled(), "then the oldest with progress");
        drop(c);
        assert_eq!(pool.occupied(), 1);
    }
}
