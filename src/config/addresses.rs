//! The validated types of the client-address keys: a listener's PROXY protocol, trusted proxies
//! and forwarded header; a route's client rules and the PROXY protocol it sends its backend.
//!
//! Addresses are compared in canonical form: an IPv4-mapped IPv6 address (`::ffff:10.0.0.1`,
//! what a dual-stack socket reports for an IPv4 client) is the IPv4 address, and the lists hold
//! no mapped networks (validation turns them into IPv4 ones), so one comparison covers both.

use std::net::IpAddr;

use ipnet::{IpNet, Ipv4Net};
use serde::Deserialize;

/// A list of networks (CIDRs; a bare address is its own /32 or /128).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cidrs(Vec<IpNet>);

impl Cidrs {
    /// The list; each network in canonical form (no IPv4-mapped IPv6 networks).
    pub fn new(nets: Vec<IpNet>) -> Cidrs {
        Cidrs(nets.into_iter().map(canonical_net).collect())
    }

    /// Whether `ip` (in any form) is in one of the networks.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.0.iter().any(|net| net.contains(&ip))
    }

    /// Whether the list is empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// The networks, comma-separated (`10.0.0.0/8, ::1/128`), for summaries such as `wsgate check`'s.
impl std::fmt::Display for Cidrs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let nets: Vec<String> = self.0.iter().map(ToString::to_string).collect();
        f.write_str(&nets.join(", "))
    }
}

/// An IPv4-mapped IPv6 network (`::ffff:10.0.0.0/104`) as the IPv4 network it maps; any other
/// network as it is.
fn canonical_net(net: IpNet) -> IpNet {
    match net {
        IpNet::V6(v6) if v6.prefix_len() >= 96 => match v6.addr().to_ipv4_mapped() {
            Some(v4) => Ipv4Net::new(v4, v6.prefix_len() - 96).map(IpNet::V4).unwrap_or(net),
            None => net,
        },
        other => other,
    }
}

/// A route's `clients` table: which client addresses may use it (nginx's `allow`/`deny`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientRules {
    /// Addresses allowed; empty: any address not denied.
    pub allow: Cidrs,
    /// Addresses refused, whatever `allow` says.
    pub deny: Cidrs,
}

impl ClientRules {
    /// Whether a client at `ip` may use the route: not denied, and allowed when there is an
    /// allow list.
    pub fn permits(&self, ip: IpAddr) -> bool {
        !self.deny.contains(ip) && (self.allow.is_empty() || self.allow.contains(ip))
    }
}

/// Which request header a listener believes, from a trusted proxy, for the client's address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum ForwardedHeader {
    /// `X-Forwarded-For` (nginx, HAProxy, most cloud load balancers).
    #[serde(rename = "x-forwarded-for")]
    XForwardedFor,
    /// `Forwarded` (RFC 7239), its `for=` parameters.
    #[serde(rename = "forwarded")]
    Forwarded,
    /// Neither: the client's address is the connection's (its PROXY header's, if any).
    #[serde(rename = "none")]
    None,
}

/// How a listener learns its clients' addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Addressing {
    /// Every connection must start with a PROXY protocol header (v1 or v2) from a trusted proxy.
    pub proxy_protocol: bool,
    /// Peers whose PROXY header and forwarded header are believed.
    pub trusted_proxies: Cidrs,
    /// The header believed from trusted proxies.
    pub forwarded_header: ForwardedHeader,
}

impl Default for Addressing {
    fn default() -> Self {
        Addressing {
            proxy_protocol: false,
            trusted_proxies: Cidrs::default(),
            forwarded_header: ForwardedHeader::XForwardedFor,
        }
    }
}

/// The PROXY protocol version a route sends its backend before any other byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProxyVersion {
    /// The text header (`PROXY TCP4 ...\r\n`).
    V1,
    /// The binary header, with the client's identity in TLVs.
    V2,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cidrs(list: &[&str]) -> Cidrs {
        Cidrs::new(list.iter().map(|s| s.parse().unwrap()).collect())
    }

    /// Deny wins over allow; an empty allow list allows any address not denied; mapped IPv6
    /// addresses and mapped networks count as IPv4.
    #[test]
    fn rules_deny_first_and_treat_mapped_addresses_as_ipv4() {
        let rules = ClientRules { allow: cidrs(&["10.0.0.0/8"]), deny: cidrs(&["10.9.0.0/16"]) };
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert!(rules.permits(ip("10.1.2.3")));
        assert!(!rules.permits(ip("10.9.2.3")));
        assert!(!rules.permits(ip("192.168.1.1")));
        assert!(rules.permits(ip("::ffff:10.1.2.3")));
        assert!(!rules.permits(ip("::ffff:10.9.2.3")));
        let deny_only = ClientRules { allow: Cidrs::default(), deny: cidrs(&["::ffff:192.168.0.0/112"]) };
        assert!(!deny_only.permits(ip("192.168.7.7")));
        assert!(deny_only.permits(ip("192.169.0.1")));
        assert!(deny_only.permits(ip("2001:db8::1")));
    }
}
