//! Property tests for the token layer's pure parts (docs/spec.md §2–§3; docs/reliability.md
//! §6, "bad input from every side"): the token endpoint's answer (random bytes, random JSON,
//! random statuses), backoff and the refresh schedule (arbitrary durations and fractions). None
//! of them may panic, and each keeps its invariants.
//!
//! Each bug these tests found has a regression test of its own below (sub-second `expires_in`,
//! non-object responses, NaN fractions, backoff overshoot).
//!
//! Case counts are modest so the module runs in a few seconds on a small shared machine;
//! failures are not persisted (no regression files are written into the tree). Strategies are
//! boxed: unboxed, their nested types overflow a debug-build test thread's stack.

use std::time::Duration;

use proptest::prelude::*;
use proptest::test_runner::Config as ProptestConfig;
use serde_json::{Map, Value as Json, json};

use super::backoff;
use super::cache::{Policy, schedule};
use super::response::{MAX_LIFETIME, parse_response};

fn cases(n: u32) -> ProptestConfig {
    ProptestConfig {
        cases: n,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

// ---------------------------------------------------------------------------------------------
// Token endpoint responses
// ---------------------------------------------------------------------------------------------

fn json_leaf() -> BoxedStrategy<Json> {
    prop_oneof![
        Just(Json::Null),
        any::<bool>().prop_map(Json::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<u64>().prop_map(|n| json!(n)),
        any::<f64>().prop_map(|f| json!(f)), // NaN and infinities become null
        any::<String>().prop_map(Json::String),
    ]
    .boxed()
}

fn json_any() -> BoxedStrategy<Json> {
    json_leaf()
        .prop_recursive(2, 8, 3, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..3).prop_map(Json::Array),
                prop::collection::btree_map("[a-z_]{0,6}", inner, 0..3)
                    .prop_map(|m| Json::Object(m.into_iter().collect())),
            ]
        })
        .boxed()
}

fn access_token_value(marker: String) -> BoxedStrategy<Json> {
    prop_oneof![
        6 => Just(Json::String(marker.clone())),
        1 => Just(Json::String(String::new())),
        1 => Just(Json::String(format!("{marker}\n"))),
        1 => Just(Json::String(format!("{marker}\u{0}"))),
        1 => Just(Json::String(format!("é{marker}"))),
        1 => jwt_with_exp(marker.clone()).prop_map(Json::String),
        1 => json_any(),
    ]
    .boxed()
}

/// A JWS-shaped token whose payload carries `exp` (any number) and the marker.
fn jwt_with_exp(marker: String) -> BoxedStrategy<String> {
    prop_oneof![
        any::<u64>().prop_map(|n| json!(n)),
        (0u64..3_000_000_000).prop_map(|n| json!(n)),
        any::<f64>().prop_map(|f| json!(f)),
        Just(json!(-1)),
        Just(json!("1700000000")),
    ]
    .prop_map(move |exp| {
        use base64::Engine;
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let payload = json!({"exp": exp, "sub": marker}).to_string();
        format!(
            "eyJhbGciOiJFUzI1NiJ9.{}.{marker}",
            b64.encode(payload.as_bytes())
        )
    })
    .boxed()
}

fn token_type_value() -> BoxedStrategy<Json> {
    prop_oneof![
        4 => prop::sample::select(vec![
            "Bearer", "bearer", "BEARER", "bEaReR", "Bearer ", " Bearer", "mac", "DPoP", "",
            "Bearer\u{0}", "beare", "bearerx", "N_A",
        ])
        .prop_map(|s| Json::String(s.to_string())),
        1 => json_any(),
    ]
    .boxed()
}

