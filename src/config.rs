//! Configuration: `sidecar.toml` plus `SIDECAR_<SECTION>__<KEY>` environment overrides.
//!
//! Loading has two steps. [`load`] layers built-in defaults < the TOML file < the environment
//! with figment and deserializes strictly (unknown keys are errors). [`Config::validate`] then
//! checks everything serde cannot express and reports *every* problem at once, each naming its
//! key, so an operator fixes a broken file in one round trip. The result of a successful load is
//! immutable for the life of the process.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Toml};
use serde::{Deserialize, Serialize};
use url::Url;

use crate::secret::Secret;

/// Where the config file is looked for when neither `--config` nor `SIDECAR_CONFIG` names one.
pub const DEFAULT_CONFIG_PATH: &str = "sidecar.toml";

/// The whole configuration, as `sidecar.toml` spells it.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub proxy: ProxyConfig,
    #[serde(default)]
    pub admin: AdminConfig,
    pub token: TokenConfig,
    /// `[[route]]` tables. At least one is required.
    #[serde(default)]
    pub route: Vec<RouteConfig>,
    #[serde(default)]
    pub log: LogConfig,
}

/// `[proxy]`: the main listener and the limits that apply to every listener.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProxyConfig {
    /// Main listener; routes without their own `listen` are matched here by host and path.
    pub listen: SocketAddr,
    /// Connections accepted at once per listener; further clients wait in the kernel backlog.
    pub max_connections: usize,
    /// A client slower than this to send a request's head (request line and headers) is
    /// disconnected.
    #[serde(with = "duration_str")]
    pub header_read_timeout: Duration,
    /// A connection with no request in flight and no traffic for this long is closed.
    #[serde(with = "duration_str")]
    pub idle_timeout: Duration,
    /// Largest request head (request line plus headers) accepted, in bytes.
    pub max_header_bytes: usize,
    /// Most request headers accepted.
    pub max_headers: usize,
    /// Threads serving requests; 0 = one per CPU available to the process (cgroup limits
    /// included). With one, the sidecar runs on a single-threaded runtime, which on one CPU
    /// costs about a third less CPU per request than a multi-threaded one.
    pub worker_threads: usize,
    /// On SIGTERM/SIGINT, in-flight requests get this long to finish before they are cut.
    #[serde(with = "duration_str")]
    pub shutdown_grace: Duration,
    /// Request bodies of known size up to this many bytes are kept for one replay after the
    /// upstream rejects the token; larger ones stream and a 401 goes back unchanged.
    pub retry_body_limit: usize,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            max_connections: 4096,
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            max_header_bytes: 65536,
            max_headers: 100,
            worker_threads: 0,
            shutdown_grace: Duration::from_secs(20),
            retry_body_limit: 65536,
        }
    }
}

/// `[admin]`: the operations listener (`/healthz`, `/readyz`).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    pub listen: SocketAddr,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 9090)),
        }
    }
}

/// How the client authenticates at the token endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum AuthMethod {
    /// RFC 7523 §2.2: a freshly signed JWT per request.
    #[default]
    PrivateKeyJwt,
    /// RFC 6749 §2.3.1: HTTP Basic with the client secret.
    ClientSecretBasic,
    /// RFC 6749 §2.3.1: the client secret in the form body.
    ClientSecretPost,
}

/// How the route's audiences are requested.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum AudienceParam {
    /// Ory Hydra / Auth0: one `audience` parameter, space-separated.
    #[default]
    Audience,
    /// RFC 8707: one `resource` parameter per audience.
    Resource,
}

