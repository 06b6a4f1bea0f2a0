//! How `wsgate connect` carries its bearer token (`--token-via`): the four carriers a route's
//! `[routes.NAME.auth]` can accept (docs/config.md, "Where the credential comes from").
//!
//! `Authorization: Bearer` is always accepted and is the default. The others exist for what sits
//! in front of the gateway: a proxy that takes `Authorization` for its own login (and strips or
//! rejects ours) still passes a cookie, a query parameter or a subprotocol entry. The token comes
//! from `--token-env` or `--token-file` only (`main`), and whichever carrier takes it, the value
//! is marked sensitive and never reaches a log or an error line.

use base64::Engine;
use tungstenite::http::{HeaderMap, HeaderValue, header};

use super::{ClientError, Secret};

/// Where the token goes in the upgrade request.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum TokenVia {
    /// `Authorization: Bearer <token>`.
    #[default]
    Header,
    /// `Cookie: <name>=<token>` (the route's `auth.cookie`).
    Cookie(String),
    /// `?access_token=<token>`, percent-encoded (the route's `auth.query = true`).
    Query,
    /// A `Sec-WebSocket-Protocol` entry `<prefix><token>`, the token base64url-encoded when the
    /// prefix starts with `base64url.` as the gateway (and Kubernetes) expects
    /// (the route's `auth.subprotocol_prefix`).
    Subprotocol(String),
}

impl TokenVia {
    /// Reads `header`, `cookie:NAME`, `query` or `subprotocol:PREFIX`.
    pub fn parse(text: &str) -> Result<TokenVia, ClientError> {
        let bad = |why: &str| ClientError::Usage(format!("--token-via {text:?}: {why}"));
        match text.split_once(':') {
            None if text == "header" => Ok(TokenVia::Header),
            None if text == "query" => Ok(TokenVia::Query),
            Some(("cookie", name)) if is_token(name) => Ok(TokenVia::Cookie(name.to_string())),
            Some(("cookie", _)) => Err(bad("the cookie name must be a token (letters, digits, !#$%&'*+-.^_`|~)")),
            Some(("subprotocol", prefix)) if is_token(prefix) => Ok(TokenVia::Subprotocol(prefix.to_string())),
            Some(("subprotocol", _)) => Err(bad("the prefix must be a subprotocol token")),
            _ => Err(bad("not header, query, cookie:NAME or subprotocol:PREFIX")),
        }
    }

    /// Puts `token` into the request: a header in `headers`, or a query parameter on
    /// `path_and_query`.
    pub(super) fn apply(
        &self,
        token: &Secret,
        headers: &mut HeaderMap,
        path_and_query: &mut String,
    ) -> Result<(), ClientError> {
        let unfit = || ClientError::Usage(format!("the token holds characters {} cannot carry", self.describe()));
        let sensitive = |text: String| {
            let mut value = HeaderValue::from_str(&text).map_err(|_| unfit())?;
            value.set_sensitive(true);
            Ok::<_, ClientError>(value)
        };
        match self {
            TokenVia::Header => {
                headers.insert(header::AUTHORIZATION, sensitive(format!("Bearer {}", token.0))?);
            }
            TokenVia::Cookie(name) => {
                // RFC 6265's cookie-octets: no space, quote, comma, semicolon or backslash.
                if !token.0.bytes().all(|b| b.is_ascii_graphic() && !b"\",;\\".contains(&b)) {
                    return Err(unfit());
                }
                headers.append(header::COOKIE, sensitive(format!("{name}={}", token.0))?);
            }
            TokenVia::Query => {
                path_and_query.push(if path_and_query.contains('?') { '&' } else { '?' });
                path_and_query.push_str("access_token=");
                path_and_query.push_str(&percent_encode(&token.0));
            }
            TokenVia::Subprotocol(prefix) => {
                let entry = if prefix.starts_with("base64url.") {
                    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&token.0)
                } else if is_token(&token.0) {
                    token.0.clone()
                } else {
                    return Err(unfit());
                };
                // A header of its own, after the offered subprotocols: the gateway reads every
                // `Sec-WebSocket-Protocol` line and removes this entry before it selects one.
                headers.append(header::SEC_WEBSOCKET_PROTOCOL, sensitive(format!("{prefix}{entry}"))?);
            }
        }
        Ok(())
    }

    fn describe(&self) -> &'static str {
        match self {
            TokenVia::Header => "a header",
            TokenVia::Cookie(_) => "a cookie",
            TokenVia::Query => "a query parameter",
            TokenVia::Subprotocol(_) => "a subprotocol entry (use a base64url. prefix)",
        }
    }
}

/// Whether `s` is an RFC 7230 token (what a subprotocol or a cookie name must be).
fn is_token(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// Percent-encodes all but RFC 3986's unreserved characters (so a `+` is sent as `%2B`, which
/// the gateway decodes back to `+`).
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The four carriers parse; anything else (or a bad name) is a usage error.
    #[test]
    fn carriers_parse() {
        assert_eq!(TokenVia::parse("header").unwrap(), TokenVia::Header);
        assert_eq!(TokenVia::parse("query").unwrap(), TokenVia::Query);
        assert_eq!(TokenVia::parse("cookie:gw_token").unwrap(), TokenVia::Cookie("gw_token".into()));
        assert_eq!(TokenVia::parse("subprotocol:base64url.t.").unwrap(), TokenVia::Subprotocol("base64url.t.".into()));
        for bad in ["", "cookie", "cookie:", "cookie:a b", "subprotocol:", "subprotocol:a,b", "body"] {
            assert!(matches!(TokenVia::parse(bad), Err(ClientError::Usage(_))), "{bad:?}");
        }
    }

    /// Each carrier puts the token where the gateway's `auth::token` looks, encoded as it
    /// decodes; the header values are marked sensitive.
    #[test]
    fn carriers_apply() {
        let token = Secret("a+b/c=d".into());
        let (mut headers, mut path) = (HeaderMap::new(), String::from("/r?x=1"));
        TokenVia::Query.apply(&token, &mut headers, &mut path).unwrap();
        assert_eq!(path, "/r?x=1&access_token=a%2Bb%2Fc%3Dd");
        assert!(headers.is_empty());
        TokenVia::Cookie("t".into()).apply(&token, &mut headers, &mut path).unwrap();
        assert_eq!(headers[header::COOKIE], "t=a+b/c=d");
        assert!(headers[header::COOKIE].is_sensitive());
        TokenVia::Subprotocol("base64url.p.".into()).apply(&token, &mut headers, &mut path).unwrap();
        assert_eq!(headers[header::SEC_WEBSOCKET_PROTOCOL], "base64url.p.YStiL2M9ZA");
        // A raw prefix takes only tokens; '/' and '=' are not.
        let raw = TokenVia::Subprotocol("tok.".into()).apply(&token, &mut headers, &mut path);
        assert!(matches!(raw, Err(ClientError::Usage(ref m)) if !m.contains("a+b")), "{raw:?}");
        TokenVia::Header.apply(&token, &mut headers, &mut path).unwrap();
        assert!(headers[header::AUTHORIZATION].is_sensitive());
    }
}
