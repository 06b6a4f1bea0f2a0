//! The fleet test: three wsgate replicas behind HAProxy (deploy/haproxy/haproxy.cfg, TCP mode,
//! PROXY v2, `/readyz` checks), 300 sessions streaming checked data both ways, and every replica
//! restarted in turn under that load. It proves what docs/deploy.md promises of a rolling
//! restart: no byte lost, corrupted or reordered, every backend byte not delivered counted in
//! `wsgate_dropped_bytes_total{direction="to_client"}` and every client byte that crossed the 1001
//! in `{direction="to_backend"}`, every ended session told 1001, every client back on another replica, real
//! client addresses end to end.
//!
//! Needs HAProxy (scripts/test installs Debian's package). Run alone with
//! `cargo test --test fleet -- --nocapture`; with `FLEET_LOG_DIR=DIR` the replicas' JSON logs
//! are also appended to `DIR/wsgateN.log`.

mod haproxy;
mod replica;
mod traffic;

use std::collections::{HashMap, VecDeque};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::time::Instant;

use haproxy::{Haproxy, ReplicaPorts};
use replica::Replica;
use traffic::{Backends, TRANSFER};

const CLIENTS: usize = 300;
/// Clients come from 127.0.0.2 to 127.0.0.50.
const CLIENT_ADDRESSES: usize = 49;
/// HAProxy's check interval in the test (the example's `inter 1s`, shortened).
const INTER_MS: u64 = 200;
/// Its `timeout check` (the example's 1 s, shortened): longer than the interval, so a debug
/// build busy with 300 sessions is not taken for a dead one.
const CHECK_TIMEOUT_MS: u64 = 500;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_restart_behind_haproxy() {
    let started = Instant::now();
    raise_fd_limit();
    // The drain must outlast HAProxy's detection: inter * fall + timeout check < drain delay.
    const { assert!(INTER_MS * 2 + CHECK_TIMEOUT_MS < replica::DRAIN_DELAY_SECS * 1000) };
    let dir = tempfile::tempdir().unwrap();

    let backends = Backends::new(CLIENTS);
    let mut replicas = Vec::new();
    for i in 0..3 {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(traffic::backend(listener, i, backends.clone()));
        replicas.push(Replica::start(i, dir.path(), port).await);
    }

    // HAProxy's frontend port: chosen by binding port 0, then handed over (HAProxy cannot report
    // the port it chose). Nothing else on loopback takes it in the moment between.
    let frontend = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let ports: [ReplicaPorts; 3] =
        std::array::from_fn(|i| ReplicaPorts { listener: replicas[i].listener_port, admin: replicas[i].admin_port });
    let stats = dir.path().join("haproxy.sock");
    let cfg = dir.path().join("haproxy.cfg");
    std::fs::write(&cfg, haproxy::render(frontend.port(), &ports, &stats, INTER_MS, CHECK_TIMEOUT_MS)).unwrap();
    let lb = Haproxy::start(&cfg, &stats).await;
    for i in 0..3 {
        lb.wait_status(i, "UP", Duration::from_secs(10)).await;
    }

    let mut clients: Vec<_> = (0..CLIENTS as u32)
        .map(|c| {
            let ip = Ipv4Addr::new(127, 0, 0, 2 + (c as usize % CLIENT_ADDRESSES) as u8);
            tokio::spawn(traffic::client(c, ip, frontend, backends.clone()))
        })
        .collect();
    // Under load: every client has a connection through to its backend.
    let deadline = Instant::now() + Duration::from_secs(60);
    while backends.conns_started() < CLIENTS {
        if let Some(p) = backends.problems.lock().unwrap().first() {
            panic!("before the restarts: {p}");
        }
        if let Some(early) = clients.iter_mut().find(|c| c.is_finished()) {
            let r = early.await.unwrap();
            panic!("a client ended before the restarts: {:?} {:?}", r.handshake_failures.first(), r.problems.first());
        }
        assert!(Instant::now() < deadline, "only {} of {CLIENTS} sessions up after 60 s", backends.conns_started());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let load_at = started.elapsed();

    // The rolling restart.
    let mut ended_by_restart = Vec::new();
    let mut scraped_dropped = 0u64;
    for r in replicas.iter_mut() {
        let i = r.index;
        // A session of the test's own that keeps the process up until the last scrape is taken.
        let sentinel = traffic::sentinel(r.listener_port, &backends).await;
        let ended_before = r.totals.lock().unwrap().closed_1001;
        let signalled = Instant::now();
        r.sigterm();
        let down = lb.wait_status(i, "DOWN", Duration::from_secs(10)).await;
        let draining = r.draining(Duration::from_secs(10)).await;
        assert!(
            down < draining,
            "wsgate{}: HAProxy marked it DOWN {:?} after SIGTERM, after its listeners closed ({:?})",
            i + 1,
            down - signalled,
            draining - signalled
        );
        backends.sentinel_closed(Duration::from_secs(replica::CLOSE_WINDOW_SECS + 5)).await;
        scraped_dropped += last_scrape(r).await;
        backends.release_sentinel();
        r.exited(Duration::from_secs(replica::DEADLINE_SECS + 5)).await;
        assert_eq!(sentinel.await.unwrap(), Some(1001), "wsgate{}: the sentinel's close", i + 1);
        r.spawn().await;
        lb.wait_status(i, "UP", Duration::from_secs(10)).await;
        // Less the sentinel.
        let ended = r.totals.lock().unwrap().closed_1001 - ended_before - 1;
        eprintln!("fleet: wsgate{} restarted in {:?}, {ended} sessions closed with 1001", i + 1, signalled.elapsed());
        assert!(ended > 0, "wsgate{}: the restart ended no session (not under load)", i + 1);
        ended_by_restart.push(ended);
    }
    let restarts_at = started.elapsed();
    traffic::UNPACED.store(true, Ordering::Relaxed);

    let mut reports = Vec::new();
    for c in clients {
        reports
            .push(tokio::time::timeout(Duration::from_secs(120), c).await.expect("a client did not finish").unwrap());
    }
    // The gateways log a session's end once its backend has closed, a moment after its client
    // is done: wait for every line (the sentinels' three included).
    let sessions = reports.iter().map(|r| r.conns.len() as u64).sum::<u64>() + 3;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let logged: u64 = replicas.iter().map(|r| r.totals.lock().unwrap().sessions_ended).sum();
        if logged == sessions {
            break;
        }
        assert!(Instant::now() < deadline, "{logged} `session ended` lines for {sessions} sessions");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let wall = started.elapsed();
    check(&reports, &backends, &replicas, &ended_by_restart);
    let dropped: u64 = replicas.iter().map(|r| r.totals.lock().unwrap().dropped_bytes).sum();
    assert_eq!(scraped_dropped, dropped, "dropped bytes scraped at each restart vs logged in all");
    drop(lb);

    let conns: Vec<_> = reports.iter().flat_map(|r| &r.conns).collect();
    let reconnects = conns.len() - CLIENTS;
    let closed_1001 = conns.iter().filter(|c| c.close_code == Some(1001)).count();
    let bconns = backends.conns.lock().unwrap();
    let dropped: u64 = replicas.iter().map(|r| r.totals.lock().unwrap().dropped_bytes).sum();
    let down_sent: u64 = bconns.iter().map(|c| c.written).sum();
    let up_sent: u64 = conns.iter().map(|c| c.sent).sum();
    let up_lost: u64 = up_sent - bconns.iter().map(|c| c.read).sum::<u64>();
    let dropped_up: u64 = replicas.iter().map(|r| r.totals.lock().unwrap().dropped_client_bytes).sum();
    assert_eq!(
        up_lost, dropped_up,
        "bytes the clients sent and the backends never read vs the gateways' dropped client bytes"
    );
    println!(
        "fleet: {CLIENTS} clients, {} sessions ({reconnects} reconnects), {} bytes up and {} down per client \
         ({up_sent} up, {down_sent} down in all, headers included), 3 restarts ({closed_1001} sessions closed \
         with 1001: {ended_by_restart:?}), dropped bytes: backend→client {dropped} (= the gateways' \
         wsgate_dropped_bytes_total, scraped as each exited), client→backend {up_lost} (= dropped.client_bytes in the gateways' logs), \
         0 handshake failures; under load at {load_at:.1?}, restarts done at {restarts_at:.1?}, wall {wall:.1?}",
        conns.len(),
        TRANSFER,
        TRANSFER,
    );
}

/// Raises this process's soft file descriptor limit to its hard limit: the clients and backends
/// hold about 700 sockets at once, close to the common soft default of 1024, and the wsgate
/// replicas inherit the limit (HAProxy sets its own from its maxconn).
fn raise_fd_limit() {
    let mut l = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit and setrlimit only read and write the struct passed.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) == 0 && l.rlim_cur < l.rlim_max {
            l.rlim_cur = l.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &l);
        }
    }
}

