//! Microbenchmarks of the per-request hot path and of assertion signing (results and how to run
//! them in docs/benchmarks.md). Manual only: `cargo bench --bench hot_path`.
//!
//! Every benchmark calls the product's own phase functions (`token_sidecar::phases`) on a real
//! `Sidecar`: `Sidecar::bind` starts the token cache against the crate's embedded `DevServer` on
//! 127.0.0.1:0, with a registered client using the ES256 fixture key. A change to the request
//! path is therefore a change to what is measured.
//!
//! - `cache/hit`: phase 2, `phases::token` on a route whose slot the refresher has filled. The
//!   future is polled once outside the runtime: a cache hit completes on its first poll, and
//!   outside a runtime context Tokio's clock is the plain monotonic clock even though the bench
//!   build unifies Tokio's `test-util` feature in (inside a runtime it would take a mutex).
//! - `request/build`: phase 3, `phases::upstream_request` (URI rewrite, hop-by-hop headers,
//!   `Host`) then `phases::authorize` (the ~800-byte `Authorization`), on a realistic request.
//! - `hot_path/hit_and_build`: phases 1–3 as one request pays them (the 1 µs target).
//! - `route/route`: phase 1, `Proxy::route` over a table of three routes, one matched by host.
//! - `log/metrics`: phase 6 with the access log off (a counter and a histogram).
//! - `assertion/sign/*`: `sign_assertion` with each fixture key (RS256, PS256, ES256, ES384,
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
use http::{HeaderMap, HeaderValue, Method, Request, StatusCode};

// Support code shared with the integration tests, as hyper's benches share theirs.
#[path = "../tests/it/support/config.rs"]
mod config;

use config::{CLIENT_ID, RouteBuilder, SidecarConfig};
use token_sidecar::phases::{self, Ctx, Listener, Proxy};
use token_sidecar::{
    Algorithm, Config, DevClient, DevServer, DevServerConfig, Sidecar, SigningKey, sign_assertion,
};

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

/// Three routes, built with the same typed builder the integration tests use.
fn config(token_url: &str) -> Config {
    SidecarConfig::new(token_url, fixture("ec_p256_sec1.pem"))
        .route(
            RouteBuilder::path("orders", "/orders/", "http://127.0.0.1:9/api/")
                .scope(&[SCOPE])
                .audience(&[AUDIENCE]),
        )
        .route(
            RouteBuilder::path("billing", "/billing/", "http://127.0.0.1:9/")
                .with(|r| r.strip_prefix = false)
                .scope(&["billing:read"])
                .audience(&["https://billing.internal.example.com"]),
        )
        .route(RouteBuilder::host(
            "admin",
            "admin.internal.example.com",
            "http://127.0.0.1:9/",
        ))
        .build()
}

/// Everything the benchmarks need, alive for the whole run.
struct Fixture {
    _rt: tokio::runtime::Runtime,
    _authz: DevServer,
    _sidecar: Sidecar,
    proxy: Arc<Proxy>,
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
    let (authz, sidecar) = rt.block_on(async {
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
            federations: vec![],
            token_ttl: Duration::from_secs(3600),
        })
        .await
        .expect("dev server starts");
        let sidecar = Sidecar::bind(config(authz.token_url()))
            .await
            .expect("sidecar binds");
        (authz, sidecar)
    });
    let proxy = sidecar.proxy();

    // Wait for the refresher's first token of the benchmarked route, inside the runtime (the
    // wait is bounded by the token request timeout); from then on a poll outside it is a hit.
    let req = downstream_request(&downstream_headers());
    rt.block_on(async {
        let mut ctx = Ctx::new(&req, false);
        let route = proxy.route(Listener::Main, &req, &mut ctx).expect("routed");
        phases::token(route, &mut ctx)
            .await
            .expect("the refresher fills the slot");
    });
    Fixture {
        _rt: rt,
        _authz: authz,
        _sidecar: sidecar,
        proxy,
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

fn hot_path(c: &mut Criterion) {
    let f = setup();
    let proxy = &*f.proxy;
    let headers = downstream_headers();
    let req = downstream_request(&headers);
    let mut ctx = Ctx::new(&req, false);
    let route = proxy.route(Listener::Main, &req, &mut ctx).expect("routed");
    let lease = poll_once(phases::token(route, &mut ctx))
        .expect("a filled slot answers on the first poll")
        .expect("a usable token");

    c.bench_function("cache/hit", |b| {
        b.iter(|| black_box(poll_once(phases::token(black_box(route), &mut ctx))))
    });

    c.bench_function("request/build", |b| {
        b.iter_batched(
            || downstream_request(&headers).into_parts().0,
            |mut parts| {
                phases::upstream_request(route, &mut parts, &ctx).expect("mappable");
                phases::authorize(&mut parts, &lease);
                parts
            },
            BatchSize::SmallInput,
        )
    });

    c.bench_function("hot_path/hit_and_build", |b| {
        b.iter_batched(
            || downstream_request(&headers),
            |req| {
                let mut ctx = Ctx::new(&req, false);
                let route = proxy.route(Listener::Main, &req, &mut ctx).expect("routed");
                let lease = poll_once(phases::token(route, &mut ctx))
                    .expect("ready")
                    .expect("token");
                let (mut parts, _) = req.into_parts();
                phases::upstream_request(route, &mut parts, &ctx).expect("mappable");
                phases::authorize(&mut parts, &lease);
                parts
            },
            BatchSize::SmallInput,
        )
    });

    c.bench_function("route/route", |b| {
        b.iter(|| {
            let mut ctx = Ctx::new(&req, false);
            proxy
                .route(Listener::Main, black_box(&req), &mut ctx)
                .is_ok()
        })
    });

    c.bench_function("log/metrics", |b| {
        b.iter(|| proxy.log(black_box(&ctx), black_box(StatusCode::OK)))
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
                sign_assertion(
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
