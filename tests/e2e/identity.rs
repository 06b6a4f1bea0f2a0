//! The client's identity end to end, in the PROXY v2 header a route sends its backend: the
//! authenticated user (a bearer token's name, a Basic user) as the custom TLV 0xE0, and a
//! verified client certificate's common name as `PP2_SUBTYPE_SSL_CN` inside `PP2_TYPE_SSL`. The
//! backend parses the header by hand and then echoes, so the payload coming back byte for byte
//! shows nothing else was put in the stream.

use std::net::IpAddr;

use aws_lc_rs::digest::{SHA256, digest};
use base64::Engine;

use crate::mtls::{Pki, expect_open, expect_open_as, open as open_with_cert};
use crate::proxy_protocol::{ProxyBackend, echoes};
use crate::support::*;

const PP2_TYPE_SSL: u8 = 0x20;
const PP2_SUBTYPE_SSL_CN: u8 = 0x22;
const PP2_TYPE_USER: u8 = 0xE0;
/// `PP2_CLIENT_SSL`, and with a certificate also `PP2_CLIENT_CERT_CONN | PP2_CLIENT_CERT_SESS`.
const CLIENT_SSL: u8 = 0x01;
const CLIENT_SSL_CERT: u8 = 0x07;

/// v2 TLVs in order: (type, value).
type Tlvs = Vec<(u8, Vec<u8>)>;

