//! Every metric wsgate exports: the recorder of each gateway and the handles code records into.
//!
//! Each gateway instance owns its own Prometheus recorder: nothing is installed process-wide,
//! so tests can run several gateways in one process and read exact counts from each one's
//! `/metrics`. Code that records takes the handles it needs from here ([`Metrics`] for the
//! listener, [`RouteMetrics`] per route, [`DirectionMetrics`] per direction for the bridge);
//! nobody reads the values back to decide anything.
//!
//! Labels stay bounded: listener and route names come from the config, directions and outcomes
//! from fixed sets. A client address is never a label.
//!
//! The names and help texts are in [`names`]; this file holds the handles.
//!
//! This module is a leaf: it imports no other wsgate module but `throttle`, another leaf (each
//! route's log throttles live here, in the per-route state that outlives reloads).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, OnceLock};

use metrics::{Counter, Gauge, Histogram, Key, Label, Level, Metadata, Recorder};
use metrics_exporter_prometheus::formatting::sanitize_label_value;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder};

use crate::throttle::{Throttle, WARN_INTERVAL};

static METADATA: Metadata<'static> = Metadata::new(module_path!(), Level::INFO, Some(module_path!()));

pub mod names;

/// Direction label values.
pub const TO_BACKEND: &str = "to_backend";
/// Direction label values.
pub const TO_CLIENT: &str = "to_client";

/// The recorder of one gateway instance and the handles it serves.
pub struct Metrics {
    recorder: Arc<PrometheusRecorder>,
    handle: PrometheusHandle,
    /// False: every handle is a no-op (`[metrics] enabled = false`).
    enabled: bool,
    routes: Mutex<HashMap<String, Arc<RouteMetrics>>>,
    /// 1 while accepting.
    pub ready: Gauge,
    /// Reloads, by trigger and result.
    pub reloads: ReloadCounters,
    /// Connections in the handshake pool.
    pub handshakes_in_progress: Gauge,
    /// Connections waiting for a place in it.
    pub handshakes_waiting: Gauge,
    /// Clients in the per-client table.
    pub clients_tracked: Gauge,
    /// The admin listener's refusals and TLS failures.
    pub admin: AdminMetrics,
    /// Log lines dropped, read from `log_drops_source` at each scrape.
    log_lines_dropped: Counter,
    /// What the process's log writer has dropped (set by `main`, which owns the writer).
    log_drops_source: OnceLock<Box<dyn Fn() -> u64 + Send + Sync>>,
    /// Every pool member (route, name) given handles, and those of the config in force; the
    /// series of the others are left out of scrapes (see [`Metrics::scrape_only_backends`]).
    backends: Mutex<Backends>,
}

#[derive(Default)]
struct Backends {
    registered: HashSet<(String, String)>,
    in_force: HashSet<(String, String)>,
    /// `registered` less `in_force`, as the exposition writes their label sets.
    hidden: Arc<HashSet<String>>,
}

impl Backends {
    fn update(&mut self) {
        self.hidden = Arc::new(self.registered.difference(&self.in_force).map(label_set).collect());
    }
}

/// A member's label set as the exposition writes it.
fn label_set((route, backend): &(String, String)) -> String {
    format!("{{route=\"{}\",backend=\"{}\"}}", sanitize_label_value(route), sanitize_label_value(backend))
}

/// Whether `line` of the exposition is a sample of a pool member's series whose label set is
/// in `hidden`.
fn is_hidden(line: &str, hidden: &HashSet<String>) -> bool {
    let Some(rest) = line.strip_prefix("wsgate_backend_") else { return false };
    let Some(start) = rest.find('{') else { return false };
    if !BACKEND_SERIES.iter().any(|name| name.strip_prefix("wsgate_backend_") == Some(&rest[..start])) {
        return false;
    }
    rest[start..].find('}').is_some_and(|end| hidden.contains(&rest[start..=start + end]))
}

/// The series each pool member has, labelled `{route, backend}` and nothing else.
const BACKEND_SERIES: [&str; 4] =
    [names::BACKEND_UP, names::BACKEND_SESSIONS, names::BACKEND_SESSIONS_TOTAL, names::BACKEND_FAILED_CONNECTS];

