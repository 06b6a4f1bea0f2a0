//! TLS for `wss` listeners: rustls server configs from PEM files, client certificate
//! verification (mTLS: a CA file, `required` or `optional`, revocation lists), and the
//! self-signed development pair generated when the config allows it.
//!
//! The crypto provider is always passed explicitly (aws-lc-rs, which offers the post-quantum
//! X25519MLKEM768 key exchange): rustls's process-wide default would panic if feature
//! unification ever enabled a second provider. Only HTTP/1.1 is offered over ALPN, so browsers
//! never try HTTP/2 on a wss port. Every error names the file it is about.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::ClientCertVerifier;
use rustls::{RootCertStore, ServerConfig};

use crate::config::{ClientAuth, ClientAuthMode};

/// Why TLS material could not be loaded or generated.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A certificate file could not be read or holds no certificate.
    #[error("certificate file {path}: {problem}")]
    Cert {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        problem: String,
    },
    /// A key file could not be read or holds no usable key.
    #[error("key file {path}: {problem}")]
    Key {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        problem: String,
    },
    /// The certificate and key do not belong together, or rustls refused them.
    #[error("certificate {cert} with key {key}: {source}")]
    Pair {
        /// Certificate file.
        cert: PathBuf,
        /// Key file.
        key: PathBuf,
        /// rustls's reason.
        #[source]
        source: rustls::Error,
    },
    /// The listener's `ticket_keys` file could not be used, or tickets could not be set up.
    #[error(transparent)]
    TicketKeys(#[from] crate::tickets::TicketKeysError),
    /// The CA file for client certificates (`tls.client_ca`) could not be read or holds no
    /// usable CA certificate.
    #[error("client_ca file {path}: {problem}")]
    ClientCa {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        problem: String,
    },
    /// A revocation list file (`tls.client_crls`) could not be read or holds no usable CRL.
    #[error("client_crls file {path}: {problem}")]
    Crl {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        problem: String,
    },
    /// Writing a generated development pair failed.
    #[error("generate development certificate into {path}: {problem}")]
    Generate {
        /// The file being written.
        path: PathBuf,
        /// What went wrong.
        problem: String,
    },
}

/// The one crypto provider wsgate uses, for servers and (in tests and client mode) clients.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// For tests across the crate: a self-signed certificate for "localhost", as a server config
/// and a client config trusting it.
#[cfg(test)]
pub(crate) fn self_signed_configs() -> (Arc<ServerConfig>, Arc<rustls::ClientConfig>) {
    let generated = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let cert = generated.cert.der().clone();
    let key = PrivateKeyDer::Pkcs8(generated.signing_key.serialize_der().into());
    let server = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.clone()], key)
        .unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert).unwrap();
    let client = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    (Arc::new(server), Arc::new(client))
}

/// Builds a server config from a PEM certificate chain and key.
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>, TlsError> {
    server_config_with(cert, key, None, None)
}

/// Builds a server config from a PEM certificate chain and key that, with `clients`, asks for
/// client certificates and verifies them: a certificate that does not chain to the CA, has
/// expired, is not for client authentication or is revoked by one of the lists fails the
/// handshake, as does none at all when it is `required`. With `resumption`, sessions are
/// resumed with that ticketer and cache (kept across reloads) instead of fresh ones.
pub fn server_config_with(
    cert: &Path,
    key: &Path,
    clients: Option<&ClientAuth>,
    resumption: Option<crate::tickets::State>,
) -> Result<Arc<ServerConfig>, TlsError> {
    let cert_err = |problem: String| TlsError::Cert { path: cert.to_path_buf(), problem };
    let chain = CertificateDer::pem_file_iter(cert)
        .map_err(|e| cert_err(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| cert_err(e.to_string()))?;
    if chain.is_empty() {
        return Err(cert_err("no PEM certificate in the file".into()));
    }
    let key_der = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| TlsError::Key { path: key.to_path_buf(), problem: e.to_string() })?;
    let pair_err = |source| TlsError::Pair { cert: cert.to_path_buf(), key: key.to_path_buf(), source };
    let builder =
        ServerConfig::builder_with_provider(provider()).with_safe_default_protocol_versions().map_err(pair_err)?;
    let builder = match clients {
        None => builder.with_no_client_auth(),
        Some(clients) => builder.with_client_cert_verifier(client_verifier(clients)?),
    };
    let mut config = builder.with_single_cert(chain, key_der).map_err(pair_err)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    if let Some(state) = resumption {
        config.ticketer = state.ticketer;
        config.session_storage = state.cache;
    }
    Ok(Arc::new(config))
}

