//! Credentials per route (`[routes.NAME.auth]`): bearer token digests, JWTs and HTTP Basic, the
//! carriers a token may ride in, the brute-force guard, `on_refusal = "close"` and sessions that
//! end with their JWT. Real sockets and real crypto: keys are generated at test time; every
//! refused request is checked to have reached no backend.

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use aws_lc_rs::digest::{SHA256, digest};
use base64::Engine;
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use serde_json::json;

use crate::support::*;

const K8S: &str = "base64url.bearer.authorization.k8s.io.";

fn sha256_hex(token: &str) -> String {
    digest(&SHA256, token.as_bytes()).as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// (status, head) of an upgrade request to `path` with `extra` header lines.
async fn upgrade_status(gw: &Gateway, path: &str, extra: &str) -> (u16, String) {
    let (status, head, _) = raw_http(gw.plain, &upgrade_request(path, extra)).await;
    (status, head.to_ascii_lowercase())
}

/// Sends a payload through an open session and expects it back byte for byte.
async fn echoes(ws: &mut Ws, seed: u64) {
    let data = payload(70_000, seed);
    send_binary(ws, &data).await;
    assert!(read_bytes(ws, data.len()).await == data, "payload came back altered");
}

/// A route table for a bearer route with every carrier on.
fn bearer_route(file: &Path, extra: &str) -> String {
    format!(
        "subprotocols = [\"chat\"]\n{extra}\n[routes.b.auth]\ntype = \"bearer\"\ntokens = [\"ops=sha256:{}\"]\n\
         tokens_file = {:?}\ncookie = \"wsgate_token\"\nquery = true\nsubprotocol_prefix = \"{K8S}\"\n",
        sha256_hex("inline-token"),
        file.display().to_string()
    )
}

/// A bearer token passes from each carrier (header, cookie, query, k8s subprotocol) byte for byte;
/// its name becomes the session's user; the token subprotocol is never echoed.
#[tokio::test]
async fn bearer_token_passes_from_every_carrier() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(dir.path(), "tokens.txt", &format!("# file tokens\nsha256:{}\n", sha256_hex("file-token")));
    let backend = Backend::echo().await;
    let (logs, _guard) = Logs::capture();
    let gw = Gateway::builder().route_with("b", "/b", &backend.target(), &bearer_route(&file, "")).start().await;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode("file-token");
    let cases: Vec<(String, Vec<(&str, String)>)> = vec![
        ("/b".into(), vec![("authorization", "Bearer inline-token".into())]),
        ("/b".into(), vec![("cookie", "theme=dark; wsgate_token=file-token".into())]),
        ("/b?x=1&access_token=inline%2Dtoken".into(), vec![]),
        ("/b".into(), vec![("sec-websocket-protocol", format!("chat, {K8S}{b64}"))]),
    ];
    for (i, (path, headers)) in cases.iter().enumerate() {
        let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let mut ws = gw.ws_with(path, &headers).await.unwrap_or_else(|e| panic!("case {i}: {e}"));
        echoes(&mut ws, i as u64).await;
        ws.close(None).await.unwrap();
        expect_end(&mut ws).await;
    }
    assert_eq!(backend.accepted(), 4);
    // The 101 selects the real subprotocol and never names the token entry.
    let (status, head) = upgrade_status(&gw, "/b", &format!("Sec-WebSocket-Protocol: {K8S}{b64}, chat\r\n")).await;
    assert_eq!(status, 101, "{head}");
    assert!(head.contains("sec-websocket-protocol: chat\r") && !head.contains(&b64.to_ascii_lowercase()), "{head}");
    // A non-browser client offering only the token entry offers no protocol: none is selected.
    let (status, head) = upgrade_status(&gw, "/b", &format!("Sec-WebSocket-Protocol: {K8S}{b64}\r\n")).await;
    assert_eq!(status, 101, "{head}");
    assert!(!head.contains("sec-websocket-protocol"), "{head}");
    eventually("session log names the token's user", || async { logs.text().contains("user=\"ops\"") }).await;
    let text = logs.text();
    for secret in ["inline-token", "file-token", b64.as_str()] {
        assert!(!text.contains(secret), "{secret} reached the log");
    }
}

