//! Property tests for route matching, the host rule, path checking and upstream URI rewriting
//! (docs/spec.md §4 routing, §5 refusals; docs/reliability.md §5 "no open proxy" and §6 "bad
//! input from every side"): arbitrary hosts and paths. None of them may panic; a match is the
//! best one, a foreign host never reaches a path route, an accepted path stays under the
//! upstream's base path, and dot segments in any spelling are refused.
//!
//! Case counts are modest so the module runs in a few seconds on a small shared machine;
//! failures are not persisted (no regression files are written into the tree). Strategies are
//! boxed: unboxed, their nested types overflow a debug-build test thread's stack.

use proptest::prelude::*;
use proptest::test_runner::Config as ProptestConfig;

use super::routes::{
    HostSource, Miss, RequestHost, RouteTable, check_path, normalize_host, strip_segment_prefix,
    table,
};

fn cases(n: u32) -> ProptestConfig {
    ProptestConfig {
        cases: n,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
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

/// The table of `ROUTES`, built once (each route's upstream client loads its trust roots).
fn route_table() -> &'static RouteTable {
    static TABLE: std::sync::OnceLock<RouteTable> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| table(ROUTES))
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
    /// is a segment prefix of the path (when it has one), is a hostless route only when path
    /// routes may answer, and no other main-listener route that matches ranks higher
    /// (host-specific beats hostless, then the longest prefix).
    #[test]
    fn route_matching_picks_the_best_match(
        host in host_input(),
        path in path_input(),
        path_routes in any::<bool>(),
    ) {
        let t = route_table();
        let got = t.match_main(host.as_deref(), path_routes, &path);
        let norm = host.as_deref().map(normalize_host);
        let rank = |i: usize| -> Option<(bool, usize)> {
            let r = &t.routes[i];
            if t.routes[i].dedicated {
                return None;
            }
            match (&r.host, &norm) {
                (Some(want), Some(h)) if want == h => {}
                (Some(_), _) => return None,
                (None, _) if !path_routes => return None,
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
        let best = (0..t.routes.len()).filter_map(rank).max();
        match got {
            None => prop_assert_eq!(best, None, "no route returned but one matches"),
            Some(i) => {
                let r = &t.routes[i];
                prop_assert!(!t.routes[i].dedicated, "matched dedicated route {}", r.name);
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

    /// `resolve` on the main listener never panics and never lets a foreign host reach a path
    /// route: a hostless route answers only a local host (loopback names, or none at all) named
    /// other than by an absolute-form target; a miss is 421 only for a foreign `Host` header.
    #[test]
    fn foreign_hosts_never_reach_path_routes(
        host in host_input(),
        path in path_input(),
        source in prop::sample::select(vec![
            HostSource::AbsoluteForm, HostSource::Authority, HostSource::Header, HostSource::Absent,
        ]),
    ) {
        let t = route_table();
        let source = if host.is_none() { HostSource::Absent } else { source };
        let req = RequestHost { value: host.as_deref(), source };
        let local = host.as_deref().is_none_or(|h| t.local.contains(h));
        match t.resolve(None, req, &path) {
            Ok(i) => {
                let r = &t.routes[i];
                prop_assert!(!r.dedicated);
                if r.host.is_none() {
                    prop_assert!(local, "path route {} answered host {:?}", r.name, host);
                    prop_assert!(source != HostSource::AbsoluteForm, "absolute-form reached {}", r.name);
                }
            }
            Err(Miss::Misdirected) => {
                prop_assert!(!local && source == HostSource::Header, "421 for {:?} {:?}", host, source);
            }
            Err(Miss::NoRoute) => {
                prop_assert!(local || source != HostSource::Header, "404 for foreign Host {:?}", host);
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
        for r in &t.routes {
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

    /// A `..` segment in any spelling (`..`, `%2e%2e`, `%2E%2e`, `.%2e`, double-encoded
    /// `%252e`, with `;params` or an encoded `;`) anywhere in the path is refused, and so is `.`.
    #[test]
    fn dot_segments_are_always_refused(
        before in prop::collection::vec("[a-zA-Z0-9_~-]{1,8}", 0..4),
        dots in prop::collection::vec(
            prop::sample::select(vec![".", "%2e", "%2E", "%252e", "%252E"]), 1..=2),
        params in prop::sample::select(vec!["", ";", ";x", ";jsessionid=1", "%3b", "%3Bx", "%253b"]),
        after in prop::collection::vec("[a-zA-Z0-9._~-]{0,8}", 0..4),
        trailing_slash in any::<bool>(),
    ) {
        let mut segs = before.clone();
        segs.push(format!("{}{params}", dots.concat()));
        segs.extend(after.iter().cloned());
        let mut path = format!("/{}", segs.join("/"));
        if trailing_slash {
            path.push('/');
        }
        prop_assert!(check_path(&path).is_err(), "accepted {:?}", path);
    }
}

// ---------------------------------------------------------------------------------------------
// Wildcard host routes
// ---------------------------------------------------------------------------------------------

const WILDCARD_ROUTES: &str = r#"
[[route]]
name = "one"
host = "*.svc.cluster.local"
upstream = "https://{host}"
audience = ["https://{host}/"]

[[route]]
name = "many"
host = "**.mesh.internal"
upstream = "https://{label}.mesh.internal:8443"

[[route]]
name = "local"
path_prefix = "/"
upstream = "https://local.example.com"
"#;

fn wildcard_table() -> &'static RouteTable {
    static TABLE: std::sync::OnceLock<RouteTable> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| table(WILDCARD_ROUTES))
}

/// An independent statement of which hosts a wildcard may answer: after dropping a port of
/// digits and one trailing dot, lowercase, `LABELS.suffix` where every label is 1–63 of
/// `[a-z0-9-]` not starting or ending with `-`, at most 253 bytes, and (for `*.`) one label.
fn oracle(host: &str, suffix: &str, many: bool) -> bool {
    let name = match host.rsplit_once(':') {
        Some((n, port)) if port.len() <= 5 && port.bytes().all(|b| b.is_ascii_digit()) => n,
        Some(_) => return false,
        None => host,
    };
    let name = name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase();
    let Some(labels) = name.strip_suffix(suffix) else {
        return false;
    };
    let ok_label = |l: &str| {
        (1..=63).contains(&l.len())
            && l.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    name.len() <= 253 && labels.split('.').all(ok_label) && (many || !labels.contains('.'))
}

fn wildcard_host_input() -> BoxedStrategy<String> {
    let prefix = prop_oneof![
        3 => "[a-zA-Z0-9-]{1,12}(\\.[a-zA-Z0-9-]{1,12}){0,2}",
        2 => "[a-z0-9#/?@:\\[\\]_. \\\\-]{0,16}",
        1 => any::<String>(),
        1 => "[a-z]{60,70}",
    ];
    let suffix = prop::sample::select(vec![
        ".svc.cluster.local",
        ".SVC.Cluster.local",
        ".svc.cluster.local.",
        ".svc.cluster.local..",
        ".svc.cluster.local:8443",
        ".svc.cluster.local:",
        ".svc.cluster.local:x",
        "svc.cluster.local",
        ".svc.cluster.local.evil.com",
        ".mesh.internal",
        ".mesh.internal:1",
        "",
    ]);
    (prefix, suffix)
        .prop_map(|(p, s)| format!("{p}{s}"))
        .boxed()
}

proptest! {
    #![proptest_config(cases(1024))]

    /// A wildcard route answers exactly the hosts the oracle allows, whatever the host source;
    /// a host outside the pattern never reaches it (docs/reliability.md §5, no open proxy).
    #[test]
    fn wildcards_answer_only_hosts_inside_the_pattern(
        host in wildcard_host_input(),
        source in prop::sample::select(vec![
            HostSource::AbsoluteForm, HostSource::Authority, HostSource::Header,
        ]),
    ) {
        let t = wildcard_table();
        let req = RequestHost { value: Some(&host), source };
        let got = t.resolve(None, req, "/x").ok().map(|i| &*t.routes[i].name);
        let one = oracle(&host, ".svc.cluster.local", false);
        let many = oracle(&host, ".mesh.internal", true);
        match got {
            Some("one") => prop_assert!(one, "{host:?} reached `*.svc.cluster.local`"),
            Some("many") => prop_assert!(many, "{host:?} reached `**.mesh.internal`"),
            _ => prop_assert!(!one && !many, "{host:?} missed its wildcard"),
        }
        if let Some(i) = t.resolve(None, req, "/x").ok().filter(|&i| t.routes[i].wildcard.is_some()) {
            let (name, label) = super::routes::wildcard_fill(&t.routes[i], Some(&host))
                .expect("a routed host fills its templates");
            prop_assert!(name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.'));
            prop_assert!(label > 0 && label < name.len());
        }
    }
}
