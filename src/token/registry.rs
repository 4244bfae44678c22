//! The OAuth clients the sidecar acts as, and where each one's tokens live (docs/spec.md §3).
//!
//! One [`ClientTokens`] per client (`[token]` is the client [`DEFAULT_CLIENT`], each
//! `[[client]]` another), each with its own token client (key, auth method, endpoint) and two
//! kinds of slots:
//!
//! - **fixed**: the keys the routes name, known at start. Prefetched, refreshed ahead, awaited
//!   by `/readyz`, never evicted; routes hold them directly.
//! - **run-time**: keys first asked for by a request (per-request audience/scope, wildcard host
//!   routes, the loopback token endpoint). They live in a bounded `moka` cache:
//!   `token.cache_capacity` entries at most (least recently used evicted first), dropped after
//!   `token.cache_idle_timeout` without a request, and after the token's usable life when no
//!   request extended it (see [`SlotExpiry`]). Each entry owns its slot's supervised refresher;
//!   the eviction listener aborts it, so an evicted key costs nothing any more.
//!
//! Invariants:
//! - a fixed key is never in the moka cache ([`ClientTokens::slot`] looks at the fixed slots
//!   first), so capacity pressure cannot evict what `/readyz` promised;
//! - one slot, hence one refresher, hence one token request at a time, per run-time key: moka's
//!   `get_with` runs the (synchronous, non-blocking) insertion once per key however many callers
//!   miss at once, and the slot's refresher is the single flight for the fetch;
//! - refreshers of run-time slots alive ≤ entries in the cache + the evicted entries whose
//!   removal moka has not yet processed (its pending-task queue, bounded by moka);
//! - a run-time key whose refresher keeps failing is bounded too: with no usable token a read
//!   never extends the entry's life, so it leaves `cache_idle_timeout` after its creation (or
//!   when its last token stopped being usable) even if requests keep asking for it;
//! - metric labels are client names (from the config) and eviction causes (a fixed set), never
//!   a scope or an audience; the evicted slots' counters are folded into their client's totals.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use moka::notification::RemovalCause;
use moka::sync::Cache;
use prometheus_client::metrics::histogram::Histogram;
use tokio::task::JoinHandle;

use crate::config::TokenConfig;
use crate::token::TokenKey;
use crate::token::cache::{Fetch, Policy, Slot, SlotStats, start_runtime_slot};
use crate::token::client::{Endpoint, TokenClient};

/// The name of the client a lone `[token]` section defines.
pub(crate) const DEFAULT_CLIENT: &str = "default";

/// Why a run-time key left the cache: the `cause` label of
/// `token_sidecar_cache_evictions_total`, a fixed set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum EvictionCause {
    /// Over `token.cache_capacity`: the least recently used key made room.
    Size,
    /// The token its last request saw was no longer usable (its refresher kept failing, or no
    /// request came to see the refreshed one).
    Expired,
    /// No request for `token.cache_idle_timeout`.
    Idle,
    /// Removed by the program (shutdown, tests).
    Explicit,
}

impl EvictionCause {
    pub(crate) const ALL: [(EvictionCause, &'static str); 4] = [
        (EvictionCause::Size, "size"),
        (EvictionCause::Expired, "expired"),
        (EvictionCause::Idle, "idle"),
        (EvictionCause::Explicit, "explicit"),
    ];
}

/// A run-time slot and its supervised refresher; dropping the last handle stops the
/// refresher (belt and braces: the eviction listener already did).
struct RuntimeEntry {
    slot: Arc<Slot>,
    task: JoinHandle<()>,
    /// When the entry was created, and its last read as nanoseconds after that: tells the
    /// eviction listener whether the idle timeout or the token's life ended it.
    born: std::time::Instant,
    last_read: AtomicU64,
}

impl RuntimeEntry {
    /// How long no request has read the entry.
    fn unread_for(&self) -> Duration {
        self.born
            .elapsed()
            .saturating_sub(Duration::from_nanos(self.last_read.load(Ordering::Relaxed)))
    }
}

impl Drop for RuntimeEntry {
    fn drop(&mut self) {
        self.task.abort();
    }
}

type Entry = Arc<RuntimeEntry>;

/// Per-entry expiry from the token's usable life (moka's clock; durations only, so the two
/// clocks never meet).
///
/// - created: `idle` (no token yet; the first round of attempts must succeed by then, or the
///   key leaves and the next request starts over with a fresh retry schedule);
/// - read with a usable token: the token's remaining usable life, so a key in use stays while
///   its refresher refreshes ahead (each read moves the deadline to the current token's);
/// - read without one: unchanged, so requests cannot keep a failing key alive.
///
/// `time_to_idle` applies on top: whichever comes first.
struct SlotExpiry {
    idle: Duration,
}

impl moka::Expiry<TokenKey, Entry> for SlotExpiry {
    fn expire_after_create(
        &self,
        _key: &TokenKey,
        _value: &Entry,
        _created_at: std::time::Instant,
    ) -> Option<Duration> {
        Some(self.idle)
    }

