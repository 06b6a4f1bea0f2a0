//! Backend transports: Unix sockets (a path, and a Linux abstract name) and TLS to the backend
//! (over TCP and over a Unix socket), with the same byte-for-byte guarantees as TCP; an
//! untrusted or misnamed certificate refused (HTTP status, close code, log line, metric); a TLS
//! backend ending without close_notify is 1011; `wsgate check` reads and shows it all.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use rcgen::{BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tempfile::TempDir;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, UnixListener};
use tokio_rustls::TlsAcceptor;

use crate::support::*;

// ---------------------------------------------------------------------------------------------
// A test PKI and backends

/// A throw-away CA (made with rcgen), its PEM file, and certificates it signs.
struct Pki {
    dir: TempDir,
    issuer: Issuer<'static, KeyPair>,
    ca_der: CertificateDer<'static>,
}

impl Pki {
    fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        // A name of its own: two CAs with one name would look like issuer and issued.
        static CAS: AtomicUsize = AtomicUsize::new(0);
        let name = format!("wsgate test CA {}", CAS.fetch_add(1, Ordering::Relaxed));
        params.distinguished_name.push(rcgen::DnType::CommonName, name);
        let cert = params.self_signed(&key).unwrap();
        std::fs::write(dir.path().join("ca.pem"), cert.pem()).unwrap();
        Pki { dir, ca_der: cert.der().clone(), issuer: Issuer::new(params, key) }
    }

    fn ca_path(&self) -> String {
        self.dir.path().join("ca.pem").display().to_string()
    }

    /// A certificate for `names` with its key.
    fn leaf(&self, names: &[&str], usage: ExtendedKeyUsagePurpose) -> (CertificateDer<'static>, KeyPair) {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
        params.extended_key_usages = vec![usage];
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.der().clone(), key)
    }

    /// A backend's TLS config with a certificate for `names`; with `clients`, it requires a
    /// client certificate signed by this CA.
    fn server(&self, names: &[&str], clients: bool) -> Arc<rustls::ServerConfig> {
        let (cert, key) = self.leaf(names, ExtendedKeyUsagePurpose::ServerAuth);
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let builder = rustls::ServerConfig::builder_with_provider(wsgate::tls::provider())
            .with_safe_default_protocol_versions()
            .unwrap();
        let builder = if clients {
            let mut roots = rustls::RootCertStore::empty();
            roots.add(self.ca_der.clone()).unwrap();
            let verifier =
                rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), wsgate::tls::provider())
                    .build()
                    .unwrap();
            builder.with_client_cert_verifier(verifier)
        } else {
            builder.with_no_client_auth()
        };
        Arc::new(builder.with_single_cert(vec![cert], key).unwrap())
    }

    /// A client certificate and key signed by this CA, as PEM files: (cert, key).
    fn client_files(&self) -> (String, String) {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec!["gateway.test".to_string()]).unwrap();
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let (c, k) = (self.dir.path().join("client.pem"), self.dir.path().join("client-key.pem"));
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        (c.display().to_string(), k.display().to_string())
    }
}

/// What a test backend does with each connection.
#[derive(Clone)]
enum Behaviour {
    /// Echoes until EOF, then ends its side (with close_notify under TLS).
    Echo,
    /// Writes the bytes, then ends the TCP connection without close_notify.
    SayThenDrop(Vec<u8>),
    /// Writes the bytes, then ends with close_notify (and FIN).
    SayThenClose(Vec<u8>),
}

/// Counts connections (and, under TLS, completed handshakes) of a test backend.
#[derive(Default)]
struct Seen {
    connections: AtomicUsize,
    handshakes: AtomicUsize,
    /// Client certificates presented in completed handshakes.
    client_certs: AtomicUsize,
}

async fn handle<S>(stream: S, tls: Option<Arc<rustls::ServerConfig>>, behaviour: Behaviour, seen: Arc<Seen>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    seen.connections.fetch_add(1, Ordering::SeqCst);
    let Some(config) = tls else { return behave(stream, behaviour, |_| ()).await };
    let Ok(tls) = TlsAcceptor::from(config).accept(stream).await else { return };
    seen.handshakes.fetch_add(1, Ordering::SeqCst);
    if tls.get_ref().1.peer_certificates().is_some_and(|c| !c.is_empty()) {
        seen.client_certs.fetch_add(1, Ordering::SeqCst);
    }
    // Ending without close_notify: drop the socket under the TLS session.
    behave(tls, behaviour, |tls: tokio_rustls::server::TlsStream<S>| drop(tls.into_inner().0)).await
}

