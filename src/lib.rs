//! token-sidecar: gets OAuth2 access tokens with the `client_credentials` grant and
//! `private_key_jwt` client authentication, caches them per (scope set, audience set), and
//! injects them into requests it forwards to upstream APIs.
//!
//! # Layout
//!
//! Layers, each a folder; dependencies point one way: key → token → proxy → server.
//!
//! - [`config`](crate::config) — `sidecar.toml` + `SIDECAR_*` environment: schema with its
//!   defaults, loading, validation that names every bad key; the pure grammars of allow-list
//!   patterns and wildcard hosts with their `{host}`/`{label}` templates.
//! - `key/` — the signing key: the one algorithm catalogue, decoding PEM and JWK files through
//!   maintained crates, re-reading the file when it changes.
//! - `token/` — the cache key and RFC 6749 response types, the RFC 7523 assertion (signed, or
//!   the platform's JWT from a rotating file), the token client (request building separate
//!   from sending), the token endpoint discovered from the issuer's metadata (refreshed on a
//!   schedule), the refresh-ahead cache with
//!   its supervised refreshers, the OAuth clients with their bounded run-time caches
//!   (`registry`: `[token]` and `[[client]]`s, moka), the per-key retry schedule, the eviction gate, the RFC 8705
//!   client certificates (loaded, checked, re-read on rotation; also presented to upstreams).
//! - `proxy/` — the request path as named phase functions, routes, per-request targets
//!   (audience/scope headers, wildcard fills), header rules, the request
//!   body's progress deadline, the upstream pool, and the one place errors become responses.
//! - `server/` — listeners, the one accept loop, admission by peer (evicting idle connections
//!   before refusing), the per-connection watchdog, the scan of request heads for conflicting
//!   framing, the admin endpoints, the loopback OAuth token endpoint, graceful shutdown, the
//!   worst-case memory arithmetic (test).
//! - `metrics` — Prometheus metrics; reads the token cache at scrape time, read by the server.
//! - `dev/` (cargo feature `dev`, on by default) — `token-sidecar dev`: the strict development
//!   authorization server and the echo upstream.
//! - `cli` — the command line; `main.rs` only calls it.
//! - Foundations: `secret` (redacting newtype), `tls` (trust roots), `telemetry` (logging),
//!   `util` (Unix time, error chains, redacted URLs, bounded file reads).
//!
//! `docs/spec.md` is the contract the code follows; doc comments cite its sections.
#![forbid(unsafe_code)]

mod cli;
mod config;
#[cfg(feature = "dev")]
mod dev;
mod key;
mod metrics;
mod proxy;
mod secret;
mod server;
mod telemetry;
mod tls;
mod token;
mod util;

// The surface: what `main.rs`, the integration tests and the benchmarks use. Everything else is
// crate-private, so the compiler reports what nothing uses.
pub use cli::main as run_cli;
pub use config::{
    AdminConfig, AudienceParam, AuthMethod, ClientConfig, Config, ConfigError, LogConfig,
    LogFormat, ProxyConfig, RouteConfig, TokenConfig, TokenEndpointConfig, from_toml_str,
};
#[cfg(feature = "dev")]
pub use dev::authz::{DevClient, DevFederation, DevServer, DevServerConfig};
#[cfg(feature = "dev")]
pub use dev::{Dev, DevError, DevOptions, ECHO_AUDIENCE, ECHO_SCOPE};
pub use key::{Algorithm, SigningKey};
pub use secret::Secret;
pub use server::{Sidecar, StartError};
pub use token::assertion::{new_jti, sign as sign_assertion};
pub use token::cache::{Slot, TokenCache};
pub use token::response::{jwt_claims, jwt_exp};

/// The request path's phase functions and the context they share, so the benchmarks measure
/// the product itself (see `proxy/mod.rs` for the order).
pub mod phases {
    pub use crate::proxy::{Ctx, Listener, Proxy, authorize, token, upstream_request};
}
