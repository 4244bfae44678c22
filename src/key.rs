//! The signing key for the RFC 7523 client assertion (`private_key_jwt`).
//!
//! A key file is PEM (PKCS#8, PKCS#1 RSA, SEC1 EC) or a private JWK. Every form is parsed once,
//! checked by aws-lc-rs, and normalised into the DER that jsonwebtoken's `EncodingKey` wants
//! (PKCS#1 for RSA, PKCS#8 for EC and Ed25519), so signing never touches the file format again.
//! [`KeySource`] re-reads the file when it changes, for Kubernetes Secret rotation.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::SystemTime;

use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::rsa::KeySize;
use aws_lc_rs::signature::{
    ECDSA_P256_SHA256_FIXED_SIGNING, ECDSA_P384_SHA384_FIXED_SIGNING, EcdsaKeyPair,
    EcdsaSigningAlgorithm, Ed25519KeyPair, KeyPair as _, RsaKeyPair, RsaPublicKeyComponents,
};
use base64::Engine as _;
use base64::alphabet;
use base64::engine::DecodePaddingMode;
use base64::engine::general_purpose::{
    GeneralPurpose, GeneralPurposeConfig, STANDARD, URL_SAFE_NO_PAD,
};
use jsonwebtoken::{EncodingKey, Header};
use rustls_pki_types::pem::{PemObject, SectionKind};
use serde_json::{Map, Value};

pub use jsonwebtoken::Algorithm;

use crate::secret::Secret;

/// The algorithms this crate signs with, in the order error messages list them.
pub const SUPPORTED_ALGS: [Algorithm; 9] = [
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::EdDSA,
];

const SUPPORTED_LIST: &str = "RS256 RS384 RS512 PS256 PS384 PS512 ES256 ES384 EdDSA";

/// Parses a configured `signing_alg`. `None` for anything this crate cannot sign with (HS*, ES512,
/// unknown names). Case-insensitive, because an operator typing `es256` means ES256.
pub fn parse_alg(name: &str) -> Option<Algorithm> {
    SUPPORTED_ALGS
        .into_iter()
        .find(|alg| alg_name(*alg).eq_ignore_ascii_case(name.trim()))
}

/// The JOSE name of `alg` (`"ES256"`, `"EdDSA"`).
pub fn alg_name(alg: Algorithm) -> &'static str {
    match alg {
        Algorithm::HS256 => "HS256",
        Algorithm::HS384 => "HS384",
        Algorithm::HS512 => "HS512",
        Algorithm::ES256 => "ES256",
        Algorithm::ES384 => "ES384",
        Algorithm::RS256 => "RS256",
        Algorithm::RS384 => "RS384",
        Algorithm::RS512 => "RS512",
        Algorithm::PS256 => "PS256",
        Algorithm::PS384 => "PS384",
        Algorithm::PS512 => "PS512",
        Algorithm::EdDSA => "EdDSA",
        // `Algorithm` is non-exhaustive; a new variant is one this crate has not vetted.
        _ => "unknown",
    }
}

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
    #[error("unsupported signing algorithm {0}: use one of {SUPPORTED_LIST}")]
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

/// Key types that can sign. P-521 and Ed448 are absent: jsonwebtoken cannot sign with them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum KeyType {
    Rsa,
    P256,
    P384,
    Ed25519,
}

impl KeyType {
    fn describe(self) -> &'static str {
        match self {
            KeyType::Rsa => "an RSA key",
            KeyType::P256 => "a P-256 EC key",
            KeyType::P384 => "a P-384 EC key",
            KeyType::Ed25519 => "an Ed25519 key",
        }
    }

    fn default_alg(self) -> Algorithm {
        match self {
            KeyType::Rsa => Algorithm::RS256,
            KeyType::P256 => Algorithm::ES256,
            KeyType::P384 => Algorithm::ES384,
            KeyType::Ed25519 => Algorithm::EdDSA,
        }
    }

    fn fitting_algs(self) -> &'static str {
        match self {
            KeyType::Rsa => "RS256 RS384 RS512 PS256 PS384 PS512",
            KeyType::P256 => "ES256",
            KeyType::P384 => "ES384",
            KeyType::Ed25519 => "EdDSA",
        }
    }

    fn fits(self, alg: Algorithm) -> bool {
        match self {
            KeyType::Rsa => matches!(
                alg,
                Algorithm::RS256
                    | Algorithm::RS384
                    | Algorithm::RS512
                    | Algorithm::PS256
                    | Algorithm::PS384
                    | Algorithm::PS512
            ),
            KeyType::P256 => alg == Algorithm::ES256,
            KeyType::P384 => alg == Algorithm::ES384,
            KeyType::Ed25519 => alg == Algorithm::EdDSA,
        }
    }

    fn ec(self) -> Option<(&'static EcdsaSigningAlgorithm, &'static str, usize)> {
        match self {
            KeyType::P256 => Some((&ECDSA_P256_SHA256_FIXED_SIGNING, "P-256", 32)),
            KeyType::P384 => Some((&ECDSA_P384_SHA384_FIXED_SIGNING, "P-384", 48)),
            KeyType::Rsa | KeyType::Ed25519 => None,
        }
    }
}

/// Public parameters as unsigned big-endian bytes, minimal for RSA and fixed-length for EC, so
/// the JWK and its thumbprint come out the same whatever form the key was read from.
#[derive(Clone, PartialEq, Eq)]
enum PublicParts {
    Rsa {
        n: Vec<u8>,
        e: Vec<u8>,
    },
    Ec {
        crv: &'static str,
        x: Vec<u8>,
        y: Vec<u8>,
    },
    Ed25519 {
        x: Vec<u8>,
    },
}

