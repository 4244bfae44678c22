//! The RFC 7523 §2.2 client assertion: a short-lived JWT signed with the client's key.

use std::time::Duration;

use aws_lc_rs::rand::{SecureRandom as _, SystemRandom};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

use crate::key::{KeyError, SigningKey};
use crate::secret::Secret;
use crate::util::unix_now;

/// Random bytes per `jti`: 192 bits, well above the 128 docs/spec.md §2 asks for.
const JTI_BYTES: usize = 24;

/// The assertion's claims (RFC 7523 §3). No `nbf`: Hydra allows no clock skew, and `iat` already
/// says when the assertion became valid.
#[derive(Debug, serde::Serialize, serde::Deserialize, PartialEq)]
pub(crate) struct AssertionClaims {
    pub(crate) iss: String,
    pub(crate) sub: String,
    pub(crate) aud: String,
    pub(crate) jti: String,
    pub(crate) iat: u64,
    pub(crate) exp: u64,
}

/// Pure: `iss` = `sub` = `client_id`, `aud` = `audience`, `iat` = `now_unix` (whole seconds,
/// floored by the caller so it is never ahead of the server's clock), `exp` = `iat` + `lifetime`
/// in whole seconds, at least 1 so the assertion is never born expired.
pub(crate) fn claims(
    client_id: &str,
    audience: &str,
    jti: String,
    now_unix: u64,
    lifetime: Duration,
) -> AssertionClaims {
    AssertionClaims {
        iss: client_id.to_owned(),
        sub: client_id.to_owned(),
        aud: audience.to_owned(),
        jti,
        iat: now_unix,
        exp: now_unix.saturating_add(lifetime.as_secs().max(1)),
    }
}

/// A fresh `jti`: 192 random bits, base64url without padding (32 characters).
pub fn new_jti() -> String {
    let mut bytes = [0u8; JTI_BYTES];
    // The system RNG failing means the OS cannot provide randomness at all; no assertion (or TLS
    // handshake) can be made safely then, so this is not a recoverable condition.
    SystemRandom::new()
        .fill(&mut bytes)
        .expect("the system random number generator failed");
    URL_SAFE_NO_PAD.encode(bytes)
}

/// Signs a fresh assertion with a new `jti`; `iat` is the current time floored to the second.
pub fn sign(
    key: &SigningKey,
    client_id: &str,
    audience: &str,
    lifetime: Duration,
) -> Result<Secret<String>, KeyError> {
    let now = unix_now();
    key.sign(&claims(client_id, audience, new_jti(), now, lifetime))
}

/// Like [`sign`], tolerating a token endpoint whose clock differs from ours by up to
/// `clock_tolerance`: `iat` is set that far in the past, so a server running behind never sees it
/// in its future (Hydra allows no skew), and `exp` stays `lifetime` after our now, so a server
/// running ahead still sees it unexpired as long as `lifetime` exceeds the tolerance.
pub(crate) fn sign_tolerant(
    key: &SigningKey,
    client_id: &str,
    audience: &str,
    lifetime: Duration,
    clock_tolerance: Duration,
) -> Result<Secret<String>, KeyError> {
    let now = unix_now();
    let back = clock_tolerance.as_secs().min(now);
    key.sign(&claims(
        client_id,
        audience,
        new_jti(),
        now - back,
        lifetime.saturating_add(Duration::from_secs(back)),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::Algorithm;
    use jsonwebtoken::jwk::Jwk;
    use jsonwebtoken::{DecodingKey, Validation};
    use std::collections::HashSet;

    #[test]
    fn claims_are_pure_and_correct() {
        let make = || {
            claims(
                "orders-service",
                "https://hydra.example.com/oauth2/token",
                "jti-1".into(),
                1_700_000_000,
                Duration::from_secs(60),
            )
        };
        let c = make();
        assert_eq!(
            c,
            AssertionClaims {
                iss: "orders-service".into(),
                sub: "orders-service".into(),
                aud: "https://hydra.example.com/oauth2/token".into(),
                jti: "jti-1".into(),
                iat: 1_700_000_000,
                exp: 1_700_000_060,
            }
        );
        assert_eq!(make(), c);
    }

    #[test]
    fn lifetime_is_whole_seconds_and_at_least_one() {
        let exp = |lifetime| claims("c", "a", String::new(), 100, lifetime).exp;
        assert_eq!(exp(Duration::ZERO), 101);
        assert_eq!(exp(Duration::from_millis(999)), 101);
        assert_eq!(exp(Duration::from_millis(1500)), 101);
        assert_eq!(exp(Duration::from_secs(300)), 400);
        assert_eq!(
            claims("c", "a", String::new(), u64::MAX, Duration::from_secs(5)).exp,
            u64::MAX
        );
    }

    #[test]
    fn no_nbf_claim() {
        let json =
            serde_json::to_value(claims("c", "a", "j".into(), 1, Duration::from_secs(1))).unwrap();
        let mut members: Vec<_> = json.as_object().unwrap().keys().cloned().collect();
        members.sort();
        assert_eq!(members, ["aud", "exp", "iat", "iss", "jti", "sub"]);
    }

    #[test]
    fn jti_is_random_urlsafe_and_long_enough() {
        let jtis: HashSet<String> = (0..2000).map(|_| new_jti()).collect();
        assert_eq!(jtis.len(), 2000);
        for jti in &jtis {
            // 24 bytes → 32 base64url characters, 192 bits.
            assert_eq!(jti.len(), 32, "{jti}");
            assert!(URL_SAFE_NO_PAD.decode(jti).unwrap().len() * 8 >= 128);
            assert!(
                jti.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'),
                "{jti}"
            );
        }
    }

    #[test]
    fn sign_makes_a_verifiable_fresh_assertion() {
        let (_, key) = SigningKey::generate(Algorithm::ES256).unwrap();
        let audience = "https://hydra.example.com/oauth2/token";
        let before = crate::util::unix_now();
        let a = sign(&key, "orders-service", audience, Duration::from_secs(60)).unwrap();
        let b = sign(&key, "orders-service", audience, Duration::from_secs(60)).unwrap();
        let after = crate::util::unix_now();

        let jwk: Jwk = serde_json::from_value(key.public_jwk()).unwrap();
        let mut validation = Validation::new(Algorithm::ES256);
        validation.set_audience(&[audience]);
        validation.set_issuer(&["orders-service"]);
        validation.leeway = 0;
        let decoding = DecodingKey::from_jwk(&jwk).unwrap();
        let ca =
            jsonwebtoken::decode::<AssertionClaims>(a.expose(), &decoding, &validation).unwrap();
        let cb =
            jsonwebtoken::decode::<AssertionClaims>(b.expose(), &decoding, &validation).unwrap();

        assert_eq!(ca.header.kid.as_deref(), Some(key.kid()));
        assert_eq!(ca.header.typ.as_deref(), Some("JWT"));
        let c = ca.claims;
        assert_eq!(c.sub, "orders-service");
        assert!(
            c.iat >= before && c.iat <= after,
            "iat {} not in [{before}, {after}]",
            c.iat
        );
        assert_eq!(c.exp - c.iat, 60);
        assert_ne!(c.jti, cb.claims.jti);
        assert_ne!(a.expose(), b.expose());

        let raw =
            jsonwebtoken::dangerous::insecure_decode::<serde_json::Value>(a.expose()).unwrap();
        assert!(raw.claims.get("nbf").is_none());
        assert_eq!(raw.claims["iss"], "orders-service");
    }
}
