//! Stage two: `Raw*` values → a validated [`Config`], with every default and bound in one place.
//!
//! The `Validator` checks each key, turns it into a ready type and collects every problem
//! instead of stopping at the first, so `wsgate check` can list them all. The defaults below are
//! the documented ones: docs/config.md and the shipped `config.toml` repeat them. `limits` holds
//! those of the limits tables.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

mod addresses;
mod auth;
mod backend;
mod certs;
mod limits;
mod pool;
mod targets;

#[cfg(test)]
pub(super) use limits::DEFAULT_SESSION_LIMITS;

use super::raw::{AcceptKind, Choice, RawConfig, RawListener, RawReload, RawRoute, RawShutdown, Seconds};
use super::{
    Accept, AllowedOrigins, Backend, Builtin, Config, ConfigError, ConfigErrors, HostPattern, Listener, Log, LogFormat,
    OnRefusal, Outbound, PathMatch, Reload, Route, SessionLimits, Shutdown, TlsFiles, Unavailable,
};

// ---- Defaults and bounds: one place (limits in `limits`), mirrored in docs/config.md and
// config.toml. ----

/// Long enough for a load balancer's health check (commonly 5 s apart) to see `/readyz` fail.
const DEFAULT_DRAIN_DELAY_SECS: f64 = 5.0;
/// Spreads reconnects of many clients over 10 s instead of one instant.
const DEFAULT_CLOSE_WINDOW_SECS: f64 = 10.0;
/// Under Kubernetes' default terminationGracePeriodSeconds (30), with room to exit.
const DEFAULT_DEADLINE_SECS: f64 = 25.0;
const DEFAULT_ADMIN_ADDRESS: &str = "127.0.0.1:9090";
const MAX_SECS: f64 = 86_400.0;
/// Kubernetes takes up to a minute to update a mounted ConfigMap; two seconds more is noise,
/// and a `stat` per named file every two seconds costs nothing.
const DEFAULT_WATCH_INTERVAL_SECS: u64 = 2;
/// Log lines held for a stalled reader: about 5 MB of `session ended` lines (docs/config.md).
const DEFAULT_LOG_BUFFERED_LINES: u64 = 10_000;
const DEFAULT_CONSOLE_PATH: &str = "/console";

/// Validates `raw`, read from `text` at `path`: the config, or every problem found.
pub(super) fn validate(raw: RawConfig, text: &str, path: &Path) -> Result<Config, ConfigErrors> {
    let mut v = Validator { file: path.to_path_buf(), dir: base_dir(path), text, errors: Vec::new() };
    let config = v.config(raw);
    if v.errors.is_empty() { Ok(config) } else { Err(ConfigErrors(v.errors)) }
}

fn base_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::new(),
    }
}

struct Validator<'t> {
    file: PathBuf,
    dir: PathBuf,
    /// The file's contents, to turn a value's span into a line and column.
    text: &'t str,
    errors: Vec<ConfigError>,
}

