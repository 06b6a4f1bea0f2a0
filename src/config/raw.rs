//! Stage one: the TOML exactly as written, read by serde into `Raw*` structs.
//!
//! Every struct denies unknown keys, so a typo is an error naming the key rather than a setting
//! silently ignored. Optional keys stay `Option` here; the defaults and bounds are applied by
//! `validate`, which is the only reader of these types. A key whose value comes from a fixed set
//! is read as a `Choice`, which never fails the parse, so that a value outside the set is
//! reported together with every other problem in the file.
//!
//! `KEYS` sits next to the structs: every key must be declared reloadable or restart-only
//! there, and a unit test reads the key set back from serde to make sure none is left out.

use std::collections::BTreeMap;
use std::fmt;
use std::ops::Range;

use serde::Deserialize;
use serde::de::value::StrDeserializer;
use serde::de::{DeserializeOwned, Deserializer};
use toml::Spanned;

use super::{
    Balance, ClientAuthMode, Config, ForwardedHeader, JwtAlgorithm, LogFormat, MapFormat, OnRefusal, Outbound,
    PathMatch, ProxyVersion, Unavailable,
};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    #[serde(default)]
    pub listeners: BTreeMap<String, RawListener>,
    #[serde(default)]
    pub routes: BTreeMap<String, RawRoute>,
    #[serde(default)]
    pub limits: RawLimits,
    #[serde(default)]
    pub builtin: RawBuiltin,
    #[serde(default)]
    pub shutdown: RawShutdown,
    #[serde(default)]
    pub console: RawConsole,
    #[serde(default)]
    pub admin: RawAdmin,
    #[serde(default)]
    pub log: RawLog,
    #[serde(default)]
    pub metrics: RawMetrics,
    #[serde(default)]
    pub reload: RawReload,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawListener {
    pub address: String,
    pub tls: Option<RawTls>,
    pub proxy_protocol: Option<bool>,
    pub trusted_proxies: Option<Vec<String>>,
    pub forwarded_header: Option<Choice<ForwardedHeader>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTls {
    pub cert: String,
    pub key: String,
    #[serde(default)]
    pub generate_self_signed: bool,
    // mTLS (client certificates).
    pub client_ca: Option<String>,
    pub client_auth: Option<Choice<ClientAuthMode>>,
    pub client_crls: Option<Vec<String>>,
    // Resumption.
    pub session_tickets: Option<bool>,
    pub ticket_keys: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRoute {
    pub path: String,
    #[serde(rename = "match")]
    pub path_match: Option<Choice<PathMatch>>,
    pub host: Option<String>,
    pub backend: Option<String>,
    #[serde(default)]
    pub allowed_origins: Vec<String>,
    pub accept: Option<Vec<Choice<AcceptKind>>>,
    pub outbound: Option<Choice<Outbound>>,
    #[serde(default)]
    pub subprotocols: Vec<String>,
    pub on_backend_unavailable: Option<Choice<Unavailable>>,
    pub limits: Option<RawRouteLimits>,
    pub clients: Option<RawClients>,
    pub proxy_protocol: Option<Choice<ProxyVersion>>,
    pub on_refusal: Option<Choice<OnRefusal>>,
    pub auth: Option<RawAuth>,
    pub client_certs: Option<Vec<String>>,
    // Pools (`backends` instead of `backend`).
    pub backends: Option<Vec<RawMember>>,
    pub balance: Option<Choice<Balance>>,
    pub health: Option<RawHealth>,
    // Token-mapped targets (`targets` instead of `backend`).
    pub targets: Option<RawTargets>,
    pub backend_tls: Option<RawBackendTls>,
    pub half_close: Option<bool>,
}

/// One entry of a route's `backends` list.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawMember {
    pub name: String,
    pub address: String,
    pub weight: Option<u64>,
    pub max_sessions: Option<u64>,
    pub drain: Option<bool>,
}

/// `[routes.NAME.health]`: active checks and passive ejection of a pool's members.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawHealth {
    pub interval_secs: Option<Seconds>,
    pub timeout_secs: Option<Seconds>,
    pub rise: Option<u64>,
    pub fall: Option<u64>,
    pub send: Option<String>,
    pub expect: Option<String>,
    pub eject_after_failures: Option<u64>,
    pub eject_secs: Option<Seconds>,
}

