//! Configuration: `sidecar.toml` plus `SIDECAR_<SECTION>__<KEY>` environment overrides.
//!
//! This module is the schema: the serde types exactly as `sidecar.toml` spells them. The other
//! parts each have one job:
//!
//! - `defaults.rs` holds every default value, and nothing else does. The README's configuration
//!   table and the comments in `sidecar.toml` restate them; a unit test there fails when either
//!   disagrees with the code or leaves out a key.
//! - `load.rs` layers built-in defaults < a base (the TOML file, or `dev`'s built-in
//!   config) < the environment with figment and deserializes strictly (unknown keys are errors).
//!   Every command goes through the same layering.
//! - `validate.rs` checks everything serde cannot express and reports *every* problem at once,
//!   each naming its key, so an operator fixes a broken file in one round trip.
//! - `bounds.rs` holds the upper bound of every duration and size, so no configured value can
//!   overflow deadline arithmetic or size a buffer absurdly.
//! - `pattern.rs` and `wildcard.rs` hold the pure grammars validation and the proxy share:
//!   allow-list patterns, wildcard hosts and their `{host}`/`{label}` templates.
//!
//! Invariants: a [`Config`] handed to the server has passed [`Config::validate`]; it is immutable
//! for the life of the process; secrets never appear in its `Debug` or redacted TOML output.

mod bounds;
mod defaults;
mod error;
mod load;
pub(crate) mod pattern;
mod validate;
pub(crate) mod wildcard;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::secret::Secret;

pub use error::ConfigError;
pub use error::Problem;
pub use load::from_toml_str;
#[cfg(feature = "dev")]
pub(crate) use load::{Base, layered};
pub(crate) use load::{load, resolve_path};

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
    /// `[[client]]` tables: more OAuth clients besides `[token]` (which is the client named
    /// `default`); a route picks one with `client = "NAME"`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub client: Vec<ClientConfig>,
    #[serde(default)]
    pub log: LogConfig,
    #[serde(default)]
    pub token_endpoint: TokenEndpointConfig,
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
    /// A request body that makes no progress for this long ends the request (408 before
    /// anything was forwarded, else the upstream request is aborted) and frees the connection.
    #[serde(with = "duration_str")]
    pub body_read_timeout: Duration,
    /// HTTP/2: most streams (requests) in flight at once on one downstream connection.
    pub max_concurrent_streams: u32,
    /// Hosts besides the loopback names (`localhost`, `127.0.0.1`, `[::1]`, any port) whose
    /// requests the main listener's path routes answer; anything else gets 421.
    pub allowed_hosts: Vec<String>,
}

/// `[admin]`: the operations listener (`/healthz`, `/readyz`).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    pub listen: SocketAddr,
    /// Connections accepted at once on the admin listener (apart from the proxy's).
    pub max_connections: usize,
    /// Connections one peer address may hold at once on the admin listener.
    pub max_connections_per_peer: usize,
    /// A client slower than this to send its request head to the admin listener is cut off.
    #[serde(with = "duration_str")]
    pub header_read_timeout: Duration,
}

/// How the client authenticates at the token endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AuthMethod {
    /// RFC 7523 §2.2: a freshly signed JWT per request.
    PrivateKeyJwt,
    /// RFC 6749 §2.3.1: HTTP Basic with the client secret.
    ClientSecretBasic,
    /// RFC 6749 §2.3.1: the client secret in the form body.
    ClientSecretPost,
    /// RFC 8705 §2.1: a client certificate from a CA the server trusts (`client_cert_file`).
    TlsClientAuth,
    /// RFC 8705 §2.2: a self-signed client certificate registered with the server as a JWK.
    SelfSignedTlsClientAuth,
    /// RFC 7521 §4.2: a JWT the platform writes and rotates (a projected service-account
    /// token, `AZURE_FEDERATED_TOKEN_FILE`, a SPIFFE JWT-SVID), read from
    /// `token.client_assertion_file` and sent as `client_assertion`: no long-lived secret.
    ClientAssertionFile,
}

