//! Every default value of the configuration, and the only place one is written in code.
//!
//! Sections whose keys all have defaults (`[proxy]`, `[admin]`, `[log]`) get them from the
//! `Default` impls here through a struct-level `#[serde(default)]`; `[token]` and `[[route]]`
//! have required keys, so their defaulted fields name the functions in [`token`] and [`route`].
//! The three enums' defaults are here too. A key not mentioned here defaults to off, unset or
//! empty (`false`, no value, `[]`, `{}`): `#[serde(default)]` on the field in the schema.
//!
//! The README's configuration table and the comments in `sidecar.toml` restate these values for
//! people; the tests below compare both against what the code actually does and require every
//! key of the schema to appear in both, so documentation cannot drift from the code.

use std::net::SocketAddr;
use std::time::Duration;

use super::{
    AdminConfig, AudienceParam, AuthMethod, LogConfig, LogFormat, ProxyConfig, TokenEndpointConfig,
};

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            // With max_concurrent_streams and the buffer sizes, the worst case fits 64 MiB
            // (docs/spec.md §6, server/budget.rs).
            max_connections: 44,
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            max_header_bytes: 65536,
            max_headers: 100,
            worker_threads: 0,
            shutdown_grace: Duration::from_secs(20),
            retry_body_limit: 65536,
            body_read_timeout: Duration::from_secs(30),
            max_concurrent_streams: 4,
            allowed_hosts: Vec::new(),
        }
    }
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 9090)),
            max_connections: 128,
            max_connections_per_peer: 32,
            header_read_timeout: Duration::from_secs(2),
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::default(),
            access_log: true,
        }
    }
}

impl Default for TokenEndpointConfig {
    fn default() -> Self {
        TokenEndpointConfig {
            // Off: tokens are handed out without client authentication only where asked for.
            listen: None,
            allow_scopes: Vec::new(),
            allow_audiences: Vec::new(),
            clients: Vec::new(),
            // The callers are the pod's own tools (a scraper, a plugin): a handful at once.
            max_connections: 16,
            body_read_timeout: Duration::from_secs(5),
        }
    }
}

// Derivable, but written out so that this file stays the one place defaults are set.
#[allow(clippy::derivable_impls)]
impl Default for AuthMethod {
    fn default() -> Self {
        AuthMethod::PrivateKeyJwt
    }
}

// Derivable, but written out so that this file stays the one place defaults are set.
#[allow(clippy::derivable_impls)]
impl Default for AudienceParam {
    fn default() -> Self {
        AudienceParam::Audience
    }
}

// Derivable, but written out so that this file stays the one place defaults are set.
#[allow(clippy::derivable_impls)]
impl Default for LogFormat {
    fn default() -> Self {
        LogFormat::Text
    }
}

/// `[token]` defaults, named by the schema's `#[serde(default = "…")]` attributes.
pub(super) mod token {
    use std::time::Duration;

    pub(crate) fn assertion_lifetime() -> Duration {
        Duration::from_secs(60)
    }
    pub(crate) fn clock_skew_tolerance() -> Duration {
        Duration::from_secs(30)
    }
    pub(crate) fn refresh_at() -> f64 {
        0.8
    }
    pub(crate) fn refresh_before_expiry() -> Duration {
        Duration::from_secs(60)
    }
    pub(crate) fn expiry_skew() -> Duration {
        Duration::from_secs(10)
    }
    pub(crate) fn default_token_ttl() -> Duration {
        Duration::from_secs(300)
    }
    pub(crate) fn request_timeout() -> Duration {
        Duration::from_secs(10)
    }
    pub(crate) fn max_attempts() -> u32 {
        3
    }
    pub(crate) fn retry_backoff_initial() -> Duration {
        Duration::from_millis(200)
    }
    pub(crate) fn retry_backoff_max() -> Duration {
        Duration::from_secs(5)
    }
    pub(crate) fn min_refetch_interval() -> Duration {
        Duration::from_secs(10)
    }
    pub(crate) fn max_response_bytes() -> usize {
        256 * 1024
    }
    /// An issuer's metadata changes rarely (a migration); hourly is cheap and notices it.
    pub(crate) fn discovery_refresh_interval() -> Duration {
        Duration::from_secs(3600)
    }
    /// RFC 7523 §2.2: what Keycloak, Entra ID and Google expect for a platform-issued JWT.
    pub(crate) fn cache_capacity() -> u64 {
        1000
    }
    pub(crate) fn cache_idle_timeout() -> Duration {
        Duration::from_secs(15 * 60)
    }
    pub(crate) fn client_assertion_type() -> String {
        "urn:ietf:params:oauth:client-assertion-type:jwt-bearer".to_string()
    }
}