async fn behave<S: AsyncRead + AsyncWrite + Unpin>(mut s: S, behaviour: Behaviour, drop_raw: impl FnOnce(S)) {
    match behaviour {
        Behaviour::Echo => {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match s.read(&mut buf).await {
                    Ok(0) => {
                        let _ = s.shutdown().await;
                        return;
                    }
                    Ok(n) => {
                        if s.write_all(&buf[..n]).await.is_err() || s.flush().await.is_err() {
                            return;
                        }
                    }
                    Err(_) => return,
                }
            }
        }
        Behaviour::SayThenDrop(data) => {
            s.write_all(&data).await.unwrap();
            s.flush().await.unwrap();
            drop_raw(s);
        }
        Behaviour::SayThenClose(data) => {
            s.write_all(&data).await.unwrap();
            s.shutdown().await.unwrap();
            let mut rest = Vec::new();
            let _ = s.read_to_end(&mut rest).await;
        }
    }
}

/// A TCP backend on 127.0.0.1, under TLS with `tls`.
async fn tcp_backend(tls: Option<Arc<rustls::ServerConfig>>, behaviour: Behaviour) -> (SocketAddr, Arc<Seen>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Seen::default());
    let counts = seen.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(handle(stream, tls.clone(), behaviour.clone(), counts.clone()));
        }
    });
    (addr, seen)
}

/// A Unix-socket backend listening on `name` (a path, or `\0` and an abstract name).
fn unix_backend(name: &Path, tls: Option<Arc<rustls::ServerConfig>>, behaviour: Behaviour) -> Arc<Seen> {
    let listener = UnixListener::bind(name).unwrap();
    let seen = Arc::new(Seen::default());
    let counts = seen.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(handle(stream, tls.clone(), behaviour.clone(), counts.clone()));
        }
    });
    seen
}

/// The TOML lines of a `[routes.NAME.backend_tls]` table.
fn tls_table(route: &str, lines: &str) -> String {
    format!("[routes.{route}.backend_tls]\n{lines}")
}

/// Sends 10,000,000 bytes as one message and checks that they come back byte for byte, then
/// closes cleanly.
async fn ten_megabytes_round_trip(gw: &Gateway, path: &str, seed: u64) {
    let mut ws = gw.ws(path).await;
    let data = payload(10_000_000, seed);
    send_binary(&mut ws, &data).await;
    let back = read_bytes(&mut ws, data.len()).await;
    assert!(back == data, "{path}: the 10 MB payload came back altered");
    // And small messages after it, in order.
    for i in 0..20u8 {
        send_binary(&mut ws, &[i; 3]).await;
    }
    assert_eq!(read_bytes(&mut ws, 60).await, (0..20u8).flat_map(|i| [i; 3]).collect::<Vec<u8>>(), "{path}");
    within("close", ws.close(None)).await.unwrap();
}

// ---------------------------------------------------------------------------------------------
// Unix sockets

/// `backend = "unix:/path"`: 10 MB and small messages, byte for byte, as over TCP.
#[tokio::test]
async fn unix_socket_backend_relays_byte_for_byte() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("app.sock");
    let seen = unix_backend(&socket, None, Behaviour::Echo);
    let gw = Gateway::builder().route("unix", "/unix", &format!("unix:{}", socket.display())).start().await;
    ten_megabytes_round_trip(&gw, "/unix", 11).await;
    assert_eq!(seen.connections.load(Ordering::SeqCst), 1);
}