/// `[token]`: the authorization server and this client's registration there.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TokenConfig {
    /// The token endpoint, e.g. `https://hydra.example.com/oauth2/token`.
    pub token_url: String,
    /// Required to be true for a plain `http://` token_url (credentials would cross the network in clear text).
    #[serde(default)]
    pub allow_insecure_token_url: bool,
    pub client_id: String,
    #[serde(default)]
    pub auth_method: AuthMethod,
    /// PEM (PKCS#8, PKCS#1 RSA, SEC1 EC) or JWK file; re-read when it changes.
    #[serde(default)]
    pub private_key_file: Option<PathBuf>,
    /// `kid` header of the assertion; default: the JWK's `kid`, else the RFC 7638 thumbprint.
    #[serde(default)]
    pub key_id: Option<String>,
    /// Default: derived from the key (RSA → RS256, P-256 → ES256, P-384 → ES384, Ed25519 → EdDSA).
    #[serde(default)]
    pub signing_alg: Option<String>,
    /// `aud` of the assertion; default: `token_url` exactly as written.
    #[serde(default)]
    pub assertion_audience: Option<String>,
    #[serde(default = "defaults::assertion_lifetime", with = "duration_str")]
    pub assertion_lifetime: Duration,
    /// The token endpoint's clock may differ from ours by this much: the assertion's `iat` is
    /// set this far in the past (a server running behind must not see it in its future) and its
    /// `exp` stays `assertion_lifetime` ahead (which must exceed this tolerance).
    #[serde(default = "defaults::clock_skew_tolerance", with = "duration_str")]
    pub clock_skew_tolerance: Duration,
    /// File holding the client secret (`client_secret_basic` / `client_secret_post`).
    #[serde(default)]
    pub client_secret_file: Option<PathBuf>,
    /// The client secret inline; prefer `client_secret_file` or the environment.
    #[serde(default)]
    pub client_secret: Option<Secret<String>>,
    #[serde(default)]
    pub audience_param: AudienceParam,
    /// Fraction of a token's lifetime after which it is refreshed.
    #[serde(default = "defaults::refresh_at")]
    pub refresh_at: f64,
    /// Refresh at the latest this long before expiry (whichever of the two comes first).
    #[serde(default = "defaults::refresh_before_expiry", with = "duration_str")]
    pub refresh_before_expiry: Duration,
    /// A token is never sent within this long of its expiry.
    #[serde(default = "defaults::expiry_skew", with = "duration_str")]
    pub expiry_skew: Duration,
    /// Lifetime assumed when the response has neither `expires_in` nor a JWT `exp`.
    #[serde(default = "defaults::default_token_ttl", with = "duration_str")]
    pub default_token_ttl: Duration,
    /// Bound on one whole token fetch, retries included.
    #[serde(default = "defaults::request_timeout", with = "duration_str")]
    pub request_timeout: Duration,
    /// Attempts per fetch for retryable failures (transport, timeout, 5xx, `jti_known`).
    #[serde(default = "defaults::max_attempts")]
    pub max_attempts: u32,
    /// First pause after a failed fetch; doubles per consecutive failure, with jitter.
    #[serde(default = "defaults::retry_backoff_initial", with = "duration_str")]
    pub retry_backoff_initial: Duration,
    /// Cap on the pause between failed fetches.
    #[serde(default = "defaults::retry_backoff_max", with = "duration_str")]
    pub retry_backoff_max: Duration,
    /// Largest token response body read, in bytes.
    #[serde(default = "defaults::max_response_bytes")]
    pub max_response_bytes: usize,
    /// Extra CA certificates (PEM) trusted for the token endpoint, on top of the system roots.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Additional form parameters sent with every token request.
    #[serde(default)]
    pub extra_params: BTreeMap<String, String>,
}

