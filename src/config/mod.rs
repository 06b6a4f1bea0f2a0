//! `config.toml` → a validated [`Config`].
//!
//! Loading happens in two stages, as ripgrep does with its flags: serde reads the file into `Raw*`
//! structs that mirror the TOML exactly (`raw`: unknown keys rejected), then `validate` checks
//! every value and builds ready-to-use types (`SocketAddr`, `Duration`, compiled routes), so that
//! runtime code never meets an `Option` meaning "use the default". Every default lives in
//! `validate`, and is repeated in `docs/config.md` and the shipped `config.toml`. This file holds
//! the validated types, [`load`] and [`parse`]; `error` holds [`ConfigError`] and how a toml
//! error becomes one.
//!
//! Errors name the file, the key and the problem on one line (`config.toml: routes.vnc.backend:
//! "localhost" has no port`), with toml's line and column when the file did not parse, and with
//! the value's line and column when it is not one of a fixed set. Validation collects every
//! problem rather than stopping at the first, so `wsgate check` can list them all.
//!
//! Whether a running gateway may change a key on reload is declared once per key in `keys`;
//! [`restart_required`] only walks that list.
//!
//! This module knows nothing of sockets or of the rest of wsgate: it is data in, data out.

mod addresses;
mod auth;
mod error;
mod keys;
mod pool;
#[cfg(test)]
mod proptests;
mod raw;
mod targets;
mod validate;

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

pub use addresses::{Addressing, Cidrs, ClientRules, ForwardedHeader, ProxyVersion, canonical_ip};
pub use auth::{Auth, Basic, Bearer, Jwt, JwtAlgorithm, Mechanism, OnRefusal, TokenHash};
pub use error::{ConfigError, ConfigErrors};
pub use pool::{ActiveCheck, Balance, Health, Member, Pool};
pub use targets::{MapFormat, PortRanges, TargetSource, Targets, TokenSource};
pub use validate::{normalize_origin, split_host_port};

/// A whole, validated configuration: what one gateway instance runs.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file this was loaded from; used in messages and to resolve relative paths.
    pub path: PathBuf,
    /// Client-facing listeners, in name order. Never empty.
    pub listeners: Vec<Listener>,
    /// Routes, in name order. Never empty. Matching order is decided by the router, not by this.
    pub routes: Vec<Route>,
    /// Bounds on connections, handshakes, messages and buffers.
    pub limits: Limits,
    /// Built-in helper services (the TCP echo).
    pub builtin: Builtin,
    /// How a shutdown proceeds.
    pub shutdown: Shutdown,
    /// Path of the built-in test console page, when enabled.
    pub console: Option<String>,
    /// Address of the admin listener (`/metrics`, `/healthz`, `/readyz`), when enabled.
    pub admin: Option<SocketAddr>,
    /// How log lines are written (`[log]`).
    pub log: Log,
    /// Whether metrics are recorded (`[metrics] enabled`, default true).
    pub metrics: bool,
    /// Who may read the admin listener: its TLS and bearer tokens (`[admin]`).
    pub admin_access: AdminAccess,
    /// Whether and how often the files are watched for changes (`[reload]`).
    pub reload: Reload,
}

/// `[reload]`: reloading when the config file, or a file it names, changes (SIGHUP always
/// reloads). Applied by every reload: the watcher reads it from the running config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reload {
    /// Poll the files' metadata and reload on a change (`watch`, default true).
    pub watch: bool,
    /// How often (`watch_interval_secs`, default 2, 1..=3600).
    pub watch_interval: Duration,
}

/// `[log]`: how log lines are written. Both need a restart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Log {
    /// Text or JSON lines (`format`, default text).
    pub format: LogFormat,
    /// Lines waiting for the log's reader, past which new ones are dropped and counted
    /// (`max_buffered_lines`, default 10,000).
    pub max_buffered_lines: usize,
}

/// How a log line is formatted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable text.
    Text,
    /// One JSON object per line.
    Json,
}

/// One client-facing listener: plain `ws` or, with TLS, `wss`.
#[derive(Debug, Clone)]
pub struct Listener {
    /// The name under `[listeners.NAME]`.
    pub name: String,
    /// Address to bind.
    pub address: SocketAddr,
    /// Present for `wss` listeners.
    pub tls: Option<TlsFiles>,
    /// How it learns its clients' addresses: PROXY protocol, trusted proxies, forwarded header.
    pub addressing: Addressing,
}

