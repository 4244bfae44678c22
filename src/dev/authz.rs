//! The embedded development authorization server used by `token-sidecar dev`.
//!
//! It is small but strict: it implements exactly what the sidecar needs, the way a production
//! server checks it. `POST /oauth2/token` takes the `client_credentials` grant with
//! `private_key_jwt` only and verifies the assertion as RFC 7523 §3 says (signature against the
//! registered key, `iss` = `sub` = client_id, `aud` = the token endpoint URL, `exp` in the future,
//! `iat` not in the future, a bounded lifetime, and a `jti` never seen before). Requested scopes
//! and audiences (`audience`, space-separated, or repeated `resource`) must be on the client's
//! allow-list. Tokens are RFC 9068 JWT access tokens signed with a key generated at start-up and
//! published at `/.well-known/jwks.json`.
//!
//! It can also trust a federated issuer ([`DevFederation`]), the way Entra ID's federated
//! credentials and Keycloak's federated client authentication do: an assertion whose `iss` is
//! exactly a configured issuer and whose `sub` is exactly the configured subject (a Kubernetes
//! service account, a SPIFFE ID) authenticates the client it is mapped to, when it verifies
//! against that issuer's JWKS (a file or URL, read at start), its `aud` is the token endpoint
//! URL or the configured audience, and `exp` is in the future (no leeway). Anything else is
//! 401 `invalid_client`. Such assertions are the platform's own tokens, reused until rotated,
//! so no `jti` is required and none is remembered.
//!
//! For development only: it keeps everything in memory and binds loopback addresses only.

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::util::unix_now;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{DecodingKey, Validation};
use serde_json::json;
use tokio::net::TcpListener;

use crate::key::{Algorithm, SigningKey};
use crate::server::accept::spawn_plain;
use crate::token::assertion::AssertionClaims;
use crate::token::client::ASSERTION_TYPE;

/// Longest assertion lifetime accepted (`exp - iat`); Hydra and most servers bound it too.
const MAX_ASSERTION_LIFETIME: u64 = 3600;

/// A client the server knows.
#[derive(Debug, Clone)]
pub struct DevClient {
    pub client_id: String,
    /// Its public JWK Set (what `token-sidecar jwks` prints).
    pub jwks: serde_json::Value,
    /// Scopes it may request.
    pub scopes: BTreeSet<String>,
    /// Audiences it may request.
    pub audiences: BTreeSet<String>,
}

/// A federated credential: assertions `issuer` signed about `subject` authenticate `client_id`.
#[derive(Debug, Clone)]
pub struct DevFederation {
    /// The exact `iss` accepted (e.g. a cluster's service-account issuer URL).
    pub issuer: String,
    /// The exact `sub` accepted (e.g. `system:serviceaccount:ns:name`).
    pub subject: String,
    /// The client it authenticates; must be one of the server's clients.
    pub client_id: String,
    /// The issuer's public keys: a JWK Set file, or an `http(s)://` URL serving one; read once
    /// at start.
    pub jwks: String,
    /// An `aud` accepted besides the token endpoint URL (what the platform token is minted for,
    /// e.g. `api://AzureADTokenExchange`).
    pub audience: Option<String>,
}

/// The server's configuration.
#[derive(Debug, Clone)]
pub struct DevServerConfig {
    pub listen: SocketAddr,
    pub clients: Vec<DevClient>,
    /// Federated issuers trusted for client authentication (may be empty).
    pub federations: Vec<DevFederation>,
    /// Lifetime of issued access tokens.
    pub token_ttl: Duration,
}

struct State {
    issuer: String,
    token_url: String,
    key: SigningKey,
    clients: HashMap<String, DevClient>,
    /// Each federated credential with its issuer's JWK Set, as read at start.
    federations: Vec<(DevFederation, serde_json::Value)>,
    token_ttl: Duration,
    /// jti → exp: an assertion id is refused until its assertion has expired.
    seen_jti: Mutex<HashMap<String, u64>>,
    token_requests: AtomicU64,
    /// The `jti` of the last [`MAX_RECORDED`] federated assertions accepted (`-` without one),
    /// so tests can tell which version of a rotating platform token reached the server.
    federated_jtis: Mutex<std::collections::VecDeque<String>>,
    /// Seconds added to the system clock: simulates a server whose clock is off (tests).
    clock_offset: AtomicI64,
}

