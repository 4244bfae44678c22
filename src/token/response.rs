//! What a token is: the cache key it is requested for, the RFC 6749 §5.1 success response, the
//! §5.2 error response, and the pure parser that turns an HTTP answer into one of them.
//!
//! The parser checks in the order the RFC implies: status, then content type, then the body.
//! It never panics on any input; the property tests in `tests/` hold it to that.

use std::fmt;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use http::HeaderValue;
use serde::Deserialize;

use crate::secret::Secret;

/// The (scope set, audience set) a token is requested for; both sorted and de-duplicated so
/// that routes listing the same sets in another order share one token.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct TokenKey {
    pub(crate) scopes: Vec<String>,
    pub(crate) audiences: Vec<String>,
}

impl TokenKey {
    pub(crate) fn new<S: AsRef<str>, A: AsRef<str>>(scopes: &[S], audiences: &[A]) -> TokenKey {
        fn norm<T: AsRef<str>>(items: &[T]) -> Vec<String> {
            let mut v: Vec<String> = items.iter().map(|s| s.as_ref().to_string()).collect();
            v.sort();
            v.dedup();
            v
        }
        TokenKey {
            scopes: norm(scopes),
            audiences: norm(audiences),
        }
    }

    /// The `scope` form value: space-separated, or `None` when there are no scopes.
    pub(crate) fn scope_param(&self) -> Option<String> {
        (!self.scopes.is_empty()).then(|| self.scopes.join(" "))
    }
}

impl fmt::Display for TokenKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "scope=[{}] audience=[{}]",
            self.scopes.join(" "),
            self.audiences.join(" ")
        )
    }
}

/// An access token as issued, with what the cache needs to schedule it.
pub(crate) struct AccessToken {
    /// `Bearer <token>`, built once per token and marked sensitive so hyper and our logging
    /// never print it.
    header: HeaderValue,
    value: Secret<String>,
    /// The lifetime the server granted (from `expires_in`, the JWT `exp`, or the configured default).
    pub(crate) lifetime: Duration,
    /// Where `lifetime` came from, for logs.
    pub(crate) lifetime_source: LifetimeSource,
    /// The granted scopes, when the server says.
    pub(crate) scope: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LifetimeSource {
    ExpiresIn,
    JwtExp,
    Default,
}

impl AccessToken {
    /// The ready-made `Authorization` header value.
    pub(crate) fn authorization(&self) -> &HeaderValue {
        &self.header
    }

    pub(crate) fn secret(&self) -> &Secret<String> {
        &self.value
    }
}

impl fmt::Debug for AccessToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AccessToken")
            .field("value", &self.value)
            .field("lifetime", &self.lifetime)
            .field("lifetime_source", &self.lifetime_source)
            .field("scope", &self.scope)
            .finish()
    }
}

/// RFC 6749 §5.2 error response, kept as the server sent it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub(crate) struct OAuthError {
    pub(crate) error: String,
    #[serde(default)]
    pub(crate) error_description: Option<String>,
    #[serde(default)]
    pub(crate) error_uri: Option<String>,
}

impl OAuthError {
    /// Whether a new attempt (with a new assertion) can succeed. Hydra's `jti_known` means the
    /// assertion id was seen before; the §5.2 codes for configuration mistakes are final.
    pub(crate) fn is_retryable(&self) -> bool {
        matches!(
            self.error.as_str(),
            "jti_known" | "temporarily_unavailable" | "server_error" | "slow_down"
        )
    }
}

impl fmt::Display for OAuthError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&sanitize(&self.error, 100))?;
        if let Some(d) = &self.error_description {
            write!(f, ": {}", sanitize(d, 300))?;
        }
        Ok(())
    }
}

/// Why a token response could not be used.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub(crate) enum ResponseError {
    /// A §5.2 error body. Final unless [`OAuthError::is_retryable`].
    #[error("token endpoint answered {status}: {error}")]
    OAuth { status: u16, error: OAuthError },
    /// A 5xx or 408/429 without a §5.2 body: the server is in trouble, try again later.
    #[error("token endpoint answered {status} ({content_type})")]
    Status { status: u16, content_type: String },
    /// Anything else that is not a usable token response.
    #[error("token endpoint answered {status} ({content_type}) with an unusable body: {detail}")]
    Malformed {
        status: u16,
        content_type: String,
        detail: String,
    },
}

