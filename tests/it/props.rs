//! Issue 5 §6, "bad input from every side": property tests for the pure parts that see
//! untrusted or operator-written input. None of them may panic, and each keeps its invariants:
//!
//! - configuration text (arbitrary, and a valid file with random values in random keys),
//! - the token endpoint's answer (random bytes, random JSON, random statuses),
//! - route matching, path checking and upstream URI rewriting (arbitrary hosts and paths),
//! - backoff and the refresh schedule (arbitrary durations and fractions).
//!
//! Each bug these tests found has a regression test of its own below (config errors one line per
//! problem, empty keys, sub-second `expires_in`, non-object responses, NaN fractions, backoff
//! overshoot).
//!
//! Case counts are modest so the file runs in a few seconds on a small shared machine;
//! failures are not persisted (no regression files are written into the tree). Strategies are
//! boxed: unboxed, their nested types overflow a debug-build test thread's stack.

use std::time::Duration;

use proptest::prelude::*;
use proptest::test_runner::Config as ProptestConfig;
use serde_json::{Map, Value as Json, json};

use token_sidecar::backoff;
use token_sidecar::cache::{Policy, schedule};
use token_sidecar::config::{Config, ConfigError, from_toml_str};
use token_sidecar::metrics::Metrics;
use token_sidecar::routes::{Route, RouteTable, check_path, normalize_host, strip_segment_prefix};
use token_sidecar::token::{MAX_LIFETIME, parse_response};

fn cases(n: u32) -> ProptestConfig {
    ProptestConfig {
        cases: n,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

// ---------------------------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------------------------

/// A valid configuration that touches no files (client_secret_post, no key, no CA files).
const BASE_CONFIG: &str = r#"
[proxy]
listen = "127.0.0.1:0"
max_header_bytes = 16384
max_headers = 50

[admin]
listen = "127.0.0.1:0"

[token]
token_url = "https://idp.example.com/oauth2/token"
client_id = "orders-service"
auth_method = "client_secret_post"
client_secret = "hunter2"
refresh_at = 0.75
expiry_skew = "5s"
extra_params = { tenant = "acme" }

[[route]]
name = "orders"
path_prefix = "/orders/"
strip_prefix = true
upstream = "https://orders.example.com/api/"
scope = ["orders:read"]
audience = ["https://orders.example.com"]
timeout = "30s"

[[route]]
name = "billing"
host = "billing.example.com"
upstream = "https://billing.example.com"

[log]
format = "json"
"#;

/// `(section, key)` pairs a mutation may hit: every key of the effective base configuration
/// (so fields added later are covered automatically), the optional ones serialization leaves
/// out, some unknown ones, and whole sections. Route keys address `route[0]`; section "" is the
/// top level.
fn mutation_keys() -> Vec<(String, String)> {
    let base = from_toml_str(BASE_CONFIG).expect("the base config is valid");
    let effective: toml::Table =
        toml::from_str(&base.to_redacted_toml()).expect("redacted config is TOML");
    let mut keys = Vec::new();
    for (section, value) in &effective {
        keys.push((String::new(), section.clone()));
        match value {
            toml::Value::Table(t) => {
                keys.extend(t.keys().map(|k| (section.clone(), k.clone())));
            }
            toml::Value::Array(a) => {
                if let Some(toml::Value::Table(t)) = a.first() {
                    keys.extend(t.keys().map(|k| (section.clone(), k.clone())));
                }
            }
            _ => {}
        }
    }
    for (section, key) in [
        ("token", "private_key_file"),
        ("token", "key_id"),
        ("token", "signing_alg"),
        ("token", "assertion_audience"),
        ("token", "client_secret_file"),
        ("route", "listen"),
        ("route", "host"),
        ("route", "path_prefix"),
        ("proxy", "no_such_key"),
        ("token", "Client_ID"),
        ("route", "upstreams"),
        ("", "routes"),
        ("", ""),
        ("proxy", ""),
        ("token", "é\n"),
    ] {
        keys.push((section.to_string(), key.to_string()));
    }
    keys.sort();
    keys.dedup();
    keys
}

fn string_value() -> BoxedStrategy<String> {
    prop_oneof![
        prop::sample::select(vec![
            // durations, good and bad
            "0s",
            "1ns",
            "250ms",
            "10s",
            "5m",
            "1h 30m",
            "-5s",
            "18446744073709551615s",
            "99999999999999999999999s",
            "1000000000y",
            "1e3s",
            "0.5s",
            "ten seconds",
            "10",
            "∞",
            // addresses and URLs
            "127.0.0.1:0",
            "127.0.0.1:8080",
            "[::1]:0",
            "0.0.0.0:99999",
            "localhost:80",
            "https://idp.example.com/t",
            "http://idp.example.com/t",
            "ftp://idp.example.com/t",
            "https://",
            "https://u:p@h.example.com/x?q=1#f",
            "/orders/",
            "orders",
            // enums
            "private_key_jwt",
            "client_secret_basic",
            "client_secret_post",
            "audience",
            "resource",
            "text",
            "json",
            "ES256",
            "none",
            // awkward text
            "",
            " ",
            "\n",
            "a\nb",
            "\r",
            "\u{0}",
            "\u{7f}",
            "\u{202e}evil",
            "ünïcödé",
            "🦀",
            "[redacted]",
        ])
        .prop_map(str::to_string),
        any::<String>(),
        "[ -~]{0,24}",
    ]
    .boxed()
}

fn toml_value() -> BoxedStrategy<toml::Value> {
    let leaf = prop_oneof![
        3 => string_value().prop_map(toml::Value::String),
        1 => any::<i64>().prop_map(toml::Value::Integer),
        1 => prop::sample::select(vec![
            0i64,
            -1,
            1,
            3,
            1023,
            1024,
            8191,
            8192,
            65536,
            u32::MAX as i64,
            u32::MAX as i64 + 1,
            i64::MAX,
            i64::MIN,
        ])
        .prop_map(toml::Value::Integer),
        1 => any::<f64>().prop_map(toml::Value::Float),
        1 => prop::sample::select(vec![
            0.0f64,
            -0.0,
            0.5,
            1.0,
            1.5,
            -1.0,
            1e-300,
            1e308,
            f64::NAN,
            f64::INFINITY,
            f64::NEG_INFINITY,
        ])
        .prop_map(toml::Value::Float),
        1 => any::<bool>().prop_map(toml::Value::Boolean),
    ];
    leaf.prop_recursive(2, 8, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(toml::Value::Array),
            prop::collection::btree_map("[a-z_]{0,8}", inner, 0..4)
                .prop_map(|m| toml::Value::Table(m.into_iter().collect())),
        ]
    })
    .boxed()
}

