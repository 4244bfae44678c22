//! Logging: `tracing` to stderr, human-readable or JSON, level from `RUST_LOG` (default `info`).
//!
//! Lines are handed to a dedicated writer thread, so a request never waits on `write(2)` and a
//! slow or stalled log pipe does not stall the proxy until the (large) buffer is full. The
//! returned guard flushes what is buffered when the process ends.
//!
//! Secrets never reach a log line because they only exist as [`crate::secret::Secret`] and
//! sensitive `HeaderValue`s, whose `Debug`/`Display` are redacted.

use tracing_appender::non_blocking::WorkerGuard;
use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Installs the global subscriber. Keep the guard until exit; a second call is a no-op.
pub(crate) fn init(format: LogFormat) -> WorkerGuard {
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        // Block rather than drop lines when the buffer is full: logs are evidence.
        .lossy(false)
        // The buffer is allocated up front: 8192 lines is ~0.25 MB instead of ~4 MB for the
        // default 128k, and still absorbs any burst a stalled pipe would cause for a while.
        .buffered_lines_limit(8192)
        .finish(std::io::stderr());
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer);
    let _ = match format {
        LogFormat::Text => builder.with_target(false).try_init(),
        // Machines filter on the target: access-log events are `token_sidecar::access`.
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_target(true)
            .try_init(),
    };
    guard
}
