//! Token-mapped targets (`[routes.NAME.targets]`): a map of 50 tokens routed byte for byte, a
//! map file edited and reloaded under a live session, websockify's file format as it is, JWT
//! claims, and the allow-list: every refused target is checked to have connected nothing, and
//! no token reaches a log line. The real noVNC page is in `novnc`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use serde_json::json;
use tokio::net::TcpStream;

use crate::support::*;

mod novnc;

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// A token-mapped route `m` at `/m/` (path tokens), with `keys` (TOML lines) in its targets table.
fn mapped_route(keys: &str) -> String {
    format!("[routes.m]\npath = \"/m/\"\nmatch = \"prefix\"\n[routes.m.targets]\n{keys}\n")
}

/// (status, body) of an upgrade request to `path`.
async fn upgrade_status(gw: &Gateway, path: &str) -> (u16, String) {
    let (status, _, body) = raw_http(gw.plain, &upgrade_request(path, "")).await;
    (status, body)
}

/// Sends a payload through an open session and expects it back byte for byte.
async fn echoes(ws: &mut Ws, seed: u64) {
    let data = payload(20_000, seed);
    send_binary(ws, &data).await;
    assert!(read_bytes(ws, data.len()).await == data, "payload came back altered");
}

/// Waits until `backend` has accepted a connection the test makes itself, after whatever the
/// gateway may have made before it: a listener accepts in order, so when this count is reached
/// every earlier connection has been counted too. Returns the connections made before it.
async fn accepted_before_marker(backend: &Backend) -> usize {
    let before = backend.accepted();
    let _marker = within("marker connect", TcpStream::connect(backend.addr)).await.unwrap();
    eventually("the marker connection to be accepted", || async { backend.accepted() > before }).await;
    backend.accepted() - 1
}

/// 50 tokens in a TOML map each reach their own backend, byte for byte; unknown, missing and
/// two-segment tokens are 404 before any backend is dialled, counted by reason; no token is in
/// any log line, at trace level.
#[tokio::test]
async fn fifty_tokens_reach_their_own_backends() {
    let dir = tempfile::tempdir().unwrap();
    let mut backends = Vec::new();
    for _ in 0..50 {
        backends.push(Backend::echo().await);
    }
    let token = |i: usize| format!("desk-{i:02}-q7Zr");
    let map: String =
        backends.iter().enumerate().map(|(i, b)| format!("\"{}\" = \"{}\"\n", token(i), b.addr)).collect();
    let file = write(dir.path(), "tokens.toml", &map);
    let (logs, _guard) = Logs::capture_at(tracing::Level::TRACE);
    let route = mapped_route(&format!(
        "map_file = {:?}\nallow = [\"127.0.0.1/32\"]\nallow_ports = [\"1-65535\"]",
        file.display().to_string()
    ));
    let gw = Gateway::builder().route_toml(&route).start().await;
    for (i, backend) in backends.iter().enumerate() {
        let mut ws = gw.ws(&format!("/m/{}", token(i))).await;
        echoes(&mut ws, i as u64).await;
        assert_eq!(backend.accepted(), 1, "token {i} reached its backend once");
        drop(ws);
    }
    assert!(backends.iter().all(|b| b.accepted() == 1), "every backend got exactly its own session");
    for (path, body) in [
        ("/m/desk-99-q7Zr", "unknown target token"),
        ("/m/", "no target token"),
        ("/m/desk-01-q7Zr/extra", "unknown target token"),
        ("/m/desk-01-q7Zr%2Fx", "unknown target token"),
    ] {
        assert_eq!(upgrade_status(&gw, path).await, (404, format!("{body}\n")), "{path}");
    }
    // A percent-encoded token is the token.
    let mut ws = gw.ws("/m/desk%2D03-q7Zr").await;
    echoes(&mut ws, 77).await;
    assert_eq!(backends[3].accepted(), 2);
    assert!(backends.iter().enumerate().all(|(i, b)| b.accepted() == if i == 3 { 2 } else { 1 }));
    assert_eq!(scrape(&gw, "wsgate_target_refusals_total", &[("route", "m"), ("reason", "unknown_token")]).await, 3.0);
    assert_eq!(scrape(&gw, "wsgate_target_refusals_total", &[("route", "m"), ("reason", "missing_token")]).await, 1.0);
    assert_eq!(scrape(&gw, "wsgate_handshakes_total", &[("route", "m"), ("status", "101")]).await, 51.0);
    let text = logs.text();
    assert!(text.contains("unknown target token"), "the refusals are logged:\n{text}");
    assert!(!text.contains("q7Zr"), "a token reached the log:\n{text}");
}