/// Sets (or, with `None`, removes) one key of the base table.
fn mutate(table: &mut toml::Table, section: &str, key: &str, value: Option<toml::Value>) {
    let target: &mut toml::Table = if section.is_empty() {
        table
    } else {
        match table.get_mut(section) {
            Some(toml::Value::Table(t)) => t,
            Some(toml::Value::Array(a)) => match a.first_mut() {
                Some(toml::Value::Table(t)) => t,
                _ => return,
            },
            _ => return,
        }
    };
    match value {
        Some(v) => {
            target.insert(key.to_string(), v);
        }
        None => {
            target.remove(key);
        }
    }
}

/// Either a config or an error that names a key for every problem.
///
fn check_no_keyless_problem(result: &Result<Config, ConfigError>) -> Result<(), TestCaseError> {
    if let Err(e) = result {
        prop_assert!(!e.problems.is_empty(), "an error with no problems");
        for p in &e.problems {
            prop_assert!(!p.key.trim().is_empty(), "problem without a key: {:?}", p);
            prop_assert!(
                !p.message.trim().is_empty(),
                "problem without a message: {:?}",
                p
            );
        }
    }
    Ok(())
}

/// README: "Invalid configuration exits with status 2 and one line per problem".
///
fn check_one_line_per_problem(result: &Result<Config, ConfigError>) -> Result<(), TestCaseError> {
    if let Err(e) = result {
        let text = e.to_string();
        prop_assert_eq!(
            text.lines().count(),
            e.problems.len(),
            "Display is not one line per problem:\n{}\n{:#?}",
            text,
            e.problems
        );
    }
    Ok(())
}

/// Replaces line breaks in every string and key, for the one-line-per-problem property.
fn without_newlines(v: toml::Value) -> toml::Value {
    fn scrub(s: &str) -> String {
        s.replace(['\n', '\r'], " ")
    }
    match v {
        toml::Value::String(s) => toml::Value::String(scrub(&s)),
        toml::Value::Array(a) => toml::Value::Array(a.into_iter().map(without_newlines).collect()),
        toml::Value::Table(t) => toml::Value::Table(
            t.into_iter()
                .map(|(k, v)| (scrub(&k), without_newlines(v)))
                .collect(),
        ),
        other => other,
    }
}

