//! The browser contract, proven in headless Chromium: each scenario runs in a page served by
//! the gateway under test (its console), uses only the WebSocket API, and the test asserts the
//! exact event sequence with `readyState`, data, and `code`/`reason`/`wasClean`.

use std::path::Path;

use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::support::browser::{Browser, Tab};
use crate::support::*;

/// Opens the gateway's console page in a new tab; scenarios run from there, same-origin.
async fn page(browser: &mut Browser, gw: &Gateway) -> Tab {
    browser.open(&format!("http://{}/console", gw.plain)).await
}

async fn scenario(browser: &mut Browser, tab: &Tab, url: &str, options: &str) -> Value {
    browser.eval(tab, &format!("wsgateScenario({url:?}, {options})")).await
}

fn created() -> Value {
    json!({"type": "created", "readyState": 0})
}

fn open(protocol: &str) -> Value {
    json!({"type": "open", "readyState": 1, "protocol": protocol})
}

fn close(code: u16, reason: &str, clean: bool) -> Value {
    json!({"type": "close", "readyState": 3, "code": code, "reason": reason, "wasClean": clean})
}

fn text(t: &str) -> Value {
    json!({"type": "message", "readyState": 1, "kind": "text", "text": t, "size": t.encode_utf16().count()})
}

fn binary(kind: &str, bytes: &[u8]) -> Value {
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    json!({"type": "message", "readyState": 1, "kind": kind, "size": bytes.len(), "hex": hex})
}

/// The seed's example, then text and binary (Blob and ArrayBuffer) round trips through the
/// built-in echo and through the bridge to a TCP echo.
#[tokio::test]
async fn browser_echo_and_round_trips() {
    let echo = Backend::echo().await;
    let gw = Gateway::builder()
        .console()
        .route("echo", "/echo", "builtin:echo")
        .route("tcp", "/tcp", &echo.target())
        .start()
        .await;
    let mut browser = Browser::launch().await;
    let tab = page(&mut browser, &gw).await;

    // The seed's example: send on open, print the echo, close.
    let r = scenario(
        &mut browser,
        &tab,
        &gw.url("/echo"),
        "{ onopen: (ws) => ws.send('Hello, world!'), onmessage: (ws) => ws.close(1000, 'done') }",
    )
    .await;
    assert_eq!(r["events"], json!([created(), open(""), text("Hello, world!"), close(1000, "done", true)]));

    // Text, ArrayBuffer and Blob sends, received as Blob and as ArrayBuffer.
    for binary_type in ["blob", "arraybuffer"] {
        let r = scenario(
            &mut browser,
            &tab,
            &gw.url("/echo"),
            &format!(
                "{{ binaryType: '{binary_type}', onopen: (ws) => {{ ws.send('héllo ✓'); \
                 ws.send(new Uint8Array([0, 1, 2, 255]).buffer); ws.send(new Blob([new Uint8Array([9, 8, 7])])); }}, \
                 onmessage: (ws, rec) => {{ if (rec.events.filter(e => e.type === 'message').length === 3) ws.close(1000, 'ok'); }} }}"
            ),
        )
        .await;
        assert_eq!(
            r["events"],
            json!([
                created(),
                open(""),
                text("héllo ✓"),
                binary(binary_type, &[0, 1, 2, 255]),
                binary(binary_type, &[9, 8, 7]),
                close(1000, "ok", true)
            ]),
            "binaryType {binary_type}"
        );
    }

    // Through the bridge: a TCP route is a byte stream, so compare joined bytes, and the page's
    // own origin is allowed by default.
    let r = scenario(
        &mut browser,
        &tab,
        &gw.url("/tcp"),
        "{ binaryType: 'arraybuffer', keepBytes: true, onopen: (ws) => ws.send(pattern(300000, 3).buffer), \
           onmessage: (ws, rec) => { if (rec.bytes === 300000) { \
             const all = new Uint8Array(300000); let o = 0; for (const d of rec.data) { all.set(d, o); o += d.length; } \
             rec.result = matchesPattern(all, 3); ws.close(1000, 'checked'); } } }",
    )
    .await;
    assert_eq!(r["bytes"], json!(300000));
    assert_eq!(r["result"], json!(true), "bytes through the bridge differ from what the page sent");
    assert_eq!(r["events"].as_array().unwrap().last().unwrap(), &close(1000, "checked", true));
    browser.close().await;
}

