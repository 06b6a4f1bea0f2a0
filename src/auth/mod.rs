//! Who a client is, per route: the credential's carriers, its check (bearer tokens, JWTs, HTTP
//! Basic), and the answer when it fails. Called by `server::upgrade` after `policy::admit` and
//! before the dial, so no refused request ever reaches a backend.
//!
//! [`load`] reads what a route's `[routes.NAME.auth]` names (token, key, JWKS and htpasswd
//! files) into a [`RouteAuth`], at start and on every reload (a reload that cannot read them is
//! refused whole). [`authenticate`] then runs, per request, in order:
//! 1. the brute-force guard (`admission::Clients`): a client with too many recent failures is
//!    answered 429 with `Retry-After`, without looking at what it sent;
//! 2. the credential, from its carriers: for bearer tokens and JWTs `Authorization: Bearer`, then
//!    the configured cookie, then `?access_token=`, then a subprotocol entry `<prefix><token>`;
//!    for Basic the `Authorization: Basic` header;
//! 3. its check: 401 with `WWW-Authenticate` when missing or invalid (a failure counted against
//!    the client), 403 when valid but not for this route; otherwise the user it names.
//!
//! Secrets never leave this module: refusal reasons say what kind of failure it was, never what
//! was sent, and nothing here logs. Password hashing runs on tokio's blocking pool, at most
//! `limits.max_password_checks` at once ([`PasswordChecks`]), after the guard.

mod basic;
mod bearer;
mod jwt;

use std::borrow::Cow;
use std::collections::HashMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use hyper::header::{self, HeaderName, HeaderValue};
use hyper::{HeaderMap, StatusCode};

pub use basic::PasswordChecks;

use crate::admission::{Clients, Shed};
use crate::config::{self, Config, Mechanism, PerClient, Route};
use crate::policy::{Denied, Refusal, RefusalKind};

/// A route's access policy with its files loaded.
#[derive(Debug)]
pub struct RouteAuth {
    config: config::Auth,
    check: Check,
}

/// The loaded material of one mechanism.
#[derive(Debug)]
enum Check {
    Bearer(bearer::Tokens),
    Jwt(Box<jwt::Keys>),
    Basic(basic::Users),
}

/// A credential file (or list) that cannot be used: one line naming the file (and line), the
/// key and the problem, never the secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}{}: {key}: {problem}", file.display(), line.map(|l| format!(":{l}")).unwrap_or_default())]
pub struct AuthError {
    /// The file (the config file for inline values).
    pub file: PathBuf,
    /// The line in `file`, when one is at fault.
    pub line: Option<usize>,
    /// The config key that names it (`routes.NAME.auth.htpasswd`).
    pub key: String,
    /// What is wrong.
    pub problem: String,
}

impl AuthError {
    fn new(file: &Path, line: Option<usize>, key: impl Into<String>, problem: impl Into<String>) -> AuthError {
        AuthError { file: file.to_path_buf(), line, key: key.into(), problem: problem.into() }
    }
}

/// Loads the access policy of every route of `config` that has one, by route name; every
/// problem found, when any.
pub fn load(config: &Config) -> Result<HashMap<String, Arc<RouteAuth>>, Vec<AuthError>> {
    let (mut loaded, mut errors) = (HashMap::new(), Vec::new());
    for route in &config.routes {
        match load_route(route, &config.path) {
            Ok(Some(auth)) => {
                loaded.insert(route.name.clone(), Arc::new(auth));
            }
            Ok(None) => {}
            Err(e) => errors.extend(e),
        }
    }
    if errors.is_empty() { Ok(loaded) } else { Err(errors) }
}

fn load_route(route: &Route, config_file: &Path) -> Result<Option<RouteAuth>, Vec<AuthError>> {
    let Some(auth) = &route.auth else { return Ok(None) };
    let key = format!("routes.{}.auth", route.name);
    let check = match &auth.mechanism {
        Mechanism::Bearer(b) => Check::Bearer(bearer::Tokens::load(b, &key).map_err(|e| vec![e])?),
        Mechanism::Jwt(j) => Check::Jwt(Box::new(jwt::Keys::load(j, &key, config_file)?)),
        Mechanism::Basic(b) => Check::Basic(basic::Users::load(b, &key)?),
    };
    Ok(Some(RouteAuth { config: auth.clone(), check }))
}