fn expires_in_value() -> BoxedStrategy<Json> {
    prop_oneof![
        3 => prop::sample::select(vec![
            json!(3600),
            json!(1),
            json!(0),
            json!(-1),
            json!(i64::MIN),
            json!(u64::MAX),
            json!(1e308),
            json!(-1e308),
            json!(0.5),
            json!(1e-3),
            json!(1e-9),
            json!(1e-10),
            json!(1e-300),
            json!(5e-324),
            json!(-0.0),
            json!("3600"),
            json!(" 120 "),
            json!("1e308"),
            json!("1e-12"),
            json!("NaN"),
            json!("inf"),
            json!("-inf"),
            json!("0x10"),
            json!(""),
            json!(null),
            json!({"secs": 10}),
            json!([60]),
            json!(true),
        ]),
        1 => any::<i64>().prop_map(|n| json!(n)),
        1 => any::<f64>().prop_map(|f| json!(f)),
        1 => any::<f64>().prop_map(|f| json!(f.to_string())),
        1 => json_any(),
    ]
    .boxed()
}

/// A token response object: the four RFC fields each present or not, plus random extras.
fn token_object(marker: String) -> BoxedStrategy<Json> {
    (
        prop::option::weighted(0.9, access_token_value(marker)),
        prop::option::weighted(0.9, token_type_value()),
        prop::option::weighted(0.8, expires_in_value()),
        prop::option::weighted(0.3, json_any()),
        prop::option::weighted(0.2, json_any()),
        prop::collection::btree_map("[a-z_]{1,8}", json_leaf(), 0..3),
    )
        .prop_map(|(at, tt, ei, scope, error, extra)| {
            let mut m: Map<String, Json> = extra.into_iter().collect();
            for (k, v) in [
                ("access_token", at),
                ("token_type", tt),
                ("expires_in", ei),
                ("scope", scope),
                ("error", error),
            ] {
                if let Some(v) = v {
                    m.insert(k.to_string(), v);
                }
            }
            Json::Object(m)
        })
        .boxed()
}

/// Mostly usable responses, so the `Ok` invariants see plenty of cases.
fn plausible_token_object(marker: String) -> BoxedStrategy<Json> {
    (
        prop_oneof![
            4 => Just(marker.clone()),
            1 => jwt_with_exp(marker),
        ],
        prop::sample::select(vec!["Bearer", "bearer", "BEARER", "bEaReR"]),
        prop::option::weighted(
            0.8,
            prop_oneof![
                (1u64..10_000_000).prop_map(|n| json!(n)),
                (1e-3f64..1e12).prop_map(|f| json!(f)),
                any::<u64>().prop_map(|n| json!(n.to_string())),
                expires_in_value(),
            ],
        ),
        prop::option::of(prop_oneof![
            Just(Json::Null),
            "[ -~]{0,20}".prop_map(Json::String)
        ]),
    )
        .prop_map(|(at, tt, ei, scope)| {
            let mut m = Map::new();
            m.insert("access_token".into(), Json::String(at));
            m.insert("token_type".into(), Json::String(tt.to_string()));
            if let Some(ei) = ei {
                m.insert("expires_in".into(), ei);
            }
            if let Some(scope) = scope {
                m.insert("scope".into(), scope);
            }
            Json::Object(m)
        })
        .boxed()
}

#[derive(Debug, Clone)]
enum Body {
    Bytes(Vec<u8>),
    Object(Json),
    /// The object's bytes, cut short or with one byte replaced (often invalid UTF-8).
    Damaged(Json, usize, Option<u8>),
}

impl Body {
    fn bytes(&self) -> Vec<u8> {
        match self {
            Body::Bytes(b) => b.clone(),
            Body::Object(j) => j.to_string().into_bytes(),
            Body::Damaged(j, at, byte) => {
                let mut b = j.to_string().into_bytes();
                let at = at % (b.len() + 1);
                match byte {
                    None => b.truncate(at),
                    Some(x) if at < b.len() => b[at] = *x,
                    Some(x) => b.push(*x),
                }
                b
            }
        }
    }
}

fn body(marker: String) -> BoxedStrategy<Body> {
    prop_oneof![
        1 => prop::collection::vec(any::<u8>(), 0..200).prop_map(Body::Bytes),
        4 => token_object(marker.clone()).prop_map(Body::Object),
        3 => plausible_token_object(marker.clone()).prop_map(Body::Object),
        1 => (token_object(marker), any::<usize>(), prop::option::of(any::<u8>()))
            .prop_map(|(j, at, b)| Body::Damaged(j, at, b)),
    ]
    .boxed()
}

