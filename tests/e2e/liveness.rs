//! Liveness: the gateway's pings and their pong timeout, the idle timeout, the session lifetime,
//! the message-rate cap (on a TCP route and on the built-in echo), and `TCP_USER_TIMEOUT` on a
//! backend whose packets are dropped (in a network namespace of the test's own), and the TCP
//! keepalive client sockets get across reloads.
//!
//! Intervals are shortened through the config; the times asserted are the gateway's own timers,
//! waited out within bounds.

use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

use crate::support::*;

/// The routes every check runs on: through the bridge to a TCP echo, and the built-in echo.
const ROUTES: [(&str, &str); 2] = [("tcp", "/tcp"), ("echo", "/echo")];

/// A gateway with both routes under `limits`, and the TCP echo behind `/tcp`.
async fn gateway(limits: &[(&str, &str)]) -> (Gateway, Backend) {
    let echo = Backend::echo().await;
    let mut builder = Gateway::builder().route("tcp", "/tcp", &echo.target()).route("echo", "/echo", "builtin:echo");
    for (key, value) in limits {
        builder = builder.limit(key, value);
    }
    (builder.start().await, echo)
}

/// Waits, up to `bound`, until `route` has ended a session at `limit`; returns how long it took.
async fn limit_reached(gw: &Gateway, route: &str, limit: &str, bound: Duration) -> Duration {
    let start = Instant::now();
    let labels = [("route", route), ("limit", limit)];
    let reached = tokio::time::timeout(bound, async {
        while scrape(gw, "wsgate_session_limits_total", &labels).await < 1.0 {
            // Spaces the scrapes; the wait ends on the metric itself.
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    })
    .await;
    assert!(reached.is_ok(), "route {route}: no {limit} within {bound:?}");
    start.elapsed()
}

/// The session's counts: its close code by the gateway, and no limit other than `limit`.
async fn assert_counted(gw: &Gateway, route: &str, code: &str, limit: &str) {
    let ended = [("route", route), ("code", code), ("closed_by", "gateway")];
    eventually("the session counted", || async { scrape(gw, "wsgate_sessions_total", &ended).await == 1.0 }).await;
    for other in ["pong_timeout", "idle_timeout", "max_session", "message_rate"] {
        let n = scrape(gw, "wsgate_session_limits_total", &[("route", route), ("limit", other)]).await;
        assert_eq!(n, f64::from(other == limit), "route {route}: limit {other}");
    }
}

/// A client that stops reading and answering is closed with 1011 once a ping has gone
/// unanswered for the pong timeout: a ping 1 s in, its deadline 1 s after it was written.
#[tokio::test]
async fn a_client_that_stops_reading_and_answering_is_closed_by_the_pong_timeout() {
    let (gw, _echo) = gateway(&[("ping_interval_secs", "1"), ("pong_timeout_secs", "1")]).await;
    for (route, path) in ROUTES {
        let mut ws = gw.ws(path).await;
        // From here the client reads nothing, so answers nothing, until the gateway has given up.
        let after = limit_reached(&gw, route, "pong_timeout", Duration::from_secs(10)).await;
        assert!(after >= Duration::from_millis(1950), "route {route}: closed after {after:?}, before the deadline");
        assert!(after < Duration::from_secs(3), "route {route}: closed after {after:?}");
        let (data, code, reason) = read_until_close(&mut ws).await;
        assert!(data.is_empty());
        assert_eq!((code, reason.as_str()), (1011, "no pong within 1 s"), "route {route}");
        expect_end(&mut ws).await;
        assert_counted(&gw, route, "1011", "pong_timeout").await;
    }
}

/// A client that answers every ping (tungstenite does, as it reads) and sends nothing stays open
/// across many intervals, and the session still carries data afterwards.
#[tokio::test]
async fn a_client_that_answers_pings_stays_open_across_many_intervals() {
    let (gw, _echo) = gateway(&[("ping_interval_secs", "0.2"), ("pong_timeout_secs", "0.2")]).await;
    for (route, path) in ROUTES {
        let mut ws = gw.ws(path).await;
        let mut pings = 0;
        let reading = async {
            loop {
                match ws.next().await {
                    Some(Ok(Message::Ping(payload))) if payload.is_empty() => pings += 1,
                    other => panic!("route {route}: expected pings only, got {other:?}"),
                }
            }
        };
        // Fifteen intervals, each ping's deadline as short as the interval.
        let _ = tokio::time::timeout(Duration::from_secs(3), reading).await;
        assert!(pings >= 10, "route {route}: {pings} pings in 3 s at 0.2 s intervals");
        let data = payload(1000, 40);
        send_binary(&mut ws, &data).await;
        assert!(read_bytes(&mut ws, data.len()).await == data, "route {route}: the echo");
        for limit in ["pong_timeout", "idle_timeout", "max_session", "message_rate"] {
            assert_eq!(scrape(&gw, "wsgate_session_limits_total", &[("route", route), ("limit", limit)]).await, 0.0);
        }
    }
}

/// With an idle timeout, a session with no data either way closes with 1000, counted from its
/// last data message: pings and pongs are not data. Closed within a tenth of the timeout late.
#[tokio::test]
async fn an_idle_session_closes_with_1000_when_an_idle_timeout_is_set() {
    let limits = [("idle_timeout_secs", "1"), ("ping_interval_secs", "0.2"), ("pong_timeout_secs", "1")];
    let (gw, _echo) = gateway(&limits).await;
    for (route, path) in ROUTES {
        let mut ws = gw.ws(path).await;
        let opened = Instant::now();
        // Half the timeout with pings and pongs only, then data: the clock starts again.
        let pings_only = async {
            while let Some(Ok(Message::Ping(_))) = ws.next().await {}
            panic!("route {route}: the session ended early");
        };
        let _ = tokio::time::timeout(Duration::from_millis(600), pings_only).await;
        let data = payload(100, 41);
        send_binary(&mut ws, &data).await;
        assert!(read_bytes(&mut ws, data.len()).await == data);
        let last_data = Instant::now();
        let (rest, code, reason) = read_until_close(&mut ws).await;
        let idle = last_data.elapsed();
        assert!(rest.is_empty());
        assert_eq!((code, reason.as_str()), (1000, "idle timeout: no data for 1 s"), "route {route}");
        expect_end(&mut ws).await;
        assert!(idle >= Duration::from_millis(950), "route {route}: closed {idle:?} after the last data");
        assert!(idle < Duration::from_millis(1500), "route {route}: closed {idle:?} after the last data");
        assert!(opened.elapsed() >= Duration::from_millis(1550), "route {route}: data did not reset the clock");
        assert_counted(&gw, route, "1000", "idle_timeout").await;
    }
}

/// With a lifetime limit, a session closes with 1001 when it is reached, busy or not.
#[tokio::test]
async fn a_session_closes_with_1001_at_its_lifetime_limit() {
    let (gw, _echo) = gateway(&[("max_session_secs", "1")]).await;
    for (route, path) in ROUTES {
        let mut ws = gw.ws(path).await;
        let opened = Instant::now();
        // Busy until the end: a message out, its echo back, and again.
        let data = payload(512, 42);
        let (code, reason) = loop {
            send_binary(&mut ws, &data).await;
            match within("the echo or the close", ws.next()).await {
                Some(Ok(Message::Binary(b))) => assert!(b == data, "route {route}: the echo"),
                Some(Ok(Message::Close(Some(f)))) => break (u16::from(f.code), f.reason.to_string()),
                other => panic!("route {route}: expected the echo or the close, got {other:?}"),
            }
        };
        let lived = opened.elapsed();
        assert_eq!((code, reason.as_str()), (1001, "session lifetime limit of 1 s reached"), "route {route}");
        expect_end(&mut ws).await;
        assert!(lived >= Duration::from_millis(950) && lived < Duration::from_secs(2), "route {route}: {lived:?}");
        assert_counted(&gw, route, "1001", "max_session").await;
    }
}

/// A flood of small messages over `max_messages_per_sec` closes with 1008.
#[tokio::test]
async fn a_message_flood_over_the_cap_closes_with_1008() {
    let (gw, _echo) = gateway(&[("max_messages_per_sec", "100")]).await;
    for (route, path) in ROUTES {
        let (mut tx, mut rx) = gw.ws(path).await.split();
        let flood = tokio::spawn(async move {
            let mut sent = 0;
            while sent < 100_000 && tx.send(Message::Binary(vec![7u8; 8].into())).await.is_ok() {
                sent += 1;
            }
            sent
        });
        let (code, reason) = loop {
            match within("the close", rx.next()).await {
                Some(Ok(Message::Binary(_))) => {}
                Some(Ok(Message::Close(Some(f)))) => break (u16::from(f.code), f.reason.to_string()),
                other => panic!("route {route}: expected echoes then the close, got {other:?}"),
            }
        };
        assert_eq!((code, reason.as_str()), (1008, "message rate over 100 per second"), "route {route}");
        drop(rx);
        let sent = within("the flood stops", flood).await.unwrap();
        assert!(sent > 100, "route {route}: only {sent} sent");
        assert_counted(&gw, route, "1008", "message_rate").await;
    }
}

/// A client reading slowly while the backend streams: the gateway's socket to it is full, so its
/// pings wait behind data and its writes wait; it answers each ping when it gets there, far later
/// than the pong timeout after the ping was queued. It is not closed while it keeps draining.
#[tokio::test]
async fn a_slow_reader_whose_socket_is_full_is_not_closed_by_the_pong_timeout() {
    let source = Backend::start(|mut s: TcpStream| async move {
        let chunk = vec![5u8; 64 * 1024];
        while s.write_all(&chunk).await.is_ok() {}
    })
    .await;
    let gw = Gateway::builder()
        .route("source", "/source", &source.target())
        .limit("ping_interval_secs", "0.3")
        .limit("pong_timeout_secs", "0.3")
        .start()
        .await;
    let mut ws = gw.ws("/source").await;
    let (mut pings, mut bytes, mut backed_up) = (0, 0, false);
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(4) {
        match within("data or a ping", ws.next()).await {
            Some(Ok(Message::Binary(b))) => bytes += b.len(),
            Some(Ok(Message::Ping(_))) => pings += 1,
            other => panic!("expected data and pings, got {other:?} after {:?}", start.elapsed()),
        }
        // The slow reader: at most one message (256 KiB) per 30 ms, far below what the source
        // sends, so the gateway's socket to it stays full.
        tokio::time::sleep(Duration::from_millis(30)).await;
        if !backed_up {
            backed_up = scrape(&gw, "wsgate_buffered_bytes", &[("direction", "to_client")]).await > 0.0;
        }
    }
    assert!(backed_up, "the gateway's writes to the client never had to wait");
    assert!(pings >= 1, "no ping reached the slow reader ({bytes} bytes read)");
    assert_eq!(scrape(&gw, "wsgate_session_limits_total", &[("limit", "pong_timeout")]).await, 0.0);
    assert_eq!(scrape(&gw, "wsgate_sessions_open", &[("route", "source")]).await, 1.0);
}

/// At the defaults (a ping every 30 s, 30 s to answer) a client that goes silent is closed
/// within 90 s: here 60 s, the first ping's deadline.
#[tokio::test]
async fn at_the_defaults_a_silent_client_is_closed_within_90_seconds() {
    let (gw, _echo) = gateway(&[]).await;
    let mut ws = gw.ws("/echo").await;
    let after = limit_reached(&gw, "echo", "pong_timeout", Duration::from_secs(95)).await;
    assert!(after >= Duration::from_secs(59) && after <= Duration::from_secs(90), "closed after {after:?}");
    let (_, code, reason) = read_until_close(&mut ws).await;
    assert_eq!((code, reason.as_str()), (1011, "no pong within 30 s"));
    expect_end(&mut ws).await;
}

/// At the defaults, a client that answers pings and sends nothing for 10 minutes is still open,
/// on both routes. Too slow for CI; the command is in the README (Development).
#[tokio::test]
#[ignore = "takes 10 minutes; run by hand (README, Development)"]
async fn at_the_defaults_a_healthy_client_stays_open_for_10_minutes() {
    let (gw, _echo) = gateway(&[]).await;
    let mut clients = Vec::new();
    for (_, path) in ROUTES {
        clients.push(gw.ws(path).await);
    }
    let mut pings = [0; 2];
    let reading = futures_util::future::join_all(clients.iter_mut().zip(pings.iter_mut()).map(|(ws, n)| async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Ping(_))) => *n += 1,
                other => panic!("expected pings only, got {other:?}"),
            }
        }
    }));
    let _ = tokio::time::timeout(Duration::from_secs(600), reading).await;
    // A ping every 30 s: 20 in 10 minutes, give or take one at either end.
    assert!(pings.iter().all(|n| (19..=20).contains(n)), "pings: {pings:?}");
    for (ws, (route, _)) in clients.iter_mut().zip(ROUTES) {
        let data = payload(100, 43);
        send_binary(ws, &data).await;
        assert!(read_bytes(ws, data.len()).await == data, "route {route}: still open");
    }
    eprintln!("open after 10 minutes at the defaults; pings received: {pings:?}");
}

