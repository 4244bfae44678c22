//! The token cache: one slot per (scope set, audience set), each kept fresh by its own refresher.
//!
//! The keys are known from the routes at start-up, so every route holds an `Arc<Slot>` directly
//! and the hot path is one atomic load plus a time comparison: no map lookup, no lock.
//!
//! Each slot has exactly one refresher task, and only that task talks to the token endpoint.
//! That gives single flight by construction (any number of waiting requests, one token request),
//! refresh ahead (the refresher wakes at `refresh_due` while requests keep using the current
//! token), and a bounded retry rate during an outage (it sleeps through the backoff). Requests
//! only wait when no usable token exists and no fetch has failed since the last success (start-up,
//! after an eviction); they wait for the refresher's result, bounded by the token request
//! timeout. Once a fetch has failed, they fail fast with that error until one succeeds.
//! The refresher runs in its own task, so an application that disconnects cannot cancel a fetch.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::config::TokenConfig;
use crate::token::backoff;
use crate::token::client::{FetchError, FetchOutcome, TokenClient};
use crate::token::{AccessToken, TokenKey};
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};

/// When to refresh a token and how long to send it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Policy {
    pub(crate) refresh_at: f64,
    pub(crate) refresh_before_expiry: Duration,
    pub(crate) expiry_skew: Duration,
    pub(crate) backoff_initial: Duration,
    pub(crate) backoff_max: Duration,
    /// How long a request waits for a token when none is usable.
    pub(crate) wait_timeout: Duration,
}

impl Policy {
    pub(crate) fn from_config(cfg: &TokenConfig) -> Policy {
        Policy {
            refresh_at: cfg.refresh_at,
            refresh_before_expiry: cfg.refresh_before_expiry,
            expiry_skew: cfg.expiry_skew,
            backoff_initial: cfg.retry_backoff_initial,
            backoff_max: cfg.retry_backoff_max,
            // The fetch itself is bounded by request_timeout; the margin covers scheduling.
            wait_timeout: cfg.request_timeout + Duration::from_secs(1),
        }
    }
}

#[cfg(test)]
impl Policy {
    /// A policy with the given schedule inputs and the default backoff and wait bounds.
    pub(crate) fn with_schedule(
        refresh_at: f64,
        refresh_before_expiry: Duration,
        expiry_skew: Duration,
    ) -> Policy {
        Policy {
            refresh_at,
            refresh_before_expiry,
            expiry_skew,
            backoff_initial: Duration::from_millis(200),
            backoff_max: Duration::from_secs(1),
            wait_timeout: Duration::from_secs(11),
        }
    }
}

/// Offsets from the moment the token request was sent (conservative: the server started the
/// lifetime no earlier than that).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Schedule {
    /// From here on the refresher fetches a replacement.
    pub(crate) refresh_due: Duration,
    /// The token is not sent after this (expiry minus skew).
    pub(crate) usable_for: Duration,
}

/// Pure: when to refresh a token of `lifetime` and until when to use it.
///
/// Refresh at `refresh_at` of the lifetime or `refresh_before_expiry` before expiry, whichever
/// comes first, but never before a quarter of the lifetime (a short-lived token would otherwise
/// be refetched in a loop) and never after it stops being usable. The skew is clamped to half the
/// lifetime so that a token shorter than twice the skew is still used for a while.
pub(crate) fn schedule(lifetime: Duration, policy: &Policy) -> Schedule {
    let skew = policy.expiry_skew.min(lifetime / 2);
    let usable_for = lifetime - skew;
    // NaN would slip through clamp and make mul_f64 panic; validation refuses it, this is belt
    // and braces for callers that build a Policy themselves.
    let fraction = if policy.refresh_at.is_nan() {
        1.0
    } else {
        policy.refresh_at.clamp(0.0, 1.0)
    };
    let by_fraction = lifetime.mul_f64(fraction);
    let by_margin = lifetime.saturating_sub(policy.refresh_before_expiry);
    let refresh_due = by_fraction.min(by_margin).max(lifetime / 4).min(usable_for);
    Schedule {
        refresh_due,
        usable_for,
    }
}

/// A token in the cache with its deadlines.
#[derive(Debug)]
pub(crate) struct CachedToken {
    pub(crate) token: AccessToken,
    pub(crate) refresh_due: Instant,
    pub(crate) usable_until: Instant,
    pub(crate) expires_at: Instant,
}