/// The seed's 10,000,000-byte ArrayBuffer to a TCP sink: `bufferedAmount` rises to the whole
/// message, returns to 0, and the backend receives every byte in order.
#[tokio::test]
async fn browser_ten_megabytes_and_buffered_amount() {
    let (sink, mut received) = Backend::sink().await;
    let gw = Gateway::builder().console().route("sink", "/sink", &sink.target()).start().await;
    let mut browser = Browser::launch().await;
    let tab = page(&mut browser, &gw).await;
    let r = scenario(
        &mut browser,
        &tab,
        &gw.url("/sink"),
        "{ onopen: (ws, rec) => { \
             ws.send(pattern(10000000, 5).buffer); \
             rec.result = { afterSend: ws.bufferedAmount, peak: ws.bufferedAmount, samples: 0 }; \
             const t = setInterval(() => { rec.result.samples++; \
               rec.result.peak = Math.max(rec.result.peak, ws.bufferedAmount); \
               if (ws.bufferedAmount === 0) { clearInterval(t); rec.result.drained = true; ws.close(1000, 'sent'); } }, 5); } }",
    )
    .await;
    assert_eq!(r["events"], json!([created(), open(""), close(1000, "sent", true)]));
    assert_eq!(r["result"]["afterSend"], json!(10_000_000), "bufferedAmount right after send");
    assert_eq!(r["result"]["drained"], json!(true), "bufferedAmount returned to 0");
    let got = within("sink receives everything", received.recv()).await.unwrap();
    assert_eq!(got.len(), 10_000_000);
    assert!(got == js_pattern(10_000_000, 5), "the backend received altered bytes");
    browser.close().await;
}