/// A running development authorization server; stops when dropped.
pub struct DevServer {
    pub addr: SocketAddr,
    state: Arc<State>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for DevServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DevServerError {
    #[error("the development authorization server only binds loopback addresses, not {0}")]
    NotLoopback(SocketAddr),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot create the signing key: {0}")]
    Key(String),
    #[error("federated issuer {issuer}: cannot read its JWKS {jwks}: {reason}")]
    Jwks {
        issuer: String,
        jwks: String,
        reason: String,
    },
}

/// Federated assertions recorded (their `jti` only) for [`DevServer::federated_jtis`].
const MAX_RECORDED: usize = 64;

/// Most bytes of a federated issuer's JWK Set read (a set holds a few keys of a few KiB).
const MAX_JWKS_BYTES: usize = 1024 * 1024;

/// Reads a federated issuer's JWK Set from a file or URL, bounded in size and time.
async fn load_jwks(f: &DevFederation) -> Result<serde_json::Value, DevServerError> {
    let fail = |reason: String| DevServerError::Jwks {
        issuer: f.issuer.clone(),
        // A URL may carry a token in its query: shown redacted like every URL (util.rs).
        jwks: if f.jwks.contains("://") {
            crate::util::redact_url(&f.jwks)
        } else {
            f.jwks.clone()
        },
        reason,
    };
    let bytes: Vec<u8> = if f.jwks.starts_with("http://") || f.jwks.starts_with("https://") {
        let client = reqwest::Client::builder()
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| fail(crate::util::reqwest_error(e)))?;
        let resp = client
            .get(&f.jwks)
            .send()
            .await
            .map_err(|e| fail(crate::util::reqwest_error(e)))?;
        if !resp.status().is_success() {
            return Err(fail(format!("status {}", resp.status())));
        }
        crate::util::read_response_bounded(resp, MAX_JWKS_BYTES)
            .await
            .map_err(|e| match e {
                crate::util::ResponseReadError::TooLarge => {
                    fail(format!("larger than {MAX_JWKS_BYTES} bytes"))
                }
                crate::util::ResponseReadError::Transport(t) => fail(t),
            })?
    } else {
        crate::util::read_bounded(std::path::Path::new(&f.jwks), MAX_JWKS_BYTES as u64)
            .map_err(|e| fail(e.to_string()))?
            .to_vec()
    };
    let jwks: serde_json::Value =
        serde_json::from_slice(&bytes).map_err(|_| fail("not JSON".into()))?;
    if !jwks["keys"].is_array() {
        return Err(fail("not a JWK Set (no \"keys\" array)".into()));
    }
    Ok(jwks)
}

impl DevServer {
    pub async fn start(cfg: DevServerConfig) -> Result<DevServer, DevServerError> {
        if !cfg.listen.ip().is_loopback() {
            return Err(DevServerError::NotLoopback(cfg.listen));
        }
        let listener =
            TcpListener::bind(cfg.listen)
                .await
                .map_err(|source| DevServerError::Bind {
                    addr: cfg.listen,
                    source,
                })?;
        let addr = listener
            .local_addr()
            .map_err(|source| DevServerError::Bind {
                addr: cfg.listen,
                source,
            })?;
        let (_, key) = SigningKey::generate(Algorithm::ES256)
            .map_err(|e| DevServerError::Key(e.to_string()))?;
        let mut federations = Vec::with_capacity(cfg.federations.len());
        for f in cfg.federations {
            let jwks = load_jwks(&f).await?;
            federations.push((f, jwks));
        }
        let issuer = format!("http://{addr}");
        let state = Arc::new(State {
            token_url: format!("{issuer}/oauth2/token"),
            issuer,
            key,
            clients: cfg
                .clients
                .into_iter()
                .map(|c| (c.client_id.clone(), c))
                .collect(),
            federations,
            token_ttl: cfg.token_ttl,
            seen_jti: Mutex::new(HashMap::new()),
            token_requests: AtomicU64::new(0),
            federated_jtis: Mutex::new(std::collections::VecDeque::new()),
            clock_offset: AtomicI64::new(0),
        });
        let s = state.clone();
        let task = spawn_plain(listener, move |req| {
            let s = s.clone();
            async move { handle(&s, req).await }
        });
        Ok(DevServer { addr, state, task })
    }

    pub fn token_url(&self) -> &str {
        &self.state.token_url
    }

    pub fn jwks_url(&self) -> String {
        format!("{}/.well-known/jwks.json", self.state.issuer)
    }

    /// Runs the server's clock `secs` ahead of (positive) or behind (negative) the system clock,
    /// to test how clients cope with clock skew.
    pub fn set_clock_offset(&self, secs: i64) {
        self.state.clock_offset.store(secs, Ordering::SeqCst);
    }

    /// The `jti` claims of the federated assertions accepted, oldest first (the last 64).
    pub fn federated_jtis(&self) -> Vec<String> {
        let seen = self.state.federated_jtis.lock();
        seen.unwrap_or_else(|e| e.into_inner())
            .iter()
            .cloned()
            .collect()
    }

    /// Token requests received so far (valid or not).
    pub fn token_requests(&self) -> u64 {
        self.state.token_requests.load(Ordering::SeqCst)
    }
}

