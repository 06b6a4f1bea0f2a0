//! The backend transport keys: a Unix-socket `backend` (`unix:/path`, `unix:@name`) and a
//! route's `[routes.NAME.backend_tls]` table. The files the table names are read later, by
//! `backend::tls::load`; here only their presence in the config and how the keys combine.

use std::net::IpAddr;

use super::super::raw::RawBackendTls;
use super::super::{Backend, BackendTls, UnixAddr};
use super::Validator;

/// The longest socket path or abstract name the kernel takes: `sun_path` is 108 bytes, one of
/// them the terminating (or, for an abstract name, leading) NUL.
const MAX_UNIX_NAME_BYTES: usize = 107;

impl Validator<'_> {
    /// The part of a `backend` value after `unix:`, under `key`: a socket path (relative to the
    /// config file's directory) or, after `@`, a Linux abstract name.
    pub(super) fn unix_backend(&mut self, key: &str, value: &str, rest: &str) -> Option<Backend> {
        let (addr, len) = match rest.strip_prefix('@') {
            Some(name) => {
                if !cfg!(any(target_os = "linux", target_os = "android")) {
                    self.fail(key, format!("{value:?}: abstract Unix sockets (\"unix:@NAME\") exist only on Linux"));
                    return None;
                }
                (UnixAddr::Abstract(name.to_string()), name.len())
            }
            None => {
                let path = self.dir.join(rest);
                let len = path.as_os_str().len();
                (UnixAddr::Path(path), len)
            }
        };
        if rest.is_empty() || rest == "@" {
            self.fail(key, format!("{value:?} names no socket, e.g. \"unix:/run/app.sock\" or \"unix:@app\""));
            return None;
        }
        if rest.contains('\0') {
            self.fail(key, format!("{value:?} contains a NUL byte"));
            return None;
        }
        if len > MAX_UNIX_NAME_BYTES {
            self.fail(
                key,
                format!("{value:?} is {len} bytes long; a Unix socket name is at most {MAX_UNIX_NAME_BYTES}"),
            );
            return None;
        }
        Some(Backend::Unix(addr))
    }

    /// A route's `backend_tls` table, under `key` (`routes.NAME.backend_tls`), for `backend`.
    pub(super) fn backend_tls(
        &mut self,
        key: &str,
        raw: Option<RawBackendTls>,
        backend: Option<&Backend>,
    ) -> Option<Option<BackendTls>> {
        let Some(raw) = raw else { return Some(None) };
        match backend {
            Some(Backend::Echo) => {
                self.fail(key, "the built-in echo backend has no TLS; remove the table");
                return None;
            }
            // A socket path is no name a certificate could be checked against.
            Some(Backend::Unix(_)) if raw.server_name.is_none() => {
                self.fail(
                    format!("{key}.server_name"),
                    "required for a Unix-socket backend: the name its certificate is checked against",
                );
                return None;
            }
            _ => {}
        }
        let server_name = match raw.server_name {
            None => None,
            Some(name) => Some(self.server_name(&format!("{key}.server_name"), name)?),
        };
        let ca = raw.ca.map(|ca| self.file_path(&format!("{key}.ca"), &ca));
        let client_cert = match (raw.client_cert, raw.client_key) {
            (None, None) => None,
            (Some(cert), Some(k)) => Some((
                self.file_path(&format!("{key}.client_cert"), &cert),
                self.file_path(&format!("{key}.client_key"), &k),
            )),
            (Some(_), None) => {
                self.fail(format!("{key}.client_key"), "required with client_cert");
                return None;
            }
            (None, Some(_)) => {
                self.fail(format!("{key}.client_cert"), "required with client_key");
                return None;
            }
        };
        if raw.insecure && ca.is_some() {
            self.fail(format!("{key}.insecure"), "insecure = true trusts every certificate: remove ca, or insecure");
            return None;
        }
        Some(Some(BackendTls { server_name, ca, client_cert, insecure: raw.insecure }))
    }

    /// A name for SNI and certificate checks: a DNS name or an IP address.
    fn server_name(&mut self, key: &str, name: String) -> Option<String> {
        let is_dns = !name.is_empty()
            && name.len() <= 253
            && name.split('.').all(|label| {
                !label.is_empty()
                    && label.len() <= 63
                    && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            });
        if is_dns || name.parse::<IpAddr>().is_ok() {
            Some(name)
        } else {
            self.fail(key, format!("{name:?} is not a DNS name or an IP address (no port, no scheme)"));
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use super::super::super::test_support::{MINIMAL, err, ok};
    use super::super::super::{Backend, BackendTls, UnixAddr, parse};

    fn route(backend: &str, extra: &str) -> String {
        format!(
            "[listeners.plain]\naddress = \"127.0.0.1:8080\"\n[routes.r]\npath = \"/r\"\nbackend = {backend:?}\n{extra}"
        )
    }

    /// `unix:` paths resolve against the config's directory; `unix:@name` is abstract; the
    /// kernel's length limit and an empty name are one line each.
    #[test]
    fn unix_backends() {
        let c = parse(&route("unix:/run/app.sock", ""), Path::new("/etc/wsgate/config.toml")).unwrap();
        assert_eq!(c.routes[0].backend, Backend::Unix(UnixAddr::Path("/run/app.sock".into())));
        assert_eq!(c.routes[0].backend.to_string(), "unix:/run/app.sock");
        let c = parse(&route("unix:app.sock", ""), Path::new("/etc/wsgate/config.toml")).unwrap();
        assert_eq!(c.routes[0].backend, Backend::Unix(UnixAddr::Path("/etc/wsgate/app.sock".into())));
        #[cfg(target_os = "linux")]
        {
            let c = ok(&route("unix:@wsgate-test", ""));
            assert_eq!(c.routes[0].backend, Backend::Unix(UnixAddr::Abstract("wsgate-test".into())));
            assert_eq!(c.routes[0].backend.to_string(), "unix:@wsgate-test");
        }
        for (value, problem) in [
            ("unix:", "routes.r.backend: \"unix:\" names no socket"),
            ("unix:@", "routes.r.backend: \"unix:@\" names no socket"),
            (&format!("unix:/{}", "a".repeat(107)), "is 108 bytes long; a Unix socket name is at most 107"),
        ] {
            let e = err(&route(value, ""));
            assert!(e.contains(problem) && e.lines().count() == 1, "{value}: {e}");
        }
    }

    /// `backend_tls`: defaults, paths, the pairs that must come together, and what it cannot
    /// be combined with.
    #[test]
    fn backend_tls_table() {
        let c = parse(
            &route(
                "db.internal:5432",
                "[routes.r.backend_tls]\nca = \"ca.pem\"\nclient_cert = \"c.pem\"\nclient_key = \"k.pem\"\n",
            ),
            Path::new("/etc/wsgate/config.toml"),
        )
        .unwrap();
        let dir = PathBuf::from("/etc/wsgate");
        assert_eq!(
            c.routes[0].backend_tls,
            Some(BackendTls {
                server_name: None,
                ca: Some(dir.join("ca.pem")),
                client_cert: Some((dir.join("c.pem"), dir.join("k.pem"))),
                insecure: false,
            })
        );
        assert_eq!(ok(MINIMAL).routes[0].backend_tls, None);
        let c = ok(&route("10.0.0.1:443", "[routes.r.backend_tls]\nserver_name = \"api.example.com\"\n"));
        assert_eq!(c.routes[0].backend_tls.as_ref().unwrap().server_name.as_deref(), Some("api.example.com"));
        let c = ok(&route("unix:/run/tls.sock", "[routes.r.backend_tls]\nserver_name = \"10.1.2.3\"\n"));
        assert!(c.routes[0].backend_tls.is_some());
        for (backend, table, problem) in [
            ("builtin:echo", "", "routes.r.backend_tls: the built-in echo backend has no TLS"),
            ("unix:/run/tls.sock", "", "routes.r.backend_tls.server_name: required for a Unix-socket backend"),
            ("h:1", "client_cert = \"c.pem\"\n", "routes.r.backend_tls.client_key: required with client_cert"),
            ("h:1", "client_key = \"k.pem\"\n", "routes.r.backend_tls.client_cert: required with client_key"),
            (
                "h:1",
                "server_name = \"https://x\"\n",
                "routes.r.backend_tls.server_name: \"https://x\" is not a DNS name",
            ),
            (
                "h:1",
                "ca = \"ca.pem\"\ninsecure = true\n",
                "routes.r.backend_tls.insecure: insecure = true trusts every",
            ),
            ("h:1", "ca = \"\"\n", "routes.r.backend_tls.ca: must name a file"),
            ("h:1", "verify = false\n", "unknown field `verify`"),
        ] {
            let e = err(&route(backend, &format!("[routes.r.backend_tls]\n{table}")));
            assert!(e.contains(problem) && e.lines().count() == 1, "{table}: {e}");
        }
    }
}
