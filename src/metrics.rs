//! Prometheus metrics, names prefixed `token_sidecar_`, base units, bounded labels (route and
//! client names from the config and fixed outcome and cause words; never scopes, audiences,
//! hosts or paths).
//!
//! Slots created at run time (per-request targets, issue 13) have no route: their counters are
//! folded into the unlabelled aggregates (`token_fetches`, `cache_hits`, …), evicted ones
//! included, and the run-time cache itself is described per client (`cache_entries`,
//! `cache_evictions`). No series is ever created per run-time key.
//!
//! Per-request metrics are resolved per route once at start-up ([`RouteMetrics`]), so the hot
//! path only increments atomics and observes a histogram. Values that describe state rather than
//! events (seconds until each route's token expires, whether a refresh is failing, cache
//! counters kept by the slots, log lines dropped by the writer) are read at scrape time by a
//! collector.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};
use tokio::time::Instant;

use crate::token::cache::{Slot, SlotStats};
use crate::token::client::FetchOutcome;
use crate::token::registry::{Clients, DEFAULT_CLIENT, EvictionCause};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabel {
    route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteClass {
    route: String,
    status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: String,
}

/// A route and the client its token comes from (a function of the config: bounded).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteClient {
    route: String,
    client: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClientLabel {
    client: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClientCause {
    client: String,
    cause: String,
}

/// One route's per-request metrics, resolved once.
#[derive(Debug, Clone)]
pub(crate) struct RouteMetrics {
    /// 1xx … 5xx.
    by_class: [Counter; 5],
    duration: Histogram,
    upstream_errors: Counter,
    evictions: Counter,
}

impl RouteMetrics {
    pub(crate) fn request(&self, status: u16, took: Duration) {
        let class = usize::from((status / 100).clamp(1, 5)) - 1;
        self.by_class[class].inc();
        self.duration.observe(took.as_secs_f64());
    }

    pub(crate) fn upstream_error(&self) {
        self.upstream_errors.inc();
    }

    /// A request on this route had its token evicted (docs/spec.md §3).
    pub(crate) fn eviction(&self) {
        self.evictions.inc();
    }

    /// Handles that no registry exports, for tests that build routes by hand.
    #[cfg(test)]
    pub(crate) fn unregistered() -> RouteMetrics {
        RouteMetrics {
            by_class: Default::default(),
            duration: request_histogram(),
            upstream_errors: Counter::default(),
            evictions: Counter::default(),
        }
    }
}

/// The registry and the handles into it.
pub(crate) struct Metrics {
    registry: Registry,
    requests: Family<RouteClass, Counter>,
    request_duration: Family<RouteLabel, Histogram, fn() -> Histogram>,
    upstream_errors: Family<RouteLabel, Counter>,
    evictions: Family<RouteLabel, Counter>,
    state: Arc<StateCollector>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

fn request_histogram() -> Histogram {
    // 0.5 ms … ~30 s.
    Histogram::new(exponential_buckets(0.0005, 2.5, 13))
}

impl Metrics {
    /// The registry; `fetch_duration` is the token cache's histogram. The slots are read at
    /// scrape time, as [`Metrics::route`] names them.
    pub(crate) fn new(fetch_duration: &Histogram) -> Metrics {
        let mut registry = Registry::with_prefix("token_sidecar");
        let requests = Family::<RouteClass, Counter>::default();
        registry.register(
            "requests",
            "Requests served, by route and status class (sidecar errors included)",
            requests.clone(),
        );
        let request_duration =
            Family::<RouteLabel, Histogram, fn() -> Histogram>::new_with_constructor(
                request_histogram,
            );
        registry.register_with_unit(
            "request_duration",
            "Time from request received to response headers sent, by route",
            Unit::Seconds,
            request_duration.clone(),
        );
        let upstream_errors = Family::<RouteLabel, Counter>::default();
        registry.register(
            "upstream_connection_errors",
            "Requests that could not be delivered to the upstream (connect, TLS, reset), by route",
            upstream_errors.clone(),
        );
        let evictions = Family::<RouteLabel, Counter>::default();
        registry.register(
            "token_evictions",
            "Tokens dropped after the upstream rejected them (each causes one token request), by the route whose request saw the rejection",
            evictions.clone(),
        );
        registry.register_with_unit(
            "token_fetch_duration",
            "Duration of one token request",
            Unit::Seconds,
            fetch_duration.clone(),
        );
        let state = Arc::new(StateCollector::default());
        registry.register_collector(Box::new(state.clone()));
        Metrics {
            registry,
            requests,
            request_duration,
            upstream_errors,
            evictions,
            state,
        }
    }

    /// The per-request handles for `route`, whose token comes from `slot` (`None` for the
    /// requests that matched no route); call once per route at start-up.
    pub(crate) fn route(&self, route: &str, slot: Option<&Arc<Slot>>) -> RouteMetrics {
        if let Some(slot) = slot {
            self.state
                .routes
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push((route.to_string(), slot.clone()));
        }
        let label = RouteLabel {
            route: route.to_string(),
        };
        RouteMetrics {
            by_class: ["1xx", "2xx", "3xx", "4xx", "5xx"].map(|class| {
                self.requests
                    .get_or_create(&RouteClass {
                        route: route.to_string(),
                        status: class.to_string(),
                    })
                    .clone()
            }),
            duration: self.request_duration.get_or_create(&label).clone(),
            upstream_errors: self.upstream_errors.get_or_create(&label).clone(),
            evictions: self.evictions.get_or_create(&label).clone(),
        }
    }

    /// The clients, whose run-time caches are read at scrape time; call once at start-up.
    pub(crate) fn clients(&self, clients: Arc<Clients>) {
        *self.state.clients.lock().unwrap_or_else(|e| e.into_inner()) = Some(clients);
    }

    /// The Prometheus text exposition.
    pub(crate) fn render(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

/// Reads state at scrape time: fetch and cache counters of every slot, per-route token expiry.
#[derive(Debug, Default)]
struct StateCollector {
    /// Each route and the slot it takes its token from (routes with equal sets share one).
    routes: Mutex<Vec<(String, Arc<Slot>)>>,
    /// Every client, for the run-time caches (set once the clients exist).
    clients: Mutex<Option<Arc<Clients>>>,
}

impl Collector for StateCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let routes = self.routes.lock().unwrap_or_else(|e| e.into_inner());
        let clients = self
            .clients
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .unwrap_or_default();
        // Run-time slots (live and evicted) of every client, added to the fixed slots' sums.
        let runtime = |f: &dyn Fn(&SlotStats) -> u64| -> u64 {
            clients.iter().map(|c| c.runtime_stats(f)).sum()
        };
        // Routes with equal sets share a slot; count each slot once.
        let mut slots: Vec<&Arc<Slot>> = Vec::new();
        for (_, s) in routes.iter() {
            if !slots.iter().any(|x| Arc::ptr_eq(x, s)) {
                slots.push(s);
            }
        }
        let mut me = encoder.encode_descriptor(
            "token_fetches",
            "Token requests to the authorization server (each attempt, retries included), by outcome (ok, rejected, unavailable, invalid)",
            None,
            MetricType::Counter,
        )?;
        for (outcome, name) in FetchOutcome::ALL {
            let label = OutcomeLabel {
                outcome: name.to_string(),
            };
            let n: u64 = slots.iter().map(|s| s.stats.fetches(outcome)).sum::<u64>()
                + runtime(&|s| s.fetches(outcome));
            ConstCounter::new(n).encode(me.encode_family(&label)?)?;
        }
        let sum =
            |f: fn(&SlotStats) -> u64| slots.iter().map(|s| f(&s.stats)).sum::<u64>() + runtime(&f);
        for (name, help, value) in [
            (
                "cache_hits",
                "Requests served from a usable cached token",
                sum(|s| s.hits()),
            ),
            (
                "cache_misses",
                "Requests that had to wait for the token endpoint",
                sum(|s| s.misses()),
            ),
            (
                "cache_refreshes",
                "Token requests made while a token was cached (refresh ahead, retries of a failing refresh)",
                sum(|s| s.refreshes()),
            ),
            (
                "refresher_restarts",
                "Token refreshers that stopped (a panic) and were started again",
                sum(|s| s.restarts()),
            ),
            (
                "log_dropped",
                "Log lines dropped because stderr could not keep up (never blocked on)",
                crate::telemetry::dropped_lines(),
            ),
        ] {
            let c = ConstCounter::new(value);
            let me = encoder.encode_descriptor(name, help, None, c.metric_type())?;
            c.encode(me)?;
        }

        let mut me = encoder.encode_descriptor(
            "cache_entries",
            "Keys created at run time held in the client's bounded token cache (at most token.cache_capacity)",
            None,
            MetricType::Gauge,
        )?;
        for c in clients.iter() {
            let label = ClientLabel {
                client: c.name().to_owned(),
            };
            let n = i64::try_from(c.cache_entries()).unwrap_or(i64::MAX);
            ConstGauge::new(n).encode(me.encode_family(&label)?)?;
        }
        let mut me = encoder.encode_descriptor(
            "cache_evictions",
            "Run-time keys evicted from the client's token cache (their refresher stopped), by cause (size, expired, idle, explicit)",
            None,
            MetricType::Counter,
        )?;
        for c in clients.iter() {
            for (cause, word) in EvictionCause::ALL {
                let label = ClientCause {
                    client: c.name().to_owned(),
                    cause: word.to_owned(),
                };
                ConstCounter::new(c.evictions(cause)).encode(me.encode_family(&label)?)?;
            }
        }

        let now = Instant::now();
        // Each route's slot is a fixed slot of exactly one client.
        let label_of = |route: &str, slot: &Arc<Slot>| RouteClient {
            route: route.to_owned(),
            client: clients
                .iter()
                .find(|c| c.fixed().iter().any(|s| Arc::ptr_eq(s, slot)))
                .map_or_else(|| DEFAULT_CLIENT.to_owned(), |c| c.name().to_owned()),
        };
        let mut me = encoder.encode_descriptor(
            "token_expiry",
            "Seconds until the route's cached token expires (0 when none is cached)",
            Some(&Unit::Seconds),
            MetricType::Gauge,
        )?;
        for (route, slot) in routes.iter() {
            let secs = slot.expires_in(now).map_or(0.0, |d| d.as_secs_f64());
            ConstGauge::new(secs).encode(me.encode_family(&label_of(route, slot))?)?;
        }
        let mut me = encoder.encode_descriptor(
            "token_refresh_failing",
            "1 while the last token fetch for the route's token failed",
            None,
            MetricType::Gauge,
        )?;
        for (route, slot) in routes.iter() {
            ConstGauge::new(i64::from(slot.is_failing()))
                .encode(me.encode_family(&label_of(route, slot))?)?;
        }
        Ok(())
    }
}
