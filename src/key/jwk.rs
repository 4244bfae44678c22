//! Private JWK (RFC 7517/7518) → the DER jsonwebtoken's `EncodingKey` wants. jsonwebtoken has no
//! `EncodingKey::from_jwk`, so the key is rebuilt: RSA parts → PKCS#1 `RSAPrivateKey` (encoded by
//! the `pkcs1` crate), EC and Ed25519 through aws-lc-rs, which also checks the parts belong
//! together.
//!
//! Invariants:
//! - Accepted: one JWK object, or a JWK Set holding exactly one key; `use` must be `sig` and
//!   `key_ops` must allow `sign` when present. Public JWKs, `oct` keys, multi-prime RSA, P-521 and
//!   non-Ed25519 OKP keys are refused with a message saying so.
//! - Every string of the parsed JSON is zeroized before it is dropped, and decoded members are
//!   `Zeroizing`. Errors name members, never their values.

use aws_lc_rs::signature::{EcdsaKeyPair, Ed25519KeyPair};
use base64::Engine as _;
use base64::alphabet;
use base64::engine::DecodePaddingMode;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};
use pkcs1::der::Encode as _;
use serde_json::{Map, Value};
use zeroize::{Zeroize as _, Zeroizing};

use super::KeyError;
use super::alg::KeyType;
use super::decode::{
    ParsedKey, ec_params, ec_parsed, ed25519_parsed, p521, rejected, rsa_from_pkcs1,
};