/// Missing and invalid tokens get 401 with the RFC 6750 challenge, are counted, and reach no
/// backend; a query token appears in no log line, not even for an unrouted path.
#[tokio::test]
async fn bearer_refusals_are_401_and_never_dial() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(dir.path(), "tokens.txt", "");
    let backend = Backend::echo().await;
    let (logs, _guard) = Logs::capture();
    let gw = Gateway::builder().route_with("b", "/b", &backend.target(), &bearer_route(&file, "")).start().await;
    let (status, head) = upgrade_status(&gw, "/b", "").await;
    assert_eq!(status, 401, "{head}");
    assert!(head.contains("www-authenticate: bearer realm=\"wsgate\"\r"), "{head}");
    for extra in [
        "Authorization: Bearer wrong-token\r\n",
        "Cookie: wsgate_token=wrong-token\r\n",
        &format!("Sec-WebSocket-Protocol: chat, {K8S}!!notbase64\r\n"),
    ] {
        let (status, head) = upgrade_status(&gw, "/b", extra).await;
        assert_eq!(status, 401, "{extra}: {head}");
        assert!(head.contains("error=\"invalid_token\""), "{head}");
    }
    let (status, _) = upgrade_status(&gw, "/b?access_token=query-secret", "").await;
    assert_eq!(status, 401);
    let (status, _) = upgrade_status(&gw, "/nowhere?access_token=query-secret", "").await;
    assert_eq!(status, 404);
    assert_eq!(backend.accepted(), 0, "a refused request reached the backend");
    assert_eq!(
        scrape(&gw, "wsgate_access_denied_total", &[("route", "b"), ("reason", "missing_credentials")]).await,
        1.0
    );
    assert_eq!(
        scrape(&gw, "wsgate_access_denied_total", &[("route", "b"), ("reason", "invalid_credentials")]).await,
        4.0
    );
    let text = logs.text();
    assert!(text.contains("request refused"), "refusals are logged");
    for secret in ["wrong-token", "query-secret", "access_token"] {
        assert!(!text.contains(secret), "{secret} reached the log:\n{text}");
    }
}

/// After `max_auth_failures` wrong tokens an address gets 429 with Retry-After without its
/// token being checked (a right one too), while another address still gets in.
#[tokio::test]
async fn brute_force_guard_blocks_the_guesser_only() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(dir.path(), "tokens.txt", "");
    let backend = Backend::echo().await;
    let gw = Gateway::builder()
        .route_with("b", "/b", &backend.target(), &bearer_route(&file, ""))
        .limit("per_client.max_auth_failures", "3")
        .limit("per_client.auth_block_secs", "60")
        .start()
        .await;
    let guesser: std::net::IpAddr = "127.0.0.2".parse().unwrap();
    let ask = |src: std::net::IpAddr, token: &'static str| {
        let addr = gw.plain;
        async move {
            let s = connect_from(src, addr).await.unwrap();
            raw_http_on(s, &upgrade_request("/b", &format!("Authorization: Bearer {token}\r\n"))).await
        }
    };
    for i in 0..3 {
        assert_eq!(ask(guesser, "guess").await.0, 401, "guess {i}");
    }
    let (status, head, _) = ask(guesser, "inline-token").await;
    assert_eq!(status, 429, "{head}");
    assert!(head.to_ascii_lowercase().contains("retry-after: 60"), "{head}");
    let mut other = gw.session_from("127.0.0.3".parse().unwrap(), "/b?access_token=inline-token", false).await.unwrap();
    echoes(&mut other, 7).await;
    assert_eq!(backend.accepted(), 1);
    assert_eq!(
        scrape(&gw, "wsgate_access_denied_total", &[("route", "b"), ("reason", "too_many_failures")]).await,
        1.0
    );
}

/// With `on_refusal = "close"` a bad token completes the upgrade without dialling and closes
/// with 4401 and the reason, which a page can show.
#[tokio::test]
async fn on_refusal_close_sends_4401_and_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(dir.path(), "tokens.txt", "");
    let backend = Backend::echo().await;
    let route = bearer_route(&file, "on_refusal = \"close\"");
    let gw = Gateway::builder().route_with("b", "/b", &backend.target(), &route).start().await;
    let mut ws = gw.ws_with("/b", &[("authorization", "Bearer wrong")]).await.unwrap();
    let (data, code, reason) = read_until_close(&mut ws).await;
    assert_eq!((data.len(), code, reason.as_str()), (0, 4401, "invalid credentials: unknown token"));
    expect_end(&mut ws).await;
    let mut ws = gw.ws("/b").await;
    assert_eq!(read_until_close(&mut ws).await.1, 4401);
    assert_eq!(backend.accepted(), 0);
    assert_eq!(scrape(&gw, "wsgate_access_denied_total", &[("route", "b")]).await, 2.0);
}

