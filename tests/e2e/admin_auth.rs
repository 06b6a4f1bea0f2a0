//! The admin listener over TLS with bearer tokens: `/metrics` needs a token whose SHA-256 is
//! configured (401 with the Bearer challenge otherwise), the probes stay open, a reload rereads
//! the tokens file, and no token reaches a log line.

use aws_lc_rs::digest;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::*;

fn sha256(token: &str) -> String {
    let d = digest::digest(&digest::SHA256, token.as_bytes());
    format!("sha256:{}", d.as_ref().iter().map(|b| format!("{b:02x}")).collect::<String>())
}

/// GET `path` over TLS (trusting `ca`) with `auth` as the Authorization header: (status, head,
/// body).
async fn get(gw: &Gateway, ca: &TestCa, path: &str, auth: Option<&str>) -> (u16, String, String) {
    let tcp = within("connect", TcpStream::connect(gw.admin)).await.unwrap();
    let connector = tokio_rustls::TlsConnector::from(ca.client_config());
    let mut tls = within("tls handshake", connector.connect(ServerName::try_from("localhost").unwrap(), tcp))
        .await
        .expect("admin tls handshake");
    let auth = auth.map(|a| format!("Authorization: {a}\r\n")).unwrap_or_default();
    let request = format!("GET {path} HTTP/1.1\r\nHost: admin\r\n{auth}Connection: close\r\n\r\n");
    within("write", tls.write_all(request.as_bytes())).await.unwrap();
    let mut response = Vec::new();
    // The server closes without close_notify; what was read before that is the whole answer.
    let _ = within("response", tls.read_to_end(&mut response)).await;
    let text = String::from_utf8_lossy(&response).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or_else(|| panic!("no response head: {text:?}"));
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    (status, head.to_string(), body.to_string())
}

/// Sends `request` on a connection that stays open and reads one response: its status.
async fn keep_alive_get<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(s: &mut S, request: &str) -> u16 {
    within("write", s.write_all(request.as_bytes())).await.unwrap();
    let mut buf = Vec::new();
    loop {
        let mut chunk = [0u8; 4096];
        let n = within("response", s.read(&mut chunk)).await.unwrap();
        assert!(n > 0, "closed before a whole response");
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf).into_owned();
        let Some((head, body)) = text.split_once("\r\n\r\n") else { continue };
        let length = head
            .lines()
            .find_map(|l| {
                l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse::<usize>().unwrap())
            })
            .unwrap_or(0);
        if body.len() >= length {
            return head.split(' ').nth(1).unwrap().parse().unwrap();
        }
    }
}

