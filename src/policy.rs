//! Decides whether a matched request may open a session: the one admission step, and the one
//! type that says no. Pure: request parts in, decision out; nothing here does I/O.
//!
//! [`admit`] runs the checks in order: a well-formed WebSocket upgrade (RFC 6455 §4.2.1), the
//! origin, the subprotocol. Authentication and per-client limits join it here, before the dial.
//! Every refusal is a [`Refusal`]: its status, reason and headers, which the server turns into
//! a response, logs and counts in one place.
//!
//! WebSocket has no same-origin policy: any page a user visits can open a socket to any host the
//! browser reaches, with the user's cookies. For a TCP service that has no authentication of its
//! own, wsgate is the only thing standing between such a page and the service. So a browser
//! request (one that carries `Origin`) is refused with 403 unless its origin is the request's own
//! (`http(s)://` + `Host`) or the route lists it. Requests without `Origin` come from non-browser
//! clients, which no web page can forge, and pass. Authentication arrives in a later issue.
//!
//! "The request's own origin" is trusted only when the `Host` is one the attacker cannot choose:
//! an IP literal, `localhost`, or a name the route's `host` pattern names. Otherwise DNS
//! rebinding gets through: a page at `http://evil.example:8080` whose name is re-pointed at the
//! gateway sends `Origin` and `Host` that agree. Deployments reached by name set the route's
//! `host` or list their pages in `allowed_origins`.

use base64::Engine;
use hyper::header::{self, HeaderName, HeaderValue};
use hyper::{HeaderMap, Method, StatusCode, Version};

use std::time::Duration;

use crate::admission::{Over, Shed};
use crate::backend::ConnectFailure;
use crate::config::{AllowedOrigins, Route, normalize_origin};
use crate::router::normalize_host;

/// Why a request was refused: the whole answer, and how loudly to log it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// HTTP status to answer with.
    pub status: StatusCode,
    /// One line for the response body and the log; never contains secrets.
    pub reason: String,
    /// Headers the answer needs besides the usual ones (`Allow`, `Upgrade`, `Retry-After`, ...).
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// Whether an operator should hear of it (a policy said no: warn) or it is the client's
    /// own mistake, or already logged where it happened (debug).
    pub is_notable: bool,
}

impl Refusal {
    fn new(status: StatusCode, reason: impl Into<String>) -> Refusal {
        Refusal { status, reason: reason.into(), headers: Vec::new(), is_notable: false }
    }

    fn with_header(mut self, name: HeaderName, value: &'static str) -> Refusal {
        self.headers.push((name, HeaderValue::from_static(value)));
        self
    }

    /// `Retry-After` in whole seconds, rounded up (at least 1).
    fn retry_after(mut self, wait: Duration) -> Refusal {
        let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
        self.headers.push((header::RETRY_AFTER, HeaderValue::from(secs.max(1))));
        self
    }

    fn notable(mut self) -> Refusal {
        self.is_notable = true;
        self
    }

    /// No route matches the request's host and path.
    pub fn no_route(path: &str) -> Refusal {
        Refusal::new(StatusCode::NOT_FOUND, format!("no route for {path}"))
    }

    /// The client is over its rate or its handshake share (`limits.per_client`): 429 with
    /// `Retry-After`. Debug level: a client over its share is often a flood, and the metric
    /// `wsgate_connections_refused_total` counts each.
    pub fn client_over(over: Over) -> Refusal {
        let (reason, wait) = match over {
            Over::Rate(wait) => ("too many new connections from this address".to_string(), wait),
            Over::Handshakes(n) => {
                (format!("too many handshakes in progress from this address (limit {n})"), Duration::from_secs(1))
            }
            // Closed at accept; never answered. Mapped anyway so the match stays total.
            Over::Connections(n) => {
                (format!("too many connections from this address (limit {n})"), Duration::from_secs(1))
            }
        };
        Refusal::new(StatusCode::TOO_MANY_REQUESTS, reason).retry_after(wait)
    }

