//! `wsgate connect`'s options, each shown to take effect on real sockets: `--listen unix:`,
//! `--cert/--key` against a listener that requires client certificates, `--header`,
//! `--subprotocol`, `--ping-secs` through a proxy that cuts idle connections, and half-close
//! through a route with TLS to its backend.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UnixStream};

use crate::mtls::Pki;
use crate::support::client::Connect;
use crate::support::*;

/// `--listen unix:/path`: 20 MB through a local Unix socket to a TCP echo come back byte for
/// byte, and a second connection to the same socket gets a session of its own.
#[tokio::test]
async fn listen_on_a_unix_socket_carries_bytes_exactly() {
    let echo = Backend::echo().await;
    let gw = Gateway::builder().route("tcp", "/tcp", &echo.target()).start().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("local.sock");
    let spec = format!("unix:{}", path.display());
    let (bound, local) = Connect::new(&gw.url("/tcp")).listen_on(&spec).await;
    assert_eq!(bound, spec);
    for (i, len) in [20usize << 20, 100_000].into_iter().enumerate() {
        let data = payload(len, 40 + i as u64);
        let s = within("unix connect", UnixStream::connect(&path)).await.unwrap();
        let (mut r, mut w) = s.into_split();
        let sent = data.clone();
        let writer = tokio::spawn(async move {
            w.write_all(&sent).await.unwrap();
            w.shutdown().await.unwrap();
        });
        let mut got = Vec::with_capacity(len);
        within("echo back", r.read_to_end(&mut got)).await.unwrap();
        writer.await.unwrap();
        assert!(got == data, "connection {i}: got {} of {len} bytes, or altered; log: {}", got.len(), local.log());
    }
    assert_eq!(echo.accepted(), 2);
}

/// `--cert/--key` on a listener with `client_auth = "required"` and a route that takes only
/// `CN=ops`: the right certificate gets its bytes back; none fails the TLS handshake (exit 4);
/// a certificate the CA signed for another name is refused by the route (403, exit 5). Each
/// failure is one line.
#[tokio::test]
async fn client_certificates_for_mtls_routes() {
    let pki = Pki::new("wsgate connect test CA");
    let (ops_cert, ops_key) = pki.client_files("ops");
    let (dev_cert, dev_key) = pki.client_files("dev");
    let echo = Backend::echo().await;
    let routes =
        format!("[routes.tcp]\npath = \"/tcp\"\nbackend = \"{}\"\nclient_certs = [\"CN=ops\"]\n", echo.target());
    let gw = Gateway::from_file(&pki.write_config("required", "", &routes)).await;
    let url = format!("wss://localhost:{}/tcp", gw.secure.unwrap().port());
    let ca = pki.ca_file().display().to_string();
    let with = |cert: &std::path::Path, key: &std::path::Path| {
        Connect::new(&url)
            .arg("--ca")
            .arg(&ca)
            .arg("--cert")
            .arg(&cert.display().to_string())
            .arg("--key")
            .arg(&key.display().to_string())
    };
    let input = payload(200_000, 41);
    let ran = with(&ops_cert, &ops_key).stdio(&input).await;
    assert_eq!(ran.code, Some(0), "stderr: {}", ran.stderr);
    assert!(ran.stdout == input, "got {} of {} bytes, or altered", ran.stdout.len(), input.len());
    let cases = [
        ("no certificate", Connect::new(&url).arg("--ca").arg(&ca), 4, "TLS with localhost failed"),
        ("a certificate the route does not take", with(&dev_cert, &dev_key), 5, "access refused: 403"),
    ];
    for (what, connect, code, message) in cases {
        let ran = connect.stdio(b"x").await;
        assert_eq!(ran.code, Some(code), "{what}: stderr: {}", ran.stderr);
        let lines: Vec<&str> = ran.stderr.lines().collect();
        assert_eq!(lines.len(), 1, "{what}: one line: {:?}", ran.stderr);
        assert!(lines[0].contains(message), "{what}: {}", lines[0]);
    }
    assert_eq!(echo.accepted(), 1, "no refused client reached the backend");
}

/// A backend that reads the PROXY v1 line the route sends first and answers with it, then
/// closes.
async fn proxy_line_backend() -> Backend {
    Backend::start(|mut s: TcpStream| async move {
        let mut line = Vec::new();
        while !line.ends_with(b"\r\n") {
            match s.read_u8().await {
                Ok(b) => line.push(b),
                Err(_) => return,
            }
        }
        let _ = s.write_all(&line).await;
        let _ = s.shutdown().await;
    })
    .await
}