/// `wsgate_config_reloads_total`: one counter per trigger (SIGHUP, a watched file's change) and
/// result (applied, rejected with the old config kept).
#[derive(Debug, Clone)]
pub struct ReloadCounters {
    /// SIGHUP, applied.
    pub signal_ok: Counter,
    /// SIGHUP, rejected.
    pub signal_error: Counter,
    /// A watched file changed, applied.
    pub watch_ok: Counter,
    /// A watched file changed, rejected.
    pub watch_error: Counter,
}

/// `wsgate_admin_unauthorized_total`'s `reason` for a request without a bearer token; the admin
/// log's too, so the two never drift.
pub const MISSING_TOKEN: &str = "missing_token";
/// Its `reason` for a token that is not one of the configured ones.
pub const INVALID_TOKEN: &str = "invalid_token";

/// Handles for the admin listener.
#[derive(Debug)]
pub struct AdminMetrics {
    /// Requests without a bearer token on a path that needs one.
    pub missing_token: Counter,
    /// Requests with a token that is not one of the configured ones.
    pub invalid_token: Counter,
    /// TLS handshakes that failed (`wsgate_tls_handshake_failures_total{listener="admin"}`).
    pub tls_failed: Counter,
    /// TLS handshakes that timed out.
    pub tls_timeout: Counter,
    /// The warning a refused request writes, at most one per interval.
    pub unauthorized_warnings: Throttle,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

/// Seconds buckets for connect time and session duration.
const CONNECT_BUCKETS: &[f64] = &[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];
const DURATION_BUCKETS: &[f64] = &[0.1, 1.0, 10.0, 60.0, 300.0, 900.0, 3600.0, 14400.0, 86400.0];
/// Bytes buckets for the per-session peak of buffered bytes (powers of 4 from 1 KiB to 64 MiB).
const PEAK_BUCKETS: &[f64] =
    &[0.0, 1024.0, 4096.0, 16384.0, 65536.0, 262144.0, 1048576.0, 4194304.0, 16777216.0, 67108864.0];

impl Metrics {
    /// A fresh recorder with every metric described.
    ///
    /// With `enabled` false every handle records nowhere (the recorder stays, empty), so the
    /// cost of metrics can be measured against their absence.
    pub fn new(enabled: bool) -> Metrics {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Full(names::BACKEND_CONNECT_DURATION.into()), CONNECT_BUCKETS)
            .and_then(|b| b.set_buckets_for_metric(Matcher::Full(names::SESSION_DURATION.into()), DURATION_BUCKETS))
            .and_then(|b| b.set_buckets_for_metric(Matcher::Full(names::SESSION_PEAK_BUFFERED.into()), PEAK_BUCKETS))
            .expect("bucket lists are non-empty constants")
            .build_recorder();
        let handle = recorder.handle();
        names::describe(&recorder);
        let mut metrics = Metrics {
            recorder: Arc::new(recorder),
            handle,
            enabled,
            routes: Mutex::new(HashMap::new()),
            backends: Mutex::default(),
            ready: Gauge::noop(),
            reloads: ReloadCounters {
                signal_ok: Counter::noop(),
                signal_error: Counter::noop(),
                watch_ok: Counter::noop(),
                watch_error: Counter::noop(),
            },
            handshakes_in_progress: Gauge::noop(),
            handshakes_waiting: Gauge::noop(),
            clients_tracked: Gauge::noop(),
            admin: AdminMetrics {
                missing_token: Counter::noop(),
                invalid_token: Counter::noop(),
                tls_failed: Counter::noop(),
                tls_timeout: Counter::noop(),
                unauthorized_warnings: Throttle::new(WARN_INTERVAL),
            },
            log_lines_dropped: Counter::noop(),
            log_drops_source: OnceLock::new(),
        };
        metrics.log_lines_dropped = metrics.counter(names::LOG_LINES_DROPPED, &[]);
        metrics.handshakes_in_progress = metrics.gauge(names::HANDSHAKES_IN_PROGRESS, &[]);
        metrics.handshakes_waiting = metrics.gauge(names::HANDSHAKES_WAITING, &[]);
        metrics.clients_tracked = metrics.gauge(names::CLIENTS_TRACKED, &[]);
        metrics.ready = metrics.gauge(names::READY, &[]);
        let reloads =
            |trigger, result| metrics.counter(names::CONFIG_RELOADS, &[("trigger", trigger), ("result", result)]);
        metrics.reloads = ReloadCounters {
            signal_ok: reloads("signal", "ok"),
            signal_error: reloads("signal", "error"),
            watch_ok: reloads("watch", "ok"),
            watch_error: reloads("watch", "error"),
        };
        metrics.admin = AdminMetrics {
            missing_token: metrics.counter(names::ADMIN_UNAUTHORIZED, &[("reason", MISSING_TOKEN)]),
            invalid_token: metrics.counter(names::ADMIN_UNAUTHORIZED, &[("reason", INVALID_TOKEN)]),
            tls_failed: metrics.counter(names::TLS_HANDSHAKE_FAILURES, &[("listener", "admin"), ("reason", "error")]),
            tls_timeout: metrics
                .counter(names::TLS_HANDSHAKE_FAILURES, &[("listener", "admin"), ("reason", "timeout")]),
            unauthorized_warnings: Throttle::new(WARN_INTERVAL),
        };
        metrics
    }

