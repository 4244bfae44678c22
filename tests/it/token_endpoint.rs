//! docs/spec.md, "Token endpoint on loopback": an unmodified OAuth2 client library (the
//! `oauth2` crate) gets tokens the real oidc-provider issued, from the cache; every refusal is
//! an RFC 6749 §5.2 error and fetches nothing; hostile callers are bounded; the token never
//! reaches the logs; a non-loopback address is refused.

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use oauth2::basic::BasicClient;
use oauth2::{AuthType, ClientId, ClientSecret, Scope, TokenResponse, TokenUrl};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::support::faults::{FakeTokenEndpoint, Mode};
use crate::support::idp::{Idp, Kind, ORDERS};
use crate::support::process::free_port;
use crate::support::upstream::Upstream;
use crate::support::{Running, SidecarConfig, fixture, http_client, orders_config};

const LOOPBACK_ANY: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 0);

/// The common fixture with the token endpoint on a free loopback port, allowing the `orders:*`
/// scopes and the audiences `allow_audiences`.
fn with_endpoint(cfg: SidecarConfig, allow_audiences: &[&str]) -> SidecarConfig {
    cfg.token_endpoint(|te| {
        te.listen = Some(LOOPBACK_ANY);
        te.allow_scopes = vec!["orders:*".into()];
        te.allow_audiences = allow_audiences.iter().map(|s| s.to_string()).collect();
    })
}

fn token_url(sc: &Running) -> String {
    format!(
        "http://{}/oauth2/token",
        sc.token_endpoint.expect("token endpoint on")
    )
}

/// The `oauth2` crate's HTTP hook, on our reqwest (its own is 0.12): the request and the answer
/// pass through unchanged.
async fn send(req: oauth2::HttpRequest) -> Result<oauth2::HttpResponse, reqwest::Error> {
    let (parts, body) = req.into_parts();
    let resp = http_client()
        .request(parts.method, parts.uri.to_string())
        .headers(parts.headers)
        .body(body)
        .send()
        .await?;
    let mut out = http::Response::builder().status(resp.status());
    for (k, v) in resp.headers() {
        out = out.header(k, v);
    }
    Ok(out
        .body(resp.bytes().await?.to_vec())
        .expect("a response rebuilt from a valid one"))
}

/// A library configured like most: client id and a secret, sent with HTTP Basic (the crate's
/// default); another sending both in the body. The first call gets a token oidc-provider issued
/// (signature, issuer, audience, scope checked); later calls, from either, are served from the
/// cache: the provider's own count of token requests does not move.
#[tokio::test]
async fn an_unmodified_oauth2_library_gets_a_real_token_then_the_cached_one() {
    let idp = Idp::start(
        Kind::OidcProvider,
        "ec_p256_sec1.pem",
        None,
        Duration::from_secs(300),
    )
    .await;
    let up = Upstream::start().await;
    let sc = Running::start(with_endpoint(
        orders_config(&idp.token_url(), &up.url(), |_| {}),
        &[ORDERS],
    ))
    .await;
    sc.wait_ready().await;
    let url = TokenUrl::new(token_url(&sc)).unwrap();
    let basic = BasicClient::new(ClientId::new("default".into()))
        .set_client_secret(ClientSecret::new("libraries-always-send-one".into()))
        .set_token_uri(url.clone());
    let in_body = BasicClient::new(ClientId::new("default".into()))
        .set_client_secret(ClientSecret::new("ignored".into()))
        .set_auth_type(AuthType::RequestBody)
        .set_token_uri(url);

    let before = idp.token_requests().await;
    let first = basic
        .exchange_client_credentials()
        .add_scope(Scope::new("orders:write".into()))
        .add_extra_param("resource", ORDERS)
        .request_async(&send)
        .await
        .expect("the library gets a token");
    let token = first.access_token().secret().clone();
    let claims = idp.verify_access_token(&token).await;
    assert_eq!(claims["aud"], ORDERS, "{claims}");
    assert_eq!(claims["scope"], "orders:write", "{claims}");
    assert_eq!(
        first
            .scopes()
            .map(|s| s.iter().map(|s| s.to_string()).collect::<Vec<_>>()),
        Some(vec!["orders:write".to_string()])
    );
    let expires_in = first.expires_in().expect("expires_in").as_secs();
    assert!(
        expires_in > 0 && expires_in <= 300,
        "expires_in = {expires_in}"
    );
    // One token request for a key the routes did not know.
    assert_eq!(idp.token_requests().await, before + 1);

    for client in [&basic, &in_body] {
        let again = client
            .exchange_client_credentials()
            .add_scope(Scope::new("orders:write".into()))
            .add_extra_param("audience", ORDERS)
            .request_async(&send)
            .await
            .expect("the library gets the cached token");
        assert_eq!(again.access_token().secret(), &token);
    }
    assert_eq!(idp.token_requests().await, before + 1, "served from cache");

    // The route's own key, prefetched at start: the same cache, no request either.
    let route_key = basic
        .exchange_client_credentials()
        .add_scope(Scope::new("orders:read".into()))
        .add_extra_param("audience", ORDERS)
        .request_async(&send)
        .await
        .unwrap();
    let r = http_client().get(sc.url("/orders/x")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        up.received().last().unwrap().bearer().as_deref(),
        Some(route_key.access_token().secret().as_str())
    );
    assert_eq!(idp.token_requests().await, before + 1, "served from cache");

    // Drained with the other listeners: after shutdown nothing answers there.
    let addr = sc.token_endpoint.unwrap();
    sc.stop().await;
    assert!(TcpStream::connect(addr).await.is_err());
}

