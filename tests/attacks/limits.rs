//! Admission under attack: slow and flooding clients, a dead backend, per-client and per-route
//! caps. Each attack runs from its own loopback addresses (127.0.0.0/8) while a normal client on
//! 127.0.0.1 must complete 20 of 20 sessions, byte for byte, on ws and wss.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures_util::SinkExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinSet;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

use crate::support::*;

use crate::{ONE_ATTACK_AT_A_TIME, black_hole, sources};

/// The normal client's address; attackers use others.
const NORMAL: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1));

/// Attack clients: each opens a connection and writes the start of a request (or of a TLS
/// record) one byte per second, never finishing it; with `reconnect`, it opens a new one as soon
/// as the gateway closes or answers the old one.
struct Attack {
    stop: CancellationToken,
    connects: Arc<AtomicUsize>,
    tasks: JoinSet<()>,
}

impl Attack {
    fn start(target: SocketAddr, sources: &[IpAddr], count: usize, reconnect: bool, tls: bool) -> Attack {
        let (stop, connects) = (CancellationToken::new(), Arc::new(AtomicUsize::new(0)));
        let mut tasks = JoinSet::new();
        for i in 0..count {
            let (src, stop, connects) = (sources[i % sources.len()], stop.clone(), connects.clone());
            tasks.spawn(async move {
                loop {
                    if let Ok(s) = connect_from(src, target).await {
                        connects.fetch_add(1, Ordering::Relaxed);
                        trickle(s, tls, &stop).await;
                    }
                    if !reconnect || stop.is_cancelled() {
                        break;
                    }
                }
                stop.cancelled().await;
            });
        }
        Attack { stop, connects, tasks }
    }

    fn connects(&self) -> usize {
        self.connects.load(Ordering::Relaxed)
    }

    async fn stop(mut self) {
        self.stop.cancel();
        within("attack stops", async { while self.tasks.join_next().await.is_some() {} }).await;
    }
}

