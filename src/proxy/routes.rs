//! Routes: which upstream and which token a downstream request gets.
//!
//! Matching (docs/spec.md §4): a route's dedicated `listen` port takes everything arriving on it. On the
//! main listener a route matches when its `host` (if set) equals the request's host and its
//! `path_prefix` (if set) is a path-segment prefix of the request path; among matches, a route
//! naming the host beats one that does not, then the longest prefix wins.
//!
//! Everything here is pure and allocation-light: the table is built once from the config.

use std::sync::Arc;

use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderValue, Uri};

use super::upstream::Upstream;
use crate::config::RouteConfig;
use crate::metrics::RouteMetrics;
use crate::token::cache::Slot;

/// A route as the proxy uses it.
#[derive(Debug)]
pub struct Route {
    pub(crate) name: Arc<str>,
    pub(crate) host: Option<String>,
    pub(crate) path_prefix: Option<String>,
    /// Served on its own `listen` port only, never matched on the main listener.
    pub(crate) dedicated: bool,
    pub(crate) strip_prefix: bool,
    pub(crate) upstream_scheme: Scheme,
    pub(crate) upstream_authority: Authority,
    /// `Host` header value for the upstream, prepared once.
    pub(crate) upstream_host: HeaderValue,
    /// The upstream URL's path without a trailing slash ("" for the root).
    pub(crate) upstream_base_path: String,
    /// Where this route's token comes from; shared by routes with the same sets.
    pub(crate) slot: Arc<Slot>,
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

impl Route {
    /// The route for `cfg`, taking its token from `slot` and recording into `metrics`.
    pub(crate) fn from_config(
        cfg: &RouteConfig,
        slot: Arc<Slot>,
        metrics: RouteMetrics,
    ) -> Result<Route, RouteError> {
        let err = |message: String| RouteError {
            route: cfg.name.clone(),
            message,
        };
        let uri: Uri = cfg
            .upstream
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
        let upstream = Upstream::new(cfg).map_err(|e| err(e.to_string()))?;
        Ok(Route {
            name: Arc::from(cfg.name.as_str()),
            host: cfg.host.as_deref().map(normalize_host),
            path_prefix: cfg.path_prefix.clone(),
            dedicated: cfg.listen.is_some(),
            strip_prefix: cfg.strip_prefix,
            upstream_scheme: scheme,
            upstream_authority: authority,
            upstream_host,
            upstream_base_path: uri.path().trim_end_matches('/').to_string(),
            slot,
            upstream,
            retry_on_401: cfg.retry_on_401,
            metrics,
        })
    }

