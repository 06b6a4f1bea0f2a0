//! A verified client certificate (mTLS), as routes look at it: its subject, common name, DNS and
//! URI names, read once after the TLS handshake; and whether it matches a route's
//! `client_certs`. Pure: bytes in, decision out.
//!
//! Only what matching and the session log need is kept, not the DER (a certificate is a kilobyte
//! or more, and the connection holds this while it handshakes): the subject as RFC 4514 text
//! (`CN=alice,O=Example,C=DE`: the most specific name first, as nginx's `$ssl_client_s_dn`
//! writes it), the last common name in the subject (the most specific), and the SAN DNS names
//! (lower-case) and URIs. rustls-webpki, which verified the certificate, reads the SANs; the
//! subject is a short DER walk here, since webpki hands it over raw and x509-parser would bring
//! a dozen crates for it.

use rustls::pki_types::CertificateDer;

use crate::config::CertPattern;

/// What a route can ask of a verified client certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientCert {
    /// The subject as RFC 4514 text; escaped, so it is one printable line.
    pub subject: Box<str>,
    common_name: Option<Box<str>>,
    dns_names: Box<[Box<str>]>,
    uris: Box<[Box<str>]>,
}

impl ClientCert {
    /// Reads the end-entity certificate rustls has already verified; `None` if webpki cannot
    /// parse it (it just did, so only for a certificate rustls did not verify).
    pub fn from_der(der: &CertificateDer<'_>) -> Option<ClientCert> {
        let cert = webpki::EndEntityCert::try_from(der).ok()?;
        let (subject, common_name) = subject_text(cert.subject()).unwrap_or_default();
        let dns_names = cert.valid_dns_names().map(|n| n.to_ascii_lowercase().into_boxed_str()).collect();
        let uris = cert.valid_uri_names().map(Box::from).collect();
        Some(ClientCert { subject: subject.into(), common_name: common_name.map(Into::into), dns_names, uris })
    }

    /// The subject's common name (its last, if several), as the certificate holds it: what
    /// `CN=` patterns match and what PROXY protocol's `PP2_SUBTYPE_SSL_CN` carries.
    pub fn common_name(&self) -> Option<&str> {
        self.common_name.as_deref()
    }

    /// Whether the certificate carries what `pattern` asks for. A wildcard DNS name in the
    /// certificate (`*.example.com`) names no particular client, so it matches nothing.
    pub fn matches(&self, pattern: &CertPattern) -> bool {
        match pattern {
            CertPattern::CommonName(cn) => self.common_name.as_deref() == Some(cn.as_str()),
            CertPattern::Dns(host) => self.dns_names.iter().any(|n| !n.contains('*') && host.matches(n)),
            CertPattern::Uri(uri) => self.uris.iter().any(|u| **u == **uri),
        }
    }

    /// Heap bytes held besides the struct itself (for the memory figures in the docs).
    pub fn heap_bytes(&self) -> usize {
        let names = |n: &[Box<str>]| size_of_val(n) + n.iter().map(|s| s.len()).sum::<usize>();
        self.subject.len()
            + self.common_name.as_ref().map_or(0, |c| c.len())
            + names(&self.dns_names)
            + names(&self.uris)
    }
}

/// `true` when `cert` (if any) matches one of `patterns`; no patterns allow any client.
pub fn allowed(patterns: &[CertPattern], cert: Option<&ClientCert>) -> bool {
    patterns.is_empty() || cert.is_some_and(|c| patterns.iter().any(|p| c.matches(p)))
}

/// One DER element: its tag and contents, and what follows it.
fn element(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = match first {
        n @ 0..=0x7f => (usize::from(n), rest),
        0x81 => (usize::from(*rest.first()?), rest.get(1..)?),
        0x82 => (usize::from(u16::from_be_bytes([*rest.first()?, *rest.get(1)?])), rest.get(2..)?),
        // Longer than 64 KiB: no certificate rustls accepts has such a name.
        _ => return None,
    };
    Some((tag, rest.get(..len)?, rest.get(len..)?))
}

