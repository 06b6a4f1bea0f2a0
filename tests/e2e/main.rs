//! wsgate's integration tests: one binary, so it links once.
//!
//! Every test starts a real gateway in-process on 127.0.0.1:0 and talks to it over real sockets
//! with real WebSocket clients (tokio-tungstenite, rustls) and real TCP backends.

mod support;

/// The admin listener over TLS with bearer tokens; probes open.
mod admin_auth;
/// Credentials per route: bearer tokens, JWTs, HTTP Basic, carriers, the brute-force guard.
mod auth;
/// Backend transports: Unix sockets (path, abstract) and TLS to the backend, byte for byte;
/// untrusted certificates refused; close_notify required; `wsgate check`.
mod backends;
/// WebSocket ⇄ TCP through the bridge: payloads byte for byte, ws and wss, concurrency, framing.
mod bridging;
/// The browser contract in headless Chromium: events, codes, reasons, the console page.
mod browser;
/// `wsgate connect`: stdio with half-close, --listen over ws/wss/unix, a CONNECT proxy, sshd,
/// errors, mTLS, headers, subprotocols, pings, token carriers, `half_close = false`.
mod client;
/// Route client rules (`clients` allow/deny): 403 before the dial, by the forwarded address too.
mod client_rules;
/// How sessions end: backend EOF, client close, backend down or reset, shutdown, limits.
mod closing;
/// The closing handshake on the raw socket: the gateway's FIN follows the crossed close frames.
mod closing_handshake;
/// The built-in `/echo` backend: messages come back as sent.
mod echo;
/// Answers before the upgrade: 404, 426, 400, 405, 403.
mod handshake;
/// Identity in the PROXY v2 header to the backend: the user (TLV 0xE0) and the certificate's CN.
mod identity;
/// Pings and the pong timeout, idle and lifetime limits, the message-rate cap, TCP_USER_TIMEOUT.
mod liveness;
/// mTLS: client certificates verified in the TLS handshake, matched per route (`client_certs`).
mod mtls;
/// Metrics over HTTP, health and readiness, graceful drain, hot reload.
mod operations;
/// Pools: balancing, failover, health checks, drain and session caps per backend.
mod pools;
/// `wsgate probe`: exit codes against a real admin listener (healthy, draining, refused, silent).
mod probe;
/// Property tests of the request path up to admission, through the fuzz target's harness.
mod properties;
/// Client addresses: PROXY protocol in (trusted balancers only) and out, X-Forwarded-For.
mod proxy_protocol;
/// TLS session resumption: tickets kept across reloads, keys shared by replicas and rotated.
mod resumption;
/// No token, password, JWT or key in any log line (at trace, text and JSON) or metric.
mod secrets;
/// Start-up: config fixtures, the shipped config.toml, development certificates, bind errors.
mod startup;
/// Token-mapped targets: map files (TOML, websockify), JWT claims, reload, the allow-list, noVNC.
mod targets;
/// Reload on file change: ConfigMap/Secret-style symlink swaps of the config, tokens, map and
/// certificate files; bad files refused once; `watch = false`; the binary.
mod watch;
