//! The client-address keys: a listener's `proxy_protocol`, `trusted_proxies` and
//! `forwarded_header`; a route's `clients` rules and `proxy_protocol`.

use std::net::IpAddr;

use ipnet::IpNet;

use super::super::raw::{Choice, RawClients};
use super::super::{Addressing, Backend, Cidrs, ClientRules, ForwardedHeader, ProxyVersion};
use super::Validator;

impl Validator<'_> {
    /// A listener's addressing keys, under `key` (`listeners.NAME`).
    pub(super) fn addressing(
        &mut self,
        key: &str,
        proxy_protocol: Option<bool>,
        trusted_proxies: Option<Vec<String>>,
        forwarded_header: Option<Choice<ForwardedHeader>>,
    ) -> Option<Addressing> {
        let proxy_protocol = proxy_protocol.unwrap_or(false);
        let trusted_key = format!("{key}.trusted_proxies");
        let trusted_proxies = self.cidrs(&trusted_key, trusted_proxies.unwrap_or_default());
        if proxy_protocol && trusted_proxies.as_ref().is_some_and(Cidrs::is_empty) {
            // Believing a PROXY header from anyone would let any client claim any address.
            self.fail(trusted_key, "must list the load balancers' addresses (CIDRs) when proxy_protocol = true");
            return None;
        }
        let forwarded_header =
            self.choice(&format!("{key}.forwarded_header"), forwarded_header, ForwardedHeader::XForwardedFor);
        Some(Addressing { proxy_protocol, trusted_proxies: trusted_proxies?, forwarded_header: forwarded_header? })
    }

    /// A route's `clients` table, under `key` (`routes.NAME.clients`).
    pub(super) fn client_rules(&mut self, key: &str, raw: Option<RawClients>) -> Option<ClientRules> {
        let raw = raw.unwrap_or_default();
        let allow = self.cidrs(&format!("{key}.allow"), raw.allow);
        let deny = self.cidrs(&format!("{key}.deny"), raw.deny);
        Some(ClientRules { allow: allow?, deny: deny? })
    }

    /// A route's `proxy_protocol`, under `key`; only a TCP backend can be sent one.
    pub(super) fn proxy_version(
        &mut self,
        key: &str,
        raw: Option<Choice<ProxyVersion>>,
        backend: Option<&Backend>,
    ) -> Option<Option<ProxyVersion>> {
        let version = match raw {
            None => return Some(None),
            Some(choice) => self.choice(key, Some(choice), ProxyVersion::V1)?,
        };
        if backend == Some(&Backend::Echo) {
            self.fail(key, "the built-in echo backend takes no PROXY protocol header; remove the key");
            return None;
        }
        Some(Some(version))
    }

    /// A list of CIDRs (`10.0.0.0/8`, `2001:db8::/32`) or bare addresses; a network written
    /// with host bits set is refused, since what was meant is unclear.
    pub(super) fn cidrs(&mut self, key: &str, list: Vec<String>) -> Option<Cidrs> {
        let mut nets = Vec::with_capacity(list.len());
        for written in list {
            let trimmed = written.trim();
            let net = match trimmed.parse::<IpNet>() {
                Ok(net) if net.trunc() != net => {
                    self.fail(
                        key,
                        format!("{written:?} has host bits set: write the network, {:?}", net.trunc().to_string()),
                    );
                    return None;
                }
                Ok(net) => net,
                Err(_) => {
                    match trimmed.parse::<IpAddr>() {
                        Ok(ip) => IpNet::from(ip),
                        Err(_) => {
                            self.fail(
                            key,
                            format!("{written:?} is not an IP address or network, e.g. \"10.0.0.0/8\" or \"2001:db8::/32\""),
                        );
                            return None;
                        }
                    }
                }
            };
            nets.push(net);
        }
        Some(Cidrs::new(nets))
    }
}

#[cfg(test)]
mod tests {
    use crate::config::test_support::{MINIMAL, err, ok};
    use crate::config::{ForwardedHeader, ProxyVersion};

    /// A PROXY-protocol listener must name whom it trusts; the keys parse into the config.
    #[test]
    fn proxy_protocol_needs_trusted_proxies() {
        let listener = |extra: &str| MINIMAL.replace("8080\"", &format!("8080\"\n{extra}"));
        let e = err(&listener("proxy_protocol = true"));
        assert!(e.contains("test.toml: listeners.plain.trusted_proxies: must list"), "{e}");
        let e = err(&listener("proxy_protocol = true\ntrusted_proxies = []"));
        assert!(e.contains("listeners.plain.trusted_proxies"), "{e}");
        let c = ok(&listener(
            "proxy_protocol = true\ntrusted_proxies = [\"10.0.0.0/8\", \"::ffff:192.168.0.0/112\", \"127.0.0.1\"]\nforwarded_header = \"forwarded\"",
        ));
        let a = &c.listeners[0].addressing;
        assert!(a.proxy_protocol);
        assert_eq!(a.forwarded_header, ForwardedHeader::Forwarded);
        assert!(a.trusted_proxies.contains("192.168.3.4".parse().unwrap()));
        assert!(a.trusted_proxies.contains("127.0.0.1".parse().unwrap()));
        assert!(!a.trusted_proxies.contains("127.0.0.2".parse().unwrap()));
        let d = ok(MINIMAL);
        assert!(!d.listeners[0].addressing.proxy_protocol);
        assert_eq!(d.listeners[0].addressing.forwarded_header, ForwardedHeader::XForwardedFor);
        // All three reload: a listener can be put behind a balancer without a restart.
        assert_eq!(crate::config::restart_required(&d, &c), None);
        let e = err(&listener("forwarded_header = \"x-real-ip\""));
        assert!(e.contains("listeners.plain.forwarded_header") && e.contains("\"x-real-ip\" is not one of"), "{e}");
    }

    /// Bad CIDRs name their key; host bits are refused; the route keys parse.
    #[test]
    fn client_rules_and_proxy_out_are_validated() {
        let route = |extra: &str| format!("{MINIMAL}{extra}\n");
        let e = err(&route("clients = { allow = [\"10.0.0.0/33\"] }"));
        assert!(e.contains("routes.echo.clients.allow: \"10.0.0.0/33\" is not an IP address or network"), "{e}");
        let e = err(&route("clients = { deny = [\"10.0.0.1/8\"] }"));
        assert!(e.contains("routes.echo.clients.deny") && e.contains("\"10.0.0.0/8\""), "{e}");
        let e = err(&route("proxy_protocol = \"v2\""));
        assert!(e.contains("routes.echo.proxy_protocol: the built-in echo backend"), "{e}");
        let tcp = MINIMAL.replace("builtin:echo", "127.0.0.1:5900");
        let e = err(&format!("{tcp}proxy_protocol = \"v3\"\n"));
        assert!(e.contains("routes.echo.proxy_protocol") && e.contains("\"v1\", \"v2\""), "{e}");
        let c = ok(&format!(
            "{tcp}proxy_protocol = \"v2\"\nclients = {{ allow = [\"10.0.0.0/8\"], deny = [\"10.9.0.0/16\"] }}\n"
        ));
        let r = &c.routes[0];
        assert_eq!(r.proxy_protocol, Some(ProxyVersion::V2));
        assert!(r.clients.permits("10.1.0.1".parse().unwrap()));
        assert!(!r.clients.permits("10.9.0.1".parse().unwrap()));
        assert_eq!(ok(&tcp).routes[0].proxy_protocol, None);
    }
}
