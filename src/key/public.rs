//! The public half of a signing key: the public JWK an authorization server registers, and its
//! RFC 7638 thumbprint, the default `kid`.
//!
//! Invariants: the public parameters are unsigned big-endian bytes, minimal for RSA and
//! fixed-length for EC, so the JWK and the thumbprint come out the same whatever form the key was
//! read from. The JSON and the thumbprint are made by jsonwebtoken's `Jwk`, the type verifiers
//! (including this crate's dev server) read them with. Only public members exist here.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::Algorithm;
use jsonwebtoken::jwk::{
    AlgorithmParameters, CommonParameters, EllipticCurve, EllipticCurveKeyParameters,
    EllipticCurveKeyType, Jwk, OctetKeyPairParameters, OctetKeyPairType, PublicKeyUse,
    RSAKeyParameters, RSAKeyType, ThumbprintHash,
};
use serde_json::Value;

/// Public parameters of a key type this crate signs with.
#[derive(Clone, PartialEq, Eq)]
pub(crate) enum PublicParts {
    Rsa {
        n: Vec<u8>,
        e: Vec<u8>,
    },
    Ec {
        crv: EllipticCurve,
        x: Vec<u8>,
        y: Vec<u8>,
    },
    Ed25519 {
        x: Vec<u8>,
    },
}

impl PublicParts {
    /// RSA parts with leading zero bytes dropped (RFC 7518 §6.3.1: minimal octets).
    pub(crate) fn rsa(n: &[u8], e: &[u8]) -> PublicParts {
        PublicParts::Rsa {
            n: strip_zeros(n).to_vec(),
            e: strip_zeros(e).to_vec(),
        }
    }

    /// The bare JWK: `kty` and the public parameters.
    fn jwk(&self) -> Jwk {
        let b64 = |bytes: &[u8]| URL_SAFE_NO_PAD.encode(bytes);
        let algorithm = match self {
            PublicParts::Rsa { n, e } => AlgorithmParameters::RSA(RSAKeyParameters {
                key_type: RSAKeyType::RSA,
                n: b64(n),
                e: b64(e),
            }),
            PublicParts::Ec { crv, x, y } => {
                AlgorithmParameters::EllipticCurve(EllipticCurveKeyParameters {
                    key_type: EllipticCurveKeyType::EC,
                    curve: crv.clone(),
                    x: b64(x),
                    y: b64(y),
                })
            }
            PublicParts::Ed25519 { x } => {
                AlgorithmParameters::OctetKeyPair(OctetKeyPairParameters {
                    key_type: OctetKeyPairType::OctetKeyPair,
                    curve: EllipticCurve::Ed25519,
                    x: b64(x),
                })
            }
        };
        Jwk {
            common: CommonParameters::default(),
            algorithm,
        }
    }
}

fn strip_zeros(bytes: &[u8]) -> &[u8] {
    let skip = bytes.iter().take_while(|b| **b == 0).count();
    &bytes[skip..]
}

/// RFC 7638: the required members in lexicographic order, no whitespace, SHA-256, base64url.
pub(crate) fn thumbprint(public: &PublicParts) -> String {
    public
        .jwk()
        .thumbprint(ThumbprintHash::SHA256)
        // jsonwebtoken refuses only `oct` keys, unknown key types and mismatched curves, none of
        // which `PublicParts` can hold.
        .expect("RFC 7638 covers RSA, P-256/P-384 EC and Ed25519 keys")
}

/// The public JWK with `kid`, `alg` and `"use": "sig"` (Hydra refuses a registered key without
/// `use`).
pub(crate) fn public_jwk(public: &PublicParts, kid: &str, alg: Algorithm) -> Value {
    let mut jwk = public.jwk();
    jwk.common.public_key_use = Some(PublicKeyUse::Signature);
    jwk.common.key_id = Some(kid.to_owned());
    jwk.common.key_algorithm = Some(alg.into());
    // A struct of strings and unit enums always serializes.
    serde_json::to_value(&jwk).expect("a JWK serializes to JSON")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::test_support::*;

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

    /// jsonwebtoken's `Jwk` replaced a hand-written format; published JWKs and default kids must
    /// not change across that, so the old format is kept here as the oracle.
    #[test]
    fn output_is_what_the_hand_written_format_gave() {
        use serde_json::{Map, json};
        let b64 = |bytes: &[u8]| URL_SAFE_NO_PAD.encode(bytes);
        let crv_name = |crv: &EllipticCurve| match crv {
            EllipticCurve::P256 => "P-256",
            EllipticCurve::P384 => "P-384",
            other => panic!("{other:?}"),
        };
        let old = |public: &PublicParts, kid: &str, alg: Algorithm| {
            let (canonical, mut jwk) = match public {
                PublicParts::Rsa { n, e } => (
                    format!(r#"{{"e":"{}","kty":"RSA","n":"{}"}}"#, b64(e), b64(n)),
                    json!({"kty": "RSA", "n": b64(n), "e": b64(e)}),
                ),
                PublicParts::Ec { crv, x, y } => (
                    format!(
                        r#"{{"crv":"{}","kty":"EC","x":"{}","y":"{}"}}"#,
                        crv_name(crv),
                        b64(x),
                        b64(y)
                    ),
                    json!({"kty": "EC", "crv": crv_name(crv), "x": b64(x), "y": b64(y)}),
                ),
                PublicParts::Ed25519 { x } => (
                    format!(r#"{{"crv":"Ed25519","kty":"OKP","x":"{}"}}"#, b64(x)),
                    json!({"kty": "OKP", "crv": "Ed25519", "x": b64(x)}),
                ),
            };
            let digest =
                aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, canonical.as_bytes());
            let members: &mut Map<String, Value> = jwk.as_object_mut().unwrap();
            members.insert("kid".into(), kid.into());
            members.insert("alg".into(), crate::key::alg_name(alg).into());
            members.insert("use".into(), "sig".into());
            (b64(digest.as_ref()), jwk)
        };
        let mut keys: Vec<_> = [
            "rsa_pkcs1.pem",
            "rsa.jwk.json",
            "ec_p256_sec1.pem",
            "ec_p256.jwk.json",
            "ec_p384_sec1.pem",
            "ed25519_pkcs8.pem",
            "ed25519.jwk.json",
        ]
        .iter()
        .map(|f| load(f, None, None).unwrap())
        .collect();
        for alg in [Algorithm::PS256, Algorithm::ES384] {
            keys.push(crate::key::SigningKey::generate(alg).unwrap().1);
        }
        for key in keys {
            let (thumbprint, jwk) = old(&key.public, key.kid(), key.alg());
            assert_eq!(key.thumbprint(), thumbprint, "{key:?}");
            assert_eq!(key.public_jwk(), jwk, "{key:?}");
            assert_eq!(key.public_jwk().to_string(), jwk.to_string(), "{key:?}");
        }
    }
}
