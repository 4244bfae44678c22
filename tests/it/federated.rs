//! `auth_method = "client_assertion_file"` against the development server trusting a federated
//! issuer (docs/spec.md §2, §7): the assertion is a projected-service-account-token-shaped JWT
//! minted here with a test key (the "cluster issuer"), written to a file the way kubelet writes
//! one (a symlink swapped atomically), and read by the sidecar.
//!
//! oidc-provider cannot be configured to accept a client assertion signed by a third-party
//! issuer (it verifies `private_key_jwt` against the client's own registered keys with
//! `iss` = `sub` = client_id), so these tests use the development server only.

use std::path::{Path, PathBuf};
use std::time::Duration;

use jsonwebtoken::{EncodingKey, Header};
use token_sidecar::{
    AuthMethod, Dev, DevClient, DevFederation, DevOptions, DevServer, DevServerConfig, jwt_claims,
};
use tokio::io::AsyncReadExt as _;
use tokio::time::Instant;

use crate::support::idp::ORDERS;
use crate::support::process::free_port;
use crate::support::upstream::Upstream;
use crate::support::{CLIENT_ID, Running, SidecarConfig, fixture, http_client, orders_config};

/// The cluster's service-account issuer (what `kubectl get --raw /.well-known/openid-configuration` names).
const CLUSTER_ISSUER: &str = "https://oidc.cluster.test/issuer";
const SERVICE_ACCOUNT: &str = "system:serviceaccount:shop:orders";
/// The `audience` of the projected volume, accepted by the federated credential.
const PROJECTED_AUDIENCE: &str = "token-sidecar";

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// The cluster issuer's JWK Set (public half of the RSA test key) in `dir`, and its `kid`.
fn cluster_jwks(dir: &Path) -> (PathBuf, String) {
    let jwks = crate::support::public_jwks("rsa_pkcs8.pem", None);
    let kid = jwks["keys"][0]["kid"].as_str().unwrap().to_string();
    let at = dir.join("cluster-jwks.json");
    std::fs::write(&at, jwks.to_string()).unwrap();
    (at, kid)
}

/// A token shaped like a Kubernetes projected service-account token, signed by the cluster key.
fn projected_token(kid: &str, sub: &str, jti: &str, exp: u64) -> String {
    let iat = now() - 5;
    let claims = serde_json::json!({
        "iss": CLUSTER_ISSUER,
        "sub": sub,
        "aud": [PROJECTED_AUDIENCE],
        "exp": exp,
        "iat": iat,
        "nbf": iat,
        "jti": jti,
        "kubernetes.io": {
            "namespace": "shop",
            "serviceaccount": {"name": "orders", "uid": "0e6c2f8a-1d7e-4b0e-9a51-1f0a3c5d2b11"},
            "pod": {"name": "orders-7d9f8", "uid": "6a1b7d2e-55f0-4c3e-8a0d-2b9e4f6c1a77"},
        },
    });
    let mut header = Header::new(jsonwebtoken::Algorithm::RS256);
    header.kid = Some(kid.to_string());
    let pem = std::fs::read(fixture("rsa_pkcs8.pem")).unwrap();
    jsonwebtoken::encode(&header, &claims, &EncodingKey::from_rsa_pem(&pem).unwrap()).unwrap()
}

/// Writes `content` the way kubelet updates a projected volume: a new file, then a new symlink
/// renamed over the old one.
fn swap_in(link: &Path, content: &str, version: &str) {
    let dir = link.parent().unwrap();
    let data = dir.join(format!("..{version}"));
    std::fs::write(&data, content).unwrap();
    let tmp = dir.join("token.tmp");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(&data, &tmp).unwrap();
    std::fs::rename(&tmp, link).unwrap();
}

/// The development server trusting the cluster issuer for `CLIENT_ID`, tokens living `ttl`.
async fn federated_server(jwks: &Path, ttl: Duration) -> DevServer {
    DevServer::start(DevServerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        clients: vec![DevClient {
            client_id: CLIENT_ID.into(),
            // No key of its own: only the federated credential authenticates it.
            jwks: serde_json::json!({ "keys": [] }),
            scopes: ["orders:read".to_string()].into(),
            audiences: [ORDERS.to_string()].into(),
        }],
        federations: vec![DevFederation {
            issuer: CLUSTER_ISSUER.into(),
            subject: SERVICE_ACCOUNT.into(),
            client_id: CLIENT_ID.into(),
            jwks: jwks.display().to_string(),
            audience: Some(PROJECTED_AUDIENCE.into()),
        }],
        token_ttl: ttl,
    })
    .await
    .expect("dev server starts")
}

