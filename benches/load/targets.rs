//! What is measured: the relays under test, started as processes of their own, and where to
//! reach each one.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Kind {
    Tcp,
    Ws,
    Wss,
}

/// Where clients connect and how: a WebSocket URL, or a TCP address.
#[derive(Clone, Debug)]
pub(crate) struct Endpoint {
    pub(crate) kind: Kind,
    pub(crate) addr: SocketAddr,
    /// The URL's host: the TLS server name and the Host header.
    pub(crate) host: String,
    pub(crate) path: String,
}

impl Endpoint {
    pub(crate) fn local(kind: Kind, addr: SocketAddr, path: &str) -> Endpoint {
        Endpoint { kind, addr, host: "localhost".into(), path: path.into() }
    }

    /// `ws://host:port/path`, `wss://host:port/path` or `tcp://host:port`.
    pub(crate) fn parse(url: &str) -> Result<Endpoint, String> {
        use std::net::ToSocketAddrs;
        let (scheme, rest) =
            url.split_once("://").ok_or_else(|| format!("{url}: no scheme (ws://, wss://, tcp://)"))?;
        let kind = match scheme {
            "ws" => Kind::Ws,
            "wss" => Kind::Wss,
            "tcp" => Kind::Tcp,
            other => return Err(format!("{url}: scheme {other:?} is not ws, wss or tcp")),
        };
        let (authority, path) = rest.split_once('/').map_or((rest, "/".to_string()), |(a, p)| (a, format!("/{p}")));
        let default_port = if kind == Kind::Wss { 443 } else { 80 };
        let with_port = if authority.rsplit_once(':').is_some_and(|(_, p)| p.parse::<u16>().is_ok()) {
            authority.to_string()
        } else {
            format!("{authority}:{default_port}")
        };
        let addr = with_port
            .to_socket_addrs()
            .map_err(|e| format!("{url}: {e}"))?
            .next()
            .ok_or_else(|| format!("{url}: no address"))?;
        let host = with_port.rsplit_once(':').map_or(authority, |(h, _)| h).trim_matches(['[', ']']).to_string();
        Ok(Endpoint { kind, addr, host, path })
    }

    pub(crate) fn url(&self) -> String {
        let scheme = match self.kind {
            Kind::Tcp => "tcp",
            Kind::Ws => "ws",
            Kind::Wss => "wss",
        };
        format!("{scheme}://{}:{}{}", self.host, self.addr.port(), self.path)
    }
}

/// wsgate's per-client caps raised out of reach (the code still counts every connection) for
/// the figures driven from one address: there the generator stands for many clients, and at the
/// defaults (20 new connections a second, a burst of 100, 256 open) it would measure the caps,
/// not the relay. The reconnect storm, from 64 addresses, runs wsgate at its defaults.
///
/// `--wsgate-limits` lines that set `per_client.*` themselves replace it ([`per_client`]).
pub(crate) const PER_CLIENT_OUT_OF_REACH: &str = "[limits.per_client]\nmax_connections = 1000000\n\
     max_handshakes = 100000\nnew_connections_per_sec = 1000000\nnew_connections_burst = 1000000\n";

/// [`PER_CLIENT_OUT_OF_REACH`], unless the extra `[limits]` lines set per-client caps.
pub(crate) fn per_client(limits: &str) -> &'static str {
    if limits.contains("per_client") { "" } else { PER_CLIENT_OUT_OF_REACH }
}

/// One thing under test: an endpoint and the process relaying its traffic.
pub(crate) struct Target {
    pub(crate) name: &'static str,
    pub(crate) at: Endpoint,
    /// The process relaying the traffic (none for direct TCP).
    pub(crate) process: Option<Child>,
    /// A process the target relays through but is not measured: the gateway behind a client.
    pub(crate) behind: Option<Child>,
    /// Peers are held to 1,000 idle sessions.
    pub(crate) max_idle: usize,
}

