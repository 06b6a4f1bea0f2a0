//! The admin listener: `GET /metrics` (Prometheus text), `/healthz` (the process is alive) and
//! `/readyz` (200 only while the gateway accepts connections; 503 before its listeners are
//! bound and while it drains, so a load balancer stops sending new clients first).
//!
//! It listens on its own address (default 127.0.0.1:9090), away from the public listeners, and
//! stays up through the drain so the 503 can be seen. Its connections are few and bounded.
//!
//! Where it is not on loopback it can serve TLS and ask for a bearer token (`[admin] tls`,
//! `token_hashes`, `tokens_file`): the token's SHA-256 is compared in constant time with each
//! configured hash, and a request without a good one gets 401 with `WWW-Authenticate`, except on
//! the `open_paths` (the probes, by default), which kubelet reaches without one. Who may read it
//! ([`Access`]) is rebuilt by every reload, files included, and applies to connections accepted
//! after it. The token is never logged, nor its hash.

use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

use crate::config::{AdminAccess, TokenHash};
use crate::metrics::{AdminMetrics, INVALID_TOKEN, MISSING_TOKEN, Metrics};
use crate::server;
use crate::tls::{self, TlsError};

/// Scrapers and probes need few connections; past this, new ones are closed.
const MAX_ADMIN_CONNECTIONS: usize = 64;
/// Time for a TLS handshake, and then for the request head, on an admin connection.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(10);
/// The challenge of a 401 (RFC 6750 §3).
const CHALLENGE: &str = "Bearer realm=\"wsgate-admin\"";
const CHALLENGE_INVALID: &str = "Bearer realm=\"wsgate-admin\", error=\"invalid_token\"";

/// What the admin endpoints report on.
#[derive(Debug, Clone)]
pub(crate) struct State {
    pub metrics: Arc<Metrics>,
    /// True while the gateway accepts connections.
    pub ready: Arc<AtomicBool>,
    /// Who may read them; replaced whole by a reload.
    pub access: Arc<RwLock<Arc<Access>>>,
}

/// Who may read the admin endpoints: TLS or not, and the hashes of the tokens accepted.
#[derive(Default)]
pub(crate) struct Access {
    tls: Option<TlsAcceptor>,
    /// Whether a token is needed (off paths in `open`): any of `token_hashes` or `tokens_file`
    /// configured, even if the file lists none, so that an emptied file locks rather than opens.
    required: bool,
    hashes: Vec<TokenHash>,
    open: Vec<String>,
}

impl std::fmt::Debug for Access {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Access")
            .field("tls", &self.tls.is_some())
            .field("required", &self.required)
            .field("hashes", &self.hashes.len())
            .field("open", &self.open)
            .finish()
    }
}

/// Why the admin listener's access could not be loaded: one line naming key, file and problem.
#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    /// `admin.tls`: the certificate or key.
    #[error("admin.tls: {0}")]
    Tls(#[source] Box<TlsError>),
    /// `admin.tokens_file`: unreadable, or a line that is not a hash (never quoted: it may be a
    /// token).
    #[error("admin.tokens_file: {path}: {problem}")]
    TokensFile {
        /// The file.
        path: PathBuf,
        /// What is wrong, and on which line.
        problem: String,
    },
}

impl Access {
    /// Loads the certificate and the tokens file named by `config`.
    pub(crate) fn load(config: &AdminAccess) -> Result<Access, AccessError> {
        let tls = match &config.tls {
            Some(files) => Some(TlsAcceptor::from(
                tls::server_config(&files.cert, &files.key).map_err(|e| AccessError::Tls(Box::new(e)))?,
            )),
            None => None,
        };
        let mut hashes = config.token_hashes.clone();
        if let Some(path) = &config.tokens_file {
            hashes.extend(read_tokens_file(path)?);
        }
        let required = !config.token_hashes.is_empty() || config.tokens_file.is_some();
        Ok(Access { tls, required, hashes, open: config.open_paths.clone() })
    }

    /// Whether connections are served over TLS.
    pub(crate) fn tls_enabled(&self) -> bool {
        self.tls.is_some()
    }