/// A JWT check built from a `config::Jwt` for a use other than a route's credentials (a
/// token-mapped route's target claims, `backend::targets`): the same keys, algorithms and claim
/// checks as `[routes.NAME.auth]`'s, from the same code.
pub struct JwtVerifier(Box<jwt::Keys>);

impl std::fmt::Debug for JwtVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl JwtVerifier {
    /// Reads the key files `config` names; `key` is the config key they are reported under.
    pub fn load(config: &config::Jwt, key: &str, config_file: &Path) -> Result<JwtVerifier, Vec<AuthError>> {
        jwt::Keys::load(config, key, config_file).map(|k| JwtVerifier(Box::new(k)))
    }

    /// The claims of a token whose signature and `exp`, `nbf`, `aud`, `iss` pass; otherwise why
    /// not, in words a client may read (never the token).
    pub fn claims(&self, token: &str) -> Result<serde_json::Value, &'static str> {
        self.0.verify(token)
    }
}

/// What a request carried, as far as [`authenticate`] looks at it.
#[derive(Clone, Copy)]
pub struct Presented<'a> {
    /// The request's headers.
    pub headers: &'a HeaderMap,
    /// The request target's query, if any.
    pub query: Option<&'a str>,
    /// The client's address (what the brute-force guard counts by).
    pub client: IpAddr,
}

/// Names the client only: the headers and the query carry credentials.
impl std::fmt::Debug for Presented<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Presented").field("client", &self.client).finish_non_exhaustive()
    }
}

/// Who an authenticated client is.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Authenticated {
    /// The token's name, the JWT's `sub`, the Basic user.
    pub user: Option<String>,
    /// When a live session must end (`close_at_expiry`: the JWT's `exp` plus the grace).
    pub expires: Option<Instant>,
}

/// Why a request was not authenticated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// The access policy said no (401, 403, 429).
    Refused(Refusal),
    /// No place to check a password (`limits.max_password_checks`): 503.
    Shed(Shed),
}

/// The limits and shared state [`authenticate`] works under.
#[derive(Debug, Clone, Copy)]
pub struct Guard<'a> {
    /// The per-client table, where failures are counted.
    pub clients: &'a Clients,
    /// `[limits.per_client]`, for the guard's keys.
    pub per_client: &'a PerClient,
    /// Password checks in progress, gateway-wide.
    pub checks: &'a Arc<PasswordChecks>,
    /// `limits.max_password_checks`.
    pub max_checks: usize,
}

/// Checks the credential `req` presents for `route` (see the module docs for the order).
pub async fn authenticate(
    auth: &RouteAuth,
    route: &str,
    req: Presented<'_>,
    guard: Guard<'_>,
) -> Result<Authenticated, Failure> {
    blocked(&guard, req.client)?;
    let outcome = match &auth.check {
        Check::Bearer(tokens) => match token(&auth.config, req.headers, req.query) {
            Carried::None => Err(Verdict::Missing),
            Carried::Malformed => Err(Verdict::Invalid("malformed token".into())),
            Carried::Token(t) => tokens
                .find(&t)
                .map(|user| Authenticated { user, expires: None })
                .ok_or(Verdict::Invalid("unknown token".into())),
        },
        Check::Jwt(keys) => match token(&auth.config, req.headers, req.query) {
            Carried::None => Err(Verdict::Missing),
            Carried::Malformed => Err(Verdict::Invalid("malformed token".into())),
            Carried::Token(t) => keys.check(&t, route),
        },
        Check::Basic(users) => match basic::credentials(req.headers) {
            None => Err(Verdict::Missing),
            Some(Err(())) => Err(Verdict::Invalid("malformed Basic credentials".into())),
            Some(Ok((user, password))) => {
                users.check(&user, &password, guard.checks, guard.max_checks).await.map_err(Failure::Shed)?
            }
        },
    };
    let mut started_block = false;
    let outcome = outcome.map_err(|verdict| {
        if matches!(verdict, Verdict::Invalid(_)) {
            started_block = guard.clients.auth_failed(req.client, guard.per_client, Instant::now()).is_some();
        }
        Failure::Refused(verdict.refusal(auth))
    });
    // Asked again once the check is done: guesses checked side by side (passwords take a while)
    // all passed the first question, and those that end after another one began the block
    // must tell their sender nothing, right or wrong, or the guard would answer more guesses
    // than it counts.
    if !started_block {
        blocked(&guard, req.client)?;
    }
    outcome
}