impl Target {
    pub(crate) fn pid(&self) -> Option<u32> {
        self.process.as_ref().map(Child::id)
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        for p in [&mut self.process, &mut self.behind].into_iter().flatten() {
            let _ = p.kill();
            let _ = p.wait();
        }
    }
}

/// Starts a child and waits for a line on stderr (or stdout) that yields its address.
pub(crate) fn spawn_and_find(
    mut cmd: Command,
    find: impl Fn(&str) -> Option<SocketAddr>,
    from_stdout: bool,
) -> (Child, SocketAddr) {
    cmd.stdin(Stdio::piped());
    if from_stdout {
        cmd.stdout(Stdio::piped()).stderr(Stdio::null());
    } else {
        cmd.stdout(Stdio::null()).stderr(Stdio::piped());
    }
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("start {cmd:?}: {e}"));
    let out: Box<dyn std::io::Read + Send> =
        if from_stdout { Box::new(child.stdout.take().unwrap()) } else { Box::new(child.stderr.take().unwrap()) };
    let mut out = BufReader::new(out);
    let mut line = String::new();
    let addr = loop {
        line.clear();
        let read = out.read_line(&mut line).unwrap();
        assert!(read > 0, "{cmd:?} exited before telling its address");
        if let Some(a) = find(line.trim_end()) {
            break a;
        }
    };
    // Keep draining so the child never blocks on a full pipe: as bytes, as a log collector
    // would, not as lines (a String per session line is the load generator's CPU, which the
    // handshake windows share with the relay).
    std::thread::spawn(move || std::io::copy(&mut out, &mut std::io::sink()));
    (child, addr)
}

/// The address a child process is listening on, read from `/proc` once it has bound one: for
/// peers that bind port 0 but cannot say which port they got. (No probe-and-drop: nothing else
/// can take the port between our choosing it and the peer binding it.)
pub(crate) fn listening_addr(child: &Child) -> SocketAddr {
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(addr) = listening_addr_now(child.id()) {
            return addr;
        }
        assert!(Instant::now() < until, "process {} never listened on a TCP port", child.id());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A listening IPv4 socket that process `pid` holds, if any: its descriptors name socket inodes,
/// and `/proc/PID/net/tcp` lists each socket's inode, state (0A: listening) and address.
fn listening_addr_now(pid: u32) -> Option<SocketAddr> {
    let inodes: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .ok()?
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter_map(|link| Some(link.to_str()?.strip_prefix("socket:[")?.strip_suffix(']')?.to_string()))
        .collect();
    let table = std::fs::read_to_string(format!("/proc/{pid}/net/tcp")).ok()?;
    table.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (local, state, inode) = (fields.get(1)?, fields.get(3)?, fields.get(9)?);
        if *state != "0A" || !inodes.iter().any(|i| i == inode) {
            return None;
        }
        let (ip, port) = local.split_once(':')?;
        let ip = std::net::Ipv4Addr::from(u32::from_str_radix(ip, 16).ok()?.swap_bytes());
        Some(SocketAddr::from((ip, u16::from_str_radix(port, 16).ok()?)))
    })
}

/// What every run shares: a scratch directory, a certificate for the wss targets, and the echo
/// backend every relay forwards to.
pub(crate) struct Setup {
    pub(crate) dir: tempfile::TempDir,
    pub(crate) echo: SocketAddr,
    pub(crate) cert: PathBuf,
    pub(crate) key: PathBuf,
    pub(crate) ca_der: rustls::pki_types::CertificateDer<'static>,
}

