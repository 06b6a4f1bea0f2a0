//! The client's WebSocket to the gateway: TCP (directly, or through an HTTP `CONNECT` proxy),
//! TLS for wss://, then the upgrade with the token, extra headers, subprotocols and the control
//! channel request. Every failure becomes the [`ClientError`] that names what failed.

use std::sync::Arc;

use base64::Engine;
use hyper::Uri;
use hyper_tungstenite::WebSocketStream;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tracing::info;
use tungstenite::client::IntoClientRequest;
use tungstenite::handshake::derive_accept_key;
use tungstenite::http::{HeaderName, HeaderValue, header};
use tungstenite::protocol::{Role, WebSocketConfig};

use super::{ClientError, Options, Secret};
use crate::client_stream::Duplex;
use crate::control;
use crate::frames::{ClientWs, FrameGate};

/// The gateway's URL, checked.
#[derive(Debug, Clone)]
pub struct Target {
    /// As given.
    pub url: String,
    /// wss://.
    pub secure: bool,
    /// The host, without IPv6 brackets.
    pub host: String,
    /// The port (the scheme's default if none was given).
    pub port: u16,
}

impl Target {
    /// Reads a ws:// or wss:// URL.
    pub fn parse(url: &str) -> Result<Target, ClientError> {
        let bad = |why: &str| ClientError::Usage(format!("URL {url:?}: {why}"));
        let uri: Uri = url.parse().map_err(|e| bad(&format!("{e}")))?;
        let secure = match uri.scheme_str() {
            Some("wss") => true,
            Some("ws") => false,
            _ => return Err(bad("the scheme must be ws or wss")),
        };
        let host = uri.host().ok_or_else(|| bad("no host"))?;
        let host = host.trim_start_matches('[').trim_end_matches(']').to_string();
        let port = uri.port_u16().unwrap_or(if secure { 443 } else { 80 });
        Ok(Target { url: url.to_string(), secure, host, port })
    }

    /// `host:port` as a request line or CONNECT names it.
    fn authority(&self) -> String {
        match self.host.contains(':') {
            true => format!("[{}]:{}", self.host, self.port),
            false => format!("{}:{}", self.host, self.port),
        }
    }
}

/// An HTTP proxy that tunnels with `CONNECT` (from `HTTPS_PROXY` or `--proxy`).
#[derive(Debug, Clone)]
pub struct Proxy {
    /// The proxy's host.
    pub host: String,
    /// The proxy's port (8080 if none was given).
    pub port: u16,
    /// `Proxy-Authorization: Basic` credentials from the URL's userinfo, encoded.
    pub auth: Option<Secret>,
}

impl Proxy {
    /// Reads `http://[user:password@]host[:port]`; the error never repeats the URL (it may hold
    /// a password).
    pub fn parse(url: &str) -> Result<Proxy, ClientError> {
        let bad = |why: &str| ClientError::Usage(format!("proxy URL: {why}"));
        let rest = url.strip_prefix("http://").or_else(|| (!url.contains("://")).then_some(url));
        let rest = rest.ok_or_else(|| bad("only http:// proxies are supported"))?;
        let rest = rest.trim_end_matches('/');
        let (userinfo, hostport) = match rest.rsplit_once('@') {
            Some((u, h)) => (Some(u), h),
            None => (None, rest),
        };
        let uri: Uri = format!("http://{hostport}").parse().map_err(|_| bad("not host[:port]"))?;
        let host = uri.host().ok_or_else(|| bad("no host"))?;
        let host = host.trim_start_matches('[').trim_end_matches(']').to_string();
        let auth = userinfo.map(|u| Secret(base64::engine::general_purpose::STANDARD.encode(percent_decode(u))));
        Ok(Proxy { host, port: uri.port_u16().unwrap_or(8080), auth })
    }
}

