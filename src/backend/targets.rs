//! Token-mapped targets: a route whose backend is chosen per session by a token the request
//! carries (`[routes.NAME.targets]`), within the route's allow-list.
//!
//! Two steps, apart on purpose. [`Mapping::find`] runs in `server::upgrade` before the session's
//! bounds are taken: it reads the token (the path segment after the route's path, or a query
//! parameter) and maps it to a [`Target`], through the map file loaded into the snapshot or a
//! signed JWT's `host` and `port` claims; an unknown token never holds a session place or a
//! connect place. [`connect`] runs at dial time, within the connect timeout and the route's cap
//! on connects in progress: it resolves the target's name once, normalises every address
//! (IPv4-mapped IPv6 to IPv4, `0.0.0.0` and `::` to the loopback address the kernel would
//! connect them to), refuses the target unless every address and the port are allowed, and then
//! connects only to those checked addresses (each an IP literal, so nothing is resolved again).
//!
//! Tokens are capabilities: they are looked up by their SHA-256, and never reach a log line, a
//! metric, an error or a refusal reason (map file problems name the line, not the entry).
//! [`load`] reads every route's map file or JWT keys at start and on every reload (a reload that
//! cannot read them is refused whole); sessions already open keep the target they were given.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::Value;

use super::{BackendConn, BackendError, Settings, display_target};
use crate::auth::{self, JwtVerifier};
use crate::config::{self, Backend, Config, MapFormat, TargetSource, TokenSource};

/// Where one session goes, as its token named it; resolved and checked at dial time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    host: String,
    port: u16,
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&display_target(&self.host, self.port))
    }
}

/// Why a token-mapped request gets no session: the one value its status, reason and metric
/// label derive from (`policy::Refusal::target`, [`Refused::label`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The request carries no token (404).
    MissingToken,
    /// No map entry has the token (404).
    UnknownToken,
    /// The JWT failed its check (signature, `exp`, `nbf`, `aud`, `iss`) or names no target (403).
    InvalidToken(&'static str),
    /// The target's port, or one of its addresses, is outside the route's allow-list (403).
    NotAllowed,
}

impl Refused {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Refused::MissingToken => "missing_token",
            Refused::UnknownToken => "unknown_token",
            Refused::InvalidToken(_) => "invalid_token",
            Refused::NotAllowed => "not_allowed",
        }
    }
}

/// One route's token lookup, its files loaded.
pub struct Mapping {
    token: TokenSource,
    /// The route's path, which a path token follows.
    prefix: String,
    lookup: Lookup,
}

enum Lookup {
    /// Targets by the SHA-256 of their token.
    Map(HashMap<[u8; 32], Target>),
    Jwt(JwtVerifier),
}

/// Names the route's token carrier and how many entries it maps, never a token.
impl fmt::Debug for Mapping {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let lookup = match &self.lookup {
            Lookup::Map(m) => format!("map of {} entries", m.len()),
            Lookup::Jwt(_) => "JWT".to_string(),
        };
        f.debug_struct("Mapping").field("token", &self.token).field("lookup", &lookup).finish()
    }
}

impl Mapping {
    /// What maps the route's tokens, for `wsgate check`: how many map entries, or "JWT claims".
    pub fn describe(&self) -> String {
        match &self.lookup {
            Lookup::Map(map) => format!("{} tokens in the map", map.len()),
            Lookup::Jwt(_) => "JWT claims".to_string(),
        }
    }

    /// The target the request's token names (`path` and `query` are the request target's).
    pub fn find(&self, path: &str, query: Option<&str>) -> Result<Target, Refused> {
        let written = match &self.token {
            TokenSource::Path => path.strip_prefix(self.prefix.as_str()).filter(|t| !t.is_empty()),
            TokenSource::Query(name) => query
                .into_iter()
                .flat_map(|q| q.split('&'))
                .find_map(|pair| pair.strip_prefix(name.as_str())?.strip_prefix('='))
                .filter(|t| !t.is_empty()),
        };
        let written = written.ok_or(Refused::MissingToken)?;
        // A path token is one segment; more is no token of the map (and no JWT).
        let token = match auth::percent_decode(written) {
            Some(t) if !t.contains('/') => t,
            _ => return Err(Refused::UnknownToken),
        };
        match &self.lookup {
            Lookup::Map(map) => map.get(&digest(&token)).cloned().ok_or(Refused::UnknownToken),
            Lookup::Jwt(verifier) => {
                let claims = verifier.claims(&token).map_err(Refused::InvalidToken)?;
                claimed_target(&claims).ok_or(Refused::InvalidToken("the token names no target (host, port)"))
            }
        }
    }
}

