//! Logging: `tracing` to stderr, human-readable or JSON, level from `RUST_LOG` (default `info`).
//!
//! Secrets never reach a log line because they only exist as [`crate::secret::Secret`] and
//! sensitive `HeaderValue`s, whose `Debug`/`Display` are redacted.

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Installs the global subscriber; a second call (tests) is a no-op.
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.with_target(false).try_init(),
        // Machines filter on the target: access-log events are `token_sidecar::access`.
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_target(true)
            .try_init(),
    };
}
