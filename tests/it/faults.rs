//! docs/reliability.md §1 and docs/spec.md §5: the token endpoint failing. With a usable cached token requests keep succeeding;
//! without one they fail fast with 503 `token_unavailable`, never hang. What an outage costs
//! the server: one request per key per 5 s once it has lasted 30 s, `Retry-After` honoured.

use std::time::Duration;

use tokio::time::Instant;

use crate::support::faults::{FakeTokenEndpoint, Mode};
use crate::support::upstream::Upstream;
use token_sidecar::AudienceParam;

use crate::support::{RouteBuilder, Running, SidecarConfig, fixture, http_client, orders_config};

#[tokio::test]
async fn a_cached_token_outlives_500s_hangs_and_garbage() {
    let idp = FakeTokenEndpoint::start(Mode::Issue(Duration::from_secs(10))).await;
    let up = Upstream::start().await;
    // 10 s tokens refreshed from 2 s on, usable until 9 s: the failures below all happen while
    // the first token is still usable.
    let sc = Running::start(orders_config(&idp.token_url(), &up.url(), |t| {
        t.refresh_at = 0.2;
        t.expiry_skew = Duration::from_secs(1);
        t.request_timeout = Duration::from_secs(1);
        t.retry_backoff_max = Duration::from_millis(500);
    }))
    .await;
    sc.wait_ready().await;
    let ready_at = Instant::now();
    assert_eq!(idp.requests(), 1);

    let client = http_client();
    let phases = [
        (Mode::Status500, 3.0),
        (Mode::Hang, 5.5),
        (Mode::Garbage, 8.0),
    ];
    for (mode, until) in phases {
        idp.set_mode(mode.clone());
        while ready_at.elapsed().as_secs_f64() < until {
            let resp = client.get(sc.url("/orders/x")).send().await.unwrap();
            assert_eq!(resp.status(), 200, "{mode:?} at {:?}", ready_at.elapsed());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let slot = sc.cache.slots()[0].clone();
    assert!(slot.is_failing());
    assert!(
        idp.requests() > 3,
        "refreshes were attempted: {}",
        idp.requests()
    );
    let tokens: std::collections::HashSet<String> =
        up.received().iter().map(|r| r.bearer().unwrap()).collect();
    assert_eq!(tokens.len(), 1);

    // Past the token's usable life the endpoint still sends garbage: fail fast with 503.
    while ready_at.elapsed() < Duration::from_millis(9300) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let before = up.count();
    let t = Instant::now();
    let resp = client.get(sc.url("/orders/x")).send().await.unwrap();
    assert!(
        t.elapsed() < Duration::from_millis(2500),
        "took {:?}",
        t.elapsed()
    );
    assert_eq!(resp.status(), 503);
    assert_eq!(resp.headers()["token-sidecar-error"], "token_unavailable");
    assert!(resp.headers().contains_key("retry-after"));
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["error"], "token_unavailable");
    assert_eq!(up.count(), before, "nothing forwarded without a token");

    // The endpoint comes back: requests succeed again within the backoff cap.
    idp.set_mode(Mode::Issue(Duration::from_secs(10)));
    let back = Instant::now();
    loop {
        let resp = client.get(sc.url("/orders/x")).send().await.unwrap();
        if resp.status() == 200 {
            break;
        }
        assert!(
            back.elapsed() < Duration::from_secs(3),
            "no recovery in 3 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    sc.stop().await;
}

#[tokio::test]
async fn a_hanging_endpoint_with_no_token_gives_503_within_the_timeout() {
    let idp = FakeTokenEndpoint::start(Mode::Hang).await;
    let up = Upstream::start().await;
    let sc = Running::start(orders_config(&idp.token_url(), &up.url(), |t| {
        t.request_timeout = Duration::from_secs(1);
    }))
    .await;
    let t = Instant::now();
    let resp = http_client().get(sc.url("/orders/x")).send().await.unwrap();
    let took = t.elapsed();
    assert_eq!(resp.status(), 503);
    assert_eq!(resp.headers()["token-sidecar-error"], "token_unavailable");
    // Bounded by request_timeout (1 s) plus the wait margin, never a hang.
    assert!(took < Duration::from_millis(2500), "took {took:?}");
    assert_eq!(up.count(), 0);
    sc.stop().await;
}

#[tokio::test]
async fn an_unreachable_endpoint_gives_503_and_is_not_hammered() {
    // A port with nothing listening: connection refused.
    let port = crate::support::process::free_port();
    let up = Upstream::start().await;
    let sc = Running::start(orders_config(
        &format!("http://127.0.0.1:{port}/oauth2/token"),
        &up.url(),
        |t| t.retry_backoff_max = Duration::from_secs(1),
    ))
    .await;
    let client = http_client();
    let start = Instant::now();
    let mut n = 0;
    while start.elapsed() < Duration::from_secs(3) {
        let t = Instant::now();
        let resp = client.get(sc.url("/orders/x")).send().await.unwrap();
        assert_eq!(resp.status(), 503);
        assert!(t.elapsed() < Duration::from_secs(2));
        n += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(n > 20);
    // Backoff: the refresher retries at most about once per 0.1–1 s (3 attempts per fetch),
    // whatever the request rate.
    let fetches = sc.cache.fetches();
    assert!(fetches <= 12, "{fetches} fetches in 3 s for {n} requests");
    sc.stop().await;
}

#[tokio::test]
async fn a_rejection_is_502_token_rejected_with_the_server_code() {
    let idp = FakeTokenEndpoint::start(Mode::Reject("unauthorized_client")).await;
    let up = Upstream::start().await;
    let sc = Running::start(orders_config(&idp.token_url(), &up.url(), |_| {})).await;
    let resp = http_client().get(sc.url("/orders/x")).send().await.unwrap();
    assert_eq!(resp.status(), 502);
    assert_eq!(resp.headers()["token-sidecar-error"], "token_rejected");
    assert!(resp.headers().get("retry-after").is_none());
    let body: serde_json::Value = resp.json().await.unwrap();
    assert!(
        body["error_description"]
            .as_str()
            .unwrap()
            .contains("unauthorized_client")
    );
    // Not retried: a configuration problem.
    assert_eq!(idp.requests(), 1);
    assert_eq!(up.count(), 0);
    sc.stop().await;
}

#[tokio::test]
async fn the_token_request_carries_the_spec_parameters() {
    let idp = FakeTokenEndpoint::start(Mode::Issue(Duration::from_secs(300))).await;
    let up = Upstream::start().await;
    let route = RouteBuilder::path("a", "/a/", &up.url())
        .scope(&["s2", "s1", "s2"])
        .audience(&["https://b.example", "https://a.example"]);
    let sc = Running::start(
        SidecarConfig::new(&idp.token_url(), fixture("ec_p256_sec1.pem"))
            .token(|t| {
                t.extra_params.insert("tenant".into(), "t1".into());
            })
            .route(route.clone()),
    )
    .await;
    sc.wait_ready().await;
    let form: Vec<(String, String)> = url::form_urlencoded::parse(idp.last_form().as_bytes())
        .into_owned()
        .collect();
    let get = |k: &str| {
        form.iter()
            .filter(|(n, _)| n == k)
            .map(|(_, v)| v.clone())
            .collect::<Vec<_>>()
    };
    assert_eq!(get("grant_type"), ["client_credentials"]);
    assert_eq!(get("client_id"), [crate::support::CLIENT_ID]);
    assert_eq!(
        get("client_assertion_type"),
        ["urn:ietf:params:oauth:client-assertion-type:jwt-bearer"]
    );
    assert_eq!(get("scope"), ["s1 s2"]);
    assert_eq!(get("audience"), ["https://a.example https://b.example"]);
    assert_eq!(get("tenant"), ["t1"]);
    let assertion = &get("client_assertion")[0];
    let claims = token_sidecar::jwt_claims(assertion).unwrap();
    assert_eq!(claims["iss"], crate::support::CLIENT_ID);
    assert_eq!(claims["sub"], crate::support::CLIENT_ID);
    assert_eq!(claims["aud"], idp.token_url().as_str());
    assert!(
        claims.get("scope").is_none(),
        "scopes go in the form, not the assertion"
    );
    sc.stop().await;

    // RFC 8707 style: one resource parameter per audience.
    let sc = Running::start(
        SidecarConfig::new(&idp.token_url(), fixture("ec_p256_sec1.pem"))
            .token(|t| t.audience_param = AudienceParam::Resource)
            .route(route),
    )
    .await;
    sc.wait_ready().await;
    let form: Vec<(String, String)> = url::form_urlencoded::parse(idp.last_form().as_bytes())
        .into_owned()
        .collect();
    let resources: Vec<&str> = form
        .iter()
        .filter(|(n, _)| n == "resource")
        .map(|(_, v)| v.as_str())
        .collect();
    assert_eq!(resources, ["https://a.example", "https://b.example"]);
    assert!(!form.iter().any(|(n, _)| n == "audience"));
    sc.stop().await;
}

/// Hydra's `jti_known` is retried with a new assertion (new jti), bounded by max_attempts.
#[tokio::test]
async fn jti_known_is_retried_with_a_fresh_assertion() {
    let idp = FakeTokenEndpoint::start(Mode::Reject("jti_known")).await;
    let up = Upstream::start().await;
    let sc = Running::start(orders_config(&idp.token_url(), &up.url(), |t| {
        t.max_attempts = 3;
        t.retry_backoff_max = Duration::from_secs(10);
    }))
    .await;
    let resp = http_client().get(sc.url("/orders/x")).send().await.unwrap();
    assert_eq!(
        resp.status(),
        503,
        "retryable, so unavailable rather than rejected"
    );
    let forms = idp.forms();
    assert_eq!(forms.len(), 3, "one fetch, three attempts");
    let jtis: std::collections::HashSet<String> = forms
        .iter()
        .map(|f| {
            let assertion = url::form_urlencoded::parse(f.as_bytes())
                .find(|(k, _)| k == "client_assertion")
                .unwrap()
                .1
                .into_owned();
            token_sidecar::jwt_claims(&assertion).unwrap()["jti"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(jtis.len(), 3, "every attempt signs a new assertion");
    sc.stop().await;
}

/// Docs/reliability.md §1, the server's side: no token and an endpoint answering 500 for 40 s.
/// Once the outage has lasted 30 s the key asks once per 5 s (the default
/// `retry_backoff_max`), and it has its token within 5 s of the endpoint coming back.
#[tokio::test]
async fn an_outage_costs_one_token_request_per_5_s_and_a_key_is_back_within_5_s() {
    let idp = FakeTokenEndpoint::start(Mode::Status500).await;
    let up = Upstream::start().await;
    let sc = Running::start(orders_config(&idp.token_url(), &up.url(), |_| {})).await;
    let t0 = Instant::now();
    let client = http_client();
    // Requests meanwhile fail fast and never reach the token endpoint themselves.
    let mut n = 0;
    while t0.elapsed() < Duration::from_secs(30) {
        let resp = client.get(sc.url("/orders/x")).send().await.unwrap();
        assert_eq!(resp.status(), 503);
        n += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let at_30 = idp.requests();
    // The ramp (200 ms doubling, then the phase-setting pause), then every 5 s.
    assert!(at_30 <= 6 + 30 / 5 + 1, "{at_30} token requests in 30 s");
    tokio::time::sleep_until(t0 + Duration::from_secs(40)).await;
    let settled = idp.requests() - at_30;
    assert!(
        settled <= 10 / 5 + 1,
        "{settled} token requests between 30 and 40 s ({n} application requests)"
    );

    idp.set_mode(Mode::Issue(Duration::from_secs(300)));
    let back = Instant::now();
    loop {
        let resp = client.get(sc.url("/orders/x")).send().await.unwrap();
        if resp.status() == 200 {
            break;
        }
        // 5 s is the promise; the margin is this loop's polling and the attempt itself.
        assert!(
            back.elapsed() < Duration::from_millis(5300),
            "no token {:?} after the endpoint came back",
            back.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    sc.stop().await;
}

/// `Retry-After` on 429 (delta-seconds) and 503 (HTTP-date) holds the next token request back
/// for at least that long; the application's 503 passes the wait on in its own Retry-After.
#[tokio::test]
async fn retry_after_on_429_and_503_is_honoured() {
    let idp = FakeTokenEndpoint::start(Mode::Throttle {
        status: 429,
        after: 3,
        as_date: false,
    })
    .await;
    let up = Upstream::start().await;
    let sc = Running::start(orders_config(&idp.token_url(), &up.url(), |_| {})).await;
    let client = http_client();
    let resp = client.get(sc.url("/orders/x")).send().await.unwrap();
    let first = Instant::now();
    assert_eq!(resp.status(), 503);
    let hint: u64 = resp.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(hint >= 3, "Retry-After {hint} passed on to the application");
    assert_eq!(idp.requests(), 1);
    tokio::time::sleep(Duration::from_millis(2800)).await;
    assert_eq!(
        idp.requests(),
        1,
        "nothing within the 3 s the server asked for"
    );

    // The next answer asks for 4 s as an HTTP-date (whole seconds: at least 3 s from now).
    idp.set_mode(Mode::Throttle {
        status: 503,
        after: 4,
        as_date: true,
    });
    let deadline = first + Duration::from_secs(3 + 5 + 1);
    while idp.requests() < 2 {
        assert!(Instant::now() < deadline, "the second request never came");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(2800)).await;
    assert_eq!(
        idp.requests(),
        2,
        "nothing within the 3–4 s of the HTTP-date"
    );

    idp.set_mode(Mode::Issue(Duration::from_secs(300)));
    let deadline = Instant::now() + Duration::from_secs(4 + 5 + 1);
    loop {
        if client
            .get(sc.url("/orders/x"))
            .send()
            .await
            .unwrap()
            .status()
            == 200
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no token after the throttling ended"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    sc.stop().await;
}
