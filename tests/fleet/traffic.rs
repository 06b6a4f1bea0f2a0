//! The fleet's traffic: clients that stream a deterministic byte sequence through HAProxy and a
//! replica to a backend and back, resuming after a 1001 where the other side's count left off,
//! and backends that read wsgate's PROXY v2 header and check every byte.
//!
//! Each client `c` has two streams of `TRANSFER` bytes, one each way; the byte at offset `k` is
//! `byte(seed(c, direction), k)`. Whoever receives checks each byte against its offset, so a gap,
//! a corruption or a reordering shows as a mismatch at once. A connection starts with a hello
//! (client → backend: client id, the offset the client has received up to) and a reply (backend
//! → client: the offset the backend has received up to, and which replica this is); each side
//! resumes sending from the offset the other has, so every transfer completes exactly once over
//! however many connections it took.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

/// Bytes each way per client.
pub const TRANSFER: u64 = 384 * 1024;
/// The steady rate while the restarts run: `CHUNK` bytes every `TICK`, each way, per client.
pub const CHUNK: usize = 512;
pub const TICK: Duration = Duration::from_millis(50);
const HELLO: usize = 12;
const REPLY: usize = 9;

const UP: u64 = 0;
const DOWN: u64 = 1;

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

fn seed(client: u32, direction: u64) -> u64 {
    splitmix(((client as u64) << 1 | direction) ^ 0x5EED)
}

/// The byte at offset `k` of a stream.
fn byte(seed: u64, k: u64) -> u8 {
    (splitmix(seed ^ (k >> 3)) >> ((k & 7) * 8)) as u8
}

fn fill(seed: u64, from: u64, len: usize) -> Vec<u8> {
    (0..len as u64).map(|i| byte(seed, from + i)).collect()
}

/// The offset of the first byte of `data` (starting at `from`) that is not what the stream holds.
fn mismatch(seed: u64, from: u64, data: &[u8]) -> Option<u64> {
    data.iter().enumerate().find(|(i, b)| **b != byte(seed, from + *i as u64)).map(|(i, _)| from + i as u64)
}

/// Set once the restarts are over: the rest of each transfer then goes as fast as it can.
pub static UNPACED: AtomicBool = AtomicBool::new(false);

async fn pace(interval: &mut tokio::time::Interval) {
    if !UNPACED.load(Ordering::Relaxed) {
        interval.tick().await;
    }
}

/// One backend connection, as the backend saw it.
#[derive(Debug, Clone)]
pub struct BackendConn {
    pub client: u32,
    pub replica: usize,
    /// The source address of wsgate's PROXY v2 header: the client's, as HAProxy told wsgate.
    pub proxied_source: SocketAddrV4,
    /// Bytes written to wsgate (the reply included) and read from it (the hello included).
    pub written: u64,
    pub read: u64,
}

/// What the backends share: each client's received offset (locked for a connection's length, so
/// a reconnect waits until the previous connection has counted its last byte), and the record.
pub struct Backends {
    up_received: Vec<Arc<tokio::sync::Mutex<u64>>>,
    pub conns: Mutex<Vec<BackendConn>>,
    pub problems: Mutex<Vec<String>>,
    started: AtomicUsize,
    /// The sentinel's backend connection: is there, and may close.
    sentinel_ready: tokio::sync::Notify,
    sentinel_release: tokio::sync::Notify,
    sentinel_eof: tokio::sync::Notify,
    /// What the sentinels' backend connections read (their hellos).
    pub sentinel_read: AtomicU64,
}

impl Backends {
    pub fn new(clients: usize) -> Arc<Backends> {
        Arc::new(Backends {
            up_received: (0..clients).map(|_| Arc::default()).collect(),
            conns: Mutex::default(),
            problems: Mutex::default(),
            started: AtomicUsize::new(0),
            sentinel_ready: tokio::sync::Notify::new(),
            sentinel_release: tokio::sync::Notify::new(),
            sentinel_eof: tokio::sync::Notify::new(),
            sentinel_read: AtomicU64::new(0),
        })
    }

    /// Connections that got as far as the backend's reply.
    pub fn conns_started(&self) -> usize {
        self.started.load(Ordering::Relaxed)
    }

    pub async fn up_received(&self, client: u32) -> u64 {
        *self.up_received[client as usize].lock().await
    }
}