/// A tokens file is read again on reload: a token added to it passes afterwards.
#[tokio::test]
async fn tokens_file_is_reread_on_reload() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(dir.path(), "tokens.txt", &format!("sha256:{}\n", sha256_hex("old")));
    let backend = Backend::echo().await;
    let builder = Gateway::builder().route_with("b", "/b", &backend.target(), &bearer_route(&file, ""));
    let config = write(dir.path(), "wsgate.toml", &builder.toml());
    let gw = Gateway::from_file(&config).await;
    assert_eq!(upgrade_status(&gw, "/b", "Authorization: Bearer new\r\n").await.0, 401);
    write(dir.path(), "tokens.txt", &format!("sha256:{}\nsha256:{}\n", sha256_hex("old"), sha256_hex("new")));
    gw.reloader.reload_file(&config).unwrap();
    let mut ws = gw.ws_with("/b", &[("authorization", "Bearer new")]).await.unwrap();
    echoes(&mut ws, 3).await;
    // A file that cannot be used is refused whole, naming file and line; the old one stays.
    write(dir.path(), "tokens.txt", "new\n");
    let e = gw.reloader.reload_file(&config).unwrap_err().to_string();
    assert!(e.contains("tokens.txt:1: routes.b.auth.tokens_file: expected") && !e.contains("new\n"), "{e}");
    assert_eq!(upgrade_status(&gw, "/b", "Authorization: Bearer new\r\n").await.0, 101);
}

/// Carrier rules that are about safety are config errors naming the key: a cookie with any
/// origin allowed, a subprotocol carrier without subprotocols, a token where its hash belongs.
#[test]
fn unsafe_carriers_are_config_errors() {
    let base = "[listeners.p]\naddress = \"127.0.0.1:0\"\n[routes.r]\npath = \"/r\"\nbackend = \"127.0.0.1:9\"\n";
    let err =
        |extra: &str| wsgate::config::parse(&format!("{base}{extra}"), Path::new("t.toml")).unwrap_err().to_string();
    let hash = format!("sha256:{}", sha256_hex("x"));
    let e = err(&format!(
        "allowed_origins = [\"*\"]\n[routes.r.auth]\ntype = \"bearer\"\ntokens = [\"{hash}\"]\ncookie = \"t\"\n"
    ));
    assert!(e.starts_with("t.toml: routes.r.auth.cookie: a cookie carrier needs allowed_origins"), "{e}");
    let e =
        err(&format!("[routes.r.auth]\ntype = \"bearer\"\ntokens = [\"{hash}\"]\nsubprotocol_prefix = \"{K8S}\"\n"));
    assert!(e.starts_with("t.toml: routes.r.auth.subprotocol_prefix: needs the route to list subprotocols"), "{e}");
    let e = err("[routes.r.auth]\ntype = \"bearer\"\ntokens = [\"my-secret-token\"]\n");
    assert!(e.contains("routes.r.auth.tokens: entry 1 is not") && !e.contains("my-secret-token"), "{e}");
    let e = err("[routes.r.auth]\ntype = \"basic\"\nhtpasswd = \"u\"\nkeys = [\"k.pem\"]\n");
    assert!(e.contains("routes.r.auth.keys: does not apply to type = \"basic\""), "{e}");
    let e = err("[routes.r.auth]\ntype = \"jwt\"\nkeys = [\"k.pem\"]\n");
    assert!(e.contains("routes.r.auth.algorithms: type = \"jwt\" needs the accepted algorithms"), "{e}");
}

// ---- JWT ----

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

/// A key pair generated now: (private PKCS#8 PEM, public SPKI PEM).
fn key_pair(alg: &'static rcgen::SignatureAlgorithm) -> (String, String) {
    let kp = rcgen::KeyPair::generate_for(alg).unwrap();
    (kp.serialize_pem(), kp.public_key_pem())
}

struct Issuer {
    rsa: (String, String),
    ec: (String, String),
    ed: (String, String),
    dir: tempfile::TempDir,
}

impl Issuer {
    fn new() -> Issuer {
        Issuer {
            rsa: key_pair(&rcgen::PKCS_RSA_SHA256),
            ec: key_pair(&rcgen::PKCS_ECDSA_P256_SHA256),
            ed: key_pair(&rcgen::PKCS_ED25519),
            dir: tempfile::tempdir().unwrap(),
        }
    }