impl Listener {
    /// `"wss"` for TLS listeners, `"ws"` otherwise.
    pub fn scheme(&self) -> &'static str {
        if self.tls.is_some() { "wss" } else { "ws" }
    }
}

/// Certificate files of a `wss` listener; paths already resolved against the config's directory.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// Generate a self-signed development pair when both files are missing.
    pub generate_self_signed: bool,
    /// Client certificates (mTLS), when the listener asks for them (`client_ca`).
    pub client_auth: Option<ClientAuth>,
    /// Stateless session tickets (`session_tickets`, default on).
    pub session_tickets: bool,
    /// A file of ticket keys shared by a fleet (`ticket_keys`); rotating keys of our own without.
    pub ticket_keys: Option<PathBuf>,
}

/// How a `wss` listener verifies client certificates (`tls.client_ca`, `client_auth`,
/// `client_crls`); paths resolved against the config's directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientAuth {
    /// PEM file of the CA certificates client certificates must chain to.
    pub ca: PathBuf,
    /// Whether a client must present a certificate.
    pub mode: ClientAuthMode,
    /// PEM files of certificate revocation lists; a certificate they revoke fails the handshake.
    pub crls: Vec<PathBuf>,
}

/// Whether a client certificate is required on a listener with `client_ca`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClientAuthMode {
    /// No certificate (or one that fails verification): the TLS handshake fails.
    Required,
    /// No certificate is allowed (routes with `client_certs` then answer 403); one that fails
    /// verification still fails the handshake.
    Optional,
}

/// One entry of a route's `client_certs`: what a verified client certificate must carry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CertPattern {
    /// `CN=value`: the subject's common name, exactly (case-sensitive).
    CommonName(String),
    /// `name` or `*.suffix`: a DNS name in the subject alternative names (case-insensitive).
    Dns(HostPattern),
    /// `URI:value`: a URI in the subject alternative names, exactly (SPIFFE IDs, for example).
    Uri(String),
}

impl fmt::Display for CertPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CertPattern::CommonName(cn) => write!(f, "CN={cn}"),
            CertPattern::Dns(name) => write!(f, "{name}"),
            CertPattern::Uri(uri) => write!(f, "URI:{uri}"),
        }
    }
}

/// `[admin]`'s access keys: TLS and bearer tokens. With no token configured the admin listener
/// is open, as before.
#[derive(Debug, Clone, Default)]
pub struct AdminAccess {
    /// Serve the admin endpoints over TLS with this certificate and key.
    pub tls: Option<AdminTls>,
    /// SHA-256 hashes of the tokens accepted (`token_hashes`).
    pub token_hashes: Vec<TokenHash>,
    /// A file of more hashes, one per line, read at start and on each reload.
    pub tokens_file: Option<PathBuf>,
    /// Paths served without a token (`/healthz` and `/readyz` by default).
    pub open_paths: Vec<String>,
}

/// The admin listener's certificate and key files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminTls {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
}

/// One route: which requests it takes and where their sessions go.
#[derive(Debug, Clone)]
pub struct Route {
    /// The name under `[routes.NAME]`; used in logs and metric labels.
    pub name: String,
    /// URL path to match, always starting with `/`.
    pub path: String,
    /// How `path` is compared with the request's path.
    pub path_match: PathMatch,
    /// `Host` the request must carry, if any.
    pub host: Option<HostPattern>,
    /// Where sessions on this route are bridged to.
    pub backend: Backend,
    /// Browser origins allowed besides the request's own.
    pub allowed_origins: AllowedOrigins,
    /// WebSocket message types accepted from the client.
    pub accept: Accept,
    /// WebSocket message type used for bytes coming from the backend.
    pub outbound: Outbound,
    /// `Sec-WebSocket-Protocol` values the route accepts, in the route's order. Empty: the route
    /// selects none, and a client that requires one is refused.
    pub subprotocols: Vec<String>,
    /// How a client learns that the backend could not be reached.
    pub on_backend_unavailable: Unavailable,
    /// Which client addresses may use the route; checked before anything else.
    pub clients: ClientRules,
    /// The PROXY protocol header sent to the backend before any other byte, if any.
    pub proxy_protocol: Option<ProxyVersion>,
    /// What its requests and sessions run under: `[limits]` with the route's own `limits`
    /// table applied.
    pub limits: SessionLimits,
    /// Credentials the route asks for (`[routes.NAME.auth]`), if any.
    pub auth: Option<Auth>,
    /// What a client the access policy refuses sees (`on_refusal`).
    pub on_refusal: OnRefusal,
    /// When not empty, a request needs a verified client certificate matching one of these.
    pub client_certs: Vec<CertPattern>,
    /// TLS to the backend (`[routes.NAME.backend_tls]`), if any.
    pub backend_tls: Option<BackendTls>,
    /// Whether the gateway agrees to the wsgate control channel (`crate::control`: half-close)
    /// when a client asks for it (`half_close`, default true).
    pub half_close: bool,
}

