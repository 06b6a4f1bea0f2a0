//! What the fuzz targets run, as plain functions over wsgate's public API: a request head through
//! the request path up to the admission decision ([`Gate::check`]), and config text through the
//! loader ([`check_config`]). Each panics when an invariant breaks, so the fuzzer reports it as a
//! crash.
//!
//! The same file is compiled into the integration tests (`tests/e2e/properties.rs`), which run it
//! on generated inputs with stable Rust in every `cargo test`: the harness cannot rot unbuilt,
//! and the fuzzer and the tests check the same invariants.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use base64::Engine;
use hyper::header::{self, HeaderName, HeaderValue};
use hyper::{HeaderMap, Method, Uri, Version};
use wsgate::config::{AllowedOrigins, PathMatch, normalize_origin};
use wsgate::metrics::Metrics;
use wsgate::policy::{self, HostError, RefusalKind};
use wsgate::router::{Router, normalize_host};

/// The routes requests are checked against: every kind of host pattern, path match, origin list
/// and subprotocol list, so each branch of routing and admission can be reached.
pub const CONFIG: &str = r#"
[listeners.plain]
address = "127.0.0.1:8080"
[routes.open]
path = "/"
match = "prefix"
backend = "builtin:echo"
allowed_origins = ["*"]
[routes.vnc]
path = "/vnc"
match = "prefix"
host = "vnc.example.com"
backend = "127.0.0.1:5900"
subprotocols = ["binary"]
[routes.wild]
path = "/vnc"
match = "prefix"
host = "*.example.com"
backend = "127.0.0.1:5901"
allowed_origins = ["https://app.example.com"]
[routes.mqtt]
path = "/mqtt"
backend = "127.0.0.1:1883"
subprotocols = ["mqtt", "mqttv3.1"]
[routes.exact]
path = "/exact"
backend = "builtin:echo"
"#;

/// How a request head fared.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Not a complete HTTP/1.x request head (hyper answers such requests itself, or waits).
    Unparsed,
    /// Refused before routing: no usable host.
    NoHost,
    /// Matched no route.
    NoRoute,
    /// Refused by admission, with the status and kind.
    Refused(u16, RefusalKind),
    /// Admitted on this route.
    Admitted(String),
}

/// The route table of [`CONFIG`].
pub struct Gate {
    router: Router,
    _metrics: Arc<Metrics>,
}

impl Default for Gate {
    fn default() -> Self {
        Gate::new()
    }
}

impl Gate {
    /// The table, with metrics that record nowhere.
    pub fn new() -> Gate {
        let config = wsgate::config::parse(CONFIG, Path::new("fuzz.toml")).expect("the harness config is valid");
        let metrics = Arc::new(Metrics::new(false));
        let pools = wsgate::backend::Pools::new(metrics.clone());
        let router = Router::new(&config.routes, |name| metrics.route(name), |_| Default::default(), &pools, |_| None);
        Gate { router, _metrics: metrics }
    }

    /// Fuzzer input: the first byte says whether the request came over TLS, the rest is the head.
    pub fn check_bytes(&self, data: &[u8]) -> Verdict {
        match data.split_first() {
            Some((flags, head)) => self.check(head, flags & 1 == 1),
            None => Verdict::Unparsed,
        }
    }

    /// Runs one request head (as read from the socket) through what the server does with it up
    /// to the admission decision: `policy::host` → `Router::find` → `policy::admit`, checking
    /// each step's invariants.
    pub fn check(&self, head: &[u8], secure: bool) -> Verdict {
        let Some(req) = parse_head(head) else { return Verdict::Unparsed };
        let hosts = req.headers.get_all(header::HOST).iter().count();
        // A route with a host never matches a request without one.
        if let Some(e) = self.router.find(None, req.target.path()) {
            assert!(e.route.host.is_none(), "route {} matched without a host", e.route.name);
        }
        let host = match policy::host(&req.target, &req.headers) {
            Ok(host) => host,
            Err(e) => {
                match hosts {
                    0 => assert_eq!(e, HostError::Missing),
                    1 => assert!(!matches!(e, HostError::Missing | HostError::Duplicate), "{e} with one Host"),
                    _ => assert_eq!(e, HostError::Duplicate),
                }
                let refusal = policy::Refusal::from(e);
                assert_eq!((refusal.status.as_u16(), refusal.kind), (400, RefusalKind::Host));
                assert_one_line(&refusal.reason);
                return Verdict::NoHost;
            }
        };
        assert_eq!(hosts, 1, "a host was found in a request with {hosts} Host headers");
        assert!(!host.is_empty());
        match req.target.authority() {
            Some(authority) => assert_eq!(host, authority.as_str(), "the target's authority wins"),
            None => {
                let sent = req.headers.get(header::HOST).and_then(|h| h.to_str().ok());
                assert_eq!(Some(host), sent.map(|h| h.trim_matches([' ', '\t'])), "the Host header as sent");
            }
        }
        let path = req.target.path();
        let Some(entry) = self.router.find(Some(host), path) else { return Verdict::NoRoute };
        let route = &entry.route;
        if let Some(pattern) = &route.host {
            assert!(pattern.matches(&normalize_host(host)), "{} matched host {host:?}", route.name);
        }
        match route.path_match {
            PathMatch::Exact => assert_eq!(path, route.path),
            PathMatch::Prefix => assert!(path.starts_with(&route.path), "{path} on {}", route.name),
        }
        let peer: SocketAddr = "192.0.2.1:40000".parse().expect("a valid address");
        let parts = policy::Request {
            method: &req.method,
            version: req.version,
            headers: &req.headers,
            host: Some(host),
            secure,
            peer,
            client_cert: None,
        };
        match policy::admit(parts, route) {
            Ok(admitted) => {
                check_admitted(&req, host, secure, route, admitted.subprotocol.as_deref());
                Verdict::Admitted(route.name.clone())
            }
            Err(refusal) => {
                assert_one_line(&refusal.reason);
                let status = refusal.status.as_u16();
                let expected: &[u16] = match refusal.kind {
                    RefusalKind::Request => &[400, 405, 426],
                    RefusalKind::Origin => &[403],
                    RefusalKind::Subprotocol => &[400],
                    other => panic!("admission refused with {other:?}"),
                };
                assert!(expected.contains(&status), "{status} for {:?}", refusal.kind);
                Verdict::Refused(status, refusal.kind)
            }
        }
    }
}

