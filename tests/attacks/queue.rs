//! The handshake queue under attack: connections that wait for a place in the handshake pool,
//! for their client's share of it, or for a route's connect place. Each test asserts what a
//! real client still gets, and what the waiting costs (places, sockets, memory, CPU).

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use futures_util::SinkExt;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio::task::JoinSet;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

use crate::support::*;
use crate::{ONE_ATTACK_AT_A_TIME, black_hole, sources};

/// Sockets that connect and send nothing, holding a place or waiting for one until the gateway
/// closes them; with `reconnect`, each opens a new one as soon as its last is closed.
struct Silent {
    stop: CancellationToken,
    tasks: JoinSet<()>,
}

impl Silent {
    fn start(target: SocketAddr, sources: &[IpAddr], per_source: usize, reconnect: bool) -> Silent {
        let stop = CancellationToken::new();
        let mut tasks = JoinSet::new();
        for &src in sources {
            for _ in 0..per_source {
                let stop = stop.clone();
                tasks.spawn(async move {
                    loop {
                        if let Ok(mut s) = connect_from(src, target).await {
                            let mut buf = [0u8; 512];
                            tokio::select! {
                                _ = stop.cancelled() => return,
                                // Closed, reset or answered: this connection is done.
                                _ = s.read(&mut buf) => {}
                            }
                        }
                        if !reconnect || stop.is_cancelled() {
                            break;
                        }
                    }
                    stop.cancelled().await;
                });
            }
        }
        Silent { stop, tasks }
    }

    async fn stop(mut self) {
        self.stop.cancel();
        within("attack stops", async { while self.tasks.join_next().await.is_some() {} }).await;
    }
}

/// One session from `src` on ws: opens, echoes 4 KiB byte for byte, closes, within `limit`.
async fn one_session(gw: &Gateway, src: IpAddr, limit: Duration) -> Result<(), String> {
    let one = async {
        let mut ws = gw.session_from(src, "/echo", false).await?;
        let data = payload(
            4096,
            u64::from(u32::from(match src {
                IpAddr::V4(v4) => v4,
                IpAddr::V6(_) => unreachable!("loopback v4"),
            })),
        );
        ws.send(Message::Binary(data.clone().into())).await.map_err(|e| e.to_string())?;
        if read_bytes(&mut ws, data.len()).await != data {
            return Err("echo differs".to_string());
        }
        ws.close(None).await.map_err(|e| e.to_string())
    };
    match tokio::time::timeout(limit, one).await {
        Ok(done) => done,
        Err(_) => Err(format!("no echo within {limit:?}")),
    }
}

/// 2,000 addresses with one silent socket each, reconnecting as soon as they are cut, against
/// the shipped defaults: every attack address has exactly as many unfinished handshakes (one) as
/// a real client, so "fewest unfinished first" does not tell them apart. The pool (256 places,
/// each shed after 2 s) turns over at most 128 places a second, fewer than the ~1,700 waiting
/// sockets older than a newcomer could use within its 10 s deadline; among equals the newest
/// waiter is served first, so ten real clients, each on an address of its own, are all served.
///
/// (At df24166, oldest first among equals, the real clients waited behind the attack's waiters
/// and were closed at their handshake deadline.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_socket_per_address_does_not_starve_real_clients() {
    let _one = ONE_ATTACK_AT_A_TIME.lock().await;
    let gw = Gateway::builder().route("echo", "/echo", "builtin:echo").shipped_client_limits().start().await;
    let attack = Silent::start(gw.plain, &sources(10, 2000), 1, true);
    eventually("the pool is full and the rest wait", || async {
        scrape(&gw, "wsgate_handshakes_in_progress", &[]).await == 256.0
            && scrape(&gw, "wsgate_handshakes_waiting", &[]).await >= 1500.0
    })
    .await;
    let gw = std::sync::Arc::new(gw);
    let mut real = JoinSet::new();
    for i in 0..10u8 {
        let gw = gw.clone();
        real.spawn(async move { one_session(&gw, [127, 0, 1, i + 1].into(), Duration::from_secs(15)).await });
    }
    let mut failures = Vec::new();
    while let Some(done) = real.join_next().await {
        if let Err(e) = done.unwrap() {
            failures.push(e);
        }
    }
    let waiting = scrape(&gw, "wsgate_handshakes_waiting", &[]).await;
    let timed_out = scrape(&gw, "wsgate_connections_refused_total", &[("reason", "handshake_wait_timeout")]).await;
    attack.stop().await;
    assert!(
        failures.is_empty(),
        "{} of 10 real clients not served ({waiting} waiting, {timed_out} closed at the deadline so far): {failures:?}",
        failures.len()
    );
}

