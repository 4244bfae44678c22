//! The loopback token endpoint (docs/spec.md, "Token endpoint on loopback"): an OAuth 2.0
//! token endpoint that tools which only accept a token URL (Prometheus' `oauth2` block,
//! Grafana plugins, any OAuth library) point at, answered from the same token cache the proxy
//! uses.
//!
//! `POST /oauth2/token`, `application/x-www-form-urlencoded`, `grant_type=client_credentials`
//! (RFC 6749 §4.4), `scope`, `audience` and `resource` (RFC 8707), `client_id` naming the
//! client. No client authentication: the listener is loopback only (validation refuses
//! anything else), so the caller is in the pod; a `client_secret` or Basic password a library
//! sends anyway is ignored, a Basic user name is read as the `client_id`.
//!
//! Invariants:
//! - the access token appears in the response body only: never in a log event, an error or a
//!   `Debug` output;
//! - every request is bounded: the body by [`MAX_BODY_BYTES`] and `body_read_timeout`, the
//!   parameters by [`MAX_SCOPES`] and [`MAX_AUDIENCES`], the wait for a token by the token
//!   cache's wait bound; connections by the shared accept loop (`accept.rs`);
//! - deciding what a request asks for ([`parse_form`], [`decide`]) is pure; nothing is fetched
//!   for a request that is refused.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;
use http::header::{ALLOW, CACHE_CONTROL, CONNECTION, CONTENT_LENGTH, CONTENT_TYPE, PRAGMA};
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::Incoming;
use serde_json::json;
use tokio::time::Instant;

use crate::config::TokenEndpointConfig;
use crate::config::pattern::{Pattern, allowed};
use crate::token::TokenKey;
use crate::token::cache::{Lease, TokenError};
use crate::token::registry::{Clients, DEFAULT_CLIENT};

/// The one path served.
pub(crate) const PATH: &str = "/oauth2/token";
/// Largest request body read: a token request is a few hundred bytes.
pub(crate) const MAX_BODY_BYTES: usize = 8192;
/// Most scope values one request may name.
pub(crate) const MAX_SCOPES: usize = 32;
/// Most audience values (`audience` and `resource` together) one request may name.
pub(crate) const MAX_AUDIENCES: usize = 16;
/// Most form parameters read from one body.
const MAX_PARAMS: usize = 64;

/// An RFC 6749 §5.2 error, with the HTTP status it is sent with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Refusal {
    pub(crate) status: StatusCode,
    /// The RFC 6749 / RFC 8707 error code.
    pub(crate) error: &'static str,
    pub(crate) description: String,
}

impl Refusal {
    fn new(status: StatusCode, error: &'static str, description: impl Into<String>) -> Refusal {
        Refusal {
            status,
            error,
            description: description.into(),
        }
    }

    fn invalid_request(description: impl Into<String>) -> Refusal {
        Refusal::new(StatusCode::BAD_REQUEST, "invalid_request", description)
    }
}

/// What a request is allowed to get: a client's token for one (scope set, audience set).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Grant {
    pub(crate) client: String,
    pub(crate) key: TokenKey,
}

/// The allow-lists a request is checked against.
#[derive(Debug, Clone)]
pub(crate) struct Policy {
    allow_scopes: Vec<Pattern>,
    allow_audiences: Vec<Pattern>,
    /// Empty: every client.
    clients: Vec<String>,
}

impl Policy {
    /// From a validated `[token_endpoint]` (patterns that do not parse were refused there; were
    /// one to slip through, it allows nothing).
    pub(crate) fn from_config(c: &TokenEndpointConfig) -> Policy {
        let parse = |l: &[String]| l.iter().filter_map(|s| Pattern::parse(s).ok()).collect();
        Policy {
            allow_scopes: parse(&c.allow_scopes),
            allow_audiences: parse(&c.allow_audiences),
            clients: c.clients.clone(),
        }
    }

    fn serves(&self, client: &str) -> bool {
        self.clients.is_empty() || self.clients.iter().any(|c| c == client)
    }
}

