//! Property tests of the request path up to the admission decision (`policy::host` →
//! `Router::find` → `policy::admit`), through the harness the fuzz target runs
//! (`fuzz/harness.rs`, which asserts the invariants): generated request heads, realistic enough
//! to reach every verdict, and arbitrary or damaged bytes, never panic and keep the invariants.
//! No sockets: these drive the pure functions the server calls. Set `PROPTEST_CASES` for a
//! longer run; `cargo fuzz` (fuzz/README.md) runs the same harness for as long as you like.

#[path = "../../fuzz/harness.rs"]
mod harness;

use std::collections::BTreeMap;
use std::sync::LazyLock;

use base64::Engine;
use harness::{Gate, Verdict};
use proptest::prelude::*;
use proptest::sample::select;
use proptest::strategy::ValueTree;
use proptest::test_runner::TestRunner;
use wsgate::policy::RefusalKind;

/// Built once: the cases differ in the request, not in the routes.
static GATE: LazyLock<Gate> = LazyLock::new(Gate::new);

/// `n` cases, or `PROPTEST_CASES` when it is set.
fn cases(n: u32) -> ProptestConfig {
    let default = ProptestConfig::default();
    let cases = if std::env::var_os("PROPTEST_CASES").is_some() { default.cases } else { n };
    ProptestConfig { cases, ..default }
}

/// Host names the harness's routes care about, and some they do not.
const NAMES: &[&str] = &[
    "vnc.example.com",
    "VNC.Example.com.",
    "a.example.com",
    "x.a.example.com",
    "example.com",
    "127.0.0.1",
    "[::1]",
    "localhost",
    "rebind.evil",
    "b.example.org",
];
const PORTS: &[&str] = &["", "", "", "", ":80", ":443", ":8080", ":"];
const PATHS: &[&str] =
    &["/", "/vnc", "/vnc/", "/vnc/x", "/vncx", "/mqtt", "/mqtt/x", "/exact", "/exact/", "/nope", "/vnc?q=1"];

fn authority() -> impl Strategy<Value = String> {
    let port = prop_oneof![12 => select(PORTS), 1 => select(&[":99999", ":x", "::"][..])];
    (select(NAMES), port).prop_map(|(n, p)| format!("{n}{p}"))
}

/// One header line's value, sometimes with bytes that are not text.
fn odd_value() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(prop_oneof![8 => 0x20..0x7fu8, 1 => Just(b'\t'), 1 => 0x80..=0xffu8], 0..16)
}