/// A key after parsing, before `alg` and `kid` are settled.
struct ParsedKey {
    key_type: KeyType,
    encoding_key: EncodingKey,
    public: PublicParts,
    jwk_alg: Option<String>,
    jwk_kid: Option<String>,
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
        let parsed = parse_key(bytes)?;
        let alg = choose_alg(parsed.key_type, alg, parsed.jwk_alg.as_deref())?;
        let kid = match key_id {
            Some(k) if k.trim().is_empty() => {
                return Err(KeyError::Config("key_id is empty".into()));
            }
            Some(k) => k.to_owned(),
            None => match parsed.jwk_kid {
                Some(k) if !k.is_empty() => k,
                _ => thumbprint(&parsed.public),
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

    /// The RFC 7638 thumbprint (SHA-256, base64url) of the public key, whatever the kid is.
    pub fn thumbprint(&self) -> String {
        thumbprint(&self.public)
    }

    /// The public JWK: `kty` and the public parameters only, plus `kid`, `alg` and
    /// `"use": "sig"` (Hydra refuses a registered key without `use`).
    pub fn public_jwk(&self) -> Value {
        let b64 = |bytes: &[u8]| Value::String(URL_SAFE_NO_PAD.encode(bytes));
        let mut jwk = Map::new();
        match &self.public {
            PublicParts::Rsa { n, e } => {
                jwk.insert("kty".into(), "RSA".into());
                jwk.insert("n".into(), b64(n));
                jwk.insert("e".into(), b64(e));
            }
            PublicParts::Ec { crv, x, y } => {
                jwk.insert("kty".into(), "EC".into());
                jwk.insert("crv".into(), (*crv).into());
                jwk.insert("x".into(), b64(x));
                jwk.insert("y".into(), b64(y));
            }
            PublicParts::Ed25519 { x } => {
                jwk.insert("kty".into(), "OKP".into());
                jwk.insert("crv".into(), "Ed25519".into());
                jwk.insert("x".into(), b64(x));
            }
        }
        jwk.insert("kid".into(), self.kid.clone().into());
        jwk.insert("alg".into(), alg_name(self.alg).into());
        jwk.insert("use".into(), "sig".into());
        Value::Object(jwk)
    }

    /// Signs `claims` as a compact JWS with the header `{alg, typ: "JWT", kid}`.
    pub fn sign<T: serde::Serialize>(&self, claims: &T) -> Result<Secret<String>, KeyError> {
        self.sign_typed("JWT", claims)
    }

    /// Like [`SigningKey::sign`] with another `typ` header, e.g. `at+jwt` (RFC 9068).
    pub fn sign_typed<T: serde::Serialize>(
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
    pub fn generate(alg: Algorithm) -> Result<(Secret<String>, SigningKey), KeyError> {
        let pkcs8 = match alg {
            Algorithm::RS256
            | Algorithm::RS384
            | Algorithm::RS512
            | Algorithm::PS256
            | Algorithm::PS384
            | Algorithm::PS512 => {
                let pair =
                    RsaKeyPair::generate(KeySize::Rsa2048).map_err(|_| KeyError::Generate)?;
                let der = pair.as_der().map_err(|_| KeyError::Generate)?;
                Wiped(der.as_ref().to_vec())
            }
            Algorithm::ES256 | Algorithm::ES384 => {
                let signing_alg = if alg == Algorithm::ES256 {
                    &ECDSA_P256_SHA256_FIXED_SIGNING
                } else {
                    &ECDSA_P384_SHA384_FIXED_SIGNING
                };
                let pair = EcdsaKeyPair::generate(signing_alg).map_err(|_| KeyError::Generate)?;
                let der = pair.to_pkcs8v1().map_err(|_| KeyError::Generate)?;
                Wiped(der.as_ref().to_vec())
            }
            Algorithm::EdDSA => {
                let pair = Ed25519KeyPair::generate().map_err(|_| KeyError::Generate)?;
                // v1 (no embedded public key) is what `openssl genpkey` writes and every tool reads.
                let der = pair.to_pkcs8v1().map_err(|_| KeyError::Generate)?;
                Wiped(der.as_ref().to_vec())
            }
            other => return Err(KeyError::UnsupportedAlg(alg_name(other).into())),
        };
        let pem = pem_encode("PRIVATE KEY", &pkcs8.0);
        let key = SigningKey::from_bytes(pem.as_bytes(), Some(alg), None)?;
        Ok((Secret::new(pem), key))
    }
}

fn choose_alg(
    key_type: KeyType,
    configured: Option<Algorithm>,
    jwk_alg: Option<&str>,
) -> Result<Algorithm, KeyError> {
    let (alg, origin) = match (configured, jwk_alg) {
        (Some(alg), _) => {
            if !SUPPORTED_ALGS.contains(&alg) {
                return Err(KeyError::UnsupportedAlg(alg_name(alg).into()));
            }
            (alg, "signing_alg")
        }
        (None, Some(name)) => {
            let alg = parse_alg(name).ok_or_else(|| KeyError::UnsupportedAlg(name.into()))?;
            (alg, "the JWK's alg")
        }
        (None, None) => return Ok(key_type.default_alg()),
    };
    if key_type.fits(alg) {
        Ok(alg)
    } else {
        Err(KeyError::AlgMismatch {
            origin,
            alg: alg_name(alg).into(),
            key: key_type.describe(),
            fits: key_type.fitting_algs(),
        })
    }
}

/// RFC 7638: the required members in lexicographic order, no whitespace, SHA-256, base64url.
fn thumbprint(public: &PublicParts) -> String {
    let b64 = |bytes: &[u8]| URL_SAFE_NO_PAD.encode(bytes);
    let canonical = match public {
        PublicParts::Rsa { n, e } => {
            format!(r#"{{"e":"{}","kty":"RSA","n":"{}"}}"#, b64(e), b64(n))
        }
        PublicParts::Ec { crv, x, y } => format!(
            r#"{{"crv":"{crv}","kty":"EC","x":"{}","y":"{}"}}"#,
            b64(x),
            b64(y)
        ),
        PublicParts::Ed25519 { x } => {
            format!(r#"{{"crv":"Ed25519","kty":"OKP","x":"{}"}}"#, b64(x))
        }
    };
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, canonical.as_bytes());
    URL_SAFE_NO_PAD.encode(digest.as_ref())
}

/// Private key bytes that are overwritten when dropped, so intermediate copies made while parsing
/// do not linger in freed memory. Best effort: without a zeroize crate the compiler is only
/// discouraged (by `black_box`) from removing the writes.
struct Wiped(Vec<u8>);

impl Drop for Wiped {
    fn drop(&mut self) {
        self.0.fill(0);
        std::hint::black_box(&self.0);
    }
}

/// Overwrites every string in a parsed JWK before it is dropped (the `d`, `p`, `q`... members).
fn wipe_json(value: &mut Value) {
    match value {
        Value::String(s) => drop(Wiped(std::mem::take(s).into_bytes())),
        Value::Array(items) => items.iter_mut().for_each(wipe_json),
        Value::Object(map) => map.values_mut().for_each(wipe_json),
        _ => {}
    }
}

fn parse_key(bytes: &[u8]) -> Result<ParsedKey, KeyError> {
    let text = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
    let start = text.iter().position(|b| !b.is_ascii_whitespace());
    match start.map(|i| text[i]) {
        Some(b'{') => parse_jwk(text),
        Some(_) if contains(text, b"-----BEGIN ") => parse_pem(text),
        _ => Err(KeyError::UnknownFormat),
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

fn parse_pem(text: &[u8]) -> Result<ParsedKey, KeyError> {
    // The PEM reader skips sections it does not know, and chokes on the headers of legacy
    // encrypted PEM; both deserve a clearer word than "no private key".
    if contains(text, b"-----BEGIN ENCRYPTED PRIVATE KEY-----")
        || contains(text, b"Proc-Type: 4,ENCRYPTED")
    {
        return Err(KeyError::Encrypted);
    }
    let mut keys: Vec<(SectionKind, Wiped)> = Vec::new();
    let mut others: Vec<&'static str> = Vec::new();
    for section in <(SectionKind, Vec<u8>) as PemObject>::pem_slice_iter(text) {
        let (kind, der) = section.map_err(pem_error)?;
        match kind {
            SectionKind::PrivateKey | SectionKind::RsaPrivateKey | SectionKind::EcPrivateKey => {
                keys.push((kind, Wiped(der)));
            }
            SectionKind::PublicKey => others.push("PUBLIC KEY"),
            SectionKind::Certificate => others.push("CERTIFICATE"),
            _ => others.push("other sections"),
        }
    }
    match keys.as_slice() {
        [] => {
            others.sort_unstable();
            others.dedup();
            let found = if others.is_empty() {
                String::new()
            } else {
                format!(" (found: {})", others.join(", "))
            };
            Err(KeyError::NoPrivateKey { found })
        }
        [(SectionKind::RsaPrivateKey, der)] => rsa_from_pkcs1(&der.0),
        [(SectionKind::EcPrivateKey, der)] => ec_from_sec1(&der.0),
        [(_, der)] => key_from_pkcs8(&der.0),
        many => Err(KeyError::MultipleKeys(many.len())),
    }
}

fn pem_error(e: rustls_pki_types::pem::Error) -> KeyError {
    use rustls_pki_types::pem::Error;
    // Only the kind of problem: the PEM error's own text may quote lines of the file.
    KeyError::Pem(match e {
        Error::MissingSectionEnd { .. } => "a section has no END line",
        Error::IllegalSectionStart { .. } => "malformed BEGIN line",
        Error::Base64Decode(_) => "invalid base64 in a section",
        Error::SectionTooLarge => "section too large",
        _ => "unreadable",
    })
}

mod oid {
    pub const RSA_ENCRYPTION: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01];
    pub const RSASSA_PSS: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0a];
    pub const EC_PUBLIC_KEY: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01];
    pub const P256: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
    pub const P384: &[u8] = &[0x2b, 0x81, 0x04, 0x00, 0x22];
    pub const P521: &[u8] = &[0x2b, 0x81, 0x04, 0x00, 0x23];
    pub const ED25519: &[u8] = &[0x2b, 0x65, 0x70];
    pub const ED448: &[u8] = &[0x2b, 0x65, 0x71];
}

/// Just enough DER to tell key types apart and to write a PKCS#1 `RSAPrivateKey`; aws-lc-rs does
/// the real validation.
mod der {
    pub const INTEGER: u8 = 0x02;
    pub const OCTET_STRING: u8 = 0x04;
    pub const OID: u8 = 0x06;
    pub const SEQUENCE: u8 = 0x30;
    pub const CONTEXT_0: u8 = 0xa0;

    pub struct Reader<'a>(&'a [u8]);

    impl<'a> Reader<'a> {
        pub fn new(input: &'a [u8]) -> Self {
            Reader(input)
        }

        /// The next element's tag and content; `None` on truncation or a length form DER forbids.
        pub fn read(&mut self) -> Option<(u8, &'a [u8])> {
            let (&tag, rest) = self.0.split_first()?;
            let (&first, mut rest) = rest.split_first()?;
            let len = if first < 0x80 {
                usize::from(first)
            } else {
                let count = usize::from(first & 0x7f);
                if count == 0 || count > 4 {
                    return None;
                }
                let (bytes, after) = rest.split_at_checked(count)?;
                rest = after;
                bytes
                    .iter()
                    .fold(0usize, |acc, &b| (acc << 8) | usize::from(b))
            };
            let (content, after) = rest.split_at_checked(len)?;
            self.0 = after;
            Some((tag, content))
        }

        pub fn expect(&mut self, tag: u8) -> Option<&'a [u8]> {
            self.read().filter(|(t, _)| *t == tag).map(|(_, c)| c)
        }
    }

    /// The parts of a PKCS#8 `PrivateKeyInfo` / `OneAsymmetricKey` that tell the key type.
    pub struct Pkcs8<'a> {
        pub algorithm: &'a [u8],
        /// The algorithm parameters when they are an OID: the named curve of an EC key.
        pub curve: Option<&'a [u8]>,
        pub private_key: &'a [u8],
    }

