//! Prometheus metrics, names prefixed `token_sidecar_`, base units, bounded labels (route names
//! from the config and fixed outcome words; never scopes, audiences, hosts or paths).
//!
//! Per-request metrics are resolved per route once at start-up ([`RouteMetrics`]), so the hot
//! path only increments atomics and observes a histogram. Values that describe state rather than
//! events (seconds until each route's token expires, whether a refresh is failing, cache
//! counters kept by the slots) are read at scrape time by a collector.

use std::sync::{Arc, OnceLock};
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

use crate::cache::Slot;

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

/// How a token fetch ended, as counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FetchOutcome {
    Ok,
    /// The server refused (RFC 6749 error that retrying cannot fix).
    Rejected,
    /// Unreachable, timed out, 5xx.
    Unavailable,
    /// A 200 whose body is not a usable token response.
    Invalid,
}

impl FetchOutcome {
    fn index(self) -> usize {
        self as usize
    }
    const ALL: [(FetchOutcome, &'static str); 4] = [
        (FetchOutcome::Ok, "ok"),
        (FetchOutcome::Rejected, "rejected"),
        (FetchOutcome::Unavailable, "unavailable"),
        (FetchOutcome::Invalid, "invalid"),
    ];
}

/// The token-side metrics the cache records into.
#[derive(Debug, Clone)]
pub struct TokenMetrics {
    fetches: [Counter; 4],
    fetch_duration: Histogram,
}

impl TokenMetrics {
    pub fn fetched(&self, outcome: FetchOutcome, took: Duration) {
        self.fetches[outcome.index()].inc();
        self.fetch_duration.observe(took.as_secs_f64());
    }

    /// Fetches counted so far with `outcome`.
    pub fn count(&self, outcome: FetchOutcome) -> u64 {
        self.fetches[outcome.index()].get()
    }
}

/// One route's per-request metrics, resolved once.
#[derive(Debug, Clone)]
pub struct RouteMetrics {
    /// 1xx … 5xx.
    by_class: [Counter; 5],
    duration: Histogram,
    upstream_errors: Counter,
}

impl RouteMetrics {
    pub fn request(&self, status: u16, took: Duration) {
        let class = usize::from((status / 100).clamp(1, 5)) - 1;
        self.by_class[class].inc();
        self.duration.observe(took.as_secs_f64());
    }

    pub fn upstream_error(&self) {
        self.upstream_errors.inc();
    }
}

/// The registry and the handles into it.
pub struct Metrics {
    registry: Registry,
    requests: Family<RouteClass, Counter>,
    request_duration: Family<RouteLabel, Histogram, fn() -> Histogram>,
    upstream_errors: Family<RouteLabel, Counter>,
    token: TokenMetrics,
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

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
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
        let fetches = Family::<OutcomeLabel, Counter>::default();
        registry.register(
            "token_fetches",
            "Token requests to the authorization server, by outcome (ok, rejected, unavailable, invalid)",
            fetches.clone(),
        );
        let fetch_duration = Histogram::new(exponential_buckets(0.005, 2.0, 12));
        registry.register_with_unit(
            "token_fetch_duration",
            "Duration of token fetches, retries included",
            Unit::Seconds,
            fetch_duration.clone(),
        );
        let token = TokenMetrics {
            fetches: FetchOutcome::ALL.map(|(_, name)| {
                fetches
                    .get_or_create(&OutcomeLabel {
                        outcome: name.to_string(),
                    })
                    .clone()
            }),
            fetch_duration,
        };
        let state = Arc::new(StateCollector::default());
        registry.register_collector(Box::new(state.clone()));
        Metrics {
            registry,
            requests,
            request_duration,
            upstream_errors,
            token,
            state,
        }
    }

    /// The per-request handles for `route`; call once per route at start-up.
    pub fn route(&self, route: &str) -> RouteMetrics {
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
        }
    }

    pub fn token(&self) -> TokenMetrics {
        self.token.clone()
    }

    /// Tells the scrape-time collector which routes use which slots.
    pub fn watch_routes(&self, routes: Vec<(String, Arc<Slot>)>) {
        let _ = self.state.routes.set(routes);
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

/// Reads state at scrape time: cache counters and per-route token expiry.
#[derive(Debug, Default)]
struct StateCollector {
    routes: OnceLock<Vec<(String, Arc<Slot>)>>,
}

impl Collector for StateCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(routes) = self.routes.get() else {
            return Ok(());
        };
        // Slots are shared by routes with equal sets; count each slot once.
        let mut slots: Vec<&Arc<Slot>> = Vec::new();
        for (_, s) in routes {
            if !slots.iter().any(|x| Arc::ptr_eq(x, s)) {
                slots.push(s);
            }
        }
        let sum = |f: fn(&Slot) -> u64| slots.iter().map(|s| f(s)).sum::<u64>();
        for (name, help, value) in [
            (
                "cache_hits",
                "Requests served from a usable cached token",
                sum(|s| s.stats.hits()),
            ),
            (
                "cache_misses",
                "Requests that had to wait for the token endpoint",
                sum(|s| s.stats.misses()),
            ),
            (
                "cache_refreshes",
                "Token fetches made while a token was cached (refresh ahead or after eviction)",
                sum(|s| s.stats.refreshes()),
            ),
        ] {
            let c = ConstCounter::new(value);
            let me = encoder.encode_descriptor(name, help, None, c.metric_type())?;
            c.encode(me)?;
        }

        let now = Instant::now();
        let mut me = encoder.encode_descriptor(
            "token_expiry",
            "Seconds until the route's cached token expires (0 when none is cached)",
            Some(&Unit::Seconds),
            MetricType::Gauge,
        )?;
        for (route, slot) in routes {
            let label = RouteLabel {
                route: route.clone(),
            };
            let secs = slot.expires_in(now).map_or(0.0, |d| d.as_secs_f64());
            ConstGauge::new(secs).encode(me.encode_family(&label)?)?;
        }
        let mut me = encoder.encode_descriptor(
            "token_refresh_failing",
            "1 while the last token fetch for the route's token failed",
            None,
            MetricType::Gauge,
        )?;
        for (route, slot) in routes {
            let label = RouteLabel {
                route: route.clone(),
            };
            ConstGauge::new(i64::from(slot.is_failing())).encode(me.encode_family(&label)?)?;
        }
        Ok(())
    }
}
