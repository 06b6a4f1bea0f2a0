//! A route's client rules (`clients = { allow, deny }`): checked before anything else, by the
//! request's client address (a trusted proxy's `X-Forwarded-For` included), answered 403 and
//! counted; a refused request never reaches the backend.

use std::net::IpAddr;

use crate::support::*;

/// Allowed addresses get their session byte for byte; a denied one, or one outside the allow
/// list, gets 403 naming its address, counted as `client_address`; through a trusted proxy the
/// forwarded address is the one judged, and a forwarded header from anyone else changes
/// nothing. The backend saw exactly the allowed connections.
#[tokio::test]
async fn allow_and_deny_lists_answer_403_before_the_dial() {
    let backend = Backend::echo().await;
    let gw = Gateway::builder()
        .listener_keys("trusted_proxies = [\"127.0.0.1/32\"]")
        .route_with(
            "guarded",
            "/g",
            &backend.target(),
            "clients = { allow = [\"127.0.0.0/29\"], deny = [\"127.0.0.3\"] }",
        )
        .start()
        .await;
    let from = |last: u8| IpAddr::from([127, 0, 0, last]);
    let mut ws = gw.session_from(from(2), "/g", false).await.unwrap();
    send_binary(&mut ws, b"allowed").await;
    assert_eq!(read_bytes(&mut ws, 7).await, b"allowed");

    let request = |extra: &str| upgrade_request("/g", extra);
    for (src, extra, judged) in [
        (3, "", "127.0.0.3"),
        (9, "", "127.0.0.9"),
        // The trusted proxy forwards a denied client.
        (1, "X-Forwarded-For: 127.0.0.3\r\n", "127.0.0.3"),
        // An untrusted peer claims an allowed address: its own is judged.
        (9, "X-Forwarded-For: 127.0.0.2\r\n", "127.0.0.9"),
    ] {
        let s = connect_from(from(src), gw.plain).await.unwrap();
        let (status, head, body) = raw_http_on(s, &request(extra)).await;
        assert_eq!(status, 403, "from 127.0.0.{src} {extra:?}: {head}");
        assert_eq!(body, format!("client address {judged} is not allowed on this route\n"));
    }
    // The trusted proxy forwards an allowed client.
    let s = connect_from(from(1), gw.plain).await.unwrap();
    assert_eq!(raw_http_on(s, &request("X-Forwarded-For: 127.0.0.4\r\n")).await.0, 101);
    // A client's bytes that are not text, which the proxy appended the client's address to, do
    // not hide that address: it is judged (403), never taken for the trusted proxy.
    let mut s = connect_from(from(1), gw.plain).await.unwrap();
    let mut head = request("X-Forwarded-For: \u{1}, 127.0.0.9\r\n").into_bytes();
    let at = head.iter().position(|&b| b == 1).unwrap();
    head[at] = 0xff;
    within("write", tokio::io::AsyncWriteExt::write_all(&mut s, &head)).await.unwrap();
    let (status, _, body) = raw_http_on(s, "").await;
    assert_eq!((status, body.as_str()), (403, "client address 127.0.0.9 is not allowed on this route\n"));
    // A hop that is no address where the client should be: the client is unknown, refused.
    let s = connect_from(from(1), gw.plain).await.unwrap();
    let (status, _, body) = raw_http_on(s, &request("X-Forwarded-For: unknown\r\n")).await;
    assert_eq!((status, body.as_str()), (400, "the forwarded header names no client address\n"));

    let denied = [("route", "guarded"), ("reason", "client_address")];
    assert_eq!(scrape(&gw, "wsgate_access_denied_total", &denied).await, 5.0);
    assert_eq!(scrape(&gw, "wsgate_handshakes_total", &[("route", "guarded"), ("status", "403")]).await, 5.0);
    // Both admitted sessions dialled before their 101; no refused one did.
    eventually("the backend counted its connections", || async { backend.accepted() >= 2 }).await;
    assert_eq!(backend.accepted(), 2);
}

/// With `on_refusal = "close"`, a client the rules refuse is upgraded without a backend and
/// closed with 4403 and the reason, which a page can show; a request that is no acceptable
/// upgrade still gets its HTTP answer.
#[tokio::test]
async fn on_refusal_close_answers_a_denied_address_with_4403() {
    let backend = Backend::echo().await;
    let gw = Gateway::builder()
        .route_with("guarded", "/g", &backend.target(), "clients = { deny = [\"127.0.0.3\"] }\non_refusal = \"close\"")
        .start()
        .await;
    let mut ws = gw.session_from(IpAddr::from([127, 0, 0, 3]), "/g", false).await.unwrap();
    let (data, code, reason) = read_until_close(&mut ws).await;
    assert_eq!((data.len(), code, reason.as_str()), (0, 4403, "client address 127.0.0.3 is not allowed on this route"));
    // Not an upgrade at all: the HTTP refusal, as on any route.
    let s = connect_from(IpAddr::from([127, 0, 0, 3]), gw.plain).await.unwrap();
    let (status, _, _) = raw_http_on(s, "GET /g HTTP/1.1\r\nHost: gw\r\n\r\n").await;
    assert_eq!(status, 403);
    let mut ws = gw.session_from(IpAddr::from([127, 0, 0, 2]), "/g", false).await.unwrap();
    send_binary(&mut ws, b"allowed").await;
    assert_eq!(read_bytes(&mut ws, 7).await, b"allowed");
    let denied = [("route", "guarded"), ("reason", "client_address")];
    assert_eq!(scrape(&gw, "wsgate_access_denied_total", &denied).await, 2.0);
    eventually("the backend counted its connection", || async { backend.accepted() >= 1 }).await;
    assert_eq!(backend.accepted(), 1);
}
