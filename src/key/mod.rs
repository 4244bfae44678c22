//! The signing key for the RFC 7523 client assertion (`private_key_jwt`).
//!
//! Job: turn a key file into a [`SigningKey`] that signs JWTs and publishes its public JWK, and
//! keep it current when the file is replaced (Kubernetes Secret rotation).
//!
//! - `alg` — the one algorithm catalogue: supported JOSE algorithms, their names, which fit
//!   which key type. Everything else in the crate asks it.
//! - `decode` — PEM (PKCS#8, PKCS#1 RSA, SEC1 EC) → the DER jsonwebtoken's `EncodingKey` wants.
//! - `jwk` — private JWKs and one-key JWK Sets → the same.
//! - `public` — the public JWK and its RFC 7638 thumbprint.
//! - `source` — [`KeySource`] (re-reading on change) and [`write_private`].
//!
//! Invariants:
//! - A key is parsed once and checked by aws-lc-rs; signing never touches the file format again.
//!   ASN.1 is read and written by the RustCrypto `der` family, never by hand.
//! - The published JWK and the thumbprint are the same whatever form the key was read from.
//! - Key bytes held while decoding are `Zeroizing`; errors and `Debug`
//!   output never contain key material (tests pin both).
//! - `alg` always fits the key type, and `kid` is the configured one, else the JWK's, else the
//!   thumbprint.

mod alg;
mod decode;
mod jwk;
mod public;
mod source;
#[cfg(test)]
mod test_support;

use std::fmt;
use std::io;
use std::path::PathBuf;

use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::rsa::KeySize;
use aws_lc_rs::signature::{EcdsaKeyPair, Ed25519KeyPair, RsaKeyPair};
use jsonwebtoken::{EncodingKey, Header};
use serde_json::Value;
use zeroize::Zeroizing;

pub use jsonwebtoken::Algorithm;

pub(crate) use self::alg::{alg_name, is_implied_by_key, parse_alg, supported_list};
pub(crate) use self::source::{FileStamp, KeySource, write_private};

use self::alg::KeyType;
use self::public::PublicParts;
use crate::secret::Secret;

