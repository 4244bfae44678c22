//! Mutual TLS client identities (RFC 8705): the certificate chain and private key the sidecar
//! presents to the token endpoint (`tls_client_auth`, `self_signed_tls_client_auth`) and, for
//! certificate-bound tokens, to a route's upstream.
//!
//! [`IdentitySource`] holds one (certificate file, key file) pair and re-reads it when either
//! file changes, so a rotated certificate (cert-manager, a Kubernetes Secret `..data` swap) needs
//! no restart.
//!
//! Invariants:
//! - A pair is usable only when the key parses and matches the leaf certificate's public key;
//!   a mismatched pair is refused at start-up (validation names the key file) and, on rotation,
//!   never replaces the last good pair (one warning per distinct failure).
//! - Each file is read at most [`MAX_FILE_BYTES`] (1 MiB); a check costs two `stat`s, and a pair
//!   is re-read once per new file version (mtime, size, device, inode), never per request.
//! - Key bytes are zeroed when dropped and never appear in `Debug`, logs or errors; the leaf's
//!   SHA-256 thumbprint (`x5t#S256`, public) is what identifies a pair in messages.
//! - The token endpoint's HTTP client is rebuilt once per new pair ([`RotatingHttp`]), so at
//!   most one rebuild per rotation; upstream connectors resolve the pair per handshake, so new
//!   connections present the new certificate and pooled ones keep theirs until they close.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use base64::Engine as _;
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use zeroize::Zeroizing;

use crate::util::{MAX_FILE_BYTES, read_bounded};

/// Why a certificate/key pair is unusable. Never carries file content.
#[derive(Debug, thiserror::Error)]
pub(crate) enum IdentityError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} holds no PEM certificate")]
    NoCert { path: String },
    #[error("{path} is not a PEM certificate chain: {reason}")]
    BadCert { path: String, reason: String },
    #[error("{path} holds no usable PEM private key")]
    BadKey { path: String },
    #[error("{key} does not match the certificate in {cert}: {reason}")]
    Mismatch {
        key: String,
        cert: String,
        reason: String,
    },
}

impl IdentityError {
    /// Whether the problem is the key file's (so validation names that config key).
    pub(crate) fn is_key_problem(&self) -> bool {
        matches!(
            self,
            IdentityError::BadKey { .. } | IdentityError::Mismatch { .. }
        )
    }
}

/// One loaded pair.
pub(crate) struct ClientIdentity {
    certified: Arc<CertifiedKey>,
    /// Certificate PEM followed by key PEM, what `reqwest::Identity::from_pem` takes.
    pem: Zeroizing<Vec<u8>>,
    thumbprint: String,
}

impl fmt::Debug for ClientIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientIdentity")
            .field("x5t#S256", &self.thumbprint)
            .finish_non_exhaustive()
    }
}

impl ClientIdentity {
    /// Reads and checks a pair.
    pub(crate) fn load(cert: &Path, key: &Path) -> Result<ClientIdentity, IdentityError> {
        let read = |p: &Path| {
            read_bounded(p, MAX_FILE_BYTES).map_err(|source| IdentityError::Read {
                path: p.display().to_string(),
                source,
            })
        };
        let cert_pem = read(cert)?;
        let key_pem = read(key)?;
        let chain = CertificateDer::pem_slice_iter(&cert_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| IdentityError::BadCert {
                path: cert.display().to_string(),
                reason: e.to_string(),
            })?;
        let Some(leaf) = chain.first() else {
            return Err(IdentityError::NoCert {
                path: cert.display().to_string(),
            });
        };
        let thumbprint = thumbprint(leaf);
        // The error of a PEM parse could quote what it choked on; the key file's is never shown.
        let private =
            PrivateKeyDer::from_pem_slice(&key_pem).map_err(|_| IdentityError::BadKey {
                path: key.display().to_string(),
            })?;
        let certified =
            CertifiedKey::from_der(chain, private, &crate::tls::provider()).map_err(|e| {
                IdentityError::Mismatch {
                    key: key.display().to_string(),
                    cert: cert.display().to_string(),
                    reason: e.to_string(),
                }
            })?;
        let mut pem = Zeroizing::new(Vec::with_capacity(cert_pem.len() + key_pem.len() + 1));
        pem.extend_from_slice(&cert_pem);
        pem.push(b'\n');
        pem.extend_from_slice(&key_pem);
        Ok(ClientIdentity {
            certified: Arc::new(certified),
            pem,
            thumbprint,
        })
    }

