//! The per-key retry schedule (docs/spec.md §2 and §3): one budget for every token request a
//! key makes, whether it retries inside what a waiting request sees as one fetch or between
//! fetches. Pure: the inputs are the moment, the outcome, the server's `Retry-After` and a random
//! fraction, so the cache, the `token` command and the fleet simulation (`sim.rs`) all drive
//! this same code, and tests pin it without sleeping.
//!
//! Invariants, with `initial`/`max` the configured backoff bounds:
//! - a pause is never shorter than the schedule's own, and never longer than `max`, unless the
//!   server sent `Retry-After` (honoured up to [`RETRY_AFTER_CAP`], plus a random part of up to
//!   `max` so that a fleet told the same thing does not come back in one burst); so a key
//!   recovers at most `max` after the server comes back, or `max` after the time it asked for;
//! - once the doubling reaches `max`, every pause after the first capped one is exactly `max`,
//!   so the long-run rate per key is one request per `max`;
//! - the first capped pause is drawn uniformly in `[0, max]`: keys that started failing together
//!   leave the ramp with a uniformly random phase, and the fleet's requests spread evenly over
//!   each `max` period instead of arriving in one burst.

use std::time::Duration;

use tokio::time::Instant;

use crate::token::later;

/// The longest `Retry-After` honoured: a server asking for more is asked again after this.
pub(crate) const RETRY_AFTER_CAP: Duration = Duration::from_secs(300);

/// The schedule's bounds, from `[token]`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RetryPolicy {
    /// Pause after the first failure (before jitter).
    pub(crate) initial: Duration,
    /// Longest pause of the schedule itself.
    pub(crate) max: Duration,
    /// Failed attempts after which requests waiting for a token stop waiting (the "fetch").
    pub(crate) max_attempts: u32,
    /// Bound on one attempt, and on the whole round requests wait for.
    pub(crate) request_timeout: Duration,
}

/// The pause after the `failures`-th consecutive failed attempt (1-based).
///
/// Below the cap: `initial · 2^(failures−1)` with equal jitter (between half and all of it).
/// The first pause whose doubling reaches `max`: uniform in `[0, max]` (full jitter, it sets the
/// key's phase). Every later one: exactly `max`. With a `Retry-After` (capped at
/// [`RETRY_AFTER_CAP`]) the pause is at least that plus `max · random`: the server's time is
/// honoured and the keys spread over the `max` after it. `random` is a fraction in `[0, 1]`;
/// with `random = 1` there is no jitter at all.
pub(crate) fn pause(
    initial: Duration,
    max: Duration,
    failures: u32,
    retry_after: Option<Duration>,
    random: f64,
) -> Duration {
    let random = if random.is_finite() {
        random.clamp(0.0, 1.0)
    } else {
        0.5
    };
    let base = |n: u32| initial.saturating_mul(1u32 << n.saturating_sub(1).min(30));
    let failures = failures.max(1);
    let spread = |d: Duration| {
        // try_from: `d · random` for a `d` near Duration::MAX rounds above it in f64.
        Duration::try_from_secs_f64(d.as_secs_f64() * random)
            .unwrap_or(d)
            .min(d)
    };
    let own = if base(failures) < max {
        let b = base(failures);
        b / 2 + (b / 2).mul_f64(random)
    } else if failures == 1 || base(failures - 1) < max {
        spread(max)
    } else {
        max
    }
    .min(max);
    match retry_after {
        Some(asked) => own.max(asked.min(RETRY_AFTER_CAP).saturating_add(spread(max))),
        None => own,
    }
}

/// A uniform fraction in [0, 1) from the system RNG.
pub(crate) fn random_fraction() -> f64 {
    let mut bytes = [0u8; 8];
    if aws_lc_rs::rand::fill(&mut bytes).is_err() {
        return 0.5;
    }
    (u64::from_le_bytes(bytes) >> 11) as f64 / (1u64 << 53) as f64
}

/// The attempts requests without a token are waiting on: from the first failure after a success
/// (or start-up) until the round is reported.
#[derive(Debug, Clone, Copy)]
struct Round {
    /// When its first attempt started.
    started: Instant,
    /// Failed attempts so far, at most `max_attempts` before it is reported.
    attempts: u32,
}