/// The draining replica's `/metrics`, scraped once the sentinel is closed and every other
/// session has ended
/// (logged its `session ended` line, which comes after its dropped bytes were counted): its
/// `wsgate_dropped_bytes_total` then is final, and must equal the sum of the log lines'
/// `dropped.bytes`. Returns it.
async fn last_scrape(r: &Replica) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(replica::DEADLINE_SECS);
    let mut previous = None;
    loop {
        let s = replica::scrape(r.admin_port).await.unwrap_or_else(|e| {
            panic!("wsgate{}: /metrics: {e}; the scrape before: {previous:?}, {:?}", r.index + 1, r.this_run())
        });
        previous = Some(s);
        let (ended, _) = r.this_run();
        // Only the sentinel is open (wsgate_sessions_open counts a session until it has
        // drained its backend, and the sentinel's backend holds), every session is counted in
        // wsgate_sessions_total, and all but the sentinel have logged their end.
        if s.sessions_open == 1 && ended + 1 == s.sessions_total {
            let last =
                replica::scrape(r.admin_port).await.unwrap_or_else(|e| panic!("wsgate{}: /metrics: {e}", r.index + 1));
            let (_, logged) = r.this_run();
            assert_eq!(
                last.dropped_bytes,
                logged,
                "wsgate{}: wsgate_dropped_bytes_total vs the log lines",
                r.index + 1
            );
            return last.dropped_bytes;
        }
        assert!(Instant::now() < deadline, "wsgate{}: sessions still open: {s:?}, {ended} ended", r.index + 1);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Every assertion on the figures the clients, backends and gateways recorded.
fn check(reports: &[traffic::ClientReport], backends: &Backends, replicas: &[Replica], ended_by_restart: &[u64]) {
    let mut problems: Vec<String> = backends.problems.lock().unwrap().clone();
    for r in replicas {
        problems.extend(r.totals.lock().unwrap().problems.iter().cloned());
    }
    for r in reports {
        problems.extend(r.problems.iter().cloned());
        problems.extend(r.handshake_failures.iter().cloned());
    }
    assert!(
        problems.is_empty(),
        "{} problems, the first ones: {:#?}",
        problems.len(),
        &problems[..problems.len().min(20)]
    );

    let bconns = backends.conns.lock().unwrap();
    // A source can come back: a client's next connection may get the port its last one had (the
    // kernel reuses it at once when the other side closed first). So each source keeps its
    // connections in the order they came, and each of the client's takes the next one.
    let mut by_source: HashMap<(u32, SocketAddr), VecDeque<&traffic::BackendConn>> = HashMap::new();
    for b in bconns.iter() {
        by_source.entry((b.client, SocketAddr::V4(b.proxied_source))).or_default().push_back(b);
    }
    let mut undelivered_down = 0u64;
    for (c, r) in reports.iter().enumerate() {
        assert!(r.completed, "client {c} did not complete its transfer: {r:?}");
        assert_eq!(r.down_received, TRANSFER);
        for (n, conn) in r.conns.iter().enumerate() {
            // The backend saw the client's own address and port, through HAProxy and wsgate.
            let b = by_source
                .get_mut(&(c as u32, conn.local))
                .and_then(|from| from.pop_front())
                .unwrap_or_else(|| panic!("client {c}: no backend connection from {} (PROXY v2 source)", conn.local));
            assert_eq!(conn.replica, Some(b.replica));
            assert!(b.written >= conn.received, "client {c}: received more than the backend wrote");
            assert!(conn.sent >= b.read, "client {c}: the backend read more than the client sent");
            undelivered_down += b.written - conn.received;
            let last = n + 1 == r.conns.len();
            if !last {
                // Only a restart ends a connection early, and it says so with 1001...
                assert_eq!(conn.close_code, Some(1001), "client {c}: connection {n} ended early without 1001");
                // ...and the client comes back on another replica.
                assert_ne!(
                    r.conns[n + 1].replica,
                    conn.replica,
                    "client {c}: reconnected to the replica that closed it"
                );
            } else {
                assert!(matches!(conn.close_code, Some(1000 | 1001)), "client {c}: last close {:?}", conn.close_code);
            }
        }
    }
    assert_eq!(bconns.len(), reports.iter().map(|r| r.conns.len()).sum::<usize>(), "backend connections");
    let unmatched: Vec<_> = by_source.values().flatten().collect();
    assert!(unmatched.is_empty(), "backend connections no client made: {unmatched:?}");
    let dropped: u64 = replicas.iter().map(|r| r.totals.lock().unwrap().dropped_bytes).sum();
    assert_eq!(
        undelivered_down, dropped,
        "bytes the backends wrote and the clients never received vs the gateways' dropped bytes"
    );
    // What the gateways say they delivered is what arrived, both ways.
    let logged_to_backend: u64 = replicas.iter().map(|r| r.totals.lock().unwrap().to_backend).sum();
    let logged_to_client: u64 = replicas.iter().map(|r| r.totals.lock().unwrap().to_client).sum();
    assert_eq!(
        logged_to_backend,
        bconns.iter().map(|b| b.read).sum::<u64>() + backends.sentinel_read.load(Ordering::Relaxed),
        "to_backend.bytes vs the backends' reads"
    );
    let received: u64 = reports.iter().flat_map(|r| &r.conns).map(|c| c.received).sum();
    assert_eq!(logged_to_client, received, "to_client.bytes vs the clients' reads");
    let closed_1001: u64 = reports.iter().flat_map(|r| &r.conns).filter(|c| c.close_code == Some(1001)).count() as u64;
    assert_eq!(closed_1001, ended_by_restart.iter().sum::<u64>(), "1001s the clients saw vs the gateways logged");
}
