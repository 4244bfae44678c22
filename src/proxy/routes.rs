//! Routes: which upstream and which token a downstream request gets.
//!
//! Matching (docs/spec.md §4): a route's dedicated `listen` port takes everything arriving on it. On the
//! main listener a route matches when its `host` (if set) equals the request's host and its
//! `path_prefix` (if set) is a path-segment prefix of the request path; among matches, a route
//! naming the host beats one that does not, then the longest prefix wins. A wildcard `host`
//! (`*.NAME`, `**.NAME`; config::wildcard) matches the request's host in strict DNS form only,
//! and ranks below an exact host, above no host.
//!
//! Everything here is pure and allocation-light: the table is built once from the config.

use std::sync::Arc;

use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderValue, Uri};

use super::targets::RouteTargets;
use super::upstream::Upstream;
use crate::config::RouteConfig;
use crate::config::pattern::Pattern;
use crate::config::wildcard::{HostPattern, Template, dns_name, has_braces};
use crate::metrics::RouteMetrics;
use crate::token::TokenKey;
use crate::token::cache::Slot;
use crate::token::registry::ClientTokens;

/// A route as the proxy uses it.
#[derive(Debug)]
pub struct Route {
    pub(crate) name: Arc<str>,
    /// The exact host the route names (normalized); `None` for path and wildcard routes.
    pub(crate) host: Option<String>,
    /// `host = "*.NAME"` / `"**.NAME"` (docs/spec.md §4, wildcard host routes).
    pub(crate) wildcard: Option<HostPattern>,
    pub(crate) path_prefix: Option<String>,
    /// Served on its own `listen` port only, never matched on the main listener.
    pub(crate) dedicated: bool,
    pub(crate) strip_prefix: bool,
    pub(crate) upstream_scheme: Scheme,
    pub(crate) upstream_authority: Authority,
    /// A wildcard route's upstream authority with `{host}`/`{label}`, filled per request.
    pub(crate) upstream_template: Option<Template>,
    /// `Host` header value for the upstream, prepared once.
    pub(crate) upstream_host: HeaderValue,
    /// The upstream URL's path without a trailing slash ("" for the root).
    pub(crate) upstream_base_path: String,
    /// Where this route's token comes from when the request chooses nothing; shared by routes
    /// with the same sets. `None` when the route's own sets have templates (every request then
    /// has its own key).
    pub(crate) slot: Option<Arc<Slot>>,
    /// The OAuth client whose run-time slots serve per-request keys.
    pub(crate) client: Arc<ClientTokens>,
    /// Allow-lists and templated defaults; `None` on a fixed route, whose requests all use
    /// `slot` without a lookup.
    pub(crate) targets: Option<Box<RouteTargets>>,
    /// The pooled client to this route's upstream.
    pub(crate) upstream: Upstream,
    /// Evict and replay on any 401, not only on a Bearer `invalid_token` challenge.
    pub retry_on_401: bool,
    pub(crate) metrics: RouteMetrics,
}

#[derive(Debug, thiserror::Error)]
#[error("route {route}: {message}")]
pub struct RouteError {
    pub(crate) route: String,
    pub(crate) message: String,
}

/// The key of the slot a route's requests use when they choose nothing, or `None` when the
/// route's `scope`/`audience` hold templates (validation allows them on wildcard routes only).
pub(crate) fn fixed_key(cfg: &RouteConfig) -> Option<TokenKey> {
    (!templated(cfg)).then(|| TokenKey::new(&cfg.scope, &cfg.audience))
}

fn templated(cfg: &RouteConfig) -> bool {
    cfg.scope.iter().chain(&cfg.audience).any(|v| has_braces(v))
}

/// Whether `cfg`'s host is a wildcard pattern (`*.` / `**.`), as [`Route::from_config`] reads it.
/// (Here, beside the code it describes, for the memory budget's test, `server/budget.rs`.)
#[cfg(test)]
pub(crate) fn is_wildcard(cfg: &RouteConfig) -> bool {
    cfg.host.as_deref().and_then(HostPattern::parse).is_some()
}

/// Whether the route's requests can use token keys not known at start (docs/spec.md §3): it has
/// a wildcard host, an allow-list, or templates. Exactly the routes [`Route::from_config`]
/// gives per-request targets or no fixed slot; their keys live in the client's run-time cache.
#[cfg(test)]
pub(crate) fn creates_runtime_keys(cfg: &RouteConfig) -> bool {
    is_wildcard(cfg)
        || !cfg.allow_audiences.is_empty()
        || !cfg.allow_scopes.is_empty()
        || templated(cfg)
}