/// What the schedule decided after a failed attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Failure {
    /// The earliest moment of the next attempt.
    pub(crate) retry_at: Instant,
    /// Whether waiting requests should stop waiting and fail with this error (the round is
    /// over: `max_attempts` failures, a failure retrying cannot fix, a server that asked for a
    /// pause with `Retry-After`, or a next attempt that would start after `request_timeout`).
    pub(crate) report: bool,
}

/// One key's failures. Reset by a success; nothing else resets it (an eviction does not), so
/// no path can buy a key more requests than the schedule allows.
#[derive(Debug, Clone, Default)]
pub(crate) struct RetryState {
    failures: u32,
    retry_at: Option<Instant>,
    round: Option<Round>,
    reported: bool,
}

impl RetryState {
    /// Consecutive failed attempts since the last success.
    pub(crate) fn failures(&self) -> u32 {
        self.failures
    }

    /// When the next attempt may start, if a failure set it.
    pub(crate) fn retry_at(&self) -> Option<Instant> {
        self.retry_at
    }

    /// When the next attempt starts, given when the token itself wants one (`due`).
    pub(crate) fn next_attempt(&self, due: Instant) -> Instant {
        self.retry_at.map_or(due, |r| due.max(r))
    }

    /// Until when an attempt starting `now` may run: `request_timeout`, and no later than the
    /// end of the round requests are waiting on.
    pub(crate) fn attempt_deadline(&self, p: &RetryPolicy, now: Instant) -> Instant {
        let own = later(now, p.request_timeout);
        match self.round {
            Some(r) if !self.reported => own.min(later(r.started, p.request_timeout)),
            _ => own,
        }
    }

    pub(crate) fn on_success(&mut self) {
        *self = RetryState::default();
    }

