//! `wsgate probe` (the container image's health check) run as a process against a real
//! gateway's admin listener: a 2xx is exit 0 and silence; anything else is exit 1 and one line
//! on stderr naming the URL and what went wrong.

use std::time::Duration;

use crate::support::*;

/// Runs `wsgate probe ARGS...` and returns (exit code, stderr). Async: the gateway it probes
/// runs on this test's runtime.
async fn probe(args: &[&str]) -> (i32, String) {
    let out = within(
        "wsgate probe",
        tokio::process::Command::new(env!("CARGO_BIN_EXE_wsgate")).arg("probe").args(args).output(),
    )
    .await
    .expect("run wsgate probe");
    (out.status.code().expect("exited"), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// Healthy: `/healthz` and `/readyz` are 0. Draining: `/readyz` (503) is 1 while `/healthz`
/// stays 0. Not 2xx (404), a refused port and a silent peer are 1, each with one line.
#[tokio::test]
async fn probe_exit_codes_against_the_admin_listener() {
    let toml = Gateway::builder().route("echo", "/echo", "builtin:echo").deadline_secs(120.0).toml();
    // A long drain delay keeps the gateway draining (and its admin listener up) for the test.
    let gw = Gateway::from_toml(&toml.replace("drain_delay_secs = 0", "drain_delay_secs = 60")).await;
    let url = |path: &str| format!("http://{}{path}", gw.admin);

    assert_eq!(probe(&[&url("/healthz")]).await, (0, String::new()));
    eventually("ready", || async { probe(&[&url("/readyz")]).await.0 == 0 }).await;

    let (code, err) = probe(&[&url("/nope")]).await;
    assert_eq!(code, 1, "{err}");
    assert_eq!(err, format!("wsgate probe: {}: HTTP 404 Not Found\n", url("/nope")));

    gw.shutdown.drain();
    eventually("/readyz turns 503", || async { admin_get(&gw, "/readyz").await.0 == 503 }).await;
    let (code, err) = probe(&[&url("/readyz")]).await;
    assert_eq!((code, err.lines().count()), (1, 1), "{err}");
    assert!(err.contains("HTTP 503 Service Unavailable"), "{err}");
    assert_eq!(probe(&[&url("/healthz")]).await, (0, String::new()), "alive while draining");

    // Refused: a port bound (so nobody else takes it) but not listening.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let closed = socket.local_addr().unwrap();
    let (code, err) = probe(&[&format!("http://{closed}/healthz")]).await;
    assert_eq!((code, err.lines().count()), (1, 1), "{err}");
    assert!(err.contains(&format!("connect {closed}: ")), "{err}");

    // Accepts but never answers: the deadline ends it, within --timeout-secs (and not at once).
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_url = format!("http://{}/healthz", silent.local_addr().unwrap());
    let started = std::time::Instant::now();
    let (code, err) = probe(&["--timeout-secs", "1", &silent_url]).await;
    let took = started.elapsed();
    assert_eq!((code, err.lines().count()), (1, 1), "{err}");
    assert!(err.contains("no answer within 1s"), "{err}");
    assert!(took >= Duration::from_secs(1) && took < Duration::from_secs(4), "took {took:?}");

    // Usage errors are clap's (exit 2); a URL that is not plain http is 1 with its reason.
    let (code, err) = probe(&["https://127.0.0.1:9090/healthz"]).await;
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("https is not supported"), "{err}");
}
