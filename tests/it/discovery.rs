//! Discovery and trust pinning (docs/spec.md §2, §4; issue 12 items 4 and 5): the token
//! endpoint from `token.issuer`'s metadata against oidc-provider, the dev server and a small
//! fake issuer (for what the real servers cannot be made to do: a wrong issuer, a cross-host or
//! plain-http endpoint, a refresh that fails, a TLS certificate from a private CA), and
//! `ca_only` on the token side and on a route, both ways, with two private CAs.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use serde_json::{Value, json};
use token_sidecar::{Config, Sidecar};
use tokio::net::TcpListener;

use crate::against_both;
use crate::support::idp::{Idp, Kind, ORDERS};
use crate::support::upstream::{Upstream, test_tls};
use crate::support::{RouteBuilder, Running, SidecarConfig, fixture, http_client};

against_both!(a_token_is_obtained_through_the_discovered_endpoint);

/// What the fake issuer's metadata URLs answer.
#[derive(Clone)]
enum Doc {
    /// This document at `/.well-known/openid-configuration`.
    Oidc(Value),
    /// 404 there; this document at `/.well-known/oauth-authorization-server/...` (RFC 8414).
    OAuthOnly(Value),
    /// 500 everywhere.
    Fail,
}

struct FakeState {
    /// In the tokens, so two fakes never issue the same one.
    port: u16,
    doc: Mutex<Doc>,
    metadata_requests: AtomicU64,
    failed_metadata: AtomicU64,
    token_requests: AtomicU64,
}

/// An issuer on loopback (HTTP, or HTTPS with the given config) serving a metadata document
/// and a token endpoint at `/oauth2/token` that issues `fake-token-N@PORT` (an hour's lifetime).
struct FakeIssuer {
    addr: SocketAddr,
    scheme: &'static str,
    state: Arc<FakeState>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeIssuer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeIssuer {
    async fn start(tls: Option<Arc<rustls::ServerConfig>>) -> FakeIssuer {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let scheme = if tls.is_some() { "https" } else { "http" };
        let state = Arc::new(FakeState {
            port: addr.port(),
            doc: Mutex::new(Doc::Fail),
            metadata_requests: AtomicU64::new(0),
            failed_metadata: AtomicU64::new(0),
            token_requests: AtomicU64::new(0),
        });
        let s = state.clone();
        let task = tokio::spawn(async move {
            let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
            while let Ok((stream, _)) = listener.accept().await {
                let s = s.clone();
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| {
                        let s = s.clone();
                        async move { Ok::<_, Infallible>(answer(&s, req)) }
                    });
                    let builder = auto::Builder::new(TokioExecutor::new());
                    match acceptor {
                        Some(a) => {
                            if let Ok(tls) = a.accept(stream).await {
                                let _ = builder.serve_connection(TokioIo::new(tls), svc).await;
                            }
                        }
                        None => {
                            let _ = builder.serve_connection(TokioIo::new(stream), svc).await;
                        }
                    }
                });
            }
        });
        FakeIssuer {
            addr,
            scheme,
            state,
            task,
        }
    }

    /// `scheme://127.0.0.1:PORT`
    fn issuer(&self) -> String {
        format!("{}://127.0.0.1:{}", self.scheme, self.addr.port())
    }

    fn token_url(&self) -> String {
        format!("{}/oauth2/token", self.issuer())
    }

    fn serve(&self, doc: Doc) {
        *self.state.doc.lock().unwrap() = doc;
    }

    /// The `n`th token this fake issues.
    fn token(&self, n: u64) -> String {
        format!("fake-token-{n}@{}", self.addr.port())
    }

    fn token_requests(&self) -> u64 {
        self.state.token_requests.load(Ordering::SeqCst)
    }
}

fn json_response(status: StatusCode, body: &Value) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = status;
    r.headers_mut()
        .insert("content-type", "application/json".parse().unwrap());
    r
}

