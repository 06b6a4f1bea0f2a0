//! The access steps of an upgrade that answer for the route's access policy: its credentials
//! (`auth`), a token-mapped route's target (its token, under the same brute-force guard), and
//! the in-band answer (`on_refusal = "close"`) to an access refusal. Kept apart
//! from `upgrade`'s sequence so that reads as its steps.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Request, Response};
use tracing::{debug, warn};

use super::{Connection, PendingSession, Shared, switching_protocols};
use crate::auth;
use crate::backend;
use crate::policy::{self, Refusal, RefusalKind};
use crate::router::Entry;
use crate::session::{self, Dialed};

/// The route's access policy (`auth`), if it has one: who the client is, or the refusal
/// (counted here when the password checks are full; `respond` counts the others).
pub(super) async fn authenticate(
    req: &Request<Incoming>,
    parts: policy::Request<'_>,
    entry: &Entry,
    conn: &Connection,
    shared: &Shared,
) -> Result<auth::Authenticated, Refusal> {
    let Some(route_auth) = conn.snapshot.auth.get(&entry.route.name) else {
        if entry.route.auth.is_none() {
            return Ok(auth::Authenticated::default());
        }
        // Cannot happen: a snapshot is built with every route's policy or not at all. Fail closed.
        warn!(route = %entry.route.name, "bug: the route's auth policy is not loaded; refusing");
        return Err(Refusal::internal());
    };
    let limits = &conn.snapshot.limits;
    let presented = auth::Presented { headers: req.headers(), query: req.uri().query(), client: parts.peer.ip() };
    let guard = auth::Guard {
        clients: &shared.admission.clients,
        per_client: &limits.per_client,
        checks: &shared.password_checks,
        max_checks: limits.max_password_checks,
    };
    match auth::authenticate(route_auth, &entry.route.name, presented, guard).await {
        Ok(who) => Ok(who),
        Err(auth::Failure::Refused(refusal)) => Err(refusal),
        Err(auth::Failure::Shed(shed)) => {
            entry.metrics.shed(shed.label());
            Err(Refusal::shed(shed))
        }
    }
}

/// A refusal of the access policy on a route with `on_refusal = "close"`: the upgrade
/// completes without a backend, and the session closes at once with 4401, 4403 or 4429 and the
/// reason, which a page can read (an HTTP refusal shows it only 1006). Counted and logged as
/// `respond` does HTTP refusals. Any other refusal is returned as it is.
pub(super) fn refuse_in_band(
    req: &mut Request<Incoming>,
    entry: &Arc<Entry>,
    conn: &Connection,
    shared: &Shared,
    client: SocketAddr,
    subprotocol: Option<String>,
    refusal: Refusal,
) -> Result<Response<Full<Bytes>>, Refusal> {
    let RefusalKind::Access(denied) = refusal.kind else { return Err(refusal) };
    if entry.route.on_refusal != crate::config::OnRefusal::Close {
        return Err(refusal);
    }
    let route = entry.route.name.as_str();
    entry.metrics.access_denied(denied.label());
    let (status, reason) = (refusal.status.as_u16(), &refusal.reason);
    match entry.metrics.access_warnings.allow() {
        Some(suppressed) => warn!(route, status, %reason, suppressed, "request refused (closed in band)"),
        None => debug!(route, status, %reason, "request refused (closed in band)"),
    }
    conn.finish_handshake();
    let key = req.headers().get(header::SEC_WEBSOCKET_KEY).map(HeaderValue::as_bytes).unwrap_or_default();
    let response = switching_protocols(key, subprotocol.as_deref());
    let ctx = session::Context {
        id: shared.next_session.fetch_add(1, Ordering::Relaxed),
        entry: entry.clone(),
        client_addr: client,
        identity: policy::Identity::default(),
        close_window: conn.snapshot.shutdown.close_window,
        credentials_expire: None,
        control: false,
    };
    let dialed = Dialed::Refused(denied, refusal.reason);
    conn.leave_session(PendingSession { pending: hyper::upgrade::on(req), dialed, ctx, place: None });
    Ok(response)
}

/// On a token-mapped route, the target the request's token names (`backend::Mapping`), found
/// before the session's bounds are taken, so a request with an unknown token holds no session or
/// connect place; `None` on other routes. A token that names nothing, or a JWT that fails its
/// check, counts against the client in the brute-force guard as a failed credential does, and a
/// blocked client is answered 429 before its token is looked at: tokens in websockify files are
/// often short names.
pub(super) fn find_target(
    req: &Request<Incoming>,
    entry: &Entry,
    conn: &Connection,
    shared: &Shared,
    client: IpAddr,
) -> Result<Option<backend::Target>, Refusal> {
    let Some(mapping) = conn.snapshot.targets.get(&entry.route.name) else {
        if !matches!(entry.route.backend, crate::config::Backend::Mapped(_)) {
            return Ok(None);
        }
        // Cannot happen: a snapshot is built with every route's lookup or not at all. Fail closed.
        warn!(route = %entry.route.name, "bug: the route's token lookup is not loaded; refusing");
        return Err(Refusal::internal());
    };
    let (clients, per_client) = (&shared.admission.clients, &conn.snapshot.limits.per_client);
    auth::guard(clients, per_client, client)?;
    match mapping.find(req.uri().path(), req.uri().query()) {
        Ok(target) => Ok(Some(target)),
        Err(refused) => {
            if matches!(refused, backend::Refused::UnknownToken | backend::Refused::InvalidToken(_)) {
                clients.auth_failed(client, per_client, Instant::now());
            }
            Err(Refusal::target(refused))
        }
    }
}
