//! Key file → the DER jsonwebtoken's `EncodingKey` wants: PKCS#1 for RSA, PKCS#8 for EC and
//! Ed25519 (jsonwebtoken's ECDSA signer reads PKCS#8 only, so SEC1 keys are re-encoded).
//!
//! Invariants:
//! - The file form is told by sniffing: `{` → private JWK (`super::jwk`), a PEM BEGIN line →
//!   PEM; nothing else is guessed at.
//! - PEM sections are read by rustls-pki-types; the ASN.1 inside (PKCS#8, SEC1) by the RustCrypto
//!   `pkcs8`/`sec1` crates, only far enough to tell the key type. aws-lc-rs then validates the key
//!   and is the only source of its public half.
//! - Every intermediate copy of private key bytes is `Zeroizing`; error messages name the kind of
//!   problem only, never bytes or lines of the file.

use aws_lc_rs::signature::{
    ECDSA_P256_SHA256_FIXED_SIGNING, ECDSA_P384_SHA384_FIXED_SIGNING, EcdsaKeyPair,
    EcdsaSigningAlgorithm, Ed25519KeyPair, KeyPair as _, RsaKeyPair, RsaPublicKeyComponents,
};
use const_oid::ObjectIdentifier;
use const_oid::db::{rfc5912, rfc8410};
use jsonwebtoken::EncodingKey;
use jsonwebtoken::jwk::EllipticCurve;
use pkcs8::PrivateKeyInfoRef;
use rustls_pki_types::pem::{PemObject, SectionKind};
use zeroize::Zeroizing;

use super::KeyError;
use super::alg::KeyType;
use super::public::PublicParts;

/// A key after parsing, before `alg` and `kid` are settled.
pub(crate) struct ParsedKey {
    pub(crate) key_type: KeyType,
    pub(crate) encoding_key: EncodingKey,
    pub(crate) public: PublicParts,
    pub(crate) jwk_alg: Option<String>,
    pub(crate) jwk_kid: Option<String>,
}

/// The aws-lc-rs signing algorithm, JWK curve and coordinate length of an EC key type.
pub(crate) fn ec_params(
    key_type: KeyType,
) -> Option<(&'static EcdsaSigningAlgorithm, EllipticCurve, usize)> {
    match key_type {
        KeyType::P256 => Some((&ECDSA_P256_SHA256_FIXED_SIGNING, EllipticCurve::P256, 32)),
        KeyType::P384 => Some((&ECDSA_P384_SHA384_FIXED_SIGNING, EllipticCurve::P384, 48)),
        KeyType::Rsa | KeyType::Ed25519 => None,
    }
}

