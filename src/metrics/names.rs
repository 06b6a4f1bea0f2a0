//! Every metric's name and help text, in one place: the names are constants, so
//! docs/metrics.md and tests can name them exactly, and [`describe`] gives each its help text
//! and unit in the exposition.

use metrics::{KeyName, Recorder, SharedString, Unit};
use metrics_exporter_prometheus::PrometheusRecorder;

/// Counter{listener}: TCP connections accepted.
pub const CONNECTIONS_ACCEPTED: &str = "wsgate_connections_accepted_total";
/// Gauge{listener}: client connections open (handshaking or upgraded).
pub const CONNECTIONS_OPEN: &str = "wsgate_connections_open";
/// Counter{listener, reason}: connections refused or closed early because a limit was
/// reached.
pub const CONNECTIONS_REFUSED: &str = "wsgate_connections_refused_total";
/// Gauge: connections in the handshake pool (TLS handshake or reading the request).
pub const HANDSHAKES_IN_PROGRESS: &str = "wsgate_handshakes_in_progress";
/// Gauge: connections waiting for a place in the handshake pool.
pub const HANDSHAKES_WAITING: &str = "wsgate_handshakes_waiting";
/// Gauge: clients (addresses, IPv6 prefixes) in the per-client table.
pub const CLIENTS_TRACKED: &str = "wsgate_clients_tracked";
/// Counter{route, reason}: admitted requests given no session because a route or gateway
/// bound was reached.
pub const SESSIONS_SHED: &str = "wsgate_sessions_shed_total";
/// Counter{route, reason}: requests refused by the route's access policy.
pub const ACCESS_DENIED: &str = "wsgate_access_denied_total";
/// Counter{route, reason}: requests a token-mapped route found no allowed target for.
pub const TARGET_REFUSALS: &str = "wsgate_target_refusals_total";
/// Counter{route, user}: sessions opened by each user, on routes with `auth.user_label`.
pub const USER_SESSIONS: &str = "wsgate_user_sessions_total";
/// Counter{listener, reason}: TLS handshakes that failed or timed out.
pub const TLS_HANDSHAKE_FAILURES: &str = "wsgate_tls_handshake_failures_total";
/// Counter{listener, kind}: TLS handshakes completed, `full` or `resumed`.
pub const TLS_HANDSHAKES: &str = "wsgate_tls_handshakes_total";
/// Counter{route, status}: HTTP requests answered, by status (101 for upgrades).
pub const HANDSHAKES: &str = "wsgate_handshakes_total";
/// Gauge{route}: sessions open.
pub const SESSIONS_OPEN: &str = "wsgate_sessions_open";
/// Counter{route, code, closed_by}: sessions ended.
pub const SESSIONS: &str = "wsgate_sessions_total";
/// Counter{route, limit}: sessions ended by a liveness limit (pong, idle, lifetime, rate).
pub const SESSION_LIMITS: &str = "wsgate_session_limits_total";
/// Histogram{route}: session duration.
pub const SESSION_DURATION: &str = "wsgate_session_duration_seconds";
/// Counter{route, direction}: payload bytes relayed.
pub const BYTES: &str = "wsgate_bytes_total";
/// Counter{route, direction}: messages relayed (client messages in, messages out).
pub const MESSAGES: &str = "wsgate_messages_total";
/// Gauge{route, direction}: bytes read from one side and not yet written to the other.
pub const BUFFERED: &str = "wsgate_buffered_bytes";
/// Histogram{route, direction}: each session's peak buffered bytes.
pub const SESSION_PEAK_BUFFERED: &str = "wsgate_session_peak_buffered_bytes";
/// Counter{route}: backend bytes read and discarded after the client closed or at shutdown.
pub const DROPPED_BYTES: &str = "wsgate_dropped_bytes_total";
/// Histogram{route}: time to connect the backend (successful connects).
pub const BACKEND_CONNECT_DURATION: &str = "wsgate_backend_connect_duration_seconds";
/// Counter{route, kind}: backend connects that failed.
pub const BACKEND_CONNECT_FAILURES: &str = "wsgate_backend_connect_failures_total";
/// Counter{trigger, result}: config reloads, by what started them (`signal`, `watch`) and
/// how they ended (`ok`, `error`).
pub const CONFIG_RELOADS: &str = "wsgate_config_reloads_total";
/// Gauge: 1 while accepting new connections, 0 before and while draining.
pub const READY: &str = "wsgate_ready";
/// Counter: log lines dropped because `log.max_buffered_lines` were already waiting for the reader.
pub const LOG_LINES_DROPPED: &str = "wsgate_log_lines_dropped_total";
/// Counter{reason}: admin requests answered 401 (no bearer token, or a wrong one).
pub const ADMIN_UNAUTHORIZED: &str = "wsgate_admin_unauthorized_total";
/// Gauge{route, backend}: 1 while a pool member takes new sessions by its health, 0 while
/// it is down (failed checks) or ejected (failed connects).
pub const BACKEND_UP: &str = "wsgate_backend_up";
/// Gauge{route, backend}: a pool member's sessions open (and connecting).
pub const BACKEND_SESSIONS: &str = "wsgate_backend_sessions";
/// Counter{route, backend}: sessions a pool member was given (connected).
pub const BACKEND_SESSIONS_TOTAL: &str = "wsgate_backend_sessions_total";
/// Counter{route, backend}: connects to a pool member that failed (each attempt, failed
/// over or not; the route's `wsgate_backend_connect_failures_total` counts failed dials).
pub const BACKEND_FAILED_CONNECTS: &str = "wsgate_backend_failed_connects_total";