fn status() -> impl Strategy<Value = u16> {
    prop_oneof![3 => Just(200u16), 1 => 100u16..=599]
}

fn content_type() -> impl Strategy<Value = Option<String>> {
    prop::option::weighted(
        0.9,
        prop_oneof![
            prop::sample::select(vec![
                "application/json",
                "application/json;charset=UTF-8",
                "text/plain",
                "text/html",
                "",
            ])
            .prop_map(str::to_string),
            any::<String>(),
        ],
    )
}

fn default_ttl() -> impl Strategy<Value = Duration> {
    // Validation refuses a zero `default_token_ttl`; anything else, up to absurd, is allowed.
    prop_oneof![
        (1u64..=u64::MAX).prop_map(Duration::from_nanos),
        (1u64..=u64::MAX).prop_map(Duration::from_secs),
        Just(Duration::from_secs(300)),
    ]
}

proptest! {
    #![proptest_config(cases(512))]

    /// Any answer: no panic; an `Ok` has a lifetime in (0, MAX_LIFETIME], a `Bearer ` header for
    /// the access_token string of a 200 JSON object whose token_type is Bearer (any case); an
    /// error (Display and Debug) never shows the access token.
    #[test]
    fn token_response_parser_holds_its_invariants(
        (marker, body) in "[A-Za-z0-9]{24,40}".prop_flat_map(|m| (Just(m.clone()), body(m))),
        (status, ct, now, ttl) in (status(), content_type(), any::<u64>(), default_ttl()),
    ) {
        let bytes = body.bytes();
        match parse_response(status, ct.as_deref(), &bytes, now, ttl) {
            Ok(tok) => {
                prop_assert_eq!(status, 200);
                prop_assert!(
                    tok.lifetime >= Duration::from_secs(1),
                    "zero lifetime from {:?}",
                    body
                );
                prop_assert!(tok.lifetime <= MAX_LIFETIME, "lifetime {:?}", tok.lifetime);
                let header = String::from_utf8_lossy(tok.authorization().as_bytes()).into_owned();
                prop_assert!(header.starts_with("Bearer "), "{}", header);
                // serde_json skips ignored fields without checking their UTF-8, so a body with
                // invalid bytes in an unknown member is accepted; read it lossily to compare.
                let parsed: Json = serde_json::from_str(&String::from_utf8_lossy(&bytes))
                    .map_err(|e| TestCaseError::fail(format!("accepted a non-JSON body: {e}")))?;
                prop_assert!(parsed.is_object(), "accepted a non-object: {}", parsed);
                let tt = parsed["token_type"].as_str().unwrap_or_default();
                prop_assert!(tt.eq_ignore_ascii_case("bearer"), "accepted token_type {:?}", tt);
                let at = parsed["access_token"].as_str().unwrap_or_default();
                prop_assert!(!at.is_empty());
                let expected = format!("Bearer {at}");
                prop_assert_eq!(tok.authorization().as_bytes(), expected.as_bytes());
                prop_assert!(!format!("{tok:?}").contains(&marker), "Debug shows the token");
            }
            Err(e) => {
                prop_assert!(!e.to_string().contains(&marker), "Display leaks the token: {}", e);
                prop_assert!(!format!("{e:?}").contains(&marker), "Debug leaks the token: {:?}", e);
            }
        }
    }

    /// Random bytes (mostly not UTF-8) with any status and content type: no panic, no token.
    #[test]
    fn token_response_parser_survives_random_bytes(
        status in 100u16..=599,
        ct in prop::option::of(any::<String>()),
        body in prop::collection::vec(any::<u8>(), 0..512),
        now in any::<u64>(),
        ttl in default_ttl(),
    ) {
        // Random bytes are practically never a token response; this is the no-panic check.
        let _ = parse_response(status, ct.as_deref(), &body, now, ttl);
    }

    /// A 200 whose token_type is anything but Bearer (case-insensitively) is never a token.
    #[test]
    fn non_bearer_token_type_is_never_accepted(
        marker in "[A-Za-z0-9]{24,40}",
        tt in prop_oneof![
            "[A-Za-z ]{0,10}"
                .prop_filter("not bearer", |s| !s.eq_ignore_ascii_case("bearer"))
                .prop_map(Json::String),
            json_any().prop_filter("not bearer", |j| {
                !j.as_str().is_some_and(|s| s.eq_ignore_ascii_case("bearer"))
            }),
            Just(json!("__absent__")),
        ],
        ei in expires_in_value(),
    ) {
        let mut obj = json!({"access_token": marker, "expires_in": ei});
        if tt != json!("__absent__") {
            obj["token_type"] = tt;
        }
        let body = obj.to_string();
        let r = parse_response(200, Some("application/json"), body.as_bytes(), 1_000, Duration::from_secs(300));
        prop_assert!(r.is_err(), "accepted {}", body);
        let e = r.err().unwrap();
        prop_assert!(!e.to_string().contains(&marker), "{}", e);
    }

}

