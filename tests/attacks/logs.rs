use std::net::SocketAddr;

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::client_async;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

use crate::support::{connect_from, eventually, metric, payload, raw_http, run_binary, within};

/// Sessions in the flood: each ends with a `session ended` line, several times what the pipe,
/// the writer's buffer and the queue hold together.
const SESSIONS: usize = 2_000;
/// Source addresses the flood comes from, each within its per-client burst.
const SOURCES: usize = 40;
/// The queue the test's gateway allows, small so the flood overflows it.
const QUEUED: usize = 50;

/// The log's reader stops reading (a full pipe to journald or the container runtime) while
/// hostile clients open and close sessions as fast as they can, each writing a log line: every
/// session still opens, echoes byte for byte and closes cleanly; the lines past the queue are
/// dropped whole and counted in `wsgate_log_lines_dropped_total`, and once the reader reads
/// again every line is either in the log, whole, or in that count.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stalled_log_reader_stalls_no_session() {
    let _one = crate::ONE_ATTACK_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("wsgate.toml");
    std::fs::write(
        &config,
        format!(
            "[listeners.plain]\naddress = \"127.0.0.1:0\"\n[routes.echo]\npath = \"/echo\"\nbackend = \"builtin:echo\"\n\
             [admin]\naddress = \"127.0.0.1:0\"\n[log]\nmax_buffered_lines = {QUEUED}\n"
        ),
    )
    .unwrap();
    let (child, mut lines) = run_binary(&config, "info");
    let (mut plain, mut admin) = (None, None);
    while plain.is_none() || admin.is_none() {
        let line = within("the start-up log lines", lines.next_line()).await.unwrap().expect("wsgate exited early");
        if let Some(url) = line.split("url=ws://").nth(1) {
            plain = Some(url.split_whitespace().next().unwrap().parse::<SocketAddr>().unwrap());
        }
        if let Some(url) = line.split("url=http://").nth(1) {
            admin = Some(url.split('/').next().unwrap().parse::<SocketAddr>().unwrap());
        }
    }
    let (plain, admin) = (plain.unwrap(), admin.unwrap());

    // From here the log is not read: the pipe fills, then the writer's buffer, then the queue.
    let per_source = SESSIONS / SOURCES;
    let clients = crate::sources(30, SOURCES).into_iter().enumerate().map(|(i, src)| {
        tokio::spawn(async move {
            for n in 0..per_source {
                let seed = (i * per_source + n) as u64;
                let tcp = connect_from(src, plain).await.expect("connect");
                let (mut ws, _) = client_async(format!("ws://{plain}/echo"), tcp).await.expect("upgrade");
                let sent = payload(1000, seed);
                ws.send(Message::Binary(sent.clone().into())).await.unwrap();
                match ws.next().await {
                    Some(Ok(Message::Binary(echoed))) => assert_eq!(echoed, sent, "session {seed}: echo differs"),
                    other => panic!("session {seed}: expected the echo, got {other:?}"),
                }
                ws.close(Some(CloseFrame { code: CloseCode::Normal, reason: "".into() })).await.unwrap();
                match ws.next().await {
                    Some(Ok(Message::Close(Some(frame)))) => assert_eq!(frame.code, CloseCode::Normal),
                    other => panic!("session {seed}: expected the close, got {other:?}"),
                }
            }
        })
    });
    // With the lines written by the threads that log them, the gateway stops here: its workers
    // wait on the full pipe, and the flood does not finish.
    let flood = futures_util::future::join_all(clients);
    for client in tokio::time::timeout(std::time::Duration::from_secs(60), flood).await.expect("the flood finishes") {
        client.unwrap();
    }

    // Each session is counted, then logged, just after the client has its close: wait for all.
    eventually("every session counted", || async {
        metric(&scrape(admin).await, "wsgate_sessions_total", &[("code", "1000")]) == Some(SESSIONS as f64)
    })
    .await;
    let dropped = dropped_lines(admin).await;
    // Neither nothing (the flood overflowed the queue) nor everything (the pipe took some).
    assert!(dropped > 0 && dropped < SESSIONS, "{dropped} of {SESSIONS} lines dropped");

    // The reader comes back: the lines not counted as dropped arrive, whole, and no more are
    // dropped (the count was final); at exit the log ends with nothing left out.
    let ended = |line: &str| {
        let whole = line.contains("close.code=1000") && line.ends_with("closed_by=\"client\"");
        line.contains("session ended") && {
            assert!(whole, "a line cut: {line}");
            true
        }
    };
    let mut written = 0;
    while written + dropped < SESSIONS {
        let line = within("the queued log lines", lines.next_line()).await.unwrap().expect("wsgate exited early");
        written += usize::from(ended(&line));
    }
    assert_eq!(dropped_lines(admin).await, dropped, "lines dropped after the reader came back");
    let pid = child.id().unwrap().to_string();
    assert!(std::process::Command::new("kill").args(["-INT", &pid]).status().unwrap().success());
    while let Some(line) = within("the log's end", lines.next_line()).await.unwrap() {
        written += usize::from(ended(&line));
    }
    assert_eq!(written + dropped, SESSIONS, "{written} lines written, {dropped} counted as dropped");
}

async fn scrape(admin: SocketAddr) -> String {
    let (status, _, body) = raw_http(admin, "GET /metrics HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n").await;
    assert_eq!(status, 200, "{body}");
    body
}

async fn dropped_lines(admin: SocketAddr) -> usize {
    metric(&scrape(admin).await, "wsgate_log_lines_dropped_total", &[]).expect("the dropped-lines counter") as usize
}