/// `[routes.NAME.targets]`: a backend chosen per session by a token, within an allow-list.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTargets {
    pub token: Option<Choice<TokenKind>>,
    pub query_param: Option<String>,
    pub map_file: Option<String>,
    pub format: Option<Choice<MapFormat>>,
    pub jwt: Option<RawTargetsJwt>,
    pub allow: Option<Vec<String>>,
    pub allow_ports: Option<Vec<RawPorts>>,
}

/// `routes.NAME.targets.token`.
#[derive(Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub(super) enum TokenKind {
    Path,
    Query,
}

/// One `allow_ports` item: a port, or a `"low-high"` range.
#[derive(Deserialize)]
#[serde(untagged)]
pub(super) enum RawPorts {
    One(i64),
    Range(String),
}

/// `[routes.NAME.targets.jwt]`: the key names of `[routes.NAME.auth]` for `type = "jwt"`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTargetsJwt {
    pub keys: Option<Vec<String>>,
    pub jwks_file: Option<String>,
    pub algorithms: Option<Vec<Choice<JwtAlgorithm>>>,
    pub audience: Option<Vec<String>>,
    pub issuer: Option<Vec<String>>,
    pub leeway_secs: Option<Seconds>,
}

/// `[routes.NAME.backend_tls]`: paths as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawBackendTls {
    pub server_name: Option<String>,
    pub ca: Option<String>,
    pub client_cert: Option<String>,
    pub client_key: Option<String>,
    #[serde(default)]
    pub insecure: bool,
}

/// A route's `clients` table: CIDRs as written.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawClients {
    #[serde(default)]
    pub allow: Vec<String>,
    #[serde(default)]
    pub deny: Vec<String>,
}

/// `[routes.NAME.auth]`: one table for every mechanism; validation refuses keys that do not
/// belong to the chosen `type`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAuth {
    #[serde(rename = "type")]
    pub kind: Choice<AuthType>,
    pub realm: Option<String>,
    pub cookie: Option<String>,
    pub query: Option<bool>,
    pub subprotocol_prefix: Option<String>,
    pub tokens: Option<Vec<String>>,
    pub tokens_file: Option<String>,
    pub keys: Option<Vec<String>>,
    pub jwks_file: Option<String>,
    pub algorithms: Option<Vec<Choice<JwtAlgorithm>>>,
    pub audience: Option<Vec<String>>,
    pub issuer: Option<Vec<String>>,
    pub leeway_secs: Option<Seconds>,
    pub routes_claim: Option<String>,
    pub close_at_expiry: Option<bool>,
    pub expiry_grace_secs: Option<Seconds>,
    pub htpasswd: Option<String>,
    pub user_label: Option<bool>,
}

/// `routes.NAME.auth.type`.
#[derive(Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub(super) enum AuthType {
    Bearer,
    Jwt,
    Basic,
}

/// One item of a route's `accept` list.
#[derive(Deserialize, Clone, Copy)]
#[serde(rename_all = "lowercase")]
pub(super) enum AcceptKind {
    Text,
    Binary,
}