    /// The route's auth table: the three public keys, RS256/ES256/EdDSA, aud, iss, routes claim.
    fn route(&self, extra: &str) -> String {
        let keys: Vec<String> = [("rsa.pem", &self.rsa.1), ("ec.pem", &self.ec.1), ("ed.pem", &self.ed.1)]
            .iter()
            .map(|(name, pem)| format!("{:?}", write(self.dir.path(), name, pem).display().to_string()))
            .collect();
        format!(
            "{extra}\n[routes.j.auth]\ntype = \"jwt\"\nkeys = [{}]\nalgorithms = [\"RS256\", \"ES256\", \"EdDSA\"]\n\
             audience = [\"wsgate\"]\nissuer = [\"https://issuer.test\"]\nleeway_secs = 0\nroutes_claim = \"routes\"\n",
            keys.join(", ")
        )
    }

    fn claims(&self) -> serde_json::Value {
        json!({"sub": "alice", "aud": "wsgate", "iss": "https://issuer.test", "exp": now() + 600, "routes": ["j"]})
    }

    fn sign(&self, alg: Algorithm, claims: &serde_json::Value) -> String {
        let key = match alg {
            Algorithm::RS256 => EncodingKey::from_rsa_pem(self.rsa.0.as_bytes()),
            Algorithm::ES256 => EncodingKey::from_ec_pem(self.ec.0.as_bytes()),
            Algorithm::EdDSA => EncodingKey::from_ed_pem(self.ed.0.as_bytes()),
            _ => unreachable!(),
        };
        encode(&Header::new(alg), claims, &key.unwrap()).unwrap()
    }
}

/// Good RS256, ES256 and EdDSA tokens pass byte for byte with `sub` as the user; a bad
/// signature, `alg: none`, HS256 keyed with the RS256 public key, expired, not yet valid, wrong
/// aud and wrong iss each get 401; a token whose routes claim lacks the route gets 403; none of
/// the refused reaches the backend.
#[tokio::test]
async fn jwt_checks() {
    let issuer = Issuer::new();
    let backend = Backend::echo().await;
    let (logs, _guard) = Logs::capture();
    let gw = Gateway::builder().route_with("j", "/j", &backend.target(), &issuer.route("")).start().await;
    let b64 = |v: serde_json::Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
    let with = |k: &str, v: serde_json::Value| {
        let mut c = issuer.claims();
        c[k] = v;
        c
    };
    let other = Issuer::new();
    let refused = [
        ("bad signature", other.sign(Algorithm::RS256, &issuer.claims())),
        ("alg none", format!("{}.{}.", b64(json!({"alg": "none", "typ": "JWT"})), b64(issuer.claims()))),
        (
            "HS256 keyed with the RS256 public key",
            encode(
                &Header::new(Algorithm::HS256),
                &issuer.claims(),
                &EncodingKey::from_secret(issuer.rsa.1.as_bytes()).unwrap(),
            )
            .unwrap(),
        ),
        ("expired", issuer.sign(Algorithm::RS256, &with("exp", json!(now() - 30)))),
        ("not yet valid", issuer.sign(Algorithm::ES256, &with("nbf", json!(now() + 300)))),
        ("wrong aud", issuer.sign(Algorithm::EdDSA, &with("aud", json!("someone-else")))),
        ("wrong iss", issuer.sign(Algorithm::RS256, &with("iss", json!("https://evil.test")))),
        (
            "no exp",
            issuer.sign(Algorithm::RS256, &{
                let mut c = issuer.claims();
                c.as_object_mut().unwrap().remove("exp");
                c
            }),
        ),
    ];
    for (what, token) in &refused {
        let (status, head) = upgrade_status(&gw, "/j", &format!("Authorization: Bearer {token}\r\n")).await;
        assert_eq!(status, 401, "{what}: {head}");
        assert!(head.contains("error=\"invalid_token\""), "{what}: {head}");
    }
    let elsewhere = issuer.sign(Algorithm::RS256, &with("routes", json!("vnc other")));
    let (status, head) = upgrade_status(&gw, "/j", &format!("Authorization: Bearer {elsewhere}\r\n")).await;
    assert_eq!(status, 403, "{head}");
    assert_eq!(backend.accepted(), 0, "a refused token reached the backend");
    for (i, alg) in [Algorithm::RS256, Algorithm::ES256, Algorithm::EdDSA].into_iter().enumerate() {
        let token = issuer.sign(alg, &issuer.claims());
        let mut ws = gw.ws_with("/j", &[("authorization", &format!("Bearer {token}"))]).await.unwrap();
        echoes(&mut ws, i as u64).await;
        ws.close(None).await.unwrap();
        expect_end(&mut ws).await;
    }
    assert_eq!(backend.accepted(), 3);
    eventually("session log names sub", || async { logs.text().contains("user=\"alice\"") }).await;
    let text = logs.text();
    for (what, token) in &refused {
        assert!(!text.contains(token.as_str()), "{what}: the token reached the log");
    }
}