/// Over TLS: `/metrics` without a token or with a wrong one gets 401 and the challenge (counted
/// by reason), with a configured one 200; `/healthz` and `/readyz` need none; plain HTTP on the
/// port fails the TLS handshake. A reload rereads the tokens file. No token is ever logged.
#[tokio::test]
async fn admin_needs_a_bearer_token_over_tls() {
    let (logs, _guard) = Logs::capture();
    let ca = TestCa::new();
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens.txt");
    std::fs::write(&tokens, format!("# ci scraper\n{}\n", sha256("file-token-1"))).unwrap();
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        format!(
            "[listeners.plain]\naddress = \"127.0.0.1:0\"\n[routes.echo]\npath = \"/echo\"\nbackend = \"builtin:echo\"\n\
             [admin]\naddress = \"127.0.0.1:0\"\ntls = {{ cert = {:?}, key = {:?} }}\n\
             token_hashes = [\"{}\"]\ntokens_file = \"tokens.txt\"\n",
            ca.cert_path(),
            ca.key_path(),
            sha256("config-token")
        ),
    )
    .unwrap();
    let gw = Gateway::from_file(&config).await;

    let (status, head, body) = get(&gw, &ca, "/metrics", None).await;
    assert_eq!(status, 401, "{body}");
    assert!(head.contains("www-authenticate: Bearer realm=\"wsgate-admin\"\r\n"), "{head}");
    let (status, head, _) = get(&gw, &ca, "/metrics", Some("Bearer not-a-token")).await;
    assert_eq!(status, 401);
    assert!(head.contains("www-authenticate: Bearer realm=\"wsgate-admin\", error=\"invalid_token\""), "{head}");
    let (status, _, _) = get(&gw, &ca, "/metrics", Some("Basic Y29uZmlnLXRva2Vu")).await;
    assert_eq!(status, 401, "only the Bearer scheme carries a token");
    for path in ["/healthz", "/readyz"] {
        assert_eq!(get(&gw, &ca, path, None).await.0, 200, "{path} is open for probes");
    }
    assert_eq!(get(&gw, &ca, "/nothing", None).await.0, 401, "unknown paths are not open");
    let (status, _, _) = get(&gw, &ca, "/metrics", Some("Bearer file-token-1")).await;
    assert_eq!(status, 200, "a token from the tokens file");
    let (status, _, metrics) = get(&gw, &ca, "/metrics", Some("Bearer config-token")).await;
    assert_eq!(status, 200, "a token from token_hashes");
    assert_eq!(metric(&metrics, "wsgate_admin_unauthorized_total", &[("reason", "missing_token")]), Some(3.0));
    assert_eq!(metric(&metrics, "wsgate_admin_unauthorized_total", &[("reason", "invalid_token")]), Some(1.0));
    // Each refusal is logged: the first as a warning naming the client, path and reason, the
    // others, within the warning interval, at debug level.
    let text = logs.text();
    let refused: Vec<&str> = text.lines().filter(|l| l.contains("admin request refused (401)")).collect();
    assert_eq!(refused.len(), 4, "{text}");
    assert!(refused[0].contains("WARN") && refused[0].contains("client.addr=127.0.0.1:"), "{}", refused[0]);
    assert!(refused[0].contains("path=\"/metrics\" reason=\"missing_token\" suppressed=0"), "{}", refused[0]);
    assert!(refused[1..].iter().all(|l| l.contains("DEBUG")), "{text}");
    assert!(refused[1].contains("reason=\"invalid_token\""), "{}", refused[1]);

    // Plain HTTP on the TLS port: no answer, a failed handshake.
    let mut s = within("connect", TcpStream::connect(gw.admin)).await.unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: admin\r\n\r\n").await.unwrap();
    let mut plain = Vec::new();
    let _ = within("close", s.read_to_end(&mut plain)).await;
    assert!(!plain.starts_with(b"HTTP/"), "plain HTTP was answered on the TLS port");
    let failures = [("listener", "admin"), ("reason", "error")];
    eventually("the failed admin handshake counted", || async {
        let (_, _, m) = get(&gw, &ca, "/metrics", Some("Bearer config-token")).await;
        metric(&m, "wsgate_tls_handshake_failures_total", &failures) == Some(1.0)
    })
    .await;

    // A new tokens file, reloaded: the old file's token stops working, the new one works, also
    // on a connection kept open from before the reload.
    let tcp = within("connect", TcpStream::connect(gw.admin)).await.unwrap();
    let connector = tokio_rustls::TlsConnector::from(ca.client_config());
    let mut kept = within("tls", connector.connect(ServerName::try_from("localhost").unwrap(), tcp)).await.unwrap();
    let again = "GET /metrics HTTP/1.1\r\nHost: admin\r\nAuthorization: Bearer file-token-1\r\n\r\n";
    assert_eq!(keep_alive_get(&mut kept, again).await, 200);
    std::fs::write(&tokens, format!("{}\n", sha256("file-token-2"))).unwrap();
    gw.reloader.reload_file(&config).expect("reload");
    assert_eq!(keep_alive_get(&mut kept, again).await, 401, "a revoked token on an open connection");
    assert_eq!(get(&gw, &ca, "/metrics", Some("Bearer file-token-1")).await.0, 401);
    assert_eq!(get(&gw, &ca, "/metrics", Some("Bearer file-token-2")).await.0, 200);
    // A broken tokens file is refused whole, named by key, file and line, and not quoted.
    std::fs::write(&tokens, "file-token-3\n").unwrap();
    let e = gw.reloader.reload_file(&config).unwrap_err().to_string();
    assert!(e.starts_with("admin.tokens_file: ") && e.contains("tokens.txt: line 1: expected [name=]sha256:"), "{e}");
    assert!(!e.contains("file-token-3"), "{e}");
    assert_eq!(get(&gw, &ca, "/metrics", Some("Bearer file-token-2")).await.0, 200, "the old access stays");

    let text = logs.text();
    assert!(text.contains("admin listening url=https://"), "{text}");
    for secret in ["config-token", "file-token", "not-a-token", "Y29uZmlnLXRva2Vu"] {
        assert!(!text.contains(secret), "a token reached the log: {secret}");
    }
}

/// Without `token_hashes` or `tokens_file` the admin listener asks for nothing, as before; with
/// `open_paths = []` even the probes need a token.
#[tokio::test]
async fn admin_tokens_are_optional_and_open_paths_configurable() {
    let gw = Gateway::builder().route("echo", "/echo", "builtin:echo").start().await;
    assert_eq!(admin_get(&gw, "/metrics").await.0, 200);

    let text = format!(
        "[listeners.plain]\naddress = \"127.0.0.1:0\"\n[routes.echo]\npath = \"/echo\"\nbackend = \"builtin:echo\"\n\
         [admin]\naddress = \"127.0.0.1:0\"\ntoken_hashes = [\"{}\"]\nopen_paths = []\n",
        sha256("t")
    );
    let gw = Gateway::from_toml(&text).await;
    let (status, head, _) =
        raw_http(gw.admin, "GET /healthz HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n").await;
    assert_eq!(status, 401, "{head}");
    let (status, _, _) = raw_http(
        gw.admin,
        "GET /healthz HTTP/1.1\r\nHost: admin\r\nAuthorization: Bearer t\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status, 200);
}
