use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{CloseCode, Data, OpCode};

use crate::support::*;

/// Backend EOF: every byte the backend sent is delivered first, then Close 1000 with a reason,
/// and the closing handshake completes cleanly.
#[tokio::test]
async fn backend_eof_delivers_everything_then_1000() {
    let data = payload(300_000, 10);
    let backend = Backend::say_and_close(data.clone()).await;
    let gw = Gateway::builder().route("tcp", "/tcp", &backend.target()).start().await;
    let mut ws = gw.ws("/tcp").await;
    let (got, code, reason) = read_until_close(&mut ws).await;
    assert!(got == data, "got {} of {} bytes, or altered", got.len(), data.len());
    assert_eq!((code, reason.as_str()), (1000, "backend closed the connection"));
    expect_end(&mut ws).await;
}

/// Client Close: wsgate answers with the client's code at once, the backend sees EOF after
/// every byte sent before the close, and the backend's later bytes do not reach the client.
#[tokio::test]
async fn client_close_is_answered_and_half_closes_the_backend() {
    let (backend, mut received) = Backend::sink().await;
    let gw = Gateway::builder().route("tcp", "/tcp", &backend.target()).start().await;
    let mut ws = gw.ws("/tcp").await;
    let data = payload(50_000, 11);
    send_binary(&mut ws, &data).await;
    within("close", ws.close(Some(CloseFrame { code: CloseCode::Normal, reason: "bye".into() }))).await.unwrap();
    match within("close reply", ws.next()).await {
        Some(Ok(Message::Close(Some(f)))) => assert_eq!(u16::from(f.code), 1000),
        other => panic!("expected the close reply, got {other:?}"),
    }
    expect_end(&mut ws).await;
    let seen = within("backend EOF", received.recv()).await.unwrap();
    assert!(seen == data, "backend saw {} of {} bytes", seen.len(), data.len());
}

/// A backend that streams without pause does not delay the answer to a client's Close: the
/// reply comes at once, and the backend is told (EOF on its read side).
#[tokio::test]
async fn client_close_while_backend_streams() {
    let (eof_tx, mut eof_rx) = tokio::sync::mpsc::unbounded_channel();
    let backend = Backend::start(move |s: TcpStream| {
        let eof_tx = eof_tx.clone();
        async move {
            let (mut r, mut w) = s.into_split();
            let writer = tokio::spawn(async move {
                let chunk = vec![7u8; 16 * 1024];
                while w.write_all(&chunk).await.is_ok() {}
            });
            let mut buf = [0u8; 1024];
            while let Ok(1..) = r.read(&mut buf).await {}
            let _ = eof_tx.send(());
            writer.abort();
        }
    })
    .await;
    let gw = Gateway::builder().route("tcp", "/tcp", &backend.target()).start().await;
    let mut ws = gw.ws("/tcp").await;
    read_at_least(&mut ws, 100_000).await;
    within("close", ws.send(Message::Close(Some(CloseFrame { code: CloseCode::Away, reason: "".into() }))))
        .await
        .unwrap();
    let reply = loop {
        match within("close reply", ws.next()).await {
            Some(Ok(Message::Binary(_))) => continue, // in flight before our close
            Some(Ok(Message::Close(f))) => break f,
            other => panic!("expected the close reply, got {other:?}"),
        }
    };
    assert_eq!(reply.map(|f| u16::from(f.code)), Some(1001));
    within("backend sees EOF", eof_rx.recv()).await.unwrap();
}

/// Backend down, default route setting: the upgrade completes and the session closes at once
/// with 1013 and a reason that says why (and names no address).
#[tokio::test]
async fn backend_down_closes_in_band_with_1013() {
    let dead = RefusingPort::new();
    let gw = Gateway::builder().route("tcp", "/tcp", &dead.addr.to_string()).start().await;
    let mut ws = gw.ws("/tcp").await;
    let (data, code, reason) = read_until_close(&mut ws).await;
    assert!(data.is_empty());
    assert_eq!((code, reason.as_str()), (1013, "backend unavailable: connection refused"));
    expect_end(&mut ws).await;
}