    /// The route or the gateway is at a bound, on a route that says so in HTTP: 503 with
    /// `Retry-After`.
    pub fn shed(shed: Shed) -> Refusal {
        Refusal::new(StatusCode::SERVICE_UNAVAILABLE, shed.reason()).retry_after(shed.retry_after())
    }

    /// The backend could not be reached, on a route that says so in HTTP
    /// (`on_backend_unavailable = "http"`): 502 when it refused, 504 when it timed out, 503
    /// otherwise. Debug level: the dial logged the failure, with its address.
    pub fn backend_unavailable(failure: ConnectFailure) -> Refusal {
        let status = match failure {
            ConnectFailure::Refused => StatusCode::BAD_GATEWAY,
            ConnectFailure::TimedOut => StatusCode::GATEWAY_TIMEOUT,
            ConnectFailure::NotResolved | ConnectFailure::Unreachable | ConnectFailure::Other => {
                StatusCode::SERVICE_UNAVAILABLE
            }
        };
        Refusal::new(status, format!("backend unavailable: {}", failure.label()))
    }
}

/// The request parts admission looks at.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    /// The method.
    pub method: &'a Method,
    /// The HTTP version.
    pub version: Version,
    /// The headers.
    pub headers: &'a HeaderMap,
    /// The `Host` header (or the request target's authority), as sent.
    pub host: Option<&'a str>,
    /// Whether it arrived over TLS.
    pub secure: bool,
    /// The client's address (what per-client limits will count by).
    pub peer: std::net::SocketAddr,
}

/// What an admitted request gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admitted {
    /// The subprotocol to name in the 101, if any.
    pub subprotocol: Option<String>,
}

/// The admission step for a request that matched `route`: a well-formed upgrade, then the
/// origin, then the subprotocol. Authentication and per-client limits go here too, so that every
/// refusal happens before the backend is dialled.
pub fn admit(req: Request<'_>, route: &Route) -> Result<Admitted, Refusal> {
    check_upgrade(req)?;
    let origin = req.headers.get(header::ORIGIN).map(|v| v.to_str().unwrap_or("(not text)"));
    check_origin(route, origin, req.host, req.secure)?;
    let offered = req
        .headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|p| !p.is_empty());
    Ok(Admitted { subprotocol: select_subprotocol(route, offered)? })
}

/// Whether the request asks for a WebSocket upgrade at all (`Upgrade: websocket`); whether it
/// asks well is [`check_upgrade`]'s question.
pub fn is_upgrade(headers: &HeaderMap) -> bool {
    has_token(headers, header::UPGRADE, "websocket")
}

/// `Ok` when `req` is a WebSocket upgrade we can accept; otherwise the refusal RFC 6455 (and
/// RFC 9110) prescribe for what is wrong with it.
fn check_upgrade(req: Request<'_>) -> Result<(), Refusal> {
    let is_get = req.method == Method::GET;
    if !is_upgrade(req.headers) {
        if is_get || req.method == Method::HEAD {
            return Err(Refusal::new(
                StatusCode::UPGRADE_REQUIRED,
                "this is a WebSocket endpoint: connect with a WebSocket client",
            )
            .with_header(header::UPGRADE, "websocket")
            .with_header(header::CONNECTION, "Upgrade, close"));
        }
        return Err(method_not_allowed());
    }
    if !is_get {
        return Err(method_not_allowed());
    }
    if req.version != Version::HTTP_11 {
        return Err(Refusal::new(StatusCode::BAD_REQUEST, "a WebSocket upgrade needs HTTP/1.1"));
    }
    if !has_token(req.headers, header::CONNECTION, "upgrade") {
        return Err(Refusal::new(StatusCode::BAD_REQUEST, "a WebSocket upgrade needs \"Connection: Upgrade\""));
    }
    if req.headers.get(header::SEC_WEBSOCKET_VERSION).map(HeaderValue::as_bytes) != Some(b"13") {
        return Err(Refusal::new(
            StatusCode::UPGRADE_REQUIRED,
            "unsupported Sec-WebSocket-Version: only 13 is supported",
        )
        .with_header(header::SEC_WEBSOCKET_VERSION, "13"));
    }
    let key_ok = req
        .headers
        .get(header::SEC_WEBSOCKET_KEY)
        .and_then(|k| base64::engine::general_purpose::STANDARD.decode(k.as_bytes()).ok())
        .is_some_and(|k| k.len() == 16);
    if !key_ok {
        return Err(Refusal::new(StatusCode::BAD_REQUEST, "missing or malformed Sec-WebSocket-Key"));
    }
    Ok(())
}

