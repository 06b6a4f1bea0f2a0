//! `[routes.NAME.auth]` and `on_refusal`: defaults, bounds, the keys each mechanism takes, and
//! the carrier rules that are about safety rather than form (a cookie carrier with any origin
//! allowed; a subprotocol carrier on a route that selects no subprotocol).

use std::time::Duration;

use super::super::raw::{AuthType, Choice, RawAuth, Seconds};
use super::super::{AllowedOrigins, Auth, Basic, Bearer, Jwt, JwtAlgorithm, Mechanism, TokenHash};
use super::Validator;

const DEFAULT_REALM: &str = "wsgate";
/// Clocks of token issuers and gateways drift by seconds, not minutes.
const DEFAULT_LEEWAY_SECS: f64 = 30.0;
const MAX_LEEWAY_SECS: f64 = 300.0;

/// The keys only some mechanisms take, with those mechanisms.
const MECHANISM_KEYS: &[(&str, &[AuthType])] = &[
    ("cookie", &[AuthType::Bearer, AuthType::Jwt]),
    ("query", &[AuthType::Bearer, AuthType::Jwt]),
    ("subprotocol_prefix", &[AuthType::Bearer, AuthType::Jwt]),
    ("tokens", &[AuthType::Bearer]),
    ("tokens_file", &[AuthType::Bearer]),
    ("keys", &[AuthType::Jwt]),
    ("jwks_file", &[AuthType::Jwt]),
    ("algorithms", &[AuthType::Jwt]),
    ("audience", &[AuthType::Jwt]),
    ("issuer", &[AuthType::Jwt]),
    ("leeway_secs", &[AuthType::Jwt]),
    ("routes_claim", &[AuthType::Jwt]),
    ("close_at_expiry", &[AuthType::Jwt]),
    ("expiry_grace_secs", &[AuthType::Jwt]),
    ("htpasswd", &[AuthType::Basic]),
];

