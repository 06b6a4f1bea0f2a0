//! The validated types of the client-address keys: a listener's PROXY protocol, trusted proxies
//! and forwarded header; a route's client rules and the PROXY protocol it sends its backend.
//!
//! Addresses are compared in canonical form ([`canonical_ip`]): an IPv4-mapped IPv6 address
//! (`::ffff:10.0.0.1`, what a dual-stack socket reports for an IPv4 client) and a NAT64 address
//! of the well-known prefix (`64:ff9b::10.0.0.1`, RFC 6052) are the IPv4 address they carry, and
//! the lists hold no such networks (validation turns them into IPv4 ones), so one comparison
//! covers every form.

use std::net::{IpAddr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

/// NAT64's well-known prefix: `64:ff9b::a.b.c.d` is reached (through a NAT64 gateway) as
/// `a.b.c.d`.
const NAT64: Ipv6Net = match Ipv6Net::new(Ipv6Addr::new(0x64, 0xff9b, 0, 0, 0, 0, 0, 0), 96) {
    Ok(net) => net,
    Err(_) => panic!("a /96 is a valid prefix"),
};

/// `ip` as lists, limits and allow-lists see it: the IPv4 address an IPv4-mapped or well-known
/// NAT64 address carries, else `ip`. Counting a NAT64 client by its IPv6 prefix would make every
/// IPv4 client behind the gateway one client, and matching a NAT64 target as IPv6 would let an
/// IPv6 network in an allow-list reach all of IPv4.
pub fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) if NAT64.contains(&v6) => {
            let [.., a, b, c, d] = v6.octets();
            IpAddr::from([a, b, c, d])
        }
        other => other.to_canonical(),
    }
}
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
        let ip = canonical_ip(ip);
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

/// An IPv4-mapped or NAT64 IPv6 network (`::ffff:10.0.0.0/104`, `64:ff9b::10.0.0.0/104`) as the
/// IPv4 network it carries; any other network as it is.
pub(crate) fn canonical_net(net: IpNet) -> IpNet {
    match (net, canonical_ip(net.addr())) {
        (IpNet::V6(v6), IpAddr::V4(v4)) if v6.prefix_len() >= 96 => {
            Ipv4Net::new(v4, v6.prefix_len() - 96).map(IpNet::V4).unwrap_or(net)
        }
        _ => net,
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
        // NAT64 addresses and networks of the well-known prefix count as the IPv4 they carry.
        assert!(!rules.permits(ip("64:ff9b::10.9.2.3")));
        assert!(rules.permits(ip("64:ff9b::10.1.2.3")));
        let nat64 = cidrs(&["64:ff9b::10.0.0.0/104"]);
        assert!(nat64.contains(ip("10.1.1.1")) && nat64.contains(ip("64:ff9b::10.1.1.1")));
        assert!(!nat64.contains(ip("11.1.1.1")));
        // An IPv6 network that holds the NAT64 prefix does not reach IPv4 through it.
        assert!(!cidrs(&["::/1"]).contains(ip("64:ff9b::10.1.1.1")));
    }
}
