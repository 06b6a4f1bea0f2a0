//! Pools: a route with several backends. Each policy shares sessions as documented, a dead
//! backend is failed over within the connect timeout and marked down, comes back after `rise`
//! passed checks, a drained one takes no new sessions while its live ones carry on, and a
//! member at its session cap takes no more.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::support::*;

/// A TCP backend that greets each connection with its one-byte name and then echoes, so a
/// test knows which member a session reached. `kill` closes its listener and every connection
/// (what the kernel does for a process that dies); `restart` listens on the same port again.
struct Named {
    name: u8,
    addr: SocketAddr,
    tasks: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl Named {
    async fn start(name: u8) -> Named {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let named = Named { name, addr: listener.local_addr().unwrap(), tasks: Arc::default() };
        named.serve(listener);
        named
    }

    fn serve(&self, listener: TcpListener) {
        let (name, tasks) = (self.name, self.tasks.clone());
        let accept = tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let conn = tokio::spawn(async move {
                    if s.write_all(&[name]).await.is_err() {
                        return;
                    }
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
                tasks.lock().unwrap().push(conn);
            }
        });
        self.tasks.lock().unwrap().push(accept);
    }

    /// Returns once the listener and every connection are closed.
    async fn kill(&self) {
        let tasks: Vec<_> = self.tasks.lock().unwrap().drain(..).collect();
        for t in tasks {
            t.abort();
            let _ = t.await;
        }
    }

    async fn restart(&self) {
        self.serve(TcpListener::bind(self.addr).await.expect("listen on the killed backend's port again"));
    }

    fn label(&self) -> String {
        char::from(self.name).to_string()
    }
}

async fn three() -> [Named; 3] {
    [Named::start(b'a').await, Named::start(b'b').await, Named::start(b'c').await]
}

/// `backends = [...]` for `members`, each with its extra keys (`, weight = 2`).
fn backends(members: &[(&Named, &str)]) -> String {
    let mut t = String::from("backends = [\n");
    for (m, extra) in members {
        t.push_str(&format!("  {{ name = \"{}\", address = \"{}\"{extra} }},\n", m.label(), m.addr));
    }
    t.push_str("]\n");
    t
}

/// A session to `path` and the name of the member it reached.
async fn open(gw: &Gateway, path: &str) -> (Ws, u8) {
    let mut ws = gw.ws(path).await;
    let name = read_bytes(&mut ws, 1).await[0];
    (ws, name)
}

async fn open_from(gw: &Gateway, src: IpAddr, path: &str) -> (Ws, u8) {
    let mut ws = gw.session_from(src, path, false).await.unwrap_or_else(|e| panic!("session from {src}: {e}"));
    let name = read_bytes(&mut ws, 1).await[0];
    (ws, name)
}

/// A payload goes through `ws` and comes back byte for byte.
async fn echoes(ws: &mut Ws, len: usize, seed: u64) {
    let data = payload(len, seed);
    send_binary(ws, &data).await;
    assert!(read_bytes(ws, data.len()).await == data, "the echo differs");
}

fn count(names: &[u8], name: u8) -> usize {
    names.iter().filter(|&&n| n == name).count()
}

async fn backend_metric(gw: &Gateway, metric: &str, backend: &Named) -> f64 {
    scrape(gw, metric, &[("route", "p"), ("backend", &backend.label())]).await
}

/// Round robin gives each of 3 backends 100 of 300 sessions (±1), each relaying byte for byte,
/// and `wsgate_backend_sessions_total` counts them per backend.
#[tokio::test]
async fn round_robin_shares_300_sessions_evenly() {
    let [a, b, c] = three().await;
    let gw = Gateway::builder().route_table("p", "/p", &backends(&[(&a, ""), (&b, ""), (&c, "")])).start().await;
    let mut names = Vec::new();
    let mut open_sessions = Vec::new();
    for i in 0..300 {
        let (mut ws, name) = open(&gw, "/p").await;
        echoes(&mut ws, 100, i).await;
        names.push(name);
        open_sessions.push(ws);
    }
    for m in [&a, &b, &c] {
        let n = count(&names, m.name);
        assert!((99..=101).contains(&n), "{} got {n} of 300: {names:?}", m.label());
        assert_eq!(backend_metric(&gw, "wsgate_backend_sessions_total", m).await, n as f64);
        assert_eq!(backend_metric(&gw, "wsgate_backend_sessions", m).await, n as f64);
    }
}