impl Route {
    /// The route for `cfg`, taking its token from `slot` (see [`fixed_key`]) or `client`'s
    /// run-time slots and recording into `metrics`; `token` supplies the client certificate of
    /// a route with `use_token_client_cert`.
    pub(crate) fn from_config(
        cfg: &RouteConfig,
        token: &crate::config::TokenConfig,
        slot: Option<Arc<Slot>>,
        client: Arc<ClientTokens>,
        metrics: RouteMetrics,
        max_idle: usize,
    ) -> Result<Route, RouteError> {
        let err = |message: String| RouteError {
            route: cfg.name.clone(),
            message,
        };
        let wildcard = match cfg.host.as_deref().and_then(HostPattern::parse) {
            None => None,
            Some(Ok(p)) => Some(p),
            Some(Err(e)) => return Err(err(format!("host: {e}"))),
        };
        let template = |v: &str| Template::parse(v).map_err(|e| err(format!("{v:?}: {e}")));
        let upstream_template = match &wildcard {
            Some(_) if has_braces(&cfg.upstream) => {
                // Validation keeps placeholders in the authority; the rest is fixed.
                let rest = cfg.upstream.split_once("://").map_or("", |(_, r)| r);
                let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
                Some(template(&rest[..end])?)
            }
            _ => None,
        };
        let upstream_text = crate::config::wildcard::sample_upstream(cfg);
        let uri: Uri = upstream_text
            .parse()
            .map_err(|e| err(format!("upstream: {e}")))?;
        let scheme = uri
            .scheme()
            .cloned()
            .ok_or_else(|| err("upstream has no scheme".into()))?;
        let authority = uri
            .authority()
            .cloned()
            .ok_or_else(|| err("upstream has no host".into()))?;
        let upstream_host = HeaderValue::from_str(authority.as_str())
            .map_err(|e| err(format!("upstream host: {e}")))?;
        let scope = cfg
            .scope
            .iter()
            .map(|s| template(s))
            .collect::<Result<Vec<_>, _>>()?;
        let audience = cfg
            .audience
            .iter()
            .map(|a| template(a))
            .collect::<Result<Vec<_>, _>>()?;
        let templated = scope.iter().chain(&audience).any(Template::is_templated);
        let pattern = |p: &String| Pattern::parse(p).map_err(|e| err(format!("{p:?}: {e}")));
        let allow_audiences = cfg
            .allow_audiences
            .iter()
            .map(pattern)
            .collect::<Result<Vec<_>, _>>()?;
        let allow_scopes = cfg
            .allow_scopes
            .iter()
            .map(pattern)
            .collect::<Result<Vec<_>, _>>()?;
        let targets = (wildcard.is_some()
            || !allow_audiences.is_empty()
            || !allow_scopes.is_empty())
        .then(|| {
            Box::new(RouteTargets {
                allow_audiences,
                allow_scopes,
                scope,
                audience,
                templated,
            })
        });
        if slot.is_none() && !templated {
            return Err(err(
                "a route without templates needs its fixed token slot".into()
            ));
        }
        let identity = crate::token::mtls::load_route_identity(cfg, token)
            .map_err(|e| err(format!("client certificate: {e}")))?;
        let upstream = Upstream::new(cfg, identity, max_idle).map_err(|e| err(e.to_string()))?;
        Ok(Route {
            name: Arc::from(cfg.name.as_str()),
            host: cfg
                .host
                .as_deref()
                .filter(|_| wildcard.is_none())
                .map(normalize_host),
            wildcard,
            path_prefix: cfg.path_prefix.clone(),
            dedicated: cfg.listen.is_some(),
            strip_prefix: cfg.strip_prefix,
            upstream_scheme: scheme,
            upstream_authority: authority,
            upstream_template,
            upstream_host,
            upstream_base_path: uri.path().trim_end_matches('/').to_string(),
            slot,
            client,
            targets,
            upstream,
            retry_on_401: cfg.retry_on_401,
            metrics,
        })
    }

    /// The upstream URI for a downstream path and query.
    ///
    /// The path has already been checked by [`check_path`]; the result always starts with the
    /// upstream's base path, so a request cannot reach outside it.
    #[cfg(test)]
    pub(crate) fn upstream_uri(&self, path: &str, query: Option<&str>) -> Result<Uri, http::Error> {
        let target = match query {
            Some(q) => PathAndQuery::try_from(format!("{path}?{q}"))?,
            None => PathAndQuery::try_from(path)?,
        };
        self.upstream_uri_at(self.upstream_authority.clone(), Some(&target))
    }

