//! A route with several backends: which member a session goes to (round robin, least sessions
//! or a consistent hash of the client's address, all weighted), failing over to the next one
//! within the route's connect timeout, and each member's health and session count.
//!
//! A [`Pool`] belongs to one config snapshot; a member's [`MemberState`] (up or down, sessions
//! open, consecutive failures) belongs to the gateway and is found again by (route, name) at
//! each reload ([`Pools`]), so a reload changes weights, caps and drains without forgetting
//! who is down or how many sessions each holds. The health task (`health`) checks the members
//! of the pools last published.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::watch;
use tracing::{info, warn};

use super::{BackendConn, BackendError, Settings};
use crate::config::{self, Balance, ProxyVersion};
use crate::metrics::{BackendMetrics, Metrics};

/// The members' states of every pool of a gateway, kept across reloads, and the pools the
/// health task checks.
pub struct Pools {
    metrics: Arc<Metrics>,
    states: Mutex<HashMap<(String, String), Arc<MemberState>>>,
    published: watch::Sender<Vec<Arc<Pool>>>,
}

impl std::fmt::Debug for Pools {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pools").finish_non_exhaustive()
    }
}

impl Pools {
    /// No pools yet; members' metrics are recorded into `metrics`.
    pub fn new(metrics: Arc<Metrics>) -> Pools {
        Pools { metrics, states: Mutex::default(), published: watch::Sender::new(Vec::new()) }
    }

    /// The pool of route `route` as configured, its members' states found by name (new
    /// members start up).
    pub fn build(&self, route: &config::Route, pool: &config::Pool) -> Arc<Pool> {
        let mut states = self.states.lock().unwrap_or_else(|p| p.into_inner());
        let members = pool
            .members
            .iter()
            .map(|m| {
                let state = states
                    .entry((route.name.clone(), m.name.clone()))
                    .or_insert_with(|| Arc::new(MemberState::new(self.metrics.backend(&route.name, &m.name))))
                    .clone();
                Slot { config: m.clone(), state }
            })
            .collect::<Vec<_>>();
        Arc::new(Pool {
            route: route.name.clone(),
            balance: pool.balance,
            schedule: schedule(&pool.members),
            // Only client hashing walks a ring; the others would pay for building it at every reload.
            ring: if pool.balance == Balance::ClientHash { Ring::new(&pool.members) } else { Ring::default() },
            next: AtomicUsize::new(0),
            health: pool.health.clone(),
            proxy: route.proxy_protocol,
            members,
        })
    }

    /// Hands the pools of the snapshot now in force to the health task, and their members to
    /// the metrics: a member no longer in any pool leaves the scrapes.
    pub fn publish(&self, pools: Vec<Arc<Pool>>) {
        let in_force = pools
            .iter()
            .flat_map(|pool| pool.members.iter().map(|m| (pool.route.clone(), m.config.name.clone())))
            .collect();
        self.metrics.scrape_only_backends(in_force);
        self.published.send_replace(pools);
    }

    /// The pools published, now and after each reload.
    pub(super) fn subscribe(&self) -> watch::Receiver<Vec<Arc<Pool>>> {
        self.published.subscribe()
    }
}

/// One route's pool under one config snapshot.
#[derive(Debug)]
pub struct Pool {
    pub(super) route: String,
    balance: Balance,
    pub(super) members: Vec<Slot>,
    /// Round robin's turns: member indices, each as often as its weight, interleaved.
    schedule: Vec<usize>,
    ring: Ring,
    /// The next turn (round robin), or where ties start (least sessions).
    next: AtomicUsize,
    pub(super) health: config::Health,
    /// The PROXY protocol the route sends, so health checks can announce themselves.
    pub(super) proxy: Option<ProxyVersion>,
}

/// A member as configured, with its state.
#[derive(Debug)]
pub(super) struct Slot {
    pub(super) config: config::Member,
    pub(super) state: Arc<MemberState>,
}

/// A member's health and load, kept across reloads.
#[derive(Debug)]
pub struct MemberState {
    up: AtomicBool,
    sessions: AtomicUsize,
    /// Consecutive failed connects of sessions.
    failures: AtomicU32,
    checks: Mutex<Checks>,
    metrics: BackendMetrics,
}

