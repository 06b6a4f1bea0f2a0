use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};

use crate::support::*;

async fn next_message(ws: &mut Ws) -> Message {
    match within("echo", ws.next()).await {
        Some(Ok(m)) => m,
        other => panic!("expected a message, got {other:?}"),
    }
}

/// Text comes back as text and binary as binary, each as the same single message, with no
/// greeting first.
#[tokio::test]
async fn echo_returns_each_message_with_its_type() {
    let gw = Gateway::builder().route("echo", "/echo", "builtin:echo").start().await;
    let mut ws = gw.ws("/echo").await;
    within("send", ws.send(Message::text("Hello, world!"))).await.unwrap();
    assert_eq!(next_message(&mut ws).await, Message::text("Hello, world!"));
    let bin = payload(70_000, 5);
    send_binary(&mut ws, &bin).await;
    assert_eq!(next_message(&mut ws).await, Message::Binary(bin.into()));
    within("send", ws.send(Message::text(""))).await.unwrap();
    assert_eq!(next_message(&mut ws).await, Message::text(""));
}

/// A fragmented text message (three frames) comes back as one text message; likewise binary.
#[tokio::test]
async fn echo_reassembles_fragmented_messages() {
    let gw = Gateway::builder().route("echo", "/echo", "builtin:echo").start().await;
    let mut ws = gw.ws("/echo").await;
    for frame in [
        Frame::message(b"frag".to_vec(), OpCode::Data(Data::Text), false),
        Frame::message(b"men".to_vec(), OpCode::Data(Data::Continue), false),
        Frame::message("ted ✓".as_bytes().to_vec(), OpCode::Data(Data::Continue), true),
    ] {
        within("send frame", ws.send(Message::Frame(frame))).await.unwrap();
    }
    assert_eq!(next_message(&mut ws).await, Message::text("fragmented ✓"));
    for frame in [
        Frame::message(vec![1, 2], OpCode::Data(Data::Binary), false),
        Frame::message(vec![3], OpCode::Data(Data::Continue), true),
    ] {
        within("send frame", ws.send(Message::Frame(frame))).await.unwrap();
    }
    assert_eq!(next_message(&mut ws).await, Message::Binary(vec![1, 2, 3].into()));
}

/// The seed's example: ten megabytes in one binary message come back whole, and a ping
/// interleaved with a fragmented message is answered.
#[tokio::test]
async fn echo_handles_big_messages_and_pings_between_fragments() {
    let gw = Gateway::builder().route("echo", "/echo", "builtin:echo").start().await;
    let mut ws = gw.ws("/echo").await;
    let big = payload(10_000_000, 6);
    send_binary(&mut ws, &big).await;
    match next_message(&mut ws).await {
        Message::Binary(b) => assert!(b[..] == big[..], "10 MB echo altered"),
        other => panic!("expected binary, got {other:?}"),
    }
    within("send", ws.send(Message::Frame(Frame::message(b"a".to_vec(), OpCode::Data(Data::Text), false))))
        .await
        .unwrap();
    within("ping", ws.send(Message::Ping(b"p".to_vec().into()))).await.unwrap();
    assert_eq!(next_message(&mut ws).await, Message::Pong(b"p".to_vec().into()));
    within("send", ws.send(Message::Frame(Frame::message(b"b".to_vec(), OpCode::Data(Data::Continue), true))))
        .await
        .unwrap();
    assert_eq!(next_message(&mut ws).await, Message::text("ab"));
}

/// A client Close is echoed with the client's code, and a close with an invalid code (1005 may
/// never be sent) is answered with 1002, as RFC 6455 requires.
#[tokio::test]
async fn echo_answers_close_codes() {
    use tokio_tungstenite::tungstenite::protocol::CloseFrame;
    let gw = Gateway::builder().route("echo", "/echo", "builtin:echo").start().await;
    let mut ws = gw.ws("/echo").await;
    within("close", ws.send(Message::Close(Some(CloseFrame { code: 4000.into(), reason: "app".into() }))))
        .await
        .unwrap();
    match next_message(&mut ws).await {
        Message::Close(Some(f)) => assert_eq!(u16::from(f.code), 4000),
        other => panic!("expected close, got {other:?}"),
    }

    let mut ws = gw.ws("/echo").await;
    // Raw close frame with code 1005 (reserved: must not appear on the wire).
    let raw = Frame::close(Some(CloseFrame { code: 1005.into(), reason: "".into() }));
    within("send raw close", ws.send(Message::Frame(raw))).await.unwrap();
    match next_message(&mut ws).await {
        Message::Close(Some(f)) => assert_eq!(u16::from(f.code), 1002),
        other => panic!("expected close 1002, got {other:?}"),
    }
}

/// Invalid UTF-8 in a text message to the echo gives 1007, like any route.
#[tokio::test]
async fn echo_rejects_invalid_utf8_with_1007() {
    let gw = Gateway::builder().route("echo", "/echo", "builtin:echo").start().await;
    let mut ws = gw.ws("/echo").await;
    let bad = Frame::message(vec![0xc3, 0x28], OpCode::Data(Data::Text), true);
    within("send", ws.send(Message::Frame(bad))).await.unwrap();
    let (_, code, _) = read_until_close(&mut ws).await;
    assert_eq!(code, 1007);
}