fn answer(s: &FakeState, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_owned();
    if path == "/oauth2/token" {
        let n = s.token_requests.fetch_add(1, Ordering::SeqCst) + 1;
        return json_response(
            StatusCode::OK,
            &json!({"access_token": format!("fake-token-{n}@{}", s.port), "token_type": "Bearer", "expires_in": 3600}),
        );
    }
    let oidc = path == "/.well-known/openid-configuration";
    let oauth = path.starts_with("/.well-known/oauth-authorization-server");
    if !oidc && !oauth {
        return json_response(StatusCode::NOT_FOUND, &json!({"error": "not_found"}));
    }
    s.metadata_requests.fetch_add(1, Ordering::SeqCst);
    match (&*s.doc.lock().unwrap(), oidc) {
        (Doc::Oidc(d), true) | (Doc::OAuthOnly(d), false) => json_response(StatusCode::OK, d),
        (Doc::Fail, _) => {
            s.failed_metadata.fetch_add(1, Ordering::SeqCst);
            json_response(StatusCode::INTERNAL_SERVER_ERROR, &json!({}))
        }
        _ => json_response(StatusCode::NOT_FOUND, &json!({"error": "not_found"})),
    }
}

/// A sidecar of one `/orders/` route to `upstream` that discovers its token endpoint from
/// `issuer` (no `token_url`).
fn discovering(
    issuer: &str,
    upstream: &str,
    token: impl FnOnce(&mut token_sidecar::TokenConfig),
) -> Config {
    SidecarConfig::new("http://unused.invalid/", fixture("ec_p256_sec1.pem"))
        .token(|t| {
            t.token_url = None;
            t.issuer = Some(issuer.to_owned());
            token(t);
        })
        .route(
            RouteBuilder::path("orders", "/orders/", upstream)
                .scope(&["orders:read"])
                .audience(&[ORDERS]),
        )
        .build()
}

async fn readyz(sc: &Running) -> Value {
    http_client()
        .get(format!("http://{}/readyz", sc.admin))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// The start-up error of a config the sidecar must refuse to start with.
async fn start_error(cfg: Config) -> String {
    match Sidecar::bind(cfg).await {
        Ok(_) => panic!("the sidecar started"),
        Err(e) => e.to_string(),
    }
}

fn write_ca(dir: &Path, name: &str, pem: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, pem).unwrap();
    path
}