    /// `None` when the request may pass; otherwise why not.
    fn check(&self, path: &str, headers: &HeaderMap) -> Option<Unauthorized> {
        if !self.required || self.open.iter().any(|p| p == path) {
            return None;
        }
        let Some(token) = bearer(headers) else { return Some(Unauthorized::Missing) };
        TokenHash::find(&self.hashes, token).is_none().then_some(Unauthorized::Invalid)
    }
}

/// One hash per line (`TokenHash::parse_lines`).
fn read_tokens_file(path: &Path) -> Result<Vec<TokenHash>, AccessError> {
    let err = |problem: String| AccessError::TokensFile { path: path.to_path_buf(), problem };
    let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    TokenHash::parse_lines(&text).map_err(|(line, form)| err(format!("line {line}: expected {form}")))
}

/// The token of an `Authorization: Bearer <token>` header (the scheme in any case, RFC 9110
/// §11.1); `None` without one.
fn bearer(headers: &HeaderMap) -> Option<&[u8]> {
    let value = headers.get(header::AUTHORIZATION)?.as_bytes();
    let (scheme, token) = value.split_at_checked(7)?;
    if !scheme.eq_ignore_ascii_case(b"bearer ") {
        return None;
    }
    let token = token.trim_ascii();
    (!token.is_empty()).then_some(token)
}

#[derive(Debug, Clone, Copy)]
enum Unauthorized {
    Missing,
    Invalid,
}

impl Unauthorized {
    /// As `wsgate_admin_unauthorized_total`'s `reason` label says it.
    fn label(self) -> &'static str {
        match self {
            Unauthorized::Missing => MISSING_TOKEN,
            Unauthorized::Invalid => INVALID_TOKEN,
        }
    }
}

/// Serves the admin endpoints on `listener` until `stop` is cancelled.
pub(crate) async fn serve(listener: TcpListener, state: State, stop: CancellationToken, tasks: TaskTracker) {
    let slots = Arc::new(Semaphore::new(MAX_ADMIN_CONNECTIONS));
    while let Some((tcp, peer, slot)) = server::accept_bounded(&listener, &slots, &stop, "admin").await {
        let (state, stop) = (state.clone(), stop.clone());
        let access = state.access.read().unwrap_or_else(|p| p.into_inner()).clone();
        tasks.spawn(async move {
            match &access.tls {
                None => serve_http(tcp, peer, state, stop).await,
                Some(acceptor) => match tokio::time::timeout(ADMIN_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => serve_http(tls, peer, state, stop).await,
                    Ok(Err(e)) => {
                        state.metrics.admin.tls_failed.increment(1);
                        debug!(error = %e, "admin tls handshake failed");
                    }
                    Err(_) => {
                        state.metrics.admin.tls_timeout.increment(1);
                        debug!("admin tls handshake timed out");
                    }
                },
            }
            drop(slot);
        });
    }
}

/// Serves HTTP on one admin connection. Who may read is looked up per request, not per
/// connection: a token revoked by a reload stops working on connections already open too.
async fn serve_http<I>(io: I, peer: std::net::SocketAddr, state: State, stop: CancellationToken)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = service_fn(move |req| {
        let access = state.access.read().unwrap_or_else(|p| p.into_inner()).clone();
        respond(req, peer, state.clone(), access)
    });
    let mut builder = http1::Builder::new();
    builder.timer(TokioTimer::new()).header_read_timeout(ADMIN_TIMEOUT);
    let conn = builder.serve_connection(TokioIo::new(io), service);
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => if let Err(e) = r { debug!(error = %e, "admin connection ended with an error") },
        _ = stop.cancelled() => {}
    }
}

async fn respond(
    req: Request<Incoming>,
    peer: std::net::SocketAddr,
    state: State,
    access: Arc<Access>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    if let Some(why) = access.check(req.uri().path(), req.headers()) {
        let (path, reason) = (req.uri().path(), why.label());
        // Someone without a good token (a guesser, a scraper left with a revoked one) is worth a
        // line, once in a while: each is counted, and written at debug level. Never the token.
        match state.metrics.admin.unauthorized_warnings.allow() {
            Some(suppressed) => warn!(client.addr = %peer, path, reason, suppressed, "admin request refused (401)"),
            None => debug!(client.addr = %peer, path, reason, "admin request refused (401)"),
        }
        return Ok(unauthorized(why, &state.metrics.admin));
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return Ok(text(StatusCode::METHOD_NOT_ALLOWED, "GET only\n".into()));
    }
    Ok(match req.uri().path() {
        "/metrics" => {
            let mut r = text(StatusCode::OK, state.metrics.render());
            r.headers_mut()
                .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"));
            r
        }
        "/healthz" => text(StatusCode::OK, "ok\n".into()),
        "/readyz" if state.ready.load(Ordering::Relaxed) => text(StatusCode::OK, "ready\n".into()),
        "/readyz" => text(StatusCode::SERVICE_UNAVAILABLE, "not ready: starting or draining\n".into()),
        _ => text(StatusCode::NOT_FOUND, "not found: try /metrics, /healthz or /readyz\n".into()),
    })
}