fn toml_like_text() -> BoxedStrategy<String> {
    prop_oneof![
        any::<String>(),
        prop::collection::vec(any::<u8>(), 0..200)
            .prop_map(|b| String::from_utf8_lossy(&b).into_owned()),
        // Line-shaped noise that often gets past the TOML parser into serde.
        "((\\[\\[?(proxy|admin|token|route|log|x)\\]\\]?|[a-z_]{1,14} = (\"[^\"\\\\\n]{0,12}\"|-?[0-9]{1,6}|true|\\[\\]|\\{\\}))\n){0,8}",
        // The valid base with a random line spliced in somewhere.
        (0usize..40, "[ -~]{0,30}").prop_map(|(at, line)| {
            let mut lines: Vec<&str> = BASE_CONFIG.lines().collect();
            let at = at.min(lines.len());
            lines.insert(at, &line);
            lines.join("\n")
        }),
    ]
    .boxed()
}

fn mutations() -> impl Strategy<Value = Vec<(usize, Option<toml::Value>)>> {
    prop::collection::vec(
        (any::<usize>(), prop::option::weighted(0.85, toml_value())),
        1..4,
    )
}

fn mutated_table(
    keys: &[(String, String)],
    muts: Vec<(usize, Option<toml::Value>)>,
) -> toml::Table {
    let mut table: toml::Table = toml::from_str(BASE_CONFIG).unwrap();
    for (i, value) in muts {
        let (section, key) = &keys[i % keys.len()];
        mutate(&mut table, section, key, value);
    }
    table
}

/// A value TOML cannot write (none known) would just give an empty text.
fn to_text(table: &toml::Table) -> String {
    toml::to_string(table).unwrap_or_default()
}

#[test]
fn base_config_is_valid() {
    from_toml_str(BASE_CONFIG).unwrap();
    assert!(mutation_keys().len() > 40, "{:?}", mutation_keys());
}

proptest! {
    #![proptest_config(cases(256))]

    /// Arbitrary text never panics the loader; every problem names a key.
    #[test]
    fn config_text_never_panics(text in toml_like_text()) {
        let result = from_toml_str(&text);
        check_no_keyless_problem(&result)?;
    }

    /// A valid file with random values (wrong types, negative, huge, unicode, empty) in random
    /// keys, or keys removed: never panics; every problem names a key.
    #[test]
    fn mutated_config_never_panics(muts in mutations()) {
        let text = to_text(&mutated_table(&mutation_keys(), muts));
        let result = from_toml_str(&text);
        check_no_keyless_problem(&result)?;
    }

    /// The same inputs (minus line breaks inside keys and values, and TOML syntax errors): an
    /// error prints exactly one line per problem.
    #[test]
    fn config_errors_print_one_line_per_problem(
        text in toml_like_text(),
        muts in mutations(),
    ) {
        check_one_line_per_problem(&from_toml_str(&text))?;
        let table = match without_newlines(toml::Value::Table(mutated_table(&mutation_keys(), muts))) {
            toml::Value::Table(t) => t,
            _ => unreachable!(),
        };
        check_one_line_per_problem(&from_toml_str(&to_text(&table)))?;
    }
}

#[test]
fn toml_syntax_errors_print_on_one_line() {
    let err = from_toml_str("!").unwrap_err();
    assert_eq!(err.to_string().lines().count(), err.problems.len(), "{err}");
}

#[test]
fn config_text_with_newlines_prints_on_one_line() {
    for (what, text) in [
        (
            "private_key_file",
            BASE_CONFIG.replace(
                "auth_method = \"client_secret_post\"",
                "auth_method = \"client_secret_post\"\nprivate_key_file = \"a\\nb\"",
            ),
        ),
        (
            "ca_file",
            BASE_CONFIG.replace(
                "auth_method = \"client_secret_post\"",
                "auth_method = \"client_secret_post\"\nca_file = \"x\\ny\"",
            ),
        ),
        (
            "unknown key",
            BASE_CONFIG.replace("[proxy]", "[proxy]\n\"a\\nb\" = 1"),
        ),
    ] {
        let err = from_toml_str(&text).unwrap_err();
        assert_eq!(
            err.to_string().lines().count(),
            err.problems.len(),
            "{what}:\n{err}"
        );
    }
}

