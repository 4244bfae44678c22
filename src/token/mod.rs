//! The token layer: everything between a route's (scope set, audience set) and a usable access
//! token. It depends on the key layer and on nothing of the proxy or the server.
//!
//! - [`response`] — the cache key, RFC 6749 §5.1/§5.2 types and the pure response parser.
//! - [`assertion`] — the RFC 7523 client assertion.
//! - [`assertion_file`] — a platform-issued client assertion read from a rotating file.
//! - [`client`] — one `client_credentials` request with the retry policy (request building is
//!   separate from sending).
//! - [`discovery`] — the token endpoint from the issuer's metadata, refreshed on a schedule.
//! - [`cache`] — one slot per key, refreshed ahead of expiry by a single, supervised refresher
//!   per key.
//! - [`registry`] — the OAuth clients (`[token]` and each `[[client]]`), each with its fixed
//!   slots and its bounded moka cache of run-time slots.
//! - [`backoff`] — the per-key retry schedule, a pure state machine.
//! - [`gate`] — how often a token the upstream rejected may be refetched, pure.
//! - [`mtls`] — RFC 8705 client certificates: loaded, checked, re-read on rotation; used by
//!   the token client and by the proxy's upstream connectors.
//!
//! Invariant: every `Instant + Duration` here goes through [`later`], so no configured or
//! server-sent duration can overflow a deadline and panic a refresher.

pub(crate) mod assertion;
pub(crate) mod assertion_file;
pub(crate) mod backoff;
pub(crate) mod cache;
pub(crate) mod client;
pub(crate) mod discovery;
pub(crate) mod gate;
pub(crate) mod mtls;
#[cfg(test)]
mod props;
pub(crate) mod registry;
pub(crate) mod response;
#[cfg(test)]
mod sim;

use std::time::Duration;

use tokio::time::Instant;

pub(crate) use response::*;

/// `t + d`, saturating: a sum that would overflow becomes a moment about 30 years on, which is
/// "never" for a running process (Tokio's own far-future timers use the same horizon).
pub(crate) fn later(t: Instant, d: Duration) -> Instant {
    const FAR: Duration = Duration::from_secs(86_400 * 365 * 30);
    t.checked_add(d).or_else(|| t.checked_add(FAR)).unwrap_or(t)
}