    /// Reports, from now on, what `dropped` says the log writer has dropped; once.
    pub fn count_dropped_log_lines(&self, dropped: impl Fn() -> u64 + Send + Sync + 'static) {
        let _ = self.log_drops_source.set(Box::new(dropped));
    }

    /// The Prometheus text exposition of everything recorded so far.
    pub fn render(&self) -> String {
        if let Some(dropped) = self.log_drops_source.get() {
            self.log_lines_dropped.absolute(dropped());
        }
        self.handle.run_upkeep();
        let text = self.handle.render();
        let hidden = self.backends.lock().unwrap_or_else(|p| p.into_inner()).hidden.clone();
        if hidden.is_empty() {
            return text;
        }
        text.lines().filter(|line| !is_hidden(line, &hidden)).flat_map(|line| [line, "\n"]).collect()
    }

    /// Scrapes show the series of these pool members, (route, member) pairs of the config in
    /// force, and of no other: the exporter cannot unregister a series, and a member a reload
    /// removed (or one a refused reload built) would otherwise keep its last values for the
    /// process's life (a `wsgate_backend_up` of 0 alerting for a member no longer there).
    pub fn scrape_only_backends(&self, in_force: HashSet<(String, String)>) {
        let mut backends = self.backends.lock().unwrap_or_else(|p| p.into_inner());
        backends.in_force = in_force;
        backends.update();
    }

