//! Which address a request comes from: the connection's peer (the address a PROXY header
//! carried, on a `proxy_protocol` listener), or, when that peer is a trusted proxy, the address
//! its forwarded header (`X-Forwarded-For` or `Forwarded`, as the listener says) names.
//!
//! The forwarded header is a list that every proxy on the way appends its own peer to, so only
//! its right end is written by proxies we trust; anything to the left may be the client's
//! invention. [`client`] therefore walks it from the right, past the trusted proxies, and takes
//! the first address that is not one: the last hop a trusted proxy saw. An entry that is not an
//! address there (`unknown`, an obfuscated name, garbage) leaves the client unknown, and the
//! server refuses the request (400): taking it to come from the trusted hop that handed it over
//! would let any client be judged as that proxy, which allow lists often name. The list is split
//! on raw bytes, so a client's unreadable entry never hides the address a proxy appended to it.
//!
//! Pure: headers in, address out. The server calls it once per request; the result is what
//! `policy::Request.peer`, route client rules, the session log and PROXY protocol out see.
//! Per-client connection caps count by the connection's peer, which is known at accept.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use hyper::HeaderMap;

use crate::config::{Addressing, ForwardedHeader};

/// The client address of a request that arrived on a connection from `peer`, under the
/// listener's `addressing`; `None` when a trusted proxy's forwarded header names a hop that is
/// not an address where the client should be. A forwarded header names no port (or one nobody
/// checks), so an address taken from it has port 0 unless `Forwarded` gave one.
pub fn client(peer: SocketAddr, headers: &HeaderMap, addressing: &Addressing) -> Option<SocketAddr> {
    let peer = canonical(peer);
    if !addressing.trusted_proxies.contains(peer.ip()) {
        return Some(peer);
    }
    let name = match addressing.forwarded_header {
        ForwardedHeader::None => return Some(peer),
        ForwardedHeader::XForwardedFor => "x-forwarded-for",
        ForwardedHeader::Forwarded => "forwarded",
    };
    // Several header lines form one list, in order (RFC 9110 §5.3).
    let mut hops: Vec<Option<SocketAddr>> = Vec::new();
    for line in headers.get_all(name) {
        // Split before decoding: bytes a client wrote that are not text spoil only its own hop.
        for hop in line.as_bytes().split(|&b| b == b',').map(std::str::from_utf8) {
            hops.push(match (hop, addressing.forwarded_header) {
                (Err(_), _) => None,
                (Ok(hop), ForwardedHeader::Forwarded) => forwarded_for(hop),
                (Ok(hop), _) => parse_hop(hop.trim()),
            });
        }
    }
    let mut nearest = peer;
    for hop in hops.into_iter().rev() {
        match hop {
            Some(addr) if addressing.trusted_proxies.contains(addr.ip()) => nearest = canonical(addr),
            Some(addr) => return Some(canonical(addr)),
            None => return None,
        }
    }
    Some(nearest)
}

/// `addr` with an IPv4-mapped IPv6 address as the IPv4 address it maps.
pub fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

/// The `for=` node of one `Forwarded` element (RFC 7239 §4), if it is an address.
fn forwarded_for(element: &str) -> Option<SocketAddr> {
    let value = element.split(';').find_map(|pair| {
        let (name, value) = pair.split_once('=')?;
        name.trim().eq_ignore_ascii_case("for").then_some(value.trim())
    })?;
    let value = value.strip_prefix('"').and_then(|v| v.strip_suffix('"')).unwrap_or(value);
    parse_hop(value)
}

/// One hop as proxies write it: `192.0.2.1`, `192.0.2.1:4711`, `2001:db8::1`, `[2001:db8::1]`
/// or `[2001:db8::1]:4711`. Anything else (`unknown`, `_hidden`) is `None`.
fn parse_hop(hop: &str) -> Option<SocketAddr> {
    if let Ok(ip) = hop.parse::<IpAddr>() {
        return Some(SocketAddr::new(ip, 0));
    }
    if let Ok(addr) = hop.parse::<SocketAddr>() {
        return Some(addr);
    }
    let inner = hop.strip_prefix('[')?.strip_suffix(']')?;
    inner.parse::<Ipv6Addr>().ok().map(|ip| SocketAddr::new(IpAddr::V6(ip), 0))
}

#[cfg(test)]
mod tests {
    use hyper::header::HeaderValue;

    use super::*;
    use crate::config::Cidrs;

    fn addressing(header: ForwardedHeader, trusted: &[&str]) -> Addressing {
        let nets = trusted.iter().map(|s| s.parse().unwrap()).collect();
        Addressing { proxy_protocol: false, trusted_proxies: Cidrs::new(nets), forwarded_header: header }
    }