    /// RFC 8705 §3.1 `x5t#S256` of the leaf certificate.
    pub(crate) fn thumbprint(&self) -> &str {
        &self.thumbprint
    }

    /// The pair as the token endpoint's HTTP client presents it.
    pub(crate) fn reqwest_identity(&self) -> Result<reqwest::Identity, String> {
        reqwest::Identity::from_pem(&self.pem).map_err(|e| crate::util::error_chain(&e))
    }
}

/// base64url (no padding) SHA-256 of a certificate's DER: RFC 8705 §3.1.
pub(crate) fn thumbprint(cert: &CertificateDer<'_>) -> String {
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, cert.as_ref());
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(digest.as_ref())
}

/// A file version (symlinks followed, so a Kubernetes `..data` swap is a new inode): the key
/// loader's stamp; `None` when the file cannot be stat'ed.
type Stamp = crate::key::FileStamp;

fn stamp(path: &Path) -> Option<Stamp> {
    Stamp::of(path).ok()
}

struct State {
    current: Arc<ClientIdentity>,
    /// Bumped for every pair that replaced the previous one.
    generation: u64,
    /// The versions `current` came from, or the versions last tried and found unusable.
    seen: (Option<Stamp>, Option<Stamp>),
}

/// A (certificate, key) file pair re-read when either file changes.
pub(crate) struct IdentitySource {
    cert: PathBuf,
    key: PathBuf,
    state: Mutex<State>,
}

impl fmt::Debug for IdentitySource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdentitySource")
            .field("cert", &self.cert)
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

impl IdentitySource {
    /// Loads the pair once; an unusable pair is an error (start-up refuses it).
    pub(crate) fn load(cert: &Path, key: &Path) -> Result<IdentitySource, IdentityError> {
        let seen = (stamp(cert), stamp(key));
        let current = Arc::new(ClientIdentity::load(cert, key)?);
        Ok(IdentitySource {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            state: Mutex::new(State {
                current,
                generation: 0,
                seen,
            }),
        })
    }

    /// The current pair and its generation, re-reading the files first when either changed.
    /// A changed pair that is unusable is warned about once and the last good pair stays.
    pub(crate) fn current(&self) -> (u64, Arc<ClientIdentity>) {
        let now = (stamp(&self.cert), stamp(&self.key));
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if now != state.seen {
            // Recorded before the read, so a broken version is tried (and warned about) once.
            state.seen = now;
            match ClientIdentity::load(&self.cert, &self.key) {
                Ok(new) => {
                    tracing::info!(
                        cert = %self.cert.display(),
                        x5t_s256 = new.thumbprint(),
                        "client certificate re-read"
                    );
                    state.current = Arc::new(new);
                    state.generation += 1;
                }
                Err(e) => tracing::warn!(
                    error = %e,
                    x5t_s256 = state.current.thumbprint(),
                    "client certificate changed but is unusable; keeping the previous one"
                ),
            }
        }
        (state.generation, Arc::clone(&state.current))
    }
}

/// Presents the source's current pair on every TLS handshake (an upstream connector's resolver).
#[derive(Debug)]
pub(crate) struct Resolver(pub(crate) Arc<IdentitySource>);

impl rustls::client::ResolvesClientCert for Resolver {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(&self.0.current().1.certified))
    }

    fn has_certs(&self) -> bool {
        true
    }
}

