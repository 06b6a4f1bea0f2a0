//! `[limits]`, `[limits.per_client]` and each route's `limits` table: their defaults and
//! bounds, and how a route's table inherits from `[limits]` (a key left out takes the value
//! already validated there).

use std::time::Duration;

use super::super::raw::{RawLimits, RawPerClient, RawSessionLimits, Seconds};
use super::super::{Limits, MemoryBudget, PerClient, SessionLimits};
use super::{MAX_SECS, Validator};

const DEFAULT_MAX_CONNECTIONS: u64 = 10_000;
const DEFAULT_MAX_HANDSHAKES: u64 = 256;
const DEFAULT_HANDSHAKE_TIMEOUT_SECS: f64 = 10.0;
/// A real client finishes its TLS handshake and request within a few round trips, well under
/// this even on a slow mobile link; a place held longer while others wait is held on purpose.
const DEFAULT_HANDSHAKE_SHED_AFTER_SECS: f64 = 2.0;
/// A real client sends its request head in the first packet after the handshake; a client
/// still trickling it after this long is most likely holding a place on purpose.
const DEFAULT_REQUEST_HEAD_TIMEOUT_SECS: f64 = 5.0;
/// Linux's default `net.core.somaxconn`, which caps it anyway: a reconnect storm overflowed
/// 1024 (tokio's own default), and each SYN the kernel drops costs its client a second.
const DEFAULT_LISTEN_BACKLOG: u64 = 4096;
/// Enough for bursts of reconnects to a healthy backend (each connect takes a round trip);
/// small enough that a backend which drops SYNs ties up few sockets.
const DEFAULT_MAX_PENDING_CONNECTS: u64 = 128;
/// A PROXY v2 header is 16 bytes, up to 216 of addresses, then TLVs: load balancers send a few
/// dozen bytes of them (AWS, Azure, GCP), far below this; a header bigger than this is refused.
const DEFAULT_PROXY_HEADER_MAX_BYTES: u64 = 4096;
/// The smallest cap that still admits every address family (16 + 216 for Unix sockets).
const MIN_PROXY_HEADER_MAX_BYTES: u64 = 232;
/// The protocol's own bound: a 16-bit length after the 16-byte prefix.
const MAX_PROXY_HEADER_MAX_BYTES: u64 = 16 + 65_535;
/// Per client: room for a NAT'd office's browsers and a reconnect burst after a drain, not for
/// one address to take the gateway's handshake pool (256) or its connections (10,000).
const DEFAULT_PER_CLIENT: PerClient = PerClient {
    max_connections: 256,
    max_handshakes: 32,
    new_connections_per_sec: 20.0,
    new_connections_burst: 100,
    ipv6_prefix: 64,
    max_tracked: 65_536,
    // Ten wrong guesses a minute is far beyond typing mistakes and far below a guessing rate
    // worth having; a minute's block makes guessing a token or password hopeless.
    max_auth_failures: 10,
    auth_failure_window: Duration::from_secs(60),
    auth_block: Duration::from_secs(60),
};
/// Password hashes at once: bcrypt and argon2 take milliseconds of a core each by design, so a
/// few at a time keeps guesses from taking every core, while logins stay quick.
const DEFAULT_MAX_PASSWORD_CHECKS: u64 = 4;
/// 10 MiB: above the 10,000,000 bytes a page may hand `send` in one ArrayBuffer.
const DEFAULT_MAX_MESSAGE_BYTES: u64 = 10 * 1024 * 1024;
/// Each read from a client while data flows. The buffer exists only then (see `readahead`), so
/// idle sessions do not pay it; 64 KiB (loopback's segment size) reads a large message in one or
/// two system calls, which measured faster than 16 KiB (docs/performance.md).
const DEFAULT_WS_READ_BUFFER_BYTES: u64 = 64 * 1024;
/// One backend read becomes one message. The buffer exists only while a read is being delivered
/// and becomes the frame (`frames`), so nothing of it stays after traffic; larger reads carried a
/// bulk stream faster, up to this size (figures in docs/performance.md).
const DEFAULT_BACKEND_READ_BYTES: u64 = 256 * 1024;
const DEFAULT_CONNECT_TIMEOUT_SECS: f64 = 5.0;
const DEFAULT_CLOSE_TIMEOUT_SECS: f64 = 5.0;
/// Below common NAT and load-balancer idle timeouts (often 350 s or more), above chatty.
const DEFAULT_TCP_KEEPALIVE_SECS: f64 = 60.0;
/// Data stuck in flight to a vanished peer ends its session a minute after it was sent, not after
/// the kernel's ~15 minutes of retransmissions; at the keepalive default it also ends an idle
/// connection to a vanished peer at the second probe (70 s) rather than the sixth (110 s).
const DEFAULT_TCP_USER_TIMEOUT_SECS: i64 = 60;
/// Every 30 s keeps a connection through a proxy with a 60 s idle timeout open.
const DEFAULT_PING_INTERVAL_SECS: f64 = 30.0;
/// With the interval, closes a client that went silent within 60 s of its last answer.
const DEFAULT_PONG_TIMEOUT_SECS: f64 = 30.0;
/// A flood of tiny frames costs CPU, not memory; an interactive session sends far fewer, and a
/// bulk upload in large messages stays well below it (docs/config.md).
const DEFAULT_MAX_MESSAGES_PER_SEC: u64 = 100_000;
const MAX_MESSAGES_PER_SEC: u64 = 10_000_000;
/// Every route's limits when neither `[limits]` nor the route sets them.
pub(in crate::config) const DEFAULT_SESSION_LIMITS: SessionLimits = SessionLimits {
    max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES as usize,
    client_read_bytes: DEFAULT_WS_READ_BUFFER_BYTES as usize,
    backend_read_bytes: DEFAULT_BACKEND_READ_BYTES as usize,
    connect_timeout: Duration::from_secs(DEFAULT_CONNECT_TIMEOUT_SECS as u64),
    close_timeout: Duration::from_secs(DEFAULT_CLOSE_TIMEOUT_SECS as u64),
    tcp_keepalive: Some(Duration::from_secs(DEFAULT_TCP_KEEPALIVE_SECS as u64)),
    tcp_user_timeout: Some(Duration::from_secs(DEFAULT_TCP_USER_TIMEOUT_SECS as u64)),
    ping_interval: Some(Duration::from_secs(DEFAULT_PING_INTERVAL_SECS as u64)),
    pong_timeout: Duration::from_secs(DEFAULT_PONG_TIMEOUT_SECS as u64),
    // Off: idle sessions (a VNC screen nobody touches) are legitimate.
    idle_timeout: None,
    // Off: nothing in WebSocket itself ages a session.
    max_session: None,
    max_messages_per_sec: Some(DEFAULT_MAX_MESSAGES_PER_SEC),
    max_pending_connects: DEFAULT_MAX_PENDING_CONNECTS as usize,
    max_sessions: None,
};

