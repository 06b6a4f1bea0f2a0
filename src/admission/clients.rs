//! Per-client accounting: the connections each client holds, and a token bucket of new
//! connections, in one table that many or spoofed addresses cannot grow
//! without bound.
//!
//! A client is an address as [`ClientKey`] normalises it: IPv4-mapped IPv6 as the IPv4 address,
//! other IPv6 addresses by their prefix (a host is usually given a whole /64, so counting single
//! IPv6 addresses would let one host count as billions). An entry lives while its client has a
//! connection open or its bucket is still refilling; the table sweeps finished entries when it
//! reaches its size, and forgets idle ones (their bucket state with them) if that is not enough.
//! Entries with open connections are never dropped, and there are at most `max_connections` of
//! those, so the table holds at most `max(max_tracked, max_connections)` entries.
//!
//! The same entries hold the brute-force guard of the access policy (`auth`): failed credential
//! checks are counted in a fixed window (`auth_failure_window_secs`, from the first failure);
//! the failure that reaches `max_auth_failures` blocks the client for `auth_block_secs`, during
//! which every request to a route with `auth` is answered 429 before anything is checked. A
//! success does not clear the count: otherwise one valid credential, presented between guesses,
//! would let its holder guess at others' without end. A fixed block, not a growing one: a client that keeps guessing gets
//! at most `max_auth_failures` guesses per block, which already makes guessing hopeless, and an
//! operator can tell a user how long to wait. A full table forgets blocked entries of idle
//! clients last, after every other idle entry.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::config::PerClient;

/// A client as the limits count it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ClientKey(IpAddr);

impl ClientKey {
    /// The key for `ip`: IPv4-mapped and NAT64 IPv6 as the IPv4 address they carry; other IPv6
    /// masked to `ipv6_prefix` bits.
    pub fn new(ip: IpAddr, ipv6_prefix: u8) -> ClientKey {
        match crate::config::canonical_ip(ip) {
            IpAddr::V4(v4) => ClientKey(IpAddr::V4(v4)),
            IpAddr::V6(v6) => {
                let bits = u128::from(v6);
                let mask = u128::MAX.checked_shl(128 - u32::from(ipv6_prefix)).unwrap_or(0);
                ClientKey(IpAddr::V6((bits & mask).into()))
            }
        }
    }
}

/// Why a client's new connection is answered 429 once its request is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Over {
    /// It opens connections faster than its rate; its bucket holds a token again at `due`.
    Rate {
        /// When the next token is due.
        due: Instant,
    },
}

/// Why a client's new connection is closed at accept, before anything is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Closed {
    /// It has `max_connections` open.
    Connections(usize),
}

/// What the table decided for a new connection. The lease counts until it is dropped.
pub enum Verdict {
    /// Served: a place in the handshake pool follows.
    Admitted(ConnectionLease),
    /// Over its rate: answered 429 once its request is read (it takes its turn in the handshake
    /// pool like any other, so its TLS handshake counts in its client's share).
    Refused(ConnectionLease, Over),
    /// Closed at accept.
    Closed(Closed),
}

#[derive(Debug)]
struct Entry {
    connections: usize,
    tokens: f64,
    refilled: Instant,
    /// Failed credential checks since the window began.
    auth_failures: usize,
    /// When the failure window ends (failures then count from zero).
    auth_window_ends: Instant,
    /// Refused without checking until then.
    auth_blocked_until: Option<Instant>,
}

impl Entry {
    /// The bucket refilled to `now`.
    fn refill(&mut self, now: Instant, rate: f64, burst: f64) {
        let elapsed = now.saturating_duration_since(self.refilled).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate).min(burst);
        self.refilled = now;
    }

    fn is_idle(&self) -> bool {
        self.connections == 0
    }

    /// Whether the guard still remembers something of this client at `now`.
    fn has_auth_state(&self, now: Instant) -> bool {
        self.auth_blocked_until.is_some_and(|until| until > now)
            || (self.auth_failures > 0 && self.auth_window_ends > now)
    }

    fn new(tokens: f64, now: Instant) -> Entry {
        Entry {
            connections: 0,
            tokens,
            refilled: now,
            auth_failures: 0,
            auth_window_ends: now,
            auth_blocked_until: None,
        }
    }
}

