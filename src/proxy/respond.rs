//! The one place where the sidecar's own failures become HTTP responses (docs/spec.md §5).
//!
//! Every error made by the sidecar (not relayed from the upstream) carries a JSON body
//! `{"error", "error_description", "route"}` and the same code in the `token-sidecar-error`
//! header, so an application can tell them from the upstream's answers without parsing.

use bytes::Bytes;
use http::header::{CONNECTION, CONTENT_TYPE, HeaderName, HeaderValue, RETRY_AFTER};
use http::{Response, StatusCode};
use http_body_util::Full;

use crate::token::cache::TokenError;
use crate::token::client::FailureKind;
use crate::token::sanitize;

pub(crate) const ERROR_HEADER: HeaderName = HeaderName::from_static("token-sidecar-error");

/// Everything the proxy can fail with on its own.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("no route matches this request")]
    NoRoute,
    #[error("method {0} is not supported by the sidecar")]
    MethodNotAllowed(String),
    #[error("{0}")]
    BadRequest(&'static str),
    /// A request whose body framing the sidecar refuses: answered 400 with `Connection: close`,
    /// because the connection's remaining bytes cannot be trusted to start the next request.
    #[error("{0}")]
    BadFraming(&'static str),
    /// The request names a host that neither a host route nor the local names cover.
    #[error("this sidecar does not serve the host this request names")]
    Misdirected,
    /// A request from a cross-site web page.
    #[error("{0}")]
    Forbidden(&'static str),
    /// A per-request audience or scope the route does not allow (docs/spec.md §4).
    #[error("{0}")]
    TargetNotAllowed(&'static str),
    #[error("the request body made no progress for {0:?}")]
    RequestTimeout(std::time::Duration),
    #[error("{0}")]
    Token(TokenFailure),
    #[error("upstream unreachable: {0}")]
    UpstreamUnavailable(String),
    #[error("upstream did not answer within {0:?}")]
    UpstreamTimeout(std::time::Duration),
}

/// A token failure as the application sees it.
#[derive(Debug)]
pub struct TokenFailure(pub(crate) TokenError);

impl std::fmt::Display for TokenFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            TokenError::Fetch { error, .. } => match error.kind() {
                FailureKind::Rejected => write!(
                    f,
                    "authorization server rejected the token request: {error}"
                ),
                FailureKind::Unavailable => write!(f, "no token available: {error}"),
            },
            TokenError::Timeout(d) => write!(
                f,
                "no token available: token request did not finish within {d:?}"
            ),
        }
    }
}

impl ProxyError {
    /// The status and the docs/spec.md §5 error code.
    pub(crate) fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            ProxyError::NoRoute => (StatusCode::NOT_FOUND, "no_route"),
            ProxyError::MethodNotAllowed(_) => {
                (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed")
            }
            ProxyError::BadRequest(_) | ProxyError::BadFraming(_) => {
                (StatusCode::BAD_REQUEST, "bad_request")
            }
            ProxyError::Misdirected => (StatusCode::MISDIRECTED_REQUEST, "misdirected_request"),
            ProxyError::Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden"),
            ProxyError::TargetNotAllowed(_) => (StatusCode::FORBIDDEN, "target_not_allowed"),
            ProxyError::RequestTimeout(_) => (StatusCode::REQUEST_TIMEOUT, "request_timeout"),
            ProxyError::Token(TokenFailure(TokenError::Fetch { error, .. }))
                if error.kind() == FailureKind::Rejected =>
            {
                (StatusCode::BAD_GATEWAY, "token_rejected")
            }
            ProxyError::Token(_) => (StatusCode::SERVICE_UNAVAILABLE, "token_unavailable"),
            ProxyError::UpstreamUnavailable(_) => (StatusCode::BAD_GATEWAY, "upstream_unavailable"),
            ProxyError::UpstreamTimeout(_) => (StatusCode::GATEWAY_TIMEOUT, "upstream_timeout"),
        }
    }

    /// Seconds a client should wait before retrying, for the errors that pass with time.
    fn retry_after(&self) -> Option<u64> {
        match self {
            ProxyError::Token(TokenFailure(TokenError::Fetch { error, retry_in }))
                if error.kind() == FailureKind::Unavailable =>
            {
                Some(retry_in.as_secs_f64().ceil().max(1.0) as u64)
            }
            ProxyError::Token(TokenFailure(TokenError::Timeout(_))) => Some(1),
            _ => None,
        }
    }
}

