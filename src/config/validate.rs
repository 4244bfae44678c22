//! [`Config::validate`]: every rule serde cannot express (URL schemes, ranges, cross-field
//! rules, readable files).
//!
//! Invariants: validation never stops at the first problem; it walks the whole config and
//! reports each problem under the key that holds it (`route[1].upstream`, not "route orders"),
//! so an operator fixes a broken file in one round trip. It reads files (keys, CAs) but changes
//! nothing.

use std::path::Path;

use url::Url;

use super::{AuthMethod, Config, ConfigError, Problem, TokenConfig};

/// `token.client_assertion_file` / `token.client_assertion_type` (docs/spec.md §2).
fn validate_client_assertion(p: &mut Problems, t: &TokenConfig) {
    if t.client_assertion_file.is_some() && t.auth_method != AuthMethod::ClientAssertionFile {
        p.add(
            "token.client_assertion_file",
            "only used with auth_method = \"client_assertion_file\"",
        );
    }
    // RFC 7521 §4.2: an absolute URI; a form-unsafe or blank value is a typo, not a type.
    let ty = &t.client_assertion_type;
    let absolute = Url::parse(ty).is_ok_and(|u| !u.cannot_be_a_base() || u.scheme() == "urn");
    if !absolute || ty.chars().any(|c| c.is_whitespace() || c.is_control()) {
        p.add(
            "token.client_assertion_type",
            "must be an absolute URI such as urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
        );
    }
}

/// Collects problems as validation walks the config.
#[derive(Default)]
struct Problems(Vec<Problem>);

impl Problems {
    fn add(&mut self, key: impl Into<String>, message: impl Into<String>) {
        self.0.push(Problem {
            key: key.into(),
            message: message.into(),
        });
    }
}