type Build = dyn Fn(&ClientIdentity) -> Result<reqwest::Client, String> + Send + Sync;

/// The token endpoint's HTTP client for an mTLS method: rebuilt (once) when the pair changes,
/// since a reqwest client's identity is fixed when it is built.
pub(crate) struct RotatingHttp {
    source: IdentitySource,
    build: Box<Build>,
    client: Mutex<(u64, reqwest::Client)>,
}

impl RotatingHttp {
    pub(crate) fn new(source: IdentitySource, build: Box<Build>) -> Result<RotatingHttp, String> {
        let (generation, identity) = source.current();
        let client = build(&identity)?;
        Ok(RotatingHttp {
            source,
            build,
            client: Mutex::new((generation, client)),
        })
    }

    /// The client presenting the current pair. A rebuild that fails keeps the previous client
    /// (and the previous certificate) and is retried at the next rotation.
    pub(crate) fn client(&self) -> reqwest::Client {
        let (generation, identity) = self.source.current();
        let mut held = self.client.lock().unwrap_or_else(PoisonError::into_inner);
        if held.0 != generation {
            held.0 = generation;
            match (self.build)(&identity) {
                Ok(c) => held.1 = c,
                Err(e) => tracing::warn!(
                    error = %e,
                    "cannot build the token client with the new certificate; keeping the previous one"
                ),
            }
        }
        held.1.clone()
    }
}

/// The certificate and key file of a route's upstream identity, if it has one.
pub(crate) fn route_identity_files<'a>(
    route: &'a crate::config::RouteConfig,
    token: &'a crate::config::TokenConfig,
) -> Option<(&'a Path, &'a Path)> {
    if route.use_token_client_cert {
        Some((
            token.client_cert_file.as_deref()?,
            token.client_key_file.as_deref()?,
        ))
    } else {
        Some((
            route.client_cert_file.as_deref()?,
            route.client_key_file.as_deref()?,
        ))
    }
}

