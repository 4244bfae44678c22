//! The token cache: one slot per (scope set, audience set), each kept fresh by its own refresher.
//!
//! The keys are known from the routes at start-up, so every route holds an `Arc<Slot>` directly
//! and the hot path is one atomic load plus a time comparison: no map lookup, no lock.
//!
//! Each slot has exactly one refresher task, and only that task talks to the token endpoint.
//! That gives single flight by construction (any number of waiting requests, one token request),
//! refresh ahead (the refresher wakes at `refresh_due` while requests keep using the current
//! token), and a bounded request rate during an outage: every attempt, first or retry, waits for
//! the key's one retry schedule (`backoff`). Requests only wait when no usable token exists and
//! the current round of attempts is not over (start-up, after an eviction); they wait for the
//! refresher's result, bounded by the token request timeout. Once a round has failed they fail
//! fast with its error until an attempt succeeds. The refresher runs in its own task, so an
//! application that disconnects cannot cancel a fetch.
//!
//! Invariants:
//! - a token the upstream rejected is dropped at most once per eviction-gate interval (`gate`);
//!   inside the interval it stays cached and requests get the upstream's answer;
//! - a refresher that panics or returns is restarted by its supervisor after
//!   `retry_backoff_max` (capped at 5 minutes) and counted (`SlotStats::restarts`), so a key is
//!   never silently left without a refresher while `/healthz` answers 200;
//! - deadlines are computed with [`later`], never with a bare `+`.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::config::TokenConfig;
use crate::token::backoff::{self, RETRY_AFTER_CAP, RetryPolicy, RetryState};
use crate::token::client::{AttemptError, FetchError, FetchOutcome, TokenClient, retry_policy};
use crate::token::gate::EvictionGate;
use crate::token::{AccessToken, TokenKey, later};
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};

/// Where a refresher gets its tokens: the token endpoint in production, a scripted fake in the
/// unit tests (which is how they make a refresher fail, hang or panic on demand).
pub(crate) trait Fetch: Send + Sync + 'static {
    /// One token request for `key`; the refresher bounds it in time.
    fn attempt(
        &self,
        key: &TokenKey,
    ) -> impl Future<Output = Result<AccessToken, AttemptError>> + Send;
}

impl Fetch for TokenClient {
    fn attempt(
        &self,
        key: &TokenKey,
    ) -> impl Future<Output = Result<AccessToken, AttemptError>> + Send {
        TokenClient::attempt(self, key)
    }
}

/// When to refresh a token, how long to send it, and how to retry.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Policy {
    pub(crate) refresh_at: f64,
    pub(crate) refresh_before_expiry: Duration,
    pub(crate) expiry_skew: Duration,
    /// The per-key retry schedule.
    pub(crate) retry: RetryPolicy,
    /// The eviction gate's first interval.
    pub(crate) min_refetch_interval: Duration,
    /// How long a request waits for a token when none is usable.
    pub(crate) wait_timeout: Duration,
}

impl Policy {
    pub(crate) fn from_config(cfg: &TokenConfig) -> Policy {
        Policy {
            refresh_at: cfg.refresh_at,
            refresh_before_expiry: cfg.refresh_before_expiry,
            expiry_skew: cfg.expiry_skew,
            retry: retry_policy(cfg),
            min_refetch_interval: cfg.min_refetch_interval,
            // A round of attempts is bounded by request_timeout; the margin covers scheduling.
            wait_timeout: cfg.request_timeout.saturating_add(Duration::from_secs(1)),
        }
    }

    /// How long a supervisor waits before restarting a refresher that stopped: the schedule's
    /// longest pause, so a refresher that dies on every attempt still costs the server no more
    /// than the schedule allows.
    fn restart_pause(&self) -> Duration {
        self.retry.max.min(RETRY_AFTER_CAP)
    }
}

