//! The one algorithm catalogue: which JOSE algorithms this crate signs with, their names, how a
//! configured name is parsed, and which algorithms fit which key type.
//!
//! Every other place in the crate asks here (`parse_alg` for configuration, `alg_name` for
//! output, `supported_list` for error messages) instead of keeping its own list.
//!
//! Invariants (pinned by the tests below):
//! - [`SUPPORTED_ALGS`] is exactly the set of algorithms some [`KeyType`] signs with.
//! - [`parse_alg`] accepts exactly the names of [`SUPPORTED_ALGS`]; HS*, ES512 and `none` are
//!   refused.
//! - [`supported_list`] and [`KeyType::fitting_algs`] are those same lists, in catalogue order.

use jsonwebtoken::Algorithm;

use super::KeyError;

/// The algorithms this crate signs with, in the order error messages list them.
pub(crate) const SUPPORTED_ALGS: [Algorithm; 9] = [
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

/// [`SUPPORTED_ALGS`] spelled out. A literal rather than built at run time so error types can
/// show it without allocating; a test keeps it equal to the catalogue.
const SUPPORTED_LIST: &str = "RS256 RS384 RS512 PS256 PS384 PS512 ES256 ES384 EdDSA";

/// The supported algorithm names, space-separated, for "use one of …" messages.
pub(crate) fn supported_list() -> &'static str {
    SUPPORTED_LIST
}

/// Whether a PEM key made for `alg` signs with `alg` without `signing_alg` being configured (a
/// PEM cannot carry the algorithm; each key type implies one).
pub(crate) fn is_implied_by_key(alg: Algorithm) -> bool {
    KeyType::for_alg(alg).is_some_and(|t| t.default_alg() == alg)
}

/// Parses a configured `signing_alg`. `None` for anything this crate cannot sign with (HS*, ES512,
/// unknown names). Case-insensitive, because an operator typing `es256` means ES256.
pub(crate) fn parse_alg(name: &str) -> Option<Algorithm> {
    SUPPORTED_ALGS
        .into_iter()
        .find(|alg| alg_name(*alg).eq_ignore_ascii_case(name.trim()))
}

/// The JOSE name of `alg` (`"ES256"`, `"EdDSA"`).
pub(crate) fn alg_name(alg: Algorithm) -> &'static str {
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

/// Key types that can sign. P-521 and Ed448 are absent: jsonwebtoken cannot sign with them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum KeyType {
    Rsa,
    P256,
    P384,
    Ed25519,
}

impl KeyType {
    /// The key type that signs with `alg`; `None` when this crate does not sign with it. The one
    /// table the rest of this module derives from.
    pub(crate) fn for_alg(alg: Algorithm) -> Option<KeyType> {
        match alg {
            Algorithm::RS256
            | Algorithm::RS384
            | Algorithm::RS512
            | Algorithm::PS256
            | Algorithm::PS384
            | Algorithm::PS512 => Some(KeyType::Rsa),
            Algorithm::ES256 => Some(KeyType::P256),
            Algorithm::ES384 => Some(KeyType::P384),
            Algorithm::EdDSA => Some(KeyType::Ed25519),
            _ => None,
        }
    }

    /// The key type in words, for error messages ("a P-256 EC key").
    pub(crate) fn describe(self) -> &'static str {
        match self {
            KeyType::Rsa => "an RSA key",
            KeyType::P256 => "a P-256 EC key",
            KeyType::P384 => "a P-384 EC key",
            KeyType::Ed25519 => "an Ed25519 key",
        }
    }

    /// The algorithm a key implies when neither configuration nor the JWK names one.
    pub(crate) fn default_alg(self) -> Algorithm {
        match self {
            KeyType::Rsa => Algorithm::RS256,
            KeyType::P256 => Algorithm::ES256,
            KeyType::P384 => Algorithm::ES384,
            KeyType::Ed25519 => Algorithm::EdDSA,
        }
    }

    /// The algorithms that fit, spelled out for error messages; a test keeps it equal to
    /// [`KeyType::fits`].
    pub(crate) fn fitting_algs(self) -> &'static str {
        match self {
            KeyType::Rsa => "RS256 RS384 RS512 PS256 PS384 PS512",
            KeyType::P256 => "ES256",
            KeyType::P384 => "ES384",
            KeyType::Ed25519 => "EdDSA",
        }
    }

    pub(crate) fn fits(self, alg: Algorithm) -> bool {
        KeyType::for_alg(alg) == Some(self)
    }
}

/// Settles the algorithm for a key: the configured one, else the JWK's `alg` member, else the key
/// type's default. A named algorithm must be supported and fit the key.
pub(crate) fn choose(
    key_type: KeyType,
    configured: Option<Algorithm>,
    jwk_alg: Option<&str>,
) -> Result<Algorithm, KeyError> {
    let (alg, origin) = match (configured, jwk_alg) {
        (Some(alg), _) => {
            if KeyType::for_alg(alg).is_none() {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::test_support::ALL;

    const KEY_TYPES: [KeyType; 4] = [KeyType::Rsa, KeyType::P256, KeyType::P384, KeyType::Ed25519];

    fn names(algs: impl Iterator<Item = Algorithm>) -> String {
        algs.map(alg_name).collect::<Vec<_>>().join(" ")
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
    fn the_spelled_out_lists_match_the_catalogue() {
        assert_eq!(supported_list(), names(SUPPORTED_ALGS.into_iter()));
        for key_type in KEY_TYPES {
            let fitting = SUPPORTED_ALGS.into_iter().filter(|a| key_type.fits(*a));
            assert_eq!(key_type.fitting_algs(), names(fitting), "{key_type:?}");
            assert!(key_type.fits(key_type.default_alg()), "{key_type:?}");
        }
        // Supported means: some key type signs with it.
        for alg in SUPPORTED_ALGS {
            assert!(KEY_TYPES.iter().any(|k| k.fits(alg)), "{alg:?}");
        }
        for alg in [Algorithm::HS256, Algorithm::HS384, Algorithm::HS512] {
            assert_eq!(KeyType::for_alg(alg), None);
        }
    }

    #[test]
    fn unsupported_alg_errors_list_the_catalogue() {
        let e = choose(KeyType::Rsa, Some(Algorithm::HS256), None).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("unsupported signing algorithm HS256: use one of {SUPPORTED_LIST}")
        );
    }
}
