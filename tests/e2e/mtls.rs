//! mTLS: client certificates from a CA generated at test time (rcgen), verified in the TLS
//! handshake (unknown CA, none on `required`, revoked: the handshake fails), then matched per
//! route (`client_certs`: a verified certificate the route does not allow gets 403). The backend
//! of every refused request saw no connection, and the session log names the subject.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose, RevokedCertParams, SerialNumber, date_time_ymd,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tempfile::TempDir;
use tokio::net::TcpStream;
use tokio_tungstenite::client_async;
use tokio_tungstenite::tungstenite;

use crate::support::*;

/// A CA, a `localhost` server certificate it signed (files in `dir`), and client certificates
/// on demand.
pub(crate) struct Pki {
    dir: TempDir,
    ca: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
}

/// A client certificate chain and its key, and the TLS client config its connections share (a
/// rustls client resumes only sessions made with the same config).
pub(crate) struct ClientId {
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    config: std::sync::OnceLock<Arc<rustls::ClientConfig>>,
}

impl Pki {
    /// A CA named `name` (distinct names: a verifier looks its trust anchors up by name).
    pub(crate) fn new(name: &str) -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let ca_key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca = params.self_signed(&ca_key).unwrap();
        std::fs::write(dir.path().join("ca.pem"), ca.pem()).unwrap();
        let issuer = Issuer::new(params, ca_key);
        let server_key = KeyPair::generate().unwrap();
        let server = CertificateParams::new(vec!["localhost".into()]).unwrap().signed_by(&server_key, &issuer).unwrap();
        std::fs::write(dir.path().join("server.pem"), server.pem()).unwrap();
        std::fs::write(dir.path().join("server.key"), server_key.serialize_pem()).unwrap();
        Pki { dir, ca: ca.der().clone(), issuer }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A client certificate with common name `cn`, DNS names `dns` and serial number `serial`.
    pub(crate) fn client(&self, cn: &str, dns: &[&str], serial: u64) -> ClientId {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(dns.iter().map(|d| d.to_string()).collect::<Vec<_>>()).unwrap();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.distinguished_name.push(DnType::OrganizationName, "Example");
        params.distinguished_name.push(DnType::CommonName, cn);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.serial_number = Some(SerialNumber::from(serial));
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        ClientId {
            chain: vec![cert.der().clone()],
            key: PrivateKeyDer::try_from(key.serialize_der()).unwrap(),
            config: std::sync::OnceLock::new(),
        }
    }

    /// A client certificate with common name `cn` written as PEM files in this CA's directory,
    /// for clients that read files (`wsgate connect --cert --key`): (chain, key).
    pub(crate) fn client_files(&self, cn: &str) -> (PathBuf, PathBuf) {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, cn);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let (chain, key_file) = (self.path(&format!("{cn}.pem")), self.path(&format!("{cn}.key")));
        std::fs::write(&chain, cert.pem()).unwrap();
        std::fs::write(&key_file, key.serialize_pem()).unwrap();
        (chain, key_file)
    }

    /// This CA's certificate as a PEM file.
    pub(crate) fn ca_file(&self) -> PathBuf {
        self.path("ca.pem")
    }

    /// Writes `crl.pem`: this CA's revocation list naming `serials`.
    fn write_crl(&self, serials: &[u64]) {
        let revoked = serials
            .iter()
            .map(|&s| RevokedCertParams {
                serial_number: SerialNumber::from(s),
                revocation_time: date_time_ymd(2024, 1, 1),
                reason_code: None,
                invalidity_date: None,
            })
            .collect();
        let crl = CertificateRevocationListParams {
            this_update: date_time_ymd(2024, 1, 1),
            next_update: date_time_ymd(2100, 1, 1),
            crl_number: SerialNumber::from(serials.len() as u64 + 1),
            issuing_distribution_point: None,
            revoked_certs: revoked,
            key_identifier_method: KeyIdMethod::Sha256,
        }
        .signed_by(&self.issuer)
        .unwrap();
        std::fs::write(self.path("crl.pem"), crl.pem().unwrap()).unwrap();
    }

    /// A config with a `secure` listener asking for client certificates (`client_auth`, plus
    /// `extra` in its tls table) and `routes`, written to `config.toml` next to the files.
    pub(crate) fn write_config(&self, client_auth: &str, extra: &str, routes: &str) -> PathBuf {
        let q = |name: &str| format!("{:?}", self.path(name).display().to_string());
        let text = format!(
            "[listeners.plain]\naddress = \"127.0.0.1:0\"\n\
             [listeners.secure]\naddress = \"127.0.0.1:0\"\n\
             tls = {{ cert = {}, key = {}, client_ca = {}, client_auth = \"{client_auth}\"{extra} }}\n\
             {routes}\n[admin]\naddress = \"127.0.0.1:0\"\n[shutdown]\ndrain_delay_secs = 0\nclose_window_secs = 0\n",
            q("server.pem"),
            q("server.key"),
            q("ca.pem"),
        );
        let path = self.path("config.toml");
        std::fs::write(&path, text).unwrap();
        path
    }
}