/// Slowloris: a byte per second until the gateway closes or answers, or `stop`.
async fn trickle(mut s: TcpStream, tls: bool, stop: &CancellationToken) {
    // A TLS handshake record announcing 512 bytes, or a request head that never ends.
    let bytes: &[u8] = if tls { &[0x16, 0x03, 0x01, 0x02, 0x00, 0x01] } else { b"GET /echo HTTP/1.1\r\nX-A: " };
    let mut sent = 0;
    let mut buf = [0u8; 512];
    loop {
        let byte = [*bytes.get(sent).unwrap_or(&b'a')];
        if s.write_all(&byte).await.is_err() {
            return;
        }
        sent += 1;
        tokio::select! {
            _ = stop.cancelled() => return,
            // Closed, reset or answered (a 429): this connection is done.
            _ = s.read(&mut buf) => return,
            // The attack's own pace, not a wait for the gateway.
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

/// Sessions the normal client completes out of `n`, one after another: each opens, echoes 4 KiB
/// and gets every byte back, and closes.
async fn normal_sessions(gw: &Gateway, path: &str, secure: bool, n: usize) -> usize {
    let mut completed = 0;
    for i in 0..n {
        let one = async {
            let mut ws = gw.session_from(NORMAL, path, secure).await?;
            let data = payload(4096, i as u64);
            ws.send(Message::Binary(data.clone().into())).await.map_err(|e| e.to_string())?;
            if read_bytes(&mut ws, data.len()).await != data {
                return Err("echo differs".to_string());
            }
            ws.close(None).await.map_err(|e| e.to_string())
        };
        match tokio::time::timeout(Duration::from_secs(10), one).await {
            Ok(Ok(())) => completed += 1,
            Ok(Err(e)) => eprintln!("normal session {i}: {e}"),
            Err(_) => eprintln!("normal session {i}: no echo within 10 s"),
        }
    }
    completed
}

async fn echo_gateway() -> Gateway {
    Gateway::builder().route("echo", "/echo", "builtin:echo").shipped_client_limits().tls().start().await
}

fn target(gw: &Gateway, secure: bool) -> SocketAddr {
    if secure { gw.secure.unwrap() } else { gw.plain }
}

fn listener(secure: bool) -> &'static str {
    if secure { "secure" } else { "plain" }
}

/// 2,000 slowloris connections from one address, with the shipped defaults: the address keeps
/// 256 sockets (`per_client.max_connections`), of which 32 (its share) have places in the
/// handshake pool and the rest wait, passed over for every other client, until their deadline;
/// the others are closed at accept. A client on another address is not affected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_from_one_address_leaves_others_served() {
    let _one = ONE_ATTACK_AT_A_TIME.lock().await;
    let gw = echo_gateway().await;
    for secure in [false, true] {
        let attack = Attack::start(target(&gw, secure), &[[127, 0, 0, 2].into()], 2000, false, secure);
        let refused = [("listener", listener(secure)), ("reason", "client_connection_limit")];
        eventually("all but 256 of the 2,000 closed at accept", || async {
            scrape(&gw, "wsgate_connections_refused_total", &refused).await >= 1744.0
        })
        .await;
        eventually("the rest wait beyond the address's share", || async {
            scrape(&gw, "wsgate_handshakes_waiting", &[]).await == 224.0
        })
        .await;
        assert_eq!(scrape(&gw, "wsgate_handshakes_in_progress", &[]).await, 32.0, "the address's share");
        assert_eq!(normal_sessions(&gw, "/echo", secure, 20).await, 20, "secure: {secure}");
        attack.stop().await;
    }
}

/// 300 connections from one address that reconnect as soon as they are cut: the 44 over the
/// address's cap spin on accept; its handshake share keeps it to 32 places in the pool.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnecting_slowloris_from_one_address_leaves_others_served() {
    let _one = ONE_ATTACK_AT_A_TIME.lock().await;
    let gw = echo_gateway().await;
    for secure in [false, true] {
        let attack = Attack::start(target(&gw, secure), &[[127, 0, 0, 3].into()], 300, true, secure);
        eventually("the attack reconnects", || async { attack.connects() >= 1000 }).await;
        let before = attack.connects();
        assert_eq!(normal_sessions(&gw, "/echo", secure, 20).await, 20, "secure: {secure}");
        assert!(attack.connects() > before, "the attack kept reconnecting meanwhile");
        attack.stop().await;
    }
}

/// 2,000 slowloris connections spread over 500 addresses, 4 each (under every per-client cap),
/// reconnecting as soon as they are cut: they fill the handshake pool and keep it full, and the
/// rest wait; the pool sheds places held past `handshake_shed_after_secs` for the newest
/// waiters, so a real client, newer than the attack's waiting sockets, gets through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_from_many_addresses_leaves_others_served() {
    let _one = ONE_ATTACK_AT_A_TIME.lock().await;
    let gw = echo_gateway().await;
    let addrs = sources(10, 500);
    for secure in [false, true] {
        let attack = Attack::start(target(&gw, secure), &addrs, 2000, true, secure);
        let shed = [("listener", listener(secure)), ("reason", "handshake_shed")];
        eventually("the pool is full and shedding", || async {
            scrape(&gw, "wsgate_connections_refused_total", &shed).await >= 500.0
        })
        .await;
        let before = scrape(&gw, "wsgate_connections_refused_total", &shed).await;
        assert_eq!(normal_sessions(&gw, "/echo", secure, 20).await, 20, "secure: {secure}");
        assert!(scrape(&gw, "wsgate_connections_refused_total", &shed).await > before, "still attacking");
        assert_eq!(scrape(&gw, "wsgate_handshakes_in_progress", &[]).await, 256.0, "the pool stayed full");
        assert!(scrape(&gw, "wsgate_handshakes_waiting", &[]).await > 0.0, "the attack's sockets waited");
        assert!(attack.connects() > 2000, "the attack kept reconnecting");
        attack.stop().await;
    }
}

