use futures_util::SinkExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

use crate::support::*;

/// The seed's `new ArrayBuffer(10000000)`: one 10,000,000-byte binary message through the
/// bridge to a TCP echo and back, byte for byte, over ws.
#[tokio::test]
async fn ten_megabyte_message_round_trips_over_ws() {
    let echo = Backend::echo().await;
    let gw = Gateway::builder().route("tcp", "/tcp", &echo.target()).start().await;
    let mut ws = gw.ws("/tcp").await;
    let data = payload(10_000_000, 1);
    send_binary(&mut ws, &data).await;
    let back = read_bytes(&mut ws, data.len()).await;
    assert!(back == data, "10 MB payload came back altered");
}

/// The same over wss, with a certificate from a test CA verified by a rustls client.
#[tokio::test]
async fn ten_megabyte_message_round_trips_over_wss() {
    let echo = Backend::echo().await;
    let gw = Gateway::builder().tls().route("tcp", "/tcp", &echo.target()).start().await;
    let mut ws = gw.wss("/tcp").await;
    let data = payload(10_000_000, 2);
    send_binary(&mut ws, &data).await;
    let back = read_bytes(&mut ws, data.len()).await;
    assert!(back == data, "10 MB payload came back altered over wss");
}

/// Text messages become their UTF-8 bytes on the TCP stream; the backend's bytes come back as
/// binary messages by default.
#[tokio::test]
async fn text_messages_reach_the_backend_as_utf8_bytes() {
    let echo = Backend::echo().await;
    let gw = Gateway::builder().route("tcp", "/tcp", &echo.target()).start().await;
    let mut ws = gw.ws("/tcp").await;
    let text = "héllo wörld — ✓";
    within("send", ws.send(Message::text(text))).await.unwrap();
    let back = read_bytes(&mut ws, text.len()).await;
    assert_eq!(back, text.as_bytes());
}

/// 100 concurrent sessions, each with its own random payload in several messages, all come back
/// intact and unmixed.
#[tokio::test]
async fn hundred_concurrent_sessions_stay_separate() {
    let echo = Backend::echo().await;
    let gw = std::sync::Arc::new(Gateway::builder().route("tcp", "/tcp", &echo.target()).start().await);
    let mut tasks = Vec::new();
    for i in 0..100u64 {
        let gw = gw.clone();
        tasks.push(tokio::spawn(async move {
            let mut ws = gw.ws("/tcp").await;
            let data = payload(20_000 + i as usize * 97, 100 + i);
            for chunk in data.chunks(7_000) {
                send_binary(&mut ws, chunk).await;
            }
            let back = read_bytes(&mut ws, data.len()).await;
            assert!(back == data, "session {i} got bytes that are not its own");
        }));
    }
    for t in tasks {
        within("session task", t).await.unwrap();
    }
    assert_eq!(echo.accepted(), 100);
}