#[derive(Debug, Default)]
struct Checks {
    /// Consecutive passed and failed active checks.
    passed: u32,
    failed: u32,
    /// When failed connects last took the member out.
    ejected_at: Option<Instant>,
}

/// A session's place on its member: the member counts it until dropped.
#[derive(Debug)]
pub struct Hold {
    state: Arc<MemberState>,
}

impl Drop for Hold {
    fn drop(&mut self) {
        self.state.sessions.fetch_sub(1, Ordering::AcqRel);
        self.state.metrics.sessions.decrement(1.0);
    }
}

impl MemberState {
    fn new(metrics: BackendMetrics) -> MemberState {
        metrics.up.set(1.0);
        MemberState {
            up: AtomicBool::new(true),
            sessions: AtomicUsize::new(0),
            failures: AtomicU32::new(0),
            checks: Mutex::default(),
            metrics,
        }
    }

    /// Whether it takes new sessions by its health. Without active checks an ejected member
    /// is tried again once `eject_for` has passed.
    fn usable(&self, health: &config::Health, route: &str, name: &str) -> bool {
        if self.up.load(Ordering::Acquire) {
            return true;
        }
        if health.active.is_some() {
            return false;
        }
        let mut checks = self.checks.lock().unwrap_or_else(|p| p.into_inner());
        if checks.ejected_at.is_some_and(|at| at.elapsed() >= health.eject_for) {
            checks.ejected_at = None;
            self.failures.store(0, Ordering::Release);
            self.set_up(true);
            info!(route, backend = name, "backend back in rotation after its ejection time");
        }
        self.up.load(Ordering::Acquire)
    }

    /// A place among its sessions if it has fewer than `cap`.
    fn take(self: &Arc<Self>, cap: Option<usize>) -> Option<Hold> {
        let cap = cap.unwrap_or(usize::MAX);
        self.sessions.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < cap).then_some(n + 1)).ok()?;
        self.metrics.sessions.increment(1.0);
        Some(Hold { state: self.clone() })
    }

    fn connected(&self) {
        self.metrics.sessions_total.increment(1);
        if self.failures.load(Ordering::Acquire) != 0 {
            self.failures.store(0, Ordering::Release);
        }
    }

    /// A session's connect failed: after `eject_after_failures` in a row the member is out.
    fn connect_failed(&self, health: &config::Health, route: &str, name: &str, error: &BackendError) {
        self.metrics.failed_connects.increment(1);
        let n = self.failures.fetch_add(1, Ordering::AcqRel) + 1;
        if health.eject_after_failures == 0 || n < health.eject_after_failures {
            return;
        }
        let mut checks = self.checks.lock().unwrap_or_else(|p| p.into_inner());
        if self.up.load(Ordering::Acquire) {
            checks.passed = 0;
            checks.ejected_at = Some(Instant::now());
            self.set_up(false);
            warn!(route, backend = name, failures = n, %error, "backend ejected after failed connects");
        }
    }

    /// The result of one active check: `rise` passes in a row bring a member up, `fall`
    /// failures in a row take it down.
    pub(super) fn checked(&self, passed: bool, check: &config::ActiveCheck, route: &str, name: &str, why: &str) {
        let mut checks = self.checks.lock().unwrap_or_else(|p| p.into_inner());
        let up = self.up.load(Ordering::Acquire);
        if passed {
            checks.failed = 0;
            checks.passed = checks.passed.saturating_add(1);
            if !up && checks.passed >= check.rise {
                checks.ejected_at = None;
                self.failures.store(0, Ordering::Release);
                self.set_up(true);
                info!(route, backend = name, passed = checks.passed, "backend up: health checks pass");
            }
        } else {
            checks.passed = 0;
            checks.failed = checks.failed.saturating_add(1);
            if up && checks.failed >= check.fall {
                // So that, if a reload turns active checks off, it is retried after
                // `eject_secs` as an ejected member is, rather than left down for good.
                checks.ejected_at = Some(Instant::now());
                self.set_up(false);
                warn!(route, backend = name, failed = checks.failed, reason = why, "backend down: health checks fail");
            }
        }
    }

    fn set_up(&self, up: bool) {
        self.up.store(up, Ordering::Release);
        self.metrics.up.set(if up { 1.0 } else { 0.0 });
    }

    /// Whether it takes new sessions by its health.
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }
}