/// One address holds its share (32) of a pool of 33 with silent sockets and has 224 more
/// waiting (its `per_client.max_connections` is 256), which may not take a place; a second
/// address takes the last place, and a third waits for one, which it may take, but no place has
/// been held long enough to shed (`handshake_shed_after_secs` is an hour). The pool's clock
/// wakes for the third and must then sleep until a place comes due, not spin: over a one-second
/// window the whole test process (gateway and clients) uses under 100 ms of CPU. When the
/// silent sockets reach their request-head deadline (5 s), the waiting third address and a real
/// client on a fourth are served before the first address's waiters.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiters_that_cannot_be_served_yet_cost_no_cpu() {
    let _one = ONE_ATTACK_AT_A_TIME.lock().await;
    let gw = Gateway::builder()
        .route("echo", "/echo", "builtin:echo")
        .shipped_client_limits()
        .limit("max_handshakes", "33")
        .limit("handshake_shed_after_secs", "3600")
        .start()
        .await;
    let attack = Silent::start(gw.plain, &[[127, 0, 2, 1].into()], 256, false);
    eventually("the share held, the rest waiting", || async {
        scrape(&gw, "wsgate_handshakes_in_progress", &[]).await == 32.0
            && scrape(&gw, "wsgate_handshakes_waiting", &[]).await == 224.0
    })
    .await;
    let last = Silent::start(gw.plain, &[[127, 0, 2, 2].into()], 1, false);
    eventually("the pool is full", || async { scrape(&gw, "wsgate_handshakes_in_progress", &[]).await == 33.0 }).await;
    let third = Silent::start(gw.plain, &[[127, 0, 2, 3].into()], 1, false);
    eventually("the third address waits", || async { scrape(&gw, "wsgate_handshakes_waiting", &[]).await == 225.0 })
        .await;
    let before = process_cpu();
    // A measurement window, not a wait for the gateway: CPU is counted over it.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let used = process_cpu() - before;
    eprintln!("225 waiters, none of which can be served yet: {used:?} of CPU in 1 s");
    assert!(used < Duration::from_millis(100), "{used:?} of CPU in 1 s with 225 waiters none of which can be served");
    assert_eq!(one_session(&gw, [127, 0, 2, 4].into(), Duration::from_secs(10)).await, Ok(()));
    assert_eq!(scrape(&gw, "wsgate_connections_refused_total", &[("reason", "handshake_shed")]).await, 0.0);
    for s in [attack, last, third] {
        s.stop().await;
    }
}

/// CPU time (user and system) of this process so far, from /proc/self/stat.
fn process_cpu() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    // Fields after the command name (which may hold spaces) start at the state, field 3.
    let rest = stat.rsplit_once(')').unwrap().1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    // USER_HZ is 100 on every Linux this runs on.
    Duration::from_millis(ticks * 10)
}