/// Whether `NO_PROXY` (comma-separated hosts or domain suffixes, or `*`) exempts `host`.
pub fn is_exempt(no_proxy: &str, host: &str) -> bool {
    no_proxy.split(',').map(str::trim).filter(|e| !e.is_empty()).any(|entry| {
        let entry = entry.trim_start_matches('.');
        entry == "*" || host.eq_ignore_ascii_case(entry) || host.to_ascii_lowercase().ends_with(&format!(".{entry}"))
    })
}

fn percent_decode(s: &str) -> Vec<u8> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes.get(i + 1..i + 3).and_then(|h| std::str::from_utf8(h).ok());
        match (bytes[i], hex.and_then(|h| u8::from_str_radix(h, 16).ok())) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    out
}

/// An open session: the WebSocket, and whether the gateway agreed to the control channel.
pub struct Dialed {
    /// The WebSocket, as the bridge drives it. Its stream (TCP, or TLS over it) is boxed as the
    /// gateway boxes its clients' streams: one WebSocket type on both sides means one copy of
    /// tungstenite's read path and of the pump in the binary, so the client role does not change
    /// how the gateway's own relay is inlined (docs/performance.md, item 22).
    pub ws: ClientWs<Box<dyn Duplex>>,
    /// The 101 carried `wsgate-control: 1`.
    pub control: bool,
}

/// Opens a session with a TLS config built from `options`.
pub async fn connect(options: &Options) -> Result<Dialed, ClientError> {
    connect_with(options, super::tls::config(options)?).await
}

/// Opens a session; `tls` is the config for wss:// (`None` for ws://).
pub async fn connect_with(options: &Options, tls: Option<Arc<rustls::ClientConfig>>) -> Result<Dialed, ClientError> {
    let timeout = options.connect_timeout;
    match tokio::time::timeout(timeout, dial(options, tls)).await {
        Ok(dialed) => dialed,
        Err(_) => {
            Err(ClientError::Unreachable(format!("{}: no session within {timeout:?}", options.target.authority())))
        }
    }
}

async fn dial(options: &Options, tls: Option<Arc<rustls::ClientConfig>>) -> Result<Dialed, ClientError> {
    let target = &options.target;
    let tcp = match &options.proxy {
        Some(proxy) => through(proxy, target).await?,
        None => TcpStream::connect((target.host.as_str(), target.port))
            .await
            .map_err(|e| ClientError::Unreachable(format!("{}: {e}", target.authority())))?,
    };
    // Each relayed message is written whole; Nagle would only delay the last segment.
    let _ = tcp.set_nodelay(true);
    let io: Box<dyn Duplex> = match tls {
        None => Box::new(tcp),
        Some(config) => {
            let name = options.tls.server_name.clone().unwrap_or_else(|| target.host.clone());
            let server_name = ServerName::try_from(name.clone())
                .map_err(|_| ClientError::Usage(format!("{name:?} is not a valid TLS server name")))?;
            let stream = tokio_rustls::TlsConnector::from(config)
                .connect(server_name, tcp)
                .await
                .map_err(|e| ClientError::Tls { host: name, problem: tls_problem(&e) })?;
            Box::new(stream)
        }
    };
    handshake(io, options).await
}

/// rustls's own reason when there is one (an unknown issuer, a name mismatch), else the I/O
/// error's.
fn tls_problem(e: &std::io::Error) -> String {
    match e.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>()) {
        Some(rustls) => rustls.to_string(),
        None => e.to_string(),
    }
}

/// Largest message (and frame) accepted from the gateway.
const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;