impl CachedToken {
    fn new(token: AccessToken, fetched_at: Instant, policy: &Policy) -> CachedToken {
        let s = schedule(token.lifetime, policy);
        CachedToken {
            refresh_due: fetched_at + s.refresh_due,
            usable_until: fetched_at + s.usable_for,
            expires_at: fetched_at + token.lifetime,
            token,
        }
    }

    pub(crate) fn is_usable(&self, now: Instant) -> bool {
        now < self.usable_until
    }
}

/// Why a request got no token.
#[derive(Debug, Clone)]
pub enum TokenError {
    /// The last fetch failed and no usable token is cached.
    Fetch {
        error: Arc<FetchError>,
        /// When the refresher tries again.
        retry_in: Duration,
    },
    /// No fetch finished within the wait bound.
    Timeout(Duration),
}

#[derive(Debug, Default)]
struct State {
    fetching: bool,
    failures: u32,
    retry_at: Option<Instant>,
    last_error: Option<Arc<FetchError>>,
}

/// Counters for one slot, read by the metrics at scrape time. The only place fetches are
/// counted: the metrics and the tests both read these.
#[derive(Debug, Default)]
pub struct SlotStats {
    hits: AtomicU64,
    misses: AtomicU64,
    refreshes: AtomicU64,
    /// Indexed by [`FetchOutcome`].
    fetches: [AtomicU64; FetchOutcome::ALL.len()],
}

impl SlotStats {
    /// Requests served from a usable cached token.
    pub fn hits(&self) -> u64 {
        self.hits.load(Ordering::Relaxed)
    }
    /// Requests that had to wait for the token endpoint.
    pub fn misses(&self) -> u64 {
        self.misses.load(Ordering::Relaxed)
    }
    /// Fetches started while a token was cached.
    pub fn refreshes(&self) -> u64 {
        self.refreshes.load(Ordering::Relaxed)
    }
    /// Token requests that ended with `outcome`.
    pub(crate) fn fetches(&self, outcome: FetchOutcome) -> u64 {
        self.fetches[outcome as usize].load(Ordering::Relaxed)
    }
    /// Token requests made, whatever their outcome.
    pub fn fetches_total(&self) -> u64 {
        FetchOutcome::ALL
            .iter()
            .map(|(o, _)| self.fetches(*o))
            .sum()
    }
}

/// A token handed to a request, and whether it came straight from the cache.
#[derive(Debug, Clone)]
pub struct Lease {
    pub(crate) token: Arc<CachedToken>,
    /// False when the request had to wait for the token endpoint.
    pub(crate) cached: bool,
}

/// One (scope set, audience set) and its token.
pub struct Slot {
    key: TokenKey,
    current: ArcSwapOption<CachedToken>,
    state: Mutex<State>,
    /// Bumped after every fetch; waiting requests watch it.
    updates: watch::Sender<u64>,
    /// Wakes the refresher early (after an eviction).
    wake: Notify,
    policy: Policy,
    pub stats: SlotStats,
}

impl std::fmt::Debug for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Slot")
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

impl Slot {
    fn new(key: TokenKey, policy: Policy) -> Slot {
        Slot {
            key,
            current: ArcSwapOption::empty(),
            state: Mutex::new(State::default()),
            updates: watch::channel(0).0,
            wake: Notify::new(),
            policy,
            stats: SlotStats::default(),
        }
    }

    /// The cached token, if it may still be sent at `now`.
    fn usable(&self, now: Instant) -> Option<Arc<CachedToken>> {
        self.current.load_full().filter(|t| t.is_usable(now))
    }

    /// The refresher state. A panic while holding the lock leaves plain data behind, still
    /// consistent enough to keep serving, so poisoning is ignored.
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A usable token, waiting for the refresher only when none is cached.
    pub(crate) async fn token(&self) -> Result<Lease, TokenError> {
        if let Some(t) = self.usable(Instant::now()) {
            self.stats.hits.fetch_add(1, Ordering::Relaxed);
            return Ok(Lease {
                token: t,
                cached: true,
            });
        }
        self.stats.misses.fetch_add(1, Ordering::Relaxed);
        self.wait_for_token().await.map(|token| Lease {
            token,
            cached: false,
        })
    }

    /// How long until the cached token expires, if one is cached and not yet expired.
    pub(crate) fn expires_in(&self, now: Instant) -> Option<Duration> {
        self.current
            .load()
            .as_ref()
            .and_then(|t| t.expires_at.checked_duration_since(now))
    }