    /// [`Route::upstream_uri`] onto `authority` (a wildcard route's, filled per request), for
    /// the request target's path and query (`None`: `/`).
    pub(crate) fn upstream_uri_at(
        &self,
        authority: Authority,
        target: Option<&PathAndQuery>,
    ) -> Result<Uri, http::Error> {
        let (path, query) = target.map_or(("/", None), |t| (t.path(), t.query()));
        let rest = match (&self.path_prefix, self.strip_prefix) {
            (Some(prefix), true) => strip_segment_prefix(path, prefix).unwrap_or(path),
            _ => path,
        };
        let pq = match target {
            // No base path and nothing stripped: the upstream's target is the request's own,
            // shared rather than copied and parsed again (two allocations a request).
            Some(t)
                if self.upstream_base_path.is_empty()
                    && rest.len() == path.len()
                    && path.starts_with('/') =>
            {
                t.clone()
            }
            _ => {
                let mut pq = String::with_capacity(
                    self.upstream_base_path.len()
                        + rest.len()
                        + 2
                        + query.map_or(0, |q| q.len() + 1),
                );
                pq.push_str(&self.upstream_base_path);
                if !rest.starts_with('/') {
                    pq.push('/');
                }
                pq.push_str(rest);
                if let Some(q) = query {
                    pq.push('?');
                    pq.push_str(q);
                }
                PathAndQuery::try_from(pq)?
            }
        };
        let mut uri = http::uri::Parts::default();
        uri.scheme = Some(self.upstream_scheme.clone());
        uri.authority = Some(authority);
        uri.path_and_query = Some(pq);
        Ok(Uri::from_parts(uri)?)
    }
}

/// The rest of `path` after `prefix`, when `prefix` matches on a segment boundary:
/// `/orders/` and `/orders` both match `/orders/42`; `/orders` does not match `/ordersX`.
pub(crate) fn strip_segment_prefix<'a>(path: &'a str, prefix: &str) -> Option<&'a str> {
    let rest = path.strip_prefix(prefix)?;
    if prefix.ends_with('/') || rest.is_empty() || rest.starts_with('/') {
        Some(rest)
    } else {
        None
    }
}

/// Why [`check_path`] refused a path; fixed texts, so nothing of the request is echoed.
const NOT_ORIGIN_FORM: &str = "the request path must start with '/'";
const DOT_SEGMENT: &str = "the request path must not contain '.' or '..' segments (in any spelling: ';params', percent-encoded)";
const EMPTY_SEGMENT: &str = "the request path must not contain empty segments ('//')";
const SEPARATOR: &str =
    "the request path must not contain backslashes or encoded '/' or '\\' (%2F, %5C)";
const CONTROL: &str = "the request path must not contain encoded control characters (%00-%1F, %7F)";
const BAD_ESCAPE: &str = "the request path has a malformed percent-escape";
const NOT_UTF8: &str =
    "the request path decodes to bytes that are not UTF-8 (e.g. overlong %C0%AE)";
const TOO_NESTED: &str = "the request path is percent-encoded more than three times over";

/// How many times a segment is percent-decoded while looking for a hidden dot segment or
/// separator: an upstream (or a chain of them) that decodes twice or three times still sees
/// what we checked. Deeper nesting is refused rather than followed.
const MAX_DECODES: usize = 3;

/// Rejects request paths that are not origin-form or whose segments some server behind the
/// upstream could read as a step out of the route's base path (docs/spec.md §5):
///
/// - a segment that is `.` or `..` (or only dots: Windows servers fold `...` to `..`), after
///   removing `;params` (Tomcat, Jetty and Spring read `..;x` as `..`), at every percent-decoding
///   level up to [`MAX_DECODES`] (`%2e%2e`, `.%2E`, `%252e%252e`, `..%3b`);
/// - an empty segment (`//`), which frameworks collapse or read as a scheme-relative URL;
/// - a backslash, raw or decoded, and a `/` hidden in a segment (`%2F`, `%252F`): servers that
///   decode before splitting would see more segments than we did. Refused, not passed through
///   re-encoded, because whether `%2F` is a separator differs from server to server;
/// - a decoded control character (`%00` truncates paths in C-based servers), a malformed escape
///   in the raw path (`%zz`, `%u002e`), or decoded bytes that are not UTF-8 (`%c0%ae`, an
///   overlong `.` that old decoders accept).
///
/// The common path (no `%`, `\`, `/.` or `//`) is accepted after one scan without allocating.
pub(crate) fn check_path(path: &str) -> Result<(), &'static str> {
    let bytes = path.as_bytes();
    if bytes.first() != Some(&b'/') {
        return Err(NOT_ORIGIN_FORM);
    }
    let suspicious = bytes.iter().enumerate().any(|(i, &b)| {
        b == b'%' || b == b'\\' || (i > 0 && bytes[i - 1] == b'/' && (b == b'.' || b == b'/'))
    });
    if !suspicious {
        return Ok(());
    }
    let mut segments = path[1..].split('/').peekable();
    while let Some(segment) = segments.next() {
        // A trailing slash leaves one empty last segment; that one is a directory, not a trick.
        if segment.is_empty() && segments.peek().is_some() {
            return Err(EMPTY_SEGMENT);
        }
        check_segment(segment)?;
    }
    Ok(())
}