/// Which client message types a route accepts; at least one is true.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Accept {
    /// Text messages (sent to the backend as their UTF-8 bytes).
    pub text: bool,
    /// Binary messages.
    pub binary: bool,
}

/// How a route's `path` is compared with a request path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PathMatch {
    /// The whole path must be equal.
    Exact,
    /// The path must equal the route path or continue it after a `/` (so `/vnc` matches `/vnc`,
    /// `/vnc/` and `/vnc/a`, but not `/vncx`).
    Prefix,
}

/// A `Host` pattern: an exact name or `*.suffix` for any name below `suffix`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostPattern {
    /// Exact, lower-case host name (no port).
    Exact(String),
    /// Lower-case suffix including the leading dot (`.example.com`).
    Wildcard(String),
}

impl HostPattern {
    /// Whether `host` (lower-case, port already removed) matches.
    pub fn matches(&self, host: &str) -> bool {
        match self {
            HostPattern::Exact(name) => host == name,
            HostPattern::Wildcard(suffix) => host.len() > suffix.len() && host.ends_with(suffix.as_str()),
        }
    }
}

impl fmt::Display for HostPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostPattern::Exact(name) => f.write_str(name),
            HostPattern::Wildcard(suffix) => write!(f, "*{suffix}"),
        }
    }
}

/// Where a route's sessions go. An enum resolved per session, so that new kinds (Unix sockets,
/// TLS backends, pools) arrive as new variants without changing configs users already wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backend {
    /// A TCP service; the host is resolved at connect time and every address is tried.
    Tcp {
        /// Host name or IP literal (IPv6 without brackets).
        host: String,
        /// TCP port, never 0.
        port: u16,
    },
    /// wsgate answers each message with the same message (`builtin:echo`).
    Echo,
    /// Several backends, one picked per session (`backends`, `balance`, `[health]`).
    Pool(std::sync::Arc<Pool>),
    /// A target chosen per session by a token (`[routes.NAME.targets]`), within an allow-list.
    Mapped(Box<Targets>),
    /// A stream Unix socket (`unix:/path` or, on Linux, `unix:@name`).
    Unix(UnixAddr),
}

/// Where a Unix-socket backend listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UnixAddr {
    /// A socket file (relative paths resolved against the config file's directory).
    Path(PathBuf),
    /// A Linux abstract socket, named without the leading NUL byte.
    Abstract(String),
}

impl fmt::Display for UnixAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UnixAddr::Path(path) => write!(f, "unix:{}", path.display()),
            UnixAddr::Abstract(name) => write!(f, "unix:@{name}"),
        }
    }
}

/// TLS to a route's backends (`[routes.NAME.backend_tls]`): the files are read by
/// `backend::tls::load`, at start, on each reload and by `wsgate check`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendTls {
    /// The name sent in SNI and checked against the certificate; `None`: the backend's host.
    pub server_name: Option<String>,
    /// PEM file of the CAs to trust; `None`: the bundled web PKI roots.
    pub ca: Option<PathBuf>,
    /// PEM certificate chain and key presented to the backend, if any.
    pub client_cert: Option<(PathBuf, PathBuf)>,
    /// Accept any certificate (the handshake still runs); warned about at every load.
    pub insecure: bool,
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Backend::Tcp { host, port } if host.contains(':') => write!(f, "[{host}]:{port}"),
            Backend::Tcp { host, port } => write!(f, "{host}:{port}"),
            Backend::Echo => f.write_str("builtin:echo"),
            Backend::Pool(pool) => write!(f, "{pool}"),
            Backend::Mapped(targets) => write!(f, "{targets}"),
            Backend::Unix(addr) => addr.fmt(f),
        }
    }
}

/// Browser origins a route accepts besides the request's own origin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AllowedOrigins {
    /// Any origin (`["*"]`).
    Any,
    /// These origins, normalised to lower-case `scheme://host[:port]` without default ports.
    List(Vec<String>),
}