impl Config {
    /// Checks every rule serde cannot express; returns all problems at once.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut p = Problems::default();
        self.validate_proxy(&mut p);
        self.validate_allowed_hosts(&mut p);
        self.validate_token(&mut p);
        self.validate_routes(&mut p);
        self.validate_route_targets(&mut p);
        self.validate_client_certs(&mut p);
        self.validate_token_endpoint(&mut p);
        self.validate_cache(&mut p);
        self.validate_clients(&mut p);
        p.0.extend(super::bounds::problems(self));
        if p.0.is_empty() {
            Ok(())
        } else {
            Err(ConfigError { problems: p.0 })
        }
    }

    fn validate_proxy(&self, p: &mut Problems) {
        server_limits(self, p);
        let px = &self.proxy;
        if px.max_connections == 0 {
            p.add("proxy.max_connections", "must be at least 1");
        }
        if px.max_header_bytes < 8192 {
            p.add("proxy.max_header_bytes", "must be at least 8192");
        }
        if px.max_headers == 0 {
            p.add("proxy.max_headers", "must be at least 1");
        }
        if px.header_read_timeout.is_zero() {
            p.add("proxy.header_read_timeout", "must be greater than zero");
        }
        if px.idle_timeout.is_zero() {
            p.add("proxy.idle_timeout", "must be greater than zero");
        }
        if self.admin.listen == px.listen && px.listen.port() != 0 {
            p.add("admin.listen", "must differ from proxy.listen");
        }
    }

    /// `proxy.allowed_hosts`: names compared with a request's host (docs/spec.md §4), so each
    /// must be something a Host header can say: a name or IP literal, optionally `:port`.
    fn validate_allowed_hosts(&self, p: &mut Problems) {
        for (i, h) in self.proxy.allowed_hosts.iter().enumerate() {
            if !is_host_entry(h) {
                p.add(
                    format!("proxy.allowed_hosts[{i}]"),
                    "must be a host name or IP literal ([v6] in brackets), optionally with :port; no scheme, path, wildcard or whitespace",
                );
            }
        }
    }

    fn validate_token(&self, p: &mut Problems) {
        let t = &self.token;
        match (&t.token_url, &t.issuer) {
            (Some(url), None) => check_endpoint_url(p, t, "token.token_url", url),
            // Discovery (docs/spec.md §2): the issuer is checked like a token URL; what it
            // names is checked when fetched (token::discovery).
            (None, Some(issuer)) => {
                check_endpoint_url(p, t, "token.issuer", issuer);
                // RFC 8414 §2: an issuer is scheme, host and path; a query could not be
                // compared with the document's issuer and could hide a credential.
                if Url::parse(issuer).is_ok_and(|u| u.query().is_some()) {
                    p.add("token.issuer", "must not have a query (?...)");
                }
            }
            (Some(_), Some(_)) => p.add(
                "token.issuer",
                "set either token.token_url or token.issuer, not both",
            ),
            (None, None) => p.add(
                "token.token_url",
                "required: set token.token_url, or token.issuer to discover it",
            ),
        }
        self.validate_trust_pinning(p);
        // A refresh per second at most: a zero interval would spin against the issuer.
        if t.discovery_refresh_interval < std::time::Duration::from_secs(1) {
            p.add("token.discovery_refresh_interval", "must be at least 1s");
        }
        if t.client_id.trim().is_empty() {
            p.add("token.client_id", "must not be empty");
        }
        match t.auth_method {
            AuthMethod::PrivateKeyJwt => {
                if t.private_key_file.is_none() {
                    p.add(
                        "token.private_key_file",
                        "required when auth_method = \"private_key_jwt\"",
                    );
                }
            }
            AuthMethod::ClientSecretBasic | AuthMethod::ClientSecretPost => {
                match (&t.client_secret, &t.client_secret_file) {
                    (None, None) => p.add(
                        "token.client_secret_file",
                        "client_secret_file or client_secret is required for client_secret_* auth methods",
                    ),
                    (Some(_), Some(_)) => p.add(
                        "token.client_secret",
                        "set either client_secret or client_secret_file, not both",
                    ),
                    (None, Some(f)) => check_readable(p, "token.client_secret_file", f),
                    (Some(_), None) => {}
                }
            }
            // Checked with the other certificate keys in validate_client_certs.
            AuthMethod::TlsClientAuth | AuthMethod::SelfSignedTlsClientAuth => {}
            AuthMethod::ClientAssertionFile => {
                // Not required to exist yet: the platform may write it after the sidecar starts
                // (a projected volume is ready, a spiffe-helper file may not be); until then
                // /readyz names the file (docs/spec.md §2).
                if t.client_assertion_file.is_none() {
                    p.add(
                        "token.client_assertion_file",
                        "required when auth_method = \"client_assertion_file\"",
                    );
                }
            }
        }
        validate_client_assertion(p, t);
        if let Some(f) = &t.private_key_file {
            if t.auth_method == AuthMethod::PrivateKeyJwt {
                check_key_file(p, t, f);
            } else {
                check_readable(p, "token.private_key_file", f);
            }
        }
        if let Some(alg) = &t.signing_alg
            && crate::key::parse_alg(alg).is_none()
        {
            p.add(
                "token.signing_alg",
                format!(
                    "unsupported algorithm {alg:?}; one of {}",
                    crate::key::supported_list()
                ),
            );
        }
        if let Some(aud) = &t.assertion_audience
            && aud.trim().is_empty()
        {
            p.add("token.assertion_audience", "must not be empty when set");
        }
        if !(t.refresh_at > 0.0 && t.refresh_at < 1.0) {
            p.add(
                "token.refresh_at",
                "must be a fraction between 0 and 1 (exclusive)",
            );
        }
        for (key, d) in [
            ("token.assertion_lifetime", t.assertion_lifetime),
            ("token.default_token_ttl", t.default_token_ttl),
            ("token.request_timeout", t.request_timeout),
            ("token.retry_backoff_initial", t.retry_backoff_initial),
            ("token.retry_backoff_max", t.retry_backoff_max),
        ] {
            if d.is_zero() {
                p.add(key, "must be greater than zero");
            }
        }
        // The assertion's exp - iat is their sum (iat is backdated by the tolerance); Hydra and
        // the dev server refuse assertions valid for more than an hour.
        if t.assertion_lifetime.saturating_add(t.clock_skew_tolerance)
            > std::time::Duration::from_secs(3600)
        {
            p.add(
                "token.assertion_lifetime",
                "assertion_lifetime + clock_skew_tolerance (the assertion's exp - iat) must be at most 1h; servers refuse longer-lived assertions",
            );
        }
        if t.assertion_lifetime <= t.clock_skew_tolerance {
            p.add(
                "token.assertion_lifetime",
                "must be longer than token.clock_skew_tolerance (a server running ahead would see the assertion expired)",
            );
        }
        if t.retry_backoff_max < t.retry_backoff_initial {
            p.add(
                "token.retry_backoff_max",
                "must not be less than token.retry_backoff_initial",
            );
        }
        if t.max_attempts == 0 {
            p.add("token.max_attempts", "must be at least 1");
        }
        // The upper bound (the eviction gate's 5 min cap) is in bounds.rs with the others.
        if t.min_refetch_interval.is_zero() {
            p.add("token.min_refetch_interval", "must be greater than zero");
        }
        if t.max_response_bytes < 1024 {
            p.add("token.max_response_bytes", "must be at least 1024");
        }
        if let Some(f) = &t.ca_file {
            check_ca_file(p, "token.ca_file", f);
        }
        for name in t.extra_params.keys() {
            if RESERVED_PARAMS.contains(&name.as_str()) {
                p.add(
                    format!("token.extra_params.{name}"),
                    "is set by the sidecar itself and cannot be overridden",
                );
            }
        }
    }

    /// `ca_only` (docs/spec.md §4): trusting only `ca_file` needs a `ca_file`, or nothing
    /// would be trusted at all.
    fn validate_trust_pinning(&self, p: &mut Problems) {
        if self.token.ca_only && self.token.ca_file.is_none() {
            p.add(
                "token.ca_only",
                "requires token.ca_file (the only CA to trust)",
            );
        }
        for (i, r) in self.route.iter().enumerate() {
            if r.ca_only && r.ca_file.is_none() {
                p.add(
                    format!("route[{i}].ca_only"),
                    "requires ca_file (the only CA to trust)",
                );
            }
        }
    }

    fn validate_routes(&self, p: &mut Problems) {
        if self.route.is_empty() {
            p.add("route", "at least one [[route]] is required");
        }
        let mut names = std::collections::HashSet::new();
        let mut listens = std::collections::HashSet::new();
        let mut matchers = std::collections::HashSet::new();
        for (i, r) in self.route.iter().enumerate() {
            let k = |field: &str| format!("route[{i}].{field}");
            if r.name.trim().is_empty() {
                p.add(k("name"), "must not be empty");
            } else if !names.insert(r.name.as_str()) {
                p.add(k("name"), format!("duplicate route name {:?}", r.name));
            }
            if r.listen.is_none() && r.host.is_none() && r.path_prefix.is_none() {
                p.add(
                    k("listen"),
                    "a route needs at least one of listen, host, path_prefix",
                );
            }
            if let Some(addr) = r.listen {
                if addr.port() == 0 {
                    // Port 0 asks the kernel for a free port: never a clash.
                } else if addr == self.proxy.listen || addr == self.admin.listen {
                    p.add(
                        k("listen"),
                        "must differ from proxy.listen and admin.listen",
                    );
                } else if !listens.insert(addr) {
                    p.add(k("listen"), format!("{addr} is used by another route"));
                }
            }
            if let Some(h) = &r.host
                && (h.is_empty() || h.contains('/') || h.contains(char::is_whitespace))
            {
                p.add(k("host"), "must be a host name (optionally with :port)");
            }
            if let Some(prefix) = &r.path_prefix
                && !prefix.starts_with('/')
            {
                p.add(k("path_prefix"), "must start with '/'");
            }
            if r.strip_prefix && r.path_prefix.is_none() {
                p.add(k("strip_prefix"), "needs path_prefix");
            }
            if r.listen.is_none() {
                let key = (
                    r.host.as_deref().map(str::to_ascii_lowercase),
                    r.path_prefix.clone(),
                );
                if !matchers.insert(key) {
                    p.add(
                        k("path_prefix"),
                        "another route on the main listener has the same host and path_prefix",
                    );
                }
            }
            // A wildcard route's `{host}`/`{label}` upstream is checked as a request fills it.
            match Url::parse(&super::wildcard::sample_upstream(r)) {
                Err(e) => p.add(k("upstream"), format!("not a valid URL: {e}")),
                Ok(u) => {
                    match u.scheme() {
                        "https" => {}
                        "http" if r.allow_insecure_upstream => {}
                        "http" => p.add(
                            k("upstream"),
                            "plain http:// would send the bearer token in clear text; use https:// or set allow_insecure_upstream = true on this route",
                        ),
                        s => p.add(
                            k("upstream"),
                            format!("scheme {s:?} is not supported; use https://"),
                        ),
                    }
                    if u.host_str().is_none_or(str::is_empty) {
                        p.add(k("upstream"), "has no host");
                    }
                    if u.query().is_some() || u.fragment().is_some() {
                        p.add(k("upstream"), "must not have a query or fragment");
                    }
                    if !u.username().is_empty() || u.password().is_some() {
                        p.add(k("upstream"), "must not carry user info");
                    }
                }
            }
            for (j, s) in r.scope.iter().enumerate() {
                if !is_scope_token(s) {
                    p.add(
                        format!("route[{i}].scope[{j}]"),
                        "must be a non-empty scope without spaces, quotes or backslashes (RFC 6749 §3.3)",
                    );
                }
            }
            for (j, a) in r.audience.iter().enumerate() {
                if a.is_empty() || a.contains(char::is_whitespace) {
                    p.add(
                        format!("route[{i}].audience[{j}]"),
                        "must be non-empty and contain no whitespace",
                    );
                }
            }
            for (key, d) in [
                ("connect_timeout", r.connect_timeout),
                ("timeout", r.timeout),
            ] {
                if d.is_zero() {
                    p.add(k(key), "must be greater than zero");
                }
            }
            if let Some(f) = &r.ca_file {
                check_ca_file(p, &k("ca_file"), f);
            }
        }
    }
}

