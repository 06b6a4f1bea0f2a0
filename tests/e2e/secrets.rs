//! No secret reaches a log line or a metric, at any level: the real binary runs with
//! `RUST_LOG=trace` (every crate, text and JSON logs) while each credential carrier is driven with
//! a good and a bad credential (bearer header, cookie, query and subprotocol; JWT HS256 and ES256;
//! Basic; the admin token), plus 400s, 404s and a 426 carrying `?access_token=`, and reloads
//! rejected for a secret pasted where its hash belongs. Then neither the
//! captured standard error nor `/metrics` holds any token, password, JWT, the HS256 secret, the
//! base64 of `user:password`, the base64url of a subprotocol token, or a token-mapped route's
//! token (map file, websockify file, JWT), while the log does hold the
//! refusals (so the check has something to look through).

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use aws_lc_rs::digest::{SHA256, digest};
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use futures_util::SinkExt;
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use serde_json::json;
use tokio::io::AsyncReadExt;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderName;

use crate::support::*;

const K8S: &str = "base64url.bearer.authorization.k8s.io.";
const HS256_SECRET: &str = "hs256-secret-0f3c9a7e5d1b4f2a8c6e0d9b7a5f3e1c";

fn sha256_hex(token: &str) -> String {
    digest(&SHA256, token.as_bytes()).as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    format!("{:?}", path.display().to_string())
}

