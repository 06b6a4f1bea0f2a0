//! The real noVNC client (Debian's `novnc` package, its `vnc_lite.html`) in headless Chromium
//! reaches two real VNC servers (`x11vnc` on two `Xvfb` displays, painted different colours with
//! `xsetroot -solid`) through one token-mapped route, and each page's canvas shows its own
//! colour. The packages come from Debian (`apt-get install novnc x11vnc xvfb x11-xserver-utils`,
//! as `.ci/run` does); a missing one fails the test with that instruction.
//!
//! Each VNC server is `x11vnc -inetd` started per connection on a listener the test bound on
//! 127.0.0.1:0 (no port is probed), and the page is served by a static file server of a few
//! lines here, since the gateway serves no files.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio::process::{Child, Command};

use crate::support::browser::{Browser, Tab};
use crate::support::*;

const NOVNC: &str = "/usr/share/novnc";

/// Fails with the install instruction when `path` (from Debian's `package`) is missing.
fn require(path: &str, package: &str) {
    assert!(
        Path::new(path).exists(),
        "{path} not found: install Debian's {package} (apt-get install -y novnc x11vnc xvfb x11-xserver-utils; \
         .ci/run does this)"
    );
}

/// An Xvfb display (it picks a free number and tells it on `-displayfd`) with its root window
/// painted `colour`.
async fn display(colour: &str) -> (Child, u32) {
    let mut xvfb = Command::new("Xvfb")
        // `-noreset`: an X server resets when its last client leaves, which would clear the
        // colour xsetroot (its only client until x11vnc) leaves behind.
        .args(["-displayfd", "1", "-screen", "0", "320x240x24", "-nolisten", "tcp", "-noreset"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("start Xvfb");
    let mut lines = BufReader::new(xvfb.stdout.take().unwrap()).lines();
    let number = within("Xvfb's display number", lines.next_line()).await.unwrap().expect("Xvfb exited");
    let number: u32 = number.trim().parse().unwrap();
    let status = within(
        "xsetroot",
        Command::new("xsetroot").args(["-display", &format!(":{number}"), "-solid", colour]).status(),
    )
    .await
    .expect("run xsetroot");
    assert!(status.success(), "xsetroot -solid {colour} on :{number}: {status}");
    (xvfb, number)
}

/// A VNC server for `display`: a listener on 127.0.0.1:0 that hands each connection to
/// `x11vnc -inetd` as its stdin and stdout. The servers live as long as the returned list.
async fn vnc_server(display: u32) -> (SocketAddr, Arc<Mutex<Vec<Child>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let servers = Arc::new(Mutex::new(Vec::new()));
    let kept = servers.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let stream = stream.into_std().unwrap();
            stream.set_nonblocking(false).unwrap();
            let fd = std::os::fd::OwnedFd::from(stream);
            let out = fd.try_clone().unwrap();
            // `-q` with `-inetd` and no `-o` closes stderr, so nothing but RFB reaches the socket.
            let child = Command::new("x11vnc")
                .args(["-q", "-inetd", "-display", &format!(":{display}"), "-nopw", "-noshm", "-once"])
                .stdin(Stdio::from(fd))
                .stdout(Stdio::from(out))
                .stderr(Stdio::null())
                .kill_on_drop(true)
                .spawn()
                .expect("start x11vnc");
            kept.lock().unwrap().push(child);
        }
    });
    (addr, servers)
}

/// Serves the files under `root` over HTTP/1.1 on 127.0.0.1:0, one request per connection.
async fn static_server(root: &'static str) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut head = Vec::new();
                while !head.ends_with(b"\r\n\r\n") {
                    let mut byte = [0u8];
                    if s.read(&mut byte).await.unwrap_or(0) == 0 {
                        return;
                    }
                    head.push(byte[0]);
                }
                let head = String::from_utf8_lossy(&head);
                let target = head.split(' ').nth(1).unwrap_or("/");
                let path = target.split(['?', '#']).next().unwrap_or("/");
                let file = (!path.contains("..")).then(|| Path::new(root).join(path.trim_start_matches('/')));
                let response = match file.and_then(|f| std::fs::read(&f).ok().map(|body| (f, body))) {
                    Some((f, body)) => {
                        let kind = match f.extension().and_then(|e| e.to_str()) {
                            Some("html") => "text/html; charset=utf-8",
                            Some("js") => "text/javascript",
                            Some("css") => "text/css",
                            Some("svg") => "image/svg+xml",
                            Some("png") => "image/png",
                            _ => "application/octet-stream",
                        };
                        let head =
                            format!("HTTP/1.1 200 OK\r\nContent-Type: {kind}\r\nContent-Length: {}\r\n", body.len());
                        let mut r = format!("{head}Connection: close\r\n\r\n").into_bytes();
                        r.extend_from_slice(&body);
                        r
                    }
                    None => b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_vec(),
                };
                let _ = s.write_all(&response).await;
            });
        }
    });
    addr
}

