//! `TCP_USER_TIMEOUT` on the backend socket: when a backend's packets are dropped mid-transfer,
//! the session ends within `tcp_user_timeout_secs`, not after the kernel's ~15 minutes of
//! retransmissions. (Stopping the backend process would not do: its kernel still acknowledges.)
//!
//! Dropping packets takes a firewall rule, which an unprivileged test may set only in a network
//! namespace of its own. So the test runs this test binary again under `unshare -rn` (a user
//! namespace, in which it is root, and a network namespace with nothing but a loopback), and that
//! child, alone in its namespace, runs the session and drops the backend's port with `nft`.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

use crate::support::*;

/// Set (to the `nft` binary's path) in the child's environment.
const CHILD: &str = "WSGATE_NETNS_CHILD";

/// What the child prints when the session ended as it should.
const DONE: &str = "the session ended at the backend's user timeout";

#[test]
fn a_backend_whose_packets_are_dropped_ends_the_session_within_tcp_user_timeout() {
    let nft = find("nft").expect("`nft` is missing: install Debian's nftables package (scripts/test does)");
    let ip = find("ip").expect("`ip` is missing: install Debian's iproute2 package (scripts/test does)");
    let out = Command::new("unshare")
        .arg("-rn")
        .arg(std::env::current_exe().unwrap())
        .args(["--exact", "liveness::netns::in_its_namespace", "--ignored", "--nocapture"])
        .env(CHILD, format!("{}:{}", nft.display(), ip.display()))
        .output()
        .expect("run unshare (util-linux)");
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(
        !stderr.contains("unshare failed"),
        "this system refuses an unprivileged user and network namespace (`unshare -rn`): {stderr}"
    );
    assert!(out.status.success() && stdout.contains(DONE), "the child failed:\n{stdout}\n{stderr}");
    println!("{}", stdout.lines().find(|l| l.contains(DONE)).unwrap_or_default());
}

/// The child: the session, the backend and the gateway, in a namespace where dropping packets
/// touches nothing else.
#[tokio::test]
#[ignore = "run inside its own network namespace by the test above"]
async fn in_its_namespace() {
    let tools = std::env::var(CHILD)
        .expect("run by a_backend_whose_packets_are_dropped_ends_the_session_within_tcp_user_timeout");
    let (nft, ip) = tools.split_once(':').unwrap();
    run(ip, &["link", "set", "lo", "up"]);
    // The backend reads everything and says when the first bytes have arrived.
    let (first_read, mut got_first) = tokio::sync::mpsc::unbounded_channel();
    let backend = Backend::start(move |mut s: TcpStream| {
        let first_read = first_read.clone();
        async move {
            let mut buf = vec![0u8; 64 * 1024];
            while let Ok(1..) = s.read(&mut buf).await {
                let _ = first_read.send(());
            }
        }
    })
    .await;
    let gw = Gateway::builder()
        .route("tcp", "/tcp", &backend.target())
        .limit("tcp_user_timeout_secs", "2")
        .limit("ping_interval_secs", "0")
        .start()
        .await;
    let mut ws = gw.ws("/tcp").await;
    send_binary(&mut ws, &payload(1000, 50)).await;
    within("the backend reads", got_first.recv()).await.unwrap();
    // From now on nothing reaches the backend, and nothing comes back from it (its ACKs).
    let port = backend.addr.port().to_string();
    run(nft, &["add", "table", "inet", "wsgate_test"]);
    run(nft, &["add", "chain", "inet", "wsgate_test", "out", "{ type filter hook output priority 0; }"]);
    for direction in ["dport", "sport"] {
        run(nft, &["add", "rule", "inet", "wsgate_test", "out", "tcp", direction, &port, "drop"]);
    }
    send_binary(&mut ws, &payload(100_000, 51)).await;
    let sent = Instant::now();
    let (_, code, reason) = read_until_close(&mut ws).await;
    let after = sent.elapsed();
    assert_eq!((code, reason.as_str()), (1011, "backend error: timed out"));
    assert!(after >= Duration::from_millis(1900) && after < Duration::from_secs(4), "ended after {after:?}");
    println!("{DONE} (2 s) after {after:?}");
}

fn run(tool: &str, args: &[&str]) {
    let out = Command::new(tool).args(args).output().unwrap_or_else(|e| panic!("{tool}: {e}"));
    assert!(out.status.success(), "{tool} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// `name` on the PATH or in the system directories, which a non-root PATH may leave out.
fn find(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}