/// Replica `replica`'s backend: accepts and serves until the test ends.
pub async fn backend(listener: TcpListener, replica: usize, shared: Arc<Backends>) {
    loop {
        let (s, _) = listener.accept().await.expect("backend accept");
        let shared = shared.clone();
        tokio::spawn(async move {
            if let Err(e) = serve(s, replica, &shared).await {
                shared.problems.lock().unwrap().push(format!("backend {}: {e}", replica + 1));
            }
        });
    }
}

/// Reads wsgate's PROXY v2 header: the source address it carries.
async fn proxy_v2(s: &mut TcpStream) -> Result<SocketAddrV4, String> {
    let mut fixed = [0u8; 16];
    // The signature first: without a header the client's 12-byte hello comes instead, and
    // waiting for 16 bytes would wait for ever.
    s.read_exact(&mut fixed[..12]).await.map_err(|e| format!("PROXY header: {e}"))?;
    if &fixed[..12] != b"\r\n\r\n\0\r\nQUIT\n" {
        return Err(format!("no PROXY v2 signature: {:02x?}", &fixed[..12]));
    }
    s.read_exact(&mut fixed[12..]).await.map_err(|e| format!("PROXY header: {e}"))?;
    if fixed[12] != 0x21 || fixed[13] != 0x11 {
        return Err(format!("PROXY v2: expected PROXY over TCP4, got {:02x} {:02x}", fixed[12], fixed[13]));
    }
    let len = u16::from_be_bytes([fixed[14], fixed[15]]) as usize;
    let mut rest = vec![0u8; len];
    s.read_exact(&mut rest).await.map_err(|e| format!("PROXY header: {e}"))?;
    if len < 12 {
        return Err(format!("PROXY v2: address block of {len} bytes"));
    }
    let ip = Ipv4Addr::new(rest[0], rest[1], rest[2], rest[3]);
    Ok(SocketAddrV4::new(ip, u16::from_be_bytes([rest[8], rest[9]])))
}

async fn serve(mut s: TcpStream, replica: usize, shared: &Backends) -> Result<(), String> {
    let proxied_source = proxy_v2(&mut s).await?;
    let mut hello = [0u8; HELLO];
    s.read_exact(&mut hello).await.map_err(|e| format!("hello: {e}"))?;
    let client = u32::from_be_bytes(hello[..4].try_into().unwrap());
    if client == SENTINEL {
        return sentinel_backend(s, shared).await;
    }
    let mut down = u64::from_be_bytes(hello[4..].try_into().unwrap());
    let state = shared.up_received.get(client as usize).ok_or(format!("hello from client {client}"))?;
    let mut up = tokio::time::timeout(Duration::from_secs(30), state.clone().lock_owned())
        .await
        .map_err(|_| format!("client {client}: the previous connection did not end within 30 s"))?;
    let mut reply = up.to_be_bytes().to_vec();
    reply.push(replica as u8);
    s.write_all(&reply).await.map_err(|e| format!("reply: {e}"))?;
    shared.started.fetch_add(1, Ordering::Relaxed);
    let (mut written, mut read) = (REPLY as u64, HELLO as u64);
    let (up_seed, down_seed) = (seed(client, UP), seed(client, DOWN));
    let mut rbuf = vec![0u8; 16 * 1024];
    let mut pending: Vec<u8> = Vec::new();
    let mut sent_of_pending = 0;
    let mut interval = tokio::time::interval(TICK);
    let (mut rd, mut wr) = s.split();
    let result = loop {
        tokio::select! {
            r = rd.read(&mut rbuf) => match r {
                // wsgate shut its write side: the client closed, or the replica is shutting down.
                Ok(0) => break Ok(()),
                Ok(n) => {
                    if let Some(at) = mismatch(up_seed, *up, &rbuf[..n]) {
                        break Err(format!("client {client}: upstream byte {at} is wrong (replica {})", replica + 1));
                    }
                    *up += n as u64;
                    read += n as u64;
                }
                Err(e) => break Err(format!("client {client}: read: {e}")),
            },
            // A write future that is dropped here wrote nothing, so `written` is exact.
            w = wr.write(&pending[sent_of_pending..]), if sent_of_pending < pending.len() => match w {
                Ok(n) => {
                    sent_of_pending += n;
                    written += n as u64;
                    down += n as u64;
                }
                Err(e) => break Err(format!("client {client}: write: {e}")),
            },
            _ = pace(&mut interval), if sent_of_pending == pending.len() && down < TRANSFER => {
                let len = CHUNK.min((TRANSFER - down) as usize);
                pending = fill(down_seed, down, len);
                sent_of_pending = 0;
            }
        }
    };
    drop(up);
    shared.conns.lock().unwrap().push(BackendConn { client, replica, proxied_source, written, read });
    let _ = wr.shutdown().await;
    result
}