/// The route's upstream identity, loaded and checked, if it has one.
pub(crate) fn load_route_identity(
    route: &crate::config::RouteConfig,
    token: &crate::config::TokenConfig,
) -> Result<Option<Arc<IdentitySource>>, IdentityError> {
    route_identity_files(route, token)
        .map(|(cert, key)| IdentitySource::load(cert, key).map(Arc::new))
        .transpose()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(dir: &Path, name: &str, cn: &str) -> (PathBuf, PathBuf, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["client.test".to_string()]).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
        let cert = params.self_signed(&key).unwrap();
        let c = dir.join(format!("{name}.crt"));
        let k = dir.join(format!("{name}.key"));
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        (c, k, thumbprint(cert.der()))
    }

    #[test]
    fn a_mismatched_pair_is_refused_naming_the_key_and_never_its_content() {
        let dir = tempfile::tempdir().unwrap();
        let (cert_a, _, _) = pair(dir.path(), "a", "a");
        let (_, key_b, _) = pair(dir.path(), "b", "b");
        let err = ClientIdentity::load(&cert_a, &key_b).unwrap_err();
        assert!(err.is_key_problem(), "{err}");
        let msg = err.to_string();
        assert!(msg.contains("b.key"), "{msg}");
        let key_text = std::fs::read_to_string(&key_b).unwrap();
        let body = key_text.lines().nth(1).unwrap();
        assert!(!msg.contains(body), "{msg}");
    }

    #[test]
    fn rotation_picks_up_a_new_pair_and_keeps_the_last_good_one_on_a_bad_pair() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key, first) = pair(dir.path(), "live", "one");
        let source = IdentitySource::load(&cert, &key).unwrap();
        assert_eq!(source.current().1.thumbprint(), first);

        // A new pair, swapped in by rename (what a Secret update looks like through a symlink).
        let (c2, k2, second) = pair(dir.path(), "next", "two");
        std::fs::rename(&c2, &cert).unwrap();
        std::fs::rename(&k2, &key).unwrap();
        let (g2, id2) = source.current();
        assert_eq!(id2.thumbprint(), second);
        assert_eq!(g2, 1);

        // Only the certificate rotated: the pair no longer matches, the last good one stays.
        let (c3, _, _) = pair(dir.path(), "half", "three");
        std::fs::rename(&c3, &cert).unwrap();
        let (g3, id3) = source.current();
        assert_eq!((g3, id3.thumbprint()), (1, second.as_str()));
        assert!(format!("{:?}", id3).contains(&second));
    }

    /// A config with `token` lines (besides token_url and client_id) and one route with `route`.
    fn config(
        token: &str,
        route: &str,
    ) -> Result<crate::config::Config, crate::config::ConfigError> {
        crate::config::from_toml_str(&format!(
            "[token]\nclient_id = \"c\"\n{token}\n[[route]]\nname = \"r\"\npath_prefix = \"/\"\n{route}\n"
        ))
    }

    fn keys(r: Result<crate::config::Config, crate::config::ConfigError>) -> Vec<String> {
        match r {
            Ok(_) => vec![],
            Err(e) => e.problems.into_iter().map(|p| p.key).collect(),
        }
    }

    #[test]
    fn client_certificate_problems_name_their_keys() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key, _) = pair(dir.path(), "a", "a");
        let (_, other_key, _) = pair(dir.path(), "b", "b");
        let https = "token_url = \"https://idp.example.com/t\"";
        let up = "upstream = \"https://r.example.com\"";
        let files = |c: &Path, k: &Path| {
            format!(
                "client_cert_file = {:?}\nclient_key_file = {:?}",
                c.display().to_string(),
                k.display().to_string()
            )
        };
        let tls = "auth_method = \"tls_client_auth\"";

        // A good pair: valid, for both methods and on a route.
        for method in ["tls_client_auth", "self_signed_tls_client_auth"] {
            let t = format!(
                "{https}\nauth_method = \"{method}\"\n{}",
                files(&cert, &key)
            );
            assert_eq!(
                keys(config(&t, &format!("{up}\nuse_token_client_cert = true"))),
                Vec::<String>::new()
            );
        }
        assert_eq!(
            keys(config(&format!("{https}\n{tls}"), up)),
            ["token.client_cert_file"]
        );
        // The key does not belong to the certificate: the key file is named.
        assert_eq!(
            keys(config(
                &format!("{https}\n{tls}\n{}", files(&cert, &other_key)),
                up
            )),
            ["token.client_key_file"]
        );
        assert_eq!(
            keys(config(
                &format!(
                    "{https}\n{tls}\nclient_cert_file = {:?}",
                    cert.display().to_string()
                ),
                up
            )),
            ["token.client_key_file"]
        );
        // A certificate cannot be presented over plain http.
        assert_eq!(
            keys(config(
                &format!(
                    "token_url = \"http://idp/t\"\nallow_insecure_token_url = true\n{tls}\n{}",
                    files(&cert, &key)
                ),
                up
            )),
            ["token.token_url"]
        );
        let secret =
            format!("{https}\nauth_method = \"client_secret_post\"\nclient_secret = \"s\"");
        assert_eq!(
            keys(config(
                &secret,
                &format!("{up}\nuse_token_client_cert = true")
            )),
            ["route[0].use_token_client_cert"]
        );
        assert_eq!(
            keys(config(
                &secret,
                &format!(
                    "upstream = \"http://r\"\nallow_insecure_upstream = true\n{}",
                    files(&cert, &key)
                )
            )),
            ["route[0].upstream"]
        );
        assert_eq!(
            keys(config(
                &secret,
                &format!("{up}\n{}", files(&cert, &other_key))
            )),
            ["route[0].client_key_file"]
        );
    }
}
