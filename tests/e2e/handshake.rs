use crate::support::*;

/// A path no route matches gets 404, whether or not it is an upgrade.
#[tokio::test]
async fn unknown_path_is_404() {
    let gw = Gateway::builder().route("echo", "/echo", "builtin:echo").start().await;
    let (status, _, body) = raw_http(gw.plain, &upgrade_request("/nope", "")).await;
    assert_eq!(status, 404);
    assert_eq!(body, "no route for this host and path\n", "the path is not echoed");
    let (status, _, _) = raw_http(gw.plain, "GET /echo/more HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert_eq!(status, 404, "exact routes do not match longer paths");
}

/// A plain GET on a route gets 426 with `Upgrade: websocket`; the query string is ignored for
/// routing.
#[tokio::test]
async fn plain_get_is_426() {
    let gw = Gateway::builder().route("echo", "/echo", "builtin:echo").start().await;
    let (status, head, _) = raw_http(gw.plain, "GET /echo?x=1 HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert_eq!(status, 426);
    assert!(head.to_ascii_lowercase().contains("upgrade: websocket"), "{head}");
    assert!(head.to_ascii_lowercase().contains("connection: upgrade, close"), "{head}");
}

/// Malformed upgrades get 400 (bad key, missing key, no `Connection: Upgrade`, HTTP/1.0), a
/// wrong version 426 naming version 13, a non-GET upgrade 405.
#[tokio::test]
async fn malformed_upgrades_get_the_right_status() {
    let gw = Gateway::builder().route("echo", "/echo", "builtin:echo").start().await;
    let good = upgrade_request("/echo", "");
    let cases: Vec<(String, u16)> = vec![
        (good.replace("dGhlIHNhbXBsZSBub25jZQ==", "not-base64!"), 400),
        (good.replace("dGhlIHNhbXBsZSBub25jZQ==", "c2hvcnQ="), 400),
        (good.replace("Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n", ""), 400),
        (good.replace("Connection: Upgrade", "Connection: keep-alive"), 400),
        (good.replace("HTTP/1.1", "HTTP/1.0"), 400),
        (good.replace("Sec-WebSocket-Version: 13", "Sec-WebSocket-Version: 8"), 426),
        (good.replace("GET ", "POST "), 405),
    ];
    for (request, want) in cases {
        let (status, head, body) = raw_http(gw.plain, &request).await;
        assert_eq!(status, want, "request:\n{request}\nresponse:\n{head}\n{body}");
        if want == 426 {
            assert!(head.to_ascii_lowercase().contains("sec-websocket-version: 13"), "{head}");
        }
    }
    let (status, _, _) = raw_http(gw.plain, &good).await;
    assert_eq!(status, 101, "the well-formed request is accepted");
}

/// A browser request from another origin to a TCP route is refused with 403, and the backend
/// never sees a connection.
#[tokio::test]
async fn cross_origin_request_is_403_and_backend_untouched() {
    let echo = Backend::echo().await;
    let gw = Gateway::builder().route("tcp", "/tcp", &echo.target()).start().await;
    let (status, _, body) = raw_http(gw.plain, &upgrade_request("/tcp", "Origin: http://evil.example\r\n")).await;
    assert_eq!(status, 403);
    assert!(body.contains("origin \"http://evil.example\" is not allowed"), "{body}");
    let refused = gw.ws_with("/tcp", &[("Origin", "http://evil.example")]).await;
    match refused {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => assert_eq!(resp.status(), 403),
        other => panic!("expected HTTP 403, got {:?}", other.map(|_| "a session")),
    }
    assert_eq!(echo.accepted(), 0, "a refused request must not reach the backend");
}

/// The request's own origin passes, a listed origin passes, and a request without `Origin`
/// (a non-browser client) passes.
#[tokio::test]
async fn same_listed_and_absent_origins_pass() {
    let echo = Backend::echo().await;
    let gw = Gateway::builder()
        .route("tcp", "/tcp", &echo.target())
        .route_with("listed", "/listed", &echo.target(), "allowed_origins = [\"https://app.example.com\"]")
        .start()
        .await;
    let own = format!("http://{}", gw.plain);
    for (path, origin) in [("/tcp", Some(own.as_str())), ("/listed", Some("https://app.example.com")), ("/tcp", None)] {
        let headers: Vec<(&str, &str)> = origin.map(|o| ("Origin", o)).into_iter().collect();
        let mut ws = gw.ws_with(path, &headers).await.unwrap_or_else(|e| panic!("{path} {origin:?}: {e}"));
        send_binary(&mut ws, b"hi").await;
        assert_eq!(read_bytes(&mut ws, 2).await, b"hi");
    }
    assert!(gw.ws_with("/listed", &[("Origin", "https://other.example.com")]).await.is_err());
    assert_eq!(echo.accepted(), 3);
}

/// A route can require a Host: a wildcard pattern matches its subdomains (any port) and no other host.
#[tokio::test]
async fn host_routing() {
    let gw = Gateway::builder().route_with("a", "/x", "builtin:echo", "host = \"*.example.com\"").start().await;
    let req = upgrade_request("/x", "").replace("Host: 127.0.0.1", "Host: vnc.example.com:8080");
    assert_eq!(raw_http(gw.plain, &req).await.0, 101);
    let req = upgrade_request("/x", "").replace("Host: 127.0.0.1", "Host: example.org");
    assert_eq!(raw_http(gw.plain, &req).await.0, 404);
}

/// One request per connection: after a refusal the gateway closes the socket, so a client
/// cannot hold a handshake slot (`limits.max_handshakes`) with a stream of cheap requests.
#[tokio::test]
async fn connection_closes_after_a_refusal() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let gw = Gateway::builder().route("echo", "/echo", "builtin:echo").start().await;
    let mut s = tokio::net::TcpStream::connect(gw.plain).await.unwrap();
    let two = "GET /nope HTTP/1.1\r\nHost: x\r\n\r\nGET /nope HTTP/1.1\r\nHost: x\r\n\r\n";
    s.write_all(two.as_bytes()).await.unwrap();
    let mut all = String::new();
    within("server closes the connection", s.read_to_string(&mut all)).await.unwrap();
    assert_eq!(all.matches("HTTP/1.1 404").count(), 1, "{all}");
    assert!(all.to_ascii_lowercase().contains("connection: close"), "{all}");
}

/// A client that connects and sends nothing is dropped once `handshake_timeout_secs` passes.
#[tokio::test]
async fn silent_client_is_dropped_after_the_handshake_timeout() {
    use tokio::io::AsyncReadExt;
    let gw =
        Gateway::builder().route("echo", "/echo", "builtin:echo").limit("handshake_timeout_secs", "0.3").start().await;
    let mut s = tokio::net::TcpStream::connect(gw.plain).await.unwrap();
    let mut buf = Vec::new();
    let started = std::time::Instant::now();
    let _ = within("server drops the silent client", s.read_to_end(&mut buf)).await;
    assert!(started.elapsed() >= std::time::Duration::from_millis(250), "dropped too early");
}

/// At `limits.max_connections`, a further socket is closed at once, and is served again once a
/// session ends.
#[tokio::test]
async fn connection_limit_closes_extra_sockets() {
    use tokio::io::AsyncReadExt;
    let gw = Gateway::builder().route("echo", "/echo", "builtin:echo").limit("max_connections", "2").start().await;
    let mut a = gw.ws("/echo").await;
    send_binary(&mut a, b"a").await;
    read_bytes(&mut a, 1).await;
    let mut b = gw.ws("/echo").await;
    send_binary(&mut b, b"b").await;
    read_bytes(&mut b, 1).await;
    let mut extra = tokio::net::TcpStream::connect(gw.plain).await.unwrap();
    let mut answer = Vec::new();
    // Answered at once, without a request: well before the 10 s handshake timeout.
    tokio::time::timeout(std::time::Duration::from_secs(3), extra.read_to_end(&mut answer))
        .await
        .expect("the third socket must be answered and closed at once, not left to time out")
        .expect("the 503 must arrive intact, not be reset away");
    let answer = String::from_utf8(answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 503 Service Unavailable\r\n"), "{answer}");
    assert!(answer.contains("\r\nRetry-After: 5\r\n"), "{answer}");
    assert!(answer.ends_with("\r\n\r\ngateway is at its connection limit; try again later\n"), "{answer}");
    let refused = [("listener", "plain"), ("reason", "connection_limit")];
    assert_eq!(scrape(&gw, "wsgate_connections_refused_total", &refused).await, 1.0);
    drop(a);
    // The slot comes back once the first session has ended; retry until it has.
    within("a slot frees up", async {
        loop {
            if let Ok(mut ws) = gw.ws_with("/echo", &[]).await {
                send_binary(&mut ws, b"c").await;
                read_bytes(&mut ws, 1).await;
                break;
            }
            // Spaces the attempts of this bounded retry; the wait ends on the free slot itself.
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    })
    .await;
}

/// DNS rebinding: a page whose own name was re-pointed at the gateway sends an `Origin` and a
/// `Host` that agree; that is not the gateway's own origin unless the route names that host.
#[tokio::test]
async fn dns_rebinding_is_not_same_origin() {
    let echo = Backend::echo().await;
    let gw = Gateway::builder()
        .route("tcp", "/tcp", &echo.target())
        .route_with("named", "/named", &echo.target(), "host = \"gw.example.com\"")
        .start()
        .await;
    let port = gw.plain.port();
    let rebound = upgrade_request("/tcp", &format!("Origin: http://rebind.evil:{port}\r\n"))
        .replace("Host: 127.0.0.1", &format!("Host: rebind.evil:{port}"));
    assert_eq!(raw_http(gw.plain, &rebound).await.0, 403);
    let named = upgrade_request("/named", &format!("Origin: http://gw.example.com:{port}\r\n"))
        .replace("Host: 127.0.0.1", &format!("Host: gw.example.com:{port}"));
    assert_eq!(raw_http(gw.plain, &named).await.0, 101, "the route's own host is its own origin");
    assert_eq!(echo.accepted(), 1, "only the named request reached the backend");
}

/// RFC 9112 §3.2: a request without a `Host`, with two, or with an empty one is refused with 400
/// and a reason that says which, before routing (even on a route without `host`).
#[tokio::test]
async fn missing_duplicate_and_empty_hosts_are_400() {
    let gw = Gateway::builder().route("echo", "/echo", "builtin:echo").start().await;
    let good = upgrade_request("/echo", "");
    let cases = [
        (good.replace("Host: 127.0.0.1\r\n", ""), "missing Host header"),
        (good.replace("Host: 127.0.0.1\r\n", "Host: 127.0.0.1\r\nHost: 127.0.0.1\r\n"), "more than one Host header"),
        (good.replace("Host: 127.0.0.1\r\n", "Host: a.example\r\nHost: b.example\r\n"), "more than one Host header"),
        (good.replace("Host: 127.0.0.1\r\n", "Host:\r\n"), "empty Host header"),
        (good.replace("Host: 127.0.0.1\r\n", "Host: a.example/x\r\n"), "malformed Host header"),
    ];
    for (request, reason) in cases {
        let (status, _, body) = raw_http(gw.plain, &request).await;
        assert_eq!(status, 400, "request:\n{request}\nbody: {body}");
        assert!(body.starts_with(reason), "request:\n{request}\nbody: {body}");
    }
    assert_eq!(raw_http(gw.plain, &good).await.0, 101, "the same request with one Host is accepted");
    let unrouted = [("route", ""), ("status", "400")];
    assert_eq!(scrape(&gw, "wsgate_handshakes_total", &unrouted).await, 5.0, "each refusal is counted");
}

/// An absolute-form target's authority is the request's host (RFC 9112 §3.2.2): it routes to a
/// host-restricted route when the `Host` agrees (port and case may differ as the RFC allows), and
/// a `Host` that names another host is refused with 400 rather than ignored, so a request cannot
/// reach a route by a name the proxy in front did not route by.
#[tokio::test]
async fn absolute_form_target_is_the_host_and_a_disagreeing_host_is_400() {
    let echo = Backend::echo().await;
    let gw = Gateway::builder()
        .route_with("named", "/x", &echo.target(), "host = \"a.example\"")
        .route("other", "/x", "builtin:echo")
        .start()
        .await;
    let absolute = |target: &str, host: &str| {
        upgrade_request("/x", "").replacen("GET /x", &format!("GET {target}"), 1).replace("127.0.0.1", host)
    };
    // Host and target agree: the named route takes it (its backend is dialled).
    let (status, _, body) = raw_http(gw.plain, &absolute("http://a.example/x", "A.EXAMPLE:80")).await;
    assert_eq!(status, 101, "{body}");
    eventually("the named route's backend is dialled", || async { echo.accepted() == 1 }).await;
    // The target names the route's host, the Host header another one (once the winner): 400.
    for (target, host) in [("http://a.example/x", "b.example"), ("http://b.example/x", "a.example")] {
        let (status, _, body) = raw_http(gw.plain, &absolute(target, host)).await;
        assert_eq!(status, 400, "{target} with Host {host}: {body}");
        assert!(body.starts_with("Host header disagrees with the request target's authority"), "{body}");
    }
    let (status, _, body) = raw_http(gw.plain, &absolute("http://a.example:8080/x", "a.example")).await;
    assert_eq!(status, 400, "another port is another authority: {body}");
    assert_eq!(echo.accepted(), 1, "no refused request reached the named route's backend");
    // The target's authority is also what the origin check compares the page's origin with.
    let same_origin =
        absolute("http://a.example/x", "a.example").replace("\r\n\r\n", "\r\nOrigin: http://a.example\r\n\r\n");
    assert_eq!(raw_http(gw.plain, &same_origin).await.0, 101);
    let cross = absolute("http://a.example/x", "a.example").replace("\r\n\r\n", "\r\nOrigin: http://b.example\r\n\r\n");
    assert_eq!(raw_http(gw.plain, &cross).await.0, 403);
}

/// 2,000 refused requests (500 each of a refused origin, a refused subprotocol, no route, and a
/// dead backend on an `on_backend_unavailable = "http"` route) write at most 10 lines at the
/// default level: one warning per route and kind, each counted in the metrics. Once the throttle's
/// interval has passed, the next warning of each kind says how many were left out.
#[tokio::test]
async fn refusal_floods_write_a_few_lines_that_count_the_rest() {
    use futures_util::StreamExt;
    let (logs, _guard) = Logs::capture_at(tracing::Level::INFO);
    let echo = Backend::echo().await;
    let dead = RefusingPort::new();
    let gw = Gateway::builder()
        .route("tcp", "/tcp", &echo.target())
        .route_with("down", "/down", &dead.addr.to_string(), "on_backend_unavailable = \"http\"")
        .start()
        .await;
    let kinds = [
        (upgrade_request("/tcp", "Origin: http://evil.example\r\n"), 403),
        (upgrade_request("/tcp", "Sec-WebSocket-Protocol: mqtt\r\n"), 400),
        (upgrade_request("/nope", ""), 404),
        (upgrade_request("/down", ""), 502),
    ];
    let before = logs.text().lines().count();
    let requests = (0..2000).map(|i| &kinds[i % kinds.len()]);
    let statuses: Vec<(u16, u16)> = futures_util::stream::iter(requests)
        .map(|(request, want)| async move { (raw_http(gw.plain, request).await.0, *want) })
        .buffer_unordered(16)
        .collect()
        .await;
    let flooded = std::time::Instant::now();
    assert!(statuses.iter().all(|(got, want)| got == want), "a request got an unexpected answer");
    let text = logs.text();
    let lines: Vec<&str> = text.lines().skip(before).collect();
    assert!(lines.len() <= 10, "{} lines for 2,000 refusals:\n{}", lines.len(), lines.join("\n"));
    for what in ["origin \"http://evil.example\"", "no acceptable subprotocol", "backend unavailable"] {
        let said = lines.iter().filter(|l| l.contains(" WARN ") && l.contains(what) && l.contains("suppressed=0"));
        assert_eq!(said.count(), 1, "one warning for {what}:\n{}", lines.join("\n"));
    }
    for (route, status, n) in [("tcp", "403", 500.0), ("tcp", "400", 500.0), ("", "404", 500.0), ("down", "502", 500.0)]
    {
        let labels = [("route", route), ("status", status)];
        assert_eq!(scrape(&gw, "wsgate_handshakes_total", &labels).await, n, "{route} {status}");
    }
    assert_eq!(scrape(&gw, "wsgate_backend_connect_failures_total", &[("route", "down")]).await, 500.0);
    assert_eq!(echo.accepted(), 0);

    // The throttle's interval, a timer of the gateway's, has to pass before it writes again.
    tokio::time::sleep_until((flooded + wsgate::throttle::WARN_INTERVAL).into()).await;
    for (request, want) in &kinds {
        assert_eq!(raw_http(gw.plain, request).await.0, *want);
    }
    let text = logs.text();
    let later: Vec<&str> = text.lines().skip(before + lines.len()).collect();
    for what in ["origin \"http://evil.example\"", "no acceptable subprotocol", "backend unavailable"] {
        let said = later.iter().filter(|l| l.contains(" WARN ") && l.contains(what) && l.contains("suppressed=499"));
        assert_eq!(said.count(), 1, "the next warning for {what} counts the 499 left out:\n{}", later.join("\n"));
    }
    assert_eq!(later.len(), 3, "{}", later.join("\n"));
}