/// The brute-force guard's answer: 429 with `Retry-After` while `client` is blocked.
fn blocked(guard: &Guard<'_>, client: IpAddr) -> Result<(), Failure> {
    let now = Instant::now();
    let Some(until) = guard.clients.auth_blocked(client, guard.per_client, now) else { return Ok(()) };
    Err(Failure::Refused(refuse(
        StatusCode::TOO_MANY_REQUESTS,
        Denied::TooManyFailures,
        "too many failed attempts from this address; try again later".into(),
        Some((header::RETRY_AFTER, retry_after(until.saturating_duration_since(now)))),
    )))
}

/// Why a credential did not pass its check.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Verdict {
    /// None came.
    Missing,
    /// One came and is not valid; why, in words safe to show (never the credential).
    Invalid(String),
    /// Valid, but not for this route; why.
    Forbidden(String),
}

impl Verdict {
    fn refusal(self, auth: &RouteAuth) -> Refusal {
        let realm = &auth.config.realm;
        let basic = matches!(auth.check, Check::Basic(_));
        // RFC 6750 §3: no error code when nothing was sent; RFC 7617 for Basic.
        let challenge = |error: Option<&str>| {
            let value = match (basic, error) {
                (true, _) => format!("Basic realm=\"{realm}\", charset=\"UTF-8\""),
                (false, None) => format!("Bearer realm=\"{realm}\""),
                (false, Some(e)) => format!("Bearer realm=\"{realm}\", error=\"{e}\""),
            };
            // The realm was checked for quotes and control characters by the config.
            HeaderValue::from_str(&value).ok().map(|v| (header::WWW_AUTHENTICATE, v))
        };
        match self {
            Verdict::Missing => refuse(
                StatusCode::UNAUTHORIZED,
                Denied::MissingCredentials,
                "credentials required".into(),
                challenge(None),
            ),
            Verdict::Invalid(why) => refuse(
                StatusCode::UNAUTHORIZED,
                Denied::InvalidCredentials,
                format!("invalid credentials: {why}"),
                challenge(Some("invalid_token")),
            ),
            Verdict::Forbidden(why) => refuse(
                StatusCode::FORBIDDEN,
                Denied::Forbidden,
                why,
                if basic { None } else { challenge(Some("insufficient_scope")) },
            ),
        }
    }
}

fn refuse(status: StatusCode, denied: Denied, reason: String, header: Option<(HeaderName, HeaderValue)>) -> Refusal {
    Refusal { status, reason, headers: header.into_iter().collect(), kind: RefusalKind::Access(denied) }
}

/// `Retry-After` in whole seconds, rounded up (at least 1).
fn retry_after(wait: Duration) -> HeaderValue {
    HeaderValue::from((wait.as_secs() + u64::from(wait.subsec_nanos() > 0)).max(1))
}

/// A bearer token or JWT as the request carried it.
enum Carried<'a> {
    None,
    /// A carrier was there but its value cannot be a token (bad encoding).
    Malformed,
    Token(Cow<'a, str>),
}

/// The token from the first carrier the route allows that has one: `Authorization: Bearer`,
/// the cookie, `?access_token=`, the subprotocol entry.
fn token<'a>(auth: &config::Auth, headers: &'a HeaderMap, query: Option<&'a str>) -> Carried<'a> {
    let bearer = headers.get_all(header::AUTHORIZATION).iter().find_map(|v| {
        let v = v.to_str().ok()?;
        let (scheme, rest) = v.split_once(' ')?;
        scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
    });
    if let Some(t) = bearer.filter(|t| !t.is_empty()) {
        return Carried::Token(Cow::Borrowed(t));
    }
    if let Some(name) = &auth.cookie {
        let cookie = headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .filter_map(|pair| pair.trim().split_once('='))
            .find_map(|(n, value)| (n == name).then(|| value.trim_matches('"')));
        if let Some(t) = cookie.filter(|t| !t.is_empty()) {
            return Carried::Token(Cow::Borrowed(t));
        }
    }
    if auth.query
        && let Some(t) = query.into_iter().flat_map(|q| q.split('&')).find_map(|p| p.strip_prefix("access_token="))
        && !t.is_empty()
    {
        return match percent_decode(t) {
            Some(t) => Carried::Token(t),
            None => Carried::Malformed,
        };
    }
    if let Some(prefix) = &auth.subprotocol_prefix {
        let entry = headers
            .get_all(header::SEC_WEBSOCKET_PROTOCOL)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .find_map(|p| p.trim().strip_prefix(prefix.as_str()));
        if let Some(t) = entry.filter(|t| !t.is_empty()) {
            if !prefix.starts_with("base64url.") {
                return Carried::Token(Cow::Borrowed(t));
            }
            // Kubernetes' form: the token base64url-encoded (unpadded), so any token fits in
            // a subprotocol token's characters.
            let decoded = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(t.trim_end_matches('='));
            return match decoded.ok().and_then(|b| String::from_utf8(b).ok()) {
                Some(t) => Carried::Token(Cow::Owned(t)),
                None => Carried::Malformed,
            };
        }
    }
    Carried::None
}