/// The table of clients, shared by every listener of a gateway and kept across reloads (the
/// limits it applies come with each call, from the config in force).
#[derive(Debug, Default)]
pub struct Clients {
    entries: Mutex<HashMap<ClientKey, Entry>>,
}

impl Clients {
    fn lock(&self) -> MutexGuard<'_, HashMap<ClientKey, Entry>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts a new connection from `ip` under `limits`, or says which limit it is over.
    pub fn admit(self: &Arc<Self>, ip: IpAddr, limits: &PerClient, now: Instant) -> Verdict {
        let key = ClientKey::new(ip, limits.ipv6_prefix);
        let (rate, burst) = (limits.new_connections_per_sec, limits.new_connections_burst as f64);
        let mut entries = self.lock();
        if !entries.contains_key(&key) && entries.len() >= limits.max_tracked {
            sweep(&mut entries, now, rate, burst);
        }
        let entry = entries.entry(key).or_insert_with(|| Entry::new(burst, now));
        if limits.max_connections > 0 && entry.connections >= limits.max_connections {
            return Verdict::Closed(Closed::Connections(limits.max_connections));
        }
        entry.connections += 1;
        let lease = ConnectionLease { key, clients: self.clone() };
        if rate > 0.0 {
            entry.refill(now, rate, burst);
            if entry.tokens < 1.0 {
                // At most a day away: a rate this low is refused by the config anyway.
                let wait = Duration::try_from_secs_f64((1.0 - entry.tokens) / rate).unwrap_or(Duration::MAX);
                let due = now.checked_add(wait.min(Duration::from_secs(86_400))).unwrap_or(now);
                return Verdict::Refused(lease, Over::Rate { due });
            }
            entry.tokens -= 1.0;
        }
        Verdict::Admitted(lease)
    }

    /// When the brute-force guard refuses `ip` until, if it does at `now`.
    pub fn auth_blocked(&self, ip: IpAddr, limits: &PerClient, now: Instant) -> Option<Instant> {
        if limits.max_auth_failures == 0 {
            return None;
        }
        let entries = self.lock();
        let until = entries.get(&ClientKey::new(ip, limits.ipv6_prefix))?.auth_blocked_until?;
        (until > now).then_some(until)
    }

    /// Counts a failed credential check of `ip`; returns when its block ends if this failure
    /// started one.
    pub fn auth_failed(&self, ip: IpAddr, limits: &PerClient, now: Instant) -> Option<Instant> {
        if limits.max_auth_failures == 0 {
            return None;
        }
        let key = ClientKey::new(ip, limits.ipv6_prefix);
        let burst = limits.new_connections_burst as f64;
        let mut entries = self.lock();
        if !entries.contains_key(&key) && entries.len() >= limits.max_tracked {
            sweep(&mut entries, now, limits.new_connections_per_sec, burst);
        }
        let entry = entries.entry(key).or_insert_with(|| Entry::new(burst, now));
        // A check that ends during a block was begun before it (blocked clients are not
        // checked): its answer is already 429, and counting it would start a second block.
        if entry.auth_blocked_until.is_some_and(|until| until > now) {
            return None;
        }
        if entry.auth_window_ends <= now {
            entry.auth_failures = 0;
            entry.auth_window_ends = now + limits.auth_failure_window;
        }
        entry.auth_failures += 1;
        if entry.auth_failures < limits.max_auth_failures {
            return None;
        }
        let until = now + limits.auth_block;
        entry.auth_blocked_until = Some(until);
        entry.auth_failures = 0;
        entry.auth_window_ends = until;
        Some(until)
    }