    fn counter(&self, name: &'static str, labels: &[(&'static str, &str)]) -> Counter {
        if !self.enabled {
            return Counter::noop();
        }
        self.recorder.register_counter(&key(name, labels), &METADATA)
    }

    fn gauge(&self, name: &'static str, labels: &[(&'static str, &str)]) -> Gauge {
        if !self.enabled {
            return Gauge::noop();
        }
        self.recorder.register_gauge(&key(name, labels), &METADATA)
    }

    fn histogram(&self, name: &'static str, labels: &[(&'static str, &str)]) -> Histogram {
        if !self.enabled {
            return Histogram::noop();
        }
        self.recorder.register_histogram(&key(name, labels), &METADATA)
    }

    /// Handles for one listener.
    pub fn listener(&self, listener: &str) -> ListenerMetrics {
        let l = [("listener", listener)];
        let refused = |reason| self.counter(names::CONNECTIONS_REFUSED, &[("listener", listener), ("reason", reason)]);
        let tls = |reason| self.counter(names::TLS_HANDSHAKE_FAILURES, &[("listener", listener), ("reason", reason)]);
        ListenerMetrics {
            accepted: self.counter(names::CONNECTIONS_ACCEPTED, &l),
            open: self.gauge(names::CONNECTIONS_OPEN, &l),
            refused_connection_limit: refused("connection_limit"),
            refused_client_connections: refused("client_connection_limit"),
            refused_client_rate: refused("client_rate_limit"),
            handshake_wait_timeout: refused("handshake_wait_timeout"),
            request_timeout: refused("request_timeout"),
            handshake_shed: refused("handshake_shed"),
            tls_failed: tls("error"),
            tls_timeout: tls("timeout"),
            tls_full: self.counter(names::TLS_HANDSHAKES, &[("listener", listener), ("kind", "full")]),
            tls_resumed: self.counter(names::TLS_HANDSHAKES, &[("listener", listener), ("kind", "resumed")]),
            refused_untrusted_proxy: refused("untrusted_proxy"),
            refused_proxy_header: refused("proxy_header"),
        }
    }

    /// Handles for one route, created once and shared by its sessions (and kept across
    /// reloads, so counters continue).
    pub fn route(&self, route: &str) -> Arc<RouteMetrics> {
        let mut routes = self.routes.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        routes
            .entry(route.to_string())
            .or_insert_with(|| {
                let r = [("route", route)];
                let direction_metrics = |direction| DirectionMetrics {
                    bytes: self.counter(names::BYTES, &[("route", route), ("direction", direction)]),
                    messages: self.counter(names::MESSAGES, &[("route", route), ("direction", direction)]),
                    buffered: self.gauge(names::BUFFERED, &[("route", route), ("direction", direction)]),
                    peak: self.histogram(names::SESSION_PEAK_BUFFERED, &[("route", route), ("direction", direction)]),
                };
                Arc::new(RouteMetrics {
                    name: route.to_string(),
                    to_backend: direction_metrics(TO_BACKEND),
                    to_client: direction_metrics(TO_CLIENT),
                    sessions_open: self.gauge(names::SESSIONS_OPEN, &r),
                    duration: self.histogram(names::SESSION_DURATION, &r),
                    dropped_to_client: self
                        .counter(names::DROPPED_BYTES, &[("route", route), ("direction", TO_CLIENT)]),
                    dropped_to_backend: self
                        .counter(names::DROPPED_BYTES, &[("route", route), ("direction", TO_BACKEND)]),
                    connect_duration: self.histogram(names::BACKEND_CONNECT_DURATION, &r),
                    origin_warnings: Throttle::new(WARN_INTERVAL),
                    subprotocol_warnings: Throttle::new(WARN_INTERVAL),
                    access_warnings: Throttle::new(WARN_INTERVAL),
                    connect_warnings: Throttle::new(WARN_INTERVAL),
                    target_warnings: Throttle::new(WARN_INTERVAL),
                    users: Mutex::new(HashSet::new()),
                    upgraded: OnceLock::new(),
                    ended: Mutex::new(Vec::new()),
                    recorder: self.recorder.clone(),
                    enabled: self.enabled,
                })
            })
            .clone()
    }

    /// Handles for one member of a route's pool; the labels are configured names, so bounded.
    pub fn backend(&self, route: &str, backend: &str) -> BackendMetrics {
        if self.enabled {
            let mut backends = self.backends.lock().unwrap_or_else(|p| p.into_inner());
            // Not scraped until a config that has it is in force (added alone: a pool of hundreds
            // would otherwise rebuild the whole set once per member).
            let pair = (route.to_string(), backend.to_string());
            if !backends.in_force.contains(&pair) {
                let hidden = label_set(&pair);
                Arc::make_mut(&mut backends.hidden).insert(hidden);
            }
            backends.registered.insert(pair);
        }
        let l = [("route", route), ("backend", backend)];
        BackendMetrics {
            up: self.gauge(names::BACKEND_UP, &l),
            sessions: self.gauge(names::BACKEND_SESSIONS, &l),
            sessions_total: self.counter(names::BACKEND_SESSIONS_TOTAL, &l),
            failed_connects: self.counter(names::BACKEND_FAILED_CONNECTS, &l),
        }
    }

    /// Counts an HTTP answer to a request that matched no route (404, the console page).
    pub fn unrouted_request(&self, status: u16) {
        self.counter(names::HANDSHAKES, &[("route", ""), ("status", &status.to_string())]).increment(1);
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new(true)
    }
}

fn key(name: &'static str, labels: &[(&'static str, &str)]) -> Key {
    Key::from_parts(name, labels.iter().map(|(k, v)| Label::new(*k, v.to_string())).collect::<Vec<_>>())
}