/// Pure: decodes an `application/x-www-form-urlencoded` body strictly (the WHATWG rules, but a
/// `%` not followed by two hex digits, or a name or value that is not UTF-8 once decoded, is an
/// error instead of being passed through or replaced). Empty pairs are skipped.
pub(crate) fn parse_form(body: &[u8]) -> Result<Vec<(String, String)>, Refusal> {
    fn decode(part: &[u8]) -> Option<String> {
        let mut out = Vec::with_capacity(part.len());
        let mut i = 0;
        while i < part.len() {
            match part[i] {
                b'+' => out.push(b' '),
                b'%' => {
                    let hex = part.get(i + 1..i + 3)?;
                    let hex = std::str::from_utf8(hex).ok()?;
                    out.push(u8::from_str_radix(hex, 16).ok()?);
                    i += 2;
                }
                c => out.push(c),
            }
            i += 1;
        }
        String::from_utf8(out).ok()
    }
    let mut params = Vec::new();
    for pair in body.split(|&b| b == b'&').filter(|p| !p.is_empty()) {
        if params.len() == MAX_PARAMS {
            return Err(Refusal::invalid_request(format!(
                "more than {MAX_PARAMS} form parameters"
            )));
        }
        let (name, value) = match pair.iter().position(|&b| b == b'=') {
            Some(i) => (&pair[..i], &pair[i + 1..]),
            None => (pair, &b""[..]),
        };
        match (decode(name), decode(value)) {
            (Some(n), Some(v)) => params.push((n, v)),
            _ => {
                return Err(Refusal::invalid_request(
                    "malformed form encoding (a bad %-escape or a non-UTF-8 value)",
                ));
            }
        }
    }
    Ok(params)
}

/// The user name of an RFC 6749 §2.3.1 Basic `Authorization` header (form-encoded in the
/// base64 text); the password is ignored. `Ok(None)` for no header or another scheme.
pub(crate) fn basic_user(headers: &HeaderMap) -> Result<Option<String>, Refusal> {
    let Some(value) = headers.get(http::header::AUTHORIZATION) else {
        return Ok(None);
    };
    let malformed = || Refusal::invalid_request("malformed Basic credentials");
    let text = value.to_str().map_err(|_| malformed())?;
    let Some((scheme, rest)) = text.split_once(' ') else {
        return Ok(None);
    };
    if !scheme.eq_ignore_ascii_case("basic") {
        return Ok(None);
    }
    let raw = STANDARD.decode(rest.trim()).map_err(|_| malformed())?;
    let user = raw.split(|&b| b == b':').next().unwrap_or_default();
    let mut decoded = parse_form(&[b"u=", user].concat()).map_err(|_| malformed())?;
    Ok(decoded.pop().map(|(_, v)| v).filter(|v| !v.is_empty()))
}

