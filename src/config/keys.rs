//! What a reload does with each key of the file: applies its new value, or is refused because
//! only a restart can change it. Every key is declared here, and a unit test reads the key set
//! back from the `raw` structs through serde, so a new key cannot go unclassified.

use super::Config;

/// What a reload (SIGHUP) does when it finds a key changed.
pub(super) enum OnChange {
    /// The new value applies to connections accepted from then on.
    Reload,
    /// A running gateway cannot change it, so the reload is refused. The function compares the
    /// running config with the new one and names the key that changed (`listeners.NAME` with
    /// the listener's name filled in), or returns `None` when it did not.
    Restart(fn(&Config, &Config) -> Option<String>),
}

use OnChange::{Reload, Restart};

/// Every key of the file (`NAME` standing for a listener or route name), in file order, which is
/// also the order in which restart-only changes are looked for. A unit test compares this list
/// with the keys the `raw` structs accept, so a new key cannot go unclassified.
pub(super) const KEYS: &[(&str, OnChange)] = &[
    // The set of listeners, their addresses and schemes are compared in one pass, in name
    // order, so the first listener that differs is named.
    ("listeners.NAME", Restart(listeners_changed)),
    ("listeners.NAME.address", Restart(listeners_changed)),
    ("listeners.NAME.tls", Restart(listeners_changed)),
    ("listeners.NAME.tls.cert", Reload),
    ("listeners.NAME.tls.key", Reload),
    ("listeners.NAME.tls.generate_self_signed", Reload),
    // Read from the snapshot at each accept and request, so they apply to new connections.
    ("listeners.NAME.proxy_protocol", Reload),
    ("listeners.NAME.trusted_proxies", Reload),
    ("listeners.NAME.forwarded_header", Reload),
    // Read again, with the certificates, by every reload.
    ("listeners.NAME.tls.client_ca", Reload),
    ("listeners.NAME.tls.client_auth", Reload),
    ("listeners.NAME.tls.client_crls", Reload),
    ("listeners.NAME.tls.session_tickets", Reload),
    ("listeners.NAME.tls.ticket_keys", Reload),
    ("routes.NAME.path", Reload),
    ("routes.NAME.match", Reload),
    ("routes.NAME.host", Reload),
    ("routes.NAME.backend", Reload),
    ("routes.NAME.allowed_origins", Reload),
    ("routes.NAME.accept", Reload),
    ("routes.NAME.outbound", Reload),
    ("routes.NAME.subprotocols", Reload),
    ("routes.NAME.on_backend_unavailable", Reload),
    ("routes.NAME.clients.allow", Reload),
    ("routes.NAME.clients.deny", Reload),
    ("routes.NAME.proxy_protocol", Reload),
    ("routes.NAME.client_certs", Reload),
    ("routes.NAME.half_close", Reload),
    // Pools: a reload builds new pools; each member's health and session count are kept by
    // (route, name), so a reload changes weights, caps and drains without losing them.
    ("routes.NAME.backends", Reload),
    ("routes.NAME.balance", Reload),
    ("routes.NAME.health.interval_secs", Reload),
    ("routes.NAME.health.timeout_secs", Reload),
    ("routes.NAME.health.rise", Reload),
    ("routes.NAME.health.fall", Reload),
    ("routes.NAME.health.send", Reload),
    ("routes.NAME.health.expect", Reload),
    ("routes.NAME.health.eject_after_failures", Reload),
    ("routes.NAME.health.eject_secs", Reload),
    // Backend TLS: the files are read again by every reload, and apply to new sessions.
    ("routes.NAME.backend_tls.server_name", Reload),
    ("routes.NAME.backend_tls.ca", Reload),
    ("routes.NAME.backend_tls.client_cert", Reload),
    ("routes.NAME.backend_tls.client_key", Reload),
    ("routes.NAME.backend_tls.insecure", Reload),
    ("routes.NAME.limits.max_message_bytes", Reload),
    ("routes.NAME.limits.ws_read_buffer_bytes", Reload),
    ("routes.NAME.limits.backend_read_bytes", Reload),
    ("routes.NAME.limits.connect_timeout_secs", Reload),
    ("routes.NAME.limits.close_timeout_secs", Reload),
    ("routes.NAME.limits.tcp_keepalive_secs", Reload),
    ("routes.NAME.limits.max_pending_connects", Reload),
    ("routes.NAME.limits.max_sessions", Reload),
    ("routes.NAME.limits.tcp_user_timeout_secs", Reload),
    ("routes.NAME.limits.ping_interval_secs", Reload),
    ("routes.NAME.limits.pong_timeout_secs", Reload),
    ("routes.NAME.limits.idle_timeout_secs", Reload),
    ("routes.NAME.limits.max_session_secs", Reload),
    ("routes.NAME.limits.max_messages_per_sec", Reload),
    // Access policy (issue 16, credentials): the files named are read again on every reload.
    ("routes.NAME.on_refusal", Reload),
    ("routes.NAME.auth.type", Reload),
    ("routes.NAME.auth.realm", Reload),
    ("routes.NAME.auth.cookie", Reload),
    ("routes.NAME.auth.query", Reload),
    ("routes.NAME.auth.subprotocol_prefix", Reload),
    ("routes.NAME.auth.tokens", Reload),
    ("routes.NAME.auth.tokens_file", Reload),
    ("routes.NAME.auth.keys", Reload),
    ("routes.NAME.auth.jwks_file", Reload),
    ("routes.NAME.auth.algorithms", Reload),
    ("routes.NAME.auth.audience", Reload),
    ("routes.NAME.auth.issuer", Reload),
    ("routes.NAME.auth.leeway_secs", Reload),
    ("routes.NAME.auth.routes_claim", Reload),
    ("routes.NAME.auth.close_at_expiry", Reload),
    ("routes.NAME.auth.expiry_grace_secs", Reload),
    ("routes.NAME.auth.htpasswd", Reload),
    ("routes.NAME.auth.user_label", Reload),
    // Token-mapped targets (issue 17): the map file and JWT keys are read again on every reload;
    // live sessions keep the target they were given.
    ("routes.NAME.targets.token", Reload),
    ("routes.NAME.targets.query_param", Reload),
    ("routes.NAME.targets.map_file", Reload),
    ("routes.NAME.targets.format", Reload),
    ("routes.NAME.targets.allow", Reload),
    ("routes.NAME.targets.allow_ports", Reload),
    ("routes.NAME.targets.jwt.keys", Reload),
    ("routes.NAME.targets.jwt.jwks_file", Reload),
    ("routes.NAME.targets.jwt.algorithms", Reload),
    ("routes.NAME.targets.jwt.audience", Reload),
    ("routes.NAME.targets.jwt.issuer", Reload),
    ("routes.NAME.targets.jwt.leeway_secs", Reload),
    // The connection and handshake semaphores are sized once, when the gateway binds.
    (
        "limits.max_connections",
        Restart(|a, b| differs("limits.max_connections", a.limits.max_connections, b.limits.max_connections)),
    ),
    (
        "limits.max_handshakes",
        Restart(|a, b| differs("limits.max_handshakes", a.limits.max_handshakes, b.limits.max_handshakes)),
    ),
    ("limits.handshake_timeout_secs", Reload),
    (
        "limits.handshake_shed_after_secs",
        Restart(|a, b| {
            differs("limits.handshake_shed_after_secs", a.limits.handshake_shed_after, b.limits.handshake_shed_after)
        }),
    ),
    ("limits.request_head_timeout_secs", Reload),
    // Listening sockets are created once, at start.
    (
        "limits.listen_backlog",
        Restart(|a, b| differs("limits.listen_backlog", a.limits.listen_backlog, b.limits.listen_backlog)),
    ),
    ("limits.max_memory_bytes", Reload),
    ("limits.proxy_header_max_bytes", Reload),
    ("limits.max_pending_connects", Reload),
    ("limits.per_client.max_connections", Reload),
    ("limits.per_client.max_handshakes", Reload),
    ("limits.per_client.new_connections_per_sec", Reload),
    ("limits.per_client.new_connections_burst", Reload),
    ("limits.per_client.ipv6_prefix", Reload),
    ("limits.per_client.max_tracked", Reload),
    ("limits.per_client.max_auth_failures", Reload),
    ("limits.per_client.auth_failure_window_secs", Reload),
    ("limits.per_client.auth_block_secs", Reload),
    ("limits.max_password_checks", Reload),
    ("limits.max_message_bytes", Reload),
    ("limits.ws_read_buffer_bytes", Reload),
    ("limits.backend_read_bytes", Reload),
    ("limits.connect_timeout_secs", Reload),
    ("limits.close_timeout_secs", Reload),
    ("limits.tcp_keepalive_secs", Reload),
    ("limits.tcp_user_timeout_secs", Reload),
    ("limits.ping_interval_secs", Reload),
    ("limits.pong_timeout_secs", Reload),
    ("limits.idle_timeout_secs", Reload),
    ("limits.max_session_secs", Reload),
    ("limits.max_messages_per_sec", Reload),
    ("builtin.tcp_echo", Restart(|a, b| differs("builtin.tcp_echo", a.builtin.tcp_echo, b.builtin.tcp_echo))),
    ("shutdown.drain_delay_secs", Reload),
    ("shutdown.close_window_secs", Reload),
    ("shutdown.deadline_secs", Reload),
    ("console.enabled", Reload),
    ("console.path", Reload),
    // Both keys decide one listener, reported as `admin`.
    ("admin.enabled", Restart(|a, b| differs("admin", a.admin, b.admin))),
    ("admin.address", Restart(|a, b| differs("admin", a.admin, b.admin))),
    // Who may read it: applied to admin connections accepted after the reload (files reread).
    ("admin.tls", Reload),
    ("admin.tls.cert", Reload),
    ("admin.tls.key", Reload),
    ("admin.token_hashes", Reload),
    ("admin.tokens_file", Reload),
    ("admin.open_paths", Reload),
    // The log subscriber and the metrics recorder are installed once, at start.
    ("log.format", Restart(|a, b| differs("log.format", a.log.format, b.log.format))),
    (
        "log.max_buffered_lines",
        Restart(|a, b| differs("log.max_buffered_lines", a.log.max_buffered_lines, b.log.max_buffered_lines)),
    ),
    ("metrics.enabled", Restart(|a, b| differs("metrics.enabled", a.metrics, b.metrics))),
    // The file watcher reads them from the running config after every reload (a reload it
    // triggered included), so turning it off, on, or changing its pace needs no restart.
    ("reload.watch", Reload),
    ("reload.watch_interval_secs", Reload),
];