/// `%XX` escapes decoded (a `+` stays a `+`: tokens are not form text); `None` when an escape
/// is broken or the result is not UTF-8.
pub(crate) fn percent_decode(s: &str) -> Option<Cow<'_, str>> {
    if !s.contains('%') {
        return Some(Cow::Borrowed(s));
    }
    let (bytes, mut out, mut i) = (s.as_bytes(), Vec::with_capacity(s.len()), 0);
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok().map(Cow::Owned)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Bearer;

    fn auth(cookie: Option<&str>, query: bool, prefix: Option<&str>) -> config::Auth {
        config::Auth {
            mechanism: Mechanism::Bearer(Bearer { tokens: vec![], tokens_file: None }),
            realm: "wsgate".into(),
            cookie: cookie.map(str::to_string),
            query,
            subprotocol_prefix: prefix.map(str::to_string),
            user_label: false,
        }
    }

    fn headers(pairs: &[(HeaderName, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (n, v) in pairs {
            h.append(n.clone(), HeaderValue::from_str(v).unwrap());
        }
        h
    }

    fn carried(c: Carried<'_>) -> Option<String> {
        match c {
            Carried::Token(t) => Some(t.into_owned()),
            Carried::Malformed => Some("<malformed>".into()),
            Carried::None => None,
        }
    }

    /// Each carrier is read only when the route allows it, in the documented order.
    #[test]
    fn carriers_in_order() {
        let k8s = "base64url.bearer.authorization.k8s.io.";
        let all = auth(Some("tok"), true, Some(k8s));
        let h = headers(&[
            (header::COOKIE, "a=b; tok=from-cookie"),
            (header::SEC_WEBSOCKET_PROTOCOL, &format!("chat, {k8s}ZnJvbS1wcm90b2NvbA")),
        ]);
        assert_eq!(carried(token(&all, &h, Some("x=1&access_token=from%2Dquery"))).as_deref(), Some("from-cookie"));
        let mut with_header = h.clone();
        with_header.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer from-header"));
        assert_eq!(carried(token(&all, &with_header, None)).as_deref(), Some("from-header"));
        let no_cookie = headers(&[(header::SEC_WEBSOCKET_PROTOCOL, &format!("chat, {k8s}ZnJvbS1wcm90b2NvbA"))]);
        assert_eq!(carried(token(&all, &no_cookie, Some("access_token=from%2Dquery"))).as_deref(), Some("from-query"));
        assert_eq!(carried(token(&all, &no_cookie, None)).as_deref(), Some("from-protocol"));
        // Not allowed by the route: not read.
        let header_only = auth(None, false, None);
        assert_eq!(carried(token(&header_only, &h, Some("access_token=q"))), None);
        // A broken encoding is malformed, not missing.
        assert_eq!(carried(token(&all, &HeaderMap::new(), Some("access_token=%zz"))).as_deref(), Some("<malformed>"));
        let raw = auth(None, false, Some("token."));
        let h = headers(&[(header::SEC_WEBSOCKET_PROTOCOL, "token.abc.def, chat")]);
        assert_eq!(carried(token(&raw, &h, None)).as_deref(), Some("abc.def"));
    }

    /// 401s carry the RFC 6750 / RFC 7617 challenge; the reason never repeats the credential.
    #[test]
    fn refusals_carry_challenges() {
        let route = RouteAuth { config: auth(None, false, None), check: Check::Bearer(bearer::Tokens::default()) };
        let r = Verdict::Missing.refusal(&route);
        assert_eq!((r.status, r.kind), (StatusCode::UNAUTHORIZED, RefusalKind::Access(Denied::MissingCredentials)));
        assert_eq!(r.headers, vec![(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer realm=\"wsgate\""))]);
        let r = Verdict::Invalid("unknown token".into()).refusal(&route);
        assert_eq!(r.headers[0].1, "Bearer realm=\"wsgate\", error=\"invalid_token\"");
    }
}