/// Any key file: PEM or a private JWK.
pub(crate) fn parse_key(bytes: &[u8]) -> Result<ParsedKey, KeyError> {
    let text = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
    let start = text.iter().position(|b| !b.is_ascii_whitespace());
    match start.map(|i| text[i]) {
        Some(b'{') => super::jwk::parse_jwk(text),
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
    let mut keys: Vec<(SectionKind, Zeroizing<Vec<u8>>)> = Vec::new();
    let mut others: Vec<&'static str> = Vec::new();
    for section in <(SectionKind, Vec<u8>) as PemObject>::pem_slice_iter(text) {
        let (kind, der) = section.map_err(pem_error)?;
        let der = Zeroizing::new(der);
        match kind {
            SectionKind::PrivateKey | SectionKind::RsaPrivateKey | SectionKind::EcPrivateKey => {
                keys.push((kind, der));
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
        [(SectionKind::RsaPrivateKey, der)] => rsa_from_pkcs1(der),
        [(SectionKind::EcPrivateKey, der)] => ec_from_sec1(der),
        [(_, der)] => key_from_pkcs8(der),
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

/// PEM for a DER document: RFC 7468 strict, 64-column lines, LF line endings.
pub(crate) fn pem_encode(label: &str, der: &[u8]) -> String {
    // Encoded straight into one exact-size allocation, so no partial copies of the key are left
    // behind; the result goes into a `Secret`.
    pem_rfc7468::encode_string(label, pem_rfc7468::LineEnding::LF, der)
        .expect("a valid label and a key-sized document always encode")
}

/// Maps aws-lc-rs's reasons to words; the reasons are fixed names, never key material.
pub(crate) fn rejected(kind: &'static str, e: aws_lc_rs::error::KeyRejected) -> KeyError {
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

pub(crate) fn p521() -> KeyError {
    KeyError::UnsupportedKey(
        "P-521 EC keys (ES512 is not supported); use P-256 (ES256) or P-384 (ES384)".into(),
    )
}

/// PKCS#8 `PrivateKeyInfo` / `OneAsymmetricKey` ("PRIVATE KEY"): the algorithm OID (and for EC
/// the curve OID) tells the key type.
fn key_from_pkcs8(der: &[u8]) -> Result<ParsedKey, KeyError> {
    let info =
        PrivateKeyInfoRef::try_from(der).map_err(|_| KeyError::Malformed("PKCS#8 private key"))?;
    let algorithm = info.algorithm.oid;
    if algorithm == rfc5912::RSA_ENCRYPTION {
        // The privateKey of an rsaEncryption PKCS#8 key is the PKCS#1 RSAPrivateKey itself.
        rsa_from_pkcs1(info.private_key.as_bytes())
    } else if algorithm == rfc5912::ID_EC_PUBLIC_KEY {
        let curve = info
            .algorithm
            .parameters
            .and_then(|p| ObjectIdentifier::try_from(p).ok());
        let key_type = ec_curve(curve)?;
        let (signing_alg, ..) = ec_params(key_type).expect("EC key type");
        let pair = EcdsaKeyPair::from_pkcs8(signing_alg, der).map_err(|e| rejected("EC", e))?;
        ec_parsed(key_type, &pair)
    } else if algorithm == rfc8410::ID_ED_25519 {
        let pair = Ed25519KeyPair::from_pkcs8(der).map_err(|e| rejected("Ed25519", e))?;
        ed25519_parsed(&pair)
    } else if algorithm == rfc8410::ID_ED_448 {
        Err(KeyError::UnsupportedKey(
            "Ed448 keys cannot sign here; use Ed25519 (EdDSA)".into(),
        ))
    } else if algorithm == rfc5912::ID_RSASSA_PSS {
        Err(KeyError::UnsupportedKey(
            "RSASSA-PSS-restricted RSA keys (id-RSASSA-PSS); use a plain RSA key, it signs PS256/384/512 too"
                .into(),
        ))
    } else {
        Err(KeyError::UnsupportedKey(
            "unknown key algorithm in the PKCS#8 key".into(),
        ))
    }
}

fn ec_curve(curve: Option<ObjectIdentifier>) -> Result<KeyType, KeyError> {
    match curve {
        Some(oid) if oid == rfc5912::SECP_256_R_1 => Ok(KeyType::P256),
        Some(oid) if oid == rfc5912::SECP_384_R_1 => Ok(KeyType::P384),
        Some(oid) if oid == rfc5912::SECP_521_R_1 => Err(p521()),
        Some(_) => Err(KeyError::UnsupportedKey(
            "EC curves other than P-256 (ES256) and P-384 (ES384)".into(),
        )),
        None => Err(KeyError::UnsupportedKey(
            "EC key without a named curve".into(),
        )),
    }
}

/// PKCS#1 `RSAPrivateKey` ("RSA PRIVATE KEY"), also the inside of an RSA PKCS#8 key.
pub(crate) fn rsa_from_pkcs1(pkcs1: &[u8]) -> Result<ParsedKey, KeyError> {
    let pair = RsaKeyPair::from_der(pkcs1).map_err(|e| rejected("RSA", e))?;
    let public = RsaPublicKeyComponents::<Vec<u8>>::from(pair.public_key());
    Ok(ParsedKey {
        key_type: KeyType::Rsa,
        // jsonwebtoken's RSA signer reads PKCS#1 `RSAPrivateKey` DER.
        encoding_key: EncodingKey::from_rsa_der(pkcs1),
        public: PublicParts::rsa(&public.n, &public.e),
        jwk_alg: None,
        jwk_kid: None,
    })
}

/// SEC1 `ECPrivateKey` ("EC PRIVATE KEY").
fn ec_from_sec1(der: &[u8]) -> Result<ParsedKey, KeyError> {
    let key = sec1::EcPrivateKey::try_from(der)
        .map_err(|_| KeyError::Malformed("SEC1 EC private key"))?;
    let curve = key.parameters.and_then(|p| p.named_curve());
    // The curve parameters are optional in SEC1; without them the scalar length tells.
    let key_type = match (curve, key.private_key.len()) {
        (Some(_), _) => ec_curve(curve)?,
        (None, 32) => KeyType::P256,
        (None, 48) => KeyType::P384,
        (None, 66) => return Err(p521()),
        (None, _) => ec_curve(None)?,
    };
    let (signing_alg, ..) = ec_params(key_type).expect("EC key type");
    let pair =
        EcdsaKeyPair::from_private_key_der(signing_alg, der).map_err(|e| rejected("EC", e))?;
    ec_parsed(key_type, &pair)
}

/// Any validated EC key pair: re-encoded as PKCS#8 for jsonwebtoken.
pub(crate) fn ec_parsed(key_type: KeyType, pair: &EcdsaKeyPair) -> Result<ParsedKey, KeyError> {
    let (_, crv, len) = ec_params(key_type).expect("EC key type");
    let point = pair.public_key().as_ref();
    if point.len() != 1 + 2 * len || point[0] != 0x04 {
        return Err(KeyError::Rejected {
            kind: "EC",
            reason: "unexpected public point encoding".into(),
        });
    }
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

/// Any validated Ed25519 key pair: re-encoded as PKCS#8 v1 for jsonwebtoken.
pub(crate) fn ed25519_parsed(pair: &Ed25519KeyPair) -> Result<ParsedKey, KeyError> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::SigningKey;
    use crate::key::test_support::*;
    use jsonwebtoken::Algorithm;

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
    fn other_pkcs8_key_types_are_named() {
        // Ed448 and RSASSA-PSS PKCS#8 keys (RFC 8410 §10.3 and an `openssl genpkey -algorithm
        // RSA-PSS` header), cut short after the algorithm: the OID alone decides.
        let pkcs8 = |oid: ObjectIdentifier, key: &[u8]| {
            use pkcs8::der::Encode as _;
            let info = PrivateKeyInfoRef::new(
                pkcs8::spki::AlgorithmIdentifier {
                    oid,
                    parameters: None,
                },
                pkcs8::der::asn1::OctetStringRef::new(key).unwrap(),
            );
            let mut der = vec![0; 128];
            let len = info.encode_to_slice(&mut der).unwrap().len();
            der.truncate(len);
            pem_encode("PRIVATE KEY", &der)
        };
        for (oid, expected) in [
            (rfc8410::ID_ED_448, "Ed448"),
            (rfc5912::ID_RSASSA_PSS, "RSASSA-PSS"),
            (rfc5912::ID_DSA, "unknown key algorithm"),
        ] {
            let pem = pkcs8(oid, &[0x04, 0x02, 0x00, 0x00]);
            let e = SigningKey::from_bytes(pem.as_bytes(), None, None).unwrap_err();
            assert!(e.to_string().contains(expected), "{e}");
        }
        let garbage = pem_encode("PRIVATE KEY", &[0x30, 0x03, 0x02, 0x01, 0x00]);
        let e = SigningKey::from_bytes(garbage.as_bytes(), None, None).unwrap_err();
        assert!(e.to_string().contains("malformed PKCS#8"), "{e}");
    }

    #[test]
    fn sec1_without_curve_parameters_is_told_by_scalar_length() {
        // `openssl ec -no_public -param_enc ...` can leave the curve out; rebuild one from the
        // fixture without parameters or public key.
        let pem = fixture("ec_p256_sec1.pem");
        let (_, der) = <(SectionKind, Vec<u8>) as PemObject>::pem_slice_iter(&pem)
            .next()
            .unwrap()
            .unwrap();
        let full = sec1::EcPrivateKey::try_from(der.as_slice()).unwrap();
        let bare = sec1::EcPrivateKey {
            private_key: full.private_key,
            parameters: None,
            public_key: None,
        };
        let mut out = vec![0; 64];
        let len = {
            use sec1::der::Encode as _;
            bare.encode_to_slice(&mut out).unwrap().len()
        };
        out.truncate(len);
        let pem = pem_encode("EC PRIVATE KEY", &out);
        let key = SigningKey::from_bytes(pem.as_bytes(), None, None).unwrap();
        assert_eq!(key.alg(), Algorithm::ES256);
        assert_eq!(
            key.public_jwk(),
            load("ec_p256_sec1.pem", None, None).unwrap().public_jwk()
        );
    }
}