    /// Records an attempt that started at `started` and failed at `now`. `retryable` is false
    /// for failures retrying cannot fix (they end the round at once, but are retried on the
    /// same schedule: the configuration or the server may change).
    pub(crate) fn on_failure(
        &mut self,
        p: &RetryPolicy,
        started: Instant,
        now: Instant,
        retryable: bool,
        retry_after: Option<Duration>,
        random: f64,
    ) -> Failure {
        self.failures = self.failures.saturating_add(1);
        let retry_at = later(
            now,
            pause(p.initial, p.max, self.failures, retry_after, random),
        );
        self.retry_at = Some(retry_at);
        let round = self.round.get_or_insert(Round {
            started,
            attempts: 0,
        });
        round.attempts = round.attempts.saturating_add(1);
        let report = self.reported
            || !retryable
            || retry_after.is_some()
            || round.attempts >= p.max_attempts
            || retry_at >= later(round.started, p.request_timeout);
        self.reported = report;
        Failure { retry_at, report }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: fn(u64) -> Duration = Duration::from_millis;
    const S: fn(u64) -> Duration = Duration::from_secs;

    fn defaults() -> RetryPolicy {
        RetryPolicy {
            initial: MS(200),
            max: S(5),
            max_attempts: 3,
            request_timeout: S(10),
        }
    }

    #[test]
    fn doubles_then_holds_the_cap() {
        let p = |n| pause(MS(200), S(5), n, None, 1.0);
        assert_eq!(p(1), MS(200));
        assert_eq!(p(2), MS(400));
        assert_eq!(p(5), MS(3200));
        assert_eq!(p(6), S(5), "the first capped pause, full jitter at 1.0");
        assert_eq!(p(7), S(5));
        assert_eq!(p(u32::MAX), S(5));
    }

    #[test]
    fn jitter_is_equal_below_the_cap_full_at_the_first_capped_pause_and_none_after() {
        assert_eq!(pause(MS(200), S(5), 1, None, 0.0), MS(100));
        assert_eq!(pause(MS(200), S(5), 5, None, 0.0), MS(1600));
        assert_eq!(pause(MS(200), S(5), 6, None, 0.0), Duration::ZERO);
        assert_eq!(pause(MS(200), S(5), 6, None, 0.5), MS(2500));
        for failures in 7..40 {
            assert_eq!(pause(MS(200), S(5), failures, None, 0.0), S(5));
        }
        assert_eq!(pause(MS(200), S(5), 1, None, f64::NAN), MS(150));
        for _ in 0..100 {
            let r = random_fraction();
            assert!((0.0..1.0).contains(&r));
            let d = pause(MS(200), S(5), 2, None, r);
            assert!(d >= MS(200) && d <= MS(400));
        }
    }

    #[test]
    fn retry_after_is_honoured_up_to_five_minutes_then_spread() {
        assert_eq!(pause(MS(200), S(5), 1, Some(S(30)), 1.0), S(35));
        assert_eq!(pause(MS(200), S(5), 1, Some(S(30)), 0.0), S(30));
        assert_eq!(pause(MS(200), S(5), 1, Some(S(30)), 0.5), MS(32_500));
        assert_eq!(pause(MS(200), S(5), 1, Some(S(3600)), 0.0), S(300));
        // Never below the schedule's own pause: a server that says "0" gets no more requests.
        assert_eq!(pause(MS(200), S(5), 9, Some(Duration::ZERO), 0.0), S(5));
        assert_eq!(pause(MS(200), S(5), 9, Some(MS(10)), 1.0), S(5) + MS(10));
    }

    #[test]
    fn huge_bounds_do_not_overflow() {
        for n in [1, 2, 31, 32, u32::MAX] {
            for r in [0.0, 0.5, 1.0] {
                assert!(pause(Duration::MAX, Duration::MAX, n, Some(Duration::MAX), r) >= S(300));
            }
        }
        let mut s = RetryState::default();
        let p = RetryPolicy {
            initial: Duration::MAX,
            max: Duration::MAX,
            max_attempts: u32::MAX,
            request_timeout: Duration::MAX,
        };
        let now = Instant::now();
        let f = s.on_failure(&p, now, now, true, None, 1.0);
        assert!(f.retry_at > now);
        assert!(s.attempt_deadline(&p, now) > now);
    }

    #[test]
    fn a_round_is_reported_after_max_attempts_or_a_final_failure() {
        let p = defaults();
        let t0 = Instant::now();
        let mut s = RetryState::default();
        assert!(!s.on_failure(&p, t0, t0, true, None, 1.0).report);
        let f = s.on_failure(&p, t0, t0 + MS(200), true, None, 1.0);
        assert!(!f.report);
        assert_eq!(f.retry_at, t0 + MS(600));
        assert!(s.on_failure(&p, t0, t0 + MS(600), true, None, 1.0).report);
        // Later failures stay reported, and keep to the same schedule.
        let f = s.on_failure(&p, t0, t0 + S(1), true, None, 1.0);
        assert!(f.report);
        assert_eq!(f.retry_at, t0 + S(1) + MS(1600));
        assert_eq!(s.failures(), 4);

        let mut s = RetryState::default();
        assert!(s.on_failure(&p, t0, t0, false, None, 1.0).report);

        // A server asking for a pause ends the round at once, however short the pause.
        let mut s = RetryState::default();
        assert!(
            s.on_failure(&p, t0, t0, true, Some(Duration::ZERO), 1.0)
                .report
        );

        // A success starts over.
        s.on_success();
        assert_eq!(s.failures(), 0);
        assert_eq!(s.retry_at(), None);
        assert!(!s.on_failure(&p, t0, t0, true, None, 1.0).report);
    }

    #[test]
    fn an_attempt_inside_a_round_ends_with_the_round() {
        let p = defaults();
        let t0 = Instant::now();
        let mut s = RetryState::default();
        assert_eq!(s.attempt_deadline(&p, t0), t0 + S(10));
        s.on_failure(&p, t0, t0 + S(4), true, None, 1.0);
        assert_eq!(s.attempt_deadline(&p, t0 + S(5)), t0 + S(10));
        assert_eq!(s.next_attempt(t0), t0 + S(4) + MS(200));
        assert_eq!(s.next_attempt(t0 + S(60)), t0 + S(60));
    }
}