    fn expire_after_read(
        &self,
        _key: &TokenKey,
        value: &Entry,
        read_at: std::time::Instant,
        duration_until_expiry: Option<Duration>,
        _last_modified_at: std::time::Instant,
    ) -> Option<Duration> {
        let since_birth = read_at.saturating_duration_since(value.born).as_nanos();
        value.last_read.store(
            u64::try_from(since_birth).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
        value
            .slot
            .usable_for(tokio::time::Instant::now())
            .or(duration_until_expiry)
    }
}

/// Creates a run-time slot with its refresher: the token client in production, a scripted
/// fetcher in the unit tests.
type SpawnSlot = Box<dyn Fn(TokenKey) -> (Arc<Slot>, JoinHandle<()>) + Send + Sync>;

/// Counters of the run-time cache, shared with its eviction listener.
#[derive(Debug, Default)]
struct RuntimeCounters {
    /// Indexed like [`EvictionCause::ALL`].
    evictions: [AtomicU64; 4],
    /// Counters of slots already evicted.
    retired: SlotStats,
    /// Refreshers of run-time slots whose task has not ended.
    live: Arc<AtomicUsize>,
}

/// One OAuth client: its token settings, its token client, its slots.
pub(crate) struct ClientTokens {
    name: Arc<str>,
    endpoint: Option<Endpoint>,
    /// Slots known at start (prefetched, refreshed ahead, awaited by `/readyz`).
    fixed: Vec<Arc<Slot>>,
    /// Slots created at run time, bounded (see the module docs).
    runtime: Cache<TokenKey, Entry>,
    counters: Arc<RuntimeCounters>,
    spawn: SpawnSlot,
}

impl std::fmt::Debug for ClientTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTokens")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl ClientTokens {
    pub(crate) fn new(
        name: &str,
        config: TokenConfig,
        fetcher: Arc<TokenClient>,
        fetch_duration: Histogram,
        fixed: Vec<Arc<Slot>>,
    ) -> ClientTokens {
        let endpoint = Some(fetcher.endpoint().clone());
        let mut c = ClientTokens::with_fetch(name, config, fetcher, fetch_duration, fixed);
        c.endpoint = endpoint;
        c
    }

    /// Like [`ClientTokens::new`] with any token source (the unit tests' scripted one).
    pub(crate) fn with_fetch<F: Fetch>(
        name: &str,
        config: TokenConfig,
        fetcher: Arc<F>,
        fetch_duration: Histogram,
        fixed: Vec<Arc<Slot>>,
    ) -> ClientTokens {
        let policy = Policy::from_config(&config);
        let counters = Arc::new(RuntimeCounters::default());
        let live = counters.live.clone();
        let spawn: SpawnSlot = Box::new(move |key| {
            start_runtime_slot(
                key,
                policy,
                fetcher.clone(),
                fetch_duration.clone(),
                live.clone(),
            )
        });
        let listener_counters = counters.clone();
        let idle = config.cache_idle_timeout;
        let runtime = Cache::builder()
            .max_capacity(config.cache_capacity)
            // LRU, not moka's default TinyLFU admission: a new key must always be admitted,
            // or a request would wait on a slot whose refresher was stopped at once.
            .eviction_policy(moka::policy::EvictionPolicy::lru())
            .time_to_idle(config.cache_idle_timeout)
            .expire_after(SlotExpiry {
                idle: config.cache_idle_timeout,
            })
            .eviction_listener(move |_key, entry: Entry, cause| {
                entry.task.abort();
                let cause = match cause {
                    RemovalCause::Size => EvictionCause::Size,
                    // moka says "expired" for both clocks; unread for the idle timeout means
                    // idle. "Replaced" is the same: only `get_with` inserts, and only over an
                    // entry that expired but was not yet removed.
                    RemovalCause::Expired | RemovalCause::Replaced => {
                        if entry.unread_for() >= idle {
                            EvictionCause::Idle
                        } else {
                            EvictionCause::Expired
                        }
                    }
                    RemovalCause::Explicit => EvictionCause::Explicit,
                };
                listener_counters.evictions[cause as usize].fetch_add(1, Ordering::Relaxed);
                listener_counters.retired.absorb(&entry.slot.stats);
            })
            .build();
        ClientTokens {
            name: Arc::from(name),
            endpoint: None,
            fixed,
            runtime,
            counters,
            spawn,
        }
    }

