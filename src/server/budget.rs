//! The worst-case memory of a configuration (docs/spec.md §6, "Memory"), computed from the same
//! constants the listeners and the upstream pool are built with, so the arithmetic in the docs
//! cannot drift from the code. A unit test holds the defaults and `deploy/`'s configuration to
//! the 64 MiB limit of `deploy/kubernetes/deployment.yaml`.
//!
//! It is an upper bound on what the sidecar's own buffers can hold at once, every buffer full:
//!
//! - per proxy listener, `max_connections` connections, each at its worst as HTTP/1 (read and
//!   write buffers, `max_header_bytes` each) or HTTP/2 (connection window, a frame, the HPACK
//!   table, and `max_concurrent_streams` request heads);
//! - per proxy listener, `max_connections` requests in flight (the accept loop's request
//!   limit; HTTP/2 streams count), each with its parsed head and the replay copy, a buffered
//!   body (`retry_body_limit`), an HTTP/2 send buffer, and one upstream exchange (HTTP/1
//!   buffers or an HTTP/2 stream window and send buffer, plus TLS records);
//! - idle upstream connections kept between requests: a route keeps at most `max_connections`
//!   (see `proxy::upstream`), and those of a route with one fixed upstream are the ones its own
//!   requests in flight used, already counted above; every further route, and a wildcard
//!   route's other authorities, can hold that many idle while other requests are in flight;
//! - the admin listener: `admin.max_connections` small connections, each with a `/metrics` text;
//! - one token response (`token.max_response_bytes`, twice: the bytes and the parsed value)
//!   per distinct token key;
//! - per client that can create run-time keys (a route of it with allow-lists or a wildcard
//!   host, or the token endpoint serving it), `token.cache_capacity` cached run-time tokens,
//!   each at its worst ([`RUNTIME_ENTRY`]: the token twice, its scope, its key twice, the
//!   slot);
//! - the log queue and the log writer's buffer;
//! - the process itself (code, runtime, TLS roots, caches), measured.
//!
//! Kernel socket buffers are not in it: they are charged to the container's memory cgroup too,
//! but bounded by the node's `net.ipv4.tcp_rmem`/`tcp_wmem` and drained at loopback speed.

use crate::config::Config;
use crate::proxy::{routes, targets, upstream};
use crate::server::accept::{
    ADMIN_H2_WINDOW, ADMIN_MAX_HEADER_BYTES, ADMIN_MAX_STREAMS, H2_CONNECTION_WINDOW,
    H2_MAX_SEND_BUF,
};
use crate::server::token_endpoint;
use crate::telemetry::{BUFFERED_LINES, WRITE_BUFFER};
use crate::token::registry::DEFAULT_CLIENT;
use crate::token::response;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;

/// Resident memory of the release binary after start-up and 2000 requests at 32 at once, with
/// two worker threads and the development server inside (`token-sidecar dev`): 13.7 MiB
/// measured, rounded up.
const PROCESS: u64 = 16 * MIB;
/// An HTTP/2 frame being read (16 KiB default maximum frame size plus its header) and the HPACK
/// decoder table (4 KiB default).
const H2_CODEC: u64 = 16 * KIB + 9 + 4 * KIB;
/// TLS to an upstream: a received and a sent record (16 KiB plus overhead each) and rustls's
/// plaintext queue, rounded up.
const TLS: u64 = 48 * KIB;
/// The `/metrics` text: a fixed part and, per route, its request counters and histogram.
const METRICS_FIXED: u64 = 4 * KIB;
const METRICS_PER_ROUTE: u64 = 4 * KIB;
/// The longest log line: an error text is cut at 1000 characters, plus its fields.
const LOG_LINE: u64 = 1536;

/// One run-time cache entry at its worst: the access token twice (the secret and the ready-made
/// `Bearer` header, each at most `MAX_TOKEN_BYTES`), the granted scope (`MAX_SCOPE_BYTES`), its
/// key twice (moka's copy and the slot's; a key comes from two request headers of at most
/// `targets::MAX_HEADER_BYTES` each, or a token endpoint body of at most its
/// `MAX_BODY_BYTES`), and the slot itself: its refresher task, statistics and moka's node,
/// [`RUNTIME_SLOT`].
const RUNTIME_ENTRY: u64 = {
    let token = 2 * response::MAX_TOKEN_BYTES as u64 + "Bearer ".len() as u64;
    let key_a = 2 * targets::MAX_HEADER_BYTES as u64;
    let key_b = token_endpoint::MAX_BODY_BYTES as u64;
    let key = if key_a > key_b { key_a } else { key_b };
    token + response::MAX_SCOPE_BYTES as u64 + 2 * key + RUNTIME_SLOT
};
/// A run-time slot without its token and key: the refresher task's future, the slot's
/// statistics (a fetch-duration histogram) and moka's node and timer entries. The end-to-end
/// test (tests/it/runtime.rs) measures a whole entry, its ~1 KiB token and key included, at
/// about 7 KiB of RSS (debug build); the slot alone is less, rounded up to 8 KiB.
const RUNTIME_SLOT: u64 = 8 * KIB;