/// What an admitted request must be: a well-formed upgrade (RFC 6455 §4.2.1), from an allowed
/// origin (with the own origin counting only for a trusted host), naming a subprotocol both
/// sides know.
fn check_admitted(req: &Head, host: &str, secure: bool, route: &wsgate::config::Route, chosen: Option<&str>) {
    assert_eq!((req.method.clone(), req.version), (Method::GET, Version::HTTP_11));
    let tokens = |name: HeaderName| -> Vec<String> {
        req.headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty())
            .collect()
    };
    assert!(tokens(header::UPGRADE).iter().any(|t| t.eq_ignore_ascii_case("websocket")));
    assert!(tokens(header::CONNECTION).iter().any(|t| t.eq_ignore_ascii_case("upgrade")));
    assert_eq!(req.headers.get(header::SEC_WEBSOCKET_VERSION).map(HeaderValue::as_bytes), Some(&b"13"[..]));
    let key = req.headers.get(header::SEC_WEBSOCKET_KEY).expect("admitted without a key");
    let key = base64::engine::general_purpose::STANDARD.decode(key.as_bytes()).expect("admitted a key not base64");
    assert_eq!(key.len(), 16, "admitted a key of {} bytes", key.len());
    if let (Some(origin), AllowedOrigins::List(listed)) = (req.headers.get(header::ORIGIN), &route.allowed_origins) {
        let origin = origin.to_str().ok().and_then(normalize_origin).expect("admitted an origin that is not one");
        if !listed.contains(&origin) {
            let own = normalize_origin(&format!("{}://{host}", if secure { "https" } else { "http" }));
            assert_eq!(own.as_ref(), Some(&origin), "admitted a foreign origin on {}", route.name);
            let name = normalize_host(host);
            let trusted = name.trim_matches(['[', ']']).parse::<std::net::IpAddr>().is_ok()
                || name == "localhost"
                || route.host.as_ref().is_some_and(|p| p.matches(&name));
            assert!(trusted, "admitted its own origin for an untrusted host {host:?} (DNS rebinding)");
        }
    }
    let offered = tokens(header::SEC_WEBSOCKET_PROTOCOL);
    match chosen {
        None => assert!(offered.is_empty(), "offered {offered:?}, none chosen"),
        Some(p) => {
            assert!(offered.iter().any(|o| o == p), "chose {p}, not offered");
            assert!(route.subprotocols.iter().any(|s| s == p), "chose {p}, not the route's");
        }
    }
}

fn assert_one_line(reason: &str) {
    assert!(!reason.is_empty() && !reason.contains(['\r', '\n']), "reason {reason:?}");
}

/// A request head as hyper hands it over.
struct Head {
    method: Method,
    target: Uri,
    version: Version,
    headers: HeaderMap,
}

/// Parses a head with httparse, hyper's own parser, and builds what hyper would (`None` where
/// hyper answers 400 itself or waits for more).
fn parse_head(bytes: &[u8]) -> Option<Head> {
    let mut slots = [httparse::EMPTY_HEADER; 64];
    let mut parsed = httparse::Request::new(&mut slots);
    if !parsed.parse(bytes).ok()?.is_complete() {
        return None;
    }
    let method = Method::from_bytes(parsed.method?.as_bytes()).ok()?;
    let target: Uri = parsed.path?.parse().ok()?;
    let version = if parsed.version? == 1 { Version::HTTP_11 } else { Version::HTTP_10 };
    let mut headers = HeaderMap::new();
    for h in parsed.headers.iter() {
        headers.append(HeaderName::from_bytes(h.name.as_bytes()).ok()?, HeaderValue::from_bytes(h.value).ok()?);
    }
    Some(Head { method, target, version, headers })
}

/// Runs config text through the loader: it never panics, and every problem is one line that
/// names the file.
pub fn check_config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Err(errors) = wsgate::config::parse(text, Path::new("fuzz.toml")) {
        assert!(!errors.0.is_empty());
        for e in &errors.0 {
            let line = e.to_string();
            assert!(line.starts_with("fuzz.toml") && !line.contains(['\r', '\n']), "{line:?}");
        }
    }
}
