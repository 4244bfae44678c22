//! Small facts every layer needs exactly once: the wall clock as Unix seconds and an error's
//! whole cause chain as one line.

use std::time::{SystemTime, UNIX_EPOCH};

/// Seconds since the Unix epoch, floored. A clock before 1970 is broken beyond what any server
/// would accept; 0 keeps derived `iat` values in the past rather than failing.
pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// An error and its causes on one line. Top-level messages of reqwest and hyper are vague
/// ("error sending request"); the causes say what happened. Causes already contained in the
/// text so far are skipped.
pub(crate) fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}