/// Backend down with `on_backend_unavailable = "http"`: the upgrade is refused with 502.
#[tokio::test]
async fn backend_down_refuses_with_502_when_configured() {
    let dead = RefusingPort::new();
    let gw = Gateway::builder()
        .route_with("tcp", "/tcp", &dead.addr.to_string(), "on_backend_unavailable = \"http\"")
        .start()
        .await;
    let (status, _, body) = raw_http(gw.plain, &upgrade_request("/tcp", "")).await;
    assert_eq!(status, 502);
    assert!(body.contains("backend unavailable: connection refused"), "{body}");
}

/// A backend that resets its connection mid-session: the data before the reset is delivered,
/// then 1011 with the reason.
#[tokio::test]
async fn backend_reset_mid_session_gives_1011() {
    let (backend, reset) = backend_writing_then(b"hello", Then::Reset).await;
    let gw = Gateway::builder().route("tcp", "/tcp", &backend.target()).start().await;
    let mut ws = gw.ws("/tcp").await;
    // The reset comes once "hello" has reached the client, so it cannot overtake those bytes.
    let hello = read_bytes(&mut ws, 5).await;
    reset.notify_one();
    let (rest, code, reason) = read_until_close(&mut ws).await;
    assert_eq!([hello, rest].concat(), b"hello");
    assert_eq!((code, reason.as_str()), (1011, "backend error: connection reset"));
}