fn respond(status: StatusCode, body: serde_json::Value) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(
        "content-type",
        http::HeaderValue::from_static("application/json"),
    );
    h.insert("cache-control", http::HeaderValue::from_static("no-store"));
    r
}

/// An RFC 6749 §5.2 error response.
fn oauth_error(
    status: StatusCode,
    code: &str,
    description: impl Into<String>,
) -> Response<Full<Bytes>> {
    respond(
        status,
        json!({"error": code, "error_description": description.into()}),
    )
}

async fn handle(s: &State, req: Request<Incoming>) -> Response<Full<Bytes>> {
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/.well-known/openid-configuration")
        | (&Method::GET, "/.well-known/oauth-authorization-server") => respond(
            StatusCode::OK,
            json!({
                "issuer": s.issuer,
                "token_endpoint": s.token_url,
                "jwks_uri": format!("{}/.well-known/jwks.json", s.issuer),
                "grant_types_supported": ["client_credentials"],
                "token_endpoint_auth_methods_supported": ["private_key_jwt"],
                "token_endpoint_auth_signing_alg_values_supported":
                    crate::key::supported_list().split(' ').collect::<Vec<_>>(),
                "response_types_supported": [],
            }),
        ),
        (&Method::GET, "/.well-known/jwks.json") => {
            respond(StatusCode::OK, json!({ "keys": [s.key.public_jwk()] }))
        }
        (&Method::POST, "/oauth2/token") => {
            s.token_requests.fetch_add(1, Ordering::SeqCst);
            let body = match Limited::new(req.into_body(), 64 * 1024).collect().await {
                Ok(b) => b.to_bytes(),
                Err(_) => {
                    return oauth_error(
                        StatusCode::BAD_REQUEST,
                        "invalid_request",
                        "request body too large or unreadable",
                    );
                }
            };
            let now = unix_now().saturating_add_signed(s.clock_offset.load(Ordering::SeqCst));
            token(s, &body, now)
        }
        (_, "/oauth2/token") => oauth_error(
            StatusCode::METHOD_NOT_ALLOWED,
            "invalid_request",
            "use POST",
        ),
        _ => respond(StatusCode::NOT_FOUND, json!({"error": "not_found"})),
    }
}

/// The token endpoint: checks the request in RFC order, then issues a token. Pure in `now`.
fn token(s: &State, body: &[u8], now: u64) -> Response<Full<Bytes>> {
    match issue(s, body, now) {
        Ok(r) => r,
        Err(r) => oauth_error(r.status, r.code, r.description),
    }
}

/// An RFC 6749 §5.2 refusal before it becomes a response.
struct Refusal {
    status: StatusCode,
    code: &'static str,
    description: String,
}

fn refuse(status: StatusCode, code: &'static str, description: impl Into<String>) -> Refusal {
    Refusal {
        status,
        code,
        description: description.into(),
    }
}

fn issue(s: &State, body: &[u8], now: u64) -> Result<Response<Full<Bytes>>, Refusal> {
    let mut params: HashMap<String, Vec<String>> = HashMap::new();
    for (k, v) in url::form_urlencoded::parse(body) {
        params
            .entry(k.into_owned())
            .or_default()
            .push(v.into_owned());
    }
    let one = |k: &str| -> Result<Option<&str>, Refusal> {
        match params.get(k).map(Vec::as_slice) {
            None => Ok(None),
            Some([v]) => Ok(Some(v.as_str())),
            Some(_) => Err(refuse(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                format!("parameter {k} is repeated"),
            )),
        }
    };

    match one("grant_type")? {
        Some("client_credentials") => {}
        Some(_) => {
            return Err(refuse(
                StatusCode::BAD_REQUEST,
                "unsupported_grant_type",
                "only client_credentials is supported",
            ));
        }
        None => {
            return Err(refuse(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "grant_type is missing",
            ));
        }
    }

    // Client authentication (RFC 7523 §2.2 / §3, or a federated credential).
    let client = authenticate(
        s,
        one("client_assertion_type")?,
        one("client_assertion")?,
        one("client_id")?,
        now,
    )?;

    // What is asked for, against the client's allow-lists.
    let scopes: BTreeSet<String> = one("scope")?
        .unwrap_or("")
        .split(' ')
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect();
    if let Some(bad) = scopes.iter().find(|sc| !client.scopes.contains(*sc)) {
        return Err(refuse(
            StatusCode::BAD_REQUEST,
            "invalid_scope",
            format!("scope {bad:?} is not allowed for this client"),
        ));
    }
    let mut audiences: BTreeSet<String> = BTreeSet::new();
    if let Some(a) = one("audience")? {
        audiences.extend(a.split(' ').filter(|s| !s.is_empty()).map(str::to_owned));
    }
    if let Some(rs) = params.get("resource") {
        audiences.extend(rs.iter().cloned());
    }
    if let Some(bad) = audiences.iter().find(|a| !client.audiences.contains(*a)) {
        return Err(refuse(
            StatusCode::BAD_REQUEST,
            "invalid_target",
            format!("audience {bad:?} is not allowed for this client"),
        ));
    }

    let ttl = s.token_ttl.as_secs().max(1);
    let scope = scopes.iter().cloned().collect::<Vec<_>>().join(" ");
    let aud: serde_json::Value = match audiences.len() {
        0 => serde_json::Value::Null,
        1 => json!(audiences.iter().next()),
        _ => json!(audiences),
    };
    let mut at = json!({
        "iss": s.issuer,
        "sub": client.client_id,
        "client_id": client.client_id,
        "iat": now,
        "exp": now + ttl,
        "jti": crate::token::assertion::new_jti(),
        "scope": scope,
    });
    if !aud.is_null() {
        at["aud"] = aud;
    }
    let access_token = s.key.sign_typed("at+jwt", &at).map_err(|_| {
        refuse(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            "cannot sign the access token",
        )
    })?;
    Ok(respond(
        StatusCode::OK,
        json!({
            "access_token": access_token.expose(),
            "token_type": "Bearer",
            "expires_in": ttl,
            "scope": scope,
        }),
    ))
}

