//! Client addresses end to end: the PROXY header wsgate sends a backend (v1, v2 and its TLVs),
//! the one a trusted balancer sends wsgate (ws and wss; honoured in the session log, per-client
//! limits and PROXY out; refused from anyone else, and required from the balancer), v2 LOCAL,
//! and `X-Forwarded-For` from trusted and untrusted peers.
//!
//! The backend here parses the header by hand (not with the crate wsgate uses), then echoes
//! everything after it, so a byte injected into the stream would come back to the client.

use std::net::{IpAddr, SocketAddr};

use futures_util::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{Mutex, mpsc};

use crate::support::*;

/// What a PROXY-aware backend read before the client's bytes.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Seen {
    pub(crate) version: u8,
    pub(crate) source: SocketAddr,
    pub(crate) destination: SocketAddr,
    /// v2 TLVs, in order: (type, value).
    pub(crate) tlvs: Vec<(u8, Vec<u8>)>,
}

/// A backend that reads a PROXY v1 or v2 header, reports it, then echoes.
pub(crate) struct ProxyBackend {
    pub(crate) backend: Backend,
    seen: Mutex<mpsc::UnboundedReceiver<Result<Seen, String>>>,
}

impl ProxyBackend {
    pub(crate) async fn start() -> ProxyBackend {
        let (tx, rx) = mpsc::unbounded_channel();
        let backend = Backend::start(move |mut s: TcpStream| {
            let tx = tx.clone();
            async move {
                let header = read_proxy_header(&mut s).await;
                let ok = header.is_ok();
                let _ = tx.send(header);
                if ok {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                }
            }
        })
        .await;
        ProxyBackend { backend, seen: Mutex::new(rx) }
    }

    /// The next header a connection brought.
    pub(crate) async fn next(&self) -> Seen {
        let mut rx = self.seen.lock().await;
        within("a PROXY header at the backend", rx.recv())
            .await
            .expect("backend running")
            .expect("a valid PROXY header")
    }
}

const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";

/// Parses the header by the protocol's text (proxy-protocol.txt), reading exactly its bytes.
async fn read_proxy_header(s: &mut TcpStream) -> Result<Seen, String> {
    let mut first = [0u8; 1];
    s.read_exact(&mut first).await.map_err(|e| e.to_string())?;
    if first[0] == b'P' {
        let mut line = vec![b'P'];
        while !line.ends_with(b"\r\n") {
            line.push(s.read_u8().await.map_err(|e| e.to_string())?);
            if line.len() > 107 {
                return Err("v1 line too long".into());
            }
        }
        let text = String::from_utf8(line).map_err(|e| e.to_string())?;
        let parts: Vec<&str> = text.trim_end().split(' ').collect();
        let ["PROXY", "TCP4" | "TCP6", src, dst, sport, dport] = parts[..] else { return Err(format!("v1: {text:?}")) };
        let addr = |ip: &str, port: &str| -> Result<SocketAddr, String> {
            Ok(SocketAddr::new(
                ip.parse().map_err(|_| format!("ip {ip}"))?,
                port.parse().map_err(|_| format!("port {port}"))?,
            ))
        };
        return Ok(Seen { version: 1, source: addr(src, sport)?, destination: addr(dst, dport)?, tlvs: vec![] });
    }
    let mut fixed = [0u8; 16];
    fixed[0] = first[0];
    s.read_exact(&mut fixed[1..]).await.map_err(|e| e.to_string())?;
    if &fixed[..12] != V2_SIGNATURE || fixed[12] != 0x21 {
        return Err(format!("not a v2 PROXY command: {fixed:?}"));
    }
    let mut body = vec![0u8; usize::from(u16::from_be_bytes([fixed[14], fixed[15]]))];
    s.read_exact(&mut body).await.map_err(|e| e.to_string())?;
    let (source, destination, rest) = match fixed[13] {
        0x11 => {
            let ip = |b: &[u8]| IpAddr::from([b[0], b[1], b[2], b[3]]);
            let port = |b: &[u8]| u16::from_be_bytes([b[0], b[1]]);
            (
                SocketAddr::new(ip(&body[0..4]), port(&body[8..10])),
                SocketAddr::new(ip(&body[4..8]), port(&body[10..12])),
                &body[12..],
            )
        }
        0x21 => {
            let ip = |b: &[u8]| IpAddr::from(<[u8; 16]>::try_from(b).unwrap());
            let port = |b: &[u8]| u16::from_be_bytes([b[0], b[1]]);
            (
                SocketAddr::new(ip(&body[0..16]), port(&body[32..34])),
                SocketAddr::new(ip(&body[16..32]), port(&body[34..36])),
                &body[36..],
            )
        }
        other => return Err(format!("family {other:#x}")),
    };
    let mut tlvs = Vec::new();
    let mut rest = rest;
    while !rest.is_empty() {
        let len = usize::from(u16::from_be_bytes([rest[1], rest[2]]));
        tlvs.push((rest[0], rest[3..3 + len].to_vec()));
        rest = &rest[3 + len..];
    }
    Ok(Seen { version: 2, source, destination, tlvs })
}