/// Least sessions shares 300 held sessions evenly; then, with backend a's sessions held open
/// and the others' closed, the next 30 all go to b and c.
#[tokio::test]
async fn least_sessions_fills_the_emptiest() {
    let [a, b, c] = three().await;
    let gw = Gateway::builder()
        .route_table("p", "/p", &format!("balance = \"least_sessions\"\n{}", backends(&[(&a, ""), (&b, ""), (&c, "")])))
        .start()
        .await;
    let mut held = Vec::new();
    for i in 0..300 {
        let (mut ws, name) = open(&gw, "/p").await;
        echoes(&mut ws, 100, i).await;
        held.push((ws, name));
    }
    let names: Vec<u8> = held.iter().map(|(_, n)| *n).collect();
    for m in [&a, &b, &c] {
        let n = count(&names, m.name);
        assert!((99..=101).contains(&n), "{} got {n} of 300", m.label());
    }
    let on_a = count(&names, b'a');
    let mut kept = Vec::new();
    for (mut ws, name) in held {
        if name == b'a' {
            kept.push(ws);
        } else {
            ws.close(None).await.unwrap();
            expect_end(&mut ws).await;
        }
    }
    eventually("b's and c's sessions ended", || async {
        backend_metric(&gw, "wsgate_backend_sessions", &b).await == 0.0
            && backend_metric(&gw, "wsgate_backend_sessions", &c).await == 0.0
    })
    .await;
    let mut next = Vec::new();
    for i in 0..30 {
        let (mut ws, name) = open(&gw, "/p").await;
        echoes(&mut ws, 100, i).await;
        next.push(name);
        kept.push(ws);
    }
    assert_eq!((count(&next, b'b'), count(&next, b'c')), (15, 15), "{next:?}");
    assert_eq!(backend_metric(&gw, "wsgate_backend_sessions", &a).await, on_a as f64);
}

/// The client hash sends each client address (127.0.0.x) to the same backend every time,
/// whatever its port, and spreads 40 clients over all three.
#[tokio::test]
async fn client_hash_keeps_each_client_on_its_backend() {
    let [a, b, c] = three().await;
    let gw = Gateway::builder()
        .route_table("p", "/p", &format!("balance = \"client_hash\"\n{}", backends(&[(&a, ""), (&b, ""), (&c, "")])))
        .start()
        .await;
    let mut first = Vec::new();
    for x in 1..=40u8 {
        let src = IpAddr::V4(Ipv4Addr::new(127, 0, 0, x));
        let (mut ws, name) = open_from(&gw, src, "/p").await;
        echoes(&mut ws, 100, u64::from(x)).await;
        first.push(name);
    }
    for round in 0..2 {
        for x in 1..=40u8 {
            let src = IpAddr::V4(Ipv4Addr::new(127, 0, 0, x));
            let (_ws, name) = open_from(&gw, src, "/p").await;
            assert_eq!(name, first[usize::from(x - 1)], "127.0.0.{x} moved in round {round}");
        }
    }
    for m in [&a, &b, &c] {
        assert!(count(&first, m.name) > 0, "{} got no client: {first:?}", m.label());
    }
}