#[test]
fn empty_top_level_key_is_reported_with_a_key() {
    let err = from_toml_str(&format!("\"\" = 1\n{BASE_CONFIG}")).unwrap_err();
    for p in &err.problems {
        assert!(!p.key.is_empty(), "{p:?}");
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
// Routes
// ---------------------------------------------------------------------------------------------

const ROUTES: &str = r#"
[[route]]
name = "orders"
path_prefix = "/orders/"
strip_prefix = true
upstream = "https://orders.example.com/api/"

[[route]]
name = "orders-admin"
path_prefix = "/orders/admin"
upstream = "https://admin.example.com"

[[route]]
name = "orders-exact"
path_prefix = "/orders"
upstream = "https://orders2.example.com/v1"
strip_prefix = true

[[route]]
name = "api"
path_prefix = "/api"
upstream = "https://api.example.com/base/v1/"

[[route]]
name = "billing-host"
host = "billing.example.com"
upstream = "https://billing.example.com"

[[route]]
name = "billing-v2"
host = "billing.example.com"
path_prefix = "/v2"
strip_prefix = true
upstream = "https://billing2.example.com/x"

[[route]]
name = "billing-orders"
host = "billing.example.com"
path_prefix = "/orders/"
upstream = "https://billing3.example.com"

[[route]]
name = "v6"
host = "[::1]"
path_prefix = "/six/"
upstream = "https://six.example.com"

[[route]]
name = "ip"
host = "127.0.0.1"
upstream = "https://ip.example.com:8443/ip"

[[route]]
name = "dedicated"
listen = "127.0.0.1:0"
upstream = "https://dedicated.example.com"
"#;

struct Table {
    table: RouteTable,
    dedicated: Vec<bool>,
}

fn route_table() -> Table {
    let cfg = from_toml_str(&format!(
        "[token]\ntoken_url = \"https://idp.example.com/t\"\nclient_id = \"c\"\n\
         auth_method = \"client_secret_post\"\nclient_secret = \"s\"\n{ROUTES}"
    ))
    .expect("route config is valid");
    let metrics = Metrics::new();
    let routes: Vec<Route> = cfg
        .route
        .iter()
        .map(|r| Route::from_config(r, &metrics).expect("route builds"))
        .collect();
    let dedicated: Vec<bool> = cfg.route.iter().map(|r| r.listen.is_some()).collect();
    Table {
        table: RouteTable::new(routes, &dedicated),
        dedicated,
    }
}

fn host_input() -> impl Strategy<Value = Option<String>> {
    let known = prop::sample::select(vec![
        "billing.example.com",
        "BILLING.Example.COM",
        "billing.example.com.",
        "billing.example.com..",
        "billing.example.com:443",
        "billing.example.com.:8080",
        "billing.example.com:",
        "billing.example.com:abc",
        "billing.example.com:99999999999999999999",
        " billing.example.com ",
        "bIlling.example.com\t",
        "billing.example.com/",
        "bİlling.example.com",
        "[::1]",
        "[::1]:8080",
        "[::1]junk",
        "[::1",
        "::1",
        "]",
        "[",
        "127.0.0.1",
        "127.0.0.1:8080",
        "127.0.0.1.",
        "localhost",
        "",
        ":",
        ".",
        "..",
        "orders.example.com",
    ]);
    prop::option::weighted(
        0.9,
        prop_oneof![
            3 => known.prop_map(str::to_string),
            1 => any::<String>(),
            1 => prop::collection::vec(any::<u8>(), 0..40)
                .prop_map(|b| String::from_utf8_lossy(&b).into_owned()),
            1 => ("[a-zA-Z0-9.\\-\\[\\]:]{0,20}", prop::option::of(any::<u16>()))
                .prop_map(|(h, p)| match p { Some(p) => format!("{h}:{p}"), None => h }),
        ],
    )
}

fn path_input() -> BoxedStrategy<String> {
    let prefix = prop::sample::select(vec![
        "",
        "/",
        "/orders",
        "/orders/",
        "/orders/admin",
        "/orders/admin/",
        "/ordersX",
        "/api",
        "/api/",
        "/apix",
        "/v2",
        "/v2/",
        "/six/",
        "/six",
        "//orders/",
    ]);
    let segment = prop_oneof![
        4 => "[a-zA-Z0-9._~-]{0,8}",
        1 => prop::sample::select(vec![
            ".", "..", "%2e", "%2E%2e", ".%2e", "%2f", "%5C", "\\", "%", "%zz", "?", "#",
            "a b", "é", "\u{0}", ";", "..;", "%00",
        ]).prop_map(str::to_string),
        1 => any::<String>(),
    ];
    prop_oneof![
        4 => (prefix, prop::collection::vec(segment, 0..4))
            .prop_map(|(p, segs)| format!("{p}{}", segs.join("/"))),
        1 => any::<String>(),
    ]
    .boxed()
}

/// What a request target really gives the proxy: hyper parses it into a URI first, so `#`
/// and `?` never appear in the path.
fn as_request_target(path: &str, query: Option<&str>) -> Option<(String, Option<String>)> {
    let target = match query {
        Some(q) => format!("{path}?{q}"),
        None => path.to_string(),
    };
    let pq = http::uri::PathAndQuery::try_from(target).ok()?;
    Some((pq.path().to_string(), pq.query().map(str::to_string)))
}

proptest! {
    #![proptest_config(cases(512))]

    /// `match_main` never panics; a match names the request's host (when the route has one),
    /// is a segment prefix of the path (when it has one), and no other main-listener route that
    /// matches ranks higher (host-specific beats hostless, then the longest prefix).
    #[test]
    fn route_matching_picks_the_best_match(host in host_input(), path in path_input()) {
        let t = route_table();
        let got = t.table.match_main(host.as_deref(), &path);
        let norm = host.as_deref().map(normalize_host);
        let rank = |i: usize| -> Option<(bool, usize)> {
            let r = &t.table.routes[i];
            if t.dedicated[i] {
                return None;
            }
            match (&r.host, &norm) {
                (Some(want), Some(h)) if want == h => {}
                (Some(_), _) => return None,
                (None, _) => {}
            }
            let len = match &r.path_prefix {
                None => 0,
                Some(p) => {
                    strip_segment_prefix(&path, p)?;
                    p.len()
                }
            };
            Some((r.host.is_some(), len))
        };
        let best = (0..t.table.routes.len()).filter_map(rank).max();
        match got {
            None => prop_assert_eq!(best, None, "no route returned but one matches"),
            Some(i) => {
                let r = &t.table.routes[i];
                prop_assert!(!t.dedicated[i], "matched dedicated route {}", r.name);
                if let Some(h) = &r.host {
                    prop_assert_eq!(Some(h), norm.as_ref(), "route {} host", r.name);
                }
                if let Some(p) = &r.path_prefix {
                    prop_assert!(strip_segment_prefix(&path, p).is_some(), "route {} prefix {} vs {:?}", r.name, p, path);
                }
                prop_assert_eq!(rank(i), best, "route {} is not the best match", r.name);
            }
        }
    }

    /// `check_path` never panics; for a path it accepts, every route's upstream URI either
    /// fails to build or stays on the route's upstream, under its base path (segment-wise), and
    /// — for a path a real request can carry — without dot segments.
    #[test]
    fn accepted_paths_stay_under_the_upstream_base(
        path in path_input(),
        query in prop::option::weighted(0.3, "[ -~]{0,12}"),
    ) {
        let t = route_table();
        if check_path(&path).is_err() {
            return Ok(());
        }
        let realistic = as_request_target(&path, query.as_deref());
        for r in &t.table.routes {
            if let Ok(uri) = r.upstream_uri(&path, query.as_deref()) {
                prop_assert_eq!(uri.scheme(), Some(&r.upstream_scheme));
                prop_assert_eq!(uri.authority(), Some(&r.upstream_authority));
                prop_assert!(uri.path().starts_with(&r.upstream_base_path), "{} -> {}", path, uri);
                prop_assert!(strip_segment_prefix(uri.path(), &r.upstream_base_path).is_some(),
                    "{} -> {} leaves base {:?}", path, uri, r.upstream_base_path);
            }
            if let Some((p, q)) = &realistic
                && check_path(p).is_ok()
                && let Ok(uri) = r.upstream_uri(p, q.as_deref())
            {
                prop_assert!(check_path(uri.path()).is_ok(), "{} -> {} has dot segments", p, uri);
                prop_assert!(strip_segment_prefix(uri.path(), &r.upstream_base_path).is_some(),
                    "{} -> {}", p, uri);
            }
        }
    }

    /// A `..` segment in any spelling (`..`, `%2e%2e`, `%2E%2e`, `.%2e`, …) anywhere in the
    /// path is refused, and so is `.`.
    #[test]
    fn dot_segments_are_always_refused(
        before in prop::collection::vec("[a-zA-Z0-9_~-]{1,8}", 0..4),
        dots in prop::collection::vec(prop::sample::select(vec![".", "%2e", "%2E"]), 1..=2),
        after in prop::collection::vec("[a-zA-Z0-9._~-]{0,8}", 0..4),
        trailing_slash in any::<bool>(),
    ) {
        let mut segs = before.clone();
        segs.push(dots.concat());
        segs.extend(after.iter().cloned());
        let mut path = format!("/{}", segs.join("/"));
        if trailing_slash {
            path.push('/');
        }
        prop_assert!(check_path(&path).is_err(), "accepted {:?}", path);
    }
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

    /// Any durations (up to Duration::MAX), failure counts and random inputs (NaN, ±∞,
    /// negative, > 1): no panic, and never below half the first pause.
    #[test]
    fn backoff_never_panics(
        initial in duration(),
        max in duration(),
        failures in prop_oneof![0u32..40, any::<u32>()],
        random in fraction(),
    ) {
        let d = backoff::delay(initial, max, failures, random);
        prop_assert!(d >= initial.min(max) / 2, "delay {:?} < half of {:?}", d, initial.min(max));
    }

    /// For durations up to ~104 days (2^53 ns, where f64 seconds still resolve nanoseconds):
    /// the pause is within [min(initial, max) / 2, max].
    #[test]
    fn backoff_stays_within_bounds(
        initial in prop_oneof![(0u64..=1 << 53).prop_map(Duration::from_nanos), (0u64..100_000).prop_map(Duration::from_millis)],
        max in prop_oneof![(0u64..=1 << 53).prop_map(Duration::from_nanos), (0u64..100_000).prop_map(Duration::from_millis)],
        failures in prop_oneof![0u32..40, any::<u32>()],
        random in fraction(),
    ) {
        let d = backoff::delay(initial, max, failures, random);
        prop_assert!(d <= max, "delay {:?} > max {:?}", d, max);
        prop_assert!(d >= initial.min(max) / 2, "delay {:?} < half of {:?}", d, initial.min(max));
    }

    /// The same bound for any durations at all.
    #[test]
    fn backoff_never_exceeds_max_for_any_duration(
        initial in duration(),
        max in duration(),
        failures in prop_oneof![0u32..40, any::<u32>()],
        random in fraction(),
    ) {
        let d = backoff::delay(initial, max, failures, random);
        prop_assert!(d <= max, "delay {:?} > max {:?}", d, max);
    }

    /// Jitter is monotonic in the random fraction for a fixed attempt.
    #[test]
    fn backoff_grows_with_the_random_fraction(
        initial in duration(),
        max in duration(),
        failures in 0u32..40,
        a in 0.0f64..=1.0,
        b in 0.0f64..=1.0,
    ) {
        let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
        prop_assert!(backoff::delay(initial, max, failures, lo) <= backoff::delay(initial, max, failures, hi));
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
        let policy = Policy {
            refresh_at,
            refresh_before_expiry,
            expiry_skew,
            backoff_initial: Duration::from_millis(200),
            backoff_max: Duration::from_secs(1),
            wait_timeout: Duration::from_secs(11),
        };
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
        let policy = Policy {
            refresh_at,
            refresh_before_expiry,
            expiry_skew,
            backoff_initial: Duration::from_millis(200),
            backoff_max: Duration::from_secs(1),
            wait_timeout: Duration::from_secs(11),
        };
        let s = schedule(lifetime, &policy);
        prop_assert!(s.refresh_due <= s.usable_for && s.usable_for <= lifetime);
    }
}

/// `schedule` clamps `refresh_at` to [0, 1] but `f64::clamp` passes NaN through, and
/// `Duration::mul_f64(NaN)` panics. The config refuses NaN (`refresh_at = nan` is valid TOML),
/// so this is reachable only through a hand-built `Policy`.
#[test]
fn refresh_schedule_survives_a_nan_fraction() {
    let policy = Policy {
        refresh_at: f64::NAN,
        refresh_before_expiry: Duration::from_secs(60),
        expiry_skew: Duration::from_secs(10),
        backoff_initial: Duration::from_millis(200),
        backoff_max: Duration::from_secs(1),
        wait_timeout: Duration::from_secs(11),
    };
    let lifetime = Duration::from_secs(3600);
    let s = schedule(lifetime, &policy);
    assert!(s.refresh_due >= lifetime / 4 && s.refresh_due <= s.usable_for);
}

#[test]
fn config_refuses_a_nan_refresh_at() {
    let text = BASE_CONFIG.replace("refresh_at = 0.75", "refresh_at = nan");
    let err = from_toml_str(&text).unwrap_err();
    assert!(
        err.problems.iter().any(|p| p.key == "token.refresh_at"),
        "{err}"
    );
}
