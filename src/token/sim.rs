//! The fleet simulation of docs/reliability.md §1: what an authorization-server outage costs the
//! server when 1000 sidecars with 5 keys each retry against it.
//!
//! It drives the real per-key schedule ([`RetryState`], the code every refresher runs) on a
//! simulated clock: an event queue of (time, key), each key asking again when its schedule says
//! so. The server fails every request (HTTP 500, answered at once) for 10 minutes, then issues
//! tokens. Every key needs a token when the outage begins (a fleet rolled out into the outage,
//! or tokens that all stopped being usable together): the worst case for the server, since
//! nothing spreads the keys but the schedule itself. Randomness is a fixed-seed generator, so
//! the figures are reproducible:
//!
//! `cargo test --lib token::sim -- --nocapture` prints the table in docs/reliability.md, and
//! the tests assert the promises on it.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::Duration;

use tokio::time::Instant;

use super::backoff::{RetryPolicy, RetryState};

const SIDECARS: usize = 1000;
const KEYS_PER_SIDECAR: usize = 5;
const KEYS: usize = SIDECARS * KEYS_PER_SIDECAR;
const OUTAGE_SECS: usize = 600;
/// The promise holds once the outage has lasted this long.
const SETTLED_SECS: usize = 30;
const AFTER_SECS: usize = 10;

/// The defaults of `sidecar.toml`.
fn defaults() -> RetryPolicy {
    RetryPolicy {
        initial: Duration::from_millis(200),
        max: Duration::from_secs(5),
        max_attempts: 3,
        request_timeout: Duration::from_secs(10),
    }
}

/// SplitMix64: a small, fixed-seed source of fractions in [0, 1).
struct Rng(u64);

impl Rng {
    fn fraction(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// What the server saw.
#[derive(Debug)]
struct Report {
    /// Requests per second, one bucket per second from the start of the outage.
    buckets: Vec<u64>,
    /// The most requests one key made in `[SETTLED_SECS, OUTAGE_SECS)`.
    most_per_key_settled: usize,
    /// The longest a key took to get its token after the outage ended.
    slowest_recovery: Duration,
}

impl Report {
    fn peak(&self, from: usize, to: usize) -> u64 {
        self.buckets[from..to].iter().copied().max().unwrap_or(0)
    }
    fn mean(&self, from: usize, to: usize) -> f64 {
        self.buckets[from..to].iter().sum::<u64>() as f64 / (to - from) as f64
    }
    fn row(&self, label: &str) -> String {
        let end = OUTAGE_SECS + AFTER_SECS;
        format!(
            "| {label} | {} | {:.0} | {} | {:.0} | {} | {:.0} | {:.1} s |",
            self.peak(0, OUTAGE_SECS),
            self.mean(0, OUTAGE_SECS),
            self.peak(SETTLED_SECS, OUTAGE_SECS),
            self.mean(SETTLED_SECS, OUTAGE_SECS),
            self.peak(OUTAGE_SECS, end),
            self.mean(OUTAGE_SECS, end),
            self.slowest_recovery.as_secs_f64(),
        )
    }
}

/// Runs the fleet through the outage. `jitter = false` feeds the schedule a constant 1 (every
/// pause at its full length); `retry_after` is what the server sends with each failure.
fn simulate(p: &RetryPolicy, jitter: bool, retry_after: Option<Duration>, seed: u64) -> Report {
    let base = Instant::now();
    let outage = Duration::from_secs(OUTAGE_SECS as u64);
    let mut rng = Rng(seed);
    let mut keys = vec![RetryState::default(); KEYS];
    let mut settled_attempts = vec![0usize; KEYS];
    let mut buckets = vec![0u64; OUTAGE_SECS + AFTER_SECS];
    let mut slowest_recovery = Duration::ZERO;
    // (time since the start, key); every key asks at once when the outage begins.
    let mut queue: BinaryHeap<Reverse<(Duration, usize)>> =
        (0..KEYS).map(|k| Reverse((Duration::ZERO, k))).collect();
    while let Some(Reverse((at, k))) = queue.pop() {
        let second = at.as_secs() as usize;
        if let Some(b) = buckets.get_mut(second) {
            *b += 1;
        }
        if at >= outage {
            // The server is back: this key has its token and asks nothing more in the window.
            slowest_recovery = slowest_recovery.max(at - outage);
            continue;
        }
        if second >= SETTLED_SECS {
            settled_attempts[k] += 1;
        }
        let now = base + at;
        let random = if jitter { rng.fraction() } else { 1.0 };
        keys[k].on_failure(p, now, now, true, retry_after, random);
        // As the refresher does: the next attempt is when the token is due (now: there is
        // none), but not before the schedule allows.
        let next = keys[k].next_attempt(now);
        queue.push(Reverse((next - base, k)));
    }
    Report {
        buckets,
        most_per_key_settled: settled_attempts.into_iter().max().unwrap_or(0),
        slowest_recovery,
    }
}

const HEADER: &str = "| schedule | outage peak req/s | outage mean req/s | peak after 30 s | mean after 30 s | first 10 s after: peak | first 10 s after: mean | slowest key back |\n|---|---|---|---|---|---|---|---|";

/// The promises of docs/reliability.md §1 on the simulated fleet, with and without jitter.
#[test]
fn a_fleet_outage_costs_one_request_per_key_per_5_s_and_recovers_within_5_s() {
    let p = defaults();
    let with = simulate(&p, true, None, 7);
    let without = simulate(&p, false, None, 7);
    println!("\n{HEADER}");
    println!("{}", with.row("with jitter"));
    println!("{}", without.row("without jitter"));
    let settled = (OUTAGE_SECS - SETTLED_SECS) as f64;
    for (name, r) in [("with jitter", &with), ("without jitter", &without)] {
        // Per key: one request per 5 s once the outage has lasted 30 s; the +1 is where the
        // window's edge cuts a period.
        assert!(
            r.most_per_key_settled <= (settled / 5.0) as usize + 1,
            "{name}: {} requests from one key in {settled} s",
            r.most_per_key_settled
        );
        // The fleet: at most one request per key per 5 s on average.
        let mean = r.mean(SETTLED_SECS, OUTAGE_SECS);
        assert!(
            mean <= KEYS as f64 / 5.0 * (1.0 + 5.0 / settled),
            "{name}: {mean} requests/s"
        );
        // Every key has its token within 5 s of the server coming back.
        assert!(
            r.slowest_recovery <= Duration::from_secs(5),
            "{name}: {:?}",
            r.slowest_recovery
        );
    }
    // Jitter is what spreads the fleet: without it every key asks in the same second.
    assert_eq!(without.peak(SETTLED_SECS, OUTAGE_SECS), KEYS as u64);
    assert!(
        with.peak(SETTLED_SECS, OUTAGE_SECS) < KEYS as u64 / 5 * 13 / 10,
        "{}",
        with.row("with jitter")
    );
}

/// A server that answers 503 with `Retry-After: 120`: honoured, and the jitter added on top
/// keeps the fleet from returning in one burst.
#[test]
fn a_fleet_told_to_retry_after_120_s_waits_that_long() {
    let r = simulate(&defaults(), true, Some(Duration::from_secs(120)), 7);
    println!("\n{}", r.row("with jitter, 503 + `Retry-After: 120`"));
    // One request per key per 120–125 s.
    let settled = (OUTAGE_SECS - SETTLED_SECS) as f64;
    assert!(r.most_per_key_settled <= (settled / 120.0) as usize + 1);
    assert!(r.slowest_recovery <= Duration::from_secs(125));
}
