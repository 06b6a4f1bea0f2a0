//! The helper roles the same binary plays: the bare bridge and TCP relay baselines, the echo,
//! sink and source backends, the session holder, and `drive` against any endpoint.

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use crate::client::*;
use crate::measure::*;
use crate::targets::*;
use crate::{BackendKind, Mode};

pub(crate) async fn bare_bridge(backend: SocketAddr, tls: Option<Vec<PathBuf>>) {
    // The backlog of wsgate's default `listen_backlog` (tokio's `bind` asks for 1024), so that
    // in the reconnect storm both meet the same kernel queue and the bare bridge's clients do
    // not wait out SYN retransmissions wsgate's are spared.
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = socket.listen(4096).unwrap();
    println!("listening {}", listener.local_addr().unwrap());
    std::io::stdout().flush().unwrap();
    let acceptor = tls.map(|files| {
        use rustls::pki_types::pem::PemObject;
        let chain = rustls::pki_types::CertificateDer::pem_file_iter(&files[0])
            .unwrap()
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = rustls::pki_types::PrivateKeyDer::from_pem_file(&files[1]).unwrap();
        let mut cfg = rustls::ServerConfig::builder_with_provider(wsgate::tls::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .unwrap();
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        tokio_rustls::TlsAcceptor::from(Arc::new(cfg))
    });
    exit_when_stdin_closes();
    loop {
        let Ok((tcp, _)) = listener.accept().await else { continue };
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let _ = tcp.set_nodelay(true);
            let io: Box<dyn Io> = match acceptor {
                Some(a) => match a.accept(tcp).await {
                    Ok(s) => Box::new(s),
                    Err(_) => return,
                },
                None => Box::new(tcp),
            };
            let cfg = WebSocketConfig::default().read_buffer_size(16 * 1024).write_buffer_size(0);
            let Ok(ws) = tokio_tungstenite::accept_async_with_config(io, Some(cfg)).await else { return };
            let Ok(backend) = TcpStream::connect(backend).await else { return };
            let _ = backend.set_nodelay(true);
            let (mut br, mut bw) = backend.into_split();
            let (mut tx, mut rx) = ws.split();
            let up = async {
                while let Some(Ok(m)) = rx.next().await {
                    if m.is_binary() || m.is_text() {
                        if bw.write_all(&m.into_data()).await.is_err() {
                            break;
                        }
                    } else if m.is_close() {
                        break;
                    }
                }
            };
            let down = async {
                let mut buf = bytes::BytesMut::with_capacity(16 * 1024);
                loop {
                    buf.reserve(16 * 1024);
                    match br.read_buf(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(_) => {
                            if tx.send(Message::Binary(buf.split().freeze())).await.is_err() {
                                break;
                            }
                        }
                    }
                }
            };
            tokio::select! { _ = up => {}, _ = down => {} }
        });
    }
}

/// What any relay that moves bytes through user space can do on this machine: each byte is
/// received and sent once more per direction than on the direct path, with no WebSocket work at
/// all. A WebSocket relay can at best match it.
pub(crate) async fn tcp_relay(backend: SocketAddr) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    println!("listening {}", listener.local_addr().unwrap());
    std::io::stdout().flush().unwrap();
    exit_when_stdin_closes();
    loop {
        let Ok((mut client, _)) = listener.accept().await else { continue };
        tokio::spawn(async move {
            let Ok(mut server) = TcpStream::connect(backend).await else { return };
            let _ = (client.set_nodelay(true), server.set_nodelay(true));
            let _ = tokio::io::copy_bidirectional_with_sizes(&mut client, &mut server, 64 * 1024, 64 * 1024).await;
        });
    }
}

/// Helper roles end when the orchestrator goes away (it holds their standard input).
pub(crate) fn exit_when_stdin_closes() {
    tokio::task::spawn_blocking(|| {
        let _ = std::io::copy(&mut std::io::stdin(), &mut std::io::sink());
        std::process::exit(0);
    });
}

pub(crate) async fn hold(url: String, count: usize, ca: Option<PathBuf>) {
    let t = Endpoint::parse(&url).unwrap_or_else(|e| panic!("hold: {e}"));
    let tls = client_tls_from(ca.as_deref());
    let mut held = Vec::with_capacity(count);
    for _ in 0..count {
        held.push(ws_connect(&t, &tls).await);
    }
    println!("held {count}");
    std::io::stdout().flush().unwrap();
    let _ = tokio::task::spawn_blocking(|| std::io::copy(&mut std::io::stdin(), &mut std::io::sink())).await;
    drop(held);
}

/// A TCP backend in a process of its own, until standard input closes. It listens with the
/// relays' backlog, so that in the reconnect storm (where the bare bridge dials without limit)
/// no SYN is dropped at its queue: the storm's count of dropped SYNs is then the relay's own.
pub(crate) async fn backend(kind: BackendKind, listen: SocketAddr) {
    let socket = if listen.is_ipv4() { TcpSocket::new_v4() } else { TcpSocket::new_v6() }.unwrap();
    socket.set_reuseaddr(true).unwrap();
    socket.bind(listen).unwrap_or_else(|e| panic!("backend: bind {listen}: {e}"));
    let listener = socket.listen(4096).unwrap();
    println!("listening {}", listener.local_addr().unwrap());
    std::io::stdout().flush().unwrap();
    exit_when_stdin_closes();
    loop {
        let Ok((mut s, _)) = listener.accept().await else { continue };
        let _ = s.set_nodelay(true);
        tokio::spawn(async move {
            let (mut r, mut w) = s.split();
            match kind {
                // A 256 KiB buffer rather than tokio::io::copy's 8 KiB: with 8 KiB reads the
                // echo backend took more CPU than the relay under test.
                BackendKind::Echo => {
                    let mut buf = vec![0u8; 256 * 1024];
                    while let Ok(n @ 1..) = r.read(&mut buf).await {
                        if w.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                }
                BackendKind::Sink => {
                    let mut buf = vec![0u8; 256 * 1024];
                    while let Ok(1..) = r.read(&mut buf).await {}
                }
                BackendKind::Source => {
                    let chunk = vec![0xa5_u8; 64 * 1024];
                    while w.write_all(&chunk).await.is_ok() {}
                }
            }
        });
    }
}

/// Runs one measurement against any endpoint and prints it.
pub(crate) async fn drive(
    at: &Endpoint,
    mode: Mode,
    sessions: usize,
    size: usize,
    window: Duration,
    ca: Option<&Path>,
) {
    // A clear line for the usual mistake (nothing listening), rather than a panic per session.
    if let Err(e) = TcpStream::connect(at.addr).await {
        eprintln!("drive: connect to {} ({}): {e}", at.url(), at.addr);
        std::process::exit(1);
    }
    let tls = client_tls_from(ca);
    let what = format!("{} × {size} B to {}", sessions, at.url());
    if mode == Mode::Rtt {
        let rtts = latency(at, &tls, sessions, size, window).await;
        let us = |p| percentile(&rtts, p).as_secs_f64() * 1e6;
        println!(
            "rtt: {what}: p50 {:.0} µs, p99 {:.0} µs, p99.9 {:.0} µs ({} round trips)",
            us(0.5),
            us(0.99),
            us(0.999),
            rtts.len()
        );
    } else {
        let bps = throughput(at, &tls, mode, sessions, size, window).await;
        println!("{}: {what}: {:.1} MB/s", format!("{mode:?}").to_lowercase(), bps / 1e6);
    }
}
