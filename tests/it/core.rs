//! The main job (docs/spec.md §1–§3) against oidc-provider and the dev server: tokens are real, verified, scoped, cached and shared.

use std::collections::HashSet;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::against_both;
use crate::support::idp::{BILLING, Idp, Kind, ORDERS};
use crate::support::upstream::Upstream;
use crate::support::{CLIENT_ID, RouteBuilder, Running, SidecarConfig, fixture, http_client};

against_both!(
    upstream_receives_a_verified_token_and_the_request_intact,
    every_key_format_and_algorithm_family_gets_a_token,
    tokens_are_per_scope_and_audience_set,
    concurrent_misses_make_one_token_request,
    short_lived_tokens_are_refreshed_ahead_without_blocking_requests,
    rejections_from_the_real_server_are_502_token_rejected,
);

/// A server that knows our client (with `key_file`'s public key) and two resource servers.
async fn provider(kind: Kind, key_file: &str, alg: Option<&str>, ttl_secs: u64) -> Idp {
    Idp::start(kind, key_file, alg, Duration::from_secs(ttl_secs)).await
}

fn scopes_of(claims: &serde_json::Value) -> HashSet<String> {
    claims["scope"]
        .as_str()
        .unwrap_or("")
        .split(' ')
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

fn aud_of(claims: &serde_json::Value) -> Vec<String> {
    match &claims["aud"] {
        serde_json::Value::String(s) => vec![s.clone()],
        serde_json::Value::Array(a) => a
            .iter()
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect(),
        _ => vec![],
    }
}

/// Test 1: the upstream gets a verifiable token for the route's scopes and audience, and the
/// request arrives intact (prefix stripped, query and body unchanged, caller's Authorization and
/// hop-by-hop headers gone, Host set to the upstream).
async fn upstream_receives_a_verified_token_and_the_request_intact(kind: Kind) {
    let idp = provider(kind, "ec_p256_sec1.pem", None, 300).await;
    let up = Upstream::start().await;
    let sc = Running::start(
        SidecarConfig::new(&idp.token_url(), fixture("ec_p256_sec1.pem")).route(
            RouteBuilder::path("orders", "/orders/", &up.url())
                .scope(&["orders:write", "orders:read"])
                .audience(&[ORDERS]),
        ),
    )
    .await;

    let client = http_client();
    let resp = client
        .get(sc.url("/orders/42?x=1&y=a%20b&y=2"))
        .header(
            "authorization",
            "Bearer the-application-must-not-choose-this",
        )
        .header("connection", "x-hop-header")
        .header("x-hop-header", "hop")
        .header("x-end-to-end", "kept")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-upstream"], "recorder");

    let body = vec![7u8; 100_000];
    let resp = client
        .post(sc.url("/orders/42/items"))
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);

    let got = up.received();
    assert_eq!(got.len(), 2);
    assert_eq!(got[0].method, "GET");
    assert_eq!(got[0].path_and_query, "/42?x=1&y=a%20b&y=2");
    assert_eq!(got[0].headers["host"], up.addr.to_string().as_str());
    assert_eq!(got[0].headers["x-end-to-end"], "kept");
    assert!(got[0].headers.get("x-hop-header").is_none());
    assert_eq!(got[1].method, "POST");
    assert_eq!(got[1].path_and_query, "/42/items");
    assert_eq!(got[1].body.as_deref(), Some(&body[..]));

    let token = got[0].bearer().expect("a bearer token");
    assert_ne!(token, "the-application-must-not-choose-this");
    let claims = idp.verify_access_token(&token).await;
    assert_eq!(aud_of(&claims), vec![ORDERS.to_string()]);
    assert_eq!(
        scopes_of(&claims),
        HashSet::from(["orders:read".to_string(), "orders:write".to_string()])
    );
    assert_eq!(claims["client_id"], CLIENT_ID);
    assert_eq!(
        got[1].bearer().unwrap(),
        token,
        "the second request reuses the cached token"
    );
    assert_eq!(idp.token_requests().await, 1);
    sc.stop().await;
}

