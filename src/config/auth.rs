//! The validated `[routes.NAME.auth]` table and `on_refusal`: which mechanism a route asks for,
//! where the credential may travel, and the files the `auth` module loads (at start and on every
//! reload). Data only: reading those files and checking credentials is `auth`'s job.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

/// A route's access policy: one mechanism, and the carriers its credential may come in.
#[derive(Debug, Clone, PartialEq)]
pub struct Auth {
    /// What the credential is and how it is checked.
    pub mechanism: Mechanism,
    /// The realm named in `WWW-Authenticate` (no quotes or backslashes).
    pub realm: String,
    /// Bearer and JWT: the cookie that may carry the token. Refused with `allowed_origins = ["*"]`.
    pub cookie: Option<String>,
    /// Bearer and JWT: whether `?access_token=` may carry the token.
    pub query: bool,
    /// Bearer and JWT: a `Sec-WebSocket-Protocol` entry starting with this carries the token
    /// (the rest of the entry; base64url-decoded when the prefix starts with `base64url.`).
    /// Such entries are never selected nor echoed. Refused on a route without `subprotocols`.
    pub subprotocol_prefix: Option<String>,
    /// Whether sessions are counted by user in `wsgate_user_sessions_total` (off: user names,
    /// a JWT's `sub` especially, can be personal data, and a metric label is kept for long).
    pub user_label: bool,
}

impl Auth {
    /// Whether an offered subprotocol is a token carrier rather than a protocol.
    pub fn is_token_subprotocol(&self, offered: &str) -> bool {
        self.subprotocol_prefix.as_deref().is_some_and(|p| offered.starts_with(p))
    }
}

/// How a route checks credentials.
#[derive(Debug, Clone, PartialEq)]
pub enum Mechanism {
    /// Opaque tokens compared (in constant time) by their SHA-256.
    Bearer(Bearer),
    /// Signed JSON Web Tokens.
    Jwt(Jwt),
    /// HTTP Basic against an htpasswd file of bcrypt or argon2 hashes.
    Basic(Basic),
}

/// `type = "bearer"`.
#[derive(Debug, Clone, PartialEq)]
pub struct Bearer {
    /// From `tokens`.
    pub tokens: Vec<TokenHash>,
    /// `tokens_file`: one hash per line, read at start and on every reload.
    pub tokens_file: Option<PathBuf>,
}

/// `type = "jwt"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Jwt {
    /// Key files: PEM public keys (RSA, EC P-256, Ed25519), or, for HS256, a file whose bytes
    /// are the secret. A PEM file is never used as an HMAC secret.
    pub keys: Vec<PathBuf>,
    /// A JWKS (JSON Web Key Set) file, read at start and on every reload.
    pub jwks_file: Option<PathBuf>,
    /// The algorithms accepted; the token's header only picks among them.
    pub algorithms: Vec<JwtAlgorithm>,
    /// Accepted `aud` values; empty: not checked.
    pub audience: Vec<String>,
    /// Accepted `iss` values; empty: not checked.
    pub issuer: Vec<String>,
    /// Clock skew allowed on `exp` and `nbf`.
    pub leeway: Duration,
    /// A claim listing the routes the token may open (a string, space-separated, or an array).
    pub routes_claim: Option<String>,
    /// Close live sessions when the token's `exp` (plus `expiry_grace`) passes.
    pub close_at_expiry: bool,
    /// How long after `exp` a live session is closed, with `close_at_expiry`.
    pub expiry_grace: Duration,
}

/// `type = "basic"`.
#[derive(Debug, Clone, PartialEq)]
pub struct Basic {
    /// The htpasswd file: `user:hash` lines, bcrypt (`$2y$`, `$2b$`, `$2a$`) or argon2 (`$argon2id$`...).
    pub htpasswd: PathBuf,
}

