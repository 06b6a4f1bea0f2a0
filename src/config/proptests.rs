//! Property tests of config parsing: whatever the file holds, [`parse`] returns (it never
//! panics), and every problem it reports is one line naming the file and, when a key's value is
//! at fault, that key; values that are valid come back as written.
//!
//! The keys come from `keys::KEYS`, so a key added there is exercised here without a change. The
//! case counts keep the three properties to a few seconds of a debug `cargo test`; set
//! `PROPTEST_CASES` for a longer run.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use proptest::prelude::*;
use proptest::sample::select;
use toml::{Table, Value};

use super::keys::KEYS;
use super::*;

const FILE: &str = "dir/p.toml";

/// The one route and one listener the mutations start from; a second name sorts after these,
/// so a duplicate-address problem is reported on the new listener, the one mutated.
const BASE: &str = r#"
[listeners.plain]
address = "127.0.0.1:8080"
[routes.r]
path = "/r"
backend = "127.0.0.1:5900"
"#;

/// Strings a config holds, so that generated values are often valid and reach validation.
const REALISTIC: &[&str] = &[
    "",
    "127.0.0.1:8080",
    "[::1]:9",
    "0.0.0.0:0",
    "localhost:80",
    "builtin:echo",
    "builtin:ftp",
    "tcp://a.internal:1",
    "a.internal:0",
    "::1:80",
    "/",
    "/x/",
    "x",
    "/a?b",
    "*.example.com",
    "example.com",
    "example.com:80",
    "https://app.example.com",
    "HTTP://A:80/",
    "null",
    "*",
    "text",
    "binary",
    "mirror",
    "exact",
    "prefix",
    "close",
    "http",
    "json",
    "mqtt",
    "a b",
    "c.pem",
];

fn string() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => select(REALISTIC).prop_map(str::to_string),
        1 => any::<String>(),
        1 => "[ -~]{0,12}",
    ]
}

/// Any TOML value, biased towards the numbers and strings that limits and routes hold.
fn value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        any::<i64>().prop_map(Value::Integer),
        prop_oneof![-2..3i64, 1000..2000i64, 60_000..70_000i64, Just(32767), Just(86_400), Just(86_401)]
            .prop_map(Value::Integer),
        any::<f64>().prop_map(Value::Float),
        prop_oneof![-1.0..2.0f64, 0.0..100_000.0f64, Just(-0.0), Just(f64::NAN), Just(f64::INFINITY)]
            .prop_map(Value::Float),
        any::<bool>().prop_map(Value::Boolean),
        string().prop_map(Value::String),
        Just(Value::Datetime("1979-05-27T07:32:00Z".parse().expect("a valid datetime"))),
    ];
    leaf.prop_recursive(2, 12, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map(prop_oneof![select(leaf_names()), "[a-z]{1,5}".boxed()], inner, 0..3)
                .prop_map(|m| Value::Table(m.into_iter().collect())),
        ]
    })
}

/// A value of the type the key `path` holds (told from its name), with arbitrary contents, or
/// most of the time; any value otherwise. Values of the right type are what reach validation.
fn value_for(path: &[String]) -> BoxedStrategy<Value> {
    let last = path.last().map_or("", String::as_str);
    let strings = || prop::collection::vec(string().prop_map(Value::String), 0..4).prop_map(Value::Array);
    let typed = match last {
        _ if last.ends_with("_secs") => prop_oneof![
            prop_oneof![-2..3i64, 1..100_000i64, any::<i64>()].prop_map(Value::Integer),
            prop_oneof![-1.0..2.0f64, 0.0..100_000.0f64, any::<f64>()].prop_map(Value::Float),
        ]
        .boxed(),
        _ if last.ends_with("_bytes") || last.starts_with("max_") => {
            prop_oneof![-2..3i64, 1000..2000i64, any::<i64>(), Just(1 << 30), Just((1 << 30) + 1)]
                .prop_map(Value::Integer)
                .boxed()
        }
        "enabled" | "generate_self_signed" => any::<bool>().prop_map(Value::Boolean).boxed(),
        "allowed_origins" | "accept" | "subprotocols" => strings().boxed(),
        "tls" => (string(), string(), any::<bool>())
            .prop_map(|(cert, key, generate)| {
                let mut t = Table::new();
                t.insert("cert".into(), Value::String(cert));
                t.insert("key".into(), Value::String(key));
                t.insert("generate_self_signed".into(), Value::Boolean(generate));
                Value::Table(t)
            })
            .boxed(),
        _ => string().prop_map(Value::String).boxed(),
    };
    prop_oneof![3 => typed, 1 => value()].boxed()
}