fn sha256_hex(token: &str) -> String {
    digest(&SHA256, token.as_bytes()).as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// The value of a `PP2_TYPE_SSL` TLV: client bits, verify 0, then the CN sub-TLV if any.
fn ssl_value(cn: Option<&str>) -> Vec<u8> {
    match cn {
        None => vec![CLIENT_SSL, 0, 0, 0, 0],
        Some(cn) => {
            let mut v = vec![CLIENT_SSL_CERT, 0, 0, 0, 0, PP2_SUBTYPE_SSL_CN];
            v.extend_from_slice(&(cn.len() as u16).to_be_bytes());
            v.extend_from_slice(cn.as_bytes());
            v
        }
    }
}

/// A route sending PROXY v2 with bearer tokens, one named `ops-team` and one without a name,
/// taken from the header or the query.
fn bearer_route(extra: &str) -> String {
    format!(
        "proxy_protocol = \"v2\"\n{extra}\n[routes.pp.auth]\ntype = \"bearer\"\nquery = true\n\
         tokens = [\"ops-team=sha256:{}\", \"sha256:{}\"]\n",
        sha256_hex("named-token"),
        sha256_hex("unnamed-token")
    )
}

/// A named bearer token's name reaches the backend as TLV 0xE0, over ws and wss (after the
/// SSL TLV); an unnamed token sends no user TLV; a Basic user is sent as the name. The client's
/// address and port are the header's source, and the payload follows byte for byte.
#[tokio::test]
async fn authenticated_user_arrives_as_a_custom_tlv() {
    let dir = tempfile::tempdir().unwrap();
    let htpasswd = dir.path().join("users.htpasswd");
    std::fs::write(&htpasswd, format!("alice:{}\n", bcrypt::hash("alice-pw", 4).unwrap())).unwrap();
    let backend = ProxyBackend::start().await;
    let gw = Gateway::builder()
        .tls()
        .route_with("pp", "/pp", &backend.backend.target(), &bearer_route(""))
        .route_with(
            "u",
            "/u",
            &backend.backend.target(),
            &format!(
                "proxy_protocol = \"v2\"\n[routes.u.auth]\ntype = \"basic\"\nhtpasswd = {:?}\n",
                htpasswd.display().to_string()
            ),
        )
        .start()
        .await;
    let basic = format!("Basic {}", base64::engine::general_purpose::STANDARD.encode("alice:alice-pw"));
    let user = |name: &[u8]| (PP2_TYPE_USER, name.to_vec());
    let ssl = (PP2_TYPE_SSL, ssl_value(None));
    // (path, over wss, Authorization header, the TLVs the backend sees)
    let cases: [(&str, bool, Option<&str>, Tlvs); 5] = [
        ("/pp", false, Some("Bearer named-token"), vec![user(b"ops-team")]),
        ("/pp?access_token=named-token", true, None, vec![ssl.clone(), user(b"ops-team")]),
        ("/pp", false, Some("Bearer unnamed-token"), vec![]),
        ("/pp?access_token=unnamed-token", true, None, vec![ssl.clone()]),
        ("/u", false, Some(basic.as_str()), vec![user(b"alice")]),
    ];
    for (i, (path, secure, auth, tlvs)) in cases.into_iter().enumerate() {
        let from = IpAddr::from([127, 0, 0, 2 + i as u8]);
        let headers: Vec<(&str, &str)> = auth.map(|a| ("authorization", a)).into_iter().collect();
        let (mut ws, local) =
            gw.session_via(from, b"", path, secure, &headers).await.unwrap_or_else(|e| panic!("{path}: {e}"));
        let seen = backend.next().await;
        let listener = if secure { gw.secure.unwrap() } else { gw.plain };
        assert_eq!((seen.version, seen.source, seen.destination), (2, local, listener), "{path}");
        assert_eq!(seen.tlvs, tlvs, "{path} (secure: {secure})");
        echoes(&mut ws, &payload(70_000, i as u64)).await;
    }
    assert_eq!(backend.backend.accepted(), 5);
}

/// On a wss listener with `client_ca`, a verified certificate's common name reaches the backend
/// as `PP2_SUBTYPE_SSL_CN` (with the certificate bits set), beside the bearer token's name, on a
/// resumed TLS session too; a client without a certificate (`optional`) gets the SSL TLV without
/// one.
#[tokio::test]
async fn certificate_common_name_arrives_in_the_ssl_tlv() {
    let pki = Pki::new("wsgate test CA");
    let ops = pki.client("ops.example", &["ops.example.com"], 2);
    let backend = ProxyBackend::start().await;
    let routes =
        format!("[routes.pp]\npath = \"/pp\"\nbackend = \"{}\"\n{}", backend.backend.target(), bearer_route(""));
    let gw = Gateway::from_file(&pki.write_config("optional", "", &routes)).await;
    let addr = gw.secure.unwrap();

    let mut ws = expect_open(open_with_cert(addr, &pki, Some(&ops), "/pp?access_token=named-token").await, "ops");
    let seen = backend.next().await;
    assert_eq!((seen.version, seen.destination), (2, addr));
    let expected = vec![(PP2_TYPE_SSL, ssl_value(Some("ops.example"))), (PP2_TYPE_USER, b"ops-team".to_vec())];
    assert_eq!(seen.tlvs, expected);
    echoes(&mut ws, &payload(100_000, 1)).await;

    // Again on a resumed TLS session, which sends no certificate: the one it was made with counts.
    let (mut ws, resumed) =
        expect_open_as(open_with_cert(addr, &pki, Some(&ops), "/pp?access_token=unnamed-token").await, "ops again");
    assert!(resumed, "the second connection did not resume its TLS session");
    assert_eq!(backend.next().await.tlvs, vec![(PP2_TYPE_SSL, ssl_value(Some("ops.example")))]);
    echoes(&mut ws, &payload(100_000, 2)).await;

    let mut ws = expect_open(open_with_cert(addr, &pki, None, "/pp?access_token=named-token").await, "no cert");
    let expected = vec![(PP2_TYPE_SSL, ssl_value(None)), (PP2_TYPE_USER, b"ops-team".to_vec())];
    assert_eq!(backend.next().await.tlvs, expected);
    echoes(&mut ws, &payload(100_000, 3)).await;
    assert_eq!(backend.backend.accepted(), 3);
}