/// A reconnect storm, scaled to a test: 300 wss clients from 3 addresses (100 each, three times
/// the per-client handshake share) connect at once to a gateway whose handshake pool has 8 places
/// and whose route dials at most 4 backends at once. Every client waits its turn and is served,
/// byte for byte; nothing is refused, shed, or closed with 1013.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnect_storm_is_served_in_full() {
    let _one = ONE_ATTACK_AT_A_TIME.lock().await;
    let echo = Backend::echo().await;
    let gw = Gateway::builder()
        .route("tcp", "/tcp", &echo.target())
        .shipped_client_limits()
        .limit("max_handshakes", "8")
        .limit("max_pending_connects", "4")
        .tls()
        .start()
        .await;
    let gw = Arc::new(gw);
    let go = Arc::new(tokio::sync::Barrier::new(300));
    let mut clients = JoinSet::new();
    for i in 0..300u64 {
        let (gw, go, src) = (gw.clone(), go.clone(), sources(60, 3)[i as usize % 3]);
        clients.spawn(async move {
            go.wait().await;
            let mut ws = gw.session_from(src, "/tcp", true).await?;
            let data = payload(1024, i);
            ws.send(Message::Binary(data.clone().into())).await.map_err(|e| e.to_string())?;
            if read_bytes(&mut ws, data.len()).await != data {
                return Err(format!("client {i}: echo differs"));
            }
            ws.close(None).await.map_err(|e| e.to_string())
        });
    }
    let mut failures = Vec::new();
    within("the storm is served", async {
        while let Some(done) = clients.join_next().await {
            if let Err(e) = done.unwrap() {
                failures.push(e);
            }
        }
    })
    .await;
    assert!(failures.is_empty(), "{} of 300 failed: {:?}", failures.len(), &failures[..failures.len().min(5)]);
    assert_eq!(scrape(&gw, "wsgate_connections_refused_total", &[]).await, 0.0, "nothing refused");
    assert_eq!(scrape(&gw, "wsgate_sessions_shed_total", &[]).await, 0.0, "nothing shed");
    assert_eq!(scrape(&gw, "wsgate_handshakes_waiting", &[]).await, 0.0);
}

/// A connection that waits for a place waits no longer than its handshake deadline: closed
/// without an answer, and counted. (The place is held by a connection accepted under a longer
/// deadline, then the deadline is shortened by a reload, so the holder outlasts the waiter.)
#[tokio::test]
async fn a_connection_waits_no_longer_than_its_handshake_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let builder = |timeout: &str| {
        Gateway::builder()
            .route("echo", "/echo", "builtin:echo")
            .limit("max_handshakes", "1")
            .limit("handshake_shed_after_secs", "3600")
            .limit("handshake_timeout_secs", timeout)
            .limit("request_head_timeout_secs", timeout)
            .toml()
    };
    let config = dir.path().join("wsgate.toml");
    std::fs::write(&config, builder("3600")).unwrap();
    let gw = Gateway::from_file(&config).await;
    let _holder = connect_from([127, 0, 0, 31].into(), gw.plain).await.unwrap();
    eventually("the place is held", || async { scrape(&gw, "wsgate_handshakes_in_progress", &[]).await == 1.0 }).await;
    std::fs::write(&config, builder("1")).unwrap();
    gw.reloader.reload_file(&config).unwrap();
    let mut waiting = connect_from([127, 0, 0, 32].into(), gw.plain).await.unwrap();
    waiting.write_all(upgrade_request("/echo", "").as_bytes()).await.unwrap();
    eventually("it waits", || async { scrape(&gw, "wsgate_handshakes_waiting", &[]).await == 1.0 }).await;
    let mut answer = Vec::new();
    // Closed with the request unread, so the kernel may reset rather than end the stream.
    let end = within("closed at its deadline", waiting.read_to_end(&mut answer)).await;
    assert!(end.as_ref().map_or_else(|e| e.kind() == std::io::ErrorKind::ConnectionReset, |_| true), "{end:?}");
    assert!(answer.is_empty(), "no answer: {}", String::from_utf8_lossy(&answer));
    let timed_out = [("listener", "plain"), ("reason", "handshake_wait_timeout")];
    assert_eq!(scrape(&gw, "wsgate_connections_refused_total", &timed_out).await, 1.0);
    assert_eq!(scrape(&gw, "wsgate_handshakes_waiting", &[]).await, 0.0);
    assert_eq!(scrape(&gw, "wsgate_handshakes_in_progress", &[]).await, 1.0, "the holder still holds");
}