/// WebSocket message type for bytes read from the backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outbound {
    /// Binary messages (noVNC, MQTT, most TCP protocols).
    Binary,
    /// Text messages; backend bytes must be UTF-8.
    Text,
    /// The type of the client's last message (binary until it sends one); text as above.
    Mirror,
}

/// What a client sees when the backend cannot be reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Unavailable {
    /// Complete the upgrade, then close at once with 1013 and the reason (a page can read it).
    Close,
    /// Refuse the upgrade with HTTP 502 (refused), 504 (timed out) or 503 (other).
    Http,
}

/// Bounds on what one gateway instance holds. Each has a documented default (docs/config.md).
#[derive(Debug, Clone)]
pub struct Limits {
    /// Client sockets open at once, handshaking or upgraded. Beyond it new sockets get a 503
    /// (a few, on `ws` listeners) or are closed.
    pub max_connections: usize,
    /// Client sockets in the TLS handshake or reading their request at once. A new socket
    /// beyond it waits for a place.
    pub max_handshakes: usize,
    /// How long a place in the handshake pool is its connection's own: held longer while
    /// others wait, it may be given to one of them.
    pub handshake_shed_after: Duration,
    /// Time a client has from connect to a complete HTTP request (TLS included).
    pub handshake_timeout: Duration,
    /// Time a client has, once its TLS handshake is done (from the accept on `ws`), to send
    /// its complete request head.
    pub request_head_timeout: Duration,
    /// Backlog of each client-facing listening socket.
    pub listen_backlog: u32,
    /// Resident memory above which new sessions are shed.
    pub max_memory: MemoryBudget,
    /// Largest PROXY protocol v2 header accepted (the 16-byte prefix included); a longer one
    /// closes the connection.
    pub proxy_header_max_bytes: usize,
    /// What one client may hold and open.
    pub per_client: PerClient,
    /// What every route's sessions run under unless the route says otherwise.
    pub session: SessionLimits,
    /// Password hashes (HTTP Basic) checked at once, gateway-wide; beyond it requests get 503.
    pub max_password_checks: usize,
}

/// The limits one route's requests and sessions run under: `[limits]`, with the route's own
/// `limits` table applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionLimits {
    /// Largest message (or frame) accepted from the client.
    pub max_message_bytes: usize,
    /// Size of each client read while data flows; also the most bytes of waiting client
    /// messages joined into one backend write.
    pub client_read_bytes: usize,
    /// Largest single backend read, and so the largest message sent to the client.
    pub backend_read_bytes: usize,
    /// Time allowed to connect the backend, all resolved addresses included.
    pub connect_timeout: Duration,
    /// Time allowed for each closing handshake, and for the message in flight to finish.
    pub close_timeout: Duration,
    /// Idle time before TCP keepalive probes start on client and backend sockets; `None` when
    /// `tcp_keepalive_secs = 0`.
    pub tcp_keepalive: Option<Duration>,
    /// `TCP_USER_TIMEOUT` on client and backend sockets: how long sent data may stay
    /// unacknowledged (or keepalive probes unanswered) before the connection fails; `None` when
    /// `tcp_user_timeout_secs = 0`.
    pub tcp_user_timeout: Option<Duration>,
    /// How often each session pings its client; `None` when `ping_interval_secs = 0`.
    pub ping_interval: Option<Duration>,
    /// How long after a ping reached the client's socket the client must have sent something.
    pub pong_timeout: Duration,
    /// How long a session may carry no data message either way; `None` (the default) for no limit.
    pub idle_timeout: Option<Duration>,
    /// How long a session may last; `None` (the default) for no limit.
    pub max_session: Option<Duration>,
    /// Messages and control frames a client may send per second; `None` when
    /// `max_messages_per_sec = 0`.
    pub max_messages_per_sec: Option<u64>,
    /// Backend connects in progress at once on the route.
    pub max_pending_connects: usize,
    /// Sessions open at once on the route (`None`: no cap of its own). Route tables only.
    pub max_sessions: Option<usize>,
}