/// Handles for one listener.
#[derive(Debug, Clone)]
pub struct ListenerMetrics {
    /// Connections accepted.
    pub accepted: Counter,
    /// Connections open.
    pub open: Gauge,
    /// Refused at `max_connections` (a 503 or a bare close).
    pub refused_connection_limit: Counter,
    /// Closed at accept: the client had `per_client.max_connections` open.
    pub refused_client_connections: Counter,
    /// Answered 429: the client opened connections faster than its rate.
    pub refused_client_rate: Counter,
    /// Closed at the handshake deadline while waiting for a place in the handshake pool.
    pub handshake_wait_timeout: Counter,
    /// Closed without an answer: the request head was not complete by its deadline.
    pub request_timeout: Counter,
    /// Closed mid-handshake: its place in the pool, held too long, was given to a waiting one.
    pub handshake_shed: Counter,
    /// TLS handshakes that failed.
    pub tls_failed: Counter,
    /// TLS handshakes that timed out.
    pub tls_timeout: Counter,
    /// TLS handshakes completed in full.
    pub tls_full: Counter,
    /// TLS handshakes that resumed an earlier session.
    pub tls_resumed: Counter,
    /// Closed at accept on a `proxy_protocol` listener: the peer is not in `trusted_proxies`.
    pub refused_untrusted_proxy: Counter,
    /// Closed on a `proxy_protocol` listener: a trusted peer sent no PROXY header, a malformed
    /// or oversized one, or none within the handshake deadline.
    pub refused_proxy_header: Counter,
}

/// Handles for one member of a pool.
#[derive(Debug, Clone)]
pub struct BackendMetrics {
    /// 1 while up, 0 while down or ejected.
    pub up: Gauge,
    /// Sessions open (and connecting).
    pub sessions: Gauge,
    /// Sessions given.
    pub sessions_total: Counter,
    /// Failed connects.
    pub failed_connects: Counter,
}

/// Distinct users per route with a label of their own in `wsgate_user_sessions_total`.
pub const MAX_USER_LABELS: usize = 100;
/// Longer user names count as `other`.
pub const MAX_USER_LABEL_BYTES: usize = 64;

/// Handles for one route.
pub struct RouteMetrics {
    name: String,
    recorder: Arc<PrometheusRecorder>,
    enabled: bool,
    /// Client → backend.
    pub to_backend: DirectionMetrics,
    /// Backend → client.
    pub to_client: DirectionMetrics,
    /// Sessions open.
    pub sessions_open: Gauge,
    /// Session durations.
    pub duration: Histogram,
    /// Backend bytes discarded after the client closed or at shutdown.
    pub dropped_to_client: Counter,
    /// Client message bytes read after the session's close frame went out, never delivered.
    pub dropped_to_backend: Counter,
    /// Backend connect time.
    pub connect_duration: Histogram,
    /// Warnings about refused origins (403): one per [`WARN_INTERVAL`], the rest counted in it.
    /// Every refusal is counted in `wsgate_handshakes_total` all the same.
    pub origin_warnings: Throttle,
    /// Warnings about refused subprotocols (400), likewise.
    pub subprotocol_warnings: Throttle,
    /// Warnings about requests the access policy refused (401, 403, 429), likewise; each is
    /// counted in `wsgate_access_denied_total` too.
    pub access_warnings: Throttle,
    /// Warnings about failed backend connects (`session::dial`), likewise; every failure is
    /// counted in `wsgate_backend_connect_failures_total`.
    pub connect_warnings: Throttle,
    /// Warnings about token-mapped requests refused (404, 403), likewise; each is counted in
    /// `wsgate_target_refusals_total` too.
    pub target_warnings: Throttle,
    /// The users with a label of their own in `wsgate_user_sessions_total`.
    users: Mutex<HashSet<String>>,
    /// `wsgate_handshakes_total{status="101"}`, registered at the route's first upgrade: looking
    /// it up by its labels at every upgrade built and hashed its key each time.
    upgraded: OnceLock<Counter>,
    /// `wsgate_sessions_total` by code (grouped as labelled) and side, likewise, each registered
    /// when it first occurs; as bounded as those labels.
    ended: Mutex<Vec<((u16, &'static str), Counter)>>,
}

impl std::fmt::Debug for RouteMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RouteMetrics").field("route", &self.name).finish_non_exhaustive()
    }
}