/// `[[route]]`: one upstream and the token it gets.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    pub name: String,
    /// A dedicated listener: everything arriving on it goes to this route.
    #[serde(default)]
    pub listen: Option<SocketAddr>,
    /// Matched against the Host header (or an absolute-form request URI) on the main listener.
    #[serde(default)]
    pub host: Option<String>,
    /// Matched against the request path on the main listener; the longest match wins.
    #[serde(default)]
    pub path_prefix: Option<String>,
    pub upstream: String,
    /// Remove `path_prefix` from the path before forwarding.
    #[serde(default)]
    pub strip_prefix: bool,
    /// Required to be true for a plain `http://` upstream (the token would travel in clear text).
    #[serde(default)]
    pub allow_insecure_upstream: bool,
    #[serde(default)]
    pub scope: Vec<String>,
    #[serde(default)]
    pub audience: Vec<String>,
    #[serde(default = "defaults::connect_timeout", with = "duration_str")]
    pub connect_timeout: Duration,
    /// Until the upstream's response headers arrive.
    #[serde(default = "defaults::upstream_timeout", with = "duration_str")]
    pub timeout: Duration,
    /// Extra CA certificates (PEM) trusted for this upstream, on top of the system roots.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Treat any 401 from the upstream as a rejected token (evict, replay once), not only a
    /// `WWW-Authenticate: Bearer error="invalid_token"` challenge.
    #[serde(default)]
    pub retry_on_401: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// `[log]`. The level comes from `RUST_LOG` (default `info`).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    pub format: LogFormat,
    /// One `info` event per request (target `token_sidecar::access`).
    pub access_log: bool,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::Text,
            access_log: true,
        }
    }
}

mod defaults {
    use std::time::Duration;

    pub fn assertion_lifetime() -> Duration {
        Duration::from_secs(60)
    }
    pub fn clock_skew_tolerance() -> Duration {
        Duration::from_secs(30)
    }
    pub fn refresh_at() -> f64 {
        0.8
    }
    pub fn refresh_before_expiry() -> Duration {
        Duration::from_secs(60)
    }
    pub fn expiry_skew() -> Duration {
        Duration::from_secs(10)
    }
    pub fn default_token_ttl() -> Duration {
        Duration::from_secs(300)
    }
    pub fn request_timeout() -> Duration {
        Duration::from_secs(10)
    }
    pub fn max_attempts() -> u32 {
        3
    }
    pub fn retry_backoff_initial() -> Duration {
        Duration::from_millis(200)
    }
    pub fn retry_backoff_max() -> Duration {
        Duration::from_secs(1)
    }
    pub fn max_response_bytes() -> usize {
        256 * 1024
    }
    pub fn connect_timeout() -> Duration {
        Duration::from_secs(5)
    }
    pub fn upstream_timeout() -> Duration {
        Duration::from_secs(60)
    }
}

/// Durations are written as strings like `"60s"`, `"5m"`, `"250ms"`.
pub mod duration_str {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_duration(text.trim()).map_err(|e| {
            serde::de::Error::custom(format!(
                "invalid duration {text:?} ({e}); write it like \"10s\", \"5m\" or \"250ms\""
            ))
        })
    }
}

/// One thing wrong with the configuration, tied to the key that holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub key: String,
    pub message: String,
}

impl fmt::Display for Problem {
    /// One line, always: control characters in keys (quoted TOML keys may hold any) are escaped
    /// and multi-line messages (the TOML parser's snippets, file names) are folded.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let key: String = self
            .key
            .chars()
            .flat_map(|c| -> Box<dyn Iterator<Item = char>> {
                if c.is_control() {
                    Box::new(c.escape_default())
                } else {
                    Box::new(std::iter::once(c))
                }
            })
            .collect();
        let message = self
            .message
            .split(['\n', '\r'])
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect::<Vec<_>>()
            .join(" ");
        write!(f, "{key}: {message}")
    }
}

/// Every problem found in a configuration. `Display` prints one line per problem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub problems: Vec<Problem>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.problems.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "invalid config: {p}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

impl ConfigError {
    fn single(key: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError {
            problems: vec![Problem {
                key: key.into(),
                message: message.into(),
            }],
        }
    }
}

/// Which file to read: `--config`, else `SIDECAR_CONFIG`, else `./sidecar.toml`.
pub fn resolve_path(cli: Option<&Path>) -> PathBuf {
    if let Some(p) = cli {
        return p.to_path_buf();
    }
    match std::env::var_os("SIDECAR_CONFIG") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => PathBuf::from(DEFAULT_CONFIG_PATH),
    }
}

/// Loads and validates the configuration from `path` and the process environment.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    if !path.exists() {
        return Err(ConfigError::single(
            "config",
            format!(
                "file {} not found (pass --config PATH or set SIDECAR_CONFIG)",
                path.display()
            ),
        ));
    }
    from_figment(Figment::new().merge(Toml::file_exact(path)).merge(env()))
}

