//! Memory per session under hostile clients, measured on a gateway in a process of its own (the
//! `wsgate` binary), so what its resident set gains is its sessions' alone.

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use crate::support::*;

/// Attack sessions per measurement.
const SESSIONS: usize = 20;

/// The client's receive buffer: small, so the pongs it never reads back up into the gateway at
/// once, as they would after the kernel's buffers filled.
const CLIENT_RECEIVE_BUFFER: u32 = 4096;

const MIB: f64 = 1024.0 * 1024.0;

/// With the default limits, a TCP-route session stays within `max_message_bytes` + 1 MiB under a
/// ping flood whose pongs are never read, while holding an unfinished message of
/// `max_message_bytes` sent as one fragment (which tungstenite alone would hold twice), and doing
/// both; a ping flood alone costs next to nothing. Measured from the resident set of a gateway
/// process of its own, over 20 such sessions each. Each attack is shown to have landed: the
/// gateway has read every byte (its socket's receive queue is empty, and the client's send
/// queue), and a flooding client's pongs are stuck (the gateway's send queue is not empty).
/// Afterwards, one flood's pongs are read (the last answers the last ping) and one unfinished
/// message is finished and reaches the backend whole.
#[tokio::test]
async fn hostile_sessions_stay_within_the_documented_memory() {
    let _one = crate::ONE_ATTACK_AT_A_TIME.lock().await;
    let defaults = "[listeners.a]\naddress = \"127.0.0.1:0\"\n[routes.r]\npath = \"/\"\nbackend = \"127.0.0.1:1\"\n";
    let max = wsgate::config::parse(defaults, std::path::Path::new("defaults.toml"))
        .unwrap()
        .limits
        .session
        .max_message_bytes;
    let budget = max as f64 + MIB;
    let fragment = unfinished_message(max);
    let pings = ping_flood();

    let mut flood = measure("ping flood", &[&pings], true).await;
    assert!(flood.per_session <= 512.0 * 1024.0, "a ping flood costs {:.2} MiB per session", flood.per_session / MIB);
    // Every ping was answered, or its pong replaced by a newer one: the last pong is the last
    // ping's. The gateway's own keepalive pings may come between them (server frames are not
    // masked, and control frames have a one-byte length).
    let last = ping_payload(u32::MAX);
    let (mut bytes, mut last_pong, mut pongs) = (Vec::new(), Vec::new(), 0);
    while last_pong != last {
        let mut buf = [0u8; 65536];
        let n = within("reading the pongs", flood.client.read(&mut buf)).await.unwrap();
        assert!(n > 0, "the session ended before the last pong");
        bytes.extend_from_slice(&buf[..n]);
        while bytes.len() >= 2 && bytes.len() >= 2 + usize::from(bytes[1]) {
            let (opcode, len) = (bytes[0], usize::from(bytes[1]));
            assert!(len <= 125, "a control frame of {len} bytes");
            match opcode {
                0x8a => {
                    assert_eq!(len, 125, "only pongs of 125 bytes");
                    last_pong = bytes[2..2 + len].to_vec();
                    pongs += 1;
                }
                0x89 => {} // the gateway's keepalive ping
                other => panic!("unexpected frame {other:#x} among the pongs"),
            }
            bytes.drain(..2 + len);
        }
    }
    assert!(pongs > 0);
    drop(flood);

    let both = [&fragment[..], &pings[..]];
    for (what, attack) in [("unfinished message", &both[..1]), ("unfinished message and ping flood", &both[..])] {
        let mut held = measure(what, attack, attack.len() == 2).await;
        let per_session = held.per_session;
        assert!(
            per_session <= budget,
            "{what}: {:.2} MiB per session, over {:.2} MiB",
            per_session / MIB,
            budget / MIB
        );
        // The message is finished, and reaches the backend whole.
        held.client.write_all(&masked_frame(0x80, b"")).await.unwrap();
        held.client.shutdown().await.unwrap();
        let whole = loop {
            let got = within("the backend's bytes", held.received.recv()).await.unwrap();
            if !got.is_empty() {
                break got;
            }
        };
        assert!(whole == message_bytes(max), "{what}: the message arrives byte for byte ({} bytes)", whole.len());
    }
}

/// What [`measure`] leaves: one attack session still open, and the gateway and its backend.
struct Measured {
    per_session: f64,
    client: TcpStream,
    received: tokio::sync::mpsc::UnboundedReceiver<Vec<u8>>,
    _gateway: GatewayProcess,
    _backend: Backend,
}