impl Config {
    /// Per-request targets and wildcard host routes (docs/spec.md §4): allow-lists are valid
    /// patterns (scopes also scope tokens), at most [`MAX_ALLOW`] each; a wildcard host is
    /// `*.NAME` or `**.NAME` on the main listener; `{host}`/`{label}` appear only on wildcard
    /// routes, and in `upstream` only in its authority.
    fn validate_route_targets(&self, p: &mut Problems) {
        use super::pattern::Pattern;
        use super::wildcard::{HostPattern, Template, has_braces, placeholders_only_in_authority};
        for (i, r) in self.route.iter().enumerate() {
            let k = |field: &str| format!("route[{i}].{field}");
            for (field, list) in [
                ("allow_audiences", &r.allow_audiences),
                ("allow_scopes", &r.allow_scopes),
            ] {
                if list.len() > MAX_ALLOW {
                    p.add(k(field), format!("at most {MAX_ALLOW} entries"));
                }
                for (j, entry) in list.iter().enumerate() {
                    let key = format!("route[{i}].{field}[{j}]");
                    if let Err(e) = Pattern::parse(entry) {
                        p.add(key, format!("not a valid pattern: it {e}"));
                    } else if field == "allow_scopes" && !is_scope_token(entry) {
                        p.add(
                            key,
                            "must be a scope without spaces, quotes or backslashes (RFC 6749 §3.3), `*` allowed",
                        );
                    }
                }
            }
            let wildcard = match r.host.as_deref().and_then(HostPattern::parse) {
                Some(Err(why)) => {
                    p.add(k("host"), why);
                    false
                }
                Some(Ok(_)) => true,
                None => {
                    if r.host.as_deref().is_some_and(|h| h.contains('*')) {
                        p.add(
                            k("host"),
                            "`*` is allowed only as the first label: `*.` or `**.`",
                        );
                    }
                    false
                }
            };
            if wildcard && r.listen.is_some() {
                p.add(
                    k("host"),
                    "a wildcard host is matched on the main listener only; drop listen",
                );
            }
            let mut check = |key: String, value: &str| {
                if !has_braces(value) {
                    return;
                }
                if !wildcard {
                    p.add(
                        key,
                        "{host} and {label} need a wildcard host (host = \"*.NAME\" or \"**.NAME\")",
                    );
                } else if let Err(e) = Template::parse(value) {
                    p.add(key, e);
                }
            };
            check(k("upstream"), &r.upstream);
            for (j, s) in r.scope.iter().enumerate() {
                check(format!("route[{i}].scope[{j}]"), s);
            }
            for (j, a) in r.audience.iter().enumerate() {
                check(format!("route[{i}].audience[{j}]"), a);
            }
            if wildcard && !placeholders_only_in_authority(&r.upstream) {
                p.add(
                    k("upstream"),
                    "{host} and {label} may only stand in the URL's authority (scheme://HOST:PORT)",
                );
            }
        }
    }

    /// `token.cache_capacity` / `token.cache_idle_timeout` (docs/spec.md §3): a cache that
    /// holds nothing, or drops a key at once, would evict every run-time key before its first
    /// token arrived.
    fn validate_cache(&self, p: &mut Problems) {
        if self.token.cache_capacity == 0 {
            p.add("token.cache_capacity", "must be at least 1");
        }
        if self.token.cache_idle_timeout < std::time::Duration::from_secs(1) {
            p.add("token.cache_idle_timeout", "must be at least 1s");
        }
    }
}

