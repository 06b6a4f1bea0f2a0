//! Decides whether a matched request may open a session: the one admission step, and the one
//! type that says no. Pure: request parts in, decision out; nothing here does I/O.
//!
//! [`host`] comes first, before routing: the request's host as RFC 9112 §3.2 defines it (exactly
//! one `Host`; the authority of an absolute-form target wins over it). [`admit`] then runs the
//! checks in order: the route's client address rules, a well-formed WebSocket upgrade (RFC 6455
//! §4.2.1), the origin, the subprotocol, the route's client certificate rules; the route's
//! credentials (`auth`) follow it, before the dial. Every refusal is a [`Refusal`]: its status,
//! reason, headers and [`RefusalKind`], which the server turns into a response, logs and counts
//! in one place.
//!
//! WebSocket has no same-origin policy: any page a user visits can open a socket to any host the
//! browser reaches, with the user's cookies. For a TCP service that has no authentication of its
//! own, wsgate is the only thing standing between such a page and the service. So a browser
//! request (one that carries `Origin`) is refused with 403 unless its origin is the request's own
//! (`http(s)://` + `Host`) or the route lists it. Requests without `Origin` come from non-browser
//! clients, which no web page can forge, and pass; a route that must know who they are asks for
//! credentials (`auth`), a client certificate or a client address.
//!
//! "The request's own origin" is trusted only when the `Host` is one the attacker cannot choose:
//! an IP literal, `localhost`, or a name the route's `host` pattern names. Otherwise DNS
//! rebinding gets through: a page at `http://evil.example:8080` whose name is re-pointed at the
//! gateway sends `Origin` and `Host` that agree. Deployments reached by name set the route's
//! `host` or list their pages in `allowed_origins`.

use base64::Engine;
use hyper::header::{self, HeaderName, HeaderValue};
use hyper::{HeaderMap, Method, StatusCode, Uri, Version};

use std::time::Duration;

use crate::admission::{Over, Shed};
use crate::backend::{self, ConnectFailure};
use crate::client_cert::{self, ClientCert};
use crate::config::{AllowedOrigins, Route, normalize_origin};
use crate::router::normalize_host;

/// Why a request was refused: the whole answer, and what it is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// HTTP status to answer with.
    pub status: StatusCode,
    /// One line for the response body and the log; never contains secrets.
    pub reason: String,
    /// Headers the answer needs besides the usual ones (`Allow`, `Upgrade`, `Retry-After`, ...).
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// What was refused, which decides how loudly it is logged.
    pub kind: RefusalKind,
}

/// What a refusal is about. The server (`respond`) logs [`RefusalKind::Origin`] and
/// [`RefusalKind::Subprotocol`] as warnings, at most one per route and kind per interval
/// (`throttle`): they are a policy saying no, which an operator wants to hear of, once in a while.
/// The others are the client's own mistake, or were logged where they happened (a failed dial),
/// and go to debug; the metrics count every one of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefusalKind {
    /// Not a well-formed WebSocket upgrade (method, version, headers).
    Request,
    /// No usable host: missing, duplicated, malformed or contradicted ([`HostError`]).
    Host,
    /// No route matches the host and path.
    NoRoute,
    /// A browser page from an origin the route does not allow.
    Origin,
    /// None of the subprotocols offered is one the route accepts.
    Subprotocol,
    /// The backend could not be reached (`on_backend_unavailable = "http"`).
    BackendUnavailable,
    /// A limit: the client over its share (429), the route or gateway at a bound (503). Under
    /// a flood there is one per request; the metrics count them.
    Limit,
    /// The route's access policy said no (401, 403, or 429 after repeated failures): counted in
    /// `wsgate_access_denied_total` by [`Denied::label`], warned of once per route per interval.
    Access(Denied),
    /// A token-mapped route found no allowed target for the request (404, 403): counted in
    /// `wsgate_target_refusals_total` by [`backend::Refused::label`], warned of once per route per interval.
    Target(backend::Refused),
}

/// Why the access policy refused a request; each is a bounded metric label. The reason a client
/// and the log see is the refusal's; never a credential.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denied {
    /// The client's address is denied, or not allowed, by the route's client rules (403).
    ClientAddress,
    /// The route wants credentials and none came (401).
    MissingCredentials,
    /// Credentials came and are not valid: unknown, badly signed, expired, malformed (401).
    InvalidCredentials,
    /// Valid credentials that this route does not allow (403).
    Forbidden,
    /// No client certificate, or one the route does not allow (403).
    ClientCertificate,
    /// Too many failed attempts from this client: refused before checking (429).
    TooManyFailures,
}

