//! wss handshake figures that mean something: full handshakes and resumed ones, counted apart.
//!
//! A client that shares one rustls connector resumes by default (its session store keeps the
//! server's tickets), so a "handshakes per second" figure driven that way is mostly resumed
//! handshakes, and says nothing about what a fleet of browsers arriving for the first time, or
//! after a reload lost the server's session cache, costs. Here a full handshake is driven by a
//! client whose resumption is disabled, and a resumed one by a client whose session store was
//! primed first; every handshake's kind is read back from rustls (`handshake_kind`), and a
//! resumed figure in which any handshake was not resumed is reported as failed rather than
//! quietly mixing the two.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use rustls::HandshakeKind;
use rustls::client::Resumption;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;

use crate::client::*;
use crate::targets::*;

/// Which handshakes a figure drives.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Handshake {
    /// Client resumption disabled: every handshake is a full one.
    Full,
    /// The client's session store is primed first, so every handshake should resume.
    Resumed,
}

/// Concurrent clients in the wall-clock windows.
const CLIENTS: usize = 8;

/// A TLS client for `kind` handshakes, trusting `ca`. A resuming client keeps its own session
/// store (rustls's default: 256 server names, up to 8 TLS 1.3 tickets each), which
/// [`prime`] fills.
pub(crate) fn connector(ca: &CertificateDer<'static>, kind: Handshake) -> tokio_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.clone()).unwrap();
    let mut cfg = rustls::ClientConfig::builder_with_provider(wsgate::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    if kind == Handshake::Full {
        cfg.resumption = Resumption::disabled();
    }
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
}

/// One wss session opened and closed: [`open`] then [`close`], so that in lockstep the next
/// handshake starts only once the relay is done with this one. Returns the TLS handshake's kind
/// as the client saw it.
pub(crate) async fn once(t: &Endpoint, tls: &tokio_rustls::TlsConnector) -> Option<HandshakeKind> {
    let (ws, kind) = open(t, tls).await;
    close(ws).await;
    kind
}

/// An open wss session, as the client holds it.
pub(crate) type Session = tokio_tungstenite::WebSocketStream<Box<dyn Io>>;

/// Opens a wss session: TCP, TLS, and the WebSocket upgrade (the relay dials its backend before
/// it answers). Returns it with the TLS handshake's kind as the client saw it.
pub(crate) async fn open(t: &Endpoint, tls: &tokio_rustls::TlsConnector) -> (Session, Option<HandshakeKind>) {
    let tcp = TcpStream::connect(t.addr).await.expect("connect");
    let _ = tcp.set_nodelay(true);
    let name = ServerName::try_from(t.host.clone()).expect("a TLS server name");
    let stream = tls.connect(name, tcp).await.expect("tls");
    let kind = stream.get_ref().1.handshake_kind();
    let io: Box<dyn Io> = Box::new(stream);
    let (ws, _) =
        tokio_tungstenite::client_async_with_config(t.url(), io, Some(client_ws_config())).await.expect("ws handshake");
    (ws, kind)
}

/// Closes a session: a Close, and the wait until the relay has closed its side.
pub(crate) async fn close(mut ws: Session) {
    let _ = ws.close(None).await;
    // The bare bridge drops the connection on a Close without answering it: an error ends the
    // wait as well as the relay's Close does.
    while let Some(Ok(_)) = ws.next().await {}
}

/// Fills a resuming client's session store: a few sequential handshakes, each leaving the
/// server's tickets behind (every resumed handshake then consumes one and receives new ones).
pub(crate) async fn prime(t: &Endpoint, tls: &tokio_rustls::TlsConnector) {
    for _ in 0..CLIENTS {
        once(t, tls).await;
    }
}

/// A wall-clock window: handshakes completed per second, and how many were not of the kind
/// asked for.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Window {
    pub(crate) per_sec: f64,
    pub(crate) wrong_kind: u64,
}

/// Completed wss handshakes per second with [`CLIENTS`] concurrent clients for `duration`.
pub(crate) async fn window(t: &Endpoint, ca: &CertificateDer<'static>, kind: Handshake, duration: Duration) -> Window {
    let tls = connector(ca, kind);
    if kind == Handshake::Resumed {
        prime(t, &tls).await;
    }
    let (done, wrong) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let t0 = Instant::now();
    let deadline = t0 + duration;
    let mut tasks = Vec::new();
    for _ in 0..CLIENTS {
        let (done, wrong, tls, t) = (done.clone(), wrong.clone(), tls.clone(), t.clone());
        tasks.push(tokio::spawn(async move {
            while Instant::now() < deadline {
                if !is(once(&t, &tls).await, kind) {
                    wrong.fetch_add(1, Ordering::Relaxed);
                }
                done.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    Window {
        per_sec: done.load(Ordering::Relaxed) as f64 / t0.elapsed().as_secs_f64(),
        wrong_kind: wrong.load(Ordering::Relaxed),
    }
}

/// Whether rustls's account of a handshake is the kind a figure asked for.
pub(crate) fn is(seen: Option<HandshakeKind>, kind: Handshake) -> bool {
    match kind {
        Handshake::Full => matches!(seen, Some(HandshakeKind::Full | HandshakeKind::FullWithHelloRetryRequest)),
        Handshake::Resumed => seen == Some(HandshakeKind::Resumed),
    }
}

/// Resumption across a reload: a fresh wsgate-wss, a client primed against it, SIGHUP, wsgate's
/// own "config reloaded" line, then `count` handshakes by the primed client. Returns a line for
/// the report: how many resumed by the client's account and by wsgate's
/// `wsgate_tls_handshakes_total{kind="resumed"}`.
pub(crate) async fn resumed_after_reload(setup: &Setup, limits: &str, count: usize) -> String {
    let gw = Gateway::start_wss(setup, limits);
    let tls = connector(&setup.ca_der, Handshake::Resumed);
    prime(&gw.at, &tls).await;
    let status = std::process::Command::new("kill").args(["-HUP", &gw.process.id().to_string()]).status();
    assert!(status.is_ok_and(|s| s.success()), "kill -HUP wsgate");
    let reloaded = tokio::task::block_in_place(|| {
        let until = Instant::now() + Duration::from_secs(10);
        while let Some(left) = until.checked_duration_since(Instant::now()) {
            match gw.log.recv_timeout(left) {
                Ok(line) if line.contains("config reloaded") => return true,
                Ok(line) if line.contains("reload rejected") => return false,
                Ok(_) => {}
                Err(_) => return false,
            }
        }
        false
    });
    if !reloaded {
        return "wsgate-wss resumed after SIGHUP: FAILED, wsgate did not log \"config reloaded\" within 10 s".into();
    }
    let resumed_metric = || gw.metric_sum("wsgate_tls_handshakes_total", r#"kind="resumed""#);
    let before = tokio::task::block_in_place(resumed_metric);
    let mut resumed = 0;
    for _ in 0..count {
        resumed += usize::from(is(once(&gw.at, &tls).await, Handshake::Resumed));
    }
    let counted = tokio::task::block_in_place(resumed_metric) - before;
    format!(
        "wsgate-wss resumed after SIGHUP (client primed before the reload): {resumed} of {count} handshakes resumed \
         (wsgate_tls_handshakes_total{{kind=\"resumed\"}} +{counted:.0}){}",
        if resumed == count { "" } else { ": FAILED" }
    )
}
