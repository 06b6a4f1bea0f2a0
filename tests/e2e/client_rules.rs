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

    let denied = [("route", "guarded"), ("reason", "client_address")];
    assert_eq!(scrape(&gw, "wsgate_access_denied_total", &denied).await, 4.0);
    assert_eq!(scrape(&gw, "wsgate_handshakes_total", &[("route", "guarded"), ("status", "403")]).await, 4.0);
    // Both admitted sessions dialled before their 101; no refused one did.
    eventually("the backend counted its connections", || async { backend.accepted() >= 2 }).await;
    assert_eq!(backend.accepted(), 2);
}
