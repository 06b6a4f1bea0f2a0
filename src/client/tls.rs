//! The client's TLS config for wss://: the server's certificate verified against a CA file
//! (`--ca`) or the system's root bundle, or not at all (`--insecure`, which `main` warns about
//! loudly); a client certificate for mTLS. HTTP/1.1 over ALPN, as the gateway offers.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore};

use super::{ClientError, Options};

/// The TLS config `options` ask for; `None` for ws://.
pub(super) fn config(options: &Options) -> Result<Option<Arc<ClientConfig>>, ClientError> {
    if !options.target.secure {
        return Ok(None);
    }
    let provider = crate::tls::provider();
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| ClientError::Usage(format!("TLS: {e}")))?;
    let tls = &options.tls;
    let builder = if tls.insecure {
        builder.dangerous().with_custom_certificate_verifier(Arc::new(crate::tls::AnyCertificate(provider)))
    } else {
        let (file, what) = match (&tls.ca, &tls.system_roots) {
            (Some(ca), _) => (ca, "--ca"),
            (None, Some(bundle)) => (bundle, "the system's CA bundle"),
            (None, None) => {
                return Err(ClientError::Usage(
                    "no CA bundle found (SSL_CERT_FILE, /etc/ssl/certs/ca-certificates.crt): give --ca FILE".into(),
                ));
            }
        };
        builder.with_root_certificates(roots(file, what)?)
    };
    let mut config = match &tls.identity {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => {
            let chain = certificates(cert, "--cert")?;
            let key = PrivateKeyDer::from_pem_file(key)
                .map_err(|e| ClientError::Usage(format!("--key {}: {e}", key.display())))?;
            builder.with_client_auth_cert(chain, key).map_err(|e| ClientError::Usage(format!("--cert/--key: {e}")))?
        }
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Some(Arc::new(config)))
}

fn certificates(path: &Path, what: &str) -> Result<Vec<CertificateDer<'static>>, ClientError> {
    let bad = |problem: String| ClientError::Usage(format!("{what} {}: {problem}", path.display()));
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| bad(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(e.to_string()))?;
    if certs.is_empty() {
        return Err(bad("no certificate in the file".into()));
    }
    Ok(certs)
}

fn roots(path: &Path, what: &str) -> Result<RootCertStore, ClientError> {
    let mut store = RootCertStore::empty();
    // A system bundle may hold a certificate rustls cannot use; the others still count.
    let (added, _) = store.add_parsable_certificates(certificates(path, what)?);
    if added == 0 {
        return Err(ClientError::Usage(format!("{what} {}: no usable CA certificate", path.display())));
    }
    Ok(store)
}