/// JWK members are base64url without padding (RFC 7515 §2); padding is tolerated because some
/// tools emit it.
const B64URL_LENIENT: GeneralPurpose = GeneralPurpose::new(
    &alphabet::URL_SAFE,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// A JWK file: parsed, turned into a key, and wiped whatever the outcome.
pub(crate) fn parse_jwk(text: &[u8]) -> Result<ParsedKey, KeyError> {
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

/// Overwrites every string in a parsed JWK before it is dropped (the `d`, `p`, `q`... members).
fn wipe_json(value: &mut Value) {
    match value {
        Value::String(s) => s.zeroize(),
        Value::Array(items) => items.iter_mut().for_each(wipe_json),
        Value::Object(map) => map.values_mut().for_each(wipe_json),
        _ => {}
    }
}

/// The one key of a JWK or a one-key JWK Set.
fn the_key(obj: &Map<String, Value>) -> Result<&Map<String, Value>, KeyError> {
    let Some(keys) = obj.get("keys") else {
        return Ok(obj);
    };
    let keys = keys
        .as_array()
        .ok_or_else(|| KeyError::Jwk("\"keys\" is not an array".into()))?;
    match keys.as_slice() {
        [one] => one
            .as_object()
            .ok_or_else(|| KeyError::Jwk("the key in \"keys\" is not an object".into())),
        many => Err(KeyError::Jwk(format!(
            "a JWK Set must hold exactly one key here, it holds {}",
            many.len()
        ))),
    }
}

fn jwk_from_value(value: &Value) -> Result<ParsedKey, KeyError> {
    let obj = value
        .as_object()
        .ok_or_else(|| KeyError::Jwk("expected a JSON object".into()))?;
    let jwk = the_key(obj)?;

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
    let member = |name: &str| -> Result<Zeroizing<Vec<u8>>, KeyError> {
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
            .map(Zeroizing::new)
            .map_err(|_| KeyError::Jwk(format!("\"{name}\" is not base64url")))
    };

    let mut parsed = match kty {
        "RSA" => {
            if jwk.contains_key("oth") {
                return Err(KeyError::UnsupportedKey("multi-prime RSA keys".into()));
            }
            // `d` first: a public JWK gets "this is a public key" rather than "no p".
            let d = member("d")?;
            let [n, e, p, q, dp, dq, qi] = ["n", "e", "p", "q", "dp", "dq", "qi"].map(&member);
            let (n, e, p, q, dp, dq, qi) = (n?, e?, p?, q?, dp?, dq?, qi?);
            let pkcs1 = pkcs1_from_parts(&[&n, &e, &d, &p, &q, &dp, &dq, &qi])?;
            rsa_from_pkcs1(&pkcs1)?
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
            let (signing_alg, _, len) = ec_params(key_type).expect("EC key type");
            let fixed = |name: &str| -> Result<Zeroizing<Vec<u8>>, KeyError> {
                let value = member(name)?;
                // Some producers drop leading zero bytes; the curve fixes the length.
                if value.len() > len {
                    return Err(KeyError::Jwk(format!("\"{name}\" is too long for {crv:?}")));
                }
                let mut out = Zeroizing::new(vec![0; len]);
                out[len - value.len()..].copy_from_slice(&value);
                Ok(out)
            };
            let (x, y, d) = (fixed("x")?, fixed("y")?, fixed("d")?);
            let mut point = Vec::with_capacity(1 + 2 * len);
            point.push(0x04);
            point.extend_from_slice(&x);
            point.extend_from_slice(&y);
            let pair = EcdsaKeyPair::from_private_key_and_public_key(signing_alg, &d, &point)
                .map_err(|e| rejected("EC", e))?;
            ec_parsed(key_type, &pair)?
        }
        "OKP" => match crv {
            Some("Ed25519") => {
                let (d, x) = (member("d")?, member("x")?);
                let pair = Ed25519KeyPair::from_seed_and_public_key(&d, &x)
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

/// A two-prime PKCS#1 `RSAPrivateKey` from the JWK parts `n e d p q dp dq qi` (big-endian,
/// unsigned). `der` writes each as a minimal positive INTEGER: leading zero bytes dropped, one
/// 0x00 added when the high bit is set. Consistency is aws-lc-rs's job when it parses the result.
fn pkcs1_from_parts(parts: &[&[u8]; 8]) -> Result<Zeroizing<Vec<u8>>, KeyError> {
    let too_large = |_| KeyError::Jwk("the RSA members are too large".into());
    let [n, e, d, p, q, dp, dq, qi] = parts.map(uint);
    let key = pkcs1::RsaPrivateKey {
        modulus: n.map_err(too_large)?,
        public_exponent: e.map_err(too_large)?,
        private_exponent: d.map_err(too_large)?,
        prime1: p.map_err(too_large)?,
        prime2: q.map_err(too_large)?,
        exponent1: dp.map_err(too_large)?,
        exponent2: dq.map_err(too_large)?,
        coefficient: qi.map_err(too_large)?,
        // None: version 0, two-prime.
        other_prime_infos: None,
    };
    let len = key
        .encoded_len()
        .and_then(usize::try_from)
        .map_err(too_large)?;
    // Written in place into a buffer of the final size, so no reallocation leaves a copy behind.
    let mut der = Zeroizing::new(vec![0; len]);
    key.encode_to_slice(&mut der).map_err(too_large)?;
    Ok(der)
}

/// An unsigned big-endian integer for `der`. An empty member is the integer 0 (invalid as a key,
/// and refused as such by aws-lc-rs), not an empty INTEGER, which DER forbids.
fn uint(bytes: &[u8]) -> pkcs1::der::Result<pkcs1::UintRef<'_>> {
    pkcs1::UintRef::new(if bytes.is_empty() { &[0] } else { bytes })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::test_support::*;
    use crate::key::{Algorithm, SigningKey};
    use serde_json::json;

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

    /// Replaces the test of the hand-written DER encoder this module used to have: the same
    /// property, checked on the PKCS#1 bytes built from JWK parts.
    #[test]
    fn pkcs1_der_encoder_writes_minimal_positive_integers() {
        let long = [0x01; 300];
        let parts: [&[u8]; 8] = [
            &[0x00, 0x00, 0x7f],
            &[0x80],
            &[],
            &long,
            &[1],
            &[1],
            &[1],
            &[1],
        ];
        let der = pkcs1_from_parts(&parts).unwrap();
        let expected_ints: &[u8] = &[
            0x02, 0x01, 0x00, // version 0 (two-prime)
            0x02, 0x01, 0x7f, // leading zeros dropped
            0x02, 0x02, 0x00, 0x80, // high bit set: one 0x00 in front
            0x02, 0x01, 0x00, // empty: the integer 0
            0x02, 0x82, 0x01, 0x2c, // 300 bytes: long-form length
        ];
        // SEQUENCE with a long-form length: 17 + 300 + 4 × 3 = 329 bytes.
        assert_eq!(&der[..4], &[0x30, 0x82, 0x01, 0x49]);
        assert_eq!(der.len(), 4 + 329);
        assert_eq!(&der[4..4 + expected_ints.len()], expected_ints);
        assert_eq!(&der[der.len() - 12..], &[0x02, 0x01, 0x01].repeat(4)[..]);
        // And it reads back as PKCS#1 with the same values.
        let back = pkcs1::RsaPrivateKey::<pkcs1::UintRef<'_>>::try_from(&der[..]).unwrap();
        assert_eq!(back.modulus.as_bytes(), [0x7f]);
        assert_eq!(back.public_exponent.as_bytes(), [0x80]);
        assert_eq!(back.prime1.as_bytes(), long);
    }

    #[test]
    fn rsa_jwk_rebuilds_the_same_pkcs1_as_the_pem_file() {
        // The PKCS#1 fixture and the JWK fixture are the same key: the DER must match byte for
        // byte, which pins every INTEGER's encoding against OpenSSL's.
        use rustls_pki_types::pem::{PemObject, SectionKind};
        let pem = fixture("rsa_pkcs1.pem");
        let (kind, from_pem) = <(SectionKind, Vec<u8>) as PemObject>::pem_slice_iter(&pem)
            .next()
            .unwrap()
            .unwrap();
        assert_eq!(kind, SectionKind::RsaPrivateKey);
        let jwk: Value = serde_json::from_slice(&fixture("rsa.jwk.json")).unwrap();
        let parts = ["n", "e", "d", "p", "q", "dp", "dq", "qi"]
            .map(|m| B64URL_LENIENT.decode(jwk[m].as_str().unwrap()).unwrap());
        let parts: [&[u8]; 8] = std::array::from_fn(|i| parts[i].as_slice());
        assert_eq!(*pkcs1_from_parts(&parts).unwrap(), from_pem);
    }
}