/// Editing the map file and reloading changes where new sessions go, while a session opened
/// before carries on with its backend byte for byte; a map that cannot be read is refused whole
/// (naming file, line and key, not the token) and the map in force stays.
#[tokio::test]
async fn reload_changes_new_sessions_only() {
    let dir = tempfile::tempdir().unwrap();
    let (old, new) = (Backend::echo().await, Backend::echo().await);
    let file = write(dir.path(), "tokens.toml", &format!("lab = \"{}\"\ngone = \"{}\"\n", old.addr, old.addr));
    let route = mapped_route(&format!(
        "map_file = {:?}\nallow = [\"127.0.0.0/8\"]\nallow_ports = [\"1024-65535\"]",
        file.display().to_string()
    ));
    let config = write(dir.path(), "wsgate.toml", &Gateway::builder().route_toml(&route).toml());
    let gw = Gateway::from_file(&config).await;
    let mut live = gw.ws("/m/lab").await;
    echoes(&mut live, 1).await;
    assert_eq!((old.accepted(), new.accepted()), (1, 0));

    write(dir.path(), "tokens.toml", &format!("lab = \"{}\"\n", new.addr));
    gw.reloader.reload_file(&config).unwrap();
    let mut fresh = gw.ws("/m/lab").await;
    echoes(&mut fresh, 2).await;
    assert_eq!((old.accepted(), new.accepted()), (1, 1), "the new session went to the new target");
    echoes(&mut live, 3).await;
    assert_eq!(old.accepted(), 1, "the live session kept its connection");
    assert_eq!(upgrade_status(&gw, "/m/gone").await.0, 404, "a token taken out of the map is unknown");

    write(dir.path(), "tokens.toml", &format!("lab = \"{}\"\nsecret-lab = \"nowhere\"\n", old.addr));
    let e = gw.reloader.reload_file(&config).unwrap_err().to_string();
    assert!(e.contains("tokens.toml:2: routes.m.targets.map_file: expected token: host:port"), "{e}");
    assert!(!e.contains("secret-lab"), "{e}");
    let mut again = gw.ws("/m/lab").await;
    echoes(&mut again, 4).await;
    assert_eq!(new.accepted(), 2, "the map in force stayed");
    echoes(&mut live, 5).await;
}

/// A websockify token file works as websockify reads it (comments, blank lines, `token: host:port`,
/// the token in `?token=`, noVNC's convention); the format follows from the file name.
#[tokio::test]
async fn websockify_file_works_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (Backend::echo().await, Backend::echo().await);
    let file = write(
        dir.path(),
        "vnc_tokens",
        &format!(
            "# websockify TokenFile\n\nalpha: 127.0.0.1:{}\n  beta:\t127.0.0.1:{}  \n",
            a.addr.port(),
            b.addr.port()
        ),
    );
    let route = format!(
        "[routes.w]\npath = \"/websockify\"\n[routes.w.targets]\ntoken = \"query\"\nmap_file = {:?}\n\
         allow = [\"127.0.0.1\"]\nallow_ports = [\"{}-{}\", {}]\n",
        file.display().to_string(),
        a.addr.port(),
        a.addr.port(),
        b.addr.port()
    );
    let gw = Gateway::builder().route_toml(&route).start().await;
    let mut ws = gw.ws("/websockify?token=beta").await;
    echoes(&mut ws, 1).await;
    let mut ws = gw.ws("/websockify?x=1&token=alpha").await;
    echoes(&mut ws, 2).await;
    assert_eq!((a.accepted(), b.accepted()), (1, 1));
    assert_eq!(upgrade_status(&gw, "/websockify?token=gamma").await.0, 404);
    assert_eq!(upgrade_status(&gw, "/websockify?tokens=alpha").await.0, 404);
}

