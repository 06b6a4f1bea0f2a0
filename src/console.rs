//! The built-in console: a small, self-contained HTML page (no external assets) where a person
//! can open a WebSocket to any route, send text, binary or a file, switch `binaryType`, and watch
//! every event with `readyState`, `bufferedAmount` and the close `code`/`reason`/`wasClean`.
//!
//! It is off unless `[console] enabled = true`; `lib.rs` hands the page to the server, which
//! serves it for GET on the configured path. Served from the gateway itself, the page is
//! same-origin with every route, so it can reach routes that allow no other origin.

use bytes::Bytes;
use http_body_util::Full;
use hyper::Response;
use hyper::header::{self, HeaderValue};

const HTML: &str = include_str!("console.html");

/// The console page, with headers that keep it self-contained: the CSP allows only its own
/// inline script and style and WebSocket connections.
pub fn page() -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from_static(HTML.as_bytes())));
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/html; charset=utf-8"));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
             connect-src ws: wss:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
        ),
    );
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    r
}
