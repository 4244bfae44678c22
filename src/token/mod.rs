//! The token layer: everything between a route's (scope set, audience set) and a usable access
//! token. It depends on the key layer and on nothing of the proxy or the server.
//!
//! - [`response`] — the cache key, RFC 6749 §5.1/§5.2 types and the pure response parser.
//! - [`assertion`] — the RFC 7523 client assertion.
//! - [`client`] — one `client_credentials` request with the retry policy (request building is
//!   separate from sending).
//! - [`cache`] — one slot per key, refreshed ahead of expiry by a single refresher per key.
//! - [`backoff`] — exponential backoff with jitter, pure.

pub(crate) mod assertion;
pub(crate) mod backoff;
pub(crate) mod cache;
pub(crate) mod client;
#[cfg(test)]
mod props;
pub(crate) mod response;

pub(crate) use response::*;