/// One path segment, raw and after each round of percent-decoding.
fn check_segment(raw: &str) -> Result<(), &'static str> {
    if raw.contains('\\') {
        return Err(SEPARATOR);
    }
    let mut current: std::borrow::Cow<'_, [u8]> = std::borrow::Cow::Borrowed(raw.as_bytes());
    for level in 0..=MAX_DECODES {
        if level > 0 {
            if current.contains(&b'/') || current.contains(&b'\\') {
                return Err(SEPARATOR);
            }
            if current.iter().any(|&b| b < 0x20 || b == 0x7f) {
                return Err(CONTROL);
            }
            if std::str::from_utf8(&current).is_err() {
                return Err(NOT_UTF8);
            }
        }
        if is_dot_segment(&current) {
            return Err(DOT_SEGMENT);
        }
        // The raw path must be well-formed; a decoded level may hold a literal '%' ("100%25"
        // is "100%"), which later rounds keep as it is.
        let (next, malformed) = percent_decode(&current);
        if malformed && level == 0 {
            return Err(BAD_ESCAPE);
        }
        let Some(next) = next else {
            return Ok(());
        };
        if level == MAX_DECODES {
            return Err(TOO_NESTED);
        }
        current = std::borrow::Cow::Owned(next);
    }
    Err(TOO_NESTED)
}

/// `.`, `..` or only dots, once `;params` are removed and surrounding blanks trimmed.
fn is_dot_segment(segment: &[u8]) -> bool {
    let end = segment
        .iter()
        .position(|&b| b == b';')
        .unwrap_or(segment.len());
    let name = segment[..end].trim_ascii();
    !name.is_empty() && name.iter().all(|&b| b == b'.')
}

/// One round of percent-decoding: the decoded bytes (`None` when there was no valid `%XX`
/// escape), and whether a `%` not followed by two hex digits was seen (kept as it is).
fn percent_decode(input: &[u8]) -> (Option<Vec<u8>>, bool) {
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let mut out: Option<Vec<u8>> = None;
    let mut malformed = false;
    let mut i = 0;
    while i < input.len() {
        let b = input[i];
        if b == b'%' {
            let hi = input.get(i + 1).copied().and_then(hex);
            let lo = input.get(i + 2).copied().and_then(hex);
            if let (Some(hi), Some(lo)) = (hi, lo) {
                out.get_or_insert_with(|| input[..i].to_vec())
                    .push(hi << 4 | lo);
                i += 3;
                continue;
            }
            malformed = true;
        }
        if let Some(o) = &mut out {
            o.push(b);
        }
        i += 1;
    }
    (out, malformed)
}

/// Strips an optional port and a trailing dot, lowercases.
pub(crate) fn normalize_host(host: &str) -> String {
    host_without_port(host).to_ascii_lowercase()
}

/// The host part of a Host header value, without port or trailing dot, as a borrowed slice.
pub(crate) fn host_without_port(host: &str) -> &str {
    split_host_port(host).0
}

/// A Host-style value split into its name (trimmed, trailing dot removed, IPv6 literal kept in
/// brackets) and its port, when what follows the last `:` is all digits.
fn split_host_port(host: &str) -> (&str, Option<&str>) {
    let h = host.trim();
    let (name, port) = if h.starts_with('[') {
        // IPv6 literal: keep the brackets; a port may follow them.
        match h.find(']') {
            Some(end) => (
                &h[..=end],
                h[end + 1..]
                    .strip_prefix(':')
                    .filter(|p| p.bytes().all(|b| b.is_ascii_digit())),
            ),
            None => (h, None),
        }
    } else {
        match h.rsplit_once(':') {
            Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => (name, Some(port)),
            _ => (h, None),
        }
    };
    (name.trim_end_matches('.'), port.filter(|p| !p.is_empty()))
}

/// The loopback names of docs/spec.md §4, which every proxy listener answers on any port.
const LOOPBACK_NAMES: [&str; 3] = ["localhost", "127.0.0.1", "[::1]"];

/// How a request named its host (docs/spec.md §4); it decides what a miss is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum HostSource {
    /// An HTTP/1 absolute-form target: the client uses the sidecar as its forward proxy.
    AbsoluteForm,
    /// HTTP/2 `:authority`.
    Authority,
    /// The `Host` header.
    Header,
    /// None at all (HTTP/1.0 without `Host`): only a non-browser client can send that, so it
    /// counts as local.
    Absent,
}

/// The host a request names, and how it named it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RequestHost<'a> {
    pub(crate) value: Option<&'a str>,
    pub(crate) source: HostSource,
}

/// Why no route answers a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Miss {
    /// 404 `no_route`.
    NoRoute,
    /// 421 `misdirected_request`: the `Host` header names a machine the sidecar does not stand
    /// for (DNS rebinding, a mistyped name).
    Misdirected,
}

