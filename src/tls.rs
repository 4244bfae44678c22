//! TLS trust for outgoing connections: the system roots, the bundled webpki roots, and the
//! operator's extra CA files.

use std::path::Path;
use std::sync::{Arc, OnceLock};

use rustls::RootCertStore;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

#[derive(Debug, thiserror::Error)]
pub(crate) enum TlsError {
    #[error("cannot read CA file {path}: {source}")]
    Open {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read CA file {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    #[error("CA file {path} holds a certificate rustls rejects: {source}")]
    BadCert {
        path: String,
        #[source]
        source: rustls::Error,
    },
}

/// Reads every PEM certificate in `path` (at most [`crate::util::MAX_FILE_BYTES`]).
pub(crate) fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = crate::util::read_bounded(path, crate::util::MAX_FILE_BYTES).map_err(|source| {
        TlsError::Open {
            path: path.display().to_string(),
            source,
        }
    })?;
    CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::Read {
            path: path.display().to_string(),
            source,
        })
}

/// The roots every outgoing connection trusts: webpki's bundle plus whatever the system has.
fn base_roots() -> &'static RootCertStore {
    static ROOTS: OnceLock<RootCertStore> = OnceLock::new();
    ROOTS.get_or_init(|| {
        let mut roots = RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        // A distroless image may have no system store; the webpki bundle still covers public CAs.
        let native = rustls_native_certs::load_native_certs();
        let _ = roots.add_parsable_certificates(native.certs);
        roots
    })
}

/// The process-wide crypto provider; installed once so rustls never has to guess.
pub(crate) fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    static P: OnceLock<Arc<rustls::crypto::CryptoProvider>> = OnceLock::new();
    P.get_or_init(|| {
        let p = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let _ = rustls::crypto::CryptoProvider::install_default(p.as_ref().clone());
        p
    })
    .clone()
}

/// A client config trusting the base roots plus the certificates in `ca_file`. ALPN (h2,
/// http/1.1) is left to the connector that uses it.
pub(crate) fn client_config(ca_file: Option<&Path>) -> Result<rustls::ClientConfig, TlsError> {
    let mut roots = base_roots().clone();
    if let Some(path) = ca_file {
        for cert in load_certs(path)? {
            roots.add(cert).map_err(|source| TlsError::BadCert {
                path: path.display().to_string(),
                source,
            })?;
        }
    }
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("aws-lc-rs supports the default protocol versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(config)
}