impl Pool {
    /// Connects a member for a session from `client`: the members in the policy's order of
    /// preference, skipping those down, drained or at their cap, each tried in turn until one
    /// connects or the route's connect timeout has passed since the first try. Each try gets an
    /// even share of the time left among the members still to try, so a member that never
    /// answers (a host powered off) cannot take the whole timeout from the others.
    pub(super) async fn connect(
        &self,
        settings: &Settings,
        client: IpAddr,
        preamble: &[u8],
    ) -> Result<(BackendConn, Hold), BackendError> {
        let deadline = tokio::time::Instant::now() + settings.timeout;
        let order = self.order(client);
        let mut last = None;
        for (n, &i) in order.iter().enumerate() {
            let slot = &self.members[i];
            if !slot.config.in_rotation() || !slot.state.usable(&self.health, &self.route, &slot.config.name) {
                continue;
            }
            let Some(hold) = slot.state.take(slot.config.max_sessions) else { continue };
            let now = tokio::time::Instant::now();
            let left = order[n..].iter().filter(|&&j| self.members[j].config.in_rotation()).count().max(1);
            let share = deadline.saturating_duration_since(now) / left as u32;
            let (host, port) = (slot.config.host.as_str(), slot.config.port);
            let error = match tokio::time::timeout(share, settings.connect(host, port, preamble)).await {
                Ok(Ok(stream)) => {
                    slot.state.connected();
                    return Ok((stream, hold));
                }
                Ok(Err(e)) => e,
                Err(_) => BackendError::Timeout { target: slot.config.to_string(), after: share },
            };
            slot.state.connect_failed(&self.health, &self.route, &slot.config.name, &error);
            last = Some(error);
            if tokio::time::Instant::now() >= deadline {
                break;
            }
        }
        Err(last.unwrap_or_else(|| BackendError::NoBackend { route: self.route.clone() }))
    }

    /// Every member's index, in the order a session from `client` should try them.
    fn order(&self, client: IpAddr) -> Vec<usize> {
        let n = self.members.len();
        match self.balance {
            Balance::RoundRobin => {
                let len = self.schedule.len().max(1);
                let start = self.next.fetch_add(1, Ordering::Relaxed) % len;
                let turns = self.schedule.iter().cycle().skip(start).take(len).copied();
                // Members without a turn (weight 0) come last: they are skipped anyway.
                let mut order = Vec::with_capacity(n);
                for i in turns.chain(0..n) {
                    if !order.contains(&i) {
                        order.push(i);
                    }
                }
                order
            }
            Balance::LeastSessions => {
                let start = self.next.fetch_add(1, Ordering::Relaxed) % n;
                let mut order: Vec<usize> = (0..n).map(|k| (start + k) % n).collect();
                let load = |i: usize| {
                    let m = &self.members[i];
                    (m.state.sessions.load(Ordering::Acquire) as u64, u64::from(m.config.weight.max(1)))
                };
                // a/wa < b/wb without division; the sort is stable, so ties keep the rotation.
                order.sort_by(|&a, &b| {
                    let ((sa, wa), (sb, wb)) = (load(a), load(b));
                    (sa * wb).cmp(&(sb * wa))
                });
                order
            }
            Balance::ClientHash => self.ring.walk(client_key(client), n),
        }
    }
}

/// A member's share of new sessions: none while drained.
fn share(m: &config::Member) -> u32 {
    if m.in_rotation() { m.weight } else { 0 }
}

/// Round robin's turns: smooth weighted round robin (nginx's), so a member of weight 3 beside
/// two of weight 1 gets a, b, a, c, a rather than a, a, a, b, c. Drained members get no turn,
/// so the others share evenly.
fn schedule(members: &[config::Member]) -> Vec<usize> {
    let weights: Vec<i64> = members.iter().map(|m| i64::from(share(m))).collect();
    let total: i64 = weights.iter().sum();
    let mut current = vec![0i64; members.len()];
    let mut turns = Vec::with_capacity(usize::try_from(total).unwrap_or(0));
    for _ in 0..total {
        for (c, w) in current.iter_mut().zip(&weights) {
            *c += w;
        }
        let Some(best) = (0..members.len()).max_by_key(|&i| (current[i], std::cmp::Reverse(i))) else { break };
        current[best] -= total;
        turns.push(best);
    }
    turns
}