mod netns;

/// The keepalive timer of the gateway's side of the TCP connection from `client` to `gateway`,
/// from /proc/net/tcp: `Some(seconds until it fires)` when one is pending (the timer field is 2),
/// `None` when the socket has no timer. Waits out a retransmission timer (1: the 101 not yet
/// acknowledged), which replaces the keepalive timer until then.
#[cfg(target_os = "linux")]
async fn keepalive_timer(gateway: std::net::SocketAddr, client: std::net::SocketAddr) -> Option<f64> {
    let hex = |a: std::net::SocketAddr| match a.ip() {
        std::net::IpAddr::V4(ip) => format!("{:08X}:{:04X}", u32::from_le_bytes(ip.octets()), a.port()),
        std::net::IpAddr::V6(_) => unreachable!("the test listens on 127.0.0.1"),
    };
    let (local, remote) = (hex(gateway), hex(client));
    within("a socket without a retransmission pending", async {
        loop {
            let table = std::fs::read_to_string("/proc/net/tcp").expect("/proc/net/tcp");
            let row = table
                .lines()
                .map(|l| l.split_whitespace().map(str::to_string).collect::<Vec<_>>())
                .find(|f| f.len() > 5 && f[1] == local && f[2] == remote)
                .unwrap_or_else(|| panic!("no socket {local} -> {remote} in /proc/net/tcp"));
            let (timer, when) = row[5].split_once(':').expect("tr:tm->when");
            match timer {
                "00" => return None,
                "02" => return Some(u64::from_str_radix(when, 16).unwrap() as f64 / 100.0),
                "01" => tokio::task::yield_now().await,
                other => panic!("unexpected timer {other} on an idle session's socket: {row:?}"),
            }
        }
    })
    .await
}