/// The last part of every declared key (`address`, `max_connections`, ...).
fn leaf_names() -> Vec<String> {
    KEYS.iter().map(|(k, _)| k.rsplit('.').next().unwrap_or(k).to_string()).collect()
}

/// A declared key with `NAME` made a listener's or route's name: one of the base's, or a new one.
fn key() -> impl Strategy<Value = Vec<String>> {
    let names = select(vec!["plain", "r", "zz"]);
    (select(KEYS.iter().map(|(k, _)| *k).collect::<Vec<_>>()), names).prop_map(|(k, name)| {
        k.split('.').map(|part| if part == "NAME" { name.to_string() } else { part.to_string() }).collect()
    })
}

/// Checks what holds for any outcome: every problem is one line that starts with the file and
/// names its key, if it has one.
fn check_lines(result: &Result<Config, ConfigErrors>) -> Result<(), TestCaseError> {
    let Err(errors) = result else { return Ok(()) };
    prop_assert!(!errors.0.is_empty());
    for e in &errors.0 {
        let line = e.to_string();
        prop_assert!(!line.contains(['\n', '\r']), "more than one line: {line:?}");
        prop_assert!(line.starts_with(FILE), "does not name the file: {line:?}");
        prop_assert!(!e.problem.is_empty(), "no problem stated: {line:?}");
        if !e.key.is_empty() {
            prop_assert!(line.contains(&format!(": {}: ", e.key)), "does not name its key: {line:?}");
        }
    }
    Ok(())
}

fn set(table: &mut Table, path: &[String], value: Value) {
    let (last, parents) = path.split_last().expect("keys have at least one part");
    let mut t = table;
    for p in parents {
        let entry = t.entry(p.clone()).or_insert_with(|| Value::Table(Table::new()));
        if !entry.is_table() {
            *entry = Value::Table(Table::new());
        }
        t = entry.as_table_mut().expect("made a table above");
    }
    t.insert(last.clone(), value);
}

/// One line of a TOML-ish file: headers and assignments of declared keys, and junk.
fn line() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => key().prop_map(|k| format!("[{}]", k[..k.len() - 1].join("."))),
        1 => key().prop_map(|k| format!("[[{}]]", k[0])),
        6 => (select(leaf_names()), value()).prop_map(|(k, v)| format!("{k} = {v}")),
        2 => key().prop_flat_map(|k| (value_for(&k), Just(k))).prop_map(|(v, k)| format!("{} = {v}", k.join("."))),
        1 => (select(leaf_names()), "[ -~]{0,10}").prop_map(|(k, v)| format!("{k} = {v}")),
        1 => "[ -~]{0,20}",
        1 => any::<String>(),
    ]
}

/// `n` cases, or `PROPTEST_CASES` when it is set (for a longer run).
fn cases(n: u32) -> ProptestConfig {
    let default = ProptestConfig::default();
    let cases = if std::env::var_os("PROPTEST_CASES").is_some() { default.cases } else { n };
    ProptestConfig { cases, ..default }
}

proptest! {
    #![proptest_config(cases(1000))]

    /// A file of random headers, assignments and junk never panics the parser, and every
    /// problem it reports is one line naming the file (and the key, when there is one).
    #[test]
    fn any_text_gives_a_config_or_one_line_per_problem(
        (base, lines) in (any::<bool>(), prop::collection::vec(line(), 0..14)),
    ) {
        // Lines at the top, before the base's tables, may set any key of the file by its dotted
        // name; the base makes the rest a config that can pass.
        let text = format!("{}\n{}", lines.join("\n"), if base { BASE } else { "" });
        check_lines(&parse(&text, Path::new(FILE)))?;
    }

    /// Any value for any declared key of a valid file either parses or is reported on the key
    /// itself, a key inside it (a table's field), the table holding it, or a key beside it in
    /// the same table (checks that compare two keys, such as the shutdown deadline).
    #[test]
    fn a_bad_value_is_reported_on_its_key((path, v) in key().prop_flat_map(|k| (Just(k.clone()), value_for(&k)))) {
        let mut table: Table = toml::from_str(BASE).expect("the base parses");
        set(&mut table, &path, v);
        let Ok(text) = toml::to_string(&table) else { return Ok(()) };
        let result = parse(&text, Path::new(FILE));
        check_lines(&result)?;
        let Err(errors) = result else { return Ok(()) };
        let mutated = path.join(".");
        let parent = &path[..path.len() - 1];
        let related = |key: &str| {
            let parts: Vec<&str> = key.split('.').collect();
            let prefix = parts.len().min(path.len());
            parts[..prefix] == path[..prefix] || parts[..parts.len() - 1] == *parent
        };
        prop_assert!(
            errors.0.iter().all(|e| !e.key.is_empty()) && errors.0.iter().any(|e| related(&e.key)),
            "{mutated} = {}\n{errors}", text
        );
    }

    /// Valid values for the keys of every section come back as written.
    #[test]
    fn valid_values_round_trip(c in valid()) {
        let text = toml::to_string(&c.table()).expect("a table of plain values serializes");
        let config = parse(&text, Path::new(FILE)).map_err(|e| TestCaseError::fail(format!("{e}\n{text}")))?;
        c.assert_read_back(&config, &text)?;
    }
}

