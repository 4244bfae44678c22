//! The eviction gate (docs/spec.md §3): how often a key may drop a token the upstream rejected
//! and fetch another. Without it, an upstream that rejects every token (a wrong audience, a key
//! roll-over on the resource server) turns every application request into a token request.
//!
//! Pure state: the caller passes the moment and the rejected token's generation (a per-slot
//! counter bumped for every stored token, so "fetched after the eviction" is exact even when a
//! refresh was already in flight when the eviction happened).
//!
//! Invariants, with `min` = `token.min_refetch_interval`:
//! - after an eviction, no other eviction for `interval = min · 2^streak`, capped at
//!   [`MAX_REFETCH_INTERVAL`]: at most one refetch per interval;
//! - `streak` counts evictions in a row of a token fetched after the previous eviction, while
//!   no request has succeeded with such a token; one success sets it back to 0.

use std::time::Duration;

use tokio::time::Instant;

use crate::token::later;

/// The longest the gate stays closed, however many fresh tokens were rejected in a row.
pub(crate) const MAX_REFETCH_INTERVAL: Duration = Duration::from_secs(300);

/// How long the gate stays closed after an eviction that continues a streak of `streak`.
pub(crate) fn interval(min: Duration, streak: u32) -> Duration {
    min.saturating_mul(1u32 << streak.min(30))
        .min(MAX_REFETCH_INTERVAL.max(min))
}

/// One slot's eviction history.
#[derive(Debug, Clone, Default)]
pub(crate) struct EvictionGate {
    /// Generation of the token the last eviction dropped.
    last_evicted: Option<u64>,
    /// Evictions in a row whose token had been fetched after the previous eviction.
    streak: u32,
    /// No eviction before this.
    closed_until: Option<Instant>,
    /// The last eviction still waits for a request that succeeds with a newer token.
    armed: bool,
}

impl EvictionGate {
    /// Whether the upstream's rejection of the cached token of generation `generation` may
    /// evict it at `now`. When it may, the gate closes for the next interval.
    pub(crate) fn admit(&mut self, min: Duration, now: Instant, generation: u64) -> bool {
        if self.closed_until.is_some_and(|until| now < until) {
            return false;
        }
        let fresh_token_rejected = self.armed && self.last_evicted.is_some_and(|g| generation > g);
        self.streak = if fresh_token_rejected {
            self.streak.saturating_add(1)
        } else {
            0
        };
        self.closed_until = Some(later(now, interval(min, self.streak)));
        self.last_evicted = Some(generation);
        self.armed = true;
        true
    }

    /// A request succeeded with the token of generation `generation`. Returns true when that
    /// ends a streak (the caller then stops reporting successes until the next eviction).
    pub(crate) fn confirm(&mut self, generation: u64) -> bool {
        if self.armed && self.last_evicted.is_some_and(|g| generation > g) {
            self.armed = false;
            self.streak = 0;
            true
        } else {
            false
        }
    }

    /// Whether an eviction waits for its confirming success.
    #[cfg(test)]
    pub(crate) fn armed(&self) -> bool {
        self.armed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: fn(u64) -> Duration = Duration::from_secs;

    #[test]
    fn the_interval_doubles_and_caps_at_five_minutes() {
        assert_eq!(interval(S(10), 0), S(10));
        assert_eq!(interval(S(10), 1), S(20));
        assert_eq!(interval(S(10), 4), S(160));
        assert_eq!(interval(S(10), 5), S(300));
        assert_eq!(interval(S(10), u32::MAX), S(300));
        assert_eq!(interval(Duration::MAX, 7), Duration::MAX);
    }

    /// An upstream that rejects every token: evictions at 0, 10, 30, 70, 150, 310, 610 s …
    #[test]
    fn rejected_fresh_tokens_double_the_gate() {
        let t0 = Instant::now();
        let mut g = EvictionGate::default();
        let mut generation = 1;
        let mut evicted_at = Vec::new();
        for ms in (0..700_000).step_by(20) {
            let now = t0 + Duration::from_millis(ms);
            if g.admit(S(10), now, generation) {
                evicted_at.push(ms / 1000);
                generation += 1;
            }
        }
        assert_eq!(evicted_at, [0, 10, 30, 70, 150, 310, 610]);
    }

    #[test]
    fn a_success_with_a_newer_token_resets_the_streak() {
        let t0 = Instant::now();
        let mut g = EvictionGate::default();
        assert!(g.admit(S(10), t0, 1));
        assert!(!g.admit(S(10), t0 + S(9), 2), "closed for 10 s");
        assert!(g.admit(S(10), t0 + S(10), 2));
        // Success with the token the eviction fetched (generation 3).
        assert!(!g.confirm(2), "an older token proves nothing");
        assert!(g.confirm(3));
        assert!(!g.armed());
        // Still closed until 30 s (20 s after the second eviction) …
        assert!(!g.admit(S(10), t0 + S(29), 3));
        // … and then back to the 10 s interval.
        assert!(g.admit(S(10), t0 + S(30), 3));
        assert!(!g.admit(S(10), t0 + S(39), 4));
        assert!(g.admit(S(10), t0 + S(40), 4));
    }

    #[test]
    fn a_token_from_before_the_eviction_does_not_extend_the_streak() {
        let t0 = Instant::now();
        let mut g = EvictionGate::default();
        assert!(g.admit(S(10), t0, 5));
        // A token stored by a refresh already in flight has a higher generation; one stored
        // before (not possible for the cached token, but pinned) restarts the streak.
        assert!(g.admit(S(10), t0 + S(10), 5));
        assert!(!g.admit(S(10), t0 + S(19), 6), "streak 0: 10 s");
        assert!(g.admit(S(10), t0 + S(20), 6));
    }
}
