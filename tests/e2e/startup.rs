use std::path::{Path, PathBuf};
use std::process::Command;

use crate::support::*;

fn fixtures(kind: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/config").join(kind);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    files.sort();
    files
}

/// Each invalid fixture is rejected with a one-line message that names the file and the key
/// its first line (`# expect: ...`) says.
#[test]
fn invalid_fixtures_name_their_key() {
    let files = fixtures("invalid");
    assert!(files.len() >= 10, "found only {} invalid fixtures", files.len());
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        let expect = text.lines().next().and_then(|l| l.strip_prefix("# expect: ")).expect("first line: # expect: ...");
        let err = match wsgate::config::load(&file) {
            Ok(_) => panic!("{} was accepted", file.display()),
            Err(e) => e.to_string(),
        };
        assert!(err.starts_with(&file.display().to_string()), "{err}");
        assert!(err.contains(expect), "{}: expected {expect:?} in:\n{err}", file.display());
        assert!(!err.contains("\n"), "{}: more than one line:\n{err}", file.display());
    }
}

/// Every valid fixture and the shipped config.toml load.
#[test]
fn valid_fixtures_and_shipped_config_load() {
    let mut files = fixtures("valid");
    assert!(files.len() >= 2);
    files.push(Path::new(env!("CARGO_MANIFEST_DIR")).join("config.toml"));
    for file in files {
        if let Err(e) = wsgate::config::load(&file) {
            panic!("{} rejected:\n{e}", file.display());
        }
    }
}

/// The hardened example in docs/security.md is a config wsgate accepts (its files aside: they
/// are read when a gateway starts, not when the config is validated).
#[test]
fn security_guide_example_config_loads() {
    let guide = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/security.md")).unwrap();
    let example = guide.split("```toml\n").nth(1).and_then(|rest| rest.split("```").next()).expect("a toml block");
    let example = example.replace("<64 hex digits>", &"ab".repeat(32));
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("hardened.toml");
    std::fs::write(&file, example).unwrap();
    if let Err(e) = wsgate::config::load(&file) {
        panic!("the example in docs/security.md is rejected:\n{e}");
    }
}

/// `wsgate check` exits 0 with a summary for the shipped config, and 1 with one line per
/// problem (naming the key) for a bad one, like `nginx -t`.
#[test]
fn check_command_reports_like_nginx_t() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = Command::new(env!("CARGO_BIN_EXE_wsgate")).arg("check").current_dir(root).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("config.toml: ok") && stdout.contains("/echo") && stdout.contains("/tcp-echo"), "{stdout}");

    let bad = root.join("tests/fixtures/config/invalid/backend-no-port.toml");
    let out = Command::new(env!("CARGO_BIN_EXE_wsgate")).arg("check").arg(&bad).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(stderr.trim(), format!("{}: routes.vnc.backend: \"localhost\" has no port", bad.display()));
}

/// A port already in use fails start-up with an error naming the listener and the address.
#[tokio::test]
async fn port_in_use_names_listener_and_address() {
    let taken = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = taken.local_addr().unwrap();
    let text =
        format!("[listeners.front]\naddress = \"{addr}\"\n[routes.e]\npath = \"/e\"\nbackend = \"builtin:echo\"\n");
    let config = wsgate::config::parse(&text, Path::new("t.toml")).unwrap();
    let err = wsgate::Gateway::bind(config).await.err().expect("bind must fail").to_string();
    assert!(err.contains("listener \"front\"") && err.contains(&addr.to_string()), "{err}");
}

/// With `generate_self_signed = true` and no files, a development pair is written (key 0600) and
/// serves wss that a client trusting that certificate accepts. Without the flag, the missing
/// file is named.
#[tokio::test]
async fn development_certificate_is_generated_when_allowed() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("certs/dev-cert.pem"), dir.path().join("certs/dev-key.pem"));
    let config_path = dir.path().join("config.toml");
    let text = "[listeners.secure]\naddress = \"127.0.0.1:0\"\n\
                tls = { cert = \"certs/dev-cert.pem\", key = \"certs/dev-key.pem\", generate_self_signed = true }\n\
                [routes.e]\npath = \"/e\"\nbackend = \"builtin:echo\"\nallowed_origins = [\"*\"]\n\
                [admin]\naddress = \"127.0.0.1:0\"\n";
    std::fs::write(&config_path, text).unwrap();
    let gateway = wsgate::Gateway::bind(wsgate::config::load(&config_path).unwrap()).await.unwrap();
    assert!(cert.exists() && key.exists());
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&key).unwrap().permissions().mode() & 0o777, 0o600);
    }
    let addr = gateway.local_addr("secure").unwrap();
    let shutdown = wsgate::Shutdown::new();
    let task = tokio::spawn(gateway.run(shutdown.clone()));

    use rustls::pki_types::pem::PemObject;
    let der = rustls::pki_types::CertificateDer::from_pem_file(&cert).unwrap();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(client_config_trusting(der))
        .connect(rustls::pki_types::ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .expect("tls with the generated certificate");
    let (mut ws, _) = tokio_tungstenite::client_async(format!("wss://localhost:{}/e", addr.port()), tls).await.unwrap();
    use futures_util::{SinkExt, StreamExt};
    ws.send(tokio_tungstenite::tungstenite::Message::text("hi")).await.unwrap();
    assert_eq!(within("echo", ws.next()).await.unwrap().unwrap(), tokio_tungstenite::tungstenite::Message::text("hi"));
    shutdown.now();
    within("shutdown", task).await.unwrap();

    // Same config without the flag, in a fresh directory: the missing file is named.
    let dir2 = tempfile::tempdir().unwrap();
    let path2 = dir2.path().join("config.toml");
    std::fs::write(&path2, text.replace(", generate_self_signed = true", "")).unwrap();
    let err = wsgate::Gateway::bind(wsgate::config::load(&path2).unwrap()).await.err().expect("must fail").to_string();
    assert!(err.contains("dev-cert.pem") && err.contains("listener \"secure\""), "{err}");
}

