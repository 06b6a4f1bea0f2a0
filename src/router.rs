//! The route table of one config snapshot, and the choice of a route for a request from its
//! `Host` and path. Pure: built once when a config is loaded, then request parts in, entry out.
//!
//! Each [`Entry`] carries everything a request on its route needs, resolved at load time: the
//! route, its limits (`[limits]` with the route's own `limits` table applied), its load, its
//! metric handles and how to reach its backend. Nothing is looked up by name per request.
//!
//! Precedence follows nginx, where the server name is chosen before the location: a route whose
//! `host` matches exactly beats a wildcard host (longer suffix first), which beats a route with no
//! `host`; among those, an exact path beats a prefix, and a longer prefix beats a shorter one.
//! The query string never takes part (the server passes only the path).

use std::sync::Arc;

use crate::admission::RouteLoad;
use crate::backend::{Dialer, Pool, Pools, tls};
pub use crate::config::SessionLimits;
use crate::config::{Backend, HostPattern, PathMatch, Route};
use crate::metrics::RouteMetrics;

/// One route with everything its requests and sessions need.
#[derive(Debug)]
pub struct Entry {
    /// The route as configured.
    pub route: Route,
    /// The limits its sessions run under.
    pub limits: SessionLimits,
    /// Its metric handles, registered when the table is built (so the route shows in `/metrics`
    /// before its first session) and kept across reloads.
    pub metrics: Arc<RouteMetrics>,
    /// Its sessions and connects in progress, counted against its caps; kept across reloads
    /// like its metrics.
    pub load: Arc<RouteLoad>,
    /// Where its sessions go.
    pub target: Target,
}

/// Where a route's sessions go.
#[derive(Debug)]
pub enum Target {
    /// A backend service (TCP or a Unix socket, either under TLS), dialled before the upgrade
    /// is answered.
    Tcp(Dialer),
    /// The built-in WebSocket echo: nothing to dial.
    Echo,
}

/// The route table of one config snapshot.
#[derive(Debug, Clone)]
pub struct Router {
    entries: Vec<Arc<Entry>>,
}

impl Router {
    /// Builds the table; the routes were validated by `config`, so this cannot fail.
    /// `metrics_for` gives a route's metric handles by name; `pools` keeps pool members' states;
    /// `tls_for` gives a route's loaded backend TLS (`backend::tls::load`).
    pub fn new(
        routes: &[Route],
        metrics_for: impl Fn(&str) -> Arc<RouteMetrics>,
        load_for: impl Fn(&str) -> Arc<RouteLoad>,
        pools: &Pools,
        tls_for: impl Fn(&str) -> Option<Arc<tls::Connector>>,
    ) -> Self {
        let entry = |route: &Route| {
            let limits = route.limits;
            let target = match &route.backend {
                Backend::Tcp { host, port } => Target::Tcp(
                    Dialer::new(host, *port, limits.connect_timeout, limits.tcp_keepalive, limits.tcp_user_timeout)
                        .with_tls(tls_for(&route.name)),
                ),
                Backend::Unix(addr) => {
                    Target::Tcp(Dialer::unix(addr.clone(), limits.connect_timeout).with_tls(tls_for(&route.name)))
                }
                Backend::Echo => Target::Echo,
                Backend::Pool(pool) => Target::Tcp(
                    Dialer::pool(
                        pools.build(route, pool),
                        limits.connect_timeout,
                        limits.tcp_keepalive,
                        limits.tcp_user_timeout,
                    )
                    .with_tls(tls_for(&route.name)),
                ),
                Backend::Mapped(targets) => Target::Tcp(
                    Dialer::mapped(targets, limits.connect_timeout, limits.tcp_keepalive, limits.tcp_user_timeout)
                        .with_tls(tls_for(&route.name)),
                ),
            };
            let (metrics, load) = (metrics_for(&route.name), load_for(&route.name));
            Arc::new(Entry { route: route.clone(), limits, metrics, load, target })
        };
        Router { entries: routes.iter().map(entry).collect() }
    }

    /// The pools of its routes, for the health task.
    pub fn pools(&self) -> Vec<Arc<Pool>> {
        let pool = |e: &Arc<Entry>| match &e.target {
            Target::Tcp(dialer) => dialer.pool_of().cloned(),
            Target::Echo => None,
        };
        self.entries.iter().filter_map(pool).collect()
    }

    /// The best route for `host` (as sent, port allowed) and `path`, if any.
    pub fn find(&self, host: Option<&str>, path: &str) -> Option<&Arc<Entry>> {
        let host = host.map(normalize_host);
        self.entries
            .iter()
            .filter(|e| path_matches(&e.route, path))
            .filter_map(|e| host_rank(e.route.host.as_ref(), host.as_deref()).map(|h| (h, e)))
            .max_by_key(|(h, e)| (*h, e.route.path_match == PathMatch::Exact, e.route.path.len()))
            .map(|(_, e)| e)
    }
}

