//! Stage one: the TOML exactly as written, read by serde into `Raw*` structs.
//!
//! Every struct denies unknown keys, so a typo is an error naming the key rather than a setting
//! silently ignored. Optional keys stay `Option` here; the defaults and bounds are applied by
//! `validate`, which is the only reader of these types.

use std::collections::BTreeMap;

use serde::Deserialize;

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
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawListener {
    pub address: String,
    pub tls: Option<RawTls>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTls {
    pub cert: String,
    pub key: String,
    #[serde(default)]
    pub generate_self_signed: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRoute {
    pub path: String,
    #[serde(rename = "match")]
    pub path_match: Option<String>,
    pub host: Option<String>,
    pub backend: String,
    #[serde(default)]
    pub allowed_origins: Vec<String>,
    pub accept: Option<Vec<String>>,
    pub outbound: Option<String>,
    #[serde(default)]
    pub subprotocols: Vec<String>,
    pub on_backend_unavailable: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLimits {
    pub max_connections: Option<u64>,
    pub max_handshakes: Option<u64>,
    pub handshake_timeout_secs: Option<Seconds>,
    pub max_message_bytes: Option<u64>,
    pub ws_read_buffer_bytes: Option<u64>,
    pub backend_read_bytes: Option<u64>,
    pub connect_timeout_secs: Option<Seconds>,
    pub close_timeout_secs: Option<Seconds>,
    pub tcp_keepalive_secs: Option<Seconds>,
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
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLog {
    pub format: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawMetrics {
    pub enabled: Option<bool>,
}

/// A duration in seconds, written as an integer or a decimal (`5`, `0.25`).
#[derive(Deserialize, Clone, Copy)]
#[serde(untagged)]
pub(super) enum Seconds {
    Whole(i64),
    Fraction(f64),
}