/// Churn: rounds of 400 connections from 100 addresses (4 each) at a pool of 4 whose places
/// are shed after 1 s and whose connections' deadline is 1 s too, so places are shed, handed to
/// waiters and given up by waiters at their deadline all at once; in each round half the
/// sockets are closed by the client while they wait. After each round every socket is closed,
/// and the pool must be empty: `wsgate_handshakes_in_progress`, `wsgate_handshakes_waiting` and
/// `wsgate_connections_open` back to 0, and a real client served at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn churn_leaves_no_place_and_no_waiter_behind() {
    let _one = ONE_ATTACK_AT_A_TIME.lock().await;
    let gw = Gateway::builder()
        .route("echo", "/echo", "builtin:echo")
        .limit("max_handshakes", "4")
        .limit("handshake_shed_after_secs", "1")
        .limit("handshake_timeout_secs", "1")
        .limit("request_head_timeout_secs", "1")
        .start()
        .await;
    for round in 0..3u8 {
        let mut sockets = Vec::new();
        for src in sources(20 + round, 100) {
            for _ in 0..4 {
                sockets.push(connect_from(src, gw.plain).await.unwrap());
            }
        }
        eventually("the pool is full and the rest wait", || async {
            scrape(&gw, "wsgate_handshakes_in_progress", &[]).await == 4.0
                && scrape(&gw, "wsgate_handshakes_waiting", &[]).await > 0.0
        })
        .await;
        // Half leave while they wait; the gateway sees it only when it reads them.
        let mut kept: Vec<TcpStream> = Vec::new();
        for (i, s) in sockets.into_iter().enumerate() {
            if i % 2 == 0 {
                kept.push(s);
            }
        }
        within("the gateway closes every socket", async {
            for mut s in kept {
                let mut buf = [0u8; 64];
                while matches!(s.read(&mut buf).await, Ok(n) if n > 0) {}
            }
        })
        .await;
        for (name, want) in [
            ("wsgate_handshakes_in_progress", 0.0),
            ("wsgate_handshakes_waiting", 0.0),
            ("wsgate_connections_open", 0.0),
        ] {
            eventually(&format!("round {round}: {name} back to {want}"), || async {
                scrape(&gw, name, &[]).await == want
            })
            .await;
        }
        assert_eq!(one_session(&gw, [127, 0, 3, 1].into(), Duration::from_secs(2)).await, Ok(()), "round {round}");
    }
    let shed = scrape(&gw, "wsgate_connections_refused_total", &[("reason", "handshake_shed")]).await;
    let timed_out = scrape(&gw, "wsgate_connections_refused_total", &[("reason", "handshake_wait_timeout")]).await;
    eprintln!("churn: {shed} shed, {timed_out} closed waiting at their deadline over 1,200 connections");
    assert!(timed_out > 0.0, "the rounds had waiters give up at their deadline");
}

/// TCP sockets of this machine connecting (SYN_SENT) to `remote`, from /proc/net/tcp.
fn connecting_to(remote: SocketAddr) -> usize {
    let SocketAddr::V4(v4) = remote else { unreachable!("the test uses IPv4") };
    let hex = format!("{:08X}:{:04X}", u32::from_le_bytes(v4.ip().octets()), v4.port());
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
    table
        .lines()
        .skip(1)
        .filter(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.get(2) == Some(&hex.as_str()) && f.get(3) == Some(&"02")
        })
        .count()
}

/// 600 requests (60 addresses, 10 each, within every per-client cap) for a route whose backend
/// never answers, `max_pending_connects = 4`, `connect_timeout_secs = 2`: at most 4 backend
/// sockets exist at any moment, the waiting requests hold no place in the handshake pool, each
/// request is answered (503 shed after its wait, or 504 for a dial that timed out) within the
/// wait plus the dial, and every socket is closed afterwards; a healthy route serves meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dial_waits_for_a_dead_backend_are_bounded() {
    let _one = ONE_ATTACK_AT_A_TIME.lock().await;
    let (_hole, dead) = black_hole();
    let _queued: Vec<_> = futures_util::future::join_all((0..2).map(|_| TcpStream::connect(dead))).await;
    let gw = Gateway::builder()
        .route_with(
            "dead",
            "/dead",
            &dead.to_string(),
            "on_backend_unavailable = \"http\"\nlimits = { max_pending_connects = 4, connect_timeout_secs = 2 }",
        )
        .route("echo", "/echo", "builtin:echo")
        .shipped_client_limits()
        .start()
        .await;
    let request = upgrade_request("/dead", "");
    let mut clients = JoinSet::new();
    for src in sources(40, 60) {
        for _ in 0..10 {
            let (addr, request) = (gw.plain, request.clone());
            clients.spawn(async move {
                let s = connect_from(src, addr).await.unwrap();
                let start = tokio::time::Instant::now();
                let (status, _, _) = raw_http_on(s, &request).await;
                (status, start.elapsed())
            });
        }
    }
    eventually("600 requests open, none in the handshake pool", || async {
        scrape(&gw, "wsgate_connections_open", &[]).await == 600.0
            && scrape(&gw, "wsgate_handshakes_in_progress", &[]).await == 0.0
    })
    .await;
    let dialling = connecting_to(dead);
    assert!(dialling <= 4, "{dialling} backend sockets connecting, over max_pending_connects");
    assert_eq!(one_session(&gw, [127, 0, 4, 1].into(), Duration::from_secs(2)).await, Ok(()));
    let mut statuses = std::collections::BTreeMap::new();
    let mut slowest = Duration::ZERO;
    within("every request answered", async {
        while let Some(done) = clients.join_next().await {
            let (status, took) = done.unwrap();
            *statuses.entry(status).or_insert(0) += 1;
            slowest = slowest.max(took);
        }
    })
    .await;
    eprintln!("dead route: {statuses:?}, slowest answer {slowest:?}");
    assert!(statuses.keys().all(|s| [503, 504].contains(s)), "{statuses:?}");
    assert!(slowest < Duration::from_millis(4500), "a request waited {slowest:?}, over the wait plus the dial");
    eventually("every socket closed", || async { scrape(&gw, "wsgate_connections_open", &[]).await == 0.0 }).await;
}