/// How an attempt to open a session ended.
pub(crate) enum Outcome {
    /// The session, and whether its TLS session was resumed (no certificate sent again).
    Open(Box<Ws>, bool),
    /// An HTTP answer other than 101: status and body.
    Refused(u16, String),
    /// The TLS handshake (or the connection) failed.
    Failed(String),
}

/// Opens a wss:// session on `path`, trusting `pki`'s CA and presenting `client`, if any (whose
/// earlier TLS sessions it offers to resume, as clients do).
pub(crate) async fn open(addr: std::net::SocketAddr, pki: &Pki, client: Option<&ClientId>, path: &str) -> Outcome {
    let config = |client: Option<&ClientId>| {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(pki.ca.clone()).unwrap();
        let builder = rustls::ClientConfig::builder_with_provider(wsgate::tls::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots);
        Arc::new(match client {
            Some(id) => builder.with_client_auth_cert(id.chain.clone(), id.key.clone_key()).unwrap(),
            None => builder.with_no_client_auth(),
        })
    };
    let config = match client {
        Some(id) => id.config.get_or_init(|| config(client)).clone(),
        None => config(None),
    };
    let tcp = within("tcp connect", TcpStream::connect(addr)).await.unwrap();
    let connector = tokio_rustls::TlsConnector::from(config);
    let tls = match within("tls handshake", connector.connect(ServerName::try_from("localhost").unwrap(), tcp)).await {
        Ok(tls) => tls,
        Err(e) => return Outcome::Failed(format!("tls: {e}")),
    };
    let resumed = tls.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
    let url = format!("wss://localhost:{}{path}", addr.port());
    match within("wss handshake", client_async(url, Box::new(tls) as Box<dyn Io>)).await {
        Ok((ws, _)) => Outcome::Open(Box::new(ws), resumed),
        Err(tungstenite::Error::Http(response)) => {
            let body = String::from_utf8_lossy(response.body().as_deref().unwrap_or_default()).into_owned();
            Outcome::Refused(response.status().as_u16(), body)
        }
        Err(e) => Outcome::Failed(format!("websocket: {e}")),
    }
}

/// Sends a payload through `ws` and expects it back, byte for byte.
async fn echo_through(ws: &mut Ws, seed: u64) {
    let data = payload(100_000, seed);
    send_binary(ws, &data).await;
    assert!(read_bytes(ws, data.len()).await == data, "payload changed on the way");
}

pub(crate) fn expect_open(outcome: Outcome, what: &str) -> Ws {
    expect_open_as(outcome, what).0
}

/// The session and whether its TLS session was resumed.
pub(crate) fn expect_open_as(outcome: Outcome, what: &str) -> (Ws, bool) {
    match outcome {
        Outcome::Open(ws, resumed) => (*ws, resumed),
        Outcome::Refused(status, body) => panic!("{what}: refused with {status}: {body}"),
        Outcome::Failed(e) => panic!("{what}: failed: {e}"),
    }
}

fn expect_failed(outcome: Outcome, what: &str) -> String {
    match outcome {
        Outcome::Failed(e) => e,
        Outcome::Open(..) => panic!("{what}: a session opened"),
        Outcome::Refused(status, body) => panic!("{what}: got HTTP {status} ({body}), not a failed handshake"),
    }
}

fn expect_refused(outcome: Outcome, what: &str) -> (u16, String) {
    match outcome {
        Outcome::Refused(status, body) => (status, body),
        Outcome::Open(..) => panic!("{what}: a session opened"),
        Outcome::Failed(e) => panic!("{what}: failed before HTTP: {e}"),
    }
}

async fn wait_for_log(logs: &Logs, needle: &str) {
    eventually(&format!("log line with {needle}"), || async { logs.text().contains(needle) }).await;
}