/// The verifier of client certificates: roots from `client_ca`, revocation lists from
/// `client_crls`. With lists, every certificate of the client's chain below the CA must be
/// covered by one (rustls's default: a certificate whose issuer published no list fails), so a
/// forgotten intermediate's list fails closed.
fn client_verifier(clients: &ClientAuth) -> Result<Arc<dyn ClientCertVerifier>, TlsError> {
    let ca_err = |problem: String| TlsError::ClientCa { path: clients.ca.clone(), problem };
    let cas = CertificateDer::pem_file_iter(&clients.ca)
        .map_err(|e| ca_err(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ca_err(e.to_string()))?;
    if cas.is_empty() {
        return Err(ca_err("no PEM certificate in the file".into()));
    }
    let mut roots = RootCertStore::empty();
    for ca in cas {
        roots.add(ca).map_err(|e| ca_err(format!("not a usable CA certificate: {e}")))?;
    }
    let mut crls = Vec::new();
    for path in &clients.crls {
        let crl_err = |problem: String| TlsError::Crl { path: path.clone(), problem };
        let lists = CertificateRevocationListDer::pem_file_iter(path)
            .map_err(|e| crl_err(e.to_string()))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| crl_err(e.to_string()))?;
        if lists.is_empty() {
            return Err(crl_err("no PEM X509 CRL in the file".into()));
        }
        // Parsed here too, so that a bad list is reported with its file (rustls's builder
        // would only say that one of them is bad).
        for list in &lists {
            webpki::OwnedCertRevocationList::from_der(list).map_err(|e| crl_err(format!("not a usable CRL: {e}")))?;
        }
        crls.extend(lists);
    }
    let mut builder = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider()).with_crls(crls);
    if clients.mode == ClientAuthMode::Optional {
        builder = builder.allow_unauthenticated();
    }
    builder.build().map_err(|e| ca_err(e.to_string()))
}

/// Whether the development pair should be generated: both files missing. One present and the
/// other missing is an operator's half-finished change, so it is left to fail loudly on load.
pub fn needs_dev_pair(cert: &Path, key: &Path) -> bool {
    !cert.exists() && !key.exists()
}

/// Writes a self-signed certificate for `localhost`, 127.0.0.1 and ::1 to `cert`, and its key
/// to `key` with mode 0600. Creates the directories. Never overwrites an existing file.
pub fn generate_dev_pair(cert: &Path, key: &Path) -> Result<(), TlsError> {
    let names = vec!["localhost".to_string(), "127.0.0.1".to_string(), "::1".to_string()];
    let generated = rcgen::generate_simple_self_signed(names)
        .map_err(|e| TlsError::Generate { path: cert.to_path_buf(), problem: e.to_string() })?;
    write_new(key, generated.signing_key.serialize_pem().as_bytes(), 0o600)?;
    if let Err(e) = write_new(cert, generated.cert.pem().as_bytes(), 0o644) {
        // A lone key would make every later start fail ("only one file exists"): remove it.
        let _ = std::fs::remove_file(key);
        return Err(e);
    }
    Ok(())
}

fn write_new(path: &Path, contents: &[u8], mode: u32) -> Result<(), TlsError> {
    let err = |e: std::io::Error| TlsError::Generate { path: path.to_path_buf(), problem: e.to_string() };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, mode);
    #[cfg(not(unix))]
    let _ = mode;
    let mut file = options.open(path).map_err(err)?;
    file.write_all(contents).map_err(err)?;
    file.sync_all().map_err(err)
}

/// Any server certificate for any name (a backend route's `insecure = true`, `wsgate connect
/// --insecure`); the handshake's signatures are still checked, so the connection is at least
/// encrypted to whoever answered.
#[derive(Debug)]
pub(crate) struct AnyCertificate(pub(crate) Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The development pair loads, its key is mode 0600, and it is never overwritten.
    #[test]
    fn generated_pair_loads_and_key_is_private() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = (dir.path().join("sub/cert.pem"), dir.path().join("sub/key.pem"));
        assert!(needs_dev_pair(&cert, &key));
        generate_dev_pair(&cert, &key).unwrap();
        assert!(!needs_dev_pair(&cert, &key));
        server_config(&cert, &key).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
        }
        // Never overwrites.
        assert!(generate_dev_pair(&cert, &key).is_err());
    }

    /// TLS errors name the file they are about.
    #[test]
    fn errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.pem");
        let e = server_config(&missing, &missing).unwrap_err().to_string();
        assert!(e.contains("nope.pem"), "{e}");
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "").unwrap();
        let e = server_config(&empty, &missing).unwrap_err().to_string();
        assert!(e.contains("empty.pem") && e.contains("no PEM certificate"), "{e}");
    }
}