/// Pure: checks a request's parameters (RFC 6749 §4.4.2, RFC 8707 §2) against the policy, in
/// the order of RFC 6749 §5.2: a malformed request, then the client, the grant type, the
/// scopes, the audiences. `known` says whether a client of that name exists.
///
/// - Parameters sent without a value count as omitted (§3.1); unknown ones are ignored (§3.2).
/// - `grant_type`, `scope` and `client_id` may appear once (§3.1); `audience` and `resource`
///   may repeat, and an `audience` value may list several audiences separated by spaces. Both
///   name audiences: the token is requested for their union (sent to the authorization server
///   as the client's `audience_param` says).
/// - The client is `client_id`, else the Basic user name, else [`DEFAULT_CLIENT`]; both given
///   and different is `invalid_request`.
pub(crate) fn decide(
    params: &[(String, String)],
    basic_user: Option<&str>,
    policy: &Policy,
    known: impl Fn(&str) -> bool,
) -> Result<Grant, Refusal> {
    let once = |name: &str| -> Result<Option<&str>, Refusal> {
        let mut values = params
            .iter()
            .filter(|(n, v)| n == name && !v.is_empty())
            .map(|(_, v)| v.as_str());
        let first = values.next();
        if values.next().is_some() {
            return Err(Refusal::invalid_request(format!(
                "{name} must not be repeated"
            )));
        }
        Ok(first)
    };
    let grant_type = once("grant_type")?;
    let scope = once("scope")?;
    let client_id = once("client_id")?;
    let mut audiences: Vec<&str> = Vec::new();
    for (n, v) in params {
        match n.as_str() {
            "audience" => audiences.extend(v.split(' ').filter(|a| !a.is_empty())),
            "resource" if !v.is_empty() => {
                // RFC 8707 §2: an absolute URI without a fragment.
                let ok = url::Url::parse(v).is_ok_and(|u| u.fragment().is_none());
                if !ok {
                    return Err(Refusal::new(
                        StatusCode::BAD_REQUEST,
                        "invalid_target",
                        "resource must be an absolute URI without a fragment",
                    ));
                }
                audiences.push(v);
            }
            _ => {}
        }
    }
    let scopes: Vec<&str> = scope
        .map(|s| s.split(' ').filter(|s| !s.is_empty()).collect())
        .unwrap_or_default();
    let Some(grant_type) = grant_type else {
        return Err(Refusal::invalid_request("grant_type is required"));
    };
    if scopes.len() > MAX_SCOPES {
        return Err(Refusal::invalid_request(format!(
            "more than {MAX_SCOPES} scopes"
        )));
    }
    if audiences.len() > MAX_AUDIENCES {
        return Err(Refusal::invalid_request(format!(
            "more than {MAX_AUDIENCES} audiences"
        )));
    }
    let client = match (client_id, basic_user) {
        (Some(a), Some(b)) if a != b => {
            return Err(Refusal::invalid_request(
                "client_id and the Basic user name differ",
            ));
        }
        (Some(c), _) | (None, Some(c)) => c,
        (None, None) => DEFAULT_CLIENT,
    };
    if !known(client) || !policy.serves(client) {
        return Err(Refusal::new(
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            "unknown client, or not served by this endpoint",
        ));
    }
    if grant_type != "client_credentials" {
        return Err(Refusal::new(
            StatusCode::BAD_REQUEST,
            "unsupported_grant_type",
            "only client_credentials is supported",
        ));
    }
    if let Some(s) = scopes.iter().find(|s| !allowed(&policy.allow_scopes, s)) {
        return Err(Refusal::new(
            StatusCode::BAD_REQUEST,
            "invalid_scope",
            format!("scope {:?} is not allowed", crate::token::sanitize(s, 128)),
        ));
    }
    if let Some(a) = audiences
        .iter()
        .find(|a| !allowed(&policy.allow_audiences, a))
    {
        return Err(Refusal::new(
            StatusCode::BAD_REQUEST,
            "invalid_target",
            format!(
                "audience {:?} is not allowed",
                crate::token::sanitize(a, 128)
            ),
        ));
    }
    Ok(Grant {
        client: client.to_owned(),
        key: TokenKey::new(&scopes, &audiences),
    })
}

/// Pure: the RFC 6749 §5.1 body for `lease` at `now`. `expires_in` is the token's remaining
/// usable life in whole seconds (rounded down, so a caller never holds it past the moment the
/// sidecar itself stops sending it), never more than the lifetime the server granted; `scope`
/// is the granted set when the server named it, else the requested one, absent when empty.
pub(crate) fn success_body(lease: &Lease, key: &TokenKey, now: Instant) -> serde_json::Value {
    let t = &lease.token;
    let expires_in = t
        .usable_until
        .saturating_duration_since(now)
        .min(t.token.lifetime)
        .as_secs();
    let scope = t.token.scope.clone().or_else(|| key.scope_param());
    let mut body = json!({
        "access_token": t.token.secret().expose(),
        "token_type": "Bearer",
        "expires_in": expires_in,
    });
    if let Some(s) = scope.filter(|s| !s.is_empty()) {
        body["scope"] = json!(s);
    }
    body
}

/// The endpoint: the clients whose caches it reads and the policy it applies.
pub(crate) struct TokenEndpoint {
    clients: Arc<Clients>,
    policy: Policy,
    body_read_timeout: Duration,
    access_log: bool,
}