/// A v2 PROXY header written by hand: `source` and `destination` (one family), no TLVs.
fn v2_header(source: SocketAddr, destination: SocketAddr) -> Vec<u8> {
    let mut h = V2_SIGNATURE.to_vec();
    let mut body = Vec::new();
    let family = match (source.ip(), destination.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            body.extend_from_slice(&s.octets());
            body.extend_from_slice(&d.octets());
            0x11
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            body.extend_from_slice(&s.octets());
            body.extend_from_slice(&d.octets());
            0x21
        }
        _ => panic!("one family"),
    };
    body.extend_from_slice(&source.port().to_be_bytes());
    body.extend_from_slice(&destination.port().to_be_bytes());
    h.extend_from_slice(&[0x21, family]);
    h.extend_from_slice(&(body.len() as u16).to_be_bytes());
    h.extend_from_slice(&body);
    h
}

/// v2 LOCAL, as a balancer's health check sends it.
fn v2_local() -> Vec<u8> {
    [&V2_SIGNATURE[..], &[0x20, 0x00, 0, 0]].concat()
}

/// Sends `data` and expects it back byte for byte.
pub(crate) async fn echoes(ws: &mut Ws, data: &[u8]) {
    send_binary(ws, data).await;
    assert!(read_bytes(ws, data.len()).await == data, "payload came back altered");
}

/// Writes `bytes` from `from` and expects the gateway to close without answering a byte.
async fn closed_unanswered(from: IpAddr, to: SocketAddr, bytes: &[u8]) {
    let mut s = within("connect", connect_from(from, to)).await.unwrap();
    // The gateway may close before the write lands: a reset is as good as a close here.
    let _ = s.write_all(bytes).await;
    let mut answer = Vec::new();
    match within("the gateway closes", s.read_to_end(&mut answer)).await {
        Ok(_) => assert!(answer.is_empty(), "expected no answer, got {:?}", String::from_utf8_lossy(&answer)),
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}"),
    }
}

const TRUST_LOOPBACK_1: &str = "proxy_protocol = true\ntrusted_proxies = [\"127.0.0.1/32\"]";