async fn handshake(mut io: Box<dyn Duplex>, options: &Options) -> Result<Dialed, ClientError> {
    let mut request = options
        .target
        .url
        .as_str()
        .into_client_request()
        .map_err(|e| ClientError::Usage(format!("URL {:?}: {e}", options.target.url)))?;
    let headers = request.headers_mut();
    for (name, value) in &options.headers {
        let name = HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| ClientError::Usage(format!("--header: {name:?} is not a header name")))?;
        let value = HeaderValue::from_str(value)
            .map_err(|_| ClientError::Usage(format!("--header {name}: the value is not a valid header value")))?;
        headers.append(name, value);
    }
    if options.control {
        headers.insert(control::HEADER, HeaderValue::from_static(control::VERSION));
    }
    if !options.subprotocols.is_empty() {
        let offered = HeaderValue::from_str(&options.subprotocols.join(", "))
            .map_err(|_| ClientError::Usage("--subprotocol: not a valid header value".into()))?;
        headers.insert(header::SEC_WEBSOCKET_PROTOCOL, offered);
    }
    let mut path = request.uri().path_and_query().map(|p| p.as_str()).unwrap_or("/").to_string();
    if let Some(token) = &options.token {
        options.token_via.apply(token, request.headers_mut(), &mut path)?;
    }
    let key = request.headers().get(header::SEC_WEBSOCKET_KEY).map(|k| k.as_bytes().to_vec()).unwrap_or_default();
    let mut head = format!("GET {path} HTTP/1.1\r\n").into_bytes();
    for (name, value) in request.headers() {
        head.extend_from_slice(name.as_str().as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(value.as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    head.extend_from_slice(b"\r\n");
    let failed = |e: std::io::Error| match e.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>()) {
        // TLS 1.3 finishes the client's handshake before the server has checked the client's
        // certificate: a refusal of ours (none, unknown CA, revoked) is an alert read here.
        Some(tls) => ClientError::Tls {
            host: options.tls.server_name.clone().unwrap_or_else(|| options.target.host.clone()),
            problem: tls.to_string(),
        },
        None => ClientError::Unreachable(format!("{}: {e}", options.target.authority())),
    };
    io.write_all(&head).await.map_err(failed)?;
    io.flush().await.map_err(failed)?;
    let answer = read_head(&mut io).await.map_err(failed)?;
    if answer.status != 101 {
        let body = read_body(&mut io, answer.content_length).await;
        let reason = String::from_utf8_lossy(&body).lines().next().unwrap_or_default().trim().to_string();
        return Err(refusal(answer.status, reason));
    }
    let accept = answer.header(header::SEC_WEBSOCKET_ACCEPT.as_str());
    if accept != Some(derive_accept_key(&key).as_str()) {
        return Err(ClientError::Handshake("the 101 does not carry the right Sec-WebSocket-Accept".into()));
    }
    let chosen = answer.header(header::SEC_WEBSOCKET_PROTOCOL.as_str());
    if let Some(chosen) = chosen
        && !options.subprotocols.iter().any(|p| p == chosen)
    {
        return Err(ClientError::Handshake(format!("the gateway chose subprotocol {chosen:?}, which was not offered")));
    }
    let agreed = answer.header(control::HEADER) == Some(control::VERSION);
    // Not an error: an older gateway, or a route with `half_close = false`. The local side's EOF
    // then ends the session (a Close 1000), and what the backend would send after it is lost.
    let half_close = options.control && agreed;
    if options.control && !agreed {
        info!("the gateway did not agree to the control channel: the local side's EOF will end the session");
    }
    info!(subprotocol = chosen.unwrap_or("none"), half_close, "upgraded");
    let config = WebSocketConfig::default()
        // Data frames go past tungstenite (`frames`); only control frames pass through it.
        .write_buffer_size(0)
        .max_write_buffer_size(64 * 1024)
        .max_message_size(Some(MAX_MESSAGE_BYTES))
        .max_frame_size(Some(MAX_MESSAGE_BYTES));
    // Built only now: the gate follows the frames from the first byte after the 101's head,
    // which is why the head was read a byte at a time rather than by tungstenite's handshake.
    let gate = FrameGate::new(io).frame_limit(MAX_MESSAGE_BYTES);
    let ws = WebSocketStream::from_raw_socket(gate, Role::Client, Some(config)).await;
    Ok(Dialed { ws, control: half_close })
}

/// The head of the gateway's answer to the upgrade.
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    content_length: usize,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

/// Reads the answer's head, a byte at a time, so not a byte after it is taken.
async fn read_head(io: &mut Box<dyn Duplex>) -> std::io::Result<Answer> {
    let mut head = Vec::with_capacity(256);
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() >= MAX_ANSWER_HEAD_BYTES {
            return Err(std::io::Error::other("the answer's head is too long"));
        }
        head.push(io.read_u8().await?);
    }
    let text = String::from_utf8_lossy(&head);
    let mut lines = text.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not an HTTP answer: {status_line:?}")))?;
    let headers: Vec<(String, String)> =
        lines.filter_map(|l| l.split_once(':')).map(|(n, v)| (n.trim().to_string(), v.trim().to_string())).collect();
    let content_length = headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    Ok(Answer { status, headers, content_length })
}

