//! `[routes.NAME.targets]`: the token's carrier, the map file or JWT keys, and the allow-list,
//! which is required: a route that lets a request choose its backend must say which backends
//! may be chosen, so there is no default that allows everything.

use std::net::IpAddr;

use ipnet::IpNet;

use super::super::raw::{AuthType, Choice, RawAuth, RawPorts, RawTargets, TokenKind};
use super::super::{MapFormat, Mechanism, PathMatch, PortRanges, TargetSource, Targets, TokenSource};
use super::Validator;

/// noVNC's and websockify's name for the token parameter.
const DEFAULT_QUERY_PARAM: &str = "token";

impl Validator<'_> {
    /// The route's targets table; `path` and `path_match` are the route's, already validated.
    pub(super) fn targets(
        &mut self,
        route: &str,
        raw: RawTargets,
        others: &[&str],
        path: Option<&str>,
        path_match: Option<PathMatch>,
    ) -> Option<Targets> {
        let key = format!("{route}.targets");
        if !others.is_empty() {
            let others = others.join(", ");
            self.fail(
                &key,
                format!("{others} cannot be set beside targets: a token-mapped route's backend comes from the token"),
            );
            return None;
        }
        let token = match self.choice(&format!("{key}.token"), raw.token, TokenKind::Path)? {
            TokenKind::Path => {
                if raw.query_param.is_some() {
                    self.fail(format!("{key}.query_param"), "applies to token = \"query\" only");
                    return None;
                }
                let is_prefix_dir = path.is_some_and(|p| p.ends_with('/')) && path_match == Some(PathMatch::Prefix);
                if !is_prefix_dir {
                    self.fail(
                        format!("{key}.token"),
                        "token = \"path\" needs a prefix route whose path ends in \"/\" (path = \"/vnc/\", \
                         match = \"prefix\"): the token is the one segment after it",
                    );
                    return None;
                }
                TokenSource::Path
            }
            TokenKind::Query => {
                let name = raw.query_param.unwrap_or_else(|| DEFAULT_QUERY_PARAM.to_string());
                if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)) {
                    self.fail(format!("{key}.query_param"), format!("{name:?} must be letters, digits, - _ ."));
                    return None;
                }
                TokenSource::Query(name)
            }
        };
        let source = match (raw.map_file, raw.jwt) {
            (Some(_), Some(_)) | (None, None) => {
                self.fail(&key, "needs exactly one of map_file and [jwt]");
                None
            }
            (Some(file), None) => {
                let path = self.file_path(&format!("{key}.map_file"), &file);
                // A `.toml` file is a TOML table; anything else is read as websockify's format,
                // so users' existing token files work as they are.
                let by_name = if file.ends_with(".toml") { MapFormat::Toml } else { MapFormat::Websockify };
                let format = self.choice(&format!("{key}.format"), raw.format, by_name)?;
                Some(TargetSource::Map { file: path, format })
            }
            (None, Some(jwt)) => {
                if raw.format.is_some() {
                    self.fail(format!("{key}.format"), "applies to map_file only");
                    return None;
                }
                // Read as `[routes.NAME.auth]` reads `type = "jwt"`: the same keys, defaults and bounds.
                let as_auth = RawAuth {
                    kind: Choice::Listed(AuthType::Jwt),
                    keys: jwt.keys,
                    jwks_file: jwt.jwks_file,
                    algorithms: jwt.algorithms,
                    audience: jwt.audience,
                    issuer: jwt.issuer,
                    leeway_secs: jwt.leeway_secs,
                    realm: None,
                    cookie: None,
                    query: None,
                    subprotocol_prefix: None,
                    tokens: None,
                    tokens_file: None,
                    routes_claim: None,
                    close_at_expiry: None,
                    expiry_grace_secs: None,
                    htpasswd: None,
                    user_label: None,
                };
                match self.jwt(&format!("{key}.jwt"), &as_auth)? {
                    Mechanism::Jwt(jwt) => Some(TargetSource::Jwt(jwt)),
                    _ => None,
                }
            }
        };
        let allow = self.target_networks(&format!("{key}.allow"), raw.allow);
        let allow_ports = self.port_ranges(&format!("{key}.allow_ports"), raw.allow_ports);
        Some(Targets { token, source: source?, allow: allow?, allow_ports: allow_ports? })
    }

    fn target_networks(&mut self, key: &str, list: Option<Vec<String>>) -> Option<super::super::Cidrs> {
        let list = list.unwrap_or_default();
        if list.is_empty() {
            self.fail(
                key,
                "required: the networks targets may be in, e.g. [\"10.0.0.0/24\"] (there is no default that allows \
                 every address)",
            );
            return None;
        }
        for written in &list {
            // As it will be matched: `::ffff:0:0/96` and `64:ff9b::/96` are all of IPv4.
            let net = written.trim().parse::<IpNet>().ok().map(crate::config::addresses::canonical_net);
            let ip = written.trim().parse::<IpAddr>().ok();
            if net.is_some_and(|n| n.prefix_len() == 0) {
                self.fail(key, format!("{written:?} allows every address; list the networks targets are in"));
                return None;
            }
            if ip.is_some_and(|ip| crate::config::canonical_ip(ip).is_unspecified()) {
                self.fail(key, format!("{written:?} is not an address a target can have"));
                return None;
            }
        }
        self.cidrs(key, list)
    }

    fn port_ranges(&mut self, key: &str, list: Option<Vec<RawPorts>>) -> Option<PortRanges> {
        let list = list.unwrap_or_default();
        if list.is_empty() {
            self.fail(key, "required: the ports targets may have, e.g. [\"5900-5999\"] or [22]");
            return None;
        }
        let mut ranges = Vec::with_capacity(list.len());
        for item in list {
            let range = match &item {
                RawPorts::One(n) => u16::try_from(*n).ok().filter(|p| *p != 0).map(|p| (p, p)),
                RawPorts::Range(s) => match s.split_once('-') {
                    Some((low, high)) => low.trim().parse::<u16>().ok().zip(high.trim().parse::<u16>().ok()),
                    None => s.trim().parse::<u16>().ok().map(|p| (p, p)),
                },
            };
            match range {
                Some((low, high)) if low >= 1 && low <= high => ranges.push((low, high)),
                _ => {
                    let written = match item {
                        RawPorts::One(n) => n.to_string(),
                        RawPorts::Range(s) => format!("{s:?}"),
                    };
                    self.fail(key, format!("{written} is not a port (1-65535) or a range \"low-high\""));
                    return None;
                }
            }
        }
        Some(PortRanges(ranges))
    }
}

