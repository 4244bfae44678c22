//! Several OAuth clients in one sidecar (issue 13 item 1; docs/spec.md §2–§3): `[token]` is the
//! client `default`, each `[[client]]` another with its own key and registration; a route
//! names its client. Against the real oidc-provider with two registered clients.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::Value;

use crate::support::authz::{AuthzConfig, ClientReg, OidcProvider, ResourceReg};
use crate::support::idp::{BILLING, ORDERS};
use crate::support::upstream::Upstream;
use crate::support::{
    CLIENT_ID, RouteBuilder, Running, SidecarConfig, fixture, http_client, public_jwks,
};

/// The second client's id at the provider, and its key (another algorithm family than the
/// first client's ES256, so a mixed-up key could not pass).
pub(crate) const BILLING_CLIENT: &str = "billing-service";
pub(crate) const BILLING_KEY: &str = "ed25519_pkcs8.pem";

/// oidc-provider knowing both clients: ours may ask for orders, the billing client for billing.
async fn provider() -> OidcProvider {
    OidcProvider::start(&AuthzConfig {
        clients: vec![
            ClientReg {
                client_id: CLIENT_ID.into(),
                jwks: public_jwks("ec_p256_sec1.pem", None),
                scope: "orders:read".into(),
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
                scope: "orders:read".into(),
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

/// `/orders/` with the default client, `/billing/` with the `billing` client.
pub(crate) fn two_clients(token_url: &str, up: &str) -> SidecarConfig {
    SidecarConfig::new(token_url, fixture("ec_p256_sec1.pem"))
        .client("billing", |t| {
            t.client_id = BILLING_CLIENT.into();
            t.private_key_file = Some(fixture(BILLING_KEY));
        })
        .route(
            RouteBuilder::path("orders", "/orders/", up)
                .scope(&["orders:read"])
                .audience(&[ORDERS]),
        )
        .route(
            RouteBuilder::path("billing", "/billing/", up)
                .scope(&["billing:read"])
                .audience(&[BILLING])
                .with(|r| r.client = Some("billing".into())),
        )
}

#[tokio::test]
async fn each_route_sends_a_token_issued_to_its_own_client() {
    let idp = provider().await;
    let up = Upstream::start().await;
    let sc = Running::start(two_clients(&idp.token_url, &up.url())).await;
    sc.wait_ready().await;
    let client = http_client();
    for path in ["/orders/1", "/billing/1", "/orders/2", "/billing/2"] {
        let resp = client.get(sc.url(path)).send().await.unwrap();
        assert_eq!(resp.status(), 200, "{path}: {}", resp.text().await.unwrap());
    }
    let got = up.received();
    assert_eq!(got.len(), 4);
    let orders = idp
        .verify_access_token(&got[0].bearer().expect("a bearer token"))
        .await;
    let billing = idp
        .verify_access_token(&got[1].bearer().expect("a bearer token"))
        .await;
    // oidc-provider puts the authenticated client in `client_id` (and `sub` for
    // client_credentials): each token was issued to the route's own client.
    assert_eq!(orders["client_id"], CLIENT_ID);
    assert_eq!(orders["aud"], ORDERS);
    assert_eq!(billing["client_id"], BILLING_CLIENT);
    assert_eq!(billing["aud"], BILLING);
    // Cached per (client, scope set, audience set): one token request per client.
    assert_eq!(got[2].bearer(), got[0].bearer());
    assert_eq!(got[3].bearer(), got[1].bearer());
    assert_eq!(idp.token_requests().await, 2);

    // /readyz waits for both clients' tokens and names every client's endpoint.
    let ready: Value = client
        .get(format!("http://{}/readyz", sc.admin))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(ready["status"], "ready");
    assert!(
        ready["clients"]["billing"]["token_endpoint"].is_string(),
        "{ready}"
    );
    assert!(
        ready["clients"]["default"]["token_endpoint"].is_string(),
        "{ready}"
    );
    // The run-time cache is described per client, labels from the config only.
    let metrics = client
        .get(format!("http://{}/metrics", sc.admin))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for c in ["default", "billing"] {
        assert!(
            metrics.contains(&format!("token_sidecar_cache_entries{{client=\"{c}\"}} 0")),
            "{metrics}"
        );
        assert!(
            metrics.contains(&format!(
                "token_sidecar_cache_evictions_total{{client=\"{c}\",cause=\"size\"}} 0"
            )),
            "{metrics}"
        );
    }
    assert!(metrics.contains("token_sidecar_token_fetches_total{outcome=\"ok\"} 2"));
    // The route's series name its client.
    assert!(
        metrics.contains(
            "token_sidecar_token_refresh_failing{route=\"billing\",client=\"billing\"} 0"
        ),
        "{metrics}"
    );
    sc.stop().await;
}

#[tokio::test]
async fn a_client_that_cannot_start_stops_the_start_naming_it() {
    // The billing client's issuer does not answer: discovery fails, the start fails, the
    // error names the client (and `[token]` is fine).
    let closed = crate::support::process::free_port();
    let cfg = SidecarConfig::new(
        "http://127.0.0.1:9/oauth2/token",
        fixture("ec_p256_sec1.pem"),
    )
    .client("billing", |t| {
        t.token_url = None;
        t.issuer = Some(format!("http://127.0.0.1:{closed}"));
        t.request_timeout = Duration::from_secs(1);
    })
    .route(RouteBuilder::path(
        "orders",
        "/orders/",
        "http://127.0.0.1:9",
    ));
    let err = token_sidecar::Sidecar::bind(cfg.build())
        .await
        .expect_err("the start fails");
    let text = err.to_string();
    assert!(
        text.contains("\"billing\"") && text.contains("client[0]"),
        "{text}"
    );
}

fn run(args: &[&str], config: &Path) -> (i32, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_token-sidecar"));
    cmd.args(args).arg("--config").arg(config);
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy().into_owned();
        if k.starts_with("SIDECAR_") || k.to_ascii_lowercase().ends_with("_proxy") {
            cmd.env_remove(&k);
        }
    }
    let out = cmd.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn the_token_command_asks_as_the_named_client_and_check_config_checks_every_client() {
    let idp = provider().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sidecar.toml");
    std::fs::write(
        &path,
        two_clients(&idp.token_url, "http://127.0.0.1:9").to_toml(),
    )
    .unwrap();
    let file = path.clone();
    let (code, out, err) = tokio::task::spawn_blocking(move || {
        run(
            &[
                "token",
                "--client",
                "billing",
                "--scope",
                "billing:read",
                "--audience",
                BILLING,
            ],
            &file,
        )
    })
    .await
    .unwrap();
    assert_eq!(code, 0, "{out}\n{err}");
    let printed: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(printed["claims"]["client_id"], BILLING_CLIENT, "{out}");

    let file = path.clone();
    let (code, _, err) =
        tokio::task::spawn_blocking(move || run(&["token", "--client", "nope"], &file))
            .await
            .unwrap();
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("\"nope\"") && err.contains("billing"), "{err}");

    // A bad key in the [[client]] block: exit 2 naming that client's key.
    let junk = dir.path().join("junk.pem");
    std::fs::write(&junk, "not a key").unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    let billing_key = fixture(BILLING_KEY).display().to_string();
    assert!(text.contains(&billing_key));
    std::fs::write(
        &path,
        text.replace(&billing_key, &junk.display().to_string()),
    )
    .unwrap();
    let (code, out, err) = run(&["check-config"], &path);
    assert_eq!(code, 2, "{out}\n{err}");
    assert!(err.contains("client[0].private_key_file"), "{err}");
}

#[tokio::test]
async fn readyz_names_the_client_of_each_route_that_waits() {
    // Nothing answers either token endpoint: both routes wait, each named with its client.
    let closed = crate::support::process::free_port();
    let url = format!("http://127.0.0.1:{closed}/oauth2/token");
    let cfg = SidecarConfig::new(&url, fixture("ec_p256_sec1.pem"))
        .client("billing", |t| {
            t.client_id = BILLING_CLIENT.into();
            t.private_key_file = Some(fixture(BILLING_KEY));
        })
        .route(RouteBuilder::path("orders", "/orders/", "http://127.0.0.1:9").audience(&[ORDERS]))
        .route(
            RouteBuilder::path("billing", "/billing/", "http://127.0.0.1:9")
                .audience(&[BILLING])
                .with(|r| r.client = Some("billing".into())),
        );
    let sc = Running::start(cfg).await;
    let resp = http_client()
        .get(format!("http://{}/readyz", sc.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 503);
    let body: Value = resp.json().await.unwrap();
    let waiting: Vec<(String, String)> = body["waiting"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| {
            (
                w["route"].as_str().unwrap().to_owned(),
                w["client"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        waiting,
        [
            ("orders".to_owned(), "default".to_owned()),
            ("billing".to_owned(), "billing".to_owned())
        ],
        "{body}"
    );
    sc.stop().await;
}