/// `[limits.per_client]`: what one client (an IPv4 address, or an IPv6 prefix) may hold and
/// open. A zero turns a cap off.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PerClient {
    /// Connections open at once; beyond it new sockets are closed at accept.
    pub max_connections: usize,
    /// Places in the handshake pool at once; beyond it new connections wait.
    pub max_handshakes: usize,
    /// New connections per second (the bucket's refill rate); beyond it requests are
    /// answered 429.
    pub new_connections_per_sec: f64,
    /// New connections allowed at once (the bucket's size).
    pub new_connections_burst: usize,
    /// IPv6 clients are counted by this many leading bits of their address.
    pub ipv6_prefix: u8,
    /// Clients the table tracks before it forgets idle ones.
    pub max_tracked: usize,
    /// Failed credential checks within `auth_failure_window` after which the client is
    /// refused (429) without checking for `auth_block`; 0 turns the guard off.
    pub max_auth_failures: usize,
    /// The window failures are counted in.
    pub auth_failure_window: Duration,
    /// How long a client over `max_auth_failures` is refused without checking.
    pub auth_block: Duration,
}

/// `limits.max_memory_bytes`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemoryBudget {
    /// Absent: 80 % of the memory the process may use (its cgroup's limit, or the machine's).
    Auto,
    /// `0`: no budget.
    Off,
    /// Bytes of resident memory.
    Bytes(u64),
}

/// Built-in helper services.
#[derive(Debug, Clone, Default)]
pub struct Builtin {
    /// Address of the built-in TCP echo service, when enabled.
    pub tcp_echo: Option<SocketAddr>,
}

/// How shutdown proceeds (SIGTERM; SIGINT skips `drain_delay`).
#[derive(Debug, Clone)]
pub struct Shutdown {
    /// After the signal, `/readyz` answers 503 at once but listeners keep accepting for this
    /// long, so load balancers stop sending new clients first.
    pub drain_delay: Duration,
    /// Then listeners stop and open sessions are closed with 1001, spread over this window.
    pub close_window: Duration,
    /// Counted from the signal: sessions still open then are dropped and the process exits.
    pub deadline: Duration,
}

/// Reads and validates the file at `path`.
pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        ConfigErrors(vec![ConfigError {
            file: path.to_path_buf(),
            position: None,
            key: String::new(),
            problem: format!("cannot read file: {e}"),
        }])
    })?;
    parse(&text, path)
}

/// Validates `text` as if read from `path` (which names the file in errors and anchors relative
/// paths).
pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigErrors> {
    let raw: raw::RawConfig =
        toml::from_str(text).map_err(|e| ConfigErrors(vec![error::toml_error(&e, text, path)]))?;
    validate::validate(raw, text, path)
}

/// The first key changed between `old` and `new` that a running gateway cannot apply, if any,
/// as the reload error names it (`limits.max_connections`, `listeners.NAME.address`).
pub(crate) fn restart_required(old: &Config, new: &Config) -> Option<String> {
    keys::KEYS.iter().find_map(|(_, on_change)| match on_change {
        keys::OnChange::Restart(changed) => changed(old, new),
        keys::OnChange::Reload => None,
    })
}

/// A route with every optional key at its default, for unit tests elsewhere in the crate.
#[cfg(test)]
pub(crate) fn test_route(name: &str, path: &str, backend: Backend) -> Route {
    Route {
        name: name.into(),
        path: path.into(),
        path_match: PathMatch::Exact,
        host: None,
        backend,
        allowed_origins: AllowedOrigins::List(vec![]),
        accept: Accept { text: true, binary: true },
        outbound: Outbound::Binary,
        subprotocols: vec![],
        on_backend_unavailable: Unavailable::Close,
        clients: ClientRules::default(),
        proxy_protocol: None,
        limits: validate::DEFAULT_SESSION_LIMITS,
        auth: None,
        on_refusal: OnRefusal::Http,
        client_certs: vec![],
        backend_tls: None,
        half_close: true,
    }
}

/// Helpers shared by the unit tests of this module's files.
#[cfg(test)]
mod test_support {
    use std::path::Path;

    use super::{Config, parse};

    pub(super) fn ok(text: &str) -> Config {
        parse(text, Path::new("test.toml")).unwrap_or_else(|e| panic!("expected valid config, got:\n{e}"))
    }

    pub(super) fn err(text: &str) -> String {
        match parse(text, Path::new("test.toml")) {
            Ok(_) => panic!("expected an error for:\n{text}"),
            Err(e) => e.to_string(),
        }
    }

    pub(super) const MINIMAL: &str = r#"
[listeners.plain]
address = "127.0.0.1:8080"
[routes.echo]
path = "/echo"
backend = "builtin:echo"
"#;
}