/// Registers every metric's help text and unit with `r`.
pub(super) fn describe(r: &PrometheusRecorder) {
    let d = |name: &'static str, unit: Option<Unit>, help: &'static str| {
        (KeyName::from_const_str(name), unit, SharedString::const_str(help))
    };
    for (name, unit, help) in [
        d(CONNECTIONS_ACCEPTED, Some(Unit::Count), "TCP connections accepted, by listener."),
        d(
            CONNECTIONS_REFUSED,
            Some(Unit::Count),
            "Connections refused or closed early at a limit, by listener and reason: connection_limit, \
             client_connection_limit, client_rate_limit, handshake_wait_timeout, handshake_shed, \
             request_timeout, untrusted_proxy, proxy_header.",
        ),
        d(
            HANDSHAKES_IN_PROGRESS,
            Some(Unit::Count),
            "Connections in the handshake pool: in the TLS handshake or reading their request.",
        ),
        d(
            HANDSHAKES_WAITING,
            Some(Unit::Count),
            "Connections waiting for a place in the handshake pool (limits.max_handshakes, or their client's share).",
        ),
        d(CLIENTS_TRACKED, Some(Unit::Count), "Client addresses (IPv6: prefixes) in the per-client table."),
        d(
            SESSIONS_SHED,
            Some(Unit::Count),
            "Admitted requests given no session at a bound, by route and reason: max_sessions, \
             max_pending_connects, memory, max_password_checks.",
        ),
        d(
            USER_SESSIONS,
            Some(Unit::Count),
            "Sessions opened, by route and authenticated user (routes with auth.user_label only).",
        ),
        d(ACCESS_DENIED, Some(Unit::Count), "Requests refused by the route's access policy, by route and reason."),
        d(
            TARGET_REFUSALS,
            Some(Unit::Count),
            "Requests a token-mapped route found no allowed target for, by route and reason.",
        ),
        d(TLS_HANDSHAKE_FAILURES, Some(Unit::Count), "TLS handshakes that failed or timed out."),
        d(TLS_HANDSHAKES, Some(Unit::Count), "TLS handshakes completed, full or resumed."),
        d(HANDSHAKES, Some(Unit::Count), "HTTP requests answered, by route and status (101: upgraded)."),
        d(SESSIONS, Some(Unit::Count), "Sessions ended, by route, close code and the side that ended them."),
        d(
            SESSION_LIMITS,
            Some(Unit::Count),
            "Sessions the gateway ended at a limit, by route and limit (pong_timeout, idle_timeout, max_session, message_rate, \
             credentials_expired).",
        ),
        d(BYTES, Some(Unit::Bytes), "Payload bytes relayed, by route and direction."),
        d(
            MESSAGES,
            Some(Unit::Count),
            "Messages relayed: client messages written to the backend, and messages sent to the client.",
        ),
        d(
            DROPPED_BYTES,
            Some(Unit::Bytes),
            "Bytes read and discarded while a session closed, never delivered: backend bytes after the client \
             closed or at shutdown (to_client), client bytes after the gateway's close frame (to_backend).",
        ),
        d(BACKEND_CONNECT_FAILURES, Some(Unit::Count), "Backend connects that failed, by route and kind."),
        d(
            CONFIG_RELOADS,
            Some(Unit::Count),
            "Config reloads, by trigger (signal: SIGHUP; watch: a watched file changed) and result (ok: applied; error: rejected, the old config stayed).",
        ),
        d(BACKEND_SESSIONS_TOTAL, Some(Unit::Count), "Sessions given to each pool member, by route and backend."),
        d(
            BACKEND_FAILED_CONNECTS,
            Some(Unit::Count),
            "Connects to each pool member that failed (failed over or not), by route and backend.",
        ),
        d(
            ADMIN_UNAUTHORIZED,
            Some(Unit::Count),
            "Admin requests answered 401, by reason: missing_token, invalid_token.",
        ),
        d(
            LOG_LINES_DROPPED,
            Some(Unit::Count),
            "Log lines dropped because log.max_buffered_lines were already waiting for the log's reader.",
        ),
    ] {
        r.describe_counter(name, unit, help);
    }
    for (name, unit, help) in [
        d(CONNECTIONS_OPEN, Some(Unit::Count), "Client connections open, handshaking or upgraded."),
        d(SESSIONS_OPEN, Some(Unit::Count), "WebSocket sessions open, by route."),
        d(
            BUFFERED,
            Some(Unit::Bytes),
            "Bytes read from one side and not yet written to the other (the server-side bufferedAmount), by route and direction.",
        ),
        d(READY, None, "1 while accepting connections; 0 before listeners are bound and while draining."),
        d(BACKEND_UP, None, "1 while a pool member takes new sessions by its health; 0 while down or ejected."),
        d(BACKEND_SESSIONS, Some(Unit::Count), "Sessions open (and connecting) on each pool member."),
    ] {
        r.describe_gauge(name, unit, help);
    }
    for (name, unit, help) in [
        d(SESSION_DURATION, Some(Unit::Seconds), "Session duration, by route."),
        d(SESSION_PEAK_BUFFERED, Some(Unit::Bytes), "Each session's peak buffered bytes, by route and direction."),
        d(
            BACKEND_CONNECT_DURATION,
            Some(Unit::Seconds),
            "Time to connect the backend, by route (successful connects).",
        ),
    ] {
        r.describe_histogram(name, unit, help);
    }
}
