//! Issue 13's parts together (docs/spec.md §3, §4, "Token endpoint on loopback", §6;
//! docs/reliability.md §12–§13): several clients behind the loopback token endpoint, single
//! flight for a per-request audience through the proxy, the run-time cache's bound end to end
//! in the real binary, and `dev` with `[[client]]`s.
//!
//! The figures the issue asks for are printed by
//! `cargo test --test it runtime -- --nocapture`.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;

use futures_util::StreamExt;
use serde_json::Value;
use token_sidecar::{DevClient, DevServer, DevServerConfig};
use tokio::time::Instant;

use crate::clients::{BILLING_CLIENT, BILLING_KEY, two_clients};
use crate::support::authz::{AuthzConfig, ClientReg, OidcProvider, ResourceReg};
use crate::support::idp::{BILLING, ORDERS, verify_with_jwks};
use crate::support::process::SidecarProcess;
use crate::support::upstream::Upstream;
use crate::support::{
    CLIENT_ID, RouteBuilder, Running, SidecarConfig, fixture, http_client, public_jwks,
};

/// An in-cluster audience no route names: every request for it creates a run-time key.
const NEW_AUD: &str = "https://inventory.svc.cluster.local/";

const LOOPBACK_ANY: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 0);

/// oidc-provider knowing both clients; ours may ask for orders (and the in-cluster audience),
/// the billing client for billing.
async fn provider() -> OidcProvider {
    OidcProvider::start(&AuthzConfig {
        clients: vec![
            ClientReg {
                client_id: CLIENT_ID.into(),
                jwks: public_jwks("ec_p256_sec1.pem", None),
                scope: "orders:read orders:write".into(),
            },
            ClientReg {
                client_id: BILLING_CLIENT.into(),
                jwks: public_jwks(BILLING_KEY, None),
                scope: "billing:read".into(),
            },
        ],
        resources: vec![
            ResourceReg {
                audience: ORDERS.into(),
                scope: "orders:read orders:write".into(),
                ttl_secs: 300,
            },
            ResourceReg {
                audience: NEW_AUD.into(),
                scope: "orders:read orders:write".into(),
                ttl_secs: 300,
            },
            ResourceReg {
                audience: BILLING.into(),
                scope: "billing:read".into(),
                ttl_secs: 300,
            },
        ],
        default_ttl_secs: 300,
    })
    .await
}

/// Two clients (`default` = `[token]`, `billing`), one fixed route each, and the token endpoint
/// on loopback allowing both clients' scopes and audiences; `clients` limits whom it serves.
fn two_clients_with_endpoint(token_url: &str, up: &str, clients: &[&str]) -> SidecarConfig {
    two_clients(token_url, up).token_endpoint(|te| {
        te.listen = Some(LOOPBACK_ANY);
        te.allow_scopes = vec!["orders:*".into(), "billing:read".into()];
        te.allow_audiences = vec![ORDERS.into(), BILLING.into()];
        te.clients = clients.iter().map(|c| c.to_string()).collect();
    })
}

/// `POST /oauth2/token` for a `client_credentials` grant as `client_id`, with one scope and one
/// audience, as a plain form; the status and the JSON body.
async fn ask(sc: &Running, client_id: &str, scope: &str, audience: &str) -> (u16, Value) {
    let form = [
        ("grant_type", "client_credentials"),
        ("client_id", client_id),
        ("scope", scope),
        ("audience", audience),
    ];
    let url = format!(
        "http://{}/oauth2/token",
        sc.token_endpoint.expect("token endpoint on")
    );
    let r = http_client().post(url).form(&form).send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap())
}