/// `client_auth = "required"` with a CRL: a good certificate passes byte for byte and is named in
/// the session log; one from an unknown CA, none, and a revoked one each fail the TLS handshake
/// (counted, with rustls's reason at debug); a reload rereads the CRL, so a certificate revoked
/// since fails too, its earlier TLS session not resumable. The backend saw only the good sessions.
#[tokio::test]
async fn required_certificates_are_verified_in_the_handshake() {
    let (logs, _guard) = Logs::capture();
    let pki = Pki::new("wsgate test CA");
    let stranger = Pki::new("another CA");
    let (good, revoked, later) = (pki.client("ops", &[], 2), pki.client("ops", &[], 3), pki.client("ops", &[], 4));
    let unknown = stranger.client("ops", &[], 2);
    pki.write_crl(&[3]);
    let backend = Backend::echo().await;
    let crls = format!(", client_crls = [{:?}]", pki.path("crl.pem").display().to_string());
    let route =
        format!("[routes.tcp]\npath = \"/tcp\"\nbackend = \"{}\"\nclient_certs = [\"CN=ops\"]\n", backend.target());
    let config = pki.write_config("required", &crls, &route);
    let gw = Gateway::from_file(&config).await;
    let addr = gw.secure.unwrap();

    // The client learns why from the alert; the gateway logs rustls's reason at debug.
    for (client, alert, reason, what) in [
        (Some(&unknown), "UnknownCA", "invalid peer certificate: UnknownIssuer", "a certificate from an unknown CA"),
        (None, "CertificateRequired", "peer sent no certificates", "no certificate"),
        (Some(&revoked), "CertificateRevoked", "invalid peer certificate: Revoked", "a revoked certificate"),
    ] {
        let e = expect_failed(open(addr, &pki, client, "/tcp").await, what);
        assert!(e.contains(&format!("received fatal alert: {alert}")), "{what}: {e}");
        wait_for_log(&logs, &format!("tls handshake failed error={reason}")).await;
    }
    let failures = [("listener", "secure"), ("reason", "error")];
    assert_eq!(scrape(&gw, "wsgate_tls_handshake_failures_total", &failures).await, 3.0);

    let mut ws = expect_open(open(addr, &pki, Some(&good), "/tcp").await, "the good certificate");
    echo_through(&mut ws, 1).await;
    drop(ws);
    wait_for_log(&logs, "cert_subject=\"CN=ops,O=Example\"").await;
    // The refused attempts came first: had any of them reached the backend, it would count more.
    assert_eq!(backend.accepted(), 1, "a refused client reached the backend");

    // Revoke the certificate of `later` and reload: it fails; the good one still passes.
    // Its session could be resumed; a reload's new TLS config keeps none, so it cannot be.
    let mut ws = expect_open(open(addr, &pki, Some(&later), "/tcp").await, "before its revocation");
    echo_through(&mut ws, 2).await;
    pki.write_crl(&[3, 4]);
    gw.reloader.reload_file(&config).expect("reload with the new CRL");
    expect_failed(open(addr, &pki, Some(&later), "/tcp").await, "revoked since, after the reload");
    assert_eq!(scrape(&gw, "wsgate_tls_handshake_failures_total", &failures).await, 4.0);
    let mut ws2 = expect_open(open(addr, &pki, Some(&good), "/tcp").await, "the good certificate after the reload");
    echo_through(&mut ws2, 3).await;
    // The session opened before the reload carries on.
    echo_through(&mut ws, 4).await;
    assert_eq!(backend.accepted(), 3);
}