/// `--header` reaches the gateway: `X-Forwarded-For` sent from a trusted proxy's address names
/// the client, which the route's PROXY v1 header to the backend then carries; without it the
/// backend sees 127.0.0.1.
#[tokio::test]
async fn extra_headers_reach_the_gateway() {
    let backend = proxy_line_backend().await;
    let gw = Gateway::builder()
        .listener_keys("trusted_proxies = [\"127.0.0.1/32\"]")
        .route_with("pp", "/pp", &backend.target(), "proxy_protocol = \"v1\"")
        .start()
        .await;
    let ran = Connect::new(&gw.url("/pp")).arg("--header").arg("X-Forwarded-For: 198.51.100.9").stdio(b"").await;
    assert_eq!(ran.code, Some(0), "stderr: {}", ran.stderr);
    let line = String::from_utf8_lossy(&ran.stdout);
    assert!(line.starts_with("PROXY TCP4 198.51.100.9 127.0.0.1 0 "), "{line:?}");
    let ran = Connect::new(&gw.url("/pp")).stdio(b"").await;
    assert!(String::from_utf8_lossy(&ran.stdout).starts_with("PROXY TCP4 127.0.0.1 127.0.0.1 "), "{ran:?}");
}

/// `--subprotocol`, on a route that accepts `mqtt` and `v2.chat`: offered `nope` then `v2.chat`,
/// the gateway selects `v2.chat` (the client logs it) and the session carries bytes; offered
/// only `nope`, the upgrade is refused with 400 (exit 8, the gateway's reason on one line).
#[tokio::test]
async fn subprotocols_are_offered_and_checked() {
    let echo = Backend::echo().await;
    let gw = Gateway::builder()
        .route_with("tcp", "/tcp", &echo.target(), "subprotocols = [\"mqtt\", \"v2.chat\"]")
        .start()
        .await;
    let ran = Connect::new(&gw.url("/tcp"))
        .env("RUST_LOG", "info")
        .args(&["--subprotocol", "nope", "--subprotocol", "v2.chat"])
        .stdio(b"hello")
        .await;
    assert_eq!((ran.code, ran.stdout.as_slice()), (Some(0), &b"hello"[..]), "stderr: {}", ran.stderr);
    assert!(
        ran.stderr.contains("subprotocol=\"v2.chat\"") || ran.stderr.contains("subprotocol=v2.chat"),
        "{}",
        ran.stderr
    );
    let ran = Connect::new(&gw.url("/tcp")).args(&["--subprotocol", "nope"]).stdio(b"hello").await;
    assert_eq!(ran.code, Some(8), "stderr: {}", ran.stderr);
    let lines: Vec<&str> = ran.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{:?}", ran.stderr);
    assert!(lines[0].contains("handshake refused: 400 no acceptable subprotocol"), "{}", lines[0]);
    assert_eq!(echo.accepted(), 1);
}

/// A TCP forwarder that cuts a connection on which no byte has passed either way for `idle`,
/// as NAT gateways and corporate proxies do. Counts its cuts, and the reads it relayed from the
/// client side (each a ping, while the session carries no data).
struct IdleCutter {
    addr: SocketAddr,
    cuts: Arc<AtomicUsize>,
    upstream_reads: Arc<AtomicUsize>,
}

impl IdleCutter {
    async fn start(to: SocketAddr, idle: Duration) -> IdleCutter {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (cuts, upstream_reads) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let (c, u) = (cuts.clone(), upstream_reads.clone());
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let server = TcpStream::connect(to).await.unwrap();
                tokio::spawn(forward(client, server, idle, c.clone(), u.clone()));
            }
        });
        IdleCutter { addr, cuts, upstream_reads }
    }
}