impl Denied {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Denied::ClientAddress => "client_address",
            Denied::MissingCredentials => "missing_credentials",
            Denied::InvalidCredentials => "invalid_credentials",
            Denied::Forbidden => "forbidden",
            Denied::ClientCertificate => "client_certificate",
            Denied::TooManyFailures => "too_many_failures",
        }
    }
}

impl Refusal {
    fn new(status: StatusCode, reason: impl Into<String>) -> Refusal {
        Refusal { status, reason: reason.into(), headers: Vec::new(), kind: RefusalKind::Request }
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

    fn of_kind(mut self, kind: RefusalKind) -> Refusal {
        self.kind = kind;
        self
    }

    /// A trusted proxy's forwarded header names, where the client should be, something that is
    /// not an address (`client_addr`): who the client is cannot be known, so nothing that
    /// depends on it can be decided.
    pub fn unknown_client() -> Refusal {
        Refusal::new(StatusCode::BAD_REQUEST, "the forwarded header names no client address")
    }

    /// Something that cannot happen did: 500, and the log says what.
    pub fn internal() -> Refusal {
        Refusal::new(StatusCode::INTERNAL_SERVER_ERROR, "internal error")
    }

    /// No route matches the request's host and path. Neither is echoed: a path can carry a
    /// token (a path-token route asked for under the wrong host), and the reason is logged.
    pub fn no_route() -> Refusal {
        Refusal::new(StatusCode::NOT_FOUND, "no route for this host and path").of_kind(RefusalKind::NoRoute)
    }

    /// The client is over its rate (`limits.per_client`): 429 with `Retry-After`. Debug level:
    /// a client over its rate is often a flood, and the metric `wsgate_connections_refused_total`
    /// counts each.
    pub fn client_over(over: Over, now: std::time::Instant) -> Refusal {
        let (reason, wait) = match over {
            Over::Rate { due } => {
                ("too many new connections from this address".to_string(), due.saturating_duration_since(now))
            }
        };
        Refusal::new(StatusCode::TOO_MANY_REQUESTS, reason).retry_after(wait).of_kind(RefusalKind::Limit)
    }

    /// The route or the gateway is at a bound, on a route that says so in HTTP: 503 with
    /// `Retry-After`.
    pub fn shed(shed: Shed) -> Refusal {
        Refusal::new(StatusCode::SERVICE_UNAVAILABLE, shed.reason())
            .retry_after(shed.retry_after())
            .of_kind(RefusalKind::Limit)
    }

    /// The backend could not be reached, on a route that says so in HTTP
    /// (`on_backend_unavailable = "http"`): 502 when it refused or its TLS handshake failed, 504
    /// when it timed out, 503
    /// otherwise. Debug level: the dial logged the failure, with its address.
    pub fn backend_unavailable(failure: ConnectFailure) -> Refusal {
        let status = match failure {
            ConnectFailure::Refused | ConnectFailure::Tls => StatusCode::BAD_GATEWAY,
            ConnectFailure::TimedOut => StatusCode::GATEWAY_TIMEOUT,
            ConnectFailure::NotResolved
            | ConnectFailure::Unreachable
            | ConnectFailure::Other
            | ConnectFailure::NoBackend => StatusCode::SERVICE_UNAVAILABLE,
            // Not a failure of the backend: `target` answers it, whatever the route's choice.
            ConnectFailure::NotAllowed => StatusCode::FORBIDDEN,
        };
        Refusal::new(status, format!("backend unavailable: {}", failure.label()))
            .of_kind(RefusalKind::BackendUnavailable)
    }
}

impl Refusal {
    /// A token-mapped route's refusal: 404 when no target has the token, 403 when the JWT fails
    /// its check or the target is outside the allow-list. The reason never holds the token, nor
    /// the target's address (a map keeps those from the client).
    pub fn target(refused: backend::Refused) -> Refusal {
        use backend::Refused;
        let (status, reason) = match refused {
            Refused::MissingToken => (StatusCode::NOT_FOUND, "no target token".to_string()),
            Refused::UnknownToken => (StatusCode::NOT_FOUND, "unknown target token".to_string()),
            Refused::InvalidToken(why) => (StatusCode::FORBIDDEN, format!("invalid target token: {why}")),
            Refused::NotAllowed => (StatusCode::FORBIDDEN, "target not allowed".to_string()),
        };
        Refusal::new(status, reason).of_kind(RefusalKind::Target(refused))
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
    /// The request's host as [`host`] found it (port included, as sent); `None` only for callers
    /// that have none.
    pub host: Option<&'a str>,
    /// Whether it arrived over TLS.
    pub secure: bool,
    /// The client's address: the connection's (the one its PROXY header carried, if any), or,
    /// from a trusted proxy, the one its forwarded header names (`client_addr`). What route
    /// client rules and the brute-force guard go by; per-client connection caps count by the
    /// connection's instead.
    pub peer: std::net::SocketAddr,
    /// The client certificate the TLS handshake verified, if any (mTLS).
    pub client_cert: Option<&'a ClientCert>,
}

/// What an admitted request gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admitted {
    /// The subprotocol to name in the 101, if any.
    pub subprotocol: Option<String>,
    /// Who the client proved to be, if the route asked.
    pub identity: Identity,
}

/// Who a client is, as far as the route's access policy established it. It goes to the session
/// log and, where the route sends PROXY protocol, into its TLVs; never into the backend's byte
/// stream. Both fields are the client's words, checked: log them escaped.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Identity {
    /// The authenticated user: a bearer token's name, a JWT's `sub`, a Basic user name.
    pub user: Option<String>,
    /// The subject of a verified client certificate (mTLS).
    pub cert_subject: Option<String>,
    /// That certificate's common name, as `client_certs` matched it (never re-parsed from the
    /// subject's text, whose escapes a certificate's other attributes could play on).
    pub cert_common_name: Option<String>,
}