/// The RGB of the middle pixel of noVNC's canvas, once it has one.
const CANVAS_PIXEL: &str = "(() => { const c = document.querySelector('#screen canvas'); \
    if (!c || c.width < 2) return null; \
    const d = c.getContext('2d').getImageData(c.width >> 1, c.height >> 1, 1, 1).data; \
    return [d[0], d[1], d[2]]; })()";

/// Waits (bounded) until the middle of `tab`'s noVNC canvas is `expected`, and its status line
/// says it is connected.
async fn shows(browser: &mut Browser, tab: &Tab, colour: &str, expected: Value) {
    let mut last = Value::Null;
    let shown = tokio::time::timeout(WAIT, async {
        loop {
            last = browser.eval(tab, CANVAS_PIXEL).await;
            if last == expected {
                return;
            }
            // Spaces the polls of this bounded wait for the framebuffer to be drawn.
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    })
    .await;
    let status = browser.eval(tab, "document.getElementById('status').textContent").await;
    assert!(shown.is_ok(), "the {colour} desk's canvas shows {last} (status {status}), not {expected}");
    assert!(status.as_str().is_some_and(|s| s.starts_with("Connected")), "{status}");
}

/// Two noVNC pages, one token each, through one route: each canvas shows its own display's
/// colour (red and blue), so each token reached its own VNC server.
#[tokio::test]
async fn novnc_pages_reach_their_own_desktops_by_token() {
    for (path, package) in [
        ("/usr/bin/Xvfb", "xvfb"),
        ("/usr/bin/x11vnc", "x11vnc"),
        ("/usr/bin/xsetroot", "x11-xserver-utils"),
        ("/usr/share/novnc/vnc_lite.html", "novnc"),
    ] {
        require(path, package);
    }
    let (_red_x, red_display) = display("red").await;
    let (_blue_x, blue_display) = display("blue").await;
    let (red_vnc, _red_servers) = vnc_server(red_display).await;
    let (blue_vnc, _blue_servers) = vnc_server(blue_display).await;
    let pages = static_server(NOVNC).await;
    let dir = tempfile::tempdir().unwrap();
    let map = dir.path().join("desks");
    std::fs::write(&map, format!("red-desk: {red_vnc}\nblue-desk: {blue_vnc}\n")).unwrap();
    let route = format!(
        "[routes.vnc]\npath = \"/vnc/\"\nmatch = \"prefix\"\nallowed_origins = [\"http://{pages}\"]\n\
         [routes.vnc.targets]\nmap_file = {:?}\nallow = [\"127.0.0.1/32\"]\nallow_ports = [{}, {}]\n",
        map.display().to_string(),
        red_vnc.port(),
        blue_vnc.port()
    );
    let gw = Gateway::builder().route_toml(&route).start().await;
    let mut browser = Browser::launch().await;
    let url =
        |token: &str| format!("http://{pages}/vnc_lite.html?host=127.0.0.1&port={}&path=vnc/{token}", gw.plain.port());
    // Each page is checked while it is the tab in front: Chromium does not paint (nor run the
    // animation frames noVNC draws in) for a tab behind another.
    let red_tab = browser.open(&url("red-desk")).await;
    shows(&mut browser, &red_tab, "red", json!([255, 0, 0])).await;
    let blue_tab = browser.open(&url("blue-desk")).await;
    shows(&mut browser, &blue_tab, "blue", json!([0, 0, 255])).await;
    // Both sessions are open at once, and the first page still shows its own desktop.
    browser.call(Some(red_tab.session()), "Page.bringToFront", json!({})).await;
    shows(&mut browser, &red_tab, "red", json!([255, 0, 0])).await;
    assert_eq!(scrape(&gw, "wsgate_handshakes_total", &[("route", "vnc"), ("status", "101")]).await, 2.0);
    browser.close().await;
}