impl RouteMetrics {
    fn counter(&self, name: &'static str, labels: &[(&'static str, &str)]) -> Counter {
        if !self.enabled {
            return Counter::noop();
        }
        let mut all = vec![("route", self.name.as_str())];
        all.extend_from_slice(labels);
        self.recorder.register_counter(&key(name, &all), &METADATA)
    }

    /// Counts an HTTP answer on this route (101 for an upgrade).
    pub fn handshake(&self, status: u16) {
        if status == 101 {
            return self.upgraded.get_or_init(|| self.counter(names::HANDSHAKES, &[("status", "101")])).increment(1);
        }
        self.counter(names::HANDSHAKES, &[("status", &status.to_string())]).increment(1);
    }

    /// Counts a request given no session at a bound; `reason` is one of a fixed set.
    pub fn shed(&self, reason: &str) {
        self.counter(names::SESSIONS_SHED, &[("reason", reason)]).increment(1);
    }

    /// Counts a request the access policy refused; `reason` is one of a fixed set.
    pub fn access_denied(&self, reason: &str) {
        self.counter(names::ACCESS_DENIED, &[("reason", reason)]).increment(1);
    }

    /// Counts a request a token-mapped route found no allowed target for; `reason` is one of a
    /// fixed set.
    pub fn target_refused(&self, reason: &str) {
        self.counter(names::TARGET_REFUSALS, &[("reason", reason)]).increment(1);
    }

    /// Counts a session opened by `user` (routes with `auth.user_label`). The first
    /// [`MAX_USER_LABELS`] users of the route, up to [`MAX_USER_LABEL_BYTES`] long, get a label
    /// of their own; the others count as `other`, so a stream of new JWT subjects cannot grow
    /// the metric without bound.
    pub fn user_session(&self, user: &str) {
        let own = {
            let mut users = self.users.lock().unwrap_or_else(|p| p.into_inner());
            users.contains(user)
                || (user.len() <= MAX_USER_LABEL_BYTES
                    && users.len() < MAX_USER_LABELS
                    && users.insert(user.to_string()))
        };
        self.counter(names::USER_SESSIONS, &[("user", if own { user } else { "other" })]).increment(1);
    }

    /// Counts a failed backend connect; `kind` is one of a fixed set of short descriptions.
    pub fn connect_failed(&self, kind: &str) {
        self.counter(names::BACKEND_CONNECT_FAILURES, &[("kind", kind)]).increment(1);
    }

    /// Counts an ended session by close code and the side that ended it.
    /// Codes a client chose itself (3000-4999, echoed back) are grouped as `3xxx`/`4xxx`, so a
    /// client cannot create thousands of series.
    pub fn session_ended(&self, code: u16, closed_by: &'static str) {
        let group = match code {
            3000..=3999 => 3000,
            4000..=4999 => 4000,
            _ => code,
        };
        let mut ended = self.ended.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some((_, counter)) = ended.iter().find(|(key, _)| *key == (group, closed_by)) {
            return counter.increment(1);
        }
        let label = match group {
            3000 => "3xxx".to_string(),
            4000 => "4xxx".to_string(),
            _ => code.to_string(),
        };
        let counter = self.counter(names::SESSIONS, &[("code", &label), ("closed_by", closed_by)]);
        counter.increment(1);
        ended.push(((group, closed_by), counter));
    }

    /// Counts a session ended at a liveness limit; `limit` is one of a fixed set of labels.
    pub fn limit_reached(&self, limit: &str) {
        self.counter(names::SESSION_LIMITS, &[("limit", limit)]).increment(1);
    }
}

/// Handles for one direction of one route, shared by the route's sessions, as the bridge and the
/// echo loop record them (a session's own totals are `bridge::DirectionTotals`).
#[derive(Debug, Clone)]
pub struct DirectionMetrics {
    /// Payload bytes written to the destination side.
    pub bytes: Counter,
    /// Messages relayed.
    pub messages: Counter,
    /// Bytes read and not yet written (summed over the route's sessions).
    pub buffered: Gauge,
    /// Each session's peak of buffered bytes.
    pub peak: Histogram,
}

impl DirectionMetrics {
    /// Handles that record nowhere, for pumps run outside a gateway (tests, client mode).
    pub fn detached() -> DirectionMetrics {
        DirectionMetrics {
            bytes: Counter::noop(),
            messages: Counter::noop(),
            buffered: Gauge::noop(),
            peak: Histogram::noop(),
        }
    }

    /// Counts `n` bytes as buffered (read and not yet written) until the returned guard is
    /// dropped, so the gauge is right even when a session ends mid-write.
    pub fn buffer(&self, n: usize) -> Buffered<'_> {
        self.buffered.increment(n as f64);
        Buffered { gauge: &self.buffered, n }
    }
}