#[cfg(test)]
mod tests {
    use crate::config::test_support::{err, ok};
    use crate::config::{Backend, MapFormat, TargetSource, TokenSource};

    const ROUTE: &str = "[listeners.plain]\naddress = \"127.0.0.1:8080\"\n[routes.vnc]\npath = \"/vnc/\"\n\
                         match = \"prefix\"\n[routes.vnc.targets]\n";

    fn targets(text: &str) -> crate::config::Targets {
        match ok(text).routes[0].backend.clone() {
            Backend::Mapped(t) => *t,
            other => panic!("not mapped: {other:?}"),
        }
    }

    /// A map-file route: its token carrier, the format by name or key, the allow-list read.
    #[test]
    fn map_routes_parse() {
        let t = targets(&format!(
            "{ROUTE}map_file = \"tokens\"\nallow = [\"10.0.0.0/24\", \"::ffff:127.0.0.0/104\"]\n\
             allow_ports = [\"5900-5999\", 22]\n"
        ));
        assert_eq!(t.token, TokenSource::Path);
        assert!(matches!(t.source, TargetSource::Map { format: MapFormat::Websockify, .. }));
        assert!(t.allows("10.0.0.7".parse().unwrap(), 5901) && t.allows("127.1.2.3".parse().unwrap(), 22));
        assert!(!t.allows("10.0.1.7".parse().unwrap(), 5901) && !t.allows("10.0.0.7".parse().unwrap(), 23));
        let t = targets(&format!(
            "{ROUTE}token = \"query\"\nmap_file = \"t.toml\"\nallow = [\"10.0.0.1\"]\nallow_ports = [5900]\n"
        ));
        assert_eq!(t.token, TokenSource::Query("token".into()));
        assert!(matches!(t.source, TargetSource::Map { format: MapFormat::Toml, .. }));
        let t = targets(&format!(
            "{ROUTE}map_file = \"t.toml\"\nformat = \"websockify\"\nallow = [\"10.0.0.1\"]\nallow_ports = [5900]\n"
        ));
        assert!(matches!(t.source, TargetSource::Map { format: MapFormat::Websockify, .. }));
        let t = targets(&format!(
            "{ROUTE}allow = [\"10.0.0.1\"]\nallow_ports = [5900]\n[routes.vnc.targets.jwt]\nkeys = [\"k.pem\"]\n\
             algorithms = [\"RS256\"]\n"
        ));
        assert!(matches!(t.source, TargetSource::Jwt(_)));
    }