impl Validator<'_> {
    fn fail(&mut self, key: impl Into<String>, problem: impl Into<String>) {
        self.errors.push(ConfigError {
            file: self.file.clone(),
            position: None,
            key: key.into(),
            problem: problem.into(),
        });
    }

    /// The value of a fixed-set key, `default` when absent, `None` (reported) when not in the set.
    fn choice<T>(&mut self, key: &str, value: Option<Choice<T>>, default: T) -> Option<T> {
        match value {
            None => Some(default),
            Some(Choice::Listed(v)) => Some(v),
            Some(Choice::Unlisted { written, span, allowed }) => {
                let allowed: Vec<String> = allowed.iter().map(|a| format!("{a:?}")).collect();
                let problem = format!("{written:?} is not one of {}", allowed.join(", "));
                self.errors.push(ConfigError::at(&self.file, self.text, span.start, key.to_string(), problem));
                None
            }
        }
    }

    fn config(&mut self, mut raw: RawConfig) -> Config {
        if raw.listeners.is_empty() {
            self.fail(
                "listeners",
                "at least one listener is required, e.g. [listeners.plain] address = \"127.0.0.1:8080\"",
            );
        }
        if raw.routes.is_empty() {
            self.fail(
                "routes",
                "at least one route is required, e.g. [routes.echo] path = \"/echo\" backend = \"builtin:echo\"",
            );
        }
        let listeners: Vec<Listener> = raw.listeners.into_iter().filter_map(|(n, l)| self.listener(n, l)).collect();
        self.check_distinct_addresses(&listeners);
        // Routes need `[limits]` (their defaults), but problems are listed in the file's order.
        let mark = self.errors.len();
        let limits = self.limits(raw.limits);
        let limits_problems = self.errors.split_off(mark);
        let routes: Vec<Route> =
            raw.routes.into_iter().filter_map(|(n, r)| self.route(n, r, &limits.session)).collect();
        self.check_distinct_routes(&routes);
        self.check_client_cert_routes(&listeners, &routes);
        self.errors.extend(limits_problems);
        let builtin =
            Builtin { tcp_echo: raw.builtin.tcp_echo.and_then(|a| self.loopback_addr("builtin.tcp_echo", &a)) };
        let shutdown = self.shutdown(raw.shutdown);
        let admin_access = self.admin_access(&mut raw.admin);
        let admin = match raw.admin.enabled {
            Some(false) => None,
            _ => self.socket_addr("admin.address", raw.admin.address.as_deref().unwrap_or(DEFAULT_ADMIN_ADDRESS)),
        };
        let log = Log {
            format: self.choice("log.format", raw.log.format, LogFormat::Text).unwrap_or(LogFormat::Text),
            max_buffered_lines: self.count(
                "log.max_buffered_lines",
                raw.log.max_buffered_lines,
                DEFAULT_LOG_BUFFERED_LINES,
                1,
                100_000,
            ),
        };
        let console = match (raw.console.enabled, raw.console.path) {
            (false, _) => None,
            (true, None) => Some(DEFAULT_CONSOLE_PATH.to_string()),
            (true, Some(p)) => self.route_path("console", p),
        };
        let metrics = raw.metrics.enabled.unwrap_or(true);
        let reload = self.reload(raw.reload);
        Config {
            path: self.file.clone(),
            listeners,
            routes,
            limits,
            builtin,
            shutdown,
            console,
            admin,
            log,
            metrics,
            admin_access,
            reload,
        }
    }

    fn listener(&mut self, name: String, raw: RawListener) -> Option<Listener> {
        let key = format!("listeners.{name}");
        let address = self.socket_addr(&format!("{key}.address"), &raw.address);
        let tls = raw.tls.map(|mut t| {
            let client_auth = self.client_auth(&key, &mut t);
            TlsFiles {
                cert: self.file_path(&format!("{key}.tls.cert"), &t.cert),
                key: self.file_path(&format!("{key}.tls.key"), &t.key),
                generate_self_signed: t.generate_self_signed,
                session_tickets: t.session_tickets.unwrap_or(true),
                ticket_keys: self.ticket_keys(&key, &t, client_auth.is_some()),
                client_auth,
            }
        });
        let addressing = self.addressing(&key, raw.proxy_protocol, raw.trusted_proxies, raw.forwarded_header);
        Some(Listener { name, address: address?, tls, addressing: addressing? })
    }

    fn check_distinct_addresses(&mut self, listeners: &[Listener]) {
        for (i, a) in listeners.iter().enumerate() {
            for b in &listeners[..i] {
                if a.address == b.address && a.address.port() != 0 {
                    self.fail(
                        format!("listeners.{}.address", a.name),
                        format!("{} is also the address of listener \"{}\"", a.address, b.name),
                    );
                }
            }
        }
    }

    fn socket_addr(&mut self, key: &str, value: &str) -> Option<SocketAddr> {
        match value.parse() {
            Ok(addr) => Some(addr),
            Err(_) => {
                self.fail(
                    key,
                    format!("{value:?} is not an IP address with a port, e.g. \"127.0.0.1:8080\" or \"[::1]:8080\""),
                );
                None
            }
        }
    }

    /// The built-in services echo whatever they receive: never expose them beyond this host.
    fn loopback_addr(&mut self, key: &str, value: &str) -> Option<SocketAddr> {
        let addr = self.socket_addr(key, value)?;
        if !addr.ip().is_loopback() {
            self.fail(key, format!("{value:?} must be a loopback address (127.0.0.0/8 or [::1])"));
            return None;
        }
        Some(addr)
    }

    fn file_path(&mut self, key: &str, value: &str) -> PathBuf {
        if value.is_empty() {
            self.fail(key, "must name a file");
        }
        self.dir.join(value)
    }

    fn route(&mut self, name: String, mut raw: RawRoute, defaults: &SessionLimits) -> Option<Route> {
        let key = format!("routes.{name}");
        let path = self.route_path(&key, raw.path);
        let path_match = self.choice(&format!("{key}.match"), raw.path_match, PathMatch::Exact);
        let host = match raw.host {
            None => Some(None),
            Some(h) => self.host_pattern(&format!("{key}.host"), &h).map(Some),
        };
        let backend = match raw.targets.take() {
            Some(targets) => {
                let others = [
                    ("backend", raw.backend.is_some()),
                    ("backends", raw.backends.is_some()),
                    ("balance", raw.balance.is_some()),
                    ("health", raw.health.is_some()),
                ];
                let found: Vec<&str> = others.iter().filter(|(_, set)| *set).map(|(name, _)| *name).collect();
                self.targets(&key, targets, &found, path.as_deref(), path_match).map(|t| Backend::Mapped(Box::new(t)))
            }
            None => {
                self.route_backend(&key, raw.backend.take(), raw.backends.take(), raw.balance.take(), raw.health.take())
            }
        };
        let allowed_origins = self.origins(&format!("{key}.allowed_origins"), raw.allowed_origins);
        let accept = self.accept(&format!("{key}.accept"), raw.accept);
        let outbound = self.choice(&format!("{key}.outbound"), raw.outbound, Outbound::Binary);
        let subprotocols = self.subprotocols(&format!("{key}.subprotocols"), raw.subprotocols);
        let on_backend_unavailable =
            self.choice(&format!("{key}.on_backend_unavailable"), raw.on_backend_unavailable, Unavailable::Close);
        let clients = self.client_rules(&format!("{key}.clients"), raw.clients);
        let proxy_protocol = self.proxy_version(&format!("{key}.proxy_protocol"), raw.proxy_protocol, backend.as_ref());
        let client_certs = self.client_certs(&format!("{key}.client_certs"), raw.client_certs);
        let backend_tls = self.backend_tls(&format!("{key}.backend_tls"), raw.backend_tls, backend.as_ref());
        self.probes_in_the_clear(&key, backend.as_ref(), backend_tls.as_ref());
        let raw_limits = raw.limits.unwrap_or_default();
        let mut limits = self.session_limits(&format!("{key}.limits"), raw_limits.session(), defaults);
        limits.max_sessions = raw_limits
            .max_sessions
            .map(|n| self.count(&format!("{key}.limits.max_sessions"), Some(n), 1, 1, 1_000_000));
        let on_refusal = self.choice(&format!("{key}.on_refusal"), raw.on_refusal, OnRefusal::Http);
        let auth = match raw.auth {
            None => Some(None),
            Some(a) => {
                self.auth(&format!("{key}.auth"), a, allowed_origins.as_ref(), subprotocols.as_deref()).map(Some)
            }
        };
        Some(Route {
            name,
            path: path?,
            path_match: path_match?,
            host: host?,
            backend: backend?,
            allowed_origins: allowed_origins?,
            accept: accept?,
            outbound: outbound?,
            subprotocols: subprotocols?,
            on_backend_unavailable: on_backend_unavailable?,
            clients: clients?,
            proxy_protocol: proxy_protocol?,
            limits,
            auth: auth?,
            on_refusal: on_refusal?,
            client_certs: client_certs?,
            backend_tls: backend_tls?,
            half_close: raw.half_close.unwrap_or(true),
        })
    }

    fn route_path(&mut self, key: &str, path: String) -> Option<String> {
        let key = format!("{key}.path");
        if !path.starts_with('/') {
            self.fail(key, format!("{path:?} must start with \"/\""));
            None
        } else if path.contains(['?', '#']) || path.chars().any(|c| c.is_whitespace() || c.is_control()) {
            self.fail(key, format!("{path:?} must be a plain path: no query, fragment or spaces"));
            None
        } else {
            Some(path)
        }
    }

    fn host_pattern(&mut self, key: &str, host: &str) -> Option<HostPattern> {
        let lower = host.to_ascii_lowercase();
        let (wild, name) = match lower.strip_prefix("*.") {
            Some(rest) => (true, rest),
            None => (false, lower.as_str()),
        };
        let valid = !name.is_empty()
            && name
                .split('.')
                .all(|label| !label.is_empty() && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'));
        if !valid {
            self.fail(key, format!("{host:?} is not a host name or \"*.\" followed by one (no port, no scheme)"));
            return None;
        }
        Some(if wild { HostPattern::Wildcard(format!(".{name}")) } else { HostPattern::Exact(name.to_string()) })
    }

    fn backend(&mut self, key: &str, value: &str) -> Option<Backend> {
        if let Some(kind) = value.strip_prefix("builtin:") {
            return match kind {
                "echo" => Some(Backend::Echo),
                _ => {
                    self.fail(key, format!("{value:?}: the only built-in backend is \"builtin:echo\""));
                    None
                }
            };
        }
        if let Some(rest) = value.strip_prefix("unix:") {
            return self.unix_backend(key, value, rest);
        }
        let target = value.strip_prefix("tcp://").unwrap_or(value);
        match split_host_port(target) {
            Ok((host, port)) => Some(Backend::Tcp { host, port }),
            Err(problem) => {
                self.fail(key, format!("{value:?} {problem}"));
                None
            }
        }
    }

    fn origins(&mut self, key: &str, list: Vec<String>) -> Option<AllowedOrigins> {
        if list.iter().any(|o| o == "*") {
            if list.len() > 1 {
                self.fail(key, "\"*\" allows every origin and cannot be combined with others");
                return None;
            }
            return Some(AllowedOrigins::Any);
        }
        let mut out = Vec::with_capacity(list.len());
        for origin in list {
            match normalize_origin(&origin) {
                Some(o) => out.push(o),
                None => self.fail(
                    key,
                    format!("{origin:?} is not an origin like \"https://app.example.com\" (scheme and host, optional port, no path)"),
                ),
            }
        }
        Some(AllowedOrigins::List(out))
    }

    fn accept(&mut self, key: &str, list: Option<Vec<Choice<AcceptKind>>>) -> Option<Accept> {
        let Some(list) = list else {
            return Some(Accept { text: true, binary: true });
        };
        let mut accept = Accept { text: false, binary: false };
        for kind in list {
            // The first item outside the set is reported; the rest of the list is not looked at.
            match self.choice(key, Some(kind), AcceptKind::Text)? {
                AcceptKind::Text => accept.text = true,
                AcceptKind::Binary => accept.binary = true,
            }
        }
        if !accept.text && !accept.binary {
            self.fail(key, "must list at least one of \"text\", \"binary\"");
            return None;
        }
        Some(accept)
    }

    fn subprotocols(&mut self, key: &str, list: Vec<String>) -> Option<Vec<String>> {
        // RFC 6455: each value is an RFC 2616 token (visible ASCII, no separators).
        let is_token =
            |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_graphic() && !b"()<>@,;:\\\"/[]?={}".contains(&b));
        for (i, p) in list.iter().enumerate() {
            if !is_token(p) {
                self.fail(key, format!("{p:?} is not a valid subprotocol token"));
                return None;
            }
            if list[..i].contains(p) {
                self.fail(key, format!("{p:?} is listed twice"));
                return None;
            }
        }
        Some(list)
    }

    fn count(&mut self, key: &str, value: Option<u64>, default: u64, min: u64, max: u64) -> usize {
        let v = value.unwrap_or(default);
        if !(min..=max).contains(&v) {
            self.fail(key, format!("{v} is out of range {min}..={max}"));
            return default as usize;
        }
        // In range, and the range fits in usize on every platform we build for (>= 32 bits).
        usize::try_from(v).unwrap_or(usize::MAX)
    }

    fn shutdown(&mut self, raw: RawShutdown) -> Shutdown {
        let drain_delay =
            self.seconds_or_zero("shutdown.drain_delay_secs", raw.drain_delay_secs, DEFAULT_DRAIN_DELAY_SECS);
        let close_window =
            self.seconds_or_zero("shutdown.close_window_secs", raw.close_window_secs, DEFAULT_CLOSE_WINDOW_SECS);
        let deadline = self.seconds("shutdown.deadline_secs", raw.deadline_secs, DEFAULT_DEADLINE_SECS);
        if deadline <= drain_delay + close_window {
            self.fail(
                "shutdown.deadline_secs",
                format!(
                    "{} must be greater than drain_delay_secs + close_window_secs ({})",
                    deadline.as_secs_f64(),
                    (drain_delay + close_window).as_secs_f64()
                ),
            );
        }
        Shutdown { drain_delay, close_window, deadline }
    }

    fn reload(&mut self, raw: RawReload) -> Reload {
        let secs =
            self.count("reload.watch_interval_secs", raw.watch_interval_secs, DEFAULT_WATCH_INTERVAL_SECS, 1, 3600);
        Reload { watch: raw.watch.unwrap_or(true), watch_interval: Duration::from_secs(secs as u64) }
    }

    fn seconds_or_zero(&mut self, key: &str, value: Option<Seconds>, default: f64) -> Duration {
        match value {
            Some(Seconds::Whole(0)) => Duration::ZERO,
            Some(Seconds::Fraction(0.0)) => Duration::ZERO,
            Some(Seconds::Whole(n)) if n < 0 => self.negative(key, n as f64),
            Some(Seconds::Fraction(f)) if f < 0.0 => self.negative(key, f),
            other => self.seconds(key, other, default),
        }
    }

    fn negative(&mut self, key: &str, secs: f64) -> Duration {
        self.fail(key, format!("{secs} is out of range: 0 to {MAX_SECS} seconds"));
        Duration::ZERO
    }

    fn seconds(&mut self, key: &str, value: Option<Seconds>, default: f64) -> Duration {
        let secs = match value {
            None => default,
            Some(Seconds::Whole(n)) => n as f64,
            Some(Seconds::Fraction(f)) => f,
        };
        // A positive value below a nanosecond would become a zero duration.
        if !(1e-9..=MAX_SECS).contains(&secs) {
            let range = if secs > 0.0 && secs < 1e-9 { " (at least a nanosecond)" } else { "" };
            self.fail(key, format!("{secs} is out of range: more than 0{range} and at most {MAX_SECS} seconds"));
            return Duration::from_secs_f64(default);
        }
        Duration::from_secs_f64(secs)
    }

    fn check_distinct_routes(&mut self, routes: &[Route]) {
        for (i, a) in routes.iter().enumerate() {
            for b in &routes[..i] {
                if a.path == b.path && a.path_match == b.path_match && a.host == b.host {
                    self.fail(
                        format!("routes.{}", a.name),
                        format!(
                            "matches exactly the same requests as route \"{}\" (same path, match and host)",
                            b.name
                        ),
                    );
                }
            }
        }
    }
}