#[cfg(test)]
impl Policy {
    /// A policy with the given schedule inputs and the default retry, gate and wait bounds.
    pub(crate) fn with_schedule(
        refresh_at: f64,
        refresh_before_expiry: Duration,
        expiry_skew: Duration,
    ) -> Policy {
        Policy {
            refresh_at,
            refresh_before_expiry,
            expiry_skew,
            retry: RetryPolicy {
                initial: Duration::from_millis(200),
                max: Duration::from_secs(5),
                max_attempts: 3,
                request_timeout: Duration::from_secs(10),
            },
            min_refetch_interval: Duration::from_secs(10),
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
    let usable_for = lifetime.saturating_sub(skew);
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
    /// Bumped for every token the slot stores; tells the eviction gate which tokens were
    /// fetched after an eviction.
    pub(crate) generation: u64,
}

impl CachedToken {
    fn new(token: AccessToken, fetched_at: Instant, generation: u64, policy: &Policy) -> Self {
        let s = schedule(token.lifetime, policy);
        CachedToken {
            refresh_due: later(fetched_at, s.refresh_due),
            usable_until: later(fetched_at, s.usable_for),
            expires_at: later(fetched_at, token.lifetime),
            generation,
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
    /// The last round of attempts failed and no usable token is cached.
    Fetch {
        error: Arc<FetchError>,
        /// When the refresher tries again.
        retry_in: Duration,
    },
    /// No attempt finished within the wait bound.
    Timeout(Duration),
}

/// What became of a token the upstream rejected (docs/spec.md §3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Rejection {
    /// It was the cached token and the gate was open: dropped, the refresher fetches another.
    Evicted,
    /// It was the cached token but the gate is closed: it stays cached, the request gets the
    /// upstream's answer.
    Held,
    /// It is no longer the cached token (another request already had it evicted, or a refresh
    /// replaced it).
    Stale,
}

#[derive(Debug, Default)]
struct State {
    retry: RetryState,
    /// The error of the last failed round, until an attempt succeeds; requests without a usable
    /// token fail fast with it.
    last_error: Option<Arc<FetchError>>,
    gate: EvictionGate,
    /// Generation of the last stored token.
    generation: u64,
}

/// Counters for one slot, read by the metrics at scrape time. The only place token requests
/// are counted: the metrics and the tests both read these.
#[derive(Debug, Default)]
pub struct SlotStats {
    hits: AtomicU64,
    misses: AtomicU64,
    refreshes: AtomicU64,
    restarts: AtomicU64,
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
    /// Token requests started while a token was cached.
    pub fn refreshes(&self) -> u64 {
        self.refreshes.load(Ordering::Relaxed)
    }
    /// Times the slot's refresher stopped (a panic) and was started again.
    pub fn restarts(&self) -> u64 {
        self.restarts.load(Ordering::Relaxed)
    }
    /// Token requests that ended with `outcome`.
    pub(crate) fn fetches(&self, outcome: FetchOutcome) -> u64 {
        self.fetches[outcome as usize].load(Ordering::Relaxed)
    }
    /// Adds `other`'s counts to these: an evicted run-time slot's history is kept in its
    /// client's totals, so the exported counters never go backwards.
    pub(crate) fn absorb(&self, other: &SlotStats) {
        let add = |a: &AtomicU64, b: &AtomicU64| {
            a.fetch_add(b.load(Ordering::Relaxed), Ordering::Relaxed);
        };
        add(&self.hits, &other.hits);
        add(&self.misses, &other.misses);
        add(&self.refreshes, &other.refreshes);
        add(&self.restarts, &other.restarts);
        for (a, b) in self.fetches.iter().zip(&other.fetches) {
            add(a, b);
        }
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
    /// Mirrors `state.gate.armed()` so that the hot path learns with one atomic load that no
    /// eviction waits for its confirming success.
    gate_armed: AtomicBool,
    /// Bumped after every attempt; waiting requests watch it.
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
            gate_armed: AtomicBool::new(false),
            updates: watch::channel(0).0,
            wake: Notify::new(),
            policy,
            stats: SlotStats::default(),
        }
    }

    /// The (scope set, audience set) this slot holds a token for.
    pub(crate) fn key(&self) -> &TokenKey {
        &self.key
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

    /// How long the cached token may still be sent, if one is usable at `now`.
    pub(crate) fn usable_for(&self, now: Instant) -> Option<Duration> {
        self.usable(now)
            .map(|t| t.usable_until.saturating_duration_since(now))
    }

    /// How long until the cached token expires, if one is cached and not yet expired.
    pub(crate) fn expires_in(&self, now: Instant) -> Option<Duration> {
        self.current
            .load()
            .as_ref()
            .and_then(|t| t.expires_at.checked_duration_since(now))
    }

    async fn wait_for_token(&self) -> Result<Arc<CachedToken>, TokenError> {
        let deadline = later(Instant::now(), self.policy.wait_timeout);
        loop {
            // Subscribe before looking, so an update between the look and the wait is not missed.
            let mut updates = self.updates.subscribe();
            let now = Instant::now();
            if let Some(t) = self.usable(now) {
                return Ok(t);
            }
            {
                // During an outage (the last round failed) fail fast with that error instead of
                // queueing behind the refresher, whose next attempt may be seconds away; the
                // refresher keeps retrying on its own schedule.
                let st = self.state();
                if let Some(error) = &st.last_error {
                    let retry_in = st
                        .retry
                        .retry_at()
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

    /// The upstream rejected `token`. Drops it and has the refresher fetch another if it is
    /// still the cached one and the eviction gate is open; keeps it if the gate is closed.
    pub(crate) fn reject(&self, token: &Arc<CachedToken>) -> Rejection {
        let mut st = self.state();
        // Under the state lock, like every store of `current`: the check and the swap are one step.
        let is_current = self
            .current
            .load()
            .as_ref()
            .is_some_and(|c| Arc::ptr_eq(c, token));
        if !is_current {
            return Rejection::Stale;
        }
        let now = Instant::now();
        if !st
            .gate
            .admit(self.policy.min_refetch_interval, now, token.generation)
        {
            return Rejection::Held;
        }
        self.current.store(None);
        self.gate_armed.store(true, Ordering::Release);
        drop(st);
        tracing::info!(key = %self.key, "token evicted after the upstream rejected it; fetching another");
        // The refresher fetches at once unless the retry schedule says the server needs a pause.
        self.wake.notify_one();
        Rejection::Evicted
    }

    /// A request succeeded with `token`: if it was fetched after the last eviction, the
    /// rejections are over and the gate's interval starts again from its minimum. One atomic
    /// load unless an eviction waits for this.
    pub(crate) fn accepted(&self, token: &CachedToken) {
        if !self.gate_armed.load(Ordering::Acquire) {
            return;
        }
        let mut st = self.state();
        if st.gate.confirm(token.generation) {
            self.gate_armed.store(false, Ordering::Release);
        }
    }

    /// Whether a usable token is cached, and if not, why.
    pub(crate) fn readiness(&self, now: Instant) -> Result<Duration, String> {
        if let Some(t) = self.usable(now) {
            return Ok(t.usable_until.saturating_duration_since(now));
        }
        let st = self.state();
        Err(match &st.last_error {
            Some(e) => format!("no valid token: {e}"),
            None => "no token obtained yet".to_string(),
        })
    }

    /// Whether the refresher's last attempt failed.
    pub fn is_failing(&self) -> bool {
        self.state().retry.failures() > 0
    }

    /// When the refresher should next ask: when the token is due (now, without one), but not
    /// before the retry schedule allows.
    fn next_attempt_at(&self, now: Instant) -> Instant {
        let due = self.current.load().as_ref().map_or(now, |t| t.refresh_due);
        self.state().retry.next_attempt(due)
    }

    /// The refresher: sleeps until the next attempt is due (or an eviction wakes it), makes
    /// one bounded attempt, records it. Runs until aborted; a panic ends it and its supervisor
    /// starts another.
    async fn refresh_loop<F: Fetch>(self: Arc<Self>, fetcher: Arc<F>, fetch_duration: Histogram) {
        loop {
            let now = Instant::now();
            let next = self.next_attempt_at(now);
            if next > now {
                tokio::select! {
                    _ = tokio::time::sleep_until(next) => {}
                    _ = self.wake.notified() => {}
                }
                continue;
            }
            if self.current.load().is_some() {
                self.stats.refreshes.fetch_add(1, Ordering::Relaxed);
            }
            let started = Instant::now();
            let deadline = self
                .state()
                .retry
                .attempt_deadline(&self.policy.retry, started);
            let result = match tokio::time::timeout_at(deadline, fetcher.attempt(&self.key)).await {
                Ok(result) => result,
                Err(_) => Err(FetchError::Timeout(self.policy.retry.request_timeout).into()),
            };
            let outcome = match &result {
                Ok(_) => FetchOutcome::Ok,
                Err(e) => e.error.outcome(),
            };
            self.stats.fetches[outcome as usize].fetch_add(1, Ordering::Relaxed);
            fetch_duration.observe(started.elapsed().as_secs_f64());
            self.record(result, started);
            self.updates.send_modify(|g| *g = g.wrapping_add(1));
        }
    }

    /// Stores an attempt's token, or advances the retry schedule with its failure.
    fn record(&self, result: Result<AccessToken, AttemptError>, started: Instant) {
        let mut st = self.state();
        match result {
            Ok(token) => {
                st.generation = st.generation.saturating_add(1);
                let cached = CachedToken::new(token, started, st.generation, &self.policy);
                tracing::info!(
                    key = %self.key,
                    lifetime = ?cached.token.lifetime,
                    refresh_in = ?cached.refresh_due.saturating_duration_since(started),
                    "token obtained"
                );
                self.current.store(Some(Arc::new(cached)));
                st.retry.on_success();
                st.last_error = None;
            }
            Err(AttemptError { error, retry_after }) => {
                let now = Instant::now();
                let failure = st.retry.on_failure(
                    &self.policy.retry,
                    started,
                    now,
                    error.is_retryable(),
                    retry_after,
                    backoff::random_fraction(),
                );
                tracing::warn!(
                    key = %self.key,
                    error = %error,
                    failures = st.retry.failures(),
                    retry_in = ?failure.retry_at.saturating_duration_since(now),
                    server_asked = ?retry_after,
                    serving_cached_token = self.usable(now).is_some(),
                    "token request failed"
                );
                if failure.report {
                    st.last_error = Some(Arc::new(error));
                }
            }
        }
    }
}

/// Aborts the task when dropped: a supervisor that is itself aborted takes its refresher along.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Keeps one refresher running for `slot`: when it panics (or returns, which it never should),
/// logs, counts, waits [`Policy::restart_pause`] and starts another. Bounded: at most one
/// restart per pause, forever, so a refresher that keeps failing is visible in
/// `token_sidecar_refresher_restarts_total` and the logs instead of stopping in silence.
async fn supervise<F: Fetch>(slot: Arc<Slot>, fetcher: Arc<F>, fetch_duration: Histogram) {
    loop {
        let mut task = AbortOnDrop(tokio::spawn(
            slot.clone()
                .refresh_loop(fetcher.clone(), fetch_duration.clone()),
        ));
        let how = match (&mut task.0).await {
            Err(e) if e.is_panic() => "panicked",
            _ => "ended",
        };
        slot.stats.restarts.fetch_add(1, Ordering::Relaxed);
        let pause = slot.policy.restart_pause();
        // The panic message is not logged here: the panic hook already printed it, and a
        // payload is free text that nothing checked for secrets.
        tracing::error!(key = %slot.key, how, restart_in = ?pause, "token refresher stopped; restarting it");
        tokio::time::sleep(pause).await;
    }
}

/// A slot created at run time (not known at start), with its supervised refresher already
/// started; aborting the returned handle stops it. Used by `registry`, which owns the bound on
/// how many exist. `live` counts the refreshers of run-time slots that have not ended yet
/// (incremented here, decremented when the task's future is dropped, aborted or not), so the
/// bound is observable.
pub(crate) fn start_runtime_slot<F: Fetch>(
    key: TokenKey,
    policy: Policy,
    fetcher: Arc<F>,
    fetch_duration: Histogram,
    live: Arc<std::sync::atomic::AtomicUsize>,
) -> (Arc<Slot>, JoinHandle<()>) {
    struct Live(Arc<std::sync::atomic::AtomicUsize>);
    impl Drop for Live {
        fn drop(&mut self) {
            self.0.fetch_sub(1, Ordering::Relaxed);
        }
    }
    let slot = Arc::new(Slot::new(key, policy));
    live.fetch_add(1, Ordering::Relaxed);
    let guard = Live(live);
    let supervised = supervise(slot.clone(), fetcher, fetch_duration);
    let task = tokio::spawn(async move {
        let _guard = guard;
        supervised.await
    });
    (slot, task)
}

/// Collects the slots the routes need, one per distinct key, before anything runs: routes are
/// built with their `Arc<Slot>` in hand, so no route ever lacks one.
#[derive(Debug)]
pub(crate) struct CacheBuilder {
    policy: Policy,
    slots: Vec<Arc<Slot>>,
    /// Duration of every token request (exported by the metrics).
    fetch_duration: Histogram,
}

impl CacheBuilder {
    pub(crate) fn new(policy: Policy) -> CacheBuilder {
        // 5 ms … ~10 s.
        let fetch_duration = Histogram::new(exponential_buckets(0.005, 2.0, 12));
        CacheBuilder::sharing(policy, fetch_duration)
    }

    /// A builder whose token requests are timed in `fetch_duration`: one histogram for every
    /// client, so the metric keeps one series.
    /// The slots collected so far, one per distinct key.
    pub(crate) fn slots(&self) -> &[Arc<Slot>] {
        &self.slots
    }

    pub(crate) fn sharing(policy: Policy, fetch_duration: Histogram) -> CacheBuilder {
        CacheBuilder {
            policy,
            slots: Vec::new(),
            fetch_duration,
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

    /// Starts one supervised refresher per slot, each prefetching right away. Must be called
    /// inside a Tokio runtime.
    pub(crate) fn start<F: Fetch>(self, fetcher: Arc<F>) -> TokenCache {
        let fetch_duration = self.fetch_duration;
        let tasks = self
            .slots
            .iter()
            .map(|s| {
                tokio::spawn(supervise(
                    s.clone(),
                    fetcher.clone(),
                    fetch_duration.clone(),
                ))
            })
            .collect();
        TokenCache {
            slots: self.slots,
            tasks,
        }
    }
}

/// All slots, and the supervised refreshers that keep them filled. Dropping it stops them.
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
    /// One cache of every client's fixed slots (each keeps its own refreshers), so the server
    /// and the tests hold one handle whatever the number of clients.
    pub(crate) fn join(caches: Vec<TokenCache>) -> TokenCache {
        let mut all = TokenCache {
            slots: Vec::new(),
            tasks: Vec::new(),
        };
        for mut c in caches {
            all.slots.append(&mut c.slots);
            all.tasks.append(&mut c.tasks);
        }
        all
    }

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
        // Aborting a supervisor drops its AbortOnDrop, which aborts the refresher.
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

    // The refresher, its supervisor, the retry schedule and the eviction gate, driven by a
    // scripted token source on Tokio's paused clock: minutes of schedule in milliseconds.

    use crate::token::ResponseError;
    use std::sync::atomic::AtomicU32;

    /// What the scripted source does on its n-th call (1-based) at a time since the start.
    #[derive(Debug, Clone, Copy)]
    enum Step {
        /// A token with this lifetime.
        Token(Duration),
        /// HTTP 500, optionally with Retry-After.
        Fail(Option<Duration>),
        /// Panics inside the refresher.
        Panic,
    }

    struct Script {
        calls: AtomicU32,
        started: Instant,
        /// Start times of every call, offsets from `started`.
        log: Mutex<Vec<Duration>>,
        plan: Box<dyn Fn(u32, Duration) -> Step + Send + Sync>,
    }

    impl Script {
        fn new(plan: impl Fn(u32, Duration) -> Step + Send + Sync + 'static) -> Arc<Script> {
            Arc::new(Script {
                calls: AtomicU32::new(0),
                started: Instant::now(),
                log: Mutex::new(Vec::new()),
                plan: Box::new(plan),
            })
        }
        fn calls(&self) -> u32 {
            self.calls.load(Ordering::SeqCst)
        }
        fn calls_between(&self, from: Duration, to: Duration) -> usize {
            let log = self.log.lock().unwrap();
            log.iter().filter(|t| **t >= from && **t < to).count()
        }
    }

    fn token(n: u32, lifetime: Duration) -> AccessToken {
        let body = format!(r#"{{"access_token":"t-{n}","token_type":"Bearer","expires_in":300}}"#);
        let mut t = crate::token::parse_response(
            200,
            Some("application/json"),
            body.as_bytes(),
            0,
            Duration::from_secs(300),
        )
        .unwrap();
        // Set directly: the parser caps lifetimes, the point here is what the cache does with
        // one it did not cap.
        t.lifetime = lifetime;
        t
    }

    impl Fetch for Script {
        fn attempt(
            &self,
            _key: &TokenKey,
        ) -> impl Future<Output = Result<AccessToken, AttemptError>> + Send {
            let n = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
            let at = self.started.elapsed();
            self.log.lock().unwrap().push(at);
            let step = (self.plan)(n, at);
            async move {
                match step {
                    Step::Token(lifetime) => Ok(token(n, lifetime)),
                    Step::Fail(retry_after) => Err(AttemptError {
                        error: FetchError::Response(ResponseError::Status {
                            status: 500,
                            content_type: "text/html".into(),
                        }),
                        retry_after,
                    }),
                    Step::Panic => panic!("injected refresher panic"),
                }
            }
        }
    }

    fn start(script: &Arc<Script>) -> (TokenCache, Arc<Slot>) {
        let mut b = CacheBuilder::new(policy());
        let slot = b.slot(TokenKey::new(&["s"], &["a"]));
        (b.start(script.clone()), slot)
    }

    /// Requests, one per 20 ms, until `until` after the start; how many got a token.
    async fn poll_tokens(slot: &Slot, until: Duration) -> usize {
        let t0 = Instant::now();
        let mut ok = 0;
        while t0.elapsed() < until {
            if slot.token().await.is_ok() {
                ok += 1;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        ok
    }

    #[tokio::test(start_paused = true)]
    async fn a_refresher_that_panics_is_restarted_and_counted() {
        let script = Script::new(|n, _| match n {
            1 => Step::Panic,
            _ => Step::Token(S(3600)),
        });
        let (_cache, slot) = start(&script);
        // The first attempt panics; the supervisor restarts the refresher after the capped
        // pause (5 s), well within the request's wait bound (11 s).
        let lease = slot
            .token()
            .await
            .expect("a token from the restarted refresher");
        assert!(!lease.cached);
        assert_eq!(slot.stats.restarts(), 1);
        assert_eq!(script.calls(), 2);
        // The new refresher is a working one: an eviction makes it fetch again.
        assert_eq!(slot.reject(&lease.token), Rejection::Evicted);
        assert!(slot.token().await.is_ok());
        assert_eq!(script.calls(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn a_refresher_survives_a_lifetime_that_overflows_instant() {
        let script = Script::new(|_, _| Step::Token(Duration::MAX));
        let (_cache, slot) = start(&script);
        let lease = slot.token().await.expect("a token");
        assert!(lease.token.is_usable(Instant::now() + S(86_400 * 365)));
        assert_eq!(slot.stats.restarts(), 0, "no panic, nothing to restart");
        assert!(slot.readiness(Instant::now()).is_ok());
        assert!(slot.expires_in(Instant::now()).is_some());
        assert_eq!(slot.reject(&lease.token), Rejection::Evicted);
        assert!(slot.token().await.is_ok());
        assert_eq!(script.calls(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn an_outage_costs_one_attempt_per_5_s_and_recovery_takes_at_most_5_s() {
        // No token at all, 500s for 120 s, then tokens again.
        let script = Script::new(|_, at| {
            if at < S(120) {
                Step::Fail(None)
            } else {
                Step::Token(S(3600))
            }
        });
        let (_cache, slot) = start(&script);
        let served = poll_tokens(&slot, S(119)).await;
        assert_eq!(served, 0);
        // From 30 s into the outage, one attempt per 5 s (+1 for where the window cuts).
        let late = script.calls_between(S(30), S(120));
        assert!(late <= 90 / 5 + 1, "{late} attempts in 90 s");
        // The ramp before that: 200 ms doubling with jitter, then the phase-setting pause.
        let early = script.calls_between(Duration::ZERO, S(30));
        assert!(
            early <= 6 + 30 / 5 + 1,
            "{early} attempts in the first 30 s"
        );
        // The server is back at 120 s: a token within 5 s.
        let t = Instant::now();
        while slot.usable(Instant::now()).is_none() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let back = (script.started + S(120)).max(t);
        assert!(Instant::now() - back <= S(5), "{:?}", Instant::now() - back);
    }

    #[tokio::test(start_paused = true)]
    async fn retry_after_is_honoured_and_requests_fail_fast_meanwhile() {
        let script = Script::new(|n, _| match n {
            1 => Step::Fail(Some(S(60))),
            _ => Step::Token(S(3600)),
        });
        let (_cache, slot) = start(&script);
        // The round ends at once (the next attempt is beyond request_timeout): 503 fast, with
        // the server's minute as the retry hint.
        match slot.token().await {
            Err(TokenError::Fetch { retry_in, .. }) => {
                // 60 s asked, plus up to retry_backoff_max (5 s) to spread a fleet.
                assert!(retry_in >= S(59) && retry_in <= S(65), "{retry_in:?}")
            }
            other => panic!("{other:?}"),
        }
        tokio::time::sleep(S(59)).await;
        assert_eq!(script.calls(), 1, "nothing before the minute is over");
        tokio::time::sleep(S(7)).await;
        assert_eq!(script.calls(), 2);
        assert!(slot.token().await.is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn rejections_evict_at_most_once_per_gate_interval() {
        let script = Script::new(|_, _| Step::Token(S(3600)));
        let (_cache, slot) = start(&script);
        let first = slot.token().await.unwrap().token;
        assert_eq!(slot.reject(&first), Rejection::Evicted);
        let second = slot.token().await.unwrap().token;
        assert_eq!(second.generation, first.generation + 1);
        // Another request that used the first token: not the cached one any more.
        assert_eq!(slot.reject(&first), Rejection::Stale);
        // The fresh token is rejected too, inside the 10 s: kept, served, no fetch.
        assert_eq!(slot.reject(&second), Rejection::Held);
        assert!(Arc::ptr_eq(&slot.token().await.unwrap().token, &second));
        assert_eq!(script.calls(), 2);
        // An upstream rejecting everything at 50 requests/s for 60 s: evictions at 0 (above),
        // 10 and 30 s; the next would be at 70 s.
        let t0 = Instant::now();
        while t0.elapsed() < S(60) {
            let lease = slot.token().await.unwrap();
            slot.reject(&lease.token);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(script.calls(), 4);
    }

    #[tokio::test(start_paused = true)]
    async fn a_success_with_the_fresh_token_resets_the_gate_interval() {
        let script = Script::new(|_, _| Step::Token(S(3600)));
        let (_cache, slot) = start(&script);
        let t0 = Instant::now();
        let a = slot.token().await.unwrap().token;
        assert_eq!(slot.reject(&a), Rejection::Evicted);
        tokio::time::sleep(S(10)).await;
        let b = slot.token().await.unwrap().token;
        // b is rejected as well: the second eviction doubles the interval to 20 s …
        assert_eq!(slot.reject(&b), Rejection::Evicted);
        let c = slot.token().await.unwrap().token;
        // … unless a request succeeds with the token fetched after it.
        slot.accepted(&c);
        tokio::time::sleep_until(t0 + S(30)).await;
        assert_eq!(slot.reject(&c), Rejection::Evicted);
        let d = slot.token().await.unwrap().token;
        tokio::time::sleep_until(t0 + S(40)).await;
        assert_eq!(
            slot.reject(&d),
            Rejection::Evicted,
            "back to 10 s, not 40 s"
        );
        assert!(slot.token().await.is_ok());
        assert_eq!(script.calls(), 5);
    }
}