/// Client sockets get TCP keepalive at `tcp_keepalive_secs` whether they inherit it from the
/// listening socket (as set at start) or a reload changed it since (the accepted socket is then
/// set itself), and none once a reload turns it off.
#[cfg(target_os = "linux")]
#[tokio::test]
async fn client_sockets_keep_the_keepalive_the_current_config_gives_them() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("wsgate.toml");
    let config = |limits: &[(&str, &str)]| {
        let mut b = Gateway::builder().route("echo", "/echo", "builtin:echo");
        for (key, value) in limits {
            b = b.limit(key, value);
        }
        b.toml()
    };
    std::fs::write(&path, config(&[])).unwrap();
    let gw = Gateway::from_file(&path).await;
    let session = || async {
        let tcp = within("connect", TcpStream::connect(gw.plain)).await.unwrap();
        let client = tcp.local_addr().unwrap();
        // Upgraded: the session is open, the handshake's socket options long set.
        (raw_upgrade(tcp, "/echo").await, client)
    };

    let (_default, client) = session().await;
    let left = keepalive_timer(gw.plain, client).await.expect("keepalive on at the default");
    assert!(left > 50.0 && left <= 60.0, "keepalive fires in {left} s, not within the default 60 s");

    std::fs::write(&path, config(&[("tcp_keepalive_secs", "0")])).unwrap();
    gw.reloader.reload_file(&path).expect("reload");
    let (_off, client) = session().await;
    assert_eq!(keepalive_timer(gw.plain, client).await, None, "keepalive still on after a reload turned it off");

    std::fs::write(&path, config(&[("tcp_keepalive_secs", "20")])).unwrap();
    gw.reloader.reload_file(&path).expect("reload");
    let (_twenty, client) = session().await;
    let left = keepalive_timer(gw.plain, client).await.expect("keepalive on again");
    assert!(left > 10.0 && left <= 20.0, "keepalive fires in {left} s, not within 20 s");
}