    pub fn pkcs8(der: &[u8]) -> Option<Pkcs8<'_>> {
        let mut info = Reader::new(Reader::new(der).expect(SEQUENCE)?);
        info.expect(INTEGER)?;
        let mut alg_id = Reader::new(info.expect(SEQUENCE)?);
        let private_key = info.expect(OCTET_STRING)?;
        let algorithm = alg_id.expect(OID)?;
        let curve = alg_id.read().filter(|(t, _)| *t == OID).map(|(_, c)| c);
        Some(Pkcs8 {
            algorithm,
            curve,
            private_key,
        })
    }

    /// SEC1 `ECPrivateKey`: (curve OID if present, length of the private scalar).
    pub fn sec1(der: &[u8]) -> Option<(Option<&[u8]>, usize)> {
        let mut key = Reader::new(Reader::new(der).expect(SEQUENCE)?);
        key.expect(INTEGER)?;
        let scalar = key.expect(OCTET_STRING)?;
        let mut curve = None;
        while let Some((tag, content)) = key.read() {
            if tag == CONTEXT_0 {
                curve = Reader::new(content).expect(OID);
            }
        }
        Some((curve, scalar.len()))
    }

    fn push_len(out: &mut Vec<u8>, len: usize) {
        if len < 0x80 {
            out.push(len as u8);
        } else {
            let bytes = len.to_be_bytes();
            let skip = bytes.iter().take_while(|b| **b == 0).count();
            out.push(0x80 | (bytes.len() - skip) as u8);
            out.extend_from_slice(&bytes[skip..]);
        }
    }

    /// A positive INTEGER: minimal, with a 0x00 in front when the high bit is set.
    pub fn push_uint(out: &mut Vec<u8>, value: &[u8]) {
        let skip = value.iter().take_while(|b| **b == 0).count();
        let value = &value[skip..];
        let pad = value.first().is_none_or(|b| b & 0x80 != 0);
        out.push(INTEGER);
        push_len(out, value.len() + usize::from(pad));
        if pad {
            out.push(0);
        }
        out.extend_from_slice(value);
    }

    pub fn sequence(body: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(body.len() + 6);
        out.push(SEQUENCE);
        push_len(&mut out, body.len());
        out.extend_from_slice(body);
        out
    }
}