/// Test 2: one key per algorithm family gets a token from the real server.
async fn every_key_format_and_algorithm_family_gets_a_token(kind: Kind) {
    let cases: &[(&str, Option<&str>)] = &[
        ("rsa_pkcs1.pem", None),          // RS256, PKCS#1 PEM
        ("rsa_pkcs8.pem", Some("PS256")), // PS256, PKCS#8 PEM
        ("rsa_pkcs8.pem", Some("RS512")),
        ("ec_p256_sec1.pem", None),      // ES256, SEC1 PEM
        ("ec_p384_sec1.pem", None),      // ES384, SEC1 PEM
        ("ed25519_pkcs8.pem", None),     // EdDSA, PKCS#8 PEM
        ("ec_p256.jwk.json", None),      // ES256 from a private JWK with its own kid
        ("rsa.jwk.json", Some("PS384")), // RSA private JWK
        ("ed25519.jwk.json", None),      // OKP private JWK
    ];
    let up = Upstream::start().await;
    for (file, alg) in cases {
        let idp = provider(kind, file, *alg, 300).await;
        let sc = Running::start(
            SidecarConfig::new(&idp.token_url(), fixture(file))
                .token(|t| t.signing_alg = alg.map(str::to_string))
                .route(
                    RouteBuilder::path("orders", "/orders/", &up.url())
                        .scope(&["orders:read"])
                        .audience(&[ORDERS]),
                ),
        )
        .await;
        let resp = http_client().get(sc.url("/orders/x")).send().await.unwrap();
        assert_eq!(
            resp.status(),
            200,
            "{file} {alg:?}: {}",
            resp.text().await.unwrap_or_default()
        );
        let token = up.received().last().unwrap().bearer().unwrap();
        let claims = idp.verify_access_token(&token).await;
        assert_eq!(aud_of(&claims), vec![ORDERS.to_string()], "{file}");
        sc.stop().await;
    }
}

/// Test 3: different (scope, audience) sets get different tokens; equal sets share one.
async fn tokens_are_per_scope_and_audience_set(kind: Kind) {
    let idp = provider(kind, "ec_p256_sec1.pem", None, 300).await;
    let up = Upstream::start().await;
    let routes = [
        RouteBuilder::path("read", "/read/", &up.url())
            .scope(&["orders:read"])
            .audience(&[ORDERS]),
        RouteBuilder::path("write", "/write/", &up.url())
            .scope(&["orders:write", "orders:read"])
            .audience(&[ORDERS]),
        // Same sets as "write", other order and a duplicate: must share its token.
        RouteBuilder::path("write-too", "/write-too/", &up.url())
            .scope(&["orders:read", "orders:write", "orders:read"])
            .audience(&[ORDERS]),
        RouteBuilder::path("billing", "/billing/", &up.url())
            .scope(&["billing:read"])
            .audience(&[BILLING]),
    ];
    let sc = Running::start(
        SidecarConfig::new(&idp.token_url(), fixture("ec_p256_sec1.pem")).routes(routes),
    )
    .await;
    sc.wait_ready().await;
    let client = http_client();
    for p in ["/read/a", "/write/b", "/write-too/c", "/billing/d"] {
        assert_eq!(
            client.get(sc.url(p)).send().await.unwrap().status(),
            200,
            "{p}"
        );
    }
    let got = up.received();
    let tokens: Vec<String> = got.iter().map(|r| r.bearer().unwrap()).collect();
    assert_ne!(tokens[0], tokens[1]);
    assert_eq!(tokens[1], tokens[2]);
    assert_ne!(tokens[3], tokens[0]);
    assert_ne!(tokens[3], tokens[1]);

    let read = idp.verify_access_token(&tokens[0]).await;
    assert_eq!(scopes_of(&read), HashSet::from(["orders:read".to_string()]));
    let write = idp.verify_access_token(&tokens[1]).await;
    assert_eq!(scopes_of(&write).len(), 2);
    let billing = idp.verify_access_token(&tokens[3]).await;
    assert_eq!(aud_of(&billing), vec![BILLING.to_string()]);
    assert_eq!(
        scopes_of(&billing),
        HashSet::from(["billing:read".to_string()])
    );
    assert_eq!(
        idp.token_requests().await,
        3,
        "one token request per distinct set"
    );
    sc.stop().await;
}

/// Test 4: 500 concurrent requests on an empty cache cause exactly one token request.
async fn concurrent_misses_make_one_token_request(kind: Kind) {
    let idp = provider(kind, "ec_p256_sec1.pem", None, 300).await;
    let up = Upstream::start().await;
    let sc = Running::start(
        SidecarConfig::new(&idp.token_url(), fixture("ec_p256_sec1.pem")).route(
            RouteBuilder::path("orders", "/orders/", &up.url())
                .scope(&["orders:read"])
                .audience(&[ORDERS]),
        ),
    )
    .await;
    let client = http_client();
    let requests = (0..500).map(|i| {
        let client = client.clone();
        let url = sc.url(&format!("/orders/{i}"));
        async move { client.get(url).send().await.map(|r| r.status().as_u16()) }
    });
    let statuses = futures_util::future::join_all(requests).await;
    let ok = statuses.iter().filter(|s| matches!(s, Ok(200))).count();
    assert_eq!(
        ok,
        500,
        "{:?}",
        statuses
            .iter()
            .filter(|s| !matches!(s, Ok(200)))
            .take(5)
            .collect::<Vec<_>>()
    );
    assert_eq!(
        idp.token_requests().await,
        1,
        "counted at the authorization server"
    );
    let distinct: HashSet<String> = up.received().iter().map(|r| r.bearer().unwrap()).collect();
    assert_eq!(distinct.len(), 1);
    sc.stop().await;
}