/// The jwt-spiffe assertion type (SPIFFE JWT-SVID client authentication), accepted from a
/// federated issuer only.
const SPIFFE_ASSERTION_TYPE: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-spiffe";

/// Which client the request authenticates as, or why none.
fn authenticate<'s>(
    s: &'s State,
    assertion_type: Option<&str>,
    assertion: Option<&str>,
    form_client_id: Option<&str>,
    now: u64,
) -> Result<&'s DevClient, Refusal> {
    if !matches!(
        assertion_type,
        Some(ASSERTION_TYPE) | Some(SPIFFE_ASSERTION_TYPE)
    ) {
        return Err(refuse(
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            "client_assertion_type must be urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
        ));
    }
    let Some(assertion) = assertion else {
        return Err(refuse(
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            "client_assertion is missing",
        ));
    };
    // Before the signature is checked, only `iss` and `sub` are read (to find the federated
    // issuer or the client's key), and as a loose JSON value: a hostile assertion may lack any claim or give it any type, and must be
    // told so by the verified decode below, not by a parse error here.
    let unverified = match jsonwebtoken::dangerous::insecure_decode::<serde_json::Value>(assertion)
    {
        Ok(d) => d.claims,
        Err(_) => {
            return Err(refuse(
                StatusCode::UNAUTHORIZED,
                "invalid_client",
                "client_assertion is not a valid JWT",
            ));
        }
    };
    let claim = |k: &str| {
        unverified
            .get(k)
            .and_then(|v| v.as_str())
            .map(str::to_owned)
    };
    // A trusted federated issuer's assertion is checked against that issuer alone; its `iss`
    // is only a hint here, which the verification below must confirm.
    if let Some(iss) = claim("iss")
        && s.federations.iter().any(|(f, _)| f.issuer == iss)
    {
        return authenticate_federated(s, assertion, &iss, claim("sub"), form_client_id, now)
            .map_err(|why| refuse(StatusCode::UNAUTHORIZED, "invalid_client", why));
    }
    if assertion_type != Some(ASSERTION_TYPE) {
        return Err(refuse(
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            "client_assertion_type jwt-spiffe is accepted from a federated issuer only",
        ));
    }
    let unverified_sub = claim("sub");
    let form_client_id = form_client_id.map(str::to_owned);
    let Some(client_id) = unverified_sub.or_else(|| form_client_id.clone()) else {
        return Err(refuse(
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            "the assertion has no sub",
        ));
    };
    if let Some(form_id) = &form_client_id
        && *form_id != client_id
    {
        return Err(refuse(
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            "client_id does not match the assertion's sub",
        ));
    }
    let Some(client) = s.clients.get(&client_id) else {
        return Err(refuse(
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            "unknown client",
        ));
    };
    let claims = match verify_assertion(s, client, assertion, now) {
        Ok(c) => c,
        Err(why) => return Err(refuse(StatusCode::UNAUTHORIZED, "invalid_client", why)),
    };

    // Replay protection: remember each jti until its assertion expires.
    {
        let mut seen = s.seen_jti.lock().unwrap_or_else(|e| e.into_inner());
        seen.retain(|_, exp| *exp >= now);
        if seen.contains_key(&claims.jti) {
            return Err(refuse(
                StatusCode::UNAUTHORIZED,
                "invalid_client",
                "the assertion's jti was already used",
            ));
        }
        seen.insert(claims.jti.clone(), claims.exp);
    }
    Ok(client)
}