/// A route with `proxy_protocol = "v1"` or `"v2"` sends its backend the client's address and
/// port (clients on 127.0.0.2-9) and the address it connected to, before any other byte; v2
/// says whether the client came over TLS (PP2_TYPE_SSL). Then the session relays byte for
/// byte, so nothing else was put in the stream.
#[tokio::test]
async fn backend_receives_the_clients_address_and_port() {
    let backend = ProxyBackend::start().await;
    let gw = Gateway::builder()
        .tls()
        .route_with("v1", "/v1", &backend.backend.target(), "proxy_protocol = \"v1\"")
        .route_with("v2", "/v2", &backend.backend.target(), "proxy_protocol = \"v2\"")
        .start()
        .await;
    let mut sessions = Vec::new();
    for (i, last) in (2u8..=9).enumerate() {
        let (path, version, secure) =
            ([("/v1", 1, false), ("/v2", 2, false), ("/v1", 1, true), ("/v2", 2, true)])[i % 4];
        let (mut ws, local) = gw.session_via(IpAddr::from([127, 0, 0, last]), b"", path, secure, &[]).await.unwrap();
        let seen = backend.next().await;
        let listener = if secure { gw.secure.unwrap() } else { gw.plain };
        assert_eq!((seen.version, seen.source, seen.destination), (version, local, listener), "client {last}");
        let tlvs: Vec<(u8, Vec<u8>)> =
            if version == 2 && secure { vec![(0x20, vec![0x01, 0, 0, 0, 0])] } else { vec![] };
        assert_eq!(seen.tlvs, tlvs, "client {last}");
        echoes(&mut ws, &payload(70_000, u64::from(last))).await;
        sessions.push(ws);
    }
    assert_eq!(backend.backend.accepted(), 8);
}

/// A balancer in `trusted_proxies` that starts its connections with a PROXY header (v1 on ws,
/// v2 on wss, the TLS handshake behind it) has the address it carries believed: the session
/// log names it, and a route's PROXY header out passes it and its destination on.
#[tokio::test]
async fn trusted_balancer_header_is_honoured() {
    let (logs, _guard) = Logs::capture_at(tracing::Level::INFO);
    let backend = ProxyBackend::start().await;
    let gw = Gateway::builder()
        .tls()
        .listener_keys(TRUST_LOOPBACK_1)
        .route_with("pp", "/pp", &backend.backend.target(), "proxy_protocol = \"v2\"")
        .start()
        .await;
    let balancer = IpAddr::from([127, 0, 0, 1]);
    let v1 = b"PROXY TCP4 203.0.113.7 192.0.2.80 4242 80\r\n";
    let (mut ws, _) = gw.session_via(balancer, v1, "/pp", false, &[]).await.unwrap();
    let seen = backend.next().await;
    assert_eq!(
        (seen.source, seen.destination),
        ("203.0.113.7:4242".parse().unwrap(), "192.0.2.80:80".parse().unwrap())
    );
    assert_eq!(seen.tlvs, vec![]);
    echoes(&mut ws, b"through a balancer").await;
    within("close", ws.close(None)).await.unwrap();
    expect_end(&mut ws).await;

    let (src, dst) = ("[2001:db8::7]:5555".parse().unwrap(), "[2001:db8::1]:443".parse().unwrap());
    let (mut wss, _) = gw.session_via(balancer, &v2_header(src, dst), "/pp", true, &[]).await.unwrap();
    let seen = backend.next().await;
    assert_eq!((seen.source, seen.destination), (src, dst));
    assert_eq!(seen.tlvs, vec![(0x20, vec![0x01, 0, 0, 0, 0])], "the client came over TLS");
    echoes(&mut wss, &payload(100_000, 7)).await;
    within("close", wss.close(None)).await.unwrap();
    // Until the close reply and the end of the stream (without a TLS close_notify).
    within("the close reply", async { while let Some(Ok(_)) = wss.next().await {} }).await;

    eventually("both sessions logged their end", || async { logs.text().matches("session ended").count() == 2 }).await;
    let text = logs.text();
    let ended: Vec<&str> = text.lines().filter(|l| l.contains("session ended")).collect();
    for carried in ["client.addr=203.0.113.7:4242", "client.addr=[2001:db8::7]:5555"] {
        assert!(ended.iter().any(|l| l.contains(carried)), "no session ended with {carried}:\n{text}");
    }
    assert!(!text.contains("client.addr=127.0.0.1"), "the balancer's address stood for a client:\n{text}");
}