    async fn wait_for_token(&self) -> Result<Arc<CachedToken>, TokenError> {
        let deadline = Instant::now() + self.policy.wait_timeout;
        loop {
            // Subscribe before looking, so an update between the look and the wait is not missed.
            let mut updates = self.updates.subscribe();
            let now = Instant::now();
            if let Some(t) = self.usable(now) {
                return Ok(t);
            }
            {
                // During an outage (the last fetch failed) fail fast with that error instead of
                // queueing behind the refresher, whose next attempt may take the whole request
                // timeout; the refresher keeps retrying on its own backoff.
                let st = self.state();
                if let Some(error) = &st.last_error {
                    let retry_in = st
                        .retry_at
                        .map_or(Duration::ZERO, |r| r.saturating_duration_since(now));
                    return Err(TokenError::Fetch {
                        error: error.clone(),
                        retry_in,
                    });
                }
            }
            if tokio::time::timeout_at(deadline, updates.changed())
                .await
                .is_err()
            {
                return Err(TokenError::Timeout(self.policy.wait_timeout));
            }
        }
    }

    /// Drops `token` if it is still the cached one (the upstream said it is invalid) and has the
    /// refresher fetch a new one.
    pub(crate) fn evict(&self, token: &Arc<CachedToken>) {
        let prev = self
            .current
            .compare_and_swap(&Some(token.clone()), None::<Arc<CachedToken>>);
        if prev.as_ref().is_some_and(|p| Arc::ptr_eq(p, token)) {
            tracing::info!(key = %self.key, "token evicted after the upstream rejected it");
            // Fetch now rather than after an earlier failure's backoff: the requests waiting
            // for the replacement would otherwise fail with that stale error.
            let mut st = self.state();
            st.retry_at = None;
            st.last_error = None;
            drop(st);
            self.wake.notify_one();
        }
    }

    /// Whether a usable token is cached, and if not, why.
    pub(crate) fn readiness(&self, now: Instant) -> Result<Duration, String> {
        if let Some(t) = self.usable(now) {
            return Ok(t.usable_until - now);
        }
        let st = self.state();
        Err(match &st.last_error {
            Some(e) => format!("no valid token: {e}"),
            None => "no token obtained yet".to_string(),
        })
    }

    /// Whether the refresher's last attempt failed.
    pub fn is_failing(&self) -> bool {
        self.state().failures > 0
    }

    /// When the refresher should next fetch: pure in its inputs.
    fn next_fetch_at(&self, now: Instant) -> Instant {
        let due = self.current.load().as_ref().map_or(now, |t| t.refresh_due);
        let st = self.state();
        match st.retry_at {
            Some(r) => due.max(r),
            None => due,
        }
    }

    async fn refresh_loop(self: Arc<Self>, client: Arc<TokenClient>, fetch_duration: Histogram) {
        loop {
            let now = Instant::now();
            let next = self.next_fetch_at(now);
            if next > now {
                tokio::select! {
                    _ = tokio::time::sleep_until(next) => {}
                    _ = self.wake.notified() => {}
                }
                continue;
            }
            self.state().fetching = true;
            if self.current.load().is_some() {
                self.stats.refreshes.fetch_add(1, Ordering::Relaxed);
            }
            let started = Instant::now();
            let result = client.fetch(&self.key).await;
            let outcome = match &result {
                Ok(_) => FetchOutcome::Ok,
                Err(e) => e.outcome(),
            };
            self.stats.fetches[outcome as usize].fetch_add(1, Ordering::Relaxed);
            fetch_duration.observe(started.elapsed().as_secs_f64());
            {
                let mut st = self.state();
                st.fetching = false;
                match result {
                    Ok(token) => {
                        let cached = CachedToken::new(token, started, &self.policy);
                        tracing::info!(
                            key = %self.key,
                            lifetime = ?cached.token.lifetime,
                            refresh_in = ?(cached.refresh_due - started),
                            "token obtained"
                        );
                        self.current.store(Some(Arc::new(cached)));
                        st.failures = 0;
                        st.retry_at = None;
                        st.last_error = None;
                    }
                    Err(error) => {
                        st.failures = st.failures.saturating_add(1);
                        let pause = backoff::delay(
                            self.policy.backoff_initial,
                            self.policy.backoff_max,
                            st.failures,
                            backoff::random_fraction(),
                        );
                        let still_usable = self.usable(Instant::now()).is_some();
                        tracing::warn!(
                            key = %self.key,
                            error = %error,
                            failures = st.failures,
                            retry_in = ?pause,
                            serving_cached_token = still_usable,
                            "token request failed"
                        );
                        st.retry_at = Some(Instant::now() + pause);
                        st.last_error = Some(Arc::new(error));
                    }
                }
            }
            self.updates.send_modify(|g| *g = g.wrapping_add(1));
        }
    }
}

