//! `wsgate connect`, the binary as a user runs it: stdio with half-close, --listen over ws and
//! wss, a CONNECT proxy, a real sshd through ProxyCommand, and the error cases' exit codes; each
//! option's effect in `options`, the token carriers and `half_close = false` in `carriers`.

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::support::client::{Connect, ConnectProxy, Sshd};
use crate::support::*;

/// The token carriers (`--token-via`) and a route refusing the control channel.
mod carriers;
/// Each option shown to take effect: `--listen unix:`, mTLS, `--header`, `--subprotocol`,
/// `--ping-secs`, half-close through a TLS backend.
mod options;

/// A service that answers only after reading EOF: it reads everything, then sends it back
/// reversed and closes (what `sort` does, with a check that every byte counted).
async fn answers_after_eof() -> Backend {
    Backend::start(|mut s: TcpStream| async move {
        let mut all = Vec::new();
        if s.read_to_end(&mut all).await.is_ok() {
            all.reverse();
            let _ = s.write_all(&all).await;
            let _ = s.shutdown().await;
        }
    })
    .await
}

/// Half-close end to end: stdin's EOF reaches the backend as EOF (the control channel's
/// `shutdown_write`), and the backend's whole answer, sent after that, comes out of stdout
/// before `wsgate connect` exits 0.
#[tokio::test]
async fn stdio_with_stdin_closed_gets_the_whole_answer() {
    let backend = answers_after_eof().await;
    let gw = Gateway::builder().route("sort", "/sort", &backend.target()).start().await;
    let input = payload(300_000, 1);
    let ran = Connect::new(&gw.url("/sort")).stdio(&input).await;
    assert_eq!(ran.code, Some(0), "stderr: {}", ran.stderr);
    let mut want = input;
    want.reverse();
    assert!(ran.stdout == want, "got {} of {} bytes, or altered; stderr: {}", ran.stdout.len(), want.len(), ran.stderr);
}

/// A backend that speaks first (an SSH or SMTP banner) has its bytes relayed right behind the
/// 101, often in the same read: they arrive whole, at every frame header length.
#[tokio::test]
async fn a_banner_right_behind_the_101_arrives_whole() {
    for (i, len) in [1usize, 125, 126, 1564, 65_535, 70_000].into_iter().enumerate() {
        let banner = payload(len, 20 + i as u64);
        let backend = Backend::say_and_close(banner.clone()).await;
        let gw = Gateway::builder().route("tcp", "/tcp", &backend.target()).start().await;
        for run in 0..3 {
            let ran = Connect::new(&gw.url("/tcp")).stdio(b"").await;
            assert_eq!(ran.code, Some(0), "{len} bytes, run {run}: stderr: {}", ran.stderr);
            assert!(ran.stdout == banner, "{len} bytes, run {run}: got {} bytes, or altered", ran.stdout.len());
        }
    }
}