/// A client message larger than one backend read comes back as several messages whose joined
/// bytes are the original, each no larger than `backend_read_bytes`.
#[tokio::test]
async fn backend_reads_become_bounded_messages() {
    let echo = Backend::echo().await;
    let gw = Gateway::builder().route("tcp", "/tcp", &echo.target()).limit("backend_read_bytes", "4096").start().await;
    let mut ws = gw.ws("/tcp").await;
    let data = payload(100_000, 3);
    send_binary(&mut ws, &data).await;
    let mut got = Vec::new();
    while got.len() < data.len() {
        match within("data", futures_util::StreamExt::next(&mut ws)).await {
            Some(Ok(Message::Binary(b))) => {
                assert!(b.len() <= 4096, "message of {} bytes exceeds backend_read_bytes", b.len());
                got.extend_from_slice(&b);
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(got == data);
}

/// On a text route, backend bytes arrive as text messages; a UTF-8 sequence split across two
/// backend writes is carried over, never broken.
#[tokio::test]
async fn text_route_carries_split_utf8_sequences() {
    // The backend sends the first byte of "€", then waits until the client has received the text
    // before it, so the two halves of the character surely arrive in different reads.
    let go_on = std::sync::Arc::new(tokio::sync::Notify::new());
    let resume = go_on.clone();
    let backend = Backend::start(move |mut s: tokio::net::TcpStream| {
        let resume = resume.clone();
        async move {
            use tokio::io::AsyncWriteExt;
            let euro = "€".as_bytes();
            s.write_all(b"price: ").await.unwrap();
            s.write_all(&euro[..1]).await.unwrap();
            resume.notified().await;
            s.write_all(&euro[1..]).await.unwrap();
            s.write_all(b"5").await.unwrap();
            s.shutdown().await.unwrap();
        }
    })
    .await;
    let gw = Gateway::builder().route_with("t", "/t", &backend.target(), "outbound = \"text\"").start().await;
    let mut ws = gw.ws("/t").await;
    // The text before the cut character arrives alone: the lone lead byte was carried, not sent.
    match within("first text", futures_util::StreamExt::next(&mut ws)).await {
        Some(Ok(Message::Text(t))) => assert_eq!(t.as_str(), "price: "),
        other => panic!("expected the text before the cut character, got {other:?}"),
    }
    go_on.notify_one();
    let mut text = String::from("price: ");
    loop {
        match within("text", futures_util::StreamExt::next(&mut ws)).await {
            Some(Ok(Message::Text(t))) => text.push_str(&t),
            Some(Ok(Message::Close(Some(f)))) => {
                assert_eq!(u16::from(f.code), 1000);
                break;
            }
            other => panic!("expected text messages then close, got {other:?}"),
        }
    }
    assert_eq!(text, "price: €5");
}

/// `outbound = "mirror"`: backend bytes come back as the type the client last sent.
#[tokio::test]
async fn mirror_route_answers_in_the_clients_type() {
    use futures_util::StreamExt;
    let echo = Backend::echo().await;
    let gw = Gateway::builder().route_with("m", "/m", &echo.target(), "outbound = \"mirror\"").start().await;
    let mut ws = gw.ws("/m").await;
    within("send", ws.send(Message::text("as text"))).await.unwrap();
    assert_eq!(within("echo", ws.next()).await.unwrap().unwrap(), Message::text("as text"));
    send_binary(&mut ws, b"as binary").await;
    assert_eq!(within("echo", ws.next()).await.unwrap().unwrap(), Message::Binary(b"as binary".to_vec().into()));
    within("send", ws.send(Message::text("text again"))).await.unwrap();
    assert_eq!(within("echo", ws.next()).await.unwrap().unwrap(), Message::text("text again"));
}

/// Backend reads larger than the client message limit still reach the client: the limit bounds
/// what clients send, not what wsgate sends them.
#[tokio::test]
async fn large_backend_reads_with_a_small_message_limit() {
    let data = payload(3 << 20, 8);
    let backend = Backend::say_and_close(data.clone()).await;
    let gw = Gateway::builder()
        .route("big", "/big", &backend.target())
        .limit("max_message_bytes", "1024")
        .limit("backend_read_bytes", "1048576")
        .start()
        .await;
    let mut ws = gw.ws("/big").await;
    let (got, code, _) = read_until_close(&mut ws).await;
    assert_eq!(code, 1000);
    assert!(got == data, "got {} of {} bytes", got.len(), data.len());
}

/// Small messages that arrive together leave in one backend write: a client that writes 1,000
/// ten-byte messages in one burst makes the session hold them as one batch (its peak buffered
/// bytes are far above one message, yet within `ws_read_buffer_bytes`), while every message is
/// still counted and every byte reaches the backend in order. A message too large to join a
/// batch goes on its own, after the ones before it; the Close frame that ends the burst is
/// honoured only after everything sent before it was written.
#[tokio::test]
async fn small_messages_sent_together_reach_the_backend_in_one_write() {
    let (sink, mut received) = Backend::sink().await;
    let gw = Gateway::builder().route("tcp", "/tcp", &sink.target()).start().await;
    let small = |i: usize| payload(10, i as u64);
    let bursts = [
        (0..1000).map(small).collect::<Vec<_>>(),
        (0..500).map(small).chain([payload(100_000, 7)]).chain((500..510).map(small)).collect(),
    ];
    for messages in &bursts {
        let mut tcp = within("connect", TcpStream::connect(gw.plain)).await.unwrap();
        tcp.write_all(upgrade_request("/tcp", "").as_bytes()).await.unwrap();
        let mut head = vec![0u8; 4096];
        let n = within("101", tcp.read(&mut head)).await.unwrap();
        assert!(head[..n].starts_with(b"HTTP/1.1 101"), "{}", String::from_utf8_lossy(&head[..n]));
        // One write: every frame, then a Close (1000), so they arrive together.
        let mut burst: Vec<u8> = messages.iter().flat_map(|m| masked_frame(0x2, m)).collect();
        burst.extend(masked_frame(0x8, &1000u16.to_be_bytes()));
        within("burst", tcp.write_all(&burst)).await.unwrap();
        let mut rest = Vec::new();
        within("the gateway's close", tcp.read_to_end(&mut rest)).await.unwrap();
        let got = within("backend bytes", received.recv()).await.unwrap();
        assert!(got == messages.concat(), "backend bytes lost, reordered or duplicated");
    }
    let dir = [("route", "tcp"), ("direction", "to_backend")];
    eventually("both sessions ended", || async {
        scrape(&gw, "wsgate_sessions_total", &[("route", "tcp")]).await == 2.0
    })
    .await;
    assert_eq!(scrape(&gw, "wsgate_messages_total", &dir).await, 1511.0, "every message counted");
    let peak = |le: &'static str| {
        let gw = &gw;
        async move {
            scrape(
                gw,
                "wsgate_session_peak_buffered_bytes_bucket",
                &[("route", "tcp"), ("direction", "to_backend"), ("le", le)],
            )
            .await
        }
    };
    assert_eq!(peak("1024").await, 0.0, "the first session held its small messages as one batch");
    assert_eq!(
        peak("65536").await,
        1.0,
        "a batch stays within ws_read_buffer_bytes; the 100,000-byte message went alone"
    );
}

/// A client frame: FIN set, `opcode`, masked with a fixed key.
fn masked_frame(opcode: u8, data: &[u8]) -> Vec<u8> {
    let mask = [0x12, 0x34, 0x56, 0x78];
    let mut f = vec![0x80 | opcode];
    match data.len() {
        n if n < 126 => f.push(0x80 | n as u8),
        n if n <= 0xffff => {
            f.push(0x80 | 126);
            f.extend((n as u16).to_be_bytes());
        }
        n => {
            f.push(0x80 | 127);
            f.extend((n as u64).to_be_bytes());
        }
    }
    f.extend(mask);
    f.extend(data.iter().zip(mask.iter().cycle()).map(|(b, m)| b ^ m));
    f
}