impl TokenEndpoint {
    pub(crate) fn new(
        clients: Arc<Clients>,
        config: &TokenEndpointConfig,
        access_log: bool,
    ) -> TokenEndpoint {
        TokenEndpoint {
            clients,
            policy: Policy::from_config(config),
            body_read_timeout: config.body_read_timeout,
            access_log,
        }
    }

    pub(crate) async fn handle(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let started = Instant::now();
        let method = req.method().clone();
        let path_ok = req.uri().path() == PATH;
        let (resp, client, cached) = match self.answer(req).await {
            Ok((body, client, cached)) => (ok_response(&body), Some(client), Some(cached)),
            Err(r) => (refusal_response(&r), None, None),
        };
        if self.access_log {
            let status = resp.status().as_u16();
            tracing::info!(
                target: "token_sidecar::access",
                listener = "token_endpoint",
                method = %method,
                path = if path_ok { PATH } else { "-" },
                status,
                client = client.as_deref().unwrap_or("-"),
                duration_ms = started.elapsed().as_secs_f64() * 1000.0,
                token = match cached {
                    Some(true) => "cached",
                    Some(false) => "fetched",
                    None => "-",
                },
                "token request"
            );
        }
        resp
    }

    /// The success body with the client's name and whether the token came from the cache, or
    /// the refusal.
    async fn answer(
        &self,
        req: Request<Incoming>,
    ) -> Result<(serde_json::Value, String, bool), Refusal> {
        if req.uri().path() != PATH {
            return Err(Refusal::new(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("the token endpoint is POST {PATH}"),
            ));
        }
        if req.method() != Method::POST {
            return Err(Refusal::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "invalid_request",
                "the token endpoint takes POST only",
            ));
        }
        let (parts, body) = req.into_parts();
        if !is_form(&parts.headers) {
            return Err(Refusal::invalid_request(
                "Content-Type must be application/x-www-form-urlencoded",
            ));
        }
        let too_large = || {
            Refusal::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request",
                format!("request body larger than {MAX_BODY_BYTES} bytes"),
            )
        };
        let announced = parts
            .headers
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        if announced.is_some_and(|n| n > MAX_BODY_BYTES as u64) {
            return Err(too_large());
        }
        let read = tokio::time::timeout(
            self.body_read_timeout,
            Limited::new(body, MAX_BODY_BYTES).collect(),
        )
        .await;
        let body = match read {
            Err(_) => {
                return Err(Refusal::new(
                    StatusCode::REQUEST_TIMEOUT,
                    "invalid_request",
                    "request body not received in time",
                ));
            }
            Ok(Err(e)) if e.downcast_ref::<LengthLimitError>().is_some() => {
                return Err(too_large());
            }
            Ok(Err(_)) => return Err(Refusal::invalid_request("request body not received")),
            Ok(Ok(b)) => b.to_bytes(),
        };
        let params = parse_form(&body)?;
        let user = basic_user(&parts.headers)?;
        let grant = decide(&params, user.as_deref(), &self.policy, |c| {
            self.clients.get(c).is_some()
        })?;
        let Some(client) = self.clients.get(&grant.client) else {
            // `decide` checked it exists.
            return Err(Refusal::new(
                StatusCode::UNAUTHORIZED,
                "invalid_client",
                "unknown client",
            ));
        };
        let slot = client.slot(grant.key.clone());
        match slot.token().await {
            Ok(lease) => Ok((
                success_body(&lease, &grant.key, Instant::now()),
                grant.client,
                lease.cached,
            )),
            Err(e) => Err(unavailable(&e)),
        }
    }
}

/// No token: the authorization server failed or refused, or the wait bound passed.
fn unavailable(e: &TokenError) -> Refusal {
    let description = match e {
        TokenError::Fetch { retry_in, .. } => format!(
            "the authorization server did not issue a token (see the sidecar's log); retry in {}s",
            retry_in.as_secs().max(1)
        ),
        TokenError::Timeout(d) => format!(
            "no token from the authorization server within {}",
            humantime::format_duration(*d)
        ),
    };
    Refusal::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "temporarily_unavailable",
        description,
    )
}

