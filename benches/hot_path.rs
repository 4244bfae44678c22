//! Microbenchmarks of the per-request hot path and of assertion signing (issue 6; results and
//! how to run them in docs/benchmarks.md). Manual only: `cargo bench --bench hot_path`.
//!
//! - `cache/hit`: `Slot::token()` on a slot the refresher has filled. The slot comes from a real
//!   token cache: `Sidecar::bind` starts `TokenCache::start` against the crate's embedded
//!   `DevServer` on 127.0.0.1:0, with a registered client using the ES256 fixture key. The
//!   future is polled once outside the runtime: a cache hit completes on its first poll, and
//!   outside a runtime context Tokio's clock is the plain monotonic clock even though the bench
//!   build unifies Tokio's `test-util` feature in (inside a runtime it would take a mutex).
//! - `request/build`: what phase 3 of `src/proxy.rs` does to a realistic request: rewrite the URI
//!   with `Route::upstream_uri`, force HTTP/1.1, `strip_hop_by_hop`, insert `Host` and the
//!   ~800-byte `Authorization`.
//!   `request/upstream_uri` and `request/strip_hop_by_hop` time its two larger parts alone.
//! - `hot_path/hit_and_build`: both, as one request pays them (the 1 µs target).
//! - `route/check_path`, `route/match_main`: phase 1 (`check_path`, then
//!   `RouteTable::match_main` over a table of three routes, one of them matched by host).
//! - `metrics/record`: phase 6's per-request `RouteMetrics::request` (a counter and a histogram).
//! - `assertion/sign/*`: `assertion::sign` with each fixture key (RS256, PS256, ES256, ES384,
//!   EdDSA): the cost of one token request's client assertion.

use std::future::Future;
use std::hint::black_box;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use http::header::{AUTHORIZATION, HOST};
use http::{HeaderMap, HeaderValue, Method, Request, Version};

use token_sidecar::cache::Slot;
use token_sidecar::config::{Config, from_toml_str};
use token_sidecar::devserver::{DevClient, DevServer, DevServerConfig};
use token_sidecar::key::{Algorithm, SigningKey};
use token_sidecar::metrics::Metrics;
use token_sidecar::proxy::strip_hop_by_hop;
use token_sidecar::routes::{Route, RouteTable, check_path};
use token_sidecar::server::Sidecar;
use token_sidecar::token_client::TokenClient;

const CLIENT_ID: &str = "bench-client";
const SCOPE: &str = "orders:read";
const AUDIENCE: &str = "https://orders.internal.example.com";

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/keys")
        .join(name)
}

/// Polls a future once with a no-op waker; the hot path never has to wait.
fn poll_once<F: Future>(fut: F) -> Option<F::Output> {
    let mut fut = pin!(fut);
    match fut.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(v) => Some(v),
        Poll::Pending => None,
    }
}

fn config(token_url: &str) -> Config {
    let key = fixture("ec_p256_sec1.pem");
    let text = format!(
        r#"
[proxy]
listen = "127.0.0.1:0"

[admin]
listen = "127.0.0.1:0"

[token]
token_url = "{token_url}"
allow_insecure_token_url = true
client_id = "{CLIENT_ID}"
private_key_file = "{key}"

[[route]]
name = "orders"
path_prefix = "/orders/"
strip_prefix = true
upstream = "http://127.0.0.1:9/api/"
allow_insecure_upstream = true
scope = ["{SCOPE}"]
audience = ["{AUDIENCE}"]

[[route]]
name = "billing"
path_prefix = "/billing/"
upstream = "http://127.0.0.1:9/"
allow_insecure_upstream = true
scope = ["billing:read"]
audience = ["https://billing.internal.example.com"]

[[route]]
name = "admin"
host = "admin.internal.example.com"
upstream = "http://127.0.0.1:9/"
allow_insecure_upstream = true
"#,
        key = key.display()
    );
    from_toml_str(&text).expect("bench config is valid")
}

/// Everything the cache benchmark needs, alive for the whole run.
struct Fixture {
    _rt: tokio::runtime::Runtime,
    _authz: DevServer,
    _sidecar: Sidecar,
    slot: Arc<Slot>,
    routes: Vec<Route>,
    table: RouteTable,
    authorization: HeaderValue,
}