/// What one waiting connection costs: a `wsgate` process of its own (so its resident set is
/// its own), a pool of one place held by a silent socket and never shed, and `max_connections`
/// 5,000. 500 silent sockets wait, then 4,499 more (the limit, the holder included); the
/// resident set's growth over those 4,499 is the cost of a waiting connection, under 16 KiB
/// each. 200 more sockets are refused at accept: the waiting is bounded by `max_connections`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_connections_cost_little_and_stop_at_max_connections() {
    let _one = ONE_ATTACK_AT_A_TIME.lock().await;
    let gw = WaitingGateway::start().await;
    let holder = connect_from([127, 0, 5, 1].into(), gw.plain).await.unwrap();
    eventually("the place is held", || async { gw.metric("wsgate_handshakes_in_progress", &[]).await == 1.0 }).await;
    let addrs = sources(50, 20);
    let mut sockets = Vec::new();
    sockets.extend(open_from(&addrs, gw.plain, 500).await);
    eventually("500 wait", || async { gw.metric("wsgate_handshakes_waiting", &[]).await == 500.0 }).await;
    let before = gw.resident();
    sockets.extend(open_from(&addrs, gw.plain, 4499).await);
    eventually("4,999 wait", || async { gw.metric("wsgate_handshakes_waiting", &[]).await == 4999.0 }).await;
    let after = gw.resident();
    let per_socket = after.saturating_sub(before) as f64 / 4499.0;
    eprintln!(
        "waiting connections: resident {:.1} -> {:.1} MiB, {:.0} bytes per waiting connection over 4,499",
        before as f64 / 1048576.0,
        after as f64 / 1048576.0,
        per_socket
    );
    let over = open_from(&addrs, gw.plain, 200).await;
    let refused = [("reason", "connection_limit")];
    eventually("200 refused at accept", || async {
        gw.metric("wsgate_connections_refused_total", &refused).await == 200.0
    })
    .await;
    assert_eq!(gw.metric("wsgate_handshakes_waiting", &[]).await, 4999.0, "no more wait than max_connections allows");
    assert!(per_socket < 16384.0, "{per_socket:.0} bytes per waiting connection");
    drop((over, sockets, holder));
}

/// `n` connections to `target`, from `addrs` in turn.
async fn open_from(addrs: &[IpAddr], target: SocketAddr, n: usize) -> Vec<TcpStream> {
    let mut sockets = Vec::with_capacity(n);
    for i in 0..n {
        sockets.push(connect_from(addrs[i % addrs.len()], target).await.unwrap());
    }
    sockets
}

/// A `wsgate` process whose handshake pool has one place, never shed, whose deadlines are long
/// and whose per-client limits are off, with `max_connections` 5,000.
struct WaitingGateway {
    child: tokio::process::Child,
    plain: SocketAddr,
    admin: SocketAddr,
    _dir: tempfile::TempDir,
}