    /// Clients in the table.
    pub fn tracked(&self) -> usize {
        self.lock().len()
    }

    fn release(&self, key: ClientKey) {
        if let Some(entry) = self.lock().get_mut(&key) {
            entry.connections = entry.connections.saturating_sub(1);
        }
    }
}

/// Makes room in a full table: drops the idle entries whose bucket is full again (nothing is
/// forgotten), and if none were, every idle entry (their partly spent buckets are forgotten,
/// which favours those clients a little, once).
fn sweep(entries: &mut HashMap<ClientKey, Entry>, now: Instant, rate: f64, burst: f64) {
    let before = entries.len();
    entries.retain(|_, e| {
        e.refill(now, rate, burst);
        !(e.is_idle() && (rate == 0.0 || e.tokens >= burst) && !e.has_auth_state(now))
    });
    if entries.len() == before {
        entries.retain(|_, e| !e.is_idle() || e.has_auth_state(now));
    }
    if entries.len() == before {
        entries.retain(|_, e| !e.is_idle());
    }
}

/// One open connection of a client; dropped when the socket closes (through the session).
#[derive(Debug)]
pub struct ConnectionLease {
    key: ClientKey,
    clients: Arc<Clients>,
}

impl ConnectionLease {
    /// The client whose connection this is.
    pub fn client(&self) -> ClientKey {
        self.key
    }
}

