//! Client certificates and the admin listener's access keys: a `wss` listener's `client_ca`,
//! `client_auth` and `client_crls`, a route's `client_certs`, and `[admin]`'s `tls`,
//! `token_hashes`, `tokens_file` and `open_paths`. The files are only named here; `tls` and
//! `admin` read them (at start and on every reload), and say which file failed.

use super::super::raw::{RawAdmin, RawTls};
use super::super::{AdminAccess, AdminTls, CertPattern, ClientAuth, ClientAuthMode, Listener, Route, TokenHash};
use super::Validator;
use std::path::PathBuf;

/// Probes need these without a token: kubelet cannot send one from a plain `httpGet` probe.
const DEFAULT_OPEN_PATHS: [&str; 2] = ["/healthz", "/readyz"];
/// The admin endpoints there are; `open_paths` may name only these.
const ADMIN_PATHS: [&str; 3] = ["/metrics", "/healthz", "/readyz"];

impl Validator<'_> {
    /// `tls.client_ca`, `tls.client_auth`, `tls.client_crls` of listener `key`
    /// (`listeners.NAME`): `None` when the listener does not ask for client certificates.
    pub(super) fn client_auth(&mut self, key: &str, raw: &mut RawTls) -> Option<ClientAuth> {
        let crls = raw.client_crls.take();
        let mode = raw.client_auth.take();
        let Some(ca) = raw.client_ca.take() else {
            if mode.is_some() || crls.is_some() {
                let which = if mode.is_some() { "client_auth" } else { "client_crls" };
                self.fail(
                    format!("{key}.tls.{which}"),
                    "needs tls.client_ca, the CA client certificates must chain to",
                );
            }
            return None;
        };
        let ca = self.file_path(&format!("{key}.tls.client_ca"), &ca);
        let mode = self.choice(&format!("{key}.tls.client_auth"), mode, ClientAuthMode::Required)?;
        let crls =
            crls.unwrap_or_default().iter().map(|crl| self.file_path(&format!("{key}.tls.client_crls"), crl)).collect();
        Some(ClientAuth { ca, mode, crls })
    }

    /// `tls.ticket_keys` of listener `key`: a file of shared ticket keys, which only means
    /// something while tickets are on. Never with client certificates: rustls does not ask a
    /// resuming client for its certificate again, so a ticket sealed with shared keys by a
    /// listener or replica with another (or no) client CA would skip this listener's check.
    pub(super) fn ticket_keys(&mut self, key: &str, raw: &RawTls, client_ca: bool) -> Option<PathBuf> {
        let path = raw.ticket_keys.as_ref()?;
        if raw.session_tickets == Some(false) {
            self.fail(format!("{key}.tls.ticket_keys"), "needs session_tickets = true (tickets are off)");
        }
        if client_ca {
            self.fail(
                format!("{key}.tls.ticket_keys"),
                "cannot be used with client_ca: a session resumed with a shared ticket is not asked for its \
                 client certificate again",
            );
        }
        Some(self.file_path(&format!("{key}.tls.ticket_keys"), path))
    }

    /// A route's `client_certs`. Each entry is `CN=<common name>` (exact), `URI:<uri>` (exact),
    /// or a DNS name, `*.` allowed in front as for `host`.
    pub(super) fn client_certs(&mut self, key: &str, list: Option<Vec<String>>) -> Option<Vec<CertPattern>> {
        let Some(list) = list else { return Some(Vec::new()) };
        if list.is_empty() {
            self.fail(key, "is empty, which no certificate matches: remove the key to allow every client");
            return None;
        }
        let mut out = Vec::with_capacity(list.len());
        for entry in &list {
            let pattern = if let Some(cn) = entry.strip_prefix("CN=") {
                (!cn.is_empty()).then(|| CertPattern::CommonName(cn.to_string()))
            } else if let Some(uri) = entry.strip_prefix("URI:") {
                (uri.contains(':') && !uri.chars().any(char::is_whitespace)).then(|| CertPattern::Uri(uri.to_string()))
            } else {
                self.host_pattern(key, entry).map(CertPattern::Dns)
            };
            match pattern {
                Some(p) => out.push(p),
                None if entry.starts_with("CN=") || entry.starts_with("URI:") => self.fail(
                    key,
                    format!("{entry:?} is not \"CN=<common name>\", \"URI:<uri>\", a DNS name or \"*.\" and one"),
                ),
                // `host_pattern` reported it.
                None => {}
            }
        }
        (out.len() == list.len()).then_some(out)
    }

    /// A route with `client_certs` that no listener could ever admit is a mistake in the file,
    /// not a policy: say so at load. On a listener without `client_ca` such a route answers 403.
    pub(super) fn check_client_cert_routes(&mut self, listeners: &[Listener], routes: &[Route]) {
        let verifies = listeners.iter().any(|l| l.tls.as_ref().is_some_and(|t| t.client_auth.is_some()));
        if verifies {
            return;
        }
        for r in routes.iter().filter(|r| !r.client_certs.is_empty()) {
            self.fail(
                format!("routes.{}.client_certs", r.name),
                "no listener verifies client certificates: set tls.client_ca on a wss listener",
            );
        }
    }

    /// `[admin]`'s `tls`, `token_hashes`, `tokens_file` and `open_paths`.
    pub(super) fn admin_access(&mut self, raw: &mut RawAdmin) -> AdminAccess {
        let tls = raw.tls.take().map(|t| AdminTls {
            cert: self.file_path("admin.tls.cert", &t.cert),
            key: self.file_path("admin.tls.key", &t.key),
        });
        let mut token_hashes = Vec::new();
        for (i, text) in raw.token_hashes.take().unwrap_or_default().iter().enumerate() {
            match TokenHash::parse(text) {
                Ok(hash) => token_hashes.push(hash),
                // The value is not quoted: it may be a token pasted where its hash belongs.
                Err(problem) => self.fail("admin.token_hashes", format!("entry {}: expected {problem}", i + 1)),
            }
        }
        let tokens_file = raw.tokens_file.take().map(|f| self.file_path("admin.tokens_file", &f));
        let open_paths = match raw.open_paths.take() {
            None => DEFAULT_OPEN_PATHS.iter().map(|p| p.to_string()).collect(),
            Some(paths) => {
                for p in paths.iter().filter(|p| !ADMIN_PATHS.contains(&p.as_str())) {
                    self.fail("admin.open_paths", format!("{p:?} is not one of {ADMIN_PATHS:?}"));
                }
                paths
            }
        };
        AdminAccess { tls, token_hashes, tokens_file, open_paths }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::super::super::test_support::{MINIMAL, err, ok};
    use super::super::super::{CertPattern, ClientAuthMode, HostPattern, parse};

    const SECURE: &str = "[listeners.secure]\naddress = \"127.0.0.1:8443\"\n";

    /// Shared ticket keys and client certificates exclude each other: a resumed session is not
    /// asked for its certificate again.
    #[test]
    fn ticket_keys_refused_with_client_ca() {
        let e = err(&format!(
            "{MINIMAL}{SECURE}tls = {{ cert = \"c\", key = \"k\", client_ca = \"ca\", ticket_keys = \"t\" }}\n"
        ));
        assert!(e.starts_with("test.toml: listeners.secure.tls.ticket_keys: cannot be used with client_ca"), "{e}");
        ok(&format!("{MINIMAL}{SECURE}tls = {{ cert = \"c\", key = \"k\", ticket_keys = \"t\" }}\n"));
    }

    /// `client_ca` turns client certificates on (required by default); its companions need it.
    #[test]
    fn client_auth_keys() {
        let text = format!(
            "{MINIMAL}{SECURE}tls = {{ cert = \"c\", key = \"k\", client_ca = \"ca.pem\", client_crls = [\"a.crl\"] }}\n"
        );
        let c = parse(&text, Path::new("/etc/wsgate/config.toml")).unwrap();
        let auth = c.listeners.iter().find(|l| l.name == "secure").unwrap().tls.clone().unwrap().client_auth.unwrap();
        assert_eq!(auth.mode, ClientAuthMode::Required);
        assert_eq!(auth.ca, Path::new("/etc/wsgate/ca.pem"));
        assert_eq!(auth.crls, vec![Path::new("/etc/wsgate/a.crl").to_path_buf()]);
        let optional = ok(&format!(
            "{MINIMAL}{SECURE}tls = {{ cert = \"c\", key = \"k\", client_ca = \"ca\", client_auth = \"optional\" }}\n"
        ));
        let tls = optional.listeners.iter().find(|l| l.name == "secure").unwrap().tls.clone().unwrap();
        assert_eq!(tls.client_auth.unwrap().mode, ClientAuthMode::Optional);
        let e = err(&format!("{MINIMAL}{SECURE}tls = {{ cert = \"c\", key = \"k\", client_auth = \"optional\" }}\n"));
        assert_eq!(
            e,
            "test.toml: listeners.secure.tls.client_auth: needs tls.client_ca, the CA client certificates must chain to"
        );
        let e = err(&format!(
            "{MINIMAL}{SECURE}tls = {{ cert = \"c\", key = \"k\", client_ca = \"ca\", client_auth = \"maybe\" }}\n"
        ));
        assert!(
            e.contains("listeners.secure.tls.client_auth: \"maybe\" is not one of \"required\", \"optional\""),
            "{e}"
        );
        let e = err(&format!("{MINIMAL}{SECURE}tls = {{ cert = \"c\", key = \"k\", client_ca = \"\" }}\n"));
        assert!(e.contains("listeners.secure.tls.client_ca: must name a file"), "{e}");
    }

    /// `client_certs`: CN, URI and DNS patterns; an empty list, a bad entry and a route no
    /// listener can admit are one line each naming the key.
    #[test]
    fn client_cert_patterns() {
        let with_ca = format!("{SECURE}tls = {{ cert = \"c\", key = \"k\", client_ca = \"ca\" }}\n");
        let c = ok(&format!(
            "{MINIMAL}client_certs = [\"CN=ops team\", \"*.Ops.example.com\", \"URI:spiffe://example.org/ops\"]\n{with_ca}"
        ));
        assert_eq!(
            c.routes[0].client_certs,
            vec![
                CertPattern::CommonName("ops team".into()),
                CertPattern::Dns(HostPattern::Wildcard(".ops.example.com".into())),
                CertPattern::Uri("spiffe://example.org/ops".into()),
            ]
        );
        assert!(ok(MINIMAL).routes[0].client_certs.is_empty());
        for (list, problem) in [
            ("[]", "routes.echo.client_certs: is empty"),
            ("[\"CN=\"]", "routes.echo.client_certs: \"CN=\" is not"),
            ("[\"URI:nope\"]", "routes.echo.client_certs: \"URI:nope\" is not"),
            ("[\"a b\"]", "routes.echo.client_certs: \"a b\" is not a host name"),
        ] {
            let e = err(&format!("{MINIMAL}client_certs = {list}\n{with_ca}"));
            assert!(e.contains(problem) && e.lines().count() == 1, "{list}: {e}");
        }
        let e = err(&format!("{MINIMAL}client_certs = [\"CN=ops\"]\n"));
        assert_eq!(
            e,
            "test.toml: routes.echo.client_certs: no listener verifies client certificates: set tls.client_ca on a wss listener"
        );
    }

    /// `[admin]`: probes open by default, hashes parsed, a bad hash never quoted.
    #[test]
    fn admin_access_keys() {
        let c = ok(MINIMAL);
        assert!(c.admin_access.tls.is_none() && c.admin_access.token_hashes.is_empty());
        assert_eq!(c.admin_access.open_paths, vec!["/healthz".to_string(), "/readyz".to_string()]);
        let hash = format!("sha256:{}", "aB".repeat(32));
        let c = ok(&format!(
            "{MINIMAL}[admin]\ntls = {{ cert = \"c\", key = \"k\" }}\ntoken_hashes = [\"{hash}\"]\ntokens_file = \"t\"\nopen_paths = []\n"
        ));
        assert_eq!(c.admin_access.token_hashes[0].sha256, [0xab; 32]);
        assert!(c.admin_access.open_paths.is_empty() && c.admin_access.tls.is_some());
        assert!(!format!("{:?}", c.admin_access.token_hashes).contains(&"ab".repeat(32)));
        let e = err(&format!("{MINIMAL}[admin]\ntoken_hashes = [\"{hash}\", \"hunter2\"]\n"));
        assert!(e.starts_with("test.toml: admin.token_hashes: entry 2: expected [name=]sha256:<64 hex digits>"), "{e}");
        assert!(!e.contains("hunter2"), "{e}");
        let e = err(&format!("{MINIMAL}[admin]\nopen_paths = [\"/secret\"]\n"));
        assert!(e.contains("admin.open_paths: \"/secret\" is not one of"), "{e}");
    }
}