/// Splits `host:port` / `[v6]:port`; the error completes a sentence starting with the value.
pub fn split_host_port(s: &str) -> Result<(String, u16), &'static str> {
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let (h, after) = rest.split_once(']').ok_or("has an unclosed \"[\"")?;
        let p = after.strip_prefix(':').ok_or("has no port")?;
        (h, p)
    } else {
        let (h, p) = s.rsplit_once(':').ok_or("has no port")?;
        if h.contains(':') {
            return Err("has an IPv6 address without brackets, write \"[::1]:5900\"");
        }
        (h, p)
    };
    if host.is_empty() {
        return Err("has no host");
    }
    if host.contains(['/', ' ', '@']) {
        return Err("is not host:port");
    }
    match port.parse::<u16>() {
        Ok(0) | Err(_) => Err("has no valid port (1-65535)"),
        Ok(p) => Ok((host.to_string(), p)),
    }
}

/// Normalises an origin to lower-case `scheme://host[:port]`, dropping the scheme's default port,
/// the same way the policy module normalises request origins. `None` when it is not an origin.
pub fn normalize_origin(origin: &str) -> Option<String> {
    let lower = origin.trim_end_matches('/').to_ascii_lowercase();
    let (scheme, rest) = lower.split_once("://")?;
    let default_port = match scheme {
        "http" => "80",
        "https" => "443",
        _ => return None,
    };
    if rest.is_empty() || rest.contains(['/', '?', '#', '@', ' ']) {
        return None;
    }
    // Split host and port; an IPv6 host keeps its brackets.
    let (host, port) = match rest.strip_prefix('[') {
        Some(v6) => {
            let (addr, after) = v6.split_once(']')?;
            (&rest[..addr.len() + 2], after.strip_prefix(':'))
        }
        None => match rest.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (rest, None),
        },
    };
    // A fully qualified name's trailing dot names the same host (as in the router).
    let host = host.strip_suffix('.').unwrap_or(host);
    if host.is_empty() || host.trim_matches(['[', ']']).is_empty() {
        return None;
    }
    let hostport = match port {
        None => host.to_string(),
        Some(p) if p.parse::<u16>().is_err() => return None,
        Some(p) if p == default_port => host.to_string(),
        Some(p) => format!("{host}:{p}"),
    };
    Some(format!("{scheme}://{hostport}"))
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::time::Duration;

    use crate::config::test_support::{MINIMAL, err, ok};
    use crate::config::*;

    /// The defaults documented in docs/config.md are the ones applied.
    #[test]
    fn minimal_config_gets_documented_defaults() {
        let c = ok(MINIMAL);
        assert_eq!(c.limits.max_connections, 10_000);
        assert_eq!(c.limits.max_handshakes, 256);
        assert_eq!(c.limits.session.max_message_bytes, 10_485_760);
        assert_eq!(c.limits.session.client_read_bytes, 65_536);
        assert_eq!(c.limits.session.backend_read_bytes, 262_144);
        assert_eq!(c.limits.session.connect_timeout, Duration::from_secs(5));
        assert_eq!(c.limits.handshake_timeout, Duration::from_secs(10));
        assert_eq!(c.limits.session.close_timeout, Duration::from_secs(5));
        assert_eq!(c.limits.session.tcp_keepalive, Some(Duration::from_secs(60)));
        assert_eq!(c.limits.session.max_pending_connects, 128);
        assert_eq!(c.limits.session.max_sessions, None);
        assert_eq!(c.limits.request_head_timeout, Duration::from_secs(5));
        assert_eq!(c.limits.handshake_shed_after, Duration::from_secs(2));
        assert_eq!(c.limits.listen_backlog, 4096);
        assert_eq!(c.limits.max_memory, MemoryBudget::Auto);
        let p = c.limits.per_client;
        assert_eq!((p.max_connections, p.max_handshakes, p.new_connections_burst), (256, 32, 100));
        assert_eq!((p.new_connections_per_sec, p.ipv6_prefix, p.max_tracked), (20.0, 64, 65_536));
        assert_eq!(c.routes[0].limits, c.limits.session, "a route without a limits table gets [limits]");
        assert_eq!(c.shutdown.drain_delay, Duration::from_secs(5));
        assert_eq!(c.shutdown.close_window, Duration::from_secs(10));
        assert_eq!(c.shutdown.deadline, Duration::from_secs(25));
        assert_eq!(c.admin, Some("127.0.0.1:9090".parse().unwrap()));
        assert_eq!(c.log, Log { format: LogFormat::Text, max_buffered_lines: 10_000 });
        assert!(c.metrics, "metrics are on unless the config turns them off");
        assert_eq!(c.reload, Reload { watch: true, watch_interval: Duration::from_secs(2) });
        let r = &c.routes[0];
        assert_eq!(r.path_match, PathMatch::Exact);
        assert_eq!(r.outbound, Outbound::Binary);
        assert_eq!(r.on_backend_unavailable, Unavailable::Close);
        assert_eq!(r.allowed_origins, AllowedOrigins::List(vec![]));
        assert_eq!(r.accept, Accept { text: true, binary: true });
        assert!(r.subprotocols.is_empty());
        assert_eq!(c.listeners[0].scheme(), "ws");
        assert_eq!(c.console, None, "the console is off unless the config enables it");
    }

    /// A route's `limits` table overrides `[limits]` key by key; what it leaves out comes from
    /// `[limits]`, not from the built-in defaults.
    #[test]
    fn route_limits_override_the_global_ones() {
        let c = ok(&format!(
            "{MINIMAL}[routes.echo.limits]\nmax_message_bytes = 4096\nmax_sessions = 3\ntcp_keepalive_secs = 0\n\
             [limits]\nclose_timeout_secs = 2\nmax_message_bytes = 8192\n"
        ));
        let r = c.routes[0].limits;
        assert_eq!(r.max_message_bytes, 4096);
        assert_eq!(r.max_sessions, Some(3));
        assert_eq!(r.tcp_keepalive, None);
        assert_eq!(r.close_timeout, Duration::from_secs(2));
        assert_eq!(c.limits.session.max_message_bytes, 8192);
        assert_eq!(c.limits.session.max_sessions, None);
        let e = err(&format!("{MINIMAL}[routes.echo.limits]\nmax_sessions = 0\nmax_message_bytes = 10\n"));
        assert!(e.contains("test.toml: routes.echo.limits.max_sessions: 0 is out of range 1..=1000000"), "{e}");
        assert!(e.contains("test.toml: routes.echo.limits.max_message_bytes: 10 is out of range"), "{e}");
        // Gateway-wide keys are not a route's to set; route-only keys are not [limits]'.
        let e = err(&format!("{MINIMAL}[routes.echo.limits]\nmax_connections = 5\n"));
        assert!(e.contains("routes.echo.limits.max_connections: unknown field"), "{e}");
        let e = err(&format!("{MINIMAL}[limits]\nmax_sessions = 5\n"));
        assert!(e.contains("limits.max_sessions: unknown field"), "{e}");
        let e = err(&format!("{MINIMAL}[limits.per_client]\nnew_connections_per_sec = 1e-20\n"));
        assert!(e.contains("limits.per_client.new_connections_per_sec: 0.00000000000000000001 is out of range"), "{e}");
        let e = err(&format!("{MINIMAL}[limits.per_client]\nnew_connections_per_sec = -1\nipv6_prefix = 0\n"));
        assert!(e.contains("limits.per_client.new_connections_per_sec: -1 is out of range"), "{e}");
        assert!(e.contains("limits.per_client.ipv6_prefix: 0 is out of range 1..=128"), "{e}");
        assert_eq!(ok(&format!("{MINIMAL}[limits]\nmax_memory_bytes = 0\n")).limits.max_memory, MemoryBudget::Off);
    }

    /// The issue's own example: a backend without a port is one line naming file, key and value.
    #[test]
    fn backend_without_port_names_route_and_key() {
        let e = err(&MINIMAL.replace("builtin:echo", "localhost"));
        assert_eq!(e, "test.toml: routes.echo.backend: \"localhost\" has no port");
    }

    /// Backends parse with or without `tcp://`, IPv6 in brackets; bad ports and kinds are refused.
    #[test]
    fn backends_parse_with_and_without_scheme() {
        let c = ok(&MINIMAL.replace("builtin:echo", "tcp://[::1]:5900"));
        assert_eq!(c.routes[0].backend, Backend::Tcp { host: "::1".into(), port: 5900 });
        assert_eq!(c.routes[0].backend.to_string(), "[::1]:5900");
        let c = ok(&MINIMAL.replace("builtin:echo", "vnc.internal:5900"));
        assert_eq!(c.routes[0].backend, Backend::Tcp { host: "vnc.internal".into(), port: 5900 });
        assert!(err(&MINIMAL.replace("builtin:echo", "host:0")).contains("no valid port"));
        assert!(err(&MINIMAL.replace("builtin:echo", "::1:5900")).contains("brackets"));
        assert!(err(&MINIMAL.replace("builtin:echo", "builtin:ftp")).contains("builtin:echo"));
    }

    /// Validation reports every problem, one line each, not just the first.
    #[test]
    fn all_problems_are_listed_one_per_line() {
        let e = err(
            "[listeners.a]\naddress = \"nope\"\n[routes.r]\npath = \"echo\"\nbackend = \"x\"\n[limits]\nmax_connections = 0\n",
        );
        let lines: Vec<&str> = e.lines().collect();
        assert_eq!(lines.len(), 4, "{e}");
        assert!(lines.iter().any(|l| l.contains("listeners.a.address")));
        assert!(lines.iter().any(|l| l.contains("routes.r.path")));
        assert!(lines.iter().any(|l| l.contains("routes.r.backend")));
        assert!(lines.iter().any(|l| l.contains("limits.max_connections: 0 is out of range")));
    }

    /// Relative certificate paths resolve against the config file's directory; generation is off by default.
    #[test]
    fn relative_tls_paths_resolve_against_the_config_directory() {
        let text = format!(
            "{MINIMAL}[listeners.secure]\naddress = \"127.0.0.1:8443\"\ntls = {{ cert = \"c.pem\", key = \"k.pem\" }}\n"
        );
        let c = parse(&text, Path::new("/etc/wsgate/config.toml")).unwrap();
        let tls = c.listeners.iter().find(|l| l.name == "secure").unwrap().tls.clone().unwrap();
        assert_eq!(tls.cert, Path::new("/etc/wsgate/c.pem"));
        assert_eq!(tls.key, Path::new("/etc/wsgate/k.pem"));
        assert!(!tls.generate_self_signed, "generation is off unless the config asks for it");
    }

    /// Origins are normalised (case, default port, trailing slash); "*" cannot be mixed with others.
    #[test]
    fn origins_normalise_and_star_stands_alone() {
        assert_eq!(normalize_origin("HTTPS://App.Example.com:443/"), Some("https://app.example.com".into()));
        assert_eq!(normalize_origin("http://localhost:8080"), Some("http://localhost:8080".into()));
        assert_eq!(normalize_origin("http://[::1]:8080"), Some("http://[::1]:8080".into()));
        assert_eq!(normalize_origin("ftp://x"), None);
        assert_eq!(normalize_origin("https://x/path"), None);
        assert!(
            err(&format!("{MINIMAL}allowed_origins = [\"*\", \"https://a\"]\n"))
                .contains("routes.echo.allowed_origins")
        );
    }

    /// Two routes matching the same requests, or two listeners on one address, are refused.
    #[test]
    fn duplicate_routes_and_addresses_are_refused() {
        let e = err(&format!("{MINIMAL}[routes.again]\npath = \"/echo\"\nbackend = \"builtin:echo\"\n"));
        assert!(e.contains("routes.echo") && e.contains("\"again\""), "{e}");
        let e = err(&format!("{MINIMAL}[listeners.other]\naddress = \"127.0.0.1:8080\"\n"));
        assert!(e.contains("listeners.plain.address"), "{e}");
    }

    /// `accept`, `subprotocols`, `outbound = "mirror"` and `[console]` parse and validate.
    #[test]
    fn accept_subprotocols_and_console() {
        let c = ok(&format!(
            "{MINIMAL}accept = [\"binary\"]\nsubprotocols = [\"binary\", \"mqtt\"]\noutbound = \"mirror\"\n[console]\nenabled = true\n"
        ));
        let r = &c.routes[0];
        assert_eq!(r.accept, Accept { text: false, binary: true });
        assert_eq!(r.subprotocols, vec!["binary".to_string(), "mqtt".to_string()]);
        assert_eq!(r.outbound, Outbound::Mirror);
        assert_eq!(c.console.as_deref(), Some("/console"));
        assert!(err(&format!("{MINIMAL}accept = []\n")).contains("routes.echo.accept"));
        assert!(err(&format!("{MINIMAL}subprotocols = [\"a b\"]\n")).contains("routes.echo.subprotocols"));
        assert!(err(&format!("{MINIMAL}[console]\nenabled = true\npath = \"console\"\n")).contains("console.path"));
    }

    /// `half_close`: true unless set; `false` reads; anything but a boolean is one line naming it.
    #[test]
    fn half_close() {
        assert!(ok(MINIMAL).routes[0].half_close);
        assert!(!ok(&format!("{MINIMAL}half_close = false\n")).routes[0].half_close);
        let e = err(&format!("{MINIMAL}half_close = 0\n"));
        assert!(e.contains("routes.echo.half_close: invalid type: integer `0`, expected a boolean"), "{e}");
        assert!(!e.contains('\n'), "{e}");
    }

    /// `[reload]`: the watch can be turned off and its interval set within 1..=3600 seconds; an
    /// interval outside it is an error naming the key.
    #[test]
    fn reload_keys() {
        let c = ok(&format!("{MINIMAL}[reload]\nwatch = false\nwatch_interval_secs = 3600\n"));
        assert_eq!(c.reload, Reload { watch: false, watch_interval: Duration::from_secs(3600) });
        for bad in ["0", "3601"] {
            let e = err(&format!("{MINIMAL}[reload]\nwatch_interval_secs = {bad}\n"));
            assert!(e.contains(&format!("reload.watch_interval_secs: {bad} is out of range 1..=3600")), "{e}");
        }
        let e = err(&format!("{MINIMAL}[reload]\nwatch_interval_secs = 0.5\n"));
        assert!(e.contains("reload.watch_interval_secs"), "{e}");
    }

    /// `[shutdown]` (with zero delays), `[admin]`, `[log]` and `tcp_keepalive_secs` parse and validate.
    #[test]
    fn shutdown_admin_and_log() {
        let c = ok(&format!(
            "{MINIMAL}[shutdown]\ndrain_delay_secs = 0\nclose_window_secs = 0.5\ndeadline_secs = 2\n[admin]\nenabled = false\n[log]\nformat = \"json\"\n"
        ));
        assert_eq!(c.shutdown.drain_delay, Duration::ZERO);
        assert_eq!(c.shutdown.close_window, Duration::from_millis(500));
        assert_eq!(c.admin, None);
        assert_eq!(c.log.format, LogFormat::Json);
        let c = ok(&format!("{MINIMAL}[log]\nmax_buffered_lines = 1\n"));
        assert_eq!(c.log.max_buffered_lines, 1);
        let e = err(&format!("{MINIMAL}[log]\nmax_buffered_lines = 0\n"));
        assert!(e.contains("log.max_buffered_lines: 0 is out of range 1..=100000"), "{e}");
        let e =
            err(&format!("{MINIMAL}[shutdown]\ndrain_delay_secs = 5\nclose_window_secs = 10\ndeadline_secs = 12\n"));
        assert!(e.contains("shutdown.deadline_secs: 12 must be greater than"), "{e}");
        assert!(err(&format!("{MINIMAL}[limits]\ntcp_keepalive_secs = 0.5\n")).contains("limits.tcp_keepalive_secs"));
        assert!(err(&format!("{MINIMAL}[limits]\ntcp_keepalive_secs = 40000\n")).contains("1 to 32767"));
        assert_eq!(ok(&format!("{MINIMAL}[limits]\ntcp_keepalive_secs = 0\n")).limits.session.tcp_keepalive, None);
    }

    /// `tcp_user_timeout_secs`: 60 s by default, 0 for off, whole seconds up to a day.
    #[test]
    fn tcp_user_timeout() {
        assert_eq!(ok(MINIMAL).limits.session.tcp_user_timeout, Some(Duration::from_secs(60)));
        assert_eq!(
            ok(&format!("{MINIMAL}[limits]\ntcp_user_timeout_secs = 0\n")).limits.session.tcp_user_timeout,
            None
        );
        for (line, key) in [
            ("tcp_user_timeout_secs = 1.5", "limits.tcp_user_timeout_secs: 1.5 must be a whole number"),
            ("tcp_user_timeout_secs = 86401", "limits.tcp_user_timeout_secs: 86401 is out of range"),
        ] {
            let e = err(&format!("{MINIMAL}[limits]\n{line}\n"));
            assert!(e.contains(key) && e.lines().count() == 1, "{line}: {e}");
        }
    }

    /// The liveness keys: their defaults (pings on, idle and lifetime off), 0 for off, fractions
    /// where allowed, and one line naming the key for a value out of range.
    #[test]
    fn liveness_keys() {
        let l = ok(MINIMAL).limits.session;
        assert_eq!(l.ping_interval, Some(Duration::from_secs(30)));
        assert_eq!(l.pong_timeout, Duration::from_secs(30));
        assert_eq!((l.idle_timeout, l.max_session), (None, None));
        assert_eq!(l.max_messages_per_sec, Some(100_000));
        let l = ok(&format!(
            "{MINIMAL}[limits]\nping_interval_secs = 0\npong_timeout_secs = 0.25\nidle_timeout_secs = 300\n\
             max_session_secs = 0.5\nmax_messages_per_sec = 0\n"
        ))
        .limits
        .session;
        assert_eq!(l.ping_interval, None);
        assert_eq!(l.pong_timeout, Duration::from_millis(250));
        assert_eq!(l.idle_timeout, Some(Duration::from_secs(300)));
        assert_eq!(l.max_session, Some(Duration::from_millis(500)));
        assert_eq!(l.max_messages_per_sec, None);
        for (line, key) in [
            ("ping_interval_secs = -1", "limits.ping_interval_secs: -1 is out of range"),
            ("pong_timeout_secs = 0", "limits.pong_timeout_secs: 0 is out of range"),
            ("idle_timeout_secs = 86401", "limits.idle_timeout_secs: 86401 is out of range"),
            ("max_session_secs = -0.5", "limits.max_session_secs: -0.5 is out of range"),
            ("max_messages_per_sec = 10000001", "limits.max_messages_per_sec: 10000001 is out of range"),
        ] {
            let e = err(&format!("{MINIMAL}[limits]\n{line}\n"));
            assert!(e.contains(key) && e.lines().count() == 1, "{line}: {e}");
        }
    }

    /// `*.example.com` matches subdomains only; a host with a port is refused.
    #[test]
    fn host_patterns() {
        let c = ok(&format!("{MINIMAL}host = \"*.Example.com\"\n"));
        let h = c.routes[0].host.clone().unwrap();
        assert!(h.matches("a.example.com") && h.matches("a.b.example.com"));
        assert!(!h.matches("example.com") && !h.matches("badexample.com"));
        assert!(err(&format!("{MINIMAL}host = \"example.com:80\"\n")).contains("routes.echo.host"));
    }

    /// A value outside a fixed set names its line, column, key and the allowed values, and is
    /// listed with every other problem in the file instead of stopping the parse.
    #[test]
    fn fixed_set_values_are_listed_with_the_other_problems() {
        let e = err(&format!(
            "{MINIMAL}outbound = \"bogus\"\nmatch = \"regex\"\naccept = [\"text\", \"json\"]\non_backend_unavailable = \"retry\"\n\
             [limits]\nmax_connections = 0\n[log]\nformat = \"xml\"\n"
        ));
        let lines: Vec<&str> = e.lines().collect();
        assert_eq!(
            lines,
            [
                "test.toml:8:9: routes.echo.match: \"regex\" is not one of \"exact\", \"prefix\"",
                "test.toml:9:19: routes.echo.accept: \"json\" is not one of \"text\", \"binary\"",
                "test.toml:7:12: routes.echo.outbound: \"bogus\" is not one of \"binary\", \"text\", \"mirror\"",
                "test.toml:10:26: routes.echo.on_backend_unavailable: \"retry\" is not one of \"close\", \"http\"",
                "test.toml: limits.max_connections: 0 is out of range 1..=1000000",
                "test.toml:14:10: log.format: \"xml\" is not one of \"text\", \"json\"",
            ],
            "{e}"
        );
    }

    /// Every value of each fixed set is read, so the serde names match the documented ones.
    #[test]
    fn fixed_set_values_parse() {
        let c = ok(&format!(
            "{MINIMAL}match = \"prefix\"\noutbound = \"text\"\non_backend_unavailable = \"http\"\naccept = [\"text\"]\n"
        ));
        let r = &c.routes[0];
        assert_eq!(r.path_match, PathMatch::Prefix);
        assert_eq!(r.outbound, Outbound::Text);
        assert_eq!(r.on_backend_unavailable, Unavailable::Http);
        assert_eq!(r.accept, Accept { text: true, binary: false });
        let c = ok(&format!(
            "{MINIMAL}match = \"exact\"\noutbound = \"binary\"\non_backend_unavailable = \"close\"\n[log]\nformat = \"text\"\n"
        ));
        assert_eq!(c.routes[0].path_match, PathMatch::Exact);
        assert_eq!(c.routes[0].outbound, Outbound::Binary);
        assert_eq!(c.routes[0].on_backend_unavailable, Unavailable::Close);
        assert_eq!(c.log.format, LogFormat::Text);
    }

    /// A fixed-set key given a non-string is still a toml type error naming the key.
    #[test]
    fn fixed_set_key_of_the_wrong_type_names_the_key() {
        let e = err(&format!("{MINIMAL}outbound = 5\n"));
        assert!(e.starts_with("test.toml:7:12: routes.echo.outbound: invalid type"), "{e}");
    }
}
