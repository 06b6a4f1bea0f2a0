//! Stage one: the TOML exactly as written, read by serde into `Raw*` structs.
//!
//! Every struct denies unknown keys, so a typo is an error naming the key rather than a setting
//! silently ignored. Optional keys stay `Option` here; the defaults and bounds are applied by
//! `validate`, which is the only reader of these types. A key whose value comes from a fixed set
//! is read as a `Choice`, which never fails the parse, so that a value outside the set is
//! reported together with every other problem in the file.
//!
//! Which of these keys a reload may change is `keys::KEYS`.

use std::collections::BTreeMap;
use std::fmt;
use std::ops::Range;

use serde::Deserialize;
use serde::de::value::StrDeserializer;
use serde::de::{DeserializeOwned, Deserializer};
use toml::Spanned;

use super::{
    Balance, ClientAuthMode, ForwardedHeader, JwtAlgorithm, LogFormat, MapFormat, OnRefusal, Outbound, PathMatch,
    ProxyVersion, Unavailable,
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
    pub max_buffered_lines: Option<u64>,
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