/// A backend killed mid-run: sessions opened meanwhile all succeed (failed over within the
/// connect timeout) and relay byte for byte; its live sessions end with 1000 "backend closed
/// the connection" (docs/close-codes.md); `wsgate_backend_up` drops to 0 for it; restarted, it
/// is back after `rise` passed checks and gets sessions again.
#[tokio::test]
async fn a_killed_backend_is_failed_over_and_rejoins() {
    let [a, b, c] = three().await;
    let table = format!(
        "{}[routes.p.health]\ninterval_secs = 0.25\ntimeout_secs = 0.25\nrise = 2\nfall = 2\n",
        backends(&[(&a, ""), (&b, ""), (&c, "")])
    );
    let gw = Gateway::builder().route_table("p", "/p", &table).start().await;
    let mut live = Vec::new();
    for i in 0..30 {
        let (mut ws, name) = open(&gw, "/p").await;
        echoes(&mut ws, 100, i).await;
        live.push((ws, name));
    }
    assert_eq!(backend_metric(&gw, "wsgate_backend_up", &b).await, 1.0);

    // New sessions open while b dies: the opener hands over each session as it opens (its
    // echo is checked below, as one that reached b may be cut by the kill), and b is killed
    // after the 10th; `started` says which opens began after the kill.
    let gw = Arc::new(gw);
    let started = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (opened, mut progress) = mpsc::unbounded_channel();
    let opener = tokio::spawn({
        let (gw, started) = (gw.clone(), started.clone());
        async move {
            for _ in 0..60 {
                started.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let _ = opened.send(open(&gw, "/p").await);
            }
        }
    });
    let mut during = Vec::new();
    while during.len() < 10 {
        during.push(within("a session opened", progress.recv()).await.unwrap());
    }
    b.kill().await;
    let after_kill = started.load(std::sync::atomic::Ordering::SeqCst);
    within("60 sessions opened", opener).await.unwrap();
    while let Ok(session) = progress.try_recv() {
        during.push(session);
    }
    assert_eq!(during.len(), 60, "every handshake succeeded");
    let names: Vec<u8> = during.iter().map(|(_, n)| *n).collect();
    assert!(!names[after_kill..].contains(&b'b'), "a session opened after the kill reached b: {names:?}");
    for (ws, name) in live.iter_mut().chain(during.iter_mut()) {
        if *name == b'b' {
            let (_, code, reason) = read_until_close(ws).await;
            assert_eq!((code, reason.as_str()), (1000, "backend closed the connection"));
        } else {
            echoes(ws, 1000, 7).await;
        }
    }
    eventually("b is marked down", || async { backend_metric(&gw, "wsgate_backend_up", &b).await == 0.0 }).await;
    assert_eq!(scrape(&gw, "wsgate_handshakes_total", &[("route", "p"), ("status", "101")]).await, 90.0);

    b.restart().await;
    eventually("b is back up", || async { backend_metric(&gw, "wsgate_backend_up", &b).await == 1.0 }).await;
    let mut again = Vec::new();
    for i in 0..3 {
        let (mut ws, name) = open(&gw, "/p").await;
        echoes(&mut ws, 100, i).await;
        again.push(name);
    }
    again.sort_unstable();
    assert_eq!(again, b"abc", "round robin after b rejoined");
}

/// Without active checks, consecutive failed connects eject a member (`wsgate_backend_up` 0),
/// every session still connects, to the others, and the member is tried again after
/// `eject_secs`.
#[tokio::test]
async fn failed_connects_eject_a_member() {
    let [a, b, _] = three().await;
    let dead = RefusingPort::new();
    let members = format!(
        "backends = [\n  {{ name = \"a\", address = \"{}\" }},\n  {{ name = \"dead\", address = \"{}\" }},\n  {{ name = \"b\", address = \"{}\" }},\n]\n",
        a.addr, dead.addr, b.addr
    );
    let retried =
        format!("{members}[routes.r.health]\ninterval_secs = 0\neject_after_failures = 2\neject_secs = 0.2\n");
    let gw = Gateway::builder().route_table("p", "/p", &members).route_table("r", "/r", &retried).start().await;
    for i in 0..12 {
        let (mut ws, name) = open(&gw, "/p").await;
        echoes(&mut ws, 100, i).await;
        assert!(name == b'a' || name == b'b');
    }
    let labels = [("route", "p"), ("backend", "dead")];
    assert_eq!(scrape(&gw, "wsgate_backend_up", &labels).await, 0.0);
    // Ejected after 3 in a row (the default), so it was not tried again.
    assert_eq!(scrape(&gw, "wsgate_backend_failed_connects_total", &labels).await, 3.0);

    // Without active checks an ejected member is tried again after `eject_secs`: sessions keep
    // connecting (to the others) meanwhile.
    let labels = [("route", "r"), ("backend", "dead")];
    for _ in 0..6 {
        open(&gw, "/r").await;
    }
    assert_eq!(scrape(&gw, "wsgate_backend_failed_connects_total", &labels).await, 2.0);
    eventually("the ejected member is tried again", || async {
        let (mut ws, name) = open(&gw, "/r").await;
        echoes(&mut ws, 100, 1).await;
        assert!(name == b'a' || name == b'b');
        scrape(&gw, "wsgate_backend_failed_connects_total", &labels).await > 2.0
    })
    .await;
}