fn path_matches(route: &Route, path: &str) -> bool {
    match route.path_match {
        PathMatch::Exact => path == route.path,
        PathMatch::Prefix => match path.strip_prefix(route.path.as_str()) {
            Some(rest) => rest.is_empty() || route.path.ends_with('/') || rest.starts_with('/'),
            None => false,
        },
    }
}

/// `None` when the route's host pattern excludes the request; otherwise a rank, higher is more
/// specific: (class, wildcard suffix length).
fn host_rank(pattern: Option<&HostPattern>, host: Option<&str>) -> Option<(u8, usize)> {
    match (pattern, host) {
        (None, _) => Some((0, 0)),
        (Some(_), None) => None,
        (Some(p @ HostPattern::Exact(_)), Some(h)) => p.matches(h).then_some((2, 0)),
        (Some(p @ HostPattern::Wildcard(suffix)), Some(h)) => p.matches(h).then_some((1, suffix.len())),
    }
}

/// Lower-cases a `Host` value and removes its port and any trailing dot (`Example.com.:443` →
/// `example.com`). IPv6 literals keep their brackets.
pub fn normalize_host(host: &str) -> String {
    let host = host.trim();
    let name = if host.starts_with('[') {
        host.split_once(']').map_or(host.to_string(), |(h, _)| format!("{h}]"))
    } else {
        host.split(':').next().unwrap_or(host).to_string()
    };
    name.trim_end_matches('.').to_ascii_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Backend, test_route};

    fn route(name: &str, path: &str, m: PathMatch, host: Option<HostPattern>) -> Route {
        let mut r = test_route(name, path, Backend::Echo);
        r.path_match = m;
        r.host = host;
        r
    }

    fn found(r: &Router, host: Option<&str>, path: &str) -> Option<String> {
        r.find(host, path).map(|e| e.route.name.clone())
    }

    /// A table of `routes` under the default limits, recording no metrics.
    fn table(routes: &[Route]) -> Router {
        let metrics = Arc::new(crate::metrics::Metrics::new(false));
        let pools = Pools::new(metrics.clone());
        Router::new(routes, |name| metrics.route(name), |_| Arc::default(), &pools, |_| None)
    }

    /// Exact beats prefix, longer prefix beats shorter, and prefixes stop at segment boundaries.
    #[test]
    fn exact_and_prefix_with_segment_boundaries() {
        let r = table(&[
            route("exact", "/vnc", PathMatch::Exact, None),
            route("prefix", "/vnc", PathMatch::Prefix, None),
            route("deeper", "/vnc/admin", PathMatch::Prefix, None),
            route("slash", "/files/", PathMatch::Prefix, None),
        ]);
        assert_eq!(found(&r, None, "/vnc").as_deref(), Some("exact"));
        assert_eq!(found(&r, None, "/vnc/").as_deref(), Some("prefix"));
        assert_eq!(found(&r, None, "/vnc/x").as_deref(), Some("prefix"));
        assert_eq!(found(&r, None, "/vnc/admin/1").as_deref(), Some("deeper"));
        assert_eq!(found(&r, None, "/vncx"), None);
        assert_eq!(found(&r, None, "/files/a").as_deref(), Some("slash"));
        assert_eq!(found(&r, None, "/files"), None);
        assert_eq!(found(&r, None, "/"), None);
    }

    /// Host specificity decides before path length, as in nginx.
    #[test]
    fn host_specificity_comes_first() {
        let r = table(&[
            route("any", "/", PathMatch::Prefix, None),
            route("wild", "/", PathMatch::Prefix, Some(HostPattern::Wildcard(".example.com".into()))),
            route("deep-wild", "/", PathMatch::Prefix, Some(HostPattern::Wildcard(".a.example.com".into()))),
            route("exact", "/", PathMatch::Prefix, Some(HostPattern::Exact("vnc.example.com".into()))),
            route("any-long", "/long/path", PathMatch::Prefix, None),
        ]);
        assert_eq!(found(&r, Some("VNC.example.com:443"), "/x").as_deref(), Some("exact"));
        assert_eq!(found(&r, Some("b.example.com"), "/x").as_deref(), Some("wild"));
        assert_eq!(found(&r, Some("b.a.example.com"), "/x").as_deref(), Some("deep-wild"));
        assert_eq!(found(&r, Some("other.org"), "/x").as_deref(), Some("any"));
        assert_eq!(found(&r, None, "/x").as_deref(), Some("any"));
        // A matching host beats a longer path on a host-less route, as in nginx.
        assert_eq!(found(&r, Some("b.example.com"), "/long/path").as_deref(), Some("wild"));
    }

    /// Host values lose port, case and trailing dot; IPv6 keeps its brackets.
    #[test]
    fn host_normalisation() {
        assert_eq!(normalize_host("Example.COM.:8443"), "example.com");
        assert_eq!(normalize_host("[::1]:8080"), "[::1]");
        assert_eq!(normalize_host("localhost"), "localhost");
    }
}
