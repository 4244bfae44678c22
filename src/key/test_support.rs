//! Helpers the key layer's unit tests share: fixtures and verification through the public JWK.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{DecodingKey, Header, Validation};
use serde_json::{Value, json};

use super::alg::SUPPORTED_ALGS;
use super::{Algorithm, KeyError, SigningKey};

pub(crate) const ALL: [Algorithm; 9] = SUPPORTED_ALGS;

pub(crate) fn fixture_path(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/keys")
        .join(name)
}

pub(crate) fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(fixture_path(name)).unwrap()
}

pub(crate) fn load(
    name: &str,
    alg: Option<Algorithm>,
    kid: Option<&str>,
) -> Result<SigningKey, KeyError> {
    SigningKey::from_bytes(&fixture(name), alg, kid)
}

pub(crate) fn without_kid(mut jwk: Value) -> Value {
    jwk.as_object_mut().unwrap().remove("kid");
    jwk
}

/// Verifies with a key built from the published JWK only, the way an authorization server would.
pub(crate) fn verify(key: &SigningKey, token: &str) -> (Header, Value) {
    let jwk: Jwk = serde_json::from_value(key.public_jwk()).unwrap();
    let decoding = DecodingKey::from_jwk(&jwk).unwrap();
    let mut validation = Validation::new(key.alg());
    validation.set_audience(&["https://as.example/token"]);
    let data = jsonwebtoken::decode::<Value>(token, &decoding, &validation).unwrap();
    (data.header, data.claims)
}

pub(crate) fn test_claims() -> Value {
    let now = SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    json!({"iss": "c", "sub": "c", "aud": "https://as.example/token", "iat": now, "exp": now + 60})
}