/// `SIDECAR_<SECTION>__<KEY>` variables. Only names with the `__` separator are config keys:
/// Kubernetes injects `<SERVICE>_PORT`, `<SERVICE>_SERVICE_HOST`, … for every Service in the
/// namespace, so a Service called `sidecar…` must not become an unknown config key that stops
/// every pod. `SIDECAR_CONFIG` (the file's path) has no separator either.
fn env() -> Env {
    Env::prefixed("SIDECAR_")
        .filter(|k| k.as_str().contains("__"))
        .split("__")
}

/// Parses and validates configuration text (no environment), for tests and `dev`.
pub fn from_toml_str(text: &str) -> Result<Config, ConfigError> {
    from_figment(Figment::new().merge(Toml::string(text)))
}

fn from_figment(figment: Figment) -> Result<Config, ConfigError> {
    let config: Config = figment.extract().map_err(figment_problems)?;
    config.validate()?;
    Ok(config)
}

fn figment_problems(err: figment::Error) -> ConfigError {
    let problems = err
        .into_iter()
        .map(|e| {
            let key = match e.path.join(".") {
                k if k.is_empty() => "config".to_string(),
                k => k,
            };
            // figment's Display repeats the key and the source; the kind alone reads best after the key.
            let mut message = e.kind.to_string();
            if let Some(src) = e.metadata.as_ref().and_then(|m| m.source.as_ref()) {
                message.push_str(&format!(" (from {src})"));
            }
            Problem { key, message }
        })
        .collect();
    ConfigError { problems }
}

/// Collects problems as validation walks the config.
#[derive(Default)]
struct Problems(Vec<Problem>);

impl Problems {
    fn add(&mut self, key: impl Into<String>, message: impl Into<String>) {
        self.0.push(Problem {
            key: key.into(),
            message: message.into(),
        });
    }
}