/// Starts a gateway process, opens [`SESSIONS`] sessions that each send `attack` (its parts in
/// turn) and never read, waits until the gateway has read all of it, and returns the growth of
/// its resident set per session, with one of the sessions (the others are closed). `flooding`:
/// the attack pings, so every gateway socket must have pongs it cannot send.
async fn measure(what: &str, attack: &[&[u8]], flooding: bool) -> Measured {
    let (backend, mut received) = Backend::sink().await;
    let gateway = GatewayProcess::start(&backend.target()).await;
    // One ordinary session first, so what every session shares (runtime, allocator arenas) is
    // in the baseline.
    let mut warm = open(gateway.plain, None).await;
    warm.write_all(&masked_frame(0x82, b"warm")).await.unwrap();
    drop(warm);
    assert_eq!(within("backend", received.recv()).await.unwrap(), b"warm");
    let before = gateway.resident();
    let mut clients = Vec::new();
    for _ in 0..SESSIONS {
        clients.push(open(gateway.plain, Some(CLIENT_RECEIVE_BUFFER)).await);
    }
    let writes = clients.iter_mut().map(|c| async move {
        for part in attack {
            within("writing the attack", c.write_all(part)).await.unwrap();
        }
    });
    futures_util::future::join_all(writes).await;
    let pairs: Vec<(SocketAddr, SocketAddr)> =
        clients.iter().map(|c| (c.local_addr().unwrap(), c.peer_addr().unwrap())).collect();
    eventually(&format!("{what}: the gateway has read every byte"), || async {
        pairs.iter().all(|&(client, gateway)| {
            queues(gateway, client).is_some_and(|(_, unread)| unread == 0)
                && queues(client, gateway).is_some_and(|(unsent, _)| unsent == 0)
        })
    })
    .await;
    if flooding {
        let stuck = pairs.iter().filter(|&&(client, gateway)| queues(gateway, client).is_some_and(|q| q.0 > 0)).count();
        assert_eq!(stuck, SESSIONS, "{what}: every gateway socket has pongs it cannot send");
    }
    let after = gateway.resident();
    let per_session = after.saturating_sub(before) as f64 / SESSIONS as f64;
    eprintln!(
        "{what}: resident {:.1} -> {:.1} MiB, {:.3} MiB per session over {SESSIONS}",
        before as f64 / MIB,
        after as f64 / MIB,
        per_session / MIB
    );
    let client = clients.pop().unwrap();
    Measured { per_session, client, received, _gateway: gateway, _backend: backend }
}

/// A `wsgate` process serving one TCP route (`/tcp`) with the default limits.
struct GatewayProcess {
    child: tokio::process::Child,
    plain: SocketAddr,
    _dir: tempfile::TempDir,
}

impl GatewayProcess {
    async fn start(backend: &str) -> GatewayProcess {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("wsgate.toml");
        std::fs::write(
            &config,
            format!(
                // The admin listener's default port would collide with other tests' gateways;
                // pings every second put the gateway's own keepalive among the stuck pongs.
                "[listeners.plain]\naddress = \"127.0.0.1:0\"\n[routes.tcp]\npath = \"/tcp\"\nbackend = \"{backend}\"\n\
                 [admin]\nenabled = false\n[limits]\nping_interval_secs = 1\n"
            ),
        )
        .unwrap();
        let (child, mut lines) = run_binary(&config, "info");
        let plain = loop {
            let line = within("'listening' log line", lines.next_line()).await.unwrap().expect("wsgate exited early");
            if let Some(url) = line.split("url=ws://").nth(1) {
                break url.split_whitespace().next().unwrap().parse().unwrap();
            }
        };
        // Its log is read to the end, so it never waits on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        GatewayProcess { child, plain, _dir: dir }
    }

    /// Resident set size in bytes.
    fn resident(&self) -> u64 {
        crate::resident_bytes(self.child.id().expect("running"))
    }
}

/// A raw WebSocket session on `/tcp`: the upgrade answered with 101, and nothing read after it.
async fn open(gateway: SocketAddr, receive_buffer: Option<u32>) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    if let Some(size) = receive_buffer {
        socket.set_recv_buffer_size(size).unwrap();
    }
    raw_upgrade(within("connect", socket.connect(gateway)).await.unwrap(), "/tcp").await
}

/// The bytes of the unfinished message (varied, so no page of it is shared or left untouched).
fn message_bytes(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8).collect()
}

/// A binary message's first fragment, as long as the message may be, with no fragment after it.
fn unfinished_message(max: usize) -> Vec<u8> {
    masked_frame(0x02, &message_bytes(max))
}

/// The payload of ping number `n`: 125 bytes ending in `n`.
fn ping_payload(n: u32) -> Vec<u8> {
    let mut p = vec![b'p'; 121];
    p.extend_from_slice(&n.to_be_bytes());
    p
}

/// The pings each flooding client sends, never reading a pong, the last one's payload marked as
/// the last: 4 MiB more than the most a socket's send buffer may grow to (`tcp_wmem`), so that
/// however the kernel sizes it, the gateway has megabytes of pongs it cannot hand to the socket.
fn ping_flood() -> Vec<u8> {
    let wmem = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_wmem").unwrap();
    let most: usize = wmem.split_whitespace().nth(2).and_then(|v| v.parse().ok()).expect("tcp_wmem: min default max");
    let one = masked_frame(0x89, &ping_payload(0)).len();
    let count = (most + (4 << 20)) / one;
    (0..count as u32)
        .flat_map(|n| masked_frame(0x89, &ping_payload(if n + 1 == count as u32 { u32::MAX } else { n })))
        .collect()
}

/// (send queue, receive queue) in bytes of the IPv4 TCP socket from `local` to `remote`, as
/// /proc/net/tcp shows it; `None` if there is none.
fn queues(local: SocketAddr, remote: SocketAddr) -> Option<(u64, u64)> {
    let hex = |a: SocketAddr| match a {
        SocketAddr::V4(v4) => format!("{:08X}:{:04X}", u32::from_le_bytes(v4.ip().octets()), v4.port()),
        SocketAddr::V6(_) => unreachable!("the test uses IPv4"),
    };
    let (local, remote) = (hex(local), hex(remote));
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
    table.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.get(1) != Some(&local.as_str()) || f.get(2) != Some(&remote.as_str()) {
            return None;
        }
        let (tx, rx) = f.get(4)?.split_once(':')?;
        Some((u64::from_str_radix(tx, 16).ok()?, u64::from_str_radix(rx, 16).ok()?))
    })
}