/// Targets outside the allow-list are refused with 403 before anything connects, whatever the
/// route says of backends that are down: a literal outside the networks, a name resolving
/// outside them (`localhost` → 127.0.0.1 with only 127.0.0.2 allowed), the IPv4-mapped IPv6
/// and `0.0.0.0` forms of the same address, and a port outside the ranges. Each trap listener
/// then proves it accepted nothing; the allowed target in the same map connects, written
/// plainly or IPv4-mapped.
#[tokio::test]
async fn targets_outside_the_allow_list_connect_nothing() {
    let dir = tempfile::tempdir().unwrap();
    // Listens on 127.0.0.1: what every disallowed form below would reach.
    let trap = Backend::echo().await;
    // Allowed network, port outside the ranges.
    let trap2 = Backend::echo_on("127.0.0.2:0".parse().unwrap()).await;
    let allowed = Backend::echo_on("127.0.0.2:0".parse().unwrap()).await;
    let p = trap.addr.port();
    let map = format!(
        "loop = \"127.0.0.1:{p}\"\nname = \"localhost:{p}\"\nmapped = \"[::ffff:127.0.0.1]:{p}\"\n\
         zero = \"0.0.0.0:{p}\"\nport = \"{}\"\nok = \"{}\"\nok-mapped = \"[::ffff:127.0.0.2]:{}\"\n",
        trap2.addr,
        allowed.addr,
        allowed.addr.port()
    );
    let file = write(dir.path(), "tokens.toml", &map);
    let route = mapped_route(&format!(
        "map_file = {:?}\nallow = [\"127.0.0.2/32\"]\nallow_ports = [{p}, {}]",
        file.display().to_string(),
        allowed.addr.port()
    ));
    let (logs, _guard) = Logs::capture();
    let gw = Gateway::builder().route_toml(&route).start().await;
    for token in ["loop", "name", "mapped", "zero", "port"] {
        assert_eq!(upgrade_status(&gw, &format!("/m/{token}")).await, (403, "target not allowed\n".into()), "{token}");
    }
    assert_eq!(accepted_before_marker(&trap).await, 0, "a refused target was connected");
    assert_eq!(accepted_before_marker(&trap2).await, 0, "a refused port was connected");
    let mut ws = gw.ws("/m/ok").await;
    echoes(&mut ws, 9).await;
    // The IPv4-mapped form of an allowed address is that address, and connects.
    let mut ws = gw.ws("/m/ok-mapped").await;
    echoes(&mut ws, 10).await;
    assert_eq!(allowed.accepted(), 2);
    let refused = [("route", "m"), ("reason", "not_allowed")];
    assert_eq!(scrape(&gw, "wsgate_target_refusals_total", &refused).await, 5.0);
    assert_eq!(scrape(&gw, "wsgate_backend_connect_failures_total", &[("route", "m")]).await, 0.0);
    assert!(logs.text().contains("target not allowed"), "{}", logs.text());
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

/// An RS256 key pair generated now: (private PKCS#8 PEM, public SPKI PEM).
fn rsa_pair() -> (String, String) {
    let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256).unwrap();
    (kp.serialize_pem(), kp.public_key_pem())
}

fn sign(private_pem: &str, claims: &serde_json::Value) -> String {
    let key = EncodingKey::from_rsa_pem(private_pem.as_bytes()).unwrap();
    encode(&Header::new(Algorithm::RS256), claims, &key).unwrap()
}