fn method_not_allowed() -> Refusal {
    Refusal::new(StatusCode::METHOD_NOT_ALLOWED, "a WebSocket upgrade must use GET").with_header(header::ALLOW, "GET")
}

fn has_token(headers: &HeaderMap, name: HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// Checks the `Origin` of a request to `route`. `secure` is whether it arrived over TLS, and
/// `host` is its `Host` header as sent.
pub fn check_origin(route: &Route, origin: Option<&str>, host: Option<&str>, secure: bool) -> Result<(), Refusal> {
    let Some(origin) = origin else { return Ok(()) };
    if route.allowed_origins == AllowedOrigins::Any {
        return Ok(());
    }
    // The route is named in the log line, not here: this goes back to the caller.
    let refuse = || Refusal::new(StatusCode::FORBIDDEN, format!("origin {origin:?} is not allowed here")).notable();
    let Some(normalized) = normalize_origin(origin) else {
        return Err(refuse());
    };
    let listed = matches!(&route.allowed_origins, AllowedOrigins::List(list) if list.contains(&normalized));
    let own = host
        .filter(|h| is_trusted_host(route, h))
        .and_then(|h| normalize_origin(&format!("{}://{h}", if secure { "https" } else { "http" })));
    if own.as_deref() == Some(normalized.as_str()) || listed { Ok(()) } else { Err(refuse()) }
}

/// Whether a `Host` value names the gateway in a way no other site can claim (see the module
/// docs on DNS rebinding).
fn is_trusted_host(route: &Route, host: &str) -> bool {
    let name = normalize_host(host);
    let bare = name.trim_start_matches('[').trim_end_matches(']');
    bare.parse::<std::net::IpAddr>().is_ok()
        || name == "localhost"
        || route.host.as_ref().is_some_and(|pattern| pattern.matches(&name))
}

/// Picks the subprotocol for a session: the first value the client offers (in its order) that
/// the route accepts. A client that offers none gets none (noVNC offers none). A client that
/// offers only values the route does not accept is refused with 400, rather than upgraded
/// without one: a browser would fail such a handshake with an unexplained 1006 anyway.
pub fn select_subprotocol<'a>(
    route: &Route,
    offered: impl IntoIterator<Item = &'a str>,
) -> Result<Option<String>, Refusal> {
    let offered: Vec<&str> = offered.into_iter().collect();
    if offered.is_empty() {
        return Ok(None);
    }
    if let Some(chosen) = offered.iter().find(|p| route.subprotocols.iter().any(|a| a == *p)) {
        return Ok(Some(chosen.to_string()));
    }
    let accepted = if route.subprotocols.is_empty() { "none".to_string() } else { route.subprotocols.join(", ") };
    // The offered values are not repeated: some clients carry tokens in this header.
    Err(Refusal::new(
        StatusCode::BAD_REQUEST,
        format!("no acceptable subprotocol among the {} offered; this route accepts {accepted}", offered.len()),
    )
    .notable())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Backend, test_route};

    fn route(origins: AllowedOrigins) -> Route {
        let mut r = test_route("tcp", "/tcp", Backend::Tcp { host: "127.0.0.1".into(), port: 7 });
        r.allowed_origins = origins;
        r
    }

    /// The request's own origin passes (scheme included); other origins, `null` and a missing Host get 403.
    #[test]
    fn same_origin_passes_cross_origin_is_403() {
        let mut r = route(AllowedOrigins::List(vec![]));
        assert!(check_origin(&r, Some("http://127.0.0.1:8080"), Some("127.0.0.1:8080"), false).is_ok());
        r.host = Some(crate::config::HostPattern::Wildcard(".example.com".into()));
        assert!(check_origin(&r, Some("https://gw.example.com"), Some("GW.example.com:443"), true).is_ok());
        let refusal = check_origin(&r, Some("http://evil.example"), Some("127.0.0.1:8080"), false).unwrap_err();
        assert_eq!(refusal.status, StatusCode::FORBIDDEN);
        assert!(refusal.reason.contains("evil.example"));
        // Scheme counts: an http page is not the origin of a wss listener.
        assert!(check_origin(&r, Some("http://gw.example.com"), Some("gw.example.com"), true).is_err());
        assert!(check_origin(&r, Some("null"), Some("127.0.0.1:8080"), false).is_err());
        assert!(check_origin(&r, Some("http://127.0.0.1:8080"), None, false).is_err());
    }

    /// A rebound name whose Origin and Host agree is refused; IPs, localhost and the route's host pass.
    #[test]
    fn dns_rebinding_does_not_count_as_same_origin() {
        let mut r = route(AllowedOrigins::List(vec![]));
        // A name the attacker controls, pointed at the gateway: Origin and Host agree.
        let rebound = check_origin(&r, Some("http://rebind.evil:8080"), Some("rebind.evil:8080"), false);
        assert_eq!(rebound.unwrap_err().status, StatusCode::FORBIDDEN);
        assert!(check_origin(&r, Some("http://localhost:8080"), Some("localhost:8080"), false).is_ok());
        assert!(check_origin(&r, Some("http://[::1]:8080"), Some("[::1]:8080"), false).is_ok());
        // A name the route itself names is the gateway's own.
        r.host = Some(crate::config::HostPattern::Exact("gw.example.com".into()));
        assert!(check_origin(&r, Some("https://gw.example.com"), Some("gw.example.com"), true).is_ok());
    }

    /// The first subprotocol the client offers that the route accepts is chosen; otherwise 400, without echoing the offer.
    #[test]
    fn subprotocol_selection_follows_the_client_order() {
        let mut r = route(AllowedOrigins::Any);
        assert_eq!(select_subprotocol(&r, []), Ok(None));
        let e = select_subprotocol(&r, ["mqtt"]).unwrap_err();
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        assert!(e.reason.contains("1 offered") && e.reason.contains("accepts none"), "{}", e.reason);
        assert!(!e.reason.contains("mqtt"), "offered values may be secrets: {}", e.reason);
        r.subprotocols = vec!["binary".into(), "mqtt".into()];
        assert_eq!(select_subprotocol(&r, ["mqttv3.1", "mqtt", "binary"]), Ok(Some("mqtt".into())));
        assert_eq!(select_subprotocol(&r, []), Ok(None));
        assert!(select_subprotocol(&r, ["base64"]).unwrap_err().reason.contains("accepts binary, mqtt"));
    }

    /// An unreachable backend is answered 502 when it refused, 504 when it timed out, 503
    /// otherwise; the reason names the kind and no address.
    #[test]
    fn backend_unavailable_statuses_follow_the_failure() {
        use ConnectFailure::*;
        let status = |f| Refusal::backend_unavailable(f).status.as_u16();
        assert_eq!([Refused, TimedOut, NotResolved, Unreachable, Other].map(status), [502, 504, 503, 503, 503]);
        assert_eq!(Refusal::backend_unavailable(Refused).reason, "backend unavailable: connection refused");
    }

    /// Listed origins, "*" and requests without Origin pass.
    #[test]
    fn listed_and_any_origins_and_non_browsers_pass() {
        let r = route(AllowedOrigins::List(vec!["https://app.example.com".into()]));
        assert!(check_origin(&r, Some("https://APP.example.com:443"), Some("gw:8443"), true).is_ok());
        assert!(check_origin(&r, Some("https://other.example.com"), Some("gw:8443"), true).is_err());
        assert!(check_origin(&r, None, Some("gw:8443"), true).is_ok());
        let any = route(AllowedOrigins::Any);
        assert!(check_origin(&any, Some("null"), None, false).is_ok());
    }
}
