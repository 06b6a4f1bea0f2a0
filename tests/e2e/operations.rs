//! Operations: metrics read over HTTP from `/metrics`, health and readiness, graceful drain,
//! hot reload.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

use crate::support::*;

const BUFFERED: &str = "wsgate_buffered_bytes";

/// A slow consumer: the backend streams 32 MiB as fast as it can while the client does not
/// read. The buffered-bytes gauge for (route, to_client) rises, never exceeds the per-session
/// bound (one backend read, `backend_read_bytes`), and returns to 0 once the client has caught
/// up; every byte arrives, in order.
#[tokio::test]
async fn slow_consumer_shows_bounded_buffered_bytes() {
    const TOTAL: usize = 32 << 20;
    const READ: usize = 4096;
    let backend = Backend::start(|mut s: TcpStream| async move {
        let data = payload(TOTAL, 42);
        s.write_all(&data).await.unwrap();
        // Stay open until the gateway closes: the session must not end before the client has
        // read everything.
        let _ = s.read_to_end(&mut Vec::new()).await;
    })
    .await;
    let gw = Gateway::builder()
        .route("slow", "/slow", &backend.target())
        .limit("backend_read_bytes", &READ.to_string())
        .start()
        .await;
    let labels = [("route", "slow"), ("direction", "to_client")];
    let mut ws = gw.ws("/slow").await;

    // Not reading: kernel buffers fill, then the bridge holds one read it cannot hand over. The
    // socket buffers may still grow for a moment after the first write waits (a wait that then
    // ends), so wait until the relay has stalled: bytes held, and none delivered, over three
    // scrapes in a row.
    eventually("the relay stalls, holding bytes, while the client does not read", || async {
        let delivered = scrape(&gw, "wsgate_bytes_total", &labels).await;
        for _ in 0..3 {
            let held = scrape(&gw, BUFFERED, &labels).await;
            if held == 0.0 || scrape(&gw, "wsgate_bytes_total", &labels).await != delivered {
                return false;
            }
        }
        true
    })
    .await;
    for _ in 0..10 {
        let held = scrape(&gw, BUFFERED, &labels).await;
        assert!(held > 0.0 && held <= READ as f64, "buffered {held} outside (0, {READ}]");
    }

    let got = read_bytes(&mut ws, TOTAL).await;
    assert!(got == payload(TOTAL, 42), "bytes lost, duplicated or reordered");
    eventually("buffered bytes return to 0", || async { scrape(&gw, BUFFERED, &labels).await == 0.0 }).await;
    let (_, body) = admin_get(&gw, "/metrics").await;
    let peaks = metric(&body, "wsgate_session_peak_buffered_bytes_count", &labels);
    assert_eq!(peaks, Some(0.0), "the series exists, and the peak is recorded when the session ends");
}

