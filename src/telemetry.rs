//! Logging: `tracing` to stderr, human-readable or JSON, level from `RUST_LOG` (default `info`).
//!
//! Lines are handed to a dedicated writer thread through a bounded queue of
//! [`BUFFERED_LINES`] lines, so a request never waits on `write(2)`. When stderr is slower than
//! the lines arrive (a stalled log pipe, a blocked container runtime) the queue fills and
//! further lines are *dropped* and counted, never waited for: a blocked log reader must not
//! stop the proxy (docs/spec.md §6). [`dropped_lines`] reads the count, which `/metrics`
//! exports as `token_sidecar_log_dropped_total`. The returned guard flushes what is buffered
//! when the process ends.
//!
//! Secrets never reach a log line because they only exist as [`crate::secret::Secret`] and
//! sensitive `HeaderValue`s, whose `Debug`/`Display` are redacted.

use std::sync::OnceLock;

use tracing_appender::non_blocking::{ErrorCounter, WorkerGuard};
use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Lines queued for the writer thread. The queue is allocated up front; access-log lines are
/// ~250 bytes and warnings at most ~1.5 KB (error texts are cut at 1000 characters), so the
/// queue holds ~0.5 MB typically and 3 MB at worst, and absorbs a burst of 2048 lines.
pub(crate) const BUFFERED_LINES: usize = 2048;

/// The writer's drop counter. The subscriber is process-global, and so is its counter: the
/// metrics read it here rather than having it threaded through every constructor.
static DROPPED: OnceLock<ErrorCounter> = OnceLock::new();

/// Installs the global subscriber. Keep the guard until exit; a second call is a no-op.
pub(crate) fn init(format: LogFormat) -> WorkerGuard {
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        // Drop (and count) rather than block when the queue is full: a blocked stderr would
        // otherwise block every runtime thread that logs, i.e. every request.
        .lossy(true)
        .buffered_lines_limit(BUFFERED_LINES)
        .finish(std::io::stderr());
    let counter = writer.error_counter();
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer);
    let installed = match format {
        LogFormat::Text => builder.with_target(false).try_init(),
        // Machines filter on the target: access-log events are `token_sidecar::access`.
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_target(true)
            .try_init(),
    };
    if installed.is_ok() {
        let _ = DROPPED.set(counter);
    }
    guard
}

/// Log lines dropped so far because stderr could not keep up (0 before [`init`]).
pub(crate) fn dropped_lines() -> u64 {
    DROPPED
        .get()
        .map_or(0, |c| u64::try_from(c.dropped_lines()).unwrap_or(u64::MAX))
}