/// Item 1 with item 5: the token endpoint answers as the client `client_id` names, each with a
/// token the real server issued to that client; a client the endpoint does not serve gets 401
/// `invalid_client` and nothing is fetched for it (the provider's own count).
#[tokio::test]
async fn the_token_endpoint_answers_as_the_named_client_and_refuses_one_it_does_not_serve() {
    let idp = provider().await;
    let up = Upstream::start().await;
    let sc = Running::start(two_clients_with_endpoint(&idp.token_url, &up.url(), &[])).await;
    sc.wait_ready().await;

    // billing asks for its route's key (prefetched: served from the cache), default for a key
    // no route names (orders:write: fetched once); each gets its own client's token.
    let before = idp.token_requests().await;
    let (status, billing) = ask(&sc, "billing", "billing:read", BILLING).await;
    assert_eq!(status, 200, "{billing}");
    let (status, default) = ask(&sc, "default", "orders:write", ORDERS).await;
    assert_eq!(status, 200, "{default}");
    let b = idp
        .verify_access_token(billing["access_token"].as_str().unwrap())
        .await;
    let d = idp
        .verify_access_token(default["access_token"].as_str().unwrap())
        .await;
    assert_eq!(b["client_id"], BILLING_CLIENT, "{b}");
    assert_eq!(b["aud"], BILLING, "{b}");
    assert_eq!(d["client_id"], CLIENT_ID, "{d}");
    assert_eq!(d["aud"], ORDERS, "{d}");
    assert_eq!(d["scope"], "orders:write", "{d}");
    // billing:read for BILLING is the billing route's key (prefetched); orders:write is new.
    assert_eq!(idp.token_requests().await, before + 1);
    sc.stop().await;

    // The endpoint serves billing only: `default` is refused before anything is fetched.
    let sc = Running::start(two_clients_with_endpoint(
        &idp.token_url,
        &up.url(),
        &["billing"],
    ))
    .await;
    sc.wait_ready().await;
    let before = idp.token_requests().await;
    let (status, body) = ask(&sc, "default", "orders:write", ORDERS).await;
    assert_eq!(status, 401, "{body}");
    assert_eq!(body["error"], "invalid_client", "{body}");
    assert!(body.get("access_token").is_none());
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(idp.token_requests().await, before, "nothing fetched");
    // billing is still served.
    let (status, body) = ask(&sc, "billing", "billing:read", BILLING).await;
    assert_eq!(status, 200, "{body}");
    sc.stop().await;
}

/// Item 4's single flight through the proxy: 50 concurrent first requests carrying the same
/// new `token-sidecar-audience` cost one token request at the server, and all 50 are
/// forwarded with that one token (issued for that audience).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_concurrent_first_requests_for_a_new_audience_fetch_one_token() {
    let idp = provider().await;
    let up = Upstream::start().await;
    let sc = Running::start(
        SidecarConfig::new(&idp.token_url, fixture("ec_p256_sec1.pem")).route(
            RouteBuilder::path("orders", "/orders/", &up.url())
                .scope(&["orders:read"])
                .audience(&[ORDERS])
                .with(|r| r.allow_audiences = vec!["https://*.svc.cluster.local/".into()]),
        ),
    )
    .await;
    sc.wait_ready().await;
    let before = idp.token_requests().await;

    let client = http_client();
    let start = std::sync::Arc::new(tokio::sync::Barrier::new(50));
    let mut tasks = Vec::new();
    for i in 0..50 {
        let (client, url, start) = (
            client.clone(),
            sc.url(&format!("/orders/{i}")),
            start.clone(),
        );
        tasks.push(tokio::spawn(async move {
            start.wait().await;
            client
                .get(url)
                .header("token-sidecar-audience", NEW_AUD)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), 200);
    }
    assert_eq!(idp.token_requests().await, before + 1, "single flight");
    let got = up.received();
    assert_eq!(got.len(), 50);
    let tokens: BTreeSet<String> = got.iter().map(|r| r.bearer().unwrap()).collect();
    assert_eq!(tokens.len(), 1, "all 50 forwarded with the same token");
    let claims = idp.verify_access_token(tokens.first().unwrap()).await;
    assert_eq!(claims["aud"], NEW_AUD, "{claims}");
    assert!(
        got.iter()
            .all(|r| !r.headers.contains_key("token-sidecar-audience"))
    );
    sc.stop().await;
}