/// `Some(v)` most of the time (`common`), otherwise one of `others` or nothing.
fn usually(common: &'static str, others: &'static [&'static str]) -> impl Strategy<Value = Option<Vec<u8>>> {
    prop_oneof![
        8 => Just(Some(common.as_bytes().to_vec())),
        1 => select(others).prop_map(|o| Some(o.as_bytes().to_vec())),
        1 => Just(None),
    ]
}

/// A request head: mostly well-formed WebSocket upgrades, varied in every part admission reads.
fn head() -> impl Strategy<Value = Vec<u8>> {
    let method = prop_oneof![8 => Just("GET"), 1 => select(&["HEAD", "POST", "OPTIONS", "get", "CONNECT"][..])];
    let target = (0..10u8, select(PATHS), select(&["http", "https", "ws", "wss", "HTTP"][..]), authority());
    let hosts = prop_oneof![
        8 => authority().prop_map(|a| vec![a.into_bytes()]),
        1 => Just(vec![]),
        1 => prop::collection::vec(authority().prop_map(String::into_bytes), 2..=3),
        1 => prop_oneof![select(&["", " ", "u@vnc.example.com", "vnc.example.com/x", "[::1"][..])
            .prop_map(|h| h.as_bytes().to_vec()), odd_value()]
            .prop_map(|h| vec![h]),
    ];
    let key = prop_oneof![
        8 => any::<[u8; 16]>().prop_map(|k| base64::engine::general_purpose::STANDARD.encode(k).into_bytes()),
        1 => prop::collection::vec(any::<u8>(), 0..20)
            .prop_map(|k| base64::engine::general_purpose::STANDARD.encode(k).into_bytes()),
        1 => odd_value(),
    ];
    let origin = prop_oneof![
        4 => Just(None),
        3 => Just(Some("own".to_string())),
        1 => select(&["https://app.example.com", "http://evil.example", "null", "http://[::1]:8080", "https://a.example.com"][..])
            .prop_map(|o| Some(o.to_string())),
    ];
    let protocols = prop_oneof![
        5 => Just(vec![]),
        4 => prop::collection::vec(select(&["mqtt", "binary", "mqttv3.1", "x", "mqtt, binary", ", ,"][..]), 1..=2),
    ];
    let others = prop::collection::vec(("[A-Za-z-]{1,12}", odd_value()), 0..3);
    let upgrade = usually("websocket", &["WebSocket", "h2c", "websocket, foo"]);
    let connection = usually("Upgrade", &["keep-alive, Upgrade", "close", "upgrade"]);
    let version = usually("13", &["8", "13, 8", ""]);
    (
        (method, target, prop_oneof![9 => Just("HTTP/1.1"), 1 => Just("HTTP/1.0")], hosts, any::<bool>()),
        (upgrade, connection, version, key),
        (origin, any::<bool>(), protocols, others),
        any::<prop::sample::Index>(),
    )
        .prop_map(|((method, target, http, hosts, agree), (upgrade, connection, version, key), more, shuffle)| {
            let (origin, tls, protocols, others) = more;
            let (form, path, scheme, authority) = target;
            // Most absolute-form targets name the Host they are sent with, as proxies' clients do.
            let mut hosts = hosts;
            let target = match form {
                0 | 1 => {
                    if agree && let Some(first) = hosts.first_mut() {
                        *first = authority.clone().into_bytes();
                    }
                    format!("{scheme}://{authority}{path}")
                }
                2 => "*".to_string(),
                _ => path.to_string(),
            };
            let own_host = hosts.first().map(|h| String::from_utf8_lossy(h).into_owned()).unwrap_or_default();
            let mut lines: Vec<(String, Vec<u8>)> = hosts.into_iter().map(|h| ("Host".to_string(), h)).collect();
            let mut add = |name: &str, value: Option<Vec<u8>>| {
                if let Some(v) = value {
                    lines.push((name.to_string(), v));
                }
            };
            add("Upgrade", upgrade);
            add("Connection", connection);
            add("Sec-WebSocket-Version", version);
            add("Sec-WebSocket-Key", Some(key));
            let origin = origin.map(|o| match o.as_str() {
                "own" => format!("{}://{own_host}", if tls { "https" } else { "http" }),
                _ => o,
            });
            add("Origin", origin.map(String::into_bytes));
            for p in protocols {
                add("Sec-WebSocket-Protocol", Some(p.as_bytes().to_vec()));
            }
            for (name, value) in others {
                add(&name, Some(value));
            }
            // Header order carries no meaning; case of names neither.
            let n = lines.len();
            lines.rotate_left(shuffle.index(n + 1).min(n));
            let mut head = vec![u8::from(tls)];
            head.extend_from_slice(format!("{method} {target} {http}\r\n").as_bytes());
            for (i, (name, value)) in lines.iter().enumerate() {
                let name = if i % 3 == 2 { name.to_ascii_lowercase() } else { name.clone() };
                head.extend_from_slice(name.as_bytes());
                head.extend_from_slice(b": ");
                head.extend_from_slice(value);
                head.extend_from_slice(b"\r\n");
            }
            head.extend_from_slice(b"\r\n");
            head
        })
}

proptest! {
    #![proptest_config(cases(3000))]

    /// Generated upgrade requests keep every invariant of the request path (the harness asserts
    /// them: one Host or 400, the target's authority wins, a route's host and path match, an
    /// admitted request is a well-formed upgrade from an allowed origin with a subprotocol both
    /// sides know, refusals are one line with the status their kind says).
    #[test]
    fn request_heads_keep_the_admission_invariants(head in head()) {
        GATE.check_bytes(&head);
    }

    /// Damaged requests (bytes flipped, cut or inserted) and arbitrary bytes never panic.
    #[test]
    fn damaged_and_arbitrary_bytes_never_panic(
        head in head(),
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0..3u8), 1..6),
        noise in prop::collection::vec(any::<u8>(), 0..200),
    ) {
        let gate = &*GATE;
        let mut damaged = head;
        for (at, byte, how) in edits {
            let i = at.index(damaged.len());
            match how {
                0 => damaged[i] = byte,
                1 => damaged.insert(i, byte),
                _ => { damaged.truncate(i.max(1)); }
            }
        }
        gate.check_bytes(&damaged);
        gate.check_bytes(&noise);
    }
}

