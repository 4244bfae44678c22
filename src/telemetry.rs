//! Logging: `tracing` to stderr, human-readable or JSON, level from `RUST_LOG` (default `info`).
//!
//! `RUST_LOG` is a level (`debug`) or a list of `target=level` directives with an optional
//! default (`warn,token_sidecar=debug`): [`Targets`]'s syntax, the part of `EnvFilter`'s that
//! needs no regular expressions (span and field filters are not supported; leaving them out
//! keeps the regex engine out of the binary, ≈ 250 KB). A value that does not parse is
//! reported on stderr and `info` is used.
//!
//! Lines are handed to a dedicated writer thread through a bounded queue of
//! [`BUFFERED_LINES`] lines, so a request never waits on `write(2)`. When stderr is slower than
//! the lines arrive (a stalled log pipe, a blocked container runtime) the queue fills and
//! further lines are *dropped* and counted, never waited for: a blocked log reader must not
//! stop the proxy (docs/spec.md §6). [`dropped_lines`] reads the count, which `/metrics`
//! exports as `token_sidecar_log_dropped_total`. The writer thread takes every line queued when
//! it wakes and writes them to stderr in one `write(2)` per [`WRITE_BUFFER`] bytes (it flushes
//! whenever the queue is empty, so no line waits for the next one). Under load that is one
//! `write(2)` per ≈ 85 access-log lines instead of one per line (docs/benchmarks.md). The
//! returned guard flushes what is buffered when the process ends.
//!
//! Secrets never reach a log line because they only exist as [`crate::secret::Secret`] and
//! sensitive `HeaderValue`s, whose `Debug`/`Display` are redacted.

use std::io::IsTerminal;
use std::sync::OnceLock;

use tracing::level_filters::LevelFilter;
use tracing_appender::non_blocking::{ErrorCounter, WorkerGuard};
use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use crate::config::LogFormat;

/// Lines queued for the writer thread. The queue is allocated up front; access-log lines are
/// ~250 bytes and warnings at most ~1.5 KB (error texts are cut at 1000 characters), so the
/// queue holds ~0.5 MB typically and 3 MB at worst, and absorbs a burst of 2048 lines.
pub(crate) const BUFFERED_LINES: usize = 2048;

/// The writer thread's buffer in front of stderr: lines queued together leave together.
pub(crate) const WRITE_BUFFER: usize = 64 * 1024;

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
        .finish(std::io::BufWriter::with_capacity(
            WRITE_BUFFER,
            std::io::stderr(),
        ));
    let counter = writer.error_counter();
    let filter = filter_from(std::env::var("RUST_LOG").ok().as_deref());
    // Colour codes only for a person at a terminal: a pod's log (a pipe or a file) would
    // otherwise carry escape sequences around every field, and formatting them cost time.
    let builder = tracing_subscriber::fmt()
        .with_max_level(LevelFilter::TRACE)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(writer);
    let installed = match format {
        LogFormat::Text => builder.with_target(false).finish().with(filter).try_init(),
        // Machines filter on the target: access-log events are `token_sidecar::access`.
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_target(true)
            .finish()
            .with(filter)
            .try_init(),
    };
    if installed.is_ok() {
        let _ = DROPPED.set(counter);
    }
    guard
}

/// The filter `RUST_LOG` asks for; `info` when it is unset, empty or does not parse.
fn filter_from(rust_log: Option<&str>) -> Targets {
    let info = || Targets::new().with_default(LevelFilter::INFO);
    match rust_log.map(str::trim).filter(|v| !v.is_empty()) {
        None => info(),
        Some(v) => v.parse::<Targets>().unwrap_or_else(|e| {
            // Before the subscriber exists: stderr directly. The value is the operator's own
            // setting, never a secret.
            eprintln!("RUST_LOG={v:?} is not a log filter ({e}); using info");
            info()
        }),
    }
}

/// Log lines dropped so far because stderr could not keep up (0 before [`init`]).
pub(crate) fn dropped_lines() -> u64 {
    DROPPED
        .get()
        .map_or(0, |c| u64::try_from(c.dropped_lines()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allows(f: &Targets, target: &str, level: tracing::Level) -> bool {
        f.would_enable(target, &level)
    }

    #[test]
    fn rust_log_levels_and_target_lists_filter_and_bad_values_fall_back_to_info() {
        use tracing::Level;
        for unset in [None, Some(""), Some("  ")] {
            let f = filter_from(unset);
            assert!(allows(&f, "token_sidecar", Level::INFO));
            assert!(!allows(&f, "token_sidecar", Level::DEBUG));
        }
        let f = filter_from(Some("trace"));
        assert!(allows(&f, "hyper", Level::TRACE));

        let f = filter_from(Some("warn,token_sidecar=debug"));
        assert!(allows(&f, "token_sidecar::access", Level::DEBUG));
        assert!(!allows(&f, "token_sidecar", Level::TRACE));
        assert!(allows(&f, "hyper", Level::WARN));
        assert!(!allows(&f, "hyper", Level::INFO));

        // EnvFilter-only syntax (a span filter) and garbage: info, not silence or everything.
        for bad in ["token_sidecar[req{id=1}]=debug", "lots=of=equals", "x=loud"] {
            let f = filter_from(Some(bad));
            assert!(allows(&f, "token_sidecar", Level::INFO), "{bad}");
            assert!(!allows(&f, "token_sidecar", Level::DEBUG), "{bad}");
        }
    }
}