/// With `close_at_expiry`, a session whose JWT expires is closed with 4401 "credentials
/// expired" at `exp` (plus the grace, here 0), after relaying normally until then.
#[tokio::test]
async fn session_closes_when_its_jwt_expires() {
    let issuer = Issuer::new();
    let backend = Backend::echo().await;
    let route = issuer.route("") + "close_at_expiry = true\nexpiry_grace_secs = 0\n";
    let gw = Gateway::builder().route_with("j", "/j", &backend.target(), &route).start().await;
    let mut claims = issuer.claims();
    claims["exp"] = json!(now() + 2);
    let token = issuer.sign(Algorithm::ES256, &claims);
    let mut ws = gw.ws_with("/j", &[("authorization", &format!("Bearer {token}"))]).await.unwrap();
    echoes(&mut ws, 9).await;
    let (_, code, reason) = read_until_close(&mut ws).await;
    assert_eq!((code, reason.as_str()), (4401, "credentials expired"));
    assert!(now() >= claims["exp"].as_u64().unwrap(), "closed before exp");
    eventually("counted as a limit", || async {
        scrape(&gw, "wsgate_session_limits_total", &[("limit", "credentials_expired")]).await == 1.0
    })
    .await;
}

// ---- HTTP Basic ----

/// bcrypt (cost 4) and argon2 (small parameters) users pass byte for byte; a wrong password, an
/// unknown user and no credentials get 401 with the Basic challenge and reach no backend; a
/// plain-text line is refused at load naming file and line.
#[tokio::test]
async fn basic_users() {
    use argon2::password_hash::PasswordHasher;
    let dir = tempfile::tempdir().unwrap();
    let argon = argon2::Argon2::new(
        argon2::Algorithm::Argon2id,
        argon2::Version::V0x13,
        argon2::Params::new(1024, 1, 1, None).unwrap(),
    );
    let lines = format!(
        "# test users\nalice:{}\nbob:{}\n",
        bcrypt::hash("alice-pw", 4).unwrap(),
        argon.hash_password(b"bob-pw").unwrap()
    );
    let htpasswd = write(dir.path(), "users.htpasswd", &lines);
    let backend = Backend::echo().await;
    let route = format!(
        "[routes.u.auth]\ntype = \"basic\"\nhtpasswd = {:?}\nrealm = \"ops\"\n",
        htpasswd.display().to_string()
    );
    let gw = Gateway::builder().route_with("u", "/u", &backend.target(), &route).start().await;
    let basic = |user: &str, pw: &str| {
        format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pw}")))
    };
    for extra in [
        "".to_string(),
        format!("Authorization: {}\r\n", basic("alice", "bob-pw")),
        format!("Authorization: {}\r\n", basic("carol", "alice-pw")),
    ] {
        let (status, head) = upgrade_status(&gw, "/u", &extra).await;
        assert_eq!(status, 401, "{extra}: {head}");
        assert!(head.contains("www-authenticate: basic realm=\"ops\", charset=\"utf-8\"\r"), "{head}");
    }
    assert_eq!(backend.accepted(), 0);
    for (i, (user, pw)) in [("alice", "alice-pw"), ("bob", "bob-pw")].into_iter().enumerate() {
        let mut ws = gw.ws_with("/u", &[("authorization", &basic(user, pw))]).await.unwrap();
        echoes(&mut ws, i as u64).await;
    }
    assert_eq!(backend.accepted(), 2);
    std::fs::write(&htpasswd, format!("{lines}mallory:hunter2\n")).unwrap();
    let config = wsgate::config::parse(
        &Gateway::builder().route_with("u", "/u", "127.0.0.1:9", &route).toml(),
        Path::new("t.toml"),
    )
    .unwrap();
    let errors = wsgate::auth::load(&config).unwrap_err();
    let e = errors[0].to_string();
    assert!(e.contains("users.htpasswd:4: routes.u.auth.htpasswd: not a bcrypt") && !e.contains("hunter2"), "{e}");
}