const SEQUENCE: u8 = 0x30;
const SET: u8 = 0x31;
const OID: u8 = 0x06;

/// The subject's RFC 4514 text and its last common name, from the DER of a `Name` without its
/// outer SEQUENCE (as webpki gives it).
fn subject_text(mut rdns: &[u8]) -> Option<(String, Option<String>)> {
    let mut parts = Vec::new();
    let mut common_name = None;
    while !rdns.is_empty() {
        let (tag, mut set, rest) = element(rdns)?;
        rdns = rest;
        if tag != SET {
            return None;
        }
        let mut rdn = Vec::new();
        while !set.is_empty() {
            let (tag, atv, rest) = element(set)?;
            set = rest;
            let (oid_tag, oid, value) = element(atv)?;
            if tag != SEQUENCE || oid_tag != OID {
                return None;
            }
            let (value_tag, raw, _) = element(value)?;
            let text = string_value(value_tag, raw);
            if oid == [0x55, 0x04, 0x03] {
                common_name = text.clone();
            }
            let value = match text {
                Some(t) => escape(&t),
                // RFC 4514 §2.4: a value of another type is written as `#` and its DER in hex.
                None => format!("#{}", hex(value)),
            };
            rdn.push(format!("{}={value}", attribute_name(oid)));
        }
        parts.push(rdn.join("+"));
    }
    parts.reverse();
    Some((parts.join(","), common_name))
}

/// The text of a directory string, or `None` for a type it cannot be read as.
fn string_value(tag: u8, raw: &[u8]) -> Option<String> {
    match tag {
        // UTF8String, PrintableString, IA5String.
        0x0c | 0x13 | 0x16 => std::str::from_utf8(raw).ok().map(str::to_string),
        // TeletexString: in practice Latin-1.
        0x14 => Some(raw.iter().map(|&b| char::from(b)).collect()),
        // BMPString: UTF-16, big-endian.
        0x1e if raw.len().is_multiple_of(2) => {
            char::decode_utf16(raw.chunks(2).map(|p| u16::from_be_bytes([p[0], p[1]]))).collect::<Result<_, _>>().ok()
        }
        _ => None,
    }
}

/// RFC 4514's short names for the attributes client certificates carry; others as a dotted OID.
fn attribute_name(oid: &[u8]) -> String {
    match oid {
        [0x55, 0x04, 0x03] => "CN".into(),
        [0x55, 0x04, 0x06] => "C".into(),
        [0x55, 0x04, 0x07] => "L".into(),
        [0x55, 0x04, 0x08] => "ST".into(),
        [0x55, 0x04, 0x09] => "STREET".into(),
        [0x55, 0x04, 0x0a] => "O".into(),
        [0x55, 0x04, 0x0b] => "OU".into(),
        [0x09, 0x92, 0x26, 0x89, 0x93, 0xf2, 0x2c, 0x64, 0x01, 0x19] => "DC".into(),
        [0x09, 0x92, 0x26, 0x89, 0x93, 0xf2, 0x2c, 0x64, 0x01, 0x01] => "UID".into(),
        _ => dotted(oid),
    }
}

fn dotted(oid: &[u8]) -> String {
    let mut arcs: Vec<u64> = Vec::new();
    let mut acc: u64 = 0;
    for &b in oid {
        acc = acc.saturating_mul(128) | u64::from(b & 0x7f);
        if b & 0x80 == 0 {
            arcs.push(acc);
            acc = 0;
        }
    }
    let mut text = match arcs.first() {
        Some(&first) => format!("{}.{}", (first / 40).min(2), first - 40 * (first / 40).min(2)),
        None => return "0.0".into(),
    };
    for arc in &arcs[1..] {
        text.push_str(&format!(".{arc}"));
    }
    text
}

