//! Upper bounds for every duration and size in the configuration (docs/spec.md §4).
//!
//! Why: the program adds configured durations to `Instant`s and to each other (`Instant +
//! Duration` panics on overflow, in whatever task does it, possibly a background refresher
//! hours later), hands counts to `Semaphore::new` (which panics above `usize::MAX >> 3`) and
//! sizes to hyper and to buffers. A typo such as `"10000000000s"` must therefore be a
//! configuration problem (exit 2, the key named), never a panic or an allocation at run time.
//!
//! Invariant: every duration and every integer key of the schema has a bound here (a test below
//! walks the schema, so a key added later without one fails it). The bounds sit far above any
//! sensible setting and far below overflow: the largest duration, one day, can be added to any
//! `Instant` and to the others many times over.

use std::time::Duration;

use super::{Config, Problem};

const MINUTE: Duration = Duration::from_secs(60);
const HOUR: Duration = Duration::from_secs(3600);
const DAY: Duration = Duration::from_secs(24 * 3600);
const MIB: u64 = 1024 * 1024;

/// Every duration key with its value and its bound.
fn durations(c: &Config) -> Vec<(String, Duration, Duration)> {
    let (px, ad, t) = (&c.proxy, &c.admin, &c.token);
    let mut v: Vec<(String, Duration, Duration)> = [
        // Timeouts: nothing a sidecar waits for should take an hour.
        ("proxy.header_read_timeout", px.header_read_timeout, HOUR),
        ("proxy.idle_timeout", px.idle_timeout, HOUR),
        ("proxy.shutdown_grace", px.shutdown_grace, HOUR),
        ("proxy.body_read_timeout", px.body_read_timeout, HOUR),
        // Probes time out in seconds; an admin client slower than a minute is not a probe.
        ("admin.header_read_timeout", ad.header_read_timeout, MINUTE),
        ("token.request_timeout", t.request_timeout, HOUR),
        // The assertion: Hydra and the dev server refuse `exp - iat` beyond an hour anyway.
        ("token.assertion_lifetime", t.assertion_lifetime, HOUR),
        ("token.clock_skew_tolerance", t.clock_skew_tolerance, HOUR),
        // Backoff: pauses and their caps.
        ("token.retry_backoff_initial", t.retry_backoff_initial, HOUR),
        ("token.retry_backoff_max", t.retry_backoff_max, HOUR),
        // The eviction gate doubles up to this cap; a floor above it would be meaningless.
        (
            "token.min_refetch_interval",
            t.min_refetch_interval,
            crate::token::gate::MAX_REFETCH_INTERVAL,
        ),
        // Token lifetimes and the margins taken from them.
        ("token.default_token_ttl", t.default_token_ttl, DAY),
        ("token.refresh_before_expiry", t.refresh_before_expiry, DAY),
        ("token.expiry_skew", t.expiry_skew, DAY),
        // Discovery: an issuer's metadata unchecked for over a day is stale.
        (
            "token.discovery_refresh_interval",
            t.discovery_refresh_interval,
            DAY,
        ),
        // Run-time token cache: an idle key kept for over a day is a leak, not a cache.
        ("token.cache_idle_timeout", t.cache_idle_timeout, DAY),
    ]
    .into_iter()
    .map(|(k, d, max)| (k.to_owned(), d, max))
    .collect();
    // A whole token request body is 8 KiB at most: a minute is generous.
    v.push((
        "token_endpoint.body_read_timeout".to_owned(),
        c.token_endpoint.body_read_timeout,
        MINUTE,
    ));
    for (i, r) in c.route.iter().enumerate() {
        v.push((
            format!("route[{i}].connect_timeout"),
            r.connect_timeout,
            HOUR,
        ));
        v.push((format!("route[{i}].timeout"), r.timeout, HOUR));
    }
    v
}

/// Every integer key with its value and its bound.
fn sizes(c: &Config) -> Vec<(&'static str, u64, u64)> {
    let (px, ad, t) = (&c.proxy, &c.admin, &c.token);
    let n = |v: usize| u64::try_from(v).unwrap_or(u64::MAX);
    vec![
        ("proxy.max_connections", n(px.max_connections), 1_000_000),
        ("proxy.max_header_bytes", n(px.max_header_bytes), MIB),
        ("proxy.max_headers", n(px.max_headers), 10_000),
        ("proxy.worker_threads", n(px.worker_threads), 1024),
        // Kept in memory per request for the 401 replay.
        ("proxy.retry_body_limit", n(px.retry_body_limit), 16 * MIB),
        (
            "proxy.max_concurrent_streams",
            u64::from(px.max_concurrent_streams),
            // Each open stream may hold a request head: the memory arithmetic of spec §6.
            1000,
        ),
        ("admin.max_connections", n(ad.max_connections), 1_000_000),
        (
            "admin.max_connections_per_peer",
            n(ad.max_connections_per_peer),
            1_000_000,
        ),
        ("token.max_attempts", u64::from(t.max_attempts), 100),
        (
            "token_endpoint.max_connections",
            n(c.token_endpoint.max_connections),
            10_000,
        ),
        // A token response is a few KiB.
        (
            "token.max_response_bytes",
            n(t.max_response_bytes),
            16 * MIB,
        ),
        // Run-time token cache: each key holds a slot and a refresher task (a few KiB);
        // a million of them is already gigabytes.
        ("token.cache_capacity", t.cache_capacity, 1_000_000),
    ]
}