impl Config {
    /// Checks every rule serde cannot express; returns all problems at once.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut p = Problems::default();
        self.validate_proxy(&mut p);
        self.validate_token(&mut p);
        self.validate_routes(&mut p);
        if p.0.is_empty() {
            Ok(())
        } else {
            Err(ConfigError { problems: p.0 })
        }
    }

    fn validate_proxy(&self, p: &mut Problems) {
        let px = &self.proxy;
        if px.max_connections == 0 {
            p.add("proxy.max_connections", "must be at least 1");
        }
        if px.max_header_bytes < 8192 {
            p.add("proxy.max_header_bytes", "must be at least 8192");
        }
        if px.max_headers == 0 {
            p.add("proxy.max_headers", "must be at least 1");
        }
        if px.header_read_timeout.is_zero() {
            p.add("proxy.header_read_timeout", "must be greater than zero");
        }
        if px.idle_timeout.is_zero() {
            p.add("proxy.idle_timeout", "must be greater than zero");
        }
        if self.admin.listen == px.listen && px.listen.port() != 0 {
            p.add("admin.listen", "must differ from proxy.listen");
        }
    }

    fn validate_token(&self, p: &mut Problems) {
        let t = &self.token;
        match Url::parse(&t.token_url) {
            Err(e) => p.add("token.token_url", format!("not a valid URL: {e}")),
            Ok(u) => match u.scheme() {
                "https" => {}
                "http" if t.allow_insecure_token_url => {}
                "http" => p.add(
                    "token.token_url",
                    "plain http:// would send client credentials in clear text; use https:// or set token.allow_insecure_token_url = true",
                ),
                s => p.add(
                    "token.token_url",
                    format!("scheme {s:?} is not supported; use https://"),
                ),
            },
        }
        if t.client_id.trim().is_empty() {
            p.add("token.client_id", "must not be empty");
        }
        match t.auth_method {
            AuthMethod::PrivateKeyJwt => {
                if t.private_key_file.is_none() {
                    p.add(
                        "token.private_key_file",
                        "required when auth_method = \"private_key_jwt\"",
                    );
                }
            }
            AuthMethod::ClientSecretBasic | AuthMethod::ClientSecretPost => {
                match (&t.client_secret, &t.client_secret_file) {
                    (None, None) => p.add(
                        "token.client_secret_file",
                        "client_secret_file or client_secret is required for client_secret_* auth methods",
                    ),
                    (Some(_), Some(_)) => p.add(
                        "token.client_secret",
                        "set either client_secret or client_secret_file, not both",
                    ),
                    (None, Some(f)) => check_readable(p, "token.client_secret_file", f),
                    (Some(_), None) => {}
                }
            }
        }
        if let Some(f) = &t.private_key_file {
            check_readable(p, "token.private_key_file", f);
        }
        if let Some(alg) = &t.signing_alg
            && crate::key::parse_alg(alg).is_none()
        {
            p.add(
                "token.signing_alg",
                format!(
                    "unsupported algorithm {alg:?}; one of RS256 RS384 RS512 PS256 PS384 PS512 ES256 ES384 EdDSA"
                ),
            );
        }
        if let Some(aud) = &t.assertion_audience
            && aud.trim().is_empty()
        {
            p.add("token.assertion_audience", "must not be empty when set");
        }
        if !(t.refresh_at > 0.0 && t.refresh_at < 1.0) {
            p.add(
                "token.refresh_at",
                "must be a fraction between 0 and 1 (exclusive)",
            );
        }
        for (key, d) in [
            ("token.assertion_lifetime", t.assertion_lifetime),
            ("token.default_token_ttl", t.default_token_ttl),
            ("token.request_timeout", t.request_timeout),
            ("token.retry_backoff_initial", t.retry_backoff_initial),
            ("token.retry_backoff_max", t.retry_backoff_max),
        ] {
            if d.is_zero() {
                p.add(key, "must be greater than zero");
            }
        }
        if t.assertion_lifetime <= t.clock_skew_tolerance {
            p.add(
                "token.assertion_lifetime",
                "must be longer than token.clock_skew_tolerance (a server running ahead would see the assertion expired)",
            );
        }
        if t.retry_backoff_max < t.retry_backoff_initial {
            p.add(
                "token.retry_backoff_max",
                "must not be less than token.retry_backoff_initial",
            );
        }
        if t.max_attempts == 0 {
            p.add("token.max_attempts", "must be at least 1");
        }
        if t.max_response_bytes < 1024 {
            p.add("token.max_response_bytes", "must be at least 1024");
        }
        if let Some(f) = &t.ca_file {
            check_ca_file(p, "token.ca_file", f);
        }
        for name in t.extra_params.keys() {
            if RESERVED_PARAMS.contains(&name.as_str()) {
                p.add(
                    format!("token.extra_params.{name}"),
                    "is set by the sidecar itself and cannot be overridden",
                );
            }
        }
    }

    fn validate_routes(&self, p: &mut Problems) {
        if self.route.is_empty() {
            p.add("route", "at least one [[route]] is required");
        }
        let mut names = std::collections::HashSet::new();
        let mut listens = std::collections::HashSet::new();
        let mut matchers = std::collections::HashSet::new();
        for (i, r) in self.route.iter().enumerate() {
            let k = |field: &str| format!("route[{i}].{field}");
            if r.name.trim().is_empty() {
                p.add(k("name"), "must not be empty");
            } else if !names.insert(r.name.as_str()) {
                p.add(k("name"), format!("duplicate route name {:?}", r.name));
            }
            if r.listen.is_none() && r.host.is_none() && r.path_prefix.is_none() {
                p.add(
                    k("listen"),
                    "a route needs at least one of listen, host, path_prefix",
                );
            }
            if let Some(addr) = r.listen {
                if addr.port() == 0 {
                    // Port 0 asks the kernel for a free port: never a clash.
                } else if addr == self.proxy.listen || addr == self.admin.listen {
                    p.add(
                        k("listen"),
                        "must differ from proxy.listen and admin.listen",
                    );
                } else if !listens.insert(addr) {
                    p.add(k("listen"), format!("{addr} is used by another route"));
                }
            }
            if let Some(h) = &r.host
                && (h.is_empty() || h.contains('/') || h.contains(char::is_whitespace))
            {
                p.add(k("host"), "must be a host name (optionally with :port)");
            }
            if let Some(prefix) = &r.path_prefix
                && !prefix.starts_with('/')
            {
                p.add(k("path_prefix"), "must start with '/'");
            }
            if r.strip_prefix && r.path_prefix.is_none() {
                p.add(k("strip_prefix"), "needs path_prefix");
            }
            if r.listen.is_none() {
                let key = (
                    r.host.as_deref().map(str::to_ascii_lowercase),
                    r.path_prefix.clone(),
                );
                if !matchers.insert(key) {
                    p.add(
                        k("path_prefix"),
                        "another route on the main listener has the same host and path_prefix",
                    );
                }
            }
            match Url::parse(&r.upstream) {
                Err(e) => p.add(k("upstream"), format!("not a valid URL: {e}")),
                Ok(u) => {
                    match u.scheme() {
                        "https" => {}
                        "http" if r.allow_insecure_upstream => {}
                        "http" => p.add(
                            k("upstream"),
                            "plain http:// would send the bearer token in clear text; use https:// or set allow_insecure_upstream = true on this route",
                        ),
                        s => p.add(
                            k("upstream"),
                            format!("scheme {s:?} is not supported; use https://"),
                        ),
                    }
                    if u.host_str().is_none_or(str::is_empty) {
                        p.add(k("upstream"), "has no host");
                    }
                    if u.query().is_some() || u.fragment().is_some() {
                        p.add(k("upstream"), "must not have a query or fragment");
                    }
                    if !u.username().is_empty() || u.password().is_some() {
                        p.add(k("upstream"), "must not carry user info");
                    }
                }
            }
            for (j, s) in r.scope.iter().enumerate() {
                if !is_scope_token(s) {
                    p.add(
                        format!("route[{i}].scope[{j}]"),
                        "must be a non-empty scope without spaces, quotes or backslashes (RFC 6749 §3.3)",
                    );
                }
            }
            for (j, a) in r.audience.iter().enumerate() {
                if a.is_empty() || a.contains(char::is_whitespace) {
                    p.add(
                        format!("route[{i}].audience[{j}]"),
                        "must be non-empty and contain no whitespace",
                    );
                }
            }
            for (key, d) in [
                ("connect_timeout", r.connect_timeout),
                ("timeout", r.timeout),
            ] {
                if d.is_zero() {
                    p.add(k(key), "must be greater than zero");
                }
            }
            if let Some(f) = &r.ca_file {
                check_ca_file(p, &k("ca_file"), f);
            }
        }
    }
}