/// RFC 4514 §2.4 escaping, plus every control character as `\XX`, so the text is one line.
fn escape(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    let last = value.chars().count().saturating_sub(1);
    for (i, c) in value.chars().enumerate() {
        match c {
            '"' | '+' | ',' | ';' | '<' | '>' | '\\' => {
                out.push('\\');
                out.push(c);
            }
            '#' if i == 0 => out.push_str("\\#"),
            ' ' if i == 0 || i == last => out.push_str("\\ "),
            c if c.is_control() => {
                let mut buf = [0u8; 4];
                for b in c.encode_utf8(&mut buf).bytes() {
                    out.push_str(&format!("\\{b:02X}"));
                }
            }
            c => out.push(c),
        }
    }
    out
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::HostPattern;

    fn cert(params: rcgen::CertificateParams) -> ClientCert {
        let key = rcgen::KeyPair::generate().unwrap();
        let der = params.self_signed(&key).unwrap().der().clone();
        ClientCert::from_der(&der).unwrap()
    }

    /// Subject text in RFC 4514 order and escaping; the last CN is the one matched; SAN DNS names
    /// lower-case, URIs exact; a certificate's own wildcard matches nothing.
    #[test]
    fn subject_names_and_patterns() {
        let mut p =
            rcgen::CertificateParams::new(vec!["Alice.Ops.Example.com".into(), "*.wild.example.com".into()]).unwrap();
        p.subject_alt_names.push(rcgen::SanType::URI("spiffe://example.org/ops".try_into().unwrap()));
        p.distinguished_name = rcgen::DistinguishedName::new();
        p.distinguished_name.push(rcgen::DnType::CountryName, "DE");
        p.distinguished_name.push(rcgen::DnType::OrganizationName, "Example, Inc.");
        p.distinguished_name.push(rcgen::DnType::CommonName, " alice\n");
        let c = cert(p);
        assert_eq!(&*c.subject, "CN=\\ alice\\0A,O=Example\\, Inc.,C=DE");
        assert!(c.matches(&CertPattern::CommonName(" alice\n".into())));
        assert!(!c.matches(&CertPattern::CommonName("alice".into())));
        assert!(c.matches(&CertPattern::Dns(HostPattern::Exact("alice.ops.example.com".into()))));
        assert!(c.matches(&CertPattern::Dns(HostPattern::Wildcard(".ops.example.com".into()))));
        assert!(!c.matches(&CertPattern::Dns(HostPattern::Wildcard(".example.org".into()))));
        assert!(!c.matches(&CertPattern::Dns(HostPattern::Exact("x.wild.example.com".into()))));
        assert!(!c.matches(&CertPattern::Dns(HostPattern::Wildcard(".wild.example.com".into()))));
        assert!(c.matches(&CertPattern::Uri("spiffe://example.org/ops".into())));
        assert!(!c.matches(&CertPattern::Uri("spiffe://example.org/op".into())));
        assert!(allowed(&[], None));
        assert!(!allowed(&[CertPattern::CommonName(" alice\n".into())], None));
        assert!(allowed(&[CertPattern::Uri("x:y".into()), CertPattern::CommonName(" alice\n".into())], Some(&c)));
    }

    /// Attributes without a short name are written as dotted OIDs, values of other types as hex.
    #[test]
    fn other_attributes_and_types() {
        // SET { SEQUENCE { OID 2.5.4.5, PrintableString "42" } }, SET { SEQUENCE { OID 1.2.840.113549.1.9.1, INTEGER 7 } }
        let der = [
            0x31, 0x0b, 0x30, 0x09, 0x06, 0x03, 0x55, 0x04, 0x05, 0x13, 0x02, b'4', b'2', 0x31, 0x10, 0x30, 0x0e, 0x06,
            0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x09, 0x01, 0x02, 0x01, 0x07,
        ];
        let (text, cn) = subject_text(&der).unwrap();
        assert_eq!(text, "1.2.840.113549.1.9.1=#020107,2.5.4.5=42");
        assert_eq!(cn, None);
    }

    proptest::proptest! {
        /// Any bytes: an answer or `None`, never a panic, and the text is one line.
        #[test]
        fn any_subject_bytes_are_safe(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200)) {
            if let Some((text, _)) = subject_text(&bytes) {
                proptest::prop_assert!(!text.chars().any(char::is_control));
            }
        }
    }
}