proptest! {
    #![proptest_config(cases(64))]

    /// A positive `expires_in`, however tiny, must not become a zero lifetime (a token that is
    /// never usable would make the refresher fetch in a loop).
    #[test]
    fn tiny_positive_expires_in_never_gives_a_zero_lifetime(
        secs in prop_oneof![
            (f64::MIN_POSITIVE..1e-6),
            Just(1e-10),
            Just(5e-324),
            Just(4.9e-10),
        ],
        as_string in any::<bool>(),
    ) {
        let ei = if as_string { json!(format!("{secs:e}")) } else { json!(secs) };
        let body = json!({"access_token": "abc", "token_type": "Bearer", "expires_in": ei}).to_string();
        // Under a second a token cannot be cached usefully: refused, never a zero lifetime.
        prop_assert!(parse_response(200, None, body.as_bytes(), 0, Duration::from_secs(300)).is_err(), "{} accepted", body);
    }
}

/// RFC 6749 §5.1: the success response is a JSON *object*. serde's derived `Deserialize`
/// for a struct also accepts a JSON array with the fields in declaration order.
#[test]
fn token_response_must_be_a_json_object() {
    let body = br#"["SECRET-ARRAY-TOKEN-0123456789", "Bearer", 3600, null]"#;
    let r = parse_response(
        200,
        Some("application/json"),
        body,
        0,
        Duration::from_secs(300),
    );
    assert!(r.is_err(), "a JSON array was accepted as a token response");
}

// ---------------------------------------------------------------------------------------------
// Backoff and the refresh schedule
// ---------------------------------------------------------------------------------------------

fn duration() -> impl Strategy<Value = Duration> {
    prop_oneof![
        Just(Duration::ZERO),
        Just(Duration::MAX),
        (0u64..=u64::MAX).prop_map(Duration::from_nanos),
        (0u64..=u64::MAX, 0u32..1_000_000_000).prop_map(|(s, n)| Duration::new(s, n)),
        (0u64..100_000).prop_map(Duration::from_millis),
    ]
}

fn fraction() -> impl Strategy<Value = f64> {
    prop_oneof![
        4 => 0.0f64..=1.0,
        1 => any::<f64>(),
        1 => prop::sample::select(vec![
            0.0f64, 1.0, -0.0, 1.0 - f64::EPSILON, f64::MIN_POSITIVE, -1.0, 2.0,
            f64::NAN, f64::INFINITY, f64::NEG_INFINITY,
        ]),
    ]
}