/// oidc-provider (its issuer is its base URL) and the dev server both serve
/// `/.well-known/openid-configuration`: the sidecar, given only the issuer, gets a token the
/// server signed, through the endpoint it discovered (also the assertion's `aud`, which both
/// check), and `/readyz` names that endpoint.
async fn a_token_is_obtained_through_the_discovered_endpoint(kind: Kind) {
    let idp = Idp::start(kind, "ec_p256_sec1.pem", None, Duration::from_secs(300)).await;
    let issuer = match &idp {
        Idp::Oidc(p) => p.issuer.clone(),
        Idp::Dev(d) => d.token_url().trim_end_matches("/oauth2/token").to_owned(),
    };
    let up = Upstream::start().await;
    let sc = Running::start(discovering(&issuer, &up.url(), |_| {})).await;
    sc.wait_ready().await;

    let resp = http_client().get(sc.url("/orders/1")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let token = up.received()[0].bearer().expect("a bearer token");
    let claims = idp.verify_access_token(&token).await;
    assert!(claims["scope"].as_str().unwrap().contains("orders:read"));
    assert_eq!(readyz(&sc).await["token_endpoint"], idp.token_url());
    sc.stop().await;
}

/// An issuer with a path whose server only has the RFC 8414 document: found at
/// `/.well-known/oauth-authorization-server/tenant` after the OIDC location answered 404.
#[tokio::test]
async fn rfc8414_metadata_is_the_fallback_for_an_issuer_with_a_path() {
    let fake = FakeIssuer::start(None).await;
    let issuer = format!("{}/tenant", fake.issuer());
    fake.serve(Doc::OAuthOnly(
        json!({"issuer": issuer, "token_endpoint": fake.token_url()}),
    ));
    let up = Upstream::start().await;
    let sc = Running::start(discovering(&issuer, &up.url(), |_| {})).await;
    sc.wait_ready().await;
    let resp = http_client().get(sc.url("/orders/1")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(up.received()[0].bearer().unwrap(), fake.token(1));
    sc.stop().await;
}

/// A document that speaks for another issuer is refused: the sidecar does not start, and the
/// error names token.issuer and the mismatch. Nothing is asked of any token endpoint.
#[tokio::test]
async fn a_document_naming_another_issuer_stops_the_start() {
    let fake = FakeIssuer::start(None).await;
    fake.serve(Doc::Oidc(
        json!({"issuer": "http://127.0.0.1:1", "token_endpoint": fake.token_url()}),
    ));
    let err = start_error(discovering(&fake.issuer(), "http://127.0.0.1:9", |_| {})).await;
    assert!(err.starts_with("token.issuer:"), "{err}");
    assert!(err.contains("names issuer"), "{err}");
    assert_eq!(fake.token_requests(), 0);
}

/// A token endpoint on another host (`localhost` for an issuer at `127.0.0.1`) is refused
/// unless `allow_cross_host_endpoint`; allowed, the token comes from there.
#[tokio::test]
async fn a_cross_host_token_endpoint_is_refused_unless_allowed() {
    let fake = FakeIssuer::start(None).await;
    let elsewhere = format!("http://localhost:{}/oauth2/token", fake.addr.port());
    fake.serve(Doc::Oidc(
        json!({"issuer": fake.issuer(), "token_endpoint": elsewhere}),
    ));
    let up = Upstream::start().await;
    let err = start_error(discovering(&fake.issuer(), &up.url(), |_| {})).await;
    assert!(err.contains("allow_cross_host_endpoint"), "{err}");

    let sc = Running::start(discovering(&fake.issuer(), &up.url(), |t| {
        t.allow_cross_host_endpoint = true
    }))
    .await;
    sc.wait_ready().await;
    assert_eq!(readyz(&sc).await["token_endpoint"], elsewhere);
    let resp = http_client().get(sc.url("/orders/1")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    sc.stop().await;
}

/// An https issuer naming a plain-http token endpoint is refused unless
/// `allow_insecure_token_url` (the credentials would cross in clear text).
#[tokio::test]
async fn a_plain_http_token_endpoint_is_refused_unless_allowed() {
    let (tls, ca_pem) = test_tls();
    let fake = FakeIssuer::start(Some(tls)).await;
    let plain = format!("http://127.0.0.1:{}/oauth2/token", fake.addr.port());
    fake.serve(Doc::Oidc(
        json!({"issuer": fake.issuer(), "token_endpoint": plain}),
    ));
    let dir = tempfile::tempdir().unwrap();
    let ca = write_ca(dir.path(), "ca.pem", &ca_pem);
    let cfg = |insecure: bool| {
        discovering(&fake.issuer(), "http://127.0.0.1:9", |t| {
            t.allow_insecure_token_url = insecure;
            t.ca_file = Some(ca.clone());
        })
    };
    let err = start_error(cfg(false)).await;
    assert!(err.contains("allow_insecure_token_url"), "{err}");
    // Allowed, it is accepted and shown (no token can come from it: that port speaks TLS).
    let sc = Running::start(cfg(true)).await;
    assert_eq!(readyz(&sc).await["token_endpoint"], plain);
    sc.stop().await;
}

/// After a good start, the issuer's metadata fails (500) on every refresh: the sidecar keeps
/// the last good endpoint — `/readyz` still names it, and a token the upstream rejects is
/// replaced by one fetched from it.
#[tokio::test]
async fn a_failed_refresh_keeps_the_last_good_endpoint() {
    let fake = FakeIssuer::start(None).await;
    fake.serve(Doc::Oidc(
        json!({"issuer": fake.issuer(), "token_endpoint": fake.token_url()}),
    ));
    let up = Upstream::start().await;
    let sc = Running::start(discovering(&fake.issuer(), &up.url(), |t| {
        t.discovery_refresh_interval = Duration::from_secs(1);
    }))
    .await;
    sc.wait_ready().await;
    fake.serve(Doc::Fail);
    // Bounded wait for two failed refreshes (both metadata URLs of one round, or two rounds).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while fake.state.failed_metadata.load(Ordering::SeqCst) < 2 {
        assert!(tokio::time::Instant::now() < deadline, "no refresh in 10 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(readyz(&sc).await["token_endpoint"], fake.token_url());

    // Force a new token: the upstream now rejects the current one.
    let client = http_client();
    assert_eq!(
        client
            .get(sc.url("/orders/1"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    up.revoke(&fake.token(1));
    let resp = client.get(sc.url("/orders/2")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        up.received().last().unwrap().bearer().unwrap(),
        fake.token(2)
    );
    assert_eq!(fake.token_requests(), 2);
    sc.stop().await;
}

/// `token.ca_only` with the CA that signed the issuer's certificate: discovery and the token
/// request both succeed over TLS. With another private CA (and ca_only), the start is refused:
/// only the pinned CA is trusted.
#[tokio::test]
async fn token_ca_only_trusts_exactly_the_pinned_ca() {
    let (tls, ca_pem) = test_tls();
    let (_, other_ca_pem) = test_tls();
    let fake = FakeIssuer::start(Some(tls)).await;
    fake.serve(Doc::Oidc(
        json!({"issuer": fake.issuer(), "token_endpoint": fake.token_url()}),
    ));
    let dir = tempfile::tempdir().unwrap();
    let ca = write_ca(dir.path(), "ca.pem", &ca_pem);
    let other = write_ca(dir.path(), "other.pem", &other_ca_pem);
    let up = Upstream::start().await;
    let cfg = |ca: &Path| {
        discovering(&fake.issuer(), &up.url(), |t| {
            t.allow_insecure_token_url = false;
            t.ca_file = Some(ca.to_path_buf());
            t.ca_only = true;
        })
    };

    let sc = Running::start(cfg(&ca)).await;
    sc.wait_ready().await;
    let resp = http_client().get(sc.url("/orders/1")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(up.received()[0].bearer().unwrap(), fake.token(1));
    sc.stop().await;

    let err = start_error(cfg(&other)).await;
    assert!(err.starts_with("token.issuer: cannot fetch"), "{err}");
}

/// `route.ca_only` with the upstream's CA forwards; with another private CA it is refused
/// (502 upstream_unavailable).
#[tokio::test]
async fn route_ca_only_trusts_exactly_the_pinned_ca() {
    let fake = FakeIssuer::start(None).await;
    let (tls, ca_pem) = test_tls();
    let (_, other_ca_pem) = test_tls();
    let up = Upstream::start_with_tls(Some(tls)).await;
    let dir = tempfile::tempdir().unwrap();
    let ca = write_ca(dir.path(), "ca.pem", &ca_pem);
    let other = write_ca(dir.path(), "other.pem", &other_ca_pem);
    let https = format!("https://localhost:{}", up.addr.port());
    let route = |name: &str, prefix: &str, ca: &Path| {
        RouteBuilder::path(name, prefix, &https).with(|r| {
            r.allow_insecure_upstream = false;
            r.ca_file = Some(ca.to_path_buf());
            r.ca_only = true;
        })
    };
    let sc = Running::start(
        SidecarConfig::new(&fake.token_url(), fixture("ec_p256_sec1.pem")).routes([
            route("pinned", "/pinned/", &ca),
            route("other", "/other/", &other),
        ]),
    )
    .await;
    sc.wait_ready().await;
    let client = http_client();
    let resp = client.get(sc.url("/pinned/x")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let resp = client.get(sc.url("/other/x")).send().await.unwrap();
    assert_eq!(resp.status(), 502);
    assert_eq!(
        resp.headers()["token-sidecar-error"],
        "upstream_unavailable"
    );
    assert_eq!(
        up.count(),
        1,
        "nothing reached the upstream through the wrong CA"
    );
    sc.stop().await;
}

/// `check-config` with `token.issuer` fetches the metadata as `run` would and prints the
/// discovered endpoint (exit 0); when the issuer cannot be reached it exits 1 naming
/// token.issuer (not 2: the file is not wrong), and so does `run`.
#[tokio::test]
async fn check_config_shows_the_discovered_endpoint_and_run_names_the_issuer_on_failure() {
    let fake = FakeIssuer::start(None).await;
    fake.serve(Doc::Oidc(
        json!({"issuer": fake.issuer(), "token_endpoint": fake.token_url()}),
    ));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sidecar.toml");
    let cli = |cmd: &'static str| {
        let path = path.clone();
        async move {
            let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_token-sidecar"))
                .arg(cmd)
                .arg("--config")
                .arg(&path)
                .kill_on_drop(true)
                .output();
            let out = tokio::time::timeout(Duration::from_secs(30), out)
                .await
                .expect("the command ends within 30 s")
                .unwrap();
            (
                out.status.code().unwrap_or(-1),
                String::from_utf8_lossy(&out.stdout).into_owned(),
                String::from_utf8_lossy(&out.stderr).into_owned(),
            )
        }
    };
    let text = SidecarConfig::new("http://unused.invalid/", fixture("ec_p256_sec1.pem"))
        .token(|t| {
            t.token_url = None;
            t.issuer = Some(fake.issuer());
        })
        .route(RouteBuilder::path(
            "orders",
            "/orders/",
            "http://127.0.0.1:9",
        ))
        .to_toml();
    std::fs::write(&path, &text).unwrap();
    let (code, out, err) = cli("check-config").await;
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(
        out.contains(&format!(
            "# token endpoint discovered from token.issuer: {}",
            fake.token_url()
        )),
        "{out}"
    );

    drop(fake);
    for cmd in ["check-config", "run"] {
        let (code, out, err) = cli(cmd).await;
        assert_eq!(code, 1, "{cmd}: {out}\n{err}");
        assert!(err.contains("token.issuer: cannot fetch"), "{cmd}: {err}");
    }
}

/// A refreshed document that names a new token endpoint takes effect at the next attempt
/// without a restart: the next token comes from the new endpoint, and `/readyz` names it.
#[tokio::test]
async fn a_refreshed_document_moves_the_next_attempt_to_the_new_endpoint() {
    let fake = FakeIssuer::start(None).await;
    let moved = FakeIssuer::start(None).await;
    fake.serve(Doc::Oidc(
        json!({"issuer": fake.issuer(), "token_endpoint": fake.token_url()}),
    ));
    let up = Upstream::start().await;
    let sc = Running::start(discovering(&fake.issuer(), &up.url(), |t| {
        t.discovery_refresh_interval = Duration::from_secs(1);
    }))
    .await;
    sc.wait_ready().await;
    // Same host, another port: accepted without allow_cross_host_endpoint.
    fake.serve(Doc::Oidc(
        json!({"issuer": fake.issuer(), "token_endpoint": moved.token_url()}),
    ));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while readyz(&sc).await["token_endpoint"] != moved.token_url() {
        assert!(tokio::time::Instant::now() < deadline, "no refresh in 10 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    up.revoke(&fake.token(1));
    let resp = http_client().get(sc.url("/orders/1")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        up.received().last().unwrap().bearer().unwrap(),
        moved.token(1)
    );
    assert_eq!(moved.token_requests(), 1);
    assert_eq!(
        fake.token_requests(),
        1,
        "only the first token came from the old endpoint"
    );
    sc.stop().await;
}