/// The clients that can create run-time keys, with their `cache_capacity`: those with a route
/// choosing targets per request (allow-lists, a wildcard host or templates) and those the
/// loopback token endpoint serves.
fn runtime_clients(c: &Config) -> Vec<(&str, u64)> {
    let mut clients = vec![(DEFAULT_CLIENT, c.token.cache_capacity)];
    clients.extend(
        c.client
            .iter()
            .map(|cl| (cl.name.as_str(), cl.token.cache_capacity)),
    );
    let per_request = |name: &str| {
        c.route.iter().any(|r| {
            r.client.as_deref().unwrap_or(DEFAULT_CLIENT) == name && routes::creates_runtime_keys(r)
        })
    };
    let endpoint = |name: &str| {
        c.token_endpoint.listen.is_some()
            && (c.token_endpoint.clients.is_empty()
                || c.token_endpoint.clients.iter().any(|n| n == name))
    };
    clients.retain(|(name, _)| per_request(name) || endpoint(name));
    clients
}

/// The worst case, item by item, in bytes.
pub(crate) fn worst_case(c: &Config) -> Vec<(&'static str, u64)> {
    let px = &c.proxy;
    let head = px.max_header_bytes as u64;
    let conns = px.max_connections as u64;
    let streams = u64::from(px.max_concurrent_streams);
    let listeners = 1 + c.route.iter().filter(|r| r.listen.is_some()).count() as u64;

    let h1_conn = 2 * head;
    let h2_conn = u64::from(H2_CONNECTION_WINDOW) + H2_CODEC + streams * head;
    let upstream_h1 = 2 * upstream::H1_MAX_BUF as u64 + TLS;
    let upstream_h2 =
        u64::from(upstream::H2_STREAM_WINDOW) + upstream::H2_MAX_SEND_BUF as u64 + TLS;
    let request = 2 * head
        + px.retry_body_limit as u64
        + H2_MAX_SEND_BUF as u64
        + upstream_h1.max(upstream_h2);

    // Idle sets beyond the one the in-flight row already counts (module docs).
    let wildcard = c.route.iter().filter(|r| routes::is_wildcard(r)).count() as u64;
    let idle_sets = (c.route.len() as u64).saturating_sub(1) + wildcard;

    let metrics = METRICS_FIXED + METRICS_PER_ROUTE * c.route.len() as u64;
    let admin_head = ADMIN_MAX_HEADER_BYTES as u64;
    let admin_h1 = 2 * admin_head + metrics;
    let admin_h2 = u64::from(ADMIN_H2_WINDOW)
        + H2_CODEC
        + u64::from(ADMIN_MAX_STREAMS) * (admin_head + metrics);

    let keys = {
        let mut keys: Vec<_> = c
            .route
            .iter()
            .map(|r| crate::token::TokenKey::new(&r.scope, &r.audience))
            .collect();
        keys.sort();
        keys.dedup();
        keys.len() as u64
    };
    vec![
        ("process (measured)", PROCESS),
        (
            "proxy connections",
            listeners * conns * h1_conn.max(h2_conn),
        ),
        ("proxy requests in flight", listeners * conns * request),
        (
            "idle upstream connections",
            idle_sets * conns * upstream_h1.max(upstream_h2),
        ),
        (
            "admin connections",
            c.admin.max_connections as u64 * admin_h1.max(admin_h2),
        ),
        (
            "token responses",
            keys * 2 * c.token.max_response_bytes as u64,
        ),
        (
            "log queue and write buffer",
            BUFFERED_LINES as u64 * LOG_LINE + WRITE_BUFFER as u64,
        ),
        (
            "run-time tokens cached",
            runtime_clients(c)
                .iter()
                .map(|(_, capacity)| capacity * RUNTIME_ENTRY)
                .sum(),
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The memory limit of the token-sidecar container in `deploy/kubernetes/deployment.yaml`.
    const DEPLOY_LIMIT: u64 = 64 * MIB;

    fn report(what: &str, c: &Config) -> u64 {
        let items = worst_case(c);
        let total: u64 = items.iter().map(|(_, b)| b).sum();
        eprintln!("worst case, {what}:");
        for (item, bytes) in &items {
            eprintln!("  {item:<26} {:>6.1} MiB", *bytes as f64 / MIB as f64);
        }
        eprintln!("  {:<26} {:>6.1} MiB", "total", total as f64 / MIB as f64);
        total
    }

    #[test]
    fn the_defaults_fit_in_the_deployment_memory_limit() {
        let text = r#"
[token]
token_url = "https://idp.example.com/token"
client_id = "c"

[[route]]
name = "orders"
path_prefix = "/orders/"
upstream = "https://orders.example.com"
scope = ["orders:read"]
"#;
        let c: Config = toml::from_str(text).unwrap();
        let total = report("defaults, one route", &c);
        assert!(total <= DEPLOY_LIMIT, "{} MiB", total / MIB);
    }

    /// Run-time keys at the defaults (`cache_capacity` 1000): a route with an allow-list and the
    /// token endpoint, both for the default client, count its cache once; a second client
    /// that only has fixed routes adds nothing; the fixed-route config counts nothing.
    #[test]
    fn run_time_targets_at_the_defaults_count_the_cache_capacity_once_per_client() {
        let fixed = r#"
[token]
token_url = "https://idp.example.com/token"
client_id = "c"

[[client]]
name = "billing"
token_url = "https://idp.example.com/token"
client_id = "b"

[[route]]
name = "orders"
path_prefix = "/orders/"
upstream = "https://orders.example.com"
scope = ["orders:read"]

[[route]]
name = "billing"
path_prefix = "/billing/"
upstream = "https://billing.example.com"
client = "billing"
"#;
        let runtime = format!(
            "{fixed}allow_audiences = [\"https://*.svc.cluster.local/\"]\n"
        )
        .replace(
            "[[client]]",
            "[token_endpoint]\nlisten = \"127.0.0.1:8081\"\nclients = [\"default\"]\n\n[[client]]",
        );
        let item = |c: &Config| {
            worst_case(c)
                .into_iter()
                .find(|(n, _)| *n == "run-time tokens cached")
                .unwrap()
                .1
        };
        let fixed: Config = toml::from_str(fixed).unwrap();
        assert_eq!(item(&fixed), 0);
        report("fixed routes only", &fixed);

        // The allow-list is on the billing route: both clients can create run-time keys.
        let both: Config = toml::from_str(&runtime).unwrap();
        assert_eq!(both.token.cache_capacity, 1000, "the default capacity");
        assert_eq!(item(&both), 2 * 1000 * RUNTIME_ENTRY);
        assert_eq!(
            RUNTIME_ENTRY,
            60 * KIB + 7,
            "the figure docs/spec.md §6 quotes"
        );
        let total = report("defaults, run-time targets for two clients", &both);
        eprintln!(
            "  per run-time entry {:.1} KiB; per client at cache_capacity 1000: {:.1} MiB",
            RUNTIME_ENTRY as f64 / KIB as f64,
            (1000 * RUNTIME_ENTRY) as f64 / MIB as f64
        );
        assert!(
            total > DEPLOY_LIMIT,
            "the operator must raise the limit or lower capacity"
        );

        // Only the token endpoint's client when the allow-list goes.
        let endpoint_only: Config = toml::from_str(
            &runtime.replace("allow_audiences = [\"https://*.svc.cluster.local/\"]\n", ""),
        )
        .unwrap();
        assert_eq!(item(&endpoint_only), 1000 * RUNTIME_ENTRY);
    }

    #[test]
    fn the_deployed_config_fits_in_the_deployment_memory_limit() {
        let deployment = include_str!("../../deploy/kubernetes/deployment.yaml");
        assert!(
            deployment.contains("memory: 64Mi"),
            "the limit this test checks against is the deployment's"
        );
        let text = include_str!("../../deploy/kubernetes/sidecar.toml");
        let c: Config = toml::from_str(text).unwrap();
        let total = report("deploy/kubernetes/sidecar.toml", &c);
        assert!(total <= DEPLOY_LIMIT, "{} MiB", total / MIB);
    }
}