/// `VmRSS` of a process, in bytes.
fn vm_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS in /proc/PID/status");
    kib * 1024
}

/// The value of the series `name` in a `/metrics` text.
fn series(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no {name} in:\n{text}"))
        .parse()
        .unwrap()
}

/// The bound, end to end, in the real binary at the default `token.cache_capacity`
/// (1000) and `cache_idle_timeout` (15 min, longer than the test: every eviction is for
/// size): 10,000 distinct audiences the route's pattern admits, requested in a loop, 8 at a
/// time, against the embedded development server (in this process, with the 10,000
/// audiences registered: it checks each audience like a real server, and issues ES256 tokens
/// in microseconds, which oidc-provider's node process could not do 10,000 times within the
/// test's time bound).
///
/// Bounds checked: one token request per key, exactly; `token_sidecar_cache_entries` ≤ 1000;
/// evictions with cause `size` account for every key not held; RSS grows by less than 8 MiB
/// from 2,000 keys (the cache full since 1,000) to 10,000.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ten_thousand_audiences_in_the_binary_keep_the_cache_bounded_and_rss_flat() {
    const KEYS: usize = 10_000;
    const CAPACITY: u64 = 1000;
    const PARALLEL: usize = 8;
    const RSS_GROWTH_BOUND: u64 = 8 * 1024 * 1024;
    let aud = |i: usize| format!("https://svc-{i}.example/");
    const FIXED: &str = "https://svc-fixed.example/";

    let mut audiences: BTreeSet<String> = (0..KEYS).map(aud).collect();
    audiences.insert(FIXED.into());
    let idp = DevServer::start(DevServerConfig {
        listen: LOOPBACK_ANY,
        clients: vec![DevClient {
            client_id: CLIENT_ID.into(),
            jwks: public_jwks("ec_p256_sec1.pem", None),
            scopes: BTreeSet::from(["api:read".to_string()]),
            audiences,
        }],
        federations: vec![],
        token_ttl: Duration::from_secs(3600),
    })
    .await
    .expect("dev server starts");
    let up = Upstream::start().await;
    let token_url = idp.token_url().to_string();
    let up_url = up.url();
    let sc = SidecarProcess::start(|proxy, admin| {
        SidecarConfig::new(&token_url, fixture("ec_p256_sec1.pem"))
            .listen(proxy, admin)
            .route(
                RouteBuilder::path("api", "/api/", &up_url)
                    .scope(&["api:read"])
                    .audience(&[FIXED])
                    .with(|r| r.allow_audiences = vec!["https://svc-*.example/".into()]),
            )
            .to_toml()
    })
    .await;
    let pid = sc.pid();
    let before = idp.token_requests();
    let rss_start = vm_rss(pid);

    let client = http_client();
    let t0 = Instant::now();
    let mut rss_at_2000 = 0;
    for chunk in [(0, 2000), (2000, KEYS)] {
        let statuses: Vec<u16> = futures_util::stream::iter(chunk.0..chunk.1)
            .map(|i| {
                let (client, url) = (client.clone(), sc.url(&format!("/api/{i}")));
                async move {
                    client
                        .get(url)
                        .header("token-sidecar-audience", aud(i))
                        .send()
                        .await
                        .unwrap()
                        .status()
                        .as_u16()
                }
            })
            .buffer_unordered(PARALLEL)
            .collect()
            .await;
        assert!(statuses.iter().all(|s| *s == 200), "every request served");
        if chunk.0 == 0 {
            rss_at_2000 = vm_rss(pid);
        }
    }
    let elapsed = t0.elapsed();
    let rss_end = vm_rss(pid);
    let fetched = idp.token_requests() - before;

    let metrics = client
        .get(format!("http://{}/metrics", sc.admin))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let entries = series(&metrics, "token_sidecar_cache_entries{client=\"default\"}");
    let evict = |cause: &str| {
        series(
            &metrics,
            &format!("token_sidecar_cache_evictions_total{{client=\"default\",cause=\"{cause}\"}}"),
        )
    };
    let (size, expired, idle) = (evict("size"), evict("expired"), evict("idle"));
    let growth = rss_end.saturating_sub(rss_at_2000);
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    eprintln!(
        "runtime: {KEYS} distinct audiences through the binary, {PARALLEL} at a time, in {:.1} s; \
         cache_capacity {CAPACITY}: token requests {fetched}, cache entries {entries}, evictions \
         size={size} expired={expired} idle={idle}; VmRSS at start {:.1} MiB, at 2,000 keys {:.1} \
         MiB, at 10,000 keys {:.1} MiB (growth 2,000->10,000: {:.2} MiB; bound {:.0} MiB); \
         start->2,000 keys {:.2} MiB = {:.1} KiB per cached key",
        elapsed.as_secs_f64(),
        mib(rss_start),
        mib(rss_at_2000),
        mib(rss_end),
        mib(growth),
        mib(RSS_GROWTH_BOUND),
        mib(rss_at_2000.saturating_sub(rss_start)),
        rss_at_2000.saturating_sub(rss_start) as f64 / 1024.0 / CAPACITY as f64,
    );

    assert_eq!(fetched, KEYS as u64, "one token request per key, exactly");
    assert_eq!(up.count(), KEYS, "every request forwarded");
    // The last request carried a token for its own audience.
    let last = up.received().pop().unwrap();
    let i: usize = last
        .path_and_query
        .rsplit('/')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{:?}", last.path_and_query));
    let jwks = crate::support::idp::fetch_jwks(&idp.jwks_url()).await;
    let claims = verify_with_jwks(&jwks, &last.bearer().unwrap());
    assert_eq!(claims["aud"], aud(i), "{claims}");

    assert!(entries <= CAPACITY, "{entries} entries");
    assert_eq!((expired, idle), (0, 0), "every eviction is for size");
    // moka applies evictions in its housekeeping, which runs on later cache operations: a few
    // keys (at most its write buffer, stated here as 64) may still be neither counted as
    // entries nor as evicted.
    assert!(
        size + entries <= KEYS as u64 && size + entries + 64 >= KEYS as u64,
        "size {size} + entries {entries} vs {KEYS}"
    );
    assert!(growth < RSS_GROWTH_BOUND, "RSS grew {:.2} MiB", mib(growth));
    assert!(elapsed < Duration::from_secs(60), "{elapsed:?}");
}