/// Declares a limits table: the keys every limits table has (those a route may override), then
/// the table's own. serde's `flatten` cannot be combined with `deny_unknown_fields`, so the
/// shared keys are written into each struct here, once, and [`RawSessionLimits`] is how
/// validation reads them from either table.
macro_rules! limits_table {
    ($(#[$doc:meta])* $name:ident { $($field:ident: $ty:ty),* $(,)? }) => {
        $(#[$doc])*
        #[derive(Deserialize, Default)]
        #[serde(deny_unknown_fields)]
        pub(super) struct $name {
            pub max_message_bytes: Option<u64>,
            pub ws_read_buffer_bytes: Option<u64>,
            pub backend_read_bytes: Option<u64>,
            pub connect_timeout_secs: Option<Seconds>,
            pub close_timeout_secs: Option<Seconds>,
            pub tcp_keepalive_secs: Option<Seconds>,
            pub max_pending_connects: Option<u64>,
            pub tcp_user_timeout_secs: Option<Seconds>,
            pub ping_interval_secs: Option<Seconds>,
            pub pong_timeout_secs: Option<Seconds>,
            pub idle_timeout_secs: Option<Seconds>,
            pub max_session_secs: Option<Seconds>,
            pub max_messages_per_sec: Option<u64>,
            $(pub $field: $ty,)*
        }

        impl $name {
            /// The keys a route may override, as written.
            pub fn session(&self) -> RawSessionLimits {
                RawSessionLimits {
                    max_message_bytes: self.max_message_bytes,
                    ws_read_buffer_bytes: self.ws_read_buffer_bytes,
                    backend_read_bytes: self.backend_read_bytes,
                    connect_timeout_secs: self.connect_timeout_secs,
                    close_timeout_secs: self.close_timeout_secs,
                    tcp_keepalive_secs: self.tcp_keepalive_secs,
                    max_pending_connects: self.max_pending_connects,
                    tcp_user_timeout_secs: self.tcp_user_timeout_secs,
                    ping_interval_secs: self.ping_interval_secs,
                    pong_timeout_secs: self.pong_timeout_secs,
                    idle_timeout_secs: self.idle_timeout_secs,
                    max_session_secs: self.max_session_secs,
                    max_messages_per_sec: self.max_messages_per_sec,
                }
            }
        }
    };
}

/// The keys of `[limits]` that a route's `limits` table may override.
#[derive(Clone, Copy)]
pub(super) struct RawSessionLimits {
    pub tcp_user_timeout_secs: Option<Seconds>,
    pub ping_interval_secs: Option<Seconds>,
    pub pong_timeout_secs: Option<Seconds>,
    pub idle_timeout_secs: Option<Seconds>,
    pub max_session_secs: Option<Seconds>,
    pub max_messages_per_sec: Option<u64>,

    pub max_message_bytes: Option<u64>,
    pub ws_read_buffer_bytes: Option<u64>,
    pub backend_read_bytes: Option<u64>,
    pub connect_timeout_secs: Option<Seconds>,
    pub close_timeout_secs: Option<Seconds>,
    pub tcp_keepalive_secs: Option<Seconds>,
    pub max_pending_connects: Option<u64>,
}

limits_table! {
    /// `[limits]`: the gateway's own bounds, and the defaults of every route's.
    RawLimits {
        max_connections: Option<u64>,
        max_handshakes: Option<u64>,
        handshake_timeout_secs: Option<Seconds>,
        handshake_shed_after_secs: Option<Seconds>,
        request_head_timeout_secs: Option<Seconds>,
        listen_backlog: Option<u64>,
        max_memory_bytes: Option<u64>,
        proxy_header_max_bytes: Option<u64>,
        per_client: Option<RawPerClient>,
        max_password_checks: Option<u64>,
    }
}

limits_table! {
    /// `[routes.NAME.limits]`: one route's overrides, and what only a route has.
    RawRouteLimits {
        max_sessions: Option<u64>,
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPerClient {
    pub max_connections: Option<u64>,
    pub max_handshakes: Option<u64>,
    pub new_connections_per_sec: Option<Seconds>,
    pub new_connections_burst: Option<u64>,
    pub ipv6_prefix: Option<u64>,
    pub max_tracked: Option<u64>,
    pub max_auth_failures: Option<u64>,
    pub auth_failure_window_secs: Option<Seconds>,
    pub auth_block_secs: Option<Seconds>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawBuiltin {
    pub tcp_echo: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawShutdown {
    pub drain_delay_secs: Option<Seconds>,
    pub close_window_secs: Option<Seconds>,
    pub deadline_secs: Option<Seconds>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConsole {
    #[serde(default)]
    pub enabled: bool,
    pub path: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAdmin {
    pub enabled: Option<bool>,
    pub address: Option<String>,
    // Who may read it.
    pub tls: Option<RawAdminTls>,
    pub token_hashes: Option<Vec<String>>,
    pub tokens_file: Option<String>,
    pub open_paths: Option<Vec<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAdminTls {
    pub cert: String,
    pub key: String,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLog {
    pub format: Option<Choice<LogFormat>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawMetrics {
    pub enabled: Option<bool>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawReload {
    pub watch: Option<bool>,
    pub watch_interval_secs: Option<u64>,
}

/// A duration in seconds, written as an integer or a decimal (`5`, `0.25`).
#[derive(Deserialize, Clone, Copy)]
#[serde(untagged)]
pub(super) enum Seconds {
    Whole(i64),
    Fraction(f64),
}

// ---- Reloadable or restart-only: one entry per key. ----

/// What a reload (SIGHUP) does when it finds a key changed.
pub(super) enum OnChange {
    /// The new value applies to connections accepted from then on.
    Reload,
    /// A running gateway cannot change it, so the reload is refused. The function compares the
    /// running config with the new one and names the key that changed (`listeners.NAME` with
    /// the listener's name filled in), or returns `None` when it did not.
    Restart(fn(&Config, &Config) -> Option<String>),
}

use OnChange::{Reload, Restart};

/// Every key of the file (`NAME` standing for a listener or route name), in file order, which is
/// also the order in which restart-only changes are looked for. A unit test compares this list
/// with the keys the structs above accept, so a new key cannot go unclassified.
pub(super) const KEYS: &[(&str, OnChange)] = &[
    // The set of listeners, their addresses and schemes are compared in one pass, in name
    // order, so the first listener that differs is named.
    ("listeners.NAME", Restart(listeners_changed)),
    ("listeners.NAME.address", Restart(listeners_changed)),
    ("listeners.NAME.tls", Restart(listeners_changed)),
    ("listeners.NAME.tls.cert", Reload),
    ("listeners.NAME.tls.key", Reload),
    ("listeners.NAME.tls.generate_self_signed", Reload),
    // Read from the snapshot at each accept and request, so they apply to new connections.
    ("listeners.NAME.proxy_protocol", Reload),
    ("listeners.NAME.trusted_proxies", Reload),
    ("listeners.NAME.forwarded_header", Reload),
    // Read again, with the certificates, by every reload.
    ("listeners.NAME.tls.client_ca", Reload),
    ("listeners.NAME.tls.client_auth", Reload),
    ("listeners.NAME.tls.client_crls", Reload),
    ("listeners.NAME.tls.session_tickets", Reload),
    ("listeners.NAME.tls.ticket_keys", Reload),
    ("routes.NAME.path", Reload),
    ("routes.NAME.match", Reload),
    ("routes.NAME.host", Reload),
    ("routes.NAME.backend", Reload),
    ("routes.NAME.allowed_origins", Reload),
    ("routes.NAME.accept", Reload),
    ("routes.NAME.outbound", Reload),
    ("routes.NAME.subprotocols", Reload),
    ("routes.NAME.on_backend_unavailable", Reload),
    ("routes.NAME.clients.allow", Reload),
    ("routes.NAME.clients.deny", Reload),
    ("routes.NAME.proxy_protocol", Reload),
    ("routes.NAME.client_certs", Reload),
    ("routes.NAME.half_close", Reload),
    // Pools: a reload builds new pools; each member's health and session count are kept by
    // (route, name), so a reload changes weights, caps and drains without losing them.
    ("routes.NAME.backends", Reload),
    ("routes.NAME.balance", Reload),
    ("routes.NAME.health.interval_secs", Reload),
    ("routes.NAME.health.timeout_secs", Reload),
    ("routes.NAME.health.rise", Reload),
    ("routes.NAME.health.fall", Reload),
    ("routes.NAME.health.send", Reload),
    ("routes.NAME.health.expect", Reload),
    ("routes.NAME.health.eject_after_failures", Reload),
    ("routes.NAME.health.eject_secs", Reload),
    // Backend TLS: the files are read again by every reload, and apply to new sessions.
    ("routes.NAME.backend_tls.server_name", Reload),
    ("routes.NAME.backend_tls.ca", Reload),
    ("routes.NAME.backend_tls.client_cert", Reload),
    ("routes.NAME.backend_tls.client_key", Reload),
    ("routes.NAME.backend_tls.insecure", Reload),
    ("routes.NAME.limits.max_message_bytes", Reload),
    ("routes.NAME.limits.ws_read_buffer_bytes", Reload),
    ("routes.NAME.limits.backend_read_bytes", Reload),
    ("routes.NAME.limits.connect_timeout_secs", Reload),
    ("routes.NAME.limits.close_timeout_secs", Reload),
    ("routes.NAME.limits.tcp_keepalive_secs", Reload),
    ("routes.NAME.limits.max_pending_connects", Reload),
    ("routes.NAME.limits.max_sessions", Reload),
    ("routes.NAME.limits.tcp_user_timeout_secs", Reload),
    ("routes.NAME.limits.ping_interval_secs", Reload),
    ("routes.NAME.limits.pong_timeout_secs", Reload),
    ("routes.NAME.limits.idle_timeout_secs", Reload),
    ("routes.NAME.limits.max_session_secs", Reload),
    ("routes.NAME.limits.max_messages_per_sec", Reload),
    // Access policy (issue 16, credentials): the files named are read again on every reload.
    ("routes.NAME.on_refusal", Reload),
    ("routes.NAME.auth.type", Reload),
    ("routes.NAME.auth.realm", Reload),
    ("routes.NAME.auth.cookie", Reload),
    ("routes.NAME.auth.query", Reload),
    ("routes.NAME.auth.subprotocol_prefix", Reload),
    ("routes.NAME.auth.tokens", Reload),
    ("routes.NAME.auth.tokens_file", Reload),
    ("routes.NAME.auth.keys", Reload),
    ("routes.NAME.auth.jwks_file", Reload),
    ("routes.NAME.auth.algorithms", Reload),
    ("routes.NAME.auth.audience", Reload),
    ("routes.NAME.auth.issuer", Reload),
    ("routes.NAME.auth.leeway_secs", Reload),
    ("routes.NAME.auth.routes_claim", Reload),
    ("routes.NAME.auth.close_at_expiry", Reload),
    ("routes.NAME.auth.expiry_grace_secs", Reload),
    ("routes.NAME.auth.htpasswd", Reload),
    ("routes.NAME.auth.user_label", Reload),
    // Token-mapped targets (issue 17): the map file and JWT keys are read again on every reload;
    // live sessions keep the target they were given.
    ("routes.NAME.targets.token", Reload),
    ("routes.NAME.targets.query_param", Reload),
    ("routes.NAME.targets.map_file", Reload),
    ("routes.NAME.targets.format", Reload),
    ("routes.NAME.targets.allow", Reload),
    ("routes.NAME.targets.allow_ports", Reload),
    ("routes.NAME.targets.jwt.keys", Reload),
    ("routes.NAME.targets.jwt.jwks_file", Reload),
    ("routes.NAME.targets.jwt.algorithms", Reload),
    ("routes.NAME.targets.jwt.audience", Reload),
    ("routes.NAME.targets.jwt.issuer", Reload),
    ("routes.NAME.targets.jwt.leeway_secs", Reload),
    // The connection and handshake semaphores are sized once, when the gateway binds.
    (
        "limits.max_connections",
        Restart(|a, b| differs("limits.max_connections", a.limits.max_connections, b.limits.max_connections)),
    ),
    (
        "limits.max_handshakes",
        Restart(|a, b| differs("limits.max_handshakes", a.limits.max_handshakes, b.limits.max_handshakes)),
    ),
    ("limits.handshake_timeout_secs", Reload),
    (
        "limits.handshake_shed_after_secs",
        Restart(|a, b| {
            differs("limits.handshake_shed_after_secs", a.limits.handshake_shed_after, b.limits.handshake_shed_after)
        }),
    ),
    ("limits.request_head_timeout_secs", Reload),
    // Listening sockets are created once, at start.
    (
        "limits.listen_backlog",
        Restart(|a, b| differs("limits.listen_backlog", a.limits.listen_backlog, b.limits.listen_backlog)),
    ),
    ("limits.max_memory_bytes", Reload),
    ("limits.proxy_header_max_bytes", Reload),
    ("limits.max_pending_connects", Reload),
    ("limits.per_client.max_connections", Reload),
    ("limits.per_client.max_handshakes", Reload),
    ("limits.per_client.new_connections_per_sec", Reload),
    ("limits.per_client.new_connections_burst", Reload),
    ("limits.per_client.ipv6_prefix", Reload),
    ("limits.per_client.max_tracked", Reload),
    ("limits.per_client.max_auth_failures", Reload),
    ("limits.per_client.auth_failure_window_secs", Reload),
    ("limits.per_client.auth_block_secs", Reload),
    ("limits.max_password_checks", Reload),
    ("limits.max_message_bytes", Reload),
    ("limits.ws_read_buffer_bytes", Reload),
    ("limits.backend_read_bytes", Reload),
    ("limits.connect_timeout_secs", Reload),
    ("limits.close_timeout_secs", Reload),
    ("limits.tcp_keepalive_secs", Reload),
    ("limits.tcp_user_timeout_secs", Reload),
    ("limits.ping_interval_secs", Reload),
    ("limits.pong_timeout_secs", Reload),
    ("limits.idle_timeout_secs", Reload),
    ("limits.max_session_secs", Reload),
    ("limits.max_messages_per_sec", Reload),
    ("builtin.tcp_echo", Restart(|a, b| differs("builtin.tcp_echo", a.builtin.tcp_echo, b.builtin.tcp_echo))),
    ("shutdown.drain_delay_secs", Reload),
    ("shutdown.close_window_secs", Reload),
    ("shutdown.deadline_secs", Reload),
    ("console.enabled", Reload),
    ("console.path", Reload),
    // Both keys decide one listener, reported as `admin`.
    ("admin.enabled", Restart(|a, b| differs("admin", a.admin, b.admin))),
    ("admin.address", Restart(|a, b| differs("admin", a.admin, b.admin))),
    // Who may read it: applied to admin connections accepted after the reload (files reread).
    ("admin.tls", Reload),
    ("admin.tls.cert", Reload),
    ("admin.tls.key", Reload),
    ("admin.token_hashes", Reload),
    ("admin.tokens_file", Reload),
    ("admin.open_paths", Reload),
    // The log subscriber and the metrics recorder are installed once, at start.
    ("log.format", Restart(|a, b| differs("log.format", a.log_format, b.log_format))),
    ("metrics.enabled", Restart(|a, b| differs("metrics.enabled", a.metrics, b.metrics))),
    // The file watcher reads them from the running config after every reload (a reload it
    // triggered included), so turning it off, on, or changing its pace needs no restart.
    ("reload.watch", Reload),
    ("reload.watch_interval_secs", Reload),
];

fn differs<T: PartialEq>(key: &str, old: T, new: T) -> Option<String> {
    (old != new).then(|| key.to_string())
}

/// The first listener added, moved or changed between `ws` and `wss`, or one removed.
fn listeners_changed(old: &Config, new: &Config) -> Option<String> {
    let shape =
        |c: &Config| c.listeners.iter().map(|l| (l.name.clone(), l.address, l.tls.is_some())).collect::<Vec<_>>();
    if shape(old) == shape(new) {
        return None;
    }
    for l in &new.listeners {
        match old.listeners.iter().find(|o| o.name == l.name) {
            None => return Some(format!("listeners.{} (new listener)", l.name)),
            Some(o) if o.address != l.address => return Some(format!("listeners.{}.address", l.name)),
            Some(o) if o.tls.is_some() != l.tls.is_some() => return Some(format!("listeners.{}.tls", l.name)),
            Some(_) => {}
        }
    }
    Some("listeners (a listener was removed)".into())
}

// ---- Values from a fixed set. ----

/// A value that must be one of a fixed set (`outbound = "text"`). serde's derive on `T` decides
/// which strings are in the set; a string outside it is kept with its span instead of failing
/// the parse, which would hide every other problem in the file. A value that is not a string is
/// still a toml type error.
pub(super) enum Choice<T> {
    /// A value of the set.
    Listed(T),
    /// Anything else, for validation to report.
    Unlisted {
        /// The string as written.
        written: String,
        /// Where it is in the file (byte offsets).
        span: Range<usize>,
        /// The strings the set accepts, in declaration order.
        allowed: &'static [&'static str],
    },
}

impl<'de, T: DeserializeOwned> Deserialize<'de> for Choice<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let written = Spanned::<String>::deserialize(deserializer)?;
        let span = written.span();
        match T::deserialize(StrDeserializer::<NotListed>::new(written.get_ref())) {
            Ok(value) => Ok(Choice::Listed(value)),
            Err(NotListed(allowed)) => Ok(Choice::Unlisted { written: written.into_inner(), span, allowed }),
        }
    }
}

/// The error of matching a string against an enum's variants: keeps the variant names that
/// serde's derive passes to `unknown_variant`, which no other serde API exposes.
#[derive(Debug)]
struct NotListed(&'static [&'static str]);

impl serde::de::Error for NotListed {
    // Not reached when `T` is an enum of unit variants, the only kind `Choice` is used with.
    fn custom<M: fmt::Display>(_: M) -> Self {
        NotListed(&[])
    }

    fn unknown_variant(_: &str, expected: &'static [&'static str]) -> Self {
        NotListed(expected)
    }
}

impl fmt::Display for NotListed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "not one of {:?}", self.0)
    }
}

impl std::error::Error for NotListed {}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use serde::Deserialize;
    use serde::de::DeserializeOwned;

    use super::{KEYS, OnChange, RawConfig};
    use crate::config::restart_required;
    use crate::config::test_support::{MINIMAL, ok};

    /// The keys `T` accepts, read back from serde (not from a hand-kept list): `(leaves, tables)`,
    /// with `NAME` for the key of a map of tables. Each table is probed with an unknown key, and
    /// `deny_unknown_fields` answers with the list of the fields it expected.
    fn keys_of<T: DeserializeOwned>() -> (BTreeSet<String>, BTreeSet<String>) {
        let (mut leaves, mut tables) = (BTreeSet::new(), BTreeSet::new());
        walk::<T>(&mut Vec::new(), &mut leaves, &mut tables);
        (leaves, tables)
    }

    fn walk<T: DeserializeOwned>(path: &mut Vec<String>, leaves: &mut BTreeSet<String>, tables: &mut BTreeSet<String>) {
        let fields = match fields_at::<T>(path) {
            Some(fields) => fields,
            None => {
                path.push("NAME".into());
                if fields_at::<T>(path).is_some() {
                    tables.insert(path[..path.len() - 1].join("."));
                    walk::<T>(path, leaves, tables);
                } else {
                    leaves.insert(path[..path.len() - 1].join("."));
                }
                path.pop();
                return;
            }
        };
        if !path.is_empty() {
            tables.insert(path.join("."));
        }
        for field in fields {
            path.push(field);
            walk::<T>(path, leaves, tables);
            path.pop();
        }
    }

    /// The fields of the table at `path` if it is a struct that denies unknown keys.
    fn fields_at<T: DeserializeOwned>(path: &[String]) -> Option<Vec<String>> {
        let header = path.iter().map(|k| if k == "NAME" { "n" } else { k }).collect::<Vec<_>>().join(".");
        let text = if path.is_empty() { "zzz = 1\n".to_string() } else { format!("[{header}]\nzzz = 1\n") };
        let message = toml::from_str::<T>(&text).err()?.message().to_string();
        let rest = message.strip_prefix("unknown field `zzz`")?;
        Some(rest.split('`').skip(1).step_by(2).map(str::to_string).collect())
    }

    /// Every key the file may hold is declared reloadable or restart-only in `KEYS`, and `KEYS`
    /// names no key the file cannot hold: a new field fails here until it is classified.
    #[test]
    fn every_key_is_classified() {
        let (leaves, tables) = keys_of::<RawConfig>();
        assert!(leaves.len() >= 30 && leaves.contains("routes.NAME.outbound"), "{leaves:?}");
        let declared: BTreeSet<String> = KEYS.iter().map(|(k, _)| k.to_string()).collect();
        assert_eq!(declared.len(), KEYS.len(), "a key is declared twice");
        let missing: Vec<_> = leaves.difference(&declared).collect();
        assert!(missing.is_empty(), "not classified as Reload or Restart in raw::KEYS: {missing:?}");
        let unknown: Vec<_> = declared.iter().filter(|k| !leaves.contains(*k) && !tables.contains(*k)).collect();
        assert!(unknown.is_empty(), "in raw::KEYS but not a key of the file: {unknown:?}");
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Probe {
        kept: Option<u64>,
        #[serde(default)]
        named: BTreeMap<String, ProbeTable>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct ProbeTable {
        added: String,
        #[serde(rename = "match")]
        renamed: Option<bool>,
    }

    /// The key discovery behind `every_key_is_classified` sees a field as soon as a struct has
    /// it (nested, under a map, renamed), so a new key cannot slip past the classification.
    #[test]
    fn key_discovery_sees_every_field() {
        let (leaves, tables) = keys_of::<Probe>();
        let expected = ["kept", "named.NAME.added", "named.NAME.match"];
        assert_eq!(leaves, expected.iter().map(|k| k.to_string()).collect::<BTreeSet<_>>());
        assert_eq!(tables, ["named", "named.NAME"].iter().map(|k| k.to_string()).collect::<BTreeSet<_>>());
    }

    /// Each restart-only key refuses a reload under its documented name; reloadable keys do not.
    #[test]
    fn restart_only_changes_are_named() {
        let base = ok(MINIMAL);
        let changed = |extra: &str| restart_required(&base, &ok(&format!("{MINIMAL}{extra}")));
        assert_eq!(restart_required(&base, &ok(MINIMAL)), None);
        assert_eq!(changed("[limits]\nmax_connections = 5\n").as_deref(), Some("limits.max_connections"));
        assert_eq!(changed("[limits]\nmax_handshakes = 5\n").as_deref(), Some("limits.max_handshakes"));
        assert_eq!(changed("[builtin]\ntcp_echo = \"127.0.0.1:7\"\n").as_deref(), Some("builtin.tcp_echo"));
        assert_eq!(changed("[admin]\nenabled = false\n").as_deref(), Some("admin"));
        assert_eq!(changed("[admin]\naddress = \"127.0.0.1:9\"\n").as_deref(), Some("admin"));
        assert_eq!(changed("[log]\nformat = \"json\"\n").as_deref(), Some("log.format"));
        assert_eq!(changed("[metrics]\nenabled = false\n").as_deref(), Some("metrics.enabled"));
        let other = "[listeners.other]\naddress = \"127.0.0.1:8081\"\n";
        assert_eq!(changed(other).as_deref(), Some("listeners.other (new listener)"));
        let moved = ok(&MINIMAL.replace("8080", "8082"));
        assert_eq!(restart_required(&base, &moved).as_deref(), Some("listeners.plain.address"));
        let tls = ok(&MINIMAL.replace("8080\"", "8080\"\ntls = { cert = \"c\", key = \"k\" }"));
        assert_eq!(restart_required(&base, &tls).as_deref(), Some("listeners.plain.tls"));
        let two = ok(&format!("{MINIMAL}{other}"));
        assert_eq!(restart_required(&two, &base).as_deref(), Some("listeners (a listener was removed)"));
        // Reloadable: routes, other limits, shutdown timings, the console.
        let reloadable = "outbound = \"text\"\n[limits]\nconnect_timeout_secs = 1\n[shutdown]\ndrain_delay_secs = 0\n\
                          [console]\nenabled = true\n";
        assert_eq!(changed(reloadable), None);
        assert!(KEYS.iter().any(|(_, c)| matches!(c, OnChange::Reload)));
    }
}