/// `client_auth = "optional"`: without a certificate a route without `client_certs` is reached
/// and one with them answers 403; a verified certificate the route does not list gets 403 too; a
/// certificate whose DNS name matches a `*.` pattern passes, and passes again on a resumed TLS
/// session (which sends no certificate). The guarded backend saw only those.
#[tokio::test]
async fn optional_certificates_are_matched_per_route() {
    let (logs, _guard) = Logs::capture();
    let pki = Pki::new("wsgate test CA");
    let guest = pki.client("guest", &["guest.example.org"], 10);
    let bob = pki.client("bob", &["bob.ops.example.com"], 11);
    let open_backend = Backend::echo().await;
    let ops_backend = Backend::echo().await;
    let routes = format!(
        "[routes.open]\npath = \"/open\"\nbackend = \"{}\"\n\
         [routes.ops]\npath = \"/ops\"\nbackend = \"{}\"\nclient_certs = [\"CN=ops\", \"*.ops.example.com\"]\n",
        open_backend.target(),
        ops_backend.target()
    );
    let gw = Gateway::from_file(&pki.write_config("optional", "", &routes)).await;
    let addr = gw.secure.unwrap();

    let mut ws = expect_open(open(addr, &pki, None, "/open").await, "no certificate, open route");
    echo_through(&mut ws, 5).await;
    let (status, body) = expect_refused(open(addr, &pki, None, "/ops").await, "no certificate, guarded route");
    assert_eq!((status, body.as_str()), (403, "a client certificate is required on this route\n"));
    let (status, body) = expect_refused(open(addr, &pki, Some(&guest), "/ops").await, "a certificate not listed");
    assert_eq!((status, body.as_str()), (403, "client certificate CN=guest,O=Example is not allowed on this route\n"));
    // The plain listener has no certificates at all.
    match gw.ws_with("/ops", &[]).await {
        Err(tungstenite::Error::Http(r)) => assert_eq!(r.status(), 403),
        Err(e) => panic!("a guarded route over ws://: {e}"),
        Ok(_) => panic!("a guarded route over ws:// opened"),
    }
    let denied = [("route", "ops"), ("reason", "client_certificate")];
    assert_eq!(scrape(&gw, "wsgate_access_denied_total", &denied).await, 3.0);
    assert_eq!(scrape(&gw, "wsgate_handshakes_total", &[("route", "ops"), ("status", "403")]).await, 3.0);

    let mut ws = expect_open(open(addr, &pki, Some(&bob), "/ops").await, "a certificate matching *.ops.example.com");
    echo_through(&mut ws, 6).await;
    drop(ws);
    wait_for_log(&logs, "cert_subject=\"CN=bob,O=Example\"").await;
    assert_eq!(ops_backend.accepted(), 1, "a refused request reached the guarded backend");
    // A resumed TLS session sends no certificate; the one it was established with still counts.
    let (mut ws, resumed) = expect_open_as(open(addr, &pki, Some(&bob), "/ops").await, "bob, resuming");
    assert!(resumed, "the second connection did not resume its TLS session");
    echo_through(&mut ws, 8).await;
    drop(ws);
    let subject = "cert_subject=\"CN=bob,O=Example\"";
    eventually("two sessions of bob logged", || async { logs.text().matches(subject).count() == 2 }).await;
    // A client the route does not list is refused again, its earlier TLS session offered or not.
    let (status, _) = expect_refused(open(addr, &pki, Some(&guest), "/ops").await, "guest, resuming");
    assert_eq!(status, 403);
    assert_eq!(ops_backend.accepted(), 2);
    // A verified certificate is the client's identity on an open route too.
    let mut ws = expect_open(open(addr, &pki, Some(&guest), "/open").await, "a certificate on the open route");
    echo_through(&mut ws, 7).await;
    drop(ws);
    wait_for_log(&logs, "cert_subject=\"CN=guest,O=Example\"").await;
    assert_eq!(open_backend.accepted(), 2);
}

/// A CA or CRL file that cannot be used fails the start with one line naming the listener, the
/// key and the file.
#[tokio::test]
async fn unusable_ca_and_crl_files_are_named() {
    let pki = Pki::new("wsgate test CA");
    let route = "[routes.echo]\npath = \"/echo\"\nbackend = \"builtin:echo\"\n";
    std::fs::write(pki.path("bad.crl"), "-----BEGIN X509 CRL-----\nAAAA\n-----END X509 CRL-----\n").unwrap();
    for (extra, ca, expected) in [
        ("", "missing.pem", "listener \"secure\": client_ca file "),
        (", client_crls = [\"bad.crl\"]", "ca.pem", "listener \"secure\": client_crls file "),
        (", client_crls = [\"nope.crl\"]", "ca.pem", "listener \"secure\": client_crls file "),
    ] {
        let config = pki.write_config("required", extra, route);
        let text = std::fs::read_to_string(&config).unwrap().replace(
            &format!("{:?}", pki.path("ca.pem").display().to_string()),
            &format!("{:?}", pki.path(ca).display().to_string()),
        );
        std::fs::write(&config, text).unwrap();
        let config = wsgate::config::load(&config).unwrap();
        let e = wsgate::Gateway::bind(config).await.err().expect("start refused").to_string();
        assert!(e.starts_with(expected) && e.lines().count() == 1, "{e}");
        let file = if extra.is_empty() { ca } else { extra.split('"').nth(1).unwrap() };
        assert!(e.contains(&Path::new(file).display().to_string()), "{e}");
    }
}
