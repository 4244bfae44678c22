//! Property tests for configuration text (docs/spec.md §4; docs/reliability.md §6, "bad input
//! from every side"): arbitrary text, and a valid file with random values (wrong types,
//! negative, huge, unicode, empty) in random keys or keys removed. The loader never panics,
//! every problem names a key, and an error prints exactly one line per problem
//! (docs/spec.md §7: `check-config` exits 2 with one line per problem).
//!
//! Each bug these tests found has a regression test of its own below (one line per problem,
//! empty keys, a NaN `refresh_at`). The token response parser, backoff and the refresh schedule
//! are property-tested next to their code (`src/token/props.rs`), and so are route matching,
//! path checking and upstream URI rewriting (`src/proxy/props.rs`).
//!
//! Case counts are modest so the file runs in a few seconds on a small shared machine;
//! failures are not persisted (no regression files are written into the tree). Strategies are
//! boxed: unboxed, their nested types overflow a debug-build test thread's stack.

use proptest::prelude::*;
use proptest::test_runner::Config as ProptestConfig;

use token_sidecar::{Config, ConfigError, from_toml_str};

fn cases(n: u32) -> ProptestConfig {
    ProptestConfig {
        cases: n,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

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
        // A section the base leaves out (all its keys defaulted) is written when mutated.
        let entry = table
            .entry(section)
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        match entry {
            toml::Value::Table(t) => t,
            toml::Value::Array(a) => match a.first_mut() {
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

#[test]
fn config_refuses_a_nan_refresh_at() {
    let text = BASE_CONFIG.replace("refresh_at = 0.75", "refresh_at = nan");
    let err = from_toml_str(&text).unwrap_err();
    assert!(
        err.problems.iter().any(|p| p.key == "token.refresh_at"),
        "{err}"
    );
}

/// The keys of the base config whose values are durations, as `(section, key, name)`, the name
/// being how validation reports it (`route[0].timeout`). Read from the effective config, so a
/// duration key added later is covered without editing this list.
fn duration_keys() -> Vec<(String, String, String)> {
    typed_keys(|v| {
        v.as_str()
            .is_some_and(|s| humantime::parse_duration(s).is_ok())
    })
}

/// Like [`duration_keys`], for integer keys.
fn integer_keys() -> Vec<(String, String, String)> {
    typed_keys(toml::Value::is_integer)
}

fn typed_keys(is: impl Fn(&toml::Value) -> bool) -> Vec<(String, String, String)> {
    let base = from_toml_str(BASE_CONFIG).expect("the base config is valid");
    let effective: toml::Table = toml::from_str(&base.to_redacted_toml()).unwrap();
    let mut keys = Vec::new();
    for (section, value) in &effective {
        let (table, name) = match value {
            toml::Value::Table(t) => (t, section.clone()),
            toml::Value::Array(a) => (a[0].as_table().unwrap(), format!("{section}[0]")),
            _ => continue,
        };
        for (k, v) in table {
            if is(v) {
                keys.push((section.clone(), k.clone(), format!("{name}.{k}")));
            }
        }
    }
    keys
}

/// The base config with `section.key = value`, loaded and validated.
fn with_value(section: &str, key: &str, value: toml::Value) -> Result<Config, ConfigError> {
    let mut table: toml::Table = toml::from_str(BASE_CONFIG).unwrap();
    mutate(&mut table, section, key, Some(value));
    from_toml_str(&to_text(&table))
}

/// docs/spec.md §4: every duration has an upper bound (timeouts and backoffs 1 h, token
/// lifetimes and margins 1 day), so none can overflow `Instant + Duration` at run time. Each
/// duration key set to an absurd value is refused with a problem naming it.
#[test]
fn every_duration_key_refuses_a_huge_value_naming_it() {
    let keys = duration_keys();
    assert!(keys.len() >= 16, "{keys:?}");
    for (section, key, named) in keys {
        for huge in [
            "1000000000years",
            "18446744073709551615s",
            "2d",
            "100000000000000h",
        ] {
            let err = with_value(&section, &key, huge.into())
                .err()
                .unwrap_or_else(|| panic!("{named} = {huge:?} was accepted"));
            assert!(
                err.problems.iter().any(|p| p.key == named),
                "{named} = {huge:?}: {err}"
            );
        }
    }
}

/// The same for every integer key (connection caps, sizes, attempts, threads): a value near
/// `i64::MAX` is refused, naming the key, instead of sizing a semaphore or a buffer.
#[test]
fn every_integer_key_refuses_a_huge_value_naming_it() {
    let keys = integer_keys();
    assert!(keys.len() >= 10, "{keys:?}");
    for (section, key, named) in keys {
        for huge in [i64::MAX, 1 << 40, 100_000_000] {
            let err = with_value(&section, &key, huge.into())
                .err()
                .unwrap_or_else(|| panic!("{named} = {huge} was accepted"));
            assert!(
                err.problems.iter().any(|p| p.key == named),
                "{named} = {huge}: {err}"
            );
        }
    }
}

proptest! {
    #![proptest_config(cases(256))]

    /// Any duration over a day, in any duration key, is refused with that key named (one day
    /// is the largest bound).
    #[test]
    fn durations_beyond_a_day_are_refused(
        which in any::<prop::sample::Index>(),
        secs in 86_401u64..=u64::MAX,
        nanos in 0u32..1_000_000_000,
    ) {
        let keys = duration_keys();
        let (section, key, named) = which.get(&keys);
        let value = format!("{secs}s {nanos}ns");
        let result = with_value(section, key, value.clone().into());
        prop_assert!(result.is_err(), "{} = {:?} was accepted", named, value);
        let err = result.err().unwrap();
        prop_assert!(err.problems.iter().any(|p| &p.key == named), "{}: {}", named, err);
    }
}