fn rejected(kind: &'static str, e: aws_lc_rs::error::KeyRejected) -> KeyError {
    let reason = match e.description_() {
        "InconsistentComponents" => "its parts do not belong together".to_owned(),
        "InvalidEncoding" => "invalid encoding".to_owned(),
        "TooSmall" if kind == "RSA" => "too small (RSA keys need at least 2048 bits)".to_owned(),
        "TooSmall" => "too small".to_owned(),
        "TooLarge" => "too large".to_owned(),
        "WrongAlgorithm" => "wrong key type".to_owned(),
        other => other.to_owned(),
    };
    KeyError::Rejected { kind, reason }
}

fn key_from_pkcs8(der: &[u8]) -> Result<ParsedKey, KeyError> {
    let der::Pkcs8 {
        algorithm,
        curve,
        private_key,
    } = der::pkcs8(der).ok_or(KeyError::Malformed("PKCS#8 private key"))?;
    match algorithm {
        // The privateKey of an rsaEncryption PKCS#8 key is the PKCS#1 RSAPrivateKey itself.
        oid::RSA_ENCRYPTION => rsa_from_pkcs1(private_key),
        oid::EC_PUBLIC_KEY => {
            let key_type = ec_curve(curve)?;
            let (signing_alg, ..) = key_type.ec().expect("EC key type");
            let pair = EcdsaKeyPair::from_pkcs8(signing_alg, der).map_err(|e| rejected("EC", e))?;
            ec_parsed(key_type, &pair)
        }
        oid::ED25519 => {
            let pair = Ed25519KeyPair::from_pkcs8(der).map_err(|e| rejected("Ed25519", e))?;
            ed25519_parsed(&pair)
        }
        oid::ED448 => Err(KeyError::UnsupportedKey(
            "Ed448 keys cannot sign here; use Ed25519 (EdDSA)".into(),
        )),
        oid::RSASSA_PSS => Err(KeyError::UnsupportedKey(
            "RSASSA-PSS-restricted RSA keys (id-RSASSA-PSS); use a plain RSA key, it signs PS256/384/512 too"
                .into(),
        )),
        _ => Err(KeyError::UnsupportedKey(
            "unknown key algorithm in the PKCS#8 key".into(),
        )),
    }
}

fn ec_curve(curve: Option<&[u8]>) -> Result<KeyType, KeyError> {
    match curve {
        Some(oid::P256) => Ok(KeyType::P256),
        Some(oid::P384) => Ok(KeyType::P384),
        Some(oid::P521) => Err(p521()),
        Some(_) => Err(KeyError::UnsupportedKey(
            "EC curves other than P-256 (ES256) and P-384 (ES384)".into(),
        )),
        None => Err(KeyError::UnsupportedKey(
            "EC key without a named curve".into(),
        )),
    }
}

fn p521() -> KeyError {
    KeyError::UnsupportedKey(
        "P-521 EC keys (ES512 is not supported); use P-256 (ES256) or P-384 (ES384)".into(),
    )
}

fn rsa_from_pkcs1(pkcs1: &[u8]) -> Result<ParsedKey, KeyError> {
    let pair = RsaKeyPair::from_der(pkcs1).map_err(|e| rejected("RSA", e))?;
    let public = RsaPublicKeyComponents::<Vec<u8>>::from(pair.public_key());
    Ok(ParsedKey {
        key_type: KeyType::Rsa,
        // jsonwebtoken's RSA signer reads PKCS#1 `RSAPrivateKey` DER.
        encoding_key: EncodingKey::from_rsa_der(pkcs1),
        public: PublicParts::Rsa {
            n: strip_zeros(&public.n).to_vec(),
            e: strip_zeros(&public.e).to_vec(),
        },
        jwk_alg: None,
        jwk_kid: None,
    })
}

fn strip_zeros(bytes: &[u8]) -> &[u8] {
    let skip = bytes.iter().take_while(|b| **b == 0).count();
    &bytes[skip..]
}

fn ec_from_sec1(der: &[u8]) -> Result<ParsedKey, KeyError> {
    let (curve, scalar_len) = der::sec1(der).ok_or(KeyError::Malformed("SEC1 EC private key"))?;
    // The curve parameters are optional in SEC1; without them the scalar length tells.
    let key_type = match (curve, scalar_len) {
        (Some(_), _) => ec_curve(curve)?,
        (None, 32) => KeyType::P256,
        (None, 48) => KeyType::P384,
        (None, 66) => return Err(p521()),
        (None, _) => ec_curve(None)?,
    };
    let (signing_alg, ..) = key_type.ec().expect("EC key type");
    let pair =
        EcdsaKeyPair::from_private_key_der(signing_alg, der).map_err(|e| rejected("EC", e))?;
    ec_parsed(key_type, &pair)
}

fn ec_parsed(key_type: KeyType, pair: &EcdsaKeyPair) -> Result<ParsedKey, KeyError> {
    let (_, crv, len) = key_type.ec().expect("EC key type");
    let point = pair.public_key().as_ref();
    if point.len() != 1 + 2 * len || point[0] != 0x04 {
        return Err(KeyError::Rejected {
            kind: "EC",
            reason: "unexpected public point encoding".into(),
        });
    }
    // jsonwebtoken's ECDSA signer reads PKCS#8 only, so SEC1 and JWK keys are re-encoded.
    let pkcs8 = pair.to_pkcs8v1().map_err(|_| KeyError::Rejected {
        kind: "EC",
        reason: "cannot be encoded as PKCS#8".into(),
    })?;
    Ok(ParsedKey {
        key_type,
        encoding_key: EncodingKey::from_ec_der(pkcs8.as_ref()),
        public: PublicParts::Ec {
            crv,
            x: point[1..=len].to_vec(),
            y: point[1 + len..].to_vec(),
        },
        jwk_alg: None,
        jwk_kid: None,
    })
}

fn ed25519_parsed(pair: &Ed25519KeyPair) -> Result<ParsedKey, KeyError> {
    let pkcs8 = pair.to_pkcs8v1().map_err(|_| KeyError::Rejected {
        kind: "Ed25519",
        reason: "cannot be encoded as PKCS#8".into(),
    })?;
    Ok(ParsedKey {
        key_type: KeyType::Ed25519,
        encoding_key: EncodingKey::from_ed_der(pkcs8.as_ref()),
        public: PublicParts::Ed25519 {
            x: pair.public_key().as_ref().to_vec(),
        },
        jwk_alg: None,
        jwk_kid: None,
    })
}