/// Longest `[[client]]` name: it is a metric label and a log field.
const MAX_CLIENT_NAME: usize = 64;

impl Config {
    /// `[[client]]` and `route.client` (docs/spec.md §2): names unique, short and plain (they
    /// are metric labels), `default` left to `[token]`; every client's token settings checked
    /// by exactly the `[token]` rules, each problem reported under `client[i].KEY`; a route
    /// naming a client that does not exist is a problem of `route[i].client`.
    fn validate_clients(&self, p: &mut Problems) {
        use crate::token::registry::DEFAULT_CLIENT;
        let mut names = std::collections::HashSet::new();
        for (i, c) in self.client.iter().enumerate() {
            let prefix = format!("client[{i}].");
            let n = &c.name;
            let plain = n
                .chars()
                .all(|ch| ch.is_ascii_alphanumeric() || matches!(ch, '-' | '_' | '.'));
            if n.is_empty() || n.len() > MAX_CLIENT_NAME || !plain {
                p.add(
                    format!("{prefix}name"),
                    format!("must be 1 to {MAX_CLIENT_NAME} characters of A-Z a-z 0-9 - _ ."),
                );
            } else if n == DEFAULT_CLIENT {
                p.add(
                    format!("{prefix}name"),
                    "\"default\" is the [token] section's client; pick another name",
                );
            } else if !names.insert(n.as_str()) {
                p.add(
                    format!("{prefix}name"),
                    format!("duplicate client name {n:?}"),
                );
            }
            // The same rules as [token], run on a config whose [token] is this client; only
            // the token's own problems are kept, renamed to this client's keys.
            let alone = Config {
                token: c.token.clone(),
                route: Vec::new(),
                client: Vec::new(),
                ..self.clone()
            };
            let mut found = Problems::default();
            alone.validate_token(&mut found);
            alone.validate_client_certs(&mut found);
            alone.validate_cache(&mut found);
            found.0.extend(super::bounds::problems(&alone));
            for problem in found.0 {
                if let Some(field) = problem.key.strip_prefix("token.") {
                    p.add(
                        format!("{prefix}{field}"),
                        problem.message.replace("token.", &prefix),
                    );
                }
            }
        }
        for (i, r) in self.route.iter().enumerate() {
            if let Some(name) = &r.client
                && name != DEFAULT_CLIENT
                && !self.client.iter().any(|c| &c.name == name)
            {
                p.add(
                    format!("route[{i}].client"),
                    format!("no [[client]] is named {name:?} (\"default\" is [token])"),
                );
            }
        }
    }
}

impl Config {
    /// RFC 8705 client certificates (token side and per route): set in pairs, loadable, the
    /// key matching the certificate, and only over TLS. A bad pair is named by the key at fault.
    fn validate_client_certs(&self, p: &mut Problems) {
        let t = &self.token;
        let mtls_method = matches!(
            t.auth_method,
            AuthMethod::TlsClientAuth | AuthMethod::SelfSignedTlsClientAuth
        );
        if mtls_method {
            if t.client_cert_file.is_none() {
                p.add(
                    "token.client_cert_file",
                    "required when auth_method is tls_client_auth or self_signed_tls_client_auth",
                );
            }
            let (key, url) = match t.endpoint() {
                super::EndpointSource::Fixed(u) => ("token.token_url", u),
                super::EndpointSource::Issuer(i) => ("token.issuer", i),
            };
            if is_plain_http(url) {
                p.add(
                    key,
                    "a client certificate needs TLS: use https:// with an mTLS auth_method",
                );
            }
        }
        check_pair(
            p,
            ("token.client_cert_file", t.client_cert_file.as_deref()),
            ("token.client_key_file", t.client_key_file.as_deref()),
        );
        let clients = self.clients();
        for (i, r) in self.route.iter().enumerate() {
            let k = |field: &str| format!("route[{i}].{field}");
            // The route presents its own client's certificate (`route.client`).
            let t = r
                .client
                .as_deref()
                .and_then(|n| clients.iter().find(|(c, _)| *c == n))
                .map_or(t, |(_, t)| *t);
            if r.use_token_client_cert {
                if t.client_cert_file.is_none() {
                    p.add(
                        k("use_token_client_cert"),
                        "needs token.client_cert_file and token.client_key_file",
                    );
                }
                if r.client_cert_file.is_some() || r.client_key_file.is_some() {
                    p.add(
                        k("use_token_client_cert"),
                        "set either use_token_client_cert or client_cert_file/client_key_file, not both",
                    );
                }
            }
            let presents = r.use_token_client_cert || r.client_cert_file.is_some();
            if presents && is_plain_http(&r.upstream) {
                p.add(
                    k("upstream"),
                    "a client certificate needs TLS: use https:// or drop the route's client certificate",
                );
            }
            check_pair(
                p,
                (&k("client_cert_file"), r.client_cert_file.as_deref()),
                (&k("client_key_file"), r.client_key_file.as_deref()),
            );
        }
    }
}

/// A certificate/key file pair: both or neither, and when both, loadable and matching.
fn check_pair(p: &mut Problems, cert: (&str, Option<&Path>), key: (&str, Option<&Path>)) {
    match (cert.1, key.1) {
        (None, None) => {}
        (Some(_), None) => p.add(key.0, format!("required with {}", cert.0)),
        (None, Some(_)) => p.add(cert.0, format!("required with {}", key.0)),
        (Some(c), Some(k)) => {
            if let Err(e) = crate::token::mtls::ClientIdentity::load(c, k) {
                let at = if e.is_key_problem() { key.0 } else { cert.0 };
                p.add(at, e.to_string());
            }
        }
    }
}