/// With `user_label`, sessions are counted by user: the first 100 distinct users of a route by
/// name, the rest, and names over 64 bytes, as `other`; without it, no user series at all.
#[tokio::test]
async fn sessions_are_counted_by_user_only_where_configured() {
    let dir = tempfile::tempdir().unwrap();
    let mut lines = String::new();
    for i in 0..101 {
        lines.push_str(&format!("user{i}=sha256:{}\n", sha256_hex(&format!("token-{i}"))));
    }
    lines.push_str(&format!("{}=sha256:{}\n", "x".repeat(65), sha256_hex("long-name")));
    let file = write(dir.path(), "tokens.txt", &lines);
    let backend = Backend::echo().await;
    let labelled = format!("{}user_label = true\n", bearer_route(&file, ""));
    let gw = Gateway::builder()
        .route_with("b", "/b", &backend.target(), &labelled)
        .route_with("plain", "/p", &backend.target(), &bearer_route(&file, "").replace("routes.b.", "routes.plain."))
        .start()
        .await;
    let open = |path: &'static str, token: String| {
        let gw = &gw;
        async move {
            let mut ws = gw.ws_with(path, &[("authorization", &format!("Bearer {token}"))]).await.unwrap();
            send_binary(&mut ws, b"hi").await;
            assert_eq!(read_bytes(&mut ws, 2).await, b"hi");
        }
    };
    for i in 0..101 {
        open("/b", format!("token-{i}")).await;
    }
    open("/b", "token-0".to_string()).await;
    open("/b", "long-name".to_string()).await;
    open("/p", "token-1".to_string()).await;
    let users = |user: &'static str| [("route", "b"), ("user", user)];
    assert_eq!(scrape(&gw, "wsgate_user_sessions_total", &users("user0")).await, 2.0);
    assert_eq!(scrape(&gw, "wsgate_user_sessions_total", &users("user99")).await, 1.0);
    assert_eq!(scrape(&gw, "wsgate_user_sessions_total", &users("other")).await, 2.0, "user100 and the long name");
    let text = admin_get(&gw, "/metrics").await.1;
    assert!(!text.contains("user100") && !text.contains(&"x".repeat(65)), "unbounded labels");
    assert!(!text.contains("wsgate_user_sessions_total{route=\"plain\""), "a route without user_label");
}

/// Password guesses checked side by side all pass the guard's first question; once one of them
/// reaches `max_auth_failures`, those still being checked are answered 429 whatever their
/// password, so a guesser learns of no more wrong guesses than the guard counts.
#[tokio::test]
async fn concurrent_password_guesses_get_no_more_answers_than_the_guard_counts() {
    let dir = tempfile::tempdir().unwrap();
    let htpasswd = write(dir.path(), "users.htpasswd", &format!("alice:{}\n", bcrypt::hash("alice-pw", 4).unwrap()));
    let backend = Backend::echo().await;
    let route = format!("[routes.u.auth]\ntype = \"basic\"\nhtpasswd = {:?}\n", htpasswd.display().to_string());
    let gw = Gateway::builder()
        .route_with("u", "/u", &backend.target(), &route)
        .limit("per_client.max_auth_failures", "3")
        .limit("max_password_checks", "4")
        .start()
        .await;
    let guess = |i: usize| {
        let addr = gw.plain;
        async move {
            let pw = if i == 11 { "alice-pw".to_string() } else { format!("guess-{i}") };
            let token = base64::engine::general_purpose::STANDARD.encode(format!("alice:{pw}"));
            let s = connect_from("127.0.0.2".parse().unwrap(), addr).await.unwrap();
            raw_http_on(s, &upgrade_request("/u", &format!("Authorization: Basic {token}\r\n"))).await.0
        }
    };
    let statuses = futures_util::future::join_all((0..12).map(guess)).await;
    // The right password may be answered too, if its check ends before the block begins.
    let wrong_answered = statuses.iter().filter(|&&s| s == 401).count();
    assert!(wrong_answered <= 3, "answers beyond the guard's count: {statuses:?}");
    assert!(statuses.iter().all(|&s| [401, 101, 429, 503].contains(&s)), "{statuses:?}");
    assert!(statuses.contains(&429), "{statuses:?}");
}
