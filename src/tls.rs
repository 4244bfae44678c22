//! TLS trust for outgoing connections: the system roots, the bundled webpki roots, and the
//! operator's extra CA files; or, with `ca_only`, the operator's CA files alone.

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

/// The roots for one destination: the base roots plus the certificates in `ca_file`, or with
/// `ca_only` (docs/spec.md §4: a private upstream pinned to its own CA) those certificates alone.
pub(crate) fn root_store(ca_file: Option<&Path>, ca_only: bool) -> Result<RootCertStore, TlsError> {
    let mut roots = if ca_only {
        RootCertStore::empty()
    } else {
        base_roots().clone()
    };
    if let Some(path) = ca_file {
        for cert in load_certs(path)? {
            roots.add(cert).map_err(|source| TlsError::BadCert {
                path: path.display().to_string(),
                source,
            })?;
        }
    }
    Ok(roots)
}

/// A client config trusting [`root_store`]. ALPN (h2, http/1.1) is left to the connector that
/// uses it.
pub(crate) fn client_config(
    ca_file: Option<&Path>,
    ca_only: bool,
) -> Result<rustls::ClientConfig, TlsError> {
    let roots = root_store(ca_file, ca_only)?;
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("aws-lc-rs supports the default protocol versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two self-signed CA certificates in one PEM file.
    fn ca_file(dir: &Path) -> std::path::PathBuf {
        let mut pem = String::new();
        for name in ["pinned CA one", "pinned CA two"] {
            let key = rcgen::KeyPair::generate().unwrap();
            let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
            params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, name);
            pem.push_str(&params.self_signed(&key).unwrap().pem());
        }
        let path = dir.join("ca.pem");
        std::fs::write(&path, pem).unwrap();
        path
    }

    #[test]
    fn ca_only_trusts_the_ca_file_and_none_of_the_base_roots() {
        let dir = tempfile::tempdir().unwrap();
        let ca = ca_file(dir.path());
        let base = base_roots();
        assert!(!base.is_empty(), "the webpki bundle is always there");

        let pinned = root_store(Some(&ca), true).unwrap();
        assert_eq!(pinned.len(), 2, "exactly the two certificates of ca_file");
        let public: Vec<_> = base.roots.iter().map(|r| r.subject.as_ref()).collect();
        assert!(
            pinned
                .roots
                .iter()
                .all(|r| !public.contains(&r.subject.as_ref())),
            "no base root may be trusted with ca_only"
        );

        // Without ca_only the file adds to the base roots.
        let merged = root_store(Some(&ca), false).unwrap();
        assert_eq!(merged.len(), base.len() + 2);
    }
}