/// Collects the slots the routes need, one per distinct key, before anything runs: routes are
/// built with their `Arc<Slot>` in hand, so no route ever lacks one.
#[derive(Debug)]
pub(crate) struct CacheBuilder {
    policy: Policy,
    slots: Vec<Arc<Slot>>,
    /// Duration of every fetch, retries included (exported by the metrics).
    fetch_duration: Histogram,
}

impl CacheBuilder {
    pub(crate) fn new(policy: Policy) -> CacheBuilder {
        CacheBuilder {
            policy,
            slots: Vec::new(),
            // 5 ms … ~10 s.
            fetch_duration: Histogram::new(exponential_buckets(0.005, 2.0, 12)),
        }
    }

    pub(crate) fn fetch_duration(&self) -> &Histogram {
        &self.fetch_duration
    }

    /// The slot for `key`, shared with every other route asking for the same sets.
    pub(crate) fn slot(&mut self, key: TokenKey) -> Arc<Slot> {
        if let Some(s) = self.slots.iter().find(|s| s.key == key) {
            return s.clone();
        }
        let slot = Arc::new(Slot::new(key, self.policy));
        self.slots.push(slot.clone());
        slot
    }

    /// Starts one refresher per slot, each prefetching right away. Must be called inside a
    /// Tokio runtime.
    pub(crate) fn start(self, client: Arc<TokenClient>) -> TokenCache {
        let fetch_duration = self.fetch_duration;
        let tasks = self
            .slots
            .iter()
            .map(|s| {
                tokio::spawn(
                    s.clone()
                        .refresh_loop(client.clone(), fetch_duration.clone()),
                )
            })
            .collect();
        TokenCache {
            slots: self.slots,
            tasks,
        }
    }
}

/// All slots, and the refresher tasks that keep them filled. Dropping it stops the refreshers.
pub struct TokenCache {
    slots: Vec<Arc<Slot>>,
    tasks: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for TokenCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenCache")
            .field("slots", &self.slots)
            .finish()
    }
}

impl TokenCache {
    /// Every slot, one per distinct (scope set, audience set), in the order routes named them.
    pub fn slots(&self) -> &[Arc<Slot>] {
        &self.slots
    }

    /// Token requests made so far by every slot, successful or not.
    pub fn fetches(&self) -> u64 {
        self.slots.iter().map(|s| s.stats.fetches_total()).sum()
    }
}

impl Drop for TokenCache {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Policy {
        Policy::with_schedule(0.8, Duration::from_secs(60), Duration::from_secs(10))
    }

    const S: fn(u64) -> Duration = Duration::from_secs;

    #[test]
    fn one_hour_token_refreshes_at_80_percent() {
        let s = schedule(S(3600), &policy());
        assert_eq!(s.refresh_due, S(2880));
        assert_eq!(s.usable_for, S(3590));
    }

    #[test]
    fn margin_wins_when_it_comes_first() {
        // 10 min token: 80% = 480 s, 60 s before expiry = 540 s → 480 s.
        assert_eq!(schedule(S(600), &policy()).refresh_due, S(480));
        // 4 min token with a 2 min margin: 120 s beats 192 s.
        let p = Policy {
            refresh_before_expiry: S(120),
            ..policy()
        };
        assert_eq!(schedule(S(240), &p).refresh_due, S(120));
    }

    #[test]
    fn short_tokens_are_not_refetched_in_a_loop() {
        // 60 s token with the 60 s margin: would be due at once; a quarter of the life instead.
        let s = schedule(S(60), &policy());
        assert_eq!(s.refresh_due, S(15));
        assert_eq!(s.usable_for, S(50));
        // 5 s token with the 10 s default skew: the skew is clamped to half the lifetime.
        let s = schedule(S(5), &policy());
        assert_eq!(s.usable_for, Duration::from_millis(2500));
        assert_eq!(s.refresh_due, Duration::from_millis(1250));
        assert!(s.refresh_due <= s.usable_for);
    }

    #[test]
    fn refresh_is_never_due_after_the_token_stops_being_usable() {
        for secs in [1, 2, 3, 7, 11, 20, 59, 61, 119, 3600, 86400] {
            for refresh_at in [0.1, 0.5, 0.8, 0.99] {
                let p = Policy {
                    refresh_at,
                    ..policy()
                };
                let s = schedule(S(secs), &p);
                assert!(s.refresh_due <= s.usable_for, "{secs} {refresh_at}");
                assert!(s.refresh_due >= S(secs) / 4);
                assert!(s.usable_for < S(secs));
            }
        }
    }
}