impl ResponseError {
    pub(crate) fn is_retryable(&self) -> bool {
        match self {
            ResponseError::OAuth { error, .. } => error.is_retryable(),
            ResponseError::Status { .. } | ResponseError::Malformed { .. } => true,
        }
    }
}

#[derive(Deserialize)]
struct RawSuccess {
    access_token: Option<serde_json::Value>,
    token_type: Option<serde_json::Value>,
    expires_in: Option<serde_json::Value>,
    scope: Option<serde_json::Value>,
}

/// Longest access token the sidecar caches, in bytes. Every cached token (fixed or run-time) is
/// held twice (the secret and its ready-made `Authorization` header), so this bound is what
/// makes the run-time cache's memory a number (`cache_capacity` entries; server::budget). A
/// longer token would not fit the 8–16 KiB header limits of most HTTP servers anyway.
pub(crate) const MAX_TOKEN_BYTES: usize = 16 * 1024;
/// Longest granted `scope` string kept with a token, in bytes: it is cached with the token
/// (the loopback token endpoint answers it), so it is bounded like the token.
pub(crate) const MAX_SCOPE_BYTES: usize = 4 * 1024;

/// Longest lifetime believed; keeps `Instant` arithmetic far from overflow whatever a server says.
pub(crate) const MAX_LIFETIME: Duration = Duration::from_secs(366 * 24 * 3600);

/// Turns a token endpoint answer into a token or a typed error.
///
/// `now_unix` is only used for the JWT `exp` fallback when `expires_in` is missing.
pub(crate) fn parse_response(
    status: u16,
    content_type: Option<&str>,
    body: &[u8],
    now_unix: u64,
    default_ttl: Duration,
) -> Result<AccessToken, ResponseError> {
    let ct = content_type.unwrap_or("no content type");
    let ct_owned = sanitize(ct, 100);
    let malformed = |detail: String| ResponseError::Malformed {
        status,
        content_type: ct_owned.clone(),
        detail,
    };

    if status != 200 {
        // §5.2 errors come with 400 (401 for client authentication); many servers use other 4xx
        // and even 5xx for them, so any status may carry one.
        if let Ok(error) = serde_json::from_slice::<OAuthError>(body)
            && !error.error.is_empty()
        {
            return Err(ResponseError::OAuth { status, error });
        }
        if status >= 500 || status == 408 || status == 429 {
            return Err(ResponseError::Status {
                status,
                content_type: ct_owned,
            });
        }
        return Err(malformed(format!(
            "expected 200 or an RFC 6749 error body, got {} bytes",
            body.len()
        )));
    }

    // Some servers label JSON as text/plain; the body decides, and the error names the type.
    let value: serde_json::Value = serde_json::from_slice(body).map_err(|e| {
        malformed(format!(
            "not a JSON token response ({})",
            json_error_class(&e)
        ))
    })?;
    // serde's derived struct deserializer would also take an array; RFC 6749 §5.1 says object.
    if !value.is_object() {
        return Err(malformed("the token response is not a JSON object".into()));
    }
    let raw: RawSuccess = serde_json::from_value(value)
        .map_err(|e| malformed(format!("not a token response ({})", json_error_class(&e))))?;

    let token = match raw.access_token {
        // The size, never the token, goes into the error: errors are logged.
        Some(serde_json::Value::String(s)) if s.len() > MAX_TOKEN_BYTES => {
            return Err(malformed(format!(
                "access_token is {} bytes, over the {MAX_TOKEN_BYTES} the sidecar caches",
                s.len()
            )));
        }
        Some(serde_json::Value::String(s)) if !s.is_empty() => s,
        Some(_) => return Err(malformed("access_token is not a non-empty string".into())),
        None => return Err(malformed("access_token is missing".into())),
    };
    match raw.token_type {
        Some(serde_json::Value::String(t)) if t.eq_ignore_ascii_case("bearer") => {}
        Some(serde_json::Value::String(t)) => {
            return Err(malformed(format!(
                "token_type {:?} is not Bearer",
                sanitize(&t, 40)
            )));
        }
        _ => return Err(malformed("token_type is missing".into())),
    }
    let scope = match raw.scope {
        None | Some(serde_json::Value::Null) => None,
        Some(serde_json::Value::String(s)) if s.len() > MAX_SCOPE_BYTES => {
            return Err(malformed(format!(
                "scope is {} bytes, over the {MAX_SCOPE_BYTES} the sidecar caches",
                s.len()
            )));
        }
        Some(serde_json::Value::String(s)) => Some(s),
        Some(_) => return Err(malformed("scope is not a string".into())),
    };

    let (lifetime, lifetime_source) = match raw.expires_in {
        None | Some(serde_json::Value::Null) => match jwt_exp(&token) {
            Some(exp) if exp > now_unix => (
                Duration::from_secs(exp - now_unix).min(MAX_LIFETIME),
                LifetimeSource::JwtExp,
            ),
            Some(_) => return Err(malformed("the JWT access token has already expired".into())),
            None => (default_ttl.min(MAX_LIFETIME), LifetimeSource::Default),
        },
        Some(v) => match expires_in_secs(&v) {
            // Under a second a token cannot be cached usefully; the refresher would spin on it.
            Some(secs) if secs >= 1.0 => (
                Duration::from_secs_f64(secs.min(MAX_LIFETIME.as_secs_f64())),
                LifetimeSource::ExpiresIn,
            ),
            Some(_) => return Err(malformed("expires_in is below 1 second".into())),
            None => return Err(malformed("expires_in is not a number".into())),
        },
    };

    let mut header = HeaderValue::try_from(format!("Bearer {token}"))
        .map_err(|_| malformed("access_token has characters not allowed in a header".into()))?;
    header.set_sensitive(true);
    Ok(AccessToken {
        header,
        value: Secret::new(token),
        lifetime,
        lifetime_source,
        scope,
    })
}