/// The hosts that count as "this machine" for path routes and dedicated listeners: the
/// loopback names and `proxy.allowed_hosts`. An entry without a port allows its name on any
/// port; an entry with one allows exactly that `name:port` (a request naming no port matches
/// only port-less entries). Names compare case-insensitively, without a trailing dot.
#[derive(Debug, Default)]
pub(crate) struct LocalHosts {
    /// (lowercase name, port) from `allowed_hosts`, which validation has checked.
    allowed: Vec<(String, Option<u16>)>,
}

impl LocalHosts {
    pub(crate) fn new(allowed: &[String]) -> LocalHosts {
        LocalHosts {
            allowed: allowed
                .iter()
                .map(|e| {
                    let (name, port) = split_host_port(e);
                    (name.to_ascii_lowercase(), port.and_then(|p| p.parse().ok()))
                })
                .collect(),
        }
    }

    /// Whether `name` (no port) is a loopback name or the name of an `allowed_hosts` entry,
    /// whatever its port: for `Origin`, where the port does not change the site.
    pub(crate) fn contains_name(&self, name: &str) -> bool {
        LOOPBACK_NAMES.iter().any(|l| l.eq_ignore_ascii_case(name))
            || self
                .allowed
                .iter()
                .any(|(n, _)| n.eq_ignore_ascii_case(name))
    }

    /// Whether `host` (a Host-style value, port optional) is a loopback name or allowed.
    pub(crate) fn contains(&self, host: &str) -> bool {
        let (name, port) = split_host_port(host);
        if LOOPBACK_NAMES.iter().any(|l| l.eq_ignore_ascii_case(name)) {
            return true;
        }
        let port: Option<u16> = match port.map(str::parse) {
            None => None,
            Some(Ok(p)) => Some(p),
            Some(Err(_)) => return false,
        };
        self.allowed
            .iter()
            .any(|(n, p)| n.eq_ignore_ascii_case(name) && (p.is_none() || *p == port))
    }
}

/// All routes, with an index of the main-listener ones and the hosts that count as local.
#[derive(Debug)]
pub(crate) struct RouteTable {
    pub(crate) routes: Vec<Route>,
    /// Indices of the routes without a dedicated `listen`.
    main: Vec<usize>,
    pub(crate) local: LocalHosts,
}

impl RouteTable {
    pub(crate) fn new(routes: Vec<Route>, allowed_hosts: &[String]) -> RouteTable {
        let main = (0..routes.len())
            .filter(|&i| !routes[i].dedicated)
            .collect();
        RouteTable {
            routes,
            main,
            local: LocalHosts::new(allowed_hosts),
        }
    }

    /// The route for a request on a route's own listener (`dedicated`, its index) or, when
    /// `None`, on the main listener (docs/spec.md §4).
    ///
    /// A host that is not local (loopback, `allowed_hosts`, or no host at all) reaches only the
    /// host routes naming it, and a dedicated route only when that route names it. A miss for
    /// such a host is 421 when the `Host` header named it (a browser sent the request somewhere
    /// it does not belong), else 404 (a proxy request for a host nothing here stands for). An
    /// absolute-form request reaches host routes only, whatever the path: a client with
    /// `HTTP_PROXY` set must not have its calls to other servers, loopback ones included,
    /// answered by a path route.
    pub(crate) fn resolve(
        &self,
        dedicated: Option<usize>,
        host: RequestHost<'_>,
        path: &str,
    ) -> Result<usize, Miss> {
        let local = host.value.is_none_or(|h| self.local.contains(h));
        let miss = || match host.source {
            HostSource::Header if !local => Miss::Misdirected,
            _ => Miss::NoRoute,
        };
        if let Some(i) = dedicated {
            let names_it = match (&self.routes[i].host, host.value) {
                (Some(want), Some(got)) => want.eq_ignore_ascii_case(host_without_port(got)),
                _ => false,
            };
            return if local || names_it {
                Ok(i)
            } else {
                Err(miss())
            };
        }
        let path_routes = local && host.source != HostSource::AbsoluteForm;
        self.match_main(host.value, path_routes, path)
            .ok_or_else(miss)
    }