/// 300 clients asking again and again for a route whose backend never answers: the dials are
/// bounded by the route's `max_pending_connects` and hold no place in the handshake pool, so a
/// healthy route serves 20 of 20.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_backend_does_not_starve_other_routes() {
    let _one = ONE_ATTACK_AT_A_TIME.lock().await;
    let (_hole, dead) = black_hole();
    // Fill the backlog, so every later connect hangs.
    let _queued: Vec<_> = futures_util::future::join_all((0..2).map(|_| TcpStream::connect(dead))).await;
    let echo = Backend::echo().await;
    let gw = Gateway::builder()
        .route("dead", "/dead", &dead.to_string())
        .route("tcp", "/tcp", &echo.target())
        .shipped_client_limits()
        .tls()
        .start()
        .await;
    let stop = CancellationToken::new();
    let mut clients = JoinSet::new();
    let request = upgrade_request("/dead", "");
    for src in sources(40, 300) {
        let (stop, addr, request) = (stop.clone(), gw.plain, request.clone());
        clients.spawn(async move {
            while !stop.is_cancelled() {
                let Ok(s) = connect_from(src, addr).await else { continue };
                tokio::select! {
                    _ = stop.cancelled() => {}
                    _ = raw_http_on(s, &request) => {}
                }
            }
        });
    }
    let pending = [("route", "dead"), ("reason", "max_pending_connects")];
    eventually("128 connects pending, the rest shed", || async {
        scrape(&gw, "wsgate_sessions_shed_total", &pending).await > 0.0
    })
    .await;
    for secure in [false, true] {
        assert_eq!(normal_sessions(&gw, "/tcp", secure, 20).await, 20, "secure: {secure}");
    }
    stop.cancel();
    within("clients stop", async { while clients.join_next().await.is_some() {} }).await;
}

/// The N+1st connection from one address is closed at accept, before anything is read, while
/// another address still connects; the slot comes back when a connection ends.
#[tokio::test]
async fn per_client_connection_cap_closes_at_accept() {
    let gw = Gateway::builder()
        .route("echo", "/echo", "builtin:echo")
        .limit("per_client.max_connections", "3")
        .start()
        .await;
    let capped: IpAddr = [127, 0, 0, 21].into();
    let mut open = Vec::new();
    for _ in 0..3 {
        open.push(gw.session_from(capped, "/echo", false).await.unwrap());
    }
    let mut fourth = connect_from(capped, gw.plain).await.unwrap();
    let mut answer = Vec::new();
    within("closed at accept", fourth.read_to_end(&mut answer)).await.unwrap();
    assert!(answer.is_empty(), "no answer at the per-client cap: {answer:?}");
    let refused = [("listener", "plain"), ("reason", "client_connection_limit")];
    assert_eq!(scrape(&gw, "wsgate_connections_refused_total", &refused).await, 1.0);
    // Another address is not affected.
    let mut other = gw.session_from([127, 0, 0, 22].into(), "/echo", false).await.unwrap();
    send_binary(&mut other, b"other").await;
    assert_eq!(read_bytes(&mut other, 5).await, b"other");
    // The address gets its slot back once one of its sessions has ended.
    let mut first = open.remove(0);
    first.close(None).await.unwrap();
    expect_end(&mut first).await;
    eventually("a slot comes back", || async { gw.session_from(capped, "/echo", false).await.is_ok() }).await;
}