    /// The client's name (`[[client]] name`, or [`DEFAULT_CLIENT`]).
    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    /// The client's token endpoint (configured or discovered).
    pub(crate) fn endpoint(&self) -> Option<&Endpoint> {
        self.endpoint.as_ref()
    }

    /// The slots known at start, one per distinct key its routes name.
    pub(crate) fn fixed(&self) -> &[Arc<Slot>] {
        &self.fixed
    }

    /// The slot for `key`: the one known at start when there is one, else a run-time slot,
    /// created (with its refresher) on first use. Must be called inside a Tokio runtime.
    pub(crate) fn slot(&self, key: TokenKey) -> Arc<Slot> {
        if let Some(s) = self.fixed.iter().find(|s| *s.key() == key) {
            return s.clone();
        }
        let spawn = &self.spawn;
        // The init closure only builds the slot and spawns its refresher (no await, no
        // I/O), so callers that miss together wait microseconds on moka's per-key lock.
        let entry = self.runtime.get_with_by_ref(&key, || {
            let (slot, task) = spawn(key.clone());
            Arc::new(RuntimeEntry {
                slot,
                task,
                born: std::time::Instant::now(),
                last_read: AtomicU64::new(0),
            })
        });
        entry.slot.clone()
    }

    /// Run-time keys held now (moka's count, exact after [`ClientTokens::run_pending_tasks`]).
    pub(crate) fn cache_entries(&self) -> u64 {
        self.runtime.entry_count()
    }

    /// Run-time keys evicted so far for `cause`.
    pub(crate) fn evictions(&self, cause: EvictionCause) -> u64 {
        self.counters.evictions[cause as usize].load(Ordering::Relaxed)
    }

    #[cfg(test)]
    /// Refreshers of run-time slots that have not ended yet.
    pub(crate) fn runtime_refreshers(&self) -> usize {
        self.counters.live.load(Ordering::Relaxed)
    }

    #[cfg(test)]
    /// Applies moka's pending evictions now (moka does it lazily on later writes).
    pub(crate) fn run_pending_tasks(&self) {
        self.runtime.run_pending_tasks();
    }

    /// `f` summed over the run-time slots, live and evicted: what the aggregate metrics add
    /// to the fixed slots' counters.
    pub(crate) fn runtime_stats(&self, f: impl Fn(&SlotStats) -> u64) -> u64 {
        let live: u64 = self.runtime.iter().map(|(_, e)| f(&e.slot.stats)).sum();
        live + f(&self.counters.retired)
    }
}

impl Drop for ClientTokens {
    fn drop(&mut self) {
        // The entries' own Drop aborts their refreshers once moka lets go of them; this makes
        // it happen now rather than whenever the cache's internals are freed.
        for (_, e) in self.runtime.iter() {
            e.task.abort();
        }
    }
}

/// Every client, by name.
#[derive(Debug, Default)]
pub(crate) struct Clients {
    list: Vec<Arc<ClientTokens>>,
}

impl Clients {
    pub(crate) fn new(list: Vec<Arc<ClientTokens>>) -> Clients {
        Clients { list }
    }

    /// The client called `name`.
    pub(crate) fn get(&self, name: &str) -> Option<&Arc<ClientTokens>> {
        self.list.iter().find(|c| c.name() == name)
    }

    /// Every client, in config order (`default` first).
    pub(crate) fn iter(&self) -> impl Iterator<Item = &Arc<ClientTokens>> {
        self.list.iter()
    }
}

#[cfg(test)]
mod tests {
    //! The run-time cache's bounds, on real time (moka keeps its own clock; Tokio's paused
    //! clock would not move it), with short durations and bounded loops.

    use super::*;
    use crate::token::AccessToken;
    use crate::token::client::AttemptError;
    use std::future::Future;
    use std::sync::atomic::AtomicU64;

    /// A token source that counts its calls and hands out tokens of one lifetime.
    struct Counting {
        calls: AtomicU64,
        lifetime: Duration,
    }

