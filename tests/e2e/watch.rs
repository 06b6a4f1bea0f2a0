//! Reload on file change, without SIGHUP: the config file, a tokens file, a target map file and a
//! listener certificate, each mounted as the kubelet mounts a ConfigMap or Secret and swapped as
//! it swaps them (a new timestamped directory, a new `..data` link renamed over the old one).
//! A bad file is refused once, the running config kept, and a file the refused config expects is
//! watched until it appears; `[reload] watch = false` ignores changes until a reload turns it
//! on; the binary reloads on a change and on SIGHUP alike.
//!
//! Every wait is on an event (a reload counted, a log line). What must *not* happen is shown
//! against a [`Clock`]: a second gateway whose own reloads prove that enough polling intervals
//! went by.

use std::path::{Path, PathBuf};

use aws_lc_rs::digest::{SHA256, digest};
use tempfile::TempDir;

use crate::support::*;

/// A directory laid out as the kubelet lays out a mounted ConfigMap or Secret: each key a link
/// `KEY -> ..data/KEY`, `..data` a link to the current timestamped directory.
struct Mounted {
    dir: TempDir,
    version: u32,
}

impl Mounted {
    fn new(files: &[(&str, &str)]) -> Mounted {
        let mut mounted = Mounted { dir: tempfile::tempdir().unwrap(), version: 0 };
        mounted.publish(files);
        mounted
    }

    /// The path a config names: the key's link at the top of the mount.
    fn path(&self, key: &str) -> PathBuf {
        self.dir.path().join(key)
    }

    /// As the kubelet's atomic writer does: the files in a new timestamped directory, a new
    /// `..data` link renamed over the old one (one atomic step), then the old directory removed.
    fn publish(&mut self, files: &[(&str, &str)]) {
        self.version += 1;
        let root = self.dir.path();
        let stamped =
            if self.version == 1 { "..2026_12_04".to_string() } else { format!("..2026_12_04_{:02}", self.version) };
        std::fs::create_dir(root.join(&stamped)).unwrap();
        for (key, text) in files {
            std::fs::write(root.join(&stamped).join(key), text).unwrap();
        }
        let old = std::fs::read_link(root.join("..data")).ok();
        std::os::unix::fs::symlink(&stamped, root.join("..data_tmp")).unwrap();
        std::fs::rename(root.join("..data_tmp"), root.join("..data")).unwrap();
        for (key, _) in files {
            let link = root.join(key);
            if std::fs::symlink_metadata(&link).is_err() {
                std::os::unix::fs::symlink(Path::new("..data").join(key), &link).unwrap();
            }
        }
        if let Some(old) = old {
            std::fs::remove_dir_all(root.join(old)).unwrap();
        }
    }
}

/// A config with a `plain` listener (and `secure` when `tls` names a certificate and key),
/// the admin listener, a one-second watch interval, `reload_extra` in `[reload]`, then `routes`.
fn config(tls: Option<(&Path, &Path)>, reload_extra: &str, routes: &str) -> String {
    let secure = tls
        .map(|(cert, key)| {
            format!(
                "[listeners.secure]\naddress = \"127.0.0.1:0\"\ntls = {{ cert = {:?}, key = {:?} }}\n",
                cert.display().to_string(),
                key.display().to_string()
            )
        })
        .unwrap_or_default();
    format!(
        "[listeners.plain]\naddress = \"127.0.0.1:0\"\n{secure}[admin]\naddress = \"127.0.0.1:0\"\n\
         [shutdown]\ndrain_delay_secs = 0\nclose_window_secs = 0\ndeadline_secs = 5\n\
         [limits.per_client]\nmax_connections = 0\nmax_handshakes = 0\nnew_connections_per_sec = 0\n\
         [reload]\nwatch_interval_secs = 1\n{reload_extra}\n{routes}"
    )
}

fn echo_route(name: &str, path: &str) -> String {
    format!("[routes.{name}]\npath = \"{path}\"\nbackend = \"builtin:echo\"\n")
}

async fn reloads(gw: &Gateway, trigger: &str, result: &str) -> f64 {
    scrape(gw, "wsgate_config_reloads_total", &[("trigger", trigger), ("result", result)]).await
}

/// Waits until `wsgate_config_reloads_total{trigger, result}` reaches `want`.
async fn reloaded(gw: &Gateway, trigger: &str, result: &str, want: f64) {
    eventually(&format!("wsgate_config_reloads_total{{trigger={trigger}, result={result}}} = {want}"), || async {
        reloads(gw, trigger, result).await == want
    })
    .await
}

/// Whether an upgrade on `path` is answered 101 (a session that echoes) or the status it got.
async fn upgrade_status(gw: &Gateway, path: &str, extra: &str) -> u16 {
    raw_http(gw.plain, &upgrade_request(path, extra)).await.0
}