/// Form parameters the token client writes itself.
const RESERVED_PARAMS: &[&str] = &[
    "grant_type",
    "client_id",
    "client_secret",
    "client_assertion",
    "client_assertion_type",
    "scope",
    "audience",
    "resource",
];

/// RFC 6749 §3.3: `scope-token = 1*( %x21 / %x23-5B / %x5D-7E )`.
fn is_scope_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b == 0x21 || (0x23..=0x5B).contains(&b) || (0x5D..=0x7E).contains(&b))
}

fn check_readable(p: &mut Problems, key: &str, path: &Path) {
    if let Err(e) = std::fs::metadata(path) {
        p.add(key, format!("cannot read {}: {e}", path.display()));
    }
}

fn check_ca_file(p: &mut Problems, key: &str, path: &Path) {
    match crate::tls::load_certs(path) {
        Ok(certs) if certs.is_empty() => {
            p.add(key, format!("{} holds no PEM certificates", path.display()))
        }
        Ok(_) => {}
        Err(e) => p.add(key, e.to_string()),
    }
}

impl Config {
    /// The effective configuration as TOML, secrets redacted (for `check-config`).
    pub fn to_redacted_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot render config: {e}\n"))
    }
}

impl Serialize for Secret<String> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("[redacted]")
    }
}