/// The gateway side of the control channel, driven by a plain WebSocket client: agreed in the
/// 101, `shutdown_write` half-closes the backend, whose reply after its EOF arrives whole,
/// then 1000. Without the header the 101 does not carry it.
#[tokio::test]
async fn the_gateway_agrees_to_the_control_channel_and_half_closes_the_backend() {
    let backend = answers_after_eof().await;
    let gw = Gateway::builder().route("sort", "/sort", &backend.target()).start().await;
    let plain = within("plain upgrade", raw_http(gw.plain, &upgrade_request("/sort", ""))).await;
    assert_eq!(plain.0, 101);
    assert!(!plain.1.to_ascii_lowercase().contains("wsgate-control"), "{}", plain.1);
    let mut request = gw.url("/sort").into_client_request().unwrap();
    request.headers_mut().insert("wsgate-control", "1".parse().unwrap());
    let (mut ws, response) = within("upgrade", tokio_tungstenite::connect_async(request)).await.unwrap();
    assert_eq!(response.headers().get("wsgate-control").map(|v| v.as_bytes()), Some(&b"1"[..]));
    within("send", ws.send(Message::binary(b"hello".to_vec()))).await.unwrap();
    within("control", ws.send(Message::text(r#"{"v":1,"type":"shutdown_write"}"#))).await.unwrap();
    let mut got = Vec::new();
    loop {
        match within("reply", ws.next()).await {
            Some(Ok(Message::Binary(b))) => got.extend_from_slice(&b),
            Some(Ok(Message::Close(Some(f)))) => {
                assert_eq!(u16::from(f.code), 1000, "{f:?}");
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(got, b"olleh");
}

/// With the control channel, a data message after `shutdown_write` and a control this version
/// does not know each end the session with 1003 and a reason of their own, not the route's
/// message-type refusal.
#[tokio::test]
async fn control_violations_close_with_their_own_reason() {
    // Reads to EOF and then holds the connection, so only the client's violation ends a session.
    let backend = Backend::start(|mut s: TcpStream| async move {
        let mut all = Vec::new();
        let _ = s.read_to_end(&mut all).await;
        std::future::pending::<()>().await;
    })
    .await;
    let gw = Gateway::builder().route("hold", "/hold", &backend.target()).start().await;
    let cases: [(&[Message], &str); 2] = [
        (
            &[Message::text(r#"{"v":1,"type":"shutdown_write"}"#), Message::binary(b"late".to_vec())],
            "data message after shutdown_write",
        ),
        (&[Message::text(r#"{"v":1,"type":"resume"}"#)], "unknown control message"),
    ];
    for (messages, reason) in cases {
        let mut request = gw.url("/hold").into_client_request().unwrap();
        request.headers_mut().insert("wsgate-control", "1".parse().unwrap());
        let (mut ws, _) = within("upgrade", tokio_tungstenite::connect_async(request)).await.unwrap();
        for message in messages {
            within("send", ws.send(message.clone())).await.unwrap();
        }
        match within("close", ws.next()).await {
            Some(Ok(Message::Close(Some(f)))) => {
                assert_eq!((u16::from(f.code), f.reason.as_str()), (1003, reason));
            }
            other => panic!("expected a close with {reason:?}, got {other:?}"),
        }
    }
}

/// Sends `data` through a local connection to `addr` and reads the echo back concurrently;
/// returns what came back.
async fn echo_through(addr: std::net::SocketAddr, data: Vec<u8>) -> Vec<u8> {
    let s = within("local connect", TcpStream::connect(addr)).await.unwrap();
    let (mut r, mut w) = s.into_split();
    let len = data.len();
    let writer = tokio::spawn(async move {
        w.write_all(&data).await.unwrap();
        w.shutdown().await.unwrap();
    });
    let mut got = Vec::with_capacity(len);
    within("echo back", r.read_to_end(&mut got)).await.unwrap();
    writer.await.unwrap();
    got
}

/// 100 MB through `--listen` over ws:// to a TCP echo arrive back byte for byte.
#[tokio::test]
async fn listen_carries_100_mb_over_ws() {
    let echo = Backend::echo().await;
    let gw = Gateway::builder().route("tcp", "/tcp", &echo.target()).start().await;
    let local = Connect::new(&gw.url("/tcp")).listen().await;
    let data = payload(100 << 20, 2);
    let got = echo_through(local.addr, data.clone()).await;
    assert!(got == data, "got {} of {} bytes, or altered; log: {}", got.len(), data.len(), local.log());
}

/// 100 MB through `--listen` over wss://, verifying the test CA (`--ca`), byte for byte.
#[tokio::test]
async fn listen_carries_100_mb_over_wss() {
    let echo = Backend::echo().await;
    let gw = Gateway::builder().route("tcp", "/tcp", &echo.target()).tls().start().await;
    let url = format!("wss://localhost:{}/tcp", gw.secure.unwrap().port());
    let local = Connect::new(&url).arg("--ca").arg(&gw.ca_pem_path()).listen().await;
    let data = payload(100 << 20, 3);
    let got = echo_through(local.addr, data.clone()).await;
    assert!(got == data, "got {} of {} bytes, or altered; log: {}", got.len(), data.len(), local.log());
}

/// 50 local connections at once each get a session of their own (50 backend connections) and
/// their own bytes back.
#[tokio::test]
async fn fifty_parallel_local_connections_get_a_session_each() {
    let echo = Backend::echo().await;
    let gw = Gateway::builder().route("tcp", "/tcp", &echo.target()).start().await;
    let local = Connect::new(&gw.url("/tcp")).listen().await;
    let runs = (0..50u64).map(|i| {
        let data = payload(200_000 + i as usize, 100 + i);
        async move { (echo_through(local.addr, data.clone()).await, data) }
    });
    for (i, (got, data)) in futures_util::future::join_all(runs).await.into_iter().enumerate() {
        assert!(got == data, "connection {i}: got {} of {} bytes, or altered", got.len(), data.len());
    }
    assert_eq!(echo.accepted(), 50);
}

/// Through `HTTPS_PROXY` (a CONNECT proxy): the half-close answer over ws, and 20 MB over wss
/// through `--listen`; the proxy saw the tunnels.
#[tokio::test]
async fn https_proxy_carries_stdio_and_listen() {
    let proxy = ConnectProxy::start().await;
    let sorter = answers_after_eof().await;
    let echo = Backend::echo().await;
    let gw = Gateway::builder()
        .route("sort", "/sort", &sorter.target())
        .route("tcp", "/tcp", &echo.target())
        .tls()
        .start()
        .await;
    let input = payload(100_000, 4);
    let ran = Connect::new(&gw.url("/sort")).env("HTTPS_PROXY", &proxy.url()).stdio(&input).await;
    assert_eq!(ran.code, Some(0), "stderr: {}", ran.stderr);
    let mut want = input;
    want.reverse();
    assert!(ran.stdout == want, "got {} of {} bytes", ran.stdout.len(), want.len());
    assert_eq!(proxy.tunnels(), 1);
    let url = format!("wss://localhost:{}/tcp", gw.secure.unwrap().port());
    let local = Connect::new(&url).arg("--ca").arg(&gw.ca_pem_path()).env("https_proxy", &proxy.url()).listen().await;
    let data = payload(20 << 20, 5);
    let got = echo_through(local.addr, data.clone()).await;
    assert!(got == data, "got {} of {} bytes, or altered", got.len(), data.len());
    assert_eq!(proxy.tunnels(), 2);
    // NO_PROXY exempts the gateway's host: no third tunnel.
    let ran =
        Connect::new(&gw.url("/sort")).env("HTTPS_PROXY", &proxy.url()).env("NO_PROXY", "127.0.0.1").stdio(b"ab").await;
    assert_eq!((ran.code, ran.stdout.as_slice()), (Some(0), &b"ba"[..]), "stderr: {}", ran.stderr);
    assert_eq!(proxy.tunnels(), 2);
}

/// Each failure is one line on stderr and an exit code of its own: unreachable gateway (3),
/// wrong CA (4), bad token (5), unknown route (6), backend down (7).
#[tokio::test]
async fn failures_are_one_line_with_distinct_exit_codes() {
    let refusing = RefusingPort::new();
    // The right token, in a file for `--token-file`.
    let token_dir = tempfile::tempdir().unwrap();
    let tokens = token_dir.path().join("tokens");
    std::fs::write(&tokens, "right-token\n").unwrap();
    let wrong_ca = TestCa::new();
    let echo = Backend::echo().await;
    let gw = Gateway::builder()
        .route("tcp", "/tcp", &echo.target())
        .route("down", "/down", &refusing.addr.to_string())
        .route_with("secret", "/secret", &echo.target(), &bearer_route("right-token"))
        .tls()
        .start()
        .await;
    let wss = format!("wss://localhost:{}/tcp", gw.secure.unwrap().port());
    let cases: Vec<(&str, Connect, i32, &str)> = vec![
        ("unreachable", Connect::new(&format!("ws://{}/tcp", refusing.addr)), 3, "gateway unreachable"),
        (
            "wrong CA",
            Connect::new(&wss).arg("--ca").arg(&wrong_ca.dir.path().join("ca.pem").display().to_string()),
            4,
            "TLS with localhost failed",
        ),
        (
            "bad token",
            Connect::new(&gw.url("/secret"))
                .arg("--token-env")
                .arg("WSGATE_TEST_TOKEN")
                .env("WSGATE_TEST_TOKEN", "wrong-token"),
            5,
            "access refused: 401",
        ),
        ("unknown route", Connect::new(&gw.url("/nope")), 6, "route not found: 404"),
        ("backend down", Connect::new(&gw.url("/down")), 7, "backend unavailable"),
    ];
    for (what, connect, code, message) in cases {
        let ran = connect.stdio(b"").await;
        assert_eq!(ran.code, Some(code), "{what}: stderr: {}", ran.stderr);
        let lines: Vec<&str> = ran.stderr.lines().collect();
        assert_eq!(lines.len(), 1, "{what}: one line: {:?}", ran.stderr);
        assert!(lines[0].starts_with("wsgate connect: error: ") && lines[0].contains(message), "{what}: {}", lines[0]);
        assert!(!ran.stderr.contains("wrong-token"), "{what}: the token never reaches stderr");
    }
    // The right token gets through.
    let ran = Connect::new(&gw.url("/secret")).arg("--token-file").arg(&tokens.display().to_string()).stdio(b"").await;
    assert_eq!(ran.code, Some(0), "stderr: {}", ran.stderr);
}

/// A real sshd (Debian's openssh-server, `sshd -i` per connection) behind the gateway: ssh
/// through `ProxyCommand='wsgate connect --stdio …'` logs in and runs a command, and scp of
/// 50 MB arrives byte for byte.
#[tokio::test]
async fn ssh_and_scp_through_proxy_command() {
    let sshd = Sshd::start().await;
    let gw = Gateway::builder().route("ssh", "/ssh", &sshd.backend.target()).start().await;
    let options = sshd.options(&gw.url("/ssh"));
    let remote = format!("{}@wsgate-test", sshd.user);
    let out = within(
        "ssh",
        tokio::process::Command::new("ssh").args(&options).arg(&remote).arg("echo hello from $0 via sshd").output(),
    )
    .await
    .unwrap();
    assert!(out.status.success(), "ssh failed: {}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("hello from "), "{:?}", out);
    let (src, dst) = (sshd.dir.path().join("src.bin"), sshd.dir.path().join("dst.bin"));
    let data = payload(50 << 20, 6);
    std::fs::write(&src, &data).unwrap();
    let out = within(
        "scp",
        tokio::process::Command::new("scp")
            .args(&options)
            .arg(&src)
            .arg(format!("{remote}:{}", dst.display()))
            .output(),
    )
    .await
    .unwrap();
    assert!(out.status.success(), "scp failed: {}", String::from_utf8_lossy(&out.stderr));
    let copied = std::fs::read(&dst).unwrap();
    assert!(copied == data, "scp copied {} of {} bytes, or altered", copied.len(), data.len());
}

/// The route table of a bearer route taking `token` in `Authorization`.
fn bearer_route(token: &str) -> String {
    use aws_lc_rs::digest::{SHA256, digest};
    let hex: String = digest(&SHA256, token.as_bytes()).as_ref().iter().map(|b| format!("{b:02x}")).collect();
    format!("[routes.secret.auth]\ntype = \"bearer\"\ntokens = [\"ops=sha256:{hex}\"]\n")
}

/// `--listen` while the gateway is unreachable: a new local connection waits, the dial is
/// retried with backoff, and once the gateway's address answers (here a forwarder that starts
/// listening after the first failed dial was logged) the connection gets its session and its
/// bytes back.
#[tokio::test]
async fn listen_retries_while_the_gateway_is_unreachable() {
    let echo = Backend::echo().await;
    let gw = Gateway::builder().route("tcp", "/tcp", &echo.target()).start().await;
    let later = RefusingPort::new();
    let local = Connect::new(&format!("ws://{}/tcp", later.addr)).env("RUST_LOG", "info").listen().await;
    let data = payload(100_000, 7);
    let sent = data.clone();
    let client = tokio::spawn(echo_through(local.addr, sent));
    local.logged("gateway unreachable").await;
    assert!(!client.is_finished(), "the local connection waits while the gateway is down");
    // The gateway's address comes up: a forwarder to the gateway on the refusing port.
    let listener = later.listen();
    let gateway = gw.plain;
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut up = TcpStream::connect(gateway).await.unwrap();
                let _ = tokio::io::copy_bidirectional(&mut s, &mut up).await;
            });
        }
    });
    let got = within("the echo after the retry", client).await.unwrap();
    assert!(got == data, "got {} of {} bytes, or altered", got.len(), data.len());
}

/// `--fail-fast`: a local connection is closed at once when the gateway cannot be reached, and
/// the failure is one warning line.
#[tokio::test]
async fn fail_fast_closes_the_local_connection_at_once() {
    let down = RefusingPort::new();
    let local = Connect::new(&format!("ws://{}/tcp", down.addr)).arg("--fail-fast").listen().await;
    let mut s = within("local connect", TcpStream::connect(local.addr)).await.unwrap();
    let mut buf = [0u8; 16];
    // Within the bound, well before --connect-timeout-secs (10 s) of retries would end.
    let n = tokio::time::timeout(std::time::Duration::from_secs(5), s.read(&mut buf))
        .await
        .expect("closed at once, not after retries")
        .unwrap_or(0);
    assert_eq!(n, 0);
    local.logged("gateway unreachable").await;
}