impl Validator<'_> {
    pub(super) fn limits(&mut self, mut raw: RawLimits) -> Limits {
        let per_client = raw.per_client.take().unwrap_or_default();
        Limits {
            max_connections: self.count(
                "limits.max_connections",
                raw.max_connections,
                DEFAULT_MAX_CONNECTIONS,
                1,
                1_000_000,
            ),
            max_handshakes: self.count("limits.max_handshakes", raw.max_handshakes, DEFAULT_MAX_HANDSHAKES, 1, 100_000),
            handshake_timeout: self.seconds(
                "limits.handshake_timeout_secs",
                raw.handshake_timeout_secs,
                DEFAULT_HANDSHAKE_TIMEOUT_SECS,
            ),
            handshake_shed_after: self.seconds(
                "limits.handshake_shed_after_secs",
                raw.handshake_shed_after_secs,
                DEFAULT_HANDSHAKE_SHED_AFTER_SECS,
            ),
            request_head_timeout: self.seconds(
                "limits.request_head_timeout_secs",
                raw.request_head_timeout_secs,
                DEFAULT_REQUEST_HEAD_TIMEOUT_SECS,
            ),
            listen_backlog: self.count("limits.listen_backlog", raw.listen_backlog, DEFAULT_LISTEN_BACKLOG, 1, 65_535)
                as u32,
            max_memory: match raw.max_memory_bytes {
                None => MemoryBudget::Auto,
                Some(0) => MemoryBudget::Off,
                Some(n) => {
                    MemoryBudget::Bytes(
                        self.count("limits.max_memory_bytes", Some(n), 1 << 30, 16 << 20, 1 << 50) as u64
                    )
                }
            },
            proxy_header_max_bytes: self.count(
                "limits.proxy_header_max_bytes",
                raw.proxy_header_max_bytes,
                DEFAULT_PROXY_HEADER_MAX_BYTES,
                MIN_PROXY_HEADER_MAX_BYTES,
                MAX_PROXY_HEADER_MAX_BYTES,
            ),
            per_client: self.per_client(per_client),
            max_password_checks: self.count(
                "limits.max_password_checks",
                raw.max_password_checks,
                DEFAULT_MAX_PASSWORD_CHECKS,
                1,
                1024,
            ),
            session: self.session_limits("limits", raw.session(), &DEFAULT_SESSION_LIMITS),
        }
    }

    /// The keys a route may override, read from the table at `table` (`limits` or
    /// `routes.NAME.limits`), each absent one taken from `defaults`.
    pub(super) fn session_limits(&mut self, table: &str, raw: RawSessionLimits, d: &SessionLimits) -> SessionLimits {
        let key = |k: &str| format!("{table}.{k}");
        // A key left out takes the value already validated where it came from.
        let count = |v: &mut Self, k: &str, value: Option<u64>, default: usize, min: u64, max: u64| match value {
            None => default,
            some => v.count(&key(k), some, default as u64, min, max),
        };
        let max_message_bytes =
            count(self, "max_message_bytes", raw.max_message_bytes, d.max_message_bytes, 1024, 1 << 30);
        let client_read_bytes =
            count(self, "ws_read_buffer_bytes", raw.ws_read_buffer_bytes, d.client_read_bytes, 1024, 16 << 20);
        let backend_read_bytes =
            count(self, "backend_read_bytes", raw.backend_read_bytes, d.backend_read_bytes, 1024, 16 << 20);
        let max_pending_connects =
            count(self, "max_pending_connects", raw.max_pending_connects, d.max_pending_connects, 1, 100_000);
        let seconds = |v: &mut Self, k: &str, value: Option<Seconds>, default: Duration| match value {
            None => default,
            some => v.seconds(&key(k), some, default.as_secs_f64()),
        };
        let connect_timeout = seconds(self, "connect_timeout_secs", raw.connect_timeout_secs, d.connect_timeout);
        let close_timeout = seconds(self, "close_timeout_secs", raw.close_timeout_secs, d.close_timeout);
        let pong_timeout = seconds(self, "pong_timeout_secs", raw.pong_timeout_secs, d.pong_timeout);
        SessionLimits {
            max_message_bytes,
            client_read_bytes,
            backend_read_bytes,
            connect_timeout,
            close_timeout,
            // What Linux accepts for TCP_KEEPIDLE.
            tcp_keepalive: self.whole_secs_or_off(
                &key("tcp_keepalive_secs"),
                raw.tcp_keepalive_secs,
                d.tcp_keepalive,
                32767,
            ),
            tcp_user_timeout: self.whole_secs_or_off(
                &key("tcp_user_timeout_secs"),
                raw.tcp_user_timeout_secs,
                d.tcp_user_timeout,
                MAX_SECS as i64,
            ),
            ping_interval: self.secs_or_off(&key("ping_interval_secs"), raw.ping_interval_secs, d.ping_interval),
            pong_timeout,
            idle_timeout: self.secs_or_off(&key("idle_timeout_secs"), raw.idle_timeout_secs, d.idle_timeout),
            max_session: self.secs_or_off(&key("max_session_secs"), raw.max_session_secs, d.max_session),
            max_messages_per_sec: match raw.max_messages_per_sec {
                None => d.max_messages_per_sec,
                Some(0) => None,
                some => Some(self.count(
                    &key("max_messages_per_sec"),
                    some,
                    d.max_messages_per_sec.unwrap_or(DEFAULT_MAX_MESSAGES_PER_SEC),
                    0,
                    MAX_MESSAGES_PER_SEC,
                ) as u64),
            },
            max_pending_connects,
            max_sessions: d.max_sessions,
        }
    }

    fn per_client(&mut self, raw: RawPerClient) -> PerClient {
        let d = DEFAULT_PER_CLIENT;
        let key = |k: &str| format!("limits.per_client.{k}");
        let rate = match raw.new_connections_per_sec {
            None => d.new_connections_per_sec,
            Some(Seconds::Whole(n)) => n as f64,
            Some(Seconds::Fraction(f)) => f,
        };
        // Below one connection in 1,000 seconds a refused client's Retry-After would be absurd.
        let rate = if rate == 0.0 || (0.001..=1_000_000.0).contains(&rate) {
            rate
        } else {
            self.fail(key("new_connections_per_sec"), format!("{rate} is out of range: 0 (off), or 0.001 to 1000000"));
            d.new_connections_per_sec
        };
        PerClient {
            max_connections: self.count(
                &key("max_connections"),
                raw.max_connections,
                d.max_connections as u64,
                0,
                1_000_000,
            ),
            max_handshakes: self.count(&key("max_handshakes"), raw.max_handshakes, d.max_handshakes as u64, 0, 100_000),
            new_connections_per_sec: rate,
            new_connections_burst: self.count(
                &key("new_connections_burst"),
                raw.new_connections_burst,
                d.new_connections_burst as u64,
                1,
                1_000_000,
            ),
            ipv6_prefix: self.count(&key("ipv6_prefix"), raw.ipv6_prefix, u64::from(d.ipv6_prefix), 1, 128) as u8,
            max_tracked: self.count(&key("max_tracked"), raw.max_tracked, d.max_tracked as u64, 1024, 10_000_000),
            max_auth_failures: self.count(
                &key("max_auth_failures"),
                raw.max_auth_failures,
                d.max_auth_failures as u64,
                0,
                1_000_000,
            ),
            auth_failure_window: self.seconds(
                &key("auth_failure_window_secs"),
                raw.auth_failure_window_secs,
                d.auth_failure_window.as_secs_f64(),
            ),
            auth_block: self.seconds(&key("auth_block_secs"), raw.auth_block_secs, d.auth_block.as_secs_f64()),
        }
    }

    /// Whole seconds from 1 to `max`, or 0 for off; `default` when absent.
    fn whole_secs_or_off(
        &mut self,
        key: &str,
        value: Option<Seconds>,
        default: Option<Duration>,
        max: i64,
    ) -> Option<Duration> {
        match value {
            None => default,
            Some(Seconds::Whole(0)) => None,
            Some(Seconds::Whole(n)) if (1..=max).contains(&n) => Some(Duration::from_secs(n.unsigned_abs())),
            Some(Seconds::Whole(n)) => {
                self.fail(key, format!("{n} is out of range: 0 (off) or 1 to {max} whole seconds"));
                default
            }
            Some(Seconds::Fraction(f)) => {
                self.fail(key, format!("{f} must be a whole number of seconds: 0 (off) or 1 to {max}"));
                default
            }
        }
    }

    /// Seconds from 0 to [`MAX_SECS`], 0 meaning off; `default` when absent.
    fn secs_or_off(&mut self, key: &str, value: Option<Seconds>, default: Option<Duration>) -> Option<Duration> {
        let secs = match value {
            None => return default,
            Some(Seconds::Whole(n)) => n as f64,
            Some(Seconds::Fraction(f)) => f,
        };
        if secs == 0.0 {
            return None;
        }
        if !(1e-9..=MAX_SECS).contains(&secs) {
            self.fail(key, format!("{secs} is out of range: 0 (off), or more than 0 and at most {MAX_SECS} seconds"));
            return default;
        }
        Some(Duration::from_secs_f64(secs))
    }
}
