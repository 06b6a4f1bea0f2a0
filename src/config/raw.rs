//! Stage one: the TOML exactly as written, read by serde into `Raw*` structs.
//!
//! Every struct denies unknown keys, so a typo is an error naming the key rather than a setting
//! silently ignored. Optional keys stay `Option` here; the defaults and bounds are applied by
//! `validate`, which is the only reader of these types. A key whose value comes from a fixed set
//! is read as a `Choice`, which never fails the parse, so that a value outside the set is
//! reported together with every other problem in the file.

use std::collections::BTreeMap;
use std::fmt;
use std::ops::Range;

use serde::Deserialize;
use serde::de::value::StrDeserializer;
use serde::de::{DeserializeOwned, Deserializer};
use toml::Spanned;

use super::{LogFormat, Outbound, PathMatch, Unavailable};

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
    pub path_match: Option<Choice<PathMatch>>,
    pub host: Option<String>,
    pub backend: String,
    #[serde(default)]
    pub allowed_origins: Vec<String>,
    pub accept: Option<Vec<Choice<AcceptKind>>>,
    pub outbound: Option<Choice<Outbound>>,
    #[serde(default)]
    pub subprotocols: Vec<String>,
    pub on_backend_unavailable: Option<Choice<Unavailable>>,
}

/// One item of a route's `accept` list.
#[derive(Deserialize, Clone, Copy)]
#[serde(rename_all = "lowercase")]
pub(super) enum AcceptKind {
    Text,
    Binary,
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
    pub format: Option<Choice<LogFormat>>,
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