/// Bytes counted in a [`DirectionMetrics`]'s buffered gauge until dropped.
#[derive(Debug)]
pub struct Buffered<'a> {
    gauge: &'a Gauge,
    n: usize,
}

impl Drop for Buffered<'_> {
    fn drop(&mut self) {
        self.gauge.decrement(self.n as f64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The value of the one rendered line that starts with `name{` and has every label in `labels`.
    fn value(text: &str, name: &str, labels: &[&str]) -> Option<f64> {
        text.lines()
            .filter(|l| l.starts_with(&format!("{name}{{")) && labels.iter().all(|label| l.contains(label)))
            .map(|l| l.rsplit(' ').next().unwrap().parse().unwrap())
            .next()
    }

    /// Only the members of the config in force are scraped, whatever their route's name holds
    /// (quotes and backslashes as the exposition escapes them); a member is hidden until a config
    /// that has it is in force, and shown again when one is. The route's own series stay.
    #[test]
    fn only_members_in_force_are_scraped() {
        let metrics = Metrics::new(true);
        let odd = r#"a"b\c"#;
        let pair = |route: &str, member: &str| (route.to_string(), member.to_string());
        for (route, member) in [(odd, "m"), ("p", "m"), ("p", "gone")] {
            metrics.backend(route, member).up.set(1.0);
        }
        metrics.route("p").handshake(101);
        let scraped = |text: &str, route: &str, member: &str| {
            let label_set = format!("{{route=\"{}\",backend=\"{member}\"}}", sanitize_label_value(route));
            BACKEND_SERIES.iter().filter(|name| text.contains(&format!("{name}{label_set}"))).count()
        };
        let text = metrics.render();
        assert_eq!((scraped(&text, odd, "m"), scraped(&text, "p", "m")), (0, 0), "not yet in force: {text}");
        metrics.scrape_only_backends([pair(odd, "m"), pair("p", "m")].into());
        let text = metrics.render();
        assert_eq!(scraped(&text, odd, "m"), 4, "{text}");
        assert_eq!(scraped(&text, "p", "m"), 4, "{text}");
        assert_eq!(scraped(&text, "p", "gone"), 0, "{text}");
        metrics.scrape_only_backends([pair("p", "gone")].into());
        let text = metrics.render();
        assert_eq!((scraped(&text, odd, "m"), scraped(&text, "p", "m")), (0, 0), "{text}");
        assert_eq!(scraped(&text, "p", "gone"), 4, "{text}");
        assert_eq!(value(&text, names::HANDSHAKES, &[r#"route="p""#]), Some(1.0), "{text}");
        assert!(text.contains(&format!("# TYPE {} gauge", names::BACKEND_UP)), "{text}");
    }

    /// The counters a route keeps after their first use count each answer and each ending under
    /// its own labels: 101s apart from other statuses, each code (3xxx and 4xxx grouped) and
    /// side apart.
    #[test]
    fn cached_handshake_and_session_counters_keep_their_labels_apart() {
        let metrics = Metrics::new(true);
        let route = metrics.route("r");
        for status in [101, 101, 404, 101] {
            route.handshake(status);
        }
        for (code, side) in [(1000, "client"), (1000, "client"), (1000, "backend"), (3001, "client"), (3999, "client")]
        {
            route.session_ended(code, side);
        }
        route.session_ended(4001, "gateway");
        let text = metrics.render();
        let handshakes = |status: &str| value(&text, names::HANDSHAKES, &[r#"route="r""#, status]);
        assert_eq!(handshakes(r#"status="101""#), Some(3.0), "{text}");
        assert_eq!(handshakes(r#"status="404""#), Some(1.0), "{text}");
        let ended = |code: &str, side: &str| value(&text, names::SESSIONS, &[code, side]);
        assert_eq!(ended(r#"code="1000""#, r#"closed_by="client""#), Some(2.0), "{text}");
        assert_eq!(ended(r#"code="1000""#, r#"closed_by="backend""#), Some(1.0), "{text}");
        assert_eq!(ended(r#"code="3xxx""#, r#"closed_by="client""#), Some(2.0), "{text}");
        assert_eq!(ended(r#"code="4xxx""#, r#"closed_by="gateway""#), Some(1.0), "{text}");
    }
}