/// Values generated within every documented range, and what the file says with them.
#[derive(Debug, Clone)]
struct Valid {
    address: SocketAddr,
    counts: [(&'static str, u64); 5],
    timeouts: [(&'static str, f64); 3],
    keepalive: u16,
    /// drain delay, close window, deadline.
    shutdown: (f64, f64, f64),
    path: String,
    prefix: bool,
    host: Option<String>,
    backend: (String, u16),
    origins: Vec<String>,
    accept: (bool, bool),
    outbound: usize,
    subprotocols: Vec<String>,
    http_unavailable: bool,
    json: bool,
}

const OUTBOUND: [(&str, Outbound); 3] =
    [("binary", Outbound::Binary), ("text", Outbound::Text), ("mirror", Outbound::Mirror)];

/// Seconds as a config holds them: whole, or with up to three decimals.
fn seconds(max_millis: u64) -> impl Strategy<Value = f64> {
    prop_oneof![(1..=max_millis / 1000).prop_map(|s| s as f64), (1..=max_millis).prop_map(|ms| ms as f64 / 1000.0)]
}

fn valid() -> impl Strategy<Value = Valid> {
    let ip = prop_oneof![
        any::<[u8; 4]>().prop_map(std::net::IpAddr::from),
        any::<[u16; 8]>().prop_map(std::net::IpAddr::from),
    ];
    let label = "[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?";
    let name = prop::collection::vec(label, 1..4).prop_map(|l| l.join("."));
    let host = prop::option::of((any::<bool>(), name.clone()).prop_map(|(w, n)| if w { format!("*.{n}") } else { n }));
    let origin = (any::<bool>(), name.clone(), prop::option::of(1..=65535u16)).prop_map(|(tls, n, port)| {
        let scheme = if tls { "https" } else { "http" };
        match port {
            Some(p) if p != if tls { 443 } else { 80 } => format!("{scheme}://{n}:{p}"),
            _ => format!("{scheme}://{n}"),
        }
    });
    let token = "[!#$%&'*+.^_`|~0-9A-Za-z-]{1,10}";
    (
        (ip, 0..=65535u16).prop_map(|(ip, port)| SocketAddr::new(ip, port)),
        (1..=1_000_000u64, 1..=100_000u64, 1024..=(1u64 << 30), 1024..=(16u64 << 20), 1024..=(16u64 << 20)),
        (seconds(86_400_000), seconds(86_400_000), seconds(86_400_000)),
        0..=32767u16,
        (0..=1000u64, 0..=1000u64, 1..=1000u64),
        ("(/[a-zA-Z0-9._~-]{0,6}){1,3}", any::<bool>(), host),
        (name, 1..=65535u16),
        (prop::collection::vec(origin, 0..3), (any::<bool>(), any::<bool>()), 0..3usize),
        (prop::collection::hash_set(token, 0..4), any::<bool>(), any::<bool>()),
    )
        .prop_map(|(address, counts, timeouts, keepalive, shutdown, route, backend, more, last)| {
            let (path, prefix, host) = route;
            let (origins, accept, outbound) = more;
            let (subprotocols, http_unavailable, json) = last;
            // The deadline must exceed the drain delay and the close window together.
            let (drain, window, extra) = (shutdown.0 as f64 / 10.0, shutdown.1 as f64 / 10.0, shutdown.2 as f64 / 10.0);
            Valid {
                address,
                counts: [
                    ("max_connections", counts.0),
                    ("max_handshakes", counts.1),
                    ("max_message_bytes", counts.2),
                    ("ws_read_buffer_bytes", counts.3),
                    ("backend_read_bytes", counts.4),
                ],
                timeouts: [
                    ("handshake_timeout_secs", timeouts.0),
                    ("connect_timeout_secs", timeouts.1),
                    ("close_timeout_secs", timeouts.2),
                ],
                keepalive,
                shutdown: (drain, window, drain + window + extra),
                path,
                prefix,
                host,
                backend,
                origins,
                // At least one type is accepted.
                accept: (accept.0, accept.1 || !accept.0),
                outbound,
                subprotocols: subprotocols.into_iter().collect(),
                http_unavailable,
                json,
            }
        })
}

impl Valid {
    fn table(&self) -> Table {
        let mut t: Table = toml::from_str(BASE).expect("the base parses");
        let mut put = |key: &str, v: Value| set(&mut t, &key.split('.').map(str::to_string).collect::<Vec<_>>(), v);
        put("listeners.plain.address", Value::String(self.address.to_string()));
        for (k, v) in self.counts {
            put(&format!("limits.{k}"), Value::Integer(v as i64));
        }
        for (k, v) in self.timeouts {
            put(&format!("limits.{k}"), Value::Float(v));
        }
        put("limits.tcp_keepalive_secs", Value::Integer(self.keepalive.into()));
        put("shutdown.drain_delay_secs", Value::Float(self.shutdown.0));
        put("shutdown.close_window_secs", Value::Float(self.shutdown.1));
        put("shutdown.deadline_secs", Value::Float(self.shutdown.2));
        put("routes.r.path", Value::String(self.path.clone()));
        put("routes.r.match", Value::String(if self.prefix { "prefix" } else { "exact" }.into()));
        if let Some(h) = &self.host {
            put("routes.r.host", Value::String(h.clone()));
        }
        put("routes.r.backend", Value::String(format!("tcp://{}:{}", self.backend.0, self.backend.1)));
        let strings = |v: &[String]| Value::Array(v.iter().cloned().map(Value::String).collect());
        put("routes.r.allowed_origins", strings(&self.origins));
        let accept: Vec<String> = [(self.accept.0, "text"), (self.accept.1, "binary")]
            .into_iter()
            .filter(|(on, _)| *on)
            .map(|(_, k)| k.to_string())
            .collect();
        put("routes.r.accept", strings(&accept));
        put("routes.r.outbound", Value::String(OUTBOUND[self.outbound].0.into()));
        put("routes.r.subprotocols", strings(&self.subprotocols));
        put(
            "routes.r.on_backend_unavailable",
            Value::String(if self.http_unavailable { "http" } else { "close" }.into()),
        );
        put("log.format", Value::String(if self.json { "json" } else { "text" }.into()));
        t
    }

    fn assert_read_back(&self, c: &Config, text: &str) -> Result<(), TestCaseError> {
        let (l, r) = (&c.limits, &c.limits.session);
        let counts =
            [l.max_connections, l.max_handshakes, r.max_message_bytes, r.client_read_bytes, r.backend_read_bytes];
        let timeouts = [l.handshake_timeout, r.connect_timeout, r.close_timeout];
        prop_assert_eq!(c.listeners[0].address, self.address, "{}", text);
        prop_assert_eq!(counts.map(|n| n as u64), self.counts.map(|(_, n)| n), "{}", text);
        prop_assert_eq!(timeouts, self.timeouts.map(|(_, s)| Duration::from_secs_f64(s)), "{}", text);
        let keepalive = (self.keepalive > 0).then(|| Duration::from_secs(self.keepalive.into()));
        prop_assert_eq!(r.tcp_keepalive, keepalive);
        prop_assert_eq!(c.routes[0].limits, *r, "a route without a limits table runs under [limits]");
        let s = &c.shutdown;
        let secs = |f: f64| Duration::from_secs_f64(f);
        prop_assert_eq!(
            (s.drain_delay, s.close_window, s.deadline),
            (secs(self.shutdown.0), secs(self.shutdown.1), secs(self.shutdown.2))
        );
        let r = &c.routes[0];
        prop_assert_eq!(&r.path, &self.path);
        prop_assert_eq!(r.path_match, if self.prefix { PathMatch::Prefix } else { PathMatch::Exact });
        prop_assert_eq!(r.host.as_ref().map(ToString::to_string), self.host.clone());
        prop_assert_eq!(&r.backend, &Backend::Tcp { host: self.backend.0.clone(), port: self.backend.1 });
        prop_assert_eq!(&r.allowed_origins, &AllowedOrigins::List(self.origins.clone()));
        prop_assert_eq!(r.accept, Accept { text: self.accept.0, binary: self.accept.1 });
        prop_assert_eq!(r.outbound, OUTBOUND[self.outbound].1);
        prop_assert_eq!(&r.subprotocols, &self.subprotocols);
        let unavailable = if self.http_unavailable { Unavailable::Http } else { Unavailable::Close };
        prop_assert_eq!(r.on_backend_unavailable, unavailable);
        prop_assert_eq!(c.log.format, if self.json { LogFormat::Json } else { LogFormat::Text });
        Ok(())
    }
}