    fn headers(name: &'static str, lines: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for line in lines {
            h.append(name, HeaderValue::from_str(line).unwrap());
        }
        h
    }

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    /// The right-most address that is not a trusted proxy is the client; what the client wrote
    /// to its left is ignored.
    #[test]
    fn rightmost_untrusted_hop_is_the_client() {
        let a = addressing(ForwardedHeader::XForwardedFor, &["10.0.0.0/8"]);
        let peer = sa("10.0.0.5:40000");
        let h = headers("x-forwarded-for", &["6.6.6.6, 203.0.113.7", "10.1.1.1"]);
        assert_eq!(client(peer, &h, &a), Some(sa("203.0.113.7:0")));
        // Every hop trusted: the left-most is as far as we can see.
        let h = headers("x-forwarded-for", &["10.2.2.2, 10.1.1.1"]);
        assert_eq!(client(peer, &h, &a), Some(sa("10.2.2.2:0")));
        // No header: the proxy itself.
        assert_eq!(client(peer, &HeaderMap::new(), &a), Some(peer));
        // Garbage where the client should be leaves it unknown (the request is refused), never
        // the trusted hop that handed it over.
        let h = headers("x-forwarded-for", &["203.0.113.7, nonsense, 10.1.1.1"]);
        assert_eq!(client(peer, &h, &a), None);
        // Bytes that are not text spoil only the client's own entry, not the one a proxy
        // appended to the same line.
        let mut h = HeaderMap::new();
        h.append("x-forwarded-for", HeaderValue::from_bytes(b"\xff, 203.0.113.66").unwrap());
        assert_eq!(client(peer, &h, &a), Some(sa("203.0.113.66:0")));
        let mut h = HeaderMap::new();
        h.append("x-forwarded-for", HeaderValue::from_bytes(b"203.0.113.66, \xff").unwrap());
        assert_eq!(client(peer, &h, &a), None);
        // Ports and brackets as proxies write them; mapped addresses are IPv4.
        let h = headers("x-forwarded-for", &["[2001:db8::1]:443"]);
        assert_eq!(client(peer, &h, &a), Some(sa("[2001:db8::1]:443")));
        let h = headers("x-forwarded-for", &["::ffff:198.51.100.2"]);
        assert_eq!(client(peer, &h, &a), Some(sa("198.51.100.2:0")));
    }

    /// From a peer that is not trusted, or with `forwarded_header = "none"`, the header is ignored.
    #[test]
    fn untrusted_peers_and_none_ignore_the_header() {
        let h = headers("x-forwarded-for", &["203.0.113.7"]);
        let a = addressing(ForwardedHeader::XForwardedFor, &["10.0.0.0/8"]);
        assert_eq!(client(sa("192.0.2.9:5000"), &h, &a), Some(sa("192.0.2.9:5000")));
        let none = addressing(ForwardedHeader::None, &["10.0.0.0/8"]);
        assert_eq!(client(sa("10.0.0.5:5000"), &h, &none), Some(sa("10.0.0.5:5000")));
        // Only the configured header counts.
        let fwd = addressing(ForwardedHeader::Forwarded, &["10.0.0.0/8"]);
        assert_eq!(client(sa("10.0.0.5:5000"), &h, &fwd), Some(sa("10.0.0.5:5000")));
        let mapped = sa("[::ffff:192.0.2.9]:5000");
        assert_eq!(client(mapped, &HeaderMap::new(), &a), Some(sa("192.0.2.9:5000")));
    }

    /// RFC 7239 `for=` values: quoted, bracketed, with ports, other parameters around them.
    #[test]
    fn forwarded_for_nodes() {
        let a = addressing(ForwardedHeader::Forwarded, &["10.0.0.0/8"]);
        let peer = sa("10.0.0.5:40000");
        let h = headers("forwarded", &["for=6.6.6.6, for=\"[2001:db8:cafe::17]:4711\";proto=https, For=10.3.3.3"]);
        assert_eq!(client(peer, &h, &a), Some(sa("[2001:db8:cafe::17]:4711")));
        let h = headers("forwarded", &["proto=http;for=192.0.2.60;by=203.0.113.43"]);
        assert_eq!(client(peer, &h, &a), Some(sa("192.0.2.60:0")));
        let h = headers("forwarded", &["for=192.0.2.60, for=unknown"]);
        assert_eq!(client(peer, &h, &a), None);
        // A trusted hop whose own client is obfuscated: unknown too.
        let h = headers("forwarded", &["for=_hidden, for=10.3.3.3"]);
        assert_eq!(client(peer, &h, &a), None);
        // An element without `for=` names nobody: the client is unknown.
        let h = headers("forwarded", &["proto=https"]);
        assert_eq!(client(peer, &h, &a), None);
    }
}