async fn forward(
    mut client: TcpStream,
    mut server: TcpStream,
    idle: Duration,
    cuts: Arc<AtomicUsize>,
    upstream_reads: Arc<AtomicUsize>,
) {
    let (mut cr, mut cw) = client.split();
    let (mut sr, mut sw) = server.split();
    let (mut up, mut down) = (vec![0u8; 64 * 1024], vec![0u8; 64 * 1024]);
    loop {
        let step = tokio::time::timeout(idle, async {
            tokio::select! {
                n = cr.read(&mut up) => (true, n),
                n = sr.read(&mut down) => (false, n),
            }
        })
        .await;
        match step {
            // Dropping both sockets is the cut.
            Err(_) => {
                cuts.fetch_add(1, Ordering::SeqCst);
                return;
            }
            Ok((_, Ok(0) | Err(_))) => return,
            Ok((true, Ok(n))) => {
                upstream_reads.fetch_add(1, Ordering::SeqCst);
                if sw.write_all(&up[..n]).await.is_err() {
                    return;
                }
            }
            Ok((false, Ok(n))) => {
                if cw.write_all(&down[..n]).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// One exchange through a local connection: `data` out, the same back.
async fn exchange(s: &mut TcpStream, data: &[u8]) {
    within("send", s.write_all(data)).await.unwrap();
    let mut back = vec![0u8; data.len()];
    within("echo back", s.read_exact(&mut back)).await.unwrap();
    assert_eq!(back, data);
}

/// `--ping-secs`: through a proxy that cuts connections idle for 2 s (the gateway's own pings
/// off), `--ping-secs 1` keeps an idle session open past several idle windows (the pings are
/// what crossed the proxy, and a later exchange still works), while with `--ping-secs 0` the
/// proxy cuts the same session and the local connection ends.
#[tokio::test]
async fn pings_keep_a_session_open_through_a_proxy_that_cuts_idle_connections() {
    const IDLE: Duration = Duration::from_secs(2);
    let echo = Backend::echo().await;
    let gw = Gateway::builder()
        .route_with("tcp", "/tcp", &echo.target(), "[routes.tcp.limits]\nping_interval_secs = 0")
        .start()
        .await;
    let cutter = IdleCutter::start(gw.plain, IDLE).await;
    let url = format!("ws://{}/tcp", cutter.addr);

    let pinging = Connect::new(&url).args(&["--ping-secs", "1"]).listen().await;
    let mut s = within("local connect", TcpStream::connect(pinging.addr)).await.unwrap();
    exchange(&mut s, b"before").await;
    let (idle_from, reads) = (Instant::now(), cutter.upstream_reads.load(Ordering::SeqCst));
    // Waits on the proxy's own count: four pings crossed it while the session carried no data.
    eventually("four pings through the proxy", || async { cutter.upstream_reads.load(Ordering::SeqCst) >= reads + 4 })
        .await;
    assert!(idle_from.elapsed() > IDLE, "pings every second: four take more than the idle window");
    assert_eq!(cutter.cuts.load(Ordering::SeqCst), 0, "the proxy never saw the session idle");
    exchange(&mut s, b"after the idle windows").await;
    drop((s, pinging));

    let silent = Connect::new(&url).args(&["--ping-secs", "0"]).listen().await;
    let mut s = within("local connect", TcpStream::connect(silent.addr)).await.unwrap();
    exchange(&mut s, b"before").await;
    eventually("the proxy cuts the silent session", || async { cutter.cuts.load(Ordering::SeqCst) == 1 }).await;
    let mut rest = Vec::new();
    let n = within("the local connection ends", s.read_to_end(&mut rest)).await.unwrap_or(0);
    assert_eq!(n, 0);
}

/// Half-close through `backend_tls`: the client's EOF reaches a TLS backend as `close_notify`
/// (its read ends), and the answer it sends only after that arrives whole through `--stdio`.
#[tokio::test]
async fn half_close_through_a_tls_backend() {
    let ca = TestCa::new();
    let backend = tls_answers_after_eof(&ca).await;
    let extra = format!("[routes.sort.backend_tls]\nca = {:?}\nserver_name = \"localhost\"\n", ca_file(&ca));
    let gw = Gateway::builder().route_with("sort", "/sort", &backend.target(), &extra).start().await;
    let input = payload(300_000, 42);
    let ran = Connect::new(&gw.url("/sort")).stdio(&input).await;
    assert_eq!(ran.code, Some(0), "stderr: {}", ran.stderr);
    let mut want = input;
    want.reverse();
    assert!(ran.stdout == want, "got {} of {} bytes, or altered; stderr: {}", ran.stdout.len(), want.len(), ran.stderr);
}

fn ca_file(ca: &TestCa) -> String {
    ca.dir.path().join("ca.pem").display().to_string()
}

/// A TLS backend (the test CA's `localhost` certificate) that reads to EOF, then sends it all
/// back reversed and ends with `close_notify`.
async fn tls_answers_after_eof(ca: &TestCa) -> Backend {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let chain = vec![CertificateDer::from_pem_file(ca.cert_path()).unwrap()];
    let key = PrivateKeyDer::from_pem_file(ca.key_path()).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(wsgate::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    Backend::start(move |s: TcpStream| {
        let acceptor = acceptor.clone();
        async move {
            let Ok(mut tls) = acceptor.accept(s).await else { return };
            let mut all = Vec::new();
            if tls.read_to_end(&mut all).await.is_ok() {
                all.reverse();
                let _ = tls.write_all(&all).await;
                let _ = tls.shutdown().await;
            }
        }
    })
    .await
}