/// How the route's audiences are requested.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AudienceParam {
    /// Ory Hydra / Auth0: one `audience` parameter, space-separated.
    Audience,
    /// RFC 8707: one `resource` parameter per audience.
    Resource,
}

/// `[token]`: the authorization server and this client's registration there.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TokenConfig {
    /// The token endpoint, e.g. `https://hydra.example.com/oauth2/token`. Exactly one of
    /// `token_url` and `issuer` is set; read it through [`TokenConfig::endpoint`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_url: Option<String>,
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
    #[serde(default = "defaults::token::assertion_lifetime", with = "duration_str")]
    pub assertion_lifetime: Duration,
    /// The token endpoint's clock may differ from ours by this much: the assertion's `iat` is
    /// set this far in the past (a server running behind must not see it in its future) and its
    /// `exp` stays `assertion_lifetime` ahead (which must exceed this tolerance).
    #[serde(
        default = "defaults::token::clock_skew_tolerance",
        with = "duration_str"
    )]
    pub clock_skew_tolerance: Duration,
    /// File holding the client secret (`client_secret_basic` / `client_secret_post`).
    #[serde(default)]
    pub client_secret_file: Option<PathBuf>,
    /// The client secret inline; prefer `client_secret_file` or the environment.
    #[serde(default)]
    pub client_secret: Option<Secret<String>>,
    /// `client_assertion_file`: the JWT the platform writes and rotates; re-read when it
    /// changes and before it expires.
    #[serde(default)]
    pub client_assertion_file: Option<PathBuf>,
    /// `client_assertion_file`: the `client_assertion_type` sent with it (RFC 7523 jwt-bearer,
    /// or e.g. SPIFFE's `urn:ietf:params:oauth:client-assertion-type:jwt-spiffe`).
    #[serde(default = "defaults::token::client_assertion_type")]
    pub client_assertion_type: String,
    #[serde(default)]
    pub audience_param: AudienceParam,
    /// Fraction of a token's lifetime after which it is refreshed.
    #[serde(default = "defaults::token::refresh_at")]
    pub refresh_at: f64,
    /// Refresh at the latest this long before expiry (whichever of the two comes first).
    #[serde(
        default = "defaults::token::refresh_before_expiry",
        with = "duration_str"
    )]
    pub refresh_before_expiry: Duration,
    /// A token is never sent within this long of its expiry.
    #[serde(default = "defaults::token::expiry_skew", with = "duration_str")]
    pub expiry_skew: Duration,
    /// Lifetime assumed when the response has neither `expires_in` nor a JWT `exp`.
    #[serde(default = "defaults::token::default_token_ttl", with = "duration_str")]
    pub default_token_ttl: Duration,
    /// Bound on one whole token fetch, retries included.
    #[serde(default = "defaults::token::request_timeout", with = "duration_str")]
    pub request_timeout: Duration,
    /// Attempts per fetch for retryable failures (transport, timeout, 5xx, `jti_known`).
    #[serde(default = "defaults::token::max_attempts")]
    pub max_attempts: u32,
    /// First pause after a failed fetch; doubles per consecutive failure, with jitter.
    #[serde(
        default = "defaults::token::retry_backoff_initial",
        with = "duration_str"
    )]
    pub retry_backoff_initial: Duration,
    /// Cap on the pause between failed fetches.
    #[serde(default = "defaults::token::retry_backoff_max", with = "duration_str")]
    pub retry_backoff_max: Duration,
    /// A token the upstream rejected is refetched at most once per this interval (doubling
    /// while the new tokens are rejected too, up to 5 minutes).
    #[serde(
        default = "defaults::token::min_refetch_interval",
        with = "duration_str"
    )]
    pub min_refetch_interval: Duration,
    /// Largest token response body read, in bytes.
    #[serde(default = "defaults::token::max_response_bytes")]
    pub max_response_bytes: usize,
    /// Extra CA certificates (PEM) trusted for the token endpoint, on top of the system roots.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Additional form parameters sent with every token request.
    #[serde(default)]
    pub extra_params: BTreeMap<String, String>,
    /// The client certificate chain (PEM, leaf first) presented to the token endpoint with
    /// `tls_client_auth` / `self_signed_tls_client_auth` (RFC 8705); re-read when it changes.
    #[serde(default)]
    pub client_cert_file: Option<PathBuf>,
    /// The private key (PEM) of `client_cert_file`; re-read when it changes.
    #[serde(default)]
    pub client_key_file: Option<PathBuf>,
    // Discovery and trust pinning (issue 12 items 4 and 5; docs/spec.md §2).
    /// The issuer whose metadata names the token endpoint (OIDC Discovery, RFC 8414), instead
    /// of `token_url`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issuer: Option<String>,
    /// Accept a discovered token endpoint on another host than the issuer's.
    #[serde(default)]
    pub allow_cross_host_endpoint: bool,
    /// How often the issuer's metadata is fetched again; a failure keeps the last good one.
    #[serde(
        default = "defaults::token::discovery_refresh_interval",
        with = "duration_str"
    )]
    pub discovery_refresh_interval: Duration,
    /// Trust only `ca_file` for the token endpoint (and discovery), not the public roots.
    #[serde(default)]
    pub ca_only: bool,
    // The run-time token cache (issue 13; docs/spec.md §3).
    /// Most keys (scope set, audience set) created at run time held at once by this client;
    /// the least useful one is evicted beyond it. Keys known at start do not count.
    #[serde(default = "defaults::token::cache_capacity")]
    pub cache_capacity: u64,
    /// A run-time key no request asked for during this long is evicted (its refresher stops).
    #[serde(default = "defaults::token::cache_idle_timeout", with = "duration_str")]
    pub cache_idle_timeout: Duration,
}