/// Counters equal what the test did: bytes and messages each way, sessions by close code and
/// the side that closed, handshakes by status, backend connect failures by kind.
#[tokio::test]
async fn counters_match_the_traffic() {
    let echo = Backend::echo().await;
    let dead = RefusingPort::new();
    let gw = Gateway::builder()
        .route("tcp", "/tcp", &echo.target())
        .route("down", "/down", &dead.addr.to_string())
        .start()
        .await;
    let mut sent = 0usize;
    for i in 0..3u64 {
        let mut ws = gw.ws("/tcp").await;
        for j in 0..4 {
            let data = payload(1000 + 10 * j, i * 10 + j as u64);
            send_binary(&mut ws, &data).await;
            assert_eq!(read_bytes(&mut ws, data.len()).await, data);
            sent += data.len();
        }
        within("close", ws.close(Some(CloseFrame { code: CloseCode::Normal, reason: "done".into() }))).await.unwrap();
        expect_end(&mut ws).await;
    }
    let mut ws = gw.ws("/down").await;
    let (_, code, _) = read_until_close(&mut ws).await;
    assert_eq!(code, 1013);
    expect_end(&mut ws).await;
    let (status, _, _) = raw_http(gw.plain, "GET /tcp HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert_eq!(status, 426);

    let sessions = |code: &'static str, by: &'static str, route: &'static str| {
        let gw = &gw;
        async move { scrape(gw, "wsgate_sessions_total", &[("route", route), ("code", code), ("closed_by", by)]).await }
    };
    eventually("all sessions counted", || async { sessions("1000", "client", "tcp").await == 3.0 }).await;
    eventually("the 1013 session counted", || async { sessions("1013", "backend", "down").await == 1.0 }).await;
    let tcp = |dir: &'static str| [("route", "tcp"), ("direction", dir)];
    assert_eq!(scrape(&gw, "wsgate_bytes_total", &tcp("to_backend")).await, sent as f64);
    assert_eq!(scrape(&gw, "wsgate_messages_total", &tcp("to_backend")).await, 12.0);
    assert_eq!(scrape(&gw, "wsgate_bytes_total", &tcp("to_client")).await, sent as f64);
    assert_eq!(scrape(&gw, "wsgate_handshakes_total", &[("route", "tcp"), ("status", "101")]).await, 3.0);
    assert_eq!(scrape(&gw, "wsgate_handshakes_total", &[("route", "tcp"), ("status", "426")]).await, 1.0);
    assert_eq!(scrape(&gw, "wsgate_handshakes_total", &[("route", "down"), ("status", "101")]).await, 1.0);
    assert_eq!(
        scrape(&gw, "wsgate_backend_connect_failures_total", &[("route", "down"), ("kind", "connection refused")])
            .await,
        1.0
    );
    eventually("no session open", || async { scrape(&gw, "wsgate_sessions_open", &[("route", "tcp")]).await == 0.0 })
        .await;
    assert_eq!(scrape(&gw, BUFFERED, &tcp("to_backend")).await, 0.0);
    assert_eq!(scrape(&gw, "wsgate_connections_accepted_total", &[("listener", "plain")]).await, 5.0);
    eventually("three durations recorded", || async {
        scrape(&gw, "wsgate_session_duration_seconds_count", &[("route", "tcp")]).await == 3.0
    })
    .await;
}

/// Two gateways in one process keep separate counts: no global recorder.
#[tokio::test]
async fn each_gateway_has_its_own_metrics() {
    let a = Gateway::builder().route("echo", "/echo", "builtin:echo").start().await;
    let b = Gateway::builder().route("echo", "/echo", "builtin:echo").start().await;
    let mut ws = a.ws("/echo").await;
    send_binary(&mut ws, b"1234").await;
    read_bytes(&mut ws, 4).await;
    let labels = [("route", "echo"), ("direction", "to_client")];
    assert_eq!(scrape(&a, "wsgate_bytes_total", &labels).await, 4.0);
    assert_eq!(scrape(&b, "wsgate_bytes_total", &labels).await, 0.0);
}

/// `/healthz` answers 200; `/readyz` 200 while serving; unknown paths 404.
#[tokio::test]
async fn health_and_readiness() {
    let gw = Gateway::builder().route("echo", "/echo", "builtin:echo").start().await;
    assert_eq!(admin_get(&gw, "/healthz").await.0, 200);
    eventually("ready", || async { admin_get(&gw, "/readyz").await.0 == 200 }).await;
    assert_eq!(admin_get(&gw, "/nope").await.0, 404);
    let (status, body) = admin_get(&gw, "/metrics").await;
    assert_eq!(status, 200);
    assert!(body.contains("# HELP wsgate_buffered_bytes") && body.contains("wsgate_ready 1"), "{body}");
}