/// Whether the request's `Content-Type` is `application/x-www-form-urlencoded` (parameters
/// such as `charset` allowed).
fn is_form(headers: &HeaderMap) -> bool {
    headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|m| {
            m.trim()
                .eq_ignore_ascii_case("application/x-www-form-urlencoded")
        })
}

/// RFC 6749 §5.1 / §5.2: JSON, never cached.
fn json(status: StatusCode, body: &serde_json::Value) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body.to_string())));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/json;charset=UTF-8"),
    );
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(PRAGMA, HeaderValue::from_static("no-cache"));
    resp
}

fn ok_response(body: &serde_json::Value) -> Response<Full<Bytes>> {
    json(StatusCode::OK, body)
}

fn refusal_response(r: &Refusal) -> Response<Full<Bytes>> {
    let mut resp = json(
        r.status,
        &json!({"error": r.error, "error_description": r.description}),
    );
    let h = resp.headers_mut();
    match r.status {
        // §5.2: a 401 names the scheme a client may authenticate with.
        StatusCode::UNAUTHORIZED => {
            h.insert(
                http::header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"token-sidecar\""),
            );
        }
        StatusCode::METHOD_NOT_ALLOWED => {
            h.insert(ALLOW, HeaderValue::from_static("POST"));
        }
        // The body may be partly unread: the connection cannot carry another request.
        StatusCode::PAYLOAD_TOO_LARGE | StatusCode::REQUEST_TIMEOUT => {
            h.insert(CONNECTION, HeaderValue::from_static("close"));
        }
        _ => {}
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(scopes: &[&str], audiences: &[&str], clients: &[&str]) -> Policy {
        let list = |l: &[&str]| l.iter().map(|s| s.to_string()).collect();
        let c = TokenEndpointConfig {
            allow_scopes: list(scopes),
            allow_audiences: list(audiences),
            clients: list(clients),
            ..TokenEndpointConfig::default()
        };
        Policy::from_config(&c)
    }

    fn form(body: &str) -> Vec<(String, String)> {
        parse_form(body.as_bytes()).unwrap()
    }

    fn known(c: &str) -> bool {
        c == DEFAULT_CLIENT || c == "billing"
    }

    fn err(body: &str, user: Option<&str>, p: &Policy) -> &'static str {
        decide(&form(body), user, p, known).unwrap_err().error
    }

    #[test]
    fn a_form_decodes_strictly() {
        assert_eq!(
            form("a=b+c&&d=%2Fx%20y&e"),
            vec![
                ("a".into(), "b c".into()),
                ("d".into(), "/x y".into()),
                ("e".into(), String::new())
            ]
        );
        for bad in ["a=%", "a=%4", "a=%zz", "a=%ff", "%c3=x", "a=%c3%28"] {
            let e = parse_form(bad.as_bytes()).unwrap_err();
            assert_eq!(e.error, "invalid_request", "{bad}");
        }
        let many = "a=b&".repeat(MAX_PARAMS + 1);
        assert_eq!(
            parse_form(many.as_bytes()).unwrap_err().error,
            "invalid_request"
        );
    }

    #[test]
    fn a_request_within_the_allow_lists_gets_its_key() {
        let p = policy(&["orders:*"], &["https://*.example.com/"], &[]);
        let g = decide(
            &form(
                "grant_type=client_credentials&scope=orders:write+orders:read\
                 &audience=https%3A%2F%2Fa.example.com%2F+https%3A%2F%2Fb.example.com%2F\
                 &resource=https%3A%2F%2Fa.example.com%2F&client_secret=ignored",
            ),
            None,
            &p,
            known,
        )
        .unwrap();
        assert_eq!(g.client, DEFAULT_CLIENT);
        assert_eq!(
            g.key,
            TokenKey::new(
                &["orders:read", "orders:write"],
                &["https://a.example.com/", "https://b.example.com/"]
            )
        );
        // Nothing asked for: the empty sets, allowed even by empty allow-lists.
        let g = decide(
            &form("grant_type=client_credentials&scope="),
            None,
            &policy(&[], &[], &[]),
            known,
        )
        .unwrap();
        assert_eq!(g.key, TokenKey::new::<&str, &str>(&[], &[]));
    }

    #[test]
    fn each_refusal_has_its_rfc_code_in_rfc_order() {
        let p = policy(&["orders:read"], &["api://orders"], &["default"]);
        let gt = "grant_type=client_credentials";
        assert_eq!(err("scope=orders:read", None, &p), "invalid_request");
        assert_eq!(
            err(&format!("{gt}&{gt}"), None, &p),
            "invalid_request",
            "repeated grant_type"
        );
        assert_eq!(
            err(&format!("{gt}&scope=a&scope=b"), None, &p),
            "invalid_request"
        );
        assert_eq!(
            err("grant_type=password", None, &p),
            "unsupported_grant_type"
        );
        assert_eq!(
            err(&format!("{gt}&client_id=nobody"), None, &p),
            "invalid_client"
        );
        // Known, but not served by the endpoint.
        assert_eq!(
            err(&format!("{gt}&client_id=billing"), None, &p),
            "invalid_client"
        );
        assert_eq!(err(gt, Some("billing"), &p), "invalid_client");
        assert_eq!(
            err(&format!("{gt}&client_id=default"), Some("billing"), &p),
            "invalid_request"
        );
        // A bad client goes before a bad grant type (§5.2 order), and refuses before scopes.
        assert_eq!(
            err("grant_type=password&client_id=nobody", None, &p),
            "invalid_client"
        );
        assert_eq!(
            err(&format!("{gt}&scope=orders:read+orders:write"), None, &p),
            "invalid_scope"
        );
        assert_eq!(
            err(&format!("{gt}&audience=api://billing"), None, &p),
            "invalid_target"
        );
        assert_eq!(
            err(
                &format!("{gt}&resource=api://orders&resource=api://x"),
                None,
                &p
            ),
            "invalid_target"
        );
        assert_eq!(
            err(&format!("{gt}&resource=not-a-uri"), None, &p),
            "invalid_target"
        );
        let many: String = (0..=MAX_AUDIENCES)
            .map(|i| format!("&audience=api://a{i}"))
            .collect();
        assert_eq!(err(&format!("{gt}{many}"), None, &p), "invalid_request");
        // Empty allow-lists allow no value at all.
        let none = policy(&[], &[], &[]);
        assert_eq!(err(&format!("{gt}&scope=x"), None, &none), "invalid_scope");
        assert_eq!(
            err(&format!("{gt}&audience=api://orders"), None, &none),
            "invalid_target"
        );
    }

    #[test]
    fn the_basic_user_names_the_client_and_the_password_is_ignored() {
        let mut h = HeaderMap::new();
        assert_eq!(basic_user(&h).unwrap(), None);
        // RFC 6749 §2.3.1: both parts form-encoded before base64.
        let creds = STANDARD.encode("my%20client:any+secret");
        h.insert(
            http::header::AUTHORIZATION,
            HeaderValue::from_str(&format!("Basic {creds}")).unwrap(),
        );
        assert_eq!(basic_user(&h).unwrap().as_deref(), Some("my client"));
        h.insert(
            http::header::AUTHORIZATION,
            HeaderValue::from_static("Bearer abc"),
        );
        assert_eq!(basic_user(&h).unwrap(), None);
        h.insert(
            http::header::AUTHORIZATION,
            HeaderValue::from_static("Basic !!!"),
        );
        assert_eq!(basic_user(&h).unwrap_err().error, "invalid_request");
    }

    #[test]
    fn only_form_content_types_are_accepted() {
        let mut h = HeaderMap::new();
        assert!(!is_form(&h));
        for (ct, ok) in [
            ("application/x-www-form-urlencoded", true),
            ("Application/X-WWW-Form-Urlencoded; charset=UTF-8", true),
            ("application/json", false),
            ("multipart/form-data; boundary=x", false),
        ] {
            h.insert(CONTENT_TYPE, HeaderValue::from_static(ct));
            assert_eq!(is_form(&h), ok, "{ct}");
        }
    }
}