/// `limits.per_client.max_connections` counts the address a PROXY header carries, not the
/// balancer's: two clients behind one balancer each get their connection, and a second from
/// the same carried address is closed.
#[tokio::test]
async fn per_client_limits_count_the_carried_address() {
    let gw = Gateway::builder()
        .listener_keys(TRUST_LOOPBACK_1)
        .route("echo", "/echo", "builtin:echo")
        .limit("per_client.max_connections", "1")
        .start()
        .await;
    let balancer = IpAddr::from([127, 0, 0, 1]);
    let header = |ip: &str, port: u16| format!("PROXY TCP4 {ip} 127.0.0.1 {port} 80\r\n").into_bytes();
    let (mut a, _) = gw.session_via(balancer, &header("198.51.100.1", 1000), "/echo", false, &[]).await.unwrap();
    let (mut b, _) = gw.session_via(balancer, &header("198.51.100.2", 1000), "/echo", false, &[]).await.unwrap();
    echoes(&mut a, b"a").await;
    echoes(&mut b, b"b").await;
    let again = [header("198.51.100.1", 1001), upgrade_request("/echo", "").into_bytes()].concat();
    closed_unanswered(balancer, gw.plain, &again).await;
    let refused = [("listener", "plain"), ("reason", "client_connection_limit")];
    assert_eq!(scrape(&gw, "wsgate_connections_refused_total", &refused).await, 1.0);
    // The first two are still served.
    echoes(&mut a, b"still a").await;
}

/// A peer outside `trusted_proxies` is closed at accept, PROXY header or not, and counted
/// (`untrusted_proxy`); the backend never hears of it.
#[tokio::test]
async fn untrusted_peer_with_a_header_is_refused() {
    let backend = Backend::echo().await;
    let gw = Gateway::builder().listener_keys(TRUST_LOOPBACK_1).route("tcp", "/tcp", &backend.target()).start().await;
    let spoof = [&b"PROXY TCP4 10.0.0.1 127.0.0.1 1 80\r\n"[..], upgrade_request("/tcp", "").as_bytes()].concat();
    closed_unanswered([127, 0, 0, 2].into(), gw.plain, &spoof).await;
    let refused = [("listener", "plain"), ("reason", "untrusted_proxy")];
    assert_eq!(scrape(&gw, "wsgate_connections_refused_total", &refused).await, 1.0);
    assert_eq!(backend.accepted(), 0);
}

/// A trusted peer must send a header: a plain request, a malformed header and silence until
/// the handshake deadline each close the connection, counted (`proxy_header`); the backend
/// never hears of them.
#[tokio::test]
async fn trusted_peer_without_a_header_is_refused() {
    let backend = Backend::echo().await;
    let gw = Gateway::builder()
        .listener_keys(TRUST_LOOPBACK_1)
        .route("tcp", "/tcp", &backend.target())
        .limit("handshake_timeout_secs", "1")
        .start()
        .await;
    let balancer = IpAddr::from([127, 0, 0, 1]);
    closed_unanswered(balancer, gw.plain, upgrade_request("/tcp", "").as_bytes()).await;
    closed_unanswered(balancer, gw.plain, b"PROXY TCP4 not-an-address 127.0.0.1 1 80\r\nGET / HTTP/1.1\r\n\r\n").await;
    // Silence: closed at the handshake deadline (1 s), which the gateway must honour.
    closed_unanswered(balancer, gw.plain, b"").await;
    let refused = [("listener", "plain"), ("reason", "proxy_header")];
    assert_eq!(scrape(&gw, "wsgate_connections_refused_total", &refused).await, 3.0);
    assert_eq!(backend.accepted(), 0);
}

