//! The client side of the token endpoint: [`TokenClient::attempt`] is one `client_credentials`
//! request; the cache schedules attempts with its per-key retry schedule (`backoff`), and
//! [`TokenClient::fetch`] (the `token` command) runs the same schedule for one round.
//!
//! Each attempt signs a new assertion (a retried assertion would be refused as a replay). A
//! fetch, retries and pauses included, is bounded by `request_timeout`, so a caller waiting on
//! it can never hang longer than that.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use reqwest::header::{CONTENT_TYPE, HeaderValue};
use tokio::time::Instant;

use crate::config::{AudienceParam, AuthMethod, EndpointSource, TokenConfig};
use crate::key::{KeyError, KeySource};
use crate::secret::Secret;
use crate::token::backoff::{self, RetryPolicy, RetryState};
use crate::token::discovery::{Discovery, DiscoveryError, Rules};
use crate::token::mtls::{ClientIdentity, IdentitySource, RotatingHttp};
use crate::token::{AccessToken, ResponseError, TokenKey, parse_response, parse_retry_after};
use crate::util::{self, MAX_FILE_BYTES, redact_url, reqwest_error, unix_now};

/// RFC 7523 §2.2.
pub(crate) const ASSERTION_TYPE: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

/// Why no token came back.
#[derive(Debug, thiserror::Error)]
pub(crate) enum FetchError {
    #[error(transparent)]
    Response(#[from] ResponseError),
    #[error("token endpoint unreachable: {0}")]
    Transport(String),
    #[error("token request timed out after {0:?}")]
    Timeout(Duration),
    #[error("token response larger than {limit} bytes")]
    TooLarge { limit: usize },
    #[error("cannot authenticate the client: {0}")]
    Credentials(String),
    /// The platform's assertion file is missing, unreadable or expired: 503, not 502, because
    /// the platform rotates it without any change here (docs/spec.md §2).
    #[error("cannot authenticate the client: {0}")]
    AssertionFile(#[from] crate::token::assertion_file::AssertionFileError),
}

/// A failed attempt, with the pause the server asked for (`Retry-After` on 429 and 503).
#[derive(Debug)]
pub(crate) struct AttemptError {
    pub(crate) error: FetchError,
    pub(crate) retry_after: Option<Duration>,
}

impl From<FetchError> for AttemptError {
    fn from(error: FetchError) -> AttemptError {
        AttemptError {
            error,
            retry_after: None,
        }
    }
}

/// How a token request ended, as counted (the `outcome` label of `token_sidecar_token_fetches_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FetchOutcome {
    Ok,
    /// The server refused (an RFC 6749 error that retrying cannot fix).
    Rejected,
    /// Unreachable, timed out, 5xx.
    Unavailable,
    /// A 200 whose body is not a usable token response.
    Invalid,
}

impl FetchOutcome {
    /// Every outcome with its label value; `outcome as usize` indexes this.
    pub(crate) const ALL: [(FetchOutcome, &'static str); 4] = [
        (FetchOutcome::Ok, "ok"),
        (FetchOutcome::Rejected, "rejected"),
        (FetchOutcome::Unavailable, "unavailable"),
        (FetchOutcome::Invalid, "invalid"),
    ];
}

/// How a failed fetch is reported to the application (docs/spec.md §5) and counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FailureKind {
    /// The server said no: a configuration problem that retrying cannot fix.
    Rejected,
    /// The server could not be asked or gave no usable answer; worth retrying later.
    Unavailable,
}

impl FetchError {
    pub(crate) fn kind(&self) -> FailureKind {
        match self {
            FetchError::Response(ResponseError::OAuth { error, .. }) if !error.is_retryable() => {
                FailureKind::Rejected
            }
            FetchError::Credentials(_) => FailureKind::Rejected,
            _ => FailureKind::Unavailable,
        }
    }