    /// The best main-listener route for a request, by host then longest path prefix; routes
    /// without `host` take part only when `path_routes` is true.
    pub(crate) fn match_main(
        &self,
        host: Option<&str>,
        path_routes: bool,
        path: &str,
    ) -> Option<usize> {
        // Per request: compare borrowed slices; route hosts were normalized at start-up.
        let raw = host;
        let host = host.map(host_without_port);
        // The strict DNS form wildcards compare against, computed once and only when a
        // wildcard route is looked at.
        let mut name: Option<Option<String>> = None;
        let mut best: Option<(usize, (u8, usize, usize))> = None;
        for &i in &self.main {
            let r = &self.routes[i];
            let host_rank = match (&r.host, &r.wildcard, host) {
                (Some(want), _, Some(got)) if want.eq_ignore_ascii_case(got) => (2, 0),
                (Some(_), _, _) => continue,
                (None, Some(p), Some(_)) => {
                    let n = name.get_or_insert_with(|| raw.and_then(dns_name));
                    if n.as_deref().is_none_or(|n| p.matches(n).is_none()) {
                        continue;
                    }
                    (1, p.rank())
                }
                (None, Some(_), None) => continue,
                (None, None, _) if path_routes => (0, 0),
                (None, None, _) => continue,
            };
            let prefix_len = match &r.path_prefix {
                None => 0,
                Some(p) => match strip_segment_prefix(path, p) {
                    Some(_) => p.len(),
                    None => continue,
                },
            };
            let rank = (host_rank.0, host_rank.1, prefix_len);
            if best.is_none_or(|(_, b)| rank > b) {
                best = Some((i, rank));
            }
        }
        best.map(|(i, _)| i)
    }
}

/// What a wildcard route's request fills the templates with: the request host as a strict DNS
/// name and the part the wildcard matched. `None` for other routes, or a host that does not
/// match (routing would not have chosen the route).
pub(crate) fn wildcard_fill(route: &Route, raw_host: Option<&str>) -> Option<(String, usize)> {
    let p = route.wildcard.as_ref()?;
    let name = dns_name(raw_host?)?;
    let label_len = p.matches(&name)?.len();
    Some((name, label_len))
}