    /// The upstream URI for a downstream path and query.
    ///
    /// The path has already been checked by [`check_path`]; the result always starts with the
    /// upstream's base path, so a request cannot reach outside it.
    pub(crate) fn upstream_uri(&self, path: &str, query: Option<&str>) -> Result<Uri, http::Error> {
        let rest = match (&self.path_prefix, self.strip_prefix) {
            (Some(prefix), true) => strip_segment_prefix(path, prefix).unwrap_or(path),
            _ => path,
        };
        let mut pq = String::with_capacity(
            self.upstream_base_path.len() + rest.len() + 2 + query.map_or(0, |q| q.len() + 1),
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
        Uri::builder()
            .scheme(self.upstream_scheme.clone())
            .authority(self.upstream_authority.clone())
            .path_and_query(PathAndQuery::try_from(pq)?)
            .build()
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

/// Rejects request paths that are not origin-form or that hold dot segments (also
/// percent-encoded): an upstream that normalizes `/orders/../admin` would otherwise be reached
/// outside the route's base path with the route's token.
pub(crate) fn check_path(path: &str) -> Result<(), &'static str> {
    if !path.starts_with('/') {
        return Err("the request path must start with '/'");
    }
    // The common case: nothing that could encode or form a dot segment or a backslash.
    if !path.contains("/.") && !path.contains('%') && !path.contains('\\') {
        return Ok(());
    }
    for segment in path.split('/') {
        if is_dot_segment(segment) {
            return Err("the request path must not contain '.' or '..' segments");
        }
        if segment.contains("%2f")
            || segment.contains("%2F")
            || segment.contains("%5c")
            || segment.contains("%5C")
            || segment.contains('\\')
        {
            return Err("the request path must not contain encoded slashes or backslashes");
        }
    }
    Ok(())
}

/// `.` or `..`, also with percent-encoded dots (`%2e`, `%2E`), without allocating.
fn is_dot_segment(segment: &str) -> bool {
    let b = segment.as_bytes();
    let dot_at = |i: usize| -> Option<usize> {
        match b.get(i)? {
            b'.' => Some(i + 1),
            b'%' if b.get(i + 1) == Some(&b'2') && matches!(b.get(i + 2), Some(b'e' | b'E')) => {
                Some(i + 3)
            }
            _ => None,
        }
    };
    match dot_at(0) {
        Some(end) if end == b.len() => true,
        Some(end) => dot_at(end) == Some(b.len()),
        None => false,
    }
}

/// Strips an optional port and a trailing dot, lowercases.
pub(crate) fn normalize_host(host: &str) -> String {
    host_without_port(host).to_ascii_lowercase()
}

/// The host part of a Host header value, without port or trailing dot, as a borrowed slice.
fn host_without_port(host: &str) -> &str {
    let h = host.trim();
    let without_port = if h.starts_with('[') {
        // IPv6 literal: keep the brackets, drop what follows them.
        match h.find(']') {
            Some(end) => &h[..=end],
            None => h,
        }
    } else {
        match h.rsplit_once(':') {
            Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
            _ => h,
        }
    };
    without_port.trim_end_matches('.')
}

/// All routes, with an index of the main-listener ones.
#[derive(Debug)]
pub(crate) struct RouteTable {
    pub(crate) routes: Vec<Route>,
    /// Indices of the routes without a dedicated `listen`.
    main: Vec<usize>,
}

impl RouteTable {
    pub(crate) fn new(routes: Vec<Route>) -> RouteTable {
        let main = (0..routes.len())
            .filter(|&i| !routes[i].dedicated)
            .collect();
        RouteTable { routes, main }
    }

    /// The best main-listener route for a request, by host then longest path prefix.
    pub(crate) fn match_main(&self, host: Option<&str>, path: &str) -> Option<usize> {
        // Per request: compare borrowed slices; route hosts were normalized at start-up.
        let host = host.map(host_without_port);
        let mut best: Option<(usize, (bool, usize))> = None;
        for &i in &self.main {
            let r = &self.routes[i];
            let host_ok = match (&r.host, host) {
                (None, _) => true,
                (Some(want), Some(got)) => want.eq_ignore_ascii_case(got),
                (Some(_), None) => false,
            };
            if !host_ok {
                continue;
            }
            let prefix_len = match &r.path_prefix {
                None => 0,
                Some(p) => match strip_segment_prefix(path, p) {
                    Some(_) => p.len(),
                    None => continue,
                },
            };
            let rank = (r.host.is_some(), prefix_len);
            if best.is_none_or(|(_, b)| rank > b) {
                best = Some((i, rank));
            }
        }
        best.map(|(i, _)| i)
    }
}

/// A table built from `[[route]]` TOML text, each route with its own unregistered metrics and
/// a slot of a cache that is never started: for the unit and property tests.
#[cfg(test)]
pub(crate) fn table(routes: &str) -> RouteTable {
    use crate::token::TokenKey;
    use crate::token::cache::{CacheBuilder, Policy};
    let cfg = crate::config::from_toml_str(&format!(
        "[token]\ntoken_url = \"https://idp.example.com/t\"\nclient_id = \"c\"\n\
         auth_method = \"client_secret_post\"\nclient_secret = \"s\"\n{routes}"
    ))
    .expect("route config is valid");
    let mut cache = CacheBuilder::new(Policy::from_config(&cfg.token));
    let routes = cfg
        .route
        .iter()
        .map(|r| {
            let slot = cache.slot(TokenKey::new(&r.scope, &r.audience));
            Route::from_config(r, slot, RouteMetrics::unregistered()).expect("route builds")
        })
        .collect();
    RouteTable::new(routes)
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
        t.match_main(host, path)
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
        ] {
            assert!(check_path(bad).is_err(), "{bad}");
        }
        for good in ["/", "/orders/42", "/a..b/c.d", "/.well-known/x"] {
            assert!(check_path(good).is_ok(), "{good}");
        }
    }

    #[test]
    fn hosts_are_normalized() {
        assert_eq!(normalize_host("Example.COM:8080"), "example.com");
        assert_eq!(normalize_host("example.com."), "example.com");
        assert_eq!(normalize_host("[::1]:80"), "[::1]");
        assert_eq!(normalize_host("127.0.0.1"), "127.0.0.1");
    }
}