/// `expires_in` is a number per the RFC; some servers send a numeric string.
fn expires_in_secs(v: &serde_json::Value) -> Option<f64> {
    let f = match v {
        serde_json::Value::Number(n) => n.as_f64()?,
        serde_json::Value::String(s) => s.trim().parse::<f64>().ok()?,
        _ => return None,
    };
    f.is_finite().then_some(f)
}

/// The `exp` claim of a JWS compact token, read without verifying it: the sidecar only uses it to
/// schedule a refresh, never to trust the token.
pub fn jwt_exp(token: &str) -> Option<u64> {
    jwt_claims(token)?.get("exp")?.as_u64()
}

/// The payload of a JWS compact token as JSON, unverified.
pub fn jwt_claims(token: &str) -> Option<serde_json::Map<String, serde_json::Value>> {
    let mut parts = token.split('.');
    let (_h, payload, _s) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() {
        return None;
    }
    let bytes = URL_SAFE_NO_PAD.decode(payload.trim_end_matches('=')).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// serde_json's messages can quote the input; only its category is safe to log.
fn json_error_class(e: &serde_json::Error) -> &'static str {
    use serde_json::error::Category;
    match e.classify() {
        Category::Io => "I/O error",
        Category::Syntax => "syntax error",
        Category::Data => "unexpected shape",
        Category::Eof => "truncated",
    }
}

/// RFC 9110 §10.2.3 `Retry-After`, delta-seconds or an HTTP-date, as a pause from `now`.
/// `None` when it is neither; a date in the past is no pause. Capping is the schedule's job
/// (`backoff::RETRY_AFTER_CAP`); a number too large for `u64` is the largest pause.
pub(crate) fn parse_retry_after(value: &[u8], now: std::time::SystemTime) -> Option<Duration> {
    let text = std::str::from_utf8(value).ok()?.trim();
    if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        return Some(Duration::from_secs(text.parse().unwrap_or(u64::MAX)));
    }
    let at = httpdate::parse_http_date(text).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// Server-provided text goes into logs and responses: keep it short and printable.