/// Every failure reaches the page as the documented code and reason: backend down (1013),
/// backend EOF (1000), backend reset (1011), message too big (1009), unknown route and refused
/// origins (1006 after an error event), and gateway shutdown (1001).
#[tokio::test]
async fn browser_failures_are_reported() {
    let dead = RefusingPort::new();
    let eof = Backend::say_and_close(b"bye\n".to_vec()).await;
    // Resets once the gateway has relayed "hello", so the reset cannot overtake those bytes.
    let relayed = std::sync::Arc::new(tokio::sync::Notify::new());
    let reset_now = relayed.clone();
    let reset = Backend::start(move |mut s: TcpStream| {
        let reset_now = reset_now.clone();
        async move {
            s.write_all(b"hello").await.unwrap();
            reset_now.notified().await;
            s.set_zero_linger().unwrap();
        }
    })
    .await;
    let (sink, _received) = Backend::sink().await;
    let mut gw = Gateway::builder()
        .console()
        .route("down", "/down", &dead.addr.to_string())
        .route("eof", "/eof", &eof.target())
        .route("reset", "/reset", &reset.target())
        .route("sink", "/sink", &sink.target())
        .route_with("mqtt", "/mqtt", &sink.target(), "subprotocols = [\"mqtt\"]")
        .limit("max_message_bytes", "4096")
        .start()
        .await;
    let mut browser = Browser::launch().await;
    let tab = page(&mut browser, &gw).await;

    let r = scenario(&mut browser, &tab, &gw.url("/down"), "{}").await;
    assert_eq!(r["events"], json!([created(), open(""), close(1013, "backend unavailable: connection refused", true)]));

    let r = scenario(&mut browser, &tab, &gw.url("/eof"), "{ binaryType: 'arraybuffer' }").await;
    assert_eq!(
        r["events"],
        json!([
            created(),
            open(""),
            binary("arraybuffer", b"bye\n"),
            close(1000, "backend closed the connection", true)
        ])
    );

    let hello_relayed = async {
        let to_client = [("route", "reset"), ("direction", "to_client")];
        eventually("the gateway relays hello", || async { scrape(&gw, "wsgate_bytes_total", &to_client).await == 5.0 })
            .await;
        relayed.notify_one();
    };
    let url = gw.url("/reset");
    let (r, ()) = tokio::join!(scenario(&mut browser, &tab, &url, "{ binaryType: 'arraybuffer' }"), hello_relayed);
    assert_eq!(
        r["events"],
        json!([
            created(),
            open(""),
            binary("arraybuffer", b"hello"),
            close(1011, "backend error: connection reset", true)
        ])
    );

    // A message over the limit that has fully arrived: 1009, the reason, and a clean close.
    let r = scenario(&mut browser, &tab, &gw.url("/sink"), "{ onopen: (ws) => ws.send(new Uint8Array(5000).buffer) }")
        .await;
    assert_eq!(r["events"], json!([created(), open(""), close(1009, "message too big: limit is 4096 bytes", true)]));
    // Far over the limit and still arriving when wsgate closes: the page still gets 1009 and the
    // reason (not 1006). Whether Chromium calls it clean depends on whether it finished sending
    // before the connection ended; under load it sometimes has not (docs/close-codes.md), so
    // `wasClean` is not asserted here.
    let r =
        scenario(&mut browser, &tab, &gw.url("/sink"), "{ onopen: (ws) => ws.send(new Uint8Array(3000000).buffer) }")
            .await;
    let events = r["events"].as_array().unwrap();
    assert_eq!(events[..2], [created(), open("")]);
    assert_eq!(events.len(), 3, "{events:?}");
    let last = &events[2];
    assert_eq!(
        (&last["type"], &last["code"], &last["reason"]),
        (&json!("close"), &json!(1009), &json!("message too big: limit is 4096 bytes")),
        "{last}"
    );

    let refused = json!([created(), {"type": "error", "readyState": 3}, close(1006, "", false)]);
    let r = scenario(&mut browser, &tab, &gw.url("/nope"), "{}").await;
    assert_eq!(r["events"], refused, "unknown route");

    // Subprotocols: selected when the route accepts it; refused when it does not.
    let r =
        scenario(&mut browser, &tab, &gw.url("/mqtt"), "{ protocols: ['mqtt'], onopen: (ws) => ws.close(1000) }").await;
    assert_eq!(r["events"], json!([created(), open("mqtt"), close(1000, "", true)]));
    let r = scenario(&mut browser, &tab, &gw.url("/sink"), "{ protocols: ['mqtt'] }").await;
    assert_eq!(r["events"], refused, "a subprotocol the route does not accept");

    // A page from another origin (a second gateway's console) is refused on a TCP route.
    let other = Gateway::builder().console().route("e", "/e", "builtin:echo").start().await;
    let foreign = page(&mut browser, &other).await;
    let r = scenario(&mut browser, &foreign, &gw.url("/sink"), "{}").await;
    assert_eq!(r["events"], refused, "cross-origin page");

    // Gateway shutdown while the session is open: 1001.
    browser.eval(&tab, &format!("window.pendingScenario = wsgateScenario({:?}, {{ onopen: (ws, rec) => {{ window.opened = true; }} }}); true", gw.url("/sink"))).await;
    within("page sees open", async {
        while browser.eval(&tab, "window.opened === true").await != json!(true) {
            // Spaces the polls of this bounded wait for the page's open event.
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    })
    .await;
    gw.shutdown.now();
    let r = browser.eval(&tab, "window.pendingScenario").await;
    assert_eq!(r["events"], json!([created(), open(""), close(1001, "gateway shutting down", true)]));
    gw.stop().await;
    browser.close().await;
}

/// The console page: connect to /echo, send text, see the echo, close with a code and reason;
/// a screenshot is saved as a test artifact.
#[tokio::test]
async fn console_page_works() {
    let gw = Gateway::builder().console().route("echo", "/echo", "builtin:echo").start().await;
    let mut browser = Browser::launch().await;
    let tab = page(&mut browser, &gw).await;
    let wait_for = |ty: &'static str| {
        format!(
            "new Promise(r => {{ const t = setInterval(() => {{ const e = wsgateEvents.find(e => e.type === '{ty}'); if (e) {{ clearInterval(t); r(e); }} }}, 10); }})"
        )
    };

    assert_eq!(browser.eval(&tab, "document.getElementById('url').value").await, json!(gw.url("/echo")));
    browser.eval(&tab, "document.getElementById('connect').click(); true").await;
    assert_eq!(browser.eval(&tab, &wait_for("open")).await["readyState"], json!(1));
    browser.eval(&tab, "document.getElementById('text').value = 'from the console'; document.getElementById('sendText').click(); true").await;
    let echoed = browser.eval(&tab, &wait_for("message")).await;
    assert_eq!((echoed["kind"].clone(), echoed["text"].clone()), (json!("text"), json!("from the console")));
    browser.eval(&tab, "document.getElementById('hex').value = '01 ff'; document.getElementById('binaryType').value = 'arraybuffer'; document.getElementById('binaryType').dispatchEvent(new Event('change')); document.getElementById('sendBinary').click(); true").await;
    let bin = browser
        .eval(&tab, "new Promise(r => { const t = setInterval(() => { const m = wsgateEvents.filter(e => e.type === 'message'); if (m.length === 2) { clearInterval(t); r(m[1]); } }, 10); })")
        .await;
    assert_eq!((bin["kind"].clone(), bin["size"].clone()), (json!("arraybuffer"), json!(2)));
    let shot = Path::new(env!("CARGO_TARGET_TMPDIR")).join("browser-artifacts/console.png");
    browser.screenshot(&tab, &shot).await;
    assert!(std::fs::metadata(&shot).unwrap().len() > 1000, "screenshot is empty");
    browser.eval(&tab, "document.getElementById('disconnect').click(); true").await;
    let closed = browser.eval(&tab, &wait_for("close")).await;
    assert_eq!(
        (closed["code"].clone(), closed["reason"].clone(), closed["wasClean"].clone()),
        (json!(1000), json!("bye"), json!(true))
    );
    let log = browser.eval(&tab, "document.getElementById('log').textContent").await;
    assert!(log.as_str().unwrap().contains("code=1000 reason=\"bye\" wasClean=true"), "{log}");
    browser.close().await;
}