/// One problem per value above its bound.
pub(super) fn problems(c: &Config) -> Vec<Problem> {
    let mut out = Vec::new();
    for (key, value, max) in durations(c) {
        if value > max {
            out.push(Problem {
                key,
                message: format!(
                    "must be at most {}, not {}",
                    humantime::format_duration(max),
                    humantime::format_duration(value)
                ),
            });
        }
    }
    for (key, value, max) in sizes(c) {
        if value > max {
            out.push(Problem {
                key: key.to_owned(),
                message: format!("must be at most {max}, not {value}"),
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::super::{MINIMAL, from_toml_str, load};
    use super::*;

    /// Every `section.key` of the effective config (defaults filled in), route keys as
    /// `route[0].key`, with its value.
    fn effective_keys(c: &Config) -> Vec<(String, toml::Value)> {
        let toml::Value::Table(t) = toml::Value::try_from(c).unwrap() else {
            panic!("a config serializes to a table")
        };
        let mut out = Vec::new();
        for (section, v) in t {
            let (prefix, table) = match v {
                toml::Value::Table(t) => (section, t),
                toml::Value::Array(a) => {
                    (format!("{section}[0]"), a[0].as_table().unwrap().clone())
                }
                _ => continue,
            };
            out.extend(table.into_iter().map(|(k, v)| (format!("{prefix}.{k}"), v)));
        }
        out
    }

    #[test]
    fn every_duration_and_integer_key_has_a_bound() {
        let c = from_toml_str(MINIMAL).unwrap();
        let bounded: Vec<String> = durations(&c)
            .into_iter()
            .map(|(k, ..)| k)
            .chain(sizes(&c).into_iter().map(|(k, ..)| k.to_owned()))
            .collect();
        let mut unbounded = Vec::new();
        for (key, value) in effective_keys(&c) {
            let is_duration = value
                .as_str()
                .is_some_and(|s| humantime::parse_duration(s).is_ok());
            if (is_duration || value.is_integer()) && !bounded.contains(&key) {
                unbounded.push(key);
            }
        }
        assert!(unbounded.is_empty(), "no upper bound for {unbounded:?}");
    }

    #[test]
    fn every_bound_is_enforced_and_names_its_key() {
        let base: toml::Table = toml::from_str(MINIMAL).unwrap();
        let c = from_toml_str(MINIMAL).unwrap();
        let mut cases: Vec<(String, toml::Value)> = durations(&c)
            .into_iter()
            .flat_map(|(k, _, max)| {
                let over = humantime::format_duration(max + Duration::from_secs(1)).to_string();
                [
                    (k.clone(), toml::Value::String(over)),
                    (k, toml::Value::String("18446744073709551615s".into())),
                ]
            })
            .collect();
        cases.extend(sizes(&c).into_iter().map(|(k, _, max)| {
            let over = i64::try_from(max + 1).unwrap();
            (k.to_owned(), toml::Value::Integer(over))
        }));
        for (key, value) in cases {
            let mut table = base.clone();
            let (section, field) = key.split_once('.').unwrap();
            let target = match section {
                "route[0]" => table["route"].as_array_mut().unwrap()[0]
                    .as_table_mut()
                    .unwrap(),
                s => table
                    .entry(s)
                    .or_insert_with(|| toml::Value::Table(Default::default()))
                    .as_table_mut()
                    .unwrap(),
            };
            target.insert(field.to_owned(), value.clone());
            let text = toml::to_string(&table).unwrap();
            let config = load::parse_unvalidated(&text).unwrap();
            let found = problems(&config);
            assert!(
                found
                    .iter()
                    .any(|p| p.key == key && p.message.contains("at most")),
                "{key} = {value}: {found:?}"
            );
            let err = from_toml_str(&text).unwrap_err();
            assert!(err.problems.iter().any(|p| p.key == key), "{key}: {err}");
        }
    }

    #[test]
    fn the_defaults_are_within_bounds() {
        let c = from_toml_str(MINIMAL).unwrap();
        assert!(problems(&c).is_empty(), "{:?}", problems(&c));
    }
}