    /// Each mistake is one line naming its key; the allow-list has no default.
    #[test]
    fn mistakes_name_their_key() {
        let good = "map_file = \"t\"\nallow = [\"10.0.0.0/8\"]\nallow_ports = [5900]\n";
        for (text, expected) in [
            (format!("{ROUTE}map_file = \"t\"\nallow_ports = [5900]\n"), "routes.vnc.targets.allow: required"),
            (
                format!("{ROUTE}map_file = \"t\"\nallow = [\"10.0.0.0/8\"]\n"),
                "routes.vnc.targets.allow_ports: required",
            ),
            (format!("{ROUTE}{}", good.replace("10.0.0.0/8", "0.0.0.0/0")), "allows every address"),
            (format!("{ROUTE}{}", good.replace("10.0.0.0/8", "::ffff:0:0/96")), "allows every address"),
            (format!("{ROUTE}{}", good.replace("10.0.0.0/8", "64:ff9b::/96")), "allows every address"),
            (format!("{ROUTE}{}", good.replace("10.0.0.0/8", "64:ff9b::")), "not an address a target can have"),
            (format!("{ROUTE}{}", good.replace("10.0.0.0/8", "::")), "routes.vnc.targets.allow"),
            (format!("{ROUTE}{}", good.replace("10.0.0.0/8", "10.0.0.1/8")), "host bits set"),
            (format!("{ROUTE}{}", good.replace("[5900]", "[\"5999-5900\"]")), "routes.vnc.targets.allow_ports"),
            (format!("{ROUTE}{}", good.replace("[5900]", "[0]")), "routes.vnc.targets.allow_ports"),
            (format!("{ROUTE}{}", good.replace("[5900]", "[70000]")), "routes.vnc.targets.allow_ports"),
            (format!("{ROUTE}allow = [\"10.0.0.0/8\"]\nallow_ports = [1]\n"), "exactly one of map_file and [jwt]"),
            (format!("{ROUTE}{good}token = \"header\"\n"), "routes.vnc.targets.token"),
            (format!("{ROUTE}{good}query_param = \"t\"\n"), "routes.vnc.targets.query_param"),
            (format!("{ROUTE}{good}token = \"query\"\nquery_param = \"a b\"\n"), "routes.vnc.targets.query_param"),
            (
                format!(
                    "{}{good}",
                    ROUTE.replace("[routes.vnc.targets]", "backend = \"10.0.0.1:5900\"\n[routes.vnc.targets]")
                ),
                "backend cannot be set beside targets",
            ),
            (format!("{}{good}", ROUTE.replace("/vnc/", "/vnc")), "routes.vnc.targets.token"),
            (format!("{}{good}", ROUTE.replace("\"prefix\"", "\"exact\"")), "routes.vnc.targets.token"),
        ] {
            let e = err(&text);
            assert!(e.contains(expected) && e.lines().count() == 1, "{text}\n→ {e}");
        }
        // A query token needs no particular path.
        targets(&format!("{}token = \"query\"\n{good}", ROUTE.replace("\"prefix\"", "\"exact\"")));
    }
}