    impl Fetch for Counting {
        fn attempt(
            &self,
            _key: &TokenKey,
        ) -> impl Future<Output = Result<AccessToken, AttemptError>> + Send {
            let n = self.calls.fetch_add(1, Ordering::SeqCst);
            let lifetime = self.lifetime;
            async move {
                let body = format!(r#"{{"access_token":"t-{n}","token_type":"Bearer"}}"#);
                let mut t = crate::token::parse_response(
                    200,
                    Some("application/json"),
                    body.as_bytes(),
                    0,
                    Duration::from_secs(300),
                )
                .expect("a valid response");
                t.lifetime = lifetime;
                Ok(t)
            }
        }
    }

    /// A validated `[token]` with `extra` keys. `cache_idle_timeout` is set after validation
    /// (which asks for at least 1 s), so these tests can use sub-second idle timeouts.
    fn token_config(extra: &str) -> TokenConfig {
        let mut idle = None;
        let mut rest = String::new();
        for line in extra.lines() {
            match line.strip_prefix("cache_idle_timeout = ") {
                Some(v) => idle = Some(humantime::parse_duration(v.trim_matches('"')).unwrap()),
                None => rest.push_str(&format!("{line}\n")),
            }
        }
        let text = format!(
            "[token]\ntoken_url = \"https://idp.example.com/t\"\nclient_id = \"c\"\n\
             auth_method = \"client_secret_post\"\nclient_secret = \"x\"\n{rest}\n\
             [[route]]\nname = \"r\"\npath_prefix = \"/\"\nupstream = \"https://r.example.com\"\n"
        );
        let mut cfg = crate::config::from_toml_str(&text).expect("valid").token;
        if let Some(idle) = idle {
            cfg.cache_idle_timeout = idle;
        }
        cfg
    }

    fn client(extra: &str, lifetime: Duration) -> (ClientTokens, Arc<Counting>) {
        client_with_fixed(extra, lifetime, |_| Vec::new())
    }

    fn client_with_fixed(
        extra: &str,
        lifetime: Duration,
        fixed: impl FnOnce(&Policy) -> Vec<Arc<Slot>>,
    ) -> (ClientTokens, Arc<Counting>) {
        let cfg = token_config(extra);
        let fetch = Arc::new(Counting {
            calls: AtomicU64::new(0),
            lifetime,
        });
        let fixed = fixed(&Policy::from_config(&cfg));
        let c =
            ClientTokens::with_fetch("default", cfg, fetch.clone(), Histogram::new([1.0]), fixed);
        (c, fetch)
    }

    fn audience(i: usize) -> TokenKey {
        TokenKey::new(&[] as &[String], &[format!("https://svc-{i}.example.com/")])
    }

    /// Resident set size in bytes (Linux `/proc/self/statm`, second field, in pages).
    fn rss_bytes() -> u64 {
        let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
        let pages: u64 = statm
            .split_whitespace()
            .nth(1)
            .and_then(|p| p.parse().ok())
            .unwrap_or(0);
        pages * 4096
    }