/// Reads a refusal's body (its reason), at most [`MAX_REASON_BYTES`].
async fn read_body(io: &mut Box<dyn Duplex>, len: usize) -> Vec<u8> {
    let mut body = vec![0; len.min(MAX_REASON_BYTES)];
    let mut filled = 0;
    while filled < body.len() {
        match io.read(&mut body[filled..]).await {
            Ok(n @ 1..) => filled += n,
            _ => break,
        }
    }
    body
}

/// The most of an answer's head read before giving up on it.
const MAX_ANSWER_HEAD_BYTES: usize = 16 * 1024;

/// The most of a refusal's body read for its reason.
const MAX_REASON_BYTES: usize = 4096;

/// The error for an HTTP answer to the upgrade other than 101.
fn refusal(status: u16, reason: String) -> ClientError {
    match status {
        401 | 403 | 429 => ClientError::Access { status, reason },
        404 => ClientError::NotFound(reason),
        502..=504 => ClientError::BackendDown { status, reason },
        _ => ClientError::Handshake(format!("{status} {reason}")),
    }
}

/// Opens a tunnel to `target` through `proxy` with `CONNECT`.
async fn through(proxy: &Proxy, target: &Target) -> Result<TcpStream, ClientError> {
    let mut stream = TcpStream::connect((proxy.host.as_str(), proxy.port))
        .await
        .map_err(|e| ClientError::Unreachable(format!("proxy {}:{}: {e}", proxy.host, proxy.port)))?;
    let authority = target.authority();
    let mut request = format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n");
    if let Some(auth) = &proxy.auth {
        request.push_str(&format!("Proxy-Authorization: Basic {}\r\n", auth.0));
    }
    request.push_str("\r\n");
    let failed = |e: std::io::Error| ClientError::Proxy(format!("{}:{}: {e}", proxy.host, proxy.port));
    stream.write_all(request.as_bytes()).await.map_err(failed)?;
    // One byte at a time: what follows the proxy's answer is the tunnel's, and must stay unread.
    let mut head = Vec::with_capacity(256);
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() >= MAX_PROXY_HEAD_BYTES {
            return Err(ClientError::Proxy("the answer's head is too long".into()));
        }
        let byte = stream.read_u8().await.map_err(failed)?;
        head.push(byte);
    }
    let head = String::from_utf8_lossy(&head);
    let status_line = head.lines().next().unwrap_or_default().trim();
    match status_line.split_whitespace().nth(1) {
        Some(code) if code.starts_with('2') => Ok(stream),
        _ => Err(ClientError::Proxy(status_line.to_string())),
    }
}

/// The most a proxy's answer to `CONNECT` may hold before the tunnel starts.
const MAX_PROXY_HEAD_BYTES: usize = 8 * 1024;

#[cfg(test)]
mod tests {
    use super::*;

    /// URLs: scheme, default ports, IPv6 brackets; other schemes refused.
    #[test]
    fn targets_parse() {
        let t = Target::parse("wss://gw.example/ssh").unwrap();
        assert_eq!((t.secure, t.host.as_str(), t.port), (true, "gw.example", 443));
        let t = Target::parse("ws://[::1]:8080/x?y=1").unwrap();
        assert_eq!((t.secure, t.host.as_str(), t.port, t.authority()), (false, "::1", 8080, "[::1]:8080".to_string()));
        assert!(Target::parse("http://gw/x").is_err());
    }