/// Test 5: with 5-second tokens, 20 s of steady traffic: no failure, no request waits on the
/// token endpoint once the first token is cached, and every request carries a token that is
/// still at least `expiry_skew` from its expiry (so refreshes happened ahead of time).
async fn short_lived_tokens_are_refreshed_ahead_without_blocking_requests(kind: Kind) {
    let idp = provider(kind, "ec_p256_sec1.pem", None, 5).await;
    let up = Upstream::start().await;
    let sc = Running::start(
        SidecarConfig::new(&idp.token_url(), fixture("ec_p256_sec1.pem"))
            .token(|t| {
                t.refresh_before_expiry = Duration::from_secs(2);
                t.expiry_skew = Duration::from_secs(1);
            })
            .route(
                RouteBuilder::path("orders", "/orders/", &up.url())
                    .scope(&["orders:read"])
                    .audience(&[ORDERS]),
            ),
    )
    .await;
    sc.wait_ready().await;
    let slot = sc.cache.slots()[0].clone();
    let misses_before = slot.stats.misses();

    let client = http_client();
    let start = tokio::time::Instant::now();
    let mut sent_at = Vec::new();
    while start.elapsed() < Duration::from_secs(20) {
        let now_unix = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        let resp = client.get(sc.url("/orders/tick")).send().await.unwrap();
        assert_eq!(
            resp.status(),
            200,
            "{}",
            resp.text().await.unwrap_or_default()
        );
        sent_at.push(now_unix);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let misses_after = slot.stats.misses();
    assert_eq!(
        misses_after, misses_before,
        "a request waited for the token endpoint"
    );

    let got = up.received();
    assert_eq!(got.len(), sent_at.len());
    let mut distinct = HashSet::new();
    for (r, at) in got.iter().zip(&sent_at) {
        let token = r.bearer().unwrap();
        let exp = token_sidecar::jwt_exp(&token).unwrap() as f64;
        // exp has whole-second resolution: allow for that, but never within the 1 s skew.
        assert!(
            exp - at > 0.0,
            "a token was sent {:.2}s before its expiry",
            exp - at
        );
        distinct.insert(token);
    }
    // 20 s of 5 s tokens refreshed at 3 s: at least 5 distinct tokens, each fetched once.
    assert!(
        distinct.len() >= 5,
        "only {} tokens in 20 s",
        distinct.len()
    );
    let fetched = idp.token_requests().await;
    assert!(
        fetched as usize <= distinct.len() + 1,
        "{fetched} token requests for {} tokens",
        distinct.len()
    );
    sc.stop().await;
}

/// Test 6 (real server part): a refused client and a refused scope are 502 `token_rejected`
/// naming the server's code, and nothing reaches the upstream.
async fn rejections_from_the_real_server_are_502_token_rejected(kind: Kind) {
    // The server knows the client by another key: every assertion fails verification.
    let idp = provider(kind, "ec_p384_sec1.pem", None, 300).await;
    let up = Upstream::start().await;
    let sc = Running::start(
        SidecarConfig::new(&idp.token_url(), fixture("ec_p256_sec1.pem")).route(
            RouteBuilder::path("orders", "/orders/", &up.url())
                .scope(&["orders:read"])
                .audience(&[ORDERS]),
        ),
    )
    .await;
    let resp = http_client().get(sc.url("/orders/1")).send().await.unwrap();
    assert_eq!(resp.status(), 502);
    assert_eq!(resp.headers()["token-sidecar-error"], "token_rejected");
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["error"], "token_rejected");
    assert_eq!(body["route"], "orders");
    assert!(
        body["error_description"]
            .as_str()
            .unwrap()
            .contains("invalid_client"),
        "{body}"
    );
    sc.stop().await;

    let idp = provider(kind, "ec_p256_sec1.pem", None, 300).await;
    let sc = Running::start(
        SidecarConfig::new(&idp.token_url(), fixture("ec_p256_sec1.pem")).route(
            RouteBuilder::path("orders", "/orders/", &up.url())
                .scope(&["orders:delete"])
                .audience(&[ORDERS]),
        ),
    )
    .await;
    let resp = http_client().get(sc.url("/orders/1")).send().await.unwrap();
    assert_eq!(resp.status(), 502);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert!(
        body["error_description"]
            .as_str()
            .unwrap()
            .contains("invalid_scope"),
        "{body}"
    );
    assert_eq!(up.count(), 0, "nothing is forwarded without a token");
    sc.stop().await;
}