fn digest(token: &str) -> [u8; 32] {
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, token.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// `host` (a name or an IP literal, IPv6 with or without brackets) and `port` (a number, or a
/// string of digits) from a JWT's claims.
fn claimed_target(claims: &Value) -> Option<Target> {
    let host = claims.get("host")?.as_str()?;
    let port = match claims.get("port")? {
        Value::Number(n) => u16::try_from(n.as_u64()?).ok()?,
        Value::String(s) => s.parse::<u16>().ok()?,
        _ => return None,
    };
    let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    let valid = !host.is_empty() && !host.contains(['/', '@', '[', ']']) && !host.chars().any(char::is_whitespace);
    (valid && port != 0).then(|| Target { host: host.to_string(), port })
}

/// A map file or JWT key that cannot be used: one line naming the file (and line), the key and
/// the problem, never an entry's token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}{}: {key}: {problem}", file.display(), line.map(|l| format!(":{l}")).unwrap_or_default())]
pub struct TargetsError {
    /// The file.
    pub file: PathBuf,
    /// The line in `file`, when one is at fault.
    pub line: Option<usize>,
    /// The config key that names it (`routes.NAME.targets.map_file`).
    pub key: String,
    /// What is wrong.
    pub problem: String,
}

impl From<auth::AuthError> for TargetsError {
    fn from(e: auth::AuthError) -> TargetsError {
        TargetsError { file: e.file, line: e.line, key: e.key, problem: e.problem }
    }
}

/// Loads the token lookup of every token-mapped route of `config`, by route name; every problem
/// found, when any.
pub fn load(config: &Config) -> Result<HashMap<String, Arc<Mapping>>, Vec<TargetsError>> {
    let (mut loaded, mut errors) = (HashMap::new(), Vec::new());
    for route in &config.routes {
        let Backend::Mapped(targets) = &route.backend else { continue };
        let key = format!("routes.{}.targets", route.name);
        let lookup = match &targets.source {
            TargetSource::Map { file, format } => read_map(file, *format, &format!("{key}.map_file")).map(Lookup::Map),
            TargetSource::Jwt(jwt) => JwtVerifier::load(jwt, &format!("{key}.jwt"), &config.path)
                .map(Lookup::Jwt)
                .map_err(|e| e.into_iter().map(TargetsError::from).collect()),
        };
        match lookup {
            Ok(lookup) => {
                let mapping = Mapping { token: targets.token.clone(), prefix: route.path.clone(), lookup };
                loaded.insert(route.name.clone(), Arc::new(mapping));
            }
            Err(e) => errors.extend(e),
        }
    }
    if errors.is_empty() { Ok(loaded) } else { Err(errors) }
}

fn read_map(file: &Path, format: MapFormat, key: &str) -> Result<HashMap<[u8; 32], Target>, Vec<TargetsError>> {
    let fail = |line, problem: String| TargetsError { file: file.to_path_buf(), line, key: key.to_string(), problem };
    let text = std::fs::read_to_string(file).map_err(|e| vec![fail(None, format!("cannot read: {e}"))])?;
    let entries = match format {
        MapFormat::Toml => toml_entries(&text).map_err(|(line, problem)| vec![fail(line, problem.to_string())])?,
        MapFormat::Websockify => websockify_entries(&text),
    };
    let (mut map, mut errors) = (HashMap::with_capacity(entries.len()), Vec::new());
    for (line, token, written) in entries {
        match parse_target(&written) {
            Some(target) => {
                map.insert(digest(&token), target);
            }
            None => errors.push(fail(Some(line), "expected token: host:port (the target is not host:port)".into())),
        }
    }
    if errors.is_empty() { Ok(map) } else { Err(errors) }
}

/// `(line, token, target)` of a TOML table of `"token" = "host:port"` strings. Problems name a
/// line only: toml's own messages quote keys, which are tokens here.
type Entries = Vec<(usize, String, String)>;

fn toml_entries(text: &str) -> Result<Entries, (Option<usize>, &'static str)> {
    let line_of = |offset: usize| text[..offset.min(text.len())].matches('\n').count() + 1;
    let table: HashMap<String, toml::Spanned<toml::Value>> = toml::from_str(text)
        .map_err(|e| (e.span().map(|s| line_of(s.start)), "not a TOML table of \"token\" = \"host:port\" strings"))?;
    let mut entries = Vec::with_capacity(table.len());
    for (token, value) in table {
        let line = line_of(value.span().start);
        match value.into_inner() {
            toml::Value::String(target) => entries.push((line, token, target)),
            _ => return Err((Some(line), "a value is not a \"host:port\" string")),
        }
    }
    Ok(entries)
}

/// websockify's token file (`token_plugins.TokenFile`): `token: host:port` lines, split at the
/// first colon followed by white space; blank lines and `#` comments skipped; a later line for
/// the same token wins, as in websockify. A line without the separator counts as a bad target.
fn websockify_entries(text: &str) -> Entries {
    let mut entries = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let split = line.char_indices().find(|&(at, c)| c == ':' && line[at + 1..].starts_with(char::is_whitespace));
        match split {
            Some((at, _)) => entries.push((i + 1, line[..at].to_string(), line[at + 1..].trim().to_string())),
            None => entries.push((i + 1, String::new(), String::new())),
        }
    }
    entries
}