/// Item 3: `dev` runs one client, `[token]`, against its embedded server. A `[[client]]` would
/// keep asking its real authorization server, so dev refuses it: exit 2, naming the key.
#[tokio::test]
async fn dev_refuses_a_client_block_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sidecar.toml");
    let cfg = SidecarConfig::new("https://idp.example.com/token", fixture("ec_p256_sec1.pem"))
        .client("billing", |t| {
            t.client_id = BILLING_CLIENT.into();
            t.private_key_file = Some(fixture(BILLING_KEY));
        })
        .route(
            RouteBuilder::path("orders", "/orders/", "http://echo.dev.local")
                .scope(&["orders:read"]),
        );
    std::fs::write(&path, cfg.to_toml()).unwrap();
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_token-sidecar"));
    cmd.arg("dev")
        .arg("--config")
        .arg(&path)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy().into_owned();
        if k.starts_with("SIDECAR_") || k.to_ascii_lowercase().ends_with("_proxy") {
            cmd.env_remove(&k);
        }
    }
    // Bounded: a dev that accepted the config would run until killed (on drop, by its PID).
    let out = tokio::time::timeout(Duration::from_secs(10), cmd.output())
        .await
        .expect("dev exits at once instead of running")
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("client[0]") && err.contains("\"billing\"") && err.contains("[token]"),
        "{err}"
    );
}