    /// Whether another attempt, unchanged, can succeed.
    pub(crate) fn is_retryable(&self) -> bool {
        match self {
            FetchError::Response(r) => r.is_retryable(),
            FetchError::Transport(_) | FetchError::Timeout(_) | FetchError::TooLarge { .. } => true,
            FetchError::Credentials(_) | FetchError::AssertionFile(_) => false,
        }
    }

    /// How the fetch is counted.
    pub(crate) fn outcome(&self) -> FetchOutcome {
        match self {
            _ if self.kind() == FailureKind::Rejected => FetchOutcome::Rejected,
            FetchError::Response(ResponseError::Malformed { status: 200, .. }) => {
                FetchOutcome::Invalid
            }
            _ => FetchOutcome::Unavailable,
        }
    }

    /// The server's own error code, when it sent one.
    pub(crate) fn oauth_code(&self) -> Option<&str> {
        match self {
            FetchError::Response(ResponseError::OAuth { error, .. }) => Some(&error.error),
            _ => None,
        }
    }
}

enum ClientAuth {
    PrivateKeyJwt {
        key: KeySource,
        /// `assertion_audience`; None: the token endpoint of the attempt (docs/spec.md §2).
        audience: Option<String>,
        lifetime: Duration,
        clock_tolerance: Duration,
    },
    SecretBasic(SecretSource),
    SecretPost(SecretSource),
    /// RFC 8705: the TLS client certificate authenticates; the form carries only `client_id`.
    /// The certificate is presented by `TokenClient::mtls`.
    Tls,
    AssertionFile {
        file: crate::token::assertion_file::AssertionFile,
        assertion_type: String,
    },
}

/// A client secret from the config or from a file re-read per fetch (so rotation needs no restart).
enum SecretSource {
    Inline(Secret<String>),
    File(PathBuf),
}

impl SecretSource {
    fn read(&self) -> Result<Secret<String>, FetchError> {
        match self {
            SecretSource::Inline(s) => Ok(s.clone()),
            SecretSource::File(p) => {
                let bytes = util::read_bounded(p, MAX_FILE_BYTES).map_err(|e| {
                    FetchError::Credentials(format!("cannot read {}: {e}", p.display()))
                })?;
                let text = std::str::from_utf8(&bytes).map_err(|_| {
                    FetchError::Credentials(format!("{} is not UTF-8 text", p.display()))
                })?;
                Ok(Secret::new(text.trim_end_matches(['\r', '\n']).to_string()))
            }
        }
    }
}

/// The token endpoint: `token_url` as written, or the one discovered from `token.issuer`.
/// Cheap to clone; [`Endpoint::current`] is lock-free, so each attempt reads it anew.
#[derive(Clone, Debug)]
pub(crate) enum Endpoint {
    Fixed(Arc<String>),
    Discovered(Arc<Discovery>),
}

impl Endpoint {
    /// The endpoint to use now; None only before discovery's first success.
    pub(crate) fn current(&self) -> Option<Arc<String>> {
        match self {
            Endpoint::Fixed(u) => Some(u.clone()),
            Endpoint::Discovered(d) => d.current(),
        }
    }