/// Over its rate a client gets 429 with the time until its next token, after its request was
/// read, and counted; over its handshake share, a connection waits for one of its client's
/// places while other clients get theirs.
#[tokio::test]
async fn per_client_rate_answers_429_and_handshake_share_waits() {
    let gw = Gateway::builder()
        .route("echo", "/echo", "builtin:echo")
        .limit("per_client.new_connections_per_sec", "0.1")
        .limit("per_client.new_connections_burst", "2")
        .limit("per_client.max_handshakes", "0")
        .start()
        .await;
    let fast: IpAddr = [127, 0, 0, 23].into();
    for _ in 0..2 {
        let s = connect_from(fast, gw.plain).await.unwrap();
        assert_eq!(raw_http_on(s, &upgrade_request("/echo", "")).await.0, 101);
    }
    let s = connect_from(fast, gw.plain).await.unwrap();
    let (status, head, body) = raw_http_on(s, &upgrade_request("/echo", "")).await;
    assert_eq!(status, 429, "{head}");
    // 0.1 tokens per second: the next one is 10 s away (a little less by now).
    let retry: u64 = head.lines().find_map(|l| l.strip_prefix("retry-after: ")).expect(&head).parse().unwrap();
    assert!((9..=10).contains(&retry), "{head}");
    assert_eq!(body, "too many new connections from this address\n");
    let rate = [("listener", "plain"), ("reason", "client_rate_limit")];
    assert_eq!(scrape(&gw, "wsgate_connections_refused_total", &rate).await, 1.0);
    assert_eq!(scrape(&gw, "wsgate_handshakes_total", &[("route", ""), ("status", "429")]).await, 1.0);

    let gw =
        Gateway::builder().route("echo", "/echo", "builtin:echo").limit("per_client.max_handshakes", "2").start().await;
    let slow: IpAddr = [127, 0, 0, 24].into();
    // Two connections that send nothing hold the address's two places in the pool.
    let mut held = vec![connect_from(slow, gw.plain).await.unwrap(), connect_from(slow, gw.plain).await.unwrap()];
    eventually("both in the pool", || async { scrape(&gw, "wsgate_handshakes_in_progress", &[]).await == 2.0 }).await;
    let third = connect_from(slow, gw.plain).await.unwrap();
    let third = tokio::spawn(async move { raw_http_on(third, &upgrade_request("/echo", "")).await });
    eventually("the third waits", || async { scrape(&gw, "wsgate_handshakes_waiting", &[]).await == 1.0 }).await;
    // Another address still gets in, past the waiting one.
    assert!(gw.session_from([127, 0, 0, 25].into(), "/echo", false).await.is_ok());
    assert_eq!(scrape(&gw, "wsgate_handshakes_waiting", &[]).await, 1.0);
    // One of the address's places given up: the waiting connection gets it and is served.
    drop(held.pop());
    let (status, head, _) = within("the third is served", third).await.unwrap();
    assert_eq!(status, 101, "{head}");
    assert_eq!(scrape(&gw, "wsgate_handshakes_waiting", &[]).await, 0.0);
    let refused = scrape(&gw, "wsgate_connections_refused_total", &[("listener", "plain")]).await;
    assert_eq!(refused, 0.0, "nothing refused");
}