/// RFC 6749 §5.1 exactly: the fields, `token_type` "Bearer", `expires_in` the remaining usable
/// life (below the lifetime the server granted by at least `expiry_skew`), the granted scope,
/// and the headers forbidding caching.
#[tokio::test]
async fn a_success_is_an_rfc6749_response_that_no_one_caches() {
    let idp = FakeTokenEndpoint::start(Mode::Issue(Duration::from_secs(600))).await;
    let up = Upstream::start().await;
    let sc = Running::start(with_endpoint(
        orders_config(&idp.token_url(), &up.url(), |t| {
            t.expiry_skew = Duration::from_secs(30)
        }),
        &["api://*"],
    ))
    .await;
    let resp = http_client()
        .post(token_url(&sc))
        .header("content-type", "application/x-www-form-urlencoded")
        .body("grant_type=client_credentials&scope=orders%3Aread+orders%3Awrite&audience=api%3A%2F%2Fa")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["cache-control"], "no-store");
    assert_eq!(resp.headers()["pragma"], "no-cache");
    assert!(
        resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/json")
    );
    let body: serde_json::Value = resp.json().await.unwrap();
    assert!(body["access_token"].as_str().unwrap().starts_with("fake-"));
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["scope"], "orders:read orders:write");
    let expires_in = body["expires_in"].as_u64().unwrap();
    assert!(
        (560..=570).contains(&expires_in),
        "600 s granted, 30 s skew: expires_in = {expires_in}"
    );
    assert!(idp.last_form().contains("audience=api%3A%2F%2Fa"));
}

async fn post(url: &str, content_type: &str, body: impl Into<reqwest::Body>) -> reqwest::Response {
    http_client()
        .post(url)
        .header("content-type", content_type)
        .body(body)
        .send()
        .await
        .unwrap()
}