    /// Whether the endpoint was discovered (for how `check-config` and `/readyz` label it).
    pub(crate) fn is_discovered(&self) -> bool {
        matches!(self, Endpoint::Discovered(_))
    }
}

/// Talks to one token endpoint as one client.
pub(crate) struct TokenClient {
    http: reqwest::Client,
    endpoint: Endpoint,
    /// With an RFC 8705 method: the client presenting the current certificate (used instead of
    /// `http`).
    mtls: Option<RotatingHttp>,
    client_id: String,
    auth: ClientAuth,
    audience_param: AudienceParam,
    extra_params: Vec<(String, String)>,
    retry: RetryPolicy,
    max_response_bytes: usize,
    default_ttl: Duration,
}

impl std::fmt::Debug for TokenClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenClient")
            // The query may hold an API key (spec §6: URLs are shown redacted).
            .field(
                "token_url",
                &self.endpoint.current().map(|u| redact_url(&u)),
            )
            .field("client_id", &self.client_id)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClientBuildError {
    #[error("token.private_key_file: {0}")]
    Key(#[from] KeyError),
    #[error("token.ca_file: {0}")]
    Ca(String),
    /// `key` is `token.client_key_file` when the key is the problem (unusable, or not the
    /// certificate's), else `token.client_cert_file`.
    #[error("{key}: {message}")]
    ClientCert { key: &'static str, message: String },
    #[error("token client: {0}")]
    Http(String),
    #[error("token.issuer: {0}")]
    Discovery(#[from] DiscoveryError),
}

impl TokenClient {
    /// Builds the client from validated config; loads (and checks) the signing key once.
    pub(crate) fn new(cfg: &TokenConfig) -> Result<TokenClient, ClientBuildError> {
        let http = http_builder(cfg)?
            .build()
            .map_err(|e| ClientBuildError::Http(e.to_string()))?;
        let mtls = match (cfg.auth_method, &cfg.client_cert_file, &cfg.client_key_file) {
            (
                AuthMethod::TlsClientAuth | AuthMethod::SelfSignedTlsClientAuth,
                Some(cert),
                Some(key),
            ) => {
                let source =
                    IdentitySource::load(cert, key).map_err(|e| ClientBuildError::ClientCert {
                        key: if e.is_key_problem() {
                            "token.client_key_file"
                        } else {
                            "token.client_cert_file"
                        },
                        message: e.to_string(),
                    })?;
                let cfg = cfg.clone();
                let build = move |id: &ClientIdentity| -> Result<reqwest::Client, String> {
                    http_builder(&cfg)
                        .map_err(|e| e.to_string())?
                        .identity(id.reqwest_identity()?)
                        .build()
                        .map_err(|e| e.to_string())
                };
                Some(
                    RotatingHttp::new(source, Box::new(build)).map_err(|message| {
                        ClientBuildError::ClientCert {
                            key: "token.client_cert_file",
                            message,
                        }
                    })?,
                )
            }
            _ => None,
        };

        let secret_source = || match (&cfg.client_secret, &cfg.client_secret_file) {
            (Some(s), _) => SecretSource::Inline(s.clone()),
            (None, Some(p)) => SecretSource::File(p.clone()),
            (None, None) => SecretSource::Inline(Secret::new(String::new())),
        };
        let auth = match cfg.auth_method {
            AuthMethod::PrivateKeyJwt => {
                let path = cfg
                    .private_key_file
                    .clone()
                    .ok_or_else(|| KeyError::Config("private_key_file is not set".into()))?;
                let alg = match &cfg.signing_alg {
                    Some(a) => Some(crate::key::parse_alg(a).ok_or_else(|| {
                        KeyError::Config(format!("unsupported signing_alg {a:?}"))
                    })?),
                    None => None,
                };
                ClientAuth::PrivateKeyJwt {
                    key: KeySource::load(path, alg, cfg.key_id.clone())?,
                    audience: cfg.assertion_audience.clone(),
                    lifetime: cfg.assertion_lifetime,
                    clock_tolerance: cfg.clock_skew_tolerance,
                }
            }
            AuthMethod::ClientSecretBasic => ClientAuth::SecretBasic(secret_source()),
            AuthMethod::ClientSecretPost => ClientAuth::SecretPost(secret_source()),
            AuthMethod::TlsClientAuth | AuthMethod::SelfSignedTlsClientAuth => ClientAuth::Tls,
            AuthMethod::ClientAssertionFile => ClientAuth::AssertionFile {
                file: crate::token::assertion_file::AssertionFile::new(
                    cfg.client_assertion_file.clone().unwrap_or_default(),
                    // The attempt may take up to request_timeout to reach the server, whose
                    // clock may run clock_skew_tolerance ahead: the JWT must outlive both.
                    cfg.clock_skew_tolerance.saturating_add(cfg.request_timeout),
                ),
                assertion_type: cfg.client_assertion_type.clone(),
            },
        };

        let endpoint = match cfg.endpoint() {
            EndpointSource::Fixed(u) => Endpoint::Fixed(Arc::new(u.to_owned())),
            EndpointSource::Issuer(issuer) => Endpoint::Discovered(Arc::new(Discovery::new(
                issuer,
                Rules {
                    allow_insecure: cfg.allow_insecure_token_url,
                    allow_cross_host: cfg.allow_cross_host_endpoint,
                },
                http.clone(),
                cfg.request_timeout,
                cfg.discovery_refresh_interval,
            )?)),
        };
        Ok(TokenClient {
            http,
            endpoint,
            mtls,
            client_id: cfg.client_id.clone(),
            auth,
            audience_param: cfg.audience_param,
            extra_params: cfg
                .extra_params
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            retry: retry_policy(cfg),
            max_response_bytes: cfg.max_response_bytes,
            default_ttl: cfg.default_token_ttl,
        })
    }

    /// Discovers the token endpoint when `token.issuer` is set (a failure is a start-up
    /// error) and starts its refresher; nothing to do for `token_url`. Call once, in a runtime.
    pub(crate) async fn discover(&self) -> Result<(), DiscoveryError> {
        match &self.endpoint {
            Endpoint::Fixed(_) => Ok(()),
            Endpoint::Discovered(d) => d.start().await,
        }
    }

    /// The token endpoint, for `/readyz` and `check-config`.
    pub(crate) fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// The signing key source, when the client authenticates with `private_key_jwt`.
    pub(crate) fn key_source(&self) -> Option<&KeySource> {
        match &self.auth {
            ClientAuth::PrivateKeyJwt { key, .. } => Some(key),
            _ => None,
        }
    }

    /// Gets one token for `key`: one round of the docs/spec.md §2 retry schedule (at most
    /// `max_attempts` attempts, within `request_timeout`). For the `token` command; the cache
    /// drives [`Self::attempt`] itself with the same schedule.
    pub(crate) async fn fetch(&self, key: &TokenKey) -> Result<AccessToken, FetchError> {
        let mut schedule = RetryState::default();
        loop {
            let started = Instant::now();
            let deadline = schedule.attempt_deadline(&self.retry, started);
            let err = match tokio::time::timeout_at(deadline, self.attempt(key)).await {
                Ok(Ok(token)) => return Ok(token),
                Ok(Err(e)) => e,
                Err(_) => FetchError::Timeout(self.retry.request_timeout).into(),
            };
            let failure = schedule.on_failure(
                &self.retry,
                started,
                Instant::now(),
                err.error.is_retryable(),
                err.retry_after,
                backoff::random_fraction(),
            );
            if failure.report {
                return Err(err.error);
            }
            tracing::debug!(%key, error = %err.error, "token request failed; retrying");
            tokio::time::sleep_until(failure.retry_at).await;
        }
    }

    /// One token request, not retried and not bounded in time (callers bound it).
    pub(crate) async fn attempt(&self, key: &TokenKey) -> Result<AccessToken, AttemptError> {
        let (request, body) = self.build_request(key)?;
        let response = request
            .header(
                CONTENT_TYPE,
                HeaderValue::from_static("application/x-www-form-urlencoded"),
            )
            .header(reqwest::header::ACCEPT, "application/json")
            .body(body.into_inner())
            .send()
            .await
            .map_err(|e| FetchError::Transport(reqwest_error(e)))?;

        let status = response.status().as_u16();
        // RFC 6585 §4 and RFC 9110 §15.6.4: how long the server wants to be left alone.
        let retry_after = match status {
            429 | 503 => response
                .headers()
                .get(reqwest::header::RETRY_AFTER)
                .and_then(|v| parse_retry_after(v.as_bytes(), std::time::SystemTime::now())),
            _ => None,
        };
        let content_type = response
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let body = read_body(response, self.max_response_bytes)
            .await
            .map_err(|error| AttemptError { error, retry_after })?;
        let result = parse_response(
            status,
            content_type.as_deref(),
            &body,
            unix_now(),
            self.default_ttl,
        );
        match &result {
            Ok(t) => {
                tracing::debug!(%key, status, lifetime = ?t.lifetime, source = ?t.lifetime_source, "token issued")
            }
            Err(e) => tracing::debug!(%key, status, error = %e, "token request refused"),
        }
        result.map_err(|e| AttemptError {
            error: e.into(),
            retry_after,
        })
    }

    /// The request and its form body, with a freshly signed assertion. Synchronous on purpose:
    /// the form serializer must not live across an await.
    fn build_request(
        &self,
        key: &TokenKey,
    ) -> Result<(reqwest::RequestBuilder, Secret<String>), FetchError> {
        let mut form = url::form_urlencoded::Serializer::new(String::new());
        form.append_pair("grant_type", "client_credentials");
        // Read per attempt: a refreshed discovery document takes effect at the next attempt.
        let token_url = self.endpoint.current().ok_or_else(|| {
            FetchError::Transport("the token endpoint has not been discovered yet".into())
        })?;
        let mut request = match &self.mtls {
            Some(m) => m.client().post(token_url.as_str()),
            None => self.http.post(token_url.as_str()),
        };
        match &self.auth {
            ClientAuth::PrivateKeyJwt {
                key: source,
                audience,
                lifetime,
                clock_tolerance,
            } => {
                let signing_key = source.current();
                let assertion = crate::token::assertion::sign_tolerant(
                    &signing_key,
                    &self.client_id,
                    audience.as_deref().unwrap_or(&token_url),
                    *lifetime,
                    *clock_tolerance,
                )
                .map_err(|e| FetchError::Credentials(e.to_string()))?;
                form.append_pair("client_id", &self.client_id);
                form.append_pair("client_assertion_type", ASSERTION_TYPE);
                form.append_pair("client_assertion", assertion.expose());
            }
            ClientAuth::SecretBasic(src) => {
                let secret = src.read()?;
                // RFC 6749 §2.3.1: both parts are form-urlencoded before Basic encoding.
                let enc = |s: &str| {
                    url::form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>()
                };
                request = request.basic_auth(enc(&self.client_id), Some(enc(secret.expose())));
            }
            ClientAuth::SecretPost(src) => {
                let secret = src.read()?;
                form.append_pair("client_id", &self.client_id);
                form.append_pair("client_secret", secret.expose());
            }
            // RFC 8705 §2: the certificate authenticates; client_id says whose it is.
            ClientAuth::Tls => {
                form.append_pair("client_id", &self.client_id);
            }
            ClientAuth::AssertionFile {
                file,
                assertion_type,
            } => {
                let assertion = file.current(unix_now())?;
                form.append_pair("client_id", &self.client_id);
                form.append_pair("client_assertion_type", assertion_type);
                form.append_pair("client_assertion", assertion.expose());
            }
        }
        if let Some(scope) = key.scope_param() {
            form.append_pair("scope", &scope);
        }
        if !key.audiences.is_empty() {
            match self.audience_param {
                AudienceParam::Audience => {
                    form.append_pair("audience", &key.audiences.join(" "));
                }
                AudienceParam::Resource => {
                    for a in &key.audiences {
                        form.append_pair("resource", a);
                    }
                }
            }
        }
        for (k, v) in &self.extra_params {
            form.append_pair(k, v);
        }
        Ok((request, Secret::new(form.finish())))
    }
}

/// The token endpoint's HTTP client settings (built again, with the new certificate, when an
/// mTLS client certificate rotates).
fn http_builder(cfg: &TokenConfig) -> Result<reqwest::ClientBuilder, ClientBuildError> {
    crate::tls::provider();
    let mut builder = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .user_agent(concat!("token-sidecar/", env!("CARGO_PKG_VERSION")))
        .pool_idle_timeout(Duration::from_secs(60));
    if let Some(ca) = &cfg.ca_file {
        // The same reader validation and the upstreams use (bounded, rustls-pki-types), so a
        // bundle that passed validation cannot fail here on a parser difference.
        let certs = crate::tls::load_certs(ca)
            .map_err(|e| ClientBuildError::Ca(e.to_string()))?
            .iter()
            .map(|der| reqwest::Certificate::from_der(der.as_ref()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| ClientBuildError::Ca(format!("{}: {e}", ca.display())))?;
        // ca_only (docs/spec.md §4): a pinned private CA. With tls_certs_only reqwest
        // verifies against these roots alone instead of the platform verifier.
        builder = if cfg.ca_only {
            builder.tls_certs_only(certs)
        } else {
            builder.tls_certs_merge(certs)
        };
    }
    Ok(builder)
}

/// The schedule's bounds from `[token]`.
pub(crate) fn retry_policy(cfg: &TokenConfig) -> RetryPolicy {
    RetryPolicy {
        initial: cfg.retry_backoff_initial,
        max: cfg.retry_backoff_max,
        max_attempts: cfg.max_attempts,
        request_timeout: cfg.request_timeout,
    }
}

/// The bounded body reader, its failures as fetch errors.
async fn read_body(response: reqwest::Response, limit: usize) -> Result<Vec<u8>, FetchError> {
    util::read_response_bounded(response, limit)
        .await
        .map_err(|e| match e {
            util::ResponseReadError::TooLarge => FetchError::TooLarge { limit },
            util::ResponseReadError::Transport(t) => FetchError::Transport(t),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_secret_file_is_read_bounded_and_never_echoed() {
        // An endless file (a wrong path) is cut off at the bound instead of exhausting memory.
        let endless = SecretSource::File(PathBuf::from("/dev/zero")).read();
        let Err(FetchError::Credentials(msg)) = endless else {
            panic!("expected a credentials error")
        };
        assert!(msg.contains("larger than"), "{msg}");

        let dir = tempfile::tempdir().unwrap();
        let at = dir.path().join("secret");
        std::fs::write(&at, b"s3cret\n").unwrap();
        let secret = SecretSource::File(at.clone()).read().unwrap();
        assert_eq!(secret.expose(), "s3cret");
        std::fs::write(&at, [0xff, 0xfe, b's']).unwrap();
        let Err(FetchError::Credentials(msg)) = SecretSource::File(at).read() else {
            panic!("expected a credentials error")
        };
        assert!(msg.contains("not UTF-8"), "{msg}");
    }

    #[test]
    fn tls_client_auth_sends_client_id_and_no_assertion_or_secret() {
        let dir = tempfile::tempdir().unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(Vec::<String>::new())
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let (c, k) = (dir.path().join("c.pem"), dir.path().join("k.pem"));
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        let cfg = crate::config::from_toml_str(&format!(
            "[token]\ntoken_url = \"https://idp.example.com/t\"\nclient_id = \"c i\"\n\
             auth_method = \"tls_client_auth\"\nclient_cert_file = {:?}\nclient_key_file = {:?}\n\
             [[route]]\nname = \"r\"\npath_prefix = \"/\"\nupstream = \"https://r.example.com\"\n",
            c.display().to_string(),
            k.display().to_string()
        ))
        .unwrap();
        let client = TokenClient::new(&cfg.token).unwrap();
        let (request, body) = client
            .build_request(&TokenKey::new(&["a".to_string()], &[] as &[String]))
            .unwrap();
        assert_eq!(
            body.expose(),
            "grant_type=client_credentials&client_id=c+i&scope=a"
        );
        let request = request.build().unwrap();
        assert!(request.headers().get("authorization").is_none());
    }
}
