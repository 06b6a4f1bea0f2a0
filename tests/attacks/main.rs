//! wsgate under attack: floods, slowloris and hostile sessions, each asserting what ordinary
//! clients still get and what memory stays at.
//!
//! A test binary of its own because what these tests assert depends on the machine's cores:
//! cargo runs test binaries one after another, so the attacks never compete with the rest of
//! the suite (tests/e2e) for CPU, and within this binary they run one at a time.

#[path = "../e2e/support/mod.rs"]
mod support;

/// Admission under attack: per-client caps, the handshake pool, route caps, the memory budget.
mod limits;
/// A log reader that stops reading while sessions flood in.
mod logs;
/// Memory per session under hostile clients, on a gateway process of its own.
mod memory;
/// The handshake queue under attack: waiting for a pool place, a client's share, a connect place.
mod queue;

/// The attacks open thousands of sockets each; one at a time keeps the suite within its
/// file-descriptor limit and gives each attack the machine it is measured on.
static ONE_ATTACK_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// `n` loopback addresses from 127.`first`.0.1 on.
fn sources(first: u8, n: usize) -> Vec<std::net::IpAddr> {
    (0..n).map(|i| std::net::Ipv4Addr::new(127, first + (i / 250) as u8, (i % 250) as u8, 1).into()).collect()
}

/// A listening socket that never accepts: once its backlog of 1 is full, connects to it hang
/// (SYNs are dropped), as to a host that has gone.
fn black_hole() -> (tokio::net::TcpListener, std::net::SocketAddr) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = socket.listen(1).unwrap();
    let addr = listener.local_addr().unwrap();
    (listener, addr)
}

/// The resident set size of process `pid` in bytes (`VmRSS` in /proc/PID/status).
fn resident_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|v| v.trim().parse().ok())
        .expect("VmRSS in /proc/PID/status");
    kib * 1024
}