fn differs<T: PartialEq>(key: &str, old: T, new: T) -> Option<String> {
    (old != new).then(|| key.to_string())
}

/// The first listener added, moved or changed between `ws` and `wss`, or one removed.
fn listeners_changed(old: &Config, new: &Config) -> Option<String> {
    let shape =
        |c: &Config| c.listeners.iter().map(|l| (l.name.clone(), l.address, l.tls.is_some())).collect::<Vec<_>>();
    if shape(old) == shape(new) {
        return None;
    }
    for l in &new.listeners {
        match old.listeners.iter().find(|o| o.name == l.name) {
            None => return Some(format!("listeners.{} (new listener)", l.name)),
            Some(o) if o.address != l.address => return Some(format!("listeners.{}.address", l.name)),
            Some(o) if o.tls.is_some() != l.tls.is_some() => return Some(format!("listeners.{}.tls", l.name)),
            Some(_) => {}
        }
    }
    Some("listeners (a listener was removed)".into())
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use serde::Deserialize;
    use serde::de::DeserializeOwned;

    use super::{KEYS, OnChange};
    use crate::config::raw::RawConfig;
    use crate::config::restart_required;
    use crate::config::test_support::{MINIMAL, ok};

    /// The keys `T` accepts, read back from serde (not from a hand-kept list): `(leaves, tables)`,
    /// with `NAME` for the key of a map of tables. Each table is probed with an unknown key, and
    /// `deny_unknown_fields` answers with the list of the fields it expected.
    fn keys_of<T: DeserializeOwned>() -> (BTreeSet<String>, BTreeSet<String>) {
        let (mut leaves, mut tables) = (BTreeSet::new(), BTreeSet::new());
        walk::<T>(&mut Vec::new(), &mut leaves, &mut tables);
        (leaves, tables)
    }

    fn walk<T: DeserializeOwned>(path: &mut Vec<String>, leaves: &mut BTreeSet<String>, tables: &mut BTreeSet<String>) {
        let fields = match fields_at::<T>(path) {
            Some(fields) => fields,
            None => {
                path.push("NAME".into());
                if fields_at::<T>(path).is_some() {
                    tables.insert(path[..path.len() - 1].join("."));
                    walk::<T>(path, leaves, tables);
                } else {
                    leaves.insert(path[..path.len() - 1].join("."));
                }
                path.pop();
                return;
            }
        };
        if !path.is_empty() {
            tables.insert(path.join("."));
        }
        for field in fields {
            path.push(field);
            walk::<T>(path, leaves, tables);
            path.pop();
        }
    }

    /// The fields of the table at `path` if it is a struct that denies unknown keys.
    fn fields_at<T: DeserializeOwned>(path: &[String]) -> Option<Vec<String>> {
        let header = path.iter().map(|k| if k == "NAME" { "n" } else { k }).collect::<Vec<_>>().join(".");
        let text = if path.is_empty() { "zzz = 1\n".to_string() } else { format!("[{header}]\nzzz = 1\n") };
        let message = toml::from_str::<T>(&text).err()?.message().to_string();
        let rest = message.strip_prefix("unknown field `zzz`")?;
        Some(rest.split('`').skip(1).step_by(2).map(str::to_string).collect())
    }

    /// Every key the file may hold is declared reloadable or restart-only in `KEYS`, and `KEYS`
    /// names no key the file cannot hold: a new field fails here until it is classified.
    #[test]
    fn every_key_is_classified() {
        let (leaves, tables) = keys_of::<RawConfig>();
        assert!(leaves.len() >= 30 && leaves.contains("routes.NAME.outbound"), "{leaves:?}");
        let declared: BTreeSet<String> = KEYS.iter().map(|(k, _)| k.to_string()).collect();
        assert_eq!(declared.len(), KEYS.len(), "a key is declared twice");
        let missing: Vec<_> = leaves.difference(&declared).collect();
        assert!(missing.is_empty(), "not classified as Reload or Restart in keys::KEYS: {missing:?}");
        let unknown: Vec<_> = declared.iter().filter(|k| !leaves.contains(*k) && !tables.contains(*k)).collect();
        assert!(unknown.is_empty(), "in keys::KEYS but not a key of the file: {unknown:?}");
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Probe {
        kept: Option<u64>,
        #[serde(default)]
        named: BTreeMap<String, ProbeTable>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct ProbeTable {
        added: String,
        #[serde(rename = "match")]
        renamed: Option<bool>,
    }

    /// The key discovery behind `every_key_is_classified` sees a field as soon as a struct has
    /// it (nested, under a map, renamed), so a new key cannot slip past the classification.
    #[test]
    fn key_discovery_sees_every_field() {
        let (leaves, tables) = keys_of::<Probe>();
        let expected = ["kept", "named.NAME.added", "named.NAME.match"];
        assert_eq!(leaves, expected.iter().map(|k| k.to_string()).collect::<BTreeSet<_>>());
        assert_eq!(tables, ["named", "named.NAME"].iter().map(|k| k.to_string()).collect::<BTreeSet<_>>());
    }

    /// Each restart-only key refuses a reload under its documented name; reloadable keys do not.
    #[test]
    fn restart_only_changes_are_named() {
        let base = ok(MINIMAL);
        let changed = |extra: &str| restart_required(&base, &ok(&format!("{MINIMAL}{extra}")));
        assert_eq!(restart_required(&base, &ok(MINIMAL)), None);
        assert_eq!(changed("[limits]\nmax_connections = 5\n").as_deref(), Some("limits.max_connections"));
        assert_eq!(changed("[limits]\nmax_handshakes = 5\n").as_deref(), Some("limits.max_handshakes"));
        assert_eq!(changed("[builtin]\ntcp_echo = \"127.0.0.1:7\"\n").as_deref(), Some("builtin.tcp_echo"));
        assert_eq!(changed("[admin]\nenabled = false\n").as_deref(), Some("admin"));
        assert_eq!(changed("[admin]\naddress = \"127.0.0.1:9\"\n").as_deref(), Some("admin"));
        assert_eq!(changed("[log]\nformat = \"json\"\n").as_deref(), Some("log.format"));
        assert_eq!(changed("[metrics]\nenabled = false\n").as_deref(), Some("metrics.enabled"));
        let other = "[listeners.other]\naddress = \"127.0.0.1:8081\"\n";
        assert_eq!(changed(other).as_deref(), Some("listeners.other (new listener)"));
        let moved = ok(&MINIMAL.replace("8080", "8082"));
        assert_eq!(restart_required(&base, &moved).as_deref(), Some("listeners.plain.address"));
        let tls = ok(&MINIMAL.replace("8080\"", "8080\"\ntls = { cert = \"c\", key = \"k\" }"));
        assert_eq!(restart_required(&base, &tls).as_deref(), Some("listeners.plain.tls"));
        let two = ok(&format!("{MINIMAL}{other}"));
        assert_eq!(restart_required(&two, &base).as_deref(), Some("listeners (a listener was removed)"));
        // Reloadable: routes, other limits, shutdown timings, the console.
        let reloadable = "outbound = \"text\"\n[limits]\nconnect_timeout_secs = 1\n[shutdown]\ndrain_delay_secs = 0\n\
                          [console]\nenabled = true\n";
        assert_eq!(changed(reloadable), None);
        assert!(KEYS.iter().any(|(_, c)| matches!(c, OnChange::Reload)));
    }
}
