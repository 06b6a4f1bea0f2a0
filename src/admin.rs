//! The admin listener: `GET /metrics` (Prometheus text), `/healthz` (the process is alive) and
//! `/readyz` (200 only while the gateway accepts connections; 503 before its listeners are
//! bound and while it drains, so a load balancer stops sending new clients first).
//!
//! It listens on its own address (default 127.0.0.1:9090), away from the public listeners, and
//! stays up through the drain so the 503 can be seen. Its connections are few and bounded.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::debug;

use crate::metrics::Metrics;
use crate::server;

/// Scrapers and probes need few connections; past this, new ones are closed.
const MAX_ADMIN_CONNECTIONS: usize = 64;

/// What the admin endpoints report on.
#[derive(Debug, Clone)]
pub(crate) struct State {
    pub metrics: Arc<Metrics>,
    /// True while the gateway accepts connections.
    pub ready: Arc<AtomicBool>,
}

/// Serves the admin endpoints on `listener` until `stop` is cancelled.
pub(crate) async fn serve(listener: TcpListener, state: State, stop: CancellationToken, tasks: TaskTracker) {
    let slots = Arc::new(Semaphore::new(MAX_ADMIN_CONNECTIONS));
    while let Some((tcp, _, slot)) = server::accept_bounded(&listener, &slots, &stop, "admin").await {
        let (state, stop) = (state.clone(), stop.clone());
        tasks.spawn(async move {
            let service = service_fn(move |req| respond(req, state.clone()));
            let mut builder = http1::Builder::new();
            builder.timer(TokioTimer::new()).header_read_timeout(Duration::from_secs(10));
            let conn = builder.serve_connection(TokioIo::new(tcp), service);
            tokio::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => if let Err(e) = r { debug!(error = %e, "admin connection ended with an error") },
                _ = stop.cancelled() => {}
            }
            drop(slot);
        });
    }
}

async fn respond(req: Request<Incoming>, state: State) -> Result<Response<Full<Bytes>>, Infallible> {
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

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    r
}