/// Why a request has no usable host. Each is answered 400 (RFC 9112 §3.2), with the message as
/// its reason; [`Refusal`]'s `From` is the one place that says so.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HostError {
    /// No `Host` header: RFC 9112 requires one in every HTTP/1.1 request.
    #[error("missing Host header")]
    Missing,
    /// More than one `Host` header: which one a proxy in front routed by is anyone's guess.
    #[error("more than one Host header")]
    Duplicate,
    /// An empty `Host`, which RFC 9112 allows only for a target without an authority; a WebSocket
    /// URI always has one, and RFC 6455 §4.1 has the client send it.
    #[error("empty Host header: a WebSocket request must name the server")]
    Empty,
    /// A `Host` that is not `host[:port]`.
    #[error("malformed Host header: expected host[:port]")]
    Malformed,
    /// An absolute-form target whose authority is not `host[:port]` (user info included).
    #[error("malformed authority in the request target: expected host[:port]")]
    MalformedTarget,
    /// An absolute-form target and a `Host` naming different hosts or ports.
    #[error("Host header disagrees with the request target's authority")]
    Disagrees,
}

impl From<HostError> for Refusal {
    fn from(e: HostError) -> Refusal {
        Refusal::new(StatusCode::BAD_REQUEST, e.to_string()).of_kind(RefusalKind::Host)
    }
}

/// The request's host, for routing and the origin check (RFC 9112 §3.2): the one `Host` header,
/// or, for an absolute-form target (`GET http://a.example/x HTTP/1.1`), the target's authority
/// (§3.2.2). Returned as sent, port included. Refused: no `Host` or more than one (whatever the
/// HTTP version: nothing wsgate serves works without one), an empty or malformed one, and, as
/// hardening beyond the RFC (which says to ignore `Host` then), a `Host` that names another host
/// or port than an absolute-form target: a proxy in front may have routed by either.
pub fn host<'a>(target: &'a Uri, headers: &'a HeaderMap) -> Result<&'a str, HostError> {
    let mut sent = headers.get_all(header::HOST).iter();
    let sent = match (sent.next(), sent.next()) {
        (None, _) => return Err(HostError::Missing),
        (Some(_), Some(_)) => return Err(HostError::Duplicate),
        (Some(one), None) => one,
    };
    // Not text (obs-text bytes) is no host name either.
    let sent = sent.to_str().map_err(|_| HostError::Malformed)?.trim_matches([' ', '\t']);
    if sent.is_empty() {
        return Err(HostError::Empty);
    }
    let named = split_authority(sent).ok_or(HostError::Malformed)?;
    let Some(authority) = target.authority() else { return Ok(sent) };
    let authority = authority.as_str();
    let targeted = split_authority(authority).ok_or(HostError::MalformedTarget)?;
    let default_port = match target.scheme_str().map(str::to_ascii_lowercase).as_deref() {
        Some("http" | "ws") => Some(80),
        Some("https" | "wss") => Some(443),
        _ => None,
    };
    let same = normalize_host(named.0) == normalize_host(targeted.0)
        && named.1.or(default_port) == targeted.1.or(default_port);
    if same { Ok(authority) } else { Err(HostError::Disagrees) }
}