/// The client id of a sentinel session.
const SENTINEL: u32 = u32::MAX;

/// A sentinel's backend: sends nothing (so the gateway drops nothing of it), and once wsgate shut
/// its write side, holds the connection until released (at most 4 s, less than wsgate's
/// `close_timeout_secs`), which keeps the replica running while the test takes its last scrape.
async fn sentinel_backend(mut s: TcpStream, shared: &Backends) -> Result<(), String> {
    shared.sentinel_read.fetch_add(HELLO as u64, Ordering::Relaxed);
    shared.sentinel_ready.notify_one();
    let mut buf = [0u8; 64];
    match s.read(&mut buf).await {
        Ok(0) => {}
        Ok(_) => return Err("the sentinel sent data".into()),
        Err(e) => return Err(format!("sentinel: read: {e}")),
    }
    shared.sentinel_eof.notify_one();
    let released = tokio::time::timeout(Duration::from_secs(4), shared.sentinel_release.notified()).await;
    released.map_err(|_| "sentinel: not released within 4 s".to_string())
}

impl Backends {
    /// Waits until wsgate has shut the sentinel's backend connection's write side: the sentinel
    /// session is closed and counted, and is draining its backend.
    pub async fn sentinel_closed(&self, within: Duration) {
        tokio::time::timeout(within, self.sentinel_eof.notified()).await.expect("the sentinel's close");
    }

    /// Lets the sentinel's backend connection end.
    pub fn release_sentinel(&self) {
        self.sentinel_release.notify_one();
    }
}

/// Opens a sentinel session on the replica listening on `port`, directly (with a PROXY v2
/// `LOCAL` header, as HAProxy's own connections have), and waits until its backend connection is
/// there. The task returns the close code the sentinel got.
pub async fn sentinel(port: u16, backends: &Backends) -> tokio::task::JoinHandle<Option<u16>> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).await.expect("sentinel connect");
    let mut local = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    local.extend_from_slice(&[0x20, 0x00, 0x00, 0x00]);
    stream.write_all(&local).await.unwrap();
    let ready = backends.sentinel_ready.notified();
    let (mut ws, _) =
        tokio_tungstenite::client_async("ws://fleet.test/fleet", stream).await.expect("sentinel handshake");
    let mut hello = SENTINEL.to_be_bytes().to_vec();
    hello.extend_from_slice(&0u64.to_be_bytes());
    ws.send(Message::binary(hello)).await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), ready).await.expect("sentinel's backend connection");
    tokio::spawn(async move {
        let mut code = None;
        while let Some(Ok(msg)) = ws.next().await {
            if let Message::Close(frame) = msg {
                code = frame.map(|f| u16::from(f.code));
            }
        }
        code
    })
}

/// One WebSocket connection of a client, as the client saw it.
#[derive(Debug, Clone)]
pub struct ClientConn {
    pub local: SocketAddr,
    pub replica: Option<usize>,
    pub close_code: Option<u16>,
    /// Bytes sent (the hello included) and received (the reply included).
    pub sent: u64,
    pub received: u64,
}

#[derive(Debug, Default)]
pub struct ClientReport {
    pub conns: Vec<ClientConn>,
    pub handshake_failures: Vec<String>,
    pub problems: Vec<String>,
    pub completed: bool,
    pub down_received: u64,
}

/// Client `client`, bound to `local_ip`: streams its transfer through `frontend`, reconnecting
/// after each 1001, until both directions are complete.
pub async fn client(client: u32, local_ip: Ipv4Addr, frontend: SocketAddr, backends: Arc<Backends>) -> ClientReport {
    let mut report = ClientReport::default();
    let mut down = 0u64;
    // Bounded: a handshake that fails is a failure of the test, retried only to see the rest.
    while report.conns.len() + report.handshake_failures.len() < 10 {
        let socket = TcpSocket::new_v4().unwrap();
        socket.bind(SocketAddr::new(local_ip.into(), 0)).unwrap();
        let stream = match socket.connect(frontend).await {
            Ok(s) => s,
            Err(e) => {
                report.handshake_failures.push(format!("client {client}: connect: {e}"));
                continue;
            }
        };
        let local = stream.local_addr().unwrap();
        let ws = match tokio_tungstenite::client_async("ws://fleet.test/fleet", stream).await {
            Ok((ws, _)) => ws,
            Err(e) => {
                report.handshake_failures.push(format!("client {client} from {local}: handshake: {e}"));
                continue;
            }
        };
        let conn = connection(client, ws, &mut down, local, &mut report.problems).await;
        let code = conn.close_code;
        report.conns.push(conn);
        if down == TRANSFER && backends.up_received(client).await == TRANSFER {
            report.completed = true;
            break;
        }
        if code != Some(1001) {
            report.problems.push(format!(
                "client {client}: connection from {local} ended with {code:?} before the transfer completed"
            ));
            break;
        }
    }
    report.down_received = down;
    report
}