/// The generated heads reach every verdict, so the properties above test the deep branches and
/// not only the parser's and the host check's refusals.
#[test]
fn generated_heads_reach_every_verdict() {
    let gate = Gate::new();
    let mut runner = TestRunner::deterministic();
    let strategy = head();
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    for _ in 0..3000 {
        let head = strategy.new_tree(&mut runner).expect("a head").current();
        let class = match gate.check_bytes(&head) {
            Verdict::Refused(status, kind) => format!("{status} {kind:?}"),
            other => format!("{other:?}"),
        };
        *seen.entry(class).or_default() += 1;
    }
    let count = |class: &str| seen.get(class).copied().unwrap_or(0);
    for class in [
        "Admitted(\"open\")",
        "Admitted(\"vnc\")",
        "Admitted(\"wild\")",
        "Admitted(\"mqtt\")",
        "Admitted(\"exact\")",
        "NoHost",
        "NoRoute",
        "403 Origin",
        "400 Subprotocol",
        "400 Request",
        "405 Request",
        "426 Request",
    ] {
        assert!(count(class) >= 10, "{class} reached {} times in 3000: {seen:?}", count(class));
    }
    let admitted: usize = seen.iter().filter(|(k, _)| k.starts_with("Admitted")).map(|(_, n)| n).sum();
    assert!(admitted >= 300, "only {admitted} of 3000 admitted: {seen:?}");
}

/// Hand-written heads get the verdicts the docs promise, so the harness is not vacuous.
#[test]
fn the_harness_decides_as_the_server_does() {
    let gate = Gate::new();
    let upgrade = |target: &str, extra: &str| {
        format!(
            "\0GET {target} HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{extra}\r\n"
        )
        .into_bytes()
    };
    let admitted = |route: &str| Verdict::Admitted(route.to_string());
    let cases = [
        (upgrade("/vnc", "Host: vnc.example.com\r\n"), admitted("vnc")),
        (upgrade("/vnc", "Host: a.example.com\r\n"), admitted("wild")),
        (upgrade("/vnc", "Host: 127.0.0.1\r\n"), admitted("open")),
        (upgrade("http://vnc.example.com/vnc", "Host: vnc.example.com:80\r\n"), admitted("vnc")),
        (upgrade("http://vnc.example.com/vnc", "Host: a.example.com\r\n"), Verdict::NoHost),
        (upgrade("/vnc", ""), Verdict::NoHost),
        (upgrade("/vnc", "Host: a\r\nHost: a\r\n"), Verdict::NoHost),
        (upgrade("/vnc/x", "Host: VNC.example.com.:8080\r\n"), admitted("vnc")),
        (upgrade("/exact", "Host: vnc.example.com\r\n"), admitted("exact")),
        (upgrade("/exact/x", "Host: other.org\r\n"), admitted("open")),
        (
            upgrade("/vnc", "Host: vnc.example.com\r\nOrigin: http://evil.example\r\n"),
            Verdict::Refused(403, RefusalKind::Origin),
        ),
        (upgrade("/vnc", "Host: rebind.evil\r\nOrigin: http://rebind.evil\r\n"), admitted("open")),
        (
            upgrade("/mqtt", "Host: rebind.evil\r\nOrigin: http://rebind.evil\r\n"),
            Verdict::Refused(403, RefusalKind::Origin),
        ),
        (
            upgrade("/mqtt", "Host: [::1]:80\r\nOrigin: http://[::1]\r\nSec-WebSocket-Protocol: x, mqtt\r\n"),
            admitted("mqtt"),
        ),
        (upgrade("/mqtt", "Host: h\r\nSec-WebSocket-Protocol: x\r\n"), Verdict::Refused(400, RefusalKind::Subprotocol)),
        (b"\0GET /vnc HTTP/1.1\r\nHost: h\r\n".to_vec(), Verdict::Unparsed),
    ];
    for (head, want) in cases {
        assert_eq!(gate.check_bytes(&head), want, "{}", String::from_utf8_lossy(&head));
    }
}

/// The fuzz target's config check passes on the shipped config and the fixtures, valid and
/// invalid, and on text that is not a config at all.
#[test]
fn the_config_harness_accepts_every_fixture() {
    let mut files = vec![std::path::PathBuf::from("config.toml")];
    for dir in ["tests/fixtures/config/valid", "tests/fixtures/config/invalid"] {
        let found: Vec<_> = std::fs::read_dir(dir).expect(dir).map(|e| e.expect("a directory entry").path()).collect();
        assert!(!found.is_empty(), "no fixtures in {dir}");
        files.extend(found);
    }
    for file in files {
        harness::check_config(&std::fs::read(&file).expect("a readable fixture"));
    }
    for junk in [&b""[..], b"[", b"\xff\xfe", b"[listeners.a]\naddress = 5\n", b"a = \"\\u0000\"\n"] {
        harness::check_config(junk);
    }
}