pub(crate) fn sanitize(s: &str, max: usize) -> String {
    let mut out: String = s.chars().filter(|c| !c.is_control()).take(max).collect();
    if s.chars().count() > max {
        out.push('…');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const TTL: Duration = Duration::from_secs(300);

    fn ok(body: &str) -> Result<AccessToken, ResponseError> {
        parse_response(200, Some("application/json"), body.as_bytes(), 1_000, TTL)
    }

    #[test]
    fn key_is_sorted_and_deduplicated() {
        let a = TokenKey::new(&["b", "a", "b"], &["y", "x"]);
        let b = TokenKey::new(&["a", "b"], &["x", "y", "x"]);
        assert_eq!(a, b);
        assert_eq!(a.scope_param().as_deref(), Some("a b"));
        assert_eq!(TokenKey::new::<&str, &str>(&[], &[]).scope_param(), None);
    }

    #[test]
    fn accepts_hydra_lowercase_bearer() {
        let t =
            ok(r#"{"access_token":"abc","token_type":"bearer","expires_in":3599,"scope":"a b"}"#)
                .unwrap();
        assert_eq!(t.lifetime, Duration::from_secs(3599));
        assert_eq!(t.lifetime_source, LifetimeSource::ExpiresIn);
        assert_eq!(t.scope.as_deref(), Some("a b"));
        assert_eq!(t.authorization(), "Bearer abc");
        assert!(t.authorization().is_sensitive());
    }

    #[test]
    fn lifetime_falls_back_to_jwt_exp_then_default() {
        let payload = URL_SAFE_NO_PAD.encode(br#"{"exp":1600}"#);
        let jwt = format!("eyJhbGciOiJub25lIn0.{payload}.sig");
        let t = ok(&format!(
            r#"{{"access_token":"{jwt}","token_type":"Bearer"}}"#
        ))
        .unwrap();
        assert_eq!(t.lifetime, Duration::from_secs(600));
        assert_eq!(t.lifetime_source, LifetimeSource::JwtExp);

        let t = ok(r#"{"access_token":"opaque","token_type":"Bearer"}"#).unwrap();
        assert_eq!(t.lifetime, TTL);
        assert_eq!(t.lifetime_source, LifetimeSource::Default);

        let t = ok(r#"{"access_token":"x","token_type":"Bearer","expires_in":"120"}"#).unwrap();
        assert_eq!(t.lifetime, Duration::from_secs(120));
    }

    #[test]
    fn rejects_unusable_success_bodies() {
        for body in [
            r#"{"token_type":"Bearer"}"#,
            r#"{"access_token":"","token_type":"Bearer"}"#,
            r#"{"access_token":"x","token_type":"mac"}"#,
            r#"{"access_token":"x"}"#,
            r#"{"access_token":"x","token_type":"Bearer","expires_in":-5}"#,
            r#"{"access_token":"x","token_type":"Bearer","expires_in":0}"#,
            r#"{"access_token":"x","token_type":"Bearer","expires_in":"soon"}"#,
            r#"{"access_token":"a\nb","token_type":"Bearer"}"#,
            "<html>oops</html>",
            "",
        ] {
            let err = ok(body)
                .err()
                .unwrap_or_else(|| panic!("accepted {body:?}"));
            assert!(
                matches!(err, ResponseError::Malformed { status: 200, .. }),
                "{body:?}: {err:?}"
            );
        }
    }

    /// The size bound that makes the run-time cache's memory a number (server::budget): a
    /// token at the bound is cached, one byte more is a token error naming both sizes and
    /// never containing the token itself; the granted scope likewise.
    #[test]
    fn an_access_token_or_scope_over_the_cached_size_is_refused_naming_the_size() {
        let body = |token: &str, scope: &str| {
            format!(
                r#"{{"access_token":"{token}","token_type":"Bearer","expires_in":60,"scope":"{scope}"}}"#
            )
        };
        let at_bound = "t".repeat(MAX_TOKEN_BYTES);
        assert!(ok(&body(&at_bound, "a")).is_ok());
        let over = format!("{}Z", "t".repeat(MAX_TOKEN_BYTES));
        let err = ok(&body(&over, "a")).unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, ResponseError::Malformed { status: 200, .. }));
        assert!(
            text.contains(&format!("{} bytes", MAX_TOKEN_BYTES + 1))
                && text.contains(&MAX_TOKEN_BYTES.to_string()),
            "{text}"
        );
        assert!(!text.contains("tttt"), "the token is not in the error");

        assert!(ok(&body("x", &"s".repeat(MAX_SCOPE_BYTES))).is_ok());
        let err = ok(&body("x", &"s".repeat(MAX_SCOPE_BYTES + 1))).unwrap_err();
        assert!(
            err.to_string()
                .contains(&format!("scope is {} bytes", MAX_SCOPE_BYTES + 1)),
            "{err}"
        );
    }

    #[test]
    fn huge_expires_in_is_clamped() {
        let t = ok(r#"{"access_token":"x","token_type":"Bearer","expires_in":1e300}"#).unwrap();
        assert_eq!(t.lifetime, MAX_LIFETIME);
    }

    #[test]
    fn error_bodies_are_typed_and_classified() {
        let err = parse_response(
            400,
            Some("application/json"),
            br#"{"error":"invalid_scope","error_description":"The requested scope is invalid"}"#,
            0,
            TTL,
        )
        .unwrap_err();
        match &err {
            ResponseError::OAuth { status, error } => {
                assert_eq!(*status, 400);
                assert_eq!(error.error, "invalid_scope");
            }
            other => panic!("{other:?}"),
        }
        assert!(!err.is_retryable());
        assert!(err.to_string().contains("invalid_scope"));

        let jti = parse_response(400, None, br#"{"error":"jti_known"}"#, 0, TTL).unwrap_err();
        assert!(jti.is_retryable());

        let html =
            parse_response(502, Some("text/html"), b"<h1>bad gateway</h1>", 0, TTL).unwrap_err();
        assert!(matches!(html, ResponseError::Status { status: 502, .. }));
        assert!(html.is_retryable());
        assert!(html.to_string().contains("text/html"));

        let notfound = parse_response(404, Some("text/html"), b"nope", 0, TTL).unwrap_err();
        assert!(matches!(
            notfound,
            ResponseError::Malformed { status: 404, .. }
        ));
        assert!(notfound.to_string().contains("404"));
    }

    #[test]
    fn malformed_json_error_does_not_echo_the_body() {
        let err = ok(r#"{"access_token": "SECRETSECRET", "token_type": 7"#).unwrap_err();
        assert!(!err.to_string().contains("SECRETSECRET"), "{err}");
        let err = ok(r#"{"access_token":"SECRETSECRET","token_type":"mac"}"#).unwrap_err();
        assert!(!err.to_string().contains("SECRETSECRET"), "{err}");
    }

    #[test]
    fn retry_after_is_delta_seconds_or_an_http_date() {
        use std::time::{Duration as D, SystemTime, UNIX_EPOCH};
        // Sun, 06 Nov 1994 08:49:37 GMT (RFC 9110's example) is 784111777.
        let now = UNIX_EPOCH + D::from_secs(784_111_777 - 90);
        assert_eq!(parse_retry_after(b"120", now), Some(D::from_secs(120)));
        assert_eq!(parse_retry_after(b" 0 ", now), Some(D::ZERO));
        assert_eq!(
            parse_retry_after(b"99999999999999999999999", now),
            Some(D::from_secs(u64::MAX))
        );
        assert_eq!(
            parse_retry_after(b"Sun, 06 Nov 1994 08:49:37 GMT", now),
            Some(D::from_secs(90))
        );
        let later = now + D::from_secs(1000);
        assert_eq!(
            parse_retry_after(b"Sun, 06 Nov 1994 08:49:37 GMT", later),
            Some(D::ZERO),
            "a date in the past"
        );
        for junk in [
            &b""[..],
            b"-5",
            b"1.5",
            b"soon",
            b"\xff\xfe",
            b"Sun, 06 Nov 1994",
        ] {
            assert_eq!(parse_retry_after(junk, SystemTime::now()), None, "{junk:?}");
        }
    }
}
