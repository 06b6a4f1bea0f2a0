//! TLS to a route's backends (`[routes.NAME.backend_tls]`): the rustls client config each such
//! route dials with, loaded from its files at start, on every reload and by `wsgate check`
//! ([`load`]), and the handshake made on each new backend connection ([`Connector::handshake`]).
//!
//! Certificates are verified by default, against the route's `ca` file or, without one, the
//! bundled web PKI roots (`webpki-roots`: a `FROM scratch` image has no system store).
//! `insecure = true` accepts any certificate, still checking that the server holds its key, and
//! is warned about at every load. A backend that ends without `close_notify` is not a clean end:
//! rustls reports it as `UnexpectedEof`, which the session closes with 1011.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tracing::warn;

use super::BackendError;
use crate::config::{BackendTls, Config, Route};

/// A route's backend TLS, ready to dial with.
#[derive(Clone)]
pub struct Connector {
    connector: TlsConnector,
    /// The configured `server_name`; `None`: each connection's host.
    server_name: Option<ServerName<'static>>,
    insecure: bool,
}

impl std::fmt::Debug for Connector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connector")
            .field("server_name", &self.server_name)
            .field("insecure", &self.insecure)
            .finish_non_exhaustive()
    }
}

/// A backend TLS file that cannot be used: one line naming the file, the key and the problem.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}: {key}: {problem}", file.display())]
pub struct LoadError {
    /// The file at fault.
    pub file: PathBuf,
    /// The config key that names it (`routes.NAME.backend_tls.ca`).
    pub key: String,
    /// What is wrong.
    pub problem: String,
}

/// Loads the backend TLS of every route of `config` that has one, by route name; every problem
/// found, when any. Warns once per load about each route with `insecure = true`.
pub fn load(config: &Config) -> Result<HashMap<String, Arc<Connector>>, Vec<LoadError>> {
    let (mut loaded, mut errors) = (HashMap::new(), Vec::new());
    for route in &config.routes {
        let Some(tls) = &route.backend_tls else { continue };
        match Connector::load(&route.name, tls) {
            Ok(connector) => {
                if tls.insecure {
                    warn_insecure(route);
                }
                loaded.insert(route.name.clone(), Arc::new(connector));
            }
            Err(e) => errors.extend(e),
        }
    }
    if errors.is_empty() { Ok(loaded) } else { Err(errors) }
}

fn warn_insecure(route: &Route) {
    warn!(
        route = %route.name,
        backend = %route.backend,
        "INSECURE: backend_tls.insecure = true: the backend's certificate is NOT verified, so anyone \
         on the path to it can read and change this route's traffic; set ca (or use a publicly \
         trusted certificate) and remove insecure"
    );
}

impl Connector {
    fn load(route: &str, tls: &BackendTls) -> Result<Connector, Vec<LoadError>> {
        let key = |k: &str| format!("routes.{route}.backend_tls.{k}");
        let mut errors = Vec::new();
        let provider = crate::tls::provider();
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .expect("the provider supports the default protocol versions");
        let builder = if tls.insecure {
            builder.dangerous().with_custom_certificate_verifier(Arc::new(crate::tls::AnyCertificate(provider)))
        } else {
            let roots = match &tls.ca {
                None => Some(RootCertStore::from_iter(webpki_roots::TLS_SERVER_ROOTS.iter().cloned())),
                Some(ca) => roots(ca).map_err(|problem| errors.push(error(ca, key("ca"), problem))).ok(),
            };
            builder.with_root_certificates(roots.unwrap_or_else(RootCertStore::empty))
        };
        let config = match &tls.client_cert {
            None => Some(builder.with_no_client_auth()),
            Some((cert, private)) => {
                let chain = chain(cert).map_err(|problem| errors.push(error(cert, key("client_cert"), problem))).ok();
                let private = PrivateKeyDer::from_pem_file(private)
                    .map_err(|e| errors.push(error(private, key("client_key"), e.to_string())))
                    .ok();
                match (chain, private) {
                    (Some(chain), Some(private)) => builder
                        .with_client_auth_cert(chain, private)
                        .map_err(|e| errors.push(error(cert, key("client_cert"), format!("with client_key: {e}"))))
                        .ok(),
                    _ => None,
                }
            }
        };
        let server_name = tls.server_name.as_ref().map(|name| {
            ServerName::try_from(name.clone()).expect("validated as a DNS name or an IP address by config")
        });
        match config {
            Some(config) if errors.is_empty() => {
                Ok(Connector { connector: TlsConnector::from(Arc::new(config)), server_name, insecure: tls.insecure })
            }
            _ => Err(errors),
        }
    }

    /// Runs the TLS handshake on `stream`, connected to `host` (`target` as errors name it), and
    /// checks the certificate against the configured `server_name` or else `host`.
    pub(super) async fn handshake<S>(&self, host: &str, stream: S, target: &str) -> Result<TlsStream<S>, BackendError>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let fail = |source| BackendError::Tls { target: target.to_string(), source };
        let name = match &self.server_name {
            Some(name) => name.clone(),
            None => ServerName::try_from(host.to_string())
                .map_err(|e| fail(io::Error::new(io::ErrorKind::InvalidInput, e)))?,
        };
        self.connector.connect(name, stream).await.map_err(fail)
    }
}

fn error(file: &Path, key: String, problem: String) -> LoadError {
    LoadError { file: file.to_path_buf(), key, problem }
}

/// Every certificate of a PEM file; at least one.
fn chain(file: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(file)
        .map_err(|e| e.to_string())?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())?;
    if certs.is_empty() {
        return Err("no PEM certificate in the file".into());
    }
    Ok(certs)
}

/// The CAs of a PEM file, each usable as a trust anchor.
fn roots(file: &Path) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    for cert in chain(file)? {
        roots.add(cert).map_err(|e| format!("not a usable CA certificate: {e}"))?;
    }
    Ok(roots)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tls(ca: Option<PathBuf>, client_cert: Option<(PathBuf, PathBuf)>) -> BackendTls {
        BackendTls { server_name: None, ca, client_cert, insecure: false }
    }

    /// Missing and unreadable files are one line each naming file and key; the bundled roots
    /// need no file.
    #[test]
    fn load_errors_name_file_and_key() {
        assert!(Connector::load("r", &tls(None, None)).is_ok());
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        let garbage = dir.path().join("garbage.pem");
        std::fs::write(&garbage, "not pem").unwrap();
        let errors =
            Connector::load("r", &tls(Some(missing.clone()), Some((garbage.clone(), missing.clone())))).unwrap_err();
        let lines: Vec<String> = errors.iter().map(ToString::to_string).collect();
        assert_eq!(lines.len(), 3, "{lines:?}");
        assert!(lines[0].starts_with(&format!("{}: routes.r.backend_tls.ca: ", missing.display())), "{lines:?}");
        assert_eq!(
            lines[1],
            format!("{}: routes.r.backend_tls.client_cert: no PEM certificate in the file", garbage.display())
        );
        assert!(
            lines[2].starts_with(&format!("{}: routes.r.backend_tls.client_key: ", missing.display())),
            "{lines:?}"
        );
    }
}