/// JWK members are base64url without padding (RFC 7515 §2); padding is tolerated because some
/// tools emit it.
const B64URL_LENIENT: GeneralPurpose = GeneralPurpose::new(
    &alphabet::URL_SAFE,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

fn parse_jwk(text: &[u8]) -> Result<ParsedKey, KeyError> {
    let mut value: Value = serde_json::from_slice(text).map_err(|e| {
        // serde_json's message can quote input; line and column are enough.
        KeyError::Jwk(format!(
            "not valid JSON (line {}, column {})",
            e.line(),
            e.column()
        ))
    })?;
    let result = jwk_from_value(&value);
    wipe_json(&mut value);
    result
}

fn jwk_from_value(value: &Value) -> Result<ParsedKey, KeyError> {
    let obj = value
        .as_object()
        .ok_or_else(|| KeyError::Jwk("expected a JSON object".into()))?;
    let jwk = match obj.get("keys") {
        Some(keys) => {
            let keys = keys
                .as_array()
                .ok_or_else(|| KeyError::Jwk("\"keys\" is not an array".into()))?;
            match keys.as_slice() {
                [one] => one
                    .as_object()
                    .ok_or_else(|| KeyError::Jwk("the key in \"keys\" is not an object".into()))?,
                many => {
                    return Err(KeyError::Jwk(format!(
                        "a JWK Set must hold exactly one key here, it holds {}",
                        many.len()
                    )));
                }
            }
        }
        None => obj,
    };

    let text_member = |name: &str| -> Result<Option<&str>, KeyError> {
        match jwk.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(KeyError::Jwk(format!("\"{name}\" is not a string"))),
        }
    };
    if let Some(usage) = text_member("use")?
        && usage != "sig"
    {
        return Err(KeyError::Jwk(format!(
            "\"use\" is {usage:?}; a signing key needs \"sig\""
        )));
    }
    if let Some(ops) = jwk.get("key_ops")
        && !ops
            .as_array()
            .is_some_and(|ops| ops.iter().any(|op| op == "sign"))
    {
        return Err(KeyError::Jwk("\"key_ops\" does not allow \"sign\"".into()));
    }
    let kty = text_member("kty")?.ok_or_else(|| KeyError::Jwk("no \"kty\" member".into()))?;
    let crv = text_member("crv")?;
    let member = |name: &str| -> Result<Wiped, KeyError> {
        let encoded = text_member(name)?.ok_or_else(|| {
            if name == "d" {
                KeyError::Jwk(
                    "this is a public key (no \"d\"); the private key is needed to sign".into(),
                )
            } else {
                KeyError::Jwk(format!("no \"{name}\" member"))
            }
        })?;
        B64URL_LENIENT
            .decode(encoded)
            .map(Wiped)
            .map_err(|_| KeyError::Jwk(format!("\"{name}\" is not base64url")))
    };

    let mut parsed = match kty {
        "RSA" => {
            if jwk.contains_key("oth") {
                return Err(KeyError::UnsupportedKey("multi-prime RSA keys".into()));
            }
            let d = member("d")?;
            let [n, e, p, q, dp, dq, qi] = ["n", "e", "p", "q", "dp", "dq", "qi"].map(&member);
            let parts = [n?, e?, d, p?, q?, dp?, dq?, qi?];
            let mut body = Wiped(Vec::with_capacity(1200));
            der::push_uint(&mut body.0, &[0]); // version: two-prime
            for part in &parts {
                der::push_uint(&mut body.0, &part.0);
            }
            let pkcs1 = Wiped(der::sequence(&body.0));
            rsa_from_pkcs1(&pkcs1.0)?
        }
        "EC" => {
            let key_type = match crv {
                Some("P-256") => KeyType::P256,
                Some("P-384") => KeyType::P384,
                Some("P-521") => return Err(p521()),
                Some(other) => {
                    return Err(KeyError::UnsupportedKey(format!("EC curve {other:?}")));
                }
                None => return Err(KeyError::Jwk("no \"crv\" member".into())),
            };
            let (signing_alg, _, len) = key_type.ec().expect("EC key type");
            let fixed = |name: &str| -> Result<Wiped, KeyError> {
                let value = member(name)?;
                // Some producers drop leading zero bytes; the curve fixes the length.
                if value.0.len() > len {
                    return Err(KeyError::Jwk(format!("\"{name}\" is too long for {crv:?}")));
                }
                let mut out = vec![0; len - value.0.len()];
                out.extend_from_slice(&value.0);
                Ok(Wiped(out))
            };
            let (x, y, d) = (fixed("x")?, fixed("y")?, fixed("d")?);
            let mut point = Vec::with_capacity(1 + 2 * len);
            point.push(0x04);
            point.extend_from_slice(&x.0);
            point.extend_from_slice(&y.0);
            let pair = EcdsaKeyPair::from_private_key_and_public_key(signing_alg, &d.0, &point)
                .map_err(|e| rejected("EC", e))?;
            ec_parsed(key_type, &pair)?
        }
        "OKP" => match crv {
            Some("Ed25519") => {
                let (d, x) = (member("d")?, member("x")?);
                let pair = Ed25519KeyPair::from_seed_and_public_key(&d.0, &x.0)
                    .map_err(|e| rejected("Ed25519", e))?;
                ed25519_parsed(&pair)?
            }
            Some(other) => {
                return Err(KeyError::UnsupportedKey(format!(
                    "OKP curve {other:?}; only Ed25519 signs here"
                )));
            }
            None => return Err(KeyError::Jwk("no \"crv\" member".into())),
        },
        "oct" => {
            return Err(KeyError::UnsupportedKey(
                "symmetric (\"oct\") keys: private_key_jwt needs an asymmetric key".into(),
            ));
        }
        other => return Err(KeyError::UnsupportedKey(format!("JWK kty {other:?}"))),
    };
    parsed.jwk_alg = text_member("alg")?.map(str::to_owned);
    parsed.jwk_kid = text_member("kid")?.map(str::to_owned);
    Ok(parsed)
}

fn pem_encode(label: &str, der: &[u8]) -> String {
    let body = Wiped(STANDARD.encode(der).into_bytes());
    let mut pem = String::with_capacity(body.0.len() + body.0.len() / 64 + 64);
    pem.push_str(&format!("-----BEGIN {label}-----\n"));
    for line in body.0.chunks(64) {
        // Base64 output is ASCII.
        pem.extend(line.iter().map(|b| char::from(*b)));
        pem.push('\n');
    }
    pem.push_str(&format!("-----END {label}-----\n"));
    pem
}

/// What identifies one version of a file: symlinks followed, so a Kubernetes `..data` swap shows
/// up as a new inode even when size and mtime happen to match.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FileStamp {
    modified: Option<SystemTime>,
    len: u64,
    #[cfg(unix)]
    dev: u64,
    #[cfg(unix)]
    ino: u64,
}

impl FileStamp {
    fn of(path: &Path) -> io::Result<FileStamp> {
        #[cfg(unix)]
        use std::os::unix::fs::MetadataExt as _;
        let meta = std::fs::metadata(path)?;
        Ok(FileStamp {
            modified: meta.modified().ok(),
            len: meta.len(),
            #[cfg(unix)]
            dev: meta.dev(),
            #[cfg(unix)]
            ino: meta.ino(),
        })
    }
}

#[derive(Debug, PartialEq)]
enum Failure {
    Stat(io::ErrorKind),
    Load(FileStamp),
}