/// Every refusal: its status, its RFC 6749 / RFC 8707 code, no caching; and not one of them
/// reaches the authorization server.
#[tokio::test]
async fn refusals_are_rfc6749_errors_and_fetch_nothing() {
    let idp = FakeTokenEndpoint::start(Mode::Issue(Duration::from_secs(600))).await;
    let up = Upstream::start().await;
    let sc = Running::start(with_endpoint(
        orders_config(&idp.token_url(), &up.url(), |_| {}),
        &["api://orders"],
    ))
    .await;
    sc.wait_ready().await;
    let before = idp.requests();
    let url = token_url(&sc);
    let form = "application/x-www-form-urlencoded";
    let gt = "grant_type=client_credentials";
    let cases: Vec<(&str, String, u16, &str)> = vec![
        (
            "application/json",
            "{\"grant_type\":\"client_credentials\"}".to_string(),
            400,
            "invalid_request",
        ),
        (form, "scope=orders%3Aread".into(), 400, "invalid_request"),
        (form, format!("{gt}&{gt}"), 400, "invalid_request"),
        (
            form,
            format!("{gt}&scope=orders%zzread"),
            400,
            "invalid_request",
        ),
        (form, format!("{gt}&scope=%ff"), 400, "invalid_request"),
        (
            form,
            "grant_type=password&username=a&password=b".into(),
            400,
            "unsupported_grant_type",
        ),
        (form, format!("{gt}&scope=admin"), 400, "invalid_scope"),
        (
            form,
            format!("{gt}&scope=orders%3Aread&audience=api%3A%2F%2Fbilling"),
            400,
            "invalid_target",
        ),
        (
            form,
            format!("{gt}&resource=api%3A%2F%2Forders&resource=https%3A%2F%2Fevil.example"),
            400,
            "invalid_target",
        ),
        (
            form,
            format!("{gt}&client_id=someone-else"),
            401,
            "invalid_client",
        ),
        (
            form,
            format!("{gt}&{}", "x=y&".repeat(3000)),
            413,
            "invalid_request",
        ),
    ];
    for (ct, body, status, error) in cases {
        let resp = post(&url, ct, body.clone()).await;
        let body = &body[..body.len().min(80)];
        assert_eq!(resp.status(), status, "{body}");
        assert_eq!(resp.headers()["cache-control"], "no-store", "{body}");
        if status == 401 {
            assert!(resp.headers().contains_key("www-authenticate"));
        }
        let got: serde_json::Value = resp.json().await.unwrap();
        assert_eq!(got["error"], error, "{body}: {got}");
        assert!(got["error_description"].is_string());
    }
    // Other paths and methods.
    let r = post(
        &format!("http://{}/token", sc.token_endpoint.unwrap()),
        form,
        gt,
    )
    .await;
    assert_eq!(r.status(), 404);
    let r = http_client().get(&url).send().await.unwrap();
    assert_eq!(r.status(), 405);
    assert_eq!(r.headers()["allow"], "POST");
    assert_eq!(idp.requests(), before, "a refused request fetched a token");
}

/// The authorization server failing: a 503 with a §5.2 body within the token wait, never a
/// hang; when it answers 500 at once, at once.
#[tokio::test]
async fn a_failing_authorization_server_is_a_bounded_503() {
    let idp = FakeTokenEndpoint::start(Mode::Hang).await;
    let up = Upstream::start().await;
    let sc = Running::start(with_endpoint(
        orders_config(&idp.token_url(), &up.url(), |t| {
            t.request_timeout = Duration::from_secs(1);
            t.max_attempts = 1;
        }),
        &["api://*"],
    ))
    .await;
    let url = token_url(&sc);
    let form = "application/x-www-form-urlencoded";
    for (mode, aud) in [
        (Mode::Hang, "api%3A%2F%2Fhang"),
        (Mode::Status500, "api%3A%2F%2F500"),
    ] {
        idp.set_mode(mode);
        let started = Instant::now();
        let resp = post(
            &url,
            form,
            format!("grant_type=client_credentials&audience={aud}"),
        )
        .await;
        assert_eq!(resp.status(), 503);
        assert_eq!(resp.headers()["cache-control"], "no-store");
        let body: serde_json::Value = resp.json().await.unwrap();
        assert_eq!(body["error"], "temporarily_unavailable", "{body}");
        // The wait bound is request_timeout + 1 s.
        assert!(
            started.elapsed() < Duration::from_secs(4),
            "{:?}",
            started.elapsed()
        );
    }
}

/// A caller that sends its head and then trickles (or stops sending) its body gets 408 after
/// `body_read_timeout` and its connection closed; the endpoint keeps serving others meanwhile.
#[tokio::test]
async fn a_stalled_body_is_cut_after_the_body_read_timeout() {
    let idp = FakeTokenEndpoint::start(Mode::Issue(Duration::from_secs(600))).await;
    let up = Upstream::start().await;
    let sc = Running::start(
        with_endpoint(orders_config(&idp.token_url(), &up.url(), |_| {}), &[])
            .token_endpoint(|te| te.body_read_timeout = Duration::from_millis(500)),
    )
    .await;
    let addr = sc.token_endpoint.unwrap();
    let mut slow = TcpStream::connect(addr).await.unwrap();
    slow.write_all(
        b"POST /oauth2/token HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/x-www-form-urlencoded\r\ncontent-length: 100\r\n\r\ngrant_type=",
    )
    .await
    .unwrap();
    let started = Instant::now();
    // Meanwhile another caller is served.
    let ok = post(
        &token_url(&sc),
        "application/x-www-form-urlencoded",
        "grant_type=client_credentials&scope=orders%3Aread",
    )
    .await;
    assert_eq!(ok.status(), 200);
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), async {
        // A byte every 100 ms: progress, but never the whole body.
        let mut buf = [0u8; 1024];
        loop {
            let _ = slow.write_all(b"c").await;
            match tokio::time::timeout(Duration::from_millis(100), slow.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => break,
                Ok(Ok(n)) => answer.extend_from_slice(&buf[..n]),
                Err(_) => {}
            }
        }
    })
    .await;
    assert!(read.is_ok(), "the stalled connection was never closed");
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(text.contains("invalid_request"), "{text}");
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(400), "{took:?}");
}