/// Drain with 200 sessions streaming both ways: `/readyz` turns 503 at once while new
/// connections are still accepted during the drain delay; then every client gets 1001 after
/// receiving every byte it sent before the drain began, in order; `run` returns well within the
/// deadline.
#[tokio::test]
async fn drain_with_200_streaming_sessions() {
    const SESSIONS: usize = 200;
    let echo = Backend::echo().await;
    let text = Gateway::builder().route("tcp", "/tcp", &echo.target()).toml().replace(
        "drain_delay_secs = 0\nclose_window_secs = 0\ndeadline_secs = 5\n",
        "drain_delay_secs = 2\nclose_window_secs = 1\ndeadline_secs = 10\n",
    );
    assert!(text.contains("drain_delay_secs = 2"));
    let gw = Gateway::from_toml(&text).await;

    let sent_before_drain: Arc<Vec<AtomicU64>> = Arc::new((0..SESSIONS).map(|_| AtomicU64::new(0)).collect());
    let echoed: Arc<Vec<AtomicU64>> = Arc::new((0..SESSIONS).map(|_| AtomicU64::new(0)).collect());
    let draining = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut clients = Vec::new();
    for i in 0..SESSIONS {
        let ws = gw.ws("/tcp").await;
        let (marks, echoed, draining) = (sent_before_drain.clone(), echoed.clone(), draining.clone());
        clients.push(tokio::spawn(async move {
            let (mut tx, mut rx) = ws.split();
            let stream = payload(1 << 20, i as u64);
            let writer = async {
                let mut offset = 0;
                for chunk in stream.chunks(512) {
                    if tx.send(Message::Binary(chunk.to_vec().into())).await.is_err() {
                        break;
                    }
                    offset += chunk.len();
                    if !draining.load(Ordering::SeqCst) {
                        marks[i].store(offset as u64, Ordering::SeqCst);
                    }
                    // Paces the stream (part of the scenario), not a wait for anything to happen.
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                std::future::pending::<()>().await
            };
            let reader = async {
                let mut got = Vec::new();
                loop {
                    match rx.next().await {
                        Some(Ok(Message::Binary(b))) => {
                            got.extend_from_slice(&b);
                            echoed[i].store(got.len() as u64, Ordering::SeqCst);
                        }
                        Some(Ok(Message::Close(Some(f)))) => return (got, u16::from(f.code)),
                        other => panic!("session {i}: expected data or close, got {other:?}"),
                    }
                }
            };
            let (got, code) = tokio::select! { r = reader => r, _ = writer => unreachable!() };
            assert!(got[..] == stream[..got.len()], "session {i}: bytes altered or reordered");
            (got.len(), code)
        }));
    }
    // Every session streams both ways: bytes of each have come back through the backend.
    eventually("every session has its first bytes echoed", || async {
        echoed.iter().all(|n| n.load(Ordering::SeqCst) > 0)
    })
    .await;
    let started = Instant::now();
    draining.store(true, Ordering::SeqCst);
    gw.shutdown.drain();
    eventually("/readyz turns 503", || async { admin_get(&gw, "/readyz").await.0 == 503 }).await;
    assert!(started.elapsed() < Duration::from_millis(1500), "readyz must fail well before the 2 s drain delay ends");
    // Still accepting during the drain delay (load balancers may not have noticed yet).
    let mut late = gw.ws("/tcp").await;
    send_binary(&mut late, b"late").await;
    assert_eq!(read_bytes(&mut late, 4).await, b"late");

    for (i, client) in clients.into_iter().enumerate() {
        let (received, code) = within("session closed", client).await.unwrap();
        assert_eq!(code, 1001, "session {i}");
        let before = sent_before_drain[i].load(Ordering::SeqCst) as usize;
        assert!(received >= before, "session {i}: got {received} bytes back, sent {before} before the drain");
    }
    let (_, code, _) = read_until_close(&mut late).await;
    assert_eq!(code, 1001);
    let mut gw = gw;
    gw.stop().await;
    let took = started.elapsed();
    assert!(took < Duration::from_secs(10), "shutdown took {took:?}, past the 10 s deadline");
    assert!(took >= Duration::from_secs(2), "sessions closed before the drain delay ended ({took:?})");
}

/// Hot reload with sessions streaming: a route change and a certificate change apply to new
/// sessions while an old session continues byte for byte; a broken config and a restart-only
/// change are refused and the running config stays.
#[tokio::test]
async fn reload_applies_to_new_sessions_only() {
    let echo = Backend::echo().await;
    let (ca1, ca2) = (TestCa::new(), TestCa::new());
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    let install = |ca: &TestCa| {
        std::fs::copy(ca.cert_path(), &cert).unwrap();
        std::fs::copy(ca.key_path(), &key).unwrap();
    };
    install(&ca1);
    let config_path = dir.path().join("config.toml");
    let config = |route: &str, plain: &str| {
        format!(
            "[listeners.plain]\naddress = \"{plain}\"\n[listeners.secure]\naddress = \"127.0.0.1:0\"\n\
             tls = {{ cert = \"cert.pem\", key = \"key.pem\" }}\n\
             [routes.r]\npath = \"{route}\"\nbackend = \"{}\"\n[admin]\naddress = \"127.0.0.1:0\"\n\
             [shutdown]\ndrain_delay_secs = 0\nclose_window_secs = 0\ndeadline_secs = 5\n",
            echo.target()
        )
    };
    std::fs::write(&config_path, config("/old", "127.0.0.1:0")).unwrap();
    let gw = Gateway::from_file(&config_path).await;
    let secure = gw.secure.unwrap();

    let mut old = wss_connect(secure, &ca1, "/old").await.expect("old route, old certificate");
    let first = payload(100_000, 1);
    send_binary(&mut old, &first).await;
    assert_eq!(read_bytes(&mut old, first.len()).await, first);

    // Route /old → /new, and a certificate from another CA.
    install(&ca2);
    std::fs::write(&config_path, config("/new", "127.0.0.1:0")).unwrap();
    gw.reloader.reload_file(&config_path).expect("valid reload");
    let mut new = wss_connect(secure, &ca2, "/new").await.expect("new route with the new certificate");
    send_binary(&mut new, b"new").await;
    assert_eq!(read_bytes(&mut new, 3).await, b"new");
    assert!(wss_connect(secure, &ca1, "/new").await.is_err(), "the old certificate must be gone for new connections");
    let (status, _, _) = raw_http(gw.plain, &upgrade_request("/old", "")).await;
    assert_eq!(status, 404, "the old route must be gone for new requests");

    // The session opened before the reload continues untouched.
    let second = payload(200_000, 2);
    send_binary(&mut old, &second).await;
    assert_eq!(read_bytes(&mut old, second.len()).await, second);

    // A broken config is rejected; so is a listener address change; /new keeps working.
    std::fs::write(&config_path, "[listeners.plain]\naddress = \"nope\"\n").unwrap();
    let err = gw.reloader.reload_file(&config_path).unwrap_err().to_string();
    assert!(err.contains("listeners.plain.address"), "{err}");
    std::fs::write(&config_path, config("/new", "127.0.0.1:1")).unwrap();
    let err = gw.reloader.reload_file(&config_path).unwrap_err().to_string();
    assert!(err.contains("listeners.plain.address changed: restart"), "{err}");
    let mut again = wss_connect(secure, &ca2, "/new").await.expect("running config stays");
    send_binary(&mut again, b"still").await;
    assert_eq!(read_bytes(&mut again, 5).await, b"still");
    // The file watcher may have reloaded the same edits too: counted apart, as trigger="watch".
    let signal = |result| [("trigger", "signal"), ("result", result)];
    assert_eq!(scrape(&gw, "wsgate_config_reloads_total", &signal("ok")).await, 1.0);
    assert_eq!(scrape(&gw, "wsgate_config_reloads_total", &signal("error")).await, 2.0);
}

/// `[metrics] enabled = false` records nothing (so the cost of metrics can be measured), while
/// sessions and the admin endpoints work as before.
#[tokio::test]
async fn metrics_can_be_turned_off() {
    let text = Gateway::builder().route("echo", "/echo", "builtin:echo").toml() + "[metrics]\nenabled = false\n";
    let gw = Gateway::from_toml(&text).await;
    let mut ws = gw.ws("/echo").await;
    send_binary(&mut ws, b"1234").await;
    assert_eq!(read_bytes(&mut ws, 4).await, b"1234");
    let (status, body) = admin_get(&gw, "/metrics").await;
    assert_eq!(status, 200);
    assert!(!body.contains("wsgate_bytes_total"), "{body}");
    assert_eq!(admin_get(&gw, "/readyz").await.0, 200);
}