/// Credentials from a real browser page: a token in a cookie, and in a Kubernetes-style
/// subprotocol entry offered beside a real subprotocol (which is the one selected); with
/// `on_refusal = "close"` a bad token gives the page `onopen`, then 4401 and the reason.
#[tokio::test]
async fn browser_credentials_by_cookie_and_subprotocol() {
    const K8S: &str = "base64url.bearer.authorization.k8s.io.";
    let echo = Backend::echo().await;
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, b"page-token-1");
    let hash: String = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    let auth = format!(
        "outbound = \"text\"\nsubprotocols = [\"chat\"]\n{{}}\n[routes.{{}}.auth]\ntype = \"bearer\"\n\
         tokens = [\"page=sha256:{hash}\"]\ncookie = \"wsgate_token\"\nsubprotocol_prefix = \"{K8S}\"\n"
    );
    let route = |name: &str, extra: &str| auth.replacen("{}", extra, 1).replacen("{}", name, 1);
    let gw = Gateway::builder()
        .console()
        .route_with("b", "/b", &echo.target(), &route("b", ""))
        .route_with("bc", "/bc", &echo.target(), &route("bc", "on_refusal = \"close\""))
        .start()
        .await;
    let mut browser = Browser::launch().await;
    let tab = page(&mut browser, &gw).await;
    let echo_once = "{ onopen: (ws) => ws.send('through'), onmessage: (ws) => ws.close(1000, 'done') }";

    // No credential: the HTTP 401 is all a page can see, as 1006.
    let r = scenario(&mut browser, &tab, &gw.url("/b"), echo_once).await;
    assert_eq!(r["events"].as_array().unwrap().last().unwrap(), &close(1006, "", false));
    assert_eq!(echo.accepted(), 0);

    // The cookie of the page's own origin.
    browser.eval(&tab, "document.cookie = 'wsgate_token=page-token-1; path=/'; true").await;
    let r = scenario(&mut browser, &tab, &gw.url("/b"), echo_once).await;
    assert_eq!(r["events"], json!([created(), open(""), text("through"), close(1000, "done", true)]));
    browser.eval(&tab, "document.cookie = 'wsgate_token=; max-age=0; path=/'; true").await;

    // The token as a subprotocol entry, with a real one the route selects.
    let entry = |token: &str| {
        format!("{K8S}{}", base64::Engine::encode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, token))
    };
    let with_protocols = |token: &str| {
        format!(
            "{{ protocols: ['chat', '{}'], onopen: (ws) => ws.send('through'), onmessage: (ws) => ws.close(1000, 'done') }}",
            entry(token)
        )
    };
    let r = scenario(&mut browser, &tab, &gw.url("/b"), &with_protocols("page-token-1")).await;
    assert_eq!(r["events"], json!([created(), open("chat"), text("through"), close(1000, "done", true)]));
    assert_eq!(echo.accepted(), 2);

    // A bad token on an `on_refusal = "close"` route: onopen, then 4401 with the reason.
    let r = scenario(&mut browser, &tab, &gw.url("/bc"), &with_protocols("wrong-token")).await;
    assert_eq!(r["events"], json!([created(), open("chat"), close(4401, "invalid credentials: unknown token", true)]));
    assert_eq!(echo.accepted(), 2, "a refused page reached the backend");
    browser.close().await;
}
