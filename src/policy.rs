//! Decides whether a matched request may open a session. Pure: request parts in, decision out.
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

use crate::config::{AllowedOrigins, Route, normalize_origin};
use crate::router::normalize_host;

/// Why a request was refused, and the HTTP status that says so.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// HTTP status to answer with.
    pub status: u16,
    /// One line for the response body and the log; never contains secrets.
    pub reason: String,
}

/// Checks the `Origin` of a request to `route`. `secure` is whether it arrived over TLS, and
/// `host` is its `Host` header as sent.
pub fn check_origin(route: &Route, origin: Option<&str>, host: Option<&str>, secure: bool) -> Result<(), Refusal> {
    let Some(origin) = origin else { return Ok(()) };
    if route.allowed_origins == AllowedOrigins::Any {
        return Ok(());
    }
    let refuse = || Refusal {
        status: 403,
        // The route is named in the log line, not here: this goes back to the caller.
        reason: format!("origin {origin:?} is not allowed here"),
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
    Err(Refusal {
        status: 400,
        reason: format!("no acceptable subprotocol among the {} offered; this route accepts {accepted}", offered.len()),
    })
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
        assert_eq!(refusal.status, 403);
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
        assert_eq!(rebound.unwrap_err().status, 403);
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
        assert_eq!(e.status, 400);
        assert!(e.reason.contains("1 offered") && e.reason.contains("accepts none"), "{}", e.reason);
        assert!(!e.reason.contains("mqtt"), "offered values may be secrets: {}", e.reason);
        r.subprotocols = vec!["binary".into(), "mqtt".into()];
        assert_eq!(select_subprotocol(&r, ["mqttv3.1", "mqtt", "binary"]), Ok(Some("mqtt".into())));
        assert_eq!(select_subprotocol(&r, []), Ok(None));
        assert!(select_subprotocol(&r, ["base64"]).unwrap_err().reason.contains("accepts binary, mqtt"));
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