/// `backend = "unix:@name"`: a Linux abstract socket, byte for byte.
#[cfg(target_os = "linux")]
#[tokio::test]
async fn abstract_unix_socket_backend_relays_byte_for_byte() {
    // Abstract names are machine-wide: this process's id keeps parallel runs apart.
    let name = format!("wsgate-test-{}-abstract", std::process::id());
    let seen = unix_backend(Path::new(&format!("\0{name}")), None, Behaviour::Echo);
    let gw = Gateway::builder().route("abs", "/abs", &format!("unix:@{name}")).start().await;
    ten_megabytes_round_trip(&gw, "/abs", 12).await;
    assert_eq!(seen.connections.load(Ordering::SeqCst), 1);
}

/// A Unix socket that nothing listens on is a refused backend: 502 over HTTP, 1013 in band.
#[tokio::test]
async fn missing_unix_socket_is_a_refused_backend() {
    let dir = tempfile::tempdir().unwrap();
    let missing = format!("unix:{}", dir.path().join("nobody.sock").display());
    let gw = Gateway::builder()
        .route_with("http", "/http", &missing, "on_backend_unavailable = \"http\"")
        .route("close", "/close", &missing)
        .start()
        .await;
    let (status, _, body) = raw_http(gw.plain, &upgrade_request("/http", "")).await;
    assert_eq!(status, 502, "{body}");
    assert!(body.contains("backend unavailable: connection refused"), "{body}");
    let mut ws = gw.ws("/close").await;
    let (data, code, reason) = read_until_close(&mut ws).await;
    assert!(data.is_empty());
    assert_eq!((code, reason.as_str()), (1013, "backend unavailable: connection refused"));
}

// ---------------------------------------------------------------------------------------------
// TLS to the backend

/// TLS over TCP with the route's CA and `server_name`: 10 MB byte for byte, and the backend
/// really did a handshake.
#[tokio::test]
async fn tls_backend_relays_byte_for_byte() {
    let pki = Pki::new();
    let (addr, seen) = tcp_backend(Some(pki.server(&["backend.test"], false)), Behaviour::Echo).await;
    let table = tls_table("tls", &format!("ca = {:?}\nserver_name = \"backend.test\"\n", pki.ca_path()));
    let gw = Gateway::builder().route_with("tls", "/tls", &addr.to_string(), &table).start().await;
    ten_megabytes_round_trip(&gw, "/tls", 13).await;
    assert_eq!(seen.handshakes.load(Ordering::SeqCst), 1);
}

/// Without `server_name`, the certificate is checked against the backend's host (here an IP
/// address); with `client_cert`, the gateway presents its certificate to a backend that asks.
#[tokio::test]
async fn tls_backend_checks_the_host_and_presents_a_client_certificate() {
    let pki = Pki::new();
    let (addr, seen) = tcp_backend(Some(pki.server(&["127.0.0.1"], true)), Behaviour::Echo).await;
    let (cert, key) = pki.client_files();
    let table = tls_table("mtls", &format!("ca = {:?}\nclient_cert = {cert:?}\nclient_key = {key:?}\n", pki.ca_path()));
    let gw = Gateway::builder().route_with("mtls", "/mtls", &addr.to_string(), &table).start().await;
    let mut ws = gw.ws("/mtls").await;
    let data = payload(300_000, 14);
    send_binary(&mut ws, &data).await;
    assert!(read_bytes(&mut ws, data.len()).await == data, "altered over mTLS");
    assert_eq!(seen.client_certs.load(Ordering::SeqCst), 1, "the backend saw the gateway's certificate");
}

/// TLS over a Unix socket (`server_name` required there): 10 MB byte for byte.
#[tokio::test]
async fn tls_over_a_unix_socket_relays_byte_for_byte() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("tls.sock");
    let seen = unix_backend(&socket, Some(pki.server(&["backend.test"], false)), Behaviour::Echo);
    let table = tls_table("utls", &format!("ca = {:?}\nserver_name = \"backend.test\"\n", pki.ca_path()));
    let gw =
        Gateway::builder().route_with("utls", "/utls", &format!("unix:{}", socket.display()), &table).start().await;
    ten_megabytes_round_trip(&gw, "/utls", 15).await;
    assert_eq!(seen.handshakes.load(Ordering::SeqCst), 1);
}

