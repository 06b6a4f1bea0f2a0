use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use futures_util::{SinkExt, StreamExt};
use rustls::HandshakeKind;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_tungstenite::client_async;
use tokio_tungstenite::tungstenite::Message;

use crate::support::*;

/// A wss gateway with a `/echo` route, its config written to a file (so reloads reread it);
/// `tls_keys` go into the listener's `tls` table.
struct Setup {
    dir: tempfile::TempDir,
    ca: TestCa,
}

impl Setup {
    fn new() -> Setup {
        Setup { dir: tempfile::tempdir().unwrap(), ca: TestCa::new() }
    }

    fn write(&self, tls_keys: &str) -> std::path::PathBuf {
        let text = format!(
            "[listeners.plain]\naddress = \"127.0.0.1:0\"\n[listeners.secure]\naddress = \"127.0.0.1:0\"\ntls = {{ cert = {:?}, key = {:?}{tls_keys} }}\n\
             [routes.echo]\npath = \"/echo\"\nbackend = \"builtin:echo\"\n\
             [shutdown]\ndrain_delay_secs = 0\nclose_window_secs = 0\ndeadline_secs = 2\n\
             [admin]\naddress = \"127.0.0.1:0\"\n",
            self.ca.cert_path(),
            self.ca.key_path(),
        );
        let path = self.dir.path().join("wsgate.toml");
        std::fs::write(&path, text).unwrap();
        path
    }

    /// A client that remembers sessions, as browsers do.
    fn client(&self) -> Arc<rustls::ClientConfig> {
        self.ca.client_config()
    }
}

fn keys_file(dir: &Path, name: &str, keys: &[&str]) -> String {
    let path = dir.join(name);
    std::fs::write(&path, keys.iter().map(|k| format!("{k}\n")).collect::<String>()).unwrap();
    path.display().to_string()
}

/// Opens a wss session on `/echo` with `client`, checks a message comes back byte for byte,
/// and says whether the TLS handshake was full or resumed.
async fn session(addr: SocketAddr, client: &Arc<rustls::ClientConfig>) -> HandshakeKind {
    let tcp = within("tcp connect", TcpStream::connect(addr)).await.unwrap();
    let connector = tokio_rustls::TlsConnector::from(client.clone());
    let tls = within("tls handshake", connector.connect(ServerName::try_from("localhost").unwrap(), tcp))
        .await
        .expect("tls handshake");
    let kind = tls.get_ref().1.handshake_kind().expect("handshake done");
    let (mut ws, _) = within("wss handshake", client_async(format!("wss://localhost:{}/echo", addr.port()), tls))
        .await
        .expect("wss handshake");
    let payload = payload(3000, 11);
    within("send", ws.send(Message::Binary(payload.clone().into()))).await.unwrap();
    match within("echo", ws.next()).await {
        Some(Ok(Message::Binary(back))) => assert_eq!(back.as_ref(), &payload[..]),
        other => panic!("expected the echo, got {other:?}"),
    }
    // TLS 1.3 tickets arrive after the handshake; reading the echo has read them too.
    let _ = within("close", ws.close(None)).await;
    kind
}

/// Tickets survive a reload: a client resumes before and after SIGHUP's reload, and the
/// handshakes are counted by kind.
#[tokio::test]
async fn sessions_resume_across_a_reload() {
    let setup = Setup::new();
    let config = setup.write("");
    let gw = Gateway::from_file(&config).await;
    let addr = gw.secure.unwrap();
    let client = setup.client();
    assert_eq!(session(addr, &client).await, HandshakeKind::Full);
    assert_eq!(session(addr, &client).await, HandshakeKind::Resumed);
    gw.reloader.reload_file(&config).expect("reload");
    assert_eq!(session(addr, &client).await, HandshakeKind::Resumed, "resumed after the reload");
    // A client that remembers nothing makes a full handshake.
    assert_eq!(session(addr, &setup.client()).await, HandshakeKind::Full);
    let full = [("listener", "secure"), ("kind", "full")];
    let resumed = [("listener", "secure"), ("kind", "resumed")];
    assert_eq!(scrape(&gw, "wsgate_tls_handshakes_total", &full).await, 2.0);
    assert_eq!(scrape(&gw, "wsgate_tls_handshakes_total", &resumed).await, 2.0);
}

