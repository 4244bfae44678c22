//! Routing and its refusals (docs/spec.md §4 matching, §5 errors): no route, dot segments,
//! upstream down, upstream slow; plus matching by dedicated port, host and absolute form.

use std::time::Duration;

use crate::support::config::LOOPBACK_ANY;
use crate::support::faults::{FakeTokenEndpoint, Mode};
use crate::support::upstream::Upstream;
use crate::support::{RouteBuilder, Running, SidecarConfig, fixture, http_client};

async fn idp() -> FakeTokenEndpoint {
    FakeTokenEndpoint::start(Mode::Issue(Duration::from_secs(300))).await
}

#[tokio::test]
async fn no_route_is_404_and_nothing_is_forwarded() {
    let idp = idp().await;
    let up = Upstream::start().await;
    let sc = Running::start(
        SidecarConfig::new(&idp.token_url(), fixture("ec_p256_sec1.pem"))
            .route(RouteBuilder::path("orders", "/orders/", &up.url())),
    )
    .await;
    let client = http_client();
    for path in ["/", "/other/1", "/ordersX/1"] {
        let resp = client.get(sc.url(path)).send().await.unwrap();
        assert_eq!(resp.status(), 404, "{path}");
        assert_eq!(resp.headers()["token-sidecar-error"], "no_route");
        let body: serde_json::Value = resp.json().await.unwrap();
        assert_eq!(body["error"], "no_route");
        assert!(body["route"].is_null());
    }
    // Dot segments cannot climb out of the route's base path. (reqwest would normalize these
    // away before sending; hyper sends the target as written, like a hostile client would.)
    let raw: hyper_util::client::legacy::Client<_, http_body_util::Empty<bytes::Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build_http();
    for path in [
        "/orders/%2e%2e/admin",
        "/orders/../admin",
        "/orders/a/%2E%2e/%2e%2e/x",
    ] {
        let resp = raw.get(sc.url(path).parse().unwrap()).await.unwrap();
        assert_eq!(resp.status(), 400, "{path}");
        assert_eq!(resp.headers()["token-sidecar-error"], "bad_request");
    }
    assert_eq!(up.count(), 0);
    sc.stop().await;
}

#[tokio::test]
async fn upstream_down_is_502_and_slow_upstream_is_504() {
    let idp = idp().await;
    let up = Upstream::start().await;
    // A port with nothing listening: connection refused.
    let closed = format!("http://127.0.0.1:{}", crate::support::process::free_port());
    let routes = [
        RouteBuilder::path("down", "/down/", &closed),
        RouteBuilder::path("slow", "/slow/", &up.url()),
    ];
    let sc = Running::start(
        SidecarConfig::new(&idp.token_url(), fixture("ec_p256_sec1.pem")).routes(routes),
    )
    .await;
    sc.wait_ready().await;
    let client = http_client();

    let resp = client.get(sc.url("/down/x")).send().await.unwrap();
    assert_eq!(resp.status(), 502);
    assert_eq!(
        resp.headers()["token-sidecar-error"],
        "upstream_unavailable"
    );
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["route"], "down");

    // The route's timeout is 2 s (see support::config::RouteBuilder); the upstream takes 5 s.
    let t = tokio::time::Instant::now();
    let resp = client.get(sc.url("/slow/slow/5000")).send().await.unwrap();
    assert_eq!(resp.status(), 504);
    assert_eq!(resp.headers()["token-sidecar-error"], "upstream_timeout");
    assert!(t.elapsed() < Duration::from_secs(4));
    // Within its timeout the same upstream answers.
    let resp = client.get(sc.url("/slow/slow/100")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    sc.stop().await;
}

#[tokio::test]
async fn host_routes_absolute_form_and_dedicated_ports() {
    let idp = idp().await;
    let up_a = Upstream::start().await;
    let up_b = Upstream::start().await;
    let routes = [
        RouteBuilder::host("by-host", "orders.internal", &up_a.url()),
        RouteBuilder::dedicated("dedicated", LOOPBACK_ANY, &format!("{}/base", up_b.url()))
            .scope(&["x"]),
    ];
    let sc = Running::start(
        SidecarConfig::new(&idp.token_url(), fixture("ec_p256_sec1.pem")).routes(routes),
    )
    .await;
    sc.wait_ready().await;

    // Host header.
    let resp = http_client()
        .get(sc.url("/v1/items"))
        .header("host", "orders.internal")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(up_a.received()[0].path_and_query, "/v1/items");

    // HTTP_PROXY style absolute-form request for an http:// URL.
    let proxied = reqwest::Client::builder()
        .proxy(reqwest::Proxy::http(sc.url("")).unwrap())
        .build()
        .unwrap();
    let resp = proxied
        .get("http://orders.internal/v2/x?q=1")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(up_a.received()[1].path_and_query, "/v2/x?q=1");
    // A host no route names is not forwarded anywhere (no open proxy).
    let resp = proxied
        .get("http://elsewhere.example/")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
    assert_eq!(up_a.count() + up_b.count(), 2);

    // Unknown host on the main listener with no path routes: 404.
    let resp = http_client().get(sc.url("/v1/items")).send().await.unwrap();
    assert_eq!(resp.status(), 404);
    sc.stop().await;
}
