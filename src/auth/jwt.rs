//! JSON Web Tokens (RFC 7519), checked with `jsonwebtoken` on aws-lc-rs: the signature with a
//! key of the algorithm's family, then `exp` (required), `nbf`, `aud`, `iss`, then the optional
//! claim naming the routes the token may open.
//!
//! The accepted algorithms come from the config. The token's header only picks among them, and
//! a key is only ever used with algorithms of its own family: a PEM public key is never an HMAC
//! secret, so an HS256 token "signed" with the gateway's RS256 public key fails, and `alg: none`
//! is not an algorithm at all.

use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::Value;

use super::{AuthError, Authenticated, Verdict};
use crate::config::{Jwt, JwtAlgorithm};

/// HS256 secrets shorter than the hash (RFC 7518 §3.2) are refused.
const MIN_SECRET_BYTES: usize = 32;

/// One route's keys and checks.
pub(super) struct Keys {
    /// Each key with the key id it was published under (JWKS), if any.
    keys: Vec<(Option<String>, DecodingKey)>,
    algorithms: Vec<Algorithm>,
    /// Claims checks, shared by every algorithm (the algorithm is set per token).
    validation: Validation,
    routes_claim: Option<String>,
    /// `close_at_expiry`: the grace after `exp`.
    expiry_grace: Option<Duration>,
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keys").field("keys", &self.keys.len()).field("algorithms", &self.algorithms).finish()
    }
}

fn algorithm(a: JwtAlgorithm) -> Algorithm {
    match a {
        JwtAlgorithm::HS256 => Algorithm::HS256,
        JwtAlgorithm::RS256 => Algorithm::RS256,
        JwtAlgorithm::ES256 => Algorithm::ES256,
        JwtAlgorithm::EdDSA => Algorithm::EdDSA,
    }
}

impl Keys {
    pub(super) fn load(config: &Jwt, key: &str, config_file: &Path) -> Result<Keys, Vec<AuthError>> {
        let algorithms: Vec<Algorithm> = config.algorithms.iter().copied().map(algorithm).collect();
        let (mut keys, mut errors) = (Vec::new(), Vec::new());
        for path in &config.keys {
            match key_file(path, &algorithms) {
                Ok(loaded) => keys.extend(loaded.into_iter().map(|k| (None, k))),
                Err(problem) => errors.push(AuthError::new(path, None, format!("{key}.keys"), problem)),
            }
        }
        if let Some(path) = &config.jwks_file {
            match jwks_file(path, &algorithms) {
                Ok(loaded) => keys.extend(loaded),
                Err(problem) => errors.push(AuthError::new(path, None, format!("{key}.jwks_file"), problem)),
            }
        }
        if errors.is_empty() && keys.is_empty() {
            errors.push(AuthError::new(config_file, None, format!("{key}.keys"), "no usable key"));
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        let mut validation = Validation::new(algorithms[0]);
        validation.leeway = config.leeway.as_secs();
        validation.validate_nbf = true;
        validation.required_spec_claims = ["exp".to_string()].into();
        if config.audience.is_empty() {
            validation.validate_aud = false;
        } else {
            validation.set_audience(&config.audience);
            validation.required_spec_claims.insert("aud".into());
        }
        if !config.issuer.is_empty() {
            validation.set_issuer(&config.issuer);
            validation.required_spec_claims.insert("iss".into());
        }
        Ok(Keys {
            keys,
            algorithms,
            validation,
            routes_claim: config.routes_claim.clone(),
            expiry_grace: config.close_at_expiry.then_some(config.expiry_grace),
        })
    }

    /// Checks `token` for the route named `route`.
    pub(super) fn check(&self, token: &str, route: &str) -> Result<Authenticated, Verdict> {
        let claims = self.verify(token).map_err(|why| Verdict::Invalid(why.to_string()))?;
        if let Some(name) = &self.routes_claim {
            let allowed = match claims.get(name) {
                Some(Value::String(s)) => s.split_whitespace().any(|r| r == route),
                Some(Value::Array(a)) => a.iter().any(|r| r.as_str() == Some(route)),
                _ => false,
            };
            if !allowed {
                // Route names are never sent to clients (docs/config.md).
                return Err(Verdict::Forbidden("the token does not allow this route".to_string()));
            }
        }
        let user = claims.get("sub").and_then(Value::as_str).map(str::to_string);
        let expires = self.expiry_grace.and_then(|grace| {
            let exp = claims.get("exp").and_then(Value::as_f64)?;
            let now = SystemTime::now().duration_since(UNIX_EPOCH).ok()?.as_secs_f64();
            let left = Duration::try_from_secs_f64((exp - now).max(0.0)).ok()? + grace;
            Instant::now().checked_add(left)
        });
        Ok(Authenticated { user, expires })
    }

    /// The claims of `token` once its signature, `exp`, `nbf`, `aud` and `iss` pass; otherwise
    /// why not, in words a client may read.
    pub(super) fn verify(&self, token: &str) -> Result<Value, &'static str> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| "malformed token")?;
        if !self.algorithms.contains(&header.alg) {
            return Err("algorithm not accepted");
        }
        let mut validation = self.validation.clone();
        validation.algorithms = vec![header.alg];
        let family = header.alg.family();
        let candidates = self
            .keys
            .iter()
            .filter(|(kid, k)| k.family() == family && (kid.is_none() || header.kid.is_none() || kid == &header.kid));
        let mut outcome = Err("no key for this token");
        for (_, key) in candidates {
            match jsonwebtoken::decode::<Value>(token, key, &validation) {
                Ok(data) => return Ok(data.claims),
                // Another key of the family may have signed it.
                Err(e) if matches!(e.kind(), ErrorKind::InvalidSignature) => outcome = Err("bad signature"),
                Err(e) => return Err(claims_problem(e.kind())),
            }
        }
        outcome
    }
}

