//! `wsgate connect` run as a user runs it (the binary, its stdio, its stderr and exit code), a
//! small HTTP CONNECT proxy, and a real sshd (`sshd -i`, one per accepted connection, so it
//! needs no port of its own).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tempfile::TempDir;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use super::{Backend, within};

/// The wsgate binary, as `cargo test` built it.
pub const BIN: &str = env!("CARGO_BIN_EXE_wsgate");

/// A `wsgate connect` command to run; no proxy from the test's own environment.
pub struct Connect(tokio::process::Command);

/// How a `wsgate connect --stdio` run ended.
#[derive(Debug)]
pub struct Ran {
    pub stdout: Vec<u8>,
    pub stderr: String,
    pub code: Option<i32>,
}

impl Connect {
    pub fn new(url: &str) -> Connect {
        let mut cmd = tokio::process::Command::new(BIN);
        cmd.args(["connect", url]).env("RUST_LOG", "warn").env("NO_COLOR", "1").kill_on_drop(true);
        for var in ["HTTPS_PROXY", "https_proxy", "NO_PROXY", "no_proxy", "SSL_CERT_FILE"] {
            cmd.env_remove(var);
        }
        Connect(cmd)
    }

    pub fn arg(mut self, arg: &str) -> Connect {
        self.0.arg(arg);
        self
    }

    pub fn args(mut self, args: &[&str]) -> Connect {
        self.0.args(args);
        self
    }

    pub fn env(mut self, key: &str, value: &str) -> Connect {
        self.0.env(key, value);
        self
    }

    /// Runs with `--stdio`: writes `input`, closes stdin, and waits for the exit, reading all
    /// of stdout and stderr meanwhile.
    pub async fn stdio(mut self, input: &[u8]) -> Ran {
        self.0.arg("--stdio").stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = self.0.spawn().unwrap();
        let mut stdin = child.stdin.take().unwrap();
        let input = input.to_vec();
        let writer = tokio::spawn(async move {
            // The process may exit before reading (an error case): a broken pipe is fine.
            let _ = stdin.write_all(&input).await;
        });
        let output = within("wsgate connect --stdio to exit", child.wait_with_output()).await.unwrap();
        writer.await.unwrap();
        Ran {
            stdout: output.stdout,
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
            code: output.status.code(),
        }
    }

    /// Runs with `--listen 127.0.0.1:0` and waits until it says which port it bound.
    pub async fn listen(self) -> Listening {
        let (bound, listening) = self.listen_on("127.0.0.1:0").await;
        Listening { addr: bound.parse().unwrap(), ..listening }
    }

    /// Runs with `--listen SPEC` (`unix:/path`, say) and waits until it says what it bound;
    /// returns that as printed (the `addr` of the `Listening` is then unspecified).
    pub async fn listen_on(mut self, spec: &str) -> (String, Listening) {
        self.0.args(["--listen", spec]).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
        let mut child = self.0.spawn().unwrap();
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let bound = within("wsgate connect to listen", async {
            loop {
                let line = lines.next_line().await.unwrap().expect("wsgate connect exited before listening");
                if let Some(bound) = line.strip_prefix("wsgate connect: listening on ") {
                    return bound.to_string();
                }
            }
        })
        .await;
        // Keep reading, so a chatty log never blocks the process on a full pipe.
        let log = Arc::new(std::sync::Mutex::new(String::new()));
        let kept = log.clone();
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                kept.lock().unwrap().push_str(&line);
                kept.lock().unwrap().push('\n');
            }
        });
        let unspecified = SocketAddr::from(([0, 0, 0, 0], 0));
        (bound, Listening { addr: unspecified, _child: child, log })
    }
}

/// A running `wsgate connect --listen`; killed when dropped.
pub struct Listening {
    pub addr: SocketAddr,
    _child: tokio::process::Child,
    log: Arc<std::sync::Mutex<String>>,
}

impl Listening {
    /// What it has logged so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Waits until its log has a line containing `text`.
    pub async fn logged(&self, text: &str) {
        super::eventually(&format!("wsgate connect to log {text:?}"), || async { self.log().contains(text) }).await;
    }
}

/// An HTTP proxy that serves `CONNECT` only, as corporate proxies do, and counts its tunnels.
pub struct ConnectProxy {
    pub addr: SocketAddr,
    tunnels: Arc<AtomicUsize>,
    _task: JoinHandle<()>,
}