/// A federated credential's checks: exact `iss` and `sub`, the issuer's signature, `aud` = the
/// token endpoint or the credential's audience, `exp` in the future and `iat`/`nbf` not in it,
/// no leeway. Returns the client it maps to, or why the assertion is refused.
fn authenticate_federated<'s>(
    s: &'s State,
    assertion: &str,
    iss: &str,
    sub: Option<String>,
    form_client_id: Option<&str>,
    now: u64,
) -> Result<&'s DevClient, String> {
    let Some((fed, jwks)) = s
        .federations
        .iter()
        .find(|(f, _)| f.issuer == iss && sub.as_deref() == Some(f.subject.as_str()))
    else {
        return Err(format!(
            "no federated credential of issuer {iss} matches the assertion's sub"
        ));
    };
    let header = jsonwebtoken::decode_header(assertion)
        .map_err(|_| "the assertion header is invalid".to_string())?;
    let key =
        decoding_key(jwks, &header).map_err(|why| format!("federated issuer {iss}: {why}"))?;
    let mut audiences = vec![s.token_url.as_str()];
    audiences.extend(fed.audience.as_deref());
    let mut v = Validation::new(header.alg);
    v.leeway = 0;
    v.set_audience(&audiences);
    v.set_issuer(&[iss]);
    v.set_required_spec_claims(&["exp", "iss", "sub", "aud"]);
    let claims = jsonwebtoken::decode::<serde_json::Value>(assertion, &key, &v)
        .map_err(|e| match e.kind() {
            jsonwebtoken::errors::ErrorKind::InvalidSignature => {
                "the assertion's signature does not verify with the federated issuer's keys"
                    .to_string()
            }
            jsonwebtoken::errors::ErrorKind::ExpiredSignature => {
                "the assertion has expired".to_string()
            }
            jsonwebtoken::errors::ErrorKind::InvalidAudience => format!(
                "the assertion's aud must be {}{}",
                s.token_url,
                fed.audience
                    .as_deref()
                    .map(|a| format!(" or {a}"))
                    .unwrap_or_default()
            ),
            other => format!("the assertion is invalid: {other:?}"),
        })?
        .claims;
    let time = |k: &str| claims.get(k).and_then(serde_json::Value::as_u64);
    if time("exp").is_none_or(|exp| exp <= now) {
        return Err("the assertion has expired".into());
    }
    if time("iat").is_some_and(|iat| iat > now) || time("nbf").is_some_and(|nbf| nbf > now) {
        return Err("the assertion's iat or nbf is in the future".into());
    }
    if form_client_id.is_some_and(|id| id != fed.client_id) {
        return Err("client_id is not the client this federated credential maps to".into());
    }
    let client = s
        .clients
        .get(&fed.client_id)
        .ok_or_else(|| "the federated credential maps to an unknown client".to_string())?;
    let jti = claims.get("jti").and_then(|j| j.as_str()).unwrap_or("-");
    let mut seen = s.federated_jtis.lock().unwrap_or_else(|e| e.into_inner());
    if seen.len() == MAX_RECORDED {
        seen.pop_front();
    }
    seen.push_back(jti.to_string());
    Ok(client)
}

/// The key of `jwks` that `header` names (by `kid`, or the only key when there is no `kid`).
fn decoding_key(
    jwks: &serde_json::Value,
    header: &jsonwebtoken::Header,
) -> Result<DecodingKey, String> {
    let keys = jwks["keys"].as_array().cloned().unwrap_or_default();
    let jwk_value = keys
        .iter()
        .find(|k| match (&header.kid, k["kid"].as_str()) {
            (Some(want), Some(have)) => want == have,
            (None, _) => keys.len() == 1,
            _ => false,
        })
        .ok_or("no key matches the assertion's kid")?;
    let jwk: Jwk =
        serde_json::from_value(jwk_value.clone()).map_err(|_| "a key is not a valid JWK")?;
    if let Some(alg) = jwk_value["alg"].as_str()
        && crate::key::parse_alg(alg) != Some(header.alg)
    {
        return Err(format!(
            "the assertion is signed with {:?} but the key is for {alg}",
            header.alg
        ));
    }
    DecodingKey::from_jwk(&jwk).map_err(|_| "the key cannot verify signatures".to_string())
}