impl WaitingGateway {
    async fn start() -> WaitingGateway {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("wsgate.toml");
        std::fs::write(
            &config,
            "[listeners.plain]\naddress = \"127.0.0.1:0\"\n[routes.echo]\npath = \"/echo\"\nbackend = \"builtin:echo\"\n\
             [admin]\naddress = \"127.0.0.1:0\"\n\
             [limits]\nmax_connections = 5000\nmax_handshakes = 1\nhandshake_shed_after_secs = 3600\n\
             handshake_timeout_secs = 120\nrequest_head_timeout_secs = 120\n\
             [limits.per_client]\nmax_connections = 0\nmax_handshakes = 0\nnew_connections_per_sec = 0\n",
        )
        .unwrap();
        let (child, mut lines) = run_binary(&config, "info");
        let (mut plain, mut admin) = (None, None);
        while plain.is_none() || admin.is_none() {
            let line = within("'listening' log lines", lines.next_line()).await.unwrap().expect("wsgate exited early");
            let addr = |prefix: &str| -> Option<SocketAddr> {
                line.split(prefix).nth(1)?.split(|c: char| c == '/' || c.is_whitespace()).next()?.parse().ok()
            };
            plain = plain.or_else(|| addr("url=ws://"));
            admin = admin.or_else(|| addr("url=http://"));
        }
        // Its log is read to the end, so it never waits on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        WaitingGateway { child, plain: plain.unwrap(), admin: admin.unwrap(), _dir: dir }
    }

    async fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let (status, _, body) =
            raw_http(self.admin, "GET /metrics HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n").await;
        assert_eq!(status, 200, "{body}");
        metric(&body, name, labels).unwrap_or(0.0)
    }

    /// Resident set size in bytes.
    fn resident(&self) -> u64 {
        crate::resident_bytes(self.child.id().expect("running"))
    }
}

/// Every connection that waits for a place and is closed at its handshake deadline without an
/// answer is counted in `wsgate_connections_refused_total`: `handshake_wait_timeout` while it
/// waited, `request_timeout` when its place came too late to read its request. A pool of one place is held by a silent socket;
/// 100 clients (each on an address of its own, each with its whole request sent) wait behind
/// it, all with the same 1 s deadline as the holder. At the deadline the holder's place frees
/// at the moment their waits run out: each one that gets no answer must be counted.
///
/// (At df24166 a waiter handed the place as its deadline passed got it, and was closed
/// uncounted with no time left, handing the place to the next, whose deadline had passed too.)
#[tokio::test]
async fn waiters_closed_at_their_deadline_are_all_counted() {
    let gw = Gateway::builder()
        .route("echo", "/echo", "builtin:echo")
        .limit("max_handshakes", "1")
        .limit("handshake_shed_after_secs", "3600")
        .limit("handshake_timeout_secs", "1")
        .limit("request_head_timeout_secs", "1")
        .start()
        .await;
    let holder = connect_from([127, 0, 6, 1].into(), gw.plain).await.unwrap();
    eventually("the place is held", || async { scrape(&gw, "wsgate_handshakes_in_progress", &[]).await == 1.0 }).await;
    let mut waiters = JoinSet::new();
    let request = upgrade_request("/echo", "");
    for i in 0..100u8 {
        let s = connect_from([127, 0, 7, i + 1].into(), gw.plain).await.unwrap();
        let request = request.clone();
        waiters.spawn(async move {
            let mut s = s;
            tokio::io::AsyncWriteExt::write_all(&mut s, request.as_bytes()).await.unwrap();
            // The answer's head, or the end of the stream (a 101 leaves the session open).
            let mut answer = Vec::new();
            let mut buf = [0u8; 1024];
            while !answer.windows(4).any(|w| w == b"\r\n\r\n") {
                match s.read(&mut buf).await {
                    Ok(n) if n > 0 => answer.extend_from_slice(&buf[..n]),
                    _ => break,
                }
            }
            answer.starts_with(b"HTTP/1.1 101")
        });
    }
    let (mut served, mut unanswered) = (0, 0);
    within("every waiter ends", async {
        while let Some(done) = waiters.join_next().await {
            if done.unwrap() { served += 1 } else { unanswered += 1 }
        }
    })
    .await;
    drop(holder);
    // Closed while waiting, or given a place too close to the deadline to read the request; and
    // the holder, closed at its own request deadline.
    let counted = || async {
        let waited = scrape(&gw, "wsgate_connections_refused_total", &[("reason", "handshake_wait_timeout")]).await;
        let late = scrape(&gw, "wsgate_connections_refused_total", &[("reason", "request_timeout")]).await;
        (waited, late)
    };
    eventually("the holder's close is counted", || async { counted().await.1 >= 1.0 }).await;
    let (waited, late) = counted().await;
    eprintln!("deadline: {served} served, {unanswered} closed without an answer, {waited} + {late} counted");
    assert_eq!(waited + late, f64::from(unanswered) + 1.0, "{unanswered} closed unanswered (and the holder)");
}