    /// Proxy URLs with credentials (percent-encoded), without a scheme; the error hides the URL.
    #[test]
    fn proxies_parse() {
        let p = Proxy::parse("http://us%40er:p%3Ass@proxy.corp:3128/").unwrap();
        assert_eq!((p.host.as_str(), p.port), ("proxy.corp", 3128));
        assert_eq!(p.auth.unwrap().0, base64::engine::general_purpose::STANDARD.encode("us@er:p:ss"));
        assert_eq!(Proxy::parse("proxy.corp").unwrap().port, 8080);
        let e = Proxy::parse("socks5://user:secret@h:1").unwrap_err().to_string();
        assert!(!e.contains("secret"), "{e}");
    }

    /// The gateway's first frame often comes in the same read as the 101 (a backend that speaks
    /// first, such as sshd): it arrives whole. The 101 is the gateway's (hyper's) own, whose
    /// bytes, taken for frame headers, would announce a frame reaching 19 bytes past its end:
    /// the payload has a frame header there that a frame tracker out of step would act on (it
    /// would cut a "frame" of 100,000 bytes, rewriting bytes of the payload). Ten handshakes.
    #[tokio::test]
    async fn the_frame_right_behind_the_101_arrives_whole() {
        use futures_util::StreamExt;
        use tokio::net::TcpListener;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut payload = vec![b'.'; 100];
        payload[17..27].copy_from_slice(&[0x82, 0x7f, 0, 0, 0, 0, 0, 0x01, 0x86, 0xa0]);
        let sent = payload.clone();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let mut head = Vec::new();
                while !head.ends_with(b"\r\n\r\n") {
                    head.push(s.read_u8().await.unwrap());
                }
                let text = String::from_utf8(head).unwrap();
                let key = text
                    .lines()
                    .filter_map(|l| l.split_once(": "))
                    .find_map(|(name, value)| name.eq_ignore_ascii_case("sec-websocket-key").then_some(value))
                    .unwrap();
                let mut answer = format!(
                    "HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: websocket\r\n\
                     sec-websocket-accept: {}\r\nwsgate-control: 1\r\ndate: Fri, 04 Dec 2026 03:21:50 GMT\r\n\r\n",
                    derive_accept_key(key.as_bytes())
                )
                .into_bytes();
                answer.extend_from_slice(&[0x82, 100]);
                answer.extend_from_slice(&sent);
                // One write: the 101 and the first frame.
                s.write_all(&answer).await.unwrap();
                let _ = s.read_u8().await;
            }
        });
        let options = Options {
            target: Target::parse(&format!("ws://{addr}/x")).unwrap(),
            tls: Default::default(),
            token: None,
            token_via: Default::default(),
            headers: Vec::new(),
            subprotocols: Vec::new(),
            proxy: None,
            ping_interval: None,
            connect_timeout: std::time::Duration::from_secs(5),
            fail_fast: true,
            control: true,
        };
        for i in 0..10 {
            let mut dialed = connect(&options).await.unwrap();
            let first = tokio::time::timeout(std::time::Duration::from_secs(5), dialed.ws.next()).await;
            let first = first.unwrap_or_else(|_| panic!("handshake {i}: the first frame never came")).unwrap().unwrap();
            assert!(first.into_data().as_ref() == payload, "handshake {i}: the first frame altered");
        }
    }

    /// NO_PROXY: exact hosts, domain suffixes (with or without the dot), `*`.
    #[test]
    fn no_proxy_matches() {
        assert!(is_exempt("localhost, .corp.example", "gw.corp.example"));
        assert!(is_exempt("corp.example", "corp.example"));
        assert!(is_exempt("*", "anything"));
        assert!(!is_exempt("corp.example", "notcorp.example"));
        assert!(!is_exempt("", "gw"));
    }
}