/// v2 LOCAL (a balancer's health check) is accepted, and the connection is the balancer's own:
/// the session log names its address.
#[tokio::test]
async fn v2_local_keeps_the_balancers_address() {
    let (logs, _guard) = Logs::capture_at(tracing::Level::INFO);
    let gw = Gateway::builder().listener_keys(TRUST_LOOPBACK_1).route("echo", "/echo", "builtin:echo").start().await;
    let (mut ws, local) = gw.session_via([127, 0, 0, 1].into(), &v2_local(), "/echo", false, &[]).await.unwrap();
    echoes(&mut ws, b"health").await;
    within("close", ws.close(None)).await.unwrap();
    expect_end(&mut ws).await;
    eventually("the session logged its end", || async { logs.text().contains("session ended") }).await;
    let text = logs.text();
    assert!(text.contains(&format!("client.addr={local}")), "{text}");
}

/// `X-Forwarded-For` from a trusted proxy names the client (the right-most address that is not
/// a trusted proxy) for the session log and PROXY out; from any other peer it is ignored.
#[tokio::test]
async fn forwarded_for_is_believed_only_from_trusted_proxies() {
    let (logs, _guard) = Logs::capture_at(tracing::Level::INFO);
    let backend = ProxyBackend::start().await;
    let gw = Gateway::builder()
        .listener_keys("trusted_proxies = [\"127.0.0.1/32\"]")
        .route_with("pp", "/pp", &backend.backend.target(), "proxy_protocol = \"v1\"")
        .start()
        .await;
    let xff = [("X-Forwarded-For", "6.6.6.6, 198.51.100.9, 127.0.0.1")];
    let (mut trusted, _) = gw.session_via([127, 0, 0, 1].into(), b"", "/pp", false, &xff).await.unwrap();
    let seen = backend.next().await;
    assert_eq!((seen.source, seen.destination), ("198.51.100.9:0".parse().unwrap(), gw.plain));
    echoes(&mut trusted, b"forwarded").await;
    let (mut untrusted, local) = gw.session_via([127, 0, 0, 2].into(), b"", "/pp", false, &xff).await.unwrap();
    let seen = backend.next().await;
    assert_eq!((seen.source, seen.destination), (local, gw.plain));
    echoes(&mut untrusted, b"spoofed").await;
    for ws in [&mut trusted, &mut untrusted] {
        within("close", ws.close(None)).await.unwrap();
        expect_end(ws).await;
    }
    eventually("both sessions logged their end", || async { logs.text().matches("session ended").count() == 2 }).await;
    let text = logs.text();
    assert!(text.contains("client.addr=198.51.100.9:0"), "{text}");
    assert!(text.contains(&format!("client.addr={local}")), "{text}");
    assert!(!text.contains("6.6.6.6"), "{text}");
}

/// `proxy_protocol` and `trusted_proxies` reload: after a SIGHUP-style reload that turns them
/// on, a session already open goes on, a new connection without a header is refused and one
/// with a trusted balancer's header is served.
#[tokio::test]
async fn proxy_protocol_is_turned_on_by_a_reload() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("wsgate.toml");
    std::fs::write(&path, Gateway::builder().route("echo", "/echo", "builtin:echo").toml()).unwrap();
    let gw = Gateway::from_file(&path).await;
    let balancer = IpAddr::from([127, 0, 0, 1]);
    let (mut before, _) = gw.session_via(balancer, b"", "/echo", false, &[]).await.unwrap();
    echoes(&mut before, b"before").await;

    let behind_balancer = Gateway::builder().listener_keys(TRUST_LOOPBACK_1).route("echo", "/echo", "builtin:echo");
    std::fs::write(&path, behind_balancer.toml()).unwrap();
    gw.reloader.reload_file(&path).expect("the addressing keys reload");
    echoes(&mut before, b"still open").await;
    closed_unanswered(balancer, gw.plain, upgrade_request("/echo", "").as_bytes()).await;
    let refused = [("listener", "plain"), ("reason", "proxy_header")];
    assert_eq!(scrape(&gw, "wsgate_connections_refused_total", &refused).await, 1.0);
    let header = b"PROXY TCP4 198.51.100.3 127.0.0.1 3333 80\r\n";
    let (mut after, _) = gw.session_via(balancer, header, "/echo", false, &[]).await.unwrap();
    echoes(&mut after, b"after").await;
}
