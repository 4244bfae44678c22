//! token-sidecar: gets OAuth2 access tokens with the `client_credentials` grant and
//! `private_key_jwt` client authentication, caches them per (scope set, audience set), and
//! injects them into requests it forwards to upstream APIs.
//!
//! # Layout
//!
//! Configuration and start-up:
//! - [`config`] — `sidecar.toml` + `SIDECAR_*` environment, strict parsing, validation that names
//!   every bad key.
//! - [`cli`] — the command line (`run`, `check-config`, …); `main.rs` only calls it.
//! - [`server`] — binds listeners, runs the accept loops, graceful shutdown.
//! - [`conn`] — per-connection header-read and idle timeouts.
//! - [`telemetry`] — logging.
//!
//! Tokens:
//! - [`secret`] — the `Secret` newtype whose `Debug` never shows the value.
//! - [`key`] — the signing key from a PEM or JWK file, re-read when the file changes.
//! - [`assertion`] — the RFC 7523 client assertion.
//! - [`token`] — token key, RFC 6749 response and error types, the pure response parser.
//! - [`token_client`] — one token request with the SPEC §2 retry policy.
//! - [`cache`] — one slot per key, refreshed ahead of expiry by a single refresher per key.
//! - [`backoff`] — exponential backoff with jitter.
//!
//! The request path (read [`proxy`] top to bottom):
//! - [`routes`] — route table and matching, upstream URI rewriting.
//! - [`proxy`] — the phases route → token → upstream request → forward → response.
//! - [`upstream`] — the pooled HTTP/1.1 + HTTP/2 client per route.
//! - [`tls`] — trust roots and extra CA files.
//! - [`respond`] — the one place where errors become SPEC §5 responses.
//! - [`admin`] — `/healthz`, `/readyz`, `/metrics`.
//! - [`metrics`] — Prometheus metrics, resolved per route at start-up.
//!
//! Development:
//! - [`devserver`] — the embedded, strict development authorization server.
//! - [`dev`] — `token-sidecar dev`, the sidecar wired to it, and the echo upstream.
#![forbid(unsafe_code)]

pub mod admin;
pub mod assertion;
pub mod backoff;
pub mod cache;
pub mod cli;
pub mod config;
pub mod conn;
pub mod dev;
pub mod devserver;
pub mod key;
pub mod metrics;
pub mod proxy;
pub mod respond;
pub mod routes;
pub mod secret;
pub mod server;
pub mod telemetry;
pub mod tls;
pub mod token;
pub mod token_client;
pub mod upstream;
