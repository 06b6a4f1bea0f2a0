//! What `wsgate connect` sends for a route's access policy and its control channel: the bearer
//! token in each carrier a route can accept (`--token-via`), and a route that refuses the
//! control channel (`half_close = false`).

use crate::support::client::Connect;
use crate::support::*;

/// The token: characters a query must escape and a subprotocol cannot hold raw.
const TOKEN: &str = "s3cr+t/tok=en";

fn sha256_hex(text: &str) -> String {
    use aws_lc_rs::digest::{SHA256, digest};
    digest(&SHA256, text.as_bytes()).as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// Each carrier, on four bearer routes: one that takes only `Authorization` (always accepted),
/// one that also takes the cookie, one the query parameter, one the subprotocol entry. A carrier
/// gets through on its own route and is refused on the others (401, exit 5; for the subprotocol
/// entry 400, exit 8, the route taking it for a subprotocol): so the token travelled in that
/// carrier, not in the always-accepted header. The token
/// never reaches stderr, and a wrong token in a carrier is refused too.
#[tokio::test]
async fn the_token_travels_in_the_carrier_asked_for() {
    let echo = Backend::echo().await;
    let tokens = format!("tokens = [\"ops=sha256:{}\"]\n", sha256_hex(TOKEN));
    let route = |name: &str, lines: &str, auth: &str| {
        format!(
            "[routes.{name}]\npath = \"/{name}\"\nbackend = \"{}\"\n{lines}[routes.{name}.auth]\ntype = \"bearer\"\n{tokens}{auth}",
            echo.target()
        )
    };
    let gw = Gateway::builder()
        .route_toml(&route("header", "", ""))
        .route_toml(&route("cookie", "", "cookie = \"gw_token\"\n"))
        .route_toml(&route("query", "", "query = true\n"))
        .route_toml(&route("sub", "subprotocols = [\"tcp\"]\n", "subprotocol_prefix = \"base64url.bearer.wsgate.\"\n"))
        .start()
        .await;
    let carriers = [
        ("header", "header"),
        ("cookie:gw_token", "cookie"),
        ("query", "query"),
        ("subprotocol:base64url.bearer.wsgate.", "sub"),
    ];
    for (via, own) in carriers {
        for (_, route) in carriers {
            let ran = Connect::new(&gw.url(&format!("/{route}")))
                .args(&["--token-env", "GW_TOKEN", "--token-via", via])
                .env("GW_TOKEN", TOKEN)
                .stdio(b"ping")
                .await;
            let what = format!("--token-via {via} on /{route}");
            assert!(!ran.stderr.contains(TOKEN), "{what}: the token reached stderr: {}", ran.stderr);
            if via == "header" || route == own {
                assert_eq!((ran.code, ran.stdout.as_slice()), (Some(0), &b"ping"[..]), "{what}: {}", ran.stderr);
            } else if own == "sub" {
                // A route without that prefix takes the entry for a subprotocol it does not
                // accept, which is checked before credentials.
                assert_eq!(ran.code, Some(8), "{what}: {}", ran.stderr);
                assert!(
                    ran.stderr.contains("handshake refused: 400 no acceptable subprotocol"),
                    "{what}: {}",
                    ran.stderr
                );
            } else {
                assert_eq!(ran.code, Some(5), "{what}: {}", ran.stderr);
                assert!(ran.stderr.contains("access refused: 401"), "{what}: {}", ran.stderr);
            }
        }
        let ran = Connect::new(&gw.url(&format!("/{own}")))
            .args(&["--token-env", "GW_TOKEN", "--token-via", via])
            .env("GW_TOKEN", "wrong+token")
            .stdio(b"ping")
            .await;
        assert_eq!(ran.code, Some(5), "wrong token via {via}: {}", ran.stderr);
        assert!(!ran.stderr.contains("wrong+token"), "{}", ran.stderr);
    }
    // Without a token to carry, `--token-via` is a usage error.
    let ran = Connect::new(&gw.url("/query")).args(&["--token-via", "query"]).stdio(b"").await;
    assert_eq!(ran.code, Some(2), "{}", ran.stderr);
    assert_eq!(echo.accepted(), 7, "only the sessions that got through reached the backend");
}

/// `half_close = false`: the route's 101 never agrees to the control channel, so `wsgate
/// connect` falls back to ending the session at its local EOF (exit 0, saying so at info): a
/// service that answers only after EOF sends nothing back. The same service on a route with the
/// default returns its whole answer.
#[tokio::test]
async fn a_route_can_refuse_the_control_channel() {
    let sorter = super::answers_after_eof().await;
    let gw = Gateway::builder()
        .route_with("off", "/off", &sorter.target(), "half_close = false")
        .route("on", "/on", &sorter.target())
        .start()
        .await;
    let asked = upgrade_request("/off", "wsgate-control: 1\r\n");
    let (status, head, _) = within("upgrade asking for the control channel", raw_http(gw.plain, &asked)).await;
    assert_eq!(status, 101, "{head}");
    assert!(!head.to_ascii_lowercase().contains("wsgate-control"), "{head}");
    let input = payload(50_000, 43);
    let ran = Connect::new(&gw.url("/off")).env("RUST_LOG", "info").stdio(&input).await;
    assert_eq!(ran.code, Some(0), "stderr: {}", ran.stderr);
    assert!(ran.stdout.is_empty(), "got {} bytes after the session ended", ran.stdout.len());
    assert!(ran.stderr.contains("did not agree to the control channel"), "{}", ran.stderr);
    let ran = Connect::new(&gw.url("/on")).stdio(&input).await;
    let mut want = input;
    want.reverse();
    assert_eq!(ran.code, Some(0), "stderr: {}", ran.stderr);
    assert!(ran.stdout == want, "got {} of {} bytes, or altered", ran.stdout.len(), want.len());
}