/// `[[client]]`: one more OAuth client, named, with every `[token]` key (same names, same
/// defaults, same validation).
///
/// Flattened, so serde cannot deny unknown keys inside it: [`ClientConfig`]'s own
/// `Deserialize` reads the table, takes `name` out and hands the rest to the strict
/// [`TokenConfig`], so a typo in a `[[client]]` block is refused like one in `[token]`.
#[derive(Debug, Clone, Serialize)]
pub struct ClientConfig {
    /// Unique; routes name it in `client`. `default` is the `[token]` section's.
    pub name: String,
    #[serde(flatten)]
    pub token: TokenConfig,
}

impl<'de> Deserialize<'de> for ClientConfig {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::{Error, IntoDeserializer};
        let mut table = toml::Table::deserialize(d)?;
        let name = match table.remove("name") {
            Some(toml::Value::String(n)) => n,
            Some(_) => return Err(D::Error::custom("name: must be a string")),
            None => return Err(D::Error::missing_field("name")),
        };
        let token = TokenConfig::deserialize(toml::Value::Table(table).into_deserializer())
            .map_err(D::Error::custom)?;
        Ok(ClientConfig { name, token })
    }
}

/// Where the token endpoint comes from: the one accessor for `token_url` / `issuer`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum EndpointSource<'a> {
    /// `token_url`, exactly as written.
    Fixed(&'a str),
    /// `issuer`: the endpoint is discovered at start (`token::discovery`).
    Issuer(&'a str),
}

impl TokenConfig {
    /// The configured source of the token endpoint. Validation guarantees exactly one of the
    /// two keys; an unvalidated config with neither reads as an empty fixed URL.
    pub(crate) fn endpoint(&self) -> EndpointSource<'_> {
        match (&self.issuer, &self.token_url) {
            (Some(i), None) => EndpointSource::Issuer(i),
            (_, Some(u)) => EndpointSource::Fixed(u),
            (None, None) => EndpointSource::Fixed(""),
        }
    }
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
    #[serde(default = "defaults::route::connect_timeout", with = "duration_str")]
    pub connect_timeout: Duration,
    /// Until the upstream's response headers arrive.
    #[serde(default = "defaults::route::timeout", with = "duration_str")]
    pub timeout: Duration,
    /// Extra CA certificates (PEM) trusted for this upstream, on top of the system roots.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Treat any 401 from the upstream as a rejected token (evict, replay once), not only a
    /// `WWW-Authenticate: Bearer error="invalid_token"` challenge.
    #[serde(default)]
    pub retry_on_401: bool,
    /// A client certificate chain (PEM) presented to this upstream (mutual TLS); re-read when
    /// it changes.
    #[serde(default)]
    pub client_cert_file: Option<PathBuf>,
    /// The private key (PEM) of the route's `client_cert_file`.
    #[serde(default)]
    pub client_key_file: Option<PathBuf>,
    /// Present the token client's certificate (`token.client_cert_file`) to this upstream: a
    /// resource server checks that a certificate-bound token (RFC 8705 §3) comes with it.
    #[serde(default)]
    pub use_token_client_cert: bool,
    /// Trust only `ca_file` for this upstream, not the public roots (a pinned private CA).
    #[serde(default)]
    pub ca_only: bool,
    // Per-request targets (issue 13 item 2; docs/spec.md §4).
    /// Audiences a request may ask for with `token-sidecar-audience` (exact strings or `*`
    /// patterns, config::pattern); empty: the header is refused on this route.
    #[serde(default)]
    pub allow_audiences: Vec<String>,
    /// Scopes a request may ask for with `token-sidecar-scope`; empty: the header is refused.
    #[serde(default)]
    pub allow_scopes: Vec<String>,
    /// The OAuth client whose tokens this route sends: a `[[client]]` name; unset = the
    /// `[token]` client (`default`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
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

/// `[token_endpoint]`: an OAuth-compatible token endpoint on loopback (docs/spec.md, token
/// endpoint): `POST /oauth2/token` answered from the token cache, for tools that only accept a
/// token URL.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TokenEndpointConfig {
    /// Off unless set. A loopback address only: callers are not authenticated.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<SocketAddr>,
    /// Scopes a caller may ask for (exact strings or `*` patterns); empty: none (a request may
    /// then only omit `scope`).
    pub allow_scopes: Vec<String>,
    /// Audiences (`audience` and `resource` values) a caller may ask for; empty: none.
    pub allow_audiences: Vec<String>,
    /// The clients (`client_id`) the endpoint serves; empty: every client.
    pub clients: Vec<String>,
    /// Connections served at once; further callers wait in the kernel backlog.
    pub max_connections: usize,
    /// A request body not complete this long after its head is refused (408).
    #[serde(with = "duration_str")]
    pub body_read_timeout: Duration,
}