impl Validator<'_> {
    /// The route's auth table; `origins` and `subprotocols` are the route's, already validated.
    pub(super) fn auth(
        &mut self,
        key: &str,
        mut raw: RawAuth,
        origins: Option<&AllowedOrigins>,
        subprotocols: Option<&[String]>,
    ) -> Option<Auth> {
        let kind = match std::mem::replace(&mut raw.kind, Choice::Listed(AuthType::Bearer)) {
            Choice::Listed(kind) => kind,
            unlisted => {
                self.choice(&format!("{key}.type"), Some(unlisted), AuthType::Bearer);
                return None;
            }
        };
        let set = [
            ("cookie", raw.cookie.is_some()),
            ("query", raw.query.is_some()),
            ("subprotocol_prefix", raw.subprotocol_prefix.is_some()),
            ("tokens", raw.tokens.is_some()),
            ("tokens_file", raw.tokens_file.is_some()),
            ("keys", raw.keys.is_some()),
            ("jwks_file", raw.jwks_file.is_some()),
            ("algorithms", raw.algorithms.is_some()),
            ("audience", raw.audience.is_some()),
            ("issuer", raw.issuer.is_some()),
            ("leeway_secs", raw.leeway_secs.is_some()),
            ("routes_claim", raw.routes_claim.is_some()),
            ("close_at_expiry", raw.close_at_expiry.is_some()),
            ("expiry_grace_secs", raw.expiry_grace_secs.is_some()),
            ("htpasswd", raw.htpasswd.is_some()),
        ];
        let mut misplaced = false;
        for (name, types) in MECHANISM_KEYS {
            if set.iter().any(|(n, is_set)| n == name && *is_set) && !types.contains(&kind) {
                self.fail(format!("{key}.{name}"), format!("does not apply to type = \"{}\"", type_name(kind)));
                misplaced = true;
            }
        }
        let realm = raw.realm.take().unwrap_or_else(|| DEFAULT_REALM.to_string());
        if realm.is_empty() || realm.chars().any(|c| c == '"' || c == '\\' || c.is_control()) {
            self.fail(format!("{key}.realm"), "must be non-empty, without quotes, backslashes or control characters");
            misplaced = true;
        }
        let cookie = raw.cookie.take().and_then(|c| self.cookie(&format!("{key}.cookie"), c, origins));
        let subprotocol_prefix = raw
            .subprotocol_prefix
            .take()
            .and_then(|p| self.subprotocol_prefix(&format!("{key}.subprotocol_prefix"), p, subprotocols));
        let mechanism = match kind {
            AuthType::Bearer => self.bearer(key, raw.tokens.take(), raw.tokens_file.take()),
            AuthType::Jwt => self.jwt(key, &raw),
            AuthType::Basic => match raw.htpasswd.take() {
                Some(path) => {
                    Some(Mechanism::Basic(Basic { htpasswd: self.file_path(&format!("{key}.htpasswd"), &path) }))
                }
                None => {
                    self.fail(format!("{key}.htpasswd"), "type = \"basic\" needs an htpasswd file");
                    None
                }
            },
        };
        if misplaced {
            return None;
        }
        Some(Auth {
            mechanism: mechanism?,
            realm,
            cookie,
            query: raw.query.unwrap_or(false),
            subprotocol_prefix,
            user_label: raw.user_label.unwrap_or(false),
        })
    }

    fn cookie(&mut self, key: &str, name: String, origins: Option<&AllowedOrigins>) -> Option<String> {
        // RFC 6265: a cookie name is an RFC 2616 token.
        if !is_token(&name) {
            self.fail(key, format!("{name:?} is not a valid cookie name"));
            return None;
        }
        if origins == Some(&AllowedOrigins::Any) {
            self.fail(
                key,
                "a cookie carrier needs allowed_origins other than [\"*\"]: any page could open the route with the \
                 user's cookie (cross-site WebSocket hijacking)",
            );
            return None;
        }
        Some(name)
    }

    fn subprotocol_prefix(&mut self, key: &str, prefix: String, subprotocols: Option<&[String]>) -> Option<String> {
        if !is_token(&prefix) {
            self.fail(key, format!("{prefix:?} is not a valid subprotocol token"));
            return None;
        }
        let subprotocols = subprotocols?;
        if subprotocols.is_empty() {
            self.fail(
                key,
                "needs the route to list subprotocols: a browser fails a handshake that offers protocols and gets \
                 none selected, and the token entry is never selected",
            );
            return None;
        }
        if let Some(p) = subprotocols.iter().find(|p| p.starts_with(&prefix)) {
            self.fail(key, format!("the route's subprotocol {p:?} starts with it and would be taken for a token"));
            return None;
        }
        Some(prefix)
    }

    fn bearer(&mut self, key: &str, tokens: Option<Vec<String>>, file: Option<String>) -> Option<Mechanism> {
        let mut hashes = Vec::new();
        let mut valid = true;
        for (i, t) in tokens.iter().flatten().enumerate() {
            match TokenHash::parse(t) {
                Ok(h) => hashes.push(h),
                Err(form) => {
                    // The value is not repeated: it may be a token pasted where its hash belongs.
                    self.fail(format!("{key}.tokens"), format!("entry {} is not {form}", i + 1));
                    valid = false;
                }
            }
        }
        let tokens_file = file.map(|f| self.file_path(&format!("{key}.tokens_file"), &f));
        if hashes.is_empty() && tokens_file.is_none() && valid {
            self.fail(format!("{key}.tokens"), "type = \"bearer\" needs tokens or a tokens_file");
            return None;
        }
        valid.then_some(Mechanism::Bearer(Bearer { tokens: hashes, tokens_file }))
    }

    pub(super) fn jwt(&mut self, key: &str, raw: &RawAuth) -> Option<Mechanism> {
        let mut algorithms = Vec::new();
        for alg in raw.algorithms.iter().flatten() {
            let alg = match alg {
                Choice::Listed(a) => Choice::Listed(*a),
                Choice::Unlisted { written, span, allowed } => {
                    Choice::Unlisted { written: written.clone(), span: span.clone(), allowed }
                }
            };
            algorithms.push(self.choice(&format!("{key}.algorithms"), Some(alg), JwtAlgorithm::RS256)?);
        }
        if algorithms.is_empty() {
            self.fail(
                format!("{key}.algorithms"),
                "type = \"jwt\" needs the accepted algorithms, e.g. [\"RS256\"] (never taken from the token)",
            );
            return None;
        }
        let keys: Vec<_> = raw.keys.iter().flatten().map(|k| self.file_path(&format!("{key}.keys"), k)).collect();
        let jwks_file = raw.jwks_file.as_ref().map(|f| self.file_path(&format!("{key}.jwks_file"), f));
        if keys.is_empty() && jwks_file.is_none() {
            self.fail(format!("{key}.keys"), "type = \"jwt\" needs keys or a jwks_file");
            return None;
        }
        let leeway =
            self.bounded_secs(&format!("{key}.leeway_secs"), raw.leeway_secs, DEFAULT_LEEWAY_SECS, MAX_LEEWAY_SECS);
        let expiry_grace =
            self.bounded_secs(&format!("{key}.expiry_grace_secs"), raw.expiry_grace_secs, 0.0, super::MAX_SECS);
        let routes_claim = raw.routes_claim.clone();
        if routes_claim.as_deref().is_some_and(str::is_empty) {
            self.fail(format!("{key}.routes_claim"), "must name a claim");
            return None;
        }
        Some(Mechanism::Jwt(Jwt {
            keys,
            jwks_file,
            algorithms,
            audience: raw.audience.clone().unwrap_or_default(),
            issuer: raw.issuer.clone().unwrap_or_default(),
            leeway,
            routes_claim,
            close_at_expiry: raw.close_at_expiry.unwrap_or(false),
            expiry_grace,
        }))
    }

    /// Seconds from 0 to `max`; `default` when absent.
    fn bounded_secs(&mut self, key: &str, value: Option<Seconds>, default: f64, max: f64) -> Duration {
        let secs = match value {
            None => default,
            Some(Seconds::Whole(n)) => n as f64,
            Some(Seconds::Fraction(f)) => f,
        };
        if !(0.0..=max).contains(&secs) {
            self.fail(key, format!("{secs} is out of range: 0 to {max} seconds"));
            return Duration::from_secs_f64(default);
        }
        Duration::from_secs_f64(secs)
    }
}

fn type_name(kind: AuthType) -> &'static str {
    match kind {
        AuthType::Bearer => "bearer",
        AuthType::Jwt => "jwt",
        AuthType::Basic => "basic",
    }
}

/// An RFC 2616 token: visible ASCII without separators.
fn is_token(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_graphic() && !b"()<>@,;:\\\"/[]?={}".contains(&b))
}