/// `host[:port]` as RFC 3986 §3.2.2-3 writes it (`uri-host [ ":" port ]`): the name (an IPv6
/// literal with its brackets) and the port, if any; `None` when it is not that. Stricter than the
/// RFC where no client needs it: no percent-encoding, no IPvFuture, the port fits in 16 bits.
fn split_authority(s: &str) -> Option<(&str, Option<u16>)> {
    let (name, rest) = match s.strip_prefix('[') {
        Some(inner) => {
            let (literal, _) = inner.split_once(']')?;
            literal.parse::<std::net::Ipv6Addr>().ok()?;
            s.split_at(literal.len() + 2)
        }
        None => {
            let name = s.split(':').next().unwrap_or(s);
            let reg_name = |b: u8| b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=".contains(&b);
            if name.is_empty() || !name.bytes().all(reg_name) {
                return None;
            }
            s.split_at(name.len())
        }
    };
    let port = match rest.strip_prefix(':') {
        None if rest.is_empty() => None,
        // RFC 3986 allows an empty port: the same as none.
        Some("") => None,
        Some(digits) if digits.bytes().all(|b| b.is_ascii_digit()) => Some(digits.parse().ok()?),
        _ => return None,
    };
    Some((name, port))
}

/// The admission step for a request that matched `route`: the client address rules, then a
/// well-formed upgrade, then the origin, then the subprotocol, then the route's client
/// certificate rules. Credentials (`auth`) follow, so that every refusal happens before the
/// backend is dialled.
pub fn admit(req: Request<'_>, route: &Route) -> Result<Admitted, Refusal> {
    check_client(req, route)?;
    let subprotocol = upgradable(req, route)?;
    check_client_cert(route, req.client_cert)?;
    let identity = Identity {
        cert_subject: req.client_cert.map(|c| c.subject.to_string()),
        cert_common_name: req.client_cert.and_then(ClientCert::common_name).map(str::to_string),
        ..Identity::default()
    };
    Ok(Admitted { subprotocol, identity })
}

/// Whether `req` is an upgrade `route` would complete, whoever sends it: well formed, from an
/// allowed origin, with an acceptable subprotocol (the one to select). What a refusal of the
/// access policy needs before it can be answered in band (`on_refusal = "close"`).
pub fn upgradable(req: Request<'_>, route: &Route) -> Result<Option<String>, Refusal> {
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
        .filter(|p| !p.is_empty())
        // A credential riding in a subprotocol entry (`auth.subprotocol_prefix`) is never a
        // protocol: never selected, never echoed.
        .filter(|p| !route.auth.as_ref().is_some_and(|a| a.is_token_subprotocol(p)));
    select_subprotocol(route, offered)
}

/// A route with `client_certs` wants a verified client certificate that matches one of them:
/// 403 otherwise (the certificate is valid, or absent on an `optional` listener: the TLS
/// handshake already refused the invalid ones). A verified certificate is the client's
/// identity on any route (`admit`).
fn check_client_cert(route: &Route, cert: Option<&ClientCert>) -> Result<(), Refusal> {
    if client_cert::allowed(&route.client_certs, cert) {
        return Ok(());
    }
    let reason = match cert {
        None => "a client certificate is required on this route".to_string(),
        Some(c) => format!("client certificate {} is not allowed on this route", c.subject),
    };
    Err(Refusal::new(StatusCode::FORBIDDEN, reason).of_kind(RefusalKind::Access(Denied::ClientCertificate)))
}