/// A member removed by a reload leaves the scrapes with it: its `wsgate_backend_up` of 0 would
/// otherwise stay, and alert, for the process's life. Put back, it is scraped again; the
/// members that stayed are scraped throughout.
#[tokio::test]
async fn a_removed_member_leaves_the_metrics() {
    let [a, b, _] = three().await;
    let dead = RefusingPort::new();
    let members = |with_dead: bool| {
        let dead =
            if with_dead { format!("  {{ name = \"dead\", address = \"{}\" }},\n", dead.addr) } else { String::new() };
        format!(
            "backends = [\n  {{ name = \"a\", address = \"{}\" }},\n{dead}  {{ name = \"b\", address = \"{}\" }},\n]\n",
            a.addr, b.addr
        )
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("wsgate.toml");
    // Another route's member of the same name stays in force throughout.
    let other = format!("backends = [\n  {{ name = \"dead\", address = \"{}\" }},\n]\n", a.addr);
    let config = |with_dead: bool| {
        Gateway::builder().route_table("p", "/p", &members(with_dead)).route_table("q", "/q", &other).toml()
    };
    std::fs::write(&path, config(true)).unwrap();
    let gw = Gateway::from_file(&path).await;
    for i in 0..12 {
        let (mut ws, _) = open(&gw, "/p").await;
        echoes(&mut ws, 100, i).await;
    }
    let dead_labels = [("route", "p"), ("backend", "dead")];
    assert_eq!(scrape(&gw, "wsgate_backend_up", &dead_labels).await, 0.0);
    let body = admin_get(&gw, "/metrics").await.1;
    assert!(metric(&body, "wsgate_backend_up", &dead_labels).is_some(), "{body}");

    std::fs::write(&path, config(false)).unwrap();
    gw.reloader.reload_file(&path).expect("reload without the dead member");
    let (mut ws, _) = open(&gw, "/p").await;
    echoes(&mut ws, 100, 99).await;
    let body = admin_get(&gw, "/metrics").await.1;
    assert!(!body.contains("route=\"p\",backend=\"dead\""), "a removed member is still scraped:\n{body}");
    assert_eq!(metric(&body, "wsgate_backend_up", &[("route", "q"), ("backend", "dead")]), Some(1.0), "{body}");
    for m in [&a, &b] {
        assert_eq!(metric(&body, "wsgate_backend_up", &[("route", "p"), ("backend", &m.label())]), Some(1.0), "{body}");
    }
    assert!(body.contains("# TYPE wsgate_backend_up gauge"), "{body}");

    std::fs::write(&path, config(true)).unwrap();
    gw.reloader.reload_file(&path).expect("reload with the member back");
    let body = admin_get(&gw, "/metrics").await.1;
    assert_eq!(metric(&body, "wsgate_backend_up", &dead_labels), Some(0.0), "put back, with its state: {body}");
    assert_eq!(metric(&body, "wsgate_backend_failed_connects_total", &dead_labels), Some(3.0), "{body}");
}

/// Drain by reload: `drain = true` (and then `weight = 0`) gives a member no new sessions while
/// its live ones carry on byte for byte.
#[tokio::test]
async fn a_drained_backend_keeps_its_sessions_and_gets_no_new_ones() {
    let [a, b, c] = three().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("wsgate.toml");
    let config = |b_extra: &str, c_extra: &str| {
        Gateway::builder().route_table("p", "/p", &backends(&[(&a, ""), (&b, b_extra), (&c, c_extra)])).toml()
    };
    std::fs::write(&path, config("", "")).unwrap();
    let gw = Gateway::from_file(&path).await;
    let mut live = Vec::new();
    for i in 0..6 {
        let (mut ws, name) = open(&gw, "/p").await;
        echoes(&mut ws, 100, i).await;
        live.push((ws, name));
    }

    std::fs::write(&path, config("", ", drain = true")).unwrap();
    gw.reloader.reload_file(&path).expect("reload");
    let mut names = Vec::new();
    let mut more = Vec::new();
    for i in 0..30 {
        let (mut ws, name) = open(&gw, "/p").await;
        echoes(&mut ws, 100, i).await;
        names.push(name);
        more.push(ws);
    }
    assert_eq!((count(&names, b'a'), count(&names, b'b'), count(&names, b'c')), (15, 15, 0), "{names:?}");

    std::fs::write(&path, config(", weight = 0", ", drain = true")).unwrap();
    gw.reloader.reload_file(&path).expect("reload");
    for i in 0..10 {
        let (mut ws, name) = open(&gw, "/p").await;
        echoes(&mut ws, 100, i).await;
        assert_eq!(name, b'a');
        more.push(ws);
    }
    for (i, (ws, _)) in live.iter_mut().enumerate() {
        echoes(ws, 256 * 1024, 50 + i as u64).await;
    }
    assert_eq!(backend_metric(&gw, "wsgate_backend_sessions", &c).await, 2.0);
}

/// A member at `max_sessions` gets no more, across a reload too; when every member is full the
/// route's `on_backend_unavailable` answers (1013 in band, or 503), and a freed place is used
/// again.
#[tokio::test]
async fn a_backend_at_its_cap_gets_no_more() {
    let [a, b, _] = three().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("wsgate.toml");
    let config = Gateway::builder()
        .route_table("p", "/p", &backends(&[(&a, ", max_sessions = 3"), (&b, ", max_sessions = 5")]))
        .route_table(
            "q",
            "/q",
            &format!("on_backend_unavailable = \"http\"\n{}", backends(&[(&a, ", max_sessions = 1")])),
        )
        .toml();
    std::fs::write(&path, &config).unwrap();
    let gw = Gateway::from_file(&path).await;
    let mut held = Vec::new();
    for i in 0..8 {
        let (mut ws, name) = open(&gw, "/p").await;
        echoes(&mut ws, 100, i).await;
        held.push((ws, name));
    }
    let names: Vec<u8> = held.iter().map(|(_, n)| *n).collect();
    assert_eq!((count(&names, b'a'), count(&names, b'b')), (3, 5), "{names:?}");
    // The members' session counts outlive a reload, as the caps they are held to.
    std::fs::write(&path, config.replace("max_sessions = 5", "max_sessions = 5, weight = 2")).unwrap();
    gw.reloader.reload_file(&path).expect("reload");
    let mut full = gw.ws("/p").await;
    let (data, code, reason) = read_until_close(&mut full).await;
    assert_eq!((data.len(), code, reason.as_str()), (0, 1013, "backend unavailable: no backend available"));

    let (_q, name) = open(&gw, "/q").await;
    assert_eq!(name, b'a');
    match gw.ws_with("/q", &[]).await {
        Err(tungstenite::Error::Http(r)) => assert_eq!(r.status(), 503),
        other => panic!("expected 503, got {:?}", other.map(|_| "a session")),
    }

    // One of a's sessions on p ends; its place is taken by the next session.
    let i = held.iter().position(|(_, n)| *n == b'a').unwrap();
    let (mut ws, _) = held.remove(i);
    ws.close(None).await.unwrap();
    expect_end(&mut ws).await;
    eventually("a's session ended", || async { backend_metric(&gw, "wsgate_backend_sessions", &a).await == 2.0 }).await;
    let (_ws, name) = open(&gw, "/p").await;
    assert_eq!(name, b'a');
}

/// Active checks on a PROXY protocol route send the v2 LOCAL header first, then `send`, and
/// pass on `expect`; a member that answers something else goes down after `fall` checks.
#[tokio::test]
async fn health_checks_send_local_proxy_header_and_expect() {
    const LOCAL: &[u8] = b"\r\n\r\n\0\r\nQUIT\n\x20\x00\x00\x00";
    let (seen, mut checks) = mpsc::unbounded_channel();
    let good = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let good_addr = good.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = good.accept().await {
            let seen = seen.clone();
            tokio::spawn(async move {
                let mut head = vec![0u8; LOCAL.len() + 5];
                if s.read_exact(&mut head).await.is_ok() {
                    let _ = s.write_all(b"RFB 003.008\n").await;
                    let _ = seen.send(head);
                }
            });
        }
    });
    let wrong = Backend::start(|mut s: TcpStream| async move {
        let _ = s.write_all(b"SSH-2.0-x\r\n").await;
        let mut sink = Vec::new();
        let _ = s.read_to_end(&mut sink).await;
    })
    .await;
    let table = format!(
        "proxy_protocol = \"v2\"\nbackends = [\n  {{ name = \"good\", address = \"{good_addr}\" }},\n  {{ name = \"wrong\", address = \"{}\" }},\n]\n\
         [routes.p.health]\ninterval_secs = 0.5\ntimeout_secs = 0.5\nrise = 1\nfall = 2\nsend = \"HELLO\"\nexpect = \"RFB 003\"\n",
        wrong.addr
    );
    let gw = Gateway::builder().route_table("p", "/p", &table).start().await;
    for _ in 0..3 {
        let head = within("a health check", checks.recv()).await.unwrap();
        assert_eq!(head, [LOCAL, b"HELLO"].concat());
    }
    let up = |name: &'static str| {
        let gw = &gw;
        async move { scrape(gw, "wsgate_backend_up", &[("route", "p"), ("backend", name)]).await }
    };
    eventually("wrong is marked down", || async { up("wrong").await == 0.0 }).await;
    assert_eq!(up("good").await, 1.0);
}