/// Callers holding every connection slot (`max_connections` = 2) with heads that trickle in:
/// each is cut after `proxy.header_read_timeout`, and a caller waiting behind them is then
/// served: the shared accept loop's limits apply to this listener.
#[tokio::test]
async fn slow_heads_holding_every_slot_are_cut_and_the_next_caller_served() {
    let idp = FakeTokenEndpoint::start(Mode::Issue(Duration::from_secs(600))).await;
    let up = Upstream::start().await;
    let sc = Running::start(
        with_endpoint(
            orders_config(&idp.token_url(), &up.url(), |_| {}).proxy(|p| {
                p.header_read_timeout = Duration::from_millis(500);
            }),
            &[],
        )
        .token_endpoint(|te| te.max_connections = 2),
    )
    .await;
    let addr = sc.token_endpoint.unwrap();
    let mut stallers = Vec::new();
    for _ in 0..2 {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"POST /oauth2/token HTTP/1.1\r\nhost: local")
            .await
            .unwrap();
        stallers.push(s);
    }
    // Give the accept loop time to admit both before the next caller queues behind them.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = Instant::now();
    let served = tokio::time::timeout(
        Duration::from_secs(10),
        post(
            &token_url(&sc),
            "application/x-www-form-urlencoded",
            "grant_type=client_credentials&scope=orders%3Aread",
        ),
    )
    .await
    .expect("the waiting caller was never served");
    assert_eq!(served.status(), 200);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    for mut s in stallers {
        let mut buf = [0u8; 256];
        let end = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                let _ = s.write_all(b"h").await;
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        })
        .await;
        assert!(end.is_ok(), "a slow head kept its connection");
    }
}

/// Many distinct allowed audiences, each asked for twice at once: exactly one token request per
/// audience reaches the server (single flight), and asking again fetches nothing (the cache),
/// counted at the server. How many keys are kept is the run-time cache's bound
/// (`token.cache_capacity`).
#[tokio::test]
async fn a_flood_of_distinct_audiences_costs_one_fetch_each() {
    let idp = FakeTokenEndpoint::start(Mode::Issue(Duration::from_secs(3600))).await;
    let up = Upstream::start().await;
    let sc = Running::start(with_endpoint(
        orders_config(&idp.token_url(), &up.url(), |_| {}),
        &["https://*.flood.test/"],
    ))
    .await;
    sc.wait_ready().await;
    let url = token_url(&sc);
    let before = idp.requests();
    const N: usize = 200;
    let ask = |i: usize| {
        let url = url.clone();
        async move {
            let r = post(
                &url,
                "application/x-www-form-urlencoded",
                format!("grant_type=client_credentials&audience=https%3A%2F%2Fs{i}.flood.test%2F"),
            )
            .await;
            assert_eq!(r.status(), 200);
            r.json::<serde_json::Value>().await.unwrap()["access_token"]
                .as_str()
                .unwrap()
                .to_owned()
        }
    };
    for chunk in (0..N).collect::<Vec<_>>().chunks(20) {
        let pairs = futures_util::future::join_all(
            chunk
                .iter()
                .map(|&i| async move { tokio::join!(ask(i), ask(i)) }),
        )
        .await;
        for (a, b) in pairs {
            assert_eq!(
                a, b,
                "two concurrent callers of one key got different tokens"
            );
        }
    }
    assert_eq!(idp.requests() - before, N as u64, "one fetch per audience");
    for i in (0..N).step_by(17) {
        ask(i).await;
    }
    assert_eq!(idp.requests() - before, N as u64, "served from cache");
}