/// What [`backend_writing_then`] does once signalled.
enum Then {
    /// Closes with SO_LINGER 0, so the close sends RST instead of FIN.
    Reset,
    /// Writes these bytes, then reads until the gateway closes.
    Write(&'static [u8]),
}

/// A backend whose connections write `first`, wait for the returned signal, then do `then`: so a
/// test can let the client receive `first` before what follows is sent.
async fn backend_writing_then(first: &'static [u8], then: Then) -> (Backend, std::sync::Arc<tokio::sync::Notify>) {
    let signal = std::sync::Arc::new(tokio::sync::Notify::new());
    let waiter = signal.clone();
    let then = std::sync::Arc::new(then);
    let backend = Backend::start(move |mut s: TcpStream| {
        let (waiter, then) = (waiter.clone(), then.clone());
        async move {
            s.write_all(first).await.unwrap();
            waiter.notified().await;
            match *then {
                Then::Reset => {
                    s.set_zero_linger().unwrap();
                    drop(s);
                }
                Then::Write(more) => {
                    s.write_all(more).await.unwrap();
                    let mut sink = Vec::new();
                    let _ = s.read_to_end(&mut sink).await;
                }
            }
        }
    })
    .await;
    (backend, signal)
}

/// Gateway shutdown: every session, bridged or echo, gets 1001, and `run` returns.
#[tokio::test]
async fn shutdown_closes_every_session_with_1001() {
    let echo = Backend::echo().await;
    let mut gw =
        Gateway::builder().route("tcp", "/tcp", &echo.target()).route("echo", "/echo", "builtin:echo").start().await;
    let mut sessions = Vec::new();
    for i in 0..10 {
        let mut ws = gw.ws(if i % 2 == 0 { "/tcp" } else { "/echo" }).await;
        // Prove each session is live before the shutdown.
        send_binary(&mut ws, b"ping").await;
        read_bytes(&mut ws, 4).await;
        sessions.push(ws);
    }
    gw.shutdown.now();
    for ws in &mut sessions {
        let (_, code, reason) = read_until_close(ws).await;
        assert_eq!((code, reason.as_str()), (1001, "gateway shutting down"));
        expect_end(ws).await;
    }
    gw.stop().await;
    assert!(gw.is_finished());
}

/// A message over `max_message_bytes` ends the session with 1009 and the limit in the reason;
/// nothing of it reaches the backend.
#[tokio::test]
async fn message_too_big_gives_1009_naming_the_limit() {
    let (backend, mut received) = Backend::sink().await;
    let gw =
        Gateway::builder().route("tcp", "/tcp", &backend.target()).limit("max_message_bytes", "4096").start().await;
    let mut ws = gw.ws("/tcp").await;
    send_binary(&mut ws, &payload(4096, 1)).await; // exactly the limit: fine
    let _ = ws.send(Message::Binary(payload(5000, 2).into())).await;
    let (_, code, reason) = read_until_close(&mut ws).await;
    assert_eq!((code, reason.as_str()), (1009, "message too big: limit is 4096 bytes"));
    let seen = within("backend EOF", received.recv()).await.unwrap();
    assert_eq!(seen.len(), 4096, "only the message within the limit reaches the backend");
}

/// A text frame that is not UTF-8 ends the session with 1007.
#[tokio::test]
async fn invalid_utf8_text_gives_1007() {
    let echo = Backend::echo().await;
    let gw = Gateway::builder().route("tcp", "/tcp", &echo.target()).start().await;
    let mut ws = gw.ws("/tcp").await;
    let bad = Frame::message(vec![b'a', 0xff, 0xfe], OpCode::Data(Data::Text), true);
    within("send", ws.send(Message::Frame(bad))).await.unwrap();
    let (_, code, _) = read_until_close(&mut ws).await;
    assert_eq!(code, 1007);
}

/// A protocol violation (a continuation frame with nothing to continue) ends the session with
/// 1002.
#[tokio::test]
async fn protocol_violation_gives_1002() {
    let echo = Backend::echo().await;
    let gw = Gateway::builder().route("tcp", "/tcp", &echo.target()).start().await;
    let mut ws = gw.ws("/tcp").await;
    let stray = Frame::message(b"x".to_vec(), OpCode::Data(Data::Continue), true);
    within("send", ws.send(Message::Frame(stray))).await.unwrap();
    let (_, code, reason) = read_until_close(&mut ws).await;
    assert_eq!(code, 1002, "{reason}");
    assert!(reason.starts_with("protocol error"), "{reason}");
}

/// Backend bytes that are not UTF-8 on a text route end the session with 1011, after the valid
/// text before them was delivered.
#[tokio::test]
async fn non_utf8_backend_bytes_on_text_route_give_1011() {
    let (backend, bad_bytes) = backend_writing_then(b"fine\n", Then::Write(b"\xff\xfe")).await;
    let gw = Gateway::builder().route_with("t", "/t", &backend.target(), "outbound = \"text\"").start().await;
    let mut ws = gw.ws("/t").await;
    // The bad bytes follow once the valid text has reached the client: a read of their own.
    let fine = read_bytes(&mut ws, 5).await;
    bad_bytes.notify_one();
    let (rest, code, reason) = read_until_close(&mut ws).await;
    assert_eq!([fine, rest].concat(), b"fine\n");
    assert_eq!((code, reason.as_str()), (1011, "backend sent bytes that are not UTF-8 on a text route"));
}

/// Pings from the client are answered with pongs carrying the same payload, on bridged routes.
#[tokio::test]
async fn pings_are_answered_on_bridged_routes() {
    let echo = Backend::echo().await;
    let gw = Gateway::builder().route("tcp", "/tcp", &echo.target()).start().await;
    let mut ws = gw.ws("/tcp").await;
    within("ping", ws.send(Message::Ping(b"are you there".to_vec().into()))).await.unwrap();
    match within("pong", ws.next()).await {
        Some(Ok(Message::Pong(p))) => assert_eq!(&p[..], b"are you there"),
        other => panic!("expected pong, got {other:?}"),
    }
}

/// A backend whose connections wait for a signal, then end: with FIN (`reset = false`) or RST.
async fn backend_ending_on_signal(reset: bool) -> (Backend, tokio::sync::broadcast::Sender<()>) {
    let (tx, _) = tokio::sync::broadcast::channel::<()>(4);
    let tx2 = tx.clone();
    let backend = Backend::start(move |mut s: TcpStream| {
        let mut signal = tx2.subscribe();
        async move {
            s.write_all(b"ready").await.unwrap();
            let _ = signal.recv().await;
            if reset {
                s.set_zero_linger().unwrap();
                drop(s);
            } else {
                s.shutdown().await.unwrap();
                let mut rest = Vec::new();
                let _ = s.read_to_end(&mut rest).await;
            }
        }
    })
    .await;
    (backend, tx)
}

/// Client Close and backend EOF at the same instant, many times: each session ends exactly once.
/// The client gets one close frame (its own code echoed, or 1000 if the backend won), never a
/// second one and never a protocol error, and the connection then ends cleanly.
#[tokio::test]
async fn simultaneous_close_from_both_sides_ends_once() {
    for reset in [false, true] {
        let (backend, signal) = backend_ending_on_signal(reset).await;
        let gw = Gateway::builder().route("tcp", "/tcp", &backend.target()).start().await;
        for round in 0..20 {
            let mut ws = gw.ws("/tcp").await;
            assert_eq!(read_bytes(&mut ws, 5).await, b"ready");
            let close = Message::Close(Some(CloseFrame { code: CloseCode::from(4001), reason: "client".into() }));
            let (sent, fired) = tokio::join!(ws.send(close), async { signal.send(()) });
            sent.unwrap();
            fired.unwrap();
            let mut closes = Vec::new();
            loop {
                match within("end of session", ws.next()).await {
                    Some(Ok(Message::Close(f))) => closes.push(f.map(|f| u16::from(f.code))),
                    Some(Ok(other)) => panic!("round {round}: unexpected {other:?}"),
                    Some(Err(e)) => {
                        panic!("round {round} (reset={reset}): error instead of a clean end: {e}")
                    }
                    None => break,
                }
            }
            assert_eq!(closes.len(), 1, "round {round} (reset={reset}): close frames {closes:?}");
            let allowed: &[u16] = if reset { &[4001, 1011] } else { &[4001, 1000] };
            assert!(allowed.contains(&closes[0].unwrap()), "round {round} (reset={reset}): {closes:?}");
        }
    }
}

/// A route that accepts only binary ends a session that sends text with 1003; nothing of the
/// text reaches the backend.
#[tokio::test]
async fn refused_message_type_gives_1003() {
    let (sink, mut received) = Backend::sink().await;
    let gw = Gateway::builder().route_with("bin", "/bin", &sink.target(), "accept = [\"binary\"]").start().await;
    let mut ws = gw.ws("/bin").await;
    send_binary(&mut ws, b"ok").await;
    within("send", ws.send(Message::text("not here"))).await.unwrap();
    let (_, code, reason) = read_until_close(&mut ws).await;
    assert_eq!((code, reason.as_str()), (1003, "text messages are not accepted on this route"));
    expect_end(&mut ws).await;
    assert_eq!(within("backend EOF", received.recv()).await.unwrap(), b"ok");
}

/// docs/close-codes.md matches the code: every close code its session table documents is
/// produced over real sockets by the scenario that table names, and no other.
#[tokio::test]
async fn every_documented_close_code_is_produced() {
    let doc =
        std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/close-codes.md")).unwrap();
    let section =
        doc.split("## After the upgrade").nth(1).expect("session table section").split("\n## ").next().unwrap();
    let mut documented: Vec<u16> = section
        .lines()
        .filter(|l| l.starts_with("| `"))
        .filter_map(|l| l.split('|').nth(4)?.trim().parse().ok())
        .collect();
    documented.sort();
    documented.dedup();
    assert!(documented.len() >= 8, "parsed only {documented:?} from docs/close-codes.md");

    let dead = RefusingPort::new();
    let eof = Backend::say_and_close(b"x".to_vec()).await;
    let (reset, reset_now) = backend_writing_then(b"x", Then::Reset).await;
    let (sink, _rx) = Backend::sink().await;
    // Credentials refused in band (`on_refusal = "close"`): an HS256 route whose tokens must
    // name it in `routes`, and a guard that blocks after one failure.
    let keys = tempfile::tempdir().unwrap();
    let secret = b"0123456789abcdef0123456789abcdef";
    std::fs::write(keys.path().join("hs256.key"), secret).unwrap();
    let auth = format!(
        "on_refusal = \"close\"\n[routes.auth.auth]\ntype = \"jwt\"\nalgorithms = [\"HS256\"]\nkeys = [{:?}]\n\
         routes_claim = \"routes\"\n",
        keys.path().join("hs256.key").display().to_string()
    );
    let mut gw = Gateway::builder()
        .route_with("auth", "/auth", &sink.target(), &auth)
        .limit("per_client.max_auth_failures", "1")
        .route("eof", "/eof", &eof.target())
        .route("reset", "/reset", &reset.target())
        .route("down", "/down", &dead.addr.to_string())
        .route("sink", "/sink", &sink.target())
        .route_with("bin", "/bin", &sink.target(), "accept = [\"binary\"]")
        .limit("max_message_bytes", "4096")
        .limit("max_messages_per_sec", "50")
        .start()
        .await;
    let mut produced = Vec::new();
    let code_of = async |path: &str, send: Option<Message>| {
        let mut ws = gw.ws(path).await;
        if let Some(m) = send {
            let _ = ws.send(m).await;
        }
        let code = read_until_close(&mut ws).await.1;
        expect_end(&mut ws).await;
        code
    };
    produced.push(code_of("/eof", None).await);
    let exp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() + 600;
    let elsewhere = jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &serde_json::json!({"exp": exp, "routes": "other"}),
        &jsonwebtoken::EncodingKey::from_secret(secret).unwrap(),
    )
    .unwrap();
    let code_with = async |token: &str| {
        let mut ws = gw.ws_with("/auth", &[("authorization", &format!("Bearer {token}"))]).await.unwrap();
        let code = read_until_close(&mut ws).await.1;
        expect_end(&mut ws).await;
        code
    };
    // 4403 first: a valid token is no failure; then a bad one (4401) blocks this address (4429).
    produced.push(code_with(&elsewhere).await);
    produced.push(code_with("not-a-jwt").await);
    produced.push(code_with(&elsewhere).await);
    // The reset comes once the client has the backend's byte, as in the test above.
    let mut ws = gw.ws("/reset").await;
    assert_eq!(read_bytes(&mut ws, 1).await, b"x");
    reset_now.notify_one();
    produced.push(read_until_close(&mut ws).await.1);
    expect_end(&mut ws).await;
    produced.push(code_of("/down", None).await);
    produced.push(
        code_of("/sink", Some(Message::Frame(Frame::message(b"x".to_vec(), OpCode::Data(Data::Continue), true)))).await,
    );
    produced.push(code_of("/bin", Some(Message::text("t"))).await);
    produced
        .push(code_of("/sink", Some(Message::Frame(Frame::message(vec![0xff], OpCode::Data(Data::Text), true)))).await);
    produced.push(code_of("/sink", Some(Message::Binary(vec![0; 5000].into()))).await);
    // More messages in a second than max_messages_per_sec.
    let mut ws = gw.ws("/sink").await;
    for _ in 0..200 {
        within("send", ws.send(Message::Binary(vec![1].into()))).await.unwrap();
    }
    produced.push(read_until_close(&mut ws).await.1);
    expect_end(&mut ws).await;
    let mut open = gw.ws("/sink").await;
    gw.shutdown.now();
    produced.push(read_until_close(&mut open).await.1);
    expect_end(&mut open).await;
    gw.stop().await;
    produced.sort();
    produced.dedup();
    assert_eq!(produced, documented, "codes produced vs. codes in docs/close-codes.md");
}