/// `wsgate check` prints each pool (members, weights, caps, health) for the pool example in the
/// shipped config.toml, uncommented, and names the key of a pool mistake in one line.
#[test]
fn check_prints_the_pool_summary() {
    let shipped = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config.toml")).unwrap();
    let start = shipped.find("# [routes.mqtt-cluster]").expect("the pool example in config.toml");
    let example: String = shipped[start..]
        .lines()
        .take_while(|l| *l != "#")
        .map(|l| format!("{}\n", l.strip_prefix("# ").unwrap_or(l)))
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pool.toml");
    std::fs::write(&path, format!("[listeners.main]\naddress = \"127.0.0.1:0\"\n{example}")).unwrap();
    let check = |path: &std::path::Path| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_wsgate")).arg("check").arg(path).output().unwrap();
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        (out.status.success(), text)
    };
    let (ok, text) = check(&path);
    assert!(ok, "{text}");
    for line in [
        "-> pool of 3 (least_sessions)",
        "  backend  a 10.0.0.1:1883 weight 1\n",
        "  backend  c 10.0.0.3:1883 weight 1, max_sessions 1000\n",
        "  health   checks every 2s (timeout 1s, rise 2, fall 3); eject after 3 failed connects\n",
    ] {
        assert!(text.contains(line), "missing {line:?} in:\n{text}");
    }
    std::fs::write(
        &path,
        format!("[listeners.main]\naddress = \"127.0.0.1:0\"\n{}", example.replace("\"b\"", "\"a\"")),
    )
    .unwrap();
    let (ok, text) = check(&path);
    assert!(!ok && text.contains("routes.mqtt-cluster.backends: the name \"a\" is used twice"), "{text}");
}

