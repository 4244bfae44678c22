//! Operations (docs/spec.md §6): Prometheus metrics with bounded labels, readiness, log
//! redaction at `trace` level and JSON logs (docs/reliability.md §5, no token in the wrong
//! place), and signing-key rotation without a restart.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::time::Instant;

use crate::support::faults::{FakeTokenEndpoint, Mode};
use crate::support::idp::ORDERS;
use crate::support::process::free_port;
use crate::support::upstream::Upstream;
use token_sidecar::LogFormat;

use crate::support::{RouteBuilder, Running, SidecarConfig, fixture, http_client};

async fn get_text(url: &str) -> (u16, String) {
    let r = http_client().get(url).send().await.unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

/// The value of one sample line `name{labels} value` in a Prometheus text exposition.
fn sample(metrics: &str, series: &str) -> Option<f64> {
    metrics
        .lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test]
async fn metrics_count_requests_tokens_and_cache_with_bounded_labels() {
    let idp = FakeTokenEndpoint::start(Mode::Issue(Duration::from_secs(300))).await;
    let up = Upstream::start().await;
    let closed = format!("http://127.0.0.1:{}", free_port());
    let routes = [
        RouteBuilder::path("orders", "/orders/", &up.url())
            .scope(&["orders:read"])
            .audience(&[ORDERS]),
        RouteBuilder::path("down", "/down/", &closed)
            .scope(&["orders:read"])
            .audience(&[ORDERS]),
    ];
    let sc = Running::start(
        SidecarConfig::new(&idp.token_url(), fixture("ec_p256_sec1.pem")).routes(routes),
    )
    .await;
    sc.wait_ready().await;
    let client = http_client();
    for _ in 0..3 {
        assert_eq!(
            client
                .get(sc.url("/orders/1?secret=x"))
                .send()
                .await
                .unwrap()
                .status(),
            200
        );
    }
    assert_eq!(
        client
            .get(sc.url("/nowhere"))
            .send()
            .await
            .unwrap()
            .status(),
        404
    );
    assert_eq!(
        client.get(sc.url("/down/1")).send().await.unwrap().status(),
        502
    );

    let (status, m) = get_text(&format!("http://{}/metrics", sc.admin)).await;
    assert_eq!(status, 200);
    eprintln!("--- /metrics sample ---\n{m}");
    let v = |series: &str| sample(&m, series).unwrap_or_else(|| panic!("no {series} in\n{m}"));
    assert_eq!(
        v(r#"token_sidecar_requests_total{route="orders",status="2xx"}"#),
        3.0
    );
    assert_eq!(
        v(r#"token_sidecar_requests_total{route="-",status="4xx"}"#),
        1.0
    );
    assert_eq!(
        v(r#"token_sidecar_requests_total{route="down",status="5xx"}"#),
        1.0
    );
    assert_eq!(
        v(r#"token_sidecar_upstream_connection_errors_total{route="down"}"#),
        1.0
    );
    assert_eq!(
        v(r#"token_sidecar_request_duration_seconds_count{route="orders"}"#),
        3.0
    );
    // Both routes share one (scope, audience) set: one fetch.
    assert_eq!(v(r#"token_sidecar_token_fetches_total{outcome="ok"}"#), 1.0);
    assert_eq!(
        v(r#"token_sidecar_token_fetches_total{outcome="rejected"}"#),
        0.0
    );
    assert_eq!(v("token_sidecar_token_fetch_duration_seconds_count"), 1.0);
    assert_eq!(v("token_sidecar_cache_hits_total"), 4.0);
    assert_eq!(v("token_sidecar_cache_misses_total"), 0.0);
    let expiry = v(r#"token_sidecar_token_expiry_seconds{route="orders",client="default"}"#);
    assert!(expiry > 290.0 && expiry <= 300.0, "{expiry}");
    assert_eq!(
        v(r#"token_sidecar_token_refresh_failing{route="orders",client="default"}"#),
        0.0
    );
    // Bounded labels: no scopes, audiences, paths or query strings.
    for leak in ["orders:read", ORDERS, "/orders/", "secret=x", "nowhere"] {
        assert!(!m.contains(leak), "{leak} appears in the metrics");
    }
    sc.stop().await;
}

#[tokio::test]
async fn readiness_follows_the_tokens() {
    let idp = FakeTokenEndpoint::start(Mode::Status500).await;
    let up = Upstream::start().await;
    let sc = Running::start(
        SidecarConfig::new(&idp.token_url(), fixture("ec_p256_sec1.pem"))
            .token(|t| {
                t.request_timeout = Duration::from_secs(1);
                t.retry_backoff_max = Duration::from_millis(300);
                t.expiry_skew = Duration::from_secs(1);
            })
            .route(
                RouteBuilder::path("orders", "/orders/", &up.url())
                    .scope(&["orders:read"])
                    .audience(&[ORDERS]),
            ),
    )
    .await;
    let readyz = format!("http://{}/readyz", sc.admin);
    let healthz = format!("http://{}/healthz", sc.admin);

    // No token yet: 503 naming the route, first "no token yet", then the failure.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (status, body) = get_text(&readyz).await;
        assert_eq!(status, 503, "{body}");
        let json: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(json["waiting"][0]["route"], "orders");
        if json["waiting"][0]["reason"]
            .as_str()
            .unwrap()
            .contains("500")
        {
            eprintln!("/readyz while the endpoint fails: {status} {body}");
            break;
        }
        assert!(Instant::now() < deadline, "{body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(get_text(&healthz).await.0, 200);

    // The endpoint recovers with 3 s tokens: ready.
    idp.set_mode(Mode::Issue(Duration::from_secs(3)));
    sc.wait_ready().await;
    let (status, body) = get_text(&readyz).await;
    eprintln!("/readyz once a token is cached: {status} {body}");
    let ready_at = Instant::now();

    // It fails again; once the token can no longer be used, not ready any more.
    idp.set_mode(Mode::Status500);
    let deadline = Instant::now() + Duration::from_secs(6);
    loop {
        let (status, body) = get_text(&readyz).await;
        if status == 503 {
            eprintln!("/readyz after the token expired: {status} {body}");
            assert!(
                ready_at.elapsed() >= Duration::from_millis(1500),
                "went unready too early"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "still ready 6 s after a 3 s token"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(get_text(&healthz).await.0, 200);
    sc.stop().await;
}

/// The private key as it sits on disk, split into the pieces that must never be logged.
fn key_fragments(path: &Path) -> Vec<String> {
    let pem = std::fs::read_to_string(path).unwrap();
    pem.lines()
        .filter(|l| !l.starts_with("-----") && l.len() >= 16)
        .map(|l| l[..16].to_string())
        .collect()
}

/// A full scenario through the real binary at `trace` level: tokens, refreshes, a 401 replay,
/// errors, shutdown. No access token, assertion, client secret or key byte may appear.
#[tokio::test]
async fn trace_logs_hold_no_secrets() {
    let idp = FakeTokenEndpoint::start(Mode::Issue(Duration::from_secs(4))).await;
    let up = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let key = fixture("rsa_pkcs1.pem");
    let proxy_port = free_port();
    let admin_port = free_port();
    let cfg = dir.path().join("sidecar.toml");
    let loopback = |port| std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let unstripped = |r: RouteBuilder| r.with(|r| r.strip_prefix = false);
    let text = SidecarConfig::new(&idp.token_url(), &key)
        .listen(loopback(proxy_port), loopback(admin_port))
        .token(|t| {
            t.client_id = "logged-client".into();
            t.expiry_skew = Duration::from_secs(1);
            t.refresh_before_expiry = Duration::from_secs(2);
        })
        .route(unstripped(
            RouteBuilder::path("orders", "/orders/", &up.url())
                .scope(&["orders:read"])
                .audience(&[ORDERS]),
        ))
        .route(unstripped(
            RouteBuilder::path("refused", "/refused/", &up.url()).scope(&["forbidden"]),
        ))
        .to_toml();
    std::fs::write(&cfg, text).unwrap();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_token-sidecar"))
        .arg("--config")
        .arg(&cfg)
        .env("RUST_LOG", "trace")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let logs = tokio::spawn(async move {
        let mut buf = Vec::new();
        let _ = stderr.read_to_end(&mut buf).await;
        let _ = stdout.read_to_end(&mut buf).await;
        buf
    });

    let client = http_client();
    let base = format!("http://127.0.0.1:{proxy_port}");
    let deadline = Instant::now() + Duration::from_secs(15);
    while get_ready(&client, admin_port).await != Some(200) {
        assert!(Instant::now() < deadline, "sidecar not ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Steady requests across two refreshes, a revoked token, a body, a 404.
    let start = Instant::now();
    let mut n = 0;
    while start.elapsed() < Duration::from_secs(5) {
        let r = client
            .post(format!("{base}/orders/x"))
            .header(
                "authorization",
                "Bearer app-supplied-token-must-not-be-logged-either",
            )
            .body("payload")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        n += 1;
        if n == 5 {
            up.revoke(&up.received().last().unwrap().bearer().unwrap());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    idp.set_mode(Mode::Reject("invalid_scope"));
    let _ = client.get(format!("{base}/nowhere")).send().await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let kill = std::process::Command::new("kill")
        .arg("-TERM")
        .arg(child.id().unwrap().to_string())
        .status()
        .unwrap();
    assert!(kill.success());
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success());
    let logs = String::from_utf8_lossy(&logs.await.unwrap()).into_owned();
    assert!(
        logs.contains("TRACE") || logs.contains("trace"),
        "trace level was on"
    );
    assert!(logs.contains("token obtained"));

    let mut secrets: Vec<String> = up.received().iter().filter_map(|r| r.bearer()).collect();
    secrets.sort();
    secrets.dedup();
    assert!(
        secrets.len() >= 3,
        "refreshes and the replay happened: {secrets:?}"
    );
    let assertions: Vec<String> = idp
        .forms()
        .iter()
        .filter_map(|f| {
            url::form_urlencoded::parse(f.as_bytes())
                .find(|(k, _)| k == "client_assertion")
                .map(|(_, v)| v.into_owned())
        })
        .collect();
    assert!(assertions.len() >= 3);
    for a in &assertions {
        // The whole assertion, and its signature alone.
        secrets.push(a.clone());
        secrets.push(a.rsplit('.').next().unwrap().to_string());
    }
    secrets.extend(key_fragments(&key));
    secrets.push("app-supplied-token-must-not-be-logged-either".into());
    for s in &secrets {
        assert!(
            !logs.contains(s.as_str()),
            "a secret appears in the logs: {}…",
            &s[..12.min(s.len())]
        );
    }
}

async fn get_ready(client: &reqwest::Client, port: u16) -> Option<u16> {
    client
        .get(format!("http://127.0.0.1:{port}/readyz"))
        .send()
        .await
        .ok()
        .map(|r| r.status().as_u16())
}

/// The key file is a Kubernetes Secret volume: `key.pem -> ..data/key.pem`, `..data -> ..v1`.
/// Swapping `..data` to a new directory while requests flow makes the next assertion use the new
/// key, with no restart and no failed request.
#[tokio::test]
async fn the_key_is_rotated_by_a_secret_volume_symlink_swap() {
    use token_sidecar::SigningKey;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let v1 = root.join("..v1");
    let v2 = root.join("..v2");
    std::fs::create_dir(&v1).unwrap();
    std::fs::create_dir(&v2).unwrap();
    std::fs::copy(fixture("ec_p256_sec1.pem"), v1.join("key.pem")).unwrap();
    std::fs::copy(fixture("ed25519_pkcs8.pem"), v2.join("key.pem")).unwrap();
    std::os::unix::fs::symlink("..v1", root.join("..data")).unwrap();
    std::os::unix::fs::symlink("..data/key.pem", root.join("key.pem")).unwrap();

    let kid = |f: &str| {
        let bytes = std::fs::read(fixture(f)).unwrap();
        SigningKey::from_bytes(&bytes, None, None)
            .unwrap()
            .kid()
            .to_string()
    };
    let (old_kid, new_kid) = (kid("ec_p256_sec1.pem"), kid("ed25519_pkcs8.pem"));

    let idp = FakeTokenEndpoint::start(Mode::Issue(Duration::from_secs(2))).await;
    let up = Upstream::start().await;
    let sc = Running::start(
        SidecarConfig::new(&idp.token_url(), root.join("key.pem"))
            .token(|t| {
                t.expiry_skew = Duration::from_millis(500);
                t.refresh_at = 0.5;
            })
            .route(
                RouteBuilder::path("orders", "/orders/", &up.url())
                    .scope(&["orders:read"])
                    .audience(&[ORDERS]),
            ),
    )
    .await;
    sc.wait_ready().await;
    let client = http_client();
    let start = Instant::now();
    let mut swapped_at_form = None;
    while start.elapsed() < Duration::from_secs(6) {
        if swapped_at_form.is_none() && start.elapsed() >= Duration::from_secs(2) {
            // What kubelet does: a new ..data symlink renamed over the old one (atomic).
            let tmp = root.join("..data_tmp");
            std::os::unix::fs::symlink("..v2", &tmp).unwrap();
            std::fs::rename(&tmp, root.join("..data")).unwrap();
            swapped_at_form = Some(idp.forms().len());
        }
        let r = client.get(sc.url("/orders/x")).send().await.unwrap();
        assert_eq!(r.status(), 200, "no failed request during the rotation");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let kids: Vec<String> = idp
        .forms()
        .iter()
        .map(|f| {
            let a = url::form_urlencoded::parse(f.as_bytes())
                .find(|(k, _)| k == "client_assertion")
                .unwrap()
                .1
                .into_owned();
            jsonwebtoken::decode_header(&a).unwrap().kid.unwrap()
        })
        .collect();
    let swapped = swapped_at_form.unwrap();
    assert!(kids[..swapped].iter().all(|k| *k == old_kid), "{kids:?}");
    assert!(
        kids.len() > swapped + 2,
        "refreshes after the swap: {kids:?}"
    );
    // The fetch in flight at the swap may still have used the old key; every later one uses the new.
    assert!(
        kids[swapped + 1..].iter().all(|k| *k == new_kid),
        "{kids:?}"
    );
    sc.stop().await;
}

/// The binary with one route `/orders/` (prefix kept) in front of an upstream, the token from
/// an endpoint that issues 300 s tokens, logging in `format`; the endpoint and the upstream live
/// as long as the returned handles.
async fn logging_sidecar(
    format: LogFormat,
) -> (
    crate::support::process::SidecarProcess,
    FakeTokenEndpoint,
    Upstream,
) {
    let idp = FakeTokenEndpoint::start(Mode::Issue(Duration::from_secs(300))).await;
    let up = Upstream::start().await;
    let token_url = idp.token_url();
    let key = fixture("ec_p256_sec1.pem");
    let upstream = up.url();
    let sc = crate::support::process::SidecarProcess::start(move |proxy, admin| {
        SidecarConfig::new(&token_url, &key)
            .listen(proxy, admin)
            .token(|t| t.client_id = "c".into())
            .route(
                RouteBuilder::path("orders", "/orders/", &upstream)
                    .with(|r| r.strip_prefix = false),
            )
            .log(|l| l.format = format)
            .to_toml()
    })
    .await;
    (sc, idp, up)
}

/// The log writer buffers stderr, but only while more lines are queued: each access-log line
/// is on stderr shortly after its request, while the process keeps running and nothing else is
/// logged (a line left in the buffer until the next one, or until exit, fails this). Text
/// lines to a file (not a terminal) carry no colour codes, and durations are whole
/// microseconds.
#[tokio::test]
async fn each_access_log_line_reaches_stderr_without_waiting_for_the_next() {
    let (mut sc, _idp, _up) = logging_sidecar(LogFormat::Text).await;
    let client = http_client();
    for i in 1..=3 {
        let path = format!("/orders/line-{i}");
        client.get(sc.url(&path)).send().await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while !sc.log().contains(&format!("/line-{i}")) {
            assert!(
                Instant::now() < deadline,
                "request {i}'s access-log line is not on stderr after 5 s:\n{}",
                sc.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    sc.signal("TERM");
    assert!(sc.wait_exit(Duration::from_secs(10)).await.is_some());
    let log = sc.log();
    assert!(!log.contains('\x1b'), "colour codes in a log file:\n{log}");
    let access: Vec<&str> = log.lines().filter(|l| l.contains("/line-")).collect();
    assert_eq!(access.len(), 3, "{log}");
    for line in access {
        let ms = line
            .split("duration_ms=")
            .nth(1)
            .and_then(|r| r.split(' ').next())
            .unwrap_or_else(|| panic!("no duration_ms: {line}"));
        let decimals = ms.split('.').nth(1).map_or(0, str::len);
        assert!(decimals <= 3, "not whole microseconds: {line}");
    }
}

/// `[log] format = "json"`: one JSON object per line, and one access-log event per request with
/// method, route, host, path without query, status, duration and where the token came from.
#[tokio::test]
async fn json_logs_carry_one_access_event_per_request() {
    let (mut sc, _idp, _up) = logging_sidecar(LogFormat::Json).await;
    let client = http_client();
    for path in ["/orders/1?secret=q", "/orders/2", "/nowhere"] {
        client.get(sc.url(path)).send().await.unwrap();
    }
    sc.signal("TERM");
    assert!(
        sc.wait_exit(Duration::from_secs(10))
            .await
            .unwrap()
            .success()
    );
    let log = sc.log();
    let events: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let access: Vec<&serde_json::Value> = events
        .iter()
        .filter(|e| e["target"] == "token_sidecar::access")
        .collect();
    assert_eq!(access.len(), 3, "{log}");
    let first = access[0];
    assert_eq!(first["method"], "GET");
    assert_eq!(first["route"], "orders");
    assert_eq!(first["path"], "/orders/1", "no query string in the log");
    assert_eq!(first["status"], 200);
    assert_eq!(first["token"], "cached");
    assert!(first["host"].as_str().unwrap().starts_with("127.0.0.1:"));
    assert!(first["duration_ms"].as_f64().unwrap() >= 0.0);
    assert_eq!(access[2]["route"], "-");
    assert_eq!(access[2]["status"], 404);
    assert!(!log.contains("secret=q"));
}

/// docs/spec.md §6 (logs): a stderr nobody reads (a stalled log pipe) costs log lines, counted
/// in `token_sidecar_log_dropped_total`, and never requests. Through the real binary, whose
/// stderr is a pipe this test never reads: once the pipe (64 KiB) and the writer's queue
/// (2048 lines) are full, access-log lines are dropped while requests keep being answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stderr_nobody_reads_drops_log_lines_and_requests_keep_succeeding() {
    use crate::support::process::wait_ready;
    use futures_util::StreamExt;
    let idp = FakeTokenEndpoint::start(Mode::Issue(Duration::from_secs(300))).await;
    let up = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let loopback = |port| std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let (proxy, admin) = (loopback(free_port()), loopback(free_port()));
    let cfg = dir.path().join("sidecar.toml");
    let text = SidecarConfig::new(&idp.token_url(), fixture("ec_p256_sec1.pem"))
        .listen(proxy, admin)
        .route(RouteBuilder::path("orders", "/orders/", &up.url()))
        .to_toml();
    std::fs::write(&cfg, text).unwrap();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_token-sidecar"))
        .arg("--config")
        .arg(&cfg)
        .env("RUST_LOG", "info")
        .env_remove("SIDECAR_CONFIG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    // Held open and never read.
    let _stderr = child.stderr.take().unwrap();
    wait_ready(&mut child, admin, Duration::from_secs(15), String::new)
        .await
        .expect("the sidecar became ready");

    let client = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let dropped = async || {
        let (status, m) = get_text(&format!("http://{admin}/metrics")).await;
        assert_eq!(status, 200);
        sample(&m, "token_sidecar_log_dropped_total").unwrap_or(0.0)
    };
    let start = Instant::now();
    let mut served = 0usize;
    // Rounds of 1000 requests until lines are being dropped, then one more round; at most 15
    // rounds (a blocking writer, with a queue of even 8192 lines, blocks well before that).
    let mut rounds_after_drops = 0;
    for round in 0..15 {
        let batch = (0..1000).map(|i| {
            let client = client.clone();
            let url = format!("http://{proxy}/orders/r{round}-{i}");
            async move { client.get(url).send().await.map(|r| r.status().as_u16()) }
        });
        let results = futures_util::stream::iter(batch)
            .buffer_unordered(16)
            .collect::<Vec<_>>()
            .await;
        for r in results {
            match r {
                Ok(200) => served += 1,
                other => panic!(
                    "request {served} failed while stderr was not read: {other:?} (after {:?})",
                    start.elapsed()
                ),
            }
        }
        if dropped().await > 0.0 {
            rounds_after_drops += 1;
            if rounds_after_drops == 2 {
                break;
            }
        }
    }
    let n = dropped().await;
    eprintln!(
        "stderr never read: {served} requests served in {:?}; {n} log lines dropped",
        start.elapsed()
    );
    assert!(
        n > 0.0,
        "no log line was counted as dropped after {served} requests"
    );
    assert_eq!(
        rounds_after_drops, 2,
        "a full round was served while lines were dropped"
    );
    assert!(
        child.try_wait().unwrap().is_none(),
        "the sidecar is still running"
    );
}