fn setup() -> Fixture {
    // One worker runs the development authorization server and the refresher in the background;
    // the benchmarks themselves run on the main thread, outside the runtime.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let key = SigningKey::from_bytes(
        &std::fs::read(fixture("ec_p256_sec1.pem")).expect("fixture key"),
        None,
        None,
    )
    .expect("fixture key parses");
    let (authz, sidecar, authorization) = rt.block_on(async {
        let authz = DevServer::start(DevServerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            clients: vec![DevClient {
                client_id: CLIENT_ID.into(),
                jwks: serde_json::json!({ "keys": [key.public_jwk()] }),
                scopes: [SCOPE, "billing:read"].map(String::from).into(),
                audiences: [AUDIENCE, "https://billing.internal.example.com"]
                    .map(String::from)
                    .into(),
            }],
            token_ttl: Duration::from_secs(3600),
        })
        .await
        .expect("dev server starts");
        let cfg = config(authz.token_url());
        // A token of the same kind the cache holds, for the request-building benchmark.
        let client = TokenClient::new(&cfg.token).expect("token client");
        let route_key = Route::from_config(&cfg.route[0], &Metrics::new())
            .expect("route")
            .token_key;
        let token = client
            .fetch(&route_key)
            .await
            .expect("dev server issues a token");
        let sidecar = Sidecar::bind(cfg).await.expect("sidecar binds");
        (authz, sidecar, token.authorization().clone())
    });

    let cfg = config("http://127.0.0.1:9/token");
    let metrics = Metrics::new();
    let routes: Vec<Route> = cfg
        .route
        .iter()
        .map(|r| Route::from_config(r, &metrics).expect("route"))
        .collect();
    let slot = sidecar
        .cache()
        .slot(&routes[0].token_key)
        .expect("the route has a slot");
    // Wait (bounded) for the refresher's first token.
    let mut filled = false;
    for _ in 0..500 {
        if slot.readiness(tokio::time::Instant::now()).is_ok() {
            filled = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(filled, "the refresher did not fill the slot within 5 s");
    assert!(
        poll_once(slot.token()).is_some_and(|r| r.is_ok()),
        "a filled slot answers on the first poll"
    );

    let table_routes: Vec<Route> = cfg
        .route
        .iter()
        .map(|r| Route::from_config(r, &metrics).expect("route"))
        .collect();
    let dedicated = vec![false; table_routes.len()];
    let table = RouteTable::new(table_routes, &dedicated);
    Fixture {
        _rt: rt,
        _authz: authz,
        _sidecar: sidecar,
        slot,
        routes,
        table,
        authorization,
    }
}

/// The headers a typical HTTP/1.1 client library sends, plus a hop-by-hop pair.
fn downstream_headers() -> HeaderMap {
    let mut h = HeaderMap::new();
    for (name, value) in [
        ("host", "127.0.0.1:8080"),
        ("user-agent", "orders-client/2.3.1 (okhttp/4.12.0)"),
        ("accept", "application/json"),
        ("accept-encoding", "gzip, deflate"),
        ("content-type", "application/json"),
        (
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ),
        ("x-request-id", "5f1c2a7e-9d43-4b8e-a1f0-3c6d2e8b7a91"),
        ("connection", "keep-alive"),
        ("keep-alive", "timeout=5"),
    ] {
        h.insert(name, HeaderValue::from_static(value));
    }
    h
}

fn downstream_request(headers: &HeaderMap) -> Request<()> {
    let mut req = Request::new(());
    *req.method_mut() = Method::GET;
    *req.uri_mut() = "/orders/42/items?expand=lines&limit=50"
        .parse()
        .expect("uri");
    *req.headers_mut() = headers.clone();
    req
}

/// Phase 3 of `Proxy::forward` (src/proxy.rs), on a request already routed.
fn build_upstream_request(
    route: &Route,
    authorization: &HeaderValue,
    req: Request<()>,
) -> Request<()> {
    let (mut parts, body) = req.into_parts();
    parts.uri = route
        .upstream_uri(parts.uri.path(), parts.uri.query())
        .expect("mappable");
    parts.version = Version::HTTP_11;
    strip_hop_by_hop(&mut parts.headers);
    parts.headers.insert(HOST, route.upstream_host.clone());
    parts.headers.insert(AUTHORIZATION, authorization.clone());
    Request::from_parts(parts, body)
}

fn hot_path(c: &mut Criterion) {
    let f = setup();
    let headers = downstream_headers();
    let route = &f.routes[0];

    c.bench_function("cache/hit", |b| {
        b.iter(|| black_box(poll_once(black_box(&f.slot).token())))
    });

    c.bench_function("request/build", |b| {
        b.iter_batched(
            || downstream_request(&headers),
            |req| build_upstream_request(route, &f.authorization, req),
            BatchSize::SmallInput,
        )
    });

    // The two larger parts of request/build on their own.
    c.bench_function("request/upstream_uri", |b| {
        b.iter(|| {
            route.upstream_uri(
                black_box("/orders/42/items"),
                black_box(Some("expand=lines&limit=50")),
            )
        })
    });

    c.bench_function("request/strip_hop_by_hop", |b| {
        b.iter_batched(
            || headers.clone(),
            |mut h| {
                strip_hop_by_hop(&mut h);
                h
            },
            BatchSize::SmallInput,
        )
    });

    c.bench_function("hot_path/hit_and_build", |b| {
        b.iter_batched(
            || downstream_request(&headers),
            |req| {
                let lease = poll_once(f.slot.token());
                (lease, build_upstream_request(route, &f.authorization, req))
            },
            BatchSize::SmallInput,
        )
    });

    c.bench_function("metrics/record", |b| {
        b.iter(|| {
            route
                .metrics
                .request(black_box(200), black_box(Duration::from_micros(700)))
        })
    });

    c.bench_function("route/check_path", |b| {
        b.iter(|| check_path(black_box("/orders/42/items")).is_ok())
    });

    c.bench_function("route/match_main", |b| {
        b.iter(|| {
            f.table.match_main(
                black_box(Some("127.0.0.1:8080")),
                black_box("/orders/42/items"),
            )
        })
    });
}

fn signing(c: &mut Criterion) {
    let mut g = c.benchmark_group("assertion/sign");
    g.sample_size(30);
    g.measurement_time(Duration::from_secs(3));
    for (name, file, alg) in [
        ("RS256", "rsa_pkcs8.pem", Some(Algorithm::RS256)),
        ("PS256", "rsa_pkcs8.pem", Some(Algorithm::PS256)),
        ("ES256", "ec_p256_sec1.pem", None),
        ("ES384", "ec_p384_sec1.pem", None),
        ("EdDSA", "ed25519_pkcs8.pem", None),
    ] {
        let key =
            SigningKey::from_bytes(&std::fs::read(fixture(file)).expect("fixture"), alg, None)
                .expect("fixture key parses");
        g.bench_function(name, |b| {
            b.iter(|| {
                token_sidecar::assertion::sign(
                    &key,
                    "orders-service",
                    "https://hydra.example.com/oauth2/token",
                    Duration::from_secs(60),
                )
                .expect("signs")
            })
        });
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = hot_path, signing
}
criterion_main!(benches);