impl Setup {
    /// Makes the directory and certificate and starts the echo backend (the returned target; it
    /// stops when dropped). The backend runs in a process of its own, like the relays, so that
    /// the relay's descriptors, memory and CPU figures are its own and this process holds only
    /// clients.
    pub(crate) fn start() -> (Setup, Target) {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key, ca_der) = setup_certs(dir.path());
        let mut cmd = Command::new(std::env::current_exe().unwrap());
        cmd.args(["backend", "echo"]);
        let (echo_process, echo) = spawn_and_find(cmd, |l| l.strip_prefix("listening ")?.parse().ok(), true);
        let target = Target {
            name: "echo",
            at: Endpoint::local(Kind::Tcp, echo, ""),
            process: Some(echo_process),
            behind: None,
            max_idle: 0,
        };
        (Setup { dir, echo, cert, key, ca_der }, target)
    }
}

pub(crate) fn setup_certs(dir: &Path) -> (PathBuf, PathBuf, rustls::pki_types::CertificateDer<'static>) {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert, ck.cert.pem()).unwrap();
    std::fs::write(&key, ck.signing_key.serialize_pem()).unwrap();
    (cert, key, ck.cert.der().clone())
}

pub(crate) fn start_targets(setup: &Setup, only: &Option<String>, limits: &str) -> Vec<Target> {
    let want = |name: &str| only.as_ref().is_none_or(|o| o.split(',').any(|n| n == name));
    let me = std::env::current_exe().unwrap();
    let mut targets = Vec::new();
    if want("tcp") {
        targets.push(Target {
            name: "tcp",
            at: Endpoint::local(Kind::Tcp, setup.echo, ""),
            process: None,
            behind: None,
            max_idle: 8000,
        });
    }
    if want("tcp-relay") {
        let mut cmd = Command::new(&me);
        cmd.args(["tcp-relay", "--backend", &setup.echo.to_string()]);
        let (child, addr) = spawn_and_find(cmd, |l| l.strip_prefix("listening ")?.parse().ok(), true);
        targets.push(Target {
            name: "tcp-relay",
            at: Endpoint::local(Kind::Tcp, addr, ""),
            process: Some(child),
            behind: None,
            max_idle: 0,
        });
    }
    for (name, kind) in [("bare-ws", Kind::Ws), ("bare-wss", Kind::Wss)] {
        if !want(name) {
            continue;
        }
        let mut cmd = Command::new(&me);
        cmd.args(["bare-bridge", "--backend", &setup.echo.to_string()]);
        if kind == Kind::Wss {
            cmd.arg("--tls").arg(&setup.cert).arg(&setup.key);
        }
        let (child, addr) = spawn_and_find(cmd, |l| l.strip_prefix("listening ")?.parse().ok(), true);
        targets.push(Target {
            name,
            at: Endpoint::local(kind, addr, "/"),
            process: Some(child),
            behind: None,
            max_idle: 8000,
        });
    }
    if want("wsgate-ws") || want("wsgate-wss") {
        let config = setup.dir.path().join("wsgate.toml");
        std::fs::write(
            &config,
            format!(
                "[listeners.plain]\naddress = \"127.0.0.1:0\"\n[listeners.secure]\naddress = \"127.0.0.1:0\"\n\
                 tls = {{ cert = {:?}, key = {:?} }}\n[routes.bench]\npath = \"/bench\"\nbackend = \"{}\"\n\
                 [admin]\naddress = \"127.0.0.1:0\"\n[shutdown]\ndrain_delay_secs = 0\nclose_window_secs = 0\n\
                 [limits]\n{}\n{}",
                setup.cert,
                setup.key,
                setup.echo,
                limits.replace(';', "\n"),
                per_client(limits)
            ),
        )
        .unwrap();
        for (name, kind, listener) in [("wsgate-ws", Kind::Ws, "plain"), ("wsgate-wss", Kind::Wss, "secure")] {
            if !want(name) {
                continue;
            }
            // One gateway process per target, so memory and CPU figures are its own.
            let mut cmd = Command::new(env!("CARGO_BIN_EXE_wsgate"));
            cmd.args(["run", "--config"]).arg(&config).env("RUST_LOG", "warn,wsgate=info");
            let tag = format!("listener={listener} url=");
            let (child, addr) = spawn_and_find(
                cmd,
                |l| l.split(&tag).nth(1)?.split_whitespace().next()?.split("://").nth(1)?.parse().ok(),
                false,
            );
            targets.push(Target {
                name,
                at: Endpoint::local(kind, addr, "/bench"),
                process: Some(child),
                behind: None,
                max_idle: 8000,
            });
        }
    }
    start_clients(setup, &want, limits, &mut targets);
    // Peers bind port 0 and cannot say which port they got: `listening_addr` finds it.
    type PeerArgs = fn(SocketAddr) -> Vec<String>;
    let peers: [(&'static str, PeerArgs); 2] = [
        ("websocat", |echo| vec!["--binary".into(), "-E".into(), "ws-l:127.0.0.1:0".into(), format!("tcp:{echo}")]),
        ("websockify", |echo| vec!["127.0.0.1:0".into(), echo.to_string()]),
    ];
    for (name, args) in peers {
        if !want(name) || !which(name) {
            continue;
        }
        let mut cmd = Command::new(name);
        cmd.args(args(setup.echo)).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
        let child = cmd.spawn().unwrap();
        let addr = listening_addr(&child);
        targets.push(Target {
            name,
            at: Endpoint::local(Kind::Ws, addr, "/"),
            process: Some(child),
            behind: None,
            max_idle: 1000,
        });
    }
    targets
}

/// Client mode: a TCP client → the client under test (`wsgate connect --listen`, or websocat
/// 1.13 as a TCP-to-WebSocket client) → a wsgate gateway over ws → the echo. The figures are the
/// client process's own; each client gets a gateway process of its own behind it.
fn start_clients(setup: &Setup, want: &dyn Fn(&str) -> bool, limits: &str, targets: &mut Vec<Target>) {
    type ClientArgs = fn(&str) -> (String, Vec<String>);
    let clients: [(&'static str, ClientArgs); 2] = [
        ("connect-wsgate", |url| {
            let args = ["connect", url, "--listen", "127.0.0.1:0"];
            (env!("CARGO_BIN_EXE_wsgate").into(), args.map(String::from).to_vec())
        }),
        ("connect-websocat", |url| {
            let args = ["--binary", "-E", "tcp-l:127.0.0.1:0", url];
            ("websocat".into(), args.map(String::from).to_vec())
        }),
    ];
    for (name, args) in clients {
        if !want(name) || (name == "connect-websocat" && !which("websocat")) {
            continue;
        }
        let config = setup.dir.path().join(format!("{name}-gateway.toml"));
        // Every session reaches this gateway from the one client process, as through an HTTP
        // proxy, so its per-client caps are off (docs/config.md, `[limits.per_client]`): at the
        // defaults (a burst of 100 new connections, then 20 a second) the run's second figure
        // had its connections refused, and the client under test reset them.
        std::fs::write(
            &config,
            format!(
                "[listeners.plain]\naddress = \"127.0.0.1:0\"\n[routes.bench]\npath = \"/bench\"\nbackend = \"{}\"\n\
                 [admin]\naddress = \"127.0.0.1:0\"\n[shutdown]\ndrain_delay_secs = 0\nclose_window_secs = 0\n[limits]\n{}\n\
                 {}",
                setup.echo,
                limits.replace(';', "\n"),
                per_client(limits)
            ),
        )
        .unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_wsgate"));
        cmd.args(["run", "--config"]).arg(&config).env("RUST_LOG", "warn,wsgate=info");
        let (gateway, gateway_addr) = spawn_and_find(
            cmd,
            |l| l.split("listener=plain url=").nth(1)?.split_whitespace().next()?.split("://").nth(1)?.parse().ok(),
            false,
        );
        let (program, args) = args(&format!("ws://{gateway_addr}/bench"));
        let mut cmd = Command::new(program);
        cmd.args(args);
        let (child, addr) = if name == "connect-wsgate" {
            spawn_and_find(cmd, |l| l.strip_prefix("wsgate connect: listening on ")?.parse().ok(), false)
        } else {
            cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
            let child = cmd.spawn().unwrap();
            let addr = listening_addr(&child);
            (child, addr)
        };
        targets.push(Target {
            name,
            at: Endpoint::local(Kind::Tcp, addr, ""),
            process: Some(child),
            behind: Some(gateway),
            max_idle: 0,
        });
    }
}

pub(crate) fn which(program: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {program}"))
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A wsgate of its own for one figure, with the lines it logs and its admin address: for the
/// figures that signal it (SIGHUP) or read its metrics, and for the storm, whose peak memory must
/// be its own and not that of the figures before it.
pub(crate) struct Gateway {
    pub(crate) process: Child,
    pub(crate) at: Endpoint,
    pub(crate) admin: SocketAddr,
    /// Lines wsgate logs after its address lines.
    pub(crate) log: std::sync::mpsc::Receiver<String>,
}

impl Gateway {
    /// wsgate with one wss listener (`secure`), the `/bench` route to the echo backend, default
    /// limits plus `limits`, metrics on.
    pub(crate) fn start_wss(setup: &Setup, limits: &str) -> Gateway {
        let config = setup.dir.path().join("gateway-wss.toml");
        std::fs::write(
            &config,
            format!(
                "[listeners.secure]\naddress = \"127.0.0.1:0\"\ntls = {{ cert = {:?}, key = {:?} }}\n\
                 [routes.bench]\npath = \"/bench\"\nbackend = \"{}\"\n[admin]\naddress = \"127.0.0.1:0\"\n\
                 [shutdown]\ndrain_delay_secs = 0\nclose_window_secs = 0\n[limits]\n{}\n",
                setup.cert,
                setup.key,
                setup.echo,
                limits.replace(';', "\n")
            ),
        )
        .unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_wsgate"));
        cmd.args(["run", "--config"]).arg(&config).env("RUST_LOG", "warn,wsgate=info");
        cmd.stdin(Stdio::piped()).stdout(Stdio::null()).stderr(Stdio::piped());
        let mut process = cmd.spawn().unwrap_or_else(|e| panic!("start {cmd:?}: {e}"));
        let mut lines = BufReader::new(process.stderr.take().unwrap()).lines();
        let addr_after = |line: &str, tag: &str| -> Option<SocketAddr> {
            line.split(tag).nth(1)?.split_whitespace().next()?.split("://").nth(1)?.split('/').next()?.parse().ok()
        };
        let (mut addr, mut admin) = (None, None);
        while addr.is_none() || admin.is_none() {
            let line = lines.next().expect("wsgate exited before telling its addresses").unwrap();
            if line.contains("admin listening") {
                admin = admin.or(addr_after(&line, "url="));
            } else {
                addr = addr.or(addr_after(&line, "listener=secure url="));
            }
        }
        let (tx, log) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        Gateway { process, at: Endpoint::local(Kind::Wss, addr.unwrap(), "/bench"), admin: admin.unwrap(), log }
    }

    /// The lines of wsgate's metrics whose name starts with `prefix` and whose value is not 0.
    pub(crate) fn metrics(&self, prefix: &str) -> Vec<String> {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(self.admin).expect("connect to wsgate's admin listener");
        s.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n").unwrap();
        let mut text = String::new();
        let _ = s.read_to_string(&mut text);
        text.lines().filter(|l| l.starts_with(prefix) && !l.ends_with(" 0")).map(str::to_string).collect()
    }

    /// The sum of the values of the lines of metric `name` that carry the label `label`
    /// (`kind="resumed"`), whatever their other labels and their order.
    pub(crate) fn metric_sum(&self, name: &str, label: &str) -> f64 {
        let lines = self.metrics(&format!("{name}{{"));
        lines.iter().filter(|l| l.contains(label)).filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok()).sum()
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
    }
}