/// The response for `err` on `route` (None when no route matched).
pub(crate) fn error_response<B: From<Bytes>>(err: &ProxyError, route: Option<&str>) -> Response<B> {
    let (status, code) = err.status_and_code();
    let body = serde_json::json!({
        "error": code,
        "error_description": sanitize(&err.to_string(), 1000),
        "route": route,
    });
    let mut resp = Response::new(B::from(Bytes::from(body.to_string())));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    h.insert(ERROR_HEADER, HeaderValue::from_static(code));
    if let Some(secs) = err.retry_after() {
        h.insert(RETRY_AFTER, HeaderValue::from(secs));
    }
    if matches!(err, ProxyError::BadFraming(_)) {
        // hyper closes an HTTP/1 connection after a response that says so (HTTP/2 has no
        // body framing of this kind and drops the header).
        h.insert(CONNECTION, HeaderValue::from_static("close"));
    }
    resp
}

/// A plain JSON response for the admin endpoints.
pub(crate) fn json_response(status: StatusCode, body: &serde_json::Value) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body.to_string())));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::token::client::FetchError;
    use crate::token::{OAuthError, ResponseError};
    use http_body_util::BodyExt;
    use std::sync::Arc;
    use std::time::Duration;

    async fn parts(err: ProxyError) -> (StatusCode, http::HeaderMap, serde_json::Value) {
        let resp: Response<Full<Bytes>> = error_response(&err, Some("orders"));
        let (p, body) = resp.into_parts();
        let bytes = body.collect().await.unwrap().to_bytes();
        (p.status, p.headers, serde_json::from_slice(&bytes).unwrap())
    }

    #[tokio::test]
    async fn rejected_token_is_502_with_the_server_code() {
        let error = Arc::new(FetchError::Response(ResponseError::OAuth {
            status: 400,
            error: OAuthError {
                error: "invalid_scope".into(),
                error_description: Some("scope x is not allowed".into()),
                error_uri: None,
            },
        }));
        let (status, headers, body) = parts(ProxyError::Token(TokenFailure(TokenError::Fetch {
            error,
            retry_in: Duration::from_millis(300),
        })))
        .await;
        assert_eq!(status, StatusCode::BAD_GATEWAY);
        assert_eq!(headers[ERROR_HEADER], "token_rejected");
        assert!(headers.get(RETRY_AFTER).is_none());
        assert_eq!(body["error"], "token_rejected");
        assert_eq!(body["route"], "orders");
        assert!(
            body["error_description"]
                .as_str()
                .unwrap()
                .contains("invalid_scope")
        );
    }

    #[tokio::test]
    async fn unavailable_token_is_503_with_retry_after() {
        let error = Arc::new(FetchError::Transport("connection refused".into()));
        let (status, headers, body) = parts(ProxyError::Token(TokenFailure(TokenError::Fetch {
            error,
            retry_in: Duration::from_millis(1500),
        })))
        .await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(headers[RETRY_AFTER], "2");
        assert_eq!(body["error"], "token_unavailable");
    }

    #[tokio::test]
    async fn each_error_has_its_status() {
        for (err, status, code) in [
            (ProxyError::NoRoute, 404, "no_route"),
            (
                ProxyError::MethodNotAllowed("CONNECT".into()),
                405,
                "method_not_allowed",
            ),
            (ProxyError::BadRequest("bad"), 400, "bad_request"),
            (ProxyError::BadFraming("bad"), 400, "bad_request"),
            (ProxyError::Misdirected, 421, "misdirected_request"),
            (ProxyError::Forbidden("no"), 403, "forbidden"),
            (
                ProxyError::TargetNotAllowed("no"),
                403,
                "target_not_allowed",
            ),
            (
                ProxyError::RequestTimeout(Duration::from_secs(30)),
                408,
                "request_timeout",
            ),
            (
                ProxyError::UpstreamUnavailable("refused".into()),
                502,
                "upstream_unavailable",
            ),
            (
                ProxyError::UpstreamTimeout(Duration::from_secs(1)),
                504,
                "upstream_timeout",
            ),
        ] {
            let (s, h, b) = parts(err).await;
            assert_eq!(s.as_u16(), status);
            assert_eq!(h[ERROR_HEADER], code);
            assert_eq!(b["error"], code);
        }
    }
}