/// A certificate the route does not trust (signed by another CA, or, without `ca`, by none of
/// the bundled web PKI roots) or one for another name: the connect fails as "TLS handshake
/// failed": 502 with `on_backend_unavailable = "http"`, 1013 in band otherwise; a warning names
/// the route, the address and rustls's reason; the metric counts it by that kind.
#[tokio::test]
async fn untrusted_backend_certificate_is_refused() {
    let (logs, _guard) = Logs::capture();
    let (trusted, other) = (Pki::new(), Pki::new());
    let (addr, seen) = tcp_backend(Some(other.server(&["127.0.0.1"], false)), Behaviour::Echo).await;
    let target = addr.to_string();
    let wrong_ca = tls_table("http", &format!("ca = {:?}\n", trusted.ca_path()));
    let (named_addr, _) = tcp_backend(Some(trusted.server(&["backend.test"], false)), Behaviour::Echo).await;
    let wrong_name = tls_table("name", &format!("ca = {:?}\nserver_name = \"other.test\"\n", trusted.ca_path()));
    let gw = Gateway::builder()
        .route_with("http", "/http", &target, &format!("on_backend_unavailable = \"http\"\n{wrong_ca}"))
        .route_with("close", "/close", &target, &tls_table("close", ""))
        .route_with(
            "name",
            "/name",
            &named_addr.to_string(),
            &format!("on_backend_unavailable = \"http\"\n{wrong_name}"),
        )
        .start()
        .await;

    let (status, _, body) = raw_http(gw.plain, &upgrade_request("/http", "")).await;
    assert_eq!(status, 502, "{body}");
    assert!(body.contains("backend unavailable: TLS handshake failed"), "{body}");

    let mut ws = gw.ws("/close").await;
    let (data, code, reason) = read_until_close(&mut ws).await;
    assert!(data.is_empty());
    assert_eq!((code, reason.as_str()), (1013, "backend unavailable: TLS handshake failed"));

    let (status, _, body) = raw_http(gw.plain, &upgrade_request("/name", "")).await;
    assert_eq!(status, 502, "{body}");

    // The backend never completed a handshake with the gateway.
    assert_eq!(seen.handshakes.load(Ordering::SeqCst), 0);
    assert_eq!(seen.connections.load(Ordering::SeqCst), 2);
    for route in ["http", "close", "name"] {
        let labels = [("route", route), ("kind", "TLS handshake failed")];
        assert_eq!(scrape(&gw, "wsgate_backend_connect_failures_total", &labels).await, 1.0, "{route}");
    }
    let text = logs.text();
    let line = |route: &str| {
        text.lines()
            .find(|l| l.contains("backend unavailable") && l.contains(&format!("route={route} ")))
            .unwrap_or_else(|| panic!("no warning for route {route}:\n{text}"))
            .to_string()
    };
    for route in ["http", "close"] {
        let l = line(route);
        assert!(l.contains("WARN") && l.contains(&format!("TLS handshake with {target}")), "{l}");
        assert!(l.contains("invalid peer certificate: UnknownIssuer"), "{l}");
    }
    let l = line("name");
    assert!(l.contains("invalid peer certificate: certificate not valid for name \"other.test\""), "{l}");
}

/// A TLS backend that ends its connection without close_notify may have been cut short: the
/// bytes before the end are delivered, then 1011. The same backend ending with close_notify is
/// a clean end (1000).
#[tokio::test]
async fn tls_backend_ending_without_close_notify_is_1011() {
    let pki = Pki::new();
    let server = pki.server(&["127.0.0.1"], false);
    let (cut, _) = tcp_backend(Some(server.clone()), Behaviour::SayThenDrop(b"partial".to_vec())).await;
    let (clean, _) = tcp_backend(Some(server), Behaviour::SayThenClose(b"complete".to_vec())).await;
    let table = |route| tls_table(route, &format!("ca = {:?}\n", pki.ca_path()));
    let gw = Gateway::builder()
        .route_with("cut", "/cut", &cut.to_string(), &table("cut"))
        .route_with("clean", "/clean", &clean.to_string(), &table("clean"))
        .start()
        .await;

    let mut ws = gw.ws("/cut").await;
    let (data, code, reason) = read_until_close(&mut ws).await;
    assert_eq!(data, b"partial");
    assert_eq!((code, reason.as_str()), (1011, "backend error: TLS ended without close_notify"));

    let mut ws = gw.ws("/clean").await;
    let (data, code, reason) = read_until_close(&mut ws).await;
    assert_eq!(data, b"complete");
    assert_eq!((code, reason.as_str()), (1000, "backend closed the connection"));
}

