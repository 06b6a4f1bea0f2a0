//! Headless Chromium, driven over the Chrome DevTools Protocol (CDP) with the same WebSocket
//! client the other tests use: no WebDriver, no Node, nothing downloaded at run time.
//!
//! Chromium comes from the system (`apt-get install chromium`, which `./scripts/test` does).
//! A missing browser is a test failure with instructions, never a silent skip.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tempfile::TempDir;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use super::within;

/// JavaScript helpers every test page gets: `wsgateScenario(url, options)` records each event a
/// WebSocket fires (with `readyState`, data, close `code`/`reason`/`wasClean`) until `onclose`.
pub const HELPERS: &str = include_str!("scenario.js");

fn find_chromium() -> PathBuf {
    if let Ok(p) = std::env::var("WSGATE_CHROMIUM") {
        return PathBuf::from(p);
    }
    for p in ["/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome"] {
        if Path::new(p).exists() {
            return PathBuf::from(p);
        }
    }
    panic!(
        "Chromium not found: the browser tests need it. Install it with `apt-get install chromium` \
         (./scripts/test does this for you) or point WSGATE_CHROMIUM at a Chromium binary."
    );
}

/// One headless Chromium process and a CDP connection to it.
pub struct Browser {
    child: tokio::process::Child,
    cdp: WebSocketStream<MaybeTlsStream<TcpStream>>,
    next_id: u64,
    _profile: TempDir,
}

/// A tab, addressed by its CDP session.
pub struct Tab {
    session: String,
}

impl Tab {
    /// The tab's CDP session, for [`Browser::call`].
    pub fn session(&self) -> &str {
        &self.session
    }
}

impl Browser {
    pub async fn launch() -> Browser {
        let profile = tempfile::tempdir().unwrap();
        let mut child = tokio::process::Command::new(find_chromium())
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-extensions",
                "--remote-debugging-port=0",
                "--window-size=1000,900",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("start chromium");
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let url = within("chromium's DevTools address", async {
            loop {
                match lines.next_line().await {
                    Ok(Some(line)) => {
                        if let Some(url) = line.strip_prefix("DevTools listening on ") {
                            return url.trim().to_string();
                        }
                    }
                    _ => panic!("chromium exited before printing its DevTools address"),
                }
            }
        })
        .await;
        // Keep draining stderr so Chromium never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let (cdp, _) = within("CDP connect", tokio_tungstenite::connect_async(url)).await.expect("connect to CDP");
        Browser { child, cdp, next_id: 1, _profile: profile }
    }

    /// Sends a CDP command (to a tab when `session` is given) and returns its result.
    pub async fn call(&mut self, session: Option<&str>, method: &str, params: Value) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        let mut msg = json!({ "id": id, "method": method, "params": params });
        if let Some(s) = session {
            msg["sessionId"] = json!(s);
        }
        self.cdp.send(Message::text(msg.to_string())).await.expect("CDP send");
        within(&format!("CDP {method}"), async {
            loop {
                let frame = self.cdp.next().await.expect("CDP closed").expect("CDP read");
                let Message::Text(text) = frame else { continue };
                let v: Value = serde_json::from_str(&text).unwrap();
                if v["id"] == json!(id) {
                    if let Some(e) = v.get("error") {
                        panic!("CDP {method} failed: {e}");
                    }
                    return v["result"].clone();
                }
            }
        })
        .await
    }

    /// Opens `url` in a new tab, waits for it to load, and installs the scenario helpers.
    pub async fn open(&mut self, url: &str) -> Tab {
        let target = self.call(None, "Target.createTarget", json!({ "url": "about:blank" })).await;
        let target_id = target["targetId"].as_str().unwrap().to_string();
        let attached =
            self.call(None, "Target.attachToTarget", json!({ "targetId": target_id, "flatten": true })).await;
        let tab = Tab { session: attached["sessionId"].as_str().unwrap().to_string() };
        self.call(Some(&tab.session), "Page.enable", json!({})).await;
        self.call(Some(&tab.session), "Page.navigate", json!({ "url": url })).await;
        // Wait until the document has loaded (polling; CDP events are not tracked here).
        within(&format!("page {url} to load"), async {
            loop {
                let state = self.eval(&tab, "document.readyState").await;
                let href = self.eval(&tab, "location.href").await;
                if state == json!("complete") && href == json!(url) {
                    break;
                }
                // Spaces the polls of this bounded wait for the load.
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        })
        .await;
        self.eval(&tab, HELPERS).await;
        tab
    }

    /// Evaluates `expression` in the tab, awaiting a promise, and returns its JSON value. A
    /// thrown exception fails the test with the message.
    pub async fn eval(&mut self, tab: &Tab, expression: &str) -> Value {
        let r = self
            .call(
                Some(&tab.session),
                "Runtime.evaluate",
                json!({ "expression": expression, "awaitPromise": true, "returnByValue": true }),
            )
            .await;
        if let Some(e) = r.get("exceptionDetails") {
            panic!("javascript threw: {e}\nexpression: {expression}");
        }
        r["result"].get("value").cloned().unwrap_or(Value::Null)
    }

    /// Saves a PNG screenshot of the tab to `path` (a test artifact, not committed).
    pub async fn screenshot(&mut self, tab: &Tab, path: &Path) {
        let r = self.call(Some(&tab.session), "Page.captureScreenshot", json!({ "format": "png" })).await;
        let png = base64_decode(r["data"].as_str().unwrap());
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, png).unwrap();
    }

    pub async fn close(mut self) {
        let _ = self.cdp.send(Message::text(json!({"id": 0, "method": "Browser.close"}).to_string())).await;
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), self.child.wait()).await;
    }
}

fn base64_decode(s: &str) -> Vec<u8> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.decode(s).unwrap()
}