/// The real binary at `trace` level serving the token endpoint: the access token it hands out
/// appears in no log line, while the access log records the request.
#[tokio::test]
async fn the_handed_out_token_never_reaches_the_logs() {
    let idp = FakeTokenEndpoint::start(Mode::Issue(Duration::from_secs(600))).await;
    let up = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let loopback = |port| SocketAddr::from(([127, 0, 0, 1], port));
    let (proxy, admin, endpoint) = (free_port(), free_port(), free_port());
    let text = orders_config(&idp.token_url(), &up.url(), |_| {})
        .listen(loopback(proxy), loopback(admin))
        .token_endpoint(|te| {
            te.listen = Some(loopback(endpoint));
            te.allow_scopes = vec!["orders:*".into()];
        })
        .to_toml();
    let cfg = dir.path().join("sidecar.toml");
    std::fs::write(&cfg, text).unwrap();
    let log = dir.path().join("stderr.log");
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_token-sidecar"))
        .arg("--config")
        .arg(&cfg)
        .env("RUST_LOG", "trace")
        .stdout(Stdio::null())
        .stderr(Stdio::from(std::fs::File::create(&log).unwrap()))
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let url = format!("http://127.0.0.1:{endpoint}/oauth2/token");
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut tokens = Vec::new();
    while tokens.len() < 3 {
        assert!(Instant::now() < deadline, "no token from the endpoint");
        let sent = http_client()
            .post(&url)
            .header("content-type", "application/x-www-form-urlencoded")
            .body(format!(
                "grant_type=client_credentials&scope=orders%3Awrite&client_secret=s3cr3t-{}",
                tokens.len()
            ))
            .send()
            .await;
        match sent {
            Ok(r) if r.status() == 200 => {
                let body: serde_json::Value = r.json().await.unwrap();
                tokens.push(body["access_token"].as_str().unwrap().to_owned());
            }
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    let pid = child.id().unwrap();
    let kill = std::process::Command::new("kill")
        .arg("-TERM")
        .arg(pid.to_string())
        .status()
        .unwrap();
    assert!(kill.success());
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success());
    let logs = std::fs::read_to_string(&log).unwrap();
    assert!(logs.contains("TRACE"), "trace level was on");
    assert!(
        logs.contains("token request"),
        "no access-log line:\n{logs}"
    );
    for t in &tokens {
        assert!(!logs.contains(t.as_str()), "the access token is in the log");
    }
    assert!(!logs.contains("s3cr3t"), "a client secret is in the log");
}

/// `token_endpoint.listen` on a non-loopback address: `check-config` and `run` exit 2 naming
/// the key, like `dev` refuses one; so does `run` for a `clients` entry that is no client.
#[test]
fn a_non_loopback_listen_is_refused_with_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("sidecar.toml");
    let text = SidecarConfig::new("http://127.0.0.1:1/token", fixture("ec_p256_sec1.pem"))
        .route(crate::support::RouteBuilder::path(
            "r",
            "/r/",
            "http://127.0.0.1:1",
        ))
        .to_toml();
    // Validation refuses it, so the builder cannot write it: added to the text.
    assert!(text.contains("[token_endpoint]\n"), "{text}");
    let text = text.replace(
        "[token_endpoint]\n",
        "[token_endpoint]\nlisten = \"0.0.0.0:18081\"\n",
    );
    std::fs::write(&cfg, text).unwrap();
    for command in [&["check-config"][..], &[][..]] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_token-sidecar"))
            .args(command)
            .arg("--config")
            .arg(&cfg)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{command:?}: {err}");
        assert!(err.contains("token_endpoint.listen"), "{err}");
        assert!(err.contains("loopback"), "{err}");
    }
    // A client name that names no client: known once the clients are built, so `run` refuses it.
    let text = SidecarConfig::new("http://127.0.0.1:1/token", fixture("ec_p256_sec1.pem"))
        .route(crate::support::RouteBuilder::path(
            "r",
            "/r/",
            "http://127.0.0.1:1",
        ))
        .token_endpoint(|te| {
            te.listen = Some(LOOPBACK_ANY);
            te.clients = vec!["nobody".into()];
        })
        .to_toml();
    std::fs::write(&cfg, text).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_token-sidecar"))
        .arg("--config")
        .arg(&cfg)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("token_endpoint.clients[0]"), "{err}");
}