/// `insecure = true` accepts a certificate nobody signed for us, and says so loudly at start.
#[tokio::test]
async fn insecure_backend_tls_connects_and_warns() {
    let (logs, _guard) = Logs::capture();
    let stranger = Pki::new();
    let (addr, seen) = tcp_backend(Some(stranger.server(&["elsewhere.test"], false)), Behaviour::Echo).await;
    let gw = Gateway::builder()
        .route_with("lax", "/lax", &addr.to_string(), &tls_table("lax", "insecure = true\n"))
        .start()
        .await;
    let warning = logs.text();
    assert!(
        warning.lines().any(|l| l.contains("WARN") && l.contains("INSECURE") && l.contains("route=lax")),
        "{warning}"
    );
    let mut ws = gw.ws("/lax").await;
    send_binary(&mut ws, b"anyway").await;
    assert_eq!(read_bytes(&mut ws, 6).await, b"anyway");
    assert_eq!(seen.handshakes.load(Ordering::SeqCst), 1);
}

// ---------------------------------------------------------------------------------------------
// wsgate check

fn check(config: &Path) -> (Option<i32>, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_wsgate")).arg("check").arg(config).output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `wsgate check` reads the backend TLS files as a start would (a missing CA or an unusable key
/// is one line naming file and key, exit 1) and shows each route's transport.
#[test]
fn check_reads_and_shows_backend_transports() {
    let pki = Pki::new();
    let (cert, key) = pki.client_files();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    let write = |routes: &str| {
        std::fs::write(&config, format!("[listeners.plain]\naddress = \"127.0.0.1:0\"\n{routes}")).unwrap();
    };
    let good = format!(
        "[routes.app]\npath = \"/app\"\nbackend = \"unix:/run/app.sock\"\n\
         [routes.db]\npath = \"/db\"\nbackend = \"db.internal:5432\"\n\
         [routes.db.backend_tls]\nca = {:?}\nserver_name = \"db.test\"\nclient_cert = {cert:?}\nclient_key = {key:?}\n\
         [routes.web]\npath = \"/web\"\nbackend = \"api.example.com:443\"\n[routes.web.backend_tls]\n",
        pki.ca_path()
    );
    write(&good);
    let (code, stdout, stderr) = check(&config);
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert!(stdout.contains("/app -> unix:/run/app.sock\n"), "{stdout}");
    assert!(
        stdout.contains(&format!(
            "/db -> db.internal:5432 (TLS name db.test, verified against CA {}, client cert {cert})",
            pki.ca_path()
        )),
        "{stdout}"
    );
    assert!(stdout.contains("/web -> api.example.com:443 (TLS, verified against bundled web PKI roots)"), "{stdout}");
    assert!(!stderr.contains("WARNING"), "{stderr}");

    let missing: PathBuf = dir.path().join("missing-ca.pem");
    write(&format!(
        "[routes.db]\npath = \"/db\"\nbackend = \"db.internal:5432\"\n[routes.db.backend_tls]\nca = {missing:?}\nclient_cert = {cert:?}\nclient_key = {cert:?}\n"
    ));
    let (code, stdout, stderr) = check(&config);
    assert_eq!(code, Some(1), "{stdout}{stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 2, "{stderr}");
    assert!(lines[0].starts_with(&format!("{}: routes.db.backend_tls.ca: ", missing.display())), "{stderr}");
    assert!(lines[1].starts_with(&format!("{cert}: routes.db.backend_tls.client_key: ")), "{stderr}");

    write("[routes.lax]\npath = \"/lax\"\nbackend = \"10.0.0.1:443\"\n[routes.lax.backend_tls]\ninsecure = true\n");
    let (code, stdout, stderr) = check(&config);
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert!(stdout.contains("/lax -> 10.0.0.1:443 (TLS, INSECURE: certificate not verified)"), "{stdout}");
    assert!(stderr.contains("WARNING: routes.lax.backend_tls.insecure = true"), "{stderr}");
}

/// The backend TLS files are read again by every reload: a CA file replaced by the right one
/// lets the next session through; one that cannot be used is refused whole (one line naming file
/// and key) and the running config stays.
#[tokio::test]
async fn backend_tls_files_are_reread_on_reload() {
    let (right, wrong) = (Pki::new(), Pki::new());
    let (addr, seen) = tcp_backend(Some(right.server(&["127.0.0.1"], false)), Behaviour::Echo).await;
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("backend-ca.pem");
    std::fs::copy(wrong.ca_path(), &ca).unwrap();
    let table = |extra: &str| tls_table("db", &format!("ca = {:?}\n{extra}", ca.display().to_string()));
    let config = dir.path().join("wsgate.toml");
    let builder = Gateway::builder().route_with("db", "/db", &addr.to_string(), &table(""));
    std::fs::write(&config, builder.toml()).unwrap();
    let gw = Gateway::from_file(&config).await;
    let mut ws = gw.ws("/db").await;
    assert_eq!(read_until_close(&mut ws).await.1, 1013, "the wrong CA is not trusted");

    std::fs::copy(right.ca_path(), &ca).unwrap();
    gw.reloader.reload_file(&config).expect("reload with the right CA");
    let mut ws = gw.ws("/db").await;
    send_binary(&mut ws, b"after reload").await;
    assert_eq!(read_bytes(&mut ws, 12).await, b"after reload");

    std::fs::write(&ca, "not a certificate").unwrap();
    let e = gw.reloader.reload_file(&config).unwrap_err().to_string();
    assert_eq!(e, format!("{}: routes.db.backend_tls.ca: no PEM certificate in the file", ca.display()));
    let mut ws = gw.ws("/db").await;
    send_binary(&mut ws, b"still").await;
    assert_eq!(read_bytes(&mut ws, 5).await, b"still", "the running config stays");
    assert_eq!(seen.handshakes.load(Ordering::SeqCst), 2);
}

/// `backend_tls` covers every backend of a route: a pool's members, checked against their own
/// host, and a token-mapped target, checked against the host name the token gave even though
/// the connection goes to the address that was checked (a certificate for `localhost` only).
#[tokio::test]
async fn tls_covers_pool_members_and_mapped_targets_by_their_names() {
    let pki = Pki::new();
    let (by_ip, ip_seen) = tcp_backend(Some(pki.server(&["127.0.0.1"], false)), Behaviour::Echo).await;
    let (by_name, name_seen) = tcp_backend(Some(pki.server(&["localhost"], false)), Behaviour::Echo).await;
    let dir = tempfile::tempdir().unwrap();
    let map = dir.path().join("map.toml");
    std::fs::write(&map, format!("desk = \"localhost:{}\"\n", by_name.port())).unwrap();
    let ca = format!("ca = {:?}\n", pki.ca_path());
    let pool = format!("backends = [{{ name = \"a\", address = \"{by_ip}\" }}]\n{}", tls_table("p", &ca));
    let mapped = format!(
        "[routes.m]\npath = \"/m/\"\nmatch = \"prefix\"\n[routes.m.targets]\nmap_file = {:?}\n\
         allow = [\"127.0.0.1/32\", \"::1/128\"]\nallow_ports = [{}]\n{}",
        map.display().to_string(),
        by_name.port(),
        tls_table("m", &ca)
    );
    let gw = Gateway::builder().route_table("p", "/p", &pool).route_toml(&mapped).start().await;
    for (path, seed) in [("/p", 31), ("/m/desk", 32)] {
        let mut ws = gw.ws(path).await;
        let data = payload(200_000, seed);
        send_binary(&mut ws, &data).await;
        assert!(read_bytes(&mut ws, data.len()).await == data, "{path}: altered over TLS");
    }
    assert_eq!(ip_seen.handshakes.load(Ordering::SeqCst), 1, "the pool member spoke TLS");
    assert_eq!(name_seen.handshakes.load(Ordering::SeqCst), 1, "the mapped target spoke TLS, as localhost");
}