/// Form parameters the token client writes itself.
const RESERVED_PARAMS: &[&str] = &[
    "grant_type",
    "client_id",
    "client_secret",
    "client_assertion",
    "client_assertion_type",
    "scope",
    "audience",
    "resource",
];

/// Most entries in one route's `allow_audiences` or `allow_scopes`: each value of a request
/// is matched against every entry.
const MAX_ALLOW: usize = 64;

/// RFC 6749 §3.3: `scope-token = 1*( %x21 / %x23-5B / %x5D-7E )`.
fn is_scope_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b == 0x21 || (0x23..=0x5B).contains(&b) || (0x5D..=0x7E).contains(&b))
}

/// `name[:port]` or `[v6][:port]`, as a Host header carries it; the port is 1–65535.
fn is_host_entry(s: &str) -> bool {
    let (name, port) = match s.strip_prefix('[') {
        Some(rest) => match rest.split_once(']') {
            Some((v6, after))
                if !v6.is_empty()
                    && v6
                        .bytes()
                        .all(|b| b.is_ascii_hexdigit() || b == b':' || b == b'.') =>
            {
                (None, after)
            }
            _ => return false,
        },
        None => match s.split_once(':') {
            Some((name, _)) => (Some(name), &s[name.len()..]),
            None => (Some(s), ""),
        },
    };
    let name_ok = name.is_none_or(|n| {
        !n.is_empty()
            && !n.starts_with('.')
            && n.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_')
    });
    let port_ok = port.is_empty()
        || port.strip_prefix(':').is_some_and(|p| {
            p.bytes().all(|b| b.is_ascii_digit()) && p.parse::<u16>().is_ok_and(|p| p > 0)
        });
    name_ok && port_ok
}

/// The token URL or the issuer: https (or allowed http), no user info, no fragment.
fn check_endpoint_url(p: &mut Problems, t: &TokenConfig, key: &str, url: &str) {
    match Url::parse(url) {
        Err(e) => p.add(key, format!("not a valid URL: {e}")),
        Ok(u) => {
            match u.scheme() {
                "https" => {}
                "http" if t.allow_insecure_token_url => {}
                "http" => p.add(
                    key,
                    "plain http:// would send client credentials in clear text; use https:// or set token.allow_insecure_token_url = true",
                ),
                s => p.add(key, format!("scheme {s:?} is not supported; use https://")),
            }
            check_token_url_parts(p, key, &u);
        }
    }
}

fn check_readable(p: &mut Problems, key: &str, path: &Path) {
    if let Err(e) = std::fs::metadata(path) {
        p.add(key, format!("cannot read {}: {e}", path.display()));
    }
}

/// `token_url` may carry a query (Azure AD B2C names its policy in `?p=`), which is why it is
/// shown redacted everywhere; user info and fragments have no place in it. The messages do not
/// echo the URL: what they refuse is what must not be shown.
fn check_token_url_parts(p: &mut Problems, key: &str, u: &Url) {
    if !u.username().is_empty() || u.password().is_some() {
        p.add(
            key,
            "must not carry user info (name:secret@ before the host); put the client secret in token.client_secret_file",
        );
    }
    if u.fragment().is_some() {
        p.add(key, "must not have a fragment (#...)");
    }
}

/// Loads the signing key exactly as the token client will (size bound, format, key type,
/// `signing_alg`), so that an unusable key is a configuration problem reported with the others
/// (exit 2), not a start-up failure.
fn check_key_file(p: &mut Problems, t: &TokenConfig, path: &Path) {
    // An unknown signing_alg is reported under its own key; the file is still checked.
    let alg = t.signing_alg.as_deref().and_then(crate::key::parse_alg);
    let key_id = match t.key_id.as_deref() {
        Some(k) if k.trim().is_empty() => {
            p.add("token.key_id", "must not be empty when set");
            None
        }
        other => other.map(str::to_owned),
    };
    if let Err(e) = crate::key::KeySource::load(path, alg, key_id) {
        p.add("token.private_key_file", e.to_string());
    }
}

fn check_ca_file(p: &mut Problems, key: &str, path: &Path) {
    match crate::tls::load_certs(path) {
        Ok(certs) if certs.is_empty() => {
            p.add(key, format!("{} holds no PEM certificates", path.display()))
        }
        Ok(_) => {}
        Err(e) => p.add(key, e.to_string()),
    }
}

/// Whether `url` parses with the `http` scheme (the parser lowercases it: `HTTP://` too).
fn is_plain_http(url: &str) -> bool {
    Url::parse(url).is_ok_and(|u| u.scheme() == "http")
}

/// The listeners' hardening limits (docs/spec.md §6): none may be zero, which would switch a
/// protection off or refuse everything.
impl Config {
    /// `[token_endpoint]` (docs/spec.md, token endpoint). Which names `clients` may hold is
    /// checked when the clients are built (`Sidecar::bind`), where every client is known.
    fn validate_token_endpoint(&self, p: &mut Problems) {
        let te = &self.token_endpoint;
        if let Some(addr) = te.listen {
            // Tokens are handed out without client authentication: only the pod may ask.
            if !addr.ip().is_loopback() {
                p.add(
                    "token_endpoint.listen",
                    format!(
                        "must be a loopback address (127.0.0.1 or [::1]), not {addr}: the endpoint hands out tokens without client authentication"
                    ),
                );
            }
            if addr.port() != 0 && (addr == self.proxy.listen || addr == self.admin.listen) {
                p.add(
                    "token_endpoint.listen",
                    "must differ from proxy.listen and admin.listen",
                );
            }
        }
        for (key, list) in [
            ("token_endpoint.allow_scopes", &te.allow_scopes),
            ("token_endpoint.allow_audiences", &te.allow_audiences),
        ] {
            for (i, s) in list.iter().enumerate() {
                if let Err(e) = super::pattern::Pattern::parse(s) {
                    p.add(format!("{key}[{i}]"), format!("{s:?} {e}"));
                }
            }
        }
        for (i, name) in te.clients.iter().enumerate() {
            if name.trim().is_empty() {
                p.add(format!("token_endpoint.clients[{i}]"), "must not be empty");
            }
        }
        if te.max_connections == 0 {
            p.add("token_endpoint.max_connections", "must be at least 1");
        }
        if te.body_read_timeout.is_zero() {
            p.add(
                "token_endpoint.body_read_timeout",
                "must be greater than zero",
            );
        }
    }
}