/// What a client is hashed by: its IPv4 address, or its IPv6 /64 (one host's privacy
/// addresses change within it); an IPv4-mapped IPv6 address is the IPv4 one. Never the port.
pub fn client_key(ip: IpAddr) -> u64 {
    match ip {
        IpAddr::V4(v4) => mix(u64::from(u32::from(v4)) | 4 << 32),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => client_key(IpAddr::V4(v4)),
            None => mix(u64::from_be_bytes(v6.octets()[..8].try_into().unwrap_or_default()) ^ 6),
        },
    }
}

/// Points on the ring per unit of weight: enough that each member's share stays within a few
/// percent of its weight's.
const POINTS_PER_WEIGHT: u32 = 160;

/// The most points a ring holds: large pools with large weights get fewer points per unit of
/// weight (at least one), so a reload builds the ring in milliseconds and it stays small.
const MAX_POINTS: u32 = 65_536;

/// A consistent-hash ring (ketama-like): each member owns points derived from its name, so a
/// member added takes keys only from the others in proportion to its weight, and one removed
/// gives back only its own keys.
#[derive(Debug, Default)]
pub struct Ring {
    /// (point, member index), sorted by point.
    points: Vec<(u64, usize)>,
    /// How many members own points: a walk has met them all once it has met this many.
    owners: usize,
}

impl Ring {
    /// The ring of `members`, each with `weight × 160` points, fewer per unit of weight when
    /// that would pass [`MAX_POINTS`] (none while drained, so draining one moves only its own
    /// clients). A member's points are the first of one fixed sequence, so a change of the
    /// count per unit keeps most of them where they were.
    pub fn new(members: &[config::Member]) -> Ring {
        let total: u32 = members.iter().map(share).sum();
        let per_weight = (MAX_POINTS / total.max(1)).clamp(1, POINTS_PER_WEIGHT);
        let mut points = Vec::new();
        for (i, m) in members.iter().enumerate() {
            for p in 0..share(m) * per_weight {
                points.push((mix(fnv1a(m.name.as_bytes()) ^ u64::from(p).wrapping_mul(0x9e37_79b9_7f4a_7c15)), i));
            }
        }
        points.sort_unstable();
        let owners = members.iter().filter(|m| share(m) > 0).count();
        Ring { points, owners }
    }

