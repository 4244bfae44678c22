//! docs/reliability.md §2: the eviction gate. An upstream that rejects the sidecar's tokens
//! gets a new token at most once per `token.min_refetch_interval` (doubling while the fresh
//! tokens are rejected too), so it cannot turn application requests into token requests.

use std::time::Duration;

use tokio::time::Instant;

use crate::support::idp::{Idp, Kind};
use crate::support::upstream::Upstream;
use crate::support::{Running, http_client, orders_config};

/// `token_sidecar_token_evictions_total{route="orders"}` from the admin listener.
async fn evictions_metric(sc: &Running) -> u64 {
    let text = http_client()
        .get(format!("http://{}/metrics", sc.admin))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix("token_sidecar_token_evictions_total{route=\"orders\"} "))
        .unwrap_or_else(|| panic!("no evictions metric in:\n{text}"))
        .parse()
        .unwrap()
}

/// The bound, at the default interval (10 s) and in real time: an upstream that
/// answers every request for 60 s with 401 `invalid_token`, at 50 requests/s, costs at most 6
/// token requests. With the doubling it is 3: evictions at 0, 10 and 30 s (the next would be at
/// 70 s). Every application request gets the upstream's own 401.
#[tokio::test]
async fn an_upstream_rejecting_every_token_for_60_s_at_50_rps_costs_at_most_6_token_requests() {
    let idp = Idp::start(
        Kind::DevServer,
        "ec_p256_sec1.pem",
        None,
        Duration::from_secs(3600),
    )
    .await;
    let up = Upstream::start().await;
    let sc = Running::start(orders_config(&idp.token_url(), &up.url(), |_| {})).await;
    sc.wait_ready().await;
    let before = idp.token_requests().await;

    let client = http_client();
    let mut ticker = tokio::time::interval(Duration::from_millis(20));
    let t0 = Instant::now();
    let mut in_flight = Vec::new();
    while t0.elapsed() < Duration::from_secs(60) {
        ticker.tick().await;
        let client = client.clone();
        let url = sc.url("/orders/always-401");
        in_flight.push(tokio::spawn(async move {
            let r = client.get(url).send().await.unwrap();
            (
                r.status().as_u16(),
                r.headers().contains_key("token-sidecar-error"),
            )
        }));
    }
    let mut answers = Vec::new();
    for h in in_flight {
        answers.push(h.await.unwrap());
    }
    let token_requests = idp.token_requests().await - before;

    assert!(answers.len() >= 2900, "{} requests", answers.len());
    assert!(
        answers.iter().all(|a| *a == (401, false)),
        "every request gets the upstream's 401"
    );
    assert!(
        token_requests <= 6,
        "{token_requests} token requests for {} application requests",
        answers.len()
    );
    assert_eq!(
        token_requests, 3,
        "evictions at 0, 10 and 30 s: the interval doubles while fresh tokens are rejected"
    );
    assert_eq!(evictions_metric(&sc).await, token_requests);
    sc.stop().await;
}

/// Inside the interval a freshly rejected token stays cached: the request gets the upstream's
/// 401, unreplayed, and no token is requested. After the interval the next rejection evicts it
/// again. A request that succeeds with the token fetched after an eviction resets the interval
/// to its minimum (2 s here, to keep the test short; the rule does not depend on the value).
#[tokio::test]
async fn a_rejected_fresh_token_is_held_for_the_interval_and_a_success_resets_it() {
    let idp = Idp::start(
        Kind::DevServer,
        "ec_p256_sec1.pem",
        None,
        Duration::from_secs(3600),
    )
    .await;
    let up = Upstream::start().await;
    let interval = Duration::from_secs(2);
    let sc = Running::start(orders_config(&idp.token_url(), &up.url(), |t| {
        t.min_refetch_interval = interval;
    }))
    .await;
    sc.wait_ready().await;
    let client = http_client();
    let get = |path: &str| client.get(sc.url(path)).send();

    assert_eq!(get("/orders/a").await.unwrap().status(), 200);
    let t1 = up.received()[0].bearer().unwrap();
    let fetched = idp.token_requests().await;

    // First rejection: evicted, replayed with a fresh token (the replay succeeds).
    up.revoke(&t1);
    let evicted_1 = Instant::now();
    assert_eq!(get("/orders/b").await.unwrap().status(), 200);
    let t2 = up.received().last().unwrap().bearer().unwrap();
    assert_ne!(t2, t1);
    assert_eq!(idp.token_requests().await, fetched + 1);

    // The fresh token is rejected within the interval: kept, the 401 goes back, no replay.
    up.revoke(&t2);
    let seen = up.count();
    let resp = get("/orders/c").await.unwrap();
    assert_eq!(resp.status(), 401);
    assert!(resp.headers().get("token-sidecar-error").is_none());
    assert_eq!(
        up.count(),
        seen + 1,
        "not replayed: the replay would carry the same token"
    );
    assert_eq!(up.received().last().unwrap().bearer().unwrap(), t2);
    assert_eq!(idp.token_requests().await, fetched + 1, "no token request");

    // After the interval: evicted again, replayed with a third token.
    tokio::time::sleep_until(evicted_1 + interval + Duration::from_millis(100)).await;
    let evicted_2 = Instant::now();
    assert_eq!(get("/orders/d").await.unwrap().status(), 200);
    let t3 = up.received().last().unwrap().bearer().unwrap();
    assert_ne!(t3, t2);

    // t2 had succeeded (the replay of /orders/b) before it was rejected, so the second
    // eviction did not double the interval; nor does the third, after t3's success above.
    up.revoke(&t3);
    tokio::time::sleep_until(evicted_2 + interval + Duration::from_millis(100)).await;
    assert_eq!(get("/orders/e").await.unwrap().status(), 200);
    assert_eq!(idp.token_requests().await, fetched + 3);
    assert_eq!(evictions_metric(&sc).await, 3);
    sc.stop().await;
}
