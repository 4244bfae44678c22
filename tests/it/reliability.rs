//! docs/reliability.md §1 (authorization-server outages), §2 (the upstream rejects the token:
//! evict, replay once) and §7 (clock skew between the sidecar and the token endpoint).

use std::collections::HashSet;
use std::time::Duration;

use tokio::time::Instant;

use crate::support::faults::{FakeTokenEndpoint, Mode};
use crate::support::idp::{Idp, Kind};
use crate::support::upstream::Upstream;

use crate::support::{Running, http_client, orders_config};

/// Promise 2: a 401 `invalid_token` evicts the token, one fresh token is fetched, and a small
/// buffered request is replayed once with it.
#[tokio::test]
async fn a_rejected_token_is_evicted_and_a_small_request_replayed_once() {
    let idp = FakeTokenEndpoint::start(Mode::Issue(Duration::from_secs(300))).await;
    let up = Upstream::start().await;
    let sc = Running::start(orders_config(&idp.token_url(), &up.url(), |_| {})).await;
    sc.wait_ready().await;
    let client = http_client();

    assert_eq!(
        client
            .get(sc.url("/orders/a"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let first = up.received()[0].bearer().unwrap();
    up.revoke(&first);

    let body = vec![b'p'; 10_000];
    let resp = client
        .post(sc.url("/orders/b"))
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "replayed with a fresh token");
    let got = up.received();
    assert_eq!(got.len(), 3, "the 401 and the replay");
    assert_eq!(got[1].bearer().unwrap(), first);
    let second = got[2].bearer().unwrap();
    assert_ne!(second, first);
    assert_eq!(
        got[2].body.as_deref(),
        Some(&body[..]),
        "the replay carries the same body"
    );
    assert_eq!(got[2].path_and_query, "/b");
    assert_eq!(idp.requests(), 2);

    // Later requests use the new token without another fetch.
    assert_eq!(
        client
            .get(sc.url("/orders/c"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(up.received()[3].bearer().unwrap(), second);
    assert_eq!(idp.requests(), 2);
    sc.stop().await;
}

/// Promise 2: a body over `retry_body_limit` (or of unknown length) is not replayed: the 401
/// goes back unchanged, but the token is still evicted.
#[tokio::test]
async fn a_large_request_gets_the_401_back_unchanged() {
    let idp = FakeTokenEndpoint::start(Mode::Issue(Duration::from_secs(300))).await;
    let up = Upstream::start().await;
    let cfg =
        orders_config(&idp.token_url(), &up.url(), |_| {}).proxy(|p| p.retry_body_limit = 1024);
    let sc = Running::start(cfg).await;
    sc.wait_ready().await;
    let client = http_client();
    assert_eq!(
        client
            .get(sc.url("/orders/a"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let first = up.received()[0].bearer().unwrap();
    up.revoke(&first);

    let resp = client
        .post(sc.url("/orders/big"))
        .body(vec![b'x'; 4096])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    assert!(
        resp.headers()["www-authenticate"]
            .to_str()
            .unwrap()
            .contains("invalid_token")
    );
    assert!(
        resp.headers().get("token-sidecar-error").is_none(),
        "the upstream's own answer"
    );
    assert_eq!(up.count(), 2, "not replayed");

    // The token was evicted all the same: the next request carries a new one.
    assert_eq!(
        client
            .get(sc.url("/orders/c"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert_ne!(up.received()[2].bearer().unwrap(), first);
    sc.stop().await;
}

/// Promise 2: never more than one replay, never a loop.
#[tokio::test]
async fn an_upstream_that_rejects_every_token_gets_exactly_one_replay() {
    let idp = FakeTokenEndpoint::start(Mode::Issue(Duration::from_secs(300))).await;
    let up = Upstream::start().await;
    let sc = Running::start(orders_config(&idp.token_url(), &up.url(), |_| {})).await;
    sc.wait_ready().await;
    let resp = http_client()
        .get(sc.url("/orders/always-401"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    assert_eq!(up.count(), 2, "the first attempt and one replay");
    assert_eq!(idp.requests(), 2);
    sc.stop().await;
}

/// Promise 2: 100 requests that see the 401 at once cause one token request.
#[tokio::test]
async fn a_hundred_simultaneous_401s_cause_one_token_request() {
    let idp = FakeTokenEndpoint::start(Mode::Issue(Duration::from_secs(300))).await;
    let up = Upstream::start().await;
    let sc = Running::start(orders_config(&idp.token_url(), &up.url(), |_| {})).await;
    sc.wait_ready().await;
    let client = http_client();
    assert_eq!(
        client
            .get(sc.url("/orders/warm"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let first = up.received()[0].bearer().unwrap();
    up.revoke(&first);

    let requests = (0..100).map(|i| {
        let client = client.clone();
        let url = sc.url(&format!("/orders/{i}"));
        async move { client.get(url).send().await.map(|r| r.status().as_u16()) }
    });
    let statuses = futures_util::future::join_all(requests).await;
    assert!(
        statuses.iter().all(|s| matches!(s, Ok(200))),
        "{statuses:?}"
    );
    assert_eq!(idp.requests(), 2, "single flight after the eviction");
    let tokens: HashSet<String> = up.received().iter().filter_map(|r| r.bearer()).collect();
    assert_eq!(tokens.len(), 2);
    sc.stop().await;
}

/// Promise 1: with 60 s tokens, a 45 s outage (refused, then 500s, then hangs) under 50
/// requests/s fails no request; past the token's life requests fail fast with 503 and
/// Retry-After; token requests follow the one per-key schedule (after its ramp, one per 5 s);
/// within 5 s of recovery requests succeed again.
#[tokio::test]
async fn an_authorization_server_outage_is_survived_then_reported_fast() {
    let idp = FakeTokenEndpoint::start(Mode::Issue(Duration::from_secs(60))).await;
    let up = Upstream::start().await;
    // Defaults: refresh 15 s after each fetch (a quarter of 60 s), usable for 50 s, retries
    // 200 ms doubling up to 5 s, request_timeout 10 s.
    let sc = Running::start(orders_config(&idp.token_url(), &up.url(), |_| {})).await;
    sc.wait_ready().await;
    // The outage starts right after a refresh, as it would at any random moment in steady state
    // (a token is at most 15 s old then).
    let deadline = Instant::now() + Duration::from_secs(20);
    while idp.requests() < 2 {
        assert!(Instant::now() < deadline, "no refresh after 20 s");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let t0 = Instant::now();
    idp.refuse_connections();
    // Timeline (s after the refresh at t0): refused 0–18, 500s 18–31, hangs 31–45 (the
    // refresher's attempts start at 15 s), refused again 45–54 (the token stops being usable at
    // 50 s), back at 54. Load: 50 requests/s until 61.
    let s = Duration::from_secs;
    let client = http_client();
    let mut ticker = tokio::time::interval(Duration::from_millis(20));
    let mut in_flight = Vec::new();
    let mut phase = 0;
    let mut token_requests_in_outage = 0;
    // Counted by the sidecar: a refused connection never reaches the endpoint's counter.
    let attempts_before = sc.cache.fetches();
    while t0.elapsed() < s(61) {
        ticker.tick().await;
        let at = t0.elapsed();
        if phase == 0 && at >= s(18) {
            idp.set_mode(Mode::Status500);
            idp.resume().await;
            phase = 1;
        } else if phase == 1 && at >= s(31) {
            idp.set_mode(Mode::Hang);
            phase = 2;
        } else if phase == 2 && at >= s(45) {
            idp.refuse_connections();
            phase = 3;
        } else if phase == 3 && at >= s(54) {
            token_requests_in_outage = sc.cache.fetches() - attempts_before;
            idp.set_mode(Mode::Issue(s(60)));
            idp.resume().await;
            phase = 4;
        }
        let client = client.clone();
        let url = sc.url("/orders/tick");
        in_flight.push(tokio::spawn(async move {
            let sent = Instant::now();
            let resp = client.get(url).send().await;
            let took = sent.elapsed();
            let (status, retry_after) = match resp {
                Ok(r) => (r.status().as_u16(), r.headers().contains_key("retry-after")),
                Err(_) => (0, false),
            };
            (at, status, retry_after, took)
        }));
    }
    let mut results = Vec::new();
    for h in in_flight {
        results.push(h.await.unwrap());
    }

    // The 45 s outage, and on until the token's usable life ends: every request succeeded.
    let during: Vec<_> = results.iter().filter(|(at, ..)| *at < s(49)).collect();
    assert!(during.len() > 2000, "{} requests", during.len());
    let failed: Vec<_> = during.iter().filter(|(_, st, ..)| *st != 200).collect();
    assert!(
        failed.is_empty(),
        "{} failed during the outage: {:?}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );

    // 51–54 s: no usable token, endpoint still down: 503 with Retry-After, fast.
    let expired: Vec<_> = results
        .iter()
        .filter(|(at, ..)| *at >= s(51) && *at < s(54))
        .collect();
    assert!(!expired.is_empty());
    for (at, status, retry_after, took) in &expired {
        assert_eq!(*status, 503, "at {at:?}");
        assert!(*retry_after, "Retry-After at {at:?}");
        assert!(*took < s(1), "took {took:?} at {at:?}: not fail-fast");
    }

    // Within 5 s (retry_backoff_max) of the endpoint coming back at 54 s, requests succeed
    // again; the margin covers the attempt itself.
    let recovered: Vec<_> = results
        .iter()
        .filter(|(at, ..)| *at >= s(59) + Duration::from_millis(300))
        .collect();
    assert!(
        recovered.iter().all(|(_, st, ..)| *st == 200),
        "{recovered:?}"
    );
    let first_ok_after = results
        .iter()
        .filter(|(at, st, ..)| *at >= s(54) && *st == 200)
        .map(|(at, ..)| *at)
        .min()
        .expect("a success after recovery");
    assert!(
        first_ok_after < s(59) + Duration::from_millis(300),
        "first success at {first_ok_after:?}"
    );

    // One schedule for every attempt, whatever the request rate (~2 700 requests arrived
    // during the 54 s): from 15 s, the ramp (5 attempts within ~3 s, then the phase-setting
    // pause) and then one attempt per 5 s (hangs take 10 s each) until 54 s.
    assert!(
        token_requests_in_outage <= 6 + (54 - 15) / 5 + 1,
        "{token_requests_in_outage} token requests in 54 s of outage"
    );
    assert!(
        token_requests_in_outage >= 8,
        "the refresher kept trying: {token_requests_in_outage}"
    );
    sc.stop().await;
}

/// Promise 7: assertions stay valid for a server whose clock is 30 s behind or ahead.
#[tokio::test]
async fn assertions_tolerate_30_seconds_of_clock_skew() {
    let up = Upstream::start().await;
    for (offset, tolerance, works) in [
        (-30, None, true),
        (30, None, true),
        (0, None, true),
        // Without backdating, a server 30 s behind sees `iat` in its future and refuses.
        (-30, Some(Duration::ZERO), false),
    ] {
        let idp = Idp::start(
            Kind::DevServer,
            "ec_p256_sec1.pem",
            None,
            Duration::from_secs(300),
        )
        .await;
        let Idp::Dev(dev) = &idp else { unreachable!() };
        dev.set_clock_offset(offset);
        let sc = Running::start(orders_config(&idp.token_url(), &up.url(), |t| {
            if let Some(tolerance) = tolerance {
                t.clock_skew_tolerance = tolerance;
            }
        }))
        .await;
        let status = http_client()
            .get(sc.url("/orders/x"))
            .send()
            .await
            .unwrap()
            .status();
        if works {
            assert_eq!(status, 200, "server clock {offset:+} s");
        } else {
            assert_eq!(status, 502, "server clock {offset:+} s without tolerance");
        }
        sc.stop().await;
    }
}