/// A JWT signature algorithm a route may accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum JwtAlgorithm {
    /// HMAC with SHA-256 and a shared secret.
    HS256,
    /// RSASSA-PKCS1-v1_5 with SHA-256.
    RS256,
    /// ECDSA on P-256 with SHA-256.
    ES256,
    /// Ed25519.
    EdDSA,
}

/// What a client refused by the access policy sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnRefusal {
    /// An HTTP 401, 403 or 429 (a browser's page sees only 1006).
    Http,
    /// Upgrade without dialling, then close with 4401, 4403 or 4429 and the reason.
    Close,
}

/// The SHA-256 of a bearer token, optionally named (`name=sha256:<hex>`; the name becomes the
/// session's user). `Debug` hides the hash: a weak token can be found from it.
#[derive(Clone, PartialEq, Eq)]
pub struct TokenHash {
    /// Who holds the token, for the session log.
    pub name: Option<String>,
    /// The digest.
    pub sha256: [u8; 32],
}

impl fmt::Debug for TokenHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenHash").field("name", &self.name).field("sha256", &"<redacted>").finish()
    }
}

impl TokenHash {
    /// Reads `[name=]sha256:<64 hex digits>`; the error completes "expected ...".
    pub fn parse(s: &str) -> Result<TokenHash, &'static str> {
        const FORM: &str = "[name=]sha256:<64 hex digits> (the SHA-256 of the token, never the token)";
        let (name, hash) = match s.split_once('=') {
            Some((name, hash)) => (Some(name.trim()), hash.trim()),
            None => (None, s.trim()),
        };
        let name_ok = |n: &str| !n.is_empty() && n.bytes().all(|b| b.is_ascii_graphic() && b != b'"');
        if name.is_some_and(|n| !name_ok(n)) {
            return Err(FORM);
        }
        let hex = hash.strip_prefix("sha256:").ok_or(FORM)?;
        if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(FORM);
        }
        let mut sha256 = [0u8; 32];
        for (i, byte) in sha256.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(|_| FORM)?;
        }
        Ok(TokenHash { name: name.map(str::to_string), sha256 })
    }

    /// Reads a tokens file's text: one hash per line; blank lines and lines starting with `#`
    /// are skipped. A bad line is reported by number, never quoted (it may be a token).
    pub fn parse_lines(text: &str) -> Result<Vec<TokenHash>, (usize, &'static str)> {
        let lines = text.lines().enumerate().map(|(i, line)| (i + 1, line.trim()));
        lines
            .filter(|(_, line)| !line.is_empty() && !line.starts_with('#'))
            .map(|(n, line)| TokenHash::parse(line).map_err(|form| (n, form)))
            .collect()
    }

    /// The entry of `hashes` whose digest `token` has. Every entry is compared in constant
    /// time, whatever matches, so the time taken says nothing about which came close.
    pub fn find<'a>(hashes: &'a [TokenHash], token: &[u8]) -> Option<&'a TokenHash> {
        use aws_lc_rs::constant_time::verify_slices_are_equal;
        let presented = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, token);
        hashes.iter().fold(None, |found, h| {
            let equal = verify_slices_are_equal(presented.as_ref(), &h.sha256).is_ok();
            found.or(equal.then_some(h))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Named and unnamed hashes parse; tokens, short hashes and other algorithms do not; Debug hides the digest.
    #[test]
    fn token_hashes_parse() {
        let hex = "ab".repeat(32);
        let h = TokenHash::parse(&format!("sha256:{hex}")).unwrap();
        assert_eq!((h.name, h.sha256), (None, [0xab; 32]));
        let h = TokenHash::parse(&format!("ops = sha256:{hex}")).unwrap();
        assert_eq!(h.name.as_deref(), Some("ops"));
        assert!(!format!("{h:?}").contains("ab"), "{h:?}");
        for bad in [
            "secret-token",
            "sha256:abcd",
            &format!("md5:{hex}"),
            &format!("=sha256:{hex}"),
            &format!("sha256:{}", "zz".repeat(32)),
        ] {
            assert!(TokenHash::parse(bad).is_err(), "{bad}");
        }
    }
}