struct LoadState {
    key: Arc<SigningKey>,
    /// The file version `key` came from.
    loaded: FileStamp,
    /// The last failure warned about, so a broken file is logged once rather than per request.
    failed: Option<Failure>,
}

/// A key file that is re-read when it changes.
pub struct KeySource {
    path: PathBuf,
    alg: Option<Algorithm>,
    key_id: Option<String>,
    state: Mutex<LoadState>,
}

impl fmt::Debug for KeySource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let key = Arc::clone(&self.lock().key);
        f.debug_struct("KeySource")
            .field("path", &self.path)
            .field("alg", &key.alg)
            .field("kid", &key.kid)
            .finish_non_exhaustive()
    }
}

impl KeySource {
    /// Reads and parses the key file; fails if it cannot be read or parsed, or `alg` does not fit.
    pub fn load(
        path: impl Into<PathBuf>,
        alg: Option<Algorithm>,
        key_id: Option<String>,
    ) -> Result<KeySource, KeyError> {
        let path = path.into();
        let in_file = |reason| KeyError::File {
            path: path.clone(),
            reason: Box::new(reason),
        };
        let stamp = FileStamp::of(&path).map_err(|e| in_file(KeyError::Read(e)))?;
        let key = read_key(&path, alg, key_id.as_deref()).map_err(in_file)?;
        Ok(KeySource {
            state: Mutex::new(LoadState {
                key: Arc::new(key),
                loaded: stamp,
                failed: None,
            }),
            path,
            alg,
            key_id,
        })
    }

    /// The key to sign with now. One `stat` when nothing changed. When the file changed it is
    /// re-read; if the new version cannot be used the previous key keeps signing (a half-written
    /// or bad rotation must not break token requests) and the next call tries again.
    pub fn current(&self) -> Arc<SigningKey> {
        let mut state = self.lock();
        let stamp = match FileStamp::of(&self.path) {
            Ok(stamp) => stamp,
            Err(e) => {
                let failure = Failure::Stat(e.kind());
                if state.failed.as_ref() != Some(&failure) {
                    tracing::warn!(
                        path = %self.path.display(),
                        error = %e,
                        "cannot stat the signing key file; still signing with the previous key"
                    );
                    state.failed = Some(failure);
                }
                return Arc::clone(&state.key);
            }
        };
        if stamp == state.loaded {
            return Arc::clone(&state.key);
        }
        match read_key(&self.path, self.alg, self.key_id.as_deref()) {
            Ok(key) => {
                tracing::info!(path = %self.path.display(), kid = %key.kid, "signing key reloaded");
                state.key = Arc::new(key);
                state.loaded = stamp;
                state.failed = None;
            }
            Err(e) => {
                let failure = Failure::Load(stamp);
                if state.failed.as_ref() != Some(&failure) {
                    tracing::warn!(
                        path = %self.path.display(),
                        error = %e,
                        "signing key file changed but cannot be used; still signing with the previous key"
                    );
                    state.failed = Some(failure);
                } else {
                    tracing::debug!(path = %self.path.display(), error = %e, "signing key file still unusable");
                }
            }
        }
        Arc::clone(&state.key)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LoadState> {
        // The state is replaced whole, so a panic elsewhere cannot leave it half-updated.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Writes a private key file readable by its owner only (0600 on unix). With `overwrite`, an
/// existing file is replaced by rename, so a reader (a [`KeySource`]) never sees half a key.
pub fn write_private(path: &Path, contents: &[u8], overwrite: bool) -> Result<(), KeyError> {
    let write_err = |error| KeyError::Write {
        path: path.to_owned(),
        error,
    };
    if !overwrite {
        return match create_private(path).and_then(|f| fill(f, contents)) {
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                Err(KeyError::Exists(path.to_owned()))
            }
            other => other.map_err(write_err),
        };
    }
    let name = path.file_name().ok_or_else(|| {
        write_err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a file name",
        ))
    })?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".tmp-{}", crate::assertion::new_jti()));
    let tmp = path.with_file_name(tmp_name);
    let result = create_private(&tmp)
        .and_then(|f| fill(f, contents))
        .and_then(|()| std::fs::rename(&tmp, path));
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(write_err)
}

fn create_private(path: &Path) -> io::Result<std::fs::File> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options.open(path)
}

fn fill(mut file: std::fs::File, contents: &[u8]) -> io::Result<()> {
    use std::io::Write as _;
    file.write_all(contents)?;
    file.sync_all()
}

