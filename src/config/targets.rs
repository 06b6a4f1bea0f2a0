//! The validated `[routes.NAME.targets]` table: where a token-mapped route finds its token, what
//! maps the token to a target (a map file, or a signed JWT's claims), and the allow-list every
//! target is checked against. Data only: reading the map file and checking tokens and addresses
//! is `backend::targets`'s job.

use std::fmt;
use std::net::IpAddr;
use std::path::PathBuf;

use serde::Deserialize;

use super::{Cidrs, Jwt};

/// A route whose backend is chosen per session by a token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Targets {
    /// Where the request carries its token.
    pub token: TokenSource,
    /// What maps a token to a target.
    pub source: TargetSource,
    /// The networks a target's every resolved address must be in. Never empty.
    pub allow: Cidrs,
    /// The ports a target may have. Never empty.
    pub allow_ports: PortRanges,
}

impl Targets {
    /// Whether a connection to `ip` (already normalised: `backend::targets`) and `port` is allowed.
    pub fn allows(&self, ip: IpAddr, port: u16) -> bool {
        self.allow.contains(ip) && self.allow_ports.contains(port)
    }
}

/// Where a request carries its token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenSource {
    /// The one path segment after the route's path (`/vnc/{token}`).
    Path,
    /// The query parameter of this name (`?token=...`).
    Query(String),
}

/// What maps a token to a target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetSource {
    /// A file of `token → host:port` entries, read at start and on every reload.
    Map {
        /// The file, resolved against the config's directory.
        file: PathBuf,
        /// How its entries are written.
        format: MapFormat,
    },
    /// The token is a JWT whose `host` and `port` claims name the target.
    Jwt(Jwt),
}

/// How a map file's entries are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MapFormat {
    /// A TOML table: `"token" = "host:port"`.
    Toml,
    /// websockify's token file: `token: host:port` lines, `#` comments.
    Websockify,
}

/// Port ranges (`5900-5999`, `22`); a port is allowed when one range holds it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PortRanges(pub Vec<(u16, u16)>);

impl PortRanges {
    /// Whether `port` is in one of the ranges (bounds included).
    pub fn contains(&self, port: u16) -> bool {
        self.0.iter().any(|(low, high)| (*low..=*high).contains(&port))
    }
}

/// The ranges, comma-separated (`5900-5999, 22`).
impl fmt::Display for PortRanges {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ranges: Vec<String> = self
            .0
            .iter()
            .map(|(low, high)| if low == high { low.to_string() } else { format!("{low}-{high}") })
            .collect();
        f.write_str(&ranges.join(", "))
    }
}

impl fmt::Display for Targets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let token = match &self.token {
            TokenSource::Path => "path".to_string(),
            TokenSource::Query(name) => format!("query {name}"),
        };
        match &self.source {
            TargetSource::Map { file, .. } => write!(f, "mapped by token ({token}, map {})", file.display()),
            TargetSource::Jwt(_) => write!(f, "mapped by token ({token}, JWT claims)"),
        }
    }
}