/// Durations are written as strings like `"60s"`, `"5m"`, `"250ms"`.
pub(crate) mod duration_str {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub(crate) fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_duration(text.trim()).map_err(|e| {
            serde::de::Error::custom(format!(
                "invalid duration {text:?} ({e}); write it like \"10s\", \"5m\" or \"250ms\""
            ))
        })
    }
}

impl Config {
    /// Every client's name and token settings: `[token]` as `default` first, then each
    /// `[[client]]` in file order.
    pub(crate) fn clients(&self) -> Vec<(&str, &TokenConfig)> {
        let mut v = vec![(crate::token::registry::DEFAULT_CLIENT, &self.token)];
        v.extend(self.client.iter().map(|c| (c.name.as_str(), &c.token)));
        v
    }

    /// The effective configuration as TOML, secrets redacted (for `check-config`).
    pub fn to_redacted_toml(&self) -> String {
        let mut shown = self.clone();
        // A token_url query may hold an API key (user info is refused by validation, but this
        // also renders configs that failed it): shown like a secret, as a marker only. The
        // same for every `[[client]]`.
        let redact = |url: &mut Option<String>| {
            if let Some(Ok(u)) = url.as_deref().map(url::Url::parse)
                && (u.query().is_some() || u.fragment().is_some() || !u.username().is_empty())
            {
                *url = Some(format!(
                    "{}?[redacted]",
                    crate::util::redact_url(u.as_str())
                ));
            }
        };
        redact(&mut shown.token.token_url);
        for c in &mut shown.client {
            redact(&mut c.token.token_url);
        }
        toml::to_string_pretty(&shown).unwrap_or_else(|e| format!("# cannot render config: {e}\n"))
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

/// A valid config that sets one non-default value per section it names, for the tests here and
/// in the submodules.
#[cfg(test)]
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacted_output_hides_the_token_url_query_and_user_info() {
        let text = MINIMAL.replace(
            "https://idp.example.com/oauth2/token",
            "https://idp.example.com/oauth2/token?api_key=SECRET",
        );
        let out = from_toml_str(&text).unwrap().to_redacted_toml();
        assert!(!out.contains("SECRET"), "{out}");
        assert!(
            out.contains("token_url = \"https://idp.example.com/oauth2/token?[redacted]\""),
            "{out}"
        );
        // Also for a config validation refused (user info), should anything render it.
        let text = MINIMAL.replace("https://idp", "https://user:pass@idp");
        let c = load::parse_unvalidated(&text).unwrap();
        assert!(!c.to_redacted_toml().contains("pass"));
        // A [[client]]'s too.
        let text = format!("{MINIMAL}{TWO_CLIENTS}").replace(
            "https://idp.example.com/oauth2/token\"\nclient_id = \"billing-svc\"",
            "https://idp.example.com/oauth2/token?api_key=SECRET2\"\nclient_id = \"billing-svc\"",
        );
        let out = from_toml_str(&text).unwrap().to_redacted_toml();
        assert!(!out.contains("SECRET2"), "{out}");
        // Nothing to hide: the URL exactly as written (it is the assertion's default `aud`).
        let out = from_toml_str(MINIMAL).unwrap().to_redacted_toml();
        assert!(out.contains("token_url = \"https://idp.example.com/oauth2/token\""));
    }

    #[test]
    fn redacted_output_hides_the_secret() {
        let c = from_toml_str(MINIMAL).unwrap();
        let out = c.to_redacted_toml();
        assert!(!out.contains("hunter2"), "{out}");
        assert!(out.contains("[redacted]"));
        assert!(!format!("{c:?}").contains("hunter2"));
    }

    // `[[client]]` and `route.client` (issue 13 item 1).

    const TWO_CLIENTS: &str = r#"
[[client]]
name = "billing"
token_url = "https://idp.example.com/oauth2/token"
client_id = "billing-svc"
auth_method = "client_secret_basic"
client_secret = "s3cret"
request_timeout = "3s"

[[route]]
name = "billing"
path_prefix = "/billing/"
upstream = "https://billing.example.com"
client = "billing"
"#;

    #[test]
    fn a_client_block_takes_every_token_key_with_its_defaults() {
        let c = from_toml_str(&format!("{MINIMAL}{TWO_CLIENTS}")).unwrap();
        assert_eq!(c.client.len(), 1);
        let b = &c.client[0];
        assert_eq!(b.name, "billing");
        assert_eq!(b.token.client_id, "billing-svc");
        assert_eq!(b.token.auth_method, AuthMethod::ClientSecretBasic);
        assert_eq!(b.token.request_timeout, Duration::from_secs(3));
        // Not set: the [token] defaults, the same functions.
        assert_eq!(b.token.refresh_at, c.token.refresh_at);
        assert_eq!(b.token.cache_capacity, 1000);
        assert_eq!(b.token.cache_idle_timeout, Duration::from_secs(900));
        assert_eq!(c.route[1].client.as_deref(), Some("billing"));
        let names: Vec<&str> = c.clients().iter().map(|(n, _)| *n).collect();
        assert_eq!(names, ["default", "billing"]);
        // The secret of a [[client]] is redacted like [token]'s.
        let out = c.to_redacted_toml();
        assert!(
            !out.contains("s3cret") && out.contains("[[client]]"),
            "{out}"
        );
        assert!(!format!("{c:?}").contains("s3cret"));
    }

    #[test]
    fn a_client_block_is_as_strict_as_token() {
        // An unknown key inside [[client]] is refused (flatten alone would let it through).
        let text = format!("{MINIMAL}{TWO_CLIENTS}").replace(
            "request_timeout = \"3s\"",
            "request_timeout = \"3s\"\nrefresh_att = 0.5",
        );
        let err = from_toml_str(&text).unwrap_err();
        assert!(err.to_string().contains("refresh_att"), "{err}");
        // The same validation as [token], named by the client's index.
        let text = format!("{MINIMAL}{TWO_CLIENTS}")
            .replace("auth_method = \"client_secret_basic\"", "")
            .replace(
                "\"https://idp.example.com/oauth2/token\"\nclient_id = \"billing-svc\"",
                "\"http://idp.example.com/oauth2/token\"\nclient_id = \"billing-svc\"",
            );
        let err = from_toml_str(&text).unwrap_err();
        let keys: Vec<&str> = err.problems.iter().map(|p| p.key.as_str()).collect();
        assert!(keys.contains(&"client[0].token_url"), "{err}");
        assert!(keys.contains(&"client[0].private_key_file"), "{err}");
        assert!(!keys.iter().any(|k| k.starts_with("token.")), "{err}");
        // The cache keys' own rules and bounds too.
        let text = format!("{MINIMAL}{TWO_CLIENTS}")
            .replace("request_timeout = \"3s\"", "cache_capacity = 0");
        let err = from_toml_str(&text).unwrap_err();
        assert_eq!(err.problems[0].key, "client[0].cache_capacity", "{err}");
        let text = format!("{MINIMAL}{TWO_CLIENTS}")
            .replace("request_timeout = \"3s\"", "cache_capacity = 2000000");
        let err = from_toml_str(&text).unwrap_err();
        assert_eq!(err.problems[0].key, "client[0].cache_capacity", "{err}");
    }

    #[test]
    fn client_names_are_unique_plain_and_routes_name_existing_ones() {
        let two = format!("{MINIMAL}{TWO_CLIENTS}");
        let dup = two.clone() + &TWO_CLIENTS[..TWO_CLIENTS.find("[[route]]").unwrap()];
        let err = from_toml_str(&dup).unwrap_err();
        assert_eq!(err.problems[0].key, "client[1].name", "{err}");
        assert!(err.to_string().contains("duplicate"), "{err}");
        let err = from_toml_str(&two.replace(
            "name = \"billing\"\ntoken_url",
            "name = \"default\"\ntoken_url",
        ))
        .unwrap_err();
        assert!(
            err.problems.iter().any(|p| p.key == "client[0].name"),
            "{err}"
        );
        let err = from_toml_str(&two.replace(
            "name = \"billing\"\ntoken_url",
            "name = \"bil ling\"\ntoken_url",
        ))
        .unwrap_err();
        assert!(
            err.problems.iter().any(|p| p.key == "client[0].name"),
            "{err}"
        );
        let err = from_toml_str(&two.replace("client = \"billing\"", "client = \"billling\""))
            .unwrap_err();
        assert_eq!(err.problems[0].key, "route[1].client", "{err}");
        // `default` names [token] explicitly.
        assert!(
            from_toml_str(&two.replace("client = \"billing\"", "client = \"default\"")).is_ok()
        );
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment's Jail fixes the closure's error type
    fn env_overrides_cannot_address_one_client_of_the_array() {
        // Documented in sidecar.toml: SIDECAR_CLIENT__… is a map, not the array; it replaces
        // nothing silently, it fails the load naming `client`.
        figment::Jail::expect_with(|jail| {
            let dir = jail.directory().to_path_buf();
            std::fs::write(dir.join("s.toml"), format!("{MINIMAL}{TWO_CLIENTS}")).unwrap();
            jail.set_env("SIDECAR_CLIENT__0__CLIENT_ID", "other");
            let err = load(&dir.join("s.toml")).unwrap_err();
            assert!(
                err.problems.iter().any(|p| p.key.starts_with("client")),
                "{err}"
            );
            Ok(())
        });
    }
}