/// Every credential the test sends, good and bad: none of these may be written anywhere.
#[derive(Default)]
struct Secrets(Vec<(&'static str, String)>);

impl Secrets {
    fn add(&mut self, what: &'static str, value: impl Into<String>) -> String {
        let value = value.into();
        self.0.push((what, value.clone()));
        value
    }
}

/// The running binary: its listener and admin addresses and its standard error.
struct Binary {
    child: tokio::process::Child,
    plain: std::net::SocketAddr,
    admin: std::net::SocketAddr,
    stderr: tokio::task::JoinHandle<String>,
}

/// Starts `wsgate run` on `config` with `RUST_LOG=trace`; returns once both listeners are up.
async fn start(config: &Path) -> Binary {
    let (child, mut lines) = run_binary(config, "trace");
    let mut seen = String::new();
    let (mut plain, mut admin) = (None, None);
    let after = |line: &str, key: &str| {
        line.split(key).nth(1).map(|s| s.split(['/', ' ', '"']).next().unwrap().parse().unwrap())
    };
    while plain.is_none() || admin.is_none() {
        let line = within("the 'listening' log lines", lines.next_line()).await.unwrap().expect("wsgate exited early");
        if line.contains("admin listening") {
            admin = after(&line, "http://");
        } else if line.contains("listening") && line.contains("plain") {
            plain = after(&line, "ws://");
        }
        seen.push_str(&line);
        seen.push('\n');
    }
    // The rest of standard error is read to its end (the process's exit) in the background.
    let stderr = tokio::spawn(async move {
        let mut rest = String::new();
        lines.into_inner().read_to_string(&mut rest).await.unwrap();
        seen + &rest
    });
    Binary { child, plain: plain.unwrap(), admin: admin.unwrap(), stderr }
}

/// Opens a session on `path` with `headers`, echoes a message through it and closes it: the
/// credential was accepted.
async fn passes(addr: std::net::SocketAddr, path: &str, headers: &[(&str, &str)]) {
    let mut req = format!("ws://127.0.0.1:{}{path}", addr.port()).into_client_request().unwrap();
    for (k, v) in headers {
        req.headers_mut().append(HeaderName::from_bytes(k.as_bytes()).unwrap(), v.parse().unwrap());
    }
    let (ws, _) = within("connect", tokio_tungstenite::connect_async(req))
        .await
        .unwrap_or_else(|e| panic!("{path} {headers:?}: {e}"));
    let mut ws = ws;
    within("send", ws.send(Message::Binary(b"through".to_vec().into()))).await.unwrap();
    use futures_util::StreamExt;
    match within("echo", ws.next()).await {
        Some(Ok(Message::Binary(b))) => assert_eq!(&b[..], b"through"),
        other => panic!("{path}: {other:?}"),
    }
    within("close", ws.close(None)).await.unwrap();
    while let Some(Ok(_)) = within("the close reply", ws.next()).await {}
}

/// Sends an upgrade request for `path` with `extra` header lines; returns the status.
async fn status(addr: std::net::SocketAddr, path: &str, extra: &str) -> u16 {
    raw_http(addr, &upgrade_request(path, extra)).await.0
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

/// Runs the whole exchange against the binary with `[log] format = format` and checks its
/// standard error and `/metrics`.
async fn no_secret_is_written(format: &str) {
    let dir = tempfile::tempdir().unwrap();
    let backend = Backend::echo().await;
    let mut secrets = Secrets::default();

    // Bearer: one inline named token, one from a file; a real subprotocol beside the token one.
    let inline = secrets.add("inline bearer token", "inline-tok-7c1e93a0b2");
    let filed = secrets.add("file bearer token", "file-tok-55d0e8a4f9");
    let tokens_file = write(dir.path(), "tokens.txt", &format!("# tokens\nsha256:{}\n", sha256_hex(&filed)));
    // JWT: HS256 with a secret file, ES256 with a key made now.
    secrets.add("HS256 secret", HS256_SECRET);
    let hs_file = write(dir.path(), "hs256.secret", HS256_SECRET);
    let ec = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let ec_file = write(dir.path(), "ec.pem", &ec.public_key_pem());
    // Basic: a bcrypt (cost 4) user.
    let password = secrets.add("basic password", "pw-3b8e1f6c2d");
    let htpasswd = write(dir.path(), "users.htpasswd", &format!("alice:{}\n", bcrypt::hash(&password, 4).unwrap()));
    // Admin.
    let admin_token = secrets.add("admin token", "admin-tok-9a2c7e4b1d");
    // Token-mapped targets: a TOML map (path tokens), a websockify map (query tokens), JWT claims.
    let map_token = secrets.add("map token", "map-tok-3d9e71c0");
    let ws_token = secrets.add("websockify map token", "wsk-tok-8f20a6b4");
    let map_file = write(dir.path(), "map.toml", &format!("\"{map_token}\" = \"{}\"\n", backend.target()));
    let ws_map = write(dir.path(), "map.websockify", &format!("{ws_token}: {}\n", backend.target()));
    let target_keys = format!("allow = [\"127.0.0.1\"]\nallow_ports = [{}]\n", backend.addr.port());

    let text = format!(
        "[listeners.plain]\naddress = \"127.0.0.1:0\"\n\
         [routes.b]\npath = \"/b\"\nbackend = \"{be}\"\nsubprotocols = [\"chat\"]\n\
         [routes.b.auth]\ntype = \"bearer\"\ntokens = [\"ops=sha256:{inline_hash}\"]\ntokens_file = {tokens_file}\n\
         cookie = \"wsgate_token\"\nquery = true\nsubprotocol_prefix = \"{K8S}\"\n\
         [routes.j]\npath = \"/j\"\nbackend = \"{be}\"\nsubprotocols = [\"chat\"]\n\
         [routes.j.auth]\ntype = \"jwt\"\nkeys = [{hs_file}, {ec_file}]\nalgorithms = [\"HS256\", \"ES256\"]\n\
         cookie = \"jwt\"\nquery = true\nsubprotocol_prefix = \"{K8S}\"\n\
         [routes.u]\npath = \"/u\"\nbackend = \"{be}\"\n\
         [routes.u.auth]\ntype = \"basic\"\nhtpasswd = {htpasswd}\n\
         [routes.t]\npath = \"/t/\"\nmatch = \"prefix\"\n[routes.t.targets]\nmap_file = {map_file}\n{target_keys}\
         [routes.tq]\npath = \"/tq\"\n[routes.tq.targets]\ntoken = \"query\"\nmap_file = {ws_map}\n{target_keys}\
         [routes.tj]\npath = \"/tj/\"\nmatch = \"prefix\"\n[routes.tj.targets]\n{target_keys}\
         [routes.tj.targets.jwt]\nkeys = [{ec_file}]\nalgorithms = [\"ES256\"]\n\
         [limits.per_client]\nmax_auth_failures = 0\nmax_connections = 0\nmax_handshakes = 0\nnew_connections_per_sec = 0\n\
         [admin]\naddress = \"127.0.0.1:0\"\ntoken_hashes = [\"sha256:{admin_hash}\"]\n\
         [shutdown]\ndrain_delay_secs = 0\nclose_window_secs = 0\n\
         [log]\nformat = \"{format}\"\n",
        be = backend.target(),
        inline_hash = sha256_hex(&inline),
        admin_hash = sha256_hex(&admin_token),
    );
    let config = dir.path().join("config.toml");
    std::fs::write(&config, text).unwrap();
    let mut gw = start(&config).await;
    let addr = gw.plain;

    // Bearer, good: each carrier.
    let b64 = secrets.add("base64url subprotocol token", URL_SAFE_NO_PAD.encode(&filed));
    passes(addr, "/b", &[("authorization", &format!("Bearer {inline}"))]).await;
    passes(addr, "/b", &[("cookie", &format!("theme=dark; wsgate_token={filed}"))]).await;
    passes(addr, &format!("/b?x=1&access_token={inline}"), &[]).await;
    passes(addr, "/b", &[("sec-websocket-protocol", &format!("chat, {K8S}{b64}"))]).await;
    // Bearer, bad: each carrier, each with a token of its own.
    let bad = [
        secrets.add("bad header token", "bad-hdr-tok-e41f"),
        secrets.add("bad cookie token", "bad-cookie-tok-9d2a"),
        secrets.add("bad query token", "bad-query-tok-1c7b"),
        secrets.add("bad subprotocol token", "bad-sub-tok-6a0e"),
    ];
    let bad_b64 = secrets.add("bad base64url subprotocol token", URL_SAFE_NO_PAD.encode(&bad[3]));
    assert_eq!(status(addr, "/b", &format!("Authorization: Bearer {}\r\n", bad[0])).await, 401);
    assert_eq!(status(addr, "/b", &format!("Cookie: wsgate_token={}\r\n", bad[1])).await, 401);
    assert_eq!(status(addr, &format!("/b?access_token={}", bad[2]), "").await, 401);
    assert_eq!(status(addr, "/b", &format!("Sec-WebSocket-Protocol: chat, {K8S}{bad_b64}\r\n")).await, 401);
    // A subprotocol the route refuses (400), carrying a good token beside it.
    assert_eq!(status(addr, "/b", &format!("Sec-WebSocket-Protocol: mqtt, {K8S}{b64}\r\n")).await, 400);

    // JWT, good: HS256 and ES256, from each carrier.
    let claims = |sub: &str| json!({"sub": sub, "exp": now() + 600});
    let hs_key = EncodingKey::from_secret(HS256_SECRET.as_bytes()).unwrap();
    let es_key = EncodingKey::from_ec_pem(ec.serialize_pem().as_bytes()).unwrap();
    let hs = secrets.add("HS256 JWT", encode(&Header::new(Algorithm::HS256), &claims("hs-user"), &hs_key).unwrap());
    let es = secrets.add("ES256 JWT", encode(&Header::new(Algorithm::ES256), &claims("es-user"), &es_key).unwrap());
    for jwt in [&hs, &es] {
        secrets.add("JWT signature", jwt.rsplit('.').next().unwrap());
    }
    let es_b64 = secrets.add("base64url subprotocol JWT", URL_SAFE_NO_PAD.encode(&es));
    passes(addr, "/j", &[("authorization", &format!("Bearer {hs}"))]).await;
    passes(addr, "/j", &[("cookie", &format!("jwt={es}"))]).await;
    passes(addr, &format!("/j?access_token={hs}"), &[]).await;
    passes(addr, "/j", &[("sec-websocket-protocol", &format!("chat, {K8S}{es_b64}"))]).await;
    // JWT, bad: a wrong HS256 secret, a tampered ES256 signature, an expired one; each carrier.
    let wrong_key = EncodingKey::from_secret(b"another-secret-of-at-least-32-bytes!!").unwrap();
    let forged = secrets.add("forged JWT", encode(&Header::new(Algorithm::HS256), &claims("x"), &wrong_key).unwrap());
    let expired = secrets.add(
        "expired JWT",
        encode(&Header::new(Algorithm::ES256), &json!({"sub": "late", "exp": now() - 3600}), &es_key).unwrap(),
    );
    let (head, sig) = es.rsplit_once('.').unwrap();
    let tampered = secrets.add("tampered JWT", format!("{head}.{}", sig.chars().rev().collect::<String>()));
    let forged_b64 = secrets.add("base64url forged JWT", URL_SAFE_NO_PAD.encode(&forged));
    assert_eq!(status(addr, "/j", &format!("Authorization: Bearer {forged}\r\n")).await, 401);
    assert_eq!(status(addr, "/j", &format!("Cookie: jwt={tampered}\r\n")).await, 401);
    assert_eq!(status(addr, &format!("/j?access_token={expired}"), "").await, 401);
    assert_eq!(status(addr, "/j", &format!("Sec-WebSocket-Protocol: chat, {K8S}{forged_b64}\r\n")).await, 401);

    // Basic: good and bad passwords, and an unknown user.
    let good = secrets.add("basic header", STANDARD.encode(format!("alice:{password}")));
    passes(addr, "/u", &[("authorization", &format!("Basic {good}"))]).await;
    let wrong_pw = secrets.add("wrong password", "wrong-pw-5e9d");
    let wrong = secrets.add("wrong basic header", STANDARD.encode(format!("alice:{wrong_pw}")));
    assert_eq!(status(addr, "/u", &format!("Authorization: Basic {wrong}\r\n")).await, 401);
    let unknown = secrets.add("unknown user's header", STANDARD.encode(format!("mallory:{wrong_pw}")));
    assert_eq!(status(addr, "/u", &format!("Authorization: Basic {unknown}\r\n")).await, 401);

    // Token-mapped targets: good and unknown tokens in the path and the query, good, forged and
    // expired JWTs naming the target, and a JWT naming a target outside the allow-list.
    passes(addr, &format!("/t/{map_token}"), &[]).await;
    passes(addr, &format!("/tq?token={ws_token}"), &[]).await;
    let unknown_map = secrets.add("unknown map token", "map-tok-unknown-51c2");
    assert_eq!(status(addr, &format!("/t/{unknown_map}"), "").await, 404);
    assert_eq!(status(addr, &format!("/tq?token={unknown_map}"), "").await, 404);
    let target = |port: u16, exp: u64| json!({"host": "127.0.0.1", "port": port, "exp": exp});
    let port = backend.addr.port();
    let tj =
        secrets.add("target JWT", encode(&Header::new(Algorithm::ES256), &target(port, now() + 600), &es_key).unwrap());
    passes(addr, &format!("/tj/{tj}"), &[]).await;
    let tj_bad = [
        encode(&Header::new(Algorithm::HS256), &target(port, now() + 600), &wrong_key).unwrap(),
        encode(&Header::new(Algorithm::ES256), &target(port, now() - 3600), &es_key).unwrap(),
        encode(&Header::new(Algorithm::ES256), &target(port.wrapping_add(1).max(1), now() + 600), &es_key).unwrap(),
    ];
    for bad in tj_bad {
        let bad = secrets.add("refused target JWT", bad);
        assert_eq!(status(addr, &format!("/tj/{bad}"), "").await, 403);
    }

    // Answers before any route or credential, with a query token in the request line.
    let stray = secrets.add("stray query token", "stray-tok-2f8c");
    assert_eq!(status(addr, &format!("/nowhere?access_token={stray}"), "").await, 404);
    let request = format!("GET /b?access_token={stray} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n");
    assert_eq!(raw_http(addr, &request).await.0, 426);
    let no_key = format!(
        "GET /j?access_token={stray} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\n\r\n"
    );
    assert_eq!(raw_http(addr, &no_key).await.0, 400);
    let bad_host = upgrade_request(&format!("/u?access_token={stray}"), "").replace("Host: 127.0.0.1", "Host: a b");
    assert_eq!(raw_http(addr, &bad_host).await.0, 400);

    // Admin: none, a wrong token, the right one (which reads the metrics checked below).
    let admin = gw.admin;
    let admin_get = |token: Option<String>| async move {
        let auth = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
        raw_http(admin, &format!("GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n{auth}Connection: close\r\n\r\n")).await
    };
    assert_eq!(admin_get(None).await.0, 401);
    let wrong_admin = secrets.add("wrong admin token", "admin-wrong-3e7a");
    assert_eq!(admin_get(Some(wrong_admin)).await.0, 401);
    assert_eq!(admin_get(Some(admin_token.clone())).await.0, 200);

    // Reloads rejected for a secret where its hash belongs (or an HS256 secret too short), each
    // file put back after; then one that succeeds. The rejection names file and line, not text.
    let pid = gw.child.id().unwrap().to_string();
    let reloads = |result: &'static str, want: f64| {
        let token = admin_token.clone();
        let pid = pid.clone();
        async move {
            assert!(std::process::Command::new("kill").args(["-HUP", &pid]).status().unwrap().success());
            eventually(&format!("reload {result} counted"), || async {
                let body = admin_get(Some(token.clone())).await.2;
                metric(&body, "wsgate_config_reloads_total", &[("trigger", "signal"), ("result", result)]) == Some(want)
            })
            .await
        }
    };
    let hash = bcrypt::hash(&password, 4).unwrap();
    let pasted = secrets.add("token pasted into tokens_file", "pasted-tok-8b3d");
    let plain_pw = secrets.add("plain password in htpasswd", "plain-pw-4c1a");
    let short = secrets.add("short HS256 secret", "short-hs-secret-1a2b");
    let pasted_admin = secrets.add("admin token pasted into token_hashes", "pasted-admin-tok-0e6f");
    let bad_entry = secrets.add("map token with a bad target", "map-tok-badentry-7a41");
    let config_text = std::fs::read_to_string(&config).unwrap();
    let broken = [
        ("tokens.txt", format!("sha256:{}\n{pasted}\n", sha256_hex(&filed))),
        ("users.htpasswd", format!("alice:{hash}\nmallory:{plain_pw}\n")),
        ("hs256.secret", short),
        ("config.toml", config_text.replace(&format!("sha256:{}", sha256_hex(&admin_token)), &pasted_admin)),
        ("map.toml", format!("\"{map_token}\" = \"{}\"\n\"{bad_entry}\" = \"nowhere\"\n", backend.target())),
    ];
    for (i, (file, text)) in broken.iter().enumerate() {
        let path = dir.path().join(file);
        let good = std::fs::read(&path).unwrap();
        std::fs::write(&path, text).unwrap();
        reloads("error", i as f64 + 1.0).await;
        std::fs::write(&path, good).unwrap();
    }
    reloads("ok", 1.0).await;
    let (code, _, metrics) = admin_get(Some(admin_token.clone())).await;
    assert_eq!(code, 200);
    assert!(metrics.contains("wsgate_access_denied_total"), "{metrics}");

    // Stop, and read everything the process wrote.
    assert!(std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let exit = within("exit", gw.child.wait()).await.unwrap();
    assert!(exit.success(), "exit status {exit}");
    let log = within("standard error to its end", gw.stderr).await.unwrap();

    let mut leaks = Vec::new();
    for (what, secret) in &secrets.0 {
        for (place, text) in [("the log", &log), ("/metrics", &metrics)] {
            if let Some(at) = text.find(secret.as_str()) {
                let line = text[..at].rsplit('\n').next().unwrap().to_string() + text[at..].lines().next().unwrap();
                leaks.push(format!("{what} ({secret}) is in {place}: {line}"));
            }
        }
    }
    assert!(leaks.is_empty(), "{} leaks:\n{}", leaks.len(), leaks.join("\n"));
    // The log holds what there was to look through: refusals of each kind, the sessions' users.
    let refused_401 = log
        .lines()
        .filter(|l| l.contains("request refused") && (l.contains("status=401") || l.contains("\"status\":401")))
        .count();
    assert!(refused_401 == 10, "{refused_401} 401 refusals logged:\n{log}");
    assert_eq!(log.matches("reload rejected").count(), 5, "{log}");
    for named in [
        "tokens.txt:2: routes.b.auth.tokens_file: expected",
        "users.htpasswd:2: routes.u.auth.htpasswd: not a bcrypt",
        "hs256.secret: routes.j.auth.keys: an HS256 secret must be at least 32 bytes",
        "config.toml: admin.token_hashes: entry 1: expected",
        "map.toml:2: routes.t.targets.map_file: expected token: host:port",
    ] {
        assert!(log.contains(named), "no rejected reload with {named}:\n{log}");
    }
    // The early answers are logged without the path, which can carry a token.
    assert!(!log.contains("/nowhere"), "a path no route matched was logged:\n{log}");
    for reason in
        ["status=404 reason=no route for this host and path", "status=426", "missing or malformed Sec-WebSocket-Key"]
    {
        let json = reason.replace("status=", "\"status\":").replace(" reason=", ",\"reason\":\"");
        assert!(log.contains(reason) || log.contains(&json), "no refusal with {reason}:\n{log}");
    }
    for user in ["ops", "hs-user", "es-user", "alice"] {
        assert!(
            log.contains(&format!("user=\"{user}\"")) || log.contains(&format!("\"user\":\"{user}\"")),
            "no session of {user} logged:\n{log}"
        );
    }
    assert!(log.contains("TRACE") || log.contains("\"level\":\"TRACE\""), "not at trace level");
    assert!(log.contains("unknown target token") && log.contains("target not allowed"), "{log}");
    assert_eq!(backend.accepted(), 12, "every good credential and token, and only those, reached the backend");
}

#[tokio::test]
async fn no_secret_in_text_logs_or_metrics() {
    no_secret_is_written("text").await;
}

#[tokio::test]
async fn no_secret_in_json_logs_or_metrics() {
    no_secret_is_written("json").await;
}