async fn echoes(ws: &mut Ws, seed: u64) {
    let data = payload(10_000, seed);
    send_binary(ws, &data).await;
    assert!(read_bytes(ws, data.len()).await == data, "payload came back altered");
}

fn sha256_hex(token: &str) -> String {
    digest(&SHA256, token.as_bytes()).as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// Log lines that contain every one of `parts`.
fn lines_with(logs: &Logs, parts: &[&str]) -> Vec<String> {
    logs.text().lines().filter(|l| parts.iter().all(|p| l.contains(p))).map(str::to_string).collect()
}

/// Waits until `n` log lines contain every one of `parts` (a reload is counted just before its
/// outcome is logged).
async fn logged(logs: &Logs, parts: &[&str], n: usize) -> Vec<String> {
    eventually(&format!("{n} log line(s) with {parts:?}"), || async { lines_with(logs, parts).len() >= n }).await;
    lines_with(logs, parts)
}

/// Proof that polling intervals went by, without sleeping: a gateway with the same one-second
/// watch interval on its own mounted config, reloaded by its watcher `n` times in a row, each
/// waited for. Its watcher sleeps a full interval after each reload, so `n` reloads span at
/// least `n - 1` intervals, in which any watcher of the same interval polled at least
/// `n - 2` times.
struct Clock {
    mounted: Mounted,
    gw: Gateway,
    ticks: u32,
}

impl Clock {
    async fn start() -> Clock {
        let mounted = Mounted::new(&[("config.toml", &config(None, "", &echo_route("t0", "/t0")))]);
        let gw = Gateway::from_file(&mounted.path("config.toml")).await;
        Clock { mounted, gw, ticks: 0 }
    }

    /// Returns once at least two polling intervals have passed since the call.
    async fn two_intervals(&mut self) {
        for _ in 0..3 {
            self.ticks += 1;
            let route = echo_route(&format!("t{}", self.ticks), &format!("/t{}", self.ticks));
            self.mounted.publish(&[("config.toml", &config(None, "", &route))]);
            reloaded(&self.gw, "watch", "ok", f64::from(self.ticks)).await;
        }
    }
}

/// A ConfigMap-style swap of the config file changes routing for new connections with no
/// SIGHUP, counted as `trigger="watch"` and logged naming the file; a session opened before
/// carries on. A bad config swapped in is refused, counted `result="error"` and logged once
/// (not again at later polls), and the running config keeps working; a good one after it is
/// applied.
#[tokio::test]
async fn configmap_swap_reloads_the_config_and_refuses_a_bad_one_once() {
    let (logs, _guard) = Logs::capture_at(tracing::Level::INFO);
    let mut mounted = Mounted::new(&[("config.toml", &config(None, "", &echo_route("r", "/old")))]);
    let path = mounted.path("config.toml");
    let gw = Gateway::from_file(&path).await;
    let mut before = gw.ws("/old").await;
    echoes(&mut before, 1).await;

    mounted.publish(&[("config.toml", &config(None, "", &echo_route("r", "/new")))]);
    reloaded(&gw, "watch", "ok", 1.0).await;
    let mut after = gw.ws("/new").await;
    echoes(&mut after, 2).await;
    assert_eq!(upgrade_status(&gw, "/old", "").await, 404, "the old route is gone for new requests");
    echoes(&mut before, 3).await;
    let shown = format!("config={}", path.display());
    let applied = logged(&logs, &["file change: config reloaded; new connections use it", &shown], 1).await;
    assert_eq!(applied.len(), 1, "{}", logs.text());
    assert!(applied[0].contains(&format!("file={}", path.display())), "names the changed file: {}", applied[0]);
    assert_eq!(reloads(&gw, "signal", "ok").await, 0.0);

    // One problem: a backend without a port.
    let bad = config(None, "", "[routes.r]\npath = \"/newer\"\nbackend = \"localhost\"\n");
    mounted.publish(&[("config.toml", &bad)]);
    reloaded(&gw, "watch", "error", 1.0).await;
    let rejected = ["file change: reload rejected, the running config stays:", "routes.r.backend", &shown];
    assert_eq!(logged(&logs, &rejected, 1).await.len(), 1, "{}", logs.text());
    let mut kept = gw.ws("/new").await;
    echoes(&mut kept, 4).await;
    assert_eq!(upgrade_status(&gw, "/newer", "").await, 404);
    // Not retried at later polls: the file has not changed since.
    Clock::start().await.two_intervals().await;
    assert_eq!(reloads(&gw, "watch", "error").await, 1.0, "a refused file is not retried until it changes");
    assert_eq!(lines_with(&logs, &rejected).len(), 1, "logged once:\n{}", logs.text());

    mounted.publish(&[("config.toml", &config(None, "", &echo_route("r", "/newer")))]);
    reloaded(&gw, "watch", "ok", 2.0).await;
    let mut newer = gw.ws("/newer").await;
    echoes(&mut newer, 5).await;
    assert_eq!(upgrade_status(&gw, "/new", "").await, 404);
}

/// A tokens file mounted from a Secret and swapped: the new token opens sessions and the old
/// one is refused, without SIGHUP; the log names the tokens file, not the config.
#[tokio::test]
async fn swapped_tokens_file_applies_without_sighup() {
    let (logs, _guard) = Logs::capture_at(tracing::Level::INFO);
    let mut secret = Mounted::new(&[("tokens.txt", &format!("sha256:{}\n", sha256_hex("old-token")))]);
    let route = format!(
        "{}[routes.b.auth]\ntype = \"bearer\"\ntokens_file = {:?}\n",
        echo_route("b", "/b"),
        secret.path("tokens.txt").display().to_string()
    );
    let mounted = Mounted::new(&[("config.toml", &config(None, "", &route))]);
    let gw = Gateway::from_file(&mounted.path("config.toml")).await;
    assert_eq!(upgrade_status(&gw, "/b", "Authorization: Bearer old-token\r\n").await, 101);
    assert_eq!(upgrade_status(&gw, "/b", "Authorization: Bearer new-token\r\n").await, 401);

    secret.publish(&[("tokens.txt", &format!("sha256:{}\n", sha256_hex("new-token")))]);
    reloaded(&gw, "watch", "ok", 1.0).await;
    let mut ws = gw.ws_with("/b", &[("authorization", "Bearer new-token")]).await.expect("the new token opens");
    echoes(&mut ws, 1).await;
    assert_eq!(upgrade_status(&gw, "/b", "Authorization: Bearer old-token\r\n").await, 401);
    let file = format!("file={}", secret.path("tokens.txt").display());
    assert_eq!(logged(&logs, &["file change: config reloaded", &file], 1).await.len(), 1, "{}", logs.text());
}

/// A config refused because a file it names is missing is applied once that file appears: the
/// refused config's files are watched too, though it never ran.
#[tokio::test]
async fn a_file_a_refused_config_expects_is_watched() {
    let mut mounted = Mounted::new(&[("config.toml", &config(None, "", &echo_route("r", "/r")))]);
    let gw = Gateway::from_file(&mounted.path("config.toml")).await;
    let secrets = tempfile::tempdir().unwrap();
    let tokens = secrets.path().join("tokens.txt");
    let route = format!(
        "{}[routes.b.auth]\ntype = \"bearer\"\ntokens_file = {:?}\n",
        echo_route("b", "/b"),
        tokens.display().to_string()
    );
    mounted.publish(&[("config.toml", &config(None, "", &format!("{}{route}", echo_route("r", "/r"))))]);
    reloaded(&gw, "watch", "error", 1.0).await;
    assert_eq!(upgrade_status(&gw, "/b", "").await, 404, "refused: the tokens file is missing");

    std::fs::write(&tokens, format!("sha256:{}\n", sha256_hex("t0k3n"))).unwrap();
    reloaded(&gw, "watch", "ok", 1.0).await;
    assert_eq!(upgrade_status(&gw, "/b", "Authorization: Bearer t0k3n\r\n").await, 101);
}

/// A token-mapped route's map file swapped: new sessions go where the new map says; the old
/// token is unknown.
#[tokio::test]
async fn swapped_map_file_applies_without_sighup() {
    let (one, two) = (Backend::echo().await, Backend::echo().await);
    let mut maps = Mounted::new(&[("map.toml", &format!("\"desk-1\" = \"{}\"\n", one.addr))]);
    let route = format!(
        "[routes.m]\npath = \"/m/\"\nmatch = \"prefix\"\n[routes.m.targets]\nmap_file = {:?}\n\
         allow = [\"127.0.0.1/32\"]\nallow_ports = [\"1-65535\"]\n",
        maps.path("map.toml").display().to_string()
    );
    let mounted = Mounted::new(&[("config.toml", &config(None, "", &route))]);
    let gw = Gateway::from_file(&mounted.path("config.toml")).await;
    let mut ws = gw.ws("/m/desk-1").await;
    echoes(&mut ws, 1).await;
    assert_eq!(one.accepted(), 1);

    maps.publish(&[("map.toml", &format!("\"desk-2\" = \"{}\"\n", two.addr))]);
    reloaded(&gw, "watch", "ok", 1.0).await;
    let mut ws2 = gw.ws("/m/desk-2").await;
    echoes(&mut ws2, 2).await;
    assert_eq!(two.accepted(), 1, "the new map's target got the session");
    assert_eq!(upgrade_status(&gw, "/m/desk-1", "").await, 404, "the old token is gone");
    echoes(&mut ws, 3).await;
}

/// A listener certificate mounted from a Secret (`tls.crt`, `tls.key`) and swapped for one from
/// another CA: new handshakes get the new certificate (only the new CA verifies it), without
/// SIGHUP.
#[tokio::test]
async fn swapped_certificate_serves_new_handshakes() {
    let (ca1, ca2) = (TestCa::new(), TestCa::new());
    let pair = |ca: &TestCa| {
        [std::fs::read_to_string(ca.cert_path()).unwrap(), std::fs::read_to_string(ca.key_path()).unwrap()]
    };
    let [cert1, key1] = pair(&ca1);
    let mut secret = Mounted::new(&[("tls.crt", &cert1), ("tls.key", &key1)]);
    let tls = (secret.path("tls.crt"), secret.path("tls.key"));
    let mounted = Mounted::new(&[("config.toml", &config(Some((&tls.0, &tls.1)), "", &echo_route("r", "/r")))]);
    let gw = Gateway::from_file(&mounted.path("config.toml")).await;
    let secure = gw.secure.unwrap();
    let mut old = wss_connect(secure, &ca1, "/r").await.expect("the first certificate");
    echoes(&mut old, 1).await;

    let [cert2, key2] = pair(&ca2);
    secret.publish(&[("tls.crt", &cert2), ("tls.key", &key2)]);
    reloaded(&gw, "watch", "ok", 1.0).await;
    let mut new = wss_connect(secure, &ca2, "/r").await.expect("new handshakes get the new certificate");
    echoes(&mut new, 2).await;
    let e = wss_connect(secure, &ca1, "/r").await.err().expect("the old certificate is no longer served");
    assert!(e.starts_with("tls:"), "{e}");
    echoes(&mut old, 3).await;
}

/// `[reload] watch = false`: a swapped config is not applied, however long it waits; a SIGHUP
/// reload applies it, and since `[reload]` reloads too, a config turning the watch on makes the
/// next swap apply by itself.
#[tokio::test]
async fn watch_off_ignores_changes_until_a_reload_turns_it_on() {
    let mut mounted = Mounted::new(&[("config.toml", &config(None, "watch = false", &echo_route("r", "/one")))]);
    let path = mounted.path("config.toml");
    let gw = Gateway::from_file(&path).await;
    mounted.publish(&[("config.toml", &config(None, "watch = false", &echo_route("r", "/two")))]);
    Clock::start().await.two_intervals().await;
    assert_eq!(reloads(&gw, "watch", "ok").await + reloads(&gw, "watch", "error").await, 0.0);
    assert_eq!(upgrade_status(&gw, "/two", "").await, 404, "the change was not applied");
    let mut ws = gw.ws("/one").await;
    echoes(&mut ws, 1).await;

    // SIGHUP (the call main makes) applies a config that turns the watch on.
    mounted.publish(&[("config.toml", &config(None, "watch = true", &echo_route("r", "/three")))]);
    gw.reloader.reload_file(&path).expect("reload");
    assert_eq!(reloads(&gw, "signal", "ok").await, 1.0);
    let mut ws = gw.ws("/three").await;
    echoes(&mut ws, 2).await;
    mounted.publish(&[("config.toml", &config(None, "watch = true", &echo_route("r", "/four")))]);
    reloaded(&gw, "watch", "ok", 1.0).await;
    let mut ws = gw.ws("/four").await;
    echoes(&mut ws, 3).await;
}

/// The binary as a user runs it: a swapped config is reloaded and logged as a file change, a
/// SIGHUP as before, and SIGTERM still ends the process (the watcher stops with it).
#[tokio::test]
async fn binary_reloads_on_file_change_and_on_sighup() {
    let mut mounted = Mounted::new(&[("config.toml", &config(None, "", &echo_route("r", "/one")))]);
    let (mut child, mut lines) = run_binary(&mounted.path("config.toml"), "info");
    let mut seen = String::new();
    let mut wait_for = async |what: &str| {
        loop {
            let line = within(what, lines.next_line()).await.unwrap().unwrap_or_else(|| panic!("exited:\n{seen}"));
            seen.push_str(&line);
            seen.push('\n');
            if line.contains(what) {
                return line;
            }
        }
    };
    wait_for("admin listening").await;
    mounted.publish(&[("config.toml", &config(None, "", &echo_route("r", "/two")))]);
    let line = wait_for("file change: config reloaded; new connections use it").await;
    assert!(line.contains("config.toml"), "{line}");
    let pid = child.id().unwrap().to_string();
    assert!(std::process::Command::new("kill").args(["-HUP", &pid]).status().unwrap().success());
    wait_for("SIGHUP: config reloaded; new connections use it").await;
    assert!(std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    wait_for("shutdown complete").await;
    let status = within("exit", child.wait()).await.unwrap();
    assert!(status.success(), "{status}");
}