impl ConnectProxy {
    pub async fn start() -> ConnectProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let tunnels = Arc::new(AtomicUsize::new(0));
        let count = tunnels.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                tokio::spawn(tunnel(client, count.clone()));
            }
        });
        ConnectProxy { addr, tunnels, _task: task }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Tunnels opened so far.
    pub fn tunnels(&self) -> usize {
        self.tunnels.load(Ordering::SeqCst)
    }
}

async fn tunnel(mut client: TcpStream, count: Arc<AtomicUsize>) {
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        match client.read_u8().await {
            Ok(b) => head.push(b),
            Err(_) => return,
        }
    }
    let head = String::from_utf8(head).unwrap();
    let mut words = head.split_whitespace();
    let (Some("CONNECT"), Some(target)) = (words.next(), words.next()) else {
        let _ = client.write_all(b"HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\n\r\n").await;
        return;
    };
    let Ok(mut upstream) = TcpStream::connect(target).await else {
        let _ = client.write_all(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n").await;
        return;
    };
    count.fetch_add(1, Ordering::SeqCst);
    client.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n").await.unwrap();
    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
}

/// Debian's sshd, run as `sshd -i` for each connection a TCP backend accepts, with a throwaway
/// host key, and a user key authorised for the user running the tests.
pub struct Sshd {
    pub backend: Backend,
    pub dir: TempDir,
    pub user: String,
}

/// Where Debian installs sshd.
const SSHD: &str = "/usr/sbin/sshd";

impl Sshd {
    pub async fn start() -> Sshd {
        assert!(
            std::path::Path::new(SSHD).exists(),
            "{SSHD} is missing: install Debian's openssh-server (scripts/test does)"
        );
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        for key in ["host_key", "id"] {
            let status = std::process::Command::new("ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", "", "-f"])
                .arg(d.join(key))
                .status()
                .unwrap();
            assert!(status.success(), "ssh-keygen failed");
        }
        std::fs::copy(d.join("id.pub"), d.join("authorized_keys")).unwrap();
        let config = format!(
            "HostKey {host}\nAuthorizedKeysFile {auth}\nPubkeyAuthentication yes\nPasswordAuthentication no\n\
             KbdInteractiveAuthentication no\nPermitRootLogin yes\nStrictModes no\nUsePAM no\n\
             Subsystem sftp internal-sftp\nPidFile none\nLogLevel ERROR\n",
            host = d.join("host_key").display(),
            auth = d.join("authorized_keys").display(),
        );
        std::fs::write(d.join("sshd_config"), config).unwrap();
        // sshd's privilege separation directory; Debian's package creates it only at boot.
        let _ = std::fs::create_dir_all("/run/sshd");
        let config_path = d.join("sshd_config");
        let backend = Backend::start(move |s: TcpStream| {
            let config_path = config_path.clone();
            async move {
                let socket = s.into_std().unwrap();
                socket.set_nonblocking(false).unwrap();
                let out = socket.try_clone().unwrap();
                let mut child = tokio::process::Command::new(SSHD)
                    .arg("-i")
                    .arg("-f")
                    .arg(&config_path)
                    .stdin(Stdio::from(std::os::fd::OwnedFd::from(socket)))
                    .stdout(Stdio::from(std::os::fd::OwnedFd::from(out)))
                    .stderr(Stdio::inherit())
                    .kill_on_drop(true)
                    .spawn()
                    .unwrap();
                let _ = child.wait().await;
            }
        })
        .await;
        let user = String::from_utf8(std::process::Command::new("id").arg("-un").output().unwrap().stdout)
            .unwrap()
            .trim()
            .to_string();
        Sshd { backend, dir, user }
    }

    /// The options every ssh/scp run here takes: our key only, no host key checks, and the
    /// gateway reached through `wsgate connect --stdio url`.
    pub fn options(&self, url: &str) -> Vec<String> {
        let id: PathBuf = self.dir.path().join("id");
        [
            "-F",
            "/dev/null",
            "-i",
            &id.display().to_string(),
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "BatchMode=yes",
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "LogLevel=ERROR",
            "-o",
            &format!("ProxyCommand={BIN} connect --stdio {url}"),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }
}