/// A JWT's `host` and `port` claims name the target: a good token is bridged byte for byte; a
/// bad signature, an expired token, a wrong audience and a token naming no target are 403; a
/// well-signed token naming a target outside the allow-list is 403 and connects nothing.
#[tokio::test]
async fn jwt_targets() {
    let dir = tempfile::tempdir().unwrap();
    let (private, public) = rsa_pair();
    let (other_private, _) = rsa_pair();
    let key = write(dir.path(), "issuer.pem", &public);
    let backend = Backend::echo().await;
    let outside = Backend::echo_on("127.0.0.3:0".parse().unwrap()).await;
    let route = mapped_route(&format!(
        "allow = [\"127.0.0.1\"]\nallow_ports = [{}, {}]\n[routes.m.targets.jwt]\nkeys = [{:?}]\n\
         algorithms = [\"RS256\"]\naudience = [\"vnc\"]\nleeway_secs = 0",
        backend.addr.port(),
        outside.addr.port(),
        key.display().to_string()
    ));
    let (logs, _guard) = Logs::capture();
    let gw = Gateway::builder().route_toml(&route).start().await;
    let claims = |addr: SocketAddr, exp: u64| json!({"host": addr.ip().to_string(), "port": addr.port(), "exp": exp, "aud": "vnc"});
    let good = sign(&private, &claims(backend.addr, now() + 600));
    let mut ws = gw.ws(&format!("/m/{good}")).await;
    echoes(&mut ws, 1).await;
    assert_eq!(backend.accepted(), 1);

    let mut wrong_aud = claims(backend.addr, now() + 600);
    wrong_aud["aud"] = json!("other");
    let mut no_target = claims(backend.addr, now() + 600);
    no_target.as_object_mut().unwrap().remove("port");
    for (token, reason) in [
        (sign(&other_private, &claims(backend.addr, now() + 600)), "invalid target token: bad signature"),
        (sign(&private, &claims(backend.addr, now() - 60)), "invalid target token: token expired"),
        (sign(&private, &wrong_aud), "invalid target token: wrong audience"),
        (sign(&private, &no_target), "invalid target token: the token names no target (host, port)"),
        (sign(&private, &claims(outside.addr, now() + 600)), "target not allowed"),
    ] {
        assert_eq!(upgrade_status(&gw, &format!("/m/{token}")).await, (403, format!("{reason}\n")), "{reason}");
        assert!(!logs.text().contains(&token), "a token reached the log");
    }
    assert_eq!(accepted_before_marker(&backend).await, 1, "a refused token reached the backend");
    assert_eq!(accepted_before_marker(&outside).await, 0, "a target outside the allow-list was connected");
    let invalid = [("route", "m"), ("reason", "invalid_token")];
    assert_eq!(scrape(&gw, "wsgate_target_refusals_total", &invalid).await, 4.0);
    assert!(!logs.text().contains(&good), "a token reached the log");
}

/// `wsgate check` reads the map file as a start would: its summary names how many tokens the
/// map holds and the allow-list; a bad entry fails it, naming file, line and key, not the token.
#[test]
fn check_reads_the_map() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "desks.toml", "\"desk-secret-1\" = \"10.0.0.1:5901\"\n\"desk-secret-2\" = \"10.0.0.2:5902\"\n");
    let route = mapped_route("map_file = \"desks.toml\"\nallow = [\"10.0.0.0/24\"]\nallow_ports = [\"5900-5999\", 22]");
    let config = write(dir.path(), "wsgate.toml", &format!("[listeners.plain]\naddress = \"127.0.0.1:0\"\n{route}"));
    let check = || std::process::Command::new(env!("CARGO_BIN_EXE_wsgate")).arg("check").arg(&config).output().unwrap();
    let out = check();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        stdout.contains("targets  m            2 tokens in the map; allow 10.0.0.0/24; ports 5900-5999, 22"),
        "{stdout}"
    );
    write(dir.path(), "desks.toml", "\"desk-secret-1\" = \"10.0.0.1:5901\"\n\"desk-secret-2\" = \"10.0.0.2\"\n");
    let out = check();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr.contains("desks.toml:2: routes.m.targets.map_file: expected token: host:port"), "{stderr}");
    assert!(!stderr.contains("desk-secret"), "{stderr}");
}