impl<'de> Deserialize<'de> for Secret<String> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(Secret::new)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
[token]
token_url = "https://idp.example.com/oauth2/token"
client_id = "svc"
auth_method = "client_secret_post"
client_secret = "hunter2"

[[route]]
name = "orders"
path_prefix = "/orders/"
upstream = "https://orders.example.com"
"#;

    #[test]
    fn minimal_config_gets_defaults() {
        let c = from_toml_str(MINIMAL).unwrap();
        assert_eq!(c.proxy.listen, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(c.token.assertion_lifetime, Duration::from_secs(60));
        assert_eq!(c.token.refresh_at, 0.8);
        assert_eq!(c.route[0].timeout, Duration::from_secs(60));
        assert_eq!(c.token.audience_param, AudienceParam::Audience);
    }

    #[test]
    fn every_problem_is_reported_with_its_key() {
        let text = r#"
[token]
token_url = "http://idp.example.com/token"
client_id = ""
refresh_at = 1.5

[[route]]
name = "a"
upstream = "http://orders.example.com"
scope = ["has space"]

[[route]]
name = "a"
path_prefix = "nope"
upstream = "https://x.example.com"
"#;
        let err = from_toml_str(text).unwrap_err();
        let keys: Vec<&str> = err.problems.iter().map(|p| p.key.as_str()).collect();
        for want in [
            "token.token_url",
            "token.client_id",
            "token.private_key_file",
            "token.refresh_at",
            "route[0].listen",
            "route[0].upstream",
            "route[0].scope[0]",
            "route[1].name",
            "route[1].path_prefix",
        ] {
            assert!(keys.contains(&want), "missing {want} in {keys:?}");
        }
        assert_eq!(err.to_string().lines().count(), err.problems.len());
    }

    #[test]
    fn unknown_keys_and_bad_durations_name_the_key() {
        let err = from_toml_str(&format!(
            "{MINIMAL}\n[log]\nformat = \"text\"\ncolour = true\n"
        ))
        .unwrap_err();
        assert!(err.to_string().contains("log"), "{err}");
        assert!(err.to_string().contains("colour"), "{err}");

        let text = MINIMAL.replace("[token]", "[token]\nrequest_timeout = \"ten seconds\"");
        let err = from_toml_str(&text).unwrap_err();
        assert_eq!(err.problems[0].key, "token.request_timeout", "{err}");
    }

    #[test]
    fn redacted_output_hides_the_secret() {
        let c = from_toml_str(MINIMAL).unwrap();
        let out = c.to_redacted_toml();
        assert!(!out.contains("hunter2"), "{out}");
        assert!(out.contains("[redacted]"));
        assert!(!format!("{c:?}").contains("hunter2"));
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment's Jail fixes the closure's error type
    fn only_section_separated_env_vars_are_config() {
        figment::Jail::expect_with(|jail| {
            let dir = jail.directory().to_path_buf();
            std::fs::write(dir.join("s.toml"), MINIMAL).unwrap();
            // What Kubernetes injects for a Service named "sidecar": not config, not an error.
            jail.set_env("SIDECAR_PORT", "tcp://10.0.0.1:80");
            jail.set_env("SIDECAR_SERVICE_HOST", "10.0.0.1");
            jail.set_env("SIDECAR_CONFIG", dir.join("s.toml").display().to_string());
            jail.set_env("SIDECAR_TOKEN__CLIENT_ID", "from-env");
            let c = load(&dir.join("s.toml")).map_err(|e| e.to_string())?;
            assert_eq!(c.token.client_id, "from-env");
            jail.set_env("SIDECAR_TOKEN__NOPE", "1");
            let err = load(&dir.join("s.toml")).unwrap_err();
            assert!(err.to_string().contains("nope"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn scope_tokens_follow_rfc6749() {
        assert!(is_scope_token("orders:read"));
        assert!(!is_scope_token(""));
        assert!(!is_scope_token("a b"));
        assert!(!is_scope_token("a\"b"));
        assert!(!is_scope_token("a\\b"));
    }
}