/// 401 with the Bearer challenge (RFC 6750 §3: `invalid_token` when one came and was wrong).
fn unauthorized(why: Unauthorized, metrics: &AdminMetrics) -> Response<Full<Bytes>> {
    let (body, challenge) = match why {
        Unauthorized::Missing => {
            metrics.missing_token.increment(1);
            ("unauthorized: a bearer token is required (Authorization: Bearer <token>)\n", CHALLENGE)
        }
        Unauthorized::Invalid => {
            metrics.invalid_token.increment(1);
            ("unauthorized: the bearer token is not valid\n", CHALLENGE_INVALID)
        }
    };
    let mut r = text(StatusCode::UNAUTHORIZED, body.into());
    r.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static(challenge));
    r
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(auth: Option<&str>) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Some(a) = auth {
            h.insert(header::AUTHORIZATION, HeaderValue::from_str(a).unwrap());
        }
        h
    }

    fn hash_of(token: &str) -> TokenHash {
        let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, token.as_bytes());
        TokenHash { name: None, sha256: d.as_ref().try_into().unwrap() }
    }

    /// The token's hash must be one of the configured ones; the scheme is case-insensitive;
    /// open paths need none; without hashes or a file nothing is asked.
    #[test]
    fn bearer_tokens_are_checked_against_their_hashes() {
        let access = Access {
            tls: None,
            required: true,
            hashes: vec![hash_of("other"), hash_of("s3cret")],
            open: vec!["/healthz".into()],
        };
        assert!(access.check("/metrics", &headers(Some("Bearer s3cret"))).is_none());
        assert!(access.check("/metrics", &headers(Some("bEaReR   s3cret "))).is_none());
        assert!(matches!(access.check("/metrics", &headers(Some("Bearer s3cre"))), Some(Unauthorized::Invalid)));
        assert!(matches!(access.check("/metrics", &headers(Some("Basic s3cret"))), Some(Unauthorized::Missing)));
        assert!(matches!(access.check("/metrics", &headers(Some("Bearer "))), Some(Unauthorized::Missing)));
        assert!(matches!(access.check("/metrics", &headers(None)), Some(Unauthorized::Missing)));
        assert!(matches!(access.check("/readyz", &headers(None)), Some(Unauthorized::Missing)));
        assert!(access.check("/healthz", &headers(None)).is_none());
        assert!(Access::default().check("/metrics", &headers(None)).is_none());
        assert!(!format!("{access:?}").contains("s3cret"));
    }

    /// A tokens file: comments and blank lines skipped; a bad line named by number, not quoted;
    /// an empty file still asks for a token (and accepts none).
    #[test]
    fn tokens_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens");
        let good = format!("sha256:{}", "0f".repeat(32));
        std::fs::write(&path, format!("# ops\n\n{good}\n")).unwrap();
        assert_eq!(read_tokens_file(&path).unwrap(), vec![TokenHash { name: None, sha256: [0x0f; 32] }]);
        std::fs::write(&path, format!("{good}\nhunter2\n")).unwrap();
        let e = read_tokens_file(&path).unwrap_err().to_string();
        assert!(e.starts_with("admin.tokens_file: ") && e.contains("tokens: line 2: expected [name=]sha256:"), "{e}");
        assert!(!e.contains("hunter2"), "{e}");
        std::fs::write(&path, "").unwrap();
        let config = AdminAccess { tokens_file: Some(path), ..AdminAccess::default() };
        let access = Access::load(&config).unwrap();
        assert!(matches!(access.check("/metrics", &headers(Some("Bearer x"))), Some(Unauthorized::Invalid)));
    }
}