/// Replicas given the same `ticket_keys` file resume each other's sessions, as behind a
/// balancer; a replica with other keys cannot, and a rotated file (new key first, old kept)
/// still opens the old tickets.
#[tokio::test]
async fn replicas_sharing_ticket_keys_resume_each_others_sessions() {
    let (a, b, c) = ("11".repeat(32), "22".repeat(32), "33".repeat(32));
    let setup = Setup::new();
    let shared = keys_file(setup.dir.path(), "shared.keys", &[&a]);
    let config = setup.write(&format!(", ticket_keys = {shared:?}"));
    let one = Gateway::from_file(&config).await;
    let two = Gateway::from_file(&config).await;
    let client = setup.client();
    assert_eq!(session(one.secure.unwrap(), &client).await, HandshakeKind::Full);
    assert_eq!(session(two.secure.unwrap(), &client).await, HandshakeKind::Resumed, "the other replica");

    // A third replica with keys of its own makes a full handshake for the same client.
    let own = keys_file(setup.dir.path(), "own.keys", &[&b]);
    let other = setup.dir.path().join("other.toml");
    std::fs::write(&other, std::fs::read_to_string(&config).unwrap().replace(&shared, &own)).unwrap();
    let three = Gateway::from_file(&other).await;
    let fresh = setup.client();
    assert_eq!(session(one.secure.unwrap(), &fresh).await, HandshakeKind::Full);
    assert_eq!(session(three.secure.unwrap(), &fresh).await, HandshakeKind::Full, "foreign keys");

    // Rotation on replica two: a new key first, the old one kept to open what it sealed.
    let rotating = setup.client();
    assert_eq!(session(one.secure.unwrap(), &rotating).await, HandshakeKind::Full);
    keys_file(setup.dir.path(), "shared.keys", &[&c, &a]);
    two.reloader.reload_file(&config).expect("reload with a rotated key file");
    assert_eq!(session(two.secure.unwrap(), &rotating).await, HandshakeKind::Resumed, "old key still opens");
    // Once the old key is dropped, tickets sealed with it open no more.
    let old = setup.client();
    assert_eq!(session(one.secure.unwrap(), &old).await, HandshakeKind::Full);
    keys_file(setup.dir.path(), "shared.keys", &[&c]);
    two.reloader.reload_file(&config).expect("reload without the old key");
    assert_eq!(session(two.secure.unwrap(), &old).await, HandshakeKind::Full, "old key dropped");
}

/// A bad key file fails the start and refuses a reload, naming the file and line and never
/// quoting the line; the running keys stay.
#[tokio::test]
async fn a_bad_ticket_keys_file_is_refused_and_never_quoted() {
    let setup = Setup::new();
    let secret = "ab".repeat(31);
    let keys = keys_file(setup.dir.path(), "fleet.keys", &[&"cd".repeat(32)]);
    let config = setup.write(&format!(", ticket_keys = {keys:?}"));
    let gw = Gateway::from_file(&config).await;
    let client = setup.client();
    assert_eq!(session(gw.secure.unwrap(), &client).await, HandshakeKind::Full);

    keys_file(setup.dir.path(), "fleet.keys", &[&"cd".repeat(32), &secret]);
    let e = gw.reloader.reload_file(&config).expect_err("a malformed key is refused").to_string();
    assert!(e.contains("fleet.keys: line 2: not a key"), "{e}");
    assert!(!e.contains(&secret), "the key text is never quoted: {e}");
    assert_eq!(session(gw.secure.unwrap(), &client).await, HandshakeKind::Resumed, "running keys kept");

    let off = setup.write(&format!(", session_tickets = false, ticket_keys = {keys:?}"));
    let e = wsgate::config::load(&off).expect_err("ticket_keys without tickets").to_string();
    assert!(e.contains("listeners.secure.tls.ticket_keys: needs session_tickets = true"), "{e}");
}

/// A reload that is refused after it made new ticket keys (a key file, beside a route whose
/// password file is missing) leaves the running keys as they were: once the config in force is
/// reloaded again, clients still resume.
#[tokio::test]
async fn a_refused_reload_leaves_the_running_ticket_keys() {
    let setup = Setup::new();
    let config = setup.write("");
    let gw = Gateway::from_file(&config).await;
    let addr = gw.secure.unwrap();
    let client = setup.client();
    assert_eq!(session(addr, &client).await, HandshakeKind::Full);

    let keys = keys_file(setup.dir.path(), "fleet.keys", &[&"cd".repeat(32)]);
    let refused = setup.dir.path().join("refused.toml");
    let missing = setup.dir.path().join("missing.htpasswd");
    let text = std::fs::read_to_string(setup.write(&format!(", ticket_keys = {keys:?}"))).unwrap()
        + &format!(
            "[routes.guarded]\npath = \"/guarded\"\nbackend = \"builtin:echo\"\n[routes.guarded.auth]\ntype = \"basic\"\nhtpasswd = {:?}\n",
            missing.display().to_string()
        );
    std::fs::write(&refused, text).unwrap();
    let e = gw.reloader.reload_file(&refused).expect_err("a missing password file is refused").to_string();
    assert!(e.contains("missing.htpasswd"), "{e}");

    let config = setup.write("");
    gw.reloader.reload_file(&config).expect("reload of the config in force");
    assert_eq!(session(addr, &client).await, HandshakeKind::Resumed, "the running keys were kept");
}

/// `session_tickets = false`: no tickets, but the session cache still resumes (TLS 1.3 by
/// stateful session IDs), also after a reload.
#[tokio::test]
async fn without_tickets_the_cache_still_resumes() {
    let setup = Setup::new();
    let config = setup.write(", session_tickets = false");
    let gw = Gateway::from_file(&config).await;
    let client = setup.client();
    assert_eq!(session(gw.secure.unwrap(), &client).await, HandshakeKind::Full);
    assert_eq!(session(gw.secure.unwrap(), &client).await, HandshakeKind::Resumed);
    gw.reloader.reload_file(&config).expect("reload");
    assert_eq!(session(gw.secure.unwrap(), &client).await, HandshakeKind::Resumed);
}