/// `[[route]]` defaults, named by the schema's `#[serde(default = "…")]` attributes.
pub(super) mod route {
    use std::time::Duration;

    pub(crate) fn connect_timeout() -> Duration {
        Duration::from_secs(5)
    }
    pub(crate) fn timeout() -> Duration {
        Duration::from_secs(60)
    }
}

#[cfg(test)]
mod tests {
    //! The documentation checks. "Effective default" means what a config that sets only the
    //! required keys deserializes to, serialized back to TOML: the code's own answer, whatever
    //! mechanism produced it.

    use std::collections::{BTreeMap, BTreeSet};

    use serde::Deserialize;
    use serde::de::{self, Deserializer, Visitor};

    use super::super::TokenEndpointConfig;
    use super::super::{
        AdminConfig, Config, LogConfig, ProxyConfig, RouteConfig, TokenConfig, load,
    };

    /// Only the keys without a default; each is "required" in the documentation.
    const REQUIRED_ONLY: &str = r#"
[token]
token_url = "https://idp.example.com/oauth2/token"
client_id = "svc"

[[route]]
name = "r"
upstream = "https://r.example.com"
"#;

    const README: &str = include_str!("../../README.md");
    const SIDECAR_TOML: &str = include_str!("../../sidecar.toml");

    /// The field names serde's derive declares for `T`: the schema's keys, read from the code.
    fn field_names<'de, T: Deserialize<'de>>() -> &'static [&'static str] {
        struct Fields<'a>(&'a mut &'static [&'static str]);
        impl<'de> Deserializer<'de> for Fields<'_> {
            type Error = de::value::Error;
            fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Self::Error> {
                Err(de::Error::custom("not a struct"))
            }
            fn deserialize_struct<V: Visitor<'de>>(
                self,
                _: &'static str,
                fields: &'static [&'static str],
                _: V,
            ) -> Result<V::Value, Self::Error> {
                *self.0 = fields;
                Err(de::Error::custom("fields recorded"))
            }
            serde::forward_to_deserialize_any! {
                bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes
                byte_buf option unit unit_struct newtype_struct seq tuple tuple_struct map enum
                identifier ignored_any
            }
        }
        let mut fields: &'static [&'static str] = &[];
        let _ = T::deserialize(Fields(&mut fields));
        fields
    }

    /// Every key of the schema as `section.key` (`route.key` for `[[route]]`), in file order.
    fn schema_keys() -> Vec<String> {
        let sections = [
            ("proxy", field_names::<ProxyConfig>()),
            ("admin", field_names::<AdminConfig>()),
            ("token", field_names::<TokenConfig>()),
            ("route", field_names::<RouteConfig>()),
            // `[[client]]` is `name` plus every `token` key (checked as `token.*`).
            ("client", &["name"][..]),
            ("log", field_names::<LogConfig>()),
            ("token_endpoint", field_names::<TokenEndpointConfig>()),
        ];
        let names: Vec<&str> = sections.iter().map(|(s, _)| *s).collect();
        let mut top = field_names::<Config>().to_vec();
        top.sort_unstable();
        let mut sorted = names.clone();
        sorted.sort_unstable();
        assert_eq!(top, sorted, "a section was added to Config: list it here");
        sections
            .iter()
            .flat_map(|(s, fields)| fields.iter().map(move |f| format!("{s}.{f}")))
            .collect()
    }

    /// What a key defaults to.
    #[derive(Debug)]
    enum Effective {
        /// The key has no default; a config must set it.
        Required,
        /// Off/unset/empty: nothing to state but "unset", "none" or the like.
        Unset,
        /// A value the documentation must state exactly.
        Value(toml::Value),
    }

    fn effective_defaults() -> BTreeMap<String, Effective> {
        let required: toml::Table = toml::from_str(REQUIRED_ONLY).unwrap();
        let config = load::parse_unvalidated(REQUIRED_ONLY).expect("REQUIRED_ONLY parses");
        let toml::Value::Table(ser) = toml::Value::try_from(&config).unwrap() else {
            panic!("a config serializes to a table")
        };
        let section = |t: &toml::Table, s: &str| -> toml::Table {
            match t.get(s) {
                Some(toml::Value::Table(t)) => t.clone(),
                Some(toml::Value::Array(a)) => a[0].as_table().unwrap().clone(),
                _ => toml::Table::new(),
            }
        };
        schema_keys()
            .into_iter()
            .map(|key| {
                let (s, k) = key.split_once('.').unwrap();
                let value = if section(&required, s).contains_key(k) {
                    Effective::Required
                } else {
                    match section(&ser, s).get(k) {
                        None => Effective::Unset,
                        Some(toml::Value::Array(a)) if a.is_empty() => Effective::Unset,
                        Some(toml::Value::Table(t)) if t.is_empty() => Effective::Unset,
                        Some(v) => Effective::Value(v.clone()),
                    }
                };
                (key, value)
            })
            .collect()
    }

    /// `documented` (a literal from the docs) states `v`: equal as text, or as durations
    /// (the code writes 60 s as "1m", the docs may say "60s").
    fn states(documented: &toml::Value, v: &toml::Value) -> bool {
        let text = |v: &toml::Value| match v {
            toml::Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        let (a, b) = (text(documented), text(v));
        a == b
            || matches!(
                (humantime::parse_duration(&a), humantime::parse_duration(&b)),
                (Ok(x), Ok(y)) if x == y
            )
    }

    /// A README cell's literal (`` `8080` ``, `` `"x"` ``) as a TOML value; None for prose.
    fn literal(cell: &str) -> Option<toml::Value> {
        let inner = cell.strip_prefix('`')?.strip_suffix('`')?;
        if inner.contains('`') {
            return None;
        }
        let parsed = toml::from_str::<toml::Table>(&format!("v = {inner}"))
            .ok()
            .and_then(|mut t| t.remove("v"));
        Some(parsed.unwrap_or_else(|| toml::Value::String(inner.to_owned())))
    }

    /// The README's `| key | default | meaning |` rows as (key, default cell), compound rows
    /// (`` `a` / `b` ``) split into one entry per key.
    fn readme_rows() -> Vec<(String, String)> {
        let mut lines = README
            .lines()
            .skip_while(|l| !l.starts_with("| key | default |"));
        assert!(lines.next().is_some(), "README has no configuration table");
        let mut rows = Vec::new();
        for line in lines.skip(1).take_while(|l| l.starts_with('|')) {
            let cells: Vec<&str> = line.split('|').map(str::trim).collect();
            let keys: Vec<&str> = cells[1].split(" / ").collect();
            let defaults: Vec<&str> = cells[2].split(" / ").collect();
            for (i, key) in keys.iter().enumerate() {
                let key = key.trim_matches('`').to_string();
                let default = if defaults.len() == keys.len() {
                    defaults[i]
                } else {
                    cells[2]
                };
                rows.push((key, default.to_string()));
            }
        }
        rows
    }

    /// `sidecar.toml`'s `key = value` lines, commented out (`# key = value`) or not, as
    /// (section.key, value, commented). Prose comments do not parse as TOML and are skipped.
    fn sidecar_toml_entries() -> Vec<(String, toml::Value, bool)> {
        let mut section = String::new();
        let mut out = Vec::new();
        for line in SIDECAR_TOML.lines().map(str::trim) {
            // `[[client]]` is documented commented out; its token keys are `token.*`'s.
            if line == "# [[client]]" {
                section = "client".to_string();
                continue;
            }
            if let Some(s) = line.strip_prefix("[[").and_then(|l| l.strip_suffix("]]")) {
                section = s.to_string();
                continue;
            }
            if let Some(s) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
                section = s.to_string();
                continue;
            }
            let (text, commented) = match line.strip_prefix("# ") {
                Some(rest) => (rest, true),
                None => (line, false),
            };
            if let Ok(table) = toml::from_str::<toml::Table>(text)
                && table.len() == 1
                && let Some((k, v)) = table.into_iter().next()
            {
                let section = match section.as_str() {
                    "client" if k != "name" => "token",
                    s => s,
                };
                out.push((format!("{section}.{k}"), v, commented));
            }
        }
        out
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let c = super::super::from_toml_str(super::super::MINIMAL).unwrap();
        assert_eq!(c.proxy.listen, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(
            c.token.assertion_lifetime,
            std::time::Duration::from_secs(60)
        );
        assert_eq!(c.token.refresh_at, 0.8);
        assert_eq!(c.route[0].timeout, std::time::Duration::from_secs(60));
        assert_eq!(
            c.token.audience_param,
            super::super::AudienceParam::Audience
        );
    }

    #[test]
    fn readme_table_states_every_key_and_its_effective_default() {
        let effective = effective_defaults();
        let rows = readme_rows();
        let mut problems = Vec::new();
        let documented: BTreeSet<&str> = rows.iter().map(|(k, _)| k.as_str()).collect();
        for key in effective.keys() {
            if !documented.contains(key.as_str()) {
                problems.push(format!("{key}: missing from the README table"));
            }
        }
        for (key, cell) in &rows {
            let Some(eff) = effective.get(key) else {
                problems.push(format!("{key}: in the README table but not in the schema"));
                continue;
            };
            match (eff, literal(cell)) {
                (Effective::Required, _) if !cell.contains("required") => {
                    problems.push(format!("{key}: README says {cell:?}; the key is required"))
                }
                (Effective::Required, _) => {}
                (Effective::Unset, Some(lit)) if !is_empty(&lit) => problems.push(format!(
                    "{key}: README states the default {cell}, but the key has none"
                )),
                (Effective::Unset, _) => {}
                (Effective::Value(v), Some(lit)) if states(&lit, v) => {}
                (Effective::Value(v), _) => problems.push(format!(
                    "{key}: README says {cell:?}, the effective default is {v}"
                )),
            }
        }
        assert!(problems.is_empty(), "README.md:\n{}", problems.join("\n"));
    }

    fn is_empty(v: &toml::Value) -> bool {
        matches!(v, toml::Value::Array(a) if a.is_empty())
            || matches!(v, toml::Value::Table(t) if t.is_empty())
    }

    #[test]
    fn sidecar_toml_lists_every_key_and_its_effective_default() {
        let effective = effective_defaults();
        let entries = sidecar_toml_entries();
        let mut problems = Vec::new();
        let listed: BTreeSet<&str> = entries.iter().map(|(k, _, _)| k.as_str()).collect();
        for key in effective.keys() {
            if !listed.contains(key.as_str()) {
                problems.push(format!("{key}: not listed in sidecar.toml"));
            }
        }
        for (key, value, commented) in &entries {
            match effective.get(key) {
                None => problems.push(format!("{key}: in sidecar.toml but not in the schema")),
                // A commented-out line shows the default; for keys without one it is an example.
                Some(Effective::Value(v)) if *commented && !states(value, v) => problems.push(
                    format!("{key}: sidecar.toml shows {value} as the default, the effective default is {v}"),
                ),
                _ => {}
            }
        }
        assert!(
            problems.is_empty(),
            "sidecar.toml:\n{}",
            problems.join("\n")
        );
        // The example itself is a well-formed config (its key file only exists in a pod).
        load::parse_unvalidated(SIDECAR_TOML).expect("sidecar.toml deserializes");
    }
}