/// What is wrong with a well-signed token's claims, or its shape, in words a client may read.
fn claims_problem(kind: &ErrorKind) -> &'static str {
    match kind {
        ErrorKind::ExpiredSignature => "token expired",
        ErrorKind::ImmatureSignature => "token not yet valid",
        ErrorKind::InvalidAudience => "wrong audience",
        ErrorKind::InvalidIssuer => "wrong issuer",
        ErrorKind::MissingRequiredClaim(_) => "a required claim is missing",
        ErrorKind::InvalidAlgorithm => "algorithm not accepted",
        _ => "malformed token",
    }
}

/// The keys in one key file: a PEM public key, tried for each configured family (the first
/// that reads it is the one), or for HS256 the file's bytes as the secret.
fn key_file(path: &Path, algorithms: &[Algorithm]) -> Result<Vec<DecodingKey>, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read: {e}"))?;
    if bytes.trim_ascii_start().starts_with(b"-----BEGIN") {
        let mut found = Vec::new();
        for alg in algorithms {
            let key = match alg {
                Algorithm::RS256 => DecodingKey::from_rsa_pem(&bytes),
                Algorithm::ES256 => DecodingKey::from_ec_pem(&bytes),
                Algorithm::EdDSA => DecodingKey::from_ed_pem(&bytes),
                _ => continue,
            };
            if let Ok(key) = key
                && !found.iter().any(|k: &DecodingKey| k.family() == key.family())
            {
                found.push(key);
            }
        }
        if found.is_empty() {
            return Err("not a PEM public key for any of the route's algorithms".into());
        }
        return Ok(found);
    }
    if !algorithms.contains(&Algorithm::HS256) {
        return Err("not a PEM public key (an HMAC secret file needs HS256 among the algorithms)".into());
    }
    let secret = bytes.trim_ascii_end();
    if secret.len() < MIN_SECRET_BYTES {
        return Err(format!("an HS256 secret must be at least {MIN_SECRET_BYTES} bytes"));
    }
    DecodingKey::from_secret(secret).map(|k| vec![k]).map_err(|_| "not a usable HS256 secret".into())
}

/// The keys of a JWKS file whose family is among the configured algorithms' (others are
/// skipped: a set often publishes keys for other services too).
fn jwks_file(path: &Path, algorithms: &[Algorithm]) -> Result<Vec<(Option<String>, DecodingKey)>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read: {e}"))?;
    let set: JwkSet = serde_json::from_str(&text).map_err(|e| format!("not a JWKS (JSON Web Key Set): {e}"))?;
    let mut keys = Vec::new();
    for (i, jwk) in set.keys.iter().enumerate() {
        let key = DecodingKey::from_jwk(jwk).map_err(|e| format!("key {} cannot be used: {e}", i + 1))?;
        if algorithms.iter().any(|a| a.family() == key.family()) {
            keys.push((jwk.common.key_id.clone(), key));
        }
    }
    if keys.is_empty() {
        return Err("holds no key for the route's algorithms".into());
    }
    Ok(keys)
}