/// The binary as a user runs it: starts on a config, serves a session through the built-in TCP
/// echo, and on SIGTERM closes the session with 1001 and exits 0.
#[tokio::test]
async fn binary_serves_and_exits_cleanly_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    // The shipped config, moved to ephemeral ports, with the TCP route sent to a test echo
    // (the built-in TCP echo's port would have to be known in advance; it has its own test).
    let echo = Backend::echo().await;
    let shipped = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("config.toml")).unwrap();
    let text = shipped
        .replace("127.0.0.1:8080", "127.0.0.1:0")
        .replace("127.0.0.1:8443", "127.0.0.1:0")
        .replace("127.0.0.1:9090", "127.0.0.1:0")
        .replace("drain_delay_secs = 5 ", "drain_delay_secs = 0.2 ")
        .replace("close_window_secs = 10 ", "close_window_secs = 0.2 ")
        .replace("backend = \"127.0.0.1:7007\"", &format!("backend = \"{}\"", echo.target()))
        .replace("tcp_echo = \"127.0.0.1:7007\"", "tcp_echo = \"127.0.0.1:0\"");
    assert!(
        text.contains(&echo.target()) && text.contains("drain_delay_secs = 0.2 ") && !text.contains(":9090"),
        "the shipped config changed shape; update this test"
    );
    std::fs::write(&config, text).unwrap();
    let (mut child, mut lines) = run_binary(&config, "info");
    let mut plain = None;
    while plain.is_none() {
        let line = within("'listening' log line", lines.next_line()).await.unwrap().expect("wsgate exited early");
        if line.contains("listener=plain") {
            plain = line.split("url=ws://").nth(1).map(|s| s.split_whitespace().next().unwrap().to_string());
        }
    }
    let url = format!("ws://{}/tcp-echo", plain.unwrap());
    let (mut ws, _) = within("connect", tokio_tungstenite::connect_async(&url)).await.unwrap();
    send_binary_raw(&mut ws, b"through the bridge").await;
    use futures_util::StreamExt;
    match within("echo", ws.next()).await {
        Some(Ok(tokio_tungstenite::tungstenite::Message::Binary(b))) => {
            assert_eq!(&b[..], b"through the bridge")
        }
        other => panic!("{other:?}"),
    }
    let pid = child.id().unwrap().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    match within("close", ws.next()).await {
        Some(Ok(tokio_tungstenite::tungstenite::Message::Close(Some(f)))) => {
            assert_eq!(u16::from(f.code), 1001)
        }
        other => panic!("expected 1001, got {other:?}"),
    }
    let status = within("exit", child.wait()).await.unwrap();
    assert!(status.success(), "exit status {status}");
    // Drain the log so nothing is left unread.
    while let Ok(Some(_)) = lines.next_line().await {}
}

async fn send_binary_raw<S>(ws: &mut tokio_tungstenite::WebSocketStream<S>, data: &[u8])
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use futures_util::SinkExt;
    within("send", ws.send(tokio_tungstenite::tungstenite::Message::Binary(data.to_vec().into()))).await.unwrap();
}

/// The built-in TCP echo service returns every byte, over a real socket.
#[tokio::test]
async fn builtin_tcp_echo_echoes() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let tasks = tokio_util::task::TaskTracker::new();
    let server = tokio::spawn(wsgate::echo::serve_tcp(listener, stop.clone(), tasks.clone()));
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let data = payload(200_000, 9);
    let (mut r, mut w) = s.split();
    let (_, back) = tokio::join!(async { w.write_all(&data).await.unwrap() }, async {
        let mut back = vec![0u8; data.len()];
        within("echo", r.read_exact(&mut back)).await.unwrap();
        back
    });
    assert!(back == data);
    stop.cancel();
    within("echo service stops", server).await.unwrap();
    tasks.close();
    within("echo connections end", tasks.wait()).await;
}