/// RFC 7523 §3 checks of a client assertion. Returns why it is refused.
fn verify_assertion(
    s: &State,
    client: &DevClient,
    assertion: &str,
    now: u64,
) -> Result<AssertionClaims, String> {
    let header = jsonwebtoken::decode_header(assertion)
        .map_err(|_| "the assertion header is invalid".to_string())?;
    let keys = client.jwks["keys"].as_array().cloned().unwrap_or_default();
    let jwk_value = keys
        .iter()
        .find(|k| match (&header.kid, k["kid"].as_str()) {
            (Some(want), Some(have)) => want == have,
            (None, _) => keys.len() == 1,
            _ => false,
        })
        .ok_or("no registered key matches the assertion's kid")?;
    let jwk: Jwk = serde_json::from_value(jwk_value.clone())
        .map_err(|_| "the registered key is not a valid JWK")?;
    if let Some(alg) = jwk_value["alg"].as_str()
        && crate::key::parse_alg(alg) != Some(header.alg)
    {
        return Err(format!(
            "the assertion is signed with {:?} but the registered key is for {alg}",
            header.alg
        ));
    }
    let key =
        DecodingKey::from_jwk(&jwk).map_err(|_| "the registered key cannot verify signatures")?;
    let mut v = Validation::new(header.alg);
    v.leeway = 0;
    v.set_audience(&[&s.token_url]);
    v.set_issuer(&[&client.client_id]);
    v.set_required_spec_claims(&["exp", "iss", "sub", "aud"]);
    let claims = jsonwebtoken::decode::<AssertionClaims>(assertion, &key, &v)
        .map_err(|e| match e.kind() {
            jsonwebtoken::errors::ErrorKind::InvalidSignature => {
                "the assertion's signature does not verify".to_string()
            }
            jsonwebtoken::errors::ErrorKind::ExpiredSignature => {
                "the assertion has expired".to_string()
            }
            jsonwebtoken::errors::ErrorKind::InvalidAudience => {
                format!("the assertion's aud must be {}", s.token_url)
            }
            jsonwebtoken::errors::ErrorKind::InvalidIssuer => {
                "the assertion's iss must be the client_id".to_string()
            }
            // A missing claim (`iat`, `jti`, …) or one of another type (an `aud` array: the
            // sidecar always sends one string) fails to deserialize into the shape the sidecar
            // signs; serde's message names the claim.
            jsonwebtoken::errors::ErrorKind::Json(e) => {
                format!("the assertion's claims are not what RFC 7523 requires: {e}")
            }
            other => format!("the assertion is invalid: {other:?}"),
        })?
        .claims;
    if claims.sub != client.client_id || claims.iss != client.client_id {
        return Err("the assertion's iss and sub must be the client_id".into());
    }
    if claims.exp <= now {
        return Err("the assertion has expired".into());
    }
    if claims.iat > now {
        return Err("the assertion's iat is in the future".into());
    }
    if claims.exp - claims.iat > MAX_ASSERTION_LIFETIME {
        return Err(format!(
            "the assertion may live at most {MAX_ASSERTION_LIFETIME} s"
        ));
    }
    if claims.jti.len() < 16 {
        return Err("the assertion needs a jti of at least 16 characters".into());
    }
    Ok(claims)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::token::assertion::{AssertionClaims as Claims, claims, new_jti};
    use http_body_util::BodyExt;

    const NOW: u64 = 1_800_000_000;
    const TOKEN_URL: &str = "http://127.0.0.1:4444/oauth2/token";

    fn client_key(kid: &str) -> SigningKey {
        let (pem, _) = SigningKey::generate(Algorithm::ES256).unwrap();
        SigningKey::from_bytes(pem.expose().as_bytes(), None, Some(kid)).unwrap()
    }

    fn state(registered: &SigningKey) -> State {
        State {
            issuer: "http://127.0.0.1:4444".into(),
            token_url: TOKEN_URL.into(),
            key: SigningKey::generate(Algorithm::ES256).unwrap().1,
            clients: HashMap::from([(
                "svc".to_string(),
                DevClient {
                    client_id: "svc".into(),
                    jwks: json!({ "keys": [registered.public_jwk()] }),
                    scopes: BTreeSet::from(["a".to_string(), "b".to_string()]),
                    audiences: BTreeSet::from(["https://api.example".to_string()]),
                },
            )]),
            federations: Vec::new(),
            token_ttl: Duration::from_secs(300),
            seen_jti: Mutex::new(HashMap::new()),
            token_requests: AtomicU64::new(0),
            federated_jtis: Mutex::new(std::collections::VecDeque::new()),
            clock_offset: AtomicI64::new(0),
        }
    }

    fn form(assertion: &str, extra: &[(&str, &str)]) -> Vec<u8> {
        let mut f = url::form_urlencoded::Serializer::new(String::new());
        f.append_pair("grant_type", "client_credentials");
        f.append_pair("client_id", "svc");
        f.append_pair("client_assertion_type", ASSERTION_TYPE);
        f.append_pair("client_assertion", assertion);
        for (k, v) in extra {
            f.append_pair(k, v);
        }
        f.finish().into_bytes()
    }

    fn good_claims() -> Claims {
        claims("svc", TOKEN_URL, new_jti(), NOW, Duration::from_secs(60))
    }

    async fn call(s: &State, body: &[u8]) -> (u16, serde_json::Value) {
        let resp = token(s, body, NOW);
        let status = resp.status().as_u16();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        (status, serde_json::from_slice(&bytes).unwrap())
    }

    #[tokio::test]
    async fn issues_an_rfc9068_token_for_a_valid_assertion() {
        let key = client_key("k1");
        let s = state(&key);
        let a = key.sign(&good_claims()).unwrap();
        let (status, body) = call(
            &s,
            &form(
                a.expose(),
                &[("scope", "b a"), ("audience", "https://api.example")],
            ),
        )
        .await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["token_type"], "Bearer");
        assert_eq!(body["expires_in"], 300);
        let at = body["access_token"].as_str().unwrap();
        let header = jsonwebtoken::decode_header(at).unwrap();
        assert_eq!(header.typ.as_deref(), Some("at+jwt"));
        let jwk: Jwk = serde_json::from_value(s.key.public_jwk()).unwrap();
        let mut v = Validation::new(header.alg);
        v.set_audience(&["https://api.example"]);
        v.validate_exp = false;
        let c = jsonwebtoken::decode::<serde_json::Value>(
            at,
            &DecodingKey::from_jwk(&jwk).unwrap(),
            &v,
        )
        .unwrap()
        .claims;
        assert_eq!(c["scope"], "a b");
        assert_eq!(c["client_id"], "svc");
        assert_eq!(c["exp"], NOW + 300);

        // RFC 8707 form works the same.
        let a = key.sign(&good_claims()).unwrap();
        let (status, _) = call(
            &s,
            &form(a.expose(), &[("resource", "https://api.example")]),
        )
        .await;
        assert_eq!(status, 200);
    }

    #[tokio::test]
    async fn rejects_bad_assertions_with_invalid_client() {
        let key = client_key("k1");
        let s = state(&key);

        // Replay: the same assertion twice.
        let a = key.sign(&good_claims()).unwrap();
        assert_eq!(call(&s, &form(a.expose(), &[])).await.0, 200);
        let (status, body) = call(&s, &form(a.expose(), &[])).await;
        assert_eq!(
            (status, body["error"].as_str()),
            (401, Some("invalid_client"))
        );
        assert!(body["error_description"].as_str().unwrap().contains("jti"));

        let cases: Vec<(&str, Claims, SigningKey)> = vec![
            (
                "wrong aud",
                claims(
                    "svc",
                    "http://127.0.0.1:4444",
                    new_jti(),
                    NOW,
                    Duration::from_secs(60),
                ),
                client_key("k1"),
            ),
            (
                "expired",
                claims(
                    "svc",
                    TOKEN_URL,
                    new_jti(),
                    NOW - 120,
                    Duration::from_secs(60),
                ),
                client_key("k1"),
            ),
            (
                "iat in the future",
                claims(
                    "svc",
                    TOKEN_URL,
                    new_jti(),
                    NOW + 5,
                    Duration::from_secs(60),
                ),
                client_key("k1"),
            ),
            (
                "too long-lived",
                claims("svc", TOKEN_URL, new_jti(), NOW, Duration::from_secs(7200)),
                client_key("k1"),
            ),
            (
                "short jti",
                claims("svc", TOKEN_URL, "x".into(), NOW, Duration::from_secs(60)),
                client_key("k1"),
            ),
        ];
        for (what, c, _) in &cases {
            let a = key.sign(c).unwrap();
            let (status, body) = call(&s, &form(a.expose(), &[])).await;
            assert_eq!(
                (status, body["error"].as_str()),
                (401, Some("invalid_client")),
                "{what}: {body}"
            );
        }

        // Signed by another key that claims the registered kid.
        let impostor = client_key("k1");
        let a = impostor.sign(&good_claims()).unwrap();
        let (status, body) = call(&s, &form(a.expose(), &[])).await;
        assert_eq!(
            (status, body["error"].as_str()),
            (401, Some("invalid_client"))
        );
        assert!(
            body["error_description"]
                .as_str()
                .unwrap()
                .contains("signature"),
            "{body}"
        );

        // Unknown client.
        let mut c = good_claims();
        c.iss = "nobody".into();
        c.sub = "nobody".into();
        let a = key.sign(&c).unwrap();
        let body = String::from_utf8(form(a.expose(), &[]))
            .unwrap()
            .replace("client_id=svc", "client_id=nobody");
        let (status, body) = call(&s, body.as_bytes()).await;
        assert_eq!(
            (status, body["error"].as_str()),
            (401, Some("invalid_client")),
            "{body}"
        );
    }

    #[tokio::test]
    async fn rejects_what_the_client_may_not_ask_for() {
        let key = client_key("k1");
        let s = state(&key);
        let a = key.sign(&good_claims()).unwrap();
        let (status, body) = call(&s, &form(a.expose(), &[("scope", "a admin")])).await;
        assert_eq!(
            (status, body["error"].as_str()),
            (400, Some("invalid_scope"))
        );
        let a = key.sign(&good_claims()).unwrap();
        let (status, body) = call(
            &s,
            &form(a.expose(), &[("audience", "https://other.example")]),
        )
        .await;
        assert_eq!(
            (status, body["error"].as_str()),
            (400, Some("invalid_target"))
        );
        let body = form(a.expose(), &[]);
        let body = String::from_utf8(body)
            .unwrap()
            .replace("client_credentials", "password");
        let (status, body) = call(&s, body.as_bytes()).await;
        assert_eq!(
            (status, body["error"].as_str()),
            (400, Some("unsupported_grant_type"))
        );
    }

    /// A projected-token-shaped assertion from the federated issuer `cluster`.
    fn federated(cluster: &SigningKey, edit: impl FnOnce(&mut serde_json::Value)) -> String {
        let mut c = json!({
            "iss": "https://cluster.test", "sub": "system:serviceaccount:ns:svc",
            "aud": ["sts.test"], "iat": NOW - 10, "exp": NOW + 600,
            "kubernetes.io": {"namespace": "ns"},
        });
        edit(&mut c);
        cluster.sign_typed("JWT", &c).unwrap().expose().clone()
    }

    fn federated_form(assertion: &str, client_id: Option<&str>) -> Vec<u8> {
        let mut f = url::form_urlencoded::Serializer::new(String::new());
        f.append_pair("grant_type", "client_credentials");
        if let Some(id) = client_id {
            f.append_pair("client_id", id);
        }
        f.append_pair("client_assertion_type", ASSERTION_TYPE);
        f.append_pair("client_assertion", assertion);
        f.finish().into_bytes()
    }

    #[tokio::test]
    async fn a_federated_issuer_is_trusted_exactly_as_configured() {
        let own = client_key("k1");
        let cluster = client_key("cluster");
        let mut s = state(&own);
        s.federations.push((
            DevFederation {
                issuer: "https://cluster.test".into(),
                subject: "system:serviceaccount:ns:svc".into(),
                client_id: "svc".into(),
                jwks: String::new(),
                audience: Some("sts.test".into()),
            },
            json!({ "keys": [cluster.public_jwk()] }),
        ));
        // The platform token authenticates the mapped client, with or without client_id, and
        // may be presented again (it is reused until rotated); aud may be the token endpoint.
        let good = federated(&cluster, |_| {});
        for body in [
            federated_form(&good, Some("svc")),
            federated_form(&good, None),
        ] {
            let (status, body) = call(&s, &body).await;
            assert_eq!(status, 200, "{body}");
        }
        let to_endpoint = federated(&cluster, |c| c["aud"] = json!(TOKEN_URL));
        assert_eq!(call(&s, &federated_form(&to_endpoint, None)).await.0, 200);

        let impostor = client_key("cluster");
        let cases: Vec<(&str, String)> = vec![
            (
                "wrong sub",
                federated(&cluster, |c| {
                    c["sub"] = json!("system:serviceaccount:ns:other")
                }),
            ),
            (
                "wrong aud",
                federated(&cluster, |c| c["aud"] = json!(["other"])),
            ),
            ("expired", federated(&cluster, |c| c["exp"] = json!(NOW))),
            (
                "iat ahead",
                federated(&cluster, |c| c["iat"] = json!(NOW + 5)),
            ),
            (
                "no exp",
                federated(&cluster, |c| {
                    c.as_object_mut().unwrap().remove("exp");
                }),
            ),
            ("another signer", federated(&impostor, |_| {})),
            // An issuer that is not trusted falls to the client's own keys, which refuse it.
            (
                "wrong iss",
                federated(&cluster, |c| c["iss"] = json!("https://other.test")),
            ),
        ];
        for (what, a) in &cases {
            let (status, body) = call(&s, &federated_form(a, Some("svc"))).await;
            assert_eq!(
                (status, body["error"].as_str()),
                (401, Some("invalid_client")),
                "{what}: {body}"
            );
        }
        // A client_id other than the mapped one.
        let (status, body) = call(&s, &federated_form(&good, Some("nobody"))).await;
        assert_eq!(
            (status, body["error"].as_str()),
            (401, Some("invalid_client")),
            "{body}"
        );
    }

    #[tokio::test]
    async fn binds_loopback_only() {
        let err = DevServer::start(DevServerConfig {
            listen: "0.0.0.0:0".parse().unwrap(),
            clients: vec![],
            federations: vec![],
            token_ttl: Duration::from_secs(60),
        })
        .await
        .err()
        .unwrap();
        assert!(matches!(err, DevServerError::NotLoopback(_)));
    }
}