impl Drop for ConnectionLease {
    fn drop(&mut self) {
        self.clients.release(self.key);
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use super::*;

    fn limits() -> PerClient {
        PerClient {
            max_connections: 3,
            max_handshakes: 2,
            new_connections_per_sec: 1.0,
            new_connections_burst: 4,
            ipv6_prefix: 64,
            max_tracked: 4,
            max_auth_failures: 3,
            auth_failure_window: Duration::from_secs(60),
            auth_block: Duration::from_secs(30),
        }
    }

    /// The failure that reaches the limit within the window blocks the client for the block
    /// time, other clients stay unblocked, and old failures expire.
    #[test]
    fn brute_force_guard_blocks_after_failures_in_the_window() {
        let clients = Arc::new(Clients::default());
        let l = limits();
        let t0 = Instant::now();
        let guesser = ip("10.0.0.1");
        assert_eq!(clients.auth_failed(guesser, &l, t0), None);
        assert_eq!(clients.auth_failed(guesser, &l, t0), None);
        assert_eq!(clients.auth_blocked(guesser, &l, t0), None);
        assert_eq!(clients.auth_failed(guesser, &l, t0), Some(t0 + Duration::from_secs(30)));
        // Checks begun before the block and ending in it start no second block, however many.
        for _ in 0..6 {
            assert_eq!(clients.auth_failed(guesser, &l, t0 + Duration::from_secs(1)), None);
        }
        assert_eq!(clients.auth_blocked(guesser, &l, t0 + Duration::from_secs(29)), Some(t0 + Duration::from_secs(30)));
        assert_eq!(clients.auth_blocked(ip("10.0.0.2"), &l, t0), None);
        assert_eq!(clients.auth_blocked(guesser, &l, t0 + Duration::from_secs(30)), None);
        // Failures spread wider than the window never add up.
        let other = ip("10.0.0.3");
        for i in 0..6 {
            assert_eq!(clients.auth_failed(other, &l, t0 + Duration::from_secs(40 * i)), None, "failure {i}");
        }
        let off = PerClient { max_auth_failures: 0, ..l };
        for _ in 0..10 {
            assert_eq!(clients.auth_failed(ip("10.0.0.4"), &off, t0), None);
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn keys_normalise_mapped_and_ipv6_prefixes() {
        let mapped: IpAddr = Ipv4Addr::new(192, 0, 2, 1).to_ipv6_mapped().into();
        assert_eq!(ClientKey::new(mapped, 64), ClientKey::new(ip("192.0.2.1"), 64));
        // IPv4 clients behind a NAT64 gateway are counted one by one, not as one /64.
        assert_eq!(ClientKey::new(ip("64:ff9b::192.0.2.1"), 64), ClientKey::new(ip("192.0.2.1"), 64));
        assert_ne!(ClientKey::new(ip("64:ff9b::192.0.2.1"), 64), ClientKey::new(ip("64:ff9b::192.0.2.2"), 64));
        assert_eq!(ClientKey::new(ip("2001:db8:1:2:aaaa::1"), 64), ClientKey::new(ip("2001:db8:1:2::ffff"), 64));
        assert_ne!(ClientKey::new(ip("2001:db8:1:2::1"), 64), ClientKey::new(ip("2001:db8:1:3::1"), 64));
        assert_eq!(ClientKey::new(ip("2001:db8:1:2::1"), 48), ClientKey::new(ip("2001:db8:1:3::1"), 48));
        assert_eq!(ClientKey::new(ip("2001:db8::1"), 128), ClientKey(ip("2001:db8::1")));
        assert_eq!(ClientKey::new(IpAddr::V6(Ipv6Addr::LOCALHOST), 64), ClientKey(ip("::")));
    }

    #[test]
    fn connection_cap_closes_and_frees_on_drop() {
        let clients = Arc::new(Clients::default());
        let l = PerClient { new_connections_per_sec: 0.0, max_handshakes: 0, ..limits() };
        let now = Instant::now();
        let held: Vec<_> = (0..3).map(|_| clients.admit(ip("10.0.0.1"), &l, now)).collect();
        assert!(held.iter().all(|v| matches!(v, Verdict::Admitted(..))));
        assert!(matches!(clients.admit(ip("10.0.0.1"), &l, now), Verdict::Closed(Closed::Connections(3))));
        assert!(matches!(clients.admit(ip("10.0.0.2"), &l, now), Verdict::Admitted(..)));
        drop(held);
        assert!(matches!(clients.admit(ip("10.0.0.1"), &l, now), Verdict::Admitted(..)));
    }

    #[test]
    fn rate_refuses_after_the_burst_with_the_time_to_the_next_token() {
        let clients = Arc::new(Clients::default());
        let l = PerClient { max_connections: 0, max_handshakes: 0, ..limits() };
        let t0 = Instant::now();
        for _ in 0..4 {
            assert!(matches!(clients.admit(ip("10.0.0.1"), &l, t0), Verdict::Admitted(..)));
        }
        match clients.admit(ip("10.0.0.1"), &l, t0) {
            Verdict::Refused(_, Over::Rate { due }) => assert_eq!(due - t0, Duration::from_secs(1)),
            _ => panic!("fifth connection in the same instant was not refused for rate"),
        }
        let later = t0 + Duration::from_millis(1500);
        assert!(matches!(clients.admit(ip("10.0.0.1"), &l, later), Verdict::Admitted(..)));
        match clients.admit(ip("10.0.0.1"), &l, later) {
            Verdict::Refused(_, Over::Rate { due }) => assert_eq!(due - later, Duration::from_millis(500)),
            _ => panic!("refill gave more than one token in 1.5 s"),
        }
    }

    /// Many addresses (spoofed or a botnet's) do not grow the table past its size while their
    /// connections are closed, and clients with open connections are never forgotten.
    #[test]
    fn the_table_stays_bounded() {
        let clients = Arc::new(Clients::default());
        let l = limits();
        let now = Instant::now();
        let open = clients.admit(ip("10.9.9.9"), &l, now);
        for i in 0..1000u32 {
            let v = clients.admit(IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i)), &l, now);
            drop(v);
            assert!(clients.tracked() <= 4, "{} entries after {i}", clients.tracked());
        }
        let entries = clients.lock();
        assert_eq!(entries.get(&ClientKey::new(ip("10.9.9.9"), 64)).map(|e| e.connections), Some(1));
        drop(entries);
        drop(open);
    }
}