type Ws = tokio_tungstenite::WebSocketStream<TcpStream>;

/// One connection: hello, reply, then both directions until the transfer is complete (the
/// client closes with 1000) or the gateway closes.
async fn connection(client: u32, ws: Ws, down: &mut u64, local: SocketAddr, problems: &mut Vec<String>) -> ClientConn {
    let mut conn = ClientConn { local, replica: None, close_code: None, sent: 0, received: 0 };
    let (mut sink, mut stream) = ws.split();
    let mut hello = client.to_be_bytes().to_vec();
    hello.extend_from_slice(&down.to_be_bytes());
    if sink.send(Message::binary(hello)).await.is_err() {
        problems.push(format!("client {client}: hello not sent"));
        return conn;
    }
    conn.sent = HELLO as u64;
    // The sender runs as a task of its own: a send cancelled half-way might still be written
    // later, and then `sent` would be wrong.
    let (up_from_tx, up_from_rx) = tokio::sync::oneshot::channel::<u64>();
    let down_done = Arc::new(tokio::sync::Notify::new());
    let stop = Arc::new(AtomicBool::new(false));
    let sender = tokio::spawn({
        let (down_done, stop) = (down_done.clone(), stop.clone());
        async move {
            let mut sent = 0u64;
            let Ok(mut up) = up_from_rx.await else { return (sink, sent) };
            let up_seed = seed(client, UP);
            let mut interval = tokio::time::interval(TICK);
            while up < TRANSFER && !stop.load(Ordering::Relaxed) {
                pace(&mut interval).await;
                let len = CHUNK.min((TRANSFER - up) as usize);
                if sink.send(Message::binary(fill(up_seed, up, len))).await.is_err() {
                    return (sink, sent);
                }
                up += len as u64;
                sent += len as u64;
            }
            if up == TRANSFER {
                down_done.notified().await;
                let _ = sink
                    .send(Message::Close(Some(CloseFrame { code: CloseCode::Normal, reason: "done".into() })))
                    .await;
            }
            (sink, sent)
        }
    });
    let down_seed = seed(client, DOWN);
    let mut header: Vec<u8> = Vec::new();
    let mut up_from_tx = Some(up_from_tx);
    while let Some(msg) = stream.next().await {
        match msg {
            Ok(Message::Binary(b)) => {
                conn.received += b.len() as u64;
                let mut data = &b[..];
                if header.len() < REPLY {
                    let take = (REPLY - header.len()).min(data.len());
                    header.extend_from_slice(&data[..take]);
                    data = &data[take..];
                    if header.len() == REPLY {
                        conn.replica = Some(header[8] as usize);
                        let up_from = u64::from_be_bytes(header[..8].try_into().unwrap());
                        let _ = up_from_tx.take().unwrap().send(up_from);
                    }
                }
                if let Some(at) = mismatch(down_seed, *down, data) {
                    problems.push(format!("client {client}: downstream byte {at} is wrong"));
                    break;
                }
                *down += data.len() as u64;
                if *down == TRANSFER {
                    down_done.notify_one();
                }
            }
            Ok(Message::Close(frame)) => {
                stop.store(true, Ordering::Relaxed);
                conn.close_code = frame.map(|f| u16::from(f.code));
            }
            Ok(other) if other.is_ping() || other.is_pong() => {}
            Ok(other) => problems.push(format!("client {client}: unexpected message {other:?}")),
            Err(e) => {
                problems.push(format!("client {client}: read: {e}"));
                break;
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    down_done.notify_one();
    drop(up_from_tx);
    let (_sink, sent) = sender.await.unwrap();
    conn.sent += sent;
    conn
}