/// A member that never answers (its SYNs dropped, as a host powered off) gets only its share of
/// the connect timeout: with 2 members and a 4 s timeout, each session whose turn falls on it
/// waits about 2 s and then reaches the other, so not one handshake fails.
#[tokio::test]
async fn a_member_that_never_answers_does_not_take_the_whole_timeout() {
    let b = Named::start(b'b').await;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let hole = socket.listen(1).unwrap();
    let hole_addr = hole.local_addr().unwrap();
    // Fill the backlog, so every later connect hangs.
    let _queued = futures_util::future::join_all((0..2).map(|_| TcpStream::connect(hole_addr))).await;
    let members = format!(
        "backends = [\n  {{ name = \"hole\", address = \"{hole_addr}\" }},\n  {{ name = \"b\", address = \"{}\" }},\n]\n\
         [routes.p.health]\ninterval_secs = 0\neject_after_failures = 0\n",
        b.addr
    );
    let gw = Gateway::builder().route_table("p", "/p", &members).limit("connect_timeout_secs", "4").start().await;
    for i in 0..4 {
        let (mut ws, name) = open(&gw, "/p").await;
        assert_eq!(name, b'b', "session {i}");
        echoes(&mut ws, 100, i).await;
    }
    let labels = [("route", "p"), ("backend", "hole")];
    assert_eq!(scrape(&gw, "wsgate_backend_failed_connects_total", &labels).await, 2.0, "round robin tried it twice");
}