/// The route's client rules (`clients`), first of all: a client address it denies, or does not
/// allow, gets 403 whatever else the request says. The address is the client's own, so the
/// reason may name it.
fn check_client(req: Request<'_>, route: &Route) -> Result<(), Refusal> {
    let ip = crate::config::canonical_ip(req.peer.ip());
    if route.clients.permits(ip) {
        return Ok(());
    }
    Err(Refusal::new(StatusCode::FORBIDDEN, format!("client address {ip} is not allowed on this route"))
        .of_kind(RefusalKind::Access(Denied::ClientAddress)))
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
    let refuse = || {
        Refusal::new(StatusCode::FORBIDDEN, format!("origin {origin:?} is not allowed here"))
            .of_kind(RefusalKind::Origin)
    };
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
    .of_kind(RefusalKind::Subprotocol))
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

    /// An unreachable backend is answered 502 when it refused or failed the TLS handshake, 504
    /// when it timed out, 503 otherwise; the reason names the kind and no address.
    #[test]
    fn backend_unavailable_statuses_follow_the_failure() {
        use ConnectFailure::*;
        let status = |f| Refusal::backend_unavailable(f).status.as_u16();
        assert_eq!(
            [Refused, Tls, TimedOut, NotResolved, Unreachable, Other, NoBackend].map(status),
            [502, 502, 504, 503, 503, 503, 503]
        );
        assert_eq!(Refusal::backend_unavailable(Refused).reason, "backend unavailable: connection refused");
    }

    /// The host of a request with these `Host` values and this target.
    fn host_of(target: &str, hosts: &[&[u8]]) -> Result<String, HostError> {
        let target: Uri = target.parse().expect("a valid target");
        let mut headers = HeaderMap::new();
        for h in hosts {
            headers.append(header::HOST, HeaderValue::from_bytes(h).expect("a valid header value"));
        }
        host(&target, &headers).map(str::to_owned)
    }

    /// Exactly one Host is the host, as sent; none or two are refused, whatever they say.
    #[test]
    fn one_host_header_is_required() {
        assert_eq!(host_of("/x", &[b"Example.com:8080"]), Ok("Example.com:8080".into()));
        assert_eq!(host_of("/x", &[b"[::1]:80"]), Ok("[::1]:80".into()));
        assert_eq!(host_of("/x", &[b"  10.0.0.1 "]), Ok("10.0.0.1".into()));
        assert_eq!(host_of("/x", &[]), Err(HostError::Missing));
        assert_eq!(host_of("/x", &[b"a.example", b"a.example"]), Err(HostError::Duplicate));
        assert_eq!(host_of("/x", &[b"a.example", b"b.example"]), Err(HostError::Duplicate));
        assert_eq!(host_of("/x", &[b""]), Err(HostError::Empty));
        assert_eq!(host_of("/x", &[b" "]), Err(HostError::Empty));
    }

    /// Only `host[:port]` passes: no user info, path, second colon, bad port or odd bytes.
    #[test]
    fn malformed_host_values_are_refused() {
        for bad in [
            &b"user@a.example"[..],
            b"a.example/x",
            b"a.example:80:80",
            b"a.example:http",
            b"a.example:65536",
            b":80",
            b"[::1",
            b"[not-v6]:80",
            b"a example",
            b"caf\xc3\xa9.example",
            b"a%2eexample",
        ] {
            assert_eq!(host_of("/x", &[bad]), Err(HostError::Malformed), "{:?}", String::from_utf8_lossy(bad));
        }
        assert_eq!(host_of("/x", &[b"a.example:"]), Ok("a.example:".into()), "an empty port is no port");
    }

    /// An absolute-form target's authority is the host (RFC 9112 §3.2.2); a Host that names
    /// another host or port is refused, one that agrees (case, default port) is not.
    #[test]
    fn absolute_form_target_wins_and_must_agree() {
        assert_eq!(host_of("http://a.example/x", &[b"a.example"]), Ok("a.example".into()));
        assert_eq!(host_of("http://a.example/x", &[b"A.Example:80"]), Ok("a.example".into()));
        assert_eq!(host_of("https://a.example:443/x", &[b"a.example"]), Ok("a.example:443".into()));
        assert_eq!(host_of("ws://[::1]:9/x", &[b"[::1]:9"]), Ok("[::1]:9".into()));
        assert_eq!(host_of("http://a.example/x", &[b"b.example"]), Err(HostError::Disagrees));
        assert_eq!(host_of("http://a.example/x", &[b"a.example:8080"]), Err(HostError::Disagrees));
        assert_eq!(host_of("https://a.example/x", &[b"a.example:80"]), Err(HostError::Disagrees));
        // The target does not stand in for a missing or empty Host.
        assert_eq!(host_of("http://a.example/x", &[]), Err(HostError::Missing));
        assert_eq!(host_of("http://a.example/x", &[b""]), Err(HostError::Empty));
        assert_eq!(host_of("http://u@a.example/x", &[b"a.example"]), Err(HostError::MalformedTarget));
    }

    /// A route with `client_certs` wants a matching verified certificate (403,
    /// `Denied::ClientCertificate`, otherwise); a verified subject is the identity on any route.
    #[test]
    fn client_certificate_rules() {
        use crate::config::CertPattern;
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.distinguished_name.push(rcgen::DnType::CommonName, "ops");
        let cert = ClientCert::from_der(params.self_signed(&key).unwrap().der()).unwrap();
        let open = route(AllowedOrigins::List(vec![]));
        assert_eq!(check_client_cert(&open, None), Ok(()));
        assert_eq!(check_client_cert(&open, Some(&cert)), Ok(()), "any certificate on an open route");
        let mut guarded = route(AllowedOrigins::List(vec![]));
        guarded.client_certs = vec![CertPattern::CommonName("ops".into())];
        assert_eq!(check_client_cert(&guarded, Some(&cert)), Ok(()));
        let denied = RefusalKind::Access(Denied::ClientCertificate);
        let none = check_client_cert(&guarded, None).unwrap_err();
        assert_eq!((none.status, none.kind), (StatusCode::FORBIDDEN, denied));
        guarded.client_certs = vec![CertPattern::CommonName("admin".into())];
        let other = check_client_cert(&guarded, Some(&cert)).unwrap_err();
        assert_eq!((other.status, other.kind), (StatusCode::FORBIDDEN, denied));
        assert_eq!(other.reason, "client certificate CN=ops is not allowed on this route");
    }

    /// Host problems are 400s whose reason is the error's message; each refusal says its kind,
    /// which decides how it is logged.
    #[test]
    fn refusals_carry_their_kind() {
        let r = Refusal::from(HostError::Disagrees);
        assert_eq!((r.status, r.kind), (StatusCode::BAD_REQUEST, RefusalKind::Host));
        assert_eq!(r.reason, "Host header disagrees with the request target's authority");
        let none = route(AllowedOrigins::List(vec![]));
        assert_eq!(
            check_origin(&none, Some("http://evil.example"), None, false).unwrap_err().kind,
            RefusalKind::Origin
        );
        assert_eq!(select_subprotocol(&none, ["x"]).unwrap_err().kind, RefusalKind::Subprotocol);
        assert_eq!(Refusal::no_route().kind, RefusalKind::NoRoute);
        let failure = Refusal::backend_unavailable(ConnectFailure::Refused);
        assert_eq!(failure.kind, RefusalKind::BackendUnavailable);
        assert_eq!(method_not_allowed().kind, RefusalKind::Request);
    }

    /// Client rules come first: a denied address gets 403 (`client_address`) even for a request
    /// that is otherwise malformed; an allowed one goes on to the other checks.
    #[test]
    fn client_rules_are_checked_first() {
        let mut r = route(AllowedOrigins::Any);
        r.clients = crate::config::ClientRules {
            allow: crate::config::Cidrs::new(vec!["10.0.0.0/8".parse().unwrap()]),
            deny: crate::config::Cidrs::new(vec!["10.9.0.0/16".parse().unwrap()]),
        };
        let headers = HeaderMap::new();
        let req = |peer: &str| Request {
            method: &Method::POST,
            version: Version::HTTP_11,
            headers: &headers,
            host: Some("gw"),
            secure: false,
            peer: peer.parse().unwrap(),
            client_cert: None,
        };
        for denied in ["10.9.1.1:5", "192.0.2.1:5", "[::ffff:10.9.1.1]:5"] {
            let refusal = admit(req(denied), &r).unwrap_err();
            assert_eq!(refusal.status, StatusCode::FORBIDDEN, "{denied}");
            assert_eq!(refusal.kind, RefusalKind::Access(Denied::ClientAddress));
            assert!(!refusal.reason.contains("::ffff"), "mapped addresses are named as IPv4: {}", refusal.reason);
        }
        // Allowed: the next check (the method) answers.
        assert_eq!(admit(req("[::ffff:10.1.1.1]:5"), &r).unwrap_err().status, StatusCode::METHOD_NOT_ALLOWED);
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