fn server_limits(c: &Config, p: &mut Problems) {
    // Upper bounds are in bounds.rs with every other key's.
    for (key, d) in [
        ("proxy.body_read_timeout", c.proxy.body_read_timeout),
        ("admin.header_read_timeout", c.admin.header_read_timeout),
    ] {
        if d.is_zero() {
            p.add(key, "must be greater than zero");
        }
    }
    // The upper bound (1000: each stream may hold a request head, §6) is in bounds.rs.
    if c.proxy.max_concurrent_streams == 0 {
        p.add("proxy.max_concurrent_streams", "must be at least 1");
    }
    if c.admin.max_connections == 0 {
        p.add("admin.max_connections", "must be at least 1");
    }
    if c.admin.max_connections_per_peer == 0
        || c.admin.max_connections_per_peer > c.admin.max_connections
    {
        p.add(
            "admin.max_connections_per_peer",
            "must be at least 1 and at most admin.max_connections",
        );
    }
}

#[cfg(test)]
mod tests {
    use super::super::from_toml_str;
    use super::*;

    #[test]
    fn the_token_endpoint_listens_on_loopback_only_with_valid_patterns() {
        let with =
            |section: &str| format!("{}\n[token_endpoint]\n{section}", super::super::MINIMAL);
        for ok in [
            "listen = \"127.0.0.1:8081\"",
            "listen = \"[::1]:8081\"",
            "listen = \"127.0.0.2:0\"\nallow_scopes = [\"orders:*\"]",
        ] {
            assert!(from_toml_str(&with(ok)).is_ok(), "{ok}");
        }
        let err = from_toml_str(&with(
            "listen = \"0.0.0.0:8081\"\nallow_scopes = [\"*\", \"a b\"]\nallow_audiences = [\"\"]\nclients = [\" \"]\nmax_connections = 0\nbody_read_timeout = \"0s\"",
        ))
        .unwrap_err();
        let keys: Vec<&str> = err.problems.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "token_endpoint.listen",
                "token_endpoint.allow_scopes[0]",
                "token_endpoint.allow_scopes[1]",
                "token_endpoint.allow_audiences[0]",
                "token_endpoint.clients[0]",
                "token_endpoint.max_connections",
                "token_endpoint.body_read_timeout",
            ]
        );
        let err = from_toml_str(&with("listen = \"10.0.0.1:8081\"")).unwrap_err();
        assert!(err.to_string().contains("loopback"), "{err}");
    }

    #[test]
    fn every_problem_is_reported_with_its_key() {
        let text = r#"
[token]
token_url = "http://idp.example.com/token"
client_id = ""
refresh_at = 1.5

[[route]]
name = "a"
upstream = "http://orders.example.com"
scope = ["has space"]

[[route]]
name = "a"
path_prefix = "nope"
upstream = "https://x.example.com"
"#;
        let err = from_toml_str(text).unwrap_err();
        let keys: Vec<&str> = err.problems.iter().map(|p| p.key.as_str()).collect();
        for want in [
            "token.token_url",
            "token.client_id",
            "token.private_key_file",
            "token.refresh_at",
            "route[0].listen",
            "route[0].upstream",
            "route[0].scope[0]",
            "route[1].name",
            "route[1].path_prefix",
        ] {
            assert!(keys.contains(&want), "missing {want} in {keys:?}");
        }
        assert_eq!(err.to_string().lines().count(), err.problems.len());
    }

    /// `token.issuer` replaces `token_url` (exactly one of the two), is checked like it, and
    /// `ca_only` needs the `ca_file` it pins to.
    #[test]
    fn issuer_and_token_url_are_exclusive_and_ca_only_needs_a_ca_file() {
        let with = |token: &str, route: &str| {
            format!(
                "[token]\n{token}\nclient_id = \"c\"\nauth_method = \"client_secret_post\"\nclient_secret = \"s\"\n\
                 [[route]]\nname = \"a\"\npath_prefix = \"/a/\"\nupstream = \"https://a.example.com\"\n{route}"
            )
        };
        let keys = |text: String| -> Vec<String> {
            match from_toml_str(&text) {
                Ok(_) => Vec::new(),
                Err(e) => e.problems.into_iter().map(|p| p.key).collect(),
            }
        };
        let c = from_toml_str(&with("issuer = \"https://hydra.example.com/\"", "")).unwrap();
        assert_eq!(
            c.token.endpoint(),
            super::super::EndpointSource::Issuer("https://hydra.example.com/")
        );
        assert_eq!(keys(with("", "")), ["token.token_url"]);
        assert_eq!(
            keys(with(
                "issuer = \"https://i.example.com\"\ntoken_url = \"https://i.example.com/t\"",
                ""
            )),
            ["token.issuer"]
        );
        assert_eq!(
            keys(with("issuer = \"http://i.example.com\"", "")),
            ["token.issuer"]
        );
        assert_eq!(
            keys(with("issuer = \"https://i.example.com/?tenant=x\"", "")),
            ["token.issuer"]
        );
        assert_eq!(
            keys(with(
                "issuer = \"https://i.example.com\"\ndiscovery_refresh_interval = \"0s\"",
                ""
            )),
            ["token.discovery_refresh_interval"]
        );
        assert_eq!(
            keys(with(
                "token_url = \"https://i.example.com/t\"\nca_only = true",
                "ca_only = true"
            )),
            ["token.ca_only", "route[0].ca_only"]
        );
    }

    /// A private_key_jwt config whose key file holds `contents`, with `extra` under `[token]`.
    fn with_key(dir: &Path, contents: &[u8], extra: &str) -> Result<Config, ConfigError> {
        let path = dir.join("key.pem");
        std::fs::write(&path, contents).unwrap();
        from_toml_str(&format!(
            "[token]\ntoken_url = \"https://idp.example.com/t\"\nclient_id = \"c\"\n\
             private_key_file = {:?}\n{extra}\n[[route]]\nname = \"r\"\n\
             path_prefix = \"/\"\nupstream = \"https://r.example.com\"\n",
            path.display().to_string()
        ))
    }

    #[test]
    fn an_unusable_key_file_is_a_problem_of_private_key_file() {
        let dir = tempfile::tempdir().unwrap();
        let fixture = |name: &str| {
            std::fs::read(
                Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join("tests/fixtures/keys")
                    .join(name),
            )
            .unwrap()
        };
        with_key(dir.path(), &fixture("ec_p256_sec1.pem"), "").unwrap();
        let cases: [(&str, &[u8], &str, &str); 5] = [
            ("garbage", b"hello", "", "not a private key"),
            (
                "encrypted",
                b"-----BEGIN ENCRYPTED PRIVATE KEY-----\nAAAA\n-----END ENCRYPTED PRIVATE KEY-----\n",
                "",
                "encrypted",
            ),
            (
                "a certificate, not a key",
                b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
                "",
                "no private key",
            ),
            ("a symmetric JWK", br#"{"kty":"oct","k":"c2VjcmV0"}"#, "", "unsupported key"),
            (
                "a key that does not fit signing_alg",
                &fixture("ec_p256_sec1.pem"),
                "signing_alg = \"RS256\"",
                "does not fit",
            ),
        ];
        for (what, contents, extra, says) in cases {
            let err = with_key(dir.path(), contents, extra).unwrap_err();
            assert_eq!(err.problems.len(), 1, "{what}: {err}");
            assert_eq!(
                err.problems[0].key, "token.private_key_file",
                "{what}: {err}"
            );
            assert!(err.problems[0].message.contains(says), "{what}: {err}");
        }
        let err = with_key(dir.path(), &fixture("ec_p256_sec1.pem"), "key_id = \" \"").unwrap_err();
        assert_eq!(err.problems[0].key, "token.key_id", "{err}");
    }

    #[test]
    fn token_url_user_info_and_fragment_are_refused_without_echoing_them() {
        for url in [
            "https://user:pass@idp.example.com/t",
            "https://idp.example.com/t#pass",
        ] {
            let text = super::super::MINIMAL.replace("https://idp.example.com/oauth2/token", url);
            let err = from_toml_str(&text).unwrap_err();
            assert_eq!(err.problems[0].key, "token.token_url", "{err}");
            assert!(!err.to_string().contains("pass"), "{err}");
        }
        // A query is allowed (Azure AD B2C: `?p=<policy>`); it is shown redacted instead.
        let text = super::super::MINIMAL.replace(
            "https://idp.example.com/oauth2/token",
            "https://idp.example.com/t?p=b2c_1_policy",
        );
        from_toml_str(&text).unwrap();
    }

    #[test]
    fn min_refetch_interval_is_between_zero_and_the_gate_cap() {
        for (value, ok) in [
            ("0s", false),
            ("1ms", true),
            ("10s", true),
            ("5m", true),
            ("301s", false),
        ] {
            let text = format!(
                "{}\n",
                super::super::MINIMAL.replace(
                    "[token]",
                    &format!("[token]\nmin_refetch_interval = \"{value}\""),
                )
            );
            let keys: Vec<String> = match from_toml_str(&text) {
                Ok(_) => Vec::new(),
                Err(e) => e.problems.into_iter().map(|p| p.key).collect(),
            };
            assert_eq!(
                !keys.contains(&"token.min_refetch_interval".to_string()),
                ok,
                "{value}: {keys:?}"
            );
        }
    }

    #[test]
    fn allowed_hosts_are_host_names() {
        for good in [
            "client.internal",
            "Client.Internal:8080",
            "10.0.0.7",
            "[fd00::1]:443",
            "[::1]",
            "svc.ns.svc.cluster.local.",
        ] {
            assert!(is_host_entry(good), "{good}");
        }
        for bad in [
            "",
            "http://client.internal",
            "client.internal/",
            "*.internal",
            "a b",
            "client.internal:",
            "client.internal:0",
            "client.internal:70000",
            "client.internal:80:80",
            "[::1",
            "[]:80",
            ".internal",
        ] {
            assert!(!is_host_entry(bad), "{bad}");
        }
        let text = "[proxy]\nallowed_hosts = [\"ok.internal\", \"http://x\"]\n[token]\ntoken_url = \"https://idp.example.com/t\"\nclient_id = \"c\"\nauth_method = \"client_secret_post\"\nclient_secret = \"s\"\n[[route]]\nname = \"a\"\npath_prefix = \"/a/\"\nupstream = \"https://a.example.com\"\n";
        let err = from_toml_str(text).unwrap_err();
        let keys: Vec<&str> = err.problems.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(keys, ["proxy.allowed_hosts[1]"]);
    }

    #[test]
    fn scope_tokens_follow_rfc6749() {
        assert!(is_scope_token("orders:read"));
        assert!(!is_scope_token(""));
        assert!(!is_scope_token("a b"));
        assert!(!is_scope_token("a\"b"));
        assert!(!is_scope_token("a\\b"));
    }

    #[test]
    fn the_listener_limits_are_bounded() {
        let text = r#"
[proxy]
body_read_timeout = "0s"
max_concurrent_streams = 0

[admin]
max_connections = 10
max_connections_per_peer = 11
header_read_timeout = "5m"

[token]
token_url = "https://idp.example.com/token"
client_id = "c"
auth_method = "client_secret_post"
client_secret = "s"

[[route]]
name = "a"
path_prefix = "/a/"
upstream = "https://a.example.com"
"#;
        let err = from_toml_str(text).unwrap_err();
        let mut keys: Vec<&str> = err.problems.iter().map(|p| p.key.as_str()).collect();
        keys.sort_unstable();
        // One problem per key: the zero checks here and the upper bounds in bounds.rs.
        assert_eq!(
            keys,
            [
                "admin.header_read_timeout",
                "admin.max_connections_per_peer",
                "proxy.body_read_timeout",
                "proxy.max_concurrent_streams",
            ]
        );
    }

    #[test]
    fn an_assertion_valid_for_more_than_an_hour_is_refused() {
        let with = |lifetime: &str, skew: &str| {
            from_toml_str(&super::super::MINIMAL.replace(
                "[token]\n",
                &format!(
                    "[token]\nassertion_lifetime = \"{lifetime}\"\nclock_skew_tolerance = \"{skew}\"\n"
                ),
            ))
        };
        assert!(with("59m", "1m").is_ok());
        let err = with("1h", "30s").unwrap_err();
        assert!(
            err.problems
                .iter()
                .any(|p| p.key == "token.assertion_lifetime" && p.message.contains("1h")),
            "{err}"
        );
    }

    #[test]
    fn upper_case_http_still_counts_as_plain_http() {
        assert!(is_plain_http("HTTP://idp.example.com/token"));
        assert!(is_plain_http("http://idp.example.com/token"));
        assert!(!is_plain_http("https://idp.example.com/token"));
        assert!(!is_plain_http("not a url"));
    }

    #[test]
    fn client_assertion_file_needs_its_path_and_a_uri_type() {
        let base = super::super::MINIMAL.replace(
            "auth_method = \"client_secret_post\"\nclient_secret = \"hunter2\"",
            "auth_method = \"client_assertion_file\"",
        );
        let err = super::super::from_toml_str(&base).unwrap_err().to_string();
        assert!(
            err.contains("token.client_assertion_file: required"),
            "{err}"
        );
        // The file need not exist yet (the platform writes it); the type must be a URI.
        let ok = base.replace(
            "auth_method = \"client_assertion_file\"",
            "auth_method = \"client_assertion_file\"\nclient_assertion_file = \"/nonexistent/token\"",
        );
        super::super::from_toml_str(&ok).unwrap();
        let bad = ok.replace(
            "client_assertion_file = ",
            "client_assertion_type = \"jwt bearer\"\nclient_assertion_file = ",
        );
        let err = super::super::from_toml_str(&bad).unwrap_err().to_string();
        assert!(
            err.contains("token.client_assertion_type: must be an absolute URI"),
            "{err}"
        );
        let spiffe = ok.replace(
            "client_assertion_file = ",
            "client_assertion_type = \"urn:ietf:params:oauth:client-assertion-type:jwt-spiffe\"\nclient_assertion_file = ",
        );
        super::super::from_toml_str(&spiffe).unwrap();
        // A path set for another method is a mistake, not silently ignored.
        let stray = super::super::MINIMAL.replace(
            "client_secret = \"hunter2\"",
            "client_secret = \"hunter2\"\nclient_assertion_file = \"/x\"",
        );
        let err = super::super::from_toml_str(&stray).unwrap_err().to_string();
        assert!(
            err.contains("token.client_assertion_file: only used with"),
            "{err}"
        );
    }

    /// The keys of every problem a route block adds to MINIMAL's token section.
    fn route_problems(routes: &str) -> Vec<String> {
        let text = format!(
            "[token]\ntoken_url = \"https://idp.example.com/t\"\nclient_id = \"c\"\n\
             auth_method = \"client_secret_post\"\nclient_secret = \"s\"\n{routes}"
        );
        match super::super::from_toml_str(&text) {
            Ok(_) => Vec::new(),
            Err(e) => e.problems.iter().map(|p| p.key.clone()).collect(),
        }
    }

    #[test]
    fn allow_lists_and_wildcard_routes_are_checked() {
        let ok = r#"
[[route]]
name = "a"
path_prefix = "/a/"
upstream = "https://a.example.com"
allow_audiences = ["https://*.svc.cluster.local/", "api://orders"]
allow_scopes = ["orders:*"]
[[route]]
name = "w"
host = "*.svc.cluster.local"
upstream = "https://{host}:8443/base"
audience = ["https://{host}/"]
scope = ["{label}:read"]
[[route]]
name = "m"
host = "**.mesh.internal"
upstream = "https://gateway.internal"
"#;
        assert_eq!(route_problems(ok), Vec::<String>::new());
        let bad = r#"
[[route]]
name = "a"
path_prefix = "/a/"
upstream = "https://{host}"
allow_audiences = ["", "*"]
allow_scopes = ["a\"b"]
audience = ["https://{host}/"]
[[route]]
name = "w"
host = "*.svc.cluster.local"
upstream = "https://x.example.com/{label}"
audience = ["https://{port}/"]
[[route]]
name = "d"
host = "*.svc.cluster.local"
listen = "127.0.0.1:0"
upstream = "https://x.example.com"
[[route]]
name = "s"
host = "api.*.example.com"
upstream = "https://x.example.com"
[[route]]
name = "i"
host = "*.127.0.0.1"
upstream = "https://x.example.com"
"#;
        let mut got = route_problems(bad);
        got.sort();
        got.dedup();
        assert_eq!(
            got,
            [
                "route[0].allow_audiences[0]",
                "route[0].allow_audiences[1]",
                "route[0].allow_scopes[0]",
                "route[0].audience[0]",
                "route[0].upstream",
                "route[1].audience[0]",
                "route[1].upstream",
                "route[2].host",
                "route[3].host",
                "route[4].host",
            ]
        );
    }
}