fn read_key(
    path: &Path,
    alg: Option<Algorithm>,
    key_id: Option<&str>,
) -> Result<SigningKey, KeyError> {
    let bytes = Wiped(std::fs::read(path).map_err(KeyError::Read)?);
    SigningKey::from_bytes(&bytes.0, alg, key_id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::jwk::{Jwk, ThumbprintHash};
    use jsonwebtoken::{DecodingKey, Validation};
    use serde_json::json;

    const ALL: [Algorithm; 9] = SUPPORTED_ALGS;

    fn fixture_path(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/keys")
            .join(name)
    }

    fn fixture(name: &str) -> Vec<u8> {
        std::fs::read(fixture_path(name)).unwrap()
    }

    fn load(name: &str, alg: Option<Algorithm>, kid: Option<&str>) -> Result<SigningKey, KeyError> {
        SigningKey::from_bytes(&fixture(name), alg, kid)
    }

    fn without_kid(mut jwk: Value) -> Value {
        jwk.as_object_mut().unwrap().remove("kid");
        jwk
    }

    /// Verifies with a key built from the published JWK only, the way an authorization server would.
    fn verify(key: &SigningKey, token: &str) -> (Header, Value) {
        let jwk: Jwk = serde_json::from_value(key.public_jwk()).unwrap();
        let decoding = DecodingKey::from_jwk(&jwk).unwrap();
        let mut validation = Validation::new(key.alg());
        validation.set_audience(&["https://as.example/token"]);
        let data = jsonwebtoken::decode::<Value>(token, &decoding, &validation).unwrap();
        (data.header, data.claims)
    }

    fn test_claims() -> Value {
        let now = SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        json!({"iss": "c", "sub": "c", "aud": "https://as.example/token", "iat": now, "exp": now + 60})
    }

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
    fn public_jwk_has_public_members_only() {
        let rsa = load("rsa.jwk.json", None, None).unwrap().public_jwk();
        let mut members: Vec<_> = rsa.as_object().unwrap().keys().cloned().collect();
        members.sort();
        assert_eq!(members, ["alg", "e", "kid", "kty", "n", "use"]);
        assert_eq!(rsa["e"], "AQAB");

        let ec = load("ec_p384_sec1.pem", None, None).unwrap().public_jwk();
        let mut members: Vec<_> = ec.as_object().unwrap().keys().cloned().collect();
        members.sort();
        assert_eq!(members, ["alg", "crv", "kid", "kty", "use", "x", "y"]);
        assert_eq!(ec["kty"], "EC");
        // P-384 coordinates are 48 bytes: 64 base64url characters.
        assert_eq!(ec["x"].as_str().unwrap().len(), 64);

        let ed = load("ed25519_pkcs8.pem", None, None).unwrap().public_jwk();
        let mut members: Vec<_> = ed.as_object().unwrap().keys().cloned().collect();
        members.sort();
        assert_eq!(members, ["alg", "crv", "kid", "kty", "use", "x"]);
        assert_eq!(ed["kty"], "OKP");
        assert_eq!(ed["alg"], "EdDSA");
    }

    #[test]
    fn jwk_file_and_pem_twins_give_the_same_public_jwk() {
        let twins: [&[&str]; 3] = [
            &["rsa_pkcs1.pem", "rsa_pkcs8.pem", "rsa.jwk.json"],
            &["ec_p256_sec1.pem", "ec_p256_pkcs8.pem", "ec_p256.jwk.json"],
            &["ed25519_pkcs8.pem", "ed25519.jwk.json"],
        ];
        for files in twins {
            let jwks: Vec<Value> = files
                .iter()
                .map(|f| without_kid(load(f, None, None).unwrap().public_jwk()))
                .collect();
            for (file, jwk) in files.iter().zip(&jwks) {
                assert_eq!(jwk, &jwks[0], "{file} vs {}", files[0]);
            }
            // And the same as the public half of the JWK file itself.
            let jwk_file: Value = serde_json::from_slice(&fixture(files[files.len() - 1])).unwrap();
            for member in ["n", "e", "x", "y", "crv"] {
                assert_eq!(jwks[0].get(member), jwk_file.get(member), "{member}");
            }
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
    fn thumbprint_matches_rfc_7638_example() {
        // RFC 7638 §3.1.
        let n = "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw";
        let public = PublicParts::Rsa {
            n: URL_SAFE_NO_PAD.decode(n).unwrap(),
            e: URL_SAFE_NO_PAD.decode("AQAB").unwrap(),
        };
        assert_eq!(
            thumbprint(&public),
            "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"
        );
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
    fn p521_is_refused_clearly() {
        let pair =
            EcdsaKeyPair::generate(&aws_lc_rs::signature::ECDSA_P521_SHA512_FIXED_SIGNING).unwrap();
        let pem = pem_encode("PRIVATE KEY", pair.to_pkcs8v1().unwrap().as_ref());
        let e = SigningKey::from_bytes(pem.as_bytes(), None, None).unwrap_err();
        assert!(e.to_string().contains("P-521"), "{e}");
        let jwk = br#"{"kty":"EC","crv":"P-521","x":"AA","y":"AA","d":"AA"}"#;
        let e = SigningKey::from_bytes(jwk, None, None).unwrap_err();
        assert!(e.to_string().contains("P-521"), "{e}");
    }

    #[test]
    fn parse_alg_knows_exactly_the_supported_algorithms() {
        for alg in ALL {
            assert_eq!(parse_alg(alg_name(alg)), Some(alg));
        }
        assert_eq!(parse_alg("es256"), Some(Algorithm::ES256));
        assert_eq!(parse_alg("EDDSA"), Some(Algorithm::EdDSA));
        for name in ["HS256", "HS384", "HS512", "ES512", "none", ""] {
            assert_eq!(parse_alg(name), None, "{name}");
        }
    }

    #[test]
    fn jwk_alg_member_is_used_and_checked() {
        let mut jwk: Value = serde_json::from_slice(&fixture("rsa.jwk.json")).unwrap();
        jwk["alg"] = "PS384".into();
        let bytes = serde_json::to_vec(&jwk).unwrap();
        assert_eq!(
            SigningKey::from_bytes(&bytes, None, None).unwrap().alg(),
            Algorithm::PS384
        );
        // Configuration wins over the JWK.
        assert_eq!(
            SigningKey::from_bytes(&bytes, Some(Algorithm::RS512), None)
                .unwrap()
                .alg(),
            Algorithm::RS512
        );
        jwk["alg"] = "ES256".into();
        let bytes = serde_json::to_vec(&jwk).unwrap();
        assert!(matches!(
            SigningKey::from_bytes(&bytes, None, None),
            Err(KeyError::AlgMismatch {
                origin: "the JWK's alg",
                ..
            })
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

    #[test]
    fn rsa_jwk_with_inconsistent_parts_is_rejected() {
        let mut jwk: Value = serde_json::from_slice(&fixture("rsa.jwk.json")).unwrap();
        let dp = jwk["dp"].clone();
        jwk["dp"] = jwk["dq"].clone();
        jwk["dq"] = dp;
        let e = SigningKey::from_bytes(&serde_json::to_vec(&jwk).unwrap(), None, None).unwrap_err();
        assert!(matches!(e, KeyError::Rejected { kind: "RSA", .. }), "{e}");
    }

    #[test]
    fn jwk_sets_and_public_jwks() {
        let one: Value = serde_json::from_slice(&fixture("ed25519.jwk.json")).unwrap();
        let set = json!({"keys": [one.clone()]});
        let key = SigningKey::from_bytes(&serde_json::to_vec(&set).unwrap(), None, None).unwrap();
        assert_eq!(key.alg(), Algorithm::EdDSA);

        let two = json!({"keys": [one.clone(), one.clone()]});
        let e = SigningKey::from_bytes(&serde_json::to_vec(&two).unwrap(), None, None).unwrap_err();
        assert!(e.to_string().contains("exactly one"), "{e}");

        let public = key.public_jwk();
        let e =
            SigningKey::from_bytes(&serde_json::to_vec(&public).unwrap(), None, None).unwrap_err();
        assert!(e.to_string().contains("public key"), "{e}");

        let mut enc = one.clone();
        enc["use"] = "enc".into();
        let e = SigningKey::from_bytes(&serde_json::to_vec(&enc).unwrap(), None, None).unwrap_err();
        assert!(e.to_string().contains("\"use\""), "{e}");
    }

    #[test]
    fn unusable_pem_files_get_clear_errors() {
        let cases: [(&[u8], &str); 5] = [
            (b"", "not a private key"),
            (b"hello", "not a private key"),
            (
                b"-----BEGIN ENCRYPTED PRIVATE KEY-----\nAAAA\n-----END ENCRYPTED PRIVATE KEY-----\n",
                "encrypted",
            ),
            (
                b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n",
                "no private key in the PEM data (found: PUBLIC KEY)",
            ),
            (b"-----BEGIN PRIVATE KEY-----\nAAAA\n", "malformed PEM"),
        ];
        for (bytes, expected) in cases {
            let e = SigningKey::from_bytes(bytes, None, None).unwrap_err();
            assert!(e.to_string().contains(expected), "{e}");
        }
        let mut two = fixture("ec_p256_sec1.pem");
        two.extend(fixture("ed25519_pkcs8.pem"));
        assert!(matches!(
            SigningKey::from_bytes(&two, None, None),
            Err(KeyError::MultipleKeys(2))
        ));
        // A PEM key with a certificate next to it (a common bundle) is fine.
        let mut with_other =
            b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n".to_vec();
        with_other.extend(fixture("ec_p384_sec1.pem"));
        assert_eq!(
            SigningKey::from_bytes(&with_other, None, None)
                .unwrap()
                .alg(),
            Algorithm::ES384
        );
    }

    #[test]
    fn pkcs1_der_encoder_writes_minimal_positive_integers() {
        let mut out = Vec::new();
        der::push_uint(&mut out, &[0x00, 0x00, 0x7f]);
        der::push_uint(&mut out, &[0x80]);
        der::push_uint(&mut out, &[]);
        assert_eq!(
            out,
            [0x02, 0x01, 0x7f, 0x02, 0x02, 0x00, 0x80, 0x02, 0x01, 0x00]
        );
        let long = der::sequence(&[0u8; 300]);
        assert_eq!(&long[..4], &[0x30, 0x82, 0x01, 0x2c]);
    }

    /// Lays out a directory the way the kubelet does for a Secret volume:
    /// `key.pem -> ..data/key.pem`, `..data -> ..<version>`.
    #[cfg(unix)]
    struct SecretVolume {
        dir: tempfile::TempDir,
        version: u32,
    }

    #[cfg(unix)]
    impl SecretVolume {
        fn new(contents: &[u8]) -> SecretVolume {
            let mut volume = SecretVolume {
                dir: tempfile::tempdir().unwrap(),
                version: 0,
            };
            volume.publish(contents);
            std::os::unix::fs::symlink("..data/key.pem", volume.key_path()).unwrap();
            volume
        }

        fn key_path(&self) -> PathBuf {
            self.dir.path().join("key.pem")
        }

        /// Writes a new version directory and swaps `..data` to it with one rename.
        fn publish(&mut self, contents: &[u8]) {
            self.version += 1;
            let version = format!("..v{}", self.version);
            let version_dir = self.dir.path().join(&version);
            std::fs::create_dir(&version_dir).unwrap();
            std::fs::write(version_dir.join("key.pem"), contents).unwrap();
            let tmp = self.dir.path().join("..data_tmp");
            std::os::unix::fs::symlink(&version, &tmp).unwrap();
            std::fs::rename(&tmp, self.dir.path().join("..data")).unwrap();
        }
    }

    #[cfg(unix)]
    #[test]
    fn key_source_follows_a_kubernetes_secret_update() {
        let mut volume = SecretVolume::new(&fixture("ec_p256_sec1.pem"));
        let source = KeySource::load(volume.key_path(), None, None).unwrap();
        let first = source.current();
        assert_eq!(first.alg(), Algorithm::ES256);
        assert_eq!(source.path(), volume.key_path());
        // Nothing changed: the very same key.
        assert!(Arc::ptr_eq(&first, &source.current()));

        volume.publish(&fixture("ed25519_pkcs8.pem"));
        let second = source.current();
        assert_ne!(second.kid(), first.kid());
        assert_eq!(second.alg(), Algorithm::EdDSA);
        assert!(Arc::ptr_eq(&second, &source.current()));

        // A broken update keeps the previous key, on this call and the next.
        volume.publish(b"-----BEGIN PRIVATE KEY-----\ngarbage\n-----END PRIVATE KEY-----\n");
        assert!(Arc::ptr_eq(&second, &source.current()));
        assert!(Arc::ptr_eq(&second, &source.current()));

        // The fix after it is picked up.
        volume.publish(&fixture("rsa_pkcs8.pem"));
        let third = source.current();
        assert_eq!(third.alg(), Algorithm::RS256);
        assert_ne!(third.kid(), second.kid());
    }

    #[test]
    fn key_source_rereads_a_file_rewritten_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key.json");
        std::fs::write(&path, fixture("ec_p256.jwk.json")).unwrap();
        let source = KeySource::load(&path, None, Some("pinned".into())).unwrap();
        assert_eq!(source.current().kid(), "pinned");
        let before = source.current().public_jwk();

        // Garbage of a different length: noticed, refused, old key kept.
        std::fs::write(&path, b"{").unwrap();
        assert_eq!(source.current().public_jwk(), before);
        // Removed: old key kept.
        std::fs::remove_file(&path).unwrap();
        assert_eq!(source.current().public_jwk(), before);

        std::fs::write(&path, fixture("ec_p256_pkcs8.pem")).unwrap();
        let after = source.current();
        // The same EC key in another form: same public key; the configured kid still applies.
        assert_eq!(after.kid(), "pinned");
        assert_eq!(after.public_jwk(), before);

        std::fs::write(&path, fixture("ed25519.jwk.json")).unwrap();
        assert_eq!(source.current().alg(), Algorithm::EdDSA);
        std::fs::write(&path, fixture("ec_p256_pkcs8.pem")).unwrap();

        // A configured alg applies to reloads: an Ed25519 key does not fit ES256.
        let typed = KeySource::load(&path, Some(Algorithm::ES256), None).unwrap();
        let kept = typed.current();
        std::fs::write(&path, fixture("ed25519_pkcs8.pem")).unwrap();
        assert!(Arc::ptr_eq(&kept, &typed.current()));
    }

    #[test]
    fn key_source_load_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        let e = KeySource::load(&missing, None, None).unwrap_err();
        assert!(e.to_string().contains("missing.pem"), "{e}");
        assert!(e.to_string().contains("cannot read"), "{e}");

        let garbage = dir.path().join("garbage.pem");
        std::fs::write(&garbage, b"not a key").unwrap();
        let e = KeySource::load(&garbage, None, None).unwrap_err();
        assert!(e.to_string().contains("garbage.pem"), "{e}");
        assert!(e.to_string().contains("not a private key"), "{e}");

        let e = KeySource::load(
            fixture_path("ec_p256_sec1.pem"),
            Some(Algorithm::RS256),
            None,
        )
        .unwrap_err();
        assert!(
            matches!(&e, KeyError::File { reason, .. } if matches!(**reason, KeyError::AlgMismatch { .. }))
        );
    }

    #[test]
    fn write_private_is_owner_only_and_refuses_to_clobber() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key.pem");
        write_private(&path, b"one", false).unwrap();
        assert!(matches!(
            write_private(&path, b"two", false),
            Err(KeyError::Exists(_))
        ));
        assert_eq!(std::fs::read(&path).unwrap(), b"one");
        write_private(&path, b"three", true).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"three");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            1,
            "no temporary left behind"
        );
    }
}