/// `host:port`, `[v6]:port`, or websockify's unbracketed `v6:port` (split at the last colon).
fn parse_target(written: &str) -> Option<Target> {
    if let Ok((host, port)) = config::split_host_port(written) {
        return Some(Target { host, port });
    }
    let (host, port) = written.rsplit_once(':')?;
    let port = port.parse::<u16>().ok().filter(|p| *p != 0)?;
    host.parse::<Ipv6Addr>().ok().map(|ip| Target { host: ip.to_string(), port })
}

/// The address a connection to `ip` really reaches, which is what the allow-list must see: an
/// IPv4-mapped or NAT64 IPv6 address is its IPv4 address, and the unspecified addresses are the
/// loopback address (Linux connects `0.0.0.0` to `127.0.0.1` and `::` to `::1`).
pub fn normalise(ip: IpAddr) -> IpAddr {
    match config::canonical_ip(ip) {
        IpAddr::V4(v4) if v4.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(v6) if v6.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        other => other,
    }
}

/// Connects `target` if the route's allow-list allows it: the port, then every address the name
/// resolves to (resolved once, normalised), then a connection to the first checked address that
/// accepts, all within the route's connect timeout.
pub(super) async fn connect(
    settings: &Settings,
    allowed: &config::Targets,
    target: &Target,
    preamble: &[u8],
) -> Result<BackendConn, BackendError> {
    let shown = target.to_string();
    let not_allowed = |addr| BackendError::NotAllowed { target: shown.clone(), addr };
    if !allowed.allow_ports.contains(target.port) {
        return Err(not_allowed(None));
    }
    let deadline = tokio::time::Instant::now() + settings.timeout;
    let timed_out = || BackendError::Timeout { target: shown.clone(), after: settings.timeout };
    let resolved = tokio::time::timeout_at(deadline, tokio::net::lookup_host((target.host.as_str(), target.port)))
        .await
        .map_err(|_| timed_out())?
        .map_err(|source| BackendError::Resolve { target: shown.clone(), source })?;
    let mut checked: Vec<SocketAddr> = Vec::new();
    for addr in resolved {
        let addr = SocketAddr::new(normalise(addr.ip()), addr.port());
        if !allowed.allows(addr.ip(), addr.port()) {
            return Err(not_allowed(Some(addr)));
        }
        if !checked.contains(&addr) {
            checked.push(addr);
        }
    }
    let mut last = BackendError::NoAddress { target: shown.clone() };
    for addr in checked {
        // An IP literal: connecting resolves nothing; TLS still checks the name the token gave.
        let literal = addr.ip().to_string();
        match tokio::time::timeout_at(deadline, settings.connect_named(&literal, &target.host, addr.port(), preamble))
            .await
        {
            Ok(Ok(stream)) => return Ok(stream),
            Ok(Err(e)) => last = e,
            Err(_) => return Err(timed_out()),
        }
    }
    Err(last)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(host: &str, port: u16) -> Target {
        Target { host: host.into(), port }
    }

    /// Both file formats read into the same map; bad lines are named by number, never quoted.
    #[test]
    fn map_files_parse() {
        let toml = "\"alpha\" = \"10.0.0.1:5901\"\nbeta = \"[::1]:5902\"\n\"a b=c\" = \"vnc.lab:5903\"\n";
        let mut entries = toml_entries(toml).unwrap();
        entries.sort();
        let got: Vec<_> = entries.iter().map(|(l, t, w)| (*l, t.as_str(), parse_target(w))).collect();
        assert_eq!(
            got,
            [
                (1, "alpha", Some(target("10.0.0.1", 5901))),
                (2, "beta", Some(target("::1", 5902))),
                (3, "a b=c", Some(target("vnc.lab", 5903))),
            ]
        );
        let ws = "# comment\n\nalpha: 10.0.0.1:5901\n  beta:\t::1:5902\nalpha: 10.0.0.9:5909\nnoseparator\n";
        let entries = websockify_entries(ws);
        let got: Vec<_> = entries.iter().map(|(l, t, w)| (*l, t.as_str(), parse_target(w))).collect();
        assert_eq!(
            got,
            [
                (3, "alpha", Some(target("10.0.0.1", 5901))),
                (4, "beta", Some(target("::1", 5902))),
                (5, "alpha", Some(target("10.0.0.9", 5909))),
                (6, "", None),
            ]
        );
        let e = toml_entries("secret-token = 5\n").unwrap_err();
        assert_eq!(e.0, Some(1));
        let e = toml_entries("secret-token = \"x\"\nsecret-token = \"y\"\n").unwrap_err();
        assert!(!e.1.contains("secret"), "{e:?}");
        assert_eq!(parse_target("host:0"), None);
        assert_eq!(parse_target("host"), None);
    }

    /// What the kernel would connect to is what is checked.
    #[test]
    fn addresses_normalise() {
        let n = |s: &str| normalise(s.parse().unwrap()).to_string();
        assert_eq!(n("::ffff:127.0.0.1"), "127.0.0.1");
        assert_eq!(n("0.0.0.0"), "127.0.0.1");
        assert_eq!(n("::"), "::1");
        assert_eq!(n("::ffff:0.0.0.0"), "127.0.0.1");
        assert_eq!(n("10.1.2.3"), "10.1.2.3");
        assert_eq!(n("2001:db8::1"), "2001:db8::1");
        // Through a NAT64 gateway: checked as the IPv4 address it reaches.
        assert_eq!(n("64:ff9b::10.1.2.3"), "10.1.2.3");
        assert_eq!(n("64:ff9b::0.0.0.0"), "127.0.0.1");
        assert_eq!(n("64:ff9b:1::10.1.2.3"), "64:ff9b:1::a01:203", "only the well-known /96");
    }

    /// JWT claims name a target with a numeric or string port; anything else names none.
    #[test]
    fn jwt_claims_name_a_target() {
        let t = |v: Value| claimed_target(&v);
        assert_eq!(t(serde_json::json!({"host": "10.0.0.1", "port": 5900})), Some(target("10.0.0.1", 5900)));
        assert_eq!(t(serde_json::json!({"host": "[::1]", "port": "22"})), Some(target("::1", 22)));
        for bad in [
            serde_json::json!({"host": "10.0.0.1"}),
            serde_json::json!({"host": "10.0.0.1", "port": 0}),
            serde_json::json!({"host": "10.0.0.1", "port": 70000}),
            serde_json::json!({"host": "a/b", "port": 1}),
            serde_json::json!({"host": "", "port": 1}),
            serde_json::json!({"port": 1}),
        ] {
            assert_eq!(t(bad.clone()), None, "{bad}");
        }
    }
}