fn federated_config(token_url: &str, upstream: &str, file: &Path) -> SidecarConfig {
    let file = file.to_path_buf();
    orders_config(token_url, upstream, move |t| {
        t.auth_method = AuthMethod::ClientAssertionFile;
        t.private_key_file = None;
        t.client_assertion_file = Some(file);
    })
}

async fn readyz(admin: std::net::SocketAddr) -> (u16, serde_json::Value) {
    let r = http_client()
        .get(format!("http://{admin}/readyz"))
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap())
}

#[tokio::test]
async fn a_projected_token_gets_a_token_for_the_federated_client() {
    let dir = tempfile::tempdir().unwrap();
    let (jwks, kid) = cluster_jwks(dir.path());
    let link = dir.path().join("token");
    swap_in(
        &link,
        &projected_token(&kid, SERVICE_ACCOUNT, "sa-token-1", now() + 3600),
        "v1",
    );
    let idp = federated_server(&jwks, Duration::from_secs(3600)).await;
    let up = Upstream::start().await;
    let sidecar = Running::start(federated_config(idp.token_url(), &up.url(), &link)).await;

    let r = http_client()
        .get(sidecar.url("/orders/items"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let bearer = up.received()[0].bearer().expect("the upstream got a token");
    let claims = jwt_claims(&bearer).unwrap();
    assert_eq!(claims["client_id"], CLIENT_ID);
    assert_eq!(claims["aud"], ORDERS);
    assert_eq!(claims["scope"], "orders:read");
    // It was the platform's token that authenticated the client.
    assert_eq!(idp.federated_jtis(), vec!["sa-token-1".to_string()]);
    sidecar.stop().await;
}

#[tokio::test]
async fn a_rotated_projected_token_is_used_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (jwks, kid) = cluster_jwks(dir.path());
    let link = dir.path().join("token");
    swap_in(
        &link,
        &projected_token(&kid, SERVICE_ACCOUNT, "before-rotation", now() + 3600),
        "v1",
    );
    // Access tokens of 4 s: the sidecar fetches again every second or so.
    let idp = federated_server(&jwks, Duration::from_secs(4)).await;
    let up = Upstream::start().await;
    let sidecar = Running::start(federated_config(idp.token_url(), &up.url(), &link)).await;
    sidecar.wait_ready().await;
    assert_eq!(idp.federated_jtis(), vec!["before-rotation".to_string()]);

    swap_in(
        &link,
        &projected_token(&kid, SERVICE_ACCOUNT, "after-rotation", now() + 3600),
        "v2",
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while !idp.federated_jtis().contains(&"after-rotation".to_string()) {
        assert!(
            Instant::now() < deadline,
            "the rotated token was never sent"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Wait for one more fetch: it must use the new token too (the old one is never sent again).
    let seen = idp.federated_jtis().len();
    while idp.federated_jtis().len() == seen {
        assert!(Instant::now() < deadline, "no fetch after the rotation");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let jtis = idp.federated_jtis();
    let first_new = jtis.iter().position(|j| j == "after-rotation").unwrap();
    assert!(
        jtis[first_new..].iter().all(|j| j == "after-rotation"),
        "{jtis:?}"
    );
    let r = http_client()
        .get(sidecar.url("/orders/x"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    sidecar.stop().await;
}

#[tokio::test]
async fn an_expiring_or_missing_assertion_is_never_sent_and_readyz_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let (jwks, kid) = cluster_jwks(dir.path());
    let link = dir.path().join("token");
    let idp = federated_server(&jwks, Duration::from_secs(3600)).await;
    let up = Upstream::start().await;

    // Missing: the platform has not written it yet.
    let sidecar = Running::start(federated_config(idp.token_url(), &up.url(), &link)).await;
    let r = http_client()
        .get(sidecar.url("/orders/x"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"], "token_unavailable");
    let (status, ready) = readyz(sidecar.admin).await;
    assert_eq!(status, 503);
    let reason = ready["waiting"][0]["reason"].as_str().unwrap().to_string();
    assert!(
        reason.contains(&link.display().to_string()) && reason.contains("missing"),
        "{reason}"
    );

    // Written, but its exp is within clock_skew_tolerance (30 s): the server would still take
    // it, but a server clock ahead of ours would not; it is never sent.
    let exp = now() + 20;
    let expiring = projected_token(&kid, SERVICE_ACCOUNT, "expiring", exp);
    swap_in(&link, &expiring, "v1");
    let at = humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_secs(exp))
        .to_string();
    let deadline = Instant::now() + Duration::from_secs(10);
    let reason = loop {
        let (status, ready) = readyz(sidecar.admin).await;
        assert_eq!(status, 503);
        let reason = ready["waiting"][0]["reason"].as_str().unwrap().to_string();
        if reason.contains("expired") {
            break reason;
        }
        assert!(
            Instant::now() < deadline,
            "never reported expired: {reason}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        reason.contains(&link.display().to_string()) && reason.contains(&at),
        "{reason}"
    );
    assert!(!reason.contains(&expiring), "{reason}");
    let r = http_client()
        .get(sidecar.url("/orders/x"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(
        idp.token_requests(),
        0,
        "a missing or expiring assertion was sent"
    );

    // The platform rotates it: the next attempt re-reads the file, without a restart.
    swap_in(
        &link,
        &projected_token(&kid, SERVICE_ACCOUNT, "fresh", now() + 3600),
        "v2",
    );
    sidecar.wait_ready().await;
    assert_eq!(idp.federated_jtis(), vec!["fresh".to_string()]);
    assert_eq!(idp.token_requests(), 1);
    sidecar.stop().await;
}

#[tokio::test]
async fn a_wrong_subject_is_refused_with_token_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let (jwks, kid) = cluster_jwks(dir.path());
    let link = dir.path().join("token");
    swap_in(
        &link,
        &projected_token(
            &kid,
            "system:serviceaccount:shop:intruder",
            "wrong-sub",
            now() + 3600,
        ),
        "v1",
    );
    let idp = federated_server(&jwks, Duration::from_secs(3600)).await;
    let up = Upstream::start().await;
    let sidecar = Running::start(federated_config(idp.token_url(), &up.url(), &link)).await;
    let r = http_client()
        .get(sidecar.url("/orders/x"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 502);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"], "token_rejected", "{body}");
    let (_, ready) = readyz(sidecar.admin).await;
    let reason = ready["waiting"][0]["reason"].as_str().unwrap();
    assert!(
        reason.contains("invalid_client") && reason.contains("sub"),
        "{reason}"
    );
    assert!(idp.token_requests() >= 1);
    assert!(idp.federated_jtis().is_empty());
    assert_eq!(up.count(), 0);
    sidecar.stop().await;
}

/// The real binary at `trace` level, its token requests refused (wrong `sub`): the assertion,
/// which it did send, appears in no log line, no /readyz body and no error response.
#[tokio::test]
async fn the_assertion_appears_in_no_log_line() {
    let dir = tempfile::tempdir().unwrap();
    let (jwks, kid) = cluster_jwks(dir.path());
    let link = dir.path().join("token");
    let assertion = projected_token(
        &kid,
        "system:serviceaccount:shop:intruder",
        "logged",
        now() + 3600,
    );
    swap_in(&link, &assertion, "v1");
    let idp = federated_server(&jwks, Duration::from_secs(3600)).await;
    let up = Upstream::start().await;
    let (proxy_port, admin_port) = (free_port(), free_port());
    let loopback = |port| std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let cfg = dir.path().join("sidecar.toml");
    std::fs::write(
        &cfg,
        federated_config(idp.token_url(), &up.url(), &link)
            .listen(loopback(proxy_port), loopback(admin_port))
            .to_toml(),
    )
    .unwrap();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_token-sidecar"))
        .arg("--config")
        .arg(&cfg)
        .env("RUST_LOG", "trace")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
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

    // Until the server has refused at least two assertions, and a request has seen it.
    let client = http_client();
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut answers = String::new();
    while idp.token_requests() < 2 {
        assert!(Instant::now() < deadline, "the sidecar sent no assertion");
        if let Ok(r) = client
            .get(format!("http://127.0.0.1:{proxy_port}/orders/x"))
            .send()
            .await
        {
            answers.push_str(&r.text().await.unwrap_or_default());
        }
        if let Ok(r) = client
            .get(format!("http://127.0.0.1:{admin_port}/readyz"))
            .send()
            .await
        {
            answers.push_str(&r.text().await.unwrap_or_default());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let kill = std::process::Command::new("kill")
        .arg("-TERM")
        .arg(child.id().unwrap().to_string())
        .status()
        .unwrap();
    assert!(kill.success());
    tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .expect("the sidecar exits")
        .unwrap();
    let logs = String::from_utf8_lossy(&logs.await.unwrap()).into_owned();
    assert!(
        logs.contains("invalid_client"),
        "the refusal is logged:\n{logs}"
    );
    let signature = assertion.rsplit('.').next().unwrap();
    let payload = assertion.split('.').nth(1).unwrap();
    for (what, text) in [("logs", &logs), ("answers", &answers)] {
        assert!(
            !text.contains(signature),
            "the assertion's signature in {what}"
        );
        assert!(!text.contains(payload), "the assertion's payload in {what}");
    }
}

/// `token-sidecar dev --federated-issuer … --federated-subject … --federated-jwks …`, in-process:
/// the client keeps its assertion file and the development server trusts the cluster issuer
/// for `token.client_id`; without the federation, dev replaces the method with a throwaway key.
#[tokio::test]
async fn dev_keeps_the_assertion_file_when_told_to_trust_its_issuer() {
    let dir = tempfile::tempdir().unwrap();
    let (jwks, kid) = cluster_jwks(dir.path());
    let link = dir.path().join("token");
    swap_in(
        &link,
        &projected_token(&kid, SERVICE_ACCOUNT, "via-dev", now() + 3600),
        "v1",
    );
    let up = Upstream::start().await;
    let loopback0 = Some(std::net::SocketAddr::from(([127, 0, 0, 1], 0)));
    let config = || federated_config("http://127.0.0.1:9/oauth2/token", &up.url(), &link).build();
    let federation = DevFederation {
        issuer: CLUSTER_ISSUER.into(),
        subject: SERVICE_ACCOUNT.into(),
        client_id: String::new(),
        jwks: jwks.display().to_string(),
        audience: Some(PROJECTED_AUDIENCE.into()),
    };
    for federated in [true, false] {
        let dev = Dev::start(DevOptions {
            config: Some(config()),
            listen: loopback0,
            admin_listen: loopback0,
            federation: federated.then(|| federation.clone()),
        })
        .await
        .expect("dev starts");
        let addr = dev.sidecar.proxy_addr();
        // The refresher prefetches at start: with the federation, the platform's JWT is what
        // authenticated the client; without it, a throwaway key did.
        let deadline = Instant::now() + Duration::from_secs(10);
        while federated && dev.authz.federated_jtis().is_empty() {
            assert!(Instant::now() < deadline, "the assertion file was not used");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if federated {
            assert_eq!(dev.authz.federated_jtis(), vec!["via-dev".to_string()]);
        } else {
            while dev.authz.token_requests() == 0 {
                assert!(Instant::now() < deadline, "no token request");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            assert!(dev.authz.federated_jtis().is_empty());
        }
        let (sidecar, rest) = dev.into_parts();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            sidecar
                .run(async {
                    let _ = rx.await;
                })
                .await;
            drop(rest);
        });
        let r = http_client()
            .get(format!("http://{addr}/orders/x"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "federated = {federated}");
        let _ = tx.send(());
        task.await.unwrap();
    }
    let received = up.received();
    assert_eq!(received.len(), 2);
    for r in &received {
        let claims = jwt_claims(&r.bearer().unwrap()).unwrap();
        assert_eq!(claims["client_id"], CLIENT_ID);
    }
}

/// The federated issuer's keys may come from a URL (an issuer's `jwks_uri`), read at start; a
/// JWKS that cannot be read stops the development server with an error naming the issuer.
#[tokio::test]
async fn the_federated_jwks_may_be_a_url_and_an_unreadable_one_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let (jwks_file, kid) = cluster_jwks(dir.path());
    // A one-shot loopback server plays the cluster's `jwks_uri` (read once, at start).
    let jwks_text = std::fs::read_to_string(&jwks_file).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let jwks_url = format!("http://{}/openid/v1/jwks", listener.local_addr().unwrap());
    let served = tokio::spawn(async move {
        use tokio::io::AsyncWriteExt as _;
        let (mut conn, _) = listener.accept().await.unwrap();
        let mut head = [0u8; 1024];
        let _ = conn.read(&mut head).await.unwrap();
        let response = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{jwks_text}",
            jwks_text.len()
        );
        conn.write_all(response.as_bytes()).await.unwrap();
    });
    // `federated_server` passes the path on as text, so a URL goes through unchanged.
    let idp = federated_server(Path::new(&jwks_url), Duration::from_secs(3600)).await;
    served.await.unwrap();
    let link = dir.path().join("token");
    swap_in(
        &link,
        &projected_token(&kid, SERVICE_ACCOUNT, "from-url", now() + 3600),
        "v1",
    );
    let up = Upstream::start().await;
    let sidecar = Running::start(federated_config(idp.token_url(), &up.url(), &link)).await;
    sidecar.wait_ready().await;
    assert_eq!(idp.federated_jtis(), vec!["from-url".to_string()]);
    sidecar.stop().await;

    let gone = DevServer::start(DevServerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        clients: vec![],
        federations: vec![DevFederation {
            issuer: CLUSTER_ISSUER.into(),
            subject: SERVICE_ACCOUNT.into(),
            client_id: CLIENT_ID.into(),
            jwks: dir.path().join("absent.json").display().to_string(),
            audience: None,
        }],
        token_ttl: Duration::from_secs(60),
    })
    .await;
    let err = gone
        .err()
        .expect("an unreadable JWKS is an error")
        .to_string();
    assert!(
        err.contains(CLUSTER_ISSUER) && err.contains("absent.json"),
        "{err}"
    );
}