proptest! {
    #![proptest_config(cases(1024))]

    /// Any durations (up to Duration::MAX), failure counts, Retry-After values and random
    /// inputs (NaN, ±∞, negative, > 1): no panic.
    #[test]
    fn pause_never_panics(
        initial in duration(),
        max in duration(),
        failures in prop_oneof![0u32..40, any::<u32>()],
        retry_after in prop::option::of(duration()),
        random in fraction(),
    ) {
        let _ = backoff::pause(initial, max, failures, retry_after, random);
    }

    /// Without Retry-After a pause never exceeds `max`, for any durations at all (so a key
    /// recovers at most `max` after the server comes back).
    #[test]
    fn pause_never_exceeds_max_without_retry_after(
        initial in duration(),
        max in duration(),
        failures in prop_oneof![0u32..40, any::<u32>()],
        random in fraction(),
    ) {
        let d = backoff::pause(initial, max, failures, None, random);
        prop_assert!(d <= max, "pause {:?} > max {:?}", d, max);
    }

    /// Retry-After is honoured up to 5 minutes, and adds at most `max` of the schedule's own.
    #[test]
    fn pause_honours_retry_after_up_to_five_minutes(
        initial in duration(),
        max in duration(),
        failures in prop_oneof![0u32..40, any::<u32>()],
        asked in duration(),
        random in fraction(),
    ) {
        let d = backoff::pause(initial, max, failures, Some(asked), random);
        let honoured = asked.min(backoff::RETRY_AFTER_CAP);
        prop_assert!(d >= honoured, "pause {:?} < asked {:?}", d, honoured);
        prop_assert!(d <= honoured.saturating_add(max), "pause {:?} > asked + max", d);
    }

    /// Once the pause before was already capped, every pause is exactly `max`: the long-run
    /// rate per key is one request per `max`, whatever the random fraction.
    #[test]
    fn pause_is_exactly_max_after_the_first_capped_one(
        initial in prop_oneof![(1u64..100_000).prop_map(Duration::from_millis), duration()],
        max in prop_oneof![(1u64..100_000).prop_map(Duration::from_millis), duration()],
        failures in 2u32..64,
        random in fraction(),
    ) {
        let previous_base = initial.saturating_mul(1u32 << (failures - 2).min(30));
        prop_assume!(previous_base >= max);
        prop_assert_eq!(backoff::pause(initial, max, failures, None, random), max);
    }

    /// Jitter is monotonic in the random fraction for a fixed attempt.
    #[test]
    fn pause_grows_with_the_random_fraction(
        initial in duration(),
        max in duration(),
        failures in 0u32..40,
        a in 0.0f64..=1.0,
        b in 0.0f64..=1.0,
    ) {
        let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
        prop_assert!(backoff::pause(initial, max, failures, None, lo) <= backoff::pause(initial, max, failures, None, hi));
    }

    /// The retry state machine under any sequence of outcomes: the next attempt is never in the
    /// past, a reported round stays reported until a success, and no round waits longer than
    /// `request_timeout` or more than `max_attempts` failures.
    #[test]
    fn retry_state_keeps_its_invariants(
        steps in prop::collection::vec((any::<bool>(), any::<bool>(), prop::option::of(0u64..600), 0.0f64..=1.0, 0u64..20_000), 1..60),
        max_attempts in 1u32..6,
    ) {
        let p = backoff::RetryPolicy {
            initial: Duration::from_millis(200),
            max: Duration::from_secs(5),
            max_attempts,
            request_timeout: Duration::from_secs(10),
        };
        let t0 = tokio::time::Instant::now();
        let mut now = t0;
        let mut s = backoff::RetryState::default();
        let mut reported = false;
        let mut round: Option<(tokio::time::Instant, u32)> = None;
        for (success, retryable, retry_after, random, took_ms) in steps {
            let started = s.next_attempt(now);
            prop_assert!(s.attempt_deadline(&p, started) > started);
            now = started + Duration::from_millis(took_ms).min(s.attempt_deadline(&p, started) - started);
            if success {
                s.on_success();
                reported = false;
                round = None;
                continue;
            }
            let f = s.on_failure(&p, started, now, retryable, retry_after.map(Duration::from_secs), random);
            prop_assert!(f.retry_at >= now);
            let r = round.get_or_insert((started, 0));
            r.1 += 1;
            if reported {
                prop_assert!(f.report, "a reported round stays reported");
            }
            if r.1 >= max_attempts || !retryable || retry_after.is_some() || f.retry_at >= r.0 + p.request_timeout {
                prop_assert!(f.report);
            }
            reported = f.report;
        }
    }

    /// For any lifetime the parser can produce (1 ms .. MAX_LIFETIME) and any policy the config
    /// allows (refresh_at in (0, 1), any durations): no panic, and
    /// lifetime/4 ≤ refresh_due ≤ usable_for ≤ lifetime, usable_for ≥ lifetime/2,
    /// lifetime − usable_for = min(expiry_skew, lifetime/2) (so < lifetime exactly when the skew
    /// is non-zero), and refresh_due is no later than the fraction or the margin asks unless the
    /// quarter-lifetime floor applies.
    #[test]
    fn refresh_schedule_holds_its_invariants(
        lifetime in prop_oneof![
            (1_000_000u64..=MAX_LIFETIME.as_nanos() as u64).prop_map(Duration::from_nanos),
            (1u64..=MAX_LIFETIME.as_secs()).prop_map(Duration::from_secs),
            Just(Duration::from_millis(1)),
            Just(MAX_LIFETIME),
        ],
        refresh_at in prop_oneof![
            4 => (0.0f64..1.0).prop_filter("exclusive", |f| *f > 0.0),
            1 => prop::sample::select(vec![f64::MIN_POSITIVE, 1e-300, 0.25, 0.5, 1.0 - f64::EPSILON]),
        ],
        refresh_before_expiry in duration(),
        expiry_skew in duration(),
    ) {
        let policy = Policy::with_schedule(refresh_at, refresh_before_expiry, expiry_skew);
        let s = schedule(lifetime, &policy);
        prop_assert!(s.usable_for <= lifetime);
        prop_assert!(s.refresh_due <= s.usable_for, "{:?}", s);
        prop_assert!(s.refresh_due >= lifetime / 4, "{:?} for {:?}", s, lifetime);
        prop_assert!(s.usable_for >= lifetime / 2, "{:?} for {:?}", s, lifetime);
        prop_assert!(s.refresh_due > Duration::ZERO);
        prop_assert_eq!(lifetime - s.usable_for, expiry_skew.min(lifetime / 2));
        prop_assert_eq!(s.usable_for < lifetime, !expiry_skew.is_zero());
        let by_fraction = lifetime.mul_f64(refresh_at);
        let by_margin = lifetime.saturating_sub(refresh_before_expiry);
        prop_assert!(s.refresh_due <= by_fraction.max(lifetime / 4), "{:?} vs fraction {:?}", s, by_fraction);
        prop_assert!(s.refresh_due <= by_margin.max(lifetime / 4), "{:?} vs margin {:?}", s, by_margin);
    }

    /// Out-of-range fractions (the config refuses them, but `Policy` is a plain struct) are
    /// clamped rather than panicking.
    #[test]
    fn refresh_schedule_survives_any_fraction(
        lifetime in (1_000_000u64..=MAX_LIFETIME.as_nanos() as u64).prop_map(Duration::from_nanos),
        refresh_at in any::<f64>().prop_filter("NaN is checked separately", |f| !f.is_nan()),
        refresh_before_expiry in duration(),
        expiry_skew in duration(),
    ) {
        let policy = Policy::with_schedule(refresh_at, refresh_before_expiry, expiry_skew);
        let s = schedule(lifetime, &policy);
        prop_assert!(s.refresh_due <= s.usable_for && s.usable_for <= lifetime);
    }
}

/// `schedule` clamps `refresh_at` to [0, 1] but `f64::clamp` passes NaN through, and
/// `Duration::mul_f64(NaN)` panics. The config refuses NaN (`refresh_at = nan` is valid TOML),
/// so this is reachable only through a hand-built `Policy`.
#[test]
fn refresh_schedule_survives_a_nan_fraction() {
    let policy = Policy::with_schedule(f64::NAN, Duration::from_secs(60), Duration::from_secs(10));
    let lifetime = Duration::from_secs(3600);
    let s = schedule(lifetime, &policy);
    assert!(s.refresh_due >= lifetime / 4 && s.refresh_due <= s.usable_for);
}