/// A table built from `[[route]]` TOML text, each route with its own unregistered metrics and
/// a slot of a cache that is never started: for the unit and property tests.
#[cfg(test)]
pub(crate) fn table(routes: &str) -> RouteTable {
    use crate::token::cache::{CacheBuilder, Policy};
    let cfg = crate::config::from_toml_str(&format!(
        "[token]\ntoken_url = \"https://idp.example.com/t\"\nclient_id = \"c\"\n\
         auth_method = \"client_secret_post\"\nclient_secret = \"s\"\n{routes}"
    ))
    .expect("route config is valid");
    let mut cache = CacheBuilder::new(Policy::from_config(&cfg.token));
    let fetcher = Arc::new(crate::token::client::TokenClient::new(&cfg.token).expect("client"));
    let client = Arc::new(ClientTokens::new(
        crate::token::registry::DEFAULT_CLIENT,
        cfg.token.clone(),
        fetcher,
        cache.fetch_duration().clone(),
        Vec::new(),
    ));
    let routes = cfg
        .route
        .iter()
        .map(|r| {
            let slot = fixed_key(r).map(|k| cache.slot(k));
            Route::from_config(
                r,
                &cfg.token,
                slot,
                client.clone(),
                RouteMetrics::unregistered(),
                cfg.proxy.max_connections,
            )
            .expect("route builds")
        })
        .collect();
    RouteTable::new(routes, &cfg.proxy.allowed_hosts)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROUTES: &str = r#"
[[route]]
name = "orders"
path_prefix = "/orders/"
upstream = "https://orders.example.com/api/"
strip_prefix = true
[[route]]
name = "orders-admin"
path_prefix = "/orders/admin"
upstream = "https://admin.example.com"
[[route]]
name = "billing-host"
host = "billing.example.com"
upstream = "https://billing.example.com"
[[route]]
name = "billing-v2"
host = "billing.example.com"
path_prefix = "/v2"
upstream = "https://billing2.example.com"
[[route]]
name = "dedicated"
listen = "127.0.0.1:18081"
upstream = "https://dedicated.example.com"
"#;

    fn name(t: &RouteTable, host: Option<&str>, path: &str) -> Option<String> {
        t.match_main(host, true, path)
            .map(|i| t.routes[i].name.to_string())
    }

    #[test]
    fn host_then_longest_prefix() {
        let t = table(ROUTES);
        assert_eq!(
            name(&t, Some("127.0.0.1:8080"), "/orders/42").as_deref(),
            Some("orders")
        );
        assert_eq!(
            name(&t, None, "/orders/admin/x").as_deref(),
            Some("orders-admin")
        );
        assert_eq!(name(&t, None, "/orders/adminx").as_deref(), Some("orders"));
        assert_eq!(
            name(&t, Some("Billing.Example.com:443"), "/x").as_deref(),
            Some("billing-host")
        );
        assert_eq!(
            name(&t, Some("billing.example.com"), "/v2/pay").as_deref(),
            Some("billing-v2")
        );
        // A host route beats a path-only route for its host.
        assert_eq!(
            name(&t, Some("billing.example.com"), "/orders/1").as_deref(),
            Some("billing-host")
        );
        assert_eq!(name(&t, Some("other.example.com"), "/nothing"), None);
        assert_eq!(name(&t, None, "/ordersX"), None);
        // Dedicated-listener routes are never matched on the main listener.
        assert!(t.routes.iter().any(|r| &*r.name == "dedicated"));
        assert_ne!(
            name(&t, Some("dedicated.example.com"), "/").as_deref(),
            Some("dedicated")
        );
    }

    #[test]
    fn strip_prefix_keeps_base_path_and_query() {
        let t = table(ROUTES);
        let orders = &t.routes[0];
        let uri = orders
            .upstream_uri("/orders/42", Some("a=1&b=%20"))
            .unwrap();
        assert_eq!(
            uri.to_string(),
            "https://orders.example.com/api/42?a=1&b=%20"
        );
        assert_eq!(
            orders.upstream_uri("/orders/", None).unwrap().path(),
            "/api/"
        );
        let admin = &t.routes[1];
        assert_eq!(
            admin
                .upstream_uri("/orders/admin/x", None)
                .unwrap()
                .to_string(),
            "https://admin.example.com/orders/admin/x"
        );
        // No base path, nothing stripped: the request's own target, query and all.
        assert_eq!(
            admin
                .upstream_uri("/orders/admin/x", Some("q=%2F&r"))
                .unwrap()
                .to_string(),
            "https://admin.example.com/orders/admin/x?q=%2F&r"
        );
        assert_eq!(orders.upstream_host, "orders.example.com");
    }

    #[test]
    fn segment_prefix() {
        assert_eq!(strip_segment_prefix("/orders/42", "/orders/"), Some("42"));
        assert_eq!(strip_segment_prefix("/orders/42", "/orders"), Some("/42"));
        assert_eq!(strip_segment_prefix("/orders", "/orders"), Some(""));
        assert_eq!(strip_segment_prefix("/ordersX", "/orders"), None);
        assert_eq!(strip_segment_prefix("/order", "/orders/"), None);
    }

    #[test]
    fn dot_segments_and_encoded_slashes_are_refused() {
        for bad in [
            "/orders/../admin",
            "/orders/%2e%2E/admin",
            "/./x",
            "/a/..",
            "/a%2Fb",
            "x",
            "/a\\..\\b",
            "/api/..;/admin",
            "/api/.;/admin",
            "/api/..;jsessionid=x/admin",
            "/api/%2e%2e;/admin",
            "/api/..%3b/admin",
            "/api/%252e%252e/admin",
            "/api/%25252e%25252e/admin",
            "/api/%2525252e/admin",
            "/api/%c0%ae%c0%ae/admin",
            "/api/%u002e%u002e/admin",
            "/api/a%00b",
            "/api/a%0d%0ab",
            "/api/a%5cb",
            "/api/a%255cb",
            "/api/a%252fb",
            "/api//admin",
            "//api/x",
            "/api/.../admin",
            "/api/%2e%2e%20/admin",
            "/api/%zz",
            "/api/%2",
        ] {
            assert!(check_path(bad).is_err(), "{bad}");
        }
        for good in [
            "/",
            "/orders/42",
            "/a..b/c.d",
            "/.well-known/x",
            "/api/a.b",
            "/api/..foo",
            "/api/foo..",
            "/api/%20x",
            "/api/100%25",
            "/api/caf%C3%A9",
            "/api/a;b=c/d",
            "/api/",
            "/api/%2ex",
        ] {
            assert_eq!(check_path(good), Ok(()), "{good}");
        }
    }

    const LOCAL: &str = r#"
[proxy]
allowed_hosts = ["client.internal", "Pinned.internal:8080"]
[[route]]
name = "api"
path_prefix = "/api/"
upstream = "https://api.example.com"
[[route]]
name = "billing"
host = "billing.example.com"
upstream = "https://billing.example.com"
[[route]]
name = "dedicated"
listen = "127.0.0.1:0"
host = "ded.example.com"
upstream = "https://dedicated.example.com"
"#;

    fn resolve(
        t: &RouteTable,
        ded: Option<usize>,
        src: HostSource,
        host: &str,
        path: &str,
    ) -> Result<String, Miss> {
        let value = (!host.is_empty()).then_some(host);
        t.resolve(ded, RequestHost { value, source: src }, path)
            .map(|i| t.routes[i].name.to_string())
    }

    #[test]
    fn path_routes_answer_local_hosts_only() {
        use HostSource::*;
        let t = table(LOCAL);
        for host in [
            "localhost",
            "LOCALHOST:1234",
            "127.0.0.1:8080",
            "[::1]:80",
            "[::1]",
            "localhost.",
            "client.internal",
            "Client.Internal:9",
            "pinned.internal:8080",
        ] {
            assert_eq!(
                resolve(&t, None, Header, host, "/api/x").as_deref(),
                Ok("api"),
                "{host}"
            );
            assert_eq!(
                resolve(&t, None, Authority, host, "/api/x").as_deref(),
                Ok("api"),
                "{host}"
            );
        }
        assert_eq!(
            resolve(&t, None, Absent, "", "/api/x").as_deref(),
            Ok("api")
        );
        for host in [
            "evil.example",
            "pinned.internal",
            "pinned.internal:8081",
            "127.0.0.2",
            "localhost.evil.example",
            "client.internal.evil",
        ] {
            assert_eq!(
                resolve(&t, None, Header, host, "/api/x"),
                Err(Miss::Misdirected),
                "{host}"
            );
            assert_eq!(
                resolve(&t, None, Authority, host, "/api/x"),
                Err(Miss::NoRoute),
                "{host}"
            );
            assert_eq!(
                resolve(&t, None, AbsoluteForm, host, "/api/x"),
                Err(Miss::NoRoute),
                "{host}"
            );
        }
        // Absolute-form reaches host routes only, even for a loopback name.
        assert_eq!(
            resolve(&t, None, AbsoluteForm, "localhost:8080", "/api/x"),
            Err(Miss::NoRoute)
        );
        assert_eq!(
            resolve(&t, None, AbsoluteForm, "billing.example.com", "/api/x").as_deref(),
            Ok("billing")
        );
        // A host a host route names is never misdirected, and gets only its host routes.
        assert_eq!(
            resolve(&t, None, Header, "billing.example.com:443", "/x").as_deref(),
            Ok("billing")
        );
        // Local hosts with no matching path: 404.
        assert_eq!(
            resolve(&t, None, Header, "localhost", "/other"),
            Err(Miss::NoRoute)
        );
        // Dedicated listeners: local hosts and the route's own host; others refused.
        assert_eq!(
            resolve(&t, Some(2), Header, "127.0.0.1:5555", "/any").as_deref(),
            Ok("dedicated")
        );
        assert_eq!(
            resolve(&t, Some(2), Header, "ded.example.com", "/any").as_deref(),
            Ok("dedicated")
        );
        assert_eq!(
            resolve(&t, Some(2), Absent, "", "/any").as_deref(),
            Ok("dedicated")
        );
        assert_eq!(
            resolve(&t, Some(2), Header, "evil.example", "/any"),
            Err(Miss::Misdirected)
        );
        assert_eq!(
            resolve(&t, Some(2), AbsoluteForm, "evil.example", "/any"),
            Err(Miss::NoRoute)
        );
    }

    #[test]
    fn exact_hosts_beat_wildcards_and_longer_wildcards_beat_shorter_ones() {
        use HostSource::*;
        let t = table(
            r#"
[[route]]
name = "many"
host = "**.cluster.local"
upstream = "https://gw.example.com"
[[route]]
name = "one"
host = "*.svc.cluster.local"
upstream = "https://{host}"
audience = ["https://{host}/"]
[[route]]
name = "exact"
host = "orders.svc.cluster.local"
upstream = "https://orders.example.com"
[[route]]
name = "path"
path_prefix = "/"
upstream = "https://local.example.com"
"#,
        );
        for (host, want) in [
            ("orders.svc.cluster.local", Ok("exact")),
            ("billing.svc.cluster.local", Ok("one")),
            ("a.b.svc.cluster.local", Ok("many")),
            ("x.cluster.local:8443", Ok("many")),
            ("localhost", Ok("path")),
            ("cluster.local", Err(Miss::Misdirected)),
            ("a@b.svc.cluster.local", Err(Miss::Misdirected)),
        ] {
            assert_eq!(
                resolve(&t, None, Header, host, "/x"),
                want.map(str::to_owned),
                "{host}"
            );
        }
        assert_eq!(
            resolve(&t, None, AbsoluteForm, "evil.com#.svc.cluster.local", "/x"),
            Err(Miss::NoRoute)
        );
        // The templated route has no fixed slot; the others do.
        assert!(t.routes[1].slot.is_none() && t.routes[1].targets.is_some());
        assert!(t.routes[2].slot.is_some() && t.routes[2].targets.is_none());
        let (name, label) =
            wildcard_fill(&t.routes[1], Some("Billing.SVC.cluster.local.:1")).expect("fills");
        assert_eq!(
            (name.as_str(), &name[..label]),
            ("billing.svc.cluster.local", "billing")
        );
    }

    #[test]
    fn hosts_are_normalized() {
        assert_eq!(normalize_host("Example.COM:8080"), "example.com");
        assert_eq!(normalize_host("example.com."), "example.com");
        assert_eq!(normalize_host("[::1]:80"), "[::1]");
        assert_eq!(normalize_host("127.0.0.1"), "127.0.0.1");
        assert_eq!(split_host_port("[::1]:8080"), ("[::1]", Some("8080")));
        assert_eq!(split_host_port("[::1]x"), ("[::1]", None));
        assert_eq!(split_host_port("a.example.:"), ("a.example", None));
    }
}