/// At a route's session cap: "close" upgrades and closes with 1013 naming the cap; "http"
/// answers 503 with `Retry-After`; the backend is not dialled; other routes are not affected.
#[tokio::test]
async fn route_session_cap_sheds_per_on_backend_unavailable() {
    let echo = Backend::echo().await;
    let capped = "limits = { max_sessions = 1 }";
    let gw = Gateway::builder()
        .route_with("close", "/close", &echo.target(), capped)
        .route_with("http", "/http", &echo.target(), &format!("{capped}\non_backend_unavailable = \"http\""))
        .route("free", "/free", &echo.target())
        .start()
        .await;
    let mut first = gw.ws("/close").await;
    let _first_http = gw.ws("/http").await;
    let dialled = echo.accepted();
    let mut second = gw.ws("/close").await;
    let (_, code, reason) = read_until_close(&mut second).await;
    assert_eq!((code, reason.as_str()), (1013, "route is at its session limit (1); try again later"));
    let (status, head, body) = raw_http(gw.plain, &upgrade_request("/http", "")).await;
    assert_eq!(status, 503, "{head}");
    assert!(head.to_ascii_lowercase().contains("\r\nretry-after: 5\r\n"), "{head}");
    assert_eq!(body, "route is at its session limit (1); try again later\n");
    assert_eq!(echo.accepted(), dialled, "a shed session dials nothing");
    for route in ["close", "http"] {
        let labels = [("route", route), ("reason", "max_sessions")];
        assert_eq!(scrape(&gw, "wsgate_sessions_shed_total", &labels).await, 1.0);
    }
    drop(second);
    let closed = [("route", "close"), ("code", "1013"), ("closed_by", "gateway")];
    eventually("the shed session is counted once its close is settled", || async {
        scrape(&gw, "wsgate_sessions_total", &closed).await == 1.0
    })
    .await;
    let mut free = gw.ws("/free").await;
    send_binary(&mut free, b"free").await;
    assert_eq!(read_bytes(&mut free, 4).await, b"free");
    // The place comes back when the session ends.
    first.close(None).await.unwrap();
    expect_end(&mut first).await;
    eventually("the route has room again", || async {
        let mut ws = gw.ws("/close").await;
        send_binary(&mut ws, b"again").await;
        matches!(tokio::time::timeout(WAIT, read_until_close_or_data(&mut ws)).await, Ok(true))
    })
    .await;
}

/// Whether the next message on `ws` is data (the session is open), not a close.
async fn read_until_close_or_data(ws: &mut Ws) -> bool {
    use futures_util::StreamExt;
    matches!(ws.next().await, Some(Ok(Message::Binary(_) | Message::Text(_))))
}

/// Above the memory budget, new sessions are shed (1013 / 503) before the backend is dialled;
/// open sessions carry on.
#[tokio::test]
async fn memory_budget_sheds_new_sessions() {
    let echo = Backend::echo().await;
    let gw = Gateway::builder()
        .route("close", "/close", &echo.target())
        .route_with("http", "/http", &echo.target(), "on_backend_unavailable = \"http\"")
        .limit("max_memory_bytes", &(16 << 20).to_string())
        .start()
        .await;
    // The test process (the gateway's too) is made to hold more than the 16 MiB budget.
    let ballast = vec![1u8; 32 << 20];
    let mut ws = gw.ws("/close").await;
    let (_, code, reason) = read_until_close(&mut ws).await;
    assert_eq!((code, reason.as_str()), (1013, "gateway is at its memory limit; try again later"));
    let (status, head, _) = raw_http(gw.plain, &upgrade_request("/http", "")).await;
    assert_eq!(status, 503, "{head}");
    assert!(head.to_ascii_lowercase().contains("\r\nretry-after: 5\r\n"), "{head}");
    assert_eq!(echo.accepted(), 0, "nothing was dialled");
    assert_eq!(scrape(&gw, "wsgate_sessions_shed_total", &[("reason", "memory")]).await, 2.0);
    assert_eq!(ballast.iter().map(|b| *b as usize).sum::<usize>(), 32 << 20);
}

/// `limits.listen_backlog` reaches the listening socket: `ss` reports a listener's backlog as
/// its Send-Q (iproute2, which `scripts/test` installs).
#[tokio::test]
async fn listen_backlog_is_applied() {
    let gw = Gateway::builder().route("echo", "/echo", "builtin:echo").limit("listen_backlog", "7").start().await;
    let out = std::process::Command::new("ss")
        .args(["-ltnH", &format!("sport = :{}", gw.plain.port())])
        .output()
        .expect("ss (iproute2)");
    let text = String::from_utf8_lossy(&out.stdout);
    let backlog: u32 =
        text.split_whitespace().nth(2).unwrap_or_else(|| panic!("no listener in {text:?}")).parse().unwrap();
    assert_eq!(backlog, 7, "{text}");
}