/// Why a key could not be loaded or used. Messages never contain key bytes.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// A configuration problem found before any key was read.
    #[error("{0}")]
    Config(String),
    /// Anything that went wrong with the key in a file, with the file named.
    #[error("key file {}: {reason}", path.display())]
    File {
        path: PathBuf,
        reason: Box<KeyError>,
    },
    #[error("cannot read: {0}")]
    Read(io::Error),
    #[error("larger than {limit} bytes, which no private key is: is this the right file?")]
    TooLarge { limit: u64 },
    #[error(
        "not a private key: expected PEM (PKCS#8 \"PRIVATE KEY\", \"RSA PRIVATE KEY\", \"EC PRIVATE KEY\") or a private JWK (JSON)"
    )]
    UnknownFormat,
    #[error("no private key in the PEM data{found}")]
    NoPrivateKey { found: String },
    #[error(
        "encrypted private keys are not supported: decrypt it first (openssl pkcs8 -topk8 -nocrypt)"
    )]
    Encrypted,
    #[error("the PEM data holds {0} private keys; expected exactly one")]
    MultipleKeys(usize),
    #[error("malformed PEM: {0}")]
    Pem(&'static str),
    #[error("malformed {0}")]
    Malformed(&'static str),
    #[error("invalid JWK: {0}")]
    Jwk(String),
    #[error("the {kind} private key was rejected: {reason}")]
    Rejected { kind: &'static str, reason: String },
    #[error("unsupported key: {0}")]
    UnsupportedKey(String),
    #[error("unsupported signing algorithm {0}: use one of {list}", list = supported_list())]
    UnsupportedAlg(String),
    #[error("{origin} {alg} does not fit {key}; it fits {fits}")]
    AlgMismatch {
        origin: &'static str,
        alg: String,
        key: &'static str,
        fits: &'static str,
    },
    #[error("signing the assertion failed: {0}")]
    Sign(String),
    #[error("key generation failed")]
    Generate,
    #[error("{} already exists; not overwriting it", .0.display())]
    Exists(PathBuf),
    #[error("cannot write {}: {error}", path.display())]
    Write { path: PathBuf, error: io::Error },
}

/// A loaded private key with its algorithm and key id, ready to sign.
pub struct SigningKey {
    alg: Algorithm,
    kid: String,
    encoding_key: EncodingKey,
    public: PublicParts,
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SigningKey")
            .field("alg", &self.alg)
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

impl SigningKey {
    /// Parses a private key: PEM (PKCS#8 "PRIVATE KEY", PKCS#1 "RSA PRIVATE KEY", SEC1 "EC PRIVATE
    /// KEY") or a private JWK (a JSON object, or a JWK Set holding exactly one key).
    ///
    /// `alg`: the configured `signing_alg`; `None` derives it: the JWK's `alg` member if present,
    /// else RSA → RS256, P-256 → ES256, P-384 → ES384, Ed25519 → EdDSA. An algorithm that does not
    /// fit the key is an error.
    ///
    /// `key_id`: the configured `key_id`; else the JWK's `kid`; else the RFC 7638 thumbprint
    /// (SHA-256) of the public key.
    pub fn from_bytes(
        bytes: &[u8],
        alg: Option<Algorithm>,
        key_id: Option<&str>,
    ) -> Result<SigningKey, KeyError> {
        let parsed = decode::parse_key(bytes)?;
        let alg = alg::choose(parsed.key_type, alg, parsed.jwk_alg.as_deref())?;
        let kid = match key_id {
            Some(k) if k.trim().is_empty() => {
                return Err(KeyError::Config("key_id is empty".into()));
            }
            Some(k) => k.to_owned(),
            None => match parsed.jwk_kid {
                Some(k) if !k.is_empty() => k,
                _ => public::thumbprint(&parsed.public),
            },
        };
        Ok(SigningKey {
            alg,
            kid,
            encoding_key: parsed.encoding_key,
            public: parsed.public,
        })
    }

    pub fn alg(&self) -> Algorithm {
        self.alg
    }

    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The RFC 7638 thumbprint (SHA-256, base64url) of the public key, whatever the kid is
    /// (the default kid; tests compare the two).
    #[cfg(test)]
    pub(crate) fn thumbprint(&self) -> String {
        public::thumbprint(&self.public)
    }

    /// The public JWK: `kty` and the public parameters only, plus `kid`, `alg` and
    /// `"use": "sig"` (Hydra refuses a registered key without `use`).
    pub fn public_jwk(&self) -> Value {
        public::public_jwk(&self.public, &self.kid, self.alg)
    }

    /// Signs `claims` as a compact JWS with the header `{alg, typ: "JWT", kid}`.
    pub(crate) fn sign<T: serde::Serialize>(&self, claims: &T) -> Result<Secret<String>, KeyError> {
        self.sign_typed("JWT", claims)
    }

    /// Like [`SigningKey::sign`] with another `typ` header, e.g. `at+jwt` (RFC 9068).
    pub(crate) fn sign_typed<T: serde::Serialize>(
        &self,
        typ: &str,
        claims: &T,
    ) -> Result<Secret<String>, KeyError> {
        let mut header = Header::new(self.alg);
        header.typ = Some(typ.to_owned());
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, claims, &self.encoding_key)
            .map(Secret::new)
            .map_err(|e| KeyError::Sign(e.to_string()))
    }

    /// Generates a new key for `alg` (RS*/PS*: RSA 2048; ES256: P-256; ES384: P-384; EdDSA:
    /// Ed25519). Returns its PKCS#8 PEM and the loaded key, whose kid is the thumbprint.
    pub(crate) fn generate(alg: Algorithm) -> Result<(Secret<String>, SigningKey), KeyError> {
        let key_type =
            KeyType::for_alg(alg).ok_or_else(|| KeyError::UnsupportedAlg(alg_name(alg).into()))?;
        let pkcs8 = match key_type {
            KeyType::Rsa => {
                let pair =
                    RsaKeyPair::generate(KeySize::Rsa2048).map_err(|_| KeyError::Generate)?;
                let der = pair.as_der().map_err(|_| KeyError::Generate)?;
                Zeroizing::new(der.as_ref().to_vec())
            }
            KeyType::P256 | KeyType::P384 => {
                let (signing_alg, ..) = decode::ec_params(key_type).ok_or(KeyError::Generate)?;
                let pair = EcdsaKeyPair::generate(signing_alg).map_err(|_| KeyError::Generate)?;
                let der = pair.to_pkcs8v1().map_err(|_| KeyError::Generate)?;
                Zeroizing::new(der.as_ref().to_vec())
            }
            KeyType::Ed25519 => {
                let pair = Ed25519KeyPair::generate().map_err(|_| KeyError::Generate)?;
                // v1 (no embedded public key) is what `openssl genpkey` writes and every tool reads.
                let der = pair.to_pkcs8v1().map_err(|_| KeyError::Generate)?;
                Zeroizing::new(der.as_ref().to_vec())
            }
        };
        let pem = decode::pem_encode("PRIVATE KEY", &pkcs8);
        let key = SigningKey::from_bytes(pem.as_bytes(), Some(alg), None)?;
        Ok((Secret::new(pem), key))
    }
}

#[cfg(test)]
mod tests {
    use super::test_support::*;
    use super::*;
    use base64::Engine as _;
    use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
    use jsonwebtoken::jwk::{Jwk, ThumbprintHash};
    use jsonwebtoken::{DecodingKey, Validation};
    use serde_json::json;

    #[test]
    fn fixtures_load_with_the_derived_alg() {
        let cases = [
            ("rsa_pkcs1.pem", Algorithm::RS256, "RSA"),
            ("rsa_pkcs8.pem", Algorithm::RS256, "RSA"),
            ("rsa.jwk.json", Algorithm::RS256, "RSA"),
            ("ec_p256_sec1.pem", Algorithm::ES256, "P-256"),
            ("ec_p256_pkcs8.pem", Algorithm::ES256, "P-256"),
            ("ec_p256.jwk.json", Algorithm::ES256, "P-256"),
            ("ec_p384_sec1.pem", Algorithm::ES384, "P-384"),
            ("ed25519_pkcs8.pem", Algorithm::EdDSA, "Ed25519"),
            ("ed25519.jwk.json", Algorithm::EdDSA, "Ed25519"),
        ];
        for (file, alg, kind) in cases {
            let key = load(file, None, None).unwrap_or_else(|e| panic!("{file}: {e}"));
            assert_eq!(key.alg(), alg, "{file}");
            let jwk = key.public_jwk();
            let got = jwk.get("crv").unwrap_or(&jwk["kty"]);
            assert_eq!(got, kind, "{file}");
            assert_eq!(jwk["alg"], alg_name(alg), "{file}");
            assert_eq!(jwk["use"], "sig", "{file}");
        }
    }

    #[test]
    fn kid_precedence_config_then_jwk_then_thumbprint() {
        let configured = load("ec_p256.jwk.json", None, Some("configured")).unwrap();
        assert_eq!(configured.kid(), "configured");
        assert_eq!(configured.public_jwk()["kid"], "configured");

        let from_jwk = load("ec_p256.jwk.json", None, None).unwrap();
        assert_eq!(from_jwk.kid(), "jwk-kid-1");

        let pem = load("ec_p256_sec1.pem", None, None).unwrap();
        assert_eq!(pem.kid(), from_jwk.thumbprint());
        assert_ne!(pem.kid(), "jwk-kid-1");
        assert_eq!(pem.kid().len(), 43, "SHA-256, base64url without padding");

        let rsa_jwk_without_kid = load("rsa.jwk.json", None, None).unwrap();
        assert_eq!(rsa_jwk_without_kid.kid(), rsa_jwk_without_kid.thumbprint());

        assert!(matches!(
            load("ec_p256.jwk.json", None, Some(" ")),
            Err(KeyError::Config(_))
        ));
    }

    #[test]
    fn thumbprint_agrees_with_jsonwebtoken_for_every_key_type() {
        for file in [
            "rsa_pkcs1.pem",
            "ec_p256_sec1.pem",
            "ec_p384_sec1.pem",
            "ed25519_pkcs8.pem",
        ] {
            let key = load(file, None, None).unwrap();
            let jwk: Jwk = serde_json::from_value(key.public_jwk()).unwrap();
            assert_eq!(
                key.kid(),
                jwk.thumbprint(ThumbprintHash::SHA256).unwrap(),
                "{file}"
            );
        }
    }

    #[test]
    fn configured_alg_must_fit_the_key() {
        let mismatches = [
            ("rsa_pkcs1.pem", Algorithm::ES256),
            ("rsa_pkcs8.pem", Algorithm::EdDSA),
            ("ec_p256_sec1.pem", Algorithm::ES384),
            ("ec_p256_pkcs8.pem", Algorithm::RS256),
            ("ec_p384_sec1.pem", Algorithm::ES256),
            ("ed25519_pkcs8.pem", Algorithm::PS256),
            ("ed25519.jwk.json", Algorithm::ES256),
        ];
        for (file, alg) in mismatches {
            match load(file, Some(alg), None) {
                Err(KeyError::AlgMismatch { .. }) => {}
                other => panic!("{file} with {alg:?}: {other:?}"),
            }
        }
        let e = load("ec_p256_sec1.pem", Some(Algorithm::ES384), None).unwrap_err();
        assert_eq!(
            e.to_string(),
            "signing_alg ES384 does not fit a P-256 EC key; it fits ES256"
        );
        // Every RSA algorithm fits an RSA key.
        for alg in &ALL[..6] {
            assert_eq!(load("rsa_pkcs1.pem", Some(*alg), None).unwrap().alg(), *alg);
        }
    }

    #[test]
    fn symmetric_algs_and_keys_are_refused() {
        for alg in [Algorithm::HS256, Algorithm::HS384, Algorithm::HS512] {
            assert!(matches!(
                load("rsa_pkcs1.pem", Some(alg), None),
                Err(KeyError::UnsupportedAlg(_))
            ));
            assert!(matches!(
                SigningKey::generate(alg),
                Err(KeyError::UnsupportedAlg(_))
            ));
        }
        let oct = br#"{"kty":"oct","k":"c2VjcmV0"}"#;
        assert!(matches!(
            SigningKey::from_bytes(oct, None, None),
            Err(KeyError::UnsupportedKey(_))
        ));
    }

    #[test]
    fn sign_then_verify_with_the_public_jwk_for_every_algorithm() {
        let keys = [
            ("rsa_pkcs1.pem", &ALL[..6]),
            ("rsa.jwk.json", &ALL[..1]),
            ("ec_p256_sec1.pem", &ALL[6..7]),
            ("ec_p256.jwk.json", &ALL[6..7]),
            ("ec_p384_sec1.pem", &ALL[7..8]),
            ("ed25519_pkcs8.pem", &ALL[8..9]),
            ("ed25519.jwk.json", &ALL[8..9]),
        ];
        let mut covered = Vec::new();
        for (file, algs) in keys {
            for alg in algs {
                let key = load(file, Some(*alg), None).unwrap();
                let claims = test_claims();
                let token = key.sign(&claims).unwrap();
                let (header, got) = verify(&key, token.expose());
                assert_eq!(header.alg, *alg, "{file}");
                assert_eq!(header.typ.as_deref(), Some("JWT"));
                assert_eq!(header.kid.as_deref(), Some(key.kid()));
                assert_eq!(got, claims);
                covered.push(*alg);
            }
        }
        for alg in ALL {
            assert!(covered.contains(&alg), "{alg:?} not covered");
        }
    }

    #[test]
    fn sign_typed_sets_typ() {
        let key = load("ec_p256_sec1.pem", None, None).unwrap();
        let token = key.sign_typed("at+jwt", &test_claims()).unwrap();
        let header = jsonwebtoken::decode_header(token.expose()).unwrap();
        assert_eq!(header.typ.as_deref(), Some("at+jwt"));
    }

    #[test]
    fn a_signature_does_not_verify_with_another_key() {
        let key = load("ec_p256_sec1.pem", None, None).unwrap();
        let other = SigningKey::generate(Algorithm::ES256).unwrap().1;
        let token = key.sign(&test_claims()).unwrap();
        let jwk: Jwk = serde_json::from_value(other.public_jwk()).unwrap();
        let mut validation = Validation::new(Algorithm::ES256);
        validation.set_audience(&["https://as.example/token"]);
        let result = jsonwebtoken::decode::<Value>(
            token.expose(),
            &DecodingKey::from_jwk(&jwk).unwrap(),
            &validation,
        );
        assert!(result.is_err());
    }

    #[test]
    fn generate_round_trips_for_every_family() {
        for alg in [
            Algorithm::RS256,
            Algorithm::PS512,
            Algorithm::ES256,
            Algorithm::ES384,
            Algorithm::EdDSA,
        ] {
            let (pem, key) = SigningKey::generate(alg).unwrap();
            let pem = pem.expose();
            assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----\n"), "{alg:?}");
            assert!(pem.ends_with("-----END PRIVATE KEY-----\n"), "{alg:?}");
            assert!(pem.lines().all(|l| l.len() <= 64), "{alg:?}");
            assert_eq!(key.alg(), alg);
            assert_eq!(key.kid(), key.thumbprint());
            let reloaded = SigningKey::from_bytes(pem.as_bytes(), Some(alg), None).unwrap();
            assert_eq!(reloaded.public_jwk(), key.public_jwk(), "{alg:?}");
            let token = key.sign(&test_claims()).unwrap();
            verify(&reloaded, token.expose());
        }
        let (_, rsa) = SigningKey::generate(Algorithm::RS256).unwrap();
        let n = URL_SAFE_NO_PAD
            .decode(rsa.public_jwk()["n"].as_str().unwrap())
            .unwrap();
        assert_eq!(n.len() * 8, 2048);
        let (_, a) = SigningKey::generate(Algorithm::ES256).unwrap();
        let (_, b) = SigningKey::generate(Algorithm::ES256).unwrap();
        assert_ne!(a.kid(), b.kid());
    }

    /// Pieces of the private key that must never show up in output: the JWK's private members
    /// and the PEM body (whose lines mostly encode private values, though some encode `n`).
    fn secrets_of(pem_file: &str, jwk_file: &str) -> (Vec<String>, Vec<String>) {
        let pem = String::from_utf8(fixture(pem_file)).unwrap();
        let pem_lines = pem
            .lines()
            .filter(|l| !l.starts_with("-----"))
            .map(|l| l[..20.min(l.len())].to_owned())
            .collect();
        let jwk: Value = serde_json::from_slice(&fixture(jwk_file)).unwrap();
        let mut private = Vec::new();
        for member in ["d", "p", "q", "dp", "dq", "qi"] {
            let Some(b64) = jwk[member].as_str() else {
                continue;
            };
            let bytes = URL_SAFE_NO_PAD.decode(b64).unwrap();
            let window = &bytes[4..12];
            let list = format!("{window:?}");
            private.extend([
                b64[..16].to_owned(),
                STANDARD.encode(window)[..8].to_owned(),
                window.iter().map(|b| format!("{b:02x}")).collect(),
                window.iter().map(|b| format!("{b:02X}")).collect(),
                list.trim_matches(['[', ']']).to_owned(),
            ]);
        }
        (pem_lines, private)
    }

    #[test]
    fn debug_output_holds_no_key_material() {
        let dir = tempfile::tempdir().unwrap();
        for (pem, jwk) in [
            ("rsa_pkcs1.pem", "rsa.jwk.json"),
            ("ec_p256_sec1.pem", "ec_p256.jwk.json"),
            ("ed25519_pkcs8.pem", "ed25519.jwk.json"),
        ] {
            let (pem_lines, private) = secrets_of(pem, jwk);
            assert!(!pem_lines.is_empty() && !private.is_empty());
            let secrets: Vec<_> = pem_lines.iter().chain(&private).collect();
            let key = load(pem, None, None).unwrap();
            let path = dir.path().join(pem);
            std::fs::copy(fixture_path(pem), &path).unwrap();
            let source = KeySource::load(&path, None, None).unwrap();
            let key_debug = format!("{key:?} {key:#?}");
            let source_debug = format!("{source:?} {source:#?}");
            for text in [&key_debug, &source_debug] {
                assert!(text.contains(key.kid()), "{text}");
                for secret in &secrets {
                    assert!(!text.contains(secret.as_str()), "{pem}: {text}");
                }
            }
            assert!(source_debug.contains(pem), "{source_debug}");
            let public = key.public_jwk().to_string();
            for secret in &private {
                assert!(!public.contains(secret.as_str()), "{pem}: public JWK");
            }
        }
    }

    #[test]
    fn errors_name_no_key_material() {
        let mut jwk: Value = serde_json::from_slice(&fixture("ec_p256.jwk.json")).unwrap();
        let d = jwk["d"].as_str().unwrap().to_owned();
        // A valid scalar that does not belong to x/y.
        jwk["d"] = json!("AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAE");
        let e = SigningKey::from_bytes(&serde_json::to_vec(&jwk).unwrap(), None, None).unwrap_err();
        assert!(matches!(e, KeyError::Rejected { kind: "EC", .. }), "{e}");
        jwk["d"] = json!(format!("{d}!!not-base64"));
        let e = SigningKey::from_bytes(&serde_json::to_vec(&jwk).unwrap(), None, None).unwrap_err();
        let shown = format!("{e} {e:?}");
        assert!(!shown.contains(&d[..10]), "{shown}");
        assert!(shown.contains("\"d\""), "{shown}");

        let broken = format!("{{\"kty\":\"EC\",\"d\":\"{d}\"");
        let e = SigningKey::from_bytes(broken.as_bytes(), None, None).unwrap_err();
        let shown = format!("{e} {e:?}");
        assert!(!shown.contains(&d[..10]), "{shown}");
    }
}