    /// Lets aborted refresher tasks be dropped, then applies moka's pending evictions.
    async fn settle(c: &ClientTokens) {
        c.run_pending_tasks();
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    /// Issue 13 item 4: 10,000 distinct audiences requested in a loop with capacity 1000.
    /// Figures printed with `cargo test --lib ten_thousand -- --nocapture`.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn ten_thousand_audiences_keep_entries_refreshers_and_rss_bounded() {
        const KEYS: usize = 10_000;
        const CAPACITY: u64 = 1000;
        // Aborted tasks still queued in the runtime when counted (stated bound; 0 observed).
        const SLACK: usize = 64;
        let (c, fetch) = client("cache_capacity = 1000", Duration::from_secs(3600));
        let mut rss_at_2000 = 0;
        let mut max_entries = 0;
        let mut max_live = 0;
        for i in 0..KEYS {
            c.slot(audience(i)).token().await.expect("a token");
            if (i + 1) % 500 == 0 {
                settle(&c).await;
                max_entries = max_entries.max(c.cache_entries());
                max_live = max_live.max(c.runtime_refreshers());
                assert!(
                    c.cache_entries() <= CAPACITY,
                    "{} entries",
                    c.cache_entries()
                );
                assert!(
                    c.runtime_refreshers() <= CAPACITY as usize + SLACK,
                    "{} refreshers alive at {}",
                    c.runtime_refreshers(),
                    i + 1
                );
                if i + 1 == 2000 {
                    rss_at_2000 = rss_bytes();
                }
            }
        }
        settle(&c).await;
        let rss_end = rss_bytes();
        let fetches = fetch.calls.load(Ordering::SeqCst);
        let growth = rss_end.saturating_sub(rss_at_2000);
        println!(
            "10,000 audiences, capacity {CAPACITY}: token requests {fetches}, max entries {max_entries}, \
             entries now {}, max refreshers alive {max_live}, now {}, evictions size={} expired={} idle={}, \
             RSS at 2,000 keys {:.1} MiB, at 10,000 keys {:.1} MiB (growth {:.2} MiB)",
            c.cache_entries(),
            c.runtime_refreshers(),
            c.evictions(EvictionCause::Size),
            c.evictions(EvictionCause::Expired),
            c.evictions(EvictionCause::Idle),
            rss_at_2000 as f64 / 1048576.0,
            rss_end as f64 / 1048576.0,
            growth as f64 / 1048576.0,
        );
        assert_eq!(
            fetches, KEYS as u64,
            "exactly one token request per distinct key"
        );
        assert_eq!(c.evictions(EvictionCause::Size), KEYS as u64 - CAPACITY);
        // Flat: 8,000 more keys through a full cache may not cost more than a few MiB of
        // allocator slack (a leak of one slot per key would be ≥ 8,000 × ~1 KiB).
        assert!(growth < 8 * 1024 * 1024, "RSS grew {growth} bytes");
        // The evicted slots' counters are kept in the client's totals.
        assert_eq!(c.runtime_stats(|s| s.fetches_total()), KEYS as u64);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_unused_key_leaves_after_the_idle_timeout_and_its_refresher_stops() {
        let (c, fetch) = client("cache_idle_timeout = \"300ms\"", Duration::from_secs(3600));
        c.slot(audience(1)).token().await.expect("a token");
        settle(&c).await;
        assert_eq!(c.cache_entries(), 1);
        assert_eq!(c.runtime_refreshers(), 1);
        tokio::time::sleep(Duration::from_millis(600)).await;
        settle(&c).await;
        assert_eq!(c.cache_entries(), 0);
        assert_eq!(
            c.evictions(EvictionCause::Idle),
            1,
            "its token was still usable"
        );
        assert_eq!(c.runtime_refreshers(), 0, "eviction aborted the refresher");
        // Asked again: a new slot, a new fetch.
        c.slot(audience(1)).token().await.expect("a token");
        assert_eq!(fetch.calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_key_in_use_stays_while_refreshed_and_an_unused_one_leaves_when_its_token_does() {
        // 2 s tokens: usable for 1 s (skew clamped to half), refreshed at 0.5 s; idle 1 h.
        let (c, fetch) = client("cache_idle_timeout = \"1h\"", Duration::from_secs(2));
        let used = audience(1);
        let unused = audience(2);
        c.slot(used.clone()).token().await.expect("a token");
        c.slot(unused.clone()).token().await.expect("a token");
        // Read once with its token in place: from here its entry lives as long as that token
        // (a created entry only knows the idle timeout; the first read after the token
        // arrived sets the token's usable life).
        assert!(
            c.slot(unused.clone())
                .token()
                .await
                .expect("a token")
                .cached
        );
        // 3 s of requests on `used` only, every 50 ms.
        let t0 = std::time::Instant::now();
        while t0.elapsed() < Duration::from_secs(3) {
            assert!(c.slot(used.clone()).token().await.is_ok());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        settle(&c).await;
        assert_eq!(c.cache_entries(), 1, "the unused key left with its token");
        assert_eq!(c.evictions(EvictionCause::Expired), 1);
        assert_eq!(c.runtime_refreshers(), 1);
        // The used key was refreshed ahead (several fetches) and never evicted: every request
        // after the first was served from the cache.
        assert!(fetch.calls.load(Ordering::SeqCst) >= 4);
        assert!(c.slot(used).token().await.expect("a token").cached);
    }

    /// A key whose token requests always fail is not kept alive by requests.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failing_key_is_not_kept_alive_by_requests() {
        struct Failing;
        impl Fetch for Failing {
            async fn attempt(&self, _key: &TokenKey) -> Result<AccessToken, AttemptError> {
                Err(AttemptError {
                    error: crate::token::client::FetchError::Response(
                        crate::token::ResponseError::Status {
                            status: 500,
                            content_type: "text/plain".into(),
                        },
                    ),
                    retry_after: None,
                })
            }
        }
        let cfg = token_config("cache_idle_timeout = \"400ms\"\nrequest_timeout = \"100ms\"");
        let c = ClientTokens::with_fetch(
            "default",
            cfg,
            Arc::new(Failing),
            Histogram::new([1.0]),
            Vec::new(),
        );
        let key = audience(1);
        let first = c.slot(key.clone());
        let t0 = std::time::Instant::now();
        // Requests every 50 ms for 1 s: idle never triggers, but no usable token ever extends
        // the entry past its creation + 400 ms.
        while t0.elapsed() < Duration::from_secs(1) {
            assert!(c.slot(key.clone()).token().await.is_err());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        settle(&c).await;
        assert!(c.evictions(EvictionCause::Expired) >= 1);
        assert!(!Arc::ptr_eq(&first, &c.slot(key)), "a new slot replaced it");
        settle(&c).await;
        assert!(c.runtime_refreshers() <= 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn fixed_keys_are_never_in_the_cache_nor_evicted() {
        let fixed_key = TokenKey::new(&["fixed"], &["https://fixed.example.com"]);
        let mut fixed_slot = None;
        let (c, _fetch) = client_with_fixed(
            "cache_capacity = 2\ncache_idle_timeout = \"200ms\"",
            Duration::from_secs(3600),
            |policy| {
                let mut b = crate::token::cache::CacheBuilder::new(*policy);
                let s = b.slot(fixed_key.clone());
                fixed_slot = Some(s.clone());
                vec![s]
            },
        );
        let fixed_slot = fixed_slot.unwrap();
        for i in 0..20 {
            assert!(Arc::ptr_eq(&c.slot(fixed_key.clone()), &fixed_slot));
            c.slot(audience(i)).token().await.expect("a token");
        }
        tokio::time::sleep(Duration::from_millis(400)).await;
        settle(&c).await;
        assert_eq!(c.cache_entries(), 0, "every run-time key left");
        assert!(
            c.runtime.get(&fixed_key).is_none(),
            "the fixed key never entered"
        );
        assert!(Arc::ptr_eq(&c.slot(fixed_key), &fixed_slot));
    }

    /// Single flight, counted at a real token endpoint (the dev server): 50 requests that miss
    /// the same new key at once cause one token request.
    #[cfg(feature = "dev")]
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn fifty_concurrent_first_requests_for_a_new_key_make_one_token_request() {
        use crate::dev::authz::{DevClient, DevServer, DevServerConfig};
        let (pem, key) = crate::key::SigningKey::generate(crate::key::Algorithm::ES256).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let key_path = dir.path().join("key.pem");
        std::fs::write(&key_path, pem.expose()).unwrap();
        let dev = DevServer::start(DevServerConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            clients: vec![DevClient {
                client_id: "svc".into(),
                jwks: serde_json::json!({ "keys": [key.public_jwk()] }),
                scopes: ["read".to_string()].into(),
                audiences: ["https://new.example.com".to_string()].into(),
            }],
            federations: Vec::new(),
            token_ttl: Duration::from_secs(600),
        })
        .await
        .unwrap();
        let text = format!(
            "[token]\ntoken_url = \"{}\"\nallow_insecure_token_url = true\nclient_id = \"svc\"\n\
             private_key_file = \"{}\"\n\
             [[route]]\nname = \"r\"\npath_prefix = \"/\"\nupstream = \"https://r.example.com\"\n",
            dev.token_url(),
            key_path.display()
        );
        let cfg = crate::config::from_toml_str(&text).unwrap().token;
        let fetcher = Arc::new(TokenClient::new(&cfg).unwrap());
        let c = Arc::new(ClientTokens::new(
            "default",
            cfg,
            fetcher,
            Histogram::new([1.0]),
            Vec::new(),
        ));
        let key = TokenKey::new(&["read"], &["https://new.example.com"]);
        let before = dev.token_requests();
        let barrier = Arc::new(tokio::sync::Barrier::new(50));
        let tasks: Vec<_> = (0..50)
            .map(|_| {
                let (c, key, barrier) = (c.clone(), key.clone(), barrier.clone());
                tokio::spawn(async move {
                    barrier.wait().await;
                    c.slot(key).token().await.map(|l| l.token.generation)
                })
            })
            .collect();
        for t in tasks {
            assert_eq!(t.await.unwrap().expect("a token"), 1, "the one token");
        }
        assert_eq!(
            dev.token_requests() - before,
            1,
            "one token request at the server"
        );
        c.run_pending_tasks();
        assert_eq!(c.cache_entries(), 1);
    }
}