    /// The members in the order a key meets them going round from its point (each once),
    /// then those without points.
    pub fn walk(&self, key: u64, n: usize) -> Vec<usize> {
        let mut order = Vec::with_capacity(n);
        let mut met = vec![false; n];
        let start = self.points.partition_point(|&(p, _)| p < key);
        let around = self.points[start..].iter().chain(&self.points[..start]);
        // Stops once every member with points has been met: the walk is as long as the ring
        // only when one member holds nearly all of it.
        for &(_, i) in around {
            if order.len() == self.owners {
                break;
            }
            if !met[i] {
                met[i] = true;
                order.push(i);
            }
        }
        order.extend((0..n).filter(|&i| !met[i]));
        order
    }
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

/// splitmix64's finaliser: spreads nearby inputs (consecutive addresses, point numbers) over
/// the whole ring.
fn mix(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(name: &str, weight: u32) -> config::Member {
        config::Member { name: name.into(), host: "h".into(), port: 1, weight, max_sessions: None, drain: false }
    }

    fn owner(ring: &Ring, members: &[config::Member], key: u64) -> String {
        members[ring.walk(key, members.len())[0]].name.clone()
    }

    fn keys() -> Vec<u64> {
        (0..1000u32).map(|i| client_key(IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + i)))).collect()
    }

    /// A member active checks took down, under a config that then turns them off, is tried
    /// again after `eject_secs` as an ejected one is, not left down for good.
    #[test]
    fn a_member_down_by_checks_is_retried_once_checks_are_off() {
        let state = MemberState::new(Metrics::new(false).backend("r", "m"));
        let check = config::ActiveCheck {
            interval: std::time::Duration::from_secs(1),
            timeout: std::time::Duration::from_secs(1),
            rise: 2,
            fall: 2,
            send: Vec::new(),
            expect: None,
        };
        let active = config::Health {
            active: Some(check.clone()),
            eject_after_failures: 3,
            eject_for: std::time::Duration::ZERO,
        };
        state.checked(false, &check, "r", "m", "refused");
        state.checked(false, &check, "r", "m", "refused");
        assert!(!state.usable(&active, "r", "m"), "down by its checks");
        let passive = config::Health { active: None, ..active };
        assert!(state.usable(&passive, "r", "m"), "retried once checks are off");
    }

    /// Adding a fourth member moves at most 35 % of 1,000 clients (its fair share is 25 %), all
    /// of them to the new member; removing one moves only the clients it had.
    #[test]
    fn the_ring_moves_few_clients() {
        let three = vec![member("a", 1), member("b", 1), member("c", 1)];
        let mut four = three.clone();
        four.push(member("d", 1));
        let (r3, r4) = (Ring::new(&three), Ring::new(&four));
        let keys = keys();
        let mut moved = 0;
        for &k in &keys {
            let (before, after) = (owner(&r3, &three, k), owner(&r4, &four, k));
            if before != after {
                assert_eq!(after, "d", "a client moved between old members");
                moved += 1;
            }
        }
        assert!((150..=350).contains(&moved), "{moved} of 1000 moved");

        let two = vec![member("a", 1), member("c", 1)];
        let r2 = Ring::new(&two);
        let mut lost = 0;
        for &k in &keys {
            let (before, after) = (owner(&r3, &three, k), owner(&r2, &two, k));
            if before == "b" {
                lost += 1;
            } else {
                assert_eq!(before, after, "removing b moved a client of {before}");
            }
        }
        assert!(lost > 250, "b had {lost} of 1000");
    }

    /// Shares follow the weights, and the walk offers every member once, owner first.
    #[test]
    fn the_ring_follows_weights() {
        let members = vec![member("a", 1), member("b", 2), member("c", 1), member("off", 0)];
        let ring = Ring::new(&members);
        let mut counts = HashMap::<String, usize>::new();
        for k in keys() {
            let walk = ring.walk(k, members.len());
            let mut sorted = walk.clone();
            sorted.sort_unstable();
            assert_eq!(sorted, [0, 1, 2, 3]);
            assert_eq!(walk[3], 3, "a member without weight comes last");
            *counts.entry(members[walk[0]].name.clone()).or_default() += 1;
        }
        assert!((400..=600).contains(&counts["b"]), "{counts:?}");
        assert!(!counts.contains_key("off"), "{counts:?}");
    }

    /// The largest pool the config allows (256 members of weight 256) makes a ring of at most
    /// `MAX_POINTS` points, each member still owning some; with one drained, a walk still
    /// offers every member once, the drained one last.
    #[test]
    fn the_largest_ring_is_bounded() {
        let mut members: Vec<_> = (0..256).map(|i| member(&format!("m{i}"), 256)).collect();
        members[7].drain = true;
        let ring = Ring::new(&members);
        assert!(ring.points.len() <= MAX_POINTS as usize, "{} points", ring.points.len());
        assert_eq!(ring.owners, 255);
        let walk = ring.walk(client_key("10.0.0.1".parse().unwrap()), members.len());
        assert_eq!(walk.len(), 256);
        assert_eq!(walk[255], 7, "the drained member comes last");
        let mut sorted = walk.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..256).collect::<Vec<_>>());
    }

    /// A client's key ignores the port and the low 64 bits of an IPv6 address, and a mapped
    /// IPv4 address is its IPv4 address.
    #[test]
    fn client_keys() {
        let v6 = |s: &str| client_key(s.parse().unwrap());
        assert_eq!(v6("2001:db8:1:2::1"), v6("2001:db8:1:2:aaaa:bbbb:cccc:dddd"));
        assert_ne!(v6("2001:db8:1:2::1"), v6("2001:db8:1:3::1"));
        assert_eq!(v6("::ffff:10.0.0.1"), v6("10.0.0.1"));
        assert_ne!(v6("10.0.0.1"), v6("10.0.0.2"));
    }

    /// Weighted round robin interleaves: weight 3 beside two of 1 gives a b a c a.
    #[test]
    fn smooth_weighted_turns() {
        let mut drained = member("d", 5);
        drained.drain = true;
        let s = schedule(&[member("a", 3), member("b", 1), member("c", 1), member("z", 0), drained]);
        assert_eq!(s, [0, 1, 0, 2, 0]);
    }
}
